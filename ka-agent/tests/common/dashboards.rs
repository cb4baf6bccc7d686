//! The dashboards' PromQL, as Grafana would send it to Prometheus.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::PathBuf;

/// The dashboards under `dashboards/`.
pub const DASHBOARDS: [&str; 2] = ["ka-overview", "ka-drilldown"];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A dashboard expression as Prometheus would receive it: variables
/// replaced by what Grafana would send (every value selected).
pub fn as_sent(expr: &str) -> String {
    let mut out = expr
        .replace("$__rate_interval", "1m")
        .replace("$__range", "1h");
    for variable in ["instance", "netns", "port", "comm", "namespace", "pod"] {
        out = out.replace(&format!("${variable}"), ".*");
    }
    out
}

/// Every panel target of every dashboard: ("dashboard: panel title", expr).
pub fn panel_queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    for name in DASHBOARDS {
        let path = root().join(format!("dashboards/{name}.json"));
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
        for panel in dashboard["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().map_or(&[][..], Vec::as_slice) {
                if let Some(expr) = target["expr"].as_str() {
                    queries.push((format!("{name}: {title}"), expr.to_owned()));
                }
            }
        }
    }
    queries
}
