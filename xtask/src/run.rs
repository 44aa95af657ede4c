//! `cargo xtask run [-- AGENT FLAGS]`: set up, build the agent in release mode, and run it in
//! the foreground (the README's second command). The agent replaces this process (exec), so
//! signals (Ctrl-C, SIGTERM) reach it directly and it flushes its logs before exiting.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{bail, Context};

#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo xtask setup` (toolchains, bpf-linker, Debian packages).
    #[arg(long)]
    skip_setup: bool,
    /// Flags for ulog-agent (see `ulog-agent --help`), after `--`.
    #[arg(last = true)]
    agent_args: Vec<String>,
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.skip_setup {
        let st = Command::new(cargo()).args(["xtask", "setup"]).status().context("running cargo xtask setup")?;
        if !st.success() {
            bail!("cargo xtask setup failed");
        }
    }
    let st = Command::new(cargo())
        .args(["build", "--release", "-p", "ulog-agent"])
        .status()
        .context("building ulog-agent")?;
    if !st.success() {
        bail!("building ulog-agent failed");
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let bin = std::path::Path::new(&target).join("release/ulog-agent");
    eprintln!("running {} {}", bin.display(), args.agent_args.join(" "));
    let err = Command::new(&bin).arg("-f").args(&args.agent_args).exec();
    Err(err).with_context(|| format!("cannot execute {}", bin.display()))
}
