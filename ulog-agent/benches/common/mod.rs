//! Shared by the harness-less benches (`roundtrip`, `memory`): result files, statistics, and
//! the guard that keeps `cargo test --benches` from running them.
#![allow(dead_code)] // each bench uses a different part

use std::fmt::Write as _;
use std::path::PathBuf;

/// True when cargo runs the target as a benchmark (`cargo bench` passes `--bench`). Under
/// `cargo test --benches` / `--all-targets` it is run without it: the benches need root, take
/// minutes and assert nothing, so they only say that they were skipped.
pub fn invoked_as_bench() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The start of every harness-less bench: false (after saying why) when it runs under
/// `cargo test --benches`, where it only reports itself skipped; exits 2 without root.
pub fn start_as_root(name: &str) -> bool {
    if !invoked_as_bench() {
        eprintln!("{name}: skipped (a benchmark: run it with `cargo bench -p ulog-agent --bench {name}`)");
        return false;
    }
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("{name}: needs root (network namespaces, connector sockets)");
        std::process::exit(2);
    }
    true
}

/// `--quick` after `--` (`cargo bench --bench roundtrip -- --quick`), or `ULOG_BENCH_QUICK=1`.
pub fn quick() -> bool {
    std::env::args().any(|a| a == "--quick") || std::env::var_os("ULOG_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// The target directory this bench binary was built in (`<target>/<profile>/deps/<exe>`).
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors().nth(3).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"))
}

/// Where the bench writes its JSON-lines results: `$ULOG_BENCH_OUT_DIR/<name>.jsonl`, by
/// default `<target>/ulog-bench/<name>.jsonl`.
pub fn out_path(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("ULOG_BENCH_OUT_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("ulog-bench"));
    std::fs::create_dir_all(&dir).expect("create the bench output directory");
    dir.join(format!("{name}.jsonl"))
}

/// A JSON value, enough for flat result records.
#[derive(Clone, Debug)]
pub enum J {
    /// A string.
    S(String),
    /// A number.
    N(f64),
    /// An integer.
    I(i64),
    /// A boolean.
    B(bool),
}

impl From<&str> for J {
    fn from(s: &str) -> Self {
        J::S(s.to_string())
    }
}
impl From<String> for J {
    fn from(s: String) -> Self {
        J::S(s)
    }
}
impl From<f64> for J {
    fn from(n: f64) -> Self {
        J::N(n)
    }
}
impl From<u64> for J {
    fn from(n: u64) -> Self {
        J::I(n as i64)
    }
}
impl From<usize> for J {
    fn from(n: usize) -> Self {
        J::I(n as i64)
    }
}
impl From<bool> for J {
    fn from(b: bool) -> Self {
        J::B(b)
    }
}

fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One JSON object on one line.
pub fn json_line(fields: &[(&str, J)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        escape(k, &mut s);
        s.push(':');
        match v {
            J::S(x) => escape(x, &mut s),
            J::N(x) if x.is_finite() => {
                let _ = write!(s, "{x}");
            }
            J::N(_) => s.push_str("null"),
            J::I(x) => {
                let _ = write!(s, "{x}");
            }
            J::B(x) => {
                let _ = write!(s, "{x}");
            }
        }
    }
    s.push('}');
    s
}

/// Collects result lines, echoes them to stdout, and writes them to the result file at the end.
pub struct Results {
    path: PathBuf,
    lines: Vec<String>,
}

impl Results {
    /// Results of bench `name`.
    pub fn new(name: &str) -> Self {
        Self { path: out_path(name), lines: Vec::new() }
    }

    /// Adds (and prints) one record.
    pub fn push(&mut self, fields: &[(&str, J)]) {
        let l = json_line(fields);
        println!("ULOG-BENCH {l}");
        self.lines.push(l);
    }

    /// Writes the file; returns its path.
    pub fn write(self) -> PathBuf {
        let mut text = self.lines.join("\n");
        text.push('\n');
        std::fs::write(&self.path, text).expect("write the bench results");
        eprintln!("results written to {}", self.path.display());
        self.path
    }
}

/// The median of some values (the mean of the middle two for an even count); NaN if empty.
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1, nearest rank) of sorted values.
pub fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The filesystem type holding `path`, by `statfs` magic (`"tmpfs"`, `"ext2/3/4"`, ...).
pub fn fs_type(path: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("path without NUL");
    // SAFETY: zeroed statfs is valid; statfs writes it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return format!("unknown ({})", std::io::Error::last_os_error());
    }
    match st.f_type as u64 {
        0x0102_1994 => "tmpfs".into(),
        0xEF53 => "ext2/3/4".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x6573_5546 => "fuse".into(),
        0x794c_7630 => "overlayfs".into(),
        m => format!("magic {m:#x}"),
    }
}
