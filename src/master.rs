//! The master: one thread, one event loop, one owner of every fd and every piece of state.
//!
//! Each turn of [`Master::run`] polls the signal self-pipe, the notify socket and every
//! worker's log pipes, with the earliest pending deadline as the timeout, and then handles, in
//! this fixed order: signals → reaping children → readiness messages → log lines → expired
//! deadlines → the generation logic ([`Master::advance`]), which starts, commits or fails a
//! reload, finishes the start-up and ends the stop.
//!
//! Generations. Workers started together from one reading of the config form a generation.
//! `generation` is the one serving; a reload builds `reload` (the next generation, its config
//! and its listeners) and commits it only once all its workers are ready: then the serving
//! generation is asked to stop and the new one takes its place. If one of its workers exits or
//! misses its start timeout first, the whole new generation is killed and the serving one is
//! untouched. Reload requests that arrive meanwhile set `reload_again`: one more reload after.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};
use slog::{debug, error, info, warn, Logger};

use crate::clock;
use crate::config::{self, Config, Restart};
use crate::control::{Conn, ControlServer, Input, Reply, Request, Waiting};
use crate::daemon::{ensure_parent, PidFile};
use crate::errno::describe_io;
use crate::listen::Listener;
use crate::log::{LineBatch, Sink};
use crate::upgrade;
use crate::worker::notify::{monotonic_usec, NotifyServer, SystemdNotifier};
use crate::worker::relay::{Pipe, Stream};
use crate::worker::spawn::{spawn, SpawnSpec};
use crate::worker::{Effect, Event, ExitStatus, State, Worker};

/// Crash back-off: 100 ms doubling up to 30 s, forgotten once a worker has lived 10 s.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const BACKOFF_RESET: Duration = Duration::from_secs(10);
/// Log pipes of exited workers kept open for their descendants, at most.
const MAX_ORPHAN_PIPES: usize = 256;

/// Control connections served at once; more wait in the socket's backlog. Each is answered or
/// timed out within seconds (a request must arrive within `REQUEST_TIMEOUT`), and only root
/// and the master's own uid are kept.
const MAX_CONTROL_CONNS: usize = 128;
/// How long the control socket is left alone after accept failed (EMFILE and the like).
const CONTROL_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    PidFile(#[from] crate::daemon::PidFileError),
    #[error(transparent)]
    Listen(#[from] crate::listen::ListenError),
    #[error(transparent)]
    Notify(#[from] crate::worker::notify::NotifyError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("{0}")]
    Other(String),
}

/// Signals the master reacts to. Handlers only set a flag and wake the loop through a pipe.
struct Signals {
    wake_r: UnixStream,
    _wake_w: UnixStream,
    flags: Vec<(Signal, Arc<AtomicBool>)>,
}

const HANDLED: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
    Signal::SIGQUIT,
];

impl Signals {
    fn install() -> std::io::Result<Signals> {
        let (wake_r, wake_w) = UnixStream::pair()?;
        wake_r.set_nonblocking(true)?;
        wake_w.set_nonblocking(true)?;
        let mut flags = Vec::new();
        for sig in HANDLED {
            let flag = Arc::new(AtomicBool::new(false));
            // Flag first, then the wake-up: when the loop wakes, the flag is already set.
            signal_hook::flag::register(sig as i32, Arc::clone(&flag))?;
            signal_hook::low_level::pipe::register_raw(sig as i32, wake_w.as_raw_fd())?;
            flags.push((sig, flag));
        }
        Ok(Signals {
            wake_r,
            _wake_w: wake_w,
            flags,
        })
    }

    /// Drain the wake-up pipe and return the signals that arrived, in a fixed order.
    fn take(&self) -> Vec<Signal> {
        let mut buf = [0u8; 256];
        while nix::unistd::read(self.wake_r.as_raw_fd(), &mut buf).is_ok_and(|n| n > 0) {}
        self.flags
            .iter()
            .filter(|(_, f)| f.swap(false, Ordering::SeqCst))
            .map(|(s, _)| *s)
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The first generation is starting.
    Starting,
    Running,
    Stopping,
}

/// Why a generation failed to start.
struct Failure {
    reason: String,
    tail: Vec<String>,
}

/// A reload under way: the next generation, with what it was started from.
struct Reload {
    generation: u64,
    config: Rc<Config>,
    listeners: Vec<Rc<Listener>>,
    failure: Option<Failure>,
}

/// Crash-restart state of one worker position of the serving generation.
#[derive(Default, Clone)]
struct Slot {
    /// A worker in this position has been ready at least once (what the first start waits for).
    ready_once: bool,
    failures: u32,
    restarts: u32,
    restart_at: Option<Instant>,
}

pub struct Master {
    log: Logger,
    sink: Sink,
    /// Worker lines on their way to the log, written once per read.
    lines: LineBatch,
    config: Rc<Config>,
    listeners: Vec<Rc<Listener>>,
    generation: u64,
    next_generation: u64,
    workers: Vec<Worker>,
    slots: Vec<Slot>,
    reload: Option<Reload>,
    reload_again: bool,
    start_failure: Option<Failure>,
    phase: Phase,
    exit_code: i32,
    /// Log pipes of reaped workers that something else (a grandchild) still holds open.
    orphan_pipes: Vec<(Pid, u64, Pipe)>,
    signals: Signals,
    notify: NotifyServer,
    control: ControlServer,
    started_at: Instant,
    started_wall: SystemTime,
    /// Reload attempts started so far; control clients wait for a given attempt's outcome.
    attempt: u64,
    /// `zdd start` (daemon mode) waits on this pipe for the first generation's outcome.
    start_report: Option<std::fs::File>,
    /// The binary to exec on upgrade.
    exe: std::path::PathBuf,
    /// The open-file limit (soft, hard) the master was started with, before it raised its
    /// own; workers get it back.
    worker_nofile: Option<(u64, u64)>,
    /// Not accepting control connections until then (accept failed).
    control_paused_until: Option<Instant>,
    /// The new binary being checked before an upgrade's exec.
    upgrade_check: Option<UpgradeCheck>,
    /// systemd's NOTIFY_SOCKET, when the master runs under systemd.
    systemd: Option<SystemdNotifier>,
    /// The workers' cgroups (cgroup.rs); removed at stop, before the pid-file lock goes.
    cgroups: crate::worker::cgroup::Cgroups,
    /// Dropped after the sockets: while the pid file exists, the lock is held.
    pid_file: PidFile,
    /// Declared last, so dropped last: a `zdd stop` client sees EOF only after the sockets
    /// and pid file are gone.
    conns: Vec<Conn>,
}

/// Tail lines of a worker for a failure report, control characters escaped.
fn tail_of(w: &Worker) -> Vec<String> {
    w.tail.iter().map(|l| crate::log::escape_str(l).into_owned()).collect()
}

impl Master {
    /// Everything up to the first spawn: pid-file lock, signals, notify socket, listeners.
    /// An error here leaves nothing behind: whatever was created is dropped and removed.
    pub fn start(config: Config, log: Logger, sink: Sink) -> Result<Master, StartError> {
        let config = Rc::new(config);
        let m = &config.master;
        crate::worker::spawn::check_credentials(&config.worker).map_err(|e| StartError::Other(e.to_string()))?;
        let pid_file = PidFile::acquire(&m.pid_file)?;
        let worker_nofile = crate::errno::raise_nofile();
        if let (Some((soft, _)), Ok((now, _))) = (
            worker_nofile,
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE),
        ) {
            if now > soft {
                info!(log, "raised the master's open-file limit"; "workers_keep" => soft, "nofile" => now);
            }
        }
        // No master of this config lives now: what a crashed one left must not keep the ports.
        crate::worker::cgroup::clean_stale(&log, &m.pid_file);
        let cgroups = crate::worker::cgroup::Cgroups::none(&log);
        ensure_parent(&m.notify_socket).map_err(|e| {
            StartError::Other(format!(
                "create directory for {}: {}",
                m.notify_socket.display(),
                describe_io(&e)
            ))
        })?;
        let signals = Signals::install().map_err(|e| StartError::Other(format!("installing signal handlers: {e}")))?;
        let notify = NotifyServer::bind(&m.notify_socket, config.worker.credentials.as_ref().map(|c| c.uid))?;
        ensure_parent(&m.control_socket).map_err(|e| {
            StartError::Other(format!(
                "create directory for {}: {}",
                m.control_socket.display(),
                describe_io(&e)
            ))
        })?;
        let control = ControlServer::bind(&m.control_socket)?;
        // Sockets systemd passed to us are adopted for the [[listen]] entries they match, by
        // name first, else by address; the rest are bound here.
        let (mut inherited, refused): (Vec<(Option<String>, OwnedFd)>, _) = crate::listen::take_systemd_sockets();
        for why in refused {
            warn!(log, "a socket passed by systemd cannot be a listener: {}", why);
        }
        let mut listeners = Vec::with_capacity(config.listen.len());
        for lc in &config.listen {
            let found = inherited
                .iter()
                .position(|(name, _)| name.as_deref() == Some(lc.name.as_str()))
                .or_else(|| {
                    inherited
                        .iter()
                        .position(|(_, fd)| crate::listen::bound_addr(fd).as_ref() == Some(&lc.addr))
                });
            let l = match found {
                Some(i) => {
                    let (_, fd) = inherited.remove(i);
                    let l = Listener::from_state(fd, lc.addr.clone(), None, lc.backlog);
                    info!(log, "adopted socket from systemd"; "addr" => l.local_addr(), "name" => &lc.name);
                    l
                }
                None => {
                    let l = Listener::bind(lc)?;
                    info!(log, "listening"; "addr" => l.local_addr(), "name" => &lc.name);
                    l
                }
            };
            listeners.push(Rc::new(l));
        }
        for (name, fd) in inherited {
            warn!(log, "a socket passed by systemd matches no [[listen]] entry; closed";
                "name" => name.unwrap_or_default(), "addr" => crate::listen::bound_addr(&fd).map(|a| a.to_string()).unwrap_or_default());
        }
        Ok(Master {
            log,
            lines: LineBatch::new(sink.clone(), config.master.log_format),
            sink,
            config,
            listeners,
            generation: 1,
            next_generation: 2,
            workers: Vec::new(),
            slots: Vec::new(),
            reload: None,
            reload_again: false,
            start_failure: None,
            phase: Phase::Starting,
            exit_code: 0,
            orphan_pipes: Vec::new(),
            signals,
            notify,
            cgroups,
            pid_file,
            control,
            started_at: Instant::now(),
            started_wall: SystemTime::now(),
            attempt: 0,
            start_report: None,
            exe: crate::upgrade::own_exe(),
            worker_nofile,
            control_paused_until: None,
            upgrade_check: None,
            systemd: SystemdNotifier::from_env(),
            conns: Vec::new(),
        })
    }

    /// Run until stopped; returns the process exit code.
    pub fn run(mut self) -> i32 {
        // SAFETY: prctl with integer arguments only. Per process, so set here, after any
        // daemonizing fork.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        if self.phase == Phase::Starting {
            info!(self.log, "starting"; "workers" => self.config.worker.count, "generation" => 1, "pid" => std::process::id());
            self.slots = vec![Slot::default(); self.config.worker.count];
            // Here, not in `start`: the tree is named after the master's pid (after daemonizing).
            self.cgroups = crate::worker::cgroup::Cgroups::start(&self.log, &self.config.master.pid_file);
            self.spawn_generation(Rc::clone(&self.config), self.listeners.clone(), 1);
        }
        loop {
            self.advance();
            if self.phase == Phase::Stopping && self.workers.is_empty() {
                break;
            }
            // Hang up on every connection whose result went out this turn, wherever it was
            // sent: a client returns when it sees the hang-up.
            self.conns.retain(|c| !c.dead);
            let ready = self.poll();
            for sig in self.signals.take() {
                self.on_signal(sig);
            }
            self.reap();
            self.cgroups.service();
            self.read_notify();
            self.serve_control(&ready);
            self.pump_pipes(&ready);
            self.tick(Instant::now());
        }
        self.lines.begin();
        for (pid, generation, mut pipe) in std::mem::take(&mut self.orphan_pipes) {
            let tag = self.lines.tag(pid.as_raw(), generation, pipe.stream.as_str());
            let lines = &mut self.lines;
            pipe.pump(true, |line| {
                lines.push(line, &tag);
            });
            // A descendant still holds the pipe: its last, unfinished line is logged too.
            pipe.finish(|line| {
                lines.push(line, &tag);
            });
        }
        self.lines.flush();
        self.cgroups.shutdown();
        info!(self.log, "stopped"; "exit_code" => self.exit_code);
        self.report_start(Err("the master stopped during start-up".into()));
        // What the log has not taken yet, within a deadline; the rest is counted as lost.
        self.sink.flush();
        let lost = self.sink.dropped_lines();
        let pid = std::process::id();
        let message = match lost {
            0 => format!("master pid {pid} stopped"),
            1 => format!("master pid {pid} stopped; 1 log line could not be written since it started"),
            n => format!("master pid {pid} stopped; {n} log lines could not be written since it started"),
        };
        for c in self.conns.iter_mut().filter(|c| c.waiting == Some(Waiting::Stop)) {
            c.send_final(&Reply::ok(
                message.clone(),
                json!({ "pid": pid, "log_lines_lost": lost }),
            ));
        }
        self.exit_code
    }

    /// Daemon mode: after the fork, record the new pid and where to report the start-up.
    pub fn daemonized(&mut self, report: std::fs::File) -> Result<(), StartError> {
        self.pid_file.rewrite().map_err(|e| StartError::Other(e.to_string()))?;
        // Daemonizing replaced stderr: a log to stderr follows it.
        self.sink.reattach_stderr();
        self.start_report = Some(report);
        Ok(())
    }

    /// Tell a waiting `zdd start` how the start-up went (once).
    fn report_start(&mut self, outcome: Result<(), String>) {
        let Some(mut f) = self.start_report.take() else { return };
        let line = match outcome {
            Ok(()) => format!(
                "ready pid {} generation {} workers {}\n",
                std::process::id(),
                self.generation,
                self.config.worker.count
            ),
            Err(e) => format!("failed {e}\n"),
        };
        let _ = f.write_all(line.as_bytes());
    }

    fn spawn_worker(
        &mut self,
        config: &Rc<Config>,
        listeners: &[Rc<Listener>],
        generation: u64,
        slot: usize,
    ) -> Result<(), String> {
        // The master raised its own soft open-file limit; workers get the one it was given,
        // unless [rlimits] sets one.
        let mut rlimits = config.rlimits.clone();
        if let Some((soft, hard)) = self.worker_nofile {
            if !rlimits
                .iter()
                .any(|r| r.resource == nix::sys::resource::Resource::RLIMIT_NOFILE)
            {
                rlimits.push(config::Rlimit {
                    resource: nix::sys::resource::Resource::RLIMIT_NOFILE,
                    name: "nofile",
                    soft,
                    hard,
                });
            }
        }
        let cgroup = self.cgroups.create(generation, slot);
        let spec = SpawnSpec {
            worker: &config.worker,
            names: config.listen.iter().map(|l| l.name.as_str()).collect(),
            listeners,
            notify_socket: self.notify.path(),
            generation,
            rlimits: &rlimits,
            cgroup: cgroup.as_ref(),
        };
        let spawned = match spawn(&spec) {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = cgroup {
                    self.cgroups.release(cg);
                }
                let msg = format!("starting worker: {e}");
                error!(self.log, "{}", msg; "generation" => generation);
                return Err(msg);
            }
        };
        let now = Instant::now();
        let ready_at = match config.worker.ready {
            config::Ready::Delay(d) => Some(clock::after(now, d)),
            config::Ready::Notify => None,
        };
        info!(self.log, "worker started"; "slot" => slot, "generation" => generation, "pid" => spawned.pid.as_raw());
        self.workers.push(Worker {
            pid: spawned.pid,
            generation,
            slot,
            state: State::Starting {
                deadline: clock::after(now, config.worker.start_timeout),
                ready_at,
            },
            started: now,
            started_wall: SystemTime::now(),
            stop_signal: config.worker.stop_signal,
            stop_timeout: config.worker.stop_timeout,
            pipes: vec![
                Pipe::new(spawned.stdout, Stream::Stdout),
                Pipe::new(spawned.stderr, Stream::Stderr),
            ],
            tail: Default::default(),
            status_text: None,
            _listeners: listeners.to_vec(),
            cgroup,
        });
        Ok(())
    }

    /// Wait for something to do. Returns the fds that are readable.
    fn poll(&mut self) -> Vec<RawFd> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2 + 2 * self.workers.len());
        let add = |fds: &mut Vec<libc::pollfd>, fd: RawFd| {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
        };
        add(&mut fds, self.signals.wake_r.as_raw_fd());
        add(&mut fds, self.notify.raw_fd());
        // At the cap, or backing off after accept failed (EMFILE), the listener is left out:
        // new clients wait in its backlog.
        let accepting = self.conns.len() < MAX_CONTROL_CONNS && self.control_paused_until.is_none();
        add(&mut fds, if accepting { self.control.raw_fd() } else { -1 });
        for c in &self.conns {
            let mut events = 0;
            if c.wants_read() {
                events |= libc::POLLIN;
            }
            if c.wants_write() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.raw_fd(),
                events,
                revents: 0,
            });
        }
        // While the log sink is full, the workers' pipes are not read: they fill, and the
        // workers block writing (back-pressure); the sink is polled until it takes more.
        if !self.sink.is_full() {
            for w in &self.workers {
                for p in w.pipes.iter().filter(|p| !p.is_eof()) {
                    add(&mut fds, p.raw_fd());
                }
            }
            for (_, _, p) in &self.orphan_pipes {
                add(&mut fds, p.raw_fd());
            }
        }
        if let Some(fd) = self.sink.poll_fd() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            });
        }
        // Killed workers' cgroups, to remove once empty.
        for fd in self.cgroups.poll_fds() {
            fds.push(libc::pollfd {
                fd,
                events: libc::POLLPRI,
                revents: 0,
            });
        }
        let timeout = self.next_deadline().map_or(-1, |d| {
            let left = d.saturating_duration_since(Instant::now());
            // Round up, so that we never wake just before a deadline and spin.
            left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            return Vec::new();
        }
        // A client that hung up while it waits for a result (it sent its request, so nothing
        // is read from it any more) would be reported on every poll, and the loop would spin
        // until the result: it is gone, drop it; the action it asked for goes on.
        for (c, p) in self.conns.iter_mut().zip(&fds[3..]) {
            if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 && !c.wants_read() {
                c.dead = true;
            }
        }
        let mut ready: Vec<RawFd> = fds.iter().filter(|p| p.revents != 0).map(|p| p.fd).collect();
        ready.sort_unstable();
        ready
    }

    fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.iter().filter_map(|w| w.state.deadline());
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        let requests = self.conns.iter().filter_map(|c| c.deadline);
        workers
            .chain(restarts)
            .chain(requests)
            .chain(self.control_paused_until)
            .chain(self.upgrade_check.as_ref().map(|c| c.deadline))
            .min()
    }

    fn on_signal(&mut self, sig: Signal) {
        match sig {
            Signal::SIGHUP => self.request_reload(None, None),
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => {
                if self.phase == Phase::Stopping {
                    warn!(self.log, "second stop signal: killing all workers now"; "signal" => sig.as_str());
                    for i in 0..self.workers.len() {
                        self.feed(i, Event::Kill);
                    }
                } else {
                    info!(self.log, "stopping"; "signal" => sig.as_str());
                    self.begin_stop();
                }
            }
            Signal::SIGUSR1 => {
                let _ = self.reopen_logs();
            }
            Signal::SIGUSR2 => self.upgrade(None),
            _ => {}
        }
    }

    fn reopen_logs(&mut self) -> Result<(), String> {
        match self.sink.reopen() {
            Ok(()) => {
                info!(self.log, "log reopened");
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "reopening the log failed; still writing to the old file: {}",
                    describe_io(&e)
                );
                error!(self.log, "{}", msg);
                Err(msg)
            }
        }
    }

    /// Collect every exited child. Several may be behind one SIGCHLD.
    fn reap(&mut self) {
        // A worker's last messages (READY=1 just before it exits) are queued already: read
        // them while it is still known, so that they are attributed to it.
        self.read_notify();
        loop {
            // Peek first (WNOWAIT): while the child is a zombie its pid and process group id
            // cannot be reused, so what is left of a worker is killed before it is reaped.
            let pid = match crate::worker::exited_child() {
                Ok(Some(pid)) => pid,
                Ok(None) | Err(Errno::ECHILD) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    error!(self.log, "waitid failed"; "error" => crate::errno::describe(e));
                    break;
                }
            };
            if let Some(w) = self.workers.iter().find(|w| w.pid == pid) {
                w.kill_leftovers();
            }
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Err(Errno::EINTR) => continue,
                // Cannot happen after waitid said it exited; never spin on it.
                Ok(WaitStatus::StillAlive) => break,
                Err(e) => {
                    error!(self.log, "waitpid failed"; "error" => crate::errno::describe(e), "pid" => pid.as_raw());
                    break;
                }
                Ok(ws) => {
                    if let Some((pid, status)) = ExitStatus::from_wait(ws) {
                        self.on_exit(pid, status);
                    }
                }
            }
        }
    }

    fn on_exit(&mut self, pid: Pid, status: ExitStatus) {
        if self.upgrade_check.as_ref().is_some_and(|c| c.pid == pid) {
            return self.upgrade_checked(Some(status));
        }
        let Some(i) = self.workers.iter().position(|w| w.pid == pid) else {
            debug!(self.log, "reaped orphan"; "status" => status.to_string(), "pid" => pid.as_raw());
            return;
        };
        // Everything it wrote is in its pipes now: read it before judging the exit.
        self.drain_worker(i, true);
        self.feed(i, Event::Exited(status));
        let mut w = self.workers.remove(i);
        // Whatever was left in its process group was killed before reaping (`reap`); its
        // cgroup, with any descendant that escaped the group, goes with it now.
        if let Some(cg) = w.cgroup.take() {
            self.cgroups.release(cg);
        }
        for p in w.pipes.drain(..).filter(|p| !p.is_eof()) {
            self.orphan_pipes.push((w.pid, w.generation, p));
        }
    }

    fn drain_worker(&mut self, i: usize, drain: bool) {
        // Past the log's hard cap even an exited worker's last lines wait: its pipes are kept
        // (as orphan pipes) and read once the log takes more.
        if self.sink.is_over_cap() {
            return;
        }
        let w = &mut self.workers[i];
        let (pid, generation) = (w.pid.as_raw(), w.generation);
        let (lines, tail) = (&mut self.lines, &mut w.tail);
        lines.begin();
        for p in w.pipes.iter_mut() {
            let tag = lines.tag(pid, generation, p.stream.as_str());
            p.pump_while(drain, |line| {
                let text = lines.push(line, &tag);
                crate::worker::remember(tail, &text);
                lines.has_room()
            });
        }
        lines.flush();
    }

    fn read_notify(&mut self) {
        for msg in self.notify.receive() {
            let i = match self.workers.iter().position(|w| w.pid == msg.pid) {
                Some(i) => Some(i),
                None => nix::unistd::getpgid(Some(msg.pid))
                    .ok()
                    .and_then(|pgid| self.workers.iter().position(|w| w.pid == pgid && w.state.is_alive())),
            };
            let Some(i) = i else {
                debug!(self.log, "notify message from a process that is not a worker; ignored"; "sender" => msg.pid.as_raw());
                continue;
            };
            if let Some(status) = msg.get("STATUS") {
                debug!(self.log, "worker status"; "status" => status, "pid" => self.workers[i].pid.as_raw());
                self.workers[i].status_text = Some(status.to_string());
            }
            if msg.get("STOPPING") == Some("1") {
                debug!(self.log, "worker is stopping"; "pid" => self.workers[i].pid.as_raw());
            }
            if msg.get("READY") == Some("1") {
                self.feed(i, Event::Ready);
            }
        }
    }

    fn pump_pipes(&mut self, ready: &[RawFd]) {
        // The sink step: write what the log did not take before (it polled writable, or a
        // file's disk has room again), before reading more.
        self.sink.write_pending();
        self.limit_orphan_pipes();
        // Stop reading once the log is full; each turn starts with another worker, so that a
        // slow log starves none of them.
        let n = self.workers.len();
        let first = self.lines.next_turn(n);
        for k in 0..n {
            if self.sink.is_full() {
                return;
            }
            let i = (first + k) % n;
            if self.workers[i]
                .pipes
                .iter()
                .any(|p| ready.binary_search(&p.raw_fd()).is_ok())
            {
                self.drain_worker(i, false);
            }
        }
        let lines = &mut self.lines;
        let sink = &self.sink;
        lines.begin();
        self.orphan_pipes.retain_mut(|(pid, generation, p)| {
            if ready.binary_search(&p.raw_fd()).is_ok() && !sink.is_full() {
                let tag = lines.tag(pid.as_raw(), *generation, p.stream.as_str());
                p.pump_while(false, |line| {
                    lines.push(line, &tag);
                    lines.has_room()
                });
            }
            !p.is_eof()
        });
        lines.flush();
    }

    /// At most [`MAX_ORPHAN_PIPES`] pipes of exited workers are kept open for their
    /// descendants; beyond that the oldest is read one last time and closed.
    fn limit_orphan_pipes(&mut self) {
        while self.orphan_pipes.len() > MAX_ORPHAN_PIPES {
            let (pid, generation, mut p) = self.orphan_pipes.remove(0);
            let tag = self.lines.tag(pid.as_raw(), generation, p.stream.as_str());
            let lines = &mut self.lines;
            lines.begin();
            p.pump(true, |line| {
                lines.push(line, &tag);
            });
            p.finish(|line| {
                lines.push(line, &tag);
            });
            lines.flush();
            warn!(self.log, "too many log pipes held open by exited workers' descendants: closing the oldest";
                "max" => MAX_ORPHAN_PIPES, "stream" => p.stream.as_str(), "generation" => generation, "pid" => pid.as_raw());
        }
    }

    fn tick(&mut self, now: Instant) {
        if self.upgrade_check.as_ref().is_some_and(|c| c.deadline <= now) {
            self.upgrade_checked(None);
        }
        for i in 0..self.workers.len() {
            if self.workers[i].state.deadline().is_some_and(|d| d <= now) {
                self.feed(i, Event::Tick(now));
            }
        }
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].restart_at.is_some_and(|t| t <= now))
            .collect();
        for slot in due {
            self.slots[slot].restart_at = None;
            self.slots[slot].restarts += 1;
            let (config, listeners) = (Rc::clone(&self.config), self.listeners.clone());
            if self.spawn_worker(&config, &listeners, self.generation, slot).is_err() {
                self.schedule_restart(slot, Duration::ZERO);
            }
        }
    }

    /// Feed an event to worker `i` and act on what it reports.
    fn feed(&mut self, i: usize, event: Event) {
        let was_ready = self.workers[i].state == State::Ready;
        let effects = self.workers[i].handle(event);
        for effect in effects {
            let w = &self.workers[i];
            let (pid, generation, slot) = (w.pid.as_raw(), w.generation, w.slot);
            match effect {
                Effect::BecameReady => {
                    info!(self.log, "worker ready"; "generation" => generation, "pid" => pid);
                    if generation == self.generation {
                        if let Some(s) = self.slots.get_mut(slot) {
                            s.ready_once = true;
                        }
                    }
                    if generation == self.generation && self.phase == Phase::Running {
                        let lived = w.started.elapsed();
                        debug!(self.log, "restarted worker ready"; "lived_ms" => clock::ms(lived));
                    }
                }
                Effect::StartTimedOut => {
                    let tail = tail_of(w);
                    let reason = format!(
                        "worker pid {pid} did not become ready within {}",
                        humantime::format_duration(self.config_of(generation).worker.start_timeout)
                    );
                    self.generation_failed(generation, slot, reason, tail);
                }
                Effect::Gone { status, expected } => {
                    if expected {
                        info!(self.log, "worker exited"; "status" => status.to_string(), "generation" => generation, "pid" => pid);
                    } else {
                        let (lived, tail) = (w.started.elapsed(), tail_of(w));
                        let reason = format!("worker pid {pid} {status} during start-up");
                        self.worker_died(generation, slot, pid, status, lived, reason, tail, was_ready);
                    }
                }
                Effect::SendStopSignal | Effect::KillGroup => {}
            }
        }
    }

    fn config_of(&self, generation: u64) -> Rc<Config> {
        match &self.reload {
            Some(r) if r.generation == generation => Rc::clone(&r.config),
            _ => Rc::clone(&self.config),
        }
    }

    /// A worker exited on its own.
    #[allow(clippy::too_many_arguments)]
    fn worker_died(
        &mut self,
        generation: u64,
        slot: usize,
        pid: i32,
        status: ExitStatus,
        lived: Duration,
        reason: String,
        tail: Vec<String>,
        was_ready: bool,
    ) {
        let starting_gen = match (&self.reload, self.phase) {
            (Some(r), _) if r.generation == generation => true,
            // During the first start, a worker that had become ready and then exits crashed:
            // it is restarted like any crash; only one that never became ready fails the start.
            (_, Phase::Starting) => generation == self.generation && !was_ready,
            _ => false,
        };
        if starting_gen {
            self.generation_failed(generation, slot, reason, tail);
            return;
        }
        if generation != self.generation || self.phase == Phase::Stopping {
            info!(self.log, "worker exited"; "status" => status.to_string(), "generation" => generation, "pid" => pid);
            return;
        }
        let restart = match self.config.worker.restart {
            Restart::Always => true,
            Restart::OnFailure => !status.success(),
            Restart::Never => false,
        };
        if !restart {
            warn!(self.log, "worker exited; not restarting (restart policy)"; "status" => status.to_string(), "generation" => generation, "pid" => pid);
            self.exit_code = if status.success() { 0 } else { 1 };
            self.stop_if_nothing_left();
            return;
        }
        self.schedule_restart(slot, lived);
        let delay = self.slots[slot]
            .restart_at
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        warn!(self.log, "worker exited unexpectedly; restarting";
            "in_ms" => clock::ms(delay), "status" => status.to_string(), "generation" => generation, "pid" => pid);
    }

    /// Under `restart = "on-failure"` or `"never"`, the master stops once no worker is left to
    /// serve: none of the serving generation alive or due to restart, and no reload under way
    /// (a starting generation is live: if it commits, it serves; if it fails, this is asked
    /// again).
    fn stop_if_nothing_left(&mut self) {
        if self.phase != Phase::Running || self.reload.is_some() {
            return;
        }
        let serving = self.workers.iter().any(|w| {
            w.generation == self.generation
                && w.state.is_alive()
                && !matches!(w.state, State::Stopping { .. } | State::Killed)
        });
        let restarting = self.slots.iter().any(|s| s.restart_at.is_some());
        if !serving && !restarting {
            info!(self.log, "no workers left and none to restart: stopping");
            self.begin_stop();
        }
    }

    fn schedule_restart(&mut self, slot: usize, lived: Duration) {
        let s = &mut self.slots[slot];
        if lived >= BACKOFF_RESET {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        let delay = BACKOFF_MIN
            .saturating_mul(1u32 << (s.failures - 1).min(20))
            .min(BACKOFF_MAX);
        s.restart_at = Some(clock::from_now(delay));
    }

    /// A worker of a starting generation failed: record it; `advance` acts on it.
    fn generation_failed(&mut self, generation: u64, slot: usize, reason: String, tail: Vec<String>) {
        match &mut self.reload {
            Some(r) if r.generation == generation => {
                r.failure.get_or_insert(Failure { reason, tail });
            }
            _ if self.phase == Phase::Starting && generation == self.generation => {
                self.start_failure.get_or_insert(Failure { reason, tail });
            }
            _ if generation == self.generation && self.phase == Phase::Running => {
                // A restarted worker that never became ready: a crash like any other.
                warn!(self.log, "{}", reason; "generation" => generation);
                self.schedule_restart(slot, Duration::ZERO);
            }
            _ => {}
        }
    }

    fn log_failure(&self, what: &str, generation: u64, f: &Failure) {
        error!(self.log, "{}: {}", what, f.reason; "generation" => generation);
        for line in &f.tail {
            error!(self.log, "  | {}", line; "generation" => generation);
        }
    }

    /// The generation logic: runs after every turn of the loop.
    fn advance(&mut self) {
        match self.phase {
            Phase::Starting => {
                if let Some(f) = self.start_failure.take() {
                    self.log_failure("start failed", self.generation, &f);
                    let mut report = f.reason.clone();
                    for line in &f.tail {
                        report.push_str("\n| ");
                        report.push_str(line);
                    }
                    self.report_start(Err(report));
                    self.exit_code = 1;
                    self.begin_stop();
                } else if self.slots.iter().all(|s| s.ready_once) {
                    // Every position has had a ready worker, even if one has crashed since (it
                    // is being restarted): the start succeeded.
                    self.phase = Phase::Running;
                    info!(self.log, "ready"; "workers" => self.config.worker.count, "generation" => self.generation);
                    self.report_start(Ok(()));
                    self.tell_systemd(format!("READY=1\nSTATUS={}", self.serving_status()));
                }
            }
            Phase::Running => {
                if let Some(r) = &self.reload {
                    if r.failure.is_some() {
                        self.fail_reload();
                    } else if self.ready_count(r.generation) == r.config.worker.count {
                        self.commit_reload();
                    }
                }
            }
            Phase::Stopping => {}
        }
        // A reload asked for during the start or another reload: now, in the same turn as the
        // start or that reload ended (the loop may sleep until the next event otherwise).
        if self.reload.is_none() && self.reload_again && self.phase == Phase::Running {
            self.reload_again = false;
            self.start_reload();
        }
    }

    fn ready_count(&self, generation: u64) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == generation && w.state == State::Ready)
            .count()
    }

    /// A reload asked for by SIGHUP (`from` = None) or by a control client.
    fn request_reload(&mut self, from: Option<usize>, if_generation: Option<u64>) {
        let reply_err = |m: &mut Master, msg: String| {
            info!(m.log, "{}", msg);
            if let Some(c) = from {
                m.conns[c].send(&Reply::err(msg, Value::Null));
            }
        };
        if self.phase == Phase::Stopping {
            return reply_err(self, "reload refused: the master is stopping".into());
        }
        if let Some(n) = if_generation {
            if n != self.generation || self.phase == Phase::Starting {
                return reply_err(
                    self,
                    format!(
                        "reload refused: generation {n} is not serving (generation {} is)",
                        self.generation
                    ),
                );
            }
        }
        // Which attempt will answer this request: the one under way if the caller only wants
        // "a reload from generation N" and it is one; otherwise the next one to start (the
        // config may have changed since the current attempt read it).
        let busy = self.reload.is_some() || self.phase == Phase::Starting;
        let attempt = if busy && if_generation.is_some() && self.reload.is_some() {
            self.attempt
        } else {
            self.attempt + 1
        };
        if let Some(c) = from {
            self.conns[c].waiting = Some(Waiting::Reload { attempt });
        }
        if busy && attempt > self.attempt {
            info!(self.log, "reload requested while busy; one more will follow");
            self.reload_again = true;
            self.progress(attempt, "a reload is under way; this one will follow it".into());
        } else if !busy {
            self.start_reload();
        }
    }

    /// Tell systemd, if it is listening.
    fn tell_systemd(&self, message: String) {
        if let Some(s) = &self.systemd {
            s.send(&message);
        }
    }

    fn serving_status(&self) -> String {
        let n = self.config.worker.count;
        format!(
            "generation {} serving ({n} worker{})",
            self.generation,
            if n == 1 { "" } else { "s" }
        )
    }

    /// Send a progress line to every client waiting for reload attempt `attempt`.
    fn progress(&mut self, attempt: u64, message: String) {
        let reply = Reply::progress(message);
        for c in &mut self.conns {
            if c.waiting == Some(Waiting::Reload { attempt }) {
                c.send(&reply);
            }
        }
    }

    /// The current attempt ended: answer everyone waiting for it.
    fn finish_reload(&mut self, outcome: Result<(String, Value), (String, Value)>) {
        let attempt = self.attempt;
        let reply = match outcome {
            Ok((m, data)) => Reply::ok(m, data),
            Err((m, data)) => Reply::err(m, data),
        };
        for c in &mut self.conns {
            if c.waiting == Some(Waiting::Reload { attempt }) {
                c.waiting = None;
                c.send(&reply);
            }
        }
    }

    fn start_reload(&mut self) {
        self.attempt += 1;
        let generation = self.next_generation;
        info!(self.log, "reloading"; "generation" => generation);
        self.tell_systemd(format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading: starting generation {generation}",
            monotonic_usec()
        ));
        self.progress(self.attempt, format!("reading {}", self.config.path.display()));
        let fail = |m: &mut Master, msg: String| {
            error!(m.log, "{}", msg; "generation" => generation);
            m.tell_systemd(format!("READY=1\nSTATUS={msg}; {}", m.serving_status()));
            m.finish_reload(Err((msg, json!({ "generation": m.generation }))));
        };
        let config = match config::load_with(&self.config.path, config::Checks::Reload) {
            Ok(c) => Rc::new(c),
            Err(e) => return fail(self, format!("reload failed: invalid config; nothing changed: {e}")),
        };
        if config.master != self.config.master {
            warn!(
                self.log,
                "[master] settings changed; they take effect at the next start, not on reload"
            );
        }
        let mut listeners = Vec::with_capacity(config.listen.len());
        for lc in &config.listen {
            match self.listeners.iter().find(|l| l.addr() == &lc.addr) {
                Some(kept) => listeners.push(Rc::clone(kept)),
                None => match Listener::bind(lc) {
                    Ok(l) => {
                        info!(self.log, "listening"; "addr" => l.local_addr(), "name" => &lc.name);
                        listeners.push(Rc::new(l));
                    }
                    Err(e) => return fail(self, format!("reload failed; nothing changed: {e}")),
                },
            }
        }
        if let Err(e) = crate::worker::spawn::check_credentials(&config.worker) {
            return fail(self, format!("reload failed; nothing changed: {e}"));
        }
        let new_owner = config.worker.credentials.as_ref().map(|c| c.uid);
        // Workers running as root can write to it whoever owns it.
        if new_owner.is_some() && new_owner != self.config.worker.credentials.as_ref().map(|c| c.uid) {
            if let Err(e) = self.notify.set_owner(new_owner) {
                return fail(self, format!("reload failed; nothing changed: {e}"));
            }
        }
        self.next_generation += 1;
        self.reload = Some(Reload {
            generation,
            config: Rc::clone(&config),
            listeners: listeners.clone(),
            failure: None,
        });
        self.progress(
            self.attempt,
            format!("starting generation {generation} ({} workers)", config.worker.count),
        );
        self.spawn_generation(config, listeners, generation);
    }

    /// Start every worker of a generation; the first that cannot be started fails it.
    fn spawn_generation(&mut self, config: Rc<Config>, listeners: Vec<Rc<Listener>>, generation: u64) {
        // Workers may take up to start_timeout to be ready: let systemd wait that long too.
        let extend = config.worker.start_timeout.saturating_add(Duration::from_secs(5));
        self.tell_systemd(format!("EXTEND_TIMEOUT_USEC={}", extend.as_micros()));
        for slot in 0..config.worker.count {
            if let Err(reason) = self.spawn_worker(&config, &listeners, generation, slot) {
                self.generation_failed(generation, slot, reason, vec![]);
                break;
            }
        }
    }

    fn commit_reload(&mut self) {
        let Some(r) = self.reload.take() else { return };
        let old = self.generation;
        let now = Instant::now();
        for i in 0..self.workers.len() {
            if self.workers[i].generation != r.generation {
                self.feed(i, Event::Stop(now));
            }
        }
        // Kept listeners take the new file mode, owner and backlog in place.
        for (lc, l) in r.config.listen.iter().zip(&r.listeners) {
            if let Err(e) = l.update(lc) {
                warn!(self.log, "could not apply listener settings: {}", e);
            }
        }
        self.config = r.config;
        self.listeners = r.listeners;
        self.generation = r.generation;
        self.slots = vec![Slot::default(); self.config.worker.count];
        info!(self.log, "reload complete"; "old_generation" => old, "workers" => self.config.worker.count, "generation" => self.generation);
        let message = format!(
            "reloaded: generation {} serving ({} workers); generation {old} signalled to stop",
            self.generation, self.config.worker.count
        );
        self.tell_systemd(format!("READY=1\nSTATUS={}", self.serving_status()));
        self.finish_reload(Ok((
            message,
            json!({ "generation": self.generation, "old_generation": old }),
        )));
        self.limit_draining();
    }

    /// Keep at most `max_draining` old generations stopping; kill the oldest beyond that.
    fn limit_draining(&mut self) {
        let mut draining: Vec<u64> = self
            .workers
            .iter()
            .filter(|w| w.generation != self.generation && matches!(w.state, State::Stopping { .. }))
            .map(|w| w.generation)
            .collect();
        draining.sort_unstable();
        draining.dedup();
        let max = self.config.master.max_draining;
        if draining.len() <= max {
            return;
        }
        for &generation in &draining[..draining.len() - max] {
            warn!(self.log, "too many generations draining: killing the oldest"; "max_draining" => max, "generation" => generation);
            for i in 0..self.workers.len() {
                if self.workers[i].generation == generation {
                    self.feed(i, Event::Kill);
                }
            }
        }
    }

    fn fail_reload(&mut self) {
        let Some(mut r) = self.reload.take() else { return };
        for i in 0..self.workers.len() {
            if self.workers[i].generation == r.generation {
                self.feed(i, Event::Kill);
            }
        }
        // The notify socket was given to the new generation's user: give it back to the
        // serving one's, or its next restarted worker could not say READY=1.
        let new_owner = r.config.worker.credentials.as_ref().map(|c| c.uid);
        if new_owner.is_some() && new_owner != self.config.worker.credentials.as_ref().map(|c| c.uid) {
            if let Err(e) = self
                .notify
                .set_owner(self.config.worker.credentials.as_ref().map(|c| c.uid))
            {
                error!(
                    self.log,
                    "could not give the notify socket back to the serving workers' user: {}", e
                );
            }
        }
        let f = r.failure.take().unwrap_or(Failure {
            reason: "unknown".into(),
            tail: vec![],
        });
        self.log_failure("reload failed", r.generation, &f);
        info!(self.log, "still serving"; "generation" => self.generation);
        let message = format!(
            "reload failed: {}; generation {} keeps serving",
            f.reason, self.generation
        );
        self.tell_systemd(format!("READY=1\nSTATUS={message}"));
        self.finish_reload(Err((
            message,
            json!({ "generation": self.generation, "failed_generation": r.generation, "tail": f.tail }),
        )));
        // Workers of the serving generation that exited (and were not restarted, by policy)
        // while this reload was under way leave nothing to serve now.
        self.stop_if_nothing_left();
    }

    fn begin_stop(&mut self) {
        if self.phase == Phase::Starting {
            self.report_start(Err("the master was stopped during start-up".into()));
        }
        self.phase = Phase::Stopping;
        self.tell_systemd("STOPPING=1\nSTATUS=stopping".into());
        // Every reload a client still waits for, under way or queued, will not happen.
        self.reload = None;
        let cancelled = Reply::err("reload cancelled: the master is stopping", Value::Null);
        for c in &mut self.conns {
            if matches!(c.waiting, Some(Waiting::Reload { .. })) {
                c.waiting = None;
                c.send(&cancelled);
            }
        }
        self.reload_again = false;
        if let Some(check) = self.upgrade_check.take() {
            let _ = nix::sys::signal::killpg(check.pid, Signal::SIGKILL);
        }
        self.finish_upgrade(Reply::err("upgrade cancelled: the master is stopping", Value::Null));
        for s in &mut self.slots {
            s.restart_at = None;
        }
        let now = Instant::now();
        for i in 0..self.workers.len() {
            self.feed(i, Event::Stop(now));
        }
    }

    /// Accept control connections, read requests, write replies, expire slow clients.
    fn serve_control(&mut self, ready: &[RawFd]) {
        let now = Instant::now();
        if self.control_paused_until.is_some_and(|t| t <= now) {
            self.control_paused_until = None;
        }
        if ready.binary_search(&self.control.raw_fd()).is_ok() && self.control_paused_until.is_none() {
            let my_uid = nix::unistd::geteuid().as_raw();
            let room = MAX_CONTROL_CONNS.saturating_sub(self.conns.len());
            let (accepted, error) = self.control.accept(now, room);
            if let Some(e) = error {
                warn!(self.log, "control: accept failed; not accepting for {}ms", CONTROL_BACKOFF.as_millis();
                    "error" => describe_io(&e), "connections" => self.conns.len());
                self.control_paused_until = Some(clock::after(now, CONTROL_BACKOFF));
            }
            for mut c in accepted {
                match c.peer_uid {
                    Some(uid) if uid == 0 || uid == my_uid => self.conns.push(c),
                    other => {
                        let uid = other.map_or("unknown".to_string(), |u| u.to_string());
                        warn!(self.log, "control: refused a client"; "uid" => &uid, "peer_pid" => c.peer_pid);
                        c.send(&Reply::err(
                            format!(
                                "permission denied: uid {uid} may not control this master (only root and uid {my_uid})"
                            ),
                            Value::Null,
                        ));
                    }
                }
            }
        }
        for i in 0..self.conns.len() {
            let fd = self.conns[i].raw_fd();
            if ready.binary_search(&fd).is_err() {
                continue;
            }
            self.conns[i].flush();
            if self.conns[i].wants_read() {
                match self.conns[i].read() {
                    Input::Nothing => {}
                    Input::Bad(msg) => {
                        warn!(self.log, "control: bad request"; "error" => &msg);
                        self.conns[i].send(&Reply::err(msg, Value::Null));
                    }
                    Input::Request(req) => self.handle_request(i, req),
                }
            }
        }
        for c in &mut self.conns {
            if c.deadline.is_some_and(|d| d <= now) {
                c.deadline = None;
                c.send(&Reply::err(
                    format!(
                        "request timed out: no complete request line within {:?}",
                        crate::control::REQUEST_TIMEOUT
                    ),
                    Value::Null,
                ));
            }
        }
        // Connections that ended are dropped at the top of the next loop turn, before poll.
    }

    fn handle_request(&mut self, i: usize, req: Request) {
        debug!(self.log, "control request"; "request" => format!("{req:?}"));
        match req {
            Request::Status {} => {
                let status = self.status();
                self.conns[i].send(&Reply::ok("status", status));
            }
            Request::ReopenLogs {} => {
                let reply = match self.reopen_logs() {
                    Ok(()) => Reply::ok("log reopened", Value::Null),
                    Err(e) => Reply::err(e, Value::Null),
                };
                self.conns[i].send(&reply);
            }
            Request::Reload { if_generation } => self.request_reload(Some(i), if_generation),
            Request::Upgrade {} => self.upgrade(Some(i)),
            Request::Stop {} => {
                self.conns[i].waiting = Some(Waiting::Stop);
                let n = self.workers.iter().filter(|w| w.state.is_alive()).count();
                self.conns[i].send(&Reply::progress(format!(
                    "stopping master pid {} and {n} worker{}",
                    std::process::id(),
                    if n == 1 { "" } else { "s" }
                )));
                if self.phase != Phase::Stopping {
                    info!(self.log, "stopping"; "requested_by" => "control socket");
                    self.begin_stop();
                }
            }
        }
    }

    /// What `zdd status` shows.
    fn status(&self) -> Value {
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|w| {
                let restarts = if w.generation == self.generation {
                    self.slots.get(w.slot).map_or(0, |s| s.restarts)
                } else {
                    0
                };
                json!({
                    "pid": w.pid.as_raw(),
                    "generation": w.generation,
                    "slot": w.slot,
                    "state": w.state.name(),
                    "started": unix(w.started_wall),
                    "uptime_secs": w.started.elapsed().as_secs(),
                    "restarts": restarts,
                    "status": w.status_text,
                })
            })
            .collect();
        let listeners: Vec<Value> = self
            .config
            .listen
            .iter()
            .zip(&self.listeners)
            .map(|(lc, l)| json!({ "name": lc.name, "address": l.local_addr() }))
            .collect();
        json!({
            "pid": std::process::id(),
            "config": self.config.path.display().to_string(),
            "started": unix(self.started_wall),
            "uptime_secs": self.started_at.elapsed().as_secs(),
            "phase": match self.phase { Phase::Starting => "starting", Phase::Running => "running", Phase::Stopping => "stopping" },
            "generation": self.generation,
            "reloading": self.reload.as_ref().map(|r| r.generation),
            "workers": workers,
            "listeners": listeners,
            "log": self.sink.status(),
        })
    }
}

/// `zdd upgrade-check` of the new binary, running as a child of the master.
struct UpgradeCheck {
    pid: Pid,
    /// Its stdout and stderr, read once it has exited.
    output: std::fs::File,
    deadline: Instant,
}

impl Master {
    /// Why an upgrade cannot start now, if it cannot.
    fn upgrade_refusal(&self) -> Option<&'static str> {
        match (self.phase, &self.reload) {
            (Phase::Starting, _) => Some("the first generation is still starting"),
            (Phase::Stopping, _) => Some("the master is stopping"),
            (Phase::Running, Some(_)) => Some("a reload is under way"),
            (Phase::Running, None) => None,
        }
    }

    /// Answer every client waiting for the upgrade.
    fn finish_upgrade(&mut self, reply: Reply) {
        for c in &mut self.conns {
            if c.waiting == Some(Waiting::Upgrade) {
                c.waiting = None;
                c.send(&reply);
            }
        }
    }

    fn refuse_upgrade(&mut self, msg: String) {
        warn!(self.log, "{}", msg);
        self.finish_upgrade(Reply::err(msg, Value::Null));
    }

    /// An upgrade asked for by SIGUSR2 (`from` = None) or a control client: first check the
    /// new binary (asynchronously: the loop goes on), then re-execute it.
    fn upgrade(&mut self, from: Option<usize>) {
        if let Some(i) = from {
            self.conns[i].waiting = Some(Waiting::Upgrade);
        }
        if self.upgrade_check.is_some() {
            return self.progress_upgrade("an upgrade is under way; this one shares its outcome".into());
        }
        if let Some(why) = self.upgrade_refusal() {
            return self.refuse_upgrade(format!("upgrade refused: {why}"));
        }
        let exe = self.exe.clone();
        info!(self.log, "upgrade: checking the new binary"; "exe" => exe.display().to_string());
        self.progress_upgrade(format!("checking {}", exe.display()));
        match spawn_upgrade_check(&exe) {
            Ok((pid, output)) => {
                self.upgrade_check = Some(UpgradeCheck {
                    pid,
                    output,
                    deadline: clock::from_now(upgrade::CHECK_TIMEOUT),
                })
            }
            Err(e) => self.refuse_upgrade(format!(
                "upgrade refused: cannot run {} upgrade-check: {e}; the master carries on unchanged",
                exe.display()
            )),
        }
    }

    fn progress_upgrade(&mut self, message: String) {
        let reply = Reply::progress(message);
        for c in &mut self.conns {
            if c.waiting == Some(Waiting::Upgrade) {
                c.send(&reply);
            }
        }
    }

    /// The check child exited (reaped) or timed out (`status` = None).
    fn upgrade_checked(&mut self, status: Option<ExitStatus>) {
        let Some(mut check) = self.upgrade_check.take() else {
            return;
        };
        let exe = self.exe.display().to_string();
        let mut output = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(&mut check.output, 4096), &mut output);
        let said = String::from_utf8_lossy(&output).trim().replace('\n', " | ");
        let said = if said.is_empty() { "no output".to_string() } else { said };
        let failure = match status {
            None => {
                let _ = nix::sys::signal::killpg(check.pid, Signal::SIGKILL);
                Some(format!(
                    "{exe} upgrade-check did not answer within {}",
                    humantime::format_duration(upgrade::CHECK_TIMEOUT)
                ))
            }
            Some(st) if !st.success() => Some(format!("{exe} upgrade-check {st}: {said}")),
            Some(_) if !said.starts_with("zdd ") => Some(format!("{exe} upgrade-check answered {said:?}")),
            Some(_) => None,
        };
        if let Some(f) = failure {
            return self.refuse_upgrade(format!("upgrade refused: {f}; the master carries on unchanged"));
        }
        // The loop went on while the check ran: a reload or stop may have begun meanwhile.
        if let Some(why) = self.upgrade_refusal() {
            return self.refuse_upgrade(format!("upgrade refused: {why}"));
        }
        info!(self.log, "upgrade: the new binary answered"; "answer" => &said);
        self.progress_upgrade(said);
        self.exec_upgrade();
    }

    /// Re-execute the master's binary in place, keeping sockets, workers and their pipes.
    fn exec_upgrade(&mut self) {
        let from = self.conns.iter().position(|c| c.waiting == Some(Waiting::Upgrade));
        let now = Instant::now();
        let ms_left = |t: Instant| clock::ms(t.saturating_duration_since(now));
        let mut all: Vec<Rc<Listener>> = Vec::new();
        let mut index = |l: &Rc<Listener>| match all.iter().position(|x| Rc::ptr_eq(x, l)) {
            Some(i) => i,
            None => {
                all.push(Rc::clone(l));
                all.len() - 1
            }
        };
        let current: Vec<usize> = self.listeners.iter().map(&mut index).collect();
        let unix_ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, clock::ms);
        let workers: Vec<upgrade::WorkerState> = self
            .workers
            .iter()
            .filter(|w| w.state.is_alive())
            .map(|w| {
                use upgrade::WorkerPhase as P;
                let (state, remaining_ms, ready_in_ms) = match w.state {
                    State::Starting { deadline, ready_at } => {
                        (P::Starting, Some(ms_left(deadline)), ready_at.map(ms_left))
                    }
                    State::Ready => (P::Ready, None, None),
                    State::Stopping { kill_at } => (P::Stopping, Some(ms_left(kill_at)), None),
                    State::Killed | State::Exited(_) => (P::Killed, None, None),
                };
                upgrade::WorkerState {
                    pid: w.pid.as_raw(),
                    generation: w.generation,
                    slot: w.slot,
                    state,
                    remaining_ms,
                    ready_in_ms,
                    uptime_ms: clock::ms(w.started.elapsed()),
                    started_wall_ms: unix_ms(w.started_wall),
                    stop_signal: w.stop_signal as i32,
                    stop_timeout_ms: clock::ms(w.stop_timeout),
                    pipes: w
                        .pipes
                        .iter()
                        .filter(|p| !p.is_eof())
                        .map(|p| (stream_name(p.stream), p.raw_fd(), p.partial().to_vec()))
                        .collect(),
                    listeners: w._listeners.iter().map(&mut index).collect(),
                    tail: w.tail.iter().cloned().collect(),
                    status_text: w.status_text.clone(),
                    cgroup: w.cgroup.as_ref().map(|c| c.path().to_path_buf()),
                }
            })
            .collect();
        let state = upgrade::State {
            version: upgrade::STATE_VERSION,
            from_version: env!("CARGO_PKG_VERSION").into(),
            exe: self.exe.clone(),
            config_path: self.config.path.clone(),
            config_text: self.config.source.clone(),
            generation: self.generation,
            next_generation: self.next_generation,
            attempt: self.attempt,
            uptime_ms: clock::ms(self.started_at.elapsed()),
            started_wall_ms: unix_ms(self.started_wall),
            notify_fd: self.notify.raw_fd(),
            control_fd: self.control.raw_fd(),
            pid_file: self.pid_file.to_state(),
            listeners: all
                .iter()
                .map(|l| {
                    let (fd, addr, created, backlog) = l.to_state();
                    upgrade::ListenerState {
                        fd,
                        addr,
                        created,
                        backlog,
                    }
                })
                .collect(),
            current,
            workers,
            slots: self
                .slots
                .iter()
                .map(|s| upgrade::SlotState {
                    failures: s.failures,
                    restarts: s.restarts,
                    restart_in_ms: s.restart_at.map(ms_left),
                })
                .collect(),
            orphan_pipes: self
                .orphan_pipes
                .iter()
                .map(|(pid, g, p)| (pid.as_raw(), *g, stream_name(p.stream), p.raw_fd()))
                .collect(),
            orphan_partials: self.orphan_pipes.iter().map(|(_, _, p)| p.partial().to_vec()).collect(),
            reply_fd: from.map(|i| self.conns[i].raw_fd()),
            worker_nofile: self.worker_nofile,
            cgroups: self.cgroups.handover(),
            config: Some(crate::config_state::ConfigState::from(&*self.config)),
            notify_path: Some(self.notify.path().to_path_buf()),
            control_path: Some(self.control.path().to_path_buf()),
            log: None,
        };
        info!(self.log, "upgrading: re-executing the master"; "exe" => self.exe.display().to_string());
        if let Some(i) = from {
            self.conns[i].send(&Reply::progress(format!("re-executing {}", self.exe.display())));
        }
        // What the log has not taken yet is handed over, not waited for: taken last, so that
        // it holds every record up to the exec.
        self.sink.write_pending();
        let mut state = state;
        state.log = Some(self.sink.handover());
        let reason = upgrade::exec(&state);
        let msg = format!("upgrade failed: {reason}; the master carries on unchanged");
        error!(self.log, "{}", msg);
        self.finish_upgrade(Reply::err(msg, Value::Null));
    }

    /// The new image after an upgrade, first step: everything that can fail, before any
    /// handed-over fd is taken over (so that a failure can still roll back to the old image
    /// with every fd open): the running config, the log, the signal handlers.
    fn prepare_resume(state: &mut upgrade::State) -> Result<Resumed, String> {
        if std::env::var_os(FAULT_ENV).is_some_and(|v| v == "resume") {
            return Err(format!(
                "{FAULT_ENV}=resume: failing the resume on purpose (fault injection)"
            ));
        }
        let config = match &state.config {
            Some(c) => c
                .clone()
                .into_config()
                .map_err(|e| format!("the running config handed over: {e}"))?,
            // Version 1: only the text was handed over.
            None => config::parse(&state.config_path, &state.config_text).map_err(|e| e.to_string())?,
        };
        let signals = Signals::install().map_err(|e| format!("installing signal handlers: {e}"))?;
        // Last: the log takes over its handed-over fd, and nothing may fail after that.
        let (log, sink) = match state.log.take() {
            Some(l) => crate::log::resume(l, config.master.log_format),
            None => crate::log::build(&config.master.log, config.master.log_format)
                .map_err(|e| format!("opening log {:?}: {}", config.master.log, describe_io(&e)))?,
        };
        Ok(Resumed {
            config: Rc::new(config),
            log,
            sink,
            signals,
        })
    }

    /// The new image after an upgrade, second step: the same master, rebuilt around the fds it
    /// was handed. Nothing here can fail.
    fn resume(state: upgrade::State, prepared: Resumed, rolled_back: Option<String>) -> Master {
        let Resumed {
            config,
            log,
            sink,
            signals,
        } = prepared;
        let all: Vec<Rc<Listener>> = state
            .listeners
            .into_iter()
            .map(|l| Rc::new(Listener::from_state(upgrade::own(l.fd), l.addr, l.created, l.backlog)))
            .collect();
        let now = Instant::now();
        let wall = clock::wall_ms;
        let workers = state
            .workers
            .into_iter()
            .map(|w| {
                use upgrade::WorkerPhase as P;
                let state = match w.state {
                    P::Starting => State::Starting {
                        deadline: clock::after(now, Duration::from_millis(w.remaining_ms.unwrap_or(0))),
                        ready_at: w.ready_in_ms.map(|ms| clock::after(now, Duration::from_millis(ms))),
                    },
                    P::Ready => State::Ready,
                    P::Stopping => State::Stopping {
                        kill_at: clock::after(now, Duration::from_millis(w.remaining_ms.unwrap_or(0))),
                    },
                    P::Killed => State::Killed,
                };
                Worker {
                    pid: Pid::from_raw(w.pid),
                    generation: w.generation,
                    slot: w.slot,
                    state,
                    started: now.checked_sub(Duration::from_millis(w.uptime_ms)).unwrap_or(now),
                    started_wall: wall(w.started_wall_ms),
                    stop_signal: Signal::try_from(w.stop_signal).unwrap_or(Signal::SIGTERM),
                    stop_timeout: Duration::from_millis(w.stop_timeout_ms),
                    pipes: w
                        .pipes
                        .into_iter()
                        .map(|(s, fd, partial)| Pipe::resume(upgrade::own(fd), stream_of(s), partial))
                        .collect(),
                    tail: w.tail.into_iter().collect(),
                    status_text: w.status_text,
                    _listeners: w.listeners.iter().filter_map(|&i| all.get(i).cloned()).collect(),
                    cgroup: w.cgroup.map(crate::worker::cgroup::WorkerCgroup::from_path),
                }
            })
            .collect();
        // The old image blocked the handled signals for the exec; our handlers are in place now.
        // SAFETY: an empty sigset_t initialised by sigemptyset.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        }
        let m = &config.master;
        let (pid_fd, pid_path, pid_ino) = state.pid_file;
        let mut conns = Vec::new();
        if let Some(fd) = state.reply_fd {
            conns.push(Conn::from_fd(upgrade::own(fd)));
        }
        // The sockets stay where they are bound, whatever [master] says now.
        let notify_path = state.notify_path.clone().unwrap_or_else(|| m.notify_socket.clone());
        let control_path = state.control_path.clone().unwrap_or_else(|| m.control_socket.clone());
        let cgroups = crate::worker::cgroup::Cgroups::resume(&log, state.cgroups, &pid_path);
        let mut master = Master {
            cgroups,
            notify: NotifyServer::from_fd(upgrade::own(state.notify_fd), &notify_path),
            control: ControlServer::from_fd(upgrade::own(state.control_fd), &control_path),
            pid_file: PidFile::from_state(upgrade::own(pid_fd), pid_path, pid_ino),
            log,
            lines: LineBatch::new(sink.clone(), config.master.log_format),
            sink,
            listeners: state.current.iter().filter_map(|&i| all.get(i).cloned()).collect(),
            config,
            generation: state.generation,
            next_generation: state.next_generation,
            workers,
            slots: state
                .slots
                .into_iter()
                .map(|s| Slot {
                    ready_once: true,
                    failures: s.failures,
                    restarts: s.restarts,
                    restart_at: s.restart_in_ms.map(|ms| clock::after(now, Duration::from_millis(ms))),
                })
                .collect(),
            reload: None,
            reload_again: false,
            start_failure: None,
            phase: Phase::Running,
            exit_code: 0,
            orphan_pipes: {
                let mut partials = state.orphan_partials.into_iter();
                state
                    .orphan_pipes
                    .into_iter()
                    .map(|(pid, g, s, fd)| {
                        let partial = partials.next().unwrap_or_default();
                        (
                            Pid::from_raw(pid),
                            g,
                            Pipe::resume(upgrade::own(fd), stream_of(s), partial),
                        )
                    })
                    .collect()
            },
            signals,
            started_at: now.checked_sub(Duration::from_millis(state.uptime_ms)).unwrap_or(now),
            started_wall: wall(state.started_wall_ms),
            attempt: state.attempt,
            start_report: None,
            exe: state.exe.clone(),
            worker_nofile: state.worker_nofile,
            control_paused_until: None,
            upgrade_check: None,
            systemd: SystemdNotifier::from_env(),
            conns,
        };
        let alive = master.workers.len();
        let pid = std::process::id();
        let data = json!({ "pid": pid, "generation": master.generation });
        let reply = match rolled_back {
            Some(reason) => {
                let message = format!(
                    "upgrade failed: {reason}; rolled back to zdd {} (master pid {pid}, generation {} with {alive} worker{} kept)",
                    env!("CARGO_PKG_VERSION"),
                    master.generation,
                    if alive == 1 { "" } else { "s" }
                );
                error!(master.log, "{}", message);
                Reply::err(message, data)
            }
            None => {
                info!(master.log, "upgraded: master re-executed";
                    "from_version" => &state.from_version, "version" => env!("CARGO_PKG_VERSION"),
                    "workers" => alive, "generation" => master.generation, "pid" => pid);
                let message = format!(
                    "upgraded: master pid {pid} now runs zdd {} (was {}); generation {} with {alive} worker{} kept",
                    env!("CARGO_PKG_VERSION"),
                    state.from_version,
                    master.generation,
                    if alive == 1 { "" } else { "s" }
                );
                Reply::ok(message, data)
            }
        };
        for c in &mut master.conns {
            c.send(&reply);
        }
        master
    }
}

/// Set to `resume` to make the next upgraded image fail its resume (fault injection, for the
/// rollback's tests; removed from the environment before the rollback's exec).
pub const FAULT_ENV: &str = "ZDD_FAULT";

/// What the fallible first step of a resume prepared.
struct Resumed {
    config: Rc<Config>,
    log: Logger,
    sink: Sink,
    signals: Signals,
}

fn stream_name(s: Stream) -> upgrade::StreamName {
    match s {
        Stream::Stdout => upgrade::StreamName::Stdout,
        Stream::Stderr => upgrade::StreamName::Stderr,
    }
}

fn stream_of(s: upgrade::StreamName) -> Stream {
    match s {
        upgrade::StreamName::Stdout => Stream::Stdout,
        upgrade::StreamName::Stderr => Stream::Stderr,
    }
}

/// Start `exe upgrade-check --state-version N` in its own process group, stdout and stderr to
/// one pipe (read once it has exited). The master's reaping collects it.
fn spawn_upgrade_check(exe: &Path) -> Result<(Pid, std::fs::File), String> {
    use std::os::unix::process::CommandExt;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| format!("pipe: {}", crate::errno::describe(e)))?;
    let w2 = w.try_clone().map_err(|e| format!("dup: {}", describe_io(&e)))?;
    let child = std::process::Command::new(exe)
        .arg("upgrade-check")
        .arg("--state-version")
        .arg(upgrade::STATE_VERSION.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(w)
        .stderr(w2)
        .process_group(0)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .spawn()
        .map_err(|e| describe_io(&e))?;
    let pid = Pid::from_raw(child.id() as i32);
    // Not waited for through `child`: the loop reaps every child.
    drop(child);
    Ok((pid, std::fs::File::from(r)))
}

/// `zdd start --foreground`: load the config, run the master, return the exit code. After an
/// upgrade's exec, it resumes the master from the state handed over instead, or, if it cannot,
/// goes back to the old image.
pub fn run_foreground(config_path: &Path) -> Result<i32, StartError> {
    if let Some(taken) = upgrade::take_state() {
        let mut taken = match taken {
            Ok(t) => t,
            Err((reason, rollback)) => return Err(StartError::Other(roll_back(&reason, &rollback, &[]))),
        };
        let fds = taken.state.fds(-1);
        return match Master::prepare_resume(&mut taken.state) {
            Ok(prepared) => {
                let master = Master::resume(taken.state, prepared, taken.rolled_back);
                taken.rollback.done();
                Ok(master.run())
            }
            Err(reason) => Err(StartError::Other(roll_back(&reason, &taken.rollback, &fds))),
        };
    }
    let config = config::load(config_path)?;
    let (log, sink) = crate::log::build(&config.master.log, config.master.log_format)
        .map_err(|e| StartError::Other(format!("opening log {:?}: {}", config.master.log, describe_io(&e))))?;
    let master = Master::start(config, log, sink)?;
    Ok(master.run())
}

/// The new image failed before it was in charge: back to the old one. Returns only if that
/// is impossible, with the whole story.
fn roll_back(reason: &str, rollback: &upgrade::Rollback, fds: &[RawFd]) -> String {
    eprintln!("zdd: upgrade failed: {reason}; rolling back to the previous binary");
    std::env::remove_var(FAULT_ENV);
    if !rollback.possible() {
        return format!("resuming after a rolled-back upgrade failed too: {reason}");
    }
    let why = rollback.roll_back(reason, fds);
    format!("upgrade failed: {reason}; and the rollback failed: {why}")
}
