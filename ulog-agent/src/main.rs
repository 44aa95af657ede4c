//! `ulog-agent`: the daemon. Thin glue over the `ulog_agent` library: parse flags, harden the
//! process and check what serving needs (`hardening`), take the pid file, set up logging (never
//! blocking: a full stderr pipe drops lines), open the connector socket, serve on a dedicated
//! thread, serve the HTTP API (metrics, status) on the tokio runtime. SIGTERM/SIGINT exit only
//! when no log is live; the restart signal (`ulog-agent stop --restart`) flushes every
//! persistent log and exits whatever is live (`shutdown`). `ulog-agent status` is the API's
//! command-line client.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};
use ulog_agent::api;
use ulog_agent::api::status::{self, StatusArgs};
use ulog_agent::metrics::counters::Counters;
use ulog_agent::metrics::{self, Lifecycle, Telemetry};
use ulog_agent::process::hardening::{self, SystemPaths};
use ulog_agent::process::shutdown::{self, ExitControl, PidFile, StopOutcome};
use ulog_agent::server::transport::{self, ConnectorSocket, ServeEnd, SocketSink};
use ulog_agent::server::{LogServer, ServerConfig};
use ulog_agent::telemetry::manager::{self, ManagerConfig};
use ulog_agent::telemetry::probes::{ProbeOptions, ProbeSet};
use ulog_agent::telemetry::KernelTelemetry;
use ulog_common::RequestType;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Userspace server for the device-mapper "userspace" dirty log (clustered-core and
/// clustered-disk), a drop-in replacement for cmirrord on one node.
#[derive(Debug, Parser)]
#[command(name = "ulog-agent", version = VERSION)]
struct Cli {
    /// Run in the foreground. Accepted for cmirrord compatibility: ulog never daemonizes
    /// (run it under systemd or another supervisor).
    #[arg(short = 'f', long)]
    foreground: bool,

    /// Keep clustered-core logs in files in this directory, written before FLUSH is answered,
    /// so an agent restart does not force a full resync. Without it, core logs live in memory.
    /// The directory must exist: a mistyped path must not become a new, empty state directory
    /// (every log would start over).
    #[arg(long, env = "ULOG_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Log output format (filter with RUST_LOG, default "info").
    #[arg(long, env = "ULOG_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// FOR TESTS: also serve requests from this userspace netlink port. Normally only the
    /// kernel (port 0) is served; any root process could otherwise drive the logs.
    #[arg(long, env = "ULOG_ACCEPT_PEER_PORT", value_name = "PORT")]
    accept_peer_port: Option<u32>,

    /// Do not load the eBPF probes (kernel-side request counts and latency).
    #[arg(long, env = "ULOG_NO_PROBES")]
    no_probes: bool,

    /// Do not turn on the kernel's BPF run-time statistics while the probes are attached (they
    /// measure the probes' own cost, `ulog_probe_run_seconds_total`, for two clock reads per run).
    #[arg(long, env = "ULOG_NO_BPF_STATS")]
    no_bpf_stats: bool,

    /// Turn on the eBPF programs' own diagnostics (aya-log; rare events such as resends and
    /// reconnect CTRs), logged with target `ulog_ebpf`. Off by default.
    #[arg(long, env = "ULOG_PROBE_LOG")]
    probe_log: bool,

    /// Keep requests whose kernel-side round trip took at least this long (µs) for
    /// `/api/v1/kernel/slow`.
    #[arg(long, env = "ULOG_SLOW_REQUEST_US", default_value_t = 1000, value_name = "MICROSECONDS")]
    slow_request_us: u64,

    /// Receive queue size (many requests may be in flight at once): bytes, or with a K, M or G
    /// suffix (powers of 1024, e.g. `8M`). Not 0.
    #[arg(long, env = "ULOG_RCVBUF", default_value = "8M", value_parser = parse_size, value_name = "SIZE")]
    rcvbuf: usize,

    /// Address of the HTTP API: /metrics (Prometheus), /healthz, /readyz, /api/v1 (read-only
    /// JSON). Loopback by default; there is no authentication, bind elsewhere deliberately.
    /// `--web.listen-address` is the exporters' name for it.
    #[arg(
        long,
        visible_alias = "web.listen-address",
        env = "ULOG_HTTP_ADDR",
        default_value = api::DEFAULT_ADDR,
        value_name = "ADDR"
    )]
    http_addr: SocketAddr,

    /// Do not serve the HTTP API.
    #[arg(long, env = "ULOG_NO_HTTP")]
    no_http: bool,

    /// Write `ulog-agent.prom` here every 5 s for node_exporter's textfile collector
    /// (`ulog_agent_serving`, `ulog_agent_http_listening`, a timestamp): tells "agent serving,
    /// HTTP API not bound" from "agent dead" where `up{job="ulog"} == 0` cannot.
    #[arg(long, env = "ULOG_TEXTFILE_DIR", value_name = "DIR")]
    textfile_dir: Option<PathBuf>,

    /// Where the pid file (`ulog-agent.pid`, locked while the agent runs) lives: `ulog-agent
    /// stop` finds the agent there, and a second agent with the same run directory refuses to
    /// start.
    #[arg(long, global = true, env = "ULOG_RUN_DIR", default_value = shutdown::DEFAULT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,

    /// Do not lock the agent's memory (mlockall). Locking keeps every page resident, so that
    /// serving never waits for a page-in from a filesystem that may sit on a mirror it serves.
    #[arg(long, env = "ULOG_NO_MEMORY_LOCK")]
    no_memory_lock: bool,

    /// Cluster mode: serve every log as one coherent log of all the nodes that activate its
    /// mirror on shared storage (`clustered-core`), agreed over the local corosync (CPG and
    /// quorum). Without it no corosync is needed or contacted. See README "Cluster logs".
    #[arg(long, env = "ULOG_CLUSTER")]
    cluster: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a summary of a running agent (logs, sync progress, request rates and latencies),
    /// read from its HTTP API. Exit status 1: not reachable; 2: reachable but not ready.
    Status(StatusArgs),
    /// Check whether a directory (or a block device meant to hold one) can be --state-dir:
    /// exit status 1, with the device stack, if it sits on a device-mapper mirror with a
    /// userspace log (the agent would wait for itself). The agent runs the same check at start.
    CheckStateDir {
        /// A directory, or a block device node.
        path: PathBuf,
    },
    /// Stop the running agent (found through the pid file in --run-dir). Plain: SIGTERM, which
    /// it obeys only with no live log (exit status 1 if it keeps serving). With --restart: a
    /// restart-style exit (it flushes every persistent log and exits 0 with its logs live, for
    /// a new agent to take over; the kernel reconnects within ~2 s of the new agent's start).
    /// Exit status 0 once it exited (or none was running).
    Stop(StopArgs),
    /// Cluster mode: operator commands for the running agent's cluster logs.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Print the man page (roff) or a shell completion script generated from these flags, for
    /// packaging (`cargo xtask package`).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generated,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Confirm that a departed node's kernel is dead, so its held regions are reclaimed.
    ///
    /// The node was fenced, powered off or rebooted: the survivors reclaim what it held, its
    /// marked regions go out of sync and are resynchronised first. Until then they stay held
    /// (not in sync, never handed out). Run it on a surviving
    /// node, only after making sure the node is down (e.g. `stonith_admin --history`, the BMC's
    /// power state): a node that is only cut off may still be writing those regions. A node
    /// that rejoins with a new boot id needs no confirmation.
    ConfirmFenced(ulog_agent::api::status::ConfirmFencedArgs),
}

#[derive(Debug, Subcommand)]
enum Generated {
    /// A man page, section 8, in roff: ulog-agent(8), or with SUBCOMMAND ulog-agent-SUBCOMMAND(8)
    /// (the pages ulog-agent(8) refers to; a nested one by its path, e.g. "cluster confirm-fenced").
    Man {
        subcommand: Option<String>,
        /// The page's date (YYYY-MM-DD; packaging passes the last commit's).
        #[arg(long, default_value = "")]
        date: String,
    },
    /// A completion script for SHELL.
    Completions { shell: clap_complete::Shell },
}

/// Writes what `ulog-agent generate` asks for to stdout.
fn run_generate(what: &Generated) -> anyhow::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    match what {
        Generated::Man { subcommand, date } => {
            // Without clap's `help` subcommand: the page would refer to a ulog-agent-help(8).
            let mut cmd = cmd.version(env!("CARGO_PKG_VERSION")).disable_help_subcommand(true);
            // Built first: a subcommand's display name ("ulog-agent-status") is set by build.
            cmd.build();
            // A nested subcommand by its path ("cluster confirm-fenced": ulog-agent-cluster-confirm-fenced(8)).
            let mut page = cmd;
            for name in subcommand.as_deref().unwrap_or("").split_whitespace() {
                page = page
                    .find_subcommand(name)
                    .filter(|c| !c.is_hide_set())
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no subcommand {name:?}"))?;
            }
            clap_mangen::Man::new(page).section("8").date(date).manual("System Administration").render(&mut out)?;
        }
        Generated::Completions { shell } => clap_complete::generate(*shell, &mut cmd, "ulog-agent", &mut out),
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct StopArgs {
    /// Restart-style exit: flush and exit even with live logs (upgrades). Mirrors stall until a
    /// new agent runs.
    #[arg(long)]
    restart: bool,
    /// How long to wait for the agent to exit.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    timeout: u64,
}

fn run_stop(run_dir: &std::path::Path, args: &StopArgs) -> i32 {
    match shutdown::stop(run_dir, args.restart, Duration::from_secs(args.timeout)) {
        Ok(StopOutcome::NotRunning) => {
            eprintln!("ulog-agent stop: no agent holds {}", run_dir.join(shutdown::PID_FILE).display());
            0
        }
        Ok(StopOutcome::Exited { pid }) => {
            eprintln!("ulog-agent stop: agent {pid} exited");
            0
        }
        Ok(StopOutcome::StillRunning { pid }) => {
            eprintln!(
                "ulog-agent stop: agent {pid} still running after {} s{}",
                args.timeout,
                if args.restart {
                    ""
                } else {
                    " (it keeps serving while logs are live, see its log; remove the mirrors first, or use --restart)"
                }
            );
            1
        }
        Err(e) => {
            eprintln!("ulog-agent stop: {e}");
            1
        }
    }
}

/// Logging through a non-blocking writer: lines go to a bounded queue that a worker thread
/// writes to stderr; when stderr blocks (a full pipe nobody reads, a stalled journal) and the
/// queue is full, lines are dropped and counted instead of blocking the thread that logs (the
/// receive thread, an I/O thread). The guard flushes the queue at exit.
/// A size flag: bytes, or a number with a K, M or G suffix (powers of 1024; `KiB` etc. too).
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size (bytes, or a number with K, M or G)"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        _ => return Err(format!("{s:?}: unknown size unit {unit:?} (K, M or G)")),
    };
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n).ok_or_else(|| format!("{s:?} is too large"))?;
    match usize::try_from(bytes) {
        Ok(0) => Err("a size of 0 is not usable".into()),
        Ok(b) if b <= i32::MAX as usize => Ok(b),
        _ => Err(format!("{s:?} is too large (at most 2G - 1 bytes)")),
    }
}

/// `--version`: the package version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("ULOG_GIT_REVISION"), ")");

/// Logging on stderr, for a terminal, a file or the journal:
/// - colours only when stderr is a terminal (escape codes in a file or the journal are noise
///   that breaks grep);
/// - when stderr is the journal (systemd sets `JOURNAL_STREAM` to its device and inode), text
///   lines start with the syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug),
///   which journald takes as the entry's priority, so `journalctl -p warning` works; the
///   journal stamps the time itself.
fn init_logging(
    format: LogFormat,
) -> (tracing_appender::non_blocking::WorkerGuard, tracing_appender::non_blocking::ErrorCounter) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("ulog-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text if journal::stderr_is_journal() => {
            builder.event_format(journal::PriorityPrefix(tracing_subscriber::fmt::format().without_time())).init()
        }
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    (guard, dropped)
}

/// The service manager's readiness protocol (sd_notify(3)), without libsystemd: one datagram
/// to `$NOTIFY_SOCKET` (a path, or an abstract socket written `@name`). Nothing without it.
mod systemd {
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    use tracing::warn;

    /// Sends `state` (e.g. `READY=1`) if the agent runs under a service manager that asked.
    pub fn notify(state: &str) {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
        let sent = (|| -> std::io::Result<()> {
            let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
                Some(name) => {
                    use std::os::linux::net::SocketAddrExt;
                    SocketAddr::from_abstract_name(name.as_bytes())?
                }
                None => SocketAddr::from_pathname(&path)?,
            };
            UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr).map(drop)
        })();
        if let Err(e) = sent {
            warn!(socket = ?path, error = %e, "cannot notify the service manager");
        }
    }
}

/// Logging to the journal through stderr.
mod journal {
    use std::fmt;
    use std::os::unix::fs::MetadataExt;

    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::fmt::format::Writer;
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::registry::LookupSpan;

    /// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` is
    /// `<device>:<inode>` of it (systemd.exec(5)); a redirected stderr no longer matches.
    pub fn stderr_is_journal() -> bool {
        let Ok(v) = std::env::var("JOURNAL_STREAM") else { return false };
        let Some((dev, ino)) = v.split_once(':') else { return false };
        let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
        dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
    }

    /// The syslog priority of a level, as journald reads it at the start of a line.
    pub fn priority(level: &Level) -> u8 {
        match *level {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        }
    }

    /// Prefixes each event's line with `<priority>`.
    pub struct PriorityPrefix<F>(pub F);

    impl<S, N, F> FormatEvent<S, N> for PriorityPrefix<F>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
        F: FormatEvent<S, N>,
    {
        fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
            write!(writer, "<{}>", priority(event.metadata().level()))?;
            self.0.format_event(ctx, writer, event)
        }
    }
}

/// Lines the logging queue holds while stderr blocks (a few MiB at most).
const LOG_QUEUE_LINES: usize = 8192;

/// The start-up hardening (`hardening`): fatal checks first, then best-effort settings whose
/// failure is logged with the risk it leaves.
fn harden(cli: &Cli, io_flusher: std::io::Result<()>) -> anyhow::Result<()> {
    hardening::check_capabilities()?;
    match io_flusher {
        Ok(()) => info!("PR_SET_IO_FLUSHER set: memory reclaim in the agent's threads never issues I/O"),
        Err(e) => {
            warn!(error = %e, "cannot set PR_SET_IO_FLUSHER (Linux >= 5.6, CAP_SYS_RESOURCE): under memory pressure the agent may wait for writes to the mirrors it serves")
        }
    }
    if cli.no_memory_lock {
        info!("memory not locked (--no-memory-lock)");
    } else {
        match hardening::lock_memory() {
            Ok((before, after)) => info!(
                rss_before_kb = before.resident_kb,
                rss_kb = after.resident_kb,
                locked_kb = after.locked_kb,
                "memory locked (mlockall MCL_CURRENT|MCL_FUTURE)"
            ),
            Err(e) => {
                warn!(error = %e, "cannot lock the agent's memory (mlockall): a page-in from a filesystem on a mirror it serves could deadlock")
            }
        }
    }
    if let Err(e) = hardening::protect_from_oom() {
        warn!(error = %e, "cannot set oom_score_adj to -1000: the OOM killer may kill the agent, hanging every write to its mirrors");
    }
    if let Some(dir) = &cli.state_dir {
        if !dir.is_dir() {
            anyhow::bail!(
                "state directory {} does not exist (or is not a directory): create it (e.g. `install -d -m 0700 {}`); ulog-agent does not, so that a mistyped --state-dir cannot start every log afresh",
                dir.display(),
                dir.display()
            );
        }
        check_state_dir(dir)?;
    }
    Ok(())
}

/// Test hook, for tests only: overrides this kernel's incarnation (its boot id, which decides
/// whether a node that comes back is the same kernel, whose marks its agent adopts, or a
/// rebooted one, whose old marks are reclaimed and resynchronised). The host cluster tests run
/// every "node" under one kernel and set it to play a node that rebooted. An environment
/// variable only, so it is not in `--help`; an operator setting it would lie to the other
/// nodes about a reboot. The value: 32 hexadecimal digits; anything else fails the start.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
const INCARNATION_ENV: &str = "ULOG_CLUSTER_INCARNATION";

/// The value of [`INCARNATION_ENV`]: exactly 32 hexadecimal digits (no sign, no dashes).
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
fn parse_incarnation(text: &str) -> Option<u128> {
    (text.len() == 32 && text.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| u128::from_str_radix(text, 16).ok())
        .flatten()
}

/// Starts the cluster engine on the corosync transport's thread (it connects, and reconnects,
/// on its own: until the local corosync is up and quorate, cluster requests wait).
#[cfg(feature = "cluster")]
fn start_cluster(
    sink: Arc<SocketSink>,
    telemetry: Arc<ulog_agent::metrics::Telemetry>,
) -> anyhow::Result<ulog_agent::server::ClusterMode> {
    use ulog_agent::cluster::{corosync, engine::Engine};
    use ulog_agent::server::{ClusterCommands, ClusterMode, ClusterReplies};
    let incarnation = match std::env::var_os(INCARNATION_ENV) {
        Some(v) => {
            let text = v.to_string_lossy();
            let incarnation = parse_incarnation(&text).with_context(|| {
                format!("{INCARNATION_ENV}={text:?}: expected 32 hexadecimal digits (a kernel incarnation)")
            })?;
            warn!(
                incarnation = %format!("{incarnation:032x}"),
                "{INCARNATION_ENV} is set: this kernel's boot id is overridden (test hook, never for production)"
            );
            incarnation
        }
        None => ulog_agent::cluster::boot_id().context("cannot read this kernel's boot id")?,
    };
    let replies = Arc::new(ClusterReplies::new(sink, Arc::clone(&telemetry)));
    let engine = Engine::new(Arc::clone(&replies), incarnation);
    // The engine moves to the transport's thread: take its counters first.
    let engine_stats = engine.stats();
    replies.set_engine_stats(Arc::clone(&engine_stats));
    let (bus, _thread) = corosync::spawn(engine, corosync::BusConfig::default())
        .context("cannot start the corosync transport thread")?;
    telemetry.set_cluster(engine_stats, Some(Arc::clone(bus.stats())));
    info!(incarnation = %format!("{incarnation:032x}"), "cluster mode: logs are served over corosync");
    let commands: ClusterCommands = Arc::new(move |c| bus.command(c).is_ok());
    telemetry.set_cluster_control(Arc::clone(&commands));
    // A previous agent may have died in the middle of a recovery restart, its mirror suspended:
    // resume it. On a thread of its own: the resume waits for this agent's answer to the
    // kernel's RESUME, which the receive loop gives once it runs.
    let _ = std::thread::Builder::new().name("ulog-resume-left".into()).spawn(|| {
        let resumed = ulog_agent::cluster::resume_left_suspended(
            std::path::Path::new(ulog_agent::region_log::dm::DM_CONTROL),
            std::path::Path::new(ulog_agent::cluster::RESTART_MARKERS),
        );
        if !resumed.is_empty() {
            warn!(?resumed, "resumed mirrors a previous agent left suspended in a recovery restart");
        }
    });
    Ok(ClusterMode { commands, replies })
}

#[cfg(not(feature = "cluster"))]
fn start_cluster(
    _sink: Arc<SocketSink>,
    _telemetry: Arc<ulog_agent::metrics::Telemetry>,
) -> anyhow::Result<ulog_agent::server::ClusterMode> {
    anyhow::bail!("--cluster: this ulog-agent was built without the `cluster` feature (corosync)")
}

/// Refuses a state directory on a userspace-log mirror. Every such mirror on the host is served
/// by the one log server: this agent.
fn check_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    match metrics::mirror::discover() {
        Ok(found) => {
            let mirrors: HashMap<(u32, u32), String> =
                found.into_iter().map(|(uuid, m)| ((m.major, m.minor), uuid)).collect();
            hardening::served_mirror_under(dir, &mirrors, &SystemPaths::default())?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {} // no device-mapper: no mirror
        Err(e) => {
            warn!(error = %e, "cannot list device-mapper mirrors: --state-dir not checked for a mirror underneath")
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Status(args)) => std::process::exit(status::run(args)),
        Some(Command::Stop(args)) => std::process::exit(run_stop(&cli.run_dir, args)),
        Some(Command::Cluster(ClusterCommand::ConfirmFenced(args))) => std::process::exit(status::confirm_fenced(args)),
        Some(Command::Generate { what }) => return run_generate(what),
        Some(Command::CheckStateDir { path }) => match std::fs::metadata(path)
            .with_context(|| format!("{}", path.display()))
            .and_then(|_| check_state_dir(path))
        {
            Ok(()) => {
                println!("{}: not on a device-mapper mirror with a userspace log", path.display());
                return Ok(());
            }
            Err(e) => {
                eprintln!("ulog-agent check-state-dir: {e:#}");
                std::process::exit(1);
            }
        },
        None => {}
    }
    // Before any thread exists: the flag is inherited by the threads created later (receive,
    // I/O, HTTP, logging); see `hardening`.
    let io_flusher = hardening::set_io_flusher();
    let (log_guard, log_lines_dropped) = init_logging(cli.log_format);
    info!(version = %env!("CARGO_PKG_VERSION"), revision = %env!("ULOG_GIT_REVISION"), pid = std::process::id(), "ulog-agent starting");
    let result = run(&cli, io_flusher, &log_lines_dropped);
    if let Err(e) = &result {
        error!("{e:#}");
    }
    let dropped = log_lines_dropped.dropped_lines();
    if dropped > 0 {
        warn!(dropped, "log lines were dropped while stderr was blocked");
    }
    // Flushes the queue (bounded: tracing-appender gives up after a second).
    drop(log_guard);
    if result.is_err() {
        std::process::exit(1);
    }
    Ok(())
}

fn run(
    cli: &Cli,
    io_flusher: std::io::Result<()>,
    log_lines_dropped: &tracing_appender::non_blocking::ErrorCounter,
) -> anyhow::Result<()> {
    harden(cli, io_flusher)?;
    let pid_file = PidFile::acquire(&cli.run_dir)?;
    let counters = Arc::new(Counters::default());
    let telemetry = Arc::new(Telemetry::new(Arc::clone(&counters)));

    let kernel = Arc::new(KernelTelemetry::new(cli.slow_request_us.saturating_mul(1000)));
    telemetry.set_slow_threshold_ns(cli.slow_request_us.saturating_mul(1000));
    let probe_cfg = ManagerConfig {
        opts: ProbeOptions { bpf_stats: !cli.no_bpf_stats, log: cli.probe_log },
        module_poll: std::time::Duration::from_secs(2),
    };
    let adopted = if cli.no_probes {
        info!("eBPF probes disabled (--no-probes)");
        telemetry.set_probe_state(false, "disabled (--no-probes)".into());
        telemetry.set_probes_disabled(true);
        None
    } else {
        Some(manager::adopt(&kernel, &telemetry, ProbeSet::start(probe_cfg.opts)))
    };

    // One log server per host: another listener of group 7 (cmirrord, a second agent) would
    // answer every request as well.
    hardening::check_no_other_server(cli.accept_peer_port)?;
    // The socket only now: the kernel starts sending as soon as we join group 7, and the probe
    // must already count those requests (kernel-side and agent-side counts must agree).
    let socket = Arc::new(
        ConnectorSocket::open(cli.rcvbuf)
            .context("cannot open the netlink connector socket (ulog-agent must run as root)")?,
    );
    let sink = Arc::new(SocketSink::new(Arc::clone(&socket)));
    let cluster = if cli.cluster { Some(start_cluster(sink.clone(), Arc::clone(&telemetry))?) } else { None };
    let cfg = ServerConfig { state_dir: cli.state_dir.clone(), accept_peer: cli.accept_peer_port, cluster };
    let mut server = LogServer::with_telemetry(cfg, sink, socket.port(), Arc::clone(&telemetry));
    if let Some(port) = cli.accept_peer_port {
        info!(port, "also serving a userspace test peer");
    }

    // Handlers first: once the receive thread runs, clients (and tests) see a live agent and may
    // signal it at once; a SIGTERM before registration would kill it without the final flush.
    // One worker thread runs signals, the HTTP API and the telemetry's periodic work (also while
    // the main thread flushes logs at exit); bitmap walks and metric encoding go to at most two
    // blocking threads. The receive thread never waits for any of it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("ulog-http")
        .max_blocking_threads(2)
        .enable_all()
        .build()?;
    let (mut term, mut int, mut restart) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::from_raw(shutdown::restart_signal()))?,
        )
    };
    // SIGHUP (logrotate), SIGUSR1 and SIGUSR2 (cmirrord's debug dump) would end the process by
    // default, taking every mirror's log server down: HUP is acknowledged and ignored, USR1/USR2
    // write every log's state to the log.
    let (mut hup, mut usr1, mut usr2) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        (signal(SignalKind::hangup())?, signal(SignalKind::user_defined1())?, signal(SignalKind::user_defined2())?)
    };

    // `stop` ends the probe thread once the receive thread is done; `exit` is what the signals
    // ask of the receive thread, which decides (see `shutdown`).
    let stop = Arc::new(AtomicBool::new(false));
    let exit = Arc::new(ExitControl::default());
    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<std::io::Result<ServeEnd>>();
    let receiver = {
        let exit = Arc::clone(&exit);
        let socket = Arc::clone(&socket);
        std::thread::Builder::new()
            .name("ulog-recv".into())
            .spawn(move || {
                let r = transport::serve(&socket, &mut server, &exit);
                let _ = done_tx.send(r);
                server
            })
            .context("cannot start the receive thread")?
    };
    let probe_thread = match adopted {
        Some(a) => manager::spawn(Arc::clone(&kernel), Arc::clone(&telemetry), probe_cfg, a, Arc::clone(&stop))
            .context("cannot start the probe thread")?,
        None => None,
    };
    info!(port = socket.port(), state_dir = ?cli.state_dir, pid_file = %pid_file.path().display(), "serving dm-log-userspace requests");
    telemetry.set_lifecycle(Lifecycle::Serving);
    // Only now, joined to group 7 and with the receive thread running: LVM's activation at
    // boot, ordered after a Type=notify unit, cannot get "Userspace log server not found".
    systemd::notify(&format!("READY=1\nSTATUS=serving, pid {}\nMAINPID={}", std::process::id(), std::process::id()));
    rt.spawn(metrics::background(Arc::clone(&telemetry)));
    if let Some(dir) = &cli.textfile_dir {
        info!(dir = %dir.display(), file = metrics::textfile::FILE_NAME, "writing the textfile-collector file every 5 s");
        rt.spawn(metrics::textfile::run(Arc::clone(&telemetry), dir.clone()));
    }
    {
        let counters = Arc::clone(&counters);
        let dropped = log_lines_dropped.clone();
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                counters.set_log_lines_dropped(dropped.dropped_lines() as u64);
            }
        });
    }
    if cli.no_http {
        info!("HTTP API disabled (--no-http)");
    } else {
        rt.spawn(api::serve(Arc::clone(&telemetry), cli.http_addr));
    }

    let served: std::io::Result<ServeEnd> = rt.block_on(async {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM: exiting if no log is live"); exit.exit_if_idle(); }
                _ = int.recv() => { info!("SIGINT: exiting if no log is live"); exit.exit_if_idle(); }
                _ = restart.recv() => {
                    info!("restart-style exit requested: flushing every log and exiting for a new agent");
                    exit.restart();
                }
                _ = hup.recv() => info!("SIGHUP: nothing to reload; logging goes to stderr (no file to reopen)"),
                _ = usr1.recv() => dump_logs("SIGUSR1", &telemetry),
                _ = usr2.recv() => dump_logs("SIGUSR2", &telemetry),
                r = &mut done_rx => break r.unwrap_or(Ok(ServeEnd::Idle)),
            }
        }
    });
    telemetry.set_lifecycle(Lifecycle::Stopping);
    systemd::notify("STOPPING=1");
    stop.store(true, Ordering::Relaxed);
    let server = receiver.join().map_err(|_| anyhow::anyhow!("receive thread panicked"))?;
    let live = server.log_count();
    server.shutdown();
    match &served {
        Ok(ServeEnd::Idle) => info!("no log is live: exiting"),
        Ok(ServeEnd::Restart) => info!(
            live_logs = live,
            "restart-style exit: every log flushed; the kernel reconnects its logs to the next agent (its reconnect loop retries every 2 s)"
        ),
        Err(e) => error!(error = %e, "receive loop failed"),
    }
    if let Some(t) = probe_thread {
        let _ = t.join();
    }
    log_request_summary(&counters, (kernel.attachments() > 0).then_some(&*kernel));
    served.context("serving failed")?;
    info!("exited cleanly");
    drop(pid_file);
    Ok(())
}

/// Every log's state, one line each (what cmirrord's SIGUSR1 prints, from the agent's view).
fn dump_logs(signal: &str, telemetry: &Telemetry) {
    let logs = telemetry.logs();
    info!(signal, logs = logs.len(), "log state dump");
    for h in logs.iter() {
        let s = h.shared.lock();
        info!(
            log = %h.tel.name,
            mirror = h.tel.mirror().as_deref(),
            uuid = %h.uuid,
            luid = format!("{:#x}", h.luid),
            kind = h.kind,
            ctr = %h.ctr,
            phase = s.phase().name(),
            regions = s.region_count(),
            in_sync = s.sync_count(),
            dirty = s.dirty_count(),
            device = ?h.device,
            device_failed = h.shared.device_failed(),
            legs_flush_failed = h.shared.legs_flush_failed(),
            "log state"
        );
    }
}

/// One line per request type seen: what the agent served and, with the probe attached, what
/// the kernel sent (they differ by the requests the kernel sent while no agent was running).
fn log_request_summary(counters: &Counters, probes: Option<&KernelTelemetry>) {
    let kernel = probes.map(|p| p.request_counts());
    for t in RequestType::ALL {
        let served = counters.requests_of(Some(t));
        let sent = kernel
            .as_ref()
            .map(|k| k.get(ulog_common::probes::request_counter_slot(t.raw()) as usize).copied().unwrap_or(0));
        if served == 0 && sent.unwrap_or(0) == 0 {
            continue;
        }
        info!(request = t.name(), served, errors = counters.errors_of(Some(t)), kernel_sent = ?sent, "request totals");
    }
    let unknown = counters.requests_of(None);
    if unknown > 0 {
        info!(request = "UNKNOWN", served = unknown, "request totals");
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_incarnation, parse_size};

    #[test]
    fn an_incarnation_override_is_32_hex_digits() {
        assert_eq!(parse_incarnation("0123456789abcdefABCDEF0123456789"), Some(0x0123456789abcdefabcdef0123456789));
        assert_eq!(parse_incarnation(&"0".repeat(32)), Some(0));
        assert_eq!(parse_incarnation(&"f".repeat(31)), None, "31 digits");
        assert_eq!(parse_incarnation(&"f".repeat(33)), None, "33 digits");
        assert_eq!(parse_incarnation(&format!("+{}", "1".repeat(31))), None, "a sign");
        assert_eq!(parse_incarnation("0d0c1b2a-3f4e-5a6b-7c8d-9e0fa1b2"), None, "dashes");
        assert_eq!(parse_incarnation("0123456789abcdefABCDEF012345678g"), None, "not hex");
        assert_eq!(parse_incarnation(""), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8388608"), Ok(8 << 20));
        assert_eq!(parse_size("8M"), Ok(8 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("0M").is_err());
        assert!(parse_size("2G").is_err(), "SO_RCVBUF takes an int");
        assert!(parse_size("8Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }
}
