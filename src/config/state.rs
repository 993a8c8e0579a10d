//! The running, already-validated [`Config`] as plain data, for the upgrade hand-over.
//!
//! Why it exists. On `zdd upgrade` the master re-execs itself and the new image resumes with
//! the state the old one wrote (upgrade.rs). If the new image re-parsed the config text, it
//! would validate it again and look up users and groups again: a worker `user` deleted since
//! start, or a file edited into something invalid, would make the resume fail and take the
//! service down. So the new image resumes with the config the old one was running, handed over
//! as data; the file is read again only by an explicit reload.
//!
//! How it works. [`ConfigState`] mirrors every field of [`Config`] with serde-friendly types:
//! uids and gids as `u32`, the stop signal by its name (`"SIGTERM"`), an rlimit resource by
//! its config name (`"nofile"`), durations with serde's lossless `{secs, nanos}` encoding, and
//! enums as snake_case strings. `From<&Config>` cannot fail; [`ConfigState::into_config`] does
//! no system lookups and no file access and fails only for a value that has no meaning in
//! this image (an unknown signal or resource name), naming the field.
//!
//! Paths travel as serde's `PathBuf`, which must be valid UTF-8 to serialize, like the
//! `config_path` already in the hand-over.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

use crate::config::{
    rlimit_resource, Compat, Config, Credentials, HooksConfig, ListenAddr, ListenConfig, LogFormat, LogTarget,
    MasterConfig, ProbeCheck, ProbeConfig, Ready, ReloadMode, Restart, Rlimit, SockOpts, WorkerConfig,
};

/// [`Config`] as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigState {
    pub path: PathBuf,
    /// The text the config was read from (kept for `status` and diagnostics, not re-parsed).
    pub source: String,
    pub master: MasterState,
    pub worker: WorkerState,
    pub rlimits: Vec<RlimitState>,
    pub listen: Vec<ListenState>,
    /// Absent in a state written by a zdd without hooks: none configured.
    #[serde(default)]
    pub hooks: HooksState,
}

/// [`HooksConfig`] as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HooksState {
    pub before_reload: Option<Vec<String>>,
    pub after_reload: Option<Vec<String>>,
    pub timeout: Duration,
}

impl Default for HooksState {
    fn default() -> Self {
        HooksState::from(&HooksConfig::default())
    }
}

impl From<&HooksConfig> for HooksState {
    fn from(h: &HooksConfig) -> Self {
        HooksState {
            before_reload: h.before_reload.clone(),
            after_reload: h.after_reload.clone(),
            timeout: h.timeout,
        }
    }
}

impl From<HooksState> for HooksConfig {
    fn from(h: HooksState) -> Self {
        HooksConfig {
            before_reload: h.before_reload,
            after_reload: h.after_reload,
            timeout: h.timeout,
        }
    }
}

/// [`MasterConfig`] as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MasterState {
    pub pid_file: PathBuf,
    pub control_socket: PathBuf,
    pub notify_socket: PathBuf,
    pub log: LogTargetState,
    pub log_format: LogFormatState,
    pub max_draining: usize,
    /// `[master] metrics` (absent before it existed).
    #[serde(default)]
    pub metrics: Option<ListenAddr>,
}

/// [`LogTarget`] as data: `"stderr"` or `{"file": "/path"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogTargetState {
    Stderr,
    File(PathBuf),
}

/// [`LogFormat`] as data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormatState {
    Text,
    Json,
}

/// [`WorkerConfig`] as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerState {
    pub command: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub credentials: Option<CredentialsState>,
    pub count: usize,
    pub ready: ReadyState,
    pub start_timeout: Duration,
    /// The signal's name, such as `"SIGTERM"`.
    pub stop_signal: String,
    pub stop_timeout: Duration,
    pub restart: RestartState,
    /// Since hand-over version 3; an older master's config had all-at-once reloads.
    #[serde(default)]
    pub reload: ReloadModeState,
    /// Since hand-over version 3; the default of the config key before.
    #[serde(default = "default_stable_after")]
    pub stable_after: Duration,
    #[serde(default)]
    pub watchdog: Option<Duration>,
    #[serde(default)]
    pub max_lifetime: Option<Duration>,
    #[serde(default)]
    pub recycle_jitter: Duration,
    #[serde(default)]
    pub max_rss: Option<u64>,
    pub umask: Option<u32>,
    pub compat: Vec<CompatState>,
    /// Absent in a state written by a zdd without probes: none configured.
    #[serde(default)]
    pub probe: Option<ProbeState>,
}

/// [`ProbeConfig`] as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeState {
    pub check: ProbeCheckState,
    pub timeout: Duration,
    pub retries: u32,
    pub retry_delay: Duration,
    pub name: String,
    pub interval: Option<Duration>,
    pub failures: u32,
}

/// [`ProbeCheck`] as data: `"tcp"` or `{"http": {"path": …, "host": …, "status": [200, 399]}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeCheckState {
    Http {
        path: String,
        host: String,
        status: (u16, u16),
    },
    Tcp,
}

impl From<&ProbeConfig> for ProbeState {
    fn from(p: &ProbeConfig) -> Self {
        ProbeState {
            check: match &p.check {
                ProbeCheck::Http { path, host, status } => ProbeCheckState::Http {
                    path: path.clone(),
                    host: host.clone(),
                    status: *status,
                },
                ProbeCheck::Tcp => ProbeCheckState::Tcp,
            },
            timeout: p.timeout,
            retries: p.retries,
            retry_delay: p.retry_delay,
            name: p.name.clone(),
            interval: p.interval,
            failures: p.failures,
        }
    }
}

impl From<ProbeState> for ProbeConfig {
    fn from(p: ProbeState) -> Self {
        ProbeConfig {
            check: match p.check {
                ProbeCheckState::Http { path, host, status } => ProbeCheck::Http { path, host, status },
                ProbeCheckState::Tcp => ProbeCheck::Tcp,
            },
            timeout: p.timeout,
            retries: p.retries,
            retry_delay: p.retry_delay,
            name: p.name,
            interval: p.interval,
            failures: p.failures,
        }
    }
}

fn default_stable_after() -> Duration {
    Duration::from_secs(5)
}

/// [`ReloadMode`] as data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadModeState {
    #[default]
    AllAtOnce,
    Rolling {
        max_surge: usize,
    },
}

/// [`Credentials`] as data: the ids resolved at start, so no lookup is needed to resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialsState {
    pub user: Option<String>,
    pub uid: u32,
    pub gid: u32,
}

/// [`Ready`] as data: `"notify"`, `{"delay": {"secs": 1, "nanos": 0}}`, `"listening"`, `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadyState {
    Notify,
    Delay(Duration),
    Listening,
    Auto,
}

/// [`Restart`] as data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartState {
    Always,
    OnFailure,
    Never,
}

/// [`Compat`] as data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompatState {
    Einhorn,
    ServerStarter,
}

/// [`Rlimit`] as data: the resource by its config name (`"nofile"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RlimitState {
    pub name: String,
    pub soft: u64,
    pub hard: u64,
}

/// [`ListenConfig`] as data. [`ListenAddr`] is already serde data (the hand-over's listeners
/// use it too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenState {
    pub name: String,
    pub addr: ListenAddr,
    pub backlog: i32,
    pub mode: Option<u32>,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// Since the socket options (still hand-over version 3): an older master's are all off.
    #[serde(default)]
    pub opts: SockOpts,
}

impl From<&Config> for ConfigState {
    fn from(c: &Config) -> Self {
        let m = &c.master;
        let w = &c.worker;
        ConfigState {
            path: c.path.clone(),
            source: c.source.clone(),
            master: MasterState {
                pid_file: m.pid_file.clone(),
                control_socket: m.control_socket.clone(),
                notify_socket: m.notify_socket.clone(),
                log: match &m.log {
                    LogTarget::Stderr => LogTargetState::Stderr,
                    LogTarget::File(p) => LogTargetState::File(p.clone()),
                },
                log_format: match m.log_format {
                    LogFormat::Text => LogFormatState::Text,
                    LogFormat::Json => LogFormatState::Json,
                },
                max_draining: m.max_draining,
                metrics: m.metrics.clone(),
            },
            worker: WorkerState {
                command: w.command.clone(),
                cwd: w.cwd.clone(),
                env: w.env.clone(),
                credentials: w.credentials.as_ref().map(|cr| CredentialsState {
                    user: cr.user.clone(),
                    uid: cr.uid.as_raw(),
                    gid: cr.gid.as_raw(),
                }),
                count: w.count,
                ready: match w.ready {
                    Ready::Notify => ReadyState::Notify,
                    Ready::Delay(d) => ReadyState::Delay(d),
                    Ready::Listening => ReadyState::Listening,
                    Ready::Auto => ReadyState::Auto,
                },
                start_timeout: w.start_timeout,
                stop_signal: w.stop_signal.as_str().to_string(),
                stop_timeout: w.stop_timeout,
                restart: match w.restart {
                    Restart::Always => RestartState::Always,
                    Restart::OnFailure => RestartState::OnFailure,
                    Restart::Never => RestartState::Never,
                },
                reload: match w.reload {
                    ReloadMode::AllAtOnce => ReloadModeState::AllAtOnce,
                    ReloadMode::Rolling { max_surge } => ReloadModeState::Rolling { max_surge },
                },
                stable_after: w.stable_after,
                watchdog: w.watchdog,
                max_lifetime: w.max_lifetime,
                recycle_jitter: w.recycle_jitter,
                max_rss: w.max_rss,
                umask: w.umask,
                compat: w
                    .compat
                    .iter()
                    .map(|c| match c {
                        Compat::Einhorn => CompatState::Einhorn,
                        Compat::ServerStarter => CompatState::ServerStarter,
                    })
                    .collect(),
                probe: w.probe.as_ref().map(ProbeState::from),
            },
            rlimits: c
                .rlimits
                .iter()
                .map(|r| RlimitState {
                    name: r.name.to_string(),
                    soft: r.soft,
                    hard: r.hard,
                })
                .collect(),
            listen: c
                .listen
                .iter()
                .map(|l| ListenState {
                    name: l.name.clone(),
                    addr: l.addr.clone(),
                    backlog: l.backlog,
                    mode: l.mode,
                    owner: l.owner.map(Uid::as_raw),
                    group: l.group.map(Gid::as_raw),
                    opts: l.opts.clone(),
                })
                .collect(),
            hooks: HooksState::from(&c.hooks),
        }
    }
}

impl ConfigState {
    /// The [`Config`] this state describes. No validation is repeated and nothing is looked
    /// up: the old image validated it. Fails only for a signal or resource name this image
    /// does not know, with a message naming the field.
    pub fn into_config(self) -> Result<Config, String> {
        let ConfigState {
            path,
            source,
            master: m,
            worker: w,
            rlimits,
            listen,
            hooks,
        } = self;
        let stop_signal = w
            .stop_signal
            .parse::<Signal>()
            .map_err(|_| format!("config state: worker.stop_signal: unknown signal {:?}", w.stop_signal))?;
        let rlimits = rlimits
            .into_iter()
            .map(|r| {
                let (resource, name) = rlimit_resource(&r.name)
                    .ok_or_else(|| format!("config state: rlimits.{}: unknown resource {:?}", r.name, r.name))?;
                Ok(Rlimit {
                    resource,
                    name,
                    soft: r.soft,
                    hard: r.hard,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Config {
            path,
            source,
            master: MasterConfig {
                pid_file: m.pid_file,
                control_socket: m.control_socket,
                notify_socket: m.notify_socket,
                log: match m.log {
                    LogTargetState::Stderr => LogTarget::Stderr,
                    LogTargetState::File(p) => LogTarget::File(p),
                },
                log_format: match m.log_format {
                    LogFormatState::Text => LogFormat::Text,
                    LogFormatState::Json => LogFormat::Json,
                },
                max_draining: m.max_draining,
                metrics: m.metrics,
            },
            worker: WorkerConfig {
                command: w.command,
                cwd: w.cwd,
                env: w.env,
                credentials: w.credentials.map(|cr| Credentials {
                    user: cr.user,
                    uid: Uid::from_raw(cr.uid),
                    gid: Gid::from_raw(cr.gid),
                }),
                count: w.count,
                ready: match w.ready {
                    ReadyState::Notify => Ready::Notify,
                    ReadyState::Delay(d) => Ready::Delay(d),
                    ReadyState::Listening => Ready::Listening,
                    ReadyState::Auto => Ready::Auto,
                },
                start_timeout: w.start_timeout,
                stop_signal,
                stop_timeout: w.stop_timeout,
                restart: match w.restart {
                    RestartState::Always => Restart::Always,
                    RestartState::OnFailure => Restart::OnFailure,
                    RestartState::Never => Restart::Never,
                },
                reload: match w.reload {
                    ReloadModeState::AllAtOnce => ReloadMode::AllAtOnce,
                    ReloadModeState::Rolling { max_surge } => ReloadMode::Rolling { max_surge },
                },
                stable_after: w.stable_after,
                watchdog: w.watchdog,
                max_lifetime: w.max_lifetime,
                recycle_jitter: w.recycle_jitter,
                max_rss: w.max_rss,
                umask: w.umask,
                compat: w
                    .compat
                    .into_iter()
                    .map(|c| match c {
                        CompatState::Einhorn => Compat::Einhorn,
                        CompatState::ServerStarter => Compat::ServerStarter,
                    })
                    .collect(),
                probe: w.probe.map(ProbeConfig::from),
            },
            rlimits,
            listen: listen
                .into_iter()
                .map(|l| ListenConfig {
                    name: l.name,
                    addr: l.addr,
                    backlog: l.backlog,
                    mode: l.mode,
                    owner: l.owner.map(Uid::from_raw),
                    group: l.group.map(Gid::from_raw),
                    opts: l.opts,
                })
                .collect(),
            hooks: HooksConfig::from(hooks),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    fn every_key() -> Config {
        config::parse(Path::new("/etc/zdd/app.toml"), crate::config::tests::EVERY_KEY).unwrap()
    }

    #[test]
    fn every_field_survives_the_round_trip() {
        let c = every_key();
        assert!(c.worker.credentials.is_some() && !c.rlimits.is_empty() && c.listen.len() == 3);
        assert_eq!(ConfigState::from(&c).into_config(), Ok(c));
    }

    #[test]
    fn defaults_and_other_variants_survive_the_round_trip() {
        let text = "[master]\nlog_format = \"text\"\n[worker]\ncommand = [\"/bin/true\"]\ngroup = \"0\"\n\
                    restart = \"never\"\nstop_timeout = \"1500us\"\n";
        let c = config::parse(Path::new("/etc/zdd/app.toml"), text).unwrap();
        assert_eq!(c.worker.credentials.as_ref().unwrap().user, None);
        assert_eq!(ConfigState::from(&c).into_config(), Ok(c));
    }

    #[test]
    fn socket_options_and_udp_survive_the_round_trip_and_default_when_absent() {
        let text = "[worker]\ncommand = [\"/bin/true\"]\n[[listen]]\nname = \"a\"\ntcp = \"8080\"\nkeepalive = true\n\
                    defer_accept = \"3s\"\nreceive_buffer = \"64KiB\"\n[[listen]]\nname = \"u\"\nudp = \"0.0.0.0:443\"\nreuse_port = true\n";
        let c = config::parse(Path::new("/etc/zdd/app.toml"), text).unwrap();
        let state = ConfigState::from(&c);
        let json = serde_json::to_string(&state).unwrap();
        let back: ConfigState = serde_json::from_str(&json).unwrap();
        let again = back.into_config().unwrap();
        assert_eq!(again.listen, c.listen);
        assert!(again.listen[0].opts.keepalive && again.listen[1].opts.reuse_port);
        // A state written before the options: they are all off.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        for l in v["listen"].as_array_mut().unwrap() {
            l.as_object_mut().unwrap().remove("opts");
        }
        let old: ConfigState = serde_json::from_value(v).unwrap();
        assert_eq!(old.listen[0].opts, SockOpts::default());
    }

    #[test]
    fn listening_and_auto_survive_the_round_trip_by_name() {
        for (mode, ready) in [("listening", Ready::Listening), ("auto", Ready::Auto)] {
            let text = format!(
                "[worker]\ncommand = [\"/bin/true\"]\nready = \"{mode}\"\n[[listen]]\nname = \"a\"\ntcp = \"127.0.0.1:1\"\n"
            );
            let c = config::parse(Path::new("/etc/zdd/app.toml"), &text).unwrap();
            assert_eq!(c.worker.ready, ready);
            let v = serde_json::to_value(ConfigState::from(&c)).unwrap();
            assert_eq!(v["worker"]["ready"], mode);
            let back: ConfigState = serde_json::from_value(v).unwrap();
            assert_eq!(back.into_config(), Ok(c));
        }
    }

    #[test]
    fn json_round_trip() {
        let c = every_key();
        let state = ConfigState::from(&c);
        let json = serde_json::to_string(&state).unwrap();
        let back: ConfigState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(back.into_config(), Ok(c));
    }

    /// A state written by a zdd without probes (no `probe` key) still reads: no probe.
    #[test]
    fn a_state_without_probe_reads_as_none() {
        let mut v = serde_json::to_value(ConfigState::from(&every_key())).unwrap();
        assert!(v["worker"]["probe"].is_object());
        v["worker"].as_object_mut().unwrap().remove("probe");
        let back: ConfigState = serde_json::from_value(v).unwrap();
        assert_eq!(back.worker.probe, None);
        assert_eq!(back.into_config().unwrap().worker.probe, None);
    }

    /// A state written by a zdd without hooks (no `hooks` key) still reads: none, the default
    /// timeout.
    #[test]
    fn a_state_without_hooks_reads_as_none() {
        let mut v = serde_json::to_value(ConfigState::from(&every_key())).unwrap();
        assert!(v["hooks"]["before_reload"].is_array());
        v.as_object_mut().unwrap().remove("hooks");
        let back: ConfigState = serde_json::from_value(v).unwrap();
        assert_eq!(back.into_config().unwrap().hooks, HooksConfig::default());
    }

    #[test]
    fn a_tcp_probe_survives_the_round_trip() {
        let text = "[worker]\ncommand = [\"/bin/true\"]\n[worker.probe]\ntcp = true\ninterval = \"2s\"\n";
        let c = config::parse(Path::new("/etc/zdd/app.toml"), text).unwrap();
        let json = serde_json::to_string(&ConfigState::from(&c)).unwrap();
        let back: ConfigState = serde_json::from_str(&json).unwrap();
        assert_eq!(back.into_config(), Ok(c));
    }

    #[test]
    fn json_is_readable() {
        let v = serde_json::to_value(ConfigState::from(&every_key())).unwrap();
        assert_eq!(v["worker"]["stop_signal"], "SIGQUIT");
        assert_eq!(v["worker"]["restart"], "on_failure");
        assert_eq!(v["worker"]["compat"][1], "server_starter");
        assert_eq!(v["worker"]["credentials"]["uid"], 0);
        assert_eq!(v["master"]["log"]["file"], "/var/log/zdd.log");
        assert_eq!(v["master"]["log_format"], "json");
        assert_eq!(v["rlimits"][0]["name"], "core");
        assert_eq!(v["rlimits"][0]["hard"], nix::libc::RLIM_INFINITY);
    }

    /// The reason this module exists: resuming needs no user or group lookup.
    #[test]
    fn a_user_that_no_longer_exists_does_not_fail_the_resume() {
        let mut state = ConfigState::from(&every_key());
        state.worker.credentials = Some(CredentialsState {
            user: Some("deleted-since-start-zdd".into()),
            uid: 4_000_001,
            gid: 4_000_001,
        });
        state.listen[1].owner = Some(4_000_002);
        let c = state.into_config().unwrap();
        let cr = c.worker.credentials.unwrap();
        assert_eq!(cr.user.as_deref(), Some("deleted-since-start-zdd"));
        assert_eq!((cr.uid.as_raw(), cr.gid.as_raw()), (4_000_001, 4_000_001));
        assert_eq!(c.listen[1].owner, Some(Uid::from_raw(4_000_002)));
    }

    #[test]
    fn unknown_names_are_errors_naming_the_field() {
        let mut state = ConfigState::from(&every_key());
        state.worker.stop_signal = "SIGNOPE".into();
        let e = state.into_config().unwrap_err();
        assert!(e.contains("worker.stop_signal") && e.contains("SIGNOPE"), "{e}");

        let mut state = ConfigState::from(&every_key());
        state.rlimits[0].name = "files".into();
        let e = state.into_config().unwrap_err();
        assert!(e.contains("rlimits.files: unknown resource"), "{e}");
    }
}
