//! `cargo xtask setup`: install everything building and testing ulog needs, idempotently.
//!
//! Steps, each checked first and skipped when already satisfied (a run with nothing to do takes
//! well under a second and installs nothing):
//! 1. the host toolchain named in `rust-toolchain.toml`, with its components (rustfmt, clippy);
//! 2. the eBPF nightly [`toolchain::EBPF_NIGHTLY`] (minimal profile) with `rust-src`;
//! 3. bpf-linker [`toolchain::BPF_LINKER_VERSION`] from crates.io, linked against the
//!    `libLLVM.so` inside that nightly's sysroot (see [`bpf_linker`]), installed into
//!    `$CARGO_HOME/bin` so a plain `cargo build` finds it on `PATH`; rebuilt when it is missing,
//!    does not run, reports another version, or was linked against another nightly;
//! 4. the Debian packages in [`APT_PACKAGES`]: `apt-get update` + `apt-get install` only when
//!    `dpkg-query` reports one missing.
//!
//! # Limits
//! - Debian/Ubuntu only for step 4 (`--skip-apt` on other systems, then install the equivalents by
//!   hand). Runs apt through `sudo` when not root.
//! - Never touches rustup's own settings (self-update, `RUSTUP_HOME`); toolchains go wherever the
//!   machine's rustup keeps them.
//! - Old eBPF nightlies are not uninstalled when the pin moves.
//! - The bpf-linker check looks at `$CARGO_HOME/bin/bpf-linker`; if another bpf-linker comes first
//!   on `PATH`, setup fails and says so (the build would use that one).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::toolchain::{self, LinkerState, BPF_LINKER_VERSION, EBPF_NIGHTLY};

/// Debian packages the test suites need on the host (qemu harness, dm tools, image building,
/// `promtool` for the metrics tests). The one list: add here, setup installs what is missing.
pub const APT_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "dmsetup",
    "kmod",
    "zstd",
    "cpio",
    "iproute2",
    "util-linux",
    // provides promtool (metric exposition checks)
    "prometheus",
    "xz-utils",
    "e2fsprogs",
    // `cargo xtask package [--check]`: dpkg-deb/dpkg-shlibdeps, objcopy/strip/readelf,
    // systemd-analyze verify, mandoc -T lint, lintian
    "dpkg-dev",
    "binutils",
    "systemd",
    "mandoc",
    "lintian",
    // Cluster logs: `rust-corosync` links libcpg, libcfg, libcmap, libquorum and libvotequorum
    // unconditionally at build time (all five -dev packages); corosync itself runs the test
    // clusters (one per network namespace, `ulog_agent::cluster::test_cluster`).
    "corosync",
    "libcpg-dev",
    "libcfg-dev",
    "libcmap-dev",
    "libquorum-dev",
    "libvotequorum-dev",
];

#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// Do not install Debian packages; only report the missing ones (for non-Debian machines).
    #[arg(long)]
    pub skip_apt: bool,
}

/// The workspace root (xtask lives one level below it).
pub fn repo_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow!("xtask's manifest dir has no parent"))
}

/// Prints `cmd` and runs it with inherited stdio (output streams through), failing on a non-zero
/// exit.
pub fn run_streaming(cmd: &mut Command) -> Result<()> {
    println!("  $ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

/// `cmd` as a shell-like line (program and arguments; environment overrides in front).
pub fn show(cmd: &Command) -> String {
    let mut parts: Vec<String> =
        cmd.get_envs().filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy()))).collect();
    parts.push(cmd.get_program().to_string_lossy().into_owned());
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let root = repo_root()?;
    timed("host toolchain", || host_toolchain(&root))?;
    timed("eBPF nightly", ebpf_nightly)?;
    timed("bpf-linker", bpf_linker)?;
    // The exact check ulog-agent/build.rs makes before building the eBPF object.
    let linker = toolchain::ebpf_toolchain_ready().map_err(|e| anyhow!(e))?;
    println!("setup: eBPF build ready ({EBPF_NIGHTLY} + {})", linker.display());
    timed("Debian packages", || apt_packages(args.skip_apt))?;
    println!("setup: done in {:.1?}", t0.elapsed());
    Ok(())
}

fn timed(what: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let t = Instant::now();
    let r = f().with_context(|| format!("setup step `{what}` failed"));
    if t.elapsed().as_secs() >= 1 {
        println!("setup: {what} took {:.1?}", t.elapsed());
    }
    r
}

/// `channel` and `components` of `rust-toolchain.toml` (the subset of TOML it uses: one key per
/// line, string values, a one-line array).
fn parse_toolchain_file(text: &str) -> Result<(String, Vec<String>)> {
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().to_owned())
        })
    };
    let unquote = |s: &str| s.trim().trim_matches('"').to_owned();
    let channel = value("channel")
        .map(|c| unquote(&c))
        .filter(|c| !c.is_empty())
        .ok_or_else(|| anyhow!("no `channel = \"...\"` line"))?;
    let components = match value("components") {
        Some(list) => list
            .trim()
            .strip_prefix('[')
            .and_then(|l| l.strip_suffix(']'))
            .ok_or_else(|| anyhow!("`components` must be a one-line array"))?
            .split(',')
            .map(unquote)
            .filter(|c| !c.is_empty())
            .collect(),
        None => Vec::new(),
    };
    Ok((channel, components))
}

fn host_toolchain(root: &Path) -> Result<()> {
    let file = root.join("rust-toolchain.toml");
    let text = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let (channel, components) = parse_toolchain_file(&text).with_context(|| format!("parsing {}", file.display()))?;
    let want: Vec<&str> = components.iter().map(String::as_str).collect();
    if !toolchain::toolchain_installed(&channel).map_err(|e| anyhow!(e))? {
        println!("setup: host toolchain {channel}: installing (from rust-toolchain.toml)");
        // Without arguments rustup (>= 1.28) installs the toolchain the file in the current
        // directory names, with its profile and components.
        run_streaming(toolchain::rustup().args(["toolchain", "install"]).current_dir(root))?;
    }
    let missing = toolchain::missing_components(&channel, &want).map_err(|e| anyhow!(e))?;
    if missing.is_empty() {
        println!("setup: host toolchain {channel}: present, with {}", want.join(", "));
        return Ok(());
    }
    println!("setup: host toolchain {channel}: adding {}", missing.join(", "));
    run_streaming(toolchain::rustup().args(["component", "add", "--toolchain", &channel]).args(&missing))
}

fn ebpf_nightly() -> Result<()> {
    if !toolchain::toolchain_installed(EBPF_NIGHTLY).map_err(|e| anyhow!(e))? {
        println!("setup: eBPF toolchain {EBPF_NIGHTLY}: installing");
        return run_streaming(toolchain::rustup().args([
            "toolchain",
            "install",
            EBPF_NIGHTLY,
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]));
    }
    let missing = toolchain::missing_components(EBPF_NIGHTLY, &["rust-src"]).map_err(|e| anyhow!(e))?;
    if missing.is_empty() {
        println!("setup: eBPF toolchain {EBPF_NIGHTLY}: present, with rust-src");
        return Ok(());
    }
    println!("setup: eBPF toolchain {EBPF_NIGHTLY}: adding rust-src");
    run_streaming(toolchain::rustup().args(["component", "add", "--toolchain", EBPF_NIGHTLY, "rust-src"]))
}

/// The cargo features that select bpf-linker's LLVM binding for an LLVM major.
fn bpf_linker_features(llvm_major: u32) -> Result<&'static [&'static str]> {
    Ok(match llvm_major {
        23 => &[], // bpf-linker 0.13.0's default feature is llvm-23
        22 => &["--no-default-features", "--features", "llvm-22"],
        21 => &["--no-default-features", "--features", "llvm-21"],
        other => bail!(
            "{EBPF_NIGHTLY} uses LLVM {other}; bpf-linker {BPF_LINKER_VERSION} supports LLVM 21-23: \
             pick another nightly or another bpf-linker"
        ),
    })
}

/// Builds and installs bpf-linker unless the installed one is [`LinkerState::Ready`].
///
/// The recipe (toolchain.md): no prebuilt bpf-linker is reachable, so build it from crates.io
/// against the `libLLVM.so.<ver>-rust-<ver>-nightly` shipped in the pinned nightly's sysroot.
/// The sysroot has no plain `libLLVM.so` for `-lLLVM`, so a throw-away prefix directory gets a
/// `lib/libLLVM.so` symlink and `LLVM_PREFIX` points bpf-linker's build script at it; the binary
/// records the real soname as `DT_NEEDED`, and `-Wl,-rpath,<sysroot>/lib` makes it find that
/// library at run time without `LD_LIBRARY_PATH` (bpf-linker also adds an rpath to the prefix,
/// which is gone afterwards and harmless). ~45-65 s on 2 cores.
fn bpf_linker() -> Result<()> {
    let sysroot = toolchain::sysroot(EBPF_NIGHTLY).map_err(|e| anyhow!(e))?;
    let bin_dir = toolchain::cargo_bin_dir().map_err(|e| anyhow!(e))?;
    let linker = bin_dir.join("bpf-linker");
    let state = toolchain::bpf_linker_state(&linker, &sysroot);
    if state == LinkerState::Ready {
        println!("setup: bpf-linker: {} ({})", state.describe(), linker.display());
    } else {
        println!("setup: bpf-linker: {} {}; building it", linker.display(), state.describe());
        build_bpf_linker(&sysroot, &bin_dir)?;
        let state = toolchain::bpf_linker_state(&linker, &sysroot);
        if state != LinkerState::Ready {
            bail!("bpf-linker was built but {} {}", linker.display(), state.describe());
        }
        println!("setup: bpf-linker: {}", state.describe());
    }
    // The build runs whatever bpf-linker comes first on PATH.
    match toolchain::find_in_path("bpf-linker") {
        Some(p) if p == linker => Ok(()),
        Some(p) => match toolchain::bpf_linker_state(&p, &sysroot) {
            LinkerState::Ready => Ok(()),
            other => bail!(
                "{} comes before {} on PATH and {}: remove it or reorder PATH",
                p.display(),
                linker.display(),
                other.describe()
            ),
        },
        None => bail!("{} is not on PATH: add it (e.g. `. ~/.cargo/env`)", bin_dir.display()),
    }
}

fn build_bpf_linker(sysroot: &Path, bin_dir: &Path) -> Result<()> {
    let major = toolchain::llvm_major(EBPF_NIGHTLY).map_err(|e| anyhow!(e))?;
    let features = bpf_linker_features(major)?;
    let lib = sysroot.join("lib");
    let soname = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .find(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        .ok_or_else(|| anyhow!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = env::temp_dir().join(format!("ulog-llvm-prefix-{}", std::process::id()));
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib).with_context(|| format!("creating {}", prefix_lib.display()))?;
    let link = prefix_lib.join("libLLVM.so");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(lib.join(&soname), &link).with_context(|| format!("symlinking {}", link.display()))?;
    let install_root = bin_dir.parent().ok_or_else(|| anyhow!("{} has no parent", bin_dir.display()))?;

    let mut cmd = Command::new("cargo");
    cmd.args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--locked", "--force"])
        .args(features)
        .arg("--root")
        .arg(install_root)
        .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", lib.display()))
        .env("LLVM_PREFIX", &prefix)
        // A target dir inherited from the caller would be shared with (and locked by) the
        // workspace build; let cargo install use its own temporary one.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    let t = Instant::now();
    let result = run_streaming(&mut cmd);
    let _ = fs::remove_dir_all(&prefix);
    result?;
    println!("setup: bpf-linker {BPF_LINKER_VERSION} (LLVM {major}) built in {:.1?}", t.elapsed());
    Ok(())
}

fn dpkg_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query (not a Debian system? use --skip-apt)")?;
    // Exit 1 with "no packages found" for a package dpkg never heard of: not installed.
    Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed")
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn apt_packages(skip_apt: bool) -> Result<()> {
    let mut missing = Vec::new();
    for p in APT_PACKAGES {
        if !dpkg_installed(p)? {
            missing.push(*p);
        }
    }
    if missing.is_empty() {
        println!("setup: Debian packages: all {} present", APT_PACKAGES.len());
        return Ok(());
    }
    if skip_apt {
        println!("setup: Debian packages: MISSING {} (--skip-apt: not installing)", missing.join(" "));
        return Ok(());
    }
    println!("setup: Debian packages: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = if is_root() {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run_streaming(&mut apt(&["update"]))?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    run_streaming(&mut install)?;
    let still: Vec<&str> = missing.into_iter().filter(|p| !dpkg_installed(p).unwrap_or(false)).collect();
    if !still.is_empty() {
        bail!("apt-get install succeeded but these are still not installed: {}", still.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_real_toolchain_file() {
        let root = repo_root().expect("root");
        let text = fs::read_to_string(root.join("rust-toolchain.toml")).expect("read");
        let (channel, components) = parse_toolchain_file(&text).expect("parse");
        assert!(channel.chars().next().is_some_and(|c| c.is_ascii_digit()), "{channel}");
        assert!(components.iter().any(|c| c == "clippy"), "{components:?}");
        assert!(components.iter().any(|c| c == "rustfmt"), "{components:?}");
    }

    #[test]
    fn toolchain_file_variants() {
        let (c, comps) = parse_toolchain_file("[toolchain]\nchannel=\"1.2.3\"\n").expect("parse");
        assert_eq!((c.as_str(), comps.len()), ("1.2.3", 0));
        assert!(parse_toolchain_file("[toolchain]\n").is_err());
        assert!(parse_toolchain_file("channel = \"x\"\ncomponents = [\n\"a\"]\n").is_err());
    }

    #[test]
    fn package_list_is_clean() {
        let mut sorted = APT_PACKAGES.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), APT_PACKAGES.len(), "duplicate in APT_PACKAGES");
        assert!(APT_PACKAGES.iter().all(|p| !p.is_empty() && !p.contains(char::is_whitespace)));
    }

    #[test]
    fn linker_features_follow_llvm() {
        assert_eq!(bpf_linker_features(23).expect("23"), &[] as &[&str]);
        assert!(bpf_linker_features(22).expect("22").contains(&"llvm-22"));
        assert!(bpf_linker_features(24).is_err());
    }
}
