//! The Grafana dashboards under `dashboards/`: every PromQL expression in them names only
//! metrics that a running `weir serve` exports on `/metrics`, and parses (`promtool check
//! rules`, Prometheus' own parser).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::harness::{Weir, repo_root};

/// Grafana's variables, replaced by values PromQL accepts.
const VARIABLES: [(&str, &str); 3] = [
    ("$__rate_interval", "1m"),
    ("$pipeline", ".*"),
    ("${datasource}", "prometheus"),
];

/// Every expression of a dashboard: panel targets (rows' nested panels too) and query
/// variables.
fn expressions(dashboard: &serde_json::Value) -> Vec<String> {
    fn panels(list: &serde_json::Value, out: &mut Vec<String>) {
        for panel in list.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push(expr.to_string());
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query"
            && let Some(query) = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
        {
            // label_values(<metric>, <label>): the metric is what must exist.
            let metric = query
                .strip_prefix("label_values(")
                .and_then(|rest| rest.split(',').next())
                .unwrap_or(query);
            out.push(metric.trim().to_string());
        }
    }
    out
}

/// The series names `/metrics` exports, from its `# TYPE` lines (a counter `x` is sampled
/// as `x_total`, a histogram as `x_bucket`, `x_sum` and `x_count`).
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{}_total", name.trim_end_matches("_total")));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_string());
            }
        }
    }
    names
}

/// The `weir_…` metric names an expression uses.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("weir_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        // Not the end of a longer identifier (a label named `x_weir_y`).
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn every_dashboard_expression_names_exported_metrics_and_parses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start(dir.path(), None);
    let response = weir.http_get("/metrics");
    let exported = exported(&response);
    assert!(
        exported.contains("weir_records_in_total") && exported.len() > 40,
        "/metrics exports its families: {exported:?}"
    );

    let dashboards = repo_root().join("dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dashboards)
        .expect("dashboards/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no dashboard in {}",
        dashboards.display()
    );
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read dashboard");
        let dashboard: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", file.display()));
        let exprs = expressions(&dashboard);
        assert!(
            exprs.len() >= 20,
            "{}: {} expressions",
            file.display(),
            exprs.len()
        );
        for expr in &exprs {
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{}: {expr} names no weir metric",
                file.display()
            );
            for name in names {
                assert!(
                    exported.contains(&name),
                    "{}: {expr} names {name}, which /metrics does not export",
                    file.display()
                );
            }
        }
        check_rules(dir.path(), &file, &exprs);
    }
}

/// `promtool check rules` over every expression as a recording rule: Prometheus' parser
/// accepts each.
fn check_rules(dir: &Path, dashboard: &Path, exprs: &[String]) {
    let mut rules = String::from("groups:\n- name: dashboard\n  rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let mut expr = expr.clone();
        for (variable, value) in VARIABLES {
            expr = expr.replace(variable, value);
        }
        rules.push_str(&format!(
            "  - record: weir_dashboard_expr_{i}\n    expr: {}\n",
            serde_json::to_string(&expr).expect("a JSON string is YAML")
        ));
    }
    let path = dir.join("dashboard-rules.yml");
    std::fs::write(&path, rules).expect("write rules");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
        .expect("promtool (Debian's prometheus package, scripts/install-test-deps.sh)");
    assert!(
        out.status.success(),
        "{}: promtool refused an expression:\n{}{}",
        dashboard.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
