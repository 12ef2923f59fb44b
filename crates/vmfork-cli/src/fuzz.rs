//! `vmfork fuzz`: fork a built-in target guest (or a restored snapshot) once at its entry and
//! fuzz it with coverage breakpoints, timeouts, crash triage and an on-disk corpus; `--replay`
//! runs one saved input again.

use crate::units::parse_number;
use crate::CliResult;
use clap::{Args, ValueEnum};
use guests::layout::{mailbox, INPUT, INPUT_MAX, MAILBOX};
use guests::Workload;
use std::path::PathBuf;
use std::time::Duration;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::fuzz::{fuzz, replay, Feedback, FuzzConfig, FuzzReport, Outcome};
use vmfork::{Snapshot, Vm, VmConfig};

/// Exit status of `vmfork fuzz` when it found a crash (or `--replay` crashed).
pub const FOUND_CRASH: u8 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FeedbackArg {
    /// Block coverage from one-shot breakpoints (needs the code range: built-in targets know
    /// theirs; with --snapshot give --code).
    Coverage,
    /// New guest exit codes only (no breakpoints).
    ExitCode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EngineArg {
    /// vmfork's own loop: havoc + comparison constants, one target fork per core.
    Builtin,
    /// LibAFL drives the target forks (havoc and token mutators, queue scheduler, max-map
    /// feedback, LibAFL's on-disk corpora); with --cores N, LibAFL's launcher: one client
    /// process per core sharing inputs over LLMP (needs --crashes).
    Libafl,
}

#[derive(Args)]
pub struct FuzzArgs {
    /// Who mutates and schedules inputs.
    #[arg(long, value_enum, default_value_t = EngineArg::Builtin)]
    pub engine: EngineArg,
    /// The built-in guest to fuzz (`harness`, `parser`, ... see `vmfork guests`).
    #[arg(long, default_value = "harness")]
    pub target: String,
    /// Fuzz a restore of this snapshot instead (its guest reads input the harness way: bytes
    /// at the input area, length in the mailbox).
    #[arg(long, conflicts_with = "target")]
    pub snapshot: Option<PathBuf>,
    /// What makes an input worth keeping.
    #[arg(long, value_enum, default_value_t = FeedbackArg::Coverage)]
    pub feedback: FeedbackArg,
    /// Guest-virtual code range to cover, START..END (hex with 0x, or decimal).
    #[arg(long, value_parser = parse_range)]
    pub code: Option<(u64, u64)>,
    /// A file of basic-block addresses (one per line) to use instead of disassembling.
    #[arg(long)]
    pub blocks: Option<PathBuf>,
    /// An address whose execution is a crash (a panic routine); repeatable.
    #[arg(long = "crash-at", value_parser = parse_number)]
    pub crash_at: Vec<u64>,
    /// A guest exit code that means the guest detected a bug; repeatable.
    #[arg(long = "crash-code")]
    pub crash_code: Vec<u8>,
    /// Time limit of one input, in milliseconds.
    #[arg(long, default_value_t = 100)]
    pub timeout_ms: u64,
    /// Target forks, one per thread.
    #[arg(long, default_value_t = 1)]
    pub cores: usize,
    /// Corpus directory (read at start, so a run resumes; new inputs are written there).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Where unique crashes and timeouts are saved, with a command that reproduces each.
    #[arg(long)]
    pub crashes: Option<PathBuf>,
    /// Seed inputs.
    #[arg(long)]
    pub seeds: Option<PathBuf>,
    /// Run this one input and report what it does (deterministic).
    #[arg(long)]
    pub replay: Option<PathBuf>,
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
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text
        .split_once("..")
        .ok_or_else(|| format!("'{text}' is not a range START..END"))?;
    let (a, b) = (parse_number(a)?, parse_number(b)?);
    if b <= a {
        return Err(format!("range '{text}' is empty"));
    }
    Ok((a, b))
}

/// The VM config built-in fuzz targets run in: small, no irqchip (input alone decides a run).
fn target_config() -> VmConfig {
    VmConfig {
        mem_bytes: 64 << 20,
        irqchip: false,
        ..VmConfig::default()
    }
}

/// Boots a built-in target and, if it announces when it is ready for input, runs it there.
pub fn boot_target(workload: Workload) -> CliResult<Vm> {
    let vm = Vm::boot(
        target_config(),
        SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(workload.elf())),
    )
    .map_err(|e| e.to_string())?;
    if workload.announces_ready() {
        vm.run_to_ready(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
    }
    Ok(vm)
}

/// A configuration for a built-in target with input the harness way.
pub fn target_fuzz_config(workload: Option<Workload>) -> FuzzConfig {
    let mut config = FuzzConfig::new(INPUT, MAILBOX + mailbox::INPUT_LEN, INPUT_MAX as usize);
    config.max_input = 64.min(INPUT_MAX as usize);
    config.code = workload.map(Workload::code_range);
    config
}

fn workload(name: &str) -> CliResult<Workload> {
    Workload::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Workload::ALL.iter().map(|w| w.name()).collect();
        format!(
            "unknown target '{name}' (built-in guests: {})",
            names.join(", ")
        )
    })
}

fn read_blocks(path: &PathBuf) -> CliResult<Vec<u64>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_number(l).map_err(|e| format!("{}: {e}", path.display())))
        .collect()
}

pub fn run(args: FuzzArgs) -> CliResult<u8> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        return Err(format!("--seconds {} must be positive", args.seconds));
    }
    if args.timeout_ms == 0 || args.cores == 0 {
        return Err("--timeout-ms and --cores must be at least 1".into());
    }
    let known = match &args.snapshot {
        Some(_) => None,
        None => Some(workload(&args.target)?),
    };
    // Builds the VM to fuzz (in each LibAFL client process, for `--engine libafl --cores N`).
    let make_entry = || -> vmfork::Result<Vm> {
        match (&args.snapshot, known) {
            (Some(path), _) => Snapshot::open(path)?
                .restore_with(SerialSink::Discard, &vmfork::fuzz::target_fork_options()),
            (None, Some(w)) => boot_target(w).map_err(vmfork::Error::Invalid),
            (None, None) => Err(vmfork::Error::Invalid("no target".into())),
        }
    };
    let mut config = target_fuzz_config(known);
    if let Some(code) = args.code {
        config.code = Some(code);
    }
    if let Some(path) = &args.blocks {
        config.blocks = Some(read_blocks(path)?);
    }
    config.feedback = match args.feedback {
        FeedbackArg::Coverage => Feedback::Coverage,
        FeedbackArg::ExitCode => Feedback::ExitCode,
    };
    config.crash_sites = args.crash_at.clone();
    config.crash_codes = args.crash_code.clone();
    config.timeout = Duration::from_millis(args.timeout_ms);
    config.cores = args.cores;
    config.max_execs = args.execs;
    config.max_time = Duration::from_secs_f64(args.seconds);
    config.seed = args.seed;
    config.stop_on_crash = !args.keep_going;
    config.corpus_dir = args.corpus.clone();
    config.crashes_dir = args.crashes.clone();
    config.seeds_dir = args.seeds.clone();
    config.replay_command = replay_command(&args);

    if args.engine == EngineArg::Libafl && args.cores > 1 {
        if args.replay.is_some() {
            return Err("--replay runs one input: leave out --cores".into());
        }
        if config.crashes_dir.is_none() {
            return Err("--engine libafl --cores N needs --crashes DIR".into());
        }
        let report = vmfork_libafl::fuzz_on_cores(make_entry, &config, args.cores)
            .map_err(|e| e.to_string())?;
        println!(
            "LibAFL on {} cores: {} solutions in {}",
            args.cores,
            report.solutions,
            args.crashes
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        return Ok(if report.solutions == 0 {
            0
        } else {
            FOUND_CRASH
        });
    }
    let entry = make_entry().map_err(|e| e.to_string())?;

    if let Some(path) = &args.replay {
        let input =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let outcome = replay(&entry, &config, &input).map_err(|e| e.to_string())?;
        return Ok(match outcome {
            Outcome::Exit(code) => {
                println!("exit code {code}");
                0
            }
            Outcome::Timeout { rip } => {
                println!("timeout after {} ms at rip {rip:#x}", args.timeout_ms);
                FOUND_CRASH
            }
            Outcome::Crash(crash) => {
                println!("crash: {crash}");
                FOUND_CRASH
            }
        });
    }
    if args.engine == EngineArg::Libafl {
        let report = vmfork_libafl::fuzz(&entry, &config).map_err(|e| e.to_string())?;
        println!(
            "{} execs in {:.2?} = {:.0} execs/s (LibAFL); corpus {}; solutions {}; blocks {}/{}",
            report.execs,
            report.elapsed,
            report.execs_per_sec(),
            report.corpus_size,
            report.solutions,
            report.blocks_hit,
            report.blocks
        );
        for (crash, exec) in &report.crashes {
            println!("crash: {crash} — first at exec {exec}");
        }
        return Ok(if report.crashes.is_empty() {
            0
        } else {
            FOUND_CRASH
        });
    }
    let report = fuzz(&entry, &config).map_err(|e| e.to_string())?;
    print_report(&report);
    Ok(if report.crashes.is_empty() {
        0
    } else {
        FOUND_CRASH
    })
}

/// The command line that replays a saved input against the same target.
fn replay_command(args: &FuzzArgs) -> String {
    let mut cmd = String::from("vmfork fuzz");
    match &args.snapshot {
        Some(path) => cmd += &format!(" --snapshot {}", path.display()),
        None => cmd += &format!(" --target {}", args.target),
    }
    for site in &args.crash_at {
        cmd += &format!(" --crash-at {site:#x}");
    }
    for code in &args.crash_code {
        cmd += &format!(" --crash-code {code}");
    }
    cmd += &format!(" --timeout-ms {} --replay {{}}", args.timeout_ms);
    cmd
}

fn print_report(report: &FuzzReport) {
    println!(
        "{} execs in {:.2?} = {:.0} execs/s; corpus {}; blocks {}/{}; timeouts {}; exit codes {:?}",
        report.execs,
        report.elapsed,
        report.execs_per_sec(),
        report.corpus_size,
        report.blocks_hit,
        report.blocks,
        report.timeouts,
        report.exit_codes
    );
    for record in &report.crashes {
        let saved = match &record.saved {
            Some(path) => format!(", saved as {}", path.display()),
            None => String::new(),
        };
        println!(
            "crash: {} — first at exec {}, seen {} times; input {}{saved}",
            record.crash,
            record.first_exec,
            record.count,
            hex(&record.input)
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
