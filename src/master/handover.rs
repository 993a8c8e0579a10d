//! State hand-over across the master's re-exec (`zdd upgrade`, SIGUSR2), and its safety net.
//!
//! Theory of operation. exec keeps the pid, so the workers stay the master's children, and it
//! keeps every fd that is not close-on-exec. The master writes what it knows into a memfd as
//! JSON ([`State`], versioned: [`STATE_VERSION`]): the running config (as data, not re-read
//! from the file), generations, every listener with its identity, every worker with its pid,
//! state, deadlines and log pipes, the notify and control sockets with the paths they are
//! bound at, the locked pid file, the log file, and the control connection that asked. It
//! clears close-on-exec on exactly those fds, blocks the signals it handles (one arriving
//! during exec stays pending instead of killing a process whose handlers are not installed
//! yet), and execs its own binary — the installed path it was started from, so that a new
//! version takes over — with `ZDD_UPGRADE_FD` naming the memfd.
//!
//! An upgrade must never take the service down, so three things guard it:
//! 1. Before the exec, the master runs the new binary as a child: `zdd upgrade-check
//!    --state-version N` must answer within [`CHECK_TIMEOUT`] that it reads this hand-over
//!    version. A binary that fails, hangs, is not zdd or is too old is refused, and the master
//!    carries on (the check runs asynchronously in the loop: the master keeps serving).
//! 2. The old image keeps an fd of its own executable across the exec (`ZDD_UPGRADE_EXE_FD`).
//!    If the new image fails anywhere before it is in charge (the state unreadable, the
//!    resume failing), it re-executes the old image with `fexecve` and the same state, adding
//!    `ZDD_UPGRADE_ROLLED_BACK=<reason>`; the old image resumes and answers the caller
//!    `upgrade failed: <reason>; rolled back to zdd X`. Everything fallible in the resume comes
//!    before any handed-over fd is taken over, so a rollback finds them all still open.
//! 3. If exec itself fails, the old image restores the flags and the mask and carries on.

use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::libc;
use serde::{Deserialize, Serialize};

use crate::config::ListenAddr;
use crate::errno::describe;
use crate::worker::relay::Stream;

pub const ENV_FD: &str = "ZDD_UPGRADE_FD";
/// The old image's executable, kept open across the exec for a rollback.
pub const ENV_EXE_FD: &str = "ZDD_UPGRADE_EXE_FD";
/// Set by a new image that failed, for the old one it rolls back to: why.
pub const ENV_ROLLED_BACK: &str = "ZDD_UPGRADE_ROLLED_BACK";

/// The hand-over format this binary writes. Version 1 (zdd 0.1.0) had no `version` field;
/// version 3 added the `probing` worker state, the config's `reload`, `max_surge`,
/// `stable_after` and `[worker.probe]` (read from older versions as their defaults), and the
/// watch after a cut-over (`watch`, `unstable`).
pub const STATE_VERSION: u32 = 3;
/// The oldest hand-over format this binary reads.
pub const OLDEST_STATE_VERSION: u32 = 1;
/// How long `zdd upgrade-check` of the new binary may take.
pub const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn version_1() -> u32 {
    1
}

/// A worker's state as handed over (the same words version 1 used as strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerPhase {
    Starting,
    /// Since version 3: ready by its own account, its probe running (restarted after resume).
    Probing,
    Ready,
    Stopping,
    Killed,
}

pub use crate::log::LogState;

#[derive(Debug, Serialize, Deserialize)]
pub struct ListenerState {
    pub fd: RawFd,
    pub addr: ListenAddr,
    pub created: Option<(PathBuf, u64, u64)>,
    pub backlog: i32,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerState {
    pub pid: i32,
    pub generation: u64,
    pub slot: usize,
    pub state: WorkerPhase,
    /// Time left until the state's deadline.
    pub remaining_ms: Option<u64>,
    /// Time left until `ready = "delay"` makes it ready.
    pub ready_in_ms: Option<u64>,
    pub uptime_ms: u64,
    pub started_wall_ms: u64,
    pub stop_signal: i32,
    pub stop_timeout_ms: u64,
    /// (stream, fd, incomplete line) of its log pipes still open.
    pub pipes: Vec<(Stream, RawFd, Vec<u8>)>,
    /// Indexes into [`State::listeners`].
    pub listeners: Vec<usize>,
    pub tail: Vec<String>,
    pub status_text: Option<String>,
    /// Its cgroup (cgroup.rs), if it has one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Its private probe listener (`[worker.probe]`): an index into [`State::listeners`].
    #[serde(default)]
    pub probe: Option<usize>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SlotState {
    pub failures: u32,
    pub restarts: u32,
    pub restart_in_ms: Option<u64>,
    /// Version 3.
    #[serde(default)]
    pub last_exit: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    #[serde(default = "version_1")]
    pub version: u32,
    pub from_version: String,
    pub exe: PathBuf,
    pub config_path: PathBuf,
    pub config_text: String,
    pub generation: u64,
    pub next_generation: u64,
    pub attempt: u64,
    pub uptime_ms: u64,
    pub started_wall_ms: u64,
    pub notify_fd: RawFd,
    pub control_fd: RawFd,
    pub pid_file: (RawFd, PathBuf, u64),
    pub listeners: Vec<ListenerState>,
    /// Indexes into `listeners` of the current set, in config order.
    pub current: Vec<usize>,
    pub workers: Vec<WorkerState>,
    pub slots: Vec<SlotState>,
    /// Log pipes of reaped workers that are still open: (pid, generation, stream, fd).
    pub orphan_pipes: Vec<(i32, u64, Stream, RawFd)>,
    /// The incomplete last line of each of `orphan_pipes`, in the same order (version 2).
    #[serde(default)]
    pub orphan_partials: Vec<Vec<u8>>,
    /// The control connection that asked for the upgrade, answered by the new image.
    pub reply_fd: Option<RawFd>,
    /// Other control connections waiting for the same upgrade (version 2).
    #[serde(default)]
    pub more_reply_fds: Vec<RawFd>,
    /// The open-file limit the first image was started with (workers get it back).
    #[serde(default)]
    pub worker_nofile: Option<(u64, u64)>,
    /// The workers' cgroup tree (cgroup.rs), if the master has one.
    #[serde(default)]
    pub cgroups: Option<crate::worker::cgroup::HandOver>,
    /// The running config, as data (version 2). Version 1 states carry only the text.
    #[serde(default)]
    pub config: Option<crate::config::state::ConfigState>,
    /// Where the notify and control sockets are bound (version 2): the running paths, which
    /// a reload that changed `[master]` does not move.
    #[serde(default)]
    pub notify_path: Option<PathBuf>,
    #[serde(default)]
    pub control_path: Option<PathBuf>,
    #[serde(default)]
    pub log: Option<LogState>,
    /// The watch after the last cut-over, if still on: (generation, ms left) (version 3).
    #[serde(default)]
    pub watch: Option<(u64, u64)>,
    /// Why the serving generation is unstable, if it is (version 3): its old generations'
    /// kills stay held by the new image.
    #[serde(default)]
    pub unstable: Option<String>,
    /// The `[master] metrics` listener, if the master serves metrics.
    #[serde(default)]
    pub metrics: Option<ListenerState>,
    /// The machine's counters (metrics, `status`), and how long the serving generation has
    /// served, in ms.
    #[serde(default)]
    pub stats: Option<super::generations::Stats>,
    #[serde(default)]
    pub serving_ms: Option<u64>,
}

impl State {
    /// Every fd the new image must receive.
    pub fn fds(&self, memfd: RawFd) -> Vec<RawFd> {
        let mut v = vec![memfd, self.notify_fd, self.control_fd, self.pid_file.0];
        v.extend(self.listeners.iter().map(|l| l.fd));
        for w in &self.workers {
            v.extend(w.pipes.iter().map(|(_, fd, _)| *fd));
        }
        v.extend(self.orphan_pipes.iter().map(|p| p.3));
        v.extend(self.reply_fd);
        v.extend(self.more_reply_fds.iter().copied());
        v.extend(self.log.as_ref().and_then(|l| l.fd));
        v.extend(self.metrics.as_ref().map(|l| l.fd));
        v
    }
}

fn set_cloexec(fd: RawFd, on: bool) {
    // SAFETY: fcntl on an fd number; failures are harmless here (the fd simply stays as is).
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            let new = if on {
                flags | libc::FD_CLOEXEC
            } else {
                flags & !libc::FD_CLOEXEC
            };
            libc::fcntl(fd, libc::F_SETFD, new);
        }
    }
}

fn env_entry(k: &[u8], v: &[u8]) -> Option<CString> {
    let mut e = k.to_vec();
    e.push(b'=');
    e.extend_from_slice(v);
    CString::new(e).ok()
}

/// This process's environment without the hand-over variables, plus `extra`.
fn environment(extra: &[(&str, String)]) -> Vec<CString> {
    let ours = [ENV_FD, ENV_EXE_FD, ENV_ROLLED_BACK];
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !ours.iter().any(|o| k == o))
        .filter_map(|(k, v)| env_entry(k.as_bytes(), v.as_bytes()))
        .collect();
    env.extend(extra.iter().filter_map(|(k, v)| env_entry(k.as_bytes(), v.as_bytes())));
    env
}

fn cstring(b: &[u8]) -> CString {
    CString::new(b.iter().copied().filter(|&c| c != 0).collect::<Vec<u8>>()).unwrap_or_default()
}

/// Block the signals the master handles ([`super::signals::HANDLED`]) across the exec, so that
/// one arriving before the new image has installed its handlers stays pending (and is acted on
/// then) instead of killing the master; everything else keeps its normal effect. Returns the
/// mask to restore.
fn block_handled() -> libc::sigset_t {
    // SAFETY: sigset_t values owned by this frame, initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in super::signals::HANDLED {
            libc::sigaddset(&mut set, s as libc::c_int);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

fn restore_mask(old: &libc::sigset_t) {
    // SAFETY: restores a mask saved by block_handled.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut());
    }
}

/// Exec `state.exe` with the state. Returns only if exec failed, with the reason; the caller's
/// fds and signal mask are as they were.
pub fn exec(state: &State) -> String {
    let json = match serde_json::to_vec(state) {
        Ok(j) => j,
        Err(e) => return format!("serializing the master's state: {e}"),
    };
    // SAFETY: memfd_create with a NUL-terminated name; the fd is ours.
    let memfd = unsafe { libc::memfd_create(c"zdd-upgrade".as_ptr(), libc::MFD_CLOEXEC) };
    if memfd < 0 {
        return format!("memfd_create: {}", describe(Errno::last()));
    }
    // SAFETY: just created, owned here.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(memfd) });
    if let Err(e) = file
        .write_all(&json)
        .and_then(|_| file.seek(SeekFrom::Start(0)).map(|_| ()))
    {
        return format!("writing the master's state: {e}");
    }
    // The running executable, for a rollback should the new image fail.
    let own = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/proc/self/exe")
    {
        Ok(f) => f,
        Err(e) => {
            return format!(
                "open /proc/self/exe (kept for a rollback): {}",
                crate::errno::describe_io(&e)
            )
        }
    };
    let own_fd = own.as_raw_fd();
    let mut fds = state.fds(memfd);
    fds.push(own_fd);
    let exe = cstring(state.exe.as_os_str().as_bytes());
    let args: Vec<CString> = ["zdd", "start", "--foreground", "-c"]
        .iter()
        .map(|a| cstring(a.as_bytes()))
        .chain(std::iter::once(cstring(state.config_path.as_os_str().as_bytes())))
        .collect();
    let env = environment(&[(ENV_FD, memfd.to_string()), (ENV_EXE_FD, own_fd.to_string())]);
    let old = block_handled();
    for &fd in &fds {
        set_cloexec(fd, false);
    }
    let err = match nix::unistd::execve(&exe, &args, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    for &fd in &fds {
        set_cloexec(fd, true);
    }
    restore_mask(&old);
    drop(file);
    drop(own);
    format!("exec {}: {}", state.exe.display(), describe(err))
}

/// What the new image was handed: the state, and what a rollback needs.
pub struct Taken {
    pub state: State,
    /// Set when this image is the old one, back after a failed upgrade: why it failed.
    pub rolled_back: Option<String>,
    pub rollback: Rollback,
}

/// What re-executing the old image needs: the state memfd and the old executable (kept open,
/// not close-on-exec, until the new image is in charge).
pub struct Rollback {
    memfd: RawFd,
    exe_fd: Option<RawFd>,
}

impl Rollback {
    /// Whether there is an old image to go back to (not after a rollback already).
    pub fn possible(&self) -> bool {
        self.exe_fd.is_some()
    }

    /// Re-execute the old image with the state, telling it why. Returns only if that failed.
    /// `fds`: every fd the state names, made inheritable again in case one was taken over.
    pub fn roll_back(&self, reason: &str, fds: &[RawFd]) -> String {
        let Some(exe_fd) = self.exe_fd else {
            return "no old image to roll back to".into();
        };
        // SAFETY: lseek on the memfd this image was handed; it stays open.
        unsafe { libc::lseek(self.memfd, 0, libc::SEEK_SET) };
        let args: Vec<CString> = std::env::args_os().map(|a| cstring(a.as_bytes())).collect();
        let env = environment(&[
            (ENV_FD, self.memfd.to_string()),
            (ENV_ROLLED_BACK, reason.replace('\n', " ")),
        ]);
        for &fd in fds.iter().chain(std::iter::once(&self.memfd)) {
            set_cloexec(fd, false);
        }
        let _ = block_handled();
        // SAFETY: exe_fd was opened by the old image on its own executable and handed over.
        let exe = unsafe { std::os::fd::BorrowedFd::borrow_raw(exe_fd) };
        match nix::unistd::fexecve(exe.as_raw_fd(), &args, &env) {
            Err(e) => format!("fexecve of the old image: {}", describe(e)),
            Ok(never) => match never {},
        }
    }

    /// The new image is in charge: close what was kept for a rollback.
    pub fn done(self) {
        for fd in std::iter::once(self.memfd).chain(self.exe_fd) {
            // SAFETY: these two fds were handed over for the rollback only; nothing else
            // owns them.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// In the new image: the state handed over, if this start is an upgrade. On error, the
/// reason and what a rollback needs.
pub fn take_state() -> Option<Result<Taken, (String, Rollback)>> {
    let memfd: RawFd = std::env::var(ENV_FD).ok()?.parse().ok()?;
    let exe_fd: Option<RawFd> = std::env::var(ENV_EXE_FD).ok().and_then(|v| v.parse().ok());
    let rolled_back = std::env::var(ENV_ROLLED_BACK).ok();
    // Workers must not inherit them.
    std::env::remove_var(ENV_FD);
    std::env::remove_var(ENV_EXE_FD);
    std::env::remove_var(ENV_ROLLED_BACK);
    for fd in std::iter::once(memfd).chain(exe_fd) {
        set_cloexec(fd, true);
    }
    let rollback = Rollback {
        memfd,
        // After a rollback there is nowhere further back to go.
        exe_fd: if rolled_back.is_some() { None } else { exe_fd },
    };
    // Read through a duplicate, so that the memfd itself stays open for a rollback.
    let text = nix::unistd::dup(memfd)
        .map_err(|e| format!("reading the upgrade state: dup: {}", describe(e)))
        .and_then(|fd| {
            // SAFETY: a fresh duplicate, owned here.
            let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let mut text = String::new();
            file.seek(SeekFrom::Start(0))
                .and_then(|_| file.read_to_string(&mut text))
                .map_err(|e| format!("reading the upgrade state: {e}"))?;
            Ok(text)
        });
    let parsed = text.and_then(|t| parse_state(&t));
    Some(match parsed {
        Ok(state) => Ok(Taken {
            state,
            rolled_back,
            rollback,
        }),
        Err(e) => Err((e, rollback)),
    })
}

/// Read a hand-over state, refusing versions this binary does not know.
pub fn parse_state(text: &str) -> Result<State, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the upgrade state is unreadable: {e}"))?;
    let version = value.get("version").map_or(Some(1), |v| v.as_u64());
    match version {
        Some(v) if (u64::from(OLDEST_STATE_VERSION)..=u64::from(STATE_VERSION)).contains(&v) => {}
        other => {
            return Err(format!(
                "the upgrade state has version {}; zdd {} reads versions {OLDEST_STATE_VERSION} to {STATE_VERSION}",
                other.map_or("(not a number)".to_string(), |v| v.to_string()),
                env!("CARGO_PKG_VERSION")
            ))
        }
    }
    serde_json::from_value(value).map_err(|e| format!("the upgrade state is unreadable: {e}"))
}

/// `zdd upgrade-check --state-version N`: what the old master asks the new binary before it
/// execs it. Ok with the line to print, or why not.
pub fn check(state_version: u32) -> Result<String, String> {
    if (OLDEST_STATE_VERSION..=STATE_VERSION).contains(&state_version) {
        Ok(format!(
            "zdd {} reads upgrade states {OLDEST_STATE_VERSION} to {STATE_VERSION}",
            env!("CARGO_PKG_VERSION")
        ))
    } else {
        Err(format!(
            "zdd {} cannot read upgrade state version {state_version} (it reads {OLDEST_STATE_VERSION} to {STATE_VERSION})",
            env!("CARGO_PKG_VERSION")
        ))
    }
}

/// Take ownership of an fd number handed over by the old image, close-on-exec again.
pub fn own(fd: RawFd) -> OwnedFd {
    set_cloexec(fd, true);
    // SAFETY: handed over by the old image, which no longer exists; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The path to exec on upgrade: the binary this master was started from, by its path, so that
/// an installed new version takes over.
pub fn own_exe() -> PathBuf {
    std::env::current_exe()
        .map(|p| {
            // After the file was replaced, /proc/self/exe reads "… (deleted)": the path is
            // still where the new version is.
            let s = p.as_os_str().as_bytes();
            match s.strip_suffix(b" (deleted)") {
                Some(stripped) => PathBuf::from(std::ffi::OsStr::from_bytes(stripped)),
                None => p,
            }
        })
        .unwrap_or_else(|_| Path::new("/proc/self/exe").to_path_buf())
}
