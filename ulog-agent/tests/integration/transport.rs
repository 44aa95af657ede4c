//! The connector transport: reply form and header echo, malformed datagrams, senders that must be
//! ignored, request-type masking, many requests in flight, and isolation between logs.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;

#[test]
fn replies_are_full_and_echo_the_request_header() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    // Version 2 and a cn_msg.seq different from the ulog seq: both must come back.
    let req = Request::new(T::GetRegionSize, &log.uuid, log.luid, vec![]).version(2);
    let (seq, mut d) = raw_request(&mut a.peer, &req);
    put_u32(&mut d, at::CN_SEQ, seq.wrapping_add(0x5000));
    a.peer.expect(seq, T::GetRegionSize.raw(), Capacity::Default);
    a.peer.send_raw(&d).unwrap();
    let r = a.peer.wait_reply(seq, Duration::from_secs(5)).unwrap();
    assert_eq!(r.form, ReplyForm::Full);
    assert_eq!(r.error, 0);
    assert_eq!(r.payload, 8u64.to_ne_bytes());
    assert_eq!(r.cn.seq, seq.wrapping_add(0x5000), "cn_msg.seq echoes the request's");
    assert_eq!(r.cn.len as usize, ULOG_REQUEST_LEN + 8);
    let h = r.header.unwrap();
    assert_eq!(h.luid, log.luid);
    assert_eq!(h.uuid_bytes(), Some(log.uuid.as_bytes()));
    assert_eq!(h.version, 2);
    assert_eq!(h.seq, seq);
    assert_eq!(h.request_type, T::GetRegionSize.raw());
    assert_eq!(h.data_size, 8);
    // An error reply is a full reply with the header echoed too.
    let other = Log::new("LVM-nosuchlog", 77);
    let r = a.call(&other, T::InSync, &0u64.to_ne_bytes());
    assert_eq!(r.error, ESRCH, "unknown log: the kernel is made to reconnect");
    let h = r.header.unwrap();
    assert_eq!((h.luid, h.uuid_bytes(), h.version), (77, Some(&b"LVM-nosuchlog"[..]), 3));
    assert_eq!(h.request_type, T::InSync.raw());
    assert_eq!(r.cn.seq, h.seq);
}

#[test]
fn kernel_padding_after_nlmsg_len_is_accepted() {
    // nlmsg_put() pads the datagram to 4 bytes but nlmsg_len counts only the message: a 27-byte
    // ctr string gives nlmsg_len 223 in a 224-byte datagram (protocol.md §7.1).
    let mut a = Agent::start();
    let log = Log::nth(0);
    let ctr = "2097152 clustered-core 1024";
    let (seq, d) = raw_request(&mut a.peer, &Request::ctr(&log.uuid, log.luid, ctr));
    assert_eq!((u32::from_ne_bytes(d[0..4].try_into().unwrap()), d.len()), (223, 224));
    a.peer.expect(seq, T::Ctr.raw(), Capacity::Default);
    a.peer.send_raw(&d).unwrap();
    let r = a.peer.wait_reply(seq, Duration::from_secs(5)).unwrap();
    assert_eq!(r.error, 0, "a padded kernel datagram is well-formed: {r}");
    assert_eq!(a.region_size(&log), 1024);
    // Every padding length: payloads of 1..=4 bytes (MARK wants 8, so these are -EINVAL, but
    // as full replies to a readable request, not as a rejected datagram).
    a.resume(&log);
    for len in 1..=4usize {
        let r = a.call(&log, T::MarkRegion, &vec![0u8; len]);
        assert_eq!(r.error, EINVAL, "{len}-byte MARK payload");
    }
    assert_eq!(a.region_size(&log), 1024);
}

#[test]
fn upper_24_bits_of_request_type_are_ignored() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    let r = a.request(&Request::raw(0xABCD_0001, &log.uuid, log.luid, CORE.as_bytes()));
    assert_eq!(r.error, 0, "0xABCD0001 is a CTR: {r}");
    let r = a.request(&Request::raw(0x1234_5600 | T::GetRegionSize.raw(), &log.uuid, log.luid, vec![]));
    assert_eq!((r.error, r.payload.clone()), (0, 8u64.to_ne_bytes().to_vec()), "{r}");
    assert_eq!(r.header.unwrap().request_type & 0xFF, T::GetRegionSize.raw());
    let r = a.request(&Request::raw(0xFF00_0000 | T::Resume.raw(), &log.uuid, log.luid, vec![]));
    assert_eq!(r.error, 0);
    assert_eq!(a.resync_work(&log), (1, 0), "the RESUME took effect");
}

#[test]
fn request_types_outside_1_to_17_are_einval() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    for t in [0u32, 18, 19, 0x7F, 0xFF, 0x100, 0xABCD_0000, 0x0000_0112] {
        let r = a.request(&Request::raw(t, &log.uuid, log.luid, vec![]));
        assert_eq!(r.error, EINVAL, "type {t:#x}: {r}");
        assert_eq!(r.header.unwrap().seq, r.seq);
    }
    assert_eq!(a.region_size(&log), 8, "the log is unaffected");
}

/// Sends a raw datagram and waits for an ack-only reply matched by `cn_seq`.
fn expect_ack(a: &mut Agent, d: &[u8], cn_seq: u32, what: &str) {
    a.peer.expect(cn_seq, 0, Capacity::Unbounded);
    a.peer.send_raw(d).unwrap();
    let r = a.peer.wait_reply(cn_seq, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(r.form, ReplyForm::AckOnly, "{what}: an ack-only reply ({r})");
    assert_eq!(r.cn.ack, libc::EINVAL as u32, "{what}: ack = EINVAL (positive)");
    assert_eq!(r.error, EINVAL, "{what}");
}

#[test]
fn datagrams_without_a_readable_header_get_an_einval_ack() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);

    // cn_msg.len < 160, consistent otherwise (100 bytes of data).
    let seq = a.peer.next_seq();
    let mut d = vec![0u8; ULOG_OFFSET + 100];
    let len = d.len() as u32;
    put_u32(&mut d, at::NL_LEN, len);
    put_u16(&mut d, 4, 3);
    put_u32(&mut d, 8, seq);
    put_u32(&mut d, at::CN_IDX, 7);
    put_u32(&mut d, at::CN_VAL, 1);
    put_u32(&mut d, at::CN_SEQ, seq);
    put_u16(&mut d, at::CN_LEN, 100);
    expect_ack(&mut a, &d, seq, "cn_msg.len 100");

    // cn_msg.len 0 (the shape of an ack).
    let seq = a.peer.next_seq();
    let mut d0 = d[..ULOG_OFFSET].to_vec();
    put_u32(&mut d0, at::NL_LEN, ULOG_OFFSET as u32);
    put_u32(&mut d0, at::CN_SEQ, seq);
    put_u16(&mut d0, at::CN_LEN, 0);
    expect_ack(&mut a, &d0, seq, "cn_msg.len 0");

    // A whole request cut short inside its header (the datagram and nlmsg_len say 136 bytes).
    let req = Request::new(T::InSync, &log.uuid, log.luid, 0u64.to_ne_bytes());
    let (seq, full) = raw_request(&mut a.peer, &req);
    let mut cut = full[..ULOG_OFFSET + 100].to_vec();
    let len = cut.len() as u32;
    put_u32(&mut cut, at::NL_LEN, len);
    expect_ack(&mut a, &cut, seq, "datagram ends inside the ulog header");

    // Same, but with nlmsg_len and cn_msg.len still claiming the whole request.
    let (seq, full) = raw_request(&mut a.peer, &req);
    expect_ack(&mut a, &full[..ULOG_OFFSET + 120], seq, "truncated datagram with the original lengths");

    assert!(a.peer.take_unmatched().is_empty());
    assert_eq!(a.region_size(&log), 8);
}

#[test]
fn inconsistent_headers_get_a_full_einval_reply() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.set_sync(&log, 0, 1);
    let req = Request::new(T::InSync, &log.uuid, log.luid, 0u64.to_ne_bytes());
    type Mangle = fn(&mut Vec<u8>);
    let cases: [(&str, Mangle); 6] = [
        ("8 bytes after the message (nlmsg_len < datagram)", |d| d.extend_from_slice(&[0xAA; 8])),
        ("nlmsg_len > datagram", |d| {
            let l = u32::from_ne_bytes(d[0..4].try_into().unwrap());
            put_u32(d, at::NL_LEN, l + 8);
        }),
        ("cn_msg.len beyond the bytes present", |d| put_u16(d, at::CN_LEN, (ULOG_REQUEST_LEN + 8 + 8) as u16)),
        ("data_size beyond the bytes present", |d| put_u32(d, at::DATA_SIZE, 16)),
        ("data_size far beyond the bytes present", |d| put_u32(d, at::DATA_SIZE, u32::MAX)),
        ("uuid without NUL", |d| d[at::UUID..at::UUID + 129].fill(b'A')),
    ];
    for (what, mangle) in cases {
        let (seq, mut d) = raw_request(&mut a.peer, &req);
        mangle(&mut d);
        a.peer.expect(seq, T::InSync.raw(), Capacity::Default);
        a.peer.send_raw(&d).unwrap();
        let r = a.peer.wait_reply(seq, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.form, ReplyForm::Full, "{what}: {r}");
        assert_eq!(r.error, EINVAL, "{what}: {r}");
        assert_eq!(r.cn.seq, seq, "{what}: cn_msg.seq echoed");
    }
    assert!(a.in_sync(&log, 0), "the well-formed request still answers 1");
    assert!(a.peer.take_unmatched().is_empty());
}

#[test]
fn short_datagrams_and_foreign_connector_ids_get_no_reply() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    let req = Request::new(T::GetRegionSize, &log.uuid, log.luid, vec![]);
    let (_, good) = raw_request(&mut a.peer, &req);
    // (0 bytes cannot be sent at all: netlink_sendmsg refuses it with ENODATA.)
    for len in [1usize, 15, 16, 20, 35] {
        a.peer.send_raw(&good[..len]).unwrap();
    }
    for (idx, val) in [(7u32, 2u32), (8, 1), (1, 1), (0, 0)] {
        let (_, mut d) = raw_request(&mut a.peer, &req);
        put_u32(&mut d, at::CN_IDX, idx);
        put_u32(&mut d, at::CN_VAL, val);
        a.peer.send_raw(&d).unwrap();
    }
    a.assert_no_reply(&log, "datagrams shorter than nlmsghdr+cn_msg, or for another connector id");
}

#[test]
fn requests_from_a_foreign_port_are_ignored() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    let mut stranger = KernelPeer::open().unwrap();
    assert_ne!(stranger.port(), a.peer.port());
    let b = Log::nth(1);
    stranger.send(&Request::new(T::GetRegionSize, &log.uuid, log.luid, vec![])).unwrap();
    stranger.send(&Request::ctr(&b.uuid, b.luid, CORE)).unwrap();
    stranger.send(&Request::new(T::Dtr, &log.uuid, log.luid, vec![])).unwrap();
    a.assert_no_reply(&log, "the agent's own peer");
    if let Err(e) = stranger.assert_silent(QUIET) {
        panic!("a sender that is neither port 0 nor the accepted peer got an answer: {e}");
    }
    a.expect_err(&b, T::GetRegionSize, &[], EINVAL, "the stranger's CTR must not have been applied");
    assert_eq!(a.region_size(&log), 8, "the stranger's DTR must not have been applied");
}

#[test]
fn replies_are_unicast_to_the_sender_never_multicast() {
    let mut a = Agent::start();
    let mut listener = GroupListener::open().unwrap();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.mark(&log, &[1]);
    a.expect_err(&log, T::InSync, &[1, 2, 3], EINVAL, "short payload");
    a.ok(&log, T::StatusInfo, &[]);
    let mut from = HashMap::new();
    while let Some(d) = listener.recv(QUIET).unwrap() {
        *from.entry((d.from_port, d.groups)).or_insert(0) += 1;
    }
    let peer = a.peer.port();
    for (&(port, groups), n) in &from {
        assert_eq!(
            port, peer,
            "{n} datagram(s) multicast to group 7 from port {port} (groups {groups:#x}): replies must be unicast"
        );
    }
    assert!(from.contains_key(&(peer, 1 << 6)), "the listener saw the requests: {from:?}");
}

#[test]
fn many_requests_in_flight_are_all_answered_and_matched() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    // 512 sectors / 8 = 64 regions; every third region in sync.
    a.create(&log, "512 clustered-core 8");
    for r in (0..64).filter(|r| r % 3 == 0) {
        a.set_sync(&log, r, 1);
    }
    let mut sent = HashMap::new();
    for i in 0..32u64 {
        let r = 63 - 2 * i;
        let seq = a.peer.send(&Request::new(T::InSync, &log.uuid, log.luid, r.to_ne_bytes())).unwrap();
        sent.insert(seq, r);
    }
    // And a few of other types in the same burst.
    let rs = a.peer.send(&Request::new(T::GetRegionSize, &log.uuid, log.luid, vec![])).unwrap();
    let sc = a.peer.send(&Request::new(T::GetSyncCount, &log.uuid, log.luid, vec![])).unwrap();
    let mut got = HashMap::new();
    for _ in 0..34 {
        let r = a.peer.recv_reply(Duration::from_secs(10)).unwrap();
        assert_eq!(r.error, 0, "{r}");
        assert!(got.insert(r.seq, r.payload).is_none(), "seq answered twice");
    }
    for (seq, region) in &sent {
        let want = if region % 3 == 0 { 1i64 } else { 0 };
        assert_eq!(got[seq], want.to_ne_bytes(), "IN_SYNC({region}) seq {seq}");
    }
    assert_eq!(got[&rs], 8u64.to_ne_bytes());
    assert_eq!(got[&sc], 22u64.to_ne_bytes());
    assert!(a.peer.outstanding().is_empty());
    assert!(a.peer.take_unmatched().is_empty());
}

#[test]
fn sequence_numbers_wrap() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.peer.set_next_seq(u32::MAX - 2);
    for _ in 0..6 {
        assert_eq!(a.region_size(&log), 8);
    }
    assert!(a.peer.take_unmatched().is_empty());
}

#[test]
fn serves_log_b_while_log_a_gets_malformed_requests() {
    let mut a = Agent::start();
    let la = Log::new("LVM-ulog-log-A", 1);
    let lb = Log::new("LVM-ulog-log-B", 2);
    a.create(&la, CORE);
    a.create(&lb, CORE);
    for i in 0..N {
        // Garbage for A, of every kind...
        a.expect_err(&la, T::InSync, &[0; 4], EINVAL, "4-byte IN_SYNC");
        a.expect_err(&la, T::MarkRegion, &[0; 12], EINVAL, "12-byte MARK");
        a.expect_err(&la, T::SetRegionSync, &set_sync_payload(N + i, 1), EINVAL, "region out of range");
        a.expect_err(&la, T::ClearRegion, &regions_payload(&[u64::MAX]), EINVAL, "region u64::MAX");
        let r = a.request(&Request::raw(0x55, &la.uuid, la.luid, vec![1, 2, 3]));
        assert_eq!(r.error, EINVAL);
        let (seq, mut d) =
            raw_request(&mut a.peer, &Request::new(T::MarkRegion, &la.uuid, la.luid, regions_payload(&[i])));
        put_u32(&mut d, at::DATA_SIZE, 4096);
        a.peer.expect(seq, T::MarkRegion.raw(), Capacity::Default);
        a.peer.send_raw(&d).unwrap();
        assert_eq!(a.peer.wait_reply(seq, Duration::from_secs(5)).unwrap().error, EINVAL);
        a.peer.send_raw(&d[..30]).unwrap();
        // ...while B is used normally.
        a.mark(&lb, &[i]);
        a.set_sync(&lb, i, 1);
        assert!(a.in_sync(&lb, i));
        assert!(!a.is_clean(&lb, i));
        a.flush(&lb, &[]);
    }
    assert_eq!(a.sync_count(&lb), N);
    assert_eq!(a.clean_map(&lb, N), "0".repeat(N as usize));
    // A was not touched by its garbage, and still works.
    assert_eq!(a.sync_count(&la), 0);
    assert_eq!(a.clean_map(&la, N), "1".repeat(N as usize));
    a.mark(&la, &[3]);
    assert!(!a.is_clean(&la, 3));
    a.assert_no_reply(&lb, "nothing left over");
}
