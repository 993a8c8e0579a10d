//! The master's side of the worker log relay: reading the workers' pipes (and pipes that
//! outlived their worker) into the log, with back-pressure when the log cannot take more, and
//! the notify socket's readiness messages.

use super::*;

impl Master {
    pub(super) fn drain_worker(&mut self, i: usize, drain: bool) {
        // Past the log's hard cap even an exited worker's last lines wait: its pipes are kept
        // (as orphan pipes) and read once the log takes more.
        if self.sink.is_over_cap() {
            return;
        }
        let w = &mut self.workers[i];
        let (pid, generation) = (w.pid, w.generation);
        let (lines, gens) = (&mut self.lines, &mut self.gens);
        lines.begin();
        for p in w.pipes.iter_mut() {
            let tag = lines.tag(pid.as_raw(), generation, p.stream.as_str());
            p.pump_while(drain, |line| {
                let text = lines.push(line, &tag);
                // The machine keeps the last lines for failure reports.
                gens.remember(pid, &text);
                lines.has_room()
            });
        }
        lines.flush();
    }

    pub(super) fn read_notify(&mut self) {
        for msg in self.notify.receive() {
            let pid = match self.gens.worker(msg.pid) {
                Some(_) => Some(msg.pid),
                None => nix::unistd::getpgid(Some(msg.pid))
                    .ok()
                    .filter(|&pgid| self.gens.worker(pgid).is_some_and(|w| w.state.is_alive())),
            };
            let Some(pid) = pid else {
                debug!(self.log, "notify message from a process that is not a worker; ignored"; "sender" => msg.pid.as_raw());
                continue;
            };
            if let Some(status) = msg.get("STATUS") {
                debug!(self.log, "worker status"; "status" => status, "pid" => pid.as_raw());
                if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
                    w.status_text = Some(status.to_string());
                }
            }
            match msg.get("WATCHDOG") {
                Some("1") => self.event(Event::Watchdog { pid, trigger: false }),
                Some("trigger") => self.event(Event::Watchdog { pid, trigger: true }),
                _ => {}
            }
            if msg.get("STOPPING") == Some("1") {
                debug!(self.log, "worker is stopping"; "pid" => pid.as_raw());
            }
            if msg.get("READY") == Some("1") {
                let generation = self.workers.iter().find(|w| w.pid == pid).map(|w| w.generation);
                // ready = "listening" means what it says: READY=1 is the worker's opinion.
                if generation.is_none_or(|g| self.ready_mode(g).takes_notify()) {
                    self.event(Event::WorkerReady { pid });
                } else {
                    debug!(self.log, "READY=1 ignored: ready = \"listening\""; "pid" => pid.as_raw());
                }
            }
        }
    }

    pub(super) fn pump_pipes(&mut self, ready: &[RawFd]) {
        // The sink step: write what the log did not take before (it polled writable, or a
        // file's disk has room again), before reading more.
        self.sink.write_pending();
        self.limit_orphan_pipes();
        // Stop reading once the log is full; each turn starts with another worker, so that a
        // slow log starves none of them.
        let n = self.workers.len();
        let first = self.lines.next_turn(n);
        for k in 0..n {
            if self.sink.is_full() {
                return;
            }
            let i = (first + k) % n;
            if self.workers[i]
                .pipes
                .iter()
                .any(|p| ready.binary_search(&p.raw_fd()).is_ok())
            {
                self.drain_worker(i, false);
            }
        }
        let lines = &mut self.lines;
        let sink = &self.sink;
        lines.begin();
        self.orphan_pipes.retain_mut(|(pid, generation, p)| {
            if ready.binary_search(&p.raw_fd()).is_ok() && !sink.is_full() {
                let tag = lines.tag(pid.as_raw(), *generation, p.stream.as_str());
                p.pump_while(false, |line| {
                    lines.push(line, &tag);
                    lines.has_room()
                });
            }
            !p.is_eof()
        });
        lines.flush();
    }

    /// At most [`MAX_ORPHAN_PIPES`] pipes of exited workers are kept open for their
    /// descendants; beyond that the oldest is read one last time and closed.
    pub(super) fn limit_orphan_pipes(&mut self) {
        while self.orphan_pipes.len() > MAX_ORPHAN_PIPES {
            let (pid, generation, mut p) = self.orphan_pipes.remove(0);
            let tag = self.lines.tag(pid.as_raw(), generation, p.stream.as_str());
            let lines = &mut self.lines;
            lines.begin();
            p.pump(true, |line| {
                lines.push(line, &tag);
            });
            p.finish(|line| {
                lines.push(line, &tag);
            });
            lines.flush();
            warn!(self.log, "too many log pipes held open by exited workers' descendants: closing the oldest";
                "max" => MAX_ORPHAN_PIPES, "stream" => p.stream.as_str(), "generation" => generation, "pid" => pid.as_raw());
        }
    }
}
