//! `bulkhead-netd` serves a real Linux virtio-net driver: Debian's qemu-system-x86_64 under TCG
//! (no KVM) boots the kit's L2 kernel with its guest RAM in a shared memfd and a
//! `virtio-net-pci` device on `-netdev vhost-user` whose back end is the standalone netd
//! (release build, `--sandbox on`). netd gets its tap as an fd (`--tap-fd`), opened by the test
//! inside a network namespace the test makes (`ip netns add`), the way the VMM will hand it over.
//! The tap's far side is that namespace's kernel stack: the peer address, a busybox `udhcpd`
//! (pool, /24 and the peer as router: [`bulkhead_tests::dhcp`]; its lease file in the test's
//! scratch directory) and a busybox `httpd` serving a blob of random bytes (the kit's busybox
//! for both). The guest (`bulkhead.test=net`) gets eth0's address by DHCP (busybox `udhcpc`),
//! pings the router it was given, fetches the blob from it and prints its md5, which must be the
//! blob's; its address must be from the pool, and the server's lease file (`dumpleases`) must bind
//! it to the guest's MAC. No traffic leaves the machine: both ends live in the test's namespace.
//!
//! QEMU 7.2 needs two things here. (1) netd's relay (`netd/src/relay.rs`): QEMU sends
//! `SET_VRING_ENABLE` before `SET_FEATURES`; the test checks netd says it held them. (2) The
//! device without MSI-X (`vectors=0`, so INTx): QEMU 7.2's virtio-pci with a vhost-user-net peer
//! under TCG dereferences its KVM irqfd table, which only exists with KVM, when the guest
//! unmasks an MSI-X vector at `DRIVER_OK` (`kvm_virtio_pci_irqfd_use` from
//! `msix_set_vector_notifiers`, SIGSEGV); vhost-user-net turns off QEMU's guest notifier masking
//! and so takes that path. That is QEMU's front end under TCG, not netd.
//!
//! Needs root (ip netns, a tap), qemu, the netd release binary and the kit: any of them missing
//! fails the test; nothing is skipped.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Context, Result};
use bulkhead_tests::dhcp::{self, GuestMarkers};
use bulkhead_tests::kit::{self, GuestKit};
use bulkhead_tests::tcg_frontend::{
    marker, md5, scratch, wait_exit, wait_for_socket, PipeLog, Reaped, TcgGuest,
};

/// The blob the guest fetches: 2 MiB of random bytes.
const BLOB_SIZE: usize = 2 << 20;
/// The guest's MAC (QEMU's device and netd's config space).
const GUEST_MAC: &str = "52:54:00:4e:e7:d0";
/// The fd number netd gets the tap as.
const CHILD_TAP_FD: i32 = 100;
/// `TUNSETIFF`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
const TAP_FLAGS: u16 = 0x0002 | 0x1000 | 0x4000;

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A network namespace of the test's own; deleted (with its tap) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Result<Netns> {
        let name = format!("bhnetq-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", &name]))
            .context("ip netns add (iproute2, root)")?;
        let ns = Netns { name };
        // No IPv6: no router solicitations or MLD reports on the tap.
        ns.within(|| -> Result<()> {
            for c in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{c}/disable_ipv6"), "1")
                    .context("disabling IPv6 in the test namespace")?;
            }
            Ok(())
        })??;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args))
    }

    /// Runs `f` on a thread that has joined the namespace (network namespaces are per thread).
    fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on an fd we own; it affects only this thread.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(r == 0, "setns: {}", std::io::Error::last_os_error());
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("the namespace thread panicked"))?
    }

    /// Creates the tap `name` inside the namespace by opening `/dev/net/tun` there (the tap
    /// lives while the fd does), as the VMM will open it for netd. Close-on-exec stays set:
    /// only netd gets it ([`spawn_with_tap`]).
    fn open_tap(&self, name: &str) -> Result<OwnedFd> {
        let name = name.to_owned();
        self.within(move || -> Result<OwnedFd> {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .context("opening /dev/net/tun")?;
            let mut req = [0u8; 40];
            ensure!(name.len() < 16, "tap name {name} too long");
            req[..name.len()].copy_from_slice(name.as_bytes());
            req[16..18].copy_from_slice(&TAP_FLAGS.to_ne_bytes());
            // SAFETY: TUNSETIFF with a 40-byte ifreq we own.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
            ensure!(r == 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            Ok(OwnedFd::from(f))
        })?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Random bytes from the kernel.
fn random_blob() -> Result<Vec<u8>> {
    let mut v = vec![0u8; BLOB_SIZE];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut v))
        .context("reading /dev/urandom")?;
    Ok(v)
}

/// `netd --tap-fd 100 ARGS` with `tap` duplicated to fd 100 in the child only; stderr piped
/// (netd's `RLIMIT_FSIZE` is 0: a regular file as stderr would kill it with `SIGXFSZ`).
fn spawn_with_tap(exe: &Path, tap: &OwnedFd, args: &[&str]) -> Result<Child> {
    let raw = tap.as_raw_fd();
    let mut c = Command::new(exe);
    c.args(args)
        .args(["--tap-fd", &CHILD_TAP_FD.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 is async-signal-safe; the closure touches no memory of the parent's.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(raw, CHILD_TAP_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

/// Waits up to 10 s for `path` to be a non-empty file (a daemon's pid file).
fn wait_for_file(path: &Path, what: &str, log: impl Fn() -> String) -> Result<String> {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return Ok(text);
            }
        }
        ensure!(
            Instant::now() < end,
            "{what} did not write {} in 10 s: {}",
            path.display(),
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The server's leases as `dumpleases` prints them, once they name `mac`: udhcpd writes its
/// lease file when it gets `SIGUSR1`, so this asks, then reads (up to 10 s).
fn leases_naming(busybox: &Path, udhcpd: u32, lease_file: &Path, mac: &str) -> Result<String> {
    let pid = libc::pid_t::try_from(udhcpd).context("udhcpd's pid")?;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: kill(2) takes no memory; the pid is udhcpd's (from its pid file), a child of
        // ours that is reaped only when the test drops it, so the pid cannot be reused.
        let r = unsafe { libc::kill(pid, libc::SIGUSR1) };
        ensure!(
            r == 0,
            "kill -USR1 udhcpd: {}",
            std::io::Error::last_os_error()
        );
        std::thread::sleep(Duration::from_millis(200));
        let out = Command::new(busybox)
            .args(["dumpleases", "-f"])
            .arg(lease_file)
            .output()
            .context("running busybox dumpleases")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.to_ascii_lowercase().contains(mac) {
            return Ok(text);
        }
        ensure!(
            Instant::now() < end,
            "udhcpd's lease file never named {mac}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The counter `name=N` from netd's exit line.
fn counter(log: &str, name: &str) -> Option<u64> {
    let key = format!("{name}=");
    log.split_whitespace()
        .find_map(|w| w.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
}

#[test]
fn linux_virtio_net_through_netd_pings_and_fetches() -> Result<()> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "this test needs root (ip netns, a tap); CI runs as root"
    );
    kit::ensure_tools(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("ip", "iproute2"),
    ])?;
    let kit = GuestKit::get()?;
    let netd_bin = kit::bin_dir().join("bulkhead-netd");
    ensure!(
        netd_bin.is_file(),
        "{} is missing: build it (cargo build --release -p bulkhead-netd-proc) or set \
         BULKHEAD_BIN_DIR",
        netd_bin.display()
    );
    let dir = scratch("netd-qemu")?;
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    let blob = www.join("blob");
    std::fs::write(&blob, random_blob()?)?;
    let want_md5 = md5(&blob)?;
    let sock = dir.join("net.sock");

    // The namespace, its tap (opened by the test inside it) and the peer.
    let ns = Netns::new()?;
    let tap_name = format!("bhq{}", std::process::id() % 1_000_000);
    let tap = ns.open_tap(&tap_name)?;
    ns.ip(&["link", "set", &tap_name, "up"])?;
    ns.ip(&[
        "addr",
        "add",
        &format!("{}/24", kit::NET_PEER_ADDR),
        "dev",
        &tap_name,
    ])?;
    // The DHCP server on the tap, in the namespace.
    let dhcp_dir = dir.join("dhcp");
    std::fs::create_dir_all(&dhcp_dir)?;
    let (lease_file, pid_file, conf) = (
        dhcp_dir.join("udhcpd.leases"),
        dhcp_dir.join("udhcpd.pid"),
        dhcp_dir.join("udhcpd.conf"),
    );
    File::create(&lease_file).context("creating the lease file")?;
    std::fs::write(
        &conf,
        dhcp::udhcpd_conf(
            &tap_name,
            &lease_file.to_string_lossy(),
            &pid_file.to_string_lossy(),
        ),
    )?;
    let mut udhcpd = Reaped(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&kit.busybox)
            .args(["udhcpd", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting busybox udhcpd in the namespace")?,
    );
    let udhcpd_log = PipeLog::collect(udhcpd.0.stderr.take().context("udhcpd stderr")?);
    let udhcpd_pid: u32 = wait_for_file(&pid_file, "udhcpd", || udhcpd_log.text())?
        .trim()
        .parse()
        .context("udhcpd's pid file")?;
    ensure!(
        udhcpd.0.try_wait()?.is_none(),
        "udhcpd exited: {}",
        udhcpd_log.text()
    );
    let peer: SocketAddr = format!("{}:8080", kit::NET_PEER_ADDR).parse()?;
    let _httpd = Reaped(
        Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(&kit.busybox)
            .args(["httpd", "-f", "-p", &peer.to_string(), "-h"])
            .arg(&www)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting busybox httpd in the namespace")?,
    );
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let up = ns.within(move || {
            TcpStream::connect_timeout(&peer, Duration::from_millis(200)).is_ok()
        })?;
        if up {
            break;
        }
        ensure!(
            Instant::now() < end,
            "httpd did not listen on {peer} in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // netd, started outside the namespace with the tap fd; it is then the tap's only holder.
    let mut netd = Reaped(spawn_with_tap(
        &netd_bin,
        &tap,
        &[
            "--socket",
            &sock.to_string_lossy(),
            "--mac",
            GUEST_MAC,
            "--sandbox",
            "on",
        ],
    )?);
    drop(tap);
    let netd_log = PipeLog::collect(netd.0.stderr.take().context("netd stderr")?);
    let log = || netd_log.text();
    wait_for_socket(&sock, &mut netd.0, "bulkhead-netd", log)?;

    let mut guest = TcgGuest::spawn(
        &kit,
        "net",
        &[
            "-chardev".to_owned(),
            format!("socket,id=c0,path={}", sock.display()),
            "-netdev".to_owned(),
            "vhost-user,id=n0,chardev=c0".to_owned(),
            "-device".to_owned(),
            format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC},vectors=0"),
        ],
    )?;
    let console = guest.run_until(
        "BULKHEAD-NET-DONE",
        Duration::from_secs(120),
        &mut netd.0,
        "bulkhead-netd",
        log,
    )?;
    let (lines, done) = (console.lines, console.done);
    // The guest powers off, which closes the vhost-user connection.
    let qemu_status = guest.wait_exit(Duration::from_secs(15))?;
    // The front end is gone: netd ends on its own, successfully.
    let netd_status = wait_exit(&mut netd.0, Duration::from_secs(10))?;
    // The reader threads see end of file once the processes are gone.
    std::thread::sleep(Duration::from_millis(100));
    let netd_log = netd_log.text();
    eprintln!("[netd log]\n{netd_log}");
    let qemu_err = guest.stderr.text();
    if !qemu_err.trim().is_empty() {
        eprintln!("[qemu stderr]\n{qemu_err}");
    }
    ensure!(
        done,
        "the guest did not finish the net test (no BULKHEAD-NET-DONE) in 120 s; qemu {qemu_status:?}; \
         console:\n{}",
        lines.join("\n")
    );
    for l in &lines {
        ensure!(!l.contains("BULKHEAD-NET-FAIL"), "guest reported: {l}");
    }
    ensure!(
        qemu_status.is_some_and(|s| s.success()),
        "qemu did not exit successfully after the guest powered off: {qemu_status:?}"
    );
    ensure!(
        netd_status.is_some_and(|s| s.success()),
        "bulkhead-netd did not exit successfully after the guest powered off: {netd_status:?}"
    );
    ensure!(
        netd_log.contains("sandbox entered") && netd_log.contains("new network namespace"),
        "netd did not report its sandbox and network namespace: {netd_log}"
    );
    ensure!(
        !netd_log.contains("SECCOMP-VIOLATION"),
        "netd hit its seccomp filter: {netd_log}"
    );
    ensure!(
        netd_log.contains("came before SET_FEATURES"),
        "netd did not see QEMU 7.2's early SET_VRING_ENABLE (has the front end changed?): \
         {netd_log}"
    );

    let mac = marker(&lines, "BULKHEAD-NET-MAC=").context("no MAC marker")?;
    ensure!(mac == GUEST_MAC, "guest sees MAC {mac}, want {GUEST_MAC}");
    let carrier = marker(&lines, "BULKHEAD-NET-CARRIER=").context("no carrier marker")?;
    ensure!(carrier == "1", "guest sees carrier {carrier}");
    ensure!(
        lines.iter().any(|l| l.trim() == "BULKHEAD-NET-PING-OK"),
        "the guest's ping of {} did not succeed",
        kit::NET_PEER_ADDR
    );
    // The address came from the server's pool, and the server leased it to the guest's MAC.
    let guest_dhcp = GuestMarkers {
        dhcp: marker(&lines, "BULKHEAD-NET-DHCP=")
            .context("no DHCP marker")?
            .to_owned(),
        router: marker(&lines, "BULKHEAD-NET-ROUTER=")
            .context("no router marker")?
            .to_owned(),
        addr: marker(&lines, "BULKHEAD-NET-ADDR=")
            .context("no address marker")?
            .to_owned(),
    };
    let leases = leases_naming(&kit.busybox, udhcpd_pid, &lease_file, GUEST_MAC)?;
    let leased = dhcp::check_guest(&guest_dhcp, &leases, GUEST_MAC)
        .with_context(|| format!("udhcpd log:\n{}", udhcpd_log.text()))?;
    ensure!(
        udhcpd_log
            .text()
            .contains(&format!("sending ACK to {leased}")),
        "udhcpd did not log its ACK of {leased}: {}",
        udhcpd_log.text()
    );
    let got_md5 = marker(&lines, "BULKHEAD-NET-MD5=").context("no md5 marker")?;
    ensure!(
        got_md5 == want_md5,
        "the guest fetched md5 {got_md5:?}, the blob has {want_md5}"
    );
    // The blob came in through netd's rx path (at least one frame per 64 KiB, the largest GSO
    // frame) and the guest's request and acks went out through its tx path.
    let rx = counter(&netd_log, "rx_frames").context("no rx_frames in netd's log")?;
    let tx = counter(&netd_log, "tx_frames").context("no tx_frames in netd's log")?;
    ensure!(
        rx as usize >= BLOB_SIZE / 65_536 && tx > 0,
        "netd counted rx_frames={rx} tx_frames={tx} for a {BLOB_SIZE}-byte fetch"
    );
    eprintln!(
        "netd under QEMU/TCG: DHCP lease {leased} for {GUEST_MAC}, ping ok, {BLOB_SIZE}-byte \
         fetch md5 {got_md5} matches (rx_frames={rx} tx_frames={tx}), {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
