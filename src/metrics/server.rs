//! The metrics listener and its connections, as part of the master's poll loop: accept, read
//! one HTTP request, write the answer, close. Everything is non-blocking, and every connection
//! is answered or dropped by its deadline ([`DEADLINE`] from accept).
//!
//! A connection goes `Reading → Writing → Draining → done`. Reading: up to [`MAX_REQUEST`]
//! bytes, until the end of the headers (a body is not read). Writing: the answer (`200` with the
//! metrics for `GET /metrics` and `HEAD /metrics`, `404` for any other path, `405` for another
//! method, `400` for what is not HTTP, `431` for a request too long), `Connection: close`.
//! Draining: the write side is shut down and what the client still sends is read and thrown
//! away until it closes (at most [`MAX_DRAIN`] bytes): closing a socket with unread input makes
//! the kernel send a reset, which can destroy the answer before the client has read it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{accept4, recv, send, shutdown, MsgFlags, Shutdown, SockFlag};

use crate::config::{ListenAddr, ListenConfig};
use crate::listen::{ListenError, Listener};

/// A connection must be answered (request read, answer written) within this long of its accept.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// The longest request (request line and headers) read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// What is read and thrown away after the answer, at most, before closing anyway.
pub const MAX_DRAIN: usize = 256 * 1024;
/// The metrics listener's backlog: connections beyond the ones served wait there.
pub const BACKLOG: i32 = 128;
/// The name the listener has in error messages.
pub const NAME: &str = "[master] metrics";

/// The listening socket (tcp, unix path or abstract), non-blocking, close-on-exec.
pub struct MetricsServer {
    listener: Listener,
}

impl MetricsServer {
    /// Bind `addr`, with the [[listen]] policy for unix socket files (a stale socket is
    /// replaced, anything else refused; the file is removed at drop if it is still ours) and
    /// EADDRINUSE naming who holds the port.
    pub fn bind(addr: &ListenAddr) -> Result<MetricsServer, ListenError> {
        let listener = Listener::bind(&ListenConfig {
            name: NAME.into(),
            addr: addr.clone(),
            backlog: BACKLOG,
            mode: None,
            owner: None,
            group: None,
            opts: Default::default(),
        })?;
        Ok(MetricsServer::from_listener(listener))
    }

    /// Around a listener bound already (or handed across an upgrade).
    pub fn from_listener(listener: Listener) -> MetricsServer {
        // Only the master holds this socket (workers never get it): non-blocking is safe.
        let _ = nix::fcntl::fcntl(
            listener.raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        );
        MetricsServer { listener }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.listener.raw_fd()
    }

    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    /// Accept pending connections, at most `max`. Returns them, and the error that stopped
    /// accepting if it was not "nothing more pending" (EMFILE and the like: the caller waits
    /// before trying again, as for the control socket).
    pub fn accept(&self, now: Instant, max: usize) -> (Vec<MetricsConn>, Option<Errno>) {
        let mut out = Vec::new();
        while out.len() < max {
            match accept4(self.raw_fd(), SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => {
                    // SAFETY: accept4 returned a new fd that nothing else owns.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    out.push(MetricsConn::new(fd, now));
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN | Errno::ECONNABORTED) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }
}

/// What a connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reading,
    Writing,
    Draining,
    Done,
}

/// What a request asked for, once it arrived whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// Still reading, or already answered.
    Nothing,
    /// `GET /metrics` (`head`: `HEAD /metrics`): the caller renders the text and calls
    /// [`MetricsConn::answer`].
    Metrics { head: bool },
}

/// One scrape.
pub struct MetricsConn {
    fd: OwnedFd,
    phase: Phase,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    drained: usize,
    deadline: Instant,
}

impl MetricsConn {
    fn new(fd: OwnedFd, now: Instant) -> MetricsConn {
        MetricsConn {
            fd,
            phase: Phase::Reading,
            inbuf: Vec::new(),
            out: Vec::new(),
            written: 0,
            drained: 0,
            deadline: crate::clock::after(now, DEADLINE),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Finished (answered and closed by the client, or failed, or past its deadline): drop it.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The poll events it waits for.
    pub fn events(&self) -> i16 {
        match self.phase {
            Phase::Writing => nix::libc::POLLOUT,
            _ => nix::libc::POLLIN,
        }
    }

    /// Past its deadline: dropped, whatever it was doing.
    pub fn expire(&mut self, now: Instant) {
        if now >= self.deadline {
            self.phase = Phase::Done;
        }
    }

    /// The socket is ready: read, write or drain, as its phase says. Returns what a request
    /// that arrived whole asked for.
    pub fn service(&mut self) -> Asked {
        match self.phase {
            Phase::Reading => self.read(),
            Phase::Writing => {
                self.write();
                Asked::Nothing
            }
            Phase::Draining => {
                self.drain();
                Asked::Nothing
            }
            Phase::Done => Asked::Nothing,
        }
    }

    fn read(&mut self) -> Asked {
        let mut buf = [0u8; 4096];
        loop {
            match recv(self.raw_fd(), &mut buf, MsgFlags::empty()) {
                // The client closed before its request was whole.
                Ok(0) => {
                    self.phase = Phase::Done;
                    return Asked::Nothing;
                }
                Ok(n) => {
                    // Only the end of the headers is looked for, so a request arriving in
                    // pieces is searched from a little before the new piece.
                    let from = self.inbuf.len().saturating_sub(3);
                    self.inbuf.extend_from_slice(&buf[..n]);
                    if let Some(end) = head_end(&self.inbuf[from..]) {
                        let head = std::mem::take(&mut self.inbuf);
                        return self.request(&head[..from + end]);
                    }
                    if self.inbuf.len() > MAX_REQUEST {
                        self.inbuf = Vec::new();
                        self.respond(
                            "431 Request Header Fields Too Large",
                            &format!("request longer than {MAX_REQUEST} bytes\n"),
                            false,
                        );
                        return Asked::Nothing;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Asked::Nothing,
                Err(_) => {
                    self.phase = Phase::Done;
                    return Asked::Nothing;
                }
            }
        }
    }

    /// The request line and headers arrived: judge them.
    fn request(&mut self, head: &[u8]) -> Asked {
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.trim_end_matches('\r').split(' ');
        let (method, target, version) = (parts.next(), parts.next(), parts.next());
        let http = version.is_some_and(|v| v.starts_with("HTTP/1.")) && parts.next().is_none();
        let (Some(method), Some(target), true) = (method, target, http) else {
            self.respond("400 Bad Request", "not an HTTP/1 request\n", false);
            return Asked::Nothing;
        };
        let path = target.split(['?', '#']).next().unwrap_or_default();
        if path != "/metrics" {
            self.respond("404 Not Found", "the metrics are at /metrics\n", method == "HEAD");
            return Asked::Nothing;
        }
        match method {
            "GET" => Asked::Metrics { head: false },
            "HEAD" => Asked::Metrics { head: true },
            _ => {
                self.respond("405 Method Not Allowed", "GET or HEAD\n", false);
                Asked::Nothing
            }
        }
    }

    /// Answer [`Asked::Metrics`] with the text.
    pub fn answer(&mut self, text: &str, head: bool) {
        self.out = header("200 OK", super::CONTENT_TYPE, text.len());
        if !head {
            self.out.extend_from_slice(text.as_bytes());
        }
        self.phase = Phase::Writing;
        self.write();
    }

    fn respond(&mut self, status: &str, body: &str, head: bool) {
        self.out = header(status, "text/plain; charset=utf-8", body.len());
        if status.starts_with("405") {
            // Before the blank line that ends the headers.
            self.out.truncate(self.out.len() - 2);
            self.out.extend_from_slice(b"Allow: GET, HEAD\r\n\r\n");
        }
        if !head {
            self.out.extend_from_slice(body.as_bytes());
        }
        self.phase = Phase::Writing;
        self.write();
    }

    fn write(&mut self) {
        while self.written < self.out.len() {
            match send(
                self.raw_fd(),
                &self.out[self.written..],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => {
                    self.phase = Phase::Done;
                    return;
                }
                Ok(n) => self.written += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => {
                    self.phase = Phase::Done;
                    return;
                }
            }
        }
        self.out = Vec::new();
        // The answer is out: end it, then read what the client still sends until it closes.
        let _ = shutdown(self.raw_fd(), Shutdown::Write);
        self.phase = Phase::Draining;
        self.drain();
    }

    fn drain(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match recv(self.raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => break,
                Ok(n) => {
                    self.drained += n;
                    if self.drained > MAX_DRAIN {
                        break;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return,
                Err(_) => break,
            }
        }
        self.phase = Phase::Done;
    }
}

/// Where the request's headers end (after the blank line), if they do.
fn head_end(data: &[u8]) -> Option<usize> {
    let crlf = data.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = data.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn header(status: &str, content_type: &str, len: usize) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A server on an ephemeral port, a client connected to it, and the accepted connection.
    fn pair() -> (MetricsServer, std::net::TcpStream, MetricsConn) {
        let server = MetricsServer::bind(&ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = server.listener().local_addr();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let conn = loop {
            let (mut v, e) = server.accept(Instant::now(), 4);
            assert!(e.is_none());
            if let Some(c) = v.pop() {
                break c;
            }
        };
        (server, client, conn)
    }

    fn answer_to(request: &[u8]) -> (Asked, String) {
        let (_server, mut client, mut conn) = pair();
        client.write_all(request).unwrap();
        let mut asked = Asked::Nothing;
        for _ in 0..100 {
            asked = conn.service();
            if asked != Asked::Nothing || conn.phase != Phase::Reading {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Asked::Metrics { head } = asked {
            conn.answer("m 1\n# EOF\n", head);
        }
        drop(client.shutdown(std::net::Shutdown::Write));
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        (asked, out)
    }

    #[test]
    fn get_head_and_the_rest() {
        let (asked, out) = answer_to(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(asked, Asked::Metrics { head: false });
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            out.contains("Content-Length: 10\r\n") && out.ends_with("\r\n\r\nm 1\n# EOF\n"),
            "{out}"
        );

        let (asked, out) = answer_to(b"HEAD /metrics?x=1 HTTP/1.0\n\n");
        assert_eq!(asked, Asked::Metrics { head: true });
        assert!(
            out.contains("Content-Length: 10\r\n") && out.ends_with("\r\n\r\n"),
            "{out}"
        );

        let (_, out) = answer_to(b"GET / HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
        let (_, out) = answer_to(b"POST /metrics HTTP/1.1\r\n\r\n");
        assert!(
            out.starts_with("HTTP/1.1 405 ") && out.contains("\r\nAllow: GET, HEAD\r\n\r\n"),
            "{out}"
        );
        let (_, out) = answer_to(b"hello\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400 "), "{out}");
        let (_, out) = answer_to(&vec![b'x'; MAX_REQUEST + 100]);
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
    }

    #[test]
    fn a_silent_client_is_dropped_at_its_deadline() {
        let (_server, _client, mut conn) = pair();
        assert_eq!(conn.service(), Asked::Nothing);
        conn.expire(Instant::now());
        assert!(!conn.is_done());
        conn.expire(conn.deadline());
        assert!(conn.is_done());
    }
}
