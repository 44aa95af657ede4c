//! Log lifecycle: STATUS_INFO/STATUS_TABLE, PRESUSPEND/POSTSUSPEND/RESUME/DTR, core state across
//! suspend/resume, the luid swap of a table reload, and the signals that must not end the agent.

use crate::common::*;

#[test]
fn status_of_core_logs() {
    let mut a = Agent::start();
    let plain = Log::nth(0);
    let flags = Log::nth(1);
    a.create(&plain, "100 clustered-core 8");
    a.create(&flags, "2097152 clustered-core 1024 nosync block_on_error");
    for log in [&plain, &flags] {
        let r = a.call(log, T::StatusInfo, &[]);
        assert_eq!(r.error, 0, "{r}");
        assert_eq!(r.payload, b"1 clustered-core\0", "STATUS_INFO, NUL counted in data_size");
        assert_eq!(r.header.unwrap().data_size, 17);
    }
    let t = status_text(&a.ok(&plain, T::StatusTable, &[]));
    assert!(t.starts_with("clustered-core 8"), "STATUS_TABLE {t:?}");
    assert!(!t.contains("nosync"), "{t:?}");
    let t = status_text(&a.ok(&flags, T::StatusTable, &[]));
    assert!(t.starts_with("clustered-core 1024"), "STATUS_TABLE {t:?}");
    assert!(t.contains("nosync") && t.contains("block_on_error"), "{t:?}");
}

#[test]
fn status_of_a_disk_log_on_a_regular_file() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let log = Log::nth(0);
    a.create(&log, &format!("100 clustered-disk {} 8", disk.display()));
    assert_eq!(status_text(&a.ok(&log, T::StatusInfo, &[])), "3 clustered-disk 0:0 A");
    let t = status_text(&a.ok(&log, T::StatusTable, &[]));
    assert!(t.starts_with("clustered-disk "), "STATUS_TABLE {t:?}");
}

#[test]
fn suspend_resume_and_dtr() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    for t in [T::Presuspend, T::Postsuspend, T::Resume, T::Presuspend, T::Postsuspend, T::Dtr] {
        let r = a.call(&log, t, &[]);
        assert_eq!((r.error, r.header.unwrap().data_size), (0, 0), "{}: {r}", t.name());
    }
    for t in T::ALL.into_iter().filter(|&t| t != T::Ctr) {
        a.expect_err(&log, t, &crate::ctr::sample_payload(t), unknown_log_errno(t), "after DTR");
    }
    // The (uuid, luid) can be constructed afresh, with a different table.
    a.create(&log, "100 clustered-core 4");
    assert_eq!(a.region_size(&log), 4);
    // DTR without suspending first also works.
    a.ok(&log, T::Dtr, &[]);
    a.expect_err(&log, T::GetRegionSize, &[], EINVAL, "after DTR");
    // And DTR of a log that was never resumed.
    a.ctr_ok(&log, CORE);
    a.ok(&log, T::Dtr, &[]);
    a.expect_err(&log, T::GetRegionSize, &[], EINVAL, "after DTR");
}

#[test]
fn core_logs_without_state_dir_keep_their_state_across_suspend_and_resume() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.set_sync(&log, 0, 1);
    a.set_sync(&log, 4, 1);
    a.mark(&log, &[6]);
    a.suspend(&log);
    a.resume(&log);
    assert_eq!(a.sync_map(&log, N), "1000100000000");
    assert!(!a.is_clean(&log, 6));
    assert_eq!(a.sync_count(&log), 2);
}

#[test]
fn luid_swap_of_a_table_reload() {
    let mut a = Agent::start();
    let old = Log::new(UUID, 0xffff_8880_0000_1000);
    let new = Log::new(UUID, 0xffff_8880_0000_2000);
    a.create(&old, CORE);
    a.set_sync(&old, 0, 1);
    a.mark(&old, &[1]);
    // dm reload: CTR + GET_REGION_SIZE for the new table while the old one is live.
    a.ctr_ok(&new, "100 clustered-core 4");
    assert_eq!(a.region_size(&new), 4);
    assert_eq!(a.region_size(&old), 8, "the old log is unaffected");
    assert!(a.in_sync(&old, 0));
    a.mark(&old, &[2]);
    a.ok(&old, T::Presuspend, &[]);
    a.ok(&old, T::Postsuspend, &[]);
    a.resume(&new);
    a.ok(&old, T::Dtr, &[]);
    a.expect_err(&old, T::GetRegionSize, &[], EINVAL, "the old luid is gone after its DTR");
    // The new log is its own (core, in memory: starts clean and out of sync) and fully usable.
    assert_eq!(a.region_size(&new), 4);
    assert!(!a.in_sync(&new, 0));
    assert!(a.is_clean(&new, 1));
    assert_eq!(a.resync_work(&new), (1, 0));
    a.mark(&new, &[24]);
    a.set_sync(&new, 24, 1);
    assert_eq!(a.sync_count(&new), 1);
    a.expect_err(&new, T::InSync, &25u64.to_ne_bytes(), EINVAL, "100/4 = 25 regions");
}

#[test]
fn luid_swap_of_a_disk_log_carries_the_state_through_the_device() {
    let mut a = Agent::start();
    let disk = zero_file(&a.dir.join("disk"), 65536);
    let ctr = format!("100 clustered-disk {} 8", disk.display());
    let old = Log::new(UUID, 0x1000);
    let new = Log::new(UUID, 0x2000);
    a.create(&old, &ctr);
    for r in 0..6 {
        a.recover(&old, r);
    }
    a.mark(&old, &[2]);
    a.ctr_ok(&new, &ctr);
    assert_eq!(a.region_size(&new), 8);
    a.ok(&old, T::Presuspend, &[]);
    a.ok(&old, T::Postsuspend, &[]);
    // Everything the old log knew is on the device now.
    let img = DiskLog::read(&disk);
    img.assert_header(N);
    assert_eq!(img.map(N), "1101110000000");
    a.resume(&new);
    a.ok(&old, T::Dtr, &[]);
    assert_eq!(a.sync_map(&new, N), "1101110000000", "the new luid loaded the old one's state");
    assert_eq!(a.sync_count(&new), 5);
    assert_eq!(a.resync_work(&new), (1, 2));
}

/// A logrotate SIGHUP, or a cmirrord veteran's `kill -USR1` / `-USR2` (cmirrord dumps its debug
/// state on them), must not take every mirror's log server down (the default action of all three
/// is to end the process): HUP is ignored, USR1 and USR2 write every log's state to the log.
#[test]
fn hup_usr1_usr2_never_stop_the_agent_and_usr1_dumps_the_logs() {
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.mark(&log, &[3]);
    for sig in [libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2] {
        // SAFETY: plain kill(2) to our own child.
        assert_eq!(unsafe { libc::kill(a.proc.pid() as libc::pid_t, sig) }, 0);
        assert!(!a.is_clean(&log, 3), "signal {sig}: the agent still answers, with the log's state");
        assert!(a.proc.try_exited().unwrap().is_none(), "signal {sig} ended the agent:\n{}", a.proc.output());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !a.proc.output().contains("log state") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = a.proc.output();
    let line = out
        .lines()
        .find(|l| l.contains("log state") && l.contains("integrationtest0001"))
        .unwrap_or_else(|| panic!("no state dump:\n{out}"));
    // Without the terminal colours of the text format: `\x1b[...m` sequences.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            plain.push(c);
        }
    }
    assert!(plain.contains("phase=\"resumed\"") && plain.contains("dirty=1"), "{plain}");
}

/// Logs an operator can search: no terminal colour codes in a file or the journal, a start-up
/// line with the version and the commit, the log named as its metrics and alerts name it
/// (`log=ulogintegrationtest0001`, the `log` label), and, when stderr is the journal
/// (`JOURNAL_STREAM` names it), each line led by its syslog priority so `journalctl -p
/// warning` selects by level.
#[test]
fn logs_are_plain_named_like_the_metrics_and_carry_priorities_in_the_journal() {
    use std::os::unix::fs::MetadataExt;
    let mut a = Agent::start();
    let log = Log::nth(0);
    a.create(&log, CORE);
    a.ctr(&Log::nth(1), "100 clustered-core 3"); // refused: a warning
                                                 // Lines reach the file through the agent's logging thread: wait for the last one expected.
    let out = a.proc.output_when(|o| o.contains("log created"), std::time::Duration::from_secs(30));
    assert!(!out.contains('\x1b'), "terminal escape codes in a log file:\n{out}");
    let start = out.lines().find(|l| l.contains("ulog-agent starting")).unwrap_or_else(|| panic!("{out}"));
    assert!(
        start.contains(&format!("version={}", env!("CARGO_PKG_VERSION"))) && start.contains("revision="),
        "{start}"
    );
    let created = out.lines().find(|l| l.contains("log created")).unwrap_or_else(|| panic!("{out}"));
    assert!(created.contains("log=ulogintegrationtest0001 "), "the metrics' log label: {created}");

    // stderr as the journal would have it: JOURNAL_STREAM = its device:inode. In a namespace of
    // its own: the first agent still serves (one log server per namespace).
    enter_private_netns().expect("root");
    let dir = TempDir::new();
    let path = dir.join("journal-stream");
    let file = std::fs::File::create(&path).unwrap();
    let meta = file.metadata().unwrap();
    let mut peer = KernelPeer::open().unwrap();
    let mut agent = std::process::Command::new(agent_bin())
        .args(["-f", "--no-http", "--accept-peer-port", &peer.port().to_string()])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&path).unwrap().contains("serving dm-log-userspace requests") {
        assert!(std::time::Instant::now() < deadline, "{}", std::fs::read_to_string(&path).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let r = peer.call_request(&Request::ctr(UUID, 7, "100 clustered-core 3")).unwrap();
    assert_eq!(r.error, EINVAL, "{r}");
    // The warning reaches stderr through the logging thread: wait for it (bounded) before the kill.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(&path).unwrap().contains("CTR refused") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(lines.iter().all(|l| l.starts_with('<')), "every line has a priority:\n{text}");
    assert!(lines.iter().any(|l| l.starts_with("<6>") && l.contains("ulog-agent starting")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("<4>") && l.contains("CTR refused")), "{text}");
}

/// The exporters' conventions and a safe state directory: `--web.listen-address` is accepted
/// for `--http-addr`, sizes take a unit and 0 is refused, and a `--state-dir` that does not
/// exist is refused instead of created (a typo would otherwise start every log afresh: a full
/// resync of every core-log mirror after the next restart).
#[test]
fn flags_follow_conventions_and_a_missing_state_dir_is_refused() {
    enter_private_netns().expect("root");
    let dir = TempDir::new();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(agent_bin())
            .args(["-f", "--no-http", "--accept-peer-port", "1"])
            .arg("--run-dir")
            .arg(dir.join("run"))
            .args(args)
            .env_remove("ULOG_STATE_DIR")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let missing = dir.join("no-such-dir");
    let (code, err) = run(&["--state-dir", &missing.display().to_string()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("does not exist") && !missing.exists(), "refused, not created: {err}");
    let (code, err) = run(&["--rcvbuf", "0"]);
    assert_eq!(code, Some(2), "clap refuses the value: {err}");
    assert!(err.contains("size of 0"), "{err}");
    let help = std::process::Command::new(agent_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("web.listen-address") && help.contains("ULOG_RCVBUF"), "{help}");
    // And an agent starts with them.
    let mut peer = KernelPeer::open().unwrap();
    let state = dir.join("state");
    std::fs::create_dir(&state).unwrap();
    let proc = AgentProcess::spawn_ready(
        agent_bin(),
        &mut peer,
        ["--rcvbuf", "16M", "--web.listen-address", "127.0.0.1:0", "--state-dir", &state.display().to_string()],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let r = peer.call_request(&Request::ctr(UUID, 9, CORE)).unwrap();
    assert_eq!(r.error, 0, "{r}\n{}", proc.output());
}

/// systemd `Type=notify`: READY=1 reaches `$NOTIFY_SOCKET` only once the agent listens to
/// connector group 7, so a unit ordered after it (LVM activation at boot) cannot create a
/// mirror before the log server is there ("Userspace log server not found"); STOPPING=1 when
/// it exits.
#[test]
fn ready_is_notified_once_the_agent_listens() {
    enter_private_netns().expect("root");
    let dir = TempDir::new();
    let sock_path = dir.join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut peer = KernelPeer::open().unwrap();
    assert_eq!(peer.group_listeners().unwrap(), 0);
    let mut agent = std::process::Command::new(agent_bin())
        .args(["-f", "--no-http", "--accept-peer-port", &peer.port().to_string()])
        .arg("--run-dir")
        .arg(dir.join("run"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("READY=1 within 10 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert_eq!(peer.group_listeners().unwrap(), 1, "ready only once the agent is in group 7");
    let r = peer.call_request(&Request::ctr(UUID, 5, CORE)).unwrap();
    assert_eq!(r.error, 0, "{r}");
    peer.call_request(&Request::new(T::Dtr, UUID, 5, vec![])).unwrap();
    // SAFETY: kill(2) of our child.
    unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(agent.wait().unwrap().success());
}
