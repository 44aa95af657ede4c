//! The wire: what crosses the netlink connector between the kernel's `dm-log-userspace` and
//! the agent, as data. No layer's logic lives here; every layer speaks it.
//!
//! [`protocol`] decodes datagrams and encodes replies (no I/O: the server decodes with it, and
//! the server, the cluster engine and the log engine's persister encode their replies with it);
//! [`kernel_peer`] plays the kernel's side of the same wire over a real socket, for tests and
//! benchmarks. The socket and receive loop that carry it are `server::transport`.

pub mod kernel_peer;
pub mod protocol;
