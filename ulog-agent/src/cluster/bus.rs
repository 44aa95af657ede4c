//! What the cluster engine and the corosync transport say to each other.
//!
//! The transport (`corosync`: one thread that owns the CPG and quorum handles) turns corosync's
//! callbacks into [`BusEvent`]s and hands them, in delivery order, to a [`BusHandler`] that runs
//! on the same thread; the handler answers through an [`Outbound`] (join, leave, multicast),
//! which the transport carries out after the handler returns (so no corosync call is made from
//! inside a corosync callback). Commands from other threads (the receive thread's requests) reach
//! the handler the same way, so the handler's state has one owner and needs no lock of its own.
//!
//! The engine is written against these types only, so it runs unchanged over the real
//! transport and over the deterministic in-memory bus of its tests.

use std::sync::atomic::{AtomicU64, Ordering};

use super::state::NodeId;

/// One process in a CPG group: corosync's node id and the process id on that node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    /// corosync node id.
    pub node: NodeId,
    /// Process id on that node.
    pub pid: u32,
}

/// Why a member left a group (corosync's `cpg_reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaveReason {
    /// It left the group itself (`cpg_leave`).
    Leave,
    /// Its node left the membership (crash, corosync killed, or partitioned away).
    NodeDown,
    /// The process ended (or its connection to its corosync) while its node stayed.
    ProcDown,
    /// Anything else corosync reports.
    Other,
}

/// What the transport hands to the handler, in corosync's delivery order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusEvent {
    /// Connected (again) to the local corosync. Groups are not joined: the handler joins the
    /// ones it needs (after a [`BusEvent::Disconnected`], again).
    Connected {
        /// This node's corosync node id.
        node: NodeId,
        /// This process's id (the `pid` of its own [`Member`] entries).
        pid: u32,
        /// The largest message delivered atomically (`cpg_max_atomic_msgsize_get`).
        max_atomic: usize,
    },
    /// The local corosync is gone: every group is left and unsent messages are dropped. The
    /// transport reconnects with backoff and reports [`BusEvent::Connected`].
    Disconnected,
    /// The node's quorum state (corosync's quorum service), reported on connect and on change.
    Quorum {
        /// The node is part of a quorate partition.
        quorate: bool,
    },
    /// A configuration change of one group, as delivered by CPG.
    Membership {
        /// The group (name bytes, e.g. a uuid with its NUL).
        group: Vec<u8>,
        /// The members after the change.
        members: Vec<Member>,
        /// Who left, and why.
        left: Vec<(Member, LeaveReason)>,
        /// Who joined.
        joined: Vec<Member>,
    },
    /// A message multicast to a group, delivered in the group's agreed order.
    Delivered {
        /// The group.
        group: Vec<u8>,
        /// The sender.
        from: Member,
        /// The message.
        data: Vec<u8>,
    },
}

/// What a handler may ask of the transport. Calls queue work; the transport performs it after
/// the handler returns, in order, retrying corosync's flow control (TRY_AGAIN) while it keeps
/// dispatching.
pub trait Outbound {
    /// Join a group (idempotent).
    fn join(&mut self, group: &[u8]);
    /// Leave a group (idempotent); its unsent messages are dropped.
    fn leave(&mut self, group: &[u8]);
    /// Multicast `data` to a joined (or being joined) group, after every earlier message to it.
    fn send(&mut self, group: &[u8], data: Vec<u8>);
    /// The largest message delivered atomically (0 while not connected).
    fn max_atomic(&self) -> usize;
}

/// The engine side of the transport: runs on the transport's thread.
pub trait BusHandler: Send + 'static {
    /// Commands other threads send it.
    type Command: Send + 'static;
    /// A command arrived.
    fn on_command(&mut self, cmd: Self::Command, out: &mut dyn Outbound);
    /// corosync delivered an event.
    fn on_event(&mut self, ev: BusEvent, out: &mut dyn Outbound);
    /// Called about every tick interval (periodic digests, timeouts).
    fn on_tick(&mut self, _out: &mut dyn Outbound) {}
    /// Called once the events of one dispatch (and the commands waiting) were handed over,
    /// before the transport carries out what was queued: the place to send one
    /// acknowledgement for a batch instead of one per message.
    fn on_idle(&mut self, _out: &mut dyn Outbound) {}
}

/// Counters of the transport, readable from any thread (the telemetry reads them).
#[derive(Debug, Default)]
pub struct BusStats {
    /// `CS_ERR_TRY_AGAIN` answers to a send or join (each one a retry later).
    pub try_again: AtomicU64,
    /// `CS_ERR_INTERRUPT` answers to a send (each one a resend of the whole message).
    pub interrupts: AtomicU64,
    /// Successful connects after a lost connection.
    pub reconnects: AtomicU64,
    /// Messages corosync accepted (`CS_OK` from `cpg_mcast_joined`).
    pub sent: AtomicU64,
    /// Messages delivered to the handler.
    pub delivered: AtomicU64,
}

/// A copy of [`BusStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusStatsSnapshot {
    /// See [`BusStats::try_again`].
    pub try_again: u64,
    /// See [`BusStats::interrupts`].
    pub interrupts: u64,
    /// See [`BusStats::reconnects`].
    pub reconnects: u64,
    /// See [`BusStats::sent`].
    pub sent: u64,
    /// See [`BusStats::delivered`].
    pub delivered: u64,
}

impl BusStats {
    /// The counters now.
    pub fn snapshot(&self) -> BusStatsSnapshot {
        BusStatsSnapshot {
            try_again: self.try_again.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
        }
    }
}
