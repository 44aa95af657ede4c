//! The whole server, fed a stream of datagrams cut from the input: never panics, and answers
//! every datagram whose header or cn_msg can be read with exactly one reply.
#![no_main]
use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use ulog_agent::metrics::counters::Counters;
use ulog_agent::region_log::persist::ReplySink;
use ulog_agent::wire::protocol::{decode, Answer, Rejected};
use ulog_agent::server::{LogServer, ServerConfig};

#[derive(Default)]
struct Count(Mutex<usize>);
impl ReplySink for Count {
    fn send_reply(&self, _port: u32, _d: &[u8]) -> bool {
        *self.0.lock().unwrap() += 1;
        true
    }
}

fuzz_target!(|data: &[u8]| {
    let sink = Arc::new(Count::default());
    let cfg = ServerConfig { state_dir: None, accept_peer: Some(9) };
    let mut srv = LogServer::new(cfg, sink.clone(), 1, Arc::new(Counters::default()));
    // Records: u16 length, then that many bytes.
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let d = &rest[2..2 + n];
        rest = &rest[2 + n..];
        // A clustered-disk CTR names a path the log image would be written to at RESUME:
        // never let the fuzzer pick one on this machine.
        if d.windows(14).any(|w| w == b"clustered-disk") {
            continue;
        }
        let answerable = !matches!(decode(d), Err(Rejected { answer: Answer::Drop, .. }));
        let before = *sink.0.lock().unwrap();
        srv.handle_datagram(d, 9, false);
        assert_eq!(*sink.0.lock().unwrap() - before, usize::from(answerable));
    }
});
