//! `-daemonize` and `-pidfile`, as QEMU does them.
//!
//! [`daemonize`] must run before any thread exists (before the tokio runtime is built). The
//! original process forks, then waits on a pipe; the child calls `setsid` and forks again, and
//! the grandchild carries on as the daemon (umask 027, terminal job-control signals ignored).
//! Only once the daemon is ready to serve — QMP sockets listening, worker set up — does it call
//! [`Ready::notify`], which moves to `/`, points stdin/stdout/stderr at `/dev/null` and writes a
//! zero byte to the pipe; the original process then exits 0. If the daemon fails first, the pipe
//! closes empty and the original process exits 1 (the error was already printed on the
//! still-attached stderr).
//!
//! [`Pidfile`] is QEMU's `qemu_write_pidfile`: open/create mode 0600, `lockf(F_TLOCK)` (a second
//! instance fails with "Cannot lock pid file"), check the locked inode is still the one at the
//! path, truncate, write `PID\n`, keep the fd (and so the lock) open. The file is removed at exit
//! if it is still ours.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Errors daemonizing or writing the pid file.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The pid file could not be opened.
    #[error("cannot create PID file: Cannot open pid file: {0}")]
    PidOpen(std::io::Error),
    /// Another process holds the pid file's lock.
    #[error("cannot create PID file: Cannot lock pid file: {0}")]
    PidLock(std::io::Error),
    /// Writing the pid failed.
    #[error("cannot create PID file: Failed to write pid file: {0}")]
    PidWrite(std::io::Error),
    /// A daemonizing step failed.
    #[error("cannot daemonize: {what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn sys(what: &'static str) -> DaemonError {
    DaemonError::Sys {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// A written, locked pid file, removed on drop if it is still ours.
#[derive(Debug)]
pub struct Pidfile {
    path: PathBuf,
    file: File,
}

impl Pidfile {
    /// Its path (as given; removed at exit).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates, locks and writes the pid file at `path`.
    pub fn create(path: &Path) -> Result<Self, DaemonError> {
        let path = crate::chardev::absolute(path);
        let file = loop {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_CLOEXEC)
                .open(&path)
                .map_err(DaemonError::PidOpen)?;
            // SAFETY: lockf on an fd we own, with integer arguments.
            if unsafe { libc::lockf(file.as_raw_fd(), libc::F_TLOCK, 0) } < 0 {
                return Err(DaemonError::PidLock(std::io::Error::last_os_error()));
            }
            let locked = file.metadata().map_err(DaemonError::PidOpen)?;
            match std::fs::metadata(&path) {
                // Someone removed or replaced it between open and lock: try again.
                Ok(now) if now.ino() == locked.ino() && now.dev() == locked.dev() => break file,
                _ => continue,
            }
        };
        file.set_len(0).map_err(DaemonError::PidWrite)?;
        (&file)
            .write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(DaemonError::PidWrite)?;
        Ok(Pidfile { path, file })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        if let (Ok(ours), Ok(there)) = (self.file.metadata(), std::fs::metadata(&self.path)) {
            if ours.ino() == there.ino() && ours.dev() == there.dev() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The daemon's promise to its waiting ancestor.
#[derive(Debug)]
pub struct Ready {
    pipe: OwnedFd,
    null: Option<File>,
}

impl Ready {
    /// The part of detaching that needs the filesystem: cwd `/` and `/dev/null` opened. Done
    /// before the monitor confines itself (once every configured path has been opened);
    /// [`Ready::notify`] does it if it was not.
    pub fn prepare(&mut self) -> Result<(), DaemonError> {
        if self.null.is_some() {
            return Ok(());
        }
        std::env::set_current_dir("/").map_err(|source| DaemonError::Sys {
            what: "chdir /",
            source,
        })?;
        let null = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|source| DaemonError::Sys {
                what: "open /dev/null",
                source,
            })?;
        self.null = Some(null);
        Ok(())
    }

    /// Finishes detaching (cwd `/`, stdio to `/dev/null`) and releases the waiting parent,
    /// which exits 0.
    pub fn notify(mut self) -> Result<(), DaemonError> {
        self.prepare()?;
        let Some(null) = self.null.take() else {
            return Err(sys("open /dev/null"));
        };
        for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
            // SAFETY: dup2 of an fd we own onto a standard stream number.
            if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                return Err(sys("dup2 /dev/null"));
            }
        }
        let status = [0u8];
        // SAFETY: writing one byte from a valid buffer to the pipe we own.
        let n = unsafe { libc::write(self.pipe.as_raw_fd(), status.as_ptr().cast(), 1) };
        if n != 1 {
            return Err(sys("notify parent"));
        }
        Ok(())
    }
}

/// Detaches from the terminal. Returns in the daemon only; the original process exits with the
/// daemon's readiness (0) or failure (1). Must be called while the process is single-threaded.
pub fn daemonize() -> Result<Ready, DaemonError> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a writable array of two ints as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(sys("pipe2"));
    }
    // SAFETY: pipe2 succeeded; both fds are new and ours.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (documented precondition), so the child may
    // continue running arbitrary code.
    match unsafe { libc::fork() } {
        -1 => return Err(sys("fork")),
        0 => {}
        _ => {
            drop(wr);
            let mut status = [1u8];
            let n = loop {
                // SAFETY: reading one byte into a valid buffer from the pipe we own.
                let n = unsafe { libc::read(rd.as_raw_fd(), status.as_mut_ptr().cast(), 1) };
                if n < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                break n;
            };
            // SAFETY: _exit ends the process without running destructors or atexit handlers
            // meant for the daemon.
            unsafe { libc::_exit(if n == 1 && status[0] == 0 { 0 } else { 1 }) };
        }
    }
    drop(rd);
    // SAFETY: setsid has no arguments.
    if unsafe { libc::setsid() } < 0 {
        return Err(sys("setsid"));
    }
    // SAFETY: still single-threaded, as above.
    match unsafe { libc::fork() } {
        -1 => return Err(sys("fork")),
        0 => {}
        // SAFETY: the intermediate process just exits.
        _ => unsafe { libc::_exit(0) },
    }
    // SAFETY: umask and signal with constant arguments.
    unsafe {
        libc::umask(0o027);
        libc::signal(libc::SIGTSTP, libc::SIG_IGN);
        libc::signal(libc::SIGTTOU, libc::SIG_IGN);
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
    }
    Ok(Ready {
        pipe: wr,
        null: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pidfile_is_written_locked_and_removed() {
        let dir = std::env::temp_dir().join(format!("bh-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("pid");
        let pf = Pidfile::create(&path).expect("create");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            format!("{}\n", std::process::id())
        );
        assert_eq!(
            std::fs::metadata(&path).expect("meta").mode() & 0o777,
            0o600 & !current_umask()
        );
        // lockf locks are per process, so a second lock from this process succeeds; the
        // cross-process refusal is covered by the integration tests.
        drop(pf);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    fn current_umask() -> u32 {
        // SAFETY: umask with integer arguments; restored immediately.
        let m = unsafe { libc::umask(0o022) };
        // SAFETY: as above.
        unsafe { libc::umask(m) };
        m
    }
}
