//! The `slg-gateway` binary: start-up on the embedded default, the
//! stand-alone demo backend, and bad config files (exit status 2, one line
//! naming the key).

use slg_gateway::client::Client;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{address_after, config_text, sigterm, wait_exit, Proc, BIN};

#[test]
fn demo_backend_alone_then_a_gateway_on_a_short_config_in_front_of_it() {
    let mut demo = Proc(
        common::bin()
            .args(["demo-backend", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo backend"),
    );
    let backend = address_after(&mut demo.0, "demo backend listening on ");
    // A short config: what only the user knows (and ports of its own);
    // every other key takes its documented default.
    let short = format!(
        r#"(
    listen: "127.0.0.1:0", http_listen: "127.0.0.1:0",
    services: {{ "demo": (instances: ["{backend}"]) }},
    routes: [ (msgs: (1, 1), service: "demo", login: true), (msgs: (100, 199), service: "demo", auth: true) ],
)"#
    );
    let cfg_path = write_temp("gw-demo.ron", &short);
    let mut gw = Proc(
        common::bin()
            .args([
                "--config",
                cfg_path.to_str().expect("path"),
                "--shards",
                "2",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gateway"),
    );
    let addr = address_after(&mut gw.0, "gateway listening on ");
    let mut c = Client::connect(addr).expect("connect");
    let li = c.login_demo(4242).expect("login");
    assert_eq!(li.response.header.seq, 1);
    let r = c.request(100, b"through two processes").expect("echo");
    assert_eq!(
        (r.header.seq, &r.body[..]),
        (2, &b"through two processes"[..])
    );
    sigterm(&gw.0);
    assert_eq!(wait_exit(&mut gw.0, Duration::from_secs(10)), Some(0));
    sigterm(&demo.0);
    assert_eq!(wait_exit(&mut demo.0, Duration::from_secs(10)), Some(0));
    let _ = std::fs::remove_file(cfg_path);
}

#[test]
fn no_arguments_runs_the_embedded_default_and_a_restart_loses_nothing() {
    // Only the client and HTTP ports are moved off their defaults, so a
    // gateway already running on this machine does not collide; the demo
    // backend takes its default 127.0.0.1:7100 as a newcomer's run would.
    // Both runs share one working directory: the default snapshot_dir
    // (`state`) is relative to it.
    let dir = std::env::temp_dir().join(format!("slg-default-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let start = || {
        let mut gw = Proc(
            common::bin()
                .current_dir(&dir)
                .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn gateway"),
        );
        let addr = address_after(&mut gw.0, "gateway listening on ");
        (gw, addr)
    };
    let (mut gw, addr) = start();
    let mut c = Client::connect(addr).expect("connect");
    let li = c.login_demo(1).expect("login");
    assert_eq!(c.request(2, b"hi").expect("echo").body, &b"hi"[..]);
    let read = c.last_seq;
    // One more answer that the client has not read when the gateway stops.
    c.send_request(100, b"unread").expect("send");
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&gw.0);
    assert_eq!(wait_exit(&mut gw.0, Duration::from_secs(10)), Some(0));
    assert!(
        dir.join("state").join("players.snap").exists(),
        "the default keeps a snapshot"
    );
    drop(c);
    // Start again: the player resumes with its token and gets what it missed.
    let (mut gw, addr) = start();
    let mut c = Client::connect(addr).expect("connect");
    let back = c.resume(&li.token, read).expect("resume after the restart");
    assert_eq!(back.resume_point, read);
    let missed = c.recv().expect("the unread answer");
    assert_eq!(
        (missed.header.seq, &missed.body[..]),
        (read + 1, &b"unread"[..])
    );
    sigterm(&gw.0);
    assert_eq!(wait_exit(&mut gw.0, Duration::from_secs(10)), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("slg-{}-{name}", std::process::id()));
    let mut f = std::fs::File::create(&path).expect("create temp file");
    f.write_all(text.as_bytes()).expect("write temp file");
    path
}

/// Run the gateway on `text` as its config; expect status 2 and one line on
/// stderr containing every one of `needles`.
fn expect_refused(name: &str, text: &str, needles: &[&str]) {
    let path = write_temp(name, text);
    let out = common::bin()
        .args(["--config", path.to_str().expect("path")])
        .stdin(Stdio::null())
        .output()
        .expect("run gateway");
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{name}: status; stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "{name}: must not panic: {stderr}"
    );
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "{name}: one line: {stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{name}: {stderr:?} must name {n:?}");
    }
}

#[test]
fn bad_config_files_exit_2_naming_the_key() {
    let good = config_text("127.0.0.1:7100".parse().expect("addr"));
    expect_refused(
        "syntax.ron",
        &good.replace("max_frame: 65536,", "max_frame: 65536"),
        &["syntax.ron"],
    );
    expect_refused(
        "unknown-key.ron",
        &good.replace("max_frame: 65536,", "max_frame: 65536, maxframe: 1,"),
        &["maxframe"],
    );
    expect_refused(
        "overlap.ron",
        &good.replace("(msgs: (200, 200)", "(msgs: (150, 200)"),
        &["routes[", "overlaps"],
    );
    expect_refused(
        "unknown-service.ron",
        &good.replace(
            "(msgs: (2, 2), service: \"demo\"",
            "(msgs: (2, 2), service: \"lgoin\"",
        ),
        &["routes[1].service", "lgoin"],
    );
    expect_refused(
        "zero-limit.ron",
        &good.replace("max_frames: 1024", "max_frames: 0"),
        &["outbox.max_frames"],
    );
    expect_refused(
        "wrong-type.ron",
        &good.replace("max_connections: 100000", "max_connections: \"many\""),
        &["max_connections"],
    );
    expect_refused(
        "missing-cert.ron",
        &good.replace(
            "tls: None,",
            "tls: Some((cert: \"/nonexistent/gw.pem\", key: \"/nonexistent/gw.key\", client: true)),",
        ),
        &["tls.cert", "/nonexistent/gw.pem"],
    );
    expect_refused(
        "tls-no-listener.ron",
        &good.replace(
            "tls: None,",
            "tls: Some((cert: \"a.pem\", key: \"a.key\")),",
        ),
        &["tls", "names no listener"],
    );
    let missing = common::bin()
        .args(["--config", "/nonexistent/gateway.ron"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/gateway.ron"));
    let bad_flag = common::bin()
        .args(["--listen", "nowhere"])
        .output()
        .expect("run");
    assert_eq!(bad_flag.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_flag.stderr).contains("listen"));
}

/// Run the gateway on config `text` (with `ulimit -n` first if given),
/// call `during` with its client address once it listens, kill it, and
/// return what it logged on stderr.
fn logged_while(
    name: &str,
    text: &str,
    nofile: Option<u32>,
    during: impl FnOnce(std::net::SocketAddr),
) -> String {
    let path = write_temp(name, text);
    let ulimit = nofile
        .map(|n| format!("ulimit -n {n} && "))
        .unwrap_or_default();
    let mut gw = Proc(
        Command::new("sh")
            .args([
                "-c",
                &format!("{ulimit}exec {BIN} --config {}", path.display()),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .spawn()
            .expect("spawn gateway"),
    );
    let addr = address_after(&mut gw.0, "gateway listening on ");
    during(addr);
    // Killed, not drained: the log covers `during` only.
    let _ = gw.0.kill();
    let _ = gw.0.wait();
    let mut err = String::new();
    if let Some(mut e) = gw.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let _ = std::fs::remove_file(&path);
    err
}

#[test]
fn a_max_connections_past_the_open_files_limit_is_warned_about_at_start() {
    let good = config_text("127.0.0.1:7100".parse().expect("addr"));
    let text = good.replace("max_connections: 100000", "max_connections: 10000000");
    assert_ne!(text, good);
    let err = logged_while("fd-budget.ron", &text, None, |_| {});
    assert!(
        err.contains("max_connections (10000000)") && err.contains("open files"),
        "{err}"
    );
}

#[test]
fn the_client_port_leaves_descriptors_for_the_http_api_and_accept_failures_are_logged_once_a_second(
) {
    let http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let text = config_text("127.0.0.1:7100".parse().expect("addr"))
        .replace("shards: None,", "shards: Some(1),")
        .replace(
            "http_listen: \"127.0.0.1:0\"",
            &format!("http_listen: \"{http_addr}\""),
        );
    assert!(text.contains(&http_addr.to_string()));
    // Room for 400 descriptors (a hard limit the process cannot raise):
    // client connections are held to half of them (the limit less
    // http.max_connections and 256 reserved would be none).
    let mut health = None;
    let err = logged_while("fd-limit.ron", &text, Some(400), |addr| {
        let mut clients: Vec<_> = (0..300)
            .filter_map(|_| std::net::TcpStream::connect(addr).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let closed = clients
            .iter_mut()
            .map(|c| {
                use std::io::Read;
                let _ = c.set_read_timeout(Some(Duration::from_millis(20)));
                matches!(c.read(&mut [0u8; 1]), Ok(0))
            })
            .filter(|&closed| closed)
            .count();
        health = Some((closed, common::http(http_addr, "GET", "/healthz", b"").0));
        // Now the HTTP port itself runs out: 300 idle connections.
        let idle: Vec<_> = (0..300)
            .filter_map(|_| std::net::TcpStream::connect(http_addr).ok())
            .collect();
        std::thread::sleep(Duration::from_millis(2500));
        drop((clients, idle));
    });
    let (closed, status) = health.expect("ran");
    assert_eq!(closed, 100, "200 of 300 client connections kept:\n{err}");
    assert_eq!(
        status, 200,
        "the HTTP API answers with the client port full"
    );
    let warned = err.matches("accept failed").count();
    assert!(warned >= 1, "the failures are logged at all:\n{err}");
    // 2.5 s of failures every 10 ms: about 250 without the rate limit.
    assert!(warned <= 5, "{warned} lines:\n{err}");
}

#[test]
fn check_prints_the_effective_config_or_the_key_at_fault() {
    let short = write_temp(
        "check-short.ron",
        r#"(
    services: { "game": (instances: ["127.0.0.1:9000"]) },
    routes: [ (msgs: (1, 1), service: "game", login: true) ],
)"#,
    );
    let out = common::bin()
        .args(["check", "--config", short.to_str().expect("path")])
        .output()
        .expect("run check");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    // Every default is filled in, and what it prints is a config again.
    for key in [
        "max_frame: 65536",
        "session_idle: \"1m\"",
        "takeovers: Some(",
        "\"game\"",
    ] {
        assert!(text.contains(key), "{key} in:\n{text}");
    }
    let again = slg_gateway::config::Config::from_ron(&text, "printed").expect("round trip");
    assert_eq!(again.services.len(), 1);
    assert_eq!(again.max_players, 200_000);
    // A bad value: one line naming the key, exit 2, nothing on stdout.
    let bad = write_temp(
        "check-bad.ron",
        r#"(
    services: { "game": (instances: ["127.0.0.1:9000"]) },
    routes: [ (msgs: (1, 1), service: "game", login: true) ],
    outbox: (max_frames: 0),
)"#,
    );
    let out = common::bin()
        .args(["check", "--config", bad.to_str().expect("path")])
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("outbox.max_frames"), "{err}");
    assert!(out.stdout.is_empty());
    let version = common::bin().arg("--version").output().expect("version");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("slg-gateway "));
    let _ = std::fs::remove_file(short);
    let _ = std::fs::remove_file(bad);
}

/// What the gateway on `text` logs on stderr (a pipe) while a client logs
/// in and is answered; NO_COLOR is not set.
fn logs_of(name: &str, text: &str) -> String {
    let path = write_temp(name, text);
    let mut gw = Proc(
        common::bin()
            .args(["--config", path.to_str().expect("path")])
            .env_remove("NO_COLOR")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gateway"),
    );
    let addr = address_after(&mut gw.0, "gateway listening on ");
    let mut c = Client::connect(addr).expect("connect");
    c.login_demo(77).expect("login");
    c.request(100, b"x").expect("echo");
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&gw.0);
    assert_eq!(wait_exit(&mut gw.0, Duration::from_secs(10)), Some(0));
    let mut err = String::new();
    if let Some(mut e) = gw.0.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let _ = std::fs::remove_file(&path);
    err
}

#[test]
fn logs_to_a_pipe_have_no_escapes_and_json_lines_parse_with_their_fields() {
    let demo =
        slg_gateway::demo::DemoBackend::start("127.0.0.1:0".parse().expect("addr")).expect("demo");
    let text = config_text(demo.addr);
    let plain = logs_of("logs-text.ron", &text);
    assert!(plain.contains("login"), "{plain}");
    assert!(!plain.contains('\x1b'), "an escape byte in:\n{plain}");
    let json = logs_of(
        "logs-json.ron",
        &text.replace("log_format: Text", "log_format: Json"),
    );
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 3, "{json}");
    for l in &lines {
        for key in ["timestamp", "level", "message"] {
            assert!(l.get(key).is_some(), "{key} missing in {l}");
        }
    }
    let login = lines
        .iter()
        .find(|l| l["message"] == "login")
        .unwrap_or_else(|| panic!("no login line in {json}"));
    assert_eq!(login["player"], 77);
    assert!(login.get("session").is_some() && login.get("shard").is_some());
    demo.stop();
}
