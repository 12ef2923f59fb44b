//! The vmfork test-guest kit: tiny x86-64 guests assembled in Rust.
//!
//! Each guest enters long mode in a few ring-0 instructions (ring 0 is emulated, and slow, on
//! nested paravirtual KVM hosts), then runs its workload at CPL3 with IOPL=3. Every guest is an
//! ELF with both a Xen PVH note (32-bit entry) and a 64-bit `e_entry`, so it boots in vmfork,
//! in QEMU (`qemu-system-x86_64 -M microvm -kernel guest.elf`) and in other PVH loaders.

pub mod drivers;
mod elf;
pub mod layout;
mod runtime;
pub mod workloads;

pub use workloads::{
    dirty_instant_problem, memtouch_pattern, parser_bug_input, ParserBug, DEFAULT_COUNTER_DELAY,
    DEFAULT_DIRTY_PAGES, DEFAULT_MEMTOUCH_PAGES, HARNESS_CRASH_INPUT,
};

/// A built-in guest workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    Hello,
    Counter,
    Memtouch,
    Harness,
    Triple,
    Spin,
    Dirty,
    Idle,
    Parser,
    Entropy,
    Disk,
    Diskbench,
    Vsock,
    Net,
    Assist,
    Interrupts,
    Clock,
}

impl Workload {
    /// Every workload, in the order `vmfork guests` lists them.
    pub const ALL: [Workload; 17] = [
        Workload::Hello,
        Workload::Counter,
        Workload::Memtouch,
        Workload::Harness,
        Workload::Triple,
        Workload::Spin,
        Workload::Dirty,
        Workload::Idle,
        Workload::Parser,
        Workload::Entropy,
        Workload::Disk,
        Workload::Diskbench,
        Workload::Vsock,
        Workload::Net,
        Workload::Assist,
        Workload::Interrupts,
        Workload::Clock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Hello => "hello",
            Workload::Counter => "counter",
            Workload::Memtouch => "memtouch",
            Workload::Harness => "harness",
            Workload::Triple => "triple",
            Workload::Spin => "spin",
            Workload::Dirty => "dirty",
            Workload::Idle => "idle",
            Workload::Parser => "parser",
            Workload::Entropy => "entropy",
            Workload::Disk => "disk",
            Workload::Diskbench => "diskbench",
            Workload::Vsock => "vsock",
            Workload::Net => "net",
            Workload::Assist => "assist",
            Workload::Interrupts => "interrupts",
            Workload::Clock => "clock",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Workload::Hello => "prints a line and exits 0",
            Workload::Counter => "prints `counter N` forever (mailbox: PARAM0 delay, PARAM2 stop at N)",
            Workload::Memtouch => "fills PARAM0 pages from 4 MiB with a pattern seeded by PARAM1, exits 0",
            Workload::Harness => "fuzzing target: exits with how much of \"FUZZ\" the input starts with; \"FUZZ\" crashes",
            Workload::Triple => "prints a line, then triple-faults",
            Workload::Spin => "spins forever without output",
            Workload::Dirty => "rewrites PARAM0 pages from 4 MiB forever, stamping a generation number (PARAM1: delay per page)",
            Workload::Idle => "halts at ring 0, counting interrupts in PROGRESS (PARAM0: LAPIC timer period, 0 = none)",
            Workload::Parser => "fuzzing target: a TLV parser with three planted bugs at different depths; exits 0 (valid) or 1 (malformed)",
            Workload::Disk => "virtio-blk driver (slot 1): reads PARAM0 bytes, writes PARAM1 to sector 8, writes the ready port, reads sector 8 again, writes PARAM2 to sector 16, reading each back; exits 0",
            Workload::Diskbench => "virtio-blk load (slot 1): PARAM2 requests of PARAM0 bytes (default 4096), reads (PARAM1 0) or writes, sequential; exits 0",
            Workload::Vsock => "virtio-vsock driver: connects to host port PARAM0, echoes PARAM1 counters, writes the ready port, sends one more; exits 0",
            Workload::Net => "virtio-net driver: writes the ready port, broadcasts a frame carrying PARAM0, waits for one from another VM; exits 0",
            Workload::Assist => "ring 0: lock cmpxchg16b (a hit and a miss) and int3 with its own handler, results in the mailbox; exits 0",
            Workload::Interrupts => "ring 0: routes the generation id's and virtio slot 0's lines through the IOAPIC, takes the rng's interrupt, resets the i8042 keyboard and reads its two answer bytes each after its interrupt, writes the ready port, halts until a generation-id interrupt (a fork's); counts in the mailbox by vector; exits 0",
            Workload::Clock => "reads the TSC at CPL3 into the mailbox (CLOCK_TSC) and writes the ready port, forever",
            Workload::Entropy => "virtio-rng and generation-id driver: reads the generation id and PARAM0 random bytes, writes the ready port, reads both again, exits 0",
        }
    }

    /// Looks a workload up by its name.
    pub fn from_name(name: &str) -> Option<Workload> {
        Self::ALL.into_iter().find(|w| w.name() == name)
    }

    /// Whether the workload writes to the ready port before it reads its input (fuzzing
    /// targets: fork them there).
    pub fn announces_ready(self) -> bool {
        matches!(
            self,
            Workload::Harness
                | Workload::Parser
                | Workload::Memtouch
                | Workload::Entropy
                | Workload::Disk
                | Workload::Interrupts
                | Workload::Clock
        )
    }

    /// The guest-virtual (= physical) range `[start, end)` of the workload's own code, for
    /// tools that disassemble it (coverage breakpoints).
    pub fn code_range(self) -> (u64, u64) {
        let len = self.code_and_ring().0.len() as u64;
        (layout::USER_CODE, layout::USER_CODE + len)
    }

    fn code_and_ring(self) -> (Vec<u8>, runtime::Ring) {
        use runtime::Ring;
        let (code, ring) = match self {
            Workload::Hello => (workloads::hello(), Ring::User),
            Workload::Counter => (workloads::counter(), Ring::User),
            Workload::Memtouch => (workloads::memtouch(), Ring::User),
            Workload::Harness => (workloads::harness(), Ring::User),
            Workload::Triple => (workloads::triple(), Ring::User),
            Workload::Spin => (workloads::spin(), Ring::User),
            Workload::Dirty => (workloads::dirty(), Ring::User),
            Workload::Idle => (workloads::idle(), Ring::Kernel),
            Workload::Parser => (workloads::parser(), Ring::User),
            Workload::Entropy => (drivers::entropy(), Ring::User),
            Workload::Disk => (drivers::disk(), Ring::User),
            Workload::Diskbench => (drivers::diskbench(), Ring::User),
            Workload::Vsock => (drivers::vsock(), Ring::User),
            Workload::Net => (drivers::net(), Ring::User),
            Workload::Assist => (workloads::assist(), Ring::Kernel),
            Workload::Interrupts => (drivers::interrupts(), Ring::Kernel),
            Workload::Clock => (workloads::clock(), Ring::User),
        };
        // The assembler input is fixed at compile time, so failure here is a bug in this crate.
        (code.expect("built-in workload assembles"), ring)
    }

    /// The flat load image (placed at [`layout::LOAD_ADDR`], 64-bit entry at its first byte).
    pub fn image(self) -> Vec<u8> {
        let (code, ring) = self.code_and_ring();
        runtime::build_image(&code, ring).expect("built-in runtime assembles")
    }

    /// The guest as an ELF with a PVH note (32-bit entry) and a 64-bit `e_entry`.
    pub fn elf(self) -> Vec<u8> {
        elf::write_elf(
            &self.image(),
            layout::LOAD_ADDR,
            layout::ENTRY64,
            Some(layout::PVH_ENTRY),
        )
    }

    /// The guest as an ELF that also loads its mailbox page with `params` (mailbox offset,
    /// value) filled in: a guest's parameters baked in for loaders that cannot write guest
    /// memory (QEMU's `-kernel`).
    pub fn elf_with_params(self, params: &[(u64, u64)]) -> Vec<u8> {
        let mut mailbox = vec![0u8; 4096];
        for &(offset, value) in params {
            let at = offset as usize;
            if let Some(slot) = mailbox.get_mut(at..at + 8) {
                slot.copy_from_slice(&value.to_le_bytes());
            }
        }
        elf::write_elf_with(
            &self.image(),
            layout::LOAD_ADDR,
            layout::ENTRY64,
            Some(layout::PVH_ENTRY),
            Some((layout::MAILBOX, &mailbox)),
        )
    }

    /// The guest as an ELF with only the 64-bit entry (Linux-style boot).
    pub fn elf_without_pvh(self) -> Vec<u8> {
        elf::write_elf(&self.image(), layout::LOAD_ADDR, layout::ENTRY64, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_assembles_into_an_elf() {
        for w in Workload::ALL {
            let elf = w.elf();
            assert_eq!(&elf[..4], b"\x7fELF", "{}", w.name());
            assert_eq!(Workload::from_name(w.name()), Some(w));
        }
        assert_eq!(Workload::from_name("nope"), None);
    }
}
