//! `ulog-agent`: the daemon. Thin glue over the `ulog_agent` library: parse flags, set up
//! logging, open the connector socket, serve on a dedicated thread, and on SIGTERM/SIGINT
//! stop receiving and flush every persistent log before exiting.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tracing::{error, info, warn};
use ulog_agent::telemetry::probes::ProbeSet;
use ulog_common::RequestType;
use ulog_agent::counters::Counters;
use ulog_agent::server::{LogServer, ServerConfig};
use ulog_agent::transport::{self, ConnectorSocket, SocketSink};

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

    /// Receive queue size in bytes (many requests may be in flight at once).
    #[arg(long, default_value_t = 8 << 20, value_name = "BYTES")]
    rcvbuf: usize,
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
    init_logging(cli.log_format);
    if let Some(dir) = &cli.state_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create state directory {}", dir.display()))?;
    }
    let socket = Arc::new(
        ConnectorSocket::open(cli.rcvbuf)
            .context("cannot open the netlink connector socket (ulog-agent must run as root)")?,
    );
    let counters = Arc::new(Counters::default());
    let cfg = ServerConfig { state_dir: cli.state_dir.clone(), accept_peer: cli.accept_peer_port };
    let sink = Arc::new(SocketSink::new(Arc::clone(&socket)));
    let mut server = LogServer::new(cfg, sink, socket.port(), Arc::clone(&counters));
    if let Some(port) = cli.accept_peer_port {
        info!(port, "also serving a userspace test peer");
    }

    let probes = if cli.no_probes {
        info!("eBPF probes disabled (--no-probes)");
        None
    } else {
        match ProbeSet::try_start() {
            Ok(p) => {
                info!("eBPF probe attached to dm_consult_userspace");
                Some(p)
            }
            Err(e) => {
                warn!(reason = %e.report(), "eBPF probes not attached; serving without kernel-side telemetry");
                None
            }
        }
    };

    // Handlers first: once the receive thread runs, clients (and tests) see a live agent and may
    // signal it at once; a SIGTERM before registration would kill it without the final flush.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
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
    info!(port = socket.port(), state_dir = ?cli.state_dir, "serving dm-log-userspace requests");

    let served: std::io::Result<()> = rt.block_on(async {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: flushing logs and exiting"); Ok(()) }
            _ = int.recv() => { info!("SIGINT: flushing logs and exiting"); Ok(()) }
            r = done_rx => r.unwrap_or(Ok(())),
        }
    });
    stop.store(true, Ordering::Relaxed);
    let server = receiver.join().map_err(|_| anyhow::anyhow!("receive thread panicked"))?;
    server.shutdown();
    if let Err(e) = &served {
        error!(error = %e, "receive loop failed");
    }
    log_request_summary(&counters, probes.as_ref());
    served.context("serving failed")?;
    info!("exited cleanly");
    Ok(())
}

/// One line per request type seen: what the agent served and, with the probe attached, what
/// the kernel sent (they differ by the requests the kernel sent while no agent was running).
fn log_request_summary(counters: &Counters, probes: Option<&ProbeSet>) {
    let kernel = probes.map(|p| p.request_counts());
    for t in RequestType::ALL {
        let served = counters.requests_of(Some(t));
        let sent = kernel.map(|k| k[ulog_common::probes::request_counter_slot(t.raw()) as usize]);
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
