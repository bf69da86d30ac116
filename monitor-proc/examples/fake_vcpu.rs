//! A stand-in for `bulkhead-vcpu` used by the monitor's integration tests: it speaks the real
//! ipc protocol, checks what the monitor hands it, and plays a guest scripted by `fake.*` words
//! in the kernel command line (`-append`):
//!
//! - `fake.log=PATH`: append `pid N` and every request received to PATH;
//! - `fake.files=PATH`: append the start of the kernel and initrd of every `Setup`
//!   (`kernel: TEXT`, `initrd: TEXT`) to PATH;
//! - `fake.serial-hello`: write `fake-guest: hello\n` to the serial port when first run;
//! - `fake.echo`: copy serial input back to serial output;
//! - `fake.shutdown-after=MS`, `fake.reset-after=MS`, `fake.internal-error-after=MS`,
//!   `fake.exit-after=MS` (exit status 3): guest/worker behaviour MS ms after the first `Run`;
//! - `fake.rx-filter-after=MS`: a guest driver programming each net device's rx filter:
//!   MS ms after the first `Run` two `RxFilterChanged` (promiscuous off; then also multicast
//!   01:00:5e:00:00:01 and MAC 02:00:00:00:00:99), at 2*MS a reset (`reset: true`, the
//!   configured MAC) followed by a third (`NOBCAST` on);
//! - `fake.hang-pause`: never answer `Pause`;
//! - `QuerySandbox` answers that it did not enter a sandbox (`entered: false`, the mode it was
//!   given);
//! - `QueryCpus` answers one entry per vCPU of the setup, each with the thread id of a real
//!   (idle) thread of this process named `vcpuN`, placed in the setup's topology like the real
//!   worker places it; vCPU N reports `pc` 0x1000 * (N + 1) and is halted when N is odd;
//! - `fake.refuse-setup`: answer `Setup` with an error;
//! - `fake.sigsys`: on the first `Run`, install the vcpu role's real seccomp filter (with its
//!   SIGSYS reporter on fd 4) and call `socket(2)`, which the filter refuses: the worker dies by
//!   SIGSYS and the monitor must name the call;
//! - `fake.sigsys-after=MS`: the same, MS ms after the first `Run` (from another thread, while
//!   the machine runs);
//! - the setup's virtio devices are logged (`device ID KIND slot N queues N size N`) and their
//!   vhost-user sockets kept open (never spoken to), those of `AddDevice` too (logged with
//!   `(added)`); `ConfigChanged` is logged
//!   (`config changed ID`) and answered Ok, `SetLink` too (`link ID up|down`), `RemoveDevice`
//!   (`device ID removed`) at once before the first `Run`; after it, as a guest with ACPI PCI
//!   hot-plug: `device ID eject requested`, then 200 ms later `VcpuEvent::DeviceEjected`
//!   (`device ID ejected`), unless `fake.no-eject` (a guest that never ejects: a `Reset` then
//!   carries the ejects out, as the real worker's reset does);
//! - `PowerButton` is logged (`power button`); with `fake.poweroff-on-button` the guest powers
//!   off 100 ms later (`VcpuEvent::Shutdown(GuestShutdown)`, then exit 0).
//!
//! It is launched like the real worker (in its namespaces unless `--sandbox off`) but does not
//! confine itself; the pid it logs is its pid as the monitor sees it (not 1, its pid inside its
//! own pid namespace).
//!
//! It refuses `Setup` if anything is off: fds beyond 0-3 (and the sandbox report pipe at 4
//! unless `--sandbox off`) open before setup, a wrong fd count,
//! a RAM memfd of the wrong size or without the grow/shrink/seal seals, or a kvm fd that is not
//! `/dev/kvm`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_ipc::messages::{
    CpuInfo, RxFilter, SandboxReport, ShutdownCause, VcpuEvent, VcpuProtocol, VcpuReply,
    VcpuRequest, VirtioKind,
};
use bulkhead_ipc::{Channel, Frame, Role};

fn log_line(path: &Option<String>, line: &str) {
    if let Some(p) = path {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
        {
            let _ = writeln!(f, "{line}");
        }
    }
}

fn open_fds() -> Vec<i32> {
    let mut v: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    // The directory's own fd was open while listing; drop numbers that are closed now.
    // SAFETY: F_GETFD on integers only.
    v.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0);
    v
}

/// The first bytes of a file (read at offset 0 without moving the file offset), as text.
fn head(fd: &OwnedFd) -> String {
    let mut buf = [0u8; 64];
    // SAFETY: pread into a buffer we own, bounded by its length.
    let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}

fn word_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn has_word(cmdline: &str, key: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == key)
}

fn check_setup(
    setup: &bulkhead_ipc::messages::VmSetup,
    fds: &[OwnedFd],
    fds_before: &[i32],
    expected_fds: &[i32],
) -> Result<(), String> {
    if fds_before != expected_fds {
        return Err(format!(
            "fds open at start: {fds_before:?}, expected {expected_fds:?}"
        ));
    }
    if fds.len() != setup.fd_count() {
        return Err(format!(
            "got {} fds, expected {}",
            fds.len(),
            setup.fd_count()
        ));
    }
    let kvm = std::fs::read_link(format!("/proc/self/fd/{}", fds[0].as_raw_fd()))
        .map_err(|e| e.to_string())?;
    if kvm.to_str() != Some("/dev/kvm") {
        return Err(format!("fd 0 of setup is {kvm:?}, not /dev/kvm"));
    }
    let mem = &fds[1];
    // SAFETY: fstat into a zeroed stat buffer we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(mem.as_raw_fd(), &mut st) } < 0 {
        return Err("fstat memfd failed".into());
    }
    if st.st_size as u64 != setup.mem_size {
        return Err(format!(
            "memfd is {} bytes, setup says {}",
            st.st_size, setup.mem_size
        ));
    }
    // SAFETY: F_GET_SEALS on an fd we own.
    let seals = unsafe { libc::fcntl(mem.as_raw_fd(), libc::F_GET_SEALS) };
    let want = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    if seals < 0 || seals & want != want {
        return Err(format!("memfd seals {seals:#x}, want {want:#x}"));
    }
    let mut kernel = File::from(fds[2].try_clone().map_err(|e| e.to_string())?);
    let mut head = [0u8; 4];
    kernel
        .read_exact(&mut head)
        .map_err(|e| format!("kernel unreadable: {e}"))?;
    Ok(())
}

/// Installs the vcpu role's seccomp filter and makes a call it refuses; never returns.
fn violate_seccomp() -> ! {
    use bulkhead_sandbox::{seccomp, Role, REPORT_FD};
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    let filters = match seccomp::compile(Role::Vcpu.policy(), pid) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fake_vcpu: {e}");
            std::process::exit(4);
        }
    };
    if let Err(e) = seccomp::install(&filters, Some(REPORT_FD)) {
        eprintln!("fake_vcpu: {e}");
        std::process::exit(4);
    }
    // SAFETY: socket(2) with integer arguments; the filter refuses it before it runs.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    eprintln!("fake_vcpu: socket(2) was not refused");
    std::process::exit(5);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("--ipc-fd")
        || args.get(2).map(String::as_str) != Some("3")
    {
        eprintln!("fake_vcpu: usage: bulkhead-vcpu --ipc-fd 3");
        std::process::exit(2);
    }
    let fds_before = open_fds();
    let mode = args
        .windows(2)
        .find(|w| w[0] == "--sandbox")
        .map_or_else(|| "on".to_string(), |w| w[1].clone());
    let sandboxed = mode != "off";
    let expected_fds: &[i32] = if sandboxed {
        &[0, 1, 2, 3, 4]
    } else {
        &[0, 1, 2, 3]
    };
    // Our pid as the monitor sees it: /proc is the host's, so /proc/self names the outer pid.
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        .unwrap_or_else(std::process::id);
    // SAFETY: fd 3 is the channel the monitor handed us; nothing else owns it.
    let chan = Arc::new(Channel::<VcpuProtocol>::from_fd(unsafe {
        OwnedFd::from_raw_fd(3)
    }));
    if let Err(e) = chan.handshake(Role::Vcpu, Role::Monitor) {
        eprintln!("fake_vcpu: handshake: {e}");
        std::process::exit(1);
    }
    let mut log: Option<String> = None;
    let mut cmdline = String::new();
    let mut serial_in: Option<File> = None;
    let mut serial_out: Option<Arc<File>> = None;
    let mut started = false;
    let mut cpus: Vec<CpuInfo> = Vec::new();
    // The devices' vhost-user sockets: kept open (a back end whose front end hangs up exits).
    let mut devices: Vec<OwnedFd> = Vec::new();
    // Ejects asked for under fake.no-eject (carried out by a Reset).
    let mut ejecting: Vec<String> = Vec::new();
    // The net devices of the setup: id and MAC.
    let mut net_devices: Vec<(String, [u8; 6])> = Vec::new();
    loop {
        let (frame, fds) = match chan.recv() {
            Ok(v) => v,
            Err(_) => std::process::exit(0),
        };
        let Frame::Request { id, body } = frame else {
            continue;
        };
        let name = format!("{body:?}");
        log_line(&log, name.split('(').next().unwrap_or("?"));
        let reply = match body {
            VcpuRequest::Setup(setup) => {
                cmdline = setup.cmdline.clone();
                log = word_value(&cmdline, "fake.log").map(str::to_string);
                log_line(&log, &format!("pid {pid}"));
                log_line(&log, "Setup");
                let res = check_setup(&setup, &fds, &fds_before, expected_fds);
                cpus = spawn_vcpu_threads(&setup);
                for (i, what) in [(2, "kernel"), (3, "initrd")] {
                    if i == 3 && !setup.has_initrd {
                        continue;
                    }
                    if let Some(fd) = fds.get(i) {
                        let files = word_value(&cmdline, "fake.files").map(str::to_string);
                        log_line(&files, &format!("{what}: {}", head(fd)));
                    }
                }
                let mut it = fds.into_iter().skip(3 + usize::from(setup.has_initrd));
                if setup.serial_in {
                    serial_in = it.next().map(File::from);
                }
                if setup.serial_out {
                    serial_out = it.next().map(|f| Arc::new(File::from(f)));
                }
                devices = it.collect();
                net_devices.extend(setup.devices.iter().filter_map(|d| match d.kind {
                    VirtioKind::Net { mac, .. } => Some((d.id.clone(), mac)),
                    VirtioKind::Block => None,
                }));
                for d in &setup.devices {
                    log_line(
                        &log,
                        &format!(
                            "device {} {:?} slot {} queues {} size {}",
                            d.id, d.kind, d.slot, d.num_queues, d.queue_size
                        ),
                    );
                }
                match res {
                    Err(e) => VcpuReply::Error(e),
                    Ok(()) if has_word(&cmdline, "fake.refuse-setup") => {
                        VcpuReply::Error("refused by fake.refuse-setup".into())
                    }
                    Ok(()) => VcpuReply::Ok,
                }
            }
            VcpuRequest::Run => {
                if !started {
                    started = true;
                    if has_word(&cmdline, "fake.sigsys") {
                        violate_seccomp();
                    }
                    if has_word(&cmdline, "fake.serial-hello") {
                        if let Some(out) = &serial_out {
                            let _ = (&**out).write_all(b"fake-guest: hello\n");
                        }
                    }
                    if has_word(&cmdline, "fake.echo") {
                        if let (Some(mut input), Some(out)) = (serial_in.take(), serial_out.clone())
                        {
                            std::thread::spawn(move || {
                                let mut b = [0u8; 1024];
                                while let Ok(n) = input.read(&mut b) {
                                    if n == 0 || (&*out).write_all(&b[..n]).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                    }
                    spawn_timers(&cmdline, chan.clone());
                    spawn_rx_filters(&cmdline, chan.clone(), &net_devices);
                }
                VcpuReply::Ok
            }
            VcpuRequest::Pause if has_word(&cmdline, "fake.hang-pause") => continue,
            VcpuRequest::Reset => {
                for dev in ejecting.drain(..) {
                    log_line(&log, &format!("device {dev} ejected"));
                    let _ = chan.send_event(VcpuEvent::DeviceEjected { id: dev });
                }
                VcpuReply::Ok
            }
            VcpuRequest::Pause => VcpuReply::Ok,
            VcpuRequest::QueryCpus => VcpuReply::Cpus(cpus.clone()),
            // It does not confine itself: it says so, as the real worker would without `enter`.
            VcpuRequest::QuerySandbox => VcpuReply::Sandbox(SandboxReport {
                entered: false,
                mode: mode.clone(),
                landlock_abi: 0,
                landlock_full: false,
                seccomp_instructions: 0,
                weak: Vec::new(),
                enter_micros: 0,
            }),
            VcpuRequest::Quit => {
                let _ = chan.reply(id, VcpuReply::Ok, &[]);
                std::process::exit(0);
            }
            VcpuRequest::ConfigChanged { id: dev } => {
                log_line(&log, &format!("config changed {dev}"));
                VcpuReply::Ok
            }
            VcpuRequest::AddDevice(d) => {
                log_line(
                    &log,
                    &format!(
                        "device {} {:?} slot {} queues {} size {} (added)",
                        d.id, d.kind, d.slot, d.num_queues, d.queue_size
                    ),
                );
                devices.extend(fds);
                VcpuReply::Ok
            }
            VcpuRequest::SetLink { id: dev, up } => {
                log_line(
                    &log,
                    &format!("link {dev} {}", if up { "up" } else { "down" }),
                );
                VcpuReply::Ok
            }
            // As the real worker: unplugging only before the guest first runs.
            VcpuRequest::RemoveDevice { id: dev } if !started => {
                log_line(&log, &format!("device {dev} removed"));
                VcpuReply::Ok
            }
            VcpuRequest::RemoveDevice { id: dev } => {
                log_line(&log, &format!("device {dev} eject requested"));
                if has_word(&cmdline, "fake.no-eject") {
                    ejecting.push(dev);
                } else {
                    let (c, log) = (chan.clone(), log.clone());
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(200));
                        log_line(&log, &format!("device {dev} ejected"));
                        let _ = c.send_event(VcpuEvent::DeviceEjected { id: dev });
                    });
                }
                VcpuReply::Ok
            }
            VcpuRequest::PowerButton => {
                log_line(&log, "power button");
                if has_word(&cmdline, "fake.poweroff-on-button") {
                    let c = chan.clone();
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(100));
                        let _ = c.send_event(VcpuEvent::Shutdown(ShutdownCause::GuestShutdown));
                        std::thread::sleep(Duration::from_millis(50));
                        std::process::exit(0);
                    });
                }
                VcpuReply::Ok
            }
        };
        let _ = &devices;
        if chan.reply(id, reply, &[]).is_err() {
            std::process::exit(0);
        }
    }
}

/// One idle thread per vCPU (so thread ids are real, as in `/proc/self/task`), and the
/// `QueryCpus` answer describing them.
fn spawn_vcpu_threads(setup: &bulkhead_ipc::messages::VmSetup) -> Vec<CpuInfo> {
    let t = setup.topology;
    let threads = t.threads.max(1);
    let cores = (t.dies * t.cores).max(1);
    let mut out = Vec::new();
    for index in 0..setup.vcpus {
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: gettid has no arguments and cannot fail.
                let _ = tx.send(unsafe { libc::gettid() });
                loop {
                    std::thread::park();
                }
            });
        let thread_id = match spawned {
            Ok(_) => rx.recv().unwrap_or(0),
            Err(_) => 0,
        };
        out.push(CpuInfo {
            index,
            thread_id,
            halted: index % 2 == 1,
            pc: 0x1000 * (u64::from(index) + 1),
            socket_id: index / (threads * cores),
            core_id: (index / threads) % cores,
            thread_in_core: index % threads,
        });
    }
    out
}

/// `fake.rx-filter-after=MS` (see the module docs).
fn spawn_rx_filters(
    cmdline: &str,
    chan: Arc<Channel<VcpuProtocol>>,
    devices: &[(String, [u8; 6])],
) {
    let Some(ms) = word_value(cmdline, "fake.rx-filter-after").and_then(|v| v.parse().ok()) else {
        return;
    };
    let devices = devices.to_vec();
    std::thread::spawn(move || {
        let send = |id: &str, filter: &RxFilter, reset: bool| {
            let _ = chan.send_event(VcpuEvent::RxFilterChanged {
                id: id.to_owned(),
                filter: filter.clone(),
                reset,
            });
        };
        std::thread::sleep(Duration::from_millis(ms));
        for (id, mac) in &devices {
            let mut f = RxFilter::reset(*mac);
            f.promisc = false;
            send(id, &f, false);
            f.multicast = vec![[1, 0, 0x5e, 0, 0, 1]];
            f.mac = [2, 0, 0, 0, 0, 0x99];
            send(id, &f, false);
        }
        std::thread::sleep(Duration::from_millis(ms));
        for (id, mac) in &devices {
            let mut f = RxFilter::reset(*mac);
            send(id, &f, true);
            f.nobcast = true;
            send(id, &f, false);
        }
    });
}

fn spawn_timers(cmdline: &str, chan: Arc<Channel<VcpuProtocol>>) {
    let ms = |key: &str| word_value(cmdline, key).and_then(|v| v.parse::<u64>().ok());
    let after = |d: u64, f: Box<dyn FnOnce() + Send>| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(d));
            f();
        });
    };
    if let Some(d) = ms("fake.shutdown-after") {
        let c = chan.clone();
        after(
            d,
            Box::new(move || {
                let _ = c.send_event(VcpuEvent::Shutdown(ShutdownCause::GuestShutdown));
                std::thread::sleep(Duration::from_millis(50));
                std::process::exit(0);
            }),
        );
    }
    if let Some(d) = ms("fake.reset-after") {
        let c = chan.clone();
        after(
            d,
            Box::new(move || {
                let _ = c.send_event(VcpuEvent::Reset { guest: true });
            }),
        );
    }
    if let Some(d) = ms("fake.internal-error-after") {
        let c = chan.clone();
        after(
            d,
            Box::new(move || {
                let _ = c.send_event(VcpuEvent::InternalError("fake emulation failure".into()));
            }),
        );
    }
    if let Some(d) = ms("fake.sigsys-after") {
        after(d, Box::new(|| violate_seccomp()));
    }
    if let Some(d) = ms("fake.exit-after") {
        after(d, Box::new(|| std::process::exit(3)));
    }
}
