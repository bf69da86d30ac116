//! What a worker does to itself, at the top of `main`, before it reads anything from the
//! monitor or the guest. The launcher ([`crate::launch`]) has already put it in fresh user,
//! mount, pid, ipc, uts and network namespaces, as uid 0 of its own user namespace (mapped to an
//! unprivileged uid outside), with only the fds it was handed.
//!
//! Order, each step needing the ones before:
//! 1. check the launch: own user namespace (uid_map is not the identity map), own pid namespace;
//! 2. `user.max_user_namespaces` set to 0 in the worker's own user namespace (no nested user
//!    namespace, even without seccomp); then mounts: everything `MS_PRIVATE` (nothing propagates back to the host), a tiny tmpfs
//!    mounted over `/proc` (any existing directory would do; `/proc` exists wherever Bulkhead
//!    runs), `pivot_root(".", ".")` into it, the old root detached, `chdir("/")`, the new root
//!    remounted read-only, nosuid, nodev, noexec. From here no host path exists;
//! 3. `no_new_privs`;
//! 4. capabilities: securebits locked (no root privileges on exec or setuid), bounding set
//!    cleared, ambient, inheritable, effective and permitted sets emptied;
//! 5. rlimits from the policy and [`Params`];
//! 6. landlock: a ruleset handling every filesystem (and TCP, and scope) right of the best ABI
//!    the kernel offers, with no rule: no filesystem access at all, even through a handed fd to a
//!    directory;
//! 7. seccomp last (the steps above need system calls the allowlist refuses): the `SIGSYS`
//!    reporter, then the filters on every thread.
//!
//! With [`Mode::On`] a missing piece (no own user namespace, landlock older than the policy's
//! minimum, no seccomp) is an error before anything is changed; with [`Mode::AllowWeak`] it is
//! skipped and listed in [`EnterReport::weak`].

use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::features::Features;
use crate::policy::{Filesystem, Params, Policy, Resource};
use crate::{check, seccomp, set_no_new_privs, Error, Result};

/// How strictly to confine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Everything the policy says, or refuse to run.
    On,
    /// No confinement at all (debugging only).
    Off,
    /// Everything the kernel and launch allow; what is missing is reported, not fatal.
    AllowWeak,
}

impl Mode {
    /// `on`, `off`, `allow-weak`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::On => "on",
            Mode::Off => "off",
            Mode::AllowWeak => "allow-weak",
        }
    }

    /// Parses `on`, `off`, `allow-weak`.
    pub fn from_name(s: &str) -> Option<Mode> {
        match s {
            "on" => Some(Mode::On),
            "off" => Some(Mode::Off),
            "allow-weak" => Some(Mode::AllowWeak),
            _ => None,
        }
    }
}

/// What [`enter`] did.
#[derive(Debug, Clone, Default)]
pub struct EnterReport {
    /// Landlock ABI used (0: none).
    pub landlock_abi: i32,
    /// Whether the kernel enforces the whole landlock ruleset asked for.
    pub landlock_full: bool,
    /// BPF instructions installed, over all filters.
    pub seccomp_instructions: usize,
    /// What could not be applied (only under [`Mode::AllowWeak`]).
    pub weak: Vec<String>,
    /// How long it took.
    pub elapsed: Duration,
}

impl std::fmt::Display for EnterReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sandbox entered in {} µs: landlock ABI {}{}, seccomp {} BPF instructions",
            self.elapsed.as_micros(),
            self.landlock_abi,
            if self.landlock_full {
                ""
            } else {
                " (the kernel lacks rights of newer ABIs)"
            },
            self.seccomp_instructions
        )?;
        if !self.weak.is_empty() {
            write!(f, "; WEAKER THAN THE POLICY: {}", self.weak.join("; "))?;
        }
        Ok(())
    }
}

/// What [`enter`] did in this process, kept for the process to report later (a worker answers
/// the monitor's sandbox query from it: landlock's state is not visible in `/proc`).
#[derive(Debug, Clone)]
pub struct Entered {
    /// The mode `enter` was called with.
    pub mode: Mode,
    /// The role whose policy was applied.
    pub role: crate::policy::Role,
    /// Its report.
    pub report: EnterReport,
}

static ENTERED: OnceLock<Entered> = OnceLock::new();

/// What [`enter`] did in this process (`None`: it was not called, or failed).
pub fn entered() -> Option<&'static Entered> {
    ENTERED.get()
}

/// Whether this process runs in a user namespace of its own (not the initial one).
fn in_own_user_namespace() -> bool {
    match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(m) => {
            let f: Vec<&str> = m.split_whitespace().collect();
            f != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    }
}

/// Confines the calling process by `policy` (see the module documentation). Call it from the
/// main thread before any other thread exists and before reading anything untrusted.
/// `report_fd` is where a seccomp violation is reported (the launcher's [`crate::REPORT_FD`]).
pub fn enter(
    policy: &Policy,
    params: &Params,
    mode: Mode,
    report_fd: Option<RawFd>,
) -> Result<EnterReport> {
    let report = enter_inner(policy, params, mode, report_fd)?;
    let _ = ENTERED.set(Entered {
        mode,
        role: policy.role,
        report: report.clone(),
    });
    Ok(report)
}

fn enter_inner(
    policy: &Policy,
    params: &Params,
    mode: Mode,
    report_fd: Option<RawFd>,
) -> Result<EnterReport> {
    let start = Instant::now();
    let mut report = EnterReport::default();
    if mode == Mode::Off {
        return Ok(report);
    }
    // 1. What is there to work with.
    let features = Features::probe();
    let mut missing = features.missing_for(policy);
    let own_userns = in_own_user_namespace();
    if policy.namespaces != 0 {
        // The launcher made the namespaces; check it did (user namespace probe aside).
        missing.retain(|m| !m.contains("user namespaces"));
        if !own_userns {
            missing.push("the worker was not started in its own user namespace".into());
        }
        // SAFETY: getpid cannot fail.
        if policy.namespaces & libc::CLONE_NEWPID as u64 != 0 && unsafe { libc::getpid() } != 1 {
            missing.push("the worker was not started in its own pid namespace".into());
        }
    }
    if !missing.is_empty() {
        if mode == Mode::On {
            return Err(Error::Weak {
                role: policy.role.name(),
                missing,
            });
        }
        report.weak = missing;
    }
    // 2a. No nested user namespaces (while /proc is still there): the limit is per user
    // namespace, and this one is the worker's own. Seccomp refuses unshare/clone with
    // CLONE_NEWUSER too; this is the layer below it.
    if own_userns {
        if let Err(source) = std::fs::write("/proc/sys/user/max_user_namespaces", "0") {
            let e = Error::Sys {
                what: "setting user.max_user_namespaces to 0",
                source,
            };
            if mode == Mode::On {
                return Err(e);
            }
            report.weak.push(e.to_string());
        }
    }
    // 2. An empty, read-only root.
    if policy.empty_root {
        if own_userns {
            empty_root()?;
        } else {
            report
                .weak
                .push("no empty root (needs the worker's own user namespace)".into());
        }
    }
    // 3.
    set_no_new_privs()?;
    // 4.
    drop_capabilities(own_userns, &mut report)?;
    // 5.
    for l in policy.rlimits(params) {
        let Some(v) = l.value else { continue };
        if l.resource == Resource::Nproc && !own_userns {
            // Outside a user namespace of its own, RLIMIT_NPROC counts every process of the
            // user, not this worker's threads.
            report
                .weak
                .push("RLIMIT_NPROC not set (no user namespace of its own)".into());
            continue;
        }
        let rl = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit reads the struct we pass.
        let rc = unsafe { libc::setrlimit(l.resource.raw(), &rl) };
        check(rc, "setrlimit")?;
    }
    // 6.
    if features.landlock_abi > 0 {
        match policy.filesystem {
            Filesystem::Nothing => {
                report.landlock_full = landlock_nothing()?;
                report.landlock_abi = features.landlock_abi;
            }
            // The monitor's ruleset with no configured path (the probe under the monitor
            // policy): every filesystem right handled, nothing allowed.
            Filesystem::ConfiguredPaths => {
                report.landlock_full = landlock_paths(&[])?;
                report.landlock_abi = features.landlock_abi;
            }
            Filesystem::Unconfined => {}
        }
    }
    // 7.
    if policy.seccomp.is_some() && features.seccomp {
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() };
        let filters = seccomp::compile(policy, pid)?;
        report.seccomp_instructions = filters.iter().map(Vec::len).sum();
        seccomp::install(&filters, report_fd)?;
    }
    report.elapsed = start.elapsed();
    Ok(report)
}

/// What the monitor's landlock ruleset allows beneath one path (see [`confine_monitor`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAccess {
    /// Read this file (or, for a directory, every file beneath it) — kernel, initrd.
    ReadFile,
    /// Read files and list directories beneath (`/proc`).
    ReadTree,
    /// Remove files from this directory (the sockets and pidfile the monitor removes at exit).
    RemoveEntries,
}

/// Confines the monitor itself once its start-up is done (issue 4): `no_new_privs`, the
/// policy's rlimits, a landlock ruleset that handles every filesystem right the kernel knows
/// and allows only `rules` (each an fd on the path it applies beneath: an `O_PATH` directory,
/// or the open kernel file itself), then the monitor's seccomp allowlist (`TRAP`; a violation is
/// reported on stderr, the monitor's log, before the monitor dies by `SIGSYS`). Capabilities
/// are kept: a root monitor signals and inspects workers that run as nobody. Landlock applies
/// to the calling thread only, so this refuses to run with more than one thread.
pub fn confine_monitor(
    rules: &[(std::os::fd::BorrowedFd<'_>, PathAccess)],
    mode: Mode,
) -> Result<EnterReport> {
    let start = Instant::now();
    let policy = &crate::policy::MONITOR;
    let mut report = EnterReport::default();
    if mode == Mode::Off {
        return Ok(report);
    }
    let threads = std::fs::read_dir("/proc/self/task")
        .map_err(|source| Error::Sys {
            what: "read /proc/self/task",
            source,
        })?
        .count();
    if threads != 1 {
        return Err(Error::Invalid(format!(
            "the monitor has {threads} threads when it confines itself (landlock applies to \
             the calling thread only)"
        )));
    }
    let features = Features::probe();
    let missing = features.missing_for(policy);
    if !missing.is_empty() {
        if mode == Mode::On {
            return Err(Error::Weak {
                role: policy.role.name(),
                missing,
            });
        }
        report.weak = missing;
    }
    set_no_new_privs()?;
    for l in policy.rlimits(&Params::default()) {
        let Some(v) = l.value else { continue };
        let rl = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit reads the struct we pass.
        let rc = unsafe { libc::setrlimit(l.resource.raw(), &rl) };
        check(rc, "setrlimit")?;
    }
    if features.landlock_abi > 0 {
        report.landlock_full = landlock_paths(rules)?;
        report.landlock_abi = features.landlock_abi;
    }
    if features.seccomp {
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() };
        let filters = seccomp::compile(policy, pid)?;
        report.seccomp_instructions = filters.iter().map(Vec::len).sum();
        seccomp::install(&filters, None)?;
    }
    report.elapsed = start.elapsed();
    let _ = ENTERED.set(Entered {
        mode,
        role: policy.role,
        report: report.clone(),
    });
    Ok(report)
}

/// The monitor's ruleset: every filesystem right handled, only `rules` allowed. Returns
/// whether the whole ruleset is enforced.
fn landlock_paths(rules: &[(std::os::fd::BorrowedFd<'_>, PathAccess)]) -> Result<bool> {
    use landlock::{
        Access, AccessFs, CompatLevel, Compatible, PathBeneath, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, ABI,
    };
    let err = |e: landlock::RulesetError| Error::Landlock(e.to_string());
    let abi = ABI::V9;
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?;
    for (fd, access) in rules {
        let rights = match access {
            PathAccess::ReadFile => AccessFs::ReadFile.into(),
            PathAccess::ReadTree => AccessFs::ReadFile | AccessFs::ReadDir,
            PathAccess::RemoveEntries => AccessFs::RemoveFile.into(),
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(*fd, rights))
            .map_err(err)?;
    }
    let status = ruleset.restrict_self().map_err(err)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(true),
        RulesetStatus::PartiallyEnforced => Ok(false),
        RulesetStatus::NotEnforced => Err(Error::Landlock("the ruleset is not enforced".into())),
    }
}

fn mount(
    src: Option<&std::ffi::CStr>,
    target: &std::ffi::CStr,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    data: Option<&std::ffi::CStr>,
    what: &'static str,
) -> Result<()> {
    let p = |s: Option<&std::ffi::CStr>| s.map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is NULL or a NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mount(p(src), target.as_ptr(), p(fstype), flags, p(data).cast()) };
    check(rc, what)
}

/// Step 2: pivot into an empty read-only tmpfs.
fn empty_root() -> Result<()> {
    mount(
        None,
        c"/",
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
        "making every mount private",
    )?;
    mount(
        Some(c"bulkhead-empty"),
        c"/proc",
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some(c"size=16k,nr_inodes=8,mode=0555"),
        "mounting the empty root",
    )?;
    // SAFETY: chdir with a NUL-terminated path.
    check(unsafe { libc::chdir(c"/proc".as_ptr()) }, "chdir(new root)")?;
    // pivot_root(".", "."): the new root is the cwd, the old root ends up stacked on it, and
    // detaching "." then removes the old root (man 2 pivot_root).
    // SAFETY: pivot_root with two NUL-terminated paths.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(rc as libc::c_int, "pivot_root")?;
    // SAFETY: umount2 with a NUL-terminated path.
    let rc = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(rc, "detaching the old root")?;
    // SAFETY: chdir with a NUL-terminated path.
    check(unsafe { libc::chdir(c"/".as_ptr()) }, "chdir(/)")?;
    mount(
        None,
        c"/",
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC,
        None,
        "remounting the root read-only",
    )?;
    Ok(())
}

/// `SECBIT_NOROOT | _LOCKED | SECBIT_NO_SETUID_FIXUP | _LOCKED | SECBIT_KEEP_CAPS_LOCKED |
/// SECBIT_NO_CAP_AMBIENT_RAISE | _LOCKED`.
const SECUREBITS: libc::c_ulong = 0b1110_1111;

/// Step 4.
fn drop_capabilities(own_userns: bool, report: &mut EnterReport) -> Result<()> {
    use caps::CapSet;
    let caps_err = |what: &str, e: caps::errors::CapsError| Error::Caps(format!("{what}: {e}"));
    // SAFETY: prctl with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_SECUREBITS, SECUREBITS, 0, 0, 0) };
    let bounding = caps::clear(None, CapSet::Bounding);
    if own_userns {
        check(rc, "prctl(PR_SET_SECUREBITS)")?;
        bounding.map_err(|e| caps_err("clearing the bounding set", e))?;
    } else if rc != 0 || bounding.is_err() {
        // Unprivileged and outside a user namespace of its own: nothing to drop there, and
        // no_new_privs keeps exec from granting anything.
        report
            .weak
            .push("bounding set and securebits left as inherited (no CAP_SETPCAP)".into());
    }
    for set in [
        CapSet::Ambient,
        CapSet::Inheritable,
        CapSet::Effective,
        CapSet::Permitted,
    ] {
        caps::clear(None, set).map_err(|e| caps_err("clearing a capability set", e))?;
    }
    Ok(())
}

/// Step 6: returns whether the whole ruleset is enforced.
fn landlock_nothing() -> Result<bool> {
    use landlock::{
        Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetStatus,
        Scope, ABI,
    };
    let err = |e: landlock::RulesetError| Error::Landlock(e.to_string());
    // The newest ABI this crate knows; the crate drops what the kernel lacks (best effort) and
    // the policy's minimum ABI was checked before.
    let abi = ABI::V9;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .handle_access(AccessNet::from_all(abi))
        .map_err(err)?
        .scope(Scope::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(true),
        RulesetStatus::PartiallyEnforced => Ok(false),
        RulesetStatus::NotEnforced => Err(Error::Landlock("the ruleset is not enforced".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        for m in [Mode::On, Mode::Off, Mode::AllowWeak] {
            assert_eq!(Mode::from_name(m.name()), Some(m));
        }
        assert_eq!(Mode::from_name("yes"), None);
    }

    #[test]
    fn off_does_nothing() {
        let r = enter(&crate::policy::VCPU, &Params::default(), Mode::Off, None).expect("off");
        assert!(r.weak.is_empty());
        assert_eq!(r.seccomp_instructions, 0);
        // Recorded for the worker's report (the first call in a process wins).
        let e = entered().expect("recorded");
        assert_eq!(e.report.landlock_abi, 0);
    }

    #[test]
    fn on_refuses_outside_the_namespaces_without_changing_anything() {
        // The test process runs in the initial namespaces.
        let e = enter(&crate::policy::VCPU, &Params::default(), Mode::On, None)
            .expect_err("must refuse");
        let text = e.to_string();
        assert!(text.contains("own user namespace"), "{text}");
        assert!(text.contains("--sandbox allow-weak"), "{text}");
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        assert!(status.contains("Seccomp:\t0"), "{status}");
    }
}
