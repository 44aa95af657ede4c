//! ulog: a userspace server for the device-mapper "userspace" dirty log.
pub mod telemetry;
