//! The `lb` command: parse, run one command against the pinned state, report.

/// `print!` into the command's output buffer (`output`), written out after the pin-directory
/// lock is given up.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::cli::output::write(format_args!($($t)*))
    };
}

/// `println!` into the command's output buffer.
macro_rules! outln {
    () => {
        $crate::cli::output::write(format_args!("\n"))
    };
    ($($t:tt)*) => {
        $crate::cli::output::write(format_args!("{}\n", format_args!($($t)*)))
    };
}

mod agent_cmd;
mod args;
mod config_cmd;
mod docs;
mod lifecycle;
mod observe;
pub(crate) mod output;
mod services;
mod table_fmt;

use std::process::ExitCode;

use clap::Parser;
use lb::{pin::PinDir, LbError};

pub use args::Cli;
use args::Command;

/// A failed command: its message and whether it was the user's input (exit 2) or the world
/// (exit 1).
pub enum Failure {
    Usage(String),
    Runtime(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        // Library errors about the input itself are usage errors.
        if let Some(lb) = e.downcast_ref::<LbError>() {
            if is_usage(lb) {
                return Failure::Usage(lb.to_string());
            }
        }
        if let Some(c) = e.downcast_ref::<lb::config::ConfigError>() {
            return Failure::Usage(c.to_string());
        }
        Failure::Runtime(e)
    }
}

impl From<LbError> for Failure {
    fn from(e: LbError) -> Self {
        Failure::from(anyhow::Error::new(e))
    }
}

fn is_usage(e: &LbError) -> bool {
    matches!(
        e,
        LbError::DuplicateBackend(_)
            | LbError::FamilyMismatch { .. }
            | LbError::DsrPort { .. }
            | LbError::StatelessReverseNeedsHash(_)
            | LbError::WeightOutOfRange(_)
            | LbError::TableSizeNotPrime(_)
            | LbError::TableSizeOutOfRange { .. }
            | LbError::TableTooSmall { .. }
            | LbError::SourcePrefixTooLong { .. }
            | LbError::RoundRobinTooLong { .. }
            | LbError::LeastConnNeedsTcp(_)
            | LbError::TooManyVipsPerBackend { .. }
            | LbError::StatelessBackendShared { .. }
            | LbError::TimeoutOutOfRange { .. }
    )
}

pub type CmdResult = Result<(), Failure>;

pub fn main() -> ExitCode {
    let cli = Cli::parse(); // exits with 2 on a usage error
    let r = run(cli);
    // The lock is given up by now: a reader paged through `less` blocks nobody.
    let _ = output::flush_or_exit();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(msg)) => {
            eprintln!("lb: error: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("lb: error: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}

/// "outer: inner: innermost", without repeating a cause that the outer message already says.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

/// Commands that only read the pinned state: they share the lock (and print after giving it
/// up, like every command).
fn reads_only(c: &Command) -> bool {
    use args::{BackendCommand, DecapCommand, NexthopCommand, VipCommand};
    matches!(
        c,
        Command::Status
            | Command::Stats { .. }
            | Command::Flows { sweep: false, .. }
            | Command::Table { .. }
            | Command::ShowConfig
            | Command::Check
            | Command::Vip(VipCommand::List)
            | Command::Backend(BackendCommand::List { .. })
            | Command::Nexthop(NexthopCommand::Show)
            | Command::Decap(DecapCommand::Status)
    )
}

fn run(cli: Cli) -> CmdResult {
    // Documentation of the command line itself: no state, no privileges.
    match &cli.command {
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "lb", &mut out);
            out!("{}", String::from_utf8_lossy(&out));
            return Ok(());
        }
        Command::Manpages { dir } => return Ok(docs::manpages(dir)?),
        // Takes no lock: `lb detach`, which runs it, holds the pin directory's.
        Command::WithdrawRecorded { pin_dir, forget } => {
            if *forget {
                lb::announce::forget_record_here(pin_dir)?;
            } else if lb::announce::withdraw_recorded_here(pin_dir)? {
                out!("{}", lb::announce::WITHDREW);
            }
            return Ok(());
        }
        _ => {}
    }
    // No root needed: what loads a program checks its capabilities (`privileges`); the rest
    // needs access to the pin directory, which `PinDir::open` checks.
    let json = cli.json;
    // The agent takes the pin-directory lock only while it writes.
    if let Command::Run {
        file,
        metrics,
        attach,
        mode,
        poll,
        bird_include,
        bird_socket,
        withdraw_on_exit,
        sizes,
    } = cli.command
    {
        let opts = lb::agent::AgentOptions {
            config: file,
            pin_dir: cli.pin_dir,
            metrics: agent_cmd::metrics_addr(&metrics)?,
            attach,
            mode: lifecycle::attach_mode(mode),
            load: sizes.load_options(),
            poll,
            bird: bird_include.zip(bird_socket),
            withdraw_on_exit,
        };
        return agent_cmd::run(opts);
    }
    let mut dir = if reads_only(&cli.command) {
        PinDir::open_shared(&cli.pin_dir)?
    } else {
        PinDir::open(&cli.pin_dir)?
    };
    match cli.command {
        Command::Attach {
            ifaces,
            mode,
            sizes,
            hash_seed,
            flood_threshold,
            nexthop_max_age_ms,
        } => lifecycle::attach(
            &dir,
            &ifaces,
            mode,
            sizes,
            lifecycle::Global {
                hash_seed,
                flood_threshold,
                nexthop_max_age_ms,
            },
            json,
        ),
        Command::Detach { ifaces, purge } => lifecycle::detach(dir, &ifaces, purge),
        Command::Status => lifecycle::status(&dir, json),
        Command::Vip(c) => services::vip(&dir, c, json),
        Command::Backend(c) => services::backend(&mut dir, c, json),
        Command::Stats { watch } => observe::stats(&mut dir, watch, json),
        Command::Flows { vip, sweep } => observe::flows(&dir, vip, sweep, json),
        Command::Table { vip, digest: true } => observe::digest(&dir, &vip, json),
        Command::Table { vip, .. } => observe::table(&dir, &vip, json),
        Command::Nexthop(c) => services::nexthop(&dir, c, json),
        Command::Apply { file, sizes } => config_cmd::apply(&dir, &file, sizes),
        Command::ShowConfig => config_cmd::show(&dir),
        Command::Check => config_cmd::check(&dir, json),
        Command::Decap(c) => lifecycle::decap(&dir, c, json),
        Command::Upgrade { object } => agent_cmd::upgrade(&dir, object.as_deref(), json),
        Command::Run { .. }
        | Command::Completions { .. }
        | Command::Manpages { .. }
        | Command::WithdrawRecorded { .. } => {
            unreachable!("handled above")
        }
    }
}

/// Prints `rows` as JSON, or as a table with `headers` and the cells `cells` gives each row.
pub fn print_rows<T: serde::Serialize>(
    json: bool,
    rows: &[T],
    headers: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) {
    if json {
        print_json(&rows);
    } else {
        let cells: Vec<Vec<String>> = rows.iter().map(cells).collect();
        table_fmt::print(headers, &cells);
    }
}

/// Prints a serializable value as JSON.
pub fn print_json(v: &impl serde::Serialize) {
    outln!("{}", serde_json::to_string_pretty(v).expect("serializable"));
}
