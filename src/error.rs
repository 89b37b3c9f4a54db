//! The gateway's one error type at the core's borders. Each failure says
//! where it came from ([`Origin`]), whether sending the same request again
//! is safe, and what it becomes: the wire code the client gets, the log
//! line (its `Display`) and the metric (`slg_errors_total{origin,code}`).

use crate::protocol::Code;
use std::borrow::Cow;
use std::fmt;

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// The client broke the protocol or asked for something it may not.
    Client,
    /// A backend could not be reached or could not take the request.
    Backend,
    /// The cluster (Redis, another gateway) could not do its part.
    Cluster,
    /// The gateway itself (a bug, or a state that should not happen).
    Internal,
}

impl Origin {
    /// Every origin, in order.
    pub const ALL: [Origin; 4] = [
        Origin::Client,
        Origin::Backend,
        Origin::Cluster,
        Origin::Internal,
    ];

    /// The label in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Backend => "backend",
            Origin::Cluster => "cluster",
            Origin::Internal => "internal",
        }
    }
}

/// A failure, as the core receives or reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub origin: Origin,
    /// What the client is told (in a RESPONSE, ERROR or KICK).
    pub code: Code,
    /// Nothing was applied: the same request may be sent again.
    pub retry_safe: bool,
    /// For the log line.
    pub detail: Cow<'static, str>,
}

impl Error {
    pub fn new(
        origin: Origin,
        code: Code,
        retry_safe: bool,
        detail: impl Into<Cow<'static, str>>,
    ) -> Error {
        Error {
            origin,
            code,
            retry_safe,
            detail: detail.into(),
        }
    }

    /// The client broke the protocol: its connection is kicked.
    pub fn protocol(detail: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Origin::Client, Code::ProtocolError, false, detail)
    }

    /// The cluster could not do its part (a claim, a fetch, a hand-over);
    /// nothing was applied.
    pub fn cluster(detail: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Origin::Cluster, Code::BackendUnavailable, true, detail)
    }

    /// A request that never reached a backend (safe to send again).
    pub fn not_sent(code: Code, detail: impl Into<Cow<'static, str>>) -> Error {
        Error::new(Origin::Backend, code, true, detail)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} error {}: {}",
            self.origin.name(),
            self.code.name(),
            self.detail
        )
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_reads_as_its_origin_code_and_detail() {
        let e = Error::not_sent(Code::Overloaded, "every instance is full");
        assert!(e.retry_safe);
        assert_eq!(
            e.to_string(),
            "backend error OVERLOADED: every instance is full"
        );
        assert_eq!(Error::protocol("bad kind").origin, Origin::Client);
    }
}
