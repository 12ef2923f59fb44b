//! `HostMapping`: the one owner of the host virtual address range that backs guest RAM. All the
//! raw mmap work (create, remap copy-on-write in place, drop pages) is wrapped here once.

use crate::error::{Error, Result};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const READ_WRITE: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;

/// The one mmap call: at `fixed` (replacing what is there) or where the kernel chooses, of
/// `file` at an offset or anonymous.
///
/// # Safety
/// With `fixed`, `[fixed, fixed+len)` must be a range the caller owns whose current contents
/// nothing uses any more.
unsafe fn mmap(
    fixed: Option<*mut u8>,
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    file: Option<(BorrowedFd<'_>, libc::off_t)>,
) -> io::Result<*mut u8> {
    let (fd, offset) = file.map_or((-1, 0), |(f, o)| (f.as_raw_fd(), o));
    let (addr, flags) = match fixed {
        Some(a) => (a.cast(), flags | libc::MAP_FIXED),
        None => (std::ptr::null_mut(), flags),
    };
    // SAFETY: the caller vouches for a fixed range; otherwise the kernel picks a free one.
    let mapped = unsafe { libc::mmap(addr, len, prot, flags, fd, offset) };
    if mapped == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(mapped.cast())
}

fn mmap_error(what: &str, e: io::Error) -> Error {
    Error::Memory(format!("cannot {what}: {e}"))
}

/// An anonymous or file-backed host mapping of `len` bytes, unmapped on drop — or, when placed
/// in an [`AddressRange`], put back to the range's inaccessible reservation.
#[derive(Debug)]
pub struct HostMapping {
    addr: *mut u8,
    len: usize,
    /// The reserved range this mapping is placed in (a pooled VM shell's), kept alive by it.
    range: Option<std::sync::Arc<AddressRange>>,
    /// The range has been handed back already (see [`HostMapping::release_range`]).
    released: std::sync::atomic::AtomicBool,
    /// A file's pages outside a reserved range: guest memory for the SIGBUS guard.
    _guard: Option<super::file_guard::GuardedRange>,
}

/// A reserved, inaccessible stretch of host address space that guest RAM mappings are placed
/// into. KVM memslots can stay registered over it while VMs come and go: that is what lets a
/// pooled VM shell skip memslot creation, whose cost grows with RAM size.
#[derive(Debug)]
pub struct AddressRange {
    addr: *mut u8,
    len: usize,
    /// Guest memory for the SIGBUS guard (whatever file is mapped here later).
    _guard: super::file_guard::GuardedRange,
}

// SAFETY: a reservation is only an address; nothing reads or writes through it.
unsafe impl Send for AddressRange {}
// SAFETY: as above.
unsafe impl Sync for AddressRange {}

impl AddressRange {
    /// Reserves `len` bytes of address space (no memory behind it).
    pub fn reserve(len: usize) -> Result<Self> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh inaccessible mapping at a kernel-chosen address.
        let addr = unsafe { mmap(None, len, libc::PROT_NONE, flags, None) }
            .map_err(|e| mmap_error(&format!("reserve {} MiB of address space", len >> 20), e))?;
        Ok(Self {
            addr,
            len,
            _guard: super::file_guard::register_range(addr, len),
        })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Makes the whole range an inaccessible reservation again.
    fn clear(&self) -> Result<()> {
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: replaces exactly this reserved range, which this value owns.
        unsafe { mmap(Some(self.addr), self.len, libc::PROT_NONE, flags, None) }
            .map_err(|e| mmap_error("clear a reserved RAM range", e))?;
        Ok(())
    }
}

impl Drop for AddressRange {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range this value reserved; mappings placed in it are gone
        // (their owners release the range before handing it back).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

// SAFETY: the mapping is plain memory owned by this value; concurrent access to its bytes is
// mediated by vm-memory's volatile accessors and by KVM, never by Rust references.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `&HostMapping` only hands out the address.
unsafe impl Sync for HostMapping {}

/// How a file is mapped: writes go to the file (shared) or to private copy-on-write pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharing {
    Shared,
    CopyOnWrite,
}

impl Sharing {
    fn flags(self) -> libc::c_int {
        match self {
            Sharing::Shared => libc::MAP_SHARED,
            Sharing::CopyOnWrite => libc::MAP_PRIVATE,
        }
    }
}

impl HostMapping {
    /// Maps `len` bytes of `file` from offset 0, read-write.
    pub fn map_file(file: BorrowedFd<'_>, len: usize, sharing: Sharing) -> Result<Self> {
        Self::map_file_with(file, len, sharing, libc::PROT_READ | libc::PROT_WRITE)
    }

    /// Maps `len` bytes of `file` from offset 0, read-only and shared: a view of a frozen image.
    pub fn map_file_readonly(file: BorrowedFd<'_>, len: usize) -> Result<Self> {
        Self::map_file_with(file, len, Sharing::Shared, libc::PROT_READ)
    }

    fn map_file_with(
        file: BorrowedFd<'_>,
        len: usize,
        sharing: Sharing,
        prot: libc::c_int,
    ) -> Result<Self> {
        let flags = sharing.flags() | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping at a kernel-chosen address; no existing memory is affected.
        let addr = unsafe { mmap(None, len, prot, flags, Some((file, 0))) }
            .map_err(|e| mmap_error(&format!("map {} MiB of guest RAM", len >> 20), e))?;
        let mut mapping = Self::at(addr, len, None);
        mapping._guard = Some(super::file_guard::register_range(addr, len));
        Ok(mapping)
    }

    /// Anonymous zeroed memory of `len` bytes (at least one page), faulted in up front: for
    /// buffers that are filled at once, where a fault per page would cost more than the copy.
    pub fn anonymous_populated(len: usize) -> Result<Self> {
        let len = len.max(4096);
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        // SAFETY: a fresh private anonymous mapping at a kernel-chosen address.
        let addr = unsafe { mmap(None, len, READ_WRITE, flags, None) }
            .map_err(|e| mmap_error(&format!("allocate {} KiB", len >> 10), e))?;
        Ok(Self::at(addr, len, None))
    }

    fn at(addr: *mut u8, len: usize, range: Option<std::sync::Arc<AddressRange>>) -> Self {
        Self {
            addr,
            len,
            range,
            released: std::sync::atomic::AtomicBool::new(false),
            _guard: None,
        }
    }

    /// Maps all of `range` to `file` from offset 0, read-write. The mapping must be handed back
    /// with [`Self::release_range`] before the range is reused (dropping it does that too).
    pub fn map_file_in(
        range: &std::sync::Arc<AddressRange>,
        file: BorrowedFd<'_>,
        sharing: Sharing,
    ) -> Result<Self> {
        let flags = sharing.flags() | libc::MAP_NORESERVE;
        // SAFETY: the fixed address replaces only the reserved range, which holds no other
        // mapping (whoever placed one there released it first).
        unsafe {
            mmap(
                Some(range.addr),
                range.len,
                READ_WRITE,
                flags,
                Some((file, 0)),
            )
        }
        .map_err(|e| mmap_error("map guest RAM into its reserved range", e))?;
        Ok(Self::at(
            range.addr,
            range.len,
            Some(std::sync::Arc::clone(range)),
        ))
    }

    /// For a mapping placed in an [`AddressRange`]: drops its pages and makes the range an
    /// inaccessible reservation again, so the range can take the next VM's RAM. Nothing may use
    /// the mapping afterwards.
    pub fn release_range(&self) -> Result<()> {
        let Some(range) = &self.range else {
            return Err(Error::Memory(
                "mapping is not placed in a reserved range".into(),
            ));
        };
        if !self
            .released
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            range.clear()?;
        }
        Ok(())
    }

    /// Marks the range as handed back without clearing it, for a caller that maps over it at
    /// once (clearing first would make KVM invalidate the memslot twice).
    pub(super) fn forget_range(&self) {
        self.released
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Replaces `[offset, offset+len)` of this mapping, in place, with a mapping of `file` at the
    /// same offset. KVM's MMU notifiers see the switch, so memslots over it stay valid.
    pub fn remap_range(
        &self,
        offset: usize,
        len: usize,
        file: BorrowedFd<'_>,
        sharing: Sharing,
    ) -> Result<()> {
        self.check_range(offset, len)?;
        let flags = sharing.flags() | libc::MAP_NORESERVE;
        // SAFETY: the range lies inside the mapping this value owns (checked above); the fixed
        // address replaces only those pages, and guest RAM is never referenced by Rust references.
        unsafe {
            mmap(
                Some(self.addr.add(offset)),
                len,
                READ_WRITE,
                flags,
                Some((file, offset as libc::off_t)),
            )
        }
        .map_err(|e| mmap_error("remap guest RAM", e))?;
        Ok(())
    }

    /// [`Self::remap_range`] that does not free the pages it replaces on the caller's thread:
    /// they are moved (page tables only) to a detached mapping, returned to be dropped
    /// elsewhere. Freeing thousands of private pages is what made such a remap slow inside a
    /// VM's pause. The range never becomes a hole another thread's mmap could take: the file
    /// is mapped at a scratch address first, the old pages move out with `MREMAP_DONTUNMAP`
    /// (leaving the range mapped, empty: it reads as the file underneath until the next step,
    /// so callers keep readers out meanwhile), then the new mapping moves over the range. Falls
    /// back to a plain remap where the kernel cannot (the range spans several mappings).
    pub fn replace_range(
        &self,
        offset: usize,
        len: usize,
        file: BorrowedFd<'_>,
        sharing: Sharing,
    ) -> Result<Option<DetachedPages>> {
        self.check_range(offset, len)?;
        let flags = sharing.flags() | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping of `file` at a kernel-chosen address.
        let fresh = unsafe {
            mmap(
                None,
                len,
                READ_WRITE,
                flags,
                Some((file, offset as libc::off_t)),
            )
        }
        .map_err(|e| mmap_error("map a layer", e))?;
        let fresh = DetachedPages { addr: fresh, len };
        let target = self.addr.wrapping_add(offset);
        // SAFETY: moves the page tables of `[target, +len)`, inside the mapping this value owns
        // (checked above), to a new kernel-chosen address; the range itself stays mapped.
        let old = unsafe {
            libc::mremap(
                target.cast(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_DONTUNMAP,
            )
        };
        if old == libc::MAP_FAILED {
            drop(fresh);
            self.remap_range(offset, len, file, sharing)?;
            return Ok(None);
        }
        let old = DetachedPages {
            addr: old.cast(),
            len,
        };
        // SAFETY: moves the fresh mapping over the range, replacing its now empty mapping (no
        // pages to free); both ranges are owned here.
        let moved = unsafe {
            libc::mremap(
                fresh.addr.cast(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: puts the old pages back over the range (replacing its empty mapping).
            unsafe {
                libc::mremap(
                    old.addr.cast(),
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    target.cast::<libc::c_void>(),
                )
            };
            std::mem::forget(old);
            return Err(mmap_error("move a layer mapping into guest RAM", e));
        }
        // The fresh mapping now lives in the range: nothing left to unmap at its old address.
        std::mem::forget(fresh);
        Ok(Some(old))
    }

    /// Drops the private pages of `[offset, offset+len)`: a copy-on-write mapping reads its file
    /// again there, an anonymous one reads zeroes.
    pub fn discard(&self, offset: usize, len: usize) -> Result<()> {
        self.advise(offset, len, libc::MADV_DONTNEED, "DONTNEED")
    }

    /// Makes `[offset, offset+len)` present and writable in one call (private copies of a
    /// copy-on-write file's pages), so copying into it takes no page fault per page: faults are
    /// what costs most here, under nested paging.
    pub fn populate_write(&self, offset: usize, len: usize) -> Result<()> {
        self.advise(offset, len, libc::MADV_POPULATE_WRITE, "POPULATE_WRITE")
    }

    /// madvise over part of the mapping, for advice that only drops or faults in its pages.
    fn advise(&self, offset: usize, len: usize, advice: libc::c_int, name: &str) -> Result<()> {
        self.check_range(offset, len)?;
        // SAFETY: the range lies inside this mapping (checked above); the advice drops or faults
        // in pages of it and touches no other memory.
        let rc = unsafe { libc::madvise(self.addr.add(offset).cast(), len, advice) };
        if rc != 0 {
            return Err(Error::Memory(format!(
                "madvise({name}) failed: {}",
                io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping. Callers make sure nothing writes
    /// the range meanwhile (the VM is paused, or the mapping is a frozen image).
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        self.check_bytes(offset, dst.len())?;
        // SAFETY: the source range lies inside this live mapping (checked above) and `dst` is a
        // distinct Rust buffer, so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr.add(offset), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    /// Copies `src` into the mapping at `offset` (a private mapping copies the page on write).
    /// The mapping must be writable, and the VM using it paused.
    pub fn write_at(&self, offset: usize, src: &[u8]) -> Result<()> {
        self.check_bytes(offset, src.len())?;
        // SAFETY: the destination range lies inside this live mapping (checked above) and `src`
        // is a distinct Rust buffer; guest RAM is never borrowed as a Rust reference.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.addr.add(offset), src.len()) };
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` to this mapping at `offset`.
    pub fn copy_from(
        &self,
        offset: usize,
        src: &HostMapping,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        self.check_bytes(offset, len)?;
        src.check_bytes(src_offset, len)?;
        if std::ptr::eq(self, src) {
            return Err(Error::Memory("copy within one mapping".into()));
        }
        // SAFETY: both ranges lie inside live mappings (checked above); two different mappings
        // never overlap in the address space.
        unsafe {
            std::ptr::copy_nonoverlapping(src.addr.add(src_offset), self.addr.add(offset), len)
        };
        Ok(())
    }

    /// Writes `[offset, offset+len)` of the mapping into `file` at the same offset (a layer laid
    /// out like RAM). The range may be written meanwhile (a VM running during a pre-copy round):
    /// the file then gets some mix of old and new bytes, which the caller copies again later.
    pub fn write_to_file(&self, offset: usize, len: usize, file: &std::fs::File) -> Result<()> {
        self.check_bytes(offset, len)?;
        let mut done = 0usize;
        while done < len {
            let at = offset + done;
            // SAFETY: the source range lies inside this live mapping (checked above); the kernel
            // only reads it. No Rust reference to guest RAM exists, so a concurrent guest write
            // races only with the kernel's copy, which the caller tolerates (see above).
            let n = unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    self.addr.add(at).cast(),
                    len - done,
                    at as libc::off_t,
                )
            };
            if n <= 0 {
                return Err(Error::Memory(format!(
                    "cannot copy guest pages into a layer: {}",
                    io::Error::last_os_error()
                )));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Writes the pages in `pages` (runs of them) into `file` at their own offsets.
    pub fn copy_pages_to_file(
        &self,
        pages: &super::DirtyPages,
        file: &std::fs::File,
    ) -> Result<()> {
        for (start, n) in pages.runs() {
            self.write_to_file(start as usize, (n * super::PAGE_SIZE) as usize, file)?;
        }
        Ok(())
    }

    fn check_bytes(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Memory(format!(
                "range {offset:#x}+{len:#x} is outside the {:#x}-byte mapping",
                self.len
            ))),
        }
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end)
                if end <= self.len && offset.is_multiple_of(4096) && len.is_multiple_of(4096) =>
            {
                Ok(())
            }
            _ => Err(Error::Memory(format!(
                "range {offset:#x}+{len:#x} is not page-aligned inside the {:#x}-byte mapping",
                self.len
            ))),
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        if let Some(range) = &self.range {
            if !*self.released.get_mut() {
                // Give the range back as a reservation; whoever holds it last unmaps it.
                let _ = range.clear();
            }
            return;
        }
        // SAFETY: unmaps exactly the range this value mapped; nothing refers to it any more
        // (vm-memory regions built over it and KVM memslots are dropped before it).
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Pages moved out of guest RAM ([`HostMapping::replace_range`]), freed when dropped.
#[derive(Debug)]
pub struct DetachedPages {
    addr: *mut u8,
    len: usize,
}

// SAFETY: a private mapping owned by this value alone; nothing reads or writes it.
unsafe impl Send for DetachedPages {}

impl Drop for DetachedPages {
    fn drop(&mut self) {
        // A megabyte at a time: unmapping holds the process's mapping lock, which a VM's pause
        // may be waiting for (to swap in a layer); thousands of pages at once kept it for ms.
        const PIECE: usize = 1 << 20;
        let mut at = 0;
        while at < self.len {
            let len = PIECE.min(self.len - at);
            // SAFETY: unmaps a piece of the range this value owns, each piece once.
            unsafe { libc::munmap(self.addr.add(at).cast(), len) };
            at += len;
        }
    }
}

/// Creates an anonymous memory file (memfd) of `size` bytes; its pages are allocated on first
/// touch, so an untouched file costs nothing.
pub fn create_memfd(name: &str, size: u64) -> Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let cname = std::ffi::CString::new(name).map_err(|_| Error::Memory("bad memfd name".into()))?;
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Memory(format!(
            "memfd_create failed: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::Memory(format!("cannot size guest RAM to {} MiB: {e}", size >> 20)))?;
    Ok(file)
}

/// The byte ranges `[start, end)` of `file` (of `len` bytes) that hold data, ascending, found
/// with SEEK_DATA/SEEK_HOLE: holes of a sparse file read as zeroes and need not be copied.
/// Where the filesystem cannot tell, the whole file is one range.
pub fn data_ranges(file: BorrowedFd<'_>, len: u64) -> Result<Vec<(u64, u64)>> {
    let seek = |offset: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let offset = libc::off_t::try_from(offset).map_err(io::Error::other)?;
        // SAFETY: lseek only moves the file offset of a descriptor this process owns (the
        // callers read with pread, which ignores it).
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut ranges = Vec::new();
    let mut at = 0u64;
    while at < len {
        let start = match seek(at, libc::SEEK_DATA) {
            Ok(Some(s)) if s < len => s,
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(0, len)]),
            Err(e) => return Err(Error::Io(e)),
        };
        let end = match seek(start, libc::SEEK_HOLE) {
            Ok(Some(e)) => e.min(len),
            Ok(None) => len,
            Err(e) => return Err(Error::Io(e)),
        };
        if end <= start {
            break;
        }
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}
