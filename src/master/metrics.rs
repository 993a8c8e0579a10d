//! `[master] metrics` in the loop: the listener and its connections in the poll set, served
//! after the control requests, and the text they get: the machine's counters
//! ([`generations::Stats`]), its workers, the log's counters and `/proc/self`, rendered at
//! scrape time (docs/metrics.md lists every metric). The same counters go into `zdd status
//! --json` as `"metrics"`.

use super::*;
use crate::metrics::{Asked, Histogram, MetricsConn, MetricsServer, Text};
use generations::RELOAD_BUCKETS_US;

/// Scrapes served at once; more wait in the listener's backlog. Each is answered or dropped
/// within [`crate::metrics::server::DEADLINE`].
const MAX_METRICS_CONNS: usize = 32;
/// How long the listener is left alone after accept failed (EMFILE and the like).
const METRICS_BACKOFF: Duration = Duration::from_millis(100);

/// The metrics listener and the scrapes under way.
pub(super) struct Metrics {
    pub(super) server: MetricsServer,
    conns: Vec<MetricsConn>,
    /// Not accepting until then (accept failed).
    paused_until: Option<Instant>,
}

impl Metrics {
    pub(super) fn new(server: MetricsServer) -> Metrics {
        Metrics {
            server,
            conns: Vec::new(),
            paused_until: None,
        }
    }

    /// Its fds for `poll`: the listener unless at the cap or backing off, and every connection.
    pub(super) fn add_to_poll(&self, fds: &mut Vec<libc::pollfd>) {
        if self.conns.len() < MAX_METRICS_CONNS && self.paused_until.is_none() {
            fds.push(libc::pollfd {
                fd: self.server.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for c in &self.conns {
            fds.push(libc::pollfd {
                fd: c.raw_fd(),
                events: c.events(),
                revents: 0,
            });
        }
    }

    /// The earliest deadline: a connection's, or the end of an accept back-off. None when
    /// nobody is scraping: an idle master does not wake for metrics.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.conns.iter().map(|c| c.deadline()).chain(self.paused_until).min()
    }
}

impl Master {
    /// Accept scrapes, read their requests, answer them, drop the finished and the expired.
    pub(super) fn serve_metrics(&mut self, ready: &[RawFd]) {
        let Some(mut m) = self.metrics.take() else { return };
        let now = Instant::now();
        if m.paused_until.is_some_and(|t| t <= now) {
            m.paused_until = None;
        }
        let old = m.conns.len();
        if m.paused_until.is_none() && ready.binary_search(&m.server.raw_fd()).is_ok() {
            let room = MAX_METRICS_CONNS.saturating_sub(m.conns.len());
            let (accepted, error) = m.server.accept(now, room);
            if let Some(e) = error {
                warn!(self.log, "metrics: accept failed; not accepting for {}ms", METRICS_BACKOFF.as_millis();
                    "error" => crate::errno::describe(e), "connections" => m.conns.len());
                m.paused_until = Some(clock::after(now, METRICS_BACKOFF));
            }
            m.conns.extend(accepted);
        }
        let mut text: Option<String> = None;
        for (i, c) in m.conns.iter_mut().enumerate() {
            // A new connection is serviced at once: its request is often there already.
            if i < old && ready.binary_search(&c.raw_fd()).is_err() {
                continue;
            }
            if let Asked::Metrics { head } = c.service() {
                let t = text.get_or_insert_with(|| self.metrics_text(now));
                c.answer(t, head);
            }
        }
        for c in &mut m.conns {
            c.expire(now);
        }
        m.conns.retain(|c| !c.is_done());
        self.metrics = Some(m);
    }

    /// The OpenMetrics text, as of `now`.
    pub(super) fn metrics_text(&self, now: Instant) -> String {
        let s = self.gens.stats();
        let mut t = Text::new();
        t.info(
            "zdd_build",
            "The zdd version serving these metrics.",
            &[("version", env!("CARGO_PKG_VERSION"))],
        );
        let r = &s.reloads;
        t.counter(
            "zdd_reloads",
            "Reload requests by outcome: ok (committed), failed (nothing changed, or rolled back), refused (not started), cancelled (the master stopped).",
            &[
                (&[("result", "ok")], r.ok),
                (&[("result", "failed")], r.failed),
                (&[("result", "refused")], r.refused),
                (&[("result", "cancelled")], r.cancelled),
            ],
        );
        t.histogram(
            "zdd_reload_duration_seconds",
            "Time from a reload's start to its verdict, by outcome.",
            &RELOAD_BUCKETS_US,
            &[
                (&[("result", "ok")], &s.reload_seconds_ok),
                (&[("result", "failed")], &s.reload_seconds_failed),
            ],
        );
        t.counter(
            "zdd_worker_starts",
            "Worker processes spawned.",
            &[(&[], s.worker_starts)],
        );
        t.counter(
            "zdd_worker_spawn_failures",
            "Worker spawns that failed before the worker ran (exec, credentials, cgroup).",
            &[(&[], s.spawn_failures)],
        );
        let e = &s.exits;
        t.counter(
            "zdd_worker_exits",
            "Workers reaped, by why they went.",
            &[
                (&[("reason", "stopped")], e.stopped),
                (&[("reason", "killed")], e.killed),
                (&[("reason", "crashed")], e.crashed),
                (&[("reason", "start_timeout")], e.start_timeout),
                (&[("reason", "probe_failed")], e.probe_failed),
                (&[("reason", "watchdog")], e.watchdog),
                (&[("reason", "recycled")], e.recycled),
            ],
        );
        t.counter(
            "zdd_worker_restarts",
            "Crash restarts started (after their back-off).",
            &[(&[], s.restarts)],
        );
        // Workers by generation and state; every state of the serving generation, even at 0.
        let serving = self.gens.generation();
        let mut by: BTreeMap<(u64, &'static str), u64> = BTreeMap::new();
        for state in ["starting", "probing", "ready", "stopping", "killed"] {
            by.insert((serving, state), 0);
        }
        for w in self.gens.workers().iter().filter(|w| w.state.is_alive()) {
            *by.entry((w.generation, w.state.name())).or_default() += 1;
        }
        let gens: Vec<String> = by.keys().map(|(g, _)| g.to_string()).collect();
        let samples: Vec<([(&str, &str); 2], f64)> = by
            .iter()
            .zip(&gens)
            .map(|((&(_, state), &n), g)| ([("generation", g.as_str()), ("state", state)], n as f64))
            .collect();
        let samples: Vec<(crate::metrics::Labels, f64)> = samples.iter().map(|(l, n)| (&l[..], *n)).collect();
        t.gauge("zdd_workers", None, "Workers alive, by generation and state.", &samples);
        let serving_now = self.gens.phase() != Phase::Starting;
        t.gauge(
            "zdd_serving_generation",
            None,
            "The generation serving (0 while the first one starts).",
            &[(&[], if serving_now { serving as f64 } else { 0.0 })],
        );
        let age = s.serving_for(now).filter(|_| serving_now);
        t.gauge(
            "zdd_serving_generation_age_seconds",
            Some("seconds"),
            "How long the serving generation has served (since the first start or its reload's commit).",
            &age.map(|a| (&[][..], a.as_secs_f64())).into_iter().collect::<Vec<_>>(),
        );
        let mut draining: Vec<u64> = self
            .gens
            .workers()
            .iter()
            .filter(|w| w.state.is_alive() && w.generation != serving && Some(w.generation) != self.gens.reloading())
            .map(|w| w.generation)
            .collect();
        draining.sort_unstable();
        draining.dedup();
        t.gauge(
            "zdd_draining_generations",
            None,
            "Old generations whose workers are still stopping.",
            &[(&[], draining.len() as f64)],
        );
        t.gauge(
            "zdd_reloading",
            None,
            "1 while a reload is under way.",
            &[(&[], f64::from(u8::from(self.gens.reloading().is_some())))],
        );
        t.gauge(
            "zdd_unstable",
            None,
            "1 when the serving generation stopped serving within stable_after of its cut-over.",
            &[(&[], f64::from(u8::from(self.gens.unstable().is_some())))],
        );
        let restarting = self.gens.slots().iter().filter(|s| s.restart_at.is_some()).count();
        t.gauge(
            "zdd_slots_restarting",
            None,
            "Worker slots of the serving generation waiting out their crash back-off.",
            &[(&[], restarting as f64)],
        );
        let (relayed, dropped) = self.sink.line_counts();
        t.counter(
            "zdd_log_lines_relayed",
            "Worker output lines relayed into the log (since this master image started).",
            &[(&[], relayed)],
        );
        t.counter(
            "zdd_log_lines_dropped",
            "Log lines lost because the log could not be written (since this master image started).",
            &[(&[], dropped)],
        );
        t.gauge(
            "zdd_log_pending_bytes",
            Some("bytes"),
            "Log bytes waiting for the log to take them.",
            &[(&[], self.sink.pending() as f64)],
        );
        let rss = crate::metrics::resident_bytes();
        t.gauge(
            "zdd_master_resident_memory_bytes",
            Some("bytes"),
            "The master's resident memory (/proc/self/statm).",
            &rss.map(|v| (&[][..], v as f64)).into_iter().collect::<Vec<_>>(),
        );
        let fds = crate::metrics::open_fds();
        t.gauge(
            "zdd_master_open_fds",
            None,
            "The master's open file descriptors (/proc/self/fd).",
            &fds.map(|v| (&[][..], v as f64)).into_iter().collect::<Vec<_>>(),
        );
        let started = self
            .started_wall
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        t.gauge(
            "zdd_master_start_time_seconds",
            Some("seconds"),
            "When the master started, in seconds since the Unix epoch (kept across upgrades).",
            &[(&[], started.floor())],
        );
        t.finish()
    }

    /// The counters for `zdd status --json` (`"metrics"`).
    pub(super) fn metrics_json(&self) -> Value {
        let s = self.gens.stats();
        let h = |h: &Histogram| json!({ "count": h.count, "sum_seconds": h.sum_seconds() });
        let (relayed, dropped) = self.sink.line_counts();
        json!({
            "address": self.metrics.as_ref().map(|m| m.server.listener().local_addr()),
            "reloads": s.reloads,
            "reload_seconds": { "ok": h(&s.reload_seconds_ok), "failed": h(&s.reload_seconds_failed) },
            "worker_starts": s.worker_starts,
            "worker_spawn_failures": s.spawn_failures,
            "worker_exits": s.exits,
            "worker_restarts": s.restarts,
            "serving_generation_age_seconds": s.serving_for(Instant::now()).filter(|_| self.gens.phase() != Phase::Starting).map(|d| d.as_secs_f64()),
            "log_lines_relayed": relayed,
            "log_lines_dropped": dropped,
        })
    }
}
