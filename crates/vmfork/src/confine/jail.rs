//! The jailer mode of `vmfork serve --jail`: the server process moves into new mount, network,
//! IPC, UTS and PID namespaces and chroots into its data directory, after it opened /dev/kvm
//! and its socket (which stay usable through their descriptors) and before it drops its
//! privileges. A compromised server then sees no host files but its data directory, no host
//! network, and no host processes.
//!
//! A new PID namespace takes effect for children only, so [`enter`] forks: the child, PID 1 of
//! the new namespace, serves; the parent stays outside, passes SIGINT and SIGTERM on, and exits
//! with the child's status.

use crate::error::{Error, Result};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Which side of the fork [`enter`] returned on.
#[derive(Debug, PartialEq, Eq)]
pub enum Side {
    /// Inside the jail: serve.
    Jailed,
    /// The parent outside, with the jailed child's pid: wait for it ([`wait_for`]).
    Outside(i32),
}

fn os_error(what: &str) -> Error {
    Error::Invalid(format!(
        "cannot enter the jail: {what}: {}",
        std::io::Error::last_os_error()
    ))
}

/// Enters the jail rooted at `root` (the data directory). Must run single-threaded (it
/// forks).
pub fn enter(root: &Path) -> Result<Side> {
    let flags = libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWPID;
    // SAFETY: unshare takes flags only.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(os_error("unshare"));
    }
    // SAFETY: fork in a single-threaded process (the caller's contract): the child continues
    // with a copy of this one's memory and descriptors.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(os_error("fork"));
    }
    if pid > 0 {
        return Ok(Side::Outside(pid));
    }
    // The child: PID 1 of the new namespace. Die with the parent.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) };
    let slash = CString::new("/").unwrap_or_default();
    // SAFETY: NUL-terminated strings; null source, type and data are allowed for a
    // propagation change. Mounts made here stay in this namespace.
    let private = unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if private != 0 {
        return Err(os_error("making mounts private"));
    }
    let root_c = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid("the data directory path has a NUL byte".into()))?;
    // SAFETY: NUL-terminated paths.
    if unsafe { libc::chroot(root_c.as_ptr()) } != 0 {
        return Err(os_error("chroot"));
    }
    // SAFETY: as above.
    if unsafe { libc::chdir(slash.as_ptr()) } != 0 {
        return Err(os_error("chdir"));
    }
    Ok(Side::Jailed)
}

/// Waits for the jailed child `pid`, passing a stop request on (`interrupted` turns true when
/// a signal asked the parent to stop); the child's exit status.
pub fn wait_for(pid: libc::pid_t, interrupted: impl Fn() -> bool) -> i32 {
    let mut passed_on = false;
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child, status written to a local.
        let done = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if done == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            return 128 + libc::WTERMSIG(status);
        }
        if done < 0 {
            return 1;
        }
        if interrupted() && !passed_on {
            // SAFETY: signals our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            passed_on = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
