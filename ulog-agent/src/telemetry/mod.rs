//! Kernel-side telemetry: the eBPF probes and what the agent makes of them.
