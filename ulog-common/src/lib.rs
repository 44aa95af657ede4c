//! Wire layouts and constants of the device-mapper userspace dirty-log protocol, shared by the
//! eBPF programs (which read requests out of kernel memory) and the agent (which serves them).
//!
//! Everything here mirrors `include/uapi/linux/connector.h` and
//! `include/uapi/linux/dm-log-userspace.h`. Integers travel in host byte order: the kernel and the
//! server always run on the same host. The codec functions read and write fields at fixed byte
//! offsets instead of transmuting, so a short or misaligned buffer can never be misread; the
//! `#[repr(C)]` structs exist for the eBPF side and for the layout tests that pin both to the
//! byte vectors of the protocol reference.
#![no_std]
#![deny(missing_docs)]

use core::mem::size_of;

/// Connector index of device-mapper (`CN_IDX_DM`); also the netlink multicast group requests go to.
pub const CN_IDX_DM: u32 = 7;
/// Connector value of the userspace dirty log (`CN_VAL_DM_USERSPACE_LOG`).
pub const CN_VAL_DM_USERSPACE_LOG: u32 = 1;
/// Netlink protocol number of the connector (`NETLINK_CONNECTOR`).
pub const NETLINK_CONNECTOR: i32 = 11;
/// `NLMSG_DONE`: the netlink message type the connector uses for every message.
pub const NLMSG_DONE: u16 = 3;
/// Size of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Size of `struct cn_msg` (without its payload).
pub const CN_MSG_LEN: usize = 20;
/// Size of `struct dm_ulog_request` (without its payload).
pub const ULOG_REQUEST_LEN: usize = 160;
/// Offset of the `dm_ulog_request` inside a connector datagram.
pub const ULOG_OFFSET: usize = NLMSG_HDRLEN + CN_MSG_LEN;
/// `DM_UUID_LEN`: the uuid field, NUL included.
pub const DM_UUID_LEN: usize = 129;
/// Only the low 8 bits of `request_type` name the request; the rest is reserved.
pub const DM_ULOG_REQUEST_MASK: u32 = 0xFF;
/// The request version current kernels send (3: FLUSH may carry marks).
pub const DM_ULOG_REQUEST_VERSION: u32 = 3;
/// The kernel builds requests in a 512-byte buffer: the largest request payload it can send.
pub const KERNEL_MAX_REQUEST_PAYLOAD: usize = 512 - CN_MSG_LEN - ULOG_REQUEST_LEN;
/// `CONNECTOR_MAX_MSG_SIZE`: the largest connector payload the kernel accepts from userspace.
pub const CONNECTOR_MAX_MSG_SIZE: usize = 16384;
/// `DM_NAME_LEN`: the largest CTR reply payload (device name with its NUL).
pub const DM_NAME_LEN: usize = 128;

/// Byte offsets of the `dm_ulog_request` fields, for code that reads them piecemeal (eBPF).
pub mod offsets {
    /// `u64 luid`
    pub const LUID: usize = 0;
    /// `char uuid[129]`
    pub const UUID: usize = 8;
    /// `u32 version`
    pub const VERSION: usize = 140;
    /// `i32 error`
    pub const ERROR: usize = 144;
    /// `u32 seq`
    pub const SEQ: usize = 148;
    /// `u32 request_type`
    pub const REQUEST_TYPE: usize = 152;
    /// `u32 data_size`
    pub const DATA_SIZE: usize = 156;
}

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NlMsgHdr {
    /// Length of the whole message, header included.
    pub len: u32,
    /// Message type (`NLMSG_DONE` for connector messages).
    pub kind: u16,
    /// Flags (0).
    pub flags: u16,
    /// Sequence number (the kernel copies the connector seq here).
    pub seq: u32,
    /// Sender port id.
    pub pid: u32,
}

/// `struct cb_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CbId {
    /// Connector index.
    pub idx: u32,
    /// Connector value.
    pub val: u32,
}

/// The connector id of the device-mapper userspace log.
pub const DM_ULOG_CB_ID: CbId = CbId { idx: CN_IDX_DM, val: CN_VAL_DM_USERSPACE_LOG };

/// `struct cn_msg` without its payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CnMsg {
    /// Connector id.
    pub id: CbId,
    /// Sequence number; ack-only replies are matched on it.
    pub seq: u32,
    /// Ack-only replies carry a positive errno here.
    pub ack: u32,
    /// Bytes of payload that follow.
    pub len: u16,
    /// Flags (0).
    pub flags: u16,
}

/// `struct dm_ulog_request` without its payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmUlogRequest {
    /// The kernel's per-log context address: tells apart two logs with one uuid.
    pub luid: u64,
    /// NUL-terminated device-mapper uuid.
    pub uuid: [u8; DM_UUID_LEN],
    /// Zero.
    pub padding: [u8; 3],
    /// Protocol version of the sender.
    pub version: u32,
    /// Reply status: 0 or a negative errno.
    pub error: i32,
    /// Request sequence number; full replies are matched on it.
    pub seq: u32,
    /// Request type in the low 8 bits.
    pub request_type: u32,
    /// Bytes of payload that follow.
    pub data_size: u32,
}

const _: () = assert!(size_of::<NlMsgHdr>() == NLMSG_HDRLEN);
const _: () = assert!(size_of::<CnMsg>() == CN_MSG_LEN);
const _: () = assert!(size_of::<DmUlogRequest>() == ULOG_REQUEST_LEN);
const _: () = assert!(core::mem::offset_of!(DmUlogRequest, version) == offsets::VERSION);
const _: () = assert!(core::mem::offset_of!(DmUlogRequest, error) == offsets::ERROR);
const _: () = assert!(core::mem::offset_of!(DmUlogRequest, seq) == offsets::SEQ);
const _: () = assert!(core::mem::offset_of!(DmUlogRequest, request_type) == offsets::REQUEST_TYPE);
const _: () = assert!(core::mem::offset_of!(DmUlogRequest, data_size) == offsets::DATA_SIZE);

#[cfg(feature = "user")]
// SAFETY: plain-old-data structs of integers and byte arrays, no padding the compiler adds
// (the sizes are asserted above), valid for every bit pattern.
unsafe impl aya::Pod for CnMsg {}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]` integers only, size asserted (64, no implicit padding), valid for every
// bit pattern.
unsafe impl aya::Pod for probes::RequestEvent {}

fn rd_u16(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}
fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn rd_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

impl NlMsgHdr {
    /// Reads a header from the start of `b`; `None` if `b` is shorter than a header.
    pub fn read(b: &[u8]) -> Option<Self> {
        if b.len() < NLMSG_HDRLEN {
            return None;
        }
        Some(Self { len: rd_u32(b, 0), kind: rd_u16(b, 4), flags: rd_u16(b, 6), seq: rd_u32(b, 8), pid: rd_u32(b, 12) })
    }

    /// Writes the header into the first 16 bytes of `out` (which must be that long).
    pub fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.len.to_ne_bytes());
        out[4..6].copy_from_slice(&self.kind.to_ne_bytes());
        out[6..8].copy_from_slice(&self.flags.to_ne_bytes());
        out[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        out[12..16].copy_from_slice(&self.pid.to_ne_bytes());
    }
}

impl CnMsg {
    /// Reads a `cn_msg` header from the start of `b`; `None` if `b` is too short.
    pub fn read(b: &[u8]) -> Option<Self> {
        if b.len() < CN_MSG_LEN {
            return None;
        }
        Some(Self {
            id: CbId { idx: rd_u32(b, 0), val: rd_u32(b, 4) },
            seq: rd_u32(b, 8),
            ack: rd_u32(b, 12),
            len: rd_u16(b, 16),
            flags: rd_u16(b, 18),
        })
    }

    /// Writes the header into the first 20 bytes of `out` (which must be that long).
    pub fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.id.idx.to_ne_bytes());
        out[4..8].copy_from_slice(&self.id.val.to_ne_bytes());
        out[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        out[12..16].copy_from_slice(&self.ack.to_ne_bytes());
        out[16..18].copy_from_slice(&self.len.to_ne_bytes());
        out[18..20].copy_from_slice(&self.flags.to_ne_bytes());
    }
}

impl DmUlogRequest {
    /// An all-zero request header.
    pub const fn zeroed() -> Self {
        Self {
            luid: 0,
            uuid: [0; DM_UUID_LEN],
            padding: [0; 3],
            version: 0,
            error: 0,
            seq: 0,
            request_type: 0,
            data_size: 0,
        }
    }

    /// Reads a request header from the start of `b`; `None` if `b` is shorter than 160 bytes.
    pub fn read(b: &[u8]) -> Option<Self> {
        if b.len() < ULOG_REQUEST_LEN {
            return None;
        }
        let mut uuid = [0u8; DM_UUID_LEN];
        uuid.copy_from_slice(&b[offsets::UUID..offsets::UUID + DM_UUID_LEN]);
        let mut padding = [0u8; 3];
        padding.copy_from_slice(&b[137..140]);
        Some(Self {
            luid: rd_u64(b, offsets::LUID),
            uuid,
            padding,
            version: rd_u32(b, offsets::VERSION),
            error: rd_u32(b, offsets::ERROR) as i32,
            seq: rd_u32(b, offsets::SEQ),
            request_type: rd_u32(b, offsets::REQUEST_TYPE),
            data_size: rd_u32(b, offsets::DATA_SIZE),
        })
    }

    /// Writes the header into the first 160 bytes of `out` (which must be that long).
    pub fn write(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.luid.to_ne_bytes());
        out[8..137].copy_from_slice(&self.uuid);
        out[137..140].copy_from_slice(&self.padding);
        out[140..144].copy_from_slice(&self.version.to_ne_bytes());
        out[144..148].copy_from_slice(&self.error.to_ne_bytes());
        out[148..152].copy_from_slice(&self.seq.to_ne_bytes());
        out[152..156].copy_from_slice(&self.request_type.to_ne_bytes());
        out[156..160].copy_from_slice(&self.data_size.to_ne_bytes());
    }

    /// The uuid up to its NUL; `None` if the 129-byte field holds no NUL.
    pub fn uuid_bytes(&self) -> Option<&[u8]> {
        let end = self.uuid.iter().position(|&c| c == 0)?;
        Some(&self.uuid[..end])
    }

    /// Stores `uuid` NUL-terminated; `false` (and nothing stored) if it is longer than 128 bytes.
    pub fn set_uuid(&mut self, uuid: &[u8]) -> bool {
        if uuid.len() >= DM_UUID_LEN {
            return false;
        }
        self.uuid = [0; DM_UUID_LEN];
        self.uuid[..uuid.len()].copy_from_slice(uuid);
        true
    }
}

/// The 17 request types of `dm-log-userspace.h`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestType {
    /// Create a log from a constructor string.
    Ctr = 1,
    /// Destroy a log.
    Dtr = 2,
    /// The mirror is about to suspend.
    Presuspend = 3,
    /// The mirror has suspended.
    Postsuspend = 4,
    /// The mirror resumes: load state.
    Resume = 5,
    /// Region size in sectors.
    GetRegionSize = 6,
    /// Is a region clean (no writes outstanding)?
    IsClean = 7,
    /// Is a region in sync?
    InSync = 8,
    /// Make marks (and the marks in its payload, with integrated_flush) durable.
    Flush = 9,
    /// Mark regions dirty.
    MarkRegion = 10,
    /// Mark regions clean.
    ClearRegion = 11,
    /// Which region should be resynchronised next?
    GetResyncWork = 12,
    /// Record the outcome of a region's resync.
    SetRegionSync = 13,
    /// How many regions are in sync?
    GetSyncCount = 14,
    /// Status text for `dmsetup status`.
    StatusInfo = 15,
    /// Status text for `dmsetup table` (current kernels build it themselves).
    StatusTable = 16,
    /// Is another node recovering a region?
    IsRemoteRecovering = 17,
}

/// Number of request types; also one past the largest type number.
pub const REQUEST_TYPE_COUNT: usize = 17;

impl RequestType {
    /// Every type, in wire order.
    pub const ALL: [RequestType; REQUEST_TYPE_COUNT] = [
        Self::Ctr,
        Self::Dtr,
        Self::Presuspend,
        Self::Postsuspend,
        Self::Resume,
        Self::GetRegionSize,
        Self::IsClean,
        Self::InSync,
        Self::Flush,
        Self::MarkRegion,
        Self::ClearRegion,
        Self::GetResyncWork,
        Self::SetRegionSync,
        Self::GetSyncCount,
        Self::StatusInfo,
        Self::StatusTable,
        Self::IsRemoteRecovering,
    ];

    /// The type named by a raw `request_type` field (masked to its low 8 bits).
    pub fn from_raw(raw: u32) -> Option<Self> {
        let n = (raw & DM_ULOG_REQUEST_MASK) as usize;
        if (1..=REQUEST_TYPE_COUNT).contains(&n) {
            Some(Self::ALL[n - 1])
        } else {
            None
        }
    }

    /// The wire number.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// Index 0..17 for per-type tables.
    pub const fn index(self) -> usize {
        self as usize - 1
    }

    /// The kernel's name for the type, without the `DM_ULOG_` prefix.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ctr => "CTR",
            Self::Dtr => "DTR",
            Self::Presuspend => "PRESUSPEND",
            Self::Postsuspend => "POSTSUSPEND",
            Self::Resume => "RESUME",
            Self::GetRegionSize => "GET_REGION_SIZE",
            Self::IsClean => "IS_CLEAN",
            Self::InSync => "IN_SYNC",
            Self::Flush => "FLUSH",
            Self::MarkRegion => "MARK_REGION",
            Self::ClearRegion => "CLEAR_REGION",
            Self::GetResyncWork => "GET_RESYNC_WORK",
            Self::SetRegionSync => "SET_REGION_SYNC",
            Self::GetSyncCount => "GET_SYNC_COUNT",
            Self::StatusInfo => "STATUS_INFO",
            Self::StatusTable => "STATUS_TABLE",
            Self::IsRemoteRecovering => "IS_REMOTE_RECOVERING",
        }
    }

    /// The most reply payload the kernel accepts for this type (protocol.md §1.7), or `None`
    /// where it is bounded only by the caller's buffer (STATUS_*). A CTR sent by the kernel's
    /// reconnect loop accepts 0 bytes, not 128: see the CTR handling in the agent.
    pub const fn reply_capacity(self) -> Option<usize> {
        match self {
            Self::Ctr => Some(DM_NAME_LEN),
            Self::GetRegionSize | Self::IsClean | Self::InSync | Self::GetSyncCount => Some(8),
            Self::GetResyncWork | Self::IsRemoteRecovering => Some(16),
            Self::StatusInfo | Self::StatusTable => None,
            Self::Dtr
            | Self::Presuspend
            | Self::Postsuspend
            | Self::Resume
            | Self::Flush
            | Self::MarkRegion
            | Self::ClearRegion
            | Self::SetRegionSync => Some(0),
        }
    }
}

/// Length of a complete connector datagram carrying a request header and `payload` bytes.
pub const fn datagram_len(payload: usize) -> usize {
    ULOG_OFFSET + ULOG_REQUEST_LEN + payload
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    const UUID: &[u8] = b"LVM-cmirrortest0001";
    const LUID: u64 = 0xffff_8880_03a1_b000;

    fn header(seq: u32, kind: RequestType, version: u32, data_size: u32) -> DmUlogRequest {
        let mut r = DmUlogRequest::zeroed();
        r.luid = LUID;
        assert!(r.set_uuid(UUID));
        r.version = version;
        r.seq = seq;
        r.request_type = kind.raw();
        r.data_size = data_size;
        r
    }

    fn common_prefix(b: &[u8]) {
        // §7: bytes 0-7 luid little-endian, 8-26 the uuid, zero to 139.
        assert_eq!(&b[0..8], &[0x00, 0xb0, 0xa1, 0x03, 0x80, 0x88, 0xff, 0xff]);
        assert_eq!(&b[8..27], UUID);
        assert!(b[27..140].iter().all(|&c| c == 0));
    }

    #[test]
    fn ctr_request_vector() {
        // §7.1: CTR seq 1, version 2, 27 bytes of ctr string; datagram length 223.
        let ctr = b"2097152 clustered-core 1024";
        let mut dgram = vec![0u8; datagram_len(ctr.len())];
        assert_eq!(dgram.len(), 223);
        NlMsgHdr { len: 223, kind: NLMSG_DONE, flags: 0, seq: 1, pid: 0 }.write(&mut dgram);
        CnMsg { id: DM_ULOG_CB_ID, seq: 1, ack: 0, len: 187, flags: 0 }.write(&mut dgram[16..]);
        header(1, RequestType::Ctr, 2, 27).write(&mut dgram[ULOG_OFFSET..]);
        dgram[ULOG_OFFSET + 160..].copy_from_slice(ctr);
        let expect: [u8; 36] = [
            0xdf, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0xbb, 0,
            0, 0,
        ];
        assert_eq!(&dgram[..36], &expect);
        let u = &dgram[ULOG_OFFSET..];
        common_prefix(u);
        assert_eq!(&u[140..160], &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0x1b, 0, 0, 0]);
        // And it reads back.
        let back = DmUlogRequest::read(u).unwrap();
        assert_eq!(back, header(1, RequestType::Ctr, 2, 27));
        assert_eq!(back.uuid_bytes(), Some(UUID));
        assert_eq!(NlMsgHdr::read(&dgram).unwrap().len, 223);
        assert_eq!(CnMsg::read(&dgram[16..]).unwrap().len, 187);
    }

    #[test]
    fn mark_region_vector() {
        // §7.4: MARK_REGION {0, 5, 2047}, seq 7, bytes 140..183.
        let mut b = vec![0u8; 160 + 24];
        header(7, RequestType::MarkRegion, 2, 24).write(&mut b);
        for (i, r) in [0u64, 5, 2047].iter().enumerate() {
            b[160 + 8 * i..168 + 8 * i].copy_from_slice(&r.to_ne_bytes());
        }
        let expect: [u8; 44] = [
            0x02, 0, 0, 0, 0, 0, 0, 0, 0x07, 0, 0, 0, 0x0a, 0, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x05, 0, 0,
            0, 0, 0, 0, 0, 0xff, 0x07, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&b[140..184], &expect);
        common_prefix(&b);
    }

    #[test]
    fn ack_only_vector() {
        // §7.8: ack-only reply for seq 9 (nlmsg_seq 0, pid 1234).
        let mut b = [0u8; 36];
        NlMsgHdr { len: 36, kind: NLMSG_DONE, flags: 0, seq: 0, pid: 1234 }.write(&mut b);
        CnMsg { id: DM_ULOG_CB_ID, seq: 9, ack: 0, len: 0, flags: 0 }.write(&mut b[16..]);
        let expect: [u8; 36] = [
            0x24, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0xd2, 0x04, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0,
        ];
        assert_eq!(b, expect);
        // EAGAIN nack: byte 0x1c carries 11.
        CnMsg { id: DM_ULOG_CB_ID, seq: 9, ack: 11, len: 0, flags: 0 }.write(&mut b[16..]);
        assert_eq!(b[0x1c], 0x0b);
    }

    #[test]
    fn request_types_round_trip_and_mask() {
        for (i, t) in RequestType::ALL.iter().enumerate() {
            assert_eq!(t.raw() as usize, i + 1);
            assert_eq!(t.index(), i);
            assert_eq!(RequestType::from_raw(t.raw()), Some(*t));
            // The upper 24 bits are reserved and must be masked off.
            assert_eq!(RequestType::from_raw(t.raw() | 0xABCD_EF00), Some(*t));
        }
        assert_eq!(RequestType::from_raw(0), None);
        assert_eq!(RequestType::from_raw(18), None);
        assert_eq!(RequestType::from_raw(0x100), None);
        let names: Vec<&str> = RequestType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names[8], "FLUSH");
        assert_eq!(KERNEL_MAX_REQUEST_PAYLOAD, 332);
    }

    #[test]
    fn short_buffers_are_refused() {
        assert!(NlMsgHdr::read(&[0u8; 15]).is_none());
        assert!(CnMsg::read(&[0u8; 19]).is_none());
        assert!(DmUlogRequest::read(&[0u8; 159]).is_none());
        let mut r = DmUlogRequest::zeroed();
        assert!(!r.set_uuid(&[b'a'; 129]));
        assert!(r.set_uuid(&[b'a'; 128]));
        assert_eq!(r.uuid_bytes().map(|u| u.len()), Some(128));
        r.uuid = [b'x'; DM_UUID_LEN];
        assert_eq!(r.uuid_bytes(), None, "a uuid without NUL is not a uuid");
    }
}

/// Names and slot layout shared by the eBPF programs (`ulog-ebpf`) and the agent that loads them
/// (`ulog-agent/src/telemetry/probes.rs`). The eBPF side cannot use these strings to name its items
/// (the `#[map]`/`#[kprobe]` macros take the item's identifier), so the agent's tests check that
/// the built object contains every name below.
pub mod probes {
    use super::{DM_ULOG_REQUEST_MASK, REQUEST_TYPE_COUNT};

    /// The kernel module that calls [`DM_CONSULT_USERSPACE`]: the kprobe can only attach while it
    /// is loaded (its symbols are in kallsyms only then).
    pub const DM_LOG_USERSPACE_MODULE: &str = "dm_log_userspace";
    /// Kernel function the request counter hooks, and the name of the eBPF program attached to it:
    /// `int dm_consult_userspace(const char *uuid, uint64_t luid, int request_type, char *data,
    /// size_t data_size, char *rdata, size_t *rdata_size)`, called once per request; the
    /// resends within a call (after the 15 s timeout or -EAGAIN) are not calls of their own.
    pub const DM_CONSULT_USERSPACE: &str = "dm_consult_userspace";
    /// `PerCpuArray<u64>` of requests by type, indexed by [`request_counter_slot`].
    pub const REQUESTS_BY_TYPE: &str = "REQUESTS_BY_TYPE";
    /// Slots of [`REQUESTS_BY_TYPE`]: one per request type (1..=17) plus slot 0 for anything else.
    pub const REQUEST_COUNTER_SLOTS: usize = REQUEST_TYPE_COUNT + 1;

    /// Kernel function the send probe hooks: `int cn_netlink_send(struct cn_msg *msg, u32 portid,
    /// u32 group, gfp_t gfp_mask)`, called once per request attempt (a resend after a timeout or
    /// -EAGAIN calls it again with a new seq). Other connector users call it too: the probe keeps
    /// only messages whose id is [`crate::DM_ULOG_CB_ID`].
    pub const CN_NETLINK_SEND: &str = "cn_netlink_send";
    /// Name of the kretprobe program on [`DM_CONSULT_USERSPACE`].
    pub const DM_CONSULT_USERSPACE_RET: &str = "dm_consult_userspace_ret";
    /// `HashMap<u64, RequestEvent>`: the calls in progress, by `pid_tgid` of the calling task
    /// (`dm_consult_userspace` sleeps until the answer; it never nests within a task). A plain
    /// preallocated hash (per-CPU free lists), not LRU (whose common LRU list takes a global lock
    /// per insert): the entry of a call whose return was missed (more concurrent calls than the
    /// kretprobe's `maxactive`) is overwritten by the task's next call, and stays only if that
    /// task exits; a full table makes inserts fail, counted (`C_INFLIGHT_FULL`).
    pub const INFLIGHT: &str = "INFLIGHT";
    /// Capacity of [`INFLIGHT`]: far more tasks than ever wait on the log server at once.
    pub const INFLIGHT_ENTRIES: u32 = 4096;
    /// `PerCpuArray<u64>` of round-trip histograms: index `slot * HIST_SLOTS + k`, where `slot` is
    /// the [`request_counter_slot`] and `k` the [`log2_slot`] of the duration.
    pub const LATENCY_HIST: &str = "LATENCY_HIST";
    /// Log2 slots per histogram (more than any `u64` duration in ns needs).
    pub const HIST_SLOTS: usize = 64;
    /// `PerCpuArray<u64>` of round-trip sums in ns, by [`request_counter_slot`].
    pub const LATENCY_SUM: &str = "LATENCY_SUM";
    /// `PerCpuArray<u64>` of resends: index `slot * 2 + reason` (reason [`RETRY_TIMEOUT`] or
    /// [`RETRY_EAGAIN`]), counted when the resend is sent.
    pub const RETRIES: &str = "RETRIES";
    /// Resend after the 15 s timeout.
    pub const RETRY_TIMEOUT: usize = 0;
    /// Resend after an -EAGAIN answer.
    pub const RETRY_EAGAIN: usize = 1;
    /// A resend this long (ns) after the previous attempt's send is a timeout resend: the kernel
    /// waits `DM_ULOG_RETRY_TIMEOUT` (15 s) before one; an -EAGAIN resend follows the answer at once.
    pub const TIMEOUT_RESEND_MIN_NS: u64 = 10_000_000_000;
    /// `PerCpuArray<u64>` of single counters, indexed by the `C_*` constants.
    pub const COUNTERS: &str = "COUNTERS";
    /// [`COUNTERS`]: CTR calls of the kernel's -ESRCH reconnect loop (`userspace_do_request`
    /// calls `dm_consult_userspace(CTR)` with `rdata == NULL`; the constructor's own CTR passes a
    /// reply buffer), answered or not.
    pub const C_RECONNECT_ATTEMPTS: u32 = 0;
    /// [`COUNTERS`]: calls that returned -ESRCH (no log server listening).
    pub const C_ESRCH_RETURNS: u32 = 1;
    /// [`COUNTERS`]: events the ring buffer had no room for (`bpf_ringbuf_reserve` failed).
    pub const C_EVENTS_LOST: u32 = 2;
    /// [`COUNTERS`]: calls not timed because [`INFLIGHT`] was full.
    pub const C_INFLIGHT_FULL: u32 = 3;
    /// [`COUNTERS`]: returns without a recorded entry (the probe attached during the call).
    pub const C_UNMATCHED_RETURNS: u32 = 4;
    /// [`COUNTERS`]: dm-log-userspace messages seen by the send probe.
    pub const C_SENDS: u32 = 5;
    /// [`COUNTERS`]: dm-log-userspace sends outside a timed call.
    pub const C_SENDS_UNMATCHED: u32 = 6;
    /// Slots of [`COUNTERS`].
    pub const COUNTER_SLOTS: u32 = 8;
    /// `RingBuf` of [`RequestEvent`]s, one per returned call.
    pub const EVENTS: &str = "EVENTS";
    /// Size of [`EVENTS`] in bytes: 16384 events of 64 bytes (+8 bytes of header each), enough
    /// for about 0.3 s of the fastest request stream the agent serves, drained every 50 ms.
    pub const EVENTS_BYTES: u32 = 2 << 20;
    /// Global (`.rodata`) of the programs: 1 enables their aya-log diagnostics.
    pub const LOG_ENABLED: &str = "LOG_ENABLED";
    /// `errno` values as the kernel returns them.
    pub const ESRCH: i32 = 3;
    /// `EAGAIN`.
    pub const EAGAIN: i32 = 11;

    /// [`RequestEvent::flags`]: a CTR of the kernel's reconnect loop.
    pub const EV_RECONNECT: u32 = 1;
    /// [`RequestEvent::flags`]: the send probe saw at least one attempt (`last_seq` is valid).
    pub const EV_SEQ: u32 = 2;

    /// One `dm_consult_userspace` call: kept in [`INFLIGHT`] while it runs, sent through
    /// [`EVENTS`] when it returns. Times are `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RequestEvent {
        /// The log's luid (argument 1).
        pub luid: u64,
        /// Entry of the call.
        pub entry_ns: u64,
        /// Return of the call (0 while in flight).
        pub exit_ns: u64,
        /// The last attempt's `cn_netlink_send` (0: none seen).
        pub send_ns: u64,
        /// Seq of the first attempt.
        pub first_seq: u32,
        /// Seq of the last attempt (the one answered).
        pub last_seq: u32,
        /// Request type, masked with [`DM_ULOG_REQUEST_MASK`].
        pub request_type: u32,
        /// Return value: 0 or a negative errno.
        pub ret: i32,
        /// Attempts sent (`cn_netlink_send` calls).
        pub attempts: u32,
        /// Of which resends after a timeout.
        pub timeouts: u16,
        /// Of which resends after -EAGAIN.
        pub eagains: u16,
        /// `EV_*` bits.
        pub flags: u32,
        /// Zero.
        pub _pad: u32,
    }

    /// Size of [`RequestEvent`].
    pub const REQUEST_EVENT_LEN: usize = 64;
    const _: () = assert!(core::mem::size_of::<RequestEvent>() == REQUEST_EVENT_LEN);

    /// The log2 slot of a duration of `ns` nanoseconds: slot 0 up to and including 1 µs, slot
    /// `k >= 1` for `(2^(k-1) µs, 2^k µs]`, so the cumulative count of slots `0..=k` is the
    /// Prometheus bucket `le = 2^k µs`, edges included (the agent's `histogram::kernel_slot` is
    /// the reference; a test pins them together). Branch-only arithmetic, for the verifier.
    #[inline(always)]
    pub const fn log2_slot(ns: u64) -> u32 {
        let c = ns.div_ceil(1000);
        if c <= 1 {
            return 0;
        }
        // Bit length of c - 1 (>= 1), by halving.
        let mut x = c - 1;
        let mut n = 0u32;
        if x >= 1 << 32 {
            n += 32;
            x >>= 32;
        }
        if x >= 1 << 16 {
            n += 16;
            x >>= 16;
        }
        if x >= 1 << 8 {
            n += 8;
            x >>= 8;
        }
        if x >= 1 << 4 {
            n += 4;
            x >>= 4;
        }
        if x >= 1 << 2 {
            n += 2;
            x >>= 2;
        }
        if x >= 1 << 1 {
            n += 1;
            x >>= 1;
        }
        let bits = n + x as u32;
        if bits as usize >= HIST_SLOTS {
            (HIST_SLOTS - 1) as u32
        } else {
            bits
        }
    }

    /// The [`REQUESTS_BY_TYPE`] slot counting a request of wire type `request_type`: the type
    /// itself (after [`DM_ULOG_REQUEST_MASK`]) for a known type, 0 for anything else.
    #[inline(always)]
    pub const fn request_counter_slot(request_type: u32) -> u32 {
        let t = request_type & DM_ULOG_REQUEST_MASK;
        if t >= 1 && t <= REQUEST_TYPE_COUNT as u32 {
            t
        } else {
            0
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::RequestType;

        #[test]
        fn log2_slots() {
            assert_eq!(log2_slot(0), 0);
            assert_eq!(log2_slot(1000), 0);
            assert_eq!(log2_slot(1001), 1);
            assert_eq!(log2_slot(2000), 1);
            assert_eq!(log2_slot(2001), 2);
            assert_eq!(log2_slot(1000 << 24), 24);
            assert_eq!(log2_slot((1000 << 24) + 1), 25);
            assert!((log2_slot(u64::MAX) as usize) < HIST_SLOTS);
        }

        #[test]
        fn slots() {
            assert_eq!(REQUEST_COUNTER_SLOTS, 18);
            for t in RequestType::ALL {
                assert_eq!(request_counter_slot(t.raw()), t.raw());
                assert_eq!(request_counter_slot(t.raw() | 0xABCD_EF00), t.raw());
            }
            assert_eq!(request_counter_slot(0), 0);
            assert_eq!(request_counter_slot(18), 0);
            assert_eq!(request_counter_slot(0xFF), 0);
            assert_eq!(request_counter_slot(u32::MAX), 0);
        }
    }
}
