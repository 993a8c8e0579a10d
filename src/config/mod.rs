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
//!
//! The parts, in the order a file goes through them:
//! - `raw.rs`: what serde reads (the `Raw*` structs, spans kept), and [`Source`],
//!   which places an error at `file:line:column`.
//! - `validate.rs`: the `Validator`, raw values → the types below, one key at a time.
//! - `checks.rs`: what is checked against the host ([`Checks`]): the program, cwd, rlimits,
//!   the log path, the runtime directory, user and group look-ups.
//! - `state.rs`: the validated config as plain data, for the upgrade hand-over.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::resource::Resource;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};
use serde::Deserialize;

mod checks;
mod raw;
pub mod state;
#[cfg(test)]
mod tests;
mod validate;

pub(crate) use checks::rlimit_resource;
pub use checks::{check_runtime_dir, find_program, Checks};
use raw::{deserialize, RawConfig, RawMasterOnly, Source};
use validate::{tcp_overlap, Validator};

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

impl fmt::Display for LogTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogTarget::Stderr => write!(f, "stderr"),
            LogTarget::File(p) => write!(f, "{}", p.display()),
        }
    }
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
    /// `metrics`: where the OpenMetrics text is served (tcp address, unix path or `@name`).
    pub metrics: Option<ListenAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// `READY=1` on `NOTIFY_SOCKET`.
    Notify,
    /// This long after it started (or `READY=1` before then).
    Delay(Duration),
    /// Once a process of the worker waits for connections on one of its listeners
    /// (src/worker/listening.rs).
    Listening,
    /// The first of `READY=1` and listening.
    Auto,
}

impl Ready {
    /// What the "did not become ready within …" error adds: the other choices.
    pub fn timeout_hint(self) -> &'static str {
        match self {
            Ready::Notify => "; if the server never sends READY=1, set ready = \"listening\" (or \"auto\")",
            Ready::Listening => {
                "; it was not seen waiting on its listeners (io_uring, or accepting only from a thread \
                 blocked on something else, cannot be seen): set ready = \"notify\" or \"delay\""
            }
            Ready::Auto => {
                "; it neither sent READY=1 nor was seen waiting on its listeners: is the server running \
                 in the foreground (not daemonized) and serving the sockets zdd passes (LISTEN_FDS, fd 3 \
                 on)? if it waits in a way zdd cannot see (io_uring), set ready = \"delay\""
            }
            Ready::Delay(_) => "",
        }
    }

    /// Whether the master looks for the worker listening.
    pub fn watches_listening(self) -> bool {
        matches!(self, Ready::Listening | Ready::Auto)
    }

    /// Whether a `READY=1` from the worker makes it ready.
    pub fn takes_notify(self) -> bool {
        !matches!(self, Ready::Listening)
    }
}

/// How a reload replaces the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadMode {
    /// Start the whole new generation, then stop the old one.
    AllAtOnce,
    /// Replace `max_surge` slots at a time: a new worker for a slot, ready (and probed), then
    /// that slot's old worker is stopped.
    Rolling { max_surge: usize },
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
    pub reload: ReloadMode,
    /// After a cut-over, how long the new generation is watched; zero: not watched.
    pub stable_after: Duration,
    /// A ready worker that sends no `WATCHDOG=1` for this long is replaced.
    pub watchdog: Option<Duration>,
    /// A worker that has lived this long (plus up to `recycle_jitter`) is replaced.
    pub max_lifetime: Option<Duration>,
    pub recycle_jitter: Duration,
    /// A worker whose processes use more resident memory than this (bytes) is replaced.
    pub max_rss: Option<u64>,
    pub umask: Option<u32>,
    pub compat: Vec<Compat>,
    /// `[worker.probe]`: each new worker must answer it before the old generation stops.
    pub probe: Option<ProbeConfig>,
}

/// What a probe asks of a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCheck {
    /// `GET {path}` with `Host: {host}`; passed when the status is in `status` (inclusive).
    Http {
        path: String,
        host: String,
        status: (u16, u16),
    },
    /// Passed when the worker has accepted the probe's connection.
    Tcp,
}

/// `[worker.probe]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    pub check: ProbeCheck,
    /// One attempt: connect, request, status line and headers.
    pub timeout: Duration,
    /// Failed attempts tolerated after the first.
    pub retries: u32,
    pub retry_delay: Duration,
    /// The private listener's `LISTEN_FDNAMES` entry.
    pub name: String,
    /// Keep probing each serving worker this often.
    pub interval: Option<Duration>,
    /// With `interval`: consecutive misses before the worker is replaced.
    pub failures: u32,
}

/// `[hooks]`, validated: commands run around a reload (src/master/hooks.rs). Each is an argv,
/// run like a worker (its user, group, env, cwd, rlimits, umask) but without listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HooksConfig {
    /// Runs after the new config is read and before any new worker starts; failing, it fails
    /// the reload.
    pub before_reload: Option<Vec<String>>,
    /// Runs once the new generation serves; failing, it is logged.
    pub after_reload: Option<Vec<String>>,
    /// Each hook's limit; then its process group is killed.
    pub timeout: Duration,
}

/// The default `[hooks] timeout`.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            before_reload: None,
            after_reload: None,
            timeout: HOOK_TIMEOUT,
        }
    }
}

/// The default `[worker.probe] name`.
pub const PROBE_NAME: &str = "zdd-probe";

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
    /// A datagram socket (`udp = …`): its own identity, so tcp and udp on one port differ.
    Udp(SocketAddr),
    Unix(PathBuf),
    /// Linux abstract namespace, written `@name` in the config.
    Abstract(String),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Udp(a) => write!(f, "udp {a}"),
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
    /// Socket options (`reuse_port`, `keepalive`, …), carried across an upgrade as they are.
    pub opts: SockOpts,
}

/// The socket options of a `[[listen]]` beyond its address, like systemd.socket's. All off by
/// default (IPv6 sockets are dual-stack unless `ipv6_only`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(default)]
pub struct SockOpts {
    /// Written as a port alone (`tcp = "8080"`, `"*:8080"`): `[::]:PORT` dual-stack, or
    /// `0.0.0.0:PORT` where IPv6 is unavailable.
    pub any_host: bool,
    pub reuse_port: bool,
    pub free_bind: bool,
    /// IPV6_V6ONLY, IPv6 addresses only.
    pub ipv6_only: bool,
    /// TCP_DEFER_ACCEPT in seconds; 0: off.
    pub defer_accept: u32,
    pub keepalive: bool,
    pub nodelay: bool,
    /// SO_RCVBUF / SO_SNDBUF in bytes (the kernel doubles them).
    pub receive_buffer: Option<u32>,
    pub send_buffer: Option<u32>,
}

impl ListenAddr {
    /// The IP address of a tcp or udp listener.
    pub fn inet(&self) -> Option<&SocketAddr> {
        match self {
            ListenAddr::Tcp(a) | ListenAddr::Udp(a) => Some(a),
            _ => None,
        }
    }
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
    /// `[hooks]` (none configured: the default).
    pub hooks: HooksConfig,
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
        if let ListenAddr::Tcp(a) | ListenAddr::Udp(a) = &l.addr {
            let other = listen.iter().find_map(|o| match (&l.addr, &o.addr) {
                (ListenAddr::Tcp(_), ListenAddr::Tcp(b)) | (ListenAddr::Udp(_), ListenAddr::Udp(b))
                    if tcp_overlap(a, l.opts.ipv6_only, b, o.opts.ipv6_only) =>
                {
                    Some((o, b))
                }
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
    if let (Some(m), Some(span)) = (&master.metrics, raw.master.metrics.as_ref().map(|s| s.span())) {
        let clash = listen.iter().find(|l| match (&l.addr, m) {
            (ListenAddr::Tcp(a), ListenAddr::Tcp(b)) => a == b || tcp_overlap(a, l.opts.ipv6_only, b, false),
            (a, b) => a == b,
        });
        if let Some(l) = clash {
            return Err(src.err(
                span,
                "master.metrics",
                format!(
                    "{m} is also where listener {} listens (or overlaps it); the metrics need an address of their own",
                    shown(&l.name)
                ),
            ));
        }
    }
    if worker.ready == Ready::Listening && listen.is_empty() {
        let span = raw
            .worker
            .as_ref()
            .and_then(|w| w.get_ref().ready.as_ref())
            .map_or(0..0, |r| r.span());
        return Err(src.err(
            span,
            "worker.ready",
            "ready = \"listening\" needs at least one [[listen]]: a worker without listeners is never seen listening",
        ));
    }
    if let (Some(probe), Some(raw_probe)) = (
        &worker.probe,
        raw.worker.as_ref().and_then(|w| w.get_ref().probe.as_ref()),
    ) {
        if names.contains(&probe.name) {
            let span = raw_probe.get_ref().name.as_ref().map_or(raw_probe.span(), |n| n.span());
            return Err(src.err(
                span,
                "worker.probe.name",
                format!(
                    "{} is also a [[listen]] name; the probe's fd needs a LISTEN_FDNAMES entry of its own",
                    shown(&probe.name)
                ),
            ));
        }
    }
    let hooks = match &raw.hooks {
        Some(h) => v.hooks(h, &worker)?,
        None => HooksConfig::default(),
    };
    Ok(Config {
        path: path.to_path_buf(),
        source: text.to_string(),
        master,
        worker,
        rlimits,
        listen,
        hooks,
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
