//! Long-running care: the worker watchdog and recycling.
//!
//! Watchdog (`watchdog`): a worker is armed when it becomes ready; each `WATCHDOG=1` re-arms
//! it. Silent past its deadline (or `WATCHDOG=trigger`), it is replaced: asked to stop
//! (`stop_signal`, SIGKILL at `stop_timeout`) and its slot restarted, with the reason in the
//! log and in `status`. A new worker of a reload that falls silent before the commit fails
//! that reload instead. Armed only once ready: booting is what `start_timeout` bounds.
//!
//! Recycling (`max_lifetime` with `recycle_jitter`, `max_rss`): a serving worker past its
//! lifetime, or whose processes use more memory than allowed, is replaced the way a rolling
//! reload replaces a slot: a new worker for the slot, ready (and probed), then the old one is
//! asked to stop. One slot at a time, never fewer ready workers than `count`; workers due
//! meanwhile wait in a queue; no recycling while a reload is under way (it replaces every
//! worker anyway). A recycle whose new worker fails leaves the old one serving and retries a
//! minute later. A worker over `max_rss` within a minute of becoming ready means the limit is
//! below what the app needs: recycling for memory backs off (1 min doubling to 1 h) and says so,
//! instead of recycling in a loop. The jitter is derived from the pid, so the machine stays
//! pure and copies started together do not recycle together.

use super::*;

/// A recycle whose new worker failed is tried again after this.
pub const RECYCLE_RETRY: Duration = Duration::from_secs(60);
/// A worker over `max_rss` this soon after it became ready: the limit is below the app's need.
pub const RSS_FRESH: Duration = Duration::from_secs(60);
const RSS_HOLD_MIN: Duration = Duration::from_secs(60);
const RSS_HOLD_MAX: Duration = Duration::from_secs(3600);

impl Generations {
    /// Arm a worker that just became ready: its watchdog, and its lifetime.
    pub(super) fn arm_care(&mut self, now: Instant, i: usize) {
        let p = self.params_of(self.workers[i].generation);
        let w = &mut self.workers[i];
        w.watchdog_at = p.watchdog.map(|d| clock::after(now, d));
        w.recycle_at = p.max_lifetime.map(|life| {
            let jitter = jitter(w.pid, p.recycle_jitter);
            clock::after(w.started, life.saturating_add(jitter))
        });
    }

    /// After an upgrade: every ready worker's watchdog is armed afresh from now (a ping may
    /// have been lost across the exec), its lifetime from its start.
    pub fn rearm(&mut self, now: Instant) {
        for i in 0..self.workers.len() {
            if self.workers[i].state == State::Ready {
                self.arm_care(now, i);
            }
        }
    }

    /// Deadlines of care: armed watchdogs, lifetimes of serving workers, a recycle retry.
    pub(super) fn care_deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        let watchdogs = self
            .workers
            .iter()
            .filter(|w| w.state == State::Ready)
            .filter_map(|w| w.watchdog_at);
        let lifetimes = self
            .workers
            .iter()
            .filter(|w| w.state == State::Ready && w.generation == self.generation)
            .filter_map(|w| w.recycle_at);
        let retry = self.recycle_retry_at.filter(|_| !self.recycle_queue.is_empty());
        watchdogs.chain(lifetimes).chain(retry)
    }

    /// Due watchdogs and lifetimes (part of the Tick's deadlines).
    pub(super) fn care_due(&mut self, now: Instant) {
        for i in 0..self.workers.len() {
            let w = &self.workers[i];
            if w.state != State::Ready {
                continue;
            }
            if w.watchdog_at.is_some_and(|t| t <= now) {
                let p = self.params_of(w.generation);
                let silent = p
                    .watchdog
                    .map_or_else(String::new, |d| humantime::format_duration(d).to_string());
                let why = format!("worker pid {}: watchdog expired (no WATCHDOG=1 for {silent})", w.pid);
                let pid = w.pid;
                self.workers[i].watchdog_at = None;
                self.stats.ending(pid, stats::Ending::Watchdog);
                self.unhealthy(now, i, why);
                continue;
            }
            if w.generation == self.generation && w.recycle_at.is_some_and(|t| t <= now) {
                let life = self.params.max_lifetime.unwrap_or_default();
                let lived = now.saturating_duration_since(w.started);
                let why = format!(
                    "max_lifetime {} reached (lived {})",
                    humantime::format_duration(life),
                    humantime::format_duration(Duration::from_secs(lived.as_secs()))
                );
                let pid = w.pid;
                self.workers[i].recycle_at = None;
                self.queue_recycle(pid, why);
            }
        }
    }

    /// `WATCHDOG=1` re-arms; `WATCHDOG=trigger` replaces the worker now.
    pub(super) fn watchdog(&mut self, now: Instant, pid: Pid, trigger: bool) {
        let Some(i) = self.index(pid) else { return };
        if self.workers[i].state != State::Ready {
            return;
        }
        if trigger {
            self.workers[i].watchdog_at = None;
            self.stats.ending(pid, stats::Ending::Watchdog);
            return self.unhealthy(now, i, format!("worker pid {pid}: WATCHDOG=trigger"));
        }
        if let Some(d) = self.params_of(self.workers[i].generation).watchdog {
            self.workers[i].watchdog_at = Some(clock::after(now, d));
        }
    }

    /// A ready worker is unhealthy (its watchdog, or `WATCHDOG=trigger`): a new worker of a
    /// reload fails the reload; a serving one is replaced.
    fn unhealthy(&mut self, now: Instant, i: usize, why: String) {
        let (generation, slot) = (self.workers[i].generation, self.workers[i].slot);
        if generation != self.generation {
            if self.is_starting_generation(generation) {
                let tail = super::workers::escaped(&self.workers[i].tail);
                self.feed(now, i, WorkerEvent::Stop(now));
                self.generation_failed(now, generation, slot, why, tail);
            }
            return;
        }
        self.log(
            Level::Warn,
            format!("{why}; replacing it"),
            vec![
                ("generation", Kv::U64(generation)),
                ("pid", pid_kv(self.workers[i].pid)),
            ],
        );
        self.replace(now, i, why);
    }

    /// Stop a serving worker and restart its slot (a failed probe, its watchdog). If it was
    /// being recycled, the recycle's new worker takes the slot.
    pub(super) fn replace(&mut self, now: Instant, i: usize, why: String) {
        let w = &self.workers[i];
        let (pid, slot, lived) = (w.pid, w.slot, now.saturating_duration_since(w.started));
        self.feed(now, i, WorkerEvent::Stop(now));
        self.recycle_queue.retain(|&(p, _)| p != pid);
        if self.recycling.as_ref().is_some_and(|r| r.old == pid) {
            self.recycling = None;
        } else if !self.slot_taken(slot) {
            self.schedule_restart(now, slot, lived, why);
        }
        // Not serving any more: the watch after a cut-over counts it.
        self.watch_after_death(now, self.generation);
    }

    /// The memory of a worker's processes: over `max_rss`, it is recycled — unless it just
    /// started, which means the limit is below what the app needs (back off, say so).
    pub(super) fn rss(&mut self, now: Instant, pid: Pid, bytes: u64) {
        let Some(max) = self.params.max_rss else { return };
        let Some(w) = self.worker(pid) else { return };
        if bytes <= max || w.state != State::Ready || w.generation != self.generation {
            return;
        }
        if self.recycle_queue.iter().any(|&(p, _)| p == pid) || self.recycling.as_ref().is_some_and(|r| r.old == pid) {
            return;
        }
        if self.rss_hold.is_some_and(|(until, _)| now < until) {
            return;
        }
        let lived = now.saturating_duration_since(w.started);
        let mib = |b: u64| format!("{:.1}MiB", b as f64 / f64::from(1u32 << 20));
        if lived < RSS_FRESH {
            let hold = self
                .rss_hold
                .map_or(RSS_HOLD_MIN, |(_, d)| d.saturating_mul(2))
                .min(RSS_HOLD_MAX);
            self.rss_hold = Some((clock::after(now, hold), hold));
            self.log(
                Level::Warn,
                format!(
                    "max_rss {} is below what this app needs: worker pid {pid} uses {} {}s after it started; not recycling for memory for {}",
                    mib(max),
                    mib(bytes),
                    lived.as_secs(),
                    humantime::format_duration(hold)
                ),
                vec![("generation", Kv::U64(self.generation))],
            );
            return;
        }
        self.queue_recycle(pid, format!("rss {} over max_rss {}", mib(bytes), mib(max)));
    }

    fn queue_recycle(&mut self, pid: Pid, why: String) {
        if !self.recycle_queue.iter().any(|&(p, _)| p == pid) {
            self.recycle_queue.push_back((pid, why));
        }
    }

    /// Start the next recycle, if none runs, no reload is under way and no retry is pending.
    pub(super) fn recycle_next(&mut self, now: Instant) {
        if self.phase != Phase::Running || self.reload.is_some() || self.recycling.is_some() {
            return;
        }
        if self.recycle_retry_at.is_some_and(|t| now < t) {
            return;
        }
        self.recycle_retry_at = None;
        while let Some((pid, why)) = self.recycle_queue.pop_front() {
            let Some(w) = self.worker(pid) else { continue };
            if w.state != State::Ready || w.generation != self.generation {
                continue;
            }
            let slot = w.slot;
            self.log(
                Level::Info,
                format!("recycling worker: {why}"),
                vec![
                    ("slot", Kv::U64(slot as u64)),
                    ("generation", Kv::U64(self.generation)),
                    ("pid", pid_kv(pid)),
                ],
            );
            self.recycling = Some(Recycle { slot, old: pid, why });
            self.spawn(self.generation, slot, SpawnFor::Recycle);
            return;
        }
    }

    /// A serving-generation worker of `slot` became ready: if it is the recycle's new worker,
    /// the old one is asked to stop.
    pub(super) fn recycled(&mut self, now: Instant, slot: usize, pid: Pid) {
        let Some(r) = self.recycling.as_ref().filter(|r| r.slot == slot && r.old != pid) else {
            return;
        };
        let (old, why) = (r.old, r.why.clone());
        self.recycling = None;
        if let Some(i) = self.index(old) {
            self.stats.ending(old, stats::Ending::Recycled);
            self.feed(now, i, WorkerEvent::Stop(now));
        }
        self.log(
            Level::Info,
            format!("worker recycled: {why}"),
            vec![
                ("slot", Kv::U64(slot as u64)),
                ("old_pid", pid_kv(old)),
                ("generation", Kv::U64(self.generation)),
                ("pid", pid_kv(pid)),
            ],
        );
    }

    /// A worker of the serving generation failed before it was ready in `slot`: if it was the
    /// recycle's new worker, the old one serves on and the recycle is retried later. Returns
    /// whether it was.
    pub(super) fn recycle_failed(&mut self, now: Instant, slot: usize, reason: &str) -> bool {
        let Some(r) = self.recycling.take_if(|r| r.slot == slot) else {
            return false;
        };
        self.log(
            Level::Warn,
            format!(
                "recycling failed: {reason}; the old worker serves on; next try in {}",
                humantime::format_duration(RECYCLE_RETRY)
            ),
            vec![("generation", Kv::U64(self.generation)), ("pid", pid_kv(r.old))],
        );
        self.recycle_queue.push_front((r.old, r.why));
        self.recycle_retry_at = Some(clock::after(now, RECYCLE_RETRY));
        true
    }

    /// The recycled slot's old worker died on its own: the recycle's new worker takes the slot.
    /// Returns whether it was that worker.
    pub(super) fn recycle_lost_old(&mut self, pid: Pid) -> bool {
        self.recycling.take_if(|r| r.old == pid).is_some()
    }

    /// Forget recycling (a stop, a commit: every worker of the generation goes anyway).
    pub(super) fn recycle_reset(&mut self) {
        self.recycling = None;
        self.recycle_queue.clear();
        self.recycle_retry_at = None;
    }
}

/// This worker's share of the jitter: a hash of its pid, so that copies started together
/// spread out, and the machine needs no random numbers.
fn jitter(pid: Pid, jitter: Duration) -> Duration {
    let ms = clock::ms(jitter);
    if ms == 0 {
        return Duration::ZERO;
    }
    let h = u64::from(pid.as_raw().unsigned_abs()).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Duration::from_millis((h >> 32) % (ms + 1))
}
