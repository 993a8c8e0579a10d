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

/// How a run of writes ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Done,
    /// The target takes nothing now (EAGAIN): try again when it polls writable.
    Blocked,
    Failed(Errno),
}

/// Write `data` until it is all written, the target would block or fails.
fn write_some(write: &mut impl FnMut(&[u8]) -> Result<usize, Errno>, data: &[u8]) -> (usize, Outcome) {
    let mut done = 0;
    while done < data.len() {
        match write(&data[done..]) {
            Ok(0) => return (done, Outcome::Failed(Errno::EIO)),
            Ok(n) => done += n.min(data.len() - done),
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => return (done, Outcome::Blocked),
            Err(e) => return (done, Outcome::Failed(e)),
        }
    }
    (done, Outcome::Done)
}

/// The start of the line that `pos` is in.
fn line_start(data: &[u8], pos: usize) -> usize {
    data[..pos].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

/// The end of the line that `pos` is in: `pos` itself when it starts a line.
fn line_end(data: &[u8], pos: usize) -> usize {
    if pos == 0 || data.get(pos - 1) == Some(&b'\n') {
        return pos;
    }
    match data[pos..].iter().position(|&b| b == b'\n') {
        Some(i) => pos + i + 1,
        None => data.len(),
    }
}

fn count_lines(data: &[u8]) -> u64 {
    let n = data.iter().filter(|&&b| b == b'\n').count() as u64;
    // A last line without its newline is a line too.
    n + u64::from(data.last().is_some_and(|&b| b != b'\n'))
}

/// What the sink owes the log: pending bytes and what was lost. Decisions only; the write is
/// passed in, so that every case is a unit test.
#[derive(Default)]
struct Outbox {
    /// Pending bytes: whole lines, from the start of the first one, which may have been
    /// written in part (up to `head`).
    buf: Vec<u8>,
    /// Bytes at the start of `buf` already written: 0, or within the first line (a line
    /// begun, which must be finished before anything else goes out or is dropped).
    head: usize,
    /// The last write would have blocked: wait for the target to poll writable.
    blocked: bool,
    /// A loss notice in `buf` not yet written in full: where it starts and ends, how many
    /// lines it reports.
    notice: Option<(usize, usize, u64)>,
    /// Lines lost and not yet reported in the log.
    unreported: u64,
    /// Why lines were lost last.
    reason: String,
    dropped_lines: u64,
    dropped_bytes: u64,
    /// The error of the last write, until a write succeeds again.
    error: Option<Errno>,
}

impl Outbox {
    fn pending(&self) -> usize {
        self.buf.len() - self.head
    }

    fn lose(&mut self, lines: u64, bytes: usize, reason: String) {
        self.dropped_lines = self.dropped_lines.saturating_add(lines);
        self.dropped_bytes = self.dropped_bytes.saturating_add(bytes as u64);
        self.unreported = self.unreported.saturating_add(lines);
        self.reason = reason;
    }

    /// Take `record` (whole lines): written at once if nothing is pending and the target takes
    /// it, else kept pending. `own`: a record of the master's, dropped past [`HARD_CAP`];
    /// worker lines are never dropped for want of room (the caller stops reading them).
    fn commit(
        &mut self,
        record: &[u8],
        own: bool,
        write: &mut impl FnMut(&[u8]) -> Result<usize, Errno>,
        notice: impl FnOnce(u64, &str) -> Vec<u8>,
    ) {
        if record.is_empty() {
            return;
        }
        if own && self.pending() + record.len() > HARD_CAP {
            let why = format!("the log did not take them ({} bytes were pending)", self.pending());
            self.lose(count_lines(record), record.len(), why);
            return;
        }
        if self.pending() == 0 && self.unreported == 0 && !self.blocked {
            // The usual case: straight from the caller's buffer, no copy.
            self.buf.clear();
            self.head = 0;
            let (n, outcome) = write_some(write, record);
            match outcome {
                Outcome::Done => self.error = None,
                Outcome::Blocked => {
                    self.blocked = true;
                    let start = line_start(record, n);
                    self.buf.extend_from_slice(&record[start..]);
                    self.head = n - start;
                }
                Outcome::Failed(e) => {
                    // Keep the rest of a line begun; drop the lines after it.
                    let (start, keep) = (line_start(record, n), line_end(record, n));
                    self.buf.extend_from_slice(&record[start..keep]);
                    self.head = n - start;
                    self.failed(e, &record[keep..], 0);
                }
            }
            return;
        }
        if self.unreported > 0 {
            let text = notice(self.unreported, &self.reason);
            let start = self.buf.len();
            self.buf.extend_from_slice(&text);
            self.notice = Some((start, self.buf.len(), self.unreported));
            self.unreported = 0;
        }
        self.buf.extend_from_slice(record);
        if !self.blocked {
            self.write_pending(write);
        }
    }

    /// A write failed with `e`: `dropped` (whole lines) is lost; `from` is where it begins in
    /// `buf`. A notice among them is no lost line, and the lines it reported are unreported
    /// again.
    fn failed(&mut self, e: Errno, dropped: &[u8], from: usize) {
        let mut lines = count_lines(dropped);
        let mut bytes = dropped.len();
        if let Some((start, end, reported)) = self.notice {
            if start >= from {
                self.notice = None;
                self.unreported = self.unreported.saturating_add(reported);
                lines = lines.saturating_sub(1);
                bytes = bytes.saturating_sub(end - start);
            }
        }
        self.error = Some(e);
        self.lose(lines, bytes, describe(e));
    }

    /// Write what is pending, as far as the target takes it.
    fn write_pending(&mut self, write: &mut impl FnMut(&[u8]) -> Result<usize, Errno>) {
        if self.pending() == 0 {
            self.blocked = false;
            return;
        }
        let (n, outcome) = write_some(write, &self.buf[self.head..]);
        self.head += n;
        if self.notice.is_some_and(|(_, end, _)| self.head >= end) {
            self.notice = None;
        }
        if n > 0 {
            self.error = None;
        }
        self.blocked = outcome == Outcome::Blocked;
        if let Outcome::Failed(e) = outcome {
            let keep = line_end(&self.buf, self.head);
            let dropped = std::mem::take(&mut self.buf);
            self.failed(e, &dropped[keep..], keep);
            self.buf = dropped;
            self.buf.truncate(keep);
        }
        self.compact();
    }

    fn compact(&mut self) {
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
            // Back to a small buffer once a blocked sink has caught up.
            if self.buf.capacity() > 256 * 1024 {
                self.buf.shrink_to(64 * 1024);
            }
        } else if self.head >= self.buf.len() / 2 {
            // Keep the line begun whole in `buf`: `head` > 0 says that it was begun.
            let cut = line_start(&self.buf, self.head);
            self.buf.drain(..cut);
            if let Some((start, end, _)) = &mut self.notice {
                *start = start.saturating_sub(cut);
                *end -= cut;
            }
            self.head -= cut;
        }
    }

    /// Give up on what is pending (at stop): counted as lost. Returns the lines given up.
    fn give_up(&mut self, reason: String) -> u64 {
        let rest = self.buf.split_off(self.head);
        let mut lines = count_lines(&rest);
        if self.notice.take().is_some() {
            lines = lines.saturating_sub(1);
        }
        self.lose(lines, rest.len(), reason);
        self.buf.clear();
        self.head = 0;
        lines
    }
}

/// Append `text` to `out` with its control characters escaped: C0 controls but tab as `\xHH`,
/// DEL as `\x7f`, C1 controls (U+0080–U+009F) as `\u{HH}`.
pub fn escape_controls(text: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        if (b < 0x20 && b != b'\t') || b == 0x7f {
            let _ = write!(out, "\\x{b:02x}");
        } else if b == 0xc2 && text.get(i + 1).is_some_and(|c| (0x80..=0x9f).contains(c)) {
            let _ = write!(out, "\\u{{{:x}}}", text[i + 1]);
            i += 1;
        } else {
            out.push(b);
        }
        i += 1;
    }
}

/// Whether [`escape_controls`] would change `text` (may say yes for text it leaves alone).
pub fn needs_escape(text: &[u8]) -> bool {
    text.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f || b == 0xc2)
}

/// Whether every byte of `line` is printable ASCII (0x20–0x7e), and whether moreover none is
/// a quote or a backslash: the common case, where a line needs neither UTF-8 repair nor
/// escaping, in text or JSON. Eight bytes at a time (the worker relay's hot path).
fn plain_ascii(line: &[u8]) -> (bool, bool) {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // The high bit of a byte of `has(x)` is set if that byte of x is zero (exact as a whole:
    // a borrow only spreads above a byte that is zero already).
    let has_zero = |x: u64| x.wrapping_sub(LO) & !x;
    let mut text_bad = 0u64;
    let mut json_bad = 0u64;
    let mut chunks = line.chunks_exact(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        let x = u64::from_le_bytes(a);
        // >= 0x80 (x itself), < 0x20, DEL.
        text_bad |= x | (x.wrapping_sub(0x20 * LO) & !x) | has_zero(x ^ (0x7f * LO));
        json_bad |= has_zero(x ^ (b'"' as u64 * LO)) | has_zero(x ^ (b'\\' as u64 * LO));
    }
    let rest = chunks.remainder();
    let printable = text_bad & HI == 0 && rest.iter().all(|&b| (0x20..0x7f).contains(&b));
    let json = printable && json_bad & HI == 0 && !rest.iter().any(|&b| b == b'"' || b == b'\\');
    (printable, json)
}

/// `text` with its control characters escaped (see [`escape_controls`]).
pub fn escape_str(text: &str) -> std::borrow::Cow<'_, str> {
    if !needs_escape(text.as_bytes()) {
        return text.into();
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    escape_controls(text.as_bytes(), &mut out);
    // Only ASCII controls and whole two-byte C1 sequences were replaced, by ASCII.
    String::from_utf8_lossy(&out).into_owned().into()
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
        Ok(Sink {
            inner: Arc::new(Mutex::new(Shared {
                target: t,
                out: Outbox::default(),
                staged: Vec::new(),
            })),
            path,
            format,
        })
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
    /// want of room (the master stops reading the workers while [`Sink::is_full`]).
    pub fn commit_lines(&self, lines: &[u8]) {
        let format = self.format;
        let mut s = self.lock();
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
        let end = now.checked_add(FLUSH_DEADLINE).unwrap_or(now);
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
            "dropped_lines": s.out.dropped_lines,
            "dropped_bytes": s.out.dropped_bytes,
            "error": s.out.error.map(describe),
        })
    }

    /// Bytes waiting for the log to take them.
    pub fn pending(&self) -> usize {
        self.lock().out.pending()
    }

    /// Lines lost so far (for the stop reply).
    pub fn dropped_lines(&self) -> u64 {
        self.lock().out.dropped_lines
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

impl Sink {
    /// What an upgrade hands over: the log file's path, its open fd (so that the new image
    /// keeps writing to the same file even if its directory is gone meanwhile) and the bytes
    /// still pending (so that a slow log loses nothing over an upgrade).
    pub fn handover(&self) -> crate::master::handover::LogState {
        let s = self.lock();
        let fd = match &s.target {
            Target::File(f) => Some(f.as_raw_fd()),
            _ => None,
        };
        crate::master::handover::LogState {
            path: self.path.clone(),
            fd,
            pending: s.out.buf[s.out.head..].to_vec(),
        }
    }
}

/// The log of a master resumed after an upgrade: the file handed over (close-on-exec again),
/// or stderr, with what was still pending.
pub fn resume(state: crate::master::handover::LogState, format: LogFormat) -> (Logger, Sink) {
    let target = match state.fd {
        Some(fd) => Target::File(File::from(crate::master::handover::own(fd))),
        None => Target::stderr(),
    };
    let sink = Sink {
        inner: Arc::new(Mutex::new(Shared {
            target,
            out: Outbox {
                buf: state.pending,
                ..Outbox::default()
            },
            staged: Vec::new(),
        })),
        path: state.path,
        format,
    };
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

/// Worker lines, formatted byte for byte as the master's logger formats a record with the
/// keys pid, generation and stream, but written in batches: one `write` per read of the
/// worker's pipe instead of one formatted record and one `write` per line. The lines of one
/// batch share one timestamp, taken when the batch began (when the pipe was read).
///
/// Callers flush before anything else is logged, so the order of records is kept.
pub struct LineBatch {
    sink: Sink,
    format: LogFormat,
    /// Text: "<timestamp> INFO "; JSON: the timestamp string, quoted.
    stamp: Vec<u8>,
    buf: Vec<u8>,
    /// Where the next relay turn starts among the workers, so that a slow log sink, which
    /// lets only the first few be read per turn, starves none of them.
    turn: usize,
    /// Bytes this batch may grow to before the sink is full ([`PAUSE_AT`]), as of the last
    /// look at the sink.
    room: usize,
}

/// Flush a batch when it grows past this, so a flood of lines needs no more memory.
const BATCH_LIMIT: usize = 256 * 1024;

impl LineBatch {
    pub fn new(sink: Sink, format: LogFormat) -> LineBatch {
        LineBatch {
            sink,
            format,
            stamp: Vec::new(),
            buf: Vec::new(),
            turn: 0,
            room: PAUSE_AT,
        }
    }

    /// Start a new batch: its lines get a timestamp taken when the first of them arrives.
    /// Cheap when no line follows (it is called on every turn of the master's loop).
    pub fn begin(&mut self) {
        self.stamp.clear();
        self.room = PAUSE_AT.saturating_sub(self.sink.pending());
    }

    /// Whether the log can take more lines now (see [`Sink::is_full`]).
    pub fn has_room(&self) -> bool {
        self.buf.len() < self.room
    }

    /// The first of `n` workers to read this turn; the next turn starts one further.
    pub fn next_turn(&mut self, n: usize) -> usize {
        self.turn = self.turn.wrapping_add(1);
        if n == 0 {
            0
        } else {
            self.turn % n
        }
    }

    fn take_stamp(&mut self) {
        match self.format {
            LogFormat::Text => {
                let _ = slog_term::timestamp_local(&mut self.stamp);
                self.stamp.extend_from_slice(b" INFO ");
            }
            LogFormat::Json => {
                let ts = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
                let _ = serde_json::to_writer(&mut self.stamp, &ts);
            }
        }
    }

    /// The constant end of every line of one worker's stream: its keys, formatted once.
    pub fn tag(&self, pid: i32, generation: u64, stream: &str) -> Vec<u8> {
        match self.format {
            LogFormat::Text => format!(", pid: {pid}, generation: {generation}, stream: {stream}\n").into_bytes(),
            LogFormat::Json => {
                format!(",\"pid\":{pid},\"generation\":{generation},\"stream\":\"{stream}\"}}\n").into_bytes()
            }
        }
    }

    /// Format one line, ending with `tag` (from [`LineBatch::tag`]); returns it as text
    /// (invalid UTF-8 replaced), for the worker's tail.
    pub fn push<'a>(&mut self, line: &'a [u8], tag: &[u8]) -> std::borrow::Cow<'a, str> {
        if self.buf.len() >= BATCH_LIMIT {
            self.flush();
        }
        if self.stamp.is_empty() {
            self.take_stamp();
        }
        let (printable, json_plain) = plain_ascii(line);
        let text = if printable {
            // SAFETY: every byte is ASCII (0x20–0x7e), so the bytes are valid UTF-8.
            std::borrow::Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(line) })
        } else {
            String::from_utf8_lossy(line)
        };
        let b = &mut self.buf;
        match self.format {
            LogFormat::Text => {
                b.extend_from_slice(&self.stamp);
                if !printable && needs_escape(text.as_bytes()) {
                    escape_controls(text.as_bytes(), b);
                } else {
                    b.extend_from_slice(text.as_bytes());
                }
                if text.is_empty() {
                    // slog-term writes no separator after an empty message.
                    b.extend_from_slice(tag.strip_prefix(b", ").unwrap_or(tag));
                    return text;
                }
            }
            LogFormat::Json => {
                b.extend_from_slice(b"{\"msg\":");
                if json_plain || text.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
                    b.push(b'"');
                    b.extend_from_slice(text.as_bytes());
                    b.push(b'"');
                } else {
                    let _ = serde_json::to_writer(&mut *b, &*text);
                }
                b.extend_from_slice(b",\"level\":\"INFO\",\"ts\":");
                b.extend_from_slice(&self.stamp);
            }
        }
        b.extend_from_slice(tag);
        text
    }

    /// Hand what was formatted to the sink: written now, or pending (see [`Sink`]).
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.sink.commit_lines(&self.buf);
            self.buf.clear();
            self.room = PAUSE_AT.saturating_sub(self.sink.pending());
        }
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

    /// What the logger and a batch write for the same worker line, timestamps cut out.
    fn both(format: LogFormat, line: &str) -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (log, sink) = build(&LogTarget::File(path.clone()), format).unwrap();
        info!(log, "{}", line; "stream" => "stdout", "generation" => 7u64, "pid" => 42);
        let mut batch = LineBatch::new(sink, format);
        batch.begin();
        let tag = batch.tag(42, 7, "stdout");
        batch.push(line.as_bytes(), &tag);
        batch.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|l| match format {
                // "Nov 23 16:01:13.046 INFO ..." and "ts":"...": cut the time out.
                LogFormat::Text => l[19..].to_string(),
                LogFormat::Json => {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    assert!(v["ts"].as_str().unwrap().ends_with('Z'), "{l}");
                    v["ts"] = serde_json::Value::Null;
                    format!("{v} {}", l.find("\"ts\"").unwrap())
                }
            })
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        (lines[0].clone(), lines[1].clone())
    }

    #[test]
    fn batched_lines_read_exactly_like_logged_ones() {
        for format in [LogFormat::Text, LogFormat::Json] {
            for line in [
                "line 1",
                "",
                "quotes \" and \\ and\ttab",
                "ünïcödé €",
                "\x1b[31mred\0nul\r\u{9b}c1\x7f",
            ] {
                let (logged, batched) = both(format, line);
                assert_eq!(batched, logged, "{format:?} {line:?}");
            }
        }
    }

    #[test]
    fn plain_ascii_is_exact() {
        let slow = |l: &[u8]| {
            let p = l.iter().all(|b| (0x20..0x7f).contains(b));
            (p, p && !l.iter().any(|&b| b == b'"' || b == b'\\'))
        };
        let mut line = b"a plain line of text, long enough for a few words".to_vec();
        assert_eq!(plain_ascii(&line), (true, true));
        for pos in 0..line.len() {
            for bad in [0u8, 1, 9, 0x1f, 0x20, b'"', b'\\', 0x7e, 0x7f, 0x80, 0xc2, 0xff] {
                let keep = line[pos];
                line[pos] = bad;
                assert_eq!(plain_ascii(&line), slow(&line), "{bad:#x} at {pos}");
                line[pos] = keep;
            }
        }
    }

    #[test]
    fn text_escapes_control_characters_but_tab() {
        let mut out = Vec::new();
        escape_controls("a\x1b[1m\0\r\n\tb\x7f\u{9b}é£".as_bytes(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\x1b[1m\\x00\\x0d\\x0a\tb\\x7f\\u{9b}é£"
        );
        assert_eq!(escape_str("plain"), "plain");
    }

    /// A scripted target: each write takes what the next step allows.
    struct Script {
        steps: Vec<Result<usize, Errno>>,
        written: Vec<u8>,
    }

    impl Script {
        fn new(steps: &[Result<usize, Errno>]) -> Script {
            Script {
                steps: steps.iter().rev().cloned().collect(),
                written: Vec::new(),
            }
        }

        fn write(&mut self, d: &[u8]) -> Result<usize, Errno> {
            // Past the script: the target takes everything.
            let n = self.steps.pop().unwrap_or(Ok(usize::MAX))?;
            let n = n.min(d.len());
            self.written.extend_from_slice(&d[..n]);
            Ok(n)
        }
    }

    fn notice(n: u64, why: &str) -> Vec<u8> {
        format!("LOST {n}: {why}\n").into_bytes()
    }

    #[test]
    fn a_partial_write_then_disk_full_keeps_the_line_whole_and_reports_the_loss() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Ok(4), Err(Errno::ENOSPC)]);
        out.commit(b"one\ntwo\nthree\n", false, &mut |d| t.write(d), notice);
        // "one" went out, "two" and "three" were lost.
        assert_eq!(t.written, b"one\n");
        assert_eq!((out.dropped_lines, out.pending()), (2, 0));
        assert_eq!(out.error, Some(Errno::ENOSPC));
        let mut t = Script::new(&[Ok(2), Err(Errno::ENOSPC)]);
        out.commit(b"four\nfive\n", false, &mut |d| t.write(d), notice);
        // The notice went first, cut short: its rest stays, "four" and "five" are lost.
        assert_eq!(t.written, b"LO");
        assert_eq!(out.dropped_lines, 4);
        assert_eq!(out.buf[out.head..], b"ST 2: no space left on device (ENOSPC)\n"[..]);
        assert_eq!(out.head, 2);
        let mut t = Script::new(&[]);
        out.commit(b"six\n", false, &mut |d| t.write(d), notice);
        assert_eq!(
            String::from_utf8(t.written.clone()).unwrap(),
            "ST 2: no space left on device (ENOSPC)\nLOST 2: no space left on device (ENOSPC)\nsix\n"
        );
        assert_eq!((out.dropped_lines, out.unreported, out.pending()), (4, 0, 0));
        assert_eq!(out.error, None);
    }

    #[test]
    fn the_rest_of_a_line_begun_is_kept_through_later_failures() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Ok(6), Err(Errno::ENOSPC)]);
        out.commit(b"one\ntwo\nthree\n", false, &mut |d| t.write(d), notice);
        assert_eq!(t.written, b"one\ntw");
        assert_eq!((out.dropped_lines, &out.buf[out.head..]), (1, &b"o\n"[..]));
        // Still failing: "o\n" stays (it finishes a line begun), the new lines are lost.
        let mut t = Script::new(&[Err(Errno::ENOSPC)]);
        out.commit(b"four\n", false, &mut |d| t.write(d), notice);
        assert_eq!((out.dropped_lines, &out.buf[out.head..]), (2, &b"o\n"[..]));
        let mut t = Script::new(&[Ok(1), Err(Errno::EAGAIN)]);
        out.commit(b"five\n", false, &mut |d| t.write(d), notice);
        assert_eq!(t.written, b"o");
        let mut t = Script::new(&[]);
        out.write_pending(&mut |d| t.write(d));
        assert_eq!(
            String::from_utf8(t.written).unwrap(),
            "\nLOST 2: no space left on device (ENOSPC)\nfive\n"
        );
    }

    #[test]
    fn a_notice_lost_again_is_not_counted_and_reports_all_later() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Err(Errno::ENOSPC)]);
        out.commit(b"a\nb\n", false, &mut |d| t.write(d), notice);
        let mut t = Script::new(&[Err(Errno::ENOSPC)]);
        out.commit(b"c\n", false, &mut |d| t.write(d), notice);
        assert_eq!((out.dropped_lines, out.unreported), (3, 3));
        let mut t = Script::new(&[]);
        out.commit(b"d\n", true, &mut |d| t.write(d), notice);
        assert_eq!(t.written, b"LOST 3: no space left on device (ENOSPC)\nd\n");
    }

    #[test]
    fn a_blocked_target_keeps_worker_lines_and_caps_the_masters() {
        let mut out = Outbox::default();
        let mut t = Script::new(&[Ok(2), Err(Errno::EAGAIN)]);
        let mut big = vec![b'x'; HARD_CAP - 10];
        big.push(b'\n');
        out.commit(b"begun\n", false, &mut |d| t.write(d), notice);
        assert!(out.blocked);
        let mut t = Script::new(&[Err(Errno::EAGAIN)]);
        out.commit(&big, false, &mut |d| t.write(d), notice);
        out.commit(b"own record\n", true, &mut |d| t.write(d), notice);
        assert_eq!(out.dropped_lines, 1, "the master's record past the cap is counted");
        out.commit(b"worker line\n", false, &mut |d| t.write(d), notice);
        assert_eq!(out.dropped_lines, 1, "worker lines are never dropped for want of room");
        let mut t = Script::new(&[]);
        t.written.extend_from_slice(b"be");
        out.write_pending(&mut |d| t.write(d));
        assert_eq!(out.pending(), 0);
        let text = String::from_utf8(t.written).unwrap();
        assert!(text.starts_with("begun\nxxx"), "{}", &text[..20]);
        // The loss is reported in its place, before the next record.
        assert!(
            text.ends_with("x\nLOST 1: the log did not take them (4194299 bytes were pending)\nworker line\n"),
            "{}",
            &text[text.len() - 100..]
        );
        assert_eq!((out.dropped_lines, out.unreported), (1, 0));
    }

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
