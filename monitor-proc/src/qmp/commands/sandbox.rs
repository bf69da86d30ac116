//! `x-query-sandbox` (a Bulkhead extension, named as QAPI names experimental commands): every
//! process of the VM — the monitor itself, then each running worker — with its confinement as
//! the live process shows it.
//!
//! Where each field comes from:
//! - from `/proc` ([`crate::inspect`]): `pid`, `ns-pid` (`NSpid`), `namespaces`
//!   (`/proc/PID/ns/*`; `differs-from-monitor` compares each id with the monitor's own), `uid`
//!   and `gid` (effective ids from `Uid:`/`Gid:` as the monitor sees them; `inside` mapped
//!   through the process's `uid_map`/`gid_map`, also listed), `groups`, `capabilities`
//!   (`CapInh`/`CapPrm`/`CapEff`/`CapBnd`/`CapAmb`), `no-new-privs`, `seccomp` `mode` and
//!   `filters` (`Seccomp`, `Seccomp_filters`), `rlimits` (`/proc/PID/limits`);
//! - from the role's policy: `role` (the monitor's own record of what it started) and
//!   `seccomp.instructions` (the BPF size of the role's allowlist compiled as the process
//!   compiled it; present only when `/proc` shows a filter);
//! - reported by the process itself, since `/proc` does not show landlock: `landlock` (`abi`,
//!   `status`, `weaknesses`, `enter-us`), with `source` saying who reported it
//!   (`worker-reported`: the worker's answer over ipc, `monitor-recorded`: the monitor's own
//!   record of its own confinement).

use std::sync::OnceLock;

use bulkhead_sandbox::Role;
use serde_json::{Map, Value};

use super::{Command, Context, HandlerFuture, Outcome};
use crate::inspect::{self, Ids, ProcView};
use crate::qmp::protocol::QmpError;
use crate::qmp::qdict;
use crate::vm::WorkerSandbox;
use crate::worker;

pub(super) static COMMANDS: &[Command] = &[Command {
    name: "x-query-sandbox",
    args: &[],
    handler: x_query_sandbox,
}];

/// The monitor's own landlock state, recorded when it confines itself (`None`: it did not).
#[derive(Debug, Clone, Default)]
pub struct OwnLandlock {
    /// ABI of the ruleset (0: none).
    pub abi: i32,
    /// Every right of the ruleset is enforced.
    pub full: bool,
}

static OWN_LANDLOCK: OnceLock<OwnLandlock> = OnceLock::new();

/// Records the monitor's own landlock state for `x-query-sandbox` (once).
pub fn record_own_landlock(l: OwnLandlock) {
    let _ = OWN_LANDLOCK.set(l);
}

/// BPF instructions of `role`'s allowlist (all filters), compiled once.
fn policy_instructions(role: Role) -> Option<u64> {
    static SIZES: OnceLock<Vec<(Role, u64)>> = OnceLock::new();
    let sizes = SIZES.get_or_init(|| {
        Role::ALL
            .into_iter()
            .filter_map(|r| {
                let progs = bulkhead_sandbox::seccomp::compile(r.policy(), 1).ok()?;
                let n: usize = progs.iter().map(Vec::len).sum();
                (n > 0).then_some((r, n as u64))
            })
            .collect()
    });
    sizes.iter().find(|(r, _)| *r == role).map(|(_, n)| *n)
}

fn ids(i: &Ids) -> Value {
    let mut m = vec![("outside", Value::from(i.outside))];
    if let Some(inside) = i.inside {
        m.push(("inside", Value::from(inside)));
    }
    let map: Vec<Value> = i
        .map
        .iter()
        .map(|r| {
            qdict::object([
                ("inside", Value::from(r.inside)),
                ("outside", Value::from(r.outside)),
                ("count", Value::from(r.count)),
            ])
        })
        .collect();
    m.push(("map", Value::from(map)));
    qdict::object(m)
}

fn seccomp_mode(mode: u32) -> &'static str {
    match mode {
        0 => "disabled",
        1 => "strict",
        _ => "filter",
    }
}

/// The landlock part of a process's entry.
struct Landlock {
    source: &'static str,
    abi: i32,
    status: &'static str,
    weaknesses: Vec<String>,
    enter_us: Option<u64>,
}

impl Landlock {
    fn to_value(&self) -> Value {
        let mut m = vec![
            ("source", Value::from(self.source)),
            ("abi", Value::from(self.abi)),
            ("status", Value::from(self.status)),
        ];
        if !self.weaknesses.is_empty() {
            m.push(("weaknesses", Value::from(self.weaknesses.clone())));
        }
        if let Some(us) = self.enter_us {
            m.push(("enter-us", Value::from(us)));
        }
        qdict::object(m)
    }
}

fn landlock_status(abi: i32, full: bool) -> &'static str {
    match (abi, full) {
        (0, _) => "not-enforced",
        (_, true) => "fully-enforced",
        (_, false) => "partially-enforced",
    }
}

fn worker_landlock(w: &WorkerSandbox) -> Landlock {
    match &w.report {
        Ok(r) => Landlock {
            source: "worker-reported",
            abi: r.landlock_abi,
            status: if r.entered {
                landlock_status(r.landlock_abi, r.landlock_full)
            } else {
                "not-enforced"
            },
            weaknesses: r.weak.clone(),
            enter_us: r.entered.then_some(r.enter_micros),
        },
        Err(_) => Landlock {
            source: "worker-reported",
            abi: 0,
            status: "unknown",
            weaknesses: Vec::new(),
            enter_us: None,
        },
    }
}

fn own_landlock() -> Landlock {
    let own = OWN_LANDLOCK.get().cloned().unwrap_or_default();
    Landlock {
        source: "monitor-recorded",
        abi: own.abi,
        status: landlock_status(own.abi, own.full),
        weaknesses: Vec::new(),
        enter_us: None,
    }
}

/// The role name `x-query-sandbox` gives the launcher process.
pub const LAUNCHER_ROLE: &str = "launcher";

fn launcher_landlock() -> Landlock {
    Landlock {
        source: "monitor-recorded",
        abi: 0,
        status: "not-enforced",
        weaknesses: vec![
            "the launcher starts the workers, which would inherit its landlock domain and \
             seccomp filter: it has neither (see docs/SECURITY.md)"
                .to_string(),
        ],
        enter_us: None,
    }
}

/// One process's entry (`policy`: whose seccomp allowlist it runs under, if any).
fn process(
    role: &str,
    policy: Option<Role>,
    v: &ProcView,
    monitor: &ProcView,
    landlock: &Landlock,
) -> Value {
    let namespaces: Vec<Value> = v
        .namespaces
        .iter()
        .map(|n| {
            let differs = monitor
                .namespaces
                .iter()
                .find(|m| m.kind == n.kind)
                .is_none_or(|m| m.inode != n.inode);
            qdict::object([
                ("type", Value::from(n.kind.as_str())),
                ("id", Value::from(n.inode)),
                ("differs-from-monitor", Value::from(differs)),
            ])
        })
        .collect();
    let [inh, prm, eff, bnd, amb] = v.caps;
    let caps = qdict::object([
        ("inheritable", Value::from(inh)),
        ("permitted", Value::from(prm)),
        ("effective", Value::from(eff)),
        ("bounding", Value::from(bnd)),
        ("ambient", Value::from(amb)),
    ]);
    let mut seccomp = vec![
        ("mode", Value::from(seccomp_mode(v.seccomp_mode))),
        ("filters", Value::from(v.seccomp_filters)),
    ];
    if v.seccomp_mode == 2 {
        if let Some(n) = policy.and_then(policy_instructions) {
            seccomp.push(("instructions", Value::from(n)));
        }
    }
    let rlimits: Vec<Value> = v
        .limits
        .iter()
        .map(|l| {
            let mut m = vec![("name", Value::from(l.name.as_str()))];
            if let Some(s) = l.soft {
                m.push(("soft", Value::from(s)));
            }
            if let Some(h) = l.hard {
                m.push(("hard", Value::from(h)));
            }
            if !l.units.is_empty() {
                m.push(("units", Value::from(l.units.as_str())));
            }
            qdict::object(m)
        })
        .collect();
    qdict::object([
        ("role", Value::from(role)),
        ("pid", Value::from(v.pid)),
        ("ns-pid", Value::from(v.ns_pid)),
        ("namespaces", Value::from(namespaces)),
        ("uid", ids(&v.uid)),
        ("gid", ids(&v.gid)),
        ("groups", Value::from(v.groups.clone())),
        ("capabilities", caps),
        ("no-new-privs", Value::from(v.no_new_privs)),
        ("seccomp", qdict::object(seccomp)),
        ("landlock", landlock.to_value()),
        ("rlimits", Value::from(rlimits)),
    ])
}

fn x_query_sandbox(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let workers = ctx.shared.vm.sandbox().await?;
        let me = std::process::id();
        let monitor = inspect::read_process(me)
            .map_err(|e| QmpError::generic(format!("cannot inspect the monitor: {e}")))?;
        let mut list = vec![process(
            Role::Monitor.name(),
            Some(Role::Monitor),
            &monitor,
            &monitor,
            &own_landlock(),
        )];
        // The launcher (when the sandbox is on): it never confines itself (its workers would
        // inherit its filter and landlock domain), and reads /proc/PID/ns for the monitor,
        // which its landlock domain keeps from those links of other processes.
        if let Some(pid) = worker::launcher_pid() {
            match inspect::read_process_with(pid, worker::launcher_namespaces(pid)) {
                Ok(v) => list.push(process(
                    LAUNCHER_ROLE,
                    None,
                    &v,
                    &monitor,
                    &launcher_landlock(),
                )),
                Err(e) => log::debug!("x-query-sandbox: launcher (pid {pid}): {e}"),
            }
        }
        for w in &workers {
            let ns = worker::launcher_pid().and_then(|_| worker::launcher_namespaces(w.pid));
            match inspect::read_process_with(w.pid, ns) {
                Ok(v) => list.push(process(
                    w.role.name(),
                    Some(w.role),
                    &v,
                    &monitor,
                    &worker_landlock(w),
                )),
                // It exited between the VM actor's answer and now: it is not a process any
                // more, and the VM actor is about to report its death.
                Err(e) => log::debug!("x-query-sandbox: {} (pid {}): {e}", w.role.name(), w.pid),
            }
        }
        let mode = ctx.shared.info.sandbox.map_or("off", |m| m.name());
        Ok(Outcome::value(qdict::object([
            ("mode", Value::from(mode)),
            ("processes", Value::from(list)),
        ])))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landlock_states_and_policy_sizes() {
        assert_eq!(landlock_status(0, true), "not-enforced");
        assert_eq!(landlock_status(2, true), "fully-enforced");
        assert_eq!(landlock_status(2, false), "partially-enforced");
        assert!(policy_instructions(Role::Vcpu).is_some_and(|n| n > 100));
        assert_eq!(seccomp_mode(2), "filter");
    }

    #[tokio::test]
    async fn the_monitor_lists_itself_from_proc() {
        let (vm, ctx) = Context::for_tests();
        tokio::spawn(vm.run());
        let v = x_query_sandbox(ctx, Map::new()).await.expect("ok").value;
        let procs = v["processes"].as_array().expect("list");
        assert_eq!(procs.len(), 1, "{v}");
        let me = &procs[0];
        assert_eq!(me["role"], "monitor");
        assert_eq!(me["pid"], std::process::id());
        assert!(me["namespaces"]
            .as_array()
            .expect("ns")
            .iter()
            .all(|n| n["differs-from-monitor"] == false));
        assert_eq!(me["landlock"]["source"], "monitor-recorded");
        assert!(me["rlimits"].as_array().is_some_and(|l| l.len() > 10));
    }
}
