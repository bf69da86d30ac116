//! The sandbox of a standalone `bulkhead-netd`.
//!
//! Launched by the monitor (later), netd gets the netd role's policy as is: the launcher puts it
//! in fresh namespaces (an empty network namespace among them) and `enter` pivots it into an
//! empty root. Standalone, nobody did that, so:
//!
//! * netd first moves itself into a **new, empty network namespace** ([`leave_host_network`]):
//!   `unshare(CLONE_NEWNET)` when it may (root), else `unshare(CLONE_NEWUSER | CLONE_NEWNET)`.
//!   The tap fd and the bound vhost-user socket keep working (they are already open); a socket it
//!   could create afterwards would see only a down loopback. This is the one namespace standalone
//!   netd makes itself: the others need a launcher (a new pid namespace applies to children only,
//!   and pivoting into an empty root needs a mount namespace prepared for it).
//! * then it enters the netd role's policy minus the launcher's part (no namespaces checked, no
//!   empty root), plus the one system call a server that accepts its own front end needs:
//!   `accept4` for the one connection (the monitor would hand over a connected socket instead;
//!   `shutdown`, with which `vhost-user-backend` closes it, is in the role's list). `enter`
//!   then applies `no_new_privs`, drops every capability (the bounding set too), the rlimits
//!   (`RLIMIT_FSIZE` 0: netd writes no file), landlock with no filesystem access, and the seccomp
//!   allowlist: no `open`/`openat` (so never `/dev/net/tun` again), no `socket`, no `execve`, and
//!   `ioctl` only for `TUNSETOFFLOAD` and `TUNSETVNETHDRSZ`.
//!
//! blockd's standalone mode (blockd/src/confine.rs) builds its policy the same way; the
//! "role policy + accept4, no namespaces" helper is a candidate for the sandbox crate.

use bulkhead_sandbox::policy::{Allowed, Params, Policy, Role, Rule};

/// Calls a standalone server needs on top of the role's allowlist (see the module docs).
pub static STANDALONE_EXTRA: &[Allowed] = &[Allowed {
    name: "accept4",
    nr: libc::SYS_accept4,
    rule: Rule::Any,
}];

/// The policy standalone netd enters (see the module docs).
pub fn standalone_policy() -> Policy {
    let role = Role::Netd.policy();
    let lists: Vec<&'static [Allowed]> = role
        .seccomp
        .into_iter()
        .flatten()
        .copied()
        .chain([STANDALONE_EXTRA])
        .collect();
    Policy {
        namespaces: 0,
        empty_root: false,
        // Built once per process; the filter compiler wants 'static lists.
        seccomp: Some(Box::leak(lists.into_boxed_slice())),
        ..*role
    }
}

/// The limits' parameters: guest memory up to `max_guest_mem` bytes is mapped (twice while the
/// front end replaces its memory table, so doubled).
pub fn params(max_guest_mem: u64) -> Params {
    Params {
        mem_bytes: max_guest_mem.saturating_mul(2),
        vcpus: 1,
    }
}

/// Moves the process into a new, empty network namespace (see the module docs); returns how.
pub fn leave_host_network() -> std::io::Result<&'static str> {
    // SAFETY: unshare with namespace flags only affects this process's namespaces; called
    // before any thread is started, as CLONE_NEWUSER requires.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return Ok("new network namespace");
    }
    // SAFETY: as above.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } == 0 {
        return Ok("new user and network namespaces");
    }
    Err(std::io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_policy_is_the_role_plus_accept4() {
        let p = standalone_policy();
        let role = Role::Netd.policy();
        assert_eq!(p.namespaces, 0);
        assert!(!p.empty_root);
        assert_eq!(p.filesystem, role.filesystem);
        assert_eq!(p.syscall_count(), role.syscall_count() + 1);
        let has = |nr| p.allowed().any(|a| a.nr == nr);
        assert!(has(libc::SYS_accept4) && has(libc::SYS_shutdown) && has(libc::SYS_writev));
        assert!(has(libc::SYS_ioctl));
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_pwrite64,
            libc::SYS_readv,
        ] {
            assert!(!has(nr), "{nr} allowed");
        }
    }
}
