//! Spawning and supervising `bulkhead-vcpu`.
//!
//! The worker binary is looked up in one directory only: the directory of the monitor's own
//! executable (`/proc/self/exe`), or the one given with `--worker-dir`. `PATH` is never searched.
//!
//! The worker is started as `bulkhead-vcpu --ipc-fd 3` with its end of a fresh `SOCK_SEQPACKET`
//! pair at fd 3, `/dev/null` on stdin, the monitor's stderr on stdout and stderr, and no other fd:
//! every fd of the monitor is close-on-exec (inherited ones are marked so at startup by
//! [`cloexec_inherited_fds`]) and the child marks everything above 3 close-on-exec again right before `exec`.
//! Its environment is cleared except for `BULKHEAD_LOG`, `RUST_BACKTRACE` and `RUST_LOG`.
//! Everything else the worker needs (`/dev/kvm`, guest RAM, kernel, initrd, serial) travels over
//! the channel with the `Setup` request.
//!
//! Supervision: the monitor holds the [`tokio::process::Child`]; its `wait` completes as soon as
//! the kernel reports the exit (SIGCHLD), and the channel reports [`bulkhead_ipc::Error::PeerClosed`]
//! at the same moment. [`describe_exit`] renders the status as the logs show it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

/// The worker's file name.
pub const VCPU_WORKER: &str = "bulkhead-vcpu";
/// `close_range(2)` flag: mark the range close-on-exec instead of closing it (Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
/// The fd number the worker finds its channel at.
pub const IPC_FD: RawFd = 3;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The monitor's own executable path cannot be read.
    #[error("cannot find the bulkhead executable's directory: {0}")]
    SelfExe(std::io::Error),
    /// The worker binary does not exist or is not executable.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Preparing the channel fd failed.
    #[error("cannot prepare the worker's channel: {0}")]
    Fd(std::io::Error),
}

/// Where the worker binary `name` lives: `dir/name`, or next to our own executable.
pub fn worker_path(dir: Option<&Path>, name: &str) -> Result<PathBuf, WorkerError> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::fs::read_link("/proc/self/exe").map_err(WorkerError::SelfExe)?;
            exe.parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| WorkerError::SelfExe(std::io::Error::other("no parent directory")))?
        }
    };
    // Make it absolute so a later chdir (daemonize) does not change what we run.
    let dir = if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()
            .map_err(WorkerError::SelfExe)?
            .join(dir)
    };
    Ok(dir.join(name))
}

/// Marks every fd above 2 that the monitor inherited close-on-exec, so no worker can inherit
/// anything by accident. Call once at startup.
pub fn cloexec_inherited_fds() {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD/F_SETFD with integer arguments; a stale number (the directory's own
        // fd, already closed) just fails with EBADF.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Starts `path --ipc-fd 3` with `ipc` as its fd 3. The returned child is killed if dropped.
pub fn spawn(path: &Path, ipc: OwnedFd) -> Result<tokio::process::Child, WorkerError> {
    // Move the channel to an fd above 3 (close-on-exec), so the dup2 onto 3 in the child always
    // creates a fresh, inheritable descriptor.
    // SAFETY: F_DUPFD_CLOEXEC on an fd we own; the result is a new fd we then own.
    let high = unsafe { libc::fcntl(ipc.as_raw_fd(), libc::F_DUPFD_CLOEXEC, IPC_FD + 1) };
    if high < 0 {
        return Err(WorkerError::Fd(std::io::Error::last_os_error()));
    }
    // SAFETY: fcntl just returned this new fd; nothing else owns it.
    let high = unsafe { OwnedFd::from_raw_fd(high) };
    drop(ipc);
    let high_raw = high.as_raw_fd();
    // The worker's stdout goes to our stderr: our stdout may be the guest's serial console.
    // SAFETY: F_DUPFD_CLOEXEC of our stderr; the result, if any, is a new fd we own.
    let err_fd = unsafe { libc::fcntl(libc::STDERR_FILENO, libc::F_DUPFD_CLOEXEC, 0) };
    let stdout = if err_fd >= 0 {
        // SAFETY: fcntl just returned this new fd; nothing else owns it.
        Stdio::from(unsafe { OwnedFd::from_raw_fd(err_fd) })
    } else {
        Stdio::null()
    };
    let mut cmd = tokio::process::Command::new(path);
    cmd.arg("--ipc-fd")
        .arg(IPC_FD.to_string())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .env_clear()
        .kill_on_drop(true);
    // The worker gets no environment but the diagnostics switches.
    for key in ["BULKHEAD_LOG", "RUST_BACKTRACE", "RUST_LOG"] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls (dup2, close_range, getrlimit, fcntl) on plain integers.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(high_raw, IPC_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Belt and braces: mark everything above 3 close-on-exec, even an fd someone forgot
            // to (closing instead would also close std's exec-error pipe).
            if libc::syscall(
                libc::SYS_close_range,
                IPC_FD + 1,
                u32::MAX,
                CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                let mut rl = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) == 0 {
                    rl.rlim_cur.min(65536) as RawFd
                } else {
                    1024
                };
                for fd in (IPC_FD + 1)..max {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| WorkerError::Spawn {
        path: path.to_path_buf(),
        source,
    })?;
    // Our copy of the worker's end closes here, so the worker's death closes the channel.
    drop(high);
    Ok(child)
}

/// `exited with status N` or `was killed by signal SIGNAME`.
pub fn describe_exit(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let core = if status.core_dumped() {
            " (core dumped)"
        } else {
            ""
        };
        format!("was killed by signal {}{core}", signal_name(sig))
    } else {
        format!("ended ({status})")
    }
}

/// The conventional name of signal `sig` (`SIGKILL`), or `signal N`.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSTKFLT => "SIGSTKFLT",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGSYS => "SIGSYS",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(0)),
            "exited with status 0"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "was killed by signal SIGKILL"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(11 | 0x80)),
            "was killed by signal SIGSEGV (core dumped)"
        );
        assert_eq!(signal_name(31), "SIGSYS");
        assert_eq!(signal_name(40), "signal 40");
    }

    #[test]
    fn worker_path_uses_given_dir_or_own_dir_never_path() {
        assert_eq!(
            worker_path(Some(Path::new("/opt/bh")), VCPU_WORKER).expect("path"),
            PathBuf::from("/opt/bh/bulkhead-vcpu")
        );
        let own = worker_path(None, VCPU_WORKER).expect("path");
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        assert_eq!(own.parent(), exe.parent());
        let rel = worker_path(Some(Path::new("rel")), VCPU_WORKER).expect("path");
        assert!(rel.is_absolute());
    }
}
