//! Starting a worker in its namespaces, and supervising it through a pidfd.
//!
//! [`Command::spawn`]:
//! 1. the parent opens the binary (`O_PATH`), prepares argv, envp and the fd plan, and two
//!    pipes: `sync` (the child waits on it) and `exec-error` (close-on-exec; the child writes the
//!    failing step and errno to it if anything before `execve` fails);
//! 2. `clone3(CLONE_PIDFD | CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC |
//!    CLONE_NEWUTS | CLONE_NEWNET)` — a raw system call: the child is a copy of the calling
//!    thread only, so from here to `execve` it makes async-signal-safe system calls and nothing
//!    else (no allocation, no locks);
//! 3. the parent writes `/proc/PID/uid_map` and `gid_map`: inside uid/gid 0 is an unprivileged
//!    id outside ([`IdMap`]: 65534 by default when the monitor is root, the monitor's own ids
//!    otherwise, after `setgroups` is denied as the kernel requires), then releases the child;
//! 4. the child becomes uid/gid 0 of its namespace (dropping root's supplementary groups first
//!    when the parent is root), asks for `SIGKILL` on its parent's death and checks the parent
//!    is still there (the sync pipe has not hung up), resets the signal mask and `SIGPIPE`,
//!    `dup2`s the handed fds to their fixed numbers, closes every other fd (close-on-exec for the
//!    ones it still needs) and `execveat`s the binary by its fd (no path lookup as the new user,
//!    no race with the path);
//! 5. the parent reads the exec-error pipe: EOF means the exec happened.
//!
//! Without namespaces (`--sandbox off`, or a kernel without user namespaces under
//! `--sandbox allow-weak`) the same path runs with `CLONE_PIDFD` only.
//!
//! Supervision: [`Child`] holds the pidfd. It becomes readable when the process exits (the
//! monitor waits for that with tokio's `AsyncFd`); [`Child::try_wait`] then collects the status
//! with `waitid(P_PIDFD)`; [`Child::kill`] uses `pidfd_send_signal`, which cannot hit a recycled
//! pid. Dropping an unreaped child kills and reaps it.

use std::ffi::{CString, OsStr};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::seccomp::Violation;
use crate::{Error, Result, REPORT_FD};

/// The most fds a worker can be handed.
pub const MAX_FDS: usize = 16;
/// "nobody", the default outside id of a worker started by root.
pub const NOBODY: u32 = 65534;

/// Whose ids a worker's uid/gid 0 maps to outside its user namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// Outside uid.
    pub uid: u32,
    /// Outside gid.
    pub gid: u32,
    /// The parent may map other ids than its own (it is root): root's supplementary groups are
    /// dropped in the child, and `setgroups` stays allowed for that one call.
    privileged: bool,
}

impl IdMap {
    /// The mapping for the current user: as root, `root_target` (`None`: nobody, 65534:65534);
    /// otherwise the caller's own uid and gid (`root_target` must then be `None` or those ids).
    pub fn for_current_user(root_target: Option<(u32, u32)>) -> Result<IdMap> {
        // SAFETY: geteuid/getegid cannot fail.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        if euid == 0 {
            let (uid, gid) = root_target.unwrap_or((NOBODY, NOBODY));
            if uid == 0 || gid == 0 {
                return Err(Error::Invalid(
                    "a worker may not be mapped to root outside its namespace".into(),
                ));
            }
            Ok(IdMap {
                uid,
                gid,
                privileged: true,
            })
        } else {
            if let Some(t) = root_target {
                if t != (euid, egid) {
                    return Err(Error::Invalid(format!(
                        "only root can run workers as {}:{}; an unprivileged monitor maps them \
                         to its own ids",
                        t.0, t.1
                    )));
                }
            }
            Ok(IdMap {
                uid: euid,
                gid: egid,
                privileged: false,
            })
        }
    }
}

/// A worker to start.
#[derive(Debug)]
pub struct Command {
    path: PathBuf,
    args: Vec<CString>,
    env: Vec<CString>,
    fds: Vec<(OwnedFd, RawFd)>,
    namespaces: u64,
    ids: Option<IdMap>,
    report: bool,
}

fn cstring(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| Error::Invalid(format!("{s:?} contains a NUL byte")))
}

fn launch_err(path: &Path, what: &'static str) -> Error {
    Error::Launch {
        path: path.display().to_string(),
        what,
        source: std::io::Error::last_os_error(),
    }
}

fn pipe(path: &Path) -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a writable array of two ints as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(launch_err(path, "pipe2"));
    }
    // SAFETY: pipe2 returned two new fds nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Command {
    /// A command running `path` (argv[0] is its file name), with an empty environment, no fds,
    /// and no namespaces.
    pub fn new(path: &Path) -> Result<Command> {
        let argv0 = path.file_name().unwrap_or(path.as_os_str());
        Ok(Command {
            path: path.to_path_buf(),
            args: vec![cstring(argv0)?],
            env: Vec::new(),
            fds: Vec::new(),
            namespaces: 0,
            ids: None,
            report: false,
        })
    }

    /// Adds an argument.
    pub fn arg(&mut self, a: impl AsRef<OsStr>) -> Result<&mut Self> {
        self.args.push(cstring(a.as_ref())?);
        Ok(self)
    }

    /// Adds `KEY=VALUE` to the environment.
    pub fn env(&mut self, key: &str, value: impl AsRef<OsStr>) -> Result<&mut Self> {
        let mut kv = key.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(value.as_ref().as_bytes());
        self.env.push(
            CString::new(kv).map_err(|_| Error::Invalid(format!("{key}: NUL in the value")))?,
        );
        Ok(self)
    }

    /// Hands the worker a copy of `fd` at number `target`.
    pub fn fd(&mut self, fd: BorrowedFd<'_>, target: RawFd) -> Result<&mut Self> {
        if target < 0 || self.fds.iter().any(|&(_, t)| t == target) {
            return Err(Error::Invalid(format!("fd target {target} is taken")));
        }
        if self.fds.len() + usize::from(self.report) >= MAX_FDS {
            return Err(Error::Invalid("too many fds for a worker".into()));
        }
        let dup = fd.try_clone_to_owned().map_err(|source| Error::Launch {
            path: self.path.display().to_string(),
            what: "dup",
            source,
        })?;
        self.fds.push((dup, target));
        Ok(self)
    }

    /// Starts the worker in the namespaces `flags` (`CLONE_NEW*`; 0: none) with `ids` mapped
    /// to its uid/gid 0 (required when `flags` has `CLONE_NEWUSER`).
    pub fn namespaces(&mut self, flags: u64, ids: Option<IdMap>) -> &mut Self {
        self.namespaces = flags;
        self.ids = ids;
        self
    }

    /// Gives the worker a violation-report pipe at [`REPORT_FD`]; [`Child::violation`] reads it.
    pub fn report_pipe(&mut self, yes: bool) -> &mut Self {
        self.report = yes;
        self
    }

    /// Starts the worker (see the module documentation). The command is consumed: the
    /// parent's copies of the handed fds are closed once the worker has its own.
    pub fn spawn(self) -> Result<Child> {
        let path = self.path.as_path();
        let userns = self.namespaces & libc::CLONE_NEWUSER as u64 != 0;
        let ids = match (userns, self.ids) {
            (true, Some(ids)) => Some(ids),
            (true, None) => {
                return Err(Error::Invalid(
                    "a user namespace needs an id mapping".into(),
                ))
            }
            (false, _) => None,
        };
        let cpath = cstring(path.as_os_str())?;
        // SAFETY: open with a NUL-terminated path; the result is a new fd we own.
        let exe = unsafe { libc::open(cpath.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        if exe < 0 {
            return Err(launch_err(path, "open"));
        }
        // SAFETY: open just returned this fd; nobody else owns it.
        let exe = unsafe { OwnedFd::from_raw_fd(exe) };
        let (err_r, err_w) = pipe(path)?;
        let (sync_r, sync_w) = pipe(path)?;
        let (report_r, report_w) = if self.report {
            let (r, w) = pipe(path)?;
            (Some(r), Some(w))
        } else {
            (None, None)
        };

        // Everything the child needs, as plain integers and pointers prepared here.
        let mut srcs = [-1; MAX_FDS];
        let mut dsts = [-1; MAX_FDS];
        let mut n = 0;
        for (fd, t) in self
            .fds
            .iter()
            .map(|(f, t)| (f.as_raw_fd(), *t))
            .chain(report_w.as_ref().map(|w| (w.as_raw_fd(), REPORT_FD)))
        {
            if n == MAX_FDS {
                return Err(Error::Invalid("too many fds for a worker".into()));
            }
            if dsts[..n].contains(&t) {
                return Err(Error::Invalid(format!("fd target {t} is taken")));
            }
            srcs[n] = fd;
            dsts[n] = t;
            n += 1;
        }
        let max_dst = dsts[..n].iter().copied().max().unwrap_or(2).max(2);
        let mut argv: Vec<*const libc::c_char> = self.args.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.env.iter().map(|a| a.as_ptr()).collect();
        envp.push(std::ptr::null());
        let plan = ChildPlan {
            exe: exe.as_raw_fd(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            srcs,
            dsts,
            n,
            high: max_dst + 1,
            err_w: err_w.as_raw_fd(),
            sync_r: sync_r.as_raw_fd(),
            sync_w: sync_w.as_raw_fd(),
            userns,
            drop_groups: ids.is_some_and(|i| i.privileged),
        };

        let mut pidfd: libc::c_int = -1;
        // SAFETY: clone_args is plain data; zero is the neutral value of every field.
        let mut args: libc::clone_args = unsafe { std::mem::zeroed() };
        args.flags = libc::CLONE_PIDFD as u64 | self.namespaces;
        args.pidfd = &mut pidfd as *mut libc::c_int as u64;
        args.exit_signal = libc::SIGCHLD as u64;
        // Without CLONE_VM the child gets a copy of this address space and runs on its copy of
        // this stack; it runs only `run_child`, which never returns and makes only
        // async-signal-safe calls.
        // SAFETY: clone3 with a valid clone_args of the size we pass; the child as above.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut libc::clone_args,
                std::mem::size_of::<libc::clone_args>(),
            )
        };
        if pid == 0 {
            // SAFETY: we are the child; see above.
            unsafe { run_child(&plan) }
        }
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            let what = match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOSPC) | Some(libc::EUSERS) if userns => {
                    "clone3 into new namespaces (are user namespaces disabled?)"
                }
                _ => "clone3",
            };
            return Err(Error::Launch {
                path: path.display().to_string(),
                what,
                source: e,
            });
        }
        let pid = pid as libc::pid_t;
        // SAFETY: CLONE_PIDFD stored a new pidfd (close-on-exec) that we now own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let mut child = Child {
            pid,
            pidfd,
            report: report_r,
            status: None,
            foreign: false,
        };
        drop(err_w);
        drop(sync_r);
        drop(report_w);
        drop(argv);
        drop(envp);
        if let Some(ids) = ids {
            if let Err(e) = write_id_maps(pid, ids) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Launch {
                    path: path.display().to_string(),
                    what: "writing the worker's uid/gid maps",
                    source: e,
                });
            }
        }
        // Release the child; keep our end open until the exec result is in, so the child can
        // tell a dead parent (hang-up) from a live one.
        // SAFETY: write of one byte from a local.
        let w = unsafe { libc::write(sync_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if w != 1 {
            let _ = child.kill();
            let _ = child.wait();
            return Err(launch_err(path, "releasing the child"));
        }
        let mut buf = Vec::new();
        let _ = std::fs::File::from(err_r).read_to_end(&mut buf);
        drop(sync_w);
        drop(exe);
        if buf.len() >= 8 {
            let stage = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let errno = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let _ = child.wait();
            return Err(Error::Launch {
                path: path.display().to_string(),
                what: STAGES.get(stage as usize).copied().unwrap_or("start"),
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
        Ok(child)
    }
}

fn write_id_maps(pid: libc::pid_t, ids: IdMap) -> std::io::Result<()> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(dir.join("uid_map"), format!("0 {} 1\n", ids.uid))?;
    if !ids.privileged {
        std::fs::write(dir.join("setgroups"), "deny")?;
    }
    std::fs::write(dir.join("gid_map"), format!("0 {} 1\n", ids.gid))?;
    Ok(())
}

/// The child's steps, for the error report.
const STAGES: &[&str] = &[
    "waiting for the parent",
    "setgroups in the worker's namespace",
    "setresgid in the worker's namespace",
    "setresuid in the worker's namespace",
    "setting the parent-death signal",
    "the parent went away",
    "resetting signals",
    "arranging the fds",
    "execveat",
];

struct ChildPlan {
    exe: RawFd,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    srcs: [RawFd; MAX_FDS],
    dsts: [RawFd; MAX_FDS],
    n: usize,
    high: RawFd,
    err_w: RawFd,
    sync_r: RawFd,
    sync_w: RawFd,
    userns: bool,
    drop_groups: bool,
}

/// Reports step `stage` with the current errno on `err` and exits.
///
/// # Safety
/// Only in the child between clone3 and exec.
unsafe fn fail(err: RawFd, stage: u32) -> ! {
    // SAFETY: reading errno of this (only) thread; writing a local buffer; _exit.
    unsafe {
        let errno = *libc::__errno_location();
        let mut buf = [0u8; 8];
        buf[..4].copy_from_slice(&stage.to_ne_bytes());
        buf[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(err, buf.as_ptr().cast(), buf.len());
        libc::_exit(127)
    }
}

/// The child side of [`Command::spawn`].
///
/// # Safety
/// Only in the child of clone3 (a copy of one thread of the parent): it makes only
/// async-signal-safe system calls on integers and on memory prepared by the parent.
unsafe fn run_child(p: &ChildPlan) -> ! {
    // SAFETY: each call below is a plain system call on integers or on memory the parent
    // prepared before clone3 (argv/envp arrays, the plan); nothing allocates or locks.
    unsafe {
        let mut err = p.err_w;
        libc::close(p.sync_w);
        let mut b = 0u8;
        if libc::read(p.sync_r, (&mut b as *mut u8).cast(), 1) != 1 {
            // The parent failed to map us, or died.
            libc::_exit(127);
        }
        if p.userns {
            if p.drop_groups && libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>()) != 0
            {
                fail(err, 1);
            }
            if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0 {
                fail(err, 2);
            }
            if libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0 {
                fail(err, 3);
            }
        }
        // After the uid change (which would clear it).
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
            fail(err, 4);
        }
        // Is the parent still there? It holds the sync pipe's write end until our exec.
        let mut pfd = libc::pollfd {
            fd: p.sync_r,
            events: 0,
            revents: 0,
        };
        let hung_up = libc::poll(&mut pfd, 1, 0) == 1 && pfd.revents & libc::POLLHUP != 0;
        if hung_up {
            fail(err, 5);
        }
        // Signals: nothing blocked, SIGPIPE back to the default (Rust ignores it).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        let dfl: libc::sigaction = std::mem::zeroed();
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0
            || libc::sigaction(libc::SIGPIPE, &dfl, std::ptr::null_mut()) != 0
        {
            fail(err, 6);
        }
        // Move what we still need above every target, then place the targets.
        err = libc::fcntl(err, libc::F_DUPFD_CLOEXEC, p.high);
        if err < 0 {
            libc::_exit(127);
        }
        let exe = libc::fcntl(p.exe, libc::F_DUPFD_CLOEXEC, p.high);
        if exe < 0 {
            fail(err, 7);
        }
        let mut tmp = [-1; MAX_FDS];
        for (t, &src) in tmp.iter_mut().zip(&p.srcs[..p.n]) {
            *t = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, p.high);
            if *t < 0 {
                fail(err, 7);
            }
        }
        for (&t, &dst) in tmp.iter().zip(&p.dsts[..p.n]) {
            if libc::dup2(t, dst) < 0 {
                fail(err, 7);
            }
        }
        // Below `high`: close whatever is not a target. Above: close-on-exec (the exec-error
        // pipe and the binary's fd are there and must stay open until execveat).
        for fd in 0..p.high {
            if !p.dsts[..p.n].contains(&fd) {
                libc::close(fd);
            }
        }
        if libc::syscall(
            libc::SYS_close_range,
            p.high as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            fail(err, 7);
        }
        libc::syscall(
            libc::SYS_execveat,
            exe,
            c"".as_ptr(),
            p.argv,
            p.envp,
            libc::AT_EMPTY_PATH,
        );
        fail(err, 8)
    }
}

/// The `CLD_*` part of a `waitid` siginfo.
#[repr(C)]
struct ChildInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    pid: libc::pid_t,
    uid: libc::uid_t,
    status: libc::c_int,
    _rest: [u8; 100],
}

/// A started worker.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    report: Option<OwnedFd>,
    status: Option<ExitStatus>,
    /// Another process's child, supervised here through a pidfd it handed over (the monitor's
    /// workers, started by its launcher): never reaped here; its status comes from the parent
    /// ([`Child::set_status`]).
    foreign: bool,
}

impl Child {
    /// A child of another process (the launcher), handed over as its pid, pidfd and
    /// violation-report pipe. The pidfd still says when it exits; the status must come from
    /// its parent through [`Child::set_status`]; dropping it only kills it.
    pub fn foreign(pid: libc::pid_t, pidfd: OwnedFd, report: Option<OwnedFd>) -> Child {
        Child {
            pid,
            pidfd,
            report,
            status: None,
            foreign: true,
        }
    }

    /// Records the exit status of a foreign child, as its parent reported it.
    pub fn set_status(&mut self, status: ExitStatus) {
        self.status = Some(status);
    }

    /// The status, once known (reaped here, or set by the parent of a foreign child).
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// Takes the read end of the violation-report pipe (to hand it to another process).
    pub fn take_report(&mut self) -> Option<OwnedFd> {
        self.report.take()
    }

    /// Whether the process has exited (its pidfd is readable), without reaping it; works for
    /// a foreign child too.
    pub fn has_exited(&self) -> bool {
        if self.status.is_some() {
            return true;
        }
        let mut p = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one pollfd we own, without waiting.
        let rc = unsafe { libc::poll(&mut p, 1, 0) };
        rc == 1 && p.revents & libc::POLLIN != 0
    }

    /// Its pid (in the launcher's pid namespace).
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Its pidfd: readable once it has exited.
    pub fn pidfd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }

    fn waitid(&mut self, flags: libc::c_int) -> std::io::Result<Option<ExitStatus>> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        if self.foreign {
            return if flags & libc::WNOHANG != 0 {
                Ok(None)
            } else {
                Err(std::io::Error::other(
                    "not our child: its parent reports its status",
                ))
            };
        }
        // SAFETY: a zeroed siginfo is valid; waitid fills it.
        let mut info: ChildInfo = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: waitid(P_PIDFD) writes at most a siginfo_t (128 bytes) into `info`.
            let rc = unsafe {
                libc::waitid(
                    libc::P_PIDFD,
                    self.pidfd.as_raw_fd() as libc::id_t,
                    (&mut info as *mut ChildInfo).cast(),
                    libc::WEXITED | flags,
                )
            };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        if info.pid == 0 {
            return Ok(None);
        }
        let raw = match info.code {
            libc::CLD_EXITED => (info.status & 0xff) << 8,
            libc::CLD_KILLED => info.status & 0x7f,
            libc::CLD_DUMPED => (info.status & 0x7f) | 0x80,
            _ => info.status,
        };
        let s = ExitStatus::from_raw(raw);
        self.status = Some(s);
        Ok(Some(s))
    }

    /// Its exit status if it has exited (reaping it), without blocking.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.waitid(libc::WNOHANG)
    }

    /// Waits for it to exit.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.waitid(0)?
            .ok_or_else(|| std::io::Error::other("waitid returned no child"))
    }

    /// Sends `sig` through the pidfd (never to a recycled pid). A worker already reaped is not
    /// an error.
    pub fn signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal on our pidfd, no siginfo, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// `SIGKILL`.
    pub fn kill(&self) -> std::io::Result<()> {
        self.signal(libc::SIGKILL)
    }

    /// The seccomp violation the worker reported, if any (read without blocking; meaningful
    /// once it has died by `SIGSYS`, and only then to be believed).
    pub fn violation(&mut self) -> Option<Violation> {
        let fd = self.report.as_ref()?;
        // SAFETY: F_GETFL/F_SETFL with integers on our fd.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl >= 0 {
                libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
            }
        }
        let mut buf = [0u8; 4096];
        let mut len = 0;
        while len < buf.len() {
            // SAFETY: read into the unused tail of a buffer we own.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    buf[len..].as_mut_ptr().cast(),
                    buf.len() - len,
                )
            };
            if n <= 0 {
                break;
            }
            len += n as usize;
        }
        Violation::parse(&String::from_utf8_lossy(&buf[..len]))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.kill();
            if !self.foreign {
                let _ = self.wait();
            }
        }
    }
}
