//! The launcher: the one process of a confined monitor that may still start processes.
//!
//! A landlocked process cannot `mount` or `pivot_root`, not even in namespaces it creates
//! afterwards, and seccomp filters and landlock domains are inherited through `clone3` and
//! `execve`. A monitor that confines itself can therefore no longer start a worker that builds
//! its own empty root. So, before the async runtime starts and before anything from a client is
//! read, the monitor forks this launcher ([`Launcher::start`]); afterwards only the launcher
//! starts workers, on request over a `SOCK_SEQPACKET` socketpair:
//!
//! - requests: fixed-size datagrams ([`REQUEST_LEN`] bytes: magic, kind, two numbers, zero
//!   padding). `spawn` (the vCPU worker, guest RAM bytes, vCPUs), `spawn-blockd` (a block
//!   back end, guest memory bytes, queues) and `spawn-netd` (a net back end, guest memory
//!   bytes, 2 queues) carry the worker's end of its ipc socketpair (`spawn-netd` also the
//!   a socket for netd's stdout and stderr: see [`Launcher::spawn_worker_with_log`]); `wait` (a pid the launcher started) carries none.
//!   Anything else (other size, magic or kind, out-of-range numbers, a wrong number of fds, an
//!   fd that is not a socket, an unknown pid) is refused and its fds closed;
//! - `spawn` starts the binary fixed when the launcher was forked (no path ever travels in a
//!   request) with the arguments, environment, fds and namespaces `worker::spawn` always used,
//!   and answers with the worker's pid, a copy of its pidfd and the read end of its
//!   violation-report pipe;
//! - the worker is the launcher's child. `CLONE_PARENT` (making it the monitor's child
//!   directly) is not possible: the kernel refuses it together with `CLONE_NEWUSER` or
//!   `CLONE_NEWPID` (`EINVAL`, `copy_process`). So the monitor polls the pidfd for the exit
//!   (that works for any process) and kills through it (`pidfd_send_signal`), and the exit
//!   status — `waitid(P_PIDFD)` works for a child only — comes from the launcher: `wait` makes
//!   it reap the worker and answer with the status. The monitor asks only once the pidfd says
//!   the worker has exited (or after killing it), so the launcher never blocks for long.
//!
//! The launcher's own confinement is what starting workers leaves possible: it cannot have a
//! seccomp filter or a landlock domain (its workers would inherit them; that is why it exists).
//! It has: no client-facing input (only the monitor's typed requests), no fds but stderr, its
//! socket and `/dev/null` on stdin/stdout, `no_new_privs`, no core dumps, `/` as cwd,
//! `SIGKILL` when the monitor dies (and it exits when the socket closes), terminal signals
//! blocked (the mask is reset in each worker before `execve`), and as root only the
//! capabilities a launch needs (`CAP_SETUID`/`CAP_SETGID` to write a worker's id maps to
//! nobody, `CAP_KILL` to kill a failed worker that already changed ids,
//! `CAP_DAC_READ_SEARCH` for a worker directory not readable by root's ids): everything else
//! is gone from every set, the bounding set included.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use bulkhead_sandbox::launch::Child;
use bulkhead_sandbox::{Params, Role};

use crate::worker::{self, SandboxConfig, WorkerError};

/// Request magic (`BLR1`).
const REQUEST_MAGIC: u32 = 0x3152_4c42;
/// Reply magic (`BLA1`).
const REPLY_MAGIC: u32 = 0x3141_4c42;
/// Bytes of a request: magic u32, kind u32, a u64, b u32, padding u32 (0). `spawn`: a = guest
/// RAM bytes, b = vCPUs; `wait`: a = pid, b = 0.
pub const REQUEST_LEN: usize = 24;
/// The message part of a reply.
const MSG_LEN: usize = 480;
/// Bytes of a reply: magic u32, status u32 (0 ok), pid i32, wait status i32, message length
/// u32, message.
const REPLY_LEN: usize = 20 + MSG_LEN;
/// Request kind: start the vCPU worker (the only worker there is today).
pub const SPAWN_VCPU: u32 = 1;
/// Request kind: reap a worker the launcher started and report its status.
pub const WAIT: u32 = 2;
/// Request kind: the namespace ids of the launcher itself or of a worker it started (a
/// landlocked monitor may not read `/proc/PID/ns` of a process outside its landlock domain).
pub const NAMESPACES: u32 = 3;
/// Request kind: start a block back end (`bulkhead-blockd`); a = the guest memory it may map
/// in bytes, b = its queues.
pub const SPAWN_BLOCKD: u32 = 4;
/// Request kind: start a net back end (`bulkhead-netd`); a = the guest memory it may map in
/// bytes, b = its virtqueues ([`crate::nics::NET_QUEUES`]).
pub const SPAWN_NETD: u32 = 5;
/// The namespaces a [`NAMESPACES`] reply lists, in this order (inode 0: unreadable).
pub const NS_KINDS: [&str; 10] = [
    "cgroup",
    "ipc",
    "mnt",
    "net",
    "pid",
    "pid_for_children",
    "time",
    "time_for_children",
    "user",
    "uts",
];
/// Most workers the launcher keeps unreaped: one machine worker and a blockd per disk or a
/// netd per NIC (at most 31 together) run at a time; a dying set may overlap with the next.
const MAX_CHILDREN: usize = 72;
/// Guest RAM bounds a request must respect (the command line enforces tighter ones).
const MAX_MEM_BYTES: u64 = 1 << 46;

/// Errors starting or talking to the launcher.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    /// A system call failed.
    #[error("launcher: {what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The launcher's answer was malformed.
    #[error("launcher: malformed reply: {0}")]
    Reply(String),
    /// The launcher could not start the worker.
    #[error("{0}")]
    Refused(String),
}

fn sys(what: &'static str) -> LauncherError {
    LauncherError::Sys {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// The monitor's handle on its launcher.
#[derive(Debug)]
pub struct Launcher {
    sock: OwnedFd,
    pid: libc::pid_t,
    /// One request at a time (a reply answers the last request).
    busy: std::sync::Mutex<()>,
}

/// What the launcher may start, fixed when it is forked.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    /// The vCPU worker binary.
    pub vcpu_path: PathBuf,
    /// The block back end binary (`None`: the machine has no disks; requests are refused).
    pub blockd_path: Option<PathBuf>,
    /// The net back end binary (`None`: no NICs can be served; requests are refused).
    pub netd_path: Option<PathBuf>,
    /// How workers are confined.
    pub sandbox: SandboxConfig,
}

impl Launcher {
    /// Forks the launcher. Call while the monitor has one thread, before any client input.
    pub fn start(cfg: LauncherConfig) -> Result<Launcher, LauncherError> {
        let mut sv = [-1; 2];
        // SAFETY: socketpair writes two fds into `sv`, which has room for them.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                sv.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(sys("socketpair"));
        }
        // SAFETY: socketpair returned two new fds nobody else owns.
        let (mine, theirs) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
        // SAFETY: getpid cannot fail.
        let monitor = unsafe { libc::getpid() };
        // SAFETY: the caller guarantees one thread; the child runs only `launcher_main`, which
        // never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(sys("fork"));
        }
        if pid == 0 {
            drop(mine);
            let code = launcher_main(theirs, monitor, &cfg);
            // SAFETY: ending the launcher without running the monitor's exit handlers.
            unsafe { libc::_exit(code) };
        }
        drop(theirs);
        Ok(Launcher {
            sock: mine,
            pid,
            busy: std::sync::Mutex::new(()),
        })
    }

    /// Ends the launcher (it exits when its socket closes) and reaps it. Call once, at exit.
    pub fn stop(&self) {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: shutdown on our socket; waitid(P_PID) on our own child into a local siginfo.
        unsafe {
            libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR);
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                self.pid as libc::id_t,
                &mut info,
                libc::WEXITED,
            );
        }
    }

    /// The launcher's pid.
    pub fn pid(&self) -> u32 {
        self.pid as u32
    }

    /// One request and its reply: (pid, wait status, fds, message) or the launcher's refusal.
    fn call(
        &self,
        kind: u32,
        a: u64,
        b: u32,
        fds: &[RawFd],
    ) -> Result<(i32, i32, Vec<OwnedFd>, Vec<u8>), LauncherError> {
        let _one = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let mut req = [0u8; REQUEST_LEN];
        req[0..4].copy_from_slice(&REQUEST_MAGIC.to_ne_bytes());
        req[4..8].copy_from_slice(&kind.to_ne_bytes());
        req[8..16].copy_from_slice(&a.to_ne_bytes());
        req[16..20].copy_from_slice(&b.to_ne_bytes());
        send(self.sock.as_raw_fd(), &req, fds).map_err(|source| LauncherError::Sys {
            what: "sending a request (is the launcher still running?)",
            source,
        })?;
        let mut buf = [0u8; REPLY_LEN + 1];
        let (n, fds) =
            recv(self.sock.as_raw_fd(), &mut buf, 2).map_err(|source| LauncherError::Sys {
                what: "reading the reply",
                source,
            })?;
        if n == 0 {
            return Err(LauncherError::Reply("the launcher has exited".into()));
        }
        if n != REPLY_LEN {
            return Err(LauncherError::Reply(format!("{n} bytes")));
        }
        let u32_at = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        if u32_at(0) != REPLY_MAGIC {
            return Err(LauncherError::Reply("bad magic".into()));
        }
        if u32_at(4) != 0 {
            let len = (u32_at(16) as usize).min(MSG_LEN);
            return Err(LauncherError::Refused(
                String::from_utf8_lossy(&buf[20..20 + len]).into_owned(),
            ));
        }
        let len = (u32_at(16) as usize).min(MSG_LEN);
        Ok((
            u32_at(8) as i32,
            u32_at(12) as i32,
            fds,
            buf[20..20 + len].to_vec(),
        ))
    }

    /// The namespace ids (kind, inode) of the launcher itself or of a worker it started, as the
    /// launcher reads them from `/proc/PID/ns`.
    pub fn namespaces(&self, pid: i32) -> Result<Vec<(&'static str, u64)>, LauncherError> {
        let (_, _, _, msg) = self.call(NAMESPACES, pid as u64, 0, &[])?;
        if msg.len() != 8 * NS_KINDS.len() {
            return Err(LauncherError::Reply(format!(
                "{} bytes of namespace ids",
                msg.len()
            )));
        }
        Ok(NS_KINDS
            .iter()
            .zip(msg.chunks_exact(8))
            .filter_map(|(k, c)| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                let ino = u64::from_ne_bytes(b);
                (ino != 0).then_some((*k, ino))
            })
            .collect())
    }

    /// Asks for a vCPU worker with `ipc` as its channel. The worker is the launcher's child:
    /// supervise it through the pidfd and get its status with [`Launcher::wait`].
    pub fn spawn_vcpu(&self, ipc: OwnedFd, params: Params) -> Result<Child, LauncherError> {
        self.spawn_worker(Role::Vcpu, ipc, params)
    }

    /// Asks for a worker of `role` (`Vcpu` or `Blockd`) with `ipc` as its channel.
    pub fn spawn_worker(
        &self,
        role: Role,
        ipc: OwnedFd,
        params: Params,
    ) -> Result<Child, LauncherError> {
        self.spawn_worker_with_log(role, ipc, None, params)
    }

    /// [`Launcher::spawn_worker`], with `log` (a socket whose other end the monitor reads) as
    /// the worker's stdout and stderr instead of the monitor's stderr: netd's (`RLIMIT_FSIZE` 0 forbids it to write
    /// a regular file, which the monitor's stderr often is).
    pub fn spawn_worker_with_log(
        &self,
        role: Role,
        ipc: OwnedFd,
        log: Option<OwnedFd>,
        params: Params,
    ) -> Result<Child, LauncherError> {
        let (kind, b) = match role {
            Role::Vcpu => (SPAWN_VCPU, params.vcpus),
            Role::Blockd => (SPAWN_BLOCKD, params.queues),
            Role::Netd => (SPAWN_NETD, params.queues),
            other => {
                return Err(LauncherError::Refused(format!(
                    "the launcher does not start {} workers",
                    other.name()
                )))
            }
        };
        let mut sent = vec![ipc.as_raw_fd()];
        sent.extend(log.as_ref().map(AsRawFd::as_raw_fd));
        let (pid, _, fds, _) = self.call(kind, params.mem_bytes, b, &sent)?;
        drop(ipc);
        drop(log);
        let mut fds = fds.into_iter();
        let pidfd = fds
            .next()
            .ok_or_else(|| LauncherError::Reply("no pidfd".into()))?;
        if pid <= 0 {
            return Err(LauncherError::Reply(format!("pid {pid}")));
        }
        Ok(Child::foreign(pid, pidfd, fds.next()))
    }

    /// Has the launcher reap worker `pid` (call once it has exited, or after killing it: the
    /// launcher waits for it) and returns its exit status.
    pub fn wait(&self, pid: i32) -> Result<ExitStatus, LauncherError> {
        let (_, status, _, _) = self.call(WAIT, pid as u64, 0, &[])?;
        Ok(ExitStatus::from_raw(status))
    }
}

/// Sends one datagram with `fds` attached.
fn send(sock: RawFd, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut cmsg = [0u64; 8];
    let fd_bytes = std::mem::size_of_val(fds);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        // SAFETY: CMSG_SPACE is a pure computation.
        let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
        assert!(space <= std::mem::size_of_val(&cmsg));
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is 8-byte aligned and `space` bytes long, enough for one
        // header with `fds` after it (checked above).
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), fd_bytes);
        }
    }
    loop {
        // SAFETY: `msg` describes valid buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives one datagram into `buf` and at most `max_fds` fds (close-on-exec). Returns the
/// length and the fds; more fds than `max_fds`, or a truncated message, is an error (whatever
/// arrived is closed).
fn recv(sock: RawFd, buf: &mut [u8], max_fds: usize) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    // Room for 4 fds, to detect more than allowed.
    let mut cmsg = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the recvmsg call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    let n = loop {
        // SAFETY: `msg` describes buffers we own for the duration of the call.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into our buffer with the CMSG
    // macros, which stay within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c);
                let len = (*c).cmsg_len - (data as usize - c as usize);
                for i in 0..len / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || fds.len() > max_fds {
        return Err(std::io::Error::other(
            "truncated message or too many fds (all closed)",
        ));
    }
    Ok((n, fds))
}

/// The launcher process. Returns its exit status.
fn launcher_main(sock: OwnedFd, monitor: libc::pid_t, cfg: &LauncherConfig) -> i32 {
    match launcher_setup(sock, monitor) {
        Ok(sock) => serve(sock.as_raw_fd(), cfg),
        Err(e) => {
            log::error!("launcher: {e}");
            1
        }
    }
}

/// The fd the launcher keeps its socket at.
const SOCK_FD: RawFd = 3;

fn launcher_setup(sock: OwnedFd, monitor: libc::pid_t) -> Result<OwnedFd, LauncherError> {
    let chk = |rc: libc::c_int, what: &'static str| {
        if rc < 0 {
            Err(sys(what))
        } else {
            Ok(())
        }
    };
    // SAFETY: prctl/getppid with integer arguments.
    unsafe {
        chk(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            "PR_SET_PDEATHSIG",
        )?;
        if libc::getppid() != monitor {
            libc::_exit(0);
        }
        libc::prctl(libc::PR_SET_NAME, c"bulkhead-launch".as_ptr());
    }
    // Terminal signals are the monitor's to handle; the mask is reset in each worker.
    // SAFETY: building and installing a signal mask on this (only) thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
            libc::sigaddset(&mut set, s);
        }
        chk(
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
            "blocking signals",
        )?;
    }
    // Fds: stdin and stdout /dev/null, stderr kept (the workers log to it), the socket at 3,
    // nothing else.
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|source| LauncherError::Sys {
            what: "open /dev/null",
            source,
        })?;
    // SAFETY: dup2 onto fixed numbers this process owns; close_range above them.
    unsafe {
        chk(libc::dup2(null.as_raw_fd(), 0), "dup2(stdin)")?;
        chk(libc::dup2(null.as_raw_fd(), 1), "dup2(stdout)")?;
        chk(libc::dup2(sock.as_raw_fd(), SOCK_FD), "dup2(socket)")?;
    }
    // The originals are closed by close_range below; forget them.
    std::mem::forget(null);
    std::mem::forget(sock);
    // SAFETY: closes every fd above the socket; none is owned by live Rust objects (forgotten
    // above).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            (SOCK_FD + 1) as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    chk(rc as libc::c_int, "close_range")?;
    // SAFETY: SOCK_FD is the socket's copy made above, owned from here on.
    let sock = unsafe { OwnedFd::from_raw_fd(SOCK_FD) };
    // SAFETY: chdir with a NUL-terminated path.
    let rc = unsafe { libc::chdir(c"/".as_ptr()) };
    chk(rc, "chdir(/)")?;
    bulkhead_sandbox::set_no_new_privs().map_err(|e| LauncherError::Refused(e.to_string()))?;
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &core) };
    chk(rc, "setrlimit(CORE)")?;
    drop_capabilities()?;
    Ok(sock)
}

/// As root: keep only what a launch needs (see the module documentation).
fn drop_capabilities() -> Result<(), LauncherError> {
    use caps::{CapSet, Capability};
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let keep: caps::CapsHashSet = [
        Capability::CAP_SETUID,
        Capability::CAP_SETGID,
        Capability::CAP_KILL,
        Capability::CAP_DAC_READ_SEARCH,
    ]
    .into_iter()
    .collect();
    let err = |e: caps::errors::CapsError| LauncherError::Refused(format!("capabilities: {e}"));
    for c in caps::all() {
        if !keep.contains(&c) {
            caps::drop(None, CapSet::Bounding, c).map_err(err)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::clear(None, CapSet::Inheritable).map_err(err)?;
    let have = caps::read(None, CapSet::Permitted).map_err(err)?;
    let keep: caps::CapsHashSet = keep.intersection(&have).copied().collect();
    caps::set(None, CapSet::Effective, &keep).map_err(err)?;
    caps::set(None, CapSet::Permitted, &keep).map_err(err)?;
    Ok(())
}

/// A request, validated.
enum Request {
    Spawn {
        role: Role,
        params: Params,
        ipc: OwnedFd,
        /// netd's stdout and stderr (a socket the monitor reads).
        log: Option<OwnedFd>,
    },
    Wait {
        pid: i32,
    },
    Namespaces {
        pid: i32,
    },
}

fn parse_request(buf: &[u8], mut fds: Vec<OwnedFd>) -> Result<Request, String> {
    if buf.len() != REQUEST_LEN {
        return Err(format!("request of {} bytes", buf.len()));
    }
    let u32_at = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    if u32_at(0) != REQUEST_MAGIC {
        return Err("bad request magic".into());
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&buf[8..16]);
    let a = u64::from_ne_bytes(a);
    let b = u32_at(16);
    if u32_at(20) != 0 {
        return Err("non-zero padding".into());
    }
    match u32_at(4) {
        kind @ (SPAWN_VCPU | SPAWN_BLOCKD | SPAWN_NETD) => {
            let role = match kind {
                SPAWN_VCPU => Role::Vcpu,
                SPAWN_BLOCKD => Role::Blockd,
                _ => Role::Netd,
            };
            if a == 0 || a > 2 * MAX_MEM_BYTES {
                return Err(format!("guest RAM of {a} bytes"));
            }
            if role == Role::Vcpu && (b == 0 || b > crate::cli::MAX_VCPUS) {
                return Err(format!("{b} vCPUs"));
            }
            if role == Role::Blockd && (b == 0 || b > u32::from(crate::block::MAX_QUEUES)) {
                return Err(format!("{b} queues"));
            }
            // netd: two virtqueues per queue pair, one pair per tap queue.
            if role == Role::Netd
                && (b == 0
                    || b % u32::from(crate::nics::NET_QUEUES) != 0
                    || b > u32::from(crate::nics::NET_QUEUES) * crate::nics::MAX_TAP_QUEUES as u32)
            {
                return Err(format!("{b} netd queues"));
            }
            let want = if role == Role::Netd { 2 } else { 1 };
            if fds.len() != want {
                return Err(format!("{} fds with the request (want {want})", fds.len()));
            }
            let log = (role == Role::Netd).then(|| fds.remove(1));
            if let Some(l) = &log {
                // SAFETY: a zeroed stat is valid; fstat fills it.
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                // SAFETY: fstat on an fd we own into a local struct.
                if unsafe { libc::fstat(l.as_raw_fd(), &mut st) } != 0
                    || st.st_mode & libc::S_IFMT != libc::S_IFSOCK
                {
                    return Err("the request's log fd is not a socket".into());
                }
            }
            let ipc = fds.remove(0);
            // SAFETY: a zeroed stat is valid; fstat fills it.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat on an fd we own into a local struct.
            if unsafe { libc::fstat(ipc.as_raw_fd(), &mut st) } != 0
                || st.st_mode & libc::S_IFMT != libc::S_IFSOCK
            {
                return Err("the request's fd is not a socket".into());
            }
            let params = match role {
                Role::Vcpu => Params {
                    mem_bytes: a,
                    vcpus: b,
                    ..Params::default()
                },
                _ => Params {
                    mem_bytes: a,
                    queues: b,
                    ..Params::default()
                },
            };
            Ok(Request::Spawn {
                role,
                params,
                ipc,
                log,
            })
        }
        WAIT => {
            if !fds.is_empty() || b != 0 || a == 0 || a > i32::MAX as u64 {
                return Err("malformed wait request".into());
            }
            Ok(Request::Wait { pid: a as i32 })
        }
        NAMESPACES => {
            if !fds.is_empty() || b != 0 || a == 0 || a > i32::MAX as u64 {
                return Err("malformed namespaces request".into());
            }
            Ok(Request::Namespaces { pid: a as i32 })
        }
        k => Err(format!("unknown request kind {k}")),
    }
}

/// An answer: pid, wait status, fds and message bytes, or a refusal.
type Answer = Result<(i32, i32, Vec<OwnedFd>, Vec<u8>), String>;

fn reply(sock: RawFd, answer: Answer) {
    let mut buf = [0u8; REPLY_LEN];
    buf[0..4].copy_from_slice(&REPLY_MAGIC.to_ne_bytes());
    let mut fds = Vec::new();
    match answer {
        Ok((pid, status, owned, msg)) => {
            buf[8..12].copy_from_slice(&pid.to_ne_bytes());
            buf[12..16].copy_from_slice(&status.to_ne_bytes());
            let n = msg.len().min(MSG_LEN);
            buf[16..20].copy_from_slice(&(n as u32).to_ne_bytes());
            buf[20..20 + n].copy_from_slice(&msg[..n]);
            fds = owned;
        }
        Err(msg) => {
            buf[4..8].copy_from_slice(&1u32.to_ne_bytes());
            let mut n = msg.len().min(MSG_LEN);
            while !msg.is_char_boundary(n) {
                n -= 1;
            }
            buf[16..20].copy_from_slice(&(n as u32).to_ne_bytes());
            buf[20..20 + n].copy_from_slice(&msg.as_bytes()[..n]);
        }
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    if let Err(e) = send(sock, &buf, &raw) {
        log::error!("launcher: cannot answer the monitor: {e}");
    }
    // Our copies of the handed fds close here; the monitor holds its own.
}

fn serve(sock: RawFd, cfg: &LauncherConfig) -> i32 {
    let mut children: HashMap<i32, Child> = HashMap::new();
    loop {
        let mut buf = [0u8; REQUEST_LEN + 1];
        let answer = match recv(sock, &mut buf, 2) {
            Ok((0, _)) => return 0,
            Ok((n, fds)) => match parse_request(&buf[..n], fds) {
                Ok(Request::Spawn {
                    role,
                    params,
                    ipc,
                    log,
                }) => spawn(&mut children, cfg, role, params, ipc, log),
                Ok(Request::Wait { pid }) => match children.remove(&pid) {
                    Some(mut child) => child
                        .wait()
                        .map(|s| (pid, s.into_raw(), Vec::new(), Vec::new()))
                        .map_err(|e| format!("launcher: waiting for pid {pid}: {e}")),
                    None => Err(format!("launcher: pid {pid} is not a worker it started")),
                },
                Ok(Request::Namespaces { pid }) => {
                    // SAFETY: getpid cannot fail.
                    let me = unsafe { libc::getpid() };
                    if pid == me || children.contains_key(&pid) {
                        Ok((pid, 0, Vec::new(), namespace_ids(pid)))
                    } else {
                        Err(format!("launcher: pid {pid} is not a worker it started"))
                    }
                }
                Err(e) => Err(format!("launcher: refused a request: {e}")),
            },
            Err(e) => Err(format!("launcher: refused a request: {e}")),
        };
        if let Err(e) = &answer {
            if e.starts_with("launcher: refused") {
                log::error!("{e}");
            }
        }
        reply(sock, answer);
    }
}

fn spawn(
    children: &mut HashMap<i32, Child>,
    cfg: &LauncherConfig,
    role: Role,
    params: Params,
    ipc: OwnedFd,
    log: Option<OwnedFd>,
) -> Answer {
    if children.len() >= MAX_CHILDREN {
        return Err(format!(
            "launcher: {} workers not yet reaped; refusing to start another",
            children.len()
        ));
    }
    let path = match role {
        Role::Blockd => cfg
            .blockd_path
            .as_deref()
            .ok_or("launcher: this machine has no disks; no bulkhead-blockd to start")?,
        Role::Netd => cfg
            .netd_path
            .as_deref()
            .ok_or("launcher: no bulkhead-netd to start")?,
        _ => cfg.vcpu_path.as_path(),
    };
    let mut child = worker::launch_with_log(path, role, ipc, log, &cfg.sandbox, params)
        .map_err(|e| e.to_string())?;
    let pidfd = child
        .pidfd()
        .try_clone_to_owned()
        .map_err(|e| format!("launcher: dup of the pidfd: {e}"))?;
    let mut fds = vec![pidfd];
    fds.extend(child.take_report());
    let pid = child.pid();
    children.insert(pid, child);
    Ok((pid, 0, fds, Vec::new()))
}

/// The inode of each of [`NS_KINDS`] for `pid` (0 where unreadable), as native-endian u64s.
fn namespace_ids(pid: i32) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * NS_KINDS.len());
    for k in NS_KINDS {
        let ino = std::fs::read_link(format!("/proc/{pid}/ns/{k}"))
            .ok()
            .and_then(|l| l.to_str().and_then(crate::inspect::parse_ns_link))
            .map_or(0, |(_, ino)| ino);
        out.extend(ino.to_ne_bytes());
    }
    out
}

/// The vCPU worker's path for the launcher: as [`worker::worker_path`].
pub fn vcpu_path(dir: Option<&Path>) -> Result<PathBuf, WorkerError> {
    worker::worker_path(dir, worker::VCPU_WORKER)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock() -> OwnedFd {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.into()
    }

    fn req(kind: u32, mem: u64, vcpus: u32, pad: u32) -> Vec<u8> {
        let mut r = Vec::new();
        r.extend(REQUEST_MAGIC.to_ne_bytes());
        r.extend(kind.to_ne_bytes());
        r.extend(mem.to_ne_bytes());
        r.extend(vcpus.to_ne_bytes());
        r.extend(pad.to_ne_bytes());
        r
    }

    #[test]
    fn requests_are_validated() {
        match parse_request(&req(SPAWN_VCPU, 1 << 27, 2, 0), vec![sock()]) {
            Ok(Request::Spawn { params, .. }) => {
                assert_eq!(params.vcpus, 2);
                assert_eq!(params.mem_bytes, 1 << 27);
            }
            _ => panic!("not a spawn"),
        }
        assert!(matches!(
            parse_request(&req(WAIT, 42, 0, 0), vec![]),
            Ok(Request::Wait { pid: 42 })
        ));
        let bad = |b: &[u8], fds: Vec<OwnedFd>| parse_request(b, fds).err().expect("refused");
        assert!(bad(&req(9, 1 << 27, 1, 0), vec![sock()]).contains("kind"));
        assert!(bad(&req(WAIT, 42, 0, 0), vec![sock()]).contains("wait"));
        assert!(bad(&req(WAIT, 0, 0, 0), vec![]).contains("wait"));
        assert!(bad(&req(NAMESPACES, 7, 1, 0), vec![]).contains("namespaces"));
        assert!(bad(&req(SPAWN_VCPU, 0, 1, 0), vec![sock()]).contains("RAM"));
        assert!(bad(&req(SPAWN_VCPU, 1 << 27, 0, 0), vec![sock()]).contains("vCPUs"));
        assert!(bad(&req(SPAWN_VCPU, 1 << 27, 256, 0), vec![sock()]).contains("vCPUs"));
        assert!(bad(&req(SPAWN_VCPU, 1 << 27, 1, 1), vec![sock()]).contains("padding"));
        assert!(bad(&req(SPAWN_VCPU, 1 << 27, 1, 0), vec![]).contains("fds"));
        assert!(bad(&req(SPAWN_VCPU, 1 << 27, 1, 0), vec![sock(), sock()]).contains("fds"));
        assert!(bad(&req(SPAWN_VCPU, 1 << 27, 1, 0)[..20], vec![sock()]).contains("bytes"));
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("null").into();
        assert!(bad(&req(SPAWN_VCPU, 1 << 27, 1, 0), vec![file]).contains("socket"));
        let mut m = req(SPAWN_VCPU, 1 << 27, 1, 0);
        m[0] ^= 1;
        assert!(bad(&m, vec![sock()]).contains("magic"));
        // Block back ends: queues 1 to 16, one socket.
        match parse_request(&req(SPAWN_BLOCKD, 1 << 28, 4, 0), vec![sock()]) {
            Ok(Request::Spawn { role, params, .. }) => {
                assert_eq!(role, Role::Blockd);
                assert_eq!(params.queues, 4);
                assert_eq!(params.mem_bytes, 1 << 28);
            }
            _ => panic!("not a blockd spawn"),
        }
        assert!(bad(&req(SPAWN_BLOCKD, 1 << 28, 0, 0), vec![sock()]).contains("queues"));
        assert!(bad(&req(SPAWN_BLOCKD, 1 << 28, 17, 0), vec![sock()]).contains("queues"));
        assert!(bad(&req(SPAWN_BLOCKD, 1 << 28, 1, 0), vec![]).contains("fds"));
        // Net back ends: one to MAX_TAP_QUEUES queue pairs (two virtqueues each).
        assert!(bad(&req(SPAWN_NETD, 1 << 28, 2, 0), vec![sock()]).contains("want 2"));
        let file: OwnedFd = std::fs::File::open("/dev/null").expect("null").into();
        assert!(bad(&req(SPAWN_NETD, 1 << 28, 2, 0), vec![sock(), file]).contains("log fd"));
        match parse_request(&req(SPAWN_NETD, 1 << 28, 2, 0), vec![sock(), sock()]) {
            Ok(Request::Spawn { role, params, .. }) => {
                assert_eq!(role, Role::Netd);
                assert_eq!(params.queues, 2);
            }
            _ => panic!("not a netd spawn"),
        }
        match parse_request(&req(SPAWN_NETD, 1 << 28, 4, 0), vec![sock(), sock()]) {
            Ok(Request::Spawn { params, .. }) => assert_eq!(params.queues, 4),
            _ => panic!("not a two-pair netd spawn"),
        }
        let max = 2 * crate::nics::MAX_TAP_QUEUES as u32;
        for q in [0, 3, max + 2] {
            assert!(bad(&req(SPAWN_NETD, 1 << 28, q, 0), vec![sock(), sock()]).contains("queues"));
        }
    }
}
