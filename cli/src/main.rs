//! `unid`: one binary for every role. Each subcommand lives in its own module
//! with an `Args` (clap) and a `run(args) -> anyhow::Result<()>`.

mod agent;
mod cluster;
mod config;
mod dev;
mod logs;
mod next;
mod notify;
mod sequence;
mod server;
mod status;

use clap::{Parser, Subcommand};

/// unid: unique, increasing integer ids from a replicated cluster.
#[derive(Parser, Debug)]
#[command(name = "unid", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a server: a member of the Raft cluster that grants blocks over UDP.
    Server(server::Args),
    /// Run an agent: keeps shared-memory rings full of ids for this host's applications.
    Agent(agent::Args),
    /// Print ids, one per line, in decimal (from the local agent).
    Next(next::Args),
    /// Create, list and describe sequences.
    #[command(subcommand)]
    Sequence(sequence::Command),
    /// Show the cluster at a glance: servers, leader, agents, sequences.
    Status(status::Args),
    /// Add or remove servers while the cluster runs.
    #[command(subcommand)]
    Cluster(cluster::Command),
    /// Start a local cluster and an agent on 127.0.0.1 for development; Ctrl-C stops it all.
    Dev(dev::Args),
}

fn main() -> std::process::ExitCode {
    // First, while the process has one thread: takes NOTIFY_SOCKET (systemd's Type=notify)
    // out of the environment, so that no child process (`unid dev`'s) inherits it.
    let notifier = unid_engine::sd_notify::Notifier::from_env();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Server(args) => server::run(args, notifier),
        Command::Agent(args) => agent::run(args, notifier),
        Command::Next(args) => next::run(args),
        Command::Sequence(cmd) => sequence::run(cmd),
        Command::Status(args) => status::run(args),
        Command::Cluster(cmd) => cluster::run(cmd),
        Command::Dev(args) => dev::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("unid: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
