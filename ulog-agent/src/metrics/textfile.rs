//! `--textfile-dir`: a small file for node_exporter's textfile collector, so that Prometheus can
//! tell "agent alive, HTTP API down" from "agent dead" (both are `up{job="ulog"} == 0`).
//!
//! # Design
//! Every 5 s the agent writes `ulog-agent.prom` into the directory (write a temporary file whose
//! name node_exporter ignores, then rename it over the old one: a scrape never sees half a file):
//! `ulog_agent_serving` (1 while serving and its receive loop ran in the last 10 s, the
//! `/healthz` stall limit), `ulog_agent_http_listening` (1 once the API is bound), `ulog_agent_logs`
//! and `ulog_agent_textfile_timestamp_seconds` (when it was written). It runs on the async
//! runtime, apart from the HTTP API, so an unbound API does not stop it.
//!
//! # Limits
//! A dead or hung agent cannot say so: the file just stops changing, so the alert reads the
//! timestamp's age (`UlogAgentTextfileStale`). The file is left in place at exit (a clean exit is
//! also an agent that no longer serves). node_exporter reports the file under its own `instance`
//! (host:9100), not the agent's: the rules do not join the two jobs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{clock, Lifecycle, Telemetry};

/// The file's name in the directory.
pub const FILE_NAME: &str = "ulog-agent.prom";

/// How often it is written.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// The file's text, as of `now_ns` ([`clock`]).
pub fn render(tel: &Telemetry, now_ns: u64) -> String {
    // Serving, its loop has run, and not stalled beyond the `/healthz` limit.
    let serving =
        tel.lifecycle() == Lifecycle::Serving && tel.heartbeat_ns() != 0 && tel.receive_loop_stall(now_ns).is_none();
    let mut out = String::with_capacity(1024);
    let mut gauge = |name: &str, help: &str, v: f64| {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n");
    };
    gauge(
        "ulog_agent_serving",
        "1 while ulog-agent serves dm-log-userspace requests (its receive loop ran in the last 10 s), else 0. Written by the agent every 5 s, whether its HTTP API is bound or not.",
        if serving { 1.0 } else { 0.0 },
    );
    gauge(
        "ulog_agent_http_listening",
        "1 once ulog-agent's HTTP API (/metrics) is bound, else 0 (it retries the bind every 5 s).",
        if tel.http_addr().is_some() { 1.0 } else { 0.0 },
    );
    gauge("ulog_agent_logs", "Logs ulog-agent serves.", tel.logs().len() as f64);
    gauge(
        "ulog_agent_textfile_timestamp_seconds",
        "When ulog-agent last wrote this file (every 5 s while it runs: an old value means it died or hangs).",
        clock::unix_seconds(now_ns).floor(),
    );
    out
}

/// Writes the file once (temporary file + rename).
pub fn write(dir: &Path, text: &str) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{FILE_NAME}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(FILE_NAME)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Writes the file every [`INTERVAL`] until the runtime stops (a failure is logged once, then
/// again when it changes, and retried).
pub async fn run(tel: Arc<Telemetry>, dir: PathBuf) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error: Option<String> = None;
    loop {
        tick.tick().await;
        let text = render(&tel, clock::now_ns());
        let d = dir.clone();
        let result = tokio::task::spawn_blocking(move || write(&d, &text)).await;
        let err = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if err != last_error {
            match &err {
                Some(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot write the textfile-collector file; retrying every 5 s")
                }
                None if last_error.is_some() => {
                    tracing::info!(dir = %dir.display(), "textfile-collector file written again")
                }
                None => {}
            }
            last_error = err;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_needs_a_recent_heartbeat_and_the_serving_phase() {
        let tel = Telemetry::new(Arc::default());
        let now = clock::now_ns() + 20_000_000_000;
        let t = render(&tel, now);
        assert!(t.contains("\nulog_agent_serving 0\n") && t.contains("\nulog_agent_http_listening 0\n"), "{t}");
        tel.set_lifecycle(Lifecycle::Serving);
        tel.beat(now - 1_000_000_000);
        assert!(render(&tel, now).contains("\nulog_agent_serving 1\n"));
        assert!(
            render(&tel, now + crate::metrics::RECEIVE_LOOP_STALL_NS).contains("\nulog_agent_serving 0\n"),
            "a stalled loop"
        );
        tel.set_http_addr(Some("127.0.0.1:9477".parse().unwrap()));
        let t = render(&tel, now);
        assert!(t.contains("\nulog_agent_http_listening 1\n") && t.contains("\nulog_agent_logs 0\n"), "{t}");
        let ts = t.lines().find_map(|l| l.strip_prefix("ulog_agent_textfile_timestamp_seconds ")).unwrap();
        assert!(ts.parse::<f64>().unwrap() > 1.7e9, "{ts}");
        let dir = std::env::temp_dir().join(format!("ulog-textfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write(&dir, &t).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(FILE_NAME)).unwrap(), t);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
