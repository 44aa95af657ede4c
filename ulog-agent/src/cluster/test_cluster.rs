//! A real corosync cluster of N nodes on one machine, for the cluster tests and benchmarks
//! (test support in the library, like [`crate::wire::kernel_peer`]). Needs root, `ip` (iproute2),
//! `unshare` (util-linux) and corosync 3 (`cargo xtask setup`).
//!
//! # Layout (the recipe of `docs/cluster.md`)
//!
//! - One named network namespace per node, plus a "switch" namespace holding a bridge and one
//!   veth per node; each node's end is `eth0` with `10.213.0.<id>/24`. Addresses exist inside
//!   these namespaces only. Names carry our pid and a per-process counter, so parallel tests and
//!   concurrent test binaries do not clash.
//! - corosync runs in its node's namespace (its IPC sockets are abstract unix sockets, which
//!   are per network namespace) with a private tmpfs on `/run` (its pid file is hard-coded
//!   there) and its own `state_dir`; knet, `token: 1000`, `token_coefficient: 0` (tighter
//!   tokens flapped on 2-core machines), votequorum, no crypto. Its log goes to
//!   `<dir>/node<id>.log`.
//! - Clients reach node i's corosync from a thread in node i's namespace ([`TestCluster::enter`]
//!   for threads of this process; `ip netns exec` with [`TestCluster::netns`] for processes).
//!   They share `/dev/shm` with it (same mount namespace for `/dev/shm`).
//! - Readiness is `corosync-quorumtool -s`, polled every 300 ms (faster polling costs tokens on
//!   small machines), bounded by 30 s.
//!
//! Nodes are indexed `0..n`; node index `i` has corosync node id `i + 1`.
//!
//! # Limits
//!
//! Drop kills every corosync with SIGKILL (the others see `NodeDown`, not a clean leave),
//! deletes the namespaces and removes the `/dev/shm/qb-*` files of those corosync processes.
//! A process killed before Drop runs (SIGKILL of the test binary) leaves namespaces named
//! `ulc<pid>-*` behind.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long [`TestCluster::start`] and the waits poll before giving up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of the `corosync-quorumtool` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(300);

static CLUSTER_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Why the test cluster could not be set up or driven.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A command failed.
    #[error("`{cmd}` failed: {detail}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status and stderr, or the spawn error.
        detail: String,
    },
    /// A file system or syscall operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was done.
        op: String,
        /// The error.
        source: io::Error,
    },
    /// A node did not reach the wanted quorum state in time.
    #[error("node index {node}: not {want} within {secs} s (last `corosync-quorumtool -s`: {last})")]
    Timeout {
        /// Node index.
        node: usize,
        /// What was waited for.
        want: String,
        /// The bound.
        secs: u64,
        /// The last output or error seen.
        last: String,
    },
    /// No such node index.
    #[error("no node index {0}")]
    NoNode(usize),
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let op = op.into();
    move |source| ClusterError::Io { op, source }
}

/// Run a command to completion; error with its stderr unless it succeeded.
fn run(args: &[&str]) -> Result<String, ClusterError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ClusterError::Command { cmd: cmd.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        let detail = format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        return Err(ClusterError::Command { cmd, detail });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `corosync-quorumtool -s` says about a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuorumStatus {
    /// "Quorate: Yes".
    pub quorate: bool,
    /// "Total votes".
    pub total_votes: u32,
}

fn parse_quorumtool(text: &str) -> Option<QuorumStatus> {
    let mut quorate = None;
    let mut total_votes = None;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else { continue };
        match k.trim() {
            "Quorate" => quorate = Some(v.trim() == "Yes"),
            "Total votes" => total_votes = v.trim().parse().ok(),
            _ => {}
        }
    }
    Some(QuorumStatus { quorate: quorate?, total_votes: total_votes? })
}

struct Node {
    ns: String,
    conf: PathBuf,
    log: PathBuf,
    corosync: Option<Child>,
    /// Every corosync pid this node ran (for the `/dev/shm/qb-*` cleanup).
    pids: Vec<u32>,
}

/// N corosync nodes in network namespaces joined by a bridge. Dropping it tears everything down.
pub struct TestCluster {
    dir: PathBuf,
    switch: String,
    nodes: Vec<Node>,
}

impl TestCluster {
    /// Set up `n` nodes, start their corosyncs and wait until every node is quorate with all
    /// `n` votes (at most [`READY_TIMEOUT`]).
    pub fn start(n: usize) -> Result<TestCluster, ClusterError> {
        let id = format!("ulc{}-{}", std::process::id(), CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(format!("ulog-{id}"));
        fs::create_dir_all(&dir).map_err(io_err(format!("mkdir {}", dir.display())))?;
        let mut cluster = TestCluster { dir, switch: format!("{id}-sw"), nodes: Vec::new() };
        // From here on, Drop cleans up whatever was created.
        cluster.build_network(&id, n)?;
        for i in 0..n {
            cluster.start_corosync(i)?;
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    fn build_network(&mut self, id: &str, n: usize) -> Result<(), ClusterError> {
        let sw = self.switch.clone();
        run(&["ip", "netns", "add", &sw])?;
        run(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{id}-n{}", i + 1);
            let state_dir = self.dir.join(format!("node{}", i + 1));
            fs::create_dir_all(&state_dir).map_err(io_err(format!("mkdir {}", state_dir.display())))?;
            let conf = self.dir.join(format!("node{}.conf", i + 1));
            fs::write(&conf, corosync_conf(n, &state_dir)).map_err(io_err(format!("write {}", conf.display())))?;
            let log = self.dir.join(format!("node{}.log", i + 1));
            run(&["ip", "netns", "add", &ns])?;
            self.nodes.push(Node { ns: ns.clone(), conf, log, corosync: None, pids: Vec::new() });
            let port = format!("s{}", i + 1);
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", node_addr(i)), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    fn node(&self, i: usize) -> Result<&Node, ClusterError> {
        self.nodes.get(i).ok_or(ClusterError::NoNode(i))
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// corosync node id of node index `i` (`i + 1`).
    pub fn node_id(i: usize) -> u32 {
        i as u32 + 1
    }

    /// The network namespace name of node `i` (for `ip netns exec`).
    ///
    /// # Panics
    /// If `i` is not a node index.
    pub fn netns(&self, i: usize) -> &str {
        &self.nodes[i].ns
    }

    /// The directory with the configs, state dirs and corosync logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Move the *calling thread* into node `i`'s network namespace: corosync clients it opens,
    /// and threads it spawns afterwards, talk to node `i`'s corosync.
    pub fn enter(&self, i: usize) -> Result<(), ClusterError> {
        let path = format!("/run/netns/{}", self.node(i)?.ns);
        let f = fs::File::open(&path).map_err(io_err(format!("open {path}")))?;
        // SAFETY: setns on a live fd; affects the calling thread only.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(ClusterError::Io { op: format!("setns {path}"), source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Start node `i`'s corosync (no-op if it runs). Does not wait for quorum.
    pub fn start_corosync(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = self.nodes.get_mut(i).ok_or(ClusterError::NoNode(i))?;
        if let Some(c) = node.corosync.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                return Ok(());
            }
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(io_err(format!("open {}", node.log.display())))?;
        let log2 = log.try_clone().map_err(io_err("dup log fd"))?;
        let conf = node.conf.to_string_lossy().into_owned();
        // `ip netns exec` and `sh -c exec` exec in place: the child's pid is corosync's.
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns, "unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t tmpfs tmpfs /run && exec corosync -f -c \"$0\"")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| ClusterError::Command { cmd: format!("corosync in {}", node.ns), detail: e.to_string() })?;
        node.pids.push(child.id());
        node.corosync = Some(child);
        Ok(())
    }

    /// SIGKILL node `i`'s corosync and reap it.
    pub fn kill_corosync(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = self.nodes.get_mut(i).ok_or(ClusterError::NoNode(i))?;
        if let Some(mut c) = node.corosync.take() {
            let _ = c.kill();
            c.wait().map_err(io_err("wait for corosync"))?;
        }
        Ok(())
    }

    /// Cut node `i` off the others: its switch port goes down.
    pub fn partition(&self, i: usize) -> Result<(), ClusterError> {
        self.node(i)?;
        run(&["ip", "-n", &self.switch, "link", "set", &format!("s{}", i + 1), "down"]).map(drop)
    }

    /// Undo [`TestCluster::partition`].
    pub fn heal(&self, i: usize) -> Result<(), ClusterError> {
        self.node(i)?;
        run(&["ip", "-n", &self.switch, "link", "set", &format!("s{}", i + 1), "up"]).map(drop)
    }

    /// Node `i`'s quorum state according to `corosync-quorumtool -s`.
    pub fn quorum_status(&self, i: usize) -> Result<QuorumStatus, ClusterError> {
        let ns = &self.node(i)?.ns;
        let cmd = format!("ip netns exec {ns} corosync-quorumtool -s");
        // Exits non-zero when not quorate: read stdout whatever the status.
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "corosync-quorumtool", "-s"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ClusterError::Command { cmd: cmd.clone(), detail: e.to_string() })?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_quorumtool(&text).ok_or_else(|| ClusterError::Command {
            cmd,
            detail: format!("{}: {} {}", out.status, text.trim(), String::from_utf8_lossy(&out.stderr).trim()),
        })
    }

    fn wait_for(&self, i: usize, want: &str, ok: impl Fn(QuorumStatus) -> bool) -> Result<(), ClusterError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = match self.quorum_status(i) {
                Ok(s) if ok(s) => return Ok(()),
                Ok(s) => format!("{s:?}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(ClusterError::Timeout {
                    node: i,
                    want: want.to_string(),
                    secs: READY_TIMEOUT.as_secs(),
                    last,
                });
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// Wait until node `i` is (or is not) quorate, at most [`READY_TIMEOUT`].
    pub fn wait_quorate(&self, i: usize, quorate: bool) -> Result<(), ClusterError> {
        self.wait_for(i, if quorate { "quorate" } else { "non-quorate" }, |s| s.quorate == quorate)
    }

    /// Wait until every node is quorate with the votes of all nodes.
    pub fn wait_ready(&self) -> Result<(), ClusterError> {
        let n = self.nodes.len() as u32;
        for i in 0..self.nodes.len() {
            self.wait_for(i, "quorate with all votes", |s| s.quorate && s.total_votes == n)?;
        }
        Ok(())
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // SIGKILL all first, then reap: in parallel rather than ~1 s each.
        for node in &mut self.nodes {
            if let Some(c) = node.corosync.as_mut() {
                let _ = c.kill();
            }
        }
        for node in &mut self.nodes {
            if let Some(mut c) = node.corosync.take() {
                let _ = c.wait();
            }
        }
        for node in &self.nodes {
            let _ = run(&["ip", "netns", "del", &node.ns]);
        }
        let _ = run(&["ip", "netns", "del", &self.switch]);
        let pids: Vec<String> = self.nodes.iter().flat_map(|n| n.pids.iter().map(|p| p.to_string())).collect();
        remove_qb_files(Path::new("/dev/shm"), &pids);
        if std::env::var_os("ULOG_KEEP_CLUSTER_DIR").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Remove what libqb leaves in `/dev/shm` for the given corosync pids when corosync is killed:
/// the per-connection directories `qb-<server pid>-<client pid>-<fd>-<random>` and the
/// blackbox `qb-corosync-<pid>-blackbox-*`.
fn remove_qb_files(shm: &Path, pids: &[String]) {
    let Ok(entries) = fs::read_dir(shm) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let fields: Vec<&str> = name.split('-').collect();
        let pid_field = match fields.as_slice() {
            ["qb", "corosync", pid, ..] => pid,
            ["qb", pid, ..] => pid,
            _ => continue,
        };
        if !pids.iter().any(|p| p == pid_field) {
            continue;
        }
        let path = e.path();
        let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
    }
}

fn node_addr(i: usize) -> String {
    format!("10.213.0.{}", i + 1)
}

/// A corosync 3 config: knet, one value per line (the parser rejects anything after `{`).
fn corosync_conf(n: usize, state_dir: &Path) -> String {
    let mut nodes = String::new();
    for i in 0..n {
        nodes.push_str(&format!(
            "    node {{\n        nodeid: {}\n        name: node{}\n        ring0_addr: {}\n    }}\n",
            i + 1,
            i + 1,
            node_addr(i)
        ));
    }
    format!(
        "totem {{\n    version: 2\n    cluster_name: ulogtest\n    transport: knet\n    token: 1000\n    \
         token_coefficient: 0\n    crypto_cipher: none\n    crypto_hash: none\n}}\n\
         nodelist {{\n{nodes}}}\n\
         quorum {{\n    provider: corosync_votequorum\n}}\n\
         logging {{\n    to_stderr: yes\n    to_syslog: no\n    to_logfile: no\n    timestamp: on\n}}\n\
         system {{\n    state_dir: {}\n}}\n",
        state_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorumtool_output_is_read() {
        let text =
            "Quorum information\n------------------\nDate:             x\nQuorum provider:  corosync_votequorum\n\
                    Nodes:            3\nNode ID:          1\nRing ID:          1.10\nQuorate:          Yes\n\n\
                    Votequorum information\n----------------------\nExpected votes:   3\nHighest expected: 3\n\
                    Total votes:      3\nQuorum:           2\nFlags:            Quorate\n";
        assert_eq!(parse_quorumtool(text), Some(QuorumStatus { quorate: true, total_votes: 3 }));
        assert_eq!(parse_quorumtool("Cannot initialize QUORUM service"), None);
    }

    #[test]
    fn only_the_given_corosyncs_qb_files_are_removed() {
        let shm = std::env::temp_dir().join(format!("ulog-qb-test-{}", std::process::id()));
        fs::create_dir_all(shm.join("qb-4242-100-29-AbCdEf")).unwrap();
        fs::create_dir_all(shm.join("qb-4243-4242-29-AbCdEf")).unwrap();
        fs::write(shm.join("qb-corosync-4242-blackbox-data"), b"").unwrap();
        fs::write(shm.join("qb-corosync-4243-blackbox-data"), b"").unwrap();
        remove_qb_files(&shm, &["4242".to_string()]);
        let mut left: Vec<String> =
            fs::read_dir(&shm).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["qb-4243-4242-29-AbCdEf", "qb-corosync-4243-blackbox-data"]);
        fs::remove_dir_all(&shm).unwrap();
    }

    #[test]
    fn the_config_has_one_value_per_line_and_every_node() {
        let c = corosync_conf(3, Path::new("/tmp/x"));
        for line in c.lines() {
            if let Some((_, after)) = line.split_once('{') {
                assert!(after.trim().is_empty(), "nothing after {{: {line}");
            }
        }
        assert!(c.contains("ring0_addr: 10.213.0.3") && c.contains("nodeid: 3") && c.contains("token_coefficient: 0"));
    }
}
