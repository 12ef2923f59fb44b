//! The fuzz suite: execs/s on the planted-bug parser by cores and feedback, reset latency of a
//! fuzzing target by dirty pages (quick and full, and its parts), execs to the parser's
//! deepest bug by feedback, and what a coverage breakpoint's first hit costs.

use super::{BenchArgs, Report};
use crate::fuzz::{boot_target, target_fuzz_config};
use crate::CliResult;
use guests::layout::{mailbox, INPUT, MAILBOX};
use guests::{parser_bug_input, ParserBug, Workload};
use serde_json::json;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use vmfork::fuzz::coverage::Breakpoints;
use vmfork::fuzz::{fuzz, replay, target_fork_options, Feedback, Outcome};
use vmfork::{ExitReason, ResetScope, ThreadTimer, Vm};

fn err(e: vmfork::Error) -> String {
    e.to_string()
}

/// Seconds each throughput run lasts.
const THROUGHPUT_SECONDS: f64 = 3.0;
/// Seeds for the execs-to-bug medians.
const SEEDS: u64 = 5;
/// Execs after which a search for the deepest bug gives up (counted as this many).
const BUG_BUDGET: u64 = 100_000;

pub fn run(args: BenchArgs) -> CliResult<Report> {
    let mut report = Report::new("fuzz");
    let parser = boot_target(Workload::Parser)?;

    for cores in [1usize, 2] {
        for coverage in [true, false] {
            let mut config = target_fuzz_config(Some(Workload::Parser));
            config.cores = cores;
            config.feedback = if coverage {
                Feedback::Coverage
            } else {
                Feedback::ExitCode
            };
            config.max_time = Duration::from_secs_f64(THROUGHPUT_SECONDS);
            let result = fuzz(&parser, &config).map_err(err)?;
            report.add(
                "fuzz_execs_per_s",
                result.execs_per_sec(),
                "per_s",
                &[
                    ("guest", json!("parser")),
                    ("cores", json!(cores)),
                    ("coverage", json!(coverage)),
                ],
            );
        }
    }

    let mut config = target_fuzz_config(Some(Workload::Parser));
    config.max_time = Duration::from_secs_f64(THROUGHPUT_SECONDS);
    let result = vmfork_libafl::fuzz(&parser, &config).map_err(err)?;
    report.add(
        "fuzz_execs_per_s",
        result.execs_per_sec(),
        "per_s",
        &[
            ("guest", json!("parser")),
            ("cores", json!(1)),
            ("coverage", json!(true)),
            ("engine", json!("libafl")),
        ],
    );

    reset_latency(&mut report, args)?;

    let deep = match replay(
        &parser,
        &target_fuzz_config(Some(Workload::Parser)),
        &parser_bug_input(ParserBug::DeepChunk),
    )
    .map_err(err)?
    {
        Outcome::Crash(c) => c.rip,
        other => return Err(format!("the parser's deep bug did not crash: {other:?}")),
    };
    for (feedback, name, libafl) in [
        (Feedback::Coverage, "coverage", false),
        (Feedback::ExitCode, "exit_code", false),
        (Feedback::Coverage, "coverage", true),
    ] {
        let mut execs = Vec::new();
        let mut found = 0;
        for seed in 1..=SEEDS {
            let mut config = target_fuzz_config(Some(Workload::Parser));
            config.feedback = feedback;
            config.seed = seed;
            config.max_execs = BUG_BUDGET;
            config.max_time = Duration::from_secs(120);
            config.stop_at_rip = Some(deep);
            let first = if libafl {
                let result = vmfork_libafl::fuzz(&parser, &config).map_err(err)?;
                result.crash_at(deep).map(|&(_, exec)| exec)
            } else {
                let result = fuzz(&parser, &config).map_err(err)?;
                result.crash_at(deep).map(|record| record.first_exec)
            };
            match first {
                Some(exec) => {
                    found += 1;
                    execs.push(exec as f64);
                }
                None => execs.push(BUG_BUDGET as f64),
            }
        }
        report.add_median(
            "execs_to_find_deepest_bug",
            &mut execs,
            "execs",
            &[
                ("feedback", json!(name)),
                ("engine", json!(if libafl { "libafl" } else { "builtin" })),
                ("seeds", json!(SEEDS)),
                ("found", json!(found)),
                ("budget", json!(BUG_BUDGET)),
            ],
        );
    }

    first_hit_cost(&mut report, &parser, args)?;
    Ok(report)
}

type ResetFn = fn(&Vm) -> vmfork::Result<vmfork::ResetStats>;

/// Reset latency of a fuzzing target (memtouch forked at its ready point, confined to CPL3)
/// after it wrote `dirty_pages` pages: the quick reset, the full one, and the full one's parts.
fn reset_latency(report: &mut Report, args: BenchArgs) -> CliResult<()> {
    for pages in [0u64, 16, 256] {
        let entry = Vm::boot(
            vmfork::VmConfig {
                mem_bytes: 64 << 20,
                irqchip: false,
                ..vmfork::VmConfig::default()
            },
            vmfork::devices::SerialSink::Discard,
            &vmfork::boot::BootSpec::new(vmfork::boot::Kernel::Elf(Workload::Memtouch.elf())),
        )
        .map_err(err)?;
        // memtouch writes at least one page (zero means its default).
        let touch = pages.max(1);
        entry
            .ram()
            .write_u64(MAILBOX + mailbox::PARAM0, touch)
            .map_err(err)?;
        entry.run_to_ready(Duration::from_secs(10)).map_err(err)?;
        let target = entry.fork(&target_fork_options()).map_err(err)?;
        let kinds: [(&str, ResetFn); 4] = [
            ("quick", Vm::reset_quick),
            ("full", Vm::reset),
            ("memory_only", |vm| vm.reset_with(ResetScope::MemoryOnly)),
            ("state_only", |vm| vm.reset_with(ResetScope::StateOnly)),
        ];
        for (kind, reset) in kinds {
            let mut samples = Vec::with_capacity(args.runs);
            let mut restored = 0;
            for _ in 0..args.runs.max(20) {
                let exit = target.run_inline().map_err(err)?;
                if exit != ExitReason::GuestExit(0) {
                    return Err(format!("memtouch stopped: {exit}"));
                }
                let t = Instant::now();
                let stats = reset(&target).map_err(err)?;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                restored = stats.pages_restored;
                if kind == "memory_only" || kind == "state_only" {
                    // Leave the target whole for the next run.
                    target.reset().map_err(err)?;
                }
            }
            // The guest's own pages, plus its stack and mailbox pages (pages_restored).
            let params = [
                ("dirty_pages", json!(pages)),
                ("pages_restored", json!(restored)),
                ("reset", json!(kind)),
            ];
            let name = if kind == "quick" || kind == "full" {
                "reset_latency_us_p50"
            } else {
                "reset_part_us_p50"
            };
            report.add_median(name, &mut samples, "us", &params);
        }
    }
    Ok(())
}

/// The extra time of an input that reaches one armed block first: the stop, the byte written
/// back, and (on hosts that give no `int3` exits) the reset and rerun; against the same input
/// on the same target with nothing armed.
fn first_hit_cost(report: &mut Report, parser: &Vm, args: BenchArgs) -> CliResult<()> {
    let input = b"V\x01A\x02hi";
    let mut extra = Vec::new();
    let timer = ThreadTimer::for_this_thread().map_err(err)?;
    let opts = target_fork_options();
    let samples = args.runs.clamp(10, 50);
    for _ in 0..samples {
        let base = parser.fork(&opts).map_err(err)?;
        let rip = base.registers(0).map_err(err)?.regs.rip;
        let breakpoints = Breakpoints::arm(&base, &BTreeSet::from([rip]), &[]).map_err(err)?;
        let target = base.fork(&opts).map_err(err)?;
        target.set_breakpoint_exits(true).map_err(err)?;
        let load = |vm: &Vm| -> vmfork::Result<()> {
            vm.ram().write(INPUT, input)?;
            vm.ram()
                .write_u64(MAILBOX + mailbox::INPUT_LEN, input.len() as u64)
        };
        let run = |vm: &Vm| vm.run_inline_for(Duration::from_secs(1), &timer);
        // First: the armed run, to its exit.
        load(&target).map_err(err)?;
        let t = Instant::now();
        let mut exit = run(&target).map_err(err)?;
        let stop = match &exit {
            ExitReason::Breakpoint { rip, .. } => Some((*rip, false)),
            ExitReason::TripleFault(d) => Some((d.regs.rip - 1, true)),
            _ => None,
        };
        if let Some((at, rerun)) = stop {
            breakpoints.take(&target, at).map_err(err)?;
            if rerun {
                target.reset().map_err(err)?;
                load(&target).map_err(err)?;
            }
            exit = run(&target).map_err(err)?;
        }
        let hit = t.elapsed();
        if exit != ExitReason::GuestExit(0) || stop.is_none() {
            return Err(format!(
                "the armed parser did not stop once then exit: {exit}"
            ));
        }
        target.reset().map_err(err)?;
        // Then the same input with the block gone.
        load(&target).map_err(err)?;
        let t = Instant::now();
        let exit = run(&target).map_err(err)?;
        let plain = t.elapsed();
        if exit != ExitReason::GuestExit(0) {
            return Err(format!("the parser did not exit: {exit}"));
        }
        extra.push((hit.as_secs_f64() - plain.as_secs_f64()) * 1e6);
    }
    report.add_median(
        "coverage_breakpoint_first_hit_us",
        &mut extra,
        "us",
        &[("samples", json!(samples))],
    );
    Ok(())
}
