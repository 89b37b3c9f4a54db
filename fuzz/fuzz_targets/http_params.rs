//! The API's token and parameter checks (`http::params`), on requests that
//! `parse_head` accepts: the input is split at its first two `\n` into the
//! push token, the admin token and the rest, which is a query string and
//! an `Authorization` value (split at its first `\n` again).
//!
//! Checked: no panic; `players` answers positive ids, each once, each the
//! decimal digits of one comma-separated item (a leading `+`, a sign, a
//! space or a repeat never passes as a number), or a 400; `page` and `ends`
//! answer within their documented ranges or a 400; `check_token` lets a
//! request through exactly when the model says (no token configured, or
//! `Bearer <token>` byte for byte with a token the endpoint takes), and
//! refuses with 401 or, for the push token on an admin endpoint, 403.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slg_gateway::http::params::{check_token, ends, page, players, scope, Scope, MAX_PAGE};
use slg_gateway::http::{parse_head, Parsed};

fn line(s: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(s).ok()?;
    (!s.is_empty() && !s.contains(['\r', '\n'])).then_some(s)
}

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(4, |&b| b == b'\n');
    let (Some(push), Some(admin), Some(query), auth) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (push, admin) = (line(push), line(admin));
    let Ok(query) = std::str::from_utf8(query) else {
        return;
    };
    let auth = auth.and_then(line);
    for path in ["/v1/push", "/v1/kick", "/v1/players/7", "/healthz"] {
        let mut raw = format!("GET {path}?{query} HTTP/1.1\r\n");
        if let Some(a) = auth {
            raw.push_str(&format!("Authorization: {a}\r\n"));
        }
        raw.push_str("\r\n");
        let Parsed::Head { req, .. } = parse_head(raw.as_bytes(), 0) else {
            continue;
        };
        match players(&req) {
            Ok(ids) => {
                let list = req.param("players").expect("players were given");
                let items: Vec<&str> = list.split(',').collect();
                let mut seen = std::collections::HashSet::new();
                for id in &ids {
                    assert!(*id > 0);
                    assert!(seen.insert(*id), "{id} twice");
                    assert!(items.contains(&id.to_string().as_str()) || items.iter().any(|i| i.trim_start_matches('0') == id.to_string()), "{id} not an item of {list:?}");
                }
                for item in items {
                    assert!(!item.is_empty() && item.bytes().all(|b| b.is_ascii_digit()), "{item:?} passed");
                }
            }
            Err(r) => assert_eq!(r.status, 400),
        }
        match page(&req) {
            Ok((_, limit)) => assert!((1..=MAX_PAGE).contains(&limit)),
            Err(r) => assert_eq!(r.status, 400),
        }
        match ends(&req) {
            Ok(end) => assert_eq!(end, req.param("resume") != Some("true")),
            Err(r) => assert_eq!(r.status, 400),
        }
        // The model of the tokens.
        let got = req.authorization.as_deref().unwrap_or("");
        let is = |t: Option<&str>| t.is_some_and(|t| got == format!("Bearer {t}"));
        let model = if push.is_none() && admin.is_none() {
            None
        } else {
            match scope(&req.path) {
                Scope::Any | Scope::Push => (!(is(push) || is(admin))).then_some(401),
                Scope::Admin if is(push) && !is(admin) => Some(403),
                Scope::Admin => (!(admin.is_none() || is(admin))).then_some(401),
            }
        };
        assert_eq!(
            check_token(push, admin, &req).map(|r| r.status),
            model,
            "path {path:?} auth {got:?} push {push:?} admin {admin:?}"
        );
    }
});
