//! The scenario table, how scenarios are grouped into VM sessions, and how a session runs.
//!
//! A scenario is `xtask/vm-scenarios/<name>.sh`, run by the guest's /init with `SCENARIO`,
//! `BOOT` (1-based) and `BOOTS` in its environment. A scenario with `boots > 1` is booted that
//! many times on the same disk images (fresh sparse files under `<target>/vm/disks/`, attached as
//! /dev/vda, /dev/vdb, ...). Each boot must print its own result line; the sequence stops at the
//! first failing boot. A boot ends with `poweroff -f` after /init ran everything, or earlier with
//! the `hard_reset` helper of lib.sh (sysrq b: no sync, no unmount, a power cut for the guest).
//!
//! Two-guest scenarios (`guests: 2`, the cluster pair) run after every session, each on its own
//! pair of machines (see [`super::cluster`]).
//!
//! Grouping: scenarios with one boot and no disks share one VM (one boot of ~2.5 s instead of
//! one each) unless `--isolate`; every other scenario gets its own session. /init runs each
//! scenario in its own session/process group, kills that group afterwards, and removes leftover
//! dm devices and loop devices, so one scenario's debris does not fail the next (if it cannot,
//! it prints `ULOG-TAINTED`). Limits: a process stuck in D state (e.g. dmsetup waiting on a log
//! server that never answers) cannot be killed; such a scenario must time out and later ones in
//! the same VM may fail with it: rerun them with `--isolate`.
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;

use super::qemu::{self, Machine};

pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// Boots sharing the same disk images (BOOT=1..boots in the guest).
    pub boots: u32,
    /// Guests booted at once (1, or 2 for the cluster pair run by [`super::cluster`], which has
    /// its own disks, network and initramfs; `boots` and `disks_mib` are then unused).
    pub guests: u32,
    /// Sizes (MiB) of the raw virtio disks, /dev/vda first; created sparse and empty per run.
    pub disks_mib: &'static [u64],
    /// Guest-side watchdog per boot, seconds (the host adds a margin on top).
    pub timeout_s: u32,
    /// Part of the suite (`vm test`, and `vm run` without names). The harness self-tests are not.
    pub suite: bool,
}

/// Every scenario, in suite order.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "kernel-baseline",
        about: "mirror with the kernel's own core log, then its disk log: resync, pattern, legs equal",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "no-server",
        about: "a userspace-log mirror without a server fails quickly (\"Userspace log server not found\")",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 30,
        suite: true,
    },
    Scenario {
        name: "ulog-smoke",
        about: "ulog-agent -f: clustered-core mirror, N/N, status '1 clustered-core', pattern, legs equal",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "kernel-disk-reboot",
        about: "kernel disk log on virtio disks: write, hard reset while live, reboot, data and legs intact",
        boots: 2,
        guests: 1,
        disks_mib: &[16, 16, 4],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "ulog-core",
        about: "clustered-core: resync to N/N, status/table text, legs equal, one SET_REGION_SYNC per region; nosync N/N at once",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "ulog-resync-writes",
        about: "writes above the resync point during the initial resync (held at region 0): they complete, one IS_REMOTE_RECOVERING answered {0, N-1}, no more asked below the last region",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "ulog-traffic",
        about: "writes and reads through a clustered-core mirror: legs equal; MARK/CLEAR/FLUSH/IN_SYNC served, no errors, served == kernel_sent",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "ulog-metrics",
        about: "a /metrics scrape after writes matches the kernel: mirror devices found, exact mirror write counts, regions, answers == kernel_sent per type",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "ulog-probe-startup",
        about: "once the agent listens (frozen there), its eBPF probe must be attached; else a CTR is served but not counted",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 45,
        suite: true,
    },
    Scenario {
        name: "ulog-kernel-latency",
        about: "eBPF latency probes: attach when dm_log_userspace loads after the agent; kernel == agent == correlated counts per type; kernel total >= agent service time per request; detach/reattach across rmmod/modprobe",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "ulog-kernel-retry",
        about: "a request frozen past the kernel's 15 s timeout: one timeout resend counted by type, listed with 2 attempts (kernel total >= 15 s), reported by the programs' aya-log (--probe-log)",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 60,
        suite: true,
    },
    Scenario {
        name: "ulog-slo-stall",
        about: "the agent stopped 2 s under MARK_REGION load: the kernel-side latency SLI of ulog-slo.yml (evaluated by hand) drops below the objective and the fast-burn condition holds, though the agent answered every request it received fast",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "ulog-reload",
        about: "suspend/resume and a same-uuid table reload under writes, then integrated_flush: data intact, legs equal",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "ulog-suspend-flush",
        about: "15 suspend/resume cycles under writes: no request may fail (kmirrord may FLUSH after the log's POSTSUSPEND)",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "ulog-leg-failure",
        about: "a leg turns into `error`: writes succeed, health AD, exactly the written regions out of sync; repair resyncs them",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "ulog-leg-flush",
        about: "clean bits reach the log device only after the legs completed a flush; a failing leg flush (dm-flakey leg of an inactive table naming the log) leaves every region dirty, clears ignored",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 90,
        suite: true,
    },
    Scenario {
        name: "ulog-multi",
        about: "four mirrors (2 core, 2 disk) on one agent, parallel writes: all N/N, legs equal, no cross-talk",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "ulog-agent-kill",
        about: "SIGKILL the agent 10 times during writes (9 between requests, 1 mid-request), restart after 0.3 s: reconnect, no I/O error, legs equal",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 240,
        suite: true,
    },
    Scenario {
        name: "ulog-shutdown",
        about: "SIGTERM with a live nosync mirror: the agent keeps serving (a 4 KiB write completes), exits 0 once the mirror is gone; restart-style exit + new agent: writes go on; hardening (mlock, IO_FLUSHER on every thread, OOM score); state dir on the mirror refused",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "ulog-disk-restart",
        about: "clustered-disk on virtio disks: agent crash and hard reset resync exactly the dirty regions; the kernel disk log reads ulog's log",
        boots: 3,
        guests: 1,
        disks_mib: &[16, 16, 4],
        timeout_s: 120,
        suite: true,
    },
    Scenario {
        name: "cluster-pair",
        about: "two guests, corosync over a qemu dgram link, shared legs: both serve one clustered-core mirror (--cluster), concurrent writes to shared and own regions: N/N, legs equal; one guest killed mid-write: the survivor confirms it fenced, resyncs its regions, legs equal",
        boots: 1,
        guests: 2,
        disks_mib: &[],
        timeout_s: 300,
        suite: true,
    },
    Scenario {
        name: "selftest-fail",
        about: "harness self-test: a failing assertion must fail the run and keep the log",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 30,
        suite: false,
    },
    Scenario {
        name: "selftest-hang",
        about: "harness self-test: a hanging scenario must be killed by the guest watchdog",
        boots: 1,
        guests: 1,
        disks_mib: &[],
        timeout_s: 8,
        suite: false,
    },
];

/// Scenarios the suite (`cargo xtask vm test`) expects to fail for now, with the reason. A failure
/// of one of these is reported as XFAIL and does not fail the suite; a pass is reported as XPASS
/// (remove the entry then). `vm run` ignores this list: it reports what happened.
/// Example entry: `("ulog-smoke", "ulog-agent is being written")` (passes since the server core landed).
pub const EXPECTED_TO_FAIL: &[(&str, &str)] = &[];

pub fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.name == name)
}

pub fn expected_failure(name: &str) -> Option<&'static str> {
    EXPECTED_TO_FAIL.iter().find(|(n, _)| *n == name).map(|(_, why)| *why)
}

/// Scenarios booted together (and disks shared by all their boots).
pub struct Session {
    pub label: String,
    pub scenarios: Vec<&'static Scenario>,
    pub boots: u32,
    pub disks_mib: Vec<u64>,
}

pub fn plan(chosen: &[&'static Scenario], isolate: bool) -> Vec<Session> {
    let mut shared: Vec<&'static Scenario> = Vec::new();
    let mut out = Vec::new();
    for s in chosen.iter().filter(|s| s.guests == 1) {
        if !isolate && s.boots == 1 && s.disks_mib.is_empty() {
            shared.push(s);
        } else {
            out.push(Session {
                label: s.name.into(),
                scenarios: vec![s],
                boots: s.boots,
                disks_mib: s.disks_mib.to_vec(),
            });
        }
    }
    if !shared.is_empty() {
        let label = if shared.len() == 1 { shared[0].name.to_string() } else { "shared".to_string() };
        out.insert(0, Session { label, scenarios: shared, boots: 1, disks_mib: vec![] });
    }
    out
}

/// What happened to one scenario.
pub struct Verdict {
    pub name: &'static str,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub reason: String,
    /// Guest time per boot (START to RESULT), seconds.
    pub secs: Vec<f64>,
    /// Kept console logs (only when something failed, or with --keep-logs).
    pub logs: Vec<PathBuf>,
    /// Failed in a way its EXPECTED_TO_FAIL entry does not cover (the cluster pair: any
    /// assertion but its known failing one): reported as FAIL even when listed.
    pub unexpected: bool,
}

pub struct SessionOpts<'a> {
    pub machine: &'a Machine,
    pub workdir: &'a Path,
    pub echo: bool,
    pub keep_logs: bool,
    /// Per-boot host timeout override.
    pub timeout: Option<Duration>,
    pub stamp: &'a str,
}

/// Boot a session (all its boots); one verdict per scenario.
pub fn run_session(sess: &Session, o: &SessionOpts) -> Result<Vec<Verdict>> {
    let logs_dir = o.workdir.join("logs");
    fs::create_dir_all(&logs_dir)?;
    let disk_dir = o.workdir.join("disks").join(&sess.label);
    let _ = fs::remove_dir_all(&disk_dir);
    let mut disks = Vec::new();
    if !sess.disks_mib.is_empty() {
        fs::create_dir_all(&disk_dir)?;
        for (i, mib) in sess.disks_mib.iter().enumerate() {
            let p = disk_dir.join(format!("disk{i}.img"));
            let f = fs::File::create(&p)?;
            f.set_len(mib << 20)?; // sparse
            disks.push(p);
        }
    }
    let spec: Vec<String> = sess.scenarios.iter().map(|s| format!("{}:{}", s.name, s.timeout_s)).collect();
    let guest_budget: u64 = sess.scenarios.iter().map(|s| s.timeout_s as u64 + 15).sum();
    let timeout = o.timeout.unwrap_or(Duration::from_secs(60 + guest_budget));

    let mut verdicts: Vec<Verdict> = sess
        .scenarios
        .iter()
        .map(|s| Verdict {
            name: s.name,
            passed: true,
            reason: String::new(),
            secs: vec![],
            logs: vec![],
            unexpected: false,
        })
        .collect();
    let mut logs = Vec::new();
    let mut failed = false;
    for boot in 1..=sess.boots {
        let log = logs_dir.join(format!("{}-{}-boot{boot}.log", o.stamp, sess.label));
        logs.push(log.clone());
        let cmdline = format!(
            "ulog.scenarios={} ulog.boot={boot} ulog.boots={} ulog.disks={}",
            spec.join(","),
            sess.boots,
            disks.len()
        );
        eprintln!(
            "vm: session {} boot {boot}/{}: {}",
            sess.label,
            sess.boots,
            sess.scenarios.iter().map(|s| s.name).collect::<Vec<_>>().join(" ")
        );
        let out =
            qemu::boot(&qemu::Boot { machine: o.machine, cmdline, disks: &disks, timeout, log: &log, echo: o.echo })?;
        let boot_note = format!(
            "boot {boot}: /init after {}, qemu ran {:.1} s",
            out.init_secs.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into()),
            out.secs
        );
        eprintln!("vm: {boot_note}");
        for v in verdicts.iter_mut() {
            if !v.passed {
                continue;
            }
            match out.results.iter().find(|r| r.name == v.name) {
                Some(r) => {
                    v.secs.push(r.secs);
                    if r.exit != 0 {
                        v.passed = false;
                        v.reason = if r.timed_out {
                            format!("boot {boot}: timed out in the guest (killed after its watchdog)")
                        } else {
                            format!("boot {boot}: exit status {}", r.exit)
                        };
                    }
                }
                None => {
                    v.passed = false;
                    v.reason = if out.timed_out {
                        format!("boot {boot}: no result: host timeout after {:.0} s", timeout.as_secs_f64())
                    } else if out.init_secs.is_none() {
                        format!("boot {boot}: no result: the guest never reached /init")
                    } else {
                        format!("boot {boot}: no result: the guest stopped early (qemu {:?})", out.status)
                    };
                }
            }
        }
        if verdicts.iter().any(|v| !v.passed) {
            failed = true;
            break;
        }
        if boot < sess.boots && !out.reset && !out.done {
            // Every scenario reported success but the boot did not end cleanly: go on anyway.
            eprintln!("vm: warning: boot {boot} ended without ULOG-DONE/ULOG-RESET");
        }
    }
    let keep = failed || o.keep_logs;
    if keep {
        for v in verdicts.iter_mut() {
            if !v.passed || o.keep_logs {
                v.logs = logs.clone();
            }
        }
    } else {
        for l in &logs {
            let _ = fs::remove_file(l);
        }
        let _ = fs::remove_dir_all(&disk_dir);
    }
    Ok(verdicts)
}
