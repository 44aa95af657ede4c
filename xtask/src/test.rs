//! `cargo xtask test`: the one command that runs everything (the README's test command; `.ci/run`
//! calls it).
//!
//! Steps, in order, each streaming its output:
//! 1. `setup` (in-process: toolchains, bpf-linker, Debian packages; see `setup.rs`) — a failure
//!    here stops the run, nothing after it could work;
//! 2. `cargo fmt --all -- --check`;
//! 3. `cargo clippy --all-targets -- -D warnings` (default members; ulog-ebpf is linted only
//!    through the eBPF build, which denies nothing extra);
//! 4. `cargo test` (default members, default features: builds and embeds the eBPF object); it
//!    includes `promtool check metrics` on a live agent's scrape and `promtool check rules` on
//!    `dashboards/ulog-rules.yml` (ulog-agent/tests/integration/api.rs; promtool comes from
//!    Debian's `prometheus` package, which `setup` installs);
//! 5. the suites in [`SUITES`], each a `cargo ...` command run from the repo root (first
//!    `cargo xtask package --check`, the Debian package and its unit; the VM suite is
//!    `cargo xtask vm test`, then a 20 s smoke run of `cargo xtask demo --check`; they are called
//!    as commands, not functions, so they can change freely; `--skip-vm` skips both).
//!
//! After a failure in steps 2-5 the remaining steps still run, so one run reports everything. At
//! the end a summary lists every step with its status and duration; the exit status is 1 if any
//! step failed.
//!
//! Adding a suite: append to [`SUITES`]; `--skip-suite <name>` skips any of them by name.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::setup::{self, repo_root, run_streaming};

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Do not run `cargo xtask setup` first (toolchains and packages must already be there).
    #[arg(long)]
    pub skip_setup: bool,
    /// Skip `cargo fmt --check` and `cargo clippy`.
    #[arg(long)]
    pub skip_lint: bool,
    /// Skip the suites that boot VMs (`cargo xtask vm test`, the demo smoke run).
    #[arg(long)]
    pub skip_vm: bool,
    /// Skip a further suite by name (repeatable); see `SUITES` in xtask/src/test.rs.
    #[arg(long = "skip-suite", value_name = "NAME")]
    pub skip_suites: Vec<String>,
    /// Passed to setup: do not install Debian packages, only report missing ones.
    #[arg(long)]
    pub skip_apt: bool,
}

/// A test suite run after `cargo test`.
pub struct Suite {
    /// Name in the summary and for `--skip-suite`.
    pub name: &'static str,
    /// Arguments to `cargo`, run from the repo root.
    pub cargo_args: &'static [&'static str],
}

/// Further suites, in order. Register new ones here.
pub const SUITES: &[Suite] = &[
    // `cargo xtask package --check`: the .deb's files, the stripped binary and its debug package,
    // the systemd unit (README's requirements, systemd-analyze verify), the man page, lintian.
    Suite { name: "package", cargo_args: &["xtask", "package", "--check"] },
    // qemu with a Debian kernel: dm-mirror + dm-log-userspace against the real kernel, eBPF probes.
    Suite { name: "vm", cargo_args: &["xtask", "vm", "test"] },
    // `cargo xtask demo` for 20 s of workload: the forwarded /metrics and the host's Prometheus
    // must show the mirror writes, the rules evaluate, the probe is attached (one boot).
    Suite { name: "demo", cargo_args: &["xtask", "demo", "--skip-setup", "--duration", "20", "--check"] },
];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    Failed,
    Skipped,
    NotRun,
}

struct Outcome {
    name: String,
    status: Status,
    took: Duration,
}

pub fn run(args: Args) -> Result<()> {
    let root = repo_root()?;
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut record = |name: &str, status: Status, took: Duration| {
        outcomes.push(Outcome { name: name.to_owned(), status, took });
    };
    let step = |name: &str, f: &mut dyn FnMut() -> Result<()>| {
        println!("\n==> {name}");
        let t = Instant::now();
        let status = match f() {
            Ok(()) => Status::Ok,
            Err(e) => {
                eprintln!("==> {name} FAILED: {e:#}");
                Status::Failed
            }
        };
        (status, t.elapsed())
    };
    let cargo = |args: &[&str]| {
        let mut cmd = Command::new("cargo");
        cmd.args(args).current_dir(&root);
        cmd
    };

    let mut setup_failed = false;
    if args.skip_setup {
        record("setup", Status::Skipped, Duration::ZERO);
    } else {
        let skip_apt = args.skip_apt;
        let (s, d) = step("setup", &mut || setup::run(setup::Args { skip_apt }));
        setup_failed = s == Status::Failed;
        record("setup", s, d);
    }

    let mut steps: Vec<(String, Vec<&str>, bool)> = vec![
        ("fmt".into(), vec!["fmt", "--all", "--", "--check"], args.skip_lint),
        ("clippy".into(), vec!["clippy", "--all-targets", "--", "-D", "warnings"], args.skip_lint),
        ("cargo test".into(), vec!["test"], false),
    ];
    for suite in SUITES {
        let skipped = args.skip_suites.iter().any(|s| s == suite.name)
            || ((suite.name == "vm" || suite.name == "demo") && args.skip_vm);
        steps.push((format!("suite {}", suite.name), suite.cargo_args.to_vec(), skipped));
    }
    for (name, cargo_args, skipped) in steps {
        if setup_failed {
            record(&name, Status::NotRun, Duration::ZERO);
        } else if skipped {
            record(&name, Status::Skipped, Duration::ZERO);
        } else {
            let (s, d) = step(&name, &mut || run_streaming(&mut cargo(&cargo_args)));
            record(&name, s, d);
        }
    }

    println!("\n==> summary");
    let mut failed = Vec::new();
    let total: Duration = outcomes.iter().map(|o| o.took).sum();
    for o in &outcomes {
        let status = match o.status {
            Status::Ok => "ok",
            Status::Failed => "FAILED",
            Status::Skipped => "skipped",
            Status::NotRun => "not run",
        };
        if o.status == Status::Failed {
            failed.push(o.name.as_str());
        }
        println!("  {:<14} {:<8} {:>8.1}s", o.name, status, o.took.as_secs_f64());
    }
    println!("  {:<14} {:<8} {:>8.1}s", "total", "", total.as_secs_f64());
    if failed.is_empty() {
        println!("all steps passed");
        Ok(())
    } else {
        eprintln!("failed: {}", failed.join(", "));
        // Exit directly: the summary already said everything, an error from main would only add
        // a backtrace under RUST_BACKTRACE=1.
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suites_have_unique_names_and_are_cargo_commands() {
        let mut names: Vec<&str> = SUITES.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SUITES.len());
        assert!(SUITES.iter().all(|s| !s.cargo_args.is_empty()));
        assert!(SUITES.iter().any(|s| s.cargo_args == ["xtask", "vm", "test"]));
    }
}
