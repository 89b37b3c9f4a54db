//! slg-loadtest: drives real load at the gateway (or straight at the demo
//! backend, or at any TCP relay in front of it), checks correctness while
//! it does, and reports latency percentiles, throughput and the gateway's
//! resource use.
//!
//! # Layout
//! | module | job |
//! |---|---|
//! | [`chart`] | several runs compared on one SVG (also `slg-loadtest compare`) |
//! | [`check`] | the client's side of the contract: streams and answers checked |
//! | [`fault`] | a relay that plants one fault, to prove the checks catch it |
//! | [`options`] | what a run does: scenario, target, sizes, rates |
//! | [`run`] | start the load executors, collect their results |
//! | [`scenario`] | the per-session loops of each scenario |
//! | [`session`] | one session: every frame through the checks |
//! | [`stats`] | per-executor counters and histograms, merged at the end |
//! | [`procstat`] | RSS and CPU time of a process, from /proc |
//! | [`report`] | the terminal summary, JSON and SVG |

pub mod chart;
pub mod check;
pub mod fault;
pub mod options;
pub mod procstat;
pub mod report;
pub mod run;
pub mod scenario;
pub mod session;
pub mod stats;

pub use options::{Options, Scenario, Target};
pub use report::Report;
pub use run::run;
