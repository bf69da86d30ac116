//! Disks: `-drive`, `-blockdev` and `-device virtio-blk-pci` start one sandboxed
//! `bulkhead-blockd` per device (the real binary, launched by the monitor's launcher next to the
//! fake machine worker, which keeps each device's vhost-user socket and logs the devices it was
//! given); the block queries answer in QEMU 7.2's shapes with blockd's counters; `block_resize`
//! goes through blockd and tells the machine worker; a blockd that dies is reported and the VM
//! keeps running. A `vhost-user-blk-pci` on a `-chardev socket` gets the connection to an outside
//! server (the host's `qemu-storage-daemon`) handed to the machine worker, and no blockd.
//! `blockdev-add` / `blockdev-del` and `device_add` / `device_del` of a `virtio-blk-pci` work
//! before the guest first runs (cold plug) and after (ACPI hot-plug: `device_del` waits for the
//! guest's eject, or a reset).
//!
//! Needs `bulkhead-blockd` built next to `bulkhead` (`cargo build -p bulkhead-blockd-proc`);
//! the tests fail, naming it, when it is missing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::compare::{converse, differences, start_bulkhead, start_qemu, Compare, Killer, Step};
use common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(20);
const MIB: u64 = 1 << 20;

/// Links the real `bulkhead-blockd` into the fake worker directory `fake_guest` uses.
fn link_blockd(s: &Scratch) {
    let exe = Path::new(BULKHEAD)
        .parent()
        .expect("target dir")
        .join("bulkhead-blockd");
    assert!(
        exe.exists(),
        "{} is missing: build it first (cargo build -p bulkhead-blockd-proc)",
        exe.display()
    );
    let dir = s.path("workers");
    std::fs::create_dir_all(&dir).expect("worker dir");
    std::os::unix::fs::symlink(&exe, dir.join("bulkhead-blockd")).expect("symlink");
}

fn image(s: &Scratch, name: &str, len: u64) -> String {
    let p = s.path(name);
    let f = std::fs::File::create(&p).expect("image");
    f.set_len(len).expect("size");
    s.s(name)
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

fn blockds(q: &mut Qmp) -> Vec<Value> {
    let v = q.cmd("x-query-sandbox");
    v["return"]["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter(|p| p["role"] == "blockd")
        .cloned()
        .collect()
}

fn start(s: &Scratch, extra: &[&str]) -> (Monitor, Qmp) {
    link_blockd(s);
    let (m, sock) = fake_guest(s, "", extra);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    (m, q)
}

#[test]
fn disks_get_a_sandboxed_blockd_each_and_the_queries_describe_them() {
    let s = Scratch::new("blk-disks");
    let a = image(&s, "a.raw", MIB);
    let b = image(&s, "b.raw", 2 * MIB);
    let c = image(&s, "c.raw", 3 * MIB);
    let drive = format!("file={a},format=raw,id=disk0,cache=none,serial=S-A");
    let blockdev =
        format!("driver=raw,node-name=n1,file.driver=file,file.filename={b},read-only=on");
    let spare = format!("file={c},format=raw,if=none,id=spare");
    let (mut m, mut q) = start(
        &s,
        &[
            "-smp",
            "2",
            "-drive",
            &drive,
            "-blockdev",
            &blockdev,
            "-device",
            "virtio-blk-pci,drive=n1,id=vd1,num-queues=3,addr=5,queue-size=128",
            "-drive",
            &spare,
        ],
    );
    // The machine worker got both devices, each with a vhost-user socket.
    let log = log_has(&s, "device vd1");
    assert!(
        log.contains("device /machine/peripheral-anon/device[0]/virtio-backend Block slot 1 queues 2 size 256"),
        "{log}"
    );
    assert!(
        log.contains("device vd1 Block slot 5 queues 3 size 128"),
        "{log}"
    );

    // Two blockds, confined: own namespaces, pid 1 inside, seccomp, no_new_privs, no
    // capabilities, landlock reported by blockd itself.
    let procs = blockds(&mut q);
    assert_eq!(procs.len(), 2, "{procs:?}");
    for p in &procs {
        assert_eq!(p["ns-pid"], 1, "{p}");
        assert_eq!(p["seccomp"]["mode"], "filter", "{p}");
        assert_eq!(p["no-new-privs"], true, "{p}");
        assert_eq!(p["landlock"]["source"], "worker-reported", "{p}");
        assert!(p["landlock"]["abi"].as_i64().unwrap_or(0) >= 1, "{p}");
        let pid = p["pid"].as_u64().expect("pid");
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        let nspid = status_field(pid, "NSpid");
        assert!(nspid.ends_with("\t1"), "{nspid}");
        // RLIMIT_NPROC grows with the queues (2 and 3 queues: 6 and 7, plus the I/O threads).
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
        let nproc = limits
            .lines()
            .find(|l| l.starts_with("Max processes"))
            .expect("nproc");
        let io = bulkhead_sandbox::policy::BLOCKD_IO_THREADS;
        assert!(
            [(6 + io).to_string(), (7 + io).to_string()]
                .contains(&nproc.split_whitespace().nth(2).unwrap_or("").to_string()),
            "{nproc}"
        );
        // It holds no path: no fd of it is an image path outside what it was handed, and its
        // root is its own empty one.
        let root = std::fs::read_link(format!("/proc/{pid}/root")).expect("root");
        assert_eq!(root, Path::new("/"), "its root as we see it");
    }

    // query-block: the -drive, the spare, then vd1's anonymous backend.
    let v = q.cmd("query-block")["return"].clone();
    let list = v.as_array().expect("list");
    assert_eq!(list.len(), 3, "{v}");
    let d0 = &list[0];
    assert_eq!(d0["device"], "disk0");
    assert_eq!(
        d0["qdev"],
        "/machine/peripheral-anon/device[0]/virtio-backend"
    );
    assert_eq!(d0["io-status"], "ok");
    assert_eq!(d0["removable"], false);
    assert_eq!(d0["type"], "unknown");
    assert_eq!(d0["inserted"]["drv"], "raw");
    assert_eq!(d0["inserted"]["file"], a.as_str());
    assert_eq!(d0["inserted"]["ro"], false);
    assert_eq!(d0["inserted"]["image"]["virtual-size"], MIB);
    assert_eq!(
        d0["inserted"]["cache"],
        json!({"no-flush": false, "direct": true, "writeback": true})
    );
    assert_eq!(list[1]["device"], "spare");
    assert_eq!(list[1]["removable"], true);
    assert!(list[1].get("qdev").is_none() && list[1].get("io-status").is_none());
    assert_eq!(list[2]["device"], "");
    assert_eq!(list[2]["qdev"], "/machine/peripheral/vd1/virtio-backend");
    assert_eq!(list[2]["inserted"]["node-name"], "n1");
    assert_eq!(list[2]["inserted"]["ro"], true);
    assert_eq!(list[2]["inserted"]["image"]["virtual-size"], 2 * MIB);

    // Every node, newest first; blockstats per backend and per node, zeros so far.
    let nodes = q.cmd("query-named-block-nodes")["return"].clone();
    assert_eq!(nodes.as_array().map(Vec::len), Some(6), "{nodes}");
    assert_eq!(
        nodes[nodes.as_array().map_or(0, Vec::len) - 1]["drv"],
        "file"
    );
    let st = q.raw(r#"{"execute":"query-blockstats"}"#)["return"].clone();
    assert_eq!(st.as_array().map(Vec::len), Some(3), "{st}");
    assert_eq!(st[0]["device"], "disk0");
    assert_eq!(st[0]["stats"]["rd_operations"], 0);
    assert_eq!(st[0]["stats"]["account_invalid"], true);
    assert_eq!(st[0]["parent"]["driver-specific"]["driver"], "file");
    let st = q.raw(r#"{"execute":"query-blockstats","arguments":{"query-nodes":true}}"#)["return"]
        .clone();
    assert_eq!(st.as_array().map(Vec::len), Some(6), "{st}");
    assert!(st
        .as_array()
        .expect("list")
        .iter()
        .all(|e| e.get("device").is_none()));

    // block_resize through blockd; the machine worker is told.
    let r = q.raw(r#"{"execute":"block_resize","arguments":{"device":"disk0","size":2097152}}"#);
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(std::fs::metadata(&a).expect("a").len(), 2 * MIB);
    log_has(
        &s,
        "config changed /machine/peripheral-anon/device[0]/virtio-backend",
    );
    let v = q.cmd("query-block")["return"].clone();
    assert_eq!(v[0]["inserted"]["image"]["virtual-size"], 2 * MIB);
    for (args, err) in [
        (r#"{"node-name":"n1","size":4096}"#, "Image is read-only"),
        (
            r#"{"device":"nope","size":4096}"#,
            "Cannot find device='nope' nor node-name=''",
        ),
        (r#"{"size":4096}"#, "Cannot find device='' nor node-name=''"),
        (
            r#"{"device":"disk0","size":-1}"#,
            "Parameter 'size' expects a >0 size",
        ),
    ] {
        let r = q.raw(&format!(
            r#"{{"execute":"block_resize","arguments":{args}}}"#
        ));
        assert_eq!(error_desc(&r), err, "{args}");
    }
    let r = q.raw(r#"{"execute":"block_resize","arguments":{"device":"spare","size":4096}}"#);
    assert!(error_desc(&r).contains("not attached"), "{r}");

    // HMP.
    let r =
        q.raw(r#"{"execute":"human-monitor-command","arguments":{"command-line":"info block"}}"#);
    let text = r["return"].as_str().expect("text");
    assert!(
        text.starts_with(&format!(
            "disk0 (#block005): {a} (raw)\r\n    Attached to:      \
             /machine/peripheral-anon/device[0]/virtio-backend\r\n    Cache mode:       \
             writeback, direct\r\n"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("n1: {b} (raw, read-only)\r\n")),
        "{text}"
    );

    // I/O limits: by -drive id or by device id; shown by query-block and HMP; refused for a
    // drive without a device and for what Bulkhead lacks (bursts).
    let t = |args: &str| {
        format!(
            r#"{{"execute":"block_set_io_throttle","arguments":{{{args},"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0}}}}"#
        )
    };
    assert_eq!(
        q.raw(&t(r#""device":"disk0","bps":1000000,"iops_wr":200"#)),
        json!({"return": {}})
    );
    assert_eq!(
        q.raw(&t(
            r#""id":"/machine/peripheral/vd1/virtio-backend","bps":0,"iops_wr":50"#
        )),
        json!({"return": {}})
    );
    // blockd got them.
    m.wait_stderr("I/O limits: ThrottleLimits { bps: 1000000", T);
    let v = q.cmd("query-block")["return"].clone();
    assert_eq!(v[0]["inserted"]["bps"], 1_000_000, "{v}");
    assert_eq!(v[0]["inserted"]["iops_wr"], 200, "{v}");
    assert_eq!(v[0]["inserted"]["group"], "disk0", "{v}");
    assert_eq!(v[2]["inserted"]["iops_wr"], 50, "{v}");
    assert_eq!(
        v[2]["inserted"]["group"], "/machine/peripheral/vd1/virtio-backend",
        "{v}"
    );
    assert!(v[1]["inserted"].get("group").is_none(), "{v}");
    let r =
        q.raw(r#"{"execute":"human-monitor-command","arguments":{"command-line":"info block"}}"#);
    assert!(
        r["return"].as_str().unwrap_or("").contains(
            "    I/O throttling:   bps=1000000 bps_rd=0 bps_wr=0 bps_max=0 bps_rd_max=0 \
             bps_wr_max=0 iops=0 iops_rd=0 iops_wr=200 iops_max=0 iops_rd_max=0 iops_wr_max=0 \
             iops_size=0 group=disk0\r\n"
        ),
        "{r}"
    );
    let r = q.raw(&t(r#""device":"spare","bps":1000,"iops_wr":0"#));
    assert!(error_desc(&r).contains("has no device"), "{r}");
    let r = q.raw(&t(
        r#""device":"disk0","bps":1000,"iops_wr":0,"bps_max":5000"#,
    ));
    assert!(error_desc(&r).contains("bursts"), "{r}");
    let r = q.raw(&t(r#""device":"zzz","bps":1000,"iops_wr":0"#));
    assert_eq!(error_class(&r), "DeviceNotFound", "{r}");
    // All zero lifts them.
    assert_eq!(
        q.raw(&t(r#""device":"disk0","bps":0,"iops_wr":0"#)),
        json!({"return": {}})
    );
    let v = q.cmd("query-block")["return"].clone();
    assert!(v[0]["inserted"].get("group").is_none(), "{v}");
    assert_eq!(v[0]["inserted"]["bps"], 0, "{v}");

    // quit: the blockds go with the monitor, cleanly (no X_WORKER_EXITED, no violation).
    let pids: Vec<u64> = procs.iter().filter_map(|p| p["pid"].as_u64()).collect();
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "blockd {pid} left"
        );
    }
    let err = m.stderr();
    assert!(
        !err.contains("X_WORKER_EXITED") && !err.contains("SECCOMP"),
        "{err}"
    );
}

#[test]
fn a_blockd_that_dies_is_reported_and_the_vm_keeps_running() {
    let s = Scratch::new("blk-death");
    let a = image(&s, "a.raw", MIB);
    let drive = format!("file={a},format=raw,id=disk0");
    let (mut m, mut q) = start(&s, &["-drive", &drive]);
    log_has(&s, "device /machine/peripheral-anon/device[0]");
    let procs = blockds(&mut q);
    assert_eq!(procs.len(), 1);
    let pid = procs[0]["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) of the blockd the monitor started (its pid, just read from the monitor).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let ev = q.event("X_WORKER_EXITED");
    assert_eq!(ev["data"]["role"], "blockd", "{ev}");
    assert_eq!(ev["data"]["pid"], pid, "{ev}");
    assert_eq!(ev["data"]["signal"], "SIGKILL", "{ev}");
    assert_eq!(
        ev["data"]["device"], "/machine/peripheral-anon/device[0]/virtio-backend",
        "{ev}"
    );
    assert_eq!(ev["data"]["sandbox-violation"], false);
    // The VM runs on; the disk is still described; its counters are gone with blockd.
    assert_eq!(q.status(), "running");
    assert!(blockds(&mut q).is_empty());
    let st = q.cmd("query-blockstats")["return"].clone();
    assert_eq!(st[0]["stats"]["wr_operations"], 0, "{st}");
    m.wait_stderr("bulkhead-blockd for", T);
    assert!(
        m.stderr().contains("was killed by signal SIGKILL"),
        "{}",
        m.stderr()
    );
    // The disk stays without a back end while this machine worker lives (a new blockd needs a
    // new vhost-user connection, which the machine only makes when it is built); quit still
    // ends everything cleanly.
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn bad_disk_options_are_refused_at_start() {
    let s = Scratch::new("blk-bad");
    let a = image(&s, "a.raw", MIB);
    for (args, err) in [
        (
            vec!["-drive".to_string(), format!("file={a},if=scsi")],
            "if=scsi is not supported by bulkhead",
        ),
        (
            vec!["-device".into(), "virtio-blk-pci,drive=nope".into()],
            "Property 'virtio-blk-pci.drive' can't find value 'nope'",
        ),
        (
            vec!["-drive".into(), "file=/nonexistent/disk.raw".into()],
            "could not open disk image '/nonexistent/disk.raw'",
        ),
        (
            vec!["-device".into(), "e1000".into()],
            "device 'e1000' is not supported by bulkhead",
        ),
    ] {
        let k = s.path("vmlinux");
        std::fs::write(&k, b"kernel").expect("kernel");
        let mut all = vec!["-kernel".to_string(), s.s("vmlinux")];
        all.extend(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let (st, stderr) = run_to_end(&refs);
        assert_eq!(st.code(), Some(1), "{all:?}: {stderr}");
        assert!(stderr.contains(err), "{all:?}: {stderr}");
    }
}

/// QEMU 7.2 and Bulkhead (`-M none`: no devices, `-drive if=none` and `-blockdev` only) give
/// the block queries the same shape: the same members (in QEMU's order), the same kinds of
/// values; names, paths and sizes may differ (QEMU draws node names at random).
#[test]
fn block_queries_have_qemu_7_2_s_shape() {
    let s = Scratch::new("blk-qemu");
    let a = image(&s, "a.raw", MIB);
    let b = image(&s, "b.raw", 2 * MIB);
    let drive = format!("file={a},format=raw,if=none,id=drv0,cache=none");
    let bd1 = format!("driver=file,node-name=f0,filename={b}");
    let bd2 = "driver=raw,node-name=disk1,file=f0,read-only=on".to_string();
    let args = ["-drive", &drive, "-blockdev", &bd1, "-blockdev", &bd2];
    let (_qemu, qemu_sock) = start_qemu(&s, &args);
    let (_bh, bh_sock) = start_bulkhead(&s, &args);
    let steps: &[Step] = &[
        (
            "negotiate",
            r#"{"execute":"qmp_capabilities"}"#,
            Compare::Exact,
        ),
        (
            "query-block",
            r#"{"execute":"query-block"}"#,
            Compare::Shape,
        ),
        (
            "named nodes",
            r#"{"execute":"query-named-block-nodes"}"#,
            Compare::Shape,
        ),
        (
            "named nodes, flat",
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}}"#,
            Compare::Shape,
        ),
        (
            "blockstats",
            r#"{"execute":"query-blockstats"}"#,
            Compare::Shape,
        ),
        (
            "blockstats of nodes",
            r#"{"execute":"query-blockstats","arguments":{"query-nodes":true}}"#,
            Compare::Shape,
        ),
        (
            "hmp info blockstats",
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"info blockstats"}}"#,
            Compare::Exact,
        ),
        (
            "throttle: device and id",
            r#"{"execute":"block_set_io_throttle","arguments":{"device":"drv0","id":"x","bps":0,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "throttle: neither",
            r#"{"execute":"block_set_io_throttle","arguments":{"bps":0,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "throttle: unknown device",
            r#"{"execute":"block_set_io_throttle","arguments":{"device":"nope","bps":0,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "throttle: unknown id",
            r#"{"execute":"block_set_io_throttle","arguments":{"id":"nope","bps":0,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "throttle: total and read/write",
            r#"{"execute":"block_set_io_throttle","arguments":{"device":"drv0","bps":100,"bps_rd":10,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "throttle: negative",
            r#"{"execute":"block_set_io_throttle","arguments":{"device":"drv0","bps":-1,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "throttle: max without value",
            r#"{"execute":"block_set_io_throttle","arguments":{"device":"drv0","bps":0,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0,"bps_max":5000}}"#,
            Compare::Exact,
        ),
        (
            "resize of nothing",
            r#"{"execute":"block_resize","arguments":{"device":"x","node-name":"y","size":1}}"#,
            Compare::Exact,
        ),
        (
            "resize, negative",
            r#"{"execute":"block_resize","arguments":{"device":"drv0","size":-5}}"#,
            Compare::Exact,
        ),
        (
            "resize of a read-only node",
            r#"{"execute":"block_resize","arguments":{"node-name":"disk1","size":4096}}"#,
            Compare::Exact,
        ),
    ];
    let theirs = converse(&mut Qmp::unix(&qemu_sock), steps);
    let ours = converse(&mut Qmp::unix(&bh_sock), steps);
    let diffs = differences(steps, &theirs, &ours);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    // Member order too (Bulkhead orders members as QEMU's QDict does).
    let keys = |l: &str| -> Vec<String> {
        let v: Value = serde_json::from_str(l).expect("json");
        let first = &v["return"][0];
        first
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    for i in 1..=5 {
        assert_eq!(
            keys(&theirs[i][0]),
            keys(&ours[i][0]),
            "step {}",
            steps[i].0
        );
    }
}

#[test]
fn a_qcow2_disk_is_served_on_a_backing_chain_the_monitor_opened() {
    let s = Scratch::new("blk-qcow2");
    let base = image(&s, "base.raw", 4 * MIB);
    let top = s.s("top.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", &top,
        ])
        .status()
        .expect("qemu-img (Debian's qemu-utils) is needed");
    assert!(st.success());
    let drive = format!("file={top},format=qcow2,id=q0,cache=none");
    let (mut m, mut q) = start(&s, &["-drive", &drive]);
    log_has(&s, "device /machine/peripheral-anon/device[0]");
    assert_eq!(blockds(&mut q).len(), 1);
    let v = q.cmd("query-block")["return"].clone();
    let ins = &v[0]["inserted"];
    assert_eq!(ins["drv"], "qcow2", "{v}");
    assert_eq!(ins["backing_file"], base.as_str(), "{v}");
    assert_eq!(ins["image"]["backing-filename"], "base.raw", "{v}");
    assert_eq!(ins["backing_file_depth"], 1, "{v}");
    assert_eq!(ins["image"]["virtual-size"], 4 * MIB, "{v}");
    assert_eq!(ins["cache"]["direct"], true, "{v}");

    // qcow2 images are not resized yet: blockd says so.
    let r = q.raw(r#"{"execute":"block_resize","arguments":{"device":"q0","size":8388608}}"#);
    assert!(error_desc(&r).contains("raw only"), "{r}");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}

#[test]
fn sandbox_off_starts_blockd_unconfined_and_still_serves() {
    let s = Scratch::new("blk-off");
    let a = image(&s, "a.raw", MIB);
    let drive = format!("file={a},format=raw,id=d0,throttling.iops-total=5000");
    let (mut m, mut q) = start(&s, &["--sandbox", "off", "-drive", &drive]);
    log_has(&s, "device /machine/peripheral-anon/device[0]");
    let procs = blockds(&mut q);
    assert_eq!(procs.len(), 1, "{procs:?}");
    let pid = procs[0]["pid"].as_u64().expect("pid");
    assert_eq!(status_field(pid, "Seccomp"), "0");
    assert_eq!(procs[0]["landlock"]["status"], "not-enforced", "{procs:?}");
    let st = q.cmd("query-blockstats")["return"].clone();
    assert_eq!(st[0]["stats"]["rd_operations"], 0, "{st}");
    // -drive throttling reached blockd and shows in query-block.
    m.wait_stderr(
        "I/O limits: ThrottleLimits { bps: 0, bps_rd: 0, bps_wr: 0, iops: 5000",
        T,
    );
    let v = q.cmd("query-block")["return"].clone();
    assert_eq!(v[0]["inserted"]["iops"], 5000, "{v}");
    assert_eq!(v[0]["inserted"]["group"], "d0", "{v}");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}

/// With devices: QEMU 7.2's q35 machine (stopped, `-S`: nothing runs) and Bulkhead with the same
/// `-drive if=virtio`, `-blockdev` and `-device virtio-blk-pci` give the block queries the same
/// shape and member order (`qdev`, `io-status`, `removable` false, stats with `parent`).
#[test]
fn block_queries_with_devices_have_qemu_7_2_s_shape() {
    let s = Scratch::new("blk-qemu-dev");
    let a = image(&s, "a.raw", MIB);
    let b = image(&s, "b.raw", 2 * MIB);
    let drive = format!("file={a},format=raw,if=virtio,id=drv0,cache=none");
    let bd = format!("driver=raw,node-name=disk1,file.driver=file,file.filename={b},read-only=on");
    let dev = "virtio-blk-pci,drive=disk1,id=vd1,num-queues=2";
    let block = [
        "-drive",
        drive.as_str(),
        "-blockdev",
        bd.as_str(),
        "-device",
        dev,
    ];
    let qsock = s.s("qemu.sock");
    let mut qargs = vec![
        "-M".to_string(),
        "q35".into(),
        "-S".into(),
        "-accel".into(),
        "tcg".into(),
        "-display".into(),
        "none".into(),
        "-nodefaults".into(),
        "-qmp".into(),
        format!("unix:{qsock},server=on,wait=off"),
    ];
    qargs.extend(block.iter().map(|x| x.to_string()));
    let _qemu = Killer(
        std::process::Command::new("qemu-system-x86_64")
            .args(&qargs)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64 is required (Debian's qemu-system-x86)"),
    );
    wait_for_socket(&qsock, T);
    link_blockd(&s);
    let mut extra = vec!["-S"];
    extra.extend_from_slice(&block);
    let (_m, bsock) = fake_guest(&s, "", &extra);
    let steps: &[Step] = &[
        (
            "negotiate",
            r#"{"execute":"qmp_capabilities"}"#,
            Compare::Exact,
        ),
        (
            "query-block",
            r#"{"execute":"query-block"}"#,
            Compare::Shape,
        ),
        (
            "blockstats",
            r#"{"execute":"query-blockstats"}"#,
            Compare::Shape,
        ),
        (
            "blockstats of nodes",
            r#"{"execute":"query-blockstats","arguments":{"query-nodes":true}}"#,
            Compare::Shape,
        ),
        (
            "named nodes",
            r#"{"execute":"query-named-block-nodes"}"#,
            Compare::Shape,
        ),
        (
            "resize of a read-only node",
            r#"{"execute":"block_resize","arguments":{"node-name":"disk1","size":4096}}"#,
            Compare::Exact,
        ),
        (
            "throttle by device",
            r#"{"execute":"block_set_io_throttle","arguments":{"device":"drv0","bps":1000000,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":200}}"#,
            Compare::Exact,
        ),
        (
            "throttle by the proxy's id",
            r#"{"execute":"block_set_io_throttle","arguments":{"id":"vd1","bps":0,"bps_rd":4096,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "throttle by id",
            r#"{"execute":"block_set_io_throttle","arguments":{"id":"/machine/peripheral/vd1/virtio-backend","bps":0,"bps_rd":4096,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#,
            Compare::Exact,
        ),
        (
            "query-block, throttled",
            r#"{"execute":"query-block"}"#,
            Compare::Shape,
        ),
        (
            "hmp info blockstats",
            r#"{"execute":"human-monitor-command","arguments":{"command-line":"info blockstats"}}"#,
            Compare::Exact,
        ),
    ];
    let theirs = converse(&mut Qmp::unix(&qsock), steps);
    let ours = converse(&mut Qmp::unix(&bsock), steps);
    let diffs = differences(steps, &theirs, &ours);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    assert!(
        theirs[1][0].contains("/machine/peripheral/vd1/virtio-backend"),
        "{theirs:?}"
    );
    assert!(
        ours[1][0].contains("/machine/peripheral/vd1/virtio-backend"),
        "{ours:?}"
    );
    let keys = |l: &str| -> Vec<Vec<String>> {
        let v: Value = serde_json::from_str(l).expect("json");
        v["return"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|e| {
                        e.as_object()
                            .map(|m| m.keys().cloned().collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    for i in 1..=4 {
        assert_eq!(
            keys(&theirs[i][0]),
            keys(&ours[i][0]),
            "step {}",
            steps[i].0
        );
    }
}

#[test]
fn a_drive_may_come_from_an_fd_set() {
    use std::os::fd::AsRawFd;
    let s = Scratch::new("blk-fdset");
    let a = image(&s, "a.raw", MIB);
    link_blockd(&s);
    let wd = fake_worker_dir(&s);
    let kernel = s.path("vmlinux");
    std::fs::write(&kernel, b"\x7fELF fake kernel").expect("kernel");
    let sock = s.s("qmp.sock");
    let qmp = format!("unix:{sock},server=on,wait=off");
    let append = format!("fake.log={}", s.s("worker.log"));
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a)
        .expect("image");
    let args = [
        "-kernel",
        kernel.to_str().expect("utf8"),
        "-m",
        "64M",
        "--worker-dir",
        &wd,
        "-append",
        &append,
        "-qmp",
        &qmp,
        "-add-fd",
        "fd=10,set=3",
        "-drive",
        "file=/dev/fdset/3,format=raw,id=fdd",
    ];
    let mut m = Monitor::start_with_fds(&s, &args, &[(img.as_raw_fd(), 10)]);
    wait_for_socket(&sock, T);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    log_has(&s, "device /machine/peripheral-anon/device[0]");
    assert_eq!(blockds(&mut q).len(), 1);
    let v = q.cmd("query-block")["return"].clone();
    assert_eq!(v[0]["inserted"]["file"], "/dev/fdset/3", "{v}");
    assert_eq!(v[0]["inserted"]["image"]["virtual-size"], MIB, "{v}");
    // The set lists the monitor's duplicate while the disk uses it.
    let sets = q.cmd("query-fdsets")["return"].clone();
    assert_eq!(sets[0]["fdset-id"], 3, "{sets}");
    // blockd resizes the very file the fd set holds.
    let r = q.raw(r#"{"execute":"block_resize","arguments":{"device":"fdd","size":3145728}}"#);
    assert_eq!(r, json!({"return": {}}));
    assert_eq!(std::fs::metadata(&a).expect("a").len(), 3 * MIB);
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}

/// More disks than one Setup frame has fds for: the rest are plugged with AddDevice before the
/// guest runs, each with its own blockd.
#[test]
fn fourteen_disks_fit_a_machine() {
    let s = Scratch::new("blk-many");
    let mut args = Vec::new();
    for i in 0..14 {
        let a = image(&s, &format!("d{i}.raw"), MIB);
        args.push("-drive".to_string());
        args.push(format!("file={a},format=raw,id=d{i}"));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut m, mut q) = start(&s, &refs);
    let log = log_has(
        &s,
        "device /machine/peripheral-anon/device[13]/virtio-backend",
    );
    let added = log.lines().filter(|l| l.ends_with("(added)")).count();
    assert!(added >= 1, "{log}");
    for i in 0..14u8 {
        let slot = format!("slot {} ", i + 1);
        assert!(log.contains(&slot), "{slot}: {log}");
    }
    assert_eq!(blockds(&mut q).len(), 14);
    assert_eq!(
        q.cmd("query-block")["return"].as_array().map(Vec::len),
        Some(14)
    );
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}

/// A qcow2 image on a backing chain (qcow2 on qcow2 on raw): the chain's nodes, the images'
/// backing information and format-specific data, and the stats' `backing` members have QEMU
/// 7.2's shape and member order.
#[test]
fn a_backing_chain_is_described_as_qemu_7_2_describes_it() {
    let s = Scratch::new("blk-chain");
    image(&s, "base.raw", 4 * MIB);
    let mid = s.s("mid.qcow2");
    let top = s.s("top.qcow2");
    for (img, back, fmt) in [(&mid, "base.raw", "raw"), (&top, "mid.qcow2", "qcow2")] {
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", fmt, "-b", back, img])
            .status()
            .expect("qemu-img (Debian's qemu-utils) is needed");
        assert!(st.success());
    }
    let drive = format!("file={top},format=qcow2,if=none,id=q0");
    let args = ["-drive", drive.as_str()];
    let (_qemu, qemu_sock) = start_qemu(&s, &args);
    let (_bh, bh_sock) = start_bulkhead(&s, &args);
    let steps: &[Step] = &[
        (
            "negotiate",
            r#"{"execute":"qmp_capabilities"}"#,
            Compare::Exact,
        ),
        (
            "query-block",
            r#"{"execute":"query-block"}"#,
            Compare::Shape,
        ),
        (
            "named nodes",
            r#"{"execute":"query-named-block-nodes"}"#,
            Compare::Shape,
        ),
        (
            "blockstats",
            r#"{"execute":"query-blockstats"}"#,
            Compare::Shape,
        ),
        (
            "blockstats of nodes",
            r#"{"execute":"query-blockstats","arguments":{"query-nodes":true}}"#,
            Compare::Shape,
        ),
    ];
    let theirs = converse(&mut Qmp::unix(&qemu_sock), steps);
    let ours = converse(&mut Qmp::unix(&bh_sock), steps);
    let diffs = differences(steps, &theirs, &ours);
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
    let v: Value = serde_json::from_str(&ours[1][0]).expect("json");
    let ins = &v["return"][0]["inserted"];
    assert_eq!(ins["backing_file"], mid.as_str(), "{v}");
    assert_eq!(ins["backing_file_depth"], 2, "{v}");
    assert_eq!(
        ins["image"]["backing-image"]["backing-filename"], "base.raw",
        "{v}"
    );
    assert_eq!(
        ins["image"]["format-specific"]["data"]["compat"], "1.1",
        "{v}"
    );
    // Values QEMU and Bulkhead must agree on (names aside): sizes, formats, depths.
    let strip = |l: &str| -> Value {
        fn walk(v: &mut Value) {
            match v {
                Value::Object(m) => {
                    m.remove("node-name");
                    m.remove("actual-size");
                    for x in m.values_mut() {
                        walk(x);
                    }
                }
                Value::Array(a) => a.iter_mut().for_each(walk),
                _ => {}
            }
        }
        let mut v: Value = serde_json::from_str(l).expect("json");
        walk(&mut v);
        v
    };
    assert_eq!(strip(&theirs[1][0]), strip(&ours[1][0]));
}

/// Kills a child process when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `-chardev socket,path=` + `-device vhost-user-blk-pci` with the host's `qemu-storage-daemon`
/// as the back end: the monitor connects at start-up and hands the socket to the machine worker
/// as a block device (its id, slot, queues and QEMU's default queue size 128); no blockd runs;
/// `query-block` lists nothing for it and `block_set_io_throttle` by its id says it has no block
/// backend, as QEMU 7.2 answers. A socket nobody serves is refused at start.
#[test]
fn vhost_user_blk_pci_hands_an_outside_back_end_to_the_machine_worker() {
    let s = Scratch::new("blk-vhost-user");
    let img = image(&s, "qsd.raw", MIB);
    let sock = s.s("qsd.sock");
    let qsd = std::process::Command::new("qemu-storage-daemon")
        .args([
            "--blockdev",
            &format!("driver=file,node-name=f,filename={img}"),
            "--export",
            &format!(
                "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={sock},writable=on"
            ),
        ])
        .spawn()
        .expect("qemu-storage-daemon (apt-get install qemu-system-common)");
    let _qsd = KillOnDrop(qsd);
    let deadline = Instant::now() + T;
    while !s.path("qsd.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon made no socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let chardev = format!("socket,id=vhost0,path={sock}");
    let (mut m, mut q) = start(
        &s,
        &[
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-blk-pci,chardev=vhost0,id=vub0,num-queues=2,addr=6",
        ],
    );
    log_has(&s, "device vub0 Block slot 6 queues 2 size 128");
    assert!(blockds(&mut q).is_empty());
    assert_eq!(q.cmd("query-block"), json!({"return": []}));
    let throttle = r#"{"execute":"block_set_io_throttle","arguments":{"id":"vub0","bps":0,"bps_rd":0,"bps_wr":0,"iops":0,"iops_rd":0,"iops_wr":0}}"#;
    assert_eq!(
        q.raw(throttle)["error"]["desc"],
        "Device does not have a block device backend"
    );
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());

    // Nobody listening: refused at start, naming the chardev and the path.
    let k = s.path("vmlinux");
    std::fs::write(&k, b"kernel").expect("kernel");
    let gone = format!("socket,id=c9,path={}", s.s("nobody.sock"));
    let (st, stderr) = run_to_end(&[
        "-kernel",
        &s.s("vmlinux"),
        "-chardev",
        &gone,
        "-device",
        "vhost-user-blk-pci,chardev=c9",
    ]);
    assert_eq!(st.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Failed to connect to") && stderr.contains("chardev 'c9'"),
        "{stderr}"
    );
}

/// Under `-S`: `blockdev-add` of a raw node on `/dev/fdset/1` (the confined monitor cannot open
/// a path any more, and says so in QEMU's words), `device_add` of a `virtio-blk-pci` on it (its
/// blockd starts, the machine worker gets `AddDevice`), the node busy while the device uses it,
/// `device_del` (the machine worker removes it, the blockd goes, two `DEVICE_DELETED` as QEMU
/// sends them), `blockdev-del` and `x-blockdev-del` with QEMU's errors; after `cont` the same
/// node is hot-plugged and hot-unplugged (the fake guest ejects it).
#[test]
fn blockdev_add_and_device_add_before_the_guest_first_runs() {
    use std::os::fd::AsRawFd;
    let s = Scratch::new("blk-add");
    let a = image(&s, "a.raw", 2 * MIB);
    let (mut m, mut q) = start(&s, &["-S"]);
    let by_path = format!(
        r#"{{"execute":"blockdev-add","arguments":{{"driver":"raw","node-name":"d0","file":{{"driver":"file","filename":"{a}"}}}}}}"#
    );
    let e = q.raw(&by_path);
    assert!(
        e["error"]["desc"]
            .as_str()
            .is_some_and(|d| d.starts_with(&format!("Could not open '{a}': "))),
        "{e}"
    );
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&a)
        .expect("image");
    let r = q.cmd_with_fds(
        r#"{"execute":"add-fd","arguments":{"fdset-id":1}}"#,
        &[f.as_raw_fd()],
        FdsOn::Command,
    );
    assert_eq!(r["return"]["fdset-id"], 1, "{r}");
    let add = r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"d0","file":{"driver":"file","filename":"/dev/fdset/1"}}}"#;
    assert_eq!(q.raw(add), json!({"return": {}}), "{}", m.stderr());
    assert_eq!(
        q.raw(add)["error"]["desc"],
        "Duplicate nodes with node-name='d0'"
    );
    // QEMU 7.2's texts: a root node without a name; a node another node uses; a node the
    // monitor does not own (an inline child).
    assert_eq!(
        q.raw(r#"{"execute":"blockdev-add","arguments":{"driver":"raw","file":"d0"}}"#)["error"]
            ["desc"],
        "'node-name' must be specified for the root node"
    );
    let file = r#"{"execute":"blockdev-add","arguments":{"driver":"file","node-name":"f1","filename":"/dev/fdset/1"}}"#;
    assert_eq!(q.raw(file), json!({"return": {}}));
    let raw = r#"{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"r1","file":"f1","read-only":true}}"#;
    assert_eq!(q.raw(raw), json!({"return": {}}));
    let del =
        |n: &str| format!(r#"{{"execute":"blockdev-del","arguments":{{"node-name":"{n}"}}}}"#);
    assert_eq!(
        q.raw(&del("f1"))["error"]["desc"],
        "Block device f1 is in use"
    );
    let inline = nodes_named(&mut q)
        .into_iter()
        .find(|n| n.starts_with('#'))
        .expect("d0's inline file node");
    assert_eq!(
        q.raw(&del(&inline))["error"]["desc"],
        format!("Node {inline} is not owned by the monitor")
    );
    assert_eq!(q.raw(&del("r1")), json!({"return": {}}));
    assert_eq!(q.raw(&del("f1")), json!({"return": {}}));
    let nodes = q.cmd("query-named-block-nodes");
    assert!(nodes_named(&mut q).contains(&"d0".to_string()), "{nodes}");
    let d0 = nodes["return"]
        .as_array()
        .and_then(|v| v.iter().find(|n| n["node-name"] == "d0"))
        .expect("d0");
    assert_eq!(d0["image"]["virtual-size"], 2 * MIB, "{d0}");

    let dev = r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"d0","id":"vd0","serial":"S-ADD","num-queues":2}}"#;
    assert_eq!(q.raw(dev), json!({"return": {}}));
    log_has(&s, "device vd0 Block slot 1 queues 2 size 256 (added)");
    assert_eq!(blockds(&mut q).len(), 1);
    let blk = q.cmd("query-block");
    assert_eq!(
        blk["return"][0]["qdev"],
        "/machine/peripheral/vd0/virtio-backend"
    );
    assert_eq!(blk["return"][0]["inserted"]["node-name"], "d0");
    assert_eq!(
        q.raw(dev)["error"]["desc"],
        "Duplicate device ID 'vd0' for device"
    );
    // block-set-write-threshold on the device's node: kept, shown, given to its blockd.
    let wt = |n: &str, t: u64| {
        format!(
            r#"{{"execute":"block-set-write-threshold","arguments":{{"node-name":"{n}","write-threshold":{t}}}}}"#
        )
    };
    assert_eq!(q.raw(&wt("d0", 65536)), json!({"return": {}}));
    assert_eq!(
        q.cmd("query-block")["return"][0]["inserted"]["write_threshold"],
        65536
    );
    assert_eq!(
        q.raw(&wt("nope", 1))["error"],
        json!({"class": "GenericError", "desc": "Device 'nope' not found"})
    );
    let del_node = r#"{"execute":"blockdev-del","arguments":{"node-name":"d0"}}"#;
    assert_eq!(q.raw(del_node)["error"]["desc"], "Node d0 is in use");

    let missing = r#"{"execute":"device_del","arguments":{"id":"/machine/peripheral/nope"}}"#;
    assert_eq!(
        q.raw(missing)["error"],
        json!({"class": "DeviceNotFound", "desc": "Device '/machine/peripheral/nope' not found"})
    );
    // By its QOM path, as QEMU resolves device_del's id.
    let del_dev = r#"{"execute":"device_del","arguments":{"id":"/machine/peripheral/vd0"}}"#;
    assert_eq!(q.raw(del_dev), json!({"return": {}}));
    let first = q.event("DEVICE_DELETED");
    assert_eq!(
        first["data"],
        json!({"path": "/machine/peripheral/vd0/virtio-backend"})
    );
    let second = q.event("DEVICE_DELETED");
    assert_eq!(
        second["data"],
        json!({"device": "vd0", "path": "/machine/peripheral/vd0"})
    );
    log_has(&s, "device vd0 removed");
    assert!(blockds(&mut q).is_empty());
    assert_eq!(q.cmd("query-block"), json!({"return": []}));
    assert_eq!(
        q.raw(del_dev)["error"],
        json!({"class": "DeviceNotFound", "desc": "Device '/machine/peripheral/vd0' not found"})
    );
    assert_eq!(
        q.raw(r#"{"execute":"device_del","arguments":{"id":"vd0"}}"#)["error"],
        json!({"class": "DeviceNotFound", "desc": "Device 'vd0' not found"})
    );
    assert_eq!(q.raw(del_node), json!({"return": {}}));
    assert_eq!(
        q.raw(del_node)["error"]["desc"],
        "Failed to find node with node-name='d0'"
    );
    assert_eq!(
        q.raw(r#"{"execute":"x-blockdev-del","arguments":{"node-name":"d0"}}"#)["error"]["desc"],
        "Failed to find node with node-name='d0'"
    );

    // Once the guest has run: ACPI hot-plug. device_add plugs at once; device_del asks the
    // guest (the fake ejects 200 ms later), a second one meanwhile gets QEMU's error, and the
    // device, its blockd and its implicit BlockBackend go when the guest has ejected it.
    assert_eq!(q.raw(add), json!({"return": {}}));
    assert_eq!(q.cmd("cont"), json!({"return": {}}));
    let late = r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"d0","id":"vd1"}}"#;
    assert_eq!(q.raw(late), json!({"return": {}}), "{}", m.stderr());
    log_has(&s, "device vd1 Block slot 1 queues 1 size 256 (added)");
    assert_eq!(blockds(&mut q).len(), 1);
    let del_late = r#"{"execute":"device_del","arguments":{"id":"vd1"}}"#;
    assert_eq!(q.raw(del_late), json!({"return": {}}));
    assert_eq!(
        q.raw(del_late)["error"],
        json!({"class": "GenericError", "desc": "Device vd1 is already in the process of unplug"})
    );
    log_has(&s, "device vd1 eject requested");
    let first = q.event("DEVICE_DELETED");
    assert_eq!(
        first["data"],
        json!({"path": "/machine/peripheral/vd1/virtio-backend"})
    );
    let second = q.event("DEVICE_DELETED");
    assert_eq!(
        second["data"],
        json!({"device": "vd1", "path": "/machine/peripheral/vd1"})
    );
    log_has(&s, "device vd1 ejected");
    assert!(blockds(&mut q).is_empty());
    assert_eq!(q.cmd("query-block"), json!({"return": []}));
    // The -blockdev node stays and can be plugged again.
    assert_eq!(q.raw(late), json!({"return": {}}));
    assert_eq!(blockds(&mut q).len(), 1);
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}

/// Hot-unplug of a `-drive` disk from a guest that never ejects (`fake.no-eject`): the
/// command returns, nothing goes until `system_reset` carries the unplug out (as QEMU's reset
/// does), RESET comes first and then the two `DEVICE_DELETED`; the `-drive`'s BlockBackend
/// goes with its device as in QEMU 7.2 (`device_add drive=` no longer finds it). Then
/// `system_powerdown` presses the power button (POWERDOWN after the reply) and the fake guest
/// powers off: SHUTDOWN, and with `-no-shutdown` the machine stays in `shutdown`.
#[test]
fn hot_unplug_waits_for_the_guest_and_a_reset_carries_it_out() {
    let s = Scratch::new("blk-hot-unplug");
    let a = image(&s, "a.raw", MIB);
    link_blockd(&s);
    let drive = format!("file={a},format=raw,if=none,id=d1");
    let (mut m, sock) = fake_guest(
        &s,
        "fake.no-eject fake.poweroff-on-button",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d1,id=vd0",
            "-no-shutdown",
        ],
    );
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    assert_eq!(q.status(), "running");
    assert_eq!(
        q.raw(r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"d1","id":"vd9"}}"#)["error"]["desc"],
        "Drive 'd1' is already in use by another device"
    );
    let del = r#"{"execute":"device_del","arguments":{"id":"vd0"}}"#;
    assert_eq!(q.raw(del), json!({"return": {}}));
    log_has(&s, "device vd0 eject requested");
    std::thread::sleep(Duration::from_millis(500));
    // Still there: the guest has not ejected it.
    assert_eq!(blockds(&mut q).len(), 1);
    assert_eq!(q.cmd("query-block")["return"][0]["device"], "d1");
    assert!(q.events.iter().all(|e| e["event"] != "DEVICE_DELETED"));
    assert_eq!(
        q.raw(del)["error"]["desc"],
        "Device vd0 is already in the process of unplug"
    );
    assert_eq!(q.cmd("system_reset"), json!({"return": {}}));
    // Bulkhead sends the three events before the reply (QEMU right after it), in QEMU's order.
    let all: Vec<(String, Value)> = q
        .events
        .drain(..)
        .map(|v| {
            (
                v["event"].as_str().unwrap_or("").to_string(),
                v["data"].clone(),
            )
        })
        .collect();
    assert_eq!(
        all,
        vec![
            (
                "RESET".to_string(),
                json!({"guest": false, "reason": "host-qmp-system-reset"})
            ),
            (
                "DEVICE_DELETED".to_string(),
                json!({"path": "/machine/peripheral/vd0/virtio-backend"})
            ),
            (
                "DEVICE_DELETED".to_string(),
                json!({"device": "vd0", "path": "/machine/peripheral/vd0"})
            ),
        ]
    );
    assert!(blockds(&mut q).is_empty());
    assert_eq!(q.cmd("query-block"), json!({"return": []}));
    assert_eq!(
        q.raw(r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"d1","id":"vd1"}}"#)["error"]["desc"],
        "Property 'virtio-blk-pci.drive' can't find value 'd1'"
    );
    assert_eq!(
        q.raw(del)["error"],
        json!({"class": "DeviceNotFound", "desc": "Device 'vd0' not found"})
    );

    // The power button: the reply, then POWERDOWN; the fake guest powers off.
    q.send_raw("{\"execute\":\"system_powerdown\"}\n");
    let reply: Value = serde_json::from_str(&q.read_line().expect("reply")).expect("json");
    assert_eq!(reply, json!({"return": {}}));
    let ev: Value = serde_json::from_str(&q.read_line().expect("event")).expect("json");
    assert_eq!(ev["event"], "POWERDOWN", "{ev}");
    assert!(ev.get("data").is_none(), "{ev}");
    log_has(&s, "power button");
    let shut = q.event("SHUTDOWN");
    assert_eq!(
        shut["data"],
        json!({"guest": true, "reason": "guest-shutdown"})
    );
    q.event("STOP");
    assert_eq!(q.status(), "shutdown");
    // With no machine worker the command still answers and POWERDOWN still comes, as QEMU.
    assert_eq!(q.cmd("system_powerdown"), json!({"return": {}}));
    q.event("POWERDOWN");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success(), "{}", m.stderr());
}

/// The node names `query-named-block-nodes` lists.
fn nodes_named(q: &mut Qmp) -> Vec<String> {
    q.cmd("query-named-block-nodes")["return"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node-name"].as_str().map(str::to_string))
        .collect()
}

/// `werror=`/`rerror=` on `-drive` and on `-device virtio-blk-pci` (and in `device_add`): the
/// values QEMU 7.2 accepts are accepted, and a bad value is refused with QEMU's very text
/// (compared with the real `qemu-system-x86_64`, its `-M pc` for devices).
#[test]
fn werror_and_rerror_are_checked_as_qemu_7_2_checks_them() {
    let s = Scratch::new("blk-werror");
    let a = image(&s, "a.raw", MIB);
    let k = s.path("vmlinux");
    std::fs::write(&k, b"kernel").expect("kernel");
    let qemu_err = |machine: &[&str], args: &[String]| -> String {
        let out = std::process::Command::new("qemu-system-x86_64")
            .args(["-nodefaults", "-display", "none", "-S"])
            .args(machine)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("qemu-system-x86_64 is required (Debian's qemu-system-x86)");
        assert!(!out.status.success(), "QEMU accepted {args:?}");
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        e.lines()
            .find_map(|l| l.strip_prefix("qemu-system-x86_64: "))
            .unwrap_or_else(|| panic!("QEMU said {e:?}"))
            .to_string()
    };
    let drive = |extra: &str| format!("file={a},format=raw,if=none,id=d0{extra}");
    let cases: Vec<(Vec<&str>, Vec<String>)> = vec![
        (
            vec!["-M", "none"],
            vec!["-drive".into(), drive(",werror=foo")],
        ),
        (
            vec!["-M", "none"],
            vec!["-drive".into(), drive(",werror=auto")],
        ),
        (
            vec!["-M", "none"],
            vec!["-drive".into(), drive(",rerror=enospc")],
        ),
        (vec!["-M", "none"], vec!["-drive".into(), drive(",rerror=")]),
        (
            vec!["-M", "pc", "-accel", "tcg"],
            vec![
                "-drive".into(),
                drive(""),
                "-device".into(),
                "virtio-blk-pci,drive=d0,werror=foo".into(),
            ],
        ),
        (
            vec!["-M", "pc", "-accel", "tcg"],
            vec![
                "-drive".into(),
                drive(""),
                "-device".into(),
                "virtio-blk-pci,drive=d0,rerror=never".into(),
            ],
        ),
    ];
    for (machine, args) in &cases {
        let theirs = qemu_err(machine, args);
        let mut all = vec!["-kernel".to_string(), s.s("vmlinux")];
        all.extend(args.iter().cloned());
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let (st, stderr) = run_to_end(&refs);
        assert_eq!(st.code(), Some(1), "{args:?}: {stderr}");
        let ours = stderr
            .lines()
            .find_map(|l| l.strip_prefix("bulkhead: "))
            .unwrap_or_default();
        assert_eq!(ours, theirs, "{args:?}");
    }
    // Every value QEMU accepts starts (blockd gets the policies in its Setup).
    let b = image(&s, "b.raw", MIB);
    let c = image(&s, "c.raw", MIB);
    let d1 = format!("file={a},format=raw,if=virtio,werror=stop,rerror=stop");
    let d2 = format!("file={b},format=raw,if=none,id=d2,werror=ignore,rerror=ignore");
    let bd = format!("driver=raw,node-name=n3,file.driver=file,file.filename={c}");
    let (_m, mut q) = start(
        &s,
        &[
            "-S",
            "-drive",
            &d1,
            "-drive",
            &d2,
            "-device",
            "virtio-blk-pci,drive=d2,id=v2,werror=auto,rerror=report",
            "-blockdev",
            &bd,
        ],
    );
    // device_add checks its values as -device does, with QEMU's text.
    let r = q.raw(
        r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"n3","id":"v3","werror":"sometimes"}}"#,
    );
    assert_eq!(
        r["error"]["desc"], "Parameter 'werror' does not accept value 'sometimes'",
        "{r}"
    );
    let r = q.raw(
        r#"{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","drive":"n3","id":"v3","werror":"enospc","rerror":"enospc"}}"#,
    );
    assert_eq!(r["return"], json!({}), "{r}");
    // Each device's backend reports an I/O status, `ok` before any error.
    let blocks = q.cmd("query-block");
    let list = blocks["return"].as_array().expect("list");
    assert_eq!(list.len(), 3, "{blocks}");
    for b in list {
        assert_eq!(b["io-status"], "ok", "{b}");
    }
    assert_eq!(
        q.cmd("query-status")["return"]["status"],
        "prelaunch",
        "{blocks}"
    );
}
