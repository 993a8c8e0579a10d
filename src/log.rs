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
