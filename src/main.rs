//! zdd: a supervisor that gives any server zero-downtime restarts.
//!
//! `main` is thin: parse the command line, dispatch, print the error once, map it to the
//! documented exit code (0 success, 1 action failed, 2 usage or config error, 3 master not
//! running).

mod cli;
mod config;
mod daemon;
mod errno;
mod listen;
mod log;
mod master;
mod notify;
mod relay;
mod spawn;
mod worker;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl ToString) -> Failure {
    Failure {
        code,
        message: message.to_string(),
    }
}

fn run(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Check => {
            let c = config::load(&cli.config).map_err(|e| fail(2, e))?;
            println!(
                "{}: ok ({} listener{}, {} worker{})",
                cli.config.display(),
                c.listen.len(),
                if c.listen.len() == 1 { "" } else { "s" },
                c.worker.count,
                if c.worker.count == 1 { "" } else { "s" },
            );
            Ok(0)
        }
        Command::Start { foreground } => {
            if !foreground {
                return Err(fail(
                    2,
                    "daemon mode is not available in this build; run `zdd start --foreground`",
                ));
            }
            match master::run_foreground(&cli.config) {
                Ok(code) => Ok(code as u8),
                Err(e @ master::StartError::Config(_)) => Err(fail(2, e)),
                Err(e) => Err(fail(1, e)),
            }
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
