//! Live upgrade (issue 20): the listening sockets of a running gateway
//! handed to another, with no connection refused or lost while the old
//! one stops accepting and the new one starts.

mod common;

use common::{config, Harness};
use slg_gateway::gateway::Gateway;
use slg_gateway::upgrade::Inherited;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Connect, log in as `player`, make one request: every step must work.
fn probe(addr: std::net::SocketAddr, player: u64) -> Result<(), String> {
    let mut c = slg_gateway::client::Client::connect(addr).map_err(|e| format!("connect: {e}"))?;
    c.timeout = Duration::from_secs(10);
    c.login_demo(player).map_err(|e| format!("login: {e}"))?;
    let f = c.request(100, b"x").map_err(|e| format!("request: {e}"))?;
    if f.header.code != 0 {
        return Err(format!("request answered code {}", f.header.code));
    }
    Ok(())
}

#[test]
fn listeners_handed_to_another_gateway_refuse_no_connection() {
    let mut old = Harness::start(2);
    let demo = old.demo.as_ref().expect("demo").addr;
    let gw = old.gateway.as_ref().expect("running");
    let addr = gw.client_addr;
    probe(addr, 1).expect("the old gateway serves");

    // Clients connect all along, from two threads.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let probes: Vec<_> = (0..2u64)
        .map(|t| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            std::thread::spawn(move || {
                let mut player = 1000 * (t + 1);
                while !stop.load(Ordering::Acquire) {
                    player += 1;
                    match probe(addr, player) {
                        Ok(()) => {
                            ok.fetch_add(1, Ordering::AcqRel);
                        }
                        Err(e) => failures.lock().expect("lock").push(e),
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));

    // A second gateway on the first one's sockets (more shards than it: the
    // extra one binds its own socket into the same group), accepting nothing
    // until the first has stopped.
    let inherited = Inherited {
        listeners: gw.listeners().expect("listeners"),
    };
    assert_eq!(
        inherited.listeners.len(),
        4,
        "client and HTTP port of 2 shards"
    );
    let new = Gateway::start_on(config(demo, 3), Some(inherited)).expect("starts on them");
    assert_eq!(
        (new.client_addr, new.http_addr),
        (gw.client_addr, gw.http_addr)
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        gw.stop_accepting(Duration::from_secs(5)),
        "every accept loop ended"
    );
    new.open_accept(true, true);
    let before = ok.load(Ordering::Acquire);
    std::thread::sleep(Duration::from_millis(500));
    // The old gateway no longer accepts: new connections are the new one's.
    let served = ok.load(Ordering::Acquire) - before;
    assert!(served > 0, "connections after the hand-over are served");
    let (status, _) = common::http(new.http_addr, "GET", "/healthz", b"");
    assert_eq!(status, 200);
    let accepted_by_old = |g: &Gateway| g.counter("accepted");
    let old_accepted = accepted_by_old(gw);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        accepted_by_old(gw),
        old_accepted,
        "the old gateway accepts nothing more"
    );
    stop.store(true, Ordering::Release);
    for p in probes {
        p.join().expect("probe thread");
    }
    let failures = failures.lock().expect("lock");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The old gateway's sockets close with it; the new one still listens.
    old.gateway.take().expect("running").stop();
    probe(addr, 99).expect("the new gateway serves after the old one stopped");
    new.stop();
}

/// The next frame of `c`, which must continue its stream (seq last + 1)
/// and be neither a KICK nor a SESSION.
fn next_in_order(
    c: &mut slg_gateway::client::Client,
    last: &mut u64,
) -> slg_gateway::protocol::Frame {
    use slg_gateway::protocol::Kind;
    let f = c.recv().expect("a frame");
    assert!(
        !matches!(f.header.kind, Kind::Kick | Kind::Session),
        "unexpected {:?}",
        f.header
    );
    assert_eq!(f.header.seq, *last + 1, "{:?}", f.header);
    *last = f.header.seq;
    f
}

#[test]
fn sessions_and_players_move_to_a_new_gateway_without_a_word_to_the_clients() {
    use slg_gateway::protocol::Kind;
    use slg_gateway::upgrade::{channel::Channel, hand_over, take_over, Deadlines};
    let mut old = Harness::start(2);
    let demo = old.demo.as_ref().expect("demo").addr;
    let gw = old.gateway.as_ref().expect("running");
    let mut clients = Vec::new();
    for player in 1..=40u64 {
        let mut c = old.client();
        let l = c.login_demo(player).expect("login");
        let mut last = l.response.header.seq;
        c.send_request(100, b"before").expect("send");
        let f = next_in_order(&mut c, &mut last);
        assert_eq!(f.header.kind, Kind::Response);
        clients.push((player, c, last));
    }
    // A player whose client went away: it lingers, and must move too.
    let mut gone = old.client();
    let gone_login = gone.login_demo(500).expect("login");
    drop(gone);
    std::thread::sleep(Duration::from_millis(100));
    // A push everyone gets before the hand-over.
    let list: Vec<String> = (1..=40u64).map(|p| p.to_string()).collect();
    let (status, _) = common::http(
        gw.http_addr,
        "POST",
        &format!("/v1/push?players={}&msg=9001", list.join(",")),
        b"p1",
    );
    assert_eq!(status, 200);
    for (_, c, last) in clients.iter_mut() {
        let f = next_in_order(c, last);
        assert_eq!(f.header.kind, Kind::Push);
    }

    let (mut ours, theirs) = Channel::pair().expect("pair");
    let new = std::thread::spawn(move || {
        let mut ch = Channel::new(theirs);
        take_over(config(demo, 3), &mut ch).expect("take over")
    });
    let report = hand_over(gw, &mut ours, Deadlines::default(), None).expect("hand over");
    let new = new.join().expect("new side");
    assert_eq!(report.sessions, 40, "{report:?}");
    assert_eq!(report.players, 41, "{report:?}");
    assert_eq!(gw.counter("upgraded_out"), 40);
    assert_eq!(new.counter("upgraded_in"), 40);
    old.gateway.take().expect("running").stop();

    // Each stream goes on where it was, on the new gateway.
    for (_, c, last) in clients.iter_mut() {
        c.send_request(100, b"after").expect("send");
        let f = next_in_order(c, last);
        assert_eq!(f.header.kind, Kind::Response);
        assert_eq!(&f.body[..], b"after");
    }
    let (status, body) = common::http(
        new.http_addr,
        "POST",
        "/v1/push?players=1,2,500&msg=9002",
        b"p2",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"delivered\":2") && body.contains("\"cached\":1"),
        "{body}"
    );
    for (player, c, last) in clients.iter_mut() {
        if *player <= 2 {
            let f = next_in_order(c, last);
            assert_eq!((f.header.kind, &f.body[..]), (Kind::Push, &b"p2"[..]));
        }
    }
    // The lingering player resumes there with the token it had.
    let mut back = slg_gateway::client::Client::connect(new.client_addr).expect("connect");
    back.timeout = Duration::from_secs(10);
    let r = back
        .resume(&gone_login.token, gone_login.response.header.seq)
        .expect("resume on the new gateway");
    assert!(!r.gap);
    new.stop();
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// `POST /v1/upgrade` until a process that is not `old` answers 202 (an
/// old process finishing its hand-over still holds the HTTP port a
/// moment and answers 409): the new pid.
fn upgrade(http: std::net::SocketAddr, query: &str, old: u32) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = common::http(http, "POST", &format!("/v1/upgrade{query}"), b"");
        if status == 202 {
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            let pid = v["pid"].as_u64().expect("pid") as u32;
            assert_ne!(pid, old);
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "upgrade: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_real_process_upgrades_three_times_and_survives_a_bad_binary() {
    use slg_gateway::protocol::Kind;
    let demo =
        slg_gateway::demo::DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = std::env::temp_dir().join(format!("slg-upgrade-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("gateway.ron");
    std::fs::write(&cfg, common::config_text(demo.addr)).expect("config");
    let (first, client, http) = common::spawn_gateway(&cfg, 2);
    let mut pid = first.0.id();
    let mut clients = Vec::new();
    for player in 1..=50u64 {
        let mut c = slg_gateway::client::Client::connect(client).expect("connect");
        c.timeout = Duration::from_secs(10);
        let l = c.login_demo(player).expect("login");
        clients.push((c, l.response.header.seq));
    }
    let round = |clients: &mut Vec<(slg_gateway::client::Client, u64)>, tag: &str| {
        for (c, last) in clients.iter_mut() {
            c.send_request(100, tag.as_bytes()).expect("send");
            let f = next_in_order(c, last);
            assert_eq!(
                (f.header.kind, &f.body[..]),
                (Kind::Response, tag.as_bytes())
            );
        }
    };
    round(&mut clients, "start");
    // A binary that exits at once: refused, the old process goes on.
    let (status, body) = common::http(http, "POST", "/v1/upgrade?binary=/bin/false", b"");
    assert_eq!(status, 502, "{body}");
    assert!(alive(pid));
    round(&mut clients, "after a failed upgrade");
    let mut pids = vec![pid];
    for n in 0..3 {
        let new = upgrade(http, "", pid);
        round(&mut clients, &format!("during upgrade {n}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the old process {pid} ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        round(&mut clients, &format!("after upgrade {n}"));
        pid = new;
        pids.push(pid);
    }
    let probe_ok = probe(client, 777);
    // SAFETY: kill(2) on the last process, which no Proc owns.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    drop(first);
    demo.stop();
    probe_ok.expect("the last process serves new clients");
    let mut unique = pids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{pids:?}");
}

/// An HTTP/1.1 connection kept alive, as a backend keeps its pool:
/// opened again when the gateway closes it.
struct KeptAlive {
    addr: std::net::SocketAddr,
    conn: Option<std::io::BufReader<std::net::TcpStream>>,
}

impl KeptAlive {
    fn new(addr: std::net::SocketAddr) -> KeptAlive {
        KeptAlive { addr, conn: None }
    }

    /// POST and read the answer; None when the connection ended first.
    fn post(&mut self, path: &str, body: &[u8]) -> Option<(u16, String)> {
        use std::io::{BufRead, Read, Write};
        if self.conn.is_none() {
            let s = std::net::TcpStream::connect(self.addr).expect("connect http");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            self.conn = Some(std::io::BufReader::new(s));
        }
        let r = self.conn.as_mut()?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = r
            .get_mut()
            .write_all(head.as_bytes())
            .and_then(|_| r.get_mut().write_all(body));
        let answer = sent.ok().and_then(|_| {
            let mut line = String::new();
            r.read_line(&mut line).ok().filter(|n| *n > 0)?;
            let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
            let (mut len, mut close) = (0usize, false);
            loop {
                let mut h = String::new();
                r.read_line(&mut h).ok().filter(|n| *n > 0)?;
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().ok()?;
                }
                close |= lower == "connection: close";
            }
            let mut b = vec![0u8; len];
            r.read_exact(&mut b).ok()?;
            Some((status, String::from_utf8_lossy(&b).to_string(), close))
        });
        match answer {
            Some((status, body, close)) => {
                if close {
                    self.conn = None;
                }
                Some((status, body))
            }
            None => {
                self.conn = None;
                None
            }
        }
    }
}

/// One client of the steady load: its stream so far.
struct Player {
    id: u64,
    c: slg_gateway::client::Client,
    last: u64,
    asked: u64,
    pushes: std::collections::HashSet<u64>,
}

impl Player {
    /// One request and its answer; pushes that come meanwhile are kept.
    fn round(&mut self) {
        use slg_gateway::protocol::Kind;
        self.asked += 1;
        let tag = format!("{}:{}", self.id, self.asked);
        self.c.send_request(100, tag.as_bytes()).expect("send");
        loop {
            let f = next_in_order(&mut self.c, &mut self.last);
            match f.header.kind {
                Kind::Push => {
                    let n: u64 = std::str::from_utf8(&f.body)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .expect("a push id");
                    assert!(self.pushes.insert(n), "push {n} twice to {}", self.id);
                }
                Kind::Response => {
                    assert_eq!(&f.body[..], tag.as_bytes(), "player {}", self.id);
                    break;
                }
                k => panic!("unexpected {k:?}"),
            }
        }
        if self.asked.is_multiple_of(8) {
            self.c.ack().expect("ack");
        }
    }
}

/// Issue 20's acceptance run: 1,000 clients making requests without a
/// pause while pushes go to them and new clients connect, three upgrades
/// of a real process in a row. No client sees a close, a KICK or a
/// SESSION; each stream is exactly 1..N; each request is answered once;
/// each push answered 200 reaches every player it counted; no connection
/// to the port fails.
#[test]
fn a_thousand_clients_under_load_see_nothing_of_three_upgrades() {
    const CLIENTS: u64 = 1000;
    const THREADS: u64 = 8;
    let demo =
        slg_gateway::demo::DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = std::env::temp_dir().join(format!("slg-upgrade-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cfg = dir.join("gateway.ron");
    std::fs::write(&cfg, common::config_text(demo.addr)).expect("config");
    let (first, client, http) = common::spawn_gateway(&cfg, 2);
    let mut pid = first.0.id();

    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                let mut players: Vec<Player> = (0..CLIENTS / THREADS)
                    .map(|k| {
                        let id = 1 + t + k * THREADS;
                        let mut c = slg_gateway::client::Client::connect(client).expect("connect");
                        c.timeout = Duration::from_secs(20);
                        let l = c.login_demo(id).expect("login");
                        Player {
                            id,
                            c,
                            last: l.response.header.seq,
                            asked: 0,
                            pushes: Default::default(),
                        }
                    })
                    .collect();
                while !stop.load(Ordering::Acquire) {
                    for p in players.iter_mut() {
                        p.round();
                    }
                    rounds.fetch_add(1, Ordering::AcqRel);
                }
                // Every push answered before `stop` is in by now or comes
                // before this last answer.
                for p in players.iter_mut() {
                    p.round();
                }
                players
                    .into_iter()
                    .map(|p| (p.id, p.pushes, p.asked))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    while rounds.load(Ordering::Acquire) < THREADS {
        std::thread::sleep(Duration::from_millis(20));
    }

    // Pushes all along, as a backend sends them: on kept-alive
    // connections, each push to 50 players, one after another, from two
    // threads (push ids odd and even).
    let pushers: Vec<_> = (0..2u64)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut promised: Vec<(u64, Vec<u64>)> = Vec::new();
                let (mut refused, mut unanswered) = (0u64, 0u64);
                let mut conn = KeptAlive::new(http);
                let mut n = t;
                while !stop.load(Ordering::Acquire) {
                    n += 2;
                    let players: Vec<u64> = (0..50).map(|k| 1 + (n * 50 + k) % CLIENTS).collect();
                    let list: Vec<String> = players.iter().map(|p| p.to_string()).collect();
                    let path = format!("/v1/push?players={}&msg=7001", list.join(","));
                    let Some((status, body)) = conn.post(&path, n.to_string().as_bytes()) else {
                        // Closed before an answer: promised nothing.
                        unanswered += 1;
                        continue;
                    };
                    match status {
                        200 => {
                            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
                            let got = v["delivered"].as_u64().unwrap_or(0)
                                + v["cached"].as_u64().unwrap_or(0);
                            assert_eq!(got, 50, "push {n}: {body}");
                            promised.push((n, players));
                        }
                        503 => refused += 1,
                        s => panic!("push {n}: {s} {body}"),
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                (promised, refused, unanswered)
            })
        })
        .collect();
    // New clients all along: the port never refuses one.
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut player) = (0u64, 100_000u64);
            while !stop.load(Ordering::Acquire) {
                player += 1;
                probe(client, player).unwrap_or_else(|e| panic!("probe {player}: {e}"));
                ok += 1;
            }
            ok
        })
    };

    std::thread::sleep(Duration::from_millis(500));
    let mut pids = vec![pid];
    let mut forwarded = 0;
    for _ in 0..3 {
        let before = rounds.load(Ordering::Acquire);
        let new = upgrade(http, "", pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the old process {pid} ended"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The load goes on on the new process.
        let after = rounds.load(Ordering::Acquire);
        while rounds.load(Ordering::Acquire) < after + THREADS {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(rounds.load(Ordering::Acquire) > before);
        // The new process says what moved (its old one is gone).
        let (status, text) = common::http(http, "GET", "/metrics", b"");
        assert_eq!(status, 200);
        let gauge = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("slg_{name} ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("slg_{name} in /metrics"))
        };
        assert!(gauge("upgrade_sessions") >= CLIENTS as f64, "{text}");
        assert_eq!(gauge("upgrade_left_behind"), 0.0);
        assert!(gauge("upgrade_hold_longest_seconds") > 0.0);
        forwarded += gauge("upgrade_pushes_forwarded") as u64;
        pid = new;
        pids.push(pid);
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Release);
    let (mut promised, mut refused, mut unanswered) = (Vec::new(), 0, 0);
    for p in pushers {
        let (p, r, u) = p.join().expect("pusher");
        promised.extend(p);
        refused += r;
        unanswered += u;
    }
    let probes = prober.join().expect("prober");
    let mut got: std::collections::HashMap<u64, std::collections::HashSet<u64>> =
        Default::default();
    let mut requests = 0;
    for w in workers {
        for (id, pushes, asked) in w.join().expect("a client thread") {
            got.insert(id, pushes);
            requests += asked;
        }
    }
    // SAFETY: kill(2) on the last process, which no Proc owns.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    drop(first);
    demo.stop();
    let mut missing = Vec::new();
    for (n, players) in &promised {
        for p in players {
            if !got.get(p).is_some_and(|s| s.contains(n)) {
                missing.push((*n, *p));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} pushes answered 200 not delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let mut unique = pids.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{pids:?}");
    assert!(promised.len() > 50, "{} pushes", promised.len());
    assert!(forwarded > 0, "no push was forwarded during the upgrades");
    eprintln!(
        "{requests} requests, {} pushes delivered ({refused} refused, {unanswered} unanswered, {forwarded} forwarded by old processes), {probes} new clients, pids {pids:?}",
        promised.len()
    );
}
