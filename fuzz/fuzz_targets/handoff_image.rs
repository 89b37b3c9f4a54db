//! The cluster hand-off: the bytes one gateway puts with `put_handover` and
//! the other decodes (`snapshot::Image::decode`, in `cluster::runtime::adopt`
//! and `shard::cluster::arrive_clustered`) and loads into its player table
//! (`Core::restore`, `Player::from_image`); then the player's client comes
//! back with RESUME.
//!
//! Byte 0 picks the input's shape (a payload behind a header that passes,
//! or a structured image), byte 1 the outbox bounds of the taking gateway.
//! Checked, for every player of an image that decodes: no panic; the
//! loaded player keeps its id, seqs and token, its outbox within the new
//! bounds and gap-free up to its last seq; snapshotting it again gives an
//! image that decodes; a resume with its own token from any seq is served
//! exactly when the outbox holds every frame after it, and then replays
//! them in order. Through the in-memory gateway (`sim`): the restored
//! player is held unless its linger ran out, a RESUME gets `SESSION`
//! R = last followed by frames R+1.. that a client can decode, and the
//! next push takes the next seq.
#![no_main]

use arbitrary::Unstructured;
use libfuzzer_sys::fuzz_target;
use slg_gateway::config::Config;
use slg_gateway::player::{Player, TOKEN_LEN};
use slg_gateway::protocol::{parse_session_body, Code, Header, Kind};
use slg_gateway::sim::Sim;
use slg_gateway::snapshot::{Image, PlayerImage};
use slg_gateway_fuzz::image;
use std::time::{Duration, Instant};

/// Outbox bounds of the gateway that takes the players over.
const BOUNDS: [(usize, usize); 4] = [(1024, 4 << 20), (2, 1 << 20), (4, 100), (1, 1)];
const LINGER: Duration = Duration::from_secs(120);

fuzz_target!(|data: &[u8]| {
    let [mode, bounds, rest @ ..] = data else {
        return;
    };
    let bytes = if mode % 2 == 0 {
        image::wrap(rest)
    } else {
        let mut u = Unstructured::new(rest);
        match image::image(&mut u) {
            Ok(img) => img.encode().expect("an image encodes"),
            Err(_) => return,
        }
    };
    let Ok(img) = Image::decode(&bytes) else {
        return;
    };
    if slg_gateway_fuzz::trace() {
        eprintln!("{img:#?}");
    }
    let (max_frames, max_bytes) = BOUNDS[usize::from(*bounds) % BOUNDS.len()];
    let now = Instant::now();
    for p in &img.players {
        check_player(p, max_frames, max_bytes, now);
    }
    check_core(&img, max_frames, max_bytes, *bounds);
});

fn token_of(p: &PlayerImage) -> [u8; TOKEN_LEN] {
    let mut t = [0u8; TOKEN_LEN];
    t[..8].copy_from_slice(&p.id.to_be_bytes());
    t[8..].copy_from_slice(&p.token_secret);
    t
}

/// Seqs kept in the outbox, oldest first.
fn kept(pl: &Player) -> Vec<u64> {
    pl.outbox.iter().map(|(s, _)| s).collect()
}

fn check_player(img: &PlayerImage, max_frames: usize, max_bytes: usize, now: Instant) {
    let unix = image::NOW_UNIX_MS;
    let pl = Player::from_image(img, max_frames, max_bytes, now, unix);
    assert_eq!(
        (pl.id, pl.last_seq(), pl.acked()),
        (img.id, img.seq, img.acked)
    );
    assert_eq!(pl.token().0, img.token_secret);
    assert!(pl.outbox.len() <= max_frames && pl.outbox.bytes() <= max_bytes);
    assert!(pl.outbox.evicted_through() >= img.evicted_through);
    let seqs = kept(&pl);
    for w in seqs.windows(2) {
        assert_eq!(w[0] + 1, w[1], "outbox seqs not consecutive after loading");
    }
    if let Some(&last) = seqs.last() {
        assert_eq!(last, img.seq, "the outbox does not end at the last seq");
        assert!(seqs[0] > pl.outbox.evicted_through());
    }
    // A loaded player snapshots to an image that loads.
    let again = Image {
        taken_unix_ms: unix,
        shards: 1,
        players: vec![pl.to_image(now, unix)],
    };
    let bytes = again.encode().expect("an image encodes");
    if let Err(e) = Image::decode(&bytes) {
        panic!("a loaded player snapshots to an image that does not load: {e}");
    }
    // Resume with its own token from a few seqs.
    let token = token_of(img);
    let valid = img.token_expires_unix_ms > unix;
    assert_eq!(pl.token_valid(&token, now), valid);
    for last in [
        img.acked,
        img.seq,
        img.evicted_through,
        img.acked.saturating_add(1),
    ] {
        let mut p = pl.clone();
        let holds = last <= img.seq
            && p.outbox.evicted_through() <= last
            && kept(&p).first().map_or(last >= img.seq, |&f| f <= last + 1);
        match p.resume(&token, last, now) {
            Ok(()) => {
                assert!(valid && holds, "resume from {last} served");
                let replay: Vec<u64> = kept(&p).into_iter().filter(|&s| s > last).collect();
                let want: Vec<u64> = (last + 1..=img.seq).collect();
                assert_eq!(replay, want, "a resume from {last} would replay a gap");
                assert_eq!(p.acked(), img.acked.max(last));
            }
            Err(e) => assert!(!(valid && holds), "resume from {last} refused: {e}"),
        }
    }
}

/// Through the in-memory gateway: restore, RESUME, replay, push.
fn check_core(img: &Image, max_frames: usize, max_bytes: usize, pick: u8) {
    let mut cfg = Config::embedded_default();
    cfg.outbox.max_frames = max_frames;
    cfg.outbox.max_bytes = max_bytes;
    cfg.player_linger = LINGER;
    let shards = 1 + usize::from(pick >> 4) % 3;
    let mut sim = Sim::new(cfg, shards, u64::from(pick));
    let unix = image::NOW_UNIX_MS;
    for p in &img.players {
        let home = sim.home(p.id);
        sim.on_core(home, |c, now| c.restore(std::slice::from_ref(p), now, unix));
    }
    let Some(id) = img.players.last().map(|p| p.id) else {
        return;
    };
    // The image the core keeps for `id`: the last one whose linger had
    // not run out (an image may name a player twice).
    let now = sim.now;
    let kept = img.players.iter().rev().find(|q| {
        q.id == id && !Player::from_image(q, max_frames, max_bytes, now, unix).expired(now, LINGER)
    });
    let info = sim.home_core(id).player_info(id);
    let held = info.is_some();
    let (Some(p), Some(info)) = (kept, info) else {
        assert_eq!(kept.is_some(), held, "player {id} held: {held}");
        return;
    };
    assert_eq!((info.seq, info.acked), (p.seq, p.acked));
    let conn = sim.connect(0);
    let last = p.acked;
    let token = token_of(p);
    // What the player itself says of this resume, at the gateway's clock.
    let served = Player::from_image(p, max_frames, max_bytes, sim.now, unix)
        .resume(&token, last, sim.now)
        .is_ok();
    let mut h = Header::new(Kind::Resume);
    h.seq = last;
    sim.send(conn, &h, &token);
    sim.run();
    let frames = sim.recv(conn);
    let Some(first) = frames.first() else {
        panic!("no answer to a RESUME");
    };
    match first.header.kind {
        Kind::Session => {
            assert!(served, "the core served a resume the player refuses");
            assert_eq!((first.header.seq, first.header.code), (last, 0));
            let (id, token) = parse_session_body(&first.body).expect("a SESSION body");
            assert_eq!((id, token.len()), (p.id, TOKEN_LEN));
            for f in &frames[1..] {
                assert!(
                    matches!(f.header.kind, Kind::Response | Kind::Push),
                    "a replayed {:?} frame",
                    f.header.kind
                );
            }
            let seqs: Vec<u64> = frames[1..].iter().map(|f| f.header.seq).collect();
            let want: Vec<u64> = (last + 1..=p.seq).collect();
            assert_eq!(seqs, want, "the replay after RESUME from {last}");
            sim.push(p.id, 9, b"after");
            sim.run();
            let next = sim.recv(conn);
            let seqs: Vec<u64> = next.iter().map(|f| f.header.seq).collect();
            assert_eq!(seqs, vec![p.seq + 1], "the push after the replay");
        }
        Kind::Error => {
            let code = first.header.code;
            assert!(
                code == u16::from(Code::ResumeRejected) || code == u16::from(Code::ResumeGap),
                "RESUME answered with ERROR {code:#x}"
            );
            assert!(!served, "the core refused a resume the player serves");
        }
        other => panic!("RESUME answered with {other:?}"),
    }
}
