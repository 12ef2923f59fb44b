//! The 8250 serial console (vm-superio's model) on COM1: its registers persist through forks,
//! snapshots and resets; it can be left out of a fork and attached later.

use super::super::{lock, Persist, SerialSink};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vm_superio::{Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_BASE: u16 = 0x3f8;
pub(crate) const SERIAL_LEN: u16 = 8;
/// The serial console's legacy interrupt line.
pub const SERIAL_IRQ: u32 = 4;
/// Bytes the receive FIFO holds.
const FIFO_BYTES: usize = 64;

/// Raises the serial interrupt through an irqfd when the VM has an in-kernel irqchip.
pub struct IrqLine(Option<EventFd>);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        match &self.0 {
            Some(fd) => fd.write(1),
            None => Ok(()),
        }
    }
}

/// Serial registers, as saved in forks and snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegisters {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for SerialState {
    fn from(s: &SerialRegisters) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

type Model = Serial<IrqLine, vm_superio::serial::NoEvents, SerialSink>;

/// The model, or (left out of a fork) the state it attaches with later.
enum Slot {
    Attached(Model),
    Detached {
        state: SerialRegisters,
        irq: Option<EventFd>,
    },
}

/// COM1 on the port bus.
pub struct SerialPort(Mutex<Slot>);

/// The one way saved serial state can be invalid: more received bytes than the FIFO holds.
fn check(state: &SerialRegisters) -> crate::Result<()> {
    if state.in_buffer.len() > FIFO_BYTES {
        return Err(crate::devices::DeviceError::state(format!(
            "serial state holds {} received bytes, more than the {FIFO_BYTES}-byte FIFO",
            state.in_buffer.len()
        )));
    }
    Ok(())
}

fn build(state: &SerialRegisters, sink: SerialSink, irq: Option<EventFd>) -> crate::Result<Model> {
    check(state)?;
    Serial::from_state(
        &state.into(),
        IrqLine(irq),
        vm_superio::serial::NoEvents,
        sink,
    )
    .map_err(|e| crate::devices::DeviceError::state(format!("serial state: {e:?}")))
}

impl SerialPort {
    /// In its power-on state, printing to `sink`.
    pub fn new(sink: SerialSink, irq: Option<EventFd>) -> Self {
        Self(Mutex::new(Slot::Attached(Serial::new(IrqLine(irq), sink))))
    }

    /// Loaded from saved registers.
    pub fn from_state(
        state: &SerialRegisters,
        sink: SerialSink,
        irq: Option<EventFd>,
    ) -> crate::Result<Self> {
        Ok(Self(Mutex::new(Slot::Attached(build(state, sink, irq)?))))
    }

    /// Left out (reads as no device), keeping `state` to attach with.
    pub fn detached(state: SerialRegisters, irq: Option<EventFd>) -> Self {
        Self(Mutex::new(Slot::Detached { state, irq }))
    }

    /// Attaches the model of a detached port, printing to `sink`.
    pub fn attach(&self, sink: SerialSink) -> crate::Result<()> {
        let mut slot = lock(&self.0);
        let Slot::Detached { state, irq } = &mut *slot else {
            return Err(crate::Error::Invalid("devices are already attached".into()));
        };
        let model = build(state, sink, irq.take())?;
        *slot = Slot::Attached(model);
        Ok(())
    }

    pub fn attached(&self) -> bool {
        matches!(*lock(&self.0), Slot::Attached(_))
    }
}

impl Persist for SerialPort {
    type State = SerialRegisters;

    fn save(&self) -> SerialRegisters {
        match &*lock(&self.0) {
            Slot::Attached(model) => model.state().into(),
            Slot::Detached { state, .. } => state.clone(),
        }
    }

    /// Loads `state`, keeping the output sink and interrupt line (a fork reset). Bad state
    /// leaves the port in its power-on state and is an error.
    fn load(&self, state: &SerialRegisters) -> crate::Result<()> {
        let mut slot = lock(&self.0);
        match &mut *slot {
            Slot::Detached { state: kept, .. } => {
                check(state)?;
                *kept = state.clone();
            }
            Slot::Attached(_) => {
                let Slot::Attached(model) = std::mem::replace(
                    &mut *slot,
                    Slot::Detached {
                        state: SerialRegisters::default(),
                        irq: None,
                    },
                ) else {
                    unreachable!("matched as attached above");
                };
                let irq = model
                    .interrupt_evt()
                    .0
                    .as_ref()
                    .and_then(|e| e.try_clone().ok());
                let sink = model.into_writer();
                // Tried on a throwaway model first: the real build then takes the sink and
                // the interrupt line only with state known to load.
                match build(state, SerialSink::Discard, None) {
                    Ok(_) => *slot = Slot::Attached(build(state, sink, irq)?),
                    Err(e) => {
                        *slot = Slot::Attached(Serial::new(IrqLine(irq), sink));
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }
}

impl DevicePio for SerialPort {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match &mut *lock(&self.0) {
            Slot::Attached(model) => {
                for b in data.iter_mut() {
                    *b = model.read(offset as u8);
                }
            }
            Slot::Detached { .. } => data.fill(0xff),
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Slot::Attached(model) = &mut *lock(&self.0) {
            for &byte in data {
                // Errors come from the output sink (a closed terminal): the guest must not
                // notice, so they are dropped as a UART with nothing attached would.
                let _ = model.write(offset as u8, byte);
            }
        }
    }
}
