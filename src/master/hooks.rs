//! The reload hooks' I/O (`[hooks]`); the machine decides when ([`Action::RunHook`]).
//!
//! Theory of operation. A hook is started like a worker (src/worker/spawn.rs with a
//! [`HookRun`]): the worker's user, group, env, cwd, rlimits and umask, its own process group,
//! stdin /dev/null, stdout and stderr pipes to the master; no listeners, no `NOTIFY_SOCKET`;
//! `ZDD_GENERATION` and `ZDD_HOOK` set. Nothing waits for it: its pipes are polled with the
//! rest (relayed to the log, tagged `hook`, and the last lines kept for the verdict), its
//! deadline (`[hooks] timeout`) is one of the loop's, and it is reaped by the loop's `reap`
//! like any child — whatever is left in its process group is killed then, while the zombie
//! still holds the group's id. At its deadline its process group gets SIGKILL and the reap that
//! follows reports the timeout. Its end goes to the machine as [`Event::HookDone`].

use super::*;
use crate::worker::spawn::HookRun;
use generations::{Hook, HookResult};

/// A hook's command is shown at most this long in messages.
const MAX_SHOWN: usize = 256;

/// A hook that is running.
pub(super) struct RunningHook {
    pub(super) which: Hook,
    pub(super) generation: u64,
    pub(super) pid: Pid,
    /// `before_reload hook ["bin/check", "--strict"]`, for messages.
    label: String,
    pipes: Vec<Pipe>,
    /// Its last lines, for the verdict.
    tail: VecDeque<String>,
    timeout: Duration,
    /// When it is killed; None once it was (the reap reports it).
    pub(super) deadline: Option<Instant>,
    timed_out: bool,
}

/// `before_reload hook ["bin/check", "--strict"]`, cut if very long.
fn label(which: Hook, command: &[String]) -> String {
    let mut argv = format!("{command:?}");
    if argv.len() > MAX_SHOWN {
        let mut end = MAX_SHOWN;
        while !argv.is_char_boundary(end) {
            end -= 1;
        }
        argv.truncate(end);
        argv.push_str("…]");
    }
    format!("{} hook {argv}", which.name())
}

impl Master {
    /// [`Action::RunHook`]: start the hook of generation `generation`'s config (the pending
    /// reload's, or the serving one). Returns an event only if it could not be started.
    pub(super) fn start_hook(&mut self, which: Hook, generation: u64) -> Option<Event> {
        let config = match &self.pending {
            Some(p) if p.generation == generation => Rc::clone(&p.config),
            _ => Rc::clone(&self.config),
        };
        let command = match which {
            Hook::BeforeReload => config.hooks.before_reload.as_ref(),
            Hook::AfterReload => config.hooks.after_reload.as_ref(),
        };
        let done = |result| {
            Some(Event::HookDone {
                which,
                generation,
                result,
            })
        };
        // The machine asks only for a configured hook; a config without it has nothing to run.
        let Some(command) = command else {
            return done(HookResult::Passed);
        };
        let label = label(which, command);
        let rlimits = self.worker_rlimits(&config);
        let spec = SpawnSpec {
            worker: &config.worker,
            names: Vec::new(),
            listeners: &[],
            notify_socket: self.notify.path(),
            generation,
            slot: 0,
            rlimits: &rlimits,
            cgroup: None,
            hook: Some(HookRun {
                name: which.name(),
                command,
            }),
        };
        let spawned = match spawn(&spec) {
            Ok(s) => s,
            Err(e) => {
                let e = match e {
                    crate::worker::spawn::SpawnError::NotFound(p) => format!("{p:?} not found in PATH"),
                    e => e.to_string(),
                };
                return done(HookResult::Failed {
                    reason: format!("{label} could not be started: {e}"),
                    tail: Vec::new(),
                });
            }
        };
        info!(self.log, "hook started"; "timeout" => humantime::format_duration(config.hooks.timeout).to_string(),
            "pid" => spawned.pid.as_raw(), "generation" => generation, "hook" => which.name());
        self.hooks.push(RunningHook {
            which,
            generation,
            pid: spawned.pid,
            label,
            pipes: vec![
                Pipe::new(spawned.stdout, Stream::Stdout),
                Pipe::new(spawned.stderr, Stream::Stderr),
            ],
            tail: VecDeque::new(),
            timeout: config.hooks.timeout,
            deadline: Some(clock::from_now(config.hooks.timeout)),
            timed_out: false,
        });
        None
    }

    /// [`Action::KillHook`]: the master is stopping. It is reaped like any child; the machine
    /// ignores its end.
    pub(super) fn kill_hook(&mut self, which: Hook, generation: u64) {
        if let Some(h) = self
            .hooks
            .iter_mut()
            .find(|h| h.which == which && h.generation == generation)
        {
            crate::worker::signal_group(h.pid, Signal::SIGKILL);
            h.deadline = None;
        }
    }

    /// The hooks' pipes to poll (while the log takes more).
    pub(super) fn hook_fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        self.hooks
            .iter()
            .flat_map(|h| h.pipes.iter().filter(|p| !p.is_eof()).map(|p| p.raw_fd()))
    }

    /// Relay what the hooks wrote.
    pub(super) fn pump_hooks(&mut self, ready: &[RawFd]) {
        for i in 0..self.hooks.len() {
            if self.sink.is_full() {
                return;
            }
            if self.hooks[i]
                .pipes
                .iter()
                .any(|p| ready.binary_search(&p.raw_fd()).is_ok())
            {
                self.pump_hook(i, false);
            }
        }
    }

    fn pump_hook(&mut self, i: usize, drain: bool) {
        let h = &mut self.hooks[i];
        let lines = &mut self.lines;
        lines.begin();
        for p in h.pipes.iter_mut() {
            let tag = lines.hook_tag(h.which.name(), h.pid.as_raw(), h.generation, p.stream.as_str());
            let tail = &mut h.tail;
            let mut emit = |line: &[u8]| {
                let text = lines.push(line, &tag);
                crate::worker::remember(tail, &text);
                lines.has_room()
            };
            p.pump_while(drain, &mut emit);
            if drain {
                // Something that left its process group may still hold the pipe: what it has
                // not finished is logged now, and the pipe closed with the hook.
                p.finish(|line| {
                    emit(line);
                });
            }
        }
        lines.flush();
    }

    /// The hooks past their deadline: SIGKILL to their process group (the reap reports it).
    pub(super) fn hook_deadlines(&mut self) {
        let now = Instant::now();
        for h in self.hooks.iter_mut().filter(|h| h.deadline.is_some_and(|d| d <= now)) {
            warn!(self.log, "hook did not finish in time; killing its process group";
                "timeout" => humantime::format_duration(h.timeout).to_string(), "pid" => h.pid.as_raw(),
                "generation" => h.generation, "hook" => h.which.name());
            crate::worker::signal_group(h.pid, Signal::SIGKILL);
            h.deadline = None;
            h.timed_out = true;
        }
    }

    pub(super) fn hook_deadline(&self) -> Option<Instant> {
        self.hooks.iter().filter_map(|h| h.deadline).min()
    }

    pub(super) fn is_hook(&self, pid: Pid) -> bool {
        self.hooks.iter().any(|h| h.pid == pid)
    }

    /// A hook was reaped (what was left of its process group was killed just before): read
    /// what it wrote, then tell the machine how it ended.
    pub(super) fn hook_exited(&mut self, pid: Pid, status: ExitStatus) {
        let Some(i) = self.hooks.iter().position(|h| h.pid == pid) else {
            return;
        };
        self.pump_hook(i, true);
        let h = self.hooks.remove(i);
        let result = if h.timed_out {
            HookResult::Failed {
                reason: format!(
                    "{} did not finish within {} (killed)",
                    h.label,
                    humantime::format_duration(h.timeout)
                ),
                tail: h.tail.into(),
            }
        } else if status.success() {
            HookResult::Passed
        } else {
            HookResult::Failed {
                reason: format!("{} {status}", h.label),
                tail: h.tail.into(),
            }
        };
        debug!(self.log, "hook exited"; "status" => status.to_string(), "pid" => pid.as_raw(),
            "generation" => h.generation, "hook" => h.which.name());
        self.event(Event::HookDone {
            which: h.which,
            generation: h.generation,
            result,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_names_the_hook_and_its_argv_cut_if_long() {
        let argv = vec!["bin/check-app".to_string(), "--strict".to_string()];
        assert_eq!(
            label(Hook::BeforeReload, &argv),
            r#"before_reload hook ["bin/check-app", "--strict"]"#
        );
        let long = vec!["é".repeat(400)];
        let l = label(Hook::AfterReload, &long);
        assert!(l.starts_with("after_reload hook [\"éé") && l.ends_with("…]"), "{l}");
        assert!(l.len() < MAX_SHOWN + 40, "{}", l.len());
    }
}
