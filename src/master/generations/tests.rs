//! Unit tests of the generations state machine, driven by a fake loop.

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn params(count: usize) -> Params {
    Params {
        count,
        restart: Restart::Always,
        ready: Ready::Notify,
        start_timeout: 10 * SEC,
        stop_signal: Signal::SIGTERM,
        stop_timeout: 5 * SEC,
        max_draining: 2,
        probe: None,
        rolling: None,
        stable_after: Duration::ZERO,
        watchdog: None,
        max_lifetime: None,
        recycle_jitter: Duration::ZERO,
        max_rss: None,
        before_reload: None,
        after_reload: false,
    }
}

fn probed(count: usize) -> Params {
    Params {
        probe: Some(3 * SEC),
        ..params(count)
    }
}

fn rolling(count: usize, surge: usize) -> Params {
    Params {
        rolling: Some(surge),
        ..params(count)
    }
}

fn with_restart(count: usize, restart: Restart) -> Params {
    Params {
        restart,
        ..params(count)
    }
}

const FAIL: ExitStatus = ExitStatus::Code(1);
const OK: ExitStatus = ExitStatus::Code(0);
const CLEAN: ExitStatus = ExitStatus::Code(0);
const C1: ClientId = ClientId(1);
const C2: ClientId = ClientId(2);
const C3: ClientId = ClientId(3);

/// A fake loop: it carries out spawns and reload preparations at once and feeds their
/// results back, depth first, as the real loop does.
struct Sim {
    g: Generations,
    now: Instant,
    next_pid: i32,
    /// Spawns of these (generation, slot) fail.
    fail_spawn: Vec<(u64, usize)>,
    /// What the next reload's preparation gives.
    next: Result<Params, String>,
    /// How a hook asked for ends, at once; None: it runs until the test says (HookDone).
    hook: Option<HookResult>,
}

impl Sim {
    fn new(p: Params) -> Sim {
        Sim {
            next: Ok(p.clone()),
            g: Generations::new(p, "/etc/zdd.toml"),
            now: Instant::now(),
            next_pid: 100,
            fail_spawn: vec![],
            hook: None,
        }
    }

    /// Started, every worker of generation 1 ready.
    fn running(p: Params) -> Sim {
        let mut s = Sim::new(p);
        s.step(Event::Start);
        s.ready_all(1);
        assert_eq!(s.g.phase(), Phase::Running);
        s
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
    }

    /// One turn of the loop: the event, then the turn's Tick.
    fn step(&mut self, ev: Event) -> Vec<Action> {
        self.turn(vec![ev])
    }

    /// One turn of the loop with several events.
    fn turn(&mut self, events: Vec<Event>) -> Vec<Action> {
        let mut all = Vec::new();
        for ev in events.into_iter().chain([Event::Tick]) {
            let first = self.g.handle(self.now, ev);
            self.carry_out(first, &mut all);
        }
        all
    }

    fn carry_out(&mut self, actions: Vec<Action>, all: &mut Vec<Action>) {
        for a in actions {
            let back = match a {
                Action::Spawn { generation, slot } if self.fail_spawn.contains(&(generation, slot)) => {
                    Some(Event::SpawnFailed {
                        generation,
                        slot,
                        reason: "starting worker: exec: ENOENT".into(),
                    })
                }
                Action::Spawn { generation, slot } => {
                    self.next_pid += 1;
                    Some(Event::WorkerSpawned {
                        pid: Pid::from_raw(self.next_pid),
                        generation,
                        slot,
                    })
                }
                Action::PrepareReload { generation, .. } => Some(match self.next.clone() {
                    Ok(params) => Event::ReloadPrepared { generation, params },
                    Err(message) => Event::ReloadPrepareFailed { generation, message },
                }),
                Action::RunHook { which, generation } => self.hook.clone().map(|result| Event::HookDone {
                    which,
                    generation,
                    result,
                }),
                _ => None,
            };
            all.push(a);
            if let Some(ev) = back {
                let more = self.g.handle(self.now, ev);
                self.carry_out(more, all);
            }
        }
    }

    fn pids(&self, generation: u64) -> Vec<Pid> {
        self.g
            .workers()
            .iter()
            .filter(|w| w.generation == generation)
            .map(|w| w.pid)
            .collect()
    }

    fn pid(&self, generation: u64, slot: usize) -> Pid {
        self.g
            .workers()
            .iter()
            .rev()
            .find(|w| w.generation == generation && w.slot == slot)
            .map(|w| w.pid)
            .expect("no such worker")
    }

    fn ready_all(&mut self, generation: u64) -> Vec<Action> {
        let mut all = Vec::new();
        for pid in self.pids(generation) {
            all.extend(self.step(Event::WorkerReady { pid }));
            if matches!(self.state(pid), State::Probing { .. }) {
                all.extend(self.step(Event::ProbePassed { pid }));
            }
        }
        all
    }

    fn exit(&mut self, pid: Pid, status: ExitStatus) -> Vec<Action> {
        self.step(Event::WorkerExited { pid, status })
    }

    fn reload(&mut self, from: Option<ClientId>) -> Vec<Action> {
        self.step(Event::ReloadRequested {
            from,
            if_generation: None,
        })
    }

    fn state(&self, pid: Pid) -> State {
        self.g.worker(pid).map(|w| w.state).expect("no such worker")
    }
}

fn spawns(a: &[Action]) -> Vec<(u64, usize)> {
    a.iter()
        .filter_map(|a| match a {
            &Action::Spawn { generation, slot } => Some((generation, slot)),
            _ => None,
        })
        .collect()
}

fn killed(a: &[Action]) -> Vec<Pid> {
    a.iter()
        .filter_map(|a| match a {
            &Action::KillGroup { pid } => Some(pid),
            _ => None,
        })
        .collect()
}

fn signalled(a: &[Action]) -> Vec<Pid> {
    a.iter()
        .filter_map(|a| match a {
            &Action::Signal { pid, .. } => Some(pid),
            _ => None,
        })
        .collect()
}

fn replies(a: &[Action]) -> Vec<(ClientId, bool, String)> {
    a.iter()
        .filter_map(|a| match a {
            Action::Reply { to, ok, message, .. } => Some((*to, *ok, message.clone())),
            _ => None,
        })
        .collect()
}

fn reply_data(a: &[Action], client: ClientId) -> Value {
    a.iter()
        .find_map(|a| match a {
            Action::Reply { to, data, .. } if *to == client => Some(data.clone()),
            _ => None,
        })
        .expect("no reply")
}

fn progress(a: &[Action], client: ClientId) -> Vec<String> {
    a.iter()
        .filter_map(|a| match a {
            Action::Progress { to, message } if *to == client => Some(message.clone()),
            _ => None,
        })
        .collect()
}

fn prepares(a: &[Action]) -> usize {
    a.iter().filter(|a| matches!(a, Action::PrepareReload { .. })).count()
}

fn logged(a: &[Action], text: &str) -> bool {
    a.iter()
        .any(|a| matches!(a, Action::Log { message, .. } if message.contains(text)))
}

fn exit_code(a: &[Action]) -> Option<i32> {
    a.iter().find_map(|a| match a {
        Action::Exit { code } => Some(*code),
        _ => None,
    })
}

/// Reap every worker that is left (as the loop would after they obeyed).
fn reap_all(s: &mut Sim) -> Vec<Action> {
    let mut all = Vec::new();
    for pid in s.g.workers().iter().map(|w| w.pid).collect::<Vec<_>>() {
        all.extend(s.exit(pid, ExitStatus::Signal(15)));
    }
    all
}

// ---- start ---------------------------------------------------------------------------

#[test]
fn start_spawns_every_slot_and_succeeds_once_all_are_ready() {
    let mut s = Sim::new(params(3));
    let a = s.step(Event::Start);
    assert_eq!(spawns(&a), vec![(1, 0), (1, 1), (1, 2)]);
    assert_eq!(a[0], Action::TellSystemd(Systemd::ExtendTimeout(15 * SEC)));
    let pids = s.pids(1);
    s.step(Event::WorkerReady { pid: pids[0] });
    let a = s.step(Event::WorkerReady { pid: pids[1] });
    assert_eq!(s.g.phase(), Phase::Starting);
    assert!(!a.iter().any(|a| matches!(a, Action::StartSucceeded { .. })));
    let a = s.step(Event::WorkerReady { pid: pids[2] });
    assert_eq!(s.g.phase(), Phase::Running);
    assert!(a.contains(&Action::StartSucceeded {
        generation: 1,
        workers: 3
    }));
    assert!(a.contains(&Action::TellSystemd(Systemd::Ready {
        status: "generation 1 serving (3 workers)".into()
    })));
}

#[test]
fn start_fails_when_a_worker_exits_before_ready_with_its_last_lines() {
    let mut s = Sim::new(params(2));
    s.step(Event::Start);
    let pid = s.pid(1, 1);
    s.g.remember(pid, "Traceback (most recent call last):");
    s.g.remember(pid, "ImportError: no module named app");
    let a = s.exit(pid, ExitStatus::Code(3));
    assert!(a.contains(&Action::StartFailed {
        reason: format!("worker pid {pid} exited with status 3 during start-up"),
        tail: vec![
            "Traceback (most recent call last):".into(),
            "ImportError: no module named app".into()
        ],
    }));
    assert!(logged(&a, "  | ImportError"));
    assert_eq!(s.g.phase(), Phase::Stopping);
    assert_eq!(s.g.exit_code(), 1);
    assert_eq!(signalled(&a), vec![s.pid(1, 0)]);
    // The other worker goes, then the master.
    let a = s.exit(s.pid(1, 0), ExitStatus::Signal(15));
    assert_eq!(exit_code(&a), Some(1));
    // Only one start report ever goes out.
    assert_eq!(a.iter().filter(|a| matches!(a, Action::StartFailed { .. })).count(), 0);
}

#[test]
fn start_fails_on_start_timeout() {
    let mut s = Sim::new(params(1));
    s.step(Event::Start);
    let pid = s.pid(1, 0);
    assert_eq!(s.g.next_deadline(), Some(s.now + 10 * SEC));
    s.advance(10 * SEC - Duration::from_millis(1));
    assert_eq!(s.step(Event::Tick), vec![]);
    s.advance(Duration::from_millis(1));
    let a = s.step(Event::Tick);
    assert_eq!(killed(&a), vec![pid]);
    assert!(a.contains(&Action::StartFailed {
        reason: format!(
            "worker pid {pid} did not become ready within 10s; if the server never sends READY=1, \
             set ready = \"listening\" (or \"auto\")"
        ),
        tail: vec![],
    }));
    assert_eq!(s.state(pid), State::Killed);
    let a = s.exit(pid, ExitStatus::Signal(9));
    assert_eq!(exit_code(&a), Some(1));
}

#[test]
fn start_stops_spawning_at_the_first_spawn_failure() {
    let mut s = Sim::new(params(3));
    s.fail_spawn.push((1, 1));
    let a = s.step(Event::Start);
    assert_eq!(spawns(&a), vec![(1, 0), (1, 1)]);
    assert!(a.contains(&Action::StartFailed {
        reason: "starting worker: exec: ENOENT".into(),
        tail: vec![],
    }));
    assert_eq!(signalled(&a), vec![s.pid(1, 0)]);
    assert_eq!(s.g.phase(), Phase::Stopping);
}

#[test]
fn ready_worker_crashing_during_start_is_restarted_and_the_start_succeeds() {
    let mut s = Sim::new(params(2));
    s.step(Event::Start);
    let (w0, w1) = (s.pid(1, 0), s.pid(1, 1));
    s.step(Event::WorkerReady { pid: w0 });
    let a = s.exit(w0, FAIL);
    assert!(!a.iter().any(|a| matches!(a, Action::StartFailed { .. })));
    assert!(logged(&a, "worker exited unexpectedly; restarting"));
    assert_eq!(s.g.slots()[0].restart_at, Some(s.now + BACKOFF_MIN));
    // Every slot has been ready once: the start succeeded, though slot 0 is restarting.
    let a = s.step(Event::WorkerReady { pid: w1 });
    assert!(a.contains(&Action::StartSucceeded {
        generation: 1,
        workers: 2
    }));
    s.advance(BACKOFF_MIN);
    let a = s.step(Event::Tick);
    assert_eq!(spawns(&a), vec![(1, 0)]);
    assert_eq!(s.g.slots()[0].restarts, 1);
}

#[test]
fn delay_readiness_makes_workers_ready_at_their_time() {
    let mut s = Sim::new(Params {
        ready: Ready::Delay(2 * SEC),
        ..params(1)
    });
    s.step(Event::Start);
    assert_eq!(s.g.next_deadline(), Some(s.now + 2 * SEC));
    s.advance(2 * SEC);
    let a = s.step(Event::Tick);
    assert!(a.contains(&Action::StartSucceeded {
        generation: 1,
        workers: 1
    }));
    assert_eq!(s.state(s.pid(1, 0)), State::Ready);
}

#[test]
fn stop_during_start_reports_the_start_as_failed() {
    let mut s = Sim::new(params(1));
    s.step(Event::Start);
    let a = s.step(Event::StopRequested {
        by: StopBy::Signal(Signal::SIGTERM),
    });
    assert!(a.contains(&Action::StartFailed {
        reason: "the master was stopped during start-up".into(),
        tail: vec![],
    }));
    assert_eq!(s.g.exit_code(), 0);
    let a = reap_all(&mut s);
    assert_eq!(exit_code(&a), Some(0));
}

// ---- reload ----------------------------------------------------------------------------

#[test]
fn reload_commits_once_every_new_worker_is_ready() {
    let mut s = Sim::running(params(2));
    let old = s.pids(1);
    let a = s.reload(Some(C1));
    assert_eq!(
        progress(&a, C1),
        vec!["reading /etc/zdd.toml", "starting generation 2 (2 workers)"]
    );
    assert!(a.contains(&Action::TellSystemd(Systemd::Reloading { generation: 2 })));
    assert_eq!(spawns(&a), vec![(2, 0), (2, 1)]);
    assert_eq!(s.g.reloading(), Some(2));
    assert_eq!(s.g.next_generation(), 3);
    let new = s.pids(2);
    let a = s.step(Event::WorkerReady { pid: new[0] });
    assert!(signalled(&a).is_empty());
    let a = s.step(Event::WorkerReady { pid: new[1] });
    assert_eq!(signalled(&a), old);
    assert!(a.contains(&Action::CommitReload { generation: 2 }));
    assert_eq!(
        replies(&a),
        vec![(
            C1,
            true,
            "reloaded: generation 2 serving (2 workers); generation 1 signalled to stop".into()
        )]
    );
    assert_eq!(reply_data(&a, C1), json!({ "generation": 2, "old_generation": 1 }));
    assert_eq!(s.g.generation(), 2);
    assert_eq!(s.g.reloading(), None);
    assert!(matches!(s.state(old[0]), State::Stopping { .. }));
    // The old workers leave as asked: no restart.
    let a = s.exit(old[0], CLEAN);
    assert!(logged(&a, "worker exited"));
    assert!(s.g.slots().iter().all(|sl| sl.restart_at.is_none()));
}

#[test]
fn reload_asked_for_while_starting_runs_once_the_start_succeeded() {
    let mut s = Sim::new(params(1));
    s.step(Event::Start);
    let a = s.reload(Some(C1));
    assert_eq!(prepares(&a), 0);
    assert_eq!(progress(&a, C1), vec!["a reload is under way; this one will follow it"]);
    let a = s.ready_all(1);
    assert!(a.contains(&Action::StartSucceeded {
        generation: 1,
        workers: 1
    }));
    assert_eq!(prepares(&a), 1);
    assert_eq!(s.g.reloading(), Some(2));
    assert_eq!(s.g.attempt(), 1);
    let a = s.ready_all(2);
    assert_eq!(replies(&a).len(), 1);
    assert!(replies(&a)[0].1);
}

#[test]
fn reloads_asked_for_during_a_reload_coalesce_into_one_more() {
    let mut s = Sim::running(params(1));
    s.reload(Some(C1));
    let a = s.reload(Some(C2));
    assert_eq!(prepares(&a), 0);
    s.reload(Some(C3));
    s.reload(None);
    let a = s.ready_all(2);
    // Attempt 1 answers its client; attempt 2 starts at once, for everyone else.
    assert_eq!(replies(&a), vec![(C1, true, replies(&a)[0].2.clone())]);
    assert_eq!(prepares(&a), 1);
    assert_eq!(s.g.reloading(), Some(3));
    let a = s.ready_all(3);
    let r = replies(&a);
    assert_eq!(r.iter().map(|r| r.0).collect::<Vec<_>>(), vec![C2, C3]);
    assert_eq!(prepares(&a), 0);
    assert_eq!(s.g.generation(), 3);
    assert_eq!(s.g.attempt(), 2);
}

#[test]
fn if_generation_joins_the_reload_under_way() {
    let mut s = Sim::running(params(1));
    s.reload(Some(C1));
    let a = s.step(Event::ReloadRequested {
        from: Some(C2),
        if_generation: Some(1),
    });
    assert!(a.is_empty());
    let a = s.ready_all(2);
    let r = replies(&a);
    assert_eq!(
        r.iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        vec![(C1, true), (C2, true)]
    );
    // Nothing follows: no one asked for another reading of the config.
    assert_eq!(prepares(&a), 0);
}

#[test]
fn if_generation_is_refused_unless_that_generation_serves() {
    let cases: [(bool, u64, &str); 3] = [
        // (started, if_generation, refusal)
        (true, 7, "reload refused: generation 7 is not serving (generation 1 is)"),
        (
            false,
            1,
            "reload refused: generation 1 is not serving (generation 1 is still starting)",
        ),
        (
            false,
            2,
            "reload refused: generation 2 is not serving (generation 1 is still starting)",
        ),
    ];
    for (started, n, refusal) in cases {
        let mut s = if started {
            Sim::running(params(1))
        } else {
            let mut s = Sim::new(params(1));
            s.step(Event::Start);
            s
        };
        let a = s.step(Event::ReloadRequested {
            from: Some(C1),
            if_generation: Some(n),
        });
        assert_eq!(replies(&a), vec![(C1, false, refusal.into())]);
        assert_eq!(prepares(&a), 0);
        assert_eq!(s.g.attempt(), 0);
        // Refused requests do not queue anything.
        let a = s.ready_all(1);
        assert_eq!(prepares(&a), 0);
    }
}

#[test]
fn reload_is_refused_while_stopping() {
    let mut s = Sim::running(params(1));
    s.step(Event::StopRequested { by: StopBy::Control });
    let a = s.reload(Some(C1));
    assert_eq!(
        replies(&a),
        vec![(C1, false, "reload refused: the master is stopping".into())]
    );
}

#[test]
fn reload_preparation_failure_changes_nothing() {
    let mut s = Sim::running(params(1));
    s.next = Err("reload failed: invalid config; nothing changed: bad key".into());
    let a = s.reload(Some(C1));
    assert_eq!(
        replies(&a),
        vec![(
            C1,
            false,
            "reload failed: invalid config; nothing changed: bad key".into()
        )]
    );
    assert_eq!(reply_data(&a, C1), json!({ "generation": 1 }));
    assert!(a.contains(&Action::TellSystemd(Systemd::Ready {
        status: "reload failed: invalid config; nothing changed: bad key; generation 1 serving (1 worker)".into()
    })));
    assert!(spawns(&a).is_empty());
    assert_eq!(s.g.reloading(), None);
    assert_eq!(s.g.next_generation(), 2);
    assert_eq!(s.g.attempt(), 1);
    // The next attempt builds generation 2.
    s.next = Ok(params(1));
    let a = s.reload(None);
    assert_eq!(spawns(&a), vec![(2, 0)]);
}

/// A new worker that fails mid-reload fails the whole new generation; the serving one is
/// untouched.
#[test]
fn new_worker_failing_mid_reload_fails_the_reload() {
    let cases: [(&str, Option<ExitStatus>, &str); 3] = [
        ("exits 1", Some(FAIL), "exited with status 1 during start-up"),
        ("exits 0", Some(CLEAN), "exited with status 0 during start-up"),
        (
            "times out",
            None,
            "did not become ready within 10s; if the server never sends READY=1, set ready = \"listening\" (or \"auto\")",
        ),
    ];
    for (what, exit, reason) in cases {
        let mut s = Sim::running(params(2));
        let old = s.pids(1);
        s.reload(Some(C1));
        let (n0, n1) = (s.pid(2, 0), s.pid(2, 1));
        s.step(Event::WorkerReady { pid: n1 });
        s.g.remember(n0, "last words");
        let a = match exit {
            Some(status) => s.exit(n0, status),
            None => {
                s.advance(10 * SEC);
                s.step(Event::Tick)
            }
        };
        // The others are asked to stop (they may hold connections); one that missed its
        // start timeout was killed.
        assert_eq!(signalled(&a), vec![n1], "{what}");
        let expect_killed = if exit.is_some() { vec![] } else { vec![n0] };
        assert_eq!(killed(&a), expect_killed, "{what}");
        assert!(a.contains(&Action::DiscardReload {
            generation: 2,
            failed: true
        }));
        let message = format!("reload failed: worker pid {n0} {reason}; generation 1 keeps serving");
        assert_eq!(replies(&a), vec![(C1, false, message.clone())], "{what}");
        assert_eq!(
            reply_data(&a, C1),
            json!({ "generation": 1, "failed_generation": 2, "tail": ["last words"] })
        );
        assert!(a.contains(&Action::TellSystemd(Systemd::Ready { status: message })));
        assert_eq!(s.g.generation(), 1);
        assert_eq!(s.g.reloading(), None);
        for pid in &old {
            assert_eq!(s.state(*pid), State::Ready);
        }
        // The stopped new workers leave quietly.
        let a = s.exit(n1, ExitStatus::Signal(15));
        assert!(spawns(&a).is_empty());
        assert_eq!(s.g.phase(), Phase::Running);
    }
}

#[test]
fn new_worker_ready_then_gone_in_the_same_turn_fails_the_reload() {
    let mut s = Sim::running(params(1));
    s.reload(Some(C1));
    let n = s.pid(2, 0);
    let a = s.turn(vec![
        Event::WorkerReady { pid: n },
        Event::WorkerExited { pid: n, status: FAIL },
    ]);
    assert!(!a.contains(&Action::CommitReload { generation: 2 }));
    assert!(!replies(&a)[0].1);
    assert_eq!(s.g.generation(), 1);
    // One turn later, it is a crash of the serving generation instead.
    s.reload(Some(C1));
    let n = s.pid(3, 0);
    let a = s.step(Event::WorkerReady { pid: n });
    assert!(a.contains(&Action::CommitReload { generation: 3 }));
    let a = s.exit(n, FAIL);
    assert!(logged(&a, "worker exited unexpectedly; restarting"));
}

#[test]
fn reload_asked_for_in_the_turn_a_reload_failed_follows_it() {
    let mut s = Sim::running(params(1));
    s.reload(Some(C1));
    let n = s.pid(2, 0);
    let a = s.turn(vec![
        Event::WorkerExited { pid: n, status: FAIL },
        Event::ReloadRequested {
            from: Some(C2),
            if_generation: None,
        },
    ]);
    assert_eq!(
        replies(&a).iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        vec![(C1, false)]
    );
    assert_eq!(prepares(&a), 1);
    assert_eq!(s.g.reloading(), Some(3));
    let a = s.ready_all(3);
    assert_eq!(
        replies(&a).iter().map(|r| (r.0, r.1)).collect::<Vec<_>>(),
        vec![(C2, true)]
    );
}

#[test]
fn reload_with_one_of_n_slots_failing_to_spawn_stops_the_others() {
    let mut s = Sim::running(params(3));
    s.fail_spawn.push((2, 1));
    let a = s.reload(Some(C1));
    assert_eq!(spawns(&a), vec![(2, 0), (2, 1)]);
    let n0 = s.pid(2, 0);
    assert_eq!(
        signalled(&a),
        vec![n0],
        "asked to stop: it may have taken connections already"
    );
    assert_eq!(
        replies(&a),
        vec![(
            C1,
            false,
            "reload failed: starting worker: exec: ENOENT; generation 1 keeps serving".into()
        )]
    );
    assert_eq!(s.g.generation(), 1);
    assert_eq!(s.g.next_generation(), 3);
}

#[test]
fn max_draining_kills_the_oldest_generation() {
    let mut s = Sim::running(Params {
        max_draining: 1,
        ..params(1)
    });
    let g1 = s.pid(1, 0);
    s.reload(None);
    s.ready_all(2);
    let g2 = s.pid(2, 0);
    assert!(matches!(s.state(g1), State::Stopping { .. }));
    s.reload(None);
    let a = s.ready_all(3);
    // Generation 1 and 2 both drain: 1 is one too many.
    assert_eq!(killed(&a), vec![g1]);
    assert_eq!(signalled(&a), vec![g2]);
    assert!(logged(&a, "too many generations draining"));
    assert!(matches!(s.state(g2), State::Stopping { .. }));
}

#[test]
fn stop_during_a_reload_cancels_it() {
    let mut s = Sim::running(params(1));
    s.reload(Some(C1));
    s.reload(Some(C2));
    let a = s.step(Event::StopRequested {
        by: StopBy::Signal(Signal::SIGINT),
    });
    assert_eq!(
        replies(&a),
        vec![
            (C1, false, "reload cancelled: the master is stopping".into()),
            (C2, false, "reload cancelled: the master is stopping".into()),
        ]
    );
    assert!(a.contains(&Action::DiscardReload {
        generation: 2,
        failed: false
    }));
    assert!(a.contains(&Action::CancelUpgrade));
    assert!(a.contains(&Action::TellSystemd(Systemd::Stopping)));
    assert_eq!(signalled(&a), vec![s.pid(1, 0), s.pid(2, 0)]);
    assert_eq!(s.g.reloading(), None);
    // The new worker becoming ready now commits nothing.
    let a = s.step(Event::WorkerReady { pid: s.pid(2, 0) });
    assert!(a.is_empty());
    let a = reap_all(&mut s);
    assert_eq!(exit_code(&a), Some(0));
    assert!(spawns(&a).is_empty());
}

#[test]
fn old_worker_exiting_during_a_reload_under_each_policy() {
    // (policy, exit status, restarted, commit: master stops after a failed reload)
    let cases = [
        (Restart::Always, CLEAN, true),
        (Restart::Always, FAIL, true),
        (Restart::OnFailure, CLEAN, false),
        (Restart::OnFailure, FAIL, true),
        (Restart::Never, CLEAN, false),
        (Restart::Never, FAIL, false),
    ];
    for (policy, status, restarted) in cases {
        for reload_succeeds in [true, false] {
            let what = format!("{policy:?} {status} reload_succeeds={reload_succeeds}");
            let mut s = Sim::running(with_restart(1, policy));
            s.reload(None);
            let a = s.exit(s.pid(1, 0), status);
            assert_eq!(s.g.slots()[0].restart_at.is_some(), restarted, "{what}");
            // The starting generation counts as live: the master does not stop.
            assert_eq!(s.g.phase(), Phase::Running, "{what}");
            assert!(signalled(&a).is_empty(), "{what}");
            let a = if reload_succeeds {
                s.ready_all(2)
            } else {
                s.exit(s.pid(2, 0), FAIL)
            };
            if reload_succeeds {
                assert_eq!(s.g.generation(), 2, "{what}");
                assert_eq!(s.g.phase(), Phase::Running, "{what}");
                // The new generation's slots start afresh.
                assert!(s.g.slots()[0].restart_at.is_none(), "{what}");
            } else if restarted {
                assert_eq!(s.g.phase(), Phase::Running, "{what}");
            } else {
                // Nothing serves and nothing will: the master stops.
                assert!(logged(&a, "no workers left and none to restart"), "{what}");
                assert_eq!(s.g.phase(), Phase::Stopping, "{what}");
                assert_eq!(s.g.exit_code(), i32::from(status != CLEAN), "{what}");
            }
        }
    }
}

// ---- crashes and restarts --------------------------------------------------------------

#[test]
fn restart_policies_decide_what_a_crash_does() {
    // (policy, status, restarted, master stops, exit code)
    let cases = [
        (Restart::Always, CLEAN, true, false, 0),
        (Restart::Always, FAIL, true, false, 0),
        (Restart::Always, ExitStatus::Signal(9), true, false, 0),
        (Restart::OnFailure, CLEAN, false, true, 0),
        (Restart::OnFailure, FAIL, true, false, 0),
        (Restart::Never, CLEAN, false, true, 0),
        (Restart::Never, FAIL, false, true, 1),
    ];
    for (policy, status, restarted, stops, code) in cases {
        let what = format!("{policy:?} {status}");
        let mut s = Sim::running(with_restart(1, policy));
        let a = s.exit(s.pid(1, 0), status);
        assert_eq!(s.g.slots()[0].restart_at.is_some(), restarted, "{what}");
        assert_eq!(s.g.phase() == Phase::Stopping, stops, "{what}");
        assert_eq!(exit_code(&a), stops.then_some(code), "{what}");
        if !restarted {
            assert!(logged(&a, "not restarting (restart policy)"), "{what}");
        }
    }
}

#[test]
fn clean_exit_under_on_failure_keeps_the_master_while_others_serve() {
    let mut s = Sim::running(with_restart(2, Restart::OnFailure));
    s.exit(s.pid(1, 0), CLEAN);
    assert_eq!(s.g.phase(), Phase::Running);
    let a = s.exit(s.pid(1, 1), CLEAN);
    assert_eq!(s.g.phase(), Phase::Stopping);
    assert_eq!(exit_code(&a), Some(0));
}

#[test]
fn crash_restart_back_off_doubles_up_to_its_cap() {
    let mut s = Sim::running(params(1));
    let mut delays = Vec::new();
    for _ in 0..12 {
        s.exit(s.pid(1, 0), FAIL);
        let at = s.g.slots()[0].restart_at.expect("restart scheduled");
        delays.push(at - s.now);
        assert_eq!(s.g.next_deadline(), Some(at));
        s.now = at;
        let a = s.step(Event::Tick);
        assert_eq!(spawns(&a), vec![(1, 0)]);
    }
    let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
    assert_eq!(
        ms,
        vec![100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000]
    );
    assert_eq!(s.g.slots()[0].restarts, 12);
    assert_eq!(s.g.restarts(&s.g.workers()[0]), 12);
}

#[test]
fn crash_back_off_is_forgotten_after_a_healthy_run() {
    let mut s = Sim::running(params(1));
    for _ in 0..3 {
        s.exit(s.pid(1, 0), FAIL);
        s.now = s.g.slots()[0].restart_at.expect("restart");
        s.step(Event::Tick);
    }
    assert_eq!(s.g.slots()[0].failures, 3);
    let pid = s.pid(1, 0);
    s.step(Event::WorkerReady { pid });
    s.advance(BACKOFF_RESET);
    s.exit(pid, FAIL);
    assert_eq!(s.g.slots()[0].failures, 1);
    assert_eq!(s.g.slots()[0].restart_at, Some(s.now + BACKOFF_MIN));
}

#[test]
fn a_failed_restart_spawn_backs_off_again() {
    let mut s = Sim::running(params(1));
    s.exit(s.pid(1, 0), FAIL);
    s.fail_spawn.push((1, 0));
    s.advance(BACKOFF_MIN);
    let a = s.step(Event::Tick);
    assert_eq!(spawns(&a), vec![(1, 0)]);
    assert!(logged(&a, "starting worker: exec: ENOENT"));
    assert_eq!(s.g.slots()[0].failures, 2);
    assert_eq!(s.g.slots()[0].restart_at, Some(s.now + 2 * BACKOFF_MIN));
    assert_eq!(s.g.phase(), Phase::Running);
}

#[test]
fn restarted_worker_missing_its_start_timeout_is_a_crash() {
    let mut s = Sim::running(params(1));
    s.exit(s.pid(1, 0), FAIL);
    s.advance(BACKOFF_MIN);
    s.step(Event::Tick);
    let pid = s.pid(1, 0);
    s.advance(10 * SEC);
    let a = s.step(Event::Tick);
    assert_eq!(killed(&a), vec![pid]);
    assert!(logged(&a, "did not become ready within 10s"));
    assert_eq!(s.g.slots()[0].restart_at, Some(s.now + 2 * BACKOFF_MIN));
    // Its exit after the kill was asked for: nothing more.
    let a = s.exit(pid, ExitStatus::Signal(9));
    assert!(logged(&a, "worker exited"));
    assert_eq!(s.g.slots()[0].failures, 2);
}

#[test]
fn old_generation_exiting_after_commit_is_not_restarted() {
    let mut s = Sim::running(with_restart(1, Restart::Never));
    let old = s.pid(1, 0);
    s.reload(None);
    s.ready_all(2);
    let a = s.exit(old, FAIL);
    assert!(logged(&a, "worker exited"));
    assert!(spawns(&a).is_empty());
    assert_eq!(s.g.phase(), Phase::Running);
    assert_eq!(s.g.exit_code(), 0);
}

// ---- stop --------------------------------------------------------------------------------

#[test]
fn stop_signals_every_worker_and_kills_after_stop_timeout() {
    let mut s = Sim::running(params(2));
    let pids = s.pids(1);
    let a = s.step(Event::StopRequested { by: StopBy::Control });
    assert_eq!(signalled(&a), pids);
    assert!(a.contains(&Action::Signal {
        pid: pids[0],
        signal: Signal::SIGTERM
    }));
    assert_eq!(s.g.next_deadline(), Some(s.now + 5 * SEC));
    s.advance(5 * SEC);
    let a = s.step(Event::Tick);
    assert_eq!(killed(&a), pids);
    let a = s.exit(pids[0], ExitStatus::Signal(9));
    assert_eq!(exit_code(&a), None);
    let a = s.exit(pids[1], ExitStatus::Signal(9));
    assert_eq!(exit_code(&a), Some(0));
    assert!(s.g.finished());
}

#[test]
fn second_stop_signal_kills_but_a_second_control_stop_does_not() {
    let mut s = Sim::running(params(2));
    s.step(Event::StopRequested {
        by: StopBy::Signal(Signal::SIGTERM),
    });
    let a = s.step(Event::StopRequested { by: StopBy::Control });
    assert!(a.is_empty());
    let a = s.step(Event::StopRequested {
        by: StopBy::Signal(Signal::SIGQUIT),
    });
    assert_eq!(killed(&a), s.pids(1));
    assert!(logged(&a, "second stop signal"));
    // A third one has nothing left to do.
    let a = s.step(Event::StopRequested {
        by: StopBy::Signal(Signal::SIGTERM),
    });
    assert!(killed(&a).is_empty());
}

#[test]
fn stop_cancels_pending_crash_restarts() {
    let mut s = Sim::running(params(2));
    s.exit(s.pid(1, 0), FAIL);
    s.step(Event::StopRequested { by: StopBy::Control });
    assert!(s.g.slots().iter().all(|sl| sl.restart_at.is_none()));
    s.advance(BACKOFF_MAX);
    let a = s.step(Event::Tick);
    assert!(spawns(&a).is_empty());
    // A worker that exits on its own while stopping is not restarted either.
    let a = s.exit(s.pid(1, 1), FAIL);
    assert!(spawns(&a).is_empty());
    assert_eq!(exit_code(&a), Some(0));
}

// ---- odds and ends -------------------------------------------------------------------------

#[test]
fn events_for_unknown_pids_change_nothing() {
    let mut s = Sim::running(params(1));
    let stranger = Pid::from_raw(4242);
    assert!(s.step(Event::WorkerReady { pid: stranger }).is_empty());
    let a = s.exit(stranger, FAIL);
    assert!(logged(&a, "reaped orphan"));
    assert_eq!(a.len(), 1);
    assert_eq!(s.g.phase(), Phase::Running);
}

#[test]
fn upgrade_is_refused_while_starting_reloading_or_stopping() {
    let mut s = Sim::new(params(1));
    s.step(Event::Start);
    assert_eq!(s.g.upgrade_refusal(), Some("the first generation is still starting"));
    s.ready_all(1);
    assert_eq!(s.g.upgrade_refusal(), None);
    s.reload(None);
    assert_eq!(s.g.upgrade_refusal(), Some("a reload is under way"));
    s.ready_all(2);
    assert_eq!(s.g.upgrade_refusal(), None);
    s.step(Event::StopRequested { by: StopBy::Control });
    assert_eq!(s.g.upgrade_refusal(), Some("the master is stopping"));
}

#[test]
fn resumed_machine_runs_the_handed_over_generation() {
    let now = Instant::now();
    let worker = Worker {
        pid: Pid::from_raw(7),
        generation: 4,
        slot: 0,
        state: State::Ready,
        started: now,
        stop_signal: Signal::SIGTERM,
        stop_timeout: 5 * SEC,
        start_timeout: 10 * SEC,
        tail: Default::default(),
        watchdog_at: None,
        recycle_at: None,
    };
    let mut g = Generations::resume(
        Resumed {
            generation: 4,
            next_generation: 6,
            attempt: 3,
            params: params(1),
            slots: vec![Slot {
                ready_once: true,
                ..Slot::default()
            }],
            workers: vec![worker],
            watch: None,
            unstable: None,
        },
        "/etc/zdd.toml",
    );
    assert_eq!(g.phase(), Phase::Running);
    let a = g.handle(
        now,
        Event::ReloadRequested {
            from: None,
            if_generation: Some(4),
        },
    );
    assert!(a.contains(&Action::PrepareReload {
        attempt: 4,
        generation: 6
    }));
    let a = g.handle(now, Event::StopRequested { by: StopBy::Control });
    assert!(!a.iter().any(|a| matches!(a, Action::StartFailed { .. })));
}

#[test]
fn a_start_that_succeeds_with_no_worker_left_stops_under_restart_never() {
    // READY=1 and the exit arrive in the same turn of the loop: the worker counts as ready
    // once (the start succeeds), but nothing is left to serve and nothing will restart.
    for (restart, status, stops) in [
        (Restart::Never, OK, true),
        (Restart::OnFailure, OK, true),
        (Restart::OnFailure, FAIL, false),
        (Restart::Always, OK, false),
    ] {
        let mut s = Sim::new(with_restart(1, restart));
        s.step(Event::Start);
        let w = s.pid(1, 0);
        let a = s.turn(vec![
            Event::WorkerReady { pid: w },
            Event::WorkerExited { pid: w, status },
        ]);
        assert!(
            a.contains(&Action::StartSucceeded {
                generation: 1,
                workers: 1
            }),
            "{restart:?} {status:?}: {a:?}"
        );
        assert_eq!(
            logged(&a, "no workers left and none to restart: stopping"),
            stops,
            "{restart:?} {status:?}: {a:?}"
        );
        assert_eq!(s.g.phase() == Phase::Stopping, stops, "{restart:?} {status:?}");
    }
}

#[test]
fn the_exit_code_says_why_the_master_stopped_not_an_earlier_exit() {
    // Under restart = never, a worker that failed while another kept serving does not make a
    // later stop by the operator exit non-zero; stopping because nothing is left does.
    let mut s = Sim::running(with_restart(2, Restart::Never));
    let pids = s.pids(1);
    s.exit(pids[0], FAIL);
    assert_eq!(s.g.phase(), Phase::Running);
    s.step(Event::StopRequested { by: StopBy::Control });
    let a = s.exit(pids[1], ExitStatus::Code(0));
    assert_eq!(exit_code(&a), Some(0), "{a:?}");

    let mut s = Sim::running(with_restart(2, Restart::Never));
    let pids = s.pids(1);
    s.exit(pids[0], OK);
    let a = s.exit(pids[1], FAIL);
    assert!(logged(&a, "no workers left and none to restart: stopping"));
    assert_eq!(exit_code(&a), Some(1), "the last worker failed: {a:?}");
}

// A crash restart that falls due in the same turn as another decision (a commit, a failed
// start, a failed reload): the restart is spawned after the decision, so the decision sees
// the slot as restarting and the restart sees what was decided.

#[test]
fn a_restart_due_in_the_commit_turn_leaves_no_old_worker_behind() {
    let mut s = Sim::running(params(2));
    let old0 = s.pid(1, 0);
    s.exit(old0, FAIL); // restart in 100 ms
    s.reload(None);
    let (a, b) = (s.pid(2, 0), s.pid(2, 1));
    s.advance(Duration::from_millis(150));
    let acts = s.turn(vec![Event::WorkerReady { pid: a }, Event::WorkerReady { pid: b }]);
    assert_eq!(s.g.generation(), 2);
    assert!(spawns(&acts).is_empty(), "{:?}", spawns(&acts));
    let stale: Vec<_> =
        s.g.workers()
            .iter()
            .filter(|w| w.generation == 1 && matches!(w.state, State::Starting { .. } | State::Ready))
            .collect();
    assert!(stale.is_empty(), "an old-generation worker left serving: {stale:?}");
}

#[test]
fn a_restart_due_in_the_turn_a_start_fails_is_not_spawned() {
    for count in [2, 3] {
        let mut s = Sim::new(params(count));
        s.step(Event::Start);
        let pids: Vec<Pid> = (0..count).map(|i| s.pid(1, i)).collect();
        for &p in &pids[..count - 1] {
            s.step(Event::WorkerReady { pid: p });
        }
        s.exit(pids[0], FAIL); // ready once, restart in 100 ms
        s.advance(Duration::from_millis(150));
        // The last slot dies before it was ever ready: the start fails in this turn.
        let acts = s.turn(vec![Event::WorkerExited {
            pid: pids[count - 1],
            status: FAIL,
        }]);
        assert_eq!(s.g.phase(), Phase::Stopping);
        assert!(spawns(&acts).is_empty(), "count {count}: {:?}", spawns(&acts));
        assert!(
            s.g.workers()
                .iter()
                .all(|w| !matches!(w.state, State::Starting { .. } | State::Ready)),
            "count {count}: a worker not asked to stop while stopping"
        );
        if exit_code(&acts).is_some() {
            assert_eq!(s.g.alive(), 0, "count {count}: Exit with a live worker");
        }
        // The rest obey; the stop ends (at once if nothing was left).
        let code = exit_code(&acts).or_else(|| exit_code(&reap_all(&mut s)));
        assert_eq!(code, Some(1), "count {count}");
    }
}

#[test]
fn a_reload_failing_in_the_turn_a_restart_is_due_keeps_the_master() {
    let mut s = Sim::running(with_restart(1, Restart::OnFailure));
    let a = s.pid(1, 0);
    s.exit(a, FAIL); // restart in 100 ms
    s.reload(None);
    let n = s.pid(2, 0);
    s.advance(Duration::from_millis(150));
    let acts = s.turn(vec![Event::WorkerExited { pid: n, status: FAIL }]);
    assert!(!logged(&acts, "no workers left"), "{acts:?}");
    assert_ne!(s.g.phase(), Phase::Stopping);
    assert_eq!(spawns(&acts), vec![(1, 0)], "the slot restarts");
}

#[test]
fn a_worker_spawned_after_its_generation_was_replaced_is_stopped_at_once() {
    // Defence in depth: whatever the order, a worker nobody wants any more is never left
    // unsupervised. A spawn is in flight when the master is told to stop.
    let mut s = Sim::new(params(1));
    let first = s.g.handle(s.now, Event::Start);
    assert_eq!(spawns(&first), vec![(1, 0)]);
    s.g.handle(s.now, Event::StopRequested { by: StopBy::Control });
    assert!(!s.g.finished(), "a spawn is still in flight");
    let a = s.g.handle(
        s.now,
        Event::WorkerSpawned {
            pid: Pid::from_raw(900),
            generation: 1,
            slot: 0,
        },
    );
    assert!(signalled(&a).contains(&Pid::from_raw(900)), "{a:?}");
}

// ---- probes ------------------------------------------------------------------------------

fn probes(a: &[Action]) -> Vec<Pid> {
    a.iter()
        .filter_map(|a| match a {
            &Action::Probe { pid } => Some(pid),
            _ => None,
        })
        .collect()
}

#[test]
fn a_probed_start_succeeds_only_once_the_probe_passes() {
    let mut s = Sim::new(probed(1));
    s.step(Event::Start);
    let pid = s.pid(1, 0);
    let a = s.step(Event::WorkerReady { pid });
    assert_eq!(probes(&a), vec![pid]);
    assert_eq!(s.state(pid).name(), "probing");
    assert_eq!(s.g.phase(), Phase::Starting);
    let a = s.step(Event::ProbePassed { pid });
    assert_eq!(s.g.phase(), Phase::Running);
    assert!(a.iter().any(|a| matches!(a, Action::StartSucceeded { .. })));
}

#[test]
fn a_failed_probe_fails_the_reload_with_its_reason_and_the_old_generation_serves_on() {
    let mut s = Sim::running(probed(2));
    let old = s.pids(1);
    s.next = Ok(probed(2));
    s.reload(Some(C1));
    let new = s.pids(2);
    assert_eq!(new.len(), 2);
    s.step(Event::WorkerReady { pid: new[0] });
    s.step(Event::ProbePassed { pid: new[0] });
    s.step(Event::WorkerReady { pid: new[1] });
    let a = s.step(Event::ProbeFailed {
        pid: new[1],
        reason: "probe GET /healthz on worker pid 2: status 500".into(),
    });
    let r = replies(&a);
    assert_eq!(r.len(), 1);
    assert!(!r[0].1);
    assert!(
        r[0].2
            .starts_with("reload failed: probe GET /healthz on worker pid 2: status 500; generation 1 keeps serving"),
        "{}",
        r[0].2
    );
    let mut k = signalled(&a);
    k.sort();
    assert_eq!(
        k, new,
        "the new workers are asked to stop; the old generation is never told to"
    );
    for pid in old {
        assert_eq!(s.state(pid), State::Ready);
    }
}

#[test]
fn a_probe_that_gives_no_verdict_is_cut_short_by_its_budget() {
    let mut s = Sim::running(probed(1));
    s.reload(Some(C1));
    let new = s.pid(2, 0);
    s.step(Event::WorkerReady { pid: new });
    s.advance(3 * SEC);
    let a = s.step(Event::Tick);
    assert_eq!(signalled(&a), vec![new]);
    let r = replies(&a);
    assert!(r[0].2.contains("its probe gave no verdict in time"), "{}", r[0].2);
}

#[test]
fn a_serving_worker_that_fails_its_periodic_probe_is_replaced() {
    let mut s = Sim::running(probed(2));
    let pid = s.pid(1, 1);
    let a = s.step(Event::ProbeFailed {
        pid,
        reason: "probe GET /healthz: no answer within 1s".into(),
    });
    assert_eq!(signalled(&a), vec![pid]);
    assert!(logged(&a, "worker failed its health probe; replacing it"));
    s.advance(SEC);
    let a = s.step(Event::Tick);
    assert_eq!(spawns(&a), vec![(1, 1)]);
    // A verdict about a worker that is stopping changes nothing.
    assert!(signalled(&s.step(Event::ProbeFailed {
        pid,
        reason: "x".into()
    }))
    .is_empty());
}

// ---- rolling reloads ---------------------------------------------------------------------

#[test]
fn a_rolling_reload_replaces_one_slot_at_a_time() {
    let mut s = Sim::running(params(3));
    let old: Vec<Pid> = (0..3).map(|i| s.pid(1, i)).collect();
    s.next = Ok(rolling(3, 1));
    let a = s.reload(Some(C1));
    assert_eq!(spawns(&a), vec![(2, 0)], "one new worker at a time");
    for (slot, &o) in old.iter().enumerate() {
        let new = s.pid(2, slot);
        let a = s.step(Event::WorkerReady { pid: new });
        assert_eq!(signalled(&a), vec![o], "slot {slot}'s old worker is stopped");
        if slot < 2 {
            assert_eq!(spawns(&a), vec![(2, slot + 1)]);
            assert!(progress(&a, C1).contains(&format!("slot {} of 3 replaced (slot {slot})", slot + 1)));
            assert_eq!(s.g.generation(), 1);
        } else {
            assert_eq!(s.g.generation(), 2);
            assert!(replies(&a)[0].1);
        }
        // Never fewer than 3 ready workers, never more than 4 alive and not stopping.
        let live =
            s.g.workers()
                .iter()
                .filter(|w| matches!(w.state, State::Ready | State::Starting { .. }))
                .count();
        assert!(live <= 4);
    }
}

#[test]
fn a_rolling_reload_with_surge_starts_that_many_at_once_and_may_change_the_count() {
    let mut s = Sim::running(params(3));
    s.next = Ok(rolling(4, 2));
    let a = s.reload(Some(C1));
    assert_eq!(spawns(&a), vec![(2, 0), (2, 1)]);
    let a = s.step(Event::WorkerReady { pid: s.pid(2, 1) });
    assert_eq!(signalled(&a), vec![s.pid(1, 1)]);
    assert_eq!(spawns(&a), vec![(2, 2)]);
    s.step(Event::WorkerReady { pid: s.pid(2, 0) });
    s.step(Event::WorkerReady { pid: s.pid(2, 2) });
    // Slot 3 has no old worker.
    let a = s.step(Event::WorkerReady { pid: s.pid(2, 3) });
    assert!(signalled(&a).is_empty());
    assert_eq!(s.g.generation(), 2);
}

#[test]
fn a_failed_rolling_reload_rolls_the_replaced_slots_back_before_its_verdict() {
    let mut s = Sim::running(params(4));
    s.next = Ok(rolling(4, 1));
    s.reload(Some(C1));
    let n0 = s.pid(2, 0);
    s.step(Event::WorkerReady { pid: n0 });
    let n1 = s.pid(2, 1);
    s.step(Event::WorkerReady { pid: n1 });
    // Slot 2's new worker fails: slots 0 and 1 were replaced.
    let n2 = s.pid(2, 2);
    let a = s.exit(n2, FAIL);
    assert!(replies(&a).is_empty(), "no verdict before the roll-back");
    assert_eq!(spawns(&a), vec![(1, 0)], "slot 0 goes back to generation 1 first");
    assert!(progress(&a, C1).iter().any(|m| m.contains("rolling back 2 slots")));
    let b0 = s.pid(1, 0);
    let a = s.step(Event::WorkerReady { pid: b0 });
    assert_eq!(
        signalled(&a),
        vec![n0],
        "the new worker of slot 0 is stopped once the old one serves"
    );
    assert_eq!(spawns(&a), vec![(1, 1)]);
    let b1 = s.pid(1, 1);
    let a = s.step(Event::WorkerReady { pid: b1 });
    assert_eq!(signalled(&a), vec![n1]);
    let r = replies(&a);
    assert_eq!(r.len(), 1);
    assert!(
        r[0].2
            .starts_with("reload failed: rolled back after slot 2 of 4: worker pid"),
        "{}",
        r[0].2
    );
    assert!(r[0].2.ends_with("generation 1 keeps serving"), "{}", r[0].2);
    assert!(a.contains(&Action::DiscardReload {
        generation: 2,
        failed: true
    }));
    assert_eq!(s.g.generation(), 1);
    assert!(s.g.reloading().is_none());
}

#[test]
fn a_rollback_worker_that_fails_leaves_the_new_one_serving_until_its_slot_restarts() {
    let mut s = Sim::running(params(2));
    s.next = Ok(rolling(2, 1));
    s.reload(Some(C1));
    let n0 = s.pid(2, 0);
    s.step(Event::WorkerReady { pid: n0 });
    s.exit(s.pid(2, 1), FAIL);
    let b0 = s.pid(1, 0);
    let a = s.exit(b0, FAIL);
    // The roll-back is over as far as it goes: the verdict, and slot 0 restarts with back-off.
    assert!(replies(&a)[0].2.contains("rolled back after slot 1 of 2"));
    assert_eq!(s.state(n0), State::Ready, "the new worker still serves slot 0");
    s.advance(SEC);
    let a = s.step(Event::Tick);
    assert_eq!(spawns(&a), vec![(1, 0)]);
    let a = s.step(Event::WorkerReady { pid: s.pid(1, 0) });
    assert_eq!(signalled(&a), vec![n0]);
}

#[test]
fn a_crash_restart_due_in_a_replaced_slot_is_not_spawned() {
    let mut s = Sim::running(params(2));
    let o0 = s.pid(1, 0);
    s.exit(o0, FAIL); // slot 0 restarts in 100 ms
    s.next = Ok(rolling(2, 1));
    s.reload(Some(C1));
    s.step(Event::WorkerReady { pid: s.pid(2, 0) });
    s.advance(SEC);
    let a = s.step(Event::Tick);
    assert!(spawns(&a).iter().all(|&(g, _)| g == 2), "{:?}", spawns(&a));
}

// ---- the watch after a cut-over ----------------------------------------------------------

#[test]
fn a_new_generation_that_dies_within_stable_after_is_reported_and_the_old_one_is_not_killed() {
    let p = Params {
        stable_after: 5 * SEC,
        ..params(1)
    };
    let mut s = Sim::running(p.clone());
    let old = s.pid(1, 0);
    s.next = Ok(p);
    s.reload(None);
    let new = s.pid(2, 0);
    s.step(Event::WorkerReady { pid: new });
    assert!(matches!(s.state(old), State::Stopping { .. }));
    s.advance(SEC);
    let a = s.exit(new, FAIL);
    assert!(logged(&a, "generation 2 stopped serving within 5s of its cut-over"));
    assert!(logged(&a, "generation 1 is kept draining until one serves"));
    assert!(s.g.unstable().is_some());
    // Past the old worker's stop timeout: not killed while no new worker serves.
    s.advance(10 * SEC);
    let a = s.step(Event::Tick);
    assert!(killed(&a).is_empty());
    assert!(matches!(s.state(old), State::Stopping { .. }));
    // The restarted worker serves: the kill that was due goes out.
    let restarted = s.pid(2, 0);
    assert_ne!(restarted, new);
    let a = s.step(Event::WorkerReady { pid: restarted });
    assert_eq!(killed(&a), vec![old]);
}

#[test]
fn a_death_after_stable_after_is_an_ordinary_crash() {
    let p = Params {
        stable_after: 5 * SEC,
        ..params(1)
    };
    let mut s = Sim::running(p.clone());
    s.next = Ok(p);
    s.reload(None);
    let new = s.pid(2, 0);
    s.step(Event::WorkerReady { pid: new });
    s.advance(6 * SEC);
    let a = s.exit(new, FAIL);
    assert!(!logged(&a, "stopped serving"));
    assert!(s.g.unstable().is_none());
}

#[test]
fn a_rolled_back_slot_the_serving_generation_never_had_is_stopped_not_given_back() {
    // Generation 1 has 2 slots, generation 2 has 4: slot 2 has no generation 1 worker to give
    // back. Rolling back must not start one there, nor leave generation 2's worker serving.
    let mut s = Sim::running(params(2));
    s.next = Ok(rolling(4, 1));
    s.reload(Some(C1));
    for slot in 0..3 {
        s.step(Event::WorkerReady { pid: s.pid(2, slot) });
    }
    let n2 = s.pid(2, 2);
    let a = s.exit(s.pid(2, 3), FAIL);
    assert_eq!(spawns(&a), vec![(1, 0)]);
    assert!(signalled(&a).contains(&n2), "slot 2's new worker is stopped: {a:?}");
    s.step(Event::WorkerReady { pid: s.pid(1, 0) });
    let a = s.step(Event::WorkerReady { pid: s.pid(1, 1) });
    assert!(
        spawns(&a).is_empty(),
        "no generation 1 worker for slot 2: {:?}",
        spawns(&a)
    );
    assert!(
        replies(&a)[0].2.contains("rolled back after slot 3 of 4"),
        "{}",
        replies(&a)[0].2
    );
    let live: Vec<(u64, usize)> =
        s.g.workers()
            .iter()
            .filter(|w| w.state == State::Ready)
            .map(|w| (w.generation, w.slot))
            .collect();
    assert_eq!(live, vec![(1, 0), (1, 1)]);
}

#[test]
fn a_worker_handed_over_while_probing_is_probed_again_by_the_new_image() {
    // The old image's probe died with the exec: without a new one the worker would sit in
    // Probing until its budget ran out and be killed as "no verdict in time".
    let now = Instant::now();
    let probing = Pid::from_raw(500);
    let ready = Pid::from_raw(501);
    let worker = |pid, slot, state| Worker {
        pid,
        generation: 1,
        slot,
        state,
        started: now,
        stop_signal: Signal::SIGTERM,
        stop_timeout: 5 * SEC,
        start_timeout: 10 * SEC,
        tail: Default::default(),
        watchdog_at: None,
        recycle_at: None,
    };
    let mut g = Generations::resume(
        Resumed {
            generation: 1,
            next_generation: 2,
            attempt: 0,
            params: probed(2),
            slots: vec![Slot::default(); 2],
            workers: vec![
                worker(
                    probing,
                    0,
                    State::Probing {
                        deadline: now + 2 * SEC,
                    },
                ),
                worker(ready, 1, State::Ready),
            ],
            watch: None,
            unstable: None,
        },
        "/etc/zdd.toml",
    );
    let a = g.handle(now, Event::Tick);
    assert_eq!(probes(&a), vec![probing]);
    let a = g.handle(now, Event::ProbePassed { pid: probing });
    assert!(killed(&a).is_empty());
    assert_eq!(g.worker(probing).map(|w| w.state), Some(State::Ready));
}

/// What the exec side of an upgrade hands over of the machine, resumed by a new image.
fn upgraded(s: &mut Sim) {
    let g = &s.g;
    let resumed = Resumed {
        generation: g.generation(),
        next_generation: g.next_generation(),
        attempt: g.attempt(),
        params: g.params.clone(),
        slots: g.slots().to_vec(),
        workers: g.workers().to_vec(),
        watch: g.watch(),
        unstable: g.unstable().map(String::from),
    };
    s.g = Generations::resume(resumed, "/etc/zdd.toml");
}

#[test]
fn the_watch_after_a_cut_over_survives_an_upgrade() {
    let p = Params {
        stable_after: 5 * SEC,
        ..params(1)
    };
    // Upgraded during the watch: a death after the upgrade is still within stable_after.
    let mut s = Sim::running(p.clone());
    let old = s.pid(1, 0);
    s.next = Ok(p.clone());
    s.reload(None);
    s.step(Event::WorkerReady { pid: s.pid(2, 0) });
    upgraded(&mut s);
    s.advance(SEC);
    let a = s.exit(s.pid(2, 0), FAIL);
    assert!(logged(&a, "generation 2 stopped serving within 5s of its cut-over"));
    s.advance(10 * SEC);
    assert!(killed(&s.step(Event::Tick)).is_empty());
    assert!(matches!(s.state(old), State::Stopping { .. }));

    // Upgraded while unstable: the old generation's kill stays held.
    let mut s = Sim::running(p.clone());
    let old = s.pid(1, 0);
    s.next = Ok(p);
    s.reload(None);
    s.step(Event::WorkerReady { pid: s.pid(2, 0) });
    s.advance(SEC);
    s.exit(s.pid(2, 0), FAIL);
    upgraded(&mut s);
    assert!(s.g.unstable().is_some());
    s.advance(10 * SEC);
    assert!(killed(&s.step(Event::Tick)).is_empty());
    assert!(matches!(s.state(old), State::Stopping { .. }));
    let a = s.step(Event::WorkerReady { pid: s.pid(2, 0) });
    assert_eq!(killed(&a), vec![old]);
}

#[test]
fn a_rolling_reload_that_failed_replaces_no_more_slots_in_the_same_turn() {
    // One poll brings slot 1's new worker exiting and slot 0's saying READY=1: the reload has
    // failed, so slot 0's old worker keeps serving (no stop, then a roll-back worker for it).
    let mut s = Sim::running(params(2));
    let old = s.pids(1);
    s.next = Ok(rolling(2, 2));
    s.reload(Some(C1));
    let (n0, n1) = (s.pid(2, 0), s.pid(2, 1));
    let a = s.turn(vec![
        Event::WorkerExited { pid: n1, status: FAIL },
        Event::WorkerReady { pid: n0 },
    ]);
    assert_eq!(signalled(&a), vec![n0], "only the new worker is asked to stop");
    assert!(spawns(&a).is_empty(), "{:?}", spawns(&a));
    let r = replies(&a);
    assert!(r[0].2.starts_with("reload failed: worker pid"), "{}", r[0].2);
    for pid in old {
        assert_eq!(s.state(pid), State::Ready);
    }
}

#[test]
fn a_new_generation_that_fails_its_probes_within_stable_after_keeps_the_old_one_draining() {
    let p = Params {
        stable_after: 5 * SEC,
        ..probed(1)
    };
    let mut s = Sim::running(p.clone());
    let old = s.pid(1, 0);
    s.next = Ok(p);
    s.reload(None);
    s.ready_all(2);
    let new = s.pid(2, 0);
    assert_eq!(s.g.generation(), 2);
    let a = s.step(Event::ProbeFailed {
        pid: new,
        reason: "probe GET /healthz: no answer".into(),
    });
    assert!(logged(&a, "generation 2 stopped serving within 5s of its cut-over"));
    s.advance(10 * SEC);
    let a = s.step(Event::Tick);
    assert!(
        !killed(&a).contains(&old),
        "the old worker was killed while no new one serves"
    );
}

// ---- watchdog and recycling --------------------------------------------------------------

#[test]
fn a_ready_worker_silent_past_its_watchdog_is_replaced_and_pings_keep_it() {
    let p = Params {
        watchdog: Some(2 * SEC),
        ..params(2)
    };
    let mut s = Sim::running(p);
    let (a, b) = (s.pid(1, 0), s.pid(1, 1));
    s.advance(SEC);
    s.step(Event::Watchdog { pid: a, trigger: false });
    s.advance(SEC);
    // b said nothing for 2 s: replaced; a pinged 1 s ago: kept.
    let acts = s.step(Event::Tick);
    assert_eq!(signalled(&acts), vec![b]);
    assert!(logged(&acts, "watchdog expired (no WATCHDOG=1 for 2s); replacing it"));
    assert_eq!(s.state(a), State::Ready);
    s.step(Event::Watchdog { pid: a, trigger: false });
    s.advance(SEC);
    let acts = s.step(Event::Tick);
    assert!(spawns(&acts).contains(&(1, 1)), "its slot restarts");
    assert_eq!(s.state(a), State::Ready);
    assert_eq!(
        s.g.slots()[1].last_exit.as_deref(),
        Some(&*format!("worker pid {b}: watchdog expired (no WATCHDOG=1 for 2s)"))
    );
    // WATCHDOG=trigger: at once.
    let acts = s.step(Event::Watchdog { pid: a, trigger: true });
    assert_eq!(signalled(&acts), vec![a]);
}

#[test]
fn a_new_worker_silent_before_the_commit_fails_its_reload() {
    let p = Params {
        watchdog: Some(2 * SEC),
        ..params(2)
    };
    let mut s = Sim::running(p.clone());
    s.next = Ok(p);
    s.reload(Some(C1));
    let n0 = s.pid(2, 0);
    s.step(Event::WorkerReady { pid: n0 });
    // Keep the old ones alive.
    s.advance(2 * SEC);
    for pid in s.pids(1) {
        s.g.handle(s.now, Event::Watchdog { pid, trigger: false });
    }
    let acts = s.step(Event::Tick);
    let r = replies(&acts);
    assert!(r[0].2.contains("watchdog expired"), "{r:?}");
    assert_eq!(s.g.generation(), 1);
}

#[test]
fn max_lifetime_recycles_one_slot_at_a_time_new_before_old() {
    let p = Params {
        max_lifetime: Some(60 * SEC),
        ..params(2)
    };
    let mut s = Sim::running(p);
    let (a, b) = (s.pid(1, 0), s.pid(1, 1));
    s.advance(61 * SEC);
    let acts = s.step(Event::Tick);
    assert_eq!(spawns(&acts), vec![(1, 0)], "one slot at a time");
    assert!(
        signalled(&acts).is_empty(),
        "the old worker serves until the new one is ready"
    );
    let n = s.pid(1, 0);
    let acts = s.step(Event::WorkerReady { pid: n });
    assert_eq!(signalled(&acts), vec![a]);
    assert!(logged(&acts, "worker recycled: max_lifetime 1m reached"));
    // Then slot 1.
    assert_eq!(spawns(&acts), vec![(1, 1)]);
    let acts = s.step(Event::WorkerReady { pid: s.pid(1, 1) });
    assert_eq!(signalled(&acts), vec![b]);
    // The old ones exit as asked: no restart.
    let acts = s.exit(a, CLEAN);
    assert!(spawns(&acts).is_empty());
}

#[test]
fn a_recycle_whose_new_worker_fails_leaves_the_old_one_serving_and_retries_later() {
    let p = Params {
        max_lifetime: Some(60 * SEC),
        ..params(1)
    };
    let mut s = Sim::running(p);
    let a = s.pid(1, 0);
    s.advance(61 * SEC);
    s.step(Event::Tick);
    let n = s.pid(1, 0);
    let acts = s.exit(n, FAIL);
    assert!(logged(&acts, "recycling failed"));
    assert!(
        spawns(&acts).is_empty(),
        "no crash restart: the old worker still serves"
    );
    assert_eq!(s.state(a), State::Ready);
    s.advance(30 * SEC);
    assert!(spawns(&s.step(Event::Tick)).is_empty());
    s.advance(31 * SEC);
    assert_eq!(spawns(&s.step(Event::Tick)), vec![(1, 0)]);
}

#[test]
fn the_old_worker_dying_during_its_recycle_leaves_the_slot_to_the_new_one() {
    let p = Params {
        max_lifetime: Some(60 * SEC),
        ..params(1)
    };
    let mut s = Sim::running(p);
    let a = s.pid(1, 0);
    s.advance(61 * SEC);
    s.step(Event::Tick);
    let acts = s.exit(a, FAIL);
    assert!(spawns(&acts).is_empty());
    s.advance(SEC);
    assert!(spawns(&s.step(Event::Tick)).is_empty(), "no second worker for the slot");
    let n = s.pid(1, 0);
    assert_ne!(n, a);
    let acts = s.step(Event::WorkerReady { pid: n });
    assert!(signalled(&acts).is_empty());
}

#[test]
fn max_rss_recycles_but_a_limit_below_a_fresh_worker_backs_off() {
    let p = Params {
        max_rss: Some(100 << 20),
        ..params(1)
    };
    let mut s = Sim::running(p);
    let a = s.pid(1, 0);
    // Over the limit seconds after it started: the limit is below what the app needs.
    s.advance(5 * SEC);
    let acts = s.step(Event::WorkerRss {
        pid: a,
        bytes: 200 << 20,
    });
    assert!(spawns(&acts).is_empty());
    assert!(logged(&acts, "max_rss 100.0MiB is below what this app needs"));
    s.advance(30 * SEC);
    assert!(
        spawns(&s.step(Event::WorkerRss {
            pid: a,
            bytes: 200 << 20
        }))
        .is_empty(),
        "held back"
    );
    // Past the hold and the fresh period: recycled.
    s.advance(60 * SEC);
    let acts = s.step(Event::WorkerRss {
        pid: a,
        bytes: 200 << 20,
    });
    assert_eq!(spawns(&acts), vec![(1, 0)]);
    let acts = s.step(Event::WorkerReady { pid: s.pid(1, 0) });
    assert_eq!(signalled(&acts), vec![a]);
    assert!(logged(&acts, "worker recycled: rss 200.0MiB over max_rss 100.0MiB"));
}

#[test]
fn recycle_jitter_spreads_lifetimes_and_stays_within_it() {
    let p = Params {
        max_lifetime: Some(60 * SEC),
        recycle_jitter: 30 * SEC,
        ..params(8)
    };
    let s = Sim::running(p);
    let at: std::collections::BTreeSet<Instant> = s.g.workers().iter().filter_map(|w| w.recycle_at).collect();
    assert!(at.len() > 1, "copies started together do not recycle together");
    for w in s.g.workers() {
        let t = w.recycle_at.unwrap();
        assert!(t >= w.started + 60 * SEC && t <= w.started + 90 * SEC);
    }
}
#[path = "hooks_tests.rs"]
mod hooks;
#[path = "stats_tests.rs"]
mod stats;
