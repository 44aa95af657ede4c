//! When the agent may exit (issue 10, item 11), and how an operator asks it to.
//!
//! The kernel never gives up on a userspace log: with no server it loops (CTR + RESUME every
//! 2 s) and every write to a clean region waits, so a filesystem on a mirror cannot even be
//! unmounted cleanly once its log server is gone. So, like cmirrord ("exit only if no logs
//! exist"):
//!
//! - **SIGTERM / SIGINT** ask for an exit *if idle*: the receive thread exits only when the
//!   server knows no log (every mirror's DTR was served); otherwise it logs why it keeps
//!   serving (a warning the first time, with the way out) and goes on answering.
//! - **The restart signal** ([`restart_signal`], `SIGRTMIN+1`, sent by `ulog-agent stop
//!   --restart`) asks for a *restart-style exit*: stop receiving, flush every persistent log,
//!   exit 0, so that a new agent (an upgrade) takes over. The kernel's reconnect loop reaches
//!   the new agent within ~2 s of its start. It is a dedicated real-time signal because SIGHUP,
//!   SIGUSR1 and SIGUSR2 are sent by operators used to cmirrord expecting a harmless debug dump.
//!
//! The decision is taken on the receive thread, between datagrams, so a CTR racing the
//! signal is either served before the check (then the log exists and the agent stays) or still
//! queued: [`ExitControl`] is polled by `transport::serve`, which first drains the queue, then
//! leaves the connector group (the kernel then gets -ESRCH at once, and reconnects, instead of
//! waiting 15 s for a request that sat in a dead socket), drains again, and checks once more.
//!
//! The running agent is found through its pid file in the run directory (`/run/ulog` by
//! default; `--run-dir`, `ULOG_RUN_DIR`): `ulog-agent.pid`, holding its pid and an open-file-
//! description write lock for as long as the agent lives. A second agent with the same run
//! directory refuses to start (one log server per host: the kernel multicasts every request to
//! every listener). [`stop`] tests the lock (without taking it), signals the pid through a
//! pidfd (no pid reuse race once opened) and waits for the process to exit.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/ulog";
/// The pid file's name in the run directory.
pub const PID_FILE: &str = "ulog-agent.pid";

/// The signal that asks for a restart-style exit: `SIGRTMIN+1` (35 with glibc on Linux).
pub fn restart_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

const RUN: u8 = 0;
const EXIT_IF_IDLE: u8 = 1;
const RESTART: u8 = 2;

/// What the signal handlers ask of the receive thread.
#[derive(Debug, Default)]
pub struct ExitControl(AtomicU8);

/// What the receive thread was asked, when it looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitRequest {
    /// Keep serving.
    None,
    /// Exit if no log is live (SIGTERM, SIGINT).
    IfIdle,
    /// Flush and exit whatever is live (the restart signal).
    Restart,
}

impl ExitControl {
    /// Asks for an exit if idle (a pending restart request is kept: it is stronger).
    pub fn exit_if_idle(&self) {
        let _ = self.0.compare_exchange(RUN, EXIT_IF_IDLE, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Asks for a restart-style exit.
    pub fn restart(&self) {
        self.0.store(RESTART, Ordering::Relaxed);
    }

    /// The pending request (one relaxed load: polled by the receive loop).
    pub fn pending(&self) -> ExitRequest {
        match self.0.load(Ordering::Relaxed) {
            RUN => ExitRequest::None,
            EXIT_IF_IDLE => ExitRequest::IfIdle,
            _ => ExitRequest::Restart,
        }
    }

    /// An exit-if-idle request was refused: back to serving (unless a restart came meanwhile).
    pub fn refused(&self) {
        let _ = self.0.compare_exchange(EXIT_IF_IDLE, RUN, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Why the pid file could not be taken or read.
#[derive(Debug, thiserror::Error)]
pub enum RunDirError {
    /// Another agent holds the lock.
    #[error(
        "another ulog-agent (pid {pid}) holds {path}: one log server per host (the kernel sends every \
         request to every listener); stop it first (`ulog-agent stop --restart` to take over its logs)"
    )]
    Held {
        /// Its pid, as written in the file (0 if unreadable).
        pid: u32,
        /// The pid file.
        path: PathBuf,
    },
    /// I/O on the run directory or pid file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What failed.
        op: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl RunDirError {
    /// The errno this maps to.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Held { .. } => libc::EBUSY,
            Self::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// The agent's pid file, locked for its lifetime (the lock goes with the process).
#[derive(Debug)]
pub struct PidFile {
    _file: File,
    path: PathBuf,
}

fn ofd_lock(fd: &File, cmd: libc::c_int, kind: libc::c_short) -> io::Result<libc::flock> {
    // SAFETY: an all-zero flock is valid (whole file: start 0, len 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on an open fd with a valid flock.
    if unsafe { libc::fcntl(fd.as_raw_fd(), cmd, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl)
}

fn read_pid(f: &mut File) -> u32 {
    let mut s = String::new();
    let _ = f.seek(io::SeekFrom::Start(0)).and_then(|_| f.read_to_string(&mut s));
    s.trim().parse().unwrap_or(0)
}

impl PidFile {
    /// Creates the run directory, locks `<dir>/ulog-agent.pid` and writes our pid into it.
    pub fn acquire(dir: &Path) -> Result<Self, RunDirError> {
        fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RunDirError + 'a {
            move |source| RunDirError::Io { op, path: path.to_path_buf(), source }
        }
        std::fs::create_dir_all(dir).map_err(io_err("cannot create the run directory", dir))?;
        let path = dir.join(PID_FILE);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        match ofd_lock(&file, libc::F_OFD_SETLK, libc::F_WRLCK as libc::c_short) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                return Err(RunDirError::Held { pid: read_pid(&mut file), path });
            }
            Err(e) => return Err(io_err("cannot lock", &path)(e)),
        }
        file.set_len(0)
            .and_then(|_| file.seek(io::SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io_err("cannot write", &path))?;
        Ok(Self { _file: file, path })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid of the agent holding `<dir>/ulog-agent.pid`, if one does (the lock is tested, not
/// taken).
pub fn running_agent(dir: &Path) -> Result<Option<u32>, RunDirError> {
    let path = dir.join(PID_FILE);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(RunDirError::Io { op: "cannot open", path, source }),
    };
    // A read lock conflicts with the agent's write lock: F_OFD_GETLK reports it.
    let fl = ofd_lock(&file, libc::F_OFD_GETLK, libc::F_RDLCK as libc::c_short).map_err(|source| RunDirError::Io {
        op: "cannot test the lock of",
        path: path.clone(),
        source,
    })?;
    if fl.l_type == libc::F_UNLCK as libc::c_short {
        return Ok(None);
    }
    Ok(Some(read_pid(&mut file)))
}

/// What [`stop`] achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// No agent holds the pid file.
    NotRunning,
    /// It exited.
    Exited {
        /// Its pid.
        pid: u32,
    },
    /// Still running after the wait (SIGTERM with live logs: it keeps serving).
    StillRunning {
        /// Its pid.
        pid: u32,
    },
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(pid, 0) returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Signals the agent of `run_dir` (the restart signal if `restart`, else SIGTERM) and waits up
/// to `wait` for it to exit.
pub fn stop(run_dir: &Path, restart: bool, wait: Duration) -> Result<StopOutcome, RunDirError> {
    let io_err = |op| move |source| RunDirError::Io { op, path: run_dir.join(PID_FILE), source };
    let Some(pid) = running_agent(run_dir)? else { return Ok(StopOutcome::NotRunning) };
    if pid == 0 {
        return Err(io_err("no pid in")(io::Error::from_raw_os_error(libc::EINVAL)));
    }
    let pidfd = match pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(StopOutcome::Exited { pid }),
        Err(e) => return Err(io_err("pidfd_open for the pid in")(e)),
    };
    // The pidfd pins the process: if the lock is still held now, `pid` is the agent.
    if running_agent(run_dir)?.is_none() {
        return Ok(StopOutcome::Exited { pid });
    }
    let sig = if restart { restart_signal() } else { libc::SIGTERM };
    // SAFETY: pidfd_send_signal(fd, sig, NULL, 0).
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), sig, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(StopOutcome::Exited { pid });
        }
        return Err(io_err("cannot signal the agent of")(e));
    }
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(StopOutcome::Exited { pid });
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io_err("poll(pidfd) for the agent of")(e));
            }
        }
        if left.is_zero() {
            return Ok(StopOutcome::StillRunning { pid });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_requests() {
        let c = ExitControl::default();
        assert_eq!(c.pending(), ExitRequest::None);
        c.exit_if_idle();
        assert_eq!(c.pending(), ExitRequest::IfIdle);
        c.refused();
        assert_eq!(c.pending(), ExitRequest::None);
        c.exit_if_idle();
        c.restart();
        c.exit_if_idle();
        assert_eq!(c.pending(), ExitRequest::Restart, "SIGTERM does not weaken a restart request");
        c.refused();
        assert_eq!(c.pending(), ExitRequest::Restart);
    }

    #[test]
    fn restart_signal_is_a_real_time_signal() {
        let s = restart_signal();
        assert!(s > libc::SIGRTMIN() && s <= libc::SIGRTMAX());
        assert!(![libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGTERM].contains(&s));
    }

    /// The lock is per open file description: a second acquire (as a second agent would) fails
    /// even within one process, and the holder is found without taking the lock.
    #[test]
    fn pid_file_lock() {
        let dir = std::env::temp_dir().join(format!("ulog-rundir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(running_agent(&dir).unwrap(), None, "no run directory yet");
        let held = PidFile::acquire(&dir).unwrap();
        assert_eq!(held.path(), dir.join(PID_FILE));
        assert_eq!(running_agent(&dir).unwrap(), Some(std::process::id()));
        let e = PidFile::acquire(&dir).unwrap_err();
        assert!(matches!(e, RunDirError::Held { pid, .. } if pid == std::process::id()), "{e}");
        assert_eq!(e.errno(), libc::EBUSY);
        drop(held);
        assert_eq!(running_agent(&dir).unwrap(), None, "the lock goes with the file");
        assert_eq!(stop(&dir, true, Duration::from_millis(10)).unwrap(), StopOutcome::NotRunning);
        let again = PidFile::acquire(&dir).unwrap();
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
