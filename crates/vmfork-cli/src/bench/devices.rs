//! The devices suite: virtio-blk throughput from a guest driver (4 KiB and 64 KiB requests,
//! one per notify) beside the same block sizes read from and written to the image file by the
//! host, fork latency of a VM with a disk (idle, and writing its disk while forked) beside one
//! without, and the round trip of 8 bytes through virtio-vsock to a host echo socket.

use super::{BenchArgs, Report};
use crate::CliResult;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use serde_json::json;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vmfork::devices::DiskConfig;
use vmfork::{ExitReason, ForkOptions, Vm, VmConfig};

const IMAGE_MIB: u64 = 64;

fn err(e: vmfork::Error) -> String {
    e.to_string()
}

fn vm(workload: Workload, disk: Option<&Path>, params: &[(u64, u64)]) -> CliResult<Vm> {
    let config = VmConfig {
        disks: disk
            .map(|p| DiskConfig {
                path: p.to_path_buf(),
                read_only: false,
            })
            .into_iter()
            .collect(),
        ..VmConfig::default()
    };
    super::guest_vm(workload, config, params)
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

/// MB/s of the guest driver moving `total` bytes in `request`-byte requests.
fn guest_throughput(image: &Path, write: bool, request: u64, total: u64) -> CliResult<f64> {
    let requests = total / request;
    let vm = vm(
        Workload::Diskbench,
        Some(image),
        &[
            (mailbox::PARAM0, request),
            (mailbox::PARAM1, u64::from(write)),
            (mailbox::PARAM2, requests),
        ],
    )?;
    let t = Instant::now();
    let exit = vm.run_inline().map_err(err)?;
    let took = t.elapsed();
    if exit != ExitReason::GuestExit(0) {
        return Err(format!(
            "diskbench ({request} bytes, write {write}): {exit}"
        ));
    }
    Ok(mb_per_s(requests * request, took))
}

/// MB/s of the host reading (pread) or writing (pwrite, no sync: the page cache, as the
/// guest's layer is in memory) the file in `request`-byte blocks.
fn host_throughput(path: &Path, write: bool, request: u64, total: u64) -> CliResult<f64> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = vec![0x5au8; request as usize];
    let size = IMAGE_MIB << 20;
    let t = Instant::now();
    let mut at = 0u64;
    for _ in 0..total / request {
        if at + request > size {
            at = 0;
        }
        if write {
            file.write_all_at(&buf, at)
        } else {
            file.read_exact_at(&mut buf, at)
        }
        .map_err(|e| format!("{}: {e}", path.display()))?;
        at += request;
    }
    Ok(mb_per_s(total, t.elapsed()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median fork latency (µs) of `parent` over `runs` pooled forks.
fn fork_p50(parent: &Vm, runs: usize) -> CliResult<f64> {
    let opts = ForkOptions::default();
    vmfork::vm::pool::keep_ready(parent.config(), runs).map_err(err)?;
    let mut samples = Vec::with_capacity(runs);
    let mut children = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let child = parent.fork(&opts).map_err(err)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        children.push(child);
    }
    drop(children);
    vmfork::vm::pool::drain();
    Ok(median(samples))
}

pub fn run(args: BenchArgs) -> CliResult<Report> {
    let mut report = Report::new("devices");
    let dir = std::env::temp_dir().join(format!("vmfork-bench-devices-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let result = run_in(&dir, args, &mut report);
    let _ = std::fs::remove_dir_all(&dir);
    result.map(|()| report)
}

fn run_in(dir: &Path, args: BenchArgs, report: &mut Report) -> CliResult<()> {
    let image = dir.join("disk.img");
    let content: Vec<u8> = (0..IMAGE_MIB << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &content).map_err(|e| e.to_string())?;
    let host_copy: PathBuf = dir.join("host-copy.img");
    std::fs::write(&host_copy, &content).map_err(|e| e.to_string())?;
    drop(content);
    let rounds = args.runs.clamp(3, 7);

    for (request, total) in [(4096u64, 16u64 << 20), (64 << 10, IMAGE_MIB << 20)] {
        for write in [false, true] {
            let (mut guest, mut host) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                guest.push(guest_throughput(&image, write, request, total)?);
                host.push(host_throughput(
                    if write { &host_copy } else { &image },
                    write,
                    request,
                    total,
                )?);
            }
            let (name, host_name) = if write {
                ("blk_write_mb_per_s", "host_write_mb_per_s")
            } else {
                ("blk_read_mb_per_s", "host_read_mb_per_s")
            };
            let params = [
                ("request_kib", json!(request >> 10)),
                ("mib_moved", json!(total >> 20)),
            ];
            report.add(name, median(guest), "MB/s", &params);
            let tool = if write {
                "pwrite, no sync (page cache)"
            } else {
                "pread (page cache)"
            };
            let mut host_params = params.to_vec();
            host_params.push(("tool", json!(tool)));
            report.add(host_name, median(host), "MB/s", &host_params);
        }
    }

    // Fork latency: the same paused 256 MiB guest (same memory, same pages dirtied) with and
    // without a disk, then a guest writing its disk as fast as it can while it is forked.
    let without = vm(Workload::Entropy, None, &[])?;
    without.run_to_ready(Duration::from_secs(30)).map_err(err)?;
    without.fork(&ForkOptions::default()).map_err(err)?; // the first fork freezes the RAM file
    let with = vm(Workload::Entropy, Some(&image), &[])?;
    with.run_to_ready(Duration::from_secs(30)).map_err(err)?;
    with.fork(&ForkOptions::default()).map_err(err)?;
    // At least 100 forks a round: with 20 the ratio of two ~0.3 ms medians swung 0.96-1.13
    // between runs on this shared host; with 100, 0.90-0.97.
    let ratio_runs = args.runs.max(100);
    let (mut no_disk, mut disk) = (Vec::new(), Vec::new());
    // Rounds of one VM's forks at a time (the pool premaps shells for the family forked last,
    // so forks of the two taken in turn would pay for each other's mappings), in the order
    // A B B A A B: the host's noise and any drift fall on both alike.
    for round in 0..6 {
        let without_first = matches!(round, 0 | 3 | 4);
        for take_without in [without_first, !without_first] {
            if take_without {
                no_disk.push(fork_p50(&without, ratio_runs)?);
            } else {
                disk.push(fork_p50(&with, ratio_runs)?);
            }
        }
    }
    let (no_disk, disk) = (median(no_disk), median(disk));
    let params = [("mem_mib", json!(256)), ("pooled", json!(true))];
    report.add("fork_without_disk_latency_us_p50", no_disk, "us", &params);
    report.add("fork_with_disk_latency_us_p50", disk, "us", &params);
    report.add("fork_with_disk_ratio", disk / no_disk, "x", &params);
    drop((without, with));

    let busy = vm(
        Workload::Diskbench,
        Some(&image),
        &[
            (mailbox::PARAM0, 4096),
            (mailbox::PARAM1, 1),
            (mailbox::PARAM2, u64::MAX),
        ],
    )?;
    busy.start().map_err(err)?;
    std::thread::sleep(Duration::from_millis(200));
    let latency = fork_p50(&busy, args.runs.max(20))?;
    let done = busy
        .ram()
        .read_u64(MAILBOX + mailbox::PROGRESS)
        .map_err(err)?;
    busy.stop();
    vsock_round_trips(dir, report)?;
    deep_stack_reads(&image, report)?;
    super::linux::run(report)?;
    report.add(
        "fork_with_busy_disk_latency_us_p50",
        latency,
        "us",
        &[
            ("mem_mib", json!(256)),
            ("guest_writes_4k_while_forked", json!(done)),
        ],
    );
    Ok(())
}

/// A disk whose VM wrote a chunk between each of 1,000 forks: the VMM's 4 KiB reads of a
/// chunk nobody wrote (the path that walks every frozen layer) with the compactor's merged
/// stack, and with all 1,000 layers kept.
fn deep_stack_reads(image: &Path, report: &mut Report) -> CliResult<()> {
    use vmfork::devices::virtio::block::disk::{BaseImage, Disk, DiskInstant};
    const FORKS: u64 = 1000;
    const READS: usize = 2000;
    let base = std::sync::Arc::new(BaseImage::open(image).map_err(|e| e.to_string())?);
    let mut disk = Disk::new(DiskInstant::new(base));
    // Each freeze's newest layer, kept: the stack as it would be without compaction (which
    // runs in the background as the real one grows).
    let mut layers = Vec::new();
    for i in 0..FORKS {
        disk.write(i * 4096, &[i as u8; 4096])
            .map_err(|e| e.to_string())?;
        let instant = disk.freeze();
        layers.push(instant.layers.last().cloned().ok_or("no layer")?);
    }
    let deep = DiskInstant {
        base: disk.below().base,
        layers: std::sync::Arc::from(layers),
    };
    disk.compact_now().map_err(|e| e.to_string())?;
    let p50 = |d: &Disk| -> CliResult<f64> {
        let mut buf = vec![0u8; 4096];
        let mut samples = Vec::with_capacity(READS);
        for r in 0..READS {
            let at = (FORKS + (r as u64 % 1000)) * 4096;
            let t = Instant::now();
            d.read(at, &mut buf).map_err(|e| e.to_string())?;
            samples.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(median(samples))
    };
    let compacted = p50(&disk)?;
    let uncompacted = p50(&Disk::new(deep.clone()))?;
    let params = [
        ("forks_with_a_write_between", json!(FORKS)),
        ("layers_compacted", json!(disk.below().layers.len())),
        ("layers_uncompacted", json!(deep.layers.len())),
    ];
    report.add(
        "disk_read_after_1000_forks_us_p50",
        compacted,
        "us",
        &params,
    );
    report.add(
        "disk_read_after_1000_forks_uncompacted_us_p50",
        uncompacted,
        "us",
        &params,
    );
    Ok(())
}

/// TSC ticks per microsecond, measured against the monotonic clock.
fn tsc_per_us() -> f64 {
    // SAFETY: rdtsc has no memory effects.
    let read = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t, c) = (Instant::now(), read());
    std::thread::sleep(Duration::from_millis(100));
    (read() - c) as f64 / (t.elapsed().as_secs_f64() * 1e6)
}

/// The `vsock` guest's echoes through a host socket: each round trip timed by the guest's TSC.
fn vsock_round_trips(dir: &Path, report: &mut Report) -> CliResult<()> {
    const PORT: u64 = 5000;
    const TRIPS: u64 = 2000;
    let uds = dir.join("v.sock");
    let listener = std::os::unix::net::UnixListener::bind(format!("{}_{PORT}", uds.display()))
        .map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let config = VmConfig {
        vsock: Some(vmfork::devices::VsockConfig {
            guest_cid: 3,
            uds_path: uds,
        }),
        ..VmConfig::default()
    };
    let vm = super::guest_vm(
        Workload::Vsock,
        config,
        &[(mailbox::PARAM0, PORT), (mailbox::PARAM1, TRIPS)],
    )?;
    vm.run_to_ready(Duration::from_secs(60)).map_err(err)?;
    let per_us = tsc_per_us();
    let mut samples = Vec::with_capacity(TRIPS as usize);
    for i in 0..TRIPS {
        let at = guests::drivers::vsock_buffers::ROUND_TRIPS + i * 8;
        samples.push(vm.ram().read_u64(at).map_err(err)? as f64 / per_us);
    }
    let (p50, p99) = super::p50_p99(&mut samples);
    let params = [("round_trips", json!(TRIPS)), ("payload_bytes", json!(8))];
    report.add("vsock_round_trip_us_p50", p50, "us", &params);
    report.add("vsock_round_trip_us_p99", p99, "us", &params);
    Ok(())
}
