//! `vmfork fuzz`: fork the `harness` guest once at its entry point (or restore a snapshot of a
//! guest that takes input the harness's way) and fuzz it.

use crate::CliResult;
use clap::Args;
use guests::layout::{mailbox, INPUT, INPUT_MAX, MAILBOX};
use guests::Workload;
use std::time::Duration;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::fuzz::{fuzz, FuzzConfig};
use vmfork::{ForkOptions, Snapshot, Vm, VmConfig};

#[derive(Args)]
pub struct FuzzArgs {
    /// Stop after this many executions.
    #[arg(long, default_value_t = 1_000_000)]
    pub execs: u64,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    pub seconds: f64,
    /// Seed of the mutation RNG.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Keep going after the first crash.
    #[arg(long)]
    pub keep_going: bool,
    /// Fuzz a restore of this snapshot instead (devices-less, interrupts blocked, reset to the
    /// snapshot after every input); its guest reads input the `harness` way (bytes at the
    /// input area, length in the mailbox).
    #[arg(long)]
    pub snapshot: Option<std::path::PathBuf>,
}

/// Builds the harness VM and a devices-less, interrupt-less fork of it at its entry point.
pub fn harness_target() -> CliResult<(Vm, Vm)> {
    let config = VmConfig {
        mem_bytes: 64 << 20,
        irqchip: false,
        ..VmConfig::default()
    };
    let parent = Vm::boot(
        config,
        SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(Workload::Harness.elf())),
    )
    .map_err(|e| e.to_string())?;
    let target = parent
        .fork(&fuzz_fork_options())
        .map_err(|e| e.to_string())?;
    Ok((parent, target))
}

/// A fuzzing target has no devices and no interrupts: runs depend on the input alone.
fn fuzz_fork_options() -> ForkOptions {
    ForkOptions {
        no_devices: true,
        block_interrupts: true,
        ..ForkOptions::default()
    }
}

pub fn harness_fuzz_config(execs: u64, seconds: f64, seed: u64, stop_on_crash: bool) -> FuzzConfig {
    FuzzConfig {
        input_addr: INPUT,
        input_len_addr: MAILBOX + mailbox::INPUT_LEN,
        max_input: 64.min(INPUT_MAX as usize),
        max_execs: execs,
        max_time: Duration::from_secs_f64(seconds),
        stop_on_crash,
        seed,
    }
}

pub fn run(args: FuzzArgs) -> CliResult<u8> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Err(format!("--seconds {} must be positive", args.seconds));
    }
    let (_parent, target) = match &args.snapshot {
        Some(path) => {
            let snapshot = Snapshot::open(path).map_err(|e| e.to_string())?;
            let target = snapshot
                .restore_with(SerialSink::Discard, &fuzz_fork_options())
                .map_err(|e| e.to_string())?;
            (None, target)
        }
        None => {
            let (parent, target) = harness_target()?;
            (Some(parent), target)
        }
    };
    let config = harness_fuzz_config(args.execs, args.seconds, args.seed, !args.keep_going);
    let report = fuzz(&target, &config).map_err(|e| e.to_string())?;
    println!(
        "{} execs in {:.2?} = {:.0} execs/s; corpus {}; exit codes {:?}",
        report.execs,
        report.elapsed,
        report.execs_per_sec(),
        report.corpus_size,
        report.exit_codes
    );
    for (input, what) in &report.crashes {
        println!(
            "crash: input {:?} ({}): {what}",
            String::from_utf8_lossy(input),
            hex(input)
        );
    }
    Ok(if report.crashes.is_empty() { 0 } else { 1 })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
