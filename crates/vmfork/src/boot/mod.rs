//! Loading a guest into RAM and putting the boot vCPU at its entry point.
//!
//! Four ways in: an ELF with a Xen PVH note (entered in 32-bit protected mode with a
//! `hvm_start_info` in RBX), an ELF with a 64-bit entry (entered in long mode, Linux-style, with
//! a `boot_params` zero page in RSI), a Linux bzImage (its 64-bit entry, the zero page built on
//! its setup header) and a flat binary (entered in long mode at its load address).

pub mod acpi;
mod cpu_setup;
pub(crate) mod cpuid;
pub mod mptable;

pub use cpu_setup::setup_boot_vcpu;
pub(crate) use cpuid::vcpu_cpuid;
pub use cpuid::CpuFeature;

use crate::error::{Error, Result};
use crate::memory::{GuestRam, MMIO_HOLE_START};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::io::Cursor;
use vm_memory::GuestAddress;

/// Where the boot-time structures live in low guest memory.
pub mod layout {
    /// Boot GDT (flat code/data for both 32- and 64-bit entry).
    pub const BOOT_GDT: u64 = 0x500;
    /// Empty boot IDT.
    pub const BOOT_IDT: u64 = 0x520;
    /// PVH `hvm_start_info`, followed by its memory map.
    pub const PVH_START_INFO: u64 = 0x6000;
    pub const PVH_MEMMAP: u64 = 0x6040;
    /// Linux zero page (`boot_params`).
    pub const ZERO_PAGE: u64 = 0x7000;
    /// Identity page tables for 64-bit entry: PML4, PDPT, PD (first 1 GiB in 2 MiB pages).
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE: u64 = 0x2_0000;
    pub const CMDLINE_MAX: usize = 0x1_0000;
    /// Kernels load at or above 1 MiB.
    pub const HIGHMEM_START: u64 = 0x10_0000;
    /// End of the low conventional memory reported to the guest (EBDA/BIOS area above).
    pub const EBDA_START: u64 = 0x9_fc00;
}

/// The guest program to boot.
#[derive(Clone, Debug)]
pub enum Kernel {
    /// An ELF: PVH entry if it has the note, else its 64-bit `e_entry`.
    Elf(Vec<u8>),
    /// An ELF booted through its 64-bit entry even if it has a PVH note.
    ElfLongMode(Vec<u8>),
    /// A flat binary loaded at `load_addr` and entered in long mode there.
    Flat { image: Vec<u8>, load_addr: u64 },
    /// A Linux bzImage (boot protocol 2.12+ with a 64-bit entry): its protected-mode part is
    /// loaded at 1 MiB and entered through the 64-bit boot protocol (`startup_64`, 0x200 into
    /// it) with its setup header in the zero page.
    BzImage(Vec<u8>),
}

impl Kernel {
    /// A kernel file as what it is: a bzImage (its setup header's "HdrS" magic), else an ELF.
    pub fn from_file(bytes: Vec<u8>) -> Self {
        if bytes.get(0x202..0x206) == Some(b"HdrS") {
            Kernel::BzImage(bytes)
        } else {
            Kernel::Elf(bytes)
        }
    }
}

/// What to boot: the kernel plus an optional command line and initrd.
#[derive(Clone, Debug)]
pub struct BootSpec {
    pub kernel: Kernel,
    pub cmdline: Option<String>,
    pub initrd: Option<Vec<u8>>,
}

impl BootSpec {
    pub fn new(kernel: Kernel) -> Self {
        Self {
            kernel,
            cmdline: None,
            initrd: None,
        }
    }
}

/// How the boot vCPU enters the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode, paging off; RBX = `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// Long mode with identity page tables; RSI = zero page (0 for flat binaries).
    LongMode { entry: u64, zero_page: u64 },
}

/// Loads `spec` into `ram` and writes the boot structures (with `platform`, the ACPI tables and
/// the MP table that describe it); returns how to enter it.
pub fn load(
    ram: &GuestRam,
    spec: &BootSpec,
    platform: Option<&acpi::Platform>,
) -> Result<EntryPoint> {
    let mem = ram.memory();
    let rsdp = match platform {
        Some(platform) => {
            mptable::write(ram, platform.vcpus)?;
            acpi::write(ram, platform)?;
            Some(acpi::RSDP_ADDR)
        }
        None => None,
    };
    let cmdline_addr = write_cmdline(ram, spec.cmdline.as_deref())?;
    let mut setup_header = None;
    let (entry, kernel_end) = match &spec.kernel {
        Kernel::Flat { image, load_addr } => {
            ram.write(*load_addr, image).map_err(|_| {
                Error::Load(format!(
                    "the {}-byte image at {load_addr:#x} does not fit in {} MiB of RAM",
                    image.len(),
                    ram.size() >> 20
                ))
            })?;
            return Ok(EntryPoint::LongMode {
                entry: *load_addr,
                zero_page: 0,
            });
        }
        Kernel::Elf(bytes) | Kernel::ElfLongMode(bytes) => {
            let res = Elf::load(
                mem,
                None,
                &mut Cursor::new(bytes.as_slice()),
                Some(GuestAddress(layout::HIGHMEM_START)),
            )
            .map_err(|e| elf_error(e, bytes.len(), ram.size()))?;
            let entry = match (res.pvh_boot_cap, &spec.kernel) {
                (PvhBootCapability::PvhEntryPresent(a), Kernel::Elf(_)) => Some(a.0),
                _ => None,
            };
            ((entry, res.kernel_load.0), res.kernel_end)
        }
        Kernel::BzImage(bytes) => {
            let res = BzImage::load(
                mem,
                None,
                &mut Cursor::new(bytes.as_slice()),
                Some(GuestAddress(layout::HIGHMEM_START)),
            )
            .map_err(|e| bzimage_error(e, bytes.len(), ram.size()))?;
            let header = res
                .setup_header
                .ok_or_else(|| Error::Load("the bzImage has no setup header".into()))?;
            check_bzimage_header(&header, spec.cmdline.as_deref())?;
            setup_header = Some(header);
            (
                (None, res.kernel_load.0 + STARTUP_64_OFFSET),
                res.kernel_end,
            )
        }
    };
    let initrd = match &spec.initrd {
        Some(data) => Some(write_initrd(ram, data, kernel_end)?),
        None => None,
    };
    let e820 = e820_map(ram);
    match entry {
        (Some(pvh_entry), _) => {
            write_pvh_start_info(ram, &e820, cmdline_addr, initrd, rsdp)?;
            Ok(EntryPoint::Pvh {
                entry: pvh_entry,
                start_info: layout::PVH_START_INFO,
            })
        }
        (None, elf_entry) => {
            write_zero_page(
                ram,
                &e820,
                cmdline_addr,
                spec.cmdline.as_deref(),
                initrd,
                setup_header,
                rsdp,
            )?;
            Ok(EntryPoint::LongMode {
                entry: elf_entry,
                zero_page: layout::ZERO_PAGE,
            })
        }
    }
}

fn elf_error(e: linux_loader::loader::Error, file_len: usize, ram: u64) -> Error {
    use linux_loader::loader::elf::Error as E;
    use linux_loader::loader::Error as L;
    let why = match e {
        L::Elf(E::InvalidElfMagicNumber) | L::Elf(E::ReadElfHeader) => {
            format!("not an ELF file ({file_len} bytes, bad magic or short header)")
        }
        L::Elf(E::ReadKernelImage) => format!(
            "an ELF segment does not fit in guest RAM ({} MiB) or lies past the end of the file",
            ram >> 20
        ),
        L::Elf(E::InvalidEntryAddress) => {
            "the ELF entry point is below 1 MiB and it has no PVH note".to_string()
        }
        other => format!("bad ELF: {other}"),
    };
    Error::Load(why)
}

/// Where `startup_64` is in a bzImage's protected-mode part (boot protocol, 64-bit entry).
const STARTUP_64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has the 64-bit entry at `STARTUP_64_OFFSET`.
const XLF_KERNEL_64: u16 = 1;

fn bzimage_error(e: linux_loader::loader::Error, file_len: usize, ram: u64) -> Error {
    use linux_loader::loader::bzimage::Error as B;
    use linux_loader::loader::Error as L;
    let why = match e {
        L::Bzimage(B::InvalidBzImage) => format!(
            "not a bzImage this loader takes ({file_len} bytes: no \"HdrS\" setup header of \
             boot protocol 2.00+, or not loaded high)"
        ),
        L::Bzimage(B::ReadBzImageCompressedKernel) => format!(
            "the {file_len}-byte bzImage does not fit in guest RAM ({} MiB)",
            ram >> 20
        ),
        L::InvalidKernelStartAddress => "the bzImage wants to load below 1 MiB".to_string(),
        other => format!("bad bzImage: {other}"),
    };
    Error::Load(why)
}

/// What this loader needs of a bzImage's header: the 64-bit entry, and room for the command
/// line in the kernel's own limit.
fn check_bzimage_header(
    header: &linux_loader::loader::bootparam::setup_header,
    cmdline: Option<&str>,
) -> Result<()> {
    let (version, xloadflags, limit) = (header.version, header.xloadflags, header.cmdline_size);
    if version < 0x020c || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Load(format!(
            "the bzImage (boot protocol {}.{:02}) has no 64-bit entry point (protocol 2.12+ with \
             XLF_KERNEL_64), which vmfork boots it through",
            version >> 8,
            version & 0xff
        )));
    }
    if let Some(c) = cmdline {
        if limit != 0 && c.len() as u64 > u64::from(limit) {
            return Err(Error::Load(format!(
                "the {}-byte command line is longer than this kernel takes ({limit} bytes)",
                c.len()
            )));
        }
    }
    Ok(())
}

fn write_cmdline(ram: &GuestRam, cmdline: Option<&str>) -> Result<Option<u64>> {
    let Some(text) = cmdline else {
        return Ok(None);
    };
    let cmd = Cmdline::try_from(text, layout::CMDLINE_MAX)
        .map_err(|e| Error::Load(format!("kernel command line: {e}")))?;
    linux_loader::loader::load_cmdline(ram.memory(), GuestAddress(layout::CMDLINE), &cmd)
        .map_err(|e| Error::Load(format!("kernel command line: {e}")))?;
    Ok(Some(layout::CMDLINE))
}

/// Places the initrd page-aligned at the top of low RAM, above the kernel.
fn write_initrd(ram: &GuestRam, data: &[u8], kernel_end: u64) -> Result<(u64, u64)> {
    let low_end = ram.layout().regions[0].end().min(MMIO_HOLE_START);
    let size = data.len() as u64;
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or_else(|| {
            Error::Load(format!(
                "the {} KiB initrd does not fit in RAM above the kernel",
                size >> 10
            ))
        })?;
    ram.write(addr, data)?;
    Ok((addr, size))
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The guest's memory map: conventional memory, the legacy hole, then RAM.
fn e820_map(ram: &GuestRam) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, layout::EBDA_START, E820_RAM),
        (
            layout::EBDA_START,
            layout::HIGHMEM_START - layout::EBDA_START,
            E820_RESERVED,
        ),
    ];
    for r in &ram.layout().regions {
        let start = r.guest_addr.max(layout::HIGHMEM_START);
        if r.end() > start {
            map.push((start, r.end() - start, E820_RAM));
        }
    }
    map
}

fn write_pvh_start_info(
    ram: &GuestRam,
    e820: &[(u64, u64, u32)],
    cmdline: Option<u64>,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<()> {
    use linux_loader::loader::elf::start_info::hvm_modlist_entry;
    const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
    const MODLIST: u64 = 0x6800;
    let module = initrd.map(|(paddr, size)| hvm_modlist_entry {
        paddr,
        size,
        ..Default::default()
    });
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: module.is_some() as u32,
        modlist_paddr: if module.is_some() { MODLIST } else { 0 },
        cmdline_paddr: cmdline.unwrap_or(0),
        memmap_paddr: layout::PVH_MEMMAP,
        memmap_entries: e820.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(MODLIST));
    }
    PvhBootConfigurator::write_bootparams(&params, ram.memory())
        .map_err(|e| Error::Load(format!("PVH start info: {e}")))
}

fn write_zero_page(
    ram: &GuestRam,
    e820: &[(u64, u64, u32)],
    cmdline_addr: Option<u64>,
    cmdline: Option<&str>,
    initrd: Option<(u64, u64)>,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    rsdp: Option<u64>,
) -> Result<()> {
    const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
    const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
    const KERNEL_LOADER_OTHER: u8 = 0xff;
    const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
    let mut params = boot_params::default();
    // A bzImage's own header goes in as read (the kernel finds its fields there); the
    // loader's fields are set on top.
    let from_bzimage = setup_header.is_some();
    if let Some(header) = setup_header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(addr) = cmdline_addr {
        params.hdr.cmd_line_ptr = addr as u32;
        if !from_bzimage {
            // (A bzImage's cmdline_size is the kernel's limit, an input to the loader.)
            params.hdr.cmdline_size = cmdline.map_or(0, |c| c.len() as u32 + 1);
        }
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    // (Kernels that do not read it find the RSDP by scanning the BIOS area.)
    params.acpi_rsdp_addr = rsdp.unwrap_or(0);
    for (i, &(addr, size, type_)) in e820.iter().enumerate().take(params.e820_table.len()) {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        params.e820_entries = i as u8 + 1;
    }
    let bp = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE));
    LinuxBootConfigurator::write_bootparams(&bp, ram.memory())
        .map_err(|e| Error::Load(format!("zero page: {e}")))
}
