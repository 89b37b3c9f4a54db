//! A player's migration to another gateway, step by step on the in-memory
//! harness: the core's side of `shard::cluster::migrate_player` (hold the
//! session's reads and the player's pushes, let requests in flight finish,
//! hand over an image, then REDIRECT or roll back). The target gateway is a
//! second harness that restores the image, as the cluster's hand-over does,
//! and the client resumes there with the token the REDIRECT carried.

use bytes::Bytes;
use slg_gateway::config::Config;
use slg_gateway::core::Event;
use slg_gateway::error::{Error, Origin};
use slg_gateway::protocol::{parse_redirect_body, Code, Frame, Kind};
use slg_gateway::sim::{header, Sim};
use slg_gateway::snapshot::Image;

const ASK: u32 = 150;
const PUSH: u32 = 2001;

fn shape(frames: &[Frame]) -> Vec<(Kind, u16, u64)> {
    frames
        .iter()
        .map(|f| (f.header.kind, f.header.code, f.header.seq))
        .collect()
}

#[test]
fn a_migration_holds_reads_and_pushes_and_a_rollback_releases_them_in_order() {
    let mut sim = Sim::new(Config::embedded_default(), 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    sim.on_core(0, |core, _| core.begin_migration(7))
        .expect("a migration begins");
    // A second migration of the same player is refused.
    let again = sim.on_core(0, |core, _| core.begin_migration(7));
    assert!(matches!(
        again,
        Err(Error {
            code: Code::Migrating,
            ..
        })
    ));
    // The session reads nothing more; a push waits with the migration.
    sim.send(c, &header(Kind::Request, ASK, 2, 0), b"held");
    sim.run();
    assert!(
        sim.pending_of(c, 2).is_none(),
        "a held session reads nothing"
    );
    let counts = sim.push(7, PUSH, b"during");
    assert_eq!(counts.cached, 1);
    sim.run();
    assert!(sim.recv(c).is_empty());
    // The target refused: everything goes on here, in order.
    let why = Error::new(Origin::Cluster, Code::Migrating, true, "target full");
    sim.take_events();
    sim.on_core(0, |core, now| core.rollback_migration(7, &why, now));
    sim.run();
    assert_eq!(shape(&sim.recv(c)), [(Kind::Push, 0, 2)]);
    let i = sim.pending_of(c, 2).expect("the held request is read now");
    sim.answer(i, 0, 0, b"held");
    sim.run();
    assert_eq!(shape(&sim.recv(c)), [(Kind::Response, 0, 3)]);
    assert_eq!(
        sim.cores[0]
            .metrics
            .errors_of(Origin::Cluster, Code::Migrating.into()),
        1
    );
    assert!(sim
        .take_events()
        .iter()
        .any(|(_, e)| matches!(e, Event::MigrationRolledBack { player: 7, .. })));
}

#[test]
fn a_migration_waits_for_requests_in_flight() {
    let mut sim = Sim::new(Config::embedded_default(), 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    sim.send(c, &header(Kind::Request, ASK, 2, 0), b"out");
    sim.run();
    sim.on_core(0, |core, _| core.begin_migration(7))
        .expect("a migration begins");
    assert_eq!(sim.cores[0].player_inflight(7), 1);
    let i = sim.pending_of(c, 2).expect("the request is at the backend");
    sim.answer(i, 0, 0, b"out");
    sim.run();
    // Its answer is in the stream the image carries.
    assert_eq!(sim.cores[0].player_inflight(7), 0);
    assert_eq!(shape(&sim.recv(c)), [(Kind::Response, 0, 2)]);
}

#[test]
fn a_completed_migration_redirects_and_the_client_resumes_at_the_target() {
    let mut source = Sim::new(Config::embedded_default(), 1, 1);
    let c = source.connect(0);
    source.login(c, 7, 1);
    source.push(7, PUSH, b"before");
    source.run();
    assert_eq!(shape(&source.recv(c)), [(Kind::Push, 0, 2)]);
    source
        .on_core(0, |core, _| core.begin_migration(7))
        .expect("a migration begins");
    source.push(7, PUSH, b"during");
    let (image, held) = {
        let now = source.now;
        let core = &mut source.cores[0];
        let image = core
            .migration_image(7, now, 1_000)
            .expect("the player is here")
            .expect("its image encodes");
        let held = core.complete_migration(7, "10.0.0.2:7000", now);
        (image, held)
    };
    source.run();
    // REDIRECT to the target with a token, then the connection closes; the
    // player is gone from here and the push held meanwhile follows it.
    let frames = source.recv(c);
    assert_eq!(shape(&frames), [(Kind::Redirect, 0, 0)]);
    let (addr, token) = parse_redirect_body(&frames[0].body).expect("a REDIRECT body");
    assert_eq!(addr, "10.0.0.2:7000");
    let token = Bytes::copy_from_slice(token);
    assert!(!source.is_open(c));
    assert!(!source.cores[0].holds(7));
    assert_eq!(held, [(PUSH, Bytes::from_static(b"during"))]);

    // The target restores the image, as the cluster's hand-over does.
    let mut target = Sim::new(Config::embedded_default(), 1, 2);
    let img = Image::decode(&image).expect("the image decodes");
    let now = target.now;
    target.cores[0].restore(&img.players, now, 1_000);
    for (msg_id, body) in held {
        target.push(7, msg_id, &body);
    }
    let t = target.connect(0);
    target.send(t, &header(Kind::Resume, 0, 0, 2), &token);
    target.run();
    // R = 2, then the held push with the next seq: no gap, no repeat.
    assert_eq!(
        shape(&target.recv(t)),
        [(Kind::Session, 0, 2), (Kind::Push, 0, 3)]
    );
}
