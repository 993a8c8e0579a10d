//! State hand-over across the master's re-exec (`zdd upgrade`, SIGUSR2).
//!
//! Theory of operation. exec keeps the pid, so the workers stay the master's children, and it
//! keeps every fd that is not close-on-exec. The master writes what it knows into a memfd as
//! JSON ([`State`]: the config text, generations, every listener with its identity, every
//! worker with its pid, state, deadlines and log pipes, the notify and control sockets, the
//! locked pid file, and the control connection that asked), clears close-on-exec on exactly
//! those fds, blocks all signals (so none arriving during exec can kill a process whose handlers
//! are not installed yet), and execs its own binary — the installed path it was started from,
//! so a new version takes over — with `ZDD_UPGRADE_FD` naming the memfd. The new image reads
//! the state, rebuilds the master around the same fds, installs its handlers and unblocks the
//! signals. If exec fails, the old image restores the flags and the mask and carries on.

use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::libc;
use serde::{Deserialize, Serialize};

use crate::config::ListenAddr;
use crate::errno::describe;

pub const ENV_FD: &str = "ZDD_UPGRADE_FD";

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
    /// `starting`, `ready`, `stopping` or `killed`.
    pub state: String,
    /// Time left until the state's deadline.
    pub remaining_ms: Option<u64>,
    /// Time left until `ready = "delay"` makes it ready.
    pub ready_in_ms: Option<u64>,
    pub uptime_ms: u64,
    pub started_wall_ms: u64,
    pub stop_signal: i32,
    pub stop_timeout_ms: u64,
    /// (stream, fd, incomplete line) of its log pipes still open.
    pub pipes: Vec<(String, RawFd, Vec<u8>)>,
    /// Indexes into [`State::listeners`].
    pub listeners: Vec<usize>,
    pub tail: Vec<String>,
    pub status_text: Option<String>,
    /// Its cgroup (cgroup.rs), if it has one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SlotState {
    pub failures: u32,
    pub restarts: u32,
    pub restart_in_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct State {
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
    pub orphan_pipes: Vec<(i32, u64, String, RawFd)>,
    /// The control connection that asked for the upgrade, answered by the new image.
    pub reply_fd: Option<RawFd>,
    /// The open-file limit the first image was started with (workers get it back).
    #[serde(default)]
    pub worker_nofile: Option<(u64, u64)>,
    /// The workers' cgroup tree (cgroup.rs), if the master has one.
    #[serde(default)]
    pub cgroups: Option<crate::cgroup::HandOver>,
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
    let fds = state.fds(memfd);
    let exe = CString::new(state.exe.as_os_str().as_bytes()).unwrap_or_default();
    let args: Vec<CString> = ["zdd", "start", "--foreground", "-c"]
        .iter()
        .map(|a| CString::new(*a).unwrap_or_default())
        .chain(std::iter::once(
            CString::new(state.config_path.as_os_str().as_bytes()).unwrap_or_default(),
        ))
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != ENV_FD)
        .filter_map(|(k, v)| {
            let mut e = k.as_bytes().to_vec();
            e.push(b'=');
            e.extend_from_slice(v.as_bytes());
            CString::new(e).ok()
        })
        .collect();
    env.push(CString::new(format!("{ENV_FD}={memfd}")).unwrap_or_default());

    // SAFETY: sigset_t values owned by this frame, initialised before use.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    for &fd in &fds {
        set_cloexec(fd, false);
    }
    let err = nix::unistd::execve(&exe, &args, &env).unwrap_err();
    for &fd in &fds {
        set_cloexec(fd, true);
    }
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    drop(file);
    format!("exec {}: {}", state.exe.display(), describe(err))
}

/// In the new image: the state handed over, if this start is an upgrade.
pub fn take_state() -> Option<Result<State, String>> {
    let fd: RawFd = std::env::var(ENV_FD).ok()?.parse().ok()?;
    std::env::remove_var(ENV_FD);
    // SAFETY: the old image passed this memfd to us by number; nothing else owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut text = String::new();
    if let Err(e) = file.read_to_string(&mut text) {
        return Some(Err(format!("reading the upgrade state: {e}")));
    }
    Some(serde_json::from_str(&text).map_err(|e| format!("the upgrade state is unreadable: {e}")))
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
