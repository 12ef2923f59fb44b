//! Ready-made VM shells and off-path teardown.
//!
//! A shell is a KVM VM fd with irqchip, vCPUs with CPUID, and a reserved host address range with
//! dirty-logged memslots already over it. Creating one costs ~0.5 ms here plus a memslot cost
//! that grows with RAM size, and closing a VM with an in-kernel irqchip ~16 ms. A fork (or a
//! restore) loads every piece of vCPU, irqchip and clock state anyway, so it can take any shell
//! of the right shape and just map its RAM into the range: a fresh shell made ahead of time by
//! the filler thread, or one recycled from a destroyed fork. Shells the pool has no room for are
//! closed on the reaper thread, never on the caller's.

use super::{create_shell, register_memslots_at, VmConfig, VmShell};
use crate::error::{KvmContext, Result};
use crate::memory::{AddressRange, MemoryLayout};
use std::collections::HashMap;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

/// Idle shells kept per shape; more are closed. (Each holds KVM's per-memslot arrays, ~2 MiB of
/// kernel memory per GiB of RAM with shadow paging.)
const MAX_IDLE_PER_SHAPE: usize = 16;
/// Shells the filler keeps ready for a shape once a fork has used it.
const DEFAULT_READY: usize = 2;

/// What makes shells interchangeable: vCPU count (CPUID depends on it), the irqchip, and the
/// RAM size the memslots are laid out for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    vcpus: u8,
    irqchip: bool,
    mem_bytes: u64,
}

impl Shape {
    fn of(config: &VmConfig) -> Self {
        Shape {
            vcpus: config.vcpus,
            irqchip: config.irqchip,
            mem_bytes: config.mem_bytes,
        }
    }

    fn config(self) -> VmConfig {
        VmConfig {
            vcpus: self.vcpus,
            irqchip: self.irqchip,
            mem_bytes: self.mem_bytes,
        }
    }
}

/// A new shell with a reserved RAM range and dirty-logged memslots over it.
fn create_pooled_shell(config: &VmConfig) -> Result<VmShell> {
    let mut shell = create_shell(config)?;
    let layout = MemoryLayout::for_size(config.mem_bytes)?;
    let len = usize::try_from(layout.total())
        .map_err(|_| crate::Error::Config("RAM size does not fit the address space".into()))?;
    let range = AddressRange::reserve(len)?;
    register_memslots_at(&shell.fd, &layout, range.as_ptr() as u64, true)?;
    shell.ram_range = Some(Arc::new(range));
    Ok(shell)
}

#[derive(Default)]
struct PoolState {
    idle: HashMap<Shape, Vec<VmShell>>,
    /// How many ready shells the filler keeps per shape.
    target: HashMap<Shape, usize>,
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
        let spawned = std::thread::Builder::new()
            .name("vmfork-reaper".into())
            .spawn(move || {
                for job in rx {
                    drop(job);
                    let pool = pool();
                    pool.lock().busy -= 1;
                    pool.changed.notify_all();
                }
            });
        // Without helper threads the pool still works: shells are made on demand, teardown
        // falls back to the caller's thread (see `reap`) and `keep_ready` reports the failure.
        let filler_running = std::thread::Builder::new()
            .name("vmfork-pool".into())
            .spawn(fill_forever)
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

/// The filler thread: tops every shape up to its target.
fn fill_forever() {
    let pool = pool();
    loop {
        let shape = {
            let mut state = pool.lock();
            loop {
                let short = state.target.iter().find_map(|(shape, &want)| {
                    let have = state.idle.get(shape).map_or(0, Vec::len);
                    (have < want).then_some(*shape)
                });
                if let Some(shape) = short {
                    state.busy += 1;
                    break shape;
                }
                state = pool.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        let made = create_pooled_shell(&shape.config());
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

/// A shell for a VM that loads its whole state (fork, restore): a ready one if the pool has
/// one, else a new one. `fresh` skips the pool (to measure what it saves).
pub(crate) fn take_shell(config: &VmConfig, fresh: bool) -> Result<VmShell> {
    if fresh {
        return create_shell(config);
    }
    config.validate()?;
    let shape = Shape::of(config);
    let pool = pool();
    let taken = {
        let mut state = pool.lock();
        let target = state.target.entry(shape).or_insert(0);
        *target = (*target).max(DEFAULT_READY);
        state.idle.get_mut(&shape).and_then(Vec::pop)
    };
    pool.changed.notify_all();
    match taken {
        Some(shell) => Ok(shell),
        None => create_pooled_shell(config),
    }
}

/// Takes back the shell of a destroyed fork, its RAM range already released: forgets the dirty
/// log of the old RAM and keeps the shell for the next fork, or closes it on the reaper thread
/// when the pool is full.
pub(crate) fn recycle(shell: VmShell, config: &VmConfig) {
    let clean = forget_dirty_log(&shell, config).is_ok();
    for slot in &shell.vcpus {
        // A kick may have left `immediate_exit` set; the next VM must not see it.
        let mut vcpu = slot.fd.lock().unwrap_or_else(|p| p.into_inner());
        vcpu.set_kvm_immediate_exit(0);
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
    reap(Box::new(shell));
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
}
