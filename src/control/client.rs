//! The command side of the control protocol: connect to a running master, send one request,
//! print its progress, return its result.
//!
//! "Not running" is decided carefully, because scripts act on exit code 3: no control socket,
//! or nobody answering on it, with a pid file that is missing or names a dead process.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::config::MasterConfig;
use crate::control::{Reply, Request};
use crate::errno::describe_io;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    NotRunning(String),
    #[error("{0}")]
    Failed(String),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotRunning(_) => 3,
            ClientError::Failed(_) | ClientError::Timeout(_) => 1,
        }
    }
}

/// The final answer of the master.
pub struct Outcome {
    pub ok: bool,
    pub message: String,
    pub data: Value,
    /// The connection, for callers that wait for EOF (stop).
    pub reader: BufReader<UnixStream>,
}

/// Whether `pid` is a running process: it exists, and is not a zombie waiting for its parent
/// (`kill(pid, 0)` succeeds on a zombie, which holds no socket and serves nothing).
fn pid_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() && !is_zombie(pid)
}

/// Explain why the control socket does not answer.
fn not_running(master: &MasterConfig, err: &std::io::Error) -> ClientError {
    let sock = master.control_socket.display();
    let pid = std::fs::read_to_string(&master.pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok());
    match pid {
        Some(pid) if pid_alive(pid) => ClientError::Failed(format!(
            "master pid {pid} (from {}) is running but its control socket {sock} does not answer: {}",
            master.pid_file.display(),
            describe_io(err)
        )),
        Some(pid) => ClientError::NotRunning(format!(
            "master not running (stale pid file {} names pid {pid}, which is gone)",
            master.pid_file.display()
        )),
        None => ClientError::NotRunning(format!("master not running (no control socket at {sock})")),
    }
}

/// Connect, send `req`, hand each progress line to `on_progress`, return the result.
pub fn call(
    master: &MasterConfig,
    req: &Request,
    timeout: Option<Duration>,
    mut on_progress: impl FnMut(&str),
) -> Result<Outcome, ClientError> {
    let sock = &master.control_socket;
    let mut stream = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            return Err(not_running(master, &e))
        }
        Err(e) => {
            return Err(ClientError::Failed(format!(
                "cannot connect to control socket {}: {} (it accepts only root and the master's user)",
                sock.display(),
                describe_io(&e)
            )))
        }
    };
    let deadline = timeout.map(crate::clock::from_now);
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Failed(e.to_string()))?;
    line.push(b'\n');
    // A master that refuses us answers and hangs up at once: read its answer even if our
    // write failed.
    let sent = stream.write_all(&line);
    let mut reader = BufReader::new(stream);
    loop {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(timeout.unwrap_or_default()));
            }
            let _ = reader.get_ref().set_read_timeout(Some(left));
        }
        let mut text = String::new();
        match reader.read_line(&mut text) {
            Ok(0) => {
                return Err(ClientError::Failed(match &sent {
                    Err(e) => format!("sending the request: {}", describe_io(e)),
                    Ok(()) => "the master closed the connection without an answer".into(),
                }))
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(ClientError::Failed(format!("reading the answer: {}", describe_io(&e)))),
        }
        match serde_json::from_str::<Reply>(&text) {
            Ok(Reply::Progress { message }) => on_progress(&message),
            Ok(Reply::Result { ok, message, data }) => {
                // The master hangs up right after its result (except for stop, whose caller
                // waits for that itself): return only once it has, so that when a command
                // returns the master holds no connection of ours.
                if !matches!(req, Request::Stop {}) {
                    let grace = crate::clock::from_now(HANGUP_GRACE);
                    read_to_eof(&mut reader, Some(deadline.map_or(grace, |d| d.min(grace))));
                }
                return Ok(Outcome {
                    ok,
                    message,
                    data,
                    reader,
                });
            }
            Err(e) => return Err(ClientError::Failed(format!("unintelligible answer {text:?}: {e}"))),
        }
    }
}

/// How long a command waits for the master to hang up after its result.
const HANGUP_GRACE: Duration = Duration::from_secs(5);

/// Read and discard until EOF; false if `deadline` passed first.
fn read_to_eof(reader: &mut BufReader<UnixStream>, deadline: Option<Instant>) -> bool {
    let mut sink = String::new();
    loop {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = reader.get_ref().set_read_timeout(Some(left));
        }
        sink.clear();
        match reader.read_line(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return true,
        }
    }
}

/// After `stop` was acknowledged: wait for EOF (the master's exit closes the connection) and
/// for the pid to be gone.
pub fn wait_gone(mut reader: BufReader<UnixStream>, pid: i32, deadline: Option<Instant>) -> Result<(), ClientError> {
    if !read_to_eof(&mut reader, deadline) {
        return Err(ClientError::Failed(format!(
            "master pid {pid} still running at the timeout"
        )));
    }
    let mut pause = Duration::from_millis(1);
    while pid_alive(pid) {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(ClientError::Failed(format!(
                "master pid {pid} still running at the timeout"
            )));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether `pid` is a zombie (or gone): the state field of /proc/PID/stat, which follows the
/// command name in parentheses (a name that may itself hold ')' and spaces).
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| stat_is_zombie(&s))
}

fn stat_is_zombie(stat: &str) -> bool {
    match stat.rfind(')') {
        Some(i) => matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X' | 'x')),
        None => false,
    }
}

/// A byte count as `12.3 MiB` (`-` when unknown).
fn mib(v: &Value) -> String {
    match v.as_u64() {
        Some(b) if b > 0 => format!("{:.1} MiB", b as f64 / f64::from(1u32 << 20)),
        _ => "-".into(),
    }
}

/// Human-readable `zdd status`.
pub fn format_status(s: &Value) -> String {
    let mut out = String::new();
    let secs = |v: &Value| humantime::format_duration(Duration::from_secs(v.as_u64().unwrap_or(0))).to_string();
    out.push_str(&format!(
        "master   pid {}  {}  up {}  generation {}{}\nconfig   {}\n",
        s["pid"],
        s["phase"].as_str().unwrap_or("?"),
        secs(&s["uptime_secs"]),
        s["generation"],
        match s["reloading"].as_u64() {
            Some(g) => format!("  (reloading to generation {g})"),
            None => String::new(),
        },
        s["config"].as_str().unwrap_or("?"),
    ));
    if let Some(u) = s["unstable"].as_str() {
        out.push_str(&format!("UNSTABLE {u}\n"));
    }
    if let Some(path) = s["log_file"].as_str() {
        out.push_str(&format!("log file {path}\n"));
    }
    // The log, only when there is something to say: lines lost, a write failing, bytes waiting.
    let log = &s["log"];
    let mut said = Vec::new();
    if let Some(n) = log["dropped_lines"].as_u64().filter(|&n| n > 0) {
        said.push(format!("{n} line{} lost", if n == 1 { "" } else { "s" }));
    }
    if let Some(e) = log["error"].as_str() {
        said.push(format!("writing fails: {e}"));
    }
    if let Some(n) = log["pending_bytes"].as_u64().filter(|&n| n > 0) {
        let paused = if log["relay_paused"] == true {
            " (workers' output waits)"
        } else {
            ""
        };
        said.push(format!("{n} bytes waiting to be written{paused}"));
    }
    if !said.is_empty() {
        out.push_str(&format!("log      {}\n", said.join("; ")));
    }
    for l in s["listeners"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "listen   {:<12} {}\n",
            l["name"].as_str().unwrap_or("?"),
            l["address"].as_str().unwrap_or("?")
        ));
    }
    out.push_str("workers  PID      GEN  SLOT  STATE     UPTIME       RSS        RESTARTS\n");
    for w in s["workers"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "         {:<8} {:<4} {:<5} {:<9} {:<12} {:<10} {}\n",
            w["pid"].to_string(),
            w["generation"].to_string(),
            w["slot"].to_string(),
            w["state"].as_str().unwrap_or("?"),
            secs(&w["uptime_secs"]),
            mib(&w["rss_bytes"]),
            w["restarts"]
        ));
    }
    for r in s["restarting"].as_array().into_iter().flatten() {
        let secs = r["in_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
        out.push_str(&format!(
            "         {:<8} {:<4} {:<5} restarting in {secs:.1} s{}  {}\n",
            "-",
            r["generation"].to_string(),
            r["slot"].to_string(),
            match r["last_exit"].as_str() {
                Some(why) => format!(" (last: {why})"),
                None => String::new(),
            },
            r["restarts"]
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zombie_state_is_read_after_the_command_name() {
        assert!(stat_is_zombie("42 (zdd) Z 1 42 42 0 -1"));
        assert!(!stat_is_zombie("42 (zdd) S 1 42 42 0 -1"));
        // A command name may hold spaces and parentheses: the state follows the last ')'.
        assert!(stat_is_zombie("42 (a) S (b)) Z 1 42"));
        assert!(!stat_is_zombie("42 (Z) R 1 42"));
        assert!(!stat_is_zombie("garbage"));
    }

    #[test]
    fn odd_pids_are_not_alive() {
        assert!(!pid_alive(0));
        assert!(!pid_alive(-1));
        assert!(pid_alive(std::process::id() as i32));
    }
}
