//! The master in the foreground: start, worker environment, readiness, reload, crash restart,
//! stop, and what is left behind. Every test runs the real `zdd` binary.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;

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
    assert_eq!(std::fs::read_to_string(z.path("run/app.pid")).unwrap().trim(), z.pid().to_string());
    z.stop();
    assert!(std::net::TcpStream::connect(addr(port)).is_err(), "listener still open after stop");
}

#[test]
fn worker_receives_exactly_the_listeners_and_environment() {
    let port = free_port();
    let mut z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\nenv = {{ FIXTURE_ENV = \"yes\" }}\ncwd = \"{{dir}}\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n\n\
         [[listen]]\nname = \"v6\"\ntcp = \"[::1]:0\"\n\n\
         [[listen]]\nname = \"admin\"\nunix = \"{{dir}}/admin.sock\"\nmode = \"0660\"\n"
    ));
    let mut cmd_env_dirty = z;
    // Variables the master inherited from "systemd" must not reach the worker.
    cmd_env_dirty.start_with_env(&[("LISTEN_FDS", "7"), ("LISTEN_PID", "1"), ("NOTIFY_SOCKET", "/nonexistent"), ("WATCHDOG_USEC", "5")]);
    let z = &mut cmd_env_dirty;
    z.wait_ready();
    let pid = z.started_pids()[0];
    let r = z.report(pid);
    let fds: BTreeMap<String, String> = serde_json::from_value(r["fds"].clone()).unwrap();
    let numbers: Vec<i32> = fds.keys().map(|k| k.parse().unwrap()).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    // 0-2, the three listeners, and the one read_dir itself opened while listing.
    assert_eq!(&numbers[..6], &[0, 1, 2, 3, 4, 5], "{fds:?}");
    assert_eq!(numbers.len(), 7, "unexpected fds: {fds:?}");
    assert!(fds["6"].contains("/proc/"), "extra fd is not the fixture's own listing: {fds:?}");
    for fd in ["3", "4", "5"] {
        assert!(fds[fd].starts_with("socket:"), "fd {fd}: {fds:?}");
    }
    assert_eq!(fds["0"], "/dev/null");
    assert!(fds["1"].starts_with("pipe:") && fds["2"].starts_with("pipe:"), "{fds:?}");
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
