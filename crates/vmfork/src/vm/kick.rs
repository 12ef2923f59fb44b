//! Kicking a vCPU thread out of KVM_RUN from another thread: a real-time signal whose handler
//! sets `immediate_exit` in the running vCPU's `kvm_run`. If the signal lands just before
//! KVM_RUN, `immediate_exit` makes KVM_RUN return at once, so no kick is lost.

use kvm_bindings::kvm_run;
use std::cell::Cell;
use std::sync::Once;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    // Const-initialised, so reading it from a signal handler allocates nothing.
    static CURRENT_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = CURRENT_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: `run` was registered by this thread for a vCPU whose owner it keeps alive
        // while the registration lasts (see `KickTarget`), so the kvm_run mapping is mapped; a
        // volatile byte store is async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_handler() -> crate::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(|e| crate::Error::Kvm {
            op: "installing the vCPU kick signal handler",
            source: e,
        });
    });
    result
}

/// While alive, kicks delivered to this thread set `immediate_exit` on `run`.
pub struct KickTarget(());

impl KickTarget {
    /// Registers `run` (the kvm_run of a vCPU this thread is about to run) as the kick target.
    pub fn register(run: *mut kvm_run) -> Self {
        CURRENT_RUN.with(|c| c.set(run));
        KickTarget(())
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        CURRENT_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// The vCPU threads of one VM that can be kicked. A thread adds itself when it starts and
/// removes itself before it exits, under the same lock `kick_all` takes, so a kick never goes
/// to a thread that is gone.
#[derive(Default)]
pub struct KickRegistry {
    threads: std::sync::Mutex<Vec<(usize, libc::pthread_t)>>,
}

impl KickRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, libc::pthread_t)>> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the calling thread as vCPU `index`.
    pub fn enter(&self, index: usize) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().push((index, me));
    }

    /// Removes the calling thread (vCPU `index`); call before the thread exits.
    pub fn leave(&self, index: usize) {
        self.lock().retain(|&(i, _)| i != index);
    }

    /// Sends the kick signal to every registered thread.
    pub fn kick_all(&self) {
        let threads = self.lock();
        for &(_, thread) in threads.iter() {
            // SAFETY: `thread` is alive: threads leave the registry (under this lock) before
            // they exit. The signal's handler only sets `immediate_exit`.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// A one-shot timer that kicks the thread that made it: a deadline for [`crate::Vm`]'s inline
/// runs (a fuzzing input that never ends). Arming and disarming are one syscall each.
pub struct ThreadTimer {
    id: libc::timer_t,
}

impl ThreadTimer {
    /// A disarmed timer whose expiry sends the kick signal to the calling thread.
    pub fn for_this_thread() -> crate::Result<Self> {
        install_handler()?;
        // SAFETY: a zeroed sigevent is valid; the fields set select thread-directed delivery.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `id` are valid for the call; the kernel writes the timer id.
        let rc = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut id) };
        if rc != 0 {
            return Err(crate::Error::Invalid(format!(
                "cannot create a run timer: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self { id })
    }

    /// Fires once after `after` (zero disarms).
    pub fn arm(&self, after: std::time::Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `id` is a live timer of this process; `spec` is valid. Failure is impossible
        // for a valid id and spec.
        unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
    }

    pub fn disarm(&self) {
        self.arm(std::time::Duration::ZERO);
    }
}

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: `id` is a live timer owned by this value.
        unsafe { libc::timer_delete(self.id) };
    }
}
