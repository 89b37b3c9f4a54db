//! slg-gateway: a thread-per-core gateway for strategy-game clients.
//!
//! # Layout
//! | module | job |
//! |---|---|
//! | [`protocol`] | frames, kinds, codes, the codec of both links |
//! | [`config`] | the RON file: schema, loading, validation |
//! | [`gateway`] | start and stop a whole gateway (shards, listeners) |
//! | [`error`] | the one error type at the core's borders: origin, retry safety, wire code |
//! | [`core`] | one shard's tables and every protocol rule, with no I/O |
//! | [`shard`] | the shell around the core: tasks, backends, mesh, cluster flows |
//! | [`session`] | one connection's rules ([`session::Session`]); its tasks are [`shard::conn`] |
//! | [`player`] | seq counter, acks, token, bound session |
//! | [`router`] | msg_id ranges to services, instance choice |
//! | [`backend`] | per-shard backend connections, req_id multiplexing, deadlines |
//! | [`net`] | SO_REUSEPORT listeners, the shared stream, the batching writer |
//! | [`demo`] | the demo backend |
//! | [`client`] | the reference client of the client link |
//! | [`limits`] | raising process limits at start |
//! | [`sim`] | the in-memory gateway: real cores, fake clients and backends, a simulated clock |
//!
//! The runtime (pinned executors, mesh, stop) is the `shards` crate.

pub mod backend;
pub mod client;
pub mod cluster;
pub mod config;
pub mod core;
pub mod demo;
pub mod error;
pub mod gateway;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod net;
pub mod player;
pub mod protocol;
pub mod router;
pub mod session;
pub mod shard;
pub mod sim;
pub mod snapshot;
pub mod upgrade;
pub mod wire;
