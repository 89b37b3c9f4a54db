//! The HTTP/1.1 listener of every shard (push and admin API, PROTOCOL.md
//! section 5): request parsing with httparse, keep-alive and pipelining,
//! limits and deadlines so a slow or hostile HTTP client holds neither a
//! connection nor memory for long, and JSON answers.
//!
//! [`serve_conn`] moves bytes; [`Request`] and [`Response`] are plain data;
//! the endpoints live in [`api`].

pub mod api;
pub mod params;

use crate::net::SharedStream;
use bytes::{Bytes, BytesMut};
use futures_lite::AsyncWriteExt;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Largest request head (request line and headers) accepted: beyond it, 431.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers in one request: beyond it, 431.
pub const MAX_HEADERS: usize = 32;

/// Deadlines and limits of one HTTP connection.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// From the first byte of a request to the end of its head.
    pub head_timeout: Duration,
    /// From the end of the head to the end of the body.
    pub body_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Largest body; beyond it, 413.
    pub max_body: usize,
}

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The raw query string (after `?`), empty when absent.
    pub query: String,
    /// The query's parameters, percent-decoded; each name at most once.
    pub params: Vec<(String, String)>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The client asked to close after this request (`Connection: close`,
    /// or HTTP/1.0 without `keep-alive`).
    pub close: bool,
    /// HTTP/1.0 with `Connection: keep-alive`: the answer must say it
    /// keeps the connection, or the client waits for a close.
    pub keep_alive_10: bool,
    pub body: Bytes,
}

impl Request {
    /// Query parameter `name`, percent-decoded.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Close the connection after this answer.
    pub close: bool,
    /// Say `Connection: keep-alive` (to an HTTP/1.0 client kept open).
    pub keep_alive: bool,
}

impl Response {
    pub fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "application/json",
            body,
            close: false,
            keep_alive: false,
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: &str) -> Response {
        Response::json(status, format!("{{\"error\":{}}}", json_string(message)))
    }

    pub fn text(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "text/plain; version=0.0.4",
            body,
            close: false,
            keep_alive: false,
        }
    }

    pub fn closing(mut self) -> Response {
        self.close = true;
        self
    }

    pub fn encode(&self, out: &mut BytesMut) {
        let mut head = String::with_capacity(128);
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            if self.close {
                "Connection: close\r\n"
            } else if self.keep_alive {
                "Connection: keep-alive\r\n"
            } else {
                ""
            }
        );
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(self.body.as_bytes());
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The refusal of a push or broadcast by a draining gateway, before
/// anything was sent: a peer that forwarded it may route it again.
/// The answer of what waits for a live upgrade to finish.
pub const REFUSED_UPGRADING: &str =
    "a live upgrade is under way; nothing was done, send it again in a moment";
pub const PUSH_REFUSED_DRAINING: &str = "the gateway is draining; nothing was pushed";

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What parsing the buffered bytes gave.
#[derive(Debug)]
pub enum Parsed {
    /// Need more bytes.
    Partial,
    /// A complete head: the request without its body yet, the head's
    /// length, and the body length to read.
    Head {
        req: Request,
        head_len: usize,
        body_len: usize,
    },
    /// Answer this and close.
    Reject(Response),
}

/// A decimal number as RFC 9110 writes one (`1*DIGIT`): ASCII digits only,
/// so `+5`, ` 5`, `5 ` and `0x5` are refused where Rust's `parse` would
/// take some of them. Content-Length leniency is how request smuggling
/// starts behind a load balancer; query numbers follow the same rule.
pub fn digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parse a request head from the front of `buf`.
pub fn parse_head(buf: &[u8], max_body: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Parsed::Reject(Response::error(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Reject(Response::error(431, "too many headers"))
        }
        Err(e) => return Parsed::Reject(Response::error(400, &format!("malformed request: {e}"))),
    };
    if head_len > MAX_HEAD {
        return Parsed::Reject(Response::error(431, "request head too large"));
    }
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut params: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if params.iter().any(|(seen, _)| *seen == k) {
            return Parsed::Reject(Response::error(
                400,
                &format!("query parameter `{k}` given twice"),
            ));
        }
        params.push((k.into_owned(), v.into_owned()));
    }
    let mut content_length = None;
    let mut authorization = None;
    let mut chunked = false;
    let mut connection = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            // One Content-Length, digits only (httparse already trimmed
            // the optional whitespace around a field value). A second one,
            // even an equal one, is refused: RFC 9112 lets a server take
            // equal duplicates, but a proxy in front may have chosen the
            // other, and a request read two ways is the smuggler's tool.
            let v = std::str::from_utf8(h.value).ok().and_then(digits::<usize>);
            match (v, content_length) {
                (Some(v), None) => content_length = Some(v),
                (_, Some(_)) => {
                    return Parsed::Reject(Response::error(400, "Content-Length given twice"))
                }
                (None, None) => return Parsed::Reject(Response::error(400, "bad Content-Length")),
            }
        } else if h.name.eq_ignore_ascii_case("authorization") {
            authorization = std::str::from_utf8(h.value)
                .ok()
                .map(|s| s.trim().to_string());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            let v = std::str::from_utf8(h.value).unwrap_or("");
            for token in v.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    connection = Some(true);
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    connection = Some(false);
                }
            }
        }
    }
    // HTTP/1.0 closes unless asked to keep alive; 1.1 keeps alive unless asked.
    let close = connection.unwrap_or(req.version == Some(0));
    if chunked {
        return Parsed::Reject(Response::error(
            411,
            "send a Content-Length, not Transfer-Encoding",
        ));
    }
    let body_len = match (method.as_str(), content_length) {
        ("POST" | "PUT", None) => {
            return Parsed::Reject(Response::error(411, "Content-Length required"))
        }
        (_, None) => 0,
        (_, Some(n)) if n > max_body => {
            return Parsed::Reject(Response::error(413, &format!("body over {max_body} bytes")))
        }
        (_, Some(n)) => n,
    };
    Parsed::Head {
        req: Request {
            method,
            path: path.to_string(),
            query: query.to_string(),
            params,
            authorization,
            close,
            keep_alive_10: req.version == Some(0) && !close,
            body: Bytes::new(),
        },
        head_len,
        body_len,
    }
}

/// Read more bytes into `buf`, until `deadline`. Ok(false): end of stream.
async fn read_more(
    stream: &SharedStream,
    buf: &mut BytesMut,
    deadline: Instant,
) -> std::io::Result<bool> {
    let wait = deadline.saturating_duration_since(Instant::now());
    match crate::net::read_more(stream, buf, 4096, glommio::timer::sleep(wait)).await {
        crate::net::ReadMore::Data(_) => Ok(true),
        crate::net::ReadMore::Eof => Ok(false),
        crate::net::ReadMore::Interrupted => Err(std::io::ErrorKind::TimedOut.into()),
        crate::net::ReadMore::Err(e) => Err(e),
    }
}

/// [`read_more`], or, while no byte of the next request came, Ok(false)
/// once `quit` resolves.
async fn read_or_quit<Q: std::future::Future<Output = ()>>(
    stream: &SharedStream,
    buf: &mut BytesMut,
    deadline: Instant,
    started: bool,
    quit: &impl Fn() -> Q,
) -> std::io::Result<bool> {
    if started {
        return read_more(stream, buf, deadline).await;
    }
    futures_lite::future::or(read_more(stream, buf, deadline), async {
        quit().await;
        Ok(false)
    })
    .await
}

/// Write `out` whole within `limit`; false on error or deadline.
async fn write_within(stream: &mut SharedStream, out: &[u8], limit: Duration) -> bool {
    // Through TLS the write encrypts; the flush sends what that left.
    futures_lite::future::or(
        async { stream.write_all(out).await.is_ok() && stream.flush().await.is_ok() },
        async {
            glommio::timer::sleep(limit).await;
            false
        },
    )
    .await
}

/// Serve one HTTP connection: requests in order (pipelined ones too), each
/// answered by `handler`, until the client closes, asks to, breaks the
/// protocol, or misses a deadline.
/// `count` sees the status of every answer, including the rejections
/// made here before a handler runs (400, 408, 411, 413, 431).
/// Once `quit` resolves, a connection waiting for its next request closes
/// (one in the middle of a request is answered first).
pub async fn serve_conn<H, F, Q>(
    stream: SharedStream,
    read: BytesMut,
    limits: HttpLimits,
    handler: H,
    count: impl Fn(u16),
    quit: impl Fn() -> Q,
) where
    H: Fn(Request) -> F,
    F: std::future::Future<Output = Response>,
    Q: std::future::Future<Output = ()>,
{
    let _ = stream.with(|s| s.set_nodelay(true));
    let mut stream = stream;
    let mut buf = read;
    buf.reserve(1024);
    let mut out = BytesMut::with_capacity(1024);
    // A new connection gets head_timeout for its first request's first
    // byte: one that sends nothing cannot hold a place for idle_timeout.
    let mut first = true;
    loop {
        // Head: wait up to idle_timeout (keep-alive) for its first byte,
        // then head_timeout.
        let wait = if first {
            limits.head_timeout
        } else {
            limits.idle_timeout
        };
        first = false;
        let mut deadline = Instant::now() + wait;
        let mut started = !buf.is_empty();
        if started {
            deadline = Instant::now() + limits.head_timeout;
        }
        let (mut req, head_len, body_len) = loop {
            match parse_head(&buf, limits.max_body) {
                Parsed::Head {
                    req,
                    head_len,
                    body_len,
                } => break (req, head_len, body_len),
                Parsed::Reject(resp) => {
                    out.clear();
                    count(resp.status);
                    resp.closing().encode(&mut out);
                    write_within(&mut stream, &out, limits.body_timeout).await;
                    return;
                }
                Parsed::Partial => {
                    match read_or_quit(&stream, &mut buf, deadline, started, &quit).await {
                        Ok(true) => {
                            if !started {
                                started = true;
                                deadline = Instant::now() + limits.head_timeout;
                            }
                        }
                        Ok(false) => return,
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut && started => {
                            out.clear();
                            count(408);
                            Response::error(408, "request head not received in time")
                                .closing()
                                .encode(&mut out);
                            write_within(&mut stream, &out, limits.body_timeout).await;
                            return;
                        }
                        Err(_) => return,
                    }
                }
            }
        };
        let deadline = Instant::now() + limits.body_timeout;
        while buf.len() < head_len + body_len {
            match read_more(&stream, &mut buf, deadline).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    out.clear();
                    count(408);
                    Response::error(408, "request body not received in time")
                        .closing()
                        .encode(&mut out);
                    write_within(&mut stream, &out, limits.body_timeout).await;
                    return;
                }
                Err(_) => return,
            }
        }
        let mut frame = buf.split_to(head_len + body_len);
        req.body = frame.split_off(head_len).freeze();
        let asked_close = req.close;
        let keep_alive_10 = req.keep_alive_10;
        let mut resp = handler(req).await;
        count(resp.status);
        resp.close |= asked_close;
        resp.keep_alive = keep_alive_10;
        let close = resp.close;
        out.clear();
        resp.encode(&mut out);
        // A client that does not read its answers cannot hold the slot.
        if !write_within(&mut stream, &out, limits.body_timeout).await || close {
            return;
        }
        if buf.capacity() > 64 * 1024 && buf.is_empty() {
            buf = BytesMut::with_capacity(1024);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Parsed {
        parse_head(raw.as_bytes(), 100)
    }

    #[test]
    fn parses_a_post_with_query_and_auth() {
        let Parsed::Head { req, head_len, body_len } =
            head("POST /v1/push?players=1,2&msg=7 HTTP/1.1\r\nAuthorization: Bearer x\r\nContent-Length: 5\r\n\r\nhello")
        else {
            panic!("expected a head")
        };
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("POST", "/v1/push")
        );
        assert_eq!(req.param("players"), Some("1,2"));
        assert_eq!(req.param("msg"), Some("7"));
        assert_eq!(req.param("nope"), None);
        assert_eq!(req.authorization.as_deref(), Some("Bearer x"));
        assert!(!req.close);
        assert_eq!(body_len, 5);
        assert_eq!(head_len, 88);
    }

    fn status(p: Parsed) -> u16 {
        match p {
            Parsed::Reject(r) => r.status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn query_parameters_are_decoded_and_given_once() {
        let Parsed::Head { req, .. } =
            head("GET /v1/push?players=1%2C2&to=gw%2Db&msg=7 HTTP/1.1\r\n\r\n")
        else {
            panic!("expected a head")
        };
        assert_eq!(req.param("players"), Some("1,2"));
        assert_eq!(req.param("to"), Some("gw-b"));
        assert_eq!(req.param("msg"), Some("7"));
        assert_eq!(
            status(head("GET /v1/push?msg=1&msg=2 HTTP/1.1\r\n\r\n")),
            400
        );
    }

    #[test]
    fn connection_close_and_http_1_0() {
        let close = |raw: &str| match head(raw) {
            Parsed::Head { req, .. } => req.close,
            other => panic!("{other:?}"),
        };
        assert!(close("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!close("GET / HTTP/1.1\r\n\r\n"));
        assert!(close("GET / HTTP/1.0\r\n\r\n"));
        assert!(!close("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        let kept = |raw: &str| match head(raw) {
            Parsed::Head { req, .. } => req.keep_alive_10,
            other => panic!("{other:?}"),
        };
        assert!(kept("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!kept("GET / HTTP/1.0\r\n\r\n"));
        assert!(!kept("GET / HTTP/1.1\r\n\r\n"));
        let mut out = BytesMut::new();
        let mut r = Response::json(200, "{}".into());
        r.keep_alive = true;
        r.encode(&mut out);
        assert!(String::from_utf8_lossy(&out).contains("Connection: keep-alive\r\n"));
    }

    #[test]
    fn bad_heads_get_their_status() {
        assert!(matches!(head("GET /healthz HTTP/1.1\r\n"), Parsed::Partial));
        assert_eq!(status(head("POST /v1/push HTTP/1.1\r\n\r\n")), 411);
        assert_eq!(
            status(head(
                "POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            )),
            411
        );
        assert_eq!(
            status(head("POST /x HTTP/1.1\r\nContent-Length: 101\r\n\r\n")),
            413
        );
        assert_eq!(
            status(head("POST /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n")),
            400
        );
        assert_eq!(
            status(head(
                "POST /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
            )),
            400
        );
        // Digits only, once: what `str::parse` would also take is refused.
        for bad in ["+5", "5 5", "0x5", "5,5", ""] {
            let req = format!("POST /x HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert_eq!(status(head(&req)), 400, "Content-Length: {bad:?}");
        }
        assert_eq!(
            status(head(
                "POST /x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
            )),
            400
        );
        // The optional whitespace around a field value is not part of it.
        assert!(matches!(
            head("POST /x HTTP/1.1\r\nContent-Length:  7 \r\n\r\n"),
            Parsed::Head { body_len: 7, .. }
        ));
        assert_eq!(status(head("GARBAGE\r\n\r\n")), 400);
        let many: String = (0..40).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(head(&format!("GET / HTTP/1.1\r\n{many}\r\n"))), 431);
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(status(head(&big)), 431);
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
