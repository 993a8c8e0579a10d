//! The command line, as clap definitions. Shell completions (`zdd completions SHELL`) and the
//! man page (`zdd man`) are generated from these same definitions.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "zdd",
    version,
    about = "Zero-downtime restarts for any server: a master keeps the listening sockets, workers come and go",
    disable_help_subcommand = true,
    after_help = "Signals to the master: HUP reload, TERM/INT/QUIT graceful stop (a second one kills at once), \
                  USR1 reopen logs, USR2 upgrade.\nExit codes: 0 success, 1 action failed, 2 usage or config error, 3 master not running."
)]
pub struct Cli {
    /// Config file [default: $ZDD_CONFIG, else ./zdd.toml]
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        env = "ZDD_CONFIG",
        default_value = "zdd.toml",
        hide_default_value = true,
        hide_env = true,
        value_name = "FILE"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the master; returns once the first workers are ready
    Start {
        /// Stay in the foreground (systemd Type=notify, containers, terminals)
        #[arg(long)]
        foreground: bool,
    },
    /// Re-read the config and replace the workers; returns when the new generation serves
    Reload {
        /// Reload only if generation N is the one serving
        #[arg(long, value_name = "N")]
        if_generation: Option<u64>,
        /// Give up waiting after this long (the reload itself goes on)
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        timeout: Option<Duration>,
    },
    /// Stop gracefully; returns when the master has exited
    Stop {
        /// Give up waiting after this long ("90s", "2m")
        #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
        timeout: Option<Duration>,
    },
    /// Show the master, its generation, workers and listeners
    Status {
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Re-execute the master's binary in place (a new zdd version), keeping sockets and workers
    Upgrade {
        /// Give up waiting after this long (the new binary's check takes at most 10s)
        #[arg(long, value_parser = parse_duration, value_name = "DURATION", default_value = "60s")]
        timeout: Duration,
    },
    /// Asked of a new binary by the running master before an upgrade: can it read this
    /// hand-over state version? (Internal.)
    #[command(hide = true)]
    UpgradeCheck {
        #[arg(long, value_name = "N")]
        state_version: u32,
    },
    /// Validate the config without touching a running master (like nginx -t)
    Check,
    /// Reopen the log file (for logrotate)
    ReopenLogs,
    /// Print a shell completion script
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff): zdd(1), or a command's own page (zdd-start(1), …)
    Man {
        /// The command whose page to print
        command: Option<String>,
    },
}
