//! What the master does for each control request, and accepting and serving control
//! connections.

use super::*;

impl Master {
    pub(super) fn reopen_logs(&mut self) -> Result<(), String> {
        match self.sink.reopen() {
            Ok(()) => {
                info!(self.log, "log reopened");
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "reopening the log failed; still writing to the old file: {}",
                    describe_io(&e)
                );
                error!(self.log, "{}", msg);
                Err(msg)
            }
        }
    }

    /// Accept control connections, read requests, write replies, expire slow clients.
    pub(super) fn serve_control(&mut self, ready: &[RawFd]) {
        let now = Instant::now();
        if self.control_paused_until.is_some_and(|t| t <= now) {
            self.control_paused_until = None;
        }
        if ready.binary_search(&self.control.raw_fd()).is_ok() && self.control_paused_until.is_none() {
            let my_uid = nix::unistd::geteuid().as_raw();
            let room = MAX_CONTROL_CONNS.saturating_sub(self.conns.len());
            let (accepted, error) = self.control.accept(now, room);
            if let Some(e) = error {
                warn!(self.log, "control: accept failed; not accepting for {}ms", CONTROL_BACKOFF.as_millis();
                    "error" => describe_io(&e), "connections" => self.conns.len());
                self.control_paused_until = Some(clock::after(now, CONTROL_BACKOFF));
            }
            for mut c in accepted {
                match c.peer_uid {
                    Some(uid) if uid == 0 || uid == my_uid => {
                        self.conns.insert(ClientId(self.next_client), c);
                        self.next_client += 1;
                    }
                    other => {
                        let uid = other.map_or("unknown".to_string(), |u| u.to_string());
                        warn!(self.log, "control: refused a client"; "uid" => &uid, "peer_pid" => c.peer_pid);
                        c.send(&Reply::err(
                            format!(
                                "permission denied: uid {uid} may not control this master (only root and uid {my_uid})"
                            ),
                            Value::Null,
                        ));
                    }
                }
            }
        }
        let ids: Vec<ClientId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else { continue };
            if ready.binary_search(&c.raw_fd()).is_err() {
                continue;
            }
            c.flush();
            if c.wants_read() {
                match c.read() {
                    Input::Nothing => {}
                    Input::Bad(msg) => {
                        warn!(self.log, "control: bad request"; "error" => &msg);
                        c.send(&Reply::err(msg, Value::Null));
                    }
                    Input::Request(req) => self.handle_request(id, req),
                }
            }
        }
        for c in self.conns.values_mut() {
            if c.deadline.is_some_and(|d| d <= now) {
                c.deadline = None;
                c.send(&Reply::err(
                    format!(
                        "request timed out: no complete request line within {:?}",
                        crate::control::REQUEST_TIMEOUT
                    ),
                    Value::Null,
                ));
            }
        }
        // Connections that ended are dropped at the top of the next loop turn, before poll.
    }

    pub(super) fn handle_request(&mut self, id: ClientId, req: Request) {
        debug!(self.log, "control request"; "request" => format!("{req:?}"));
        let reply = match req {
            Request::Status {} => Reply::ok("status", self.status()),
            Request::ReopenLogs {} => match self.reopen_logs() {
                Ok(()) => Reply::ok("log reopened", Value::Null),
                Err(e) => Reply::err(e, Value::Null),
            },
            Request::Reload { if_generation } => {
                return self.event(Event::ReloadRequested {
                    from: Some(id),
                    if_generation,
                })
            }
            Request::Upgrade {} => return self.upgrade(Some(id)),
            Request::Stop {} => {
                let n = self.gens.alive();
                if let Some(c) = self.conns.get_mut(&id) {
                    c.waiting = Some(Waiting::Stop);
                    c.send(&Reply::progress(format!(
                        "stopping master pid {} and {n} worker{}",
                        std::process::id(),
                        if n == 1 { "" } else { "s" }
                    )));
                }
                return self.event(Event::StopRequested { by: StopBy::Control });
            }
        };
        if let Some(c) = self.conns.get_mut(&id) {
            c.send(&reply);
        }
    }

    /// What `zdd status` shows.
    pub(super) fn status(&self) -> Value {
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let now = Instant::now();
        let workers: Vec<Value> = self
            .gens
            .workers()
            .iter()
            .map(|w| {
                let io = self.workers.iter().find(|io| io.pid == w.pid);
                json!({
                    "pid": w.pid.as_raw(),
                    "generation": w.generation,
                    "slot": w.slot,
                    "state": w.state.name(),
                    "started": io.map_or(0, |io| unix(io.started_wall)),
                    "uptime_secs": now.saturating_duration_since(w.started).as_secs(),
                    "restarts": self.gens.restarts(w),
                    "rss_bytes": if w.state.is_alive() { self.rss_of(w.pid) } else { 0 },
                    "status": io.and_then(|io| io.status_text.as_ref()),
                })
            })
            .collect();
        // Slots waiting out their crash back-off have no worker: say so, with why.
        let restarting: Vec<Value> = self
            .gens
            .slots()
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let at = s.restart_at?;
                Some(json!({
                    "slot": i,
                    "generation": self.gens.generation(),
                    "in_ms": crate::clock::ms(at.saturating_duration_since(now)),
                    "restarts": s.restarts,
                    "last_exit": s.last_exit,
                }))
            })
            .collect();
        let listeners: Vec<Value> = self
            .config
            .listen
            .iter()
            .zip(&self.listeners)
            .map(|(lc, l)| json!({ "name": lc.name, "address": l.local_addr() }))
            .collect();
        json!({
            "pid": std::process::id(),
            // Absolute, as the master resolves it (a relative path means nothing to a client).
            "config": std::fs::canonicalize(&self.config.path).unwrap_or_else(|_| self.config.path.clone()).display().to_string(),
            "started": unix(self.started_wall),
            "uptime_secs": self.started_at.elapsed().as_secs(),
            "phase": self.gens.phase().name(),
            "generation": self.gens.generation(),
            "reloading": self.gens.reloading(),
            "unstable": self.gens.unstable(),
            "workers": workers,
            "restarting": restarting,
            "listeners": listeners,
            "log": self.sink.status(),
            "log_file": self.sink.path().map(|p| p.display().to_string()),
            "metrics": self.metrics_json(),
        })
    }
}
