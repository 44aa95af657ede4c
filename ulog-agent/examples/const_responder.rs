//! A do-nothing dm-log-userspace server that answers every request from constants: the floor
//! that `cargo xtask vm bench` measures ulog-agent against (a benchmark fixture, not a tool).
//!
//! It serves whichever mirror the kernel asks about, as if every region were in sync and clean:
//!
//! | request | answer |
//! |---|---|
//! | CTR | ok, no payload (so a `clustered-disk` table would get no log device: use it for `clustered-core`) |
//! | GET_REGION_SIZE | the region size parsed from the last CTR string |
//! | IN_SYNC, IS_CLEAN | 1 |
//! | GET_RESYNC_WORK | `{i: 0, region: 0}` (nothing to do) |
//! | SET_REGION_SYNC | ok |
//! | GET_SYNC_COUNT | the region count (dev_sectors / region_size, rounded up) |
//! | IS_REMOTE_RECOVERING | `{is_recovering: 0, in_sync_hint: region count}` |
//! | STATUS_INFO, STATUS_TABLE | `"1 clustered-core"` (NUL counted, as the agent does) |
//! | everything else | ok, no payload |
//!
//! Socket set-up as the agent's (ulog-agent/src/server/transport.rs): NETLINK_CONNECTOR bound without
//! groups, group 7 joined with NETLINK_ADD_MEMBERSHIP, 8 MiB receive queue, blocking `recvfrom`
//! with a 250 ms timeout, one `sendto` per request to the sender's port with the group cleared.
//! No threads, no allocation per request, no validation beyond the length. It counts requests by
//! type and prints the counts on SIGTERM/SIGINT (`REQUESTS <type> <count>` lines), then exits 0.
//!
//! `--resync` (the resync floor): a CTR without `nosync` starts a mirror with nothing in sync,
//! and the resync requests are answered from two counters instead, as cheaply as they can be
//! answered correctly for a resync that recovers regions in order:
//!
//! | request | answer with `--resync` (after a CTR without `nosync`) |
//! |---|---|
//! | GET_RESYNC_WORK | `{1, next}` and `next += 1` while `next < regions`, then `{0, regions}` |
//! | SET_REGION_SYNC(r, 1) | `synced += 1` (bounded by the region count) |
//! | GET_SYNC_COUNT | `synced` |
//! | IN_SYNC, IS_CLEAN | `region < synced` |
//! | IS_REMOTE_RECOVERING | `{0, regions - 1}` while `synced < regions`, then `{0, regions}` (ulog's contract) |
//!
//! Run as root: `cargo run --release -p ulog-agent --example const_responder [-- --resync]`.

use std::io::Write;
use std::mem::{size_of, zeroed};
use std::sync::atomic::{AtomicBool, Ordering};

use ulog_common::{
    offsets, RequestType, CN_IDX_DM, NETLINK_CONNECTOR, NLMSG_HDRLEN, REQUEST_TYPE_COUNT, ULOG_OFFSET, ULOG_REQUEST_LEN,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn check(r: libc::c_int, what: &str) {
    if r < 0 {
        eprintln!("const_responder: {what}: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
}

fn setsockopt<T>(fd: libc::c_int, level: libc::c_int, name: libc::c_int, v: &T) -> libc::c_int {
    // SAFETY: v points to a T of the size passed.
    unsafe { libc::setsockopt(fd, level, name, (v as *const T).cast(), size_of::<T>() as u32) }
}

/// (region size, region count) from a CTR string `<dev_sectors> clustered-core <region_size> ...`
/// or `<dev_sectors> clustered-disk <dev> <region_size> ...`.
fn parse_ctr(payload: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(payload).ok()?.trim_end_matches('\0');
    let t: Vec<&str> = s.split_whitespace().collect();
    let dev: u64 = t.first()?.parse().ok()?;
    let rs: u64 = if *t.get(1)? == "clustered-disk" { t.get(3)? } else { t.get(2)? }.parse().ok()?;
    (rs > 0).then(|| (rs, dev.div_ceil(rs)))
}

fn main() {
    // SIGTERM/SIGINT without SA_RESTART: recvfrom returns EINTR (or the 250 ms timeout passes).
    // SAFETY: installing a handler that only stores an atomic.
    unsafe {
        let mut sa: libc::sigaction = zeroed();
        sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_CONNECTOR) };
    check(fd, "socket");
    // SAFETY: an all-zero sockaddr_nl is valid.
    let mut sa: libc::sockaddr_nl = unsafe { zeroed() };
    sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    let sl = size_of::<libc::sockaddr_nl>() as libc::socklen_t;
    // SAFETY: a valid address of the length passed.
    check(unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_nl).cast(), sl) }, "bind");
    check(
        setsockopt(fd, 270 /* SOL_NETLINK */, 1 /* NETLINK_ADD_MEMBERSHIP */, &(CN_IDX_DM as libc::c_int)),
        "join group 7",
    );
    let rcvbuf: libc::c_int = 8 << 20;
    if setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &rcvbuf) < 0 {
        setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &rcvbuf);
    }
    let tv = libc::timeval { tv_sec: 0, tv_usec: 250_000 };
    check(setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv), "SO_RCVTIMEO");
    let mut len = sl;
    // SAFETY: out-parameters of the right size.
    check(unsafe { libc::getsockname(fd, (&mut sa as *mut libc::sockaddr_nl).cast(), &mut len) }, "getsockname");
    let port = sa.nl_pid;
    eprintln!("const_responder: listening on connector group {CN_IDX_DM}, port {port}");

    let resync = std::env::args().skip(1).any(|a| a == "--resync");
    let (mut region_size, mut regions) = (1024u64, 0u64);
    // --resync: the next region GET_RESYNC_WORK hands out, and regions reported in sync.
    let (mut next_work, mut synced) = (0u64, 0u64);
    let mut counts = [0u64; REQUEST_TYPE_COUNT + 1];
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = [0u8; ULOG_OFFSET + ULOG_REQUEST_LEN + 32];
    const STATUS: &[u8] = b"1 clustered-core\0";
    while !STOP.load(Ordering::Relaxed) {
        // SAFETY: an all-zero sockaddr_nl is valid.
        let mut from: libc::sockaddr_nl = unsafe { zeroed() };
        let mut flen = sl;
        // SAFETY: buffers valid for the lengths passed.
        let n = unsafe {
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut flen,
            )
        };
        if n < (ULOG_OFFSET + ULOG_REQUEST_LEN) as isize {
            continue; // timeout, EINTR, or not a request
        }
        let req = &buf[ULOG_OFFSET..n as usize];
        let field = |o: usize| u32::from_ne_bytes(req[o..o + 4].try_into().unwrap());
        let raw_type = field(offsets::REQUEST_TYPE);
        let data_size = field(offsets::DATA_SIZE) as usize;
        let kind = RequestType::from_raw(raw_type);
        counts[kind.map_or(0, |k| k.raw() as usize)] += 1;
        let mut payload = [0u8; 17];
        let plen = match kind {
            Some(RequestType::Ctr) => {
                let data = &req[ULOG_REQUEST_LEN..(ULOG_REQUEST_LEN + data_size).min(req.len())];
                if let Some((rs, n)) = parse_ctr(data) {
                    (region_size, regions) = (rs, n);
                    let nosync = data.split(|b| b.is_ascii_whitespace() || *b == 0).any(|w| w == b"nosync");
                    (next_work, synced) = if resync && !nosync { (0, 0) } else { (n, n) };
                }
                0
            }
            Some(RequestType::GetRegionSize) => {
                payload[..8].copy_from_slice(&region_size.to_ne_bytes());
                8
            }
            Some(RequestType::InSync | RequestType::IsClean) => {
                let region = req
                    .get(ULOG_REQUEST_LEN..ULOG_REQUEST_LEN + 8)
                    .map_or(0, |b| u64::from_ne_bytes(b.try_into().unwrap()));
                payload[..8].copy_from_slice(&i64::from(region < synced).to_ne_bytes());
                8
            }
            Some(RequestType::GetResyncWork) => {
                if next_work < regions {
                    payload[..8].copy_from_slice(&1i64.to_ne_bytes());
                    payload[8..16].copy_from_slice(&next_work.to_ne_bytes());
                    next_work += 1;
                }
                16
            }
            Some(RequestType::SetRegionSync) => {
                let in_sync = req.get(ULOG_REQUEST_LEN + 8..ULOG_REQUEST_LEN + 16).is_some_and(|b| b != [0; 8]);
                if in_sync {
                    synced = (synced + 1).min(regions);
                }
                0
            }
            Some(RequestType::GetSyncCount) => {
                payload[..8].copy_from_slice(&synced.to_ne_bytes());
                8
            }
            Some(RequestType::IsRemoteRecovering) => {
                let hint = if synced < regions { regions - 1 } else { regions };
                payload[8..16].copy_from_slice(&hint.to_ne_bytes());
                16
            }
            Some(RequestType::StatusInfo | RequestType::StatusTable) => {
                payload[..STATUS.len()].copy_from_slice(STATUS);
                STATUS.len()
            }
            _ => 0,
        };
        // Reply: the request's headers, error 0, our payload.
        let total = ULOG_OFFSET + ULOG_REQUEST_LEN + plen;
        out[..ULOG_OFFSET + ULOG_REQUEST_LEN].copy_from_slice(&buf[..ULOG_OFFSET + ULOG_REQUEST_LEN]);
        out[0..4].copy_from_slice(&(total as u32).to_ne_bytes()); // nlmsg_len
        out[12..16].copy_from_slice(&port.to_ne_bytes()); // nlmsg_pid
        out[NLMSG_HDRLEN + 16..NLMSG_HDRLEN + 18].copy_from_slice(&((ULOG_REQUEST_LEN + plen) as u16).to_ne_bytes()); // cn_msg.len
        out[ULOG_OFFSET + offsets::ERROR..][..4].copy_from_slice(&0i32.to_ne_bytes());
        out[ULOG_OFFSET + offsets::DATA_SIZE..][..4].copy_from_slice(&(plen as u32).to_ne_bytes());
        out[ULOG_OFFSET + ULOG_REQUEST_LEN..total].copy_from_slice(&payload[..plen]);
        // SAFETY: an all-zero sockaddr_nl is valid.
        let mut to: libc::sockaddr_nl = unsafe { zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        to.nl_pid = from.nl_pid; // the sender's port (0 = the kernel), group cleared
                                 // SAFETY: a valid buffer and address of the lengths passed.
        unsafe { libc::sendto(fd, out.as_ptr().cast(), total, 0, (&to as *const libc::sockaddr_nl).cast(), sl) };
    }
    let mut so = std::io::stdout().lock();
    for (i, c) in counts.iter().enumerate().filter(|(_, c)| **c > 0) {
        let name = RequestType::from_raw(i as u32).map_or("UNKNOWN", RequestType::name);
        let _ = writeln!(so, "REQUESTS {name} {c}");
    }
}
