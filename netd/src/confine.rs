//! The sandbox of a standalone `bulkhead-netd`.
//!
//! Launched by the monitor (worker mode, [`crate::worker`]), netd gets the netd role's policy as
//! is: the launcher puts it in fresh namespaces (an empty network namespace among them) and
//! `enter` pivots it into an empty root. Standalone, nobody did that, so:
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
//! The policy and its entry are [`bulkhead_sandbox::standalone`], shared with standalone blockd;
//! this module holds the one step only netd takes, [`leave_host_network`].

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
