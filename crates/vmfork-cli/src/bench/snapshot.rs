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

/// What `dd if=/dev/zero bs=1M count=MIB conv=fdatasync` does, in this process (the suite
/// runs on a seccomp-confined thread, which may not start programs): `mib` 1 MiB writes of
/// zeroes into a new file in `dir`, then fdatasync; MB/s (10^6 bytes).
fn dd_mb_per_s(dir: &Path, mib: u64) -> CliResult<f64> {
    use std::io::Write;
    let path = dir.join("dd.bin");
    let block = vec![0u8; 1 << 20];
    let started = Instant::now();
    let written = std::fs::File::create(&path).and_then(|mut file| {
        for _ in 0..mib {
            file.write_all(&block)?;
        }
        file.sync_data()
    });
    let secs = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    written.map_err(|e| format!("the dd baseline could not write {}: {e}", path.display()))?;
    Ok((mib << 20) as f64 / secs / 1e6)
}

/// Snapshots a running `counter` (short delay loop) `count` times into directories under
/// `dir`, stopped at CPL3 with its stop value set to its next number.
fn snapshot_counter_before_its_last_line(
    mem_mib: u64,
    dir: &Path,
    count: usize,
) -> CliResult<Vec<PathBuf>> {
    let vm = boot(Workload::Counter, mem_mib)?;
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM0, 1000)
        .map_err(err)?;
    vm.start().map_err(err)?;
    let progress = || vm.ram().read_u64(MAILBOX + mailbox::PROGRESS).map_err(err);
    let deadline = Instant::now() + Duration::from_secs(10);
    while progress()? < 2 {
        if Instant::now() > deadline {
            return Err("counter did not start counting".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().map_err(err)?;
    let at = progress()?;
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM2, at + 1)
        .map_err(err)?;
    let snaps = (0..count)
        .map(|i| {
            let to = dir.join(format!("restore-{mem_mib}-{i}"));
            vm.snapshot(&to, &SnapshotOptions::default()).map_err(err)?;
            Ok(to)
        })
        .collect();
    vm.stop();
    vm.wait();
    snaps
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
    // Alternate snapshot and dd on the same disk, each going first in every other round: on a
    // VM host the page cache now and then lands on memory the hypervisor took back, which
    // costs either writer ~2 s per GiB in that round (dd alone shows it). Medians of 7.
    // The first snapshot also turns the RAM copy-on-write; every one writes all of it.
    let (mut writes, mut disks) = (Vec::new(), Vec::new());
    for round in 0..7 {
        if round % 2 == 1 {
            disks.push(dd_mb_per_s(dir, 1024)?);
        }
        let to = dir.join(format!("full-{round}"));
        let snap = vm.snapshot(&to, &SnapshotOptions::default()).map_err(err)?;
        writes.push((1024u64 << 20) as f64 / (snap.total_us as f64 / 1e6) / 1e6);
        let _ = std::fs::remove_dir_all(&to);
        if round % 2 == 0 {
            disks.push(dd_mb_per_s(dir, 1024)?);
        }
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
        report.add_median(
            "snapshot_pause_ms_p50",
            &mut samples,
            "ms",
            &[("mem_mib", json!(mem_mib))],
        );
    }

    // Restore: from the call to the guest's next exit. The snapshot is of a `counter` paused
    // at CPL3 (as real snapshots are) with its stop value set to the next number, so the
    // restored guest runs a few instructions, prints one line and exits: three exits (~75 µs
    // here) on top of the restore. `open`: `first`, a snapshot this process never restored
    // (opened and mapped from scratch); `again`, one opened again while pooled shells still
    // map its memory file; `cached`, one kept open (as the API keeps them).
    for mem_mib in [256u64, 1024, 4096] {
        let snaps = snapshot_counter_before_its_last_line(mem_mib, dir, args.runs + 1)?;
        vmfork::vm::pool::keep_ready(&config(mem_mib), 4).map_err(err)?;
        let kept = Snapshot::open(&snaps[0]).map_err(err)?;
        for open in ["first", "again", "cached"] {
            let mut samples = Vec::with_capacity(args.runs);
            for i in 0..args.runs {
                let t = Instant::now();
                let opened;
                let snap = match open {
                    "cached" => &kept,
                    _ => {
                        let path = if open == "first" {
                            &snaps[i + 1]
                        } else {
                            &snaps[0]
                        };
                        opened = Snapshot::open(path).map_err(err)?;
                        &opened
                    }
                };
                let vm = snap.restore(SerialSink::Discard).map_err(err)?;
                let exit = vm.run_inline().map_err(err)?;
                samples.push(t.elapsed().as_secs_f64() * 1e6);
                if exit != ExitReason::GuestExit(0) {
                    return Err(format!("restored counter: {exit}"));
                }
            }
            report.add_median(
                "restore_latency_us_p50",
                &mut samples,
                "us",
                &[
                    ("mem_mib", json!(mem_mib)),
                    ("open", json!(open)),
                    ("to", json!("next exit of a counter at CPL3 (3 exits)")),
                ],
            );
        }
        vmfork::vm::pool::drain();
        for snap in snaps {
            let _ = std::fs::remove_dir_all(snap);
        }
    }

    // Against QEMU, process to process: both start, load the saved `hello` and run it to its
    // first line. QEMU: `migrate exec:` to a file from a VM stopped at its entry (-S), then
    // `-incoming exec:cat FILE` and `cont` once the migration completed.
    if let Some((qemu_ms, vmfork_ms)) = qemu_and_vmfork_restore_ms(dir, args.runs.min(10))? {
        let params = [
            ("mem_mib", json!(256)),
            ("guest", json!("hello")),
            ("to", json!("first serial line, process start included")),
        ];
        report.add("qemu_restore_latency_ms_p50", qemu_ms, "ms", &params);
        report.add(
            "vmfork_restore_process_latency_ms_p50",
            vmfork_ms,
            "ms",
            &params,
        );
        report.add(
            "restore_vs_qemu_ratio",
            qemu_ms / vmfork_ms,
            "ratio",
            &params,
        );
    }
    Ok(())
}

/// A QEMU human monitor on a Unix socket.
pub(super) struct Monitor(std::os::unix::net::UnixStream);

impl Monitor {
    pub(super) fn connect(path: &Path, deadline: Instant) -> CliResult<Self> {
        loop {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut m = Monitor(s);
                    m.read_to_prompt()?;
                    return Ok(m);
                }
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(200))
                }
                Err(e) => return Err(format!("QEMU monitor {}: {e}", path.display())),
            }
        }
    }

    fn read_to_prompt(&mut self) -> CliResult<String> {
        use std::io::Read;
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.ends_with("(qemu) ") {
            let n = self
                .0
                .read(&mut buf)
                .map_err(|e| format!("QEMU monitor: {e}"))?;
            if n == 0 {
                return Err("QEMU monitor closed".into());
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        Ok(text)
    }

    pub(super) fn command(&mut self, cmd: &str) -> CliResult<String> {
        use std::io::Write;
        writeln!(self.0, "{cmd}").map_err(|e| format!("QEMU monitor: {e}"))?;
        self.read_to_prompt()
    }

    /// Polls `info migrate` until the migration completed.
    pub(super) fn wait_migrated(&mut self, deadline: Instant) -> CliResult<()> {
        loop {
            let reply = self.command("info migrate")?;
            if reply.contains("Migration status: completed") {
                return Ok(());
            }
            if reply.contains("failed") || Instant::now() > deadline {
                return Err(format!("QEMU migration did not complete: {reply}"));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

pub(super) fn qemu_command(qemu: &str, elf: &Path, mem_mib: u64, monitor: &Path) -> Command {
    qemu_command_for(qemu, elf, mem_mib, monitor, 30)
}

/// [`qemu_command`] killed after `seconds` instead of 30.
pub(super) fn qemu_command_for(
    qemu: &str,
    elf: &Path,
    mem_mib: u64,
    monitor: &Path,
    seconds: u32,
) -> Command {
    let mut c = Command::new("timeout");
    c.arg(seconds.to_string())
        .args([qemu, "-M", "microvm", "-accel", "kvm", "-m"])
        .arg(format!("{mem_mib}M"))
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
        ])
        .args([
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0x501,iosize=2",
            "-kernel",
        ])
        .arg(elf)
        .arg("-monitor")
        .arg(format!("unix:{},server,nowait", monitor.display()));
    c
}

/// Milliseconds from starting a process to the first line `Hello` on its stdout.
fn time_to_hello(mut cmd: Command, after_spawn: impl FnOnce() -> CliResult<()>) -> CliResult<f64> {
    use std::io::Read;
    let started = Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let result = after_spawn().and_then(|()| {
        let mut out = child.stdout.take().ok_or("no stdout")?;
        let mut text = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&text).contains("Hello") {
            let n = out.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!("{cmd:?} ended without printing Hello"));
            }
            text.extend_from_slice(&buf[..n]);
        }
        Ok(started.elapsed().as_secs_f64() * 1e3)
    });
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// QEMU (microvm, KVM) and `vmfork restore` restoring the `hello` guest saved at its entry
/// point, each as a new process, to the guest's first line. `None` when QEMU is not installed.
fn qemu_and_vmfork_restore_ms(dir: &Path, runs: usize) -> CliResult<Option<(f64, f64)>> {
    let qemu = "qemu-system-x86_64";
    if let Err(e) = Command::new(qemu).arg("--version").output() {
        // Also where the suite runs confined (its seccomp pass may not start programs).
        eprintln!("vmfork bench: cannot run {qemu} ({e}); skipping the QEMU comparison");
        return Ok(None);
    }
    const MEM_MIB: u64 = 256;
    let elf = dir.join("hello.elf");
    std::fs::write(&elf, Workload::Hello.elf()).map_err(|e| e.to_string())?;
    let state = dir.join("qemu.state");
    let src_mon = dir.join("qemu-src.mon");
    let mut src = qemu_command(qemu, &elf, MEM_MIB, &src_mon)
        .arg("-S")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {qemu}: {e}"))?;
    let saved = (|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut m = Monitor::connect(&src_mon, deadline)?;
        m.command(&format!("migrate \"exec:cat > {}\"", state.display()))?;
        m.wait_migrated(deadline)?;
        let _ = m.command("quit");
        Ok::<(), String>(())
    })();
    let _ = src.kill();
    let _ = src.wait();
    saved?;

    let vm = boot(Workload::Hello, MEM_MIB)?;
    let snap_dir = dir.join("hello-snap");
    vm.snapshot(&snap_dir, &SnapshotOptions::default())
        .map_err(err)?;
    drop(vm);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;

    let (mut qemu_ms, mut vmfork_ms) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let mon = dir.join(format!("qemu-dst-{i}.mon"));
        let mut cmd = qemu_command(qemu, &elf, MEM_MIB, &mon);
        cmd.arg("-incoming")
            .arg(format!("exec:cat {}", state.display()));
        qemu_ms.push(time_to_hello(cmd, || {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut m = Monitor::connect(&mon, deadline)?;
            m.wait_migrated(deadline)?;
            m.command("cont").map(drop)
        })?);
        let mut cmd = Command::new(&exe);
        cmd.arg("restore").arg(&snap_dir);
        vmfork_ms.push(time_to_hello(cmd, || Ok(()))?);
    }
    let (q, _) = p50_p99(&mut qemu_ms);
    let (v, _) = p50_p99(&mut vmfork_ms);
    Ok(Some((q, v)))
}
