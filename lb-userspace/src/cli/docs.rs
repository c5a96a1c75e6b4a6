//! The command line's own documentation: man pages generated from the clap definitions (the
//! shell completions are written by `lb completions`).

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::args::Cli;

/// Writes lb.1 and a page per subcommand (lb-vip.1, lb-vip-add.1, …) into `dir`.
pub fn manpages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    write_pages(dir, &cmd, "lb")?;
    outln!("wrote the man pages into {}", dir.display());
    Ok(())
}

/// The page of `cmd` (named `name`), then those of its visible subcommands.
fn write_pages(dir: &Path, cmd: &clap::Command, name: &str) -> Result<()> {
    // (clap takes static names; the generator runs once and exits.)
    let named = cmd.clone().name(&*String::leak(name.to_string()));
    let path = dir.join(format!("{name}.1"));
    let mut out = Vec::new();
    clap_mangen::Man::new(named)
        .render(&mut out)
        .context("rendering a man page")?;
    std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(dir, sub, &format!("{name}-{}", sub.get_name()))?;
    }
    Ok(())
}
