//! ulog: a userspace server for the device-mapper "userspace" dirty log (the role LVM2's
//! cmirrord plays), for the `clustered-core` and `clustered-disk` log types on one node.
//!
//! The library holds everything; `main.rs` is thin glue. The folders are the layers, in the
//! order a request passes them: [`wire`] (the protocol's codec, which every layer speaks) ->
//! [`server`] (the netlink socket and receive loop, the logs and request semantics) ->
//! [`cluster`] (for `--cluster` logs: the replicated state every member agrees on) ->
//! [`region_log`] (the log engine: a log's state, its disk image, durability). Each of the last
//! three imports only the layers after it and [`wire`], which imports none; the engine imports
//! no telemetry. Staying alive for the mirrors:
//! [`process`] (when the agent may exit; start-up checks, memory lock, I/O flusher, OOM score).
//! Observability: [`metrics`] (what the request path records, the Prometheus exposition),
//! [`telemetry`] (the kernel probes) and [`api`] (the HTTP server and its command-line client).
#![deny(missing_docs)]

pub mod api;
pub mod cluster;
pub mod metrics;
pub mod process;
pub mod region_log;
pub mod server;
pub mod telemetry;
pub mod wire;
