//! `ulog-agent`: the daemon. Thin glue over the `ulog_agent` library: parse flags, set up
//! logging, open the connector socket, serve on a dedicated thread, serve the HTTP API
//! (metrics, status) on the tokio runtime, and on SIGTERM/SIGINT stop receiving and flush every
//! persistent log before exiting. `ulog-agent status` is the API's command-line client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info};
use ulog_agent::api;
use ulog_agent::counters::Counters;
use ulog_agent::metrics::{self, Lifecycle, Telemetry};
use ulog_agent::server::{LogServer, ServerConfig};
use ulog_agent::status::{self, StatusArgs};
use ulog_agent::telemetry::manager::{self, ManagerConfig};
use ulog_agent::telemetry::probes::{ProbeOptions, ProbeSet};
use ulog_agent::telemetry::KernelTelemetry;
use ulog_agent::transport::{self, ConnectorSocket, SocketSink};
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

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a summary of a running agent (logs, sync progress, request rates and latencies),
    /// read from its HTTP API. Exit status 1: not reachable; 2: reachable but not ready.
    Status(StatusArgs),
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Status(args)) = &cli.command {
        std::process::exit(status::run(args));
    }
    init_logging(cli.log_format);
    if let Some(dir) = &cli.state_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state directory {}", dir.display()))?;
    }
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
    let (mut term, mut int) = {
        use tokio::signal::unix::{signal, SignalKind};
        let _guard = rt.enter();
        (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
    };

    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
    let receiver = {
        let stop = Arc::clone(&stop);
        let socket = Arc::clone(&socket);
        std::thread::Builder::new()
            .name("ulog-recv".into())
            .spawn(move || {
                let r = transport::serve(&socket, &mut server, &stop);
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
    info!(port = socket.port(), state_dir = ?cli.state_dir, "serving dm-log-userspace requests");
    telemetry.set_lifecycle(Lifecycle::Serving);
    rt.spawn(metrics::background(Arc::clone(&telemetry)));
    if cli.no_http {
        info!("HTTP API disabled (--no-http)");
    } else {
        rt.spawn(api::serve(Arc::clone(&telemetry), cli.http_addr));
    }

    let served: std::io::Result<()> = rt.block_on(async {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: flushing logs and exiting"); Ok(()) }
            _ = int.recv() => { info!("SIGINT: flushing logs and exiting"); Ok(()) }
            r = done_rx => r.unwrap_or(Ok(())),
        }
    });
    telemetry.set_lifecycle(Lifecycle::Stopping);
    stop.store(true, Ordering::Relaxed);
    let server = receiver.join().map_err(|_| anyhow::anyhow!("receive thread panicked"))?;
    server.shutdown();
    if let Err(e) = &served {
        error!(error = %e, "receive loop failed");
    }
    if let Some(t) = probe_thread {
        let _ = t.join();
    }
    log_request_summary(&counters, (kernel.attachments() > 0).then_some(&*kernel));
    served.context("serving failed")?;
    info!("exited cleanly");
    Ok(())
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
