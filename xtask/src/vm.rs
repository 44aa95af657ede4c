//! `cargo xtask vm`: a Debian 6.1 kernel under qemu, for everything that needs a real
//! device-mapper (dm-mirror, dm-log-userspace, loop, dm-flakey) or kprobes.
//!
//! Subcommands:
//! - `fetch`: download and unpack the pinned kernel into the cache ([`fetch`]).
//! - `run [SCENARIO...]`: build the initramfs, boot, run scenarios (the suite's when none is
//!   named), exit non-zero if any fails; the console log of a failing boot is kept and the end of
//!   each failing scenario's part is printed.
//! - `test`: the suite, honouring [`scenarios::EXPECTED_TO_FAIL`] (`cargo xtask test` runs
//!   `cargo xtask vm test`).
//! - `shell [--disk MIB]...`: the same guest with an interactive busybox shell on this terminal.
//! - `build`: only build the initramfs (prints its path); `list`: the scenarios.
//! - `bench`: fio on mirrors with the kernel's logs, ulog-agent and a constant-answer responder,
//!   one boot with its own initramfs (fio and its libraries only there); writes
//!   `benchmarks/vm.md` (see [`bench`]).
//!
//! Design:
//! - Everything comes from Debian packages; nothing touches the host kernel. The cache
//!   (`$ULOG_VM_CACHE`, else `$XDG_CACHE_HOME/ulog/vm`, else `~/.cache/ulog/vm`) holds the .deb and
//!   the unpacked kernel (vmlinux + module subset), keyed by package version (see [`fetch`]).
//! - Per run, under `<target>/vm/` (`$CARGO_TARGET_DIR` or `<workspace>/target`; one `vm` command
//!   at a time per target dir, enforced by a lock file): the initramfs (rebuilt every run),
//!   `logs/` (console logs with host timestamps, kept only on failure or with `--keep-logs`) and
//!   `disks/` (sparse raw images for scenarios whose disks survive a reboot; on the target's
//!   file system, not tmpfs; kept on failure).
//! - ulog-agent is built with `cargo build --release -p ulog-agent` (`--no-default-features` when
//!   bpf-linker is not on PATH, or with `--agent-build no-ebpf`), or taken from `--agent PATH`.
//! - The guest: busybox /init (xtask/vm-scenarios/init) mounts proc, sysfs, devtmpfs, devpts,
//!   tmpfs on /tmp and /run, debugfs, tracefs and bpffs, loads the modules, runs the scenarios
//!   named on the kernel command line (`ulog.scenarios=`), each in its own process group under a
//!   watchdog, dumps the scenario's dmesg after a failure, prints `ULOG-RESULT <name> <exit>`
//!   and powers off. Helpers for scenarios: xtask/vm-scenarios/lib.sh. See [`qemu`] for the
//!   console protocol and [`scenarios`] for multi-boot scenarios and VM sharing.
//! - Adding a scenario: write `xtask/vm-scenarios/<name>.sh` (starting with `. /scenarios/lib.sh`)
//!   and add a row to [`scenarios::SCENARIOS`] (boots, disks, timeout).
//! - Two guests at once (`guests: 2`, the `cluster-pair` scenario, last in the suite): corosync
//!   between them over a qemu dgram link, shared leg images; its own initramfs (the test one plus
//!   corosync) and machines (512 MiB, 1 vCPU each); the host kills one guest on request and
//!   tells the other. See [`cluster`]. ~75-80 s of qemu time on top of the single-guest suite.
//! - qemu: `-accel tcg -cpu max` unless kvm_intel/kvm_amd is loaded (these machines' /dev/kvm is
//!   kvm_pvm, which cannot run a distro kernel); the kernel boots as an uncompressed ELF through
//!   PVH, with qboot as firmware when installed (`--seabios` for qemu's default).
//!
//! Measured on the 2-core development machines (TCG, other builds running alongside, so ranges):
//! fetch cold 5.7-12.3 s (download 1.7 s, `dpkg -x` + depmod 2.9-7.4 s, vmlinux 0.8 s), warm
//! 0.05 s; initramfs 0.1-0.45 s (8 MB cpio without the agent, 44 MB with its debug info; zstd -3:
//! 3.5 / 11.6 MB; zstd boots no slower than plain cpio and keeps the file small, so it is the
//! default); qemu start to /init 2.9-12 s; the suite (one shared VM, then kernel-disk-reboot and
//! ulog-disk-restart on their own disks: 6 boots) 265-360 s plus the agent build, measured at
//! load 4-8 with 13-14 scenarios (`vm test` prints per-scenario times). The longest is
//! ulog-agent-kill (ten agent kills; a request left in flight costs the kernel's 15 s resend).
//!
//! Host packages: apt, dpkg, kmod (depmod), xz-utils, zstd, qemu-system-x86 (+ qemu-system-data
//! for qboot), busybox-static, dmsetup, libc-bin (ldd). The guest gets copies of the host's
//! busybox and dmsetup (+ libraries), so the host must be x86_64 (Debian 12 was tested).
//!
//! Limits: x86_64 only; no network in the single-guest test VM (virtio_net is in the initramfs; the
//! cluster pair has a link between its two guests only; otherwise only
//! [`demo`] adds `-netdev user,...,hostfwd=...` through `Machine::extra_args`); a guest process stuck in
//! D state cannot be cleaned up (see [`scenarios`]); tools beyond busybox/dmsetup/ulog-agent
//! (bpftool) are not in the test guest: add them like dmsetup in [`initramfs::build`] (a host
//! binary + its `ldd` closure), or for one kind of boot only through `Inputs::extra`, as
//! [`bench`] does for Debian's fio (fetched into the cache, not installed on the host).
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Subcommand, ValueEnum};

mod bench;
mod cluster;
pub mod demo;
mod fetch;
mod initramfs;
mod qemu;
mod scenarios;

use initramfs::Compression;
use qemu::{Accel, Machine};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download and unpack the pinned Debian kernel into the cache (idempotent).
    Fetch,
    /// Boot and run scenarios (the suite's when none is named); non-zero exit if any fails.
    Run(RunArgs),
    /// The whole VM suite; scenarios listed as expected to fail do not fail it.
    Test(RunArgs),
    /// Boot the guest with an interactive shell on this terminal.
    Shell(ShellArgs),
    /// Only build the initramfs and print its path.
    Build(BuildOpts),
    /// List the scenarios.
    List,
    /// fio on mirrors with the kernel's logs, ulog-agent and a constant responder (one boot,
    /// minutes under TCG); writes benchmarks/vm.md. See xtask/src/vm/bench.rs.
    Bench(bench::Args),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AgentBuild {
    /// `ebpf` when bpf-linker is on PATH, else `no-ebpf`.
    Auto,
    /// `cargo build --release -p ulog-agent` (needs the eBPF toolchain).
    Ebpf,
    /// The same with `--no-default-features --features cluster` (no eBPF programs; corosync
    /// client libraries still needed: the cluster-pair scenario runs `ulog-agent --cluster`).
    NoEbpf,
    /// Do not build; the guest has no /bin/ulog-agent (unless --agent is given).
    Skip,
}

#[derive(clap::Args, Clone)]
pub struct BuildOpts {
    /// How to build ulog-agent for the guest.
    #[arg(long, value_enum, default_value_t = AgentBuild::Auto)]
    agent_build: AgentBuild,
    /// Use this ulog-agent binary instead of building one.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// Initramfs compression.
    #[arg(long, value_enum, default_value_t = Compression::Zstd)]
    compression: Compression,
}

#[derive(clap::Args, Clone)]
pub struct MachineOpts {
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    accel: Accel,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    #[arg(long, default_value_t = 2)]
    smp: u32,
    /// Boot the compressed bzImage (KASLR, realistic layout; ~2x slower) instead of the vmlinux ELF.
    #[arg(long)]
    bzimage: bool,
    /// Use qemu's default firmware (SeaBIOS) instead of qboot.
    #[arg(long)]
    seabios: bool,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// Scenario names (see `vm list`); the suite's when empty.
    scenarios: Vec<String>,
    /// One VM per scenario instead of sharing one among single-boot scenarios without disks.
    #[arg(long)]
    isolate: bool,
    /// Keep console logs and disk images even when everything passed.
    #[arg(long)]
    keep_logs: bool,
    /// Do not copy the guest console to stdout (it is always in the log file).
    #[arg(long, short)]
    quiet: bool,
    /// Host timeout per boot, seconds (default: 60 + the scenarios' own timeouts + 15 s each).
    #[arg(long)]
    timeout: Option<u64>,
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    machine: MachineOpts,
}

#[derive(clap::Args, Clone)]
pub struct ShellArgs {
    /// Attach a fresh sparse virtio disk of this many MiB (repeatable; /dev/vda first).
    #[arg(long = "disk", value_name = "MIB")]
    disks: Vec<u64>,
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    machine: MachineOpts,
}

pub fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::Fetch => fetch::ensure_kernel(true).map(|_| ()),
        Cmd::Run(a) => run_scenarios(&a, false),
        Cmd::Test(a) => run_scenarios(&a, true),
        Cmd::Shell(a) => shell(&a),
        Cmd::Build(b) => {
            let _lock = lock_workdir()?;
            let k = fetch::ensure_kernel(false)?;
            let p = build_initramfs(&k, &b)?;
            println!("{}", p.display());
            Ok(())
        }
        Cmd::Bench(a) => bench::run(a),
        Cmd::List => {
            for s in scenarios::SCENARIOS {
                let xf = scenarios::expected_failure(s.name)
                    .map(|w| format!(" [expected to fail: {w}]"))
                    .unwrap_or_default();
                let suite = if s.suite { "" } else { " [not in the suite]" };
                println!("{:<20} {}{xf}{suite}", s.name, s.about);
            }
            Ok(())
        }
    }
}

// ---- shared helpers ------------------------------------------------------------------------

/// The cache folder (see the module docs).
pub fn cache_root() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("ULOG_VM_CACHE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p).join("ulog/vm"));
    }
    let home = std::env::var_os("HOME").context("neither ULOG_VM_CACHE, XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/ulog/vm"))
}

/// Run a command, failing with its name and status.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("spawn {:?}", cmd.get_program()))?;
    ensure!(st.success(), "{:?} {:?} failed: {st}", cmd.get_program(), cmd.get_args().collect::<Vec<_>>());
    Ok(())
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (made absolute) or `<workspace>/target`.
pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|p| !p.is_empty()) {
        Some(p) => std::path::absolute(PathBuf::from(p)).unwrap_or_default(),
        None => workspace_root().join("target"),
    }
}

fn workdir() -> Result<PathBuf> {
    let d = target_dir().join("vm");
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// One `vm` command at a time per target dir (they share the initramfs, disks/ and logs/).
/// The lock is released when the returned file is dropped (or the process dies).
fn lock_workdir() -> Result<std::fs::File> {
    let p = workdir()?.join("lock");
    let f = std::fs::File::create(&p)?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(_) => bail!(
            "another `cargo xtask vm` is running with this target dir ({}): wait, or set CARGO_TARGET_DIR",
            p.display()
        ),
    }
}

fn scenarios_dir() -> PathBuf {
    workspace_root().join("xtask/vm-scenarios")
}

/// Build (or locate) the ulog-agent binary for the guest.
fn agent_binary(b: &BuildOpts) -> Result<Option<PathBuf>> {
    if let Some(p) = &b.agent {
        ensure!(p.is_file(), "--agent {}: no such file", p.display());
        return Ok(Some(p.clone()));
    }
    let mode = match b.agent_build {
        AgentBuild::Auto if which("bpf-linker").is_some() => AgentBuild::Ebpf,
        AgentBuild::Auto => AgentBuild::NoEbpf,
        m => m,
    };
    if mode == AgentBuild::Skip {
        return Ok(None);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root()).args(["build", "--release", "-p", "ulog-agent"]);
    if mode == AgentBuild::NoEbpf {
        c.args(["--no-default-features", "--features", "cluster"]);
    }
    let t = Instant::now();
    eprintln!(
        "vm: building ulog-agent ({})",
        if mode == AgentBuild::Ebpf { "with eBPF" } else { "--no-default-features: no eBPF" }
    );
    run_cmd(&mut c).context("building ulog-agent (try --agent-build no-ebpf or skip)")?;
    let p = target_dir().join("release/ulog-agent");
    ensure!(p.is_file(), "cargo built ulog-agent but {} does not exist", p.display());
    eprintln!("vm: ulog-agent built ({:.1} s)", t.elapsed().as_secs_f64());
    Ok(Some(p))
}

fn build_initramfs(k: &fetch::Kernel, b: &BuildOpts) -> Result<PathBuf> {
    build_initramfs_with(k, b, agent_binary(b)?.as_deref(), "initramfs", None)
}

/// [`build_initramfs`] with a given agent (built once per run: an eBPF build takes 35-60 s even
/// when nothing changed), under another name, with boot-specific files (the cluster pair's
/// corosync).
fn build_initramfs_with(
    k: &fetch::Kernel,
    b: &BuildOpts,
    agent: Option<&Path>,
    stem: &str,
    extra: Option<initramfs::ExtraFiles>,
) -> Result<PathBuf> {
    let out = workdir()?.join(match b.compression {
        Compression::None => format!("{stem}.cpio"),
        Compression::Zstd => format!("{stem}.cpio.zst"),
    });
    let t = Instant::now();
    let built = initramfs::build(
        &initramfs::Inputs { kernel: k, scenarios_dir: &scenarios_dir(), agent, compression: b.compression, extra },
        &out,
    )?;
    eprintln!(
        "vm: initramfs {} ({} entries, {:.1} MB, cpio {:.1} MB{}) built in {:.2} s",
        out.display(),
        built.entries,
        built.file_bytes as f64 / 1e6,
        built.cpio_bytes as f64 / 1e6,
        if agent.is_some() { "" } else { ", no ulog-agent" },
        t.elapsed().as_secs_f64()
    );
    Ok(out)
}

fn machine(k: &fetch::Kernel, initrd: PathBuf, m: &MachineOpts) -> Result<Machine> {
    ensure!(which("qemu-system-x86_64").is_some(), "qemu-system-x86_64 not found (Debian package qemu-system-x86)");
    Ok(Machine {
        kernel: if m.bzimage { k.bzimage.clone() } else { k.vmlinux.clone() },
        bios: Some(PathBuf::from(qemu::QBOOT)).filter(|p| !m.seabios && p.is_file()),
        initrd,
        accel: m.accel,
        memory_mib: m.memory,
        smp: m.smp,
        extra_args: vec![],
    })
}

fn stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format!("{secs}-{}", std::process::id())
}

fn run_scenarios(a: &RunArgs, suite: bool) -> Result<()> {
    let t0 = Instant::now();
    let chosen: Vec<&'static scenarios::Scenario> = if a.scenarios.is_empty() {
        scenarios::SCENARIOS.iter().filter(|s| s.suite).collect()
    } else {
        a.scenarios
            .iter()
            .map(|n| {
                scenarios::find(n).with_context(|| {
                    let all: Vec<_> = scenarios::SCENARIOS.iter().map(|s| s.name).collect();
                    format!("unknown scenario {n:?}; known: {}", all.join(" "))
                })
            })
            .collect::<Result<_>>()?
    };
    for s in &chosen {
        let p = scenarios_dir().join(format!("{}.sh", s.name));
        ensure!(p.is_file(), "scenario script {} is missing", p.display());
    }
    let _lock = lock_workdir()?;
    let k = fetch::ensure_kernel(false)?;
    let agent = agent_binary(&a.build)?;
    let initrd = build_initramfs_with(&k, &a.build, agent.as_deref(), "initramfs", None)?;
    let m = machine(&k, initrd, &a.machine)?;
    eprintln!("vm: accel {:?}, {} MiB, {} vCPUs", m.accel.resolve(), m.memory_mib, m.smp);
    let wd = workdir()?;
    let st = stamp();
    let opts = scenarios::SessionOpts {
        machine: &m,
        workdir: &wd,
        echo: !a.quiet,
        keep_logs: a.keep_logs,
        timeout: a.timeout.map(Duration::from_secs),
        stamp: &st,
    };
    let mut verdicts = Vec::new();
    for sess in scenarios::plan(&chosen, a.isolate) {
        verdicts.extend(scenarios::run_session(&sess, &opts)?);
    }
    // Two-guest scenarios last: their own initramfs (with corosync) and machines.
    for s in chosen.iter().filter(|s| s.guests == 2) {
        let initrd =
            build_initramfs_with(&k, &a.build, agent.as_deref(), "initramfs-cluster", Some(&cluster::add_corosync))?;
        let mopts = MachineOpts { memory: cluster::GUEST_MIB, smp: cluster::GUEST_CPUS, ..a.machine.clone() };
        let pm = machine(&k, initrd, &mopts)?;
        let spec = cluster::PairSpec { disks: cluster::DISKS, kill: true };
        verdicts.push(cluster::run_pair(s, &pm, &scenarios::SessionOpts { machine: &pm, ..opts }, &spec)?.verdict);
    }

    // Report.
    let mut bad = 0;
    let mut excerpts: Vec<(String, PathBuf)> = Vec::new();
    eprintln!("\nvm: results ({:.1} s in all)", t0.elapsed().as_secs_f64());
    for v in &verdicts {
        let xfail = scenarios::expected_failure(v.name);
        let tag = match (v.passed, xfail, suite) {
            (true, Some(_), true) => "XPASS",
            (true, _, _) => "PASS",
            (false, Some(_), true) if !v.unexpected => "XFAIL",
            (false, _, _) => {
                bad += 1;
                "FAIL"
            }
        };
        let secs: Vec<String> = v.secs.iter().map(|s| format!("{s:.1}")).collect();
        let secs = if secs.is_empty() { "-".to_string() } else { format!("{} s", secs.join("+")) };
        let mut line = format!("  {tag:<5} {:<20} {secs}", v.name);
        if !v.reason.is_empty() {
            line += &format!("  ({})", v.reason);
        }
        if let Some(w) = xfail {
            line += &format!("  [expected to fail: {w}]");
        }
        eprintln!("{line}");
        if !v.passed {
            // The last boot's log is the one that failed.
            excerpts.extend(v.logs.last().map(|l| (v.name.to_string(), l.clone())));
        }
    }
    for v in verdicts.iter().filter(|v| v.passed && suite && scenarios::expected_failure(v.name).is_some()) {
        eprintln!("vm: note: {} passed: remove it from EXPECTED_TO_FAIL in xtask/src/vm/scenarios.rs", v.name);
    }
    for (name, l) in &excerpts {
        eprintln!(
            "\nvm: {name}: console log kept: {}\n---- end of {name}'s part ----\n{}\n--------------",
            l.display(),
            qemu::excerpt(l, name, 40)
        );
    }
    let kept: Vec<String> = verdicts.iter().flat_map(|v| v.logs.iter()).map(|l| l.display().to_string()).collect();
    if a.keep_logs && !kept.is_empty() {
        eprintln!("vm: logs kept (--keep-logs): {}", kept.join(" "));
    }
    if bad > 0 {
        bail!("{bad} VM scenario(s) failed");
    }
    Ok(())
}

fn shell(a: &ShellArgs) -> Result<()> {
    let _lock = lock_workdir()?;
    let k = fetch::ensure_kernel(false)?;
    let initrd = build_initramfs(&k, &a.build)?;
    let m = machine(&k, initrd, &a.machine)?;
    let disk_dir = workdir()?.join("disks/shell");
    let mut disks = Vec::new();
    if !a.disks.is_empty() {
        let _ = std::fs::remove_dir_all(&disk_dir);
        std::fs::create_dir_all(&disk_dir)?;
        for (i, mib) in a.disks.iter().enumerate() {
            let p = disk_dir.join(format!("disk{i}.img"));
            std::fs::File::create(&p)?.set_len(mib << 20)?;
            disks.push(p);
        }
        eprintln!("vm shell: disks in {}", disk_dir.display());
    }
    let st = qemu::interactive(&m, &format!("ulog.shell=1 ulog.disks={}", disks.len()), &disks)?;
    ensure!(st.success(), "qemu exited with {st}");
    Ok(())
}
