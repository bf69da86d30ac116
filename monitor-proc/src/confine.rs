//! The monitor's own confinement, applied once start-up is done and before the first byte from
//! a QMP client is read (issue 4; `docs/ARCHITECTURE.md`, "The monitor's own confinement").
//!
//! By then the monitor has forked its launcher (the only process left that may start workers,
//! [`crate::launcher`]), bound its QMP and serial sockets, opened `/dev/kvm`, guest RAM, the
//! kernel, the initrd and the serial files. What it still needs from the filesystem, and so all
//! its landlock ruleset allows:
//! - `/proc`, read-only: `x-query-sandbox` reads every process's status, maps and limits there,
//!   and the kernel and initrd are reopened through `/proc/self/fd` for each worker start;
//! - the kernel and initrd files themselves, read-only (a reopen through `/proc/self/fd` is
//!   checked against the file's own path; the rule is made from the open file, so it holds for
//!   an `/dev/fdset` file too);
//! - removing entries in the directories of the QMP and serial sockets and of the pid file
//!   (unlinked at exit).
//!
//! Then the monitor's seccomp allowlist ([`bulkhead_sandbox::policy::MONITOR`]): `TRAP`, as for
//! the workers, with the report written to stderr — the monitor's log — before the monitor dies
//! by `SIGSYS`. A killed monitor is a lost VM either way; TRAP costs nothing over `KILL_PROCESS`
//! (the call never runs in both cases) and puts the call's name in the log, which is the only
//! way a missing entry in the allowlist can be found and fixed.
//!
//! `--sandbox off` skips all of it; `allow-weak` applies what the kernel offers and logs what
//! is missing; `on` refuses to serve when anything is missing.

use std::fs::File;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use bulkhead_sandbox::enter::{confine_monitor, PathAccess};
use bulkhead_sandbox::{EnterReport, Mode};

use crate::qmp::commands::sandbox::{record_own_landlock, OwnLandlock};

/// Why the monitor could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A path the ruleset names could not be opened.
    #[error("cannot open {path} for the monitor's landlock ruleset: {source}")]
    Open {
        /// The path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The sandbox crate refused or failed.
    #[error("cannot confine the monitor: {0}")]
    Sandbox(#[from] bulkhead_sandbox::Error),
}

/// What the monitor's ruleset names.
#[derive(Debug, Default)]
pub struct MonitorPaths<'a> {
    /// Files the monitor removes at exit (sockets, pid file): their directories get the right
    /// to remove entries.
    pub removed_at_exit: Vec<PathBuf>,
    /// Open files the monitor reopens (kernel, initrd).
    pub reopened: Vec<&'a File>,
}

fn open_path(p: &Path) -> Result<OwnedFd, ConfineError> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
        ConfineError::Open {
            path: p.display().to_string(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        }
    })?;
    // SAFETY: open with a NUL-terminated path; the result is a new fd we own.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC | libc::O_DIRECTORY,
        )
    };
    if fd < 0 {
        return Err(ConfineError::Open {
            path: p.display().to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: open just returned this fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Applies the monitor's landlock ruleset and seccomp filter (see the module documentation).
/// Returns what was done (`None` under `--sandbox off`).
pub fn confine(mode: Mode, paths: &MonitorPaths<'_>) -> Result<Option<EnterReport>, ConfineError> {
    if mode == Mode::Off {
        return Ok(None);
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in &paths.removed_at_exit {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dirs.contains(&dir) {
            dirs.push(dir);
        }
    }
    let proc_fd = open_path(Path::new("/proc"))?;
    let dir_fds = dirs
        .iter()
        .map(|d| open_path(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rules = vec![(proc_fd.as_fd(), PathAccess::ReadTree)];
    rules.extend(
        dir_fds
            .iter()
            .map(|d| (d.as_fd(), PathAccess::RemoveEntries)),
    );
    rules.extend(
        paths
            .reopened
            .iter()
            .map(|f| (f.as_fd(), PathAccess::ReadFile)),
    );
    let report = confine_monitor(&rules, mode)?;
    record_own_landlock(OwnLandlock {
        abi: report.landlock_abi,
        full: report.landlock_full,
    });
    Ok(Some(report))
}
