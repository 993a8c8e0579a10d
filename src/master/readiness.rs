//! `ready = "listening"` and `"auto"` in the loop: while a worker of such a generation is
//! starting, look at it ([`crate::worker::listening`]) on a schedule that is part of the loop's
//! deadlines, and feed [`Event::WorkerReady`] once it waits on a listener — the same event a
//! `READY=1` is.
//!
//! Cadence: right after the spawn (the next turn), then every millisecond for 20 ms (a server
//! that is ready at once should not wait for a slower schedule: a reload's round trip is
//! about 2 ms), every 5 ms for the rest of the first second, every 20 ms until 10 s, then
//! every 50 ms — or, when looks are costly (many workers starting, each with many fds), no
//! sooner than 4 × (this look's duration) × (workers watched), so that looking takes at most
//! about a quarter of the master's time (the first look: the same from an estimate of 2 µs
//! per fd; a look at 64 workers with 1,000 listeners each cost 64 × 1,000 readlinks per turn,
//! and the master had no time left for their READY=1). A look at a worker whose own process listens costs
//! tens of microseconds (one `readdir` of its fds, one fdinfo per epoll fd, one `syscall` file
//! per thread: docs/benchmarks.md); only a worker that does not listen itself, without a
//! cgroup, costs a scan of `/proc/*/stat` for its process group. A watch ends when the worker
//! is ready (either way), exits or stops starting; with no watch there is no deadline, so an
//! idle master still never wakes.

use super::*;
use crate::worker::listening;

/// Look again after this long, for a worker that started `age` ago.
pub(super) fn interval(age: Duration) -> Duration {
    if age < Duration::from_millis(20) {
        Duration::from_millis(1)
    } else if age < Duration::from_secs(1) {
        Duration::from_millis(5)
    } else if age < Duration::from_secs(10) {
        Duration::from_millis(20)
    } else {
        Duration::from_millis(50)
    }
}

/// What a look costs per fd of the worker (a readlink of `/proc/PID/fd/N`), about; for the
/// first look's estimate.
const LOOK_US_PER_FD: u64 = 2;

/// The gap before looking again at one of `watched` workers after a look that took `look`:
/// about 4 × look × watched, so that looking takes at most a quarter of the master's time.
/// With few workers or few fds it is below the schedule of [`interval`], which then rules.
pub(super) fn look_budget(look: Duration, watched: usize) -> Duration {
    look.saturating_mul(4)
        .saturating_mul(watched.min(u32::MAX as usize) as u32)
}

/// A starting worker the loop looks at.
pub(super) struct Watch {
    pid: Pid,
    /// Its listeners' socket inodes, sorted: shared by the workers of a generation.
    inodes: Rc<[u64]>,
    /// Its cgroup directory, if it has one.
    cgroup: Option<std::path::PathBuf>,
    started: Instant,
    next: Instant,
    looks: u32,
}

impl Watch {
    pub(super) fn pid(&self) -> Pid {
        self.pid
    }

    /// `inodes`: [`inodes`] of the worker's listeners; `watched`: how many workers are
    /// looked at, this one included. The first look comes on the next turn, or later when
    /// looks are costly (see [`look_budget`]).
    pub(super) fn new(w: &Worker, inodes: Rc<[u64]>, watched: usize, now: Instant) -> Watch {
        // A look reads each fd of the worker: its listeners and stdin, stdout, stderr.
        let estimate = Duration::from_micros(LOOK_US_PER_FD * (inodes.len() as u64 + 3));
        let next = clock::after(now, look_budget(estimate, watched));
        Watch {
            pid: w.pid,
            inodes,
            cgroup: w.cgroup.as_ref().map(|c| c.path().to_path_buf()),
            started: now,
            next,
            looks: 0,
        }
    }
}

/// The socket inodes of `listeners`, sorted and without duplicates, for [`listening::find`].
/// One `fstat` per listener: computed once per generation, not per worker.
pub(super) fn inodes(listeners: &[Rc<Listener>]) -> Rc<[u64]> {
    // An fd the master holds cannot fail fstat; were it to, that listener is not looked for
    // (the others are).
    let mut inodes: Vec<u64> = listeners
        .iter()
        .filter_map(|l| listening::inode_of(l.raw_fd()).ok())
        .collect();
    inodes.sort_unstable();
    inodes.dedup();
    inodes.into()
}

impl Master {
    /// [`inodes`] of a generation's listeners, kept for the generation whose workers start.
    pub(super) fn generation_inodes(&mut self, generation: u64, listeners: &[Rc<Listener>]) -> Rc<[u64]> {
        match &self.inodes {
            Some((g, inodes)) if *g == generation => Rc::clone(inodes),
            _ => {
                let inodes = inodes(listeners);
                self.inodes = Some((generation, Rc::clone(&inodes)));
                inodes
            }
        }
    }

    /// The mode of a worker's generation: the pending reload's config, or the serving one.
    pub(super) fn ready_mode(&self, generation: u64) -> config::Ready {
        match &self.pending {
            Some(p) if p.generation == generation => p.config.worker.ready,
            _ => self.config.worker.ready,
        }
    }

    /// When the next look is due.
    pub(super) fn next_look(&self) -> Option<Instant> {
        self.watches.iter().map(|w| w.next).min()
    }

    /// Look at every worker whose look is due; the ones seen listening are ready.
    pub(super) fn look_for_listening(&mut self) {
        let now = Instant::now();
        if self.next_look().is_none_or(|t| t > now) {
            return;
        }
        let gens = &self.gens;
        // Only workers still starting are looked at (ready by READY=1, exited, stopping: done).
        self.watches.retain(|w| {
            gens.worker(w.pid)
                .is_some_and(|m| matches!(m.state, crate::worker::State::Starting { .. }))
        });
        let mut seen = Vec::new();
        let watched = self.watches.len();
        for w in self.watches.iter_mut().filter(|w| w.next <= now) {
            w.looks += 1;
            let age = now.saturating_duration_since(w.started);
            let t0 = Instant::now();
            let found = listening::find(w.pid, w.cgroup.as_deref(), &w.inodes);
            let look_us = t0.elapsed().as_micros() as u64;
            match found {
                Some(s) => {
                    debug!(self.log, "worker listening";
                        "pid" => w.pid.as_raw(), "process" => s.pid, "kind" => s.kind.name(),
                        "syscall" => s.syscall, "fd" => s.fd, "inode" => s.inode,
                        "looks" => w.looks, "look_us" => look_us, "after_ms" => clock::ms(age));
                    seen.push(w.pid);
                }
                // A look costs about 2 µs per fd of the worker (one readlink each): 64
                // workers booting with 1,000 listeners each, looked at every millisecond,
                // kept the master busy looking and late for everything else (their READY=1
                // among it). So the gap grows with the cost: looks take at most about a
                // quarter of the master's time.
                None => {
                    let budget = look_budget(Duration::from_micros(look_us), watched);
                    w.next = clock::after(now, interval(age).max(budget));
                }
            }
        }
        self.watches.retain(|w| !seen.contains(&w.pid));
        for pid in seen {
            self.event(Event::WorkerReady { pid });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_back_off_with_age() {
        assert_eq!(interval(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(interval(Duration::from_millis(20)), Duration::from_millis(5));
        assert_eq!(interval(Duration::from_millis(999)), Duration::from_millis(5));
        assert_eq!(interval(Duration::from_secs(1)), Duration::from_millis(20));
        assert_eq!(interval(Duration::from_secs(10)), Duration::from_millis(50));
        assert_eq!(interval(Duration::from_secs(86_400)), Duration::from_millis(50));
    }

    #[test]
    fn costly_looks_are_spaced_by_their_cost() {
        // One worker, one listener: the schedule rules.
        assert!(look_budget(Duration::from_micros(8), 1) < interval(Duration::ZERO));
        // 64 workers of 1,000 listeners: a quarter of the time at most.
        assert_eq!(look_budget(Duration::from_millis(2), 64), Duration::from_millis(512));
    }
}
