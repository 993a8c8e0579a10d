//! The workers' side of the machine: spawning a generation slot by slot, each worker's
//! transitions and what they mean for its generation, crash restarts with back-off, and stop.

use super::*;

impl Generations {
    /// The parameters of a generation: the pending reload's, or the serving ones.
    pub(super) fn params_of(&self, generation: u64) -> Params {
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
    pub(super) fn spawn_generation(&mut self, params: &Params, generation: u64) {
        self.extend_timeout(params);
        if params.count > 0 {
            self.spawn(generation, 0, SpawnFor::Generation { count: params.count });
        }
    }

    /// Workers may take up to start_timeout (and their probe) to be ready: let systemd wait
    /// that long too.
    pub(super) fn extend_timeout(&mut self, params: &Params) {
        let extend = params
            .start_timeout
            .saturating_add(params.probe.unwrap_or_default())
            .saturating_add(Duration::from_secs(5));
        self.tell_systemd(Systemd::ExtendTimeout(extend));
    }

    pub(super) fn spawn(&mut self, generation: u64, slot: usize, why: SpawnFor) {
        self.spawning.push((generation, slot, why));
        self.out.push(Action::Spawn { generation, slot });
    }

    pub(super) fn take_spawning(&mut self, generation: u64, slot: usize) -> Option<SpawnFor> {
        let i = self
            .spawning
            .iter()
            .position(|&(g, s, _)| g == generation && s == slot)?;
        Some(self.spawning.remove(i).2)
    }

    /// The generation is still wanted as a whole: the first one starting, or the reload's
    /// (unless that is being rolled back).
    pub(super) fn is_starting_generation(&self, generation: u64) -> bool {
        match &self.reload {
            Some(r) if r.generation == generation => r.roll.as_ref().is_none_or(|roll| roll.back.is_none()),
            _ => self.phase == Phase::Starting && generation == self.generation,
        }
    }

    pub(super) fn spawned(&mut self, now: Instant, pid: Pid, generation: u64, slot: usize) {
        let why = self.take_spawning(generation, slot);
        self.stats.worker_starts += 1;
        let p = self.params_of(generation);
        let ready_at = match p.ready {
            Ready::Delay(d) => Some(clock::after(now, d)),
            Ready::Notify | Ready::Listening | Ready::Auto => None,
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
                probe: p.probe,
            },
            started: now,
            stop_signal: p.stop_signal,
            stop_timeout: p.stop_timeout,
            start_timeout: p.start_timeout,
            tail: Default::default(),
            watchdog_at: None,
            recycle_at: None,
        });
        // Wanted no more by the time it exists (the master is stopping, or its generation was
        // replaced or failed meanwhile): it is asked to stop at once, never left unsupervised.
        let wanted = self.phase != Phase::Stopping
            && ((generation == self.generation && !self.slot_taken(slot)) || self.is_starting_generation(generation));
        if !wanted {
            let i = self.workers.len() - 1;
            self.feed(now, i, WorkerEvent::Stop(now));
            return;
        }
        if let Some(SpawnFor::Generation { count }) = why {
            if slot + 1 < count && self.is_starting_generation(generation) {
                self.spawn(generation, slot + 1, SpawnFor::Generation { count });
            }
        }
    }

    pub(super) fn spawn_failed(&mut self, now: Instant, generation: u64, slot: usize, reason: String) {
        let why = self.take_spawning(generation, slot);
        self.stats.spawn_failures += 1;
        self.log(Level::Error, reason.clone(), vec![("generation", Kv::U64(generation))]);
        match why {
            Some(SpawnFor::Generation { .. } | SpawnFor::Roll) => {
                self.generation_failed(now, generation, slot, reason, vec![])
            }
            Some(SpawnFor::RollBack) if generation == self.generation && self.phase != Phase::Stopping => {
                self.schedule_restart(now, slot, Duration::ZERO, reason);
                self.rollback_slot_done(slot);
            }
            Some(SpawnFor::Restart) if generation == self.generation && self.phase != Phase::Stopping => {
                self.schedule_restart(now, slot, Duration::ZERO, reason)
            }
            Some(SpawnFor::Recycle) if generation == self.generation => {
                self.recycle_failed(now, slot, &reason);
            }
            Some(SpawnFor::Restart | SpawnFor::RollBack | SpawnFor::Recycle) | None => {}
        }
    }

    /// Feed an event to worker `i` and act on what it reports.
    pub(super) fn feed(&mut self, now: Instant, i: usize, event: WorkerEvent) {
        let was_ready = self.workers[i].state == State::Ready;
        let prev = self.workers[i].state;
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
                Effect::StartProbe => {
                    self.log(
                        Level::Debug,
                        "worker ready by its own account; probing it".into(),
                        vec![("generation", Kv::U64(generation)), ("pid", pid_kv(pid))],
                    );
                    self.out.push(Action::Probe { pid });
                }
                Effect::ProbeFailed { timed_out } => {
                    self.stats.ending(pid, stats::Ending::ProbeFailed);
                    let tail = escaped(&w.tail);
                    let verdict = self.probe_verdict.take();
                    let reason = match verdict {
                        Some(r) if !timed_out => r,
                        _ => format!("worker pid {pid}: its probe gave no verdict in time"),
                    };
                    self.generation_failed(now, generation, slot, reason, tail);
                }
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
                    self.arm_care(now, i);
                    if generation == self.generation {
                        self.stop_superseded(now, slot);
                        self.rollback_slot_done(slot);
                        self.recycled(now, slot, pid);
                    } else if self.rolling_forward(generation) {
                        self.replace_slot(now, slot);
                    }
                }

                Effect::StartTimedOut => {
                    self.stats.ending(pid, stats::Ending::StartTimeout);
                    let tail = escaped(&w.tail);
                    let reason = format!(
                        "worker pid {pid} did not become ready within {}{}",
                        humantime::format_duration(w.start_timeout),
                        self.params_of(generation).ready.timeout_hint()
                    );
                    self.generation_failed(now, generation, slot, reason, tail);
                }
                Effect::Gone { status, expected } => {
                    self.stats.gone(pid, prev, expected);
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
                        let tail = escaped(&w.tail);
                        let reason = format!("worker pid {pid} {status} during start-up");
                        self.worker_died(now, generation, slot, pid, status, lived, reason, tail, was_ready);
                    }
                }
            }
        }
    }

    /// A worker exited on its own.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn worker_died(
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
        self.rollback_slot_done(slot);
        if self.recycle_lost_old(pid) {
            // The recycle's new worker, already starting, takes the slot.
            return self.log(Level::Warn, "worker exited while being recycled".into(), kv(status));
        }
        if !was_ready && self.recycle_failed(now, slot, &reason) {
            return;
        }
        self.watch_after_death(now, generation);
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
            // If this leaves nothing to serve, the master's exit code is this worker's.
            self.last_exit_failed = !status.success();
            return self.stop_if_nothing_left(now);
        }
        self.schedule_restart(now, slot, lived, format!("worker pid {pid} {status}"));
        let delay = self
            .slots
            .get(slot)
            .and_then(|s| s.restart_at)
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
    pub(super) fn stop_if_nothing_left(&mut self, now: Instant) {
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
            self.exit_code = i32::from(self.last_exit_failed);
            self.begin_stop(now);
        }
    }

    /// Restart the slot after its back-off; `why` its last worker went (for `status`).
    pub(super) fn schedule_restart(&mut self, now: Instant, slot: usize, lived: Duration, why: String) {
        let Some(s) = self.slots.get_mut(slot) else { return };
        s.last_exit = Some(why);
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
    pub(super) fn generation_failed(
        &mut self,
        now: Instant,
        generation: u64,
        slot: usize,
        reason: String,
        tail: Vec<String>,
    ) {
        match &mut self.reload {
            Some(r) if r.generation == generation => {
                r.failure.get_or_insert(Failure { reason, tail });
            }
            _ if self.phase == Phase::Starting && generation == self.generation => {
                self.start_failure.get_or_insert(Failure { reason, tail });
            }
            _ if generation == self.generation && self.phase == Phase::Running => {
                if self.recycle_failed(now, slot, &reason) {
                    return;
                }
                // A restarted worker that never became ready: a crash like any other.
                self.log(Level::Warn, reason.clone(), vec![("generation", Kv::U64(generation))]);
                self.schedule_restart(now, slot, Duration::ZERO, reason);
                self.rollback_slot_done(slot);
            }
            _ => {}
        }
    }

    /// Workers' deadlines that are due: start timeouts, delayed readiness, stop timeouts.
    pub(super) fn tick(&mut self, now: Instant) {
        self.care_due(now);
        let holding = self.holding();
        for i in 0..self.workers.len() {
            if holding && self.held(&self.workers[i]) {
                continue;
            }
            if self.workers[i].state.deadline().is_some_and(|d| d <= now) {
                self.feed(now, i, WorkerEvent::Tick(now));
            }
        }
    }

    /// Crash restarts that are due. Run after the generation logic has decided this turn
    /// (`advance`): a commit replaces the slots, a stop clears them, and "is anything left to
    /// serve" still sees a slot that is about to restart; a restart spawned before those
    /// decisions would be a worker none of them knew about.
    pub(super) fn restarts_due(&mut self, now: Instant) {
        let due: Vec<usize> = (0..self.slots.len())
            .filter(|&s| self.slots[s].restart_at.is_some_and(|t| t <= now))
            .collect();
        for slot in due {
            self.slots[slot].restart_at = None;
            if self.slot_taken(slot) {
                continue;
            }
            self.slots[slot].restarts += 1;
            self.stats.restarts += 1;
            self.spawn(self.generation, slot, SpawnFor::Restart);
        }
    }

    pub(super) fn stop_requested(&mut self, now: Instant, by: StopBy) {
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

    pub(super) fn begin_stop(&mut self, now: Instant) {
        if self.phase == Phase::Starting {
            self.report_start_failed("the master was stopped during start-up".into(), vec![]);
        }
        self.phase = Phase::Stopping;
        self.tell_systemd(Systemd::Stopping);
        // Every reload a client still waits for, under way or queued, will not happen.
        self.kill_hooks();
        if let Some(r) = self.reload.take() {
            self.stats.reload_done(now, None);
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
        self.recycle_reset();
        self.out.push(Action::CancelUpgrade);
        for s in &mut self.slots {
            s.restart_at = None;
        }
        for i in 0..self.workers.len() {
            self.feed(now, i, WorkerEvent::Stop(now));
        }
    }

    pub(super) fn report_start_failed(&mut self, reason: String, tail: Vec<String>) {
        if !self.start_reported {
            self.start_reported = true;
            self.out.push(Action::StartFailed { reason, tail });
        }
    }
}

impl Generations {
    /// A probe's verdict against a worker: a cut-over probe that failed fails its generation
    /// like a missed readiness; a serving worker that missed its periodic probes is replaced.
    pub(super) fn probe_failed(&mut self, now: Instant, pid: Pid, reason: String) {
        let Some(i) = self.index(pid) else { return };
        match self.workers[i].state {
            State::Probing { .. } => {
                self.probe_verdict = Some(reason);
                self.feed(now, i, WorkerEvent::ProbeFailed(now));
                self.probe_verdict = None;
            }
            State::Ready if self.workers[i].generation == self.generation && self.phase == Phase::Running => {
                self.stats.ending(pid, stats::Ending::ProbeFailed);
                self.log(
                    Level::Warn,
                    format!("worker failed its health probe; replacing it: {reason}"),
                    vec![("generation", Kv::U64(self.generation)), ("pid", pid_kv(pid))],
                );
                self.replace(now, i, format!("worker pid {pid} failed its health probe"));
            }
            _ => {}
        }
    }

    /// A serving-generation worker of `slot` is ready: a worker of a generation that never
    /// committed still in that slot (a rolled-back one) has its replacement and is stopped.
    pub(super) fn stop_superseded(&mut self, now: Instant, slot: usize) {
        let forward = self
            .reload
            .as_ref()
            .filter(|r| r.roll.as_ref().is_none_or(|x| x.back.is_none()));
        let keep = forward.map(|r| r.generation);
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.slot == slot
                && w.generation > self.generation
                && Some(w.generation) != keep
                && matches!(w.state, State::Starting { .. } | State::Probing { .. } | State::Ready)
            {
                self.log(
                    Level::Info,
                    "rolled back: stopping the new worker of this slot".into(),
                    vec![
                        ("slot", Kv::U64(slot as u64)),
                        ("generation", Kv::U64(w.generation)),
                        ("pid", pid_kv(w.pid)),
                    ],
                );
                self.feed(now, i, WorkerEvent::Stop(now));
            }
        }
    }

    /// Old generations' kills are held back: the serving generation stopped serving within
    /// `stable_after` of its cut-over and none of its workers is ready again yet.
    pub(super) fn holding(&self) -> bool {
        self.unstable.is_some()
            && self.phase == Phase::Running
            && !self
                .workers
                .iter()
                .any(|w| w.generation == self.generation && w.state == State::Ready)
    }

    /// A draining worker of an older generation, whose kill `holding` holds back.
    pub(super) fn held(&self, w: &Worker) -> bool {
        w.generation < self.generation && matches!(w.state, State::Stopping { .. })
    }

    /// A serving-generation worker died: if that was within `stable_after` of the cut-over and
    /// no worker of the generation serves now, say so loudly and hold the old ones' kills.
    pub(super) fn watch_after_death(&mut self, now: Instant, generation: u64) {
        let Some(watch) = self.watch else { return };
        if watch.generation != generation || now >= watch.until || self.unstable.is_some() {
            return;
        }
        let serving = self
            .workers
            .iter()
            .any(|w| w.generation == generation && w.state == State::Ready);
        if serving {
            return;
        }
        let draining: Vec<u64> = {
            let mut g: Vec<u64> = self
                .workers
                .iter()
                .filter(|w| self.held(w))
                .map(|w| w.generation)
                .collect();
            g.sort_unstable();
            g.dedup();
            g
        };
        let kept = match draining.as_slice() {
            [] => String::new(),
            [g] => format!("; generation {g} is kept draining until one serves"),
            gs => format!(
                "; generations {} are kept draining until one serves",
                gs.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            ),
        };
        let message = format!(
            "generation {generation} stopped serving within {} of its cut-over: no worker of it is ready{kept}",
            humantime::format_duration(self.params.stable_after)
        );
        self.log(Level::Error, message.clone(), vec![("generation", Kv::U64(generation))]);
        self.tell_systemd(Systemd::Status(message.clone()));
        self.unstable = Some(message);
    }
}

/// A worker's last lines for a failure report, control characters escaped (escaped here, when
/// a report needs them, not for every line relayed).
pub(super) fn escaped(tail: &std::collections::VecDeque<String>) -> Vec<String> {
    tail.iter().map(|l| crate::log::escape_str(l).into_owned()).collect()
}
