//! Cluster logs: one coherent dirty log for a mirror that several nodes activate on shared
//! storage (`clustered-core` / `clustered-disk` with cluster mode on).
//!
//! # Design
//!
//! Every node's kernel talks only to its own agent. The agents of one log agree on one totally
//! ordered history of *events* (corosync CPG, AGREED order) and apply it to a deterministic
//! state machine, [`state::ReplicatedLog`]: same history, same state, same answers on every
//! member. The state machine is pure (no I/O, no clock, no corosync), so it is tested here by
//! a deterministic simulation against a reference model of the guarantees (`state::tests`),
//! with no root and no cluster.
//!
//! What the state machine guarantees, whatever order the events come in:
//! - **No region is clean while any node may still be writing it.** Marks are owned per node
//!   ([`state::ReplicatedLog::is_clean`] is "no owner and in sync").
//! - **A departed node's marks are held, never dropped**, unless it left cleanly (a `Leave`: its
//!   kernel suspended the mirror, so its writes completed). They are *adopted* when an agent of
//!   the same kernel incarnation (boot id) joins again (the agent died, the kernel lives on), and
//!   *reclaimed* when the node is known dead: a fencing confirmation for that incarnation, or
//!   the node coming back with a new boot id (a reboot is proof the old kernel is gone).
//!   Reclaimed regions may differ between the legs (a write may have been torn), so they become
//!   out of sync and are handed out for resync before any other region.
//! - **Resync is coordinated:** one recovery slot per node (dm-raid1 recovers one region at a
//!   time per node), no region in two slots, and no region owned by a writer (live or held) is
//!   handed out. A held node's slot stays taken until it is adopted or reclaimed.
//!
//! # Layers
//!
//! [`state`] (the replicated state) and [`wire`] (the frames) know nothing of corosync;
//! [`stability`] says when a frame is held by a second member; [`engine`] runs every cluster
//! log of the agent against the [`bus`] interface only, so its tests drive it over a
//! deterministic in-memory bus; `corosync` (feature `cluster`) is the one thread that owns the
//! corosync handles; [`test_cluster`] starts real corosyncs in network namespaces for tests.
//! Nothing here imports the telemetry. ARCHITECTURE.md ("Cluster logs") lists the guarantees
//! and where each is enforced.

pub mod bus;
#[cfg(feature = "cluster")]
pub mod corosync;
pub mod engine;
pub mod stability;
pub mod state;
pub mod test_cluster;
pub mod wire;

/// Why a mirror's recovery could not be restarted.
#[derive(thiserror::Error, Debug)]
pub enum RestartError {
    /// The device-mapper control node could not be opened or listed.
    #[error("device-mapper control: {0}")]
    Control(#[source] std::io::Error),
    /// No live mirror table on this node uses the log.
    #[error("no mirror on this node uses log {0}")]
    NoMirror(String),
    /// The mirror is suspended already, or has a table loaded and not yet resumed (a reload in
    /// progress): someone else is changing it, and a resume here would interfere.
    #[error("mirror {0} is suspended or being reloaded by someone else: not touched")]
    Busy(String),
    /// The suspend failed (the mirror was left running).
    #[error("suspend of {device}: {source}")]
    Suspend {
        /// The dm device name.
        device: String,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
    /// The resume failed, also when retried: the mirror is left suspended (its I/O waits until
    /// an operator resumes it).
    #[error("resume of {device} failed, the mirror is left suspended (`dmsetup resume {device}`): {source}")]
    Resume {
        /// The dm device name.
        device: String,
        /// The ioctl's error.
        #[source]
        source: std::io::Error,
    },
}

/// Suspends and resumes every mirror on this node whose userspace log is `uuid`; returns their
/// names. The kernel's RESUME resets the log's in-sync hint, so it asks for resync work again
/// (see `engine::RESTART_RECOVERY_AFTER_TICKS`). Blocks while the suspend completes the
/// mirror's in-flight I/O and while this agent answers the suspend's and resume's requests:
/// never call it on the receive thread or the engine's.
pub fn restart_mirror_recovery(
    control: &std::path::Path,
    markers: &std::path::Path,
    uuid: &str,
) -> Result<Vec<String>, RestartError> {
    let dm = crate::region_log::dm::Control::open(control).map_err(RestartError::Control)?;
    let mut mirrors = Vec::new();
    for (name, dev) in dm.list_devices().map_err(RestartError::Control)? {
        let Ok(Some(targets)) = dm.table(dev, crate::region_log::dm::Table::Live) else { continue };
        if targets.iter().any(|(t, p)| t == "mirror" && crate::region_log::dm::userspace_log_uuid(p) == Some(uuid)) {
            mirrors.push((name, dev));
        }
    }
    if mirrors.is_empty() {
        return Err(RestartError::NoMirror(uuid.to_string()));
    }
    for (name, dev) in &mirrors {
        let busy = |dm: &crate::region_log::dm::Control| {
            dm.state(*dev).map(|(suspended, inactive)| suspended || inactive).unwrap_or(true)
        };
        if busy(&dm) {
            return Err(RestartError::Busy(name.clone()));
        }
        // An agent that dies between the suspend and the resume would leave the mirror's I/O
        // waiting for good: the marker tells the next agent to resume it (see
        // `resume_left_suspended`). Without a marker, no suspend.
        let marker = markers.join(format!("{dev:x}"));
        std::fs::create_dir_all(markers)
            .and_then(|()| std::fs::write(&marker, name.as_bytes()))
            .map_err(|source| RestartError::Suspend { device: name.clone(), source })?;
        if let Err(source) = dm.suspend(*dev, true) {
            let _ = std::fs::remove_file(&marker);
            return Err(RestartError::Suspend { device: name.clone(), source });
        }
        if dm.state(*dev).is_ok_and(|(_, inactive)| inactive) {
            let _ = std::fs::remove_file(&marker);
            // A reload was loaded while this suspend ran: resuming now would activate it.
            // Leave the device as its reloader expects it: suspended, for its resume.
            return Err(RestartError::Busy(name.clone()));
        }
        let mut resumed = dm.suspend(*dev, false);
        for _ in 0..3 {
            if resumed.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            resumed = dm.suspend(*dev, false);
        }
        resumed.map_err(|source| RestartError::Resume { device: name.clone(), source })?;
        let _ = std::fs::remove_file(&marker);
    }
    Ok(mirrors.into_iter().map(|(n, _)| n).collect())
}

/// Where recovery restarts leave their markers (one file per device being restarted).
pub const RESTART_MARKERS: &str = "/run/ulog/recovery-restart";

/// At start: resumes the mirrors a previous agent suspended for a recovery restart and died
/// before resuming (their markers are left); returns the names resumed. A device that is no
/// longer suspended, or now has an inactive table (someone else's reload: their resume is
/// theirs to do), or is gone, is left alone and its marker removed. Call it off the receive
/// thread: the resume sends this agent a RESUME (after the kernel's reconnect).
pub fn resume_left_suspended(control: &std::path::Path, markers: &std::path::Path) -> Vec<String> {
    let devices = left_suspended(markers);
    if devices.is_empty() {
        return Vec::new();
    }
    let Ok(dm) = crate::region_log::dm::Control::open(control) else { return Vec::new() };
    let mut resumed = Vec::new();
    for (dev, name, marker) in devices {
        if let Ok((true, false)) = dm.state(dev) {
            match dm.suspend(dev, false) {
                Ok(()) => resumed.push(name),
                Err(e) => {
                    tracing::error!(device = %name, error = %e, "cannot resume a mirror a previous agent left suspended (dmsetup resume it)");
                    continue;
                }
            }
        }
        let _ = std::fs::remove_file(marker);
    }
    resumed
}

/// The markers under `markers`: (device number, device name, marker path).
fn left_suspended(markers: &std::path::Path) -> Vec<(u64, String, std::path::PathBuf)> {
    let Ok(dir) = std::fs::read_dir(markers) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let dev = u64::from_str_radix(e.file_name().to_str()?, 16).ok()?;
            let name = std::fs::read_to_string(e.path()).unwrap_or_default();
            Some((dev, name, e.path()))
        })
        .collect()
}

#[cfg(test)]
mod restart_tests {
    /// The markers a recovery restart leaves are found again by device number (the agent's
    /// start resumes those devices if they are still suspended).
    #[test]
    fn markers_name_the_devices_left_suspended() {
        let dir = std::env::temp_dir().join(format!("ulog-markers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{:x}", 0xfd00_0003u64)), "pair").unwrap();
        std::fs::write(dir.join("not-a-device"), "x").unwrap();
        let found = super::left_suspended(&dir);
        assert_eq!(found.iter().map(|(d, n, _)| (*d, n.as_str())).collect::<Vec<_>>(), vec![(0xfd00_0003, "pair")]);
        // No device-mapper here: nothing is resumed, and the markers stay for an agent that can.
        assert!(super::resume_left_suspended(std::path::Path::new("/nonexistent/control"), &dir).is_empty());
        assert!(dir.join(format!("{:x}", 0xfd00_0003u64)).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// This kernel's incarnation: its boot id (`/proc/sys/kernel/random/boot_id`) as 128 bits. An
/// agent restarted under the same kernel has the same one, a rebooted node a new one.
pub fn boot_id() -> std::io::Result<state::Incarnation> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    parse_boot_id(&text)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("boot id {text:?}")))
}

fn parse_boot_id(text: &str) -> Option<state::Incarnation> {
    let hex: String = text.trim().chars().filter(|&c| c != '-').collect();
    (hex.len() == 32).then(|| u128::from_str_radix(&hex, 16).ok()).flatten()
}

#[cfg(test)]
mod boot_id_tests {
    #[test]
    fn boot_ids_parse_as_128_bits() {
        assert_eq!(
            super::parse_boot_id("0d0c1b2a-3f4e-5a6b-7c8d-9e0fa1b2c3d4\n"),
            Some(0x0d0c1b2a3f4e5a6b7c8d9e0fa1b2c3d4)
        );
        assert_eq!(super::parse_boot_id("not-a-boot-id"), None);
        assert!(super::boot_id().is_ok(), "this kernel has a boot id");
    }
}
