//! The log engine: one dirty region log's state, its disk image and its durability.
//!
//! [`dirty_log`] holds a log's state and the semantics of every request over it (over
//! [`bitmap`], sized by [`ctr`]); [`disk_format`] is the kernel's on-disk layout, [`store`] the
//! log device or state file, [`legs`] the mirror legs whose caches are flushed before clean
//! bits are written (found through [`dm`]); [`persist`] is the per-log I/O thread that makes
//! changes durable and sends the replies that wait for them.
//!
//! The engine imports nothing of the layers above it: not the request dispatch (`server/`,
//! `cluster/`) and no telemetry (`metrics/`, `telemetry/`, `api/`), which read the engine's types
//! instead. What the I/O thread reports goes through [`persist::PersistObserver`], which the
//! agent's telemetry implements; what the request path keeps beside a log under its mutex is
//! the caller's type ([`persist::LockedLog`], [`persist::SharedLog`]). The test below holds the
//! rule over every source file of this folder.

pub mod bitmap;
pub mod ctr;
pub mod dirty_log;
pub mod disk_format;
pub mod dm;
pub mod legs;
pub mod persist;
pub mod store;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Every `.rs` file under `dir`, recursively.
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("read the engine's folder") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                sources(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn the_engine_imports_no_layer_above_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/region_log");
        let mut files = Vec::new();
        sources(&dir, &mut files);
        assert!(files.iter().any(|f| f.ends_with("persist.rs")), "no engine sources found in {}", dir.display());
        let above = ["metrics", "telemetry", "api", "server", "cluster"];
        let mut found = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).expect("read a source file");
            for (n, line) in text.lines().enumerate() {
                for layer in above {
                    if line.contains(&format!("crate::{layer}")) || line.contains(&format!("ulog_agent::{layer}")) {
                        found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                    }
                }
            }
        }
        assert!(found.is_empty(), "the log engine names a layer above it:\n{}", found.join("\n"));
    }
}
