//! The fork suite: fork latency by RAM size, fork of a fork, reset latency by dirty pages and
//! the private memory of a fork (fuzzing throughput is in the fuzz suite).

use super::{p50_p99, BenchArgs, Report};
use crate::CliResult;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use serde_json::json;
use std::time::Instant;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ExitReason, ForkOptions, Vm, VmConfig};

fn err(e: vmfork::Error) -> String {
    e.to_string()
}

fn memtouch_vm(mem_mib: u64, pages: u64) -> CliResult<Vm> {
    let config = VmConfig {
        mem_bytes: mem_mib << 20,
        ..VmConfig::default()
    };
    let vm = Vm::boot(
        config,
        SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(Workload::Memtouch.elf())),
    )
    .map_err(err)?;
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM0, pages)
        .map_err(err)?;
    Ok(vm)
}

fn us(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

pub fn run(args: BenchArgs) -> CliResult<Report> {
    let mut report = Report::new("fork");
    let opts = ForkOptions::default();

    for mem_mib in [256u64, 1024, 4096] {
        let parent = memtouch_vm(mem_mib, 16)?;
        parent.fork(&opts).map_err(err)?; // the first fork freezes the RAM file
        for pooled in [false, true] {
            let opts = ForkOptions {
                fresh_shell: !pooled,
                ..opts.clone()
            };
            if pooled {
                // Ready shells for every sample, as a server keeps them between requests.
                vmfork::vm::pool::keep_ready(parent.config(), args.runs).map_err(err)?;
            }
            let mut samples = Vec::with_capacity(args.runs);
            let mut children = Vec::new();
            for _ in 0..args.runs {
                let t = Instant::now();
                let child = parent.fork(&opts).map_err(err)?;
                samples.push(us(t));
                children.push(child);
            }
            drop(children);
            vmfork::vm::pool::drain();
            let (p50, p99) = p50_p99(&mut samples);
            let params = [("mem_mib", json!(mem_mib)), ("pooled", json!(pooled))];
            report.add("fork_latency_us_p50", p50, "us", &params);
            report.add("fork_latency_us_p99", p99, "us", &params);
        }
    }

    for dirty in [0u64, 1000] {
        let root = memtouch_vm(256, dirty.max(1))?;
        vmfork::vm::pool::keep_ready(root.config(), 2 * args.runs).map_err(err)?;
        let mut samples = Vec::with_capacity(args.runs);
        let mut children = Vec::new();
        for _ in 0..args.runs {
            let parent = root.fork(&opts).map_err(err)?;
            if dirty > 0 {
                let exit = parent.run_inline().map_err(err)?;
                if exit != ExitReason::GuestExit(0) {
                    return Err(format!("memtouch at dirty {dirty}: {exit}"));
                }
            }
            let t = Instant::now();
            let child = parent.fork(&opts).map_err(err)?;
            samples.push(us(t));
            children.push(child);
            children.push(parent);
        }
        drop(children);
        report.add_median(
            "fork_of_fork_latency_us_p50",
            &mut samples,
            "us",
            &[
                ("parent_dirty_pages", json!(dirty)),
                ("mem_mib", json!(256)),
            ],
        );
    }

    for dirty in [0u64, 16, 256, 4096] {
        let parent = memtouch_vm(256, dirty.max(1))?;
        let fork = parent.fork(&opts).map_err(err)?;
        let mut samples = Vec::with_capacity(args.runs);
        let mut restored = 0;
        for _ in 0..args.runs {
            if dirty > 0 {
                let exit = fork.run_inline().map_err(err)?;
                if exit != ExitReason::GuestExit(0) {
                    return Err(format!("memtouch at dirty {dirty}: {exit}"));
                }
            }
            let t = Instant::now();
            let stats = fork.reset().map_err(err)?;
            samples.push(us(t));
            restored = stats.pages_restored;
        }
        report.add_median(
            "reset_latency_us_p50",
            &mut samples,
            "us",
            &[
                ("dirty_pages", json!(dirty)),
                ("pages_restored", json!(restored)),
                ("mem_mib", json!(256)),
            ],
        );
        drop((fork, parent));
    }

    let parent = memtouch_vm(256, 16)?;
    parent.fork(&opts).map_err(err)?;
    let rss_before = rss_bytes()?;
    let mut forks = Vec::new();
    for _ in 0..100 {
        let f = parent.fork(&opts).map_err(err)?;
        f.run_inline().map_err(err)?;
        forks.push(f);
    }
    let per_fork = rss_bytes()?.saturating_sub(rss_before) / 100;
    report.add(
        "fork_private_bytes",
        per_fork as f64,
        "bytes",
        &[("forks", json!(100)), ("dirty_pages_each", json!(16))],
    );
    drop(forks);
    Ok(report)
}

fn rss_bytes() -> CliResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "no VmRSS in /proc/self/status".to_string())
}
