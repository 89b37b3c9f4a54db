//! The MSRV in Cargo.toml (`workspace.package.rust-version`) is real:
//! every workspace member inherits it (without that, clippy's
//! `incompatible_msrv` has no MSRV to check against and says nothing), and
//! no dependency built from Cargo.lock needs a newer Rust. The code itself
//! is checked by clippy (`incompatible_msrv`, in test code too through
//! clippy.toml), which .ci/run runs with `-D warnings`.

use std::collections::{HashMap, HashSet};
use std::process::Command;

/// "1.88" or "1.88.0" as (1, 88, 0).
fn parse(v: &str) -> (u64, u64, u64) {
    let mut it = v.trim().split('.').map(|p| {
        p.parse::<u64>()
            .unwrap_or_else(|_| panic!("bad rust-version {v:?}"))
    });
    let major = it.next().unwrap_or(0);
    let minor = it.next().unwrap_or(0);
    let patch = it.next().unwrap_or(0);
    (major, minor, patch)
}

fn cargo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn rust_version_covers_every_member_and_dependency() {
    let ours = env!("CARGO_PKG_RUST_VERSION");
    assert!(
        !ours.is_empty(),
        "slg-gateway has no rust-version: add `rust-version.workspace = true`"
    );
    let msrv = parse(ours);

    let meta: serde_json::Value =
        serde_json::from_str(&cargo(&["metadata", "--format-version", "1", "--locked"]))
            .expect("cargo metadata JSON");
    let members: HashSet<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .map(|m| m.as_str().expect("id"))
        .collect();
    let mut rust_version: HashMap<(String, String), Option<String>> = HashMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let name = p["name"].as_str().expect("name").to_string();
        let version = p["version"].as_str().expect("version").to_string();
        let rv = p["rust_version"].as_str().map(str::to_string);
        if members.contains(p["id"].as_str().expect("id")) {
            assert_eq!(
                rv.as_deref(),
                Some(ours),
                "workspace member {name} must inherit the workspace rust-version \
                 (`rust-version.workspace = true` in its Cargo.toml)"
            );
        }
        rust_version.insert((name, version), rv);
    }

    // What is really built on this host (cargo metadata's resolve also lists
    // optional dependencies no feature turns on).
    let tree = cargo(&[
        "tree",
        "--workspace",
        "--locked",
        "-e",
        "normal,build,dev",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    let mut too_new = Vec::new();
    let mut seen = HashSet::new();
    for line in tree.lines() {
        let mut w = line.split_whitespace();
        let (Some(name), Some(version)) = (w.next(), w.next()) else {
            continue;
        };
        let Some(version) = version.strip_prefix('v') else {
            continue;
        };
        let key = (name.to_string(), version.to_string());
        if !seen.insert(key.clone()) {
            continue;
        }
        let rv = rust_version
            .get(&key)
            .unwrap_or_else(|| panic!("{name} {version} from cargo tree is not in cargo metadata"));
        if let Some(rv) = rv {
            if parse(rv) > msrv {
                too_new.push(format!("{name} {version} needs Rust {rv}"));
            }
        }
    }
    assert!(seen.len() > 50, "cargo tree listed too little:\n{tree}");
    assert!(
        too_new.is_empty(),
        "rust-version is {ours}, but dependencies need more (raise it, or pin older versions):\n  {}",
        too_new.join("\n  ")
    );
}
