//! The i8042 keyboard controller (vm-superio's model): only what a PC guest uses it for here,
//! its reset line, which stops the VM with [`crate::ExitReason::Reset`].

use super::super::{lock, Signals};
use std::sync::Mutex;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::{I8042Device, Trigger};

/// The i8042 data port; its command/status port is 4 above.
pub const I8042_BASE: u16 = 0x60;
pub(crate) const I8042_LEN: u16 = 5;

/// Raises the VM's reset signal.
struct ResetLine(Signals);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.raise_reset();
        Ok(())
    }
}

/// The controller on the port bus.
pub struct I8042(Mutex<I8042Device<ResetLine>>);

impl I8042 {
    pub fn new(signals: Signals) -> Self {
        Self(Mutex::new(I8042Device::new(ResetLine(signals))))
    }
}

impl DevicePio for I8042 {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let value = lock(&self.0).read(offset as u8);
        data.fill(value);
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(&byte) = data.first() {
            let _ = lock(&self.0).write(offset as u8, byte);
        }
    }
}
