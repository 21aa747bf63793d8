//! `unid server`. (Being built; see the issue tracker.)

/// Options of `unid server`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `unid server`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`unid server` is not built yet")
}
