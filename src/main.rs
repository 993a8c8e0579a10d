//! zdd: a supervisor that gives any server zero-downtime restarts.
//!
//! `main` is thin: parse the command line, dispatch, print the error once, map it to the
//! documented exit code (0 success, 1 action failed, 2 usage or config error, 3 master not
//! running).

// An abort in the master is an outage (its workers die with it; release builds abort on
// panic): nothing reachable from the config, the control socket, the environment or a worker
// may panic. Tests may.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

mod cli;
mod clock;
mod config;
mod control;
mod daemon;
mod errno;
mod listen;
mod log;
mod master;
mod metrics;
mod pidfile;
mod portholder;
mod sockfile;
mod worker;

use std::io::Write;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};

use control::{client, Request};

/// An error with the exit code it maps to.
struct CliError {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl ToString) -> CliError {
    CliError {
        code,
        message: message.to_string(),
    }
}

impl From<client::ClientError> for CliError {
    fn from(e: client::ClientError) -> CliError {
        fail(e.exit_code(), e)
    }
}

impl From<master::StartError> for CliError {
    fn from(e: master::StartError) -> CliError {
        match e {
            master::StartError::Config(_) => fail(2, e),
            e => fail(1, e),
        }
    }
}

/// Print to stdout; a closed stdout (`zdd status | head -1`) is not an error.
fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|_| o.flush());
}

fn progress(message: &str) {
    out(&format!("zdd: {message}\n"));
}

/// The master's answer, judged: a negative result is a failure (exit 1) with the master's
/// message and, for a failed reload, the failed worker's last log lines.
fn judged(o: client::Outcome) -> Result<client::Outcome, CliError> {
    if o.ok {
        return Ok(o);
    }
    let mut msg = o.message;
    for line in o.data["tail"].as_array().into_iter().flatten() {
        msg.push_str(&format!("\n  | {}", line.as_str().unwrap_or_default()));
    }
    Err(fail(1, msg))
}

/// Status and reopen-logs answer at once; this only guards against a wedged master.
const QUICK: Option<std::time::Duration> = Some(std::time::Duration::from_secs(30));

fn load(cli: &Cli) -> Result<config::Config, CliError> {
    config::load(&cli.config).map_err(|e| fail(2, e))
}

fn load_master(cli: &Cli) -> Result<config::MasterConfig, CliError> {
    config::load_master(&cli.config).map_err(|e| fail(2, e))
}

/// A reload re-reads the master's own config file: refuse one asked with another file (that
/// names the same control socket) instead of validating one file and reloading another.
fn same_config_as_the_master(c: &config::Config) -> Result<(), CliError> {
    let o = judged(client::call(&c.master, &Request::Status {}, QUICK, |_| {})?)?;
    let Some(theirs) = o.data["config"].as_str() else {
        return Ok(());
    };
    let ours = std::fs::canonicalize(&c.path).unwrap_or_else(|_| c.path.clone());
    let theirs_canonical = std::fs::canonicalize(theirs).unwrap_or_else(|_| theirs.into());
    if theirs_canonical == ours {
        return Ok(());
    }
    Err(fail(
        2,
        format!(
            "this master runs {theirs}, not {}: a reload re-reads the master's own file; edit that one, \
             or stop this master and start one with {}",
            ours.display(),
            ours.display()
        ),
    ))
}

fn run(cli: Cli) -> Result<u8, CliError> {
    match &cli.command {
        Command::Check => {
            let c = load(&cli)?;
            // A port taken now is no config error (the holder may be this config's running
            // master, or gone by the start), but start would fail on it: say so.
            for l in &c.listen {
                if let config::ListenAddr::Tcp(addr) = &l.addr {
                    if addr.port() != 0 && portholder::in_use(addr) {
                        eprintln!(
                            "zdd: warning: listener {:?}: port {} is in use now ({}); start fails on it unless \
                             that is this config's running master",
                            l.name,
                            addr.port(),
                            portholder::describe(addr)
                        );
                    }
                }
            }
            let plural = |n: usize| if n == 1 { "" } else { "s" };
            out(&format!(
                "{}: ok ({} listener{}, {} worker{})\n",
                cli.config.display(),
                c.listen.len(),
                plural(c.listen.len()),
                c.worker.count,
                plural(c.worker.count),
            ));
            Ok(0)
        }
        Command::Start { foreground: true } => Ok(master::run_foreground(&cli.config)? as u8),
        Command::Start { foreground: false } => Ok(daemon::start_daemon(&cli.config)?),
        Command::Reload { if_generation, timeout } => {
            // What the master will check itself: the worker's settings, not the [master] ones,
            // which a reload does not apply.
            let c = config::load_with(&cli.config, config::Checks::Reload).map_err(|e| fail(2, e))?;
            same_config_as_the_master(&c)?;
            let req = Request::Reload {
                if_generation: *if_generation,
            };
            let o = judged(client::call(&c.master, &req, *timeout, progress)?)?;
            progress(&o.message);
            Ok(0)
        }
        Command::Stop { timeout } => {
            let m = load_master(&cli)?;
            let deadline = timeout.map(clock::from_now);
            let o = client::call(&m, &Request::Stop {}, *timeout, progress).map_err(|e| match e {
                client::ClientError::Timeout(t) => fail(
                    1,
                    format!(
                        "the master is still running at the timeout ({}); it goes on stopping",
                        humantime::format_duration(t)
                    ),
                ),
                e => e.into(),
            });
            let o = judged(o?)?;
            let pid = o.data["pid"].as_i64().unwrap_or(0) as i32;
            client::wait_gone(o.reader, pid, deadline)?;
            progress(&o.message);
            Ok(0)
        }
        Command::Status { json } => {
            let m = load_master(&cli)?;
            let o = judged(client::call(&m, &Request::Status {}, QUICK, |_| {})?)?;
            if *json {
                out(&format!("{}\n", o.data));
            } else {
                out(&client::format_status(&o.data));
            }
            Ok(0)
        }
        Command::Upgrade { timeout } => {
            let m = load_master(&cli)?;
            let o = judged(client::call(&m, &Request::Upgrade {}, Some(*timeout), progress)?)?;
            progress(&o.message);
            Ok(0)
        }
        Command::UpgradeCheck { state_version } => match master::handover::check(*state_version) {
            Ok(line) => {
                out(&format!("{line}\n"));
                Ok(0)
            }
            Err(e) => Err(fail(1, e)),
        },
        Command::ReopenLogs => {
            let m = load_master(&cli)?;
            let o = judged(client::call(&m, &Request::ReopenLogs {}, QUICK, |_| {})?)?;
            progress(&o.message);
            Ok(0)
        }
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "zdd", &mut buf);
            out(&String::from_utf8_lossy(&buf));
            Ok(0)
        }
        Command::Man { command } => {
            let top = Cli::command();
            let page = match command {
                None => top,
                // zdd(1) refers to zdd-start(1) and the others: each is its command's page.
                Some(name) => {
                    let sub = top.find_subcommand(name).filter(|c| !c.is_hide_set()).ok_or_else(|| {
                        let names: Vec<&str> = top
                            .get_subcommands()
                            .filter(|c| !c.is_hide_set())
                            .map(|c| c.get_name())
                            .collect();
                        fail(2, format!("no command {name:?}; commands: {}", names.join(", ")))
                    })?;
                    sub.clone()
                        .name(format!("zdd-{name}"))
                        .bin_name(format!("zdd {name}"))
                        .version(env!("CARGO_PKG_VERSION"))
                }
            };
            let mut buf = Vec::new();
            clap_mangen::Man::new(page).render(&mut buf).map_err(|e| fail(1, e))?;
            out(&String::from_utf8_lossy(&buf));
            Ok(0)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("zdd: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
