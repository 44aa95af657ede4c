//! Build script of the eBPF crate.
//!
//! Building the `ulog` bin for a bpf target has an undeclared dependency on the `bpf-linker`
//! binary (rustc runs it as the linker). Cargo cannot express that (artifact dependencies do not
//! support `-Z build-std`, rust-lang/cargo#12375), so, as the aya template does, we make the
//! linker's path a `rerun-if-changed` key: a rebuilt bpf-linker (e.g. after the pinned nightly
//! changed and `cargo xtask setup` rebuilt it) relinks the object. A different bpf-linker put
//! earlier on `PATH` is not noticed.
//!
//! Unlike the template we do not panic when bpf-linker is missing; we say what to do. For host
//! builds (the empty library, compiled as ulog-agent's build-dependency) nothing is needed.

use std::{env, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return ExitCode::SUCCESS;
    }
    let found = env::var_os("PATH")
        .and_then(|path| env::split_paths(&path).map(|d| d.join("bpf-linker")).find(|p: &PathBuf| p.is_file()));
    match found {
        Some(linker) => {
            println!("cargo::rerun-if-changed={}", linker.display());
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "error: bpf-linker is not on PATH; it links the eBPF object. \
                 Run `cargo xtask setup` (builds bpf-linker against the pinned nightly's LLVM \
                 into ~/.cargo/bin)."
            );
            ExitCode::FAILURE
        }
    }
}
