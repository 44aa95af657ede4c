//! The shared log device of a `clustered-disk` cluster log: the engine's [`DiskImage`].
//!
//! Every node opens the device at CTR (as a single node does); only the log's disk writer
//! (`ReplicatedLog::disk_writer`) writes it. A write is a whole image in the kernel's `disk`
//! format (header and clean bits, see `region_log::disk_format`), made durable with
//! `RWF_DSYNC` on a thread of its own, so the engine's thread never waits for the device;
//! its completion goes back to the engine as `Command::DiskWritten`. The image is small
//! (1 KiB of header and one bit per region, rounded to the block size: 1.5 KiB for 2048
//! regions, 129 KiB for a million), so writing it whole keeps a hand-over trivially correct:
//! the new writer's first write replaces everything the old one wrote.
//!
//! Limits: a read happens only when nobody holds the log's state (`Genesis`), on the engine's
//! thread; a write error is reported and retried by the engine once a second.

use std::sync::mpsc;

use tracing::warn;

use crate::cluster::engine::{Command, CommandSink, DiskImage};
use crate::region_log::bitmap::RegionBitmap;
use crate::region_log::ctr::SyncMode;
use crate::region_log::disk_format::{self, LoadOutcome};
use crate::region_log::store::{AlignedBuf, LogDevice};

/// A `clustered-disk` log's device as the cluster engine uses it.
pub struct ClusterDisk {
    device: std::sync::Arc<LogDevice>,
    region_count: u64,
    sync: SyncMode,
    writes: mpsc::Sender<(RegionBitmap, u64)>,
    name: String,
}

impl std::fmt::Debug for ClusterDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterDisk").field("device", &self.device.path()).field("log", &self.name).finish()
    }
}

impl ClusterDisk {
    /// Starts the writer thread of the log `group` (its completions go to `commands`).
    pub fn start(
        device: LogDevice,
        group: Vec<u8>,
        region_count: u64,
        sync: SyncMode,
        commands: CommandSink,
        name: String,
    ) -> std::io::Result<Self> {
        let device = std::sync::Arc::new(device);
        let (tx, rx) = mpsc::channel::<(RegionBitmap, u64)>();
        let dev = std::sync::Arc::clone(&device);
        let log = name.clone();
        std::thread::Builder::new().name("ulog-cdisk".into()).spawn(move || {
            // Ends when the engine drops the log (the sender goes with it).
            while let Ok((clean, position)) = rx.recv() {
                let result = write_image(&dev, &clean).map_err(|e| {
                    warn!(log = %log, device = %dev.path().display(), error = %e, "cluster log image write failed");
                    -e.raw_os_error().unwrap_or(libc::EIO)
                });
                if !commands(Command::DiskWritten { group: group.clone(), position, result }) {
                    return;
                }
            }
        })?;
        Ok(Self { device, region_count, sync, writes: tx, name })
    }
}

fn write_image(device: &LogDevice, clean: &RegionBitmap) -> std::io::Result<()> {
    let mut buf = AlignedBuf::zeroed(device.image_len())?;
    disk_format::store_image(clean, &mut buf[..device.image_len()]);
    device.write_durable(&buf, 0, device.image_len())
}

impl DiskImage for ClusterDisk {
    fn read(&mut self) -> std::io::Result<Option<RegionBitmap>> {
        let mut buf = AlignedBuf::zeroed(self.device.image_len())?;
        self.device.read_image(&mut buf)?;
        let mut clean = RegionBitmap::try_new(self.region_count, false)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?;
        Ok(match disk_format::load_clean_bits(&buf, self.sync, &mut clean) {
            // Regions the image does not describe (a grown table) came out as the table says.
            LoadOutcome::Loaded { .. } => Some(clean),
            // No usable image (new device, or the table says sync/nosync): a fresh log.
            LoadOutcome::Fresh => None,
            LoadOutcome::BadVersion(v) => {
                warn!(log = %self.name, version = v, "the log device holds an image of an unknown version: every region starts out of sync");
                Some(
                    RegionBitmap::try_new(self.region_count, false)
                        .map_err(|_| std::io::Error::from(std::io::ErrorKind::OutOfMemory))?,
                )
            }
        })
    }

    fn write(&mut self, clean: RegionBitmap, position: u64) {
        // The thread lives as long as this sender; if it died, the engine hears nothing and
        // the MARKs wait (the log's held requests show it).
        let _ = self.writes.send((clean, position));
    }
}
