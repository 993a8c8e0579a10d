//! An upgrade can never take the service down: a new binary that fails, hangs or cannot read
//! the hand-over is refused before the exec; a new image that fails after the exec rolls back
//! to the old one; the resumed master keeps its running paths and log. Each under load, with
//! the same master pid in charge afterwards.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// A master started (daemon mode) from a copy of the binary in the test's dir, which the test
/// can then replace with a new "version".
fn start_from_copy(z: &Zdd, env: &[(&str, &str)]) -> PathBuf {
    let copy = z.path("zdd-installed");
    std::fs::copy(zdd_bin(), &copy).unwrap();
    let mut cmd = std::process::Command::new(&copy);
    cmd.args(["start", "-c"])
        .arg(&z.config)
        .env("FIXTURE_REPORT_DIR", z.reports());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Another test's fork may briefly hold the new file open for writing (ETXTBSY): retry.
    let o = wait_for("exec of the copied binary", DEADLINE, || match cmd.output() {
        Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => None,
        r => Some(r.unwrap()),
    });
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    copy
}

/// Replace the installed binary (a new inode, as a package manager does).
fn install(path: &Path, script: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, script).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn install_copy(path: &Path) {
    let tmp = path.with_extension("new");
    std::fs::copy(zdd_bin(), &tmp).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn workers(s: &Value) -> Vec<i64> {
    let mut v: Vec<i64> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    v.sort();
    v
}

/// `zdd upgrade` with a bad new binary, under load: refused or rolled back, nothing lost.
fn bad_upgrade_under_load(script: Option<&str>, env: &[(&str, &str)], expect: &[&str]) -> Zdd {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&daemon_config(port, &["--ready", "--serve"], "count = 2"));
    let installed = start_from_copy(&z, env);
    let before = status(&z);
    if let Some(s) = script {
        install(&installed, s);
    }
    let load = Load::start(addr, 2);
    let o = zdd(&z, &["upgrade"]);
    let r = load.finish();
    assert!(r.requests > 0);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let e = stderr(&o);
    for x in expect {
        assert!(e.contains(x), "expected {x:?} in: {e}");
    }
    let after = status(&z);
    assert_eq!(after["pid"], before["pid"], "the same master is in charge");
    assert_eq!(workers(&after), workers(&before), "the same workers serve");
    assert_eq!(ask(addr).unwrap().1, 1);
    // And it goes on working: a reload, then a good upgrade.
    assert_eq!(zdd(&z, &["reload"]).status.code(), Some(0));
    ask_gen(addr, 2);
    install_copy(&installed);
    let o = zdd(&z, &["upgrade"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(status(&z)["pid"], before["pid"]);
    z
}

fn stop(z: &Zdd) {
    let o = zdd(z, &["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    z.assert_clean();
}

#[test]
fn an_upgrade_to_a_binary_that_exits_1_is_refused_under_load() {
    let z = bad_upgrade_under_load(
        Some("#!/bin/sh\necho 'broken build' >&2\nexit 1\n"),
        &[],
        &[
            "upgrade refused: ",
            "upgrade-check exited with status 1: broken build",
            "carries on unchanged",
        ],
    );
    stop(&z);
}

#[test]
fn an_upgrade_to_a_binary_that_is_not_zdd_is_refused() {
    let z = bad_upgrade_under_load(
        Some("#!/bin/sh\necho hello\n"),
        &[],
        &["upgrade-check answered \"hello\""],
    );
    stop(&z);
}

#[test]
fn an_upgrade_to_a_binary_that_hangs_is_refused_under_load() {
    let z = bad_upgrade_under_load(
        Some("#!/bin/sh\nexec sleep 600\n"),
        &[],
        &["upgrade-check did not answer within 10s", "carries on unchanged"],
    );
    // The hanging check was killed.
    let o = std::process::Command::new("pgrep")
        .args(["-f", "sleep 600"])
        .output()
        .unwrap();
    let left: Vec<i32> = stdout(&o)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| alive(*p))
        .collect();
    let ours: Vec<i32> = left
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("PPid:") && l.split_whitespace().nth(1) == Some(&status(&z)["pid"].to_string()))
        })
        .collect();
    assert!(ours.is_empty(), "the hanging check is still there: {ours:?}");
    stop(&z);
}

#[test]
fn an_upgrade_that_cannot_read_the_hand_over_version_is_refused() {
    // A binary that answers like zdd but reads no version we write.
    let z = bad_upgrade_under_load(
        Some("#!/bin/sh\necho 'zdd 9.0.0 cannot read upgrade state version 2 (it reads 3 to 4)' >&2\nexit 1\n"),
        &[],
        &["cannot read upgrade state version 2"],
    );
    stop(&z);
}

#[test]
fn a_new_image_that_fails_to_resume_rolls_back_under_load() {
    let z = bad_upgrade_under_load(
        None,
        &[("ZDD_FAULT", "resume")],
        &["upgrade failed: ZDD_FAULT=resume", "rolled back to zdd "],
    );
    stop(&z);
}

#[test]
fn the_check_refuses_unknown_state_versions() {
    let o = std::process::Command::new(zdd_bin())
        .args(["upgrade-check", "--state-version", "99"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot read upgrade state version 99"),
        "{}",
        stderr(&o)
    );
    let o = std::process::Command::new(zdd_bin())
        .args(["upgrade-check", "--state-version", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).starts_with("zdd "), "{}", stdout(&o));
}

#[test]
fn an_upgrade_with_the_log_directory_removed_keeps_the_master_under_load() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = daemon_config(port, &["--ready", "--serve"], "").replace("{dir}/zdd.log", "{dir}/logs/zdd.log");
    let z = Zdd::new(&body);
    std::fs::create_dir(z.path("logs")).unwrap();
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let before = status(&z);
    std::fs::remove_dir_all(z.path("logs")).unwrap();
    let load = Load::start(addr, 2);
    let o = zdd(&z, &["upgrade"]);
    load.finish();
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let after = status(&z);
    assert_eq!(after["pid"], before["pid"]);
    assert_eq!(workers(&after), workers(&before));
    assert_eq!(zdd(&z, &["reload"]).status.code(), Some(0));
    ask_gen(addr, 2);
    // The operator recreates the directory and reopens the log.
    std::fs::create_dir(z.path("logs")).unwrap();
    assert_eq!(zdd(&z, &["reopen-logs"]).status.code(), Some(0));
    stop(&z);
}

#[test]
fn an_upgrade_after_a_reload_that_moved_the_control_socket_keeps_the_running_sockets() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&daemon_config(port, &["--ready", "--serve"], ""));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    // The file now names another control socket: a [master] change, for the next start.
    let moved = daemon_config(port, &["--ready", "--serve"], "").replace("run/app.sock", "run2/app.sock");
    let original = std::fs::read_to_string(&z.config).unwrap();
    z.write_config(&moved);
    // The running master is still reached at its socket (through the old file).
    let old_cfg = z.path("old.toml");
    std::fs::write(&old_cfg, &original).unwrap();
    let at_old = |args: &[&str]| {
        let mut c = std::process::Command::new(zdd_bin());
        c.args(args)
            .arg("-c")
            .arg(&old_cfg)
            .env("FIXTURE_REPORT_DIR", z.reports());
        c.output().unwrap()
    };
    // `zdd reload` refuses a file that is not the one the master re-reads; SIGHUP reloads.
    let o = at_old(&["reload"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("this master runs"), "{}", stderr(&o));
    let pid: i32 = std::fs::read_to_string(z.path("run/app.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP).unwrap();
    ask_gen(addr, 2);
    let o = at_old(&["upgrade"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!z.path("run2").exists() || std::fs::read_dir(z.path("run2")).unwrap().next().is_none());
    // New workers get the notify socket that exists: a reload (notify readiness) succeeds.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP).unwrap();
    ask_gen(addr, 3);
    let o = at_old(&["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for d in ["run", "run2"] {
        let p = z.path(d);
        if p.exists() {
            let left: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            assert!(left.is_empty(), "left in {d}: {left:?}");
        }
    }
}

#[test]
fn an_orphan_pipes_incomplete_line_survives_an_upgrade() {
    // Orphan pipes (a reaped worker's pipe still held by its descendant) only outlive their
    // worker without cgroups, which a master running as nobody does not have here.
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "needs root under CI");
        missing("an_orphan_pipes_incomplete_line_survives_an_upgrade", "needs root");
        return;
    }
    let script = "if [ -e {dir}/scratch/once ]; then exec sleep 600; fi; touch {dir}/scratch/once; \
                  setsid sh -c \"printf partial-line; sleep 8; echo ' completed'\" & sleep 0.5; exit 3";
    let mut z = Zdd::new(&format!(
        "[worker]\ncommand = [\"/bin/sh\", \"-c\", {script:?}]\nready = \"delay\"\nready_delay = \"100ms\"\nrestart = \"on-failure\"\n"
    ));
    std::fs::create_dir_all(z.path("scratch")).unwrap();
    std::fs::set_permissions(z.path("scratch"), std::fs::Permissions::from_mode(0o777)).unwrap();
    z.start_as_nobody();
    z.wait_ready();
    // The first worker exits; its pipe lives on in its background job, mid-line.
    z.wait_msg("worker exited unexpectedly; restarting");
    let o = zdd(&z, &["upgrade"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    z.wait_msg("partial-line completed");
    z.stop();
}

#[test]
fn two_upgrades_asked_at_once_both_hear_the_outcome() {
    let port = free_port();
    let z = Zdd::new(&daemon_config(port, &["--ready", "--serve"], ""));
    let installed = start_from_copy(&z, &[]);
    let before = status(&z);
    // A new "version" whose check takes a second, so that the second request arrives while the
    // first is under way.
    let real = z.path("zdd-real");
    std::fs::copy(zdd_bin(), &real).unwrap();
    install(
        &installed,
        &format!(
            "#!/bin/sh\n[ \"$1\" = upgrade-check ] && sleep 1\nexec {} \"$@\"\n",
            real.display()
        ),
    );
    let first = z
        .command(&["upgrade"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first upgrade's check to begin", DEADLINE, || {
        z.log_text().contains("upgrade: checking the new binary").then_some(())
    });
    let second = zdd(&z, &["upgrade"]);
    let first = first.wait_with_output().unwrap();
    for o in [&first, &second] {
        assert_eq!(o.status.code(), Some(0), "{}{}", stdout(o), stderr(o));
        assert!(stdout(o).contains("upgraded: master pid"), "{}", stdout(o));
    }
    assert_eq!(status(&z)["pid"], before["pid"]);
    stop(&z);
}
