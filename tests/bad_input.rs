//! Bad input: every error is clear, exits with the documented code, and leaves nothing behind
//! (no stray process, socket file or pid file).

mod common;

use std::process::Output;

use common::*;

fn start_output(z: &Zdd) -> Output {
    z.command(&["start", "--foreground"]).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn listen(port: u16) -> String {
    format!("[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n")
}

/// No file left in run/ and no process whose command line is the fixture with a marker.
fn assert_nothing_left(z: &Zdd, o: &Output) {
    z.assert_clean();
    let text = stderr(o);
    for line in text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        if line["msg"] == "worker started" {
            let pid = line["pid"].as_i64().unwrap() as i32;
            wait_for(&format!("worker {pid} gone"), DEADLINE, || (!alive(pid)).then_some(()));
        }
    }
}

#[test]
fn nonexistent_command_is_a_config_error() {
    let port = free_port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"/nonexistent/server\", \"--flag\"]\n{}",
        listen(port)
    ));
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("app.toml:6:11: worker.command: /nonexistent/server: no such file or directory (ENOENT)"),
        "{e}"
    );
    assert_nothing_left(&z, &o);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn a_program_exec_refuses_is_an_exec_error() {
    // Executable, so validation lets it through; exec itself fails, and says so precisely.
    let port = free_port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{dir}}/server\", \"--flag\"]\n{}",
        listen(port)
    ));
    std::fs::write(z.path("server"), [0x7fu8, b'E', b'L', b'F', 0, 0, 0, 0]).unwrap();
    std::fs::set_permissions(z.path("server"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "exec {}/server: exec format error (ENOEXEC)",
            z.dir.path().display()
        )),
        "{e}"
    );
    assert!(e.contains("start failed"), "{e}");
    assert_nothing_left(&z, &o);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn command_not_in_path() {
    let z = Zdd::new("[worker]\ncommand = [\"no-such-server-zdd\"]\n");
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("worker.command: \"no-such-server-zdd\" not found in PATH"),
        "{}",
        stderr(&o)
    );
    assert_nothing_left(&z, &o);
}

#[test]
fn worker_that_exits_at_once() {
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--stderr-lines\", \"2\", \"--exit\", \"7\"]\n{}",
        listen(free_port())
    ));
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("start failed: worker pid") && e.contains("exited with status 7 during start-up"),
        "{e}"
    );
    assert!(e.contains("  | err line 2"), "{e}");
    assert_nothing_left(&z, &o);
}

#[test]
fn worker_never_ready() {
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\"]\nstart_timeout = \"300ms\"\n{}",
        listen(free_port())
    ));
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("did not become ready within 300ms"), "{e}");
    assert_nothing_left(&z, &o);
}

#[test]
fn worker_never_ready_and_ignoring_term_is_killed() {
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ignore-term\"]\nstart_timeout = \"300ms\"\nstop_timeout = \"1h\"\n{}",
        listen(free_port())
    ));
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    assert_nothing_left(&z, &o);
}

#[test]
fn port_in_use_is_a_bind_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n{}",
        listen(port)
    ));
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "listener \"http\": bind 127.0.0.1:{port}: address already in use (EADDRINUSE)"
        )),
        "{e}"
    );
    assert!(!e.contains("worker started"), "{e}");
    assert_nothing_left(&z, &o);
}

#[test]
fn later_bind_failure_removes_earlier_unix_socket() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n[[listen]]\nname = \"u\"\nunix = \"{{dir}}/u.sock\"\n[[listen]]\nname = \"t\"\ntcp = \"127.0.0.1:{port}\"\n"
    ));
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    assert!(!z.path("u.sock").exists(), "unix socket of a failed start left behind");
    assert_nothing_left(&z, &o);
}

#[test]
fn missing_config_file() {
    let z = Zdd::new("");
    let o = std::process::Command::new(zdd_bin())
        .args(["start", "--foreground", "-c"])
        .arg(z.path("nope.toml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("nope.toml: cannot read config: No such file or directory"),
        "{}",
        stderr(&o)
    );
    assert!(!z.path("run").exists());
}

#[test]
fn unreadable_config_file() {
    let z = Zdd::new("");
    std::fs::create_dir(z.path("dir.toml")).unwrap();
    let o = std::process::Command::new(zdd_bin())
        .args(["check", "-c"])
        .arg(z.path("dir.toml"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("dir.toml: cannot read config: Is a directory"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn invalid_config_on_start_exits_2_with_position() {
    let z = Zdd::new("[worker]\ncommand = [\"{fixture}\"]\ncount = -1\n");
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("app.toml:7:9: worker.count: must be between 1 and 4096"),
        "{e}"
    );
    assert!(!z.path("run").exists());
}

#[test]
fn second_master_is_refused() {
    let port = free_port();
    let mut z = Zdd::spawn(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n{}",
        listen(port)
    ));
    z.wait_ready();
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains(&format!("already running, pid {}", z.pid())), "{e}");
    // The first master is unharmed: its pid file and sockets are still there.
    assert!(z.path("run/app.pid").exists() && z.path("run/app.notify").exists());
    z.stop();
}

#[test]
fn stale_pid_file_is_taken_over() {
    let z0 = Zdd::new("");
    std::fs::create_dir_all(z0.path("run")).unwrap();
    std::fs::write(z0.path("run/app.pid"), "999999\n").unwrap();
    let mut z = z0;
    z.write_config(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n{}",
        listen(free_port())
    ));
    z.start();
    z.wait_ready();
    assert_eq!(
        std::fs::read_to_string(z.path("run/app.pid")).unwrap().trim(),
        z.pid().to_string()
    );
    z.stop();
}

#[test]
fn unix_path_that_is_not_a_socket_is_never_removed() {
    let z = Zdd::new(
        "[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n[[listen]]\nname = \"u\"\nunix = \"{dir}/data.txt\"\n",
    );
    std::fs::write(z.path("data.txt"), "precious").unwrap();
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("data.txt exists and is not a socket; refusing to remove it"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(z.path("data.txt")).unwrap(), "precious");
    assert_nothing_left(&z, &o);
}

#[test]
fn stale_unix_socket_is_replaced_but_live_one_is_refused() {
    let mut z = Zdd::new("[worker]\ncommand = [\"{fixture}\", \"--ready\", \"--serve\"]\n[[listen]]\nname = \"u\"\nunix = \"{dir}/u.sock\"\n");
    // Live: somebody listens on it.
    let live = std::os::unix::net::UnixListener::bind(z.path("u.sock")).unwrap();
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("u.sock is in use: another process listens on it"),
        "{}",
        stderr(&o)
    );
    assert!(z.path("u.sock").exists(), "a live socket must not be removed");
    // Stale: the listener is gone, the file stays.
    drop(live);
    assert!(z.path("u.sock").exists());
    z.start();
    z.wait_ready();
    assert_eq!(ask_unix(&z.path("u.sock")).unwrap().1, 1);
    z.stop();
    assert!(!z.path("u.sock").exists());
}

#[test]
fn check_accepts_valid_and_rejects_invalid() {
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"/bin/true\"]\ncount = 2\n{}",
        listen(8080)
    ));
    let o = z.command(&["check"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("ok (1 listener, 2 workers)"));
    z.write_config(
        "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"x\"\ntcp = \"127.0.0.1:80\"\nbogus = 1\n",
    );
    let o = z.command(&["check"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("app.toml:10:1: unknown field `bogus`"), "{e}");
    // check never touches runtime files.
    assert!(!z.path("run").exists());
}

#[test]
fn usage_error_exits_2() {
    let o = std::process::Command::new(zdd_bin())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_server_that_daemonizes_itself_gets_the_hint_and_nothing_is_left() {
    if !nix::unistd::geteuid().is_root() {
        return missing(
            "a_server_that_daemonizes_itself_gets_the_hint_and_nothing_is_left",
            "needs root (a cgroup per worker finds what left the process group)",
        );
    }
    // The classic: fork into the background (new session), the parent exits 0.
    let marker = format!("zdd-daemonized-{}", std::process::id());
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"/bin/sh\", \"-c\", \"setsid sh -c 'exec -a {marker} sleep 1000' </dev/null >/dev/null 2>&1 & exit 0\"]\n{}",
        listen(free_port())
    ));
    let o = start_output(&z);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("exited with status 0 during start-up")
            && e.contains("did the server daemonize itself? run it in the foreground"),
        "{e}"
    );
    assert_nothing_left(&z, &o);
    let left = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(stdout_of(&left).trim().is_empty(), "left running: {}", stdout_of(&left));
}

fn stdout_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn check_refuses_a_unix_listener_in_a_missing_directory_like_start_would() {
    let z = Zdd::new(
        "[worker]\ncommand = [\"{fixture}\", \"--ready\"]\n[[listen]]\nname = \"u\"\nunix = \"/nonexistent-zdd-dir/s.sock\"\n",
    );
    let o = z.command(&["check"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("listen.unix: directory /nonexistent-zdd-dir: no such file or directory (ENOENT)"),
        "{e}"
    );
}

#[test]
fn check_warns_about_a_port_in_use_and_names_the_holder() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\"]\n{}",
        listen(port)
    ));
    let o = z.command(&["check"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "a warning, not an error: {}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!(
            "warning: listener \"http\": port {port} is in use now (held by pid {}",
            std::process::id()
        )),
        "{e}"
    );
}
