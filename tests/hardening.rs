//! Hardening: faults that once took the whole service down, froze the master or let another
//! user in (issue "Never down"). Each test drives the real binary and failed before its fix.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

fn serve_config(port: u16, args: &[&str], worker_extra: &str) -> String {
    format!(
        "[worker]\ncommand = {}\n{worker_extra}\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&[&["{fixture}"], args].concat())
    )
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit(')').next().unwrap();
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are 12 and 13 after the ")".
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf with a constant name.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().map(|n| n.parse().unwrap()))
        .unwrap()
}

fn request(z: &Zdd, line: &str) -> UnixStream {
    let mut s = UnixStream::connect(z.path("run/app.sock")).unwrap();
    s.write_all(line.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    s
}

#[test]
fn huge_timeouts_never_take_the_master_down() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut z = Zdd::spawn(&serve_config(port, &["--ready", "--serve"], ""));
    z.wait_ready();
    for extra in [
        "start_timeout = \"500000000000y\"",
        "stop_timeout = \"500000000000y\"",
        "ready = \"delay\"\nready_delay = \"500000000000y\"",
    ] {
        z.write_config(&serve_config(port, &["--ready", "--serve"], extra));
        let o = zdd(&z, &["reload"]);
        assert_ne!(o.status.code(), Some(0), "{extra}: {}{}", stdout(&o), stderr(&o));
        assert!(z.exited().is_none(), "{extra}: the master died; log:\n{}", z.log_text());
        ask(addr).expect("still serving");
    }
    // The CLI's own timeout too.
    z.write_config(&serve_config(port, &["--ready", "--serve"], ""));
    let o = zdd(&z, &["reload", "--timeout", "500000000000y"]);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    ask_gen(addr, 2);
    z.stop();
}

#[test]
fn old_worker_exiting_during_a_reload_under_on_failure_keeps_the_master() {
    for policy in ["on-failure", "never"] {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let extra = format!("restart = \"{policy}\"");
        let mut z = Zdd::spawn(&serve_config(port, &["--ready", "--serve"], &extra));
        z.wait_ready();
        let old = z.started_pids()[0];
        z.write_config(&serve_config(port, &["--ready-after", "1500", "--serve"], &extra));
        z.signal(Signal::SIGHUP);
        z.wait_msg("reloading");
        // The old worker leaves on its own, with status 0, while generation 2 starts.
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), Signal::SIGTERM).unwrap();
        z.wait_msg("reload complete");
        assert!(
            z.exited().is_none(),
            "{policy}: the master stopped; log:\n{}",
            z.log_text()
        );
        ask_gen(addr, 2);
        z.stop();
    }
}

#[test]
fn a_reload_that_fails_with_nothing_left_serving_stops_under_restart_never() {
    let port = free_port();
    let mut z = Zdd::spawn(&serve_config(port, &["--ready", "--serve"], "restart = \"never\""));
    z.wait_ready();
    let old = z.started_pids()[0];
    z.write_config(&serve_config(
        port,
        &["--ready-after", "1500", "--exit", "3"],
        "restart = \"never\"",
    ));
    z.signal(Signal::SIGHUP);
    z.wait_msg("reloading");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), Signal::SIGTERM).unwrap();
    z.wait_msg("no workers left and none to restart: stopping");
    z.wait_exit();
    z.assert_clean();
}

#[test]
fn a_failed_reload_to_another_user_gives_the_notify_socket_back() {
    let root = nix::unistd::Uid::effective().is_root();
    if !root {
        assert!(std::env::var_os("CI").is_none(), "CI must run the tests as root");
        missing(
            "a_failed_reload_to_another_user_gives_the_notify_socket_back",
            "needs root",
        );
        return;
    }
    let port = free_port();
    let mut z = Zdd::new(&serve_config(port, &["--ready", "--serve"], "user = \"nobody\""));
    // The workers (nobody) write their reports into the temp dir.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(z.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(z.reports(), std::fs::Permissions::from_mode(0o777)).unwrap();
    z.start();
    z.wait_ready();
    let notify = z.path("run/app.notify");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid.as_raw();
    assert_eq!(std::fs::symlink_metadata(&notify).unwrap().uid(), nobody);
    z.write_config(&serve_config(port, &["--exit", "1"], "user = \"daemon\""));
    let o = zdd(&z, &["reload"]);
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(
        std::fs::symlink_metadata(&notify).unwrap().uid(),
        nobody,
        "the notify socket stays with the serving workers' user"
    );
    // A crash of the serving generation: its restarted worker (as nobody) can say READY=1.
    let old = z.started_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old), Signal::SIGKILL).unwrap();
    z.wait_msg_n("worker ready", 2);
    z.stop();
}

#[test]
fn a_client_hanging_up_while_it_waits_does_not_make_the_master_spin() {
    let port = free_port();
    let mut z = Zdd::spawn(&serve_config(port, &["--ready", "--serve"], ""));
    z.wait_ready();
    z.write_config(&serve_config(port, &["--ready-after", "2000", "--serve"], ""));
    let before = cpu_time(z.pid());
    let t0 = Instant::now();
    let mut s = request(&z, r#"{"cmd":"reload"}"#);
    // Wait for the first progress line (the request was taken), then hang up.
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();
    assert!(line.contains("progress"), "{line}");
    drop(s);
    z.wait_msg("reload complete");
    let (cpu, wall) = (cpu_time(z.pid()) - before, t0.elapsed());
    assert!(
        cpu < wall / 4,
        "the master used {cpu:?} of CPU in {wall:?} while a client that hung up waited"
    );
    // And it still answers.
    assert_eq!(status(&z)["generation"], 2);
    z.stop();
}

/// Run the master with this open-file limit.
fn start_with_nofile(z: &mut Zdd, soft: u64, hard: u64) {
    let mut cmd = z.command(&["start", "--foreground"]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child before exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, soft, hard)
                .map_err(std::io::Error::from)
        });
    }
    z.start_cmd(cmd);
}

#[test]
fn the_master_raises_its_open_file_limit_and_workers_keep_theirs() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    // 40 workers hold 80 log pipes in the master: more than a soft limit of 64.
    let mut z = Zdd::new(&serve_config(port, &["--ready", "--serve"], "count = 40"));
    start_with_nofile(&mut z, 64, 4096);
    z.wait_ready();
    let r = z.wait_msg("raised the master's open-file limit");
    assert_eq!(r["nofile"], 4096, "{r}");
    let pid = z.started_pids()[0];
    let limits = z.report(pid)["limits"].to_string();
    assert!(
        limits.contains("Max open files 64 4096 files"),
        "a worker keeps the limit the master was given: {limits}"
    );
    z.reload(1);
    ask_gen(addr, 2);
    z.stop();
}

#[test]
fn running_out_of_fds_names_the_limit() {
    let port = free_port();
    let mut z = Zdd::new(&serve_config(port, &["--ready", "--serve"], "count = 40"));
    start_with_nofile(&mut z, 48, 48);
    let st = z.wait_exit();
    assert_eq!(st.code(), Some(1), "{}", z.log_text());
    let log = z.log_text();
    assert!(
        log.contains("open-file limit RLIMIT_NOFILE is 48, hard limit 48"),
        "{log}"
    );
    z.assert_clean();
}

#[test]
fn a_flood_of_control_connections_neither_spins_nor_locks_out() {
    let port = free_port();
    let mut z = Zdd::new(&serve_config(port, &["--ready", "--serve"], ""));
    // Few fds: accepting the flood runs into EMFILE.
    start_with_nofile(&mut z, 64, 64);
    z.wait_ready();
    let before = cpu_time(z.pid());
    let t0 = Instant::now();
    let idle: Vec<UnixStream> = (0..100)
        .filter_map(|_| UnixStream::connect(z.path("run/app.sock")).ok())
        .collect();
    assert!(idle.len() >= 90, "{} connections", idle.len());
    z.wait_msg_containing("control: accept failed");
    // Keep them for a second: a spinning master would burn it all.
    std::thread::sleep(Duration::from_secs(1));
    let (cpu, wall) = (cpu_time(z.pid()) - before, t0.elapsed());
    assert!(cpu < wall / 2, "the master used {cpu:?} of CPU in {wall:?}");
    drop(idle);
    // Once they are gone, the operator gets in.
    let o = zdd(&z, &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    z.stop();
}

#[test]
fn a_notify_flood_does_not_grow_the_master() {
    let port = free_port();
    let mut z = Zdd::new(&serve_config(
        port,
        &["--ready", "--notify-flood", "3000", "--serve"],
        "env = { FIXTURE_FLOOD_DONE = \"{dir}/flood-done\" }",
    ));
    z.start();
    z.wait_ready();
    let mut peak = 0;
    let end = Instant::now() + DEADLINE;
    while !z.path("flood-done").exists() {
        assert!(Instant::now() < end, "the flood did not end");
        peak = peak.max(rss_kib(z.pid()));
        let o = zdd(&z, &["status"]);
        assert_eq!(o.status.code(), Some(0), "status during the flood: {}", stderr(&o));
        assert!(z.exited().is_none());
    }
    peak = peak.max(rss_kib(z.pid()));
    eprintln!("peak RSS under the flood: {peak} KiB");
    assert!(peak < 24 * 1024, "the master grew to {peak} KiB under a notify flood");
    z.stop();
}

#[test]
fn a_worker_gone_right_after_ready_under_restart_never_leaves_no_empty_master() {
    // READY=1 and the exit often arrive in one turn of the master's loop: the start succeeds,
    // and with nothing left to serve or restart the master must stop, not idle without workers.
    for _ in 0..5 {
        let mut z = Zdd::spawn(
            "[worker]\ncommand = [\"{fixture}\", \"--ready\", \"--exit-after\", \"0\", \"0\"]\nrestart = \"never\"\n",
        );
        z.wait_msg("no workers left and none to restart: stopping");
        assert_eq!(z.wait_exit().code(), Some(0), "{}", z.log_text());
        z.assert_clean();
    }
}

#[test]
fn a_stop_after_one_worker_failed_under_restart_never_exits_0() {
    // One of two workers dies (not restarted, by policy); the other serves on. The operator's
    // stop later is a clean stop: exit 0 (systemd must not see a failed unit for it).
    let port = free_port();
    let mut z = Zdd::spawn(&serve_config(
        port,
        &["--ready", "--serve"],
        "count = 2\nrestart = \"never\"",
    ));
    z.wait_ready();
    let first = z.started_pids()[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), Signal::SIGKILL).unwrap();
    z.wait_msg("worker exited; not restarting (restart policy)");
    ask(format!("127.0.0.1:{port}").parse().unwrap()).expect("the other worker serves");
    z.stop();
}

#[test]
fn a_reload_says_which_master_settings_wait_for_the_next_start() {
    let body = |extra: &str| {
        format!(
            "[master]\nlog_format = \"json\"\ncontrol_socket = \"run/app.sock\"\n{extra}\n\n\
             [worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n"
        )
    };
    let mut z = Zdd::spawn(&body(""));
    z.wait_ready();
    // max_draining is a reload setting: no warning.
    z.write_config(&body("max_draining = 3"));
    z.reload(1);
    assert!(z
        .records_with("[master] settings changed; they take effect at the next start, not on reload")
        .is_empty());
    z.write_config(&body("max_draining = 3\npid_file = \"run/other.pid\""));
    z.reload(2);
    let w = z.wait_msg("[master] settings changed; they take effect at the next start, not on reload");
    assert_eq!(w["keys"], "pid_file", "{w}");
    z.stop();
}
