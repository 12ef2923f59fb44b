//! Probe: a burst of N forks of a running `idle` guest, each started; prints the time of every
//! 100th fork and the total.
use guests::Workload;
use std::time::Instant;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ForkOptions, Vm, VmConfig};
fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(1000);
    let start_children = std::env::args().nth(2).as_deref() != Some("paused");
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
    let t = Instant::now();
    let mut kids = Vec::new();
    let mut last = Instant::now();
    for i in 0..n {
        let c = vm.fork(&ForkOptions::default()).unwrap();
        if start_children {
            c.start().unwrap();
        }
        kids.push(c);
        if i % 100 == 99 {
            println!("{} forks: last 100 took {:?}", i + 1, last.elapsed());
            last = Instant::now();
        }
    }
    println!("total {:?}", t.elapsed());
    let t = Instant::now();
    drop(kids);
    vmfork::vm::pool::drain();
    println!("teardown {:?}", t.elapsed());
    vm.stop();
}
