//! The messages the agents of one cluster log multicast to each other, and state transfer in
//! atomic chunks.
//!
//! Framing is strict and versioned: every frame starts with [`MAGIC`] and [`VERSION`], every
//! length is checked, a frame of another version is refused (never guessed at), and bytes after
//! a frame's end are an error. The group of a log is named like cmirrord's (the uuid plus its
//! NUL), so that a cmirrord on the same mirror shares the group and is *seen*: its messages
//! start with two 64-bit version words (5, little- and native-endian; 2 to 4 on RHEL 5) where
//! ours start with the magic, and [`decode`] reports them as [`WireError::Cmirrord`]. The log
//! is then refused, never served by both.
//!
//! State transfer: a snapshot ([`super::state::ReplicatedLog::encode`]) can be larger than the
//! largest atomic CPG message (`cpg_max_atomic_msgsize_get()`, 1 047 552 bytes measured here;
//! a larger message is fragmented by libcpg and fails half-sent when the membership changes).
//! [`split`] cuts it into chunks whose *frames* fit the limit, each naming the transfer, its
//! index and count, the snapshot's length and digest; [`Assembler`] rebuilds it, starting over
//! when a new transfer begins (the donor died and another one restarted it) and refusing
//! chunks out of order (CPG delivers one sender's messages in order: a gap is a bug).

use super::state::{Event, Incarnation, NodeId};

/// First bytes of every ulog cluster frame.
pub const MAGIC: [u8; 4] = *b"ULCM";
/// Frame format version.
pub const VERSION: u16 = 2;
/// Bytes of a frame before its body: magic, version, kind, sender, sequence.
pub const HEADER_LEN: usize = 4 + 2 + 2 + 4 + 8;
/// Bytes of a chunk frame before the chunk's data.
pub const CHUNK_OVERHEAD: usize = HEADER_LEN + 8 + 4 + 4 + 8 + 8 + 4;
/// The most regions one MARK or CLEAR frame carries (dm-raid1 sends at most 32 per FLUSH;
/// a bound keeps a hostile length from allocating).
pub const MAX_REGIONS: usize = 1024;
/// The most regions one HoldMarks frame carries (a node's marks after a partition; more are
/// sent in several frames): 65 536 regions, 512 KiB, within the atomic message size.
pub const MAX_HOLD_REGIONS: usize = 65_536;

/// One message between the agents of a log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The node that sent it.
    pub sender: NodeId,
    /// The sender's message sequence (per sender and log, from 1): acknowledgements and
    /// deduplication of resent requests refer to it.
    pub seq: u64,
    /// What it says.
    pub body: Body,
}

/// What a frame says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// An event every member applies in delivery order.
    Event(Event),
    /// The sender has applied `node`'s frames up to `seq`: a MARK acknowledged so is held by a
    /// second live member, and survives the crash of the node that sent it.
    Ack {
        /// Whose frames.
        node: NodeId,
        /// Up to which of its sequence numbers.
        seq: u64,
    },
    /// The sender, the log's disk writer (`clustered-disk`), has the image of the state after
    /// the first `position` events of the log's history durable on the shared log device: a
    /// MARK applied at or before that point may be answered.
    Written {
        /// Events of the history the image covers.
        position: u64,
    },
    /// The sender's state digest after applying every frame up to its own `seq` - 1.
    Digest {
        /// The digest ([`super::state::ReplicatedLog::digest`]).
        digest: u64,
    },
    /// A piece of a state transfer.
    Chunk(Chunk),
    /// The sender joined the group and has no state: the state transfer it gets is cut at
    /// this frame's place in the agreed order (its donor snapshots when it applies it, the
    /// sender keeps every frame delivered after it and replays them on the snapshot).
    Hello {
        /// The sender kept a state from before it lost quorum (or its corosync): how many
        /// events it had applied, plus one (0: no state). Used only when nobody holds a
        /// current state, to start from the longest history instead of a fresh log.
        stale: u64,
        /// The sender's kernel reconnected (its agent restarted): the kernel may hold regions
        /// dirty that it will never mark again, so a fresh log must not start in sync.
        reconnected: bool,
    },
    /// No member of the group holds the log's state (the first member, or every holder is
    /// gone): the log starts over at this frame, from the sender's stale state if it names
    /// one (the longest history any member kept), else from a fresh log of this shape.
    Genesis {
        /// Region count of the log.
        region_count: u64,
        /// Every region starts in sync (`nosync` tables).
        in_sync: bool,
        /// The sender's stale state is the start (it alone holds it; the others get it by
        /// transfer) rather than a fresh log on every member.
        from_stale: bool,
    },
}

/// A piece of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Names the transfer (the donor picks it; a new one restarts the transfer).
    pub transfer: u64,
    /// This chunk's index, from 0.
    pub index: u32,
    /// How many chunks the transfer has.
    pub count: u32,
    /// Length of the whole snapshot.
    pub total_len: u64,
    /// FNV-1a of the whole snapshot, checked once assembled.
    pub digest: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Why a frame could not be decoded, or a transfer not assembled.
#[derive(thiserror::Error, Debug, PartialEq, Eq)]
pub enum WireError {
    /// A cmirrord message on the same log's group: the log must not be served by both.
    #[error("a cmirrord message (protocol version {0}) on this log's group: cmirrord serves this mirror too")]
    Cmirrord(u64),
    /// Not a ulog frame.
    #[error("not a ulog cluster frame (bad magic)")]
    Magic,
    /// Another frame version (a mixed-version cluster during an upgrade).
    #[error("cluster frame version {0} is not {VERSION}")]
    Version(u16),
    /// Unknown kind of frame or event.
    #[error("unknown cluster frame kind {0}")]
    Kind(u16),
    /// The frame ends early.
    #[error("cluster frame truncated")]
    Truncated,
    /// Bytes after the frame's end.
    #[error("{0} bytes after the cluster frame's end")]
    Trailing(usize),
    /// A field out of its range.
    #[error("cluster frame field out of range: {0}")]
    Field(&'static str),
    /// A chunk that does not continue the transfer being assembled.
    #[error("state transfer chunk {index} of transfer {transfer} out of order")]
    OutOfOrder {
        /// The chunk's transfer.
        transfer: u64,
        /// The chunk's index.
        index: u32,
    },
    /// The assembled snapshot does not match its length or digest.
    #[error("assembled state transfer does not match its length or digest")]
    Damaged,
}

impl WireError {
    /// The errno a kernel request waiting on this frame is answered with.
    pub fn errno(&self) -> i32 {
        -libc::EPROTO
    }
}

const K_JOIN: u16 = 1;
const K_DEPART: u16 = 2;
const K_RELEASE: u16 = 3;
const K_FENCE: u16 = 4;
const K_MARK: u16 = 5;
const K_CLEAR: u16 = 6;
const K_WORK: u16 = 7;
const K_SYNC: u16 = 8;
const K_HOLD: u16 = 9;
const K_UNKNOWN: u16 = 10;
const K_VOID: u16 = 11;
const K_WANT: u16 = 12;
const K_ACK: u16 = 32;
const K_DIGEST: u16 = 33;
const K_WRITTEN: u16 = 37;
const K_CHUNK: u16 = 34;
const K_HELLO: u16 = 35;
const K_GENESIS: u16 = 36;

/// The frame as bytes (little-endian).
pub fn encode(f: &Frame) -> Vec<u8> {
    let mut o = Vec::with_capacity(64);
    let kind = match &f.body {
        Body::Event(e) => match e {
            Event::Join { .. } => K_JOIN,
            Event::Depart { .. } => K_DEPART,
            Event::Release { .. } => K_RELEASE,
            Event::FenceConfirmed { .. } => K_FENCE,
            Event::Mark { .. } => K_MARK,
            Event::Clear { .. } => K_CLEAR,
            Event::GetResyncWork { .. } => K_WORK,
            Event::SetRegionSync { .. } => K_SYNC,
            Event::HoldMarks { .. } => K_HOLD,
            Event::UnknownMarks { .. } => K_UNKNOWN,
            Event::VoidCopy { .. } => K_VOID,
            Event::Want { .. } => K_WANT,
        },
        Body::Ack { .. } => K_ACK,
        Body::Digest { .. } => K_DIGEST,
        Body::Written { .. } => K_WRITTEN,
        Body::Chunk(_) => K_CHUNK,
        Body::Hello { .. } => K_HELLO,
        Body::Genesis { .. } => K_GENESIS,
    };
    o.extend_from_slice(&MAGIC);
    o.extend_from_slice(&VERSION.to_le_bytes());
    o.extend_from_slice(&kind.to_le_bytes());
    o.extend_from_slice(&f.sender.to_le_bytes());
    o.extend_from_slice(&f.seq.to_le_bytes());
    match &f.body {
        Body::Event(e) => match e {
            Event::Join { node, incarnation } | Event::FenceConfirmed { node, incarnation } => {
                o.extend_from_slice(&node.to_le_bytes());
                o.extend_from_slice(&incarnation.to_le_bytes());
            }
            Event::Depart { node }
            | Event::Release { node }
            | Event::GetResyncWork { node }
            | Event::UnknownMarks { node } => {
                o.extend_from_slice(&node.to_le_bytes());
            }
            Event::Mark { node, regions } | Event::Clear { node, regions } => {
                o.extend_from_slice(&node.to_le_bytes());
                o.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                for r in regions {
                    o.extend_from_slice(&r.to_le_bytes());
                }
            }
            Event::VoidCopy { node, region } | Event::Want { node, region } => {
                o.extend_from_slice(&node.to_le_bytes());
                o.extend_from_slice(&region.to_le_bytes());
            }
            Event::SetRegionSync { node, region, in_sync } => {
                o.extend_from_slice(&node.to_le_bytes());
                o.extend_from_slice(&region.to_le_bytes());
                o.push(u8::from(*in_sync));
            }
            Event::HoldMarks { node, incarnation, regions } => {
                o.extend_from_slice(&node.to_le_bytes());
                o.extend_from_slice(&incarnation.to_le_bytes());
                o.extend_from_slice(&(regions.len() as u32).to_le_bytes());
                for r in regions {
                    o.extend_from_slice(&r.to_le_bytes());
                }
            }
        },
        Body::Ack { node, seq } => {
            o.extend_from_slice(&node.to_le_bytes());
            o.extend_from_slice(&seq.to_le_bytes());
        }
        Body::Digest { digest } => o.extend_from_slice(&digest.to_le_bytes()),
        Body::Written { position } => o.extend_from_slice(&position.to_le_bytes()),
        Body::Chunk(c) => {
            o.extend_from_slice(&c.transfer.to_le_bytes());
            o.extend_from_slice(&c.index.to_le_bytes());
            o.extend_from_slice(&c.count.to_le_bytes());
            o.extend_from_slice(&c.total_len.to_le_bytes());
            o.extend_from_slice(&c.digest.to_le_bytes());
            o.extend_from_slice(&(c.data.len() as u32).to_le_bytes());
            o.extend_from_slice(&c.data);
        }
        Body::Hello { stale, reconnected } => {
            o.extend_from_slice(&stale.to_le_bytes());
            o.push(u8::from(*reconnected));
        }
        Body::Genesis { region_count, in_sync, from_stale } => {
            o.extend_from_slice(&region_count.to_le_bytes());
            o.push(u8::from(*in_sync));
            o.push(u8::from(*from_stale));
        }
    }
    o
}

/// Whether `b` starts like a cmirrord `struct clog_request`: two u64 version words in 2..=5,
/// the first little-endian, the second native (equal on little-endian senders, byte-swapped
/// on big-endian ones).
fn cmirrord_version(b: &[u8]) -> Option<u64> {
    let v0 = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let v1 = b.get(8..16)?.try_into().ok().map(u64::from_le_bytes)?;
    ((2..=5).contains(&v0) && (v1 == v0 || v1 == v0.swap_bytes())).then_some(v0)
}

/// Decodes one frame; every length and field is checked, nothing after the frame is allowed.
pub fn decode(b: &[u8]) -> Result<Frame, WireError> {
    if b.get(..4) != Some(&MAGIC[..]) {
        return Err(cmirrord_version(b).map_or(WireError::Magic, WireError::Cmirrord));
    }
    let mut r = Reader(&b[4..]);
    let version = r.u16()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = r.u16()?;
    let sender = r.u32()?;
    let seq = r.u64()?;
    let body = match kind {
        K_JOIN | K_FENCE => {
            let node = r.u32()?;
            let incarnation: Incarnation = u128::from_le_bytes(r.array()?);
            Body::Event(if kind == K_JOIN {
                Event::Join { node, incarnation }
            } else {
                Event::FenceConfirmed { node, incarnation }
            })
        }
        K_DEPART => Body::Event(Event::Depart { node: r.u32()? }),
        K_RELEASE => Body::Event(Event::Release { node: r.u32()? }),
        K_WORK => Body::Event(Event::GetResyncWork { node: r.u32()? }),
        K_UNKNOWN => Body::Event(Event::UnknownMarks { node: r.u32()? }),
        K_VOID => Body::Event(Event::VoidCopy { node: r.u32()?, region: r.u64()? }),
        K_WANT => Body::Event(Event::Want { node: r.u32()?, region: r.u64()? }),
        K_HOLD => {
            let node = r.u32()?;
            let incarnation: Incarnation = u128::from_le_bytes(r.array()?);
            let n = r.u32()? as usize;
            if n > MAX_HOLD_REGIONS {
                return Err(WireError::Field("region count"));
            }
            let regions = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Body::Event(Event::HoldMarks { node, incarnation, regions })
        }
        K_MARK | K_CLEAR => {
            let node = r.u32()?;
            let n = r.u32()? as usize;
            if n > MAX_REGIONS {
                return Err(WireError::Field("region count"));
            }
            let regions = (0..n).map(|_| r.u64()).collect::<Result<Vec<_>, _>>()?;
            Body::Event(if kind == K_MARK { Event::Mark { node, regions } } else { Event::Clear { node, regions } })
        }
        K_SYNC => {
            let node = r.u32()?;
            let region = r.u64()?;
            let in_sync = match r.take(1)?[0] {
                0 => false,
                1 => true,
                _ => return Err(WireError::Field("in_sync flag")),
            };
            Body::Event(Event::SetRegionSync { node, region, in_sync })
        }
        K_ACK => Body::Ack { node: r.u32()?, seq: r.u64()? },
        K_DIGEST => Body::Digest { digest: r.u64()? },
        K_WRITTEN => Body::Written { position: r.u64()? },
        K_CHUNK => {
            let transfer = r.u64()?;
            let index = r.u32()?;
            let count = r.u32()?;
            let total_len = r.u64()?;
            let digest = r.u64()?;
            let len = r.u32()? as usize;
            if index >= count {
                return Err(WireError::Field("chunk index"));
            }
            let data = r.take(len)?.to_vec();
            Body::Chunk(Chunk { transfer, index, count, total_len, digest, data })
        }
        K_HELLO => {
            let stale = r.u64()?;
            let reconnected = match r.take(1)?[0] {
                0 => false,
                1 => true,
                _ => return Err(WireError::Field("reconnected flag")),
            };
            Body::Hello { stale, reconnected }
        }
        K_GENESIS => {
            let region_count = r.u64()?;
            let mut flag = |what| match r.take(1).map(|b| b[0]) {
                Ok(0) => Ok(false),
                Ok(1) => Ok(true),
                Ok(_) => Err(WireError::Field(what)),
                Err(e) => Err(WireError::from(e)),
            };
            let in_sync = flag("in_sync flag")?;
            let from_stale = flag("from_stale flag")?;
            Body::Genesis { region_count, in_sync, from_stale }
        }
        k => return Err(WireError::Kind(k)),
    };
    if !r.0.is_empty() {
        return Err(WireError::Trailing(r.0.len()));
    }
    Ok(Frame { sender, seq, body })
}

/// FNV-1a, the snapshot digest carried by every chunk.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Cuts a snapshot into chunks whose encoded frames are at most `max_frame` bytes (the
/// group's `cpg_max_atomic_msgsize_get()`). An empty snapshot is one empty chunk.
pub fn split(transfer: u64, snapshot: &[u8], max_frame: usize) -> Result<Vec<Chunk>, WireError> {
    let per = max_frame.checked_sub(CHUNK_OVERHEAD).filter(|&n| n > 0).ok_or(WireError::Field("max frame size"))?;
    let pieces: Vec<&[u8]> = if snapshot.is_empty() { vec![&[][..]] } else { snapshot.chunks(per).collect() };
    let count = u32::try_from(pieces.len()).map_err(|_| WireError::Field("chunk count"))?;
    let digest = fnv1a(snapshot);
    Ok(pieces
        .into_iter()
        .enumerate()
        .map(|(i, p)| Chunk {
            transfer,
            index: i as u32,
            count,
            total_len: snapshot.len() as u64,
            digest,
            data: p.to_vec(),
        })
        .collect())
}

/// Rebuilds a snapshot from its chunks, in order.
#[derive(Debug, Default)]
pub struct Assembler {
    current: Option<(u64, u32, Vec<u8>)>,
}

impl Assembler {
    /// Takes the next chunk; returns the snapshot once its last chunk arrived. A chunk 0 of
    /// another transfer starts over (the earlier donor's transfer is abandoned).
    pub fn push(&mut self, c: Chunk) -> Result<Option<Vec<u8>>, WireError> {
        if c.index == 0 {
            if c.total_len > (c.count as u64).saturating_mul(c.data.len().max(1) as u64) {
                return Err(WireError::Field("snapshot length"));
            }
            self.current = Some((c.transfer, 0, Vec::new()));
        }
        let Some((transfer, next, buf)) = self.current.as_mut() else {
            return Err(WireError::OutOfOrder { transfer: c.transfer, index: c.index });
        };
        if *transfer != c.transfer || *next != c.index {
            return Err(WireError::OutOfOrder { transfer: c.transfer, index: c.index });
        }
        if buf.len() as u64 + c.data.len() as u64 > c.total_len {
            self.current = None;
            return Err(WireError::Damaged);
        }
        buf.extend_from_slice(&c.data);
        *next += 1;
        if *next < c.count {
            return Ok(None);
        }
        let Some((_, _, done)) = self.current.take() else { return Ok(None) };
        if done.len() as u64 != c.total_len || fnv1a(&done) != c.digest {
            return Err(WireError::Damaged);
        }
        Ok(Some(done))
    }
}

/// The bytes ended before the field did.
#[derive(Debug)]
pub(super) struct Truncated;

impl From<Truncated> for WireError {
    fn from(_: Truncated) -> Self {
        WireError::Truncated
    }
}

/// A little-endian cursor over a frame or a snapshot; every read is checked.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.0.len() < n {
            return Err(Truncated);
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        self.take(N)?.try_into().map_err(|_| Truncated)
    }
    pub(super) fn u16(&mut self) -> Result<u16, Truncated> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(super) fn u32(&mut self) -> Result<u32, Truncated> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(super) fn u64(&mut self) -> Result<u64, Truncated> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event() -> impl Strategy<Value = Event> {
        let node = any::<u32>();
        prop_oneof![
            (node, any::<u128>()).prop_map(|(node, incarnation)| Event::Join { node, incarnation }),
            node.prop_map(|node| Event::Depart { node }),
            node.prop_map(|node| Event::Release { node }),
            (node, any::<u128>()).prop_map(|(node, incarnation)| Event::FenceConfirmed { node, incarnation }),
            (node, proptest::collection::vec(any::<u64>(), 0..40))
                .prop_map(|(node, regions)| Event::Mark { node, regions }),
            (node, proptest::collection::vec(any::<u64>(), 0..40))
                .prop_map(|(node, regions)| Event::Clear { node, regions }),
            node.prop_map(|node| Event::GetResyncWork { node }),
            node.prop_map(|node| Event::UnknownMarks { node }),
            (node, any::<u64>()).prop_map(|(node, region)| Event::VoidCopy { node, region }),
            (node, any::<u64>()).prop_map(|(node, region)| Event::Want { node, region }),
            (node, any::<u64>(), any::<bool>()).prop_map(|(node, region, in_sync)| Event::SetRegionSync {
                node,
                region,
                in_sync
            }),
            (node, any::<u128>(), proptest::collection::vec(any::<u64>(), 0..40))
                .prop_map(|(node, incarnation, regions)| Event::HoldMarks { node, incarnation, regions }),
        ]
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            event().prop_map(Body::Event),
            (any::<u32>(), any::<u64>()).prop_map(|(node, seq)| Body::Ack { node, seq }),
            any::<u64>().prop_map(|digest| Body::Digest { digest }),
            any::<u64>().prop_map(|position| Body::Written { position }),
            (any::<u64>(), 1u32..5, proptest::collection::vec(any::<u8>(), 0..64)).prop_map(
                |(transfer, count, data)| {
                    Body::Chunk(Chunk { transfer, index: count - 1, count, total_len: 7, digest: 9, data })
                }
            ),
            (any::<u64>(), any::<bool>()).prop_map(|(stale, reconnected)| Body::Hello { stale, reconnected }),
            (any::<u64>(), any::<bool>(), any::<bool>())
                .prop_map(|(region_count, in_sync, from_stale)| Body::Genesis { region_count, in_sync, from_stale }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(sender in any::<u32>(), seq in any::<u64>(), body in body()) {
            let f = Frame { sender, seq, body };
            let bytes = encode(&f);
            prop_assert_eq!(decode(&bytes), Ok(f));
            // Every strict prefix is refused, and so is any byte after the end.
            for cut in 0..bytes.len() {
                prop_assert!(decode(&bytes[..cut]).is_err());
            }
            let mut longer = bytes.clone();
            longer.push(0);
            prop_assert_eq!(decode(&longer), Err(WireError::Trailing(1)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
            let mut framed = MAGIC.to_vec();
            framed.extend_from_slice(&VERSION.to_le_bytes());
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
        }

        /// Chunks fit the atomic limit, and reassemble to the snapshot whatever its size.
        #[test]
        fn transfers_split_within_the_limit_and_reassemble(len in 0usize..5000, max in (CHUNK_OVERHEAD + 1)..600) {
            let snapshot: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let chunks = split(42, &snapshot, max).unwrap();
            let mut a = Assembler::default();
            let mut out = None;
            for c in chunks {
                let frame = Frame { sender: 1, seq: 1, body: Body::Chunk(c.clone()) };
                prop_assert!(encode(&frame).len() <= max);
                prop_assert!(out.is_none());
                out = a.push(c).unwrap();
            }
            prop_assert_eq!(out, Some(snapshot));
        }
    }

    /// protocol.md test vector 10: the clog_request header of a MARK from node 2, as a
    /// little-endian cmirrord sends it; and the big-endian form (second word swapped).
    #[test]
    fn a_cmirrord_message_on_the_group_is_recognised() {
        let mut le = vec![5, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        le.resize(192, 0);
        assert_eq!(decode(&le), Err(WireError::Cmirrord(5)));
        let mut be = le.clone();
        be[8..16].copy_from_slice(&5u64.to_be_bytes());
        assert_eq!(decode(&be), Err(WireError::Cmirrord(5)));
        assert_eq!(decode(b"something else entirely"), Err(WireError::Magic));
    }

    #[test]
    fn another_frame_version_is_refused() {
        let mut b = encode(&Frame { sender: 1, seq: 1, body: Body::Digest { digest: 3 } });
        b[4] = 1; // the frames before this version's event kinds
        assert_eq!(decode(&b), Err(WireError::Version(1)));
    }

    #[test]
    fn a_new_transfer_restarts_assembly_and_a_gap_is_refused() {
        let snap: Vec<u8> = (0..100).collect();
        let first = split(1, &snap, CHUNK_OVERHEAD + 30).unwrap();
        let second = split(2, &snap, CHUNK_OVERHEAD + 30).unwrap();
        let mut a = Assembler::default();
        assert_eq!(a.push(first[0].clone()), Ok(None));
        assert_eq!(a.push(first[1].clone()), Ok(None));
        // The donor died; another member restarts the transfer from chunk 0.
        let mut out = None;
        for c in second.clone() {
            out = a.push(c).unwrap();
        }
        assert_eq!(out, Some(snap.clone()));
        let mut b = Assembler::default();
        b.push(second[0].clone()).unwrap();
        assert_eq!(b.push(second[2].clone()), Err(WireError::OutOfOrder { transfer: 2, index: 2 }));
        let mut c = Assembler::default();
        let mut bad = second.clone();
        bad[1].data[0] ^= 1;
        let mut got = Ok(None);
        for ch in bad {
            got = c.push(ch);
        }
        assert_eq!(got, Err(WireError::Damaged));
    }
}
