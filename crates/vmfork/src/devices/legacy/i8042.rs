//! The i8042 keyboard controller with a keyboard and no mouse port, as a PC guest probes it:
//! the controller's commands (configuration byte, self-tests, port enables, output port), a
//! keyboard that acknowledges its commands and answers reset and identify, IRQ 1 when a byte
//! waits and the configuration enables it, and the reset line (command 0xfe, or the output
//! port's reset bit cleared), which stops the VM with [`crate::ExitReason::Reset`]. The
//! registers and the bytes waiting persist through forks, snapshots and resets.
//!
//! (vm-superio's `I8042Device`, used before, models only the reset line: Linux's probe then
//! failed with `i8042: Can't read CTR`.)

use super::super::{irq, lock, Persist, Signals};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vmm_sys_util::eventfd::EventFd;

/// The i8042 data port; its command/status port is 4 above.
pub const I8042_BASE: u16 = 0x60;
pub(crate) const I8042_LEN: u16 = 5;
/// The keyboard's interrupt line.
pub const I8042_IRQ: u32 = 1;

const DATA: PioAddressOffset = 0;
const COMMAND: PioAddressOffset = 4;

/// Status register: a byte waits in the output buffer; the system flag (set by a passed self
/// test); the last write went to the command port; the keyboard is not inhibited.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

/// Configuration byte: keyboard interrupt, system flag, keyboard clock off, mouse clock off,
/// scan-code translation.
const CONFIG_KBD_INTERRUPT: u8 = 0x01;
const CONFIG_SYSTEM: u8 = 0x04;
const CONFIG_KBD_DISABLED: u8 = 0x10;
const CONFIG_AUX_DISABLED: u8 = 0x20;
const CONFIG_TRANSLATE: u8 = 0x40;

/// Controller commands.
const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_OUTPUT: u8 = 0xd2;
const CMD_WRITE_AUX_OUTPUT: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_PULSE_RESET: u8 = 0xfe;
/// Commands followed by a data byte.
const TAKES_DATA: [u8; 5] = [
    CMD_WRITE_CONFIG,
    CMD_WRITE_OUTPUT_PORT,
    CMD_WRITE_KBD_OUTPUT,
    CMD_WRITE_AUX_OUTPUT,
    CMD_WRITE_AUX,
];

/// Answers: self test passed; keyboard interface test passed; mouse interface test: clock line
/// stuck low (there is no mouse port).
const SELF_TEST_PASSED: u8 = 0x55;
const INTERFACE_OK: u8 = 0x00;
const NO_AUX_PORT: u8 = 0x01;
/// Output port: bit 0 low holds the CPU in reset; bit 1 is A20.
const OUTPUT_PORT_RESET_OFF: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;

/// Keyboard commands and answers.
const KBD_ECHO: u8 = 0xee;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
/// What an MF2 keyboard says it is.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Bytes the output buffer holds for the guest before it drops more (a real one holds one; a
/// few let a command's whole answer wait).
const OUTPUT_BYTES: usize = 16;

/// The controller as forks and snapshots carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Registers {
    pub status: u8,
    pub config: u8,
    pub output_port: u8,
    /// The command waiting for its data byte, or 0.
    pub pending: u8,
    /// Bytes for the guest, oldest first.
    pub output: Vec<u8>,
}

impl Default for I8042Registers {
    /// After the firmware's self test: keyboard enabled with its interrupt, translation on.
    fn default() -> Self {
        Self {
            status: STATUS_SYSTEM | STATUS_UNLOCKED,
            config: CONFIG_KBD_INTERRUPT | CONFIG_SYSTEM | CONFIG_AUX_DISABLED | CONFIG_TRANSLATE,
            output_port: OUTPUT_PORT_RESET_OFF | OUTPUT_PORT_A20,
            pending: 0,
            output: Vec::new(),
        }
    }
}

fn check(state: &I8042Registers) -> crate::Result<()> {
    if state.output.len() > OUTPUT_BYTES
        || (state.pending != 0 && !TAKES_DATA.contains(&state.pending))
    {
        return Err(crate::devices::DeviceError::state(format!(
            "i8042 state has {} bytes waiting (at most {OUTPUT_BYTES}) and command {:#x} pending",
            state.output.len(),
            state.pending
        )));
    }
    Ok(())
}

impl I8042Registers {
    fn push(&mut self, byte: u8) {
        if self.output.len() < OUTPUT_BYTES {
            self.output.push(byte);
        }
        self.status |= STATUS_OUTPUT_FULL;
    }

    /// Whether a byte waits and the guest asked to be interrupted for it.
    fn wants_interrupt(&self) -> bool {
        !self.output.is_empty() && self.config & CONFIG_KBD_INTERRUPT != 0
    }

    /// A command written to the command port; true if it pulses the reset line.
    fn command(&mut self, command: u8) -> bool {
        self.pending = 0;
        match command {
            CMD_READ_CONFIG => self.push(self.config),
            // Reads of the rest of the controller's RAM.
            0x21..=0x3f => self.push(0),
            CMD_AUX_DISABLE => self.config |= CONFIG_AUX_DISABLED,
            CMD_AUX_ENABLE => self.config &= !CONFIG_AUX_DISABLED,
            CMD_AUX_TEST => self.push(NO_AUX_PORT),
            CMD_SELF_TEST => {
                self.status |= STATUS_SYSTEM;
                self.push(SELF_TEST_PASSED);
            }
            CMD_KBD_TEST => self.push(INTERFACE_OK),
            CMD_KBD_DISABLE => self.config |= CONFIG_KBD_DISABLED,
            CMD_KBD_ENABLE => self.config &= !CONFIG_KBD_DISABLED,
            CMD_READ_OUTPUT_PORT => self.push(self.output_port),
            c if TAKES_DATA.contains(&c) => self.pending = c,
            CMD_PULSE_RESET => return true,
            // 0xf0-0xff pulse the output port's low bits where theirs are clear; bit 0 is the
            // reset line.
            c if c >= 0xf0 => return c & 1 == 0,
            _ => {}
        }
        false
    }

    /// A byte written to the data port; true if it holds the CPU in reset.
    fn data(&mut self, byte: u8) -> bool {
        match std::mem::take(&mut self.pending) {
            CMD_WRITE_CONFIG => {
                self.config = byte;
                self.status = (self.status & !STATUS_SYSTEM) | (byte & CONFIG_SYSTEM);
            }
            CMD_WRITE_OUTPUT_PORT => {
                self.output_port = byte;
                return byte & OUTPUT_PORT_RESET_OFF == 0;
            }
            CMD_WRITE_KBD_OUTPUT => self.push(byte),
            // No mouse port: its bytes go nowhere.
            CMD_WRITE_AUX_OUTPUT | CMD_WRITE_AUX => {}
            _ => self.keyboard(byte),
        }
        false
    }

    /// A command to the keyboard: acknowledged, and answered where a keyboard answers.
    fn keyboard(&mut self, byte: u8) {
        match byte {
            KBD_ECHO => self.push(KBD_ECHO),
            KBD_IDENTIFY => {
                self.push(KBD_ACK);
                KBD_ID.iter().for_each(|&b| self.push(b));
            }
            KBD_RESET => {
                self.push(KBD_ACK);
                self.push(KBD_SELF_TEST_PASSED);
            }
            _ => self.push(KBD_ACK),
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = if self.output.is_empty() {
            0
        } else {
            self.output.remove(0)
        };
        if self.output.is_empty() {
            self.status &= !STATUS_OUTPUT_FULL;
        }
        byte
    }
}

/// The controller on the port bus.
pub struct I8042 {
    registers: Mutex<I8042Registers>,
    signals: Signals,
    irq: Option<EventFd>,
}

impl I8042 {
    /// Loaded from `state` (the power-on state is [`I8042Registers::default`]), raising `irq`.
    pub fn new(
        state: I8042Registers,
        signals: Signals,
        irq: Option<EventFd>,
    ) -> crate::Result<Self> {
        check(&state)?;
        Ok(Self {
            registers: Mutex::new(state),
            signals,
            irq,
        })
    }
}

impl Persist for I8042 {
    type State = I8042Registers;

    fn save(&self) -> I8042Registers {
        lock(&self.registers).clone()
    }

    fn load(&self, state: &I8042Registers) -> crate::Result<()> {
        check(state)?;
        *lock(&self.registers) = state.clone();
        Ok(())
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let mut registers = lock(&self.registers);
        let value = match offset {
            DATA => {
                let byte = registers.read_data();
                // The next byte interrupts again.
                if registers.wants_interrupt() {
                    irq::raise(&self.irq);
                }
                byte
            }
            COMMAND => registers.status,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        let mut registers = lock(&self.registers);
        let had_output = !registers.output.is_empty();
        let reset = match offset {
            DATA => {
                registers.status &= !STATUS_COMMAND;
                registers.data(byte)
            }
            COMMAND => {
                registers.status |= STATUS_COMMAND;
                registers.command(byte)
            }
            _ => false,
        };
        if reset {
            self.signals.raise_reset();
        }
        if !had_output && registers.wants_interrupt() {
            irq::raise(&self.irq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::PioOutcome;

    fn controller() -> (I8042, EventFd) {
        let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i8042 = I8042::new(
            I8042Registers::default(),
            Signals::default(),
            Some(line.try_clone().unwrap()),
        )
        .unwrap();
        (i8042, line)
    }

    fn write(i: &I8042, offset: PioAddressOffset, byte: u8) {
        i.pio_write(PioAddress(I8042_BASE), offset, &[byte]);
    }

    fn read(i: &I8042, offset: PioAddressOffset) -> u8 {
        let mut b = [0];
        i.pio_read(PioAddress(I8042_BASE), offset, &mut b);
        b[0]
    }

    fn interrupts(line: &EventFd) -> u64 {
        line.read().unwrap_or(0)
    }

    /// Linux's probe: flush, read the configuration, self test, write it back, keyboard test.
    #[test]
    fn linuxs_probe_sequence_gets_its_answers() {
        let (i, line) = controller();
        assert_eq!(read(&i, COMMAND) & STATUS_OUTPUT_FULL, 0);
        write(&i, COMMAND, CMD_READ_CONFIG);
        assert_eq!(read(&i, COMMAND) & STATUS_OUTPUT_FULL, 1);
        let config = read(&i, DATA);
        assert_eq!(config & CONFIG_KBD_INTERRUPT, CONFIG_KBD_INTERRUPT);
        assert_eq!(read(&i, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(
            interrupts(&line),
            1,
            "the configuration byte interrupts once"
        );
        // Interrupts off while probing.
        write(&i, COMMAND, CMD_WRITE_CONFIG);
        write(&i, DATA, config & !CONFIG_KBD_INTERRUPT);
        write(&i, COMMAND, CMD_SELF_TEST);
        assert_eq!(read(&i, DATA), SELF_TEST_PASSED);
        write(&i, COMMAND, CMD_KBD_TEST);
        assert_eq!(read(&i, DATA), INTERFACE_OK);
        write(&i, COMMAND, CMD_AUX_TEST);
        assert_eq!(read(&i, DATA), NO_AUX_PORT);
        assert_eq!(interrupts(&line), 0);
        write(&i, COMMAND, CMD_READ_CONFIG);
        assert_eq!(read(&i, DATA), config & !CONFIG_KBD_INTERRUPT);
        write(&i, COMMAND, CMD_KBD_DISABLE);
        write(&i, COMMAND, CMD_READ_CONFIG);
        assert_eq!(read(&i, DATA) & CONFIG_KBD_DISABLED, CONFIG_KBD_DISABLED);
        write(&i, COMMAND, CMD_KBD_ENABLE);
        write(&i, COMMAND, CMD_READ_CONFIG);
        assert_eq!(read(&i, DATA) & CONFIG_KBD_DISABLED, 0);
    }

    #[test]
    fn the_keyboard_acknowledges_resets_and_identifies() {
        let (i, line) = controller();
        write(&i, DATA, KBD_RESET);
        assert_eq!(interrupts(&line), 1);
        assert_eq!(read(&i, DATA), KBD_ACK);
        // The second byte of the answer interrupts again.
        assert_eq!(interrupts(&line), 1);
        assert_eq!(read(&i, DATA), KBD_SELF_TEST_PASSED);
        assert_eq!(interrupts(&line), 0);
        write(&i, DATA, KBD_IDENTIFY);
        let answer: Vec<u8> = (0..3).map(|_| read(&i, DATA)).collect();
        assert_eq!(answer, [KBD_ACK, KBD_ID[0], KBD_ID[1]]);
        write(&i, DATA, 0xf4); // enable scanning
        assert_eq!(read(&i, DATA), KBD_ACK);
        write(&i, DATA, KBD_ECHO);
        assert_eq!(read(&i, DATA), KBD_ECHO);
        // A byte for the mouse port goes nowhere.
        write(&i, COMMAND, CMD_WRITE_AUX);
        write(&i, DATA, 0xff);
        assert_eq!(read(&i, COMMAND) & STATUS_OUTPUT_FULL, 0);
        // Too many bytes: the buffer keeps the first ones.
        for _ in 0..OUTPUT_BYTES * 2 {
            write(&i, DATA, 0xf4);
        }
        assert_eq!(i.save().output.len(), OUTPUT_BYTES);
    }

    #[test]
    fn reset_line_and_state_round_trip() {
        let (i, _line) = controller();
        write(&i, COMMAND, CMD_READ_OUTPUT_PORT);
        assert_eq!(
            read(&i, DATA) & OUTPUT_PORT_RESET_OFF,
            OUTPUT_PORT_RESET_OFF
        );
        assert_eq!(Signals::take(), PioOutcome::Continue);
        write(&i, COMMAND, CMD_PULSE_RESET);
        assert_eq!(Signals::take(), PioOutcome::Reset);
        write(&i, COMMAND, 0xff); // pulses no line
        assert_eq!(Signals::take(), PioOutcome::Continue);
        write(&i, COMMAND, CMD_WRITE_OUTPUT_PORT);
        write(&i, DATA, OUTPUT_PORT_A20);
        assert_eq!(Signals::take(), PioOutcome::Reset);
        // A half-answered identify and a pending command travel with the state.
        write(&i, DATA, KBD_IDENTIFY);
        assert_eq!(read(&i, DATA), KBD_ACK);
        write(&i, COMMAND, CMD_WRITE_CONFIG);
        let saved = i.save();
        let (j, _) = controller();
        j.load(&saved).unwrap();
        write(&j, DATA, 0x05);
        assert_eq!(read(&j, DATA), KBD_ID[0]);
        assert_eq!(read(&j, DATA), KBD_ID[1]);
        write(&j, COMMAND, CMD_READ_CONFIG);
        assert_eq!(read(&j, DATA), 0x05);
        // Hostile state is refused.
        for bad in [
            I8042Registers {
                output: vec![0; OUTPUT_BYTES + 1],
                ..Default::default()
            },
            I8042Registers {
                pending: 0x20,
                ..Default::default()
            },
        ] {
            assert!(j.load(&bad).is_err());
            assert!(I8042::new(bad, Signals::default(), None).is_err());
        }
    }
}
