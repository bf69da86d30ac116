//! VM lifecycle through QMP and from inside the guest: stop/cont, system_reset, guest poweroff
//! and reboot (with and without `-no-reboot`), and the death of the vCPU worker (on a two-vCPU
//! guest whose `query-cpus-fast`/`query-cpus` must name the worker's real vCPU threads, and
//! whose `x-query-sandbox` must show the worker confined as L1's `/proc` does, first).
//!
//! Tests whose guest acts on its own right after boot start Bulkhead with `-S` and connect QMP
//! before `cont`, so that no event can be missed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bulkhead_tests::util::scaled;
use bulkhead_tests::{
    boot_l1_for_bulkhead, parse_tick, spawn_l2_guest, L1Process, NestedVm, Qmp, L2_BOOT_TIMEOUT,
};

const QMP_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a paused (`-S`) guest in `mode`, connects QMP, checks it is not running and resumes it.
fn start_paused<'vm>(
    vm: &'vm NestedVm,
    mode: &str,
    extra: &[&str],
) -> Result<(L1Process<'vm>, Qmp)> {
    let mut args = vec!["-S"];
    args.extend_from_slice(extra);
    let bh = spawn_l2_guest(vm, 1, mode, &args)?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    let (status, running) = qmp.query_status()?;
    println!("status with -S: {status}");
    ensure!(
        !running,
        "guest started with -S must not run before cont (status {status})"
    );
    qmp.execute("cont", None)?;
    qmp.wait_event("RESUME", scaled(EVENT_TIMEOUT))?;
    Ok((bh, qmp))
}

#[test]
fn stop_and_cont_pause_the_guest() -> Result<()> {
    let vm = boot_l1_for_bulkhead("lifecycle-stop-cont")?;
    let bh = spawn_l2_guest(&vm, 1, "idle", &[])?;
    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-TICK 2 ", Duration::from_secs(60))?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;

    qmp.execute("stop", None)?;
    qmp.wait_event("STOP", scaled(EVENT_TIMEOUT))?;
    assert_eq!(qmp.query_status()?, ("paused".to_owned(), false));
    // Let ticks already on their way through the serial chain arrive, then watch for 3 s.
    std::thread::sleep(Duration::from_secs(2));
    let before = bh
        .output_lines()
        .iter()
        .rev()
        .find_map(|l| parse_tick(l))
        .context("no tick before stop")?;
    let mark = bh.mark();
    std::thread::sleep(Duration::from_secs(3));
    let during: Vec<String> = vm
        .bulkhead_output()
        .lines_since(mark)
        .into_iter()
        .filter(|l| l.contains("BULKHEAD-TICK"))
        .collect();
    assert!(during.is_empty(), "guest ticked while paused: {during:?}");
    assert_eq!(qmp.query_status()?, ("paused".to_owned(), false));

    qmp.execute("cont", None)?;
    qmp.wait_event("RESUME", scaled(EVENT_TIMEOUT))?;
    assert_eq!(qmp.query_status()?, ("running".to_owned(), true));
    let (i, line) = bh.wait_for_console_from(mark, "BULKHEAD-TICK", Duration::from_secs(30))?;
    let after = parse_tick(&line).context("bad tick line")?;
    assert_eq!(
        after.0,
        before.0 + 1,
        "tick counter must continue: before {before:?}, after {after:?}"
    );
    let (_, line2) = bh.wait_for_console_from(i + 1, "BULKHEAD-TICK", Duration::from_secs(30))?;
    let after2 = parse_tick(&line2).context("bad tick line")?;
    println!(
        "guest uptime: last tick before stop {:.2}s, after cont {:.2}s, {:.2}s",
        before.1, after.1, after2.1
    );
    assert!(
        after.1 > before.1,
        "guest clock went backwards: {before:?} -> {after:?}"
    );
    assert!(
        after2.1 > after.1 + 0.5,
        "guest clock does not advance after cont: {after:?} -> {after2:?}"
    );
    Ok(())
}

#[test]
fn system_reset_reboots_the_guest() -> Result<()> {
    let vm = boot_l1_for_bulkhead("lifecycle-system-reset")?;
    let bh = spawn_l2_guest(&vm, 1, "idle", &[])?;
    let (first, _) =
        bh.wait_for_console_from(bh.start_mark(), "BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-TICK 1 ", Duration::from_secs(60))?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    let reset_at = Instant::now();
    qmp.execute("system_reset", None)?;
    qmp.wait_event("RESET", scaled(EVENT_TIMEOUT))?;
    let (second, _) = bh.wait_for_console_from(first + 1, "BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    println!(
        "system_reset -> GUEST-UP again in {:.1}s",
        reset_at.elapsed().as_secs_f64()
    );
    // A fresh boot: the tick counter starts again at 0.
    bh.wait_for_console_from(second, "BULKHEAD-TICK 0 ", Duration::from_secs(60))?;
    assert_eq!(qmp.query_status()?, ("running".to_owned(), true));
    Ok(())
}

#[test]
fn guest_poweroff_shuts_down_and_exits_0() -> Result<()> {
    let vm = boot_l1_for_bulkhead("lifecycle-poweroff")?;
    let (bh, mut qmp) = start_paused(&vm, "poweroff", &[])?;
    bh.wait_for_console("BULKHEAD-POWEROFF", L2_BOOT_TIMEOUT)?;
    let ev = qmp.wait_event("SHUTDOWN", scaled(EVENT_TIMEOUT))?;
    println!("SHUTDOWN event: {ev}");
    let status = bh.wait_exit(Duration::from_secs(60))?;
    assert_eq!(
        status, 0,
        "bulkhead must exit with status 0 after a guest poweroff"
    );
    let returned = vm
        .bulkhead_output()
        .count(bh.start_mark(), "BULKHEAD-POWEROFF-RETURNED");
    assert_eq!(returned, 0, "poweroff returned in the guest");
    Ok(())
}

#[test]
fn guest_reboot_resets_and_boots_again() -> Result<()> {
    let vm = boot_l1_for_bulkhead("lifecycle-reboot")?;
    let (bh, mut qmp) = start_paused(&vm, "reboot", &[])?;
    let (first, _) =
        bh.wait_for_console_from(bh.start_mark(), "BULKHEAD-REBOOT", L2_BOOT_TIMEOUT)?;
    qmp.wait_event("RESET", scaled(EVENT_TIMEOUT))?;
    bh.wait_for_console_from(first + 1, "BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    ensure!(
        bh.exit_status()?.is_none(),
        "bulkhead exited although -no-reboot was not given"
    );
    Ok(())
}

#[test]
fn guest_reboot_with_no_reboot_shuts_down() -> Result<()> {
    let vm = boot_l1_for_bulkhead("lifecycle-reboot-no-reboot")?;
    let (bh, mut qmp) = start_paused(&vm, "reboot", &["-no-reboot"])?;
    bh.wait_for_console("BULKHEAD-REBOOT", L2_BOOT_TIMEOUT)?;
    let ev = qmp.wait_event("SHUTDOWN", scaled(EVENT_TIMEOUT))?;
    println!("SHUTDOWN event: {ev}");
    let status = bh.wait_exit(Duration::from_secs(60))?;
    assert_eq!(
        status, 0,
        "bulkhead must exit with status 0 after a guest reboot with -no-reboot"
    );
    let ups = vm
        .bulkhead_output()
        .count(bh.start_mark(), "BULKHEAD-GUEST-UP");
    assert_eq!(ups, 1, "the guest booted again despite -no-reboot");
    Ok(())
}

/// Checks `query-cpus-fast` and `query-cpus` against the vCPU threads of `worker` (an L1 pid):
/// one entry per vCPU, in order, each thread id a thread of the worker named `vcpuN`, the
/// same in both answers and in HMP's `info cpus`.
fn check_vcpu_threads(vm: &NestedVm, qmp: &mut Qmp, worker: u32, vcpus: usize) -> Result<()> {
    let tasks: BTreeSet<i64> = vm
        .sh_ok(
            &format!("ls /proc/{worker}/task"),
            scaled(Duration::from_secs(20)),
        )?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    println!("bulkhead-vcpu (pid {worker}) threads: {tasks:?}");
    let fast = qmp.execute("query-cpus-fast", None)?;
    println!("query-cpus-fast: {fast}");
    let fast = fast.as_array().context("query-cpus-fast: not a list")?;
    ensure!(
        fast.len() == vcpus,
        "query-cpus-fast lists {} vCPUs, -smp says {vcpus}",
        fast.len()
    );
    let mut tids = Vec::new();
    for (i, cpu) in fast.iter().enumerate() {
        ensure!(cpu["cpu-index"] == i, "entry {i}: {cpu}");
        ensure!(cpu["target"] == "x86_64", "entry {i}: {cpu}");
        let tid = cpu["thread-id"].as_i64().context("thread-id")?;
        ensure!(
            tasks.contains(&tid),
            "vCPU {i}: thread {tid} is not a thread of bulkhead-vcpu {worker} ({tasks:?})"
        );
        let name = vm.sh_ok(
            &format!("cat /proc/{worker}/task/{tid}/comm"),
            scaled(Duration::from_secs(20)),
        )?;
        ensure!(
            name.trim() == format!("vcpu{i}"),
            "vCPU {i}: thread {tid} is {name:?}"
        );
        tids.push(tid);
    }
    let distinct: BTreeSet<i64> = tids.iter().copied().collect();
    ensure!(distinct.len() == vcpus, "thread ids repeat: {tids:?}");
    let cpus = qmp.execute("query-cpus", None)?;
    println!("query-cpus: {cpus}");
    let cpus = cpus.as_array().context("query-cpus: not a list")?;
    ensure!(cpus.len() == vcpus, "query-cpus lists {} vCPUs", cpus.len());
    for (i, cpu) in cpus.iter().enumerate() {
        ensure!(
            cpu["CPU"] == i && cpu["thread_id"] == tids[i] && cpu["arch"] == "x86",
            "query-cpus entry {i}: {cpu}"
        );
        ensure!(cpu["pc"].as_u64().is_some(), "query-cpus entry {i}: {cpu}");
    }
    let text = qmp.execute(
        "human-monitor-command",
        Some(serde_json::json!({"command-line": "info cpus", "cpu-index": 1})),
    )?;
    let want: String = tids
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                "{} CPU #{i}: thread_id={t}\r\n",
                if i == 1 { '*' } else { ' ' }
            )
        })
        .collect();
    ensure!(text == want.as_str(), "info cpus: {text}");
    Ok(())
}

/// Checks `x-query-sandbox` against the real, confined `bulkhead-vcpu` (`worker`, an L1 pid):
/// its own six namespaces, root inside mapped to nobody, no capabilities, `no_new_privs`, the
/// vcpu policy's seccomp filter, the landlock ruleset it reports, the policy's limits, and the
/// same values in L1's `/proc`.
fn check_sandbox(vm: &NestedVm, qmp: &mut Qmp, worker: u32) -> Result<()> {
    let v = qmp.execute("x-query-sandbox", None)?;
    println!("x-query-sandbox: {v}");
    ensure!(v["mode"] == "on", "mode: {v}");
    let procs = v["processes"].as_array().context("processes")?;
    ensure!(
        procs.len() == 3,
        "want the monitor, its launcher and one worker: {v}"
    );
    let (mon, launcher, w) = (&procs[0], &procs[1], &procs[2]);
    ensure!(
        mon["role"] == "monitor" && launcher["role"] == "launcher" && w["role"] == "vcpu",
        "roles: {v}"
    );
    // The monitor confined itself after start-up: its seccomp allowlist, and the landlock
    // ruleset it records (L1's ABI 2); the launcher has neither (its workers would inherit them).
    let mon_policy: usize =
        bulkhead_sandbox::seccomp::compile(bulkhead_sandbox::Role::Monitor.policy(), 1)?
            .iter()
            .map(Vec::len)
            .sum();
    ensure!(
        mon["seccomp"]["mode"] == "filter"
            && mon["seccomp"]["instructions"] == mon_policy
            && mon["no-new-privs"] == true,
        "monitor seccomp: {mon}"
    );
    ensure!(
        mon["landlock"]["source"] == "monitor-recorded" && mon["landlock"]["abi"] == 2,
        "monitor landlock: {mon}"
    );
    ensure!(
        launcher["seccomp"]["mode"] == "disabled"
            && launcher["landlock"]["status"] == "not-enforced",
        "launcher: {launcher}"
    );
    ensure!(
        w["pid"] == worker && w["ns-pid"] == 1,
        "worker pid: {w} (L1 says {worker})"
    );
    let ns = w["namespaces"].as_array().context("namespaces")?;
    for kind in ["user", "mnt", "pid", "ipc", "uts", "net"] {
        let n = ns
            .iter()
            .find(|n| n["type"] == kind)
            .with_context(|| format!("no {kind} namespace: {w}"))?;
        ensure!(n["differs-from-monitor"] == true, "{kind}: {n}");
        let link = vm.sh_ok(
            &format!("readlink /proc/{worker}/ns/{kind}"),
            scaled(Duration::from_secs(20)),
        )?;
        ensure!(
            link.trim() == format!("{kind}:[{}]", n["id"]),
            "{kind}: L1 says {link:?}, x-query-sandbox {n}"
        );
    }
    ensure!(
        w["uid"]["inside"] == 0 && w["uid"]["outside"] == 65534,
        "uid: {w}"
    );
    ensure!(
        w["gid"]["inside"] == 0 && w["gid"]["outside"] == 65534,
        "gid: {w}"
    );
    for set in [
        "inheritable",
        "permitted",
        "effective",
        "bounding",
        "ambient",
    ] {
        ensure!(w["capabilities"][set] == 0, "capabilities {set}: {w}");
    }
    ensure!(w["no-new-privs"] == true, "no-new-privs: {w}");
    let status = vm.sh_ok(
        &format!("grep -E '^(CapBnd|NoNewPrivs|Seccomp|Seccomp_filters):' /proc/{worker}/status"),
        scaled(Duration::from_secs(20)),
    )?;
    println!("L1 /proc/{worker}/status: {status}");
    ensure!(
        status.contains("CapBnd:\t0000000000000000") && status.contains("Seccomp:\t2"),
        "L1 status: {status}"
    );
    let filters = status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .map(str::trim)
        .context("Seccomp_filters")?;
    ensure!(
        w["seccomp"]["mode"] == "filter"
            && filters.parse::<u64>().ok() == w["seccomp"]["filters"].as_u64(),
        "seccomp: {w} vs L1 {filters}"
    );
    let policy: usize =
        bulkhead_sandbox::seccomp::compile(bulkhead_sandbox::Role::Vcpu.policy(), 1)?
            .iter()
            .map(Vec::len)
            .sum();
    ensure!(
        w["seccomp"]["instructions"] == policy,
        "instructions: {w} (policy {policy})"
    );
    // L1's kernel (6.1) offers landlock ABI 2; the worker asks for every right it knows, so the
    // kernel enforces the part it has.
    let ll = &w["landlock"];
    ensure!(
        ll["source"] == "worker-reported" && ll["abi"] == 2 && ll["status"] == "partially-enforced",
        "landlock: {ll}"
    );
    let nofile = w["rlimits"]
        .as_array()
        .context("rlimits")?
        .iter()
        .find(|l| l["name"] == "Max open files")
        .context("no Max open files")?;
    ensure!(
        nofile["soft"] == 1122 && nofile["hard"] == 1122,
        "Max open files {nofile} (the vcpu policy gives 64 + 2 per vCPU + 1054 for virtio devices)"
    );
    Ok(())
}

#[test]
fn killing_the_vcpu_worker_gives_internal_error() -> Result<()> {
    let vm = boot_l1_for_bulkhead("lifecycle-vcpu-kill")?;
    let bh = spawn_l2_guest(&vm, 2, "idle", &[])?;
    bh.wait_for_console("BULKHEAD-GUEST-UP", L2_BOOT_TIMEOUT)?;
    bh.wait_for_console("BULKHEAD-TICK 1 ", Duration::from_secs(60))?;
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    assert_eq!(qmp.query_status()?, ("running".to_owned(), true));

    let pids = vm.pidof("bulkhead-vcpu")?;
    ensure!(
        pids.len() == 1,
        "expected one bulkhead-vcpu process in L1, found {pids:?}"
    );
    check_vcpu_threads(&vm, &mut qmp, pids[0], 2)?;
    check_sandbox(&vm, &mut qmp, pids[0])?;
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    vm.sh_ok(
        &format!("kill -9 {}", list.join(" ")),
        Duration::from_secs(20),
    )?;

    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    let (status, running) = loop {
        let s = qmp
            .query_status()
            .context("the monitor must keep answering after the vCPU worker died")?;
        if s.0 == "internal-error" {
            break s;
        }
        if Instant::now() > deadline {
            bail!("status is still {s:?} 30 s after killing bulkhead-vcpu");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(!running, "status {status} must not be running");
    // The death was reported: the worker, its pid and the signal (no sandbox violation).
    let ev = qmp.wait_event("X_WORKER_EXITED", scaled(EVENT_TIMEOUT))?;
    println!("X_WORKER_EXITED: {ev}");
    let d = &ev["data"];
    ensure!(
        d["role"] == "vcpu"
            && d["pid"] == pids[0]
            && d["signal"] == "SIGKILL"
            && d["sandbox-violation"] == false,
        "X_WORKER_EXITED: {ev}"
    );
    qmp.wait_event("STOP", scaled(EVENT_TIMEOUT))?;
    ensure!(
        bh.exit_status()?.is_none(),
        "bulkhead exited after its vCPU worker was killed"
    );
    // New QMP sessions still work too.
    drop(qmp);
    let mut qmp = vm.qmp(QMP_TIMEOUT)?;
    assert_eq!(qmp.query_status()?, ("internal-error".to_owned(), false));
    // The vCPUs went with the worker.
    let gone = qmp.execute("query-cpus-fast", None);
    ensure!(
        gone.is_err(),
        "query-cpus-fast after the worker died: {gone:?}"
    );
    Ok(())
}
