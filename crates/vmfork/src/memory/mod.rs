//! Guest RAM: one memfd, mapped into the VMM, split into KVM memslots around the MMIO hole.
//!
//! Keeping RAM in a file is what makes the rest cheap: a fork maps the same file copy-on-write,
//! a snapshot's memory file is such an image on disk, and a restore maps it the same way.

mod dirty;
pub(crate) mod file_guard;
mod image;
mod layer;
mod mapping;
mod resident;
mod tracking;

pub use dirty::DirtyPages;
pub use image::{FrozenImage, LayerRun, MAX_MAPPED_RUNS};
pub use layer::{Layer, LayerBuilder};
pub use mapping::{create_memfd, data_ranges, AddressRange, DetachedPages, HostMapping, Sharing};
pub use resident::{FileId, ResidentRam};
pub(crate) use tracking::{MemoryTracking, SnapshotMark};

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MmapRegion};

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
/// Start of the 32-bit MMIO hole (devices, LAPIC, IOAPIC); RAM above this moves to 4 GiB.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// Smallest RAM a VM may have.
pub const MIN_RAM: u64 = 2 << 20;

/// Guest memory as vm-memory sees it, with a bitmap of pages the VMM itself wrote (KVM's dirty
/// log sees only the guest's writes).
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// One contiguous range of guest RAM and where it lives in the backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl RamRegion {
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// Where guest RAM sits in the guest-physical address space.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    pub regions: Vec<RamRegion>,
}

impl MemoryLayout {
    /// RAM from 0 up to the MMIO hole, the rest from 4 GiB.
    pub fn for_size(bytes: u64) -> Result<Self> {
        if bytes < MIN_RAM || !bytes.is_multiple_of(PAGE_SIZE) {
            return Err(Error::Config(format!(
                "RAM size {bytes} bytes must be a multiple of 4 KiB and at least {} MiB",
                MIN_RAM >> 20
            )));
        }
        let low = bytes.min(MMIO_HOLE_START);
        let mut regions = vec![RamRegion {
            guest_addr: 0,
            size: low,
            file_offset: 0,
        }];
        if bytes > low {
            regions.push(RamRegion {
                guest_addr: MMIO_HOLE_END,
                size: bytes - low,
                file_offset: low,
            });
        }
        Ok(Self { regions })
    }

    /// Total bytes of RAM.
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// Whether `[addr, addr+len)` lies entirely in RAM.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        self.regions
            .iter()
            .any(|r| addr >= r.guest_addr && end <= r.end())
    }

    /// The offset in the backing file of guest page `addr` (which must be in RAM).
    pub fn file_offset(&self, addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| addr >= r.guest_addr && addr < r.end())
            .map(|r| r.file_offset + (addr - r.guest_addr))
    }

    /// The guest address of byte `offset` of the backing file.
    pub fn guest_addr(&self, offset: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| offset >= r.file_offset && offset < r.file_offset + r.size)
            .map(|r| r.guest_addr + (offset - r.file_offset))
    }
}

/// Host memory the kernel reports, used to refuse RAM sizes the host cannot give.
pub fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A VM's RAM: the backing memfd, the host mapping over it and vm-memory's view of that mapping.
#[derive(Debug)]
pub struct GuestRam {
    layout: MemoryLayout,
    backing: Arc<File>,
    // `memory` holds raw pointers into `mapping`; it is declared first so it is dropped first.
    memory: GuestMemory,
    mapping: Arc<HostMapping>,
    /// The layer runs mapped over the base in `mapping` (the image's, and the layers this VM
    /// adopted from its own generations), disjoint and ascending.
    layer_runs: Mutex<Vec<LayerRun>>,
    /// Pages copied in privately when the view was made (an image with too many runs to map).
    copied_pages: Vec<u64>,
    /// Held for writing while layer runs are swapped in under the mapping (a moment in which
    /// they read as the file below); the VMM's own reads and writes hold it for reading.
    swapping: RwLock<()>,
}

impl GuestRam {
    /// Fresh zeroed RAM of `bytes`, in a new memfd mapped shared (writes land in the file).
    pub fn new(bytes: u64) -> Result<Self> {
        let layout = MemoryLayout::for_size(bytes)?;
        if let Some(host) = host_memory_bytes() {
            if bytes > host {
                return Err(Error::Config(format!(
                    "RAM of {} MiB is more than this host has ({} MiB)",
                    bytes >> 20,
                    host >> 20
                )));
            }
        }
        let backing = Arc::new(create_memfd("vmfork-ram", bytes)?);
        Self::map(layout, backing, Sharing::Shared)
    }

    /// Maps `backing` (already holding the RAM image) with the given sharing.
    pub fn map(layout: MemoryLayout, backing: Arc<File>, sharing: Sharing) -> Result<Self> {
        let total = usize::try_from(layout.total())
            .map_err(|_| Error::Config("RAM size does not fit the address space".into()))?;
        let mapping = Arc::new(HostMapping::map_file(backing.as_fd(), total, sharing)?);
        Self::over(layout, backing, mapping)
    }

    /// RAM over `mapping` (of `backing`, laid out as `layout`).
    fn over(layout: MemoryLayout, backing: Arc<File>, mapping: Arc<HostMapping>) -> Result<Self> {
        let memory = build_guest_memory(&layout, &mapping)?;
        Ok(Self {
            layout,
            backing,
            memory,
            mapping,
            layer_runs: Mutex::new(Vec::new()),
            copied_pages: Vec::new(),
            swapping: RwLock::new(()),
        })
    }

    /// A copy-on-write view of `image`: reads share its pages, writes copy. The overlay pages
    /// are copied in (cost O(overlay)); nothing else is touched. With `range`, the view is
    /// placed in that reserved address range (a pooled shell's, with memslots over it), reusing
    /// `resident` when it maps the image's base.
    pub fn from_image(
        image: &Arc<FrozenImage>,
        range: Option<&Arc<AddressRange>>,
        resident: Option<ResidentRam>,
    ) -> Result<Self> {
        let layout = image.layout().clone();
        let backing = Arc::clone(image.base());
        let Some(range) = range else {
            let mut ram = Self::map(layout, backing, Sharing::CopyOnWrite)?;
            let (runs, copied) = image.write_view_into(&ram.mapping, &[], [])?;
            *ram.layer_runs.get_mut().unwrap_or_else(|p| p.into_inner()) = runs;
            ram.copied_pages = copied;
            return Ok(ram);
        };
        if range.len() as u64 != layout.total() {
            return Err(Error::Memory(format!(
                "a {} MiB range cannot hold {} MiB of RAM",
                range.len() >> 20,
                layout.total() >> 20
            )));
        }
        let resident = match resident {
            Some(r) if r.maps(&backing) => r,
            other => {
                if let Some(r) = other {
                    r.abandon();
                }
                ResidentRam::premap(range, &backing)?
            }
        };
        let (mapping, runs, copied) = resident.make_view_of(image)?;
        let mut ram = Self::over(layout, backing, mapping)?;
        *ram.layer_runs.get_mut().unwrap_or_else(|p| p.into_inner()) = runs;
        ram.copied_pages = copied;
        Ok(ram)
    }

    /// Hands `range` back when this RAM was placed in it: drops the RAM's pages and leaves an
    /// inaccessible reservation. The RAM must not be used afterwards (its owner is dropping it).
    pub fn release_range(&self) -> Result<()> {
        if Arc::strong_count(&self.mapping) != 1 {
            return Err(Error::Memory("guest RAM is still in use elsewhere".into()));
        }
        self.mapping.release_range()
    }

    /// Leaves this RAM (placed in a reserved range) mapped for the next fork of its family,
    /// recording the pages that hold private copies. The RAM must not be used afterwards.
    pub fn leave_resident(&self, mut stale: Vec<u64>) -> Result<ResidentRam> {
        if Arc::strong_count(&self.mapping) != 1 {
            return Err(Error::Memory("guest RAM is still in use elsewhere".into()));
        }
        stale.extend(self.copied_pages.iter().copied());
        stale.sort_unstable();
        stale.dedup();
        Ok(ResidentRam::left_by(
            Arc::clone(&self.mapping),
            &self.backing,
            std::mem::take(&mut *self.runs()),
            stale,
        ))
    }

    fn runs(&self) -> MutexGuard<'_, Vec<LayerRun>> {
        self.layer_runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Layer runs mapped over the base now.
    pub fn mapped_runs(&self) -> usize {
        self.runs().len()
    }

    /// Gives up this VM's private copies of `layer`'s pages in `runs` (file offset, bytes) for
    /// the layer's own, which must hold the same bytes (copied from them with the VM paused,
    /// and not written since), mapping each run copy-on-write in place: the pages are then
    /// stored once, and the VM's next write copies as after a fork. Skipped when the runs would
    /// be too many mappings. The VM must be paused. Returns the replaced private pages, for the
    /// caller to free off its hot path.
    pub fn adopt_layer_runs(
        &self,
        layer: &Arc<Layer>,
        runs: &[(u64, u64)],
    ) -> Result<Vec<DetachedPages>> {
        let mut mapped = self.runs();
        let mut detached = Vec::new();
        if runs.len() + mapped.len() > MAX_MAPPED_RUNS {
            return Ok(detached);
        }
        let _swapping = self.swapping.write().unwrap_or_else(|p| p.into_inner());
        let mut fresh = Vec::with_capacity(runs.len());
        for &(offset, len) in runs {
            detached.extend(self.mapping.replace_range(
                offset as usize,
                len as usize,
                layer.file().as_fd(),
                Sharing::CopyOnWrite,
            )?);
            fresh.push(LayerRun {
                offset,
                len,
                layer: Arc::clone(layer),
            });
        }
        *mapped = image::overlay_runs(&mapped, fresh);
        Ok(detached)
    }

    /// Maps `[offset, offset+len)` of RAM shared over the RAM file again, as before the VM's
    /// first fork: its writes land in the file. The file must already hold what the VM shows
    /// there (a fold copied it in). The VM must be paused. Returns the replaced private pages,
    /// for the caller to free off its hot path.
    pub fn share_back(&self, offset: u64, len: u64) -> Result<Vec<DetachedPages>> {
        let end = offset + len;
        let mut runs = self.runs();
        let _swapping = self.swapping.write().unwrap_or_else(|p| p.into_inner());
        // One piece per mapping: the layer runs and the gaps between them.
        let mut cuts = vec![offset, end];
        for r in runs
            .iter()
            .filter(|r| r.offset < end && r.offset + r.len > offset)
        {
            cuts.push(r.offset.max(offset));
            cuts.push((r.offset + r.len).min(end));
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut detached = Vec::new();
        for piece in cuts.windows(2) {
            detached.extend(self.mapping.replace_range(
                piece[0] as usize,
                (piece[1] - piece[0]) as usize,
                self.backing.as_fd(),
                Sharing::Shared,
            )?);
        }
        let cut = LayerRun {
            offset,
            len,
            layer: match runs.first() {
                Some(r) => Arc::clone(&r.layer),
                None => return Ok(detached),
            },
        };
        *runs = image::overlay_runs(&runs, vec![cut])
            .into_iter()
            .filter(|r| r.offset >= end || r.offset + r.len <= offset)
            .collect();
        Ok(detached)
    }

    /// Turns this shared mapping of the RAM file into a private one, in place: from now on the
    /// file is frozen (it becomes a fork image) and this VM's writes go to private pages.
    pub fn make_copy_on_write(&self) -> Result<()> {
        self.make_copy_on_write_range(0, self.size()).map(drop)
    }

    /// [`Self::make_copy_on_write`] for `[offset, offset+len)` of the RAM (which must be mapped
    /// shared there: no layer runs, no private pages). The old mapping's page tables move out
    /// (returned, to be dropped off the caller's path): tearing down a populated range in place
    /// cost ~8 ms per 16 MiB here, inside a VM's pause.
    pub fn make_copy_on_write_range(&self, offset: u64, len: u64) -> Result<Vec<DetachedPages>> {
        let _swapping = self.swapping.write().unwrap_or_else(|p| p.into_inner());
        Ok(self
            .mapping
            .replace_range(
                offset as usize,
                len as usize,
                self.backing.as_fd(),
                Sharing::CopyOnWrite,
            )?
            .into_iter()
            .collect())
    }

    /// Moves vm-memory's record of pages the VMM wrote into `dirty`, and clears it.
    pub fn take_vmm_dirty(&self, dirty: &mut DirtyPages) {
        use vm_memory::GuestMemoryBackend;
        for (region, r) in self.memory.iter().zip(&self.layout.regions) {
            let bits = region.get_mmap().bitmap().get_and_reset();
            dirty.add_region_bitmap(r, &bits);
        }
    }

    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// vm-memory's view: bounds-checked access for loaders and devices.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn backing(&self) -> &Arc<File> {
        &self.backing
    }

    pub fn mapping(&self) -> &Arc<HostMapping> {
        &self.mapping
    }

    pub fn size(&self) -> u64 {
        self.layout.total()
    }

    /// Host address of each RAM region, for KVM memslots.
    pub fn slots(&self) -> impl Iterator<Item = (u32, RamRegion, u64)> + '_ {
        let base = self.mapping.as_ptr() as u64;
        self.layout
            .regions
            .iter()
            .enumerate()
            .map(move |(i, r)| (i as u32, *r, base + r.file_offset))
    }

    fn readers(&self) -> RwLockReadGuard<'_, ()> {
        self.swapping.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with vm-memory's view of RAM while no layer swap can happen under it (device
    /// models serving a queue; their writes are recorded as dirty like every VMM write).
    pub fn with_memory<T>(&self, f: impl FnOnce(&GuestMemory) -> T) -> T {
        let _using = self.readers();
        f(&self.memory)
    }

    /// Copies guest memory at `addr` into `buf`; fails if any byte is outside RAM.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.check(addr, buf.len())?;
        let _reading = self.readers();
        self.memory
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("read at {addr:#x}: {e}")))
    }

    /// Writes `buf` into guest memory at `addr`; fails if any byte is outside RAM.
    pub fn write(&self, addr: u64, buf: &[u8]) -> Result<()> {
        self.check(addr, buf.len())?;
        let _writing = self.readers();
        self.memory
            .write_slice(buf, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("write at {addr:#x}: {e}")))
    }

    /// Atomically compares the 16 bytes at `addr` (16-aligned) with `expected` and, if they
    /// are equal, stores `new`; returns what was found. A guest's `lock cmpxchg16b`, for the
    /// emulation assist (the other vCPUs may be running: it must be one atomic access).
    pub fn compare_exchange_u128(&self, addr: u64, expected: u128, new: u128) -> Result<u128> {
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        if !addr.is_multiple_of(16) {
            return Err(Error::Memory(format!(
                "a 16-byte compare-exchange at {addr:#x} is not 16-aligned"
            )));
        }
        self.check(addr, 16)?;
        let _writing = self.readers();
        let (region, at) = self
            .memory
            .to_region_addr(GuestAddress(addr))
            .ok_or_else(|| Error::Memory(format!("{addr:#x} is outside guest RAM")))?;
        let host = region
            .get_host_address(at)
            .map_err(|e| Error::Memory(format!("compare-exchange at {addr:#x}: {e}")))?;
        // SAFETY: `host` points at 16 bytes of guest RAM (checked above, and 16-aligned as the
        // guest address is and the mapping is page-aligned), mapped for as long as `self`; the
        // access is one atomic instruction, whatever the guest does meanwhile.
        let found = unsafe { compare_exchange_16(host.cast::<u128>(), expected, new) };
        if found == expected {
            region.bitmap().mark_dirty(at.0 as usize, 16);
        }
        Ok(found)
    }

    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, addr: u64, value: u64) -> Result<()> {
        self.write(addr, &value.to_le_bytes())
    }

    fn check(&self, addr: u64, len: usize) -> Result<()> {
        if self.layout.contains(addr, len as u64) {
            Ok(())
        } else {
            Err(Error::Memory(format!(
                "guest range {addr:#x}+{len:#x} is outside guest RAM ({})",
                describe_layout(&self.layout)
            )))
        }
    }
}

/// Groups ascending page offsets into runs of consecutive pages: `(first offset, page count)`.
pub(crate) fn page_runs(offsets: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for offset in offsets {
        match runs.last_mut() {
            Some((start, n)) if *start + *n * PAGE_SIZE == offset => *n += 1,
            _ => runs.push((offset, 1)),
        }
    }
    runs
}

fn describe_layout(layout: &MemoryLayout) -> String {
    layout
        .regions
        .iter()
        .map(|r| format!("{:#x}..{:#x}", r.guest_addr, r.end()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `lock cmpxchg16b` on `dst`: the value found there (and `new` stored if it was `expected`).
///
/// # Safety
/// `dst` must be valid for a 16-byte atomic read and write and 16-aligned.
unsafe fn compare_exchange_16(dst: *mut u128, expected: u128, new: u128) -> u128 {
    let (mut low, mut high) = (expected as u64, (expected >> 64) as u64);
    // SAFETY: the caller's contract for `dst`; rbx (reserved by the compiler) is swapped in and
    // restored around the instruction.
    unsafe {
        std::arch::asm!(
            "xchg {new_low}, rbx",
            "lock cmpxchg16b xmmword ptr [{dst}]",
            "mov rbx, {new_low}",
            dst = in(reg) dst,
            new_low = inout(reg) new as u64 => _,
            in("rcx") (new >> 64) as u64,
            inout("rax") low,
            inout("rdx") high,
            options(nostack),
        );
    }
    u128::from(low) | u128::from(high) << 64
}

fn build_guest_memory(layout: &MemoryLayout, mapping: &HostMapping) -> Result<GuestMemory> {
    let mut regions = Vec::new();
    for r in &layout.regions {
        // SAFETY: the range lies inside `mapping`, which the GuestRam owning both keeps alive
        // for as long as this GuestMemory (dropped first, see the field order).
        let region = unsafe {
            MmapRegion::build_raw(
                mapping.as_ptr().add(r.file_offset as usize),
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .map_err(|e| Error::Memory(format!("vm-memory region: {e}")))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| Error::Memory("guest region overflows".into()))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| Error::Memory(format!("{e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sixteen_byte_compare_exchange_is_one_atomic_access_and_marks_the_page_dirty() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let at = 0x1230;
        let old = 0x1111_2222_3333_4444_5555_6666_7777_8888u128;
        ram.write(at, &old.to_le_bytes()).unwrap();
        let mut dirty = DirtyPages::new(ram.size());
        ram.take_vmm_dirty(&mut dirty);
        // A mismatch changes nothing and says what is there.
        assert_eq!(ram.compare_exchange_u128(at, 5, 6).unwrap(), old);
        let mut now = [0u8; 16];
        ram.read(at, &mut now).unwrap();
        assert_eq!(u128::from_le_bytes(now), old);
        let mut dirty = DirtyPages::new(ram.size());
        ram.take_vmm_dirty(&mut dirty);
        assert_eq!(dirty.offsets().count(), 0);
        // A match stores the new value and the page is dirty (resets and forks see it).
        assert_eq!(ram.compare_exchange_u128(at, old, 7).unwrap(), old);
        ram.read(at, &mut now).unwrap();
        assert_eq!(u128::from_le_bytes(now), 7);
        ram.take_vmm_dirty(&mut dirty);
        assert_eq!(dirty.offsets().collect::<Vec<_>>(), [0x1000]);
        assert!(
            ram.compare_exchange_u128(at + 8, 0, 0).is_err(),
            "misaligned"
        );
        assert!(
            ram.compare_exchange_u128(8 << 20, 0, 0).is_err(),
            "outside RAM"
        );
    }

    #[test]
    fn layout_splits_around_the_mmio_hole() {
        let l = MemoryLayout::for_size(5 << 30).unwrap();
        assert_eq!(l.regions.len(), 2);
        assert_eq!(l.regions[0].size, 3 << 30);
        assert_eq!(l.regions[1].guest_addr, 4 << 30);
        assert_eq!(l.total(), 5 << 30);
        assert!(!l.contains(3 << 30, 1));
        assert!(l.contains((4 << 30) + 5, 8));
        assert_eq!(l.file_offset(4 << 30), Some(3 << 30));
        assert!(MemoryLayout::for_size(0).is_err());
        assert!(MemoryLayout::for_size(4097 * 1024).is_err());
    }

    #[test]
    fn ram_reads_and_writes_and_refuses_outside() {
        let ram = GuestRam::new(4 << 20).unwrap();
        ram.write_u64(0x1000, 0xdead_beef).unwrap();
        assert_eq!(ram.read_u64(0x1000).unwrap(), 0xdead_beef);
        assert!(ram.write_u64((4 << 20) - 4, 1).is_err());
        assert!(ram.read_u64(u64::MAX - 2).is_err());
    }
}
