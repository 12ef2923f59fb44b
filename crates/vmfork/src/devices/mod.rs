//! The device layer: a port-I/O bus and an MMIO bus (rust-vmm `vm-device`) with devices
//! registered by address range, and one [`Persist`] trait each stateful device implements next
//! to its code (`persist.rs` turns the whole set into snapshot record bodies). The devices: the
//! legacy PC ones (`legacy/`: 8250 serial, i8042, CMOS clock), vmfork's own ports
//! (`vmm_ports.rs`: exit and ready), the generation id page (`vmgenid.rs`) and virtio devices
//! on virtio-mmio (`virtio/`: entropy). Interrupt lines are irqfds, one per device
//! (`irq.rs`).
//!
//! A device that needs the VMM to act (the exit port's code, the i8042's reset line, the ready
//! port) raises a [`Signals`] flag on the thread that made the access: the vCPU that wrote
//! gets the outcome of its own write, whatever the others do meanwhile.

mod error;
pub mod irq;
pub mod legacy;
pub mod persist;
mod rewiring;
mod serial_sink;
pub mod virtio;
pub mod vmgenid;
pub mod vmm_ports;

pub use error::DeviceError;
pub use irq::IrqLines;
pub use legacy::cmos::{CmosRegisters, CMOS_BASE};
pub use legacy::i8042::{I8042Registers, I8042_BASE};
pub use legacy::serial::{SerialRegisters, SERIAL_BASE, SERIAL_IRQ};
pub use rewiring::Rewiring;
pub use serial_sink::{stdout_closed, SerialBuffer, SerialSink, SERIAL_BUFFER_CAP};
pub use virtio::block::DiskConfig;
pub use virtio::mmio::VirtioState;
pub use virtio::net::NetConfig;
pub use virtio::vsock::VsockConfig;
pub use vmgenid::{GenerationId, VMGENID_BASE};
pub use vmm_ports::{EXIT_PORT, READY_PORT};

use crate::memory::GuestRam;
use legacy::cmos::{Cmos, CMOS_LEN};
use legacy::i8042::{I8042, I8042_IRQ, I8042_LEN};
use legacy::serial::{SerialPort, SERIAL_LEN};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard};
use virtio::mmio::MmioTransport;
use virtio::{VirtioDevice, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::{DeviceMmio, DevicePio};
use vmgenid::{VmGenId, VMGENID_SIZE};
use vmm_ports::{ExitPort, ReadyPort, EXIT_PORT_LEN};

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
    // A virtio queue this thread's MMIO write asked to have served: (slot, queue).
    static NOTIFY: Cell<Option<(u8, u16)>> = const { Cell::new(None) };
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

    /// Asks for queue `queue` of virtio slot `slot` to be served once the write returns.
    pub fn raise_notify(&self, slot: u8, queue: u16) {
        NOTIFY.with(|n| n.set(Some((slot, queue))));
    }

    fn take() -> PioOutcome {
        OUTCOME.with(|o| o.replace(PioOutcome::Continue))
    }

    fn take_notify() -> Option<(u8, u16)> {
        NOTIFY.with(|n| n.take())
    }
}

/// The state of every device, as a fork or snapshot carries it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub serial: SerialRegisters,
    pub cmos: CmosRegisters,
    pub i8042: I8042Registers,
    pub generation: GenerationId,
    /// The virtio-mmio slots in use, from slot 0 (unused slots are not saved).
    pub virtio: Vec<VirtioState>,
}

impl DeviceState {
    /// The disks these devices have, by slot.
    pub fn disks(&self) -> Vec<DiskConfig> {
        self.virtio
            .iter()
            .filter_map(|v| match &v.device {
                virtio::DeviceSpecific::Block(b) => Some(b.config.clone()),
                _ => None,
            })
            .collect()
    }

    /// The network device these devices have, if any, and its MAC.
    pub fn net(&self) -> Option<(NetConfig, [u8; 6])> {
        self.virtio.iter().find_map(|v| match &v.device {
            virtio::DeviceSpecific::Net(s) => Some((s.config.clone(), s.mac)),
            _ => None,
        })
    }

    /// The vsock these devices have, if any.
    pub fn vsock(&self) -> Option<VsockConfig> {
        self.virtio.iter().find_map(|v| match &v.device {
            virtio::DeviceSpecific::Vsock(s) => Some(s.config.clone()),
            _ => None,
        })
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Device models keep no invariants a panic could break halfway; carry on after poisoning.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What virtio devices a new VM gets besides the entropy device.
#[derive(Clone, Copy, Default)]
pub struct DeviceConfig<'a> {
    pub disks: &'a [DiskConfig],
    pub vsock: Option<&'a VsockConfig>,
    pub net: Option<&'a NetConfig>,
}

/// The virtio devices of a new VM, by slot: the entropy device in slot 0, then the vsock and
/// the network device (if any), then the disks.
fn virtio_devices(config: DeviceConfig<'_>) -> crate::Result<Vec<Box<dyn VirtioDevice>>> {
    let disks = config.disks;
    let room = virtio::VIRTIO_SLOTS
        - 1
        - usize::from(config.vsock.is_some())
        - usize::from(config.net.is_some());
    if disks.len() > room {
        return Err(crate::devices::DeviceError::config(format!(
            "{} disks given; a VM takes at most {room}",
            disks.len(),
        )));
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = vec![Box::new(virtio::rng::Rng)];
    if let Some(vsock) = config.vsock {
        devices.push(Box::new(virtio::vsock::Vsock::new(vsock)?));
    }
    if let Some(net) = config.net {
        devices.push(Box::new(virtio::net::Net::new(net)?));
    }
    for disk in disks {
        devices.push(Box::new(virtio::block::Block::open(disk)?));
    }
    Ok(devices)
}

/// The virtio devices saved state describes, by slot (state from before virtio: the entropy
/// device at power-on).
fn saved_virtio_devices(
    saved: &[VirtioState],
    rewiring: &Rewiring,
) -> crate::Result<Vec<Box<dyn VirtioDevice>>> {
    if saved.is_empty() {
        return virtio_devices(DeviceConfig::default());
    }
    if saved.len() > virtio::VIRTIO_SLOTS {
        return Err(crate::devices::DeviceError::state(format!(
            "saved state has {} virtio devices; a VM has {} slots",
            saved.len(),
            virtio::VIRTIO_SLOTS
        )));
    }
    saved.iter().map(|s| s.device.device(rewiring)).collect()
}

/// The devices of one VM on their buses. The exit and ready ports are always there (vmfork's
/// own channel); the serial model can be left out of a fork and attached later.
pub struct Devices {
    io: IoManager,
    serial: Arc<SerialPort>,
    cmos: Arc<Cmos>,
    i8042: Arc<I8042>,
    generation: Arc<VmGenId>,
    virtio: Vec<Arc<MmioTransport>>,
    /// Device workers hold it for reading while they serve; a fork, snapshot or reset holds it
    /// for writing, so no device moves while the VM is taken at one instant.
    quiesce: Arc<std::sync::RwLock<()>>,
    /// A device was accessed (other than vmfork's exit and ready ports) since the last load:
    /// what a fuzzing reset checks before reloading device state.
    touched: std::sync::atomic::AtomicBool,
    /// A device has a worker (fixed at construction: asked at every fuzzing reset).
    has_workers: bool,
}

impl Devices {
    /// Devices in their power-on state (a new generation id), with `disks`, raising `irqs`.
    pub fn new(sink: SerialSink, irqs: &IrqLines, config: DeviceConfig<'_>) -> crate::Result<Self> {
        let mut generation = GenerationId::default();
        generation.new_generation()?;
        Self::on_buses(
            SerialPort::new(sink, irqs.line(SERIAL_IRQ)?),
            Cmos::power_on(CmosRegisters::default()),
            I8042Registers::default(),
            generation,
            virtio_devices(config)?,
            irqs,
        )
    }

    /// Devices loaded from saved state (a fork's or a snapshot's), on the host endpoints the
    /// state names exactly where `rewiring` gave them (see [`Rewiring::apply`]).
    pub fn from_state(
        state: &DeviceState,
        sink: SerialSink,
        irqs: &IrqLines,
        rewiring: &Rewiring,
    ) -> crate::Result<Self> {
        let devices = Self::on_buses(
            SerialPort::from_state(&state.serial, sink, irqs.line(SERIAL_IRQ)?)?,
            Cmos::new(state.cmos.clone())?,
            state.i8042.clone(),
            state.generation.clone(),
            saved_virtio_devices(&state.virtio, rewiring)?,
            irqs,
        )?;
        devices.load_virtio(&state.virtio)?;
        Ok(devices)
    }

    /// The serial model left out (its ports read as no device); `state` is kept for
    /// [`Self::attach`].
    pub fn detached(
        state: DeviceState,
        irqs: &IrqLines,
        rewiring: &Rewiring,
    ) -> crate::Result<Self> {
        let devices = Self::on_buses(
            SerialPort::detached(state.serial, irqs.line(SERIAL_IRQ)?),
            Cmos::new(state.cmos)?,
            state.i8042,
            state.generation,
            saved_virtio_devices(&state.virtio, rewiring)?,
            irqs,
        )?;
        devices.load_virtio(&state.virtio)?;
        Ok(devices)
    }

    fn on_buses(
        serial: SerialPort,
        cmos: Cmos,
        i8042: I8042Registers,
        generation: GenerationId,
        virtio_devices: Vec<Box<dyn VirtioDevice>>,
        irqs: &IrqLines,
    ) -> crate::Result<Self> {
        let serial = Arc::new(serial);
        let cmos = Arc::new(cmos);
        let generation = Arc::new(VmGenId::new(generation, irqs.line(irq::VMGENID_IRQ)?));
        let signals = Signals::default();
        let i8042 = Arc::new(I8042::new(i8042, signals, irqs.line(I8042_IRQ)?)?);
        let mut io = IoManager::new();
        let ports: [(u16, u16, Arc<dyn DevicePio + Send + Sync>); 5] = [
            (SERIAL_BASE, SERIAL_LEN, serial.clone()),
            (CMOS_BASE, CMOS_LEN, cmos.clone()),
            (I8042_BASE, I8042_LEN, i8042.clone()),
            (EXIT_PORT, EXIT_PORT_LEN, Arc::new(ExitPort(signals))),
            (READY_PORT, 1, Arc::new(ReadyPort(signals))),
        ];
        for (base, len, device) in ports {
            // The ranges are fixed and disjoint: registering them cannot fail.
            if let Ok(range) = PioRange::new(PioAddress(base), len) {
                let _ = io.register_pio(range, device);
            }
        }
        let mut virtio = Vec::new();
        for (slot, device) in virtio_devices.into_iter().enumerate() {
            let gsi = irq::VIRTIO_IRQ_BASE + slot as u32;
            virtio.push(Arc::new(MmioTransport::new(
                slot as u8,
                device,
                irqs.line(gsi)?,
                signals,
            )?));
        }
        let mut pages: Vec<(u64, u64, Arc<dyn DeviceMmio + Send + Sync>)> =
            vec![(VMGENID_BASE, VMGENID_SIZE, generation.clone())];
        for (slot, transport) in virtio.iter().enumerate() {
            let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE;
            pages.push((base, VIRTIO_MMIO_SIZE, transport.clone()));
        }
        for (base, len, device) in pages {
            if let Ok(range) = MmioRange::new(MmioAddress(base), len) {
                let _ = io.register_mmio(range, device);
            }
        }
        Ok(Self {
            io,
            serial,
            cmos,
            i8042,
            generation,
            has_workers: virtio.iter().any(|t| t.has_worker()),
            virtio,
            quiesce: Arc::default(),
            touched: Default::default(),
        })
    }

    fn load_virtio(&self, saved: &[VirtioState]) -> crate::Result<()> {
        if saved.len() > self.virtio.len() {
            return Err(crate::devices::DeviceError::state(format!(
                "saved state has {} virtio devices; this VM has {}",
                saved.len(),
                self.virtio.len()
            )));
        }
        for (slot, transport) in self.virtio.iter().enumerate() {
            match saved.get(slot) {
                Some(state) => transport.load(state)?,
                // Saved before the slot existed (an older snapshot): its power-on state.
                None => transport.power_on(),
            }
        }
        Ok(())
    }

    /// Starts the workers of devices with a host side, in the VM `memory` gives access to.
    pub fn start_workers(
        &self,
        memory: std::sync::Weak<dyn virtio::worker::GuestMemoryAccess>,
        vm_id: u64,
    ) -> crate::Result<()> {
        for transport in &self.virtio {
            transport.start_worker(memory.clone(), Arc::clone(&self.quiesce), vm_id)?;
        }
        Ok(())
    }

    /// The virtio devices by slot, and the generation id, as a listing shows them.
    pub fn describe(&self) -> serde_json::Value {
        let id: String = self
            .generation
            .save()
            .id
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        serde_json::json!({
            "generation_id": id,
            "virtio": self.virtio.iter().map(|t| t.describe()).collect::<Vec<_>>(),
        })
    }

    /// Holds every device worker off until the guard drops (see the field).
    pub fn quiesce(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.quiesce.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches the serial model of a detached set, loading the state it was made with.
    pub fn attach(&self, sink: SerialSink) -> crate::Result<()> {
        self.serial.attach(sink)
    }

    pub fn attached(&self) -> bool {
        self.serial.attached()
    }

    /// The kernel command line words that announce the virtio-mmio devices to Linux:
    /// `virtio_mmio.device=<size>@<base>:<irq>` per slot in use.
    /// How many virtio-mmio slots are in use (from slot 0).
    pub fn virtio_slots(&self) -> usize {
        self.virtio.len()
    }

    pub fn kernel_cmdline(&self) -> String {
        (0..self.virtio.len())
            .map(|slot| {
                format!(
                    "virtio_mmio.device=4K@{:#x}:{}",
                    VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_SIZE,
                    irq::VIRTIO_IRQ_BASE + slot as u32
                )
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Raises the interrupts of changes the devices were built with (a new generation id).
    pub fn announce(&self) {
        self.generation.announce();
        for transport in &self.virtio {
            transport.announce();
        }
    }

    /// Whether any device may have changed since the last [`Self::load_state`]: one was
    /// accessed, or one has a host side (a worker) that changes it on its own.
    pub fn touched(&self) -> bool {
        self.touched.load(std::sync::atomic::Ordering::Acquire) || self.has_workers
    }

    fn touch(&self) {
        self.touched
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Loads saved state into the devices, keeping their output sinks (a fork reset).
    pub fn load_state(&self, state: &DeviceState) -> crate::Result<()> {
        self.touched
            .store(false, std::sync::atomic::Ordering::Release);
        self.cmos.load(&state.cmos)?;
        self.i8042.load(&state.i8042)?;
        self.generation.load(&state.generation)?;
        self.load_virtio(&state.virtio)?;
        self.serial.load(&state.serial)
    }

    /// Saves every device's state (a detached serial saves the state it would attach with).
    pub fn save(&self) -> DeviceState {
        DeviceState {
            serial: self.serial.save(),
            cmos: self.cmos.save(),
            i8042: self.i8042.save(),
            generation: self.generation.save(),
            virtio: self.virtio.iter().map(|t| t.save()).collect(),
        }
    }

    /// Handles a port write; `data` holds every byte of the access (and of a `rep outs`, whose
    /// bytes go one by one to the same port).
    pub fn pio_write(&self, port: u16, data: &[u8]) -> PioOutcome {
        if !vmm_ports::is_vmm_port(port) {
            self.touch();
        }
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
        if !vmm_ports::is_vmm_port(port) {
            self.touch();
        }
        if self.io.pio_read(PioAddress(port), data).is_err() {
            data.fill(0xff);
        }
    }

    /// Handles an MMIO read; `false` when no device is there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.touch();
        self.io.mmio_read(MmioAddress(addr), data).is_ok()
    }

    /// Handles an MMIO write; `false` when no device is there. A virtio queue notify is
    /// served here, on the writing vCPU's thread, with `ram` as the guest's memory.
    pub fn mmio_write(&self, addr: u64, data: &[u8], ram: &GuestRam) -> bool {
        self.touch();
        let found = self.io.mmio_write(MmioAddress(addr), data).is_ok();
        if let Some((slot, queue)) = Signals::take_notify() {
            if let Some(transport) = self.virtio.get(usize::from(slot)) {
                ram.with_memory(|memory| transport.serve(usize::from(queue), memory));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_dispatch_by_range_and_state_persists() {
        let devices = Devices::new(
            SerialSink::Discard,
            &IrqLines::none(),
            DeviceConfig::default(),
        )
        .unwrap();
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
        let other = Devices::from_state(
            &saved,
            SerialSink::Discard,
            &IrqLines::none(),
            &Rewiring::default(),
        )
        .unwrap();
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
        let ram = GuestRam::new(8 << 20).unwrap();
        assert!(!devices.mmio_write(0xd800_0000, &[1], &ram));
        // Bad saved state is refused, and a reset with it leaves the port usable.
        let mut bad = saved.clone();
        bad.serial.in_buffer = vec![0; 65];
        assert!(Devices::from_state(
            &bad,
            SerialSink::Discard,
            &IrqLines::none(),
            &Rewiring::default()
        )
        .is_err());
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
        let devices = Arc::new(
            Devices::new(
                SerialSink::Discard,
                &IrqLines::none(),
                DeviceConfig::default(),
            )
            .unwrap(),
        );
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
        let devices =
            Devices::detached(state.clone(), &IrqLines::none(), &Rewiring::default()).unwrap();
        assert!(!devices.attached());
        let mut byte = [0u8];
        devices.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [0xff]);
        assert_eq!(devices.save().serial, state.serial);
        devices.attach(SerialSink::Discard).unwrap();
        assert!(devices.attached());
        devices.pio_read(SERIAL_BASE + 7, &mut byte);
        assert_eq!(byte, [0x42]);
        assert!(devices.attach(SerialSink::Discard).is_err());
    }
}
