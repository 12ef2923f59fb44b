//! Ready-made VM shells and off-path teardown.
//!
//! A shell is a KVM VM fd with irqchip, vCPUs with CPUID, and a reserved host address range with
//! dirty-logged memslots already over it. Creating one costs ~0.5 ms here plus a memslot cost
//! that grows with RAM size, and closing a VM with an in-kernel irqchip ~16 ms. A fork (or a
//! restore) loads every piece of vCPU, irqchip and clock state anyway, so it can take any shell
//! of the right shape and just map its RAM into the range: a fresh shell made ahead of time by
//! the filler thread, or one recycled from a destroyed fork. Shells the pool has no room for are
//! closed on the reaper thread, never on the caller's.
//!
//! Mapping RAM over a whole range costs time that grows with its size (KVM invalidates the
//! memslot), so shells keep RAM mapped: a recycled shell keeps its last fork's mapping, and the
//! filler maps the base file of the family most recently forked into new shells. A fork that
//! finds its family's base there fixes up only the pages that differ. Mappings whose family is
//! gone are dropped by the filler thread.

use super::{create_shell, ShellMemory, VmConfig, VmShell};
use crate::error::{KvmContext, Result};
use crate::memory::{AddressRange, FileId, MemoryLayout, ResidentRam};
use std::collections::HashMap;
use std::fs::File;
use std::sync::mpsc::{channel, Sender};
use std::sync::Weak;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Idle shells kept per shape; more are closed. (Each holds KVM's per-memslot arrays, ~2 MiB of
/// kernel memory per GiB of RAM with shadow paging.)
const MAX_IDLE_PER_SHAPE: usize = 16;
/// Shells the filler keeps ready for a shape once a fork has used it.
const DEFAULT_READY: usize = 2;
/// Threads closing VMs off the callers' paths.
const REAPERS: usize = 8;
/// How often the filler looks for idle shells still mapping RAM of a family that is gone.
const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// What makes shells interchangeable: vCPU count and hidden CPU features (CPUID depends on
/// them), the irqchip, and the RAM size the memslots are laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    vcpus: u8,
    irqchip: bool,
    mem_bytes: u64,
    hidden_cpu_features: u32,
}

impl Shape {
    fn of(config: &VmConfig) -> Self {
        Shape {
            vcpus: config.vcpus,
            irqchip: config.irqchip,
            mem_bytes: config.mem_bytes,
            hidden_cpu_features: crate::boot::CpuFeature::mask(&config.hide_cpu_features),
        }
    }

    fn config(self) -> VmConfig {
        VmConfig {
            vcpus: self.vcpus,
            irqchip: self.irqchip,
            mem_bytes: self.mem_bytes,
            disks: Vec::new(),
            vsock: None,
            net: None,
            emulation_assist: false,
            hide_cpu_features: crate::boot::CpuFeature::ALL
                .into_iter()
                .filter(|f| self.hidden_cpu_features & (1 << *f as u32) != 0)
                .collect(),
        }
    }
}

/// A new shell with a reserved RAM range and dirty-logged memslots over it, with `base` mapped
/// there when given.
fn create_pooled_shell(config: &VmConfig, base: Option<&Arc<File>>) -> Result<VmShell> {
    let layout = MemoryLayout::for_size(config.mem_bytes)?;
    let len = usize::try_from(layout.total())
        .map_err(|_| crate::Error::Config("RAM size does not fit the address space".into()))?;
    let range = AddressRange::reserve(len)?;
    let memory = ShellMemory {
        layout: &layout,
        base: range.as_ptr() as u64,
        log_dirty: true,
    };
    let mut shell = create_shell(config, Some(memory))?;
    let range = Arc::new(range);
    if let Some(base) = base {
        shell.resident = Some(ResidentRam::premap(&range, base)?);
    }
    shell.ram_range = Some(range);
    Ok(shell)
}

#[derive(Default)]
struct PoolState {
    idle: HashMap<Shape, Vec<VmShell>>,
    /// How many ready shells the filler keeps per shape.
    target: HashMap<Shape, usize>,
    /// The base file of the family forked last, per shape: what the filler maps into new shells.
    recent_base: HashMap<Shape, Weak<File>>,
    /// Teardown jobs queued or running, and filler work in progress.
    busy: usize,
}

struct Pool {
    state: Mutex<PoolState>,
    /// Signalled when the filler has work or when `busy` drops.
    changed: Condvar,
    reaper: Mutex<Sender<Box<dyn Send>>>,
    filler_running: bool,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = channel::<Box<dyn Send>>();
        // Closing a VM with an in-kernel PIT is ~16 ms of waiting for the kernel, so several
        // reapers close VMs side by side (1,000 closes would take 16 s on one).
        let rx = Arc::new(Mutex::new(rx));
        let mut spawned = Vec::new();
        for i in 0..REAPERS {
            let rx = Arc::clone(&rx);
            spawned.push(
                std::thread::Builder::new()
                    .name(format!("vmfork-reaper{i}"))
                    .spawn(move || {
                        crate::confine::seccomp::confine_vmm_thread();
                        background_priority();
                        loop {
                            let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                            let Ok(job) = job else { return };
                            drop(job);
                            let pool = pool();
                            pool.lock().busy -= 1;
                            pool.changed.notify_all();
                        }
                    }),
            );
        }
        // Without helper threads the pool still works: shells are made on demand, teardown
        // falls back to the caller's thread (see `reap`) and `keep_ready` reports the failure.
        let filler_running = std::thread::Builder::new()
            .name("vmfork-pool".into())
            .spawn(|| {
                crate::confine::seccomp::confine_vmm_thread();
                fill_forever()
            })
            .is_ok();
        drop(spawned);
        Pool {
            state: Mutex::new(PoolState::default()),
            changed: Condvar::new(),
            reaper: Mutex::new(tx),
            filler_running,
        }
    })
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is counters and vectors updated in single statements: safe after a panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The filler thread: tops every shape up to its target, and drops RAM mappings of families
/// that are gone from idle shells.
fn fill_forever() {
    background_priority();
    let pool = pool();
    loop {
        let (shape, base) = {
            let mut state = pool.lock();
            loop {
                let short = state.target.iter().find_map(|(shape, &want)| {
                    let have = state.idle.get(shape).map_or(0, Vec::len);
                    (have < want).then_some(*shape)
                });
                if let Some(shape) = short {
                    state.busy += 1;
                    let base = state.recent_base.get(&shape).and_then(Weak::upgrade);
                    break (shape, base);
                }
                state = pool
                    .changed
                    .wait_timeout(state, SWEEP_INTERVAL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                let mut orphaned = take_shells_with_orphaned_ram(&mut state);
                if !orphaned.is_empty() {
                    // Out of the pool (and counted busy) while their RAM is unmapped, so no
                    // fork can map its own RAM into the range meanwhile.
                    state.busy += 1;
                    drop(state);
                    for (_, shell) in &mut orphaned {
                        shell.resident = None;
                    }
                    state = pool.lock();
                    state.busy -= 1;
                    for (shape, shell) in orphaned {
                        state.idle.entry(shape).or_default().push(shell);
                    }
                    pool.changed.notify_all();
                }
            }
        };
        let made = create_pooled_shell(&shape.config(), base.as_ref());
        drop(base);
        let mut state = pool.lock();
        state.busy -= 1;
        match made {
            Ok(shell) => state.idle.entry(shape).or_default().push(shell),
            // Creation failing (out of fds, memory): stop trying for this shape.
            Err(_) => {
                state.target.remove(&shape);
            }
        }
        drop(state);
        pool.changed.notify_all();
    }
}

/// Takes out of the pool the idle shells holding RAM of families nobody uses any more, for the
/// caller to unmap (their pages would stay allocated otherwise) outside the pool lock.
fn take_shells_with_orphaned_ram(state: &mut PoolState) -> Vec<(Shape, VmShell)> {
    state.recent_base.retain(|_, base| base.strong_count() > 0);
    take_shells_mapping(state, &ResidentRam::is_orphaned)
}

fn take_shells_mapping(
    state: &mut PoolState,
    test: &dyn Fn(&ResidentRam) -> bool,
) -> Vec<(Shape, VmShell)> {
    let mut taken = Vec::new();
    for (shape, idle) in &mut state.idle {
        let mut i = 0;
        while i < idle.len() {
            if idle[i].resident.as_ref().is_some_and(test) {
                taken.push((*shape, idle.swap_remove(i)));
            } else {
                i += 1;
            }
        }
    }
    taken
}

/// A shell for a VM that loads its whole state (fork, restore) from an image on `base`: a
/// ready one if the pool has one (preferably one that already maps `base`), else a new one.
/// `fresh` skips the pool (to measure what it saves).
pub(crate) fn take_shell(
    config: &VmConfig,
    fresh: bool,
    base: Option<&Arc<File>>,
) -> Result<VmShell> {
    if fresh {
        return create_shell(config, None);
    }
    config.validate()?;
    let shape = Shape::of(config);
    let pool = pool();
    let taken = {
        let mut state = pool.lock();
        let target = state.target.entry(shape).or_insert(0);
        *target = (*target).max(DEFAULT_READY);
        if let Some(base) = base {
            state.recent_base.insert(shape, Arc::downgrade(base));
        }
        state
            .idle
            .get_mut(&shape)
            .and_then(|idle| {
                let mapping = |test: &dyn Fn(&ResidentRam) -> bool| {
                    idle.iter()
                        .rposition(|shell| shell.resident.as_ref().is_some_and(test))
                };
                // This very open of the base first; another open of its file costs an fstat.
                let mapping_base = base.and_then(|b| {
                    mapping(&|r| r.maps_open(b)).or_else(|| {
                        let id = FileId::of(b);
                        mapping(&|r| r.maps_file(id))
                    })
                });
                let empty = || idle.iter().rposition(|shell| shell.resident.is_none());
                let at = mapping_base.or_else(empty)?;
                Some(idle.swap_remove(at))
            })
            .or_else(|| state.idle.get_mut(&shape).and_then(Vec::pop))
    };
    pool.changed.notify_all();
    match taken {
        Some(shell) => Ok(shell),
        None => create_pooled_shell(config, None),
    }
}

/// Makes idle shells forget their mappings of `base` and stops premapping it: its owner is
/// about to write it again (a fold), and a mapping made before would not follow.
pub(crate) fn forget_base(base: &Arc<File>) {
    let pool = pool();
    let mut state = pool.lock();
    state
        .recent_base
        .retain(|_, b| !std::ptr::eq(b.as_ptr(), Arc::as_ptr(base)));
    let mut taken = take_shells_mapping(&mut state, &|r| r.maps_open(base));
    if taken.is_empty() {
        return;
    }
    state.busy += 1;
    drop(state);
    for (_, shell) in &mut taken {
        shell.resident = None;
    }
    let mut state = pool.lock();
    state.busy -= 1;
    for (shape, shell) in taken {
        state.idle.entry(shape).or_default().push(shell);
    }
    drop(state);
    pool.changed.notify_all();
}

/// Takes back the shell of a destroyed fork, its RAM either left mapped ([`ResidentRam`]) or
/// released: forgets the dirty log of the old RAM and keeps the shell for the next fork, or
/// closes it on the reaper thread when the pool is full.
pub(crate) fn recycle(shell: VmShell, config: &VmConfig) {
    // A shell keeping its RAM mapped had its dirty log read (and so cleared) already.
    let clean = shell.resident.is_some() || forget_dirty_log(&shell, config).is_ok();
    for slot in &shell.vcpus {
        // A kick may have left `immediate_exit` set; the next VM must not see it.
        let mut vcpu = slot.fd.lock().unwrap_or_else(|p| p.into_inner());
        vcpu.set_kvm_immediate_exit(0);
        // Register copies at exit were asked for by the VM that used the shell.
        for reg in [
            kvm_ioctls::SyncReg::Register,
            kvm_ioctls::SyncReg::SystemRegister,
            kvm_ioctls::SyncReg::VcpuEvents,
        ] {
            vcpu.clear_sync_valid_reg(reg);
            vcpu.clear_sync_dirty_reg(reg);
        }
        slot.exit_synced
            .store(false, std::sync::atomic::Ordering::Release);
        // Breakpoint exits belong to the VM that asked for them.
        if slot
            .guest_debug
            .swap(false, std::sync::atomic::Ordering::Relaxed)
            && super::set_guest_debug(&vcpu, false).is_err()
        {
            drop(vcpu);
            close(shell);
            return;
        }
    }
    let shape = Shape::of(config);
    if clean {
        let mut state = pool().lock();
        let keep = state
            .target
            .get(&shape)
            .copied()
            .unwrap_or(0)
            .max(MAX_IDLE_PER_SHAPE);
        let idle = state.idle.entry(shape).or_default();
        if idle.len() < keep {
            idle.push(shell);
            return;
        }
    }
    close(shell);
}

fn forget_dirty_log(shell: &VmShell, config: &VmConfig) -> Result<()> {
    let layout = MemoryLayout::for_size(config.mem_bytes)?;
    for (slot, region) in layout.regions.iter().enumerate() {
        shell
            .fd
            .get_dirty_log(slot as u32, region.size as usize)
            .kvm("KVM_GET_DIRTY_LOG")?;
    }
    Ok(())
}

/// A shell to close on the reaper thread. The VM it served hands it over from its drop and
/// drops its own handle on the VM fd just after: closing waits a moment for that, so the VM is
/// closed here and not on the VM owner's thread (~16 ms with an in-kernel PIT).
struct ClosingShell(VmShell);

impl Drop for ClosingShell {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + Duration::from_millis(100);
        while Arc::strong_count(&self.0.fd) > 1 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
    }
}

/// Lowers the calling thread's scheduling priority (nice 10): for the workers that never hold a
/// VM paused (reapers, the filler), so that on a busy host they yield to vCPU threads and to
/// the thread holding a VM at its instant. (Workers that pause VMs, such as layer adoption and
/// folding, keep normal priority: preempted while a VM waits, they would lengthen its pause.)
fn background_priority() {
    // SAFETY: gettid and setpriority read no memory; on Linux the nice value is per thread,
    // and this only lowers this thread's own priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
}

/// Closes `shell` on the reaper thread.
pub(crate) fn close(shell: VmShell) {
    reap(Box::new(ClosingShell(shell)));
}

/// Drops `job` on the reaper thread.
pub(crate) fn reap(job: Box<dyn Send>) {
    let pool = pool();
    pool.lock().busy += 1;
    let sender = pool.reaper.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(returned) = sender.send(job) {
        drop(sender);
        // No reaper thread: tear down here.
        drop(returned.0);
        pool.lock().busy -= 1;
        pool.changed.notify_all();
    }
}

/// Keeps `count` ready shells for VMs shaped like `config` (vCPUs, irqchip) and waits until
/// they are made. `0` stops refilling; idle shells stay until [`drain`].
pub fn keep_ready(config: &VmConfig, count: usize) -> Result<()> {
    config.validate()?;
    let shape = Shape::of(config);
    let pool = pool();
    if !pool.filler_running {
        return Err(crate::Error::Io(std::io::Error::other(
            "the shell pool's filler thread could not be started",
        )));
    }
    pool.lock().target.insert(shape, count);
    pool.changed.notify_all();
    let mut state = pool.lock();
    while state
        .target
        .get(&shape)
        .is_some_and(|&want| state.idle.get(&shape).map_or(0, Vec::len) < want)
    {
        state = pool.changed.wait(state).unwrap_or_else(|p| p.into_inner());
    }
    Ok(())
}

/// Idle shells per shape, as `(vcpus, irqchip, mem_bytes, count)`.
pub fn idle_shells() -> Vec<(u8, bool, u64, usize)> {
    let state = pool().lock();
    state
        .idle
        .iter()
        .map(|(s, v)| (s.vcpus, s.irqchip, s.mem_bytes, v.len()))
        .collect()
}

/// Closes every idle shell, stops refilling, and waits until all teardown has finished: after
/// it, every destroyed VM's file descriptors are closed.
pub fn drain() {
    let pool = pool();
    loop {
        let idle: Vec<VmShell> = {
            let mut state = pool.lock();
            state.target.clear();
            state.idle.drain().flat_map(|(_, v)| v).collect()
        };
        for shell in idle {
            reap(Box::new(shell));
        }
        let mut state = pool.lock();
        while state.busy > 0 {
            state = pool.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        // Work that held shells out of the pool meanwhile (unmapping a gone family's RAM,
        // forgetting a folded file) puts them back when done: drain those too.
        if state.idle.values().all(Vec::is_empty) {
            return;
        }
    }
}
