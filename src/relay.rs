//! Log relay: a worker's stdout and stderr are pipes to the master, which splits them into
//! lines and writes each one into its own log, tagged with the worker's pid, generation and
//! stream.
//!
//! No line is lost: a pipe is read until EOF, also after its worker has exited (the master
//! drains the pipes of a reaped worker before it judges the exit, so the failure report has
//! the last lines). The read end is non-blocking and read in bounded chunks so that one chatty
//! worker cannot starve the event loop; writing the log is synchronous, so a slow log sink
//! slows the master's reads and, through the full pipe, the worker: back-pressure, never loss.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// A line longer than this is written in pieces of this size.
pub const MAX_LINE: usize = 64 * 1024;
/// At most this much is read from one pipe per wake-up of the event loop.
const READ_BUDGET: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The master's read end of one worker stream.
pub struct Pipe {
    fd: OwnedFd,
    pub stream: Stream,
    buf: Vec<u8>,
    eof: bool,
}

impl Pipe {
    pub fn new(fd: OwnedFd, stream: Stream) -> Pipe {
        if let Ok(flags) = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL) {
            let _ = fcntl(
                fd.as_raw_fd(),
                FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
            );
        }
        Pipe {
            fd,
            stream,
            buf: Vec::with_capacity(8192),
            eof: false,
        }
    }

    /// The bytes of a line not yet complete (handed across an upgrade).
    pub fn partial(&self) -> &[u8] {
        &self.buf
    }

    /// Continue a pipe handed across an upgrade, with its incomplete line.
    pub fn resume(fd: OwnedFd, stream: Stream, partial: Vec<u8>) -> Pipe {
        let mut p = Pipe::new(fd, stream);
        p.buf = partial;
        p
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn is_eof(&self) -> bool {
        self.eof
    }

    /// Read what is available (at most a budget, unless `drain`) and hand every complete line
    /// to `emit`, without its newline. At EOF the last partial line is emitted too.
    pub fn pump(&mut self, drain: bool, mut emit: impl FnMut(&[u8])) {
        let mut read_total = 0;
        let mut chunk = [0u8; 65536];
        while !self.eof && (drain || read_total < READ_BUDGET) {
            match nix::unistd::read(self.fd.as_raw_fd(), &mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    read_total += n;
                    self.buf.extend_from_slice(&chunk[..n]);
                    self.emit_lines(&mut emit);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(_) => self.eof = true,
            }
        }
        if self.eof && !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            for piece in rest.chunks(MAX_LINE) {
                emit(piece);
            }
        }
    }

    fn emit_lines(&mut self, emit: &mut impl FnMut(&[u8])) {
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let line = &self.buf[start..start + nl];
            for piece in line.chunks(MAX_LINE.max(1)) {
                emit(piece);
            }
            if line.is_empty() {
                emit(line);
            }
            start += nl + 1;
        }
        // A line with no end in sight is written in pieces rather than buffered forever.
        while self.buf.len() - start >= MAX_LINE {
            emit(&self.buf[start..start + MAX_LINE]);
            start += MAX_LINE;
        }
        self.buf.drain(..start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pipe() -> (Pipe, std::fs::File) {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
        (Pipe::new(r, Stream::Stdout), std::fs::File::from(w))
    }

    #[test]
    fn splits_lines_and_flushes_partial_at_eof() {
        let (mut p, mut w) = pipe();
        w.write_all(b"one\n\ntwo\nthr").unwrap();
        let mut lines = Vec::new();
        p.pump(false, |l| lines.push(String::from_utf8_lossy(l).into_owned()));
        assert_eq!(lines, ["one", "", "two"]);
        w.write_all(b"ee").unwrap();
        drop(w);
        p.pump(true, |l| lines.push(String::from_utf8_lossy(l).into_owned()));
        assert_eq!(lines, ["one", "", "two", "three"]);
        assert!(p.is_eof());
    }

    #[test]
    fn long_lines_are_split_not_dropped() {
        let (mut p, mut w) = pipe();
        let long = vec![b'x'; MAX_LINE + 10];
        let writer = std::thread::spawn(move || {
            w.write_all(&long).unwrap();
            w.write_all(b"\n").unwrap();
        });
        let mut sizes = Vec::new();
        while !p.is_eof() {
            p.pump(true, |l| sizes.push(l.len()));
        }
        writer.join().unwrap();
        assert_eq!(sizes.iter().sum::<usize>(), MAX_LINE + 10);
        assert_eq!(sizes[0], MAX_LINE);
    }
}
