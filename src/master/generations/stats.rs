//! Counters of the machine's decisions, for `[master] metrics` and `zdd status --json`: plain
//! numbers, bumped by one-line hooks where the machine decides (a reload's verdict, a worker
//! spawned, a worker gone and why, a crash restart started). The loop formats them
//! (master/metrics.rs); they cross an upgrade in the hand-over state (every field has a serde
//! default, so a state without them, or with fewer, reads as zeros).

use std::time::{Duration, Instant};

use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::metrics::Histogram;
use crate::worker::State;

/// Bounds of the reload duration histogram, in microseconds: 1 ms to 10 min (a reload with a
/// worker ready at once takes a few ms; `start_timeout` can be minutes).
pub const RELOAD_BUCKETS_US: [u64; 18] = [
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
    600_000_000,
];

/// How a reload request ended.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Reloads {
    /// Committed: the new generation serves.
    pub ok: u64,
    /// Failed: the config or a listener could not be prepared, or a new worker failed; the
    /// serving generation is untouched (or rolled back to).
    pub failed: u64,
    /// Refused without starting: `--if-generation` did not match, or the master was stopping.
    pub refused: u64,
    /// Under way when the master began to stop.
    pub cancelled: u64,
}

/// Why a worker is gone, counted when it is reaped.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Exits {
    /// Exited after its stop signal (a reload's cut-over, a stop, a replacement).
    pub stopped: u64,
    /// Exited after SIGKILL: its stop timeout passed, `max_draining`, a failed reload's new
    /// generation, a second stop signal.
    pub killed: u64,
    /// Exited on its own, unasked (during start-up too).
    pub crashed: u64,
    /// Killed for not being ready within `start_timeout`.
    pub start_timeout: u64,
    /// Killed or replaced because its probe failed (at cut-over, or `interval` misses).
    pub probe_failed: u64,
    /// Replaced because its watchdog expired (or it sent `WATCHDOG=trigger`).
    pub watchdog: u64,
    /// Replaced by a new worker in its slot (`max_lifetime`, `max_rss`).
    pub recycled: u64,
}

/// The reason an [`Exits`] entry is counted under, decided before the worker is reaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    StartTimeout,
    ProbeFailed,
    Watchdog,
    Recycled,
}

/// The counters.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub reloads: Reloads,
    /// Duration of reloads that committed, from the attempt's start to its verdict.
    pub reload_seconds_ok: Histogram,
    /// Duration of reloads that failed.
    pub reload_seconds_failed: Histogram,
    /// Worker processes spawned (first start, reloads, restarts, roll-backs).
    pub worker_starts: u64,
    /// Spawns that failed before the worker ran (exec, credentials, cgroup).
    pub spawn_failures: u64,
    pub exits: Exits,
    /// Crash restarts started (after their back-off).
    pub restarts: u64,
    /// When the reload under way started (not handed over: upgrades wait for reloads).
    #[serde(skip)]
    reload_began: Option<Instant>,
    /// When the serving generation began serving (handed over as an age, see
    /// `serving_for`).
    #[serde(skip)]
    serving_since: Option<Instant>,
    /// Workers ended for a reason of their own, until they are reaped (not handed over: such a
    /// worker is counted as killed then).
    #[serde(skip)]
    ending: Vec<(Pid, Ending)>,
}

impl Stats {
    pub(super) fn reload_began(&mut self, now: Instant) {
        self.reload_began = Some(now);
    }

    /// A reload attempt's verdict; `None` for one that was cancelled.
    pub(super) fn reload_done(&mut self, now: Instant, ok: Option<bool>) {
        let took = self.reload_began.take().map(|t| now.saturating_duration_since(t));
        let (count, h) = match ok {
            Some(true) => (&mut self.reloads.ok, Some(&mut self.reload_seconds_ok)),
            Some(false) => (&mut self.reloads.failed, Some(&mut self.reload_seconds_failed)),
            None => (&mut self.reloads.cancelled, None),
        };
        *count += 1;
        if let (Some(h), Some(took)) = (h, took) {
            h.observe(&RELOAD_BUCKETS_US, took);
        }
    }

    /// Zdd ends worker `pid` for `why`: its exit is counted under that.
    pub(super) fn ending(&mut self, pid: Pid, why: Ending) {
        if !self.ending.iter().any(|&(p, _)| p == pid) {
            self.ending.push((pid, why));
        }
    }

    /// Worker `pid`, in state `prev`, was reaped; `expected` when zdd had asked it to go.
    pub(super) fn gone(&mut self, pid: Pid, prev: State, expected: bool) {
        let why = self
            .ending
            .iter()
            .position(|&(p, _)| p == pid)
            .map(|i| self.ending.remove(i).1);
        let e = &mut self.exits;
        *match (why, expected, prev) {
            (Some(Ending::StartTimeout), ..) => &mut e.start_timeout,
            (Some(Ending::ProbeFailed), ..) => &mut e.probe_failed,
            (Some(Ending::Watchdog), ..) => &mut e.watchdog,
            (Some(Ending::Recycled), ..) => &mut e.recycled,
            (None, false, _) => &mut e.crashed,
            (None, true, State::Killed) => &mut e.killed,
            (None, true, _) => &mut e.stopped,
        } += 1;
    }

    /// A generation began serving (the first start succeeded, or a reload committed).
    pub(super) fn serving(&mut self, now: Instant) {
        self.serving_since = Some(now);
    }

    /// How long the serving generation has served, at `now`.
    pub fn serving_for(&self, now: Instant) -> Option<Duration> {
        self.serving_since.map(|t| now.saturating_duration_since(t))
    }

    /// After an upgrade: the counters handed over, and how long the generation had served.
    pub fn resumed(mut self, now: Instant, serving_for: Option<Duration>) -> Stats {
        self.serving_since = serving_for.map(|d| now.checked_sub(d).unwrap_or(now));
        self
    }
}
