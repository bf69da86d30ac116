//! virtio-net multiqueue under a real Linux guest (L2): a 2-vCPU guest on
//! `-netdev tap,ifname=bhtap0,queues=2` + `virtio-net-pci,mq=on,vectors=6`. The monitor opens
//! the tap's two queues (`IFF_MULTI_QUEUE`) and hands both to one `bulkhead-netd`, which serves a
//! queue pair on each; vcpu-proc offers `VIRTIO_NET_F_MQ` with two pairs and the guest's driver
//! enables both itself (`VQ_PAIRS_SET` over the control queue). The set-up is `nested_net.rs`'s
//! (L1's own stack is the peer, with a busybox `httpd`).
//!
//! The guest (kit mode `bulkhead.test=netmq`) pings the peer and fetches a blob, reports its
//! queues in use, runs parallel fetches and prints its per-queue interrupt counts: both receive
//! queues must have interrupted (frames came in on both tap queues), and netd's per-pair
//! counters (logged when it quits) must show frames both ways on both pairs.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::{boot_l1_for_bulkhead, spawn_l2_guest, L1Process, L2_BOOT_TIMEOUT};
use serde_json::json;

const DONE_TIMEOUT: Duration = Duration::from_secs(240);
const MQ_TIMEOUT: Duration = Duration::from_secs(240);
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
const MAC: &str = "52:54:00:12:34:99";

/// The summed interrupt count of the `/proc/interrupts` line naming `vector` (e.g.
/// `virtio1-input.1`) among the guest's `BULKHEAD-NET-IRQ` lines.
fn irq_count(lines: &[String], vector: &str) -> Option<u64> {
    let line = lines.iter().find(|l| {
        l.split_whitespace()
            .any(|w| w.starts_with("virtio") && w.ends_with(vector))
    })?;
    let after = &line[line.find("BULKHEAD-NET-IRQ")? + "BULKHEAD-NET-IRQ".len()..];
    // "<irq>: <count per CPU>... <chip> ... <name>": the counts are the numbers after the colon.
    let counts = after.split_once(':')?.1;
    Some(
        counts
            .split_whitespace()
            .map_while(|w| w.parse::<u64>().ok())
            .sum(),
    )
}

/// netd's per-pair counter `key` (e.g. `pair1_rx`) from its last counters line.
fn pair_counter(lines: &[String], key: &str) -> Option<u64> {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.contains("pair0_rx=") && l.contains("tx_frames="))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.trim_end_matches([',', ';']).parse().ok())
}

#[test]
fn linux_guest_uses_both_queue_pairs_of_a_multiqueue_tap() -> Result<()> {
    let vm = boot_l1_for_bulkhead("net-mq")?;
    let md5 = vm.far_side_blob(2)?;
    let nic = format!("virtio-net-pci,netdev=n0,id=nic0,mac={MAC},mq=on,vectors=6");
    let bh = spawn_l2_guest(
        &vm,
        2,
        "netmq",
        &[
            "-S",
            "-netdev",
            "tap,id=n0,ifname=bhtap0,queues=2,script=no,downscript=no",
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
    // The monitor made the tap a multiqueue one.
    let flags = vm.sh_ok(
        "cat /sys/class/net/bhtap0/tun_flags",
        Duration::from_secs(10),
    )?;
    let flags =
        u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).context("tun_flags")?;
    ensure!(
        flags & 0x0100 != 0,
        "bhtap0 is not IFF_MULTI_QUEUE: {flags:#x}"
    );
    let info = qmp.execute(
        "human-monitor-command",
        Some(json!({"command-line": "info network"})),
    )?;
    let info = info.as_str().unwrap_or_default().to_owned();
    println!("info network:\n{info}");
    ensure!(
        info.contains("nic0: index=1,type=nic,")
            && info.contains(" \\ n0: index=1,type=tap,ifname=bhtap0,script=no,downscript=no"),
        "info network: {info}"
    );
    qmp.execute("cont", None)?;

    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-NET-DONE", DONE_TIMEOUT)?;
    let fails = |bh: &L1Process<'_>| -> Vec<String> { bh.lines_with("BULKHEAD-NET-FAIL") };
    ensure!(fails(&bh).is_empty(), "the guest failed: {:?}", fails(&bh));
    ensure!(bh.marker("BULKHEAD-NET-MAC")? == MAC, "MAC mismatch");
    bh.wait_for_console("BULKHEAD-NET-PING-OK", Duration::from_secs(10))?;
    ensure!(bh.marker("BULKHEAD-NET-MD5")? == md5, "wrong blob");
    let queues = bh.marker("BULKHEAD-NET-QUEUES")?;
    ensure!(
        queues == "2 2",
        "the guest's driver uses {queues} rx/tx queues, not 2 2"
    );
    bh.wait_for_console("BULKHEAD-NET-MQ-DONE", MQ_TIMEOUT)?;
    ensure!(fails(&bh).is_empty(), "the guest failed: {:?}", fails(&bh));
    let lines = bh.output_lines();
    let irqs: Vec<String> = lines
        .iter()
        .filter(|l| l.contains("BULKHEAD-NET-IRQ"))
        .cloned()
        .collect();
    println!("{}", irqs.join("\n"));
    for v in ["input.0", "input.1", "output.0", "output.1"] {
        println!("{v}: {:?}", irq_count(&irqs, v));
    }
    for v in ["input.0", "input.1"] {
        let n = irq_count(&irqs, v).with_context(|| format!("no {v} vector: {irqs:?}"))?;
        ensure!(n > 0, "receive queue {v} never interrupted: {irqs:?}");
    }

    qmp.execute("quit", None)?;
    bh.wait_exit(Duration::from_secs(60))?;
    ensure!(
        vm.pidof("bulkhead-netd")?.is_empty(),
        "netd outlived the monitor"
    );
    // netd's counters per pair: frames both ways on both pairs.
    let lines = bh.output_lines();
    for key in ["pair0_rx", "pair0_tx", "pair1_rx", "pair1_tx"] {
        let n = pair_counter(&lines, key).with_context(|| {
            let netd: Vec<&String> = lines.iter().filter(|l| l.contains("netd")).collect();
            format!("no {key} in netd's log: {netd:?}")
        })?;
        println!("netd {key}={n}");
        ensure!(n > 0, "netd {key} is 0");
    }
    Ok(())
}
