//! `linux_boot_ms` of the devices suite: one kernel booted by vmfork and by QEMU microvm (KVM)
//! with the same command line, each output line timed as it arrives; the metric is the time
//! to the last line both print (a kernel's own timestamps stripped to compare them). Only with
//! `VMFORK_BENCH_KERNEL` set (an ELF vmlinux with a PVH note, or a bzImage); each boot gets
//! `VMFORK_BENCH_KERNEL_SECS` seconds (default 120).

use super::Report;
use crate::CliResult;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// (`noxsave` and `clearcpuid=ssse3`: this host shows guests its own CPUID, and XRSTOR and
/// the SSSE3 BLAKE2s at ring 0 fail its emulation; the same for both VMMs.)
const CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1 noxsave clearcpuid=ssse3";

/// A boot's output: each line with the milliseconds since the VMM started.
fn timed_lines(mut command: Command, limit: Duration) -> CliResult<Vec<(f64, String)>> {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("{command:?}: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx
                .send((started.elapsed().as_secs_f64() * 1e3, text))
                .is_err()
            {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    while let Some(left) = limit.checked_sub(started.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(lines)
}

/// A kernel message without its `[    1.234567] ` timestamp.
fn message(line: &str) -> &str {
    match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
        Some((_, rest)) => rest,
        None => line,
    }
}

pub fn run(report: &mut Report) -> CliResult<()> {
    let Ok(kernel) = std::env::var("VMFORK_BENCH_KERNEL") else {
        return Ok(());
    };
    let secs: u64 = std::env::var("VMFORK_BENCH_KERNEL_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let limit = Duration::from_secs(secs);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut vmfork = Command::new(exe);
    vmfork.args([
        "run",
        "--kernel",
        &kernel,
        "--cmdline",
        CMDLINE,
        "--mem",
        "512M",
        "--emulation-assist",
        "--timeout",
        &secs.to_string(),
    ]);
    let ours = timed_lines(vmfork, limit)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-M",
        "microvm",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "512",
        "-nographic",
        "-no-reboot",
        "-kernel",
        &kernel,
        "-append",
        CMDLINE,
    ]);
    let theirs = timed_lines(qemu, limit)?;
    // The last message both printed, and when each printed it.
    let common = ours.iter().rev().find_map(|(t, line)| {
        let m = message(line);
        (!m.is_empty())
            .then(|| theirs.iter().find(|(_, l)| message(l) == m))
            .flatten()
            .map(|(q, _)| (*t, *q, m.to_string()))
    });
    let Some((ours_ms, theirs_ms, line)) = common else {
        return Err("vmfork and QEMU printed no line in common".into());
    };
    let last = |lines: &[(f64, String)]| lines.last().map(|(_, l)| message(l).to_string());
    for (vmm, ms, all) in [("vmfork", ours_ms, &ours), ("qemu", theirs_ms, &theirs)] {
        report.add(
            "linux_boot_ms",
            ms,
            "ms",
            &[
                ("vmm", json!(vmm)),
                ("to_line", json!(line)),
                ("lines_printed", json!(all.len())),
                ("last_line", json!(last(all))),
                ("limit_s", json!(secs)),
            ],
        );
    }
    Ok(())
}
