//! Coverage without instrumentation: basic-block starts found by disassembling the target, each
//! armed with a one-shot `int3` in the coverage base (the fork every target forks from). The
//! first time any target reaches a block it stops, the block is recorded, and its original byte
//! is written back into the image all targets share ([`Vm::rewrite_origin`]): a block costs one
//! stop once ever, and an input that reaches no new block runs at full speed.
//!
//! A hit arrives one of two ways: as a KVM debug exit where KVM intercepts `int3` for the VMM
//! (`KVM_GUESTDBG_USE_SW_BP`, bare-metal KVM), the vCPU stopped on the `int3`, so the run goes
//! on once the byte is back; or, where the host does not intercept it (nested paravirtual KVM)
//! and the guest has no #BP handler, as a triple fault one byte after an armed block, and the
//! input is run again from the reset.

use crate::error::{Error, Result};
use crate::Vm;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// The `int3` opcode.
pub const INT3: u8 = 0xcc;

/// The block starts and comparison constants found in a code range.
#[derive(Clone, Debug, Default)]
pub struct CodeMap {
    /// Guest-virtual addresses of basic-block starts.
    pub blocks: BTreeSet<u64>,
    /// Constants the code compares with (immediates of `cmp`), as byte strings: a dictionary
    /// for the mutator, static comparison feedback at no run-time cost.
    pub tokens: BTreeSet<Vec<u8>>,
}

/// Disassembles `code` (the bytes at guest-virtual `base`) by recursive descent from `entries`:
/// every branch target, fall-through of a conditional branch, call target and return site in
/// the range starts a block. Only code reached from an entry is decoded, so data between
/// functions never gets a breakpoint; code reached only through indirect jumps needs its own
/// entry (or a block list from the user).
pub fn map_code(code: &[u8], base: u64, entries: &[u64]) -> CodeMap {
    let end = base + code.len() as u64;
    let inside = |addr: u64| addr >= base && addr < end;
    let mut map = CodeMap::default();
    let mut decoded = BTreeSet::new();
    let mut work: Vec<u64> = entries.iter().copied().filter(|&e| inside(e)).collect();
    map.blocks.extend(work.iter().copied());
    while let Some(start) = work.pop() {
        if !decoded.insert(start) {
            continue;
        }
        let offset = (start - base) as usize;
        let mut decoder = Decoder::with_ip(64, &code[offset..], start, DecoderOptions::NONE);
        let mut insn = Instruction::default();
        while decoder.can_decode() {
            decoder.decode_out(&mut insn);
            if insn.is_invalid() {
                break;
            }
            collect_token(&insn, &mut map.tokens);
            let next = insn.next_ip();
            let mut push = |addr: u64, work: &mut Vec<u64>| {
                if inside(addr) {
                    map.blocks.insert(addr);
                    work.push(addr);
                }
            };
            match insn.flow_control() {
                FlowControl::Next | FlowControl::IndirectCall => {}
                FlowControl::Call => {
                    push(insn.near_branch_target(), &mut work);
                    push(next, &mut work);
                    break;
                }
                FlowControl::ConditionalBranch => {
                    push(insn.near_branch_target(), &mut work);
                    push(next, &mut work);
                    break;
                }
                FlowControl::UnconditionalBranch => {
                    if insn.op0_kind() == OpKind::NearBranch64 {
                        push(insn.near_branch_target(), &mut work);
                    }
                    break;
                }
                _ => break,
            }
            // A block that runs into another block's start ends there.
            if map.blocks.contains(&next) {
                work.push(next);
                break;
            }
        }
    }
    map
}

fn collect_token(insn: &Instruction, tokens: &mut BTreeSet<Vec<u8>>) {
    if insn.mnemonic() != Mnemonic::Cmp || insn.op_count() != 2 {
        return;
    }
    let value = match insn.op1_kind() {
        OpKind::Immediate8 => u64::from(insn.immediate8()),
        OpKind::Immediate16 => u64::from(insn.immediate16()),
        OpKind::Immediate32 => u64::from(insn.immediate32()),
        OpKind::Immediate8to16 | OpKind::Immediate8to32 | OpKind::Immediate8to64 => {
            u64::from(insn.immediate8())
        }
        OpKind::Immediate32to64 => u64::from(insn.immediate32()),
        _ => return,
    };
    let bytes = value.to_le_bytes();
    let len = bytes.iter().rposition(|&b| b != 0).map_or(1, |i| i + 1);
    tokens.insert(bytes[..len].to_vec());
}

/// What reaching an armed address means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakKind {
    /// A block start: record it, take the breakpoint out, go on.
    Coverage,
    /// A crash site the user named (a panic routine, an assertion handler): stays armed.
    Crash,
}

#[derive(Clone, Copy, Debug)]
struct Site {
    phys: u64,
    original: u8,
    kind: BreakKind,
    hit: bool,
}

/// What a breakpoint stop turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hit {
    /// A block reached for the first time by any target.
    NewBlock,
    /// A block another target reached first (this target still saw the old byte).
    KnownBlock,
    /// A crash site.
    Crash,
}

/// The armed sites of one coverage base, shared by every target forked from it.
pub struct Breakpoints {
    sites: Mutex<HashMap<u64, Site>>,
}

impl Breakpoints {
    /// Writes an `int3` at every coverage block and crash site of `base` (a stopped fork that
    /// the targets will be forked from), as vCPU 0 maps them.
    pub fn arm(base: &Vm, blocks: &BTreeSet<u64>, crash_sites: &[u64]) -> Result<Self> {
        let mut pages = HashMap::new();
        let mut sites = HashMap::new();
        let wanted = blocks
            .iter()
            .map(|&a| (a, BreakKind::Coverage))
            .chain(crash_sites.iter().map(|&a| (a, BreakKind::Crash)));
        for (addr, kind) in wanted {
            let page = addr & !0xfff;
            let phys_page = match pages.get(&page) {
                Some(&p) => p,
                None => {
                    let p = base.translate(0, page)?;
                    pages.insert(page, p);
                    p
                }
            };
            let phys = phys_page + (addr & 0xfff);
            let mut original = [0u8];
            base.ram().read(phys, &mut original)?;
            if original[0] == INT3 {
                return Err(Error::Invalid(format!(
                    "{addr:#x} already holds an int3: breakpoints would be lost"
                )));
            }
            base.ram().write(phys, &[INT3])?;
            sites.insert(
                addr,
                Site {
                    phys,
                    original: original[0],
                    kind,
                    hit: false,
                },
            );
        }
        Ok(Self {
            sites: Mutex::new(sites),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Site>> {
        self.sites.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `addr` is a site (armed now or once: another target may have taken it out
    /// between this target's stop and this call).
    pub fn is_site(&self, addr: u64) -> bool {
        self.lock().contains_key(&addr)
    }

    /// `target` stopped on the site at `addr`: a coverage breakpoint is taken out of the image
    /// every target shares (and out of `target`'s own RAM). `None` if `addr` is no site.
    pub fn take(&self, target: &Vm, addr: u64) -> Result<Option<Hit>> {
        let mut sites = self.lock();
        let Some(site) = sites.get_mut(&addr) else {
            return Ok(None);
        };
        if site.kind == BreakKind::Crash {
            return Ok(Some(Hit::Crash));
        }
        target.rewrite_origin(site.phys, &[site.original])?;
        let first = !site.hit;
        site.hit = true;
        Ok(Some(if first {
            Hit::NewBlock
        } else {
            Hit::KnownBlock
        }))
    }

    /// Blocks armed, and blocks hit so far.
    pub fn counts(&self) -> (usize, usize) {
        let sites = self.lock();
        let blocks = sites
            .values()
            .filter(|s| s.kind == BreakKind::Coverage)
            .count();
        let hit = sites.values().filter(|s| s.hit).count();
        (blocks, hit)
    }

    /// Addresses of the blocks hit so far, ascending.
    pub fn hit_blocks(&self) -> Vec<u64> {
        let mut hit: Vec<u64> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.hit)
            .map(|(&a, _)| a)
            .collect();
        hit.sort_unstable();
        hit
    }
}

/// Reads `[start, end)` of guest-virtual memory as vCPU 0 of `vm` sees it.
pub fn read_code(vm: &Vm, start: u64, end: u64) -> Result<Vec<u8>> {
    const MAX_CODE: u64 = 64 << 20;
    if end <= start || end - start > MAX_CODE {
        return Err(Error::Invalid(format!(
            "code range {start:#x}..{end:#x} is empty or larger than {} MiB",
            MAX_CODE >> 20
        )));
    }
    let mut code = vec![0u8; (end - start) as usize];
    vm.read_virtual(0, start, &mut code)?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recursive_descent_finds_branch_targets_and_skips_data() {
        // 0: cmp al, 0x56 ; 2: jne +4 (to 8) ; 4: cmp al, 7 ; 6: jmp +2 (to 10)
        // 8: int3-looking data never reached? no: 8 is a jne target: ret ; 9: data 0xff
        // 10: ret
        let code = [
            0x3c, 0x56, 0x75, 0x04, 0x3c, 0x07, 0xeb, 0x02, 0xc3, 0xff, 0xc3,
        ];
        let map = map_code(&code, 0x1000, &[0x1000]);
        let blocks: Vec<u64> = map.blocks.iter().copied().collect();
        assert_eq!(blocks, vec![0x1000, 0x1004, 0x1008, 0x100a]);
        assert!(map.tokens.contains(&vec![0x56]));
        assert!(map.tokens.contains(&vec![0x07]));
    }

    #[test]
    fn entries_outside_the_range_are_ignored() {
        let map = map_code(&[0xc3], 0x1000, &[0x2000]);
        assert!(map.blocks.is_empty());
    }
}
