//! Probe: how long dropping a fork takes, running (an `idle` guest halted in the kernel) or not.
use guests::Workload;
use std::time::Instant;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ForkOptions, Vm, VmConfig};
fn main() {
    let vm = Vm::boot(
        VmConfig {
            mem_bytes: 1 << 30,
            ..Default::default()
        },
        SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(Workload::Idle.elf())),
    )
    .unwrap();
    vm.start().unwrap();
    drop(vm.fork(&ForkOptions::default()).unwrap());
    for running in [false, true, false, true] {
        let mut kids: Vec<Vm> = (0..20)
            .map(|_| vm.fork(&ForkOptions::default()).unwrap())
            .collect();
        if running {
            for k in &kids {
                k.start().unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let t = Instant::now();
        let k = kids.pop().unwrap();
        k.stop();
        let stop = t.elapsed();
        k.wait();
        let wait = t.elapsed();
        drop(k);
        let dropped = t.elapsed();
        let t2 = Instant::now();
        drop(kids);
        println!(
            "running {running}: stop {stop:?} wait {wait:?} drop {dropped:?}; 19 more {:?}",
            t2.elapsed()
        );
    }
    vm.stop();
}
