//! Kernel-side telemetry: the eBPF probes and what the agent makes of them.
//!
//! [`probes`] loads the embedded eBPF object and reads its counters. Telemetry is best effort:
//! when the kernel or the build cannot provide it, [`probes::ProbeSet::try_start`] returns a
//! [`probes::ProbeError`] and the agent logs one line and serves requests all the same.

pub mod probes;
