//! The master's log: slog records, as text (slog-term) or JSON lines (slog-json), to stderr or
//! to a file that can be reopened for logrotate.
//!
//! # Theory of operation
//!
//! Everything that goes into the log — the master's own records, through the slog drains, and
//! the workers' lines, through [`LineBatch`] — is handed to one [`Sink`] as whole lines, and
//! nothing in the sink ever blocks the master's loop:
//!
//! - **Whole records.** A slog drain writes a record into a staging buffer; the [`Records`]
//!   drain around it commits the record when the drain is done (or discards it if the drain
//!   failed half-way). A batch of worker lines is committed in one piece.
//! - **A target that never blocks.** A file zdd opens itself (`[master] log = path`) is opened
//!   `O_NONBLOCK` (no effect on a regular file; a FIFO would otherwise block). Standard error
//!   is shared with whoever started zdd, so its open file description is left as it is: no
//!   `O_NONBLOCK` on it, which would make the shell or a sibling process that shares it get
//!   EAGAIN. Instead, by what fd 2 is: a regular file or block device is written as is (a
//!   write there waits for no reader); a socket (systemd's journal stream) gets `send` with
//!   `MSG_DONTWAIT`; a pipe, FIFO or terminal is opened anew through `/proc/self/fd/2`, which
//!   gives zdd its own description of the same pipe or terminal, and that one is made
//!   non-blocking. Where that open fails (no /proc, a FIFO whose reader is gone), fd 2 is
//!   polled before each write of at most `PIPE_BUF` bytes, which a pipe with room takes
//!   without blocking.
//! - **A bounded buffer.** What the target does not take at once (EAGAIN, or a short write)
//!   stays pending in memory, and the master polls [`Sink::poll_fd`] for POLLOUT and calls
//!   [`Sink::write_pending`] on every turn of its loop. Once [`PAUSE_AT`] bytes are pending,
//!   [`Sink::is_full`] tells the master to stop reading the workers' pipes: their pipes fill
//!   and the workers block writing (back-pressure: no worker line is dropped for want of room),
//!   while the master keeps serving signals, control requests and reaping. The master's own
//!   records are kept up to [`HARD_CAP`]; beyond it they are counted as lost, never waited for.
//!   (Between the two: the last lines of workers that exit meanwhile, read at once so that
//!   their exit is judged with its last lines, and the overshoot of the read under way.)
//! - **Write errors lose lines, counted, never torn.** A write that fails with anything but
//!   EAGAIN (disk full, quota, EIO, the reader of the pipe gone) drops what is pending, counted
//!   in `dropped_lines` (shown by `zdd status`); waiting instead would freeze every worker for
//!   as long as the disk is full. A line already begun is never dropped: the rest of it stays
//!   pending, so the log holds whole lines only. The first time a write succeeds again, a
//!   record "log: N lines lost while the log could not be written: <why>" goes first.
//! - **Stop and upgrade** write what is pending, waiting at most [`FLUSH_DEADLINE`]; what is
//!   left then is counted as lost.
//! - **Text format: control characters are escaped** (`\x1b`, `\x00`, `\x7f`, and the C1
//!   controls as `\u{9b}`), in worker lines and in the master's own records (which carry
//!   worker text: failure tails, STATUS=), so that nothing a worker prints can forge a log line
//!   or send escape sequences to the terminal of whoever reads the log. A tab is kept: it
//!   forges nothing. A backslash is not escaped, so that ordinary lines read exactly as
//!   slog-term prints them; the JSON format is the exact one. JSON strings are escaped by
//!   serde.
//!
//! The parts: `outbox.rs` decides what is written, kept or lost (the write passed in, so every
//! case is a unit test); `escape.rs` escapes control characters; `lines.rs` formats worker
//! lines in batches ([`LineBatch`]). This file holds the [`Sink`] around them, the non-blocking
//! [`Target`], and the slog logger.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::libc;
use serde_json::{json, Value};
use slog::{o, Drain, Logger, OwnedKVList, Record};

use crate::config::{LogFormat, LogTarget};
use crate::errno::describe;

mod escape;
mod lines;
mod outbox;

pub use escape::escape_str;
use escape::{escape_controls, needs_escape};
pub use lines::LineBatch;
use outbox::{line_end, Outbox};

/// Pending bytes from which the master stops reading the workers' pipes.
pub const PAUSE_AT: usize = 1024 * 1024;
/// Pending bytes beyond which the master's own records are dropped (and counted).
pub const HARD_CAP: usize = 4 * 1024 * 1024;
/// How long a stop or an upgrade waits for the log to take what is pending.
pub const FLUSH_DEADLINE: Duration = Duration::from_secs(2);

/// Where the log goes, as a target that never blocks a write.
enum Target {
    /// A file zdd opened (`[master] log = path`), `O_NONBLOCK`.
    File(File),
    /// fd 2 as it is: a regular file or a block device (a write waits for no reader).
    Stderr,
    /// Our own open file description of the pipe, FIFO or terminal on fd 2, non-blocking.
    Reopened(File),
    /// fd 2 is a socket: `send` with `MSG_DONTWAIT`.
    Socket,
    /// fd 2 could not be reopened: polled before each write of at most `PIPE_BUF` bytes.
    Polled,
}

impl Target {
    /// The target for what fd 2 is now.
    fn stderr() -> Target {
        let Ok(st) = nix::sys::stat::fstat(libc::STDERR_FILENO) else {
            // Closed: writes fail with EBADF and are counted as lost.
            return Target::Stderr;
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFBLK => Target::Stderr,
            libc::S_IFSOCK => Target::Socket,
            _ => match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
                .open("/proc/self/fd/2")
            {
                Ok(f) => Target::Reopened(f),
                Err(_) => Target::Polled,
            },
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Target::File(f) | Target::Reopened(f) => f.as_raw_fd(),
            Target::Stderr | Target::Socket | Target::Polled => libc::STDERR_FILENO,
        }
    }

    /// One write that does not block: Err(EAGAIN) when the target takes nothing now.
    fn write(&self, data: &[u8]) -> Result<usize, Errno> {
        let fd = self.fd();
        match self {
            Target::File(f) | Target::Reopened(f) => {
                let mut f: &File = f;
                f.write(data)
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            }
            Target::Stderr => raw_write(fd, data),
            Target::Socket => {
                use nix::sys::socket::{send, MsgFlags};
                send(fd, data, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL)
            }
            Target::Polled => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                let n = unsafe { libc::poll(&mut p, 1, 0) };
                if n == 0 {
                    return Err(Errno::EAGAIN);
                }
                // Writable (or an error the write reports): at most PIPE_BUF bytes, which a
                // pipe that polls writable takes whole without blocking.
                raw_write(fd, &data[..data.len().min(libc::PIPE_BUF)])
            }
        }
    }
}

fn raw_write(fd: RawFd, data: &[u8]) -> Result<usize, Errno> {
    // SAFETY: `data` is a valid slice of the given length; `fd` is fd 2.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

struct Shared {
    target: Target,
    out: Outbox,
    /// The record a slog drain is writing, committed whole once the drain is done.
    staged: Vec<u8>,
}

/// A cloneable handle on the log's target and its pending bytes. See the module header.
#[derive(Clone)]
pub struct Sink {
    inner: Arc<Mutex<Shared>>,
    path: Option<PathBuf>,
    format: LogFormat,
}

/// A record of the log's own, formatted as the logger formats a WARN record with one key.
fn notice_record(format: LogFormat, lines: u64, reason: &str) -> Vec<u8> {
    let s = if lines == 1 { "" } else { "s" };
    let msg = format!("log: {lines} line{s} lost while the log could not be written: {reason}");
    let mut out = Vec::with_capacity(msg.len() + 80);
    match format {
        LogFormat::Text => {
            let _ = slog_term::timestamp_local(&mut out);
            let _ = writeln!(out, " WARN {msg}, lost_lines: {lines}");
        }
        LogFormat::Json => {
            // In slog-json's order: msg, level, ts, then the keys.
            let ts = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
            let _ = writeln!(
                out,
                "{{\"msg\":{},\"level\":\"WARN\",\"ts\":{},\"lost_lines\":{lines}}}",
                Value::from(msg),
                Value::from(ts)
            );
        }
    }
    out
}

impl Sink {
    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
    }

    pub fn new(target: &LogTarget, format: LogFormat) -> io::Result<Sink> {
        let (t, path) = match target {
            LogTarget::Stderr => (Target::stderr(), None),
            LogTarget::File(p) => (Target::File(Self::open_file(p)?), Some(p.clone())),
        };
        Ok(Sink::with_target(t, path, format, Vec::new()))
    }

    /// A sink on `target`, with `pending` bytes (whole lines but the first, which may have
    /// been written in part) not yet taken by it.
    fn with_target(target: Target, path: Option<PathBuf>, format: LogFormat, pending: Vec<u8>) -> Sink {
        Sink {
            inner: Arc::new(Mutex::new(Shared {
                target,
                out: Outbox {
                    buf: pending,
                    ..Outbox::default()
                },
                staged: Vec::new(),
            })),
            path,
            format,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Open the log file again (after logrotate renamed it). A no-op for stderr.
    pub fn reopen(&self) -> io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let file = Self::open_file(path)?;
        let mut s = self.lock();
        let Shared { target, out, .. } = &mut *s;
        // A line begun in the old file is finished there if it can be; its rest would be a
        // torn line at the top of the new one.
        out.write_pending(&mut |d| target.write(d));
        if out.head > 0 {
            let end = line_end(&out.buf, out.head);
            let reason = out.error.map_or_else(|| "the log was reopened".to_string(), describe);
            out.lose(1, end - out.head, reason);
            out.head = end;
            out.compact();
        }
        out.blocked = false;
        *target = Target::File(file);
        Ok(())
    }

    /// Look at fd 2 again: daemonizing replaced it (with /dev/null, unless it was a file).
    pub fn reattach_stderr(&self) {
        if self.path.is_none() {
            let mut s = self.lock();
            s.target = Target::stderr();
            s.out.blocked = false;
        }
    }

    /// Worker lines (whole lines, formatted): written now or kept pending; never dropped for
    /// want of room (the master stops reading the workers while [`Sink::is_full`]); `count`:
    /// how many lines they are (counted as relayed).
    pub fn commit_lines(&self, lines: &[u8], count: u64) {
        let format = self.format;
        let mut s = self.lock();
        s.out.relayed_lines = s.out.relayed_lines.saturating_add(count);
        let Shared { target, out, .. } = &mut *s;
        out.commit(lines, false, &mut |d| target.write(d), |n, why| {
            notice_record(format, n, why)
        });
    }

    /// A slog drain finished a record: commit it (escaped, in text format).
    fn commit_staged(&self) {
        let format = self.format;
        let mut s = self.lock();
        let Shared { target, out, staged } = &mut *s;
        if !staged.ends_with(b"\n") {
            staged.push(b'\n');
        }
        let body = &staged[..staged.len() - 1];
        if format == LogFormat::Text && needs_escape(body) {
            let mut escaped = Vec::with_capacity(staged.len() + 16);
            escape_controls(body, &mut escaped);
            escaped.push(b'\n');
            out.commit(&escaped, true, &mut |d| target.write(d), |n, why| {
                notice_record(format, n, why)
            });
        } else {
            out.commit(staged, true, &mut |d| target.write(d), |n, why| {
                notice_record(format, n, why)
            });
        }
        staged.clear();
    }

    fn discard_staged(&self) {
        self.lock().staged.clear();
    }

    /// Write what is pending, as far as the target takes it now. Called on every turn of the
    /// master's loop; cheap when nothing is pending.
    pub fn write_pending(&self) {
        let mut s = self.lock();
        let Shared { target, out, .. } = &mut *s;
        if out.pending() > 0 {
            out.write_pending(&mut |d| target.write(d));
        }
    }

    /// The fd to poll for POLLOUT: while pending bytes wait for the target to take them.
    pub fn poll_fd(&self) -> Option<RawFd> {
        let s = self.lock();
        (s.out.blocked && s.out.pending() > 0).then(|| s.target.fd())
    }

    /// So much is pending that the master must stop reading the workers' pipes.
    pub fn is_full(&self) -> bool {
        self.lock().out.pending() >= PAUSE_AT
    }

    /// Even an exited worker's last lines must wait: its pipes stay unread for now.
    pub fn is_over_cap(&self) -> bool {
        self.lock().out.pending() >= HARD_CAP
    }

    /// Write everything pending, waiting at most [`FLUSH_DEADLINE`] (at stop, before an
    /// upgrade's exec). What is left is counted as lost; returns how many lines that was.
    pub fn flush(&self) -> u64 {
        let now = Instant::now();
        let end = crate::clock::after(now, FLUSH_DEADLINE);
        loop {
            let fd = {
                let mut s = self.lock();
                let Shared { target, out, .. } = &mut *s;
                out.write_pending(&mut |d| target.write(d));
                if out.pending() == 0 {
                    return 0;
                }
                if !out.blocked {
                    // A write error: what is left is the rest of a line begun.
                    break;
                }
                target.fd()
            };
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 60_000) as i32;
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, ms) };
        }
        let why = format!("the log did not take them within {FLUSH_DEADLINE:?}");
        self.lock().out.give_up(why)
    }

    /// For `zdd status`: what is pending and what was lost.
    pub fn status(&self) -> Value {
        let s = self.lock();
        json!({
            "pending_bytes": s.out.pending(),
            "relay_paused": s.out.pending() >= PAUSE_AT,
            "relayed_lines": s.out.relayed_lines,
            "dropped_lines": s.out.dropped_lines,
            "dropped_bytes": s.out.dropped_bytes,
            "error": s.out.error.map(describe),
        })
    }

    /// The log file zdd writes, if it writes one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Bytes waiting for the log to take them.
    pub fn pending(&self) -> usize {
        self.lock().out.pending()
    }

    /// Lines lost so far (for the stop reply).
    pub fn dropped_lines(&self) -> u64 {
        self.lock().out.dropped_lines
    }

    /// (worker lines relayed, lines lost) since this image started (metrics).
    pub fn line_counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.out.relayed_lines, s.out.dropped_lines)
    }
}

/// What slog's drains write into: the record being formatted.
struct Staging(Sink);

impl Write for Staging {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().staged.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The log as the running master writes it: its file, kept open across the exec (so a log
/// directory removed since start does not fail the resume), and its path for reopening.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct LogState {
    pub path: Option<PathBuf>,
    pub fd: Option<RawFd>,
    /// Formatted bytes the log had not taken yet (the first line possibly begun).
    #[serde(default)]
    pub pending: Vec<u8>,
}

impl Sink {
    /// What an upgrade hands over: the log file's path, its open fd (so that the new image
    /// keeps writing to the same file even if its directory is gone meanwhile) and the bytes
    /// still pending (so that a slow log loses nothing over an upgrade).
    pub fn handover(&self) -> LogState {
        let s = self.lock();
        let fd = match &s.target {
            Target::File(f) => Some(f.as_raw_fd()),
            _ => None,
        };
        LogState {
            path: self.path.clone(),
            fd,
            pending: s.out.buf[s.out.head..].to_vec(),
        }
    }
}

/// The log of a master resumed after an upgrade: the file handed over (taken over by the
/// caller, close-on-exec again), or stderr, with what was still pending.
pub fn resume(
    path: Option<PathBuf>,
    file: Option<std::os::fd::OwnedFd>,
    pending: Vec<u8>,
    format: LogFormat,
) -> (Logger, Sink) {
    let target = match file {
        Some(fd) => Target::File(File::from(fd)),
        None => Target::stderr(),
    };
    let sink = Sink::with_target(target, path, format, pending);
    (logger(sink.clone(), format), sink)
}

/// Around a formatting drain: commits each record whole once it is formatted, or discards
/// what was formatted of a record that failed.
struct Records<D> {
    inner: D,
    sink: Sink,
}

impl<D: Drain> Drain for Records<D> {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        match self.inner.log(record, values) {
            Ok(_) => self.sink.commit_staged(),
            Err(_) => self.sink.discard_staged(),
        }
        Ok(())
    }
}

/// Build the logger for the configured target and format.
pub fn build(target: &LogTarget, format: LogFormat) -> io::Result<(Logger, Sink)> {
    let sink = Sink::new(target, format)?;
    Ok((logger(sink.clone(), format), sink))
}

pub fn logger(sink: Sink, format: LogFormat) -> Logger {
    let staging = Staging(sink.clone());
    match format {
        LogFormat::Text => {
            let decorator = slog_term::PlainSyncDecorator::new(staging);
            let drain = slog_term::FullFormat::new(decorator).build();
            Logger::root(Records { inner: drain, sink }, o!())
        }
        LogFormat::Json => {
            let json = slog_json::Json::new(staging).add_default_keys().build();
            Logger::root(
                Records {
                    inner: Mutex::new(json),
                    sink,
                },
                o!(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slog::info;

    #[test]
    fn reopening_finishes_or_drops_a_begun_line_and_reports_the_loss_in_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (log, sink) = build(&LogTarget::File(path.clone()), LogFormat::Json).unwrap();
        // Simulate a full disk: half a line written, the rest pending, one line lost.
        {
            let mut s = sink.lock();
            s.out.buf = b"half a line\n".to_vec();
            s.out.head = 5;
            s.out.error = Some(Errno::ENOSPC);
            s.out.lose(1, 10, describe(Errno::ENOSPC));
        }
        std::fs::rename(&path, dir.path().join("log.1")).unwrap();
        sink.reopen().unwrap();
        info!(log, "after");
        let old = std::fs::read_to_string(dir.path().join("log.1")).unwrap();
        assert_eq!(old, "a line\n", "the rest of the line begun goes to the old file");
        let new = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = new.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{new}");
        assert_eq!(
            lines[0]["msg"],
            "log: 1 line lost while the log could not be written: no space left on device (ENOSPC)"
        );
        assert_eq!(lines[0]["lost_lines"], 1);
        assert_eq!(lines[1]["msg"], "after");
        assert_eq!(sink.status()["dropped_lines"], 1);
    }
}
