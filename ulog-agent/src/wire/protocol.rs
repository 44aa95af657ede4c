//! Decoding connector datagrams into requests, and encoding replies.
//!
//! A datagram is `nlmsghdr | cn_msg | dm_ulog_request | payload`. Decoding never panics and
//! never trusts a length field: every length is checked against the bytes actually received.
//! What cannot be decoded is classified by how it can be answered:
//!
//! * the 160-byte request header is readable: a full reply with `-EINVAL` (matched by the
//!   kernel on the header's seq);
//! * only the `cn_msg` is readable: an ack-only reply carrying `EINVAL` (matched on the
//!   `cn_msg` seq);
//! * not even that, or the connector id isn't the dm log's: dropped (nobody could match an
//!   answer, and a foreign id isn't addressed to us).
//!
//! Replies are built in a fixed-size buffer on the stack: no allocation on the request path.

use ulog_common::{
    CnMsg, DmUlogRequest, NlMsgHdr, RequestType, CN_MSG_LEN, DM_NAME_LEN, DM_ULOG_CB_ID, NLMSG_DONE, NLMSG_HDRLEN,
    ULOG_OFFSET, ULOG_REQUEST_LEN,
};

/// Longest device argument a CTR reply can carry (the NUL takes the 128th byte).
pub const DM_NAME_LEN_MAX: usize = DM_NAME_LEN;

/// Largest reply payload ulog ever sends (STATUS text, CTR device name).
pub const MAX_REPLY_PAYLOAD: usize = 256;

/// Why a datagram was not a well-formed request. The names are stable: they label metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// Shorter than `nlmsghdr` + `cn_msg`.
    Truncated,
    /// Connector id other than {7, 1}.
    ForeignId,
    /// `nlmsg_len` disagrees with the datagram's length.
    BadNlmsgLen,
    /// `cn_msg.len` runs past the datagram or disagrees with the request's `data_size`.
    BadCnLen,
    /// `cn_msg.len` too short for a request header.
    NoRequestHeader,
    /// `data_size` runs past the bytes received.
    BadDataSize,
    /// The uuid field has no NUL.
    UnterminatedUuid,
    /// The datagram was larger than the receive buffer.
    Oversized,
}

impl Malformed {
    /// Every reason, for metric tables.
    pub const ALL: [Malformed; 8] = [
        Self::Truncated,
        Self::ForeignId,
        Self::BadNlmsgLen,
        Self::BadCnLen,
        Self::NoRequestHeader,
        Self::BadDataSize,
        Self::UnterminatedUuid,
        Self::Oversized,
    ];

    /// Stable snake_case name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::ForeignId => "foreign_id",
            Self::BadNlmsgLen => "bad_nlmsg_len",
            Self::BadCnLen => "bad_cn_len",
            Self::NoRequestHeader => "no_request_header",
            Self::BadDataSize => "bad_data_size",
            Self::UnterminatedUuid => "unterminated_uuid",
            Self::Oversized => "oversized",
        }
    }

    /// Index into `ALL`.
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// How a malformed datagram can be answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Nobody can match an answer: drop.
    Drop,
    /// Ack-only reply with this `cn_msg` seq.
    Ack {
        /// `cn_msg.seq` of the datagram.
        cn_seq: u32,
    },
    /// Full reply to this header.
    Full {
        /// The request header as received.
        header: DmUlogRequest,
        /// `cn_msg.seq` of the datagram.
        cn_seq: u32,
    },
}

/// A datagram that is not a well-formed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub reason: Malformed,
    /// How to answer it (always with EINVAL).
    pub answer: Answer,
}

/// A well-formed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// `cn_msg.seq`, echoed in the reply.
    pub cn_seq: u32,
    /// The request header.
    pub header: DmUlogRequest,
    /// The request type, if the (masked) number is one of the 17.
    pub kind: Option<RequestType>,
    /// Exactly `data_size` bytes.
    pub payload: &'a [u8],
    /// Length of the uuid in `header` without its NUL (found once, at decoding).
    uuid_len: u8,
}

impl Request<'_> {
    /// The uuid without its NUL (decoding guarantees it has one).
    pub fn uuid(&self) -> &[u8] {
        &self.header.uuid[..usize::from(self.uuid_len)]
    }
}

/// Decodes one received datagram (`buf` is exactly what `recvfrom` returned).
// Both outcomes carry the 160-byte header by value, on purpose: no allocation on any path.
#[allow(clippy::result_large_err)]
pub fn decode(buf: &[u8]) -> Result<Request<'_>, Rejected> {
    let (Some(nlh), Some(cn)) = (NlMsgHdr::read(buf), buf.get(NLMSG_HDRLEN..).and_then(CnMsg::read)) else {
        return Err(Rejected { reason: Malformed::Truncated, answer: Answer::Drop });
    };
    if cn.id != DM_ULOG_CB_ID {
        return Err(Rejected { reason: Malformed::ForeignId, answer: Answer::Drop });
    }
    let cn_len = usize::from(cn.len);
    let header = if cn_len >= ULOG_REQUEST_LEN { buf.get(ULOG_OFFSET..).and_then(DmUlogRequest::read) } else { None };
    let reject = |reason| {
        let answer = match header {
            Some(header) => Answer::Full { header, cn_seq: cn.seq },
            None => Answer::Ack { cn_seq: cn.seq },
        };
        Err(Rejected { reason, answer })
    };
    // The kernel pads a datagram to 4 bytes past nlmsg_len; anything else disagrees.
    let nl_len = nlh.len as usize;
    if nl_len < ULOG_OFFSET || nl_len > buf.len() || buf.len() > (nl_len + 3) & !3 {
        return reject(Malformed::BadNlmsgLen);
    }
    if ULOG_OFFSET + cn_len > nl_len {
        return reject(Malformed::BadCnLen);
    }
    let Some(header) = header else {
        return reject(Malformed::NoRequestHeader);
    };
    let data_size = header.data_size as usize;
    let have = cn_len - ULOG_REQUEST_LEN;
    if data_size > have {
        return reject(Malformed::BadDataSize);
    }
    if data_size != have {
        return reject(Malformed::BadCnLen);
    }
    let Some(uuid_len) = memchr::memchr(0, &header.uuid) else {
        return reject(Malformed::UnterminatedUuid);
    };
    let start = ULOG_OFFSET + ULOG_REQUEST_LEN;
    Ok(Request {
        cn_seq: cn.seq,
        header,
        kind: RequestType::from_raw(header.request_type),
        payload: &buf[start..start + data_size],
        // A NUL among the 129 bytes: at most 128.
        uuid_len: uuid_len as u8,
    })
}

const REPLY_CAP: usize = ULOG_OFFSET + ULOG_REQUEST_LEN + MAX_REPLY_PAYLOAD;

/// An encoded reply datagram, built on the stack.
#[derive(Clone)]
pub struct ReplyBuf {
    buf: [u8; REPLY_CAP],
    len: usize,
}

impl std::fmt::Debug for ReplyBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyBuf").field("len", &self.len).finish()
    }
}

impl ReplyBuf {
    /// A full reply echoing `header` with `error` and `payload` (truncated to
    /// `MAX_REPLY_PAYLOAD`, which no caller exceeds). `port` goes into `nlmsg_pid`.
    pub fn full(header: &DmUlogRequest, cn_seq: u32, error: i32, payload: &[u8], port: u32) -> Self {
        let payload = &payload[..payload.len().min(MAX_REPLY_PAYLOAD)];
        let cn_len = ULOG_REQUEST_LEN + payload.len();
        let len = ULOG_OFFSET + cn_len;
        let mut r = Self { buf: [0; REPLY_CAP], len };
        NlMsgHdr { len: len as u32, kind: NLMSG_DONE, flags: 0, seq: cn_seq, pid: port }.write(&mut r.buf);
        CnMsg { id: DM_ULOG_CB_ID, seq: cn_seq, ack: 0, len: cn_len as u16, flags: 0 }
            .write(&mut r.buf[NLMSG_HDRLEN..]);
        let mut h = *header;
        h.error = error;
        h.data_size = payload.len() as u32;
        h.write(&mut r.buf[ULOG_OFFSET..]);
        r.buf[ULOG_OFFSET + ULOG_REQUEST_LEN..len].copy_from_slice(payload);
        r
    }

    /// An ack-only reply: the kernel reads `-ack` as the result.
    pub fn ack(cn_seq: u32, errno: u32, port: u32) -> Self {
        let len = NLMSG_HDRLEN + CN_MSG_LEN;
        let mut r = Self { buf: [0; REPLY_CAP], len };
        NlMsgHdr { len: len as u32, kind: NLMSG_DONE, flags: 0, seq: cn_seq, pid: port }.write(&mut r.buf);
        CnMsg { id: DM_ULOG_CB_ID, seq: cn_seq, ack: errno, len: 0, flags: 0 }.write(&mut r.buf[NLMSG_HDRLEN..]);
        r
    }

    /// The datagram bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Reads a payload of `u64` regions (`data_size % 8 == 0`), in host order.
pub fn regions(payload: &[u8]) -> Option<impl Iterator<Item = u64> + Clone + '_> {
    if !payload.len().is_multiple_of(8) {
        return None;
    }
    Some(payload.as_chunks::<8>().0.iter().map(|c| u64::from_ne_bytes(*c)))
}

/// Reads exactly one `u64`.
pub fn one_u64(payload: &[u8]) -> Option<u64> {
    let b: [u8; 8] = payload.try_into().ok()?;
    Some(u64::from_ne_bytes(b))
}

/// Reads exactly two 8-byte fields (SET_REGION_SYNC's `{u64 region; i64 in_sync}`).
pub fn two_u64(payload: &[u8]) -> Option<(u64, u64)> {
    if payload.len() != 16 {
        return None;
    }
    Some((one_u64(&payload[..8])?, one_u64(&payload[8..])?))
}

/// Encodes `{a, b}` as two host-order 8-byte fields.
pub fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_ne_bytes());
    out[8..].copy_from_slice(&b.to_ne_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ulog_common::datagram_len;

    fn datagram(kind: u32, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = datagram_len(payload.len());
        let mut b = vec![0u8; (len + 3) & !3];
        NlMsgHdr { len: len as u32, kind: NLMSG_DONE, flags: 0, seq, pid: 0 }.write(&mut b);
        let cn_len = (ULOG_REQUEST_LEN + payload.len()) as u16;
        CnMsg { id: DM_ULOG_CB_ID, seq, ack: 0, len: cn_len, flags: 0 }.write(&mut b[NLMSG_HDRLEN..]);
        let mut h = DmUlogRequest::zeroed();
        h.luid = 0xffff_8880_03a1_b000;
        h.set_uuid(b"LVM-cmirrortest0001");
        h.version = 3;
        h.seq = seq;
        h.request_type = kind;
        h.data_size = payload.len() as u32;
        h.write(&mut b[ULOG_OFFSET..]);
        b[ULOG_OFFSET + ULOG_REQUEST_LEN..len].copy_from_slice(payload);
        b
    }

    #[test]
    fn decodes_the_ctr_vector_with_kernel_padding() {
        let b = datagram(1, 1, b"2097152 clustered-core 1024");
        assert_eq!(b.len(), 224, "223 padded to 4");
        let r = decode(&b).unwrap();
        assert_eq!(r.kind, Some(RequestType::Ctr));
        assert_eq!(r.payload, b"2097152 clustered-core 1024");
        assert_eq!(r.uuid(), b"LVM-cmirrortest0001");
        assert_eq!(r.cn_seq, 1);
        // Exactly nlmsg_len bytes is fine too.
        assert!(decode(&b[..223]).is_ok());
    }

    #[test]
    fn classifies_malformed_datagrams() {
        let good = datagram(10, 7, &[0u8; 24]);
        assert_eq!(decode(&good[..30]).unwrap_err().answer, Answer::Drop);
        let mut foreign = good.clone();
        foreign[16] = 1; // idx 1 = proc connector
        assert_eq!(decode(&foreign).unwrap_err().reason, Malformed::ForeignId);
        // Header cut short: only the cn_msg can be answered.
        let e = decode(&good[..100]).unwrap_err();
        assert_eq!(e.reason, Malformed::BadNlmsgLen);
        assert_eq!(e.answer, Answer::Ack { cn_seq: 7 });
        // data_size beyond the datagram: header readable -> full reply.
        let mut big = good.clone();
        big[ULOG_OFFSET + 156..ULOG_OFFSET + 160].copy_from_slice(&400u32.to_ne_bytes());
        let e = decode(&big).unwrap_err();
        assert_eq!(e.reason, Malformed::BadDataSize);
        assert!(matches!(e.answer, Answer::Full { cn_seq: 7, header } if header.seq == 7));
        // data_size smaller than cn_msg.len says.
        let mut small = good.clone();
        small[ULOG_OFFSET + 156..ULOG_OFFSET + 160].copy_from_slice(&8u32.to_ne_bytes());
        assert_eq!(decode(&small).unwrap_err().reason, Malformed::BadCnLen);
        // cn_msg.len too small for a header.
        let mut tiny = good.clone();
        tiny[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18].copy_from_slice(&20u16.to_ne_bytes());
        let e = decode(&tiny).unwrap_err();
        assert_eq!(e.answer, Answer::Ack { cn_seq: 7 });
        // uuid without NUL.
        let mut nonul = good.clone();
        nonul[ULOG_OFFSET + 8..ULOG_OFFSET + 137].fill(b'u');
        assert_eq!(decode(&nonul).unwrap_err().reason, Malformed::UnterminatedUuid);
        // Unknown type decodes; the server answers it.
        assert_eq!(decode(&datagram(0x12, 1, &[])).unwrap().kind, None);
        assert_eq!(decode(&datagram(0x1201, 1, &[])).unwrap().kind, Some(RequestType::Ctr));
    }

    #[test]
    fn reply_forms() {
        let dgram = datagram(6, 99, &[]);
        let req = decode(&dgram).unwrap();
        let r = ReplyBuf::full(&req.header, req.cn_seq, 0, &1024u64.to_ne_bytes(), 42);
        let b = r.as_bytes();
        assert_eq!(b.len(), ULOG_OFFSET + ULOG_REQUEST_LEN + 8);
        assert_eq!(CnMsg::read(&b[16..]).unwrap().len, 168);
        let h = DmUlogRequest::read(&b[ULOG_OFFSET..]).unwrap();
        assert_eq!((h.seq, h.error, h.data_size, h.request_type), (99, 0, 8, 6));
        assert_eq!(&b[ULOG_OFFSET + 160..], &[0x00, 0x04, 0, 0, 0, 0, 0, 0]);
        let a = ReplyBuf::ack(9, 11, 1234);
        assert_eq!(a.as_bytes().len(), 36);
        assert_eq!(a.as_bytes()[0x1c], 0x0b);
        // Vectors 5-7: the two-field payloads.
        assert_eq!(pair(1, 42), [1, 0, 0, 0, 0, 0, 0, 0, 0x2a, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(two_u64(&pair(42, 1)), Some((42, 1)));
        assert_eq!(regions(&[0u8; 12]).map(|i| i.count()), None);
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_answers_are_consistent(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            match decode(&bytes) {
                Ok(r) => prop_assert_eq!(r.payload.len(), r.header.data_size as usize),
                Err(Rejected { answer: Answer::Full { header, .. }, .. }) => {
                    // Whatever we echo must encode to a reply the kernel accepts.
                    let rep = ReplyBuf::full(&header, 1, -libc::EINVAL, &[], 0);
                    prop_assert_eq!(rep.as_bytes().len(), ULOG_OFFSET + ULOG_REQUEST_LEN);
                }
                Err(_) => {}
            }
        }

        #[test]
        fn mutated_requests_never_panic(kind in 0u32..40, seq: u32, payload in proptest::collection::vec(any::<u8>(), 0..64), flip in 0usize..300, val: u8, cut in 0usize..300) {
            let mut b = datagram(kind, seq, &payload);
            if flip < b.len() { b[flip] = val; }
            let cut = cut.min(b.len());
            let _ = decode(&b[..cut]);
            let _ = decode(&b);
        }
    }
}
