//! One qemu boot: command line, console capture, result-line parsing, timeouts.
//!
//! The guest talks to the host only through its serial console (ttyS0 on qemu's stdio). `/init`
//! prints marker lines, which are matched anywhere in a line because kernel messages can share a
//! line with them:
//! - `ULOG-INIT`: /init is running (boot time is measured to here)
//! - `ULOG-START <name>`: a scenario starts
//! - `ULOG-RESULT <name> <exit>`: a scenario finished (0 = passed); the first one per name counts
//! - `ULOG-TIMEOUT <name>`: the guest's watchdog killed a scenario
//! - `ULOG-TAINTED <name> <why>` / `ULOG-WARN ...`: cleanup problems (informational)
//! - `ULOG-RESET`: the scenario asked for a hard reset (sysrq b; the markers then come through
//!   the kernel log, since tty output still queued is lost at the reset); the host kills qemu if
//!   it has not exited 5 s later
//! - `ULOG-DONE`: every scenario of this boot ran; `poweroff -f` follows
//!
//! Every console line goes to the log file with the host's elapsed time in front, and (unless
//! quiet) to our stdout as is. The host enforces its own timeout and kills qemu (SIGKILL).
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when kvm_intel/kvm_amd is loaded and /dev/kvm is usable, else TCG.
    Auto,
    Tcg,
    Kvm,
}

impl Accel {
    /// /dev/kvm alone is not enough: these machines have a paravirtual backend (kvm_pvm) that
    /// cannot run an unmodified distro kernel.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto => {
                let hw = Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
                let dev = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
                if hw && dev {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                }
            }
            a => a,
        }
    }
}

/// qemu's minimal firmware: boots the PVH kernel ~0.3-0.5 s sooner than SeaBIOS under TCG and
/// prints no escape sequences. Used when the file exists (Debian package qemu-system-data).
pub const QBOOT: &str = "/usr/share/qemu/qboot.rom";

pub struct Machine {
    pub kernel: PathBuf,
    /// Firmware passed with -bios (None: qemu's default, SeaBIOS).
    pub bios: Option<PathBuf>,
    pub initrd: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub smp: u32,
    /// Further qemu arguments (`vm bench --icount`).
    pub extra_args: Vec<String>,
}

/// One boot's configuration.
pub struct Boot<'a> {
    pub machine: &'a Machine,
    /// Appended to the kernel command line (the `ulog.*` parameters /init reads).
    pub cmdline: String,
    /// Raw images attached as virtio disks, in order (/dev/vda, /dev/vdb, ...).
    pub disks: &'a [PathBuf],
    pub timeout: Duration,
    pub log: &'a Path,
    /// Copy console lines to stdout.
    pub echo: bool,
}

#[derive(Debug, Clone)]
pub struct ScenarioResult {
    pub name: String,
    pub exit: i32,
    /// Host-side time between its START and RESULT lines.
    pub secs: f64,
    pub timed_out: bool,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub results: Vec<ScenarioResult>,
    /// Host time from spawning qemu to `ULOG-INIT`.
    pub init_secs: Option<f64>,
    pub done: bool,
    pub reset: bool,
    /// The host timeout fired and qemu was killed.
    pub timed_out: bool,
    pub status: Option<ExitStatus>,
    pub secs: f64,
}

pub(super) fn base_command(m: &Machine, cmdline: &str, disks: &[PathBuf]) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    match m.accel.resolve() {
        Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host"]),
        _ => c.args(["-accel", "tcg", "-cpu", "max"]),
    };
    c.args(["-m", &m.memory_mib.to_string(), "-smp", &m.smp.to_string()]);
    c.args(["-nodefaults", "-nographic", "-no-reboot"]);
    c.args(&m.extra_args);
    if let Some(b) = &m.bios {
        c.arg("-bios").arg(b);
    }
    c.arg("-kernel").arg(&m.kernel).arg("-initrd").arg(&m.initrd);
    c.arg("-append").arg(format!("console=ttyS0 rdinit=/init panic=-1 quiet {cmdline}"));
    for d in disks {
        let mut a = std::ffi::OsString::from("file=");
        a.push(d);
        a.push(",if=virtio,format=raw,cache=writeback");
        c.arg("-drive").arg(a);
    }
    c
}

/// The full qemu command line, for humans (printed in the log).
pub(super) fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') {
            s += &format!(" '{a}'");
        } else {
            s += &format!(" {a}");
        }
    }
    s
}

/// Boot with the console on this terminal (`Ctrl-A x` quits qemu).
pub fn interactive(m: &Machine, cmdline: &str, disks: &[PathBuf]) -> Result<ExitStatus> {
    let mut c = base_command(m, cmdline, disks);
    c.args(["-serial", "mon:stdio"]);
    eprintln!("vm shell: {}", describe(&c));
    eprintln!("vm shell: Ctrl-A x quits qemu; `poweroff -f` in the guest too");
    c.status().context("spawn qemu-system-x86_64 (Debian package qemu-system-x86)")
}

enum Msg {
    Line(Instant, String),
    Eof,
}

fn reader(src: impl Read + Send + 'static, prefix: &'static str, tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let s = String::from_utf8_lossy(&buf);
                    let s = s.trim_end_matches(['\n', '\r']).replace('\r', "");
                    if tx.send(Msg::Line(Instant::now(), format!("{prefix}{s}"))).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(Msg::Eof);
    });
}

/// The word after `marker` in `line`, and the rest.
fn marker<'a>(line: &'a str, marker: &str) -> Option<Vec<&'a str>> {
    let i = line.find(marker)?;
    Some(line[i + marker.len()..].split_whitespace().collect())
}

pub fn boot(b: &Boot) -> Result<Outcome> {
    let mut c = base_command(b.machine, &b.cmdline, b.disks);
    c.args(["-serial", "stdio", "-monitor", "none"]);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut log = fs::File::create(b.log).with_context(|| format!("create {}", b.log.display()))?;
    writeln!(log, "# {}", describe(&c))?;
    let t0 = Instant::now();
    let mut child = c.spawn().context("spawn qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let (tx, rx) = mpsc::channel();
    reader(child.stdout.take().unwrap(), "", tx.clone());
    reader(child.stderr.take().unwrap(), "qemu stderr: ", tx);

    let mut out = Outcome::default();
    let mut open = 2;
    let mut deadline = t0 + b.timeout;
    let mut started: Option<(String, Instant)> = None;
    let mut guest_timeouts: Vec<String> = Vec::new();
    let stdout = std::io::stdout();
    while open > 0 {
        let now = Instant::now();
        if now >= deadline {
            if out.reset {
                writeln!(log, "# host: the guest asked for a reset and is still running: killing qemu")?;
            } else {
                out.timed_out = true;
                writeln!(log, "# host: timeout after {:.0} s: killing qemu", b.timeout.as_secs_f64())?;
            }
            let _ = child.kill();
            break;
        }
        match rx.recv_timeout(deadline - now) {
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(Msg::Eof) => open -= 1,
            Ok(Msg::Line(at, line)) => {
                let rel = at.duration_since(t0).as_secs_f64();
                writeln!(log, "[{rel:8.3}] {line}")?;
                if b.echo {
                    let mut so = stdout.lock();
                    let _ = writeln!(so, "{line}");
                }
                if line.contains("ULOG-INIT") && out.init_secs.is_none() {
                    out.init_secs = Some(rel);
                } else if let Some(w) = marker(&line, "ULOG-START ") {
                    if let Some(name) = w.first() {
                        started = Some((name.to_string(), at));
                    }
                } else if let Some(w) = marker(&line, "ULOG-TIMEOUT ") {
                    guest_timeouts.extend(w.first().map(|s| s.to_string()));
                } else if let Some(w) = marker(&line, "ULOG-RESULT ") {
                    let (name, code) = (w.first(), w.get(1));
                    let seen = out.results.iter().any(|r| Some(&r.name.as_str()) == name);
                    if let (Some(name), Some(code), false) = (name, code, seen) {
                        let secs = match &started {
                            Some((n, t)) if n == name => at.duration_since(*t).as_secs_f64(),
                            _ => 0.0,
                        };
                        out.results.push(ScenarioResult {
                            name: name.to_string(),
                            exit: code.parse().unwrap_or(-1),
                            secs,
                            timed_out: guest_timeouts.iter().any(|n| n == name),
                        });
                    }
                } else if line.contains("ULOG-DONE") {
                    out.done = true;
                } else if line.contains("ULOG-RESET") && !out.reset {
                    out.reset = true;
                    deadline = deadline.min(Instant::now() + Duration::from_secs(5));
                }
            }
        }
    }
    out.status = child.wait().ok();
    out.secs = t0.elapsed().as_secs_f64();
    writeln!(log, "# host: qemu ended ({:?}) after {:.1} s; init at {:?} s", out.status, out.secs, out.init_secs)?;
    Ok(out)
}

/// The last `n` lines of a console log that belong to scenario `name` (from its START line to
/// its RESULT line), or of the whole log when it has no START line for it.
pub fn excerpt(path: &Path, name: &str, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.contains(&format!("ULOG-START {name} ")));
    let end = start
        .and_then(|s| lines[s..].iter().position(|l| l.contains(&format!("ULOG-RESULT {name} "))).map(|e| s + e + 1));
    let (from, to) = match (start, end) {
        (Some(s), Some(e)) => (s, e),
        (Some(s), None) => (s, lines.len()),
        _ => (0, lines.len()),
    };
    let part = &lines[from..to];
    part[part.len().saturating_sub(n)..].join("\n")
}
