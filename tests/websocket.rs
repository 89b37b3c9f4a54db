//! Client connections over WebSocket and TLS (docs/PROTOCOL.md,
//! "WebSocket and TLS"): the same sessions as over TCP (login, seqs, resume,
//! takeover both ways, hand-off to the home shard), malformed WebSocket
//! input answered as documented without touching other clients, and TLS
//! on the TCP, WebSocket and HTTP ports with a certificate made here.

mod common;

use common::Harness;
use slg_gateway::client::{Client, ConnectOptions, WsOptions};
use slg_gateway::config::{Config, TlsConfig};
use slg_gateway::protocol::{encode, Code, Header, Kind};
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tungstenite::Message;

const ECHO: u32 = 100;

fn code(c: Code) -> u16 {
    c.into()
}

fn with_ws(cfg: &mut Config) {
    cfg.ws_listen = Some("127.0.0.1:0".into());
}

fn ws_addr(h: &Harness) -> std::net::SocketAddr {
    h.gateway
        .as_ref()
        .and_then(|g| g.ws_addr)
        .expect("ws listener")
}

fn ws_client(h: &Harness) -> Client {
    let opts = ConnectOptions {
        websocket: Some(WsOptions::default()),
        ..Default::default()
    };
    let mut c = Client::connect_via(ws_addr(h), &opts).expect("ws connect");
    c.timeout = Duration::from_secs(10);
    c
}

#[test]
fn a_websocket_session_logs_in_and_gets_gap_free_seqs_on_every_shard() {
    let h = Harness::with(2, with_ws);
    // Players homed on either shard: some logins hand the connection (and
    // its WebSocket state) to the other shard.
    for player in 1..=6u64 {
        let mut c = ws_client(&h);
        let li = c.login_demo(player).expect("login");
        assert_eq!(li.player, player);
        assert_eq!(li.response.header.seq, 1);
        for i in 0..20u64 {
            let body = format!("echo {i}");
            let r = c.request(ECHO, body.as_bytes()).expect("echo");
            assert_eq!(r.header.seq, i + 2);
            assert_eq!(&r.body[..], body.as_bytes());
        }
        c.ping().expect("ping");
    }
}

#[test]
fn a_websocket_session_resumes_after_a_drop() {
    let h = Harness::with(2, with_ws);
    let mut a = ws_client(&h);
    let li = a.login_demo(7).expect("login");
    a.request(ECHO, b"one").expect("echo");
    a.ack().expect("ack");
    // Two answers the client never reads.
    let r1 = a.send_request(ECHO, b"two").expect("send");
    let r2 = a.send_request(ECHO, b"three").expect("send");
    std::thread::sleep(Duration::from_millis(200));
    drop(a);
    std::thread::sleep(Duration::from_millis(100));
    let mut b = ws_client(&h);
    b.set_next_req_id(r2 + 1);
    let r = b.resume(&li.token, 2).expect("resume");
    assert_eq!(r.resume_point, 2);
    let x = b.recv().expect("replay");
    let y = b.recv().expect("replay");
    assert_eq!((x.header.req_id, x.header.seq), (r1, 3));
    assert_eq!((y.header.req_id, y.header.seq), (r2, 4));
    assert_eq!(b.request(ECHO, b"live").expect("echo").header.seq, 5);
}

#[test]
fn tcp_and_websocket_sessions_of_one_player_take_each_other_over() {
    let h = Harness::with(2, with_ws);
    let mut tcp = h.client();
    tcp.login_demo(11).expect("tcp login");
    tcp.request(ECHO, b"a").expect("echo");
    tcp.ack().expect("ack");

    let mut ws = ws_client(&h);
    let li = ws.login_demo(11).expect("ws login");
    assert_eq!(tcp.expect_kick().expect("kick"), code(Code::Replaced));
    assert!(tcp.is_closed());
    assert_eq!(li.resume_point, 2);
    assert_eq!(li.response.header.seq, 3);
    assert_eq!(ws.request(ECHO, b"b").expect("echo").header.seq, 4);
    ws.ack().expect("ack");

    let mut tcp2 = h.client();
    let li = tcp2.login_demo(11).expect("tcp login again");
    assert_eq!(ws.expect_kick().expect("kick"), code(Code::Replaced));
    assert!(ws.is_closed());
    assert_eq!(li.resume_point, 4);
    assert_eq!(tcp2.request(ECHO, b"c").expect("echo").header.seq, 6);
}

/// Send `msg` on a logged-in WebSocket session: it must get KICK
/// PROTOCOL_ERROR and then a close frame with `close`.
fn refused(h: &Harness, player: u64, msg: Message, close: u16) {
    let mut c = ws_client(h);
    c.login_demo(player).expect("login");
    c.websocket().expect("ws").send(msg).expect("send");
    assert_eq!(c.expect_kick().expect("kick"), code(Code::ProtocolError));
    let ws = c.websocket().expect("ws");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < deadline, "no close frame");
        match ws.read() {
            Ok(Message::Close(Some(f))) => {
                assert_eq!(u16::from(f.code), close);
                break;
            }
            Ok(Message::Close(None)) => panic!("a close frame without a code"),
            Ok(_) => {}
            Err(e) => panic!("expected a close frame: {e}"),
        }
    }
}

/// One REQUEST frame's bytes.
fn frame_to(msg_id: u32, req_id: u32, body: &[u8]) -> Vec<u8> {
    let mut b = bytes::BytesMut::new();
    let mut h = Header::new(Kind::Request);
    h.msg_id = msg_id;
    h.req_id = req_id;
    encode(&mut b, &h, body);
    b.to_vec()
}

#[test]
fn malformed_websocket_messages_are_protocol_errors_and_touch_no_one_else() {
    let h = Harness::with(1, |c| {
        with_ws(c);
        c.max_frame = 1024;
        c.ws.handshake_timeout = Duration::from_millis(300);
    });
    let mut bystander = h.client();
    bystander.login_demo(50).expect("login");
    let mut ws_bystander = ws_client(&h);
    ws_bystander.login_demo(51).expect("login");

    refused(&h, 60, Message::Text("hello".into()), 1003);
    let two = [frame_to(ECHO, 999, b"a"), frame_to(ECHO, 999, b"b")].concat();
    refused(&h, 61, Message::Binary(two.into()), 1002);
    let short = frame_to(ECHO, 999, b"abc");
    refused(&h, 62, Message::Binary(short[..10].to_vec().into()), 1002);
    refused(&h, 63, Message::Binary(vec![0u8; 4000].into()), 1009);

    // Bad and slow handshakes.
    let addr = ws_addr(&h);
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");

    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.write_all(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    let started = Instant::now();
    let mut slow = std::net::TcpStream::connect(addr).expect("connect");
    slow.write_all(b"GET /ws HTTP/1.1\r\n").expect("write");
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a slow upgrade is closed without an answer");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(15),
        "closed after {took:?} (handshake_timeout 300 ms)"
    );

    // The others never noticed.
    assert_eq!(
        bystander.request(ECHO, b"still").expect("echo").header.seq,
        2
    );
    assert_eq!(
        ws_bystander
            .request(ECHO, b"still")
            .expect("echo")
            .header
            .seq,
        2
    );
}

#[test]
fn an_origin_allow_list_refuses_other_origins() {
    let h = Harness::with(1, |c| {
        with_ws(c);
        c.ws.allowed_origins = vec!["https://game.example".into()];
    });
    let opts = |origin: Option<&str>| ConnectOptions {
        websocket: Some(WsOptions {
            path: "/ws".into(),
            origin: origin.map(str::to_string),
        }),
        ..Default::default()
    };
    let addr = ws_addr(&h);
    assert!(Client::connect_via(addr, &opts(Some("https://evil.example"))).is_err());
    assert!(Client::connect_via(addr, &opts(None)).is_err());
    let mut c = Client::connect_via(addr, &opts(Some("https://game.example"))).expect("allowed");
    c.login_demo(5).expect("login");
}

/// A certificate for `localhost`, written to a temporary directory, and a
/// client configuration that trusts it.
struct Cert {
    dir: std::path::PathBuf,
    client: Arc<rustls::ClientConfig>,
}

impl Cert {
    fn new(tag: &str) -> Cert {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let dir = std::env::temp_dir().join(format!("slg-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("cert.pem"), ck.cert.pem()).expect("cert");
        std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).expect("key");
        let ca = dir.join("cert.pem").display().to_string();
        let client = slg_gateway::wire::tls::client_config(&ca).expect("client config");
        Cert { dir, client }
    }

    fn tls(&self) -> TlsConfig {
        TlsConfig {
            cert: self.dir.join("cert.pem").display().to_string(),
            key: self.dir.join("key.pem").display().to_string(),
            client: true,
            websocket: true,
            http: true,
            handshake_timeout: Duration::from_millis(500),
        }
    }

    fn opts(&self, ws: bool) -> ConnectOptions {
        ConnectOptions {
            tls: Some((self.client.clone(), "localhost".into())),
            websocket: ws.then(WsOptions::default),
        }
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn tls_on_the_tcp_websocket_and_http_ports() {
    let cert = Cert::new("ports");
    let tls = cert.tls();
    let h = Harness::with(2, |c| {
        with_ws(c);
        c.tls = Some(tls);
    });
    for (i, ws) in [false, true].into_iter().enumerate() {
        let addr = if ws { ws_addr(&h) } else { h.addr() };
        for player in 1..=3u64 {
            let player = player + 10 * i as u64;
            let mut c = Client::connect_via(addr, &cert.opts(ws)).expect("tls connect");
            c.login_demo(player).expect("login");
            for n in 0..5u64 {
                assert_eq!(c.request(ECHO, b"x").expect("echo").header.seq, n + 2);
            }
        }
    }
    // Plain TCP to a TLS port does not get a session.
    let mut plain = h.client();
    assert!(plain.login_demo(99).is_err());

    // The HTTP API over TLS.
    let http = h.gateway.as_ref().expect("gateway").http_addr;
    let tcp = std::net::TcpStream::connect(http).expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(cert.client.clone(), name).expect("client");
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

#[test]
fn a_silent_tls_client_is_dropped_after_the_handshake_timeout() {
    let cert = Cert::new("slow");
    let tls = TlsConfig {
        websocket: false,
        ..cert.tls()
    };
    let h = Harness::with(1, |c| c.tls = Some(tls));
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(h.addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 64];
    assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(15),
        "closed after {took:?} (handshake_timeout 500 ms)"
    );
}

#[test]
fn a_bad_certificate_path_is_refused_at_start_naming_the_key() {
    let mut cfg = Config::embedded_default();
    cfg.snapshot_dir = None;
    cfg.listen = "127.0.0.1:0".into();
    cfg.http_listen = "127.0.0.1:0".into();
    cfg.demo_backend = None;
    cfg.tls = Some(TlsConfig {
        cert: "/nonexistent/gw.pem".into(),
        key: "/nonexistent/gw.key".into(),
        client: true,
        websocket: false,
        http: false,
        handshake_timeout: Duration::from_secs(1),
    });
    let err = match slg_gateway::gateway::Gateway::start(cfg) {
        Ok(_) => panic!("started with a missing certificate"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("tls.cert"), "{err}");
    assert!(err.contains("/nonexistent/gw.pem"), "{err}");
}

#[test]
fn a_reload_serves_a_new_certificate_to_new_connections_and_keeps_live_ones() {
    let old = Cert::new("reload-old");
    let tls = TlsConfig {
        websocket: false,
        http: false,
        ..old.tls()
    };
    let mut h = Harness::with(1, |c| c.tls = Some(tls.clone()));
    let mut live = Client::connect_via(h.addr(), &old.opts(false)).expect("connect");
    live.login_demo(21).expect("login");

    // A new certificate in the same files, then a reload.
    let new = Cert::new("reload-new");
    std::fs::copy(new.dir.join("cert.pem"), old.dir.join("cert.pem")).expect("copy");
    std::fs::copy(new.dir.join("key.pem"), old.dir.join("key.pem")).expect("copy");
    let demo = h.demo.as_ref().expect("demo").addr;
    let gw = h.gateway.as_mut().expect("gateway");
    let mut cfg = common::config(demo, 1);
    cfg.tls = Some(tls.clone());
    gw.reload(cfg.clone()).expect("reload");

    // New connections get the new certificate: a client that trusts only
    // the old one fails, one that trusts the new one succeeds.
    assert!(Client::connect_via(h.addr(), &old.opts(false)).is_err());
    let mut fresh = Client::connect_via(h.addr(), &new.opts(false)).expect("new cert");
    fresh.login_demo(22).expect("login");
    // The live session never noticed.
    assert_eq!(live.request(ECHO, b"x").expect("echo").header.seq, 2);

    // A broken certificate file: the reload is refused, naming the key.
    std::fs::write(old.dir.join("key.pem"), "garbage").expect("write");
    let gw = h.gateway.as_mut().expect("gateway");
    let err = gw.reload(cfg).expect_err("a bad key");
    assert!(err.contains("tls.key"), "{err}");
    let mut again = Client::connect_via(h.addr(), &new.opts(false)).expect("still served");
    again.login_demo(23).expect("login");
}

#[test]
fn websocket_pings_are_answered_but_do_not_keep_a_session_alive() {
    let h = Harness::with(1, |c| {
        with_ws(c);
        c.session_idle = Duration::from_millis(800);
    });
    let mut c = ws_client(&h);
    c.login_demo(31).expect("login");
    let started = Instant::now();
    let mut pongs = 0;
    let mut kicked = None;
    while started.elapsed() < Duration::from_secs(5) && kicked.is_none() {
        let ws = c.websocket().expect("ws");
        ws.send(Message::Ping("are you there".into()))
            .expect("ping");
        ws.get_mut()
            .tcp_mut()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        loop {
            match ws.read() {
                Ok(Message::Pong(p)) => {
                    assert_eq!(&p[..], b"are you there");
                    pongs += 1;
                    break;
                }
                Ok(Message::Binary(b)) => {
                    // KICK: kind byte after the length prefix.
                    assert_eq!(b[4], Kind::Kick as u8);
                    kicked = Some(u16::from_be_bytes([b[6], b[7]]));
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pongs >= 2, "pongs: {pongs}");
    assert_eq!(kicked, Some(code(Code::Idle)));
}

#[test]
fn a_drain_kicks_websocket_sessions_with_a_close_frame_and_they_resume_after_a_restart() {
    let demo =
        slg_gateway::demo::DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let dir = std::env::temp_dir().join(format!("slg-ws-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let start = || {
        let mut cfg = common::config(demo.addr, 2);
        with_ws(&mut cfg);
        cfg.snapshot_dir = Some(dir.display().to_string());
        slg_gateway::gateway::Gateway::start(cfg).expect("gateway")
    };
    let gw = start();
    let opts = ConnectOptions {
        websocket: Some(WsOptions::default()),
        ..Default::default()
    };
    let mut c = Client::connect_via(gw.ws_addr.expect("ws"), &opts).expect("connect");
    let li = c.login_demo(41).expect("login");
    c.request(ECHO, b"x").expect("echo");
    let (_tx, rx) = flume::unbounded();
    let drained = std::thread::spawn(move || gw.drain(&rx));
    assert_eq!(c.expect_kick().expect("kick"), code(Code::Shutdown));
    let ws = c.websocket().expect("ws");
    let mut closed = None;
    for _ in 0..10 {
        match ws.read() {
            Ok(Message::Close(f)) => {
                closed = f.map(|f| u16::from(f.code));
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    assert_eq!(closed, Some(1000), "a close frame after the KICK");
    assert_eq!(
        drained.join().expect("drain").snapshot_players,
        Some(1),
        "the player is in the snapshot"
    );
    // A new process loads the snapshot: the WebSocket client resumes.
    let gw = start();
    let mut c2 = Client::connect_via(gw.ws_addr.expect("ws"), &opts).expect("connect");
    c2.set_next_req_id(100);
    assert_eq!(c2.resume(&li.token, 2).expect("resume").resume_point, 2);
    assert_eq!(c2.request(ECHO, b"y").expect("echo").header.seq, 3);
    gw.stop();
    demo.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_request_sent_with_the_close_frame_is_still_handled() {
    let h = Harness::with(1, with_ws);
    let mut c = ws_client(&h);
    let li = c.login_demo(71).expect("login");
    // The request and the close in one write: one read at the gateway.
    let ws = c.websocket().expect("ws");
    ws.write(Message::Binary(frame_to(ECHO, 77, b"last words").into()))
        .expect("write");
    ws.close(None).expect("close");
    std::thread::sleep(Duration::from_millis(300));
    // Its answer went to the player: a resume finds it.
    let mut c2 = ws_client(&h);
    c2.set_next_req_id(100);
    c2.resume(&li.token, 1).expect("resume");
    let r = c2.recv().expect("the answer");
    assert_eq!((r.header.req_id, &r.body[..]), (77, &b"last words"[..]));
}

#[test]
fn a_ping_flood_from_a_client_that_does_not_read_is_a_slow_consumer() {
    let h = Harness::with(1, |c| {
        with_ws(c);
        c.write_queue_bytes = 128 * 1024;
    });
    let mut c = ws_client(&h);
    c.login_demo(72).expect("login");
    let ws = c.websocket().expect("ws");
    // Pings, never reading the pongs: once the pongs the gateway owes pass
    // write_queue_bytes (beyond what the sockets' buffers hold) it kicks
    // the session and closes, and the writes here start failing. Without
    // that bound it would buffer pongs for as long as pings come.
    let started = Instant::now();
    let mut sent = 0u64;
    let closed = loop {
        if started.elapsed() > Duration::from_secs(30) {
            break false;
        }
        let r = ws.write(Message::Ping(vec![7u8; 125].into()));
        if r.is_err() || ws.flush().is_err() {
            break true;
        }
        sent += 1;
    };
    assert!(
        closed,
        "the gateway kept taking pings for 30 s ({sent} pings)"
    );
}

#[test]
fn connections_in_their_handshake_count_toward_max_connections() {
    let cert = Cert::new("cap");
    let tls = TlsConfig {
        websocket: false,
        http: false,
        ..cert.tls()
    };
    let h = Harness::with(1, |c| {
        c.tls = Some(tls);
        c.max_connections = 2;
    });
    // Two connections that never finish their TLS handshake hold both places.
    let silent: Vec<_> = (0..2)
        .map(|_| std::net::TcpStream::connect(h.addr()).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let refused = Client::connect_via(h.addr(), &cert.opts(false));
    assert!(refused.is_err(), "a third connection must be refused");
    // Once the handshake timeout (500 ms) frees them, a client gets in.
    std::thread::sleep(Duration::from_millis(900));
    let mut c = Client::connect_via(h.addr(), &cert.opts(false)).expect("a place again");
    c.login_demo(81).expect("login");
    drop(silent);
}
