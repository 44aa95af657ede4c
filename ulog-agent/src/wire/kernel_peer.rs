//! A test harness that plays the kernel's side of the dm userspace-log protocol over a real
//! `NETLINK_CONNECTOR` socket, for the integration tests and the benchmarks.
//!
//! # How it stands in for the kernel
//!
//! The kernel multicasts each request to connector group 7 from port 0 and accepts replies from
//! anyone with `CAP_SYS_ADMIN`. A userspace process cannot send from port 0, so the harness
//! multicasts from its own (autobound) port and starts the agent with
//! `--accept-peer-port <that port>`. Replies are validated the way `drivers/connector/connector.c`
//! (`cn_rx_skb`, `cn_call_callback`) and `dm-log-userspace-transfer.c` (`cn_ulog_callback`,
//! `fill_pkg`) do: see [`parse_datagram`] and [`KernelPeer::recv_reply`].
//!
//! # Private network namespaces, and why a send "fails" with ECONNREFUSED
//!
//! The kernel's own connector socket (port 0) exists only in the initial network namespace.
//! Running the harness there would be dangerous: a datagram sent to group 7 is *also* unicast to
//! port 0 (the destination `nl_pid`), so on a host with `dm-log-userspace` loaded the kernel would
//! take the harness's requests for replies. [`enter_private_netns`] therefore gives the calling
//! thread a fresh namespace (child processes spawned from that thread inherit it, so every test
//! gets its own connector bus), and [`KernelPeer::open`] refuses to run where a kernel connector
//! socket is present.
//!
//! In a private namespace, `sendto(group 7, port 0)` returns `ECONNREFUSED` every time, whether or
//! not anybody listens: `netlink_sendmsg` first hands the datagram to `netlink_broadcast` (whose
//! result it ignores) and then unicasts it to port 0, which has no socket in that namespace. The
//! multicast has been delivered to every group-7 member by then (measured: the listener receives
//! it, with source group mask `1 << 6`). So the harness treats `ECONNREFUSED` as success for its
//! multicasts. What the kernel would report as `-ESRCH` (nobody subscribed to group 7) is instead
//! found by reading the namespace's `/proc/net/netlink`: [`KernelPeer::group_listeners`]; the
//! timeout errors mention it.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ulog_common::{
    CnMsg, DmUlogRequest, NlMsgHdr, RequestType, CN_IDX_DM, CN_MSG_LEN, CONNECTOR_MAX_MSG_SIZE, DM_ULOG_CB_ID,
    DM_ULOG_REQUEST_VERSION, NETLINK_CONNECTOR, NLMSG_DONE, NLMSG_HDRLEN, ULOG_OFFSET, ULOG_REQUEST_LEN,
};

/// The netlink group bit of connector index 7 (`nl_groups` is a bitmask: group g is `1 << (g-1)`).
pub const DM_GROUP_MASK: u32 = 1 << (CN_IDX_DM - 1);
/// How long [`KernelPeer::call`] waits for a reply by default.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`AgentProcess::wait_ready`] keeps probing by default.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The uuid of the log [`AgentProcess::wait_ready`] probes (it must not exist).
pub const READY_PROBE_UUID: &str = "ulog-harness-ready-probe";

const RECV_BUF: usize = 1 << 16;

/// What went wrong in the harness, or what the kernel would have made of a reply.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The harness needs root (namespaces, connector sends).
    #[error("the kernel-peer harness must run as root (euid {euid}): {what}")]
    NotRoot {
        /// Effective uid.
        euid: u32,
        /// What needed it.
        what: &'static str,
    },
    /// The thread is in a namespace where the kernel's connector socket lives.
    #[error(
        "refusing to play the kernel in a network namespace that has the kernel's connector \
         socket (port 0): requests would also reach the real kernel; call \
         enter_private_netns() first"
    )]
    NotPrivateNetns,
    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// The call.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The request cannot be encoded (uuid too long, payload too big for a connector message).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No reply within the time limit.
    #[error(
        "no reply within {waited:?} (outstanding seqs {outstanding:?}; connector group-7 \
         listeners in this namespace: {listeners})"
    )]
    Timeout {
        /// How long we waited.
        waited: Duration,
        /// Sequence numbers still unanswered.
        outstanding: Vec<u32>,
        /// Sockets subscribed to group 7 (0: the kernel would have failed the send with -ESRCH).
        listeners: String,
    },
    /// A datagram the kernel would have dropped (connector.c checks, or a payload that is not
    /// inside the message).
    #[error("malformed reply from port {from_port} (the kernel would drop it): {reason}; {len} bytes: {hex}")]
    Malformed {
        /// Why.
        reason: String,
        /// Sender port.
        from_port: u32,
        /// Datagram length.
        len: usize,
        /// The first bytes, hex.
        hex: String,
    },
    /// `0 < cn_msg.len < 160`: the kernel logs "Incomplete message received" and drops it.
    #[error("incomplete message from port {from_port}: cn_msg.len {cn_len} < 160 (cn_msg.seq {cn_seq})")]
    Incomplete {
        /// cn_msg.seq.
        cn_seq: u32,
        /// cn_msg.len.
        cn_len: u16,
        /// Sender port.
        from_port: u32,
    },
    /// Something arrived where silence was expected.
    #[error("unexpected datagram(s): {0}")]
    Unexpected(String),
    /// A reply carried an error where success was expected ([`Reply::ok`]).
    #[error("seq {seq} ({kind}): error {errno} ({name})", name = errno_name(*.errno))]
    Errno {
        /// The request's seq.
        seq: u32,
        /// The request type's name.
        kind: String,
        /// The (negative) error.
        errno: i32,
    },
    /// The agent process misbehaved (exited, wrong readiness answer).
    #[error("agent: {msg}\n--- agent output ({path}) ---\n{output}--- end of agent output ---")]
    Agent {
        /// What happened.
        msg: String,
        /// Its captured stdout+stderr.
        output: String,
        /// Where that is stored.
        path: String,
    },
}

fn io_err(op: &'static str) -> PeerError {
    PeerError::Io { op, source: io::Error::last_os_error() }
}

/// A short name for an errno value (either sign), for messages.
pub fn errno_name(e: i32) -> &'static str {
    match e.abs() {
        0 => "ok",
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EIO => "EIO",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => "errno",
    }
}

/// Gives the calling thread a private network namespace (`unshare(CLONE_NEWNET)`), and with it a
/// connector bus of its own. Processes spawned from this thread afterwards share it. Calling it
/// again moves the thread to yet another fresh namespace.
pub fn enter_private_netns() -> Result<(), PeerError> {
    // SAFETY: plain syscalls without pointers.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(PeerError::NotRoot { euid, what: "unshare(CLONE_NEWNET)" });
    }
    // SAFETY: as above; affects the calling thread only.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Err(PeerError::NotRoot { euid, what: "unshare(CLONE_NEWNET) (EPERM: no CAP_SYS_ADMIN?)" });
        }
        return Err(PeerError::Io { op: "unshare(CLONE_NEWNET)", source: e });
    }
    Ok(())
}

/// Connector sockets of this thread's namespace, from `/proc/thread-self/net/netlink`:
/// (port, groups bitmask of the first 32 groups).
fn connector_sockets(f: &mut File) -> io::Result<Vec<(u32, u32)>> {
    f.seek(SeekFrom::Start(0))?;
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 4 || cols[1] != NETLINK_CONNECTOR.to_string() {
            continue;
        }
        let (Ok(port), Ok(groups)) = (cols[2].parse::<u32>(), u32::from_str_radix(cols[3], 16)) else {
            continue;
        };
        out.push((port, groups));
    }
    Ok(out)
}

/// How the kernel would take a reply: see [`parse_datagram`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyForm {
    /// `cn_msg.len >= 160`: a `dm_ulog_request` follows; matched by its `seq`.
    Full,
    /// `cn_msg.len == 0`: matched by `cn_msg.seq`, result `-cn_msg.ack`.
    AckOnly,
}

/// A connector datagram as the kernel's receive path classifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A full reply: its header and its payload (`data_size` bytes, all present).
    Full {
        /// The netlink header.
        nl: NlMsgHdr,
        /// The connector header.
        cn: CnMsg,
        /// The ulog header as received.
        header: DmUlogRequest,
        /// The payload (exactly `header.data_size` bytes).
        payload: Vec<u8>,
    },
    /// An ack-only reply.
    AckOnly {
        /// The netlink header.
        nl: NlMsgHdr,
        /// The connector header.
        cn: CnMsg,
    },
    /// `0 < cn_msg.len < 160`.
    Incomplete {
        /// The netlink header.
        nl: NlMsgHdr,
        /// The connector header.
        cn: CnMsg,
    },
}

/// Classifies a datagram received from the agent the way the kernel would: `Err(reason)` where
/// `cn_rx_skb`/`cn_call_callback` drop it (too short for nlmsghdr + cn_msg, `nlmsg_len` larger
/// than the datagram, connector payload over 16 KiB, `cn_msg.len` beyond `nlmsg_len`, connector
/// id other than {7,1}) and where a full reply's `data_size` reaches past the message (the kernel
/// would copy bytes that are not there: always a server bug).
pub fn parse_datagram(d: &[u8]) -> Result<Parsed, String> {
    let nl = NlMsgHdr::read(d).ok_or_else(|| format!("{} bytes: shorter than a nlmsghdr", d.len()))?;
    let nl_len = nl.len as usize;
    if nl_len < NLMSG_HDRLEN + CN_MSG_LEN {
        return Err(format!("nlmsg_len {nl_len} < 36 (nlmsghdr + cn_msg)"));
    }
    if d.len() < nl_len {
        return Err(format!("nlmsg_len {nl_len} > datagram length {}", d.len()));
    }
    if nl_len - NLMSG_HDRLEN > CONNECTOR_MAX_MSG_SIZE {
        return Err(format!("connector payload {} > {CONNECTOR_MAX_MSG_SIZE}", nl_len - NLMSG_HDRLEN));
    }
    let cn = CnMsg::read(&d[NLMSG_HDRLEN..]).expect("length checked above");
    if nl_len < ULOG_OFFSET + cn.len as usize {
        return Err(format!("cn_msg.len {} exceeds nlmsg_len {nl_len} - 36", cn.len));
    }
    if cn.id != DM_ULOG_CB_ID {
        return Err(format!("connector id {{{}, {}}} is not {{7, 1}}", cn.id.idx, cn.id.val));
    }
    if cn.len == 0 {
        return Ok(Parsed::AckOnly { nl, cn });
    }
    if (cn.len as usize) < ULOG_REQUEST_LEN {
        return Ok(Parsed::Incomplete { nl, cn });
    }
    let header = DmUlogRequest::read(&d[ULOG_OFFSET..]).expect("length checked above");
    let present = cn.len as usize - ULOG_REQUEST_LEN;
    if header.data_size as usize > present {
        return Err(format!(
            "data_size {} but only {present} payload bytes in the message (cn_msg.len {})",
            header.data_size, cn.len
        ));
    }
    let start = ULOG_OFFSET + ULOG_REQUEST_LEN;
    let payload = d[start..start + header.data_size as usize].to_vec();
    Ok(Parsed::Full { nl, cn, header, payload })
}

/// How much reply payload the "kernel" accepts for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capacity {
    /// What the kernel's caller offers for this type (`RequestType::reply_capacity`); unbounded
    /// for STATUS_* and for type numbers outside 1..=17.
    Default,
    /// Exactly this many bytes (0 for the reconnect CTR).
    Bytes(usize),
    /// Anything.
    Unbounded,
}

impl Capacity {
    fn resolve(self, request_type: u32) -> Option<usize> {
        match self {
            Capacity::Bytes(n) => Some(n),
            Capacity::Unbounded => None,
            Capacity::Default => RequestType::from_raw(request_type).and_then(|t| t.reply_capacity()),
        }
    }
}

/// One request as the kernel would send it.
#[derive(Clone, Debug)]
pub struct Request {
    /// The raw `request_type` (upper 24 bits included, whatever they are).
    pub request_type: u32,
    /// The uuid (without NUL, ≤ 128 bytes).
    pub uuid: Vec<u8>,
    /// The luid.
    pub luid: u64,
    /// The payload.
    pub payload: Vec<u8>,
    /// Protocol version; `None` = the peer's default (3).
    pub version: Option<u32>,
    /// Reply payload the "kernel" accepts.
    pub capacity: Capacity,
}

impl Request {
    /// A request of type `kind`.
    pub fn new(kind: RequestType, uuid: &str, luid: u64, payload: impl Into<Vec<u8>>) -> Self {
        Self::raw(kind.raw(), uuid, luid, payload)
    }

    /// A request with a raw type number.
    pub fn raw(request_type: u32, uuid: &str, luid: u64, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            request_type,
            uuid: uuid.as_bytes().to_vec(),
            luid,
            payload: payload.into(),
            version: None,
            capacity: Capacity::Default,
        }
    }

    /// The initial CTR for a table: payload `ctr` without NUL, reply capacity 128.
    pub fn ctr(uuid: &str, luid: u64, ctr: &str) -> Self {
        Self::new(RequestType::Ctr, uuid, luid, ctr.as_bytes())
    }

    /// The CTR of the kernel's `-ESRCH` reconnect loop: payload `ctr` plus NUL, reply capacity 0.
    pub fn ctr_reconnect(uuid: &str, luid: u64, ctr: &str) -> Self {
        Self::new(RequestType::Ctr, uuid, luid, ctr_reconnect_payload(ctr)).capacity(Capacity::Bytes(0))
    }

    /// Sets the protocol version.
    pub fn version(mut self, v: u32) -> Self {
        self.version = Some(v);
        self
    }

    /// Sets the accepted reply capacity.
    pub fn capacity(mut self, c: Capacity) -> Self {
        self.capacity = c;
        self
    }

    /// The type's name, or `type N` for numbers outside 1..=17.
    pub fn kind_name(&self) -> String {
        kind_name(self.request_type)
    }
}

fn kind_name(raw: u32) -> String {
    match RequestType::from_raw(raw) {
        Some(t) => t.name().to_string(),
        None => format!("type {raw:#x}"),
    }
}

/// A CTR payload as the kernel builds it: `"<dev_sectors> <args>"`, no NUL.
pub fn ctr_payload(dev_sectors: u64, args: &str) -> Vec<u8> {
    format!("{dev_sectors} {args}").into_bytes()
}

/// The reconnect form of a CTR payload: the string with its NUL counted in data_size.
pub fn ctr_reconnect_payload(ctr: &str) -> Vec<u8> {
    let mut p = ctr.as_bytes().to_vec();
    p.push(0);
    p
}

/// Encodes `u64` regions as a MARK/CLEAR/integrated-FLUSH payload (host order).
pub fn regions_payload(regions: &[u64]) -> Vec<u8> {
    regions.iter().flat_map(|r| r.to_ne_bytes()).collect()
}

/// The datagram the kernel sends for `req`: nlmsghdr (type NLMSG_DONE, seq = `seq`, pid 0,
/// `nlmsg_len` = 36 + cn_msg.len, the datagram itself padded to 4 bytes as `nlmsg_put` does),
/// cn_msg ({7,1}, seq = `seq`, ack 0, len = 160 + payload), the ulog header (luid, uuid, version,
/// error 0, seq, request_type, data_size), the payload.
pub fn encode_request(req: &Request, seq: u32, version: u32) -> Result<Vec<u8>, PeerError> {
    let mut h = DmUlogRequest::zeroed();
    if !h.set_uuid(&req.uuid) {
        return Err(PeerError::BadRequest(format!("uuid of {} bytes (max 128)", req.uuid.len())));
    }
    let cn_len = ULOG_REQUEST_LEN + req.payload.len();
    if cn_len > CONNECTOR_MAX_MSG_SIZE {
        return Err(PeerError::BadRequest(format!("payload of {} bytes", req.payload.len())));
    }
    h.luid = req.luid;
    h.version = version;
    h.seq = seq;
    h.request_type = req.request_type;
    h.data_size = req.payload.len() as u32;
    let nl_len = ULOG_OFFSET + cn_len;
    let mut d = vec![0u8; (nl_len + 3) & !3];
    NlMsgHdr { len: nl_len as u32, kind: NLMSG_DONE, flags: 0, seq, pid: 0 }.write(&mut d);
    CnMsg { id: DM_ULOG_CB_ID, seq, ack: 0, len: cn_len as u16, flags: 0 }.write(&mut d[NLMSG_HDRLEN..]);
    h.write(&mut d[ULOG_OFFSET..]);
    d[ULOG_OFFSET + ULOG_REQUEST_LEN..nl_len].copy_from_slice(&req.payload);
    Ok(d)
}

/// A reply as the kernel takes it.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The seq it was matched by (ulog seq for full replies, cn_msg.seq for ack-only ones).
    pub seq: u32,
    /// Full or ack-only.
    pub form: ReplyForm,
    /// The result the kernel's caller sees: the header's `error` (full), `-ack` (ack-only), or
    /// `-ENOSPC` when the payload exceeds the request's capacity.
    pub error: i32,
    /// The payload the kernel's caller gets (empty for ack-only and `-ENOSPC`).
    pub payload: Vec<u8>,
    /// The reply's own ulog header (full replies), for echo checks.
    pub header: Option<DmUlogRequest>,
    /// The reply's cn_msg.
    pub cn: CnMsg,
    /// The reply's nlmsghdr.
    pub nl: NlMsgHdr,
    /// The port it came from.
    pub from_port: u32,
    /// The datagram's length.
    pub datagram_len: usize,
    /// The raw type of the request it answers (`None` if it matched no request: see
    /// [`KernelPeer::take_unmatched`]).
    pub request_type: Option<u32>,
}

impl Reply {
    /// The payload, or [`PeerError::Errno`] if the result is not 0.
    pub fn ok(&self) -> Result<&[u8], PeerError> {
        if self.error == 0 {
            Ok(&self.payload)
        } else {
            Err(PeerError::Errno {
                seq: self.seq,
                kind: self.request_type.map(kind_name).unwrap_or_else(|| "?".into()),
                errno: self.error,
            })
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} reply seq {} to {} from port {}: error {} ({}), {} payload bytes",
            self.form,
            self.seq,
            self.request_type.map(kind_name).unwrap_or_else(|| "nothing".into()),
            self.from_port,
            self.error,
            errno_name(self.error),
            self.payload.len()
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Outstanding {
    request_type: u32,
    capacity: Option<usize>,
}

fn hex(b: &[u8]) -> String {
    let mut s: String = b.iter().take(64).map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(" ");
    if b.len() > 64 {
        s.push_str(" …");
    }
    s
}

fn nl_addr(port: u32, groups: u32) -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all-zero is valid.
    let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
    sa.nl_family = libc::AF_NETLINK as u16;
    sa.nl_pid = port;
    sa.nl_groups = groups;
    sa
}

fn open_connector_socket(groups: u32) -> Result<(OwnedFd, u32), PeerError> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_CONNECTOR) };
    if fd < 0 {
        return Err(io_err("socket(AF_NETLINK, NETLINK_CONNECTOR)"));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let big: libc::c_int = 4 << 20;
    // Best effort (root may exceed rmem_max with the FORCE variant); the default is enough for
    // the tests, a bigger buffer only helps benchmarks with deep queues.
    // SAFETY: valid fd and option buffer.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &big as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    let sa = nl_addr(0, groups);
    // SAFETY: valid fd and address.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            // SAFETY: plain syscall.
            let euid = unsafe { libc::geteuid() };
            return Err(PeerError::NotRoot { euid, what: "binding a connector socket" });
        }
        return Err(PeerError::Io { op: "bind(AF_NETLINK)", source: e });
    }
    let mut got = nl_addr(0, 0);
    let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: valid fd and out-buffers of the right size.
    if unsafe { libc::getsockname(fd.as_raw_fd(), &mut got as *mut _ as *mut libc::sockaddr, &mut len) } != 0 {
        return Err(io_err("getsockname(AF_NETLINK)"));
    }
    Ok((fd, got.nl_pid))
}

/// Sends `d` to connector group 7 (port 0, group mask `1 << 6`), as the kernel does.
/// `ECONNREFUSED` means only that the port-0 part had no receiver: see the module docs.
fn send_group(fd: RawFd, d: &[u8]) -> Result<(), PeerError> {
    send_to(fd, d, 0, DM_GROUP_MASK)
}

fn send_to(fd: RawFd, d: &[u8], port: u32, groups: u32) -> Result<(), PeerError> {
    let sa = nl_addr(port, groups);
    // SAFETY: valid fd, buffer and address.
    let r = unsafe {
        libc::sendto(
            fd,
            d.as_ptr() as *const libc::c_void,
            d.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if groups != 0 && port == 0 && e.raw_os_error() == Some(libc::ECONNREFUSED) {
            return Ok(());
        }
        if e.raw_os_error() == Some(libc::EPERM) {
            // SAFETY: plain syscall.
            let euid = unsafe { libc::geteuid() };
            return Err(PeerError::NotRoot { euid, what: "sending connector messages" });
        }
        return Err(PeerError::Io { op: "sendto(AF_NETLINK)", source: e });
    }
    Ok(())
}

/// Waits up to `timeout` for a datagram; `Ok(None)` on timeout.
/// Returns (datagram, sender port, sender groups).
fn recv_one(fd: RawFd, buf: &mut [u8], timeout: Duration) -> Result<Option<(usize, u32, u32)>, PeerError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        let ms = if ms == 0 && !left.is_zero() { 1 } else { ms };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(PeerError::Io { op: "poll", source: e });
        }
        if r == 0 {
            return Ok(None);
        }
        let mut sa = nl_addr(0, 0);
        let mut len = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        // SAFETY: valid fd, buffer and address out-params.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                &mut sa as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) {
                continue;
            }
            return Err(PeerError::Io { op: "recvfrom(AF_NETLINK)", source: e });
        }
        return Ok(Some((n as usize, sa.nl_pid, sa.nl_groups)));
    }
}

/// The kernel's side of the connection: sends requests to connector group 7 and takes the
/// replies the way `dm-log-userspace-transfer.c` does. Not `Sync`; one per test.
pub struct KernelPeer {
    fd: OwnedFd,
    port: u32,
    netlink_proc: File,
    next_seq: u32,
    version: u32,
    call_timeout: Duration,
    outstanding: HashMap<u32, Outstanding>,
    ready: VecDeque<Reply>,
    unmatched: Vec<Reply>,
    ignored: HashSet<u32>,
    buf: Vec<u8>,
}

impl fmt::Debug for KernelPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KernelPeer")
            .field("port", &self.port)
            .field("next_seq", &self.next_seq)
            .field("outstanding", &self.outstanding.len())
            .finish()
    }
}

impl KernelPeer {
    /// Opens the kernel's socket: `NETLINK_CONNECTOR`, autobound port, no groups. Fails with
    /// [`PeerError::NotPrivateNetns`] in a namespace holding the kernel's own connector socket.
    pub fn open() -> Result<Self, PeerError> {
        let mut netlink_proc = File::open("/proc/thread-self/net/netlink")
            .map_err(|source| PeerError::Io { op: "open /proc/thread-self/net/netlink", source })?;
        let socks = connector_sockets(&mut netlink_proc)
            .map_err(|source| PeerError::Io { op: "read /proc/thread-self/net/netlink", source })?;
        if socks.iter().any(|&(port, _)| port == 0) {
            return Err(PeerError::NotPrivateNetns);
        }
        let (fd, port) = open_connector_socket(0)?;
        Ok(Self {
            fd,
            port,
            netlink_proc,
            next_seq: 1,
            version: DM_ULOG_REQUEST_VERSION,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            outstanding: HashMap::new(),
            ready: VecDeque::new(),
            unmatched: Vec::new(),
            ignored: HashSet::new(),
            buf: vec![0u8; RECV_BUF],
        })
    }

    /// The harness's port id: what the agent must accept (`--accept-peer-port`).
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Sets the version requests carry unless they say otherwise (default 3).
    pub fn set_version(&mut self, v: u32) {
        self.version = v;
    }

    /// Sets the timeout of [`call`](Self::call) (default 5 s).
    pub fn set_call_timeout(&mut self, t: Duration) {
        self.call_timeout = t;
    }

    /// Sets the next sequence number (to test wrap-around); it increments, wrapping, per request.
    pub fn set_next_seq(&mut self, seq: u32) {
        self.next_seq = seq;
    }

    /// Allocates a sequence number, as `dm_ulog_seq++` does.
    pub fn next_seq(&mut self) -> u32 {
        let s = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        s
    }

    /// Sockets in this namespace subscribed to connector group 7 (the harness's own excluded).
    /// Zero means the kernel's send would fail with `-ESRCH`.
    pub fn group_listeners(&mut self) -> io::Result<usize> {
        let me = self.port;
        Ok(connector_sockets(&mut self.netlink_proc)?
            .into_iter()
            .filter(|&(port, groups)| port != me && groups & DM_GROUP_MASK != 0)
            .count())
    }

    /// Sends a request; returns its seq. The reply is collected by [`recv_reply`](Self::recv_reply)
    /// or [`wait_reply`](Self::wait_reply).
    pub fn send(&mut self, req: &Request) -> Result<u32, PeerError> {
        let seq = self.next_seq();
        let d = encode_request(req, seq, req.version.unwrap_or(self.version))?;
        // A reused seq (after wrapping) is no longer one whose reply is to be ignored.
        self.ignored.remove(&seq);
        self.outstanding.insert(
            seq,
            Outstanding { request_type: req.request_type, capacity: req.capacity.resolve(req.request_type) },
        );
        if let Err(e) = send_group(self.fd.as_raw_fd(), &d) {
            self.outstanding.remove(&seq);
            return Err(e);
        }
        Ok(seq)
    }

    /// Sends arbitrary bytes to group 7 (malformed-datagram tests). Nothing is registered: call
    /// [`expect`](Self::expect) for a seq whose reply should be accepted. (A 0-byte datagram is
    /// refused by the kernel with `ENODATA` and never delivered.)
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), PeerError> {
        send_group(self.fd.as_raw_fd(), bytes)
    }

    /// Registers `seq` as outstanding (after [`send_raw`](Self::send_raw)): a full reply with that
    /// ulog seq, or an ack-only reply with that cn_msg.seq, will be matched.
    pub fn expect(&mut self, seq: u32, request_type: u32, capacity: Capacity) {
        self.ignored.remove(&seq);
        self.outstanding.insert(seq, Outstanding { request_type, capacity: capacity.resolve(request_type) });
    }

    /// Forgets an outstanding seq; a reply to it is then silently dropped (not "unmatched").
    pub fn forget(&mut self, seq: u32) {
        self.outstanding.remove(&seq);
        self.ignored.insert(seq);
    }

    /// Seqs sent and not answered yet.
    pub fn outstanding(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.outstanding.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Replies that matched no outstanding seq (the kernel drops those silently), emptied.
    pub fn take_unmatched(&mut self) -> Vec<Reply> {
        std::mem::take(&mut self.unmatched)
    }

    fn timeout_error(&mut self, waited: Duration) -> PeerError {
        let listeners = match self.group_listeners() {
            Ok(n) => n.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        PeerError::Timeout { waited, outstanding: self.outstanding(), listeners }
    }

    /// Receives and classifies one datagram. `Ok(None)` on timeout or after an ignored or
    /// unmatched reply.
    fn receive(&mut self, timeout: Duration) -> Result<Option<Reply>, PeerError> {
        let Some((n, from_port, _groups)) = recv_one(self.fd.as_raw_fd(), &mut self.buf, timeout)? else {
            return Ok(None);
        };
        let d = &self.buf[..n.min(self.buf.len())];
        let malformed = |reason: String| PeerError::Malformed { reason, from_port, len: n, hex: hex(d) };
        if n > self.buf.len() {
            return Err(malformed(format!("datagram of {n} bytes, larger than any connector message")));
        }
        let parsed = parse_datagram(d).map_err(malformed)?;
        let (seq, form, nl, cn, header, payload) = match parsed {
            Parsed::Incomplete { cn, .. } => {
                return Err(PeerError::Incomplete { cn_seq: cn.seq, cn_len: cn.len, from_port })
            }
            Parsed::AckOnly { nl, cn } => (cn.seq, ReplyForm::AckOnly, nl, cn, None, Vec::new()),
            Parsed::Full { nl, cn, header, payload } => (header.seq, ReplyForm::Full, nl, cn, Some(header), payload),
        };
        if self.ignored.remove(&seq) {
            return Ok(None);
        }
        let out = self.outstanding.remove(&seq);
        let mut reply = Reply {
            seq,
            form,
            error: 0,
            payload: Vec::new(),
            header,
            cn,
            nl,
            from_port,
            datagram_len: n,
            request_type: out.map(|o| o.request_type),
        };
        match (form, header) {
            (ReplyForm::AckOnly, _) => reply.error = -(cn.ack as i32),
            (ReplyForm::Full, Some(h)) => {
                let cap = out.and_then(|o| o.capacity);
                if cap.is_some_and(|c| payload.len() > c) {
                    reply.error = -libc::ENOSPC;
                } else {
                    reply.error = h.error;
                    reply.payload = payload;
                }
            }
            (ReplyForm::Full, None) => unreachable!("full replies carry a header"),
        }
        if out.is_none() {
            if form == ReplyForm::Full {
                // Keep what was sent, for the report.
                if let Parsed::Full { payload, .. } = parse_datagram(d).expect("parsed above") {
                    reply.payload = payload;
                }
            }
            self.unmatched.push(reply);
            return Ok(None);
        }
        Ok(Some(reply))
    }

    /// The next reply to any outstanding request, waiting up to `timeout`. Replies that match
    /// nothing are set aside ([`take_unmatched`](Self::take_unmatched)) and waiting goes on;
    /// a datagram the kernel would drop as malformed, or an incomplete one, is an error.
    pub fn recv_reply(&mut self, timeout: Duration) -> Result<Reply, PeerError> {
        if let Some(r) = self.ready.pop_front() {
            return Ok(r);
        }
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(r) = self.receive(left)? {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(start.elapsed()));
            }
        }
    }

    /// The reply to `seq`, waiting up to `timeout`; replies to other seqs received meanwhile are
    /// kept for later [`recv_reply`](Self::recv_reply)/`wait_reply` calls.
    pub fn wait_reply(&mut self, seq: u32, timeout: Duration) -> Result<Reply, PeerError> {
        if let Some(i) = self.ready.iter().position(|r| r.seq == seq) {
            return Ok(self.ready.remove(i).expect("index found"));
        }
        let start = Instant::now();
        let deadline = start + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.receive(left)? {
                Some(r) if r.seq == seq => return Ok(r),
                Some(r) => self.ready.push_back(r),
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(start.elapsed()));
            }
        }
    }

    /// Sends `req` and waits for its reply (the call timeout, default 5 s).
    pub fn call_request(&mut self, req: &Request) -> Result<Reply, PeerError> {
        let seq = self.send(req)?;
        let t = self.call_timeout;
        self.wait_reply(seq, t)
    }

    /// Sends a request of type `kind` and waits for its reply.
    pub fn call(&mut self, kind: RequestType, uuid: &str, luid: u64, payload: &[u8]) -> Result<Reply, PeerError> {
        self.call_request(&Request::new(kind, uuid, luid, payload))
    }

    /// Succeeds if nothing at all arrives within `quiet` and no unmatched reply was set aside
    /// before; otherwise describes what came.
    pub fn assert_silent(&mut self, quiet: Duration) -> Result<(), PeerError> {
        let mut seen: Vec<String> = self.ready.drain(..).map(|r| format!("early {r}")).collect();
        seen.extend(self.unmatched.drain(..).map(|r| format!("unmatched {r}")));
        let deadline = Instant::now() + quiet;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.receive(left) {
                Ok(Some(r)) => seen.push(format!("{r}")),
                Ok(None) => seen.extend(self.unmatched.drain(..).map(|r| format!("unmatched {r}"))),
                Err(e) => seen.push(e.to_string()),
            }
        }
        if seen.is_empty() {
            Ok(())
        } else {
            Err(PeerError::Unexpected(seen.join("; ")))
        }
    }
}

/// A plain group-7 subscriber (what a server does): sees every request multicast in its
/// namespace. Used to play a fake server in the harness's own tests, and to check that the agent
/// never multicasts its replies.
pub struct GroupListener {
    fd: OwnedFd,
    port: u32,
    buf: Vec<u8>,
}

/// One datagram received by a [`GroupListener`].
#[derive(Clone, Debug)]
pub struct Datagram {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Sender port.
    pub from_port: u32,
    /// Group mask it was sent to (0 = unicast).
    pub groups: u32,
}

impl GroupListener {
    /// Opens a socket subscribed to connector group 7.
    pub fn open() -> Result<Self, PeerError> {
        let (fd, port) = open_connector_socket(DM_GROUP_MASK)?;
        Ok(Self { fd, port, buf: vec![0u8; RECV_BUF] })
    }

    /// Its port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// The next datagram within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Option<Datagram>, PeerError> {
        Ok(recv_one(self.fd.as_raw_fd(), &mut self.buf, timeout)?.map(|(n, from_port, groups)| Datagram {
            bytes: self.buf[..n.min(self.buf.len())].to_vec(),
            from_port,
            groups,
        }))
    }

    /// Unicasts `bytes` to `port`.
    pub fn send_to(&self, port: u32, bytes: &[u8]) -> Result<(), PeerError> {
        send_to(self.fd.as_raw_fd(), bytes, port, 0)
    }
}

static SPAWNED: AtomicU64 = AtomicU64::new(0);

/// The agent binary running in the current thread's (private) namespace, its output captured.
/// Dropping it kills it (SIGKILL) and, if the thread is panicking, prints its output.
pub struct AgentProcess {
    child: Child,
    status: Option<ExitStatus>,
    output_path: PathBuf,
    keep_output: bool,
    run_dir: PathBuf,
    /// With [`AgentOutput::UnreadStderrPipe`]: the pipe's read end, held open and never read.
    _unread_stderr: Option<ChildStderr>,
}

/// Where the agent's stderr goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentOutput {
    /// With stdout, into the output file ([`AgentProcess::output`]).
    File,
    /// Into a pipe that nobody reads (to see the agent with a stalled log consumer).
    UnreadStderrPipe,
}

impl fmt::Debug for AgentProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentProcess").field("pid", &self.child.id()).field("output", &self.output_path).finish()
    }
}

impl AgentProcess {
    /// Starts `exe -f --accept-peer-port <peer_port> <extra…>` (without `ULOG_STATE_DIR` in its
    /// environment, with a run directory of its own in `ULOG_RUN_DIR`) with stdout and stderr
    /// going to a temporary file. Set `ULOG_KEEP_AGENT_OUTPUT=1` to keep those files.
    pub fn spawn<I, S>(exe: impl AsRef<Path>, peer_port: u32, extra: I) -> Result<Self, PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_with(&[], exe, peer_port, extra, AgentOutput::File)
    }

    /// [`spawn`](Self::spawn) under a `wrapper` command (e.g. `setpriv … --`, which then runs
    /// `exe …`), with stderr going to `output`.
    pub fn spawn_with<I, S>(
        wrapper: &[&str],
        exe: impl AsRef<Path>,
        peer_port: u32,
        extra: I,
        output: AgentOutput,
    ) -> Result<Self, PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let n = SPAWNED.fetch_add(1, Ordering::Relaxed);
        let output_path = std::env::temp_dir().join(format!("ulog-agent-{}-{n}.log", std::process::id()));
        // One run directory (pid file) per agent: tests run agents in parallel, each in its own
        // network namespace but all on the same filesystem.
        let run_dir = std::env::temp_dir().join(format!("ulog-run-{}-{n}", std::process::id()));
        let out = File::create(&output_path).map_err(|source| PeerError::Io { op: "create agent log file", source })?;
        let err = match output {
            AgentOutput::File => {
                Stdio::from(out.try_clone().map_err(|source| PeerError::Io { op: "dup agent log file", source })?)
            }
            AgentOutput::UnreadStderrPipe => Stdio::piped(),
        };
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(exe.as_ref());
                c
            }
            None => Command::new(exe.as_ref()),
        };
        let mut child = cmd
            .arg("-f")
            .arg("--accept-peer-port")
            .arg(peer_port.to_string())
            .args(extra)
            // Only what the caller passes: a state directory from the environment would make
            // "no --state-dir" tests persistent.
            .env_remove("ULOG_STATE_DIR")
            .env("ULOG_RUN_DIR", &run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(err)
            .spawn()
            .map_err(|source| PeerError::Io { op: "spawn the agent", source })?;
        let unread_stderr = child.stderr.take();
        Ok(Self {
            child,
            status: None,
            output_path,
            keep_output: std::env::var_os("ULOG_KEEP_AGENT_OUTPUT").is_some(),
            run_dir,
            _unread_stderr: unread_stderr,
        })
    }

    /// Its run directory (`ULOG_RUN_DIR`: the pid file `ulog-agent stop` reads).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Spawns and waits until it serves ([`wait_ready`](Self::wait_ready), 10 s).
    pub fn spawn_ready<I, S>(exe: impl AsRef<Path>, peer: &mut KernelPeer, extra: I) -> Result<Self, PeerError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut a = Self::spawn(exe, peer.port(), extra)?;
        a.wait_ready(peer, DEFAULT_READY_TIMEOUT)?;
        Ok(a)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its captured stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output_path).unwrap_or_else(|e| format!("(unreadable: {e})\n"))
    }

    /// Its output once `done` holds for it, or as it is after `timeout`. The agent logs through
    /// a writer thread (logging never blocks the request path), so a line may reach the file
    /// after the request that caused it was answered.
    pub fn output_when(&self, done: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            let out = self.output();
            if done(&out) || start.elapsed() >= timeout {
                return out;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn agent_error(&self, msg: String) -> PeerError {
        PeerError::Agent { msg, output: self.output(), path: self.output_path.display().to_string() }
    }

    /// `Some(status)` once it has exited.
    pub fn try_exited(&mut self) -> Result<Option<ExitStatus>, PeerError> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|source| PeerError::Io { op: "waitpid(agent)", source })?;
        }
        Ok(self.status)
    }

    /// Probes with GET_REGION_SIZE of a log that does not exist until an answer arrives (it must
    /// be -EINVAL), re-sending every 100 ms (requests multicast before the agent subscribed are
    /// lost). Probes left unanswered are forgotten, so their late replies are not "unmatched".
    pub fn wait_ready(&mut self, peer: &mut KernelPeer, timeout: Duration) -> Result<(), PeerError> {
        let start = Instant::now();
        let mut probes = Vec::new();
        let result = loop {
            if let Some(st) = self.try_exited()? {
                break Err(self.agent_error(format!("exited with {st} before it answered a request")));
            }
            if start.elapsed() >= timeout {
                let listeners = peer.group_listeners().map(|n| n.to_string()).unwrap_or_else(|e| e.to_string());
                break Err(self.agent_error(format!(
                    "no answer to a probe within {timeout:?} (group-7 listeners in the namespace: {listeners})"
                )));
            }
            let req = Request::new(RequestType::GetRegionSize, READY_PROBE_UUID, 1, Vec::new());
            probes.push(peer.send(&req)?);
            let slice_end = Instant::now() + Duration::from_millis(100);
            let mut answer = None;
            while answer.is_none() {
                let left = slice_end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match peer.receive(left)? {
                    Some(r) if probes.contains(&r.seq) => answer = Some(r),
                    Some(r) => peer.ready.push_back(r),
                    None => {}
                }
            }
            if let Some(r) = answer {
                probes.retain(|&s| s != r.seq);
                if r.error == -libc::EINVAL {
                    break Ok(());
                }
                break Err(self.agent_error(format!(
                    "readiness probe (GET_REGION_SIZE of an unknown log) answered {r}, expected -EINVAL"
                )));
            }
        };
        for s in probes {
            peer.forget(s);
        }
        result
    }

    fn signal(&mut self, sig: libc::c_int) -> Result<(), PeerError> {
        if self.try_exited()?.is_some() {
            return Ok(());
        }
        // SAFETY: plain syscall on our own, not yet reaped child.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, sig) } != 0 {
            return Err(io_err("kill(agent)"));
        }
        Ok(())
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, PeerError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exited()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(self.agent_error(format!("still running {timeout:?} later")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL, then reap it.
    pub fn kill9(&mut self) -> Result<ExitStatus, PeerError> {
        self.signal(libc::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10))
    }

    /// SIGTERM, then wait up to `timeout` for it to exit. The agent exits on SIGTERM only when
    /// it knows no log (see `crate::process::shutdown`); otherwise this times out.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus, PeerError> {
        self.signal(libc::SIGTERM)?;
        self.wait_exit(timeout)
    }

    /// SIGTERM, which an agent with live logs must refuse: it must still run `settle` later.
    pub fn terminate_refused(&mut self, settle: Duration) -> Result<(), PeerError> {
        self.signal(libc::SIGTERM)?;
        std::thread::sleep(settle);
        match self.try_exited()? {
            Some(st) => Err(self.agent_error(format!("exited with {st} on SIGTERM although logs were live"))),
            None => Ok(()),
        }
    }

    /// The restart-style exit (the restart signal of `crate::process::shutdown`: flush every log, exit 0
    /// whatever is live), then wait up to `timeout` for it to exit.
    pub fn restart_exit(&mut self, timeout: Duration) -> Result<ExitStatus, PeerError> {
        self.signal(crate::process::shutdown::restart_signal())?;
        self.wait_exit(timeout)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if !matches!(self.try_exited(), Ok(Some(_))) {
            let _ = self.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- agent pid {} output ({}) ---\n{}--- end of agent output ---",
                self.child.id(),
                self.output_path.display(),
                self.output()
            );
        }
        if !self.keep_output {
            let _ = std::fs::remove_file(&self.output_path);
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

#[cfg(test)]
mod tests {
    //! The harness against a fake server played by a [`GroupListener`] in a private namespace.
    use super::*;

    const UUID: &str = "LVM-cmirrortest0001";
    const LUID: u64 = 0xffff_8880_03a1_b000;
    const T: Duration = Duration::from_secs(2);

    fn setup() -> (KernelPeer, GroupListener) {
        enter_private_netns().expect("these tests need root");
        let peer = KernelPeer::open().unwrap();
        let server = GroupListener::open().unwrap();
        (peer, server)
    }

    /// A full reply to request datagram `req`: its header echoed, with `error` and `payload`.
    fn full_reply(req: &[u8], error: i32, payload: &[u8]) -> Vec<u8> {
        let mut h = DmUlogRequest::read(&req[ULOG_OFFSET..]).unwrap();
        h.error = error;
        h.data_size = payload.len() as u32;
        let cn_len = ULOG_REQUEST_LEN + payload.len();
        let mut d = vec![0u8; ULOG_OFFSET + cn_len];
        NlMsgHdr { len: d.len() as u32, kind: NLMSG_DONE, flags: 0, seq: 0, pid: 0 }.write(&mut d);
        let cn_seq = CnMsg::read(&req[NLMSG_HDRLEN..]).unwrap().seq;
        CnMsg { id: DM_ULOG_CB_ID, seq: cn_seq, ack: 0, len: cn_len as u16, flags: 0 }.write(&mut d[NLMSG_HDRLEN..]);
        h.write(&mut d[ULOG_OFFSET..]);
        d[ULOG_OFFSET + ULOG_REQUEST_LEN..].copy_from_slice(payload);
        d
    }

    fn ack_reply(cn_seq: u32, ack: u32, cn_len: u16) -> Vec<u8> {
        let mut d = vec![0u8; ULOG_OFFSET + cn_len as usize];
        NlMsgHdr { len: d.len() as u32, kind: NLMSG_DONE, flags: 0, seq: 0, pid: 0 }.write(&mut d);
        CnMsg { id: DM_ULOG_CB_ID, seq: cn_seq, ack, len: cn_len, flags: 0 }.write(&mut d[NLMSG_HDRLEN..]);
        d
    }

    fn serve_one(server: &mut GroupListener) -> Datagram {
        server.recv(T).unwrap().expect("the fake server got no request")
    }

    #[test]
    fn encodes_the_protocol_vector_with_kernel_padding() {
        // protocol.md §7.1: CTR, seq 1, version 2, 27-byte payload; nlmsg_len 223, and the
        // datagram padded to 224 as nlmsg_put() does.
        let req = Request::ctr(UUID, LUID, "2097152 clustered-core 1024");
        let d = encode_request(&req, 1, 2).unwrap();
        assert_eq!(d.len(), 224);
        let expect: [u8; 36] = [
            0xdf, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xbb, 0,
            0, 0,
        ];
        assert_eq!(&d[..36], &expect);
        assert_eq!(&d[36..44], &[0x00, 0xb0, 0xa1, 0x03, 0x80, 0x88, 0xff, 0xff]);
        assert_eq!(&d[36 + 140..36 + 160], &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x1b, 0, 0, 0]);
        assert_eq!(&d[196..223], b"2097152 clustered-core 1024");
        assert_eq!(d[223], 0);
        // Reconnect form: NUL counted.
        let r = Request::ctr_reconnect(UUID, LUID, "2097152 clustered-core 1024");
        assert_eq!(r.payload.len(), 28);
        assert_eq!(r.capacity, Capacity::Bytes(0));
        assert!(encode_request(&Request::new(RequestType::Dtr, &"u".repeat(129), 1, vec![]), 1, 3).is_err());
    }

    #[test]
    fn parse_datagram_applies_the_connector_checks() {
        let req = encode_request(&Request::new(RequestType::InSync, UUID, LUID, 5u64.to_ne_bytes()), 9, 3).unwrap();
        let good = full_reply(&req, 0, &1i64.to_ne_bytes());
        assert!(matches!(parse_datagram(&good), Ok(Parsed::Full { ref payload, .. }) if payload.len() == 8));
        // Trailing padding after nlmsg_len is fine (the kernel checks skb->len >= nlmsg_len).
        let mut padded = good.clone();
        padded.extend_from_slice(&[0, 0, 0]);
        assert!(parse_datagram(&padded).is_ok());
        assert!(parse_datagram(&good[..15]).is_err(), "shorter than nlmsghdr");
        let mut big_nl = good.clone();
        big_nl[0..4].copy_from_slice(&(good.len() as u32 + 1).to_ne_bytes());
        assert!(parse_datagram(&big_nl).unwrap_err().contains("> datagram"));
        let mut small_nl = good.clone();
        small_nl[0..4].copy_from_slice(&30u32.to_ne_bytes());
        assert!(parse_datagram(&small_nl).is_err());
        let mut cn_over = good.clone();
        cn_over[32..34].copy_from_slice(&(168u16 + 4).to_ne_bytes());
        assert!(parse_datagram(&cn_over).unwrap_err().contains("cn_msg.len"));
        let mut wrong_id = good.clone();
        wrong_id[20..24].copy_from_slice(&2u32.to_ne_bytes());
        assert!(parse_datagram(&wrong_id).unwrap_err().contains("connector id"));
        let mut ds_over = good.clone();
        ds_over[ULOG_OFFSET + 156..ULOG_OFFSET + 160].copy_from_slice(&9u32.to_ne_bytes());
        assert!(parse_datagram(&ds_over).unwrap_err().contains("data_size"));
        assert!(matches!(parse_datagram(&ack_reply(9, 22, 0)), Ok(Parsed::AckOnly { .. })));
        assert!(matches!(parse_datagram(&ack_reply(9, 0, 100)), Ok(Parsed::Incomplete { .. })));
    }

    #[test]
    fn multicast_is_delivered_although_sendto_reports_econnrefused() {
        let (mut peer, mut server) = setup();
        assert_eq!(peer.group_listeners().unwrap(), 1);
        // The raw send really fails with ECONNREFUSED in a private namespace...
        let d = encode_request(&Request::new(RequestType::GetRegionSize, UUID, LUID, vec![]), 77, 3).unwrap();
        let sa = nl_addr(0, DM_GROUP_MASK);
        // SAFETY: valid fd, buffer, address.
        let r = unsafe {
            libc::sendto(
                peer.fd.as_raw_fd(),
                d.as_ptr() as *const libc::c_void,
                d.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        assert_eq!(r, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::ECONNREFUSED));
        // ...and the datagram arrived anyway, from the peer's port, to group 7.
        let got = serve_one(&mut server);
        assert_eq!(got.bytes, d);
        assert_eq!(got.from_port, peer.port());
        assert_eq!(got.groups, DM_GROUP_MASK);
        // send() treats that as success.
        let seq = peer.send(&Request::new(RequestType::GetRegionSize, UUID, LUID, vec![])).unwrap();
        let got = serve_one(&mut server);
        assert_eq!(DmUlogRequest::read(&got.bytes[ULOG_OFFSET..]).unwrap().seq, seq);
        assert_eq!(CnMsg::read(&got.bytes[NLMSG_HDRLEN..]).unwrap().seq, seq);
        assert_eq!(NlMsgHdr::read(&got.bytes).unwrap().seq, seq);
        drop(server);
        assert_eq!(peer.group_listeners().unwrap(), 0);
    }

    #[test]
    fn open_refuses_the_namespace_of_the_kernel_connector() {
        // Only meaningful where this thread (not moved) sees the kernel's connector socket.
        let mut f = File::open("/proc/thread-self/net/netlink").unwrap();
        if connector_sockets(&mut f).unwrap().iter().any(|&(p, _)| p == 0) {
            assert!(matches!(KernelPeer::open(), Err(PeerError::NotPrivateNetns)));
        }
    }

    #[test]
    fn full_replies_match_by_ulog_seq_and_respect_capacity() {
        let (mut peer, mut server) = setup();
        // Two in flight, answered in reverse order.
        let a = peer.send(&Request::new(RequestType::GetRegionSize, UUID, LUID, vec![])).unwrap();
        let b = peer.send(&Request::new(RequestType::InSync, UUID, LUID, 3u64.to_ne_bytes())).unwrap();
        let ra = serve_one(&mut server);
        let rb = serve_one(&mut server);
        let mut reply_b = full_reply(&rb.bytes, 0, &1i64.to_ne_bytes());
        reply_b[16 + 8..16 + 12].copy_from_slice(&0u32.to_ne_bytes()); // cn_msg.seq is ignored
        server.send_to(peer.port(), &reply_b).unwrap();
        server.send_to(peer.port(), &full_reply(&ra.bytes, 0, &1024u64.to_ne_bytes())).unwrap();
        let r = peer.wait_reply(a, T).unwrap();
        assert_eq!((r.form, r.error, r.payload.clone()), (ReplyForm::Full, 0, 1024u64.to_ne_bytes().to_vec()));
        assert_eq!(r.from_port, server.port());
        assert_eq!(r.request_type, Some(RequestType::GetRegionSize.raw()));
        let r = peer.recv_reply(T).unwrap();
        assert_eq!((r.seq, r.error), (b, 0));
        assert_eq!(r.header.unwrap().luid, LUID);
        // Errors pass through; payload too big for the type -> -ENOSPC and no payload.
        let c = peer.send(&Request::new(RequestType::Flush, UUID, LUID, vec![])).unwrap();
        let rc = serve_one(&mut server);
        server.send_to(peer.port(), &full_reply(&rc.bytes, 0, &[0u8; 8])).unwrap();
        let r = peer.wait_reply(c, T).unwrap();
        assert_eq!((r.error, r.payload.len()), (-libc::ENOSPC, 0));
        assert_eq!(r.header.unwrap().data_size, 8);
        let d = peer.send(&Request::new(RequestType::Dtr, UUID, LUID, vec![])).unwrap();
        let rd = serve_one(&mut server);
        server.send_to(peer.port(), &full_reply(&rd.bytes, -libc::EINVAL, &[])).unwrap();
        let r = peer.wait_reply(d, T).unwrap();
        assert_eq!(r.error, -libc::EINVAL);
        assert!(r.ok().is_err());
        // The reconnect CTR accepts no payload; the initial one accepts a device name.
        let e = peer.send(&Request::ctr_reconnect(UUID, LUID, "100 clustered-disk /dev/loop2 8")).unwrap();
        let re = serve_one(&mut server);
        server.send_to(peer.port(), &full_reply(&re.bytes, 0, b"/dev/loop2\0")).unwrap();
        assert_eq!(peer.wait_reply(e, T).unwrap().error, -libc::ENOSPC);
        let f = peer.send(&Request::ctr(UUID, LUID, "100 clustered-disk /dev/loop2 8")).unwrap();
        let rf = serve_one(&mut server);
        server.send_to(peer.port(), &full_reply(&rf.bytes, 0, b"/dev/loop2\0")).unwrap();
        assert_eq!(peer.wait_reply(f, T).unwrap().payload, b"/dev/loop2\0");
        peer.assert_silent(Duration::from_millis(50)).unwrap();
    }

    #[test]
    fn ack_only_replies_match_by_cn_seq_and_negate_ack() {
        let (mut peer, mut server) = setup();
        let a = peer.send(&Request::new(RequestType::ClearRegion, UUID, LUID, 5u64.to_ne_bytes())).unwrap();
        serve_one(&mut server);
        server.send_to(peer.port(), &ack_reply(a, libc::EAGAIN as u32, 0)).unwrap();
        let r = peer.wait_reply(a, T).unwrap();
        assert_eq!((r.form, r.error, r.header.is_none()), (ReplyForm::AckOnly, -libc::EAGAIN, true));
        // A raw (malformed) request registered by its cn seq.
        let seq = peer.next_seq();
        peer.send_raw(&ack_reply(seq, 0, 0)).unwrap();
        peer.expect(seq, 0, Capacity::Unbounded);
        serve_one(&mut server);
        server.send_to(peer.port(), &ack_reply(seq, libc::EINVAL as u32, 0)).unwrap();
        assert_eq!(peer.recv_reply(T).unwrap().error, -libc::EINVAL);
    }

    #[test]
    fn incomplete_malformed_and_unmatched_replies_are_reported() {
        let (mut peer, mut server) = setup();
        let a = peer.send(&Request::new(RequestType::GetSyncCount, UUID, LUID, vec![])).unwrap();
        let ra = serve_one(&mut server);
        server.send_to(peer.port(), &ack_reply(a, 0, 100)).unwrap();
        assert!(matches!(peer.recv_reply(T), Err(PeerError::Incomplete { cn_len: 100, .. })));
        let mut bad = full_reply(&ra.bytes, 0, &7u64.to_ne_bytes());
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        server.send_to(peer.port(), &bad).unwrap();
        assert!(matches!(peer.recv_reply(T), Err(PeerError::Malformed { .. })));
        // A reply for a seq nobody waits for is set aside; the real one is still matched.
        let mut other = full_reply(&ra.bytes, 0, &7u64.to_ne_bytes());
        other[ULOG_OFFSET + 148..ULOG_OFFSET + 152].copy_from_slice(&(a + 1000).to_ne_bytes());
        server.send_to(peer.port(), &other).unwrap();
        server.send_to(peer.port(), &full_reply(&ra.bytes, 0, &7u64.to_ne_bytes())).unwrap();
        assert_eq!(peer.wait_reply(a, T).unwrap().payload, 7u64.to_ne_bytes());
        let un = peer.take_unmatched();
        assert_eq!(un.len(), 1);
        assert_eq!(un[0].seq, a + 1000);
        assert_eq!(un[0].request_type, None);
        // A second answer to an answered seq is unmatched too, and assert_silent reports it.
        server.send_to(peer.port(), &full_reply(&ra.bytes, 0, &7u64.to_ne_bytes())).unwrap();
        assert!(matches!(peer.assert_silent(Duration::from_millis(200)), Err(PeerError::Unexpected(_))));
        // Timeouts say how many group-7 listeners there are.
        peer.set_call_timeout(Duration::from_millis(50));
        drop(server);
        match peer.call(RequestType::GetSyncCount, UUID, LUID, &[]) {
            Err(PeerError::Timeout { listeners, .. }) => assert_eq!(listeners, "0"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    #[test]
    fn seqs_wrap_like_the_kernel_counter() {
        let (mut peer, mut server) = setup();
        peer.set_next_seq(u32::MAX);
        let a = peer.send(&Request::new(RequestType::GetRegionSize, UUID, LUID, vec![])).unwrap();
        let b = peer.send(&Request::new(RequestType::GetRegionSize, UUID, LUID, vec![])).unwrap();
        assert_eq!((a, b), (u32::MAX, 0));
        for _ in 0..2 {
            let r = serve_one(&mut server);
            server.send_to(peer.port(), &full_reply(&r.bytes, 0, &8u64.to_ne_bytes())).unwrap();
        }
        assert_eq!(peer.wait_reply(b, T).unwrap().seq, 0);
        assert_eq!(peer.wait_reply(a, T).unwrap().seq, u32::MAX);
    }

    #[test]
    fn agent_process_reports_an_early_exit_with_its_output() {
        enter_private_netns().unwrap();
        let mut peer = KernelPeer::open().unwrap();
        // `sh -f --accept-peer-port N`: sh rejects the option and exits at once.
        let mut a = AgentProcess::spawn("/bin/sh", peer.port(), ["-c", "exit 3"]).unwrap();
        match a.wait_ready(&mut peer, Duration::from_secs(5)) {
            Err(PeerError::Agent { msg, output, .. }) => {
                assert!(msg.contains("exited"), "{msg}");
                assert!(!output.is_empty(), "sh's complaint is captured");
            }
            other => panic!("expected an agent error, got {other:?}"),
        }
        assert!(peer.outstanding().is_empty(), "probes are forgotten");
        let st = a.kill9().unwrap();
        assert!(!st.success());
    }
}
