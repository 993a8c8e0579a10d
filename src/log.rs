//! The master's log: slog records, as text (slog-term) or JSON lines (slog-json), to stderr or
//! to a file that can be reopened for logrotate.
//!
//! Both formats write through one [`Sink`], a writer whose target can be swapped: reopening
//! opens the path anew and swaps it in between two records, so no line is split or lost. The
//! drains are synchronous (no slog-async, no threads): a slow sink slows the master.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use slog::{o, Drain, Logger};

use crate::config::{LogFormat, LogTarget};

enum Target {
    Stderr,
    File(File),
}

/// A cloneable writer whose target can be reopened.
#[derive(Clone)]
pub struct Sink {
    inner: Arc<Mutex<Target>>,
    path: Option<PathBuf>,
}

impl Sink {
    fn open_file(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(path)
    }

    pub fn new(target: &LogTarget) -> io::Result<Sink> {
        let (t, path) = match target {
            LogTarget::Stderr => (Target::Stderr, None),
            LogTarget::File(p) => (Target::File(Self::open_file(p)?), Some(p.clone())),
        };
        Ok(Sink {
            inner: Arc::new(Mutex::new(t)),
            path,
        })
    }

    /// Open the log file again (after logrotate renamed it). A no-op for stderr.
    pub fn reopen(&self) -> io::Result<()> {
        let Some(path) = &self.path else { return Ok(()) };
        let file = Self::open_file(path)?;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner = Target::File(file);
        Ok(())
    }
}

impl Sink {
    /// What an upgrade hands over: the log file's path and its open fd (so that the new image
    /// keeps writing to the same file even if its directory is gone meanwhile).
    pub fn handover(&self) -> crate::upgrade::LogState {
        use std::os::fd::AsRawFd;
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let fd = match &*inner {
            Target::Stderr => None,
            Target::File(f) => Some(f.as_raw_fd()),
        };
        crate::upgrade::LogState {
            path: self.path.clone(),
            fd,
        }
    }
}

/// The log of a master resumed after an upgrade: the file handed over (close-on-exec again),
/// or stderr.
pub fn resume(path: Option<PathBuf>, fd: Option<std::os::fd::RawFd>, format: LogFormat) -> (Logger, Sink) {
    let target = match fd {
        Some(fd) => Target::File(File::from(crate::upgrade::own(fd))),
        None => Target::Stderr,
    };
    let sink = Sink {
        inner: Arc::new(Mutex::new(target)),
        path,
    };
    (logger(sink.clone(), format), sink)
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *inner {
            Target::Stderr => io::stderr().write(buf),
            Target::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *inner {
            Target::Stderr => io::stderr().flush(),
            Target::File(f) => f.flush(),
        }
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
        }
    }

    /// Start a new batch: its lines get a timestamp taken when the first of them arrives.
    /// Cheap when no line follows (it is called on every turn of the master's loop).
    pub fn begin(&mut self) {
        self.stamp.clear();
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
        let text = String::from_utf8_lossy(line);
        let b = &mut self.buf;
        match self.format {
            LogFormat::Text => {
                b.extend_from_slice(&self.stamp);
                b.extend_from_slice(text.as_bytes());
                if text.is_empty() {
                    // slog-term writes no separator after an empty message.
                    b.extend_from_slice(tag.strip_prefix(b", ").unwrap_or(tag));
                    return text;
                }
            }
            LogFormat::Json => {
                b.extend_from_slice(b"{\"msg\":");
                if text.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
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

    /// Write what was formatted. Errors are dropped, as the logger's own drains drop them.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.sink.write_all(&self.buf);
            self.buf.clear();
        }
    }
}

/// Build the logger for the configured target and format.
pub fn build(target: &LogTarget, format: LogFormat) -> io::Result<(Logger, Sink)> {
    let sink = Sink::new(target)?;
    Ok((logger(sink.clone(), format), sink))
}

pub fn logger(sink: Sink, format: LogFormat) -> Logger {
    match format {
        LogFormat::Text => {
            let decorator = slog_term::PlainSyncDecorator::new(sink);
            let drain = slog_term::FullFormat::new(decorator).build().ignore_res();
            Logger::root(drain, o!())
        }
        LogFormat::Json => {
            let json = slog_json::Json::new(sink).add_default_keys().set_flush(true).build();
            Logger::root(Mutex::new(json).ignore_res(), o!())
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
            for line in ["line 1", "", "quotes \" and \\ and\ttab", "ünïcödé €"] {
                let (logged, batched) = both(format, line);
                assert_eq!(batched, logged, "{format:?} {line:?}");
            }
        }
    }
}
