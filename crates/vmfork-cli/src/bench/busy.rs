//! The busy suite: forks and snapshots of a 1 GiB guest that keeps writing (the `dirty` guest
//! rewriting a working set), many siblings, and the memory a long-running parent keeps.

use super::{p50_p99, BenchArgs, Report};
use crate::CliResult;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmfork::vm::pool;
use vmfork::{ForkOptions, SnapshotOptions, Vm, VmConfig};

const MEM_MIB: u64 = 1024;

fn err(e: vmfork::Error) -> String {
    e.to_string()
}

/// A running 1 GiB guest: `dirty` rewriting `pages` pages, or `spin` (writes nothing) for 0.
fn busy_vm(pages: u64, delay: u64) -> CliResult<Vm> {
    let workload = if pages == 0 {
        Workload::Spin
    } else {
        Workload::Dirty
    };
    running_vm(
        workload,
        &[(mailbox::PARAM0, pages), (mailbox::PARAM1, delay)],
    )
}

/// A running 1 GiB `workload` with mailbox `params` (offset, value).
fn running_vm(workload: Workload, params: &[(u64, u64)]) -> CliResult<Vm> {
    let config = VmConfig {
        mem_bytes: MEM_MIB << 20,
        ..VmConfig::default()
    };
    let vm = super::guest_vm(workload, config, params)?;
    vm.start().map_err(err)?;
    Ok(vm)
}

fn generation(vm: &Vm) -> CliResult<u64> {
    vm.ram().read_u64(MAILBOX + mailbox::PROGRESS).map_err(err)
}

/// Waits until the `dirty` guest has written a whole generation after `since` (so every page of
/// its working set was written since then); no wait for `spin`.
fn wait_full_generation(vm: &Vm, pages: u64, since: u64) -> CliResult<u64> {
    if pages == 0 {
        return Ok(0);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let g = generation(vm)?;
        if g >= since + 2 {
            return Ok(g);
        }
        if Instant::now() > deadline {
            return Err(format!("the dirty guest is stuck at generation {g}"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Memory the process holds: its anonymous pages plus the system's shared memory (memfds:
/// RAM files and layers, mapped or not).
fn memory_bytes() -> CliResult<u64> {
    let kib = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|k| k * 1024)
            .ok_or_else(|| format!("no {key} in /proc"))
    };
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    Ok(kib(&status, "RssAnon:")? + kib(&meminfo, "Shmem:")?)
}

pub fn run(args: BenchArgs) -> CliResult<Report> {
    let mut report = Report::new("busy");
    let dir = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join(format!(".vmfork-bench-busy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = measure(args, &dir, &mut report);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| report)
}

fn measure(args: BenchArgs, dir: &Path, report: &mut Report) -> CliResult<()> {
    let opts = ForkOptions::default();
    for dirty in [0u64, 10_000, 200_000] {
        let runs = if dirty >= 100_000 {
            args.runs.min(7)
        } else {
            args.runs.min(20)
        };
        let parent = busy_vm(dirty, 0)?;
        wait_full_generation(&parent, dirty, 0)?;
        drop(parent.fork(&opts).map_err(err)?); // the first fork freezes the RAM file
        let mut since = generation(&parent)?;
        let (mut pauses, mut ready, mut snap_pauses) = (Vec::new(), Vec::new(), Vec::new());
        // The previous child lives until the next one exists: with no child left the parent
        // would be folded back between samples, and the next fork would not follow a layer.
        let mut previous = None;
        for _ in 0..runs {
            wait_full_generation(&parent, dirty, since)?;
            let t = Instant::now();
            let child = parent.fork(&opts).map_err(err)?;
            ready.push(t.elapsed().as_secs_f64() * 1e3);
            let pause = parent.last_pause().unwrap_or_default();
            pauses.push(pause.as_secs_f64() * 1e6);
            since = generation(&parent)?;
            previous = Some(child);
        }
        for i in 0..runs.min(5) {
            wait_full_generation(&parent, dirty, since)?;
            let path = dir.join(format!("snap-{dirty}-{i}"));
            let snap = parent
                .snapshot(&path, &SnapshotOptions::default())
                .map_err(err)?;
            snap_pauses.push(snap.pause_us as f64);
            since = generation(&parent)?;
            let _ = std::fs::remove_dir_all(&path);
        }
        parent.stop();
        drop((previous, parent));
        pool::drain();
        let params = [
            ("dirty_pages_since_last", json!(dirty)),
            ("mem_mib", json!(MEM_MIB)),
        ];
        let (p50, p99) = p50_p99(&mut pauses);
        report.add("fork_pause_us_p50", p50, "us", &params);
        report.add("fork_pause_us_p99", p99, "us", &params);
        report.add_median("fork_ready_ms_p50", &mut ready, "ms", &params);
        report.add_median("snapshot_pause_us_p50", &mut snap_pauses, "us", &params);
    }

    qemu_background_snapshot(dir, report)?;
    memory_after_forks(report)?;
    siblings(args, dir, report)?;
    Ok(())
}

/// QEMU (microvm, KVM) `background-snapshot` of the same `dirty` guest (its parameters baked
/// into the ELF) while it writes: the downtime QEMU reports, beside vmfork's snapshot pause
/// measured above in this run. Skipped without QEMU.
fn qemu_background_snapshot(dir: &Path, report: &mut Report) -> CliResult<()> {
    let qemu = "qemu-system-x86_64";
    if std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("vmfork bench: {qemu} is not installed; skipping the QEMU comparison");
        return Ok(());
    }
    for pages in [10_000u64, 200_000] {
        let mut downtimes = qemu_downtimes_ms(qemu, dir, pages, 3)?;
        let vmfork_us = report
            .metrics
            .iter()
            .find(|m| {
                m.name == "snapshot_pause_us_p50"
                    && m.params.get("dirty_pages_since_last") == Some(&json!(pages))
            })
            .map(|m| m.value);
        let params = [
            ("dirty_pages_since_last", json!(pages)),
            ("mem_mib", json!(MEM_MIB)),
        ];
        let (median, _) = p50_p99(&mut downtimes);
        report.add("qemu_bg_snapshot_downtime_ms", median, "ms", &params);
        if let Some(us) = vmfork_us.filter(|&us| us > 0.0) {
            report.add(
                "qemu_downtime_vs_vmfork_pause_ratio",
                median * 1e3 / us,
                "ratio",
                &params,
            );
        }
    }
    Ok(())
}

/// Background snapshots of QEMU running `dirty` over `pages` pages, each after it wrote a whole
/// generation: the downtime of each, as `info migrate` reports it.
fn qemu_downtimes_ms(qemu: &str, dir: &Path, pages: u64, runs: usize) -> CliResult<Vec<f64>> {
    use super::snapshot::{qemu_command_for, Monitor};
    let elf = dir.join(format!("dirty-{pages}.elf"));
    std::fs::write(
        &elf,
        Workload::Dirty.elf_with_params(&[(mailbox::PARAM0, pages)]),
    )
    .map_err(|e| e.to_string())?;
    let mon = dir.join(format!("qemu-bg-{pages}.mon"));
    let mut child = qemu_command_for(qemu, &elf, MEM_MIB, &mon, 300)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {qemu}: {e}"))?;
    let measured = (|| {
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut m = Monitor::connect(&mon, deadline)?;
        let generation = |m: &mut Monitor| -> CliResult<u64> {
            let reply = m.command(&format!("xp /1gx {:#x}", MAILBOX + mailbox::PROGRESS))?;
            // "0000000000200020: 0x0000000000000005" (after the echoed command).
            let hex = reply
                .split(": 0x")
                .nth(1)
                .map(|h| {
                    h.chars()
                        .take_while(char::is_ascii_hexdigit)
                        .collect::<String>()
                })
                .ok_or_else(|| format!("QEMU xp answered {reply:?}"))?;
            u64::from_str_radix(&hex, 16).map_err(|e| format!("QEMU xp: {e}"))
        };
        let wait_generations = |m: &mut Monitor, n: u64| -> CliResult<()> {
            let start = generation(m)?;
            while generation(m)? < start + n {
                if Instant::now() > deadline {
                    return Err("the dirty guest under QEMU is stuck".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        };
        m.command("migrate_set_capability background-snapshot on")?;
        let mut downtimes = Vec::new();
        for i in 0..runs {
            wait_generations(&mut m, 2)?;
            let file = dir.join(format!("qemu-bg-{pages}-{i}.state"));
            m.command(&format!("migrate \"exec:cat > {}\"", file.display()))?;
            m.wait_migrated(deadline)?;
            let info = m.command("info migrate")?;
            let _ = std::fs::remove_file(&file);
            let ms = info
                .lines()
                .find_map(|l| l.trim().strip_prefix("downtime:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
                .ok_or_else(|| format!("no downtime in QEMU's info migrate: {info}"))?;
            downtimes.push(ms);
        }
        let _ = m.command("quit");
        Ok(downtimes)
    })();
    let _ = child.kill();
    let _ = child.wait();
    measured
}

/// Memory of 10 forks of a parent that wrote 200,000 pages since its last fork (none written
/// in between), and what the parent keeps once they are gone.
fn memory_after_forks(report: &mut Report) -> CliResult<()> {
    const PAGES: u64 = 200_000;
    pool::drain();
    let baseline = memory_bytes()?;
    let parent = busy_vm(PAGES, 0)?;
    wait_full_generation(&parent, PAGES, 0)?;
    drop(parent.fork(&ForkOptions::default()).map_err(err)?);
    let since = generation(&parent)?;
    wait_full_generation(&parent, PAGES, since)?;
    parent.pause().map_err(err)?;
    let before = memory_bytes()?;
    let forks = (0..10)
        .map(|_| parent.fork(&ForkOptions::default()))
        .collect::<vmfork::Result<Vec<_>>>()
        .map_err(err)?;
    let after = memory_bytes()?;
    // Signed: freeing the parent's private copies (adopted by the layer) can outweigh the rest.
    let per_fork = (after as f64 - before as f64) / 10.0;
    report.add(
        "rss_growth_per_fork_bytes",
        per_fork,
        "bytes",
        &[
            ("forks", json!(10)),
            ("dirty_pages_since_last", json!(PAGES)),
            ("mem_mib", json!(MEM_MIB)),
        ],
    );
    drop(forks);
    pool::drain();
    parent.resume().map_err(err)?;
    // The folder gives the parent its RAM file back once nothing else uses its image.
    let t = Instant::now();
    while parent.has_frozen_image() {
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the parent was not folded back within 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let written = [
        ("dirty_pages_written", json!(PAGES)),
        ("mem_mib", json!(MEM_MIB)),
    ];
    report.add("fold_ms", t.elapsed().as_secs_f64() * 1e3, "ms", &written);
    let longest = parent.max_background_pause().as_secs_f64() * 1e6;
    report.add("background_pause_us_max", longest, "us", &written);
    std::thread::sleep(Duration::from_millis(200));
    let kept = memory_bytes()?.saturating_sub(baseline);
    let ratio = kept as f64 / (MEM_MIB << 20) as f64;
    report.add("parent_rss_ratio", ratio, "ratio", &written);
    parent.stop();
    drop(parent);
    pool::drain();
    Ok(())
}

/// Fork latency with no siblings and with 1,000 live ones, a burst of 1,000 forks, listing
/// and destroying them over the API. Parent and siblings are running `idle` guests (halted
/// until an interrupt, as idle real guests are); what the parent writes is measured above.
fn siblings(args: BenchArgs, dir: &Path, report: &mut Report) -> CliResult<()> {
    let parent = running_vm(Workload::Idle, &[])?;
    let registry = vmfork::api::Registry::new(None);
    let parent = registry.add(parent);
    let sock = dir.join("api.sock");
    let _server = vmfork::api::ApiServer::start(&sock, Arc::clone(&registry)).map_err(err)?;
    let opts = ForkOptions::default();
    drop(parent.fork(&opts).map_err(err)?);
    let fork_running = |samples: Option<&mut Vec<f64>>| -> CliResult<Vm> {
        let t = Instant::now();
        let child = parent.fork(&opts).map_err(err)?;
        if let Some(samples) = samples {
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        child.start().map_err(err)?;
        Ok(child)
    };
    let mut alone = Vec::new();
    for _ in 0..args.runs {
        drop(fork_running(Some(&mut alone))?);
    }
    let t = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids.push(registry.add(fork_running(None)?).id());
    }
    let burst_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut crowded = Vec::new();
    for _ in 0..args.runs {
        drop(fork_running(Some(&mut crowded))?);
    }
    let mut list_ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let listed = crate::client::request(&sock, "GET", "/vms", None)?;
        list_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let n = listed.as_array().map_or(0, Vec::len);
        if n < 1001 {
            return Err(format!("GET /vms listed {n} VMs, not 1,001"));
        }
    }
    let t = Instant::now();
    for id in ids {
        crate::client::request(&sock, "DELETE", &format!("/vms/{id}"), None)?;
    }
    let destroy_ms = t.elapsed().as_secs_f64() * 1e3;
    parent.stop();
    registry.destroy_all();
    let t = Instant::now();
    pool::drain();
    let teardown_ms = t.elapsed().as_secs_f64() * 1e3;
    let params = |n: u64| {
        [
            ("siblings", json!(n)),
            ("mem_mib", json!(MEM_MIB)),
            ("guest", json!("idle, running")),
        ]
    };
    report.add_median("fork_latency_us_p50", &mut alone, "us", &params(0));
    report.add_median("fork_latency_us_p50", &mut crowded, "us", &params(1000));
    report.add("forks_1000_total_ms", burst_ms, "ms", &params(1000));
    report.add_median("list_vms_ms_p50", &mut list_ms, "ms", &params(1000));
    report.add("destroy_1000_over_api_ms", destroy_ms, "ms", &params(1000));
    report.add(
        "teardown_after_destroy_ms",
        teardown_ms,
        "ms",
        &params(1000),
    );
    Ok(())
}
