//! `unid sequence ...`. (Being built; see the issue tracker.)

/// `unid sequence` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// List sequences.
    List,
}

/// Runs a `unid sequence` subcommand.
pub fn run(_cmd: Command) -> anyhow::Result<()> {
    anyhow::bail!("`unid sequence` is not built yet")
}
