//! Carrying out the generations machine's actions: each is a step of I/O (spawn, signal,
//! reply, log, tell systemd, …); what it produced is returned as the event to feed back.

use super::*;
use generations::{Kv, Level, Systemd};

impl Master {
    /// Carry out one action; returns the event that reports its result, if it has one.
    pub(super) fn carry_out(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Spawn { generation, slot } => {
                return Some(match self.spawn_worker(generation, slot) {
                    Ok(pid) => Event::WorkerSpawned { pid, generation, slot },
                    Err(reason) => Event::SpawnFailed {
                        generation,
                        slot,
                        reason,
                    },
                })
            }
            Action::Signal { pid, signal } => crate::worker::signal_group(pid, signal),
            Action::KillGroup { pid } => match self.workers.iter().find(|w| w.pid == pid) {
                Some(w) => w.kill_group(),
                None => crate::worker::signal_group(pid, Signal::SIGKILL),
            },
            Action::Probe { pid } => return self.start_probe(pid),
            Action::PrepareReload { generation, .. } => return Some(self.prepare_reload(generation)),
            Action::CommitReload { generation } => self.commit_reload(generation),
            Action::RunHook { which, generation } => return self.start_hook(which, generation),
            Action::KillHook { which, generation } => self.kill_hook(which, generation),
            Action::DiscardReload { generation, failed } => self.discard_reload(generation, failed),
            Action::Reply { to, ok, message, data } => {
                if let Some(c) = self.conns.get_mut(&to) {
                    c.waiting = None;
                    c.send(&if ok {
                        Reply::ok(message, data)
                    } else {
                        Reply::err(message, data)
                    });
                }
            }
            Action::Progress { to, message } => {
                if let Some(c) = self.conns.get_mut(&to) {
                    c.send(&Reply::progress(message));
                }
            }
            Action::Log { level, message, kv } => {
                let kv = KvList(&kv);
                match level {
                    Level::Debug => debug!(self.log, "{}", message; kv),
                    Level::Info => info!(self.log, "{}", message; kv),
                    Level::Warn => warn!(self.log, "{}", message; kv),
                    Level::Error => error!(self.log, "{}", message; kv),
                }
            }
            Action::StartSucceeded { generation, workers } => {
                let pid = std::process::id();
                self.report_start(format!("ready pid {pid} generation {generation} workers {workers}"));
            }
            Action::StartFailed { reason, tail } => {
                let mut report = format!("failed {reason}");
                for line in &tail {
                    report.push_str("\n| ");
                    report.push_str(line);
                }
                self.report_start(report);
            }
            Action::TellSystemd(message) => self.tell_systemd(message),
            Action::CancelUpgrade => {
                if let Some(check) = self.upgrade_check.take() {
                    let _ = nix::sys::signal::killpg(check.pid, Signal::SIGKILL);
                }
                self.finish_upgrade(Reply::err("upgrade cancelled: the master is stopping", Value::Null));
            }
            Action::Exit { code } => self.exit = Some(code),
        }
        None
    }

    /// Tell systemd, if it is listening.
    fn tell_systemd(&self, message: Systemd) {
        let Some(systemd) = &self.systemd else { return };
        let message = match message {
            Systemd::Ready { status } => format!("READY=1\nSTATUS={status}"),
            Systemd::Reloading { generation } => format!(
                "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading: starting generation {generation}",
                monotonic_usec()
            ),
            Systemd::Stopping => "STOPPING=1\nSTATUS=stopping".into(),
            Systemd::Status(status) => format!("STATUS={status}"),
            Systemd::ExtendTimeout(d) => format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()),
        };
        systemd.send(&message);
    }

    /// Start the worker of `slot` with its generation's config and listeners (the pending
    /// reload's, or the serving ones). The error is the whole message for the machine.
    fn spawn_worker(&mut self, generation: u64, slot: usize) -> Result<Pid, String> {
        let (config, listeners) = match &self.pending {
            Some(p) if p.generation == generation => (Rc::clone(&p.config), p.listeners.clone()),
            _ => (Rc::clone(&self.config), self.listeners.clone()),
        };
        let rlimits = self.worker_rlimits(&config);
        // With a probe, the worker's private listener goes after every [[listen]] fd.
        let probe = match &config.worker.probe {
            Some(p) => Some(Rc::new(
                Listener::bind_probe(&p.name).map_err(|e| format!("starting worker: probe {e}"))?,
            )),
            None => None,
        };
        let mut names: Vec<&str> = config.listen.iter().map(|l| l.name.as_str()).collect();
        let mut fds = listeners.clone();
        if let (Some(p), Some(l)) = (&config.worker.probe, &probe) {
            names.push(&p.name);
            fds.push(Rc::clone(l));
        }
        let cgroup = self.cgroups.create(generation, slot);
        let spec = SpawnSpec {
            worker: &config.worker,
            names,
            listeners: &fds,
            notify_socket: self.notify.path(),
            generation,
            slot,
            rlimits: &rlimits,
            cgroup: cgroup.as_ref(),
            hook: None,
        };
        let spawned = match spawn(&spec) {
            Ok(s) => s,
            Err(e) => {
                if let Some(cg) = cgroup {
                    self.cgroups.release(cg);
                }
                return Err(format!("starting worker: {e}"));
            }
        };
        let inodes = config
            .worker
            .ready
            .watches_listening()
            .then(|| self.generation_inodes(generation, &listeners));
        self.workers.push(Worker {
            pid: spawned.pid,
            generation,
            started_wall: SystemTime::now(),
            pipes: vec![
                Pipe::new(spawned.stdout, Stream::Stdout),
                Pipe::new(spawned.stderr, Stream::Stderr),
            ],
            status_text: None,
            listeners,
            probe,
            cgroup,
        });
        if let Some(inodes) = inodes {
            if let Some(w) = self.workers.last() {
                let watched = self.watches.len() + 1;
                self.watches
                    .push(readiness::Watch::new(w, inodes, watched, Instant::now()));
            }
        }
        Ok(spawned.pid)
    }
}

impl Master {
    /// The limits a worker (or hook) of `config` gets: `[rlimits]`, and the open-file limit the
    /// master was given (it raised its own soft one) unless `[rlimits]` sets one.
    pub(super) fn worker_rlimits(&self, config: &Config) -> Vec<config::Rlimit> {
        let mut rlimits = config.rlimits.clone();
        if let Some((soft, hard)) = self.worker_nofile {
            if !rlimits
                .iter()
                .any(|r| r.resource == nix::sys::resource::Resource::RLIMIT_NOFILE)
            {
                rlimits.push(config::Rlimit {
                    resource: nix::sys::resource::Resource::RLIMIT_NOFILE,
                    name: "nofile",
                    soft,
                    hard,
                });
            }
        }
        rlimits
    }
}

/// A log action's key-value list, for slog.
struct KvList<'a>(&'a [(&'static str, Kv)]);

impl slog::KV for KvList<'_> {
    fn serialize(&self, _: &slog::Record, s: &mut dyn slog::Serializer) -> slog::Result {
        // slog's own `"key" => value` lists serialize the last pair first: so does this one,
        // so that a record reads the same as when it was written with the macros.
        for (key, value) in self.0.iter().rev() {
            match value {
                Kv::U64(n) => s.emit_u64(key, *n)?,
                Kv::I64(n) => s.emit_i64(key, *n)?,
                Kv::Str(t) => s.emit_str(key, t)?,
            }
        }
        Ok(())
    }
}
