//! Per-role confinement of Bulkhead's worker processes.
//!
//! This crate will own the whole sandbox policy (namespaces, empty root, capabilities,
//! landlock, seccomp, rlimits). What exists today are the process-hygiene steps every worker
//! takes before it reads anything: die with the monitor, set `no_new_privs`, and keep no fd
//! it was not handed on purpose. Full confinement is the sandbox issue's work.

use std::os::fd::RawFd;

/// Errors from applying a confinement step.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{what} failed: {source}")]
    Sys {
        /// The step that failed.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn check(rc: libc::c_int, what: &'static str) -> Result<()> {
    if rc < 0 {
        return Err(Error::Sys {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Sets `no_new_privs`: execve can never grant privileges to this process again.
pub fn set_no_new_privs() -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(rc, "prctl(PR_SET_NO_NEW_PRIVS)")
}

/// Asks the kernel to SIGKILL this process when its parent (the monitor) dies, and checks the
/// parent did not die before the request took effect.
pub fn die_with_parent(expected_parent: libc::pid_t) -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    check(rc, "prctl(PR_SET_PDEATHSIG)")?;
    // SAFETY: getppid has no arguments and cannot fail.
    if unsafe { libc::getppid() } != expected_parent {
        // SAFETY: raising SIGKILL on ourselves; the parent is already gone.
        unsafe { libc::raise(libc::SIGKILL) };
    }
    Ok(())
}

/// Closes every fd at or above `first` except those in `keep`.
pub fn close_fds_except(first: RawFd, keep: &[RawFd]) -> Result<()> {
    let dir = std::fs::read_dir("/proc/self/fd").map_err(|source| Error::Sys {
        what: "read /proc/self/fd",
        source,
    })?;
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= first && !keep.contains(&fd))
        .collect();
    for fd in fds {
        // SAFETY: closing an fd number this process does not use by design; the directory
        // iterator's own fd is already closed, and a stale number just returns EBADF.
        unsafe { libc::close(fd) };
    }
    Ok(())
}
