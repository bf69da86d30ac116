//! Per-role confinement of Bulkhead's processes.
//!
//! - [`policy`]: one policy per role (namespaces, rlimits, landlock, the seccomp allowlist with
//!   its ioctl filters), declared in one place.
//! - [`launch`]: how the monitor's launcher process (and the tests) start a worker: `clone3` into fresh user, mount,
//!   pid, ipc, uts and network namespaces with a pidfd, uid/gid maps written by the parent, only
//!   the fds handed on purpose, `execveat` of the binary opened by the parent.
//! - [`enter`](mod@enter): what the worker does to itself before it reads anything untrusted:
//!   private mounts, pivot into an empty read-only tmpfs, capabilities and the bounding set gone,
//!   `no_new_privs`, rlimits, landlock with no filesystem access, seccomp last; and
//!   [`enter::confine_monitor`], the monitor's own ruleset (its configured paths) and filter.
//! - [`seccomp`]: filters compiled with seccompiler, and the `SIGSYS` report of a violation.
//! - [`features`]: what this kernel offers, so Bulkhead can refuse to run with less.
//! - [`standalone`]: the policy of a back end that runs on its own (no launcher).
//! - `attack` (feature `attack-hook`, tests only, never in a release build): the attempts a
//!   compromised worker would make, run inside the worker to prove the layers hold
//!   (`docs/SECURITY.md`).
//!
//! The process-hygiene helpers below ([`die_with_parent`], [`set_no_new_privs`],
//! [`close_fds_except`]) are used by every worker, confined or not.

#[cfg(feature = "attack-hook")]
pub mod attack;
pub mod enter;
pub mod features;
pub mod ioctls;
pub mod launch;
pub mod policy;
pub mod seccomp;
pub mod standalone;
pub mod syscall_names;

use std::os::fd::RawFd;

pub use enter::{enter, EnterReport, Mode};
pub use policy::{Params, Policy, Role};

/// The fd at which a launched worker finds the write end of its violation-report pipe.
pub const REPORT_FD: RawFd = 4;

/// Errors from confining a process.
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
    /// A seccomp filter could not be built or installed.
    #[error("seccomp: {what}: {detail}")]
    Seccomp {
        /// The step.
        what: &'static str,
        /// The library's message.
        detail: String,
    },
    /// Landlock could not be applied.
    #[error("landlock: {0}")]
    Landlock(String),
    /// Capabilities could not be dropped.
    #[error("capabilities: {0}")]
    Caps(String),
    /// The kernel or the launch lacks something the policy needs, and weaker confinement was
    /// not accepted.
    #[error(
        "the sandbox would be weaker than the {role} policy requires: {}; \
         fix the host, or accept weaker confinement with --sandbox allow-weak",
        .missing.join("; ")
    )]
    Weak {
        /// The role.
        role: &'static str,
        /// What is missing.
        missing: Vec<String>,
    },
    /// Starting the worker failed.
    #[error("cannot start {path}: {what}: {source}")]
    Launch {
        /// The binary.
        path: String,
        /// The step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A bad argument.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// `Sys` with the current `errno`.
    pub(crate) fn sys(what: &'static str) -> Error {
        Error::Sys {
            what,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

fn check(rc: libc::c_int, what: &'static str) -> Result<()> {
    if rc < 0 {
        return Err(Error::sys(what));
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
/// parent did not die before the request took effect. In a new pid namespace the parent is
/// outside it and `getppid()` is 0 throughout; the launcher has already set the death signal
/// and checked its parent there.
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
