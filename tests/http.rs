//! The HTTP listener over real sockets: answers, keep-alive, pipelining,
//! bad input and deadlines.

mod common;

use common::Harness;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Send raw bytes, read until the server closes or `responses` full answers arrived.
fn exchange(addr: SocketAddr, raw: &[u8], responses: usize) -> Vec<(u16, String)> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(raw).expect("write");
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut chunk = [0u8; 4096];
    while out.len() < responses {
        if let Some((resp, used)) = parse_response(&buf) {
            out.push(resp);
            buf.drain(..used);
            continue;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    out
}

/// (status, body) and bytes used, when a whole response is buffered.
pub fn parse_response(buf: &[u8]) -> Option<((u16, String), usize)> {
    let text = std::str::from_utf8(buf).ok()?;
    let head_end = text.find("\r\n\r\n")? + 4;
    let head = &text[..head_end];
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))?
        .trim()
        .parse()
        .ok()?;
    if buf.len() < head_end + len {
        return None;
    }
    Some((
        (status, text[head_end..head_end + len].to_string()),
        head_end + len,
    ))
}

fn http_addr(h: &Harness) -> SocketAddr {
    h.gateway.as_ref().map(|g| g.http_addr).expect("running")
}

#[test]
fn healthz_keep_alive_and_pipelining() {
    let h = Harness::start(2);
    let addr = http_addr(&h);
    assert_ne!(addr.port(), 0);
    let one = exchange(addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 1);
    assert_eq!(one, vec![(200, "{\"status\":\"ok\"}".to_string())]);
    let three = exchange(
        addr,
        b"GET /healthz HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nPOST /healthz HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        3,
    );
    let statuses: Vec<u16> = three.iter().map(|r| r.0).collect();
    assert_eq!(statuses, vec![200, 404, 405]);
    assert!(three[1].1.contains("\"error\""));
}

#[test]
fn bad_requests_get_their_status_and_close() {
    let h = Harness::start(1);
    let addr = http_addr(&h);
    assert_eq!(
        exchange(addr, b"POST /v1/push HTTP/1.1\r\n\r\n", 1)[0].0,
        411
    );
    assert_eq!(exchange(addr, b"BLAH\r\n\r\n", 1)[0].0, 400);
    let big = format!("POST /x HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1 << 20);
    assert_eq!(exchange(addr, big.as_bytes(), 1)[0].0, 413);
    let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(exchange(addr, long.as_bytes(), 1)[0].0, 431);
    // Still serving.
    assert_eq!(
        exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n", 1)[0].0,
        200
    );
}

#[test]
fn numbers_are_digits_only_and_content_length_comes_once() {
    let h = Harness::start(1);
    let addr = http_addr(&h);
    let push = |query: &str, lengths: &[&str]| {
        let mut raw = format!("POST /v1/push?{query} HTTP/1.1\r\n");
        for l in lengths {
            raw.push_str(&format!("Content-Length: {l}\r\n"));
        }
        raw.push_str("\r\nhello");
        exchange(addr, raw.as_bytes(), 1)[0].clone()
    };
    // What `str::parse` takes but RFC 9110's `1*DIGIT` does not.
    assert_eq!(push("players=42&msg=7", &["+5"]).0, 400);
    assert_eq!(push("players=42&msg=7", &["5", "5"]).0, 400);
    let (status, body) = push("players=%2B42&msg=7", &["5"]);
    assert_eq!(status, 400, "{body}");
    assert_eq!(push("players=42&msg=+7", &["5"]).0, 400);
    // Percent-encoded digits are digits: what Python's urlencode sends.
    let (status, body) = push("players=42%2C43&msg=%37", &["5"]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"offline\":2"), "{body}");
}

#[test]
fn a_slow_http_client_is_cut_off_by_the_deadline() {
    let h = Harness::with(1, |cfg| {
        cfg.http.head_timeout = Duration::from_millis(300);
        cfg.http.body_timeout = Duration::from_millis(300);
    });
    let addr = http_addr(&h);
    let started = std::time::Instant::now();
    // Half a head, then silence: 408 and close, well before the test's own timeout.
    let r = exchange(addr, b"GET /healthz HTTP/1.1\r\nHo", 1);
    assert_eq!(r[0].0, 408);
    // A body that never arrives.
    let r = exchange(
        addr,
        b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc",
        1,
    );
    assert_eq!(r[0].0, 408);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn silent_http_connections_go_after_head_timeout_and_the_cap_answers_503() {
    let h = Harness::with(1, |cfg| {
        cfg.http.head_timeout = Duration::from_millis(300);
        cfg.http.max_connections = 2;
    });
    let addr = http_addr(&h);
    let started = std::time::Instant::now();
    let silent: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    // At the cap: an answer, not silence.
    let mut third = std::net::TcpStream::connect(addr).expect("connect");
    third
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut third, &mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    // The silent ones are closed after head_timeout, not idle_timeout (60 s).
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut b = [0u8; 64];
        assert!(matches!(
            std::io::Read::read(&mut s, &mut b),
            Ok(0) | Err(_)
        ));
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // And the API answers again.
    let r = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n", 1);
    assert_eq!(r[0].0, 200);
}

#[test]
fn an_http_1_0_keep_alive_request_is_told_the_connection_stays() {
    let h = Harness::start(1);
    let addr = http_addr(&h);
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for _ in 0..2 {
        std::io::Write::write_all(
            &mut s,
            b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        )
        .expect("write");
        let mut buf = Vec::new();
        let mut b = [0u8; 1024];
        while parse_response(&buf).is_none() {
            let n = std::io::Read::read(&mut s, &mut b).expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&b[..n]);
        }
        let text = String::from_utf8_lossy(&buf);
        assert!(text.contains("Connection: keep-alive\r\n"), "{text}");
    }
}
