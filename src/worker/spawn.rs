//! Starting a worker: fork and exec with exactly the environment of spec §3.
//!
//! Theory of operation. Everything that allocates happens in the master before `fork`: the
//! program path (resolved against PATH), argv, the environment (including a fixed-size
//! `LISTEN_PID=` slot), the supplementary group list. Between fork and exec the child makes
//! only async-signal-safe system calls, in this order:
//!
//! 1. reset every signal disposition to the default, then unblock all signals (the master
//!    blocks them around fork so that no handler of the master runs in the child);
//! 2. `setpgid(0, 0)`: its own process group, so stop and kill reach its children too; then
//!    it joins its cgroup (writes "0" into the worker cgroup's `cgroup.procs`, opened by the
//!    master before fork), so that every descendant is contained, even one that leaves the
//!    process group (see `cgroup.rs`);
//! 3. lay out the fds: every source (stdin, the two log pipes, the listeners) is `dup2`ed into
//!    place (which clears close-on-exec on the copy) in target order, after moving above the
//!    target range 0..3+n the few sources a previous `dup2` could clobber (those below their
//!    target) and the error pipe; a source already at its target only has close-on-exec
//!    cleared. Then everything from 3+n up is marked close-on-exec;
//! 4. write its own pid into `LISTEN_PID`;
//! 5. drop privileges: setgroups, setgid, setuid — then PR_SET_PDEATHSIG (a credential change
//!    clears it), and a check that the master did not die meanwhile;
//! 6. rlimits, umask, cwd, and exec.
//!
//! With `[worker.probe]`, the caller adds the worker's private probe listener (127.0.0.1, a
//! port of its own, `Listener::bind_probe`) as the last entry of `listeners` and its `name` as
//! the last of `names`: it becomes the fd after every `[[listen]]` fd, counted in `LISTEN_FDS`
//! and named in `LISTEN_FDNAMES` (fd 3 stays the first `[[listen]]`). The compat variables
//! describe the same fds: `EINHORN_FD_COUNT` counts it and `EINHORN_FD_<n>` names it, and
//! `SERVER_STARTER_PORT` ends with `127.0.0.1:<port>=<fd>`, so that a server written for
//! einhorn or Server::Starter that serves every socket it is given answers the probe too.
//!
//! A reload hook (`[hooks]`, src/master/hooks.rs) is started the same way ([`HookRun`]): the
//! hook's argv instead of the worker's command, no listeners, and an environment without
//! `LISTEN_*`, `NOTIFY_SOCKET`, `ZDD_SLOT` and the compat variables, with `ZDD_HOOK` instead.
//!
//! A step that fails writes (step, errno) to a close-on-exec pipe and exits 127; the master
//! reads that pipe until EOF (exec closes it), so exec errors are reported precisely and
//! synchronously: `exec /no/such/server: no such file or directory (ENOENT)`. That read is
//! bounded by [`EXEC_TIMEOUT`]: a child stuck before exec (a `cwd` on a hung NFS mount, a
//! frozen cgroup) is killed and reported, and the master's loop goes on.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::libc::{self, c_char, c_int};
use nix::unistd::{pipe2, Pid};

use crate::config::{Compat, ListenAddr, WorkerConfig};
use crate::errno::describe;
use crate::listen::Listener;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("worker command {0:?}: not found in PATH")]
    NotFound(String),
    #[error("{op}: {}", describe(*errno))]
    Master { op: &'static str, errno: Errno },
    #[error(
        "worker.user/worker.group: running workers as {user} needs a master running as root (it runs as uid {uid})"
    )]
    NeedsRoot { user: String, uid: u32 },
    #[error("open {path}/cgroup.procs: {}", describe(*errno))]
    Cgroup { path: String, errno: Errno },
    #[error("worker pid {pid} did not reach exec within {}s (killed)", EXEC_TIMEOUT.as_secs())]
    ExecTimeout { pid: i32 },
    #[error("{step} {object}: {}", describe(*errno))]
    Child {
        step: &'static str,
        object: String,
        errno: Errno,
    },
}

/// The ends of a started worker the master keeps.
pub struct Spawned {
    pub pid: Pid,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

/// What a worker of one generation needs, computed once per spawn in the master.
pub struct SpawnSpec<'a> {
    pub worker: &'a WorkerConfig,
    pub names: Vec<&'a str>,
    pub listeners: &'a [std::rc::Rc<Listener>],
    pub notify_socket: &'a Path,
    pub generation: u64,
    /// The worker's position in its generation (0..count), exported as `ZDD_SLOT`.
    pub slot: usize,
    pub rlimits: &'a [crate::config::Rlimit],
    /// The cgroup the child joins before exec, if the master has one for it.
    pub cgroup: Option<&'a crate::worker::cgroup::WorkerCgroup>,
    /// Not a worker but a reload hook (`[hooks]`): this command instead of the worker's,
    /// `ZDD_HOOK=<name>`, and none of `LISTEN_*`, `NOTIFY_SOCKET`, `ZDD_SLOT` or the compat
    /// variables (pass no listeners). Everything else is the worker's: user, group, env, cwd,
    /// rlimits, umask, its own process group, stdin /dev/null, stdout and stderr pipes.
    pub hook: Option<HookRun<'a>>,
}

/// What makes a spawn a hook's (see [`SpawnSpec::hook`]).
#[derive(Clone, Copy)]
pub struct HookRun<'a> {
    /// `before_reload` or `after_reload`, exported as `ZDD_HOOK`.
    pub name: &'a str,
    pub command: &'a [String],
}

/// How long the master waits for a forked child to reach exec (or report its failure).
pub const EXEC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

// Steps reported through the error pipe.
const STEP_PGID: u8 = 1;
const STEP_FDS: u8 = 2;
const STEP_GROUPS: u8 = 3;
const STEP_SETGID: u8 = 4;
const STEP_SETUID: u8 = 5;
const STEP_PDEATHSIG: u8 = 6;
/// `STEP_RLIMIT + i` for the i-th configured limit.
const STEP_RLIMIT: u8 = 32;
const STEP_CHDIR: u8 = 8;
const STEP_EXEC: u8 = 9;
const STEP_CGROUP: u8 = 10;

/// Variables a worker never inherits from the master's own environment.
fn inherited_is_removed(key: &OsStr) -> bool {
    let k = key.as_bytes();
    // zdd's own, when the master itself runs under a zdd: the worker gets this master's.
    k.starts_with(b"LISTEN_")
        || k == b"NOTIFY_SOCKET"
        || k.starts_with(b"WATCHDOG_")
        || k == b"ZDD_GENERATION"
        || k == b"ZDD_SLOT"
        || k == b"ZDD_HOOK"
}

/// Resolve the program like execvp would, but in the master, before fork.
/// The same lookup as config validation's, so that `check` finds what `start` runs.
fn resolve_program(program: &str, path_var: Option<&OsStr>) -> Result<PathBuf, SpawnError> {
    crate::config::find_program(program, path_var).ok_or_else(|| SpawnError::NotFound(program.to_string()))
}

fn cstring(b: &[u8]) -> CString {
    // Config validation rejects NUL bytes; the environment cannot contain them.
    CString::new(b).unwrap_or_default()
}

/// Build the worker's environment: the master's, minus the variables of `inherited_is_removed`,
/// plus the configured ones, plus zdd's own. Returns the entries and the index of the
/// `LISTEN_PID=` slot, whose digits the child fills in.
/// The environment, and where the child writes its own pid: (index, length of the `NAME=`
/// prefix) of `LISTEN_PID=` and `WATCHDOG_PID=`, each followed by room for the digits.
fn build_env(spec: &SpawnSpec<'_>) -> (Vec<Vec<u8>>, Vec<(usize, usize)>) {
    let mut env: Vec<Vec<u8>> = Vec::new();
    let configured: Vec<&str> = spec.worker.env.iter().map(|(k, _)| k.as_str()).collect();
    for (k, v) in std::env::vars_os() {
        if inherited_is_removed(&k) || configured.iter().any(|c| c.as_bytes() == k.as_bytes()) {
            continue;
        }
        let mut e = k.as_bytes().to_vec();
        e.push(b'=');
        e.extend_from_slice(v.as_bytes());
        env.push(e);
    }
    for (k, v) in &spec.worker.env {
        if inherited_is_removed(OsStr::new(k)) {
            continue;
        }
        env.push(format!("{k}={v}").into_bytes());
    }
    env.push(format!("ZDD_GENERATION={}", spec.generation).into_bytes());
    if let Some(hook) = &spec.hook {
        // A hook is not a worker: no slot, no readiness, no sockets.
        env.push(format!("ZDD_HOOK={}", hook.name).into_bytes());
        return (env, Vec::new());
    }
    env.push(format!("ZDD_SLOT={}", spec.slot).into_bytes());
    let mut notify = b"NOTIFY_SOCKET=".to_vec();
    notify.extend_from_slice(spec.notify_socket.as_os_str().as_bytes());
    env.push(notify);
    let n = spec.listeners.len();
    let mut pid_slots = Vec::new();
    let mut pid_slot = |env: &mut Vec<Vec<u8>>, prefix: &[u8]| {
        let mut slot = prefix.to_vec();
        slot.extend_from_slice(&[0u8; 24]);
        pid_slots.push((env.len(), prefix.len()));
        env.push(slot);
    };
    if n > 0 {
        env.push(format!("LISTEN_FDS={n}").into_bytes());
        env.push(format!("LISTEN_FDNAMES={}", spec.names.join(":")).into_bytes());
        pid_slot(&mut env, b"LISTEN_PID=");
    }
    // sd_watchdog_enabled() checks WATCHDOG_PID against its own pid: the worker's, set after
    // fork like LISTEN_PID.
    if let Some(w) = spec.worker.watchdog {
        env.push(format!("WATCHDOG_USEC={}", w.as_micros()).into_bytes());
        pid_slot(&mut env, b"WATCHDOG_PID=");
    }
    for compat in &spec.worker.compat {
        match compat {
            Compat::Einhorn => {
                env.push(format!("EINHORN_FD_COUNT={n}").into_bytes());
                for i in 0..n {
                    env.push(format!("EINHORN_FD_{i}={}", 3 + i).into_bytes());
                }
            }
            Compat::ServerStarter if n > 0 => {
                let ports: Vec<String> = spec
                    .listeners
                    .iter()
                    .enumerate()
                    .map(|(i, l)| match l.addr() {
                        ListenAddr::Tcp(a) if a.ip().is_unspecified() && a.is_ipv4() => {
                            format!("{}={}", a.port(), 3 + i)
                        }
                        ListenAddr::Tcp(a) => format!("{a}={}", 3 + i),
                        other => format!("{other}={}", 3 + i),
                    })
                    .collect();
                env.push(format!("SERVER_STARTER_PORT={}", ports.join(";")).into_bytes());
            }
            Compat::ServerStarter => {}
        }
    }
    (env, pid_slots)
}

/// The worker's credentials if they differ from the master's: equal ones need no change (and
/// no privilege).
fn changed_credentials(w: &WorkerConfig) -> Option<&crate::config::Credentials> {
    w.credentials
        .as_ref()
        .filter(|c| c.uid != nix::unistd::geteuid() || c.gid != nix::unistd::getegid())
}

/// Changing credentials needs a root master: say so before anything else is tried.
pub fn check_credentials(w: &WorkerConfig) -> Result<(), SpawnError> {
    match changed_credentials(w) {
        Some(c) if !nix::unistd::geteuid().is_root() => Err(SpawnError::NeedsRoot {
            user: c.user.clone().unwrap_or_else(|| c.uid.to_string()),
            uid: nix::unistd::geteuid().as_raw(),
        }),
        _ => Ok(()),
    }
}

/// Fork and exec one worker. Returns once exec succeeded, or with the step that failed.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<Spawned, SpawnError> {
    let w = spec.worker;
    let master_err = |op: &'static str| move |errno: Errno| SpawnError::Master { op, errno };

    let path_var = w
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| OsStr::new(v.as_str()).to_os_string())
        .or_else(|| std::env::var_os("PATH"));
    let command = spec.hook.map_or(&w.command[..], |h| h.command);
    let program = resolve_program(&command[0], path_var.as_deref())?;
    let program_c = cstring(program.as_os_str().as_bytes());
    let argv: Vec<CString> = command.iter().map(|a| cstring(a.as_bytes())).collect();
    let mut argv_ptrs: Vec<*const c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());

    let (mut env, pid_slots) = build_env(spec);
    for e in &mut env {
        e.push(0);
    }
    let mut env_ptrs: Vec<*mut c_char> = env.iter_mut().map(|e| e.as_mut_ptr() as *mut c_char).collect();
    env_ptrs.push(std::ptr::null_mut());
    let mut pid_slot_ptrs: [(*mut u8, usize); 2] = [(std::ptr::null_mut(), 0); 2];
    for (dst, &(i, prefix)) in pid_slot_ptrs.iter_mut().zip(&pid_slots) {
        *dst = (env_ptrs[i] as *mut u8, prefix);
    }

    let cwd_c = w.cwd.as_ref().map(|c| cstring(c.as_os_str().as_bytes()));
    check_credentials(w)?;
    let creds = changed_credentials(w);
    let groups: Vec<libc::gid_t> = match creds {
        Some(c) => match &c.user {
            Some(name) => {
                let cname = cstring(name.as_bytes());
                nix::unistd::getgrouplist(&cname, c.gid)
                    .map_err(master_err("getgrouplist"))?
                    .into_iter()
                    .map(|g| g.as_raw())
                    .collect()
            }
            None => vec![c.gid.as_raw()],
        },
        None => Vec::new(),
    };
    let rlimits: Vec<(c_int, libc::rlimit)> = spec
        .rlimits
        .iter()
        .map(|r| {
            (
                r.resource as c_int,
                libc::rlimit {
                    rlim_cur: r.soft,
                    rlim_max: r.hard,
                },
            )
        })
        .collect();

    let devnull = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(master_err("open /dev/null"))?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let devnull = unsafe { OwnedFd::from_raw_fd(devnull) };
    let (out_r, out_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(master_err("pipe"))?;
    let (err_r, err_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(master_err("pipe"))?;
    let (report_r, report_w) = pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(master_err("pipe"))?;
    let cgroup_procs = match spec.cgroup {
        Some(cg) => Some(cg.open_procs().map_err(|errno| SpawnError::Cgroup {
            path: cg.path().display().to_string(),
            errno,
        })?),
        None => None,
    };

    let listener_fds: Vec<RawFd> = spec.listeners.iter().map(|l| l.raw_fd()).collect();
    let n = listener_fds.len() as c_int;
    let mut sources: Vec<RawFd> = vec![devnull.as_raw_fd(), out_w.as_raw_fd(), err_w.as_raw_fd()];
    sources.extend_from_slice(&listener_fds);
    let report_fd = report_w.as_raw_fd();
    let master_pid = nix::unistd::getpid().as_raw();
    let uid = creds.map(|c| c.uid.as_raw());
    let gid = creds.map(|c| c.gid.as_raw());
    let umask = w.umask;

    // Block every signal around fork, so that no handler of the master runs in the child.
    // SAFETY: sigset_t is plain data initialised by sigfillset before use.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to sigset_t values owned by this frame.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the master is single-threaded; the child only runs `child_after_fork`, which makes
    // async-signal-safe calls on data prepared above and then execs or _exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: see `child_after_fork`; we are in the child of fork.
        unsafe {
            child_after_fork(ChildPlan {
                sources: &mut sources,
                n,
                report_fd,
                cgroup_procs: cgroup_procs.as_ref().map_or(-1, |fd| fd.as_raw_fd()),
                pid_slots: pid_slot_ptrs,
                groups: &groups,
                uid,
                gid,
                master_pid,
                rlimits: &rlimits,
                umask,
                cwd: cwd_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
                program: program_c.as_ptr(),
                argv: argv_ptrs.as_ptr(),
                envp: env_ptrs.as_ptr() as *const *const c_char,
            })
        }
    }
    let fork_errno = Errno::last();
    // SAFETY: restores the mask saved above.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    if pid < 0 {
        return Err(SpawnError::Master {
            op: "fork",
            errno: fork_errno,
        });
    }
    let child = Pid::from_raw(pid);
    // Also from the parent, so the group exists before we could signal it.
    let _ = nix::unistd::setpgid(child, child);
    drop(report_w);
    drop(out_w);
    drop(err_w);
    drop(devnull);
    drop(cgroup_procs);

    let mut report = [0u8; 5];
    let got = match read_report(&report_r, &mut report) {
        Some(got) => got,
        None => {
            // Stuck before exec: kill it and go on. It is reaped by the master's loop like
            // any child that is not a worker; its cgroup, if any, is released by the caller.
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
            return Err(SpawnError::ExecTimeout { pid });
        }
    };
    if got == 0 {
        return Ok(Spawned {
            pid: child,
            stdout: out_r,
            stderr: err_r,
        });
    }
    // The child failed before exec and exits at once; collect it here so the master's
    // reaper never sees it.
    while let Err(Errno::EINTR) = nix::sys::wait::waitpid(child, None) {}
    let errno = Errno::from_raw(i32::from_ne_bytes([report[1], report[2], report[3], report[4]]));
    let (step, object) = match report[0] {
        STEP_PGID => ("setpgid", String::new()),
        STEP_CGROUP => (
            "join cgroup",
            spec.cgroup.map(|c| c.path().display().to_string()).unwrap_or_default(),
        ),
        STEP_FDS => ("dup2", "listening sockets".into()),
        STEP_GROUPS => ("setgroups", String::new()),
        STEP_SETGID => ("setgid", gid.map(|g| g.to_string()).unwrap_or_default()),
        STEP_SETUID => ("setuid", uid.map(|u| u.to_string()).unwrap_or_default()),
        STEP_PDEATHSIG => ("prctl PR_SET_PDEATHSIG", String::new()),
        n if n >= STEP_RLIMIT => match spec.rlimits.get((n - STEP_RLIMIT) as usize) {
            Some(r) => (
                "setrlimit",
                format!("{} (soft {}, hard {})", r.name, limit_text(r.soft), limit_text(r.hard)),
            ),
            None => ("setrlimit", String::new()),
        },
        STEP_CHDIR => (
            "chdir",
            w.cwd.as_ref().map(|c| c.display().to_string()).unwrap_or_default(),
        ),
        _ => ("exec", program.display().to_string()),
    };
    Err(SpawnError::Child { step, object, errno })
}

/// Read the child's exec report until EOF (exec closed it) or a full report, for at most
/// [`EXEC_TIMEOUT`]. The number of bytes read, or None if the child did not get there in time.
fn read_report(report_r: &OwnedFd, report: &mut [u8; 5]) -> Option<usize> {
    let end = std::time::Instant::now() + EXEC_TIMEOUT;
    let mut got = 0;
    while got < report.len() {
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut pfd = [libc::pollfd {
            fd: report_r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // Rounded up, so that we never wake just before the deadline and spin.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as c_int;
        // SAFETY: one valid pollfd, exclusively borrowed.
        match unsafe { libc::poll(pfd.as_mut_ptr(), 1, ms) } {
            0 => continue,
            n if n < 0 => {
                if Errno::last() == Errno::EINTR {
                    continue;
                }
                break;
            }
            _ => {}
        }
        match nix::unistd::read(report_r.as_raw_fd(), &mut report[got..]) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    Some(got)
}

fn limit_text(v: u64) -> String {
    if v == libc::RLIM_INFINITY {
        "infinity".into()
    } else {
        v.to_string()
    }
}

struct ChildPlan<'a> {
    sources: &'a mut [RawFd],
    n: c_int,
    report_fd: RawFd,
    /// The worker cgroup's `cgroup.procs`, or -1.
    cgroup_procs: RawFd,
    /// Where to write the child's pid (after a `NAME=` prefix of the given length), or null.
    pid_slots: [(*mut u8, usize); 2],
    groups: &'a [libc::gid_t],
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
    master_pid: libc::pid_t,
    rlimits: &'a [(c_int, libc::rlimit)],
    umask: Option<u32>,
    cwd: *const c_char,
    program: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
}

/// Report a failed step to the master and exit.
///
/// # Safety
/// Only async-signal-safe calls: errno read, write, _exit.
unsafe fn fail(report_fd: RawFd, step: u8) -> ! {
    let errno = Errno::last_raw().to_ne_bytes();
    let msg = [step, errno[0], errno[1], errno[2], errno[3]];
    libc::write(report_fd, msg.as_ptr() as *const libc::c_void, msg.len());
    libc::_exit(127)
}

/// The child between fork and exec.
///
/// # Safety
/// Must be called only in the child of `fork`, with every pointer in `plan` valid. It makes
/// only async-signal-safe system calls and never returns.
unsafe fn child_after_fork(plan: ChildPlan<'_>) -> ! {
    // 1. Signals: default dispositions first, then an empty mask. The raw system call, since
    //    glibc's wrapper refuses to touch its two internal real-time signals, which may still
    //    arrive ignored from whoever started the master. An all-zero kernel sigaction is
    //    SIG_DFL with no flags and an empty mask, whatever the architecture's field order.
    let dfl = [0u64; 4];
    for sig in 1..=64 {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

    // 2. Own process group.
    if libc::setpgid(0, 0) != 0 {
        fail(plan.report_fd, STEP_PGID);
    }
    // Its own cgroup, before it runs anything else (and before a credential change).
    if plan.cgroup_procs >= 0 && libc::write(plan.cgroup_procs, b"0".as_ptr() as *const libc::c_void, 1) != 1 {
        fail(plan.report_fd, STEP_CGROUP);
    }

    // 3. Fds. Source i goes to fd i, in increasing order. The dup2 onto fd t clobbers
    //    whatever sits at t; a source sitting at t whose own target is below t was placed
    //    already. So only sources below their target can be lost: those (and the report
    //    pipe, if in the range) are moved above the range first. The master's listeners usually sit just above their targets
    //    (bound in order at start), so with n listeners this is n dup2 calls, not 2n.
    let first_free = 3 + plan.n;
    let mut report_fd = plan.report_fd;
    if report_fd < first_free {
        report_fd = libc::fcntl(plan.report_fd, libc::F_DUPFD_CLOEXEC, first_free);
        if report_fd < 0 {
            fail(plan.report_fd, STEP_FDS);
        }
    }
    for (target, fd) in plan.sources.iter_mut().enumerate() {
        if *fd < target as c_int {
            let moved = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, first_free);
            if moved < 0 {
                fail(report_fd, STEP_FDS);
            }
            *fd = moved;
        }
    }
    for (target, &fd) in plan.sources.iter().enumerate() {
        let target = target as c_int;
        // dup2(fd, fd) would not clear close-on-exec: a source already in place is cleared.
        let placed = if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        };
        if placed < 0 {
            fail(report_fd, STEP_FDS);
        }
    }
    // Everything from 3+n up closes at exec, including fds the master inherited itself.
    if libc::syscall(
        libc::SYS_close_range,
        first_free as libc::c_uint,
        libc::c_uint::MAX,
        libc::CLOSE_RANGE_CLOEXEC,
    ) != 0
    {
        let mut fd = first_free;
        while fd < 65536 {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            fd += 1;
        }
    }

    // 4. LISTEN_PID, WATCHDOG_PID: the digits follow the `NAME=` prefix, then NUL.
    for &(slot, prefix) in &plan.pid_slots {
        if slot.is_null() {
            continue;
        }
        let mut pid = libc::getpid() as u64;
        let mut digits = [0u8; 20];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (pid % 10) as u8;
            len += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let dst = slot.add(prefix);
        for i in 0..len {
            *dst.add(i) = digits[len - 1 - i];
        }
        *dst.add(len) = 0;
    }

    // 5. Credentials, then the parent-death signal (a credential change clears it).
    if let Some(gid) = plan.gid {
        if libc::setgroups(plan.groups.len(), plan.groups.as_ptr()) != 0 {
            fail(report_fd, STEP_GROUPS);
        }
        if libc::setgid(gid) != 0 {
            fail(report_fd, STEP_SETGID);
        }
    }
    if let Some(uid) = plan.uid {
        if libc::setuid(uid) != 0 {
            fail(report_fd, STEP_SETUID);
        }
        // Irreversible: if we could become root again, the drop did not happen.
        if uid != 0 && libc::setuid(0) == 0 {
            *libc::__errno_location() = libc::EPERM;
            fail(report_fd, STEP_SETUID);
        }
    }
    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
        fail(report_fd, STEP_PDEATHSIG);
    }
    if libc::getppid() != plan.master_pid {
        // The master died between fork and prctl.
        libc::_exit(127);
    }

    // 6. Limits, umask, cwd, exec.
    for (i, (resource, lim)) in plan.rlimits.iter().enumerate() {
        if libc::setrlimit(*resource as _, lim) != 0 {
            fail(report_fd, STEP_RLIMIT + i as u8);
        }
    }
    if let Some(mask) = plan.umask {
        libc::umask(mask as libc::mode_t);
    }
    if !plan.cwd.is_null() && libc::chdir(plan.cwd) != 0 {
        fail(report_fd, STEP_CHDIR);
    }
    libc::execve(plan.program, plan.argv, plan.envp);
    fail(report_fd, STEP_EXEC)
}

#[cfg(test)]
#[path = "spawn_tests.rs"]
mod tests;
