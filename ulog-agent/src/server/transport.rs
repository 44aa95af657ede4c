//! `ConnectorSocket`: the NETLINK_CONNECTOR socket the kernel's dm-log-userspace talks to,
//! and the receive loop that feeds it to the `LogServer`.
//!
//! The socket binds with no groups and joins group 7 (CN_IDX_DM) with
//! `NETLINK_ADD_MEMBERSHIP`: `nl_groups` in `bind` is a bitmask, so cmirrord's `bind(groups=7)`
//! also subscribes groups 1-3 (the proc connector among them). Replies go to the sender's port
//! taken from `recvfrom` with the group cleared, so they are unicast (port 0 = the kernel)
//! instead of multicast back to every listener of group 7.
//!
//! The loop blocks in `recvfrom` with a 250 ms timeout, only to notice a shutdown request: one
//! system call per request, none per idle wake-up beyond four a second. Whether it may exit is
//! decided here, between datagrams (see `crate::process::shutdown`): SIGTERM ends it only when no log is
//! live; the restart signal ends it whatever is live. Before returning it leaves the connector
//! group and serves what was already queued, so the kernel's next request finds no listener
//! (-ESRCH: reconnect every 2 s) instead of waiting 15 s for an answer from a closed socket.
//!
//! Stalls: netlink gives no receive timestamp, so the time a request waited in the socket queue
//! is unknown. What the loop can tell is that it did not run: a `recvfrom` that returns well
//! after its 250 ms timeout (a datagram, the timeout, or the EINTR that SO_RCVTIMEO sockets
//! report after SIGCONT) means the process was stopped or starved; serving one datagram for that
//! long (stopped meanwhile, or a slow request) kept the queue waiting too. The requests served
//! right after either (the first datagram and what is already queued) are counted per type
//! (`ulog_requests_after_stall_total`, bad events of the SLO without the eBPF probes). Limits:
//! stalls and waits under `LATE_WAKE` (0.5 s) are not seen, and a request that
//! arrived just before the loop resumed is counted although it hardly waited.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use tracing::{info, warn};
use ulog_common::{CN_IDX_DM, NETLINK_CONNECTOR};

use crate::metrics::counters::Dropped;
use crate::process::shutdown::{ExitControl, ExitRequest};
use crate::region_log::persist::ReplySink;
use crate::server::ratelimit::RateLimit;
use crate::server::LogServer;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_ADD_MEMBERSHIP: libc::c_int = 1;
const NETLINK_DROP_MEMBERSHIP: libc::c_int = 2;

/// Receive buffer: far more than the kernel's 512-byte requests, so that an oversized
/// datagram from a misbehaving peer is seen (MSG_TRUNC) rather than silently cut.
pub const RECV_BUF: usize = 64 * 1024;

/// A connector socket joined to the dm log group.
#[derive(Debug)]
pub struct ConnectorSocket {
    fd: OwnedFd,
    port: u32,
}

/// One received datagram's facts.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// Bytes in the buffer.
    pub len: usize,
    /// The datagram's real length (larger than `len` if it was truncated).
    pub full_len: usize,
    /// Sender's netlink port (0 = kernel).
    pub port: u32,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl ConnectorSocket {
    /// Opens the server socket: bound, joined to group 7, with a large receive queue (many
    /// requests may be in flight) and a receive timeout for shutdown checks.
    pub fn open(rcvbuf: usize) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the fd is owned immediately.
        let fd =
            cvt(unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_CONNECTOR) })?;
        // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid.
        let mut addr: libc::sockaddr_nl = unsafe { zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the given length.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        })?;
        let group = CN_IDX_DM as libc::c_int;
        setsockopt(&fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group)?;
        let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX);
        // Root may exceed rmem_max; fall back to the capped option otherwise.
        if setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size).is_err() {
            let _ = setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &size);
        }
        let tv = libc::timeval { tv_sec: 0, tv_usec: RECV_TIMEOUT.as_micros() as libc::suseconds_t };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        let port = local_port(&fd)?;
        Ok(Self { fd, port })
    }

    /// Our netlink port id.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Receives one datagram; `Err(WouldBlock/TimedOut)` on the periodic timeout.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.recv_flags(buf, 0)
    }

    /// Receives one datagram if one is queued; `Err(WouldBlock)` otherwise.
    pub fn recv_queued(&self, buf: &mut [u8]) -> io::Result<Received> {
        self.recv_flags(buf, libc::MSG_DONTWAIT)
    }

    /// Leaves (`false`) or joins again (`true`) the dm log group: while out of it the kernel's
    /// requests find no listener (-ESRCH). Replies can still be sent.
    pub fn set_group_member(&self, member: bool) -> io::Result<()> {
        let group = CN_IDX_DM as libc::c_int;
        let opt = if member { NETLINK_ADD_MEMBERSHIP } else { NETLINK_DROP_MEMBERSHIP };
        setsockopt(&self.fd, SOL_NETLINK, opt, &group)
    }

    fn recv_flags(&self, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
        // SAFETY: an all-zero sockaddr_nl is valid.
        let mut from: libc::sockaddr_nl = unsafe { zeroed() };
        let mut flen = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: buf and from are valid for writes of the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC | flags,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut flen,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let full_len = n as usize;
        Ok(Received { len: full_len.min(buf.len()), full_len, port: from.nl_pid })
    }

    /// Sends a datagram to a port (unicast; group 0).
    pub fn send_to(&self, port: u32, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl is valid.
        let mut to: libc::sockaddr_nl = unsafe { zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        to.nl_pid = port;
        loop {
            // SAFETY: bytes and to are valid for reads of the lengths passed.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    0,
                    (&to as *const libc::sockaddr_nl).cast(),
                    size_of::<libc::sockaddr_nl>() as u32,
                )
            };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: value points to a T of the size passed.
    cvt(unsafe { libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), size_of::<T>() as u32) })
        .map(drop)
}

fn local_port(fd: &OwnedFd) -> io::Result<u32> {
    // SAFETY: an all-zero sockaddr_nl is valid; getsockname writes at most len bytes.
    let mut addr: libc::sockaddr_nl = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), (&mut addr as *mut libc::sockaddr_nl).cast(), &mut len) })?;
    Ok(addr.nl_pid)
}

/// Sends replies; errors are rate-limited in the log and counted by the caller.
pub struct SocketSink {
    socket: std::sync::Arc<ConnectorSocket>,
    errors: std::sync::Mutex<RateLimit>,
}

impl SocketSink {
    /// Wraps a socket.
    pub fn new(socket: std::sync::Arc<ConnectorSocket>) -> Self {
        Self { socket, errors: std::sync::Mutex::new(RateLimit::new(10, std::time::Duration::from_secs(60))) }
    }
}

impl ReplySink for SocketSink {
    fn send_reply(&self, port: u32, datagram: &[u8]) -> bool {
        match self.socket.send_to(port, datagram) {
            Ok(()) => true,
            Err(e) => {
                let allowed = self.errors.lock().map(|mut r| r.allow(Instant::now())).unwrap_or(Some(0));
                if let Some(sup) = allowed {
                    warn!(port, error = %e, suppressed = sup, "cannot send a reply");
                }
                false
            }
        }
    }
}

/// How the receive loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServeEnd {
    /// Asked to exit (SIGTERM/SIGINT) with no live log.
    Idle,
    /// Asked for a restart-style exit: live logs are to be flushed and left to the next agent.
    Restart,
}

/// The receive timeout (`SO_RCVTIMEO`): the loop wakes at least this often to notice an exit.
const RECV_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(250);

/// A `recvfrom` that returns a datagram later than this after the loop started waiting means the
/// process did not run for a while (SIGSTOP, CPU starvation, swap): the timeout plus a margin
/// for ordinary scheduling delay. Shorter stalls are not detected.
const LATE_WAKE: std::time::Duration = std::time::Duration::from_millis(500);

/// Datagrams served by one [`drain`] at most: a peer flooding the socket cannot keep an exit
/// waiting forever.
const DRAIN_LIMIT: usize = 4096;

/// Serves the datagrams already queued (at most [`DRAIN_LIMIT`]).
fn drain(socket: &ConnectorSocket, server: &mut LogServer, buf: &mut [u8]) -> io::Result<()> {
    for _ in 0..DRAIN_LIMIT {
        match socket.recv_queued(buf) {
            Ok(r) => server.handle_datagram(&buf[..r.len], r.port, r.full_len > r.len),
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(()),
                Some(libc::EINTR) => {}
                Some(libc::ENOBUFS) => server.counters().dropped(Dropped::ReceiveOverrun),
                _ => return Err(e),
            },
        }
    }
    Ok(())
}

/// The names of up to 8 live logs (`name(mirror=<dm name>)` where the mirror device is known, from
/// the telemetry's last discovery: no device-mapper call here) and how many there are.
fn live_logs(server: &LogServer) -> (usize, String) {
    let logs = server.log_names();
    let names: Vec<String> = logs
        .iter()
        .take(8)
        .map(|(name, mirror)| match mirror {
            Some(m) => format!("{name}(mirror={m})"),
            None => name.clone(),
        })
        .collect();
    (logs.len(), names.join(","))
}

/// Handles an exit request; `Ok(Some(end))` if the loop is to end. An exit-if-idle request with
/// live logs is refused (logged: a warning with the way out the first time, `warned`).
fn try_exit(
    request: ExitRequest,
    socket: &ConnectorSocket,
    server: &mut LogServer,
    control: &ExitControl,
    buf: &mut [u8],
    warned: &mut bool,
) -> io::Result<Option<ServeEnd>> {
    let end = match request {
        ExitRequest::None => return Ok(None),
        ExitRequest::IfIdle => ServeEnd::Idle,
        ExitRequest::Restart => ServeEnd::Restart,
    };
    let refuse = |server: &LogServer, warned: &mut bool| {
        let (count, names) = live_logs(server);
        if !*warned {
            warn!(
                live_logs = count,
                logs = %names,
                "not exiting: logs are live, and without a log server every write to a clean region of their \
                 mirrors would wait in the kernel (its reconnect loop) and unmounting them would hang; still \
                 serving. Remove the mirrors first, or ask for a restart-style exit (`ulog-agent stop --restart`, \
                 which flushes and exits for a new agent to take over)"
            );
            *warned = true;
        } else {
            info!(live_logs = count, logs = %names, "not exiting: logs are live; still serving");
        }
        control.refused();
    };
    if end == ServeEnd::Idle {
        drain(socket, server, buf)?;
        if server.log_count() != 0 {
            refuse(server, warned);
            return Ok(None);
        }
    }
    socket.set_group_member(false)?;
    drain(socket, server, buf)?;
    if end == ServeEnd::Idle && server.log_count() != 0 {
        // A CTR arrived between the check and leaving the group.
        socket.set_group_member(true)?;
        refuse(server, warned);
        return Ok(None);
    }
    Ok(Some(end))
}

/// Serves datagrams until `control` asks for an exit that is allowed (see `crate::process::shutdown`).
/// The loop's heartbeat (`/healthz`) is stamped by every
/// datagram (`LogServer::handle_datagram`) and every idle timeout.
pub fn serve(socket: &ConnectorSocket, server: &mut LogServer, control: &ExitControl) -> io::Result<ServeEnd> {
    let mut buf = vec![0u8; RECV_BUF];
    let mut overrun_log = RateLimit::new(5, std::time::Duration::from_secs(60));
    let mut warned = false;
    let mut stall_pending = false;
    // When recvfrom returned the datagram the loop then served (None: the last pass served none).
    // With the next pass's start it gives how long serving took, without clock reads of its own.
    let mut served_from: Option<Instant> = None;
    server.telemetry().beat(crate::metrics::clock::now_ns());
    loop {
        if let Some(end) = try_exit(control.pending(), socket, server, control, &mut buf, &mut warned)? {
            return Ok(end);
        }
        let call = Instant::now();
        // Away from recvfrom this long serving (stopped while serving, or a slow request): what
        // queued meanwhile waited for it.
        if served_from.take().is_some_and(|t| call.saturating_duration_since(t) > LATE_WAKE) {
            stall_pending = true;
        }
        let received = socket.recv(&mut buf);
        let returned = Instant::now();
        // recvfrom returns within RECV_TIMEOUT while the process runs: a return this late (a
        // datagram, the timeout, or the EINTR that SO_RCVTIMEO sockets report after SIGCONT)
        // means the process was stopped or starved, and what is queued may have waited through
        // it (netlink gives no receive timestamp to tell how long). It stays pending until a
        // datagram is served or a timeout comes on time (the queue was empty then).
        let late = returned.saturating_duration_since(call) > LATE_WAKE;
        stall_pending |= late;
        match received {
            Ok(r) => {
                served_from = Some(returned);
                if stall_pending {
                    server.counters().set_after_stall(true);
                    server.handle_datagram(&buf[..r.len], r.port, r.full_len > r.len);
                    let drained = drain(socket, server, &mut buf);
                    server.counters().set_after_stall(false);
                    drained?;
                    stall_pending = false;
                } else {
                    server.handle_datagram(&buf[..r.len], r.port, r.full_len > r.len);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && !late => {
                stall_pending = false;
                server.telemetry().beat(crate::metrics::clock::now_ns());
            }
            Err(e) => match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => server.telemetry().beat(crate::metrics::clock::now_ns()),
                Some(libc::ENOBUFS) => {
                    server.counters().dropped(Dropped::ReceiveOverrun);
                    if let Some(sup) = overrun_log.allow(returned) {
                        warn!(
                            suppressed = sup,
                            // netlink_broadcast delivered the request to no listener: the
                            // kernel's dm_consult_userspace got -ESRCH, and retries through its
                            // reconnect loop (CTR + RESUME every 2 s) for the request types sent
                            // through userspace_do_request; the others failed.
                            "receive queue overflowed: requests were lost; the kernel saw -ESRCH and retries them through its reconnect loop (CTR + RESUME, every 2 s)"
                        );
                    }
                }
                _ => return Err(e),
            },
        }
    }
}
