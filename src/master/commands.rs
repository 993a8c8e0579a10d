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
                    Some(uid) if uid == 0 || uid == my_uid => self.conns.push(c),
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
        for i in 0..self.conns.len() {
            let fd = self.conns[i].raw_fd();
            if ready.binary_search(&fd).is_err() {
                continue;
            }
            self.conns[i].flush();
            if self.conns[i].wants_read() {
                match self.conns[i].read() {
                    Input::Nothing => {}
                    Input::Bad(msg) => {
                        warn!(self.log, "control: bad request"; "error" => &msg);
                        self.conns[i].send(&Reply::err(msg, Value::Null));
                    }
                    Input::Request(req) => self.handle_request(i, req),
                }
            }
        }
        for c in &mut self.conns {
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

    pub(super) fn handle_request(&mut self, i: usize, req: Request) {
        debug!(self.log, "control request"; "request" => format!("{req:?}"));
        match req {
            Request::Status {} => {
                let status = self.status();
                self.conns[i].send(&Reply::ok("status", status));
            }
            Request::ReopenLogs {} => {
                let reply = match self.reopen_logs() {
                    Ok(()) => Reply::ok("log reopened", Value::Null),
                    Err(e) => Reply::err(e, Value::Null),
                };
                self.conns[i].send(&reply);
            }
            Request::Reload { if_generation } => self.request_reload(Some(i), if_generation),
            Request::Upgrade {} => self.upgrade(Some(i)),
            Request::Stop {} => {
                self.conns[i].waiting = Some(Waiting::Stop);
                let n = self.workers.iter().filter(|w| w.state.is_alive()).count();
                self.conns[i].send(&Reply::progress(format!(
                    "stopping master pid {} and {n} worker{}",
                    std::process::id(),
                    if n == 1 { "" } else { "s" }
                )));
                if self.phase != Phase::Stopping {
                    info!(self.log, "stopping"; "requested_by" => "control socket");
                    self.begin_stop();
                }
            }
        }
    }

    /// What `zdd status` shows.
    pub(super) fn status(&self) -> Value {
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|w| {
                let restarts = if w.generation == self.generation {
                    self.slots.get(w.slot).map_or(0, |s| s.restarts)
                } else {
                    0
                };
                json!({
                    "pid": w.pid.as_raw(),
                    "generation": w.generation,
                    "slot": w.slot,
                    "state": w.state.name(),
                    "started": unix(w.started_wall),
                    "uptime_secs": w.started.elapsed().as_secs(),
                    "restarts": restarts,
                    "status": w.status_text,
                })
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
            "config": self.config.path.display().to_string(),
            "started": unix(self.started_wall),
            "uptime_secs": self.started_at.elapsed().as_secs(),
            "phase": match self.phase { Phase::Starting => "starting", Phase::Running => "running", Phase::Stopping => "stopping" },
            "generation": self.generation,
            "reloading": self.reload.as_ref().map(|r| r.generation),
            "workers": workers,
            "listeners": listeners,
            "log": self.sink.status(),
        })
    }
}
