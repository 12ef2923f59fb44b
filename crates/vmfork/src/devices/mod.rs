//! The device layer: a port-I/O bus and an MMIO bus (rust-vmm `vm-device`) with devices
//! registered by address range, and one [`Persist`] trait each stateful device implements next
//! to its code. Today's devices: the legacy PC ones (`legacy/`: 8250 serial, i8042, CMOS clock)
//! and vmfork's own ports (`vmm_ports.rs`: exit and ready).
//!
//! A device that needs the VMM to act (the exit port's code, the i8042's reset line, the ready
//! port) raises a [`Signals`] flag on the thread that made the access: the vCPU that wrote
//! gets the outcome of its own write, whatever the others do meanwhile.

pub mod legacy;
mod serial_sink;
pub mod vmm_ports;

pub use legacy::cmos::{CmosRegisters, CMOS_BASE};
pub use legacy::i8042::I8042_BASE;
pub use legacy::serial::{SerialRegisters, SERIAL_BASE, SERIAL_IRQ};
pub use serial_sink::{stdout_closed, SerialBuffer, SerialSink, SERIAL_BUFFER_CAP};
pub use vmm_ports::{EXIT_PORT, READY_PORT};

use legacy::cmos::{Cmos, CMOS_LEN};
use legacy::i8042::{I8042, I8042_LEN};
use legacy::serial::{SerialPort, SERIAL_LEN};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};
use vm_device::bus::{MmioAddress, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::DevicePio;
use vmm_ports::{ExitPort, ReadyPort, EXIT_PORT_LEN};
use vmm_sys_util::eventfd::EventFd;

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

/// A stateful part that saves and loads itself: what forks, snapshots, resets and migrations
/// carry of it. `load` keeps what is not state (output sinks, interrupt lines).
pub trait Persist {
    type State;
    fn save(&self) -> Self::State;
    fn load(&self, state: &Self::State) -> crate::Result<()>;
}

thread_local! {
    // The outcome of the access this thread is making (set by a device, taken by the bus).
    static OUTCOME: Cell<PioOutcome> = const { Cell::new(PioOutcome::Continue) };
}

/// How devices ask the VMM to act on the access being made (see the module docs).
/// Holds nothing: the outcome lives in a thread-local, so a device keeps its own copy.
#[derive(Clone, Copy, Default)]
pub struct Signals(());

impl Signals {
    fn raise(&self, outcome: PioOutcome) {
        OUTCOME.with(|o| {
            if o.get() == PioOutcome::Continue {
                o.set(outcome);
            }
        });
    }

    pub fn raise_exit(&self, code: u8) {
        self.raise(PioOutcome::Exit(code));
    }

    pub fn raise_reset(&self) {
        self.raise(PioOutcome::Reset);
    }

    pub fn raise_ready(&self) {
        self.raise(PioOutcome::Ready);
    }

    fn take() -> PioOutcome {
        OUTCOME.with(|o| o.replace(PioOutcome::Continue))
    }
}

/// The state of every device, as a fork or snapshot carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegisters,
    pub cmos: CmosRegisters,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device models keep no invariants a panic could break halfway; carry on after poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The devices of one VM on their buses. The exit and ready ports are always there (vmfork's
/// own channel); the serial model can be left out of a fork and attached later.
pub struct Devices {
    io: IoManager,
    serial: Arc<SerialPort>,
    cmos: Arc<Cmos>,
}

impl Devices {
    /// Devices in their power-on state. `serial_irq` is the irqfd of the serial's IRQ line.
    pub fn new(sink: SerialSink, serial_irq: Option<EventFd>) -> Self {
        let cmos = CmosRegisters::default();
        Self::on_buses(SerialPort::new(sink, serial_irq), Cmos::power_on(cmos))
    }

    /// Devices loaded from saved state (a fork's or a snapshot's).
    pub fn from_state(
        state: &DeviceState,
        sink: SerialSink,
        serial_irq: Option<EventFd>,
    ) -> crate::Result<Self> {
        Ok(Self::on_buses(
            SerialPort::from_state(&state.serial, sink, serial_irq)?,
            Cmos::new(state.cmos.clone())?,
        ))
    }

    /// The serial model left out (its ports read as no device); `state` is kept for
    /// [`Self::attach`].
    pub fn detached(state: DeviceState, serial_irq: Option<EventFd>) -> crate::Result<Self> {
        Ok(Self::on_buses(
            SerialPort::detached(state.serial, serial_irq),
            Cmos::new(state.cmos)?,
        ))
    }

    fn on_buses(serial: SerialPort, cmos: Cmos) -> Self {
        let serial = Arc::new(serial);
        let cmos = Arc::new(cmos);
        let signals = Signals::default();
        let mut io = IoManager::new();
        let ports: [(u16, u16, Arc<dyn DevicePio + Send + Sync>); 5] = [
            (SERIAL_BASE, SERIAL_LEN, serial.clone()),
            (CMOS_BASE, CMOS_LEN, cmos.clone()),
            (I8042_BASE, I8042_LEN, Arc::new(I8042::new(signals))),
            (EXIT_PORT, EXIT_PORT_LEN, Arc::new(ExitPort(signals))),
            (READY_PORT, 1, Arc::new(ReadyPort(signals))),
        ];
        for (base, len, device) in ports {
            // The ranges are fixed and disjoint: registering them cannot fail.
            if let Ok(range) = PioRange::new(PioAddress(base), len) {
                let _ = io.register_pio(range, device);
            }
        }
        Self { io, serial, cmos }
    }

    /// Attaches the serial model of a detached set, loading the state it was made with.
    pub fn attach(&self, sink: SerialSink) -> crate::Result<()> {
        self.serial.attach(sink)
    }

    pub fn attached(&self) -> bool {
        self.serial.attached()
    }

    /// Loads saved state into the devices, keeping their output sinks (a fork reset).
    pub fn load_state(&self, state: &DeviceState) -> crate::Result<()> {
        self.cmos.load(&state.cmos)?;
        self.serial.load(&state.serial)
    }

    /// Saves every device's state (a detached serial saves the state it would attach with).
    pub fn save(&self) -> DeviceState {
        DeviceState {
            serial: self.serial.save(),
            cmos: self.cmos.save(),
        }
    }

    /// Handles a port write; `data` holds every byte of the access (and of a `rep outs`, whose
    /// bytes go one by one to the same port).
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioOutcome {
        if self.io.pio_write(PioAddress(port), data).is_err() && data.len() > 1 {
            for byte in data {
                // Writes to ports with no device are dropped, as on a PC.
                let _ = self
                    .io
                    .pio_write(PioAddress(port), std::slice::from_ref(byte));
            }
        }
        Signals::take()
    }

    /// Handles a port read; ports with no device read as all ones, as on a PC.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
        }
    }

    /// Handles an MMIO read; `false` when no device is there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.io.mmio_read(MmioAddress(addr), data).is_ok()
    }

    /// Handles an MMIO write; `false` when no device is there.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.io.mmio_write(MmioAddress(addr), data).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_dispatch_by_range_and_state_persists() {
        let devices = Devices::new(SerialSink::Discard, None);
        // The serial's scratch register (offset 7) holds what is written, and is saved.
        assert_eq!(
            devices.pio_write(SERIAL_BASE + 7, &[0x5a]),
            PioOutcome::Continue
        );
        let mut byte = [0u8];
        devices.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [0x5a]);
        let saved = devices.save();
        assert_eq!(saved.serial.scratch, 0x5a);
        let other = Devices::from_state(&saved, SerialSink::Discard, None).unwrap();
        other.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [0x5a]);
        // A rep string longer than the device's range goes byte by byte to the port.
        assert_eq!(
            devices.pio_write(SERIAL_BASE + 7, &[1; 32]),
            PioOutcome::Continue
        );
        devices.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [1]);
        // vmfork's ports and the i8042 reset line; ports with no device.
        assert_eq!(devices.pio_write(EXIT_PORT, &[3]), PioOutcome::Exit(3));
        assert_eq!(devices.pio_write(READY_PORT, &[0]), PioOutcome::Ready);
        assert_eq!(
            devices.pio_write(I8042_BASE + 4, &[0xfe]),
            PioOutcome::Reset
        );
        assert_eq!(devices.pio_write(0x80, &[1, 2]), PioOutcome::Continue);
        let mut two = [0u8; 2];
        devices.pio_read(0x80, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        assert!(!devices.mmio_write(0xd000_0000, &[1]));
        // Bad saved state is refused, and a reset with it leaves the port usable.
        let mut bad = saved.clone();
        bad.serial.in_buffer = vec![0; 65];
        assert!(Devices::from_state(&bad, SerialSink::Discard, None).is_err());
        assert!(devices.load_state(&bad).is_err());
        assert_eq!(
            devices.pio_write(SERIAL_BASE + 7, &[9]),
            PioOutcome::Continue
        );
        devices.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [9]);
    }

    #[test]
    fn each_vcpu_thread_gets_the_outcome_of_its_own_write() {
        let devices = Arc::new(Devices::new(SerialSink::Discard, None));
        let writer = |port: u16, expect: PioOutcome| {
            let devices = Arc::clone(&devices);
            std::thread::spawn(move || {
                for _ in 0..20_000 {
                    assert_eq!(devices.pio_write(port, &[7]), expect);
                    assert_eq!(
                        devices.pio_write(SERIAL_BASE + 7, &[7]),
                        PioOutcome::Continue
                    );
                }
            })
        };
        let exits = writer(EXIT_PORT, PioOutcome::Exit(7));
        let readies = writer(READY_PORT, PioOutcome::Ready);
        exits.join().unwrap();
        readies.join().unwrap();
    }

    #[test]
    fn a_detached_serial_reads_as_no_device_until_attached() {
        let mut state = DeviceState::default();
        state.serial.scratch = 0x42;
        let devices = Devices::detached(state.clone(), None).unwrap();
        assert!(!devices.attached());
        let mut byte = [0u8];
        devices.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [0xff]);
        assert_eq!(devices.save(), state);
        devices.attach(SerialSink::Discard).unwrap();
        assert!(devices.attached());
        devices.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [0x42]);
        assert!(devices.attach(SerialSink::Discard).is_err());
    }
}
