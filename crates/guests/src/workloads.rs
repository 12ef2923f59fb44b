//! The CPL3 workloads. Each runs at native speed (ring 3 is not emulated on nested hosts) and
//! talks to the host through the serial port, the exit port and the mailbox page.

use crate::layout::{
    mailbox, DMA_BUFFER, EXIT_PORT, INPUT, MAILBOX, MEMTOUCH_BASE, READY_PORT, SERIAL_PORT,
    USER_CODE,
};
use iced_x86::code_asm::*;
use iced_x86::IcedError;

/// `counter`'s delay loop iterations between lines when the mailbox leaves it at zero.
pub const DEFAULT_COUNTER_DELAY: u64 = 20_000_000;
/// `memtouch`'s page count when the mailbox leaves it at zero.
pub const DEFAULT_MEMTOUCH_PAGES: u64 = 16;
/// The input that makes `harness` crash (it triple-faults).
pub const HARNESS_CRASH_INPUT: &[u8] = b"FUZZ";
/// Mixed into `memtouch`'s pattern so that seed 0, page 0 is not all zero bytes.
pub const MEMTOUCH_PATTERN_SALT: u64 = 0x5A5A_5A5A_A5A5_A5A5;

/// The 8-byte word `memtouch` fills page `index` with, for a given seed.
pub fn memtouch_pattern(seed: u64, index: u64) -> u64 {
    seed ^ index ^ MEMTOUCH_PATTERN_SALT
}

/// Shared helpers every workload is assembled with: `print`, `print_dec`, `exit`.
pub(crate) struct Asm {
    pub(crate) a: CodeAssembler,
    print: CodeLabel,
    pub(crate) print_dec: CodeLabel,
    pub(crate) exit: CodeLabel,
}

impl Asm {
    pub(crate) fn new() -> Result<Self, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let print = a.create_label();
        let print_dec = a.create_label();
        let exit = a.create_label();
        // r15 holds the mailbox address in every workload.
        a.mov(r15, MAILBOX)?;
        Ok(Self {
            a,
            print,
            print_dec,
            exit,
        })
    }

    /// Prints a string placed after the code.
    pub(crate) fn print_str(&mut self, label: CodeLabel, len: usize) -> Result<(), IcedError> {
        self.a.lea(rsi, ptr(label))?;
        self.a.mov(ecx, len as u32)?;
        self.a.call(self.print)
    }

    /// Says "ready for input" on the ready port (where fuzzing forks the target).
    pub(crate) fn announce_ready(&mut self) -> Result<(), IcedError> {
        self.a.mov(dx, READY_PORT as u32)?;
        self.a.out(dx, al)
    }

    pub(crate) fn exit_with(&mut self, code: u8) -> Result<(), IcedError> {
        self.a.mov(eax, code as u32)?;
        self.a.jmp(self.exit)
    }

    /// Emits the helper bodies.
    fn emit_helpers(&mut self) -> Result<(), IcedError> {
        let a = &mut self.a;
        // print(rsi = bytes, rcx = length): one `rep outsb`, which KVM turns into one exit.
        a.set_label(&mut self.print)?;
        a.mov(dx, SERIAL_PORT as u32)?;
        a.rep().outsb()?;
        a.ret()?;

        // print_dec(rax): the number in decimal and a newline.
        a.set_label(&mut self.print_dec)?;
        a.sub(rsp, 32)?;
        a.lea(rdi, ptr(rsp + 31))?;
        a.mov(byte_ptr(rdi), b'\n' as u32)?;
        a.mov(r8d, 1u32)?;
        a.mov(r9d, 10u32)?;
        let mut digit = a.create_label();
        a.set_label(&mut digit)?;
        a.xor(edx, edx)?;
        a.div(r9)?;
        a.add(dl, b'0' as u32)?;
        a.dec(rdi)?;
        a.mov(byte_ptr(rdi), dl)?;
        a.inc(r8)?;
        a.test(rax, rax)?;
        a.jnz(digit)?;
        a.mov(rsi, rdi)?;
        a.mov(rcx, r8)?;
        a.call(self.print)?;
        a.add(rsp, 32)?;
        a.ret()?;

        // exit(al): write the code to the exit port, then spin (only reached where no exit
        // device listens, e.g. QEMU without isa-debug-exit).
        a.set_label(&mut self.exit)?;
        a.mov(dx, EXIT_PORT as u32)?;
        a.out(dx, al)?;
        let mut spin = a.create_label();
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)?;
        Ok(())
    }

    /// Emits the helper bodies and assembles everything at [`USER_CODE`].
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, IcedError> {
        self.emit_helpers()?;
        self.a.assemble(USER_CODE)
    }

    /// [`Self::finish`] for a ring-0 workload with an IDT at [`IDLE_IDT`] of `vectors`
    /// interrupt gates to `handler`, but for the vectors `own` gives handlers of their own (its
    /// `lidt` operand: [`emit_idtr`]).
    pub(crate) fn finish_with_idt(
        mut self,
        handler: CodeLabel,
        own: &[(u8, CodeLabel)],
        vectors: usize,
    ) -> Result<Vec<u8>, IcedError> {
        self.emit_helpers()?;
        let assembled = self.a.assemble_options(
            USER_CODE,
            iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let default = assembled.label_ip(&handler)?;
        let gates = own
            .iter()
            .map(|(vector, label)| Ok((*vector, assembled.label_ip(label)?)))
            .collect::<Result<Vec<_>, IcedError>>()?;
        let mut code = with_idt(assembled.inner.code_buffer, default, vectors);
        let idt = (IDLE_IDT - USER_CODE) as usize;
        for (vector, handler) in gates {
            let at = idt + usize::from(vector) * 16;
            code[at..at + 16].copy_from_slice(&interrupt_gates(handler, 1));
        }
        Ok(code)
    }
}

fn string(a: &mut CodeAssembler, text: &[u8]) -> Result<CodeLabel, IcedError> {
    let mut label = a.create_label();
    a.set_label(&mut label)?;
    a.db(text)?;
    Ok(label)
}

/// Prints one line and exits 0.
pub fn hello() -> Result<Vec<u8>, IcedError> {
    const MSG: &[u8] = b"Hello from the vmfork guest!\n";
    let mut g = Asm::new()?;
    let msg = string_after(&mut g, MSG)?;
    g.print_str(msg, MSG.len())?;
    g.exit_with(0)?;
    g.finish()
}

/// Counts from 1, storing the value in the mailbox and printing `counter N` lines, with a delay
/// loop (PARAM0 iterations) between them; stops with exit 0 at PARAM2 if that is non-zero.
pub fn counter() -> Result<Vec<u8>, IcedError> {
    const PREFIX: &[u8] = b"counter ";
    let mut g = Asm::new()?;
    let prefix = string_after(&mut g, PREFIX)?;
    let a = &mut g.a;
    let mut have_delay = a.create_label();
    a.mov(r12, qword_ptr(r15 + mailbox::PARAM0))?;
    a.test(r12, r12)?;
    a.jnz(have_delay)?;
    a.mov(r12, DEFAULT_COUNTER_DELAY)?;
    a.set_label(&mut have_delay)?;
    // Continue from the mailbox value, so a restored or forked counter counts on.
    a.mov(rbx, qword_ptr(r15 + mailbox::PROGRESS))?;
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.inc(rbx)?;
    a.mov(qword_ptr(r15 + mailbox::PROGRESS), rbx)?;
    g.print_str(prefix, PREFIX.len())?;
    let a = &mut g.a;
    a.mov(rax, rbx)?;
    a.call(g.print_dec)?;
    // The stop value is read every time, so the host can set it while the guest runs.
    a.cmp(rbx, qword_ptr(r15 + mailbox::PARAM2))?;
    a.je(done)?;
    a.mov(rcx, r12)?;
    let mut delay = a.create_label();
    a.set_label(&mut delay)?;
    a.dec(rcx)?;
    a.jnz(delay)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    g.exit_with(0)?;
    g.finish()
}

/// Forever: reads the TSC (at CPL3, where no hypervisor emulates the read), stores it in
/// CLOCK_TSC and writes the ready port; so a VMM can compare the guest's TSC with its own view.
pub fn clock() -> Result<Vec<u8>, IcedError> {
    let mut g = Asm::new()?;
    let mut top = g.a.create_label();
    g.a.set_label(&mut top)?;
    g.a.rdtsc()?;
    g.a.shl(rdx, 32)?;
    g.a.or(rax, rdx)?;
    g.a.mov(qword_ptr(r15 + mailbox::CLOCK_TSC), rax)?;
    g.announce_ready()?;
    g.a.jmp(top)?;
    g.finish()
}

/// Fills PARAM0 pages from [`MEMTOUCH_BASE`] with [`memtouch_pattern`]`(PARAM1, page)`, counting
/// pages done in PROGRESS, prints `memtouch done N` and exits 0.
pub fn memtouch() -> Result<Vec<u8>, IcedError> {
    const MSG: &[u8] = b"memtouch done ";
    let mut g = Asm::new()?;
    g.announce_ready()?;
    let msg = string_after(&mut g, MSG)?;
    let a = &mut g.a;
    let mut have_pages = a.create_label();
    a.mov(r10, qword_ptr(r15 + mailbox::PARAM0))?;
    a.test(r10, r10)?;
    a.jnz(have_pages)?;
    a.mov(r10, DEFAULT_MEMTOUCH_PAGES)?;
    a.set_label(&mut have_pages)?;
    a.mov(r9, qword_ptr(r15 + mailbox::PARAM1))?;
    a.mov(r11, MEMTOUCH_PATTERN_SALT)?;
    a.xor(r9, r11)?;
    a.mov(rdi, MEMTOUCH_BASE)?;
    a.xor(ebx, ebx)?;
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut top)?;
    a.cmp(rbx, r10)?;
    a.jae(done)?;
    a.mov(rax, r9)?;
    a.xor(rax, rbx)?;
    a.mov(ecx, 512u32)?;
    a.rep().stosq()?;
    a.inc(rbx)?;
    a.mov(qword_ptr(r15 + mailbox::PROGRESS), rbx)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    g.print_str(msg, MSG.len())?;
    g.a.mov(rax, rbx)?;
    g.a.call(g.print_dec)?;
    g.exit_with(0)?;
    g.finish()
}

/// `dirty`'s working set when the mailbox leaves PARAM0 at zero.
pub const DEFAULT_DIRTY_PAGES: u64 = 256;

/// Rewrites a working set of PARAM0 pages from [`MEMTOUCH_BASE`] forever, one generation after
/// another: generation `g` stamps `g` into the first and last 8 bytes of every page in order,
/// then stores `g` in PROGRESS. PARAM1 delay-loop iterations follow each page (0: none). While
/// it runs, `rbx` holds the generation being written and `r14` the pages of it done, so a fork
/// or snapshot can be checked for being one instant ([`dirty_instant_problem`]).
pub fn dirty() -> Result<Vec<u8>, IcedError> {
    let mut g = Asm::new()?;
    let a = &mut g.a;
    let mut have_pages = a.create_label();
    a.mov(r12, qword_ptr(r15 + mailbox::PARAM0))?;
    a.test(r12, r12)?;
    a.jnz(have_pages)?;
    a.mov(r12, DEFAULT_DIRTY_PAGES)?;
    a.set_label(&mut have_pages)?;
    a.mov(r13, qword_ptr(r15 + mailbox::PARAM1))?;
    // Continue from the mailbox, so a restored or forked guest writes the next generation.
    a.mov(rbx, qword_ptr(r15 + mailbox::PROGRESS))?;
    let mut generation = a.create_label();
    let mut page = a.create_label();
    let mut no_delay = a.create_label();
    a.set_label(&mut generation)?;
    // r14 first, then rbx: every instruction boundary leaves a state the check accepts.
    a.xor(r14d, r14d)?;
    a.mov(rdi, MEMTOUCH_BASE)?;
    a.inc(rbx)?;
    a.set_label(&mut page)?;
    a.mov(qword_ptr(rdi), rbx)?;
    a.mov(qword_ptr(rdi + 4088), rbx)?;
    a.add(rdi, 4096)?;
    a.inc(r14)?;
    a.mov(rcx, r13)?;
    a.test(rcx, rcx)?;
    a.jz(no_delay)?;
    let mut delay = a.create_label();
    a.set_label(&mut delay)?;
    a.dec(rcx)?;
    a.jnz(delay)?;
    a.set_label(&mut no_delay)?;
    a.cmp(r14, r12)?;
    a.jb(page)?;
    a.mov(qword_ptr(r15 + mailbox::PROGRESS), rbx)?;
    a.jmp(generation)?;
    g.finish()
}

/// Where `idle` keeps its interrupt table: the page after its code.
pub const IDLE_IDT: u64 = USER_CODE + 0x1000;
/// The vector `idle`'s local APIC timer interrupts on.
pub const IDLE_TIMER_VECTOR: u8 = 0x20;
pub(crate) const LAPIC_BASE: u64 = 0xFEE0_0000;

/// Halts at ring 0 with interrupts on, forever; every interrupt wakes it, is acknowledged (EOI)
/// and counted in PROGRESS. PARAM0 non-zero arms the local APIC timer, periodic, with that
/// initial count (divide by 1); zero leaves it halted until something else interrupts it. What
/// real guests do when they have nothing to do, and what hosting many VMs needs. Its code is
/// followed by its IDT ([`IDLE_IDT`]: every vector an interrupt gate to the one handler).
pub fn idle() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut handler = a.create_label();
    let mut idtr = a.create_label();
    let mut halt = a.create_label();
    a.lidt(ptr(idtr))?;
    a.mov(rbx, LAPIC_BASE)?;
    // Software-enable the local APIC (spurious vector 0xff), then the timer if asked.
    a.mov(dword_ptr(rbx + 0xF0), 0x1FFu32)?;
    a.mov(rax, MAILBOX)?;
    a.mov(rax, qword_ptr(rax + mailbox::PARAM0))?;
    a.test(rax, rax)?;
    a.jz(halt)?;
    a.mov(dword_ptr(rbx + 0x3E0), 0xBu32)?; // divide by 1
    a.mov(
        dword_ptr(rbx + 0x320),
        (1u32 << 17) | IDLE_TIMER_VECTOR as u32,
    )?; // periodic
    a.mov(dword_ptr(rbx + 0x380), eax)?;
    a.set_label(&mut halt)?;
    a.sti()?;
    a.hlt()?;
    a.jmp(halt)?;
    // Any interrupt: count it, acknowledge it, return to the halt loop.
    a.set_label(&mut handler)?;
    a.push(rax)?;
    a.mov(rax, MAILBOX)?;
    a.inc(qword_ptr(rax + mailbox::PROGRESS))?;
    a.mov(rax, LAPIC_BASE + 0xB0)?;
    a.mov(dword_ptr(rax), 0u32)?;
    a.pop(rax)?;
    a.iretq()?;
    emit_idtr(&mut a, &mut idtr, 256)?;
    let assembled = a.assemble_options(
        USER_CODE,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let handler = assembled.label_ip(&handler)?;
    Ok(with_idt(assembled.inner.code_buffer, handler, 256))
}

/// `code` padded to [`IDLE_IDT`], followed by an IDT of `vectors` gates to `handler`.
fn with_idt(mut code: Vec<u8>, handler: u64, vectors: usize) -> Vec<u8> {
    assert!(
        code.len() <= (IDLE_IDT - USER_CODE) as usize,
        "ring-0 workload too large for its IDT's place"
    );
    code.resize((IDLE_IDT - USER_CODE) as usize, 0);
    code.extend(interrupt_gates(handler, vectors));
    code
}

/// The `lidt` operand at `label`: `vectors` gates at [`IDLE_IDT`].
pub(crate) fn emit_idtr(
    a: &mut CodeAssembler,
    label: &mut CodeLabel,
    vectors: usize,
) -> Result<(), IcedError> {
    a.set_label(label)?;
    a.dw(&[(vectors * 16 - 1) as u16])?;
    a.dq(&[IDLE_IDT])
}

/// An IDT of `count` vectors, each a present 64-bit interrupt gate (DPL 0, kernel code
/// segment) to `handler`.
fn interrupt_gates(handler: u64, count: usize) -> Vec<u8> {
    let low = (handler & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48);
    let gate: Vec<u8> = low
        .to_le_bytes()
        .into_iter()
        .chain((handler >> 32).to_le_bytes())
        .collect();
    gate.repeat(count)
}

/// Where `dirty`'s generation loop starts: before it (boot code, or its first instructions)
/// its registers do not hold a generation yet.
pub fn dirty_loop_start() -> u64 {
    let code = dirty().expect("built-in workload assembles");
    let mut decoder =
        iced_x86::Decoder::with_ip(64, &code, USER_CODE, iced_x86::DecoderOptions::NONE);
    // The loop starts right after the one load of rbx.
    for instr in &mut decoder {
        if instr.op0_register() == iced_x86::Register::RBX
            && instr.mnemonic() == iced_x86::Mnemonic::Mov
        {
            return instr.next_ip();
        }
    }
    USER_CODE
}

/// Why a `dirty` guest's memory and registers are not one instant, or `None` if they are.
/// `rip`, `generation` = its `rbx`, `done` = its `r14`, `progress` = its PROGRESS mailbox word,
/// and `stamps(i)` = the first and last 8 bytes of working-set page `i` (of `pages`).
pub fn dirty_instant_problem(
    rip: u64,
    generation: u64,
    done: u64,
    progress: u64,
    pages: u64,
    mut stamps: impl FnMut(u64) -> (u64, u64),
) -> Option<String> {
    let loop_start = dirty_loop_start();
    let code_end = USER_CODE + 0x1000;
    if !(loop_start..code_end).contains(&rip) {
        // Not in the loop yet (booting): no generation in flight, every page as PROGRESS says.
        for i in 0..pages {
            let (first, last) = stamps(i);
            if first != progress || last != progress {
                return Some(format!(
                    "page {i} has stamps {first}/{last} before the loop started \
                     (rip {rip:#x}, PROGRESS {progress})"
                ));
            }
        }
        return None;
    }
    let g = generation;
    let complete = progress == g;
    if !complete && progress.wrapping_add(1) != g {
        return Some(format!("PROGRESS {progress} is not rbx {g} or rbx - 1"));
    }
    for i in 0..pages {
        let (first, last) = stamps(i);
        let ok = |v: u64| {
            if complete || i < done {
                v == g
            } else if i == done {
                v == g || v == g.wrapping_sub(1)
            } else {
                v == g.wrapping_sub(1)
            }
        };
        if !ok(first) || !ok(last) {
            return Some(format!(
                "page {i} has stamps {first}/{last}, but rbx {g}, r14 {done}, PROGRESS {progress}"
            ));
        }
    }
    None
}

/// A fuzzing target: scores how much of [`HARNESS_CRASH_INPUT`] the input (INPUT_LEN bytes at
/// [`INPUT`]) starts with and exits with that score; the full match crashes (`ud2`, which with no
/// IDT becomes a triple fault).
pub fn harness() -> Result<Vec<u8>, IcedError> {
    let mut g = Asm::new()?;
    g.announce_ready()?;
    let a = &mut g.a;
    let mut out = a.create_label();
    a.mov(rcx, qword_ptr(r15 + mailbox::INPUT_LEN))?;
    a.mov(rsi, INPUT)?;
    a.xor(eax, eax)?;
    for (i, &byte) in HARNESS_CRASH_INPUT.iter().enumerate() {
        a.cmp(rcx, i as i32 + 1)?;
        a.jb(out)?;
        a.cmp(byte_ptr(rsi + i as u32), byte as u32)?;
        a.jne(out)?;
        a.inc(eax)?;
    }
    a.ud2()?;
    a.set_label(&mut out)?;
    a.jmp(g.exit)?;
    g.finish()
}

/// Where `parser`'s planted bugs are, shallow to deep (each a distinct faulting instruction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParserBug {
    /// A name record (`A`) longer than 32 bytes writes past the mapped 4 GiB (#PF).
    LongName,
    /// A count record (`B`) whose first value byte is 0 divides by zero (#DE).
    ZeroCount,
    /// A chunk record (`C`) after a name whose value starts with `DEEP` executes `ud2` (#UD).
    DeepChunk,
}

/// An input that reaches each of `parser`'s planted bugs.
pub fn parser_bug_input(bug: ParserBug) -> Vec<u8> {
    match bug {
        ParserBug::LongName => {
            let mut v = b"V\x01A\x21".to_vec();
            v.extend_from_slice(&[b'n'; 0x21]);
            v
        }
        ParserBug::ZeroCount => b"V\x02B\x01\x00".to_vec(),
        ParserBug::DeepChunk => b"V\x03A\x01xC\x04DEEP".to_vec(),
    }
}

/// A small TLV parser at CPL3 with planted bugs at three depths ([`ParserBug`]): input is `V`,
/// a version 1..=3, then records `type, len, value[len]`. It exits 0 for a well-formed input
/// and 1 for a malformed one, so its exit code says nothing about how deep an input got.
pub fn parser() -> Result<Vec<u8>, IcedError> {
    let mut g = Asm::new()?;
    g.announce_ready()?;
    let exit = g.exit;
    let a = &mut g.a;
    let mut malformed = a.create_label();
    let mut valid = a.create_label();
    let mut records = a.create_label();
    let mut rec_a = a.create_label();
    let mut rec_b = a.create_label();
    let mut rec_c = a.create_label();
    a.mov(rcx, qword_ptr(r15 + mailbox::INPUT_LEN))?;
    a.mov(rsi, INPUT)?;
    a.cmp(rcx, 2)?;
    a.jb(malformed)?;
    a.cmp(byte_ptr(rsi), b'V' as u32)?;
    a.jne(malformed)?;
    a.movzx(eax, byte_ptr(rsi + 1))?;
    a.cmp(al, 1)?;
    a.jb(malformed)?;
    a.cmp(al, 3)?;
    a.ja(malformed)?;
    a.mov(ebx, 2u32)?; // position of the next record
    a.xor(r12d, r12d)?; // bit 0: a name was seen
    a.set_label(&mut records)?;
    a.cmp(rbx, rcx)?;
    a.jae(valid)?;
    a.lea(rdx, ptr(rbx + 2))?;
    a.cmp(rdx, rcx)?;
    a.ja(malformed)?;
    a.movzx(r8d, byte_ptr(rsi + rbx))?; // type
    a.movzx(r9d, byte_ptr(rsi + rbx + 1))?; // length
    a.lea(r11, ptr(rsi + rbx + 2))?; // value
    a.lea(rdx, ptr(rdx + r9))?;
    a.cmp(rdx, rcx)?;
    a.ja(malformed)?;
    a.mov(rbx, rdx)?;
    a.cmp(r8b, b'A' as u32)?;
    a.je(rec_a)?;
    a.cmp(r8b, b'B' as u32)?;
    a.je(rec_b)?;
    a.cmp(r8b, b'C' as u32)?;
    a.je(rec_c)?;
    a.jmp(malformed)?;

    // A: a name for a 32-byte buffer; a longer one "overflows" past the mapped 4 GiB.
    a.set_label(&mut rec_a)?;
    a.or(r12d, 1)?;
    a.cmp(r9d, 32)?;
    a.jbe(records)?;
    a.mov(rax, 0x1_0000_0000u64)?;
    a.mov(qword_ptr(rax + r9 * 8), r9)?;
    a.jmp(records)?;

    // B: a count that divides; zero is not refused.
    a.set_label(&mut rec_b)?;
    a.test(r9d, r9d)?;
    a.jz(malformed)?;
    a.movzx(edi, byte_ptr(r11))?;
    a.mov(eax, 1000u32)?;
    a.xor(edx, edx)?;
    a.div(edi)?;
    a.jmp(records)?;

    // C: a chunk, meaningful after a name; one starting "DEEP" reaches the deepest bug.
    a.set_label(&mut rec_c)?;
    a.test(r12d, 1)?;
    a.jz(malformed)?;
    a.cmp(r9d, 4)?;
    a.jb(records)?;
    for (i, &byte) in b"DEEP".iter().enumerate() {
        a.cmp(byte_ptr(r11 + i as u32), byte as u32)?;
        a.jne(records)?;
    }
    a.ud2()?;

    a.set_label(&mut valid)?;
    a.xor(eax, eax)?;
    a.jmp(exit)?;
    a.set_label(&mut malformed)?;
    a.mov(eax, 1u32)?;
    a.jmp(exit)?;
    g.finish()
}

/// Prints a line, then executes `ud2` with no IDT: #UD, #DF, triple fault.
pub fn triple() -> Result<Vec<u8>, IcedError> {
    const MSG: &[u8] = b"triple: faulting now\n";
    let mut g = Asm::new()?;
    let msg = string_after(&mut g, MSG)?;
    g.print_str(msg, MSG.len())?;
    g.a.ud2()?;
    g.finish()
}

/// Spins forever without output (a guest that never exits by itself).
pub fn spin() -> Result<Vec<u8>, IcedError> {
    let mut g = Asm::new()?;
    let mut top = g.a.create_label();
    g.a.set_label(&mut top)?;
    g.a.pause()?;
    g.a.jmp(top)?;
    g.finish()
}

/// Places `text` in a skipped-over block at the current position and returns its label.
pub(crate) fn string_after(g: &mut Asm, text: &[u8]) -> Result<CodeLabel, IcedError> {
    let mut after = g.a.create_label();
    g.a.jmp(after)?;
    let label = string(&mut g.a, text)?;
    g.a.set_label(&mut after)?;
    Ok(label)
}

/// `assist`'s 16-byte values: the one it plants, and the one it swaps in.
pub const ASSIST_PLANTED: u128 = 0x1111_2222_3333_4444_5555_6666_7777_8888;
pub const ASSIST_SWAPPED: u128 = 0x9999_aaaa_bbbb_cccc_dddd_eeee_ffff_0001;
/// What `assist` counts the bits of (and the low 32 bits of its 16-byte value, from memory).
pub const ASSIST_BITS_INPUT: u64 = 0x0000_f0f0_0000_0f00;
/// The MXCSR `assist` loads (all exceptions masked, round toward zero).
pub const ASSIST_MXCSR_LOADED: u32 = 0x7f80;
/// Where `assist`'s 16-byte value lives (mailbox page, 16-aligned).
pub const ASSIST_VALUE: u64 = MAILBOX + 0x100;
/// `assist`'s XSAVE areas: the one it restores (planted by the host), and where it saves in
/// the standard and the compacted format.
pub const ASSIST_XSAVE_IN: u64 = DMA_BUFFER;
pub const ASSIST_XSAVE_OUT: u64 = DMA_BUFFER + 0x1000;
pub const ASSIST_XSAVEC_OUT: u64 = DMA_BUFFER + 0x2000;

/// `assist` (ring 0): the instructions some hosts' KVM cannot emulate at ring 0, each checked.
/// `lock cmpxchg16b` that succeeds (mailbox ASSIST_FIRST = ZF) and one that fails
/// (ASSIST_SECOND = ZF, ASSIST_FOUND = the 16 bytes it loaded), `stac` and `clac` (ASSIST_FLAGS:
/// RFLAGS after clac in the low half, after stac in the high half), then `int3` with its own #BP
/// handler, which stores the return address it was given (ASSIST_BP_RIP) beside the address
/// after the int3 (ASSIST_AFTER); then XRSTOR of [`ASSIST_XSAVE_IN`] (x87 and SSE), XSAVE to
/// [`ASSIST_XSAVE_OUT`] and XSAVEC to [`ASSIST_XSAVEC_OUT`]; exits 0.
pub fn assist() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut handler = a.create_label();
    let mut idtr = a.create_label();
    let mut after = a.create_label();
    let split = |v: u128| (v as u64, (v >> 64) as u64);
    let (planted_low, planted_high) = split(ASSIST_PLANTED);
    let (swapped_low, swapped_high) = split(ASSIST_SWAPPED);
    a.lidt(ptr(idtr))?;
    a.mov(r15, MAILBOX)?;
    a.mov(rax, planted_low)?;
    a.mov(qword_ptr(r15 + 0x100), rax)?;
    a.mov(rdx, planted_high)?;
    a.mov(qword_ptr(r15 + 0x108), rdx)?;
    a.mov(rbx, swapped_low)?;
    a.mov(rcx, swapped_high)?;
    a.lock().cmpxchg16b(xmmword_ptr(r15 + 0x100))?;
    a.setz(r8b)?;
    a.movzx(r8d, r8b)?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_FIRST), r8)?;
    a.mov(rax, planted_low)?;
    a.mov(rdx, planted_high)?;
    a.lock().cmpxchg16b(xmmword_ptr(r15 + 0x100))?;
    a.setz(r8b)?;
    a.movzx(r8d, r8b)?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_SECOND), r8)?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_FOUND), rax)?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_FOUND + 8), rdx)?;
    // Bit counts, from a register and from memory.
    a.mov(rax, ASSIST_BITS_INPUT)?;
    a.popcnt(rbx, rax)?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_POPCNT), rbx)?;
    a.tzcnt(rbx, rax)?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_TZCNT), rbx)?;
    a.popcnt(ebx, dword_ptr(r15 + 0x100))?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_POPCNT_MEMORY), rbx)?;
    // fwait with no x87 exception pending: nothing happens.
    a.wait()?;
    // MXCSR through memory: store it, load a changed one, store it again.
    a.stmxcsr(dword_ptr(r15 + mailbox::ASSIST_MXCSR))?;
    a.mov(eax, ASSIST_MXCSR_LOADED)?;
    a.mov(dword_ptr(r15 + mailbox::ASSIST_MXCSR + 4), eax)?;
    a.ldmxcsr(dword_ptr(r15 + mailbox::ASSIST_MXCSR + 4))?;
    a.stmxcsr(dword_ptr(r15 + mailbox::ASSIST_MXCSR_AFTER))?;
    // SMAP's switch: RFLAGS.AC set by stac, cleared by clac (CR4.SMAP need not be on).
    a.stac()?;
    a.pushfq()?;
    a.clac()?;
    a.pushfq()?;
    a.pop(rax)?;
    a.pop(rdx)?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_FLAGS), rax)?;
    a.lea(rax, ptr(after))?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_AFTER), rax)?;
    a.int3()?;
    a.set_label(&mut after)?;
    // The XSAVE family: CR4.OSXSAVE on, XCR0 = x87 | SSE, then XRSTOR from the area the
    // host planted, XSAVE and XSAVEC of what it loaded.
    a.mov(rax, cr4)?;
    a.or(eax, 1 << 18)?;
    a.mov(cr4, rax)?;
    a.xor(ecx, ecx)?;
    a.mov(eax, 3u32)?;
    a.xor(edx, edx)?;
    a.xsetbv()?;
    a.mov(rbx, ASSIST_XSAVE_IN)?;
    a.xrstor(ptr(rbx))?;
    a.mov(rbx, ASSIST_XSAVE_OUT)?;
    a.xsave(ptr(rbx))?;
    a.mov(rbx, ASSIST_XSAVEC_OUT)?;
    a.xsavec(ptr(rbx))?;
    a.xor(eax, eax)?;
    a.mov(dx, EXIT_PORT as u32)?;
    a.out(dx, al)?;
    a.hlt()?;
    a.set_label(&mut handler)?;
    a.mov(rax, qword_ptr(rsp))?;
    a.mov(qword_ptr(r15 + mailbox::ASSIST_BP_RIP), rax)?;
    a.iretq()?;
    emit_idtr(&mut a, &mut idtr, 4)?;
    let assembled = a.assemble_options(
        USER_CODE,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let handler = assembled.label_ip(&handler)?;
    // Vectors 0-3 (only #BP is expected).
    Ok(with_idt(assembled.inner.code_buffer, handler, 4))
}
