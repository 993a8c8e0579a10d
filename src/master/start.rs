//! The master's life at both ends: everything up to the first spawn (pid-file lock, signals,
//! notify and control sockets, listeners, adopted from systemd or bound), daemon mode's
//! start-up report, and the shut-down once the machine said the stop is over.

use super::*;
use crate::config::ListenAddr;

impl Master {
    /// Everything up to the first spawn: pid-file lock, signals, notify socket, listeners.
    /// An error here leaves nothing behind: whatever was created is dropped and removed.
    pub fn start(config: Config, log: Logger, sink: Sink) -> Result<Master, StartError> {
        let config = Rc::new(config);
        let m = &config.master;
        crate::worker::spawn::check_credentials(&config.worker).map_err(|e| StartError::Other(e.to_string()))?;
        let pid_file = PidFile::acquire(&m.pid_file)?;
        let worker_nofile = crate::errno::raise_nofile();
        if let (Some((soft, _)), Ok((now, _))) = (
            worker_nofile,
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE),
        ) {
            if now > soft {
                info!(log, "raised the master's open-file limit"; "workers_keep" => soft, "nofile" => now);
            }
        }
        // No master of this config lives now: what a crashed one left must not keep the ports.
        crate::worker::cgroup::clean_stale(&log, &m.pid_file);
        let cgroups = crate::worker::cgroup::Cgroups::none(&log);
        ensure_parent(&m.notify_socket).map_err(|e| {
            StartError::Other(format!(
                "create directory for {}: {}",
                m.notify_socket.display(),
                describe_io(&e)
            ))
        })?;
        let signals = Signals::install().map_err(|e| StartError::Other(format!("installing signal handlers: {e}")))?;
        let notify = NotifyServer::bind(&m.notify_socket, config.worker.credentials.as_ref().map(|c| c.uid))?;
        ensure_parent(&m.control_socket).map_err(|e| {
            StartError::Other(format!(
                "create directory for {}: {}",
                m.control_socket.display(),
                describe_io(&e)
            ))
        })?;
        let control = ControlServer::bind(&m.control_socket)?;
        // Sockets systemd passed to us (socket units, or its fd store after a crash of the
        // previous master) are adopted for the [[listen]] entries they match; the rest are
        // bound here.
        let (inherited, refused): (Vec<(Option<String>, OwnedFd)>, _) = crate::listen::take_systemd_sockets();
        for why in refused {
            warn!(log, "a socket passed by systemd cannot be a listener: {}", why);
        }
        let mut inherited = drop_duplicates(&log, inherited);
        // What systemd's fd store holds for us (if it came from there), by name and address:
        // the fd store's bookkeeping starts from it (fdstore.rs).
        let mut stored: Vec<(String, ListenAddr)> = Vec::new();
        let mut listeners = Vec::with_capacity(config.listen.len());
        for lc in &config.listen {
            let l = match adopt(&mut inherited, lc) {
                Some((name, fd)) => {
                    let l = Listener::from_state(fd, lc.addr.clone(), None, lc.backlog).with_opts(&lc.opts);
                    info!(log, "adopted socket from systemd"; "addr" => l.local_addr(), "name" => &lc.name,
                        "fdname" => name.as_deref().unwrap_or(""));
                    if let Some(name) = name {
                        stored.push((name, lc.addr.clone()));
                    }
                    l
                }
                None => {
                    let l = Listener::bind(lc)?;
                    if l.ipv4_fallback() {
                        warn!(log, "IPv6 is unavailable: a port-only listener listens on IPv4 only (0.0.0.0)"; "name" => &lc.name);
                    }
                    info!(log, "listening"; "addr" => l.local_addr(), "name" => &lc.name);
                    l
                }
            };
            listeners.push(Rc::new(l));
        }
        // After the listeners: a port in use is named like theirs (who holds it).
        let metrics = match &m.metrics {
            Some(addr) => {
                let server = crate::metrics::MetricsServer::bind(addr)?;
                info!(log, "serving metrics"; "addr" => server.listener().local_addr());
                Some(server)
            }
            None => None,
        };
        for (name, fd) in inherited {
            let addr = crate::listen::bound_addr(&fd);
            let same_name = name
                .as_deref()
                .and_then(|n| config.listen.iter().find(|lc| lc.name == n));
            match same_name {
                Some(lc) => {
                    warn!(log, "a socket passed by systemd is bound to another address than its [[listen]] entry now; closed (and released from systemd's fd store)";
                    "name" => &lc.name, "addr" => addr.as_ref().map(|a| a.to_string()).unwrap_or_default(), "config" => lc.addr.to_string())
                }
                None => {
                    warn!(log, "a socket passed by systemd matches no [[listen]] entry; closed (and released from systemd's fd store)";
                    "name" => name.as_deref().unwrap_or_default(), "addr" => addr.as_ref().map(|a| a.to_string()).unwrap_or_default())
                }
            }
            if let (Some(name), Some(addr)) = (name, addr) {
                stored.push((name, addr));
            }
        }
        let mut master = Master::assemble(Parts {
            gens: Generations::new(Params::of(&config), config.path.display().to_string()),
            log,
            sink,
            config,
            listeners,
            workers: Vec::new(),
            orphan_pipes: Vec::new(),
            signals,
            notify,
            control,
            cgroups,
            metrics,
            pid_file,
            started_at: Instant::now(),
            started_wall: SystemTime::now(),
            exe: crate::master::handover::own_exe(),
            worker_nofile,
            conns: BTreeMap::new(),
        });
        master.fdstore.set_stored(stored);
        Ok(master)
    }

    /// Daemon mode: after the fork, record the new pid and where to report the start-up.
    pub fn daemonized(&mut self, report: std::fs::File) -> Result<(), StartError> {
        self.pid_file.rewrite().map_err(|e| StartError::Other(e.to_string()))?;
        // Daemonizing replaced stderr: a log to stderr follows it.
        self.sink.reattach_stderr();
        self.start_report = Some(report);
        Ok(())
    }

    /// Tell a waiting `zdd start` how the start-up went (once): `ready …` or `failed …`.
    pub(super) fn report_start(&mut self, line: String) {
        let Some(mut f) = self.start_report.take() else { return };
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }

    /// Every worker is gone: the last log lines, the cgroups, the answer to `zdd stop`.
    pub(super) fn shut_down(mut self, code: i32) -> i32 {
        self.lines.begin();
        for (pid, generation, mut pipe) in std::mem::take(&mut self.orphan_pipes) {
            let tag = self.lines.tag(pid.as_raw(), generation, pipe.stream.as_str());
            let lines = &mut self.lines;
            pipe.pump(true, |line| {
                lines.push(line, &tag);
            });
            // A descendant still holds the pipe: its last, unfinished line is logged too.
            pipe.finish(|line| {
                lines.push(line, &tag);
            });
        }
        self.lines.flush();
        self.cgroups.shutdown();
        info!(self.log, "stopped"; "exit_code" => code);
        self.report_start("failed the master stopped during start-up".into());
        // What the log has not taken yet, within a deadline; the rest is counted as lost.
        self.sink.flush();
        let lost = self.sink.dropped_lines();
        let pid = std::process::id();
        let message = match lost {
            0 => format!("master pid {pid} stopped"),
            1 => format!("master pid {pid} stopped; 1 log line could not be written since it started"),
            n => format!("master pid {pid} stopped; {n} log lines could not be written since it started"),
        };
        for c in self.conns.values_mut().filter(|c| c.waiting == Some(Waiting::Stop)) {
            c.send_final(&Reply::ok(
                message.clone(),
                json!({ "pid": pid, "log_lines_lost": lost }),
            ));
        }
        code
    }
}

/// `zdd start --foreground`: load the config, run the master, return the exit code. After an
/// upgrade's exec, it resumes the master from the state handed over instead, or, if it cannot,
/// goes back to the old image.
pub fn run_foreground(config_path: &Path) -> Result<i32, StartError> {
    if let Some(taken) = handover::take_state() {
        let mut taken = match taken {
            Ok(t) => t,
            Err((reason, rollback)) => return Err(StartError::Other(roll_back(&reason, &rollback, &[]))),
        };
        let fds = taken.state.fds(-1);
        return match Master::prepare_resume(&mut taken.state) {
            Ok(prepared) => {
                let master = Master::resume(taken.state, prepared, taken.rolled_back);
                taken.rollback.done();
                Ok(master.run())
            }
            Err(reason) => Err(StartError::Other(roll_back(&reason, &taken.rollback, &fds))),
        };
    }
    let config = config::load(config_path)?;
    let (log, sink) = crate::log::build(&config.master.log, config.master.log_format)
        .map_err(|e| StartError::Other(format!("opening log {}: {}", config.master.log, describe_io(&e))))?;
    let master = Master::start(config, log, sink)?;
    Ok(master.run())
}

/// The passed socket for `lc`: the one with its name and address, else the one with its
/// address (whatever its name), removed from `inherited`. A socket with the entry's name but
/// another address is not adopted: the config changed since systemd stored it, and the config
/// says where to listen (a socket unit's address must match the config's).
fn adopt(
    inherited: &mut Vec<(Option<String>, OwnedFd)>,
    lc: &crate::config::ListenConfig,
) -> Option<(Option<String>, OwnedFd)> {
    let at = |fd: &OwnedFd| crate::listen::bound_addr(fd).is_some_and(|a| addr_matches(&lc.addr, &a));
    let i = inherited
        .iter()
        .position(|(name, fd)| name.as_deref() == Some(lc.name.as_str()) && at(fd))
        .or_else(|| inherited.iter().position(|(_, fd)| at(fd)))?;
    Some(inherited.remove(i))
}

/// Whether a socket bound to `bound` serves the config's `want`: the same address, or, for a
/// TCP entry with port 0 (any port), the same IP.
fn addr_matches(want: &ListenAddr, bound: &ListenAddr) -> bool {
    match (want, bound) {
        (ListenAddr::Tcp(w), ListenAddr::Tcp(b)) | (ListenAddr::Udp(w), ListenAddr::Udp(b)) if w.port() == 0 => {
            w.ip() == b.ip()
        }
        _ => want == bound,
    }
}

/// One fd per socket: a socket that systemd passes twice (a socket unit's, also kept in the fd
/// store) is adopted once; the copy is closed.
fn drop_duplicates(log: &Logger, inherited: Vec<(Option<String>, OwnedFd)>) -> Vec<(Option<String>, OwnedFd)> {
    let mut seen = Vec::new();
    let mut out = Vec::with_capacity(inherited.len());
    for (name, fd) in inherited {
        let id = nix::sys::stat::fstat(fd.as_raw_fd())
            .ok()
            .map(|st| (st.st_dev, st.st_ino));
        match id {
            Some(id) if seen.contains(&id) => {
                info!(log, "a socket passed by systemd twice is adopted once"; "name" => name.unwrap_or_default());
            }
            _ => {
                seen.extend(id);
                out.push((name, fd));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_entry_with_port_0_matches_any_port_of_its_ip() {
        let a = |s: &str| ListenAddr::Tcp(s.parse().unwrap());
        assert!(addr_matches(&a("127.0.0.1:0"), &a("127.0.0.1:4242")));
        assert!(!addr_matches(&a("127.0.0.1:0"), &a("0.0.0.0:4242")));
        assert!(addr_matches(&a("127.0.0.1:80"), &a("127.0.0.1:80")));
        assert!(!addr_matches(&a("127.0.0.1:80"), &a("127.0.0.1:81")));
        let u = |p: &str| ListenAddr::Unix(p.into());
        assert!(addr_matches(&u("/run/a.sock"), &u("/run/a.sock")));
        assert!(!addr_matches(&u("/run/a.sock"), &u("/run/b.sock")));
    }
}
