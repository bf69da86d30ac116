//! Proof by attack: what a compromised worker would try, run *inside* a confined process, and
//! how to read what happened. Compiled only with the cargo feature `attack-hook`, which nothing
//! but the attack tests enables and which cannot be compiled into an optimised build (see the
//! `compile_error!` below and `docs/SECURITY.md`, "How to verify").
//!
//! Inside the worker (the probe binary, or `bulkhead-vcpu --attack NAME`): [`run_and_report`]
//! writes a [`BEGIN`] line, makes the attempt with raw system calls (so the call tried is exactly
//! the one named, not whatever the C library picks) and writes a [`RESULT`] line with the errno,
//! unless the attempt killed the process (seccomp's `SIGSYS`, or `SIGBUS` beyond guest memory).
//! Killing attempts therefore need a worker each; the tests give every attempt its own.
//!
//! On the test side: [`Observed`] is what the launcher saw (death by a signal with the seccomp
//! report, or the result line), [`judge`] names the layer that stopped the attempt — from the
//! evidence and the known order in which the kernel checks things, e.g. `openat("/etc/passwd")`
//! fails with `ENOENT` at path lookup in the empty root before landlock's `file_open` hook is
//! ever consulted — and [`render_table`]/[`parse_table`] keep `docs/SECURITY.md` in step with
//! what the tests observe.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fmt::Write as _;
use std::os::fd::RawFd;

use crate::enter::{EnterReport, Mode};
use crate::policy::{Filesystem, Params, Policy, Role};
use crate::seccomp::Violation;
use crate::Result;

#[cfg(not(debug_assertions))]
compile_error!(
    "the attack-hook feature is for the attack tests only and must never be part of an \
     optimised (release) build"
);

/// First word of the line written just before an attempt.
pub const BEGIN: &str = "BULKHEAD-ATTACK-BEGIN";
/// First word of the line written after an attempt that returned.
pub const RESULT: &str = "BULKHEAD-ATTACK-RESULT";

/// `_IOC` as the kernel headers compute it.
const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
/// `KVM_CREATE_DEVICE = _IOWR(KVMIO, 0xe0, struct kvm_create_device)` (12 bytes): a KVM
/// ioctl `bulkhead-vcpu` never uses.
pub const KVM_CREATE_DEVICE: u64 = ioc(3, 0xae, 0xe0, 12);
/// `TUNSETIFF = _IOW('T', 202, int)`: attaches a tap fd to an interface; the monitor does it,
/// never a worker.
pub const TUNSETIFF: u64 = ioc(1, b'T' as u64, 202, 4);
/// `BLKGETSIZE64 = _IOR(0x12, 114, size_t)`.
pub const BLKGETSIZE64: u64 = crate::ioctls::BLKGETSIZE64;
/// `BLKRRPART = _IO(0x12, 95)`: re-read a disk's partition table (blockd never needs it).
pub const BLKRRPART: u64 = ioc(0, 0x12, 95, 0);

/// One thing a compromised process would try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attack {
    /// `openat(AT_FDCWD, "/etc/passwd", O_RDONLY)`.
    OpenHostFile,
    /// `openat(AT_FDCWD, "/", O_RDONLY | O_DIRECTORY)`: the one directory a worker's root has.
    OpenRootDir,
    /// `socket(AF_INET, SOCK_STREAM)` and `connect` to a port the test listens on at 127.0.0.1.
    Connect,
    /// `execve("/bin/sh", …)`.
    Execve,
    /// `clone(SIGCHLD)` (a fork), repeated up to 16 times while the children wait.
    Fork,
    /// `ptrace(PTRACE_SEIZE, monitor)`.
    Ptrace,
    /// `mount("none", target, "tmpfs")` (target `/` for a worker).
    Mount,
    /// `unshare(CLONE_NEWUSER)`.
    Unshare,
    /// `init_module` of a 64-byte ELF-looking buffer.
    LoadModule,
    /// `capset` adding `CAP_SYS_ADMIN` to the effective and permitted sets.
    RaiseCapability,
    /// A KVM ioctl: `KVM_CREATE_VM` from a non-vcpu role, an unused `KVM_CREATE_DEVICE` from vcpu.
    KvmIoctl,
    /// The tap ioctl `TUNSETIFF` (netd only tunes a tap the monitor attached).
    TapIoctl,
    /// A block ioctl: `BLKGETSIZE64`, or the unused `BLKRRPART` from blockd.
    BlockIoctl,
    /// `process_vm_writev` of 8 bytes into a buffer of the monitor.
    WriteMonitorMemory,
    /// `openat("/proc/<monitor>/mem", O_RDWR)`.
    OpenMonitorMem,
    /// `lseek` to the end of the guest-memory memfd and `write` one byte there.
    GrowGuestMemory,
    /// `mmap` the guest-memory memfd one page longer than it is and store into that page.
    BeyondGuestMemory,
}

impl Attack {
    /// Every attempt, in table order.
    pub const ALL: [Attack; 17] = [
        Attack::OpenHostFile,
        Attack::OpenRootDir,
        Attack::Connect,
        Attack::Execve,
        Attack::Fork,
        Attack::Ptrace,
        Attack::Mount,
        Attack::Unshare,
        Attack::LoadModule,
        Attack::RaiseCapability,
        Attack::KvmIoctl,
        Attack::TapIoctl,
        Attack::BlockIoctl,
        Attack::WriteMonitorMemory,
        Attack::OpenMonitorMem,
        Attack::GrowGuestMemory,
        Attack::BeyondGuestMemory,
    ];

    /// The name `--attack` and the tables use.
    pub fn name(self) -> &'static str {
        match self {
            Attack::OpenHostFile => "open-host-file",
            Attack::OpenRootDir => "open-root-dir",
            Attack::Connect => "connect",
            Attack::Execve => "execve",
            Attack::Fork => "fork",
            Attack::Ptrace => "ptrace",
            Attack::Mount => "mount",
            Attack::Unshare => "unshare",
            Attack::LoadModule => "load-module",
            Attack::RaiseCapability => "raise-capability",
            Attack::KvmIoctl => "kvm-ioctl",
            Attack::TapIoctl => "tap-ioctl",
            Attack::BlockIoctl => "block-ioctl",
            Attack::WriteMonitorMemory => "write-monitor-memory",
            Attack::OpenMonitorMem => "open-monitor-mem",
            Attack::GrowGuestMemory => "grow-guest-memory",
            Attack::BeyondGuestMemory => "beyond-guest-memory",
        }
    }

    /// The attempt named `s`.
    pub fn from_name(s: &str) -> Option<Attack> {
        Attack::ALL.into_iter().find(|a| a.name() == s)
    }

    /// What it does, for the tables.
    pub fn describe(self) -> &'static str {
        match self {
            Attack::OpenHostFile => "open a host file: `openat(\"/etc/passwd\")`",
            Attack::OpenRootDir => "list its own root: `openat(\"/\", O_DIRECTORY)`",
            Attack::Connect => "create a socket and connect: TCP to 127.0.0.1",
            Attack::Execve => "execve `/bin/sh`",
            Attack::Fork => "fork: `clone(SIGCHLD)`, up to 16 children",
            Attack::Ptrace => "ptrace the monitor: `PTRACE_SEIZE`",
            Attack::Mount => "mount a tmpfs",
            Attack::Unshare => "unshare: `CLONE_NEWUSER`",
            Attack::LoadModule => "load a kernel module: `init_module`",
            Attack::RaiseCapability => "raise a capability: `capset(CAP_SYS_ADMIN)`",
            Attack::KvmIoctl => "KVM ioctl (`KVM_CREATE_VM`; vcpu: unused `KVM_CREATE_DEVICE`)",
            Attack::TapIoctl => "tap ioctl `TUNSETIFF`",
            Attack::BlockIoctl => "block ioctl `BLKGETSIZE64` (blockd: unused `BLKRRPART`)",
            Attack::WriteMonitorMemory => "write into the monitor: `process_vm_writev`",
            Attack::OpenMonitorMem => "write into the monitor: `/proc/<pid>/mem`",
            Attack::GrowGuestMemory => "grow guest memory: write past the memfd's end",
            Attack::BeyondGuestMemory => "touch past guest memory: `mmap` one page longer",
        }
    }

    /// The ioctl request an ioctl attempt uses for `role`.
    pub fn ioctl_request(self, role: Role) -> Option<u64> {
        match self {
            Attack::KvmIoctl if role == Role::Vcpu => Some(KVM_CREATE_DEVICE),
            Attack::KvmIoctl => Some(crate::ioctls::KVM_CREATE_VM),
            Attack::TapIoctl => Some(TUNSETIFF),
            Attack::BlockIoctl if role == Role::Blockd => Some(BLKRRPART),
            Attack::BlockIoctl => Some(BLKGETSIZE64),
            _ => None,
        }
    }
}

/// What the attempts aim at: the test plays the monitor and says where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The monitor's pid (as the host sees it; a worker's pid namespace hides it).
    pub monitor_pid: i32,
    /// The address of a buffer in the monitor that [`Attack::WriteMonitorMemory`] aims at.
    pub monitor_addr: u64,
    /// A TCP port listening on 127.0.0.1.
    pub port: u16,
    /// Where [`Attack::Mount`] mounts (`/` for a worker; a scratch directory for a process that
    /// shares the host's mounts).
    pub mount_point: String,
}

impl Target {
    /// As one command-line argument: `pid=N,addr=0xN,port=N,mnt=PATH`.
    pub fn to_arg(&self) -> String {
        format!(
            "pid={},addr={:#x},port={},mnt={}",
            self.monitor_pid, self.monitor_addr, self.port, self.mount_point
        )
    }

    /// Parses [`Target::to_arg`]'s form.
    pub fn parse(s: &str) -> Option<Target> {
        let mut t = Target {
            monitor_pid: 0,
            monitor_addr: 0,
            port: 0,
            mount_point: "/".into(),
        };
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=')?;
            match k {
                "pid" => t.monitor_pid = v.parse().ok()?,
                "addr" => t.monitor_addr = u64::from_str_radix(v.strip_prefix("0x")?, 16).ok()?,
                "port" => t.port = v.parse().ok()?,
                "mnt" => t.mount_point = v.to_string(),
                _ => return None,
            }
        }
        Some(t)
    }
}

/// How an attempt that returned ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A system call failed.
    Refused {
        /// Which call.
        call: String,
        /// Its errno.
        errno: i32,
        /// Anything worth knowing (e.g. how many forks succeeded first).
        detail: String,
    },
    /// The attempt did what it set out to do.
    Succeeded(String),
}

impl Outcome {
    fn refused(call: &str, errno: i32) -> Outcome {
        Outcome::Refused {
            call: call.into(),
            errno,
            detail: String::new(),
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes `s` to `fd` with plain `write` calls (no buffering: the next instant may be death).
fn emit(fd: RawFd, s: &str) {
    let mut b = s.as_bytes();
    while !b.is_empty() {
        // SAFETY: write(2) from a live buffer, bounded by its length.
        let n = unsafe { libc::write(fd, b.as_ptr().cast(), b.len()) };
        if n <= 0 {
            return;
        }
        b = &b[n as usize..];
    }
}

/// Enters `role`'s sandbox like [`crate::enter`], without seccomp and/or landlock: how the
/// tests find out which layer *below* seccomp would stop an attempt. (Landlock is left out by
/// giving the policy `Filesystem::Unconfined`; the tests check the report says landlock ABI 0.)
pub fn enter_without(
    role: Role,
    params: &Params,
    mode: Mode,
    report_fd: Option<RawFd>,
    without_seccomp: bool,
    without_landlock: bool,
) -> Result<EnterReport> {
    let p = role.policy();
    let policy = Policy {
        role: p.role,
        namespaces: p.namespaces,
        empty_root: p.empty_root,
        filesystem: if without_landlock {
            Filesystem::Unconfined
        } else {
            p.filesystem
        },
        min_landlock_abi: p.min_landlock_abi,
        rlimits: p.rlimits,
        seccomp: if without_seccomp { None } else { p.seccomp },
    };
    crate::enter(&policy, params, mode, report_fd)
}

/// The guest-memory memfd among the open fds: the one sealed against growth (`F_GET_SEALS`
/// answers only for memfds), and its size.
fn guest_memory() -> Option<(RawFd, u64)> {
    (0..256).find_map(|fd| {
        // SAFETY: fcntl with integer arguments; a closed or non-memfd fd just fails.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_GROW == 0 {
            return None;
        }
        // SAFETY: a zeroed statx is a valid output buffer.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: statx on an fd with an empty path, writing into `st`.
        let rc = unsafe {
            libc::statx(
                fd,
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_SIZE,
                &mut st,
            )
        };
        (rc == 0).then_some((fd, st.stx_size))
    })
}

/// Makes the attempt. May not return (the process is killed).
pub fn run(attack: Attack, role: Role, target: &Target, out: RawFd) -> Outcome {
    match attack {
        Attack::OpenHostFile => open("/etc/passwd", libc::O_RDONLY),
        Attack::OpenRootDir => open("/", libc::O_RDONLY | libc::O_DIRECTORY),
        Attack::Connect => connect(target.port),
        Attack::Execve => execve(out),
        Attack::Fork => fork(),
        Attack::Ptrace => {
            // SAFETY: PTRACE_SEIZE does not stop the tracee; integer arguments only. If it
            // succeeds, the process exits soon after and the kernel detaches.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_ptrace,
                    libc::PTRACE_SEIZE,
                    target.monitor_pid,
                    0usize,
                    0usize,
                )
            };
            if rc < 0 {
                Outcome::refused("ptrace", errno())
            } else {
                Outcome::Succeeded("attached to the monitor".into())
            }
        }
        Attack::Mount => {
            let Ok(path) = CString::new(target.mount_point.as_str()) else {
                return Outcome::refused("(bad mount point)", libc::EINVAL);
            };
            // SAFETY: NUL-terminated strings that outlive the call; no data.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_mount,
                    c"none".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0usize,
                    0usize,
                )
            };
            if rc < 0 {
                Outcome::refused("mount", errno())
            } else {
                // SAFETY: undo it (only ever reached where mounts are harmless: a scratch dir).
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
                Outcome::Succeeded(format!("mounted a tmpfs on {}", target.mount_point))
            }
        }
        Attack::Unshare => {
            // SAFETY: integer argument only.
            let rc = unsafe { libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER) };
            if rc < 0 {
                Outcome::refused("unshare", errno())
            } else {
                Outcome::Succeeded("entered a new user namespace".into())
            }
        }
        Attack::LoadModule => {
            let mut image = [0u8; 64];
            image[..4].copy_from_slice(b"\x7fELF");
            // SAFETY: a buffer of the given length and a NUL-terminated parameter string.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_init_module,
                    image.as_ptr(),
                    image.len(),
                    c"".as_ptr(),
                )
            };
            if rc < 0 {
                Outcome::refused("init_module", errno())
            } else {
                Outcome::Succeeded("loaded a module".into())
            }
        }
        Attack::RaiseCapability => raise_capability(),
        Attack::KvmIoctl | Attack::TapIoctl | Attack::BlockIoctl => {
            let req = attack.ioctl_request(role).unwrap_or(0);
            let mut arg = [0u8; 64];
            // SAFETY: ioctl on fd 0 with a 64-byte scratch buffer, larger than any of these
            // requests reads or writes.
            let rc = unsafe { libc::syscall(libc::SYS_ioctl, 0, req, arg.as_mut_ptr()) };
            if rc < 0 {
                Outcome::refused("ioctl", errno())
            } else {
                Outcome::Succeeded(format!("ioctl {req:#x} returned {rc}"))
            }
        }
        Attack::WriteMonitorMemory => {
            let payload = *b"PWNED!!\0";
            let local = libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            };
            let remote = libc::iovec {
                iov_base: target.monitor_addr as *mut libc::c_void,
                iov_len: payload.len(),
            };
            // SAFETY: the local iovec points at a live buffer; the remote one is only
            // interpreted in the target process by the kernel.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_process_vm_writev,
                    target.monitor_pid,
                    &local as *const libc::iovec,
                    1usize,
                    &remote as *const libc::iovec,
                    1usize,
                    0usize,
                )
            };
            if rc < 0 {
                Outcome::refused("process_vm_writev", errno())
            } else {
                Outcome::Succeeded(format!("wrote {rc} bytes into the monitor"))
            }
        }
        Attack::OpenMonitorMem => open(&format!("/proc/{}/mem", target.monitor_pid), libc::O_RDWR),
        Attack::GrowGuestMemory => {
            let Some((fd, size)) = guest_memory() else {
                return Outcome::refused("(no guest memory fd)", 0);
            };
            // SAFETY: lseek with integers on our fd.
            let off = unsafe { libc::syscall(libc::SYS_lseek, fd, size, libc::SEEK_SET) };
            if off < 0 {
                return Outcome::refused("lseek", errno());
            }
            // SAFETY: write(2) of one byte from a local.
            let rc = unsafe { libc::syscall(libc::SYS_write, fd, b"x".as_ptr(), 1usize) };
            if rc < 0 {
                Outcome::refused("write", errno())
            } else {
                Outcome::Succeeded(format!("grew guest memory past {size} bytes"))
            }
        }
        Attack::BeyondGuestMemory => {
            let Some((fd, size)) = guest_memory() else {
                return Outcome::refused("(no guest memory fd)", 0);
            };
            let Ok(len) = usize::try_from(size + 4096) else {
                return Outcome::refused("(size)", libc::EOVERFLOW);
            };
            // SAFETY: a new shared mapping of our fd; nothing else is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Outcome::refused("mmap", errno());
            }
            // SAFETY: the store is inside the mapping just made (its last page lies past the
            // file's end, so the kernel answers it with SIGBUS: that is the point).
            unsafe { std::ptr::write_volatile(p.cast::<u8>().add(len - 4096), 0x5a) };
            Outcome::Succeeded(format!("stored past the {size}-byte guest memory"))
        }
    }
}

fn open(path: &str, flags: libc::c_int) -> Outcome {
    let Ok(c) = CString::new(path) else {
        return Outcome::refused("(bad path)", libc::EINVAL);
    };
    // SAFETY: openat with a NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags | libc::O_CLOEXEC,
            0usize,
        )
    };
    if fd < 0 {
        return Outcome::refused("openat", errno());
    }
    // SAFETY: closing the fd just opened.
    unsafe { libc::close(fd as RawFd) };
    Outcome::Succeeded(format!("opened {path}"))
}

fn connect(port: u16) -> Outcome {
    // SAFETY: socket with integer arguments.
    let s = unsafe {
        libc::syscall(
            libc::SYS_socket,
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if s < 0 {
        return Outcome::refused("socket", errno());
    }
    // SAFETY: a zeroed sockaddr_in is valid; the fields are set below.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = port.to_be();
    sa.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    // SAFETY: connect with a sockaddr_in of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_connect,
            s,
            &sa as *const libc::sockaddr_in,
            std::mem::size_of::<libc::sockaddr_in>(),
        )
    };
    let e = errno();
    // SAFETY: closing the socket just made.
    unsafe { libc::close(s as RawFd) };
    if rc < 0 {
        Outcome::refused("connect", e)
    } else {
        Outcome::Succeeded("connected to 127.0.0.1".into())
    }
}

fn execve(out: RawFd) -> Outcome {
    let script = format!("echo {RESULT} execve ok ran /bin/sh >&{out}");
    let Ok(script) = CString::new(script) else {
        return Outcome::refused("(script)", libc::EINVAL);
    };
    let argv = [
        c"sh".as_ptr(),
        c"-c".as_ptr(),
        script.as_ptr(),
        std::ptr::null(),
    ];
    let envp = [std::ptr::null::<libc::c_char>()];
    // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            c"/bin/sh".as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    Outcome::refused("execve", errno())
}

fn fork() -> Outcome {
    let mut children = Vec::new();
    let mut failure = None;
    for _ in 0..16 {
        // SAFETY: clone without CLONE_VM and without a new stack is fork(2): the child gets a
        // copy of the address space and runs only the branch below, which never returns.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if pid == 0 {
            // SAFETY: the child: die with the parent, then sleep until killed.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                loop {
                    libc::pause();
                }
            }
        }
        if pid < 0 {
            failure = Some(errno());
            break;
        }
        children.push(pid as libc::pid_t);
    }
    let n = children.len();
    for pid in children {
        // SAFETY: killing and reaping our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    match failure {
        Some(e) => Outcome::Refused {
            call: "clone".into(),
            errno: e,
            detail: format!("after {n} children"),
        },
        None => Outcome::Succeeded(format!("{n} children")),
    }
}

fn raise_capability() -> Outcome {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_SYS_ADMIN: u32 = 21;
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    data[0].effective = 1 << CAP_SYS_ADMIN;
    data[0].permitted = 1 << CAP_SYS_ADMIN;
    // SAFETY: capset with a v3 header and two data structs, as the ABI requires.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if rc < 0 {
        Outcome::refused("capset", errno())
    } else {
        Outcome::Succeeded("CAP_SYS_ADMIN raised".into())
    }
}

/// Writes [`BEGIN`], makes the attempt, writes [`RESULT`] (if still alive), all to `out`.
pub fn run_and_report(attack: Attack, role: Role, target: &Target, out: RawFd) {
    emit(out, &format!("{BEGIN} {}\n", attack.name()));
    let line = match run(attack, role, target, out) {
        Outcome::Refused {
            call,
            errno,
            detail,
        } => format!(
            "{RESULT} {} refused call={call} errno={errno} {detail}\n",
            attack.name()
        ),
        Outcome::Succeeded(what) => format!("{RESULT} {} ok {what}\n", attack.name()),
    };
    emit(out, &line);
}

/// Whether `text` shows that `attack` began.
pub fn began(text: &str, attack: Attack) -> bool {
    text.lines()
        .any(|l| l.strip_prefix(BEGIN).map(str::trim) == Some(attack.name()))
}

/// The result line for `attack` in `text`, if any.
pub fn parse_result(text: &str, attack: Attack) -> Option<Outcome> {
    let line = text.lines().find_map(|l| {
        let rest = l.strip_prefix(RESULT)?.trim_start();
        let rest = rest.strip_prefix(attack.name())?;
        rest.starts_with(' ').then(|| rest.trim())
    })?;
    if let Some(what) = line.strip_prefix("ok") {
        return Some(Outcome::Succeeded(what.trim().to_string()));
    }
    let rest = line.strip_prefix("refused")?.trim();
    let mut call = None;
    let mut errno = None;
    let mut detail = Vec::new();
    for w in rest.split_whitespace() {
        if let Some(c) = w.strip_prefix("call=") {
            call = Some(c.to_string());
        } else if let Some(e) = w.strip_prefix("errno=") {
            errno = e.parse().ok();
        } else {
            detail.push(w);
        }
    }
    Some(Outcome::Refused {
        call: call?,
        errno: errno?,
        detail: detail.join(" "),
    })
}

/// What the test saw of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// The process died by `signal`; `violation` is its seccomp report (believed only for
    /// `SIGSYS`).
    Killed {
        /// The signal.
        signal: i32,
        /// The report read from the violation pipe.
        violation: Option<Violation>,
    },
    /// The attempt returned.
    Returned(Outcome),
    /// Neither: the process exited with this status and no result line (a broken run).
    Vanished(Option<i32>),
}

/// The layer that stopped an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    /// The seccomp allowlist (the call, or its argument, is not on it): `SIGSYS`.
    Seccomp,
    /// The empty read-only root: the path does not exist.
    EmptyRoot,
    /// Landlock: no filesystem right at all, no TCP connect/bind.
    Landlock,
    /// No capabilities (sets and bounding set empty, securebits locked).
    Capabilities,
    /// The pid namespace: the monitor's pid does not exist there.
    PidNamespace,
    /// The network namespace: no interface is up, no route.
    NetNamespace,
    /// `RLIMIT_NPROC`.
    Nproc,
    /// `RLIMIT_FSIZE` (checked before the memfd's seals).
    Fsize,
    /// The memfd's `F_SEAL_GROW`.
    MemfdSeal,
    /// The memfd's size: nothing is mapped past its end (and the seal keeps it so).
    MemfdSize,
    /// The fds it holds: the ioctl's target is not such a device.
    HeldFds,
    /// The kernel has no such feature (`init_module` on a kernel built without modules).
    KernelLacks,
    /// `user.max_user_namespaces` set to 0 inside the worker's own user namespace.
    UsernsLimit,
    /// Nothing: the attempt succeeded.
    NotStopped,
}

impl Layer {
    /// Short name for the tables.
    pub fn name(self) -> &'static str {
        match self {
            Layer::Seccomp => "seccomp",
            Layer::EmptyRoot => "empty root",
            Layer::Landlock => "landlock",
            Layer::Capabilities => "capabilities",
            Layer::PidNamespace => "pid namespace",
            Layer::NetNamespace => "net namespace",
            Layer::Nproc => "RLIMIT_NPROC",
            Layer::Fsize => "RLIMIT_FSIZE",
            Layer::MemfdSeal => "memfd seal",
            Layer::MemfdSize => "memfd size",
            Layer::HeldFds => "no such device fd",
            Layer::KernelLacks => "kernel without modules",
            Layer::UsernsLimit => "user namespace limit 0",
            Layer::NotStopped => "NOT STOPPED",
        }
    }
}

/// A judged cell: the layer and the table text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The layer that stopped it.
    pub layer: Layer,
    /// What the table shows, e.g. "killed: seccomp (`openat`)", "ENOENT: empty root".
    pub cell: String,
}

/// The symbolic name of an errno value (the ones these attempts meet).
pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOTTY => "ENOTTY",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EUSERS => "EUSERS",
        libc::ENOEXEC => "ENOEXEC",
        libc::EFBIG => "EFBIG",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

/// Names the layer that stopped `attack`, from what was observed. `landlock_on`: whether the
/// process runs under a landlock ruleset (it decides what an `EACCES` on a path means).
/// `Err` for anything these rules do not explain: the test must fail on it.
pub fn judge(
    attack: Attack,
    observed: &Observed,
    landlock_on: bool,
) -> std::result::Result<Verdict, String> {
    use Attack as A;
    let v = |layer: Layer, cell: String| Ok(Verdict { layer, cell });
    match observed {
        Observed::Killed {
            signal: libc::SIGSYS,
            violation: Some(viol),
        } => {
            let what = match (viol.nr, viol.name()) {
                (libc::SYS_ioctl, _) => format!("`ioctl` {:#x}", viol.args[1] & 0xffff_ffff),
                (_, Some(n)) => format!("`{n}`"),
                (nr, None) => format!("system call {nr}"),
            };
            v(Layer::Seccomp, format!("killed: seccomp ({what})"))
        }
        Observed::Killed {
            signal: libc::SIGBUS,
            ..
        } if attack == A::BeyondGuestMemory => v(
            Layer::MemfdSize,
            "killed (SIGBUS): memfd size, sealed".into(),
        ),
        // RLIMIT_FSIZE is checked before the seal; a process that is not a pid namespace's init
        // (standalone netd) dies of the signal instead of seeing EFBIG.
        Observed::Killed {
            signal: libc::SIGXFSZ,
            ..
        } if attack == A::GrowGuestMemory => {
            v(Layer::Fsize, "killed (SIGXFSZ): RLIMIT_FSIZE".into())
        }
        Observed::Killed { signal, violation } => Err(format!(
            "{}: killed by signal {signal} ({violation:?}), which no layer explains",
            attack.name()
        )),
        Observed::Vanished(status) => Err(format!(
            "{}: the process ended ({status:?}) without a result",
            attack.name()
        )),
        Observed::Returned(Outcome::Succeeded(what)) => {
            v(Layer::NotStopped, format!("NOT STOPPED ({what})"))
        }
        Observed::Returned(Outcome::Refused {
            call,
            errno,
            detail,
        }) => {
            let e = *errno;
            let layer = match (attack, e) {
                (A::OpenHostFile | A::Execve | A::OpenMonitorMem, libc::ENOENT) => {
                    Some(Layer::EmptyRoot)
                }
                (A::OpenHostFile | A::OpenRootDir | A::Execve, libc::EACCES) if landlock_on => {
                    Some(Layer::Landlock)
                }
                // /proc/PID/mem exists (no empty root): the ptrace access check refused it.
                (A::OpenMonitorMem, libc::EACCES) if !landlock_on => Some(Layer::Capabilities),
                (A::OpenMonitorMem, libc::EACCES) => Some(Layer::Landlock),
                (A::Connect, libc::EACCES) if landlock_on && call == "connect" => {
                    Some(Layer::Landlock)
                }
                (A::Connect, libc::ENETUNREACH) if call == "connect" => Some(Layer::NetNamespace),
                (A::Fork, libc::EAGAIN) => Some(Layer::Nproc),
                (A::Ptrace | A::WriteMonitorMemory, libc::ESRCH) => Some(Layer::PidNamespace),
                (A::Ptrace | A::WriteMonitorMemory, libc::EPERM) => Some(Layer::Capabilities),
                (A::Mount | A::LoadModule | A::RaiseCapability | A::Unshare, libc::EPERM) => {
                    Some(Layer::Capabilities)
                }
                (A::KvmIoctl | A::TapIoctl | A::BlockIoctl, libc::ENOTTY | libc::EBADF) => {
                    Some(Layer::HeldFds)
                }
                (A::GrowGuestMemory, libc::EPERM) if call == "write" => Some(Layer::MemfdSeal),
                (A::GrowGuestMemory, libc::EFBIG) if call == "write" => Some(Layer::Fsize),
                // CONFIG_MODULES=n: the call exists only as a stub (a modular kernel checks
                // CAP_SYS_MODULE in the initial namespace first: EPERM, capabilities).
                (A::LoadModule, libc::ENOSYS) => Some(Layer::KernelLacks),
                // The worker set user.max_user_namespaces to 0 in its own user namespace.
                (A::Unshare, libc::ENOSPC) => Some(Layer::UsernsLimit),
                _ => None,
            };
            let Some(layer) = layer else {
                return Err(format!(
                    "{}: {call} failed with {} ({detail}), which no rule explains",
                    attack.name(),
                    errno_name(e)
                ));
            };
            let mut cell = errno_name(e);
            if !detail.is_empty() {
                let _ = write!(cell, " {detail}");
            }
            let _ = write!(cell, ": {}", layer.name());
            v(layer, cell)
        }
    }
}

/// Renders a table: one row per attempt, one column per role (cells missing → "—").
pub fn render_table(columns: &[&str], cells: &BTreeMap<(Attack, usize), String>) -> String {
    let mut s = String::from("| attempt |");
    for c in columns {
        let _ = write!(s, " {c} |");
    }
    s.push_str("\n|---|");
    for _ in columns {
        s.push_str("---|");
    }
    s.push('\n');
    for a in Attack::ALL {
        let _ = write!(s, "| `{}`: {} |", a.name(), a.describe());
        for i in 0..columns.len() {
            let c = cells.get(&(a, i)).map(String::as_str).unwrap_or("—");
            let _ = write!(s, " {c} |");
        }
        s.push('\n');
    }
    s
}

/// The table between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `doc`.
pub fn table_section<'a>(doc: &'a str, name: &str) -> Option<&'a str> {
    let begin = format!("<!-- {name}:begin -->\n");
    let end = format!("<!-- {name}:end -->");
    let start = doc.find(&begin)? + begin.len();
    let len = doc[start..].find(&end)?;
    Some(&doc[start..start + len])
}

/// The cells of a table [`render_table`] made: attempt → the cells after the first column.
pub fn parse_table(table: &str) -> BTreeMap<Attack, Vec<String>> {
    let mut out = BTreeMap::new();
    for line in table.lines() {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let Some((name, rest)) = rest.split_once('`') else {
            continue;
        };
        let Some(attack) = Attack::from_name(name) else {
            continue;
        };
        // The first column's text may hold `|` only inside backticks; it has none today.
        let cols: Vec<String> = rest
            .split(" | ")
            .skip(1)
            .map(|c| c.trim().trim_end_matches('|').trim().to_string())
            .collect();
        out.insert(attack, cols);
    }
    out
}

/// `--attack NAME --attack-target SPEC [--attack-without seccomp|seccomp,landlock]` in a
/// standalone worker's command line (blockd, netd): what to attempt, at what, and which layers
/// to leave out of the worker's sandbox (to find what stops the attempt below them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// The attempt.
    pub which: Attack,
    /// What it aims at.
    pub target: Target,
    /// Enter the sandbox without seccomp.
    pub without_seccomp: bool,
    /// Enter the sandbox without landlock (only together with `without_seccomp`).
    pub without_landlock: bool,
}

impl Hook {
    /// Takes `--attack NAME`, `--attack-target SPEC` and `--attack-without LAYERS` (also as
    /// `--flag=value`) out of `args` and returns them with the remaining arguments, for the
    /// worker's own parser. `--attack` and `--attack-target` go together; `--attack-without`
    /// only with them.
    pub fn take(
        args: impl IntoIterator<Item = String>,
    ) -> std::result::Result<(Option<Hook>, Vec<String>), String> {
        let mut rest = Vec::new();
        let (mut which, mut target, mut without) = (None, None, None);
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let (k, inline) = match a.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (a.clone(), None),
            };
            if !matches!(
                k.as_str(),
                "--attack" | "--attack-target" | "--attack-without"
            ) {
                rest.push(a);
                continue;
            }
            let v = match inline {
                Some(v) => v,
                None => it.next().ok_or_else(|| format!("{k} needs a value"))?,
            };
            match k.as_str() {
                "--attack" => {
                    which = Some(
                        Attack::from_name(&v)
                            .ok_or_else(|| format!("--attack {v:?}: no such attempt"))?,
                    )
                }
                "--attack-target" => {
                    target =
                        Some(Target::parse(&v).ok_or_else(|| format!("--attack-target {v:?}"))?)
                }
                _ => {
                    without = Some(match v.as_str() {
                        "seccomp" => (true, false),
                        "seccomp,landlock" => (true, true),
                        _ => {
                            return Err(format!(
                                "--attack-without {v:?}: seccomp or seccomp,landlock"
                            ))
                        }
                    })
                }
            }
        }
        match (which, target) {
            (None, None) if without.is_none() => Ok((None, rest)),
            (Some(which), Some(target)) => {
                let (without_seccomp, without_landlock) = without.unwrap_or((false, false));
                let hook = Hook {
                    which,
                    target,
                    without_seccomp,
                    without_landlock,
                };
                Ok((Some(hook), rest))
            }
            _ => Err("--attack and --attack-target go together".into()),
        }
    }

    /// `policy` without the layers the hook leaves out (as [`enter_without`] does for a role).
    pub fn weaken(&self, policy: Policy) -> Policy {
        Policy {
            seccomp: if self.without_seccomp {
                None
            } else {
                policy.seccomp
            },
            filesystem: if self.without_landlock {
                Filesystem::Unconfined
            } else {
                policy.filesystem
            },
            ..policy
        }
    }
}

/// Test side, for a worker started by [`crate::launch::Command`] with the write end of the pipe
/// `out` as its stdout (the caller's copy of the write end already closed) and a report pipe:
/// waits up to `timeout` for it to end (killing it then), and returns what its stdout and its
/// death show of `attack`. `Err` when the attempt never began.
pub fn observe(
    mut child: crate::launch::Child,
    out: std::os::fd::OwnedFd,
    attack: Attack,
    timeout: std::time::Duration,
) -> std::result::Result<Observed, String> {
    use std::io::Read as _;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::fs::File::from(out).read_to_string(&mut text);
        text
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{}: the worker did not end in time", attack.name()));
            }
            Err(e) => return Err(format!("{}: waiting for the worker: {e}", attack.name())),
        }
    };
    let text = reader.join().unwrap_or_default();
    if !began(&text, attack) {
        return Err(format!(
            "{}: the attempt did not start: {text:?} {status:?}",
            attack.name()
        ));
    }
    use std::os::unix::process::ExitStatusExt as _;
    Ok(match status.signal() {
        Some(signal) => Observed::Killed {
            signal,
            violation: (signal == libc::SIGSYS)
                .then(|| child.violation())
                .flatten(),
        },
        None => match parse_result(&text, attack) {
            Some(o) => Observed::Returned(o),
            None => Observed::Vanished(status.code()),
        },
    })
}

/// Compares the columns of `columns`' roles in the table `name` of the document at `path`
/// (columns in [`Role::ALL`]'s order) with the cells observed (attempt → cell; a missing cell
/// is "—"). With `BULKHEAD_BLESS_SECURITY_MD` set, rewrites those columns, and only those, in
/// the document instead. Each attack test checks the roles it ran, so every column has one
/// source: the real worker where one exists.
pub fn check_columns(
    path: &std::path::Path,
    name: &str,
    columns: &[(Role, &BTreeMap<Attack, String>)],
) -> std::result::Result<(), String> {
    let doc = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let current =
        table_section(&doc, name).ok_or_else(|| format!("{}: no table {name}", path.display()))?;
    let mut cells = BTreeMap::new();
    for (a, row) in parse_table(current) {
        for (i, c) in row.into_iter().enumerate() {
            cells.insert((a, i), c);
        }
    }
    for (role, observed) in columns {
        let Some(i) = Role::ALL.iter().position(|r| r == role) else {
            continue;
        };
        for a in Attack::ALL {
            match observed.get(&a) {
                Some(c) => cells.insert((a, i), c.clone()),
                None => cells.remove(&(a, i)),
            };
        }
    }
    let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
    let rendered = render_table(&names, &cells);
    if rendered == current {
        return Ok(());
    }
    if std::env::var_os("BULKHEAD_BLESS_SECURITY_MD").is_some() {
        let start = current.as_ptr() as usize - doc.as_ptr() as usize;
        let mut new = doc.clone();
        new.replace_range(start..start + current.len(), &rendered);
        std::fs::write(path, new).map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("rewrote table {name} in {}", path.display());
        return Ok(());
    }
    let roles: Vec<&str> = columns.iter().map(|(r, _)| r.name()).collect();
    Err(format!(
        "{}, table {name} (between <!-- {name}:begin --> and <!-- {name}:end -->), columns \
         {roles:?} do not match what the attacks showed; observed:\n{rendered}\n(re-run with \
         BULKHEAD_BLESS_SECURITY_MD=1 to rewrite them, after checking the change is right)",
        path.display()
    ))
}

/// Test side, for a standalone worker with the hook (blockd, netd): runs every attempt under the
/// whole sandbox and with `--attack-without seccomp`; where landlock stopped it there, a third
/// time with `--attack-without seccomp,landlock`, which must get further (so the `EACCES` was
/// landlock's). `attempt(a, extra)` starts a fresh worker making attempt `a` with the hook
/// arguments `extra` added and returns what it saw. No attempt may succeed under the whole
/// sandbox, and both tables' `role` column in the document at `path` must be what was observed
/// ([`check_columns`]; blessing rewrites that column).
pub fn prove_standalone(
    role: Role,
    path: &std::path::Path,
    mut attempt: impl FnMut(Attack, &[&str]) -> Observed,
) -> std::result::Result<(), String> {
    let mut full = BTreeMap::new();
    let mut below = BTreeMap::new();
    let mut errs = Vec::new();
    let mut judged = |a: Attack, extra: &[&str], landlock_on: bool| {
        let observed = attempt(a, extra);
        judge(a, &observed, landlock_on)
            .map_err(|e| format!("{} {extra:?}: {e} (observed {observed:?})", role.name()))
    };
    for a in Attack::ALL {
        let v = judged(a, &[], true)?;
        eprintln!("{:8} {:22} full:   {}", role.name(), a.name(), v.cell);
        if v.layer == Layer::NotStopped {
            errs.push(format!(
                "{} {}: succeeded: {}",
                role.name(),
                a.name(),
                v.cell
            ));
        }
        full.insert(a, v.cell);
        let v = judged(a, &["--attack-without", "seccomp"], true)?;
        eprintln!("{:8} {:22} below:  {}", role.name(), a.name(), v.cell);
        if v.layer == Layer::Landlock {
            let v2 = judged(a, &["--attack-without", "seccomp,landlock"], false)?;
            eprintln!("{:8} {:22} no LL:  {}", role.name(), a.name(), v2.cell);
            if v2.layer == Layer::Landlock {
                errs.push(format!(
                    "{} {}: landlock without landlock",
                    role.name(),
                    a.name()
                ));
            }
        }
        below.insert(a, v.cell);
    }
    for (name, cells) in [("attacks-full", &full), ("attacks-below-seccomp", &below)] {
        if let Err(e) = check_columns(path, name, &[(role, cells)]) {
            errs.push(e);
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n\n"))
    }
}

/// Test side, the whole proof against a standalone worker binary (blockd, netd) with the hook:
/// for every attempt, a fresh `worker` started with `service(attempt)` (what it serves: socket,
/// image or tap; made unique per attempt by the caller) plus `--sandbox on --attack NAME
/// --attack-target ...` and the extra hook arguments, stdin `/dev/null`, stdout a pipe the
/// result is read from, the caller's stderr, and a sealed 1 MiB memfd as fd 5 in place of the
/// guest memory a front end would send ([`prove_standalone`] decides). The target is this test
/// process: a canary buffer that must not change, a listening TCP port, and `scratch/mnt` as
/// the mount point (a standalone worker shares the host's mounts).
pub fn prove_standalone_worker(
    role: Role,
    worker: &std::path::Path,
    doc: &std::path::Path,
    scratch: &std::path::Path,
    mut service: impl FnMut(Attack) -> Vec<String>,
) -> std::result::Result<(), String> {
    use std::os::fd::AsFd as _;
    let mnt = scratch.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(|e| format!("{}: {e}", mnt.display()))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let canary: &'static mut [u8; 64] = Box::leak(Box::new([0x11u8; 64]));
    let target = Target {
        monitor_pid: std::process::id() as i32,
        monitor_addr: canary.as_ptr() as u64,
        port,
        mount_point: mnt.display().to_string(),
    };
    let mem = sealed_memfd();
    let t = target.to_arg();
    let proved = prove_standalone(role, doc, |a, extra| {
        let (out_r, out_w) = pipe();
        let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut cmd = crate::launch::Command::new(worker).expect("command");
        let args = service(a);
        let hook = [
            "--sandbox",
            "on",
            "--attack",
            a.name(),
            "--attack-target",
            &t,
        ];
        for x in args
            .iter()
            .map(String::as_str)
            .chain(hook)
            .chain(extra.iter().copied())
        {
            cmd.arg(x).expect("arg");
        }
        cmd.fd(devnull.as_fd(), 0).expect("fd");
        cmd.fd(out_w.as_fd(), 1).expect("fd");
        cmd.fd(std::io::stderr().as_fd(), 2).expect("fd");
        cmd.fd(mem.as_fd(), 5).expect("fd");
        cmd.report_pipe(true);
        let child = cmd.spawn().expect("spawn");
        drop(out_w);
        observe(child, out_r, a, std::time::Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}"))
    });
    // SAFETY: a volatile read of our own live buffer (another process may have written it).
    let seen = unsafe { std::ptr::read_volatile(&*canary) };
    drop(listener);
    if seen != [0x11u8; 64] {
        return Err("the monitor's memory was written".into());
    }
    proved
}

/// A close-on-exec pipe, for the tests that run attempts (the worker's output, triggers).
pub fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: fds is a writable array of two ints.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two new fds nobody else owns.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    }
}

/// A 1 MiB memfd sealed the way the monitor seals guest memory.
pub fn sealed_memfd() -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a NUL-terminated name and flags.
    let fd = unsafe {
        libc::memfd_create(
            c"attack-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: memfd_create returned a new fd.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate and fcntl with integers on our own fd.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), 1 << 20), 0);
        assert_eq!(
            libc::fcntl(
                fd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL
            ),
            0
        );
    }
    fd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_requests_are_the_kernels() {
        for a in Attack::ALL {
            assert_eq!(Attack::from_name(a.name()), Some(a));
        }
        assert_eq!(TUNSETIFF, 0x4004_54ca);
        assert_eq!(KVM_CREATE_DEVICE, 0xc00c_aee0);
        assert_eq!(BLKRRPART, 0x125f);
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        // None of them is on the role's own list.
        for role in [Role::Vcpu, Role::Blockd, Role::Netd] {
            for a in [Attack::KvmIoctl, Attack::TapIoctl, Attack::BlockIoctl] {
                let req = a.ioctl_request(role).expect("an ioctl");
                let allowed = role.policy().allowed().any(|x| match x.rule {
                    crate::policy::Rule::Ioctl(l) => l.iter().any(|i| i.nr == req),
                    _ => false,
                });
                assert!(!allowed, "{role:?} may use {req:#x}");
            }
        }
    }

    #[test]
    fn the_hook_is_taken_out_of_a_command_line() {
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        let (h, rest) = Hook::take(args(
            "--socket /s --attack fork --file /i --attack-target=pid=1,addr=0x10,port=2,mnt=/",
        ))
        .expect("take");
        let h = h.expect("a hook");
        assert_eq!(h.which, Attack::Fork);
        assert_eq!(h.target.monitor_pid, 1);
        assert_eq!(rest, args("--socket /s --file /i"));
        assert_eq!(
            Hook::take(args("--socket /s")).expect("take"),
            (None, args("--socket /s"))
        );
        assert!(Hook::take(args("--attack fork")).is_err());
        assert!(Hook::take(args("--attack nope --attack-target pid=1")).is_err());
        assert!(Hook::take(args("--attack")).is_err());
        assert!(Hook::take(args("--attack-without seccomp")).is_err());
        assert!(Hook::take(args(
            "--attack fork --attack-target pid=1 --attack-without x"
        ))
        .is_err());
        let (h, _) = Hook::take(args(
            "--attack fork --attack-target pid=1 --attack-without seccomp",
        ))
        .expect("take");
        let h = h.expect("a hook");
        assert!(h.without_seccomp && !h.without_landlock);
        let p = h.weaken(Policy {
            ..*Role::Blockd.policy()
        });
        assert!(p.seccomp.is_none() && p.filesystem == Role::Blockd.policy().filesystem);
    }

    #[test]
    fn targets_and_results_round_trip() {
        let t = Target {
            monitor_pid: 1234,
            monitor_addr: 0x7fff_0000_1000,
            port: 4242,
            mount_point: "/tmp/x".into(),
        };
        assert_eq!(Target::parse(&t.to_arg()), Some(t));
        assert_eq!(Target::parse("pid=1,nope=2"), None);
        let text =
            format!("{BEGIN} fork\n{RESULT} fork refused call=clone errno=11 after 5 children\n");
        assert!(began(&text, Attack::Fork));
        assert!(!began(&text, Attack::Execve));
        assert_eq!(
            parse_result(&text, Attack::Fork),
            Some(Outcome::Refused {
                call: "clone".into(),
                errno: libc::EAGAIN,
                detail: "after 5 children".into()
            })
        );
        let ok = format!("{RESULT} execve ok ran /bin/sh\n");
        assert_eq!(
            parse_result(&ok, Attack::Execve),
            Some(Outcome::Succeeded("ran /bin/sh".into()))
        );
    }

    #[test]
    fn judging() {
        let refused = |call: &str, errno| {
            Observed::Returned(Outcome::Refused {
                call: call.into(),
                errno,
                detail: String::new(),
            })
        };
        let j = |a, o: &Observed, l| judge(a, o, l).expect("explained");
        assert_eq!(
            j(Attack::OpenHostFile, &refused("openat", libc::ENOENT), true).cell,
            "ENOENT: empty root"
        );
        assert_eq!(
            j(Attack::OpenRootDir, &refused("openat", libc::EACCES), true).layer,
            Layer::Landlock
        );
        assert!(judge(Attack::OpenRootDir, &refused("openat", libc::EACCES), false).is_err());
        assert!(judge(Attack::Mount, &refused("mount", libc::ENOENT), true).is_err());
        let killed = Observed::Killed {
            signal: libc::SIGSYS,
            violation: Some(Violation {
                nr: libc::SYS_ioctl,
                arch: crate::seccomp::AUDIT_ARCH_X86_64,
                args: [0, TUNSETIFF, 0, 0, 0, 0],
            }),
        };
        assert_eq!(
            j(Attack::TapIoctl, &killed, true).cell,
            "killed: seccomp (`ioctl` 0x400454ca)"
        );
        assert!(judge(Attack::Fork, &Observed::Vanished(Some(0)), true).is_err());
    }

    #[test]
    fn tables_round_trip() {
        let mut cells = BTreeMap::new();
        cells.insert(
            (Attack::Fork, 1),
            "EAGAIN after 5 children: RLIMIT_NPROC".into(),
        );
        cells.insert((Attack::Fork, 0), "killed: seccomp (`clone`)".into());
        let t = render_table(&["a", "b"], &cells);
        let doc = format!("x\n<!-- t:begin -->\n{t}<!-- t:end -->\ny");
        let parsed = parse_table(table_section(&doc, "t").expect("section"));
        assert_eq!(
            parsed[&Attack::Fork],
            [
                "killed: seccomp (`clone`)",
                "EAGAIN after 5 children: RLIMIT_NPROC"
            ]
        );
        assert_eq!(parsed[&Attack::Mount], ["—", "—"]);
        assert_eq!(parsed.len(), Attack::ALL.len());
    }
}
