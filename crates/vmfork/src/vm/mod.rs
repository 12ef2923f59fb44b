//! A VM: KVM VM fd, vCPUs (one thread each), guest RAM, devices, and the run control that pauses,
//! resumes and stops them.

mod control;
pub mod emulation_assist;
mod exit;
mod kick;
mod kvm_system;
mod op_lock;
pub mod pool;
mod vcpu;

pub use control::Want;
pub use exit::{ExitReason, VcpuDump, GUEST_FAULT_STATUS, STOPPED_STATUS};
pub use kick::ThreadTimer;
pub use kvm_system::KvmSystem;

use crate::boot::{self, BootSpec};
use crate::devices::irq::device_gsis;
use crate::devices::virtio::worker::GuestMemoryAccess;
use crate::devices::SerialBuffer;
use crate::devices::{Devices, IrqLines, SerialSink};
use crate::error::{Error, KvmContext, Result};
use crate::memory::{
    AddressRange, DirtyPages, FrozenImage, GuestRam, MemoryLayout, MemoryTracking, ResidentRam,
    PAGE_SIZE,
};
use crate::state::{CpuRegisters, IrqchipState, VcpuState, VmState};
use control::RunControl;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};
pub use op_lock::OpGuard;
use op_lock::OpLock;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

/// Most vCPUs a vmfork VM may have.
pub const MAX_VCPUS: u8 = 32;

/// How to build a VM.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_bytes: u64,
    /// In-kernel PIC, IOAPIC, LAPICs and PIT (what Linux guests need). Without it there is no
    /// interrupt delivery and HLT stops the VM.
    pub irqchip: bool,
    /// virtio-blk disks (slots 1 on), each a read-only image under a copy-on-write layer of
    /// the VM's own.
    pub disks: Vec<crate::devices::DiskConfig>,
    /// A virtio-vsock bridged to Unix sockets.
    pub vsock: Option<crate::devices::VsockConfig>,
    /// A virtio-net on a tap device.
    pub net: Option<crate::devices::NetConfig>,
    /// Complete the instructions KVM's emulator refuses (for hosts that emulate guest ring 0;
    /// see `vm::emulation_assist`).
    pub emulation_assist: bool,
    /// CPU features the guest does not see (CPUID bits cleared).
    pub hide_cpu_features: Vec<crate::boot::CpuFeature>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            mem_bytes: 256 << 20,
            irqchip: true,
            disks: Vec::new(),
            vsock: None,
            net: None,
            emulation_assist: false,
            hide_cpu_features: Vec::new(),
        }
    }
}

impl VmConfig {
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::Config(format!(
                "{} vCPUs requested; vmfork supports 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        Ok(())
    }
}

/// Coarse state of a VM, for listings and for checking what an operation may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    /// Built, not started.
    Created,
    Running,
    Paused,
    /// Stopped for good; see [`Vm::exit_reason`].
    Exited,
}

impl VmStatus {
    pub fn name(self) -> &'static str {
        match self {
            VmStatus::Created => "created",
            VmStatus::Running => "running",
            VmStatus::Paused => "paused",
            VmStatus::Exited => "exited",
        }
    }
}

/// One vCPU: its fd, locked by the vCPU thread while it runs and by the controller while paused.
pub(crate) struct VcpuSlot {
    pub(crate) fd: Mutex<VcpuFd>,
    /// Whether KVM guest debugging (breakpoint exits) is on: a recycled shell turns it off.
    pub(crate) guest_debug: std::sync::atomic::AtomicBool,
    /// Whether `kvm_run`'s register copy (sync regs) is the vCPU's state: set after an inline
    /// run's exit, cleared by any other access to the vCPU (which may set state).
    pub(crate) exit_synced: std::sync::atomic::AtomicBool,
}

/// A dying fork's shell keeps its RAM mapped when at most this many pages (or 1/256 of its RAM,
/// if more) differ from the base file: copying them back beats mapping the range afresh.
const MAX_RESIDENT_STALE_PAGES: u64 = 1024;

/// What the controller and the vCPU threads share.
pub(crate) struct VmShared {
    // The shell (vCPUs, VM fd, irqfds) is handed to the pool when this drops, after its
    // memslots are deleted, so it never points at the RAM freed after it.
    pub(crate) vcpus: Vec<VcpuSlot>,
    pub(crate) fd: Arc<VmFd>,
    irqs: IrqLines,
    pub(crate) devices: Devices,
    pub(crate) control: RunControl,
    /// Serializes the operations that change or read the run state, vCPU state or memory.
    ops: OpLock,
    /// How long the last fork or snapshot of the running VM paused it, in nanoseconds (0: none).
    last_pause_ns: std::sync::atomic::AtomicU64,
    /// A background worker has the vCPUs stopped for a moment: the VM still counts as running.
    held: std::sync::atomic::AtomicBool,
    /// The longest pause a background worker (layer adoption) took, in nanoseconds.
    max_background_pause_ns: std::sync::atomic::AtomicU64,
    pub(crate) kicks: kick::KickRegistry,
    pub(crate) tracking: Mutex<MemoryTracking>,
    /// The snapshot being written, if one is: one at a time per VM.
    pub(crate) snapshot_progress: Mutex<Option<SnapshotProgress>>,
    pub(crate) origin: Option<ForkOrigin>,
    pub(crate) ram: GuestRam,
    pub(crate) config: VmConfig,
    pub(crate) msr_indices: Vec<u32>,
    pub(crate) serial: Option<SerialBuffer>,
    pub(crate) id: u64,
    /// Instructions the emulation assist completed.
    assisted: std::sync::atomic::AtomicU64,
    /// vCPU 0's TSC minus its saved TSC right after the last state load, in ns.
    pub(crate) tsc_jump_at_load_ns: std::sync::atomic::AtomicI64,
    /// The pooled shell's reserved range `ram` is placed in.
    ram_range: Option<Arc<AddressRange>>,
}

/// How far the snapshot a VM is writing has got ([`Vm::snapshot_progress`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotProgress {
    /// The directory being written, or `-` for a stream.
    pub path: std::path::PathBuf,
    pub pages_done: u64,
    pub pages_total: u64,
}

/// Where a fork (or a restored VM, a fork of a snapshot) came from: what
/// [`Vm::reset`](crate::vm::Vm::reset) returns it to.
pub(crate) struct ForkOrigin {
    pub(crate) state: VmState,
    pub(crate) image: Arc<FrozenImage>,
    pub(crate) source: ForkSource,
    /// The guest cannot enter ring 0 from this state without a triple fault (what
    /// [`Vm::reset_quick`] relies on).
    pub(crate) ring0_unreachable: bool,
    /// RAM file offset of the page holding this state's GDT, once looked up.
    pub(crate) gdt_page: std::sync::OnceLock<u64>,
}

pub(crate) enum ForkSource {
    /// Forked from the VM with this id.
    Vm(u64),
    /// Restored from the snapshot with this id.
    Snapshot(String),
}

/// The parts of a VM that do not depend on its RAM: VM fd, irqchip, vCPUs with CPUID.
pub(crate) struct VmShell {
    pub(crate) fd: Arc<VmFd>,
    pub(crate) vcpus: Vec<VcpuSlot>,
    /// An irqfd on every device line (none without an in-kernel irqchip).
    pub(crate) irqs: IrqLines,
    pub(crate) msr_indices: Vec<u32>,
    /// A reserved host range with dirty-logged memslots already registered over it for RAM of
    /// the config's size (pooled shells): a fork maps its RAM there and skips memslot creation.
    pub(crate) ram_range: Option<Arc<AddressRange>>,
    /// What the last VM left mapped in `ram_range`, for the next fork of its family to reuse.
    pub(crate) resident: Option<ResidentRam>,
    /// The host address memslots were registered at when the shell was made, if any.
    pub(crate) slots_at: Option<u64>,
}

/// Where a new shell's memslots go: RAM laid out as `layout` at host address `base`.
pub(crate) struct ShellMemory<'a> {
    pub(crate) layout: &'a MemoryLayout,
    pub(crate) base: u64,
    pub(crate) log_dirty: bool,
}

/// Creates a VM shell for `config`, with memslots for `memory` when given. KVM makes a memslot
/// change after an in-kernel irqchip exists cost ~7 ms here (before it: ~0.4 ms per GiB), so
/// the memslots are registered first; without them the shell pays that once up front.
pub(crate) fn create_shell(config: &VmConfig, memory: Option<ShellMemory<'_>>) -> Result<VmShell> {
    config.validate()?;
    let system = KvmSystem::get()?;
    let fd = Arc::new(system.kvm.create_vm().kvm("KVM_CREATE_VM")?);
    let slots_at = match &memory {
        Some(m) => {
            register_memslots_at(&fd, m.layout, m.base, m.log_dirty)?;
            Some(m.base)
        }
        None => None,
    };
    let irqs = if config.irqchip {
        create_irqchip(&fd)?;
        let mut lines = Vec::new();
        for gsi in device_gsis() {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::Io)?;
            fd.register_irqfd(&evt, gsi).kvm("KVM_IRQFD")?;
            lines.push((gsi, evt));
        }
        IrqLines::new(lines)
    } else {
        IrqLines::none()
    };
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for i in 0..config.vcpus {
        let vcpu = fd.create_vcpu(u64::from(i)).kvm("KVM_CREATE_VCPU")?;
        let cpuid = boot::vcpu_cpuid(
            &system.supported_cpuid,
            i,
            config.vcpus,
            &config.hide_cpu_features,
        );
        vcpu.set_cpuid2(&cpuid).kvm("KVM_SET_CPUID2")?;
        if config.irqchip {
            set_lapic_lint(&vcpu)?;
        }
        vcpus.push(VcpuSlot {
            guest_debug: Default::default(),
            exit_synced: Default::default(),
            fd: Mutex::new(vcpu),
        });
    }
    let msr_indices = {
        let first = vcpus[0].fd.lock().unwrap_or_else(|p| p.into_inner());
        system.saved_msrs(&first).to_vec()
    };
    if slots_at.is_none() {
        pay_first_memslot_cost(&fd)?;
    }
    Ok(VmShell {
        fd,
        vcpus,
        irqs,
        msr_indices,
        ram_range: None,
        resident: None,
        slots_at,
    })
}

static NEXT_VM_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The parts a VM is assembled from.
pub(crate) struct VmParts {
    pub(crate) shell: VmShell,
    pub(crate) ram: GuestRam,
    pub(crate) devices: Devices,
    pub(crate) config: VmConfig,
    pub(crate) serial: Option<SerialBuffer>,
    pub(crate) image: Option<Arc<FrozenImage>>,
    pub(crate) origin: Option<ForkOrigin>,
}

impl Vm {
    /// Puts a VM together: memslots (dirty-logged when the RAM is copy-on-write) and run state.
    pub(crate) fn assemble(parts: VmParts) -> Result<Vm> {
        let log_dirty = parts.image.is_some();
        let base = parts.ram.mapping().as_ptr() as u64;
        match &parts.shell.ram_range {
            // Registered (dirty-logged) when the shell was made for this very RAM.
            None if parts.shell.slots_at == Some(base) => {}
            None => register_memslots(&parts.shell.fd, &parts.ram, log_dirty)?,
            // The pooled shell's memslots (dirty-logged) already cover the RAM's range.
            Some(range) if log_dirty && range.as_ptr() == parts.ram.mapping().as_ptr() => {}
            Some(_) => {
                return Err(Error::Memory(
                    "a pooled shell's RAM must be a fork image placed in its range".into(),
                ))
            }
        }
        let dirty = DirtyPages::new(parts.ram.size());
        let vm = Vm {
            shared: Arc::new(VmShared {
                vcpus: parts.shell.vcpus,
                fd: parts.shell.fd,
                irqs: parts.shell.irqs,
                ram_range: parts.shell.ram_range,
                devices: parts.devices,
                control: RunControl::new(),
                ops: OpLock::default(),
                last_pause_ns: std::sync::atomic::AtomicU64::new(0),
                max_background_pause_ns: std::sync::atomic::AtomicU64::new(0),
                held: std::sync::atomic::AtomicBool::new(false),
                kicks: kick::KickRegistry::default(),
                tracking: Mutex::new(MemoryTracking {
                    image: parts.image,
                    since_image: dirty.clone(),
                    since_origin: dirty,
                    since_snapshot: None,
                    since_round: None,
                }),
                snapshot_progress: Mutex::new(None),
                origin: parts.origin,
                ram: parts.ram,
                config: parts.config,
                msr_indices: parts.shell.msr_indices,
                serial: parts.serial,
                id: NEXT_VM_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                assisted: std::sync::atomic::AtomicU64::new(0),
                tsc_jump_at_load_ns: std::sync::atomic::AtomicI64::new(0),
            }),
            threads: Mutex::new(Vec::new()),
        };
        // Devices with a host side (vsock) wait on it on workers of their own.
        let memory: std::sync::Weak<dyn GuestMemoryAccess> = Arc::downgrade(&vm.shared) as _;
        vm.shared.devices.start_workers(memory, vm.shared.id)?;
        Ok(vm)
    }

    /// After a stop, joins the vCPU threads and makes the VM runnable again (state "created").
    pub(crate) fn rearm(&self) {
        self.join_threads();
        self.shared.control.rearm();
    }

    /// Holds this VM's operation lock: no other thread forks, snapshots, resets, pauses,
    /// resumes or reads or writes its state until the guard drops. Every such method takes it
    /// on its own; hold it to make several of them one operation (pause, reset, resume). It is
    /// reentrant: the holder's own calls go through.
    pub fn exclusive(&self) -> OpGuard<'_> {
        self.shared.ops.lock()
    }

    pub(crate) fn shared(&self) -> &VmShared {
        &self.shared
    }

    /// The shared part, for a background worker to hold weakly.
    /// Errors ([`Error::Damaged`]) if a snapshot file this VM's image maps was truncated or
    /// written under it: what was just read from its memory may be zeroes, not the guest's.
    pub fn check_memory_intact(&self) -> Result<()> {
        match self.shared().memory_damage() {
            Some(why) => Err(Error::Damaged(format!("VM {}: {why}", self.id()))),
            None => Ok(()),
        }
    }

    pub(crate) fn shared_weak(&self) -> std::sync::Weak<VmShared> {
        Arc::downgrade(&self.shared)
    }

    /// A process-unique id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The in-memory serial console, when the VM prints into one (forks do by default).
    pub fn serial(&self) -> Option<&SerialBuffer> {
        self.shared.serial.as_ref()
    }
}

impl VmShared {
    /// The assist's counter when the assist is on.
    fn assist(&self) -> Option<&std::sync::atomic::AtomicU64> {
        self.config.emulation_assist.then_some(&self.assisted)
    }
}

impl GuestMemoryAccess for VmShared {
    fn with_memory(&self, f: &mut dyn FnMut(&crate::memory::GuestMemory)) {
        self.ram.with_memory(|m| f(m));
    }
}

impl VmShell {
    /// Handles on the device lines' irqfds for a device set (the shell keeps its own).
    pub(crate) fn irq_lines(&self) -> Result<IrqLines> {
        self.irqs.try_clone()
    }
}

impl Drop for VmShared {
    fn drop(&mut self) {
        // A VM KVM gave up on is not worth reusing; nor is one whose RAM is not in a pooled
        // range. Either is closed on the reaper thread, off the caller's path. A reusable
        // shell keeps its RAM mapped when few pages differ from the family's base file.
        let healthy = !matches!(self.control.exit(), Some(ExitReason::InternalError { .. }));
        let (reusable_range, resident) = match &self.ram_range {
            Some(_) if healthy => match self.leave_resident() {
                Some(resident) => (true, Some(resident)),
                None => (self.ram.release_range().is_ok(), None),
            },
            _ => (false, None),
        };
        let shell = VmShell {
            fd: Arc::clone(&self.fd),
            vcpus: std::mem::take(&mut self.vcpus),
            irqs: std::mem::take(&mut self.irqs),
            msr_indices: std::mem::take(&mut self.msr_indices),
            ram_range: if reusable_range {
                self.ram_range.take()
            } else {
                None
            },
            resident,
            slots_at: None,
        };
        if shell.ram_range.is_some() {
            pool::recycle(shell, &self.config);
        } else {
            pool::close(shell);
        }
    }
}

impl crate::memory::file_guard::DamageListener for VmShared {
    /// The snapshot file this VM's image maps was truncated or written: its memory is no
    /// longer what it was, so it stops (its vCPUs are kicked out of the guest).
    fn file_damaged(&self, why: &str) {
        self.control.finish(ExitReason::InternalError {
            detail: format!("{why}; the VM was stopped"),
            dump: None,
        });
        self.kicks.kick_all();
    }
}

impl VmShared {
    /// Why this VM's memory can no longer be trusted, if a snapshot file its image maps was
    /// truncated or written under it.
    pub(crate) fn memory_damage(&self) -> Option<String> {
        // Every fork and snapshot asks: without a guarded file, skip the tracking lock.
        if !crate::memory::file_guard::active() {
            return None;
        }
        let tracking = self.tracking.lock().unwrap_or_else(|p| p.into_inner());
        let base = tracking.image.as_ref().map(|i| Arc::clone(i.base()));
        drop(tracking);
        crate::memory::file_guard::damage(base.as_ref()?)
    }

    /// Hands the pages written since the last call (guest writes from KVM's dirty log, VMM
    /// writes from vm-memory's bitmap) to every consumer in `tracking`, and clears the dirty
    /// log. Works while the VM runs (a pre-copy round).
    pub(crate) fn collect_dirty(&self, tracking: &mut MemoryTracking) -> Result<()> {
        let mut fresh = DirtyPages::new(self.ram.size());
        // A paused parent forked again and again has not written since the last look: skip
        // reading a dirty log whose size grows with RAM.
        if self.control.take_ran() {
            for (slot, region, _) in self.ram.slots() {
                let bitmap = self
                    .fd
                    .get_dirty_log(slot, region.size as usize)
                    .kvm("KVM_GET_DIRTY_LOG")?;
                fresh.add_region_bitmap(&region, &bitmap);
            }
        }
        self.ram.take_vmm_dirty(&mut fresh);
        tracking.add(&fresh);
        Ok(())
    }

    /// The RAM of a dying fork, kept mapped for its shell's next VM: `None` when too many pages
    /// differ from the base file for a fix-up to beat mapping the range afresh.
    fn leave_resident(&self) -> Option<ResidentRam> {
        let mut tracking = self.tracking.lock().unwrap_or_else(|p| p.into_inner());
        self.collect_dirty(&mut tracking).ok()?;
        tracking.image.as_ref()?;
        // Pages with private copies: all written since the fork (a reset's copies included,
        // as the reset leaves them written); the layer runs are handed over separately.
        let mut stale = std::mem::take(&mut tracking.since_origin);
        stale.union(&tracking.since_image);
        let pages = self.ram.size() / PAGE_SIZE;
        if stale.count() as u64 > MAX_RESIDENT_STALE_PAGES.max(pages / 256) {
            return None;
        }
        self.ram.leave_resident(stale.offsets().collect()).ok()
    }

    /// Holds the VM's operation lock from a background worker (which has no `Vm`).
    pub(crate) fn exclusive(&self) -> OpGuard<'_> {
        self.ops.lock()
    }

    /// For a background worker holding the op lock: runs `f` with no vCPU running, stopping
    /// them for the moment if they run (recorded as a background pause; the VM still shows as
    /// running meanwhile). `None`, without running `f`, when the VM runs inline on its caller's
    /// thread, where it cannot be stopped from here.
    pub(crate) fn with_vcpus_held<T>(&self, f: impl FnOnce() -> T) -> Option<T> {
        use std::sync::atomic::Ordering;
        let started = std::time::Instant::now();
        let resume = match self.control.want() {
            // Nothing runs, or nothing will once the stopping vCPUs are out.
            Want::Stop | Want::Pause => false,
            Want::Run if self.control.alive() == 0 => return None,
            Want::Run => {
                self.held.store(true, Ordering::Release);
                self.control.set_want(Want::Pause);
                self.kicks.kick_all();
                let parked = self.control.wait_parked(self.vcpus.len());
                if !parked {
                    // It stopped meanwhile: no vCPU runs, nothing to resume.
                    self.held.store(false, Ordering::Release);
                }
                parked
            }
        };
        let out = f();
        if resume {
            self.record_background_pause(started.elapsed());
            self.control.set_want(Want::Run);
            self.held.store(false, Ordering::Release);
        }
        Some(out)
    }

    /// The VM runs inline on its caller's thread, where no background worker can pause it.
    pub(crate) fn background_pause_impossible(&self) -> bool {
        self.control.want() == Want::Run && self.control.alive() == 0
    }

    /// Records a pause taken by a background worker (the longest is kept).
    fn record_background_pause(&self, pause: Duration) {
        let ns = u64::try_from(pause.as_nanos()).unwrap_or(u64::MAX);
        self.max_background_pause_ns
            .fetch_max(ns, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn max_background_pause(&self) -> Duration {
        Duration::from_nanos(
            self.max_background_pause_ns
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub(crate) fn record_pause(&self, pause: Duration) {
        let ns = u64::try_from(pause.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.last_pause_ns
            .store(ns, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn last_pause(&self) -> Option<Duration> {
        match self
            .last_pause_ns
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    fn vcpu(&self, index: usize) -> Result<MutexGuard<'_, VcpuFd>> {
        let slot = self.vcpus.get(index).ok_or_else(|| {
            Error::Invalid(format!(
                "vCPU {index} does not exist (the VM has {})",
                self.vcpus.len()
            ))
        })?;
        let vcpu = slot.fd.lock().unwrap_or_else(|p| p.into_inner());
        slot.exit_synced
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(vcpu)
    }
}

/// A virtual machine.
pub struct Vm {
    shared: Arc<VmShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Vm {
    /// Builds a VM with zeroed RAM and devices in their power-on state; nothing is loaded yet.
    pub fn new(config: VmConfig, serial: SerialSink) -> Result<Vm> {
        config.validate()?;
        let ram = GuestRam::new(config.mem_bytes)?;
        // A fresh shell: a booting VM needs KVM's power-on state, not a recycled one.
        let shell = create_shell(
            &config,
            // Dirty-logged from the start: turning logging on at the first fork would be a
            // memslot change inside its pause (~7 ms here with an in-kernel irqchip).
            Some(ShellMemory {
                layout: ram.layout(),
                base: ram.mapping().as_ptr() as u64,
                log_dirty: true,
            }),
        )?;
        let buffer = match &serial {
            SerialSink::Buffer(b) => Some(b.clone()),
            _ => None,
        };
        let devices = Devices::new(
            serial,
            &shell.irq_lines()?,
            crate::devices::DeviceConfig {
                disks: &config.disks,
                vsock: config.vsock.as_ref(),
                net: config.net.as_ref(),
            },
        )?;
        Vm::assemble(VmParts {
            shell,
            ram,
            devices,
            config,
            serial: buffer,
            image: None,
            origin: None,
        })
    }

    /// Builds a VM and loads `spec` into it, ready to [`start`](Self::start).
    pub fn boot(config: VmConfig, serial: SerialSink, spec: &BootSpec) -> Result<Vm> {
        let vm = Vm::new(config, serial)?;
        vm.load(spec)?;
        Ok(vm)
    }

    /// Loads a kernel and points vCPU 0 at its entry.
    pub fn load(&self, spec: &BootSpec) -> Result<()> {
        if self.status() != VmStatus::Created {
            return Err(Error::State {
                actual: self.status().name(),
                wanted: "not yet started",
            });
        }
        // A kernel given a command line learns of the virtio-mmio devices on it (Linux's
        // `virtio_mmio.device=`, as Firecracker announces them).
        let announced;
        let spec = match &spec.cmdline {
            Some(cmdline) => {
                announced = BootSpec {
                    cmdline: Some(format!(
                        "{cmdline} {}",
                        self.shared.devices.kernel_cmdline()
                    )),
                    ..spec.clone()
                };
                &announced
            }
            None => spec,
        };
        // With an in-kernel irqchip the guest learns of its CPUs, interrupt controllers and
        // devices from ACPI tables (and an MP table, for kernels built without ACPI).
        let platform = self.shared.config.irqchip.then(|| boot::acpi::Platform {
            vcpus: self.shared.config.vcpus,
            virtio_slots: self.shared.devices.virtio_slots(),
        });
        let entry = boot::load(&self.shared.ram, spec, platform.as_ref())?;
        let vcpu = self.shared.vcpu(0)?;
        boot::setup_boot_vcpu(&vcpu, &self.shared.ram, entry)
    }

    /// Starts one thread per vCPU.
    pub fn start(&self) -> Result<()> {
        let _op = self.exclusive();
        let mut threads = self.lock_threads();
        if !threads.is_empty() {
            return Err(Error::State {
                actual: self.status().name(),
                wanted: "not yet started",
            });
        }
        kick::install_handler()?;
        self.shared.control.set_want(Want::Run);
        for index in 0..self.shared.vcpus.len() {
            let shared = Arc::clone(&self.shared);
            shared.control.thread_started();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu_thread(shared, index));
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(e) => {
                    self.shared.control.thread_exited();
                    self.shared.control.finish(ExitReason::Stopped);
                    return Err(Error::Io(e));
                }
            }
        }
        Ok(())
    }

    /// Runs vCPU 0 on the calling thread until the VM stops (single-vCPU VMs that were not
    /// started with threads). No thread hand-off: what fuzzing loops and benchmarks want.
    pub fn run_inline(&self) -> Result<ExitReason> {
        self.run_inline_with(vcpu::RunLimits::default())
    }

    /// Runs the VM inline (as [`Self::run_inline`]) until the guest writes to the ready port
    /// ([`crate::devices::READY_PORT`]), and leaves it paused just after that write: where a
    /// fuzzing harness is about to read its input. Any other end of the run, or `limit`
    /// passing first, is an error.
    pub fn run_to_ready(&self, limit: Duration) -> Result<()> {
        let timer = kick::ThreadTimer::for_this_thread()?;
        timer.arm(limit);
        let exit = self.run_inline_with(vcpu::RunLimits {
            deadline: Some(std::time::Instant::now() + limit),
            stop_at_ready: true,
        });
        timer.disarm();
        match exit? {
            ExitReason::Ready => Ok(()),
            ExitReason::Stopped => Err(Error::Invalid(format!(
                "the guest did not write to the ready port within {limit:?}"
            ))),
            other => Err(Error::Invalid(format!(
                "the guest stopped before it was ready: {}",
                other.summary()
            ))),
        }
    }

    /// [`Self::run_inline`] that gives up after `limit` with [`ExitReason::Stopped`] (a kick
    /// from `timer`, which must belong to the calling thread, ends the run). The VM is left
    /// paused where it was, so it can be inspected or reset.
    pub fn run_inline_for(&self, limit: Duration, timer: &kick::ThreadTimer) -> Result<ExitReason> {
        timer.arm(limit);
        let outcome = self.run_inline_with(vcpu::RunLimits {
            deadline: Some(std::time::Instant::now() + limit),
            stop_at_ready: false,
        });
        timer.disarm();
        outcome
    }

    fn run_inline_with(&self, limits: vcpu::RunLimits) -> Result<ExitReason> {
        // One operation: no background worker swaps memory under the running vCPU.
        let _op = self.exclusive();
        if self.shared.vcpus.len() != 1 || !self.lock_threads().is_empty() {
            return Err(Error::Invalid(
                "run_inline needs a single-vCPU VM that is not running on its own threads".into(),
            ));
        }
        if self.shared.control.exit().is_some() {
            return Err(Error::State {
                actual: "exited",
                wanted: "runnable",
            });
        }
        kick::install_handler()?;
        self.shared.control.set_want(Want::Run);
        let mut vcpu = self.shared.vcpu(0)?;
        let _target = kick::KickTarget::register(vcpu.get_kvm_run());
        let event = vcpu::run_vcpu(
            0,
            &mut vcpu,
            &self.shared.devices,
            &self.shared.ram,
            &self.shared.control,
            self.shared.assist(),
            limits,
        );
        if vcpu.get_kvm_run().kvm_valid_regs != 0 {
            self.shared.vcpus[0]
                .exit_synced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        self.shared.control.set_want(Want::Pause);
        Ok(match event {
            vcpu::RunEvent::Exit(reason) => *reason,
            vcpu::RunEvent::Interrupted => ExitReason::Stopped,
        })
    }

    /// Makes an `int3` the guest executes stop the VM with [`ExitReason::Breakpoint`] instead of
    /// raising #BP in the guest (KVM's software-breakpoint guest debugging), or turns that off.
    /// Coverage breakpoints use it.
    pub fn set_breakpoint_exits(&self, on: bool) -> Result<()> {
        let _op = self.exclusive();
        for (index, slot) in self.shared.vcpus.iter().enumerate() {
            let vcpu = self.shared.vcpu(index)?;
            set_guest_debug(&vcpu, on)?;
            slot.guest_debug
                .store(on, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// Stops every vCPU at its next instruction boundary and waits until all have stopped.
    pub fn pause(&self) -> Result<()> {
        let _op = self.exclusive();
        match self.status() {
            VmStatus::Running => {}
            VmStatus::Paused => return Ok(()),
            other => {
                return Err(Error::State {
                    actual: other.name(),
                    wanted: "running",
                })
            }
        }
        self.shared.control.set_want(Want::Pause);
        self.kick_all();
        if !self.shared.control.wait_parked(self.shared.vcpus.len()) {
            return Err(Error::State {
                actual: "exited",
                wanted: "running",
            });
        }
        Ok(())
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<()> {
        let _op = self.exclusive();
        match self.status() {
            VmStatus::Paused => {
                self.shared.control.set_want(Want::Run);
                Ok(())
            }
            VmStatus::Running => Ok(()),
            other => Err(Error::State {
                actual: other.name(),
                wanted: "paused",
            }),
        }
    }

    /// Stops the VM for good (its reason becomes [`ExitReason::Stopped`] unless it had one).
    pub fn stop(&self) {
        self.shared.control.finish(ExitReason::Stopped);
        self.kick_all();
    }

    /// Waits until the VM stops and returns why.
    pub fn wait(&self) -> ExitReason {
        let reason = self
            .shared
            .control
            .wait_exit(None)
            .unwrap_or(ExitReason::Stopped);
        self.join_threads();
        reason
    }

    /// Waits at most `timeout`; `None` if the VM is still running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let reason = self.shared.control.wait_exit(Some(timeout))?;
        self.join_threads();
        Some(reason)
    }

    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.shared.control.exit()
    }

    pub fn status(&self) -> VmStatus {
        if self.shared.control.exit().is_some() {
            return VmStatus::Exited;
        }
        let started = !self.lock_threads().is_empty();
        let held = self.shared.held.load(std::sync::atomic::Ordering::Acquire);
        match (started, self.shared.control.want()) {
            (_, Want::Stop) => VmStatus::Exited,
            (false, _) => VmStatus::Created,
            (true, Want::Run) => VmStatus::Running,
            // A background worker's moment of pause (it resumes the VM itself).
            (true, Want::Pause) if held => VmStatus::Running,
            (true, Want::Pause) => VmStatus::Paused,
        }
    }

    pub fn config(&self) -> &VmConfig {
        &self.shared.config
    }

    pub fn ram(&self) -> &GuestRam {
        &self.shared.ram
    }

    pub fn vcpu_count(&self) -> usize {
        self.shared.vcpus.len()
    }

    /// Fails unless no vCPU can be running (created, paused or exited).
    pub(crate) fn require_stopped(&self) -> Result<()> {
        match self.status() {
            VmStatus::Running => Err(Error::State {
                actual: "running",
                wanted: "paused",
            }),
            _ => Ok(()),
        }
    }

    /// The full state of vCPU `index`; the VM must not be running.
    pub fn vcpu_state(&self, index: usize) -> Result<VcpuState> {
        let _op = self.exclusive();
        self.require_stopped()?;
        let vcpu = self.shared.vcpu(index)?;
        VcpuState::save(&vcpu, &self.shared.msr_indices, self.shared.config.irqchip)
    }

    /// Loads the full state of vCPU `index`; the VM must not be running.
    pub fn set_vcpu_state(&self, index: usize, state: &VcpuState) -> Result<()> {
        let _op = self.exclusive();
        self.require_stopped()?;
        let vcpu = self.shared.vcpu(index)?;
        state.restore(&vcpu)
    }

    /// General-purpose and system registers of vCPU `index`; the VM must not be running.
    pub fn registers(&self, index: usize) -> Result<CpuRegisters> {
        let _op = self.exclusive();
        self.require_stopped()?;
        let vcpu = self.shared.vcpu(index)?;
        Ok(CpuRegisters {
            regs: vcpu.get_regs().kvm("KVM_GET_REGS")?,
            sregs: vcpu.get_sregs().kvm("KVM_GET_SREGS")?,
        })
    }

    /// Sets general-purpose and system registers of vCPU `index`; the VM must not be running.
    pub fn set_registers(&self, index: usize, regs: &CpuRegisters) -> Result<()> {
        let _op = self.exclusive();
        self.require_stopped()?;
        let vcpu = self.shared.vcpu(index)?;
        vcpu.set_sregs(&regs.sregs).kvm("KVM_SET_SREGS")?;
        vcpu.set_regs(&regs.regs).kvm("KVM_SET_REGS")
    }

    /// Saves every device's state.
    /// The VM's devices as a listing shows them (generation id; each virtio device's kind and
    /// host side: image, socket, tap, MAC). Unlike [`Self::device_state`] it freezes nothing.
    /// How many instructions the emulation assist completed for this VM.
    pub fn assisted_instructions(&self) -> u64 {
        self.shared
            .assisted
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn describe_devices(&self) -> serde_json::Value {
        self.shared.devices.describe()
    }

    pub fn device_state(&self) -> crate::devices::DeviceState {
        self.shared.devices.save()
    }

    /// The in-kernel irqchip and PIT state, if the VM has them; the VM must not be running.
    pub fn irqchip_state(&self) -> Result<Option<IrqchipState>> {
        let _op = self.exclusive();
        self.require_stopped()?;
        if !self.shared.config.irqchip {
            return Ok(None);
        }
        let fd = &self.shared.fd;
        let chip = |id| -> Result<kvm_bindings::kvm_irqchip> {
            let mut c = kvm_bindings::kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c).kvm("KVM_GET_IRQCHIP")?;
            Ok(c)
        };
        Ok(Some(IrqchipState {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().kvm("KVM_GET_PIT2")?,
        }))
    }

    /// Loads irqchip and PIT state saved by [`Self::irqchip_state`].
    pub fn set_irqchip_state(&self, state: &IrqchipState) -> Result<()> {
        let _op = self.exclusive();
        self.require_stopped()?;
        if !self.shared.config.irqchip {
            return Err(Error::Invalid(
                "irqchip state given for a VM without an in-kernel irqchip".into(),
            ));
        }
        let fd = &self.shared.fd;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            fd.set_irqchip(chip).kvm("KVM_SET_IRQCHIP")?;
        }
        fd.set_pit2(&state.pit).kvm("KVM_SET_PIT2")
    }

    /// The guest's kvmclock; the VM must not be running.
    pub fn clock(&self) -> Result<kvm_bindings::kvm_clock_data> {
        let _op = self.exclusive();
        self.require_stopped()?;
        self.shared.fd.get_clock().kvm("KVM_GET_CLOCK")
    }

    /// How far ahead of its saved value (ns; negative: behind) vCPU 0's TSC was right after
    /// this VM's state was loaded by its fork or restore (not remeasured by resets); 0 for a
    /// booted VM.
    /// Microseconds where KVM sets a guest's TSC; the time since the state was saved (a
    /// snapshot's age) on hosts whose KVM keeps the host's TSC (see [`crate::state::clock`]).
    pub fn tsc_jump_at_load_ns(&self) -> i64 {
        self.shared
            .tsc_jump_at_load_ns
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The frequency of the guest's TSC, in kHz: the host's (vmfork never scales it), asked of
    /// KVM once per process.
    pub fn tsc_khz(&self) -> Result<u32> {
        static KHZ: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        if let Some(&khz) = KHZ.get() {
            return Ok(khz);
        }
        let vcpu = self.shared.vcpus[0]
            .fd
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let khz = vcpu.get_tsc_khz().kvm("KVM_GET_TSC_KHZ")?;
        Ok(*KHZ.get_or_init(|| khz))
    }

    /// The whole VM state but RAM contents; the VM must not be running.
    pub fn save_state(&self) -> Result<VmState> {
        let _op = self.exclusive();
        let vcpus = (0..self.vcpu_count())
            .map(|i| self.vcpu_state(i))
            .collect::<Result<Vec<_>>>()?;
        Ok(VmState {
            vcpus,
            irqchip: self.irqchip_state()?,
            clock: Some(self.clock()?),
            devices: self.device_state(),
            memory: self.shared.ram.layout().clone(),
        })
    }

    fn kick_all(&self) {
        self.shared.kicks.kick_all();
    }

    fn lock_threads(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn join_threads(&self) {
        let handles: Vec<_> = self.lock_threads().drain(..).collect();
        for h in handles {
            let _ = h.join();
        }
        // Keep `status` reporting "exited" now the handles are gone.
        self.shared.control.finish(ExitReason::Stopped);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
        self.join_threads();
    }
}

fn vcpu_thread(shared: Arc<VmShared>, index: usize) {
    // The guest-facing thread: confined before it runs a single guest instruction.
    if let Err(e) = crate::confine::seccomp::install(crate::confine::seccomp::ThreadKind::Vcpu) {
        shared.control.finish(ExitReason::InternalError {
            detail: format!("vCPU {index} could not be confined: {e}"),
            dump: None,
        });
        shared.kicks.kick_all();
        return;
    }
    let run_ptr = {
        let mut vcpu = shared.vcpus[index]
            .fd
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        vcpu.get_kvm_run() as *mut _
    };
    let target = kick::KickTarget::register(run_ptr);
    shared.kicks.enter(index);
    loop {
        if shared.control.wait_runnable() == Want::Stop {
            break;
        }
        let mut vcpu = shared.vcpus[index]
            .fd
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let limits = vcpu::RunLimits::default();
        let event = vcpu::run_vcpu(
            index,
            &mut vcpu,
            &shared.devices,
            &shared.ram,
            &shared.control,
            shared.assist(),
            limits,
        );
        match event {
            vcpu::RunEvent::Interrupted => {}
            vcpu::RunEvent::Exit(reason) => {
                shared.control.finish(*reason);
                // The other vCPUs may sit in KVM_RUN (halted APs never exit): kick them.
                shared.kicks.kick_all();
                break;
            }
        }
    }
    shared.kicks.leave(index);
    drop(target);
    shared.control.thread_exited();
}

/// Registers every RAM region as a KVM memslot (again, to change `log_dirty`).
/// Turns KVM's software-breakpoint exits on or off for one vCPU.
pub(crate) fn set_guest_debug(vcpu: &VcpuFd, on: bool) -> Result<()> {
    let control = if on {
        kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_SW_BP
    } else {
        0
    };
    let debug = kvm_bindings::kvm_guest_debug {
        control,
        ..Default::default()
    };
    vcpu.set_guest_debug(&debug).kvm("KVM_SET_GUEST_DEBUG")
}

pub(crate) fn register_memslots(fd: &VmFd, ram: &GuestRam, log_dirty: bool) -> Result<()> {
    // RAM's mapping lives in `VmShared` next to the VM fd and is dropped
    // after the memslots are deleted or the VM closed, so KVM never sees a freed range in use.
    register_memslots_at(fd, ram.layout(), ram.mapping().as_ptr() as u64, log_dirty)
}

/// Registers memslots for `layout` with RAM at host address `base`. The range must stay mapped
/// (or reserved) while the slots exist.
pub(crate) fn register_memslots_at(
    fd: &VmFd,
    layout: &MemoryLayout,
    base: u64,
    log_dirty: bool,
) -> Result<()> {
    for (slot, region) in layout.regions.iter().enumerate() {
        let host_addr = base + region.file_offset;
        let slot = slot as u32;
        let mem = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.guest_addr,
            memory_size: region.size,
            userspace_addr: host_addr,
            flags: if log_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: the caller keeps `[base, base + layout.total())` mapped or reserved while the
        // slots exist; KVM only reaches it through vCPUs, which run only over mapped RAM.
        unsafe { fd.set_user_memory_region(mem) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
    }
    Ok(())
}

/// The first memslot of a VM with an in-kernel irqchip costs ~7 ms here (later ones ~0.1 ms):
/// add and delete a one-page slot so a pooled shell pays it before any fork needs it.
fn pay_first_memslot_cost(fd: &VmFd) -> Result<()> {
    #[repr(align(4096))]
    struct Page([u8; 4096]);
    static WARM_UP_PAGE: Page = Page([0; 4096]);
    let mut region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 4096,
        userspace_addr: WARM_UP_PAGE.0.as_ptr() as u64,
        flags: 0,
    };
    // SAFETY: no vCPU of this VM has run, and the slot is deleted before any can, so KVM never
    // touches the page; it is a static that outlives the call anyway.
    unsafe { fd.set_user_memory_region(region) }.kvm("KVM_SET_USER_MEMORY_REGION")?;
    region.memory_size = 0;
    // SAFETY: a zero-sized region deletes the slot.
    unsafe { fd.set_user_memory_region(region) }.kvm("KVM_SET_USER_MEMORY_REGION")
}

fn create_irqchip(fd: &VmFd) -> Result<()> {
    // The TSS and identity-map pages sit just below 4 GiB, inside the MMIO hole.
    fd.set_tss_address(0xfffb_d000).kvm("KVM_SET_TSS_ADDR")?;
    fd.create_irq_chip().kvm("KVM_CREATE_IRQCHIP")?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit).kvm("KVM_CREATE_PIT2")
}

/// LINT0 delivers ExtINT (the PIC), LINT1 NMI, as firmware would leave them.
fn set_lapic_lint(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0x7 << 8;
    const DELIVERY_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().kvm("KVM_GET_LAPIC")?;
    for (offset, mode) in [(APIC_LVT0, DELIVERY_EXTINT), (APIC_LVT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).kvm("KVM_SET_LAPIC")
}
