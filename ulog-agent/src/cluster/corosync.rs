//! The corosync transport of the cluster bus: one thread that owns every corosync handle and
//! runs a [`BusHandler`] (see [`super::bus`]).
//!
//! # Design
//!
//! - **One thread, one owner.** [`spawn`] starts a thread that owns a *control* CPG handle
//!   (node id, atomic message size, liveness), a quorum handle (`trackstart` with changes), and
//!   one CPG handle per joined group: corosync allows one group per CPG connection, and a
//!   per-group connection also makes the group of each callback known without its name (the
//!   crate turns the group name into a C string, which drops the NUL of a cmirrord-style
//!   `uuid\0` name). libcpg sends are not thread-safe; nothing else touches these handles.
//! - **No corosync call from a callback.** The `rust-corosync` callbacks are plain `fn`
//!   pointers, called while the crate holds a global mutex: they only push what they got onto a
//!   thread-local queue. The loop drains it after each `dispatch(All)` returns, turns it into
//!   [`BusEvent`]s of the group whose handle was dispatched, hands them to the handler, and then
//!   carries out what the handler queued on its [`Outbound`] (join, leave, send, in order).
//! - **The loop** polls a wake eventfd (written by [`BusHandle::command`] after it pushed into
//!   an mpsc channel, and when the last handle is dropped), the quorum fd, the control fd and
//!   every group fd, with a timeout that is the earliest of the next tick (`on_tick`), the next
//!   send or join retry and the next reconnect attempt.
//! - **Flow control never reaches the handler.** Sends are a FIFO per group. `CS_ERR_TRY_AGAIN`
//!   keeps the message at the head and retries it after a backoff (1 ms doubling to 50 ms)
//!   while the loop keeps dispatching; `CS_ERR_INTERRUPT` (a fragmented send cut by a
//!   membership change) resends the whole message on the next pass. `cpg_initialize` and
//!   `cpg_join` of a group are retried the same way.
//! - **Losing corosync.** Any other error from dispatch, or a hang-up on one of its fds, means
//!   the local corosync is gone: every handle is finalized, every group and unsent message is
//!   dropped, the handler gets [`BusEvent::Disconnected`], and the thread reconnects with
//!   backoff (100 ms doubling to 2 s), then reports [`BusEvent::Connected`] and
//!   [`BusEvent::Quorum`]. The handler re-joins what it needs. If corosync is not running at
//!   [`spawn`], the thread starts in that state (no event until the first connect).
//! - **Leaving** is `cpg_leave` (the others see reason `Leave`, not `ProcDown`); the group's
//!   handle is finalized when its own leave is delivered back (or after 5 s). Events of a group
//!   after the handler left it are not handed over; a join of the same name waits for the old
//!   handle to be gone.
//! - **One caller at a time per process.** libcpg's handle database is process-wide, and with
//!   several transports in one process (the tests run one per node) making calls at once, a
//!   fresh handle was lost (`ErrBadHandle` from `cpg_fd_get` right after a concurrent
//!   `cpg_initialize` in another thread). Every corosync call is made under one process-wide
//!   lock (`corosync_lock`), never held while the handler runs; with the agent's single
//!   transport it is uncontended.
//! - **Ending:** [`BusHandle::shutdown`] or dropping every [`BusHandle`] makes the thread
//!   leave its groups, finalize its handles and return.
//!
//! # Limits
//!
//! - Operations asked for while disconnected are dropped (the handler re-joins after
//!   [`BusEvent::Connected`]); a send to a group that is not joined or being joined is dropped
//!   with a warning.
//! - Group names must be valid UTF-8 of at most 127 bytes (the crate takes a `&str`); others are
//!   refused with a warning.
//! - `dispatch(All)` drains everything corosync has queued before the loop sends again, so a
//!   node receiving a flood sends in bursts between deliveries.
//! - Quorum is the quorum service's view (`quorum_getquorate` and its notifications); a lost
//!   connection to corosync is reported as [`BusEvent::Disconnected`], which the engine must
//!   treat as no quorum.
//!   Every notification that changes the state is reported, including transient ones: healing
//!   a 1-vs-2 partition, a majority node was measured non-quorate for ~5 ms (a ring of itself)
//!   between the partition's ring and the merged one.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rust_corosync::{cpg, quorum, CsError, DispatchFlags, NodeId as CsNodeId, TrackFlags};
use tracing::{debug, info, warn};

use super::bus::{BusEvent, BusHandler, LeaveReason, Member, Outbound};

/// First retry delay of a send or join that got `CS_ERR_TRY_AGAIN`.
const SEND_BACKOFF_MIN: Duration = Duration::from_millis(1);
/// Cap of the send/join retry delay (1 -> 50 ms kept a 100 k burst flowing under load).
const SEND_BACKOFF_MAX: Duration = Duration::from_millis(50);
/// First reconnect delay after losing corosync.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Cap of the reconnect delay.
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a left group's handle waits for its own leave to be delivered before it is
/// finalized anyway.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest group name libcpg takes (`CPG_MAX_NAME_LENGTH` - 1).
const GROUP_NAME_MAX: usize = 127;

/// The lock every corosync library call of this process is made under (see the module doc).
fn corosync_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// How the transport runs.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// How often the handler's `on_tick` is called (about).
    pub tick: Duration,
    /// The thread's name.
    pub thread_name: String,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self { tick: Duration::from_secs(1), thread_name: "corosync-bus".to_string() }
    }
}

pub use super::bus::{BusStats, BusStatsSnapshot};

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// The transport thread has ended (shut down, or its handler panicked).
#[derive(Debug, thiserror::Error)]
#[error("the corosync transport thread has ended")]
pub struct BusGone;

/// Why a corosync operation of the transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A corosync library call failed.
    #[error("corosync {op}: {err}")]
    Corosync {
        /// The call.
        op: &'static str,
        /// What it returned.
        err: CsError,
    },
    /// libcpg cannot take this group name.
    #[error("group name {0:?} is not valid UTF-8 of at most 127 bytes")]
    GroupName(Vec<u8>),
}

fn cs(op: &'static str) -> impl FnOnce(CsError) -> TransportError {
    move |err| TransportError::Corosync { op, err }
}

/// The eventfd that wakes the transport's poll.
#[derive(Debug)]
struct WakeFd(OwnedFd);

impl WakeFd {
    fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; the returned fd is owned from here on.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer. EAGAIN (counter saturated) means it is
        // already readable, which is all a wake needs.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn drain(&self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer; nonblocking.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// What every [`BusHandle`] clone shares; its drop (the last handle gone) wakes the thread,
/// which then finds the channel closed and ends.
struct Shared<C> {
    tx: mpsc::Sender<C>,
    wake: Arc<WakeFd>,
    stop: Arc<AtomicBool>,
    stats: Arc<BusStats>,
}

impl<C> Drop for Shared<C> {
    fn drop(&mut self) {
        // The sender is dropped right after this, before the thread can look (it reads the
        // channel only after it has seen the wake); a stop flag makes the order irrelevant.
        self.stop.store(true, Ordering::Release);
        self.wake.wake();
    }
}

/// Commands to the transport's handler, from any thread. Clone it freely; when the last clone
/// is dropped, the transport leaves its groups and ends.
pub struct BusHandle<C> {
    shared: Arc<Shared<C>>,
}

impl<C> Clone for BusHandle<C> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl<C> std::fmt::Debug for BusHandle<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusHandle").field("stats", &self.shared.stats.snapshot()).finish()
    }
}

impl<C: Send> BusHandle<C> {
    /// Hand `cmd` to the handler's `on_command` (on the transport thread, in the order sent).
    pub fn command(&self, cmd: C) -> Result<(), BusGone> {
        self.shared.tx.send(cmd).map_err(|_| BusGone)?;
        self.shared.wake.wake();
        Ok(())
    }

    /// End the transport: it leaves its groups, finalizes its handles and returns (join the
    /// thread to wait for it). Commands not yet handled are dropped.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.wake();
    }

    /// The transport's counters.
    pub fn stats(&self) -> &Arc<BusStats> {
        &self.shared.stats
    }
}

/// Start the transport thread with `handler`. The thread inherits the calling thread's network
/// namespace, which decides the corosync it talks to (its IPC sockets are abstract unix
/// sockets). It connects on its own, retrying while corosync is not running.
pub fn spawn<H: BusHandler>(handler: H, cfg: BusConfig) -> io::Result<(BusHandle<H::Command>, JoinHandle<()>)> {
    let wake = Arc::new(WakeFd::new()?);
    let (tx, rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(BusStats::default());
    let shared = Shared { tx, wake: Arc::clone(&wake), stop: Arc::clone(&stop), stats: Arc::clone(&stats) };
    let tick = cfg.tick.max(Duration::from_millis(1));
    let thread = std::thread::Builder::new().name(cfg.thread_name).spawn(move || {
        let mut t = Transport {
            handler,
            rx,
            wake,
            stop,
            stats,
            tick,
            conn: None,
            was_connected: false,
            reconnect_at: Instant::now(),
            reconnect_backoff: RECONNECT_BACKOFF_MIN,
            next_tick: Instant::now() + tick,
        };
        t.run();
    })?;
    Ok((BusHandle { shared: Arc::new(shared) }, thread))
}

// ---- callbacks: queue only ----

/// What a callback got, before it is known which group it belongs to.
enum Raw {
    Deliver { from: Member, data: Vec<u8> },
    Confchg { members: Vec<Member>, left: Vec<(Member, LeaveReason)>, joined: Vec<Member> },
    Quorum { quorate: bool, ring: u64, members: Vec<u32> },
}

thread_local! {
    /// Filled by the callbacks during one `dispatch`, drained by the loop after it returns.
    static RAW: RefCell<Vec<Raw>> = const { RefCell::new(Vec::new()) };
}

fn push_raw(r: Raw) {
    RAW.with(|q| q.borrow_mut().push(r));
}

fn take_raw() -> Vec<Raw> {
    RAW.with(|q| std::mem::take(&mut *q.borrow_mut()))
}

fn member(a: &cpg::Address) -> Member {
    Member { node: u32::from(a.nodeid), pid: a.pid }
}

fn on_deliver(_h: &cpg::Handle, _group: String, node: CsNodeId, pid: u32, msg: &[u8], _len: usize) {
    push_raw(Raw::Deliver { from: Member { node: u32::from(node), pid }, data: msg.to_vec() });
}

fn on_confchg(
    _h: &cpg::Handle,
    _group: &str,
    members: Vec<cpg::Address>,
    left: Vec<cpg::Address>,
    joined: Vec<cpg::Address>,
) {
    let reason = |a: &cpg::Address| match a.reason {
        cpg::Reason::Leave => LeaveReason::Leave,
        cpg::Reason::NodeDown => LeaveReason::NodeDown,
        cpg::Reason::ProcDown => LeaveReason::ProcDown,
        _ => LeaveReason::Other,
    };
    push_raw(Raw::Confchg {
        members: members.iter().map(member).collect(),
        left: left.iter().map(|a| (member(a), reason(a))).collect(),
        joined: joined.iter().map(member).collect(),
    });
}

fn on_quorum(_h: &quorum::Handle, quorate: bool, ring: quorum::RingId, members: Vec<CsNodeId>) {
    push_raw(Raw::Quorum { quorate, ring: ring.seq, members: members.into_iter().map(u32::from).collect() });
}

fn cpg_model() -> cpg::ModelData {
    cpg::ModelData::ModelV1(cpg::Model1Data {
        flags: cpg::Model1Flags::None,
        deliver_fn: Some(on_deliver),
        confchg_fn: Some(on_confchg),
        totem_confchg_fn: None,
    })
}

// ---- the handler's outbound queue ----

enum Op {
    Join(Vec<u8>),
    Leave(Vec<u8>),
    Send(Vec<u8>, Vec<u8>),
}

struct OutQueue {
    ops: Vec<Op>,
    max_atomic: usize,
}

impl Outbound for OutQueue {
    fn join(&mut self, group: &[u8]) {
        self.ops.push(Op::Join(group.to_vec()));
    }
    fn leave(&mut self, group: &[u8]) {
        self.ops.push(Op::Leave(group.to_vec()));
    }
    fn send(&mut self, group: &[u8], data: Vec<u8>) {
        self.ops.push(Op::Send(group.to_vec(), data));
    }
    fn max_atomic(&self) -> usize {
        self.max_atomic
    }
}

// ---- the thread ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupState {
    /// Waiting for `cpg_initialize` + `cpg_join` to succeed.
    Joining,
    /// Joined: sends flow.
    Joined,
    /// The handler left it; `cpg_leave` still to be accepted.
    LeaveRequested,
    /// `cpg_leave` accepted; waiting for our own leave to come back.
    Leaving { since: Instant },
}

struct Group {
    name: Vec<u8>,
    name_str: String,
    handle: Option<cpg::Handle>,
    fd: RawFd,
    state: GroupState,
    queue: VecDeque<Vec<u8>>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Group {
    fn live(&self) -> bool {
        matches!(self.state, GroupState::Joining | GroupState::Joined)
    }

    fn back_off(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(SEND_BACKOFF_MAX);
    }

    fn due(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| now >= t)
    }
}

struct Conn {
    /// Kept for its liveness and for being the connection the node id came from.
    control: cpg::Handle,
    control_fd: RawFd,
    quorum: quorum::Handle,
    quorum_fd: RawFd,
    node: u32,
    pid: u32,
    max_atomic: usize,
    quorate: bool,
    groups: Vec<Group>,
}

impl Conn {
    fn open() -> Result<Conn, TransportError> {
        let control = cpg::initialize(&cpg_model(), 0).map_err(cs("cpg_initialize"))?;
        let control_fd = cpg::fd_get(&control).map_err(cs("cpg_fd_get"))?;
        let node = u32::from(cpg::local_get(&control).map_err(cs("cpg_local_get"))?);
        let max_atomic = cpg::max_atomic_msgsize_get(&control).map_err(cs("cpg_max_atomic_msgsize_get"))? as usize;
        let model = quorum::ModelData::ModelV1(quorum::Model1Data {
            flags: quorum::Model1Flags::None,
            quorum_notification_fn: Some(on_quorum),
            nodelist_notification_fn: None,
        });
        let (quorum, _) = quorum::initialize(&model, 0).map_err(cs("quorum_initialize"))?;
        let quorum_fd = quorum::fd_get(&quorum).map_err(cs("quorum_fd_get"))?;
        quorum::trackstart(&quorum, TrackFlags::Changes).map_err(cs("quorum_trackstart"))?;
        let quorate = quorum::getquorate(&quorum).map_err(cs("quorum_getquorate"))?;
        Ok(Conn {
            control,
            control_fd,
            quorum,
            quorum_fd,
            node,
            pid: std::process::id(),
            max_atomic,
            quorate,
            groups: Vec::new(),
        })
    }

    fn live_group(&mut self, name: &[u8]) -> Option<&mut Group> {
        self.groups.iter_mut().find(|g| g.live() && g.name == name)
    }
}

/// Which handle a poll entry belongs to.
#[derive(Clone, Copy)]
enum Source {
    Wake,
    Quorum,
    Control,
    Group(usize),
}

struct Transport<H: BusHandler> {
    handler: H,
    rx: mpsc::Receiver<H::Command>,
    wake: Arc<WakeFd>,
    stop: Arc<AtomicBool>,
    stats: Arc<BusStats>,
    tick: Duration,
    conn: Option<Conn>,
    was_connected: bool,
    reconnect_at: Instant,
    reconnect_backoff: Duration,
    next_tick: Instant,
}

/// The local corosync is gone (or answered with an error the transport cannot handle).
struct Fatal(TransportError);

impl<H: BusHandler> Transport<H> {
    fn run(&mut self) {
        info!("corosync transport started");
        loop {
            if self.conn.is_none() && Instant::now() >= self.reconnect_at {
                self.connect();
            }
            let progressed = {
                let _lock = corosync_lock();
                self.progress()
            };
            if let Err(Fatal(e)) = progressed {
                self.disconnect(e);
            }
            let (mut fds, sources) = self.poll_set();
            let timeout = self.poll_timeout();
            // SAFETY: `fds` is a live array of `fds.len()` pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "poll failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            self.wake.drain();
            if self.stop.load(Ordering::Acquire) || !self.commands() {
                break;
            }
            let ready: Vec<(Source, i16)> =
                fds.iter().zip(sources).filter(|(p, _)| p.revents != 0).map(|(p, s)| (s, p.revents)).collect();
            if let Err(Fatal(e)) = self.dispatch(&ready) {
                self.disconnect(e);
            }
            // One acknowledgement per batch of deliveries, not per message.
            let mut out = self.out();
            self.handler.on_idle(&mut out);
            self.apply(out.ops);
            if Instant::now() >= self.next_tick {
                self.next_tick = Instant::now() + self.tick;
                let mut out = self.out();
                self.handler.on_tick(&mut out);
                self.apply(out.ops);
            }
        }
        self.finish();
    }

    fn out(&self) -> OutQueue {
        OutQueue { ops: Vec::new(), max_atomic: self.conn.as_ref().map_or(0, |c| c.max_atomic) }
    }

    /// Hand every waiting command to the handler. False when every handle is gone.
    fn commands(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(cmd) => {
                    let mut out = self.out();
                    self.handler.on_command(cmd, &mut out);
                    self.apply(out.ops);
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }

    fn event(&mut self, ev: BusEvent) {
        let mut out = self.out();
        self.handler.on_event(ev, &mut out);
        self.apply(out.ops);
    }

    fn connect(&mut self) {
        let opened = {
            let _lock = corosync_lock();
            Conn::open()
        };
        match opened {
            Ok(conn) => {
                let (node, pid, max_atomic, quorate) = (conn.node, conn.pid, conn.max_atomic, conn.quorate);
                info!(node, max_atomic, quorate, "connected to corosync");
                self.conn = Some(conn);
                if self.was_connected {
                    bump(&self.stats.reconnects);
                }
                self.was_connected = true;
                self.reconnect_backoff = RECONNECT_BACKOFF_MIN;
                self.event(BusEvent::Connected { node, pid, max_atomic });
                self.event(BusEvent::Quorum { quorate });
            }
            Err(e) => {
                debug!(error = %e, retry_in = ?self.reconnect_backoff, "corosync not reachable");
                self.reconnect_at = Instant::now() + self.reconnect_backoff;
                self.reconnect_backoff = (self.reconnect_backoff * 2).min(RECONNECT_BACKOFF_MAX);
            }
        }
    }

    fn disconnect(&mut self, e: TransportError) {
        let Some(conn) = self.conn.take() else { return };
        warn!(error = %e, groups = conn.groups.len(), "lost the local corosync; reconnecting");
        // Dropping the handles finalizes them (locally: the connection is gone).
        {
            let _lock = corosync_lock();
            drop(conn);
        }
        take_raw();
        self.reconnect_at = Instant::now() + self.reconnect_backoff;
        self.reconnect_backoff = (self.reconnect_backoff * 2).min(RECONNECT_BACKOFF_MAX);
        self.event(BusEvent::Disconnected);
    }

    fn apply(&mut self, ops: Vec<Op>) {
        for op in ops {
            let Some(conn) = self.conn.as_mut() else {
                debug!("not connected to corosync: dropping a join, leave or send");
                continue;
            };
            match op {
                Op::Join(name) => {
                    if conn.live_group(&name).is_some() {
                        continue;
                    }
                    let name_str = match std::str::from_utf8(&name) {
                        Ok(s) if s.len() <= GROUP_NAME_MAX => s.to_string(),
                        _ => {
                            warn!(error = %TransportError::GroupName(name.clone()), "join refused");
                            continue;
                        }
                    };
                    conn.groups.push(Group {
                        name,
                        name_str,
                        handle: None,
                        fd: -1,
                        state: GroupState::Joining,
                        queue: VecDeque::new(),
                        retry_at: None,
                        backoff: SEND_BACKOFF_MIN,
                    });
                }
                Op::Leave(name) => {
                    if let Some(g) = conn.live_group(&name) {
                        g.queue.clear();
                        g.retry_at = None;
                        g.backoff = SEND_BACKOFF_MIN;
                        g.state = if g.state == GroupState::Joined {
                            GroupState::LeaveRequested
                        } else {
                            // Never joined: nothing to leave; dropping the handle is enough.
                            GroupState::Leaving { since: Instant::now() - LEAVE_TIMEOUT }
                        };
                    }
                }
                Op::Send(name, data) => match conn.live_group(&name) {
                    Some(g) => g.queue.push_back(data),
                    None => warn!(group = %String::from_utf8_lossy(&name), "send to a group not joined: dropped"),
                },
            }
        }
    }

    /// Retry what is due: group initialize/join, sends, leaves; finalize left groups.
    fn progress(&mut self) -> Result<(), Fatal> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        let now = Instant::now();
        let mut i = 0;
        while i < conn.groups.len() {
            let blocked_by_old = {
                let g = &conn.groups[i];
                g.state == GroupState::Joining && conn.groups[..i].iter().any(|o| o.name == g.name && !o.live())
            };
            let g = &mut conn.groups[i];
            match g.state {
                // A join of a name still being left waits for the old handle to be gone.
                GroupState::Joining if blocked_by_old => g.retry_at = Some(now + Duration::from_millis(10)),
                GroupState::Joining if g.due(now) => join_step(g, &self.stats, now)?,
                GroupState::Joined => send_step(g, &self.stats, now)?,
                GroupState::LeaveRequested if g.due(now) => {
                    let Some(h) = g.handle.as_ref() else {
                        g.state = GroupState::Leaving { since: now - LEAVE_TIMEOUT };
                        continue;
                    };
                    match cpg::leave(h, &g.name_str) {
                        Ok(()) => g.state = GroupState::Leaving { since: now },
                        Err(CsError::CsErrTryAgain) => {
                            bump(&self.stats.try_again);
                            g.back_off(now);
                        }
                        Err(CsError::CsErrLibrary) => return Err(Fatal(cs("cpg_leave")(CsError::CsErrLibrary))),
                        Err(e) => {
                            warn!(group = %g.name_str, error = %e, "cpg_leave failed; finalizing the group's handle");
                            g.state = GroupState::Leaving { since: now - LEAVE_TIMEOUT };
                        }
                    }
                }
                GroupState::Leaving { since } if now.duration_since(since) >= LEAVE_TIMEOUT => {
                    conn.groups.remove(i);
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }

    fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Source>) {
        let pfd = |fd: RawFd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let mut fds = vec![pfd(self.wake.0.as_raw_fd())];
        let mut sources = vec![Source::Wake];
        if let Some(c) = &self.conn {
            fds.push(pfd(c.quorum_fd));
            sources.push(Source::Quorum);
            fds.push(pfd(c.control_fd));
            sources.push(Source::Control);
            for (i, g) in c.groups.iter().enumerate() {
                if g.handle.is_some() && g.fd >= 0 {
                    fds.push(pfd(g.fd));
                    sources.push(Source::Group(i));
                }
            }
        }
        (fds, sources)
    }

    /// Milliseconds until the earliest of: tick, reconnect, a due retry.
    fn poll_timeout(&self) -> i32 {
        let now = Instant::now();
        let mut until = self.next_tick;
        match &self.conn {
            None => until = until.min(self.reconnect_at),
            Some(c) => {
                for g in &c.groups {
                    let waiting = match g.state {
                        GroupState::Joined => !g.queue.is_empty(),
                        GroupState::Joining | GroupState::LeaveRequested => true,
                        GroupState::Leaving { since } => {
                            until = until.min(since + LEAVE_TIMEOUT);
                            false
                        }
                    };
                    if waiting {
                        until = until.min(g.retry_at.unwrap_or(now));
                    }
                }
            }
        }
        let d = until.saturating_duration_since(now);
        // Round up so a 0.3 ms wait does not spin at 0.
        d.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
    }

    fn dispatch(&mut self, ready: &[(Source, i16)]) -> Result<(), Fatal> {
        let Some(conn) = self.conn.as_mut() else { return Ok(()) };
        let hup = libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
        let mut events = Vec::new();
        let mut fatal = None;
        let lock = corosync_lock();
        for &(src, revents) in ready {
            let (res, op) = match src {
                Source::Wake => continue,
                Source::Quorum => (quorum::dispatch(&conn.quorum, DispatchFlags::All), "quorum_dispatch"),
                Source::Control => (cpg::dispatch(&conn.control, DispatchFlags::All), "cpg_dispatch"),
                Source::Group(i) => match conn.groups[i].handle.as_ref() {
                    Some(h) => (cpg::dispatch(h, DispatchFlags::All), "cpg_dispatch"),
                    None => continue,
                },
            };
            let raw = take_raw();
            match res {
                Ok(()) | Err(CsError::CsErrTryAgain) => {}
                Err(e) => {
                    fatal = Some(cs(op)(e));
                }
            }
            if fatal.is_none() && revents & hup != 0 {
                fatal = Some(cs(op)(CsError::CsErrLibrary));
            }
            for r in raw {
                match (r, src) {
                    (Raw::Quorum { quorate: q, ring, members }, _) => {
                        info!(quorate = q, ring, ?members, "quorum notification");
                        if q != conn.quorate {
                            conn.quorate = q;
                            events.push(BusEvent::Quorum { quorate: q });
                        }
                    }
                    (Raw::Deliver { from, data }, Source::Group(i)) if conn.groups[i].live() => {
                        bump(&self.stats.delivered);
                        events.push(BusEvent::Delivered { group: conn.groups[i].name.clone(), from, data });
                    }
                    (Raw::Confchg { members, left, joined }, Source::Group(i)) => {
                        let me = Member { node: conn.node, pid: conn.pid };
                        let g = &mut conn.groups[i];
                        if g.live() {
                            events.push(BusEvent::Membership { group: g.name.clone(), members, left, joined });
                        } else if left.iter().any(|(m, _)| *m == me) {
                            // Our own leave came back: the handle can go.
                            g.state = GroupState::Leaving { since: Instant::now() - LEAVE_TIMEOUT };
                        }
                    }
                    _ => {}
                }
            }
            if fatal.is_some() {
                break;
            }
        }
        drop(lock);
        for ev in events {
            self.event(ev);
        }
        match fatal {
            Some(e) => Err(Fatal(e)),
            None => Ok(()),
        }
    }

    fn finish(&mut self) {
        let _lock = corosync_lock();
        if let Some(conn) = self.conn.take() {
            for g in conn.groups.iter().filter(|g| g.state == GroupState::Joined) {
                if let Some(h) = &g.handle {
                    if let Err(e) = cpg::leave(h, &g.name_str) {
                        debug!(group = %g.name_str, error = %e, "cpg_leave at shutdown failed");
                    }
                }
            }
            drop(conn);
        }
        take_raw();
        info!("corosync transport ended");
    }
}

/// `cpg_initialize` (a connection of the group's own) and `cpg_join`, retried on TRY_AGAIN.
fn join_step(g: &mut Group, stats: &BusStats, now: Instant) -> Result<(), Fatal> {
    if g.handle.is_none() {
        match cpg::initialize(&cpg_model(), 0) {
            Ok(h) => match cpg::fd_get(&h) {
                Ok(fd) => {
                    g.fd = fd;
                    g.handle = Some(h);
                }
                Err(e) => return Err(Fatal(cs("cpg_fd_get")(e))),
            },
            Err(CsError::CsErrTryAgain) => {
                bump(&stats.try_again);
                g.back_off(now);
                return Ok(());
            }
            Err(e) => return Err(Fatal(cs("cpg_initialize")(e))),
        }
    }
    let Some(h) = g.handle.as_ref() else { return Ok(()) };
    match cpg::join(h, &g.name_str) {
        Ok(()) => {
            debug!(group = %g.name_str, "joined");
            g.state = GroupState::Joined;
            g.retry_at = None;
            g.backoff = SEND_BACKOFF_MIN;
            Ok(())
        }
        Err(CsError::CsErrTryAgain) => {
            bump(&stats.try_again);
            g.back_off(now);
            Ok(())
        }
        Err(CsError::CsErrLibrary) => Err(Fatal(cs("cpg_join")(CsError::CsErrLibrary))),
        Err(e) => {
            // Not a lost connection: this group cannot be joined (e.g. too many groups).
            warn!(group = %g.name_str, error = %e, "cpg_join failed; the group is dropped");
            g.queue.clear();
            g.state = GroupState::Leaving { since: now - LEAVE_TIMEOUT };
            Ok(())
        }
    }
}

/// Send the group's queue in order until it is empty or corosync pushes back.
fn send_step(g: &mut Group, stats: &BusStats, now: Instant) -> Result<(), Fatal> {
    if !g.due(now) {
        return Ok(());
    }
    let Some(h) = g.handle.as_ref() else { return Ok(()) };
    while let Some(msg) = g.queue.front() {
        match cpg::mcast_joined(h, cpg::Guarantee::TypeAgreed, msg) {
            Ok(()) => {
                bump(&stats.sent);
                g.queue.pop_front();
                g.retry_at = None;
                g.backoff = SEND_BACKOFF_MIN;
            }
            Err(CsError::CsErrTryAgain) => {
                bump(&stats.try_again);
                g.back_off(now);
                return Ok(());
            }
            Err(CsError::CsErrInterrupt) => {
                // A fragmented send cut by a membership change: the receivers dropped the part
                // they got; send it whole again after the next dispatch.
                bump(&stats.interrupts);
                g.retry_at = Some(now);
                return Ok(());
            }
            Err(e @ (CsError::CsErrLibrary | CsError::CsErrBadHandle)) => return Err(Fatal(cs("cpg_mcast_joined")(e))),
            Err(e) => {
                // This message cannot be sent (e.g. too big); the connection is fine.
                warn!(group = %g.name_str, error = %e, len = msg.len(), "cpg_mcast_joined refused a message: dropped");
                g.queue.pop_front();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts ticks and commands; no corosync needed.
    struct Counter(mpsc::Sender<&'static str>);

    impl BusHandler for Counter {
        type Command = ();
        fn on_command(&mut self, _cmd: (), out: &mut dyn Outbound) {
            // Not connected: these are dropped, never fatal.
            out.join(b"g\0");
            out.send(b"g\0", vec![1]);
            let _ = self.0.send("command");
        }
        fn on_event(&mut self, _ev: BusEvent, _out: &mut dyn Outbound) {
            let _ = self.0.send("event");
        }
        fn on_tick(&mut self, out: &mut dyn Outbound) {
            assert_eq!(out.max_atomic(), 0, "not connected");
            let _ = self.0.send("tick");
        }
    }

    /// Spawn from a thread in a fresh network namespace: no corosync can be reached there.
    fn spawn_without_corosync() -> (BusHandle<()>, JoinHandle<()>, mpsc::Receiver<&'static str>) {
        let (tx, rx) = mpsc::channel();
        let (h, j) = std::thread::spawn(move || {
            crate::wire::kernel_peer::enter_private_netns().expect("needs root: unshare(CLONE_NEWNET)");
            spawn(Counter(tx), BusConfig { tick: Duration::from_millis(10), ..BusConfig::default() })
        })
        .join()
        .expect("spawning thread")
        .expect("spawn");
        (h, j, rx)
    }

    fn wait_ended(j: JoinHandle<()>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !j.is_finished() {
            assert!(Instant::now() < deadline, "the transport thread did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        j.join().expect("the transport thread did not panic");
    }

    #[test]
    fn without_corosync_it_keeps_running_ticking_and_taking_commands() {
        let (h, j, rx) = spawn_without_corosync();
        let wait = Duration::from_secs(30);
        for _ in 0..3 {
            assert_eq!(rx.recv_timeout(wait), Ok("tick"));
        }
        h.command(()).unwrap();
        assert_eq!(rx.iter().find(|&w| w != "tick"), Some("command"), "no event without corosync");
        assert_eq!(h.stats().snapshot(), BusStatsSnapshot::default());
        h.shutdown();
        wait_ended(j);
        assert!(matches!(h.command(()), Err(BusGone)), "commands after the end are refused");
    }

    #[test]
    fn dropping_the_last_handle_ends_the_thread() {
        let (h, j, rx) = spawn_without_corosync();
        let h2 = h.clone();
        drop(h);
        h2.command(()).unwrap();
        // Ticks come every 10 ms: 3000 of them bound the wait to about 30 s.
        assert!(
            rx.iter().take(3000).any(|w| w == "command"),
            "a live clone keeps the thread running and its commands handled"
        );
        drop(h2);
        wait_ended(j);
    }
}
