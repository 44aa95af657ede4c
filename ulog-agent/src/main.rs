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
use ulog_agent::counters::Counters;
use ulog_agent::hardening::{self, SystemPaths};
use ulog_agent::metrics::{self, Lifecycle, Telemetry};
use ulog_agent::server::{LogServer, ServerConfig};
use ulog_agent::shutdown::{self, ExitControl, PidFile, StopOutcome};
use ulog_agent::status::{self, StatusArgs};
use ulog_agent::telemetry::manager::{self, ManagerConfig};
use ulog_agent::telemetry::probes::{ProbeOptions, ProbeSet};
use ulog_agent::telemetry::KernelTelemetry;
use ulog_agent::transport::{self, ConnectorSocket, ServeEnd, SocketSink};
use ulog_common::RequestType;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Userspace server for the device-mapper "userspace" dirty log (clustered-core and
/// clustered-disk), a drop-in replacement for cmirrord on one node.
#[derive(Debug, Parser)]
#[command(name = "ulog-agent", version)]
struct Cli {
    /// Run in the foreground. Accepted for cmirrord compatibility: ulog never daemonizes
    /// (run it under systemd or another supervisor).
    #[arg(short = 'f', long)]
    foreground: bool,

    /// Keep clustered-core logs in files in this directory, written before FLUSH is answered,
    /// so an agent restart does not force a full resync. Without it, core logs live in memory.
    #[arg(long, env = "ULOG_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,

    /// Log output format (filter with RUST_LOG, default "info").
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,

    /// FOR TESTS: also serve requests from this userspace netlink port. Normally only the
    /// kernel (port 0) is served; any root process could otherwise drive the logs.
    #[arg(long, value_name = "PORT")]
    accept_peer_port: Option<u32>,

    /// Do not load the eBPF probes (kernel-side request counts and latency).
    #[arg(long)]
    no_probes: bool,

    /// Do not turn on the kernel's BPF run-time statistics while the probes are attached (they
    /// measure the probes' own cost, `ulog_probe_run_seconds_total`, for two clock reads per run).
    #[arg(long)]
    no_bpf_stats: bool,

    /// Turn on the eBPF programs' own diagnostics (aya-log; rare events such as resends and
    /// reconnect CTRs), logged with target `ulog_ebpf`. Off by default.
    #[arg(long)]
    probe_log: bool,

    /// Keep requests whose kernel-side round trip took at least this long (µs) for
    /// `/api/v1/kernel/slow`.
    #[arg(long, default_value_t = 1000, value_name = "MICROSECONDS")]
    slow_request_us: u64,

    /// Receive queue size in bytes (many requests may be in flight at once).
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    rcvbuf: usize,

    /// Address of the HTTP API: /metrics (Prometheus), /healthz, /readyz, /api/v1 (read-only
    /// JSON). Loopback by default; there is no authentication, bind elsewhere deliberately.
    #[arg(long, env = "ULOG_HTTP_ADDR", default_value = api::DEFAULT_ADDR, value_name = "ADDR")]
    http_addr: SocketAddr,

    /// Do not serve the HTTP API.
    #[arg(long)]
    no_http: bool,

    /// Where the pid file (`ulog-agent.pid`, locked while the agent runs) lives: `ulog-agent
    /// stop` finds the agent there, and a second agent with the same run directory refuses to
    /// start.
    #[arg(long, global = true, env = "ULOG_RUN_DIR", default_value = shutdown::DEFAULT_RUN_DIR, value_name = "DIR")]
    run_dir: PathBuf,

    /// Do not lock the agent's memory (mlockall). Locking keeps every page resident, so that
    /// serving never waits for a page-in from a filesystem that may sit on a mirror it serves.
    #[arg(long)]
    no_memory_lock: bool,

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
fn init_logging(
    format: LogFormat,
) -> (tracing_appender::non_blocking::WorkerGuard, tracing_appender::non_blocking::ErrorCounter) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("ulog-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    (guard, dropped)
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
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state directory {}", dir.display()))?;
        check_state_dir(dir)?;
    }
    Ok(())
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

    // The socket only now: the kernel starts sending as soon as we join group 7, and the probe
    // must already count those requests (kernel-side and agent-side counts must agree).
    let socket = Arc::new(
        ConnectorSocket::open(cli.rcvbuf)
            .context("cannot open the netlink connector socket (ulog-agent must run as root)")?,
    );
    let cfg = ServerConfig { state_dir: cli.state_dir.clone(), accept_peer: cli.accept_peer_port };
    let sink = Arc::new(SocketSink::new(Arc::clone(&socket)));
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
    rt.spawn(metrics::background(Arc::clone(&telemetry)));
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
    stop.store(true, Ordering::Relaxed);
    let server = receiver.join().map_err(|_| anyhow::anyhow!("receive thread panicked"))?;
    let live = server.summaries().len();
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
