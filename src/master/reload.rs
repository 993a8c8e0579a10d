//! The generation logic: reload (start, commit, fail, coalesce), crash restarts with
//! back-off, the draining cap, and stop. It runs on the master's own state; each step is
//! driven by the event loop in `mod.rs`.

use super::*;

impl Master {
    pub(super) fn config_of(&self, generation: u64) -> Rc<Config> {
        match &self.reload {
            Some(r) if r.generation == generation => Rc::clone(&r.config),
            _ => Rc::clone(&self.config),
        }
    }

    /// A worker exited on its own.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn worker_died(
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
    pub(super) fn stop_if_nothing_left(&mut self) {
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

    pub(super) fn schedule_restart(&mut self, slot: usize, lived: Duration) {
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
    pub(super) fn generation_failed(&mut self, generation: u64, slot: usize, reason: String, tail: Vec<String>) {
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

    pub(super) fn log_failure(&self, what: &str, generation: u64, f: &Failure) {
        error!(self.log, "{}: {}", what, f.reason; "generation" => generation);
        for line in &f.tail {
            error!(self.log, "  | {}", line; "generation" => generation);
        }
    }

    /// The generation logic: runs after every turn of the loop.
    pub(super) fn advance(&mut self) {
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

    pub(super) fn ready_count(&self, generation: u64) -> usize {
        self.workers
            .iter()
            .filter(|w| w.generation == generation && w.state == State::Ready)
            .count()
    }

    /// A reload asked for by SIGHUP (`from` = None) or by a control client.
    pub(super) fn request_reload(&mut self, from: Option<usize>, if_generation: Option<u64>) {
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
    pub(super) fn tell_systemd(&self, message: String) {
        if let Some(s) = &self.systemd {
            s.send(&message);
        }
    }

    pub(super) fn serving_status(&self) -> String {
        let n = self.config.worker.count;
        format!(
            "generation {} serving ({n} worker{})",
            self.generation,
            if n == 1 { "" } else { "s" }
        )
    }

    /// Send a progress line to every client waiting for reload attempt `attempt`.
    pub(super) fn progress(&mut self, attempt: u64, message: String) {
        let reply = Reply::progress(message);
        for c in &mut self.conns {
            if c.waiting == Some(Waiting::Reload { attempt }) {
                c.send(&reply);
            }
        }
    }

    /// The current attempt ended: answer everyone waiting for it.
    pub(super) fn finish_reload(&mut self, outcome: Result<(String, Value), (String, Value)>) {
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

    pub(super) fn start_reload(&mut self) {
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
    pub(super) fn spawn_generation(&mut self, config: Rc<Config>, listeners: Vec<Rc<Listener>>, generation: u64) {
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

    pub(super) fn commit_reload(&mut self) {
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
    pub(super) fn limit_draining(&mut self) {
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

    pub(super) fn fail_reload(&mut self) {
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

    pub(super) fn begin_stop(&mut self) {
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
}
