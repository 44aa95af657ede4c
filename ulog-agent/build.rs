//! Build script: builds the eBPF object (`ulog-ebpf`, bin `ulog`) and leaves it at
//! `$OUT_DIR/ulog`, where `src/telemetry/probes.rs` embeds it.
//!
//! - Feature `ebpf` off: nothing to do (the probes module does not embed anything).
//! - `AYA_BUILD_SKIP=1` (or `true`): no eBPF build; an empty placeholder object is written so
//!   `include_bytes_aligned!` still compiles, and `ProbeSet::try_start` reports
//!   `ProbeError::NotEmbedded` at run time.
//! - Otherwise: check the eBPF toolchain first (pinned nightly with rust-src, a bpf-linker that
//!   runs and uses that nightly's LLVM) and stop with one readable line ending in "run `cargo
//!   xtask setup`" if anything is missing; then `aya_build::build_ebpf` (cargo-in-cargo:
//!   `rustup run <nightly> cargo build -p ulog-ebpf --target bpfel-unknown-none -Z build-std=core
//!   --release`).
//!
//! # The nightly pin
//! The nightly comes from `xtask/src/toolchain.rs`, compiled into this script as a module (it is
//! std-only for that reason), so `cargo xtask setup` and this script cannot disagree. Cargo
//! rebuilds and reruns this script when that file changes; aya-build adds `rerun-if-changed` on
//! the ulog-ebpf directory, and the build-dependency on ulog-ebpf's library reruns it when
//! ulog-common changes.

#[cfg(feature = "ebpf")]
#[path = "../xtask/src/toolchain.rs"]
#[allow(dead_code)] // shared with xtask, which uses more of it
mod toolchain;

fn main() {
    git_revision();
    #[cfg(feature = "ebpf")]
    if let Err(message) = ebpf::build() {
        // One readable error (cargo prints it under "failed to run custom build command"), not a
        // panic with a backtrace.
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

/// `ULOG_GIT_REVISION`: the commit the agent is built from (`--version`, the start-up line,
/// `ulog_build_info`), or `unknown` outside a git checkout (a source tarball). Rebuilt when HEAD
/// moves.
fn git_revision() {
    use std::process::Command;
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let rev = std::env::var("ULOG_GIT_REVISION")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ULOG_GIT_REVISION={rev}");
    println!("cargo:rerun-if-env-changed=ULOG_GIT_REVISION");
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
    }
    if let (Some(common), Some(head_ref)) =
        (git(&["rev-parse", "--git-common-dir"]), git(&["symbolic-ref", "-q", "HEAD"]))
    {
        println!("cargo:rerun-if-changed={common}/{head_ref}");
        println!("cargo:rerun-if-changed={common}/packed-refs");
    }
}

#[cfg(feature = "ebpf")]
mod ebpf {
    use std::{env, fs, path::PathBuf};

    use crate::toolchain;

    /// aya-build writes each bin of the eBPF package to `$OUT_DIR/<bin name>`.
    const OBJECT: &str = "ulog";

    pub fn build() -> Result<(), String> {
        println!("cargo::rerun-if-env-changed=AYA_BUILD_SKIP");
        let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
        let object = out_dir.join(OBJECT);
        let skip = env::var("AYA_BUILD_SKIP").unwrap_or_default();
        if skip == "1" || skip.eq_ignore_ascii_case("true") {
            println!("cargo::warning=AYA_BUILD_SKIP={skip}: eBPF object not built; probes disabled");
            return fs::write(&object, b"").map_err(|e| format!("writing placeholder {}: {e}", object.display()));
        }

        let linker = toolchain::ebpf_toolchain_ready().map_err(|e| format!("cannot build the eBPF programs: {e}"))?;
        // A rebuilt bpf-linker (new nightly) must relink the object.
        println!("cargo::rerun-if-changed={}", linker.display());

        let manifest_dir = env::var("CARGO_MANIFEST_DIR").map_err(|e| format!("CARGO_MANIFEST_DIR: {e}"))?;
        let ebpf_dir = PathBuf::from(manifest_dir).join("../ulog-ebpf");
        let ebpf_dir = ebpf_dir.canonicalize().map_err(|e| format!("{}: {e}", ebpf_dir.display()))?;
        let root_dir = ebpf_dir.to_str().ok_or("non-UTF-8 path to ulog-ebpf")?;
        let package = aya_build::Package { name: "ulog-ebpf", root_dir, ..Default::default() };
        aya_build::build_ebpf([package], aya_build::Toolchain::Custom(toolchain::EBPF_NIGHTLY))
            .map_err(|e| format!("building ulog-ebpf with {}: {e:#}", toolchain::EBPF_NIGHTLY))?;
        if !object.is_file() {
            return Err(format!("aya-build succeeded but left no {}", object.display()));
        }
        Ok(())
    }
}
