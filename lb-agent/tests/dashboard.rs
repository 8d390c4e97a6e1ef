//! The Grafana dashboard (deploy/grafana/xlb-dashboard.json) queries only metrics the agent
//! exports: every `xlb_*` name in its PromQL is a sample name of a family the agent
//! registers (the data plane's collector, the agent's own, the L7 hop's). No privileges:
//! the families are described even before any map is open. `trace_end_to_end.rs`
//! checks the data-plane names against a real scrape of a running agent.

use std::collections::BTreeSet;
use std::path::PathBuf;

use lb_agent::admin::{AgentState, PART_DATAPLANE, PART_L7};

fn dashboard() -> serde_json::Value {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/xlb-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every PromQL expression: panel targets and templating queries.
fn expressions(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(e)) => out.push(e.clone()),
                    ("query", serde_json::Value::String(e)) if e.contains("xlb_") => {
                        out.push(e.clone());
                    }
                    _ => expressions(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| expressions(v, out)),
        _ => {}
    }
}

/// The metric names an expression uses: `xlb_` identifiers (label names and values
/// never start with it here).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("xlb_") {
        let start = i + at;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(expr.len(), |n| start + n);
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

/// Sample names the agent exports, from the `# TYPE` lines of its `/metrics` text.
fn exported() -> BTreeSet<String> {
    let (state, l7) = AgentState::with_parts(PART_DATAPLANE | PART_L7, |registry| {
        Ok(lb_agent::l7::metrics::Metrics::register(registry))
    })
    .expect("registering the metrics");
    // The registry leaves out families that have no series yet: give the L7 hop's one
    // of each kind it has (the data plane's collector describes its families always).
    l7.answered(hyper::StatusCode::OK);
    l7.local_answer("no_route");
    l7.upstream_error("connect");
    l7.closed("idle_timeout");
    l7.accepted("http");
    let text = state.metrics();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').expect("# TYPE name type");
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        for suffix in suffixes {
            names.insert(format!("{family}{suffix}"));
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let mut exprs = Vec::new();
    expressions(&dashboard(), &mut exprs);
    assert!(exprs.len() > 10, "the dashboard has its queries: {exprs:?}");
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    let exported = exported();
    let missing: Vec<&String> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics the agent does not export: {missing:?}\nexported: {exported:?}"
    );
    // What the dashboard is for: traffic per service, drops by reason, backend share,
    // table fill, reconcile lag, L7 answers by code.
    for needed in [
        "xlb_service_packets_total",
        "xlb_service_bytes_total",
        "xlb_xdp_packets_total",
        "xlb_backend_new_flows_total",
        "xlb_table_entries",
        "xlb_table_capacity",
        "xlb_reconcile_lag_seconds_bucket",
        "xlb_l7_requests_total",
    ] {
        assert!(used.contains(needed), "the dashboard shows {needed}");
    }
}

#[test]
fn every_panel_queries_something() {
    let d = dashboard();
    let panels = d["panels"].as_array().expect("panels");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().map_or(0, Vec::len);
        assert!(targets > 0, "panel {:?} has no query", p["title"]);
    }
}

#[test]
fn names_are_found_in_promql() {
    let names = metric_names(
        "sum by (le) (rate(xlb_reconcile_lag_seconds_bucket{instance=~\"$instance\"}[5m])) / xlb_a",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["xlb_a", "xlb_reconcile_lag_seconds_bucket"]
    );
}
