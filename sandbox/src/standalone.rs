//! The policy of a worker that runs on its own, without the monitor's launcher
//! (`bulkhead-blockd --socket ...`, `bulkhead-netd --socket ...`, as `qemu-storage-daemon` runs).
//!
//! Launched by the monitor, a worker gets its role's policy as is: the launcher puts it in fresh
//! namespaces and `enter` pivots it into an empty root. Standalone, nobody did that, so the
//! policy is the role's minus the launcher's part (no namespaces checked, no empty root), plus
//! the one system call a server that accepts its own front end needs: `accept4` for the one
//! connection (the monitor would hand over a connected socket instead; `shutdown`, with which
//! `vhost-user-backend` closes it, is in the roles' lists). `enter` then still applies
//! `no_new_privs`, every capability dropped (the bounding set too when run as root), the
//! rlimits, landlock with no filesystem access, and the seccomp allowlist.

use crate::enter::{EnterReport, Mode};
use crate::policy::{Allowed, Params, Policy, Role, Rule};

/// The test-only attack hook (`--attack ...`) a standalone worker may have been started with.
#[cfg(feature = "attack-hook")]
pub use crate::attack::Hook as AttackHook;

/// Without the test-only feature `attack-hook` there is no hook: an empty type keeps
/// [`enter`]'s signature the same in both builds.
#[cfg(not(feature = "attack-hook"))]
#[derive(Debug)]
pub enum AttackHook {}

/// Calls a standalone server needs on top of its role's allowlist.
pub static STANDALONE_EXTRA: &[Allowed] = &[Allowed {
    name: "accept4",
    nr: libc::SYS_accept4,
    rule: Rule::Any,
}];

/// The policy a standalone worker of `role` enters (see the module docs). Built once per
/// process: the filter compiler wants `'static` lists, so the combined list is leaked.
pub fn policy(role: Role) -> Policy {
    let base = role.policy();
    let lists: Vec<&'static [Allowed]> = base
        .seccomp
        .into_iter()
        .flatten()
        .copied()
        .chain([STANDALONE_EXTRA])
        .collect();
    Policy {
        namespaces: 0,
        empty_root: false,
        seccomp: Some(Box::leak(lists.into_boxed_slice())),
        ..*base
    }
}

/// The limits' parameters of a standalone back end: guest memory up to `max_guest_mem` bytes is
/// mapped (twice while the front end replaces its memory table, so doubled).
pub fn params(max_guest_mem: u64) -> Params {
    Params {
        mem_bytes: max_guest_mem.saturating_mul(2),
        ..Params::default()
    }
}

/// Enters the standalone policy of `role` with the limits for `max_guest_mem` bytes of guest
/// memory. With the test-only attack `hook`, the policy is weakened as the hook asks (to show
/// what stops an attempt below seccomp) and violations are reported on [`crate::REPORT_FD`].
pub fn enter(
    role: Role,
    max_guest_mem: u64,
    mode: Mode,
    hook: Option<&AttackHook>,
) -> crate::Result<EnterReport> {
    enter_with_queues(role, max_guest_mem, 1, mode, hook)
}

/// [`enter`] for a back end serving `queues` virtqueues (netd: two per queue pair, one worker
/// thread each pair, which `RLIMIT_NPROC` counts).
pub fn enter_with_queues(
    role: Role,
    max_guest_mem: u64,
    queues: u32,
    mode: Mode,
    hook: Option<&AttackHook>,
) -> crate::Result<EnterReport> {
    #[allow(unused_mut)]
    let mut policy = policy(role);
    #[allow(unused_mut)]
    let mut report_fd = None;
    if let Some(h) = hook {
        #[cfg(feature = "attack-hook")]
        {
            policy = h.weaken(policy);
            report_fd = Some(crate::REPORT_FD);
        }
        #[cfg(not(feature = "attack-hook"))]
        match *h {}
    }
    let params = Params {
        queues: queues.max(1),
        ..params(max_guest_mem)
    };
    crate::enter::enter(&policy, &params, mode, report_fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(role: Role, must: &[i64], must_not: &[i64]) {
        let p = policy(role);
        let base = role.policy();
        assert_eq!(p.namespaces, 0);
        assert!(!p.empty_root);
        assert_eq!(p.filesystem, base.filesystem);
        assert_eq!(p.syscall_count(), base.syscall_count() + 1);
        let has = |nr| p.allowed().any(|a| a.nr == nr);
        assert!(
            has(libc::SYS_accept4) && has(libc::SYS_shutdown),
            "{role:?}"
        );
        for &nr in must {
            assert!(has(nr), "{role:?}: {nr} not allowed");
        }
        for &nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
        ]
        .iter()
        .chain(must_not)
        {
            assert!(!has(nr), "{role:?}: {nr} allowed");
        }
    }

    #[test]
    fn standalone_policies_are_the_role_plus_accept4() {
        check(Role::Blockd, &[libc::SYS_pread64], &[]);
        check(
            Role::Netd,
            &[libc::SYS_writev, libc::SYS_ioctl],
            &[libc::SYS_pwrite64, libc::SYS_readv],
        );
    }
}
