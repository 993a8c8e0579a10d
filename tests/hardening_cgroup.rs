//! Issue 10, "never down": nothing a worker starts outlives it (a cgroup per worker), a crashed
//! master's workers cannot keep the port past the next start, an EADDRINUSE names the process
//! holding the port, and a child stuck before exec cannot freeze the master.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use nix::sys::signal::Signal;

/// Kills leftover processes of a failed test, so that nothing outlives it.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            if after.split(' ').next()? != "cgroup2" {
                return None;
            }
            Some(PathBuf::from(before.split(' ').nth(4)?))
        })
}

/// The directory of `pid`'s cgroup v2.
fn cgroup_dir_of(pid: i32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(cgroup2_mount()?.join(rel.trim_start_matches('/')))
}

/// The master's tree of worker cgroups, `zdd-<pid>-<random>` in its own cgroup.
fn tree_of(master: i32) -> PathBuf {
    let dir = cgroup_dir_of(master).unwrap();
    let prefix = format!("zdd-{master}-");
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
        .unwrap_or_else(|| panic!("no {prefix}* cgroup in {}", dir.display()))
        .path()
}

/// Whether this test run can create cgroups (root with cgroup2 mounted); if not, say so loudly,
/// and fail under CI, where every test must run.
fn cgroups_usable(test: &str) -> bool {
    let ok = nix::unistd::geteuid().is_root() && cgroup2_mount().is_some();
    if !ok {
        let why = "needs root and a cgroup2 mount to create cgroups";
        missing(test, why);
    }
    ok
}

/// Pids whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// A worker that leaves an escapee behind: a double fork with `setsid` (setsid -f forks, the
/// child calls setsid and runs a shell that forks `sleep`), which inherits the listening fd 3.
/// The escapee's command line carries `{dir}/escapee`, so the test can find it.
fn escaping_worker(port: u16) -> String {
    format!(
        "[worker]\ncommand = [\"/bin/sh\", \"-c\", \"setsid -f /bin/sh -c 'sleep 100000; :' {{dir}}/escapee; exec {{fixture}} --ready --serve\"]\n\
         stop_timeout = \"10s\"\n\n[[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    )
}

#[test]
fn escaped_grandchildren_end_with_their_worker_and_free_the_port_at_stop() {
    if !cgroups_usable("escaped_grandchildren_end_with_their_worker_and_free_the_port_at_stop") {
        return;
    }
    let port = free_port();
    let mut z = Zdd::spawn(&escaping_worker(port));
    let marker = z.path("escapee").display().to_string();
    z.wait_ready();
    let first = z.started_pids()[0];
    let escapees = wait_for("the first escapee", DEADLINE, || {
        let p = processes_with(&marker);
        (!p.is_empty()).then_some(p)
    });
    let mut guard = KillOnDrop(escapees);
    assert_ne!(
        nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(guard.0[0]))).unwrap(),
        nix::unistd::Pid::from_raw(first),
        "the escapee left the worker's process group"
    );
    for n in 1..=3 {
        z.reload(n);
        // Each old worker is stopped and reaped; its escapee must go with it.
        wait_for(&format!("one escapee left after reload {n}"), DEADLINE, || {
            let p = processes_with(&marker);
            guard.0.extend(&p);
            (p.len() == 1).then_some(())
        });
    }
    let tree = tree_of(z.pid());
    // The old workers' cgroups were removed once empty, while the master runs.
    wait_for("one worker cgroup left", DEADLINE, || {
        let left: Vec<_> = std::fs::read_dir(&tree)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .collect();
        (left.len() == 1).then_some(())
    });
    let current = *z.started_pids().last().unwrap();
    let own = cgroup_dir_of(current).unwrap();
    assert!(
        own.parent() == Some(tree.as_path()) && own.file_name().unwrap().to_str().unwrap().starts_with("w-4-0-"),
        "the worker runs in its own cgroup under {}: {}",
        tree.display(),
        own.display()
    );
    assert_eq!(
        cgroup_dir_of(processes_with(&marker)[0]).as_ref(),
        Some(&own),
        "so does its escapee"
    );
    z.stop();
    wait_for("no escapee left after stop", DEADLINE, || {
        processes_with(&marker).is_empty().then_some(())
    });
    // Nobody holds the port: a new listener binds it.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is free after zdd stop");
    assert!(!tree.exists(), "{} left behind", tree.display());
}

#[test]
fn start_says_when_cgroups_are_unavailable_and_falls_back_to_the_process_group() {
    if !nix::unistd::geteuid().is_root() {
        // Unprivileged, cgroups are unavailable unless this user has a delegated subtree; this
        // test makes the condition real by running the master as nobody, which needs root.
        assert!(std::env::var_os("CI").is_none(), "needs root under CI");
        missing(
            "start_says_when_cgroups_are_unavailable",
            "needs root to run the master as nobody",
        );
        return;
    }
    let mut z = Zdd::new("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n");
    z.start_as_nobody();
    let line = z.wait_msg_containing("cgroups unavailable (");
    let msg = line["msg"].as_str().unwrap();
    assert!(
        msg.ends_with("): a worker's descendants that leave its process group are not contained"),
        "{msg}"
    );
    assert!(msg.contains("(EACCES)"), "the reason names the errno: {msg}");
    z.wait_ready();
    let worker = z.started_pids()[0];
    // The fallback: the worker still gets its own process group.
    assert_eq!(z.report(worker)["pgid"], worker);
    assert_eq!(
        z.records()
            .iter()
            .filter(|r| r["msg"].as_str().is_some_and(|m| m.starts_with("cgroups unavailable")))
            .count(),
        1,
        "said once"
    );
    z.stop();
}

#[test]
fn a_worker_ignoring_term_cannot_keep_the_port_after_the_master_is_killed() {
    if !cgroups_usable("a_worker_ignoring_term_cannot_keep_the_port_after_the_master_is_killed") {
        return;
    }
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\", \"--ignore-term\"]\nstop_timeout = \"1s\"\n\n\
         [[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    let worker = z.started_pids()[0];
    let _guard = KillOnDrop(vec![worker]);
    z.signal(Signal::SIGKILL);
    z.wait_exit();
    // The parent-death signal (SIGTERM) is ignored: the orphan still holds the port.
    assert!(alive(worker));
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
    // The next start kills what the dead master left, then binds.
    z.start();
    z.wait_ready();
    let killed = z.wait_msg("killing processes left by a master that died without stopping");
    assert!(
        killed["pids"]
            .as_str()
            .unwrap()
            .split(' ')
            .any(|p| p == worker.to_string()),
        "{killed}"
    );
    assert!(!alive(worker), "the old worker is gone");
    let (pid, generation) = ask(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();
    assert_eq!(generation, 1);
    assert_ne!(pid, worker);
    z.stop();
}

#[test]
fn start_names_the_process_that_holds_the_port() {
    // This test process holds the port; zdd must name it.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n\n[[listen]]\nname = \"h\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    let o = z.command(&["start", "--foreground"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    let me = std::env::current_exe().unwrap();
    let name = me.file_name().unwrap().to_str().unwrap();
    assert!(
        e.contains(&format!(
            "listener \"h\": bind 127.0.0.1:{port}: address already in use (EADDRINUSE); held by pid {} (",
            std::process::id()
        )),
        "{e}"
    );
    assert!(e.contains(name), "the holder's command is named: {e}");
    z.assert_clean();
    drop(holder);
}

#[test]
fn a_worker_stuck_before_exec_is_killed_and_the_master_goes_on() {
    if !cgroups_usable("a_worker_stuck_before_exec_is_killed_and_the_master_goes_on") {
        return;
    }
    let mut z = Zdd::spawn("[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n");
    z.wait_ready();
    let master = z.pid();
    let tree = tree_of(master);
    // Freeze the workers' tree: a new worker's cgroup is created frozen, so the child freezes
    // as soon as it joins it, between fork and exec (as on a hung NFS cwd).
    let freeze = |v: &str| std::fs::write(tree.join("cgroup.freeze"), v).unwrap();
    freeze("1");
    struct Thaw(PathBuf);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("cgroup.freeze"), "0");
        }
    }
    let thaw = Thaw(tree.clone());
    z.signal(Signal::SIGHUP);
    let failed = z.wait_msg_containing("did not reach exec within 5s (killed)");
    assert!(
        failed["msg"]
            .as_str()
            .unwrap()
            .starts_with("starting worker: worker pid "),
        "{failed}"
    );
    z.wait_msg_containing("reload failed: starting worker: worker pid ");
    // The master was not blocked: it answers its control socket.
    let st = status(&z);
    assert_eq!(st["generation"], 1);
    drop(thaw);
    z.stop();
    assert!(!Path::new(&tree).exists(), "{} left behind", tree.display());
}

#[test]
fn worker_cgroups_survive_an_upgrade_and_still_end_with_their_workers() {
    if !cgroups_usable("worker_cgroups_survive_an_upgrade_and_still_end_with_their_workers") {
        return;
    }
    let port = free_port();
    let mut z = Zdd::spawn(&escaping_worker(port));
    let marker = z.path("escapee").display().to_string();
    z.wait_ready();
    let tree = tree_of(z.pid());
    let mut guard = KillOnDrop(wait_for("the first escapee", DEADLINE, || {
        let p = processes_with(&marker);
        (!p.is_empty()).then_some(p)
    }));
    z.signal(Signal::SIGUSR2);
    z.wait_msg("upgraded: master re-executed");
    // The new image kills the old worker's cgroup when the reload stops it...
    z.reload(1);
    wait_for("one escapee left after the reload", DEADLINE, || {
        let p = processes_with(&marker);
        guard.0.extend(&p);
        (p.len() == 1).then_some(())
    });
    assert_eq!(tree_of(z.pid()), tree, "the same tree, handed over");
    // ...and removes the whole tree at stop.
    z.stop();
    wait_for("no escapee left after stop", DEADLINE, || {
        processes_with(&marker).is_empty().then_some(())
    });
    assert!(!tree.exists(), "{} left behind", tree.display());
}
