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
//!
//! The policy itself is [`bulkhead_sandbox::standalone`], shared with standalone netd.

use bulkhead_sandbox::policy::{Params, Policy, Role};

/// The policy standalone blockd enters (see the module docs).
pub fn standalone_policy() -> Policy {
    bulkhead_sandbox::standalone::policy(Role::Blockd)
}

/// The limits' parameters for up to `max_guest_mem` bytes of guest memory.
pub fn params(max_guest_mem: u64) -> Params {
    bulkhead_sandbox::standalone::params(max_guest_mem)
}
