//! The I/O of a reload; the machine decides when. Preparing the next generation: read the
//! config, keep or bind its listeners, check its credentials, hand the notify socket to its
//! user. Committing it: kept listeners take the new settings, its config and listeners serve.
//! Discarding it: a failed one gives the notify socket back to the serving workers' user.

use super::*;

/// The config and listeners of the generation a reload is building.
pub(super) struct Pending {
    pub(super) generation: u64,
    pub(super) config: Rc<Config>,
    pub(super) listeners: Vec<Rc<Listener>>,
}

impl Master {
    /// [`Action::PrepareReload`]: returns the event that reports how it went.
    pub(super) fn prepare_reload(&mut self, generation: u64) -> Event {
        let fail = |message: String| Event::ReloadPrepareFailed { generation, message };
        let config = match config::load_with(&self.config.path, config::Checks::Reload) {
            Ok(c) => Rc::new(c),
            Err(e) => return fail(format!("reload failed: invalid config; nothing changed: {e}")),
        };
        // The master's own files and sockets stay as they are until the next start;
        // max_draining is a reload setting and applies from this reload's commit on.
        let (new, old) = (&config.master, &self.config.master);
        let changed: Vec<&str> = [
            ("pid_file", new.pid_file != old.pid_file),
            ("control_socket", new.control_socket != old.control_socket),
            ("log", new.log != old.log),
            ("log_format", new.log_format != old.log_format),
            ("metrics", new.metrics != old.metrics),
        ]
        .into_iter()
        .filter_map(|(k, c)| c.then_some(k))
        .collect();
        if !changed.is_empty() {
            warn!(
                self.log,
                "[master] settings changed; they take effect at the next start, not on reload";
                "keys" => changed.join(", ")
            );
        }
        let mut listeners = Vec::with_capacity(config.listen.len());
        for lc in &config.listen {
            match self.listeners.iter().find(|l| l.addr() == &lc.addr) {
                Some(kept) => listeners.push(Rc::clone(kept)),
                None => match Listener::bind(lc) {
                    Ok(l) => {
                        if l.ipv4_fallback() {
                            warn!(self.log, "IPv6 is unavailable: a port-only listener listens on IPv4 only (0.0.0.0)"; "name" => &lc.name);
                        }
                        info!(self.log, "listening"; "addr" => l.local_addr(), "name" => &lc.name);
                        listeners.push(Rc::new(l));
                    }
                    Err(e) => return fail(format!("reload failed; nothing changed: {e}")),
                },
            }
        }
        if let Err(e) = crate::worker::spawn::check_credentials(&config.worker) {
            return fail(format!("reload failed; nothing changed: {e}"));
        }
        let new_owner = config.worker.credentials.as_ref().map(|c| c.uid);
        // Workers running as root can write to it whoever owns it.
        if new_owner.is_some() && new_owner != self.config.worker.credentials.as_ref().map(|c| c.uid) {
            if let Err(e) = self.notify.set_owner(new_owner) {
                return fail(format!("reload failed; nothing changed: {e}"));
            }
        }
        let params = Params::of(&config);
        self.pending = Some(Pending {
            generation,
            config,
            listeners,
        });
        // Its new listeners go into systemd's fd store now: the file on disk is this config,
        // which a master restarted after a crash would read.
        self.sync_fdstore();
        Event::ReloadPrepared { generation, params }
    }

    /// [`Action::CommitReload`]: the prepared generation's config and listeners serve now.
    pub(super) fn commit_reload(&mut self, generation: u64) {
        let Some(p) = self.take_pending(generation) else { return };
        // Kept listeners take the new file mode, owner and backlog in place.
        for (lc, l) in p.config.listen.iter().zip(&p.listeners) {
            if let Err(e) = l.update(lc) {
                warn!(self.log, "could not apply listener settings: {}", e);
            }
        }
        self.config = p.config;
        self.listeners = p.listeners;
        // Listeners the new config dropped leave systemd's fd store now (the old workers keep
        // their own copies while they drain).
        self.sync_fdstore();
    }

    /// [`Action::DiscardReload`]: drop the prepared config and listeners (the listeners stay
    /// open while a worker of that generation holds them).
    pub(super) fn discard_reload(&mut self, generation: u64, failed: bool) {
        let Some(p) = self.take_pending(generation) else { return };
        // Its new listeners leave systemd's fd store.
        self.sync_fdstore();
        if !failed {
            return;
        }
        // The notify socket was given to the new generation's user: give it back to the
        // serving one's, or its next restarted worker could not say READY=1.
        let serving = self.config.worker.credentials.as_ref().map(|c| c.uid);
        let new_owner = p.config.worker.credentials.as_ref().map(|c| c.uid);
        if new_owner.is_some() && new_owner != serving {
            if let Err(e) = self.notify.set_owner(serving) {
                error!(
                    self.log,
                    "could not give the notify socket back to the serving workers' user: {}", e
                );
            }
        }
    }

    fn take_pending(&mut self, generation: u64) -> Option<Pending> {
        match &self.pending {
            Some(p) if p.generation == generation => self.pending.take(),
            _ => None,
        }
    }
}
