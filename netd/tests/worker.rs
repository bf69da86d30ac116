//! `bulkhead-netd` in worker mode, as the monitor launches it: started by
//! `bulkhead_sandbox::launch` in the netd role's namespaces (an empty network namespace among
//! them) with only the ipc socket (fd 3), the violation-report pipe (fd 4) and a pipe as stderr
//! (netd's `RLIMIT_FSIZE` is 0: a regular file there would kill it by `SIGXFSZ`), confined by the
//! whole netd role policy before it reads a frame, given a tap fd and a connected vhost-user
//! socket over ipc, and driven here both as the monitor (ipc: setup, stats, `set_link`, sandbox
//! report, quit) and as the vhost-user front end (`vhost::vhost_user::Frontend` on the other end
//! of the socketpair, a memfd as guest memory, split rings written by hand). The tap lives in a
//! network namespace the test makes (`ip netns add`), opened there by the test as the monitor
//! would open it; the far side is an `AF_PACKET` socket on it. Needs root (CI is root): fails
//! loudly without it, never skips.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bulkhead_ipc::messages::{NetEvent, NetProtocol, NetReply, NetRequest, NetSetup, NetStats};
use bulkhead_ipc::{Channel, Frame, Role as IpcRole};
use bulkhead_sandbox::launch::{Child, Command, IdMap};
use bulkhead_sandbox::Role;

mod common;
use common::guest::*;
use common::{eth_frame, recv_ours_matching, send_frame, Netns};
use vhost::vhost_user::Frontend;

const MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x21];
const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x09];
/// The first incoming frame of our ethertype within `timeout`.
fn recv_ours(sock: &OwnedFd, timeout: Duration) -> Option<Vec<u8>> {
    recv_ours_matching(sock, |_| true, timeout)
}

/// A launched netd, the monitor's end of its channel and its stderr (a pipe, read to the end
/// by a thread).
struct Worker {
    child: Child,
    chan: Channel<NetProtocol>,
    next_id: u64,
    stderr: Option<JoinHandle<String>>,
}

impl Worker {
    /// Launched as the monitor launches it: the netd role's namespaces, `--sandbox on`.
    fn launch(queues: u32) -> Worker {
        Worker::start(queues, None)
    }

    /// With `weak_in`: as the monitor's `--sandbox allow-weak` launches it on a host without
    /// user namespaces, with no namespaces at all, from a thread in `weak_in`'s network
    /// namespace (so the worker starts in a namespace holding an interface).
    fn start(queues: u32, weak_in: Option<&Netns>) -> Worker {
        let (mine, theirs) = Channel::<NetProtocol>::pair().expect("pair");
        let theirs = theirs.into_fd();
        let mut cmd =
            Command::new(Path::new(env!("CARGO_BIN_EXE_bulkhead-netd"))).expect("command");
        for a in [
            "--ipc-fd".to_string(),
            "3".into(),
            "--sandbox".into(),
            if weak_in.is_some() {
                "allow-weak"
            } else {
                "on"
            }
            .into(),
            "--mem-bytes".into(),
            (2 * MEM_SIZE).to_string(),
            "--queues".into(),
            queues.to_string(),
        ] {
            cmd.arg(a).expect("arg");
        }
        let mut p = [0i32; 2];
        // SAFETY: pipe2 writes two fds into the array.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both fds were just created and are owned by nobody else.
        let (err_r, err_w) = unsafe { (File::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let devnull = File::open("/dev/null").expect("null");
        cmd.fd(devnull.as_fd(), 0).expect("fd");
        cmd.fd(err_w.as_fd(), 1).expect("fd");
        cmd.fd(err_w.as_fd(), 2).expect("fd");
        cmd.fd(theirs.as_fd(), 3).expect("fd");
        cmd.report_pipe(true);
        let child = match weak_in {
            None => {
                cmd.namespaces(
                    Role::Netd.policy().namespaces,
                    Some(IdMap::for_current_user(None).expect("ids")),
                );
                cmd.spawn().expect("spawn bulkhead-netd")
            }
            // From this (the test's) thread, not a short-lived one: the worker's parent-death
            // signal fires when the thread that started it ends.
            Some(ns) => {
                let setns = |f: &File| {
                    // SAFETY: setns on an fd we own; affects only this thread.
                    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                };
                let home = File::open("/proc/thread-self/ns/net").expect("own netns");
                setns(&File::open(format!("/var/run/netns/{}", ns.name)).expect("netns file"));
                let child = cmd.spawn();
                setns(&home);
                child.expect("spawn bulkhead-netd")
            }
        };
        drop((theirs, err_w));
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let mut r = err_r;
            let _ = r.read_to_string(&mut s);
            s
        });
        mine.handshake(IpcRole::Monitor, IpcRole::Net)
            .expect("handshake");
        Worker {
            child,
            chan: mine,
            next_id: 1,
            stderr: Some(stderr),
        }
    }

    fn call(&mut self, req: NetRequest, fds: &[BorrowedFd<'_>]) -> NetReply {
        let id = self.next_id;
        self.next_id += 1;
        self.chan
            .send(&Frame::Request { id, body: req }, fds)
            .expect("send");
        match self.chan.recv().expect("recv") {
            (Frame::Reply { id: got, body }, _) => {
                assert_eq!(got, id);
                body
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }

    fn stats(&mut self) -> NetStats {
        match self.call(NetRequest::QueryStats, &[]) {
            NetReply::Stats(s) => s,
            other => panic!("{other:?}"),
        }
    }

    /// Polls the counters until `done` holds (the worker thread counts a frame just after it
    /// moved it).
    fn stats_until(&mut self, done: impl Fn(&NetStats) -> bool) -> NetStats {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.stats();
            if done(&s) {
                return s;
            }
            assert!(Instant::now() < end, "counters never got there: {s:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the exit and returns the status and everything netd wrote to stderr.
    fn finish(&mut self) -> (std::process::ExitStatus, String) {
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "netd did not exit"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let err = self
            .stderr
            .take()
            .map(|h| h.join().expect("stderr reader"))
            .unwrap_or_default();
        (status, err)
    }
}

fn proc_status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status")
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
}

/// The soft limit `/proc/PID/limits` shows for `name`.
fn limit(pid: i32, name: &str) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} missing"));
    line[name.len()..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn setup(link_up: bool) -> NetSetup {
    NetSetup {
        id: "net0".into(),
        mac: MAC,
        num_queues: 2,
        link_up,
    }
}

impl Guest {
    /// Negotiates on the handed socket (every offered feature acked) and sets up both rings.
    fn connect(sock: UnixStream) -> Guest {
        Guest::negotiate(Frontend::from_stream(sock, 2), 0)
    }
}

#[test]
fn a_launched_netd_is_confined_moves_frames_both_ways_and_obeys_set_link() {
    let ns = Netns::new("bhnetw", "bhw", "w", None);
    let far = ns.packet_socket();
    let tap = ns.open_tap();

    let mut w = Worker::launch(2);
    let pid = w.child.pid();
    // Confined before the first frame: own namespaces (pid 1 inside, a network namespace that is
    // neither the test's nor the tap's), seccomp, no_new_privs, no capabilities; its limits
    // are the netd role's for one queue pair.
    let status = proc_status(pid);
    assert_eq!(field(&status, "Seccomp"), "2", "{status}");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    assert_eq!(field(&status, "CapEff"), "0000000000000000");
    let nspid: Vec<&str> = field(&status, "NSpid").split_whitespace().collect();
    assert_eq!(nspid.last(), Some(&"1"), "{status}");
    for kind in ["mnt", "pid", "net", "user", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).expect("ns");
        let ours = std::fs::read_link(format!("/proc/self/ns/{kind}")).expect("ns");
        assert_ne!(theirs, ours, "{kind}");
    }
    let netd_net = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns");
    let tap_net = ns.within(|| std::fs::read_link("/proc/thread-self/ns/net").expect("ns"));
    assert_ne!(netd_net, tap_net, "netd must not be in the tap's namespace");
    assert_eq!(limit(pid, "Max processes"), "6");
    assert_eq!(limit(pid, "Max file size"), "0");

    // Nothing to ask before the setup; the setup brings the tap and the vhost-user socket.
    assert!(matches!(
        w.call(NetRequest::QueryStats, &[]),
        NetReply::Error(_)
    ));
    assert!(matches!(
        w.call(NetRequest::SetLink { up: false }, &[]),
        NetReply::Error(_)
    ));
    let (fe_sock, be_sock) = UnixStream::pair().expect("socketpair");
    assert_eq!(
        w.call(
            NetRequest::Setup(setup(true)),
            &[tap.as_fd(), be_sock.as_fd()]
        ),
        NetReply::Ok
    );
    drop((tap, be_sock));
    let (x, y) = UnixStream::pair().expect("socketpair");
    assert!(matches!(
        w.call(NetRequest::Setup(setup(true)), &[x.as_fd(), y.as_fd()]),
        NetReply::Error(e) if e.contains("already")
    ));
    match w.call(NetRequest::QuerySandbox, &[]) {
        NetReply::Sandbox(r) => {
            assert!(r.entered, "{r:?}");
            assert_eq!(r.mode, "on");
            assert!(r.weak.is_empty(), "{r:?}");
            assert!(r.seccomp_instructions > 100, "{r:?}");
            assert!(r.landlock_abi >= 1, "{r:?}");
        }
        other => panic!("{other:?}"),
    }

    // The front end on the other end of the socketpair.
    let mut g = Guest::connect(fe_sock);
    assert_eq!(g.config(), (MAC, 1), "MAC, link up");

    // guest → tap: the frame appears on the far side byte for byte.
    let out = eth_frame([0xff; 6], MAC, 200, 1);
    g.transmit(TX_BUF, &out);
    assert_eq!(recv_ours(&far, Duration::from_secs(5)), Some(out.clone()));
    g.wait_used(TX, 1, Duration::from_secs(5));

    // tap → guest: into one of the posted 2 KiB buffers, num_buffers 1.
    for i in 0..4u64 {
        g.post(RX, &[(RX_BUF + i * 0x1000, 2048, F_WRITE)]);
    }
    g.kick(RX);
    let inbound = eth_frame(MAC, PEER, 300, 2);
    send_frame(&far, &inbound);
    g.wait_used(RX, 1, Duration::from_secs(5));
    assert_eq!(g.received(0), (1, inbound.clone()));

    let s = w.stats_until(|s| s.tx_frames == 1 && s.rx_frames == 1);
    assert_eq!(
        s,
        NetStats {
            rx_frames: 1,
            rx_bytes: inbound.len() as u64,
            rx_dropped: 0,
            rx_stalls: 0,
            tx_frames: 1,
            tx_bytes: out.len() as u64,
            tx_dropped: 0,
            link_up: true,
        }
    );

    // set_link down: the guest's frame is returned unsent, the far side's is read and dropped,
    // nothing reaches the guest's buffers.
    assert_eq!(w.call(NetRequest::SetLink { up: false }, &[]), NetReply::Ok);
    assert_eq!(
        g.config(),
        (MAC, 0),
        "link bit down in the back end's config"
    );
    let lost_out = eth_frame([0xff; 6], MAC, 100, 3);
    g.transmit(TX_BUF + 0x1000, &lost_out);
    g.wait_used(TX, 2, Duration::from_secs(5));
    assert_eq!(g.used(TX, 1).1, 0);
    let lost_in = eth_frame(MAC, PEER, 100, 4);
    send_frame(&far, &lost_in);
    let s = w.stats_until(|s| s.rx_dropped >= 1 && s.tx_dropped >= 1);
    assert_eq!((s.tx_frames, s.tx_dropped), (1, 1), "{s:?}");
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1), "{s:?}");
    assert!(!s.link_up);
    assert_eq!(recv_ours(&far, Duration::from_millis(300)), None);
    assert_eq!(g.used_idx(RX), 1, "nothing delivered with the link down");

    // set_link up: both ways again; the frame dropped while down does not come late.
    assert_eq!(w.call(NetRequest::SetLink { up: true }, &[]), NetReply::Ok);
    assert_eq!(g.config(), (MAC, 1));
    let out2 = eth_frame([0xff; 6], MAC, 400, 5);
    g.transmit(TX_BUF + 0x2000, &out2);
    assert_eq!(recv_ours(&far, Duration::from_secs(5)), Some(out2.clone()));
    let inbound2 = eth_frame(MAC, PEER, 500, 6);
    send_frame(&far, &inbound2);
    g.wait_used(RX, 2, Duration::from_secs(5));
    assert_eq!(g.received(1), (1, inbound2.clone()));
    let s = w.stats_until(|s| s.tx_frames == 2 && s.rx_frames == 2);
    assert_eq!(
        s,
        NetStats {
            rx_frames: 2,
            rx_bytes: (inbound.len() + inbound2.len()) as u64,
            rx_dropped: 1,
            rx_stalls: 0,
            tx_frames: 2,
            tx_bytes: (out.len() + out2.len()) as u64,
            tx_dropped: 1,
            link_up: true,
        }
    );

    // The front end hangs up: netd says so and exits 0, never having hit its filter, with the
    // final counters in its log.
    drop(g);
    match w.chan.recv().expect("event") {
        (Frame::Event(NetEvent::FrontEndGone), _) => {}
        other => panic!("{other:?}"),
    }
    let (st, err) = w.finish();
    assert_eq!(st.code(), Some(0), "{st:?}: {err}");
    assert!(w.child.violation().is_none(), "{err}");
    assert!(err.contains("sandbox entered"), "{err}");
    assert!(
        err.contains("tx_frames=2 tx_dropped=1 rx_frames=2 rx_dropped=1"),
        "{err}"
    );
}

#[test]
fn bad_setups_are_refused_and_quit_ends_the_worker() {
    // Launched for one queue pair, as the monitor launches a single-queue NIC's netd (`--queues
    // 2`: an odd virtqueue count is no longer accepted).
    let mut w = Worker::launch(2);
    assert_eq!(limit(w.child.pid(), "Max processes"), "6");
    let (_fe, be) = UnixStream::pair().expect("socketpair");
    // Not a tap: refused with the calls netd keeps (TUNSETVNETHDRSZ), not by its filter.
    let null = File::open("/dev/null").expect("null");
    match w.call(NetRequest::Setup(setup(true)), &[null.as_fd(), be.as_fd()]) {
        NetReply::Error(e) => assert!(e.contains("not a tap"), "{e}"),
        other => panic!("{other:?}"),
    }
    // Virtqueues that are no whole number of pairs, more pairs than netd serves (9: nine tap
    // fds and the socket), more pairs than this netd was launched (and sandboxed) for, a
    // multicast MAC.
    for (n, want) in [
        (3, "1 to 8 queue pairs"),
        (18, "1 to 8 queue pairs"),
        (4, "launched for 1 queue pair"),
    ] {
        let mut s = setup(true);
        s.num_queues = n;
        let mut fds = vec![null.as_fd(); s.fd_count() - 1];
        fds.push(be.as_fd());
        match w.call(NetRequest::Setup(s), &fds) {
            NetReply::Error(e) => assert!(e.contains(want), "{n}: {e}"),
            other => panic!("{n}: {other:?}"),
        }
    }
    let mut s = setup(true);
    s.mac = [0x01, 0, 0x5e, 0, 0, 1];
    match w.call(NetRequest::Setup(s), &[null.as_fd(), be.as_fd()]) {
        NetReply::Error(e) => assert!(e.contains("multicast"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        w.call(NetRequest::QuerySandbox, &[]),
        NetReply::Sandbox(r) if r.entered
    ));
    assert_eq!(w.call(NetRequest::Quit, &[]), NetReply::Ok);
    let (st, err) = w.finish();
    assert_eq!(st.code(), Some(0), "{st:?}: {err}");
    assert!(w.child.violation().is_none(), "{err}");
}

#[test]
fn launched_without_namespaces_netd_still_leaves_the_network_it_was_started_in() {
    let ns = Netns::new("bhnetw", "bhw", "n", None);
    let far = ns.packet_socket();
    let tap = ns.open_tap();
    let mut w = Worker::start(2, Some(&ns));
    let pid = w.child.pid();
    let netd_net = std::fs::read_link(format!("/proc/{pid}/ns/net")).expect("ns");
    let tap_net = ns.within(|| std::fs::read_link("/proc/thread-self/ns/net").expect("ns"));
    let ours = std::fs::read_link("/proc/self/ns/net").expect("ns");
    assert_ne!(
        netd_net, tap_net,
        "netd stayed in the namespace it was started in"
    );
    assert_ne!(netd_net, ours);
    let status = proc_status(pid);
    assert_eq!(field(&status, "Seccomp"), "2", "{status}");
    assert_eq!(field(&status, "NoNewPrivs"), "1");
    match w.call(NetRequest::QuerySandbox, &[]) {
        NetReply::Sandbox(r) => {
            assert_eq!(r.mode, "allow-weak");
            assert!(r.weak.iter().any(|m| m.contains("user namespace")), "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    // Still serves the tap it is handed.
    let (fe_sock, be_sock) = UnixStream::pair().expect("socketpair");
    assert_eq!(
        w.call(
            NetRequest::Setup(setup(true)),
            &[tap.as_fd(), be_sock.as_fd()]
        ),
        NetReply::Ok
    );
    drop((tap, be_sock));
    let mut g = Guest::connect(fe_sock);
    let out = eth_frame([0xff; 6], MAC, 64, 7);
    g.transmit(TX_BUF, &out);
    assert_eq!(recv_ours(&far, Duration::from_secs(5)), Some(out));
    assert_eq!(w.call(NetRequest::Quit, &[]), NetReply::Ok);
    let (st, err) = w.finish();
    assert_eq!(st.code(), Some(0), "{st:?}: {err}");
    assert!(err.contains("moved to a new, empty one"), "{err}");
    assert!(w.child.violation().is_none(), "{err}");
}
