//! The docs against the code. README.md and docs/*.md may name only the configuration keys
//! config/default.toml defines, environment variables that stand for them, routes the server
//! serves (its route table, which `openapi.rs` keeps equal to openapi.yaml), and pages and
//! headings that exist; a configuration table gives each key its real variable and default, and
//! the README's lists every key. No database: plain `#[test]`s.
//!
//! What counts as naming something, so that prose stays free to say anything else:
//! - a configuration key: an inline code span `section.key` (also `section.key = value` and
//!   `section.*`) whose first part is a section of config/default.toml;
//! - an environment variable: any `BILLSYNC_…` word, in prose or in code blocks;
//! - a route: an inline code span `METHOD /path` (methods may be joined with `|`, `[…]` marks an
//!   optional part, a query after `?` is ignored), a code span that is a bare billsync path
//!   (`/v1/…`, `/webhooks/…`, the probes), or a `curl` command in a code block aimed at the
//!   default listen address or `$BASE`. A `{placeholder}` matches any segment, and a path that
//!   abbreviates with `...` is skipped;
//! - a link: `[text](target)` to a relative file, with an optional `#heading`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Stripe's and localstripe's own endpoints, which the docs name when they say what billsync
/// calls or how a fake is set up: not billsync's routes, and not to be reported as missing.
const VENDOR_ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/events"),
    ("GET", "/v1/billing/meters"),
    ("GET", "/v1/billing/meters/{id}/event_summaries"),
    ("POST", "/v1/billing/meter_events"),
    ("POST", "/v1/customers"),
    ("POST", "/v1/customers/{id}"),
    ("POST", "/v1/subscriptions"),
    ("POST", "/v1/subscriptions/{id}"),
    ("DELETE", "/v1/subscriptions/{id}"),
    ("POST", "/v1/invoices/create_preview"),
    ("POST", "/v1/invoices"),
    ("POST", "/v1/invoiceitems"),
    ("POST", "/v1/invoices/{id}/finalize"),
    ("POST", "/v1/invoices/{id}/pay"),
    ("POST", "/v1/billing/credit_grants"),
    ("GET", "/v1/billing/credit_balance_transactions"),
    ("GET", "/v1/entitlements/active_entitlements"),
    ("POST", "/_config/webhooks/{name}"),
];

/// Code spans that read like configuration keys but are something else: fields of the
/// `GET /v1/sync/status` answer whose first part is also a configuration section.
const NOT_CONFIG_KEYS: &[&str] = &["outbox.pending"];

/// Environment variables billsync's tools read that are not configuration keys.
const OTHER_VARIABLES: &[&str] = &[
    "BILLSYNC_CONFIG",
    "BILLSYNC_TEST_DATABASE_URL",
    "BILLSYNC_TEST_VENV",
    "BILLSYNC_TEST_CHROMEDRIVER",
    "BILLSYNC_BENCH_DATABASE_URL",
    "BILLSYNC_BENCH_BACKEND",
    "BILLSYNC_BENCH_PERF",
    "BILLSYNC_BENCH_BIN",
    "BILLSYNC_BENCH_EVENTS",
    "BILLSYNC_BENCH_RUNS",
    "BILLSYNC_BENCH_CONNECTIONS",
    "BILLSYNC_BENCH_SOAK_MINUTES",
    "BILLSYNC_BENCH_SOAK_RATE",
    "BILLSYNC_CHAOS_DATABASE_URL",
];

const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the docs may name.
struct Known {
    /// `config/default.toml`, parsed.
    config: toml::Table,
    keys: BTreeSet<String>,
    sections: BTreeSet<String>,
    /// `(method, path template)`: the route table and the vendor's endpoints.
    routes: Vec<(String, String)>,
    /// The default `listen` address, where the docs' curl commands point.
    listen: String,
}

fn known() -> Known {
    let text = std::fs::read_to_string(root().join("config/default.toml")).unwrap();
    let config: toml::Table = toml::from_str(&text).expect("config/default.toml is TOML");
    let (mut keys, mut sections) = (BTreeSet::new(), BTreeSet::new());
    for (name, value) in &config {
        match value.as_table() {
            Some(table) => {
                sections.insert(name.clone());
                keys.extend(table.keys().map(|key| format!("{name}.{key}")));
            }
            None => {
                keys.insert(name.clone());
            }
        }
    }
    let mut routes: Vec<(String, String)> = billsync::api::route_list()
        .into_iter()
        .map(|(method, path)| (method.to_string(), path.to_owned()))
        .collect();
    routes.extend(
        VENDOR_ROUTES
            .iter()
            .map(|(method, path)| (method.to_string(), path.to_string())),
    );
    let listen = config["listen"].as_str().expect("listen").to_owned();
    Known {
        config,
        keys,
        sections,
        routes,
        listen,
    }
}

/// README.md and every docs/*.md, as (path relative to the root, text).
fn documents() -> Vec<(PathBuf, String)> {
    let mut paths = vec![PathBuf::from("README.md")];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .map(|path| Path::new("docs").join(path.file_name().unwrap()))
        .collect();
    pages.sort();
    paths.extend(pages);
    paths
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(root().join(&path)).unwrap();
            (path, text)
        })
        .collect()
}

/// A document cut into prose paragraphs (first line number, lines joined) and code lines.
struct Parsed {
    paragraphs: Vec<(usize, String)>,
    code: Vec<(usize, String)>,
}

fn parse(text: &str) -> Parsed {
    let (mut paragraphs, mut code) = (Vec::new(), Vec::new());
    let mut fenced = false;
    let mut paragraph: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fenced = !fenced;
            paragraphs.extend(paragraph.take());
            continue;
        }
        if fenced {
            code.push((number, line.to_owned()));
        } else if line.trim().is_empty() {
            paragraphs.extend(paragraph.take());
        } else {
            match &mut paragraph {
                Some((_, joined)) => {
                    joined.push(' ');
                    joined.push_str(line);
                }
                None => paragraph = Some((number, line.to_owned())),
            }
        }
    }
    paragraphs.extend(paragraph);
    Parsed { paragraphs, code }
}

/// The inline code spans of a paragraph, and its text outside them.
fn spans(paragraph: &str) -> (Vec<&str>, String) {
    let (mut inside, mut outside) = (Vec::new(), String::new());
    for (i, part) in paragraph.split('`').enumerate() {
        if i % 2 == 1 {
            inside.push(part);
        } else {
            outside.push_str(part);
            outside.push(' ');
        }
    }
    (inside, outside)
}

/// Whether `path` (from the docs) is an instance of `template` (from the route table).
fn path_matches(template: &str, path: &str) -> bool {
    let (template, path): (Vec<_>, Vec<_>) = (
        template.trim_matches('/').split('/').collect(),
        path.trim_matches('/').split('/').collect(),
    );
    template.len() == path.len()
        && template.iter().zip(&path).all(|(t, p)| {
            if t.starts_with('{') {
                !p.is_empty()
            } else {
                !p.starts_with('{') && t == p
            }
        })
}

/// A documented path with its optional `[...]` parts taken and left out, query dropped.
fn variants(path: &str) -> Vec<String> {
    let path = path.split('?').next().unwrap_or_default();
    match (path.find('['), path.find(']')) {
        (Some(open), Some(close)) if open < close => {
            let (before, optional, after) =
                (&path[..open], &path[open + 1..close], &path[close + 1..]);
            let mut all = variants(&format!("{before}{after}"));
            all.extend(variants(&format!("{before}{optional}{after}")));
            all
        }
        _ => vec![path.trim_end_matches(['.', ',', ';', ':', ')']).to_owned()],
    }
}

impl Known {
    fn has_route(&self, method: Option<&str>, path: &str) -> bool {
        self.routes.iter().any(|(m, template)| {
            method.is_none_or(|method| m == method) && path_matches(template, path)
        })
    }

    /// The route a code span names, if it names one, and whether it exists.
    fn check_span_route(&self, span: &str, problems: &mut Vec<String>, at: &str) {
        let span = span.trim();
        let (methods, path) = match span.split_once(' ') {
            Some((methods, path))
                if methods.split('|').all(|m| METHODS.contains(&m)) && path.starts_with('/') =>
            {
                (methods.split('|').map(Some).collect::<Vec<_>>(), path)
            }
            _ if span.starts_with("/v1/")
                || span.starts_with("/webhooks/")
                || ["/healthz", "/readyz", "/metrics"].contains(&span) =>
            {
                (vec![None], span)
            }
            _ => return,
        };
        let path = path.split_whitespace().next().unwrap_or_default();
        // `/v1/...`, `/v1/`: an abbreviation or a prefix, not a route.
        if path.contains("...") || path.contains('…') || path.ends_with('/') {
            return;
        }
        for method in methods {
            for variant in variants(path) {
                if !self.has_route(method, &variant) {
                    let method = method.unwrap_or("(any method)");
                    problems.push(format!(
                        "{at}: route `{method} {variant}` is not in the route table (src/api/mod.rs)"
                    ));
                }
            }
        }
    }

    /// The configuration key a code span names, if it names one, and whether it exists.
    fn check_span_key(&self, span: &str, problems: &mut Vec<String>, at: &str) {
        let key = span.split('=').next().unwrap_or_default().trim();
        let Some((section, name)) = key.split_once('.') else {
            return;
        };
        let word = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        let file = [
            "rs", "toml", "md", "yaml", "yml", "py", "json", "sql", "sh", "dict", "lock",
        ];
        if !self.sections.contains(section)
            || !(word(name) || name == "*")
            || file.contains(&name)
            || NOT_CONFIG_KEYS.contains(&key)
        {
            return;
        }
        if name != "*" && !self.keys.contains(key) {
            problems.push(format!(
                "{at}: configuration key `{key}` is not in config/default.toml"
            ));
        }
    }

    /// Every `BILLSYNC_…` word must stand for a configuration key or a known tool variable.
    fn check_variables(&self, line: &str, problems: &mut Vec<String>, at: &str) {
        for (start, _) in line.match_indices("BILLSYNC_") {
            let word: String = line[start..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `BILLSYNC_`, `BILLSYNC_TEST_*`: a prefix, not a variable.
            if word.ends_with('_') || OTHER_VARIABLES.contains(&word.as_str()) {
                continue;
            }
            let key = word["BILLSYNC_".len()..].to_lowercase().replace("__", ".");
            if !self.keys.contains(&key) {
                problems.push(format!(
                    "{at}: environment variable `{word}` stands for no key of config/default.toml"
                ));
            }
        }
    }

    /// A `curl` command (continuation lines joined) aimed at billsync names its route.
    fn check_curl(&self, command: &str, problems: &mut Vec<String>, at: &str) {
        let words: Vec<&str> = command.split_whitespace().collect();
        let method = match words.iter().position(|w| *w == "-X" || *w == "--request") {
            Some(i) => words.get(i + 1).copied().unwrap_or("GET"),
            None if words
                .iter()
                .any(|w| ["-d", "--data", "--data-raw", "--json", "-F"].contains(w)) =>
            {
                "POST"
            }
            None => "GET",
        };
        let port = self.listen.rsplit(':').next().unwrap_or_default();
        let bases = [
            format!("http://{}", self.listen),
            format!("http://localhost:{port}"),
            "${BASE}".to_owned(),
            "$BASE".to_owned(),
        ];
        for word in words {
            let word = word.trim_matches(['\'', '"']);
            // `-d url=http://...` hands billsync's address to another program: not a call.
            if let Some(base) = bases.iter().find(|base| word.starts_with(base.as_str())) {
                let path = &word[base.len()..];
                if path.starts_with('/') {
                    for variant in variants(path) {
                        if !self.has_route(Some(method), &variant) {
                            problems.push(format!(
                                "{at}: curl calls `{method} {variant}`, which is not in the route table"
                            ));
                        }
                    }
                }
            }
        }
    }
}

/// GitHub's anchors for the headings of a markdown text.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let heading = line.trim_start_matches('#');
        if fenced
            || heading.len() == line.len()
            || !heading.starts_with(' ')
            || line.len() - heading.len() > 6
        {
            continue;
        }
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        all.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    all
}

/// Links to files must reach a file, and a `#heading` one of its headings.
fn check_links(
    doc: &Path,
    prose: &str,
    texts: &BTreeMap<PathBuf, String>,
    problems: &mut Vec<String>,
    at: &str,
) {
    for (start, _) in prose.match_indices("](") {
        let rest = &prose[start + 2..];
        let Some(end) = rest.find(')') else { continue };
        let target = &rest[..end];
        if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
            continue;
        }
        let (file, anchor) = target.split_once('#').unwrap_or((target, ""));
        let path = if file.is_empty() {
            doc.to_path_buf()
        } else {
            normalize(&doc.parent().unwrap_or(Path::new("")).join(file))
        };
        if !root().join(&path).exists() {
            problems.push(format!("{at}: link `{target}`: no file {}", path.display()));
            continue;
        }
        if anchor.is_empty() || path.extension().is_none_or(|ext| ext != "md") {
            continue;
        }
        let text = match texts.get(&path) {
            Some(text) => text.clone(),
            None => std::fs::read_to_string(root().join(&path)).unwrap_or_default(),
        };
        if !anchors(&text).contains(anchor) {
            problems.push(format!(
                "{at}: link `{target}`: {} has no heading #{anchor}",
                path.display()
            ));
        }
    }
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// What `default` looks like in a configuration table.
fn shown_default(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if s.is_empty() => "empty".to_owned(),
        toml::Value::String(s) => format!("`{s}`"),
        toml::Value::Array(items) if items.is_empty() => "empty".to_owned(),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| {
                format!(
                    "`{}`",
                    item.as_str().map_or(item.to_string(), str::to_owned)
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => format!("`{other}`"),
    }
}

impl Known {
    fn default_of(&self, key: &str) -> Option<&toml::Value> {
        match key.split_once('.') {
            Some((section, name)) => self.config.get(section)?.as_table()?.get(name),
            None => self.config.get(key),
        }
    }

    /// The rows of every configuration table (header `| key | environment variable | default`):
    /// each names a real key with its variable and default. Returns the keys listed.
    fn check_config_tables(
        &self,
        text: &str,
        problems: &mut Vec<String>,
        name: &str,
    ) -> BTreeSet<String> {
        let mut listed = BTreeSet::new();
        let mut in_table = false;
        for (index, line) in text.lines().enumerate() {
            let at = format!("{name}:{}", index + 1);
            if line.starts_with("| key | environment variable | default |") {
                in_table = true;
                continue;
            }
            if !line.starts_with('|') {
                in_table = false;
            }
            if !in_table || line.starts_with("|---") {
                continue;
            }
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").map(str::trim).collect();
            let [key, variable, default, ..] = cells[..] else {
                problems.push(format!(
                    "{at}: a configuration row needs key, variable and default"
                ));
                continue;
            };
            let (key, variable) = (key.trim_matches('`'), variable.trim_matches('`'));
            let Some(value) = self.default_of(key) else {
                problems.push(format!("{at}: `{key}` is not in config/default.toml"));
                continue;
            };
            let expected = format!("BILLSYNC_{}", key.to_uppercase().replace('.', "__"));
            if variable != expected {
                problems.push(format!(
                    "{at}: `{key}` is set by `{expected}`, not `{variable}`"
                ));
            }
            if default != shown_default(value) {
                problems.push(format!(
                    "{at}: `{key}` defaults to {}, not {default}",
                    shown_default(value)
                ));
            }
            listed.insert(key.to_owned());
        }
        listed
    }
}

/// Everything the documents name that does not exist.
fn problems(known: &Known, docs: &[(PathBuf, String)]) -> Vec<String> {
    let texts: BTreeMap<PathBuf, String> = docs.iter().cloned().collect();
    let mut problems = Vec::new();
    for (path, text) in docs {
        let name = path.display().to_string();
        let parsed = parse(text);
        for (line, paragraph) in &parsed.paragraphs {
            let at = format!("{name}:{line}");
            let (inside, outside) = spans(paragraph);
            for span in inside {
                known.check_span_route(span, &mut problems, &at);
                known.check_span_key(span, &mut problems, &at);
            }
            check_links(path, &outside, &texts, &mut problems, &at);
            known.check_variables(paragraph, &mut problems, &at);
        }
        let mut command: Option<(usize, String)> = None;
        for (line, code) in &parsed.code {
            let at = format!("{name}:{line}");
            known.check_variables(code, &mut problems, &at);
            let is_curl = code.split_whitespace().any(|word| word == "curl");
            command = match command.take() {
                Some((first, mut joined)) => {
                    joined.push(' ');
                    joined.push_str(code.trim_end().trim_end_matches('\\'));
                    Some((first, joined))
                }
                None if is_curl => Some((*line, code.trim_end().trim_end_matches('\\').to_owned())),
                None => None,
            };
            if !code.trim_end().ends_with('\\')
                && let Some((first, joined)) = command.take()
            {
                known.check_curl(&joined, &mut problems, &format!("{name}:{first}"));
            }
        }
        let listed = known.check_config_tables(text, &mut problems, &name);
        if name == "README.md" {
            for key in known.keys.difference(&listed) {
                problems.push(format!(
                    "README.md: the configuration table does not list `{key}`"
                ));
            }
        }
    }
    problems
}

#[test]
fn the_docs_name_only_configuration_keys_routes_and_pages_that_exist() {
    let found = problems(&known(), &documents());
    assert!(
        found.is_empty(),
        "the docs name what does not exist:\n{}",
        found.join("\n")
    );
}

#[test]
fn a_bogus_key_variable_route_curl_or_link_in_a_doc_is_reported() {
    let known = known();
    let doc = "\
Set `sync.poll_interval` and `metering.no_such_key`, or `BILLSYNC_SYNC__NO_SUCH_KEY`.
Ask `GET /v1/tenants/{t}/usage`, `POST /v1/no-such-route` or `/v1/no/such/path`, and
`POST|DELETE /v1/tenants/{t}/subscription[/resume]`.
See [Metering](metering.md#sending-usage), [nothing](metering.md#no-such-heading) and
[no page](no-such-page.md).

```sh
curl -s http://127.0.0.1:8080/v1/tenants/acme/usage?meter=api_calls
curl -s -X POST http://127.0.0.1:8080/v1/tenants/acme/bogus \\
  -H 'Content-Type: application/json'
```
";
    let mut found = problems(
        &known,
        &[(PathBuf::from("docs/example.md"), doc.to_owned())],
    );
    found.sort();
    let mut expected = [
        "docs/example.md:1: configuration key `metering.no_such_key` is not in config/default.toml",
        "docs/example.md:1: environment variable `BILLSYNC_SYNC__NO_SUCH_KEY` stands for no key of config/default.toml",
        "docs/example.md:1: route `POST /v1/no-such-route` is not in the route table (src/api/mod.rs)",
        "docs/example.md:1: route `(any method) /v1/no/such/path` is not in the route table (src/api/mod.rs)",
        "docs/example.md:1: route `DELETE /v1/tenants/{t}/subscription/resume` is not in the route table (src/api/mod.rs)",
        "docs/example.md:1: link `metering.md#no-such-heading`: docs/metering.md has no heading #no-such-heading",
        "docs/example.md:1: link `no-such-page.md`: no file docs/no-such-page.md",
        "docs/example.md:9: curl calls `POST /v1/tenants/acme/bogus`, which is not in the route table",
    ];
    expected.sort();
    assert_eq!(found, expected, "{found:#?}");
}
