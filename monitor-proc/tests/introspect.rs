//! Introspection, machine queries and HMP against the real `bulkhead`: `-M none`, and with the
//! fake worker (`examples/fake_vcpu.rs`, which gives each vCPU a real thread), over real
//! sockets. Every answer is also checked against the schema `query-qmp-schema` returns.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bulkhead_monitor::qmp::commands::Registry;
use bulkhead_monitor::qmp::schema;
use serde_json::{json, Value};

use common::*;

const T: Duration = Duration::from_secs(10);

fn none_machine(s: &Scratch, extra: &[&str]) -> (Monitor, String) {
    let sock = s.s("qmp.sock");
    let spec = format!("unix:{sock},server=on,wait=off");
    let mut args = vec!["-M", "none", "-qmp", spec.as_str()];
    args.extend_from_slice(extra);
    let m = Monitor::start(s, &args);
    wait_for_socket(&sock, T);
    (m, sock)
}

fn guest(s: &Scratch, append: &str, extra: &[&str]) -> (Monitor, String) {
    fake_guest(s, append, extra)
}

fn exec(q: &mut Qmp, cmd: &str, args: Value) -> Value {
    q.raw(&json!({"execute": cmd, "arguments": args}).to_string())
}

fn ret(v: Value) -> Value {
    match v.get("return") {
        Some(r) => r.clone(),
        None => panic!("expected a return: {v}"),
    }
}

fn hmp(q: &mut Qmp, line: &str) -> String {
    let r = ret(exec(
        q,
        "human-monitor-command",
        json!({"command-line": line}),
    ));
    r.as_str().expect("HMP answers text").to_string()
}

fn hmp_cpu(q: &mut Qmp, line: &str, cpu: i64) -> Value {
    exec(
        q,
        "human-monitor-command",
        json!({"command-line": line, "cpu-index": cpu}),
    )
}

/// Runs `cmd` and checks its answer against the schema's return type for it.
fn checked(q: &mut Qmp, schema: &Value, cmd: &str, args: Value) -> Value {
    let r = ret(exec(q, cmd, args));
    let ty = schema::ret_type_of(schema, cmd).unwrap_or_else(|| panic!("{cmd} not in schema"));
    schema::check_value(schema, ty, &r)
        .unwrap_or_else(|e| panic!("{cmd} answered outside its schema: {e}\n{r}"));
    r
}

/// Every query without arguments, each answer checked against the schema.
fn check_all_queries(q: &mut Qmp) -> Value {
    let schema = ret(q.cmd("query-qmp-schema"));
    for cmd in [
        "query-status",
        "query-version",
        "query-commands",
        "query-events",
        "query-qmp-schema",
        "query-name",
        "query-uuid",
        "query-kvm",
        "query-cpus",
        "query-cpus-fast",
        "query-chardev",
        "query-command-line-options",
        "query-fdsets",
    ] {
        checked(q, &schema, cmd, json!({}));
    }
    checked(
        q,
        &schema,
        "human-monitor-command",
        json!({"command-line": "info status"}),
    );
    schema
}

#[test]
fn none_machine_answers_every_query() {
    let s = Scratch::new("intro-none");
    let (mut m, sock) = none_machine(
        &s,
        &[
            "-name",
            "vm1",
            "-uuid",
            "12345678-9ABC-def0-1234-56789abcdef0",
        ],
    );
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let schema = check_all_queries(&mut q);

    // query-commands: exactly the registry.
    let listed: BTreeSet<String> = ret(q.cmd("query-commands"))
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_string())
        .collect();
    let registry: BTreeSet<String> = Registry::new().names().map(str::to_string).collect();
    assert_eq!(listed, registry);
    // The schema lists exactly the same commands, and the events.
    let in_schema = |meta: &str| -> BTreeSet<String> {
        schema
            .as_array()
            .expect("list")
            .iter()
            .filter(|e| e["meta-type"] == meta)
            .map(|e| e["name"].as_str().expect("name").to_string())
            .collect()
    };
    assert_eq!(in_schema("command"), registry);
    let events: BTreeSet<String> = ret(q.cmd("query-events"))
        .as_array()
        .expect("list")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(events, in_schema("event"));
    assert_eq!(
        events,
        [
            "BLOCK_IO_ERROR",
            "BLOCK_WRITE_THRESHOLD",
            "DEVICE_DELETED",
            "NIC_RX_FILTER_CHANGED",
            "POWERDOWN",
            "RESET",
            "RESUME",
            "SHUTDOWN",
            "STOP",
            "X_WORKER_EXITED"
        ]
        .map(String::from)
        .into()
    );

    assert_eq!(q.cmd("query-name"), json!({"return": {"name": "vm1"}}));
    assert_eq!(
        q.cmd("query-uuid"),
        json!({"return": {"UUID": "12345678-9abc-def0-1234-56789abcdef0"}})
    );
    assert_eq!(
        q.cmd("query-kvm"),
        json!({"return": {"enabled": false, "present": true}})
    );
    assert_eq!(q.cmd("query-cpus"), json!({"return": []}));
    assert_eq!(q.cmd("query-cpus-fast"), json!({"return": []}));
    assert_eq!(
        q.cmd("query-chardev"),
        json!({"return": [{"frontend-open": true,
            "filename": format!("unix:{sock},server=on"), "label": "compat_monitor0"}]})
    );
    // Arguments are checked like any command's.
    let r = exec(&mut q, "query-command-line-options", json!({"option": 1}));
    assert_eq!(
        error_desc(&r),
        "Invalid parameter type for 'option', expected: string"
    );
    let r = exec(&mut q, "query-command-line-options", json!({"option": "S"}));
    assert_eq!(error_class(&r), "GenericError");
    assert_eq!(error_desc(&r), "invalid option name: S");
    let r = exec(&mut q, "query-kvm", json!({"x": 1}));
    assert_eq!(error_desc(&r), "Parameter 'x' is unexpected");
    let name = ret(exec(
        &mut q,
        "query-command-line-options",
        json!({"option": "name"}),
    ));
    let params: Vec<&str> = name[0]["parameters"]
        .as_array()
        .expect("params")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(params, ["debug-threads", "process", "guest"]);

    // HMP on a machine without CPUs.
    assert_eq!(hmp(&mut q, "info name"), "vm1\r\n");
    assert_eq!(
        hmp(&mut q, "info uuid"),
        "12345678-9abc-def0-1234-56789abcdef0\r\n"
    );
    assert_eq!(hmp(&mut q, "info cpus"), "");
    assert_eq!(hmp(&mut q, "info kvm"), "kvm support: disabled\r\n");
    assert_eq!(
        hmp(&mut q, "info chardev"),
        format!("compat_monitor0: filename=unix:{sock},server=on\r\n")
    );
    let r = hmp_cpu(&mut q, "info status", 0);
    assert_eq!(error_desc(&r), "Parameter 'cpu-index' expects a CPU number");
    let r = exec(&mut q, "human-monitor-command", json!({}));
    assert_eq!(error_desc(&r), "Parameter 'command-line' is missing");
    assert_eq!(hmp(&mut q, "nmi"), "unknown command: 'nmi'\r\n");
    assert_eq!(hmp(&mut q, "info"), hmp(&mut q, "help info"));

    // HMP drives the machine through the QMP commands, events included.
    assert_eq!(hmp(&mut q, "info status"), "VM status: running\r\n");
    assert_eq!(hmp(&mut q, "stop"), "");
    q.event("STOP");
    assert_eq!(q.status(), "paused");
    assert_eq!(hmp(&mut q, "info status"), "VM status: paused\r\n");
    assert_eq!(hmp(&mut q, "system_reset"), "");
    let reset = q.event("RESET");
    assert_eq!(
        reset["data"],
        json!({"guest": false, "reason": "host-qmp-system-reset"})
    );
    assert_eq!(
        hmp(&mut q, "info status"),
        "VM status: paused (prelaunch)\r\n"
    );
    assert_eq!(hmp(&mut q, "c"), "");
    q.event("RESUME");
    assert_eq!(q.status(), "running");
    assert_eq!(hmp(&mut q, "quit"), "");
    let shutdown = q.event("SHUTDOWN");
    assert_eq!(
        shutdown["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert!(q.closed());
    assert!(m.wait(T).success());
}

#[test]
fn chardevs_show_who_is_connected() {
    let s = Scratch::new("intro-chardev");
    let port = free_tcp_port();
    let tcp = format!("tcp:127.0.0.1:{port},server=on,wait=off");
    let serial_sock = s.s("serial.sock");
    let serial = format!("unix:{serial_sock},server=on,wait=off");
    let (mut m, sock) = guest(&s, "", &["-qmp", &tcp, "-serial", &serial]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let chardevs = |q: &mut Qmp| -> Vec<(String, String, bool)> {
        ret(q.cmd("query-chardev"))
            .as_array()
            .expect("list")
            .iter()
            .map(|c| {
                (
                    c["label"].as_str().expect("label").to_string(),
                    c["filename"].as_str().expect("filename").to_string(),
                    c["frontend-open"].as_bool().expect("bool"),
                )
            })
            .collect()
    };
    let want = |tcp_file: String, serial_file: String| {
        vec![
            (
                "compat_monitor0".to_string(),
                format!("unix:{sock},server=on"),
                true,
            ),
            ("compat_monitor1".to_string(), tcp_file, true),
            ("serial0".to_string(), serial_file, true),
        ]
    };
    assert_eq!(
        chardevs(&mut q),
        want(
            format!("disconnected:tcp:127.0.0.1:{port},server=on"),
            format!("disconnected:unix:{serial_sock},server=on")
        )
    );
    // A TCP client: its own addresses appear; a serial client: connected.
    let t = Qmp::tcp(port);
    let serial_client = std::os::unix::net::UnixStream::connect(&serial_sock).expect("serial");
    let t_local = {
        let Stream::Tcp(ts) = t.writer_stream() else {
            panic!("tcp")
        };
        ts.local_addr().expect("addr")
    };
    let connected = want(
        format!("tcp:127.0.0.1:{port},server=on <-> {t_local}"),
        format!("unix:{serial_sock},server=on"),
    );
    let deadline = Instant::now() + T;
    while chardevs(&mut q) != connected {
        assert!(Instant::now() < deadline, "{:?}", chardevs(&mut q));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        hmp(&mut q, "info chardev"),
        connected
            .iter()
            .map(|(l, f, _)| format!("{l}: filename={f}\r\n"))
            .collect::<String>()
    );
    // Both gone: disconnected again.
    drop(t);
    drop(serial_client);
    let disconnected = want(
        format!("disconnected:tcp:127.0.0.1:{port},server=on"),
        format!("disconnected:unix:{serial_sock},server=on"),
    );
    let deadline = Instant::now() + T;
    while chardevs(&mut q) != disconnected {
        assert!(Instant::now() < deadline, "{:?}", chardevs(&mut q));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

/// `/proc/<tid>/status` fields of a task.
fn task_field(tid: i64, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))
        .unwrap_or_else(|e| panic!("thread {tid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{tid}/status"))
        .trim()
        .to_string()
}

/// Checks that the thread ids are the vCPU threads of one process that descends from the
/// monitor; returns that process.
fn check_vcpu_threads(monitor_pid: u32, tids: &[i64]) -> i64 {
    let worker: i64 = task_field(tids[0], "Tgid").parse().expect("tgid");
    assert_ne!(worker, i64::from(monitor_pid));
    for (i, &tid) in tids.iter().enumerate() {
        assert_eq!(
            task_field(tid, "Tgid").parse::<i64>().expect("tgid"),
            worker
        );
        assert!(
            std::path::Path::new(&format!("/proc/{worker}/task/{tid}")).exists(),
            "{tid} is not a thread of {worker}"
        );
        assert_eq!(task_field(tid, "Name"), format!("vcpu{i}"));
    }
    let mut p = worker;
    while p != i64::from(monitor_pid) {
        assert!(p > 1, "worker {worker} does not descend from the monitor");
        p = task_field(p, "PPid").parse().expect("ppid");
    }
    worker
}

#[test]
fn vcpus_come_from_the_worker() {
    let s = Scratch::new("intro-cpus");
    let (mut m, sock) = guest(&s, "", &["-smp", "4,sockets=2,cores=2", "-S"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    check_all_queries(&mut q);
    assert_eq!(
        q.cmd("query-kvm"),
        json!({"return": {"enabled": true, "present": true}})
    );

    let fast = ret(q.cmd("query-cpus-fast"));
    let fast = fast.as_array().expect("list");
    assert_eq!(fast.len(), 4);
    let tids: Vec<i64> = fast
        .iter()
        .map(|c| c["thread-id"].as_i64().expect("tid"))
        .collect();
    check_vcpu_threads(m.child.id(), &tids);
    for (i, c) in fast.iter().enumerate() {
        let i = i as u64;
        assert_eq!(c["cpu-index"], json!(i));
        assert_eq!(
            c["qom-path"],
            json!(format!("/machine/unattached/device[{i}]"))
        );
        assert_eq!(c["target"], json!("x86_64"));
        assert_eq!(c["arch"], json!("x86"));
        assert_eq!(
            c["props"],
            json!({"core-id": i % 2, "thread-id": 0, "socket-id": i / 2})
        );
    }
    // QEMU's member order.
    let line = q
        .lines
        .iter()
        .rev()
        .find(|l| l.contains("cpu-index"))
        .expect("line")
        .clone();
    assert!(
        line.starts_with(&format!(
            "{{\"return\": [{{\"arch\": \"x86\", \"thread-id\": {}, \"props\": {{\"core-id\": 0, \
             \"thread-id\": 0, \"socket-id\": 0}}, \"qom-path\": \"/machine/unattached/device[0]\", \
             \"cpu-index\": 0, \"target\": \"x86_64\"}}",
            tids[0]
        )),
        "{line}"
    );

    let cpus = ret(q.cmd("query-cpus"));
    let cpus = cpus.as_array().expect("list");
    assert_eq!(cpus.len(), 4);
    for (i, c) in cpus.iter().enumerate() {
        assert_eq!(c["CPU"], json!(i));
        assert_eq!(c["current"], json!(i == 0));
        assert_eq!(c["halted"], json!(i % 2 == 1));
        assert_eq!(c["pc"], json!(0x1000 * (i + 1)));
        assert_eq!(c["thread_id"], json!(tids[i]));
        assert_eq!(c["arch"], json!("x86"));
        assert_eq!(c["qom_path"], fast[i]["qom-path"]);
        assert_eq!(c["props"], fast[i]["props"]);
    }

    // query-cpus asks the worker every time; query-cpus-fast reuses the worker's first report
    // and never stops the vCPUs.
    let asked = |s: &Scratch| {
        std::fs::read_to_string(s.path("worker.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "QueryCpus")
            .count()
    };
    let before = asked(&s);
    for _ in 0..3 {
        assert_eq!(
            ret(q.cmd("query-cpus-fast")).as_array().map(Vec::len),
            Some(4)
        );
    }
    assert_eq!(asked(&s), before);
    q.cmd("query-cpus");
    assert_eq!(asked(&s), before + 1);

    // HMP info cpus, with the current CPU chosen by cpu-index.
    let lines = |cur: usize| -> String {
        tids.iter()
            .enumerate()
            .map(|(i, t)| {
                let mark = if i == cur { '*' } else { ' ' };
                format!("{mark} CPU #{i}: thread_id={t}\r\n")
            })
            .collect()
    };
    assert_eq!(hmp(&mut q, "info cpus"), lines(0));
    assert_eq!(ret(hmp_cpu(&mut q, "info cpus", 2)), json!(lines(2)));
    for bad in [4, -1] {
        let r = hmp_cpu(&mut q, "info cpus", bad);
        assert_eq!(error_desc(&r), "Parameter 'cpu-index' expects a CPU number");
    }
    assert_eq!(
        hmp(&mut q, "info status"),
        "VM status: paused (prelaunch)\r\n"
    );
    assert_eq!(hmp(&mut q, "info kvm"), "kvm support: enabled\r\n");
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn dies_appear_in_the_cpu_properties() {
    let s = Scratch::new("intro-dies");
    let (mut m, sock) = guest(&s, "", &["-smp", "4,dies=2,cores=2"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let props: Vec<Value> = ret(q.cmd("query-cpus-fast"))
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["props"].clone())
        .collect();
    assert_eq!(
        props,
        vec![
            json!({"core-id": 0, "thread-id": 0, "die-id": 0, "socket-id": 0}),
            json!({"core-id": 1, "thread-id": 0, "die-id": 0, "socket-id": 0}),
            json!({"core-id": 0, "thread-id": 0, "die-id": 1, "socket-id": 0}),
            json!({"core-id": 1, "thread-id": 0, "die-id": 1, "socket-id": 0}),
        ]
    );
    check_all_queries(&mut q);
    assert_eq!(q.cmd("quit"), json!({"return": {}}));
    assert!(m.wait(T).success());
}

#[test]
fn a_dead_worker_has_no_vcpus_until_system_reset() {
    let s = Scratch::new("intro-dead");
    let (mut m, sock) = guest(&s, "fake.exit-after=1500", &["-smp", "2"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    let first: Vec<i64> = ret(q.cmd("query-cpus-fast"))
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["thread-id"].as_i64().expect("tid"))
        .collect();
    let worker = check_vcpu_threads(m.child.id(), &first);
    q.event("STOP");
    assert_eq!(q.status(), "internal-error");
    assert_eq!(
        hmp(&mut q, "info status"),
        "VM status: paused (internal-error)\r\n"
    );
    for cmd in ["query-cpus-fast", "query-cpus"] {
        let r = q.cmd(cmd);
        assert_eq!(error_class(&r), "GenericError", "{r}");
        assert!(error_desc(&r).contains("worker is not running"), "{r}");
    }
    assert!(hmp(&mut q, "info cpus").starts_with("Error: the vCPUs are gone"));
    // cpu-index still names the machine's vCPUs: HMP can reset the machine.
    assert_eq!(ret(hmp_cpu(&mut q, "system_reset", 1)), json!(""));
    q.event("RESET");
    let again: Vec<i64> = ret(q.cmd("query-cpus-fast"))
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["thread-id"].as_i64().expect("tid"))
        .collect();
    let new_worker = check_vcpu_threads(m.child.id(), &again);
    assert_ne!(new_worker, worker);
    assert_eq!(hmp(&mut q, "quit"), "");
    assert!(m.wait(T).success());
}

#[test]
fn hmp_reports_every_run_state() {
    let s = Scratch::new("intro-states");
    let (mut m, sock) = guest(&s, "fake.shutdown-after=1000", &["-no-shutdown"]);
    let mut q = Qmp::unix(&sock);
    q.negotiate();
    assert_eq!(hmp(&mut q, "info status"), "VM status: running\r\n");
    q.event("SHUTDOWN");
    q.event("STOP");
    assert_eq!(
        hmp(&mut q, "info status"),
        "VM status: paused (shutdown)\r\n"
    );
    // cont fails in QMP; HMP prints the error.
    assert_eq!(
        hmp(&mut q, "cont"),
        "Error: Resetting the Virtual Machine is required\r\n"
    );
    assert_eq!(hmp(&mut q, "system_reset"), "");
    q.event("RESET");
    assert_eq!(
        hmp(&mut q, "info status"),
        "VM status: paused (prelaunch)\r\n"
    );
    assert_eq!(hmp(&mut q, "cont"), "");
    q.event("RESUME");
    assert_eq!(hmp(&mut q, "info status"), "VM status: running\r\n");
    assert_eq!(hmp(&mut q, "q"), "");
    assert!(m.wait(T).success());
}
