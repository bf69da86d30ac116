//! One confinement policy per role, declared in this one place.
//!
//! A [`Policy`] says, for one role: which namespaces its launcher creates, which resource
//! limits it runs under (some computed from the guest's size, [`Params`]), what filesystem
//! access landlock leaves it, and its seccomp allowlist with the argument filters. Everything
//! else in the crate (launch, enter, the tests) reads these tables; adding a role is one entry.
//!
//! Rules the allowlists follow:
//! - a system call is listed only if a role's code needs it after [`crate::enter`] (found by
//!   reading the code and by tracing the worker; a forgotten one shows up as a SIGSYS kill
//!   naming its number);
//! - `ioctl` is allowed only for the listed request numbers (compared on the low 32 bits, which
//!   is what the kernel uses);
//! - threads yes, processes no: `clone` only with `CLONE_THREAD`, `clone3` answers `ENOSYS` (its
//!   flags sit behind a pointer seccomp cannot read; glibc then falls back to `clone`), no
//!   `fork`, `vfork` or `execve`;
//! - `rt_sigaction` on `SIGSYS` is refused, so the reporting handler cannot be replaced;
//! - `tgkill` only towards the worker's own threads and with the signals it uses.

use crate::ioctls::{self, Ioctl};

/// The processes Bulkhead runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `bulkhead-vcpu`: the KVM VM and its devices.
    Vcpu,
    /// `bulkhead-blockd`: one virtio-blk back end (issue 5).
    Blockd,
    /// `bulkhead-netd`: one virtio-net back end (issue 6).
    Netd,
    /// `bulkhead`, the monitor: confines itself once start-up is done (`enter::confine_monitor`).
    Monitor,
}

impl Role {
    /// Every role, in a fixed order.
    pub const ALL: [Role; 4] = [Role::Vcpu, Role::Blockd, Role::Netd, Role::Monitor];

    /// The role's name as logs and `--sandbox-role` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vcpu",
            Role::Blockd => "blockd",
            Role::Netd => "netd",
            Role::Monitor => "monitor",
        }
    }

    /// The role named `s`.
    pub fn from_name(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == s)
    }

    /// This role's policy.
    pub fn policy(self) -> &'static Policy {
        match self {
            Role::Vcpu => &VCPU,
            Role::Blockd => &BLOCKD,
            Role::Netd => &NETD,
            Role::Monitor => &MONITOR,
        }
    }
}

/// What a role's limits depend on, passed by the monitor on the worker's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Guest RAM in bytes (the worker maps all of it).
    pub mem_bytes: u64,
    /// vCPU threads.
    pub vcpus: u32,
    /// Virtqueues a back end serves (blockd: one worker thread each; netd: one per rx/tx pair).
    pub queues: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            mem_bytes: 0,
            vcpus: 1,
            queues: 1,
        }
    }
}

/// The namespaces a launcher creates for a worker (`CLONE_NEW*` flags).
pub const WORKER_NAMESPACES: u64 = (libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWNET) as u64;

/// A resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `RLIMIT_NPROC` (counts threads too, per user in the worker's own user namespace).
    Nproc,
    /// `RLIMIT_NOFILE`.
    Nofile,
    /// `RLIMIT_AS`.
    As,
    /// `RLIMIT_CORE`.
    Core,
    /// `RLIMIT_FSIZE`.
    Fsize,
    /// `RLIMIT_MEMLOCK`.
    Memlock,
    /// `RLIMIT_MSGQUEUE`.
    Msgqueue,
}

impl Resource {
    /// The `RLIMIT_*` constant.
    pub fn raw(self) -> libc::__rlimit_resource_t {
        match self {
            Resource::Nproc => libc::RLIMIT_NPROC,
            Resource::Nofile => libc::RLIMIT_NOFILE,
            Resource::As => libc::RLIMIT_AS,
            Resource::Core => libc::RLIMIT_CORE,
            Resource::Fsize => libc::RLIMIT_FSIZE,
            Resource::Memlock => libc::RLIMIT_MEMLOCK,
            Resource::Msgqueue => libc::RLIMIT_MSGQUEUE,
        }
    }

    /// The name `/proc/PID/limits` uses for it.
    pub fn proc_name(self) -> &'static str {
        match self {
            Resource::Nproc => "Max processes",
            Resource::Nofile => "Max open files",
            Resource::As => "Max address space",
            Resource::Core => "Max core file size",
            Resource::Fsize => "Max file size",
            Resource::Memlock => "Max locked memory",
            Resource::Msgqueue => "Max msgqueue size",
        }
    }
}

/// One limit, soft = hard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rlimit {
    /// Which.
    pub resource: Resource,
    /// The value (`None`: unlimited, i.e. left as inherited).
    pub value: Option<u64>,
}

const MIB: u64 = 1 << 20;

/// Filesystem access left to a role by landlock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filesystem {
    /// None at all: every access right of the best ABI handled, no rule added.
    Nothing,
    /// Only the paths the monitor's configuration names (`enter::confine_monitor` with them;
    /// `enter` itself, which has no configuration, allows no path at all).
    ConfiguredPaths,
    /// No landlock ruleset (only for the attack tests' "without landlock" runs).
    Unconfined,
}

/// A condition on one system call's arguments; the call is allowed if it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Any arguments.
    Any,
    /// Argument `arg` (32-bit compare) is one of `values`.
    ArgIn {
        /// Argument index (0-5).
        arg: u8,
        /// Allowed values.
        values: &'static [u64],
    },
    /// Argument `arg` (32-bit compare) is one of the ioctl numbers in `ioctls`.
    Ioctl(&'static [Ioctl]),
    /// Argument `arg` (32-bit compare) is anything but `value`.
    ArgNot {
        /// Argument index (0-5).
        arg: u8,
        /// The refused value.
        value: u64,
    },
    /// Argument `arg` (64-bit) has all bits of `bits` set.
    ArgHasBits {
        /// Argument index (0-5).
        arg: u8,
        /// Required bits.
        bits: u64,
    },
    /// `tgkill(own pid, any thread, sig)` with `sig` one of `signals` (resolved at start:
    /// [`Signal::RtMin`] is glibc's first real-time signal).
    OwnThreadSignal(&'static [Signal]),
    /// Not allowed, but answered with this errno instead of the kill (for calls libraries
    /// probe and then work without).
    Errno(u32),
}

/// A signal number in a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A fixed number.
    Fixed(i32),
    /// `SIGRTMIN` as the C library defines it at run time.
    RtMin,
}

impl Signal {
    /// The number.
    pub fn number(self) -> i32 {
        match self {
            Signal::Fixed(n) => n,
            Signal::RtMin => libc::SIGRTMIN(),
        }
    }
}

/// One allowlist entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// The system call's name.
    pub name: &'static str,
    /// Its number on this architecture.
    pub nr: i64,
    /// The condition on its arguments.
    pub rule: Rule,
}

/// A role's confinement.
#[derive(Debug)]
pub struct Policy {
    /// The role.
    pub role: Role,
    /// Namespaces its launcher creates (0: it is not launched by Bulkhead).
    pub namespaces: u64,
    /// Pivot into an empty read-only root.
    pub empty_root: bool,
    /// Landlock.
    pub filesystem: Filesystem,
    /// The oldest landlock ABI under which [`Policy::filesystem`] still holds; an older kernel is
    /// a weakness (see `docs/ARCHITECTURE.md`, "Sandbox").
    pub min_landlock_abi: i32,
    /// The limits for given parameters.
    pub rlimits: fn(&Params) -> Vec<Rlimit>,
    /// The seccomp allowlist (`None`: no filter).
    pub seccomp: Option<&'static [&'static [Allowed]]>,
}

impl Policy {
    /// The limits for `params`.
    pub fn rlimits(&self, params: &Params) -> Vec<Rlimit> {
        (self.rlimits)(params)
    }

    /// Every allowlist entry of the role (empty without a filter).
    pub fn allowed(&self) -> impl Iterator<Item = &'static Allowed> {
        self.seccomp.into_iter().flatten().flat_map(|l| l.iter())
    }

    /// Number of distinct system calls allowed (Errno entries not counted).
    pub fn syscall_count(&self) -> usize {
        let mut nrs: Vec<i64> = self
            .allowed()
            .filter(|a| !matches!(a.rule, Rule::Errno(_)))
            .map(|a| a.nr)
            .collect();
        nrs.sort_unstable();
        nrs.dedup();
        nrs.len()
    }

    /// Number of distinct ioctl request numbers allowed.
    pub fn ioctl_count(&self) -> usize {
        let mut nrs: Vec<u64> = self
            .allowed()
            .filter_map(|a| match a.rule {
                Rule::Ioctl(list) => Some(list.iter().map(|i| i.nr)),
                _ => None,
            })
            .flatten()
            .collect();
        nrs.sort_unstable();
        nrs.dedup();
        nrs.len()
    }
}

macro_rules! sys {
    ($name:ident) => {
        sys!($name, Rule::Any)
    };
    ($name:ident, $rule:expr) => {
        Allowed {
            name: stringify!($name),
            nr: paste_nr!($name),
            rule: $rule,
        }
    };
}

macro_rules! paste_nr {
    (read) => {
        libc::SYS_read
    };
    (write) => {
        libc::SYS_write
    };
    (readv) => {
        libc::SYS_readv
    };
    (writev) => {
        libc::SYS_writev
    };
    (pread64) => {
        libc::SYS_pread64
    };
    (pwrite64) => {
        libc::SYS_pwrite64
    };
    (preadv) => {
        libc::SYS_preadv
    };
    (pwritev) => {
        libc::SYS_pwritev
    };
    (preadv2) => {
        libc::SYS_preadv2
    };
    (pwritev2) => {
        libc::SYS_pwritev2
    };
    (lseek) => {
        libc::SYS_lseek
    };
    (close) => {
        libc::SYS_close
    };
    (fcntl) => {
        libc::SYS_fcntl
    };
    (fstat) => {
        libc::SYS_fstat
    };
    (newfstatat) => {
        libc::SYS_newfstatat
    };
    (statx) => {
        libc::SYS_statx
    };
    (fsync) => {
        libc::SYS_fsync
    };
    (fstatfs) => {
        libc::SYS_fstatfs
    };
    (fdatasync) => {
        libc::SYS_fdatasync
    };
    (ftruncate) => {
        libc::SYS_ftruncate
    };
    (fallocate) => {
        libc::SYS_fallocate
    };
    (ioctl) => {
        libc::SYS_ioctl
    };
    (recvmsg) => {
        libc::SYS_recvmsg
    };
    (sendmsg) => {
        libc::SYS_sendmsg
    };
    (eventfd2) => {
        libc::SYS_eventfd2
    };
    (epoll_create1) => {
        libc::SYS_epoll_create1
    };
    (epoll_ctl) => {
        libc::SYS_epoll_ctl
    };
    (epoll_wait) => {
        libc::SYS_epoll_wait
    };
    (epoll_pwait) => {
        libc::SYS_epoll_pwait
    };
    (ppoll) => {
        libc::SYS_ppoll
    };
    (poll) => {
        libc::SYS_poll
    };
    (mmap) => {
        libc::SYS_mmap
    };
    (munmap) => {
        libc::SYS_munmap
    };
    (mprotect) => {
        libc::SYS_mprotect
    };
    (mremap) => {
        libc::SYS_mremap
    };
    (madvise) => {
        libc::SYS_madvise
    };
    (brk) => {
        libc::SYS_brk
    };
    (futex) => {
        libc::SYS_futex
    };
    (sched_yield) => {
        libc::SYS_sched_yield
    };
    (sched_getaffinity) => {
        libc::SYS_sched_getaffinity
    };
    (nanosleep) => {
        libc::SYS_nanosleep
    };
    (clock_nanosleep) => {
        libc::SYS_clock_nanosleep
    };
    (clock_gettime) => {
        libc::SYS_clock_gettime
    };
    (gettimeofday) => {
        libc::SYS_gettimeofday
    };
    (getrandom) => {
        libc::SYS_getrandom
    };
    (rt_sigaction) => {
        libc::SYS_rt_sigaction
    };
    (rt_sigprocmask) => {
        libc::SYS_rt_sigprocmask
    };
    (rt_sigreturn) => {
        libc::SYS_rt_sigreturn
    };
    (sigaltstack) => {
        libc::SYS_sigaltstack
    };
    (tgkill) => {
        libc::SYS_tgkill
    };
    (getpid) => {
        libc::SYS_getpid
    };
    (gettid) => {
        libc::SYS_gettid
    };
    (clone) => {
        libc::SYS_clone
    };
    (clone3) => {
        libc::SYS_clone3
    };
    (set_robust_list) => {
        libc::SYS_set_robust_list
    };
    (rseq) => {
        libc::SYS_rseq
    };
    (prctl) => {
        libc::SYS_prctl
    };
    (exit) => {
        libc::SYS_exit
    };
    (exit_group) => {
        libc::SYS_exit_group
    };
    (restart_syscall) => {
        libc::SYS_restart_syscall
    };
    (dup2) => {
        libc::SYS_dup2
    };
    (accept4) => {
        libc::SYS_accept4
    };
    (recvfrom) => {
        libc::SYS_recvfrom
    };
    (sendto) => {
        libc::SYS_sendto
    };
    (socketpair) => {
        libc::SYS_socketpair
    };
    (shutdown) => {
        libc::SYS_shutdown
    };
    (getsockname) => {
        libc::SYS_getsockname
    };
    (openat) => {
        libc::SYS_openat
    };
    (getdents64) => {
        libc::SYS_getdents64
    };
    (readlink) => {
        libc::SYS_readlink
    };
    (pidfd_send_signal) => {
        libc::SYS_pidfd_send_signal
    };
    (waitid) => {
        libc::SYS_waitid
    };
    (unlink) => {
        libc::SYS_unlink
    };
    (sched_yield) => {
        libc::SYS_sched_yield
    };
}

/// What every worker's Rust runtime needs: memory, threads (glibc's `pthread_create`: `clone`,
/// `set_robust_list`, `rseq`, `sched_getaffinity`; Rust's thread names and stack guards:
/// `prctl(PR_SET_NAME)`, `sigaltstack`), signals, time (`clock_gettime` when the vDSO cannot
/// serve it, e.g. on a TSC-less clocksource; `clock_nanosleep` for `thread::sleep`, and
/// `restart_syscall` when a kick signal interrupts it), `getrandom` (hash map keys), file
/// metadata of handed fds (`statx`), exit.
const RUNTIME: &[Allowed] = &[
    sys!(read),
    sys!(write),
    sys!(close),
    sys!(mmap),
    sys!(munmap),
    sys!(mprotect),
    sys!(mremap),
    sys!(madvise),
    sys!(brk),
    sys!(futex),
    sys!(sched_getaffinity),
    sys!(clock_nanosleep),
    sys!(clock_gettime),
    sys!(getrandom),
    sys!(
        rt_sigaction,
        Rule::ArgNot {
            arg: 0,
            value: libc::SIGSYS as u64
        }
    ),
    sys!(rt_sigprocmask),
    sys!(rt_sigreturn),
    sys!(sigaltstack),
    sys!(getpid),
    sys!(gettid),
    sys!(
        clone,
        Rule::ArgHasBits {
            arg: 0,
            bits: libc::CLONE_THREAD as u64
        }
    ),
    sys!(clone3, Rule::Errno(libc::ENOSYS as u32)),
    sys!(set_robust_list),
    sys!(rseq),
    sys!(
        prctl,
        Rule::ArgIn {
            arg: 0,
            values: &[libc::PR_SET_NAME as u64]
        }
    ),
    sys!(exit),
    sys!(exit_group),
    sys!(restart_syscall),
    sys!(
        fcntl,
        Rule::ArgIn {
            arg: 1,
            values: &[
                libc::F_GETFD as u64,
                libc::F_SETFD as u64,
                libc::F_GETFL as u64,
                libc::F_SETFL as u64,
                libc::F_DUPFD_CLOEXEC as u64,
                libc::F_GET_SEALS as u64,
            ]
        }
    ),
    sys!(statx),
];

/// `bulkhead-vcpu` on top of [`RUNTIME`].
const VCPU_EXTRA: &[Allowed] = &[
    sys!(ioctl, Rule::Ioctl(ioctls::VCPU_KVM)),
    // ipc (the socketpair it was handed)
    sys!(recvmsg),
    sys!(sendmsg),
    // kernel and initrd are read from the fds the monitor hands over
    sys!(pread64),
    sys!(lseek),
    // the serial interrupt's irqfd; the virtio devices' kick and call eventfds
    sys!(eventfd2),
    // the vhost-user watchdog cuts off a back end that stops answering (a vCPU must not hang)
    sys!(shutdown),
    // vCPU kicks (SIGRTMIN) and abort()
    sys!(
        tgkill,
        Rule::OwnThreadSignal(&[Signal::RtMin, Signal::Fixed(libc::SIGABRT)])
    ),
];

/// vhost-user back ends (blockd, netd): the socket, the event loop, guest memory.
const VHOST_USER: &[Allowed] = &[
    sys!(recvmsg),
    sys!(sendmsg),
    sys!(eventfd2),
    sys!(epoll_create1),
    sys!(epoll_ctl),
    sys!(epoll_wait),
    sys!(epoll_pwait),
    sys!(ppoll),
    sys!(
        tgkill,
        Rule::OwnThreadSignal(&[Signal::Fixed(libc::SIGABRT)])
    ),
];

/// `bulkhead-blockd` on top of [`RUNTIME`] and [`VHOST_USER`], as traced (`strace -f`) under its
/// tests (QEMU/TCG boots in both cache modes, the vhost-user front-end tests): image I/O by offset
/// (`pread64`/`pwrite64`, and `preadv`/`pwritev` straight between the image and guest memory),
/// flush (`fdatasync`), discard and write-zeroes (`fallocate`), the framework closing its
/// connection (`shutdown`). The block ioctls are for an image that is a block device handed
/// over after `enter` (its size), and `preadv2`/`pwritev2` with `RWF_NOWAIT`. No `lseek`, `fsync`.
const BLOCKD_EXTRA: &[Allowed] = &[
    // `block_resize` of a raw image (a launched blockd, asked over ipc)
    sys!(ftruncate),
    sys!(pread64),
    sys!(pwrite64),
    sys!(preadv),
    sys!(pwritev),
    // RWF_NOWAIT attempts: a transfer the page cache completes at once stays on the queue thread
    sys!(preadv2),
    sys!(pwritev2),
    sys!(fdatasync),
    sys!(fallocate),
    sys!(shutdown),
    // whether an image handed over lives on tmpfs (its writes then take the I/O threads' write
    // lane: `bulkhead_blockd::format::writes_serialize`)
    sys!(fstatfs),
    sys!(ioctl, Rule::Ioctl(ioctls::BLOCKD_BLK)),
];

/// netd beyond the vhost-user set: `writev` of a guest frame to the tap (frames from the tap
/// come with `read`), `shutdown` (how `vhost-user-backend` closes the connection) and the two
/// tap ioctls it issues once the front end has set the features. No `readv`, and `TUNGETIFF` /
/// `TUNGETVNETHDRSZ` only before the sandbox. Found by tracing netd (`strace -f`) under its
/// data-path tests.
const NETD_EXTRA: &[Allowed] = &[
    sys!(writev),
    sys!(shutdown),
    sys!(ioctl, Rule::Ioctl(ioctls::NETD_TAP)),
];

/// The monitor after start-up (its own thread pool, QMP sessions with fd passing, worker
/// supervision by pidfd, `/proc` reads for `x-query-sandbox`, the exit's unlinks): no process
/// creation (`clone` only for threads, `clone3` answered `ENOSYS`, no `fork`/`vfork`/`execve*`),
/// no `mount`/`pivot_root`/`unshare`/`setns`, no `ptrace`, no `socket` (every listener exists
/// before; new connections come from `accept4`), `socketpair` for `AF_UNIX` only (one ipc
/// channel per worker start), no `truncate` by path. Paths reachable through `openat` and
/// `unlink` are limited by the monitor's landlock ruleset. Found by tracing the monitor
/// (`strace -f`) under the monitor test suites and the nested boots.
const MONITOR_EXTRA: &[Allowed] = &[
    sys!(ioctl, Rule::Ioctl(ioctls::MONITOR_TTY)),
    sys!(recvmsg),
    sys!(sendmsg),
    sys!(recvfrom),
    sys!(sendto),
    sys!(accept4),
    sys!(
        socketpair,
        Rule::ArgIn {
            arg: 0,
            values: &[libc::AF_UNIX as u64]
        }
    ),
    sys!(shutdown),
    sys!(getsockname),
    sys!(eventfd2),
    sys!(epoll_ctl),
    sys!(epoll_wait),
    sys!(epoll_pwait),
    sys!(poll),
    sys!(ppoll),
    sys!(openat),
    sys!(getdents64),
    sys!(newfstatat),
    sys!(fstat),
    sys!(lseek),
    // blockdev-add: the header of an image opened after start-up (its format, qcow2 chain)
    sys!(pread64),
    sys!(readv),
    sys!(writev),
    sys!(readlink),
    sys!(pidfd_send_signal),
    sys!(waitid),
    sys!(unlink),
    // -daemonize: stdio onto /dev/null once ready
    sys!(dup2),
    sys!(sched_yield),
    sys!(
        tgkill,
        Rule::OwnThreadSignal(&[Signal::Fixed(libc::SIGABRT)])
    ),
];

fn nofile(extra: u64) -> Rlimit {
    Rlimit {
        resource: Resource::Nofile,
        value: Some(extra),
    }
}

fn fixed(resource: Resource, v: u64) -> Rlimit {
    Rlimit {
        resource,
        value: Some(v),
    }
}

fn unlimited(resource: Resource) -> Rlimit {
    Rlimit {
        resource,
        value: None,
    }
}

/// vcpu limits. Threads: main, ipc reader, serial input, one per vCPU (+2 spare for the
/// runtime). Fds: stdio, ipc, report, kvm, VM, memfd, kernel, initrd, 2 serial, irqfd, one per
/// vCPU, with room to spare. Address space: guest RAM plus a fixed base (binary, libraries,
/// main heap and stack) plus, per thread, its stack and a malloc arena's reservation (64 MiB).
/// Files: `-serial file:` and a redirected stderr are regular files the worker writes through
/// fds it is handed, so RLIMIT_FSIZE cannot be 0 for this role.
fn vcpu_rlimits(p: &Params) -> Vec<Rlimit> {
    let vcpus = u64::from(p.vcpus.max(1));
    // vCPUs, main, serial input, the vhost-user watchdog, and one spare.
    let threads = vcpus + 4;
    vec![
        fixed(Resource::Nproc, threads + 2),
        // Virtio devices: up to 31 slots x (socket, config eventfd, kick and call per queue,
        // 16 queues) = 31 x 34 = 1054 on top of the machine's own.
        nofile(64 + 2 * vcpus + 1054),
        fixed(
            Resource::As,
            p.mem_bytes
                .saturating_add(256 * MIB)
                .saturating_add(threads.saturating_mul(80 * MIB)),
        ),
        fixed(Resource::Core, 0),
        unlimited(Resource::Fsize),
        fixed(Resource::Memlock, 0),
        fixed(Resource::Msgqueue, 0),
    ]
}

/// Most I/O threads a blockd starts per disk (`bulkhead_blockd::pool`): enough for a guest's
/// queue depth of 32 to reach the image at once, as qemu-storage-daemon's thread pool does.
pub const BLOCKD_IO_THREADS: u64 = 32;

/// blockd: writes its image (FSIZE unlimited), maps guest RAM. Threads: main (the ipc loop when
/// launched, the accepting thread standalone), the vhost-user request thread, the thread that
/// waits for the front end to hang up, one per queue, the I/O threads
/// ([`BLOCKD_IO_THREADS`]), and one spare.
fn blockd_rlimits(p: &Params) -> Vec<Rlimit> {
    let queues = u64::from(p.queues.max(1));
    vec![
        fixed(Resource::Nproc, queues + 4 + BLOCKD_IO_THREADS),
        nofile(64),
        fixed(Resource::As, p.mem_bytes.saturating_add(512 * MIB)),
        fixed(Resource::Core, 0),
        unlimited(Resource::Fsize),
        fixed(Resource::Memlock, 0),
        fixed(Resource::Msgqueue, 0),
    ]
}

/// netd: writes no file (its stderr must then be a pipe, socket or terminal), maps guest RAM.
/// Threads: main (the ipc loop when launched, the accepting thread standalone), the vhost-user
/// request thread, one epoll worker per queue pair (two virtqueues), the thread that waits for
/// the front end to hang up (launched) or the relay's two threads (standalone), and one spare.
fn netd_rlimits(p: &Params) -> Vec<Rlimit> {
    let pairs = u64::from(p.queues.max(1)).div_ceil(2);
    vec![
        fixed(Resource::Nproc, pairs + 5),
        nofile(64),
        fixed(Resource::As, p.mem_bytes.saturating_add(512 * MIB)),
        fixed(Resource::Core, 0),
        fixed(Resource::Fsize, 0),
        fixed(Resource::Memlock, 0),
        fixed(Resource::Msgqueue, 0),
    ]
}

/// The monitor keeps what it inherits but never dumps core (guest RAM would be in it).
fn monitor_rlimits(_: &Params) -> Vec<Rlimit> {
    vec![fixed(Resource::Core, 0)]
}

/// `bulkhead-vcpu`.
pub static VCPU: Policy = Policy {
    role: Role::Vcpu,
    namespaces: WORKER_NAMESPACES,
    empty_root: true,
    filesystem: Filesystem::Nothing,
    min_landlock_abi: 1,
    rlimits: vcpu_rlimits,
    seccomp: Some(&[RUNTIME, VCPU_EXTRA]),
};

/// `bulkhead-blockd` (the worker runs standalone with this policy minus the launcher's part plus
/// `accept4`, see blockd/src/confine.rs; the monitor does not launch it yet).
pub static BLOCKD: Policy = Policy {
    role: Role::Blockd,
    namespaces: WORKER_NAMESPACES,
    empty_root: true,
    filesystem: Filesystem::Nothing,
    min_landlock_abi: 1,
    rlimits: blockd_rlimits,
    seccomp: Some(&[RUNTIME, VHOST_USER, BLOCKD_EXTRA]),
};

/// `bulkhead-netd` (standalone with this policy minus the launcher's part plus `accept4`, or
/// launched by the monitor: netd's worker mode). Its network namespace is empty: it reaches the
/// network only through the tap fd it is handed.
pub static NETD: Policy = Policy {
    role: Role::Netd,
    namespaces: WORKER_NAMESPACES,
    empty_root: true,
    filesystem: Filesystem::Nothing,
    min_landlock_abi: 1,
    rlimits: netd_rlimits,
    seccomp: Some(&[RUNTIME, VHOST_USER, NETD_EXTRA]),
};

/// `bulkhead`, the monitor: landlock on the configured paths and the seccomp allowlist, applied
/// by the monitor itself once start-up is done (`enter::confine_monitor`); namespaces, root and
/// capabilities are the host's (it starts workers through its launcher, which has none of
/// this: see `docs/ARCHITECTURE.md`).
pub static MONITOR: Policy = Policy {
    role: Role::Monitor,
    namespaces: 0,
    empty_root: false,
    filesystem: Filesystem::ConfiguredPaths,
    min_landlock_abi: 1,
    rlimits: monitor_rlimits,
    seccomp: Some(&[RUNTIME, MONITOR_EXTRA]),
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_policies_name_their_role() {
        for r in Role::ALL {
            assert_eq!(Role::from_name(r.name()), Some(r));
            assert_eq!(r.policy().role, r);
        }
        assert_eq!(Role::from_name("nope"), None);
    }

    #[test]
    fn workers_get_every_namespace_an_empty_root_and_no_filesystem() {
        for r in [Role::Vcpu, Role::Blockd, Role::Netd] {
            let p = r.policy();
            assert_eq!(p.namespaces, WORKER_NAMESPACES, "{r:?}");
            assert!(p.empty_root, "{r:?}");
            assert_eq!(p.filesystem, Filesystem::Nothing, "{r:?}");
            assert!(p.seccomp.is_some(), "{r:?} has no seccomp filter");
            assert!(p.min_landlock_abi >= 1);
        }
    }

    #[test]
    fn allowlists_are_consistent() {
        for r in Role::ALL {
            let p = r.policy();
            let mut seen = std::collections::HashMap::new();
            for a in p.allowed() {
                // A call appears once per role (rules of one call would otherwise be OR-ed
                // across lists without anyone seeing it).
                assert!(
                    seen.insert(a.nr, a.name).is_none(),
                    "{r:?}: {} listed twice",
                    a.name
                );
                if let Rule::ArgIn { arg, .. }
                | Rule::ArgNot { arg, .. }
                | Rule::ArgHasBits { arg, .. } = a.rule
                {
                    assert!(arg < 6);
                }
            }
            // Never allowed to any worker.
            if p.seccomp.is_some() {
                for nr in [
                    libc::SYS_execve,
                    libc::SYS_execveat,
                    libc::SYS_fork,
                    libc::SYS_vfork,
                    libc::SYS_ptrace,
                    libc::SYS_mount,
                    libc::SYS_umount2,
                    libc::SYS_pivot_root,
                    libc::SYS_chroot,
                    libc::SYS_unshare,
                    libc::SYS_setns,
                    libc::SYS_socket,
                    libc::SYS_connect,
                    libc::SYS_open,
                    libc::SYS_openat,
                    libc::SYS_openat2,
                    libc::SYS_init_module,
                    libc::SYS_finit_module,
                    libc::SYS_kill,
                    libc::SYS_bpf,
                    libc::SYS_perf_event_open,
                    libc::SYS_userfaultfd,
                    libc::SYS_io_uring_setup,
                    libc::SYS_seccomp,
                    libc::SYS_capset,
                    libc::SYS_setuid,
                    libc::SYS_keyctl,
                    libc::SYS_truncate,
                ] {
                    // The monitor opens files (landlock limits which); nothing else here.
                    if r == Role::Monitor && nr == libc::SYS_openat {
                        continue;
                    }
                    assert!(
                        !seen.contains_key(&nr),
                        "{r:?} allows forbidden syscall {nr}"
                    );
                }
            }
        }
    }

    #[test]
    fn clone_requires_a_thread_and_sigsys_stays_ours() {
        for r in Role::ALL {
            let p = r.policy();
            let find = |nr| p.allowed().find(|a| a.nr == nr).map(|a| a.rule);
            assert_eq!(
                find(libc::SYS_clone),
                Some(Rule::ArgHasBits {
                    arg: 0,
                    bits: libc::CLONE_THREAD as u64
                })
            );
            assert_eq!(
                find(libc::SYS_clone3),
                Some(Rule::Errno(libc::ENOSYS as u32))
            );
            assert_eq!(
                find(libc::SYS_rt_sigaction),
                Some(Rule::ArgNot {
                    arg: 0,
                    value: libc::SIGSYS as u64
                })
            );
        }
    }

    #[test]
    fn vcpu_limits_follow_the_guest_size() {
        let small = VCPU.rlimits(&Params {
            mem_bytes: 64 * MIB,
            vcpus: 1,
            queues: 1,
        });
        let big = VCPU.rlimits(&Params {
            mem_bytes: 4096 * MIB,
            vcpus: 8,
            queues: 1,
        });
        let get = |l: &[Rlimit], r| l.iter().find(|x| x.resource == r).and_then(|x| x.value);
        assert!(get(&big, Resource::As) > get(&small, Resource::As));
        assert!(get(&big, Resource::As).unwrap_or(0) > 4096 * MIB);
        assert_eq!(get(&small, Resource::Nproc), Some(7));
        assert_eq!(get(&small, Resource::Core), Some(0));
        assert_eq!(get(&small, Resource::Fsize), None);
        assert_eq!(
            get(&NETD.rlimits(&Params::default()), Resource::Fsize),
            Some(0)
        );
        // blockd: a thread per queue and its I/O threads.
        let blockd = |queues| {
            get(
                &BLOCKD.rlimits(&Params {
                    queues,
                    ..Params::default()
                }),
                Resource::Nproc,
            )
        };
        assert_eq!(blockd(1), Some(5 + BLOCKD_IO_THREADS));
        assert_eq!(blockd(16), Some(20 + BLOCKD_IO_THREADS));
        // netd: a thread per queue pair.
        let netd = |queues| {
            get(
                &NETD.rlimits(&Params {
                    queues,
                    ..Params::default()
                }),
                Resource::Nproc,
            )
        };
        assert_eq!(netd(1), Some(6));
        assert_eq!(netd(2), Some(6));
        assert_eq!(netd(4), Some(7));
        for r in Role::ALL {
            let l = r.policy().rlimits(&Params::default());
            assert_eq!(get(&l, Resource::Core), Some(0), "{r:?}");
        }
    }

    #[test]
    fn counts() {
        // The sizes docs/ARCHITECTURE.md quotes (`cargo test -p bulkhead-sandbox counts --
        // --nocapture`).
        for r in Role::ALL {
            let p = r.policy();
            let bpf: usize = crate::seccomp::compile(p, 1)
                .map(|f| f.iter().map(Vec::len).sum())
                .unwrap_or(0);
            eprintln!(
                "{}: {} system calls, {} ioctl numbers, {bpf} BPF instructions",
                r.name(),
                p.syscall_count(),
                p.ioctl_count()
            );
        }
        // The standalone back ends' policies (the role's plus accept4), docs/ARCHITECTURE.md too.
        for r in [Role::Blockd, Role::Netd] {
            let p = crate::standalone::policy(r);
            let bpf: usize = crate::seccomp::compile(&p, 1)
                .map(|f| f.iter().map(Vec::len).sum())
                .unwrap_or(0);
            eprintln!(
                "standalone {}: {} system calls, {} ioctl numbers, {bpf} BPF instructions",
                r.name(),
                p.syscall_count(),
                p.ioctl_count()
            );
        }
        assert_eq!(VCPU.ioctl_count(), ioctls::VCPU_KVM.len());
        assert!(VCPU.syscall_count() > 30);
        // TUNSETOFFLOAD, TUNSETVNETHDRSZ and (multiqueue) TUNSETQUEUE.
        assert_eq!(NETD.ioctl_count(), ioctls::NETD_TAP.len());
        assert_eq!(NETD.ioctl_count(), 3);
        // The terminal's four, FIONBIO, and TUNGETIFF on passed taps.
        assert_eq!(MONITOR.ioctl_count(), 6);
        assert!(MONITOR.syscall_count() > 40);
    }

    #[test]
    fn the_monitor_may_not_create_processes_or_sockets() {
        let find = |nr| MONITOR.allowed().find(|a| a.nr == nr).map(|a| a.rule);
        assert_eq!(
            find(libc::SYS_socketpair),
            Some(Rule::ArgIn {
                arg: 0,
                values: &[libc::AF_UNIX as u64]
            })
        );
        for nr in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
        ] {
            assert_eq!(find(nr), None, "{nr}");
        }
    }
}
