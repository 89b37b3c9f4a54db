//! Metrics: shard-local counters (plain `Cell`s, never shared between
//! threads), a [`Snapshot`] each shard takes on request, and the Prometheus
//! text rendering of the snapshots of all shards at scrape time.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Duration;

mod process;
use process::process_metrics;

/// A struct of shard-local counters (`Cell<u64>`, one per name) with the
/// help text of each beside it, and `list()` giving (name, help, value)
/// for every one: a counter is declared once, in one place.
#[macro_export]
macro_rules! counters {
    (
        $(#[$meta:meta])*
        pub struct $ty:ident { $( $name:ident : $help:literal ),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Default)]
        pub struct $ty {
            $( #[doc = $help] pub $name: ::std::cell::Cell<u64>, )*
        }

        impl $ty {
            /// Every counter: (name, help, value), in declaration order.
            pub fn list(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![ $( (stringify!($name), $help, self.$name.get()), )* ]
            }
        }
    };
}

/// Upper bounds (seconds) of the backend latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 15] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Labels of the session states, in [`Snapshot::sessions`] order.
pub const SESSION_STATES: [&str; 6] = [
    "connected",
    "authenticating",
    "binding",
    "resuming",
    "authenticated",
    "closing",
];

/// The counters one shard keeps (beside its `Stats`).
#[derive(Default)]
pub struct Metrics {
    kicks: RefCell<BTreeMap<u16, u64>>,
    /// Errors at the core's borders, by origin and code.
    errors: RefCell<BTreeMap<(crate::error::Origin, u16), u64>>,
    /// Requests by route slot (0: no route; i + 1: route i).
    requests: RefCell<HashMap<usize, u64>>,
    /// Responses by (route slot, code).
    responses: RefCell<HashMap<(usize, u16), u64>>,
    latency: RefCell<Histogram>,
    http: RefCell<BTreeMap<u16, u64>>,
    pub pushes_delivered: Cell<u64>,
    pub pushes_cached: Cell<u64>,
    pub pushes_offline: Cell<u64>,
}

impl Metrics {
    /// The route table changed: per-route counters start again (their
    /// slots now mean other routes; Prometheus reads this as a reset).
    pub fn reset_routes(&self) {
        self.requests.borrow_mut().clear();
        self.responses.borrow_mut().clear();
    }

    pub fn kick(&self, code: u16) {
        *self.kicks.borrow_mut().entry(code).or_default() += 1;
    }
    /// An error at the core's borders.
    pub fn error(&self, origin: crate::error::Origin, code: u16) {
        *self.errors.borrow_mut().entry((origin, code)).or_default() += 1;
    }
    /// Errors from `origin` with `code` so far.
    pub fn errors_of(&self, origin: crate::error::Origin, code: u16) -> u64 {
        self.errors
            .borrow()
            .get(&(origin, code))
            .copied()
            .unwrap_or(0)
    }
    /// Kicks with `code` so far.
    pub fn kicks_of(&self, code: u16) -> u64 {
        self.kicks.borrow().get(&code).copied().unwrap_or(0)
    }
    pub fn request(&self, route_slot: usize) {
        *self.requests.borrow_mut().entry(route_slot).or_default() += 1;
    }
    pub fn response(&self, route_slot: usize, code: u16) {
        *self
            .responses
            .borrow_mut()
            .entry((route_slot, code))
            .or_default() += 1;
    }
    pub fn backend_latency(&self, d: Duration) {
        self.latency.borrow_mut().record(d);
    }
    pub fn http(&self, status: u16) {
        *self.http.borrow_mut().entry(status).or_default() += 1;
    }
    pub fn pushes(&self, delivered: u64, cached: u64, offline: u64) {
        self.pushes_delivered
            .set(self.pushes_delivered.get() + delivered);
        self.pushes_cached.set(self.pushes_cached.get() + cached);
        self.pushes_offline.set(self.pushes_offline.get() + offline);
    }
    /// Fill the counter part of a snapshot.
    pub fn fill(&self, s: &mut Snapshot) {
        s.kicks = self.kicks.borrow().iter().map(|(k, v)| (*k, *v)).collect();
        s.errors = self
            .errors
            .borrow()
            .iter()
            .map(|(&(o, c), &v)| (o.name(), c, v))
            .collect();
        s.requests = self
            .requests
            .borrow()
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        s.responses = self
            .responses
            .borrow()
            .iter()
            .map(|(k, v)| (k.0, k.1, *v))
            .collect();
        s.latency = self.latency.borrow().clone();
        s.http = self.http.borrow().iter().map(|(k, v)| (*k, *v)).collect();
        s.pushes = [
            self.pushes_delivered.get(),
            self.pushes_cached.get(),
            self.pushes_offline.get(),
        ];
    }
}

/// A Prometheus histogram with fixed buckets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Count per bucket (not cumulative); one more for +Inf.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum += secs;
        self.count += 1;
    }
}

/// One shard's numbers at one instant (sent to the scraping shard).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub shard: usize,
    /// Sessions by state, in [`SESSION_STATES`] order.
    pub sessions: [u64; 6],
    pub players_online: u64,
    pub players_lingering: u64,
    pub outbox_frames: u64,
    pub outbox_bytes: u64,
    /// The shard's budgets (None: unlimited) and what its buffers hold.
    pub outbox_budget: Option<u64>,
    pub buffer_bytes: u64,
    pub buffer_budget: Option<u64>,
    pub players_max: u64,
    /// The shard is draining (or drained).
    pub draining: bool,
    /// Named monotonic counters (metric name suffix, value).
    pub counters: Vec<(&'static str, &'static str, u64)>,
    pub kicks: Vec<(u16, u64)>,
    /// (origin, code, count) of errors at the core's borders.
    pub errors: Vec<(&'static str, u16, u64)>,
    pub requests: Vec<(usize, u64)>,
    pub responses: Vec<(usize, u16, u64)>,
    pub latency: Histogram,
    pub http: Vec<(u16, u64)>,
    /// delivered, cached, offline.
    pub pushes: [u64; 3],
    pub mesh_backlog: u64,
    pub backends_up: u64,
    pub backends_unhealthy: u64,
    pub backends_down: u64,
}

/// The label of a code: gateway codes by name; application codes (set by
/// backends, so of unbounded variety) all as `app`, to bound the series.
fn code_label(code: u16) -> String {
    match crate::protocol::Code::from_u16(code) {
        Some(c) => c.name().to_string(),
        None => "app".to_string(),
    }
}

/// Everything the renderer needs besides the snapshots.
pub struct Context<'a> {
    /// Label of each route slot (0 = "none").
    pub routes: &'a [String],
    pub connections: u64,
    pub http_connections: u64,
}

struct Out(String);

impl Out {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP slg_{name} {help}");
        let _ = writeln!(self.0, "# TYPE slg_{name} {kind}");
    }
    /// A gauge with one series per shard (`value` None: that shard has
    /// none, e.g. an unlimited budget).
    fn per_shard(
        &mut self,
        snaps: &[Snapshot],
        name: &str,
        help: &str,
        value: impl Fn(&Snapshot) -> Option<u64>,
    ) {
        self.head(name, "gauge", help);
        for s in snaps {
            if let Some(v) = value(s) {
                self.line(name, &format!("shard=\"{}\"", s.shard), v);
            }
        }
    }
    fn line(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "slg_{name} {value}");
        } else {
            let _ = writeln!(self.0, "slg_{name}{{{labels}}} {value}");
        }
    }
}

/// The live upgrade that started this process (as its old process saw it).
pub fn render_upgrade(text: &mut String, t: &crate::upgrade::Taken) {
    let mut o = Out(std::mem::take(text));
    let secs = |us: u64| us as f64 / 1e6;
    let gauges: [(&str, &str, f64); 8] = [
        ("upgrade_sessions", "Sessions handed to this process by the live upgrade that started it.", t.sessions as f64),
        ("upgrade_players", "Players handed to this process by that upgrade (with a session or not).", t.players as f64),
        ("upgrade_batches", "Batches that upgrade sent.", t.batches as f64),
        ("upgrade_hold_longest_seconds", "The longest a batch of that upgrade was away: the longest any session's reads were held.", secs(t.longest_hold_us)),
        ("upgrade_hold_median_seconds", "The median batch's time away in that upgrade.", secs(t.median_hold_us)),
        ("upgrade_seconds", "From that upgrade's start to everything handed over.", secs(t.took_us)),
        ("upgrade_pushes_forwarded", "Pushes the old process forwarded to this one during that upgrade.", t.pushes_forwarded as f64),
        ("upgrade_left_behind", "Sessions that upgrade left in the old process (they never became ready to leave).", t.left_behind as f64),
    ];
    for (name, help, v) in gauges {
        o.head(name, "gauge", help);
        o.line(name, "", v);
    }
    *text = o.0;
}

/// Render every shard's snapshot in the Prometheus text format (0.0.4).
pub fn render(snaps: &[Snapshot], ctx: &Context) -> String {
    let mut o = Out(String::with_capacity(8192));
    let route = |slot: usize| {
        ctx.routes
            .get(slot)
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    };

    o.head("connections", "gauge", "Open client connections.");
    o.line("connections", "", ctx.connections);
    o.head("http_connections", "gauge", "Open HTTP API connections.");
    o.line("http_connections", "", ctx.http_connections);

    o.head("sessions", "gauge", "Client sessions by shard and state.");
    for s in snaps {
        for (i, state) in SESSION_STATES.iter().enumerate() {
            o.line(
                "sessions",
                &format!("shard=\"{}\",state=\"{state}\"", s.shard),
                s.sessions[i],
            );
        }
    }
    o.head(
        "players",
        "gauge",
        "Players held, by shard: online (with a session) or lingering.",
    );
    for s in snaps {
        o.line(
            "players",
            &format!("shard=\"{}\",state=\"online\"", s.shard),
            s.players_online,
        );
        o.line(
            "players",
            &format!("shard=\"{}\",state=\"lingering\"", s.shard),
            s.players_lingering,
        );
    }
    o.head(
        "outbox_frames",
        "gauge",
        "Unacknowledged frames held in player outboxes.",
    );
    for s in snaps {
        o.line(
            "outbox_frames",
            &format!("shard=\"{}\"", s.shard),
            s.outbox_frames,
        );
    }
    o.head("outbox_bytes", "gauge", "Bytes held in player outboxes.");
    for s in snaps {
        o.line(
            "outbox_bytes",
            &format!("shard=\"{}\"", s.shard),
            s.outbox_bytes,
        );
    }
    o.per_shard(
        snaps,
        "outbox_budget_bytes",
        "The shard's budget for all its outboxes (memory.outboxes); absent when unlimited.",
        |s| s.outbox_budget,
    );
    o.per_shard(
        snaps,
        "buffer_bytes",
        "Bytes of client connection buffers: frames begun and not finished, output not yet written.",
        |s| Some(s.buffer_bytes),
    );
    o.per_shard(
        snaps,
        "buffer_budget_bytes",
        "The shard's budget for its connection buffers (memory.buffers); absent when unlimited.",
        |s| s.buffer_budget,
    );
    o.per_shard(
        snaps,
        "draining",
        "1 while the shard drains (SIGTERM, POST /v1/drain): sessions fall to 0, then the gateway stops.",
        |s| Some(u64::from(s.draining)),
    );
    o.per_shard(
        snaps,
        "players_max",
        "Players the shard may hold (its share of max_players).",
        |s| Some(s.players_max),
    );
    o.head(
        "mesh_backlog",
        "gauge",
        "Cross-shard messages waiting for room in a peer's inbox.",
    );
    for s in snaps {
        o.line(
            "mesh_backlog",
            &format!("shard=\"{}\"", s.shard),
            s.mesh_backlog,
        );
    }
    o.head(
        "backend_connections",
        "gauge",
        "Backend connections by shard and health.",
    );
    for s in snaps {
        o.line(
            "backend_connections",
            &format!("shard=\"{}\",state=\"up\"", s.shard),
            s.backends_up,
        );
        o.line(
            "backend_connections",
            &format!("shard=\"{}\",state=\"unhealthy\"", s.shard),
            s.backends_unhealthy,
        );
        o.line(
            "backend_connections",
            &format!("shard=\"{}\",state=\"down\"", s.shard),
            s.backends_down,
        );
    }

    // Named counters, summed into one family each, labelled by shard.
    type Family<'a> = (&'a str, Vec<(usize, u64)>);
    let mut families: BTreeMap<&str, Family> = BTreeMap::new();
    for s in snaps {
        for (name, help, v) in &s.counters {
            families
                .entry(name)
                .or_insert((help, Vec::new()))
                .1
                .push((s.shard, *v));
        }
    }
    for (name, (help, values)) in families {
        let full = format!("{name}_total");
        o.head(&full, "counter", help);
        for (shard, v) in values {
            o.line(&full, &format!("shard=\"{shard}\""), v);
        }
    }

    o.head(
        "errors_total",
        "counter",
        "Errors at the core's borders, by origin (client, backend, cluster, internal) and code.",
    );
    let mut errors: BTreeMap<(&str, u16), u64> = BTreeMap::new();
    for s in snaps {
        for (origin, c, v) in &s.errors {
            *errors.entry((origin, *c)).or_default() += v;
        }
    }
    for ((origin, c), v) in errors {
        let labels = format!("origin=\"{origin}\",code=\"{}\"", code_label(c));
        o.line("errors_total", &labels, v);
    }

    o.head("kicks_total", "counter", "KICKs sent, by reason.");
    let mut kicks: BTreeMap<u16, u64> = BTreeMap::new();
    for s in snaps {
        for (c, v) in &s.kicks {
            *kicks.entry(*c).or_default() += v;
        }
    }
    for (c, v) in kicks {
        o.line("kicks_total", &format!("reason=\"{}\"", code_label(c)), v);
    }

    o.head(
        "requests_total",
        "counter",
        "Client requests, by route (msg_id range).",
    );
    let mut reqs: BTreeMap<usize, u64> = BTreeMap::new();
    for s in snaps {
        for (r, v) in &s.requests {
            *reqs.entry(*r).or_default() += v;
        }
    }
    for (r, v) in reqs {
        o.line("requests_total", &format!("route=\"{}\"", route(r)), v);
    }

    o.head(
        "responses_total",
        "counter",
        "Responses to clients, by route and code.",
    );
    let mut resps: BTreeMap<(usize, u16), u64> = BTreeMap::new();
    for s in snaps {
        for (r, c, v) in &s.responses {
            *resps.entry((*r, *c)).or_default() += v;
        }
    }
    for ((r, c), v) in resps {
        o.line(
            "responses_total",
            &format!("route=\"{}\",code=\"{}\"", route(r), code_label(c)),
            v,
        );
    }

    o.head(
        "backend_latency_seconds",
        "histogram",
        "Time from sending a request to a backend to its answer.",
    );
    let mut h = Histogram::default();
    for s in snaps {
        for (i, b) in s.latency.buckets.iter().enumerate() {
            h.buckets[i] += b;
        }
        h.sum += s.latency.sum;
        h.count += s.latency.count;
    }
    let mut cumulative = 0;
    for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
        cumulative += h.buckets[i];
        o.line(
            "backend_latency_seconds_bucket",
            &format!("le=\"{le}\""),
            cumulative,
        );
    }
    cumulative += h.buckets[LATENCY_BUCKETS.len()];
    o.line("backend_latency_seconds_bucket", "le=\"+Inf\"", cumulative);
    o.line("backend_latency_seconds_sum", "", h.sum);
    o.line("backend_latency_seconds_count", "", h.count);

    o.head("pushes_total", "counter", "Pushed frames, by outcome.");
    let mut p = [0u64; 3];
    for s in snaps {
        for (i, v) in s.pushes.iter().enumerate() {
            p[i] += v;
        }
    }
    for (i, outcome) in ["delivered", "cached", "offline"].iter().enumerate() {
        o.line("pushes_total", &format!("outcome=\"{outcome}\""), p[i]);
    }

    o.head(
        "http_requests_total",
        "counter",
        "HTTP API requests, by status.",
    );
    let mut http: BTreeMap<u16, u64> = BTreeMap::new();
    for s in snaps {
        for (c, v) in &s.http {
            *http.entry(*c).or_default() += v;
        }
    }
    for (c, v) in http {
        o.line("http_requests_total", &format!("status=\"{c}\""), v);
    }
    o.head(
        "build_info",
        "gauge",
        "The running build: always 1, with its version.",
    );
    o.line(
        "build_info",
        &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        1,
    );
    process_metrics(&mut o.0);
    o.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_render() {
        let mut h = Histogram::default();
        h.record(Duration::from_micros(100));
        h.record(Duration::from_millis(3));
        h.record(Duration::from_secs(60));
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[4], 1);
        assert_eq!(h.buckets[LATENCY_BUCKETS.len()], 1);
        let snap = Snapshot {
            shard: 1,
            latency: h,
            counters: vec![("logins_ok", "Logins accepted.", 3)],
            kicks: vec![(0x8102, 2)],
            responses: vec![(1, 0, 5), (0, 0x8001, 1)],
            ..Default::default()
        };
        let routes = vec!["none".to_string(), "1-1".to_string()];
        let text = render(
            &[snap],
            &Context {
                routes: &routes,
                connections: 4,
                http_connections: 1,
            },
        );
        assert!(
            text.contains("slg_logins_ok_total{shard=\"1\"} 3"),
            "{text}"
        );
        assert!(text.contains("slg_kicks_total{reason=\"IDLE\"} 2"));
        assert!(text.contains("slg_responses_total{route=\"1-1\",code=\"OK\"} 5"));
        assert!(text.contains("slg_responses_total{route=\"none\",code=\"NO_ROUTE\"} 1"));
        assert!(text.contains("slg_backend_latency_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("slg_backend_latency_seconds_count 3"));
        assert!(text.contains("slg_connections 4"));
    }
}
