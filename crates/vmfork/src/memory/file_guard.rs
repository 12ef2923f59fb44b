//! Guest memory mapped from files vmfork does not own (a snapshot's `memory.bin`), guarded
//! against being truncated or rewritten under the VMs that map it.
//!
//! A restore maps the file copy-on-write instead of copying it (that is what makes it lazy), so
//! whoever can write the file can pull pages from under a running VM. Two guards:
//! - **SIGBUS**: a VMM read of a page past a truncated end raises SIGBUS. The handler, for an
//!   address inside guest memory, maps a zero page there (the read completes) and wakes the
//!   watcher; any other SIGBUS goes to the handler that was there before. KVM itself reports
//!   such a page as `EFAULT` from `KVM_RUN` (the vCPU's VM fails with an internal error).
//! - **The watcher thread** (inotify on every guarded file, and the SIGBUS wake-ups) compares
//!   each file's size and modification time with those it had when opened; a file truncated or
//!   written since is damaged for good: every VM whose image is on it is stopped with an
//!   internal error saying so, and forks and snapshots of such VMs are refused.
//!
//! So a damaged file fails the VMs on it, cleanly, never the server; it cannot silently change
//! a live VM's memory past the moment the watcher sees the write (milliseconds).

use crate::error::{Error, Result};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Host address ranges holding guest memory, for the SIGBUS handler: `(start, end)`, `0, 0`
/// when free. Fixed-size so the handler reads it with atomics only.
const RANGE_SLOTS: usize = 16384;
static RANGES: [(AtomicUsize, AtomicUsize); RANGE_SLOTS] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; RANGE_SLOTS];
/// The eventfd the handler writes to wake the watcher (-1 before it exists).
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The handler that was installed before ours, for faults outside guest memory.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A registered range of guest memory; unregistered on drop.
#[derive(Debug)]
pub(crate) struct GuardedRange(Option<usize>);

/// Records `[addr, addr+len)` as guest memory (a reserved RAM range, or a file's view).
pub(crate) fn register_range(addr: *mut u8, len: usize) -> GuardedRange {
    let start = addr as usize;
    for (i, (s, e)) in RANGES.iter().enumerate() {
        if s.compare_exchange(0, start, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            e.store(start + len, Ordering::Release);
            return GuardedRange(Some(i));
        }
    }
    // Table full: this range's faults take the default path (the process dies on SIGBUS, as
    // it would have without the guard).
    GuardedRange(None)
}

impl Drop for GuardedRange {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            RANGES[i].1.store(0, Ordering::Release);
            RANGES[i].0.store(0, Ordering::Release);
        }
    }
}

fn in_guest_memory(addr: usize) -> bool {
    RANGES.iter().any(|(s, e)| {
        let start = s.load(Ordering::Acquire);
        start != 0 && addr >= start && addr < e.load(Ordering::Acquire)
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    if in_guest_memory(addr) {
        let page = addr & !4095;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED;
        // SAFETY: replaces one page of guest memory (a registered range, which holds only
        // guest RAM or a file's view, never Rust objects) with a zero page; mmap is
        // async-signal-safe. The faulting access then completes, reading zeroes.
        let mapped = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        if mapped != libc::MAP_FAILED {
            let fd = WAKE_FD.load(Ordering::Acquire);
            if fd >= 0 {
                let one: u64 = 1;
                // SAFETY: writes 8 bytes from a local to an eventfd; async-signal-safe.
                unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
            }
            return;
        }
    }
    // Not ours: what would have happened without this handler.
    match PREVIOUS.get() {
        Some(prev) if prev.sa_flags & libc::SA_SIGINFO != 0 && prev.sa_sigaction > 1 => {
            // SAFETY: the previous handler was installed for SIGBUS with SA_SIGINFO.
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(prev.sa_sigaction) };
            handler(sig, info, context);
        }
        Some(prev) if prev.sa_sigaction > 1 => {
            // SAFETY: a plain handler installed for SIGBUS.
            let handler: extern "C" fn(libc::c_int) =
                unsafe { std::mem::transmute(prev.sa_sigaction) };
            handler(sig);
        }
        _ => {
            // SAFETY: restores the default action; returning re-runs the access, which
            // raises SIGBUS again and ends the process as it would have.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}

fn install_handler() -> Result<()> {
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid "no handler" value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: an empty mask for the handler, then our handler installed for SIGBUS with the
    // old one saved; both structures are valid for the calls.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    let ok = unsafe {
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, &mut previous)
    };
    if ok != 0 {
        INSTALLED.store(false, Ordering::Release);
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    let _ = PREVIOUS.set(previous);
    Ok(())
}

/// What is told when a file it uses is found damaged (a VM whose image is on it).
pub(crate) trait DamageListener: Send + Sync {
    fn file_damaged(&self, why: &str);
}

/// What a guarded file looked like when opened.
struct Guarded {
    file: Weak<File>,
    path: PathBuf,
    size: u64,
    mtime: (i64, i64),
    damaged: bool,
    /// Told once when the file is found damaged: each stops one VM whose image is on it.
    listeners: Vec<Weak<dyn DamageListener>>,
}

impl Guarded {
    /// Why the file is no longer what it was, if it is not.
    fn change(&self, file: &File) -> Option<String> {
        let meta = file.metadata().ok()?;
        if meta.len() < self.size {
            Some(format!(
                "its memory file {} was truncated ({} bytes, was {})",
                self.path.display(),
                meta.len(),
                self.size
            ))
        } else if (meta.mtime(), meta.mtime_nsec()) != self.mtime || meta.len() != self.size {
            Some(format!(
                "its memory file {} was written while the VM used it",
                self.path.display()
            ))
        } else {
            None
        }
    }
}

struct Watcher {
    files: Mutex<Vec<Guarded>>,
    inotify: Option<OwnedFd>,
}

fn watcher() -> &'static Watcher {
    static WATCHER: OnceLock<Watcher> = OnceLock::new();
    WATCHER.get_or_init(|| {
        // SAFETY: plain syscalls creating new descriptors, owned below.
        let inotify = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        // SAFETY: as above.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        // SAFETY: each descriptor was just created and is owned by nothing else.
        let inotify = (inotify >= 0).then(|| unsafe { OwnedFd::from_raw_fd(inotify) });
        let wake = (wake >= 0).then(|| unsafe { OwnedFd::from_raw_fd(wake) });
        if let Some(w) = &wake {
            WAKE_FD.store(w.as_raw_fd(), Ordering::Release);
        }
        let fds = (
            inotify.as_ref().map(|f| f.as_raw_fd()),
            wake.map(|w| {
                let raw = w.as_raw_fd();
                std::mem::forget(w); // lives as long as the process (the handler writes it)
                raw
            }),
        );
        let _ = std::thread::Builder::new()
            .name("vmfork-fileguard".into())
            .spawn(move || {
                crate::confine::seccomp::confine_vmm_thread();
                watch_forever(fds.0, fds.1)
            });
        Watcher {
            files: Mutex::new(Vec::new()),
            inotify,
        }
    })
}

/// Guards `file` (opened from `path`, not vmfork's own): its pages may be mapped into VMs.
pub(crate) fn guard(file: &Arc<File>, path: &Path) -> Result<()> {
    install_handler()?;
    let meta = file.metadata()?;
    let w = watcher();
    if let (Some(fd), Ok(c)) = (
        &w.inotify,
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()),
    ) {
        // SAFETY: a NUL-terminated path and an inotify descriptor this module owns.
        unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
    }
    let mut files = w.files.lock().unwrap_or_else(|p| p.into_inner());
    files.retain(|g| g.file.strong_count() > 0);
    files.push(Guarded {
        file: Arc::downgrade(file),
        path: path.to_path_buf(),
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        damaged: false,
        listeners: Vec::new(),
    });
    Ok(())
}

fn with_entry<T>(file: &Arc<File>, f: impl FnOnce(&mut Guarded) -> T) -> Option<T> {
    let mut files = watcher().files.lock().unwrap_or_else(|p| p.into_inner());
    files
        .iter_mut()
        .find(|g| std::ptr::eq(g.file.as_ptr(), Arc::as_ptr(file)))
        .map(f)
}

/// Tells `listener` (once) if `file` is found damaged; at once if it already is. Nothing
/// happens for a file that is not guarded.
pub(crate) fn listen(file: &Arc<File>, listener: Weak<dyn DamageListener>) {
    if !INSTALLED.load(Ordering::Acquire) {
        return;
    }
    let already = with_entry(file, |g| {
        g.listeners.retain(|l| l.strong_count() > 0);
        if g.damaged {
            g.change(file)
                .or_else(|| Some("its memory file was damaged".into()))
        } else {
            g.listeners.push(listener.clone());
            None
        }
    });
    if let (Some(Some(why)), Some(l)) = (already, listener.upgrade()) {
        l.file_damaged(&why);
    }
}

/// Whether any file is guarded in this process (a snapshot's memory file was opened): until
/// then nothing can be damaged, and callers skip the look.
pub(crate) fn active() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Why `file` may no longer be used as guest memory, if it is guarded and damaged. Checks the
/// file itself (not only what the watcher saw so far).
pub(crate) fn damage(file: &Arc<File>) -> Option<String> {
    if !INSTALLED.load(Ordering::Acquire) {
        return None;
    }
    let found = with_entry(file, |g| {
        let why = g.change(file);
        if why.is_some() {
            g.damaged = true;
        }
        why
    })??;
    check_all();
    Some(found)
}

/// Compares every guarded file with what it was; stops the VMs on the damaged ones.
fn check_all() {
    let mut told: Vec<(String, Arc<dyn DamageListener>)> = Vec::new();
    {
        let mut files = watcher().files.lock().unwrap_or_else(|p| p.into_inner());
        files.retain(|g| g.file.strong_count() > 0);
        for g in files.iter_mut() {
            let Some(file) = g.file.upgrade() else {
                continue;
            };
            if let Some(why) = g.change(&file) {
                g.damaged = true;
                for l in g.listeners.drain(..).filter_map(|l| l.upgrade()) {
                    told.push((why.clone(), l));
                }
            }
        }
    }
    // Outside the lock: stopping a VM may drop the last reference to a file.
    for (why, listener) in told {
        listener.file_damaged(&why);
    }
}

fn watch_forever(inotify: Option<i32>, wake: Option<i32>) {
    let mut fds: Vec<libc::pollfd> = [inotify, wake]
        .into_iter()
        .flatten()
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut buf = [0u8; 4096];
    loop {
        // A second at most between looks: a write through a shared mapping raises no event.
        // SAFETY: polls descriptors this module owns, described by a valid array.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        for p in &mut fds {
            if p.revents != 0 {
                // Drain the events: which file does not matter, each is checked.
                // SAFETY: reads into a local buffer of the given size.
                while unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
                p.revents = 0;
            }
        }
        check_all();
    }
}
