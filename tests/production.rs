//! Production grade: privilege drop, limits, worker pools, the draining cap, the master dying
//! uncleanly, PID 1, and the einhorn / Server::Starter compatibility variables.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use nix::sys::signal::Signal;

fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Let an unprivileged worker write its report into the temp dir.
fn open_up(z: &Zdd) {
    std::fs::set_permissions(z.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(z.reports(), std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// A privileged port nobody uses, to prove a root master binds what an unprivileged worker
/// serves.
fn free_privileged_port() -> u16 {
    (700..1000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 1024")
}

#[test]
fn workers_drop_privileges_irreversibly_and_serve_a_privileged_port() {
    if !is_root() {
        missing(
            "workers_drop_privileges_irreversibly_and_serve_a_privileged_port",
            "needs root",
        );
        return;
    }
    let port = free_privileged_port();
    let mut z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\nuser = \"nobody\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    open_up(&z);
    z.start();
    z.wait_ready();
    let pid = ask(format!("127.0.0.1:{port}").parse().unwrap()).unwrap().0;
    let r = z.report(pid);
    assert_eq!(r["uid"], "65534\t65534\t65534\t65534");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let gid = nobody.gid.as_raw();
    assert_eq!(r["gid"], format!("{gid}\t{gid}\t{gid}\t{gid}"));
    let expected: Vec<String> = nix::unistd::getgrouplist(&std::ffi::CString::new("nobody").unwrap(), nobody.gid)
        .unwrap()
        .iter()
        .map(|g| g.as_raw().to_string())
        .collect();
    let groups: Vec<&str> = r["groups"].as_str().unwrap().split_whitespace().collect();
    assert_eq!(groups, expected, "supplementary groups are initgroups(nobody)");
    assert_eq!(r["regain_root"], false);
    z.stop();
}

#[test]
fn privilege_drop_needs_a_root_master() {
    if !is_root() {
        missing(
            "privilege_drop_needs_a_root_master",
            "needs root to become another user",
        );
        return;
    }
    // Run the master itself as nobody, asking for another user's workers.
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\nuser = \"daemon\"\n");
    open_up(&z);
    std::fs::create_dir_all(z.path("run")).unwrap();
    // The runtime directory must be the master's own (nobody's), writable by no one else.
    std::os::unix::fs::chown(z.path("run"), Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&z.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    use std::os::unix::process::CommandExt;
    let o = z
        .command(&["start", "--foreground"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("running workers as daemon needs a master running as root (it runs as uid 65534)"),
        "{e}"
    );
    z.assert_clean();
}

#[test]
fn rlimits_and_umask_apply_to_workers() {
    let mut z = Zdd::spawn(
        "[worker]\ncommand = [\"{fixture}\", \"--ready\"]\numask = \"0027\"\n\
         [rlimits]\nnofile = { soft = 1000, hard = 2000 }\ncore = 0\n",
    );
    z.wait_ready();
    let r = z.report(z.started_pids()[0]);
    assert_eq!(r["umask"], 0o027);
    let limits: Vec<&str> = r["limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert!(limits.contains(&"Max open files 1000 2000 files"), "{limits:?}");
    assert!(limits.contains(&"Max core file size 0 0 bytes"), "{limits:?}");
    z.stop();
}

#[test]
fn impossible_rlimit_is_a_clear_start_error() {
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n[rlimits]\nnofile = 1099511627776\n");
    let o = z.command(&["start", "--foreground"]).output().unwrap();
    // Found by validation, like `zdd check` finds it, with the position.
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains(
            "app.toml:8:10: rlimits.nofile: 1099511627776 is above the kernel's maximum of open files per process"
        ),
        "{e}"
    );
    z.assert_clean();
}

#[test]
fn crash_of_one_worker_restarts_only_that_one() {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\ncount = 3\n\n[[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    let pids = z.started_pids();
    assert_eq!(pids.len(), 3);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[1]), Signal::SIGKILL).unwrap();
    z.wait_msg("worker exited unexpectedly; restarting");
    z.wait_msg_n("worker ready", 4);
    let now = z.started_pids();
    assert_eq!(now.len(), 4);
    assert!(alive(pids[0]) && alive(pids[2]), "the other workers must be untouched");
    let restarted = z.records_with("worker started").last().unwrap().clone();
    assert_eq!(restarted["slot"], 1);
    assert_eq!(restarted["generation"], 1);
    z.stop();
}

#[test]
fn max_draining_kills_the_oldest_generation() {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[master]\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\nmax_draining = 1\n\
         [worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--ignore-term\"]\nstop_timeout = \"1h\"\n\n\
         [[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    z.reload(1);
    let pids = z.started_pids();
    assert!(alive(pids[0]), "one draining generation is allowed");
    z.reload(2);
    let killed = z.wait_msg("too many generations draining: killing the oldest");
    assert_eq!(killed["generation"], 1);
    wait_for("generation 1 killed", DEADLINE, || (!alive(pids[0])).then_some(()));
    assert!(alive(pids[1]), "generation 2 keeps draining");
    z.signal(Signal::SIGTERM);
    z.wait_msg("stopping");
    z.signal(Signal::SIGTERM);
    assert_eq!(z.wait_exit().code(), Some(0));
    z.assert_clean();
}

#[test]
fn workers_get_sigterm_when_the_master_is_killed_and_a_new_master_can_bind() {
    let port = free_port();
    let body = format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\n\n[[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    );
    let mut z = Zdd::spawn(&body);
    z.wait_ready();
    let worker = z.started_pids()[0];
    z.signal(Signal::SIGKILL);
    z.wait_exit();
    wait_for("the orphaned worker to exit", DEADLINE, || {
        (!alive(worker)).then_some(())
    });
    // The pid file is unlocked now; a new master takes over and binds the same port.
    z.start();
    z.wait_ready();
    assert_eq!(ask(format!("127.0.0.1:{port}").parse().unwrap()).unwrap().1, 1);
    z.stop();
}

#[test]
fn orphans_of_workers_are_reaped() {
    let mut z = Zdd::spawn(
        "[worker]\ncommand = [\"/bin/sh\", \"-c\", \"(sleep 0.3 & echo $! > {dir}/orphan); exec {fixture} --ready\"]\n",
    );
    z.wait_ready();
    let orphan: i32 = wait_for("orphan pid", DEADLINE, || {
        std::fs::read_to_string(z.path("orphan"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    });
    // Reparented to the master (a child subreaper), then reaped: it vanishes, no zombie stays.
    wait_for("the orphan reaped", DEADLINE, || {
        (!std::path::Path::new(&format!("/proc/{orphan}")).exists()).then_some(())
    });
    z.stop();
}

#[test]
fn as_pid_1_it_reaps_and_stops_on_term() {
    if !is_root() || std::process::Command::new("unshare").arg("--version").output().is_err() {
        missing(
            "as_pid_1_it_reaps_and_stops_on_term",
            "needs root and unshare (util-linux)",
        );
        return;
    }
    let z = Zdd::new("[worker]\ncommand = [\"/bin/sh\", \"-c\", \"(sleep 0.2 &); exec {fixture} --ready\"]\n");
    let log = std::fs::File::create(&z.log).unwrap();
    let mut child = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(zdd_bin())
        .args(["start", "--foreground", "-c"])
        .arg(&z.config)
        .env("FIXTURE_REPORT_DIR", z.reports())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for("ready", DEADLINE, || {
        z.log_text().contains("\"msg\":\"ready\"").then_some(())
    });
    // Inside its namespace the master is pid 1.
    assert_eq!(std::fs::read_to_string(z.path("run/app.pid")).unwrap().trim(), "1");
    assert!(z.log_text().contains("\"pid\":1,"), "{}", z.log_text());
    // The worker's orphan (the sleep) was re-parented to pid 1, zdd, which reaps it.
    wait_for("the orphan reaped by pid 1", DEADLINE, || {
        z.log_text().contains("\"msg\":\"reaped orphan\"").then_some(())
    });
    // Its host pid: the child of unshare.
    let children = std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id())).unwrap();
    let host_pid: i32 = children.split_whitespace().next().unwrap().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(host_pid), Signal::SIGTERM).unwrap();
    let st = wait_for("unshare to exit", DEADLINE, || child.try_wait().unwrap());
    assert_eq!(st.code(), Some(0), "{}", z.log_text());
    assert!(z.log_text().contains("\"msg\":\"stopped\""), "{}", z.log_text());
}

#[test]
fn einhorn_and_server_starter_servers_run_unchanged() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    for mode in ["einhorn", "server_starter"] {
        let port = free_port();
        let mut z = Zdd::spawn(&format!(
            "[worker]\ncommand = [\"python3\", \"{fixtures}/compat_server.py\", \"{mode}\"]\ncompat = [\"{mode}\"]\n\n\
             [[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
        ));
        z.wait_ready();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        assert_eq!(ask(addr).unwrap().1, 1);
        z.reload(1);
        ask_gen(addr, 2);
        z.stop();
    }
}

#[test]
fn compat_variables_name_the_sockets() {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\ncompat = [\"einhorn\", \"server_starter\"]\n\n\
         [[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n[[listen]]\nname = \"u\"\nunix = \"{{dir}}/u.sock\"\n"
    ));
    z.wait_ready();
    let r = z.report(z.started_pids()[0]);
    let env = &r["env"];
    assert_eq!(env["EINHORN_FD_COUNT"], "2");
    assert_eq!(env["EINHORN_FD_0"], "3");
    assert_eq!(env["EINHORN_FD_1"], "4");
    let dir = z.dir.path().canonicalize().unwrap();
    assert_eq!(
        env["SERVER_STARTER_PORT"],
        format!("127.0.0.1:{port}=3;{}/u.sock=4", dir.display())
    );
    z.stop();
}
