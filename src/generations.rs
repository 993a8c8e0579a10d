//! The generations state machine: which worker starts, which stops, and when a reload commits
//! or fails. Pure: no syscalls, no fds, no clock reads, no logging (a log record is an
//! action like any other), so every transition is a unit test of a few lines (below).
//!
//! Theory of operation. The loop feeds [`Event`]s to [`Generations::handle`] with the time it
//! read (`now`), and carries out the [`Action`]s it returns, in order: spawning, signalling,
//! replying to control clients, logging. What an action produced (a spawned pid, a prepared
//! reload, a spawn error) comes back as another event, fed at once. Before each poll the loop
//! sends [`Event::Tick`]: due deadlines, then the generation logic (`advance`), which
//! finishes the start-up, commits or fails a reload and starts the reload that was asked for
//! meanwhile; [`Action::Exit`] from it says that stopping is over.
//!
//! Generations. Workers started together from one reading of the config form a generation.
//! The serving generation has one [`Slot`] per worker position (crash-restart back-off). A
//! reload first asks the loop to prepare the next generation ([`Action::PrepareReload`]: read
//! the config, bind new listeners), then spawns its workers one slot after the other, and
//! commits it once all of them are ready: the serving generation is asked to stop and the new
//! one takes its place. If one of the new workers exits, cannot be spawned or misses its start
//! timeout first, the whole new generation is killed and the serving one is untouched. Reload
//! requests that arrive meanwhile set `reload_again`: one more reload after this one; control
//! clients wait for an `attempt`'s outcome.
//!
//! Each worker's own state (`Starting → Ready → Stopping → Killed → Exited`) changes only
//! through [`crate::worker::transition`].

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::clock;
use crate::config::{Ready, Restart};
use crate::worker::{transition, Effect, Event as WorkerEvent, ExitStatus, State};

/// Crash back-off: 100 ms doubling up to 30 s, forgotten once a worker has lived 10 s.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
pub const BACKOFF_RESET: Duration = Duration::from_secs(10);

/// A control connection, as the loop names it (unique for the master's lifetime).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

/// What the decisions need of one reading of the config: plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub count: usize,
    pub restart: Restart,
    pub ready: Ready,
    pub start_timeout: Duration,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// `[master] max_draining` of this reading (applied at commit, see `limit_draining`).
    pub max_draining: usize,
}

impl Params {
    /// What the decisions take from a config.
    pub fn of(config: &crate::config::Config) -> Params {
        let w = &config.worker;
        Params {
            count: w.count,
            restart: w.restart,
            ready: w.ready,
            start_timeout: w.start_timeout,
            stop_signal: w.stop_signal,
            stop_timeout: w.stop_timeout,
            max_draining: config.master.max_draining,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The first generation is starting.
    Starting,
    Running,
    Stopping,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
        }
    }
}

/// Crash-restart state of one worker position of the serving generation.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Slot {
    /// A worker in this position has been ready at least once (what the first start waits for).
    pub ready_once: bool,
    pub failures: u32,
    pub restarts: u32,
    pub restart_at: Option<Instant>,
}

/// A worker as the machine knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: Pid,
    pub generation: u64,
    pub slot: usize,
    pub state: State,
    pub started: Instant,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub start_timeout: Duration,
    /// Its last lines, for failure reports (see [`Generations::remember`]).
    pub tail: std::collections::VecDeque<String>,
}

/// Who asked for a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopBy {
    /// SIGTERM, SIGINT, SIGQUIT: a second one kills every worker at once.
    Signal(Signal),
    /// `zdd stop`: a second one changes nothing.
    Control,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The master is up: spawn the first generation.
    Start,
    /// A [`Action::Spawn`] was carried out.
    WorkerSpawned {
        pid: Pid,
        generation: u64,
        slot: usize,
    },
    /// A [`Action::Spawn`] failed; `reason` is the whole message ("starting worker: …").
    SpawnFailed {
        generation: u64,
        slot: usize,
        reason: String,
    },
    /// READY=1 from the worker (or its process group).
    WorkerReady {
        pid: Pid,
    },
    /// Reaped. Its output up to its exit was given to [`Generations::remember`] first.
    WorkerExited {
        pid: Pid,
        status: ExitStatus,
    },
    /// Between two polls (after a turn's other events, before the next poll; so also right
    /// after `Start`): deadlines up to `now` are due, then the generation logic runs (the
    /// start succeeds or fails, a reload commits or fails, the reload asked for meanwhile
    /// starts). What one poll brought is judged together: a new worker that says READY=1 and
    /// exits in the same turn fails its reload. After the Tick, the loop polls with
    /// [`Generations::next_deadline`] as timeout, unless the Tick said [`Action::Exit`].
    Tick,
    /// SIGHUP (`from` = None) or a control client's reload.
    ReloadRequested {
        from: Option<ClientId>,
        if_generation: Option<u64>,
    },
    /// The [`Action::PrepareReload`] read the config and bound the listeners.
    ReloadPrepared {
        generation: u64,
        params: Params,
    },
    /// The [`Action::PrepareReload`] failed; `message` is the whole reply
    /// ("reload failed; nothing changed: …").
    ReloadPrepareFailed {
        generation: u64,
        message: String,
    },
    StopRequested {
        by: StopBy,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// A log record's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kv {
    U64(u64),
    I64(i64),
    Str(String),
}

/// What to tell systemd (the loop formats it; MONOTONIC_USEC is a clock read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Systemd {
    /// `READY=1\nSTATUS={status}`
    Ready { status: String },
    /// `RELOADING=1\nMONOTONIC_USEC=…\nSTATUS=reloading: starting generation {generation}`
    Reloading { generation: u64 },
    /// `STOPPING=1\nSTATUS=stopping`
    Stopping,
    /// `EXTEND_TIMEOUT_USEC=…`
    ExtendTimeout(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Start the worker of `slot` with generation `generation`'s config and listeners (the
    /// pending reload's if it is that one, else the serving ones); answer with
    /// [`Event::WorkerSpawned`] or [`Event::SpawnFailed`].
    Spawn {
        generation: u64,
        slot: usize,
    },
    /// Send `signal` to the worker's process group (its pid if that fails).
    Signal {
        pid: Pid,
        signal: Signal,
    },
    /// SIGKILL the worker's process group and cgroup.
    KillGroup {
        pid: Pid,
    },
    /// Read the config, bind the new listeners, check credentials, hand the notify socket to
    /// the new user; answer with [`Event::ReloadPrepared`] or [`Event::ReloadPrepareFailed`].
    PrepareReload {
        attempt: u64,
        generation: u64,
    },
    /// The prepared generation serves now: update kept listeners in place, swap config and
    /// listeners.
    CommitReload {
        generation: u64,
    },
    /// Drop the prepared config and listeners; when `failed`, give the notify socket back to
    /// the serving workers' user.
    DiscardReload {
        generation: u64,
        failed: bool,
    },
    /// A final answer to a control client.
    Reply {
        to: ClientId,
        ok: bool,
        message: String,
        data: Value,
    },
    /// A progress line to a control client.
    Progress {
        to: ClientId,
        message: String,
    },
    Log {
        level: Level,
        message: String,
        kv: Vec<(&'static str, Kv)>,
    },
    /// The first generation is ready: tell a waiting `zdd start`.
    StartSucceeded {
        generation: u64,
        workers: usize,
    },
    /// The start failed: tell a waiting `zdd start` (`failed {reason}`, then `\n| {line}` per
    /// tail line). At most one of StartSucceeded and StartFailed ever goes out.
    StartFailed {
        reason: String,
        tail: Vec<String>,
    },
    TellSystemd(Systemd),
    /// The master is stopping: kill a running upgrade check, cancel waiting upgrades.
    CancelUpgrade,
    /// Every worker is gone after a stop: leave the loop with this code.
    Exit {
        code: i32,
    },
}

/// Why a generation failed to start.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    reason: String,
    tail: Vec<String>,
}

/// A reload under way: `params` is None while the loop prepares it.
#[derive(Debug, Clone)]
struct Reload {
    generation: u64,
    params: Option<Params>,
    failure: Option<Failure>,
}

/// What an outstanding [`Action::Spawn`] was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpawnFor {
    /// One slot of a whole generation (first start or reload): the next follows once it is
    /// spawned; a failure fails the generation.
    Generation { count: usize },
    /// A crash restart: a failure backs off again.
    Restart,
}

/// The state machine.
#[derive(Debug)]
pub struct Generations {
    phase: Phase,
    generation: u64,
    next_generation: u64,
    params: Params,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    reload: Option<Reload>,
    reload_again: bool,
    attempt: u64,
    start_failure: Option<Failure>,
    /// A StartSucceeded/StartFailed went out (only one ever does).
    start_reported: bool,
    exit_code: i32,
    exit_sent: bool,
    spawning: Vec<(u64, usize, SpawnFor)>,
    /// Control clients waiting for a reload attempt's outcome.
    waiters: Vec<(ClientId, u64)>,
    /// The config file, for progress messages.
    config_path: String,
    out: Vec<Action>,
}

/// The state a resumed master (after an upgrade) starts from.
#[derive(Debug, Clone)]
pub struct Resumed {
    pub generation: u64,
    pub next_generation: u64,
    pub attempt: u64,
    pub params: Params,
    pub slots: Vec<Slot>,
    pub workers: Vec<Worker>,
}

impl Generations {
    /// A fresh master: generation 1 is about to start ([`Event::Start`], then a Tick).
    pub fn new(params: Params, config_path: impl Into<String>) -> Generations {
        Generations {
            phase: Phase::Starting,
            generation: 1,
            next_generation: 2,
            slots: vec![Slot::default(); params.count],
            params,
            workers: Vec::new(),
            reload: None,
            reload_again: false,
            attempt: 0,
            start_failure: None,
            start_reported: false,
            exit_code: 0,
            exit_sent: false,
            spawning: Vec::new(),
            waiters: Vec::new(),
            config_path: config_path.into(),
            out: Vec::new(),
        }
    }

    /// After an upgrade: running, with the workers and slots handed over.
    pub fn resume(state: Resumed, config_path: impl Into<String>) -> Generations {
        let mut g = Generations::new(state.params, config_path);
        g.phase = Phase::Running;
        g.generation = state.generation;
        g.next_generation = state.next_generation;
        g.attempt = state.attempt;
        g.slots = state.slots;
        g.workers = state.workers;
        g.start_reported = true;
        g
    }

    // ---- read-only accessors -------------------------------------------------------------

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The serving generation (the starting one during the first start).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Reload attempts started so far.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// The generation a reload is building, if one is under way.
    pub fn reloading(&self) -> Option<u64> {
        self.reload.as_ref().map(|r| r.generation)
    }

    /// The serving generation's parameters.
    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    pub fn worker(&self, pid: Pid) -> Option<&Worker> {
        self.workers.iter().find(|w| w.pid == pid)
    }

    /// Crash restarts of the worker's slot, for `status` (0 for other generations).
    pub fn restarts(&self, w: &Worker) -> u32 {
        if w.generation == self.generation {
            self.slots.get(w.slot).map_or(0, |s| s.restarts)
        } else {
            0
        }
    }

    /// Workers not reaped yet.
    pub fn alive(&self) -> usize {
        self.workers.iter().filter(|w| w.state.is_alive()).count()
    }

    pub fn exit_code(&self) -> i32 {
        self.exit_code
    }

    /// Stopping, and every worker is gone.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Stopping && self.workers.is_empty()
    }

    /// The earliest deadline: a worker's start timeout, delayed readiness or kill, or a
    /// slot's restart.
    pub fn next_deadline(&self) -> Option<Instant> {
        let workers = self.workers.iter().filter_map(|w| w.state.deadline());
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        workers.chain(restarts).min()
    }

    /// Why an upgrade cannot start now, if it cannot.
    pub fn upgrade_refusal(&self) -> Option<&'static str> {
        match (self.phase, &self.reload) {
            (Phase::Starting, _) => Some("the first generation is still starting"),
            (Phase::Stopping, _) => Some("the master is stopping"),
            (Phase::Running, Some(_)) => Some("a reload is under way"),
            (Phase::Running, None) => None,
        }
    }

    /// `generation N serving (n workers)`.
    pub fn serving_status(&self) -> String {
        let n = self.params.count;
        format!(
            "generation {} serving ({n} worker{})",
            self.generation,
            if n == 1 { "" } else { "s" }
        )
    }

    /// Keep `line` among the worker's last [`crate::worker::TAIL_LINES`], for failure
    /// reports. Not an event: nothing is decided on it. The loop gives every line it logs for
    /// a worker, and all of them before that worker's [`Event::WorkerExited`].
    pub fn remember(&mut self, pid: Pid, line: &str) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            crate::worker::remember(&mut w.tail, line);
        }
    }

    // ---- the transitions -------------------------------------------------------------------

    /// Take one event that happened at `now`; return what the loop must do, in order.
    pub fn handle(&mut self, now: Instant, event: Event) -> Vec<Action> {
        match event {
            Event::Start => {
                if self.phase == Phase::Starting && self.workers.is_empty() && self.spawning.is_empty() {
                    let params = self.params.clone();
                    self.spawn_generation(&params, self.generation);
                }
            }
            Event::WorkerSpawned { pid, generation, slot } => self.spawned(now, pid, generation, slot),
            Event::SpawnFailed {
                generation,
                slot,
                reason,
            } => self.spawn_failed(now, generation, slot, reason),
            Event::WorkerReady { pid } => {
                if let Some(i) = self.index(pid) {
                    self.feed(now, i, WorkerEvent::Ready);
                }
            }
            Event::WorkerExited { pid, status } => match self.index(pid) {
                Some(i) => {
                    self.feed(now, i, WorkerEvent::Exited(status));
                    self.workers.remove(i);
                }
                None => self.log(
                    Level::Debug,
                    "reaped orphan".into(),
                    vec![("status", Kv::Str(status.to_string())), ("pid", pid_kv(pid))],
                ),
            },
            Event::Tick => {
                self.tick(now);
                self.advance(now);
                if self.finished() && !self.exit_sent {
                    self.exit_sent = true;
                    self.out.push(Action::Exit { code: self.exit_code });
                }
            }
            Event::ReloadRequested { from, if_generation } => self.request_reload(from, if_generation),
            Event::ReloadPrepared { generation, params } => self.prepared(generation, params),
            Event::ReloadPrepareFailed { generation, message } => self.prepare_failed(generation, message),
            Event::StopRequested { by } => self.stop_requested(now, by),
        }
        std::mem::take(&mut self.out)
    }

    fn index(&self, pid: Pid) -> Option<usize> {
        self.workers.iter().position(|w| w.pid == pid)
    }

    fn log(&mut self, level: Level, message: String, kv: Vec<(&'static str, Kv)>) {
        self.out.push(Action::Log { level, message, kv });
    }

    fn tell_systemd(&mut self, s: Systemd) {
        self.out.push(Action::TellSystemd(s));
    }

    /// The parameters of a generation: the pending reload's, or the serving ones.
    fn params_of(&self, generation: u64) -> Params {
        match &self.reload {
            Some(Reload {
                generation: g,
                params: Some(p),
                ..
            }) if *g == generation => p.clone(),
            _ => self.params.clone(),
        }
    }

    /// Start every worker of a generation, one slot after the other (the next once the loop
    /// reported the previous one spawned); the first that cannot be started fails it.
    fn spawn_generation(&mut self, params: &Params, generation: u64) {
        // Workers may take up to start_timeout to be ready: let systemd wait that long too.
        let extend = params.start_timeout.saturating_add(Duration::from_secs(5));
        self.tell_systemd(Systemd::ExtendTimeout(extend));
        if params.count > 0 {
            self.spawn(generation, 0, SpawnFor::Generation { count: params.count });
        }
    }

    fn spawn(&mut self, generation: u64, slot: usize, why: SpawnFor) {
        self.spawning.push((generation, slot, why));
        self.out.push(Action::Spawn { generation, slot });
    }

    fn take_spawning(&mut self, generation: u64, slot: usize) -> Option<SpawnFor> {
        let i = self
            .spawning
            .iter()
            .position(|&(g, s, _)| g == generation && s == slot)?;
        Some(self.spawning.remove(i).2)
    }

    /// The generation is still wanted as a whole: the first one starting, or the reload's.
    fn is_starting_generation(&self, generation: u64) -> bool {
        match &self.reload {
            Some(r) if r.generation == generation => true,
            _ => self.phase == Phase::Starting && generation == self.generation,
        }
    }

    fn spawned(&mut self, now: Instant, pid: Pid, generation: u64, slot: usize) {
        let why = self.take_spawning(generation, slot);
        let p = self.params_of(generation);
        let ready_at = match p.ready {
            Ready::Delay(d) => Some(clock::after(now, d)),
            Ready::Notify => None,
        };
        self.log(
            Level::Info,
            "worker started".into(),
            vec![
                ("slot", Kv::U64(slot as u64)),
                ("generation", Kv::U64(generation)),
                ("pid", pid_kv(pid)),
            ],
        );
        self.workers.push(Worker {
            pid,
            generation,
            slot,
            state: State::Starting {
                deadline: clock::after(now, p.start_timeout),
                ready_at,
            },
            started: now,
            stop_signal: p.stop_signal,
            stop_timeout: p.stop_timeout,
            start_timeout: p.start_timeout,
            tail: Default::default(),
        });
        if let Some(SpawnFor::Generation { count }) = why {
            if slot + 1 < count && self.is_starting_generation(generation) {
                self.spawn(generation, slot + 1, SpawnFor::Generation { count });
            }
        }
    }

    fn spawn_failed(&mut self, now: Instant, generation: u64, slot: usize, reason: String) {
        let why = self.take_spawning(generation, slot);
        self.log(Level::Error, reason.clone(), vec![("generation", Kv::U64(generation))]);
        match why {
            Some(SpawnFor::Generation { .. }) => self.generation_failed(now, generation, slot, reason, vec![]),
            Some(SpawnFor::Restart) if generation == self.generation && self.phase != Phase::Stopping => {
                self.schedule_restart(now, slot, Duration::ZERO)
            }
            Some(SpawnFor::Restart) | None => {}
        }
    }

    /// Feed an event to worker `i` and act on what it reports.
    fn feed(&mut self, now: Instant, i: usize, event: WorkerEvent) {
        let was_ready = self.workers[i].state == State::Ready;
        let (next, effects) = transition(self.workers[i].state, event, self.workers[i].stop_timeout);
        self.workers[i].state = next;
        for effect in effects {
            let w = &self.workers[i];
            let (pid, generation, slot) = (w.pid, w.generation, w.slot);
            match effect {
                Effect::SendStopSignal => self.out.push(Action::Signal {
                    pid,
                    signal: w.stop_signal,
                }),
                Effect::KillGroup => self.out.push(Action::KillGroup { pid }),
                Effect::BecameReady => {
                    let lived = now.saturating_duration_since(w.started);
                    self.log(
                        Level::Info,
                        "worker ready".into(),
                        vec![("generation", Kv::U64(generation)), ("pid", pid_kv(pid))],
                    );
                    if generation == self.generation {
                        if let Some(s) = self.slots.get_mut(slot) {
                            s.ready_once = true;
                        }
                        if self.phase == Phase::Running {
                            self.log(
                                Level::Debug,
                                "restarted worker ready".into(),
                                vec![("lived_ms", Kv::U64(clock::ms(lived)))],
                            );
                        }
                    }
                }
                Effect::StartTimedOut => {
                    let tail = w.tail.iter().cloned().collect();
                    let reason = format!(
                        "worker pid {pid} did not become ready within {}",
                        humantime::format_duration(w.start_timeout)
                    );
                    self.generation_failed(now, generation, slot, reason, tail);
                }
                Effect::Gone { status, expected } => {
                    if expected {
                        self.log(
                            Level::Info,
                            "worker exited".into(),
                            vec![
                                ("status", Kv::Str(status.to_string())),
                                ("generation", Kv::U64(generation)),
                                ("pid", pid_kv(pid)),
                            ],
                        );
                    } else {
                        let lived = now.saturating_duration_since(w.started);
                        let tail = w.tail.iter().cloned().collect();
                        let reason = format!("worker pid {pid} {status} during start-up");
                        self.worker_died(now, generation, slot, pid, status, lived, reason, tail, was_ready);
                    }
                }
            }
        }
    }

    /// A worker exited on its own.
    #[allow(clippy::too_many_arguments)]
    fn worker_died(
        &mut self,
        now: Instant,
        generation: u64,
        slot: usize,
        pid: Pid,
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
            return self.generation_failed(now, generation, slot, reason, tail);
        }
        let kv = |status: ExitStatus| {
            vec![
                ("status", Kv::Str(status.to_string())),
                ("generation", Kv::U64(generation)),
                ("pid", pid_kv(pid)),
            ]
        };
        if generation != self.generation || self.phase == Phase::Stopping {
            return self.log(Level::Info, "worker exited".into(), kv(status));
        }
        let restart = match self.params.restart {
            Restart::Always => true,
            Restart::OnFailure => !status.success(),
            Restart::Never => false,
        };
        if !restart {
            self.log(
                Level::Warn,
                "worker exited; not restarting (restart policy)".into(),
                kv(status),
            );
            self.exit_code = if status.success() { 0 } else { 1 };
            return self.stop_if_nothing_left(now);
        }
        self.schedule_restart(now, slot, lived);
        let delay = self.slots[slot]
            .restart_at
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default();
        let mut kv = kv(status);
        kv.insert(0, ("in_ms", Kv::U64(clock::ms(delay))));
        self.log(Level::Warn, "worker exited unexpectedly; restarting".into(), kv);
    }

    /// Under `restart = "on-failure"` or `"never"`, the master stops once no worker is left to
    /// serve: none of the serving generation alive or due to restart, and no reload under way
    /// (a starting generation is live: if it commits, it serves; if it fails, this is asked
    /// again).
    fn stop_if_nothing_left(&mut self, now: Instant) {
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
            self.log(
                Level::Info,
                "no workers left and none to restart: stopping".into(),
                vec![],
            );
            self.begin_stop(now);
        }
    }

    fn schedule_restart(&mut self, now: Instant, slot: usize, lived: Duration) {
        let Some(s) = self.slots.get_mut(slot) else { return };
        if lived >= BACKOFF_RESET {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        let delay = BACKOFF_MIN
            .saturating_mul(1u32 << (s.failures - 1).min(20))
            .min(BACKOFF_MAX);
        s.restart_at = Some(clock::after(now, delay));
    }

    /// A worker of a starting generation failed: record it; `advance` acts on it.
    fn generation_failed(&mut self, now: Instant, generation: u64, slot: usize, reason: String, tail: Vec<String>) {
        match &mut self.reload {
            Some(r) if r.generation == generation => {
                r.failure.get_or_insert(Failure { reason, tail });
            }
            _ if self.phase == Phase::Starting && generation == self.generation => {
                self.start_failure.get_or_insert(Failure { reason, tail });
            }
            _ if generation == self.generation && self.phase == Phase::Running => {
                // A restarted worker that never became ready: a crash like any other.
                self.log(Level::Warn, reason, vec![("generation", Kv::U64(generation))]);
                self.schedule_restart(now, slot, Duration::ZERO);
            }
            _ => {}
        }
    }

    fn tick(&mut self, now: Instant) {
        for i in 0..self.workers.len() {
            if self.workers[i].state.deadline().is_some_and(|d| d <= now) {
                self.feed(now, i, WorkerEvent::Tick(now));
            }
        }
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].restart_at.is_some_and(|t| t <= now))
            .collect();
        for slot in due {
            self.slots[slot].restart_at = None;
            self.slots[slot].restarts += 1;
            self.spawn(self.generation, slot, SpawnFor::Restart);
        }
    }

    fn stop_requested(&mut self, now: Instant, by: StopBy) {
        match by {
            StopBy::Signal(sig) if self.phase == Phase::Stopping => {
                self.log(
                    Level::Warn,
                    "second stop signal: killing all workers now".into(),
                    vec![("signal", Kv::Str(sig.as_str().into()))],
                );
                for i in 0..self.workers.len() {
                    self.feed(now, i, WorkerEvent::Kill);
                }
            }
            StopBy::Signal(sig) => {
                self.log(
                    Level::Info,
                    "stopping".into(),
                    vec![("signal", Kv::Str(sig.as_str().into()))],
                );
                self.begin_stop(now);
            }
            StopBy::Control if self.phase == Phase::Stopping => {}
            StopBy::Control => {
                self.log(
                    Level::Info,
                    "stopping".into(),
                    vec![("requested_by", Kv::Str("control socket".into()))],
                );
                self.begin_stop(now);
            }
        }
    }

    fn begin_stop(&mut self, now: Instant) {
        if self.phase == Phase::Starting {
            self.report_start_failed("the master was stopped during start-up".into(), vec![]);
        }
        self.phase = Phase::Stopping;
        self.tell_systemd(Systemd::Stopping);
        // Every reload a client still waits for, under way or queued, will not happen.
        if let Some(r) = self.reload.take() {
            if r.params.is_some() {
                self.out.push(Action::DiscardReload {
                    generation: r.generation,
                    failed: false,
                });
            }
        }
        for (to, _) in std::mem::take(&mut self.waiters) {
            self.out.push(Action::Reply {
                to,
                ok: false,
                message: "reload cancelled: the master is stopping".into(),
                data: Value::Null,
            });
        }
        self.reload_again = false;
        self.out.push(Action::CancelUpgrade);
        for s in &mut self.slots {
            s.restart_at = None;
        }
        for i in 0..self.workers.len() {
            self.feed(now, i, WorkerEvent::Stop(now));
        }
    }

    fn report_start_failed(&mut self, reason: String, tail: Vec<String>) {
        if !self.start_reported {
            self.start_reported = true;
            self.out.push(Action::StartFailed { reason, tail });
        }
    }

    fn log_failure(&mut self, what: &str, generation: u64, f: &Failure) {
        let kv = || vec![("generation", Kv::U64(generation))];
        self.log(Level::Error, format!("{what}: {}", f.reason), kv());
        for line in &f.tail {
            self.log(Level::Error, format!("  | {line}"), kv());
        }
    }

    /// The generation logic: runs on every Tick.
    fn advance(&mut self, now: Instant) {
        match self.phase {
            Phase::Starting => {
                if let Some(f) = self.start_failure.take() {
                    self.log_failure("start failed", self.generation, &f);
                    self.report_start_failed(f.reason, f.tail);
                    self.exit_code = 1;
                    self.begin_stop(now);
                } else if self.slots.iter().all(|s| s.ready_once) {
                    // Every position has had a ready worker, even if one has crashed since (it
                    // is being restarted): the start succeeded.
                    self.phase = Phase::Running;
                    self.log(
                        Level::Info,
                        "ready".into(),
                        vec![
                            ("workers", Kv::U64(self.params.count as u64)),
                            ("generation", Kv::U64(self.generation)),
                        ],
                    );
                    if !self.start_reported {
                        self.start_reported = true;
                        self.out.push(Action::StartSucceeded {
                            generation: self.generation,
                            workers: self.params.count,
                        });
                    }
                    let status = self.serving_status();
                    self.tell_systemd(Systemd::Ready { status });
                }
            }
            Phase::Running => {
                if let Some(r) = &self.reload {
                    if r.failure.is_some() {
                        self.fail_reload(now);
                    } else if let Some(p) = &r.params {
                        if self.ready_count(r.generation) == p.count {
                            self.commit_reload(now);
                        }
                    }
                }
            }
            Phase::Stopping => {}
        }
        // A reload asked for during the start or another reload: now, as the start or that
        // reload ended.
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
    fn request_reload(&mut self, from: Option<ClientId>, if_generation: Option<u64>) {
        let refuse = |m: &mut Generations, message: String| {
            m.log(Level::Info, message.clone(), vec![]);
            if let Some(to) = from {
                m.out.push(Action::Reply {
                    to,
                    ok: false,
                    message,
                    data: Value::Null,
                });
            }
        };
        if self.phase == Phase::Stopping {
            return refuse(self, "reload refused: the master is stopping".into());
        }
        if let Some(n) = if_generation {
            if n != self.generation || self.phase == Phase::Starting {
                let message = format!(
                    "reload refused: generation {n} is not serving (generation {} is)",
                    self.generation
                );
                return refuse(self, message);
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
        if let Some(to) = from {
            // A connection waits for one thing at a time: its latest request.
            self.waiters.retain(|&(c, _)| c != to);
            self.waiters.push((to, attempt));
        }
        if busy && attempt > self.attempt {
            self.log(
                Level::Info,
                "reload requested while busy; one more will follow".into(),
                vec![],
            );
            self.reload_again = true;
            self.progress(attempt, "a reload is under way; this one will follow it".into());
        } else if !busy {
            self.start_reload();
        }
    }

    /// Send a progress line to every client waiting for reload attempt `attempt`.
    fn progress(&mut self, attempt: u64, message: String) {
        for &(to, a) in &self.waiters {
            if a == attempt {
                self.out.push(Action::Progress {
                    to,
                    message: message.clone(),
                });
            }
        }
    }

    /// The current attempt ended: answer everyone waiting for it.
    fn finish_reload(&mut self, ok: bool, message: String, data: Value) {
        let attempt = self.attempt;
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|&(_, a)| a == attempt);
        self.waiters = rest;
        for (to, _) in done {
            self.out.push(Action::Reply {
                to,
                ok,
                message: message.clone(),
                data: data.clone(),
            });
        }
    }

    fn start_reload(&mut self) {
        self.attempt += 1;
        let generation = self.next_generation;
        self.log(
            Level::Info,
            "reloading".into(),
            vec![("generation", Kv::U64(generation))],
        );
        self.tell_systemd(Systemd::Reloading { generation });
        self.progress(self.attempt, format!("reading {}", self.config_path));
        self.reload = Some(Reload {
            generation,
            params: None,
            failure: None,
        });
        self.out.push(Action::PrepareReload {
            attempt: self.attempt,
            generation,
        });
    }

    fn preparing(&self, generation: u64) -> bool {
        matches!(&self.reload, Some(r) if r.generation == generation && r.params.is_none())
    }

    fn prepared(&mut self, generation: u64, params: Params) {
        if !self.preparing(generation) {
            // Stopped meanwhile: nothing waits for it any more.
            self.out.push(Action::DiscardReload {
                generation,
                failed: false,
            });
            return;
        }
        self.next_generation += 1;
        self.progress(
            self.attempt,
            format!("starting generation {generation} ({} workers)", params.count),
        );
        if let Some(r) = &mut self.reload {
            r.params = Some(params.clone());
        }
        self.spawn_generation(&params, generation);
    }

    fn prepare_failed(&mut self, generation: u64, message: String) {
        if !self.preparing(generation) {
            return;
        }
        self.reload = None;
        self.log(Level::Error, message.clone(), vec![("generation", Kv::U64(generation))]);
        let status = format!("{message}; {}", self.serving_status());
        self.tell_systemd(Systemd::Ready { status });
        let data = json!({ "generation": self.generation });
        self.finish_reload(false, message, data);
    }

    fn commit_reload(&mut self, now: Instant) {
        let Some(Reload {
            generation,
            params: Some(params),
            ..
        }) = self.reload.take()
        else {
            return;
        };
        let old = self.generation;
        for i in 0..self.workers.len() {
            if self.workers[i].generation != generation {
                self.feed(now, i, WorkerEvent::Stop(now));
            }
        }
        self.out.push(Action::CommitReload { generation });
        self.generation = generation;
        self.slots = vec![Slot::default(); params.count];
        self.params = params;
        let count = self.params.count;
        self.log(
            Level::Info,
            "reload complete".into(),
            vec![
                ("old_generation", Kv::U64(old)),
                ("workers", Kv::U64(count as u64)),
                ("generation", Kv::U64(generation)),
            ],
        );
        let message =
            format!("reloaded: generation {generation} serving ({count} workers); generation {old} signalled to stop");
        let status = self.serving_status();
        self.tell_systemd(Systemd::Ready { status });
        self.finish_reload(
            true,
            message,
            json!({ "generation": generation, "old_generation": old }),
        );
        self.limit_draining(now);
    }

    /// Keep at most `max_draining` old generations stopping; kill the oldest beyond that.
    fn limit_draining(&mut self, now: Instant) {
        let mut draining: Vec<u64> = self
            .workers
            .iter()
            .filter(|w| w.generation != self.generation && matches!(w.state, State::Stopping { .. }))
            .map(|w| w.generation)
            .collect();
        draining.sort_unstable();
        draining.dedup();
        let max = self.params.max_draining;
        if draining.len() <= max {
            return;
        }
        for &generation in &draining[..draining.len() - max] {
            self.log(
                Level::Warn,
                "too many generations draining: killing the oldest".into(),
                vec![
                    ("max_draining", Kv::U64(max as u64)),
                    ("generation", Kv::U64(generation)),
                ],
            );
            for i in 0..self.workers.len() {
                if self.workers[i].generation == generation {
                    self.feed(now, i, WorkerEvent::Kill);
                }
            }
        }
    }

    fn fail_reload(&mut self, now: Instant) {
        let Some(r) = self.reload.take() else { return };
        for i in 0..self.workers.len() {
            if self.workers[i].generation == r.generation {
                self.feed(now, i, WorkerEvent::Kill);
            }
        }
        self.out.push(Action::DiscardReload {
            generation: r.generation,
            failed: true,
        });
        let f = r.failure.unwrap_or(Failure {
            reason: "unknown".into(),
            tail: vec![],
        });
        self.log_failure("reload failed", r.generation, &f);
        self.log(
            Level::Info,
            "still serving".into(),
            vec![("generation", Kv::U64(self.generation))],
        );
        let message = format!(
            "reload failed: {}; generation {} keeps serving",
            f.reason, self.generation
        );
        self.tell_systemd(Systemd::Ready {
            status: message.clone(),
        });
        let data = json!({ "generation": self.generation, "failed_generation": r.generation, "tail": f.tail });
        self.finish_reload(false, message, data);
        // Workers of the serving generation that exited (and were not restarted, by policy)
        // while this reload was under way leave nothing to serve now.
        self.stop_if_nothing_left(now);
    }
}

fn pid_kv(pid: Pid) -> Kv {
    Kv::I64(pid.as_raw().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn params(count: usize) -> Params {
        Params {
            count,
            restart: Restart::Always,
            ready: Ready::Notify,
            start_timeout: 10 * SEC,
            stop_signal: Signal::SIGTERM,
            stop_timeout: 5 * SEC,
            max_draining: 2,
        }
    }

    fn with_restart(count: usize, restart: Restart) -> Params {
        Params {
            restart,
            ..params(count)
        }
    }

    const FAIL: ExitStatus = ExitStatus::Code(1);
    const CLEAN: ExitStatus = ExitStatus::Code(0);
    const C1: ClientId = ClientId(1);
    const C2: ClientId = ClientId(2);
    const C3: ClientId = ClientId(3);

    /// A fake loop: it carries out spawns and reload preparations at once and feeds their
    /// results back, depth first, as the real loop does.
    struct Sim {
        g: Generations,
        now: Instant,
        next_pid: i32,
        /// Spawns of these (generation, slot) fail.
        fail_spawn: Vec<(u64, usize)>,
        /// What the next reload's preparation gives.
        next: Result<Params, String>,
    }

    impl Sim {
        fn new(p: Params) -> Sim {
            Sim {
                next: Ok(p.clone()),
                g: Generations::new(p, "/etc/zdd.toml"),
                now: Instant::now(),
                next_pid: 100,
                fail_spawn: vec![],
            }
        }

        /// Started, every worker of generation 1 ready.
        fn running(p: Params) -> Sim {
            let mut s = Sim::new(p);
            s.step(Event::Start);
            s.ready_all(1);
            assert_eq!(s.g.phase(), Phase::Running);
            s
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
        }

        /// One turn of the loop: the event, then the turn's Tick.
        fn step(&mut self, ev: Event) -> Vec<Action> {
            self.turn(vec![ev])
        }

        /// One turn of the loop with several events.
        fn turn(&mut self, events: Vec<Event>) -> Vec<Action> {
            let mut all = Vec::new();
            for ev in events.into_iter().chain([Event::Tick]) {
                let first = self.g.handle(self.now, ev);
                self.carry_out(first, &mut all);
            }
            all
        }

        fn carry_out(&mut self, actions: Vec<Action>, all: &mut Vec<Action>) {
            for a in actions {
                let back = match a {
                    Action::Spawn { generation, slot } if self.fail_spawn.contains(&(generation, slot)) => {
                        Some(Event::SpawnFailed {
                            generation,
                            slot,
                            reason: "starting worker: exec: ENOENT".into(),
                        })
                    }
                    Action::Spawn { generation, slot } => {
                        self.next_pid += 1;
                        Some(Event::WorkerSpawned {
                            pid: Pid::from_raw(self.next_pid),
                            generation,
                            slot,
                        })
                    }
                    Action::PrepareReload { generation, .. } => Some(match self.next.clone() {
                        Ok(params) => Event::ReloadPrepared { generation, params },
                        Err(message) => Event::ReloadPrepareFailed { generation, message },
                    }),
                    _ => None,
                };
                all.push(a);
                if let Some(ev) = back {
                    let more = self.g.handle(self.now, ev);
                    self.carry_out(more, all);
                }
            }
        }

        fn pids(&self, generation: u64) -> Vec<Pid> {
            self.g
                .workers()
                .iter()
                .filter(|w| w.generation == generation)
                .map(|w| w.pid)
                .collect()
        }

        fn pid(&self, generation: u64, slot: usize) -> Pid {
            self.g
                .workers()
                .iter()
                .rev()
                .find(|w| w.generation == generation && w.slot == slot)
                .map(|w| w.pid)
                .expect("no such worker")
        }

        fn ready_all(&mut self, generation: u64) -> Vec<Action> {
            let mut all = Vec::new();
            for pid in self.pids(generation) {
                all.extend(self.step(Event::WorkerReady { pid }));
            }
            all
        }

        fn exit(&mut self, pid: Pid, status: ExitStatus) -> Vec<Action> {
            self.step(Event::WorkerExited { pid, status })
        }

        fn reload(&mut self, from: Option<ClientId>) -> Vec<Action> {
            self.step(Event::ReloadRequested {
                from,
                if_generation: None,
            })
        }

        fn state(&self, pid: Pid) -> State {
            self.g.worker(pid).map(|w| w.state).expect("no such worker")
        }
    }

    fn spawns(a: &[Action]) -> Vec<(u64, usize)> {
        a.iter()
            .filter_map(|a| match a {
                &Action::Spawn { generation, slot } => Some((generation, slot)),
                _ => None,
            })
            .collect()
    }

    fn killed(a: &[Action]) -> Vec<Pid> {
        a.iter()
            .filter_map(|a| match a {
                &Action::KillGroup { pid } => Some(pid),
                _ => None,
            })
            .collect()
    }

    fn signalled(a: &[Action]) -> Vec<Pid> {
        a.iter()
            .filter_map(|a| match a {
                &Action::Signal { pid, .. } => Some(pid),
                _ => None,
            })
            .collect()
    }

    fn replies(a: &[Action]) -> Vec<(ClientId, bool, String)> {
        a.iter()
            .filter_map(|a| match a {
                Action::Reply { to, ok, message, .. } => Some((*to, *ok, message.clone())),
                _ => None,
            })
            .collect()
    }

    fn reply_data(a: &[Action], client: ClientId) -> Value {
        a.iter()
            .find_map(|a| match a {
                Action::Reply { to, data, .. } if *to == client => Some(data.clone()),
                _ => None,
            })
            .expect("no reply")
    }

    fn progress(a: &[Action], client: ClientId) -> Vec<String> {
        a.iter()
            .filter_map(|a| match a {
                Action::Progress { to, message } if *to == client => Some(message.clone()),
                _ => None,
            })
            .collect()
    }

    fn prepares(a: &[Action]) -> usize {
        a.iter().filter(|a| matches!(a, Action::PrepareReload { .. })).count()
    }

    fn logged(a: &[Action], text: &str) -> bool {
        a.iter()
            .any(|a| matches!(a, Action::Log { message, .. } if message.contains(text)))
    }

    fn exit_code(a: &[Action]) -> Option<i32> {
        a.iter().find_map(|a| match a {
            Action::Exit { code } => Some(*code),
            _ => None,
        })
    }

    /// Reap every worker that is left (as the loop would after they obeyed).
    fn reap_all(s: &mut Sim) -> Vec<Action> {
        let mut all = Vec::new();
        for pid in s.g.workers().iter().map(|w| w.pid).collect::<Vec<_>>() {
            all.extend(s.exit(pid, ExitStatus::Signal(15)));
        }
        all
    }

    // ---- start ---------------------------------------------------------------------------

    #[test]
    fn start_spawns_every_slot_and_succeeds_once_all_are_ready() {
        let mut s = Sim::new(params(3));
        let a = s.step(Event::Start);
        assert_eq!(spawns(&a), vec![(1, 0), (1, 1), (1, 2)]);
        assert_eq!(a[0], Action::TellSystemd(Systemd::ExtendTimeout(15 * SEC)));
        let pids = s.pids(1);
        s.step(Event::WorkerReady { pid: pids[0] });
        let a = s.step(Event::WorkerReady { pid: pids[1] });
        assert_eq!(s.g.phase(), Phase::Starting);
        assert!(!a.iter().any(|a| matches!(a, Action::StartSucceeded { .. })));
        let a = s.step(Event::WorkerReady { pid: pids[2] });
        assert_eq!(s.g.phase(), Phase::Running);
        assert!(a.contains(&Action::StartSucceeded {
            generation: 1,
            workers: 3
        }));
        assert!(a.contains(&Action::TellSystemd(Systemd::Ready {
            status: "generation 1 serving (3 workers)".into()
        })));
    }

    #[test]
    fn start_fails_when_a_worker_exits_before_ready_with_its_last_lines() {
        let mut s = Sim::new(params(2));
        s.step(Event::Start);
        let pid = s.pid(1, 1);
        s.g.remember(pid, "Traceback (most recent call last):");
        s.g.remember(pid, "ImportError: no module named app");
        let a = s.exit(pid, ExitStatus::Code(3));
        assert!(a.contains(&Action::StartFailed {
            reason: format!("worker pid {pid} exited with status 3 during start-up"),
            tail: vec![
                "Traceback (most recent call last):".into(),
                "ImportError: no module named app".into()
            ],
        }));
        assert!(logged(&a, "  | ImportError"));
        assert_eq!(s.g.phase(), Phase::Stopping);
        assert_eq!(s.g.exit_code(), 1);
        assert_eq!(signalled(&a), vec![s.pid(1, 0)]);
        // The other worker goes, then the master.
        let a = s.exit(s.pid(1, 0), ExitStatus::Signal(15));
        assert_eq!(exit_code(&a), Some(1));
        // Only one start report ever goes out.
        assert_eq!(a.iter().filter(|a| matches!(a, Action::StartFailed { .. })).count(), 0);
    }

    #[test]
    fn start_fails_on_start_timeout() {
        let mut s = Sim::new(params(1));
        s.step(Event::Start);
        let pid = s.pid(1, 0);
        assert_eq!(s.g.next_deadline(), Some(s.now + 10 * SEC));
        s.advance(10 * SEC - Duration::from_millis(1));
        assert_eq!(s.step(Event::Tick), vec![]);
        s.advance(Duration::from_millis(1));
        let a = s.step(Event::Tick);
        assert_eq!(killed(&a), vec![pid]);
        assert!(a.contains(&Action::StartFailed {
            reason: format!("worker pid {pid} did not become ready within 10s"),
            tail: vec![],
        }));
        assert_eq!(s.state(pid), State::Killed);
        let a = s.exit(pid, ExitStatus::Signal(9));
        assert_eq!(exit_code(&a), Some(1));
    }

    #[test]
    fn start_stops_spawning_at_the_first_spawn_failure() {
        let mut s = Sim::new(params(3));
        s.fail_spawn.push((1, 1));
        let a = s.step(Event::Start);
        assert_eq!(spawns(&a), vec![(1, 0), (1, 1)]);
        assert!(a.contains(&Action::StartFailed {
            reason: "starting worker: exec: ENOENT".into(),
            tail: vec![],
        }));
        assert_eq!(signalled(&a), vec![s.pid(1, 0)]);
        assert_eq!(s.g.phase(), Phase::Stopping);
    }

    #[test]
    fn ready_worker_crashing_during_start_is_restarted_and_the_start_succeeds() {
        let mut s = Sim::new(params(2));
        s.step(Event::Start);
        let (w0, w1) = (s.pid(1, 0), s.pid(1, 1));
        s.step(Event::WorkerReady { pid: w0 });
        let a = s.exit(w0, FAIL);
        assert!(!a.iter().any(|a| matches!(a, Action::StartFailed { .. })));
        assert!(logged(&a, "worker exited unexpectedly; restarting"));
        assert_eq!(s.g.slots()[0].restart_at, Some(s.now + BACKOFF_MIN));
        // Every slot has been ready once: the start succeeded, though slot 0 is restarting.
        let a = s.step(Event::WorkerReady { pid: w1 });
        assert!(a.contains(&Action::StartSucceeded {
            generation: 1,
            workers: 2
        }));
        s.advance(BACKOFF_MIN);
        let a = s.step(Event::Tick);
        assert_eq!(spawns(&a), vec![(1, 0)]);
        assert_eq!(s.g.slots()[0].restarts, 1);
    }

    #[test]
    fn delay_readiness_makes_workers_ready_at_their_time() {
        let mut s = Sim::new(Params {
            ready: Ready::Delay(2 * SEC),
            ..params(1)
        });
        s.step(Event::Start);
        assert_eq!(s.g.next_deadline(), Some(s.now + 2 * SEC));
        s.advance(2 * SEC);
        let a = s.step(Event::Tick);
        assert!(a.contains(&Action::StartSucceeded {
            generation: 1,
            workers: 1
        }));
        assert_eq!(s.state(s.pid(1, 0)), State::Ready);
    }

    #[test]
    fn stop_during_start_reports_the_start_as_failed() {
        let mut s = Sim::new(params(1));
        s.step(Event::Start);
        let a = s.step(Event::StopRequested {
            by: StopBy::Signal(Signal::SIGTERM),
        });
        assert!(a.contains(&Action::StartFailed {
            reason: "the master was stopped during start-up".into(),
            tail: vec![],
        }));
        assert_eq!(s.g.exit_code(), 0);
        let a = reap_all(&mut s);
        assert_eq!(exit_code(&a), Some(0));
    }

    // ---- reload ----------------------------------------------------------------------------

    #[test]
    fn reload_commits_once_every_new_worker_is_ready() {
        let mut s = Sim::running(params(2));
        let old = s.pids(1);
        let a = s.reload(Some(C1));
        assert_eq!(
            progress(&a, C1),
            vec!["reading /etc/zdd.toml", "starting generation 2 (2 workers)"]
        );
        assert!(a.contains(&Action::TellSystemd(Systemd::Reloading { generation: 2 })));
        assert_eq!(spawns(&a), vec![(2, 0), (2, 1)]);
        assert_eq!(s.g.reloading(), Some(2));
        assert_eq!(s.g.next_generation(), 3);
        let new = s.pids(2);
        let a = s.step(Event::WorkerReady { pid: new[0] });
        assert!(signalled(&a).is_empty());
        let a = s.step(Event::WorkerReady { pid: new[1] });
        assert_eq!(signalled(&a), old);
        assert!(a.contains(&Action::CommitReload { generation: 2 }));
        assert_eq!(
            replies(&a),
            vec![(
                C1,
                true,
                "reloaded: generation 2 serving (2 workers); generation 1 signalled to stop".into()
            )]
        );
        assert_eq!(reply_data(&a, C1), json!({ "generation": 2, "old_generation": 1 }));
        assert_eq!(s.g.generation(), 2);
        assert_eq!(s.g.reloading(), None);
        assert!(matches!(s.state(old[0]), State::Stopping { .. }));
        // The old workers leave as asked: no restart.
        let a = s.exit(old[0], CLEAN);
        assert!(logged(&a, "worker exited"));
        assert!(s.g.slots().iter().all(|sl| sl.restart_at.is_none()));
    }

    #[test]
    fn reload_asked_for_while_starting_runs_once_the_start_succeeded() {
        let mut s = Sim::new(params(1));
        s.step(Event::Start);
        let a = s.reload(Some(C1));
        assert_eq!(prepares(&a), 0);
        assert_eq!(progress(&a, C1), vec!["a reload is under way; this one will follow it"]);
        let a = s.ready_all(1);
        assert!(a.contains(&Action::StartSucceeded {
            generation: 1,
            workers: 1
        }));
        assert_eq!(prepares(&a), 1);
        assert_eq!(s.g.reloading(), Some(2));
        assert_eq!(s.g.attempt(), 1);
        let a = s.ready_all(2);
        assert_eq!(replies(&a).len(), 1);
        assert!(replies(&a)[0].1);
    }

    #[test]
    fn reloads_asked_for_during_a_reload_coalesce_into_one_more() {
        let mut s = Sim::running(params(1));
        s.reload(Some(C1));
        let a = s.reload(Some(C2));
        assert_eq!(prepares(&a), 0);
        s.reload(Some(C3));
        s.reload(None);
        let a = s.ready_all(2);
        // Attempt 1 answers its client; attempt 2 starts at once, for everyone else.
        assert_eq!(replies(&a), vec![(C1, true, replies(&a)[0].2.clone())]);
        assert_eq!(prepares(&a), 1);
        assert_eq!(s.g.reloading(), Some(3));
        let a = s.ready_all(3);
        let r = replies(&a);
        assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![C2, C3]);
        assert_eq!(prepares(&a), 0);
        assert_eq!(s.g.generation(), 3);
        assert_eq!(s.g.attempt(), 2);
    }

    #[test]
    fn if_generation_joins_the_reload_under_way() {
        let mut s = Sim::running(params(1));
        s.reload(Some(C1));
        let a = s.step(Event::ReloadRequested {
            from: Some(C2),
            if_generation: Some(1),
        });
        assert!(a.is_empty());
        let a = s.ready_all(2);
        let r = replies(&a);
        assert_eq!(
            r.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            vec![(C1, true), (C2, true)]
        );
        // Nothing follows: no one asked for another reading of the config.
        assert_eq!(prepares(&a), 0);
    }

    #[test]
    fn if_generation_is_refused_unless_that_generation_serves() {
        let cases: [(bool, u64, &str); 3] = [
            // (started, if_generation, refusal)
            (true, 7, "reload refused: generation 7 is not serving (generation 1 is)"),
            (
                false,
                1,
                "reload refused: generation 1 is not serving (generation 1 is)",
            ),
            (
                false,
                2,
                "reload refused: generation 2 is not serving (generation 1 is)",
            ),
        ];
        for (started, n, refusal) in cases {
            let mut s = if started {
                Sim::running(params(1))
            } else {
                let mut s = Sim::new(params(1));
                s.step(Event::Start);
                s
            };
            let a = s.step(Event::ReloadRequested {
                from: Some(C1),
                if_generation: Some(n),
            });
            assert_eq!(replies(&a), vec![(C1, false, refusal.into())]);
            assert_eq!(prepares(&a), 0);
            assert_eq!(s.g.attempt(), 0);
            // Refused requests do not queue anything.
            let a = s.ready_all(1);
            assert_eq!(prepares(&a), 0);
        }
    }

    #[test]
    fn reload_is_refused_while_stopping() {
        let mut s = Sim::running(params(1));
        s.step(Event::StopRequested { by: StopBy::Control });
        let a = s.reload(Some(C1));
        assert_eq!(
            replies(&a),
            vec![(C1, false, "reload refused: the master is stopping".into())]
        );
    }

    #[test]
    fn reload_preparation_failure_changes_nothing() {
        let mut s = Sim::running(params(1));
        s.next = Err("reload failed: invalid config; nothing changed: bad key".into());
        let a = s.reload(Some(C1));
        assert_eq!(
            replies(&a),
            vec![(
                C1,
                false,
                "reload failed: invalid config; nothing changed: bad key".into()
            )]
        );
        assert_eq!(reply_data(&a, C1), json!({ "generation": 1 }));
        assert!(a.contains(&Action::TellSystemd(Systemd::Ready {
            status: "reload failed: invalid config; nothing changed: bad key; generation 1 serving (1 worker)".into()
        })));
        assert!(spawns(&a).is_empty());
        assert_eq!(s.g.reloading(), None);
        assert_eq!(s.g.next_generation(), 2);
        assert_eq!(s.g.attempt(), 1);
        // The next attempt builds generation 2.
        s.next = Ok(params(1));
        let a = s.reload(None);
        assert_eq!(spawns(&a), vec![(2, 0)]);
    }

    /// A new worker that fails mid-reload fails the whole new generation; the serving one is
    /// untouched.
    #[test]
    fn new_worker_failing_mid_reload_fails_the_reload() {
        let cases: [(&str, Option<ExitStatus>, &str); 3] = [
            ("exits 1", Some(FAIL), "exited with status 1 during start-up"),
            ("exits 0", Some(CLEAN), "exited with status 0 during start-up"),
            ("times out", None, "did not become ready within 10s"),
        ];
        for (what, exit, reason) in cases {
            let mut s = Sim::running(params(2));
            let old = s.pids(1);
            s.reload(Some(C1));
            let (n0, n1) = (s.pid(2, 0), s.pid(2, 1));
            s.step(Event::WorkerReady { pid: n1 });
            s.g.remember(n0, "last words");
            let a = match exit {
                Some(status) => s.exit(n0, status),
                None => {
                    s.advance(10 * SEC);
                    s.step(Event::Tick)
                }
            };
            let expect_killed = if exit.is_some() { vec![n1] } else { vec![n0, n1] };
            assert_eq!(killed(&a), expect_killed, "{what}");
            assert!(a.contains(&Action::DiscardReload {
                generation: 2,
                failed: true
            }));
            let message = format!("reload failed: worker pid {n0} {reason}; generation 1 keeps serving");
            assert_eq!(replies(&a), vec![(C1, false, message.clone())], "{what}");
            assert_eq!(
                reply_data(&a, C1),
                json!({ "generation": 1, "failed_generation": 2, "tail": ["last words"] })
            );
            assert!(a.contains(&Action::TellSystemd(Systemd::Ready { status: message })));
            assert!(signalled(&a).is_empty(), "{what}");
            assert_eq!(s.g.generation(), 1);
            assert_eq!(s.g.reloading(), None);
            for pid in &old {
                assert_eq!(s.state(*pid), State::Ready);
            }
            // The killed new workers leave quietly.
            let a = s.exit(n1, ExitStatus::Signal(9));
            assert!(spawns(&a).is_empty());
            assert_eq!(s.g.phase(), Phase::Running);
        }
    }

    #[test]
    fn new_worker_ready_then_gone_in_the_same_turn_fails_the_reload() {
        let mut s = Sim::running(params(1));
        s.reload(Some(C1));
        let n = s.pid(2, 0);
        let a = s.turn(vec![
            Event::WorkerReady { pid: n },
            Event::WorkerExited { pid: n, status: FAIL },
        ]);
        assert!(!a.contains(&Action::CommitReload { generation: 2 }));
        assert!(!replies(&a)[0].1);
        assert_eq!(s.g.generation(), 1);
        // One turn later, it is a crash of the serving generation instead.
        s.reload(Some(C1));
        let n = s.pid(3, 0);
        let a = s.step(Event::WorkerReady { pid: n });
        assert!(a.contains(&Action::CommitReload { generation: 3 }));
        let a = s.exit(n, FAIL);
        assert!(logged(&a, "worker exited unexpectedly; restarting"));
    }

    #[test]
    fn reload_asked_for_in_the_turn_a_reload_failed_follows_it() {
        let mut s = Sim::running(params(1));
        s.reload(Some(C1));
        let n = s.pid(2, 0);
        let a = s.turn(vec![
            Event::WorkerExited { pid: n, status: FAIL },
            Event::ReloadRequested {
                from: Some(C2),
                if_generation: None,
            },
        ]);
        assert_eq!(
            replies(&a).iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            vec![(C1, false)]
        );
        assert_eq!(prepares(&a), 1);
        assert_eq!(s.g.reloading(), Some(3));
        let a = s.ready_all(3);
        assert_eq!(
            replies(&a).iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
            vec![(C2, true)]
        );
    }

    #[test]
    fn reload_with_one_of_n_slots_failing_to_spawn_kills_the_others() {
        let mut s = Sim::running(params(3));
        s.fail_spawn.push((2, 1));
        let a = s.reload(Some(C1));
        assert_eq!(spawns(&a), vec![(2, 0), (2, 1)]);
        let n0 = s.pid(2, 0);
        assert_eq!(killed(&a), vec![n0]);
        assert_eq!(
            replies(&a),
            vec![(
                C1,
                false,
                "reload failed: starting worker: exec: ENOENT; generation 1 keeps serving".into()
            )]
        );
        assert_eq!(s.g.generation(), 1);
        assert_eq!(s.g.next_generation(), 3);
    }

    #[test]
    fn max_draining_kills_the_oldest_generation() {
        let mut s = Sim::running(Params {
            max_draining: 1,
            ..params(1)
        });
        let g1 = s.pid(1, 0);
        s.reload(None);
        s.ready_all(2);
        let g2 = s.pid(2, 0);
        assert!(matches!(s.state(g1), State::Stopping { .. }));
        s.reload(None);
        let a = s.ready_all(3);
        // Generation 1 and 2 both drain: 1 is one too many.
        assert_eq!(killed(&a), vec![g1]);
        assert_eq!(signalled(&a), vec![g2]);
        assert!(logged(&a, "too many generations draining"));
        assert!(matches!(s.state(g2), State::Stopping { .. }));
    }

    #[test]
    fn stop_during_a_reload_cancels_it() {
        let mut s = Sim::running(params(1));
        s.reload(Some(C1));
        s.reload(Some(C2));
        let a = s.step(Event::StopRequested {
            by: StopBy::Signal(Signal::SIGINT),
        });
        assert_eq!(
            replies(&a),
            vec![
                (C1, false, "reload cancelled: the master is stopping".into()),
                (C2, false, "reload cancelled: the master is stopping".into()),
            ]
        );
        assert!(a.contains(&Action::DiscardReload {
            generation: 2,
            failed: false
        }));
        assert!(a.contains(&Action::CancelUpgrade));
        assert!(a.contains(&Action::TellSystemd(Systemd::Stopping)));
        assert_eq!(signalled(&a), vec![s.pid(1, 0), s.pid(2, 0)]);
        assert_eq!(s.g.reloading(), None);
        // The new worker becoming ready now commits nothing.
        let a = s.step(Event::WorkerReady { pid: s.pid(2, 0) });
        assert!(a.is_empty());
        let a = reap_all(&mut s);
        assert_eq!(exit_code(&a), Some(0));
        assert!(spawns(&a).is_empty());
    }

    #[test]
    fn old_worker_exiting_during_a_reload_under_each_policy() {
        // (policy, exit status, restarted, commit: master stops after a failed reload)
        let cases = [
            (Restart::Always, CLEAN, true),
            (Restart::Always, FAIL, true),
            (Restart::OnFailure, CLEAN, false),
            (Restart::OnFailure, FAIL, true),
            (Restart::Never, CLEAN, false),
            (Restart::Never, FAIL, false),
        ];
        for (policy, status, restarted) in cases {
            for reload_succeeds in [true, false] {
                let what = format!("{policy:?} {status} reload_succeeds={reload_succeeds}");
                let mut s = Sim::running(with_restart(1, policy));
                s.reload(None);
                let a = s.exit(s.pid(1, 0), status);
                assert_eq!(s.g.slots()[0].restart_at.is_some(), restarted, "{what}");
                // The starting generation counts as live: the master does not stop.
                assert_eq!(s.g.phase(), Phase::Running, "{what}");
                assert!(signalled(&a).is_empty(), "{what}");
                let a = if reload_succeeds {
                    s.ready_all(2)
                } else {
                    s.exit(s.pid(2, 0), FAIL)
                };
                if reload_succeeds {
                    assert_eq!(s.g.generation(), 2, "{what}");
                    assert_eq!(s.g.phase(), Phase::Running, "{what}");
                    // The new generation's slots start afresh.
                    assert!(s.g.slots()[0].restart_at.is_none(), "{what}");
                } else if restarted {
                    assert_eq!(s.g.phase(), Phase::Running, "{what}");
                } else {
                    // Nothing serves and nothing will: the master stops.
                    assert!(logged(&a, "no workers left and none to restart"), "{what}");
                    assert_eq!(s.g.phase(), Phase::Stopping, "{what}");
                    assert_eq!(s.g.exit_code(), i32::from(status != CLEAN), "{what}");
                }
            }
        }
    }

    // ---- crashes and restarts --------------------------------------------------------------

    #[test]
    fn restart_policies_decide_what_a_crash_does() {
        // (policy, status, restarted, master stops, exit code)
        let cases = [
            (Restart::Always, CLEAN, true, false, 0),
            (Restart::Always, FAIL, true, false, 0),
            (Restart::Always, ExitStatus::Signal(9), true, false, 0),
            (Restart::OnFailure, CLEAN, false, true, 0),
            (Restart::OnFailure, FAIL, true, false, 0),
            (Restart::Never, CLEAN, false, true, 0),
            (Restart::Never, FAIL, false, true, 1),
        ];
        for (policy, status, restarted, stops, code) in cases {
            let what = format!("{policy:?} {status}");
            let mut s = Sim::running(with_restart(1, policy));
            let a = s.exit(s.pid(1, 0), status);
            assert_eq!(s.g.slots()[0].restart_at.is_some(), restarted, "{what}");
            assert_eq!(s.g.phase() == Phase::Stopping, stops, "{what}");
            assert_eq!(exit_code(&a), stops.then_some(code), "{what}");
            if !restarted {
                assert!(logged(&a, "not restarting (restart policy)"), "{what}");
            }
        }
    }

    #[test]
    fn clean_exit_under_on_failure_keeps_the_master_while_others_serve() {
        let mut s = Sim::running(with_restart(2, Restart::OnFailure));
        s.exit(s.pid(1, 0), CLEAN);
        assert_eq!(s.g.phase(), Phase::Running);
        let a = s.exit(s.pid(1, 1), CLEAN);
        assert_eq!(s.g.phase(), Phase::Stopping);
        assert_eq!(exit_code(&a), Some(0));
    }

    #[test]
    fn crash_restart_back_off_doubles_up_to_its_cap() {
        let mut s = Sim::running(params(1));
        let mut delays = Vec::new();
        for _ in 0..12 {
            s.exit(s.pid(1, 0), FAIL);
            let at = s.g.slots()[0].restart_at.expect("restart scheduled");
            delays.push(at - s.now);
            assert_eq!(s.g.next_deadline(), Some(at));
            s.now = at;
            let a = s.step(Event::Tick);
            assert_eq!(spawns(&a), vec![(1, 0)]);
        }
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            vec![100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
        );
        assert_eq!(s.g.slots()[0].restarts, 12);
        assert_eq!(s.g.restarts(&s.g.workers()[0]), 12);
    }

    #[test]
    fn crash_back_off_is_forgotten_after_a_healthy_run() {
        let mut s = Sim::running(params(1));
        for _ in 0..3 {
            s.exit(s.pid(1, 0), FAIL);
            s.now = s.g.slots()[0].restart_at.expect("restart");
            s.step(Event::Tick);
        }
        assert_eq!(s.g.slots()[0].failures, 3);
        let pid = s.pid(1, 0);
        s.step(Event::WorkerReady { pid });
        s.advance(BACKOFF_RESET);
        s.exit(pid, FAIL);
        assert_eq!(s.g.slots()[0].failures, 1);
        assert_eq!(s.g.slots()[0].restart_at, Some(s.now + BACKOFF_MIN));
    }

    #[test]
    fn a_failed_restart_spawn_backs_off_again() {
        let mut s = Sim::running(params(1));
        s.exit(s.pid(1, 0), FAIL);
        s.fail_spawn.push((1, 0));
        s.advance(BACKOFF_MIN);
        let a = s.step(Event::Tick);
        assert_eq!(spawns(&a), vec![(1, 0)]);
        assert!(logged(&a, "starting worker: exec: ENOENT"));
        assert_eq!(s.g.slots()[0].failures, 2);
        assert_eq!(s.g.slots()[0].restart_at, Some(s.now + 2 * BACKOFF_MIN));
        assert_eq!(s.g.phase(), Phase::Running);
    }

    #[test]
    fn restarted_worker_missing_its_start_timeout_is_a_crash() {
        let mut s = Sim::running(params(1));
        s.exit(s.pid(1, 0), FAIL);
        s.advance(BACKOFF_MIN);
        s.step(Event::Tick);
        let pid = s.pid(1, 0);
        s.advance(10 * SEC);
        let a = s.step(Event::Tick);
        assert_eq!(killed(&a), vec![pid]);
        assert!(logged(&a, "did not become ready within 10s"));
        assert_eq!(s.g.slots()[0].restart_at, Some(s.now + 2 * BACKOFF_MIN));
        // Its exit after the kill was asked for: nothing more.
        let a = s.exit(pid, ExitStatus::Signal(9));
        assert!(logged(&a, "worker exited"));
        assert_eq!(s.g.slots()[0].failures, 2);
    }

    #[test]
    fn old_generation_exiting_after_commit_is_not_restarted() {
        let mut s = Sim::running(with_restart(1, Restart::Never));
        let old = s.pid(1, 0);
        s.reload(None);
        s.ready_all(2);
        let a = s.exit(old, FAIL);
        assert!(logged(&a, "worker exited"));
        assert!(spawns(&a).is_empty());
        assert_eq!(s.g.phase(), Phase::Running);
        assert_eq!(s.g.exit_code(), 0);
    }

    // ---- stop --------------------------------------------------------------------------------

    #[test]
    fn stop_signals_every_worker_and_kills_after_stop_timeout() {
        let mut s = Sim::running(params(2));
        let pids = s.pids(1);
        let a = s.step(Event::StopRequested { by: StopBy::Control });
        assert_eq!(signalled(&a), pids);
        assert!(a.contains(&Action::Signal {
            pid: pids[0],
            signal: Signal::SIGTERM
        }));
        assert_eq!(s.g.next_deadline(), Some(s.now + 5 * SEC));
        s.advance(5 * SEC);
        let a = s.step(Event::Tick);
        assert_eq!(killed(&a), pids);
        let a = s.exit(pids[0], ExitStatus::Signal(9));
        assert_eq!(exit_code(&a), None);
        let a = s.exit(pids[1], ExitStatus::Signal(9));
        assert_eq!(exit_code(&a), Some(0));
        assert!(s.g.finished());
    }

    #[test]
    fn second_stop_signal_kills_but_a_second_control_stop_does_not() {
        let mut s = Sim::running(params(2));
        s.step(Event::StopRequested {
            by: StopBy::Signal(Signal::SIGTERM),
        });
        let a = s.step(Event::StopRequested { by: StopBy::Control });
        assert!(a.is_empty());
        let a = s.step(Event::StopRequested {
            by: StopBy::Signal(Signal::SIGQUIT),
        });
        assert_eq!(killed(&a), s.pids(1));
        assert!(logged(&a, "second stop signal"));
        // A third one has nothing left to do.
        let a = s.step(Event::StopRequested {
            by: StopBy::Signal(Signal::SIGTERM),
        });
        assert!(killed(&a).is_empty());
    }

    #[test]
    fn stop_cancels_pending_crash_restarts() {
        let mut s = Sim::running(params(2));
        s.exit(s.pid(1, 0), FAIL);
        s.step(Event::StopRequested { by: StopBy::Control });
        assert!(s.g.slots().iter().all(|sl| sl.restart_at.is_none()));
        s.advance(BACKOFF_MAX);
        let a = s.step(Event::Tick);
        assert!(spawns(&a).is_empty());
        // A worker that exits on its own while stopping is not restarted either.
        let a = s.exit(s.pid(1, 1), FAIL);
        assert!(spawns(&a).is_empty());
        assert_eq!(exit_code(&a), Some(0));
    }

    // ---- odds and ends -------------------------------------------------------------------------

    #[test]
    fn events_for_unknown_pids_change_nothing() {
        let mut s = Sim::running(params(1));
        let stranger = Pid::from_raw(4242);
        assert!(s.step(Event::WorkerReady { pid: stranger }).is_empty());
        let a = s.exit(stranger, FAIL);
        assert!(logged(&a, "reaped orphan"));
        assert_eq!(a.len(), 1);
        assert_eq!(s.g.phase(), Phase::Running);
    }

    #[test]
    fn upgrade_is_refused_while_starting_reloading_or_stopping() {
        let mut s = Sim::new(params(1));
        s.step(Event::Start);
        assert_eq!(s.g.upgrade_refusal(), Some("the first generation is still starting"));
        s.ready_all(1);
        assert_eq!(s.g.upgrade_refusal(), None);
        s.reload(None);
        assert_eq!(s.g.upgrade_refusal(), Some("a reload is under way"));
        s.ready_all(2);
        assert_eq!(s.g.upgrade_refusal(), None);
        s.step(Event::StopRequested { by: StopBy::Control });
        assert_eq!(s.g.upgrade_refusal(), Some("the master is stopping"));
    }

    #[test]
    fn resumed_machine_runs_the_handed_over_generation() {
        let now = Instant::now();
        let worker = Worker {
            pid: Pid::from_raw(7),
            generation: 4,
            slot: 0,
            state: State::Ready,
            started: now,
            stop_signal: Signal::SIGTERM,
            stop_timeout: 5 * SEC,
            start_timeout: 10 * SEC,
            tail: Default::default(),
        };
        let mut g = Generations::resume(
            Resumed {
                generation: 4,
                next_generation: 6,
                attempt: 3,
                params: params(1),
                slots: vec![Slot {
                    ready_once: true,
                    ..Slot::default()
                }],
                workers: vec![worker],
            },
            "/etc/zdd.toml",
        );
        assert_eq!(g.phase(), Phase::Running);
        let a = g.handle(
            now,
            Event::ReloadRequested {
                from: None,
                if_generation: Some(4),
            },
        );
        assert!(a.contains(&Action::PrepareReload {
            attempt: 4,
            generation: 6
        }));
        let a = g.handle(now, Event::StopRequested { by: StopBy::Control });
        assert!(!a.iter().any(|a| matches!(a, Action::StartFailed { .. })));
    }
}
