//! The guest's initramfs: an in-memory file tree written as a newc cpio archive.
//!
//! Contents: `/init` and the scenario scripts from `xtask/vm-scenarios/`, a static busybox
//! (applet links are made by `/init` at boot), `dmsetup` and `ulog-agent` with the shared
//! libraries `ldd` lists (copied from the host to the same paths, so the guest's ld.so finds them
//! in its default directories), and the kernel module subset from the fetch step.
//!
//! The cpio writer is ~40 lines (newc: a 110-byte ASCII header, the NUL-terminated name and the
//! data, each padded to 4 bytes), so there is no crate for it. Compression is optional and done
//! by the host's `zstd` (the kernel has CONFIG_RD_ZSTD): see [`Compression`] for the measured
//! trade-off.
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};

use super::fetch::Kernel;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    /// Plain cpio: largest file, nothing to decompress in the guest.
    None,
    /// `zstd -3`: several times smaller; the guest kernel decompresses it at boot.
    Zstd,
}

enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// A file tree to be written as an initramfs. Paths are absolute guest paths.
#[derive(Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_end_matches('/');
        if path.is_empty() {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.nodes.entry(path.to_string()).or_insert(Node::Dir);
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
    }

    pub fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent(path);
        self.nodes.insert(path.to_string(), Node::File { data, mode });
    }

    /// Copy a host file (following symlinks), keeping its permission bits.
    pub fn file(&mut self, path: &str, host: &Path) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("read {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.bytes(path, data, mode);
        Ok(())
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.nodes.insert(path.to_string(), Node::Symlink(target.to_string()));
    }

    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    /// A host binary plus every library `ldd` resolves for it (nothing for a static one).
    pub fn binary_with_libs(&mut self, guest: &str, host: &Path) -> Result<()> {
        self.file(guest, host)?;
        for lib in ldd(host)? {
            if !self.contains(&lib) {
                self.file(&lib, Path::new(&lib))?;
            }
        }
        Ok(())
    }

    /// Copy a host directory tree under `guest` (regular files and symlinks).
    pub fn host_tree(&mut self, guest: &str, host: &Path) -> Result<()> {
        self.dir(guest);
        for e in fs::read_dir(host).with_context(|| format!("read {}", host.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let g = format!("{}/{name}", guest.trim_end_matches('/'));
            let ft = e.file_type()?;
            if ft.is_dir() {
                self.host_tree(&g, &e.path())?;
            } else if ft.is_symlink() {
                self.symlink(&g, &fs::read_link(e.path())?.to_string_lossy());
            } else {
                self.file(&g, &e.path())?;
            }
        }
        Ok(())
    }

    pub fn file_count(&self) -> usize {
        self.nodes.len()
    }

    /// The newc archive (uncompressed).
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            self.nodes
                .values()
                .map(|n| match n {
                    Node::File { data, .. } => data.len() + 128,
                    _ => 128,
                })
                .sum::<usize>()
                + 1024,
        );
        for (ino, (path, node)) in (1u32..).zip(&self.nodes) {
            let name = path.trim_start_matches('/');
            let (mode, data): (u32, &[u8]) = match node {
                Node::Dir => (0o040755, &[]),
                Node::File { data, mode } => (0o100000 | mode, data),
                Node::Symlink(t) => (0o120777, t.as_bytes()),
            };
            let nlink = if matches!(node, Node::Dir) { 2 } else { 1 };
            cpio_entry(&mut out, ino, name, mode, nlink, data);
        }
        cpio_entry(&mut out, 0, "TRAILER!!!", 0, 1, &[]);
        out
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, nlink: u32, data: &[u8]) {
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check: all 8-digit hex. mtime 0 keeps the archive reproducible.
    let fields = [ino, mode, 0, 0, nlink, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// Absolute paths of the shared libraries (and the ELF interpreter) `ldd` lists for `bin`.
pub fn ldd(bin: &Path) -> Result<Vec<String>> {
    let out = Command::new("ldd").arg(bin).output().context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static binary needs nothing.
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            || text.contains("statically linked")
        {
            return Ok(vec![]);
        }
        bail!("ldd {} failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("ldd {}: {line}", bin.display());
        }
        // "libx.so => /lib/.../libx.so (0x..)" or "/lib64/ld-linux-x86-64.so.2 (0x..)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_string());
        }
    }
    Ok(libs)
}

/// What goes into one initramfs.
pub struct Inputs<'a> {
    pub kernel: &'a Kernel,
    pub scenarios_dir: &'a Path,
    /// `ulog-agent` to install as /bin/ulog-agent (None: the guest has none).
    pub agent: Option<&'a Path>,
    pub compression: Compression,
    /// Adds files for one kind of boot only (`vm bench`: fio and its libraries, the benchmark
    /// script), so the test initramfs stays small.
    pub extra: Option<ExtraFiles<'a>>,
}

/// A function that adds boot-specific files to the tree.
pub type ExtraFiles<'a> = &'a dyn Fn(&mut Tree) -> Result<()>;

pub fn which_host(names: &[&str]) -> Option<PathBuf> {
    names.iter().map(Path::new).find(|p| p.exists()).map(Path::to_path_buf)
}

/// What [`build`] produced.
pub struct Built {
    pub entries: usize,
    pub cpio_bytes: usize,
    pub file_bytes: u64,
}

/// Build the initramfs at `out`.
pub fn build(inp: &Inputs, out: &Path) -> Result<Built> {
    let mut t = Tree::default();
    for d in
        ["/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc", "/bin", "/sbin", "/usr/bin", "/usr/sbin", "/mnt"]
    {
        t.dir(d);
    }
    let busybox = which_host(&["/bin/busybox", "/usr/bin/busybox"])
        .context("busybox not found on the host (Debian package busybox-static)")?;
    ensure!(ldd(&busybox)?.is_empty(), "{} is not static: install busybox-static", busybox.display());
    t.file("/bin/busybox", &busybox)?;
    t.symlink("/bin/sh", "busybox");
    let dmsetup = which_host(&["/usr/sbin/dmsetup", "/sbin/dmsetup"])
        .context("dmsetup not found on the host (Debian package dmsetup)")?;
    t.binary_with_libs("/sbin/dmsetup", &dmsetup)?;
    if let Some(agent) = inp.agent {
        t.binary_with_libs("/bin/ulog-agent", agent)?;
    }
    t.bytes("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n".to_vec(), 0o644);
    t.bytes("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
    t.host_tree("/lib/modules", &inp.kernel.modroot.join("lib/modules"))?;

    // /init and the scenario scripts.
    let init = inp.scenarios_dir.join("init");
    t.bytes("/init", fs::read(&init).with_context(|| format!("read {}", init.display()))?, 0o755);
    for e in fs::read_dir(inp.scenarios_dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sh") {
            t.bytes(&format!("/scenarios/{name}"), fs::read(e.path())?, 0o755);
        }
    }

    if let Some(extra) = inp.extra {
        extra(&mut t)?;
    }

    let cpio = t.to_cpio();
    let raw_len = cpio.len();
    let tmp = out.with_extension("part");
    match inp.compression {
        Compression::None => fs::write(&tmp, &cpio)?,
        Compression::Zstd => {
            let f = fs::File::create(&tmp)?;
            let mut child = Command::new("zstd")
                .args(["-3", "-q", "-c", "-T0"])
                .stdin(Stdio::piped())
                .stdout(f)
                .spawn()
                .context("spawn zstd (Debian package zstd)")?;
            child.stdin.take().unwrap().write_all(&cpio)?;
            ensure!(child.wait()?.success(), "zstd failed");
        }
    }
    fs::rename(&tmp, out)?;
    Ok(Built { entries: t.file_count(), cpio_bytes: raw_len, file_bytes: fs::metadata(out)?.len() })
}
