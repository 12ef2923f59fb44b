//! The XSAVE family for the emulation assist: `xrstor`/`xrstors` load a guest's XSAVE area into
//! the vCPU through KVM_SET_XSAVE, `xsave`/`xsaveopt`/`xsavec`/`xsaves` store the vCPU's state
//! into one — in the standard format and in the compacted one (XCOMP_BV bit 63), for the
//! components KVM's 4 KiB buffer holds. KVM's buffer is in the standard format; component
//! offsets, sizes and alignment come from CPUID leaf 0xD (the host's: KVM lays out its buffer by
//! it, and this KVM shows guests the same leaf). Supervisor components are not handled: the
//! `s` forms are completed only while IA32_XSS is 0 (as they then act as their user forms).
//! Init and modified optimizations are not modelled: every requested component is written.

/// Where the XSAVE header's XSTATE_BV and XCOMP_BV sit.
const HEADER: usize = 512;
/// The first byte after the header (where the compacted format's components start).
const EXTENDED: usize = 576;
/// Legacy region: x87 control/status/tag/opcode/pointers, then MXCSR and its mask.
const X87_CONTROL: std::ops::Range<usize> = 0..24;
const MXCSR: std::ops::Range<usize> = 24..32;
const X87_REGISTERS: std::ops::Range<usize> = 32..160;
const XMM_REGISTERS: std::ops::Range<usize> = 160..416;
/// The x87 control word's initial value (FNINIT).
const FCW_INIT: u16 = 0x037f;
/// XCOMP_BV bit 63: the area is compacted.
pub(super) const COMPACTED: u64 = 1 << 63;
/// The largest area KVM_GET_XSAVE holds.
pub(super) const KVM_AREA: usize = 4096;

/// Where component `i` (2 and up) is in the standard format, how large it is, and whether the
/// compacted format aligns it to 64 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Component {
    pub(super) offset: usize,
    pub(super) size: usize,
    pub(super) aligned: bool,
}

/// CPUID leaf 0xD's description of component `i`.
pub(super) fn host_component(i: u32) -> Component {
    // (A missing sub-leaf reads as zeros: a zero-sized component.)
    let r = core::arch::x86_64::__cpuid_count(0xd, i);
    Component {
        offset: r.ebx as usize,
        size: r.eax as usize,
        aligned: r.ecx & 2 != 0,
    }
}

/// Where each component of `mask` (2 and up) lies in a compacted area holding `xcomp_bv`'s.
pub(super) fn compacted_offsets(
    xcomp_bv: u64,
    component: &dyn Fn(u32) -> Component,
) -> Vec<(u32, usize, usize)> {
    let mut at = EXTENDED;
    let mut out = Vec::new();
    for i in 2..63 {
        if xcomp_bv & (1 << i) == 0 {
            continue;
        }
        let c = component(i);
        if c.aligned {
            at = at.next_multiple_of(64);
        }
        out.push((i, at, c.size));
        at += c.size;
    }
    out
}

/// Where component `i` (2 and up) lies in an area: its standard offset, or its compacted one.
fn place(
    i: u32,
    compacted: Option<&[(u32, usize, usize)]>,
    component: &dyn Fn(u32) -> Component,
) -> Result<(usize, usize), String> {
    match compacted {
        None => {
            let c = component(i);
            Ok((c.offset, c.size))
        }
        Some(list) => list
            .iter()
            .find(|(j, _, _)| *j == i)
            .map(|&(_, at, size)| (at, size))
            .ok_or_else(|| format!("XSAVE component {i} is not in the compacted area")),
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// The components `rfbm` asks for that KVM's buffer cannot hold (AMX tile data, say).
fn check_fits(rfbm: u64, component: &dyn Fn(u32) -> Component) -> Result<(), String> {
    for i in 2..63 {
        if rfbm & (1 << i) != 0 {
            let c = component(i);
            if c.offset + c.size > KVM_AREA {
                return Err(format!(
                    "XSAVE component {i} ({} bytes at {}) is past KVM's 4 KiB buffer",
                    c.size, c.offset
                ));
            }
        }
    }
    Ok(())
}

/// XRSTOR: loads the components of `rfbm` from `area` (as read from guest memory; compacted
/// if its XCOMP_BV says so) into `kvm` (KVM's standard-format buffer). A component whose
/// XSTATE_BV bit is clear gets its initial state; MXCSR comes along with SSE or AVX.
pub(super) fn restore(
    area: &[u8],
    rfbm: u64,
    kvm: &mut [u8],
    component: &dyn Fn(u32) -> Component,
) -> Result<(), String> {
    check_fits(rfbm, component)?;
    let xstate_bv = u64_at(area, HEADER);
    let xcomp_bv = u64_at(area, HEADER + 8);
    let compacted = (xcomp_bv & COMPACTED != 0).then(|| compacted_offsets(xcomp_bv, component));
    if compacted.is_none() && xcomp_bv != 0 {
        return Err("XRSTOR of a standard-format area with XCOMP_BV set (#GP)".into());
    }
    for i in 0..63u32 {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        let present = xstate_bv & (1 << i) != 0;
        match i {
            0 => {
                for range in [X87_CONTROL, X87_REGISTERS] {
                    if present {
                        kvm[range.clone()].copy_from_slice(&area[range]);
                    } else {
                        kvm[range].fill(0);
                    }
                }
                if !present {
                    kvm[0..2].copy_from_slice(&FCW_INIT.to_le_bytes());
                }
            }
            1 => {
                if present {
                    kvm[XMM_REGISTERS].copy_from_slice(&area[XMM_REGISTERS]);
                } else {
                    kvm[XMM_REGISTERS].fill(0);
                }
            }
            _ => {
                let standard = component(i);
                let to = standard.offset..standard.offset + standard.size;
                if present {
                    let (at, size) = place(i, compacted.as_deref(), component)?;
                    kvm[to].copy_from_slice(&area[at..at + size]);
                } else {
                    kvm[to].fill(0);
                }
            }
        }
    }
    // MXCSR is loaded when SSE or AVX state is requested, whatever XSTATE_BV says.
    if rfbm & 0b110 != 0 {
        kvm[24..28].copy_from_slice(&area[24..28]);
    }
    let mut bv = u64_at(kvm, HEADER);
    bv = (bv & !rfbm) | (xstate_bv & rfbm);
    kvm[HEADER..HEADER + 8].copy_from_slice(&bv.to_le_bytes());
    Ok(())
}

/// XSAVE/XSAVEOPT (standard) or XSAVEC (compacted, `compact`): stores the components of
/// `rfbm` from `kvm` into `area` (as read from guest memory, written back by the caller) and
/// updates its header.
pub(super) fn save(
    kvm: &[u8],
    rfbm: u64,
    compact: bool,
    area: &mut [u8],
    component: &dyn Fn(u32) -> Component,
) -> Result<(), String> {
    check_fits(rfbm, component)?;
    let compacted = compact.then(|| compacted_offsets(rfbm, component));
    let in_use = u64_at(kvm, HEADER);
    for i in 0..63u32 {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        match i {
            0 => {
                for range in [X87_CONTROL, X87_REGISTERS] {
                    area[range.clone()].copy_from_slice(&kvm[range]);
                }
            }
            1 => area[XMM_REGISTERS].copy_from_slice(&kvm[XMM_REGISTERS]),
            _ => {
                let standard = component(i);
                let (at, size) = place(i, compacted.as_deref(), component)?;
                area[at..at + size]
                    .copy_from_slice(&kvm[standard.offset..standard.offset + standard.size]);
            }
        }
    }
    if rfbm & 0b110 != 0 {
        area[MXCSR].copy_from_slice(&kvm[MXCSR]);
    }
    let (xstate_bv, xcomp_bv) = if compact {
        (in_use & rfbm, COMPACTED | rfbm)
    } else {
        let old = u64_at(area, HEADER);
        ((old & !rfbm) | (in_use & rfbm), u64_at(area, HEADER + 8))
    };
    area[HEADER..HEADER + 8].copy_from_slice(&xstate_bv.to_le_bytes());
    area[HEADER + 8..HEADER + 16].copy_from_slice(&xcomp_bv.to_le_bytes());
    Ok(())
}

/// How many bytes of guest memory an area for `rfbm` spans (standard or compacted).
pub(super) fn area_len(
    rfbm_or_xcomp: u64,
    compacted: bool,
    component: &dyn Fn(u32) -> Component,
) -> usize {
    if compacted {
        compacted_offsets(rfbm_or_xcomp, component)
            .last()
            .map_or(EXTENDED, |&(_, at, size)| at + size)
    } else {
        (2..63)
            .filter(|i| rfbm_or_xcomp & (1 << i) != 0)
            .map(|i| {
                let c = component(i);
                c.offset + c.size
            })
            .max()
            .unwrap_or(EXTENDED)
            .max(EXTENDED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU with AVX (component 2: 256 bytes at 576) and a 64-byte-aligned component 5 of 64
    /// bytes at 1088, say.
    fn component(i: u32) -> Component {
        match i {
            2 => Component {
                offset: 576,
                size: 256,
                aligned: false,
            },
            5 => Component {
                offset: 1088,
                size: 64,
                aligned: true,
            },
            _ => Component {
                offset: 0,
                size: 0,
                aligned: false,
            },
        }
    }

    #[test]
    fn standard_and_compacted_areas_round_trip_through_kvms_buffer() {
        let mut kvm = vec![0u8; KVM_AREA];
        for (i, b) in kvm.iter_mut().enumerate().take(1152) {
            *b = (i % 251) as u8;
        }
        let rfbm: u64 = 0b100111; // x87, SSE, AVX, component 5
        kvm[HEADER..HEADER + 8].copy_from_slice(&rfbm.to_le_bytes());
        kvm[HEADER + 8..HEADER + 64].fill(0);
        // Standard: the same offsets.
        let mut area = vec![0u8; 2048];
        save(&kvm, rfbm, false, &mut area, &component).unwrap();
        assert_eq!(area[160..416], kvm[160..416]);
        assert_eq!(area[576..832], kvm[576..832]);
        assert_eq!(u64_at(&area, HEADER), rfbm);
        // Compacted: AVX right after the header, component 5 at the next 64-byte boundary.
        let mut packed = vec![0u8; 2048];
        save(&kvm, rfbm, true, &mut packed, &component).unwrap();
        assert_eq!(u64_at(&packed, HEADER + 8), COMPACTED | rfbm);
        assert_eq!(packed[576..832], kvm[576..832]);
        assert_eq!(packed[832..896], kvm[1088..1152]);
        assert_eq!(area_len(rfbm, true, &component), 896);
        // Restoring either into a blank buffer gives the same state back.
        for source in [&area, &packed] {
            let mut back = vec![0u8; KVM_AREA];
            restore(source, rfbm, &mut back, &component).unwrap();
            assert_eq!(back[0..24], kvm[0..24]);
            assert_eq!(back[24..28], kvm[24..28], "MXCSR");
            assert_eq!(back[32..416], kvm[32..416]);
            assert_eq!(back[576..832], kvm[576..832]);
            assert_eq!(back[1088..1152], kvm[1088..1152]);
            assert_eq!(u64_at(&back, HEADER), rfbm);
        }
        // A component requested but not present gets its initial state; one not requested is
        // left alone.
        let mut partial = area.clone();
        partial[HEADER..HEADER + 8].copy_from_slice(&0b10u64.to_le_bytes());
        let mut state = kvm.clone();
        restore(&partial, 0b101, &mut state, &component).unwrap();
        assert_eq!(state[0..2], FCW_INIT.to_le_bytes());
        assert!(state[576..832].iter().all(|&b| b == 0));
        assert_eq!(state[160..416], kvm[160..416], "SSE not requested");
        // A standard area with XCOMP_BV set is refused (#GP on hardware).
        let mut bad = area.clone();
        bad[HEADER + 8] = 1;
        assert!(restore(&bad, rfbm, &mut vec![0u8; KVM_AREA], &component).is_err());
    }

    #[test]
    fn components_past_kvms_buffer_are_refused() {
        let huge = |i: u32| match i {
            18 => Component {
                offset: 2752,
                size: 8192,
                aligned: true,
            },
            _ => component(i),
        };
        let err = restore(&[0u8; 4096], 1 << 18, &mut [0u8; KVM_AREA], &huge).unwrap_err();
        assert!(err.contains("past KVM's 4 KiB buffer"), "{err}");
    }
}
