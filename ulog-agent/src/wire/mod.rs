//! The wire: what crosses the netlink connector between the kernel's `dm-log-userspace` and
//! the agent.
//!
//! [`protocol`] decodes datagrams and encodes replies (no I/O; the other layers use its
//! request and reply types); [`transport`] owns the connector socket and runs the receive loop,
//! the top of the request path, which hands each datagram to [`crate::server`];
//! [`kernel_peer`] plays the kernel's side of the same wire over a real socket, for tests and
//! benchmarks.

pub mod kernel_peer;
pub mod protocol;
pub mod transport;
