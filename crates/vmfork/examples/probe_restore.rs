use std::path::Path;
use std::time::Instant;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{Snapshot, SnapshotOptions, Vm, VmConfig};

fn main() {
    for mib in [256u64, 4096] {
        let cfg = VmConfig {
            mem_bytes: mib << 20,
            ..VmConfig::default()
        };
        let spec = BootSpec::new(Kernel::Elf(guests::Workload::Hello.elf()));
        let vm = Vm::boot(cfg.clone(), SerialSink::Discard, &spec).unwrap();
        let to = Path::new("/work/main/.probe-snap");
        let _ = std::fs::remove_dir_all(to);
        vm.snapshot(to, &SnapshotOptions::default()).unwrap();
        drop(vm);
        vmfork::vm::pool::keep_ready(&cfg, 4).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        for _ in 0..8 {
            let t = Instant::now();
            let snap = Snapshot::open(to).unwrap();
            let t1 = t.elapsed();
            let vm = snap.restore(SerialSink::Discard).unwrap();
            let t2 = t.elapsed();
            vm.run_inline().unwrap();
            let t3 = t.elapsed();
            println!(
                "{mib} open {:?} restore {:?} run {:?}",
                t1,
                t2 - t1,
                t3 - t2
            );
        }
        vmfork::vm::pool::drain();
    }
}
