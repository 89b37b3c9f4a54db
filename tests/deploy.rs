//! What deploy/ ships is real: every metric the Grafana dashboard and the
//! Prometheus alert rules name is a series `/metrics` exposes after some
//! traffic, promtool accepts the rules, systemd accepts the unit (where
//! the machine has systemd-analyze), and the production config is valid.

mod common;

use common::{http, Harness};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Metric names (`slg_*`, `process_*`) an expression refers to; a
/// histogram's `_bucket` counts as itself.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut word = String::new();
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            word.push(ch);
            continue;
        }
        if word.starts_with("slg_") || word.starts_with("process_") {
            into.insert(std::mem::take(&mut word));
        }
        word.clear();
    }
}

fn dashboard_and_rule_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("deploy/grafana/slg-gateway.json"))
            .expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "a dashboard of {} panels", panels.len());
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            metric_names(t["expr"].as_str().expect("expr"), &mut names);
        }
    }
    let rules = std::fs::read_to_string(Path::new(ROOT).join("deploy/prometheus/alerts.yml"))
        .expect("rules");
    let mut exprs = 0;
    for line in rules.lines() {
        if let Some(e) = line.trim().strip_prefix("expr:") {
            metric_names(e, &mut names);
            exprs += 1;
        }
    }
    assert!(exprs >= 5, "{exprs} alert rules");
    names
}

#[test]
fn every_metric_of_the_dashboard_and_the_alerts_is_exposed() {
    let wanted = dashboard_and_rule_metrics();
    let h = Harness::start(2);
    // Traffic that makes every labelled family appear: logins, resumes,
    // requests, a route error, a push, a kick.
    let mut c = h.client();
    let li = c.login_demo(5).expect("login");
    c.request(100, b"echo").expect("echo");
    let _ = c.request(9_999_999, b"no route");
    drop(c);
    // A protocol error (a gateway-to-client kind from a client).
    let mut bad = h.client();
    bad.send_raw(&[
        0, 0, 0, 20, 0x85, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ])
    .expect("send");
    assert!(bad.is_closed());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let mut c = h.client();
    c.resume(&li.token, li.response.header.seq + 2)
        .expect("resume");
    let (status, _) = http(h.http_addr(), "POST", "/v1/push?players=5&msg=3000", b"hi");
    assert_eq!(status, 200);
    let (status, _) = http(h.http_addr(), "POST", "/v1/kick?player=5", b"");
    assert_eq!(status, 200);
    let (_, text) = http(h.http_addr(), "GET", "/metrics", b"");
    let exposed: BTreeSet<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| n.to_string())
        .collect();
    let missing: Vec<&String> = wanted.iter().filter(|n| !exposed.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named in deploy/ but not exposed: {missing:?}\nexposed: {exposed:?}"
    );
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let rules = Path::new(ROOT).join("deploy/prometheus/alerts.yml");
    let out = match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
    {
        Ok(o) => o,
        Err(_) => return common::skip("promtool is not installed", None),
    };
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_accepts_the_unit_and_the_production_config_is_valid() {
    let out = Command::new(common::BIN)
        .args(["check", "--config"])
        .arg(Path::new(ROOT).join("deploy/gateway.ron"))
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit = std::fs::read_to_string(Path::new(ROOT).join("deploy/systemd/slg-gateway.service"))
        .expect("unit");
    for key in [
        "LimitNOFILE=",
        "LimitMEMLOCK=",
        "ExecReload=",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=",
        "StateDirectory=",
    ] {
        assert!(unit.contains(key), "the unit sets {key}");
    }
    // Where the machine has systemd: the unit with this build's binary.
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: systemd-analyze verify: not on this machine");
        return;
    }
    let dir = std::env::temp_dir().join(format!("slg-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("slg-gateway.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/slg-gateway", common::BIN),
    )
    .expect("unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
