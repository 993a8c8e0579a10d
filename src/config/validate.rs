//! The [`Validator`]: raw values (`raw.rs`) → the validated types of the parent module, one
//! key at a time, every error placed at the value it is about. What it checks against the host
//! beyond the text is in `checks.rs`, and done only as deep as [`Checks`] asks.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Uid;
use toml::Spanned;

use super::checks::{
    check_cwd, check_log_path, check_program, check_rlimit, check_runtime_dir, default_runtime_dir, lookup_group,
    lookup_user, rlimit_resource, Checks, RLIMIT_NAMES,
};
use super::raw::{LimitValue, Octal, RawHooks, RawLimit, RawListen, RawMaster, RawProbe, RawStatus, RawWorker, Source};
use super::{
    cut, shown, Compat, ConfigError, Credentials, HooksConfig, ListenAddr, ListenConfig, LogFormat, LogTarget,
    MasterConfig, ProbeCheck, ProbeConfig, Ready, ReloadMode, Restart, Rlimit, SockOpts, WorkerConfig, HOOK_TIMEOUT,
    MAX_ARGS_TOTAL, MAX_ARG_LEN, MAX_DURATION, MAX_SHOWN, PROBE_NAME,
};

/// A `LISTEN_FDNAMES` entry: 1 to 255 printable ASCII characters without ':'.
fn valid_fd_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !name.contains(':')
}

/// An accepted status range: `"200"`, `"200-299"`, or an integer; each bound 100 to 599.
pub(super) fn parse_status(v: &RawStatus) -> Result<(u16, u16), String> {
    let code = |s: &str| s.trim().parse::<u16>().ok().filter(|c| (100..=599).contains(c));
    let bad = |s: &str| {
        format!(
            "expected a status such as \"200\" or a range such as \"200-399\" (100 to 599), got {}",
            shown(s)
        )
    };
    match v {
        RawStatus::Int(i) => u16::try_from(*i)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .map(|c| (c, c))
            .ok_or_else(|| bad(&i.to_string())),
        RawStatus::Text(s) => {
            let (lo, hi) = match s.split_once('-') {
                Some((a, b)) => (code(a), code(b)),
                None => (code(s), code(s)),
            };
            match (lo, hi) {
                (Some(lo), Some(hi)) if lo <= hi => Ok((lo, hi)),
                (Some(lo), Some(hi)) => Err(format!("range {}: {lo} is above {hi}", shown(s))),
                _ => Err(bad(s)),
            }
        }
    }
}

pub(super) struct Validator<'a> {
    pub(super) src: &'a Source<'a>,
    pub(super) base: &'a Path,
    pub(super) checks: Checks,
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
/// covers every address of both families unless `ipv6_only`). Port 0 asks for a fresh port and
/// never collides. The same rules hold for two udp listeners.
pub(super) fn tcp_overlap(a: &SocketAddr, a_v6only: bool, b: &SocketAddr, b_v6only: bool) -> bool {
    if a.port() != b.port() || a.port() == 0 || a == b {
        return false;
    }
    let dual_any = |x: &SocketAddr, v6only: bool| x.is_ipv6() && x.ip().is_unspecified() && !v6only;
    if dual_any(a, a_v6only) || dual_any(b, b_v6only) {
        return true;
    }
    a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A `tcp`/`udp` value: `"IP:PORT"`, `"[IPv6]:PORT"`, or a port alone (`"8080"`, `"*:8080"`):
/// then `[::]:PORT`, dual-stack, and the flag says so.
fn parse_inet(s: &str) -> Option<(SocketAddr, bool)> {
    let port = s.strip_prefix("*:").unwrap_or(s);
    if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = port.parse().ok()?;
        return Some((SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)), true));
    }
    s.parse::<SocketAddr>().ok().map(|a| (a, false))
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

    pub(super) fn master(&self, m: &RawMaster, stem: &str) -> Result<MasterConfig, ConfigError> {
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
        let metrics = m.metrics.as_ref().map(|s| self.metrics(s)).transpose()?;
        for (p, key) in [
            (&control_socket, "master.control_socket"),
            (&pid_file, "master.pid_file"),
        ] {
            if let (Some(ListenAddr::Unix(mp)), Some(s)) = (&metrics, &m.metrics) {
                if mp == p {
                    return Err(self.err(s.span(), "master.metrics", format!("is the same path as {key}")));
                }
            }
        }
        Ok(MasterConfig {
            pid_file,
            control_socket,
            notify_socket,
            log,
            log_format,
            max_draining,
            metrics,
        })
    }

    /// `[master] metrics`: a tcp address (`"127.0.0.1:9101"`, `"[::1]:9101"`), a unix socket
    /// path (anything with a `/`, relative to the config's directory) or `"@name"` (abstract).
    fn metrics(&self, v: &Spanned<String>) -> Result<ListenAddr, ConfigError> {
        let key = "master.metrics";
        let s = v.get_ref();
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(self.err(
                    v.span(),
                    key,
                    "port 0 is no port a scraper can find; name one, such as \"127.0.0.1:9101\"",
                ));
            }
            return Ok(ListenAddr::Tcp(a));
        }
        if let Some(abs) = s.strip_prefix('@') {
            if abs.is_empty() || abs.len() > 106 {
                return Err(self.err(v.span(), key, "abstract name must be 1 to 106 bytes"));
            }
            return Ok(ListenAddr::Abstract(abs.to_string()));
        }
        if s.contains('/') {
            let p = self.nonempty_path(v, key)?;
            if p.as_os_str().len() > 107 {
                return Err(self.err(
                    v.span(),
                    key,
                    format!("socket path {} is longer than 107 bytes", p.display()),
                ));
            }
            return Ok(ListenAddr::Unix(p));
        }
        Err(self.err(
            v.span(),
            key,
            format!(
                "{} is neither an address such as \"127.0.0.1:9101\" or \"[::1]:9101\" (an IP address, \
                 not a host name) nor a unix socket path (\"./metrics.sock\" for one beside the config)",
                shown(s)
            ),
        ))
    }

    pub(super) fn worker(&self, w: &Spanned<RawWorker>) -> Result<WorkerConfig, ConfigError> {
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
            Some(("notify", _)) => {
                if let Some(d) = &w.ready_delay {
                    return Err(self.err(d.span(), "worker.ready_delay", "only used with ready = \"delay\""));
                }
                Ready::Notify
            }
            Some(("delay", _)) => {
                Ready::Delay(self.duration(&w.ready_delay, "worker.ready_delay", Duration::from_secs(1), false)?)
            }
            // The default: every server tested is seen listening, and READY=1 still counts for
            // those that send it (docs/servers.md).
            None => {
                if let Some(d) = &w.ready_delay {
                    return Err(self.err(d.span(), "worker.ready_delay", "only used with ready = \"delay\""));
                }
                Ready::Auto
            }
            Some((mode @ ("listening" | "auto"), _)) => {
                if let Some(d) = &w.ready_delay {
                    return Err(self.err(d.span(), "worker.ready_delay", "only used with ready = \"delay\""));
                }
                if mode == "listening" {
                    Ready::Listening
                } else {
                    Ready::Auto
                }
            }
            Some((other, span)) => {
                return Err(self.err(
                    span,
                    "worker.ready",
                    format!(
                        "expected \"notify\", \"delay\", \"listening\" or \"auto\", got {}",
                        shown(other)
                    ),
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
        let reload = match w.reload.as_ref().map(|s| (s.get_ref().as_str(), s.span())) {
            None | Some(("all-at-once", _)) => {
                if let Some(m) = &w.max_surge {
                    return Err(self.err(m.span(), "worker.max_surge", "only used with reload = \"rolling\""));
                }
                ReloadMode::AllAtOnce
            }
            Some(("rolling", _)) => ReloadMode::Rolling {
                max_surge: match &w.max_surge {
                    None => 1,
                    Some(n) => usize::try_from(*n.get_ref())
                        .ok()
                        .filter(|n| (1..=4096).contains(n))
                        .ok_or_else(|| self.err(n.span(), "worker.max_surge", "must be between 1 and 4096"))?,
                },
            },
            Some((other, span)) => {
                return Err(self.err(
                    span,
                    "worker.reload",
                    format!("expected \"all-at-once\" or \"rolling\", got {}", shown(other)),
                ))
            }
        };
        let stable_after = self.duration(&w.stable_after, "worker.stable_after", Duration::from_secs(5), false)?;
        let watchdog = match &w.watchdog {
            None => None,
            Some(_) => Some(self.duration(&w.watchdog, "worker.watchdog", Duration::ZERO, true)?),
        };
        let max_lifetime = match &w.max_lifetime {
            None => None,
            Some(_) => Some(self.duration(&w.max_lifetime, "worker.max_lifetime", Duration::ZERO, true)?),
        };
        let recycle_jitter = self.duration(&w.recycle_jitter, "worker.recycle_jitter", Duration::ZERO, false)?;
        if let (Some(j), None) = (&w.recycle_jitter, &w.max_lifetime) {
            return Err(self.err(j.span(), "worker.recycle_jitter", "only used with max_lifetime"));
        }
        let max_rss = w
            .max_rss
            .as_ref()
            .map(|v| parse_size(v.get_ref()).map_err(|m| self.err(v.span(), "worker.max_rss", m)))
            .transpose()?;
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
        let probe = w.probe.as_ref().map(|p| self.probe(p)).transpose()?;
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
            reload,
            stable_after,
            watchdog,
            max_lifetime,
            recycle_jitter,
            max_rss,
            umask,
            compat,
            probe,
        })
    }

    /// A count between `min` and `max`, or `default`.
    fn count(&self, v: &Option<Spanned<i64>>, key: &str, default: u32, min: u32, max: u32) -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) => u32::try_from(*n.get_ref())
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| self.err(n.span(), key, format!("must be between {min} and {max}"))),
        }
    }

    pub(super) fn probe(&self, p: &Spanned<RawProbe>) -> Result<ProbeConfig, ConfigError> {
        let span = p.span();
        let p = p.get_ref();
        let tcp = p.tcp.as_ref().filter(|t| *t.get_ref());
        let check = match (&p.http, tcp) {
            (Some(h), None) => {
                let path = h.get_ref();
                if !path.starts_with('/') || path.len() > 1024 || !path.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(self.err(
                        h.span(),
                        "worker.probe.http",
                        format!(
                            "{} is not a request path such as \"/healthz\" (it starts with '/', at most 1024 \
                             printable ASCII characters, no spaces)",
                            shown(path)
                        ),
                    ));
                }
                let host = match &p.host {
                    None => "localhost".to_string(),
                    Some(h) => {
                        let v = h.get_ref();
                        if v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                            return Err(self.err(
                                h.span(),
                                "worker.probe.host",
                                "must be 1 to 255 printable ASCII characters without spaces",
                            ));
                        }
                        v.clone()
                    }
                };
                let status = match &p.status {
                    None => (200, 399),
                    Some(s) => parse_status(s.get_ref()).map_err(|m| self.err(s.span(), "worker.probe.status", m))?,
                };
                ProbeCheck::Http {
                    path: path.clone(),
                    host,
                    status,
                }
            }
            (None, Some(_)) => {
                for (v, key) in [
                    (p.status.as_ref().map(|s| s.span()), "worker.probe.status"),
                    (p.host.as_ref().map(|s| s.span()), "worker.probe.host"),
                ] {
                    if let Some(s) = v {
                        return Err(self.err(s, key, "only applies to http probes"));
                    }
                }
                ProbeCheck::Tcp
            }
            (Some(h), Some(_)) => {
                return Err(self.err(
                    h.span(),
                    "worker.probe",
                    "give either http = \"/path\" or tcp = true, not both",
                ))
            }
            (None, None) => {
                return Err(self.err(span, "worker.probe", "needs http = \"/path\" or tcp = true"));
            }
        };
        let timeout = self.duration(&p.timeout, "worker.probe.timeout", Duration::from_secs(5), true)?;
        let retries = self.count(&p.retries, "worker.probe.retries", 3, 0, 100)?;
        let retry_delay = self.duration(
            &p.retry_delay,
            "worker.probe.retry_delay",
            Duration::from_millis(500),
            false,
        )?;
        let name = match &p.name {
            None => PROBE_NAME.to_string(),
            Some(n) if valid_fd_name(n.get_ref()) => n.get_ref().clone(),
            Some(n) => {
                return Err(self.err(
                    n.span(),
                    "worker.probe.name",
                    "must be 1 to 255 printable ASCII characters without ':'",
                ))
            }
        };
        let interval = match &p.interval {
            None => None,
            some => Some(self.duration(some, "worker.probe.interval", Duration::ZERO, true)?),
        };
        if interval.is_none() {
            if let Some(f) = &p.failures {
                return Err(self.err(f.span(), "worker.probe.failures", "only used with interval"));
            }
        }
        let failures = self.count(&p.failures, "worker.probe.failures", 3, 1, 100)?;
        Ok(ProbeConfig {
            check,
            timeout,
            retries,
            retry_delay,
            name,
            interval,
            failures,
        })
    }

    pub(super) fn rlimit(
        &self,
        name: &str,
        v: &Spanned<RawLimit>,
        worker: &WorkerConfig,
    ) -> Result<Rlimit, ConfigError> {
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

    pub(super) fn listen(&self, l: &Spanned<RawListen>) -> Result<ListenConfig, ConfigError> {
        let span = l.span();
        let l = l.get_ref();
        let name = l.name.get_ref();
        if !valid_fd_name(name) {
            return Err(self.err(
                l.name.span(),
                "listen.name",
                "must be 1 to 255 printable ASCII characters without ':'",
            ));
        }
        let inet = |t: &Spanned<String>, key: &str| {
            parse_inet(t.get_ref()).ok_or_else(|| {
                self.err(
                    t.span(),
                    key,
                    format!(
                        "{} is not an address such as \"0.0.0.0:8080\", \"[::1]:8080\" or a port alone (\"8080\", \"*:8080\": dual-stack)",
                        shown(t.get_ref())
                    ),
                )
            })
        };
        let given: Vec<&Spanned<String>> = [&l.tcp, &l.udp, &l.unix].into_iter().flatten().collect();
        if given.len() > 1 {
            let second = given
                .iter()
                .map(|v| v.span())
                .max_by_key(|s| s.start)
                .unwrap_or(span.clone());
            return Err(self.err(second, "listen", "give exactly one of tcp, udp and unix"));
        }
        let mut any_host = false;
        let addr = match (&l.tcp, &l.udp, &l.unix) {
            (Some(t), _, _) => {
                let (a, any) = inet(t, "listen.tcp")?;
                any_host = any;
                ListenAddr::Tcp(a)
            }
            (_, Some(t), _) => {
                let (a, any) = inet(t, "listen.udp")?;
                any_host = any;
                ListenAddr::Udp(a)
            }
            (None, None, Some(u)) => {
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
                    // What bind(2) will need at start: a directory that exists.
                    if self.checks >= Checks::Start {
                        check_log_path(&p).map_err(|msg| self.err(u.span(), "listen.unix", msg))?;
                    }
                    ListenAddr::Unix(p)
                }
            }
            (None, None, None) => {
                return Err(self.err(
                    span,
                    "listen",
                    format!(
                        "listener {} needs tcp = \"ADDR:PORT\", udp = \"ADDR:PORT\" or unix = \"PATH\"",
                        shown(name)
                    ),
                ))
            }
        };
        let opts = self.sock_opts(l, &addr, any_host)?;
        if let (Some(b), ListenAddr::Udp(_)) = (&l.backlog, &addr) {
            return Err(self.err(
                b.span(),
                "listen.backlog",
                "does not apply to udp (a datagram socket has no accept queue)",
            ));
        }
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
            opts,
        })
    }

    /// The socket options of a `[[listen]]`, each refused where it makes no sense.
    fn sock_opts(&self, l: &RawListen, addr: &ListenAddr, any_host: bool) -> Result<SockOpts, ConfigError> {
        let is_inet = addr.inet().is_some();
        let is_tcp = matches!(addr, ListenAddr::Tcp(_));
        let flag = |v: &Option<Spanned<bool>>, key: &str, ok: bool, why: &str| -> Result<bool, ConfigError> {
            match v {
                Some(b) if !ok => Err(self.err(b.span(), key, why.to_string())),
                Some(b) => Ok(*b.get_ref()),
                None => Ok(false),
            }
        };
        let ip_only = "only applies to tcp and udp listeners";
        let tcp_only = if is_inet {
            "does not apply to udp (it is a TCP option)"
        } else {
            "only applies to tcp listeners"
        };
        let reuse_port = flag(&l.reuse_port, "listen.reuse_port", is_inet, ip_only)?;
        let free_bind = flag(&l.free_bind, "listen.free_bind", is_inet, ip_only)?;
        let v6 = addr.inet().is_some_and(|a| a.is_ipv6());
        let ipv6_only = flag(
            &l.ipv6_only,
            "listen.ipv6_only",
            v6,
            "only applies to IPv6 addresses (\"[::]:8080\", or a port alone)",
        )?;
        let keepalive = flag(&l.keepalive, "listen.keepalive", is_tcp, tcp_only)?;
        let nodelay = flag(&l.nodelay, "listen.nodelay", is_tcp, tcp_only)?;
        let defer_accept = match &l.defer_accept {
            None => 0,
            Some(d) if !is_tcp => return Err(self.err(d.span(), "listen.defer_accept", tcp_only)),
            Some(d) => {
                let secs = self
                    .duration(&l.defer_accept, "listen.defer_accept", Duration::ZERO, false)?
                    .as_secs_f64()
                    .ceil();
                if secs > i32::MAX as f64 {
                    return Err(self.err(d.span(), "listen.defer_accept", "is too long"));
                }
                secs as u32
            }
        };
        let buffer = |v: &Option<Spanned<String>>, key: &str| -> Result<Option<u32>, ConfigError> {
            v.as_ref()
                .map(|s| {
                    parse_size_in(s.get_ref(), 1 << 10, 1 << 30, "1KiB and 1GiB")
                        .map(|n| n as u32)
                        .map_err(|m| self.err(s.span(), key, m))
                })
                .transpose()
        };
        Ok(SockOpts {
            any_host,
            reuse_port,
            free_bind,
            ipv6_only,
            defer_accept,
            keepalive,
            nodelay,
            receive_buffer: buffer(&l.receive_buffer, "listen.receive_buffer")?,
            send_buffer: buffer(&l.send_buffer, "listen.send_buffer")?,
        })
    }

    /// `[hooks]`: each command an argv like `worker.command`, resolved the same way (the
    /// worker's PATH and cwd, since a hook runs as the worker would); `timeout` above zero.
    pub(super) fn hooks(&self, h: &Spanned<RawHooks>, worker: &WorkerConfig) -> Result<HooksConfig, ConfigError> {
        let h = h.get_ref();
        let argv = |v: &Option<Spanned<Vec<String>>>, key: &str| -> Result<Option<Vec<String>>, ConfigError> {
            let Some(v) = v else { return Ok(None) };
            let command = v.get_ref();
            if command.is_empty() || command[0].is_empty() {
                return Err(self.err(v.span(), key, "must name a program: [\"/path/to/check\", \"arg\", ...]"));
            }
            if command.iter().any(|a| a.contains('\0')) {
                return Err(self.err(v.span(), key, "arguments must not contain NUL bytes"));
            }
            if let Some((i, a)) = command.iter().enumerate().find(|(_, a)| a.len() > MAX_ARG_LEN) {
                return Err(self.err(
                    v.span(),
                    key,
                    format!(
                        "argument {i} is {} bytes long; exec takes at most {MAX_ARG_LEN} bytes per argument",
                        a.len()
                    ),
                ));
            }
            // The hook gets the worker's env: count both, as exec will.
            let total: usize = command
                .iter()
                .map(String::len)
                .chain(worker.env.iter().map(|(k, v)| k.len() + 1 + v.len()))
                .map(|n| n + 1 + std::mem::size_of::<usize>())
                .sum();
            if total > MAX_ARGS_TOTAL {
                return Err(self.err(
                    v.span(),
                    key,
                    format!(
                        "the command and worker.env take {total} bytes for exec; at most {MAX_ARGS_TOTAL} (1 MiB) are accepted"
                    ),
                ));
            }
            if self.checks >= Checks::Reload {
                let dir = worker.cwd.clone().or_else(|| std::env::current_dir().ok());
                check_program(&command[0], &worker.env, dir.as_deref()).map_err(|msg| self.err(v.span(), key, msg))?;
            }
            Ok(Some(command.clone()))
        };
        Ok(HooksConfig {
            before_reload: argv(&h.before_reload, "hooks.before_reload")?,
            after_reload: argv(&h.after_reload, "hooks.after_reload")?,
            timeout: self.duration(&h.timeout, "hooks.timeout", HOOK_TIMEOUT, true)?,
        })
    }
}

/// A memory size: `"512MiB"`, `"1.5GiB"`, `"300MB"`, `"4096"` (bytes). Binary (KiB, MiB, GiB)
/// and decimal (kB, MB, GB) units; at least 1 MiB, at most 1 TiB.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    parse_size_in(text, 1 << 20, 1 << 40, "1MiB and 1TiB")
}

/// A size like [`parse_size`]'s, between `min` and `max` bytes (`range` says so in words).
pub(crate) fn parse_size_in(text: &str, min: u64, max: u64, range: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{} is not a size such as \"512MiB\"", shown(text)))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "kb" => 1000,
        "m" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "unknown unit {} in {}; use B, KiB, MiB, GiB, TiB (or kB, MB, GB, TB)",
                shown(unit),
                shown(text)
            ))
        }
    };
    let bytes = n * mult as f64;
    if !(bytes.is_finite() && min as f64 <= bytes && bytes <= max as f64) {
        return Err(format!("{} must be between {range}", shown(text)));
    }
    Ok(bytes as u64)
}
