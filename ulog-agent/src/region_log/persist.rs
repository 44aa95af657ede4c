//! `Persister`: one I/O thread per persistent log, so a slow device delays only its own log.
//!
//! The receive thread never waits for a disk. It applies a request to the log's `DirtyLog`
//! under the log's mutex, and if the request needs bits on stable storage before it may be
//! answered (MARK_REGION, a FLUSH after marks, RESUME's load, POSTSUSPEND, DTR) it hands the
//! reply to this thread and goes on with the next datagram. This thread:
//!
//! 1. takes every job queued so far (group commit: one write answers all of them),
//! 2. copies the changed image blocks under the mutex (a memcpy of a few KiB),
//! 3. if they carry clean bits set since the last write, flushes the mirror legs' caches first
//!    (`crate::region_log::legs`; dm-log.c `disk_flush` calls `flush_callback_fn` then), and if that fails
//!    writes every region dirty instead (`DirtyLog::legs_flush_failed`),
//! 4. writes them with `RWF_DSYNC` outside the mutex,
//! 5. records the generation it wrote and sends each waiting reply whose generation is now
//!    durable (or `-EIO` if the write failed; the blocks stay marked and are retried).
//!
//! Limits: one thread per persistent log (fine for the tens of logs a host has); a device that
//! hangs in the kernel hangs its log's replies, which is what the kernel's 15 s resend is for.
//!
//! One device, several logs ([`SharedDevice`]): the two tables of a reload are two logs of one
//! uuid on one device (or state file), and after an agent restart in the middle of a reload the
//! kernel's reconnect loop can resume both. Every load and write of the device's image happens
//! under the device's I/O lock, and every write carries the dirt of every other log loaded on
//! the device (their clean bits are ANDed into the blocks written; a load merges them in), so
//! whichever log writes, no region any of them holds dirty reaches the disk as clean, and no
//! write can land with a view older than one already on the disk. When a log leaves the device
//! (DTR), the others rewrite their whole image, so bits it kept dirty are written as they are.
//!
//! What the I/O thread reports (each deferred reply, each image write, each flush of the legs)
//! goes to the log's [`PersistObserver`]; what the request path keeps beside a log under its
//! mutex is the caller's type `S` of [`SharedLog<S>`] (see [`LockedLog`]). So the engine names
//! no telemetry type: the agent's telemetry implements the observer and supplies `S`.

use std::ops::DerefMut;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use tracing::{error, info, warn};
use ulog_common::{DmUlogRequest, RequestType};

use crate::region_log::bitmap::RegionBitmap;
use crate::region_log::dirty_log::{DirtyLog, LoadRule, Snapshot, IMAGE_BLOCK};
use crate::region_log::disk_format::{self, LoadOutcome};
use crate::region_log::legs::{Flushed, LegLookup, Legs};
use crate::region_log::store::{AlignedBuf, LogDevice};
use crate::wire::protocol::ReplyBuf;

/// Where replies go (the connector socket, or a test's collector).
pub trait ReplySink: Send + Sync + 'static {
    /// Sends one reply datagram to a netlink port; returns false if it could not be sent.
    fn send_reply(&self, port: u32, datagram: &[u8]) -> bool;
}

/// What a log's mutex guards: the [`DirtyLog`] and whatever the caller keeps beside it under the
/// same lock (records the request path writes in the critical section it takes anyway). The
/// engine sees only the log; `From<DirtyLog>` wraps a new one.
pub trait LockedLog: DerefMut<Target = DirtyLog> + From<DirtyLog> + Send + 'static {}

impl<T: DerefMut<Target = DirtyLog> + From<DirtyLog> + Send + 'static> LockedLog for T {}

/// What a log's persister reports, to whoever observes the log (the agent's telemetry).
///
/// Called on the log's I/O thread, on the reply path: an implementation must not block on
/// anything but the log's own mutex (which [`Self::replied`] may take through `log`), and must
/// not allocate per call.
pub trait PersistObserver<S>: Send + Sync + 'static {
    /// A deferred reply answered with `error` (0 or a negative errno) is about to be sent.
    fn replying(&self, reply: &PendingReply, error: i32);
    /// That reply was sent (`sent` false: the send failed); `log` is the log it answered for.
    fn replied(&self, reply: &PendingReply, error: i32, sent: bool, log: &SharedLog<S>);
    /// One write of `bytes` to the log device ended (`ok`: it succeeded).
    fn device_written(&self, bytes: usize, ok: bool);
    /// One image write (all its device writes) of `bytes` ended after `elapsed_ns`.
    fn image_written(&self, bytes: u64, elapsed_ns: u64, ok: bool);
    /// The mirror legs' write caches were flushed (`ok` false: the flush failed).
    fn legs_flushed(&self, ok: bool);
    /// The log's mirror device name, when known, for log lines.
    fn mirror(&self) -> Option<Arc<str>>;
}

/// A log's state as shared between the receive thread and its persister: the log and what the
/// caller keeps beside it (`S`, see [`LockedLog`]) under one mutex.
#[derive(Debug)]
pub struct SharedLog<S> {
    state: Mutex<S>,
    /// A lazy write of clean-going changes is already queued.
    lazy_queued: AtomicBool,
    /// The log device failed a read or write since the last successful resume ('D' in status).
    device_failed: AtomicBool,
    /// A flush of the mirror legs failed: every region is dirty and CLEAR is ignored for the
    /// rest of the log's life (mirrors `DirtyLog::has_legs_flush_failed`, readable without the lock).
    legs_flush_failed: AtomicBool,
}

impl<S: LockedLog> SharedLog<S> {
    /// Wraps a log.
    pub fn new(log: DirtyLog) -> Self {
        Self {
            state: Mutex::new(S::from(log)),
            lazy_queued: AtomicBool::new(false),
            device_failed: AtomicBool::new(false),
            legs_flush_failed: AtomicBool::new(false),
        }
    }

    /// Whether a flush of the mirror legs failed (the log then writes no clean bit).
    pub fn legs_flush_failed(&self) -> bool {
        self.legs_flush_failed.load(Ordering::Relaxed)
    }

    /// Locks the state. A panic elsewhere while holding the lock leaves a consistent bitmap
    /// (every mutation is a single bit flip plus counters), so poisoning is ignored.
    /// The guard derefs to `S`, which derefs to the [`DirtyLog`].
    pub fn lock(&self) -> MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the device has failed.
    pub fn device_failed(&self) -> bool {
        self.device_failed.load(Ordering::Relaxed)
    }

    /// Claims the right to queue a lazy write; false if one is queued already.
    pub fn claim_lazy(&self) -> bool {
        !self.lazy_queued.swap(true, Ordering::AcqRel)
    }
}

/// A log device (or state file) and the logs loaded on it. See the module documentation.
#[derive(Debug)]
pub struct SharedDevice<S> {
    /// Held across every load and write of the image: one writer at a time, and no write
    /// prepared before another one can land after it.
    io: Mutex<()>,
    /// Logs loaded on the device (from their first RESUME to their DTR), with their I/O threads.
    members: Mutex<Vec<Member<S>>>,
}

impl<S> Default for SharedDevice<S> {
    fn default() -> Self {
        Self { io: Mutex::default(), members: Mutex::default() }
    }
}

#[derive(Debug)]
struct Member<S> {
    log: Weak<SharedLog<S>>,
    jobs: Sender<Job>,
}

impl<S: LockedLog> SharedDevice<S> {
    fn lock_io(&self) -> MutexGuard<'_, ()> {
        self.io.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn members(&self) -> MutexGuard<'_, Vec<Member<S>>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The other loaded logs (not `me`).
    fn others(&self, me: &Arc<SharedLog<S>>) -> Vec<Arc<SharedLog<S>>> {
        self.members().iter().filter_map(|m| m.log.upgrade()).filter(|l| !Arc::ptr_eq(l, me)).collect()
    }

    fn join(&self, me: &Arc<SharedLog<S>>, jobs: &Sender<Job>) {
        let mut members = self.members();
        members.retain(|m| m.log.strong_count() > 0);
        if !members.iter().any(|m| m.log.upgrade().is_some_and(|l| Arc::ptr_eq(&l, me))) {
            members.push(Member { log: Arc::downgrade(me), jobs: jobs.clone() });
        }
    }

    /// `me` leaves; the logs that stay rewrite their images.
    fn leave(&self, me: &Arc<SharedLog<S>>) {
        let mut members = self.members();
        members.retain(|m| m.log.upgrade().is_some_and(|l| !Arc::ptr_eq(&l, me)));
        for m in members.iter() {
            let _ = m.jobs.send(Job::RewriteAll);
        }
    }
}

/// A reply owed to the kernel once a job is done.
#[derive(Clone, Copy, Debug)]
pub struct PendingReply {
    /// Netlink port to answer.
    pub port: u32,
    /// Our own port (goes into nlmsg_pid).
    pub own_port: u32,
    /// The request header.
    pub header: DmUlogRequest,
    /// The request's cn_msg seq.
    pub cn_seq: u32,
    /// When the receive thread received it (`CLOCK_MONOTONIC` ns, the agent's one clock;
    /// service time = this to the reply's send).
    pub received_ns: u64,
    /// Its flight-recorder id (0: none), for the observer's records.
    pub flight_id: u64,
}

impl PendingReply {
    /// The request's type, if it is one.
    pub fn kind(&self) -> Option<RequestType> {
        RequestType::from_raw(self.header.request_type)
    }
}

enum Job {
    /// RESUME: read the image, load it, write it back.
    Resume(PendingReply),
    /// Answer once `gen` is durable.
    Durable(u64, PendingReply),
    /// POSTSUSPEND: write everything.
    Release(PendingReply),
    /// Write clean-going changes when there is time.
    Lazy,
    /// Another log left the device: write the whole image as this log has it.
    RewriteAll,
    /// DTR or shutdown: final write, answer, leave the device, exit.
    Stop(Option<PendingReply>, Option<mpsc::Sender<()>>),
}

/// The handle the server keeps for a persistent log.
pub struct Persister {
    tx: Sender<Job>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Persister {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Persister").finish_non_exhaustive()
    }
}

struct Worker<S> {
    log: Arc<SharedLog<S>>,
    device: LogDevice,
    shared_device: Arc<SharedDevice<S>>,
    /// This log's own job queue (handed to the device's other logs when it joins).
    jobs: Sender<Job>,
    image: AlignedBuf,
    sink: Arc<dyn ReplySink>,
    name: String,
    observer: Arc<dyn PersistObserver<S>>,
    legs: Legs,
}

impl Persister {
    /// Starts the I/O thread of a log. `name` identifies the log in diagnostics; the replies it
    /// sends and the writes it makes are reported to `observer`; `legs` are its mirror's legs,
    /// flushed before clean bits are written.
    pub fn start<S: LockedLog>(
        log: Arc<SharedLog<S>>,
        device: LogDevice,
        shared_device: Arc<SharedDevice<S>>,
        sink: Arc<dyn ReplySink>,
        observer: Arc<dyn PersistObserver<S>>,
        name: String,
        legs: Legs,
    ) -> std::io::Result<Self> {
        let region_count = log.lock().region_count();
        let image = AlignedBuf::zeroed(disk_format::image_len(region_count, IMAGE_BLOCK))?;
        let (tx, rx) = mpsc::channel();
        let worker = Worker { log, device, shared_device, jobs: tx.clone(), image, sink, name, observer, legs };
        let thread = std::thread::Builder::new()
            .name("ulog-persist".into())
            .stack_size(256 * 1024)
            .spawn(move || worker.run(rx))?;
        Ok(Self { tx, thread: Some(thread) })
    }

    fn send(&self, job: Job) -> bool {
        self.tx.send(job).is_ok()
    }

    /// RESUME: the reply is sent after the load and write-back.
    pub fn resume(&self, reply: PendingReply) -> bool {
        self.send(Job::Resume(reply))
    }

    /// Answer `reply` once `gen` is durable.
    pub fn when_durable(&self, gen: u64, reply: PendingReply) -> bool {
        self.send(Job::Durable(gen, reply))
    }

    /// POSTSUSPEND: write everything, answer (with the write's error, if it failed: the blocks
    /// stay pending and are written by the next attempt).
    pub fn release(&self, reply: PendingReply) -> bool {
        self.send(Job::Release(reply))
    }

    /// Queue a background write of clean-going changes.
    pub fn lazy(&self) -> bool {
        self.send(Job::Lazy)
    }

    /// DTR: final write, answer (`None`: nobody to answer, the log is replaced), leave the
    /// device, and let the thread exit (not waited for).
    pub fn stop(mut self, reply: Option<PendingReply>) {
        let _ = self.tx.send(Job::Stop(reply, None));
        self.thread.take();
    }

    /// Shutdown: final write, and wait until it is done.
    pub fn stop_and_wait(mut self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Job::Stop(None, Some(tx))).is_ok() {
            let _ = rx.recv();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Persister {
    /// A persister dropped without [`Persister::stop`] still writes what it has and exits
    /// (its own queue holds a sender, so the thread would otherwise wait forever).
    fn drop(&mut self) {
        if self.thread.take().is_some() {
            let _ = self.tx.send(Job::Stop(None, None));
        }
    }
}

impl<S: LockedLog> Worker<S> {
    fn run(mut self, rx: Receiver<Job>) {
        let mut waiters: Vec<(u64, PendingReply)> = Vec::new();
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            batch.extend(rx.try_iter());
            let mut want_write = false;
            for job in batch {
                match job {
                    Job::Durable(gen, reply) => {
                        waiters.push((gen, reply));
                        want_write = true;
                    }
                    Job::Lazy => want_write = true,
                    Job::RewriteAll => {
                        self.log.lock().rewrite_all();
                        want_write = true;
                    }
                    Job::Resume(reply) => {
                        self.settle(&mut waiters, want_write);
                        want_write = false;
                        let err = self.resume();
                        self.answer(&reply, err);
                    }
                    Job::Release(reply) => {
                        self.settle(&mut waiters, want_write);
                        want_write = false;
                        let err = self.write();
                        self.answer(&reply, err);
                    }
                    Job::Stop(reply, done) => {
                        self.settle(&mut waiters, want_write);
                        let err = self.write();
                        self.shared_device.leave(&self.log);
                        if let Some(r) = reply {
                            self.answer(&r, err);
                        }
                        if let Some(d) = done {
                            let _ = d.send(());
                        }
                        return;
                    }
                }
            }
            self.settle(&mut waiters, want_write);
        }
    }

    /// Writes if asked, then answers every waiter whose generation is durable.
    fn settle(&mut self, waiters: &mut Vec<(u64, PendingReply)>, want_write: bool) {
        if !want_write && waiters.is_empty() {
            return;
        }
        let err = self.write();
        let log = Arc::clone(&self.log);
        let state = log.lock();
        let (done, pending): (Vec<_>, Vec<_>) = waiters.drain(..).partition(|(gen, _)| state.is_durable(*gen));
        drop(state);
        for (_, r) in done {
            self.answer(&r, 0);
        }
        // Not durable after a write attempt: the write failed (or the log lost its device).
        for (_, r) in pending {
            self.answer(&r, if err != 0 { err } else { -libc::EIO });
        }
    }

    fn answer(&self, r: &PendingReply, error: i32) {
        let reply = ReplyBuf::full(&r.header, r.cn_seq, error, &[], r.own_port);
        self.observer.replying(r, error);
        let sent = self.sink.send_reply(r.port, reply.as_bytes());
        self.observer.replied(r, error, sent, &self.log);
    }

    /// Writes every changed block; 0 or a negative errno.
    fn write(&mut self) -> i32 {
        let device = Arc::clone(&self.shared_device);
        let _io = device.lock_io();
        self.write_locked()
    }

    /// [`Self::write`] with the device's I/O lock held.
    fn write_locked(&mut self) -> i32 {
        self.log.lazy_queued.store(false, Ordering::Release);
        let snap = {
            let mut state = self.log.lock();
            state.snapshot(&mut self.image)
        };
        let Some(mut snap) = snap else { return 0 };
        // The other logs of the device veto clean bits they do not share.
        for other in self.shared_device.others(&self.log) {
            other.lock().and_clean_into(&mut self.image, &snap.runs);
        }
        if snap.clean_going {
            self.flush_legs(&mut snap);
        }
        let started = Instant::now();
        let written = self.write_runs(&snap);
        let bytes: usize = snap
            .runs
            .iter()
            .map(|&(first, count)| {
                (count * IMAGE_BLOCK).min(self.device.image_len().saturating_sub(first * IMAGE_BLOCK))
            })
            .sum();
        self.observer.image_written(bytes as u64, started.elapsed().as_nanos() as u64, written.is_ok());
        match written {
            Ok(()) => {
                self.log.lock().snapshot_written(snap.gen);
                0
            }
            Err(e) => {
                self.log.lock().snapshot_failed(&snap);
                if !self.log.device_failed.swap(true, Ordering::Relaxed) {
                    error!(log = %self.name, mirror = self.observer.mirror().as_deref(), device = %self.device.path().display(), error = %e, "log device write failed; the log is marked failed (D)");
                }
                -e.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }

    /// Invariant: a clean bit reaches the disk only after the legs' caches were flushed. `snap`
    /// carries clean bits set since the last write; it was taken before this flush, so the
    /// flush covers every mirror write completed before the CLEARs it carries (dm-raid1 clears a
    /// region only once its writes completed). As dm-log.c `disk_flush` with `flush_callback_fn`:
    /// on failure every region goes dirty and `snap` becomes the all-dirty image.
    fn flush_legs(&mut self, snap: &mut Snapshot) {
        match self.legs.flush() {
            Ok(Flushed::Legs(_)) => self.observer.legs_flushed(true),
            Ok(Flushed::NoDeviceMapper) => {}
            Err(e) => {
                self.observer.legs_flushed(false);
                self.log.lock().legs_flush_failed(&mut self.image, snap);
                if !self.log.legs_flush_failed.swap(true, Ordering::Relaxed) {
                    error!(log = %self.name, mirror = self.observer.mirror().as_deref(), error = %e, consequence = "every region is written dirty; clears are ignored until the table is reloaded (dm-log.c flush_failed)", "flushing the mirror legs failed");
                }
            }
        }
    }

    /// One run: a single `RWF_DSYNC` write (one FUA I/O on a block device). Several runs (a
    /// group commit of scattered regions): plain writes, then one `fdatasync`, so the batch
    /// costs one device cache flush instead of one per run.
    fn write_runs(&self, snap: &Snapshot) -> std::io::Result<()> {
        let bytes_of = |off: usize, len: usize| len.min(self.device.image_len().saturating_sub(off));
        if let [(first, count)] = snap.runs[..] {
            let (off, len) = (first * IMAGE_BLOCK, count * IMAGE_BLOCK);
            let r = self.device.write_durable(&self.image, off, len);
            self.observer.device_written(bytes_of(off, len), r.is_ok());
            return r;
        }
        let mut total = 0;
        for &(first, count) in &snap.runs {
            let (off, len) = (first * IMAGE_BLOCK, count * IMAGE_BLOCK);
            if let Err(e) = self.device.write_plain(&self.image, off, len) {
                self.observer.device_written(total, false);
                return Err(e);
            }
            total += bytes_of(off, len);
        }
        let r = self.device.sync_data();
        self.observer.device_written(total, r.is_ok());
        r
    }

    /// Loads the image and writes it back; 0 or a negative errno.
    fn resume(&mut self) -> i32 {
        // The legs, for the clean bits written from now on: a reload of the table constructs a
        // new log, so what the tables say now holds until this log's next RESUME.
        match self.legs.resolve() {
            Ok(LegLookup::Found(legs)) => {
                let legs: Vec<String> = legs.iter().map(ToString::to_string).collect();
                info!(log = %self.name, mirror = self.observer.mirror().as_deref(), legs = %legs.join(" "), "mirror legs found");
            }
            Ok(LegLookup::NoDeviceMapper) => {
                info!(log = %self.name, "no device-mapper in this kernel: no mirror legs to flush")
            }
            Err(e) => {
                warn!(log = %self.name, mirror = self.observer.mirror().as_deref(), error = %e, "cannot find the mirror legs (retried before the next clean bits are written)")
            }
        }
        let device = Arc::clone(&self.shared_device);
        let _io = device.lock_io();
        if let Err(e) = self.device.settle_creation() {
            error!(log = %self.name, device = %self.device.path().display(), error = %e, "cannot make the state file's creation durable");
            self.log.device_failed.store(true, Ordering::Relaxed);
            return -e.raw_os_error().unwrap_or(libc::EIO);
        }
        // A live log being resumed again first writes what it has, so the image it reads back
        // is current (the merge in resume_from_image covers a failed write).
        self.write_locked();
        let read = self.device.read_image(&mut self.image);
        if let Err(e) = &read {
            warn!(log = %self.name, mirror = self.observer.mirror().as_deref(), device = %self.device.path().display(), error = %e, "cannot read the log; every region will be resynchronised");
            self.log.device_failed.store(true, Ordering::Relaxed);
        } else {
            self.log.device_failed.store(false, Ordering::Relaxed);
        }
        let image_len = self.device.image_len();
        let others: Vec<RegionBitmap> =
            device.others(&self.log).iter().map(|o| o.lock().clean_bits().clone()).collect();
        if !others.is_empty() {
            info!(log = %self.name, others = others.len(), "another log of this uuid is loaded on the device: its dirty regions are kept");
        }
        let (outcome, rule) = {
            let mut state = self.log.lock();
            let rule = state.next_load();
            (state.resume_from_image(read.is_ok().then(|| &self.image[..image_len]), &others), rule)
        };
        device.join(&self.log, &self.jobs);
        match (outcome, rule) {
            (_, LoadRule::StartOver) => {
                info!(log = %self.name, device = %self.device.path().display(), "the state file was left by an earlier mirror with this uuid (a new table, not a reconnect or reload): ignored, the log starts over")
            }
            // reconnect: the kernel's reconnect loop; the table's sync/nosync was not applied.
            (LoadOutcome::Loaded { nr_regions }, rule) => {
                info!(log = %self.name, nr_regions, reconnect = rule == LoadRule::Reconnect, "loaded log")
            }
            (LoadOutcome::Fresh, _) => {
                info!(log = %self.name, "no valid log on the device (or sync/nosync given): initialised")
            }
            (LoadOutcome::BadVersion(v), _) => {
                warn!(log = %self.name, version = v, "unknown log version; every region will be resynchronised");
                self.log.device_failed.store(true, Ordering::Relaxed);
            }
        }
        self.write_locked()
    }
}
