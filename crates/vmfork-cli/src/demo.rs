//! `vmfork demo`: the main job on the built-in guests: boot, pause, fork, reset, snapshot and
//! restore, with timings.

use crate::CliResult;
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use std::time::{Duration, Instant};
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ForkOptions, Vm, VmConfig};

fn err(e: vmfork::Error) -> String {
    e.to_string()
}

pub fn demo() -> CliResult<u8> {
    let config = VmConfig {
        mem_bytes: 256 << 20,
        ..VmConfig::default()
    };

    println!("== 1. boot the `hello` guest (256 MiB, 1 vCPU)");
    let (sink, serial) = SerialSink::buffer();
    let t0 = Instant::now();
    let vm = Vm::boot(
        config.clone(),
        sink,
        &BootSpec::new(Kernel::Elf(Workload::Hello.elf())),
    )
    .map_err(err)?;
    let reason = vm.run_inline().map_err(err)?;
    let first = serial.first_byte_at().map(|t| t - t0);
    print!("   guest says: {}", serial.text());
    println!(
        "   {} ; first serial byte after {:?}",
        reason.summary(),
        first.unwrap_or_default()
    );

    println!("== 2. run `counter`, pause it, read its state, resume it, fork it while it runs");
    let (sink, serial) = SerialSink::buffer();
    let vm = Vm::boot(
        config,
        sink,
        &BootSpec::new(Kernel::Elf(Workload::Counter.elf())),
    )
    .map_err(err)?;
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM0, 2_000_000)
        .map_err(err)?;
    vm.start().map_err(err)?;
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    vm.pause().map_err(err)?;
    let pause_took = t.elapsed();
    let count = vm
        .ram()
        .read_u64(MAILBOX + mailbox::PROGRESS)
        .map_err(err)?;
    let state = vm.vcpu_state(0).map_err(err)?;
    println!(
        "   paused in {pause_took:?} at counter {count}: rip={:#x} rbx={} cpl={} ({} MSRs saved)",
        state.regs.rip,
        state.regs.rbx,
        state.sregs.cs.selector & 3,
        state.msrs.len()
    );
    std::thread::sleep(Duration::from_millis(50));
    let still = vm
        .ram()
        .read_u64(MAILBOX + mailbox::PROGRESS)
        .map_err(err)?;
    println!("   50 ms later, still paused at {still}");
    vm.resume().map_err(err)?;
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let child = vm.fork(&ForkOptions::default()).map_err(err)?;
    let fork_took = t.elapsed();
    let at_fork = child
        .ram()
        .read_u64(MAILBOX + mailbox::PROGRESS)
        .map_err(err)?;
    child
        .ram()
        .write_u64(MAILBOX + mailbox::PARAM2, at_fork + 3)
        .map_err(err)?;
    child.start().map_err(err)?;
    let child_exit = child.wait();
    println!(
        "   forked the running VM in {fork_took:?} at counter {at_fork}; the child counted on \
         to {} and {}; the parent kept running",
        at_fork + 3,
        child_exit.summary()
    );
    let child_lines = child.serial().map(|s| s.text()).unwrap_or_default();
    println!(
        "   child's console: {:?}",
        child_lines.lines().collect::<Vec<_>>()
    );
    let t = Instant::now();
    let stats = child.reset().map_err(err)?;
    let reset_took = t.elapsed();
    let after_reset = child
        .ram()
        .read_u64(MAILBOX + mailbox::PROGRESS)
        .map_err(err)?;
    println!(
        "   reset the child in {reset_took:?} ({} dirtied pages copied back): counter is {after_reset} again",
        stats.pages_restored
    );

    println!("== 3. snapshot the running counter, restore it twice, each counts on");
    let dir = std::env::temp_dir().join(format!("vmfork-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let report = vm
        .snapshot(&dir, &vmfork::SnapshotOptions::default())
        .map_err(err)?;
    vm.stop();
    vm.wait();
    let text = serial.text();
    let last = text.lines().last().unwrap_or("");
    println!(
        "   snapshot {} in {:.2} ms (VM paused {:.3} ms), {} data pages in {}",
        &report.id[..8],
        report.total_us as f64 / 1000.0,
        report.pause_us as f64 / 1000.0,
        report.data_pages,
        dir.display()
    );
    println!("   original stopped; its last line: {last:?}");
    let t = Instant::now();
    let snap = vmfork::Snapshot::open(&dir).map_err(err)?;
    let restored: Vec<Vm> = (0..2)
        .map(|_| snap.restore(SerialSink::buffer().0))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    println!("   opened and restored 2 VMs in {:?}", t.elapsed());
    for (i, r) in restored.iter().enumerate() {
        let at = r.ram().read_u64(MAILBOX + mailbox::PROGRESS).map_err(err)?;
        r.ram()
            .write_u64(MAILBOX + mailbox::PARAM2, at + 2 + i as u64)
            .map_err(err)?;
        r.start().map_err(err)?;
        let exit = r.wait();
        let lines = r.serial().map(|s| s.text()).unwrap_or_default();
        println!(
            "   restore {i}: from counter {at}, {}; console {:?}",
            exit.summary(),
            lines.lines().collect::<Vec<_>>()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(0)
}
