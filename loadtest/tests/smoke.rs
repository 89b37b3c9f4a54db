//! A short run of every scenario against a real gateway and demo backend,
//! so a broken scenario (or a gateway regression one of them catches) fails
//! the suite. Sizes are tiny: this checks that each works, not how fast.

use slg_gateway::config::{Config, ServiceConfig};
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_loadtest::{Options, Scenario, Target};
use std::time::Duration;

struct Rig {
    gateway: Option<Gateway>,
    demo: Option<DemoBackend>,
}

impl Rig {
    fn start() -> Rig {
        let demo = DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
        let mut cfg = Config::embedded_default();
        cfg.snapshot_dir = None;
        cfg.listen = "127.0.0.1:0".into();
        cfg.http_listen = "127.0.0.1:0".into();
        cfg.shards = Some(2);
        cfg.demo_backend = None;
        cfg.services.insert(
            "demo".into(),
            ServiceConfig {
                instances: vec![demo.addr.to_string()],
                connections: 1,
            },
        );
        cfg.backend.request_timeout = Duration::from_secs(1);
        let gateway = Gateway::start(cfg).expect("gateway");
        Rig {
            gateway: Some(gateway),
            demo: Some(demo),
        }
    }

    fn opts(&self, scenario: Scenario) -> Options {
        let g = self.gateway.as_ref().expect("gateway");
        let mut o = Options::new(scenario, Target::Gateway, g.client_addr);
        o.http = Some(g.http_addr);
        o.sessions = 20;
        o.duration = Duration::from_millis(800);
        o.gateway_pid = Some(std::process::id());
        o.request_timeout = Duration::from_secs(1);
        o
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.take() {
            g.stop();
        }
        if let Some(d) = self.demo.take() {
            d.stop();
        }
    }
}

fn assert_clean(r: &slg_loadtest::Report) {
    assert_eq!(r.violations, 0, "violations: {:?}", r.violation_samples);
    assert!(r.errors.is_empty(), "client errors: {:?}", r.errors);
    assert!(r.passed, "{}", r.summary());
}

#[test]
fn steady_through_the_gateway_and_direct() {
    let rig = Rig::start();
    let mut o = rig.opts(Scenario::Steady);
    o.inflight = 4;
    o.threads = 2;
    o.sources = vec![
        "127.0.0.1".parse().expect("ip"),
        "127.0.0.2".parse().expect("ip"),
    ];
    let r = slg_loadtest::run(o).expect("run");
    assert_clean(&r);
    assert_eq!(r.sessions_up, 20);
    assert!(r.answered > 100, "answered {}", r.answered);
    assert_eq!(r.answered, r.sent, "every request answered");
    assert_eq!(r.codes.get("OK"), Some(&r.answered));
    assert!(r.latency_us.p50 > 0 && r.latency_us.p50 <= r.latency_us.max);
    assert!(r.gateway.is_some() && r.gateway_cpu_us_per_message.is_some());
    let dir = std::env::temp_dir().join(format!("slg-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    r.write_json(&dir.join("r.json")).expect("json");
    r.write_svg(&dir.join("r.svg")).expect("svg");
    let svg = std::fs::read_to_string(dir.join("r.svg")).expect("svg");
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline"),
        "an SVG with lines"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("r.json")).expect("json"))
            .expect("parses");
    assert_eq!(json["answered"].as_u64(), Some(r.answered));
    let _ = std::fs::remove_dir_all(dir);

    // The same load straight at the backend, at a fixed rate.
    let mut d = rig.opts(Scenario::Steady);
    d.target = Target::Direct;
    d.addr = rig.demo.as_ref().expect("demo").addr;
    d.rate = 50.0;
    let r = slg_loadtest::run(d).expect("run");
    assert_clean(&r);
    assert!(r.answered > 300, "answered {}", r.answered);
}

#[test]
fn login_storm_push_fanout_churn_and_idle() {
    let rig = Rig::start();
    let mut o = rig.opts(Scenario::LoginStorm);
    o.player_base = 10_000;
    let r = slg_loadtest::run(o).expect("login storm");
    assert_clean(&r);
    assert_eq!(r.logins, 20);

    let mut o = rig.opts(Scenario::PushFanout);
    o.player_base = 20_000;
    o.pushes = 5;
    o.push_interval = Duration::from_millis(50);
    o.duration = Duration::from_millis(400);
    let r = slg_loadtest::run(o).expect("push fan-out");
    assert_clean(&r);
    assert_eq!(r.pushes_received, 100);
    assert_eq!(r.extra.get("push_http_delivered_total"), Some(&100.0));
    assert!(r.extra.contains_key("broadcast_full_delivery_us_worst"));

    let mut o = rig.opts(Scenario::Churn);
    o.player_base = 30_000;
    o.churn_every = Duration::from_millis(100);
    o.inflight = 2;
    let r = slg_loadtest::run(o).expect("churn");
    assert_clean(&r);
    assert!(r.resumes > 20, "resumes {}", r.resumes);

    let mut o = rig.opts(Scenario::Idle);
    o.player_base = 40_000;
    o.duration = Duration::from_millis(300);
    let r = slg_loadtest::run(o).expect("idle");
    assert_clean(&r);
    assert_eq!(r.sessions_up, 20);
    assert!(r.extra.contains_key("gateway_rss_per_session_bytes"));
}

#[test]
fn bad_options_are_refused() {
    let rig = Rig::start();
    let mut o = rig.opts(Scenario::PushFanout);
    o.target = Target::Direct;
    assert!(slg_loadtest::run(o).is_err());
    let mut o = rig.opts(Scenario::Steady);
    o.sessions = 0;
    assert!(slg_loadtest::run(o).is_err());
}
