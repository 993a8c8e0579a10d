//! What serde reads from the file: the `Raw*` structs, which keep the span of every value that
//! still needs validating, and [`Source`], which turns a span into `file:line:column` for an
//! error. Nothing here judges a value; that is `validate.rs`.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::{cut, ConfigError, MAX_MESSAGE, MAX_SHOWN};

// Raw structs: what serde reads. Values that need validation keep their span.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) master: RawMaster,
    pub(super) worker: Option<Spanned<RawWorker>>,
    #[serde(default)]
    pub(super) rlimits: BTreeMap<String, Spanned<RawLimit>>,
    #[serde(default)]
    pub(super) listen: Vec<Spanned<RawListen>>,
    pub(super) hooks: Option<Spanned<RawHooks>>,
}

/// `[hooks]`: commands run around a reload.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHooks {
    pub(super) before_reload: Option<Spanned<Vec<String>>>,
    pub(super) after_reload: Option<Spanned<Vec<String>>>,
    pub(super) timeout: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMaster {
    pub(super) pid_file: Option<Spanned<String>>,
    pub(super) control_socket: Option<Spanned<String>>,
    pub(super) log: Option<Spanned<String>>,
    pub(super) log_format: Option<Spanned<String>>,
    pub(super) max_draining: Option<Spanned<i64>>,
    pub(super) metrics: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    pub(super) command: Spanned<Vec<String>>,
    pub(super) cwd: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) env: BTreeMap<String, Spanned<String>>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) count: Option<Spanned<i64>>,
    pub(super) ready: Option<Spanned<String>>,
    pub(super) ready_delay: Option<Spanned<String>>,
    pub(super) start_timeout: Option<Spanned<String>>,
    pub(super) stop_signal: Option<Spanned<String>>,
    pub(super) stop_timeout: Option<Spanned<String>>,
    pub(super) restart: Option<Spanned<String>>,
    pub(super) reload: Option<Spanned<String>>,
    pub(super) max_surge: Option<Spanned<i64>>,
    pub(super) stable_after: Option<Spanned<String>>,
    pub(super) watchdog: Option<Spanned<String>>,
    pub(super) max_lifetime: Option<Spanned<String>>,
    pub(super) recycle_jitter: Option<Spanned<String>>,
    pub(super) max_rss: Option<Spanned<String>>,
    pub(super) umask: Option<Spanned<Octal>>,
    #[serde(default)]
    pub(super) compat: Vec<Spanned<String>>,
    pub(super) probe: Option<Spanned<RawProbe>>,
}

/// `[worker.probe]`: the health check of each new worker before the cut-over.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbe {
    pub(super) http: Option<Spanned<String>>,
    pub(super) tcp: Option<Spanned<bool>>,
    pub(super) status: Option<Spanned<RawStatus>>,
    pub(super) host: Option<Spanned<String>>,
    pub(super) timeout: Option<Spanned<String>>,
    pub(super) retries: Option<Spanned<i64>>,
    pub(super) retry_delay: Option<Spanned<String>>,
    pub(super) name: Option<Spanned<String>>,
    pub(super) interval: Option<Spanned<String>>,
    pub(super) failures: Option<Spanned<i64>>,
}

/// An accepted status: `"200-399"`, `"200"` or a TOML integer such as `204`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawStatus {
    Int(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) name: Spanned<String>,
    pub(super) tcp: Option<Spanned<String>>,
    pub(super) udp: Option<Spanned<String>>,
    pub(super) unix: Option<Spanned<String>>,
    pub(super) backlog: Option<Spanned<i64>>,
    pub(super) reuse_port: Option<Spanned<bool>>,
    pub(super) free_bind: Option<Spanned<bool>>,
    pub(super) ipv6_only: Option<Spanned<bool>>,
    pub(super) defer_accept: Option<Spanned<String>>,
    pub(super) keepalive: Option<Spanned<bool>>,
    pub(super) nodelay: Option<Spanned<bool>>,
    pub(super) receive_buffer: Option<Spanned<String>>,
    pub(super) send_buffer: Option<Spanned<String>>,
    pub(super) mode: Option<Spanned<Octal>>,
    pub(super) owner: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
}

/// A file mode or umask: `"0660"` or a TOML integer such as `0o660`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum Octal {
    Text(String),
    Int(i64),
}

/// A limit value: an integer or `"infinity"`/`"unlimited"`.
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum LimitValue {
    Int(i64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawLimit {
    Both(LimitValue),
    Pair(RawLimitPair),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimitPair {
    pub(super) soft: LimitValue,
    pub(super) hard: LimitValue,
}

/// Everything validation needs to place an error in the file.
pub(super) struct Source<'a> {
    pub(super) file: String,
    pub(super) text: &'a str,
}

impl Source<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, col)
    }

    pub(super) fn err(&self, span: Range<usize>, key: &str, msg: impl Into<String>) -> ConfigError {
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

pub(super) fn deserialize<T: serde::de::DeserializeOwned>(src: &Source<'_>) -> Result<T, ConfigError> {
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
pub(super) struct RawMasterOnly {
    #[serde(default)]
    pub(super) master: RawMaster,
}
