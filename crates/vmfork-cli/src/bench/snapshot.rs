//! The snapshot suite: write throughput against the disk's own (dd), the pause a snapshot
//! costs a running VM, and restore latency by RAM size.

use super::{p50_p99, BenchArgs, Report};
use crate::CliResult;
use guests::layout::{mailbox, MAILBOX, MEMTOUCH_BASE};
use guests::Workload;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ExitReason, Snapshot, SnapshotOptions, Vm, VmConfig};

fn err(e: vmfork::Error) -> String {
    e.to_string()
}

fn config(mem_mib: u64) -> VmConfig {
    VmConfig {
        mem_bytes: mem_mib << 20,
        ..VmConfig::default()
    }
}

fn boot(workload: Workload, mem_mib: u64) -> CliResult<Vm> {
    let spec = BootSpec::new(Kernel::Elf(workload.elf()));
    Vm::boot(config(mem_mib), SerialSink::Discard, &spec).map_err(err)
}

/// Bench files go next to the build (a real disk), not to /tmp (often tmpfs).
fn work_dir() -> CliResult<PathBuf> {
    let dir = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join(format!(".vmfork-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// `dd` writing `mib` MiB to `dir` with fdatasync, in MB/s (10^6 bytes).
fn dd_mb_per_s(dir: &Path, mib: u64) -> CliResult<f64> {
    let file = dir.join("dd.bin");
    let started = Instant::now();
    let out = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "conv=fdatasync"])
        .arg(format!("of={}", file.display()))
        .arg(format!("count={mib}"))
        .output()
        .map_err(|e| format!("cannot run dd: {e}"))?;
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&file);
    if !out.status.success() {
        return Err(format!(
            "dd failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((mib << 20) as f64 / secs / 1e6)
}

pub fn run(args: BenchArgs) -> CliResult<Report> {
    let mut report = Report::new("snapshot");
    let dir = work_dir()?;
    let result = measure(args, &dir, &mut report);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| report)
}

fn measure(args: BenchArgs, dir: &Path, report: &mut Report) -> CliResult<()> {
    // Write throughput: 1 GiB, every page from the guest's work area up touched by the guest
    // (the 4 MiB below hold its code, page tables and stack), against dd on the same disk.
    let vm = boot(Workload::Memtouch, 1024)?;
    vm.ram()
        .write_u64(
            MAILBOX + mailbox::PARAM0,
            ((1024 << 20) - MEMTOUCH_BASE) / 4096,
        )
        .map_err(err)?;
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM1, 7)
        .map_err(err)?;
    if vm.run_inline().map_err(err)? != ExitReason::GuestExit(0) {
        return Err("memtouch did not finish".into());
    }
    // Alternate snapshot and dd (the disk and the host are shared and noisy): medians of 3.
    // The first snapshot also turns the RAM copy-on-write; every one writes all of it.
    let (mut writes, mut disks) = (Vec::new(), Vec::new());
    for i in 0..3 {
        let to = dir.join(format!("full-{i}"));
        let snap = vm.snapshot(&to, &SnapshotOptions::default()).map_err(err)?;
        writes.push((1024u64 << 20) as f64 / (snap.total_us as f64 / 1e6) / 1e6);
        let _ = std::fs::remove_dir_all(&to);
        disks.push(dd_mb_per_s(dir, 1024)?);
    }
    drop(vm);
    let (write, _) = p50_p99(&mut writes);
    let (disk, _) = p50_p99(&mut disks);
    let params = [("mem_mib", json!(1024)), ("touched_pct", json!(100))];
    report.add("snapshot_write_mb_per_s", write, "MB/s", &params);
    report.add(
        "disk_write_mb_per_s",
        disk,
        "MB/s",
        &[("tool", json!("dd bs=1M conv=fdatasync"))],
    );
    report.add(
        "snapshot_vs_disk_write_ratio",
        write / disk,
        "ratio",
        &params,
    );

    // Pause: snapshots of a running counter (a few pages of data: what is measured is the
    // pause, not the write).
    let runs = args.runs.min(20);
    for mem_mib in [256u64, 1024, 4096] {
        let vm = boot(Workload::Counter, mem_mib)?;
        vm.start().map_err(err)?;
        std::thread::sleep(Duration::from_millis(20));
        let mut samples = Vec::new();
        for i in 0..=runs {
            let to = dir.join(format!("pause-{mem_mib}-{i}"));
            let r = vm.snapshot(&to, &SnapshotOptions::default()).map_err(err)?;
            let _ = std::fs::remove_dir_all(&to);
            if i > 0 {
                // The first snapshot also turns the RAM copy-on-write (as a first fork does).
                samples.push(r.pause_us as f64 / 1000.0);
            }
        }
        vm.stop();
        vm.wait();
        let (p50, _) = p50_p99(&mut samples);
        report.add(
            "snapshot_pause_ms_p50",
            p50,
            "ms",
            &[("mem_mib", json!(mem_mib))],
        );
    }

    // Restore: from the call to the guest's exit (`hello` restored at its entry point prints a
    // line and exits: two exits, ~50 µs here, are included). `cached`: the snapshot is already
    // open (a server keeps warm snapshots open, and the pool keeps shells mapping it).
    for mem_mib in [256u64, 1024, 4096] {
        let vm = boot(Workload::Hello, mem_mib)?;
        let to = dir.join(format!("restore-{mem_mib}"));
        vm.snapshot(&to, &SnapshotOptions::default()).map_err(err)?;
        drop(vm);
        vmfork::vm::pool::keep_ready(&config(mem_mib), 4).map_err(err)?;
        for cached in [false, true] {
            let open = Snapshot::open(&to).map_err(err)?;
            let mut samples = Vec::with_capacity(args.runs);
            for _ in 0..args.runs {
                let t = Instant::now();
                let fresh;
                let snap = if cached {
                    &open
                } else {
                    fresh = Snapshot::open(&to).map_err(err)?;
                    &fresh
                };
                let vm = snap.restore(SerialSink::Discard).map_err(err)?;
                let exit = vm.run_inline().map_err(err)?;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                if exit != ExitReason::GuestExit(0) {
                    return Err(format!("restored hello: {exit}"));
                }
            }
            let (p50, _) = p50_p99(&mut samples);
            report.add(
                "restore_latency_us_p50",
                p50,
                "us",
                &[
                    ("mem_mib", json!(mem_mib)),
                    ("cached", json!(cached)),
                    ("to", json!("guest exit of hello")),
                ],
            );
        }
        vmfork::vm::pool::drain();
        let _ = std::fs::remove_dir_all(&to);
    }
    Ok(())
}
