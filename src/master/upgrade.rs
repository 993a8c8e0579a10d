//! The upgrade as the running master does it: check the new binary, exec it with the state
//! ([`super::handover`]), and in the new image resume or roll back.

use super::*;
use crate::worker::State;

/// `zdd upgrade-check` of the new binary, running as a child of the master.
pub(super) struct UpgradeCheck {
    pub(super) pid: Pid,
    /// Its stdout and stderr, read once it has exited.
    pub(super) output: std::fs::File,
    pub(super) deadline: Instant,
}

impl Master {
    /// Answer every client waiting for the upgrade.
    pub(super) fn finish_upgrade(&mut self, reply: Reply) {
        for c in self.conns.values_mut() {
            if c.waiting == Some(Waiting::Upgrade) {
                c.waiting = None;
                c.send(&reply);
            }
        }
    }

    pub(super) fn refuse_upgrade(&mut self, msg: String) {
        warn!(self.log, "{}", msg);
        self.finish_upgrade(Reply::err(msg, Value::Null));
    }

    /// An upgrade asked for by SIGUSR2 (`from` = None) or a control client: first check the
    /// new binary (asynchronously: the loop goes on), then re-execute it.
    pub(super) fn upgrade(&mut self, from: Option<ClientId>) {
        if let Some(c) = from.and_then(|id| self.conns.get_mut(&id)) {
            c.waiting = Some(Waiting::Upgrade);
        }
        if self.upgrade_check.is_some() {
            return self.progress_upgrade("an upgrade is under way; this one shares its outcome".into());
        }
        if let Some(why) = self.gens.upgrade_refusal() {
            return self.refuse_upgrade(format!("upgrade refused: {why}"));
        }
        let exe = self.exe.clone();
        info!(self.log, "upgrade: checking the new binary"; "exe" => exe.display().to_string());
        self.progress_upgrade(format!("checking {}", exe.display()));
        match spawn_upgrade_check(&exe) {
            Ok((pid, output)) => {
                self.upgrade_check = Some(UpgradeCheck {
                    pid,
                    output,
                    deadline: clock::from_now(handover::CHECK_TIMEOUT),
                })
            }
            Err(e) => self.refuse_upgrade(format!(
                "upgrade refused: cannot run {} upgrade-check: {e}; the master carries on unchanged",
                exe.display()
            )),
        }
    }

    pub(super) fn progress_upgrade(&mut self, message: String) {
        let reply = Reply::progress(message);
        for c in self.conns.values_mut() {
            if c.waiting == Some(Waiting::Upgrade) {
                c.send(&reply);
            }
        }
    }

    /// The check child exited (reaped) or timed out (`status` = None).
    pub(super) fn upgrade_checked(&mut self, status: Option<ExitStatus>) {
        let Some(mut check) = self.upgrade_check.take() else {
            return;
        };
        let exe = self.exe.display().to_string();
        let mut output = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::Read::take(&mut check.output, 4096), &mut output);
        let said = String::from_utf8_lossy(&output).trim().replace('\n', " | ");
        let said = if said.is_empty() { "no output".to_string() } else { said };
        let failure = match status {
            None => {
                let _ = nix::sys::signal::killpg(check.pid, Signal::SIGKILL);
                Some(format!(
                    "{exe} upgrade-check did not answer within {}",
                    humantime::format_duration(handover::CHECK_TIMEOUT)
                ))
            }
            Some(st) if !st.success() => Some(format!("{exe} upgrade-check {st}: {said}")),
            Some(_) if !said.starts_with("zdd ") => Some(format!("{exe} upgrade-check answered {said:?}")),
            Some(_) => None,
        };
        if let Some(f) = failure {
            return self.refuse_upgrade(format!("upgrade refused: {f}; the master carries on unchanged"));
        }
        // The loop went on while the check ran: a reload or stop may have begun meanwhile.
        if let Some(why) = self.gens.upgrade_refusal() {
            return self.refuse_upgrade(format!("upgrade refused: {why}"));
        }
        info!(self.log, "upgrade: the new binary answered"; "answer" => &said);
        self.progress_upgrade(said);
        self.exec_upgrade();
    }

    /// Re-execute the master's binary in place, keeping sockets, workers and their pipes.
    pub(super) fn exec_upgrade(&mut self) {
        let from = self
            .conns
            .iter()
            .find(|(_, c)| c.waiting == Some(Waiting::Upgrade))
            .map(|(&id, _)| id);
        let now = Instant::now();
        let ms_left = |t: Instant| clock::ms(t.saturating_duration_since(now));
        let mut all: Vec<Rc<Listener>> = Vec::new();
        let mut index = |l: &Rc<Listener>| match all.iter().position(|x| Rc::ptr_eq(x, l)) {
            Some(i) => i,
            None => {
                all.push(Rc::clone(l));
                all.len() - 1
            }
        };
        let current: Vec<usize> = self.listeners.iter().map(&mut index).collect();
        let unix_ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, clock::ms);
        let workers: Vec<handover::WorkerState> = self
            .gens
            .workers()
            .iter()
            .filter(|w| w.state.is_alive())
            .filter_map(|w| Some((w, self.workers.iter().find(|io| io.pid == w.pid)?)))
            .map(|(w, io)| {
                use handover::WorkerPhase as P;
                let (state, remaining_ms, ready_in_ms) = match w.state {
                    State::Starting { deadline, ready_at, .. } => {
                        (P::Starting, Some(ms_left(deadline)), ready_at.map(ms_left))
                    }
                    State::Probing { deadline } => (P::Probing, Some(ms_left(deadline)), None),
                    State::Ready => (P::Ready, None, None),
                    State::Stopping { kill_at } => (P::Stopping, Some(ms_left(kill_at)), None),
                    State::Killed | State::Exited(_) => (P::Killed, None, None),
                };
                handover::WorkerState {
                    pid: w.pid.as_raw(),
                    generation: w.generation,
                    slot: w.slot,
                    state,
                    remaining_ms,
                    ready_in_ms,
                    uptime_ms: clock::ms(now.saturating_duration_since(w.started)),
                    started_wall_ms: unix_ms(io.started_wall),
                    stop_signal: w.stop_signal as i32,
                    stop_timeout_ms: clock::ms(w.stop_timeout),
                    pipes: io
                        .pipes
                        .iter()
                        .filter(|p| !p.is_eof())
                        .map(|p| (p.stream, p.raw_fd(), p.partial().to_vec()))
                        .collect(),
                    listeners: io.listeners.iter().map(&mut index).collect(),
                    tail: w.tail.iter().cloned().collect(),
                    status_text: io.status_text.clone(),
                    cgroup: io.cgroup.as_ref().map(|c| c.path().to_path_buf()),
                    probe: io.probe.as_ref().map(&mut index),
                }
            })
            .collect();
        let state = handover::State {
            version: handover::STATE_VERSION,
            from_version: env!("CARGO_PKG_VERSION").into(),
            exe: self.exe.clone(),
            config_path: self.config.path.clone(),
            config_text: self.config.source.clone(),
            generation: self.gens.generation(),
            next_generation: self.gens.next_generation(),
            attempt: self.gens.attempt(),
            uptime_ms: clock::ms(self.started_at.elapsed()),
            started_wall_ms: unix_ms(self.started_wall),
            notify_fd: self.notify.raw_fd(),
            control_fd: self.control.raw_fd(),
            pid_file: self.pid_file.to_state(),
            listeners: all
                .iter()
                .map(|l| {
                    let (fd, addr, created, backlog) = l.to_state();
                    handover::ListenerState {
                        fd,
                        addr,
                        created,
                        backlog,
                    }
                })
                .collect(),
            current,
            workers,
            slots: self
                .gens
                .slots()
                .iter()
                .map(|s| handover::SlotState {
                    failures: s.failures,
                    restarts: s.restarts,
                    restart_in_ms: s.restart_at.map(ms_left),
                    last_exit: s.last_exit.clone(),
                })
                .collect(),
            orphan_pipes: self
                .orphan_pipes
                .iter()
                .map(|(pid, g, p)| (pid.as_raw(), *g, p.stream, p.raw_fd()))
                .collect(),
            orphan_partials: self.orphan_pipes.iter().map(|(_, _, p)| p.partial().to_vec()).collect(),
            watch: self
                .gens
                .watch()
                .filter(|&(_, until)| until > now)
                .map(|(g, until)| (g, ms_left(until))),
            unstable: self.gens.unstable().map(String::from),
            reply_fd: from.and_then(|id| self.conns.get(&id)).map(|c| c.raw_fd()),
            more_reply_fds: self
                .conns
                .iter()
                .filter(|(id, c)| Some(**id) != from && c.waiting == Some(Waiting::Upgrade))
                .map(|(_, c)| c.raw_fd())
                .collect(),
            worker_nofile: self.worker_nofile,
            cgroups: self.cgroups.handover(),
            config: Some(crate::config::state::ConfigState::from(&*self.config)),
            notify_path: Some(self.notify.path().to_path_buf()),
            control_path: Some(self.control.path().to_path_buf()),
            log: None,
            metrics: self.metrics.as_ref().map(|m| {
                let (fd, addr, created, backlog) = m.server.listener().to_state();
                handover::ListenerState {
                    fd,
                    addr,
                    created,
                    backlog,
                }
            }),
            stats: Some(self.gens.stats().clone()),
            serving_ms: self.gens.stats().serving_for(now).map(clock::ms),
        };
        info!(self.log, "upgrading: re-executing the master"; "exe" => self.exe.display().to_string());
        if let Some(c) = from.and_then(|id| self.conns.get_mut(&id)) {
            c.send(&Reply::progress(format!("re-executing {}", self.exe.display())));
        }
        // What the log has not taken yet is handed over, not waited for: taken last, so that
        // it holds every record up to the exec.
        self.sink.write_pending();
        let mut state = state;
        state.log = Some(self.sink.handover());
        let reason = handover::exec(&state);
        let msg = format!("upgrade failed: {reason}; the master carries on unchanged");
        error!(self.log, "{}", msg);
        self.finish_upgrade(Reply::err(msg, Value::Null));
    }

    /// The new image after an upgrade, first step: everything that can fail, before any
    /// handed-over fd is taken over (so that a failure can still roll back to the old image
    /// with every fd open): the running config, the log, the signal handlers.
    pub(super) fn prepare_resume(state: &mut handover::State) -> Result<Prepared, String> {
        if std::env::var_os(FAULT_ENV).is_some_and(|v| v == "resume") {
            return Err(format!(
                "{FAULT_ENV}=resume: failing the resume on purpose (fault injection)"
            ));
        }
        let config = match &state.config {
            Some(c) => c
                .clone()
                .into_config()
                .map_err(|e| format!("the running config handed over: {e}"))?,
            // Version 1: only the text was handed over.
            None => config::parse(&state.config_path, &state.config_text).map_err(|e| e.to_string())?,
        };
        let signals = Signals::install().map_err(|e| format!("installing signal handlers: {e}"))?;
        // Last: the log takes over its handed-over fd, and nothing may fail after that.
        let (log, sink) = match state.log.take() {
            Some(l) => crate::log::resume(l.path, l.fd.map(handover::own), l.pending, config.master.log_format),
            None => crate::log::build(&config.master.log, config.master.log_format)
                .map_err(|e| format!("opening log {}: {}", config.master.log, describe_io(&e)))?,
        };
        Ok(Prepared {
            config: Rc::new(config),
            log,
            sink,
            signals,
        })
    }

    /// The new image after an upgrade, second step: the same master, rebuilt around the fds it
    /// was handed. Nothing here can fail.
    pub(super) fn resume(state: handover::State, prepared: Prepared, rolled_back: Option<String>) -> Master {
        let Prepared {
            config,
            log,
            sink,
            signals,
        } = prepared;
        let all: Vec<Rc<Listener>> = state
            .listeners
            .into_iter()
            .map(|l| {
                // The socket options it was bound with are its config's (carried in the state).
                let opts = config
                    .listen
                    .iter()
                    .find(|lc| lc.addr == l.addr)
                    .map(|lc| lc.opts.clone());
                let listener = Listener::from_state(handover::own(l.fd), l.addr, l.created, l.backlog);
                Rc::new(listener.with_opts(&opts.unwrap_or_default()))
            })
            .collect();
        let now = Instant::now();
        let wall = clock::wall_ms;
        let (mut machine_workers, mut workers) = (Vec::new(), Vec::new());
        for w in state.workers {
            use handover::WorkerPhase as P;
            let after_ms = |ms: Option<u64>| clock::after(now, Duration::from_millis(ms.unwrap_or(0)));
            let pid = Pid::from_raw(w.pid);
            machine_workers.push(generations::Worker {
                pid,
                generation: w.generation,
                slot: w.slot,
                state: match w.state {
                    P::Starting => State::Starting {
                        deadline: after_ms(w.remaining_ms),
                        ready_at: w.ready_in_ms.map(|ms| after_ms(Some(ms))),
                        // Only the serving generation's workers are handed over.
                        probe: generations::Params::of(&config).probe,
                    },
                    P::Probing => State::Probing {
                        deadline: after_ms(w.remaining_ms),
                    },
                    P::Ready => State::Ready,
                    P::Stopping => State::Stopping {
                        kill_at: after_ms(w.remaining_ms),
                    },
                    P::Killed => State::Killed,
                },
                started: now.checked_sub(Duration::from_millis(w.uptime_ms)).unwrap_or(now),
                stop_signal: Signal::try_from(w.stop_signal).unwrap_or(Signal::SIGTERM),
                stop_timeout: Duration::from_millis(w.stop_timeout_ms),
                start_timeout: config.worker.start_timeout,
                tail: w.tail.into_iter().collect(),
                // Armed again below, from the time of the resume.
                watchdog_at: None,
                recycle_at: None,
            });
            workers.push(Worker {
                pid,
                generation: w.generation,
                started_wall: wall(w.started_wall_ms),
                pipes: w
                    .pipes
                    .into_iter()
                    .map(|(s, fd, partial)| Pipe::resume(handover::own(fd), s, partial))
                    .collect(),
                status_text: w.status_text,
                listeners: w.listeners.iter().filter_map(|&i| all.get(i).cloned()).collect(),
                cgroup: w.cgroup.map(crate::worker::cgroup::WorkerCgroup::from_path),
                probe: w.probe.and_then(|i| all.get(i).cloned()),
            });
        }
        let slots = state
            .slots
            .into_iter()
            .map(|s| generations::Slot {
                ready_once: true,
                failures: s.failures,
                restarts: s.restarts,
                restart_at: s.restart_in_ms.map(|ms| clock::after(now, Duration::from_millis(ms))),
                last_exit: s.last_exit,
            })
            .collect();
        let mut gens = Generations::resume(
            generations::Resumed {
                generation: state.generation,
                next_generation: state.next_generation,
                attempt: state.attempt,
                params: Params::of(&config),
                slots,
                workers: machine_workers,
                watch: state
                    .watch
                    .map(|(g, ms)| (g, clock::after(now, Duration::from_millis(ms)))),
                unstable: state.unstable,
            },
            config.path.display().to_string(),
        );
        gens.rearm(now);
        let serving_for = state.serving_ms.map(Duration::from_millis);
        gens.restore_stats(state.stats.unwrap_or_default().resumed(now, serving_for));
        // The old image blocked the handled signals for the exec; our handlers are in place now.
        // SAFETY: an empty sigset_t initialised by sigemptyset.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        }
        let m = &config.master;
        let (pid_fd, pid_path, pid_ino) = state.pid_file;
        let mut conns = BTreeMap::new();
        for (n, &fd) in state.reply_fd.iter().chain(&state.more_reply_fds).enumerate() {
            conns.insert(ClientId(n as u64), Conn::from_fd(handover::own(fd)));
        }
        // The sockets stay where they are bound, whatever [master] says now.
        let notify_path = state.notify_path.clone().unwrap_or_else(|| m.notify_socket.clone());
        let control_path = state.control_path.clone().unwrap_or_else(|| m.control_socket.clone());
        let cgroups = crate::worker::cgroup::Cgroups::resume(&log, state.cgroups, &pid_path);
        let mut master = Master::assemble(Parts {
            cgroups,
            notify: NotifyServer::from_fd(handover::own(state.notify_fd), &notify_path),
            control: ControlServer::from_fd(handover::own(state.control_fd), &control_path),
            pid_file: PidFile::from_state(handover::own(pid_fd), pid_path, pid_ino),
            metrics: state.metrics.map(|l| {
                crate::metrics::MetricsServer::from_listener(Listener::from_state(
                    handover::own(l.fd),
                    l.addr,
                    l.created,
                    l.backlog,
                ))
            }),
            log,
            sink,
            listeners: state.current.iter().filter_map(|&i| all.get(i).cloned()).collect(),
            config,
            gens,
            workers,
            orphan_pipes: {
                let mut partials = state.orphan_partials.into_iter();
                state
                    .orphan_pipes
                    .into_iter()
                    .map(|(pid, g, s, fd)| {
                        let partial = partials.next().unwrap_or_default();
                        (Pid::from_raw(pid), g, Pipe::resume(handover::own(fd), s, partial))
                    })
                    .collect()
            },
            signals,
            started_at: now.checked_sub(Duration::from_millis(state.uptime_ms)).unwrap_or(now),
            started_wall: wall(state.started_wall_ms),
            exe: state.exe.clone(),
            worker_nofile: state.worker_nofile,
            conns,
        });
        let alive = master.gens.workers().len();
        let pid = std::process::id();
        let data = json!({ "pid": pid, "generation": master.gens.generation() });
        let reply = match rolled_back {
            Some(reason) => {
                let message = format!(
                    "upgrade failed: {reason}; rolled back to zdd {} (master pid {pid}, generation {} with {alive} worker{} kept)",
                    env!("CARGO_PKG_VERSION"),
                    master.gens.generation(),
                    if alive == 1 { "" } else { "s" }
                );
                error!(master.log, "{}", message);
                Reply::err(message, data)
            }
            None => {
                info!(master.log, "upgraded: master re-executed";
                    "from_version" => &state.from_version, "version" => env!("CARGO_PKG_VERSION"),
                    "workers" => alive, "generation" => master.gens.generation(), "pid" => pid);
                let message = format!(
                    "upgraded: master pid {pid} now runs zdd {} (was {}); generation {} with {alive} worker{} kept",
                    env!("CARGO_PKG_VERSION"),
                    state.from_version,
                    master.gens.generation(),
                    if alive == 1 { "" } else { "s" }
                );
                Reply::ok(message, data)
            }
        };
        for c in master.conns.values_mut() {
            c.send(&reply);
        }
        master
    }
}

/// Set to `resume` to make the next upgraded image fail its resume (fault injection, for the
/// rollback's tests; removed from the environment before the rollback's exec).
pub const FAULT_ENV: &str = "ZDD_FAULT";

/// What the fallible first step of a resume prepared.
pub(super) struct Prepared {
    config: Rc<Config>,
    log: Logger,
    sink: Sink,
    signals: Signals,
}

/// Start `exe upgrade-check --state-version N` in its own process group, stdout and stderr to
/// one pipe (read once it has exited). The master's reaping collects it.
fn spawn_upgrade_check(exe: &Path) -> Result<(Pid, std::fs::File), String> {
    use std::os::unix::process::CommandExt;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| format!("pipe: {}", crate::errno::describe(e)))?;
    let w2 = w.try_clone().map_err(|e| format!("dup: {}", describe_io(&e)))?;
    let child = std::process::Command::new(exe)
        .arg("upgrade-check")
        .arg("--state-version")
        .arg(handover::STATE_VERSION.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(w)
        .stderr(w2)
        .process_group(0)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .spawn()
        .map_err(|e| describe_io(&e))?;
    let pid = Pid::from_raw(child.id() as i32);
    // Not waited for through `child`: the loop reaps every child.
    drop(child);
    Ok((pid, std::fs::File::from(r)))
}

/// The new image failed before it was in charge: back to the old one. Returns only if that
/// is impossible, with the whole story.
pub(super) fn roll_back(reason: &str, rollback: &handover::Rollback, fds: &[RawFd]) -> String {
    eprintln!("zdd: upgrade failed: {reason}; rolling back to the previous binary");
    std::env::remove_var(FAULT_ENV);
    if !rollback.possible() {
        return format!("resuming after a rolled-back upgrade failed too: {reason}");
    }
    let why = rollback.roll_back(reason, fds);
    format!("upgrade failed: {reason}; and the rollback failed: {why}")
}
