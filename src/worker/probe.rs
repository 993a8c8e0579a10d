//! The probe of one worker (`[worker.probe]`): a real request to the worker itself, through
//! its private listener, before the old generation is told to stop (and, with `interval`,
//! while it serves).
//!
//! Why. `READY=1` is the worker's opinion: gunicorn without `--preload` sends it before its
//! workers import the app. The shared `[[listen]]` sockets are answered by old workers too, so
//! a request there proves nothing about the new one. Each worker therefore gets one more
//! listener of its own (127.0.0.1, a port the kernel picks, the last fd it receives), and the
//! master, which keeps a copy of it, connects there.
//!
//! Theory of operation. A [`Probe`] runs until a verdict: attempts, one after the other, until
//! one passes or `attempts` have failed, with `retry_delay` between them. It does no I/O that
//! could block and holds no thread: the loop polls [`Probe::poll_fd`] for the events it asks
//! for, wakes at [`Probe::deadline`], and calls [`Probe::on_io`] / [`Probe::on_time`], which
//! return the [`Verdict`] once there is one. [`Probe::start`] does no I/O: the first attempt
//! starts at the first `on_time` (due at once).
//!
//! An http attempt: a non-blocking connect, `GET {path} HTTP/1.1` with `Host`, `User-Agent:
//! zdd-probe` and `Connection: close`, then the status line and headers are read (at most
//! [`HEAD_MAX`] bytes); the status decides. For a failing status, up to [`EXCERPT_MAX`] bytes
//! of the body are read too (for at most [`EXCERPT_WAIT`]), for the operator's message. The
//! attempt's `timeout` covers connect, request and the head.
//!
//! A tcp attempt: the connect always succeeds (the kernel completes the handshake on a
//! listening socket whether or not anyone accepts), so it proves nothing. The attempt passes
//! once the worker has *accepted* it: the master reads the listener's accept queue length
//! (`TCP_INFO`'s `tcpi_unacked` on a listening socket) and passes when it is empty after its
//! connect, checking every few milliseconds (2 ms doubling up to 50 ms) until the timeout.
//! Only the master connects to that listener, so an empty queue means ours was taken.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6};
use nix::unistd::Pid;

use crate::clock;
use crate::config::{ListenAddr, ProbeCheck, ProbeConfig};
use crate::errno::describe;
use crate::listen::Listener;

/// What a probe ends with: passed, or why not (the whole message, for `reload failed: …`).
pub type Verdict = Result<(), String>;

/// The most of a response's status line and headers read.
pub const HEAD_MAX: usize = 8 * 1024;
/// The most of a failing response's body quoted in the failure message.
pub const EXCERPT_MAX: usize = 200;
/// How long a failing response's body excerpt is waited for, after its head.
pub const EXCERPT_WAIT: Duration = Duration::from_millis(250);
/// A tcp probe's first and last interval between two looks at the accept queue.
const ACCEPT_CHECK_FIRST: Duration = Duration::from_millis(2);
const ACCEPT_CHECK_MAX: Duration = Duration::from_millis(50);

/// How one probe runs: what it checks, and how often it may try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub check: ProbeCheck,
    pub timeout: Duration,
    /// Attempts at most (at least 1).
    pub attempts: u32,
    pub retry_delay: Duration,
}

impl Spec {
    /// The cut-over probe of a new worker: 1 + `retries` attempts.
    pub fn cut_over(c: &ProbeConfig) -> Spec {
        Spec {
            check: c.check.clone(),
            timeout: c.timeout,
            attempts: c.retries.saturating_add(1),
            retry_delay: c.retry_delay,
        }
    }

    /// One `interval` probe of a serving worker: a single attempt (misses are counted by the
    /// loop, against `failures`).
    pub fn serving(c: &ProbeConfig) -> Spec {
        Spec {
            attempts: 1,
            ..Spec::cut_over(c)
        }
    }

    /// `GET /healthz` or `tcp`, as failure messages name the probe.
    pub fn what(&self) -> String {
        match &self.check {
            ProbeCheck::Http { path, .. } => format!("GET {path}"),
            ProbeCheck::Tcp => "tcp".into(),
        }
    }
}

/// The longest a cut-over probe can take to reach its verdict: every attempt's timeout (and
/// a failing answer's excerpt wait), the delays between them, and a second of slack. The
/// machine's backstop (`State::Probing`'s deadline); the probe always decides before.
pub fn budget(c: &ProbeConfig) -> Duration {
    let attempts = c.retries.saturating_add(1);
    c.timeout
        .saturating_add(EXCERPT_WAIT)
        .saturating_mul(attempts)
        .saturating_add(c.retry_delay.saturating_mul(c.retries))
        .saturating_add(Duration::from_secs(1))
}

/// The status line of a response: its code and reason phrase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    /// Where the body starts in the bytes read.
    pub body_at: usize,
}

/// What the bytes read so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not the whole head yet.
    Partial,
    Complete(Head),
    /// Not an HTTP/1 response; why.
    Invalid(String),
}

/// Parse a response's status line and headers (`\r\n` or bare `\n` line ends). The headers
/// themselves are not interpreted: only the status decides.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let Some(eol) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= 5 && !buf.starts_with(b"HTTP/") {
            Parsed::Invalid(format!("not an HTTP response: {}", excerpt(buf)))
        } else {
            Parsed::Partial
        };
    };
    let line = trim_cr(&buf[..eol]);
    let invalid = || Parsed::Invalid(format!("not an HTTP response: {}", excerpt(line)));
    let Some(rest) = line.strip_prefix(b"HTTP/1.") else {
        return invalid();
    };
    // "1 200 OK" / "0 404 Not Found": minor version, space, three digits, then the reason.
    let (Some(b' '), Some(code)) = (rest.get(1), rest.get(2..5)) else {
        return invalid();
    };
    if !code.iter().all(u8::is_ascii_digit) || rest.get(5).is_some_and(|&b| b != b' ') {
        return invalid();
    }
    let status = code.iter().fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let reason = String::from_utf8_lossy(rest.get(6..).unwrap_or_default()).into_owned();
    // The head ends at the first empty line after the status line.
    let mut at = eol + 1;
    loop {
        let Some(n) = buf[at..].iter().position(|&b| b == b'\n') else {
            return Parsed::Partial;
        };
        let header = trim_cr(&buf[at..at + n]);
        at += n + 1;
        if header.is_empty() {
            return Parsed::Complete(Head {
                status,
                reason,
                body_at: at,
            });
        }
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Worker bytes as a message may quote them: lossy UTF-8, control characters escaped, cut at
/// [`EXCERPT_MAX`] bytes, quoted.
pub fn excerpt(bytes: &[u8]) -> String {
    let bytes = &bytes[..bytes.len().min(EXCERPT_MAX)];
    let text = String::from_utf8_lossy(bytes);
    let mut shown = crate::log::escape_str(&text).replace('"', "\\\"");
    if shown.len() > EXCERPT_MAX {
        let mut cut = EXCERPT_MAX;
        while !shown.is_char_boundary(cut) {
            cut -= 1;
        }
        shown.truncate(cut);
        shown.push('…');
    }
    format!("\"{shown}\"")
}

/// Why an http attempt failed on its status: `status 500 (Internal Server Error) "body…"`.
pub fn status_failure(head: &Head, body: &[u8], accepted: (u16, u16)) -> String {
    let mut s = format!("status {}", head.status);
    let reason = head.reason.trim();
    if !reason.is_empty() {
        s.push_str(&format!(" ({})", crate::log::escape_str(reason)));
    }
    let body = body.trim_ascii();
    if !body.is_empty() {
        s.push(' ');
        s.push_str(&excerpt(body));
    }
    let (lo, hi) = accepted;
    if lo == hi {
        s.push_str(&format!(", expected {lo}"));
    } else {
        s.push_str(&format!(", expected {lo}-{hi}"));
    }
    s
}

/// The verdict's text: `probe GET /healthz on worker pid 123: {reason} (4 attempts)`.
pub fn failure_message(what: &str, pid: Pid, reason: &str, attempts: u32) -> String {
    let s = if attempts == 1 { "" } else { "s" };
    format!("probe {what} on worker pid {pid}: {reason} ({attempts} attempt{s})")
}

/// Where an attempt is.
enum Step {
    /// The next attempt starts then (the first at once).
    Wait {
        until: Instant,
    },
    /// Connecting, then writing the request (`sent` bytes of it so far): POLLOUT.
    Connect {
        sock: OwnedFd,
        sent: usize,
        deadline: Instant,
    },
    /// Reading the answer: POLLIN. `head` once the status line and headers are in;
    /// then the body excerpt is read until `excerpt_until`.
    Read {
        sock: OwnedFd,
        buf: Vec<u8>,
        head: Option<Head>,
        deadline: Instant,
        excerpt_until: Option<Instant>,
    },
    /// tcp: connected; waiting for the worker to accept.
    Accept {
        _sock: OwnedFd,
        deadline: Instant,
        check_at: Instant,
        every: Duration,
    },
    Done,
}

/// One worker's probe, until a verdict.
pub struct Probe {
    spec: Spec,
    pid: Pid,
    listener: Rc<Listener>,
    request: Vec<u8>,
    failed: u32,
    step: Step,
}

impl Probe {
    /// Probe worker `pid` through its private `listener` (the master's copy). No I/O here: the
    /// first attempt starts at the first [`Probe::on_time`], due at `now`.
    pub fn start(spec: Spec, pid: Pid, listener: Rc<Listener>, now: Instant) -> Probe {
        let request = match &spec.check {
            ProbeCheck::Http { path, host, .. } => {
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: zdd-probe\r\nConnection: close\r\n\r\n")
                    .into_bytes()
            }
            ProbeCheck::Tcp => Vec::new(),
        };
        Probe {
            spec,
            pid,
            listener,
            request,
            failed: 0,
            step: Step::Wait { until: now },
        }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The fd to poll and for what, while an attempt waits on its socket.
    pub fn poll_fd(&self) -> Option<(RawFd, i16)> {
        match &self.step {
            Step::Connect { sock, .. } => Some((sock.as_raw_fd(), libc::POLLOUT)),
            Step::Read { sock, .. } => Some((sock.as_raw_fd(), libc::POLLIN)),
            Step::Wait { .. } | Step::Accept { .. } | Step::Done => None,
        }
    }

    /// When [`Probe::on_time`] must be called next.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.step {
            Step::Wait { until } => Some(*until),
            Step::Connect { deadline, .. } => Some(*deadline),
            Step::Read {
                deadline,
                excerpt_until,
                ..
            } => Some(excerpt_until.map_or(*deadline, |e| e.min(*deadline))),
            Step::Accept { deadline, check_at, .. } => Some((*check_at).min(*deadline)),
            Step::Done => None,
        }
    }

    /// Time passed: start an attempt, look at the accept queue, or give up on an attempt.
    pub fn on_time(&mut self, now: Instant) -> Option<Verdict> {
        match &mut self.step {
            Step::Wait { until } if now >= *until => self.begin(now),
            Step::Accept { check_at, every, .. } if now >= *check_at => {
                *check_at = clock::after(now, *every);
                *every = (*every * 2).min(ACCEPT_CHECK_MAX);
                self.check_accepted(now)
            }
            Step::Read {
                head: Some(head),
                buf,
                deadline,
                excerpt_until,
                ..
            } if now >= *deadline || excerpt_until.is_some_and(|e| now >= e) => {
                let reason = status_reason(&self.spec.check, head, buf);
                self.fail(reason, now)
            }
            Step::Connect { deadline, .. } | Step::Read { deadline, .. } if now >= *deadline => {
                let reason = format!("no answer within {}", humantime::format_duration(self.spec.timeout));
                self.fail(reason, now)
            }
            Step::Accept { deadline, .. } if now >= *deadline => {
                let reason = format!(
                    "connection not accepted within {}",
                    humantime::format_duration(self.spec.timeout)
                );
                self.fail(reason, now)
            }
            _ => None,
        }
    }

    /// The polled fd is ready (`revents`).
    pub fn on_io(&mut self, revents: i16, now: Instant) -> Option<Verdict> {
        if revents == 0 {
            return None;
        }
        match &self.step {
            Step::Connect { .. } => self.connected(now),
            Step::Read { .. } => self.read(now),
            Step::Wait { .. } | Step::Accept { .. } | Step::Done => None,
        }
    }

    /// The socket is writable: the connect is over; send the request (http), or wait for the
    /// worker to accept (tcp).
    fn connected(&mut self, now: Instant) -> Option<Verdict> {
        let Step::Connect { sock, sent, deadline } = &mut self.step else {
            return None;
        };
        let deadline = *deadline;
        let fd = sock.as_raw_fd();
        let mut failure = match socket::getsockopt(sock, socket::sockopt::SocketError) {
            Ok(0) => None,
            Ok(e) => Some(format!(
                "connect {}: {}",
                self.listener.addr(),
                describe(Errno::from_raw(e))
            )),
            Err(e) => Some(format!("getsockopt SO_ERROR: {}", describe(e))),
        };
        let tcp = matches!(self.spec.check, ProbeCheck::Tcp);
        if failure.is_none() && !tcp {
            while *sent < self.request.len() {
                match socket::send(fd, &self.request[*sent..], socket::MsgFlags::MSG_NOSIGNAL) {
                    Ok(n) => *sent += n,
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => return None,
                    Err(e) => {
                        failure = Some(io_failure("send", e));
                        break;
                    }
                }
            }
        }
        if let Some(reason) = failure {
            return self.fail(reason, now);
        }
        let Step::Connect { sock, .. } = std::mem::replace(&mut self.step, Step::Done) else {
            return None;
        };
        if tcp {
            self.step = Step::Accept {
                _sock: sock,
                deadline,
                check_at: clock::after(now, ACCEPT_CHECK_FIRST),
                every: ACCEPT_CHECK_FIRST,
            };
            return self.check_accepted(now);
        }
        self.step = Step::Read {
            sock,
            buf: Vec::with_capacity(1024),
            head: None,
            deadline,
            excerpt_until: None,
        };
        None
    }

    /// Start an attempt: a non-blocking connect to the worker's private listener.
    fn begin(&mut self, now: Instant) -> Option<Verdict> {
        let addr = match self.listener.addr() {
            ListenAddr::Tcp(a) => *a,
            other => return self.fail(format!("probe listener {other} is not tcp"), now),
        };
        let family = if addr.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let sock = match socket::socket(family, SockType::Stream, flags, None) {
            Ok(s) => s,
            Err(e) => return self.fail(format!("socket: {}", describe(e)), now),
        };
        let r = match addr {
            SocketAddr::V4(a) => socket::connect(sock.as_raw_fd(), &SockaddrIn::from(a)),
            SocketAddr::V6(a) => socket::connect(sock.as_raw_fd(), &SockaddrIn6::from(a)),
        };
        match r {
            Ok(()) | Err(Errno::EINPROGRESS) | Err(Errno::EINTR) => {
                self.step = Step::Connect {
                    sock,
                    sent: 0,
                    deadline: clock::after(now, self.spec.timeout),
                };
                None
            }
            Err(e) => {
                let reason = format!("connect {addr}: {}", describe(e));
                self.fail(reason, now)
            }
        }
    }

    /// Read what the socket has; decide once the head is in (and, for a failing status, the
    /// excerpt of the body).
    fn read(&mut self, now: Instant) -> Option<Verdict> {
        let accepted = match self.spec.check {
            ProbeCheck::Http { status, .. } => status,
            ProbeCheck::Tcp => return None,
        };
        let Step::Read {
            sock,
            buf,
            head,
            excerpt_until,
            ..
        } = &mut self.step
        else {
            return None;
        };
        match read_answer(sock, buf, head, excerpt_until, accepted, now)? {
            Ok(()) => {
                self.step = Step::Done;
                Some(Ok(()))
            }
            Err(reason) => self.fail(reason, now),
        }
    }

    /// tcp: passed once the listener's accept queue is empty after our connect.
    fn check_accepted(&mut self, now: Instant) -> Option<Verdict> {
        match self.listener.accept_queue() {
            Ok(0) => {
                self.step = Step::Done;
                Some(Ok(()))
            }
            Ok(_) => None,
            Err(e) => self.fail(format!("getsockopt TCP_INFO: {}", describe(e)), now),
        }
    }

    /// An attempt failed: try again after `retry_delay`, or give the verdict.
    fn fail(&mut self, reason: String, now: Instant) -> Option<Verdict> {
        self.failed += 1;
        if self.failed >= self.spec.attempts.max(1) {
            self.step = Step::Done;
            return Some(Err(failure_message(&self.spec.what(), self.pid, &reason, self.failed)));
        }
        self.step = Step::Wait {
            until: clock::after(now, self.spec.retry_delay),
        };
        None
    }
}

/// Read what `sock` has into `buf`, parse the head once it is in; the attempt's outcome once
/// there is one: passed, or why not.
fn read_answer(
    sock: &OwnedFd,
    buf: &mut Vec<u8>,
    head: &mut Option<Head>,
    excerpt_until: &mut Option<Instant>,
    accepted: (u16, u16),
    now: Instant,
) -> Option<Verdict> {
    let cap = head.as_ref().map_or(HEAD_MAX, |h| h.body_at + EXCERPT_MAX);
    let mut eof = false;
    let mut chunk = [0u8; 4096];
    while buf.len() < cap {
        let want = (cap - buf.len()).min(chunk.len());
        match nix::unistd::read(sock.as_raw_fd(), &mut chunk[..want]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) if head.is_none() => return Some(Err(io_failure("read", e))),
            // The head is in; a reset while the body's excerpt is read ends the excerpt.
            Err(_) => {
                eof = true;
                break;
            }
        }
    }
    if head.is_none() {
        match parse_head(buf) {
            Parsed::Complete(h) => *head = Some(h),
            Parsed::Invalid(why) => return Some(Err(why)),
            Parsed::Partial if buf.len() >= HEAD_MAX => {
                return Some(Err(format!(
                    "no end of the response head within its first {} KiB",
                    HEAD_MAX / 1024
                )))
            }
            Parsed::Partial if eof && buf.is_empty() => return Some(Err("connection closed without an answer".into())),
            Parsed::Partial if eof => {
                return Some(Err(format!(
                    "connection closed in the middle of the answer: {}",
                    excerpt(buf)
                )))
            }
            Parsed::Partial => return None,
        }
    }
    let h = head.as_ref()?;
    let (lo, hi) = accepted;
    if (lo..=hi).contains(&h.status) {
        return Some(Ok(()));
    }
    let cap = h.body_at + EXCERPT_MAX;
    let until = *excerpt_until.get_or_insert_with(|| clock::after(now, EXCERPT_WAIT));
    if eof || buf.len() >= cap || now >= until {
        return Some(Err(status_failure(
            h,
            buf.get(h.body_at..).unwrap_or_default(),
            accepted,
        )));
    }
    None
}

/// Why an attempt whose head is in failed on its status.
fn status_reason(check: &ProbeCheck, head: &Head, buf: &[u8]) -> String {
    let accepted = match check {
        ProbeCheck::Http { status, .. } => *status,
        ProbeCheck::Tcp => (0, 0),
    };
    status_failure(head, buf.get(head.body_at..).unwrap_or_default(), accepted)
}

/// A socket error as the operator reads it: a reset is the worker's doing, said plainly.
fn io_failure(op: &str, e: Errno) -> String {
    match e {
        Errno::ECONNRESET | Errno::EPIPE => "connection reset".into(),
        e => format!("{op}: {}", describe(e)),
    }
}

#[cfg(test)]
#[path = "probe_tests.rs"]
mod tests;
