//! The TypeScript SDK's own tests (clients/typescript, node's test runner)
//! against this build of the gateway: login and requests over TCP and
//! WebSocket, a drop in a push stream, RESUME_GAP, REDIRECT in a
//! two-gateway cluster on redis, and the example page (examples/web) in a
//! headless Chromium. Part of `cargo test` so that one command runs
//! everything; `cd clients/typescript && npm test` runs them alone.
//!
//! Needs node >= 20 and npm (and redis-server, chromium for two of the
//! tests); skips without node, and fails instead under CI.

mod common;

use std::path::Path;
use std::process::Command;

fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().ok()?;
    let v = String::from_utf8_lossy(&out.stdout);
    v.trim()
        .trim_start_matches('v')
        .split('.')
        .next()?
        .parse()
        .ok()
}

#[test]
fn typescript_sdk_tests_pass_against_this_gateway() {
    match node_major() {
        None => return common::skip("node is not installed", None),
        Some(v) if v < 20 => return common::skip(&format!("node {v} is older than 20"), None),
        Some(_) => {}
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/typescript");
    // npm ci only when the installed dependencies are missing or older
    // than the lock file.
    let lock = dir.join("package-lock.json");
    let installed = dir.join("node_modules/.package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&installed) < modified(&lock) {
        let st = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("run npm ci");
        assert!(st.success(), "npm ci failed in {}", dir.display());
    }
    let out = Command::new("npm")
        .arg("test")
        .current_dir(&dir)
        .env("SLG_GATEWAY_BIN", env!("CARGO_BIN_EXE_slg-gateway"))
        .output()
        .expect("run npm test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "npm test failed:\n{stdout}\n{stderr}");
    // Every test ran: a skip is a failure under CI.
    let skipped = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# skipped "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .unwrap_or(0);
    if skipped > 0 {
        common::skip(
            &format!("{skipped} SDK test(s) skipped (no redis-server or chromium)"),
            None,
        );
    }
}
