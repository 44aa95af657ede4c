//! Which dm device is each log's mirror, and how many writes it completed: the denominator of
//! the cost model (log requests per mirror write).
//!
//! A log's uuid is not its mirror's dm uuid; the mirror's *table* names it:
//! `mirror userspace <argc> <log-uuid> [integrated_flush] <log args> <#legs> ...`. So
//! [`discover`] asks device-mapper directly ([`crate::region_log::dm`]: `DM_LIST_DEVICES`, then each
//! device's live table); a `mirror` target whose parameters start `userspace <n> <uuid>` serves
//! log `<uuid>`. Write counts come from `/sys/dev/block/<maj>:<min>/stat`
//! (field 5: writes completed; field 7: sectors written), read at scrape time.
//!
//! The mapping is refreshed periodically by the telemetry task (never on the request path) and
//! cached. Where there is no device-mapper (no control node, as on the development machines),
//! [`discover`] fails, the mapping stays empty and no mirror metric is exported.
//!
//! Limits: only live tables are read (the inactive table of a reload names the same uuid and is
//! found once it is live); a mirror with several segments logged by different logs maps each.

use std::collections::HashMap;
use std::io;
use std::path::Path;

use crate::region_log::dm::{Control, DevNum, Table};
// The parsers moved to `crate::region_log::dm` (the log engine uses them too); kept reachable here.
pub use crate::region_log::dm::{parse_name_list, parse_targets, userspace_log_uuid, DM_CONTROL};

/// A mirror dm device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorDevice {
    /// Its dm name (`/dev/mapper/<name>`).
    pub name: String,
    /// Device number.
    pub major: u32,
    /// Device number.
    pub minor: u32,
}

/// Cumulative I/O of a block device, from its `stat` file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Writes completed (field 5).
    pub writes: u64,
    /// Sectors written (field 7; 512-byte units whatever the block size).
    pub sectors: u64,
}

/// Every mirror with a userspace log, by log uuid, through the control node at `control`.
pub fn discover_via(control: &Path) -> io::Result<HashMap<String, MirrorDevice>> {
    let ctl = Control::open(control)?;
    let mut out = HashMap::new();
    for (name, dev) in ctl.list_devices()? {
        // None: removed between the two calls.
        let Some(targets) = ctl.table(dev, Table::Live)? else { continue };
        for (ty, params) in targets {
            if ty != "mirror" {
                continue;
            }
            if let Some(uuid) = userspace_log_uuid(&params) {
                let DevNum { major, minor } = DevNum::from_dev_t(dev);
                out.entry(uuid.to_string()).or_insert(MirrorDevice { name: name.clone(), major, minor });
            }
        }
    }
    Ok(out)
}

/// [`discover_via`] the system's control node.
pub fn discover() -> io::Result<HashMap<String, MirrorDevice>> {
    discover_via(Path::new(DM_CONTROL))
}

/// Parses a block device `stat` file (`Documentation/block/stat.rst`).
pub fn parse_stat(text: &str) -> Option<WriteStats> {
    let f: Vec<u64> = text.split_ascii_whitespace().take(7).map(|v| v.parse().ok()).collect::<Option<_>>()?;
    (f.len() == 7).then(|| WriteStats { writes: f[4], sectors: f[6] })
}

/// The write statistics of block device `major:minor`.
pub fn write_stats(major: u32, minor: u32) -> io::Result<WriteStats> {
    let text = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable stat file"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_files() {
        // Linux 6.x: 17 fields.
        let s = "     215        0    11264      121     1024        3    16384     2010        0      640     2131        0        0        0        0       11       18\n";
        assert_eq!(parse_stat(s), Some(WriteStats { writes: 1024, sectors: 16384 }));
        // Older kernels: 11 fields.
        assert_eq!(parse_stat("1 2 3 4 5 6 7 8 9 10 11"), Some(WriteStats { writes: 5, sectors: 7 }));
        assert_eq!(parse_stat("1 2 3"), None);
        assert_eq!(parse_stat("1 2 3 4 x 6 7"), None);
    }

    #[test]
    fn without_device_mapper_discovery_fails_cleanly() {
        let e = discover_via(Path::new("/nonexistent/mapper/control")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        if !Path::new(DM_CONTROL).exists() {
            assert!(discover().is_err());
        }
    }
}
