//! The machine's counters ([`Stats`]): each decision counted once, where it is taken.

use super::*;

fn stats(s: &Sim) -> Stats {
    s.g.stats().clone()
}

#[test]
fn a_start_counts_its_spawns_and_nothing_else() {
    let s = Sim::running(params(3));
    let st = stats(&s);
    assert_eq!(st.worker_starts, 3);
    assert_eq!(st.reloads, Reloads::default());
    assert_eq!(st.exits, Exits::default());
    assert_eq!(st.serving_for(s.now), Some(Duration::ZERO));
}

#[test]
fn reload_outcomes_and_their_durations() {
    let mut s = Sim::running(params(1));
    // ok: 250 ms from the request to the last new worker ready; the old one stopped.
    let old = s.pid(1, 0);
    s.reload(Some(C1));
    s.advance(Duration::from_millis(250));
    s.ready_all(2);
    s.exit(old, OK);
    // failed: a new worker exits during start-up, 2 s in.
    s.reload(Some(C2));
    s.advance(2 * SEC);
    let new = s.pid(3, 0);
    s.exit(new, FAIL);
    // failed before anything started: the config is invalid.
    s.next = Err("reload failed: invalid config; nothing changed: x".into());
    s.reload(None);
    // refused: not the serving generation.
    s.step(Event::ReloadRequested {
        from: Some(C3),
        if_generation: Some(7),
    });
    let st = stats(&s);
    assert_eq!(
        st.reloads,
        Reloads {
            ok: 1,
            failed: 2,
            refused: 1,
            cancelled: 0
        }
    );
    assert_eq!((st.reload_seconds_ok.count, st.reload_seconds_ok.sum_us), (1, 250_000));
    assert_eq!(
        (st.reload_seconds_failed.count, st.reload_seconds_failed.sum_us),
        (2, 2_000_000)
    );
    // 250 ms is in the 250 ms bucket (index 7), 2 s in the 2.5 s one (index 10), 0 in the first.
    assert_eq!(RELOAD_BUCKETS_US[7], 250_000);
    assert_eq!(st.reload_seconds_ok.buckets[7], 1);
    assert_eq!(
        (
            st.reload_seconds_failed.buckets[0],
            st.reload_seconds_failed.buckets[10]
        ),
        (1, 1)
    );
    assert_eq!(st.exits.stopped, 1, "the old generation's worker, asked to stop");
    assert_eq!(st.exits.crashed, 1, "the new worker that exited during start-up");
    assert_eq!(st.worker_starts, 3);
    // The serving generation's age counts from its commit.
    s.advance(SEC);
    assert_eq!(s.g.stats().serving_for(s.now), Some(SEC + 2 * SEC));
}

#[test]
fn a_stop_during_a_reload_cancels_it() {
    let mut s = Sim::running(params(1));
    s.reload(Some(C1));
    s.step(Event::StopRequested { by: StopBy::Control });
    s.step(Event::ReloadRequested {
        from: None,
        if_generation: None,
    });
    let st = stats(&s);
    assert_eq!((st.reloads.cancelled, st.reloads.refused, st.reloads.ok), (1, 1, 0));
}

#[test]
fn exits_by_reason_and_restarts() {
    let mut s = Sim::running(params(2));
    // crashed, then restarted after its back-off.
    let a = s.pid(1, 0);
    s.exit(a, FAIL);
    s.advance(BACKOFF_MIN);
    s.step(Event::Tick);
    assert_eq!(stats(&s).restarts, 1);
    // start timeout: the restarted worker never says it is ready, is killed, then reaped.
    let b = s.pid(1, 0);
    s.advance(10 * SEC);
    s.step(Event::Tick);
    assert_eq!(s.state(b), State::Killed);
    s.exit(b, ExitStatus::Signal(9));
    // stopped: a worker of a failed reload's generation (asked to stop, not killed).
    s.advance(BACKOFF_MIN * 2);
    s.step(Event::Tick);
    s.ready_all(1);
    s.reload(None);
    let n0 = s.pid(2, 0);
    let n1 = s.pid(2, 1);
    s.exit(n0, FAIL);
    s.exit(n1, ExitStatus::Signal(15));
    let st = stats(&s);
    assert_eq!(
        st.exits,
        Exits {
            stopped: 1,
            killed: 0,
            crashed: 2,
            start_timeout: 1,
            probe_failed: 0,
            watchdog: 0,
            recycled: 0,
        }
    );
    assert_eq!(st.restarts, 2);
    assert_eq!(st.worker_starts, 2 + 2 + 2);
}

#[test]
fn probe_failures_and_spawn_failures() {
    let mut s = Sim::running(probed(1));
    // A serving worker that misses its interval probes is replaced: asked to stop, then reaped.
    let a = s.pid(1, 0);
    s.step(Event::ProbeFailed {
        pid: a,
        reason: "probe: status 500".into(),
    });
    s.exit(a, OK);
    // A reload's new worker whose cut-over probe fails is killed, then reaped.
    s.reload(None);
    let n = s.pid(2, 0);
    s.step(Event::WorkerReady { pid: n });
    s.step(Event::ProbeFailed {
        pid: n,
        reason: "probe: status 500".into(),
    });
    s.exit(n, ExitStatus::Signal(9));
    // A spawn that fails.
    s.fail_spawn.push((3, 0));
    s.reload(None);
    let st = stats(&s);
    assert_eq!((st.exits.probe_failed, st.exits.stopped, st.exits.killed), (2, 0, 0));
    assert_eq!(st.spawn_failures, 1);
    assert_eq!(st.reloads.failed, 2);
}

#[test]
fn counters_cross_an_upgrade_as_json() {
    let mut s = Sim::running(params(1));
    s.reload(None);
    s.ready_all(2);
    let text = serde_json::to_string(s.g.stats()).unwrap();
    let back: Stats = serde_json::from_str(&text).unwrap();
    let back = back.resumed(s.now, Some(5 * SEC));
    assert_eq!(back.reloads.ok, 1);
    assert_eq!(back.reload_seconds_ok, s.g.stats().reload_seconds_ok);
    assert_eq!(back.serving_for(s.now), Some(5 * SEC));
    // A state from before the counters existed, or with fewer of them, reads as zeros.
    let old: Stats = serde_json::from_str(r#"{"reloads":{"ok":4}}"#).unwrap();
    assert_eq!((old.reloads.ok, old.reloads.failed, old.worker_starts), (4, 0, 0));
}
