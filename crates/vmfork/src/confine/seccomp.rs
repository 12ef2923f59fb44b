//! Seccomp allow-lists per thread kind, built with seccompiler and installed by each thread
//! of vmfork's own when it starts (a filter binds the thread that installs it and the threads
//! it creates later).
//!
//! - **vCPU threads** run guest code and emulate the devices it touches: the guest-facing
//!   attack surface. They may make KVM ioctls (type 0xAE only), read and write open files
//!   (console, eventfds; disk images and layers at an offset), create a memfd (a disk's first
//!   write makes its layer), wait on futexes, manage their own memory and signals, and exit.
//!   Any other system call kills the process (`SIGSYS`).
//! - **VMM threads** (API connections, snapshot writing on them, the shell pool's filler and
//!   reapers, layer adoption and folding): what forks, snapshots, restores and teardown need —
//!   files, memory mappings, memfds, KVM, Unix sockets (new ones too: the vsock bridge),
//!   threads. No `execve`, `ptrace`, mounts, privilege changes, module loading, network
//!   sockets, BPF or perf;
//!   those fail with `EPERM` (an API request fails cleanly instead of the server dying).
//!
//! Filters are on unless [`set_enabled`]`(false)` (`--no-seccomp`) is called before the first
//! thread starts. Threads the embedding program owns (its main thread, the caller of
//! `Vm::run_inline`) are not filtered.

use crate::error::{Error, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// The kinds of threads vmfork starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    Vcpu,
    Vmm,
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the filters on or off for threads started from now on.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::SeqCst);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The KVM ioctl type byte (`KVMIO`): bits 8..15 of every KVM request number.
const KVMIO: u64 = 0xae;

/// System calls any vmfork thread makes to live: memory, futexes, signals, time, exit.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_tgkill,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    // The kernel's own restart of a call a signal interrupted (a vCPU kick during a sleep).
    libc::SYS_restart_syscall,
];

/// What VMM threads need beyond [`COMMON`] (found by tracing the test suite and the CLI).
const VMM: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_openat,
    libc::SYS_open,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fcntl,
    libc::SYS_flock,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_rmdir,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    libc::SYS_linkat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_readlink,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_chmod,
    libc::SYS_utimensat,
    libc::SYS_getcwd,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_memfd_create,
    libc::SYS_eventfd2,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_add_watch,
    libc::SYS_userfaultfd,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_mlock,
    libc::SYS_munlock,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getpeername,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_tid_address,
    libc::SYS_prctl,
    libc::SYS_setpriority,
    libc::SYS_getpriority,
    libc::SYS_getrusage,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_kill,
    libc::SYS_tkill,
    libc::SYS_rt_sigaction,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
    libc::SYS_sched_getparam,
    libc::SYS_sched_setaffinity,
    libc::SYS_process_vm_readv,
    libc::SYS_membarrier,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_copy_file_range,
    libc::SYS_splice,
    libc::SYS_sendfile,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_dup2,
    libc::SYS_getppid,
    // A thread it starts (a vCPU thread) adds its own, tighter filter: a filter can only ever
    // take rights away, so this gives none.
    libc::SYS_seccomp,
];

/// What device models serving a guest's requests on its vCPU thread need beyond [`COMMON`].
const VCPU_DEVICES: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
];

fn allow(syscalls: &[i64], rules: &mut BTreeMap<i64, Vec<SeccompRule>>) {
    for &s in syscalls {
        rules.insert(s, Vec::new());
    }
}

fn build(kind: ThreadKind) -> Result<BpfProgram> {
    let mut rules = BTreeMap::new();
    allow(COMMON, &mut rules);
    let mismatch = match kind {
        ThreadKind::Vcpu => {
            // ioctl only with a KVM request number: `(request >> 8) & 0xff == KVMIO`.
            let kvm_only = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                KVMIO << 8,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| Error::Invalid(format!("building the vCPU seccomp filter: {e}")))?;
            rules.insert(libc::SYS_ioctl, vec![kvm_only]);
            allow(VCPU_DEVICES, &mut rules);
            SeccompAction::KillProcess
        }
        ThreadKind::Vmm => {
            allow(VMM, &mut rules);
            // Unix sockets only (the vsock bridge): `socket(AF_UNIX, ...)`.
            let unix_only = SeccompCondition::new(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::AF_UNIX as u64,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| Error::Invalid(format!("building the VMM seccomp filter: {e}")))?;
            rules.insert(libc::SYS_socket, vec![unix_only]);
            SeccompAction::Errno(libc::EPERM as u32)
        }
    };
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(BpfProgram::try_from)
        .map_err(|e| Error::Invalid(format!("building the {kind:?} seccomp filter: {e}")))
}

/// Installs the filter for `kind` on the calling thread (a no-op when filters are off).
pub fn install(kind: ThreadKind) -> Result<()> {
    if !enabled() {
        return Ok(());
    }
    static VCPU: OnceLock<std::result::Result<BpfProgram, String>> = OnceLock::new();
    static VMM_FILTER: OnceLock<std::result::Result<BpfProgram, String>> = OnceLock::new();
    let cell = match kind {
        ThreadKind::Vcpu => &VCPU,
        ThreadKind::Vmm => &VMM_FILTER,
    };
    let program = cell
        .get_or_init(|| build(kind).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::Invalid(e.clone()))?;
    seccompiler::apply_filter(program)
        .map_err(|e| Error::Invalid(format!("installing the {kind:?} seccomp filter: {e}")))
}

/// Confines a VMM thread of vmfork's own as it starts. A failure (a kernel without seccomp)
/// is said once on stderr; the thread goes on unconfined rather than leaving work undone.
pub(crate) fn confine_vmm_thread() {
    static SAID: std::sync::Once = std::sync::Once::new();
    if let Err(e) = install(ThreadKind::Vmm) {
        SAID.call_once(|| eprintln!("vmfork: warning: {e}; VMM threads run unconfined"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_build() {
        assert!(build(ThreadKind::Vcpu).is_ok());
        assert!(build(ThreadKind::Vmm).is_ok());
    }

    #[test]
    fn a_vmm_thread_is_refused_what_it_does_not_need() {
        let outcome = std::thread::spawn(|| {
            install(ThreadKind::Vmm).unwrap();
            // SAFETY: plain syscalls with no memory arguments.
            let tcp = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let err = std::io::Error::last_os_error().raw_os_error();
            // Still allowed: a memfd.
            let memfd = crate::memory::create_memfd("seccomp-test", 4096);
            (tcp, err, memfd.is_ok())
        })
        .join()
        .unwrap();
        assert_eq!(outcome.0, -1);
        assert_eq!(outcome.1, Some(libc::EPERM));
        assert!(outcome.2);
    }
}
