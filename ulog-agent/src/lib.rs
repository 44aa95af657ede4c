//! ulog: a userspace server for the device-mapper "userspace" dirty log (the role LVM2's
//! cmirrord plays), for the `clustered-core` and `clustered-disk` log types on one node.
//!
//! The library holds everything; `main.rs` is thin glue. Reading order: [`protocol`] (wire
//! codec) -> [`server`] (logs and request semantics, via [`dirty_log`]) -> [`persist`] and
//! [`store`] (durability) -> [`transport`] (the netlink socket and receive loop). Staying alive for the mirrors: [`shutdown`] (when the
//! agent may exit) and [`hardening`] (start-up checks, memory lock, I/O flusher, OOM score). Observability:
//! [`metrics`] (what the request path records, the Prometheus exposition) and [`api`] (the HTTP
//! server; [`status`] is its command-line client).
#![deny(missing_docs)]

pub mod api;
pub mod bitmap;
pub mod cluster;
pub mod counters;
pub mod ctr;
pub mod dirty_log;
pub mod disk_format;
pub mod dm;
pub mod hardening;
pub mod kernel_peer;
pub mod legs;
pub mod metrics;
pub mod persist;
pub mod protocol;
pub mod ratelimit;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod transport;
