//! Empty on purpose: this library target exists only so that `ulog-agent` can list `ulog-ebpf` as
//! a build-dependency, which makes cargo rerun the agent's build script (and so rebuild the eBPF
//! object) whenever this crate or `ulog-common` changes. The programs are in `main.rs` (bin
//! `ulog`), which only builds for `bpfel-unknown-none`.
#![no_std]
