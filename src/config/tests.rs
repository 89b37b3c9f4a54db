//! The config's rules, key by key: the shipped file against the defaults,
//! and each refusal with its one-line message. Why one file of this
//! length: every test loads the same template and mutates one key, and
//! they read best side by side.

use super::*;

fn default_text() -> String {
    DEFAULT_RON.to_string()
}

/// The default file with `from` replaced by `to` (which must occur once).
fn edited(from: &str, to: &str) -> String {
    let text = default_text();
    assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once");
    text.replace(from, to)
}

fn err(text: &str) -> String {
    Config::from_ron(text, "gateway.ron")
        .expect_err("config should be rejected")
        .to_string()
}

fn invalid_of(mutate: impl FnOnce(&mut Config)) -> String {
    let mut c = Config::embedded_default();
    mutate(&mut c);
    let e = c.validate().expect_err("config should be rejected");
    assert!(matches!(e, ConfigError::Invalid { .. }), "{e:?}");
    e.to_string()
}

#[test]
fn embedded_default_parses_and_validates() {
    let c = Config::embedded_default();
    c.validate().unwrap();
    assert_eq!(
        c.listen_addr().unwrap(),
        "127.0.0.1:7000".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        c.http_listen_addr().unwrap(),
        "127.0.0.1:7001".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.shards, None);
    assert!(c.shard_count() >= 1);
    assert_eq!(c.max_frame, 65536);
    assert_eq!(c.max_connections, 100_000);
    assert_eq!(c.session_idle, Duration::from_secs(60));
    assert_eq!(c.player_linger, Duration::from_secs(300));
    assert_eq!(
        c.outbox,
        OutboxLimits {
            max_frames: 1024,
            max_bytes: 4_194_304
        }
    );
    assert_eq!(c.write_queue_bytes, 1_048_576);
    assert_eq!(
        c.backend,
        BackendConfig {
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            health_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(1),
        }
    );
    assert_eq!(c.services.len(), 1);
    assert_eq!(c.services["demo"].instances, vec!["127.0.0.1:7100"]);
    let r: Vec<_> = c
        .routes
        .iter()
        .map(|r| (r.msgs, r.service.as_str(), r.auth, r.login, r.balance))
        .collect();
    assert_eq!(
        r,
        vec![
            ((1, 1), "demo", false, true, Balance::RoundRobin),
            ((2, 2), "demo", false, false, Balance::RoundRobin),
            ((100, 199), "demo", true, false, Balance::RoundRobin),
            ((200, 200), "demo", true, false, Balance::RoundRobin),
            ((201, 201), "demo", true, false, Balance::RoundRobin),
        ]
    );
    let orders: Vec<Order> = c.routes.iter().map(|r| r.order).collect();
    assert_eq!(
        orders,
        [[Order::Concurrent; 4].as_slice(), &[Order::PerPlayer]].concat()
    );
    assert_eq!(c.push_token, None);
    assert_eq!(c.demo_backend.as_deref(), Some("127.0.0.1:7100"));
    assert_eq!(c.log, "info");
}

#[test]
fn optional_keys_take_defaults() {
    let text = edited("    log: \"info\",\n", "")
        .replace("    demo_backend: Some(\"127.0.0.1:7100\"),\n", "")
        .replace("    shards: None,\n", "")
        .replace("    push_token: None,\n", "")
        .replace(", auth: false, login: true, balance: RoundRobin)", ")");
    let c = Config::from_ron(&text, "gateway.ron").unwrap();
    assert_eq!(c.log, "info");
    assert_eq!(c.demo_backend, None);
    assert_eq!(c.shards, None);
    assert!(!c.routes[0].auth && !c.routes[0].login);
    assert_eq!(c.routes[0].balance, Balance::RoundRobin);
}

#[test]
fn other_balances_and_shards_parse() {
    let text = edited("shards: None", "shards: Some(4)").replace(
        "(msgs: (100, 199), service: \"demo\", auth: true)",
        "(msgs: (100, 199), service: \"demo\", auth: true, balance: HashPlayer)",
    );
    let text = text.replace(
        "(msgs: (200, 200), service: \"demo\", auth: true)",
        "(msgs: (200, 200), service: \"demo\", auth: true, balance: Broadcast)",
    );
    let c = Config::from_ron(&text, "gateway.ron").unwrap();
    assert_eq!(c.shard_count(), 4);
    assert_eq!(c.routes[2].balance, Balance::HashPlayer);
    assert_eq!(c.routes[3].balance, Balance::Broadcast);
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("slg-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.ron");
    std::fs::write(&good, DEFAULT_RON).unwrap();
    assert_eq!(Config::load(&good).unwrap().max_frame, 65536);

    let bad = dir.join("bad.ron");
    std::fs::write(&bad, DEFAULT_RON.replace("max_frame:", "maxframe:")).unwrap();
    let e = Config::load(&bad).unwrap_err().to_string();
    assert!(e.starts_with(&format!("config {}:", bad.display())), "{e}");
    assert!(e.contains("unknown field `maxframe`"), "{e}");

    let missing = dir.join("missing.ron");
    let e = Config::load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Io { .. }));
    let e = e.to_string();
    assert!(
        e.starts_with(&format!("config {}: cannot read: ", missing.display())),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn syntax_error_names_origin_line_and_col() {
    let text = edited("max_connections: 100000,", "max_connections: 100000,,");
    let line = text
        .lines()
        .position(|l| l.contains("max_connections: 100000,,"))
        .unwrap()
        + 1;
    let e = err(&text);
    assert!(e.starts_with(&format!("config gateway.ron:{line}:")), "{e}");
    assert!(!e.contains('\n'), "{e}");
}

#[test]
fn unknown_key_names_the_key_and_line() {
    let text = edited("    max_frame: 65536,", "    maxframe: 65536,");
    let line = text.lines().position(|l| l.contains("maxframe:")).unwrap() + 1;
    let e = err(&text);
    assert!(e.starts_with(&format!("config gateway.ron:{line}:")), "{e}");
    assert!(
        e.contains("unknown field `maxframe`, expected one of `listen`"),
        "{e}"
    );
    assert!(e.contains("`max_frame`"), "{e}");
}

#[test]
fn unknown_nested_key_names_its_struct() {
    let e = err(&edited("max_bytes: 4194304", "max_byte: 4194304"));
    assert!(
        e.contains(
            "unknown field `max_byte` in `outbox`, expected one of `max_frames`, `max_bytes`"
        ),
        "{e}"
    );
    let e = err(&edited(
        "(msgs: (2, 2), service: \"demo\", auth: false)",
        "(msgs: (2, 2), service: \"demo\", auht: false)",
    ));
    assert!(e.contains("unknown field `auht` in `routes[1]`"), "{e}");
}

#[test]
fn missing_key_names_the_key() {
    // Only what only the user knows is required: services and routes.
    let start = DEFAULT_RON.find("    services: {").expect("services");
    let end = DEFAULT_RON[start..].find("\n    },\n").expect("end") + start + 7;
    let text = format!("{}{}", &DEFAULT_RON[..start], &DEFAULT_RON[end..]);
    let e = err(&text);
    assert!(e.starts_with("config gateway.ron:"), "{e}");
    assert!(e.contains("missing field `services`"), "{e}");
    let e = err("(services: {})");
    assert!(e.contains("missing field `routes`"), "{e}");
}

#[test]
fn a_config_of_services_and_routes_takes_every_other_default_of_the_template() {
    let short = Config::from_ron(
        r#"(
    services: { "demo": (instances: ["127.0.0.1:7100"]) },
    routes: [ (msgs: (1, 1), service: "demo", login: true) ],
)"#,
        "short.ron",
    )
    .expect("a short config is valid");
    let full = Config::embedded_default();
    // Every key the template sets takes the same value when left out,
    // except the template's own demo service.
    let mut expected = full.clone();
    expected.services = short.services.clone();
    expected.routes = short.routes.clone();
    expected.demo_backend = None;
    assert_eq!(format!("{short:?}"), format!("{expected:?}"));
}

#[test]
fn wrong_type_names_the_key() {
    let text = edited("max_frame: 65536,", "max_frame: \"big\",");
    let line = text.lines().position(|l| l.contains("\"big\"")).unwrap() + 1;
    let e = err(&text);
    assert!(e.starts_with(&format!("config gateway.ron:{line}:")), "{e}");
    assert!(e.contains("key `max_frame`"), "{e}");

    let e = err(&edited("(msgs: (100, 199)", "(msgs: (100, \"x\")"));
    assert!(e.contains("key `routes[2].msgs`"), "{e}");

    let e = err(&edited(
        "instances: [\"127.0.0.1:7100\"]",
        "instances: [7100]",
    ));
    assert!(e.contains("key `services.demo.instances[0]`"), "{e}");
}

#[test]
fn bad_duration_names_the_key() {
    let e = err(&edited("session_idle: \"60s\"", "session_idle: \"sixty\""));
    assert!(e.contains("key `session_idle`"), "{e}");
    let e = err(&edited("reconnect_max: \"5s\"", "reconnect_max: 5"));
    assert!(e.contains("key `backend.reconnect_max`"), "{e}");
}

#[test]
fn bad_enum_variant_names_the_key() {
    let e = err(&edited("balance: RoundRobin", "balance: Random"));
    assert!(e.contains("key `routes[0].balance`"), "{e}");
    assert!(e.contains("`Random` in enum `Balance`"), "{e}");
    let e = err(&edited("shards: None", "shards: 4"));
    assert!(
        e.contains("key `shards`: Expected option (write Some(value) or None)"),
        "{e}"
    );
}

#[test]
fn listen_addresses_must_parse() {
    let e = invalid_of(|c| c.listen = "localhost".into());
    assert!(
        e.starts_with("config key `listen`: `localhost` is not"),
        "{e}"
    );
    let e = invalid_of(|c| c.http_listen = "127.0.0.1".into());
    assert!(
        e.starts_with("config key `http_listen`: `127.0.0.1` is not"),
        "{e}"
    );
    let e = invalid_of(|c| c.demo_backend = Some("127.0.0.1:port".into()));
    assert!(e.starts_with("config key `demo_backend`:"), "{e}");
    let e = invalid_of(|c| {
        c.services
            .get_mut("demo")
            .unwrap()
            .instances
            .push("10.0.0.1".into())
    });
    assert!(
        e.starts_with("config key `services.demo.instances[1]`: `10.0.0.1` is not"),
        "{e}"
    );
    let mut c = Config::embedded_default();
    c.listen = "[::1]:9000".into();
    assert_eq!(
        c.listen_addr().unwrap(),
        "[::1]:9000".parse::<SocketAddr>().unwrap()
    );
}

#[test]
fn shards_must_be_in_range() {
    let e = invalid_of(|c| c.shards = Some(0));
    assert_eq!(
        e,
        "config key `shards`: must be None or Some(1..=1024), got Some(0)"
    );
    let e = invalid_of(|c| c.shards = Some(1025));
    assert!(e.starts_with("config key `shards`:"), "{e}");
    let mut c = Config::embedded_default();
    c.shards = Some(1024);
    c.validate().unwrap();
    assert_eq!(c.shard_count(), 1024);
}

#[test]
fn max_frame_must_be_in_range() {
    let e = invalid_of(|c| c.max_frame = 63);
    assert_eq!(
        e,
        "config key `max_frame`: must be in 64..=16777216 bytes (20-byte header + body), got 63"
    );
    let e = invalid_of(|c| {
        c.max_frame = 16 * 1024 * 1024 + 1;
        c.write_queue_bytes = 64 * 1024 * 1024;
    });
    assert!(e.starts_with("config key `max_frame`:"), "{e}");
    let mut c = Config::embedded_default();
    c.max_frame = 64;
    c.validate().unwrap();
}

#[test]
fn max_connections_must_be_positive() {
    let e = invalid_of(|c| c.max_connections = 0);
    assert_eq!(e, "config key `max_connections`: must be greater than 0");
}

#[test]
fn an_error_is_one_line_whatever_the_file_holds() {
    // fuzz/regressions/config/listen-value-newline: a value with a newline
    // escape would have forged a second log line.
    let e = err(&edited(
        "listen: \"127.0.0.1:7000\",",
        "listen: \"127.0.0.1:7000\\nINFO forged log line\",",
    ));
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("\\nINFO forged"), "{e}");
    // fuzz/regressions/config/crash-8b366441...: a map key with a newline
    // in the key path of a syntax error.
    let e = err("(services: {\"a\nb\": (instances: [\"x\"], bogus: 1)}, routes: [])");
    assert_eq!(e.lines().count(), 1, "{e}");
}

#[test]
fn budgets_and_player_caps_are_checked() {
    let e = invalid_of(|c| c.max_players = 0);
    assert_eq!(e, "config key `max_players`: must be greater than 0");
    let e = invalid_of(|c| c.memory.outboxes = super::Budget::Bytes(1000));
    assert_eq!(
        e,
        "config key `memory.outboxes`: must be at least max_frame + 4 bytes"
    );
    let e = invalid_of(|c| {
        c.limits.takeovers = Some(super::TakeoverLimit {
            max: 0,
            ..Default::default()
        })
    });
    assert_eq!(
        e,
        "config key `limits.takeovers.max`: must be greater than 0"
    );
    let c: Config =
        ron::from_str(&edited("buffers: Auto,", "buffers: Bytes(1048576),")).expect("parses");
    assert_eq!(c.memory.buffers, super::Budget::Bytes(1 << 20));
    // Auto: a share of the memory; Unlimited: none.
    let b = super::Budget::Auto;
    assert_eq!(b.per_shard(Some(8 << 30), 4, 2), Some(1 << 30));
    assert_eq!(
        super::Budget::Unlimited.per_shard(Some(8 << 30), 4, 2),
        None
    );
}

#[test]
fn durations_must_be_positive() {
    let e = invalid_of(|c| c.session_idle = Duration::ZERO);
    assert_eq!(e, "config key `session_idle`: must be greater than 0");
    let e = invalid_of(|c| c.player_linger = Duration::ZERO);
    assert_eq!(e, "config key `player_linger`: must be greater than 0");
    let e = invalid_of(|c| c.backend.request_timeout = Duration::ZERO);
    assert_eq!(
        e,
        "config key `backend.request_timeout`: must be greater than 0"
    );
    let e = invalid_of(|c| c.backend.connect_timeout = Duration::ZERO);
    assert_eq!(
        e,
        "config key `backend.connect_timeout`: must be greater than 0"
    );
    let e = invalid_of(|c| c.backend.reconnect_min = Duration::ZERO);
    assert_eq!(
        e,
        "config key `backend.reconnect_min`: must be greater than 0"
    );
    let e = invalid_of(|c| c.backend.reconnect_max = Duration::ZERO);
    assert_eq!(
        e,
        "config key `backend.reconnect_max`: must be greater than 0"
    );
    // Through the file, too: "0s" parses and is then rejected.
    let e = err(&edited("player_linger: \"5m\"", "player_linger: \"0s\""));
    assert_eq!(e, "config key `player_linger`: must be greater than 0");
}

#[test]
fn reconnect_min_must_not_exceed_max() {
    let e = invalid_of(|c| c.backend.reconnect_min = Duration::from_secs(10));
    assert_eq!(
        e,
        "config key `backend.reconnect_min`: 10s is greater than backend.reconnect_max (5s)"
    );
    let mut c = Config::embedded_default();
    c.backend.reconnect_min = c.backend.reconnect_max;
    c.validate().unwrap();
}

#[test]
fn outbox_limits_must_be_positive() {
    let e = invalid_of(|c| c.outbox.max_frames = 0);
    assert_eq!(e, "config key `outbox.max_frames`: must be greater than 0");
    let e = invalid_of(|c| c.outbox.max_bytes = 0);
    assert_eq!(e, "config key `outbox.max_bytes`: must be greater than 0");
}

#[test]
fn durations_have_an_upper_bound() {
    let e = invalid_of(|c| c.backend.request_timeout = Duration::from_secs(400 * 24 * 3600));
    assert!(
        e.starts_with("config key `backend.request_timeout`: must be at most 365 days"),
        "{e}"
    );
}

#[test]
fn write_queue_must_hold_a_largest_frame() {
    let e = invalid_of(|c| c.write_queue_bytes = 65536 + 3);
    assert_eq!(
        e,
        "config key `write_queue_bytes`: must be at least max_frame + 4 = 65540 bytes so that one largest frame fits, got 65539"
    );
    let mut c = Config::embedded_default();
    c.write_queue_bytes = 65536 + 4;
    c.validate().unwrap();
}

#[test]
fn services_empty_only_without_routes() {
    let e = invalid_of(|c| c.services.clear());
    assert!(e.starts_with("config key `services`: is empty"), "{e}");
    let mut c = Config::embedded_default();
    c.services.clear();
    c.routes.clear();
    c.validate().unwrap();
}

#[test]
fn service_needs_an_instance() {
    let e = invalid_of(|c| c.services.get_mut("demo").unwrap().instances.clear());
    assert_eq!(
        e,
        "config key `services.demo.instances`: a service needs at least one instance"
    );
}

#[test]
fn route_range_must_be_ordered() {
    let e = invalid_of(|c| c.routes[2].msgs = (199, 100));
    assert!(
        e.starts_with("config key `routes[2].msgs`: first 199 is greater than last 100"),
        "{e}"
    );
}

#[test]
fn route_ranges_must_not_overlap() {
    let e = invalid_of(|c| {
        c.routes.insert(
            2,
            RouteConfig {
                msgs: (150, 160),
                service: "demo".into(),
                auth: true,
                login: false,
                balance: Balance::RoundRobin,
                idempotent: false,
                order: Default::default(),
                group: None,
            },
        );
        c.routes.swap(2, 3);
    });
    assert_eq!(
        e,
        "config key `routes[3].msgs`: range 150..=160 overlaps routes[2] (100..=199)"
    );
    // Touching at one end is an overlap too; adjacency is not.
    let e = invalid_of(|c| c.routes[3].msgs = (199, 200));
    assert_eq!(
        e,
        "config key `routes[3].msgs`: range 199..=200 overlaps routes[2] (100..=199)"
    );
    let mut c = Config::embedded_default();
    c.routes[4].msgs = (201, 300);
    c.validate().unwrap();
}

#[test]
fn route_service_must_exist() {
    let e = invalid_of(|c| c.routes[0].service = "lgoin".into());
    assert_eq!(
        e,
        "config key `routes[0].service`: unknown service `lgoin` (known: demo)"
    );
}

#[test]
fn login_route_must_not_need_auth() {
    let e = invalid_of(|c| c.routes[0].auth = true);
    assert!(
        e.starts_with("config key `routes[0].auth`: a login route"),
        "{e}"
    );
    // Several login routes are fine.
    let mut c = Config::embedded_default();
    c.routes[1].login = true;
    c.validate().unwrap();
}

#[test]
fn push_token_must_not_be_empty() {
    let e = invalid_of(|c| c.push_token = Some(String::new()));
    assert!(
        e.starts_with("config key `push_token`: must not be empty"),
        "{e}"
    );
}

#[test]
fn every_error_is_one_line() {
    let cases = [
        err(&edited("listen: \"127.0.0.1:7000\"", "listen: 7000")),
        err(&edited("(msgs: (1, 1)", "(msgs: (1, 1, 1)")),
        err("not ron at all"),
        err(""),
    ];
    for e in cases {
        assert!(e.starts_with("config gateway.ron:"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
}

#[test]
fn key_path_scanner() {
    let t = "(\n a: 1, // x: (\n b: { \"k\": (c: [1, 2, \"x(\", 4]) },\n)";
    let pos = |needle: &str| {
        let off = t.find(needle).unwrap();
        let line = t[..off].matches('\n').count() + 1;
        let col = off - t[..off].rfind('\n').map_or(0, |p| p + 1) + 1;
        key_path_at(t, line, col)
    };
    assert_eq!(pos("1,").full, "a");
    assert_eq!(pos("4]").full, "b.k.c[3]");
    assert_eq!(pos("4]").parent, "b.k.c[3]");
    assert_eq!(pos("c:").parent, "b.k");
}

#[test]
fn the_shipped_outbox_outlasts_the_write_queue() {
    // A slow consumer is kicked once write_queue_bytes are queued; if the
    // outbox kept less, its resume would find frames evicted (RESUME_GAP).
    let c = Config::embedded_default();
    assert!(
        c.outbox.max_bytes > c.write_queue_bytes,
        "outbox.max_bytes {} <= write_queue_bytes {}",
        c.outbox.max_bytes,
        c.write_queue_bytes
    );
}

#[test]
fn an_http_api_open_to_other_hosts_needs_a_token_or_http_open() {
    let e = invalid_of(|c| c.http_listen = "0.0.0.0:7001".into());
    assert!(e.contains("http_listen") && e.contains("http_open"), "{e}");
    for tune in [
        (|c: &mut Config| c.push_token = Some("p".into())) as fn(&mut Config),
        |c| c.admin_token = Some("a".into()),
        |c| c.http_open = true,
    ] {
        let mut c = Config::embedded_default();
        c.http_listen = "0.0.0.0:7001".into();
        tune(&mut c);
        assert!(c.validate().is_ok());
    }
    let mut c = Config::embedded_default();
    c.http_listen = "[::1]:7001".into();
    assert!(c.validate().is_ok(), "the loopback needs nothing");
}
