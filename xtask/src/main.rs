//! Project automation: `cargo xtask <command>`.
//!
//! Each command lives in its own module; `main` only parses and dispatches.
use clap::{Parser, Subcommand};

mod bench;
mod fuzz;
mod package;
mod run;
mod setup;
mod test;
mod toolchain;
mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "ulog project automation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the pinned toolchains, bpf-linker and the Debian packages the tests need (idempotent).
    Setup(setup::Args),
    /// Set up, build and run the agent in the foreground (the README's second command).
    Run(run::Args),
    /// Set up, then run every test suite (the README's test command).
    Test(test::Args),
    /// Set up, boot the VM with mirrors on ulog-agent under writes, forward its API, run
    /// Prometheus on the host; Ctrl-C stops everything (the README's first command).
    Demo(vm::demo::Args),
    /// The qemu harness: a Debian kernel with dm-mirror and dm-log-userspace.
    Vm(vm::Args),
    /// Run the cargo-fuzz targets for a bounded time each.
    Fuzz(fuzz::Args),
    /// Benchmarks; results go to BENCHMARKS.md.
    Bench(bench::Args),
    /// Build the Debian packages (ulog-agent and its -dbgsym) into target/package/; `--check`
    /// verifies them.
    Package(package::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup(a) => setup::run(a),
        Cmd::Run(a) => run::run(a),
        Cmd::Test(a) => test::run(a),
        Cmd::Demo(a) => vm::demo::run(a),
        Cmd::Vm(a) => vm::run(a),
        Cmd::Fuzz(a) => fuzz::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Package(a) => package::run(a),
    }
}
