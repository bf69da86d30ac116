//! A real Linux guest (L2) talks to a peer in L1 through Bulkhead's NIC: vcpu-proc's virtio-pci
//! transport is the vhost-user front end, a sandboxed `bulkhead-netd` the back end, and the
//! guest's own virtio_pci + virtio_net drivers move the frames. The tap is opened by the
//! monitor itself (`-netdev tap,ifname=bhtap0,script=no,downscript=no`, `tun` loaded in L1).
//!
//! Its far side is a network namespace of the test's own inside L1: the tap is moved into it
//! (after the monitor opened it and before the guest runs; the tap's fd, which netd holds, does
//! not care which namespace the device is in), and it holds the peer address, a busybox `udhcpd`
//! (pool, /24, the peer as router: [`bulkhead_tests::dhcp`]; lease file under `/tmp/dhcp`) and
//! a busybox `httpd` serving a blob of random bytes. L1's tools are the kit's busybox, whose `ip`
//! has no `netns` subcommand, so the test does what `ip netns add`/`exec` do with busybox
//! applets: `unshare --net=/run/netns/bhpeer` (a namespace kept by a bind mount, as iproute2
//! keeps it), `ip link set bhtap0 netns <pid of a process in it>` and `nsenter --net=...`. L1's
//! own stack keeps neither the tap nor the peer address (checked), and L1 is a VM of the test's
//! own besides (user-mode networking for its QMP port only): no traffic leaves it.
//!
//! The guest (kit mode `bulkhead.test=netloop`) gets eth0's address by DHCP (busybox `udhcpc`):
//! it must be from the pool, on eth0 with the pool's /24, and the server's lease file
//! (`dumpleases`) must bind it to the guest's MAC. The guest pings the router it was given,
//! fetches the blob from it (its md5 must be the blob's), then fetches it again every second.
//! `set_link` down makes the fetches fail (and the guest sees no carrier), up makes them work
//! again.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bulkhead_tests::dhcp::{self, GuestMarkers};
use bulkhead_tests::kit::NET_PEER_ADDR;
use bulkhead_tests::util::shell_quote;
use bulkhead_tests::{boot_l1_for_bulkhead, spawn_l2_guest, L2_BOOT_TIMEOUT};
use serde_json::json;

const DONE_TIMEOUT: Duration = Duration::from_secs(240);
/// Upper bound for a fetch loop to show a change (each fetch is cut at 10 s in the guest).
const FETCH_TIMEOUT: Duration = Duration::from_secs(120);
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
const MAC: &str = "52:54:00:12:34:99";
/// The far side's network namespace in L1 (a bind-mounted namespace file, as `ip netns` keeps
/// them).
const NETNS: &str = "/run/netns/bhpeer";
/// The DHCP server's directory in L1: config, lease file, pid file, log.
const DHCP_DIR: &str = "/tmp/dhcp";

/// L1 shell: moves `bhtap0` into a fresh network namespace [`NETNS`] and starts the far side
/// there: the peer address, udhcpd (config `@CONF@`) and httpd. Then checks that L1's own stack
/// has neither the tap nor the address.
const FAR_SIDE: &str = r#"set -e
ns=@NETNS@
d=@DHCP@
mkdir -p /run/netns "$d"
touch "$ns"
unshare --net="$ns" true
# busybox ip moves a link to a namespace by pid: a process that entered it, just long enough.
rm -f /run/bhpeer.holder
nsenter --net="$ns" sh -c 'echo $$ > /run/bhpeer.holder; exec sleep 60' </dev/null >/dev/null 2>&1 &
n=0
while [ ! -s /run/bhpeer.holder ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -s /run/bhpeer.holder ] || { echo "no process entered $ns in 10 s"; exit 1; }
holder=$(cat /run/bhpeer.holder)
ip link set bhtap0 netns "$holder"
kill "$holder"
nsenter --net="$ns" ip link set lo up
nsenter --net="$ns" ip addr add @PEER@/24 dev bhtap0
nsenter --net="$ns" ip link set bhtap0 up
printf '%s' @CONF@ > "$d/udhcpd.conf"
: > "$d/udhcpd.leases"
nsenter --net="$ns" udhcpd -f "$d/udhcpd.conf" </dev/null >"$d/udhcpd.log" 2>&1 &
nsenter --net="$ns" httpd -p @PEER@:8080 -h /tmp/www
n=0
while [ ! -s "$d/udhcpd.pid" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
[ -s "$d/udhcpd.pid" ] || { echo "udhcpd did not start:"; cat "$d/udhcpd.log"; exit 1; }
if ip link show bhtap0 >/dev/null 2>&1; then echo "bhtap0 is still in L1's namespace"; exit 1; fi
if ip -4 addr | grep -q '@PEER@/'; then echo "L1's namespace has @PEER@"; exit 1; fi
echo "far side: $(nsenter --net="$ns" ip -o -4 addr show dev bhtap0 | awk '{print $2, $4}')"
"#;

/// L1 shell: has udhcpd write its lease file (`SIGUSR1`) until `dumpleases` names `@MAC@`
/// (10 s at most), then prints the leases.
const LEASES: &str = r#"d=@DHCP@
n=0
while [ $n -lt 50 ]; do
    kill -USR1 "$(cat "$d/udhcpd.pid")"
    sleep 0.2
    if dumpleases -f "$d/udhcpd.leases" | grep -qi '@MAC@'; then break; fi
    n=$((n + 1))
done
dumpleases -f "$d/udhcpd.leases"
"#;

#[test]
fn linux_guest_pings_fetches_and_follows_set_link_through_netd() -> Result<()> {
    let vm = boot_l1_for_bulkhead("net-tap")?;
    let md5 = vm.far_side_blob(2)?;
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
    // The monitor opened (created) the tap before the guest runs: move it into the far side's
    // namespace with the peer's address, the DHCP and the HTTP server, then let the guest go.
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    let conf = dhcp::udhcpd_conf(
        "bhtap0",
        &format!("{DHCP_DIR}/udhcpd.leases"),
        &format!("{DHCP_DIR}/udhcpd.pid"),
    );
    let far = vm.sh_ok(
        &FAR_SIDE
            .replace("@NETNS@", NETNS)
            .replace("@DHCP@", DHCP_DIR)
            .replace("@PEER@", NET_PEER_ADDR)
            .replace("@CONF@", &shell_quote(&conf)),
        Duration::from_secs(30),
    )?;
    println!("{}", far.trim());
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
    let fails: Vec<String> = bh.lines_with("BULKHEAD-NET-FAIL");
    ensure!(fails.is_empty(), "the guest reported failures: {fails:?}");
    ensure!(bh.marker("BULKHEAD-NET-MAC")? == MAC, "MAC mismatch");
    ensure!(bh.marker("BULKHEAD-NET-CARRIER")? == "1", "no carrier");
    // The address came from the server's pool, and the server leased it to the guest's MAC.
    let guest_dhcp = GuestMarkers {
        dhcp: bh.marker("BULKHEAD-NET-DHCP")?,
        router: bh.marker("BULKHEAD-NET-ROUTER")?,
        addr: bh.marker("BULKHEAD-NET-ADDR")?,
    };
    let leases = vm.sh_ok(
        &LEASES.replace("@DHCP@", DHCP_DIR).replace("@MAC@", MAC),
        Duration::from_secs(30),
    )?;
    let udhcpd_log = vm.sh_ok(
        &format!("cat {DHCP_DIR}/udhcpd.log"),
        Duration::from_secs(10),
    )?;
    let leased = dhcp::check_guest(&guest_dhcp, &leases, MAC)
        .with_context(|| format!("udhcpd log:\n{udhcpd_log}"))?;
    ensure!(
        udhcpd_log.contains(&format!("sending ACK to {leased}")),
        "udhcpd did not log its ACK of {leased}: {udhcpd_log}"
    );
    println!("DHCP: {leased} leased to {MAC}");
    bh.wait_for_console("BULKHEAD-NET-PING-OK", Duration::from_secs(10))?;
    ensure!(
        bh.marker("BULKHEAD-NET-MD5")? == md5,
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
