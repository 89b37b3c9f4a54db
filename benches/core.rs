//! Criterion micro-benchmarks of the gateway's hot paths: the frame codec,
//! the player's outbox (sequence / ack / resume check), the router, and the
//! shard core alone (`core/*`: the user-space work of one relayed
//! request/response pair and of one pushed frame, with no socket, set up on
//! the in-memory harness).
//!
//! Run with `cargo bench --bench core` (add `-- --quick` for a short run).

use std::cell::Cell;
use std::hint::black_box;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use slg_gateway::config::{Balance, Config, RouteConfig};
use slg_gateway::player::{Outbox, Player, SeqFrame};
use slg_gateway::protocol::{encode, frame_len, Decoder, Header, Kind, Link, DEFAULT_MAX_FRAME};
use slg_gateway::router::{pick, Router};

/// Deterministic pseudo-random numbers (splitmix64), so every run measures
/// the same inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..=max`.
    fn upto(&mut self, max: u32) -> u32 {
        (self.next() % (u64::from(max) + 1)) as u32
    }
}

fn request_header() -> Header {
    Header {
        kind: Kind::Request,
        flags: 0,
        code: 0,
        msg_id: 150,
        req_id: 42,
        seq: 7,
    }
}

fn push_header() -> Header {
    let mut h = Header::new(Kind::Push);
    h.msg_id = 2001;
    h
}

/// `count` encoded REQUEST frames with `body_len`-byte bodies, back to back.
fn wire(count: usize, body_len: usize) -> Vec<u8> {
    let body = vec![0xa5u8; body_len];
    let mut out = BytesMut::with_capacity(count * frame_len(body_len));
    for i in 0..count {
        let mut h = request_header();
        h.req_id = i as u32;
        encode(&mut out, &h, &body);
    }
    out.to_vec()
}

/// Decodes every frame in `buf`; returns how many.
fn decode_all(d: &Decoder, buf: &mut BytesMut) -> usize {
    let mut n = 0;
    while let Some(f) = d.decode(buf).expect("valid frame") {
        black_box(&f);
        n += 1;
    }
    n
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let d = Decoder::new(Link::ClientToGateway, DEFAULT_MAX_FRAME);

    // Encode one frame with a 100-byte body into a reused buffer.
    let body = vec![0x5au8; 100];
    let h = request_header();
    let mut out = BytesMut::with_capacity(4096);
    g.throughput(Throughput::Bytes(frame_len(body.len()) as u64));
    g.bench_function("encode/100", |b| {
        b.iter(|| {
            out.clear();
            encode(&mut out, black_box(&h), black_box(&body));
            black_box(&out);
        })
    });

    // Decode 64 batched frames of 100-byte bodies from one read buffer. The
    // buffer is rebuilt outside the timing and returned, so that criterion
    // drops it (and its allocation) outside the timing too.
    let batch = wire(64, 100);
    g.throughput(Throughput::Elements(64));
    g.bench_function("decode_batch/64x100", |b| {
        b.iter_batched(
            || BytesMut::from(&batch[..]),
            |mut buf| {
                let n = decode_all(&d, &mut buf);
                debug_assert_eq!(n, 64);
                (n, buf)
            },
            BatchSize::SmallInput,
        )
    });

    // Decode one frame, by body size.
    for body_len in [16usize, 1024, 16384] {
        let one = wire(1, body_len);
        g.throughput(Throughput::Bytes(one.len() as u64));
        g.bench_with_input(BenchmarkId::new("decode", body_len), &one, |b, one| {
            b.iter_batched(
                || BytesMut::from(&one[..]),
                |mut buf| {
                    let n = decode_all(&d, &mut buf);
                    (n, buf)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// Frames kept unacknowledged at steady state.
const IN_FLIGHT: u64 = 100;

fn outbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("outbox");
    g.throughput(Throughput::Elements(1));
    let body = vec![0x33u8; 100];

    // Player::sequence of a 100-byte PUSH, the client acking so that the
    // outbox stays at IN_FLIGHT frames (each iteration: sequence + ack of 1).
    g.bench_function("player_sequence_ack/100B", |b| {
        let mut p = Player::new(1, 4096, 16 << 20, Instant::now());
        for _ in 0..IN_FLIGHT {
            p.sequence(push_header(), Bytes::copy_from_slice(&body), |_| ());
        }
        b.iter(|| {
            // A unicast frame: its body copied as the core copies an answer's.
            let evicted = p.sequence(
                black_box(push_header()),
                Bytes::copy_from_slice(black_box(&body)),
                |f| {
                    black_box(f);
                },
            );
            black_box(evicted);
            p.ack(p.last_seq() - IN_FLIGHT).expect("ack within range");
        });
        assert_eq!(p.outbox.len() as u64, IN_FLIGHT);
    });

    // Outbox::push of a pre-encoded frame + ack of the oldest, at steady state.
    let frame = SeqFrame::new(&push_header(), Bytes::copy_from_slice(&body));
    g.bench_function("push_ack/steady", |b| {
        let mut o = Outbox::new(4096, 16 << 20);
        let mut seq = 0u64;
        for _ in 0..IN_FLIGHT {
            seq += 1;
            o.push(seq, frame.clone());
        }
        b.iter(|| {
            seq += 1;
            black_box(o.push(seq, frame.clone()));
            o.ack(seq - IN_FLIGHT);
        });
        assert_eq!(o.len() as u64, IN_FLIGHT);
    });

    // 64 pushes then one ack that frees all 64 (a batched client ACK).
    g.throughput(Throughput::Elements(64));
    g.bench_function("push64_ack64", |b| {
        let mut o = Outbox::new(4096, 16 << 20);
        let mut seq = 0u64;
        for _ in 0..IN_FLIGHT {
            seq += 1;
            o.push(seq, frame.clone());
        }
        b.iter(|| {
            for _ in 0..64 {
                seq += 1;
                o.push(seq, frame.clone());
            }
            o.ack(seq - IN_FLIGHT);
        });
        assert_eq!(o.len() as u64, IN_FLIGHT);
    });

    // Resume check: an outbox bounded to IN_FLIGHT frames after 1000 pushes
    // holds seqs 901..=1000 and has evicted through 900.
    g.throughput(Throughput::Elements(1));
    let mut o = Outbox::new(IN_FLIGHT as usize, 16 << 20);
    for seq in 1..=1000 {
        o.push(seq, frame.clone());
    }
    let last = 1000u64;
    assert!(o.holds_after(950, last) && !o.holds_after(500, last));
    for (name, from) in [("hit", 950u64), ("gap", 500), ("caught_up", 1000)] {
        g.bench_with_input(BenchmarkId::new("holds_after", name), &from, |b, &from| {
            b.iter(|| o.holds_after(black_box(from), black_box(last)))
        });
    }
    g.finish();
}

/// The embedded default config (4 routes over msg_ids 1..=200) plus
/// `extra` more 10-wide routes from 1000 on, 16 apart (gaps between them).
fn router_with(extra: u32) -> (Router, u32) {
    let mut cfg = Config::embedded_default();
    cfg.snapshot_dir = None;
    let service = cfg.routes[0].service.clone();
    let balances = [Balance::RoundRobin, Balance::HashPlayer, Balance::Broadcast];
    for k in 0..extra {
        let first = 1000 + 16 * k;
        cfg.routes.push(RouteConfig {
            msgs: (first, first + 9),
            service: service.clone(),
            auth: true,
            login: false,
            balance: balances[(k % 3) as usize],
            idempotent: false,
            order: Default::default(),
            group: None,
        });
    }
    cfg.validate().expect("bench config is valid");
    let router = Router::new(&cfg);
    let max = router.routes().iter().map(|r| r.last).max().unwrap_or(0);
    (router, max)
}

/// Lookups (and picks) per iteration of the router benches.
const BATCH: usize = 1024;

fn router(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut rng = Rng(0x5eed);

    for extra in [0u32, 252] {
        let (r, max) = router_with(extra);
        let n = r.routes().len();
        assert_eq!(n, 4 + extra as usize);
        // msg_ids uniform over 0..=the highest routed id (hits and misses).
        let ids: Vec<u32> = (0..BATCH).map(|_| rng.upto(max)).collect();
        g.bench_with_input(BenchmarkId::new("lookup", n), &ids, |b, ids| {
            b.iter(|| {
                let mut hits = 0usize;
                for &id in ids {
                    if let Some(route) = r.lookup(black_box(id)) {
                        hits += route.service + 1;
                    }
                }
                hits
            })
        });
    }

    // Rendezvous-hash pick among 8 usable instances.
    let players: Vec<u64> = (0..BATCH).map(|_| rng.next() | 1).collect();
    let cursor = Cell::new(0);
    g.bench_with_input(
        BenchmarkId::new("pick_hash_player", 8),
        &players,
        |b, players| {
            b.iter(|| {
                let mut acc = 0usize;
                for &p in players {
                    acc += pick(Balance::HashPlayer, black_box(p), 8, &cursor, |_| true)
                        .expect("an instance is usable");
                }
                acc
            })
        },
    );
    g.finish();
}

/// A core with one logged-in session (player 7), from the harness.
fn logged_in_core() -> (slg_gateway::sim::Sim, slg_gateway::session::SessionId) {
    let mut sim = slg_gateway::sim::Sim::new(Config::embedded_default(), 1, 1);
    let c = sim.connect(0);
    sim.login(c, 7, 1);
    let sid = sim.session_of(c);
    (sim, sid)
}

/// Write what the core queued for `sid` (as the shell does at the end of
/// a batch: straight from the queue, to a socket that takes it all).
fn drain_output(core: &mut slg_gateway::core::Core, sid: u64, now: Instant) -> usize {
    while core.poll_wake().is_some() {}
    while core.poll_event().is_some() {}
    let mut n = 0;
    core.write_now(sid, now, |b| {
        n = black_box(b).len();
        Ok(n)
    });
    n
}

/// The client acknowledges every 64 frames, as real ones do now and then
/// (the outbox stays small).
fn ack_now_and_then(core: &mut slg_gateway::core::Core, sid: u64, seq: u64, now: Instant) {
    if seq.is_multiple_of(64) {
        let mut ack = Header::new(Kind::Ack);
        ack.seq = seq;
        let frame = slg_gateway::protocol::Frame {
            header: ack,
            body: Bytes::new(),
        };
        core.handle_frame(sid, frame, now);
    }
}

fn core(c: &mut Criterion) {
    use slg_gateway::core::Answer;
    use slg_gateway::protocol::Frame;
    let mut g = c.benchmark_group("core");
    g.throughput(Throughput::Elements(1));

    // REQUEST in, forward out, answer in, sequenced RESPONSE written.
    let (mut sim, sid) = logged_in_core();
    let now = sim.now;
    let core = &mut sim.cores[0];
    let body = Bytes::from_static(&[0x5a; 64]);
    let mut seq = 1u64;
    let mut req_id = 10u32;
    g.bench_function("request_response", |b| {
        b.iter(|| {
            req_id = req_id.wrapping_add(1);
            let mut h = request_header();
            h.req_id = req_id;
            core.handle_frame(
                sid,
                Frame {
                    header: h,
                    body: body.clone(),
                },
                now,
            );
            let f = core.poll_forward().expect("forwarded");
            let a = Answer {
                from_backend: true,
                code: 0,
                msg_id: f.header.msg_id,
                player: 0,
                body: f.body,
            };
            core.handle_answer(f.asker, a, now);
            seq += 1;
            drain_output(core, sid, now);
            ack_now_and_then(core, sid, seq, now);
        })
    });

    // One PUSH to an online player, written.
    let (mut sim, sid) = logged_in_core();
    let now = sim.now;
    let core = &mut sim.cores[0];
    let mut seq = 1u64;
    g.bench_function("push", |b| {
        b.iter(|| {
            let counts = core.handle_push(&[7], 2001, &[0xa5; 64], now);
            black_box(counts);
            seq += 1;
            drain_output(core, sid, now);
            ack_now_and_then(core, sid, seq, now);
        })
    });
    g.finish();
}

criterion_group!(benches, codec, outbox, router, core);
criterion_main!(benches);
