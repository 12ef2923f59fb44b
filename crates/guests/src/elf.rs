//! A minimal ELF64 writer: one PT_LOAD segment and a PT_NOTE with the Xen PVH entry note, which
//! is what vmfork, QEMU (`-kernel`) and Firecracker-style loaders look for.

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_RWX: u32 = 7;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry address.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Lays out an ELF64 x86-64 executable holding `image` at physical/virtual `load_addr`.
pub fn write_elf(image: &[u8], load_addr: u64, entry64: u64, pvh_entry: Option<u64>) -> Vec<u8> {
    write_elf_with(image, load_addr, entry64, pvh_entry, None)
}

/// [`write_elf`] with a second loadable page-aligned segment `(address, bytes)` (the mailbox
/// page with parameters filled in, for loaders that cannot write guest memory themselves).
pub fn write_elf_with(
    image: &[u8],
    load_addr: u64,
    entry64: u64,
    pvh_entry: Option<u64>,
    extra: Option<(u64, &[u8])>,
) -> Vec<u8> {
    let mut note = Vec::new();
    if let Some(pvh) = pvh_entry {
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
        note.extend_from_slice(&4u32.to_le_bytes()); // descsz
        note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&(pvh as u32).to_le_bytes());
    }
    let phnum = 1 + usize::from(!note.is_empty()) + usize::from(extra.is_some());
    let note_off = EHDR_SIZE + PHDR_SIZE * phnum;
    // The loadable image starts page-aligned in the file so offset % align == vaddr % align.
    let image_off = (note_off + note.len()).next_multiple_of(0x1000);
    let extra_off = (image_off + image.len()).next_multiple_of(0x1000);

    let mut out = Vec::with_capacity(image_off + image.len());
    // ELF header.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    out.extend_from_slice(&entry64.to_le_bytes());
    out.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    out.extend_from_slice(&(phnum as u16).to_le_bytes());
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    let size = image.len() as u64;
    push_phdr(&mut out, PT_LOAD, image_off as u64, load_addr, size, 0x1000);
    if let Some((addr, bytes)) = extra {
        let len = bytes.len() as u64;
        push_phdr(&mut out, PT_LOAD, extra_off as u64, addr, len, 0x1000);
    }
    if !note.is_empty() {
        push_phdr(&mut out, PT_NOTE, note_off as u64, 0, note.len() as u64, 4);
        out.extend_from_slice(&note);
    }
    out.resize(image_off, 0);
    out.extend_from_slice(image);
    if let Some((_, bytes)) = extra {
        out.resize(extra_off, 0);
        out.extend_from_slice(bytes);
    }
    out
}

fn push_phdr(out: &mut Vec<u8>, kind: u32, offset: u64, addr: u64, size: u64, align: u64) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&PF_RWX.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    out.extend_from_slice(&size.to_le_bytes()); // p_filesz
    out.extend_from_slice(&size.to_le_bytes()); // p_memsz
    out.extend_from_slice(&align.to_le_bytes());
}
