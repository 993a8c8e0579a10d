//! Unit tests of probe.rs: the head parser and messages (pure), and the runner against real
//! local sockets (a tiny server thread on the probe listener, as the worker would serve it).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsFd;
use std::thread;

use super::*;

fn http(status: (u16, u16)) -> Spec {
    Spec {
        check: ProbeCheck::Http {
            path: "/healthz".into(),
            host: "localhost".into(),
            status,
        },
        timeout: Duration::from_millis(300),
        attempts: 2,
        retry_delay: Duration::from_millis(10),
    }
}

fn tcp() -> Spec {
    Spec {
        check: ProbeCheck::Tcp,
        ..http((200, 399))
    }
}

/// The master's copy of a probe listener and the worker's (a second fd of the same socket).
fn listener() -> (Rc<Listener>, TcpListener) {
    let l = Listener::bind_probe("zdd-probe").unwrap();
    let worker = TcpListener::from(l.as_fd().try_clone_to_owned().unwrap());
    (Rc::new(l), worker)
}

/// Run a probe the way the loop does, until its verdict; with how long it took.
fn drive(mut probe: Probe) -> (Verdict, Duration) {
    let began = Instant::now();
    loop {
        assert!(began.elapsed() < Duration::from_secs(20), "the probe never ended");
        let now = Instant::now();
        if probe.deadline().is_some_and(|d| d <= now) {
            if let Some(v) = probe.on_time(now) {
                return (v, began.elapsed());
            }
            continue;
        }
        let timeout = probe
            .deadline()
            .map_or(1000, |d| d.saturating_duration_since(now).as_millis() as i32 + 1);
        let mut fds: Vec<libc::pollfd> = probe
            .poll_fd()
            .map(|(fd, events)| libc::pollfd { fd, events, revents: 0 })
            .into_iter()
            .collect();
        // SAFETY: a valid array of pollfd of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if let Some(p) = fds.first() {
            if let Some(v) = probe.on_io(p.revents, Instant::now()) {
                return (v, began.elapsed());
            }
        }
    }
}

/// A worker that answers every connection with `response` (after reading the request head).
fn answer(worker: TcpListener, response: &'static [u8], times: usize) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let mut requests = Vec::new();
        for _ in 0..times {
            let (mut c, _) = worker.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            requests.push(String::from_utf8_lossy(&req).into_owned());
            let _ = c.write_all(response);
        }
        requests
    })
}

fn pid() -> Pid {
    Pid::from_raw(123)
}

#[test]
fn parses_status_line_and_headers() {
    let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    assert_eq!(
        h,
        Parsed::Complete(Head {
            status: 200,
            reason: "OK".into(),
            body_at: 38
        })
    );
    assert_eq!(
        parse_head(b"HTTP/1.0 503\n\n"),
        Parsed::Complete(Head {
            status: 503,
            reason: "".into(),
            body_at: 14
        })
    );
    assert_eq!(parse_head(b""), Parsed::Partial);
    assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nServer: x\r\n"), Parsed::Partial);
    assert_eq!(parse_head(b"HTT"), Parsed::Partial);
    for bad in [
        &b"SSH-2.0-OpenSSH\r\n"[..],
        b"HTTP/1.1 20 OK\r\n",
        b"HTTP/2 200\r\n",
        b"hello",
    ] {
        assert!(matches!(parse_head(bad), Parsed::Invalid(_)), "{bad:?}");
    }
}

#[test]
fn messages_name_probe_worker_status_and_an_escaped_excerpt() {
    let head = Head {
        status: 500,
        reason: "Internal Server Error".into(),
        body_at: 0,
    };
    let reason = status_failure(&head, b"Traceback\x1b[31m \"x\"\n", (200, 399));
    assert_eq!(
        reason,
        "status 500 (Internal Server Error) \"Traceback\\x1b[31m \\\"x\\\"\", expected 200-399"
    );
    assert_eq!(
        failure_message("GET /healthz", pid(), &reason, 4),
        format!("probe GET /healthz on worker pid 123: {reason} (4 attempts)")
    );
    assert!(failure_message("tcp", pid(), "x", 1).ends_with("(1 attempt)"));
    let long = excerpt(&[b'a'; 1000]);
    assert!(long.len() < EXCERPT_MAX + 8, "{long}");
}

#[test]
fn http_probe_passes_on_a_good_status_and_sends_the_request() {
    let (l, worker) = listener();
    let server = answer(worker, b"HTTP/1.1 204 No Content\r\n\r\n", 1);
    let (v, _) = drive(Probe::start(http((200, 399)), pid(), l, Instant::now()));
    assert_eq!(v, Ok(()));
    let req = &server.join().unwrap()[0];
    assert_eq!(
        req,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nUser-Agent: zdd-probe\r\nConnection: close\r\n\r\n"
    );
}

#[test]
fn http_probe_fails_after_every_attempt_on_a_bad_status() {
    let (l, worker) = listener();
    let server = answer(
        worker,
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 9\r\n\r\nTraceback",
        2,
    );
    let (v, _) = drive(Probe::start(http((200, 399)), pid(), l, Instant::now()));
    assert_eq!(
        v,
        Err(
            "probe GET /healthz on worker pid 123: status 500 (Internal Server Error) \"Traceback\", \
             expected 200-399 (2 attempts)"
                .into()
        )
    );
    assert_eq!(server.join().unwrap().len(), 2);
}

#[test]
fn a_retry_can_pass() {
    let (l, worker) = listener();
    let server = thread::spawn(move || {
        for response in [&b"HTTP/1.1 503 Starting\r\n\r\n"[..], b"HTTP/1.1 200 OK\r\n\r\n"] {
            let (mut c, _) = worker.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = c.read(&mut buf).unwrap();
            c.write_all(response).unwrap();
        }
    });
    let (v, _) = drive(Probe::start(http((200, 200)), pid(), l, Instant::now()));
    assert_eq!(v, Ok(()));
    server.join().unwrap();
}

#[test]
fn a_worker_that_never_accepts_fails_after_the_timeout_of_each_attempt() {
    let (l, _worker) = listener();
    let (v, took) = drive(Probe::start(http((200, 399)), pid(), l, Instant::now()));
    assert_eq!(
        v,
        Err("probe GET /healthz on worker pid 123: no answer within 300ms (2 attempts)".into())
    );
    assert!(took >= Duration::from_millis(610), "{took:?}");
}

#[test]
fn a_closed_or_reset_connection_fails() {
    let (l, worker) = listener();
    let server = thread::spawn(move || {
        let (c, _) = worker.accept().unwrap();
        drop(c);
        let (c, _) = worker.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = (&c).read(&mut buf);
        // SO_LINGER 0: close sends RST.
        socket::setsockopt(
            &c,
            socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .unwrap();
        drop(c);
    });
    let (v, _) = drive(Probe::start(http((200, 399)), pid(), l, Instant::now()));
    server.join().unwrap();
    let e = v.unwrap_err();
    assert!(e.ends_with(": connection reset (2 attempts)"), "{e}");
}

#[test]
fn a_closed_connection_without_an_answer_fails() {
    let (l, worker) = listener();
    let server = thread::spawn(move || {
        let (mut c, _) = worker.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = c.read(&mut buf);
    });
    let spec = Spec {
        attempts: 1,
        ..http((200, 399))
    };
    let (v, _) = drive(Probe::start(spec, pid(), l, Instant::now()));
    server.join().unwrap();
    assert_eq!(
        v,
        Err("probe GET /healthz on worker pid 123: connection closed without an answer (1 attempt)".into())
    );
}

#[test]
fn a_head_longer_than_the_cap_fails() {
    let (l, worker) = listener();
    let server = thread::spawn(move || {
        let (mut c, _) = worker.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = c.read(&mut buf);
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\n");
        let _ = c.write_all(&[b'x'; 3 * HEAD_MAX]);
    });
    let spec = Spec {
        attempts: 1,
        ..http((200, 399))
    };
    let (v, _) = drive(Probe::start(spec, pid(), l, Instant::now()));
    server.join().unwrap();
    assert!(v
        .unwrap_err()
        .contains("no end of the response head within its first 8 KiB"));
}

#[test]
fn tcp_probe_passes_once_the_worker_accepted() {
    let (l, worker) = listener();
    let server = thread::spawn(move || worker.accept().map(|_| ()).unwrap());
    let (v, _) = drive(Probe::start(tcp(), pid(), l, Instant::now()));
    assert_eq!(v, Ok(()));
    server.join().unwrap();
}

#[test]
fn tcp_probe_fails_when_nobody_accepts() {
    let (l, _worker) = listener();
    let (v, _) = drive(Probe::start(tcp(), pid(), Rc::clone(&l), Instant::now()));
    assert_eq!(
        v,
        Err("probe tcp on worker pid 123: connection not accepted within 300ms (2 attempts)".into())
    );
    // Both connections still wait in the queue: what the probe reads.
    assert_eq!(l.accept_queue(), Ok(2));
}

#[test]
fn the_probe_listener_is_loopback_cloexec_and_listening() {
    let l = Listener::bind_probe("zdd-probe").unwrap();
    let ListenAddr::Tcp(a) = l.addr() else {
        panic!("{:?}", l.addr())
    };
    assert!(a.ip().is_loopback() && a.port() != 0, "{a}");
    let flags = nix::fcntl::fcntl(l.raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
    assert_eq!(l.accept_queue(), Ok(0));
}

#[test]
fn budget_covers_every_attempt_and_serving_probes_try_once() {
    let c = ProbeConfig {
        check: ProbeCheck::Tcp,
        timeout: Duration::from_secs(5),
        retries: 3,
        retry_delay: Duration::from_millis(500),
        name: "zdd-probe".into(),
        interval: Some(Duration::from_secs(10)),
        failures: 3,
    };
    // 4 × (5s + 250ms) + 3 × 500ms + 1s
    assert_eq!(budget(&c), Duration::from_millis(23_500));
    assert_eq!(Spec::cut_over(&c).attempts, 4);
    assert_eq!(Spec::serving(&c).attempts, 1);
    let huge = ProbeConfig {
        timeout: crate::config::MAX_DURATION,
        retries: 100,
        retry_delay: crate::config::MAX_DURATION,
        ..c
    };
    assert!(budget(&huge) > crate::config::MAX_DURATION);
}
