//! vmfork's own ports: the exit port (QEMU's isa-debug-exit idea: a write ends the run with the
//! byte as its exit code) and the ready port (a fuzzing harness about to read its input: where
//! `Vm::run_to_ready` stops and fuzzing forks; other runs go straight on).

use super::Signals;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;

/// A write here ends the run with the written byte as the exit code.
pub const EXIT_PORT: u16 = 0x501;
pub(crate) const EXIT_PORT_LEN: u16 = 2;
/// A write here says "ready for input".
pub const READY_PORT: u16 = 0x503;

/// Whether `port` is one of vmfork's own (they keep no state).
pub fn is_vmm_port(port: u16) -> bool {
    (EXIT_PORT..EXIT_PORT + EXIT_PORT_LEN).contains(&port) || port == READY_PORT
}

/// The exit port.
pub struct ExitPort(pub(crate) Signals);

impl DevicePio for ExitPort {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        self.0.raise_exit(data.first().copied().unwrap_or(0));
    }
}

/// The ready port.
pub struct ReadyPort(pub(crate) Signals);

impl DevicePio for ReadyPort {
    fn pio_read(&self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {
        self.0.raise_ready();
    }
}
