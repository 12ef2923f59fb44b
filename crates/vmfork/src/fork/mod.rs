//! Fork, fork of a fork, and fork reset.
//!
//! A fork's RAM is a copy-on-write view of a [`FrozenImage`]: reads share the parent's pages as
//! they were at the fork instant, writes copy. The first fork of a VM freezes its RAM file in
//! place (the parent goes on with a private mapping of it); forking a fork adds the pages that
//! fork had dirtied to an overlay, so the cost grows with dirtied pages, not with RAM. Reset
//! copies back only the pages a fork dirtied (KVM's dirty log plus the VMM's own writes) and
//! reloads the vCPU, irqchip, clock and device state saved at the fork instant.

mod adopt;
mod fold;
mod freeze;
mod quick_reset;

use crate::devices::{Devices, IrqLines, SerialSink};
use crate::error::{Error, KvmContext, Result};
use crate::memory::{FrozenImage, GuestRam, MemoryTracking, PAGE_SIZE};
use crate::state::VmState;
use crate::vm::{pool::take_shell, ForkOrigin, ForkSource, Vm, VmParts, VmStatus};
use std::sync::{Arc, MutexGuard};

/// How to fork.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForkOptions {
    /// Leave the parent paused after the fork (Xen's behaviour); by default a running parent
    /// resumes at once.
    pub pause_parent: bool,
    /// vCPUs and memory only: no device models (the exit port stays). For fuzzing and
    /// introspection; [`Vm::attach_devices`] adds them later with the state of the fork instant.
    pub no_devices: bool,
    /// No interrupts are injected into the fork: its serial IRQ line is not wired, and it starts
    /// (and resets) with the PIC, IOAPIC and local APIC LVT entries masked, so neither timers
    /// nor devices interrupt it. A guest that reprograms its interrupt controllers can unmask
    /// them again.
    pub block_interrupts: bool,
    /// Create a new KVM VM for the child instead of taking a ready one from the shell pool
    /// ([`crate::vm::pool`]); for measuring what the pool saves.
    pub fresh_shell: bool,
    /// Turn the emulation assist on in the new VM (see `VmConfig::emulation_assist`): for
    /// restores, as a snapshot does not record it (it is the host's need, not the VM's); a
    /// fork always has its parent's.
    pub emulation_assist: bool,
    /// The tap and vsock socket the new VM takes instead of the per-clone names (one VM per
    /// rewiring: two would share them).
    pub rewiring: crate::devices::Rewiring,
}

/// What a reset puts back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResetScope {
    /// Memory and vCPU/irqchip/clock/device state.
    #[default]
    All,
    /// Only the pages the fork dirtied.
    MemoryOnly,
    /// Only vCPU, irqchip, clock and device state.
    StateOnly,
}

/// What a reset did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Pages copied back from the fork image.
    pub pages_restored: usize,
    /// Only what a CPL3-confined guest can change was restored ([`Vm::reset_quick`]).
    pub quick: bool,
}

impl Vm {
    /// Forks this VM (running, paused, or never started) into a new VM that is not started yet.
    /// Its serial console goes to an in-memory buffer ([`Vm::serial`]).
    pub fn fork(&self, opts: &ForkOptions) -> Result<Vm> {
        let (sink, _) = SerialSink::buffer();
        Ok(self.fork_many(opts, vec![sink])?.remove(0))
    }

    /// Forks `sinks.len()` children at one instant (one pause, one freeze), each child printing
    /// to its sink.
    pub fn fork_many(&self, opts: &ForkOptions, sinks: Vec<SerialSink>) -> Result<Vec<Vm>> {
        if sinks.len() > 1 && !opts.rewiring.is_empty() {
            return Err(Error::Invalid(format!(
                "{} children cannot share one rewiring's tap and vsock socket",
                sinks.len()
            )));
        }
        // Pre-copy, pause, save, freeze and resume as one operation: no other client's pause,
        // resume or reset can land in between (and be undone, or tear the child).
        let (state, image) =
            self.at_one_instant(opts.pause_parent, |image| Ok((self.save_state()?, image)))?;
        // The children are built after the parent runs again: the pause holds only the instant.
        sinks
            .into_iter()
            .map(|sink| {
                let origin = ForkOrigin::new(&state, &image, ForkSource::Vm(self.id()), opts);
                Vm::from_image(self.config(), origin, sink, opts)
            })
            .collect()
    }

    /// A new VM (not started) whose RAM is a copy-on-write view of the origin's image and whose
    /// vCPUs, irqchip, clock and devices are loaded from its state: a fork, or a restore (a fork
    /// of a snapshot's image). Of `opts`, all but `pause_parent` apply.
    pub(crate) fn from_image(
        config: &crate::vm::VmConfig,
        origin: ForkOrigin,
        sink: SerialSink,
        opts: &ForkOptions,
    ) -> Result<Vm> {
        let image = Arc::clone(&origin.image);
        let image_base = &Arc::clone(image.base());
        let mut shell = take_shell(config, opts.fresh_shell, Some(image.base()))?;
        let irqs = if opts.block_interrupts {
            IrqLines::none()
        } else {
            shell.irq_lines()?
        };
        let serial = match &sink {
            SerialSink::Buffer(b) => Some(b.clone()),
            _ => None,
        };
        // A new instance of the VM: a new generation id, kept by its resets.
        let mut origin = origin;
        origin.state.devices.generation.new_generation()?;
        // Rewired endpoints go into the state it is built from and resets to.
        opts.rewiring.apply(&mut origin.state.devices)?;
        let saved = &origin.state.devices;
        let devices = if opts.no_devices {
            Devices::detached(saved.clone(), &irqs, &opts.rewiring)?
        } else {
            Devices::from_state(saved, sink, &irqs, &opts.rewiring)?
        };
        let ram = GuestRam::from_image(&image, shell.ram_range.as_ref(), shell.resident.take())?;
        let vm = Vm::assemble(VmParts {
            shell,
            ram,
            devices,
            config: config.clone(),
            serial,
            image: Some(image),
            origin: Some(origin),
        })?;
        if let Some(origin) = &vm.shared().origin {
            vm.load_saved_state(&origin.state, true)?;
            // Not on resets: their path stays free of extra ioctls (fuzzing resets thousands of
            // times a second).
            vm.measure_tsc_jump(&origin.state)?;
        }
        // After the irqchip's state is in: the line raised now reaches the guest.
        vm.shared().devices.announce();
        // Stopped if the snapshot file its image maps is truncated or written under it.
        let listener: std::sync::Weak<dyn crate::memory::file_guard::DamageListener> =
            vm.shared_weak();
        crate::memory::file_guard::listen(image_base, listener);
        Ok(vm)
    }

    pub(crate) fn tracking(&self) -> MutexGuard<'_, MemoryTracking> {
        self.shared()
            .tracking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Loads saved vCPU, irqchip, clock and (optionally) device state.
    fn load_saved_state(&self, state: &VmState, with_cpuid: bool) -> Result<()> {
        let shared = self.shared();
        if state.vcpus.len() != self.vcpu_count() {
            return Err(Error::Invalid(format!(
                "state has {} vCPUs, the VM {}",
                state.vcpus.len(),
                self.vcpu_count()
            )));
        }
        for (i, vcpu_state) in state.vcpus.iter().enumerate() {
            let slot = shared.vcpus[i].fd.lock().unwrap_or_else(|p| p.into_inner());
            shared.vcpus[i]
                .exit_synced
                .store(false, std::sync::atomic::Ordering::Release);
            if with_cpuid {
                vcpu_state.restore(&slot)?;
            } else {
                vcpu_state.restore_without_cpuid(&slot)?;
            }
        }
        if let Some(irqchip) = &state.irqchip {
            self.set_irqchip_state(irqchip)?;
        }
        if let Some(clock) = &state.clock {
            let clock = kvm_bindings::kvm_clock_data {
                clock: clock.clock,
                ..Default::default()
            };
            shared.fd.set_clock(&clock).kvm("KVM_SET_CLOCK")?;
        }
        Ok(())
    }

    /// Measures how far vCPU 0's TSC is from its saved TSC now that a fork's or restore's state
    /// is loaded (see [`crate::state::clock`]), for [`Vm::tsc_jump_at_load_ns`].
    fn measure_tsc_jump(&self, state: &VmState) -> Result<()> {
        use crate::state::clock::{tsc_jump_ns, IA32_TSC};
        let Some(saved_tsc) = state.vcpus.first().and_then(|v| v.msr(IA32_TSC)) else {
            return Ok(());
        };
        let tsc_now = {
            let vcpu = self.shared().vcpus[0]
                .fd
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            crate::state::vcpu::read_msr(&vcpu, IA32_TSC)?
        };
        let jump = tsc_jump_ns(saved_tsc, tsc_now, self.tsc_khz()?);
        self.shared()
            .tsc_jump_at_load_ns
            .store(jump, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether this VM is a fork or was restored from a snapshot (and so can be reset).
    pub fn is_fork(&self) -> bool {
        self.shared().origin.is_some()
    }

    /// The id of the VM this one was forked from.
    pub fn parent_id(&self) -> Option<u64> {
        match self.shared().origin.as_ref()?.source {
            ForkSource::Vm(id) => Some(id),
            ForkSource::Snapshot(_) => None,
        }
    }

    /// The id of the snapshot this VM was restored from.
    pub fn restored_from(&self) -> Option<&str> {
        match &self.shared().origin.as_ref()?.source {
            ForkSource::Snapshot(id) => Some(id),
            ForkSource::Vm(_) => None,
        }
    }

    /// Puts a fork back to the instant it was forked (a restored VM: to its snapshot),
    /// touching only what it dirtied. The VM must not be running.
    pub fn reset(&self) -> Result<ResetStats> {
        self.reset_with(ResetScope::All)
    }

    /// Where this fork came from; an error for a VM that is not a fork.
    pub(crate) fn origin(&self) -> Result<&ForkOrigin> {
        self.shared()
            .origin
            .as_ref()
            .ok_or(Error::NotAFork(self.id()))
    }

    /// [`Self::reset`] limited to memory or to state.
    pub fn reset_with(&self, scope: ResetScope) -> Result<ResetStats> {
        let _op = self.exclusive();
        let origin = self.origin()?;
        self.require_stopped()?;
        if self.exit_reason().is_some() {
            self.rearm();
        }
        let mut stats = ResetStats::default();
        let _quiet = self.shared().devices.quiesce();
        if scope != ResetScope::StateOnly {
            stats = self.restore_dirty_pages(origin, None)?.0;
        }
        if scope != ResetScope::MemoryOnly {
            self.load_saved_state(&origin.state, false)?;
            self.shared().devices.load_state(&origin.state.devices)?;
        }
        Ok(stats)
    }

    /// Copies back from the origin's image every page dirtied since the fork instant; also says
    /// whether the page at RAM file offset `watch` was one of them.
    fn restore_dirty_pages(
        &self,
        origin: &ForkOrigin,
        watch: Option<u64>,
    ) -> Result<(ResetStats, bool)> {
        let mut stats = ResetStats::default();
        let mut tracking = self.tracking();
        self.shared().collect_dirty(&mut tracking)?;
        let mapping = self.shared().ram.mapping();
        let mut watched = false;
        for offset in tracking.since_origin.offsets() {
            origin.image.copy_page_to(mapping, offset)?;
            stats.pages_restored += 1;
            watched |= Some(offset) == watch;
        }
        // The RAM is the origin's image again: the next generation builds on it.
        tracking.since_origin.clear();
        tracking.since_image.clear();
        tracking.image = Some(Arc::clone(&origin.image));
        Ok((stats, watched))
    }

    /// Rewrites bytes of the image this fork resets to, in place, and in the fork's own RAM:
    /// every VM sharing that image sees them, and a reset keeps them. Only bytes a parent wrote
    /// after its own fork or restore can be rewritten (they live in a layer vmfork owns; a base
    /// file may be a snapshot on disk or a running root VM's RAM). Coverage breakpoints use it
    /// to take a breakpoint out once for every fork at once.
    pub fn rewrite_origin(&self, addr: u64, data: &[u8]) -> Result<()> {
        let _op = self.exclusive();
        let origin = self.origin()?;
        let layout = self.ram().layout();
        let offset = layout.file_offset(addr).filter(|_| {
            layout.contains(addr, data.len() as u64)
                && (addr % PAGE_SIZE) + data.len() as u64 <= PAGE_SIZE
        });
        let Some(offset) = offset else {
            return Err(Error::Invalid(format!(
                "{} bytes at {addr:#x} are not inside one page of guest RAM",
                data.len()
            )));
        };
        let run = origin.image.run_at(offset).ok_or_else(|| {
            Error::Invalid(format!(
                "guest-physical {addr:#x} is in the base of this fork's image, which vmfork may not \
                 rewrite: write the bytes in the parent and fork again"
            ))
        })?;
        std::os::unix::fs::FileExt::write_all_at(run.layer.file().as_ref(), data, offset)
            .map_err(|e| Error::Memory(format!("rewrite a layer page: {e}")))?;
        // The fork holds its own copy of the page if it wrote it (or the image was copied into
        // it): make that copy agree too.
        let mut current = vec![0u8; data.len()];
        self.ram().read(addr, &mut current)?;
        if current != data {
            self.ram().write(addr, data)?;
        }
        Ok(())
    }

    /// Gives a `no_devices` fork its device models, with their state as of the fork instant.
    pub fn attach_devices(&self, sink: SerialSink) -> Result<()> {
        let _op = self.exclusive();
        self.shared().devices.attach(sink)
    }

    /// Bytes of RAM this VM holds privately: pages it wrote since its last image (its fork
    /// instant, or its own last fork or snapshot). Layers are shared by every image after them.
    pub fn private_memory_bytes(&self) -> Result<u64> {
        let _op = self.exclusive();
        let mut tracking = self.tracking();
        if tracking.image.is_none() {
            return Ok(self.ram().size());
        }
        if self.status() != VmStatus::Running {
            self.shared().collect_dirty(&mut tracking)?;
        }
        Ok(tracking.since_image.count() as u64 * PAGE_SIZE)
    }
}

impl ForkOrigin {
    /// `state` and `image` as a fork made with `opts` starts from (and resets to): with every
    /// interrupt line masked when it blocks interrupts.
    pub(crate) fn new(
        state: &VmState,
        image: &Arc<FrozenImage>,
        source: ForkSource,
        opts: &ForkOptions,
    ) -> Self {
        Self {
            state: if opts.block_interrupts {
                state.with_interrupts_masked()
            } else {
                state.clone()
            },
            image: Arc::clone(image),
            source,
            ring0_unreachable: quick_reset::ring0_unreachable(state, opts.block_interrupts),
            gdt_page: std::sync::OnceLock::new(),
        }
    }
}
