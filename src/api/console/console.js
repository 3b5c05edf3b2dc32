// billsync console: a client of billsync's own /v1 API. The key lives in sessionStorage
// (this tab only) and goes out only as an Authorization header. No inline script, no eval,
// no innerHTML with data: every text is set with textContent.
"use strict";

const KEY = "billsync.key";
const SVG = "http://www.w3.org/2000/svg";
let refreshTimer = null;

// ---- DOM helpers -------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function table(headers, rows, id) {
  return h("table", { id },
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.length ? rows.map((r) => h("tr", {}, r.map((c) => c instanceof Node ? c : h("td", {}, c ?? "—"))))
      : h("tr", {}, h("td", { colspan: headers.length, class: "muted" }, "none"))));
}

function card(label, value, id) {
  return h("div", { class: "card" }, h("div", { class: "label" }, label),
    h("div", { class: "value", id }, value ?? "—"));
}

function showMessage(text) {
  const m = document.getElementById("message");
  m.textContent = text || "";
  m.hidden = !text;
}

// What an action did; kept above the page (the overview's refresh does not wipe it).
function showNotice(text) {
  const n = document.getElementById("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

function render(...nodes) {
  const view = document.getElementById("view");
  view.replaceChildren(...nodes.filter((n) => n !== null && n !== undefined));
}

const fmtTime = (t) => (t ? t.replace("T", " ").replace(/\.\d+Z$/, "Z") : "—");
// Seconds, shown as "4.2 s" up to two minutes and as "2 h 59 min" beyond.
const fmtSecs = (x) => {
  if (x === null || x === undefined) return "—";
  if (Number(x) < 120) return `${Number(x).toFixed(1)} s`;
  const minutes = Math.ceil(Number(x) / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60);
  return hours < 48 ? `${hours} h ${minutes % 60} min` : `${Math.floor(hours / 24)} days`;
};
// Money is integer minor units; shown with the currency, never converted through floats for sums.
const fmtMoney = (minor, cur) => (minor === null || minor === undefined ? "—" : `${minor} ${String(cur || "").toUpperCase()} (minor units)`);

// ---- API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { Authorization: `Bearer ${key}` };
  if (options.body) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method: options.method || "GET", headers, body: options.body,
    credentials: "omit", cache: "no-store" });
  const body = await res.json().catch(() => null);
  if (!res.ok) {
    const e = (body && body.error) || {};
    if (res.status === 401) {
      sessionStorage.removeItem(KEY);
      showLogin(`The API key was refused (401 ${e.code || "unauthorized"}: ${e.message || "not valid"}). Enter a key from api.keys or api.tenant_keys.`);
    }
    throw new ApiError(res.status, e.code || String(res.status), e.message || res.statusText);
  }
  return body;
}

function failed(e) {
  if (e instanceof ApiError && e.status === 401) return; // the login form says it
  showMessage(e instanceof ApiError ? `${e.status} ${e.code}: ${e.message}` : String(e));
}

// ---- login and routing -------------------------------------------------------------------

function showLogin(message) {
  stopRefresh();
  document.getElementById("nav").hidden = true;
  document.getElementById("login").hidden = false;
  render();
  showMessage(message || "");
  document.getElementById("key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("key");
  sessionStorage.setItem(KEY, input.value.trim());
  input.value = "";
  try {
    await api("/v1/tenants?limit=1");
  } catch (e) { failed(e); return; }
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  showMessage("");
  if (!location.hash || location.hash === "#/") location.hash = "#/overview";
  else route();
}

function stopRefresh() {
  if (refreshTimer) clearInterval(refreshTimer);
  refreshTimer = null;
}

function route() {
  if (!sessionStorage.getItem(KEY)) { showLogin(); return; }
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  stopRefresh();
  showMessage("");
  showNotice("");
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || "");
  const page = parts[0] || "overview";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const pages = { overview, tenants, reconciliation, revenue };
  const run = pages[page] || overview;
  run(parts.slice(1), params).catch(failed);
}

// ---- Overview ----------------------------------------------------------------------------

async function overview() {
  await drawOverview();
  refreshTimer = setInterval(() => drawOverview().catch(failed), 5000);
}

async function drawOverview() {
  let status;
  try {
    status = await api("/v1/sync/status");
  } catch (e) {
    if (e instanceof ApiError && e.status === 403) {
      stopRefresh();
      render(h("h2", {}, "Overview"), h("p", { id: "scoped-note" },
        "This key is scoped to some tenants: the overview spans every tenant and needs a key from api.keys. See Tenants."));
      return;
    }
    throw e;
  }
  const runs = await api("/v1/reconciliations?status=done&limit=1");
  const latest = runs.data[0];
  const pusher = status.usage_pusher || {};
  render(
    h("h2", {}, "Overview ", h("span", { class: "muted" }, "(refreshes every 5 s)")),
    h("h3", {}, "Sync"),
    h("div", { class: "cards", id: "sync-cards" },
      card("Last webhook", fmtTime(status.last_webhook_at), "last-webhook"),
      card("Sync lag", fmtSecs(status.lag_seconds.sync), "lag-sync"),
      card("Poller lag", fmtSecs(status.lag_seconds.poller), "lag-poller"),
      card("Sweep lag", fmtSecs(status.lag_seconds.sweep), "lag-sweep"),
      card("Known tenants", status.sweep.known_tenants, "sweep-known"),
      card("Never swept", status.sweep.never_swept, "sweep-never"),
      card("Longest unchecked (bound)", fmtSecs(status.sweep.longest_unchecked_seconds), "sweep-bound"),
      card("Inbox pending", status.inbox.pending, "inbox-pending"),
      card("Inbox failed", status.inbox.failed, "inbox-failed"),
      card("Outbox pending", status.outbox.pending, "outbox-pending"),
      card("Oldest command", fmtTime(status.outbox.oldest_pending_at), "outbox-oldest"),
      card("Outbox failed", status.outbox.failed, "outbox-failed"),
      card("Usage pusher backlog", pusher.pending, "pusher-pending"),
      card("Oldest unpushed", fmtTime(pusher.oldest_pending_at), "pusher-oldest"),
      card("Stripe", status.vendor.configured ? "configured" : "not configured", "vendor")),
    h("h3", {}, "Failed events"),
    table(["Event", "Type", "Attempts", "Error", "Next attempt", ""],
      status.failed_events.map((ev) => [ev.event_id, ev.event_type, ev.attempts, ev.last_error,
        fmtTime(ev.next_attempt_at),
        h("td", {}, h("button", { type: "button", class: "retry", "data-event": ev.event_id,
          onclick: () => retryEvent(ev.event_id) }, `Retry ${ev.event_id} now`))]), "failed-events"),
    h("h3", {}, "Open reconciliation findings"),
    findingsByKind(latest),
    h("h3", {}, "Jobs"),
    table(["Job", "Runs on replica"], status.jobs.map((j) => [j.job, j.replica || "none now"]), "jobs"),
    h("p", { class: "muted" }, `This page's figures came from replica ${status.this_replica.id}.`),
  );
}

function findingsByKind(run) {
  if (!run) return h("p", { id: "findings-by-kind" }, "No finished reconciliation yet.");
  const findings = (run.summary && run.summary.findings) || {};
  const rows = Object.entries(findings).map(([kind, f]) => [kind, h("td", { class: "num" }, f.count)]);
  return h("div", { id: "findings-by-kind" },
    h("p", {}, "Latest finished run: ", h("a", { href: `#/reconciliation/${encodeURIComponent(run.id)}` }, run.id),
      ` (${fmtTime(run.finished_at)})`),
    table(["Finding", "Count"], rows));
}

async function retryEvent(eventId) {
  if (!confirm(`Retry event ${eventId} now? The applier will apply it again at once.`)) return;
  const out = await api(`/v1/sync/events/${encodeURIComponent(eventId)}/retry`, { method: "POST" }).catch(failed);
  if (!out) return;
  showMessage("");
  showNotice(`Event ${out.event_id} is due now; the applier retries it.`);
  drawOverview().catch(failed);
}

// ---- Tenants -----------------------------------------------------------------------------

async function tenants(parts, params) {
  if (parts.length) return tenantPage(parts[0]);
  const q = params.get("q") || "";
  const cursor = params.get("cursor");
  const url = `/v1/tenants?limit=20&q=${encodeURIComponent(q)}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
  const page = await api(url);
  const form = h("form", { id: "search-form", role: "search", onsubmit: (e) => {
    e.preventDefault();
    location.hash = `#/tenants?q=${encodeURIComponent(document.getElementById("q").value.trim())}`;
  } },
  h("label", { for: "q" }, "Tenant id, name, email or Stripe customer id (start of)",
    h("input", { id: "q", name: "q", type: "search", value: q })),
  h("button", { type: "submit" }, "Search"));
  const rows = page.data.map((t) => [
    h("td", {}, h("a", { href: `#/tenants/${encodeURIComponent(t.tenant_id)}`, class: "tenant-link" }, t.tenant_id)),
    t.name, t.email, t.customer_id, fmtTime(t.created_at)]);
  const next = page.next_cursor &&
    h("a", { href: `#/tenants?q=${encodeURIComponent(q)}&cursor=${encodeURIComponent(page.next_cursor)}`, id: "next-page" }, "Next page");
  render(h("h2", {}, "Tenants"), form, table(["Tenant", "Name", "Email", "Stripe customer", "Created"], rows, "tenant-list"),
    h("div", { class: "pager" }, next));
}

async function tenantPage(id) {
  const t = encodeURIComponent(id);
  const [tenant, ents, invoices, payments, events, credits, settings, notes] = await Promise.all([
    api(`/v1/tenants/${t}`), api(`/v1/tenants/${t}/entitlements`), api(`/v1/tenants/${t}/invoices?limit=20`),
    api(`/v1/tenants/${t}/payments?limit=20`), api(`/v1/tenants/${t}/events?limit=50`),
    api(`/v1/tenants/${t}/credits?limit=10`), api(`/v1/tenants/${t}/credits/settings`),
    api(`/v1/notifications?tenant_id=${t}&limit=10`)]);
  const quotas = Object.entries(ents.features).filter(([, f]) => f.kind === "quota");
  const meters = [...new Set(quotas.map(([, f]) => f.meter).filter(Boolean))];
  const grouping = new URLSearchParams(location.hash.split("?")[1] || "").get("group_by") === "hour" ? "hour" : "day";
  const usages = await Promise.all(meters.map((m) => api(`/v1/tenants/${t}/usage?meter=${encodeURIComponent(m)}&group_by=${grouping}`)));
  render(
    h("h2", { id: "tenant-title" }, `Tenant ${tenant.tenant_id}`),
    h("p", {}, `${tenant.name || "—"} · ${tenant.email || "—"} · Stripe customer ${tenant.customer_id || "none"} · synced ${fmtTime(tenant.synced_at)}`),
    subscriptionView(tenant),
    h("h3", {}, `Entitlements (plan ${ents.plan}, ${ents.status || "no subscription"}${ents.stale ? ", stale" : ""})`),
    entitlementsView(ents),
    ...creditsView(credits, settings, notes),
    h("h3", {}, "Usage"),
    h("p", {}, "Per ", h("a", { href: `#/tenants/${t}?group_by=day` }, "day"), " · ", h("a", { href: `#/tenants/${t}?group_by=hour` }, "hour")),
    ...usages.map(usageView),
    h("h3", {}, "Invoices"),
    table(["Invoice", "Status", "Total", "Due", "Paid", "Remaining", "Created"], invoices.data.map((i) =>
      [i.number || i.id, i.status, fmtMoney(i.total, i.currency), fmtMoney(i.amount_due, i.currency),
        fmtMoney(i.amount_paid, i.currency), fmtMoney(i.amount_remaining, i.currency), fmtTime(i.created)]), "invoices"),
    h("h3", {}, "Payments"),
    table(["Id", "Kind", "Status", "Amount", "Refunded", "Invoice", "Created"], payments.data.map((p) =>
      [p.id, p.kind, p.status, fmtMoney(p.amount, p.currency), fmtMoney(p.amount_refunded, p.currency), p.invoice, fmtTime(p.created)]), "payments"),
    h("h3", {}, "Event timeline"),
    table(["Created", "Event", "Type", "Source", "Outcome", "Attempts", "Error"], events.data.map((e) =>
      [fmtTime(e.created), e.event_id, e.event_type, e.source + (e.own_command ? " (own command)" : ""),
        h("td", { class: e.outcome === "failed" ? "bad" : "" }, e.outcome), e.attempts, e.last_error]), "events"),
    h("h3", {}, "Commands waiting for Stripe"),
    table(["Command", "Kind", "Status", "Accepted"], (tenant.pending || []).map((c) =>
      [c.id || c.command_id, c.kind, c.status, fmtTime(c.created_at)]), "commands"),
  );
}

// ---- Credits: balances, the latest ledger entries, low-balance settings, notifications --------

// Amounts are the API's exact decimal strings, shown as they are (minor units for a currency).
function creditsView(credits, settings, notes) {
  const unitName = (u) => (/^[a-z]{3}$/.test(u) ? `${u.toUpperCase()} (minor units)` : u);
  const balanceRows = credits.balances.map((b) => [unitName(b.unit), h("td", { class: "num" }, b.granted),
    h("td", { class: "num" }, b.burned), h("td", { class: `num ${Number(b.available) <= 0 ? "bad" : ""}` }, b.available)]);
  const ledgerRows = credits.data.map((e) => [fmtTime(e.at), e.type, e.id, unitName(e.unit), h("td", { class: "num" }, e.amount),
    e.type === "grant" ? `${e.status}, ${e.remaining} left` : `${e.feature}: ${e.quantity} × ${e.meter}`]);
  const settingRows = settings.data.map((c) => [unitName(c.unit), h("td", { class: "num" }, c.threshold),
    h("td", { class: "num" }, c.top_up_amount ?? "—"), c.auto_top_up ? "on" : "off",
    h("td", { class: c.armed ? "ok" : "bad" }, c.armed ? "armed" : "crossed: waiting for the balance to recover"),
    h("td", { class: "num" }, c.crossings), fmtTime(c.updated_at)]);
  const noteRows = notes.data.map((n) => [fmtTime(n.created_at), n.type, notificationSummary(n),
    h("td", { class: n.status === "failed" ? "bad" : n.status === "delivered" ? "ok" : "" }, n.status),
    n.attempts, n.last_error, n.id]);
  return [
    h("h3", {}, "Credits"),
    table(["Unit", "Granted", "Burned", "Available"], balanceRows, "credit-balances"),
    h("details", {}, h("summary", {}, `Latest ledger entries (${credits.data.length})`),
      table(["At", "Type", "Id", "Unit", "Amount", ""], ledgerRows, "credit-ledger")),
    h("h3", {}, "Low-balance settings"),
    table(["Unit", "Threshold", "Top-up amount", "Auto top-up", "Alarm", "Crossings", "Updated"], settingRows, "credit-settings"),
    h("h3", {}, "Latest notifications"),
    table(["Created", "Type", "What", "Delivery", "Attempts", "Last error", "Event id"], noteRows, "notifications"),
  ];
}

function notificationSummary(n) {
  const d = (n.payload && n.payload.data) || {};
  if (n.type === "credits.balance_low") {
    const topUp = d.top_up ? `; top-up ${d.top_up.amount} ${d.top_up.currency} (${d.top_up.command_id})` : "";
    return `${d.unit}: ${d.available_before} → ${d.available_after}, below ${d.threshold}${topUp}`;
  }
  if (n.type === "credits.top_up_failed") {
    const error = d.error || {};
    return `top-up ${d.amount} ${d.currency} failed: ${error.code} (${error.message}); command ${d.command_id}`;
  }
  return JSON.stringify(d);
}

function subscriptionView(tenant) {
  const sub = tenant.subscription;
  if (!sub) return h("p", { id: "subscription" }, "No subscription mirrored.");
  return h("div", { id: "subscription" }, h("h3", {}, "Subscription"),
    table(["Id", "Status", "Items", "Period", "Cancel at period end"], [[sub.id, sub.status,
      sub.items.map((i) => `${i.price} × ${i.quantity ?? 1}`).join(", "),
      `${fmtTime(sub.current_period_start)} → ${fmtTime(sub.current_period_end)}`, sub.cancel_at_period_end ? "yes" : "no"]]));
}

function entitlementsView(ents) {
  const rows = Object.entries(ents.features).map(([name, f]) => {
    if (f.kind !== "quota") return [name, f.enabled ? "enabled" : "disabled", ""];
    const label = `${f.used} of ${f.limit === null ? "unlimited" : f.limit} used`;
    return [name, label, h("td", {}, quotaBar(name, f))];
  });
  return table(["Feature", "Standing", "Quota"], rows, "entitlements");
}

// The bar's geometry is a float; the figures in its label are the API's exact decimal strings.
function quotaBar(name, f) {
  const used = Number(f.used);
  const ratio = f.limit ? Math.min(used / f.limit, 1) : 0;
  const over = f.limit !== null && used > f.limit;
  return s("svg", { class: "bar", viewBox: "0 0 100 10", preserveAspectRatio: "none", role: "img", "data-feature": name,
    "data-used": f.used, "data-limit": f.limit === null ? "unlimited" : f.limit, "aria-label": `${name}: ${f.used} of ${f.limit ?? "unlimited"}` },
  s("rect", { class: "track", x: 0, y: 0, width: 100, height: 10 }),
  s("rect", { class: over ? "over" : "used", x: 0, y: 0, width: (ratio * 100).toFixed(2), height: 10 }));
}

function usageView(u) {
  return h("div", { class: "usage", "data-meter": u.meter },
    h("p", {}, `${u.meter}: ${u.total} in total, ${u.pushed} pushed to Stripe, ${u.unpushed} not yet (${fmtTime(u.from)} → ${fmtTime(u.to)}, per ${u.group_by})`),
    h("div", { class: "legend" }, h("span", {}, h("i", { class: "swatch pushed" }), "pushed"),
      h("span", {}, h("i", { class: "swatch unpushed" }), "not yet pushed")),
    usageChart(u));
}

// Each bucket sits at its time within the window, so empty hours or days show as gaps.
function usageChart(u) {
  const W = 800, H = 200, pad = 30;
  const t0 = Date.parse(u.from), t1 = Date.parse(u.to);
  const span = Math.max(t1 - t0, 1);
  const step = u.group_by === "hour" ? 3600e3 : 86400e3;
  const max = Math.max(1, ...u.buckets.map((b) => Number(b.quantity)));
  const xOf = (t) => pad + ((t - t0) / span) * (W - 2 * pad);
  const bw = Math.max(((W - 2 * pad) * step) / span - 1, 1);
  const svg = s("svg", { class: "chart usage-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "data-meter": u.meter,
    "data-total": u.total, "aria-label": `Usage of ${u.meter} per ${u.group_by}: ${u.total} in total` },
  s("line", { class: "axis", x1: pad, y1: H - pad, x2: W - pad, y2: H - pad }),
  s("text", { x: 2, y: pad }, String(max)), s("text", { x: 2, y: H - pad }, "0"),
  s("text", { x: pad, y: H - 8 }, fmtTime(u.from)), s("text", { x: W - pad - 150, y: H - 8 }, fmtTime(u.to)));
  for (const b of u.buckets) {
    const x = xOf(Date.parse(b.start));
    const hp = (Number(b.pushed) / max) * (H - 2 * pad);
    const hu = (Number(b.unpushed) / max) * (H - 2 * pad);
    const g = s("g", { class: "bucket", "data-start": b.start, "data-quantity": b.quantity },
      s("title", {}, `${fmtTime(b.start)}: ${b.quantity} (${b.pushed} pushed, ${b.unpushed} not yet)`));
    g.append(s("rect", { class: "pushed", x, y: H - pad - hp, width: bw, height: hp }));
    g.append(s("rect", { class: "unpushed", x, y: H - pad - hp - hu, width: bw, height: hu }));
    svg.append(g);
  }
  return svg;
}

// ---- Reconciliation ----------------------------------------------------------------------

async function reconciliation(parts) {
  if (parts.length) return runPage(parts[0]);
  const runs = await api("/v1/reconciliations?limit=50");
  const today = new Date().toISOString().slice(0, 10);
  const monthAgo = new Date(Date.now() - 31 * 86400e3).toISOString().slice(0, 10);
  const form = h("form", { id: "reconcile-form", onsubmit: startRun },
    h("label", { for: "rc-from" }, "From (date)", h("input", { id: "rc-from", name: "from", type: "date", value: monthAgo, required: true })),
    h("label", { for: "rc-to" }, "To (date, exclusive)", h("input", { id: "rc-to", name: "to", type: "date", value: nextDay(today), required: true })),
    h("label", { for: "rc-tenant" }, "Tenant (optional)", h("input", { id: "rc-tenant", name: "tenant", type: "text" })),
    h("label", { for: "rc-dry" }, "Dry run", h("input", { id: "rc-dry", name: "dry_run", type: "checkbox" })),
    h("button", { type: "submit", id: "rc-start" }, "Start reconciliation"));
  render(h("h2", {}, "Reconciliation"), form,
    table(["Run", "Status", "Window", "Tenant", "Trigger", "Started", "Findings"], runs.data.map((r) => [
      h("td", {}, h("a", { href: `#/reconciliation/${encodeURIComponent(r.id)}`, class: "run-link" }, r.id)),
      r.status, `${r.from.slice(0, 10)} → ${r.to.slice(0, 10)}`, r.tenant_id, r.trigger, fmtTime(r.started_at),
      r.summary ? r.summary.items : "—"]), "runs"));
}

// A finding's evidence: everything the report says of it besides what the other columns show.
function evidence(item) {
  const { area, finding, tenant_id, ...rest } = item;
  return rest;
}

function nextDay(day) {
  return new Date(Date.parse(day) + 86400e3).toISOString().slice(0, 10);
}

async function startRun(event) {
  event.preventDefault();
  const body = { from: document.getElementById("rc-from").value, to: document.getElementById("rc-to").value,
    dry_run: document.getElementById("rc-dry").checked };
  const tenant = document.getElementById("rc-tenant").value.trim();
  if (tenant) body.tenant = tenant;
  if (!confirm(`Start a reconciliation from ${body.from} to ${body.to}${tenant ? ` for ${tenant}` : ""}?`)) return;
  const run = await api("/v1/reconciliations", { method: "POST", body: JSON.stringify(body) }).catch(failed);
  if (run) location.hash = `#/reconciliation/${encodeURIComponent(run.id)}`;
}

async function runPage(id) {
  const run = await api(`/v1/reconciliations/${encodeURIComponent(id)}?limit=1000`);
  const items = run.items || [];
  render(h("h2", {}, `Reconciliation ${run.id}`),
    h("p", { id: "run-status" }, `Status: ${run.status} · ${run.from} → ${run.to} · started ${fmtTime(run.started_at)}`,
      run.error ? ` · error: ${run.error}` : ""),
    run.summary ? h("details", {}, h("summary", {}, "Summary"), h("pre", {}, JSON.stringify(run.summary, null, 2))) : null,
    h("h3", {}, `Findings (${items.length})`),
    table(["Area", "Finding", "Tenant", "Evidence"], items.map((it) => [it.area, it.finding, it.tenant_id,
      h("td", {}, h("pre", {}, JSON.stringify(evidence(it), null, 2)))]), "findings"));
  if (run.status === "running") refreshTimer = setTimeout(() => runPage(id).catch(failed), 1000);
}

// ---- Revenue -----------------------------------------------------------------------------

async function revenue(parts, params) {
  const year = new Date().getUTCFullYear();
  const from = params.get("from") || `${year}-01-01`;
  const to = params.get("to") || `${year + 1}-01-01`;
  const report = await api(`/v1/revenue?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}&group_by=month`);
  const currencies = [...new Set(report.periods.map((p) => p.currency))];
  const form = h("form", { id: "revenue-form", onsubmit: (e) => {
    e.preventDefault();
    location.hash = `#/revenue?from=${document.getElementById("rv-from").value}&to=${document.getElementById("rv-to").value}`;
  } },
  h("label", { for: "rv-from" }, "From", h("input", { id: "rv-from", type: "date", value: from })),
  h("label", { for: "rv-to" }, "To (exclusive)", h("input", { id: "rv-to", type: "date", value: to })),
  h("button", { type: "submit" }, "Show"));
  render(h("h2", {}, "Revenue"), form, csvLink(report),
    h("div", { class: "legend" }, h("span", {}, h("i", { class: "swatch recognised" }), "recognised"),
      h("span", {}, h("i", { class: "swatch deferred" }), "deferred")),
    ...currencies.map((c) => revenueChart(c, report.periods.filter((p) => p.currency === c))),
    table(["Month", "Currency", "Recognised", "Billed", "Deferred"], report.periods.map((p) =>
      [p.start, p.currency, h("td", { class: "num" }, p.recognised.total), h("td", { class: "num" }, p.billed),
        h("td", { class: "num" }, p.deferred)]), "revenue-table"));
}

function csvLink(report) {
  const lines = ["start,end,currency,recognised,billed,deferred,uncollectible"];
  for (const p of report.periods) {
    lines.push([p.start, p.end, p.currency, p.recognised.total, p.billed, p.deferred, p.uncollectible].join(","));
  }
  const blob = new Blob([lines.join("\n") + "\n"], { type: "text/csv" });
  return h("p", {}, h("a", { id: "revenue-csv", href: URL.createObjectURL(blob), download: `revenue-${report.from}-${report.to}.csv` },
    "Download CSV"), h("span", { class: "muted" }, " (amounts in minor units)"));
}

function revenueChart(currency, periods) {
  const W = 800, H = 220, pad = 40;
  const max = Math.max(1, ...periods.map((p) => Math.max(p.recognised.total, p.deferred)));
  const bw = periods.length ? (W - 2 * pad) / periods.length : 0;
  const svg = s("svg", { class: "chart revenue-chart", viewBox: `0 0 ${W} ${H}`, role: "img", "data-currency": currency,
    "aria-label": `Recognised and deferred revenue per month in ${currency.toUpperCase()}` },
  s("line", { class: "axis", x1: pad, y1: H - pad, x2: W - pad, y2: H - pad }),
  s("text", { x: 2, y: 14 }, `${currency.toUpperCase()} ${max}`));
  periods.forEach((p, i) => {
    const x = pad + i * bw;
    const hr = (p.recognised.total / max) * (H - 2 * pad);
    const hd = (p.deferred / max) * (H - 2 * pad);
    const half = Math.max(bw / 2 - 2, 1);
    svg.append(s("rect", { class: "recognised", x: x + 1, y: H - pad - hr, width: half, height: hr },
      s("title", {}, `${p.start} recognised ${p.recognised.total}`)));
    svg.append(s("rect", { class: "deferred", x: x + 1 + half, y: H - pad - hd, width: half, height: hd },
      s("title", {}, `${p.start} deferred ${p.deferred}`)));
    svg.append(s("text", { x: x + 1, y: H - pad + 14 }, p.start.slice(0, 7)));
  });
  return h("div", {}, h("h3", {}, currency.toUpperCase()), svg);
}

// ---- start -------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", signIn);
  document.getElementById("signout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin("The key is forgotten.");
  });
  window.addEventListener("hashchange", route);
  route();
});
