//! The operator interface: daemonized start, reload/stop/status/reopen-logs through the control
//! socket, exit codes, and a control socket that strangers and garbage cannot disturb.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;
use serde_json::Value;

fn master_pid(z: &Zdd) -> i32 {
    std::fs::read_to_string(z.path("run/app.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Stop through `zdd stop` and check that nothing is left.
fn stop(z: &Zdd) {
    let pid = master_pid(z);
    let o = zdd(z, &["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("master pid {pid} stopped")),
        "{}",
        stdout(&o)
    );
    assert!(!alive(pid), "master still alive after zdd stop returned");
    z.assert_clean();
}

#[test]
fn daemon_start_returns_once_ready_and_status_tells_the_truth() {
    let port = free_port();
    let z = Zdd::new(&daemon_config(port, &["--ready", "--serve"], "count = 2"));
    let o = zdd(&z, &["start"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stderr(&o), z.log_text());
    assert!(stdout(&o).starts_with("zdd: started: pid "), "{}", stdout(&o));
    // Ready means serving, at once.
    let (pid, gen) = ask(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    assert_eq!(gen, 1);
    let s = status(&z);
    let mpid = master_pid(&z);
    assert_eq!(s["pid"], mpid);
    assert_ne!(mpid, 0);
    assert_eq!(s["generation"], 1);
    assert_eq!(s["phase"], "running");
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    assert!(workers.iter().any(|w| w["pid"] == pid));
    for w in workers {
        assert_eq!(w["generation"], 1);
        assert_eq!(w["state"], "ready");
        assert_eq!(w["restarts"], 0);
        assert!(w["started"].as_u64().unwrap() > 1_700_000_000);
    }
    assert_eq!(s["listeners"][0]["name"], "http");
    assert_eq!(s["listeners"][0]["address"], format!("127.0.0.1:{port}"));
    let text = stdout(&zdd(&z, &["status"]));
    assert!(text.contains(&format!("master   pid {mpid}  running")), "{text}");
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    // The daemon has left the invoking session and is reaped by someone else.
    let stat = std::fs::read_to_string(format!("/proc/{mpid}/stat")).unwrap();
    let after = stat.rsplit(')').next().unwrap();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let own_session = nix::unistd::getsid(None).unwrap().as_raw().to_string();
    assert_ne!(
        fields[3], own_session,
        "the daemon is still in the invoking session: {fields:?}"
    );
    assert_ne!(
        fields[3],
        mpid.to_string(),
        "the daemon leads a session and could get a terminal"
    );
    stop(&z);
}

#[test]
fn daemon_start_failures_reach_the_terminal() {
    // Bad config: exit 2, before anything is created.
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\"]\nready = \"later\"\n");
    let o = zdd(&z, &["start"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("worker.ready: expected \"notify\", \"delay\", \"listening\" or \"auto\""),
        "{}",
        stderr(&o)
    );
    z.assert_clean();

    // Bind failure: exit 1, reason on stderr.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let z = Zdd::new(&daemon_config(port, &["--ready"], ""));
    let o = zdd(&z, &["start"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("address already in use (EADDRINUSE)"),
        "{}",
        stderr(&o)
    );
    z.assert_clean();

    // Worker exits during start-up: exit 1 with its status and last lines.
    let z = Zdd::new(&daemon_config(free_port(), &["--stderr-lines", "2", "--exit", "7"], ""));
    let o = zdd(&z, &["start"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("start failed: worker pid") && e.contains("exited with status 7 during start-up"),
        "{e}"
    );
    assert!(e.contains("err line 2"), "{e}");
    wait_for("the failed master to clean up", DEADLINE, || {
        (!z.path("run/app.pid").exists() && !z.path("run/app.sock").exists()).then_some(())
    });
    z.assert_clean();

    // Readiness timeout.
    let z = Zdd::new(&daemon_config(free_port(), &[], "start_timeout = \"300ms\""));
    let o = zdd(&z, &["start"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("did not become ready within 300ms"),
        "{}",
        stderr(&o)
    );
    wait_for("the failed master to clean up", DEADLINE, || {
        (!z.path("run/app.pid").exists()).then_some(())
    });
    z.assert_clean();
}

#[test]
fn reload_command_reports_success_and_failure() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&daemon_config(port, &["--ready", "--serve"], ""));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("starting generation 2"), "{text}");
    assert!(
        text.contains("reloaded: generation 2 serving (1 worker); generation 1 signalled to stop"),
        "{text}"
    );
    let serving = ask_gen(addr, 2);

    // A worker that cannot start: exit 1, its status and last lines; generation 2 untouched.
    z.write_config(&daemon_config(port, &["--stderr-lines", "4", "--exit", "3"], ""));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("reload failed: worker pid") && e.contains("exited with status 3 during start-up"),
        "{e}"
    );
    assert!(e.contains("generation 2 keeps serving"), "{e}");
    assert!(e.contains("  | err line 4"), "{e}");
    assert_eq!(ask(addr).unwrap(), (serving, 2));
    let s = status(&z);
    assert_eq!(s["generation"], 2);
    assert_eq!(
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] != "exited")
            .count(),
        1
    );

    // An invalid config: exit 2 with the position, and the master is not even asked.
    z.write_config(&daemon_config(port, &["--ready", "--serve"], "count = 0"));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("worker.count: must be between 1 and 4096"),
        "{}",
        stderr(&o)
    );
    assert_eq!(status(&z)["generation"], 2);

    z.write_config(&daemon_config(port, &["--ready", "--serve"], ""));
    stop(&z);
}

#[test]
fn if_generation_guards_and_concurrent_reloads_coalesce() {
    let port = free_port();
    let z = Zdd::new(&daemon_config(port, &["--ready-after", "300", "--serve"], ""));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let o = zdd(&z, &["reload", "--if-generation", "5"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("generation 5 is not serving (generation 1 is)"),
        "{}",
        stderr(&o)
    );
    assert_eq!(status(&z)["generation"], 1);

    // Two scripts that both saw generation 1 ask for one reload from it: one reload happens.
    let children: Vec<_> = (0..2)
        .map(|_| {
            z.command(&["reload", "--if-generation", "1"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    }
    assert_eq!(status(&z)["generation"], 2);

    // Plain reloads while one is under way coalesce into one more: both callers get an answer.
    let children: Vec<_> = (0..4)
        .map(|_| {
            z.command(&["reload"])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    }
    let g = status(&z)["generation"].as_u64().unwrap();
    assert!((3..=4).contains(&g), "4 concurrent reloads made generation {g}");
    stop(&z);
}

#[test]
fn stop_timeout_and_not_running_exit_codes() {
    let port = free_port();
    let z = Zdd::new(
        &daemon_config(port, &["--ready", "--ignore-term"], "")
            .replace("stop_timeout = \"10s\"", "stop_timeout = \"1h\""),
    );
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let pid = master_pid(&z);
    let o = zdd(&z, &["stop", "--timeout", "500ms"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("the master is still running at the timeout (500ms)"),
        "{}",
        stderr(&o)
    );
    assert!(alive(pid));
    // A second stop signal kills at once.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    wait_for("master gone", DEADLINE, || (!alive(pid)).then_some(()));
    z.assert_clean();

    // Not running: 3, with no socket, and with a stale pid file.
    for cmd in [&["status"][..], &["reload"], &["stop"], &["reopen-logs"]] {
        let o = zdd(&z, cmd);
        assert_eq!(o.status.code(), Some(3), "{cmd:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("master not running (no control socket at"),
            "{}",
            stderr(&o)
        );
    }
    std::fs::write(z.path("run/app.pid"), "999999\n").unwrap();
    let o = zdd(&z, &["status"]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("stale pid file"), "{}", stderr(&o));
}

#[test]
fn control_socket_refuses_other_users() {
    if !nix::unistd::Uid::effective().is_root() {
        missing(
            "control_socket_refuses_other_users",
            "needs root to run a client as another uid",
        );
        return;
    }
    let port = free_port();
    let z = Zdd::new(&daemon_config(port, &["--ready"], ""));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let sock = z.path("run/app.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    // Let "nobody" reach the config and the socket's directory.
    for p in [z.dir.path().to_path_buf(), z.path("run")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&z.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |z: &Zdd| {
        use std::os::unix::process::CommandExt;
        z.command(&["status"]).uid(65534).gid(65534).output().unwrap()
    };
    // The file mode keeps it out.
    let o = as_nobody(&z);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("permission denied (EACCES)"), "{}", stderr(&o));
    // Even through an open file mode, SO_PEERCRED keeps it out.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = as_nobody(&z);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("permission denied: uid 65534 may not control this master"),
        "{}",
        stderr(&o)
    );
    assert_eq!(status(&z)["generation"], 1);
    stop(&z);
}

fn raw_request(sock: &std::path::Path, bytes: &[u8]) -> Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

#[test]
fn garbage_on_the_control_socket_never_disturbs_a_reload() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let z = Zdd::new(&daemon_config(port, &["--ready-after", "400", "--serve"], ""));
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let sock = z.path("run/app.sock");
    // A half-written request that never completes, held open throughout.
    let mut half = UnixStream::connect(&sock).unwrap();
    half.write_all(br#"{"cmd":"rel"#).unwrap();
    let reload = z
        .command(&["reload"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for bad in [
        &b"garbage\n"[..],
        b"{}\n",
        b"{\"cmd\":\"reload\",\"if_generation\":\"x\"}\n",
        b"\xff\xfe\n",
        b"[1,2,3]\n",
    ] {
        let r = raw_request(&sock, bad);
        assert_eq!(r["type"], "result");
        assert_eq!(r["ok"], false);
        assert!(r["message"].as_str().unwrap().starts_with("malformed request"), "{r}");
    }
    let big = vec![b'x'; 70 * 1024];
    let r = raw_request(&sock, &big);
    assert!(r["message"].as_str().unwrap().contains("longer than"), "{r}");
    // Connect and hang up without a word.
    drop(UnixStream::connect(&sock).unwrap());
    let o = reload.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    ask_gen(addr, 2);
    assert_eq!(status(&z)["generation"], 2);
    // The half-written request times out with an error, and the master is fine.
    half.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut line = String::new();
    BufReader::new(&half).read_line(&mut line).unwrap();
    assert!(line.contains("request timed out"), "{line}");
    stop(&z);
}

#[test]
fn reopen_logs_loses_no_line() {
    let port = free_port();
    let z = Zdd::new(
        &daemon_config(port, &["--ready", "--tick", "2"], "").replace("log_format = \"json\"", "log_format = \"text\""),
    );
    assert_eq!(zdd(&z, &["start"]).status.code(), Some(0));
    let count_ticks = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default().matches(" tick ").count();
    wait_for("some ticks", DEADLINE, || (count_ticks(&z.log) > 20).then_some(()));
    std::fs::rename(&z.log, z.path("zdd.log.1")).unwrap();
    let o = zdd(&z, &["reopen-logs"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    wait_for("ticks in the new file", DEADLINE, || {
        (count_ticks(&z.log) > 20).then_some(())
    });
    // SIGUSR1 does the same.
    std::fs::rename(&z.log, z.path("zdd.log.2")).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(master_pid(&z)), Signal::SIGUSR1).unwrap();
    wait_for("ticks in the newest file", DEADLINE, || {
        (count_ticks(&z.log) > 20).then_some(())
    });
    stop(&z);
    let mut all = String::new();
    for name in ["zdd.log.1", "zdd.log.2", "zdd.log"] {
        all.push_str(&std::fs::read_to_string(z.path(name)).unwrap());
    }
    let ticks: Vec<u64> = all
        .lines()
        .filter_map(|l| l.split(" INFO tick ").nth(1))
        .map(|rest| rest.split(',').next().unwrap().trim().parse().unwrap())
        .collect();
    let last = *ticks.last().unwrap();
    assert_eq!(
        ticks,
        (1..=last).collect::<Vec<_>>(),
        "ticks lost or reordered across reopen"
    );
    assert!(all.contains(&format!("stopping after tick {last}")));
}

#[test]
fn completions_and_man_page() {
    let o = std::process::Command::new(zdd_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    assert!(text.contains("_zdd()") && text.contains("reopen-logs"), "{text}");
    let o = std::process::Command::new(zdd_bin()).arg("man").output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    assert!(text.contains(".TH zdd") && text.contains("reload"), "{text}");
    // Every page zdd(1) refers to exists: `zdd man CMD` prints it.
    let refs: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("zdd\\-"))
        .filter_map(|l| l.strip_suffix("(1)"))
        .map(|c| c.replace("\\-", "-"))
        .collect();
    assert!(refs.contains(&"start".to_string()), "{text}");
    assert!(!refs.contains(&"help".to_string()), "zdd-help(1) is no page: {text}");
    for cmd in &refs {
        let o = std::process::Command::new(zdd_bin())
            .args(["man", cmd])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(0), "zdd man {cmd}: {}", stderr(&o));
        let page = stdout(&o);
        assert!(page.contains(&format!(".TH zdd-{cmd}")), "{page}");
    }
    let o = std::process::Command::new(zdd_bin())
        .args(["man", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no command \"frobnicate\""), "{}", stderr(&o));
    // --help names every stop signal the master handles.
    let o = std::process::Command::new(zdd_bin()).arg("--help").output().unwrap();
    assert!(stdout(&o).contains("TERM/INT/QUIT graceful stop"), "{}", stdout(&o));
    let o = std::process::Command::new(zdd_bin())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn reload_with_another_config_file_than_the_masters_is_refused() {
    let port = free_port();
    let mut z = Zdd::spawn(&daemon_config(port, &["--ready", "--serve"], ""));
    z.wait_ready();
    // Another file that names the same control socket: the master would re-read its own file.
    let other = z.path("other.toml");
    std::fs::copy(&z.config, &other).unwrap();
    let reload = |config: &std::path::Path| {
        std::process::Command::new(zdd_bin())
            .args(["reload", "-c"])
            .arg(config)
            .output()
            .unwrap()
    };
    let o = reload(&other);
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    let ours = z.config.canonicalize().unwrap();
    assert!(
        err.contains(&format!("this master runs {}", ours.display())) && err.contains("other.toml"),
        "{err}"
    );
    assert!(z.records_with("reloading").is_empty(), "the master reloaded anyway");
    // Its own file, named another way (relative, through a symlink), is the same file.
    std::os::unix::fs::symlink(&z.config, z.path("link.toml")).unwrap();
    let o = reload(&z.path("link.toml"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    z.stop();
}

#[test]
fn status_during_a_crash_loop_shows_the_slot_waiting_to_restart_and_why() {
    let port = free_port();
    let mut z = Zdd::spawn(&daemon_config(port, &["--ready", "--exit-after", "100", "3"], ""));
    z.wait_ready();
    // Between two crashes the slot has no worker: status says it restarts, and why.
    let s = wait_for("a slot waiting out its back-off", DEADLINE, || {
        let s = status(&z);
        (!s["restarting"].as_array().unwrap().is_empty() && s["workers"].as_array().unwrap().is_empty()).then_some(s)
    });
    let r = &s["restarting"][0];
    assert_eq!(r["slot"], 0);
    assert_eq!(r["generation"], 1);
    assert!(
        r["last_exit"].as_str().unwrap().ends_with("exited with status 3"),
        "{s}"
    );
    let text = wait_for("the text form", DEADLINE, || {
        let t = stdout(&zdd(&z, &["status"]));
        t.contains("restarting in").then_some(t)
    });
    assert!(
        text.contains("(last: worker pid") && text.contains("exited with status 3)"),
        "{text}"
    );
    z.stop();
}

#[test]
fn a_daemon_whose_log_is_stderr_logs_to_a_file_beside_its_control_socket_and_says_where() {
    let port = free_port();
    // No [master] log: stderr, which is a pipe here, not a file the daemon could keep.
    let z = Zdd::new(&format!(
        "[master]\ncontrol_socket = \"run/app.sock\"\n\n[worker]\ncommand = {}\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&["{fixture}", "--ready", "--serve", "--echo", "hello from the worker"])
    ));
    let o = zdd(&z, &["start"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let log = z.path("run/app.log");
    let out = stdout(&o);
    assert!(
        out.contains("; log: ") && out.trim_end().ends_with("run/app.log"),
        "{out}"
    );
    let text = wait_for("the worker's line in the log file", DEADLINE, || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("hello from the worker"))
    });
    assert!(text.contains("ready"), "{text}");
    let s = status(&z);
    assert!(s["log_file"].as_str().unwrap().ends_with("run/app.log"), "{s}");
    assert!(
        stdout(&zdd(&z, &["status"])).contains("log file "),
        "status names the log file"
    );
    stop(&z);
}
