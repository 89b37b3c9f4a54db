//! The pure checks of the API's requests: tokens and query parameters.
//! Each takes a parsed [`Request`] and answers the value or the refusal,
//! with no shard state, so the endpoints stay short and a fuzz target
//! (fuzz/fuzz_targets/http_params.rs) reaches every one.

use super::{digits, Request, Response};
use subtle::ConstantTimeEq;

/// Most players one listing page returns.
pub const MAX_PAGE: usize = 1000;

/// Constant-time equality of an `Authorization` header with the expected
/// value: the time depends on the lengths only, never on where they differ.
pub fn authorized(got: &str, want: &str) -> bool {
    let mut g = got.as_bytes().to_vec();
    g.resize(want.len(), 0);
    let same_len = (got.len() as u64).ct_eq(&(want.len() as u64));
    (g.ct_eq(want.as_bytes()) & same_len).into()
}

/// Which token an endpoint takes (docs/PROTOCOL.md, "Tokens").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `/healthz`: any configured token.
    Any,
    /// Push, broadcast, one player's state: `push_token` (or `admin_token`).
    Push,
    /// Everything else (kick, drain, reload, migrate, evacuate, listing,
    /// metrics): `admin_token` only.
    Admin,
}

pub fn scope(path: &str) -> Scope {
    match path {
        "/healthz" => Scope::Any,
        "/v1/push" | "/v1/broadcast" => Scope::Push,
        p if p.starts_with("/v1/players/") => Scope::Push,
        _ => Scope::Admin,
    }
}

/// Whether `req` may pass with tokens `push` and `admin` configured:
/// None: let it through; Some: the refusal (401, or 403 for the push
/// token on an admin endpoint).
pub fn check_token(push: Option<&str>, admin: Option<&str>, req: &Request) -> Option<Response> {
    let got = req.authorization.as_deref().unwrap_or("");
    let is = |t: Option<&str>| t.is_some_and(|t| authorized(got, &format!("Bearer {t}")));
    if push.is_none() && admin.is_none() {
        return None;
    }
    let ok = match scope(&req.path) {
        Scope::Any | Scope::Push => is(push) || is(admin),
        // Known, but not allowed here: 403 (401 is for no or a wrong token).
        Scope::Admin if is(push) && !is(admin) => {
            return Some(Response::error(
                403,
                "this endpoint needs admin_token; push_token opens push, broadcast and player lookups only",
            ))
        }
        Scope::Admin => admin.is_none() || is(admin),
    };
    (!ok).then(|| Response::error(401, "missing or wrong Authorization: Bearer token"))
}

/// A player id: a positive integer, digits only.
pub fn player(s: &str) -> Option<u64> {
    digits::<u64>(s).filter(|&p| p > 0)
}

/// `msg`: the msg_id of a push, 0..=4294967295.
pub fn msg(req: &Request) -> Result<u32, Response> {
    match req.param("msg") {
        None | Some("") => Err(Response::error(400, "missing msg")),
        Some(m) => digits::<u32>(m)
            .ok_or(())
            .map_err(|_| Response::error(400, "msg must be an integer 0..=4294967295")),
    }
}

/// `players=1,2,3`: positive integers, comma-separated, each once (a
/// repeat is dropped), in the order given.
pub fn players(req: &Request) -> Result<Vec<u64>, Response> {
    let Some(list) = req.param("players").filter(|l| !l.is_empty()) else {
        return Err(Response::error(400, "missing players"));
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for item in list.split(',') {
        let Some(p) = player(item) else {
            return Err(Response::error(
                400,
                &format!("bad player id {item:?}: positive integers, comma-separated"),
            ));
        };
        if seen.insert(p) {
            out.push(p);
        }
    }
    Ok(out)
}

/// A kick's `resume`: absent or `false` ends the player (true), `true`
/// keeps it for a resume (false).
pub fn ends(req: &Request) -> Result<bool, Response> {
    match req.param("resume") {
        None | Some("false") => Ok(true),
        Some("true") => Ok(false),
        Some(_) => Err(Response::error(400, "resume must be true or false")),
    }
}

/// A listing's `after` (a player id, default 0) and `limit` (1..=MAX_PAGE,
/// default 100).
pub fn page(req: &Request) -> Result<(u64, usize), Response> {
    let after = match req.param("after") {
        None | Some("") => 0,
        Some(a) => {
            digits::<u64>(a).ok_or_else(|| Response::error(400, "after must be a player id"))?
        }
    };
    let limit = match req.param("limit") {
        None | Some("") => 100,
        Some(l) => match digits::<usize>(l) {
            Some(l) if (1..=MAX_PAGE).contains(&l) => l,
            _ => {
                return Err(Response::error(
                    400,
                    &format!("limit must be 1..={MAX_PAGE}"),
                ))
            }
        },
    };
    Ok((after, limit))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(query: &str) -> Request {
        match super::super::parse_head(format!("GET /v1/x?{query} HTTP/1.1\r\n\r\n").as_bytes(), 0)
        {
            super::super::Parsed::Head { req, .. } => req,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parameters_are_checked_each_with_its_answer() {
        assert_eq!(players(&req("players=3,1,3,2")).ok(), Some(vec![3, 1, 2]));
        for bad in [
            "players=",
            "players=0",
            "players=1,,2",
            "players=%2B1",
            "x=1",
        ] {
            assert_eq!(
                players(&req(bad)).err().map(|r| r.status),
                Some(400),
                "{bad}"
            );
        }
        assert_eq!(ends(&req("")).ok(), Some(true));
        assert_eq!(ends(&req("resume=true")).ok(), Some(false));
        assert!(ends(&req("resume=yes")).is_err());
        assert_eq!(page(&req("")).ok(), Some((0, 100)));
        assert_eq!(page(&req("after=7&limit=1000")).ok(), Some((7, 1000)));
        assert!(page(&req("limit=1001")).is_err() && page(&req("after=-1")).is_err());
        let auth = |h: &str| {
            let raw = format!("GET /v1/kick HTTP/1.1\r\nAuthorization: {h}\r\n\r\n");
            match super::super::parse_head(raw.as_bytes(), 0) {
                super::super::Parsed::Head { req, .. } => req,
                other => panic!("{other:?}"),
            }
        };
        let status = |r: Option<Response>| r.map(|r| r.status);
        assert_eq!(
            status(check_token(Some("p"), Some("a"), &auth("Bearer a"))),
            None
        );
        assert_eq!(
            status(check_token(Some("p"), Some("a"), &auth("Bearer p"))),
            Some(403)
        );
        assert_eq!(
            status(check_token(Some("p"), Some("a"), &auth("Bearer x"))),
            Some(401)
        );
        assert_eq!(status(check_token(None, None, &auth(""))), None);
    }

    #[test]
    fn authorization_compare() {
        assert!(authorized("Bearer abc", "Bearer abc"));
        assert!(!authorized("Bearer abd", "Bearer abc"));
        assert!(!authorized("Bearer ab", "Bearer abc"));
        assert!(!authorized("Bearer abc\0", "Bearer abc"));
        assert!(!authorized("", "Bearer abc"));
    }
}
