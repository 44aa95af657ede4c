//! Issue 10, items 12 and 13: the agent must not deadlock with its own mirrors, and must fail
//! loudly where the kernel would silently ignore it.

use std::time::Duration;

use ulog_agent::wire::kernel_peer::AgentOutput;

use crate::common::*;

/// `setpriv` arguments that run the agent without `cap`, in the effective, permitted,
/// inheritable and bounding sets (root's exec takes its permitted set from the bounding set).
fn without(cap: &str) -> Vec<String> {
    vec!["setpriv".into(), format!("--inh-caps=-{cap}"), format!("--bounding-set=-{cap}"), "--".into()]
}

/// Runs the agent under `setpriv` without `cap`; it must exit 1 at once and name what is missing.
fn must_refuse_without(cap: &str, message: &str) {
    enter_private_netns().expect("integration tests need root (unshare CLONE_NEWNET)");
    let peer = KernelPeer::open().expect("open the kernel peer socket");
    let wrapper = without(cap);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut agent = AgentProcess::spawn_with(&wrapper, agent_bin(), peer.port(), ["--no-http"], AgentOutput::File)
        .unwrap_or_else(|e| panic!("{e}"));
    let st = agent.wait_exit(Duration::from_secs(10)).unwrap_or_else(|e| panic!("the agent must refuse to run: {e}"));
    let out = agent.output();
    assert_eq!(st.code(), Some(1), "exit status without {cap}:\n{out}");
    assert!(out.contains(message), "the error names the capability and why:\n{out}");
}

/// `cn_ulog_callback` (dm-log-userspace-transfer.c) drops every message from a sender without
/// CAP_SYS_ADMIN, silently: an agent running without it would "serve" while the kernel resends
/// every request every 15 s forever (and `/readyz` would say ready). The harness's peer accepts
/// replies from anyone, so the old agent looked healthy here; it must now refuse to start.
#[test]
fn without_cap_sys_admin_the_agent_refuses_to_start() {
    must_refuse_without(
        "sys_admin",
        "missing capabilities CAP_SYS_ADMIN: CAP_SYS_ADMIN: the kernel silently drops every reply",
    );
}

/// Joining connector group 7 needs CAP_NET_ADMIN (netlink_bind: the connector does not allow
/// unprivileged receivers of that group): the agent names it instead of failing on the socket.
#[test]
fn without_cap_net_admin_the_agent_refuses_to_start() {
    must_refuse_without("net_admin", "missing capabilities CAP_NET_ADMIN");
}

/// The agent's stderr is a pipe nobody drains (a stalled journal, a supervisor that stopped
/// reading). Each refused CTR logs a warning from the receive thread. With a blocking writer
/// the receive thread stops in write(2) once the 64 KiB pipe is full and nothing is answered
/// any more: the kernel's dm-raid1 worker then waits forever for MARK/FLUSH. Logging must drop
/// lines instead (and count them); every request is answered.
#[test]
fn a_full_stderr_pipe_never_stops_the_answers() {
    enter_private_netns().expect("integration tests need root (unshare CLONE_NEWNET)");
    crate::api::lo_up();
    let mut peer = KernelPeer::open().expect("open the kernel peer socket");
    let mut agent =
        AgentProcess::spawn_with(&[], agent_bin(), peer.port(), ["--no-probes"], AgentOutput::UnreadStderrPipe)
            .unwrap_or_else(|e| panic!("{e}"));
    agent.wait_ready(&mut peer, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}"));
    // ~250 bytes of warning per refused CTR: 10000 of them are ~40 times the pipe's capacity
    // and more than the logging queue holds (8192 lines).
    for i in 0..10_000u32 {
        let r = peer
            .call(T::Ctr, "LVM-ulogstderrpipe0001", 1 + u64::from(i), b"this is not a constructor string")
            .unwrap_or_else(|e| panic!("CTR {i} unanswered (stderr full?): {e}"));
        assert_eq!(r.error, -libc::EINVAL, "CTR {i}: {r}");
    }
    let log = Log::nth(0);
    let r = peer.call(T::Ctr, &log.uuid, log.luid, CORE.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.error, 0, "{r}");
    let r = peer.call(T::GetRegionSize, &log.uuid, log.luid, &[]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((r.error, r.payload.as_slice()), (0, &8u64.to_ne_bytes()[..]), "{r}");
    // The dropped lines are counted (copied into the exposition once a second).
    let http = crate::api::Http::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, body) = http.get("/metrics");
        let dropped = body
            .lines()
            .find_map(|l| l.strip_prefix("ulog_log_lines_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if status == 200 && dropped.is_some_and(|d| d > 0.0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no dropped lines counted: {status} {dropped:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One log server per host: a socket already subscribed to connector group 7 (cmirrord, or a
/// second agent on another run directory) would answer every request too, two replies per seq,
/// and both would write every `clustered-disk` device. The agent refuses to start and names
/// the process holding that socket (here: this test, playing the other server).
#[test]
fn another_group7_listener_is_refused_by_name() {
    enter_private_netns().expect("integration tests need root (unshare CLONE_NEWNET)");
    let peer = KernelPeer::open().expect("open the kernel peer socket");
    let other = GroupListener::open().expect("a group-7 listener");
    let mut agent = AgentProcess::spawn_with(&[], agent_bin(), peer.port(), ["--no-http"], AgentOutput::File)
        .unwrap_or_else(|e| panic!("{e}"));
    let st = agent.wait_exit(Duration::from_secs(10)).unwrap_or_else(|e| panic!("the agent must refuse to run: {e}"));
    let out = agent.output();
    assert_eq!(st.code(), Some(1), "{out}");
    let me = format!("pid {} (", std::process::id());
    assert!(
        out.contains("another log server listens")
            && out.contains(&me)
            && out.contains(&format!("port {}", other.port())),
        "names the other server:\n{out}"
    );
    drop(other);
    // Alone again, it starts.
    let mut peer = peer;
    let agent = AgentProcess::spawn_ready(agent_bin(), &mut peer, ["--no-http"]);
    assert!(agent.is_ok(), "{:?}", agent.err());
}
