//! The loop's side of `[worker.probe]`: the probes in flight (their sockets are polled like
//! every other fd of the master) and the schedule of `interval` probes of serving workers.
//!
//! Two kinds of probe. A **cut-over** probe is asked for by the machine
//! ([`Action::Probe`]) for a worker that said it is ready: attempts until one passes or
//! `1 + retries` failed; its verdict goes back as [`Event::ProbePassed`] or
//! [`Event::ProbeFailed`], and the machine commits the reload or fails it. A **serving** probe
//! is the loop's own: every `interval`, each ready worker of the serving generation gets one
//! attempt; the loop counts consecutive misses, and after `failures` of them feeds the same
//! [`Event::ProbeFailed`], on which the machine replaces the worker.
//!
//! Probes are serviced after the log pipes in each turn (`Master::service_probes`): I/O on
//! their sockets first, then what is due, then the serving schedule. A probe of a worker that
//! is no longer in the state it was probed for (it exited, was stopped, the reload failed) is
//! dropped, socket and all. With no probe configured nothing here holds a deadline: an idle
//! master still never wakes.

use super::*;
use crate::config::ProbeConfig;
use crate::worker::probe::{Probe, Spec, Verdict};
use crate::worker::State;

/// What a probe in flight is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    CutOver,
    Serving,
}

/// The interval schedule of one serving worker.
#[derive(Debug, Clone, Copy)]
pub(super) struct Schedule {
    next: Instant,
    misses: u32,
}

/// The probes the loop runs.
#[derive(Default)]
pub(super) struct Probes {
    running: Vec<(Kind, Probe)>,
    /// Where the probes' sockets are in this turn's pollfd array: (index, pid).
    polled: Vec<(usize, Pid)>,
    /// What poll said of them: (pid, revents).
    woke: Vec<(Pid, i16)>,
    serving: BTreeMap<Pid, Schedule>,
}

impl Probes {
    /// Add the probes' sockets to the poll set.
    pub(super) fn add_to_poll(&mut self, fds: &mut Vec<libc::pollfd>) {
        self.polled.clear();
        for (_, p) in &self.running {
            if let Some((fd, events)) = p.poll_fd() {
                self.polled.push((fds.len(), p.pid()));
                fds.push(libc::pollfd { fd, events, revents: 0 });
            }
        }
    }

    /// Take what poll reported for the probes' sockets.
    pub(super) fn after_poll(&mut self, fds: &[libc::pollfd]) {
        self.woke.clear();
        for &(i, pid) in &self.polled {
            if let Some(p) = fds.get(i).filter(|p| p.revents != 0) {
                self.woke.push((pid, p.revents));
            }
        }
        self.polled.clear();
    }

    /// The earliest time a probe needs the loop.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let running = self.running.iter().filter_map(|(_, p)| p.deadline());
        let serving = self.serving.values().map(|s| s.next);
        running.chain(serving).min()
    }

    fn is_running(&self, pid: Pid, kind: Kind) -> bool {
        self.running.iter().any(|(k, p)| *k == kind && p.pid() == pid)
    }

    /// Forget a worker (reaped).
    pub(super) fn forget(&mut self, pid: Pid) {
        self.running.retain(|(_, p)| p.pid() != pid);
        self.serving.remove(&pid);
    }
}

impl Master {
    /// [`Action::Probe`]: start the cut-over probe of worker `pid`; a probe that cannot even
    /// start is a failed one.
    pub(super) fn start_probe(&mut self, pid: Pid) -> Option<Event> {
        let spec = self.probe_config_of(pid).map(|c| Spec::cut_over(&c));
        let listener = self.workers.iter().find(|w| w.pid == pid).and_then(|w| w.probe.clone());
        match (spec, listener) {
            (Some(spec), Some(listener)) => {
                self.probes.running.retain(|(_, p)| p.pid() != pid);
                debug!(self.log, "probing worker"; "probe" => spec.what(), "pid" => pid.as_raw());
                let probe = Probe::start(spec, pid, listener, Instant::now());
                self.probes.running.push((Kind::CutOver, probe));
                None
            }
            _ => Some(Event::ProbeFailed {
                pid,
                reason: format!(
                    "probe of worker pid {pid}: the worker has no probe listener (started without [worker.probe])"
                ),
            }),
        }
    }

    /// The `[worker.probe]` of the config worker `pid` was started with.
    fn probe_config_of(&self, pid: Pid) -> Option<ProbeConfig> {
        let generation = self.workers.iter().find(|w| w.pid == pid)?.generation;
        let config = match &self.pending {
            Some(p) if p.generation == generation => &p.config,
            _ => &self.config,
        };
        config.worker.probe.clone()
    }

    /// No probe runs and none is configured: nothing to do (an idle master never wakes).
    fn probes_idle(&self) -> bool {
        self.probes.running.is_empty() && self.probes.serving.is_empty() && self.config.worker.probe.is_none()
    }

    /// Before the poll, after the machine's Tick: drop the probes of workers that left the
    /// state they were probed in, and bring the serving schedule up to date (a worker that
    /// just became ready gets its first `interval` deadline before the loop sleeps).
    pub(super) fn prepare_probes(&mut self) {
        if self.probes_idle() {
            return;
        }
        self.drop_unwanted_probes();
        self.schedule_serving_probes();
    }

    /// After the log pipes: the probes' I/O, what is due, the serving schedule; verdicts go
    /// to the machine.
    pub(super) fn service_probes(&mut self) {
        if self.probes_idle() {
            return;
        }
        self.drop_unwanted_probes();
        let mut verdicts: Vec<(Kind, Pid, Verdict)> = Vec::new();
        for (pid, revents) in std::mem::take(&mut self.probes.woke) {
            let now = Instant::now();
            if let Some((kind, p)) = self.probes.running.iter_mut().find(|(_, p)| p.pid() == pid) {
                if let Some(v) = p.on_io(revents, now) {
                    verdicts.push((*kind, pid, v));
                }
            }
        }
        let now = Instant::now();
        for (kind, p) in &mut self.probes.running {
            if p.deadline().is_some_and(|d| d <= now) {
                if let Some(v) = p.on_time(now) {
                    verdicts.push((*kind, p.pid(), v));
                }
            }
        }
        for (kind, pid, _) in &verdicts {
            let (kind, pid) = (*kind, *pid);
            self.probes.running.retain(|(k, p)| !(*k == kind && p.pid() == pid));
        }
        for (kind, pid, verdict) in verdicts {
            match kind {
                Kind::CutOver => self.cut_over_verdict(pid, verdict),
                Kind::Serving => self.serving_verdict(pid, verdict),
            }
        }
        self.schedule_serving_probes();
    }

    fn cut_over_verdict(&mut self, pid: Pid, verdict: Verdict) {
        match verdict {
            Ok(()) => {
                info!(self.log, "probe passed"; "pid" => pid.as_raw());
                self.event(Event::ProbePassed { pid });
            }
            Err(reason) => self.event(Event::ProbeFailed { pid, reason }),
        }
    }

    fn serving_verdict(&mut self, pid: Pid, verdict: Verdict) {
        let Some(c) = self.config.worker.probe.clone() else {
            return;
        };
        let interval = c.interval.unwrap_or(Duration::from_secs(1));
        let Some(s) = self.probes.serving.get_mut(&pid) else {
            return;
        };
        s.next = clock::after(Instant::now(), interval);
        match verdict {
            Ok(()) => {
                if s.misses > 0 {
                    info!(self.log, "probe answered again"; "after_misses" => s.misses, "pid" => pid.as_raw());
                }
                s.misses = 0;
            }
            Err(reason) => {
                s.misses += 1;
                let misses = s.misses;
                warn!(self.log, "probe missed"; "reason" => &reason, "misses" => misses, "failures" => c.failures, "pid" => pid.as_raw());
                if misses >= c.failures {
                    self.probes.serving.remove(&pid);
                    let reason = format!("{reason}; {misses} consecutive misses: replacing it");
                    self.event(Event::ProbeFailed { pid, reason });
                }
            }
        }
    }

    /// Keep only the probes whose worker is still in the state they were started for: a
    /// cut-over probe while the machine waits for it, a serving probe while the worker serves.
    /// (A worker handed over by an upgrade while its probe ran is asked for again by the
    /// machine: `Generations::resume`.)
    fn drop_unwanted_probes(&mut self) {
        let serving = self.gens.generation();
        let gens = &self.gens;
        self.probes.running.retain(|(kind, p)| {
            gens.worker(p.pid()).is_some_and(|w| match kind {
                Kind::CutOver => matches!(w.state, State::Probing { .. }),
                Kind::Serving => w.state == State::Ready && w.generation == serving,
            })
        });
    }

    /// Every ready worker of the serving generation gets an `interval` probe; workers that
    /// left that state leave the schedule.
    fn schedule_serving_probes(&mut self) {
        let interval = match self.config.worker.probe.as_ref().and_then(|c| c.interval) {
            Some(i) if self.gens.phase() == Phase::Running => i,
            _ => {
                self.probes.serving.clear();
                return;
            }
        };
        let now = Instant::now();
        let serving = self.gens.generation();
        let ready: Vec<Pid> = self
            .gens
            .workers()
            .iter()
            .filter(|w| w.state == State::Ready && w.generation == serving)
            .map(|w| w.pid)
            .collect();
        self.probes.serving.retain(|pid, _| ready.contains(pid));
        for pid in ready {
            let running = self.probes.is_running(pid, Kind::Serving);
            let s = self.probes.serving.entry(pid).or_insert(Schedule {
                next: clock::after(now, interval),
                misses: 0,
            });
            if s.next > now || running {
                continue;
            }
            // Due: one attempt; the next is scheduled from its verdict.
            s.next = clock::after(now, interval.max(Duration::from_millis(1)));
            let listener = self.workers.iter().find(|w| w.pid == pid).and_then(|w| w.probe.clone());
            let (Some(listener), Some(c)) = (listener, &self.config.worker.probe) else {
                continue;
            };
            let probe = Probe::start(Spec::serving(c), pid, listener, now);
            self.probes.running.push((Kind::Serving, probe));
        }
    }
}
