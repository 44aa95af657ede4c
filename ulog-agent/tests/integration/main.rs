//! Integration tests: the `ulog-agent` binary, each test in its own network namespace, driven
//! over a real `NETLINK_CONNECTOR` socket by the kernel-peer harness (`ulog_agent::wire::kernel_peer`).
//! They need root. Run with `cargo test -p ulog-agent --test integration`.

mod api;
// Cluster logs on a real 3-node corosync: three `--cluster` agents, each driven by its node's
// kernel peer (shared marks, an agent SIGKILLed and adopted, a node crash and reboot whose
// marks are reclaimed, a lost local corosync, a partition and its heal, resync split across
// nodes, a two-node flood, a rejoin under load, cmirrord on the group).
#[cfg(feature = "cluster")]
mod cluster;
// The corosync transport against a real 3-node corosync cluster in network namespaces
// (order, quorum, partition, corosync restart, flood); needs corosync installed.
#[cfg(feature = "cluster")]
mod cluster_bus;
mod common;
mod ctr;
mod dashboards;
mod hardening;
mod legs;
mod lifecycle;
mod persistence;
mod recovery;
mod regions;
mod transport;
