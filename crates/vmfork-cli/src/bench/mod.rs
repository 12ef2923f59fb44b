//! `vmfork bench SUITE [--json]`: each suite measures in one run and prints a report, as a table
//! or as one JSON object `{"suite", "metrics": [{"name", "value", "unit", "params"}]}`.

mod boot;
mod busy;
mod devices;
mod fork;
mod fuzz;
mod linux;
mod snapshot;

use crate::CliResult;
use clap::{Args, Subcommand};

/// A built-in guest booted (not started) with `config`, its mailbox `params` (offset, value)
/// written, its console discarded.
fn guest_vm(
    workload: guests::Workload,
    config: vmfork::VmConfig,
    params: &[(u64, u64)],
) -> CliResult<vmfork::Vm> {
    use vmfork::boot::{BootSpec, Kernel};
    let err = |e: vmfork::Error| e.to_string();
    let vm = vmfork::Vm::boot(
        config,
        vmfork::devices::SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(workload.elf())),
    )
    .map_err(err)?;
    for &(offset, value) in params {
        vm.ram()
            .write_u64(guests::layout::MAILBOX + offset, value)
            .map_err(err)?;
    }
    Ok(vm)
}
use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Subcommand)]
pub enum Suite {
    /// VMM start to the guest's first serial byte, in-process and as a process; pause+resume.
    Boot(BenchArgs),
    /// Fork and fork-of-fork latency, reset latency, private bytes per fork.
    Fork(BenchArgs),
    /// Snapshot write throughput (vs dd), snapshot pause, restore latency by RAM size.
    Snapshot(BenchArgs),
    /// A guest that keeps writing: fork/snapshot pause by pages dirtied since the last one,
    /// memory per fork and kept by the parent, fork latency among 1,000 siblings.
    Busy(BenchArgs),
    /// Devices: virtio-blk MB/s from a guest driver (4 KiB and 64 KiB requests) beside the host
    /// on the same image, fork latency with a disk (idle and busy) beside without.
    Devices(BenchArgs),
    /// Fuzzing: execs/s by cores and feedback, reset latency by dirty pages (quick, full and
    /// parts), execs to the planted parser's deepest bug, a coverage breakpoint's first hit.
    Fuzz(BenchArgs),
}

#[derive(Args, Clone, Copy)]
pub struct BenchArgs {
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Samples per metric (at least 20 for the p99 to mean something).
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
}

pub fn run(suite: Suite) -> CliResult<u8> {
    let (Suite::Boot(args)
    | Suite::Fork(args)
    | Suite::Snapshot(args)
    | Suite::Busy(args)
    | Suite::Devices(args)
    | Suite::Fuzz(args)) = &suite;
    if args.runs < 5 {
        return Err("--runs must be at least 5".into());
    }
    let (args, report) = match suite {
        Suite::Boot(args) => (args, boot::run(args)?),
        Suite::Fork(args) => (args, with_and_without_seccomp(|| fork::run(args))?),
        Suite::Snapshot(args) => (args, with_and_without_seccomp(|| snapshot::run(args))?),
        Suite::Busy(args) => (args, busy::run(args)?),
        Suite::Fuzz(args) => (args, fuzz::run(args)?),
        Suite::Devices(args) => (args, devices::run(args)?),
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        report.print_table();
    }
    Ok(0)
}

/// Runs a suite twice in one process, on a thread confined as vmfork's VMM threads are (and
/// with vCPU threads confined) and then with filters off, each metric marked `seccomp`
/// true/false: what the filters cost the operations measured.
fn with_and_without_seccomp(suite: impl Fn() -> CliResult<Report> + Sync) -> CliResult<Report> {
    use vmfork::confine::seccomp;
    let was = seccomp::enabled();
    let mut merged: Option<Report> = None;
    for on in [false, true] {
        seccomp::set_enabled(on);
        let result = std::thread::scope(|s| {
            s.spawn(|| {
                if on {
                    seccomp::install(seccomp::ThreadKind::Vmm).map_err(|e| e.to_string())?;
                }
                suite()
            })
            .join()
            .map_err(|_| "the benchmark thread panicked".to_string())?
        });
        seccomp::set_enabled(was);
        let mut report = result?;
        for m in &mut report.metrics {
            m.params.insert("seccomp".into(), Value::Bool(on));
        }
        match &mut merged {
            None => merged = Some(report),
            Some(all) => all.metrics.append(&mut report.metrics),
        }
    }
    merged.ok_or_else(|| "no report".to_string())
}

#[derive(Serialize)]
pub struct Report {
    pub suite: &'static str,
    pub metrics: Vec<Metric>,
}

#[derive(Serialize)]
pub struct Metric {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub params: Map<String, Value>,
}

impl Report {
    pub fn new(suite: &'static str) -> Self {
        Self {
            suite,
            metrics: Vec::new(),
        }
    }

    pub fn add(&mut self, name: &str, value: f64, unit: &'static str, params: &[(&str, Value)]) {
        self.metrics.push(Metric {
            name: name.to_string(),
            value: (value * 100.0).round() / 100.0,
            unit,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        });
    }

    /// Adds the median of `samples` (sorted in place).
    pub fn add_median(
        &mut self,
        name: &str,
        samples: &mut [f64],
        unit: &'static str,
        params: &[(&str, Value)],
    ) {
        let (p50, _) = p50_p99(samples);
        self.add(name, p50, unit, params);
    }

    fn print_table(&self) {
        println!("suite: {}", self.suite);
        for m in &self.metrics {
            let params: Vec<String> = m.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "  {:<40} {:>12.2} {:<6} {}",
                m.name,
                m.value,
                m.unit,
                params.join(" ")
            );
        }
    }
}

/// Median and 99th percentile of `samples` (sorted in place).
pub fn p50_p99(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}
