//! Spawning and supervising `bulkhead-vcpu`.
//!
//! The worker binary is looked up in one directory only: the directory of the monitor's own
//! executable (`/proc/self/exe`), or the one given with `--worker-dir`. `PATH` is never searched.
//!
//! The worker is started by [`bulkhead_sandbox::launch`] as
//! `bulkhead-vcpu --ipc-fd 3 --sandbox MODE --mem-bytes N --vcpus N` with `/dev/null` on stdin,
//! the monitor's stderr on stdout and stderr, its end of a fresh `SOCK_SEQPACKET` pair at fd 3,
//! the write end of its violation-report pipe at fd 4 (unless `--sandbox off`), and no other fd.
//! Its environment is empty but for `BULKHEAD_LOG`, `RUST_BACKTRACE` and `RUST_LOG`. Everything
//! else the worker needs (`/dev/kvm`, guest RAM, kernel, initrd, serial) travels over the
//! channel with the `Setup` request.
//!
//! Sandbox (`--sandbox`, see [`SandboxConfig`]): `on` (the default) starts it in fresh user,
//! mount, pid, ipc, uts and network namespaces, as uid/gid 0 inside mapped to an unprivileged
//! id outside (nobody, 65534, when the monitor is root; `--sandbox-user` changes it; the
//! monitor's own ids otherwise), and the worker confines itself fully before reading anything
//! or refuses to run; `allow-weak` does what the kernel allows and says what is missing; `off`
//! (debugging only) starts it without namespaces and the worker skips confinement.
//!
//! Supervision goes through the launcher's pidfd: [`WorkerProcess::wait`] waits for it to become
//! readable (tokio `AsyncFd`) and collects the status with `waitid(P_PIDFD)`; the channel reports
//! [`bulkhead_ipc::Error::PeerClosed`] at the same moment. Kills go through
//! `pidfd_send_signal`, so a recycled pid is never hit. [`describe_exit`] renders the status as
//! the logs show it, and [`WorkerProcess::describe`] adds the system call a seccomp violation
//! named.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use bulkhead_sandbox::launch::{Child, Command, IdMap};
use bulkhead_sandbox::seccomp::Violation;
use bulkhead_sandbox::{Mode, Params, Role};
use tokio::io::unix::AsyncFd;

/// The worker's file name.
pub const VCPU_WORKER: &str = "bulkhead-vcpu";
/// The fd number the worker finds its channel at.
pub const IPC_FD: RawFd = 3;

/// Errors starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The monitor's own executable path cannot be read.
    #[error("cannot find the bulkhead executable's directory: {0}")]
    SelfExe(std::io::Error),
    /// The worker could not be started.
    #[error(transparent)]
    Spawn(#[from] bulkhead_sandbox::Error),
    /// Preparing an fd failed.
    #[error("cannot prepare the worker's fds: {0}")]
    Fd(std::io::Error),
    /// The launcher could not start the worker.
    #[error(transparent)]
    Launcher(#[from] crate::launcher::LauncherError),
}

/// How the monitor confines its workers (`--sandbox`, `--sandbox-user`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxConfig {
    /// `on`, `off` or `allow-weak`.
    pub mode: Mode,
    /// The outside uid:gid a worker's root maps to when the monitor runs as root (default:
    /// nobody, 65534:65534).
    pub ids: Option<(u32, u32)>,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            mode: Mode::On,
            ids: None,
        }
    }
}

impl SandboxConfig {
    /// Checks this kernel against the vcpu role's policy: `Ok(warnings)` to log, or the
    /// refusal. `off` always passes (with its loud warning).
    pub fn preflight(&self) -> Result<Vec<String>, WorkerError> {
        match self.mode {
            Mode::Off => Ok(vec![
                "***** --sandbox off: the vCPU worker runs WITHOUT namespaces, capability \
                 dropping, landlock or seccomp. A guest that takes over the worker owns the \
                 host user it runs as. For debugging only. *****"
                    .to_string(),
            ]),
            mode => {
                IdMap::for_current_user(self.ids)?;
                let policy = Role::Vcpu.policy();
                let missing = bulkhead_sandbox::features::Features::probe().missing_for(policy);
                if missing.is_empty() {
                    Ok(Vec::new())
                } else if mode == Mode::AllowWeak {
                    Ok(missing
                        .into_iter()
                        .map(|m| format!("--sandbox allow-weak: {m}; confinement is weaker"))
                        .collect())
                } else {
                    Err(bulkhead_sandbox::Error::Weak {
                        role: policy.role.name(),
                        missing,
                    }
                    .into())
                }
            }
        }
    }
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

/// Marks every fd above 2 that the monitor inherited close-on-exec. Call once at startup. The
/// launcher closes everything a worker was not handed anyway; this keeps other children (none
/// today) from inheriting them too.
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

/// The launcher's child, registered with tokio through its pidfd.
struct PidFd(Child);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.pidfd().as_raw_fd()
    }
}

/// A running worker. Dropping it kills and reaps the process.
pub struct WorkerProcess {
    inner: AsyncFd<PidFd>,
    /// The launcher that started it (its parent, which reaps it), if any.
    launcher: Option<&'static crate::launcher::Launcher>,
}

impl std::fmt::Debug for WorkerProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WorkerProcess(pid {})", self.id())
    }
}

impl WorkerProcess {
    /// Its pid (as the monitor sees it; inside its pid namespace it is 1).
    pub fn id(&self) -> u32 {
        self.inner.get_ref().0.pid() as u32
    }

    /// Its exit status, once it has exited (reaping it); cancel-safe.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(s);
            }
            let mut guard = self.inner.readable_mut().await?;
            guard.clear_ready();
        }
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        let child = &mut self.inner.get_mut().0;
        if let Some(l) = self.launcher {
            if child.status().is_none() && child.has_exited() {
                let s = l.wait(child.pid()).map_err(std::io::Error::other)?;
                child.set_status(s);
            }
        }
        child.try_wait()
    }

    /// Sends SIGKILL (the exit is then collected by [`WorkerProcess::wait`]).
    pub fn start_kill(&mut self) -> std::io::Result<()> {
        self.inner.get_ref().0.kill()
    }

    /// How it ended, with the refused system call when the sandbox killed it.
    pub fn describe(&mut self, status: ExitStatus) -> String {
        self.describe_with_violation(status).0
    }

    /// [`WorkerProcess::describe`], and the violation itself when the sandbox killed it (the
    /// report is read once: call one of the two, once).
    pub fn describe_with_violation(&mut self, status: ExitStatus) -> (String, Option<Violation>) {
        let mut d = describe_exit(status);
        let mut violation = None;
        if status.signal() == Some(libc::SIGSYS) {
            match self.inner.get_mut().0.violation() {
                Some(v) => {
                    d.push_str(&format!(": the sandbox refused {v}"));
                    violation = Some(v);
                }
                None => d.push_str(" (no seccomp report)"),
            }
        }
        (d, violation)
    }

    /// The seccomp violation it reported (believe it only after a death by SIGSYS).
    pub fn violation(&mut self) -> Option<Violation> {
        self.inner.get_mut().0.violation()
    }
}

/// The launcher, once the monitor has forked one (see [`crate::launcher`]): from then on
/// every worker is started through it.
static LAUNCHER: std::sync::OnceLock<crate::launcher::Launcher> = std::sync::OnceLock::new();

/// Registers the launcher every later [`spawn`] goes through (once).
pub fn set_launcher(l: crate::launcher::Launcher) {
    let _ = LAUNCHER.set(l);
}

/// The namespace ids of `pid` (the launcher or a worker it started) as the launcher reads
/// them; `None` without a launcher or when it cannot answer.
pub fn launcher_namespaces(pid: u32) -> Option<Vec<(&'static str, u64)>> {
    let l = LAUNCHER.get()?;
    match l.namespaces(pid as i32) {
        Ok(v) => Some(v),
        Err(e) => {
            log::debug!("launcher: namespaces of pid {pid}: {e}");
            None
        }
    }
}

/// Ends and reaps the launcher, if there is one (at exit, after the last worker is gone).
pub fn stop_launcher() {
    if let Some(l) = LAUNCHER.get() {
        l.stop();
    }
}

/// The launcher's pid, if there is one.
pub fn launcher_pid() -> Option<u32> {
    LAUNCHER.get().map(crate::launcher::Launcher::pid)
}

/// Starts `path` with `ipc` as its channel, confined by `sandbox` for a guest described by
/// `params` (see the module documentation): through the launcher when there is one (the
/// worker is then the launcher's child, supervised here by its pidfd), directly otherwise.
pub fn spawn(
    path: &Path,
    ipc: OwnedFd,
    sandbox: &SandboxConfig,
    params: Params,
) -> Result<WorkerProcess, WorkerError> {
    spawn_role(Role::Vcpu, path, ipc, sandbox, params)
}

/// [`spawn`] for a worker of `role` (`Vcpu` or `Blockd`; the launcher starts the binary it was
/// given for that role, `path` is used only without a launcher).
pub fn spawn_role(
    role: Role,
    path: &Path,
    ipc: OwnedFd,
    sandbox: &SandboxConfig,
    params: Params,
) -> Result<WorkerProcess, WorkerError> {
    spawn_role_with_log(role, path, ipc, None, sandbox, params)
}

/// [`spawn_role`] with `log` (a socket the monitor reads) as the worker's stdout and stderr.
pub fn spawn_role_with_log(
    role: Role,
    path: &Path,
    ipc: OwnedFd,
    log: Option<OwnedFd>,
    sandbox: &SandboxConfig,
    params: Params,
) -> Result<WorkerProcess, WorkerError> {
    let (child, launcher) = match LAUNCHER.get() {
        Some(l) => (l.spawn_worker_with_log(role, ipc, log, params)?, Some(l)),
        None => (
            launch_with_log(path, role, ipc, log, sandbox, params)?,
            None,
        ),
    };
    // The pidfd belongs to `child`, which the AsyncFd owns for its whole life.
    // SAFETY: the Child never closes or replaces its pidfd before it is dropped.
    let registered =
        unsafe { AsyncFd::register_with_interest(PidFd(child), tokio::io::Interest::READABLE) };
    let inner = registered.map_err(|e| WorkerError::Fd(e.into()))?;
    Ok(WorkerProcess { inner, launcher })
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // A launcher's worker: kill it and have the launcher reap it (the Child, not ours to
        // reap, would only kill it).
        if let Some(l) = self.launcher {
            let child = &mut self.inner.get_mut().0;
            if child.status().is_none() {
                let _ = child.kill();
                if let Ok(s) = l.wait(child.pid()) {
                    child.set_status(s);
                }
            }
        }
    }
}

/// Starts `path` as a worker of `role` (the launch proper, in the monitor or in its launcher):
/// `bulkhead-vcpu --ipc-fd 3 --sandbox MODE --mem-bytes N --vcpus N` or
/// `bulkhead-blockd --ipc-fd 3 --sandbox MODE --mem-bytes N --queues N` (and the same for
/// `bulkhead-netd`).
pub fn launch(
    path: &Path,
    role: Role,
    ipc: OwnedFd,
    sandbox: &SandboxConfig,
    params: Params,
) -> Result<Child, WorkerError> {
    launch_with_log(path, role, ipc, None, sandbox, params)
}

/// [`launch`] with `log` (a socket the monitor reads), when given, as the worker's stdout and stderr
/// instead of the monitor's stderr.
pub fn launch_with_log(
    path: &Path,
    role: Role,
    ipc: OwnedFd,
    log: Option<OwnedFd>,
    sandbox: &SandboxConfig,
    params: Params,
) -> Result<Child, WorkerError> {
    let devnull = std::fs::File::open("/dev/null").map_err(WorkerError::Fd)?;
    let mem = params.mem_bytes.to_string();
    let (count_flag, count) = match role {
        Role::Blockd | Role::Netd => ("--queues", params.queues.to_string()),
        _ => ("--vcpus", params.vcpus.to_string()),
    };
    let mut with_namespaces = sandbox.mode != Mode::Off;
    if sandbox.mode == Mode::AllowWeak
        && bulkhead_sandbox::features::user_namespaces_blocked().is_some()
    {
        with_namespaces = false;
    }
    loop {
        let mut cmd = Command::new(path)?;
        for a in [
            "--ipc-fd",
            "3",
            "--sandbox",
            sandbox.mode.name(),
            "--mem-bytes",
            mem.as_str(),
            count_flag,
            count.as_str(),
        ] {
            cmd.arg(a)?;
        }
        // The worker gets no environment but the diagnostics switches.
        for key in ["BULKHEAD_LOG", "RUST_BACKTRACE", "RUST_LOG"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v)?;
            }
        }
        // Its stdout goes to our stderr: our stdout may be the guest's serial console.
        let stderr = std::io::stderr();
        let out = log.as_ref().map_or(stderr.as_fd(), AsFd::as_fd);
        cmd.fd(devnull.as_fd(), 0)?
            .fd(out, 1)?
            .fd(out, 2)?
            .fd(ipc.as_fd(), IPC_FD)?;
        cmd.report_pipe(sandbox.mode != Mode::Off);
        if with_namespaces {
            cmd.namespaces(
                role.policy().namespaces,
                Some(IdMap::for_current_user(sandbox.ids)?),
            );
        }
        match cmd.spawn() {
            // Our copy of the worker's end closes when `ipc` drops, so its death closes the
            // channel.
            Ok(child) => return Ok(child),
            Err(e) if with_namespaces && sandbox.mode == Mode::AllowWeak => {
                log::warn!(
                    "--sandbox allow-weak: {e}; starting {} without namespaces",
                    path.display()
                );
                with_namespaces = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
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
