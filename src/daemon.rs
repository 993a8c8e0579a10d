//! `zdd start` without `--foreground`: bind everything on the operator's terminal, then
//! daemonize and wait for the master's start-up report.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::errno::{describe, describe_io};

/// `zdd start` without `--foreground`.
///
/// Everything that can fail on the operator's terminal happens before detaching: the config is
/// read, the pid file locked, the notify and control sockets and every listener bound. Then
/// the process daemonizes (daemonize crate: fork, setsid, fork) and the invoking process waits
/// on a pipe until the master reports `ready` (exit 0) or `failed <reason>` (exit 1). It never
/// returns 0 for a master that dies during start-up: EOF without a report is a failure too.
pub fn start_daemon(config_path: &Path) -> Result<u8, crate::master::StartError> {
    use crate::master::{Master, StartError};

    let config = crate::config::load(config_path)?;
    // The master re-reads its config on reload, from wherever its cwd is then.
    let abs = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let config = crate::config::Config { path: abs, ..config };
    let stderr_is_file = nix::sys::stat::fstat(2).is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFREG);
    let log_to_stderr = matches!(config.master.log, crate::config::LogTarget::Stderr);
    // The daemon keeps the invoking stderr only to log there, and only if it is a file: a
    // terminal goes away and a pipe would keep its reader waiting for EOF forever.
    let keep_stderr = log_to_stderr && stderr_is_file;
    // Logging to a terminal (or a pipe) that the daemon leaves behind would lose every line:
    // the daemon logs to a file beside its control socket instead, and says where.
    let default_file = (log_to_stderr && !stderr_is_file).then(|| default_log_file(&config.master.control_socket));
    let target = match &default_file {
        Some(path) => {
            crate::pidfile::ensure_parent(path).map_err(|e| {
                StartError::Other(format!(
                    "creating the directory of {}: {}",
                    path.display(),
                    describe_io(&e)
                ))
            })?;
            crate::config::LogTarget::File(path.clone())
        }
        None => config.master.log.clone(),
    };
    let (log, sink) = crate::log::build(&target, config.master.log_format)
        .map_err(|e| StartError::Other(format!("opening log {}: {}", target, describe_io(&e))))?;
    let mut master = Master::start(config, log, sink)?;
    let (report_r, report_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| StartError::Other(format!("pipe: {}", describe(e))))?;
    // SAFETY: umask only reads and restores this process's file-creation mask.
    let umask = unsafe {
        let m = nix::libc::umask(0o022);
        nix::libc::umask(m);
        m
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let stderr = if keep_stderr {
        daemonize::Stdio::keep()
    } else {
        daemonize::Stdio::devnull()
    };
    let outcome = daemonize::Daemonize::new()
        .working_directory(cwd)
        .umask(umask as u32)
        .stdout(daemonize::Stdio::devnull())
        .stderr(stderr)
        .execute();
    match outcome {
        daemonize::Outcome::Parent(Ok(_)) => {
            drop(report_w);
            // The daemon owns the pid file and sockets now: nothing of them is ours to remove.
            std::mem::forget(master);
            // The daemon writes its report and closes the pipe (or dies, which closes it too).
            let mut line = String::new();
            let _ = File::from(report_r).read_to_string(&mut line);
            let line = line.trim_end();
            if let Some(rest) = line.strip_prefix("ready ") {
                match &default_file {
                    Some(path) => println!("zdd: started: {rest}; log: {}", path.display()),
                    None => println!("zdd: started: {rest}"),
                }
                Ok(0)
            } else if let Some(reason) = line.strip_prefix("failed ") {
                Err(StartError::Other(format!("start failed: {reason}")))
            } else {
                Err(StartError::Other(
                    "start failed: the master exited during start-up without a report".into(),
                ))
            }
        }
        daemonize::Outcome::Parent(Err(e)) => Err(StartError::Other(format!("daemonize: {e}"))),
        daemonize::Outcome::Child(Ok(_)) => {
            drop(report_r);
            let mut report = File::from(report_w);
            if let Err(e) = master.daemonized(report.try_clone().unwrap_or_else(|_| std::process::exit(1))) {
                let _ = writeln!(report, "failed {e}");
                std::process::exit(1);
            }
            drop(report);
            std::process::exit(master.run())
        }
        daemonize::Outcome::Child(Err(e)) => {
            let mut report = File::from(report_w);
            let _ = writeln!(report, "failed daemonize: {e}");
            drop(master);
            std::process::exit(1)
        }
    }
}

/// Where a daemon whose `[master] log` is stderr, not a file, logs: beside its control socket,
/// named after it (`/run/zdd/app.sock` → `/run/zdd/app.log`).
fn default_log_file(control_socket: &Path) -> PathBuf {
    control_socket.with_extension("log")
}
