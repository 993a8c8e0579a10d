//! Log relay: a worker's stdout and stderr are pipes to the master, which splits them into
//! lines and writes each one into its own log, tagged with the worker's pid, generation and
//! stream.
//!
//! No line is lost: a pipe is read until EOF, also after its worker has exited (the master
//! drains the pipes of a reaped worker before it judges the exit, so the failure report has
//! the last lines). The read end is non-blocking and read in bounded chunks so that one chatty
//! worker cannot starve the event loop. The log never blocks the master (src/log/): what it
//! does not take is kept pending, and while that is full the master stops reading the pipes,
//! so that a slow log sink slows the worker through its full pipe: back-pressure, never loss.
//! A pipe that outlives its worker and the master's stop has its last unfinished line logged
//! too ([`Pipe::finish`]).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};

/// A line longer than this is written in pieces of this size.
pub const MAX_LINE: usize = 64 * 1024;
/// At most this much is read from one pipe per wake-up of the event loop.
const READ_BUDGET: usize = 256 * 1024;
/// One read. Small enough that what it formats into the log (a line of a few bytes becomes a
/// record of a hundred) overshoots little when the log says it has no more room.
const CHUNK: usize = 16 * 1024;

/// Handed over across an upgrade by name (`"stdout"`, `"stderr"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
        self.pump_while(drain, |line| {
            emit(line);
            true
        })
    }

    /// [`Pipe::pump`], but when `emit` returns false (the log has no more room), reading stops
    /// after the current chunk, unless `drain`.
    pub fn pump_while(&mut self, drain: bool, mut emit: impl FnMut(&[u8]) -> bool) {
        let mut read_total = 0;
        let mut more = true;
        let mut chunk = [0u8; CHUNK];
        while !self.eof && (drain || (more && read_total < READ_BUDGET)) {
            match nix::unistd::read(self.fd.as_raw_fd(), &mut chunk) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    read_total += n;
                    self.buf.extend_from_slice(&chunk[..n]);
                    more = self.emit_lines(&mut emit);
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

    /// Hand over the unfinished last line, if any (the master stops and will not read on).
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        let rest = std::mem::take(&mut self.buf);
        for piece in rest.chunks(MAX_LINE) {
            emit(piece);
        }
    }

    /// Emit every complete line; false if `emit` said no more room (for any of them).
    fn emit_lines(&mut self, emit: &mut impl FnMut(&[u8]) -> bool) -> bool {
        let mut more = true;
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &self.buf[start..]) {
            let line = &self.buf[start..start + nl];
            for piece in line.chunks(MAX_LINE.max(1)) {
                more &= emit(piece);
            }
            if line.is_empty() {
                more &= emit(line);
            }
            start += nl + 1;
        }
        // A line with no end in sight is written in pieces rather than buffered forever.
        while self.buf.len() - start >= MAX_LINE {
            more &= emit(&self.buf[start..start + MAX_LINE]);
            start += MAX_LINE;
        }
        self.buf.drain(..start);
        more
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
