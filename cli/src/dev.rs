//! `unid dev`. (Being built; see the issue tracker.)

/// Options of `unid dev`.
#[derive(clap::Args, Debug)]
pub struct Args {}

/// Runs `unid dev`.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`unid dev` is not built yet")
}
