//! The steps every worker takes around [`bulkhead_sandbox::enter`]: before it, process hygiene
//! ([`prepare`]); after it, one log line saying how confined the worker is ([`log_entered`]).

use std::os::fd::RawFd;

use bulkhead_sandbox::{EnterReport, Mode, REPORT_FD};

/// A step of [`prepare`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct PrepareError {
    /// The step (`die_with_parent`, `no_new_privs`, `closing inherited fds`).
    pub what: &'static str,
    /// Why.
    #[source]
    pub source: bulkhead_sandbox::Error,
}

fn step<T>(what: &'static str, r: bulkhead_sandbox::Result<T>) -> Result<T, PrepareError> {
    r.map_err(|source| PrepareError { what, source })
}

/// Before [`bulkhead_sandbox::enter`]: die with the parent (the monitor), set `no_new_privs`,
/// close every inherited fd from 3 on but `ipc_fd`, the violation-report pipe
/// ([`REPORT_FD`]) and `keep`. Returns the report pipe's fd if the launcher handed one.
pub fn prepare(ipc_fd: RawFd, keep: &[RawFd]) -> Result<Option<RawFd>, PrepareError> {
    // SAFETY: getppid has no arguments and cannot fail.
    let parent = unsafe { libc::getppid() };
    step("die_with_parent", bulkhead_sandbox::die_with_parent(parent))?;
    step("no_new_privs", bulkhead_sandbox::set_no_new_privs())?;
    let mut kept = vec![ipc_fd, REPORT_FD];
    kept.extend_from_slice(keep);
    step(
        "closing inherited fds",
        bulkhead_sandbox::close_fds_except(3, &kept),
    )?;
    // SAFETY: F_GETFD on an integer; no memory involved.
    let open = unsafe { libc::fcntl(REPORT_FD, libc::F_GETFD) } >= 0;
    Ok(open.then_some(REPORT_FD))
}

/// Logs what `enter` did under `mode`, with the caller's `target` (its `module_path!()`): a
/// warning without a sandbox or with a weaker one.
pub fn log_entered(target: &str, mode: Mode, report: &EnterReport) {
    match mode {
        Mode::Off => log::warn!(target: target, "running WITHOUT a sandbox (--sandbox off)"),
        _ if !report.weak.is_empty() => log::warn!(target: target, "{report}"),
        _ => log::info!(target: target, "{report}"),
    }
}

/// One malloc arena, for the back ends (blockd, netd): glibc shrinks the heaps of per-thread
/// arenas after large frees and, the first time, reads `/proc/sys/vm/overcommit_memory` to decide
/// how: an `openat` the sandbox refuses. The main arena trims with `brk` only. Call it before any
/// other thread exists.
pub fn one_malloc_arena() -> Result<(), crate::WorkerError> {
    // SAFETY: mallopt with integer arguments, before any other thread exists (the caller's
    // promise).
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        return Err(crate::WorkerError::Setup {
            what: "mallopt(M_ARENA_MAX, 1)",
            source: "failed".into(),
        });
    }
    Ok(())
}
