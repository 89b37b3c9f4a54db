//! Configuration text (`Config::from_ron`: RON parsing, the key-path
//! finder of syntax errors, and `validate`), from a string: no file is read.
//!
//! Checked: no panic; an error's `Display` is one line (the documented
//! contract of `ConfigError`: the gateway prints it and exits 2); a config
//! that loads validates again, gives its addresses, builds a router, and
//! runs a gateway core in memory (`sim`) through a connection and a request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use slg_gateway::config::Config;
use slg_gateway::protocol::{Header, Kind};
use slg_gateway::router::Router;
use slg_gateway::sim::Sim;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::from_ron(&text, "fuzz.ron") {
        Err(e) => {
            let line = e.to_string();
            assert!(
                !line.contains('\n'),
                "a config error of more than one line: {line:?}"
            );
        }
        Ok(cfg) => {
            if let Err(e) = cfg.validate() {
                panic!("a loaded config does not validate again: {e}");
            }
            cfg.listen_addr().expect("listen was validated");
            cfg.http_listen_addr().expect("http_listen was validated");
            cfg.ws_listen_addr().expect("ws_listen was validated");
            assert!(cfg.shard_count() >= 1);
            let router = Router::new(&cfg);
            for r in &cfg.routes {
                assert!(router.lookup(r.msgs.0).is_some() && router.lookup(r.msgs.1).is_some());
            }
            let shards = cfg.shards.unwrap_or(1).min(4);
            let mut sim = Sim::new(cfg, shards, 1);
            let c = sim.connect(0);
            let mut h = Header::new(Kind::Request);
            h.msg_id = 2;
            h.req_id = 1;
            sim.send(c, &h, b"hello");
            sim.run();
            let _ = sim.recv(c);
        }
    }
});
