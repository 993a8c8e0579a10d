//! The master's event loop: one thread, the owner of every fd; the decisions are the
//! generations machine's ([`generations`]).
//!
//! Each turn of [`Master::run`] first gives the machine a Tick (due deadlines, then the
//! generation logic: the start-up succeeds or fails, a reload commits or fails, the stop ends),
//! then polls the signal self-pipe, the notify socket, the control socket and its connections
//! and every worker's log pipes, with the earliest deadline as the timeout, and turns what woke
//! it into events, in this fixed order: signals → reaping children → readiness messages →
//! control requests → log lines (the workers', then the reload hooks', hooks.rs) → due looks
//! at starting workers (`ready = "listening"`, [`readiness`]) → the workers' probes
//! (probes.rs) → the serving workers' memory with `max_rss` (care.rs) → the upgrade check's
//! deadline → the hooks' deadlines.
//!
//! The loop carries out the machine's actions ([`actions`]): spawn, signal, prepare, commit or
//! discard a reload ([`reload`]), reply, log, tell systemd; what an action produced (a pid, a
//! prepared reload, an error) goes back to the machine as an event before the next action.
//! The loop's [`Worker`]s hold only a worker's I/O (pipes, listeners, cgroup, status text),
//! keyed by pid; its state is the machine's.

use std::collections::{BTreeMap, VecDeque};
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
use crate::config::{self, Config};
use crate::control::{Conn, ControlServer, Input, Reply, Request, Waiting};
use crate::errno::describe_io;
use crate::listen::Listener;
use crate::log::{LineBatch, Sink};
use crate::pidfile::{ensure_parent, PidFile};
use crate::worker::notify::{monotonic_usec, NotifyServer, SystemdNotifier};
use crate::worker::relay::{Pipe, Stream};
use crate::worker::spawn::{spawn, SpawnSpec};
use crate::worker::{ExitStatus, Worker};
use generations::{Action, ClientId, Event, Generations, Params, Phase, StopBy};
use reload::Pending;
use signals::Signals;
use upgrade::{roll_back, UpgradeCheck};

mod actions;
mod care;
mod commands;
mod fdstore;
mod generations;
pub mod handover;
mod hooks;
mod metrics;
mod pipes;
mod probes;
mod readiness;
mod reload;
mod signals;
mod start;
mod upgrade;

pub use start::run_foreground;

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

pub struct Master {
    log: Logger,
    sink: Sink,
    /// Worker lines on their way to the log, written once per read.
    lines: LineBatch,
    /// The serving generation's config and listeners.
    config: Rc<Config>,
    listeners: Vec<Rc<Listener>>,
    /// The decisions: phase, generations, slots, the pending reload, every worker's state.
    gens: Generations,
    /// The config and listeners of the generation a reload is building.
    pending: Option<Pending>,
    /// The workers' I/O, in the order they were spawned; their state is in `gens`.
    workers: Vec<Worker>,
    /// Starting workers of `ready = "listening"` or `"auto"`, looked at until they listen.
    watches: Vec<readiness::Watch>,
    /// The socket inodes of the listeners of the generation whose workers were last started
    /// (`readiness::inodes`): computed once per generation, shared by its watches.
    inodes: Option<(u64, Rc<[u64]>)>,
    /// The machine said the stop is over: the exit code.
    exit: Option<i32>,
    /// Log pipes of reaped workers that something else (a grandchild) still holds open.
    orphan_pipes: Vec<(Pid, u64, Pipe)>,
    signals: Signals,
    notify: NotifyServer,
    control: ControlServer,
    started_at: Instant,
    started_wall: SystemTime,
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
    /// With `max_rss`: when the serving workers' memory is measured next (care.rs).
    rss_check_at: Option<Instant>,
    /// The reload hooks running (hooks.rs).
    hooks: Vec<hooks::RunningHook>,
    /// The workers' probes in flight and the schedule of `interval` probes (probes.rs).
    probes: probes::Probes,
    /// systemd's NOTIFY_SOCKET, when the master runs under systemd.
    systemd: Option<SystemdNotifier>,
    /// The listeners kept in systemd's fd store, to outlive a crash (fdstore.rs).
    fdstore: fdstore::FdStore,
    /// The workers' cgroups (cgroup.rs); removed at stop, before the pid-file lock goes.
    cgroups: crate::worker::cgroup::Cgroups,
    /// `[master] metrics`: the listener and the scrapes under way (metrics.rs).
    metrics: Option<metrics::Metrics>,
    /// Dropped after the sockets: while the pid file exists, the lock is held.
    pid_file: PidFile,
    /// The id the next control connection gets.
    next_client: u64,
    /// Declared last, so dropped last: a `zdd stop` client sees EOF only after the sockets
    /// and pid file are gone.
    conns: BTreeMap<ClientId, Conn>,
}

/// What a master is made of that differs between a fresh start (start.rs) and a resume after
/// an upgrade (upgrade.rs); [`Master::assemble`] is the one constructor both use.
struct Parts {
    log: Logger,
    sink: Sink,
    config: Rc<Config>,
    listeners: Vec<Rc<Listener>>,
    gens: Generations,
    workers: Vec<Worker>,
    orphan_pipes: Vec<(Pid, u64, Pipe)>,
    signals: Signals,
    notify: NotifyServer,
    control: ControlServer,
    cgroups: crate::worker::cgroup::Cgroups,
    metrics: Option<crate::metrics::MetricsServer>,
    pid_file: PidFile,
    started_at: Instant,
    started_wall: SystemTime,
    exe: std::path::PathBuf,
    worker_nofile: Option<(u64, u64)>,
    /// Clients waiting for the upgrade's outcome (a resume), else none.
    conns: BTreeMap<ClientId, Conn>,
}

impl Master {
    /// The one constructor: a fresh start and a resume differ only in their [`Parts`].
    fn assemble(p: Parts) -> Master {
        // A resumed worker that is still starting is looked at again.
        let now = Instant::now();
        let watches = match p.config.worker.ready.watches_listening() {
            true => p
                .workers
                .iter()
                .filter(|w| {
                    p.gens
                        .worker(w.pid)
                        .is_some_and(|m| matches!(m.state, crate::worker::State::Starting { .. }))
                })
                .map(|w| readiness::Watch::new(w, readiness::inodes(&w.listeners), 1, now))
                .collect(),
            false => Vec::new(),
        };
        Master {
            watches,
            inodes: None,
            lines: LineBatch::new(p.sink.clone(), p.config.master.log_format),
            log: p.log,
            sink: p.sink,
            config: p.config,
            listeners: p.listeners,
            gens: p.gens,
            pending: None,
            workers: p.workers,
            exit: None,
            orphan_pipes: p.orphan_pipes,
            signals: p.signals,
            notify: p.notify,
            control: p.control,
            started_at: p.started_at,
            started_wall: p.started_wall,
            start_report: None,
            exe: p.exe,
            worker_nofile: p.worker_nofile,
            control_paused_until: None,
            upgrade_check: None,
            rss_check_at: None,
            hooks: Vec::new(),
            probes: probes::Probes::default(),
            fdstore: fdstore::FdStore::new(std::env::var_os("NOTIFY_SOCKET").is_some()),
            systemd: SystemdNotifier::from_env(),
            cgroups: p.cgroups,
            metrics: p.metrics.map(metrics::Metrics::new),
            pid_file: p.pid_file,
            next_client: p.conns.len() as u64,
            conns: p.conns,
        }
    }
}

impl Master {
    /// Run until stopped; returns the process exit code.
    pub fn run(mut self) -> i32 {
        // SAFETY: prctl with integer arguments only. Per process, so set here, after any
        // daemonizing fork.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        // Before the first worker starts: a fresh start stores what systemd does not hold yet;
        // a resumed master sends its listeners again (systemd ignores the copies it holds).
        self.sync_fdstore();
        if self.gens.phase() == Phase::Starting {
            info!(self.log, "starting"; "workers" => self.config.worker.count, "generation" => 1, "pid" => std::process::id());
            // Here, not in `start`: the tree is named after the master's pid (after daemonizing).
            self.cgroups = crate::worker::cgroup::Cgroups::start(&self.log, &self.config.master.pid_file);
            self.event(Event::Start);
        }
        let code = loop {
            self.event(Event::Tick);
            if let Some(code) = self.exit {
                break code;
            }
            // Hang up on every connection whose result went out this turn, wherever it was
            // sent: a client returns when it sees the hang-up.
            self.conns.retain(|_, c| !c.dead);
            self.prepare_probes();
            self.fdstore.flush(&self.log, self.systemd.as_ref(), Instant::now());
            let ready = self.poll();
            for sig in self.signals.take() {
                self.on_signal(sig);
            }
            self.reap();
            self.cgroups.service();
            self.read_notify();
            self.serve_control(&ready);
            self.serve_metrics(&ready);
            self.pump_pipes(&ready);
            self.check_rss();
            self.pump_hooks(&ready);
            self.look_for_listening();
            self.service_probes();
            if self
                .upgrade_check
                .as_ref()
                .is_some_and(|c| c.deadline <= Instant::now())
            {
                self.upgrade_checked(None);
            }
            self.hook_deadlines();
        };
        self.shut_down(code)
    }

    /// Give the machine an event and carry out what it decides, depth first: what an action
    /// produced goes back to the machine before the next action is carried out.
    fn event(&mut self, event: Event) {
        let mut todo: VecDeque<Action> = self.gens.handle(Instant::now(), event).into();
        while let Some(action) = todo.pop_front() {
            if let Some(back) = self.carry_out(action) {
                for a in self.gens.handle(Instant::now(), back).into_iter().rev() {
                    todo.push_front(a);
                }
            }
        }
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
        for c in self.conns.values() {
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
            for fd in self.hook_fds() {
                add(&mut fds, fd);
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
        // The probes' sockets, connecting (POLLOUT) or waiting for the answer (POLLIN).
        self.probes.add_to_poll(&mut fds);
        if let Some(m) = &self.metrics {
            m.add_to_poll(&mut fds);
        }
        let timeout = self.next_deadline().map_or(-1, |d| {
            let left = d.saturating_duration_since(Instant::now());
            // Round up, so that we never wake just before a deadline and spin.
            left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32
        });
        // SAFETY: `fds` is a valid, exclusively borrowed array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n <= 0 {
            self.probes.after_poll(&[]);
            return Vec::new();
        }
        self.probes.after_poll(&fds);
        // A client that hung up while it waits for a result (it sent its request, so nothing
        // is read from it any more) would be reported on every poll, and the loop would spin
        // until the result: it is gone, drop it; the action it asked for goes on.
        for (c, p) in self.conns.values_mut().zip(&fds[3..]) {
            if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 && !c.wants_read() {
                c.dead = true;
            }
        }
        let mut ready: Vec<RawFd> = fds.iter().filter(|p| p.revents != 0).map(|p| p.fd).collect();
        ready.sort_unstable();
        ready
    }

    fn next_deadline(&self) -> Option<Instant> {
        let requests = self.conns.values().filter_map(|c| c.deadline);
        self.gens
            .next_deadline()
            .into_iter()
            .chain(requests)
            .chain(self.control_paused_until)
            .chain(self.upgrade_check.as_ref().map(|c| c.deadline))
            .chain(self.rss_check_at)
            .chain(self.next_look())
            .chain(self.probes.next_deadline())
            .chain(self.hook_deadline())
            .chain(self.fdstore.deadline())
            .chain(self.metrics.as_ref().and_then(|m| m.next_deadline()))
            .min()
    }

    fn on_signal(&mut self, sig: Signal) {
        match sig {
            Signal::SIGHUP => self.event(Event::ReloadRequested {
                from: None,
                if_generation: None,
            }),
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => self.event(Event::StopRequested {
                by: StopBy::Signal(sig),
            }),
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
            let mut left_behind = Vec::new();
            if let Some(w) = self.workers.iter().find(|w| w.pid == pid) {
                // A worker gone before it was ready that left processes behind has probably
                // daemonized itself: its failure report will say so.
                let starting = self.gens.worker(pid).is_some_and(|m| {
                    matches!(
                        m.state,
                        crate::worker::State::Starting { .. } | crate::worker::State::Probing { .. }
                    )
                });
                if starting {
                    left_behind = crate::worker::usage::members(pid, w.cgroup.as_ref().map(|c| c.path()));
                    left_behind.retain(|&p| p != pid.as_raw());
                }
                w.kill_leftovers();
            } else if self.is_hook(pid) {
                let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
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
                        if !left_behind.is_empty() {
                            self.gens.remember(
                                pid,
                                &format!(
                                    "zdd: the worker exited during start-up but left {} running (pids {:?}, now killed): \
                                     did the server daemonize itself? run it in the foreground",
                                    if left_behind.len() == 1 { "a process" } else { "processes" },
                                    left_behind
                                ),
                            );
                        }
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
        if self.is_hook(pid) {
            return self.hook_exited(pid, status);
        }
        // Everything it wrote is in its pipes now: read it before the machine judges the exit.
        if let Some(i) = self.workers.iter().position(|w| w.pid == pid) {
            self.drain_worker(i, true);
        }
        self.event(Event::WorkerExited { pid, status });
        let Some(i) = self.workers.iter().position(|w| w.pid == pid) else {
            return;
        };
        let mut w = self.workers.remove(i);
        self.watches.retain(|x| x.pid() != pid);
        self.probes.forget(pid);
        // Whatever was left in its process group was killed before reaping (`reap`); its
        // cgroup, with any descendant that escaped the group, goes with it now.
        if let Some(cg) = w.cgroup.take() {
            self.cgroups.release(cg);
        }
        for p in w.pipes.drain(..).filter(|p| !p.is_eof()) {
            self.orphan_pipes.push((w.pid, w.generation, p));
        }
    }
}
