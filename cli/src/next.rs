//! `unid next`. (Being built; see the issue tracker.)

/// Options of `unid next`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `unid next`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`unid next` is not built yet")
}
