//! Unit tests of the reload hooks in the machine (`[hooks]`), with the fake loop of tests.rs.

use super::*;

fn with_hooks(count: usize, before: bool, after: bool) -> Params {
    Params {
        before_reload: before.then_some(30 * SEC),
        after_reload: after,
        ..params(count)
    }
}

fn hook_runs(a: &[Action]) -> Vec<(Hook, u64)> {
    a.iter()
        .filter_map(|a| match a {
            &Action::RunHook { which, generation } => Some((which, generation)),
            _ => None,
        })
        .collect()
}

fn hook_kills(a: &[Action]) -> Vec<(Hook, u64)> {
    a.iter()
        .filter_map(|a| match a {
            &Action::KillHook { which, generation } => Some((which, generation)),
            _ => None,
        })
        .collect()
}

fn done(which: Hook, generation: u64, result: HookResult) -> Event {
    Event::HookDone {
        which,
        generation,
        result,
    }
}

fn failed(reason: &str, tail: &[&str]) -> HookResult {
    HookResult::Failed {
        reason: reason.into(),
        tail: tail.iter().map(|l| l.to_string()).collect(),
    }
}

/// A Sim serving generation 1 (2 workers) whose next reload has a before_reload hook.
fn before_reload_pending() -> Sim {
    let mut s = Sim::running(params(2));
    s.next = Ok(with_hooks(2, true, false));
    s
}

#[test]
fn the_first_start_runs_no_hook() {
    let mut s = Sim::new(with_hooks(1, true, true));
    let mut a = s.step(Event::Start);
    a.extend(s.ready_all(1));
    assert_eq!(s.g.phase(), Phase::Running);
    assert_eq!(hook_runs(&a), vec![]);
}

#[test]
fn before_reload_runs_after_the_config_is_prepared_and_before_any_new_worker() {
    let mut s = before_reload_pending();
    let a = s.reload(Some(C1));
    let prepare = a.iter().position(|a| matches!(a, Action::PrepareReload { .. }));
    let run = a.iter().position(|a| matches!(a, Action::RunHook { .. }));
    assert!(prepare.unwrap() < run.unwrap(), "{a:?}");
    assert_eq!(hook_runs(&a), vec![(Hook::BeforeReload, 2)]);
    assert_eq!(spawns(&a), vec![]);
    assert!(a.contains(&Action::TellSystemd(Systemd::ExtendTimeout(35 * SEC))));
    assert_eq!(
        progress(&a, C1),
        vec![
            "reading /etc/zdd.toml".to_string(),
            "running the before_reload hook for generation 2".to_string()
        ]
    );
    // While it runs: the reload is under way (an upgrade is refused), nothing is spawned or
    // committed, however long the loop turns, and no generation number is used up yet.
    assert_eq!(s.g.reloading(), Some(2));
    assert_eq!(s.g.upgrade_refusal(), Some("a reload is under way"));
    s.advance(60 * SEC);
    assert_eq!(spawns(&s.step(Event::Tick)), vec![]);
    assert_eq!(s.g.next_generation(), 2);
    // It passed: the new generation starts, and commits as usual.
    let a = s.step(done(Hook::BeforeReload, 2, HookResult::Passed));
    assert!(logged(&a, "before_reload hook passed"));
    assert_eq!(spawns(&a), vec![(2, 0), (2, 1)]);
    assert_eq!(progress(&a, C1), vec!["starting generation 2 (2 workers)".to_string()]);
    assert_eq!(s.g.next_generation(), 3);
    let a = s.ready_all(2);
    assert_eq!(
        replies(&a),
        vec![(
            C1,
            true,
            "reloaded: generation 2 serving (2 workers); generation 1 signalled to stop".into()
        )]
    );
}

#[test]
fn a_failing_before_reload_hook_fails_the_reload_with_nothing_started() {
    let mut s = before_reload_pending();
    let old = s.pids(1);
    s.reload(Some(C1));
    let reason = r#"before_reload hook ["bin/check-app"] exited with status 2"#;
    let a = s.step(done(
        Hook::BeforeReload,
        2,
        failed(reason, &["checking app", "error: bad setting"]),
    ));
    assert_eq!(spawns(&a), vec![]);
    assert_eq!(killed(&a), vec![]);
    assert_eq!(signalled(&a), vec![]);
    assert!(a.contains(&Action::DiscardReload {
        generation: 2,
        failed: true
    }));
    assert_eq!(
        replies(&a),
        vec![(
            C1,
            false,
            format!("reload failed: {reason}; generation 1 keeps serving")
        )]
    );
    assert_eq!(
        reply_data(&a, C1)["tail"],
        json!(["checking app", "error: bad setting"])
    );
    assert!(logged(&a, &format!("reload failed: {reason}")));
    assert!(logged(&a, "  | error: bad setting"));
    assert!(a.contains(&Action::TellSystemd(Systemd::Ready {
        status: format!("reload failed: {reason}; generation 1 keeps serving")
    })));
    // Nothing changed: the same workers serve, and the next reload builds generation 2 again.
    assert_eq!(s.g.reloading(), None);
    assert_eq!(s.g.generation(), 1);
    assert_eq!(s.pids(1), old);
    assert!(old.iter().all(|&p| s.state(p) == State::Ready));
    let a = s.reload(None);
    assert_eq!(hook_runs(&a), vec![(Hook::BeforeReload, 2)]);
}

#[test]
fn a_hook_that_could_not_be_started_or_timed_out_fails_the_same_way() {
    for reason in [
        r#"before_reload hook ["bin/check"] could not be started: exec bin/check: permission denied (EACCES)"#,
        r#"before_reload hook ["bin/check"] did not finish within 30s (killed)"#,
    ] {
        let mut s = before_reload_pending();
        s.hook = Some(failed(reason, &[]));
        let a = s.reload(Some(C1));
        assert_eq!(spawns(&a), vec![]);
        assert_eq!(
            replies(&a),
            vec![(
                C1,
                false,
                format!("reload failed: {reason}; generation 1 keeps serving")
            )]
        );
    }
}

#[test]
fn a_stop_while_before_reload_runs_kills_it_and_cancels_the_reload() {
    let mut s = before_reload_pending();
    s.reload(Some(C1));
    let a = s.step(Event::StopRequested { by: StopBy::Control });
    assert_eq!(hook_kills(&a), vec![(Hook::BeforeReload, 2)]);
    assert!(logged(&a, "before_reload hook killed: the master is stopping"));
    assert!(a.contains(&Action::DiscardReload {
        generation: 2,
        failed: false
    }));
    assert_eq!(
        replies(&a),
        vec![(C1, false, "reload cancelled: the master is stopping".into())]
    );
    // Its end, reaped later, starts nothing.
    let a = s.step(done(Hook::BeforeReload, 2, failed("killed by signal SIGKILL", &[])));
    assert_eq!(spawns(&a), vec![]);
    assert_eq!(replies(&a), vec![]);
    reap_all(&mut s);
    assert!(s.g.finished());
}

#[test]
fn a_reload_asked_for_while_before_reload_runs_follows_it() {
    let mut s = before_reload_pending();
    s.reload(Some(C1));
    let a = s.reload(Some(C2));
    assert_eq!(prepares(&a), 0);
    assert_eq!(
        progress(&a, C2),
        vec!["a reload is under way; this one will follow it".to_string()]
    );
    s.step(done(Hook::BeforeReload, 2, HookResult::Passed));
    let a = s.ready_all(2);
    assert_eq!(replies(&a)[0].0, C1);
    // The next one reads the config again and runs its own hook.
    assert_eq!(prepares(&a), 1);
    assert_eq!(hook_runs(&a), vec![(Hook::BeforeReload, 3)]);
}

#[test]
fn a_stale_hook_end_changes_nothing() {
    let mut s = before_reload_pending();
    s.reload(Some(C1));
    for ev in [
        done(Hook::BeforeReload, 7, HookResult::Passed),
        done(Hook::AfterReload, 2, failed("x", &[])),
    ] {
        let a = s.step(ev);
        assert_eq!(spawns(&a), vec![]);
        assert_eq!(replies(&a), vec![]);
    }
    assert_eq!(s.g.reloading(), Some(2));
}

#[test]
fn after_reload_runs_after_the_commit_and_the_verdict_does_not_wait_for_it() {
    let mut s = Sim::running(params(1));
    s.next = Ok(with_hooks(1, false, true));
    let old = s.pid(1, 0);
    let a = s.reload(Some(C1));
    assert_eq!(hook_runs(&a), vec![]);
    let a = s.ready_all(2);
    let commit = a.iter().position(|a| matches!(a, Action::CommitReload { .. }));
    let reply = a.iter().position(|a| matches!(a, Action::Reply { .. }));
    let run = a.iter().position(|a| matches!(a, Action::RunHook { .. }));
    assert!(
        commit.unwrap() < reply.unwrap() && reply.unwrap() < run.unwrap(),
        "{a:?}"
    );
    assert_eq!(hook_runs(&a), vec![(Hook::AfterReload, 2)]);
    assert!(replies(&a)[0].1);
    assert_eq!(signalled(&a), vec![old]);
    // While it runs, an upgrade is refused, and a reload waits for it.
    assert_eq!(s.g.upgrade_refusal(), Some("the after_reload hook is running"));
    let a = s.reload(Some(C2));
    assert_eq!(prepares(&a), 0);
    // It failed: logged with its last lines, nothing rolled back; the waiting reload starts.
    let reason = r#"after_reload hook ["bin/notify-deploy"] exited with status 1"#;
    let a = s.step(done(
        Hook::AfterReload,
        2,
        failed(reason, &["curl: (7) connection refused"]),
    ));
    assert!(logged(&a, &format!("after_reload hook failed: {reason}")));
    assert!(logged(&a, "  | curl: (7) connection refused"));
    assert_eq!(killed(&a), vec![]);
    assert_eq!(s.g.generation(), 2);
    assert_eq!(prepares(&a), 1);
    assert_eq!(s.g.upgrade_refusal(), Some("a reload is under way"));
}

#[test]
fn a_passing_after_reload_hook_is_logged_and_frees_upgrades() {
    let mut s = Sim::running(params(1));
    s.next = Ok(with_hooks(1, true, true));
    s.hook = Some(HookResult::Passed);
    let a = s.reload(Some(C1));
    assert!(logged(&a, "before_reload hook passed"));
    let a = s.ready_all(2);
    assert!(logged(&a, "after_reload hook passed"));
    assert_eq!(s.g.upgrade_refusal(), None);
}

#[test]
fn a_stop_while_after_reload_runs_kills_it() {
    let mut s = Sim::running(params(1));
    s.next = Ok(with_hooks(1, false, true));
    s.reload(None);
    s.ready_all(2);
    let a = s.step(Event::StopRequested { by: StopBy::Control });
    assert_eq!(hook_kills(&a), vec![(Hook::AfterReload, 2)]);
    assert!(logged(&a, "after_reload hook killed: the master is stopping"));
}
