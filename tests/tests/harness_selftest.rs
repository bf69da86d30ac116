//! Self-tests of the harness itself, independent of Bulkhead: the L1 VM with its agent,
//! output stream and port forward; the L2 kit under plain QEMU/TCG; the QMP client against QEMU.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bulkhead_tests::util::{scaled, which};
use bulkhead_tests::{l2_append, record_timing, ConsoleLog, GuestKit, NestedOpts, NestedVm, Qmp};

fn qemu() -> Result<std::path::PathBuf> {
    which("qemu-system-x86_64").context(
        "\n\n*** qemu-system-x86_64 is not installed; the harness needs it (apt-get install qemu-system-x86) ***\n",
    )
}

#[test]
fn l1_boots_with_dev_kvm_and_agent_works() -> Result<()> {
    let vm = NestedVm::boot(NestedOpts {
        with_bulkhead: false,
        ..NestedOpts::new("selftest-l1")
    })?;
    record_timing(
        "L1 boot (QEMU start -> agent ready)",
        vm.boot_time().as_secs_f64(),
    );
    let t = Duration::from_secs(30);

    // /dev/kvm is there and usable by an ioctl-free check; kvm_amd is loaded.
    let out = vm.sh_ok(
        "ls -l /dev/kvm; grep -E '^kvm(_amd)? ' /proc/modules | cut -d' ' -f1",
        t,
    )?;
    assert!(out.contains("/dev/kvm"), "{out}");
    assert!(out.contains("kvm_amd"), "{out}");
    // SVM with nested paging is what KVM needs from the L1 CPU.
    let flags = vm.sh_ok("grep -m1 '^flags' /proc/cpuinfo", t)?;
    assert!(flags.contains(" svm") && flags.contains(" npt"), "{flags}");

    // Output and exit status are returned faithfully, including awkward characters.
    let (out, rc) = vm.sh(
        "printf 'a b\\n\\ttab \"q\" %s\\n' \"$((1 + 2))\"; echo err >&2; exit 3",
        t,
    )?;
    assert_eq!(rc, 3);
    assert_eq!(out, "a b\n\ttab \"q\" 3\nerr\n", "{out:?}");
    let big = vm.sh_ok("seq 1 20000", t)?;
    assert_eq!(big.lines().count(), 20000);
    assert_eq!(big.lines().last(), Some("20000"));
    // A hung command is killed and reported, and the agent keeps working.
    let err = vm
        .sh("sleep 100", Duration::from_secs(2))
        .expect_err("must time out");
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    assert_eq!(vm.sh_ok("echo still-alive", t)?.trim(), "still-alive");

    // The root is a tmpfs (so pivot_root works), the network is configured.
    let root = vm.sh_ok("awk '$2 == \"/\" {print $3}' /proc/mounts", t)?;
    assert!(root.lines().any(|l| l == "tmpfs"), "root fs: {root}");
    let addr = vm.sh_ok("ip -4 addr show dev eth0", t)?;
    assert!(addr.contains("10.0.2.15/24"), "{addr}");
    vm.sh_ok(
        "test -e /l2/vmlinuz && test -e /l2/vmlinux && test -e /l2/initrd.img",
        t,
    )?;

    // A background process writes to the output stream and its exit status is collected.
    let p = vm.spawn(&[
        "sh",
        "-c",
        "echo OUTPUT-MARK-1; sleep 1; echo OUTPUT-MARK-2; exit 7",
    ])?;
    p.wait_for_console("OUTPUT-MARK-2", Duration::from_secs(30))?;
    assert_eq!(p.wait_exit(Duration::from_secs(30))?, 7);
    let lines = p.output_lines();
    assert!(lines.iter().any(|l| l == "OUTPUT-MARK-1"), "{lines:?}");

    // The forwarded port reaches a listener on 0.0.0.0:4444 in L1.
    let nc = vm.spawn(&["nc", "-l", "-p", "4444"])?;
    let deadline = Instant::now() + scaled(Duration::from_secs(30));
    loop {
        // Until nc listens, the forwarder accepts and immediately closes the connection.
        let ok = std::net::TcpStream::connect(("127.0.0.1", vm.qmp_port())).and_then(|mut s| {
            s.write_all(b"HELLO-FROM-HOST\n")?;
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(b"HELLO-AGAIN\n")
        });
        if ok.is_ok()
            && nc
                .wait_for_console("HELLO-FROM-HOST", Duration::from_secs(3))
                .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "port forward 127.0.0.1:{} -> L1:4444 does not work",
                vm.qmp_port()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = nc.kill("KILL");
    Ok(())
}

/// Boots the L2 kit (kernel + test initramfs) directly under QEMU/TCG on the host and returns
/// the captured console and the QEMU child.
fn boot_l2_under_tcg(
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    smp: u32,
    mode: &str,
    name: &str,
) -> Result<(ConsoleLog, std::process::Child)> {
    let dir = bulkhead_tests::util::workspace_root().join("target/nested-runs");
    std::fs::create_dir_all(&dir)?;
    let mut child = Command::new(qemu()?)
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-M",
            "q35",
            "-m",
            "512",
            "-smp",
            &smp.to_string(),
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &l2_append(mode), "-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("no stdout")?;
    let log = ConsoleLog::capture(
        name,
        stdout,
        &dir.join(format!("{name}-{}.log", std::process::id())),
    )?;
    Ok((log, child))
}

fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("QEMU did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn l2_kit_prints_markers_under_plain_tcg() -> Result<()> {
    let kit = GuestKit::get()?;
    println!(
        "L2 kernel {}, L1 kernel {}",
        kit.l2_kernel_version, kit.l1_kernel_version
    );
    let t = scaled(Duration::from_secs(120));

    // idle, booted from the bzImage: markers, CPU count and ticks with a running clock.
    let (log, mut child) =
        boot_l2_under_tcg(&kit.l2_bzimage, &kit.l2_initrd, 2, "idle", "l2-tcg-idle")?;
    let started = Instant::now();
    let r = (|| -> Result<()> {
        log.wait_for(0, "BULKHEAD-GUEST-UP", t)?;
        record_timing(
            "L2 under plain TCG on the host -> GUEST-UP",
            started.elapsed().as_secs_f64(),
        );
        log.wait_for(0, "BULKHEAD-NCPUS=2", t)?;
        let (i, first) = log.wait_for(0, "BULKHEAD-TICK 0 ", t)?;
        let (_, third) = log.wait_for(i, "BULKHEAD-TICK 2 ", t)?;
        let up = |l: &str| {
            l.split_whitespace()
                .nth(2)
                .and_then(|s| s.parse::<f64>().ok())
        };
        let (a, b) = (
            up(&first).context("tick 0 uptime")?,
            up(&third).context("tick 2 uptime")?,
        );
        assert!(
            b - a >= 1.5,
            "guest uptime did not advance: {first} / {third}"
        );
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    r?;

    // poweroff, booted from the extracted vmlinux (PVH): QEMU exits.
    let (log, mut child) = boot_l2_under_tcg(
        &kit.l2_vmlinux,
        &kit.l2_initrd,
        1,
        "poweroff",
        "l2-tcg-poweroff",
    )?;
    log.wait_for(0, "BULKHEAD-POWEROFF", t)?;
    let st = wait_child(&mut child, Duration::from_secs(60))?;
    assert!(st.success(), "QEMU exit status {st}");

    // reboot with -no-reboot: QEMU exits too.
    let (log, mut child) = boot_l2_under_tcg(
        &kit.l2_vmlinux,
        &kit.l2_initrd,
        1,
        "reboot",
        "l2-tcg-reboot",
    )?;
    log.wait_for(0, "BULKHEAD-REBOOT", t)?;
    wait_child(&mut child, Duration::from_secs(60))?;
    assert_eq!(log.count(0, "BULKHEAD-GUEST-UP"), 1);
    Ok(())
}

#[test]
fn qmp_client_works_against_qemu() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("bulkhead-qmp-selftest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("qmp.sock");
    let mut child = Command::new(qemu()?)
        .args(["-M", "none", "-display", "none", "-nodefaults", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .spawn()?;
    let r = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if Instant::now() > deadline {
                bail!("QEMU did not create {}", sock.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut q = Qmp::connect_unix(&sock, Duration::from_secs(10))?;
        assert!(
            q.greeting()["QMP"]["version"]["qemu"].is_object(),
            "{}",
            q.greeting()
        );
        let (status, running) = q.query_status()?;
        assert_eq!((status.as_str(), running), ("running", true));
        q.execute("stop", None)?;
        q.wait_event("STOP", Duration::from_secs(10))?;
        assert_eq!(q.query_status()?, ("paused".to_owned(), false));
        q.execute("cont", None)?;
        q.wait_event("RESUME", Duration::from_secs(10))?;
        let err = q.execute("no-such-command", None).expect_err("must fail");
        assert_eq!(err.class(), Some("CommandNotFound"), "{err}");
        q.execute("quit", None)?;
        q.wait_event("SHUTDOWN", Duration::from_secs(10))?;
        Ok(())
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    r
}
