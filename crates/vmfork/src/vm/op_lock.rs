//! One operation at a time per VM: fork, snapshot freeze, reset, pause, resume, start and state
//! or memory access hold this lock, so no two of them interleave (a fork never sees registers
//! and memory from different instants, a reset never waits on a vCPU another client resumed).
//!
//! It is reentrant: a public operation that calls another (fork pauses, then resumes) takes it
//! again on the same thread without deadlocking.

use std::sync::{Condvar, Mutex};
use std::thread::{self, ThreadId};

#[derive(Debug, Default)]
struct Owner {
    thread: Option<ThreadId>,
    depth: usize,
}

/// A reentrant lock with no data: what it guards is the VM's run state and vCPU/memory state.
#[derive(Debug, Default)]
pub(crate) struct OpLock {
    owner: Mutex<Owner>,
    released: Condvar,
}

/// Held while an operation runs on a VM ([`super::Vm::exclusive`]); dropping it lets the next
/// one in.
#[must_use]
pub struct OpGuard<'a> {
    lock: &'a OpLock,
}

impl OpLock {
    /// Waits until no other thread runs an operation on this VM, then holds the lock.
    pub(crate) fn lock(&self) -> OpGuard<'_> {
        let me = thread::current().id();
        let mut owner = self.owner.lock().unwrap_or_else(|p| p.into_inner());
        while owner.thread.is_some_and(|t| t != me) {
            owner = self.released.wait(owner).unwrap_or_else(|p| p.into_inner());
        }
        owner.thread = Some(me);
        owner.depth += 1;
        OpGuard { lock: self }
    }
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        let mut owner = self.lock.owner.lock().unwrap_or_else(|p| p.into_inner());
        owner.depth -= 1;
        if owner.depth == 0 {
            owner.thread = None;
            self.lock.released.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn reentrant_on_one_thread_exclusive_across_threads() {
        let lock = Arc::new(OpLock::default());
        let outer = lock.lock();
        let inner = lock.lock();
        let inside = Arc::new(AtomicUsize::new(0));
        let (l, i) = (Arc::clone(&lock), Arc::clone(&inside));
        let other = thread::spawn(move || {
            let _g = l.lock();
            i.store(1, Ordering::SeqCst);
        });
        drop(inner);
        thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(
            inside.load(Ordering::SeqCst),
            0,
            "held by the outer guard still"
        );
        drop(outer);
        other.join().unwrap();
        assert_eq!(inside.load(Ordering::SeqCst), 1);
    }
}
