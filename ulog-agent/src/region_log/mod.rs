//! The log engine: one dirty region log's state, its disk image and its durability.
//!
//! [`dirty_log`] holds a log's state and the semantics of every request over it (over
//! [`bitmap`], sized by [`ctr`]); [`disk_format`] is the kernel's on-disk layout, [`store`] the
//! log device or state file, [`legs`] the mirror legs whose caches are flushed before clean
//! bits are written (found through [`dm`]); [`persist`] is the per-log I/O thread that makes
//! changes durable and sends the replies that wait for them.

pub mod bitmap;
pub mod ctr;
pub mod dirty_log;
pub mod disk_format;
pub mod dm;
pub mod legs;
pub mod persist;
pub mod store;
