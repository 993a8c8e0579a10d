//! A worker and its state machine.
//!
//! Every worker is `Starting → Ready → Stopping → Exited`, with `Probing` between `Starting`
//! and `Ready` when a health probe is configured (`[worker.probe]`: the worker said it is
//! ready, the probe decides), and `Killed` for one that was sent SIGKILL. The deadline of each state is data inside the state, and one exhaustive `match` on
//! (state, event) in [`transition`] is the only place states change: start, reload, crash
//! restart and stop are all expressed as events fed to it. [`transition`] is pure (it returns
//! the effects to carry out), so it is unit-tested with synthetic events and clocks. The
//! generations machine (`master::generations`) keeps each worker's state and feeds it; the
//! loop's [`Worker`] holds only the process's I/O.

pub mod cgroup;
pub mod listening;
pub mod notify;
pub mod probe;
pub mod relay;
pub mod spawn;
pub mod usage;

use std::collections::VecDeque;
use std::fmt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::listen::Listener;
use crate::worker::relay::Pipe;

/// How many of a worker's last log lines are kept for failure reports.
pub const TAIL_LINES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    pub fn from_wait(ws: WaitStatus) -> Option<(Pid, ExitStatus)> {
        match ws {
            WaitStatus::Exited(pid, code) => Some((pid, ExitStatus::Code(code))),
            WaitStatus::Signaled(pid, sig, _) => Some((pid, ExitStatus::Signal(sig as i32))),
            _ => None,
        }
    }

    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exited with status {c}"),
            ExitStatus::Signal(s) => match Signal::try_from(*s) {
                Ok(sig) => write!(f, "killed by signal {}", sig.as_str()),
                Err(_) => write!(f, "killed by signal {s}"),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, not ready yet. `ready_at` is set for `ready = "delay"`; `probe` is the longest
    /// its probe may take once it is ready, when one is configured.
    Starting {
        deadline: Instant,
        ready_at: Option<Instant>,
        probe: Option<Duration>,
    },
    /// Ready by its own account (or its delay); its probe runs. Killed at `deadline` if no
    /// verdict came (the probe runner always gives one before: this is a backstop).
    Probing {
        deadline: Instant,
    },
    Ready,
    /// Sent its stop signal; SIGKILL to its process group at `kill_at`.
    Stopping {
        kill_at: Instant,
    },
    /// Sent SIGKILL; waiting to be reaped.
    Killed,
    Exited(ExitStatus),
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            State::Starting { .. } => "starting",
            State::Probing { .. } => "probing",
            State::Ready => "ready",
            State::Stopping { .. } => "stopping",
            State::Killed => "killed",
            State::Exited(_) => "exited",
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        match *self {
            State::Starting { deadline, ready_at, .. } => Some(ready_at.map_or(deadline, |r| r.min(deadline))),
            State::Probing { deadline } => Some(deadline),
            State::Stopping { kill_at } => Some(kill_at),
            _ => None,
        }
    }

    pub fn is_alive(&self) -> bool {
        !matches!(self, State::Exited(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// READY=1 arrived from the worker or its process group, or it was seen listening.
    Ready(Instant),
    /// Its probe passed.
    ProbePassed,
    /// Its probe failed.
    ProbeFailed(Instant),
    /// Time passed; deadlines up to `now` are due.
    Tick(Instant),
    /// Stop gracefully (reload committed, or master stopping).
    Stop(Instant),
    /// Stop now.
    Kill,
    /// Reaped.
    Exited(ExitStatus),
}

/// What the master must do or learn after a transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    SendStopSignal,
    KillGroup,
    BecameReady,
    /// Ready by its own account: probe it now.
    StartProbe,
    StartTimedOut,
    /// The probe failed, or gave no verdict in time (`timed_out`).
    ProbeFailed {
        timed_out: bool,
    },
    /// The worker is gone; `expected` when zdd itself had asked it to go.
    Gone {
        status: ExitStatus,
        expected: bool,
    },
}

/// The state machine: the one place a worker's state changes.
pub fn transition(state: State, event: Event, stop_timeout: Duration) -> (State, Vec<Effect>) {
    use Event as E;
    use State as S;
    match (state, event) {
        (S::Exited(_), _) => (state, vec![]),
        (S::Starting { probe, .. }, E::Ready(now)) => said_ready(now, probe),
        (S::Probing { .. } | S::Ready | S::Stopping { .. } | S::Killed, E::Ready(_)) => (state, vec![]),
        (S::Probing { .. }, E::ProbePassed) => (S::Ready, vec![Effect::BecameReady]),
        // A worker that failed to start may have taken connections from the shared sockets
        // already: it is asked to stop like any other (SIGKILL at its stop timeout), so that
        // what it accepted is answered, never cut.
        (S::Probing { .. }, E::ProbeFailed(now)) => (
            S::Stopping {
                kill_at: crate::clock::after(now, stop_timeout),
            },
            vec![Effect::SendStopSignal, Effect::ProbeFailed { timed_out: false }],
        ),
        (_, E::ProbePassed | E::ProbeFailed(_)) => (state, vec![]),
        (
            S::Starting {
                ready_at: Some(at),
                deadline,
                probe,
            },
            E::Tick(now),
        ) if now >= at && at < deadline => said_ready(now, probe),
        // Never ready: not seen taking connections either (under "auto"), so nothing to finish;
        // and a worker hung in its boot must not hold a failed start for its stop timeout.
        (S::Starting { deadline, .. }, E::Tick(now)) if now >= deadline => {
            (S::Killed, vec![Effect::KillGroup, Effect::StartTimedOut])
        }
        (S::Probing { deadline }, E::Tick(now)) if now >= deadline => (
            S::Stopping {
                kill_at: crate::clock::after(now, stop_timeout),
            },
            vec![Effect::SendStopSignal, Effect::ProbeFailed { timed_out: true }],
        ),
        (S::Stopping { kill_at }, E::Tick(now)) if now >= kill_at => (S::Killed, vec![Effect::KillGroup]),
        (_, E::Tick(_)) => (state, vec![]),
        (S::Starting { .. } | S::Probing { .. } | S::Ready, E::Stop(now)) => (
            S::Stopping {
                kill_at: crate::clock::after(now, stop_timeout),
            },
            vec![Effect::SendStopSignal],
        ),
        (S::Stopping { .. } | S::Killed, E::Stop(_)) => (state, vec![]),
        (S::Killed, E::Kill) => (state, vec![]),
        (_, E::Kill) => (S::Killed, vec![Effect::KillGroup]),
        (prev, E::Exited(status)) => {
            let expected = matches!(prev, S::Stopping { .. } | S::Killed);
            (S::Exited(status), vec![Effect::Gone { status, expected }])
        }
    }
}

/// A starting worker said it is ready (or its delay passed): ready, or probed first.
fn said_ready(now: Instant, probe: Option<Duration>) -> (State, Vec<Effect>) {
    match probe {
        None => (State::Ready, vec![Effect::BecameReady]),
        Some(budget) => (
            State::Probing {
                deadline: crate::clock::after(now, budget),
            },
            vec![Effect::StartProbe],
        ),
    }
}

/// A started worker process as the loop holds it: what it does I/O with. Its lifecycle
/// (state, deadlines, slot, last lines) lives in the generations machine under the same pid.
pub struct Worker {
    pub pid: Pid,
    /// Its generation, fixed at spawn: the tag of its log lines.
    pub generation: u64,
    pub started_wall: std::time::SystemTime,
    pub pipes: Vec<Pipe>,
    pub status_text: Option<String>,
    /// The sockets it received; holding them keeps them open while it runs.
    pub listeners: Vec<Rc<Listener>>,
    /// Its private probe listener (`[worker.probe]`), the last fd it received: the master's
    /// copy, which it probes through; closed when the worker is reaped, so that its port
    /// cannot go to anyone else while the worker lives.
    pub probe: Option<Rc<Listener>>,
    /// Its own cgroup, where the master could create one: SIGKILL reaches every descendant
    /// there, even one that left the process group.
    pub cgroup: Option<crate::worker::cgroup::WorkerCgroup>,
}

/// Send `sig` to the process group `pid` leads (as systemd's KillMode=control-group does, so
/// that wrappers' children hear it too), or to `pid` alone if that fails.
pub fn signal_group(pid: Pid, sig: Signal) {
    if killpg(pid, sig).is_err() {
        let _ = kill(pid, sig);
    }
}

impl Worker {
    /// SIGKILL its process group and its cgroup.
    pub fn kill_group(&self) {
        signal_group(self.pid, Signal::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }

    /// The worker has exited and is still a zombie (see [`exited_child`]): SIGKILL whatever is
    /// left of its process group and its cgroup. While the zombie exists its pid, and so the
    /// process group id, cannot be reused: after reaping, `killpg` could hit a stranger.
    pub fn kill_leftovers(&self) {
        let _ = killpg(self.pid, Signal::SIGKILL);
        if let Some(cg) = &self.cgroup {
            cg.kill();
        }
    }
}

/// A child that has exited, left a zombie (`WNOWAIT`): the caller acts on it while its pid is
/// still taken, then reaps it with `waitpid(pid)`. `Ok(None)` when no child has exited.
pub fn exited_child() -> Result<Option<Pid>, nix::errno::Errno> {
    // SAFETY: siginfo_t is plain data, zeroed as waitid(2) asks for WNOHANG.
    let mut info: nix::libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to the siginfo_t above.
    let r = unsafe {
        nix::libc::waitid(
            nix::libc::P_ALL,
            0,
            &mut info,
            nix::libc::WEXITED | nix::libc::WNOHANG | nix::libc::WNOWAIT,
        )
    };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: waitid filled a SIGCHLD siginfo (or left it zeroed: si_pid 0).
    let pid = unsafe { info.si_pid() };
    Ok((pid != 0).then(|| Pid::from_raw(pid)))
}

/// Keep `line` among the last [`TAIL_LINES`] of a worker, reusing the oldest line's buffer.
pub fn remember(tail: &mut VecDeque<String>, line: &str) {
    let mut s = if tail.len() == TAIL_LINES {
        tail.pop_front().unwrap_or_default()
    } else {
        String::new()
    };
    s.clear();
    s.push_str(line);
    tail.push_back(s);
}

#[cfg(test)]
mod tests {
    use super::*;

    const STOP: Duration = Duration::from_secs(5);

    fn starting(now: Instant, ready_at: Option<Instant>) -> State {
        State::Starting {
            deadline: now + Duration::from_secs(10),
            ready_at,
            probe: None,
        }
    }

    #[test]
    fn ready_message_makes_a_starting_worker_ready() {
        let now = Instant::now();
        assert_eq!(
            transition(starting(now, None), Event::Ready(now), STOP),
            (State::Ready, vec![Effect::BecameReady])
        );
        assert_eq!(
            transition(State::Ready, Event::Ready(now), STOP),
            (State::Ready, vec![])
        );
    }

    #[test]
    fn delay_readiness_fires_at_its_time() {
        let now = Instant::now();
        let s = starting(now, Some(now + Duration::from_secs(1)));
        assert_eq!(transition(s, Event::Tick(now), STOP).0, s);
        assert_eq!(
            transition(s, Event::Tick(now + Duration::from_secs(1)), STOP),
            (State::Ready, vec![Effect::BecameReady])
        );
    }

    #[test]
    fn a_probed_worker_is_ready_only_when_its_probe_passes() {
        let now = Instant::now();
        let budget = Duration::from_secs(3);
        let s = State::Starting {
            deadline: now + Duration::from_secs(10),
            ready_at: None,
            probe: Some(budget),
        };
        let (p, e) = transition(s, Event::Ready(now), STOP);
        assert_eq!(p, State::Probing { deadline: now + budget });
        assert_eq!(e, vec![Effect::StartProbe]);
        assert_eq!(transition(p, Event::Ready(now), STOP), (p, vec![]));
        assert_eq!(
            transition(p, Event::Tick(now + Duration::from_secs(1)), STOP),
            (p, vec![])
        );
        assert_eq!(
            transition(p, Event::ProbePassed, STOP),
            (State::Ready, vec![Effect::BecameReady])
        );
        assert_eq!(
            transition(p, Event::ProbeFailed(now), STOP),
            (
                State::Stopping { kill_at: now + STOP },
                vec![Effect::SendStopSignal, Effect::ProbeFailed { timed_out: false }]
            )
        );
        assert_eq!(
            transition(p, Event::Tick(now + budget), STOP),
            (
                State::Stopping {
                    kill_at: now + budget + STOP
                },
                vec![Effect::SendStopSignal, Effect::ProbeFailed { timed_out: true }]
            )
        );
        // A verdict for a worker that is no longer probed changes nothing.
        assert_eq!(
            transition(State::Ready, Event::ProbeFailed(now), STOP),
            (State::Ready, vec![])
        );
        // Delayed readiness is probed too.
        let d = State::Starting {
            deadline: now + Duration::from_secs(10),
            ready_at: Some(now),
            probe: Some(budget),
        };
        assert_eq!(transition(d, Event::Tick(now), STOP).1, vec![Effect::StartProbe]);
    }

    #[test]
    fn start_timeout_kills() {
        let now = Instant::now();
        let (s, e) = transition(starting(now, None), Event::Tick(now + Duration::from_secs(10)), STOP);
        assert_eq!(s, State::Killed);
        assert_eq!(e, vec![Effect::KillGroup, Effect::StartTimedOut]);
        let (_, e) = transition(s, Event::Exited(ExitStatus::Signal(9)), STOP);
        assert_eq!(
            e,
            vec![Effect::Gone {
                status: ExitStatus::Signal(9),
                expected: true
            }]
        );
    }

    #[test]
    fn stop_then_kill_after_timeout() {
        let now = Instant::now();
        let (s, e) = transition(State::Ready, Event::Stop(now), STOP);
        assert_eq!(s, State::Stopping { kill_at: now + STOP });
        assert_eq!(e, vec![Effect::SendStopSignal]);
        assert_eq!(transition(s, Event::Stop(now), STOP), (s, vec![]));
        assert_eq!(
            transition(s, Event::Tick(now + Duration::from_secs(1)), STOP),
            (s, vec![])
        );
        assert_eq!(
            transition(s, Event::Tick(now + STOP), STOP),
            (State::Killed, vec![Effect::KillGroup])
        );
    }

    #[test]
    fn unrequested_exit_is_unexpected() {
        let (s, e) = transition(State::Ready, Event::Exited(ExitStatus::Code(3)), STOP);
        assert_eq!(s, State::Exited(ExitStatus::Code(3)));
        assert_eq!(
            e,
            vec![Effect::Gone {
                status: ExitStatus::Code(3),
                expected: false
            }]
        );
    }

    #[test]
    fn exited_is_final() {
        let s = State::Exited(ExitStatus::Code(0));
        for ev in [
            Event::Ready(Instant::now()),
            Event::ProbePassed,
            Event::ProbeFailed(Instant::now()),
            Event::Kill,
            Event::Stop(Instant::now()),
            Event::Tick(Instant::now()),
        ] {
            assert_eq!(transition(s, ev, STOP), (s, vec![]));
        }
    }

    #[test]
    fn kill_is_idempotent() {
        assert_eq!(
            transition(State::Ready, Event::Kill, STOP),
            (State::Killed, vec![Effect::KillGroup])
        );
        assert_eq!(transition(State::Killed, Event::Kill, STOP), (State::Killed, vec![]));
    }

    #[test]
    fn status_reads_well() {
        assert_eq!(ExitStatus::Code(3).to_string(), "exited with status 3");
        assert_eq!(ExitStatus::Signal(9).to_string(), "killed by signal SIGKILL");
    }
}
