//! `cargo xtask setup` (placeholder).

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("cargo xtask setup: not written yet")
}
