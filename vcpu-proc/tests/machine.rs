//! Layer-1 tests: the real `bulkhead-vcpu` process on this host's /dev/kvm, driven the way the
//! monitor drives it, booting the hand-assembled guest in `common/guest.rs`.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use bulkhead_ipc::messages::{CpuTopology, ShutdownCause, VcpuEvent, VcpuReply, VcpuRequest};
use common::guest;
use common::harness::{Boot, Worker};

const WORKER: &str = env!("CARGO_BIN_EXE_bulkhead-vcpu");
const T: Duration = Duration::from_secs(20);

/// These tests need a usable /dev/kvm; without one they fail loudly, never skip.
fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("/dev/kvm is not usable here ({e}): these tests drive the real KVM and cannot run");
    }
}

fn guest_file(name: &str) -> guest::GuestFile {
    guest::GuestFile::new("vcpu-test", name)
}

fn boot(kernel: &Path, cmdline: &str, vcpus: u32, no_reboot: bool, serial_in: bool) -> Worker {
    let mut w = Worker::spawn(Path::new(WORKER), 64, vcpus).expect("spawn worker");
    let reply = w
        .setup(&Boot {
            kernel,
            initrd: None,
            cmdline,
            mem_mib: 64,
            vcpus,
            no_reboot,
            serial_in,
            echo: false,
        })
        .expect("setup reply");
    assert_eq!(reply, VcpuReply::Ok);
    w
}

#[test]
fn poweroff_through_acpi_sleep_register() {
    require_kvm();
    let k = guest_file("poweroff");
    let mut w = boot(&k, "p", 1, false, false);
    w.ok(VcpuRequest::Run).expect("run");
    let (_, ev) = w.next_event(T).expect("an event");
    assert_eq!(ev, VcpuEvent::Shutdown(ShutdownCause::GuestShutdown));
    // The event travels over ipc and can overtake bytes still in the serial pipe.
    w.serial.wait_for("POWEROFF", 0, T);
    let text = w.serial.text();
    assert!(text.contains("BOOT 1\n"), "serial: {text:?}");
    assert!(text.contains("CMOS OK 20"), "serial: {text:?}");
    assert!(text.contains("POWEROFF"), "serial: {text:?}");
    let status = w.wait_exit(T).expect("worker exits");
    assert!(status.success());
}

fn expect_event(w: &Worker, want: VcpuEvent) -> Instant {
    let (at, ev) = w
        .next_event(T)
        .unwrap_or_else(|| panic!("no event; serial: {:?}", w.serial.text()));
    assert_eq!(ev, want, "serial: {:?}", w.serial.text());
    at
}

fn reset_then_poweroff(mode: &str) {
    require_kvm();
    let k = guest_file(mode);
    let mut w = boot(&k, mode, 1, false, false);
    w.ok(VcpuRequest::Run).expect("run");
    expect_event(&w, VcpuEvent::Reset { guest: true });
    expect_event(&w, VcpuEvent::Shutdown(ShutdownCause::GuestShutdown));
    // The event travels over ipc and can overtake bytes still in the serial pipe.
    w.serial.wait_for("POWEROFF", 0, T);
    let text = w.serial.text();
    assert!(text.contains("BOOT 1\n"), "serial: {text:?}");
    assert!(text.contains("BOOT 2\n"), "serial: {text:?}");
    assert!(text.contains("POWEROFF"), "serial: {text:?}");
    assert!(w.wait_exit(T).expect("worker exits").success());
}

#[test]
fn i8042_reset_reboots_the_guest() {
    reset_then_poweroff("r");
}

#[test]
fn acpi_reset_register_reboots_the_guest() {
    reset_then_poweroff("a");
}

#[test]
fn triple_fault_reboots_the_guest() {
    reset_then_poweroff("t");
}

#[test]
fn no_reboot_turns_resets_into_shutdown() {
    require_kvm();
    for (mode, cause) in [
        ("r", ShutdownCause::GuestReset),
        ("a", ShutdownCause::GuestReset),
        ("t", ShutdownCause::GuestTripleFault),
    ] {
        let k = guest_file(&format!("noreboot-{mode}"));
        let mut w = boot(&k, mode, 1, true, false);
        w.ok(VcpuRequest::Run).expect("run");
        expect_event(&w, VcpuEvent::Shutdown(cause));
        assert!(!w.serial.text().contains("BOOT 2"));
        assert!(w.wait_exit(T).expect("worker exits").success());
    }
}

fn ticks(text: &str) -> usize {
    text.matches("TICK ").count()
}

#[test]
fn pause_stops_the_guest_and_run_resumes_it() {
    require_kvm();
    let k = guest_file("counter");
    let mut w = boot(&k, "c", 1, false, false);
    assert_eq!(w.serial.len(), 0, "nothing runs before Run");
    w.ok(VcpuRequest::Run).expect("run");
    assert!(
        w.serial.wait_for("TICK 0003", 0, T).is_some(),
        "{:?}",
        w.serial.text()
    );
    w.ok(VcpuRequest::Pause).expect("pause");
    // Once Pause has been answered, no vCPU executes: output stops. Let the test's reader
    // drain what was already in the pipe (it can lag under load) before taking the snapshot.
    let mut seen = w.serial.len();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = w.serial.len();
        if now == seen {
            break;
        }
        seen = now;
    }
    let frozen = w.serial.text();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(w.serial.text(), frozen, "output while paused");
    // Pausing twice is fine.
    w.ok(VcpuRequest::Pause).expect("pause again");
    w.ok(VcpuRequest::Run).expect("resume");
    let n = ticks(&frozen);
    let next = format!("TICK {:04X}", n + 2);
    assert!(
        w.serial.wait_for(&next, 0, T).is_some(),
        "{:?}",
        w.serial.text()
    );
    // The counter continued rather than restarting.
    assert_eq!(w.serial.text().matches("BOOT ").count(), 1);
    w.ok(VcpuRequest::Quit).expect("quit");
    assert!(w.wait_exit(T).expect("worker exits").success());
}

#[test]
fn reset_restarts_a_running_guest_and_keeps_a_paused_one_paused() {
    require_kvm();
    let k = guest_file("reset");
    let mut w = boot(&k, "c", 1, false, false);
    w.ok(VcpuRequest::Run).expect("run");
    assert!(w.serial.wait_for("TICK 0004", 0, T).is_some());
    let mark = w.serial.len();
    w.ok(VcpuRequest::Reset).expect("reset");
    // The guest boots again (boot counter in RAM says 2) and counts from zero.
    assert!(
        w.serial.wait_for("BOOT 2", mark, T).is_some(),
        "{:?}",
        w.serial.text()
    );
    assert!(w.serial.wait_for("TICK 0001", mark, T).is_some());
    // A paused machine resets but stays paused until Run.
    w.ok(VcpuRequest::Pause).expect("pause");
    w.ok(VcpuRequest::Reset).expect("reset while paused");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!w.serial.text().contains("BOOT 3"), "ran while paused");
    let mark = w.serial.len();
    w.ok(VcpuRequest::Run).expect("run");
    assert!(w.serial.wait_for("BOOT 3", mark, T).is_some());
    assert!(w.serial.wait_for("TICK 0000", mark, T).is_some());
    // No event for a monitor-initiated reset.
    assert!(w.next_event(Duration::from_millis(100)).is_none());
}

#[test]
fn query_cpus_reports_every_vcpu() {
    require_kvm();
    let k = guest_file("query");
    let mut w = boot(&k, "x", 2, false, false);
    w.ok(VcpuRequest::Run).expect("run");
    assert!(w.serial.wait_for("CMOS OK", 0, T).is_some());
    std::thread::sleep(Duration::from_millis(100));
    let cpus = match w.request(VcpuRequest::QueryCpus, &[], T).expect("reply") {
        VcpuReply::Cpus(c) => c,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(cpus.len(), 2);
    for (i, c) in cpus.iter().enumerate() {
        assert_eq!(c.index, i as u32);
        assert_eq!(c.core_id, i as u32);
        assert_eq!((c.socket_id, c.thread_in_core), (0, 0));
        assert!(c.thread_id > 0);
        // The boot vCPU sits in `hlt`; the other waits for INIT/SIPI.
        assert!(c.halted, "{c:?}");
    }
    assert_ne!(cpus[0].thread_id, cpus[1].thread_id);
    let code = guest::LOAD_ADDR..guest::LOAD_ADDR + guest::CODE.len() as u64;
    assert!(code.contains(&cpus[0].pc), "pc {:#x}", cpus[0].pc);
    // The worker reports what its sandbox `enter` did (x-query-sandbox's landlock part):
    // entered fully under --sandbox on, with the vcpu policy's filter size.
    let report = match w.request(VcpuRequest::QuerySandbox, &[], T).expect("reply") {
        VcpuReply::Sandbox(r) => r,
        other => panic!("unexpected {other:?}"),
    };
    assert!(report.entered, "{report:?}");
    assert_eq!(report.mode, "on");
    assert!(report.landlock_abi >= 1, "{report:?}");
    assert!(report.weak.is_empty(), "{report:?}");
    let policy: usize =
        bulkhead_sandbox::seccomp::compile(bulkhead_sandbox::Role::Vcpu.policy(), 1)
            .expect("compile")
            .iter()
            .map(Vec::len)
            .sum();
    assert_eq!(report.seccomp_instructions, policy as u64);
    // Querying does not stop a running machine.
    w.ok(VcpuRequest::Quit).expect("quit");
}

#[test]
fn serial_input_reaches_the_guest() {
    require_kvm();
    let k = guest_file("echo");
    let mut w = boot(&k, "e", 1, false, true);
    w.ok(VcpuRequest::Run).expect("run");
    assert!(w.serial.wait_for("ECHO READY", 0, T).is_some());
    w.type_serial(b"hello bulkhead q").expect("type");
    expect_event(&w, VcpuEvent::Shutdown(ShutdownCause::GuestShutdown));
    // The shutdown event can overtake the echoed bytes still in the serial pipe: wait for them.
    assert!(
        w.serial.wait_for("HELLO BULKHEAD POWEROFF", 0, T).is_some(),
        "{:?}",
        w.serial.text()
    );
}

#[test]
fn requests_before_setup_and_bad_setups_are_errors() {
    require_kvm();
    let mut w = Worker::spawn(Path::new(WORKER), 64, 1).expect("spawn");
    for req in [
        VcpuRequest::Run,
        VcpuRequest::Pause,
        VcpuRequest::Reset,
        VcpuRequest::QueryCpus,
    ] {
        match w.request(req, &[], T).expect("reply") {
            VcpuReply::Error(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    // A kernel that is not a kernel.
    let junk = std::env::temp_dir().join(format!("bulkhead-junk-{}", std::process::id()));
    std::fs::write(&junk, vec![0x5au8; 8192]).expect("write");
    let reply = w
        .setup(&Boot {
            kernel: &junk,
            initrd: None,
            cmdline: "p",
            mem_mib: 64,
            vcpus: 1,
            no_reboot: false,
            serial_in: false,
            echo: false,
        })
        .expect("reply");
    assert!(matches!(reply, VcpuReply::Error(_)), "{reply:?}");
    let _ = std::fs::remove_file(&junk);
    // A memory fd whose size disagrees with the setup, zero vCPUs, a wrong topology.
    // A topology that does not hold the vCPU count.
    let bad_topology = CpuTopology {
        sockets: 2,
        dies: 1,
        cores: 1,
        threads: 1,
    };
    for (mem_size, vcpus, topology) in [
        (32u64 << 20, 1u32, CpuTopology::flat(1)),
        (64 << 20, 0, CpuTopology::flat(0)),
        (64 << 20, 1, bad_topology),
    ] {
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .expect("kvm");
        let mem = common::harness::sealed_memfd(64 << 20).expect("memfd");
        let kernel = std::fs::File::open(guest_file("bad")).expect("kernel");
        let setup = bulkhead_ipc::messages::VmSetup {
            mem_size,
            vcpus,
            topology,
            cmdline: "p".into(),
            has_initrd: false,
            serial_in: false,
            serial_out: false,
            no_reboot: false,
            devices: Vec::new(),
        };
        let reply = w
            .request(
                VcpuRequest::Setup(setup),
                &[kvm.as_fd(), mem.as_fd(), kernel.as_fd()],
                T,
            )
            .expect("reply");
        assert!(matches!(reply, VcpuReply::Error(_)), "{reply:?}");
    }
    // The worker still works after the errors.
    w.ok(VcpuRequest::Quit).expect("quit");
    assert!(w.wait_exit(T).expect("exit").success());
}

#[test]
fn worker_exits_when_the_monitor_goes_away() {
    require_kvm();
    let k = guest_file("orphan");
    let mut w = boot(&k, "c", 1, false, false);
    w.ok(VcpuRequest::Run).expect("run");
    assert!(w.serial.wait_for("TICK 0001", 0, T).is_some());
    // The monitor's end of the channel goes away while the guest runs.
    w.hang_up();
    let child = &mut w.child;
    let deadline = Instant::now() + T;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            assert!(status.success());
            break;
        }
        assert!(Instant::now() < deadline, "worker did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}
