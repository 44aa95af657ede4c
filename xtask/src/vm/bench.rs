//! `cargo xtask vm bench`: fio against dm-raid1 mirrors in the Debian guest, with the kernel's own
//! dirty logs, ulog-agent and a constant-answer responder as the log, in one boot; writes
//! `benchmarks/vm.md` (a file of its own, so `cargo xtask bench`, which owns BENCHMARKS.md, can
//! include it). Not part of any test suite; nothing is asserted about timings.
//!
//! What one invocation does:
//! 1. Fetches Debian's fio (pinned [`FIO_VERSION`]) and the library packages of its dependency
//!    closure that the host lacks into the VM cache (`<cache>/fio/<version>/root`, `apt-get
//!    download` + `dpkg -x`). fio links 13 libraries directly (librbd, librados, libgfapi, ...)
//!    with `BIND_NOW`, so the loader needs every library `ldd` lists before `main` runs: that
//!    closure (~65 files, ~84 MB, ~32 MB with zstd; half of it libicudata and libceph-common) is
//!    the minimal run-time set, and it goes into the initramfs of the bench boot only.
//! 2. Builds ulog-agent and the fixture `ulog-agent/examples/const_responder.rs` (release, debug
//!    info stripped for the guest), and an initramfs with them, fio, the guest script
//!    (`xtask/vm-bench/bench.sh` as /scenarios/vm-bench.sh) and its parameters.
//! 3. Boots once (2 GiB, 3 virtio disks backed by sparse files under `<target>/vm/bench/<stamp>/`,
//!    i.e. on the target dir's file system, not tmpfs): vda = the kernel `disk` log's device,
//!    vdb = ulog `clustered-disk`'s, vdc = the results (a tar archive the guest writes at the end).
//!    The guest runs every (config, job) with a fresh mirror and a fresh server, interleaved in
//!    rounds, then the traced runs (see the script's header).
//! 4. Unpacks the results next to the disks and renders `benchmarks/vm.md`. `--from DIR`
//!    re-renders from an earlier run's results without booting.
//!
//! Configs (the letters are the issue's): linear over leg 0 (the ceiling); (a) `core`; (b) ulog
//! `clustered-core`; (c) ulog `clustered-core` with `integrated_flush`; (d) `disk` on vda; (e)
//! ulog `clustered-disk` on vdb; (r) and (ri) the constant responder for (b) and (c). All mirrors:
//! 2 legs (loop devices over files in the guest's tmpfs), `nosync`, 512 KiB regions.
//!
//! The `resync` job (`--jobs resync`, configs from `--resync-configs`: `core`, `ucore`, and
//! `rsync` = the constant responder with `--resync`, which answers resync work from a counter:
//! the floor) creates the same mirror without `nosync`, in 4096 regions, and measures its
//! initial resync: the time to N/N with nothing else running, 40 writes in the last quarter
//! during it (the IS_REMOTE_RECOVERING hint's effect), fio's write IOPS during it, and, traced,
//! the kernel's round trip per request type per region recovered. See the guest script.
//!
//! The `cluster` job (`--jobs cluster`, alone) boots the two guests of the cluster-pair test
//! instead (`super::cluster`, guest script `xtask/vm-scenarios/cluster-bench.sh`, fio added to
//! their initramfs): IOPS of one mirror written by one node vs both, initial resync time with one
//! vs two nodes, and the per-request-type round trips (kernel-side, from the agent's eBPF
//! histogram, and the agent's service time) during one fio write phase without `--cluster`,
//! with `--cluster` alone in the group and with both nodes writing; writes
//! `benchmarks/vm-cluster.md` (see [`cluster_bench`]).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use super::{
    agent_binary, cache_root, fetch, initramfs, lock_workdir, machine, qemu, run_cmd, scenarios_dir, which, workdir,
    workspace_root, AgentBuild, BuildOpts, MachineOpts,
};

/// Debian 12's fio.
pub const FIO_VERSION: &str = "3.33-3";

/// Bump when the layout of the unpacked fio folder changes.
const FIO_LAYOUT: u32 = 1;

#[derive(clap::Args, Clone)]
pub struct Args {
    /// Short measurements: 3 s per fio job (1 s ramp), 2 s traced runs, 3 rounds.
    #[arg(long)]
    quick: bool,
    /// Seconds each fio job measures (after --ramp). Default 10 (quick: 3).
    #[arg(long, value_name = "S")]
    runtime: Option<u32>,
    /// fio ramp time, seconds, not counted. Default 1.
    #[arg(long, value_name = "S")]
    ramp: Option<u32>,
    /// Rounds of untraced runs (medians over them). Default 3.
    #[arg(long, value_name = "N")]
    rounds: Option<u32>,
    /// Seconds per traced run. Default 5 (quick: 2).
    #[arg(long, value_name = "S")]
    trace_runtime: Option<u32>,
    /// Skip the traced runs (round trips per request type, breakdown).
    #[arg(long)]
    no_trace: bool,
    /// Only these configs (comma-separated): lin, core, ucore, pcore, uif, disk, udisk, rcore, rif
    /// (pcore = ucore with the eBPF probes attached and BPF statistics on; qcore = the same with
    /// `--no-bpf-stats`).
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    configs: Vec<String>,
    /// Only these jobs (comma-separated): the fio jobs rand4k-qd1, rand4k-qd32, seq64k-qd8, and
    /// `resync` (a mirror's initial resync: time to full sync, and writes during it; configs
    /// from --resync-configs). E.g. `--jobs resync` runs only the resync job. `cluster` (alone):
    /// the two-guest cluster benchmark instead (see the module docs).
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    jobs: Vec<String>,
    /// Configs of the `resync` job (comma-separated): core (kernel `core` log), ucore (ulog
    /// `clustered-core`), rsync (the constant responder with `--resync`: resync work from a
    /// counter, the floor). Default: all three.
    #[arg(long, value_delimiter = ',', value_name = "ID")]
    resync_configs: Vec<String>,
    /// Seconds of 4 KiB random writes (depth 1) during the resync job's resync. Default 5
    /// (quick: 3).
    #[arg(long, value_name = "S")]
    resync_iops_runtime: Option<u32>,
    /// Size of the mirror (each leg), MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Print the report but leave benchmarks/vm.md alone.
    #[arg(long)]
    no_write: bool,
    /// Render from an earlier run's folder (`<target>/vm/bench/<stamp>`) without booting.
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// Do not copy the guest console to stdout (it is always in the log file).
    #[arg(long, short)]
    quiet: bool,
    /// Use this const_responder binary instead of building the example.
    #[arg(long, value_name = "PATH")]
    responder: Option<PathBuf>,
    /// Guest memory, MiB (the legs live in the guest's tmpfs).
    #[arg(long, default_value_t = 2048)]
    memory: u32,
    /// Guest vCPUs. 1 by default: with 2, every kernel-to-server hand-off waits for the other
    /// vCPU's host thread to be scheduled, and on these shared 2-core hosts that host latency
    /// (milliseconds under load) swamps what is measured; see the module docs.
    #[arg(long, default_value_t = 1)]
    smp: u32,
    /// Guest kernel command line additions. `tsc=reliable`: the guest kernel otherwise marks the
    /// TCG TSC unstable and falls back to the HPET, whose every read is an emulated MMIO access
    /// (clock_gettime then costs a system call plus that), unlike any real machine.
    #[arg(long, value_name = "ARGS", default_value = "tsc=reliable")]
    append: String,
    /// Run qemu with `-icount shift=N`: guest time advances by 2^N ns per executed instruction
    /// (and with real time only while the guest idles), so CPU-bound figures no longer depend on
    /// the host's load; single-threaded TCG, slower. Without it: wall-clock time.
    #[arg(long, value_name = "SHIFT")]
    icount: Option<u32>,
    #[arg(long, value_enum, default_value_t = qemu::Accel::Auto)]
    accel: qemu::Accel,
    #[command(flatten)]
    build: BuildOpts,
}

struct Config {
    id: &'static str,
    letter: &'static str,
    label: &'static str,
    /// The constant responder run that is this config's floor.
    floor: Option<&'static str>,
}

const CONFIGS: &[Config] = &[
    Config { id: "lin", letter: "—", label: "linear (ceiling)", floor: None },
    Config { id: "core", letter: "a", label: "kernel `core` log", floor: None },
    Config { id: "ucore", letter: "b", label: "ulog `clustered-core`", floor: Some("rcore") },
    Config { id: "pcore", letter: "p", label: "ulog `clustered-core`, eBPF probes attached", floor: Some("rcore") },
    Config {
        id: "qcore",
        letter: "q",
        label: "ulog `clustered-core`, eBPF probes attached, BPF statistics off",
        floor: Some("rcore"),
    },
    Config { id: "uif", letter: "c", label: "ulog `clustered-core` + `integrated_flush`", floor: Some("rif") },
    Config { id: "rcore", letter: "r", label: "constant responder, `clustered-core`", floor: None },
    Config { id: "rif", letter: "ri", label: "constant responder + `integrated_flush`", floor: None },
    Config { id: "disk", letter: "d", label: "kernel `disk` log (virtio disk)", floor: None },
    Config { id: "udisk", letter: "e", label: "ulog `clustered-disk` (virtio disk)", floor: Some("rcore") },
];

/// Configs with a userspace server, traced in the round-trip runs.
const TRACED: &[&str] = &["ucore", "uif", "udisk", "rcore", "rif"];

struct Job {
    id: &'static str,
    label: &'static str,
}

const JOBS: &[Job] = &[
    Job { id: "rand4k-qd1", label: "4 KiB random writes, queue depth 1" },
    Job { id: "rand4k-qd32", label: "4 KiB random writes, queue depth 32" },
    Job { id: "seq64k-qd8", label: "64 KiB sequential writes, queue depth 8" },
];

/// The traced run with every probe (one job: the kernel's round trip dominates at depth 1).
const BREAKDOWN_JOBS: &[&str] = &["rand4k-qd1"];

/// The job id that selects the resync runs (not a fio job).
const RESYNC_JOB: &str = "resync";

/// Regions of the resync job's mirror (the issue's measurement: 256 MiB, 4096 regions).
const RESYNC_REGIONS: u64 = 4096;

/// Configs of the resync job: (id, label). The floor is `rsync`.
const RESYNC_CONFIGS: &[(&str, &str)] = &[
    ("core", "kernel `core` log"),
    ("ucore", "ulog `clustered-core`"),
    ("rsync", "constant responder `--resync` (floor)"),
];

/// Resync configs traced (one idle resync each) for the round trips per request type.
const RESYNC_TRACED: &[&str] = &["ucore", "rsync"];

/// Requests a mirror's creation, status and removal send (not per write).
const LIFECYCLE: &[&str] = &[
    "CTR",
    "DTR",
    "PRESUSPEND",
    "POSTSUSPEND",
    "RESUME",
    "GET_REGION_SIZE",
    "GET_SYNC_COUNT",
    "STATUS_INFO",
    "STATUS_TABLE",
];

/// Request types in the order the tables show them.
const TYPES: &[&str] = &[
    "IN_SYNC",
    "MARK_REGION",
    "FLUSH",
    "CLEAR_REGION",
    "IS_REMOTE_RECOVERING",
    "GET_RESYNC_WORK",
    "SET_REGION_SYNC",
    "IS_CLEAN",
];

fn type_name(n: i64) -> &'static str {
    const NAMES: [&str; 18] = [
        "UNKNOWN",
        "CTR",
        "DTR",
        "PRESUSPEND",
        "POSTSUSPEND",
        "RESUME",
        "GET_REGION_SIZE",
        "IS_CLEAN",
        "IN_SYNC",
        "FLUSH",
        "MARK_REGION",
        "CLEAR_REGION",
        "GET_RESYNC_WORK",
        "SET_REGION_SYNC",
        "GET_SYNC_COUNT",
        "STATUS_INFO",
        "STATUS_TABLE",
        "IS_REMOTE_RECOVERING",
    ];
    NAMES.get(n as usize).copied().unwrap_or("UNKNOWN")
}

struct Plan {
    runtime: u32,
    ramp: u32,
    rounds: u32,
    trace_runtime: u32,
    configs: Vec<&'static str>,
    jobs: Vec<&'static str>,
    traced: Vec<&'static str>,
    breakdown: Vec<&'static str>,
    size_mib: u64,
    resync_configs: Vec<&'static str>,
    resync_traced: Vec<&'static str>,
    resync_iops_runtime: u32,
}

impl Plan {
    fn from_args(a: &Args) -> Result<Plan> {
        let pick = |want: &[String], all: &[&'static str], what: &str| -> Result<Vec<&'static str>> {
            if want.is_empty() {
                return Ok(all.to_vec());
            }
            for w in want {
                ensure!(all.contains(&w.as_str()), "unknown {what} {w:?} (known: {})", all.join(", "));
            }
            Ok(all.iter().copied().filter(|c| want.iter().any(|w| w == c)).collect())
        };
        let configs = pick(&a.configs, &CONFIGS.iter().map(|c| c.id).collect::<Vec<_>>(), "config")?;
        let mut all_jobs: Vec<&'static str> = JOBS.iter().map(|j| j.id).collect();
        all_jobs.push(RESYNC_JOB);
        let mut jobs = pick(&a.jobs, &all_jobs, "job")?;
        let resync = jobs.contains(&RESYNC_JOB);
        jobs.retain(|j| *j != RESYNC_JOB);
        let resync_configs = if resync {
            pick(&a.resync_configs, &RESYNC_CONFIGS.iter().map(|c| c.0).collect::<Vec<_>>(), "resync config")?
        } else {
            vec![]
        };
        let resync_traced = if a.no_trace {
            vec![]
        } else {
            RESYNC_TRACED.iter().copied().filter(|c| resync_configs.contains(c)).collect()
        };
        ensure!(
            (a.size_mib * 2048 / RESYNC_REGIONS).is_power_of_two()
                && (a.size_mib * 2048).is_multiple_of(RESYNC_REGIONS),
            "--size-mib {}: the resync job needs {} regions of a power-of-two size",
            a.size_mib,
            RESYNC_REGIONS
        );
        let traced = if a.no_trace { vec![] } else { TRACED.iter().copied().filter(|t| configs.contains(t)).collect() };
        let breakdown = BREAKDOWN_JOBS.iter().copied().filter(|j| jobs.contains(j)).collect();
        Ok(Plan {
            runtime: a.runtime.unwrap_or(if a.quick { 3 } else { 10 }),
            ramp: a.ramp.unwrap_or(1),
            rounds: a.rounds.unwrap_or(3).max(1),
            trace_runtime: a.trace_runtime.unwrap_or(if a.quick { 2 } else { 5 }),
            configs,
            jobs,
            traced,
            breakdown,
            size_mib: a.size_mib,
            resync_configs,
            resync_traced,
            resync_iops_runtime: a.resync_iops_runtime.unwrap_or(if a.quick { 3 } else { 5 }),
        })
    }

    fn iops_runs(&self) -> u32 {
        self.rounds * (self.jobs.len() * self.configs.len()) as u32
    }

    fn traced_runs(&self) -> u32 {
        (self.traced.len() * (self.jobs.len() + self.breakdown.len())) as u32
    }

    /// Resync runs: an idle, a writes and an iops run per config and round, then the traced ones.
    fn resync_runs(&self) -> u32 {
        self.rounds * 3 * self.resync_configs.len() as u32 + self.resync_traced.len() as u32
    }

    /// Guest watchdog: the runs plus a generous per-run overhead under TCG (server start,
    /// dmsetup, fio start-up with 65 libraries), filling the legs and writing the results.
    fn guest_timeout_s(&self) -> u64 {
        let per = |rt: u32| (rt + self.ramp + 15) as u64;
        // A resync of 4096 regions took up to ~31 s under TCG: allow 180 s a run.
        self.iops_runs() as u64 * per(self.runtime)
            + self.traced_runs() as u64 * per(self.trace_runtime)
            + self.resync_runs() as u64 * (180 + self.resync_iops_runtime as u64)
            + 300
    }

    fn params_sh(&self) -> String {
        format!(
            "# written by cargo xtask vm bench\nRUNTIME={}\nRAMP={}\nROUNDS={}\nTRACE_RUNTIME={}\n\
             CONFIGS=\"{}\"\nJOBS=\"{}\"\nTRACE_CONFIGS=\"{}\"\nBREAKDOWN_JOBS=\"{}\"\nSIZE_MIB={}\n\
             REGION=1024\nTRACE_BUF_KB=32768\nRESYNC_CONFIGS=\"{}\"\nRESYNC_TRACE_CONFIGS=\"{}\"\n\
             RESYNC_REGIONS={}\nRESYNC_REGION={}\nRESYNC_IOPS_RUNTIME={}\n",
            self.runtime,
            self.ramp,
            self.rounds,
            self.trace_runtime,
            self.configs.join(" "),
            self.jobs.join(" "),
            self.traced.join(" "),
            if self.traced.is_empty() { String::new() } else { self.breakdown.join(" ") },
            self.size_mib,
            self.resync_configs.join(" "),
            self.resync_traced.join(" "),
            RESYNC_REGIONS,
            self.size_mib * 2048 / RESYNC_REGIONS,
            self.resync_iops_runtime,
        )
    }
}

pub fn run(a: Args) -> Result<()> {
    if let Some(dir) = &a.from {
        let plan_text = fs::read_to_string(dir.join("command.txt")).unwrap_or_default();
        return report(dir, &a, plan_text.trim());
    }
    if a.jobs.iter().any(|j| j == CLUSTER_JOB) {
        ensure!(a.jobs.len() == 1, "--jobs {CLUSTER_JOB} runs on its own (two guests)");
        return cluster_bench(&a);
    }
    let plan = Plan::from_args(&a)?;
    let _lock = lock_workdir()?;
    let t0 = Instant::now();
    let k = fetch::ensure_kernel(false)?;
    let fio = ensure_fio()?;
    let dir = workdir()?.join("bench").join(super::stamp());
    fs::create_dir_all(&dir)?;
    let command = reproduce_command();
    fs::write(dir.join("command.txt"), &command)?;
    fs::write(
        dir.join("params.sh"),
        format!("{}ICOUNT={}\n", plan.params_sh(), a.icount.map_or(String::new(), |n| n.to_string())),
    )?;
    fs::write(dir.join("source.txt"), source_version())?;

    // Binaries for the guest, debug info stripped (44 MB less to unpack at boot).
    let agent = agent_binary(&a.build)?.context("vm bench needs ulog-agent (not --agent-build skip)")?;
    let responder = match &a.responder {
        Some(p) => p.clone(),
        None => build_responder(&a.build)?,
    };
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    let agent = stripped(&agent, &bin.join("ulog-agent"))?;
    let responder = stripped(&responder, &bin.join("const-responder"))?;
    let fio_files = fio_files(&fio)?;
    let fio_bytes: u64 = fio_files.iter().filter_map(|(_, h)| fs::metadata(h).ok()).map(|m| m.len()).sum();
    eprintln!("vm bench: fio + {} libraries: {:.1} MB", fio_files.len() - 1, fio_bytes as f64 / 1e6);

    let script = workspace_root().join("xtask/vm-bench/bench.sh");
    let params = plan.params_sh();
    let extra = |t: &mut initramfs::Tree| -> Result<()> {
        for (guest, host) in &fio_files {
            if !t.contains(guest) {
                t.file(guest, host)?;
            }
        }
        t.binary_with_libs("/bin/const-responder", &responder)?;
        t.bytes(
            "/scenarios/vm-bench.sh",
            fs::read(&script).with_context(|| format!("read {}", script.display()))?,
            0o755,
        );
        t.bytes("/bench/params.sh", params.clone().into_bytes(), 0o644);
        Ok(())
    };
    let initrd = dir.join("initramfs.cpio.zst");
    let t = Instant::now();
    let built = initramfs::build(
        &initramfs::Inputs {
            kernel: &k,
            scenarios_dir: &scenarios_dir(),
            agent: Some(&agent),
            compression: a.build.compression,
            extra: Some(&extra),
        },
        &initrd,
    )?;
    eprintln!(
        "vm bench: initramfs {:.1} MB (cpio {:.1} MB) in {:.1} s",
        built.file_bytes as f64 / 1e6,
        built.cpio_bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let mopts = MachineOpts { accel: a.accel, memory: a.memory, smp: a.smp, bzimage: false, seabios: false };
    let mut m = machine(&k, initrd.clone(), &mopts)?;
    if let Some(shift) = a.icount {
        ensure!(a.accel != qemu::Accel::Kvm, "--icount needs TCG");
        m.accel = qemu::Accel::Tcg;
        m.extra_args.extend(["-icount".to_string(), format!("shift={shift}")]);
    }

    // Disks: sparse files on the target dir's file system.
    let mut disks = Vec::new();
    for (name, mib) in [("klog.img", 8u64), ("ulog.img", 8), ("results.img", 2048)] {
        let p = dir.join(name);
        fs::File::create(&p)?.set_len(mib << 20)?;
        disks.push(p);
    }
    let guest_t = plan.guest_timeout_s();
    let log = dir.join("console.log");
    eprintln!(
        "vm bench: {} untraced runs of {} s + {} traced runs of {} s + {} resync runs (guest limit {} s); console: {}",
        plan.iops_runs(),
        plan.runtime,
        plan.traced_runs(),
        plan.trace_runtime,
        plan.resync_runs(),
        guest_t,
        log.display()
    );
    let sampler = Sampler::start(initrd.display().to_string());
    let out = qemu::boot(&qemu::Boot {
        machine: &m,
        cmdline: format!("ulog.scenarios=vm-bench:{guest_t} ulog.boot=1 ulog.boots=1 ulog.disks=3 {}", a.append),
        disks: &disks,
        timeout: Duration::from_secs(guest_t + 180),
        log: &log,
        echo: !a.quiet,
    })?;
    let samples = sampler.stop();
    fs::write(dir.join("qemu-cpu.tsv"), samples.iter().map(|(t, c)| format!("{t:.4}\t{c:.6}\n")).collect::<String>())?;
    let _ = fs::remove_file(&initrd);
    let ok = out.results.iter().any(|r| r.name == "vm-bench" && r.exit == 0);
    if !ok {
        eprintln!("vm bench: console log: {}\n{}", log.display(), qemu::excerpt(&log, "vm-bench", 40));
        bail!("the benchmark failed in the guest (see {})", log.display());
    }
    let res = dir.join("results");
    let _ = fs::remove_dir_all(&res);
    run_cmd(Command::new("tar").arg("-xf").arg(&disks[2]).arg("-C").arg(&dir)).context("unpack the results disk")?;
    ensure!(res.is_dir(), "the results disk holds no results/ folder");
    let _ = fs::remove_file(&disks[2]);
    eprintln!("vm bench: guest done in {:.0} s; results in {}", t0.elapsed().as_secs_f64(), res.display());
    report(&dir, &a, &command)
}

/// `<short commit>` plus a note when the agent's sources differ from it (read-only git).
fn source_version() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = git(&["status", "--porcelain", "--", "ulog-agent/src", "ulog-common/src", "ulog-agent/examples"])
        .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head} + uncommitted changes in ulog-agent/ulog-common")
    } else {
        head
    }
}

fn reproduce_command() -> String {
    let mut parts = vec!["cargo".to_string(), "xtask".to_string()];
    parts.extend(std::env::args().skip(1));
    parts.join(" ")
}

fn build_responder(b: &BuildOpts) -> Result<PathBuf> {
    let mode = match b.agent_build {
        AgentBuild::Auto if which("bpf-linker").is_some() => AgentBuild::Ebpf,
        AgentBuild::Auto | AgentBuild::Skip => AgentBuild::NoEbpf,
        m => m,
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(workspace_root()).args(["build", "--release", "-p", "ulog-agent", "--example", "const_responder"]);
    if mode == AgentBuild::NoEbpf {
        c.arg("--no-default-features");
    }
    eprintln!("vm bench: building the const_responder example");
    run_cmd(&mut c).context("building ulog-agent/examples/const_responder.rs")?;
    let p = super::target_dir().join("release/examples/const_responder");
    ensure!(p.is_file(), "{} does not exist after the build", p.display());
    Ok(p)
}

/// A copy of `src` without debug info at `dst` (a plain copy when `strip` is missing).
fn stripped(src: &Path, dst: &Path) -> Result<PathBuf> {
    let _ = fs::remove_file(dst);
    let ok = which("strip").is_some()
        && Command::new("strip").arg("--strip-debug").arg("-o").arg(dst).arg(src).status().is_ok_and(|s| s.success());
    if !ok {
        fs::copy(src, dst)?;
    }
    Ok(dst.to_path_buf())
}

// ---- host CPU of the guest ------------------------------------------------------------------

/// Samples, every 50 ms, the CPU time of the qemu process whose command line contains `needle`
/// (our initramfs path): (seconds since the start, CPU seconds of all its threads). The console
/// log's timestamps count from (within a millisecond of) the same start.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(f64, f64)>>,
}

impl Sampler {
    fn start(needle: String) -> Sampler {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t0 = Instant::now();
        let handle = std::thread::spawn(move || {
            let mut pid: Option<String> = None;
            let mut out = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                if pid.is_none() {
                    pid = find_process(&needle);
                }
                if let Some(p) = &pid {
                    match process_cpu_s(p) {
                        Some(c) => out.push((t0.elapsed().as_secs_f64(), c)),
                        None => break, // qemu exited
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            out
        });
        Sampler { stop, handle }
    }

    fn stop(self) -> Vec<(f64, f64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

fn find_process(needle: &str) -> Option<String> {
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.starts_with("qemu-system") && cmd.contains(needle) {
            return Some(name);
        }
    }
    None
}

/// CPU seconds of every thread of a process (schedstat: nanoseconds on a CPU).
fn process_cpu_s(pid: &str) -> Option<f64> {
    let mut ns = 0u64;
    for t in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let s = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        ns += s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(ns as f64 / 1e9)
}

/// (start, end) host seconds of each run from the console's `BENCH-MARK start|end <tag>` lines.
fn run_windows(console: &str) -> BTreeMap<String, (f64, f64)> {
    let mut start: BTreeMap<String, f64> = BTreeMap::new();
    let mut out = BTreeMap::new();
    for l in console.lines() {
        let Some(i) = l.find("BENCH-MARK ") else { continue };
        let Some(t) = l.strip_prefix('[').and_then(|r| r.split(']').next()).and_then(|t| t.trim().parse::<f64>().ok())
        else {
            continue;
        };
        let w: Vec<&str> = l[i + 11..].split_whitespace().collect();
        match w[..] {
            ["start", tag, ..] => {
                start.insert(tag.to_string(), t);
            }
            ["end", tag, ..] => {
                if let Some(s) = start.remove(tag) {
                    out.insert(tag.to_string(), (s, t));
                }
            }
            _ => {}
        }
    }
    out
}

/// Linear interpolation of the sampled CPU seconds at host time `t`.
fn cpu_at(samples: &[(f64, f64)], t: f64) -> Option<f64> {
    let i = samples.partition_point(|s| s.0 < t);
    if i == 0 || i >= samples.len() {
        return None;
    }
    let (a, b) = (samples[i - 1], samples[i]);
    Some(a.1 + (b.1 - a.1) * (t - a.0) / (b.0 - a.0).max(1e-9))
}

// ---- fio from Debian -----------------------------------------------------------------------

/// `<cache>/fio/<version>`, containing `root/` (the unpacked packages) once complete.
fn ensure_fio() -> Result<PathBuf> {
    let ver = std::env::var("ULOG_VM_FIO_VERSION").unwrap_or_else(|_| FIO_VERSION.into());
    let dir = cache_root()?.join("fio").join(&ver);
    let stamp_prefix = format!("layout {FIO_LAYOUT}\nfio {ver}\n");
    if fs::read_to_string(dir.join("stamp")).is_ok_and(|s| s.starts_with(&stamp_prefix)) {
        return Ok(dir.join("root"));
    }
    for tool in ["apt-get", "apt-cache", "dpkg", "dpkg-query", "ldd"] {
        ensure!(which(tool).is_some(), "vm bench: `{tool}` not found on the host");
    }
    let t = Instant::now();
    // fio's dependency closure; the library packages the host lacks are fetched (ldd then
    // resolves the rest on the host, as for dmsetup).
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            "--no-pre-depends",
        ])
        .arg(format!("fio={ver}"))
        .output()
        .context("apt-cache depends fio")?;
    ensure!(
        out.status.success(),
        "apt-cache depends fio={ver} failed (run `apt-get update`; or set ULOG_VM_FIO_VERSION): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let libs: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(' ') && !l.starts_with('<'))
        .map(|l| l.trim().to_string())
        .filter(|p| p.starts_with("lib") && p != "libc6")
        .collect();
    let q = Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Status} ${Package}\n"])
        .args(&libs)
        .output()
        .context("dpkg-query")?;
    let installed: BTreeSet<String> = String::from_utf8_lossy(&q.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("installed "))
        .map(|p| p.split(':').next().unwrap_or(p).to_string())
        .collect();
    let mut want: Vec<String> = vec![format!("fio={ver}")];
    want.extend(libs.iter().filter(|p| !installed.contains(*p)).cloned());
    let staging = dir.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(staging.join("debs"))?;
    let res = (|| -> Result<()> {
        eprintln!("vm bench: apt-get download {}", want.join(" "));
        let mut c = Command::new("apt-get");
        c.current_dir(staging.join("debs")).arg("-q").arg("download");
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } == 0 {
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        run_cmd(c.args(&want))?;
        for e in fs::read_dir(staging.join("debs"))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "deb") {
                run_cmd(Command::new("dpkg").arg("-x").arg(&p).arg(staging.join("root")))?;
            }
        }
        fs::remove_dir_all(staging.join("debs"))?;
        fs::write(staging.join("stamp"), format!("{stamp_prefix}packages {}\n", want.join(" ")))?;
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.parent().unwrap())?;
        fs::rename(&staging, &dir)?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    res?;
    eprintln!("vm bench: fio {ver} unpacked in {} ({:.1} s)", dir.display(), t.elapsed().as_secs_f64());
    Ok(dir.join("root"))
}

/// (guest path, host path) of fio and every library the loader needs for it: `ldd` with the
/// unpacked packages' library folders first, then the host's.
fn fio_files(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let bin = root.join("usr/bin/fio");
    ensure!(bin.is_file(), "{} missing: remove {} to fetch again", bin.display(), root.parent().unwrap().display());
    let mut dirs = BTreeSet::new();
    collect_lib_dirs(root, &mut dirs)?;
    let ld_path = dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":");
    let out = Command::new("ldd").arg(&bin).env("LD_LIBRARY_PATH", &ld_path).output().context("ldd fio")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "ldd {} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    let mut files = vec![("/usr/bin/fio".to_string(), bin.clone())];
    for line in text.lines().map(str::trim) {
        ensure!(
            !line.contains("not found"),
            "ldd fio: {line} (the host lost a library the cache relied on: remove {} to fetch again)",
            root.parent().unwrap().display()
        );
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(p) = path.filter(|p| p.starts_with('/')) else { continue };
        let host = PathBuf::from(p);
        let guest = match host.strip_prefix(root) {
            Ok(rel) => format!("/{}", rel.display()),
            Err(_) => p.to_string(),
        };
        files.push((guest, host));
    }
    Ok(files)
}

fn collect_lib_dirs(d: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
    for e in fs::read_dir(d)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect_lib_dirs(&e.path(), out)?;
        } else if e.file_name().to_string_lossy().contains(".so") {
            out.insert(d.to_path_buf());
        }
    }
    Ok(())
}

// ---- results -------------------------------------------------------------------------------

/// One run's files: `<mode>.<config>.<job>.r<round>.{json,stat,server,trace}`.
#[derive(Default, Clone)]
struct Run {
    round: u32,
    iops: f64,
    lat_mean_us: f64,
    clat_p99_us: f64,
    writes: u64,
    server_cpu_ns: u64,
    /// Guest CPU busy fraction (all vCPUs) during fio.
    busy: f64,
    /// Host CPU time qemu got ÷ host wall time over the run (NaN when not sampled).
    host_share: f64,
    /// `iops` with the time the host took the vCPU away removed (see [`normalise`]).
    iops_norm: f64,
    /// Of the guest's busy time, the part qemu really ran (1 when not sampled): scales guest
    /// on-CPU times, which count stolen time as their own.
    ran: f64,
    /// Requests the server answered, by type name.
    counts: BTreeMap<String, u64>,
}

/// Host steal removed: the guest was busy for busy × wall seconds, of which qemu ran for
/// `cpu` seconds; the rest (the host ran something else while the guest had work) is stolen.
/// IOPS × wall / (wall − stolen) is what the guest would have reached with the host's CPU to
/// itself. Only for one vCPU (with more, busy time and host CPU time do not map one to one).
fn normalise(r: &mut Run, window: Option<(f64, f64)>, samples: &[(f64, f64)], smp: u32) {
    r.host_share = f64::NAN;
    r.iops_norm = f64::NAN;
    let Some((t0, t1)) = window else { return };
    let (Some(c0), Some(c1)) = (cpu_at(samples, t0), cpu_at(samples, t1)) else { return };
    let wall = t1 - t0;
    if wall <= 0.0 {
        return;
    }
    let cpu = c1 - c0;
    r.host_share = cpu / wall;
    if smp == 1 {
        let stolen = (r.busy * wall - cpu).max(0.0);
        r.iops_norm = r.iops * wall / (wall - stolen).max(1e-9);
        if r.busy > 0.0 {
            r.ran = (cpu / (r.busy * wall)).min(1.0);
        }
    }
}

fn read_run(res: &Path, tag: &str) -> Result<Run> {
    let mut r = Run { ran: 1.0, ..Run::default() };
    let j: Value = serde_json::from_str(
        &fs::read_to_string(res.join(format!("{tag}.json"))).with_context(|| format!("{tag}.json"))?,
    )
    .with_context(|| format!("parse {tag}.json"))?;
    let w = &j["jobs"][0]["write"];
    r.iops = w["iops"].as_f64().unwrap_or(0.0);
    r.lat_mean_us = w["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1e3;
    r.clat_p99_us = w["clat_ns"]["percentile"]["99.000000"].as_f64().unwrap_or(0.0) / 1e3;
    let stat = fs::read_to_string(res.join(format!("{tag}.stat"))).unwrap_or_default();
    for l in stat.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["writes", n] => r.writes = n.parse().unwrap_or(0),
            ["server_cpu_ns", n] => r.server_cpu_ns = n.parse().unwrap_or(0),
            ["cpu_jiffies", b0, t0, b1, t1] => {
                let p = |s: &str| s.parse::<f64>().unwrap_or(0.0);
                let dt = p(t1) - p(t0);
                if dt > 0.0 {
                    r.busy = (p(b1) - p(b0)) / dt;
                }
            }
            _ => {}
        }
    }
    server_request_counts(&res.join(format!("{tag}.server")), &mut r.counts);
    Ok(r)
}

/// The request counts a server printed when it stopped: the responder's `REQUESTS <type> <n>`
/// lines, the agent's JSON "request totals" lines. Nothing if the file is missing.
fn server_request_counts(path: &Path, counts: &mut BTreeMap<String, u64>) {
    let Ok(s) = fs::read_to_string(path) else { return };
    for l in s.lines() {
        if let Some(rest) = l.strip_prefix("REQUESTS ") {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some(c)) = (it.next(), it.next().and_then(|c| c.parse().ok())) {
                counts.insert(n.to_string(), c);
            }
        } else if let Ok(v) = serde_json::from_str::<Value>(l) {
            let f = &v["fields"];
            if f["message"] == "request totals" {
                if let (Some(n), Some(c)) = (f["request"].as_str(), f["served"].as_u64()) {
                    counts.insert(n.to_string(), c);
                }
            }
        }
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

// ---- traces --------------------------------------------------------------------------------

struct Ev<'a> {
    pid: u32,
    ts: u64,
    name: &'a str,
    rest: &'a str,
}

/// One line of the `trace` file: `comm-pid [cpu] flags ts: event: fields`.
fn parse_line(line: &str) -> Option<Ev<'_>> {
    if line.starts_with('#') {
        return None;
    }
    let b = line.find(" [")?;
    let pid = line[..b].trim().rsplit_once('-')?.1.parse().ok()?;
    let after = &line[b + 2..];
    let after = &after[after.find(']')? + 1..];
    let mut toks = after.split_whitespace();
    let mut ts = None;
    for t in toks.by_ref() {
        if let Some(n) = t.strip_suffix(':').and_then(|n| n.parse::<u64>().ok()) {
            ts = Some(n);
            break;
        }
    }
    let ts = ts?;
    let name_tok = toks.next()?;
    let name = name_tok.trim_end_matches(':');
    let name = name.split('(').next().unwrap_or(name);
    let idx = after.find(name_tok)? + name_tok.len();
    Some(Ev { pid, ts, name, rest: &after[idx..] })
}

fn field(rest: &str, key: &str) -> Option<i64> {
    rest.split_whitespace()
        .find_map(|t| t.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

#[derive(Default)]
struct TraceStats {
    /// Round trip (ns) per type.
    rtt: BTreeMap<&'static str, Vec<f64>>,
    /// Breakdown phases (ns) per type: send, deliver, server, reply, wake, total.
    phases: BTreeMap<&'static str, [Vec<f64>; 6]>,
    incomplete: u64,
    lost: u64,
    /// (tsc, uptime s) of the markers.
    cal: Vec<(u64, f64)>,
}

fn read_trace(path: &Path, breakdown: bool, st: &mut TraceStats) -> Result<()> {
    let f = BufReader::new(fs::File::open(path).with_context(|| format!("open {}", path.display()))?);
    let mut open: BTreeMap<u32, (&'static str, u64)> = BTreeMap::new();
    // The breakdown's current request: worker pid, type, [t0, cnsend, recv exit, sendto, cb], seq.
    struct Win {
        pid: u32,
        kind: &'static str,
        t: [Option<u64>; 5],
        seq: Option<i64>,
    }
    let mut win: Option<Win> = None;
    for line in f.lines() {
        let line = line?;
        if line.starts_with('#') {
            // "# entries-in-buffer/entries-written: 1234/1234   #P:2"
            if let Some(r) = line.split("entries-written:").nth(1) {
                let nums: Vec<u64> =
                    r.split_whitespace().next().unwrap_or("").split('/').filter_map(|n| n.parse().ok()).collect();
                if let [a, b] = nums[..] {
                    st.lost += b.saturating_sub(a);
                }
            }
            continue;
        }
        let Some(ev) = parse_line(&line) else { continue };
        match ev.name {
            "tracing_mark_write" => {
                if let Some(up) = ev.rest.split_whitespace().nth(1).and_then(|u| u.parse().ok()) {
                    st.cal.push((ev.ts, up));
                }
            }
            "consult" => {
                let kind = type_name(field(ev.rest, "type").unwrap_or(0));
                open.insert(ev.pid, (kind, ev.ts));
                if breakdown {
                    if win.is_some() {
                        st.incomplete += 1; // two requests at once: not attributable
                    }
                    win = Some(Win { pid: ev.pid, kind, t: [Some(ev.ts), None, None, None, None], seq: None });
                }
            }
            "consult_ret" => {
                if let Some((kind, t0)) = open.remove(&ev.pid) {
                    st.rtt.entry(kind).or_default().push((ev.ts - t0) as f64);
                }
                if let Some(w) = win.take() {
                    if w.pid != ev.pid {
                        win = Some(w);
                        continue;
                    }
                    if let [Some(t0), Some(t1), Some(t2), Some(t3), Some(t4)] = w.t {
                        let p = st.phases.entry(w.kind).or_default();
                        let d = [t1 - t0, t2 - t1, t3 - t2, t4 - t3, ev.ts - t4, ev.ts - t0];
                        for (v, x) in p.iter_mut().zip(d) {
                            v.push(x as f64);
                        }
                    } else {
                        st.incomplete += 1;
                    }
                }
            }
            "cnsend" => {
                if let Some(w) = win.as_mut().filter(|w| w.t[1].is_none()) {
                    w.t[1] = Some(ev.ts);
                    w.seq = field(ev.rest, "seq");
                }
            }
            "sys_recvfrom" => {
                // "-> 0x<ret>": only datagrams, not the 250 ms timeouts (negative).
                let ret = ev
                    .rest
                    .split_whitespace()
                    .nth(1)
                    .and_then(|h| u64::from_str_radix(h.trim_start_matches("0x"), 16).ok())
                    .unwrap_or(u64::MAX);
                if ret as i64 > 0 {
                    if let Some(w) = win.as_mut().filter(|w| w.t[1].is_some() && w.t[2].is_none()) {
                        w.t[2] = Some(ev.ts);
                    }
                }
            }
            "sys_sendto" => {
                if let Some(w) = win.as_mut().filter(|w| w.t[2].is_some() && w.t[3].is_none()) {
                    w.t[3] = Some(ev.ts);
                }
            }
            "cb" => {
                if let Some(w) = win.as_mut().filter(|w| w.t[3].is_some() && w.t[4].is_none()) {
                    if field(ev.rest, "seq") == w.seq {
                        w.t[4] = Some(ev.ts);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// TSC cycles per µs: from the trace markers (TSC vs /proc/uptime over the widest span), else
/// from the guest kernel's calibration in dmesg.
fn tsc_per_us(cal: &[(u64, f64)], info: &str) -> (f64, String) {
    let dmesg = info
        .lines()
        .filter(|l| l.contains("MHz"))
        .filter_map(|l| {
            let i = l.find("MHz")?;
            l[..i].split_whitespace().next_back()?.parse::<f64>().ok()
        })
        .next_back();
    let lo = cal.iter().min_by(|a, b| a.1.total_cmp(&b.1));
    let hi = cal.iter().max_by(|a, b| a.1.total_cmp(&b.1));
    if let (Some(lo), Some(hi)) = (lo, hi) {
        let span = hi.1 - lo.1;
        if span >= 20.0 && hi.0 > lo.0 {
            let f = (hi.0 - lo.0) as f64 / span / 1e6;
            let note = match dmesg {
                Some(d) => format!(
                    "TSC {f:.1} MHz from trace markers over {span:.0} s of /proc/uptime (guest kernel: {d:.1} MHz)"
                ),
                None => format!("TSC {f:.1} MHz from trace markers over {span:.0} s of /proc/uptime"),
            };
            return (f, note);
        }
    }
    match dmesg {
        Some(d) => (d, format!("TSC {d:.1} MHz (guest kernel's calibration)")),
        None => (f64::NAN, "TSC frequency unknown".into()),
    }
}

// ---- report --------------------------------------------------------------------------------

fn fmt_iops(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn fmt_ratio(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else {
        format!("{x:.2}")
    }
}

fn fmt_us(x: f64) -> String {
    if x.is_nan() {
        "—".into()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

fn host_machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "?".into(), |s| s.trim().to_string());
    let load = fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{nproc} CPUs ({cpu}), Linux {kernel}; load average at the end: {load}")
}

fn file_date(p: &Path) -> String {
    let secs = fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

fn report(dir: &Path, a: &Args, command: &str) -> Result<()> {
    let res = dir.join("results");
    ensure!(res.is_dir(), "{} has no results/ folder", dir.display());
    let params = fs::read_to_string(dir.join("params.sh")).unwrap_or_default();
    let info = fs::read_to_string(res.join("guest-info.txt")).unwrap_or_default();

    let samples: Vec<(f64, f64)> = fs::read_to_string(dir.join("qemu-cpu.tsv"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_once('\t')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    let windows = run_windows(&fs::read_to_string(dir.join("console.log")).unwrap_or_default());
    let icount = params.lines().find_map(|l| l.strip_prefix("ICOUNT=")).unwrap_or("").trim().to_string();
    let smp: u32 = info.lines().find_map(|l| l.strip_prefix("cpus ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0);

    // Every run present, by (mode, config, job) -> rounds.
    let mut runs: BTreeMap<(String, String, String), Vec<Run>> = BTreeMap::new();
    let mut traces: Vec<(String, String, String, PathBuf)> = Vec::new();
    for e in fs::read_dir(&res)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let Some(tag) = name.strip_suffix(".json") else { continue };
        let parts: Vec<&str> = tag.split('.').collect();
        let [mode, c, j, round] = parts[..] else { continue };
        let mut r = read_run(&res, tag)?;
        r.round = round.trim_start_matches('r').parse().unwrap_or(0);
        if icount.is_empty() {
            normalise(&mut r, windows.get(tag).copied(), &samples, smp);
        } else {
            (r.host_share, r.iops_norm) = (f64::NAN, f64::NAN);
        }
        runs.entry((mode.into(), c.into(), j.into())).or_default().push(r);
        let tp = res.join(format!("{tag}.trace"));
        if tp.is_file() {
            traces.push((mode.into(), c.into(), j.into(), tp));
        }
    }
    let resync_md = resync_report(&res, &windows, &samples, &info)?;
    if runs.is_empty() {
        ensure!(!resync_md.is_empty(), "no runs in {}", res.display());
        let mut md = String::new();
        let _ = writeln!(md, "# VM benchmarks: dm-raid1 mirrors in a Debian 6.1 guest under qemu\n");
        let _ = writeln!(
            md,
            "Generated by `cargo xtask vm bench` (xtask/src/vm/bench.rs; guest script xtask/vm-bench/bench.sh). \
             This file is rewritten by each run. Nothing here is asserted by any test.\n"
        );
        let g = |k: &str| info.lines().find_map(|l| l.strip_prefix(&format!("{k} "))).unwrap_or("?").to_string();
        let _ = writeln!(
            md,
            "- Date: {}\n- Sources: {}\n- Reproduce: `{command}`\n- Host: {}\n- Guest: Linux {}, {} vCPUs, TCG; clocksource {}\n",
            file_date(&res.join("guest-info.txt")),
            fs::read_to_string(dir.join("source.txt")).map_or_else(|_| "?".to_string(), |s| s.trim().to_string()),
            host_machine(),
            g("kernel"),
            g("cpus"),
            g("clocksource"),
        );
        md.push_str(&resync_md);
        return emit_report(dir, a, md);
    }
    // Rounds in order: ratios pair the runs of the same round.
    for v in runs.values_mut() {
        v.sort_by_key(|r| r.round);
    }
    let get = |mode: &str, c: &str, j: &str| runs.get(&(mode.to_string(), c.to_string(), j.to_string()));
    // The figure ratios are taken from: IOPS with host steal removed when every untraced run has
    // it (one vCPU, qemu sampled), else wall-clock IOPS.
    let norm = runs.iter().filter(|(k, _)| k.0 == "iops").all(|(_, v)| v.iter().all(|r| r.iops_norm.is_finite()));
    let val = move |r: &Run| if norm { r.iops_norm } else { r.iops };
    let med_of = |c: &str, j: &str, f: &dyn Fn(&Run) -> f64| {
        get("iops", c, j).map_or(f64::NAN, |v| median(&v.iter().map(f).collect::<Vec<_>>()))
    };
    let iops_med = |c: &str, j: &str| med_of(c, j, &val);
    // Paired per-round ratio (runs of the same round were minutes apart), median over rounds.
    let ratio_by = |c: &str, base: &str, j: &str, f: &dyn Fn(&Run) -> f64| -> (f64, f64, f64) {
        let (Some(x), Some(b)) = (get("iops", c, j), get("iops", base, j)) else {
            return (f64::NAN, f64::NAN, f64::NAN);
        };
        let v: Vec<f64> = x.iter().filter_map(|x| b.iter().find(|b| b.round == x.round).map(|b| f(x) / f(b))).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (median(&v), lo, hi)
    };
    let ratio = |c: &str, base: &str, j: &str| ratio_by(c, base, j, &val);
    let ratio_wall = |c: &str, base: &str, j: &str| ratio_by(c, base, j, &|r: &Run| r.iops);
    let jobs: Vec<&Job> = JOBS.iter().filter(|j| runs.keys().any(|k| k.2 == j.id)).collect();
    let configs: Vec<&Config> = CONFIGS.iter().filter(|c| runs.keys().any(|k| k.0 == "iops" && k.1 == c.id)).collect();
    let rounds = runs.iter().filter(|(k, _)| k.0 == "iops").map(|(_, v)| v.len()).max().unwrap_or(0);

    // Traces.
    let mut tstats: BTreeMap<(String, String, String), TraceStats> = BTreeMap::new();
    let mut all_cal = Vec::new();
    for (mode, c, j, p) in &traces {
        let st = tstats.entry((mode.clone(), c.clone(), j.clone())).or_default();
        read_trace(p, mode == "breakdown", st)?;
        all_cal.extend(st.cal.iter().copied());
    }
    let (tsc_mhz, tsc_note) = tsc_per_us(&all_cal, &info);
    let us = |cycles: f64| cycles / tsc_mhz;

    let p = |k: &str| {
        params
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| "?".into())
    };
    let quick = a.quick || command.contains("--quick");
    let mut md = String::new();
    let _ = writeln!(md, "# VM benchmarks: fio on dm-raid1 mirrors in a Debian 6.1 guest under qemu\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask vm bench` (xtask/src/vm/bench.rs; guest script xtask/vm-bench/bench.sh). \
         This file is rewritten by each run; BENCHMARKS.md (owned by `cargo xtask bench`) can include it. \
         Nothing here is asserted by any test.\n"
    );
    let _ = writeln!(
        md,
        "- Date: {}{}\n- Sources: {}\n- Reproduce: `{command}`\n- Host: {}\n- Guest: {}\n- fio: {}",
        file_date(&res.join("guest-info.txt")),
        if quick { " (**quick run**: short measurements, noisier)" } else { "" },
        fs::read_to_string(dir.join("source.txt")).map_or_else(|_| "?".to_string(), |s| s.trim().to_string()),
        host_machine(),
        {
            let g = |k: &str| info.lines().find_map(|l| l.strip_prefix(&format!("{k} "))).unwrap_or("?").to_string();
            format!(
                "Linux {}, {} vCPUs, {} MiB, TCG (no KVM on these machines: every figure is emulated, ratios are what count); clocksource {}",
                g("kernel"),
                g("cpus"),
                g("mem_kib").parse::<u64>().map_or("?".into(), |k| (k / 1024).to_string()),
                g("clocksource")
            )
        },
        info.lines().find_map(|l| l.strip_prefix("fio ")).unwrap_or("?")
    );
    let _ = writeln!(
        md,
        "- Runs: {} rounds × {} jobs × {} configs, {} s each after a {} s ramp (fio `--time_based`, libaio, `--direct=1`, `--norandommap`), \
         interleaved: for each round, for each job, every config in an order rotated per round. Then {} s traced runs.\n",
        rounds,
        jobs.len(),
        configs.len(),
        p("RUNTIME"),
        p("RAMP"),
        p("TRACE_RUNTIME"),
    );
    let _ = writeln!(
        md,
        "Every run has its own world: the config's server is started (ulog-agent `-f --no-probes`, or the constant responder), \
         a fresh mirror is created, fio runs, the dm device's write count is read, the mirror is removed and the server stopped \
         (it reports its request counts). Mirrors: {} MiB, 2 legs = loop devices over files in the guest's tmpfs (filled once \
         beforehand), `nosync`, regions of 1024 sectors (512 KiB, {} regions). Disk logs: the kernel's `disk` on /dev/vda, ulog's \
         `clustered-disk` on /dev/vdb, virtio disks backed by sparse files on the host's ext4 (qemu `cache=writeback`: a guest \
         flush is an fdatasync on the host). The constant responder is `ulog-agent/examples/const_responder.rs`: the agent's \
         socket set-up, answers from constants, no threads.\n",
        p("SIZE_MIB"),
        p("SIZE_MIB").parse::<u64>().map_or("?".into(), |m| (m * 2).to_string()),
    );

    // IOPS.
    let _ = writeln!(md, "## IOPS\n");
    if norm {
        let _ = writeln!(
            md,
            "The host is shared (other builds and VMs; the load average is above), so the host often runs something else \
             while the guest has work, and wall-clock IOPS move with that. The host samples qemu's CPU time every 50 ms; \
             over each run, *stolen* = guest busy time (its /proc/stat) − CPU time qemu got, and *IOPS, steal removed* = \
             IOPS × wall ÷ (wall − stolen): what the guest reaches with the host CPU to itself (one vCPU, so busy time \
             and qemu's CPU time correspond). **Ratios use that figure**; the wall-clock ratio of the targets is given \
             alongside. *host share* = qemu's CPU time ÷ wall time.\n"
        );
    }
    let _ = writeln!(
        md,
        "Medians over the rounds; ratios are the median over rounds of the ratio between runs of the same round \
         (range in brackets). *× floor* = against the constant responder with the same log options (a server that \
         does no work at all: ulog can only match it, within the noise; for (e) the core-log responder, for reference).\n"
    );
    for j in &jobs {
        let _ = writeln!(md, "### {}\n", j.label);
        let _ = writeln!(
            md,
            "| | config | IOPS (wall) | IOPS, steal removed | × (a) core | × (d) disk | × floor | mean latency | guest busy | host share |"
        );
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for c in &configs {
            let Some(v) = get("iops", c.id, j.id) else { continue };
            let rr = |base: &str| {
                if base == c.id || get("iops", base, j.id).is_none() {
                    return "—".to_string();
                }
                let (m, lo, hi) = ratio(c.id, base, j.id);
                if v.len() > 1 {
                    format!("{} [{}–{}]", fmt_ratio(m), fmt_ratio(lo), fmt_ratio(hi))
                } else {
                    fmt_ratio(m)
                }
            };
            let floor = c.floor.map_or("—".to_string(), |f| {
                let s = rr(f);
                if c.id == "udisk" {
                    format!("({s})")
                } else {
                    s
                }
            });
            let lat = median(&v.iter().map(|r| r.lat_mean_us).collect::<Vec<_>>());
            let busy = median(&v.iter().map(|r| r.busy).collect::<Vec<_>>());
            let share = median(&v.iter().map(|r| r.host_share).collect::<Vec<_>>());
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} µs | {:.0}% | {} |",
                c.letter,
                c.label,
                fmt_iops(med_of(c.id, j.id, &|r: &Run| r.iops)),
                fmt_iops(med_of(c.id, j.id, &|r: &Run| r.iops_norm)),
                rr("core"),
                rr("disk"),
                floor,
                fmt_us(lat),
                busy * 100.0,
                if share.is_nan() { "—".into() } else { format!("{:.0}%", share * 100.0) }
            );
        }
        md.push('\n');
    }

    // Targets.
    let _ = writeln!(md, "### Against the targets of the issue\n");
    let _ = writeln!(md, "| target | job | measured | |");
    let _ = writeln!(md, "|---|---|---:|---|");
    // One row per job of "config a / config b >= floor".
    let mut floor_rows = |label: &str, a: &str, b: &str, floor: f64| {
        for j in &jobs {
            let (m, lo, hi) = ratio(a, b, j.id);
            if !m.is_nan() {
                let _ = writeln!(
                    md,
                    "| {label} | {} | {} [{}–{}] (wall clock {}) | {} |",
                    j.id,
                    fmt_ratio(m),
                    fmt_ratio(lo),
                    fmt_ratio(hi),
                    fmt_ratio(ratio_wall(a, b, j.id).0),
                    if m >= floor { "met" } else { "**not met**" }
                );
            }
        }
    };
    floor_rows("(b) ulog `clustered-core` ≥ 0.90 × constant responder", "ucore", "rcore", 0.90);
    floor_rows("(c) ulog + `integrated_flush` ≥ 0.90 × constant responder + `integrated_flush`", "uif", "rif", 0.90);
    floor_rows("(p) eBPF probes attached ≥ 0.98 × (b)", "pcore", "ucore", 0.98);
    floor_rows("(q) eBPF probes attached, BPF statistics off ≥ 0.98 × (b)", "qcore", "ucore", 0.98);
    for j in &jobs {
        let (m, lo, hi) = ratio("uif", "ucore", j.id);
        if !m.is_nan() {
            let must = j.id == "rand4k-qd1";
            let _ = writeln!(
                md,
                "| (c) `integrated_flush` {} plain (b) | {} | {} × (b) [{}–{}] (wall clock {}) | {} |",
                if must { "beats" } else { "vs" },
                j.id,
                fmt_ratio(m),
                fmt_ratio(lo),
                fmt_ratio(hi),
                fmt_ratio(ratio_wall("uif", "ucore", j.id).0),
                if !must {
                    "(no target)"
                } else if m > 1.0 {
                    "met"
                } else {
                    "**not met**"
                }
            );
        }
    }
    for j in &jobs {
        let (m, _, _) = ratio("rcore", "core", j.id);
        let (mi, _, _) = ratio("rif", "core", j.id);
        if !m.is_nan() || !mi.is_nan() {
            let _ = writeln!(
                md,
                "| (floor) constant responder × (a); with `integrated_flush` | {} | {} ; {} | issue's C responder: {} |",
                j.id,
                fmt_ratio(m),
                fmt_ratio(mi),
                match j.id {
                    "rand4k-qd1" => "0.21 ; 0.26",
                    "rand4k-qd32" => "0.21 ; 0.24",
                    _ => "0.84 ; 0.97",
                }
            );
        }
    }
    md.push('\n');

    // Requests per write.
    let _ = writeln!(md, "## Requests per write\n");
    let _ = writeln!(
        md,
        "Requests the server answered during the untraced runs (its own counters, read at exit) divided by the writes the \
         dm device completed (`/sys/block/dm-N/stat`, ramp included, as are the requests); medians over rounds. *lifecycle* \
         = CTR, GET_REGION_SIZE, GET_SYNC_COUNT, RESUME, PRESUSPEND, POSTSUSPEND, DTR, STATUS (per mirror, not per write; \
         their count per run in the last column). *server CPU* = on-CPU time of all the server's threads (schedstat; \
         kernel time in its system calls included, e.g. the connector callback and the worker's wake-up run in its \
         `sendto`) per request, scaled by the part of the guest's busy time qemu really ran.\n"
    );
    let _ = write!(md, "| job | config |");
    for t in TYPES.iter().take(5) {
        let _ = write!(md, " {t} |");
    }
    let _ = writeln!(md, " other | all per write | lifecycle per run | server CPU per request |");
    let _ = writeln!(md, "|---|---|{}---:|---:|---:|---:|", "---:|".repeat(5));
    for j in &jobs {
        for c in configs.iter().filter(|c| TRACED.contains(&c.id)) {
            let Some(v) = get("iops", c.id, j.id) else { continue };
            let per = |f: &dyn Fn(&Run) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
            let _ = write!(md, "| {} | ({}) {} |", j.id, c.letter, c.label);
            for t in TYPES.iter().take(5) {
                let x = per(&|r: &Run| *r.counts.get(*t).unwrap_or(&0) as f64 / r.writes.max(1) as f64);
                let _ = write!(md, " {} |", if x == 0.0 { "0".into() } else { format!("{x:.2}") });
            }
            let other = per(&|r: &Run| {
                r.counts
                    .iter()
                    .filter(|(k, _)| !TYPES[..5].contains(&k.as_str()) && !LIFECYCLE.contains(&k.as_str()))
                    .map(|(_, c)| *c as f64)
                    .sum::<f64>()
                    / r.writes.max(1) as f64
            });
            let all = per(&|r: &Run| {
                r.counts.iter().filter(|(k, _)| !LIFECYCLE.contains(&k.as_str())).map(|(_, c)| *c as f64).sum::<f64>()
                    / r.writes.max(1) as f64
            });
            let life = per(&|r: &Run| {
                r.counts.iter().filter(|(k, _)| LIFECYCLE.contains(&k.as_str())).map(|(_, c)| *c as f64).sum::<f64>()
            });
            let cpu =
                per(&|r: &Run| r.server_cpu_ns as f64 * r.ran / r.counts.values().sum::<u64>().max(1) as f64 / 1e3);
            let _ = writeln!(
                md,
                " {} | {:.2} | {:.0} | {} µs |",
                if other == 0.0 { "0".into() } else { format!("{other:.2}") },
                all,
                life,
                fmt_us(cpu)
            );
        }
    }
    md.push('\n');

    // Round trips.
    if !tstats.is_empty() {
        let _ = writeln!(md, "## The kernel's round trip per request type\n");
        let _ = writeln!(
            md,
            "Separate runs ({} s each, not used for IOPS: tracing costs throughput) with a kprobe and a kretprobe on \
             `dm_consult_userspace` only (tracefs, `trace_clock` x86-tsc; {tsc_note}). Round trip = entry to return \
             in the mirror's worker thread: building and sending the request, the server, the reply, the wake-up \
             (and part of the two probes' own cost). One run per config and job: a busy host moves these figures \
             from run to run (compare (b) here with the breakdown's totals below, which carry four more probes). \
             Median / 90th percentile in µs; *n/write* = that type's requests per completed write in the traced \
             run; *host share* as above (steal is not removed from single requests).\n",
            p("TRACE_RUNTIME")
        );
        for j in &jobs {
            let any =
                configs.iter().any(|c| tstats.contains_key(&("rtt".to_string(), c.id.to_string(), j.id.to_string())));
            if !any {
                continue;
            }
            let _ = writeln!(md, "### {}\n", j.label);
            let _ = write!(md, "| config | IOPS (traced) |");
            for t in TYPES.iter().take(4) {
                let _ = write!(md, " {t} median / p90 | n/write |");
            }
            let _ = writeln!(md, " log time per write | 1 / IOPS | host share |");
            let _ = writeln!(md, "|---|---:|{}---:|---:|---:|", "---:|---:|".repeat(4));
            for c in &configs {
                let key = ("rtt".to_string(), c.id.to_string(), j.id.to_string());
                let Some(st) = tstats.get(&key) else { continue };
                let r = get("rtt", c.id, j.id).and_then(|v| v.first()).cloned().unwrap_or_default();
                let _ = write!(md, "| ({}) {} | {} |", c.letter, c.label, fmt_iops(r.iops));
                let mut per_write = 0.0;
                for (k, v) in &st.rtt {
                    per_write += us(mean(v)) * v.len() as f64 / r.writes.max(1) as f64;
                    let _ = k;
                }
                for t in TYPES.iter().take(4) {
                    match st.rtt.get(t) {
                        Some(v) if !v.is_empty() => {
                            let mut s = v.clone();
                            s.sort_by(|a, b| a.total_cmp(b));
                            let _ = write!(
                                md,
                                " {} / {} | {:.2} |",
                                fmt_us(us(percentile(&s, 0.5))),
                                fmt_us(us(percentile(&s, 0.9))),
                                v.len() as f64 / r.writes.max(1) as f64
                            );
                        }
                        _ => {
                            let _ = write!(md, " — | 0 |");
                        }
                    }
                }
                let _ = writeln!(
                    md,
                    " {} µs | {} µs | {} |",
                    fmt_us(per_write),
                    fmt_us(if r.iops > 0.0 { 1e6 / r.iops } else { f64::NAN }),
                    if r.host_share.is_nan() { "—".into() } else { format!("{:.0}%", r.host_share * 100.0) }
                );
                if st.lost > 0 {
                    let _ = writeln!(md, "\n(trace buffer lost {} events in this run)\n", st.lost);
                }
            }
            md.push('\n');
        }
        let _ = writeln!(
            md,
            "*log time per write* = Σ over every request type of (requests per write × mean round trip): the time the \
             worker spent waiting on the log per completed write. At depth 1 the worker handles one write at a \
             time, so comparing it with 1 / IOPS shows how much of a write's time is the log's.\n"
        );

        // Breakdown.
        let bkeys: Vec<_> = tstats.keys().filter(|k| k.0 == "breakdown").cloned().collect();
        if !bkeys.is_empty() {
            let _ = writeln!(md, "## Where a round trip goes\n");
            let _ = writeln!(
                md,
                "A further traced run per config ({}), with every probe: the kprobe/kretprobe on `dm_consult_userspace` (t0, t5), \
                 a kprobe on `cn_netlink_send` (t1, the request leaves dm-log-userspace), the server's `recvfrom` exit and \
                 `sendto` entry (syscall tracepoints, t2 and t3, filtered to the server's threads), a kprobe on \
                 `cn_ulog_callback` (t4, the reply reaches dm-log-userspace, matched by sequence number). Medians in µs. \
                 Every probe adds its own cost (~1–3 µs under TCG) to the interval it ends, so the total is larger than in \
                 the table above; the *server* column holds only the two syscall tracepoints' edges.\n",
                bkeys.iter().map(|k| k.2.as_str()).collect::<BTreeSet<_>>().into_iter().collect::<Vec<_>>().join(", ")
            );
            let _ = writeln!(
                md,
                "- *send* t1−t0: dm-log-userspace builds the request (mutex, copy) up to `cn_netlink_send`\n\
                 - *deliver* t2−t1: netlink multicast to group 7, the server's wake-up, `recvmsg`'s copy and return\n\
                 - *server* t3−t2: the server in userspace, from `recvfrom`'s return to `sendto`'s entry (decode, handle, \
                 encode; for a disk log's MARK also the hand-off to its I/O thread and the durable write); includes one \
                 syscall exit and one entry\n\
                 - *reply* t4−t3: `sendto` through netlink to the connector's callback\n\
                 - *wake* t5−t4: the callback matches the request, `complete()`, the worker wakes and returns\n"
            );
            let _ = writeln!(md, "| config | request | n | send | deliver | server | reply | wake | total | server ÷ total | server ÷ round trip (table above) |");
            let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for c in &configs {
                for k in bkeys.iter().filter(|k| k.1 == c.id) {
                    let st = &tstats[k];
                    let rtt_st = tstats.get(&("rtt".to_string(), k.1.clone(), k.2.clone()));
                    for t in TYPES {
                        let Some(ph) = st.phases.get(t) else { continue };
                        if ph[0].len() < 10 {
                            continue; // once per mirror (resync start), not per write
                        }
                        let m: Vec<f64> = ph.iter().map(|v| us(median(v))).collect();
                        let rt = rtt_st.and_then(|s| s.rtt.get(t)).map_or(f64::NAN, |v| us(median(v)));
                        let _ = writeln!(
                            md,
                            "| ({}) {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}% | {} |",
                            c.letter,
                            c.label,
                            t,
                            ph[0].len(),
                            fmt_us(m[0]),
                            fmt_us(m[1]),
                            fmt_us(m[2]),
                            fmt_us(m[3]),
                            fmt_us(m[4]),
                            fmt_us(m[5]),
                            m[2] / m[5] * 100.0,
                            if rt.is_nan() { "—".into() } else { format!("{:.0}%", m[2] / rt * 100.0) }
                        );
                    }
                    if st.incomplete > 0 || st.lost > 0 {
                        let _ = writeln!(
                            md,
                            "| ({}) | ({} requests without every edge{}) | | | | | | | | | |",
                            c.letter,
                            st.incomplete,
                            if st.lost > 0 { format!(", {} events lost", st.lost) } else { String::new() }
                        );
                    }
                }
            }
            md.push('\n');
            // The target: agent time <= 10% of the round trip for IN_SYNC, MARK, FLUSH on ucore.
            if let Some(st) = tstats.get(&("breakdown".to_string(), "ucore".to_string(), "rand4k-qd1".to_string())) {
                let rtt_st = tstats.get(&("rtt".to_string(), "ucore".to_string(), "rand4k-qd1".to_string()));
                let floor_srv = tstats
                    .get(&("breakdown".to_string(), "rcore".to_string(), "rand4k-qd1".to_string()))
                    .and_then(|r| r.phases.get("IN_SYNC"))
                    .map_or("—".to_string(), |p| fmt_us(us(median(&p[2]))));
                let _ = writeln!(
                    md,
                    "Target: ulog's own time ≤ 10% of the round trip for IN_SYNC, MARK and FLUSH on the core log (b). \
                     Agent time = t3−t2 (medians), which includes one system call return and one entry: the constant \
                     responder, whose own work is a 200-byte copy, measures {floor_srv} µs for IN_SYNC. Round trip: \
                     the same run's t5−t0 (it carries the four extra probes), and the kprobe-pair-only run above \
                     (fewer probes, but another run). The verdict uses the same run's figure.\n"
                );
                let _ = writeln!(md, "| request | agent (t3−t2) | round trip, same run | share | round trip, kprobe pair only | share | |");
                let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|");
                for t in ["IN_SYNC", "MARK_REGION", "FLUSH"] {
                    let agent = st.phases.get(t).map_or(f64::NAN, |p| us(median(&p[2])));
                    let total = st.phases.get(t).map_or(f64::NAN, |p| us(median(&p[5])));
                    let rt = rtt_st.and_then(|s| s.rtt.get(t)).map_or(f64::NAN, |v| us(median(v)));
                    let share = agent / total;
                    let _ = writeln!(
                        md,
                        "| {t} | {} µs | {} µs | {:.1}% | {} µs | {:.1}% | {} |",
                        fmt_us(agent),
                        fmt_us(total),
                        share * 100.0,
                        fmt_us(rt),
                        agent / rt * 100.0,
                        if share.is_nan() {
                            "—"
                        } else if share <= 0.10 {
                            "met"
                        } else {
                            "**not met**"
                        }
                    );
                }
                md.push('\n');
            }
        }
    }

    // Where the time goes, at depth 1.
    if let Some(j) = jobs.iter().find(|j| j.id == "rand4k-qd1") {
        let t = |c: &str| 1e6 / iops_med(c, j.id);
        if !t("core").is_nan() {
            let _ = writeln!(md, "## Where the time goes (4 KiB random writes, depth 1)\n");
            let _ = writeln!(
                md,
                "At depth 1 each write waits for everything dm-raid1 does for it, so time per write = 1 / IOPS. The extra \
                 time over the in-kernel `core` log (a) divided by the log requests per write (table above) is what each \
                 request costs end to end in the untraced runs.\n"
            );
            let _ = writeln!(md, "| config | µs per write | − (a) | log requests per write | extra µs per request |");
            let _ = writeln!(md, "|---|---:|---:|---:|---:|");
            for c in &configs {
                let tc = t(c.id);
                if tc.is_nan() {
                    continue;
                }
                let rpw = get("iops", c.id, j.id).map_or(f64::NAN, |v| {
                    median(
                        &v.iter()
                            .map(|r| {
                                r.counts
                                    .iter()
                                    .filter(|(k, _)| !LIFECYCLE.contains(&k.as_str()))
                                    .map(|(_, c)| *c as f64)
                                    .sum::<f64>()
                                    / r.writes.max(1) as f64
                            })
                            .collect::<Vec<_>>(),
                    )
                });
                let extra = tc - t("core");
                let has_server = TRACED.contains(&c.id);
                let _ = writeln!(
                    md,
                    "| ({}) {} | {} | {} | {} | {} |",
                    c.letter,
                    c.label,
                    fmt_us(tc),
                    if c.id == "core" { "—".into() } else { fmt_us(extra) },
                    if has_server { format!("{rpw:.2}") } else { "—".into() },
                    if has_server && rpw > 0.0 { fmt_us(extra / rpw) } else { "—".into() }
                );
            }
            md.push('\n');
            let shares: Vec<_> = configs
                .iter()
                .filter_map(|c| {
                    let st = tstats.get(&("breakdown".to_string(), c.id.to_string(), j.id.to_string()))?;
                    let r = get("breakdown", c.id, j.id)?.first()?.clone();
                    // Sum over types of (requests per write x median phase).
                    let mut tot = [0.0f64; 6];
                    for ph in st.phases.values() {
                        let n = ph[0].len() as f64 / r.writes.max(1) as f64;
                        for (i, v) in ph.iter().enumerate() {
                            tot[i] += n * us(median(v));
                        }
                    }
                    (tot[5] > 0.0).then_some((c, tot))
                })
                .collect();
            if !shares.is_empty() {
                let _ = writeln!(
                    md,
                    "Shares of the log's time per write in the breakdown runs (phases weighted by requests per write):\n"
                );
                let _ =
                    writeln!(md, "| config | µs per write in round trips | send | deliver | server | reply | wake |");
                let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
                for (c, tot) in shares {
                    let pc = |i: usize| format!("{:.0}%", tot[i] / tot[5] * 100.0);
                    let _ = writeln!(
                        md,
                        "| ({}) {} | {} | {} | {} | {} | {} | {} |",
                        c.letter,
                        c.label,
                        fmt_us(tot[5]),
                        pc(0),
                        pc(1),
                        pc(2),
                        pc(3),
                        pc(4)
                    );
                }
                md.push('\n');
            }
        }
    }

    md.push_str(&resync_md);
    emit_report(dir, a, md)
}

/// Prints the report, keeps it next to the results and (unless --no-write) in benchmarks/vm.md.
fn emit_report(dir: &Path, a: &Args, text: String) -> Result<()> {
    println!("{text}");
    fs::write(dir.join("report.md"), &text)?;
    if !a.no_write {
        let out = workspace_root().join("benchmarks/vm.md");
        fs::create_dir_all(out.parent().unwrap())?;
        fs::write(&out, &text)?;
        eprintln!("vm bench: wrote {}", out.display());
    }
    Ok(())
}

// ---- the resync job ------------------------------------------------------------------------

/// One resync run (`resync.<config>.<idle|writes>.r<round>`).
#[derive(Default)]
struct ResyncRun {
    round: u32,
    /// Seconds from `dmsetup create` to the sync-complete event (idle runs).
    synced_s: Option<f64>,
    /// The 40 writes, one after the other: their total time (dd's start-up included).
    w40_total_ms: Option<f64>,
    /// 4 KiB random-write IOPS (depth 1) during the resync.
    iops: Option<f64>,
    /// Regions in sync after the 40 writes and after the IOPS run.
    sync_after_w40: Option<u64>,
    sync_after_iops: Option<u64>,
    server_cpu_ns: u64,
    host_share: f64,
    /// (wall − stolen) ÷ wall over the run (1 when not sampled): the part of the run the guest
    /// really had the host's CPU while it had work (as for the fio runs, see [`normalise`]).
    /// Times are multiplied by it and IOPS divided by it to remove the host's steal.
    unstolen: f64,
    counts: BTreeMap<String, u64>,
}

fn read_resync_run(res: &Path, tag: &str, windows: &BTreeMap<String, (f64, f64)>, samples: &[(f64, f64)]) -> ResyncRun {
    let mut r = ResyncRun { host_share: f64::NAN, unstolen: 1.0, ..ResyncRun::default() };
    let mut busy = f64::NAN;
    let kv = fs::read_to_string(res.join(format!("{tag}.res"))).unwrap_or_default();
    for l in kv.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["synced_cs", n] => r.synced_s = n.parse::<f64>().ok().map(|c| c / 100.0),
            ["w40_cs", n] => r.w40_total_ms = n.parse::<f64>().ok().map(|c| c * 10.0),
            ["sync_after_w40", n] => r.sync_after_w40 = n.parse().ok(),
            ["sync_after_iops", n] => r.sync_after_iops = n.parse().ok(),
            ["server_cpu_ns", n] => r.server_cpu_ns = n.parse().unwrap_or(0),
            ["cpu_jiffies", b0, t0, b1, t1] => {
                let p = |s: &str| s.parse::<f64>().unwrap_or(0.0);
                let dt = p(t1) - p(t0);
                if dt > 0.0 {
                    busy = (p(b1) - p(b0)) / dt;
                }
            }
            _ => {}
        }
    }
    let json = |ext: &str| {
        fs::read_to_string(res.join(format!("{tag}.{ext}"))).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok())
    };
    if let Some(j) = json("iopsjson") {
        r.iops = j["jobs"][0]["write"]["iops"].as_f64();
    }
    if let Some((t0, t1)) = windows.get(tag) {
        if let (Some(c0), Some(c1)) = (cpu_at(samples, *t0), cpu_at(samples, *t1)) {
            let wall = (t1 - t0).max(1e-9);
            r.host_share = (c1 - c0) / wall;
            if busy.is_finite() {
                let stolen = (busy * wall - (c1 - c0)).clamp(0.0, wall * 0.95);
                r.unstolen = (wall - stolen) / wall;
            }
        }
    }
    server_request_counts(&res.join(format!("{tag}.server")), &mut r.counts);
    r
}

/// The resync job's section of the report (empty if the run had none).
fn resync_report(
    res: &Path,
    windows: &BTreeMap<String, (f64, f64)>,
    samples: &[(f64, f64)],
    info: &str,
) -> Result<String> {
    let mut runs: BTreeMap<(String, String), Vec<ResyncRun>> = BTreeMap::new();
    for e in fs::read_dir(res)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let Some(tag) = name.strip_suffix(".res") else { continue };
        let parts: Vec<&str> = tag.split('.').collect();
        let ["resync", c, kind, round] = parts[..] else { continue };
        let mut r = read_resync_run(res, tag, windows, samples);
        r.round = round.trim_start_matches('r').parse().unwrap_or(0);
        runs.entry((c.to_string(), kind.to_string())).or_default().push(r);
    }
    if runs.is_empty() {
        return Ok(String::new());
    }
    for v in runs.values_mut() {
        v.sort_by_key(|r| r.round);
    }
    let regions = RESYNC_REGIONS as f64;
    let configs: Vec<&(&str, &str)> = RESYNC_CONFIGS.iter().filter(|c| runs.keys().any(|k| k.0 == c.0)).collect();
    let get = |c: &str, k: &str| runs.get(&(c.to_string(), k.to_string()));
    let med = |c: &str, k: &str, f: &dyn Fn(&ResyncRun) -> Option<f64>| {
        get(c, k).map_or(f64::NAN, |v| median(&v.iter().filter_map(f).collect::<Vec<_>>()))
    };
    // Per-round ratio f(x) / f(base), median over rounds [range].
    let ratio = |c: &str, base: &str, k: &str, f: &dyn Fn(&ResyncRun) -> Option<f64>| -> String {
        let (Some(x), Some(b)) = (get(c, k), get(base, k)) else { return "—".into() };
        let v: Vec<f64> = x
            .iter()
            .filter_map(|x| {
                let b = b.iter().find(|b| b.round == x.round)?;
                Some(f(x)? / f(b)?)
            })
            .collect();
        if v.is_empty() {
            return "—".into();
        }
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{} [{}–{}]", fmt_ratio(median(&v)), fmt_ratio(lo), fmt_ratio(hi))
    };
    let label = |c: &str| RESYNC_CONFIGS.iter().find(|x| x.0 == c).map_or(c.to_string(), |x| x.1.to_string());
    let rounds = runs.values().map(Vec::len).max().unwrap_or(0);
    let mut md = String::new();
    let _ = writeln!(md, "## Resync: a mirror's initial resync of {RESYNC_REGIONS} regions\n");
    let _ = writeln!(
        md,
        "`--jobs resync`. A mirror of the same size and legs, created **without** `nosync`, in regions of 1/{RESYNC_REGIONS} \
         of the device (64 KiB at 256 MiB): it starts with a full resync, one region at a time (dm-raid1 recovers one region \
         at a time: every log round trip per region is on the critical path). {rounds} rounds, configs in an order rotated per \
         round. *idle*: nothing else runs; time from `dmsetup create` to the table event the mirror raises when its sync \
         completes (`dmsetup wait`, no polling). *writes*: right after create, 40 O_DIRECT 4 KiB writes one after the other \
         (`dd`) at fixed pseudo-random offsets in the last quarter of the device, the last region excluded. *iops*: fio (4 KiB \
         random writes, depth 1) starts on a linear table over leg 0; at its first write the table is replaced by the mirror \
         (suspend, load, resume: the resync starts) and fio measures a few seconds after a 1 s ramp. Runs other than *idle* \
         remove the mirror before its resync ends. Times and IOPS have the host's steal removed as for the fio runs (the \
         host samples qemu's CPU time; stolen = guest busy time − CPU time qemu got over the run; a time is multiplied by \
         (wall − stolen) ÷ wall, IOPS divided by it); wall-clock figures alongside. The floor is the constant responder with \
         `--resync` (ulog-agent/examples/const_responder.rs): GET_RESYNC_WORK from a counter (0, 1, 2, … then none), \
         GET_SYNC_COUNT = SET_REGION_SYNCs seen, IN_SYNC = region < that count, IS_REMOTE_RECOVERING {{0, N−1}} then {{0, N}}. \
         *host share* = qemu's CPU time ÷ wall time over the run. Medians over rounds, ratios per round then the median \
         [range].\n"
    );
    if configs.iter().any(|c| get(c.0, "idle").is_some()) {
        let _ = writeln!(md, "### Time to full sync (idle)\n");
        let _ = writeln!(
            md,
            "*speed × floor* = floor's time ÷ this config's (1 = as fast as a server that does no work); *time × core* = this \
             config's time ÷ the kernel `core` log's.\n"
        );
        let _ = writeln!(
            md,
            "| config | time to N/N, steal removed | per region | speed × floor | time × core | wall clock | speed × floor, wall | time × core, wall | host share |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let t = |r: &ResyncRun| r.synced_s.map(|s| s * r.unstolen);
        let t_wall = |r: &ResyncRun| r.synced_s;
        let speed = |r: &ResyncRun| r.synced_s.map(|s| 1.0 / (s * r.unstolen));
        let speed_wall = |r: &ResyncRun| r.synced_s.map(|s| 1.0 / s);
        for (c, _) in configs.iter().map(|c| (c.0, c.1)) {
            let s = med(c, "idle", &t);
            let _ = writeln!(
                md,
                "| {} | {:.1} s | {} µs | {} | {} | {:.1} s | {} | {} | {:.0}% |",
                label(c),
                s,
                fmt_us(s * 1e6 / regions),
                if c == "rsync" || c == "core" { "—".into() } else { ratio(c, "rsync", "idle", &speed) },
                if c == "core" { "—".into() } else { ratio(c, "core", "idle", &t) },
                med(c, "idle", &t_wall),
                if c == "rsync" || c == "core" { "—".into() } else { ratio(c, "rsync", "idle", &speed_wall) },
                if c == "core" { "—".into() } else { ratio(c, "core", "idle", &t_wall) },
                med(c, "idle", &|r: &ResyncRun| Some(r.host_share)) * 100.0,
            );
        }
        if get("rsync", "idle").is_some() && get("core", "idle").is_some() {
            let _ = writeln!(md, "\nFloor × core (time, steal removed): {}.", ratio("rsync", "core", "idle", &t));
        }
        let per_round: Vec<String> = configs
            .iter()
            .map(|c| {
                let v = get(c.0, "idle").map_or(Vec::new(), |v| {
                    v.iter().filter_map(|r| t(r).map(|x| format!("{x:.1}"))).collect::<Vec<_>>()
                });
                format!("{} {}", c.0, v.join(" / "))
            })
            .collect();
        let _ = writeln!(md, "\nTimes per round, steal removed (s): {}.", per_round.join("; "));
        md.push('\n');
        // Requests per region recovered (idle runs).
        let _ = writeln!(
            md,
            "Requests the server answered per region recovered (idle runs, medians; lifecycle requests included):\n"
        );
        let types = [
            "GET_RESYNC_WORK",
            "IN_SYNC",
            "SET_REGION_SYNC",
            "GET_SYNC_COUNT",
            "CLEAR_REGION",
            "FLUSH",
            "MARK_REGION",
            "IS_REMOTE_RECOVERING",
        ];
        let _ = writeln!(md, "| config | {} | all |", types.join(" | "));
        let _ = writeln!(md, "|---|{}---:|", "---:|".repeat(types.len()));
        for (c, _) in configs.iter().map(|c| (c.0, c.1)).filter(|c| c.0 != "core") {
            let per =
                |ty: &str| med(c, "idle", &|r: &ResyncRun| Some(*r.counts.get(ty).unwrap_or(&0) as f64 / regions));
            let all = med(c, "idle", &|r: &ResyncRun| Some(r.counts.values().sum::<u64>() as f64 / regions));
            let cells: Vec<String> = types.iter().map(|t| format!("{:.2}", per(t))).collect();
            let _ = writeln!(md, "| {} | {} | {:.2} |", label(c), cells.join(" | "), all);
        }
        md.push('\n');
    }
    if configs.iter().any(|c| get(c.0, "writes").is_some() || get(c.0, "iops").is_some()) {
        let _ = writeln!(md, "### Writes during the resync\n");
        let _ = writeln!(
            md,
            "Steal removed. *40 writes* = their total time (40 `dd` start-ups included, the same for every config); *time × core* = that ÷ \
             the kernel `core` log's (target ≤ 1.2). *synced after* = regions in sync when the writes were done (below 3072: \
             the resync had not reached the last quarter). IOPS: 4 KiB random writes at depth 1 over the whole device, \
             during the resync (*synced after*: when fio ended; below {RESYNC_REGIONS}: still resyncing).\n"
        );
        let _ = writeln!(
            md,
            "| config | 40 writes, last quarter | time × core | synced after | IOPS during resync | × core | × floor | synced after |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|");
        let w = |r: &ResyncRun| r.w40_total_ms.map(|x| x * r.unstolen);
        let io = |r: &ResyncRun| r.iops.map(|x| x / r.unstolen);
        for (c, _) in configs.iter().map(|c| (c.0, c.1)) {
            let _ = writeln!(
                md,
                "| {} | {:.0} ms | {} | {:.0} | {} | {} | {} | {:.0} |",
                label(c),
                med(c, "writes", &w),
                if c == "core" { "—".into() } else { ratio(c, "core", "writes", &w) },
                med(c, "writes", &|r: &ResyncRun| r.sync_after_w40.map(|n| n as f64)),
                fmt_iops(med(c, "iops", &io)),
                if c == "core" { "—".into() } else { ratio(c, "core", "iops", &io) },
                if c == "ucore" { ratio(c, "rsync", "iops", &io) } else { "—".into() },
                med(c, "iops", &|r: &ResyncRun| r.sync_after_iops.map(|n| n as f64)),
            );
        }
        md.push('\n');
    }
    // Traced idle resyncs: the kernel's round trip per request type, per region recovered.
    let mut traced: Vec<(&str, TraceStats)> = Vec::new();
    for (c, _) in RESYNC_CONFIGS {
        let p = res.join(format!("resynctrace.{c}.idle.r1.trace"));
        if p.is_file() {
            let mut st = TraceStats::default();
            read_trace(&p, false, &mut st)?;
            traced.push((c, st));
        }
    }
    if !traced.is_empty() {
        let cal: Vec<(u64, f64)> = traced.iter().flat_map(|(_, st)| st.cal.iter().copied()).collect();
        let (mhz, note) = tsc_per_us(&cal, info);
        let _ = writeln!(md, "### Where a resync's time goes: the kernel's round trips per region\n");
        let _ = writeln!(
            md,
            "One more idle resync per userspace config with a kprobe and a kretprobe on `dm_consult_userspace` (tracefs, \
             {note}). Per request type: calls per region recovered, median / 90th percentile round trip, and the time the \
             mirror's worker spent waiting on it per region (calls per region × mean). The kernel `core` log spends none of \
             this: the difference between a config's time per region and the core log's is what the log costs.\n"
        );
        let _ = writeln!(md, "| config | request | per region | median | p90 | waiting per region |");
        let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
        for (c, st) in &traced {
            let mut total = 0.0;
            for (ty, v) in &st.rtt {
                let mut s: Vec<f64> = v.iter().map(|x| x / mhz).collect();
                s.sort_by(|a, b| a.total_cmp(b));
                let per = s.len() as f64 / regions;
                let wait = per * mean(&s);
                total += wait;
                let _ = writeln!(
                    md,
                    "| {} | {ty} | {:.2} | {} | {} | {} |",
                    label(c),
                    per,
                    fmt_us(median(&s)),
                    fmt_us(percentile(&s, 0.9)),
                    fmt_us(wait)
                );
            }
            let _ = writeln!(md, "| {} | **all** | | | | **{}** |", label(c), fmt_us(total));
        }
        md.push('\n');
    }
    Ok(md)
}

// ---- the cluster job -----------------------------------------------------------------------

/// `--jobs cluster`: the guest pair of the cluster-pair test (two TCG guests, corosync over a
/// qemu dgram link, shared legs; `xtask/vm-scenarios/cluster-bench.sh` says what it runs) with
/// fio: 4 KiB random-write IOPS (depth 1) of one mirror written by one node vs by both, and the
/// initial resync time of one mirror activated by one node vs by both; and node 1's round trip
/// p50/p99 per request type in three configurations (see [`round_trip_table`]): the guest sends
/// the bucket lines of its /metrics before and after each fio phase, the deltas and quantiles
/// are computed here. Ratios from one run, means over the guest's rounds; written to
/// `benchmarks/vm-cluster.md`.
const CLUSTER_JOB: &str = "cluster";

static CLUSTER_BENCH: super::scenarios::Scenario = super::scenarios::Scenario {
    name: "cluster-bench",
    about: "the guest side of `vm bench --jobs cluster`",
    boots: 1,
    guests: 2,
    disks_mib: &[],
    timeout_s: 900,
    suite: false,
};

fn cluster_bench(a: &Args) -> Result<()> {
    let _lock = lock_workdir()?;
    let t0 = Instant::now();
    let k = fetch::ensure_kernel(false)?;
    let fio = ensure_fio()?;
    let dir = workdir()?.join("bench").join(super::stamp());
    let bin = dir.join("bin");
    fs::create_dir_all(&bin)?;
    let agent = agent_binary(&a.build)?.context("vm bench needs ulog-agent (not --agent-build skip)")?;
    let agent = stripped(&agent, &bin.join("ulog-agent"))?;
    let fio_files = fio_files(&fio)?;
    let extra = |t: &mut initramfs::Tree| -> Result<()> {
        super::cluster::add_corosync(t)?;
        for (guest, host) in &fio_files {
            if !t.contains(guest) {
                t.file(guest, host)?;
            }
        }
        Ok(())
    };
    let initrd = dir.join("initramfs.cpio.zst");
    initramfs::build(
        &initramfs::Inputs {
            kernel: &k,
            scenarios_dir: &scenarios_dir(),
            agent: Some(&agent),
            compression: a.build.compression,
            extra: Some(&extra),
        },
        &initrd,
    )?;
    // 1 GiB each (fio's libraries unpack into the guest's memory), 1 vCPU each (see cluster.rs).
    let mopts = MachineOpts { accel: a.accel, memory: a.memory.min(1024), smp: 1, bzimage: false, seabios: false };
    let mut m = machine(&k, initrd, &mopts)?;
    m.extra_args.clear();
    let wd = workdir()?;
    let st = super::stamp();
    let opts = super::scenarios::SessionOpts {
        machine: &m,
        workdir: &wd,
        echo: !a.quiet,
        keep_logs: true,
        timeout: None,
        stamp: &st,
    };
    let spec = super::cluster::PairSpec { disks: super::cluster::BENCH_DISKS, kill: false };
    let out = super::cluster::run_pair(&CLUSTER_BENCH, &m, &opts, &spec)?;
    let v = &out.verdict;
    ensure!(v.passed, "the cluster benchmark failed: {} (logs: {:?})", v.reason, v.logs);
    let text = cluster_report(&out.figures, &reproduce_command(), t0.elapsed().as_secs_f64());
    println!("{text}");
    fs::write(dir.join("report.md"), &text)?;
    if !a.no_write {
        let p = workspace_root().join("benchmarks/vm-cluster.md");
        fs::create_dir_all(p.parent().unwrap())?;
        fs::write(&p, &text)?;
        eprintln!("vm bench: wrote {}", p.display());
    }
    Ok(())
}

/// The figures node 1 reported, as markdown.
fn cluster_report(figures: &[(String, String)], command: &str, secs: f64) -> String {
    let get = |prefix: &str| -> Vec<f64> {
        figures.iter().filter(|(k, _)| k.starts_with(prefix)).filter_map(|(_, v)| v.parse().ok()).collect()
    };
    let one = mean(&get("iops_one_r"));
    let two1 = mean(&get("iops_two_node1_r"));
    let two2 = mean(&get("iops_two_node2_r"));
    let r1 = mean(&get("resync_one_ms_r")) / 1e3;
    let r2 = mean(&get("resync_two_ms_r")) / 1e3;
    let rounds = get("iops_one_r").len();
    let regions = get("regions").first().copied().unwrap_or(0.0);
    let secs_per_run = get("secs").first().copied().unwrap_or(0.0);
    let mut md = String::new();
    let _ = writeln!(md, "## Two nodes, one mirror (ulog `clustered-core` over corosync, guest pair)\n");
    let _ = writeln!(
        md,
        "`{command}` ({secs:.0} s). Two TCG guests (1 vCPU, 1 GiB each) on this 2-core host, corosync 3 \
         over a qemu dgram link (token 1000 ms), `ulog-agent --cluster` in each; one mirror of 64 MiB \
         in {regions:.0} regions of 256 KiB on shared virtio disks (cache=none). Means over {rounds} \
         rounds; the two guests share the host's two cores, so the two-node figures include that \
         contention.\n"
    );
    let _ = writeln!(md, "| measure | one node | two nodes | two ÷ one |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| 4 KiB random-write IOPS, depth 1, fio {secs_per_run:.0} s, each node on its own half (`nosync` mirror) | {} | {} + {} = {} | {} |",
        fmt_iops(one),
        fmt_iops(two1),
        fmt_iops(two2),
        fmt_iops(two1 + two2),
        fmt_ratio((two1 + two2) / one)
    );
    let _ = writeln!(md, "| initial resync, create to N/N, s | {r1:.1} | {r2:.1} | {} |", fmt_ratio(r2 / r1));
    round_trip_table(&mut md, figures);
    let _ = writeln!(md, "\nRaw figures (node 1's `ULOG-BENCH` lines, histogram buckets left out):\n");
    for (k, v) in figures.iter().filter(|(k, _)| !k.starts_with("h.")) {
        let _ = writeln!(md, "- {k} = {v}");
    }
    md
}

/// The round-trip configurations of the cluster job, as the guest names them.
const RTT_CONFIGS: [&str; 3] = ["single", "cluster1", "cluster2"];

/// Cumulative bucket counts of one histogram series by upper edge (seconds; +Inf as infinity).
type Buckets = BTreeMap<String, Vec<(f64, f64)>>;

/// The histogram buckets node 1 reported for one configuration, snapshot and metric (`k` the
/// kernel-side round trip, `a` the agent's service time): figures
/// `h.CFG.SNAP.M{type="T",le="E"}` = cumulative count. By request type, sorted by edge.
fn snapshot_buckets(figures: &[(String, String)], cfg: &str, snap: u32, metric: &str) -> Buckets {
    let prefix = format!("h.{cfg}.{snap}.{metric}{{");
    let mut out = Buckets::new();
    for (k, v) in figures {
        let Some(labels) = k.strip_prefix(&prefix).and_then(|l| l.strip_suffix('}')) else { continue };
        let (mut ty, mut le) = (None, None);
        for kv in labels.split(',') {
            if let Some((name, val)) = kv.split_once('=') {
                let val = val.trim_matches('"');
                match name {
                    "type" => ty = Some(val),
                    "le" => le = if val == "+Inf" { Some(f64::INFINITY) } else { val.parse().ok() },
                    _ => {}
                }
            }
        }
        if let (Some(ty), Some(le), Ok(n)) = (ty, le, v.parse::<f64>()) {
            out.entry(ty.to_string()).or_default().push((le, n));
        }
    }
    for b in out.values_mut() {
        b.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// The buckets of `after` minus those of `before` (a bucket missing from a snapshot was left out
/// because its count was 0).
fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let b = before.iter().find(|(e, _)| *e == le).map_or(0.0, |(_, c)| *c);
            (le, (n - b).max(0.0))
        })
        .collect()
}

/// The q-quantile of a cumulative histogram (seconds), interpolated linearly inside the bucket
/// that holds it (as Prometheus' `histogram_quantile`): the lower edge of the first bucket is 0,
/// in the +Inf bucket the answer is the highest finite edge. NaN when the histogram is empty.
fn histogram_quantile(q: f64, cum: &[(f64, f64)]) -> f64 {
    let Some(&(_, total)) = cum.last() else { return f64::NAN };
    if total <= 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, n) in cum {
        if n >= rank && n > below {
            if le.is_infinite() {
                return lo;
            }
            return lo + (le - lo) * (rank - below) / (n - below);
        }
        if le.is_finite() {
            lo = le;
        }
        below = n;
    }
    lo
}

/// Per type and configuration: (requests, p50, p99) in seconds, from the deltas of `metric`.
fn round_trips(figures: &[(String, String)], metric: &str) -> BTreeMap<String, [(f64, f64, f64); 3]> {
    let mut out: BTreeMap<String, [(f64, f64, f64); 3]> = BTreeMap::new();
    for (i, cfg) in RTT_CONFIGS.iter().enumerate() {
        let before = snapshot_buckets(figures, cfg, 0, metric);
        for (ty, after) in snapshot_buckets(figures, cfg, 1, metric) {
            let d = bucket_delta(before.get(&ty).map_or(&[][..], |b| b), &after);
            let n = d.last().map_or(0.0, |x| x.1);
            if n <= 0.0 {
                continue;
            }
            let e = out.entry(ty).or_insert([(0.0, f64::NAN, f64::NAN); 3]);
            e[i] = (n, histogram_quantile(0.5, &d), histogram_quantile(0.99, &d));
        }
    }
    out
}

fn fmt_secs_as_us(secs: f64) -> String {
    if secs.is_nan() {
        "—".into()
    } else {
        format!("{:.0}", secs * 1e6)
    }
}

/// The per-type round-trip table (nothing when the guest reported no histograms).
fn round_trip_table(md: &mut String, figures: &[(String, String)]) {
    for (metric, what) in [
        ("k", "Kernel-side round trip (`ulog_kernel_request_duration_seconds`: `dm_consult_userspace` entry to return, the agent's eBPF probes)"),
        ("a", "Agent service time (`ulog_request_duration_seconds`: request received to reply sent)"),
    ] {
        let rows = round_trips(figures, metric);
        if rows.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "\n{what}, node 1, per request type during one fio write phase (the same fio as above, \
             `nosync` mirror); µs, quantiles interpolated linearly inside the log2 buckets; \
             n = requests in the phase. single: node 1's agent without `--cluster` (node 2 has no \
             agent); cluster-1: node 1's agent with `--cluster`, alone in the group; cluster-2: \
             both with `--cluster`, both writing (the first two-writer round). Ratios: cluster ÷ \
             single.\n"
        );
        let _ = writeln!(
            md,
            "| type | n single / c-1 / c-2 | p50 single | p50 cluster-1 | p50 cluster-2 | p99 single | p99 cluster-1 | p99 cluster-2 | p50 ÷ single (c-1, c-2) | p99 ÷ single (c-1, c-2) |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (ty, c) in &rows {
            let _ = writeln!(
                md,
                "| {ty} | {:.0} / {:.0} / {:.0} | {} | {} | {} | {} | {} | {} | {}, {} | {}, {} |",
                c[0].0,
                c[1].0,
                c[2].0,
                fmt_secs_as_us(c[0].1),
                fmt_secs_as_us(c[1].1),
                fmt_secs_as_us(c[2].1),
                fmt_secs_as_us(c[0].2),
                fmt_secs_as_us(c[1].2),
                fmt_secs_as_us(c[2].2),
                fmt_ratio(c[1].1 / c[0].1),
                fmt_ratio(c[2].1 / c[0].1),
                fmt_ratio(c[1].2 / c[0].2),
                fmt_ratio(c[2].2 / c[0].2),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines() {
        let l = "     kworker/u4:2-57      [001] d..1.  123456789: consult: (dm_consult_userspace+0x0/0x2f0 [dm_log_userspace]) type=8";
        let e = parse_line(l).unwrap();
        assert_eq!((e.pid, e.ts, e.name), (57, 123456789, "consult"));
        assert_eq!(field(e.rest, "type"), Some(8));
        let l = "      ulog-agent-88      [000] .....  99: sys_recvfrom -> 0xc4";
        let e = parse_line(l).unwrap();
        assert_eq!((e.pid, e.name), (88, "sys_recvfrom"));
        assert_eq!(e.rest.split_whitespace().nth(1), Some("0xc4"));
        let l = "            <...>-90      [000] .....  100: sys_sendto(fd: 3, buff: 7ffd, len: c4, flags: 0, addr: 7ffe, addr_len: c)";
        assert_eq!(parse_line(l).unwrap().name, "sys_sendto");
        let l = "              sh-1       [001] .....  5: tracing_mark_write: TRACE-CAL 12.34";
        let e = parse_line(l).unwrap();
        assert_eq!(e.rest.split_whitespace().nth(1), Some("12.34"));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn the_cluster_report_shows_the_ratios() {
        let f = |k: &str, v: &str| (k.to_string(), v.to_string());
        let figures = vec![
            f("regions", "256"),
            f("secs", "8"),
            f("iops_one_r1", "10"),
            f("iops_two_node1_r1", "8"),
            f("iops_two_node2_r1", "7"),
            f("resync_one_ms_r1", "20000"),
            f("resync_two_ms_r1", "10000"),
        ];
        let md = cluster_report(&figures, "cargo xtask vm bench --jobs cluster", 1.0);
        assert!(md.contains("| 10.0 | 8.0 + 7.0 = 15.0 | 1.50 |"), "{md}");
        assert!(md.contains("| 20.0 | 10.0 | 0.50 |"), "{md}");
    }

    #[test]
    fn quantiles_from_bucket_deltas() {
        // 100 requests: 50 in (0, 1 µs], 40 in (1, 2 µs], 10 in (2, 4 µs].
        let cum = [(1e-6, 50.0), (2e-6, 90.0), (4e-6, 100.0), (f64::INFINITY, 100.0)];
        assert!((histogram_quantile(0.5, &cum) - 1e-6).abs() < 1e-12);
        assert!((histogram_quantile(0.75, &cum) - 1.625e-6).abs() < 1e-12);
        assert!((histogram_quantile(0.99, &cum) - 3.8e-6).abs() < 1e-12);
        assert!(histogram_quantile(0.5, &[(1e-6, 0.0)]).is_nan());
        // Everything beyond the last finite edge: that edge.
        assert_eq!(histogram_quantile(0.5, &[(1e-6, 0.0), (f64::INFINITY, 3.0)]), 1e-6);

        let f = |k: &str, v: &str| (k.to_string(), v.to_string());
        let figures = vec![
            f("h.single.0.k{type=\"FLUSH\",le=\"0.000002\"}", "5"),
            f("h.single.0.k{type=\"FLUSH\",le=\"+Inf\"}", "5"),
            f("h.single.1.k{type=\"FLUSH\",le=\"0.000001\"}", "10"),
            f("h.single.1.k{type=\"FLUSH\",le=\"0.000002\"}", "15"),
            f("h.single.1.k{type=\"FLUSH\",le=\"0.000004\"}", "25"),
            f("h.single.1.k{type=\"FLUSH\",le=\"+Inf\"}", "25"),
            f("h.cluster1.0.k{type=\"FLUSH\",le=\"+Inf\"}", "0"),
            f("h.cluster1.1.k{type=\"FLUSH\",le=\"0.000008\"}", "4"),
            f("h.cluster1.1.k{type=\"FLUSH\",le=\"+Inf\"}", "4"),
        ];
        let rt = round_trips(&figures, "k");
        let flush = rt["FLUSH"];
        // The delta of single: 10 in (0, 1], 0 in (1, 2], 10 in (2, 4]: n 20, p50 at 1 µs.
        assert_eq!(flush[0].0, 20.0);
        assert!((flush[0].1 - 1e-6).abs() < 1e-12, "{:?}", flush[0]);
        assert_eq!(flush[1].0, 4.0);
        assert!((flush[1].1 - 4e-6).abs() < 1e-12, "{:?}", flush[1]);
        assert!(flush[2].1.is_nan());
        let mut md = String::new();
        round_trip_table(&mut md, &figures);
        assert!(md.contains("| FLUSH | 20 / 4 / 0 | 1 | 4 | — |"), "{md}");
    }
}
