//! The reload side of the machine: the generation logic run on every Tick (`advance`),
//! requests and their coalescing, preparing, committing and failing a reload, the draining cap.

use super::*;

impl Generations {
    pub(super) fn log_failure(&mut self, what: &str, generation: u64, f: &Failure) {
        let kv = || vec![("generation", Kv::U64(generation))];
        self.log(Level::Error, format!("{what}: {}", f.reason), kv());
        for line in &f.tail {
            self.log(Level::Error, format!("  | {line}"), kv());
        }
    }

    /// The generation logic: runs on every Tick.
    pub(super) fn advance(&mut self, now: Instant) {
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
                    self.stats.serving(now);
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
                    // A worker that was ready and exited during the start, and that its
                    // restart policy does not bring back, may have left nothing to serve.
                    self.stop_if_nothing_left(now);
                }
            }
            Phase::Running => {
                if let Some(r) = &self.reload {
                    let back = r.roll.as_ref().and_then(|roll| roll.back.as_ref());
                    if let Some(back) = back {
                        if back.queue.is_empty() && back.in_flight.is_empty() {
                            self.fail_reload(now);
                        }
                    } else if r.failure.is_some() {
                        self.fail_reload(now);
                    } else if let Some(p) = r.params.as_ref().filter(|_| !r.hook) {
                        if self.ready_count(r.generation) == p.count {
                            self.commit_reload(now);
                        }
                    }
                }
            }
            Phase::Stopping => {}
        }
        // A reload asked for during the start or another reload (or its after_reload hook):
        // now, as the start or that reload ended.
        if self.reload.is_none() && self.after_hook.is_none() && self.reload_again && self.phase == Phase::Running {
            self.reload_again = false;
            self.start_reload(now);
        }
    }

    pub(super) fn ready_count(&self, generation: u64) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == generation && w.state == State::Ready)
            .count()
    }

    /// A reload asked for by SIGHUP (`from` = None) or by a control client.
    pub(super) fn request_reload(&mut self, now: Instant, from: Option<ClientId>, if_generation: Option<u64>) {
        let refuse = |m: &mut Generations, message: String| {
            m.stats.reloads.refused += 1;
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
                let message = if self.phase == Phase::Starting {
                    format!(
                        "reload refused: generation {n} is not serving (generation {} is still starting)",
                        self.generation
                    )
                } else {
                    format!(
                        "reload refused: generation {n} is not serving (generation {} is)",
                        self.generation
                    )
                };
                return refuse(self, message);
            }
        }
        // Which attempt will answer this request: the one under way if the caller only wants
        // "a reload from generation N" and it is one; otherwise the next one to start (the
        // config may have changed since the current attempt read it).
        let busy = self.reload.is_some() || self.phase == Phase::Starting || self.after_hook.is_some();
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
            self.start_reload(now);
        }
    }

    /// Send a progress line to every client waiting for reload attempt `attempt`.
    pub(super) fn progress(&mut self, attempt: u64, message: String) {
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
    pub(super) fn finish_reload(&mut self, ok: bool, message: String, data: Value) {
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

    pub(super) fn start_reload(&mut self, now: Instant) {
        self.attempt += 1;
        self.stats.reload_began(now);
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
            hook: false,
            failure: None,
            roll: None,
        });
        self.out.push(Action::PrepareReload {
            attempt: self.attempt,
            generation,
        });
    }

    pub(super) fn preparing(&self, generation: u64) -> bool {
        matches!(&self.reload, Some(r) if r.generation == generation && r.params.is_none())
    }

    pub(super) fn prepared(&mut self, generation: u64, params: Params) {
        if !self.preparing(generation) {
            // Stopped meanwhile: nothing waits for it any more.
            self.out.push(Action::DiscardReload {
                generation,
                failed: false,
            });
            return;
        }
        if let Some(r) = &mut self.reload {
            r.params = Some(params.clone());
            r.hook = params.before_reload.is_some();
        }
        if let Some(timeout) = params.before_reload {
            // Nothing is started before the hook passed; systemd waits for it too.
            self.progress(
                self.attempt,
                format!("running the before_reload hook for generation {generation}"),
            );
            self.tell_systemd(Systemd::ExtendTimeout(timeout.saturating_add(Duration::from_secs(5))));
            self.out.push(Action::RunHook {
                which: Hook::BeforeReload,
                generation,
            });
            return;
        }
        self.launch(generation, params);
    }

    /// A hook ended. before_reload: passed, the reload goes on (its workers start); failed,
    /// the reload fails at the Tick like one whose worker failed. after_reload: logged.
    pub(super) fn hook_done(&mut self, which: Hook, generation: u64, result: HookResult) {
        let kv = || {
            vec![
                ("hook", Kv::Str(which.name().into())),
                ("generation", Kv::U64(generation)),
            ]
        };
        match which {
            Hook::BeforeReload => {
                let Some(r) = self.reload.as_mut().filter(|r| r.generation == generation && r.hook) else {
                    return;
                };
                r.hook = false;
                match result {
                    HookResult::Passed => {
                        let Some(params) = r.params.clone() else { return };
                        self.log(Level::Info, "before_reload hook passed".into(), kv());
                        self.launch(generation, params);
                    }
                    HookResult::Failed { reason, tail } => r.failure = Some(Failure { reason, tail }),
                }
            }
            Hook::AfterReload => {
                if self.after_hook != Some(generation) {
                    return;
                }
                self.after_hook = None;
                match result {
                    HookResult::Passed => self.log(Level::Info, "after_reload hook passed".into(), kv()),
                    // Never a roll-back: the new generation serves, whatever the hook says.
                    HookResult::Failed { reason, tail } => {
                        self.log_failure("after_reload hook failed", generation, &Failure { reason, tail })
                    }
                }
            }
        }
    }

    /// The master is stopping: kill a running hook; the reload it belongs to is cancelled by
    /// the caller.
    pub(super) fn kill_hooks(&mut self) {
        let mut kill = Vec::new();
        if let Some(r) = self.reload.as_mut().filter(|r| r.hook) {
            r.hook = false;
            kill.push((Hook::BeforeReload, r.generation));
        }
        if let Some(generation) = self.after_hook.take() {
            kill.push((Hook::AfterReload, generation));
        }
        for (which, generation) in kill {
            self.log(
                Level::Warn,
                format!("{} hook killed: the master is stopping", which.name()),
                vec![("generation", Kv::U64(generation))],
            );
            self.out.push(Action::KillHook { which, generation });
        }
    }

    /// The prepared reload's workers start (after its before_reload hook, if any, passed).
    fn launch(&mut self, generation: u64, params: Params) {
        self.next_generation += 1;
        self.progress(
            self.attempt,
            format!("starting generation {generation} ({})", workers(params.count)),
        );
        if let Some(r) = &mut self.reload {
            r.roll = params.rolling.map(|surge| Roll {
                surge,
                ..Roll::default()
            });
        }
        if params.rolling.is_some() {
            self.extend_timeout(&params);
            self.roll_on();
        } else {
            self.spawn_generation(&params, generation);
        }
    }

    /// A rolling reload's new generation is under way, not being rolled back, and has not
    /// failed (a failure recorded this turn is acted on at the Tick: no slot is replaced
    /// meanwhile).
    pub(super) fn rolling_forward(&self, generation: u64) -> bool {
        matches!(&self.reload, Some(Reload { generation: g, roll: Some(roll), failure: None, .. }) if *g == generation && roll.back.is_none())
    }

    /// The slot has been replaced by a rolling reload under way: the serving generation
    /// neither restarts nor keeps a worker there.
    pub(super) fn slot_taken(&self, slot: usize) -> bool {
        matches!(&self.reload, Some(Reload { roll: Some(roll), .. }) if roll.back.is_none() && roll.replaced.contains(&slot))
    }

    /// Start the rolling reload's next slots, up to `max_surge` new workers starting at once.
    pub(super) fn roll_on(&mut self) {
        let Some(Reload {
            generation,
            params: Some(p),
            failure: None,
            roll: Some(roll),
            ..
        }) = &self.reload
        else {
            return;
        };
        if roll.back.is_some() {
            return;
        }
        let (generation, count, surge, mut next) = (*generation, p.count, roll.surge, roll.next);
        let starting = self
            .workers
            .iter()
            .filter(|w| w.generation == generation && matches!(w.state, State::Starting { .. } | State::Probing { .. }))
            .count()
            + self.spawning.iter().filter(|&&(g, _, _)| g == generation).count();
        for _ in starting..surge {
            if next >= count {
                break;
            }
            self.spawn(generation, next, SpawnFor::Roll);
            next += 1;
        }
        if let Some(Reload { roll: Some(roll), .. }) = &mut self.reload {
            roll.next = next;
        }
    }

    /// A rolling reload's new worker for `slot` is ready: the slot's old worker is asked to
    /// stop, and the next slot starts.
    pub(super) fn replace_slot(&mut self, now: Instant, slot: usize) {
        let count = self
            .reload
            .as_ref()
            .and_then(|r| r.params.as_ref())
            .map_or(0, |p| p.count);
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.generation == self.generation && w.slot == slot {
                self.feed(now, i, WorkerEvent::Stop(now));
            }
        }
        if let Some(s) = self.slots.get_mut(slot) {
            s.restart_at = None;
        }
        let mut done = 0;
        if let Some(Reload { roll: Some(roll), .. }) = &mut self.reload {
            roll.replaced.push(slot);
            done = roll.replaced.len();
        }
        self.progress(self.attempt, format!("slot {} of {count} replaced (slot {slot})", done));
        self.log(
            Level::Info,
            "slot replaced".into(),
            vec![
                ("of", Kv::U64(count as u64)),
                ("replaced", Kv::U64(done as u64)),
                ("slot", Kv::U64(slot as u64)),
            ],
        );
        self.roll_on();
    }

    /// A rolling reload failed with slots replaced: give them back to the serving generation,
    /// `max_surge` at a time. The new workers of the other slots are killed at once.
    fn begin_rollback(&mut self, now: Instant) {
        let Some(Reload {
            generation,
            roll: Some(roll),
            ..
        }) = &mut self.reload
        else {
            return;
        };
        let generation = *generation;
        let replaced = roll.replaced.clone();
        // A slot the serving generation does not have (the new config has more) has nothing
        // to give back: its new worker is stopped instead.
        let serving_slots = self.slots.len();
        roll.back = Some(RollBack {
            queue: replaced.iter().copied().filter(|&s| s < serving_slots).collect(),
            in_flight: Vec::new(),
        });
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.generation != generation {
                continue;
            }
            if !replaced.contains(&w.slot) || w.slot >= serving_slots {
                self.feed(now, i, WorkerEvent::Stop(now));
            }
        }
        let reason = self
            .reload
            .as_ref()
            .and_then(|r| r.failure.as_ref())
            .map(|f| f.reason.clone())
            .unwrap_or_default();
        self.log(
            Level::Error,
            format!("rolling reload failed: rolling back {} slots: {reason}", replaced.len()),
            vec![("generation", Kv::U64(generation))],
        );
        self.progress(
            self.attempt,
            format!("failed: {reason}; rolling back {} slots", replaced.len()),
        );
        self.rollback_on();
    }

    /// Start serving-generation workers for the next replaced slots, `max_surge` at a time.
    fn rollback_on(&mut self) {
        let serving = self.generation;
        let mut todo = Vec::new();
        if let Some(Reload { roll: Some(roll), .. }) = &mut self.reload {
            let surge = roll.surge;
            if let Some(back) = &mut roll.back {
                while back.in_flight.len() < surge {
                    let Some(slot) = back.queue.pop_front() else { break };
                    back.in_flight.push(slot);
                    todo.push(slot);
                }
            }
        }
        for slot in todo {
            if let Some(s) = self.slots.get_mut(slot) {
                s.restart_at = None;
            }
            self.spawn(serving, slot, SpawnFor::RollBack);
        }
    }

    /// The serving generation's worker for a slot being rolled back is ready, or failed (then
    /// the slot restarts with back-off like after a crash, and the new worker stays until a
    /// serving one is ready there): the roll-back goes on.
    pub(super) fn rollback_slot_done(&mut self, slot: usize) {
        let mut was = false;
        if let Some(Reload { roll: Some(roll), .. }) = &mut self.reload {
            if let Some(back) = &mut roll.back {
                if let Some(i) = back.in_flight.iter().position(|&s| s == slot) {
                    back.in_flight.remove(i);
                    was = true;
                }
            }
        }
        if was {
            self.rollback_on();
        }
    }

    pub(super) fn prepare_failed(&mut self, now: Instant, generation: u64, message: String) {
        if !self.preparing(generation) {
            return;
        }
        self.reload = None;
        self.stats.reload_done(now, Some(false));
        self.log(Level::Error, message.clone(), vec![("generation", Kv::U64(generation))]);
        let status = format!("{message}; {}", self.serving_status());
        self.tell_systemd(Systemd::Ready { status });
        let data = json!({ "generation": self.generation });
        self.finish_reload(false, message, data);
    }

    pub(super) fn commit_reload(&mut self, now: Instant) {
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
        self.recycle_reset();
        self.unstable = None;
        self.stats.reload_done(now, Some(true));
        self.stats.serving(now);
        self.watch = (!params.stable_after.is_zero()).then(|| Watch {
            generation,
            until: clock::after(now, params.stable_after),
        });
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
        let message = format!(
            "reloaded: generation {generation} serving ({}); generation {old} signalled to stop",
            workers(count)
        );
        let after_reload = self.params.after_reload;
        let status = self.serving_status();
        self.tell_systemd(Systemd::Ready { status });
        self.finish_reload(
            true,
            message,
            json!({ "generation": generation, "old_generation": old }),
        );
        self.limit_draining(now);
        // After the verdict: the client does not wait for it.
        if after_reload {
            self.after_hook = Some(generation);
            self.out.push(Action::RunHook {
                which: Hook::AfterReload,
                generation,
            });
        }
    }

    /// Keep at most `max_draining` old generations stopping; kill the oldest beyond that.
    pub(super) fn limit_draining(&mut self, now: Instant) {
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

    pub(super) fn fail_reload(&mut self, now: Instant) {
        let rolled = match self.reload.as_ref().and_then(|r| r.roll.as_ref()) {
            Some(roll) if roll.back.is_none() && !roll.replaced.is_empty() => return self.begin_rollback(now),
            Some(roll) if roll.back.is_some() => Some(roll.replaced.len()),
            _ => None,
        };
        let Some(r) = self.reload.take() else { return };
        self.stats.reload_done(now, Some(false));
        for i in 0..self.workers.len() {
            // After a roll-back, a new worker still serving is one whose slot could not be
            // given back yet: it stays until a serving-generation worker is ready there.
            if self.workers[i].generation == r.generation && rolled.is_none() {
                // Asked to stop, not killed: even one the machine does not know ready yet may
                // have taken connections (its READY=1 still on its way); those are answered.
                self.feed(now, i, WorkerEvent::Stop(now));
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
        let count = r.params.as_ref().map_or(0, |p| p.count);
        let message = match rolled {
            Some(n) => format!(
                "reload failed: rolled back after slot {n} of {count}: {}; generation {} keeps serving",
                f.reason, self.generation
            ),
            None => format!(
                "reload failed: {}; generation {} keeps serving",
                f.reason, self.generation
            ),
        };
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

/// `1 worker`, `4 workers`.
pub(super) fn workers(n: usize) -> String {
    format!("{n} worker{}", if n == 1 { "" } else { "s" })
}
