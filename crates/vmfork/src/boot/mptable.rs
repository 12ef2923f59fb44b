//! The MP table (Intel MultiProcessor Specification 1.4) in the EBDA: how a guest without ACPI
//! finds its CPUs (one processor entry per vCPU, APIC id = index), the IOAPIC and the routing
//! of ISA interrupts 0-15 and the device lines above them to its pins. Linux reads it to bring
//! up more than the boot CPU.

use super::layout::EBDA_START;
use crate::memory::GuestRam;

const IOAPIC_ADDR: u32 = 0xfec0_0000;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const APIC_VERSION: u8 = 0x14;
/// IOAPIC pins: ISA lines 0-15, then the device lines up to 23.
const IOAPIC_PINS: u8 = 24;
const BUS_ISA: &[u8; 6] = b"ISA   ";

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

/// The floating pointer structure and the configuration table for `vcpus` CPUs, as bytes to
/// place at `at`.
pub fn build(vcpus: u8, at: u64) -> Vec<u8> {
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = if cpu == 0 { 0b11 } else { 0b01 }; // enabled, boot processor
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(BUS_ISA);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, APIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS {
        // Conforming polarity and trigger (edge, active high on ISA).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0: ExtINT (the PIC), LINT1: NMI, on every local APIC (0xff).
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let config_at = at + 16;
    let mut config = Vec::new();
    config.extend_from_slice(b"PCMP");
    let length = (44 + entries.len()) as u16;
    config.extend_from_slice(&length.to_le_bytes());
    config.push(4); // spec revision 1.4
    config.push(0); // checksum, below
    config.extend_from_slice(b"VMFORK  "); // OEM id
    config.extend_from_slice(b"VMFORK-VM   "); // product id
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&count.to_le_bytes());
    config.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    config.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    config.push(0); // extended table checksum
    config.push(0); // reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut floating = Vec::new();
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(config_at as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(4); // revision 1.4
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // features: a configuration table is present
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&config);
    floating
}

/// Writes the MP table for `vcpus` CPUs at the start of the EBDA.
pub fn write(ram: &GuestRam, vcpus: u8) -> crate::Result<()> {
    ram.write(EBDA_START, &build(vcpus, EBDA_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_checks_out_and_lists_every_cpu() {
        let table = build(4, EBDA_START);
        assert_eq!(&table[..4], b"_MP_");
        assert_eq!(checksum(&table[..16]), 0, "floating pointer checksum");
        let config = &table[16..];
        assert_eq!(&config[..4], b"PCMP");
        let length = u16::from_le_bytes([config[4], config[5]]) as usize;
        assert_eq!(length, config.len());
        assert_eq!(checksum(config), 0, "configuration table checksum");
        // 4 processors (20 bytes each), then a bus, the IOAPIC, 24 routes and 2 local lines.
        let count = u16::from_le_bytes([config[34], config[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        assert_eq!(config[44], ENTRY_PROCESSOR);
        assert_eq!(config[44 + 3], 0b11, "vCPU 0 boots");
        assert_eq!(config[44 + 20 + 1], 1, "vCPU 1's APIC id");
        assert_eq!(config[44 + 80], ENTRY_BUS);
    }
}
