#!/usr/bin/env python3
"""billsync chaos run: several `billsync serve` replicas on one PostgreSQL database, a flaky
Stripe (localstripe behind a fault-injecting proxy that also plays Stripe's idempotency layer,
billing meter events, events list and webhooks), a usage, command and dashboard load, and a
random replica killed with SIGKILL every few seconds. When the load is done it waits for the
system to converge and checks that nothing was lost, doubled or left different.

Run it through `scripts/chaos` (which creates .venv and builds the binary); see docs/chaos.md.
Exit status: 0 when every check passed, 1 when a check failed, 2 when the run itself could not
be carried out (setup failed, PostgreSQL missing, ...).
"""

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.parse
from collections import Counter, defaultdict
from datetime import datetime, timezone
from decimal import Decimal

import aiohttp
from aiohttp import web

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API_KEY = "chaos-api-key-0123456789abcdef"
STRIPE_KEY = "sk_test_chaos"
WEBHOOK_SECRET = "whsec_chaos_0123456789"
PLANS = {"plan_basic": 1000, "plan_pro": 5000}
# The chaos catalog: two sum/count meters carried by /v1/usage, one count meter fed by
# check-and-record (the hard limit), every one pushed to a Stripe meter.
EXPORTS_LIMIT = 40
CATALOG = f"""# Written by scripts/chaos.py for the chaos run.
[meters.api_calls]
aggregation = "sum"
stripe_event_name = "api_calls"
late_window = "24h"

[meters.builds]
aggregation = "count"
stripe_event_name = "builds"
late_window = "24h"

[meters.exports]
aggregation = "count"
stripe_event_name = "exports"
late_window = "24h"

[features.api_calls]
meter = "api_calls"

[features.builds]
meter = "builds"

[features.exports]
meter = "exports"

[plans.free]
features = {{ api_calls = 1000, builds = 100, exports = {EXPORTS_LIMIT} }}

[plans.plan_basic]
features = {{ api_calls = 100000000, builds = 1000000, exports = {EXPORTS_LIMIT} }}

[plans.plan_pro]
features = {{ api_calls = "unlimited", builds = 2000000, exports = {EXPORTS_LIMIT}, sso = true }}
"""
# What the catalog grants, for the entitlement check (limit None = unlimited).
PLAN_FEATURES = {
    "free": {"api_calls": 1000, "builds": 100, "exports": EXPORTS_LIMIT},
    "plan_basic": {"api_calls": 100000000, "builds": 1000000, "exports": EXPORTS_LIMIT},
    "plan_pro": {"api_calls": None, "builds": 2000000, "exports": EXPORTS_LIMIT, "sso": True},
}
METERS = {"api_calls": "sum", "builds": "count", "exports": "count"}
LIVENESS = {"active": 3, "trialing": 3, "past_due": 3, "paused": 2, "unpaid": 2, "incomplete": 2,
            "canceled": 0, "incomplete_expired": 0}
NET_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, OSError)


def die_with_parent():
    """Run in a child before exec: it gets SIGKILL when the harness dies, however it dies."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ChaosError(Exception):
    """The run itself could not be carried out (not a failed check)."""


# ───────────────────────────── small helpers ─────────────────────────────

T0 = time.monotonic()
LOG_FILE = None


def log(message):
    line = f"[{time.monotonic() - T0:7.1f}s] {message}"
    print(line, flush=True)
    if LOG_FILE:
        LOG_FILE.write(line + "\n")
        LOG_FILE.flush()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def now_rfc3339():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_ms(text):
    if text is None:
        return None
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def dec(value):
    return Decimal(str(value)).normalize() if value is not None else None


def fmt(d):
    if d is None:
        return "null"
    d = Decimal(d).normalize()
    return format(d, "f")


def liveness(sub):
    return LIVENESS.get(sub.get("status"), 1)


def current_subscription(subs):
    """The tenant's subscription as billsync picks it: liveliest, newest, id as tie-break."""
    if not subs:
        return None
    return max(subs, key=lambda s: (liveness(s), s.get("created") or 0, s.get("id") or ""))


def sub_item(sub):
    items = (sub.get("items") or {}).get("data") or []
    if len(items) != 1:
        return None, None
    item = items[0]
    plan = item.get("plan")
    plan = plan.get("id") if isinstance(plan, dict) else plan
    price = item.get("price")
    price = price.get("id") if isinstance(price, dict) else price
    return (plan or price), item.get("quantity")


async def psql(url, sql):
    proc = await asyncio.create_subprocess_exec(
        "psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-F", "\t", "-c", sql,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"})
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise ChaosError(f"psql failed ({sql[:60]}...): {err.decode().strip()}")
    return [line.split("\t") for line in out.decode().splitlines() if line]


def db_url(admin_url, name):
    parts = urllib.parse.urlsplit(admin_url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, ""))


# ───────────────────────────── the vendor: localstripe behind a proxy ─────────────────────────────

class Vendor:
    """A fault-injecting proxy in front of localstripe that also does what localstripe lacks:
    Stripe's idempotency layer, billing meter events, the events list (newest first) and webhooks
    (duplicated, shuffled, some dropped, signed like Stripe's)."""

    def __init__(self, args, ls_base, out_dir, replicas, session):
        self.args = args
        self.ls = ls_base
        self.replicas = replicas          # callable: the live replicas' base URLs
        self.session = session
        self.faults_on = not args.no_faults
        self.idem = {}                    # key -> {"state", "fp", "status", "body"}
        self.forwards = Counter()         # key -> writes that actually reached localstripe/meters
        self.writes = []                  # every forwarded write: key, method, path, status
        self.meter_events = {}            # identifier -> accepted meter event
        self.meter_attempts = Counter()   # identifier -> requests that reached the meter handler
        self.meter_duplicate_refusals = 0
        self.events = []                  # synthesized Stripe events, oldest first
        self.event_index = {}
        self.stats = Counter()
        self.burst_until = 0.0
        self.log = open(os.path.join(out_dir, "proxy.log"), "w")
        self.tasks = set()
        self.seq = 0

    # ── plumbing ──
    def spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def note(self, **fields):
        fields["t"] = round(time.monotonic() - T0, 3)
        self.log.write(json.dumps(fields) + "\n")

    async def bursts(self):
        """Every ~10 s, 1–2 s in which every request is answered 429."""
        while True:
            await asyncio.sleep(random.uniform(8, 12))
            if not self.faults_on:
                continue
            length = random.uniform(1, 2)
            self.burst_until = time.monotonic() + length
            self.stats["bursts_429"] += 1
            self.note(event="burst_429", seconds=round(length, 2))

    @staticmethod
    def error(status, kind, message, code=None):
        body = {"error": {"type": kind, "message": message}}
        if code:
            body["error"]["code"] = code
        return status, json.dumps(body).encode()

    # ── the proxy's request handler ──
    async def handle(self, request):
        started = time.monotonic()
        body = await request.read()
        method, path, query = request.method, request.path, request.query_string
        key = request.headers.get("Idempotency-Key")
        write = method in ("POST", "DELETE")
        self.stats["requests"] += 1
        fault, slow_before, slow_after = None, 0.0, 0.0
        if self.faults_on:
            if time.monotonic() < self.burst_until:
                fault = "429"
            else:
                roll = random.random()
                if roll < self.args.fault_rate / 2:
                    fault = "5xx_before"
                elif roll < self.args.fault_rate:
                    fault = "5xx_after"
            if random.random() < self.args.slow_rate:
                delay = random.uniform(0.5, 3.0)
                if random.random() < 0.5:
                    slow_before = delay
                else:
                    slow_after = delay
        replayed = False
        if fault == "429":
            self.stats["answered_429"] += 1
            status, out = self.error(429, "invalid_request_error", "chaos: too many requests", "rate_limit")
        elif fault == "5xx_before":
            self.stats["answered_5xx_before"] += 1
            if slow_before:
                await asyncio.sleep(slow_before)
            status, out = self.error(random.choice([500, 502, 503]), "api_error", "chaos: failed before forwarding")
        else:
            if slow_before:
                self.stats["slow"] += 1
                await asyncio.sleep(slow_before)
            if write and key:
                status, out, replayed = await self.idempotent(method, path, query, body, key)
            else:
                status, out = await self.execute(method, path, query, body, key)
            if slow_after:
                self.stats["slow"] += 1
                await asyncio.sleep(slow_after)
            if fault == "5xx_after":
                self.stats["answered_5xx_after"] += 1
                status, out = self.error(random.choice([500, 502, 503]), "api_error", "chaos: failed after forwarding")
        self.note(m=method, p=path, q=query[:120], key=key, fault=fault, status=status, replayed=replayed,
                  ms=int((time.monotonic() - started) * 1000))
        headers = {"Request-Id": f"req_chaos{random.getrandbits(48):012x}"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return web.Response(status=status, body=out, content_type="application/json", headers=headers)

    async def idempotent(self, method, path, query, body, key):
        """Stripe's idempotency layer: the first completed answer per key is kept and replayed."""
        fingerprint = hashlib.sha256(f"{method} {path}?{query}\n".encode() + body).hexdigest()
        entry = self.idem.get(key)
        if entry is not None:
            if entry["state"] == "in_flight":
                self.stats["idempotency_in_flight_409"] += 1
                s, o = self.error(409, "idempotency_error",
                                  "There is currently another in-progress request using this idempotency key.",
                                  "idempotency_key_in_use")
                return s, o, False
            if entry["fp"] != fingerprint:
                self.stats["idempotency_mismatch_400"] += 1
                s, o = self.error(400, "idempotency_error",
                                  "Keys for idempotent requests can only be used with the same parameters "
                                  "they were first used with.")
                return s, o, False
            self.stats["idempotent_replays"] += 1
            return entry["status"], entry["body"], True
        entry = {"state": "in_flight", "fp": fingerprint}
        self.idem[key] = entry
        try:
            status, out = await self.execute(method, path, query, body, key)
        except BaseException:
            del self.idem[key]
            raise
        if status >= 500 or status == 429:
            # Stripe does not keep a result that did not execute.
            del self.idem[key]
        else:
            entry.update(state="done", status=status, body=out)
        return status, out, False

    async def execute(self, method, path, query, body, key, dashboard=False):
        """Carries a request out: the proxy's own endpoints, or localstripe. Writes billsync
        made are counted per idempotency key; the harness's own (the dashboard) are not."""
        if method == "POST" and path == "/v1/billing/meter_events":
            self.forwards[key] += 1
            return self.meter_event(body, key)
        if method == "GET" and path == "/v1/events":
            return self.list_events(urllib.parse.parse_qs(query))
        if method == "GET" and path == "/v1/billing/meters":
            data = [{"id": f"mtr_{name}", "object": "billing.meter", "event_name": name, "status": "active"}
                    for name in METERS]
            return 200, json.dumps({"object": "list", "data": data, "has_more": False}).encode()
        url = self.ls + path + (("?" + query) if query else "")
        send_headers = {"Authorization": f"Bearer {STRIPE_KEY}"}
        if body:
            send_headers["Content-Type"] = "application/x-www-form-urlencoded"
        write = method in ("POST", "DELETE")
        try:
            async with self.session.request(method, url, data=body or None, headers=send_headers,
                                            timeout=aiohttp.ClientTimeout(total=60)) as r:
                out = await r.read()
                status = r.status
        except NET_ERRORS as e:
            self.stats["localstripe_errors"] += 1
            return self.error(502, "api_error", f"chaos proxy: localstripe unreachable: {e!r}")
        if write and not dashboard:
            self.forwards[key] += 1
            self.writes.append({"key": key, "method": method, "path": path, "status": status,
                                "t": round(time.monotonic() - T0, 3)})
        if write and 200 <= status < 300:
            await self.synthesize(method, path, out, key)
        return status, out

    # ── billing meter events (Stripe's; localstripe has none) ──
    def meter_event(self, body, key):
        form = dict(urllib.parse.parse_qsl(body.decode()))
        name = form.get("event_name")
        identifier = form.get("identifier") or f"auto_{random.getrandbits(64):016x}"
        customer = form.get("payload[stripe_customer_id]")
        value = form.get("payload[value]")
        self.meter_attempts[identifier] += 1
        if name not in METERS:
            return self.error(400, "invalid_request_error", f"No active meter found for event_name {name!r}")
        try:
            value = Decimal(value)
        except Exception:
            return self.error(400, "invalid_request_error", f"Invalid payload[value]: {value!r}")
        if not customer:
            return self.error(400, "invalid_request_error", "Missing payload[stripe_customer_id]")
        if identifier in self.meter_events:
            self.meter_duplicate_refusals += 1
            return self.error(400, "invalid_request_error",
                              f"An event with identifier {identifier} already exists.", "resource_already_exists")
        ts = int(form.get("timestamp") or time.time())
        event = {"identifier": identifier, "event_name": name, "customer": customer, "value": value,
                 "timestamp": ts, "key": key, "at": round(time.monotonic() - T0, 3)}
        self.meter_events[identifier] = event
        answer = {"object": "billing.meter_event", "created": int(time.time()), "event_name": name,
                  "identifier": identifier, "livemode": False,
                  "payload": {"stripe_customer_id": customer, "value": str(value)}, "timestamp": ts}
        return 200, json.dumps(answer).encode()

    # ── events: synthesized from writes, listed newest first, delivered as webhooks ──
    async def synthesize(self, method, path, out, key):
        parts = path.strip("/").split("/")
        try:
            obj = json.loads(out)
        except ValueError:
            return
        kind = None
        if parts[1:2] == ["customers"]:
            if len(parts) == 2 and method == "POST":
                kind = "customer.created"
            elif len(parts) == 3 and method == "POST":
                kind = "customer.updated"
            elif len(parts) == 4 and parts[3] == "sources" and method == "POST":
                kind = "customer.updated"
                obj = await self.fetch_direct(f"/v1/customers/{parts[2]}")
        elif parts[1:2] == ["subscriptions"]:
            if len(parts) == 2 and method == "POST":
                kind = "customer.subscription.created"
            elif len(parts) == 3 and method == "POST":
                kind = "customer.subscription.updated"
            elif len(parts) == 3 and method == "DELETE":
                kind = "customer.subscription.deleted"
        elif parts[1:2] == ["plans"] and len(parts) == 2 and method == "POST":
            kind = "plan.created"
        elif parts[1:2] == ["products"] and len(parts) == 2 and method == "POST":
            kind = "product.created"
        if kind is None or not isinstance(obj, dict):
            return
        self.seq += 1
        event = {"id": f"evt_chaos{self.seq:06d}{random.getrandbits(32):08x}", "object": "event",
                 "api_version": "2017-08-15", "created": int(time.time()), "livemode": False,
                 "pending_webhooks": 1, "type": kind,
                 "request": {"id": f"req_chaos{random.getrandbits(48):012x}", "idempotency_key": key},
                 "data": {"object": obj}}
        self.event_index[event["id"]] = len(self.events)
        self.events.append(event)
        self.stats["events"] += 1
        self.schedule(event)

    def list_events(self, query):
        def one(name):
            values = query.get(name)
            return values[0] if values else None
        limit = min(max(int(one("limit") or 10), 1), 100)
        gte, gt = one("created[gte]"), one("created[gt]")
        lte, lt = one("created[lte]"), one("created[lt]")
        newest_first = [e for e in reversed(self.events)
                        if (gte is None or e["created"] >= int(gte)) and (gt is None or e["created"] > int(gt))
                        and (lte is None or e["created"] <= int(lte)) and (lt is None or e["created"] < int(lt))]
        after = one("starting_after")
        if after:
            ids = [e["id"] for e in newest_first]
            newest_first = newest_first[ids.index(after) + 1:] if after in ids else []
        page = newest_first[:limit]
        body = {"object": "list", "url": "/v1/events", "data": page, "has_more": len(newest_first) > limit}
        return 200, json.dumps(body).encode()

    def schedule(self, event):
        if random.random() < self.args.drop_rate:
            self.stats["webhooks_dropped"] += 1
            return
        self.spawn(self.deliver(event, random.uniform(0, self.args.shuffle_window)))
        if random.random() < self.args.dup_rate:
            self.stats["webhooks_duplicated"] += 1
            self.spawn(self.deliver(event, random.uniform(0.2, 3.0)))

    async def deliver(self, event, delay):
        await asyncio.sleep(delay)
        payload = json.dumps(event).encode()
        tried = None
        for attempt in range(12):
            live = self.replicas()
            if not live:
                await asyncio.sleep(0.5)
                continue
            choices = [r for r in live if r != tried] or live
            target = random.choice(choices)
            tried = target
            stamp = int(time.time())
            signature = hmac.new(WEBHOOK_SECRET.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
            headers = {"Content-Type": "application/json", "Stripe-Signature": f"t={stamp},v1={signature}"}
            try:
                async with self.session.post(target + "/webhooks/stripe", data=payload, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=10)) as r:
                    text = await r.text()
                    if 200 <= r.status < 300:
                        self.stats["webhook_deliveries"] += 1
                        if '"duplicate":true' in text.replace(" ", ""):
                            self.stats["webhook_acks_duplicate"] += 1
                        return
                    if r.status < 500:
                        self.stats["webhooks_refused_4xx"] += 1
                        self.note(event="webhook_refused", id=event["id"], status=r.status, body=text[:300])
                        return
                    self.stats["webhook_retries"] += 1
            except NET_ERRORS:
                self.stats["webhook_retries"] += 1
            await asyncio.sleep(min(0.25 * (attempt + 1), 2.0))
        self.stats["webhooks_undelivered"] += 1

    # ── the harness's own, fault-free access ("the dashboard") ──
    async def fetch_direct(self, path, params=None):
        async with self.session.get(self.ls + path, params=params, headers={"Authorization": f"Bearer {STRIPE_KEY}"},
                                    timeout=aiohttp.ClientTimeout(total=60)) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise ChaosError(f"localstripe GET {path}: {r.status} {body}")
            return body

    async def list_direct(self, path, params=None):
        out, after = [], None
        while True:
            query = dict(params or {}, limit="100")
            if after:
                query["starting_after"] = after
            page = await self.fetch_direct(path, query)
            out.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                return out
            after = page["data"][-1]["id"]

    async def dashboard(self, method, path, form):
        """A change customer success makes in the dashboard: no faults, but its event is
        synthesized and delivered like any other."""
        body = urllib.parse.urlencode(form).encode()
        status, out = await self.execute(method, path, "", body, None, dashboard=True)
        if not 200 <= status < 300:
            raise ChaosError(f"dashboard {method} {path}: {status} {out[:300]!r}")
        return json.loads(out)


# ───────────────────────────── billsync replicas ─────────────────────────────

class Replica:
    def __init__(self, n, binary, env, out_dir):
        self.n = n
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.binary = binary
        self.env = dict(env, BILLSYNC_LISTEN=f"127.0.0.1:{self.port}")
        self.log_path = os.path.join(out_dir, f"replica-{n}.log")
        self.proc = None
        self.alive = False          # started and answering
        self.expected_down = False  # killed (or stopped) by the harness
        self.starts = 0
        self.crashes = []

    def start(self):
        self.starts += 1
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"chaos": f"start #{self.starts}", "at": now_rfc3339()}) + "\n")
        log_file = open(self.log_path, "a")
        self.proc = subprocess.Popen([self.binary, "serve"], stdout=log_file, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=ROOT, start_new_session=True,
                                     preexec_fn=die_with_parent)
        log_file.close()
        self.expected_down = False

    def kill(self):
        """SIGKILL; `alive` stays as it is until the caller decides clients have noticed."""
        self.expected_down = True
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"chaos": "killed with SIGKILL", "at": now_rfc3339()}) + "\n")

    async def wait_ready(self, session, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ChaosError(f"replica {self.n} exited with {self.proc.returncode} at start; see {self.log_path}")
            try:
                async with session.get(self.base + "/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        self.alive = True
                        return
            except NET_ERRORS:
                pass
            await asyncio.sleep(0.1)
        raise ChaosError(f"replica {self.n} not ready after {timeout}s; see {self.log_path}")

    def stop(self, grace=10):
        """SIGTERM, then SIGKILL; returns the exit code of a graceful stop."""
        self.expected_down = True
        self.alive = False
        if not self.proc or self.proc.poll() is not None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "killed after grace"


# ───────────────────────────── the run ─────────────────────────────

class Chaos:
    def __init__(self, args):
        self.args = args
        self.out = args.out_dir
        self.replicas = []
        self.session = None
        self.vendor = None
        self.db = None
        self.admin = args.database_url
        self.db_name = f"billsync_chaos_{os.getpid()}"
        self.kills = 0
        self.load_done = asyncio.Event()
        self.tenants = []            # tenant ids
        self.customers = {}          # tenant -> customer id
        self.hot = []                # tenants that get the check-and-record bursts
        self.model = {}              # tenant -> expected vendor state after the harness's commands
        self.commands = []           # every command the harness had accepted
        self.command_keys = 0
        self.refusals = []           # commands billsync refused at the door (4xx)
        self.sent = {}               # (tenant, id) -> (meter, quantity, ts_ms) of every usage event sent
        self.acked = set()           # (tenant, id) acknowledged by a 2xx
        self.rejected = []           # per-event rejections (should be none)
        self.batches = Counter()
        self.recorded = defaultdict(set)   # hot tenant -> record ids answered recorded:true
        self.denied = Counter()
        self.api_stats = Counter()
        self.harness_errors = []
        self.timeline = {}
        self.ls_proc = None
        self.inflight = Counter()    # replica base URL -> harness requests in flight
        self.inflight_usage = Counter()  # the same, POST /v1/usage only
        self.usage_started = {}      # replica base URL -> when its latest usage batch was sent
        self.usage_latency = 0.1     # moving average of a usage batch's answer time
        self.kills_in_flight = 0     # kills that cut at least one harness request
        self.kills_in_usage = 0      # kills that cut a usage batch

    # ── HTTP to billsync, retried on another replica like a careful client ──
    def live(self):
        return [r.base for r in self.replicas if r.alive]

    async def call(self, method, path, body=None, headers=None, deadline=300, base=None, tries=None):
        """(status, json) from a live replica; connection errors, timeouts, 5xx and 429 are retried
        on another replica (the same request: the routes used are idempotent or keyed)."""
        end = time.monotonic() + deadline
        last, tried = None, None
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Authorization": f"Bearer {API_KEY}"}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        while time.monotonic() < end:
            if base is not None:
                target = base
            else:
                live = self.live()
                if not live:
                    await asyncio.sleep(0.1)
                    continue
                target = random.choice([b for b in live if b != tried] or live)
            tried = target
            if tries is not None:
                tries.append(target)
            self.inflight[target] += 1
            sent_at = time.monotonic()
            if path == "/v1/usage":
                self.inflight_usage[target] += 1
                self.usage_started[target] = sent_at
            try:
                async with self.session.request(method, target + path, data=data, headers=hdrs,
                                                timeout=aiohttp.ClientTimeout(total=30)) as r:
                    text = await r.text()
                    if path == "/v1/usage" and r.status == 200:
                        self.usage_latency = 0.9 * self.usage_latency + 0.1 * (time.monotonic() - sent_at)
                    if r.status >= 500 or r.status == 429:
                        self.api_stats[f"retried_{r.status}"] += 1
                        last = f"{r.status} {text[:200]}"
                    else:
                        try:
                            parsed = json.loads(text) if text else None
                        except ValueError:
                            parsed = text
                        return r.status, parsed
            except NET_ERRORS as e:
                self.api_stats["retried_connection"] += 1
                last = repr(e)
            finally:
                self.inflight[target] -= 1
                if path == "/v1/usage":
                    self.inflight_usage[target] -= 1
            await asyncio.sleep(random.uniform(0.05, 0.3))
        raise ChaosError(f"{method} {path}: no answer within {deadline}s (last: {last})")

    # ── setup ──
    async def start_postgres_db(self):
        try:
            await psql(self.admin, "select 1")
        except ChaosError as e:
            raise ChaosError(f"PostgreSQL is not reachable at {self.admin}: {e}")
        await psql(self.admin, f"drop database if exists {self.db_name}")
        await psql(self.admin, f"create database {self.db_name}")
        self.db = db_url(self.admin, self.db_name)
        log(f"database {self.db_name} created")

    def replica_env(self, proxy_base, catalog):
        env = {k: v for k, v in os.environ.items() if not k.startswith("BILLSYNC_")}
        a = self.args
        env.update({
            "BILLSYNC_DATABASE__URL": self.db,
            "BILLSYNC_API__KEYS": API_KEY,
            "BILLSYNC_STRIPE__API_KEY": STRIPE_KEY,
            "BILLSYNC_STRIPE__API_BASE": proxy_base,
            "BILLSYNC_STRIPE__WEBHOOK_SECRETS": WEBHOOK_SECRET,
            "BILLSYNC_STRIPE__LEGACY_PLANS": "true",
            "BILLSYNC_STRIPE__RATE_LIMIT": "200",
            "BILLSYNC_STRIPE__RETRY_BASE_DELAY": "100ms",
            "BILLSYNC_STRIPE__TIMEOUT": "10s",
            "BILLSYNC_SYNC__POLL_INTERVAL": "1s",
            "BILLSYNC_SYNC__SWEEP_INTERVAL": "5s",
            "BILLSYNC_SYNC__MAX_RETRY_DELAY": "10s",
            "BILLSYNC_METERING__PUSH_INTERVAL": "1s",
            "BILLSYNC_METERING__SNAPSHOT_INTERVAL": "10s",
            "BILLSYNC_RECONCILE__INTERVAL": "0s",
            "BILLSYNC_CATALOG__PATH": catalog,
            "BILLSYNC_LOG__FORMAT": "json",
            "BILLSYNC_LOG__LEVEL": a.log_level,
            "BILLSYNC_SHUTDOWN__GRACE": "2s",
        })
        return env

    async def start_localstripe(self):
        port = free_port()
        # localstripe pickles its whole store to /tmp on every write; that costs CPU the run
        # needs and clobbers other localstripes' file, so it is switched off here.
        code = ("import sys; import localstripe.resources as r; r.Store.dump_to_disk = lambda self: None; "
                "from localstripe.server import start; sys.argv = ['localstripe', '--port', sys.argv[1], "
                "'--from-scratch']; start()")
        log_file = open(os.path.join(self.out, "localstripe.log"), "w")
        self.ls_proc = subprocess.Popen([sys.executable, "-c", code, str(port)], stdout=log_file,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_parent)
        log_file.close()
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                async with self.session.get(base + "/v1/plans", headers={"Authorization": f"Bearer {STRIPE_KEY}"},
                                            timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        log(f"localstripe on {base}")
                        return base
            except NET_ERRORS:
                pass
            if self.ls_proc.poll() is not None:
                raise ChaosError("localstripe exited at start; see target/chaos/localstripe.log")
            await asyncio.sleep(0.1)
        raise ChaosError("localstripe did not start")

    async def start_proxy(self, ls_base):
        self.vendor = Vendor(self.args, ls_base, self.out, self.live, self.session)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.vendor.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        self.runner = runner
        self.vendor.spawn(self.vendor.bursts())
        base = f"http://127.0.0.1:{port}"
        log(f"fault-injecting Stripe proxy on {base} (faults {'off' if self.args.no_faults else 'on'})")
        return base

    async def migrate(self, env):
        with open(os.path.join(self.out, "migrate.log"), "w") as f:
            proc = await asyncio.create_subprocess_exec(self.args.binary, "migrate", env=env, cwd=ROOT,
                                                        stdout=f, stderr=subprocess.STDOUT)
            if await proc.wait() != 0:
                raise ChaosError("billsync migrate failed; see target/chaos/migrate.log")

    async def setup_tenant(self, i, sem):
        tenant = f"chaos-{i:03d}"
        dashboard = i % 5 == 4   # one tenant in five is created by customer success, the rest by PUT
        async with sem:
            if dashboard:
                token = await self.vendor.dashboard("POST", "/v1/tokens", {
                    "card[number]": "4242424242424242", "card[exp_month]": "12", "card[exp_year]": "2034",
                    "card[cvc]": "123"})
                customer = await self.vendor.dashboard("POST", "/v1/customers", {
                    "name": f"Tenant {tenant}", "email": f"{tenant}@chaos.test", "metadata[tenant_id]": tenant,
                    "source": token["id"]})
                cus = customer["id"]
                cid = await self.wait_customer(tenant)
                if cid != cus:
                    raise ChaosError(f"{tenant}: linked to {cid}, expected {cus}")
            else:
                status, body = await self.call("PUT", f"/v1/tenants/{tenant}",
                                               {"name": f"Tenant {tenant}", "email": f"{tenant}@chaos.test"})
                if status not in (200, 201):
                    raise ChaosError(f"PUT tenant {tenant}: {status} {body}")
                cus = await self.wait_customer(tenant)
                token = await self.vendor.dashboard("POST", "/v1/tokens", {
                    "card[number]": "4242424242424242", "card[exp_month]": "12", "card[exp_year]": "2034",
                    "card[cvc]": "123"})
                await self.vendor.dashboard("POST", f"/v1/customers/{cus}/sources", {"source": token["id"]})
            self.customers[tenant] = cus
            self.model[tenant] = {"live": False, "plan": None, "quantity": None, "cape": False}
            command = self.next_command(tenant, first=True)
            await self.run_commands(tenant, [command])
            self.tenants.append(tenant)

    async def wait_customer(self, tenant, timeout=180):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, body = await self.call("GET", f"/v1/tenants/{tenant}")
            if status == 200 and body.get("customer_id"):
                return body["customer_id"]
            await asyncio.sleep(0.5)
        raise ChaosError(f"tenant {tenant} got no Stripe customer within {timeout}s")

    # ── self-serve commands ──
    def next_command(self, tenant, first=False):
        m = self.model[tenant]
        if not m["live"]:
            return {"kind": "set", "plan": random.choice(list(PLANS)), "quantity": random.randint(1, 5)}
        options = [("set", 6)]
        options.append(("resume", 3) if m["cape"] else ("cancel_end", 2))
        if tenant not in self.hot:
            options.append(("cancel_now", 0.5))
        kind = random.choices([o for o, _ in options], [w for _, w in options])[0]
        if kind == "set":
            while True:
                plan, quantity = random.choice(list(PLANS)), random.randint(1, 5)
                if (plan, quantity) != (m["plan"], m["quantity"]):
                    return {"kind": "set", "plan": plan, "quantity": quantity}
        return {"kind": kind}

    @staticmethod
    def apply_model(m, command):
        m = dict(m)
        if command["kind"] == "set":
            if not m["live"]:
                m["cape"] = False
            m.update(live=True, plan=command["plan"], quantity=command["quantity"])
        elif command["kind"] == "cancel_end":
            m["cape"] = True
        elif command["kind"] == "resume":
            m["cape"] = False
        elif command["kind"] == "cancel_now":
            m = {"live": False, "plan": None, "quantity": None, "cape": False}
        return m

    async def submit(self, tenant, command):
        self.command_keys += 1
        key = f"chaos-{os.getpid()}-{tenant}-{self.command_keys}"
        kind = command["kind"]
        if kind == "set":
            method, path = "POST", f"/v1/tenants/{tenant}/subscription"
            body = {"price": command["plan"], "quantity": command["quantity"],
                    "proration": random.choice(["none", "create_prorations"])}
        elif kind == "cancel_end":
            method, path, body = "DELETE", f"/v1/tenants/{tenant}/subscription?at_period_end=true", None
        elif kind == "cancel_now":
            method, path, body = "DELETE", f"/v1/tenants/{tenant}/subscription?at_period_end=false", None
        else:
            method, path, body = "POST", f"/v1/tenants/{tenant}/subscription/resume", None
        status, answer = await self.call(method, path, body, headers={"Idempotency-Key": key})
        record = {"tenant": tenant, "key": key, "kind": kind, "request": command, "http": status,
                  "accepted_at": time.monotonic() - T0}
        if status != 202:
            record["status"] = "refused"
            record["answer"] = answer
            self.refusals.append(record)
            log(f"command refused: {tenant} {kind} -> {status} {json.dumps(answer)[:300]}")
            return record
        record["id"] = answer["id"]
        record["status"] = "pending"
        self.commands.append(record)
        return record

    async def wait_command(self, record, timeout=None):
        end = time.monotonic() + (timeout or self.args.converge_timeout + 120)
        while time.monotonic() < end:
            status, body = await self.call("GET", f"/v1/commands/{record['id']}")
            if status == 200 and body["status"] != "pending":
                record["status"] = body["status"]
                record["error"] = body.get("error")
                record["attempts"] = body.get("attempts")
                record["finished_at"] = time.monotonic() - T0
                record["subscription"] = body.get("subscription")
                return record
            await asyncio.sleep(random.uniform(0.3, 0.8))
        record["status"] = "pending"
        return record

    async def run_commands(self, tenant, commands):
        records = [await self.submit(tenant, c) for c in commands]
        ok = True
        for record in records:
            if record["status"] == "refused":
                ok = False
                continue
            await self.wait_command(record)
            if record["status"] == "succeeded":
                self.model[tenant] = self.apply_model(self.model[tenant], record["request"])
            else:
                ok = False
                log(f"command {record['id']} ({tenant} {record['kind']}) ended {record['status']}: {record.get('error')}")
        if not ok:
            await self.resync_model(tenant)
        return ok

    async def resync_model(self, tenant):
        subs = await self.vendor.list_direct("/v1/subscriptions", {"customer": self.customers[tenant], "status": "all"})
        sub = current_subscription(subs)
        if sub is None or liveness(sub) == 0:
            self.model[tenant] = {"live": False, "plan": None, "quantity": None, "cape": False}
        else:
            plan, quantity = sub_item(sub)
            self.model[tenant] = {"live": True, "plan": plan, "quantity": quantity,
                                  "cape": bool(sub.get("cancel_at_period_end"))}

    async def command_driver(self, tenant):
        lo, hi = self.args.command_pause
        while not self.load_done.is_set():
            await asyncio.sleep(random.uniform(lo, hi))
            if self.load_done.is_set():
                break
            first = self.next_command(tenant)
            batch = [first]
            # Sometimes queue a second command behind the first, before it ends.
            if random.random() < 0.3 and first["kind"] != "cancel_now":
                saved = self.model[tenant]
                self.model[tenant] = self.apply_model(saved, first)
                second = self.next_command(tenant)
                self.model[tenant] = saved
                if second["kind"] != "cancel_now":
                    batch.append(second)
            await self.run_commands(tenant, batch)

    # ── usage ──
    async def usage_sender(self, batches, rate_per_s, started):
        while True:
            try:
                index, events = batches.pop()
            except IndexError:
                return
            due = started + index / rate_per_s
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            stamp = now_rfc3339()
            ts_ms = parse_ms(stamp)
            for e in events:
                e["timestamp"] = stamp
                self.sent[(e["tenant_id"], e["id"])] = (e["meter"], Decimal(str(e.get("quantity", 1))), ts_ms)
            while True:
                tries = []
                status, body = await self.call("POST", "/v1/usage", {"events": events}, deadline=900, tries=tries)
                self.batches["answered"] += 1
                if len(tries) > 1:
                    self.batches["resent"] += 1
                if status == 200:
                    bad = {r["index"] for r in body.get("rejected", [])}
                    for r in body.get("rejected", []):
                        self.rejected.append({"event": events[r["index"]], "code": r.get("code"),
                                              "message": r.get("message")})
                    for i, e in enumerate(events):
                        if i not in bad:
                            self.acked.add((e["tenant_id"], e["id"]))
                    if body.get("duplicates"):
                        self.batches["with_duplicates"] += 1
                        self.batches["duplicate_events"] += body["duplicates"]
                    break
                self.harness_errors.append(f"POST /v1/usage answered {status}: {json.dumps(body)[:300]}")
                break

    def make_batches(self):
        n, size = self.args.events, self.args.batch
        batches, seq = [], 0
        tenants = self.tenants
        while seq < n:
            events = []
            for _ in range(min(size, n - seq)):
                tenant = random.choice(tenants)
                event_id = f"u{os.getpid()}-{seq:07d}"
                if random.random() < 0.6:
                    events.append({"id": event_id, "tenant_id": tenant, "meter": "api_calls",
                                   "quantity": random.randint(1, 20)})
                else:
                    events.append({"id": event_id, "tenant_id": tenant, "meter": "builds"})
                seq += 1
            batches.append((len(batches), events))
        batches.reverse()    # popped from the end: index order
        return batches

    # ── check and record against a hard limit ──
    async def limit_burst(self, tenant, at):
        await asyncio.sleep(at)
        if self.load_done.is_set():
            return
        log(f"check-and-record burst on {tenant}: {3 * EXPORTS_LIMIT} requests for a limit of {EXPORTS_LIMIT}")
        sem = asyncio.Semaphore(12)

        async def one(i):
            async with sem:
                record_id = f"x{os.getpid()}-{tenant}-{i:04d}"
                status, body = await self.call("POST", f"/v1/tenants/{tenant}/entitlements/check",
                                               {"feature": "exports", "quantity": 1, "record": {"id": record_id}})
                if status != 200:
                    self.harness_errors.append(f"check-and-record {tenant}: {status} {json.dumps(body)[:200]}")
                elif body.get("recorded"):
                    self.recorded[tenant].add(record_id)
                else:
                    self.denied[body.get("reason")] += 1

        await asyncio.gather(*(one(i) for i in range(3 * EXPORTS_LIMIT)))

    # ── customer success in the dashboard ──
    async def dashboard_changes(self):
        n = 0
        while not self.load_done.is_set():
            await asyncio.sleep(random.uniform(1, 3))
            tenant = random.choice(self.tenants)
            n += 1
            if random.random() < 0.5:
                form = {"metadata[billsync.builds]": str(random.randint(1000, 9000))}
            else:
                form = {"description": f"chaos note {n}"}
            await self.vendor.dashboard("POST", f"/v1/customers/{self.customers[tenant]}", form)
            self.vendor.stats["dashboard_changes"] += 1

    # ── the killer, and replicas that died on their own ──
    async def killer(self):
        """Every MIN-MAX seconds (from one kill to the next), SIGKILL a random replica, preferably
        while a usage batch of ours is in flight on it, and restart it on the same port."""
        lo, hi = self.args.kill_every
        next_kill = time.monotonic() + random.uniform(lo, hi)
        while not self.load_done.is_set():
            await asyncio.sleep(max(next_kill - time.monotonic(), 0.05))
            if self.load_done.is_set():
                return
            if any(not r.alive for r in self.replicas):
                continue   # one is still restarting: kill as soon as every replica is back
            # Strike while one is busy: wait (up to 2 s) for a usage batch of ours in flight, and
            # kill the replica handling it late in its handling, when the batch may be stored but
            # not yet answered. Which replica that is, is random; without one, any replica.
            busy_by = time.monotonic() + 2.0
            busy = []
            while time.monotonic() < busy_by:
                busy = [r for r in self.replicas if self.inflight_usage[r.base]]
                if busy:
                    break
                await asyncio.sleep(0.002)
            victim = random.choice(busy or self.replicas)
            if busy:
                strike = self.usage_started[victim.base] + random.uniform(0.5, 1.05) * self.usage_latency
                await asyncio.sleep(max(strike - time.monotonic(), 0))
            cut, cut_usage = self.inflight[victim.base], self.inflight_usage[victim.base]
            victim.kill()
            self.kills += 1
            self.kills_in_flight += cut > 0
            self.kills_in_usage += cut_usage > 0
            next_kill = time.monotonic() + random.uniform(lo, hi)
            log(f"kill -9 replica {victim.n} (kill #{self.kills}; {cut} harness requests in flight, "
                f"{cut_usage} of them usage batches)")
            # Clients, like a load balancer's health check, notice a while later.
            await asyncio.sleep(0.3)
            victim.alive = False
            await asyncio.sleep(random.uniform(0.2, 1.2))
            victim.start()
            asyncio.ensure_future(self.mark_ready(victim))

    async def mark_ready(self, replica):
        try:
            await replica.wait_ready(self.session)
        except ChaosError as e:
            self.harness_errors.append(str(e))

    async def monitor(self):
        while True:
            await asyncio.sleep(0.5)
            for r in self.replicas:
                if r.proc and not r.expected_down and r.proc.poll() is not None:
                    code = r.proc.returncode
                    r.alive = False
                    r.crashes.append({"exit": code, "at": round(time.monotonic() - T0, 1)})
                    log(f"replica {r.n} EXITED ON ITS OWN with {code}; restarting (see {r.log_path})")
                    r.start()
                    asyncio.ensure_future(self.mark_ready(r))

    # ── convergence ──
    async def backlog(self):
        row = (await psql(self.db, """
            select (select count(*) from commands where status = 'pending'),
                   (select count(*) from usage_events where push_id is null),
                   (select count(*) from usage_pushes where status = 'pending'),
                   (select count(*) from inbox_events where status = 'pending'),
                   (select count(*) from inbox_events where status = 'failed')"""))[0]
        return dict(zip(["commands_pending", "usage_unpushed", "pushes_pending", "inbox_pending",
                         "inbox_failed"], map(int, row)))

    async def vendor_state(self):
        customers = await self.vendor.list_direct("/v1/customers")
        subs = await self.vendor.list_direct("/v1/subscriptions", {"status": "all"})
        by_customer = defaultdict(list)
        for s in subs:
            by_customer[s["customer"]].append(s)
        return customers, by_customer

    async def mirror_differences(self, all_replicas=False):
        _, subs = await self.vendor_state()
        diffs = []
        bases = [r.base for r in self.replicas] if all_replicas else [None]
        for tenant in self.tenants:
            vendor = current_subscription(subs.get(self.customers[tenant], []))
            expected = None
            if vendor is not None:
                plan, quantity = sub_item(vendor)
                expected = {"id": vendor["id"], "status": vendor["status"], "price": plan, "quantity": quantity,
                            "cancel_at_period_end": bool(vendor.get("cancel_at_period_end"))}
            for base in bases:
                status, body = await self.call("GET", f"/v1/tenants/{tenant}", base=base)
                if status != 200:
                    diffs.append({"tenant": tenant, "replica": base, "error": f"{status} {body}"})
                    continue
                mine = body.get("subscription")
                got = None
                if mine is not None:
                    items = mine.get("items") or []
                    got = {"id": mine["id"], "status": mine["status"],
                           "price": items[0]["price"] if len(items) == 1 else [i["price"] for i in items],
                           "quantity": items[0]["quantity"] if len(items) == 1 else None,
                           "cancel_at_period_end": mine["cancel_at_period_end"]}
                if body.get("customer_id") != self.customers[tenant] or got != expected:
                    diffs.append({"tenant": tenant, "replica": base, "mirror": got, "vendor": expected,
                                  "mirror_customer": body.get("customer_id"), "vendor_customer": self.customers[tenant]})
        return diffs

    async def converge(self, load_end):
        started = load_end
        deadline = time.monotonic() + self.args.converge_timeout
        last = None
        while time.monotonic() < deadline:
            pending = [c for c in self.commands if c["status"] == "pending"]
            backlog = await self.backlog()
            if backlog != last:
                log(f"waiting: {backlog}, harness commands unfinished {len(pending)}")
                last = backlog
            if not pending and not any(backlog.values()):
                diffs = await self.mirror_differences()
                if not diffs:
                    took = round(time.monotonic() - started, 1)
                    log(f"converged {took:.1f}s after the load ended")
                    return took, backlog
                log(f"waiting: {len(diffs)} tenants' mirror differs from the vendor")
            await asyncio.sleep(1)
        log(f"NOT converged after {self.args.converge_timeout}s: {last}")
        return None, last

    # ── checks ──
    async def checks(self, converged, backlog):
        results = []

        def check(name, ok, detail, **extra):
            results.append({"check": name, "ok": bool(ok), "detail": detail, **extra})
            log(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

        rows = await psql(self.db, "select tenant_id, event_id, meter, quantity, occurred_at, coalesce(push_id, '') from usage_events")
        stored = Counter((t, e) for t, e, *_ in rows)
        events = {(t, e): (m, Decimal(q), int(at), p) for t, e, m, q, at, p in rows}
        tenants_db = dict((t, c) for t, c in await psql(self.db, "select tenant_id, coalesce(customer_id, '') from tenants"))

        # 1. Every acknowledged usage event is stored exactly once (check-and-record included).
        acknowledged = set(self.acked) | {(t, i) for t, ids in self.recorded.items() for i in ids}
        lost = sorted(k for k in acknowledged if k not in stored)
        doubled = sorted(k for k, n in stored.items() if n > 1)
        unsent = sorted(k for k in stored if k not in self.sent and not k[1].startswith("x"))
        unacked_stored = sorted(k for k in stored if k in self.sent and k not in self.acked)
        check("1 acknowledged usage stored once", not lost and not doubled and not unsent and not self.rejected,
              f"{len(acknowledged)} acknowledged ({len(self.acked)} by POST /v1/usage, "
              f"{len(acknowledged) - len(self.acked)} by check-and-record), {len(stored)} stored, lost {len(lost)}, duplicated {len(doubled)}, "
              f"stored-but-never-sent {len(unsent)}, rejected {len(self.rejected)}, "
              f"stored though unacknowledged {len(unacked_stored)}",
              lost=len(lost), duplicated=len(doubled), samples={"lost": lost[:10], "duplicated": doubled[:10],
                                                                 "rejected": self.rejected[:5]})

        # 2. Pushed identifiers unique and summing to the accepted usage.
        accepted = defaultdict(Decimal)     # (tenant, meter) -> what billsync accepted
        counts = Counter()
        for (t, _), (m, q, _, _) in events.items():
            accepted[(t, m)] += q if METERS.get(m) == "sum" else 1
            counts[(t, m)] += 1
        customer_tenant = {c: t for t, c in tenants_db.items() if c}
        pushed = defaultdict(Decimal)
        foreign = []
        for ev in self.vendor.meter_events.values():
            t = customer_tenant.get(ev["customer"])
            if t is None:
                foreign.append(ev["identifier"])
                continue
            pushed[(t, ev["event_name"])] += ev["value"]
        mismatched = []
        for k in sorted(set(accepted) | set(pushed)):
            if accepted.get(k, Decimal(0)) != pushed.get(k, Decimal(0)):
                mismatched.append({"tenant": k[0], "meter": k[1], "accepted": fmt(accepted.get(k, 0)),
                                   "pushed": fmt(pushed.get(k, 0))})
        ledger = {p: (s, Decimal(v), int(n), t, m) for p, s, v, n, t, m in
                  await psql(self.db, "select push_id, status, value, event_count, tenant_id, meter from usage_pushes")}
        ledger_status = Counter(s for s, *_ in ledger.values())
        sent_not_at_vendor = [p for p, (s, *_) in ledger.items() if s == "sent" and p not in self.vendor.meter_events]
        at_vendor_not_sent = [i for i in self.vendor.meter_events if ledger.get(i, ("?",))[0] != "sent"]
        value_differs = [i for i, ev in self.vendor.meter_events.items() if i in ledger and ledger[i][1] != ev["value"]]
        # Events counted by more than one accepted push, or by none.
        carried = Counter()
        for i in self.vendor.meter_events:
            if i in ledger:
                carried[(ledger[i][3], ledger[i][4])] += ledger[i][2]
        over = sum(max(carried[k] - counts[k], 0) for k in set(carried) | set(counts))
        under = sum(max(counts[k] - carried[k], 0) for k in set(carried) | set(counts))
        over_units = sum(max(pushed.get(k, 0) - accepted.get(k, 0), 0) for k in set(accepted) | set(pushed))
        under_units = sum(max(accepted.get(k, 0) - pushed.get(k, 0), 0) for k in set(accepted) | set(pushed))
        total_accepted = sum(accepted.values())
        total_pushed = sum(pushed.values())
        ok2 = (not mismatched and not foreign and not sent_not_at_vendor and not at_vendor_not_sent
               and not value_differs and ledger_status.get("rejected", 0) == 0 and ledger_status.get("expired", 0) == 0)
        unsettled = "" if converged is not None else "(not converged: compared while pushes were still pending) "
        check("2 pushed identifiers unique, summing to accepted usage", ok2,
              f"{unsettled}{len(self.vendor.meter_events)} identifiers accepted by the vendor (unique), "
              f"{sum(self.vendor.meter_attempts.values())} attempts, {self.vendor.meter_duplicate_refusals} refused as "
              f"existing; accepted {fmt(total_accepted)} vs pushed {fmt(total_pushed)} over {len(accepted)} tenant-meters, "
              f"{len(mismatched)} differ (over by {fmt(over_units)}, under by {fmt(under_units)}); events pushed twice {over}, "
              f"never pushed {under}; ledger {dict(ledger_status)}; sent-but-not-at-vendor {len(sent_not_at_vendor)}, "
              f"at-vendor-but-not-sent {len(at_vendor_not_sent)}, value differs {len(value_differs)}, "
              f"unknown customers {len(foreign)}",
              samples={"mismatched": mismatched[:10], "sent_not_at_vendor": sent_not_at_vendor[:5],
                       "at_vendor_not_sent": at_vendor_not_sent[:5], "value_differs": value_differs[:5]},
              events_pushed_twice=over, events_never_pushed=under)

        # 3. Every command applied at the vendor exactly once.
        db_commands = await psql(self.db, "select command_id, tenant_id, kind, status, coalesce(client_key, ''), coalesce(error_code, '') from commands")
        writes_by_key = defaultdict(list)
        for w in self.vendor.writes:
            writes_by_key[w["key"]].append(w)
        problems = []
        by_client_key = Counter(k for _, _, _, _, k, _ in db_commands if k)
        for cid, tenant, kind, status, client_key, code in db_commands:
            ws = writes_by_key.get(f"billsync-{cid}", [])
            ok_writes = [w for w in ws if 200 <= w["status"] < 300]
            if status != "succeeded" or len(ok_writes) != 1 or len(ws) != 1:
                problems.append({"command": cid, "tenant": tenant, "kind": kind, "status": status, "error": code,
                                 "writes_at_vendor": len(ws), "successful_writes": len(ok_writes),
                                 "client_key": client_key})
        harness_keys = {c["key"] for c in self.commands}
        missing = [c for c in self.commands if by_client_key.get(c["key"], 0) != 1]
        unkeyed = [w for w in self.vendor.writes if not w["key"]]
        strange = [w for w in self.vendor.writes if w["key"] and not (w["key"].startswith("billsync-") or w["key"].startswith("bsu_"))]
        known_ids = {f"billsync-{cid}" for cid, *_ in db_commands}
        orphan = [w for w in self.vendor.writes if w["key"] and w["key"].startswith("billsync-") and w["key"] not in known_ids]
        customers, subs = await self.vendor_state()
        per_tenant = Counter((c.get("metadata") or {}).get("tenant_id") for c in customers)
        tenant_problems = []
        for tenant in self.tenants:
            cus = self.customers[tenant]
            live = [s for s in subs.get(cus, []) if liveness(s) > 0]
            sub = current_subscription(subs.get(cus, []))
            m = self.model[tenant]
            vendor_model = {"live": False, "plan": None, "quantity": None, "cape": False}
            if sub is not None and liveness(sub) > 0:
                plan, quantity = sub_item(sub)
                vendor_model = {"live": True, "plan": plan, "quantity": quantity,
                                "cape": bool(sub.get("cancel_at_period_end"))}
            if per_tenant.get(tenant, 0) != 1 or len(live) > 1 or vendor_model != m:
                tenant_problems.append({"tenant": tenant, "customers": per_tenant.get(tenant, 0),
                                        "live_subscriptions": len(live), "vendor": vendor_model, "expected": m})
        statuses = Counter(c["status"] for c in self.commands)
        max_forwards = max(self.vendor.forwards.values(), default=0)
        ok3 = (not problems and not missing and not unkeyed and not strange and not orphan and not tenant_problems
               and not self.refusals and max_forwards <= 1)
        check("3 every command applied at the vendor exactly once", ok3,
              f"{len(db_commands)} commands in the outbox ({len(self.commands)} self-serve from the harness: "
              f"{dict(statuses)}; {len(self.refusals)} refused at the door); {len(problems)} not applied exactly once "
              f"or not succeeded; most writes reaching the vendor under one key {max_forwards}; writes without a key "
              f"{len(unkeyed)}, with a foreign key {len(strange)}, for unknown commands {len(orphan)}; "
              f"{len(tenant_problems)} tenants whose vendor state is not one customer, at most one live subscription "
              f"and the state their commands asked for; {self.vendor.stats['idempotent_replays']} idempotent replays",
              samples={"commands": problems[:10], "tenants": tenant_problems[:10], "refused": self.refusals[:5],
                       "unkeyed": unkeyed[:5], "orphan": orphan[:5],
                       "harness_keys_not_stored_once": [c["key"] for c in missing[:5]]},
              commands=len(db_commands))

        # 4. The mirror equals the vendor (asked on every replica).
        diffs = await self.mirror_differences(all_replicas=True)
        check("4 mirror equals the vendor", not diffs,
              f"{len(self.tenants)} tenants x {len(self.replicas)} replicas compared, {len(diffs)} differ",
              samples={"differences": diffs[:10]})

        # 5. Entitlement answers equal on every replica, and right.
        cust_meta = {c["id"]: (c.get("metadata") or {}) for c in customers}
        by_tenant = defaultdict(dict)
        for k, v in events.items():
            by_tenant[k[0]][k] = v
        unequal, wrong = [], []
        for tenant in self.tenants:
            answers = []
            for r in self.replicas:
                status, body = await self.call("GET", f"/v1/tenants/{tenant}/entitlements", base=r.base)
                answers.append((r.n, status, body))
            comparable = [(n, s, {k: v for k, v in (b or {}).items() if k not in ("as_of", "stale")}
                           if isinstance(b, dict) else b) for n, s, b in answers]
            first = comparable[0]
            if any((s, b) != (first[1], first[2]) for _, s, b in comparable[1:]):
                unequal.append({"tenant": tenant, "answers": {f"replica-{n}": b for n, _, b in comparable}})
            cus = self.customers[tenant]
            sub = current_subscription(subs.get(cus, []))
            granting = sub is not None and sub.get("status") in ("active", "trialing")
            plan = sub_item(sub)[0] if granting else "free"
            expected_features = dict(PLAN_FEATURES.get(plan, {}))
            override = cust_meta.get(cus, {}).get("billsync.builds")
            if override is not None:
                expected_features["builds"] = int(override)
            for n, status, body in answers:
                issues = []
                if status != 200:
                    issues.append(f"answered {status}")
                else:
                    if body.get("plan") != plan:
                        issues.append(f"plan {body.get('plan')} (vendor: {plan})")
                    features = body.get("features") or {}
                    for name, limit in expected_features.items():
                        got = features.get(name)
                        if name == "sso":
                            if not (got and got.get("enabled")):
                                issues.append("sso not enabled")
                            continue
                        if got is None or got.get("kind") != "quota":
                            issues.append(f"{name} missing")
                            continue
                        if got.get("limit") != limit:
                            issues.append(f"{name} limit {got.get('limit')} (expected {limit})")
                        ps, pe = parse_ms(got.get("period_start")), parse_ms(got.get("period_end"))
                        if granting and ps != sub.get("current_period_start", 0) * 1000:
                            issues.append(f"{name} period_start {got.get('period_start')} (vendor: {sub.get('current_period_start')})")
                        meter = got.get("meter")
                        # billsync counts quotas in hourly buckets: the hours from the one the
                        # period starts in, up to the period's end.
                        used = Decimal(0)
                        first_hour = ps - ps % 3_600_000
                        for (t, _), (m, q, at, _) in by_tenant.get(tenant, {}).items():
                            if m == meter and first_hour <= at - at % 3_600_000 < pe:
                                used += q if METERS.get(m) == "sum" else 1
                        if Decimal(got.get("used") or "0") != used:
                            issues.append(f"{name} used {got.get('used')} (stored in period: {fmt(used)})")
                if issues:
                    wrong.append({"tenant": tenant, "replica": n, "issues": issues})
        check("5 entitlement answers equal on every replica, and right", not unequal and not wrong,
              f"{len(self.tenants)} tenants asked on {len(self.replicas)} replicas: {len(unequal)} tenants answered "
              f"differently, {len(wrong)} answers differing from the vendor's plan or the stored usage",
              samples={"unequal": unequal[:5], "wrong": wrong[:10]})

        # 6. Check and record never grants more than the hard limit.
        over_limit = []
        for tenant in self.hot:
            in_db = {e for (t, e) in stored if t == tenant and events[(t, e)][0] == "exports"}
            if len(in_db) > EXPORTS_LIMIT or in_db != self.recorded[tenant]:
                over_limit.append({"tenant": tenant, "stored": len(in_db), "answered_recorded": len(self.recorded[tenant]),
                                   "limit": EXPORTS_LIMIT})
        check("6 check-and-record holds the hard limit across replicas", not over_limit,
              f"{len(self.hot)} tenants x {3 * EXPORTS_LIMIT} racing check-and-record calls for a limit of "
              f"{EXPORTS_LIMIT}: recorded {[len(self.recorded[t]) for t in self.hot]}; denied {dict(self.denied)}",
              samples={"over": over_limit})

        # 7. The system converged, and no replica died or panicked on its own.
        crashes = {f"replica-{r.n}": r.crashes for r in self.replicas if r.crashes}
        panics = {}
        for r in self.replicas:
            with open(r.log_path, errors="replace") as f:
                n = sum(1 for line in f if "panicked" in line)
            if n:
                panics[f"replica-{r.n}"] = n
        check("7 converged; no replica crashed or panicked", converged is not None and not crashes and not panics
              and not self.harness_errors,
              f"converged {'in %.1fs' % converged if converged is not None else 'NOT within %ds' % self.args.converge_timeout}"
              f" (last backlog {backlog}); crashes {crashes or 0}; panics {panics or 0}; "
              f"harness errors {len(self.harness_errors)}",
              samples={"harness_errors": self.harness_errors[:10]})
        return results, {"lost": len(lost), "duplicated": len(doubled), "events_pushed_twice": over,
                         "events_never_pushed": under, "commands": len(db_commands)}

    # ── the whole run ──
    async def run(self):
        a = self.args
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200))
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        try:
            await self.start_postgres_db()
            ls = await self.start_localstripe()
            proxy = await self.start_proxy(ls)
            catalog = os.path.join(self.out, "catalog.toml")
            with open(catalog, "w") as f:
                f.write(CATALOG)
            env = self.replica_env(proxy, catalog)
            await self.migrate(env)
            self.replicas = [Replica(n, a.binary, env, self.out) for n in range(1, a.replicas + 1)]
            for r in self.replicas:
                r.start()
            await asyncio.gather(*(r.wait_ready(self.session) for r in self.replicas))
            log(f"{len(self.replicas)} replicas ready: {', '.join(r.base for r in self.replicas)}")
            monitor = asyncio.ensure_future(self.monitor())

            for plan, amount in PLANS.items():
                await self.vendor.dashboard("POST", "/v1/plans", {
                    "id": plan, "amount": str(amount), "currency": "eur", "interval": "month",
                    "product[name]": plan})
            hot_count = min(a.hot_tenants, a.tenants)
            self.hot = [f"chaos-{i:03d}" for i in range(hot_count)]
            sem = asyncio.Semaphore(8)
            t = time.monotonic()
            await asyncio.gather(*(self.setup_tenant(i, sem) for i in range(a.tenants)))
            self.tenants.sort()
            self.timeline["setup_s"] = round(time.monotonic() - t, 1)
            log(f"{len(self.tenants)} tenants set up (customer, card, subscription) in {self.timeline['setup_s']}s")

            # The load.
            load_started = time.monotonic()
            batches = self.make_batches()
            rate = len(batches) / a.duration
            log(f"load: {a.events} usage events in {len(batches)} batches over ~{a.duration}s, commands, dashboard "
                f"changes, {hot_count} check-and-record bursts; killing a replica every {a.kill_every[0]}-{a.kill_every[1]}s"
                if not a.no_kills else "load without kills")
            senders = [asyncio.ensure_future(self.usage_sender(batches, rate, load_started)) for _ in range(a.senders)]
            drivers = [asyncio.ensure_future(self.command_driver(t)) for t in self.tenants]
            extras = [asyncio.ensure_future(self.dashboard_changes())]
            bursts = [asyncio.ensure_future(self.limit_burst(t, random.uniform(0.15, 0.6) * a.duration)) for t in self.hot]
            killer = asyncio.ensure_future(self.killer()) if not a.no_kills and a.replicas > 0 else None
            progress = asyncio.ensure_future(self.progress())
            await asyncio.gather(*senders, *bursts)
            self.load_done.set()
            await asyncio.gather(*extras)
            if killer:
                await killer
            progress.cancel()
            load_end = time.monotonic()
            self.timeline["load_s"] = round(load_end - load_started, 1)
            log(f"load done in {self.timeline['load_s']}s: {len(self.sent)} events sent, {len(self.acked)} "
                f"acknowledged, {self.kills} kills; waiting for the commands in flight and convergence")
            for r in self.replicas:
                if not r.alive:
                    await r.wait_ready(self.session)
            # Counted from the end of the load: the commands still in flight and the replica
            # restarted last are part of converging.
            converged, backlog = await self.converge(load_end)
            for d in drivers:
                if d.done() and not d.cancelled() and d.exception() is not None:
                    self.harness_errors.append(f"command driver: {d.exception()!r}")
                d.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)
            results, figures = await self.checks(converged, backlog)
            monitor.cancel()
            return self.report(results, figures, converged, time.monotonic() - started)
        finally:
            await self.teardown()

    async def progress(self):
        while True:
            await asyncio.sleep(10)
            done = sum(1 for c in self.commands if c["status"] != "pending")
            log(f"progress: {len(self.acked)}/{self.args.events} usage acknowledged, {self.kills} kills, commands "
                f"{done}/{len(self.commands)} ended, vendor requests {self.vendor.stats['requests']}, webhooks "
                f"{self.vendor.stats['webhook_deliveries']} delivered")

    def report(self, results, figures, converged, elapsed):
        a = self.args
        v = self.vendor.stats
        ok = all(r["ok"] for r in results)
        fig = {
            "events sent": len(self.sent),
            "events acknowledged (POST /v1/usage)": len(self.acked),
            "check-and-record recorded": sum(len(s) for s in self.recorded.values()),
            "kills": self.kills,
            "kills that cut a request in flight": self.kills_in_flight,
            "kills that cut a usage batch": self.kills_in_usage,
            "usage batches resent": self.batches["resent"],
            "resent events answered as duplicates": self.batches["duplicate_events"],
            "lost": figures["lost"],
            "duplicated": figures["duplicated"],
            "events pushed twice to the vendor": figures["events_pushed_twice"],
            "events never pushed": figures["events_never_pushed"],
            "commands (outbox)": figures["commands"],
            "self-serve commands (harness)": len(self.commands),
            "time to converge (s)": converged if converged is not None else "did not converge",
        }
        print()
        print("=" * 100)
        binary = os.path.relpath(a.binary, ROOT) if a.binary.startswith(ROOT + os.sep) else a.binary
        print(f"billsync chaos run: {a.replicas} replicas, {a.tenants} tenants, {a.events} events, seed {a.seed}, "
              f"{'short' if a.short else 'full'}, binary {binary}")
        print("-" * 100)
        print(f"{'check':<58} {'result':<6}")
        for r in results:
            print(f"{r['check']:<58} {'PASS' if r['ok'] else 'FAIL':<6}")
            print(f"    {r['detail']}")
            if not r["ok"]:
                for name, sample in (r.get("samples") or {}).items():
                    for item in (sample or [])[:3]:
                        print(f"      e.g. {name}: {json.dumps(item, default=str)[:400]}")
        print("-" * 100)
        for k, val in fig.items():
            print(f"{k:<40} {val}")
        print("-" * 100)
        print(f"vendor: {v['requests']} requests, {v['answered_5xx_before'] + v['answered_5xx_after']} answered 5xx "
              f"({v['answered_5xx_after']} after the write), {v['answered_429']} answered 429 in {v['bursts_429']} "
              f"bursts, {v['slow']} slow; {v['idempotent_replays']} idempotent replays, "
              f"{v['idempotency_in_flight_409']} key-in-use 409s")
        print(f"webhooks: {v['events']} events, {v['webhook_deliveries']} deliveries ({v['webhooks_duplicated']} "
              f"duplicated, {v['webhooks_dropped']} dropped, {v['webhook_retries']} retried, "
              f"{v['webhooks_refused_4xx']} refused, {v['webhooks_undelivered']} undelivered)")
        print(f"harness: {self.api_stats.get('retried_connection', 0)} calls retried after a connection error, "
              f"{sum(n for k, n in self.api_stats.items() if k.startswith('retried_') and k != 'retried_connection')} "
              f"after a 5xx/429; {self.batches['duplicate_events']} usage events answered as duplicates on resend")
        print(f"timeline: setup {self.timeline.get('setup_s')}s, load {self.timeline.get('load_s')}s, whole run "
              f"{elapsed:.0f}s; logs in {os.path.relpath(self.out, ROOT)}/")
        print(f"RESULT: {'PASS' if ok else 'FAIL'}")
        print("=" * 100)
        summary = {
            "ok": ok,
            "params": {k: v for k, v in vars(a).items()},
            "figures": fig,
            "checks": results,
            "vendor": dict(v),
            "harness": dict(self.api_stats),
            "timeline": dict(self.timeline, whole_run_s=round(elapsed, 1)),
            "replicas": [{"n": r.n, "port": r.port, "starts": r.starts, "crashes": r.crashes,
                          "log": os.path.relpath(r.log_path, ROOT)} for r in self.replicas],
            "database": self.db_name,
        }
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        return 0 if ok else 1

    async def teardown(self):
        for r in self.replicas:
            try:
                code = r.stop()
                if code not in (0, None):
                    log(f"replica {r.n} stopped with {code}")
            except Exception as e:   # keep tearing down
                log(f"stopping replica {r.n}: {e}")
        if getattr(self, "runner", None):
            await self.runner.cleanup()
        if self.vendor:
            for task in list(self.vendor.tasks):
                task.cancel()
            self.vendor.log.close()
        if self.ls_proc and self.ls_proc.poll() is None:
            self.ls_proc.terminate()
            try:
                self.ls_proc.wait(5)
            except subprocess.TimeoutExpired:
                self.ls_proc.kill()
        if self.session:
            await self.session.close()
        if self.db:
            if self.args.keep:
                log(f"database kept: {self.db}")
            else:
                try:
                    await psql(self.admin, f"drop database if exists {self.db_name} with (force)")
                except ChaosError as e:
                    log(f"could not drop {self.db_name}: {e}")


def parse_range(text):
    if "-" in text:
        lo, hi = text.split("-", 1)
        return float(lo), float(hi)
    return float(text), float(text)


def main():
    p = argparse.ArgumentParser(description="billsync chaos run (see docs/chaos.md)")
    p.add_argument("--short", action="store_true", help="the CI form: fewer events and tenants, a shorter load")
    p.add_argument("--binary", default=os.path.join(ROOT, "target", "debug", "billsync"))
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--events", type=int, help="usage events (default 200000; 20000 with --short)")
    p.add_argument("--tenants", type=int, help="tenants (default 50; 20 with --short)")
    p.add_argument("--duration", type=float, help="seconds the usage load is spread over (default 150; 50 with --short)")
    p.add_argument("--batch", type=int, default=500, help="usage events per POST /v1/usage")
    p.add_argument("--senders", type=int, default=4, help="concurrent usage senders")
    p.add_argument("--hot-tenants", type=int, help="tenants that get a check-and-record burst (default 5; 3 with --short)")
    p.add_argument("--kill-every", default="2-5", help="seconds between kills, MIN-MAX (default 2-5)")
    p.add_argument("--no-kills", action="store_true", help="never kill a replica")
    p.add_argument("--no-faults", action="store_true", help="a well-behaved vendor: no 5xx, 429 or slow answers")
    p.add_argument("--fault-rate", type=float, default=0.2, help="share of vendor requests answered 5xx (default 0.2)")
    p.add_argument("--slow-rate", type=float, default=0.1, help="share of vendor answers delayed 0.5-3 s (default 0.1)")
    p.add_argument("--drop-rate", type=float, default=0.1, help="share of webhooks never delivered (default 0.1)")
    p.add_argument("--dup-rate", type=float, default=0.2, help="share of webhooks delivered twice (default 0.2)")
    p.add_argument("--shuffle-window", type=float, default=1.0, help="webhooks are delayed 0..this many seconds, which reorders them")
    p.add_argument("--command-pause", default=None, help="seconds between a tenant's command rounds, MIN-MAX")
    p.add_argument("--converge-timeout", type=float, help="seconds to wait for convergence (default 600; 180 with --short)")
    p.add_argument("--database-url", default=os.environ.get("BILLSYNC_CHAOS_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"),
                   help="PostgreSQL admin URL; a database is created for the run and dropped after it")
    p.add_argument("--keep", action="store_true", help="keep the run's database")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default="info", help="billsync's log.level for the replicas")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "target", "chaos"))
    a = p.parse_args()
    short = a.short
    a.events = a.events if a.events is not None else (20_000 if short else 200_000)
    a.tenants = a.tenants if a.tenants is not None else (20 if short else 50)
    a.duration = a.duration if a.duration is not None else (50.0 if short else 150.0)
    a.hot_tenants = a.hot_tenants if a.hot_tenants is not None else (3 if short else 5)
    a.converge_timeout = a.converge_timeout if a.converge_timeout is not None else (180.0 if short else 600.0)
    a.command_pause = parse_range(a.command_pause or ("1-4" if short else "2-6"))
    a.kill_every = parse_range(a.kill_every)
    if a.kill_every[0] <= 0:
        a.no_kills = True
    if a.no_faults:
        a.fault_rate = a.slow_rate = 0.0
    a.seed = a.seed if a.seed is not None else random.randrange(1_000_000)
    a.binary = os.path.abspath(a.binary)
    a.out_dir = os.path.abspath(a.out_dir)
    if a.replicas < 1 or a.tenants < 1 or a.events < 0:
        p.error("--replicas and --tenants must be at least 1")
    random.seed(a.seed)
    if not os.access(a.binary, os.X_OK):
        print(f"chaos: no billsync binary at {a.binary} (run scripts/chaos, which builds it)", file=sys.stderr)
        return 2
    if not shutil.which("psql"):
        print("chaos: psql is needed (PostgreSQL client)", file=sys.stderr)
        return 2
    os.makedirs(a.out_dir, exist_ok=True)
    for name in os.listdir(a.out_dir):
        if re.match(r"^(replica-\d+\.log|proxy\.log|localstripe\.log|migrate\.log|harness\.log|summary\.json)$", name):
            os.remove(os.path.join(a.out_dir, name))
    global LOG_FILE
    LOG_FILE = open(os.path.join(a.out_dir, "harness.log"), "w")
    log(f"chaos run: seed {a.seed}, {a.replicas} replicas, {a.tenants} tenants, {a.events} events over ~{a.duration:.0f}s, "
        f"faults {'off' if a.no_faults else f'{a.fault_rate:.0%} 5xx + 429 bursts + {a.slow_rate:.0%} slow'}, "
        f"webhooks {a.drop_rate:.0%} dropped / {a.dup_rate:.0%} duplicated, kills {'off' if a.no_kills else a.kill_every}")
    chaos = Chaos(a)
    try:
        return asyncio.run(chaos.run())
    except ChaosError as e:
        log(f"chaos: the run could not be carried out: {e}")
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("chaos: interrupted")
        return 130
    except Exception:
        log("chaos: harness error:\n" + traceback.format_exc())
        return 2


if __name__ == "__main__":
    sys.exit(main())
