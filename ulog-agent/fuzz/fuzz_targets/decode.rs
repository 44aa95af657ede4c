//! The datagram decoder: never panics; what it accepts is self-consistent.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ulog_agent::wire::protocol::{decode, Answer, Rejected, ReplyBuf};

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(req) => {
            assert_eq!(req.payload.len(), req.header.data_size as usize);
            assert!(req.header.uuid_bytes().is_some());
        }
        Err(Rejected { answer: Answer::Full { header, cn_seq }, .. }) => {
            let r = ReplyBuf::full(&header, cn_seq, -22, &[], 0);
            assert_eq!(r.as_bytes().len(), 196);
        }
        Err(_) => {}
    }
});
