//! End-to-end test harness for Bulkhead.
//!
//! `/dev/kvm` on the development machine is PVM, which cannot boot an unmodified Linux, so the
//! whole-VMM tests run Bulkhead *inside* an L1 VM: QEMU under TCG with `-cpu max` exposes SVM,
//! and the L1 Debian kernel's kvm_amd provides a standard `/dev/kvm` there. Bulkhead then boots
//! an L2 Debian kernel with a test initramfs whose `/init` prints markers on the console.
//!
//! * [`kit`] builds (once, cached, flock-guarded) kernels and initramfs images from Debian
//!   packages, and the per-run overlay with Bulkhead's binaries.
//! * [`nested`] boots L1 and gives tests an agent (`sh` in L1), a stream of Bulkhead's output
//!   (the L2 console) and a forwarded QMP port.
//! * [`qmp`] is a small synchronous QMP client.
//! * [`dhcp`] configures the far side's busybox `udhcpd` in the network tests and checks leases.
//! * [`cpio`] writes newc archives; [`console`] captures serial output line by line.
//!
//! Tests that cannot run (no qemu-system-x86_64, kvm_amd does not load, Bulkhead binaries not
//! built) **fail** with a loud message; nothing is skipped silently.
//!
//! Environment:
//! * `BULKHEAD_BIN_DIR`: where the Bulkhead binaries are (default `<workspace>/target/release`,
//!   or `$CARGO_TARGET_DIR/release`); build them with `cargo build --release --bins`.
//! * `BULKHEAD_TEST_TIMEOUT_SCALE`: multiplies harness timeouts (slow machines).

pub mod console;
pub mod cpio;
pub mod dhcp;
pub mod kit;
pub mod nested;
pub mod qmp;
pub mod tcg_frontend;
pub mod util;

pub use console::{ConsoleLog, Mark};
pub use kit::GuestKit;
pub use nested::{L1Process, NestedOpts, NestedVm};
pub use qmp::{Qmp, QmpError};

/// Kernel command line for the L2 guest in test mode `mode` (`idle`, `poweroff`, `reboot`).
///
/// `quiet` keeps kernel messages from interleaving with the markers. Extra arguments can be
/// added with `BULKHEAD_TEST_L2_APPEND` (e.g. `earlyprintk=ttyS0` while debugging).
pub fn l2_append(mode: &str) -> String {
    let mut s = format!("console=ttyS0 quiet bulkhead.test={mode}");
    if let Ok(extra) = std::env::var("BULKHEAD_TEST_L2_APPEND") {
        if !extra.trim().is_empty() {
            s.push(' ');
            s.push_str(extra.trim());
        }
    }
    s
}

/// The arguments both VMMs take to boot the test L2 guest with `cpus` vCPUs in `mode`: 256 MiB,
/// the kit's kernel and initrd, the console on stdout, QMP on TCP port 4444 in L1 (forwarded to
/// [`NestedVm::qmp_port`]).
fn l2_guest_args(cpus: u32, mode: &str) -> Vec<String> {
    [
        "-m",
        "256",
        "-smp",
        &cpus.to_string(),
        "-kernel",
        kit::L2_BZIMAGE,
        "-initrd",
        kit::L2_INITRD,
        "-append",
        &l2_append(mode),
        "-serial",
        "stdio",
        "-qmp",
        "tcp:0.0.0.0:4444,server=on,wait=off",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// Bulkhead arguments for booting the test L2 guest (see [`l2_guest_args`]); `extra` is
/// appended (e.g. `-no-reboot`, `-S`).
pub fn bulkhead_l2_args(cpus: u32, mode: &str, extra: &[&str]) -> Vec<String> {
    let mut v = l2_guest_args(cpus, mode);
    v.push("-nographic".to_owned());
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

/// The reference peer: QEMU with KVM inside L1 (`/usr/bin/qemu-system-x86_64`, copied in with
/// [`NestedOpts::with_host_qemu`]) booting the same L2 guest (see [`l2_guest_args`]). The whole
/// argv, program first.
pub fn qemu_l2_argv(cpus: u32, mode: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        "/usr/bin/qemu-system-x86_64",
        "-enable-kvm",
        "-cpu",
        "host",
        "-M",
        "q35",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.extend(l2_guest_args(cpus, mode));
    v
}

/// Time allowed for an L2 guest to print its first marker after Bulkhead starts (before
/// scaling). QEMU/KVM inside L1 needs about 10 s on a 2-core TCG host.
pub const L2_BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// Boots an L1 VM with Bulkhead's binaries for the test `label`.
pub fn boot_l1_for_bulkhead(label: &str) -> anyhow::Result<NestedVm> {
    NestedVm::boot(NestedOpts::new(label))
}

/// Starts Bulkhead in `vm` booting the test L2 guest (see [`bulkhead_l2_args`]).
pub fn spawn_l2_guest<'vm>(
    vm: &'vm NestedVm,
    cpus: u32,
    mode: &str,
    extra: &[&str],
) -> anyhow::Result<L1Process<'vm>> {
    let args = bulkhead_l2_args(cpus, mode, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    vm.spawn_bulkhead(&args)
}

/// Prints a timing and appends it to `<workspace>/target/nested-runs/timings.jsonl`, so runs
/// can be compared over time.
pub fn record_timing(name: &str, seconds: f64) {
    println!("TIMING {name}: {seconds:.2}s");
    let dir = util::workspace_root().join("target/nested-runs");
    let line = serde_json::json!({
        "name": name,
        "seconds": seconds,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("timings.jsonl"))
    {
        use std::io::Write;
        let _ = writeln!(f, "{line}");
    }
}

/// Parses a `BULKHEAD-TICK <n> <uptime>` line (anywhere in `line`) into `(n, uptime seconds)`.
pub fn parse_tick(line: &str) -> Option<(u64, f64)> {
    let rest = &line[line.find("BULKHEAD-TICK ")? + "BULKHEAD-TICK ".len()..];
    let mut it = rest.split_whitespace();
    let n = it.next()?.parse().ok()?;
    let up = it.next()?.parse().ok()?;
    Some((n, up))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parse_tick_lines() {
        assert_eq!(super::parse_tick("BULKHEAD-TICK 3 12.50"), Some((3, 12.5)));
        assert_eq!(
            super::parse_tick("junk BULKHEAD-TICK 0 1.00 x"),
            Some((0, 1.0))
        );
        assert_eq!(super::parse_tick("BULKHEAD-TICK x"), None);
    }
}
