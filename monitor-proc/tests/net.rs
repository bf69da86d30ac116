//! NICs: `-netdev tap` + `-device virtio-net-pci` start one sandboxed `bulkhead-netd` per NIC
//! (the real binary, launched by the monitor's launcher next to the fake machine worker, which
//! keeps each device's vhost-user socket and logs the devices, link changes and unplugs it is
//! given); `info network` and `query-rx-filter` describe them; `set_link` reaches vcpu-proc and
//! netd (netd's own counters must report the state); a netd that dies is reported and the VM
//! keeps running; `netdev_add` takes a tap passed with `getfd`; `device_add`/`device_del` work
//! before the guest first runs and are refused afterwards.
//!
//! The taps are made by the test itself (`/dev/net/tun`, not persistent: they vanish with their
//! last fd; nothing is ever sent on them). Needs root for that (CI is root) and
//! `bulkhead-netd` built next to `bulkhead` (`cargo build -p bulkhead-netd-proc`); the tests
//! fail, naming what is missing, otherwise.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);

/// Links the real `bulkhead-netd` into the fake worker directory.
fn link_netd(s: &Scratch) -> String {
    let exe = Path::new(BULKHEAD)
        .parent()
        .expect("target dir")
        .join("bulkhead-netd");
    assert!(
        exe.exists(),
        "{} is missing: build it first (cargo build -p bulkhead-netd-proc)",
        exe.display()
    );
    let wd = fake_worker_dir(s);
    std::os::unix::fs::symlink(&exe, Path::new(&wd).join("bulkhead-netd")).expect("symlink");
    wd
}

/// A fresh, non-persistent tap opened as the monitor wants it (`IFF_TAP|IFF_NO_PI|
/// IFF_VNET_HDR`).
fn tap(name: &str) -> OwnedFd {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the NIC tests need root to make taps; CI runs as root"
    );
    bulkhead_monitor::nics::open_tap(name, false).unwrap_or_else(|e| panic!("tap {name}: {e}"))
}

fn log_has(s: &Scratch, text: &str) -> String {
    let deadline = Instant::now() + T;
    loop {
        let log = std::fs::read_to_string(s.path("worker.log")).unwrap_or_default();
        if log.contains(text) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "worker.log never said {text:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u64, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
        .to_string()
}

fn netds(q: &mut Qmp) -> Vec<Value> {
    let v = q.cmd("x-query-sandbox");
    v["return"]["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["role"] == "netd")
        .cloned()
        .collect()
}

/// The fake guest (as `common::fake_guest`) with inherited fds.
fn start(s: &Scratch, extra: &[&str], fds: &[(i32, i32)]) -> (Monitor, Qmp) {
    start_with(s, "", extra, fds)
}

/// [`start`] with more `fake.*` words for the fake machine worker.
fn start_with(s: &Scratch, words: &str, extra: &[&str], fds: &[(i32, i32)]) -> (Monitor, Qmp) {
    let wd = link_netd(s);
    let sock = s.s("qmp.sock");
    let kernel = s.path("vmlinux");
    std::fs::write(&kernel, b"\x7fELF fake kernel").expect("kernel");
    let spec = format!("unix:{sock},server=on,wait=off");
    let append = format!("fake.log={} {words}", s.s("worker.log"));
    let kernel = kernel.to_str().expect("utf8").to_string();
    let mut args = vec![
        "-kernel",
        kernel.as_str(),
        "-m",
        "64M",
        "--worker-dir",
        wd.as_str(),
        "-append",
        append.as_str(),
        "-qmp",
        spec.as_str(),
    ];
    args.extend_from_slice(extra);
    let m = Monitor::start_with_fds(s, &args, fds);
    wait_for_socket(&sock, T);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    (m, q)
}

fn hmp(q: &mut Qmp, line: &str) -> String {
    let r = q.raw(&format!(
        r#"{{"execute": "human-monitor-command", "arguments": {{"command-line": "{line}"}}}}"#
    ));
    r["return"].as_str().expect("text").to_string()
}

fn exec(q: &mut Qmp, name: &str, args: Value) -> Value {
    q.raw(&json!({"execute": name, "arguments": args}).to_string())
}

fn stderr_has(m: &Monitor, text: &str) -> String {
    m.wait_stderr(text, T)
}

#[test]
fn nics_get_a_sandboxed_netd_each_and_the_queries_describe_them() {
    let s = Scratch::new("net-nics");
    let a = tap(&format!("bhna{}", std::process::id() % 100_000));
    let b = tap(&format!("bhnb{}", std::process::id() % 100_000));
    let (mut m, mut q) = start(
        &s,
        &[
            "-netdev",
            "tap,id=n0,fd=10",
            "-device",
            "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:aa:bb:01,addr=4",
            "-netdev",
            "tap,id=n1,fd=11",
            "-device",
            "virtio-net-pci,netdev=n1",
        ],
        &[(a.as_raw_fd(), 10), (b.as_raw_fd(), 11)],
    );
    drop((a, b));
    // The machine worker got both NICs, each with a vhost-user socket.
    let log = log_has(&s, "device virtio-net-pci.1");
    assert!(
        log.contains(
            "device nic0 Net { mac: [82, 84, 0, 170, 187, 1], link_up: true } slot 4 queues 2 size 256"
        ),
        "{log}"
    );
    assert!(
        log.contains(
            "device virtio-net-pci.1 Net { mac: [82, 84, 0, 18, 52, 86], link_up: true } slot 1 queues 2 size 256"
        ),
        "{log}"
    );

    // Two netds, confined: own namespaces, pid 1 inside, seccomp, no_new_privs, no
    // capabilities, landlock reported by netd itself.
    let procs = netds(&mut q);
    assert_eq!(procs.len(), 2, "{procs:?}");
    for p in &procs {
        assert_eq!(p["ns-pid"], 1, "{p}");
        assert_eq!(p["seccomp"]["mode"], "filter", "{p}");
        assert_eq!(p["no-new-privs"], true, "{p}");
        assert_eq!(p["landlock"]["source"], "worker-reported", "{p}");
        let pid = p["pid"].as_u64().expect("pid");
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        // Its own, empty network namespace.
        let own = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns");
        let mine = std::fs::read_link("/proc/self/ns/net").expect("ns");
        assert_ne!(own, mine, "netd {pid} is in the host's network namespace");
    }

    // HMP info network: QEMU 7.2's text.
    assert_eq!(
        hmp(&mut q, "info network"),
        "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:aa:bb:01\r\n \\ n0: \
         index=0,type=tap,fd=10\r\nvirtio-net-pci.1: index=0,type=nic,model=virtio-net-pci,\
         macaddr=52:54:00:12:34:56\r\n \\ n1: index=0,type=tap,fd=11\r\n"
    );

    // query-rx-filter: both NICs, in QEMU's shape, then by name, then the errors.
    let r = q.cmd("query-rx-filter");
    let list = r["return"].as_array().expect("list");
    assert_eq!(list.len(), 2, "{r}");
    assert_eq!(
        list[0],
        json!({"name": "nic0", "promiscuous": true, "multicast": "normal", "unicast": "normal",
               "vlan": "all", "broadcast-allowed": false, "multicast-overflow": false,
               "unicast-overflow": false, "main-mac": "52:54:00:aa:bb:01",
               "vlan-table": (0..4096).rev().collect::<Vec<u32>>(),
               "unicast-table": [], "multicast-table": []})
    );
    let r = exec(
        &mut q,
        "query-rx-filter",
        json!({"name": "virtio-net-pci.1"}),
    );
    assert_eq!(r["return"][0]["main-mac"], "52:54:00:12:34:56", "{r}");
    let r = exec(&mut q, "query-rx-filter", json!({"name": "n0"}));
    assert_eq!(error_desc(&r), "net client(n0) isn't a NIC");
    let r = exec(&mut q, "query-rx-filter", json!({"name": "zz"}));
    assert_eq!(error_desc(&r), "invalid net client name: zz");

    // set_link: the guest's bit (vcpu-proc) and netd's frames; netd's counters confirm it.
    let r = exec(&mut q, "set_link", json!({"name": "nic0", "up": false}));
    assert_eq!(r, json!({"return": {}}));
    log_has(&s, "link nic0 down");
    stderr_has(&m, "nic0: link down for the guest; bulkhead-netd");
    stderr_has(&m, "reports link_up=false");
    // By netdev: its NIC follows.
    let r = exec(&mut q, "set_link", json!({"name": "n1", "up": false}));
    assert_eq!(r, json!({"return": {}}));
    log_has(&s, "link virtio-net-pci.1 down");
    let r = exec(&mut q, "set_link", json!({"name": "nic0", "up": true}));
    assert_eq!(r, json!({"return": {}}));
    log_has(&s, "link nic0 up");
    stderr_has(&m, "nic0: link up for the guest; bulkhead-netd");
    let r = exec(&mut q, "set_link", json!({"name": "nope", "up": true}));
    assert_eq!(error_class(&r), "DeviceNotFound");
    assert_eq!(error_desc(&r), "Device 'nope' not found");

    // A netd that dies: X_WORKER_EXITED naming the NIC; the VM keeps running.
    let pid = procs[0]["pid"].as_u64().expect("pid");
    // SAFETY: kill with a pid this test read from the monitor, and a signal number.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let ev = q.event("X_WORKER_EXITED");
    assert_eq!(ev["data"]["role"], "netd", "{ev}");
    assert_eq!(ev["data"]["pid"], pid, "{ev}");
    assert_eq!(ev["data"]["signal"], "SIGKILL", "{ev}");
    assert_eq!(q.status(), "running");
    assert_eq!(netds(&mut q).len(), 1);

    // quit: the other netd goes with the monitor, cleanly.
    let left = netds(&mut q)[0]["pid"].as_u64().expect("pid");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
    assert!(!Path::new(&format!("/proc/{left}")).exists(), "netd left");
}

/// The `NIC_RX_FILTER_CHANGED` events seen so far, for the NIC whose event `name` is `name`
/// (`None`: the NIC without `id=`).
fn rx_events(q: &Qmp, name: Option<&str>) -> usize {
    q.events
        .iter()
        .filter(|e| e["event"] == "NIC_RX_FILTER_CHANGED")
        .filter(|e| e["data"].get("name").and_then(Value::as_str) == name)
        .count()
}

#[test]
fn rx_filter_changes_emit_one_event_until_queried_and_the_query_shows_them() {
    let s = Scratch::new("net-rxfilter");
    let a = tap(&format!("bhra{}", std::process::id() % 100_000));
    let b = tap(&format!("bhrb{}", std::process::id() % 100_000));
    // The fake guest programs each NIC's filter at 1.5 s (two changes) and at 3 s (a reset,
    // which QEMU does not report, then one change).
    let (mut m, mut q) = start_with(
        &s,
        "fake.rx-filter-after=1500",
        &[
            "-netdev",
            "tap,id=n0,fd=10",
            "-device",
            "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:aa:bb:01",
            "-netdev",
            "tap,id=n1,fd=11",
            "-device",
            "virtio-net-pci,netdev=n1",
        ],
        &[(a.as_raw_fd(), 10), (b.as_raw_fd(), 11)],
    );
    drop((a, b));
    // Before any change: the reset state.
    let r = exec(&mut q, "query-rx-filter", json!({"name": "nic0"}));
    assert_eq!(r["return"][0]["promiscuous"], true, "{r}");
    // One event per NIC for the first two changes, as QEMU words it: `name` is the NIC's id
    // (absent without one), `path` its virtio-net device.
    let ev = q.event("NIC_RX_FILTER_CHANGED");
    let ev2 = q.event("NIC_RX_FILTER_CHANGED");
    let mut datas = vec![ev["data"].clone(), ev2["data"].clone()];
    datas.sort_by_key(|d| d.to_string());
    assert_eq!(
        datas,
        vec![
            json!({"name": "nic0", "path": "/machine/peripheral/nic0/virtio-backend"}),
            json!({"path": "/machine/peripheral-anon/device[0]/virtio-backend"}),
        ]
    );
    // The query shows the second change: it was handled before the reply, and it brought no
    // second event.
    let r = exec(&mut q, "query-rx-filter", json!({"name": "nic0"}));
    let f = &r["return"][0];
    assert_eq!(f["promiscuous"], false, "{r}");
    assert_eq!(f["main-mac"], "02:00:00:00:00:99", "{r}");
    assert_eq!(f["multicast-table"], json!(["01:00:5e:00:00:01"]), "{r}");
    assert_eq!(f["broadcast-allowed"], false, "{r}");
    assert_eq!(
        rx_events(&q, Some("nic0")) + rx_events(&q, None),
        0,
        "{:?}",
        q.events
    );
    // The query re-armed nic0 only: the third change brings one event for nic0 and none for
    // the other NIC; the reset before it none at all.
    let ev = q.event("NIC_RX_FILTER_CHANGED");
    assert_eq!(ev["data"]["name"], "nic0", "{ev}");
    // Polling the other NIC re-arms its event: a poll that still saw the old state makes the
    // third change report it once (as QEMU would); one that already saw the change, not.
    let deadline = Instant::now() + T;
    let mut rearmed = false;
    let other = loop {
        let r = exec(
            &mut q,
            "query-rx-filter",
            json!({"name": "virtio-net-pci.1"}),
        );
        if r["return"][0]["broadcast-allowed"] == true {
            break r;
        }
        rearmed = true;
        assert!(
            Instant::now() < deadline,
            "the third change never came: {r}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let f = &other["return"][0];
    assert_eq!(f["promiscuous"], true, "reset: {other}");
    assert_eq!(f["main-mac"], "52:54:00:12:34:56", "reset: {other}");
    assert_eq!(f["multicast-table"], json!([]), "reset: {other}");
    assert_eq!(
        rx_events(&q, None),
        usize::from(rearmed),
        "re-armed by a poll: {rearmed}; {:?}",
        q.events
    );
    assert_eq!(rx_events(&q, Some("nic0")), 0, "{:?}", q.events);
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}

#[test]
fn netdev_add_takes_a_getfd_tap_and_devices_plug_cold_and_hot() {
    let s = Scratch::new("net-qmp");
    let (mut m, mut q) = start(&s, &["-S"], &[]);
    let t = tap(&format!("bhnq{}", std::process::id() % 100_000));
    let r = q.cmd_with_fds(
        r#"{"execute": "getfd", "arguments": {"fdname": "tap0"}}"#,
        &[t.as_raw_fd()],
        FdsOn::Command,
    );
    assert_eq!(r, json!({"return": {}}));
    drop(t);
    let ok = json!({"return": {}});
    assert_eq!(
        exec(
            &mut q,
            "netdev_add",
            json!({"type": "tap", "id": "n0", "fd": "tap0"})
        ),
        ok
    );
    // Errors, each naming what is wrong.
    let e = |q: &mut Qmp, name: &str, args: Value| error_desc(&exec(q, name, args)).to_string();
    // The netdev consumed the name.
    assert_eq!(
        e(
            &mut q,
            "netdev_add",
            json!({"type": "tap", "id": "n1", "fd": "tap0"})
        ),
        "File descriptor named 'tap0' has not been found"
    );
    let t = tap(&format!("bhnr{}", std::process::id() % 100_000));
    let r = q.cmd_with_fds(
        r#"{"execute": "getfd", "arguments": {"fdname": "tap1"}}"#,
        &[t.as_raw_fd()],
        FdsOn::Command,
    );
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(
        e(
            &mut q,
            "netdev_add",
            json!({"type": "tap", "id": "n0", "fd": "tap1"})
        ),
        "Duplicate ID 'n0'"
    );
    assert_eq!(
        e(
            &mut q,
            "netdev_add",
            json!({"type": "tap", "id": "n1", "fd": "3"})
        ),
        "fd=3: bulkhead takes a tap by the name it was given with 'getfd', not by fd number"
    );
    assert!(e(
        &mut q,
        "netdev_add",
        json!({"type": "tap", "id": "n1", "fd": "x", "vhost": true})
    )
    .contains("vhost=on"));
    assert!(e(&mut q, "netdev_add", json!({"type": "user", "id": "n1"}))
        .contains("network backend 'user' is not supported"));
    assert!(e(
        &mut q,
        "netdev_add",
        json!({"type": "tap", "id": "n1", "ifname": "bhx0", "script": "no", "downscript": "no"})
    )
    .contains("cannot open /dev/net/tun once it has confined itself"));
    // queues= is no longer refused as unsupported (multiqueue taps with ifname=); with fd= it
    // gets QEMU 7.2's text (net_init_tap, checked against qemu-system-x86_64 7.2).
    assert_eq!(
        e(
            &mut q,
            "netdev_add",
            json!({"type": "tap", "id": "n1", "fd": "x", "queues": 2})
        ),
        "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= are \
         invalid with fd="
    );
    assert!(e(&mut q, "device_add", json!({"driver": "e1000"})).contains("'e1000'"));
    assert_eq!(
        e(
            &mut q,
            "device_add",
            json!({"driver": "virtio-net-pci", "netdev": "zz"})
        ),
        "Property 'virtio-net-pci.netdev' can't find value 'zz'"
    );

    // Cold-plug before the first cont: a netd starts, the machine worker gets the device.
    let add = json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "nic0"});
    assert_eq!(exec(&mut q, "device_add", add.clone()), ok);
    log_has(&s, "device nic0 Net { mac: [82, 84, 0, 18, 52, 86], link_up: true } slot 1 queues 2 size 256 (added)");
    assert_eq!(netds(&mut q).len(), 1);
    assert_eq!(
        e(
            &mut q,
            "device_add",
            json!({"driver": "virtio-net-pci", "netdev": "n0"})
        ),
        "Property 'virtio-net-device.netdev' can't take value 'n0', it's in use"
    );
    // set_link reaches the new netd.
    assert_eq!(
        exec(&mut q, "set_link", json!({"name": "nic0", "up": false})),
        ok
    );
    stderr_has(&m, "reports link_up=false");
    log_has(&s, "link nic0 down");
    // Unplug (by QOM path, as QEMU resolves device_del's id), plug again.
    assert_eq!(
        exec(
            &mut q,
            "device_del",
            json!({"id": "/machine/peripheral/nic0"})
        ),
        ok
    );
    log_has(&s, "device nic0 removed");
    assert_eq!(netds(&mut q).len(), 0);
    // QEMU 7.2's two events: the virtio back end, then the device with its id.
    assert_eq!(
        q.event("DEVICE_DELETED")["data"],
        json!({"path": "/machine/peripheral/nic0/virtio-backend"})
    );
    assert_eq!(
        q.event("DEVICE_DELETED")["data"],
        json!({"device": "nic0", "path": "/machine/peripheral/nic0"})
    );
    assert_eq!(exec(&mut q, "device_add", add.clone()), ok);
    assert_eq!(netds(&mut q).len(), 1);
    assert!(hmp(&mut q, "info network").starts_with("nic0: index=0,type=nic"));

    // Once the guest has run: ACPI hot-plug. device_del asks the guest, which ejects 200 ms
    // later (the fake); a second device_del meanwhile gets QEMU's error; then the NIC and its
    // netd go, the netdev stays free for a new NIC (hot-plugged).
    assert_eq!(q.cmd("cont"), ok);
    assert_eq!(exec(&mut q, "device_del", json!({"id": "nic0"})), ok);
    assert_eq!(
        e(&mut q, "device_del", json!({"id": "nic0"})),
        "Device nic0 is already in the process of unplug"
    );
    log_has(&s, "device nic0 eject requested");
    assert_eq!(
        q.event("DEVICE_DELETED")["data"],
        json!({"path": "/machine/peripheral/nic0/virtio-backend"})
    );
    assert_eq!(
        q.event("DEVICE_DELETED")["data"],
        json!({"device": "nic0", "path": "/machine/peripheral/nic0"})
    );
    log_has(&s, "device nic0 ejected");
    assert_eq!(netds(&mut q).len(), 0);
    assert_eq!(exec(&mut q, "device_add", add.clone()), ok);
    assert_eq!(netds(&mut q).len(), 1);
    assert_eq!(exec(&mut q, "netdev_del", json!({"id": "n0"})), ok);
    let r = exec(&mut q, "netdev_del", json!({"id": "n0"}));
    assert_eq!(error_class(&r), "DeviceNotFound");
    // The NIC lost its peer: its link went down (a second time in the log), as in QEMU.
    let deadline = Instant::now() + T;
    while log_has(&s, "link nic0 down")
        .matches("link nic0 down")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the NIC's link never went down");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        hmp(&mut q, "info network"),
        "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n"
    );
    assert_eq!(q.cmd("quit"), ok);
    assert!(m.wait(T).success(), "{}", m.stderr());
}

/// `netdev_add` with `fds=` naming two `getfd` fds that are queues of one multiqueue tap: one
/// netdev with two queues, consumed names, a NIC with `mq=on` gets two queue pairs and a netd
/// serving both; the errors on the way leave the names in place.
#[test]
fn netdev_add_takes_the_queues_of_a_multiqueue_tap_from_getfd() {
    let s = Scratch::new("net-mq-qmp");
    let (mut m, mut q) = start(&s, &["-S"], &[]);
    let name = format!("bhmq{}", std::process::id() % 100_000);
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the NIC tests need root");
    let queue =
        || bulkhead_monitor::nics::open_tap(&name, true).unwrap_or_else(|e| panic!("tap: {e}"));
    let (t0, t1) = (queue(), queue());
    for (fdname, t) in [("q0", &t0), ("q1", &t1)] {
        let r = q.cmd_with_fds(
            &format!(r#"{{"execute": "getfd", "arguments": {{"fdname": "{fdname}"}}}}"#),
            &[t.as_raw_fd()],
            FdsOn::Command,
        );
        assert_eq!(r, json!({"return": {}}));
    }
    // A single-queue tap, named too: it must survive the multiqueue netdev's consumption.
    let single = tap(&format!("bhsq{}", std::process::id() % 100_000));
    let r = q.cmd_with_fds(
        r#"{"execute": "getfd", "arguments": {"fdname": "one"}}"#,
        &[single.as_raw_fd()],
        FdsOn::Command,
    );
    assert_eq!(r, json!({"return": {}}));
    drop((t0, t1, single));
    let ok = json!({"return": {}});
    let e = |q: &mut Qmp, args: Value| error_desc(&exec(q, "netdev_add", args)).to_string();
    // Errors first; none of them consumes a name.
    assert_eq!(
        e(&mut q, json!({"type": "tap", "id": "n0", "fds": "q0:nope"})),
        "File descriptor named 'nope' has not been found"
    );
    assert_eq!(
        e(&mut q, json!({"type": "tap", "id": "n0", "fds": "q0:q0"})),
        "fds: 'q0' is given twice"
    );
    assert_eq!(
        e(
            &mut q,
            json!({"type": "tap", "id": "n0", "fds": "q0:q1", "queues": 2})
        ),
        "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= are invalid \
         with fds="
    );
    // A single-queue tap among the queues: refused (TUNGETIFF, in the confined monitor's
    // allowlist).
    let mixed = e(&mut q, json!({"type": "tap", "id": "n0", "fds": "q0:one"}));
    assert!(mixed.contains("is not a multiqueue tap"), "{mixed}");
    // The two queues: one netdev.
    assert_eq!(
        exec(
            &mut q,
            "netdev_add",
            json!({"type": "tap", "id": "n0", "fds": "q0:q1"})
        ),
        ok
    );
    stderr_has(&m, "netdev n0 added (fd=");
    // As QEMU: the netdev consumed both names (the single-queue one is still there).
    for gone in ["q0", "q1"] {
        assert_eq!(
            e(&mut q, json!({"type": "tap", "id": "n1", "fd": gone})),
            format!("File descriptor named '{gone}' has not been found")
        );
    }
    // A NIC with mq=on: two queue pairs (four virtqueues) to the machine, one netd for both.
    assert_eq!(
        exec(
            &mut q,
            "device_add",
            json!({"driver": "virtio-net-pci", "netdev": "n0", "id": "nic0", "mq": "on",
                   "vectors": 6})
        ),
        ok
    );
    let log = log_has(&s, "device nic0 Net");
    assert!(log.contains("queues 4 "), "{log}");
    let netd = netds(&mut q);
    assert_eq!(netd.len(), 1, "{netd:?}");
    // info network: a client per queue, as QEMU's multiqueue NIC and tap.
    let info = hmp(&mut q, "info network");
    // (QEMU formats the NIC's text on queue 0 only; each tap queue shows its own fd.)
    let mut shape = String::new();
    for line in info.split_inclusive("\r\n") {
        match line.find(",fd=") {
            Some(at) => {
                assert!(line[at + 4..].trim_end().parse::<u32>().is_ok(), "{info}");
                shape.push_str(&line[..at + 4]);
                shape.push_str("N\r\n");
            }
            None => shape.push_str(line),
        }
    }
    assert_eq!(
        shape,
        "nic0: index=0,type=nic,model=virtio-net-pci,macaddr=52:54:00:12:34:56\r\n \\ n0: \
         index=0,type=tap,fd=N\r\nnic0: index=1,type=nic,\r\n \\ n0: index=1,type=tap,fd=N\r\n",
        "{info}"
    );
    // The NIC and netdev go; the single-queue tap is still named.
    assert_eq!(exec(&mut q, "device_del", json!({"id": "nic0"})), ok);
    log_has(&s, "device nic0 removed");
    assert_eq!(exec(&mut q, "netdev_del", json!({"id": "n0"})), ok);
    assert_eq!(
        exec(
            &mut q,
            "netdev_add",
            json!({"type": "tap", "id": "n1", "fd": "one"})
        ),
        ok
    );
    assert_eq!(q.cmd("quit"), ok);
    assert!(m.wait(T).success(), "{}", m.stderr());
}

/// Sends `input` and returns the reply line as sent (events skipped).
fn reply_line(q: &mut Qmp, input: &str) -> String {
    q.send_raw(&format!("{input}\n"));
    loop {
        let line = q.read_line().expect("reply");
        if !line.contains("\"event\"") {
            return line.trim_end().to_string();
        }
    }
}

/// Debian's QEMU 7.2 (`-M q35 -S`, a tap by fd, a virtio-net-pci) and Bulkhead with the same
/// network answer the network queries and their errors with the same bytes.
#[test]
fn network_answers_match_qemu_7_2_byte_for_byte() {
    let s = Scratch::new("net-qemu");
    let a = tap(&format!("bhnc{}", std::process::id() % 100_000));
    let b = tap(&format!("bhnd{}", std::process::id() % 100_000));
    let net = [
        "-netdev",
        "tap,id=n0,fd=10",
        "-device",
        "virtio-net-pci,netdev=n0,id=nic0",
        "-netdev",
        "tap,id=n1,fd=11",
    ];
    let (mut m, mut ours) = start(&s, &net, &[(a.as_raw_fd(), 10), (b.as_raw_fd(), 11)]);
    let qsock = s.s("qemu.sock");
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-M", "q35", "-S", "-display", "none", "-nodefaults", "-qmp"])
        .arg(format!("unix:{qsock},server=on,wait=off"))
        .args(net)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let (fa, fb) = (a.as_raw_fd(), b.as_raw_fd());
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fa, 10) < 0 || libc::dup2(fb, 11) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut qemu_child = cmd.spawn().unwrap_or_else(|e| {
        panic!("qemu-system-x86_64 is required (Debian's qemu-system-x86): {e}")
    });
    wait_for_socket(&qsock, T);
    let mut qemu = Qmp::unix(&qsock);
    qemu.negotiate();
    drop((a, b));
    let steps = [
        r#"{"execute": "query-rx-filter"}"#,
        r#"{"execute": "query-rx-filter", "arguments": {"name": "nic0"}}"#,
        r#"{"execute": "query-rx-filter", "arguments": {"name": "n0"}}"#,
        r#"{"execute": "query-rx-filter", "arguments": {"name": "zz"}}"#,
        r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info network"}}"#,
        r#"{"execute": "set_link", "arguments": {"name": "nope", "up": false}}"#,
        r#"{"execute": "set_link", "arguments": {"name": "nic0", "up": false}}"#,
        r#"{"execute": "set_link", "arguments": {"name": "n1", "up": false}}"#,
        r#"{"execute": "netdev_del", "arguments": {"id": "nic0"}}"#,
        r#"{"execute": "netdev_del", "arguments": {"id": "n1"}}"#,
        r#"{"execute": "netdev_del", "arguments": {"id": "n1"}}"#,
        r#"{"execute": "netdev_add", "arguments": {"type": "tap", "id": "n2", "fd": "nosuch"}}"#,
        r#"{"execute": "human-monitor-command", "arguments": {"command-line": "info network"}}"#,
    ];
    let mut diffs = Vec::new();
    for input in steps {
        let (want, got) = (reply_line(&mut qemu, input), reply_line(&mut ours, input));
        if want != got {
            diffs.push(format!("{input}\n  QEMU:     {want}\n  Bulkhead: {got}"));
        }
    }
    let _ = qemu_child.kill();
    let _ = qemu_child.wait();
    assert!(diffs.is_empty(), "differences:\n{}", diffs.join("\n"));
    assert_eq!(ours.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}
