//! The load tester catches a broken gateway: for each kind of fault the
//! fault relay can plant, a run of steady, push-fanout and churn through
//! the relay must fail, with a violation that names the fault. (A stale
//! replay after a resume can only meet sessions that resume: churn.)

use slg_gateway::config::{Config, ServiceConfig};
use slg_gateway::demo::DemoBackend;
use slg_gateway::gateway::Gateway;
use slg_loadtest::fault::{Fault, FaultRelay, Plan};
use slg_loadtest::{Options, Report, Scenario, Target};
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
        Rig {
            gateway: Some(Gateway::start(cfg).expect("gateway")),
            demo: Some(demo),
        }
    }

    /// Run `scenario` through a relay that plants `fault`.
    fn through(
        &self,
        fault: Fault,
        scenario: Scenario,
        player_base: u64,
    ) -> (Report, Option<String>) {
        let g = self.gateway.as_ref().expect("gateway");
        let seed = player_base ^ 0x5EED;
        let relay = FaultRelay::start(g.client_addr, Plan::seeded(fault, seed)).expect("relay");
        let mut o = Options::new(scenario, Target::Gateway, relay.addr);
        o.http = Some(g.http_addr);
        o.sessions = 8;
        o.player_base = player_base;
        o.request_timeout = Duration::from_secs(1);
        o.inflight = 4;
        match scenario {
            Scenario::Steady => o.duration = Duration::from_millis(600),
            Scenario::PushFanout => {
                o.pushes = 30;
                o.push_interval = Duration::from_millis(20);
                o.duration = Duration::from_millis(30 * 20 + 200);
            }
            Scenario::Churn => {
                o.duration = Duration::from_millis(1500);
                o.churn_every = Duration::from_millis(100);
                o.inflight = 2;
            }
            _ => unreachable!("not a scenario these tests plant faults in"),
        }
        let r = slg_loadtest::run(o).expect("run");
        let fired = relay.fired();
        relay.stop();
        (r, fired)
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

fn caught(fault: Fault) {
    let rig = Rig::start();
    let scenarios: &[Scenario] = if fault == Fault::StaleReplay {
        &[Scenario::Churn]
    } else {
        &[Scenario::Steady, Scenario::PushFanout, Scenario::Churn]
    };
    for (n, &scenario) in scenarios.iter().enumerate() {
        let base = 100_000 * (fault as u64 + 1) + 10_000 * n as u64;
        let (r, fired) = rig.through(fault, scenario, base);
        let fired = fired
            .unwrap_or_else(|| panic!("{scenario:?}: the relay never planted {}", fault.name()));
        eprintln!("{scenario:?}: planted {fired}");
        assert!(
            !r.passed,
            "{scenario:?} passed with {fired}:\n{}",
            r.summary()
        );
        assert!(
            r.violation_samples
                .iter()
                .any(|v| v.contains(fault.symptom())),
            "{scenario:?}: no violation names {} ({:?}) after {fired}:\n{}",
            fault.name(),
            fault.symptom(),
            r.summary()
        );
    }
}

#[test]
fn a_dropped_frame_is_reported_lost() {
    caught(Fault::Drop);
}

#[test]
fn a_duplicated_frame_is_reported_repeated() {
    caught(Fault::Duplicate);
}

#[test]
fn swapped_frames_are_reported_out_of_order() {
    caught(Fault::Swap);
}

#[test]
fn a_rewritten_seq_is_reported_as_two_frames_on_one_seq() {
    caught(Fault::RewriteSeq);
}

#[test]
fn an_answer_to_the_wrong_req_id_is_reported_misdelivered() {
    caught(Fault::WrongReqId);
}

#[test]
fn a_stale_frame_after_a_resume_is_reported_stale() {
    caught(Fault::StaleReplay);
}

#[test]
fn a_relay_that_plants_nothing_passes_every_check() {
    // The relay itself is faithful: with the fault never armed, runs pass.
    let rig = Rig::start();
    let g = rig.gateway.as_ref().expect("gateway");
    for (n, scenario) in [Scenario::Steady, Scenario::PushFanout, Scenario::Churn]
        .into_iter()
        .enumerate()
    {
        let relay = FaultRelay::start(
            g.client_addr,
            Plan {
                fault: Fault::Drop,
                after: u64::MAX,
                every: None,
            },
        )
        .expect("relay");
        let mut o = Options::new(scenario, Target::Gateway, relay.addr);
        o.http = Some(g.http_addr);
        o.sessions = 8;
        o.player_base = 900_000 + 10_000 * n as u64;
        o.request_timeout = Duration::from_secs(1);
        o.duration = Duration::from_millis(800);
        o.pushes = 10;
        o.push_interval = Duration::from_millis(20);
        o.churn_every = Duration::from_millis(100);
        let r = slg_loadtest::run(o).expect("run");
        assert!(
            relay.relayed() > 0,
            "{scenario:?}: nothing went through the relay"
        );
        relay.stop();
        assert!(
            r.passed,
            "{scenario:?} through a faithful relay:\n{}",
            r.summary()
        );
    }
}
