//! The boot suite: time from "create a VM" to the guest's first serial byte, and pause+resume.

use super::{p50_p99, BenchArgs, Report};
use crate::CliResult;
use guests::Workload;
use serde_json::json;
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{Vm, VmConfig};

const MEM_MIB: u64 = 256;

pub fn run(args: BenchArgs) -> CliResult<Report> {
    let mut report = Report::new("boot");
    let elf = Workload::Hello.elf();
    let config = VmConfig {
        mem_bytes: MEM_MIB << 20,
        ..VmConfig::default()
    };

    let mut in_process = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let (sink, serial) = SerialSink::buffer();
        let t0 = Instant::now();
        let vm = Vm::boot(
            config.clone(),
            sink,
            &BootSpec::new(Kernel::Elf(elf.clone())),
        )
        .map_err(|e| e.to_string())?;
        vm.run_inline().map_err(|e| e.to_string())?;
        let first = serial
            .first_byte_at()
            .ok_or("the hello guest printed nothing")?;
        in_process.push((first - t0).as_secs_f64() * 1e6);
        // Tearing down an irqchip VM takes milliseconds: not part of boot.
        std::thread::spawn(move || drop(vm));
    }
    let (p50, p99) = p50_p99(&mut in_process);
    let params = [
        ("mode", json!("in_process")),
        ("mem_mib", json!(MEM_MIB)),
        ("guest", json!("hello")),
    ];
    report.add("boot_to_first_serial_us_p50", p50, "us", &params);
    report.add("boot_to_first_serial_us_p99", p99, "us", &params);

    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut whole = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t0 = Instant::now();
        let mut child = Command::new(&exe)
            .args(["run", "--guest", "hello", "--mem", &format!("{MEM_MIB}M")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        let mut out = child.stdout.take().ok_or("no stdout pipe")?;
        let mut byte = [0u8; 1];
        out.read_exact(&mut byte)
            .map_err(|e| format!("`vmfork run --guest hello` printed nothing: {e}"))?;
        whole.push(t0.elapsed().as_secs_f64() * 1e3);
        let status = child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("`vmfork run --guest hello` failed: {status}"));
        }
    }
    let (p50, p99) = p50_p99(&mut whole);
    let params = [
        ("mode", json!("process")),
        ("mem_mib", json!(MEM_MIB)),
        ("guest", json!("hello")),
    ];
    report.add("boot_to_first_serial_ms_p50", p50, "ms", &params);
    report.add("boot_to_first_serial_ms_p99", p99, "ms", &params);

    let (vm, _serial) = {
        let (sink, serial) = SerialSink::buffer();
        let vm = Vm::boot(
            config,
            sink,
            &BootSpec::new(Kernel::Elf(Workload::Counter.elf())),
        )
        .map_err(|e| e.to_string())?;
        (vm, serial)
    };
    vm.start().map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(20));
    let mut pause_resume = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t0 = Instant::now();
        vm.pause().map_err(|e| e.to_string())?;
        vm.resume().map_err(|e| e.to_string())?;
        pause_resume.push(t0.elapsed().as_secs_f64() * 1e6);
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.stop();
    let (p50, p99) = p50_p99(&mut pause_resume);
    let params = [("vcpus", json!(1)), ("guest", json!("counter"))];
    report.add("pause_resume_us_p50", p50, "us", &params);
    report.add("pause_resume_us_p99", p99, "us", &params);
    Ok(report)
}
