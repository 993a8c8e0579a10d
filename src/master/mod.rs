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
use crate::errno::describe_io;
use crate::listen::Listener;
use crate::log::{LineBatch, Sink};
use crate::pidfile::{ensure_parent, PidFile};
mod commands;
#[allow(dead_code)]
pub mod generations;
pub mod handover;
mod pipes;
mod reload;
mod signals;
mod upgrade;

use crate::worker::notify::{monotonic_usec, NotifyServer, SystemdNotifier};
use crate::worker::relay::{Pipe, Stream};
use crate::worker::spawn::{spawn, SpawnSpec};
use crate::worker::{Effect, Event, ExitStatus, State, Worker};
use signals::Signals;
use upgrade::roll_back;
use upgrade::UpgradeCheck;

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
    PidFile(#[from] crate::pidfile::PidFileError),
    #[error(transparent)]
    Listen(#[from] crate::listen::ListenError),
    #[error(transparent)]
    Notify(#[from] crate::worker::notify::NotifyError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error("{0}")]
    Other(String),
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
            exe: crate::master::handover::own_exe(),
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
            listeners: listeners.to_vec(),
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
}

/// `zdd start --foreground`: load the config, run the master, return the exit code. After an
/// upgrade's exec, it resumes the master from the state handed over instead, or, if it cannot,
/// goes back to the old image.
pub fn run_foreground(config_path: &Path) -> Result<i32, StartError> {
    if let Some(taken) = handover::take_state() {
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
