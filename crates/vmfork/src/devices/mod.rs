//! Legacy PC devices on the port-I/O bus: the 8250 serial console (vm-superio), the i8042
//! controller (its reset line stops the VM) and the exit port (QEMU's isa-debug-exit idea).
//!
//! Every device saves and loads its state, so forks, snapshots and migrations carry it.

mod serial_sink;

pub use serial_sink::{stdout_closed, SerialBuffer, SerialSink, SERIAL_BUFFER_CAP};

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use vm_superio::{I8042Device, Serial, SerialState, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1.
pub const SERIAL_BASE: u16 = 0x3f8;
const SERIAL_LEN: u16 = 8;
/// The i8042 data port; its command/status port is 4 above.
pub const I8042_BASE: u16 = 0x60;
const I8042_LEN: u16 = 5;
/// A write here ends the run with the written byte as the exit code.
pub const EXIT_PORT: u16 = 0x501;
const EXIT_PORT_LEN: u16 = 2;
/// Ready port: a write here says "ready for input" (a fuzzing harness about to read its input:
/// where `Vm::run_to_ready` stops and fuzzing forks). Other runs go straight on.
pub const READY_PORT: u16 = 0x503;
/// The serial console's legacy interrupt line.
pub const SERIAL_IRQ: u32 = 4;

/// What a port write asks of the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PioOutcome {
    Continue,
    /// The guest wrote its exit code to the exit port.
    Exit(u8),
    /// The guest pulsed the i8042 reset line.
    Reset,
    /// The guest wrote to the ready port.
    Ready,
}

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

/// Records a reset request from the i8042.
#[derive(Clone, Default)]
pub struct ResetLine(Arc<AtomicBool>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
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

/// The state of every device, as a fork or snapshot carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegisters,
}

type SerialDevice = Serial<IrqLine, vm_superio::serial::NoEvents, SerialSink>;

/// The port-I/O devices of one VM. The exit port is always there (it is vmfork's own channel);
/// the device models can be left out of a fork and attached later.
pub struct Devices {
    serial: Mutex<Option<SerialDevice>>,
    /// State the models load from when attached later (a `no_devices` fork).
    detached: Mutex<Option<DeviceState>>,
    serial_irq: Mutex<Option<EventFd>>,
    i8042: Mutex<I8042Device<ResetLine>>,
    reset: ResetLine,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device models keep no invariants a panic could break halfway; carry on after poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The one way saved serial state can be invalid: more received bytes than the FIFO holds.
fn check_serial_state(state: &DeviceState) -> crate::Result<()> {
    if state.serial.in_buffer.len() > 64 {
        return Err(crate::Error::Invalid(format!(
            "serial state holds {} received bytes, more than the 64-byte FIFO",
            state.serial.in_buffer.len()
        )));
    }
    Ok(())
}

fn build_serial(
    state: &DeviceState,
    sink: SerialSink,
    irq: Option<EventFd>,
) -> crate::Result<SerialDevice> {
    check_serial_state(state)?;
    Serial::from_state(
        &(&state.serial).into(),
        IrqLine(irq),
        vm_superio::serial::NoEvents,
        sink,
    )
    .map_err(|e| crate::Error::Invalid(format!("serial state: {e:?}")))
}

impl Devices {
    /// Devices in their power-on state. `serial_irq` is the irqfd of the serial's IRQ line.
    pub fn new(sink: SerialSink, serial_irq: Option<EventFd>) -> Self {
        let serial = Serial::new(IrqLine(serial_irq), sink);
        Self::assemble(Some(serial), None, None)
    }

    /// Devices loaded from saved state (a fork's or a snapshot's).
    pub fn from_state(
        state: &DeviceState,
        sink: SerialSink,
        serial_irq: Option<EventFd>,
    ) -> crate::Result<Self> {
        Ok(Self::assemble(
            Some(build_serial(state, sink, serial_irq)?),
            None,
            None,
        ))
    }

    /// Only the exit port; `state` is kept for [`Self::attach`].
    pub fn detached(state: DeviceState, serial_irq: Option<EventFd>) -> Self {
        Self::assemble(None, Some(state), serial_irq)
    }

    fn assemble(
        serial: Option<SerialDevice>,
        detached: Option<DeviceState>,
        serial_irq: Option<EventFd>,
    ) -> Self {
        let reset = ResetLine::default();
        Self {
            serial: Mutex::new(serial),
            detached: Mutex::new(detached),
            serial_irq: Mutex::new(serial_irq),
            i8042: Mutex::new(I8042Device::new(reset.clone())),
            reset,
        }
    }

    /// Attaches the device models of a detached set, loading the state it was made with.
    pub fn attach(&self, sink: SerialSink) -> crate::Result<()> {
        let mut serial = lock(&self.serial);
        if serial.is_some() {
            return Err(crate::Error::Invalid("devices are already attached".into()));
        }
        let state = lock(&self.detached).take().unwrap_or_default();
        let irq = lock(&self.serial_irq).take();
        *serial = Some(build_serial(&state, sink, irq)?);
        Ok(())
    }

    pub fn attached(&self) -> bool {
        lock(&self.serial).is_some()
    }

    /// Loads saved state into the devices, keeping their output sinks (a fork reset).
    pub fn load_state(&self, state: &DeviceState) -> crate::Result<()> {
        let mut slot = lock(&self.serial);
        match slot.take() {
            Some(serial) => {
                let irq = serial
                    .interrupt_evt()
                    .0
                    .as_ref()
                    .and_then(|e| e.try_clone().ok());
                let sink = serial.into_writer();
                match build_serial(state, SerialSink::Discard, None) {
                    Ok(_) => *slot = Some(build_serial(state, sink, irq)?),
                    Err(e) => {
                        *slot = Some(Serial::new(IrqLine(irq), sink));
                        return Err(e);
                    }
                }
            }
            None => *lock(&self.detached) = Some(state.clone()),
        }
        Ok(())
    }

    /// Saves every device's state (a detached set saves the state it would attach with).
    pub fn save(&self) -> DeviceState {
        match lock(&self.serial).as_ref() {
            Some(serial) => DeviceState {
                serial: serial.state().into(),
            },
            None => lock(&self.detached).clone().unwrap_or_default(),
        }
    }

    /// Handles a port write; `data` holds every byte of the access (and of a `rep outs`).
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioOutcome {
        if in_range(port, SERIAL_BASE, SERIAL_LEN) {
            if let Some(serial) = lock(&self.serial).as_mut() {
                let offset = (port - SERIAL_BASE) as u8;
                for &byte in data {
                    // Errors come from the output sink (a closed terminal): the guest must not
                    // notice, so they are dropped as a UART with nothing attached would.
                    let _ = serial.write(offset, byte);
                }
            }
        } else if in_range(port, I8042_BASE, I8042_LEN) {
            if let Some(&byte) = data.first() {
                let _ = lock(&self.i8042).write((port - I8042_BASE) as u8, byte);
            }
            if self.reset.0.swap(false, Ordering::SeqCst) {
                return PioOutcome::Reset;
            }
        } else if in_range(port, EXIT_PORT, EXIT_PORT_LEN) {
            return PioOutcome::Exit(data.first().copied().unwrap_or(0));
        } else if port == READY_PORT {
            return PioOutcome::Ready;
        }
        // Writes to ports with no device are dropped, as on a PC.
        PioOutcome::Continue
    }

    /// Handles a port read; ports with no device read as all ones, as on a PC.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if in_range(port, SERIAL_BASE, SERIAL_LEN) {
            match lock(&self.serial).as_mut() {
                Some(serial) => {
                    let offset = (port - SERIAL_BASE) as u8;
                    for b in data.iter_mut() {
                        *b = serial.read(offset);
                    }
                }
                None => data.fill(0xff),
            }
        } else if in_range(port, I8042_BASE, I8042_LEN) {
            let value = lock(&self.i8042).read((port - I8042_BASE) as u8);
            data.fill(value);
        } else {
            data.fill(0xff);
        }
    }
}

fn in_range(port: u16, base: u16, len: u16) -> bool {
    port >= base && port - base < len
}
