//! ACPI tables for Linux guests (RSDP, XSDT, FADT, MADT, DSDT), built with rust-vmm's
//! `acpi_tables`: how a distribution kernel finds its CPUs and IOAPIC (MADT; Debian's kernels
//! have no MP-table parser), the virtio-mmio devices (DSDT `LNRO0005` entries: kernels without
//! `virtio_mmio.device=` on their command line still find them), the legacy ports, and the
//! generation id (a `VMGENCTR` device whose `ADDR` points at the id, notified through a
//! Generic Event Device on the generation id's line, so Linux's vmgenid driver reseeds on every
//! fork and restore).
//!
//! Hardware-reduced ACPI, as Firecracker does: no PM timer, SCI or GPE blocks to emulate.
//! The RSDP sits at [`RSDP_ADDR`] (where the BIOS-area scan finds it, and in the zero page's
//! `acpi_rsdp_addr`), the tables follow it in the reserved area below 1 MiB.

use crate::devices::irq::{VIRTIO_IRQ_BASE, VMGENID_IRQ};
use crate::devices::legacy::i8042::I8042_IRQ;
use crate::devices::legacy::serial::SERIAL_IRQ;
use crate::devices::virtio::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use crate::devices::vmgenid::VMGENID_BASE;
use crate::memory::GuestRam;
use acpi_tables::aml::{self, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

/// Where the RSDP goes (the start of the BIOS area Linux scans).
pub const RSDP_ADDR: u64 = 0xe_0000;
/// The end of the area the tables may use.
const TABLES_END: u64 = 0x10_0000;
const OEM_ID: [u8; 6] = *b"VMFORK";
const OEM_TABLE_ID: [u8; 8] = *b"VMFORKVM";
const OEM_REVISION: u32 = 1;
const LAPIC_ADDR: u32 = 0xfee0_0000;
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// MADT flags: the 8259 PICs are present too (PCAT_COMPAT).
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IA-PC boot architecture flags: an 8042 keyboard controller (the reset path), no VGA,
/// no MSI (nothing here is PCI).
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// The CMOS register holding the century (the RTC keeps it there).
const CMOS_CENTURY: u8 = 0x32;
/// The generation id's offset in its page (the id itself; see `devices::vmgenid`).
const VMGENID_ID_OFFSET: u64 = 0x10;

/// What the tables describe: the CPUs and the virtio-mmio slots in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Platform {
    pub vcpus: u8,
    pub virtio_slots: usize,
}

/// A `Device` with the given `_HID` (a string or an EISA id) and `_CRS`.
fn device(name: &str, hid: &dyn Aml, uid: u32, resources: Vec<&dyn Aml>) -> Encoded {
    let hid = aml::Name::new(Path::new("_HID"), hid);
    let uid = aml::Name::new(Path::new("_UID"), &uid);
    let template = aml::ResourceTemplate::new(resources);
    let crs = aml::Name::new(Path::new("_CRS"), &template);
    let mut bytes = Vec::new();
    aml::Device::new(Path::new(name), vec![&hid, &uid, &crs]).to_aml_bytes(&mut bytes);
    Encoded(bytes)
}

/// An edge-triggered, active-high interrupt the device consumes alone.
fn edge_interrupt(gsi: u32) -> aml::Interrupt {
    aml::Interrupt::new(true, true, false, false, gsi)
}

/// The DSDT's body: everything under `\_SB`.
fn dsdt_body(platform: &Platform) -> Vec<u8> {
    let mut devices: Vec<Encoded> = Vec::new();
    // The legacy devices the VMM emulates: COM1, the i8042 (keyboard controller and its reset
    // line) and the CMOS RTC.
    let com1_io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
    let com1_irq = edge_interrupt(SERIAL_IRQ);
    devices.push(device(
        "COM1",
        &aml::EISAName::new("PNP0501"),
        0,
        vec![&com1_io, &com1_irq],
    ));
    let kbd_data = aml::IO::new(0x60, 0x60, 1, 1);
    let kbd_cmd = aml::IO::new(0x64, 0x64, 1, 1);
    // Its line too: on hardware-reduced ACPI Linux maps no legacy IRQ it is not told about.
    let kbd_irq = edge_interrupt(I8042_IRQ);
    devices.push(device(
        "PS2K",
        &aml::EISAName::new("PNP0303"),
        0,
        vec![&kbd_data, &kbd_cmd, &kbd_irq],
    ));
    let rtc_io = aml::IO::new(0x70, 0x70, 1, 2);
    devices.push(device(
        "RTC_",
        &aml::EISAName::new("PNP0B00"),
        0,
        vec![&rtc_io],
    ));
    // The virtio-mmio slots (Linux's virtio_mmio driver matches LNRO0005).
    for slot in 0..platform.virtio_slots {
        let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
        let window = aml::Memory32Fixed::new(true, base as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = edge_interrupt(VIRTIO_IRQ_BASE + slot as u32);
        devices.push(device(
            &format!("V{slot:03}"),
            &"LNRO0005",
            slot as u32,
            vec![&window, &irq],
        ));
    }
    // The generation id: ADDR is its physical address as two 32-bit halves.
    let id_addr = VMGENID_BASE + VMGENID_ID_OFFSET;
    let (low, high) = (id_addr as u32, (id_addr >> 32) as u32);
    let hid = aml::Name::new(Path::new("_HID"), &"VMGENCTR");
    let cid = aml::Name::new(Path::new("_CID"), &"VM_Gen_Counter");
    let ddn = aml::Name::new(Path::new("_DDN"), &"VM_Gen_Counter");
    let addr_package = aml::Package::new(vec![&low, &high]);
    let addr = aml::Name::new(Path::new("ADDR"), &addr_package);
    let mut vgen = Vec::new();
    aml::Device::new(Path::new("VGEN"), vec![&hid, &cid, &ddn, &addr]).to_aml_bytes(&mut vgen);
    devices.push(Encoded(vgen));
    // The Generic Event Device: the generation id's line runs _EVT, which notifies VGEN.
    let ged_hid = aml::Name::new(Path::new("_HID"), &"ACPI0013");
    let ged_uid = aml::Name::new(Path::new("_UID"), &aml::ZERO);
    let ged_irq = edge_interrupt(VMGENID_IRQ);
    let ged_template = aml::ResourceTemplate::new(vec![&ged_irq]);
    let ged_crs = aml::Name::new(Path::new("_CRS"), &ged_template);
    let vgen_path = Path::new("\\_SB_.VGEN");
    let notify = aml::Notify::new(&vgen_path, &0x80u8);
    let is_vmgenid = aml::Equal::new(&aml::Arg(0), &VMGENID_IRQ);
    let on_vmgenid = aml::If::new(&is_vmgenid, vec![&notify]);
    let evt = aml::Method::new(Path::new("_EVT"), 1, true, vec![&on_vmgenid]);
    let mut ged = Vec::new();
    aml::Device::new(Path::new("GED_"), vec![&ged_hid, &ged_uid, &ged_crs, &evt])
        .to_aml_bytes(&mut ged);
    devices.push(Encoded(ged));

    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let mut body = Vec::new();
    aml::Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut body);
    body
}

/// AML already encoded (a device built above).
struct Encoded(Vec<u8>);

impl Aml for Encoded {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Appends `table` at the next 8-byte boundary of `out` (which starts at guest address
/// `base`); returns the table's guest address.
fn place(out: &mut Vec<u8>, base: u64, table: &dyn Aml) -> u64 {
    out.resize(out.len().next_multiple_of(8), 0);
    let at = base + out.len() as u64;
    table.to_aml_bytes(out);
    at
}

/// Every table, as bytes to place at [`RSDP_ADDR`].
pub fn build(platform: &Platform) -> Vec<u8> {
    // The RSDP is written last (it needs the XSDT's address); its place is kept.
    let mut out = vec![0u8; Rsdp::len()];

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_body(platform));
    let dsdt_addr = place(&mut out, RSDP_ADDR, &dsdt);

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED).into();
    fadt.century = CMOS_CENTURY;
    let fadt_addr = place(&mut out, RSDP_ADDR, &fadt.finalize());

    // The MADT as a plain table (the crate's MADT type has no way to set its flags); its
    // entries are the crate's structures.
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    for cpu in 0..platform.vcpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    // The IOAPIC's id follows the CPUs' (as in the MP table); its pins are GSIs 0-23, ISA
    // interrupts on the pins of the same number (KVM's default routing).
    IoApic::new(platform.vcpus, IOAPIC_ADDR, 0).to_aml_bytes(&mut entries);
    madt.append_slice(&entries);
    let madt_addr = place(&mut out, RSDP_ADDR, &madt);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&mut out, RSDP_ADDR, &xsdt);

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    out[..rsdp.len()].copy_from_slice(&rsdp);
    out
}

/// Writes the tables for `platform` into the guest's BIOS area.
pub fn write(ram: &GuestRam, platform: &Platform) -> crate::Result<()> {
    let tables = build(platform);
    if RSDP_ADDR + tables.len() as u64 > TABLES_END {
        return Err(crate::Error::Load(format!(
            "the ACPI tables ({} bytes) do not fit below 1 MiB",
            tables.len()
        )));
    }
    ram.write(RSDP_ADDR, &tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, checked: its checksum and that it lies in `tables`.
    fn table(tables: &[u8], addr: u64) -> &[u8] {
        let at = (addr - RSDP_ADDR) as usize;
        let len = u32_at(tables, at + 4) as usize;
        let t = &tables[at..at + len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(&t[..4]));
        t
    }

    #[test]
    fn every_table_is_reached_from_the_rsdp_and_checks_out() {
        let platform = Platform {
            vcpus: 3,
            virtio_slots: 2,
        };
        let tables = build(&platform);
        assert_eq!(&tables[..8], b"RSD PTR ");
        assert_eq!(sum(&tables[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&tables[..36]), 0, "RSDP extended checksum");
        let xsdt = table(&tables, u64_at(&tables, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|i| u64_at(xsdt, i))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&tables, entries[0]);
        assert_eq!(&fadt[..4], b"FACP");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "hardware-reduced");
        assert_ne!(fadt[109] & (IAPC_8042 as u8), 0, "8042 present");
        let dsdt = table(&tables, u64_at(fadt, 140));
        assert_eq!(&dsdt[..4], b"DSDT");
        let madt = table(&tables, entries[1]);
        assert_eq!(&madt[..4], b"APIC");
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        // Three local APICs (ids 0-2), then the IOAPIC (id 3).
        let mut at = 44;
        let mut apics = Vec::new();
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                0 => apics.push(madt[at + 3]),
                1 => {
                    assert_eq!(madt[at + 2], 3, "IOAPIC id");
                    assert_eq!(u32_at(madt, at + 4), IOAPIC_ADDR);
                }
                other => panic!("unexpected MADT entry {other}"),
            }
            at += len;
        }
        assert_eq!(apics, [0, 1, 2]);
        let contains = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(contains(b"LNRO0005"));
        assert!(
            contains(b"V001") && !contains(b"V002"),
            "one entry per slot in use"
        );
        assert!(contains(b"VMGENCTR") && contains(b"ACPI0013") && contains(b"ADDR"));
        assert!(tables.len() as u64 <= TABLES_END - RSDP_ADDR);
    }

    #[test]
    fn the_dsdt_disassembles_with_iasl() {
        // iasl (acpica-tools, which CI installs) is ACPICA's own compiler: the same parser
        // Linux runs the DSDT through.
        let tables = build(&Platform {
            vcpus: 1,
            virtio_slots: 3,
        });
        let xsdt = table(&tables, u64_at(&tables, 24));
        let dsdt_addr = u64_at(table(&tables, u64_at(xsdt, 36)), 140);
        let dsdt = table(&tables, dsdt_addr);
        let dir = std::env::temp_dir().join(format!("vmfork-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("dsdt.aml"), dsdt).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg("dsdt.aml")
            .current_dir(&dir)
            .output()
            .expect("iasl (Debian package acpica-tools) is needed for this test");
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for expected in [
            "Device (V000)",
            "Device (V002)",
            "\"LNRO0005\"",
            "Memory32Fixed (ReadWrite,\n",
            "0xD0003000",
            "Device (VGEN)",
            "\"VMGENCTR\"",
            "0xD0000010",
            "Device (GED)", // (iasl drops a name's trailing underscores)
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.VGEN, 0x80)",
            "EisaId (\"PNP0501\")",
            "EisaId (\"PNP0303\")",
        ] {
            assert!(
                dsl.contains(expected),
                "{expected:?} not in the disassembly:\n{dsl}"
            );
        }
    }
}
