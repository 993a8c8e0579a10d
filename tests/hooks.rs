//! Reload hooks (`[hooks]`) through the real binary: before_reload runs before any new worker
//! and can fail the reload with nothing changed; a hanging one is killed at its timeout with
//! its children; after_reload runs after the commit and its failure is only logged; bad
//! `[hooks]` tables are refused with their position.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::*;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A serving worker config (daemon mode: log to `{dir}/zdd.log`), `cwd` the temp dir, so that
/// hooks named `bin/…` resolve there; `extra` goes after the listeners (a `[hooks]` table).
fn config(port: u16, worker_extra: &str, extra: &str) -> String {
    let worker = format!("cwd = \"{{dir}}\"\nenv = {{ APP_ENV = \"hooked\" }}\n{worker_extra}");
    format!("{}\n{extra}\n", daemon_config(port, &["--ready", "--serve"], &worker))
}

/// Write an executable shell script at `{dir}/bin/NAME`.
fn script(z: &Zdd, name: &str, body: &str) {
    let bin = z.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = bin.join(name);
    let text = body.replace("{dir}", z.dir.path().to_str().unwrap());
    std::fs::write(&path, format!("#!/bin/sh\n{text}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Index of the first log record matching `f`.
fn first(records: &[serde_json::Value], f: impl Fn(&serde_json::Value) -> bool) -> usize {
    records
        .iter()
        .position(f)
        .unwrap_or_else(|| panic!("no such record in {records:#?}"))
}

fn started(z: &Zdd, generation: u64) -> usize {
    z.records_with("worker started")
        .iter()
        .filter(|r| r["generation"] == generation)
        .count()
}

/// What a hook writes about itself, one `key=value` a line.
const REPORT: &str = r#"out={dir}/reports/hook-$ZDD_HOOK-$ZDD_GENERATION.env
{
  echo "uid=$(id -u)"
  echo "gid=$(id -g)"
  echo "args=$*"
  echo "gen=$ZDD_GENERATION"
  echo "hook=$ZDD_HOOK"
  echo "app=$APP_ENV"
  echo "cwd=$(pwd)"
  echo "listen=${LISTEN_FDS-unset}${LISTEN_PID-unset}${LISTEN_FDNAMES-unset}"
  echo "notify=${NOTIFY_SOCKET-unset}"
  echo "slot=${ZDD_SLOT-unset}"
  echo "reports=$(ls {dir}/reports | grep -c '^report-')"
  echo "stdin=$(cat | wc -c)"
} > "$out.tmp" && mv "$out.tmp" "$out"
"#;

fn hook_report(z: &Zdd, hook: &str, generation: u64) -> std::collections::BTreeMap<String, String> {
    let path = z.reports().join(format!("hook-{hook}-{generation}.env"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_passing_before_reload_hook_runs_once_per_reload_before_any_new_worker() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let hooks = "[hooks]\nbefore_reload = [\"bin/check-app\", \"--strict\"]\n";
    let z = Zdd::new(&config(port, "", hooks));
    // The reloaded config runs its workers, and so its hook, as nobody (when we can).
    let user = if is_root() { "user = \"nobody\"" } else { "" };
    std::fs::set_permissions(z.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(z.reports(), std::fs::Permissions::from_mode(0o777)).unwrap();
    script(
        &z,
        "check-app",
        &format!("{REPORT}echo \"checked generation $ZDD_GENERATION\"\n"),
    );
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    // The first start runs no hook.
    assert!(z.records_with("hook started").is_empty());
    assert!(!z.reports().join("hook-before_reload-1.env").exists());

    z.write_config(&config(port, user, hooks));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("running the before_reload hook for generation 2"),
        "{text}"
    );
    assert!(text.contains("reloaded: generation 2 serving"), "{text}");
    ask_gen(addr, 2);

    let r = hook_report(&z, "before_reload", 2);
    let (uid, gid) = if is_root() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        (nobody.uid.as_raw(), nobody.gid.as_raw())
    } else {
        (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw())
    };
    assert_eq!(r["uid"], uid.to_string(), "{r:?}");
    assert_eq!(r["gid"], gid.to_string(), "{r:?}");
    assert_eq!(r["args"], "--strict");
    assert_eq!(r["gen"], "2");
    assert_eq!(r["hook"], "before_reload");
    assert_eq!(r["app"], "hooked");
    assert_eq!(
        std::fs::canonicalize(&r["cwd"]).unwrap(),
        std::fs::canonicalize(z.dir.path()).unwrap()
    );
    assert_eq!(r["listen"], "unsetunsetunset");
    assert_eq!(r["notify"], "unset");
    assert_eq!(r["slot"], "unset");
    assert_eq!(r["stdin"], "0");
    // Only generation 1's worker had started when it ran.
    assert_eq!(r["reports"], "1");

    // In the log: its output tagged as the hook, and no worker of generation 2 before it passed.
    let records = z.records();
    let line = first(&records, |r| r["msg"] == "checked generation 2");
    assert_eq!(records[line]["hook"], "before_reload");
    assert_eq!(records[line]["generation"], 2);
    assert_eq!(records[line]["stream"], "stdout");
    let hook = first(&records, |r| r["msg"] == "hook started" && r["generation"] == 2);
    let passed = first(&records, |r| r["msg"] == "before_reload hook passed");
    let spawned = first(&records, |r| r["msg"] == "worker started" && r["generation"] == 2);
    assert!(hook < line && line < passed && passed < spawned, "{records:#?}");

    // Once per reload.
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(z.records_with("hook started").len(), 2);
    assert_eq!(hook_report(&z, "before_reload", 3)["gen"], "3");
    assert_eq!(zdd(&z, &["stop"]).status.code(), Some(0));
}

#[test]
fn a_failing_before_reload_hook_fails_the_reload_with_nothing_changed_under_load() {
    let port = free_port();
    let admin = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&config(port, "", ""));
    script(
        &z,
        "check-app",
        "echo \"checking the app\"\necho \"error: DATABASE_URL is not set\" >&2\nexit 2\n",
    );
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let serving = ask_gen(addr, 1);
    let load = Load::start(addr, 2);
    // The new config also adds a listener: bound for the reload, closed again with it.
    let new = format!(
        "{}\n[[listen]]\nname = \"admin\"\ntcp = \"127.0.0.1:{admin}\"\n",
        config(port, "", "[hooks]\nbefore_reload = [\"bin/check-app\"]\n")
    );
    z.write_config(&new);
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(
            "reload failed: before_reload hook [\"bin/check-app\"] exited with status 2; generation 1 keeps serving"
        ),
        "{e}"
    );
    assert!(e.contains("  | checking the app"), "{e}");
    assert!(e.contains("  | error: DATABASE_URL is not set"), "{e}");
    let r = load.finish();
    eprintln!("{} requests, 0 failed", r.requests);
    assert!(r.seen.iter().all(|&(g, _)| g == 1));
    // No worker of generation 2 was ever spawned; generation 1's serves on.
    assert_eq!(started(&z, 2), 0);
    assert_eq!(z.started_pids().len(), 1);
    assert_eq!(ask(addr).unwrap(), (serving, 1));
    let s = status(&z);
    assert_eq!(s["generation"], 1);
    // The listener bound for the reload is closed.
    std::net::TcpListener::bind(("127.0.0.1", admin)).expect("the reload's new listener is closed");
    // The hook's lines are in the log, tagged.
    let lines = z.records_with("error: DATABASE_URL is not set");
    assert_eq!(lines[0]["hook"], "before_reload");
    assert_eq!(lines[0]["stream"], "stderr");
    // A fixed hook: the next reload goes through, as generation 2.
    script(&z, "check-app", "exit 0\n");
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("reloaded: generation 2 serving"));
    assert_eq!(zdd(&z, &["stop"]).status.code(), Some(0));
}

#[test]
fn a_hanging_before_reload_hook_is_killed_with_its_children_at_its_timeout() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&config(port, "", ""));
    script(
        &z,
        "check-app",
        "sleep 1000 &\necho $! > {dir}/child.pid\necho \"waiting for the database\"\nwait\n",
    );
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    z.write_config(&config(
        port,
        "",
        "[hooks]\nbefore_reload = [\"bin/check-app\"]\ntimeout = \"3s\"\n",
    ));
    let t0 = Instant::now();
    let mut reload = z
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let child: i32 = wait_for("the hook's child", DEADLINE, || {
        std::fs::read_to_string(z.path("child.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    // The master answers meanwhile, and generation 1 serves.
    let asked = Instant::now();
    let s = status(&z);
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "status took {:?}",
        asked.elapsed()
    );
    assert_eq!(s["generation"], 1);
    assert_eq!(ask(addr).unwrap().1, 1);
    assert!(
        reload.try_wait().unwrap().is_none(),
        "the reload ended before its hook's timeout"
    );
    let o = reload.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(t0.elapsed() >= Duration::from_secs(3));
    let e = stderr(&o);
    assert!(
        e.contains(
            "reload failed: before_reload hook [\"bin/check-app\"] did not finish within 3s (killed); generation 1 keeps serving"
        ),
        "{e}"
    );
    assert!(e.contains("  | waiting for the database"), "{e}");
    // Nothing of it is left: the hook nor the sleep it forked.
    let hook = z.records_with("hook started")[0]["pid"].as_i64().unwrap() as i32;
    for pid in [hook, child] {
        wait_for(&format!("pid {pid} to be gone"), DEADLINE, || {
            (!alive(pid)).then_some(())
        });
    }
    assert_eq!(started(&z, 2), 0);
    assert_eq!(zdd(&z, &["stop"]).status.code(), Some(0));
}

#[test]
fn a_stop_while_before_reload_runs_kills_it_and_cancels_the_reload() {
    let port = free_port();
    let z = Zdd::new(&config(port, "", ""));
    script(&z, "check-app", "sleep 1000 &\necho $! > {dir}/child.pid\nwait\n");
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    z.write_config(&config(port, "", "[hooks]\nbefore_reload = [\"bin/check-app\"]\n"));
    let reload = z
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let child: i32 = wait_for("the hook's child", DEADLINE, || {
        std::fs::read_to_string(z.path("child.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    let o = zdd(&z, &["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = reload.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("reload cancelled: the master is stopping"),
        "{}",
        stderr(&o)
    );
    let hook = z.records_with("hook started")[0]["pid"].as_i64().unwrap() as i32;
    for pid in [hook, child] {
        wait_for(&format!("pid {pid} to be gone"), DEADLINE, || {
            (!alive(pid)).then_some(())
        });
    }
    assert_eq!(started(&z, 2), 0);
    assert!(!z
        .records_with("before_reload hook killed: the master is stopping")
        .is_empty());
}

#[test]
fn after_reload_runs_after_the_commit_and_its_failure_is_only_logged() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut z = Zdd::new(&config(port, "", ""));
    script(
        &z,
        "notify-deploy",
        &format!("{REPORT}sleep 1\necho \"deploy hook: connection refused\" >&2\nexit 1\n"),
    );
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    z.write_config(&config(port, "", "[hooks]\nafter_reload = [\"bin/notify-deploy\"]\n"));
    let o = zdd(&z, &["reload"]);
    // The reload succeeded, and its verdict did not wait for the hook.
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("reloaded: generation 2 serving"));
    assert!(z.records_with("after_reload hook failed").is_empty());
    // While it runs, an upgrade is refused.
    let u = zdd(&z, &["upgrade"]);
    assert_eq!(u.status.code(), Some(1), "{}{}", stdout(&u), stderr(&u));
    assert!(
        stderr(&u).contains("upgrade refused: the after_reload hook is running"),
        "{}",
        stderr(&u)
    );
    let failed = z.wait_msg_containing("after_reload hook failed: ");
    assert_eq!(
        failed["msg"],
        "after_reload hook failed: after_reload hook [\"bin/notify-deploy\"] exited with status 1"
    );
    assert_eq!(failed["level"], "ERRO");
    z.wait_msg_containing("  | deploy hook: connection refused");
    let r = hook_report(&z, "after_reload", 2);
    assert_eq!((r["gen"].as_str(), r["hook"].as_str()), ("2", "after_reload"));
    // It ran after the commit; generation 2 serves, nothing was rolled back.
    let records = z.records();
    let complete = first(&records, |r| r["msg"] == "reload complete");
    let hook = first(&records, |r| r["msg"] == "hook started");
    assert!(complete < hook, "{records:#?}");
    assert_eq!(status(&z)["generation"], 2);
    ask_gen(addr, 2);
    assert_eq!(zdd(&z, &["stop"]).status.code(), Some(0));
}

#[test]
fn bad_hooks_are_refused_at_check_and_at_reload() {
    let port = free_port();
    let mut z = Zdd::new(&config(port, "", ""));
    script(&z, "check-app", "exit 0\n");
    for (hooks, what) in [
        (
            "[hooks]\nbefore_reload = [\"bin/check-app\"]\nbefore = 1\n",
            "unknown field `before`",
        ),
        (
            "[hooks]\nbefore_reload = []\n",
            "hooks.before_reload: must name a program",
        ),
        (
            "[hooks]\nafter_reload = [\"bin/no-such-hook\"]\n",
            "hooks.after_reload: ",
        ),
        ("[hooks]\nbefore_reload = [\"no-such-hook-zdd\"]\n", "not found in PATH"),
        (
            "[hooks]\nbefore_reload = [\"bin/check-app\"]\ntimeout = \"0s\"\n",
            "hooks.timeout: must be longer than 0s",
        ),
    ] {
        z.write_config(&config(port, "", hooks));
        let o = zdd(&z, &["check"]);
        assert_eq!(o.status.code(), Some(2), "{hooks}: {}", stdout(&o));
        let e = stderr(&o);
        assert!(e.contains("app.toml:") && e.contains(what), "{hooks}: {e}");
    }
    // The same at reload: `zdd reload` refuses the file itself (exit 2, its position); the
    // master, asked by SIGHUP, refuses it too, with nothing changed.
    z.write_config(&config(port, "", ""));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    z.write_config(&config(port, "", "[hooks]\nbefore_reload = [\"bin/no-such-hook\"]\n"));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    let e = stderr(&o);
    assert!(
        e.contains("app.toml:") && e.contains("hooks.before_reload: ") && e.contains("no-such-hook"),
        "{e}"
    );
    let pid: i32 = std::fs::read_to_string(z.path("run/app.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP).unwrap();
    let failed = z.wait_msg_containing("reload failed: invalid config; nothing changed: ");
    let m = failed["msg"].as_str().unwrap();
    assert!(m.contains("hooks.before_reload: ") && m.contains("no-such-hook"), "{m}");
    assert!(z.records_with("hook started").is_empty());
    assert_eq!(status(&z)["generation"], 1);
    assert_eq!(zdd(&z, &["stop"]).status.code(), Some(0));
}
