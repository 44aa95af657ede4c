//! The eBPF toolchain pin and the checks on it, shared by `cargo xtask setup` and
//! `ulog-agent/build.rs`.
//!
//! # Where the pin lives
//! [`EBPF_NIGHTLY`] below is the only place the eBPF nightly is named. `ulog-agent/build.rs`
//! compiles this very file as a module (`#[path = "../xtask/src/toolchain.rs"] mod toolchain;`),
//! so the build script passes the same string to `aya_build::Toolchain::Custom` that setup
//! installed, and cargo recompiles and reruns the build script whenever this file changes
//! (rustc's dep-info lists `#[path]` modules). There is no second copy that could drift.
//!
//! The price: this file must compile inside a build script that has no dependencies, so it uses
//! `std` only (errors are `String`s, no `anyhow`, no `clap`), and every item must be useful or at
//! least harmless in both places (the build script allows `dead_code` for it).
//!
//! # Why a nightly and a bpf-linker built against it
//! Programs for `bpfel-unknown-none` need `-Z build-std=core`, hence a nightly. rustc hands
//! bpf-linker LLVM bitcode, so bpf-linker must link the same LLVM major as that nightly: we link it
//! against the `libLLVM.so` inside the nightly's own sysroot (rpath into the sysroot, see
//! `setup.rs`), which makes the pair consistent by construction. A channel update cannot change
//! the LLVM under bpf-linker because both sides name a dated nightly.
//!
//! # Limits
//! Needs `rustup` on `PATH` (toolchains are found and run through it); a distribution-packaged
//! Rust without rustup is not supported.

use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// The dated nightly that builds `ulog-ebpf` (needs the `rust-src` component for
/// `-Z build-std=core`). Changing it makes `cargo xtask setup` install it and rebuild bpf-linker.
pub const EBPF_NIGHTLY: &str = "nightly-2026-10-29";

/// The bpf-linker release we build from crates.io.
pub const BPF_LINKER_VERSION: &str = "0.13.0";

/// What to tell a user whose eBPF toolchain is incomplete.
pub const SETUP_HINT: &str = "run `cargo xtask setup` (installs the pinned nightly and bpf-linker)";

/// Runs `cmd`, returning its stdout when it exits 0, or a message naming the command otherwise.
pub fn output_of(cmd: &mut Command) -> Result<String, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| format!("cannot run {shown}: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{shown} failed ({}): {}", out.status, stderr.trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `rustup` command with `RUSTUP_TOOLCHAIN` removed: the rustup proxy that started us sets it
/// to the host toolchain, and every command here names its toolchain explicitly anyway.
pub fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// True when `listed` (a line of `rustup toolchain list` or `rustup component list`, e.g.
/// `nightly-2026-10-29-x86_64-unknown-linux-gnu (active)`) names `name`, with or without the
/// host triple rustup appends.
pub fn names(listed: &str, name: &str) -> bool {
    let listed = listed.split_whitespace().next().unwrap_or("");
    listed == name || listed.strip_prefix(name).is_some_and(|rest| rest.starts_with('-'))
}

/// Whether rustup has `toolchain` installed. Never installs anything (unlike `rustc +toolchain`,
/// which auto-installs unless `RUSTUP_AUTO_INSTALL=0`).
pub fn toolchain_installed(toolchain: &str) -> Result<bool, String> {
    let list = output_of(rustup().args(["toolchain", "list"]))?;
    Ok(list.lines().any(|l| names(l, toolchain)))
}

/// The components installed for `toolchain` (as rustup lists them, host triple included).
pub fn installed_components(toolchain: &str) -> Result<Vec<String>, String> {
    let list = output_of(rustup().args(["component", "list", "--installed", "--toolchain", toolchain]))?;
    Ok(list.lines().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()).collect())
}

/// `components` that `toolchain` lacks (call only for an installed toolchain).
pub fn missing_components(toolchain: &str, components: &[&str]) -> Result<Vec<String>, String> {
    let have = installed_components(toolchain)?;
    Ok(components.iter().filter(|c| !have.iter().any(|h| names(h, c))).map(|c| (*c).to_owned()).collect())
}

/// The sysroot of an installed `toolchain` (its `lib/` holds `libLLVM.so.*`).
pub fn sysroot(toolchain: &str) -> Result<PathBuf, String> {
    let out = output_of(rustup().args(["run", toolchain, "rustc", "--print", "sysroot"]))?;
    Ok(PathBuf::from(out.trim()))
}

/// The LLVM major version rustc of `toolchain` was built with (`LLVM version: 23.1.4` -> 23).
pub fn llvm_major(toolchain: &str) -> Result<u32, String> {
    let out = output_of(rustup().args(["run", toolchain, "rustc", "-vV"]))?;
    out.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| format!("no `LLVM version:` line in `rustc +{toolchain} -vV`:\n{out}"))
}

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`): where `cargo install` puts bpf-linker.
pub fn cargo_bin_dir() -> Result<PathBuf, String> {
    let home = match env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => {
            let home = env::var_os("HOME").ok_or("neither CARGO_HOME nor HOME is set")?;
            Path::new(&home).join(".cargo")
        }
    };
    Ok(home.join("bin"))
}

/// The first `name` on `PATH` that is a file, as a shell would find it.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

/// What a bpf-linker binary is good for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkerState {
    /// No such file.
    Missing,
    /// It does not start (typically: the libLLVM its rpath names is gone) or fails.
    Broken(String),
    /// It runs but reports another version.
    WrongVersion(String),
    /// Right version, but not linked against this sysroot's libLLVM (the nightly changed).
    OtherLlvm,
    /// Right version, runs, and uses the pinned nightly's LLVM.
    Ready,
}

impl LinkerState {
    /// A short human description, for setup's output and the build script's error.
    pub fn describe(&self) -> String {
        match self {
            Self::Missing => "not installed".to_owned(),
            Self::Broken(why) => format!("does not run: {why}"),
            Self::WrongVersion(v) => format!("is version {v}, want {BPF_LINKER_VERSION}"),
            Self::OtherLlvm => {
                format!("was not built against the LLVM of {EBPF_NIGHTLY} (rpath mismatch)")
            }
            Self::Ready => format!("{BPF_LINKER_VERSION}, linked against {EBPF_NIGHTLY}'s LLVM"),
        }
    }
}

/// Checks the bpf-linker at `linker`: it exists, `--version` says [`BPF_LINKER_VERSION`] (which
/// also proves the dynamic loader found a libLLVM), and its rpath points into `sysroot/lib`, so the
/// libLLVM it loads is the pinned nightly's. The rpath test looks for the directory as one entry
/// of a `:`-separated, NUL-terminated string anywhere in the binary (`DT_RUNPATH` sits in
/// `.dynstr` that way): crude, but it needs no ELF parser and has no false negatives for binaries
/// built by setup.
pub fn bpf_linker_state(linker: &Path, sysroot: &Path) -> LinkerState {
    if !linker.is_file() {
        return LinkerState::Missing;
    }
    let version = match output_of(Command::new(linker).arg("--version")) {
        Ok(v) => v,
        Err(e) => return LinkerState::Broken(e),
    };
    let version = version.split_whitespace().nth(1).unwrap_or("").to_owned();
    if version != BPF_LINKER_VERSION {
        return LinkerState::WrongVersion(version);
    }
    let lib = sysroot.join("lib");
    let needle = lib.as_os_str();
    match fs::read(linker) {
        Ok(bytes) if has_path_entry(&bytes, needle) => LinkerState::Ready,
        Ok(_) => LinkerState::OtherLlvm,
        Err(e) => LinkerState::Broken(format!("cannot read {}: {e}", linker.display())),
    }
}

/// Whether `entry` occurs in `haystack` delimited by NUL or `:` on both sides (linear, cheap even
/// for the 40 MB binary in a debug build).
fn has_path_entry(haystack: &[u8], entry: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let entry = entry.as_bytes();
    !entry.is_empty() && haystack.split(|&b| b == 0 || b == b':').any(|s| s == entry)
}

/// Everything the eBPF build needs, checked without installing anything: the pinned nightly with
/// `rust-src`, and a [`LinkerState::Ready`] bpf-linker first on `PATH` (the one rustc will run).
/// Returns the bpf-linker path, or a message that says what is wrong and ends with
/// [`SETUP_HINT`].
pub fn ebpf_toolchain_ready() -> Result<PathBuf, String> {
    let fail = |what: String| Err(format!("{what}; {SETUP_HINT}"));
    match toolchain_installed(EBPF_NIGHTLY) {
        Ok(true) => {}
        Ok(false) => return fail(format!("the eBPF toolchain {EBPF_NIGHTLY} is not installed")),
        Err(e) => return fail(format!("cannot ask rustup for toolchains ({e})")),
    }
    match missing_components(EBPF_NIGHTLY, &["rust-src"]) {
        Ok(m) if m.is_empty() => {}
        Ok(_) => return fail(format!("{EBPF_NIGHTLY} lacks the rust-src component")),
        Err(e) => return fail(e),
    }
    let sysroot = match sysroot(EBPF_NIGHTLY) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let Some(linker) = find_in_path("bpf-linker") else {
        let hint = match cargo_bin_dir() {
            Ok(bin) if bin.join("bpf-linker").is_file() => {
                format!(" ({} has one but is not on PATH)", bin.display())
            }
            _ => String::new(),
        };
        return fail(format!("bpf-linker is not on PATH{hint}"));
    };
    match bpf_linker_state(&linker, &sysroot) {
        LinkerState::Ready => Ok(linker),
        other => fail(format!("{}: {}", linker.display(), other.describe())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_is_a_dated_nightly() {
        let date = EBPF_NIGHTLY.strip_prefix("nightly-").expect("nightly-YYYY-MM-DD");
        let parts: Vec<&str> = date.split('-').collect();
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [4, 2, 2], "{date}");
        assert!(parts.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())), "{date}");
    }

    #[test]
    fn build_script_uses_this_file() {
        // The whole sharing scheme rests on this line of ulog-agent/build.rs.
        let build_rs = include_str!("../../ulog-agent/build.rs");
        assert!(build_rs.contains(r#"#[path = "../xtask/src/toolchain.rs"]"#));
        assert!(build_rs.contains("Toolchain::Custom(toolchain::EBPF_NIGHTLY)"));
    }

    #[test]
    fn rustup_list_lines() {
        assert!(names("nightly-2026-10-29-x86_64-unknown-linux-gnu (active)", EBPF_NIGHTLY));
        assert!(names("nightly-2026-10-29", EBPF_NIGHTLY));
        assert!(!names("nightly-2026-10-290-x86_64-unknown-linux-gnu", EBPF_NIGHTLY));
        assert!(!names("nightly-x86_64-unknown-linux-gnu", EBPF_NIGHTLY));
        assert!(names("rust-src", "rust-src"));
        assert!(names("rustfmt-x86_64-unknown-linux-gnu", "rustfmt"));
        assert!(!names("rust-std-x86_64-unknown-linux-gnu", "rust-src"));
        assert!(!names("", "rust-src"));
    }

    #[test]
    fn linker_states() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = env::temp_dir().join(format!("ulog-linker-test-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let sysroot = dir.join("sysroot");
        let script = |name: &str, body: &str| {
            let p = dir.join(name);
            fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            p
        };
        let lib = sysroot.join("lib");
        let ok = script("ok", &format!("echo bpf-linker {BPF_LINKER_VERSION}\nexit 0\n# \0/x/lib:{}\0", lib.display()));
        let other = script("other", &format!("echo bpf-linker {BPF_LINKER_VERSION}"));
        let old = script("old", "echo bpf-linker 0.12.0");
        let broken = script("broken", "echo 'libLLVM.so.23.1: cannot open' >&2; exit 127");
        assert_eq!(bpf_linker_state(&dir.join("none"), &sysroot), LinkerState::Missing);
        assert_eq!(bpf_linker_state(&ok, &sysroot), LinkerState::Ready);
        assert_eq!(bpf_linker_state(&other, &sysroot), LinkerState::OtherLlvm);
        assert_eq!(bpf_linker_state(&old, &sysroot), LinkerState::WrongVersion("0.12.0".into()));
        assert!(matches!(bpf_linker_state(&broken, &sysroot), LinkerState::Broken(m) if m.contains("libLLVM")));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn runpath_search() {
        assert!(has_path_entry(b"\x7fELF\0/a/lib:/b/lib\0x", OsStr::new("/b/lib")));
        assert!(has_path_entry(b"\0/b/lib:/a/lib\0", OsStr::new("/b/lib")));
        assert!(!has_path_entry(b"\0/b/lib2\0", OsStr::new("/b/lib")));
        assert!(!has_path_entry(b"xx", OsStr::new("/b/lib")));
        assert!(!has_path_entry(b"\0\0", OsStr::new("")));
    }
}
