//! `zdd upgrade` / SIGUSR2: the master re-executes its binary, keeping its pid, listeners,
//! workers, their log pipes, the notify and control sockets and the pid-file lock.

mod common;

use std::collections::BTreeSet;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn worker_pids(s: &Value) -> Vec<(i64, i64)> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["pid"].as_i64().unwrap(), w["generation"].as_i64().unwrap()))
        .collect()
}

/// The master's open fds, as their /proc link targets (a failing count shows what is new).
fn fds(pid: i64) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            format!("{} -> {target}", e.file_name().to_string_lossy())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn fifty_upgrades_under_load_keep_everything_and_lose_no_connection() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&daemon_config(port, &["--ready", "--serve"], "count = 2"));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    // A reload first, so that the hand-over includes a generation number above 1.
    assert_eq!(zdd(&z, &["reload"]).status.code(), Some(0));
    ask_gen(addr, 2);
    // Measure once generation 1 has drained, so its pipes do not count.
    wait_for("generation 1 gone", DEADLINE, || {
        (status(&z)["workers"].as_array().unwrap().len() == 2).then_some(())
    });
    let before = status(&z);
    let pid = before["pid"].as_i64().unwrap();
    let fds_before = fds(pid);

    let load = Load::start(addr, 1);
    for i in 0..50 {
        let o = zdd(&z, &["upgrade"]);
        assert_eq!(o.status.code(), Some(0), "upgrade {i}: {}{}", stderr(&o), z.log_text());
        assert!(
            stdout(&o).contains(&format!("upgraded: master pid {pid} now runs zdd")),
            "{}",
            stdout(&o)
        );
    }
    load.finish();

    let after = status(&z);
    assert_eq!(after["pid"], pid);
    assert_eq!(after["generation"], 2);
    let live =
        |s: &Value| -> BTreeSet<(i64, i64)> { worker_pids(s).into_iter().filter(|(p, _)| alive(*p as i32)).collect() };
    let serving: BTreeSet<_> = live(&after).into_iter().filter(|(_, g)| *g == 2).collect();
    assert_eq!(
        serving,
        live(&before).into_iter().filter(|(_, g)| *g == 2).collect(),
        "the same workers serve"
    );
    let fds_after = fds(pid);
    assert_eq!(
        fds_after.len(),
        fds_before.len(),
        "fds of the master changed over 50 upgrades: before {fds_before:#?}, after {fds_after:#?}"
    );
    assert!(
        after["uptime_secs"].as_u64() >= before["uptime_secs"].as_u64(),
        "uptime restarted at the upgrade"
    );

    // Everything still works afterwards: reload, then stop with nothing left behind.
    assert_eq!(zdd(&z, &["reload"]).status.code(), Some(0));
    ask_gen(addr, 3);
    let o = zdd(&z, &["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!alive(pid as i32));
    z.assert_clean();
}

#[test]
fn sigusr2_upgrades_and_no_log_line_is_lost() {
    let mut z = Zdd::spawn("[worker]\ncommand = [\"{fixture}\", \"--ready\", \"--tick\", \"1\"]\n");
    z.wait_ready();
    for n in 1..=10 {
        z.signal(Signal::SIGUSR2);
        z.wait_msg_n("upgraded: master re-executed", n);
    }
    z.stop();
    let ticks: Vec<u64> = z
        .records()
        .iter()
        .filter_map(|r| {
            r["msg"]
                .as_str()
                .and_then(|m| m.strip_prefix("tick "))
                .map(|n| n.parse().unwrap())
        })
        .collect();
    let last = *ticks.last().unwrap();
    assert_eq!(
        ticks,
        (1..=last).collect::<Vec<_>>(),
        "tick lines lost or reordered across upgrades"
    );
}

#[test]
fn failed_exec_leaves_the_old_master_running() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&daemon_config(port, &["--ready", "--serve"], ""));
    // Start from a copy of the binary, then remove the copy: the upgrade's exec must fail.
    let copy = z.path("zdd-copy");
    std::fs::copy(zdd_bin(), &copy).unwrap();
    let mut start = std::process::Command::new(&copy);
    start
        .args(["start", "-c"])
        .arg(&z.config)
        .env("FIXTURE_REPORT_DIR", z.reports());
    // Another test's fork may briefly hold the new file open for writing (ETXTBSY): retry.
    let o = wait_for("exec of the copied binary", DEADLINE, || match start.output() {
        Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => None,
        r => Some(r.unwrap()),
    });
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let before = status(&z);
    std::fs::remove_file(&copy).unwrap();
    let o = zdd(&z, &["upgrade"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        // The new binary is checked before the exec: a missing one is refused there.
        e.contains("upgrade refused: cannot run ")
            && e.contains("zdd-copy upgrade-check: no such file or directory (ENOENT)"),
        "{e}"
    );
    assert!(e.contains("the master carries on unchanged"), "{e}");
    let after = status(&z);
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(worker_pids(&after), worker_pids(&before));
    assert_eq!(ask(addr).unwrap().1, 1);
    // Signals still work after the failed attempt (the mask was restored).
    assert_eq!(zdd(&z, &["reload"]).status.code(), Some(0));
    ask_gen(addr, 2);
    assert_eq!(zdd(&z, &["stop"]).status.code(), Some(0));
    z.assert_clean();
}

#[test]
fn upgrade_is_refused_during_a_reload() {
    let port = free_port();
    let z = Zdd::new(&daemon_config(port, &["--ready-after", "500", "--serve"], ""));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let reload = z
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the reload to start", DEADLINE, || status(&z)["reloading"].as_u64());
    let o = zdd(&z, &["upgrade"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("upgrade refused: a reload is under way"),
        "{}",
        stderr(&o)
    );
    assert_eq!(reload.wait_with_output().unwrap().status.code(), Some(0));
    assert_eq!(zdd(&z, &["stop"]).status.code(), Some(0));
    z.assert_clean();
}
