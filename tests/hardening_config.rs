//! Issue 10, the config and trust side: every input `start` would choke on is refused by
//! `check` first, with its position; no duration can overflow a deadline; the runtime directory
//! and the files in it are trusted only when they are ours; a second `start` never touches a
//! live master's sockets; a zombie master is not "running"; systemd fds that are not listening
//! sockets are never adopted. Each test drives the real binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};

use common::*;
use nix::sys::signal::Signal;

fn listen(port: u16) -> String {
    format!("[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n")
}

/// A config whose worker serves the port (and says READY=1).
fn serving(port: u16) -> String {
    format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\n{}",
        listen(port)
    )
}

fn run(z: &Zdd, args: &[&str]) -> Output {
    bounded(z.command(args))
}

/// Run to completion, its output collected in files; a command still running at the deadline
/// (a `start --foreground` that should have failed and serves instead) is killed, so that a
/// regression fails the test instead of hanging it.
fn bounded(mut cmd: Command) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {DEADLINE:?}; stderr: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap(),
        stderr: std::fs::read(&err).unwrap(),
    }
}

/// `zdd check` and `zdd start --foreground` both refuse the config with exit 2 and a message
/// holding every piece of `needles`; start leaves no runtime file behind. Returns check's stderr.
fn both_refuse(z: &Zdd, needles: &[&str]) -> String {
    let check = run(z, &["check"]);
    let e = stderr(&check);
    assert_eq!(
        check.status.code(),
        Some(2),
        "check should refuse; stdout {:?}, stderr {e}",
        stdout(&check)
    );
    for n in needles {
        assert!(e.contains(n), "check: missing {n:?} in: {e}");
    }
    let start = run(z, &["start", "--foreground"]);
    let e2 = stderr(&start);
    assert_eq!(start.status.code(), Some(2), "start should refuse: {e2}");
    for n in needles {
        assert!(e2.contains(n), "start: missing {n:?} in: {e2}");
    }
    assert!(!z.path("run").exists(), "start left run/ behind");
    e
}

// --- Item 1: bounded durations --------------------------------------------------------------

#[test]
fn check_refuses_durations_past_the_maximum_with_their_position() {
    // The header Zdd writes is 4 lines: the [worker] table starts on line 5.
    let cases = [
        (
            "start_timeout = \"500000000000y\"",
            "7:17: worker.start_timeout: \"500000000000y\" is longer than the maximum of 24h",
        ),
        (
            "stop_timeout = \"500000000000y\"",
            "7:16: worker.stop_timeout: \"500000000000y\" is longer than the maximum of 24h",
        ),
        (
            "stop_timeout = \"24h 1s\"",
            "7:16: worker.stop_timeout: \"24h 1s\" is longer than the maximum of 24h",
        ),
        (
            "start_timeout = \"0s\"",
            "7:17: worker.start_timeout: must be longer than 0s",
        ),
        (
            "ready = \"delay\"\nready_delay = \"100000000y\"",
            "8:15: worker.ready_delay: \"100000000y\" is longer than the maximum of 24h",
        ),
    ];
    for (line, want) in cases {
        let z = Zdd::new(&format!("[worker]\ncommand = [\"{{fixture}}\"]\n{line}\n"));
        both_refuse(&z, &[&format!("app.toml:{want}")]);
    }
    // The maximum itself is accepted.
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\"]\nstart_timeout = \"24h\"\nstop_timeout = \"24h\"\n");
    let o = run(&z, &["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn reload_to_a_huge_timeout_is_refused_and_the_master_keeps_serving() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let body = |extra: &str| {
        format!(
            "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\n{extra}\n{}",
            listen(port)
        )
    };
    let mut z = Zdd::spawn(&body(""));
    z.wait_ready();
    let first = ask_gen(addr, 1);
    for extra in ["start_timeout = \"500000000000y\"", "stop_timeout = \"500000000000y\""] {
        z.write_config(&body(extra));
        z.signal(Signal::SIGHUP);
        let key = extra.split(' ').next().unwrap();
        let r = z.wait_msg_containing(&format!("worker.{key}: \"500000000000y\" is longer than the maximum"));
        assert!(
            r["msg"]
                .as_str()
                .unwrap()
                .starts_with("reload failed: invalid config; nothing changed"),
            "{r}"
        );
        assert!(z.exited().is_none(), "the master died; log:\n{}", z.log_text());
        assert_eq!(ask(addr).unwrap(), (first, 1));
    }
    z.write_config(&body(""));
    z.stop();
}

// --- Item 2: check refuses what start refuses -----------------------------------------------

#[test]
fn check_and_start_refuse_a_missing_or_unusable_command() {
    let z = Zdd::new("[worker]\ncommand = [\"/nonexistent/server\", \"--flag\"]\n");
    both_refuse(
        &z,
        &["app.toml:6:11: worker.command: /nonexistent/server: no such file or directory (ENOENT)"],
    );

    let z = Zdd::new("[worker]\ncommand = [\"no-such-server-zdd\"]\nenv = { PATH = \"/usr/bin:/bin\" }\n");
    both_refuse(
        &z,
        &["worker.command: \"no-such-server-zdd\" not found in PATH (/usr/bin:/bin)"],
    );

    let z = Zdd::new("[worker]\ncommand = [\"{dir}/server.sh\"]\n");
    std::fs::write(z.path("server.sh"), "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(z.path("server.sh"), std::fs::Permissions::from_mode(0o644)).unwrap();
    both_refuse(&z, &["worker.command: ", "server.sh is not executable (mode 0644)"]);

    let z = Zdd::new("[worker]\ncommand = [\"{dir}\"]\n");
    both_refuse(&z, &["worker.command: ", "is not a regular file"]);

    // A relative program is found from the worker's cwd, as exec will find it.
    let z = Zdd::new("[worker]\ncommand = [\"./bin/server\"]\ncwd = \"{dir}\"\n");
    std::fs::create_dir(z.path("bin")).unwrap();
    std::os::unix::fs::symlink(fixture(), z.path("bin/server")).unwrap();
    let o = run(&z, &["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn check_and_start_refuse_a_missing_cwd_and_a_log_that_is_a_directory() {
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\"]\ncwd = \"{dir}/gone\"\n");
    both_refuse(
        &z,
        &[
            "app.toml:7:7: worker.cwd: ",
            "/gone: no such file or directory (ENOENT)",
        ],
    );

    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\"]\ncwd = \"{dir}/app.toml\"\n");
    both_refuse(&z, &["worker.cwd: ", "app.toml is not a directory"]);

    let z =
        Zdd::new("[master]\nlog = \"{dir}\"\ncontrol_socket = \"run/app.sock\"\n[worker]\ncommand = [\"{fixture}\"]\n");
    both_refuse(
        &z,
        &["app.toml:2:7: master.log: ", " is a directory; name a file in it"],
    );

    let z = Zdd::new(
        "[master]\nlog = \"{dir}/no/such/dir/zdd.log\"\ncontrol_socket = \"run/app.sock\"\n[worker]\ncommand = [\"{fixture}\"]\n",
    );
    both_refuse(
        &z,
        &[
            "master.log: directory ",
            "/no/such/dir: no such file or directory (ENOENT)",
        ],
    );
}

#[test]
fn check_and_start_refuse_an_rlimit_the_worker_cannot_get() {
    // Above the kernel's maximum: no process may have that many open files.
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\"]\n[rlimits]\nnofile = 1099511627776\n");
    both_refuse(
        &z,
        &["app.toml:8:10: rlimits.nofile: 1099511627776 is above the kernel's maximum of open files per process (fs.nr_open = "],
    );

    // Above zdd's own hard limit, for a worker that drops privileges before setting it (as
    // root only a root worker may raise it; as another user nobody may).
    let z = Zdd::new(
        "[worker]\ncommand = [\"{fixture}\"]\nuser = \"nobody\"\n[rlimits]\nnofile = { soft = 1024, hard = 8192 }\n",
    );
    let lowered = |args: &[&str]| {
        let mut c = z.command(args);
        let zdd = c.get_program().to_owned();
        let rest: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
        c = Command::new("/bin/sh");
        c.arg("-c")
            .arg("ulimit -S -n 1024 && ulimit -H -n 4096 && exec \"$@\"")
            .arg("sh")
            .arg(zdd)
            .args(rest)
            .env("FIXTURE_REPORT_DIR", z.reports());
        bounded(c)
    };
    for args in [&["check"][..], &["start", "--foreground"][..]] {
        let o = lowered(args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {e}");
        assert!(
            e.contains("app.toml:9:10: rlimits.nofile: hard limit 8192 is above zdd's own hard limit 4096"),
            "{args:?}: {e}"
        );
    }
    assert!(!z.path("run").exists());
}

#[test]
fn check_and_start_refuse_a_wildcard_beside_a_specific_address_on_one_port() {
    let port = free_port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\"]\n[[listen]]\nname = \"any\"\ntcp = \"0.0.0.0:{port}\"\n\
         [[listen]]\nname = \"local\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    both_refuse(
        &z,
        &[&format!(
            "app.toml:10:1: listen: address 127.0.0.1:{port} overlaps 0.0.0.0:{port} of listener \"any\""
        )],
    );
    // Another port, or port 0, is fine.
    z.write_config(&format!(
        "[worker]\ncommand = [\"{{fixture}}\"]\n[[listen]]\nname = \"any\"\ntcp = \"0.0.0.0:{port}\"\n\
         [[listen]]\nname = \"local\"\ntcp = \"127.0.0.1:{}\"\n[[listen]]\nname = \"z\"\ntcp = \"0.0.0.0:0\"\n\
         [[listen]]\nname = \"z2\"\ntcp = \"127.0.0.1:0\"\n",
        port + 1
    ));
    let o = run(&z, &["check"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn a_huge_argv_is_refused_without_being_echoed() {
    let big = "x".repeat(2 * 1024 * 1024);
    let z = Zdd::new(&format!("[worker]\ncommand = [\"{{fixture}}\", \"{big}\"]\n"));
    let e = both_refuse(
        &z,
        &["app.toml:6:11: worker.command: argument 1 is 2097152 bytes long; exec takes at most 131071 bytes per argument"],
    );
    assert!(e.len() < 2048, "the error echoes the input: {} bytes", e.len());

    // Many arguments, each acceptable, that together pass the bound.
    let many: Vec<String> = std::iter::once("{fixture}".to_string())
        .chain((0..20).map(|_| "y".repeat(100_000)))
        .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let z = Zdd::new(&format!("[worker]\ncommand = {}\n", toml_list(&many)));
    let e = both_refuse(
        &z,
        &[
            "worker.command: the command and env take ",
            "at most 1048576 (1 MiB) are accepted",
        ],
    );
    assert!(e.len() < 2048, "the error echoes the input: {} bytes", e.len());

    // A long value in a place that quotes it is cut short too.
    let z = Zdd::new(&format!("[worker]\ncommand = [\"{{fixture}}\"]\nrestart = \"{big}\"\n"));
    let e = both_refuse(
        &z,
        &[
            "worker.restart: expected \"always\", \"on-failure\" or \"never\", got \"xxx",
            "(2097152 bytes)",
        ],
    );
    assert!(e.len() < 2048, "the error echoes the input: {} bytes", e.len());
}

#[test]
fn reload_to_a_missing_command_fails_and_the_old_generation_serves() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut z = Zdd::spawn(&serving(port));
    z.wait_ready();
    let first = ask_gen(addr, 1);
    z.write_config(&format!(
        "[worker]\ncommand = [\"/nonexistent/server\"]\n{}",
        listen(port)
    ));
    // The CLI refuses before asking the master, with the position.
    let o = run(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("app.toml:6:11: worker.command: /nonexistent/server: no such file or directory (ENOENT)"),
        "{}",
        stderr(&o)
    );
    // The master refuses it the same way when asked by signal, and keeps serving.
    z.signal(Signal::SIGHUP);
    let r = z.wait_msg_containing("worker.command: /nonexistent/server: no such file or directory (ENOENT)");
    assert!(
        r["msg"]
            .as_str()
            .unwrap()
            .starts_with("reload failed: invalid config; nothing changed"),
        "{r}"
    );
    assert_eq!(ask(addr).unwrap(), (first, 1));
    assert_eq!(z.started_pids().len(), 1, "no worker may have been started");
    z.write_config(&serving(port));
    z.stop();
}

// --- Item 12: trust in the runtime directory and its files ----------------------------------

fn shared_config(dir: &str) -> String {
    format!(
        "[master]\nlog_format = \"json\"\ncontrol_socket = \"{dir}/app.sock\"\n[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n"
    )
}

#[test]
fn a_runtime_dir_writable_by_others_is_refused() {
    for mode in [0o777, 0o1777, 0o770] {
        let z = Zdd::new(&shared_config("{dir}/shared"));
        std::fs::create_dir(z.path("shared")).unwrap();
        std::fs::set_permissions(z.path("shared"), std::fs::Permissions::from_mode(mode)).unwrap();
        let want = format!(
            "runtime directory {} is writable by others (owner uid 0 (root), mode {mode:04o}); refusing to use it",
            z.path("shared").display()
        );
        let me = nix::unistd::Uid::effective();
        let want = if me.is_root() {
            want
        } else {
            want.replace("uid 0 (root)", &format!("uid {me}"))
        };
        for args in [&["check"][..], &["start", "--foreground"][..]] {
            let o = run(&z, args);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
            assert!(stderr(&o).contains(&want), "{args:?}: {}", stderr(&o));
            assert!(stderr(&o).contains("master.control_socket: "), "{}", stderr(&o));
        }
        let left: Vec<_> = std::fs::read_dir(z.path("shared")).unwrap().collect();
        assert!(left.is_empty(), "created files in an untrusted directory: {left:?}");
    }
}

#[test]
fn a_runtime_dir_owned_by_another_user_is_refused() {
    if !nix::unistd::Uid::effective().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root (chown) and CI is set"
        );
        missing(
            "a_runtime_dir_owned_by_another_user_is_refused",
            "needs root to chown a directory",
        );
        return;
    }
    let z = Zdd::new(&shared_config("{dir}/theirs"));
    std::fs::create_dir(z.path("theirs")).unwrap();
    std::fs::set_permissions(z.path("theirs"), std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(&z.path("theirs"), Some(65534.into()), Some(65534.into())).unwrap();
    let want = format!(
        "runtime directory {} is owned by uid 65534 (nobody) (mode 0755), not by root or uid 0 (root); refusing to use it",
        z.path("theirs").display()
    );
    for args in [&["check"][..], &["start", "--foreground"][..]] {
        let o = run(&z, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(&want), "{args:?}: {}", stderr(&o));
    }
    // A symbolic link to it is judged by its target; a link somebody else owns is refused itself.
    let z2 = Zdd::new(&shared_config("{dir}/link"));
    std::os::unix::fs::symlink(z.path("theirs"), z2.path("link")).unwrap();
    let o = run(&z2, &["check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("is owned by uid 65534 (nobody)"), "{}", stderr(&o));
    std::fs::create_dir(z2.path("mine")).unwrap();
    std::fs::remove_file(z2.path("link")).unwrap();
    std::os::unix::fs::symlink(z2.path("mine"), z2.path("link")).unwrap();
    nix::unistd::fchownat(
        None,
        &z2.path("link"),
        Some(65534.into()),
        Some(65534.into()),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
    let o = run(&z2, &["check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("is a symbolic link owned by uid 65534 (nobody), not by root or uid 0 (root)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_symlinked_pid_file_is_refused_and_its_target_untouched() {
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n");
    std::fs::create_dir(z.path("run")).unwrap();
    std::fs::set_permissions(z.path("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(z.path("victim"), "precious\n").unwrap();
    std::os::unix::fs::symlink(z.path("victim"), z.path("run/app.pid")).unwrap();
    let o = run(&z, &["start", "--foreground"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&format!(
            "pid file {}: open: it is a symbolic link; refusing to follow it (ELOOP)",
            z.path("run/app.pid").display()
        )),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(z.path("victim")).unwrap(), "precious\n");
    assert!(std::fs::symlink_metadata(z.path("run/app.pid"))
        .unwrap()
        .file_type()
        .is_symlink());
    let left: Vec<_> = std::fs::read_dir(z.path("run"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("app.pid")],
        "start left files behind"
    );

    // A hard link to somebody's file is refused too.
    std::fs::remove_file(z.path("run/app.pid")).unwrap();
    std::fs::hard_link(z.path("victim"), z.path("run/app.pid")).unwrap();
    let o = run(&z, &["start", "--foreground"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a regular file of its own (2 link(s))"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(z.path("victim")).unwrap(), "precious\n");
}

#[test]
fn socket_files_put_in_place_of_ours_are_not_removed_at_exit() {
    let mut z = Zdd::spawn("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n");
    z.wait_ready();
    // Somebody replaces both socket files while the master runs.
    std::fs::remove_file(z.path("run/app.sock")).unwrap();
    std::fs::write(z.path("run/app.sock"), "not yours").unwrap();
    std::fs::remove_file(z.path("run/app.notify")).unwrap();
    let theirs = std::os::unix::net::UnixDatagram::bind(z.path("run/app.notify")).unwrap();
    z.signal(Signal::SIGTERM);
    assert_eq!(z.wait_exit().code(), Some(0), "{}", z.log_text());
    assert_eq!(std::fs::read_to_string(z.path("run/app.sock")).unwrap(), "not yours");
    assert!(
        z.path("run/app.notify").exists(),
        "the master removed a socket it did not create"
    );
    assert!(!z.path("run/app.pid").exists(), "the master's own pid file is removed");
    drop(theirs);
}

// --- Item 4: a failed second start leaves the running master alone --------------------------

#[test]
fn a_failed_second_start_leaves_the_running_masters_sockets_alone() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut z = Zdd::spawn(&serving(port));
    z.wait_ready();
    ask_gen(addr, 1);
    let sock_id = |p: &str| {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(z.path(p)).unwrap();
        (m.dev(), m.ino())
    };
    let before = (sock_id("run/app.sock"), sock_id("run/app.notify"));
    // The pid file is gone (tmpfiles cleaned it, an operator removed it): the lock proves nothing.
    std::fs::remove_file(z.path("run/app.pid")).unwrap();
    for args in [&["start", "--foreground"][..], &["start"][..]] {
        let o = run(&z, args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(
            e.contains(&format!(
                "already running? notify socket {} is in use by a live process",
                z.path("run/app.notify").display()
            )),
            "{args:?}: {e}"
        );
        assert_eq!((sock_id("run/app.sock"), sock_id("run/app.notify")), before);
        assert!(!z.path("run/app.pid").exists(), "the failed start left its pid file");
    }
    // The first master still answers, reloads and serves.
    let s = status(&z);
    assert_eq!(s["pid"], z.pid());
    let o = run(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("reloaded: generation 2 serving"), "{}", stdout(&o));
    ask_gen(addr, 2);
    z.stop();
}

#[test]
fn a_live_control_socket_is_never_replaced() {
    // Only the control socket is live (another master's, say, sharing the path by mistake).
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n");
    std::fs::create_dir(z.path("run")).unwrap();
    let live = std::os::unix::net::UnixListener::bind(z.path("run/app.sock")).unwrap();
    let o = run(&z, &["start", "--foreground"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains(&format!(
            "already running? control socket {} is in use by a live process; refusing to replace it",
            z.path("run/app.sock").display()
        )),
        "{e}"
    );
    assert!(z.path("run/app.sock").exists());
    assert!(
        !z.path("run/app.notify").exists(),
        "the notify socket it created is removed"
    );
    assert!(!z.path("run/app.pid").exists());
    drop(live);
    // Now stale: replaced.
    let mut z = z;
    z.start();
    z.wait_ready();
    z.stop();
}

// --- Item 5: a zombie master is not running ---------------------------------------------------

#[test]
fn a_zombie_master_is_not_running() {
    let mut z = Zdd::spawn("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n");
    z.wait_ready();
    let pid = z.pid();
    // Killed, and not reaped by its parent (this test): a zombie that `kill(pid, 0)` still finds.
    z.signal(Signal::SIGKILL);
    wait_for("the master to be a zombie", DEADLINE, || (!alive(pid)).then_some(()));
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "not a zombie: already reaped"
    );
    let o = run(&z, &["status"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{e}");
    assert!(
        e.contains("master not running (stale pid file") && e.contains(&format!("names pid {pid}, which is gone")),
        "{e}"
    );
    // Reap it; its workers went with it (parent-death signal).
    z.wait_exit();
    for w in z.started_pids() {
        wait_for(&format!("worker {w} gone"), DEADLINE, || (!alive(w)).then_some(()));
    }
}

// --- Item 6: only listening sockets are adopted from systemd ---------------------------------

#[test]
fn a_listen_fd_that_is_not_a_listening_socket_is_not_adopted() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut z = Zdd::new(&serving(port));
    std::fs::write(z.path("file"), "a regular file").unwrap();
    let log = std::fs::File::create(&z.log).unwrap();
    // sh execs zdd, so $$ is the master's pid: LISTEN_PID names it as systemd would.
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg("export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=http; exec \"$0\" start --foreground -c \"$1\" 3<\"$2\"")
        .arg(zdd_bin())
        .arg(&z.config)
        .arg(z.path("file"))
        .env("FIXTURE_REPORT_DIR", z.reports())
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    z.child = Some(child);
    let r = z.wait_msg_containing("a socket passed by systemd cannot be a listener");
    assert!(
        r["msg"].as_str().unwrap().contains("LISTEN_FDS: fd 3 (http) is not a socket: getsockopt SO_TYPE: socket operation on non-socket (ENOTSOCK); closed"),
        "{r}"
    );
    z.wait_ready();
    // The port is bound by the master itself and served.
    assert_eq!(ask_gen(addr, 1), z.started_pids()[0]);
    assert!(z.records_with("adopted socket from systemd").is_empty());
    z.stop();
    assert_eq!(std::fs::read_to_string(z.path("file")).unwrap(), "a regular file");
}
