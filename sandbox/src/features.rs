//! What the running kernel offers for confinement, probed without side effects, so the monitor
//! can say at start what a policy would lack (and refuse unless `--sandbox allow-weak`).

use crate::policy::Policy;

/// `LANDLOCK_CREATE_RULESET_VERSION`.
const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;

/// The landlock ABI version the kernel offers (0: landlock not built in or not enabled in
/// `CONFIG_LSM`/`lsm=`).
pub fn landlock_abi() -> i32 {
    // SAFETY: landlock_create_ruleset(NULL, 0, VERSION) only returns a number.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    i32::try_from(rc).unwrap_or(0).max(0)
}

/// Whether seccomp filters with `SECCOMP_RET_TRAP` are available.
pub fn seccomp_trap_available() -> bool {
    let action: u32 = libc::SECCOMP_RET_TRAP;
    // SAFETY: seccomp(SECCOMP_GET_ACTION_AVAIL, 0, &action) reads one u32 we own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    rc == 0
}

fn read_num(path: &str) -> Option<i64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Why this process cannot create user namespaces, if the usual switches say so (the launch
/// itself is the final word: `clone3` fails with `EPERM` or `ENOSPC`).
pub fn user_namespaces_blocked() -> Option<String> {
    if read_num("/proc/sys/user/max_user_namespaces") == Some(0) {
        return Some("user namespaces are disabled (user.max_user_namespaces = 0)".into());
    }
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && read_num("/proc/sys/kernel/unprivileged_userns_clone") == Some(0) {
        return Some(
            "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)"
                .into(),
        );
    }
    if !root && read_num("/proc/sys/kernel/apparmor_restrict_unprivileged_userns") == Some(1) {
        return Some(
            "AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns = 1)"
                .into(),
        );
    }
    None
}

/// What the kernel offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    /// Landlock ABI (0: none).
    pub landlock_abi: i32,
    /// seccomp filters with TRAP.
    pub seccomp: bool,
    /// Why user namespaces are unavailable, if they are.
    pub userns_blocked: Option<String>,
}

impl Features {
    /// Probes the running kernel.
    pub fn probe() -> Features {
        Features {
            landlock_abi: landlock_abi(),
            seccomp: seccomp_trap_available(),
            userns_blocked: user_namespaces_blocked(),
        }
    }

    /// What `policy` would lack on this kernel (empty: nothing).
    pub fn missing_for(&self, policy: &Policy) -> Vec<String> {
        let mut out = Vec::new();
        if policy.namespaces & libc::CLONE_NEWUSER as u64 != 0 {
            if let Some(why) = &self.userns_blocked {
                out.push(why.clone());
            }
        }
        if self.landlock_abi < policy.min_landlock_abi {
            out.push(if self.landlock_abi == 0 {
                "landlock is not available (not built in, or missing from CONFIG_LSM / lsm=)"
                    .to_string()
            } else {
                format!(
                    "landlock ABI {} is older than the {} the {} policy needs",
                    self.landlock_abi,
                    policy.min_landlock_abi,
                    policy.role.name()
                )
            });
        }
        if policy.seccomp.is_some() && !self.seccomp {
            out.push("seccomp filters (SECCOMP_RET_TRAP) are not available".into());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Role, VCPU};

    #[test]
    fn this_host_offers_everything_the_workers_need() {
        // The development hosts and CI run Linux 6.18 with landlock ABI 7 and user namespaces.
        let f = Features::probe();
        assert!(f.landlock_abi >= 1, "{f:?}");
        assert!(f.seccomp, "{f:?}");
        for r in [Role::Vcpu, Role::Blockd, Role::Netd] {
            assert_eq!(f.missing_for(r.policy()), Vec::<String>::new(), "{r:?}");
        }
    }

    #[test]
    fn a_poorer_kernel_is_described() {
        let f = Features {
            landlock_abi: 0,
            seccomp: false,
            userns_blocked: Some("user namespaces are disabled".into()),
        };
        let m = f.missing_for(&VCPU);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(m[1].contains("landlock is not available"));
    }
}
