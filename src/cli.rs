//! The command line, as clap definitions. Shell completions and the man page are generated
//! from these same definitions.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "zdd",
    version,
    about = "Zero-downtime restarts for any server: a master keeps the listening sockets, workers come and go",
    after_help = "Signals to the master: HUP reload, TERM/INT graceful stop (a second one kills at once), USR1 reopen logs."
)]
pub struct Cli {
    /// Config file
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        env = "ZDD_CONFIG",
        default_value = "zdd.toml",
        value_name = "FILE"
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the master; returns once the first workers are ready
    Start {
        /// Stay in the foreground (for systemd Type=notify, containers and terminals)
        #[arg(long)]
        foreground: bool,
    },
    /// Validate the config without touching a running master (like nginx -t)
    Check,
}
