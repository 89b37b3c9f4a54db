//! Wire contract of the gateway (PROTOCOL.md sections 1-4).
//!
//! This module owns the byte-level shape of everything on the two TCP links:
//! the frame kinds ([`Kind`]) and which link direction may carry which
//! ([`Link`]), the gateway status codes ([`Code`]), the 20-byte frame header
//! ([`Header`]) and the decoded [`Frame`]. The [`codec`] submodule turns bytes
//! into frames and back (length-prefixed framing, validation of `len` and
//! `kind`, zero-copy bodies) and builds / parses the structured `SESSION` and
//! `REDIRECT` bodies. All integers on the wire are big-endian.
//!
//! Nothing here knows about sessions, routing or I/O; it is pure and
//! allocation-aware so that readers and writers on every core can share it.

pub mod codec;
pub use codec::*;

use bytes::Bytes;

/// Size of the `len` field that precedes every frame.
pub const LEN_PREFIX: usize = 4;
/// Size of the fixed header (`kind` .. `seq`) counted in `len`.
pub const HEADER_LEN: usize = 20;
/// Default upper bound of `len` (header plus body), PROTOCOL.md section 1.
pub const DEFAULT_MAX_FRAME: u32 = 65536;

/// Frame kind (PROTOCOL.md sections 2 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client -> gateway, gateway -> backend.
    Request = 0x01,
    /// Client -> gateway (acknowledges `seq`), gateway -> backend (health check).
    Ping = 0x02,
    /// Client -> gateway: body = reconnect token, `seq` = last seq received.
    Resume = 0x03,
    /// Client -> gateway: `seq` = last seq received; no answer.
    Ack = 0x04,
    /// Client -> gateway: logout.
    Bye = 0x05,
    /// Gateway -> client, backend -> gateway.
    Response = 0x81,
    /// Gateway -> client.
    Push = 0x82,
    /// Gateway -> client, backend -> gateway.
    Pong = 0x83,
    /// Gateway -> client: body = player id (u64) + reconnect token.
    Session = 0x84,
    /// Gateway -> client: `code` = reason; the connection closes after it.
    Kick = 0x85,
    /// Gateway -> client: body = u16 address length, address, token.
    Redirect = 0x86,
    /// Gateway -> client: connection-level error.
    Error = 0x87,
}

impl Kind {
    /// Every kind, in wire-value order.
    pub const ALL: [Kind; 12] = [
        Kind::Request,
        Kind::Ping,
        Kind::Resume,
        Kind::Ack,
        Kind::Bye,
        Kind::Response,
        Kind::Push,
        Kind::Pong,
        Kind::Session,
        Kind::Kick,
        Kind::Redirect,
        Kind::Error,
    ];

    /// The kind with this wire value, on any link.
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            0x01 => Kind::Request,
            0x02 => Kind::Ping,
            0x03 => Kind::Resume,
            0x04 => Kind::Ack,
            0x05 => Kind::Bye,
            0x81 => Kind::Response,
            0x82 => Kind::Push,
            0x83 => Kind::Pong,
            0x84 => Kind::Session,
            0x85 => Kind::Kick,
            0x86 => Kind::Redirect,
            0x87 => Kind::Error,
            _ => return None,
        })
    }

    /// The name PROTOCOL.md uses, e.g. `"REQUEST"`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Request => "REQUEST",
            Kind::Ping => "PING",
            Kind::Resume => "RESUME",
            Kind::Ack => "ACK",
            Kind::Bye => "BYE",
            Kind::Response => "RESPONSE",
            Kind::Push => "PUSH",
            Kind::Pong => "PONG",
            Kind::Session => "SESSION",
            Kind::Kick => "KICK",
            Kind::Redirect => "REDIRECT",
            Kind::Error => "ERROR",
        }
    }
}

/// Which direction of which link a decoder reads: decides which kinds are legal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Client -> gateway: `0x01..=0x05`.
    ClientToGateway,
    /// Gateway -> client: `0x81..=0x87`.
    GatewayToClient,
    /// Gateway -> backend: `0x01` (REQUEST), `0x02` (PING).
    GatewayToBackend,
    /// Backend -> gateway: `0x81` (RESPONSE), `0x83` (PONG).
    BackendToGateway,
}

impl Link {
    /// The kind with wire value `kind` if this link direction may carry it.
    pub fn accepts(self, kind: u8) -> Option<Kind> {
        let legal = match self {
            Link::ClientToGateway => (0x01..=0x05).contains(&kind),
            Link::GatewayToClient => (0x81..=0x87).contains(&kind),
            Link::GatewayToBackend => kind == 0x01 || kind == 0x02,
            Link::BackendToGateway => kind == 0x81 || kind == 0x83,
        };
        if legal {
            Kind::from_u8(kind)
        } else {
            None
        }
    }
}

/// Gateway codes of PROTOCOL.md section 4 (values exact). Application codes
/// (< 0x8000) stay raw `u16` and are passed through unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Code {
    Ok = 0,
    NoRoute = 0x8001,
    NotAuthenticated = 0x8002,
    BackendUnavailable = 0x8003,
    Timeout = 0x8004,
    Overloaded = 0x8005,
    AlreadyAuthenticated = 0x8006,
    LoginInProgress = 0x8007,
    ShuttingDown = 0x8008,
    Migrating = 0x8009,
    ResumeRejected = 0x8010,
    ResumeGap = 0x8011,
    RateLimited = 0x8012,
    /// An addition (docs/PROTOCOL.md): a login refused because the player
    /// already has a live session and `on_second_login` is `RejectNew`.
    AlreadyOnline = 0x8013,
    Replaced = 0x8101,
    Idle = 0x8102,
    Shutdown = 0x8103,
    Admin = 0x8104,
    ProtocolError = 0x8105,
    SlowConsumer = 0x8106,
    /// An addition (docs/PROTOCOL.md): not logged in within `login_timeout`.
    LoginTimeout = 0x8107,
}

impl Code {
    /// `GAP` in a `SESSION` frame is the same value as `RESUME_GAP`.
    pub const GAP: Code = Code::ResumeGap;

    /// Every code, in wire-value order.
    pub const ALL: [Code; 21] = [
        Code::Ok,
        Code::NoRoute,
        Code::NotAuthenticated,
        Code::BackendUnavailable,
        Code::Timeout,
        Code::Overloaded,
        Code::AlreadyAuthenticated,
        Code::LoginInProgress,
        Code::ShuttingDown,
        Code::Migrating,
        Code::ResumeRejected,
        Code::ResumeGap,
        Code::RateLimited,
        Code::AlreadyOnline,
        Code::Replaced,
        Code::Idle,
        Code::Shutdown,
        Code::Admin,
        Code::ProtocolError,
        Code::SlowConsumer,
        Code::LoginTimeout,
    ];

    /// The named code with this value (`OK` or a gateway code).
    pub fn from_u16(v: u16) -> Option<Code> {
        Some(match v {
            0x0000 => Code::Ok,
            0x8001 => Code::NoRoute,
            0x8002 => Code::NotAuthenticated,
            0x8003 => Code::BackendUnavailable,
            0x8004 => Code::Timeout,
            0x8005 => Code::Overloaded,
            0x8006 => Code::AlreadyAuthenticated,
            0x8007 => Code::LoginInProgress,
            0x8008 => Code::ShuttingDown,
            0x8009 => Code::Migrating,
            0x8010 => Code::ResumeRejected,
            0x8011 => Code::ResumeGap,
            0x8012 => Code::RateLimited,
            0x8013 => Code::AlreadyOnline,
            0x8101 => Code::Replaced,
            0x8102 => Code::Idle,
            0x8103 => Code::Shutdown,
            0x8104 => Code::Admin,
            0x8105 => Code::ProtocolError,
            0x8106 => Code::SlowConsumer,
            0x8107 => Code::LoginTimeout,
            _ => return None,
        })
    }

    /// The name PROTOCOL.md uses, e.g. `"NO_ROUTE"`.
    pub fn name(self) -> &'static str {
        match self {
            Code::Ok => "OK",
            Code::NoRoute => "NO_ROUTE",
            Code::NotAuthenticated => "NOT_AUTHENTICATED",
            Code::BackendUnavailable => "BACKEND_UNAVAILABLE",
            Code::Timeout => "TIMEOUT",
            Code::Overloaded => "OVERLOADED",
            Code::AlreadyAuthenticated => "ALREADY_AUTHENTICATED",
            Code::LoginInProgress => "LOGIN_IN_PROGRESS",
            Code::ShuttingDown => "SHUTTING_DOWN",
            Code::Migrating => "MIGRATING",
            Code::ResumeRejected => "RESUME_REJECTED",
            Code::ResumeGap => "RESUME_GAP",
            Code::RateLimited => "RATE_LIMITED",
            Code::AlreadyOnline => "ALREADY_ONLINE",
            Code::Replaced => "REPLACED",
            Code::Idle => "IDLE",
            Code::Shutdown => "SHUTDOWN",
            Code::Admin => "ADMIN",
            Code::ProtocolError => "PROTOCOL_ERROR",
            Code::SlowConsumer => "SLOW_CONSUMER",
            Code::LoginTimeout => "LOGIN_TIMEOUT",
        }
    }

    /// Whether a raw code belongs to the gateway (`>= 0x8000`) rather than
    /// the application.
    pub fn is_gateway(raw: u16) -> bool {
        raw >= 0x8000
    }
}

impl From<Code> for u16 {
    fn from(c: Code) -> u16 {
        c as u16
    }
}

/// The 20-byte header. `seq` is `seq` on the client link and `player` on the
/// backend link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    /// Reserved: senders write 0, receivers ignore (kept raw as received).
    pub flags: u8,
    /// Raw status / reason code (application codes are < 0x8000).
    pub code: u16,
    pub msg_id: u32,
    pub req_id: u32,
    /// `seq` on the client link, `player` on the backend link.
    pub seq: u64,
}

impl Header {
    /// A header of this kind with every other field 0.
    pub fn new(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            code: 0,
            msg_id: 0,
            req_id: 0,
            seq: 0,
        }
    }
}

/// One decoded frame. `body` is a zero-copy slice of the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
}
