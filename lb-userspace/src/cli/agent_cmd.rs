//! run (the agent), upgrade.

use std::{net::SocketAddr, path::Path};

use anyhow::Context;
use lb::{
    agent::{AgentOptions, StartError},
    pin::PinDir,
};

use super::{print_json, CmdResult, Failure};

/// `--metrics`: an address, or "off".
pub fn metrics_addr(s: &str) -> Result<Option<SocketAddr>, Failure> {
    match s {
        "off" => Ok(None),
        m => m.parse().map(Some).map_err(|_| {
            Failure::Usage(format!(
                "invalid --metrics address {m:?} (e.g. 127.0.0.1:9650, or off)"
            ))
        }),
    }
}

pub fn run(opts: AgentOptions) -> CmdResult {
    // Logs go to stderr (the journal, under systemd); RUST_LOG sets the level.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal (not in the journal or a log file).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(lb::agent::run(opts)).map_err(|e| match e {
        StartError::Config(c) => Failure::Usage(c.to_string()),
        StartError::Unreadable(m) => Failure::Usage(m),
        StartError::Runtime(e) => Failure::from(e),
    })
}

pub fn upgrade(dir: &PinDir, object: Option<&Path>, json: bool) -> CmdResult {
    let bytes;
    let object: &[u8] = match object {
        Some(p) => {
            bytes = std::fs::read(p)
                .with_context(|| format!("reading {}", p.display()))
                .map_err(|e| Failure::Usage(format!("{e:#}")))?;
            &bytes
        }
        None => lb::object::LB_XDP_OBJECT,
    };
    let u = dir.upgrade(object)?;
    if json {
        print_json(&u);
    } else {
        outln!(
            "upgraded: program {} -> {} on {} (maps, conntrack and counters kept)",
            u.old_program_id,
            u.new_program_id,
            if u.interfaces.is_empty() {
                "no interface".to_string()
            } else {
                u.interfaces.join(", ")
            }
        );
    }
    Ok(())
}
