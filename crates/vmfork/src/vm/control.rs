//! The run state shared by a VM's controller and its vCPU threads: run, pause, stop, and the
//! reason the VM stopped.

use super::exit::ExitReason;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the controller wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
struct State {
    want: Want,
    /// vCPU threads parked in `wait_runnable`.
    parked: usize,
    /// vCPU threads still alive.
    alive: usize,
    exit: Option<ExitReason>,
}

/// Shared run control; vCPU threads poll `should_run` before every KVM_RUN.
#[derive(Debug)]
pub struct RunControl {
    state: Mutex<State>,
    changed: Condvar,
    run: AtomicBool,
    /// The vCPUs were let run since [`Self::take_ran`] last said no: the guest may have written
    /// memory, so its dirty log is worth reading.
    ran: AtomicBool,
}

impl RunControl {
    pub fn new() -> Self {
        Self {
            state: Mutex::new(State {
                want: Want::Pause,
                parked: 0,
                alive: 0,
                exit: None,
            }),
            changed: Condvar::new(),
            run: AtomicBool::new(false),
            ran: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cheap check made before every KVM_RUN.
    pub fn should_run(&self) -> bool {
        self.run.load(Ordering::Acquire)
    }

    pub fn want(&self) -> Want {
        self.lock().want
    }

    /// vCPU threads still alive (0 for a VM never started, or run inline on its caller).
    pub fn alive(&self) -> usize {
        self.lock().alive
    }

    pub fn set_want(&self, want: Want) {
        let mut s = self.lock();
        if s.want == Want::Stop {
            return;
        }
        s.want = want;
        if want == Want::Run {
            self.ran.store(true, Ordering::Release);
        }
        self.run.store(want == Want::Run, Ordering::Release);
        self.changed.notify_all();
    }

    /// Whether the vCPUs may have run since the last call. While any vCPU thread is not parked
    /// (or the VM wants to run) the answer is always yes.
    pub fn take_ran(&self) -> bool {
        let s = self.lock();
        if s.want == Want::Run || s.alive > s.parked {
            return true;
        }
        self.ran.swap(false, Ordering::AcqRel)
    }

    /// Records why the VM stopped (the first reason wins) and tells every vCPU to stop.
    pub fn finish(&self, reason: ExitReason) {
        let mut s = self.lock();
        if s.exit.is_none() {
            s.exit = Some(reason);
        }
        s.want = Want::Stop;
        self.run.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    pub fn thread_started(&self) {
        self.lock().alive += 1;
    }

    pub fn thread_exited(&self) {
        let mut s = self.lock();
        s.alive -= 1;
        self.changed.notify_all();
    }

    /// Called by a vCPU thread: blocks while paused; returns `Run` or `Stop`.
    pub fn wait_runnable(&self) -> Want {
        let mut s = self.lock();
        if s.want == Want::Pause {
            s.parked += 1;
            self.changed.notify_all();
            while s.want == Want::Pause {
                s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            s.parked -= 1;
        }
        s.want
    }

    /// Blocks until `n` vCPU threads are parked, or the VM stopped. Returns whether all parked.
    pub fn wait_parked(&self, n: usize) -> bool {
        let mut s = self.lock();
        while s.parked < n && s.want == Want::Pause && s.alive > 0 {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked >= n && s.want == Want::Pause
    }

    /// Blocks until every vCPU thread has exited (or `timeout` passes); returns the reason.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut s = self.lock();
        while !(s.want == Want::Stop && s.alive == 0) {
            match deadline {
                None => s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    s = self
                        .changed
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        s.exit.clone()
    }

    /// Makes a stopped VM runnable again (after a fork reset): no exit reason, paused.
    pub fn rearm(&self) {
        let mut s = self.lock();
        s.exit = None;
        s.want = Want::Pause;
        self.run.store(false, Ordering::Release);
    }

    /// The exit reason, if the VM has stopped.
    pub fn exit(&self) -> Option<ExitReason> {
        self.lock().exit.clone()
    }
}

impl Default for RunControl {
    fn default() -> Self {
        Self::new()
    }
}
