//! Configuration: the TOML file of spec §2, parsed into raw serde structs and then validated
//! into a [`Config`] that the rest of zdd trusts.
//!
//! `zdd check` and `zdd start` (and every reload) go through the same [`load`] function, so a
//! file that `check` accepts is exactly a file that `start` accepts. Every error carries
//! `file:line:column`, the key it is about and what was wrong; unknown keys are errors.
//!
//! Relative paths in the file (pid_file, control_socket, log, cwd, unix listeners) are resolved
//! against the directory that holds the config file, so a config means the same thing whatever
//! directory `zdd` is run from.
//!
//! Validation has two layers, chosen by [`Checks`]. The text alone (types, ranges, bounded
//! durations and argv, listeners that cannot all be bound) is checked everywhere, including by
//! an upgraded master re-reading the text it ran with. On top of that, [`load`] checks the file
//! against the host the way `start` would meet it: the worker's program resolves in PATH and is
//! executable, `cwd` is a directory, rlimits can be granted, the log is not a directory, the
//! runtime directory is trusted. A reload checks only what it uses (the worker's part).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Group, Uid, User};
use serde::Deserialize;
use toml::Spanned;

/// The longest duration any setting accepts (start_timeout, stop_timeout, ready_delay): 24
/// hours. Anything longer is a typo; bounding it here also keeps every deadline the master
/// computes (`Instant + Duration`) far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// The longest single argument or environment entry the kernel passes to exec
/// (MAX_ARG_STRLEN, 32 pages, including the terminating NUL).
pub const MAX_ARG_LEN: usize = 32 * 4096 - 1;
/// The worker's argv plus its configured environment, counted as exec counts them (each string
/// with its NUL and its pointer): at most 1 MiB, half of the usual ARG_MAX, so that the
/// inherited environment still fits.
pub const MAX_ARGS_TOTAL: usize = 1024 * 1024;
/// A config error message is cut beyond this, so that no input is echoed whole.
const MAX_MESSAGE: usize = 1024;
/// A value quoted in an error message is cut beyond this.
const MAX_SHOWN: usize = 64;

/// How far validation goes beyond the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Checks {
    /// The text alone: what an upgraded master re-reads (its running state, not the host as it
    /// is now, is the truth then), and what the fuzzer drives.
    Text,
    /// Also the worker's settings against the host (program, cwd, rlimits): a reload.
    Reload,
    /// Also the master's own files (log, runtime directory): `check` and `start`.
    Start,
}

/// A config error, printed as `file:line:column: key: message`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read config: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}:{line}:{col}: {key}{sep}{msg}", sep = if key.is_empty() { "" } else { ": " })]
    Invalid {
        file: String,
        line: usize,
        col: usize,
        key: String,
        msg: String,
    },
}

/// Where the master writes its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterConfig {
    pub pid_file: PathBuf,
    pub control_socket: PathBuf,
    /// The master's own NOTIFY_SOCKET for its workers; beside the control socket.
    pub notify_socket: PathBuf,
    pub log: LogTarget,
    pub log_format: LogFormat,
    pub max_draining: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    Notify,
    Delay(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compat {
    Einhorn,
    ServerStarter,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: Option<String>,
    pub uid: Uid,
    pub gid: Gid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    pub command: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// Set when `user` or `group` is configured.
    pub credentials: Option<Credentials>,
    pub count: usize,
    pub ready: Ready,
    pub start_timeout: Duration,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub restart: Restart,
    pub umask: Option<u32>,
    pub compat: Vec<Compat>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: Resource,
    pub name: &'static str,
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// Linux abstract namespace, written `@name` in the config.
    Abstract(String),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
            ListenAddr::Abstract(n) => write!(f, "@{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub name: String,
    pub addr: ListenAddr,
    pub backlog: i32,
    pub mode: Option<u32>,
    pub owner: Option<Uid>,
    pub group: Option<Gid>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    /// The text this config was read from: an upgraded master re-reads exactly this.
    pub source: String,
    pub master: MasterConfig,
    pub worker: WorkerConfig,
    pub rlimits: Vec<Rlimit>,
    pub listen: Vec<ListenConfig>,
}

// ---------------------------------------------------------------------------------------------
// Raw structs: what serde reads. Values that need validation keep their span.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    master: RawMaster,
    worker: Option<Spanned<RawWorker>>,
    #[serde(default)]
    rlimits: BTreeMap<String, Spanned<RawLimit>>,
    #[serde(default)]
    listen: Vec<Spanned<RawListen>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMaster {
    pid_file: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    log: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    max_draining: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    command: Spanned<Vec<String>>,
    cwd: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, Spanned<String>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    count: Option<Spanned<i64>>,
    ready: Option<Spanned<String>>,
    ready_delay: Option<Spanned<String>>,
    start_timeout: Option<Spanned<String>>,
    stop_signal: Option<Spanned<String>>,
    stop_timeout: Option<Spanned<String>>,
    restart: Option<Spanned<String>>,
    umask: Option<Spanned<Octal>>,
    #[serde(default)]
    compat: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    name: Spanned<String>,
    tcp: Option<Spanned<String>>,
    unix: Option<Spanned<String>>,
    backlog: Option<Spanned<i64>>,
    mode: Option<Spanned<Octal>>,
    owner: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

/// A file mode or umask: `"0660"` or a TOML integer such as `0o660`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Octal {
    Text(String),
    Int(i64),
}

/// A limit value: an integer or `"infinity"`/`"unlimited"`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum LimitValue {
    Int(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawLimit {
    Both(LimitValue),
    Pair(RawLimitPair),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimitPair {
    soft: LimitValue,
    hard: LimitValue,
}

// ---------------------------------------------------------------------------------------------

/// Everything validation needs to place an error in the file.
struct Source<'a> {
    file: String,
    text: &'a str,
}

impl Source<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    fn err(&self, span: Range<usize>, key: &str, msg: impl Into<String>) -> ConfigError {
        let (line, col) = self.line_col(span.start);
        ConfigError::Invalid {
            file: self.file.clone(),
            line,
            col,
            key: cut(key, MAX_SHOWN),
            msg: cut(&msg.into(), MAX_MESSAGE),
        }
    }

    /// The dotted key written at `offset`: the nearest `[table]` header above it and the key
    /// on its own line. Used to name the key in serde's type errors, which only carry a span.
    fn key_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[offset..].find('\n').map_or(self.text.len(), |i| offset + i);
        let line = &self.text[line_start..line_end];
        let key = match line.find('=') {
            Some(eq) if !line.trim_start().starts_with('[') => line[..eq].trim().to_string(),
            _ => String::new(),
        };
        let table = self.text[..line_start]
            .lines()
            .rev()
            .map(str::trim)
            .find(|l| l.starts_with('['))
            .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
        match (table, key.is_empty()) {
            (Some(t), false) => format!("{t}.{key}"),
            (Some(t), true) => t,
            (None, _) => key,
        }
    }
}

/// Read, parse and validate a config file, and check it against the host as `start` will
/// meet it: the one function behind `zdd check` and `zdd start`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    load_with(path, Checks::Start)
}

/// Read, parse and validate a config file with the given depth of checks.
pub fn load_with(path: &Path, checks: Checks) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })?;
    parse_with(path, &text, checks)
}

/// Parse and validate config text alone; `path` names the file in errors and anchors relative
/// paths.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_with(path, text, Checks::Text)
}

/// Parse and validate config text, with `checks` against the host.
pub fn parse_with(path: &Path, text: &str, checks: Checks) -> Result<Config, ConfigError> {
    let src = Source {
        file: path.display().to_string(),
        text,
    };
    let raw: RawConfig = deserialize(&src)?;
    let (base, stem) = anchors(path);
    let v = Validator {
        src: &src,
        base: &base,
        checks,
    };

    let master = v.master(&raw.master, &stem)?;
    let Some(worker) = &raw.worker else {
        return Err(src.err(0..0, "worker", "missing table [worker] (it needs at least `command`)"));
    };
    let worker = v.worker(worker)?;
    let rlimits = raw
        .rlimits
        .iter()
        .map(|(name, value)| v.rlimit(name, value, &worker))
        .collect::<Result<Vec<_>, _>>()?;
    let mut listen: Vec<ListenConfig> = Vec::with_capacity(raw.listen.len());
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for entry in &raw.listen {
        let l = v.listen(entry)?;
        if !names.insert(l.name.clone()) {
            return Err(src.err(
                entry.get_ref().name.span(),
                "listen.name",
                format!("duplicate listener name {}", shown(&l.name)),
            ));
        }
        if !addrs.insert(l.addr.clone()) {
            return Err(src.err(entry.span(), "listen", format!("address {} is listed twice", l.addr)));
        }
        if let ListenAddr::Tcp(a) = &l.addr {
            let other = listen.iter().find_map(|o| match &o.addr {
                ListenAddr::Tcp(b) if tcp_overlap(a, b) => Some((o, b)),
                _ => None,
            });
            if let Some((o, b)) = other {
                return Err(src.err(
                    entry.span(),
                    "listen",
                    format!(
                        "address {a} overlaps {b} of listener {}: a wildcard address already takes \
                         port {} for every address of its family, so the second bind would fail \
                         (EADDRINUSE); keep only one of them",
                        shown(&o.name),
                        a.port()
                    ),
                ));
            }
        }
        listen.push(l);
    }
    Ok(Config {
        path: path.to_path_buf(),
        source: text.to_string(),
        master,
        worker,
        rlimits,
        listen,
    })
}

/// The directory relative paths are resolved against, and the config's stem.
fn anchors(path: &Path) -> (PathBuf, String) {
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "zdd".into());
    (base, stem)
}

fn deserialize<T: serde::de::DeserializeOwned>(src: &Source<'_>) -> Result<T, ConfigError> {
    toml::from_str(src.text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let mut msg = e.message().trim_end().to_string();
        if msg.is_empty() {
            // toml gives no message for some bad characters (a control character in a comment).
            msg = match src.text.get(span.start..).and_then(|t| t.chars().next()) {
                Some(c) => format!("invalid TOML: unexpected character {c:?}"),
                None => "invalid TOML".to_string(),
            };
        }
        let key = if msg.starts_with("unknown field") {
            String::new()
        } else {
            src.key_at(span.start)
        };
        src.err(span, &key, msg)
    })
}

/// Only the `[master]` table, the rest of the file unchecked: what `status`, `stop` and
/// `reopen-logs` need to find a running master, even while the worker settings are being
/// edited into something invalid.
#[derive(Deserialize)]
struct RawMasterOnly {
    #[serde(default)]
    master: RawMaster,
}

pub fn load_master(path: &Path) -> Result<MasterConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.display().to_string(),
        source,
    })?;
    let src = Source {
        file: path.display().to_string(),
        text: &text,
    };
    let raw: RawMasterOnly = deserialize(&src)?;
    let (base, stem) = anchors(path);
    Validator {
        src: &src,
        base: &base,
        checks: Checks::Text,
    }
    .master(&raw.master, &stem)
}

struct Validator<'a> {
    src: &'a Source<'a>,
    base: &'a Path,
    checks: Checks,
}

/// `s` quoted, cut to [`MAX_SHOWN`] bytes: no value is ever echoed whole in an error.
fn shown(s: &str) -> String {
    if s.len() <= MAX_SHOWN {
        return format!("{s:?}");
    }
    format!("{:?}… ({} bytes)", &s[..floor_char_boundary(s, MAX_SHOWN)], s.len())
}

/// `s` cut to at most `max` bytes (on a character boundary), saying how long it was.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}… ({} bytes in all)", &s[..floor_char_boundary(s, max)], s.len())
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| {
        format!(
            "invalid duration {}: {e} (examples: \"250ms\", \"30s\", \"1m30s\")",
            shown(s)
        )
    })
}

/// Whether two tcp listeners cannot both be bound: the same port, one of them a wildcard
/// covering the other (`0.0.0.0` covers every IPv4 address; `[::]`, dual-stack as zdd binds it,
/// covers every address of both families). Port 0 asks for a fresh port and never collides.
fn tcp_overlap(a: &SocketAddr, b: &SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 || a == b {
        return false;
    }
    let v6_any = |x: &SocketAddr| x.is_ipv6() && x.ip().is_unspecified();
    if v6_any(a) || v6_any(b) {
        return true;
    }
    a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Resolve a worker's program as execvp would: a name with a '/' is a path (relative to the
/// worker's cwd), anything else is looked up in `path_var` (default
/// `/usr/local/bin:/usr/bin:/bin`). Shared by the spawn path and by validation.
pub fn find_program(program: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    let path_var = path_var.unwrap_or(OsStr::new("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(path_var)
        .map(|dir| dir.join(program))
        .find(|candidate| nix::unistd::access(candidate, nix::unistd::AccessFlags::X_OK).is_ok() && candidate.is_file())
}

/// A user as errors name it: `uid 65534 (nobody)`.
fn user_text(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("uid {uid} ({})", u.name),
        _ => format!("uid {uid}"),
    }
}

/// Whether `dir` may hold this master's pid file and sockets: owned by root or by us, and
/// writable by nobody else (no group or other write bit, sticky or not: in a shared directory
/// another user can plant the names before we do). A symbolic link is followed only if root or
/// we own it too. Used by `check` and again by `start` right after creating the directory.
pub fn check_runtime_dir(dir: &Path) -> Result<(), String> {
    let me = Uid::effective().as_raw();
    let trusted = |uid: u32| uid == me || uid == 0;
    let stat = |follow: bool| {
        let m = if follow {
            std::fs::metadata(dir)
        } else {
            std::fs::symlink_metadata(dir)
        };
        m.map_err(|e| {
            format!(
                "runtime directory {}: stat: {}",
                dir.display(),
                crate::errno::describe_io(&e)
            )
        })
    };
    let link = stat(false)?;
    if link.file_type().is_symlink() && !trusted(link.uid()) {
        return Err(format!(
            "runtime directory {} is a symbolic link owned by {}, not by root or {}; refusing to use it",
            dir.display(),
            user_text(link.uid()),
            user_text(me)
        ));
    }
    let m = stat(true)?;
    let mode = m.permissions().mode() & 0o7777;
    if !m.is_dir() {
        return Err(format!("runtime directory {} is not a directory", dir.display()));
    }
    if !trusted(m.uid()) {
        return Err(format!(
            "runtime directory {} is owned by {} (mode {mode:04o}), not by root or {}; refusing to use it",
            dir.display(),
            user_text(m.uid()),
            user_text(me)
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "runtime directory {} is writable by others (owner {}, mode {mode:04o}); refusing to use it: \
             give zdd a directory of its own, mode 0700 or 0755",
            dir.display(),
            user_text(m.uid())
        ));
    }
    Ok(())
}

fn limit_text(v: u64) -> String {
    if v == nix::libc::RLIM_INFINITY {
        "infinity".into()
    } else {
        v.to_string()
    }
}

/// Parse a signal name: `TERM`, `SIGTERM` or a number.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let up = s.trim().to_ascii_uppercase();
    if let Ok(n) = up.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("unknown signal number {n}"));
    }
    let name = if up.starts_with("SIG") { up } else { format!("SIG{up}") };
    name.parse::<Signal>()
        .map_err(|_| format!("unknown signal {}", shown(s)))
}

impl Validator<'_> {
    fn err(&self, span: Range<usize>, key: &str, msg: impl Into<String>) -> ConfigError {
        self.src.err(span, key, msg)
    }

    fn path(&self, s: &str) -> PathBuf {
        let p = Path::new(s);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    fn nonempty_path(&self, v: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        if v.get_ref().is_empty() || v.get_ref().contains('\0') {
            return Err(self.err(v.span(), key, "must be a non-empty path"));
        }
        Ok(self.path(v.get_ref()))
    }

    /// A duration of at most [`MAX_DURATION`], and above zero if `nonzero`.
    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
        nonzero: bool,
    ) -> Result<Duration, ConfigError> {
        let Some(s) = v else { return Ok(default) };
        let d = parse_duration(s.get_ref()).map_err(|m| self.err(s.span(), key, m))?;
        if d > MAX_DURATION {
            return Err(self.err(
                s.span(),
                key,
                format!("{} is longer than the maximum of 24h", shown(s.get_ref())),
            ));
        }
        if nonzero && d.is_zero() {
            return Err(self.err(s.span(), key, "must be longer than 0s"));
        }
        Ok(d)
    }

    fn octal(&self, v: &Spanned<Octal>, key: &str, max: u32) -> Result<u32, ConfigError> {
        let n = match v.get_ref() {
            Octal::Text(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| {
                self.err(
                    v.span(),
                    key,
                    format!("{} is not an octal number such as \"0660\"", shown(s)),
                )
            })?,
            Octal::Int(i) => u32::try_from(*i).map_err(|_| self.err(v.span(), key, "must not be negative"))?,
        };
        if n > max {
            return Err(self.err(v.span(), key, format!("{n:o} is larger than {max:o}")));
        }
        Ok(n)
    }

    fn master(&self, m: &RawMaster, stem: &str) -> Result<MasterConfig, ConfigError> {
        let control_socket = match &m.control_socket {
            Some(s) => self.nonempty_path(s, "master.control_socket")?,
            None => default_runtime_dir().join(format!("{stem}.sock")),
        };
        let dir = control_socket.parent().map(Path::to_path_buf).unwrap_or_default();
        let sock_stem = control_socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| stem.to_string());
        let pid_file = match &m.pid_file {
            Some(s) => self.nonempty_path(s, "master.pid_file")?,
            None => dir.join(format!("{sock_stem}.pid")),
        };
        let notify_socket = dir.join(format!("{sock_stem}.notify"));
        // sockaddr_un holds 108 bytes including the terminating NUL.
        for (p, key) in [
            (&control_socket, "master.control_socket"),
            (&notify_socket, "master.control_socket"),
        ] {
            if p.as_os_str().len() > 107 {
                let span = m.control_socket.as_ref().map_or(0..0, |s| s.span());
                return Err(self.err(
                    span,
                    key,
                    format!("socket path {} is longer than 107 bytes", p.display()),
                ));
            }
        }
        let log = match &m.log {
            None => LogTarget::Stderr,
            Some(s) if s.get_ref() == "stderr" => LogTarget::Stderr,
            Some(s) => {
                let path = self.nonempty_path(s, "master.log")?;
                if self.checks >= Checks::Start {
                    check_log_path(&path).map_err(|msg| self.err(s.span(), "master.log", msg))?;
                }
                LogTarget::File(path)
            }
        };
        if self.checks >= Checks::Start {
            // Only a directory that exists can be judged here; `start` creates a missing one
            // and judges it then.
            for (p, key, given) in [
                (&pid_file, "master.pid_file", &m.pid_file),
                (&control_socket, "master.control_socket", &m.control_socket),
            ] {
                if let Some(dir) = p.parent().filter(|d| d.exists()) {
                    // A default path derives from control_socket's: name that key then.
                    let (span, key) = match (given, &m.control_socket) {
                        (Some(s), _) => (s.span(), key),
                        (None, Some(s)) => (s.span(), "master.control_socket"),
                        (None, None) => (0..0, "master.control_socket"),
                    };
                    check_runtime_dir(dir).map_err(|msg| self.err(span, key, msg))?;
                }
            }
        }
        let log_format = match m.log_format.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("text", _)) => LogFormat::Text,
            Some(("json", _)) => LogFormat::Json,
            Some((other, span)) => {
                return Err(self.err(
                    span,
                    "master.log_format",
                    format!("expected \"text\" or \"json\", got {}", shown(other)),
                ))
            }
        };
        let max_draining = match &m.max_draining {
            None => 2,
            Some(n) => usize::try_from(*n.get_ref())
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| self.err(n.span(), "master.max_draining", "must be at least 1"))?,
        };
        Ok(MasterConfig {
            pid_file,
            control_socket,
            notify_socket,
            log,
            log_format,
            max_draining,
        })
    }

    fn worker(&self, w: &Spanned<RawWorker>) -> Result<WorkerConfig, ConfigError> {
        let w = w.get_ref();
        let command = w.command.get_ref().clone();
        if command.is_empty() || command[0].is_empty() {
            return Err(self.err(
                w.command.span(),
                "worker.command",
                "must name a program: [\"/path/to/server\", \"arg\", ...]",
            ));
        }
        if command.iter().any(|a| a.contains('\0')) {
            return Err(self.err(
                w.command.span(),
                "worker.command",
                "arguments must not contain NUL bytes",
            ));
        }
        if let Some((i, a)) = command.iter().enumerate().find(|(_, a)| a.len() > MAX_ARG_LEN) {
            return Err(self.err(
                w.command.span(),
                "worker.command",
                format!(
                    "argument {i} is {} bytes long; exec takes at most {MAX_ARG_LEN} bytes per argument",
                    a.len()
                ),
            ));
        }
        let cwd = w
            .cwd
            .as_ref()
            .map(|c| self.nonempty_path(c, "worker.cwd"))
            .transpose()?;
        let mut env = Vec::with_capacity(w.env.len());
        for (k, v) in &w.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.get_ref().contains('\0') {
                return Err(self.err(
                    v.span(),
                    "worker.env",
                    format!("invalid environment variable {}", shown(k)),
                ));
            }
            if k.len() + 1 + v.get_ref().len() > MAX_ARG_LEN {
                return Err(self.err(
                    v.span(),
                    "worker.env",
                    format!(
                        "{} is {} bytes long; exec takes at most {MAX_ARG_LEN} bytes per variable",
                        shown(k),
                        k.len() + 1 + v.get_ref().len()
                    ),
                ));
            }
            env.push((k.clone(), v.get_ref().clone()));
        }
        // What exec counts against ARG_MAX: each string, its NUL and its pointer.
        let total: usize = command
            .iter()
            .map(String::len)
            .chain(env.iter().map(|(k, v)| k.len() + 1 + v.len()))
            .map(|n| n + 1 + std::mem::size_of::<usize>())
            .sum();
        if total > MAX_ARGS_TOTAL {
            return Err(self.err(
                w.command.span(),
                "worker.command",
                format!(
                    "the command and env take {total} bytes for exec; at most {MAX_ARGS_TOTAL} (1 MiB) are accepted"
                ),
            ));
        }
        if self.checks >= Checks::Reload {
            if let Some(c) = &w.cwd {
                let dir = self.path(c.get_ref());
                check_cwd(&dir).map_err(|msg| self.err(c.span(), "worker.cwd", msg))?;
            }
            let dir = cwd.clone().or_else(|| std::env::current_dir().ok());
            check_program(&command[0], &env, dir.as_deref())
                .map_err(|msg| self.err(w.command.span(), "worker.command", msg))?;
        }
        let user = w
            .user
            .as_ref()
            .map(|u| lookup_user(u.get_ref()).map_err(|m| self.err(u.span(), "worker.user", m)))
            .transpose()?;
        let group = w
            .group
            .as_ref()
            .map(|g| lookup_group(g.get_ref()).map_err(|m| self.err(g.span(), "worker.group", m)))
            .transpose()?;
        let credentials = match (user, group) {
            (None, None) => None,
            (Some(u), g) => Some(Credentials {
                user: Some(u.name),
                uid: u.uid,
                gid: g.unwrap_or(u.gid),
            }),
            (None, Some(g)) => Some(Credentials {
                user: None,
                uid: Uid::current(),
                gid: g,
            }),
        };
        let count = match &w.count {
            None => 1,
            Some(n) => usize::try_from(*n.get_ref())
                .ok()
                .filter(|n| (1..=4096).contains(n))
                .ok_or_else(|| self.err(n.span(), "worker.count", "must be between 1 and 4096"))?,
        };
        let ready = match w.ready.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("notify", _)) => {
                if let Some(d) = &w.ready_delay {
                    return Err(self.err(d.span(), "worker.ready_delay", "only used with ready = \"delay\""));
                }
                Ready::Notify
            }
            Some(("delay", _)) => {
                Ready::Delay(self.duration(&w.ready_delay, "worker.ready_delay", Duration::from_secs(1), false)?)
            }
            Some((other, span)) => {
                return Err(self.err(
                    span,
                    "worker.ready",
                    format!("expected \"notify\" or \"delay\", got {}", shown(other)),
                ))
            }
        };
        let start_timeout = self.duration(&w.start_timeout, "worker.start_timeout", Duration::from_secs(60), true)?;
        if let Ready::Delay(d) = ready {
            if d >= start_timeout {
                let span = w.ready_delay.as_ref().map_or(0..0, |s| s.span());
                return Err(self.err(span, "worker.ready_delay", "must be shorter than start_timeout"));
            }
        }
        let stop_signal = match &w.stop_signal {
            None => Signal::SIGTERM,
            Some(s) => parse_signal(s.get_ref()).map_err(|m| self.err(s.span(), "worker.stop_signal", m))?,
        };
        if matches!(stop_signal, Signal::SIGSTOP) {
            let span = w.stop_signal.as_ref().map_or(0..0, |s| s.span());
            return Err(self.err(span, "worker.stop_signal", "SIGSTOP cannot stop a worker"));
        }
        let stop_timeout = self.duration(&w.stop_timeout, "worker.stop_timeout", Duration::from_secs(30), false)?;
        let restart = match w.restart.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("always", _)) => Restart::Always,
            Some(("on-failure", _)) => Restart::OnFailure,
            Some(("never", _)) => Restart::Never,
            Some((other, span)) => {
                return Err(self.err(
                    span,
                    "worker.restart",
                    format!("expected \"always\", \"on-failure\" or \"never\", got {}", shown(other)),
                ))
            }
        };
        let umask = w
            .umask
            .as_ref()
            .map(|u| self.octal(u, "worker.umask", 0o777))
            .transpose()?;
        let mut compat = Vec::new();
        for c in &w.compat {
            compat.push(match c.get_ref().as_str() {
                "einhorn" => Compat::Einhorn,
                "server_starter" => Compat::ServerStarter,
                other => {
                    return Err(self.err(
                        c.span(),
                        "worker.compat",
                        format!("expected \"einhorn\" or \"server_starter\", got {}", shown(other)),
                    ))
                }
            });
        }
        Ok(WorkerConfig {
            command,
            cwd,
            env,
            credentials,
            count,
            ready,
            start_timeout,
            stop_signal,
            stop_timeout,
            restart,
            umask,
            compat,
        })
    }

    fn rlimit(&self, name: &str, v: &Spanned<RawLimit>, worker: &WorkerConfig) -> Result<Rlimit, ConfigError> {
        let key = format!("rlimits.{}", cut(name, MAX_SHOWN));
        let (resource, name) = rlimit_resource(name).ok_or_else(|| {
            self.err(
                v.span(),
                &key,
                format!(
                    "unknown resource {}; known: {}",
                    shown(name),
                    RLIMIT_NAMES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ),
            )
        })?;
        let value = |lv: &LimitValue| -> Result<u64, ConfigError> {
            match lv {
                LimitValue::Int(i) => u64::try_from(*i).map_err(|_| self.err(v.span(), &key, "must not be negative")),
                LimitValue::Text(s) if s == "infinity" || s == "unlimited" => Ok(nix::libc::RLIM_INFINITY),
                LimitValue::Text(s) => Err(self.err(
                    v.span(),
                    &key,
                    format!("expected a number or \"infinity\", got {}", shown(s)),
                )),
            }
        };
        let (soft, hard) = match v.get_ref() {
            RawLimit::Both(x) => (value(x)?, value(x)?),
            RawLimit::Pair(p) => (value(&p.soft)?, value(&p.hard)?),
        };
        if soft > hard {
            return Err(self.err(v.span(), &key, format!("soft limit {soft} is above hard limit {hard}")));
        }
        if self.checks >= Checks::Reload {
            check_rlimit(resource, hard, worker).map_err(|msg| self.err(v.span(), &key, msg))?;
        }
        Ok(Rlimit {
            resource,
            name,
            soft,
            hard,
        })
    }

    fn listen(&self, l: &Spanned<RawListen>) -> Result<ListenConfig, ConfigError> {
        let span = l.span();
        let l = l.get_ref();
        let name = l.name.get_ref();
        if name.is_empty()
            || name.len() > 255
            || !name.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
            || name.contains(':')
        {
            return Err(self.err(
                l.name.span(),
                "listen.name",
                "must be 1 to 255 printable ASCII characters without ':'",
            ));
        }
        let addr = match (&l.tcp, &l.unix) {
            (Some(t), None) => ListenAddr::Tcp(t.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.err(
                    t.span(),
                    "listen.tcp",
                    format!(
                        "{} is not an address such as \"0.0.0.0:8080\" or \"[::1]:8080\"",
                        shown(t.get_ref())
                    ),
                )
            })?),
            (None, Some(u)) => {
                let s = u.get_ref();
                if let Some(abs) = s.strip_prefix('@') {
                    if abs.is_empty() || abs.len() > 106 {
                        return Err(self.err(u.span(), "listen.unix", "abstract name must be 1 to 106 bytes"));
                    }
                    ListenAddr::Abstract(abs.to_string())
                } else {
                    let p = self.nonempty_path(u, "listen.unix")?;
                    if p.as_os_str().len() > 107 {
                        return Err(self.err(
                            u.span(),
                            "listen.unix",
                            format!("socket path {} is longer than 107 bytes", p.display()),
                        ));
                    }
                    ListenAddr::Unix(p)
                }
            }
            (Some(t), Some(_)) => return Err(self.err(t.span(), "listen", "give either tcp or unix, not both")),
            (None, None) => {
                return Err(self.err(
                    span,
                    "listen",
                    format!("listener {} needs tcp = \"ADDR:PORT\" or unix = \"PATH\"", shown(name)),
                ))
            }
        };
        let backlog = match &l.backlog {
            None => nix::libc::SOMAXCONN,
            Some(b) => i32::try_from(*b.get_ref())
                .ok()
                .filter(|b| *b >= 1)
                .ok_or_else(|| self.err(b.span(), "listen.backlog", "must be between 1 and 2147483647"))?,
        };
        let file_only = |v: Option<Range<usize>>, key: &str| -> Result<(), ConfigError> {
            match (v, &addr) {
                (Some(s), ListenAddr::Tcp(_) | ListenAddr::Abstract(_)) => {
                    Err(self.err(s, key, "only applies to unix socket paths"))
                }
                _ => Ok(()),
            }
        };
        file_only(l.mode.as_ref().map(|m| m.span()), "listen.mode")?;
        file_only(l.owner.as_ref().map(|m| m.span()), "listen.owner")?;
        file_only(l.group.as_ref().map(|m| m.span()), "listen.group")?;
        let mode = l
            .mode
            .as_ref()
            .map(|m| self.octal(m, "listen.mode", 0o7777))
            .transpose()?;
        let owner = l
            .owner
            .as_ref()
            .map(|o| {
                lookup_user(o.get_ref())
                    .map(|u| u.uid)
                    .map_err(|m| self.err(o.span(), "listen.owner", m))
            })
            .transpose()?;
        let group = l
            .group
            .as_ref()
            .map(|g| lookup_group(g.get_ref()).map_err(|m| self.err(g.span(), "listen.group", m)))
            .transpose()?;
        Ok(ListenConfig {
            name: name.clone(),
            addr,
            backlog,
            mode,
            owner,
            group,
        })
    }
}

fn lookup_user(name: &str) -> Result<User, String> {
    let found = match name.parse::<u32>() {
        Ok(n) => User::from_uid(Uid::from_raw(n)),
        Err(_) => User::from_name(name),
    };
    match found {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(format!("no such user {}", shown(name))),
        Err(e) => Err(format!(
            "looking up user {}: {}",
            shown(name),
            crate::errno::describe(e)
        )),
    }
}

fn lookup_group(name: &str) -> Result<Gid, String> {
    let found = match name.parse::<u32>() {
        Ok(n) => Group::from_gid(Gid::from_raw(n)),
        Err(_) => Group::from_name(name),
    };
    match found {
        Ok(Some(g)) => Ok(g.gid),
        Ok(None) => Err(format!("no such group {}", shown(name))),
        Err(e) => Err(format!(
            "looking up group {}: {}",
            shown(name),
            crate::errno::describe(e)
        )),
    }
}

/// The log file can be opened: not a directory, in a directory that exists.
fn check_log_path(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{} is a directory; name a file in it", path.display()));
    }
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(format!("{} is not a directory", dir.display())),
            Err(e) => Err(format!(
                "directory {}: {}",
                dir.display(),
                crate::errno::describe_io(&e)
            )),
        },
        None => Ok(()),
    }
}

fn check_cwd(dir: &Path) -> Result<(), String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("{} is not a directory", dir.display())),
        Err(e) => Err(format!("{}: {}", dir.display(), crate::errno::describe_io(&e))),
    }
}

/// The worker's program as the spawn path will find it (the worker's own PATH if its env sets
/// one, else the master's) is an executable file. `dir` anchors a relative path with a '/'.
fn check_program(program: &str, env: &[(String, String)], dir: Option<&Path>) -> Result<(), String> {
    let path_var: Option<OsString> = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsString::from(v))
        .or_else(|| std::env::var_os("PATH"));
    let Some(found) = find_program(program, path_var.as_deref()) else {
        return Err(format!(
            "{} not found in PATH ({})",
            shown(program),
            cut(&path_var.unwrap_or_default().to_string_lossy(), MAX_SHOWN * 4)
        ));
    };
    let full = match dir {
        Some(d) if found.is_relative() => d.join(&found),
        _ => found,
    };
    let m = std::fs::metadata(&full).map_err(|e| format!("{}: {}", full.display(), crate::errno::describe_io(&e)))?;
    if !m.is_file() {
        return Err(format!("{} is not a regular file", full.display()));
    }
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o111 == 0 || nix::unistd::access(&full, nix::unistd::AccessFlags::X_OK).is_err() {
        return Err(format!("{} is not executable (mode {mode:04o})", full.display()));
    }
    Ok(())
}

/// The worker can be given this hard limit. It sets its limits after dropping privileges, so
/// only a worker that runs as root under a root master can raise one above the master's own;
/// and no process gets more open files than the kernel's fs.nr_open. Judged against the limits
/// of the process doing the check (`zdd check` inherits them from the same place `start` does).
fn check_rlimit(resource: Resource, hard: u64, worker: &WorkerConfig) -> Result<(), String> {
    if resource == Resource::RLIMIT_NOFILE {
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(max) = nr_open.filter(|max| hard > *max) {
            return Err(format!(
                "{} is above the kernel's maximum of open files per process (fs.nr_open = {max})",
                limit_text(hard)
            ));
        }
    }
    let Ok((_, own_hard)) = nix::sys::resource::getrlimit(resource) else {
        return Ok(());
    };
    let worker_uid = worker.credentials.as_ref().map_or_else(Uid::effective, |c| c.uid);
    if hard > own_hard && !(Uid::effective().is_root() && worker_uid.is_root()) {
        return Err(format!(
            "hard limit {} is above zdd's own hard limit {}, and only a worker running as root \
             could raise it (workers set their limits after dropping privileges)",
            limit_text(hard),
            limit_text(own_hard)
        ));
    }
    Ok(())
}

const RLIMIT_NAMES: &[(&str, Resource)] = &[
    ("as", Resource::RLIMIT_AS),
    ("core", Resource::RLIMIT_CORE),
    ("cpu", Resource::RLIMIT_CPU),
    ("data", Resource::RLIMIT_DATA),
    ("fsize", Resource::RLIMIT_FSIZE),
    ("locks", Resource::RLIMIT_LOCKS),
    ("memlock", Resource::RLIMIT_MEMLOCK),
    ("msgqueue", Resource::RLIMIT_MSGQUEUE),
    ("nice", Resource::RLIMIT_NICE),
    ("nofile", Resource::RLIMIT_NOFILE),
    ("nproc", Resource::RLIMIT_NPROC),
    ("rss", Resource::RLIMIT_RSS),
    ("rtprio", Resource::RLIMIT_RTPRIO),
    ("rttime", Resource::RLIMIT_RTTIME),
    ("sigpending", Resource::RLIMIT_SIGPENDING),
    ("stack", Resource::RLIMIT_STACK),
];

pub(crate) fn rlimit_resource(name: &str) -> Option<(Resource, &'static str)> {
    let lower = name.to_ascii_lowercase();
    let lower = lower.strip_prefix("rlimit_").unwrap_or(&lower);
    RLIMIT_NAMES.iter().find(|(n, _)| *n == lower).map(|(n, r)| (*r, *n))
}

/// `/run/zdd` as root; otherwise `$XDG_RUNTIME_DIR/zdd`, else `/tmp/zdd-<uid>`.
pub fn default_runtime_dir() -> PathBuf {
    if Uid::effective().is_root() {
        return PathBuf::from("/run/zdd");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("zdd"),
        _ => PathBuf::from(format!("/tmp/zdd-{}", Uid::effective())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/zdd/app.toml"), text)
    }

    fn err(text: &str) -> String {
        p(text).unwrap_err().to_string()
    }

    const MIN: &str = "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:8080\"\n";

    #[test]
    fn smallest_file_gets_defaults() {
        let c = p(MIN).unwrap();
        assert_eq!(c.worker.count, 1);
        assert_eq!(c.worker.ready, Ready::Notify);
        assert_eq!(c.worker.start_timeout, Duration::from_secs(60));
        assert_eq!(c.worker.stop_timeout, Duration::from_secs(30));
        assert_eq!(c.worker.stop_signal, Signal::SIGTERM);
        assert_eq!(c.worker.restart, Restart::Always);
        assert_eq!(c.master.log, LogTarget::Stderr);
        assert_eq!(c.master.max_draining, 2);
        assert_eq!(c.listen[0].backlog, nix::libc::SOMAXCONN);
        assert_eq!(c.master.pid_file.file_name().unwrap(), "app.pid");
        assert_eq!(c.master.control_socket.file_name().unwrap(), "app.sock");
    }

    #[test]
    fn every_key_is_read() {
        let c = p(r#"
[master]
pid_file = "run/app.pid"
control_socket = "/tmp/x/app.sock"
log = "/var/log/zdd.log"
log_format = "json"
max_draining = 3
[worker]
command = ["/bin/sh", "-c", "exit 0"]
cwd = "/srv"
env = { A = "1", B = "two" }
user = "0"
group = "0"
count = 4
ready = "delay"
ready_delay = "250ms"
start_timeout = "1m30s"
stop_signal = "QUIT"
stop_timeout = "5s"
restart = "on-failure"
umask = "0027"
compat = ["einhorn", "server_starter"]
[rlimits]
nofile = 4096
core = { soft = 0, hard = "infinity" }
[[listen]]
name = "http"
tcp = "[::1]:8080"
backlog = 511
[[listen]]
name = "admin"
unix = "admin.sock"
mode = "0660"
owner = "0"
group = "0"
[[listen]]
name = "abs"
unix = "@zdd-test"
"#)
        .unwrap();
        assert_eq!(c.master.pid_file, PathBuf::from("/etc/zdd/run/app.pid"));
        assert_eq!(c.master.notify_socket, PathBuf::from("/tmp/x/app.notify"));
        assert_eq!(c.master.log_format, LogFormat::Json);
        assert_eq!(c.master.max_draining, 3);
        assert_eq!(c.worker.env, vec![("A".into(), "1".into()), ("B".into(), "two".into())]);
        assert_eq!(c.worker.count, 4);
        assert_eq!(c.worker.ready, Ready::Delay(Duration::from_millis(250)));
        assert_eq!(c.worker.start_timeout, Duration::from_secs(90));
        assert_eq!(c.worker.stop_signal, Signal::SIGQUIT);
        assert_eq!(c.worker.restart, Restart::OnFailure);
        assert_eq!(c.worker.umask, Some(0o027));
        assert_eq!(c.worker.compat, vec![Compat::Einhorn, Compat::ServerStarter]);
        assert_eq!(c.worker.credentials.as_ref().unwrap().uid, Uid::from_raw(0));
        assert_eq!(c.rlimits.len(), 2);
        let core = c.rlimits.iter().find(|r| r.name == "core").unwrap();
        assert_eq!((core.soft, core.hard), (0, nix::libc::RLIM_INFINITY));
        assert_eq!(c.listen[0].addr, ListenAddr::Tcp("[::1]:8080".parse().unwrap()));
        assert_eq!(c.listen[0].backlog, 511);
        assert_eq!(c.listen[1].addr, ListenAddr::Unix("/etc/zdd/admin.sock".into()));
        assert_eq!(c.listen[1].mode, Some(0o660));
        assert_eq!(c.listen[2].addr, ListenAddr::Abstract("zdd-test".into()));
    }

    #[test]
    fn unknown_key_names_key_and_position() {
        let e = err("[worker]\ncommand = [\"/bin/true\"]\ncuont = 2\n");
        assert!(e.starts_with("/etc/zdd/app.toml:3:1: "), "{e}");
        assert!(e.contains("unknown field `cuont`"), "{e}");
    }

    #[test]
    fn unknown_table_is_rejected() {
        let e = err("[worker]\ncommand = [\"/bin/true\"]\n[mastr]\nlog = \"stderr\"\n");
        assert!(e.contains("unknown field `mastr`"), "{e}");
    }

    #[test]
    fn type_error_names_key() {
        let e = err("[worker]\ncommand = [\"/bin/true\"]\ncount = \"two\"\n");
        assert!(e.starts_with("/etc/zdd/app.toml:3:9: worker.count: "), "{e}");
    }

    #[test]
    fn bad_values_are_rejected_with_key() {
        let cases = [
            ("count = 0", "worker.count", "3:9"),
            ("ready = \"soon\"", "worker.ready", "3:9"),
            ("stop_timeout = \"5 parsecs\"", "worker.stop_timeout", "3:16"),
            ("stop_signal = \"NOPE\"", "worker.stop_signal", "3:15"),
            ("restart = \"sometimes\"", "worker.restart", "3:11"),
            ("umask = \"999\"", "worker.umask", "3:9"),
            ("user = \"no-such-user-zdd\"", "worker.user", "3:8"),
            ("compat = [\"inetd\"]", "worker.compat", "3:11"),
            ("ready_delay = \"1s\"", "worker.ready_delay", "3:15"),
        ];
        for (line, key, pos) in cases {
            let e = err(&format!("[worker]\ncommand = [\"/bin/true\"]\n{line}\n"));
            assert!(
                e.starts_with(&format!("/etc/zdd/app.toml:{pos}: {key}: ")),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn bad_listeners_are_rejected() {
        let cases = [
            ("name = \"a:b\"\ntcp = \"127.0.0.1:1\"", "listen.name"),
            ("name = \"a\"\ntcp = \"localhost\"", "listen.tcp"),
            ("name = \"a\"", "listen"),
            ("name = \"a\"\ntcp = \"127.0.0.1:1\"\nunix = \"/x\"", "listen"),
            ("name = \"a\"\ntcp = \"127.0.0.1:1\"\nmode = \"0600\"", "listen.mode"),
            ("name = \"a\"\nunix = \"/x\"\nmode = \"9\"", "listen.mode"),
            ("name = \"a\"\ntcp = \"127.0.0.1:1\"\nbacklog = 0", "listen.backlog"),
        ];
        for (body, key) in cases {
            let e = err(&format!("[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\n{body}\n"));
            assert!(e.contains(&format!(": {key}: ")), "{body}: {e}");
        }
    }

    #[test]
    fn duplicate_names_and_addresses_are_rejected() {
        let e = err(&format!("{MIN}[[listen]]\nname = \"http\"\ntcp = \"127.0.0.1:8081\"\n"));
        assert!(e.contains("duplicate listener name \"http\""), "{e}");
        let e = err(&format!(
            "{MIN}[[listen]]\nname = \"other\"\ntcp = \"127.0.0.1:8080\"\n"
        ));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn missing_worker_or_command() {
        assert!(err("[[listen]]\nname = \"a\"\ntcp = \"127.0.0.1:1\"\n").contains("missing table [worker]"));
        assert!(err("[worker]\ncwd = \"/\"\n").contains("missing field `command`"));
        assert!(err("[worker]\ncommand = []\n").contains("worker.command"));
    }

    #[test]
    fn rlimit_errors() {
        let e = err("[worker]\ncommand = [\"/bin/true\"]\n[rlimits]\nfiles = 5\n");
        assert!(e.contains("rlimits.files: unknown resource"), "{e}");
        let e = err("[worker]\ncommand = [\"/bin/true\"]\n[rlimits]\nnofile = { soft = 10, hard = 5 }\n");
        assert!(e.contains("above hard limit"), "{e}");
    }

    #[test]
    fn master_alone_is_read_from_an_otherwise_invalid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.toml");
        std::fs::write(&path, "[master]\ncontrol_socket = \"c.sock\"\n[worker]\ncount = 0\n").unwrap();
        assert!(load(&path).is_err());
        let m = load_master(&path).unwrap();
        assert_eq!(m.control_socket, dir.path().canonicalize().unwrap().join("c.sock"));
        std::fs::write(&path, "[master]\ncontrol_sock = \"c.sock\"\n").unwrap();
        assert!(load_master(&path)
            .unwrap_err()
            .to_string()
            .contains("unknown field `control_sock`"));
    }

    #[test]
    fn syntax_error_has_position() {
        let e = err("[worker\ncommand = 1\n");
        assert!(e.starts_with("/etc/zdd/app.toml:1:"), "{e}");
    }

    #[test]
    fn durations_are_bounded() {
        let e = err("[worker]\ncommand = [\"/bin/true\"]\nstart_timeout = \"500000000000y\"\n");
        assert!(
            e.starts_with(
                "/etc/zdd/app.toml:3:17: worker.start_timeout: \"500000000000y\" is longer than the maximum of 24h"
            ),
            "{e}"
        );
        let e = err("[worker]\ncommand = [\"/bin/true\"]\nstart_timeout = \"0s\"\n");
        assert!(e.contains("worker.start_timeout: must be longer than 0s"), "{e}");
        let c = p("[worker]\ncommand = [\"/bin/true\"]\nstart_timeout = \"24h\"\nstop_timeout = \"0s\"\n").unwrap();
        assert_eq!(c.worker.start_timeout, MAX_DURATION);
        assert_eq!(c.worker.stop_timeout, Duration::ZERO);
    }

    #[test]
    fn argv_is_bounded_and_never_echoed() {
        let big = "x".repeat(MAX_ARG_LEN + 1);
        let e = err(&format!("[worker]\ncommand = [\"/bin/true\", \"{big}\"]\n"));
        assert!(e.contains("argument 1 is 131072 bytes long"), "{e}");
        assert!(e.len() < 300, "{e}");
        let e = err(&format!(
            "[worker]\ncommand = [\"/bin/true\"]\nenv = {{ A = \"{big}\" }}\n"
        ));
        assert!(e.contains("worker.env: \"A\" is 131074 bytes long"), "{e}");
        let e = err(&format!("[worker]\ncommand = [\"/bin/true\"]\nready = \"{big}\"\n"));
        assert!(
            e.contains("got \"xxxxx") && e.contains("… (131072 bytes)") && e.len() < 300,
            "{e}"
        );
    }

    #[test]
    fn error_messages_are_cut() {
        assert_eq!(shown("abc"), "\"abc\"");
        let long = "é".repeat(100);
        let s = shown(&long);
        assert!(s.ends_with("… (200 bytes)") && s.len() < 100, "{s}");
        assert_eq!(cut("short", 10), "short");
        assert!(cut(&long, 5).starts_with("éé…"));
    }

    #[test]
    fn wildcards_overlap_the_addresses_they_cover() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(tcp_overlap(&a("0.0.0.0:80"), &a("127.0.0.1:80")));
        assert!(tcp_overlap(&a("127.0.0.1:80"), &a("0.0.0.0:80")));
        assert!(tcp_overlap(&a("[::]:80"), &a("0.0.0.0:80")));
        assert!(tcp_overlap(&a("[::1]:80"), &a("[::]:80")));
        assert!(tcp_overlap(&a("[::]:80"), &a("10.0.0.1:80")));
        assert!(!tcp_overlap(&a("0.0.0.0:80"), &a("[::1]:80")));
        assert!(!tcp_overlap(&a("0.0.0.0:80"), &a("127.0.0.1:81")));
        assert!(!tcp_overlap(&a("127.0.0.1:80"), &a("127.0.0.2:80")));
        assert!(!tcp_overlap(&a("0.0.0.0:0"), &a("127.0.0.1:0")));
        let e = err(&format!("{MIN}[[listen]]\nname = \"all\"\ntcp = \"0.0.0.0:8080\"\n"));
        assert!(
            e.contains("6:1: listen: address 0.0.0.0:8080 overlaps 127.0.0.1:8080 of listener \"http\""),
            "{e}"
        );
    }

    #[test]
    fn text_checks_leave_the_host_alone_and_host_checks_do_not() {
        let text = "[worker]\ncommand = [\"/nonexistent/zdd-server\"]\ncwd = \"/nonexistent\"\n";
        assert!(p(text).is_ok());
        let e = parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Reload)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("worker.cwd: /nonexistent: no such file or directory (ENOENT)"),
            "{e}"
        );
        let text = "[worker]\ncommand = [\"/nonexistent/zdd-server\"]\n";
        let e = parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Reload)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("2:11: worker.command: /nonexistent/zdd-server: no such file or directory (ENOENT)"),
            "{e}"
        );
        // A reload does not judge the [master] settings it does not apply.
        let text = "[master]\nlog = \"/nonexistent/dir/zdd.log\"\n[worker]\ncommand = [\"/bin/true\"]\n";
        assert!(parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Reload).is_ok());
        let e = parse_with(Path::new("/etc/zdd/app.toml"), text, Checks::Start)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("master.log: directory /nonexistent/dir: no such file"),
            "{e}"
        );
    }

    #[test]
    fn runtime_dir_must_be_ours_and_closed() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_runtime_dir(dir.path()).is_ok());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_runtime_dir(dir.path()).unwrap_err();
        assert!(e.contains("is writable by others") && e.contains("mode 0777"), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_runtime_dir(dir.path()).is_ok());
        let file = dir.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(check_runtime_dir(&file).unwrap_err().contains("is not a directory"));
    }

    #[test]
    fn signals_parse_in_every_spelling() {
        assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGINT").unwrap(), Signal::SIGINT);
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert!(parse_signal("FOO").is_err());
    }
}
