//! Probe: forks a running `dirty` guest of N pages (arg 1, delay arg 2) five times, printing the time per generation, the fork call and the pause.
use guests::layout::{mailbox, MAILBOX};
use guests::Workload;
use vmfork::boot::{BootSpec, Kernel};
use vmfork::devices::SerialSink;
use vmfork::{ForkOptions, Vm, VmConfig};
fn main() {
    let pages: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(10000);
    let delay: u64 = std::env::args()
        .nth(2)
        .map(|a| a.parse().unwrap())
        .unwrap_or(0);
    let vm = Vm::boot(
        VmConfig {
            mem_bytes: 1 << 30,
            ..Default::default()
        },
        SerialSink::Discard,
        &BootSpec::new(Kernel::Elf(Workload::Dirty.elf())),
    )
    .unwrap();
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM0, pages)
        .unwrap();
    vm.ram()
        .write_u64(MAILBOX + mailbox::PARAM1, delay)
        .unwrap();
    vm.start().unwrap();
    let g = || vm.ram().read_u64(MAILBOX + mailbox::PROGRESS).unwrap();
    while g() < 1 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    drop(vm.fork(&ForkOptions::default()).unwrap());
    for _ in 0..5 {
        let s = g();
        let t = std::time::Instant::now();
        while g() < s + 2 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let pass = t.elapsed() / 2;
        let t = std::time::Instant::now();
        let c = vm.fork(&ForkOptions::default()).unwrap();
        println!(
            "pass {:?} fork {:?} pause {:?}",
            pass,
            t.elapsed(),
            vm.last_pause().unwrap()
        );
        drop(c);
    }
    vm.stop();
}
