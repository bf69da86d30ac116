//! Worker mode: `bulkhead-netd --ipc-fd N [--sandbox on|off|allow-weak] [--mem-bytes N]
//! [--queues N]`, the back end of one NIC as the monitor launches it.
//!
//! The monitor's launcher starts it in its own namespaces — an empty network namespace among
//! them: netd never has the host's network, only its tap fd — with its end of an ipc
//! `SOCK_SEQPACKET` pair at fd 3 and the violation-report pipe at fd 4, nothing else. Before it
//! reads a single frame it confines itself with the netd role's whole policy
//! ([`bulkhead_sandbox::enter`]: empty root, no capabilities, rlimits sized by `--mem-bytes` and
//! `--queues`, `RLIMIT_FSIZE` 0, landlock with no filesystem access, seccomp). It never opens a
//! path: the monitor's [`NetRequest::Setup`] brings the tap fd (opened by the monitor with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; netd only sets the vnet header size and offloads) and
//! the connected vhost-user socket whose other end is the front end (vcpu-proc's virtio-pci
//! transport). netd serves that socket with `vhost-user-backend`
//! (`VhostUserDaemon::start_with_stream`, see third_party/vhost-user-backend) and keeps
//! answering the monitor on the ipc channel: data-path counters, `set_link`, its sandbox report,
//! quit. It exits 0 when the front end hangs up (after a [`NetEvent::FrontEndGone`]), when the
//! monitor goes, or on `Quit`.
//!
//! No relay (`crate::relay`) here: it exists for QEMU 7.2, which sends `SET_VRING_ENABLE`
//! before `SET_FEATURES`; vcpu-proc's front end (`vhost::vhost_user::Frontend`) sends
//! `SET_FEATURES` first, as the spec asks, so the crate is given the socket directly (two
//! threads fewer, no socket pair to make before the sandbox).

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bulkhead_ipc::messages::{NetEvent, NetProtocol, NetReply, NetRequest, NetSetup, NetStats};
use bulkhead_ipc::{Channel, Frame, Role as IpcRole};
use bulkhead_sandbox::{Mode, Role};
use bulkhead_worker::sandbox_report;
use bulkhead_worker::setup_err;
pub use bulkhead_worker::{WorkerArgs, WorkerError};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{tap_event, NetBackend, MAX_PAIRS, NUM_QUEUES};
use crate::tap::Tap;

/// Usage of worker mode.
pub const USAGE: &str = "usage: bulkhead-netd --ipc-fd N [--sandbox on|off|allow-weak] \
[--mem-bytes N] [--queues N (virtqueues: 2 per queue pair, 2 to 16, even)] \
(launched by the bulkhead monitor)";

/// Worker mode is selected by `--ipc-fd` as the first argument ([`WorkerArgs::parse`], with
/// `--queues` a whole number of queue pairs: 2 to `NUM_QUEUES * MAX_PAIRS` virtqueues, even, as
/// the monitor's launcher allows); `None` otherwise (the standalone command line).
pub fn parse_args(args: &[String]) -> Option<Result<WorkerArgs, WorkerError>> {
    let explicit_queues = args.iter().any(|a| a == "--queues");
    WorkerArgs::parse(args, (NUM_QUEUES * MAX_PAIRS) as u32).map(|r| {
        r.map_err(|e| e.0)
            .and_then(|a| {
                // Without --queues the sandbox is sized for one pair (the default 1).
                if explicit_queues && a.params.queues as usize % NUM_QUEUES != 0 {
                    return Err(format!(
                        "--queues {}: virtqueues come in queue pairs ({NUM_QUEUES} each, at \
                         most {MAX_PAIRS} pairs)",
                        a.params.queues
                    ));
                }
                Ok(a)
            })
            .map_err(|m| WorkerError::Usage {
                message: bulkhead_worker::args::ArgsError(m),
                usage: USAGE,
            })
    })
}

/// The queue pairs a netd launched with `--queues virtqueues` was sized for (its
/// `RLIMIT_NPROC`; as the sandbox policy counts them).
fn launched_pairs(virtqueues: u32) -> usize {
    (virtqueues.max(1) as usize).div_ceil(NUM_QUEUES)
}

/// The interfaces other than `lo` in this process's network namespace, from the
/// `/proc/self/net/dev` text `dev` (two header lines, then `name: counters...` per interface).
pub fn foreign_interfaces(dev: &str) -> Vec<String> {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_string()))
        .filter(|n| !n.is_empty() && n != "lo")
        .collect()
}

/// netd must not reach any network but through its tap. The launcher gives it an empty network
/// namespace; when it did not (`--sandbox allow-weak` on a host without user namespaces, so no
/// namespaces at all), netd leaves the one it was started in if it may (`unshare(CLONE_NEWNET)`
/// needs root there). Returns a line for the log, or `None` when the namespace is already empty.
fn ensure_empty_network(mode: Mode) -> Result<Option<String>, WorkerError> {
    if mode == Mode::Off {
        return Ok(None);
    }
    let dev = std::fs::read_to_string("/proc/self/net/dev")
        .map_err(setup_err("reading /proc/self/net/dev"))?;
    let found = foreign_interfaces(&dev);
    if found.is_empty() {
        return Ok(None);
    }
    // SAFETY: unshare with a namespace flag only affects this process; no other thread exists.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        return Ok(Some(format!(
            "started in a network namespace with {found:?}: moved to a new, empty one"
        )));
    }
    let e = std::io::Error::last_os_error();
    if mode == Mode::On {
        return Err(WorkerError::Setup {
            what: "leaving the host's network namespace",
            source: Box::new(e),
        });
    }
    Ok(Some(format!(
        "WEAKER: still in a network namespace with {found:?}: {e}"
    )))
}

/// The counters as the monitor sees them.
fn net_stats(b: &NetBackend) -> NetStats {
    let s = &b.stats;
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    NetStats {
        rx_frames: g(&s.rx_frames),
        rx_bytes: g(&s.rx_bytes),
        rx_dropped: g(&s.rx_dropped),
        rx_stalls: g(&s.rx_stalls),
        tx_frames: g(&s.tx_frames),
        tx_bytes: g(&s.tx_bytes),
        tx_dropped: g(&s.tx_dropped),
        link_up: b.link_up(),
    }
}

/// Checks a setup before anything is started.
fn check_setup(s: &NetSetup) -> Result<(), String> {
    let n = usize::from(s.num_queues);
    if n == 0 || n % NUM_QUEUES != 0 || n / NUM_QUEUES > MAX_PAIRS {
        return Err(format!(
            "{} virtqueues: netd serves 1 to {MAX_PAIRS} queue pairs ({NUM_QUEUES} virtqueues \
             each)",
            s.num_queues
        ));
    }
    if s.mac[0] & 1 != 0 {
        return Err("the MAC address is a multicast address".into());
    }
    Ok(())
}

/// The running back end: the daemon's threads serve the front end.
struct Serving {
    id: String,
    backend: Arc<NetBackend>,
}

fn start_serving(
    s: &NetSetup,
    fds: Vec<OwnedFd>,
    chan: &Arc<Channel<NetProtocol>>,
    launched: usize,
) -> Result<Serving, String> {
    check_setup(s)?;
    let pairs = usize::from(s.num_queues) / NUM_QUEUES;
    if pairs > launched {
        // Its sandbox (RLIMIT_NPROC: a thread per pair) was sized for `launched` pairs.
        return Err(format!(
            "{} virtqueues: this netd was launched for {launched} queue pair(s)",
            s.num_queues
        ));
    }
    if fds.len() != s.fd_count() {
        return Err(format!(
            "the setup carries {} fds, not {} (a tap queue per pair and the socket)",
            fds.len(),
            s.fd_count()
        ));
    }
    let mut fds = fds;
    let Some(vhost) = fds.pop() else {
        return Err("the setup lacks its fds".into());
    };
    let taps = fds
        .into_iter()
        .enumerate()
        .map(|(i, fd)| Tap::from_monitor(fd).map_err(|e| format!("tap queue {i}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let vhost = UnixStream::from(vhost);
    let backend = Arc::new(NetBackend::with_queues(taps, s.mac));
    backend.set_link(s.link_up);
    let tap_fds = backend.tap_fds();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new("bulkhead-netd".into(), backend.clone(), mem)
        .map_err(|e| format!("creating the vhost-user daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    if handlers.len() != pairs {
        return Err("the daemon has no worker thread per queue pair".into());
    }
    // Pair i's tap queue is watched by pair i's worker thread.
    for (handler, fd) in handlers.iter().zip(&tap_fds) {
        handler
            .register_listener(
                *fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(tap_event(pairs)),
            )
            .map_err(|e| format!("watching the tap: {e}"))?;
    }
    daemon
        .start_with_stream(vhost)
        .map_err(|e| format!("serving the front end: {e}"))?;
    let chan = chan.clone();
    let id = s.id.clone();
    let logged = backend.clone();
    std::thread::Builder::new()
        .name("frontend-wait".into())
        .spawn(move || {
            let r = daemon.wait();
            for h in daemon.get_epoll_handlers() {
                h.send_exit_event();
            }
            // Dropping the daemon joins its worker thread: the counters below are final.
            drop(daemon);
            let stats = logged.stats_line();
            match r.map_err(|e| e.to_string()) {
                Err(e) if !e.contains("disconnect") && !e.contains("partial") => {
                    log::warn!("{id}: the front end session ended: {e}; {stats}")
                }
                // A front end that goes away is the normal end of a session.
                _ => log::info!("{id}: the front end hung up; {stats}"),
            }
            let _ = chan.send_event(NetEvent::FrontEndGone);
            std::process::exit(0);
        })
        .map_err(|e| format!("starting a thread: {e}"))?;
    Ok(Serving {
        id: s.id.clone(),
        backend,
    })
}

/// Worker mode's `main`: confine, then serve the monitor's requests until it goes or says quit.
pub fn run(a: WorkerArgs) -> Result<(), WorkerError> {
    let report_fd = bulkhead_worker::confine::prepare(a.ipc_fd, &[])?;
    bulkhead_worker::confine::one_malloc_arena()?;
    let moved = ensure_empty_network(a.mode)?;
    let report = bulkhead_sandbox::enter(Role::Netd.policy(), &a.params, a.mode, report_fd)
        .map_err(setup_err("sandbox"))?;
    if let Some(m) = moved {
        log::warn!("{m}");
    }
    bulkhead_worker::confine::log_entered(module_path!(), a.mode, &report);
    // SAFETY: the monitor handed us this fd as our end of the ipc socketpair; every other
    // inherited fd but the report pipe was just closed, so nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(a.ipc_fd) };
    let chan = Arc::new(Channel::<NetProtocol>::from_fd(sock));
    chan.handshake(IpcRole::Net, IpcRole::Monitor)?;
    let launched = launched_pairs(a.params.queues);
    let mut serving: Option<Serving> = None;
    loop {
        let (frame, fds) = match chan.recv() {
            Ok(v) => v,
            Err(bulkhead_ipc::Error::PeerClosed) => {
                log::info!("the monitor closed the channel; exiting");
                std::process::exit(0);
            }
            Err(e) => return Err(e.into()),
        };
        let (id, req) = match frame {
            Frame::Request { id, body } => (id, body),
            other => {
                return Err(bulkhead_ipc::Error::Protocol(format!(
                    "unexpected frame from the monitor: {other:?}"
                ))
                .into())
            }
        };
        let reply = match req {
            NetRequest::Setup(s) if serving.is_none() => {
                match start_serving(&s, fds, &chan, launched) {
                    Ok(sv) => {
                        let m = s.mac;
                        log::info!(
                        "{}: serving MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}, link {}, {} \
                         queue pair(s)",
                        s.id,
                        m[0],
                        m[1],
                        m[2],
                        m[3],
                        m[4],
                        m[5],
                        if s.link_up { "up" } else { "down" },
                        usize::from(s.num_queues) / NUM_QUEUES
                    );
                        serving = Some(sv);
                        NetReply::Ok
                    }
                    Err(e) => NetReply::Error(e),
                }
            }
            NetRequest::Setup(_) => NetReply::Error("already set up".into()),
            NetRequest::QueryStats => match &serving {
                Some(sv) => NetReply::Stats(net_stats(&sv.backend)),
                None => NetReply::Error("not set up".into()),
            },
            NetRequest::SetLink { up } => match &serving {
                Some(sv) => {
                    sv.backend.set_link(up);
                    log::info!("{}: link {}", sv.id, if up { "up" } else { "down" });
                    NetReply::Ok
                }
                None => NetReply::Error("not set up".into()),
            },
            NetRequest::QuerySandbox => NetReply::Sandbox(sandbox_report()),
            NetRequest::Quit => {
                let _ = chan.reply(id, NetReply::Ok, &[]);
                match &serving {
                    Some(sv) => log::info!("{}: quit; {}", sv.id, sv.backend.stats_line()),
                    None => log::info!("quit"),
                }
                std::process::exit(0);
            }
        };
        chan.reply(id, reply, &[])?;
    }
}

/// Logs to stderr (the monitor's log) at the level `BULKHEAD_LOG` names (default info), as
/// every worker does ([`bulkhead_worker::logger`]).
pub fn init_logger() {
    bulkhead_worker::logger::init("bulkhead-netd");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args(s: &str) -> Option<Result<WorkerArgs, WorkerError>> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        parse_args(&v)
    }

    /// The parsing itself is `bulkhead_worker::args`'s (tested there); here, what is this
    /// program's: its standalone command line and its queue bound.
    #[test]
    fn worker_mode_is_chosen_by_ipc_fd_first() {
        assert!(args("--socket /s --tap t").is_none());
        let a = args("--ipc-fd 3 --sandbox allow-weak --queues 2")
            .unwrap()
            .unwrap();
        assert_eq!((a.ipc_fd, a.mode, a.params.queues), (3, Mode::AllowWeak, 2));
        let a = args("--ipc-fd 3 --queues 16").unwrap().unwrap();
        assert_eq!((a.params.queues, launched_pairs(a.params.queues)), (16, 8));
        // Without --queues: sized for one pair, as before multiqueue.
        let a = args("--ipc-fd 3").unwrap().unwrap();
        assert_eq!(launched_pairs(a.params.queues), 1);
        // Virtqueues come in pairs (as the launcher spawns netd), at most 8 pairs.
        for bad in [
            "--ipc-fd 3 --queues 1",
            "--ipc-fd 3 --queues 3",
            "--ipc-fd 3 --queues 0",
            "--ipc-fd 3 --queues 18",
            "--ipc-fd 3 --tap t",
        ] {
            assert!(
                matches!(args(bad), Some(Err(WorkerError::Usage { .. }))),
                "{bad}"
            );
        }
    }

    #[test]
    fn setups_are_checked() {
        let ok = NetSetup {
            id: "net0".into(),
            mac: [2, 0, 0, 0, 0, 1],
            num_queues: 2,
            link_up: true,
        };
        assert!(check_setup(&ok).is_ok());
        // Multiqueue: 1 to MAX_PAIRS queue pairs, two virtqueues each.
        for n in [4, 2 * MAX_PAIRS as u16] {
            let mut s = ok.clone();
            s.num_queues = n;
            assert!(check_setup(&s).is_ok(), "{n}");
        }
        for n in [0, 1, 3, 2 * MAX_PAIRS as u16 + 2] {
            let mut s = ok.clone();
            s.num_queues = n;
            assert!(
                check_setup(&s).unwrap_err().contains("1 to 8 queue pairs"),
                "{n}"
            );
        }
        let mut s = ok;
        s.mac[0] = 1;
        assert!(check_setup(&s).unwrap_err().contains("multicast"));
    }

    #[test]
    fn interfaces_other_than_loopback_are_found() {
        let empty =
            "Inter-|   Receive |  Transmit\n face |bytes    packets\n    lo:       0       0\n";
        assert!(foreign_interfaces(empty).is_empty());
        let host = format!("{empty}  eth0: 123 4 0 0\nbr-x1:0 0\n");
        assert_eq!(foreign_interfaces(&host), ["eth0", "br-x1"]);
    }
}
