//! The master under systemd: notification datagrams to NOTIFY_SOCKET (path and abstract), and
//! adopting the sockets systemd passes (LISTEN_FDS) — using systemd's own tools where they
//! work without systemd as init.

mod common;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;

use common::*;
use nix::sys::signal::Signal;

/// The next datagram, as text.
fn next(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("no datagram from the master in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn fixture_config(port: u16, args: &[&str]) -> String {
    format!(
        "[worker]\ncommand = {}\nstart_timeout = \"20s\"\n\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n",
        toml_list(&[&["{fixture}"], args].concat())
    )
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

#[test]
fn notifies_systemd_of_ready_reloading_and_stopping_in_order() {
    let port = free_port();
    let mut z = Zdd::new(&fixture_config(port, &["--ready", "--serve"]));
    let path = z.path("systemd-notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    z.start_with_env(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);

    // The listener goes into systemd's fd store before the workers start (tests/fdstore.rs).
    assert_eq!(next(&sock), "FDSTORE=1\nFDNAME=http");
    assert_eq!(next(&sock), "EXTEND_TIMEOUT_USEC=25000000");
    assert_eq!(next(&sock), "READY=1\nSTATUS=generation 1 serving (1 worker)");

    // A reload that succeeds.
    let before = monotonic_usec();
    z.signal(Signal::SIGHUP);
    let reloading = next(&sock);
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{reloading}");
    let usec: u64 = lines[1].strip_prefix("MONOTONIC_USEC=").unwrap().parse().unwrap();
    assert!(
        usec >= before && usec <= monotonic_usec(),
        "MONOTONIC_USEC {usec} not in [{before}, now]"
    );
    assert_eq!(lines[2], "STATUS=reloading: starting generation 2");
    assert_eq!(next(&sock), "EXTEND_TIMEOUT_USEC=25000000");
    assert_eq!(next(&sock), "READY=1\nSTATUS=generation 2 serving (1 worker)");

    // A reload that fails: READY=1 all the same, with the reason in STATUS.
    z.write_config(&fixture_config(port, &["--exit", "3"]));
    z.signal(Signal::SIGHUP);
    assert!(next(&sock).starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert_eq!(next(&sock), "EXTEND_TIMEOUT_USEC=25000000");
    let failed = next(&sock);
    assert!(
        failed.starts_with("READY=1\nSTATUS=reload failed: worker pid "),
        "{failed}"
    );
    assert!(
        failed.ends_with("exited with status 3 during start-up; generation 2 keeps serving"),
        "{failed}"
    );

    // An invalid config: the same.
    z.write_config("[worker]\ncommand = [\"{fixture}\"]\nbogus = 1\n");
    z.signal(Signal::SIGHUP);
    assert!(next(&sock).starts_with("RELOADING=1\n"));
    let failed = next(&sock);
    assert!(
        failed.starts_with("READY=1\nSTATUS=reload failed: invalid config"),
        "{failed}"
    );
    assert!(failed.ends_with("; generation 2 serving (1 worker)"), "{failed}");

    z.stop();
    assert_eq!(next(&sock), "STOPPING=1\nSTATUS=stopping");
    // The worker never saw systemd's socket: it got the master's own.
    let r = z.report(z.started_pids()[0]);
    assert_eq!(r["env"]["NOTIFY_SOCKET"], z.path("run/app.notify").to_str().unwrap());
}

#[test]
fn notifies_an_abstract_socket() {
    let name = format!("zdd-test-notify-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut z = Zdd::new(&fixture_config(free_port(), &["--ready"]));
    z.start_with_env(&[("NOTIFY_SOCKET", &format!("@{name}"))]);
    assert_eq!(next(&sock), "FDSTORE=1\nFDNAME=http");
    assert!(next(&sock).starts_with("EXTEND_TIMEOUT_USEC="));
    assert_eq!(next(&sock), "READY=1\nSTATUS=generation 1 serving (1 worker)");
    z.stop();
    assert_eq!(next(&sock), "STOPPING=1\nSTATUS=stopping");
}

#[test]
fn adopts_sockets_from_systemd_socket_activate() {
    adopt_with_fdname("http");
}

#[test]
fn adopts_sockets_by_address_when_the_name_differs() {
    adopt_with_fdname("systemd-name");
}

fn adopt_with_fdname(fdname: &str) {
    if std::process::Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        missing(
            "adopts_sockets_from_systemd_socket_activate",
            "systemd-socket-activate not installed (Debian package systemd)",
        );
        return;
    }
    let (p1, p2) = (free_port(), free_port());
    let z = Zdd::new(&format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{p1}\"\n\
         [[listen]]\nname = \"admin\"\ntcp = \"127.0.0.1:{p2}\"\n"
    ));
    let log = std::fs::File::create(&z.log).unwrap();
    let mut child = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(format!("127.0.0.1:{p1}"))
        .arg(format!("--fdname={fdname}"))
        .arg(zdd_bin())
        .args(["start", "--foreground", "-c"])
        .arg(&z.config)
        .env("FIXTURE_REPORT_DIR", z.reports())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // systemd-socket-activate starts its command at the first connection, as systemd would.
    wait_for("systemd-socket-activate listening", DEADLINE, || {
        z.log_text().contains("Listening on").then_some(())
    });
    let a1 = format!("127.0.0.1:{p1}").parse().unwrap();
    let a2 = format!("127.0.0.1:{p2}").parse().unwrap();
    assert_eq!(
        ask(a1).unwrap().1,
        1,
        "the first connection is served once zdd and its worker are up"
    );
    wait_for("ready", DEADLINE, || {
        z.log_text().contains("\"msg\":\"ready\"").then_some(())
    });
    let text = z.log_text();
    assert!(
        text.contains("\"msg\":\"adopted socket from systemd\"") && text.contains(&format!("127.0.0.1:{p1}")),
        "{text}"
    );
    assert!(
        text.contains("\"msg\":\"listening\""),
        "the second listener is bound by zdd: {text}"
    );
    assert_eq!(ask(a2).unwrap().1, 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGHUP).unwrap();
    wait_for("reload", DEADLINE, || {
        z.log_text().contains("\"msg\":\"reload complete\"").then_some(())
    });
    ask_gen(a1, 2);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let st = wait_for("exit", DEADLINE, || child.try_wait().unwrap());
    assert_eq!(st.code(), Some(0));
}
