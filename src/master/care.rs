//! The loop's side of long-running care: with `max_rss`, the serving workers' resident memory
//! is measured every [`RSS_CHECK`] and given to the machine, which decides about recycling
//! (generations/care.rs). Without `max_rss`, nothing is measured and nothing wakes the loop.

use super::*;

/// How often the serving workers' memory is measured, with `max_rss`.
pub const RSS_CHECK: Duration = Duration::from_secs(10);

impl Master {
    pub(super) fn check_rss(&mut self) {
        if self.config.worker.max_rss.is_none() || self.gens.phase() != Phase::Running {
            self.rss_check_at = None;
            return;
        }
        let now = Instant::now();
        match self.rss_check_at {
            None => {
                self.rss_check_at = Some(clock::after(now, RSS_CHECK));
                return;
            }
            Some(t) if t > now => return,
            Some(_) => {}
        }
        self.rss_check_at = Some(clock::after(now, RSS_CHECK));
        let serving = self.gens.generation();
        let ready: Vec<Pid> = self
            .gens
            .workers()
            .iter()
            .filter(|w| w.state == crate::worker::State::Ready && w.generation == serving)
            .map(|w| w.pid)
            .collect();
        for pid in ready {
            let bytes = self.rss_of(pid);
            self.event(Event::WorkerRss { pid, bytes });
        }
    }

    /// Resident bytes of a worker's processes (its cgroup, or its process group).
    pub(super) fn rss_of(&self, pid: Pid) -> u64 {
        let cgroup = self
            .workers
            .iter()
            .find(|w| w.pid == pid)
            .and_then(|w| w.cgroup.as_ref())
            .map(|c| c.path());
        crate::worker::usage::rss_bytes(pid, cgroup)
    }
}
