//! The HTTP API's request framing (`http::parse_head`, as `serve_conn`
//! runs it): byte 0 picks `max_body`, the rest is what a client sent on one
//! keep-alive connection. Requests are taken off the front one after the
//! other, head then Content-Length body, the way `serve_conn` pipelines.
//!
//! Checked: no panic; a head is complete on its own bytes and every shorter
//! prefix of it is `Partial` (the server re-parses as bytes arrive, so TCP
//! segmentation must not change the outcome); the head is within
//! `MAX_HEAD`, the body within `max_body`; path and query split the target
//! at its first `?`; query names are unique; every rejection is a 4xx with
//! a JSON body, and every answer encodes to a well-formed HTTP response.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use slg_gateway::http::{parse_head, Parsed, Response, MAX_HEAD};

const MAX_BODIES: [usize; 4] = [0, 16, 1024, 65536 - 20];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut rest)) = data.split_first() else {
        return;
    };
    let max_body = MAX_BODIES[usize::from(pick) % MAX_BODIES.len()];
    // At most a few pipelined requests: each one is parsed from scratch.
    for _ in 0..8 {
        match parse_head(rest, max_body) {
            Parsed::Partial => {
                assert!(rest.len() <= MAX_HEAD, "a partial head over MAX_HEAD");
                return;
            }
            Parsed::Reject(resp) => {
                check_reject(&resp);
                return;
            }
            Parsed::Head {
                req,
                head_len,
                body_len,
            } => {
                assert!(head_len > 0 && head_len <= rest.len().min(MAX_HEAD));
                assert!(body_len <= max_body, "body {body_len} over {max_body}");
                let head = &rest[..head_len];
                // It ends with an empty line (httparse takes LF for CRLF).
                assert!(head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n"));
                check_prefixes(head, max_body);
                // The head alone gives the same request.
                match parse_head(head, max_body) {
                    Parsed::Head {
                        req: again,
                        head_len: n,
                        body_len: b,
                    } => {
                        assert_eq!((n, b), (head_len, body_len));
                        assert_eq!(format!("{again:?}"), format!("{req:?}"));
                    }
                    other => panic!("the head alone parsed as {other:?}"),
                }
                assert!(!req.path.contains('?'));
                if !req.query.is_empty() {
                    let target = format!("{}?{}", req.path, req.query);
                    assert!(
                        head.windows(target.len()).any(|w| w == target.as_bytes()),
                        "path and query are not the target split at `?`"
                    );
                }
                for (i, (k, _)) in req.params.iter().enumerate() {
                    assert!(
                        req.params[..i].iter().all(|(seen, _)| seen != k),
                        "query parameter {k:?} twice"
                    );
                    assert!(req.param(k).is_some());
                }
                assert!(!(req.close && req.keep_alive_10));
                let mut out = BytesMut::new();
                let mut resp = Response::json(200, "{}".into());
                resp.close = req.close;
                resp.keep_alive = req.keep_alive_10;
                resp.encode(&mut out);
                check_encoded(&out, &resp);
                if rest.len() < head_len + body_len {
                    return;
                }
                rest = &rest[head_len + body_len..];
            }
        }
    }
});

/// Every prefix of a complete head is `Partial` (all of them for a short
/// head, 64 spread over a long one).
fn check_prefixes(head: &[u8], max_body: usize) {
    let n = head.len();
    let step = (n / 64).max(1);
    for cut in (0..n).step_by(step) {
        match parse_head(&head[..cut], max_body) {
            Parsed::Partial => {}
            other => panic!("prefix of {cut} of {n} bytes of a complete head parsed as {other:?}"),
        }
    }
}

fn check_reject(resp: &Response) {
    assert!(
        matches!(resp.status, 400 | 411 | 413 | 431),
        "rejected with {}",
        resp.status
    );
    assert!(
        serde_json::from_str::<serde_json::Value>(&resp.body).is_ok(),
        "a rejection body that is not JSON: {:?}",
        resp.body
    );
    let mut out = BytesMut::new();
    let closing = resp.clone().closing();
    closing.encode(&mut out);
    check_encoded(&out, &closing);
}

/// `out` is one HTTP/1.1 response: status, Content-Length and body agree.
fn check_encoded(out: &[u8], resp: &Response) {
    let mut headers = [httparse::EMPTY_HEADER; 8];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("an answer that does not parse: {other:?}"),
    };
    assert_eq!(r.code, Some(resp.status));
    let len = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok());
    assert_eq!(len, Some(out.len() - n));
    assert_eq!(&out[n..], resp.body.as_bytes());
}
