//! A master crash under systemd refuses no connection: the listening sockets wait in systemd's
//! fd store. The test plays systemd: it binds a datagram socket as the master's NOTIFY_SOCKET,
//! keeps the fds that `FDSTORE=1` messages carry (and drops them on `FDSTOREREMOVE=1`), kills
//! the master with SIGKILL, and starts a new one with the stored fds as LISTEN_FDS 3.., their
//! names as LISTEN_FDNAMES, as systemd does with `Restart=on-failure`.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

/// The binary under test; `FDSTORE_ZDD=/path/to/zdd` measures another build (say, main's).
fn binary() -> PathBuf {
    std::env::var_os("FDSTORE_ZDD").map_or_else(zdd_bin, PathBuf::from)
}

/// systemd, as far as the master can tell: the notify socket and the fd store.
struct FakeSystemd {
    sock: UnixDatagram,
    path: PathBuf,
    /// The fd store: (FDNAME, fd), in the order stored.
    store: Vec<(String, OwnedFd)>,
    /// Every message received, in order.
    messages: Vec<String>,
}

impl FakeSystemd {
    fn new(dir: &Path) -> FakeSystemd {
        let path = dir.join("systemd-notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(DEADLINE)).unwrap();
        FakeSystemd {
            sock,
            path,
            store: Vec::new(),
            messages: Vec::new(),
        }
    }

    /// One message and the fds it carried.
    fn recv(&mut self) -> (String, Vec<OwnedFd>) {
        let mut buf = [0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .expect("a message from the master within the deadline");
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel installed these fds in our table for us.
                fds.extend(r.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let len = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        self.messages.push(text.clone());
        (text, fds)
    }

    /// Receive one message and apply it as systemd does: FDSTOREREMOVE=1 closes every fd of
    /// the name; FDSTORE=1 keeps the fds, except one it holds already (the same socket).
    fn apply(&mut self) -> String {
        let (text, fds) = self.recv();
        let field = |k: &str| text.lines().find_map(|l| l.strip_prefix(k)).map(str::to_string);
        if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
            let name = field("FDNAME=").expect("FDSTOREREMOVE=1 names what to remove");
            self.store.retain(|(n, _)| *n != name);
        } else if text.lines().any(|l| l == "FDSTORE=1") {
            let name = field("FDNAME=").expect("FDSTORE=1 comes with FDNAME=");
            assert!(!fds.is_empty(), "FDSTORE=1 without an fd: {text:?}");
            for fd in fds {
                if !self
                    .store
                    .iter()
                    .any(|(_, s)| ino(s.as_raw_fd()) == ino(fd.as_raw_fd()))
                {
                    self.store.push((name.clone(), fd));
                }
            }
        }
        text
    }

    /// Receive until READY=1.
    fn until_ready(&mut self) {
        while !self.apply().lines().any(|l| l == "READY=1") {}
    }

    /// Receive until the store holds exactly these names.
    fn until_store(&mut self, names: &[&str]) {
        while self.names() != names {
            self.apply();
        }
    }

    fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.store.iter().map(|(n, _)| n.as_str()).collect();
        n.sort_unstable();
        n
    }

    fn fd_messages(&self) -> Vec<&str> {
        self.messages
            .iter()
            .filter(|m| m.starts_with("FDSTORE"))
            .map(String::as_str)
            .collect()
    }
}

/// The socket inode behind an fd.
fn ino(fd: RawFd) -> u64 {
    std::fs::metadata(format!("/proc/self/fd/{fd}")).unwrap().ino()
}

fn config(port: u16) -> String {
    format!(
        "[worker]\ncommand = [\"{{fixture}}\", \"--ready\", \"--serve\"]\ncount = 2\nstop_timeout = \"5s\"\n\n\
         [[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:{port}\"\n\n\
         [[listen]]\nname = \"sock\"\nunix = \"{{dir}}/app.sock\"\n"
    )
}

/// `zdd start --foreground` with NOTIFY_SOCKET set to the fake systemd.
fn start(z: &mut Zdd, systemd: &FakeSystemd) {
    let mut cmd = z.command(&["start", "--foreground"]);
    cmd.env("NOTIFY_SOCKET", &systemd.path);
    z.start_cmd(with_binary(cmd));
}

/// `cmd` with the binary under test in place of the built one.
fn with_binary(cmd: std::process::Command) -> std::process::Command {
    if binary() == zdd_bin() {
        return cmd;
    }
    let mut c = std::process::Command::new(binary());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// What systemd does after the master died: start it again with the stored fds as 3.., their
/// names in LISTEN_FDNAMES, LISTEN_PID the new master's pid (set by the shell, which then execs
/// zdd: exec keeps the pid).
fn restart_with_store(z: &mut Zdd, systemd: &FakeSystemd) {
    let raw: Vec<RawFd> = systemd.store.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    let names: Vec<&str> = systemd.store.iter().map(|(n, _)| n.as_str()).collect();
    assert!(raw.len() <= 16);
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("export LISTEN_PID=$$; exec \"$0\" start --foreground -c \"$1\"")
        .arg(binary())
        .arg(&z.config)
        .env("FIXTURE_REPORT_DIR", z.reports())
        .env("NOTIFY_SOCKET", &systemd.path)
        .env("LISTEN_FDS", raw.len().to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env_remove("LISTEN_PID");
    // SAFETY: only fcntl and dup2 between fork and exec, on fds this process owns; no
    // allocation (the fd list was built before the fork).
    unsafe {
        cmd.pre_exec(move || {
            let n = raw.len();
            let mut high = [0 as RawFd; 16];
            // First every source above the target range (close-on-exec copies), then into
            // 3.. (dup2 clears close-on-exec on the target).
            for (i, &fd) in raw.iter().enumerate() {
                high[i] = nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, 64);
                if high[i] < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (i, &h) in high.iter().enumerate().take(n) {
                if nix::libc::dup2(h, 3 + i as RawFd) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    z.start_cmd(cmd);
}

/// Clients, each opening a new connection per request, until stopped. What they saw.
#[derive(Default, Debug)]
struct Seen {
    requests: u64,
    /// Connections refused (ECONNREFUSED, or ENOENT for the unix socket's path).
    refused: u64,
    /// Other failures, with when they happened.
    failed: Vec<String>,
    /// The longest wait for an answer, and how many waited longer than 100 ms.
    longest: Duration,
    waited: u64,
    /// The first and the last refusal, since the clients started.
    refusing: Option<(Duration, Duration)>,
}

fn answer(mut s: impl Read) -> std::io::Result<()> {
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    if out.split_whitespace().count() == 2 {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("bad answer {out:?}")))
    }
}

struct Clients {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Seen>>,
}

impl Clients {
    /// `tcp` clients on `addr` and `unix` clients on `path`. Timeouts are generous: a
    /// connection that waits in the backlog while no master lives is fine; one refused is not.
    fn start(addr: SocketAddr, tcp: usize, path: &Path, unix: usize) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let begin = Instant::now();
        for i in 0..tcp + unix {
            let stop = Arc::clone(&stop);
            let path = path.to_path_buf();
            threads.push(std::thread::spawn(move || {
                let mut seen = Seen::default();
                while !stop.load(Ordering::SeqCst) && begin.elapsed() < DEADLINE * 2 {
                    let t = Instant::now();
                    let r = if i < tcp {
                        std::net::TcpStream::connect_timeout(&addr, DEADLINE).and_then(|s| {
                            s.set_read_timeout(Some(DEADLINE))?;
                            answer(s)
                        })
                    } else {
                        std::os::unix::net::UnixStream::connect(&path).and_then(|s| {
                            s.set_read_timeout(Some(DEADLINE))?;
                            answer(s)
                        })
                    };
                    seen.requests += 1;
                    let took = t.elapsed();
                    seen.longest = seen.longest.max(took);
                    if took > Duration::from_millis(100) {
                        seen.waited += 1;
                    }
                    match r {
                        Ok(()) => {}
                        Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ECONNREFUSED | nix::libc::ENOENT)) => {
                            seen.refused += 1;
                            let at = begin.elapsed();
                            seen.refusing = Some(seen.refusing.map_or((at, at), |(first, _)| (first, at)));
                            // Do not spin on a refusing port.
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Err(e) => seen.failed.push(format!("{:?}: {e}", begin.elapsed())),
                    }
                }
                seen
            }));
        }
        Clients { stop, threads }
    }

    fn finish(self) -> Seen {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Seen::default();
        for t in self.threads {
            let s = t.join().unwrap();
            all.requests += s.requests;
            all.refused += s.refused;
            all.failed.extend(s.failed);
            all.longest = all.longest.max(s.longest);
            all.waited += s.waited;
            all.refusing = match (all.refusing, s.refusing) {
                (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
                (x, y) => x.or(y),
            };
        }
        all
    }
}

/// systemd's restart delay in the shipped unit (`RestartSec=1s`).
const RESTART_SEC: Duration = Duration::from_secs(1);

/// Start under the fake systemd, load, SIGKILL the master, start a new one after
/// [`RESTART_SEC`] (with the stored fds if `pass_fds`), load on until it is ready and a while
/// after. What the clients saw, and how long no master served (kill to the new master's
/// "ready").
fn crash_under_load(pass_fds: bool) -> (Seen, Duration, Zdd, FakeSystemd) {
    let port = free_port();
    let mut z = Zdd::new(&config(port));
    let mut systemd = FakeSystemd::new(z.dir.path());
    start(&mut z, &systemd);
    systemd.until_ready();
    z.wait_ready();
    if !pass_fds {
        // As if nothing had been stored (main's zdd sends nothing).
        systemd.store.clear();
    }
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let path = z.path("app.sock");
    let clients = Clients::start(addr, 4, &path, 2);
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    z.signal(Signal::SIGKILL);
    z.wait_exit();
    std::thread::sleep(RESTART_SEC);
    if pass_fds {
        restart_with_store(&mut z, &systemd);
    } else {
        start(&mut z, &systemd);
    }
    systemd.until_ready();
    z.wait_ready();
    let gap = killed.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let seen = clients.finish();
    eprintln!(
        "crash with{} the fd store: {} requests, {} refused (for {:?}), {} other failures, {} waited > 100 ms, longest {:?}; kill to ready {:?}",
        if pass_fds { "" } else { "out" },
        seen.requests,
        seen.refused,
        seen.refusing.map(|(a, b)| b - a).unwrap_or_default(),
        seen.failed.len(),
        seen.waited,
        seen.longest,
        gap
    );
    (seen, gap, z, systemd)
}

#[test]
fn a_master_crash_refuses_no_connection_with_the_fd_store() {
    let (seen, _gap, mut z, systemd) = crash_under_load(true);
    assert_eq!(systemd.names(), ["http", "sock"]);
    assert_eq!(seen.refused, 0, "{seen:?}");
    assert!(seen.failed.is_empty(), "{seen:?}");
    // Connections made while no master lived waited in the backlog and were served.
    assert!(seen.waited > 0 && seen.longest >= RESTART_SEC, "{seen:?}");
    // The first master stored both listeners, each once, with its name.
    let fd_messages = systemd.fd_messages();
    assert_eq!(
        fd_messages,
        ["FDSTORE=1\nFDNAME=http", "FDSTORE=1\nFDNAME=sock"],
        "{:?}",
        systemd.messages
    );
    // The second adopted both, bound nothing and sent nothing to the store: systemd holds
    // them already.
    let adopted = z.records_with("adopted socket from systemd");
    let mut names: Vec<&str> = adopted.iter().map(|r| r["name"].as_str().unwrap()).collect();
    names.sort_unstable();
    assert_eq!(names, ["http", "sock"], "{}", z.log_text());
    assert!(z.records_with("listening").is_empty(), "{}", z.log_text());
    assert!(z.records_with("systemd fd store").is_empty(), "{}", z.log_text());
    // The unix socket is the one the first master bound, not bound again.
    let sock_fd = systemd.store.iter().find(|(n, _)| n == "sock").unwrap().1.as_raw_fd();
    let bound = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(sock_fd).unwrap();
    assert_eq!(bound.path().unwrap(), z.path("app.sock"));
    assert!(ask_unix(&z.path("app.sock")).is_ok());
    z.stop();
}

/// What main does (no fd store): measured, not run by default.
/// `cargo test --test fdstore -- --ignored --nocapture` (with `FDSTORE_ZDD=` a main build).
#[test]
#[ignore]
fn without_the_fd_store_a_master_crash_refuses_connections() {
    let (seen, _gap, mut z, _systemd) = crash_under_load(false);
    assert!(seen.refused > 0, "{seen:?}");
    z.stop();
}

/// A stored socket whose [[listen]] entry now has another address is closed, released from
/// the store, and the entry's new address is bound and stored.
#[test]
fn a_stored_socket_whose_address_changed_is_closed_and_released() {
    let (old, new) = (free_port(), free_port());
    let mut z = Zdd::new(&config(old));
    let mut systemd = FakeSystemd::new(z.dir.path());
    start(&mut z, &systemd);
    systemd.until_ready();
    z.wait_ready();
    assert_eq!(systemd.names(), ["http", "sock"]);
    z.signal(Signal::SIGKILL);
    z.wait_exit();
    z.write_config(&config(new));
    restart_with_store(&mut z, &systemd);
    systemd.until_ready();
    z.wait_ready();
    let text = z.log_text();
    assert!(
        text.contains("bound to another address than its [[listen]] entry now"),
        "{text}"
    );
    assert_eq!(z.records_with("adopted socket from systemd").len(), 1, "{text}");
    let fd_messages = systemd.fd_messages();
    let at = |m: &str| fd_messages.iter().rposition(|x| *x == m);
    let (removed, stored) = (at("FDSTOREREMOVE=1\nFDNAME=http"), at("FDSTORE=1\nFDNAME=http"));
    assert!(
        removed.is_some() && stored.is_some() && removed < stored,
        "{fd_messages:?}"
    );
    assert_eq!(systemd.names(), ["http", "sock"]);
    // The store holds the new socket; nobody holds the old one any more.
    let http = systemd.store.iter().find(|(n, _)| n == "http").unwrap();
    let bound: nix::sys::socket::SockaddrIn = nix::sys::socket::getsockname(http.1.as_raw_fd()).unwrap();
    assert_eq!(bound.port(), new);
    ask(format!("127.0.0.1:{new}").parse().unwrap()).unwrap();
    let refused = std::net::TcpStream::connect(("127.0.0.1", old)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    z.stop();
}

/// A reload stores the listeners it binds and releases the ones it drops at commit; an
/// upgrade's resumed master sends its listeners again, which the store takes once.
#[test]
fn reloads_keep_the_store_in_step_and_an_upgrade_adds_no_duplicate() {
    let (port, admin) = (free_port(), free_port());
    let mut z = Zdd::new(&config(port));
    let mut systemd = FakeSystemd::new(z.dir.path());
    start(&mut z, &systemd);
    systemd.until_ready();
    z.wait_ready();
    z.write_config(&format!(
        "{}\n[[listen]]\nname = \"admin\"\ntcp = \"127.0.0.1:{admin}\"\n",
        config(port)
    ));
    z.reload(1);
    systemd.until_store(&["admin", "http", "sock"]);
    z.write_config(&config(port));
    z.reload(2);
    systemd.until_store(&["http", "sock"]);
    assert!(
        systemd.messages.iter().any(|m| m == "FDSTOREREMOVE=1\nFDNAME=admin"),
        "{:?}",
        systemd.messages
    );
    let o = zdd(&z, &["upgrade"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The resumed master sends both again; systemd (and this fake) keep one copy of each.
    let before = systemd.messages.len();
    while systemd.messages[before..]
        .iter()
        .filter(|m| m.starts_with("FDSTORE=1"))
        .count()
        < 2
    {
        systemd.apply();
    }
    assert_eq!(systemd.names(), ["http", "sock"], "{:?}", systemd.messages);
    assert_eq!(systemd.store.len(), 2);
    z.stop();
}
