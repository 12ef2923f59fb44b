//! Probe: what creating and closing a KVM VM shell costs here, by part, with an in-kernel
//! irqchip, a split irqchip (LAPIC in the kernel, PIC/IOAPIC for the VMM) and none.
use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_CAP_SPLIT_IRQCHIP,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::Kvm;
use std::time::Instant;

fn main() {
    let kvm = Kvm::new().unwrap();
    let len: usize = 1 << 30;
    for mode in [
        "in-kernel",
        "slot-first",
        "warm-first",
        "no-pit",
        "split",
        "none",
    ] {
        let mut t_create = Vec::new();
        let mut t_chip = Vec::new();
        let mut t_vcpu = Vec::new();
        let mut t_slot = Vec::new();
        let mut t_close = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let vm = kvm.create_vm().unwrap();
            t_create.push(t.elapsed().as_micros());
            let addr0 = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            let mut early = 0;
            if mode == "slot-first" {
                let t = Instant::now();
                let region = kvm_userspace_memory_region {
                    slot: 1,
                    guest_phys_addr: 4 << 30,
                    memory_size: len as u64,
                    userspace_addr: addr0 as u64,
                    flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
                };
                unsafe { vm.set_user_memory_region(region) }.unwrap();
                early = t.elapsed().as_micros();
            }
            if mode == "warm-first" {
                let t = Instant::now();
                let mut region = kvm_userspace_memory_region {
                    slot: 0,
                    guest_phys_addr: 0,
                    memory_size: 4096,
                    userspace_addr: addr0 as u64,
                    flags: 0,
                };
                unsafe { vm.set_user_memory_region(region) }.unwrap();
                region.memory_size = 0;
                unsafe { vm.set_user_memory_region(region) }.unwrap();
                early = t.elapsed().as_micros();
            }
            let t = Instant::now();
            match mode {
                "no-pit" => {
                    vm.set_tss_address(0xfffb_d000).unwrap();
                    vm.create_irq_chip().unwrap();
                }
                "in-kernel" | "slot-first" | "warm-first" => {
                    vm.set_tss_address(0xfffb_d000).unwrap();
                    vm.create_irq_chip().unwrap();
                    vm.create_pit2(kvm_pit_config {
                        flags: KVM_PIT_SPEAKER_DUMMY,
                        ..Default::default()
                    })
                    .unwrap();
                }
                "split" => {
                    vm.set_tss_address(0xfffb_d000).unwrap();
                    let mut cap = kvm_enable_cap {
                        cap: KVM_CAP_SPLIT_IRQCHIP,
                        ..Default::default()
                    };
                    cap.args[0] = 24;
                    vm.enable_cap(&cap).unwrap();
                }
                _ => {}
            }
            t_chip.push(t.elapsed().as_micros());
            let t = Instant::now();
            let vcpu = vm.create_vcpu(0).unwrap();
            t_vcpu.push(t.elapsed().as_micros());
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            let t = Instant::now();
            let region = kvm_userspace_memory_region {
                slot: 1,
                guest_phys_addr: 4 << 30,
                memory_size: len as u64,
                userspace_addr: addr as u64,
                flags: kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES,
            };
            if mode != "slot-first" {
                unsafe { vm.set_user_memory_region(region) }.unwrap();
            }
            t_slot.push(t.elapsed().as_micros() + early);
            let t = Instant::now();
            drop(vcpu);
            drop(vm);
            t_close.push(t.elapsed().as_micros());
            unsafe { libc::munmap(addr, len) };
            unsafe { libc::munmap(addr0, len) };
        }
        let med = |v: &mut Vec<u128>| {
            v.sort();
            v[v.len() / 2]
        };
        println!("{mode:>9}: create_vm {} us, irqchip {} us, vcpu {} us, 1 GiB memslot {} us, close {} us",
            med(&mut t_create), med(&mut t_chip), med(&mut t_vcpu), med(&mut t_slot), med(&mut t_close));
    }
}
