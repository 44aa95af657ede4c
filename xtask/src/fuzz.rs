//! `cargo xtask fuzz`: run the cargo-fuzz targets in `ulog-agent/fuzz` for a bounded time each.
//!
//! Installs cargo-fuzz (pinned) if it is missing and uses the pinned eBPF nightly, which
//! `cargo xtask setup` installs anyway (libFuzzer needs a nightly for `-Z sanitizer`).
//! A crash fails the command and leaves the reproducer in `ulog-agent/fuzz/artifacts/`.

use std::process::Command;

use anyhow::{bail, Context};

use crate::toolchain::EBPF_NIGHTLY;

/// The cargo-fuzz release this project runs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Every target in ulog-agent/fuzz/Cargo.toml.
const TARGETS: [&str; 3] = ["decode", "ctr", "server"];

#[derive(clap::Args)]
pub struct Args {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    seconds: u32,
    /// Only these targets (default: all).
    targets: Vec<String>,
}

fn cargo_fuzz_installed() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !cargo_fuzz_installed() {
        eprintln!("installing cargo-fuzz {CARGO_FUZZ_VERSION}");
        let st = Command::new("cargo")
            .args(["install", "--locked", &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}")])
            .status()
            .context("cargo install cargo-fuzz")?;
        if !st.success() {
            bail!("installing cargo-fuzz failed");
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("ulog-agent");
    let targets: Vec<String> =
        if args.targets.is_empty() { TARGETS.iter().map(|s| s.to_string()).collect() } else { args.targets };
    for t in &targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!("unknown fuzz target {t:?} (have: {})", TARGETS.join(", "));
        }
        eprintln!("fuzzing {t} for {} s", args.seconds);
        let st = Command::new("cargo")
            .current_dir(&root)
            // The fuzz crate has its own workspace and lock file; keep its build out of the
            // main target dir (different flags would invalidate it).
            .env_remove("CARGO_TARGET_DIR")
            .args([&format!("+{EBPF_NIGHTLY}"), "fuzz", "run", t, "--", &format!("-max_total_time={}", args.seconds)])
            .status()
            .with_context(|| format!("running fuzz target {t}"))?;
        if !st.success() {
            bail!("fuzz target {t} failed: see ulog-agent/fuzz/artifacts/{t}/");
        }
    }
    Ok(())
}
