//! A shard's memory budgets on the in-memory harness: all outboxes
//! together (`memory.outboxes`), connection buffers (`memory.buffers`) and
//! the players held (`max_players`). Each budget is small here so that a
//! few players or sessions pass it.

use bytes::Bytes;
use slg_gateway::config::{Budget, Config};
use slg_gateway::protocol::{parse_session_body, Code, Kind};
use slg_gateway::sim::{header, Sim};
use std::time::Duration;

fn config() -> Config {
    let mut cfg = Config::embedded_default();
    cfg.max_frame = 1024;
    cfg.write_queue_bytes = 1028;
    cfg.memory.outboxes = Budget::Unlimited;
    cfg.memory.buffers = Budget::Unlimited;
    cfg
}

/// A 124-byte frame (24 of head, 100 of body) to `player`.
fn push(sim: &mut Sim, player: u64) {
    let counts = sim.push(player, 2001, &[7u8; 100]);
    assert_eq!(counts.delivered + counts.cached, 1);
}

fn token(sim: &mut Sim, c: usize, player: u64) -> Bytes {
    let f = sim.login(c, player, 1);
    let (_, t) = parse_session_body(&f[0].body).expect("SESSION");
    Bytes::copy_from_slice(t)
}

#[test]
fn past_the_outbox_budget_the_largest_outboxes_lose_their_oldest_frames() {
    let mut cfg = config();
    cfg.memory.outboxes = Budget::Bytes(10_000);
    let mut sim = Sim::new(cfg, 1, 1);
    // Three lingering players: their frames wait in the outboxes.
    let mut tokens = Vec::new();
    for p in [1u64, 2, 3] {
        let c = sim.connect(0);
        tokens.push(token(&mut sim, c, p));
        sim.hang_up(c, false);
        sim.run();
    }
    for _ in 0..10 {
        push(&mut sim, 2);
    }
    for _ in 0..5 {
        push(&mut sim, 3);
    }
    let info = |sim: &Sim, p: u64| sim.cores[0].player_info(p).expect("held");
    let small = (info(&sim, 2).outbox_bytes, info(&sim, 3).outbox_bytes);
    for _ in 0..200 {
        push(&mut sim, 1);
        assert!(sim.cores[0].outbox_bytes() <= 10_000, "the budget holds");
    }
    let big = info(&sim, 1);
    assert!(big.evictions > 0 && big.evicted_through > 1, "{big:?}");
    assert!(
        big.outbox_bytes < 10_000 && big.outbox_bytes > 5_000,
        "{big:?}"
    );
    // The small ones kept every frame: the largest went first.
    assert_eq!(
        (info(&sim, 2).outbox_bytes, info(&sim, 3).outbox_bytes),
        small
    );
    assert_eq!((info(&sim, 2).evictions, info(&sim, 3).evictions), (0, 0));
    assert_eq!(
        sim.cores[0].stats.budget_evictions.get(),
        big.evictions,
        "counted"
    );
    // The evicted player's resume from before the cut: RESUME_GAP; the
    // others resume whole.
    let c = sim.connect(0);
    sim.send(c, &header(Kind::Resume, 0, 0, 1), &tokens[0]);
    sim.run();
    let f = sim.recv(c);
    assert_eq!(
        (f[0].header.kind, f[0].header.code),
        (Kind::Error, u16::from(Code::ResumeGap))
    );
    let c = sim.connect(0);
    sim.send(c, &header(Kind::Resume, 0, 0, 1), &tokens[1]);
    sim.run();
    let f = sim.recv(c);
    assert_eq!(f[0].header.kind, Kind::Session);
    assert_eq!(f.len(), 11, "SESSION and all ten frames");
    // Ended players give their bytes back to the shard's total.
    sim.advance(Duration::from_secs(600));
    sim.on_core(0, |core, now| core.handle_tick(now));
    assert!(sim.cores[0].outbox_bytes() <= info(&sim, 2).outbox_bytes + 1_300);
}

#[test]
fn beyond_max_players_a_new_player_is_refused_overloaded_and_a_held_one_is_not() {
    let mut cfg = config();
    cfg.max_players = 2;
    let mut sim = Sim::new(cfg, 1, 1);
    for p in [1u64, 2] {
        let c = sim.connect(0);
        sim.login(c, p, 1);
        sim.hang_up(c, false);
        sim.run();
    }
    let c = sim.connect(0);
    let f = sim.login(c, 3, 1);
    assert_eq!(
        f.iter()
            .map(|f| (f.header.kind, f.header.code))
            .collect::<Vec<_>>(),
        [(Kind::Response, u16::from(Code::Overloaded))]
    );
    assert!(sim.is_open(c), "the session stays, logged out");
    assert_eq!(sim.cores[0].stats.players_refused.get(), 1);
    // A player already held (lingering) logs in as ever.
    let f = sim.login(c, 1, 2);
    assert_eq!(f[0].header.kind, Kind::Session);
    // One ends (BYE): room for the new one.
    sim.send(c, &header(Kind::Bye, 0, 0, 0), &[]);
    sim.run();
    let d = sim.connect(0);
    let f = sim.login(d, 3, 1);
    assert_eq!(f[0].header.kind, Kind::Session);
}

#[test]
fn past_the_buffer_budget_the_sessions_holding_the_most_are_kicked() {
    let mut cfg = config();
    cfg.memory.buffers = Budget::Bytes(8_000);
    let mut sim = Sim::new(cfg, 1, 1);
    let conns: Vec<usize> = (0..4).map(|_| sim.connect(0)).collect();
    let sids: Vec<_> = conns.iter().map(|&c| sim.session_of(c)).collect();
    // What each connection's partial frame holds, as the shell reports it.
    for (sid, bytes) in sids.iter().zip([5_000usize, 3_000, 1_000]) {
        sim.on_core(0, |core, now| core.handle_partial_frame(*sid, bytes, now));
    }
    sim.run();
    let f = sim.recv(conns[0]);
    assert_eq!(
        f.last().map(|f| (f.header.kind, f.header.code)),
        Some((Kind::Kick, u16::from(Code::SlowConsumer)))
    );
    assert!(!sim.is_open(conns[0]));
    assert!(conns[1..].iter().all(|&c| sim.is_open(c)), "the rest fit");
    assert_eq!(sim.cores[0].stats.budget_kicks.get(), 1);
    // Unsent output counts too: a client that reads nothing while output
    // piles up (each session below write_queue_bytes) is the largest
    // holder at the next sweep.
    let stalled = conns[3];
    sim.login(stalled, 9, 1);
    sim.stall(stalled, true);
    for _ in 0..6 {
        push(&mut sim, 9);
    }
    let queued = sim.cores[0].buffer_bytes() - 4_000;
    assert!(queued >= 744, "{queued}");
    // 3,000 + 4,500 of partial frames and the queued output: over.
    sim.on_core(0, |core, now| {
        core.handle_partial_frame(sids[2], 4_500, now)
    });
    sim.on_core(0, |core, now| core.handle_tick(now));
    sim.run();
    assert!(!sim.is_open(conns[2]), "the largest holder");
    assert!(sim.is_open(stalled) && sim.is_open(conns[1]));
    assert_eq!(sim.cores[0].stats.budget_kicks.get(), 2);
    // A frame that finishes gives its bytes back.
    let before = sim.cores[0].buffer_bytes();
    sim.on_core(0, |core, now| core.handle_partial_frame(sids[1], 0, now));
    assert_eq!(sim.cores[0].buffer_bytes(), before - 3_000);
}

#[test]
fn a_session_may_have_only_so_many_request_bytes_in_flight() {
    let mut cfg = config();
    cfg.limits.session_inflight_bytes = 2_500;
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    for r in 2..=4 {
        sim.send(c, &header(Kind::Request, 150, r, 0), &[0u8; 1000]);
    }
    sim.run();
    assert_eq!(
        sim.backend.len(),
        2,
        "2,000 bytes in flight; the third is over"
    );
    let f = sim.recv(c);
    assert_eq!(
        (f[0].header.req_id, f[0].header.code),
        (4, u16::from(Code::Overloaded))
    );
    // An answer gives its bytes back.
    sim.answer(0, 0, 7, b"ok");
    sim.run();
    sim.send(c, &header(Kind::Request, 150, 5, 0), &[0u8; 1000]);
    sim.run();
    assert_eq!(sim.backend.len(), 2);
    // One request always goes, however large: with nothing else in flight.
    let mut cfg = config();
    cfg.limits.session_inflight_bytes = 500;
    let mut sim = Sim::new(cfg, 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    sim.send(c, &header(Kind::Request, 150, 2, 0), &[0u8; 1000]);
    sim.send(c, &header(Kind::Request, 150, 3, 0), &[0u8; 10]);
    sim.run();
    assert_eq!(sim.backend.len(), 1);
    let f = sim.recv(c);
    assert_eq!(
        (f[0].header.req_id, f[0].header.code),
        (3, u16::from(Code::Overloaded))
    );
}
