//! `unid status`. (Being built; see the issue tracker.)

/// Options of `unid status`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `unid status`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`unid status` is not built yet")
}
