//! The agent as a process: what keeps it alive for the mirrors it serves.
//!
//! [`shutdown`] decides when the agent may exit (signals, the pid file, the `stop` client);
//! [`hardening`] holds the start-up checks and process settings (capabilities, memory lock,
//! I/O flusher, OOM score, the state directory not on a served mirror).

pub mod hardening;
pub mod shutdown;
