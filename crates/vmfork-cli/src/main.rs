//! `vmfork`: run, fork, reset, snapshot and benchmark VMs from the command line.

mod bench;
mod client;
mod control;
mod demo;
mod fuzz;
mod guest_args;
mod interrupt;
mod run;
mod serve;
mod snapshot;
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
    /// Do not confine vmfork's threads with seccomp filters (they are on by default: vCPU
    /// threads may only make KVM ioctls and a few more calls, VMM threads what they need).
    #[arg(long, global = true)]
    no_seccomp: bool,
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
    /// The main job on the built-in guests: boot, pause, fork, reset, snapshot, restore, timed.
    Demo,
    /// Fuzz the `harness` guest: fork once at its entry, then write input, run, reset, repeat.
    Fuzz(fuzz::FuzzArgs),
    /// Benchmarks; `--json` prints one JSON object per suite.
    Bench {
        #[command(subcommand)]
        suite: bench::Suite,
    },
    /// Host VMs behind the control API until Ctrl-C (`POST /vms` boots new ones).
    Serve(serve::ServeArgs),
    /// Fork a VM of a running vmfork process; prints the children's ids.
    Fork(control::ForkArgs),
    /// Put a fork back to the instant it was forked.
    Reset(control::ResetArgs),
    /// Pause a VM.
    Pause(control::VmArg),
    /// Resume a paused VM, or start a fork made with --paused.
    Resume(control::VmArg),
    /// Destroy a VM (its forks live on).
    Destroy(control::VmArg),
    /// The VM family tree with each VM's state and private memory.
    Ls(control::SocketArg),
    /// Snapshot a VM of a running vmfork process into a directory; or `snapshot info|verify|merge`.
    Snapshot(snapshot::SnapshotArgs),
    /// Restore a snapshot into N VMs and run them (like `run`); `-` reads a stream from stdin.
    Restore(snapshot::RestoreArgs),
    /// Show (or --set) a paused VM's registers.
    Regs(control::RegsArgs),
    /// Read or write guest memory, physical or --virtual.
    Mem {
        #[command(subcommand)]
        action: control::MemAction,
    },
    /// Print what a VM wrote to its serial console (forks and `serve` VMs keep it in memory).
    Console(control::VmArg),
    /// Give a fork made with --no-devices its devices, as they were at the fork.
    AttachDevices(control::VmArg),
}

#[derive(Subcommand)]
enum GuestsAction {
    /// Write a built-in guest as an ELF (bootable by vmfork, QEMU `-M microvm -kernel`, ...).
    Export {
        name: String,
        file: std::path::PathBuf,
        /// A mailbox parameter baked into the ELF, as INDEX=VALUE (loaded with the guest).
        #[arg(long = "param", value_parser = guest_args::parse_param)]
        params: Vec<(u64, u64)>,
    },
}

/// `vmfork ls | head -1`: printing to a pipe whose reader has gone ends the process quietly with
/// status 141 (128 + SIGPIPE, what a shell reports for a Unix tool killed writing to a closed
/// pipe) instead of a panic. Rust ignores SIGPIPE, so `println!` panics there instead.
fn exit_quietly_when_stdout_closes() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(i32::from(run::CONSOLE_CLOSED_STATUS));
        }
        default_hook(info)
    }));
}

fn main() -> ExitCode {
    exit_quietly_when_stdout_closes();
    let cli = Cli::parse();
    if cli.no_seccomp {
        vmfork::confine::seccomp::set_enabled(false);
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Guests { action } => guests_command(action),
        Command::Demo => demo::demo(),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Bench { suite } => bench::run(suite),
        Command::Serve(args) => serve::serve(args),
        Command::Fork(args) => control::fork(args),
        Command::Reset(args) => control::reset(args),
        Command::Pause(args) => control::simple(args, "pause"),
        Command::Resume(args) => control::simple(args, "resume"),
        Command::Destroy(args) => control::simple(args, "destroy"),
        Command::Ls(sock) => control::ls(sock),
        Command::Regs(args) => control::regs(args),
        Command::Snapshot(args) => snapshot::snapshot(args),
        Command::Restore(args) => snapshot::restore(args),
        Command::Mem { action } => control::mem(action),
        Command::Console(args) => control::console(args),
        Command::AttachDevices(args) => control::simple(args, "attach-devices"),
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
        Some(GuestsAction::Export { name, file, params }) => {
            let w = guest_args::workload(&name)?;
            let elf = if params.is_empty() {
                w.elf()
            } else {
                w.elf_with_params(&params)
            };
            std::fs::write(&file, &elf)
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            println!("wrote {} ({} bytes)", file.display(), elf.len());
            Ok(0)
        }
    }
}
