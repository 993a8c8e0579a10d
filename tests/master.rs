//! The master in the foreground: start, worker environment, readiness, reload, crash restart,
//! stop, and what is left behind. Every test runs the real `zdd` binary.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

fn tcp_config(port: u16, args: &[&str], worker_extra: &str) -> String {
    format!(
        "[worker]\ncommand = {}\nstop_timeout = \"10s\"\n{worker_extra}\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&[&["{fixture}"], args].concat())
    )
}

fn addr(port: u16) -> SocketAddr {
    format!("127.0.0.1:{port}").parse().unwrap()
}

#[test]
fn start_serves_and_stops_cleanly() {
    let port = free_port();
    let mut z = Zdd::spawn(&tcp_config(port, &["--ready", "--serve"], ""));
    z.wait_ready();
    let (pid, gen) = ask(addr(port)).unwrap();
    assert_eq!(gen, 1);
    assert_eq!(z.started_pids(), vec![pid]);
    assert!(z.path("run/app.pid").exists());
    assert_eq!(
        std::fs::read_to_string(z.path("run/app.pid")).unwrap().trim(),
        z.pid().to_string()
    );
    z.stop();
    assert!(
        std::net::TcpStream::connect(addr(port)).is_err(),
        "listener still open after stop"
    );
}

#[test]
fn worker_receives_exactly_the_listeners_and_environment() {
    let port = free_port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\nenv = {{ FIXTURE_ENV = \"yes\" }}\ncwd = \"{{dir}}\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n\n\
         [[listen]]\nname = \"v6\"\ntcp = \"[::1]:0\"\n\n\
         [[listen]]\nname = \"admin\"\nunix = \"{{dir}}/admin.sock\"\nmode = \"0660\"\n"
    ));
    let mut cmd_env_dirty = z;
    // Variables the master inherited from "systemd" must not reach the worker.
    cmd_env_dirty.start_with_env(&[
        ("LISTEN_FDS", "7"),
        ("LISTEN_PID", "1"),
        ("NOTIFY_SOCKET", "/nonexistent"),
        ("WATCHDOG_USEC", "5"),
    ]);
    let z = &mut cmd_env_dirty;
    z.wait_ready();
    let pid = z.started_pids()[0];
    let r = z.report(pid);
    let fds: BTreeMap<String, String> = serde_json::from_value(r["fds"].clone()).unwrap();
    let numbers: Vec<i32> = fds
        .keys()
        .map(|k| k.parse().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    // 0-2, the three listeners, and the one read_dir itself opened while listing.
    assert_eq!(&numbers[..6], &[0, 1, 2, 3, 4, 5], "{fds:?}");
    assert_eq!(numbers.len(), 7, "unexpected fds: {fds:?}");
    assert!(
        fds["6"].contains("/proc/"),
        "extra fd is not the fixture's own listing: {fds:?}"
    );
    for fd in ["3", "4", "5"] {
        assert!(fds[fd].starts_with("socket:"), "fd {fd}: {fds:?}");
    }
    assert_eq!(fds["0"], "/dev/null");
    assert!(
        fds["1"].starts_with("pipe:") && fds["2"].starts_with("pipe:"),
        "{fds:?}"
    );
    let env = &r["env"];
    assert_eq!(env["LISTEN_FDS"], "3");
    assert_eq!(env["LISTEN_PID"], pid.to_string());
    assert_eq!(env["LISTEN_FDNAMES"], "http:v6:admin");
    assert_eq!(env["FIXTURE_ENV"], "yes");
    assert_eq!(env["ZDD_GENERATION"], "1");
    assert!(env.get("WATCHDOG_USEC").is_none(), "{env}");
    assert_eq!(env["NOTIFY_SOCKET"], z.path("run/app.notify").to_str().unwrap());
    // Own process group, clean signal state, configured cwd.
    assert_eq!(r["pgid"], pid);
    assert_eq!(r["ppid"], z.pid());
    assert_eq!(r["sigblk"], "0000000000000000");
    assert_eq!(r["cwd"], z.dir.path().canonicalize().unwrap().to_str().unwrap());
    // The unix listener has its mode.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(z.path("admin.sock")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o660);
    z.stop();
    assert!(!z.path("admin.sock").exists(), "unix socket left behind");
}

#[test]
fn worker_signal_state_is_reset() {
    // The master ignores SIGPIPE (Rust does) and blocks signals around fork; neither may
    // reach the worker. A shell and grep observe it, since a Rust worker ignores SIGPIPE itself.
    let mut z = Zdd::spawn(
        "[worker]\ncommand = [\"/bin/sh\", \"-c\", \"grep -E '^Sig(Blk|Ign)' /proc/self/status > {dir}/sig; exec {fixture} --ready\"]\n",
    );
    z.wait_ready();
    let sig = std::fs::read_to_string(z.path("sig")).unwrap();
    assert_eq!(sig, "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n");
    z.stop();
}

fn fixture_config(port: u16, args: &[&str], worker_extra: &str) -> String {
    tcp_config(port, args, worker_extra)
}

/// Socket inode of fd `fd` in a fixture report.
fn socket_of(report: &serde_json::Value, fd: u32) -> String {
    report["fds"][fd.to_string()].as_str().unwrap().to_string()
}

#[test]
fn reload_starts_new_generation_and_stops_old_only_after_ready() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--ready-after", "200", "--serve"], ""));
    z.wait_ready();
    let (old_pid, old_gen) = ask(addr(port)).unwrap();
    assert_eq!(old_gen, 1);
    let done = z.reload(1);
    assert_eq!(done["generation"], 2);
    let new_pid = ask_gen(addr(port), 2);
    assert_ne!(new_pid, old_pid);
    let exited = z.wait_msg("worker exited");
    assert_eq!(exited["pid"], old_pid);
    assert_eq!(exited["status"], "exited with status 0");
    // Order in the log: new worker ready, then reload complete, then old worker exits.
    let msgs: Vec<String> = z
        .records()
        .iter()
        .map(|r| format!("{} {}", r["msg"].as_str().unwrap(), r["pid"]))
        .collect();
    let pos = |m: &str| {
        msgs.iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m} not in {msgs:?}"))
    };
    assert!(
        pos(&format!("worker ready {new_pid}")) < pos(&format!("worker exited {old_pid}")),
        "{msgs:?}"
    );
    // Kept listener: the very same socket object in both generations.
    assert_eq!(socket_of(&z.report(old_pid), 3), socket_of(&z.report(new_pid), 3));
    z.stop();
}

#[test]
fn reload_with_invalid_config_changes_nothing() {
    let port = free_port();
    let good = fixture_config(port, &["--ready", "--serve"], "");
    let mut z = Zdd::spawn(&good);
    z.wait_ready();
    let before = ask(addr(port)).unwrap();
    z.write_config(&good.replace("stop_timeout", "stop_timout"));
    z.signal(Signal::SIGHUP);
    let failed = z.wait_msg_containing("reload failed: invalid config");
    let msg = failed["msg"].as_str().unwrap();
    assert!(
        msg.contains("app.toml:") && msg.contains("unknown field `stop_timout`"),
        "{msg}"
    );
    assert_eq!(ask(addr(port)).unwrap(), before);
    assert_eq!(z.started_pids().len(), 1);
    // A good file afterwards reloads normally.
    z.write_config(&good);
    z.reload(1);
    // An invalid config does not use up a generation.
    ask_gen(addr(port), 2);
    z.stop();
}

#[test]
fn reload_failure_keeps_old_generation_and_reports_status_and_last_lines() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--ready", "--serve"], ""));
    z.wait_ready();
    let before = ask(addr(port)).unwrap();
    z.write_config(&fixture_config(port, &["--stderr-lines", "3", "--exit", "3"], ""));
    z.signal(Signal::SIGHUP);
    let failed = z.wait_msg_containing("reload failed: ");
    let msg = failed["msg"].as_str().unwrap();
    assert!(msg.contains("exited with status 3 during start-up"), "{msg}");
    z.wait_msg("still serving");
    let tail: Vec<String> = z
        .records()
        .iter()
        .filter_map(|r| r["msg"].as_str().filter(|m| m.starts_with("  | ")).map(String::from))
        .collect();
    assert_eq!(tail.last().map(String::as_str), Some("  | err line 3"), "{tail:?}");
    assert_eq!(ask(addr(port)).unwrap(), before, "old generation must keep serving");
    z.stop();
}

#[test]
fn reload_failure_on_start_timeout_kills_new_worker() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--ready", "--serve"], ""));
    z.wait_ready();
    let before = ask(addr(port)).unwrap();
    // A worker that serves but never says READY=1, where READY=1 is what counts.
    z.write_config(&fixture_config(
        port,
        &["--serve"],
        "ready = \"notify\"\nstart_timeout = \"500ms\"",
    ));
    z.signal(Signal::SIGHUP);
    let failed = z.wait_msg_containing("reload failed: ");
    assert!(
        failed["msg"]
            .as_str()
            .unwrap()
            .contains("did not become ready within 500ms"),
        "{failed}"
    );
    let pids = z.started_pids();
    let new_pid = pids[1];
    wait_for("the unready worker to be killed", DEADLINE, || {
        (!alive(new_pid)).then_some(())
    });
    assert_eq!(ask(addr(port)).unwrap(), before);
    z.stop();
}

#[test]
fn reload_diffs_listeners_by_name() {
    let (p1, p2) = (free_port(), free_port());
    let one = format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\n\n[[listen]]\nname = \"a\"\ntcp = \"127.0.0.1:{p1}\"\n\
         [[listen]]\nname = \"sock\"\nunix = \"{{dir}}/s.sock\"\nmode = \"0600\"\n"
    );
    let two = format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\n\n[[listen]]\nname = \"b\"\ntcp = \"127.0.0.1:{p2}\"\n\
         [[listen]]\nname = \"sock\"\nunix = \"{{dir}}/s.sock\"\nmode = \"0666\"\n"
    );
    let mut z = Zdd::spawn(&one);
    z.wait_ready();
    let first = z.started_pids()[0];
    let sock_before = socket_of(&z.report(first), 4);
    z.write_config(&two);
    z.reload(1);
    let second = z.started_pids()[1];
    let r = z.report(second);
    assert_eq!(r["env"]["LISTEN_FDNAMES"], "b:sock");
    assert_eq!(
        socket_of(&r, 4),
        sock_before,
        "unix listener kept by name must be the same socket"
    );
    assert_eq!(ask(addr(p2)).unwrap().0, second);
    assert_eq!(ask_unix(&z.path("s.sock")).unwrap().0, second);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(z.path("s.sock")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "mode change applies in place");
    // The removed listener closes once the old worker is gone.
    wait_for("old worker gone", DEADLINE, || (!alive(first)).then_some(()));
    wait_for("listener a closed", DEADLINE, || {
        std::net::TcpStream::connect(addr(p1)).is_err().then_some(())
    });
    z.stop();
    assert!(!z.path("s.sock").exists());
}

#[test]
fn reload_signals_during_a_reload_coalesce_into_one_more() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--ready-after", "300", "--serve"], ""));
    z.wait_ready();
    for _ in 0..5 {
        z.signal(Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(10));
    }
    z.wait_msg_n("reload complete", 2);
    // Had a third been queued, it would have started the moment the second completed.
    assert_eq!(z.records_with("reloading").len(), 2, "{}", z.log_text());
    ask_gen(addr(port), 3);
    z.stop();
}

#[test]
fn crashing_worker_restarts_with_exponential_backoff() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--ready", "--exit-after", "20", "1"], ""));
    z.wait_ready();
    let restarts = z.wait_msg_n("worker exited unexpectedly; restarting", 4);
    let delays: Vec<u64> = restarts.iter().map(|r| r["in_ms"].as_u64().unwrap()).collect();
    for (got, want) in delays.iter().zip([100u64, 200, 400, 800]) {
        assert!(*got <= want && *got + 20 >= want, "back-off {delays:?}");
    }
    assert_eq!(restarts[0]["status"], "exited with status 1");
    z.stop();
}

#[test]
fn restart_policy_never_stops_master_when_last_worker_exits() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(
        port,
        &["--ready", "--exit-after", "50", "0"],
        "restart = \"never\"",
    ));
    let st = z.wait_exit();
    assert_eq!(st.code(), Some(0), "{}", z.log_text());
    assert_eq!(z.started_pids().len(), 1);
    z.assert_clean();
}

#[test]
fn restart_policy_on_failure_ignores_clean_exit_but_restarts_failure() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(
        port,
        &["--ready", "--exit-after", "50", "0"],
        "restart = \"on-failure\"",
    ));
    assert_eq!(z.wait_exit().code(), Some(0));
    z.assert_clean();
    let mut z = Zdd::spawn(&fixture_config(
        port,
        &["--ready", "--exit-after", "50", "2"],
        "restart = \"on-failure\"",
    ));
    z.wait_msg_n("worker exited unexpectedly; restarting", 2);
    z.stop();
}

#[test]
fn stop_kills_worker_that_ignores_term_after_stop_timeout() {
    let port = free_port();
    let mut z = Zdd::spawn(
        &fixture_config(port, &["--ready", "--ignore-term"], "")
            .replace("stop_timeout = \"10s\"", "stop_timeout = \"300ms\""),
    );
    z.wait_ready();
    z.stop();
    let exited = z.records_with("worker exited");
    assert_eq!(exited[0]["status"], "killed by signal SIGKILL");
}

#[test]
fn second_stop_signal_kills_at_once() {
    let port = free_port();
    let mut z = Zdd::spawn(
        &fixture_config(port, &["--ready", "--ignore-term"], "")
            .replace("stop_timeout = \"10s\"", "stop_timeout = \"1h\""),
    );
    z.wait_ready();
    z.signal(Signal::SIGTERM);
    z.wait_msg("stopping");
    z.signal(Signal::SIGINT);
    assert_eq!(z.wait_exit().code(), Some(0));
    z.assert_clean();
    assert_eq!(z.records_with("worker exited")[0]["status"], "killed by signal SIGKILL");
}

#[test]
fn log_relay_loses_no_line_and_keeps_order() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(
        port,
        &["--ready", "--lines", "100000"],
        "restart = \"never\"",
    ));
    assert_eq!(z.wait_exit().code(), Some(0));
    let pid = z.started_pids()[0];
    let lines: Vec<String> = z
        .records()
        .into_iter()
        .filter(|r| r["stream"] == "stdout" && r["pid"] == pid && r["generation"] == 1)
        .map(|r| r["msg"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(lines.len(), 100_000);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l, &format!("line {}", i + 1));
    }
}

#[test]
fn shell_worker_can_use_systemd_notify() {
    if std::process::Command::new("systemd-notify")
        .arg("--version")
        .output()
        .is_err()
    {
        missing(
            "this systemd-notify test",
            "systemd-notify not installed (Debian package systemd)",
        );
        return;
    }
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"/bin/sh\", \"-c\", \"systemd-notify --ready --status=up; exec sleep 600\"]\nstart_timeout = \"20s\"\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    z.wait_ready();
    z.stop();
}

#[test]
fn ready_delay_counts_as_ready_after_the_delay() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(
        port,
        &["--serve"],
        "ready = \"delay\"\nready_delay = \"200ms\"",
    ));
    z.wait_ready();
    assert_eq!(ask(addr(port)).unwrap().1, 1);
    z.stop();
}

#[test]
fn count_workers_all_share_the_socket() {
    let port = free_port();
    let mut z = Zdd::spawn(&fixture_config(port, &["--ready", "--serve"], "count = 3"));
    z.wait_ready();
    let pids = z.started_pids();
    assert_eq!(pids.len(), 3);
    let socks: std::collections::BTreeSet<String> = pids.iter().map(|&p| socket_of(&z.report(p), 3)).collect();
    assert_eq!(socks.len(), 1);
    z.reload(1);
    assert_eq!(z.started_pids().len(), 6);
    z.stop();
}

#[test]
fn unix_listener_gets_owner_and_group() {
    if !nix::unistd::Uid::effective().is_root() {
        missing("unix_listener_gets_owner_and_group", "needs root to chown");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    let mut z = Zdd::spawn(
        "[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n[[listen]]\nname = \"u\"\nunix = \"{dir}/u.sock\"\nmode = \"0660\"\nowner = \"nobody\"\ngroup = \"nogroup\"\n",
    );
    z.wait_ready();
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(z.path("u.sock")).unwrap();
    assert_eq!(meta.uid(), nobody.uid.as_raw());
    assert_eq!(
        meta.gid(),
        nix::unistd::Group::from_name("nogroup").unwrap().unwrap().gid.as_raw()
    );
    assert_eq!(meta.mode() & 0o777, 0o660);
    z.stop();
}

/// Ask a udp listener: one datagram, the fixture's "<pid> <generation>" back.
fn ask_udp(port: u16) -> (i32, u64) {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    wait_for("an answer to a datagram", DEADLINE, || {
        s.send_to(b"hello", addr(port)).unwrap();
        let mut buf = [0u8; 256];
        let (n, _) = s.recv_from(&mut buf).ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut it = text.split_whitespace();
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    })
}

#[test]
fn udp_listener_is_passed_and_kept_by_address_and_type_across_a_reload() {
    let (p, q, r) = (free_port(), free_port(), free_port());
    let conf = |second: u16| {
        format!(
            "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\n\n\
             [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{p}\"\n\
             [[listen]]\nname = \"quic\"\nudp = \"127.0.0.1:{p}\"\nreceive_buffer = \"64KiB\"\n\
             [[listen]]\nname = \"dns\"\nudp = \"127.0.0.1:{second}\"\n"
        )
    };
    let mut z = Zdd::spawn(&conf(q));
    z.wait_ready();
    let first = z.started_pids()[0];
    assert_eq!(ask_udp(p), (first, 1));
    assert_eq!(ask_udp(q), (first, 1));
    assert_eq!(
        ask(addr(p)).unwrap(),
        (first, 1),
        "tcp and udp on one port are distinct"
    );
    let before = z.report(first);
    assert_eq!(before["env"]["LISTEN_FDNAMES"], "http:quic:dns");
    z.write_config(&conf(r));
    z.reload(1);
    let second = z.started_pids()[1];
    let after = z.report(second);
    assert_eq!(socket_of(&after, 3), socket_of(&before, 3), "tcp kept");
    assert_eq!(
        socket_of(&after, 4),
        socket_of(&before, 4),
        "udp with the same address kept"
    );
    assert_ne!(
        socket_of(&after, 5),
        socket_of(&before, 5),
        "a moved udp listener is bound anew"
    );
    wait_for("generation 2 answers the kept udp listener", DEADLINE, || {
        (ask_udp(p) == (second, 2)).then_some(())
    });
    assert_eq!(ask_udp(r), (second, 2));
    z.stop();
}

#[test]
fn a_new_listener_bound_below_its_target_fd_reaches_the_worker_in_its_place() {
    // 13 listeners, then the first 5 removed (their fds free once the old workers are gone),
    // then one added at the end: it is bound on a freed low fd (8 here, seen with `ss -ltnp`),
    // below its target (3 + 8 = 11), the case where the child must move it out of the way
    // before placing the others.
    let ports: Vec<u16> = (0..14).map(|_| free_port()).collect();
    let conf = |idx: &[usize]| {
        let mut s = format!(
            "[worker]\ncommand = {}\n",
            toml_list(&["{fixture}", "--ready", "--serve"])
        );
        for &i in idx {
            s.push_str(&format!(
                "\n[[listen]]\nname = \"l{i}\"\ntcp = \"127.0.0.1:{}\"\n",
                ports[i]
            ));
        }
        s
    };
    let mut z = Zdd::spawn(&conf(&(0..13).collect::<Vec<_>>()));
    z.wait_ready();
    z.write_config(&conf(&(5..13).collect::<Vec<_>>()));
    z.reload(1);
    wait_for("generation 1 gone", DEADLINE, || {
        (ask_gen(addr(ports[5]), 2) > 0).then_some(())
    });
    wait_for("the old worker gone", DEADLINE, || {
        (z.records_with("worker exited").len() == 1).then_some(())
    });
    let mut idx: Vec<usize> = (5..13).collect();
    idx.push(13);
    z.write_config(&conf(&idx));
    z.reload(2);
    // Every listener reaches generation 3's worker, at the fd LISTEN_FDNAMES says.
    for (k, &i) in idx.iter().enumerate() {
        let (pid, gen) = ask(addr(ports[i])).unwrap_or_else(|e| panic!("listener l{i} (fd {}): {e}", 3 + k));
        assert_eq!(gen, 3, "l{i}");
        let r = z.report(pid);
        let names = r["env"]["LISTEN_FDNAMES"].as_str().unwrap().to_string();
        assert_eq!(names.split(':').nth(k), Some(format!("l{i}").as_str()), "{names}");
    }
    z.stop();
}
