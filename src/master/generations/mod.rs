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
//! Rolling reloads (`reload = "rolling"`) replace the serving generation `max_surge` slots at a
//! time: a new worker for a slot, ready (and probed), then that slot's old worker is asked to
//! stop, then the next slot. If a new worker fails, the slots not replaced yet are left alone and
//! the replaced ones are rolled back the same way: a worker of the serving generation for the
//! slot, ready, then the new one is stopped; the reload's verdict comes when the roll-back is
//! over. Whenever a serving-generation worker becomes ready, any worker of a generation that
//! never committed left in its slot is stopped ("superseded").
//!
//! Hooks (`[hooks]`): with before_reload, a prepared reload first asks the loop to run the
//! hook ([`Action::RunHook`]) and spawns no worker until [`Event::HookDone`] says it passed; a
//! failed hook fails the reload like a failed worker, with nothing started. after_reload is
//! asked for after the commit; its outcome is only logged, and the next reload waits for it
//! (hooks never overlap). A stop kills a running hook ([`Action::KillHook`]).
//!
//! After a cut-over the new generation is watched for `stable_after`: if no worker of it serves
//! any more within that time, the machine says so (log, status, systemd) and old generations
//! still draining are not SIGKILLed while none serves.
//!
//! Each worker's own state (`Starting → (Probing →) Ready → Stopping → Killed → Exited`)
//! changes only through [`crate::worker::transition`]; a probe's verdict comes from the loop.

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
    /// With `[worker.probe]`: the longest the cut-over probe of one worker may take (a backstop;
    /// the loop's probe always gives its verdict before).
    pub probe: Option<Duration>,
    /// `reload = "rolling"`: how many slots are replaced at a time.
    pub rolling: Option<usize>,
    /// How long a new generation is watched after its cut-over (zero: not watched).
    pub stable_after: Duration,
    /// A ready worker silent (no `WATCHDOG=1`) this long is replaced.
    pub watchdog: Option<Duration>,
    /// A worker that lived this long, plus its share of `recycle_jitter`, is recycled.
    pub max_lifetime: Option<Duration>,
    pub recycle_jitter: Duration,
    /// A worker whose processes use more resident memory (bytes) is recycled.
    pub max_rss: Option<u64>,
    /// `[hooks] before_reload` is configured: its time limit (`[hooks] timeout`).
    pub before_reload: Option<Duration>,
    /// `[hooks] after_reload` is configured.
    pub after_reload: bool,
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
            probe: w.probe.as_ref().map(crate::worker::probe::budget),
            rolling: match w.reload {
                crate::config::ReloadMode::AllAtOnce => None,
                crate::config::ReloadMode::Rolling { max_surge } => Some(max_surge),
            },
            stable_after: w.stable_after,
            watchdog: w.watchdog,
            max_lifetime: w.max_lifetime,
            recycle_jitter: w.recycle_jitter,
            max_rss: w.max_rss,
            before_reload: config.hooks.before_reload.as_ref().map(|_| config.hooks.timeout),
            after_reload: config.hooks.after_reload.is_some(),
        }
    }
}

/// A reload hook (`[hooks]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// After the new config is read, before any new worker starts: failing, it fails the
    /// reload.
    BeforeReload,
    /// Once the new generation serves: failing, it is logged.
    AfterReload,
}

impl Hook {
    /// The config key, which names the hook in messages and logs.
    pub fn name(self) -> &'static str {
        match self {
            Hook::BeforeReload => "before_reload",
            Hook::AfterReload => "after_reload",
        }
    }
}

/// How a hook ended, as the loop saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookResult {
    /// Exited with status 0.
    Passed,
    /// Exited otherwise, was killed by a signal, could not be started or ran out of time:
    /// `reason` is the whole sentence (`before_reload hook ["bin/check"] exited with status
    /// 2`), `tail` its last lines.
    Failed { reason: String, tail: Vec<String> },
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
    /// Why its last worker went, when the slot was restarted (for `status`).
    pub last_exit: Option<String>,
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
    /// While ready, with a `watchdog`: replaced unless a `WATCHDOG=1` comes before.
    pub watchdog_at: Option<Instant>,
    /// While ready in the serving generation, with `max_lifetime`: recycled then.
    pub recycle_at: Option<Instant>,
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
    /// READY=1 from the worker (or its process group), or the loop saw it listening.
    WorkerReady {
        pid: Pid,
    },
    /// The probe the loop ran for [`Action::Probe`] passed.
    ProbePassed {
        pid: Pid,
    },
    /// The cut-over probe failed, or a serving worker missed its periodic probes
    /// (`[worker.probe] interval`): `reason` names the probe, the target and the answer.
    ProbeFailed {
        pid: Pid,
        reason: String,
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
    /// `WATCHDOG=1` from the worker (`trigger`: `WATCHDOG=trigger`, replace it now).
    Watchdog {
        pid: Pid,
        trigger: bool,
    },
    /// The resident memory of the worker's processes, measured by the loop (with `max_rss`).
    WorkerRss {
        pid: Pid,
        bytes: u64,
    },
    /// The hook started for [`Action::RunHook`] ended (or could not be started).
    HookDone {
        which: Hook,
        generation: u64,
        result: HookResult,
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
    /// `STATUS={0}`
    Status(String),
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
    /// Probe the worker (`[worker.probe]`) through its private listener; answer with
    /// [`Event::ProbePassed`] or [`Event::ProbeFailed`].
    Probe {
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
    /// Start the hook with generation `generation`'s config (the pending reload's for
    /// before_reload, the serving one's for after_reload), without waiting for it; answer with
    /// [`Event::HookDone`] once it has ended.
    RunHook {
        which: Hook,
        generation: u64,
    },
    /// SIGKILL the hook's process group (the master is stopping); no [`Event::HookDone`] is
    /// needed.
    KillHook {
        which: Hook,
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
    /// Its before_reload hook is running: no worker of it is spawned yet.
    hook: bool,
    failure: Option<Failure>,
    /// A rolling reload's progress.
    roll: Option<Roll>,
}

/// A rolling reload's progress (see the module's theory of operation).
#[derive(Debug, Clone, Default)]
struct Roll {
    surge: usize,
    /// The next slot of the new generation to start.
    next: usize,
    /// Slots whose old worker was asked to stop, in that order.
    replaced: Vec<usize>,
    /// Rolling back after a failure.
    back: Option<RollBack>,
}

#[derive(Debug, Clone, Default)]
struct RollBack {
    /// Replaced slots still to give back to the serving generation.
    queue: std::collections::VecDeque<usize>,
    /// Slots whose serving-generation worker is starting.
    in_flight: Vec<usize>,
}

/// A slot being recycled: its serving worker `old` is stopped once the new one is ready.
#[derive(Debug, Clone)]
struct Recycle {
    slot: usize,
    old: Pid,
    why: String,
}

/// The watch over a new generation after its cut-over (`stable_after`).
#[derive(Debug, Clone, Copy)]
struct Watch {
    generation: u64,
    until: Instant,
}

/// What an outstanding [`Action::Spawn`] was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpawnFor {
    /// One slot of a whole generation (first start or reload): the next follows once it is
    /// spawned; a failure fails the generation.
    Generation { count: usize },
    /// A crash restart: a failure backs off again.
    Restart,
    /// One slot of a rolling reload's generation: a failure fails the reload.
    Roll,
    /// A new worker for a slot being recycled: a failure leaves the old one serving.
    Recycle,
    /// A replaced slot given back to the serving generation: a failure backs off like a crash.
    RollBack,
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
    /// The last worker that its restart policy did not bring back had failed.
    last_exit_failed: bool,
    exit_sent: bool,
    spawning: Vec<(u64, usize, SpawnFor)>,
    /// Control clients waiting for a reload attempt's outcome.
    waiters: Vec<(ClientId, u64)>,
    /// The config file, for progress messages.
    config_path: String,
    /// The reason of the probe verdict being fed (see `Event::ProbeFailed`).
    probe_verdict: Option<String>,
    watch: Option<Watch>,
    /// The serving generation stopped serving within `stable_after` of its cut-over: why.
    unstable: Option<String>,
    /// Recycling (care.rs): the one slot being recycled, the workers waiting their turn, and
    /// the back-offs after a failed recycle and after a fresh worker was over `max_rss`.
    recycling: Option<Recycle>,
    recycle_queue: std::collections::VecDeque<(Pid, String)>,
    recycle_retry_at: Option<Instant>,
    rss_hold: Option<(Instant, Duration)>,
    /// The after_reload hook of this generation is running (the next reload waits for it).
    after_hook: Option<u64>,
    /// Counters of the decisions taken (metrics, `status`).
    stats: Stats,
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
    /// The watch after the last cut-over, if it is still on: (generation, until).
    pub watch: Option<(u64, Instant)>,
    /// See [`Generations::unstable`].
    pub unstable: Option<String>,
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
            last_exit_failed: false,
            exit_sent: false,
            spawning: Vec::new(),
            waiters: Vec::new(),
            config_path: config_path.into(),
            probe_verdict: None,
            watch: None,
            unstable: None,
            recycling: None,
            recycle_queue: Default::default(),
            recycle_retry_at: None,
            rss_hold: None,
            after_hook: None,
            stats: Stats::default(),
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
        g.watch = state.watch.map(|(generation, until)| Watch { generation, until });
        g.unstable = state.unstable;
        // A probe under way did not cross the exec: ask for it again (the budget left stays the
        // backstop). It goes out with the first event's actions.
        for w in &g.workers {
            if matches!(w.state, State::Probing { .. }) {
                g.out.push(Action::Probe { pid: w.pid });
            }
        }
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

    /// The code [`Action::Exit`] will carry (the loop takes it from there).
    #[cfg(test)]
    pub fn exit_code(&self) -> i32 {
        self.exit_code
    }

    /// Stopping, and every worker is gone.
    pub fn finished(&self) -> bool {
        self.phase == Phase::Stopping && self.workers.is_empty() && self.spawning.is_empty()
    }

    /// Why the serving generation is not trusted: it stopped serving within `stable_after` of
    /// its cut-over (for `status`; cleared by the next cut-over).
    pub fn unstable(&self) -> Option<&str> {
        self.unstable.as_deref()
    }

    /// Counters of the decisions taken so far (metrics, `status`, the upgrade hand-over).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// After an upgrade: the counters the previous image handed over.
    pub fn restore_stats(&mut self, stats: Stats) {
        self.stats = stats;
    }

    /// The watch after the last cut-over, (generation, until), for an upgrade to hand over.
    pub fn watch(&self) -> Option<(u64, Instant)> {
        self.watch.map(|w| (w.generation, w.until))
    }

    /// The earliest deadline: a worker's start timeout, delayed readiness, probe or kill, or a
    /// slot's restart. Kills held back (see `holding`) are not deadlines.
    pub fn next_deadline(&self) -> Option<Instant> {
        let holding = self.holding();
        let workers = self
            .workers
            .iter()
            .filter(|w| !(holding && self.held(w)))
            .filter_map(|w| w.state.deadline());
        let care = self.care_deadlines();
        let restarts = self.slots.iter().filter_map(|s| s.restart_at);
        workers.chain(restarts).chain(care).min()
    }

    /// Why an upgrade cannot start now, if it cannot.
    pub fn upgrade_refusal(&self) -> Option<&'static str> {
        match (self.phase, &self.reload) {
            (Phase::Starting, _) => Some("the first generation is still starting"),
            (Phase::Stopping, _) => Some("the master is stopping"),
            (Phase::Running, Some(_)) => Some("a reload is under way"),
            (Phase::Running, None) if self.after_hook.is_some() => Some("the after_reload hook is running"),
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
                    self.feed(now, i, WorkerEvent::Ready(now));
                }
            }
            Event::ProbePassed { pid } => {
                if let Some(i) = self.index(pid) {
                    self.feed(now, i, WorkerEvent::ProbePassed);
                }
            }
            Event::ProbeFailed { pid, reason } => self.probe_failed(now, pid, reason),
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
                self.restarts_due(now);
                self.recycle_next(now);
                if self.finished() && !self.exit_sent {
                    self.exit_sent = true;
                    self.out.push(Action::Exit { code: self.exit_code });
                }
            }
            Event::ReloadRequested { from, if_generation } => self.request_reload(now, from, if_generation),
            Event::ReloadPrepared { generation, params } => self.prepared(generation, params),
            Event::ReloadPrepareFailed { generation, message } => self.prepare_failed(now, generation, message),
            Event::StopRequested { by } => self.stop_requested(now, by),
            Event::Watchdog { pid, trigger } => self.watchdog(now, pid, trigger),
            Event::WorkerRss { pid, bytes } => self.rss(now, pid, bytes),
            Event::HookDone {
                which,
                generation,
                result,
            } => self.hook_done(which, generation, result),
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
}

fn pid_kv(pid: Pid) -> Kv {
    Kv::I64(pid.as_raw().into())
}

mod care;
mod reload;
mod stats;
mod workers;

#[cfg(test)]
use stats::{Exits, Reloads};
pub use stats::{Stats, RELOAD_BUCKETS_US};

#[cfg(test)]
mod tests;
