//! `cargo xtask vm fetch`: the pinned Debian kernel, unpacked into the cache.
//!
//! Steps (each one is skipped when its result is already in the cache):
//! 1. `apt-get download linux-image-<abi>-amd64-unsigned=<version>` into `<cache>/debs/`.
//! 2. `dpkg -x` into a scratch folder (~400 MB, deleted afterwards), `depmod` the whole tree so
//!    `modules.dep` exists (the .deb has none), and resolve the closure of [`MODULES`] from it.
//! 3. Copy that closure into `<cache>/kernel/<kver>_<version>/modules/lib/modules/<kver>/` and
//!    `depmod` the subset, so busybox `modprobe` in the guest sees a consistent tree.
//! 4. Extract the uncompressed `vmlinux` ELF from the bzImage (payload located through the x86
//!    boot-protocol header, decompressed with `xz`), so qemu boots it through PVH (~2x faster
//!    under TCG than the bzImage; PVH skips KASLR).
//! 5. Write a stamp file last; a folder without a matching stamp is rebuilt from the .deb.
//!
//! Host tools used: `apt-get`, `dpkg`, `depmod` (kmod), `xz` (xz-utils).
//! The pin lives in [`KERNEL_ABI`] / [`KERNEL_VERSION`]; `ULOG_VM_KERNEL_ABI` and
//! `ULOG_VM_KERNEL_VERSION` override it for one run (bookworm-security keeps only the newest
//! kernel, so a fresh machine needs a bump once Debian moves on: take the ABI from the `Depends:`
//! of `apt-cache show linux-image-amd64`).
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use super::{cache_root, run_cmd, which};

/// Debian kernel ABI (from `apt-cache show linux-image-amd64`, field `Depends`).
pub const KERNEL_ABI: &str = "6.1.0-56";
/// Debian package version of `linux-image-<KERNEL_ABI>-amd64-unsigned`.
pub const KERNEL_VERSION: &str = "6.1.192-2";

/// Modules the guest needs; their dependency closure goes into the initramfs.
/// `virtio_pci` is the transport for `virtio_blk` / `virtio_net` (a module in Debian's config).
pub const MODULES: &[&str] =
    &["dm-mirror", "dm-log-userspace", "loop", "dm-flakey", "virtio_pci", "virtio_blk", "virtio_net"];

/// Bump when the layout of the unpacked kernel folder changes.
const LAYOUT: u32 = 1;

/// An unpacked, ready-to-boot kernel.
pub struct Kernel {
    /// `uname -r` of the guest, e.g. `6.1.0-56-amd64`.
    pub kver: String,
    /// The uncompressed ELF (booted through PVH).
    pub vmlinux: PathBuf,
    /// The original bzImage (for a realistic KASLR layout: `--bzimage`).
    pub bzimage: PathBuf,
    /// Root of the module subset: contains `lib/modules/<kver>/`.
    pub modroot: PathBuf,
}

fn pinned() -> (String, String) {
    let abi = std::env::var("ULOG_VM_KERNEL_ABI").unwrap_or_else(|_| KERNEL_ABI.into());
    let ver = std::env::var("ULOG_VM_KERNEL_VERSION").unwrap_or_else(|_| KERNEL_VERSION.into());
    (abi, ver)
}

/// The cached kernel if it is complete, without touching the network.
pub fn cached() -> Result<Option<Kernel>> {
    let (abi, ver) = pinned();
    let k = layout(&cache_root()?, &abi, &ver);
    let stamp = fs::read_to_string(k.0.join("stamp")).unwrap_or_default();
    Ok((stamp == stamp_text(&abi, &ver)).then_some(k.1))
}

/// Fetch and unpack the pinned kernel unless it is cached; returns it.
pub fn ensure_kernel(verbose: bool) -> Result<Kernel> {
    if let Some(k) = cached()? {
        if verbose {
            eprintln!("vm fetch: kernel {} cached in {}", k.kver, k.vmlinux.parent().unwrap().display());
        }
        return Ok(k);
    }
    let t0 = Instant::now();
    let (abi, ver) = pinned();
    let cache = cache_root()?;
    for tool in ["apt-get", "dpkg", "depmod", "xz"] {
        ensure!(
            which(tool).is_some(),
            "vm fetch: `{tool}` not found on the host (Debian packages: apt, dpkg, kmod, xz-utils; \
             `cargo xtask setup` installs them)"
        );
    }
    let pkg = format!("linux-image-{abi}-amd64-unsigned");
    let debs = cache.join("debs");
    fs::create_dir_all(&debs)?;
    let deb = debs.join(format!("{pkg}_{ver}_amd64.deb"));
    if !deb.exists() {
        eprintln!("vm fetch: apt-get download {pkg}={ver}");
        let t = Instant::now();
        // Download into a private folder, then rename: concurrent fetches cannot see half a file.
        let dl = debs.join(format!("download-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dl);
        fs::create_dir_all(&dl)?;
        let res = apt_download(&dl, &format!("{pkg}={ver}"));
        if res.is_ok() {
            fs::rename(dl.join(deb.file_name().unwrap()), &deb).context("apt-get download produced no .deb")?;
        }
        let _ = fs::remove_dir_all(&dl);
        res.with_context(|| {
            format!(
                "apt-get download {pkg}={ver} failed. Run `apt-get update` first; if Debian has moved \
                 on, bump KERNEL_ABI/KERNEL_VERSION in xtask/src/vm/fetch.rs (or set \
                 ULOG_VM_KERNEL_ABI/ULOG_VM_KERNEL_VERSION) from `apt-cache show linux-image-amd64`"
            )
        })?;
        ensure!(deb.exists(), "apt-get download did not produce {}", deb.display());
        eprintln!("vm fetch: downloaded {} ({:.1} s)", deb.display(), t.elapsed().as_secs_f64());
    }

    let (final_dir, k) = layout(&cache, &abi, &ver);
    let staging = final_dir.with_extension(format!("tmp{}", std::process::id()));
    let scratch = cache.join(format!("unpack-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_dir_all(&scratch);
    let result = (|| -> Result<()> {
        let t = Instant::now();
        run_cmd(Command::new("dpkg").arg("-x").arg(&deb).arg(&scratch))?;
        let kver = find_kver(&scratch)?;
        ensure!(kver == k.kver, "the package holds kernel {kver}, expected {}", k.kver);
        run_cmd(Command::new("depmod").arg("-b").arg(&scratch).arg(&kver))?;
        eprintln!("vm fetch: unpacked and depmod'ed ({:.1} s)", t.elapsed().as_secs_f64());

        fs::create_dir_all(&staging)?;
        let src_mod = scratch.join("lib/modules").join(&kver);
        let dst_mod = staging.join("modules/lib/modules").join(&kver);
        let closure = module_closure(&src_mod, MODULES)?;
        for rel in &closure {
            let dst = dst_mod.join(rel);
            fs::create_dir_all(dst.parent().unwrap())?;
            fs::copy(src_mod.join(rel), &dst).with_context(|| format!("copy {rel}"))?;
        }
        for f in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
            fs::copy(src_mod.join(f), dst_mod.join(f))?;
        }
        run_cmd(Command::new("depmod").arg("-b").arg(staging.join("modules")).arg(&kver))?;
        eprintln!("vm fetch: {} modules in the closure of {}", closure.len(), MODULES.join(" "));

        let boot = scratch.join("boot");
        fs::copy(boot.join(format!("vmlinuz-{kver}")), staging.join("vmlinuz"))?;
        fs::copy(boot.join(format!("config-{kver}")), staging.join("config"))?;
        let t = Instant::now();
        let elf = extract_vmlinux(&staging.join("vmlinuz"))?;
        fs::write(staging.join("vmlinux"), elf)?;
        eprintln!("vm fetch: extracted vmlinux ({:.1} s)", t.elapsed().as_secs_f64());
        fs::write(staging.join("stamp"), stamp_text(&abi, &ver))?;
        if cached()?.is_some() {
            // A concurrent fetch finished first: keep its folder (it may be in use).
            fs::remove_dir_all(&staging)?;
        } else {
            let _ = fs::remove_dir_all(&final_dir);
            fs::rename(&staging, &final_dir)?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&scratch);
    if result.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    result?;
    eprintln!("vm fetch: kernel {} ready in {} ({:.1} s)", k.kver, final_dir.display(), t0.elapsed().as_secs_f64());
    Ok(k)
}

fn stamp_text(abi: &str, ver: &str) -> String {
    format!("layout {LAYOUT}\npackage linux-image-{abi}-amd64-unsigned {ver}\nmodules {}\n", MODULES.join(" "))
}

fn layout(cache: &Path, abi: &str, ver: &str) -> (PathBuf, Kernel) {
    let kver = format!("{abi}-amd64");
    let dir = cache.join("kernel").join(format!("{kver}_{ver}"));
    let k = Kernel { vmlinux: dir.join("vmlinux"), bzimage: dir.join("vmlinuz"), modroot: dir.join("modules"), kver };
    (dir, k)
}

/// `apt-get download <spec>` into `dir`. As root, apt would try to drop to the `_apt` user, who
/// cannot write into a cache under /root: keep root (what apt falls back to anyway, with a warning).
pub fn apt_download(dir: &Path, spec: &str) -> Result<()> {
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(dir).arg("-q").arg("download");
    if fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false) {
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd.arg(spec);
    run_cmd(&mut cmd)
}

fn find_kver(root: &Path) -> Result<String> {
    let mut v: Vec<String> = fs::read_dir(root.join("lib/modules"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(v.len() == 1, "expected one kernel in the package, found {v:?}");
    Ok(v.pop().unwrap())
}

/// Module name as the kernel and modprobe compare them.
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Paths (relative to `lib/modules/<kver>`) of `wanted` and everything they depend on, from
/// `modules.dep`. Built-in modules (modules.builtin) need no file and are skipped.
pub fn module_closure(moddir: &Path, wanted: &[&str]) -> Result<BTreeSet<String>> {
    let dep = fs::read_to_string(moddir.join("modules.dep")).context("read modules.dep")?;
    let mut by_name: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep.lines() {
        let Some((path, deps)) = line.split_once(':') else { continue };
        let name = norm(mod_stem(path));
        by_name.insert(name, (path.to_string(), deps.split_whitespace().map(String::from).collect()));
    }
    let builtin: BTreeSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(|p| norm(mod_stem(p)))
        .collect();
    let mut out = BTreeSet::new();
    let mut queue: VecDeque<String> = VecDeque::new();
    for w in wanted {
        let n = norm(w);
        if builtin.contains(&n) {
            continue;
        }
        match by_name.get(&n) {
            Some((p, _)) => queue.push_back(p.clone()),
            None => bail!("module {w} is neither in modules.dep nor built in"),
        }
    }
    while let Some(p) = queue.pop_front() {
        if !out.insert(p.clone()) {
            continue;
        }
        let (_, deps) = &by_name[&norm(mod_stem(&p))];
        queue.extend(deps.iter().cloned());
    }
    Ok(out)
}

fn mod_stem(path: &str) -> &str {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base)
}

/// The uncompressed kernel ELF inside a bzImage. The x86 boot protocol (>= 2.08) records where
/// the compressed payload is: `payload_offset` (0x248) / `payload_length` (0x24c), relative to
/// the protected-mode code, which starts after `setup_sects` (0x1f1) + 1 sectors.
pub fn extract_vmlinux(bzimage: &Path) -> Result<Vec<u8>> {
    let img = fs::read(bzimage)?;
    ensure!(img.len() > 0x250 && &img[0x202..0x206] == b"HdrS", "{}: not a bzImage", bzimage.display());
    let u32_at = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().unwrap()) as usize;
    let setup_sects = match img[0x1f1] {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sects + 1) * 512 + u32_at(0x248);
    let len = u32_at(0x24c);
    ensure!(start + len <= img.len(), "bzImage payload out of bounds");
    let payload = &img[start..start + len];
    let (tool, args): (&str, &[&str]) = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        // The build appends the uncompressed size after the stream: read only the first one.
        ("xz", &["-dc", "--single-stream"])
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        ("zstd", &["-dcq"])
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        ("gzip", &["-dc"])
    } else {
        bail!("unknown bzImage payload compression (magic {:02x?})", &payload[..6.min(payload.len())]);
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {tool}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let data = payload.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    let _ = writer.join();
    ensure!(out.status.success(), "{tool} failed on the bzImage payload");
    ensure!(out.stdout.starts_with(b"\x7fELF"), "the decompressed payload is not an ELF file");
    Ok(out.stdout)
}
