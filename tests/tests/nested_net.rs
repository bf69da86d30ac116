//! A real Linux guest (L2) talks to a peer in L1 through Bulkhead's NIC: vcpu-proc's virtio-pci
//! transport is the vhost-user front end, a sandboxed `bulkhead-netd` the back end, and the
//! guest's own virtio_pci + virtio_net drivers move the frames. The tap is opened by the
//! monitor itself (`-netdev tap,ifname=bhtap0,script=no,downscript=no`, `tun` loaded in L1);
//! its far side is L1's own stack, with the peer address and a busybox `httpd` serving a blob of
//! random bytes. L1 is a VM of the test's own: no traffic leaves it.
//!
//! The guest (kit mode `bulkhead.test=netloop`) gives eth0 a static address, pings the peer,
//! fetches the blob (its md5 must be the blob's), then fetches it again every second. `set_link`
//! down makes the fetches fail (and the guest sees no carrier), up makes them work again.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::{boot_l1_for_bulkhead, spawn_l2_guest, L1Process, L2_BOOT_TIMEOUT};
use serde_json::json;

const DONE_TIMEOUT: Duration = Duration::from_secs(240);
/// Upper bound for a fetch loop to show a change (each fetch is cut at 10 s in the guest).
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
const MAC: &str = "52:54:00:12:34:99";

/// The value of the first `KEY=value` console line.
fn marker(bh: &L1Process<'_>, key: &str) -> Result<String> {
    let line = bh.wait_for_console(&format!("{key}="), Duration::from_secs(30))?;
    let at = line.find(&format!("{key}=")).context("marker")?;
    Ok(line[at + key.len() + 1..].trim().to_owned())
}

#[test]
fn linux_guest_pings_fetches_and_follows_set_link_through_netd() -> Result<()> {
    let vm = boot_l1_for_bulkhead("net-tap")?;
    let md5 = vm
        .sh_ok(
            "modprobe tun && mkdir -p /tmp/www && \
             dd if=/dev/urandom of=/tmp/www/blob bs=1M count=2 2>/dev/null && \
             md5sum /tmp/www/blob | cut -d' ' -f1",
            Duration::from_secs(60),
        )?
        .trim()
        .to_owned();
    let nic = format!("virtio-net-pci,netdev=n0,id=nic0,mac={MAC}");
    let bh = spawn_l2_guest(
        &vm,
        1,
        "netloop",
        &[
            "-S",
            "-netdev",
            "tap,id=n0,ifname=bhtap0,script=no,downscript=no",
            "-device",
            &nic,
        ],
    )?;
    // The monitor opened (created) the tap before the guest runs: give it the peer's address
    // and start the HTTP server, then let the guest go.
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    vm.sh_ok(
        "ip addr add 10.77.0.1/24 dev bhtap0 && ip link set bhtap0 up && \
         httpd -p 10.77.0.1:8080 -h /tmp/www",
        Duration::from_secs(30),
    )?;
    let info = qmp.execute(
        "human-monitor-command",
        Some(json!({"command-line": "info network"})),
    )?;
    println!("info network: {info}");
    ensure!(
        info.as_str().unwrap_or_default()
            == format!(
                "nic0: index=0,type=nic,model=virtio-net-pci,macaddr={MAC}\r\n \\ n0: \
                 index=0,type=tap,ifname=bhtap0,script=no,downscript=no\r\n"
            ),
        "info network: {info}"
    );
    let netd = vm.pidof("bulkhead-netd")?;
    ensure!(netd.len() == 1, "netds in L1: {netd:?}");
    qmp.execute("cont", None)?;

    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-NET-DONE", DONE_TIMEOUT)?;
    let fails: Vec<String> = bh
        .output_lines()
        .into_iter()
        .filter(|l| l.contains("BULKHEAD-NET-FAIL"))
        .collect();
    ensure!(fails.is_empty(), "the guest reported failures: {fails:?}");
    ensure!(marker(&bh, "BULKHEAD-NET-MAC")? == MAC, "MAC mismatch");
    ensure!(marker(&bh, "BULKHEAD-NET-CARRIER")? == "1", "no carrier");
    bh.wait_for_console("BULKHEAD-NET-PING-OK", Duration::from_secs(10))?;
    ensure!(
        marker(&bh, "BULKHEAD-NET-MD5")? == md5,
        "the guest fetched something other than the blob"
    );
    let ok = format!("OK {md5} carrier=1");
    let (_, line) = bh.wait_for_console_from(bh.start_mark(), &ok, FETCH_TIMEOUT)?;
    println!("before set_link: {line}");

    // Link down: the guest sees no carrier and its fetches fail.
    qmp.execute("set_link", Some(json!({"name": "nic0", "up": false})))?;
    let (_, line) = bh.wait_for_console_from(bh.mark(), "FAIL carrier=0", FETCH_TIMEOUT)?;
    println!("link down: {line}");
    // Up again (by the netdev's name, which takes its NIC along): fetches work again.
    qmp.execute("set_link", Some(json!({"name": "n0", "up": true})))?;
    let (_, line) = bh.wait_for_console_from(bh.mark(), &ok, FETCH_TIMEOUT)?;
    println!("link up: {line}");

    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    ensure!(
        vm.pidof("bulkhead-netd")?.is_empty(),
        "netd outlived the monitor"
    );
    Ok(())
}
