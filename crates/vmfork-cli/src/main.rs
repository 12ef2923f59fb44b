//! `vmfork`: run, fork, reset, snapshot and benchmark VMs from the command line.

mod bench;
mod demo;
mod fuzz;
mod guest_args;
mod interrupt;
mod run;
mod units;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "vmfork",
    version,
    about = "A KVM VMM that forks, resets, snapshots and migrates VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a VM in the foreground; exits with the guest's exit code.
    Run(run::RunArgs),
    /// List the built-in test guests, or export one as an ELF.
    Guests {
        #[command(subcommand)]
        action: Option<GuestsAction>,
    },
    /// The main job on the built-in guests: boot, pause, inspect, fork, reset, with timings.
    Demo,
    /// Fuzz the `harness` guest: fork once at its entry, then write input, run, reset, repeat.
    Fuzz(fuzz::FuzzArgs),
    /// Benchmarks; `--json` prints one JSON object per suite.
    Bench {
        #[command(subcommand)]
        suite: bench::Suite,
    },
}

#[derive(Subcommand)]
enum GuestsAction {
    /// Write a built-in guest as an ELF (bootable by vmfork, QEMU `-M microvm -kernel`, ...).
    Export {
        name: String,
        file: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Guests { action } => guests_command(action),
        Command::Demo => demo::demo(),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Bench { suite } => bench::run(suite),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vmfork: error: {e}");
            ExitCode::from(1)
        }
    }
}

/// Errors the CLI prints; every message is one line meant for a person.
pub type CliResult<T> = Result<T, String>;

fn guests_command(action: Option<GuestsAction>) -> CliResult<u8> {
    match action {
        None => {
            for w in guests::Workload::ALL {
                println!("{:<9} {}", w.name(), w.description());
            }
            Ok(0)
        }
        Some(GuestsAction::Export { name, file }) => {
            let w = guest_args::workload(&name)?;
            std::fs::write(&file, w.elf())
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            println!("wrote {} ({} bytes)", file.display(), w.elf().len());
            Ok(0)
        }
    }
}
