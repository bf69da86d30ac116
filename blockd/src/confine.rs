//! The sandbox of a standalone `bulkhead-blockd`.
//!
//! Launched by the monitor (later), blockd gets the blockd role's policy as is: the launcher puts
//! it in fresh namespaces and `enter` pivots it into an empty root. Standalone, nobody did that,
//! so the policy is the role's minus the launcher's part (no namespaces, no empty root), plus the
//! one system call a server that accepts its own front end needs: `accept4` for the one
//! connection (the monitor would hand over a connected socket instead). What `enter` then still
//! applies: `no_new_privs`, every capability dropped (the bounding set too when run as root),
//! the rlimits (`RLIMIT_NPROC` only in a user namespace of its own), landlock with no filesystem
//! access at all, and the seccomp allowlist (no `open`/`openat`, no `socket`, no `execve`).

use bulkhead_sandbox::policy::{Allowed, Params, Policy, Role, Rule};

/// Calls a standalone server needs on top of the role's allowlist (see the module docs).
pub static STANDALONE_EXTRA: &[Allowed] = &[Allowed {
    name: "accept4",
    nr: libc::SYS_accept4,
    rule: Rule::Any,
}];

/// The policy standalone blockd enters (see the module docs).
pub fn standalone_policy() -> Policy {
    let role = Role::Blockd.policy();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_policy_is_the_role_plus_accept4() {
        let p = standalone_policy();
        let role = Role::Blockd.policy();
        assert_eq!(p.namespaces, 0);
        assert!(!p.empty_root);
        assert_eq!(p.filesystem, role.filesystem);
        assert_eq!(p.syscall_count(), role.syscall_count() + 1);
        let has = |nr| p.allowed().any(|a| a.nr == nr);
        assert!(has(libc::SYS_accept4) && has(libc::SYS_shutdown) && has(libc::SYS_pread64));
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
        ] {
            assert!(!has(nr), "{nr} allowed");
        }
    }
}
