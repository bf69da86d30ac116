//! The virtio-net control virtqueue under a real Linux guest (L2): vcpu-proc serves it (never
//! netd), the monitor reports what the guest's driver programs. The set-up is `nested_net.rs`'s
//! (the monitor opens tap `bhtap0` in L1, whose own stack is the peer with a busybox `httpd`).
//!
//! The guest (kit mode `bulkhead.test=netctrl`) brings eth0 up, pings the peer and fetches a
//! blob (the data path works with the control queue negotiated); its driver programs the rx
//! filter when eth0 opens (promiscuous off, the multicast groups the kernel joined), which must
//! bring `NIC_RX_FILTER_CHANGED` and show in `query-rx-filter`. Then, one step at a time (the
//! test makes `http://peer:8080/go-<step>` exist): `ip link set eth0 promisc on`
//! (`promiscuous: true`), `ip link set eth0 address 02:00:00:00:00:77` (`main-mac`, HMP `info
//! network`, and a ping from the new address). Each change brings one event, after the query
//! that re-armed it.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::kit::NET_CTRL_MAC;
use bulkhead_tests::qmp::Qmp;
use bulkhead_tests::{boot_l1_for_bulkhead, spawn_l2_guest, L1Process, NestedVm, L2_BOOT_TIMEOUT};
use serde_json::{json, Value};

const DONE_TIMEOUT: Duration = Duration::from_secs(240);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
const MAC: &str = "52:54:00:12:34:99";
const PATH: &str = "/machine/peripheral/nic0/virtio-backend";

/// nic0's filter as `query-rx-filter` reports it (which re-arms its event).
fn filter(qmp: &mut Qmp) -> Result<Value> {
    let r = qmp.execute("query-rx-filter", Some(json!({"name": "nic0"})))?;
    println!("query-rx-filter: {r}");
    r.get(0).cloned().context("query-rx-filter returned no NIC")
}

/// Waits for nic0's `NIC_RX_FILTER_CHANGED` and checks its data.
fn changed(qmp: &mut Qmp) -> Result<()> {
    let ev = qmp.wait_event("NIC_RX_FILTER_CHANGED", STEP_TIMEOUT)?;
    ensure!(
        ev["data"] == json!({"name": "nic0", "path": PATH}),
        "event data: {ev}"
    );
    Ok(())
}

/// Drops the events so far, re-arms nic0's event, and starts guest step `step`.
fn step(vm: &NestedVm, qmp: &mut Qmp, step: &str) -> Result<()> {
    qmp.collect_events(Duration::from_secs(2))?;
    filter(qmp)?;
    vm.sh_ok(
        &format!("touch /tmp/www/go-{step}"),
        Duration::from_secs(30),
    )?;
    Ok(())
}

#[test]
fn linux_guest_programs_its_rx_filter_through_the_control_queue() -> Result<()> {
    let vm = boot_l1_for_bulkhead("net-ctrl")?;
    let md5 = vm.far_side_blob(1)?;
    let nic = format!("virtio-net-pci,netdev=n0,id=nic0,mac={MAC}");
    let bh = spawn_l2_guest(
        &vm,
        1,
        "netctrl",
        &[
            "-S",
            "-netdev",
            "tap,id=n0,ifname=bhtap0,script=no,downscript=no",
            "-device",
            &nic,
        ],
    )?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    vm.sh_ok(
        "ip addr add 10.77.0.1/24 dev bhtap0 && ip link set bhtap0 up && \
         httpd -p 10.77.0.1:8080 -h /tmp/www",
        Duration::from_secs(30),
    )?;
    // Before the guest runs: the reset state (promiscuous, every VLAN).
    let f = filter(&mut qmp)?;
    ensure!(
        f["promiscuous"] == true && f["vlan"] == "all" && f["main-mac"] == MAC,
        "{f}"
    );
    qmp.execute("cont", None)?;

    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-NET-DONE", DONE_TIMEOUT)?;
    let fails = |bh: &L1Process<'_>| -> Vec<String> { bh.lines_with("BULKHEAD-NET-FAIL") };
    ensure!(fails(&bh).is_empty(), "the guest failed: {:?}", fails(&bh));
    ensure!(bh.marker("BULKHEAD-NET-MAC")? == MAC, "MAC mismatch");
    bh.wait_for_console("BULKHEAD-NET-PING-OK", Duration::from_secs(10))?;
    ensure!(bh.marker("BULKHEAD-NET-MD5")? == md5, "wrong blob");

    // eth0's open programmed the filter: not promiscuous, the kernel's multicast groups
    // (IPv4 all-hosts at least), VLAN filtering on with no VLAN (CTRL_VLAN negotiated).
    changed(&mut qmp)?;
    let f = filter(&mut qmp)?;
    ensure!(f["promiscuous"] == false, "{f}");
    ensure!(f["main-mac"] == MAC, "{f}");
    let multi = f["multicast-table"].as_array().context("table")?;
    ensure!(
        multi.iter().any(|m| m == "01:00:5e:00:00:01"),
        "no IPv4 all-hosts group: {f}"
    );
    ensure!(f["vlan"] == "none", "{f}");

    // promisc on.
    step(&vm, &mut qmp, "promisc")?;
    bh.wait_for_console("BULKHEAD-NET-PROMISC-ON", STEP_TIMEOUT)?;
    changed(&mut qmp)?;
    let f = filter(&mut qmp)?;
    ensure!(f["promiscuous"] == true, "{f}");

    // A new MAC: the filter, `info network` and the data path all follow.
    step(&vm, &mut qmp, "mac")?;
    ensure!(
        bh.marker("BULKHEAD-NET-MAC-SET")? == NET_CTRL_MAC,
        "the guest's MAC"
    );
    changed(&mut qmp)?;
    let f = filter(&mut qmp)?;
    ensure!(f["main-mac"] == NET_CTRL_MAC, "{f}");
    let info = qmp.execute(
        "human-monitor-command",
        Some(json!({"command-line": "info network"})),
    )?;
    ensure!(
        info.as_str()
            .unwrap_or_default()
            .contains(&format!("macaddr={NET_CTRL_MAC}")),
        "info network: {info}"
    );
    bh.wait_for_console("BULKHEAD-NET-PING2-OK", STEP_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-NET-CTRL-DONE", STEP_TIMEOUT)?;
    ensure!(fails(&bh).is_empty(), "the guest failed: {:?}", fails(&bh));
    // vcpu-proc served the control queue: netd never saw it (it offers no CTRL_VQ).
    let refused: Vec<String> = bh.lines_with("malformed control-queue");
    ensure!(
        refused.is_empty(),
        "control-queue chains refused: {refused:?}"
    );

    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    ensure!(
        vm.pidof("bulkhead-netd")?.is_empty(),
        "netd outlived the monitor"
    );
    Ok(())
}
