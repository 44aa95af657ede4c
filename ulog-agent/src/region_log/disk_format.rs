//! The on-disk format of the kernel's `disk` dirty log (drivers/md/dm-log.c), byte for byte.
//!
//! ```text
//! byte 0     magic  0x4D695272 ("MiRr" read as LE bytes 72 52 69 4d)   __le32
//! byte 4     version 2                                                 __le32
//! byte 8     nr_regions                                                __le64
//! byte 16..1024  unused
//! byte 1024  clean bitmap, round_up(region_count, 32) / 8 bytes, little-endian bit order:
//!            region r = byte 1024 + r/8, bit r%8; 1 = clean (in sync), 0 = dirty
//! ```
//!
//! Little-endian on every host, so a log device written by ulog can be opened by the kernel's
//! own `disk` log type and vice versa (cmirrord copies host-endian words instead). One image
//! covers the header and the bitmap, rounded up to the device's logical block size.

use crate::region_log::bitmap::RegionBitmap;
use crate::region_log::ctr::SyncMode;

/// `MIRROR_MAGIC`.
pub const MAGIC: u32 = 0x4D69_5272;
/// `MIRROR_DISK_VERSION`.
pub const VERSION: u32 = 2;
/// Byte offset of the bitmap (`LOG_OFFSET` = 2 sectors).
pub const BITMAP_OFFSET: usize = 1024;

/// Bytes of bitmap for `region_count` regions (whole 32-bit words, as the kernel sizes it).
pub fn bitset_bytes(region_count: u64) -> usize {
    (region_count.div_ceil(32) * 4) as usize
}

/// Bytes of the whole image, rounded up to `block` (a power of two).
pub fn image_len(region_count: u64, block: usize) -> usize {
    (BITMAP_OFFSET + bitset_bytes(region_count)).div_ceil(block) * block
}

/// The 16-byte header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Magic number.
    pub magic: u32,
    /// Format version.
    pub version: u32,
    /// Regions the bitmap describes.
    pub nr_regions: u64,
}

impl Header {
    /// Reads the header from the first 16 bytes of an image.
    pub fn read(image: &[u8]) -> Option<Self> {
        let b = image.get(..16)?;
        Some(Self {
            magic: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            version: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            nr_regions: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
        })
    }

    /// A current header for `nr_regions`.
    pub fn current(nr_regions: u64) -> Self {
        Self { magic: MAGIC, version: VERSION, nr_regions }
    }

    /// Writes the header into the first 16 bytes of an image.
    pub fn write(&self, image: &mut [u8]) {
        image[0..4].copy_from_slice(&self.magic.to_le_bytes());
        image[4..8].copy_from_slice(&self.version.to_le_bytes());
        image[8..16].copy_from_slice(&self.nr_regions.to_le_bytes());
    }
}

/// What loading an image found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// A valid log: the first `nr_regions` regions came from it.
    Loaded {
        /// Regions the image described.
        nr_regions: u64,
    },
    /// No usable log (bad magic, or the table said sync/nosync): started afresh.
    Fresh,
    /// A log of an unknown version: started afresh, and the device counts as failed
    /// (the kernel's `disk_resume` does the same).
    BadVersion(u32),
}

/// Fills `clean` from `image` the way the kernel's `disk_resume` does.
///
/// Regions the image does not describe are clean with `nosync`, dirty otherwise.
pub fn load_clean_bits(image: &[u8], sync: SyncMode, clean: &mut RegionBitmap) -> LoadOutcome {
    let region_count = clean.len();
    let header = Header::read(image);
    let outcome = match header {
        Some(h) if sync == SyncMode::Default && h.magic == MAGIC => match h.version {
            // Version 1 had the same layout on little-endian hosts.
            1 | VERSION => LoadOutcome::Loaded { nr_regions: h.nr_regions },
            v => LoadOutcome::BadVersion(v),
        },
        _ => LoadOutcome::Fresh,
    };
    let from_disk = match outcome {
        LoadOutcome::Loaded { nr_regions } => nr_regions.min(region_count),
        _ => 0,
    };
    let bits = image.get(BITMAP_OFFSET..).unwrap_or(&[]);
    let have = bitset_bytes(region_count).min(bits.len());
    clean.load_le_bytes(&bits[..have]);
    clean.fill_from(from_disk, sync == SyncMode::NoSync);
    outcome
}

/// Writes a complete image (header for `clean.len()` regions, bitmap, zero padding).
pub fn store_image(clean: &RegionBitmap, image: &mut [u8]) {
    image.fill(0);
    Header::current(clean.len()).write(image);
    let n = bitset_bytes(clean.len()).min(image.len().saturating_sub(BITMAP_OFFSET));
    clean.read_le_bytes(0, &mut image[BITMAP_OFFSET..BITMAP_OFFSET + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_sizes_match_the_vectors() {
        // protocol.md §7.9.
        let mut img = vec![0u8; image_len(2048, 512)];
        assert_eq!(img.len(), 1536);
        let clean = RegionBitmap::try_new(2048, true).unwrap();
        store_image(&clean, &mut img);
        assert_eq!(&img[..16], &[0x72, 0x52, 0x69, 0x4d, 2, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bitset_bytes(1000), 128);
        let clean = RegionBitmap::try_new(1000, true).unwrap();
        let mut img = vec![0xEEu8; image_len(1000, 512)];
        store_image(&clean, &mut img);
        assert_eq!(&img[8..12], &[0xe8, 0x03, 0, 0]);
        // Bits 992..999 are the last set byte; bits 1000..1023 are zero padding.
        assert_eq!(img[1024 + 124], 0xff);
        assert_eq!(&img[1024 + 125..1024 + 128], &[0, 0, 0]);
        let mut c = RegionBitmap::try_new(10, true).unwrap();
        c.set(3, false);
        let mut img = vec![0u8; 1536];
        store_image(&c, &mut img);
        assert_eq!(&img[1024..1028], &[0xf7, 0x03, 0, 0]);
    }

    #[test]
    fn load_follows_disk_resume() {
        let mut c = RegionBitmap::try_new(10, true).unwrap();
        c.set(3, false);
        let mut img = vec![0u8; 1536];
        store_image(&c, &mut img);
        let mut back = RegionBitmap::try_new(10, false).unwrap();
        assert_eq!(load_clean_bits(&img, SyncMode::Default, &mut back), LoadOutcome::Loaded { nr_regions: 10 });
        assert_eq!(back, c);
        // Grown device: new regions are dirty (default) or clean (nosync-less default -> dirty).
        let mut grown = RegionBitmap::try_new(40, true).unwrap();
        load_clean_bits(&img, SyncMode::Default, &mut grown);
        assert_eq!(grown.count_ones(), 9);
        // sync / nosync / bad magic: start afresh.
        let mut f = RegionBitmap::try_new(10, true).unwrap();
        assert_eq!(load_clean_bits(&img, SyncMode::Force, &mut f), LoadOutcome::Fresh);
        assert_eq!(f.count_ones(), 0);
        assert_eq!(load_clean_bits(&img, SyncMode::NoSync, &mut f), LoadOutcome::Fresh);
        assert_eq!(f.count_ones(), 10);
        let zero = vec![0u8; 1536];
        assert_eq!(load_clean_bits(&zero, SyncMode::Default, &mut f), LoadOutcome::Fresh);
        assert_eq!(f.count_ones(), 0);
        let mut v3 = img.clone();
        v3[4] = 3;
        assert_eq!(load_clean_bits(&v3, SyncMode::Default, &mut f), LoadOutcome::BadVersion(3));
        assert_eq!(f.count_ones(), 0, "an unreadable log means everything resyncs");
        let mut v1 = img.clone();
        v1[4] = 1;
        assert!(matches!(load_clean_bits(&v1, SyncMode::Default, &mut f), LoadOutcome::Loaded { .. }));
    }
}
