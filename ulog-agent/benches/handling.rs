//! In-process request handling: `LogServer::handle_datagram` on pre-encoded datagrams, replies
//! counted and discarded. Baseline in the same run: `protocol::decode` alone on the same
//! datagrams, measured right before each handling benchmark, so every result can be read as
//! "handling costs N x decode".
//!
//! One `clustered-core` log of 2^21 regions (`2147483648 clustered-core 1024`, default sync
//! mode: nothing in sync yet) and its `nosync` twin (everything in sync, so CLEAR really sets
//! clean bits), both created with CTR + RESUME through the server itself. Each benchmark cycles
//! through 256 datagrams with pseudo-random regions spread over the whole log.
//!
//! Criterion ids are `<request>/<decode|handle>`; MARK/CLEAR set `Throughput::Elements` to the
//! regions per iteration, so criterion prints region operations per second.
//!
//! A diagnostic group follows (`snapshot_*`): the disk log's persister copying changed image
//! blocks under the log's mutex, against a plain memcpy of the same bytes.
//!
//! Run: `cargo bench -p ulog-agent --bench handling` (or `cargo xtask bench --only handling`).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ulog_agent::metrics::counters::Counters;
use ulog_agent::region_log::dirty_log::{DirtyLog, IMAGE_BLOCK};
use ulog_agent::region_log::persist::ReplySink;
use ulog_agent::region_log::{ctr, disk_format};
use ulog_agent::server::{LogServer, ServerConfig};
use ulog_agent::wire::kernel_peer::{encode_request, regions_payload, Request};
use ulog_agent::wire::protocol;
use ulog_common::{RequestType, ULOG_OFFSET};

const REGIONS: u64 = 1 << 21;
const CTR_SYNC: &str = "2147483648 clustered-core 1024";
const CTR_NOSYNC: &str = "2147483648 clustered-core 1024 nosync";
const UUID_SYNC: &str = "LVM-bench-handling-sync-000000000000000000000000000000000000000000000";
const UUID_NOSYNC: &str = "LVM-bench-handling-nosync-0000000000000000000000000000000000000000000";
const LUID_SYNC: u64 = 0xffff_8880_03a1_b000;
const LUID_NOSYNC: u64 = 0xffff_8880_03a1_c000;
/// Datagrams per pool (a power of two).
const POOL: usize = 256;
/// Regions per MARK/CLEAR: the kernel's maximum per request (256-byte payload).
const BATCH: usize = 32;

/// Counts replies, and the ones whose `error` is not 0; sends nothing.
#[derive(Default)]
struct CountingSink {
    replies: AtomicU64,
    errors: AtomicU64,
}

impl ReplySink for CountingSink {
    fn send_reply(&self, _port: u32, d: &[u8]) -> bool {
        self.replies.fetch_add(1, Relaxed);
        let err = d.get(ULOG_OFFSET + 144..ULOG_OFFSET + 148).map(|b| i32::from_ne_bytes(b.try_into().unwrap()));
        if err != Some(0) {
            self.errors.fetch_add(1, Relaxed);
        }
        true
    }
}

/// A deterministic xorshift64* stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn region(&mut self) -> u64 {
        self.next() % REGIONS
    }
}

struct Fixture {
    server: LogServer,
    sink: Arc<CountingSink>,
    seq: u32,
}

impl Fixture {
    fn new() -> Self {
        let sink = Arc::new(CountingSink::default());
        let server = LogServer::new(ServerConfig::default(), sink.clone(), 4242, Arc::new(Counters::default()));
        let mut f = Self { server, sink, seq: 1 };
        for (uuid, luid, ctr) in [(UUID_SYNC, LUID_SYNC, CTR_SYNC), (UUID_NOSYNC, LUID_NOSYNC, CTR_NOSYNC)] {
            let ctr = f.encode(&Request::ctr(uuid, luid, ctr));
            let resume = f.encode(&Request::new(RequestType::Resume, uuid, luid, vec![]));
            f.server.handle_datagram(&ctr, 0, false);
            f.server.handle_datagram(&resume, 0, false);
        }
        assert_eq!(f.sink.replies.load(Relaxed), 4);
        assert_eq!(f.sink.errors.load(Relaxed), 0, "CTR/RESUME failed");
        f
    }

    fn encode(&mut self, req: &Request) -> Vec<u8> {
        let d = encode_request(req, self.seq, 3).expect("encodable request");
        self.seq = self.seq.wrapping_add(1);
        d
    }

    /// `POOL` datagrams from `make(i)`.
    fn pool(&mut self, mut make: impl FnMut(usize) -> Request) -> Vec<Vec<u8>> {
        (0..POOL).map(&mut make).map(|r| self.encode(&r)).collect()
    }
}

/// One pool of datagrams per benchmark; `pair`: each iteration handles `a[i]` then `b[i]`.
struct Case {
    id: &'static str,
    a: Vec<Vec<u8>>,
    b: Option<Vec<Vec<u8>>>,
    regions_per_iter: Option<u64>,
}

fn cases(f: &mut Fixture) -> Vec<Case> {
    use RequestType::*;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut batches: Vec<Vec<u64>> = (0..POOL).map(|_| (0..BATCH).map(|_| rng.region()).collect()).collect();
    for b in &mut batches {
        b.sort_unstable();
        b.dedup();
        while b.len() < BATCH {
            b.push(rng.region());
            b.sort_unstable();
            b.dedup();
        }
    }
    let singles: Vec<u64> = (0..POOL).map(|_| rng.region()).collect();
    let one = |kind: RequestType, uuid: &'static str, luid: u64| {
        let singles = singles.clone();
        move |i: usize| Request::new(kind, uuid, luid, singles[i].to_ne_bytes())
    };
    let none = |kind: RequestType, uuid: &'static str, luid: u64| move |_| Request::new(kind, uuid, luid, vec![]);
    let batch = |kind: RequestType, uuid: &'static str, luid: u64| {
        let batches = batches.clone();
        move |i: usize| Request::new(kind, uuid, luid, regions_payload(&batches[i]))
    };
    let (s, ls, n, ln) = (UUID_SYNC, LUID_SYNC, UUID_NOSYNC, LUID_NOSYNC);
    let r = Some(BATCH as u64);
    let mut v = vec![
        Case { id: "IN_SYNC", a: f.pool(one(InSync, s, ls)), b: None, regions_per_iter: None },
        Case { id: "IS_CLEAN", a: f.pool(one(IsClean, s, ls)), b: None, regions_per_iter: None },
        Case { id: "MARK_REGION_x32", a: f.pool(batch(MarkRegion, n, ln)), b: None, regions_per_iter: r },
        Case { id: "CLEAR_REGION_x32", a: f.pool(batch(ClearRegion, n, ln)), b: None, regions_per_iter: r },
        Case {
            id: "MARK+CLEAR_x32",
            a: f.pool(batch(MarkRegion, n, ln)),
            b: Some(f.pool(batch(ClearRegion, n, ln))),
            regions_per_iter: Some(2 * BATCH as u64),
        },
        Case { id: "MARK_REGION_x32_sync", a: f.pool(batch(MarkRegion, s, ls)), b: None, regions_per_iter: r },
        Case { id: "CLEAR_REGION_x32_sync", a: f.pool(batch(ClearRegion, s, ls)), b: None, regions_per_iter: r },
        Case { id: "FLUSH", a: f.pool(none(Flush, s, ls)), b: None, regions_per_iter: None },
        Case { id: "GET_RESYNC_WORK", a: f.pool(none(GetResyncWork, s, ls)), b: None, regions_per_iter: None },
    ];
    let sets: Vec<u64> = singles.clone();
    v.push(Case {
        id: "SET_REGION_SYNC",
        a: f.pool(|i| Request::new(SetRegionSync, s, ls, protocol::pair(sets[i], 1))),
        b: None,
        regions_per_iter: None,
    });
    v.extend([
        Case { id: "GET_SYNC_COUNT", a: f.pool(none(GetSyncCount, s, ls)), b: None, regions_per_iter: None },
        Case { id: "IS_REMOTE_RECOVERING", a: f.pool(one(IsRemoteRecovering, s, ls)), b: None, regions_per_iter: None },
        Case { id: "STATUS_INFO", a: f.pool(none(StatusInfo, s, ls)), b: None, regions_per_iter: None },
        Case { id: "GET_REGION_SIZE", a: f.pool(none(GetRegionSize, s, ls)), b: None, regions_per_iter: None },
    ]);
    v
}

fn handling(c: &mut Criterion) {
    let mut f = Fixture::new();
    let cases = cases(&mut f);
    // Every datagram must decode (the baseline would otherwise measure the error path).
    for case in &cases {
        for d in case.a.iter().chain(case.b.iter().flatten()) {
            assert!(protocol::decode(d).is_ok(), "{}: datagram does not decode", case.id);
        }
    }
    for case in &cases {
        let mut g = c.benchmark_group(case.id);
        if let Some(n) = case.regions_per_iter {
            g.throughput(Throughput::Elements(n));
        }
        let mask = POOL - 1;
        // Baseline: decoding the very same datagrams (both of a pair).
        g.bench_function("decode", |bch| {
            let mut i = 0usize;
            bch.iter(|| {
                let k = i & mask;
                i = i.wrapping_add(1);
                let a = protocol::decode(black_box(&case.a[k])).is_ok();
                let b = case.b.as_ref().map(|b| protocol::decode(black_box(&b[k])).is_ok());
                black_box((a, b))
            })
        });
        let before = (f.sink.replies.load(Relaxed), f.sink.errors.load(Relaxed));
        let mut sent = 0u64;
        g.bench_function("handle", |bch| {
            let mut i = 0usize;
            bch.iter(|| {
                let k = i & mask;
                i = i.wrapping_add(1);
                f.server.handle_datagram(black_box(&case.a[k]), 0, false);
                sent += 1;
                if let Some(b) = &case.b {
                    f.server.handle_datagram(black_box(&b[k]), 0, false);
                    sent += 1;
                }
            })
        });
        g.finish();
        let replies = f.sink.replies.load(Relaxed) - before.0;
        let errors = f.sink.errors.load(Relaxed) - before.1;
        assert_eq!(replies, sent, "{}: {sent} requests handled but {replies} replies", case.id);
        assert_eq!(errors, 0, "{}: {errors} replies carried an error", case.id);
    }
}

/// Diagnostic (not request handling): what a disk log's persister does under the log's mutex
/// before each durable write, `DirtyLog::snapshot` copying the changed 4 KiB image blocks out of
/// the bitmap, for 1 changed block and for 16 scattered ones (a group commit of 16 MARKs of
/// scattered regions). The receive thread waits for that mutex. Baseline: `copy_from_slice` of
/// the same number of bytes.
fn snapshot(c: &mut Criterion) {
    let args = ctr::parse(b"2147483648 clustered-disk /dev/null 1024 nosync").expect("ctr").args;
    let regions_per_block = (IMAGE_BLOCK * 8) as u64;
    for blocks in [1u64, 16] {
        // A fresh log: every region clean and in sync, the whole image written once.
        let mut log = DirtyLog::new(&args, true).expect("log");
        log.resume_from_image(None, &[]);
        let mut image = vec![0u8; disk_format::image_len(REGIONS, IMAGE_BLOCK)];
        let snap = log.snapshot(&mut image).expect("first snapshot");
        log.snapshot_written(snap.gen);
        let mut g = c.benchmark_group(format!("snapshot_{blocks}_blocks"));
        g.throughput(Throughput::Bytes(blocks * IMAGE_BLOCK as u64));
        // Regions in blocks 1, 5, 9, ...: never adjacent, so every block is its own run.
        let regions: Vec<u64> = (0..blocks).map(|k| (1 + 4 * k) * regions_per_block + 7).collect();
        let src = vec![0x5au8; (blocks as usize) * IMAGE_BLOCK];
        let mut dst = vec![0u8; (blocks as usize) * IMAGE_BLOCK];
        g.bench_function("memcpy", |b| {
            b.iter(|| {
                dst.copy_from_slice(black_box(&src));
                black_box(&dst);
            })
        });
        let mut flip = false;
        g.bench_function("snapshot", |b| {
            b.iter(|| {
                flip = !flip;
                if flip {
                    log.mark(regions.iter().copied()).expect("mark");
                } else {
                    log.clear(regions.iter().copied()).expect("clear");
                }
                let s = log.snapshot(&mut image).expect("changed blocks");
                assert_eq!(s.runs.len() as u64, blocks);
                log.snapshot_written(s.gen);
            })
        });
        g.finish();
    }
}

fn config() -> Criterion {
    // Shorter than criterion's defaults (3 s + 5 s per benchmark); the command line overrides.
    Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = benches;
    config = config();
    targets = handling, snapshot
}
criterion_main!(benches);
