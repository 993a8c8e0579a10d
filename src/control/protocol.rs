//! The control protocol's codec: requests and replies as JSON lines (see [`super`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Time a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Reload {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_generation: Option<u64>,
    },
    // Struct variants (not unit ones), so that unknown fields are rejected for them too.
    Stop {},
    Status {},
    ReopenLogs {},
    Upgrade {},
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply {
    Progress {
        message: String,
    },
    Result {
        ok: bool,
        message: String,
        #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
        data: serde_json::Value,
    },
}

impl Reply {
    pub fn progress(message: impl Into<String>) -> Reply {
        Reply::Progress {
            message: message.into(),
        }
    }

    pub fn ok(message: impl Into<String>, data: serde_json::Value) -> Reply {
        Reply::Result {
            ok: true,
            message: message.into(),
            data,
        }
    }

    pub fn err(message: impl Into<String>, data: serde_json::Value) -> Reply {
        Reply::Result {
            ok: false,
            message: message.into(),
            data,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        v.push(b'\n');
        v
    }
}

/// Decode one request line (without its newline).
pub fn decode_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice(line).map_err(|e| format!("malformed request: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        for r in [
            Request::Reload { if_generation: None },
            Request::Reload { if_generation: Some(4) },
            Request::Stop {},
            Request::Status {},
            Request::ReopenLogs {},
        ] {
            let line = serde_json::to_vec(&r).unwrap();
            assert_eq!(decode_request(&line).unwrap(), r);
        }
        assert_eq!(
            decode_request(br#"{"cmd":"reload"}"#).unwrap(),
            Request::Reload { if_generation: None }
        );
        assert_eq!(
            decode_request(br#"{"cmd":"reopen-logs"}"#).unwrap(),
            Request::ReopenLogs {}
        );
    }

    #[test]
    fn bad_requests_are_errors() {
        for bad in [
            &b"garbage"[..],
            b"{}",
            br#"{"cmd":"explode"}"#,
            br#"{"cmd":"stop","x":1}"#,
            b"\xff\xfe",
        ] {
            assert!(
                decode_request(bad).unwrap_err().starts_with("malformed request"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn replies_encode_as_one_line() {
        let r = Reply::ok("done", serde_json::json!({"generation": 2}));
        let e = r.encode();
        assert_eq!(e.last(), Some(&b'\n'));
        assert_eq!(e.iter().filter(|&&b| b == b'\n').count(), 1);
        let back: Reply = serde_json::from_slice(&e).unwrap();
        assert_eq!(back, r);
        let p: Reply = serde_json::from_slice(&Reply::progress("x\ny").encode()).unwrap();
        assert_eq!(p, Reply::progress("x\ny"));
    }
}
