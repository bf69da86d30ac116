//! The sandbox report a worker answers the monitor's `QuerySandbox` with (`x-query-sandbox`).

use bulkhead_ipc::messages::SandboxReport;

/// What this process's [`bulkhead_sandbox::enter`] did (recorded by `enter` itself), as the ipc
/// message. Not entered (a worker answers only after `enter`, so only a stand-in would): mode
/// `off`, nothing applied.
pub fn sandbox_report() -> SandboxReport {
    match bulkhead_sandbox::enter::entered() {
        Some(e) => SandboxReport {
            entered: true,
            mode: e.mode.name().to_string(),
            landlock_abi: e.report.landlock_abi,
            landlock_full: e.report.landlock_full,
            seccomp_instructions: e.report.seccomp_instructions as u64,
            weak: e.report.weak.clone(),
            enter_micros: u64::try_from(e.report.elapsed.as_micros()).unwrap_or(u64::MAX),
        },
        None => SandboxReport {
            entered: false,
            mode: "off".into(),
            landlock_abi: 0,
            landlock_full: false,
            seccomp_instructions: 0,
            weak: Vec::new(),
            enter_micros: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_entered() {
        let r = sandbox_report();
        assert!(!r.entered);
        assert_eq!(r.mode, "off");
        assert_eq!((r.seccomp_instructions, r.enter_micros), (0, 0));
    }
}
