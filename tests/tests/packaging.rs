//! The Prometheus rules and the Grafana dashboard that ship with meterd
//! (`packaging/prometheus/meterd.rules.yml` with its unit tests, and
//! `packaging/grafana/meterd.json`, installed under `/usr/share/meterd/`).
//!
//! `promtool` checks the rules and runs their unit tests, which must have a
//! case where each alert fires and one where it does not. Then a real
//! Prometheus scrapes a running meterd with the rules loaded: every PromQL
//! expression of the dashboard (panels and template variables, with
//! Grafana's variables filled in) and of the rules must evaluate, every
//! rule must evaluate without error, every metric they name must be one that
//! meterd's `/metrics` shows (or a recording rule of the file, or one of the
//! few documented as absent here, [`NOT_HERE`]), and every series selector
//! must select something, so a typo in a metric or label value fails.
//!
//! Does not own: what the alerts mean (the rules file and its unit tests
//! say that) or how Grafana draws the panels (no Grafana here: the
//! dashboard's JSON is checked for the structure Grafana reads).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use meterd_tests::{
    AgentConfig, Setup, TcpClient, TestEnv, http, port,
    process::wait_until,
    prometheus::Prometheus,
    tariff::{Direction, Rounding, Service, Tariff},
    traffic_bin,
};
use serde_json::Value;

/// The rules, relative to the repository.
const RULES: &str = "packaging/prometheus/meterd.rules.yml";
/// Their unit tests.
const RULE_TESTS: &str = "packaging/prometheus/meterd.rules.test.yml";
/// The dashboard.
const DASHBOARD: &str = "packaging/grafana/meterd.json";

/// Metrics the rules or the dashboard may name although a test's meterd
/// does not export them, and why. Anything else they name must be on
/// `/metrics`.
const NOT_HERE: &[(&str, &str)] = &[
    (
        "meterd_outbox_pending",
        "fleet hosts only (issue 11); MeterdOutboxBacklogGrowing says so",
    ),
    (
        "meterd_fleet_connected",
        "fleet hosts only (issue 11); MeterdFleetPartitioned says so",
    ),
];

/// Metrics meterd exports only where the kernel has PSI
/// (`/proc/pressure/cpu`).
const PSI_ONLY: &[&str] = &[
    "meterd_cpu_pressure_ratio",
    "meterd_cpu_pressure_avg10_ratio",
];

/// Alerts that load on the test machine may make pending (never firing:
/// their `for` is longer than the test) while the agent is healthy.
const LOAD_DEPENDENT: &[&str] = &["MeterdCycleOverruns", "MeterdIntervalAtCeiling"];

/// Metrics the issue asks the dashboard to show.
const DASHBOARD_MUST_SHOW: &[&str] = &[
    "meterd_payload_bytes_total",
    "meterd_charged_minor_total",
    "meterd_viewer_sessions_live",
    "meterd_connections_live",
    "meterd_cycle_duration_seconds_bucket",
    "meterd_read_interval_seconds",
    "meterd_cpu_pressure_ratio",
    "meterd_kernel_events_total",
];

/// The panel that is the patent's figure 4 shows these together.
const FIGURE_4: &[&str] = &[
    "meterd_cycle_duration_seconds_bucket",
    "meterd_read_interval_seconds",
    "meterd_cpu_pressure_ratio",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test crate is in the repository")
        .to_owned()
}

fn read(relative: &str) -> String {
    let path = repo().join(relative);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs `promtool args` in `dir`; panics with its output unless it succeeds.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): install the Debian package prometheus")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// `(alerts, recording rules)` of the rules file, by name, from its
/// `- alert:` and `- record:` lines (the live test checks this list against
/// what Prometheus loaded).
fn rule_names(rules: &str) -> (Vec<String>, Vec<String>) {
    let mut alerts = Vec::new();
    let mut records = Vec::new();
    for line in rules.lines() {
        let line = line.trim_start();
        if let Some(name) = line.strip_prefix("- alert:") {
            alerts.push(name.trim().to_owned());
        } else if let Some(name) = line.strip_prefix("- record:") {
            records.push(name.trim().to_owned());
        }
    }
    (alerts, records)
}

/// Per alert name, how many cases of the unit tests expect it to fire and
/// how many expect it not to (`exp_alerts: []`).
fn alert_cases(tests: &str) -> BTreeMap<String, (usize, usize)> {
    let mut cases: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname:") {
            current = Some(name.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current
                .take()
                .unwrap_or_else(|| panic!("{RULE_TESTS}: exp_alerts without an alertname"));
            let entry = cases.entry(name).or_default();
            if rest.trim() == "[]" {
                entry.1 += 1;
            } else {
                entry.0 += 1;
            }
        }
    }
    cases
}

/// `promtool check rules` and `promtool test rules` pass on the shipped
/// files, and the unit tests make every alert fire and not fire, and check
/// every recording rule's value.
#[test]
fn shipped_rules_pass_promtool_with_a_case_for_every_alert() {
    let dir = repo().join("packaging/prometheus");
    let checked = promtool(&dir, &["check", "rules", "meterd.rules.yml"]);
    assert!(
        checked.contains("SUCCESS"),
        "promtool check rules: {checked}"
    );
    let tested = promtool(&dir, &["test", "rules", "meterd.rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "promtool test rules: {tested}");

    let (alerts, records) = rule_names(&read(RULES));
    assert!(
        alerts.len() >= 8 && !records.is_empty(),
        "{RULES}: alerts {alerts:?}, recording rules {records:?}"
    );
    let tests = read(RULE_TESTS);
    let cases = alert_cases(&tests);
    let missing: Vec<String> = alerts
        .iter()
        .filter_map(|alert| match cases.get(alert) {
            Some(&(fires, quiet)) if fires > 0 && quiet > 0 => None,
            found => Some(format!(
                "{alert}: {} firing and {} quiet cases",
                found.map_or(0, |c| c.0),
                found.map_or(0, |c| c.1)
            )),
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{RULE_TESTS} must make every alert fire in one case and stay quiet in another:\n{}",
        missing.join("\n")
    );
    let unknown: Vec<&String> = cases.keys().filter(|a| !alerts.contains(a)).collect();
    assert!(
        unknown.is_empty(),
        "{RULE_TESTS} tests alerts the rules do not have: {unknown:?}"
    );
    for record in &records {
        assert!(
            tests
                .lines()
                .any(|l| l.trim().strip_prefix("- expr:").map(str::trim) == Some(record)),
            "{RULE_TESTS} has no promql_expr_test of the recording rule {record}"
        );
    }
}

/// A PromQL expression of the dashboard or the rules, and where it is.
#[derive(Clone, Debug)]
struct Expr {
    /// "panel "Live viewers" target B", "rule MeterdDown".
    origin: String,
    /// The expression, with Grafana's variables still in it.
    text: String,
    /// For a template variable's `label_values(selector, label)`: the label
    /// its values come from.
    label: Option<String>,
}

/// Every panel of the dashboard, those inside rows included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// The PromQL of every panel target and every query variable.
fn dashboard_exprs(dashboard: &Value) -> Vec<Expr> {
    let mut out = Vec::new();
    for panel in panels(dashboard) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_else(|| {
                panic!(
                    "{DASHBOARD}: panel {} has a target without expr: {target}",
                    panel["title"]
                )
            });
            out.push(Expr {
                origin: format!("panel {} target {}", panel["title"], target["refId"]),
                text: expr.to_owned(),
                label: None,
            });
        }
    }
    for var in variables(dashboard) {
        if var["type"] != "query" {
            continue;
        }
        let query = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_else(|| panic!("{DASHBOARD}: variable {} has no query", var["name"]));
        let (selector, label) = label_values(query).unwrap_or_else(|| {
            panic!(
                "{DASHBOARD}: variable {}: {query:?} is not label_values(selector, label)",
                var["name"]
            )
        });
        out.push(Expr {
            origin: format!("variable {}", var["name"]),
            text: selector.to_owned(),
            label: Some(label.to_owned()),
        });
    }
    out
}

fn variables(dashboard: &Value) -> &[Value] {
    dashboard["templating"]["list"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}

/// `label_values(selector, label)` -> `(selector, label)`.
fn label_values(query: &str) -> Option<(&str, &str)> {
    let inner = query
        .trim()
        .strip_prefix("label_values(")?
        .strip_suffix(')')?;
    let (selector, label) = inner.rsplit_once(',')?;
    Some((selector.trim(), label.trim()))
}

/// Grafana's global variables the dashboard may use, with the values a
/// query gets for them here.
const GRAFANA_GLOBALS: &[(&str, &str)] = &[
    ("__rate_interval", "1m"),
    ("__interval", "15s"),
    ("__range", "1h"),
];

/// `text` with every `$name` and `${name}` replaced from `values`; an
/// error naming a variable it does not know.
fn substitute(text: &str, values: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .ok_or_else(|| format!("unclosed ${{ in {text:?}"))?;
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        let value = values
            .get(name)
            .ok_or_else(|| format!("unknown variable ${name} in {text:?}"))?;
        out.push_str(value);
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

/// A vector selector of an expression: its metric name and the selector's
/// text (name and matchers, without a range).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Selector {
    name: String,
    text: String,
}

/// PromQL words that are not metric names.
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "inf",
    "nan",
];

/// Words followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// The end (exclusive) of the bracketed part that starts at `open` in
/// `chars`, skipping quoted strings; `None` if it is not closed.
fn closing(chars: &[char], open: usize, close: char) -> Option<usize> {
    let mut i = open + 1;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i)?,
            c if c == close => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end (exclusive) of the string literal that starts at `at`.
fn skip_string(chars: &[char], at: usize) -> Option<usize> {
    let quote = chars[at];
    let mut i = at + 1;
    while i < chars.len() {
        match chars[i] {
            '\\' if quote != '`' => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn next_non_space(chars: &[char], mut i: usize) -> Option<(usize, char)> {
    while i < chars.len() && chars[i].is_whitespace() {
        i += 1;
    }
    chars.get(i).map(|&c| (i, c))
}

/// The vector selectors of a PromQL expression, in order. Deliberately
/// small: it knows PromQL's words, strings, label lists and ranges, which
/// is all it needs to tell metric names from everything else; Prometheus
/// itself judges whether the expression parses.
fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let unclosed = |what: char| format!("unclosed {what} in {expr:?}");
    let mut out: Vec<Selector> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i).ok_or_else(|| unclosed(c))?;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '[' {
            i = closing(&chars, i, ']').ok_or_else(|| unclosed('['))?;
        } else if c == '{' {
            return Err(format!(
                "a selector without a metric name in {expr:?}: name the metric"
            ));
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = next_non_space(&chars, i);
            if LABEL_LISTS.contains(&word.as_str()) {
                if let Some((at, '(')) = next {
                    i = closing(&chars, at, ')').ok_or_else(|| unclosed('('))?;
                }
            } else if KEYWORDS.contains(&word.to_ascii_lowercase().as_str())
                || matches!(next, Some((_, '(')))
            {
                // An operator, an aggregation or a function.
            } else {
                let mut text = word.clone();
                if let Some((at, '{')) = next {
                    let end = closing(&chars, at, '}').ok_or_else(|| unclosed('{'))?;
                    text.extend(&chars[at..end]);
                    i = end;
                }
                out.push(Selector { name: word, text });
            }
        } else {
            i += 1;
        }
    }
    Ok(out)
}

#[test]
fn selectors_are_found_in_promql() {
    let found = selectors(
        r#"sum by (service, direction) (rate(meterd_payload_bytes_total{job=~"meterd", service="a{b}"}[5m] offset 1h)) * 3600
           / on (instance) group_left (version) meterd_build_info
           and histogram_quantile(0.99, sum without (le) (rate(x:meterd_y:rate5m[1m:10s])))
           > bool 1e3 or up"#,
    )
    .unwrap();
    assert_eq!(
        found,
        [
            Selector {
                name: "meterd_payload_bytes_total".into(),
                text: r#"meterd_payload_bytes_total{job=~"meterd", service="a{b}"}"#.into(),
            },
            Selector {
                name: "meterd_build_info".into(),
                text: "meterd_build_info".into(),
            },
            Selector {
                name: "x:meterd_y:rate5m".into(),
                text: "x:meterd_y:rate5m".into(),
            },
            Selector {
                name: "up".into(),
                text: "up".into(),
            },
        ]
    );
    assert!(selectors(r#"{__name__="x"}"#).is_err());
    assert!(selectors(r#"x{a="b"#).is_err());
}

/// A panel has a unique id, a place on the grid, and (unless it is a row)
/// targets with distinct refIds, all on the data source `ds_uid`.
fn check_panel(panel: &Value, ds_uid: &str, ids: &mut BTreeSet<u64>) {
    let title = &panel["title"];
    assert!(
        ids.insert(
            panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{DASHBOARD}: panel {title} has no id"))
        ),
        "{DASHBOARD}: panel id {} twice",
        panel["id"]
    );
    let grid = &panel["gridPos"];
    let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
    assert!(
        matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24)
            && grid["h"].as_u64().is_some_and(|h| h > 0),
        "{DASHBOARD}: panel {title} gridPos {grid}"
    );
    if panel["type"] == "row" {
        return;
    }
    assert_eq!(
        panel["datasource"]["uid"], ds_uid,
        "{DASHBOARD}: panel {title}"
    );
    let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
    assert!(
        !targets.is_empty(),
        "{DASHBOARD}: panel {title} has no target"
    );
    let mut refs = BTreeSet::new();
    for target in targets {
        assert_eq!(
            target["datasource"]["uid"], ds_uid,
            "{DASHBOARD}: panel {title}"
        );
        assert!(
            refs.insert(target["refId"].as_str().unwrap_or_default()),
            "{DASHBOARD}: panel {title}: refId {} twice or missing",
            target["refId"]
        );
    }
}

/// The dashboard is what Grafana imports: a schema version of Grafana 10
/// or 11, a data-source variable every panel and target uses, unique panel
/// ids on a 24-column grid, only variables it defines, and the panels the
/// issue asks for.
#[test]
fn dashboard_is_well_formed() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    let schema = dashboard["schemaVersion"].as_u64().unwrap_or(0);
    assert!(
        (36..=41).contains(&schema),
        "{DASHBOARD}: schemaVersion {schema}"
    );
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());

    let vars = variables(&dashboard);
    let datasource = vars
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .unwrap_or_else(|| panic!("{DASHBOARD}: no Prometheus data-source variable"));
    let ds_uid = format!("${{{}}}", datasource["name"].as_str().unwrap());
    let mut defined: BTreeMap<String, String> = GRAFANA_GLOBALS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for var in vars {
        defined.insert(var["name"].as_str().unwrap().to_owned(), "x".to_owned());
        if var["type"] == "query" {
            assert_eq!(
                var["datasource"]["uid"], ds_uid,
                "{DASHBOARD}: variable {}",
                var["name"]
            );
        }
    }

    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard) {
        check_panel(panel, &ds_uid, &mut ids);
    }

    let exprs = dashboard_exprs(&dashboard);
    for expr in &exprs {
        substitute(&expr.text, &defined)
            .unwrap_or_else(|e| panic!("{DASHBOARD}: {}: {e}", expr.origin));
    }
    let named = |e: &Expr| -> BTreeSet<String> {
        selectors(&substitute(&e.text, &defined).unwrap())
            .unwrap_or_else(|err| panic!("{DASHBOARD}: {}: {err}", e.origin))
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    let everything: BTreeSet<String> = exprs.iter().flat_map(named).collect();
    let missing: Vec<&&str> = DASHBOARD_MUST_SHOW
        .iter()
        .filter(|m| !everything.contains(**m))
        .collect();
    assert!(missing.is_empty(), "{DASHBOARD} shows none of {missing:?}");
    let figure_4 = panels(&dashboard).into_iter().any(|panel| {
        let mine: BTreeSet<String> = exprs
            .iter()
            .filter(|e| e.origin.starts_with(&format!("panel {} ", panel["title"])))
            .flat_map(named)
            .collect();
        FIGURE_4.iter().all(|m| mine.contains(*m))
    });
    assert!(
        figure_4,
        "{DASHBOARD}: no panel shows {FIGURE_4:?} together (the patent's figure 4)"
    );
}

/// `GET path` on Prometheus's API: its `data`, or its error.
fn api(prometheus: &Prometheus, path: &str) -> Result<Value, String> {
    let response = http::get(prometheus.addr, path).map_err(|e| format!("GET {path}: {e}"))?;
    let json: Value = serde_json::from_str(&response.body)
        .map_err(|e| format!("GET {path}: not JSON ({e}): {}", response.body))?;
    if response.status == 200 && json["status"] == "success" {
        Ok(json["data"].clone())
    } else {
        Err(json["error"]
            .as_str()
            .map_or_else(|| response.body.clone(), str::to_owned))
    }
}

/// Evaluates `expr` now: the result, or Prometheus's error (a parse error
/// for bad PromQL).
fn evaluate(prometheus: &Prometheus, expr: &str) -> Result<Value, String> {
    api(
        prometheus,
        &format!("/api/v1/query?query={}", http::urlencode(expr)),
    )
    .map(|data| data["result"].clone())
}

/// The rules Prometheus loaded: `(name, type, query, health, last error)`.
fn loaded_rules(prometheus: &Prometheus) -> Vec<(String, String, String, String, String)> {
    let data = api(prometheus, "/api/v1/rules").unwrap_or_else(|e| panic!("{e}"));
    data["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (
                field("name"),
                field("type"),
                field("query"),
                field("health"),
                field("lastError"),
            )
        })
        .collect()
}

/// The alerts Prometheus has now: `(name, state, instance)`.
fn alerts(prometheus: &Prometheus) -> Vec<(String, String, String)> {
    let data = api(prometheus, "/api/v1/alerts").unwrap_or_else(|e| panic!("{e}"));
    data["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let label = |k: &str| a["labels"][k].as_str().unwrap_or_default().to_owned();
            (
                label("alertname"),
                a["state"].as_str().unwrap_or_default().to_owned(),
                label("instance"),
            )
        })
        .collect()
}

/// What an expression may name: meterd's metrics now, the recording rules,
/// and why the others in [`NOT_HERE`] (and without PSI, [`PSI_ONLY`]) are
/// absent.
struct Known {
    exported: BTreeSet<String>,
    recorded: BTreeSet<String>,
    absent: BTreeMap<String, String>,
}

impl Known {
    /// Problems of `expr` as evaluated on `prometheus`, after substituting
    /// `values`; none if it evaluates, names only known metrics, and each of
    /// its selectors selects a series.
    fn problems(
        &self,
        prometheus: &Prometheus,
        expr: &Expr,
        values: &BTreeMap<String, String>,
    ) -> Vec<String> {
        let text = match substitute(&expr.text, values) {
            Ok(text) => text,
            Err(e) => return vec![format!("{}: {e}", expr.origin)],
        };
        let mut problems = Vec::new();
        if let Err(e) = evaluate(prometheus, &text) {
            problems.push(format!("{}: {text:?} does not evaluate: {e}", expr.origin));
        }
        let found = match selectors(&text) {
            Ok(found) => found,
            Err(e) => return [problems, vec![format!("{}: {e}", expr.origin)]].concat(),
        };
        for selector in found {
            let name = &selector.name;
            if self.absent.contains_key(name) {
                continue;
            }
            if name != "up" && !self.exported.contains(name) && !self.recorded.contains(name) {
                problems.push(format!(
                    "{}: names {name}, which meterd's /metrics does not have and no rule \
                     records",
                    expr.origin
                ));
                continue;
            }
            let probe = match &expr.label {
                Some(label) => format!("count by ({label}) ({})", selector.text),
                None => format!("count({})", selector.text),
            };
            match evaluate(prometheus, &probe) {
                Ok(result) => {
                    let series = result.as_array().map_or(&[][..], Vec::as_slice);
                    if series.is_empty() {
                        problems.push(format!(
                            "{}: {} selects no series of the running meterd",
                            expr.origin, selector.text
                        ));
                    } else if let Some(label) = &expr.label
                        && series.iter().all(|s| s["metric"][label].is_null())
                    {
                        problems.push(format!(
                            "{}: {} has no label {label}",
                            expr.origin, selector.text
                        ));
                    }
                }
                Err(e) => problems.push(format!("{}: {probe:?}: {e}", expr.origin)),
            }
        }
        problems
    }
}

/// A real Prometheus scrapes a running meterd with the shipped rules
/// loaded. Every expression of the dashboard and the rules evaluates, names
/// only metrics meterd exports (or the rules record, or [`NOT_HERE`]), and
/// selects series; every rule evaluates without error; no alert is active
/// on the healthy agent (but those that load on the test machine can make
/// pending, [`LOAD_DEPENDENT`]); and MeterdDown goes pending once the agent
/// stops.
#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, read top to bottom")]
fn dashboard_and_rules_query_a_running_meterd() {
    let Some(mut env) = TestEnv::new("pkg-promql", traffic_bin!(), Setup::default()) else {
        return;
    };
    let vod = SocketAddr::from((Ipv4Addr::LOCALHOST, port(0, 0)));
    let live = SocketAddr::from((Ipv4Addr::LOCALHOST, port(0, 1)));
    let services = vec![
        Service::tcp(
            "vod",
            &[vod.port()],
            Tariff::volume(
                5,
                ("1MB", 1_000_000),
                Direction::Egress,
                Rounding::PerStartedUnit,
            ),
        ),
        Service::tcp(
            "live",
            &[live.port()],
            Tariff::time(10_000_000, 1, Rounding::PerStartedUnit),
        ),
    ];
    env.start_agent(AgentConfig {
        services,
        ..AgentConfig::default()
    });
    let _server = env.tcp_server(&[vod, live]);
    let metrics_at = env.agent().ready().metrics;
    let rules_path = repo().join(RULES);
    let prometheus = Prometheus::start_with_rules(env.dir(), metrics_at, &[&rules_path]);
    env.run_tcp_clients(&[
        TcpClient::new(vod, 3_000_000, 0),
        TcpClient {
            chunk: 1000,
            pause_ms: 100,
            ..TcpClient::new(live, 4000, 8000)
        },
    ]);

    // Scraped a few times, and every rule evaluated at least once since;
    // a recording rule of rate5m has a value from its second scrape on.
    let (alert_names, record_names) = rule_names(&read(RULES));
    let mut rules = Vec::new();
    let ready = wait_until(Duration::from_secs(60), || {
        rules = loaded_rules(&prometheus);
        rules.len() == alert_names.len() + record_names.len()
            && rules.iter().all(|r| r.3 == "ok")
            && record_names.iter().all(|name| {
                evaluate(&prometheus, name)
                    .is_ok_and(|r| r.as_array().is_some_and(|a| !a.is_empty()))
            })
    });
    assert!(
        ready,
        "prometheus did not load and evaluate {RULES} without errors: {rules:#?}\nits log:\n{}",
        prometheus.log_tail(30)
    );
    let loaded: BTreeSet<&str> = rules.iter().map(|r| r.0.as_str()).collect();
    let listed: BTreeSet<&str> = alert_names
        .iter()
        .chain(&record_names)
        .map(String::as_str)
        .collect();
    assert_eq!(
        loaded, listed,
        "what Prometheus loaded against the rules' `- alert:` and `- record:` lines"
    );

    let exposition = env.agent().scrape();
    let mut absent: BTreeMap<String, String> = NOT_HERE
        .iter()
        .map(|(name, why)| ((*name).to_owned(), (*why).to_owned()))
        .collect();
    if fs::read_to_string("/proc/pressure/cpu").is_err() {
        for name in PSI_ONLY {
            absent.insert((*name).to_owned(), "no PSI on this kernel".to_owned());
        }
    }
    let known = Known {
        exported: exposition.samples.iter().map(|s| s.name.clone()).collect(),
        recorded: record_names.iter().cloned().collect(),
        absent,
    };
    for name in NOT_HERE.iter().map(|(name, _)| name) {
        assert!(
            !known.exported.contains(*name),
            "{name} is on /metrics now: take it out of NOT_HERE"
        );
    }

    let dashboard: Value = serde_json::from_str(&read(DASHBOARD))
        .unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));
    let mut exprs = dashboard_exprs(&dashboard);
    exprs.extend(rules.iter().map(|(name, kind, query, _, _)| Expr {
        origin: format!("{kind} rule {name}"),
        text: query.clone(),
        label: None,
    }));
    let mut values: BTreeMap<String, String> = GRAFANA_GLOBALS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    values.insert("job".into(), "meterd".into());
    values.insert("instance".into(), metrics_at.to_string());
    values.insert("service".into(), "vod".into());
    let problems: Vec<String> = exprs
        .iter()
        .flat_map(|e| known.problems(&prometheus, e, &values))
        .collect();
    eprintln!(
        "pkg-promql: {} expressions of {DASHBOARD} and {RULES} checked against meterd at \
         {metrics_at}; {} problems",
        exprs.len(),
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "the dashboard and the rules against a running meterd:\n{}",
        problems.join("\n")
    );

    // An alert whose expression holds on a healthy agent is wrong, whatever
    // its `for`.
    let active: Vec<_> = alerts(&prometheus)
        .into_iter()
        .filter(|(name, state, _)| state == "firing" || !LOAD_DEPENDENT.contains(&name.as_str()))
        .collect();
    assert!(
        active.is_empty(),
        "alerts are active on a healthy agent: {active:?}"
    );

    // The scrape fails once the agent is gone: MeterdDown, pending for its
    // `for` of 2 minutes.
    env.agent().stop();
    let instance = metrics_at.to_string();
    let mut now = Vec::new();
    let down = wait_until(Duration::from_secs(30), || {
        now = alerts(&prometheus);
        now.iter()
            .any(|(name, state, at)| name == "MeterdDown" && state == "pending" && *at == instance)
    });
    assert!(
        down,
        "MeterdDown is not pending for {instance} after the agent stopped: {now:?}"
    );
}
