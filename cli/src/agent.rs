//! `unid agent`. (Being built; see the issue tracker.)

/// Options of `unid agent`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `unid agent`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`unid agent` is not built yet")
}
