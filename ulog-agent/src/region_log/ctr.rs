//! The constructor (CTR) string: `<dev_sectors> <type> <type args...>`.
//!
//! The kernel strips the uuid and `integrated_flush` from the table's log arguments and sends
//! the target length in sectors followed by the remaining arguments joined by single spaces
//! (protocol.md §3). Two forms are accepted:
//!
//! ```text
//! <dev_sectors> clustered-core <region_size> [sync|nosync] [block_on_error]
//! <dev_sectors> clustered-disk <log_dev> <region_size> [sync|nosync] [block_on_error]
//! ```
//!
//! Unlike cmirrord, the type is decided by its name (not by whether the next token is a
//! number), numbers are plain decimal, unknown keywords are errors rather than silently ignored,
//! and the region size must be a power of two between 2 and the device size, as the kernel's own
//! logs require (dm-region-hash computes the region of a sector with a shift).
//!
//! On the wire the string is not NUL-terminated on the first CTR (data_size = strlen) but is on
//! the CTR the kernel sends from its reconnect loop after losing the server (data_size =
//! strlen + 1, and a reply buffer of 0 bytes). [`ParsedCtr::reconnect`] tells them apart.

use thiserror::Error;

/// Largest region count accepted: the kernel's userspace log and cmirrord keep it in 32 bits.
pub const MAX_REGION_COUNT: u64 = u32::MAX as u64;

/// Largest region size accepted, in sectors. `userspace_ctr` keeps GET_REGION_SIZE's u64 answer
/// as `(uint32_t)rdata` and then divides the target length by it: 2^32 would become 0 and
/// divide by zero in the kernel (any larger power of two too). 2^31 is the largest power of two
/// that survives the cast.
pub const MAX_REGION_SIZE: u64 = u32::MAX as u64;

/// Which log type the table asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// `clustered-core`: state in memory (optionally mirrored to `--state-dir`).
    Core,
    /// `clustered-disk`: state on a log device in the kernel's disk-log format.
    Disk {
        /// The device argument exactly as the table gave it (path or `major:minor`).
        device: String,
    },
}

/// The table's `sync` / `nosync` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Neither keyword: use what the log remembers.
    Default,
    /// `sync`: resynchronise everything.
    Force,
    /// `nosync`: treat every region as in sync.
    NoSync,
}

/// A parsed constructor string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtrArgs {
    /// Target length in 512-byte sectors.
    pub dev_sectors: u64,
    /// Core or disk.
    pub kind: LogKind,
    /// Region size in sectors (a power of two >= 2).
    pub region_size: u64,
    /// sync / nosync.
    pub sync: SyncMode,
    /// `block_on_error` given (only echoed in STATUS_TABLE; modern tables use `handle_errors`).
    pub block_on_error: bool,
}

impl CtrArgs {
    /// Regions the log tracks: `ceil(dev_sectors / region_size)`.
    pub fn region_count(&self) -> u64 {
        self.dev_sectors.div_ceil(self.region_size)
    }

    /// The type name as the table spells it.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            LogKind::Core => "clustered-core",
            LogKind::Disk { .. } => "clustered-disk",
        }
    }
}

/// A constructor payload, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCtr {
    /// The arguments.
    pub args: CtrArgs,
    /// The string itself (without NUL), to recognise a repeated CTR.
    pub text: String,
    /// The payload was NUL-terminated: the kernel's reconnect loop, which accepts no reply payload.
    pub reconnect: bool,
}

/// Why a constructor string was refused. Every variant maps to `-EINVAL`.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CtrError {
    /// No payload at all.
    #[error("empty constructor string")]
    Empty,
    /// A NUL before the end of the payload.
    #[error("constructor string has a NUL byte inside it")]
    EmbeddedNul,
    /// Not UTF-8.
    #[error("constructor string is not valid UTF-8")]
    NotUtf8,
    /// Two spaces in a row, or a leading/trailing space.
    #[error("constructor string has an empty argument (double or edge space)")]
    EmptyToken,
    /// Too few arguments for the type.
    #[error("constructor string has too few arguments: {0:?}")]
    TooFewArgs(String),
    /// Type other than clustered-core / clustered-disk.
    #[error("unsupported log type {0:?} (expected clustered-core or clustered-disk)")]
    UnknownType(String),
    /// A number that isn't a plain non-zero decimal.
    #[error("{what} {value:?} is not a positive decimal number")]
    BadNumber {
        /// Which argument.
        what: &'static str,
        /// What was given.
        value: String,
    },
    /// Region size not a power of two in [2, dev_sectors].
    #[error("region size {region_size} must be a power of two between 2 and the device size ({dev_sectors} sectors)")]
    BadRegionSize {
        /// Given region size.
        region_size: u64,
        /// Device size.
        dev_sectors: u64,
    },
    /// A region size the kernel would truncate to 32 bits (to 0, for a power of two).
    #[error("region size {0} sectors does not fit the kernel's 32-bit region size (at most 2^31 sectors)")]
    RegionSizeTooLarge(u64),
    /// More regions than the protocol can address.
    #[error("{0} regions is more than the {MAX_REGION_COUNT} a log can track")]
    TooManyRegions(u64),
    /// A keyword that isn't sync / nosync / block_on_error, or one given twice.
    #[error("unknown or repeated log argument {0:?}")]
    UnknownArg(String),
    /// Both sync and nosync.
    #[error("both sync and nosync given")]
    SyncConflict,
    /// Empty device argument or one too long for the CTR reply.
    #[error("log device argument {0:?} is empty or longer than 127 bytes")]
    BadDevice(String),
}

impl CtrError {
    /// The errno the kernel gets back.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

fn number(what: &'static str, s: &str) -> Result<u64, CtrError> {
    let bad = || CtrError::BadNumber { what, value: s.to_string() };
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    match s.parse::<u64>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(n) => Ok(n),
    }
}

/// Parses a CTR payload (exactly `data_size` bytes, possibly NUL-terminated).
pub fn parse(payload: &[u8]) -> Result<ParsedCtr, CtrError> {
    let (body, reconnect) = match payload.iter().position(|&c| c == 0) {
        None => (payload, false),
        Some(i) if i + 1 == payload.len() => (&payload[..i], true),
        Some(_) => return Err(CtrError::EmbeddedNul),
    };
    if body.is_empty() {
        return Err(CtrError::Empty);
    }
    let text = std::str::from_utf8(body).map_err(|_| CtrError::NotUtf8)?;
    let tokens: Vec<&str> = text.split(' ').collect();
    if tokens.iter().any(|t| t.is_empty()) {
        return Err(CtrError::EmptyToken);
    }
    if tokens.len() < 3 {
        return Err(CtrError::TooFewArgs(text.to_string()));
    }
    let dev_sectors = number("device size", tokens[0])?;
    let (kind, size_tok, rest) = match tokens[1] {
        "clustered-core" => (LogKind::Core, tokens[2], &tokens[3..]),
        "clustered-disk" => {
            if tokens.len() < 4 {
                return Err(CtrError::TooFewArgs(text.to_string()));
            }
            let device = tokens[2];
            if device.len() >= crate::wire::protocol::DM_NAME_LEN_MAX {
                return Err(CtrError::BadDevice(device.to_string()));
            }
            (LogKind::Disk { device: device.to_string() }, tokens[3], &tokens[4..])
        }
        other => return Err(CtrError::UnknownType(other.to_string())),
    };
    let region_size = number("region size", size_tok)?;
    if region_size < 2 || !region_size.is_power_of_two() || region_size > dev_sectors {
        return Err(CtrError::BadRegionSize { region_size, dev_sectors });
    }
    if region_size > MAX_REGION_SIZE {
        return Err(CtrError::RegionSizeTooLarge(region_size));
    }
    let mut sync = SyncMode::Default;
    let mut block_on_error = false;
    for &t in rest {
        match t {
            "sync" | "nosync" if sync != SyncMode::Default => {
                return Err(if (t == "sync") == (sync == SyncMode::Force) {
                    CtrError::UnknownArg(t.to_string())
                } else {
                    CtrError::SyncConflict
                });
            }
            "sync" => sync = SyncMode::Force,
            "nosync" => sync = SyncMode::NoSync,
            "block_on_error" if !block_on_error => block_on_error = true,
            other => return Err(CtrError::UnknownArg(other.to_string())),
        }
    }
    let args = CtrArgs { dev_sectors, kind, region_size, sync, block_on_error };
    let count = args.region_count();
    if count > MAX_REGION_COUNT {
        return Err(CtrError::TooManyRegions(count));
    }
    Ok(ParsedCtr { args, text: text.to_string(), reconnect })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lvm_core_and_disk_forms() {
        let p = parse(b"2097152 clustered-core 1024").unwrap();
        assert_eq!(p.args.kind, LogKind::Core);
        assert_eq!(p.args.region_size, 1024);
        assert_eq!(p.args.region_count(), 2048);
        assert!(!p.reconnect);
        let p = parse(b"2097152 clustered-disk /dev/loop2 1024 nosync block_on_error\0").unwrap();
        assert_eq!(p.args.kind, LogKind::Disk { device: "/dev/loop2".into() });
        assert_eq!(p.args.sync, SyncMode::NoSync);
        assert!(p.args.block_on_error);
        assert!(p.reconnect, "NUL-terminated payload is the reconnect form");
        assert_eq!(p.text, "2097152 clustered-disk /dev/loop2 1024 nosync block_on_error");
        assert_eq!(parse(b"1001 clustered-core 2 sync").unwrap().args.region_count(), 501);
        assert_eq!(parse(b"32768 clustered-disk 7:2 1024").unwrap().args.sync, SyncMode::Default);
    }

    #[test]
    fn refusals() {
        use CtrError::*;
        type Case<'a> = (&'a [u8], fn(&CtrError) -> bool);
        let cases: &[Case] = &[
            (b"", |e| *e == Empty),
            (b"\0", |e| *e == Empty),
            (b"100 clustered-core\0 2", |e| *e == EmbeddedNul),
            (b"100 clustered-core", |e| matches!(e, TooFewArgs(_))),
            (b"100 clustered-disk /dev/x", |e| matches!(e, TooFewArgs(_))),
            (b"100  clustered-core 2", |e| *e == EmptyToken),
            (b"100 clustered-core 2 ", |e| *e == EmptyToken),
            (b"100 core 2", |e| matches!(e, UnknownType(_))),
            (b"0x100 clustered-core 2", |e| matches!(e, BadNumber { .. })),
            (b"0 clustered-core 2", |e| matches!(e, BadNumber { .. })),
            (b"100 clustered-core 0", |e| matches!(e, BadNumber { .. })),
            (b"100 clustered-core 3", |e| matches!(e, BadRegionSize { .. })),
            (b"100 clustered-core 1", |e| matches!(e, BadRegionSize { .. })),
            (b"100 clustered-core 128", |e| matches!(e, BadRegionSize { .. })),
            (b"100 clustered-core 2 fast", |e| matches!(e, UnknownArg(_))),
            (b"100 clustered-core 2 sync nosync", |e| *e == SyncConflict),
            (b"100 clustered-core 2 sync sync", |e| matches!(e, UnknownArg(_))),
            (b"99999999999999 clustered-core 2", |e| matches!(e, TooManyRegions(_))),
            // The kernel's (uint32_t) cast would make these 0 and divide by zero.
            (b"8589934592 clustered-core 4294967296", |e| matches!(e, RegionSizeTooLarge(4294967296))),
            (b"18446744073709551615 clustered-core 9223372036854775808", |e| matches!(e, RegionSizeTooLarge(_))),
            (b"100 clustered-core 99999999999999999999999", |e| matches!(e, BadNumber { .. })),
            (b"100 clustered-core \xff", |e| *e == NotUtf8),
        ];
        for (input, ok) in cases {
            let e = parse(input).expect_err(&String::from_utf8_lossy(input));
            assert!(ok(&e), "{:?}: unexpected {e:?}", String::from_utf8_lossy(input));
            assert_eq!(e.errno(), libc::EINVAL);
        }
        assert_eq!(parse(b"4294967296 clustered-core 2147483648").unwrap().args.region_count(), 2);
        let long = format!("100 clustered-disk /{} 2", "d".repeat(127));
        assert!(matches!(parse(long.as_bytes()), Err(BadDevice(_))));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn accepts_every_valid_table(sectors in 2u64..1u64 << 40, shift in 1u32..24, kw in 0usize..6) {
            let rs = 1u64 << shift;
            prop_assume!(rs <= sectors && sectors.div_ceil(rs) <= MAX_REGION_COUNT);
            let extra = ["", " sync", " nosync", " block_on_error", " nosync block_on_error", " block_on_error sync"][kw];
            let s = format!("{sectors} clustered-core {rs}{extra}");
            let p = parse(s.as_bytes()).unwrap();
            prop_assert_eq!(p.args.region_count(), sectors.div_ceil(rs));
            prop_assert_eq!(&p.text, &s);
        }
    }
}
