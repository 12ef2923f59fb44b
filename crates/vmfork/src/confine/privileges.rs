//! Dropping privileges once a server has opened what needs them (/dev/kvm, its socket, its
//! data directory): optionally becoming another user and group, and giving up every
//! capability for good (bounding and ambient sets cleared, no new privileges on exec).
//!
//! Must run while the process has one thread: capabilities are per thread, and a thread
//! started before would keep them.

use crate::error::{Error, Result};
use std::path::Path;

/// Who the process becomes: a user and group id (from `--uid/--gid`, names or numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// A user name or number from /etc/passwd, with its primary group.
pub fn lookup_user(name: &str) -> Result<Identity> {
    lookup(Path::new("/etc/passwd"), name, "user").map(|(uid, gid)| Identity { uid, gid })
}

/// A group name or number from /etc/group.
pub fn lookup_group(name: &str) -> Result<u32> {
    lookup(Path::new("/etc/group"), name, "group").map(|(gid, _)| gid)
}

/// `name` as a number, or the ids of the entry named `name` in a passwd/group-style file
/// (`name:x:ID:ID2:...`; the second id is a user's primary group).
fn lookup(file: &Path, name: &str, what: &str) -> Result<(u32, u32)> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok((id, id));
    }
    let text = std::fs::read_to_string(file).unwrap_or_default();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&name) && fields.len() >= 3 {
            let id = fields[2].parse().ok();
            let second = fields.get(3).and_then(|g| g.parse().ok());
            if let Some(id) = id {
                return Ok((id, second.unwrap_or(id)));
            }
        }
    }
    Err(Error::Invalid(format!(
        "no {what} '{name}' (give a name from {} or a number)",
        file.display()
    )))
}

/// Highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count())
}

fn os_error(what: &str) -> Error {
    Error::Invalid(format!(
        "cannot drop privileges: {what}: {}",
        std::io::Error::last_os_error()
    ))
}

/// Becomes `identity` (if given; supplementary groups dropped) and gives up every capability:
/// effective, permitted, inheritable, ambient and bounding sets, with no new privileges from
/// exec. Errors (and changes nothing it could avoid) when more than one thread runs.
pub fn drop_privileges(identity: Option<Identity>) -> Result<()> {
    if threads() != 1 {
        return Err(Error::Invalid(
            "cannot drop privileges once threads run (capabilities are per thread)".into(),
        ));
    }
    // SAFETY: prctl with integer arguments only; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(os_error("no_new_privs"));
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    for cap in 0..=last_capability() {
        // SAFETY: as above. Fails (harmlessly) without CAP_SETPCAP, as an unprivileged
        // process, which has no capabilities to lose anyway.
        unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
    }
    if let Some(Identity { uid, gid }) = identity {
        // SAFETY: setgroups with an empty list reads no memory.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(os_error("setgroups"));
        }
        // SAFETY: integer arguments only; glibc applies them to every thread of the process.
        if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
            return Err(os_error("setresgid"));
        }
        // SAFETY: as above.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            return Err(os_error("setresuid"));
        }
    }
    // Empty effective, permitted and inheritable sets (a uid change to non-root cleared them
    // already; staying root, this is what takes them away).
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads one header and two data words, both valid for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(os_error("capset"));
    }
    Ok(())
}

/// What the kernel says about this process's ids and capabilities (`/proc/self/status`
/// lines `Uid`, `Gid`, `CapEff`, `CapPrm`, `CapBnd`, `CapAmb`, `NoNewPrivs`).
pub fn status_lines() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| {
            [
                "Uid:",
                "Gid:",
                "CapEff:",
                "CapPrm:",
                "CapBnd:",
                "CapAmb:",
                "NoNewPrivs:",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_resolve() {
        let root = lookup_user("root").unwrap();
        assert_eq!(root, Identity { uid: 0, gid: 0 });
        assert_eq!(lookup_user("65534").unwrap().uid, 65534);
        assert_eq!(lookup_group("0").unwrap(), 0);
        let err = lookup_user("no-such-user-here").unwrap_err().to_string();
        assert!(err.contains("no user 'no-such-user-here'"), "{err}");
    }
}
