//! `RegionBitmap`: one bit per region, packed in `u64` words.
//!
//! Bit `r` lives in word `r / 64`, bit `r % 64`. On a little-endian host the words' memory is
//! byte-for-byte the little-endian bit order of the kernel's disk log (region `r` = byte `r / 8`,
//! bit `r % 8`), so serialising is a copy of `to_le_bytes` words. Bits at and beyond `len` are
//! always zero: every operation that sets many bits re-clears the tail, so counts and the
//! on-disk padding (which the kernel requires to be zero) stay exact.
//!
//! Allocation is fallible (`try_new`) because the region count comes from a constructor string.

use std::collections::TryReserveError;

/// A fixed-length bitmap of regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionBitmap {
    words: Vec<u64>,
    len: u64,
}

impl RegionBitmap {
    /// A bitmap of `len` bits, all set to `value`; fails instead of aborting when memory is short.
    pub fn try_new(len: u64, value: bool) -> Result<Self, TryReserveError> {
        let n = usize::try_from(len.div_ceil(64)).unwrap_or(usize::MAX);
        let mut words = Vec::new();
        words.try_reserve_exact(n)?;
        words.resize(n, if value { u64::MAX } else { 0 });
        let mut b = Self { words, len };
        b.clear_tail();
        Ok(b)
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True if the bitmap has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    /// Bit `r`; callers check `r < len` (regions come range-checked from the request decoder).
    #[inline]
    pub fn get(&self, r: u64) -> bool {
        debug_assert!(r < self.len);
        (self.words[(r / 64) as usize] >> (r % 64)) & 1 == 1
    }

    /// Sets bit `r` to `value`; returns whether it changed.
    #[inline]
    pub fn set(&mut self, r: u64, value: bool) -> bool {
        debug_assert!(r < self.len);
        let w = &mut self.words[(r / 64) as usize];
        let mask = 1u64 << (r % 64);
        let old = *w & mask != 0;
        if value {
            *w |= mask;
        } else {
            *w &= !mask;
        }
        old != value
    }

    /// Sets every bit to `value`.
    pub fn fill(&mut self, value: bool) {
        self.words.fill(if value { u64::MAX } else { 0 });
        self.clear_tail();
    }

    /// The words (bit `r` is bit `r % 64` of word `r / 64`; bits at and beyond `len` are zero).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first clear bit at or after `from`, or `None`.
    pub fn next_zero(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut i = (from / 64) as usize;
        let mut w = !self.words[i] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let r = i as u64 * 64 + u64::from(w.trailing_zeros());
                return (r < self.len).then_some(r);
            }
            i += 1;
            if i >= self.words.len() {
                return None;
            }
            w = !self.words[i];
        }
    }

    /// How many bits from 0 up are set before the first clear one (`len` if all are set).
    pub fn leading_ones(&self) -> u64 {
        self.next_zero(0).unwrap_or(self.len)
    }

    /// Copies bytes `[from, from + out.len())` of the little-endian byte image into `out`.
    /// Bytes past the bitmap's own byte length read as zero.
    pub fn read_le_bytes(&self, from: usize, out: &mut [u8]) {
        let byte_at = |byte: usize| self.words.get(byte / 8).map_or(0, |w| w.to_le_bytes()[byte % 8]);
        // Bytes up to the next word boundary, then whole words (the snapshot of a 4 KiB image
        // block runs under the log's mutex: keep it at memcpy speed), then the tail.
        let head = ((8 - from % 8) % 8).min(out.len());
        for (k, o) in out[..head].iter_mut().enumerate() {
            *o = byte_at(from + k);
        }
        let (words, tail) = out[head..].as_chunks_mut::<8>();
        let first_word = (from + head) / 8;
        for (i, chunk) in words.iter_mut().enumerate() {
            *chunk = self.words.get(first_word + i).map_or([0; 8], |w| w.to_le_bytes());
        }
        let tail_from = from + head + words.len() * 8;
        for (k, o) in tail.iter_mut().enumerate() {
            *o = byte_at(tail_from + k);
        }
    }

    /// Loads the first `len` bits from a little-endian byte image (`bytes` may be shorter:
    /// missing bits read as clear). Bits at and beyond `len` end up clear.
    pub fn load_le_bytes(&mut self, bytes: &[u8]) {
        for (i, w) in self.words.iter_mut().enumerate() {
            let mut buf = [0u8; 8];
            let start = i * 8;
            if start < bytes.len() {
                let end = (start + 8).min(bytes.len());
                buf[..end - start].copy_from_slice(&bytes[start..end]);
            }
            *w = u64::from_le_bytes(buf);
        }
        self.clear_tail();
    }

    /// Sets bits `[from, len)` to `value`.
    pub fn fill_from(&mut self, from: u64, value: bool) {
        let mut r = from;
        while r < self.len && !r.is_multiple_of(64) {
            self.set(r, value);
            r += 1;
        }
        if r >= self.len {
            return;
        }
        // r is now word-aligned: fill whole words from here.
        let first_word = (r / 64) as usize;
        for w in self.words.iter_mut().skip(first_word) {
            *w = if value { u64::MAX } else { 0 };
        }
        self.clear_tail();
    }

    /// Copies all bits of `other` (same length) into `self`.
    pub fn copy_from(&mut self, other: &RegionBitmap) {
        debug_assert_eq!(self.len, other.len);
        self.words.copy_from_slice(&other.words);
    }

    /// Sets every bit that is set in `other` (same length): `self |= other`.
    pub fn or_assign(&mut self, other: &RegionBitmap) {
        debug_assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Clears every bit that is clear in `other` (same length): `self &= other`.
    pub fn and_assign(&mut self, other: &RegionBitmap) {
        debug_assert_eq!(self.len, other.len);
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= b;
        }
    }

    /// `self &= other` over the regions both have; regions beyond `other`'s length are left
    /// alone (the two logs of a table reload may differ in size).
    pub fn and_assign_prefix(&mut self, other: &RegionBitmap) {
        let n = self.len.min(other.len);
        let full = (n / 64) as usize;
        for (a, b) in self.words.iter_mut().zip(&other.words).take(full) {
            *a &= b;
        }
        let rest = n % 64;
        if rest != 0 {
            let keep = !0u64 << rest;
            self.words[full] &= other.words[full] | keep;
        }
    }

    /// Bytes of memory the bits occupy.
    pub fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tail_bits_stay_clear() {
        let b = RegionBitmap::try_new(70, true).unwrap();
        assert_eq!(b.count_ones(), 70);
        assert_eq!(b.leading_ones(), 70);
        let mut bytes = [0xAAu8; 16];
        b.read_le_bytes(0, &mut bytes);
        assert_eq!(&bytes[..8], &[0xFF; 8]);
        assert_eq!(bytes[8], 0b0011_1111);
        assert_eq!(&bytes[9..], &[0u8; 7], "padding reads as zero");
    }

    #[test]
    fn le_byte_order_matches_the_disk_log() {
        // protocol.md §7.9: N=10, region 3 dirty, rest clean -> bitmap f7 03 00 00.
        let mut b = RegionBitmap::try_new(10, true).unwrap();
        assert!(b.set(3, false));
        let mut bytes = [0u8; 4];
        b.read_le_bytes(0, &mut bytes);
        assert_eq!(bytes, [0xf7, 0x03, 0x00, 0x00]);
        let mut back = RegionBitmap::try_new(10, false).unwrap();
        back.load_le_bytes(&[0xf7, 0xff, 0xff, 0xff]);
        assert_eq!(back, b, "bits beyond len are dropped on load");
    }

    #[test]
    fn next_zero_and_fill_from() {
        let mut b = RegionBitmap::try_new(200, false).unwrap();
        b.fill_from(0, true);
        assert_eq!(b.next_zero(0), None);
        b.set(130, false);
        assert_eq!(b.next_zero(0), Some(130));
        assert_eq!(b.next_zero(131), None);
        b.fill_from(190, false);
        assert_eq!(b.next_zero(131), Some(190));
        assert_eq!(b.count_ones(), 200 - 1 - 10);
        assert_eq!(b.next_zero(500), None);
        // from == len (and from a word boundary) must change nothing.
        let mut c = RegionBitmap::try_new(10, true).unwrap();
        c.fill_from(10, false);
        assert_eq!(c.count_ones(), 10);
        let mut d = RegionBitmap::try_new(128, true).unwrap();
        d.fill_from(64, false);
        assert_eq!(d.count_ones(), 64);
    }

    proptest! {
        #[test]
        fn matches_a_bool_vector(len in 0u64..300, ops in proptest::collection::vec((0u64..300, any::<bool>()), 0..64), from in 0u64..320) {
            let mut b = RegionBitmap::try_new(len, false).unwrap();
            let mut v = vec![false; len as usize];
            for (r, val) in ops {
                if r < len {
                    let changed = b.set(r, val);
                    prop_assert_eq!(changed, v[r as usize] != val);
                    v[r as usize] = val;
                }
            }
            prop_assert_eq!(b.count_ones(), v.iter().filter(|x| **x).count() as u64);
            let nz = (from as usize..v.len()).find(|&i| !v[i]).map(|i| i as u64);
            prop_assert_eq!(b.next_zero(from), nz);
            let mut bytes = vec![0u8; (len as usize).div_ceil(8) + 3];
            b.read_le_bytes(0, &mut bytes);
            let mut c = RegionBitmap::try_new(len, true).unwrap();
            c.load_le_bytes(&bytes);
            prop_assert_eq!(&c, &b);
            // Any window of the byte image, against a byte-by-byte model (bytes past the
            // bitmap read as zero).
            let (off, n) = ((from as usize) % 50, (from as usize * 7) % 61);
            let mut window = vec![0xEEu8; n];
            b.read_le_bytes(off, &mut window);
            for (k, byte) in window.iter().enumerate() {
                let model = (0..8).fold(0u8, |acc, bit| {
                    let r = (off + k) * 8 + bit;
                    acc | (u8::from(r < v.len() && v[r]) << bit)
                });
                prop_assert_eq!(*byte, model, "byte {} of window at {}", k, off);
            }
            // fill_from against the vector model.
            let fill = from % 2 == 0;
            c.fill_from(from, fill);
            for (i, bit) in v.iter_mut().enumerate() {
                if i as u64 >= from {
                    *bit = fill;
                }
            }
            for (i, bit) in v.iter().enumerate() {
                prop_assert_eq!(c.get(i as u64), *bit, "bit {} after fill_from({}, {})", i, from, fill);
            }
            prop_assert_eq!(c.count_ones(), v.iter().filter(|x| **x).count() as u64);
        }
    }
}
