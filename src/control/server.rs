//! The master's side of the control socket: the listening socket, its file, and each client
//! connection as part of the master's poll loop (see the protocol in [`super`]).

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};

use super::protocol::{decode_request, Reply, Request, MAX_REQUEST, REQUEST_TIMEOUT};
use crate::errno::describe_io;
use crate::sockfile::{file_id, path_is_socket, remove_if_same, socket_is_live};

/// Output queued for a client that does not read, before it is dropped.
const MAX_PENDING_OUTPUT: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {op}: {msg}")]
    Io {
        path: String,
        op: &'static str,
        msg: String,
    },
    #[error("control socket {0} exists and is not a socket; refusing to remove it")]
    NotASocket(String),
    #[error("already running? control socket {0} is in use by a live process; refusing to replace it")]
    InUse(String),
}

/// The listening control socket.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's (dev, ino) as bound: removed at drop only while it is still that file.
    file: Option<(u64, u64)>,
}

impl ControlServer {
    /// Bind at `path`. A socket file there is replaced only if nobody listens on it (a dead
    /// master's); the pid-file lock alone proves nothing, since the pid file may have been
    /// removed under a running master. Anything else there is refused.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let io = |op: &'static str| {
            move |e: std::io::Error| ControlError::Io {
                path: path.display().to_string(),
                op,
                msg: describe_io(&e),
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if socket_is_live(path) {
                    return Err(ControlError::InUse(path.display().to_string()));
                }
                std::fs::remove_file(path).map_err(io("unlink stale socket"))?
            }
            Ok(_) => return Err(ControlError::NotASocket(path.display().to_string())),
            Err(_) => {}
        }
        // Create it with no access for anyone but the owner from the start.
        // SAFETY: umask only changes this process's file-creation mask; restored at once.
        let old = unsafe { nix::libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { nix::libc::umask(old) };
        let listener = bound.map_err(io("bind"))?;
        let server = ControlServer {
            listener,
            path: path.to_path_buf(),
            file: file_id(path),
        };
        server.listener.set_nonblocking(true).map_err(io("set non-blocking"))?;
        Ok(server)
    }

    pub fn raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Where it is bound.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Take over the socket handed across an upgrade. The file at `path` is taken to be the
    /// one the previous image bound: the master held it across the exec.
    pub fn from_fd(fd: std::os::fd::OwnedFd, path: &Path) -> ControlServer {
        let listener = UnixListener::from(fd);
        let _ = listener.set_nonblocking(true);
        ControlServer {
            listener,
            path: path.to_path_buf(),
            file: file_id(path).filter(|_| path_is_socket(path)),
        }
    }

    /// Accept pending connections, at most `max`. Returns them, and the error that stopped
    /// accepting if it was not "nothing more pending" (EMFILE, ENFILE, ENOBUFS, ENOMEM: the
    /// connection stays queued and the listener stays readable, so the caller must wait before
    /// trying again rather than poll it at once).
    pub fn accept(&self, now: Instant, max: usize) -> (Vec<Conn>, Option<std::io::Error>) {
        let mut out = Vec::new();
        while out.len() < max {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let peer = getsockopt(&stream, sockopt::PeerCredentials).ok();
                    out.push(Conn {
                        waiting: None,
                        stream,
                        peer_uid: peer.map(|c| c.uid()),
                        peer_pid: peer.map(|c| c.pid()),
                        inbuf: Vec::new(),
                        outbuf: Vec::new(),
                        deadline: Some(crate::clock::after(now, REQUEST_TIMEOUT)),
                        closing: false,
                        dead: false,
                    });
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(nix::libc::ECONNABORTED) => {
                    break
                }
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        remove_if_same(&self.path, self.file);
    }
}

/// What reading from a connection produced.
#[derive(Debug, PartialEq)]
pub enum Input {
    Nothing,
    Request(Request),
    /// A bad request: reply with this error, then close.
    Bad(String),
}

/// What a connection waits for, after its request. (A reload's waiters are the generations
/// machine's: it answers them by `ClientId`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The master's exit.
    Stop,
    /// The outcome of the upgrade (answered by the new image, or the old one after a
    /// rollback, or the old one if the new binary was refused).
    Upgrade,
}

/// One client connection.
pub struct Conn {
    pub waiting: Option<Waiting>,
    stream: UnixStream,
    pub peer_uid: Option<u32>,
    pub peer_pid: Option<i32>,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    /// Until a request has arrived: when to give up on it.
    pub deadline: Option<Instant>,
    /// Close once the output is flushed.
    closing: bool,
    /// Gone: drop it.
    pub dead: bool,
}

impl Conn {
    /// A connection handed across an upgrade, waiting for its result.
    pub fn from_fd(fd: std::os::fd::OwnedFd) -> Conn {
        let stream = UnixStream::from(fd);
        let _ = stream.set_nonblocking(true);
        Conn {
            waiting: None,
            stream,
            peer_uid: None,
            peer_pid: None,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            deadline: None,
            closing: false,
            dead: false,
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub fn wants_write(&self) -> bool {
        !self.outbuf.is_empty()
    }

    pub fn wants_read(&self) -> bool {
        self.deadline.is_some() && !self.closing
    }

    /// Read what is there; return a request once a whole line arrived.
    pub fn read(&mut self) -> Input {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    // Peer closed its side; a request without newline at EOF still counts.
                    if self.deadline.is_some() && !self.inbuf.is_empty() {
                        let line = std::mem::take(&mut self.inbuf);
                        return self.take_request(&line);
                    }
                    if self.deadline.is_some() {
                        self.dead = true;
                    }
                    return Input::Nothing;
                }
                Ok(n) => {
                    if self.deadline.is_none() {
                        // One request per connection; anything after it is ignored.
                        continue;
                    }
                    self.inbuf.extend_from_slice(&buf[..n]);
                    if let Some(nl) = self.inbuf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = self.inbuf[..nl].to_vec();
                        self.inbuf.clear();
                        return self.take_request(&line);
                    }
                    if self.inbuf.len() > MAX_REQUEST {
                        self.deadline = None;
                        return Input::Bad(format!("request longer than {MAX_REQUEST} bytes"));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Input::Nothing,
                Err(_) => {
                    self.dead = true;
                    return Input::Nothing;
                }
            }
        }
    }

    fn take_request(&mut self, line: &[u8]) -> Input {
        self.deadline = None;
        match decode_request(line) {
            Ok(r) => Input::Request(r),
            Err(e) => Input::Bad(e),
        }
    }

    /// Queue a reply; a result line ends the conversation.
    pub fn send(&mut self, reply: &Reply) {
        if self.dead {
            return;
        }
        self.outbuf.extend_from_slice(&reply.encode());
        if matches!(reply, Reply::Result { .. }) {
            self.closing = true;
        }
        if self.outbuf.len() > MAX_PENDING_OUTPUT {
            self.dead = true;
        }
        self.flush();
    }

    /// Write as much queued output as the socket takes.
    pub fn flush(&mut self) {
        while !self.outbuf.is_empty() && !self.dead {
            match self.stream.write(&self.outbuf) {
                Ok(0) => self.dead = true,
                Ok(n) => {
                    self.outbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => self.dead = true,
            }
        }
        if self.outbuf.is_empty() && self.closing {
            self.dead = true;
        }
    }

    /// Send a last reply and wait until it is written (at the master's exit). The connection
    /// stays open until the process exits, so the client's EOF means the master is gone.
    pub fn send_final(&mut self, reply: &Reply) {
        self.outbuf.extend_from_slice(&reply.encode());
        let _ = self.stream.set_nonblocking(false);
        let _ = self.stream.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = self.stream.write_all(&self.outbuf);
        self.outbuf.clear();
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_and_split_requests() {
        let dir = tempfile::tempdir().unwrap();
        let server = ControlServer::bind(&dir.path().join("c.sock")).unwrap();
        let mut client = UnixStream::connect(dir.path().join("c.sock")).unwrap();
        let (mut conns, _) = server.accept(Instant::now(), 16);
        let conn = &mut conns[0];
        assert_eq!(conn.peer_uid, Some(nix::unistd::getuid().as_raw()));
        client.write_all(br#"{"cmd":"#).unwrap();
        assert_eq!(conn.read(), Input::Nothing);
        client.write_all(b"\"status\"}\n").unwrap();
        assert_eq!(conn.read(), Input::Request(Request::Status {}));

        let mut client = UnixStream::connect(dir.path().join("c.sock")).unwrap();
        let (mut conns, _) = server.accept(Instant::now(), 16);
        let conn = &mut conns[0];
        client.set_nonblocking(true).unwrap();
        let big = vec![b'x'; MAX_REQUEST + 10];
        let mut written = 0;
        let mut result = Input::Nothing;
        while written < big.len() && result == Input::Nothing {
            if let Ok(n) = client.write(&big[written..]) {
                written += n;
            }
            result = conn.read();
        }
        assert!(
            matches!(result, Input::Bad(ref m) if m.contains("longer than")),
            "{result:?}"
        );
    }
}
