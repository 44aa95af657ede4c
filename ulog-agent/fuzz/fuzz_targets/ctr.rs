//! The constructor-string parser: never panics; what it accepts is a table the kernel could send.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ulog_agent::region_log::ctr::{parse, MAX_REGION_COUNT};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = parse(data) {
        let a = &p.args;
        assert!(a.region_size.is_power_of_two() && a.region_size >= 2 && a.region_size <= a.dev_sectors);
        assert!(a.region_count() <= MAX_REGION_COUNT);
        assert!(!p.text.is_empty() && !p.text.contains('\0'));
    }
});
