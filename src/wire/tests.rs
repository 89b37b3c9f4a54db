//! The wire layers against tungstenite's and rustls's own client sides,
//! all in memory.

use super::*;
use crate::protocol::{encode, Header, Kind};
use std::io::{Read, Write};
use tungstenite::protocol::Role;

fn settings(origins: &[&str]) -> Arc<WsSettings> {
    Arc::new(WsSettings {
        path: "/ws".into(),
        allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
        max_request: 8192,
        max_message: 1024,
    })
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode(&mut b, &Header::new(Kind::Push), body);
    b.to_vec()
}

fn upgrade_request(path: &str, origin: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(o) = origin {
        r.push_str(&format!("Origin: {o}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// The client's side of an in-memory connection.
#[derive(Default)]
struct Pipe {
    input: Vec<u8>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.input.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input.drain(..n);
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn ws_wire(origins: &[&str]) -> Wire {
    Wire::new(&WireKind {
        tls: None,
        ws: Some(settings(origins)),
    })
    .expect("wire")
}

/// An upgraded server wire and a tungstenite client talking to it.
fn open_ws() -> (Wire, tungstenite::WebSocket<Pipe>) {
    let mut w = ws_wire(&[]);
    let mut plain = BytesMut::new();
    w.ingest(&upgrade_request("/ws", None), &mut plain)
        .expect("upgrade");
    assert!(w.is_open());
    let resp = String::from_utf8_lossy(w.pending()).to_string();
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    assert!(resp.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{resp}");
    let n = w.pending().len();
    w.consumed(n);
    let client = tungstenite::WebSocket::from_raw_socket(Pipe::default(), Role::Client, None);
    (w, client)
}

/// What the client sent, taken off its pipe.
fn sent(c: &mut tungstenite::WebSocket<Pipe>) -> Vec<u8> {
    let _ = c.flush();
    std::mem::take(&mut c.get_mut().output)
}

#[test]
fn one_binary_message_is_one_frame_each_way() {
    let (mut w, mut c) = open_ws();
    let f = frame(b"hello");
    c.send(Message::Binary(f.clone().into())).expect("send");
    let mut plain = BytesMut::new();
    let got = w.ingest(&sent(&mut c), &mut plain).expect("ingest");
    assert!(!got.closed);
    assert_eq!(&plain[..], &f[..]);

    // Two frames out: two messages.
    let mut two = frame(b"a");
    two.extend_from_slice(&frame(b"bc"));
    w.encode(&two).expect("encode");
    c.get_mut().input.extend_from_slice(w.pending());
    let a = c.read().expect("first");
    let b = c.read().expect("second");
    assert_eq!(a, Message::Binary(frame(b"a").into()));
    assert_eq!(b, Message::Binary(frame(b"bc").into()));
}

use tungstenite::Message;

#[test]
fn a_ping_is_answered_and_a_close_ends_the_stream() {
    let (mut w, mut c) = open_ws();
    c.send(Message::Ping("p".into())).expect("ping");
    let mut plain = BytesMut::new();
    w.ingest(&sent(&mut c), &mut plain).expect("ingest");
    assert!(plain.is_empty());
    c.get_mut().input.extend_from_slice(w.pending());
    assert_eq!(c.read().expect("pong"), Message::Pong("p".into()));
    let n = w.pending().len();
    w.consumed(n);

    c.close(None).expect("close");
    let got = w.ingest(&sent(&mut c), &mut plain).expect("ingest close");
    assert!(got.closed);
    // The close is answered.
    assert!(!w.pending().is_empty());
}

#[test]
fn text_several_frames_short_and_oversize_messages_are_refused() {
    let cases: Vec<(Message, &str)> = vec![
        (Message::Text("hi".into()), "text"),
        (
            Message::Binary([frame(b"a"), frame(b"b")].concat().into()),
            "more than one",
        ),
        (
            Message::Binary(frame(b"abc")[..5].to_vec().into()),
            "less than one",
        ),
        (Message::Binary(vec![0u8; 2000].into()), "too large"),
    ];
    for (msg, what) in cases {
        let (mut w, mut c) = open_ws();
        c.send(msg).expect("send");
        let mut plain = BytesMut::new();
        let e = w.ingest(&sent(&mut c), &mut plain).expect_err(what);
        assert!(e.is_protocol_error(), "{what}: {e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
        assert!(plain.is_empty());
        w.close();
        c.get_mut().input.extend_from_slice(w.pending());
        match c.read() {
            Ok(Message::Close(Some(f))) => assert_eq!(f.code, e.close_code(), "{what}"),
            other => panic!("{what}: expected a close frame, got {other:?}"),
        }
    }
}

#[test]
fn an_upgrade_is_checked_for_path_origin_and_size() {
    let refused = |req: Vec<u8>, origins: &[&str], status: &str| {
        let mut w = ws_wire(origins);
        let mut plain = BytesMut::new();
        assert!(w.ingest(&req, &mut plain).is_err(), "{status}");
        assert!(!w.is_open());
        let resp = String::from_utf8_lossy(w.pending()).to_string();
        assert!(resp.starts_with(&format!("HTTP/1.1 {status}")), "{resp}");
    };
    refused(upgrade_request("/other", None), &[], "404");
    refused(
        upgrade_request("/ws", Some("https://evil.example")),
        &["https://game.example"],
        "403",
    );
    refused(
        upgrade_request("/ws", None),
        &["https://game.example"],
        "403",
    );
    refused(b"GET /ws HTTP/1.1\r\nHost: gw\r\n\r\n".to_vec(), &[], "400");
    let mut big = b"GET /ws HTTP/1.1\r\nHost: gw\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 9000));
    refused(big, &[], "431");

    // An allowed origin passes; a request in pieces is fine.
    let mut w = ws_wire(&["https://game.example"]);
    let req = upgrade_request("/ws", Some("https://game.example"));
    let mut plain = BytesMut::new();
    for piece in req.chunks(7) {
        w.ingest(piece, &mut plain).expect("piece");
    }
    assert!(w.is_open());
}

#[test]
fn an_upgrade_does_not_depend_on_how_its_bytes_come_in_reads() {
    // fuzz/regressions/websocket/crash-a28ecf64...: the request 2 bytes a
    // read (tungstenite alone called that an attack).
    let req = upgrade_request("/ws", None);
    let mut w = ws_wire(&[]);
    let mut plain = BytesMut::new();
    for piece in req.chunks(2) {
        w.ingest(piece, &mut plain).expect("piece");
    }
    assert!(w.is_open());
    // fuzz/regressions/websocket/crash-8e6c257c...: a frame right behind
    // the request in the same read (tungstenite alone: junk after the
    // request) is the first message, as it is in a later read.
    let (_, mut c) = open_ws();
    c.send(Message::Binary(frame(b"early").into()))
        .expect("send");
    let mut bytes = req.clone();
    bytes.extend_from_slice(&sent(&mut c));
    let mut w = ws_wire(&[]);
    let mut plain = BytesMut::new();
    w.ingest(&bytes, &mut plain).expect("request and a message");
    assert!(w.is_open());
    assert_eq!(&plain[..], &frame(b"early")[..]);
    // fuzz/regressions/websocket/crash-1db40129...: empty lines before the
    // request line are part of the head (httparse skips them).
    let mut w = ws_wire(&[]);
    let mut plain = BytesMut::new();
    let mut lead = b"\r\n\r\n".to_vec();
    lead.extend_from_slice(&bytes);
    w.ingest(&lead, &mut plain).expect("leading empty lines");
    assert!(w.is_open());
    assert_eq!(&plain[..], &frame(b"early")[..]);
    // fuzz/regressions/websocket/crash-50621528...: more headers than an
    // upgrade needs: 431 whole or in pieces (tungstenite alone took the
    // whole and refused the pieces).
    let mut many = b"GET /ws HTTP/1.1\r\n".to_vec();
    for i in 0..70 {
        many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(&req[b"GET /ws HTTP/1.1\r\n".len()..]);
    for piece in [many.len(), 64] {
        let mut w = ws_wire(&[]);
        let mut plain = BytesMut::new();
        let failed = many.chunks(piece).any(|c| w.ingest(c, &mut plain).is_err());
        assert!(failed && !w.is_open(), "pieces of {piece}");
        assert!(String::from_utf8_lossy(w.pending()).starts_with("HTTP/1.1 431"));
    }
    // Split anywhere, the same.
    for cut in [1, 100, req.len() - 2, req.len() + 3] {
        let mut w = ws_wire(&[]);
        let mut plain = BytesMut::new();
        w.ingest(&bytes[..cut], &mut plain).expect("first part");
        w.ingest(&bytes[cut..], &mut plain).expect("second part");
        assert_eq!(&plain[..], &frame(b"early")[..], "cut at {cut}");
    }
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let dir = std::env::temp_dir().join(format!("slg-wire-tls-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    let server =
        tls::load(cert.to_str().expect("utf8"), key.to_str().expect("utf8")).expect("load");
    let client = tls::client_config(cert.to_str().expect("utf8")).expect("client config");
    let _ = std::fs::remove_dir_all(&dir);
    (server, client)
}

/// Move bytes between a rustls client and the wire until both are quiet;
/// returns the plaintext the wire produced.
fn pump(c: &mut rustls::ClientConnection, w: &mut Wire) -> BytesMut {
    let mut plain = BytesMut::new();
    for _ in 0..20 {
        let mut to_server = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut to_server).expect("client write_tls");
        }
        if !to_server.is_empty() {
            w.ingest(&to_server, &mut plain).expect("ingest");
        }
        let back = w.pending().to_vec();
        w.consumed(back.len());
        if !back.is_empty() {
            let mut rd = &back[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).expect("client read_tls");
                c.process_new_packets().expect("client process");
            }
        }
        if to_server.is_empty() && back.is_empty() {
            break;
        }
    }
    plain
}

#[test]
fn tls_carries_frames_both_ways() {
    let (server, client) = tls_pair();
    let mut w = Wire::new(&WireKind {
        tls: Some(server),
        ws: None,
    })
    .expect("wire");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut c = rustls::ClientConnection::new(client, name).expect("client");
    assert!(!w.is_open());
    pump(&mut c, &mut w);
    assert!(w.is_open());
    assert!(!c.is_handshaking());
    let f = frame(b"over tls");
    c.writer().write_all(&f).expect("write");
    assert_eq!(&pump(&mut c, &mut w)[..], &f[..]);
    w.encode(&frame(b"back")).expect("encode");
    pump(&mut c, &mut w);
    let mut got = vec![0u8; 64];
    let n = c.reader().read(&mut got).expect("read");
    assert_eq!(&got[..n], &frame(b"back")[..]);
}

#[test]
fn a_tls_handshake_with_garbage_fails_with_an_alert() {
    let (server, _) = tls_pair();
    let mut w = Wire::new(&WireKind {
        tls: Some(server),
        ws: None,
    })
    .expect("wire");
    let mut plain = BytesMut::new();
    let e = w
        .ingest(b"GET / HTTP/1.1\r\n\r\n", &mut plain)
        .expect_err("not tls");
    assert!(matches!(e, WireError::Tls(_)), "{e}");
    assert!(!e.is_protocol_error());
}

#[test]
fn a_bad_certificate_file_is_named() {
    let (which, e) =
        tls::load("/nonexistent/cert.pem", "/nonexistent/key.pem").expect_err("missing");
    assert_eq!(which, "cert");
    assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    let dir = std::env::temp_dir().join(format!("slg-wire-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cert = dir.join("cert.pem");
    std::fs::write(&cert, "not a pem file").expect("write");
    let (which, e) =
        tls::load(cert.to_str().expect("utf8"), "/nonexistent/key.pem").expect_err("bad");
    assert_eq!(which, "cert");
    assert!(e.contains("cert.pem"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
