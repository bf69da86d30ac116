//! `bulkhead-netd`: a vhost-user-net server on one tap (issue 6), standalone: it opens the tap
//! (or takes an inherited tap fd) and binds the socket, leaves the host's network namespace,
//! confines itself with the netd role's sandbox policy, and only then accepts one front end and
//! serves it until it disconnects. The connection is relayed to the vhost crate's handler
//! ([`bulkhead_netd::relay`]) so that QEMU 7.2's early `SET_VRING_ENABLE` is accepted. Started
//! with `--ipc-fd N` it is the monitor's worker instead (`bulkhead_netd::worker`: the tap and the
//! connected socket handed over, the whole role policy, ipc control). See docs/ARCHITECTURE.md,
//! "netd".

use std::os::unix::net::UnixStream;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use bulkhead_netd::backend::{tap_event, NetBackend};
use bulkhead_netd::confine;
use bulkhead_netd::options::{Options, TapSource};
use bulkhead_netd::relay::Relay;
use bulkhead_netd::tap::Tap;
use bulkhead_netd::worker;
use bulkhead_sandbox::enter::Mode;
use bulkhead_sandbox::standalone;
use bulkhead_sandbox::Role;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

fn main() {
    match run() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("bulkhead-netd: {e:#}");
            std::process::exit(1)
        }
    }
}

fn run() -> Result<()> {
    // Launched by the monitor (`--ipc-fd` first): see `bulkhead_netd::worker`.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(a) = worker::parse_args(&argv) {
        worker::init_logger();
        return worker::run(a?).map_err(|e| anyhow!("{e}"));
    }
    #[cfg(feature = "attack-hook")]
    let (hook, args) =
        bulkhead_sandbox::attack::Hook::take(std::env::args().skip(1)).map_err(|e| anyhow!(e))?;
    #[cfg(not(feature = "attack-hook"))]
    let (hook, args): (Option<standalone::AttackHook>, _) = (None, std::env::args().skip(1));
    let o = match Options::parse(args) {
        Ok(o) => o,
        Err(e) => return Err(anyhow!("{e}")),
    };
    let mode = Mode::from_name(&o.sandbox)
        .ok_or_else(|| anyhow!("--sandbox {}: on, off or allow-weak", o.sandbox))?;

    // Everything that needs a path or the host network happens here, before the sandbox.
    let taps = match &o.tap {
        TapSource::Name(n, q) => {
            Tap::open_queues(n, *q).with_context(|| format!("opening tap {n}"))?
        }
        TapSource::Fds(fds) => {
            let mut taps = Vec::with_capacity(fds.len());
            for fd in fds {
                // SAFETY: the fd was handed to us on the command line (each once, checked by
                // the options); nothing else in this process owns it.
                let tap = unsafe { Tap::from_raw_fd(*fd) };
                taps.push(tap.with_context(|| format!("taking tap fd {fd}"))?);
            }
            Tap::check_queues(&taps).context("the tap fds")?;
            taps
        }
    };
    let ifname = taps.first().and_then(|t| t.name().ok()).unwrap_or_default();
    let pairs = taps.len();
    let listener =
        Listener::new(&o.socket, true).with_context(|| format!("binding {}", o.socket))?;

    if mode != Mode::Off {
        match (confine::leave_host_network(), mode) {
            (Ok(how), _) => eprintln!("bulkhead-netd: {how}"),
            (Err(e), Mode::AllowWeak) => {
                eprintln!("bulkhead-netd: WEAKER: still in the host's network namespace: {e}")
            }
            (Err(e), _) => return Err(anyhow!("leaving the host network namespace: {e}")),
        }
    }
    // The daemon's end and the relay's end of the connection the crate serves (see `relay`):
    // made here because the sandbox allows no `socketpair`.
    let (relay_end, daemon_end) = UnixStream::pair().context("making the relay socket pair")?;
    let virtqueues = u32::try_from(2 * pairs).unwrap_or(u32::MAX);
    let report =
        standalone::enter_with_queues(Role::Netd, o.max_guest_mem, virtqueues, mode, hook.as_ref())
            .context("entering the netd sandbox")?;
    eprintln!("bulkhead-netd: {report}");

    let backend = Arc::new(NetBackend::with_queues(taps, o.mac));
    let tap_fds = backend.tap_fds();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    // Tests only: the attempt runs here, confined, holding everything it holds in service
    // (the listening socket and the tap fd, in its empty network namespace), instead of starting
    // the daemon's threads and accepting a front end.
    #[cfg(feature = "attack-hook")]
    if let Some(h) = hook {
        bulkhead_sandbox::attack::run_and_report(
            h.which,
            Role::Netd,
            &h.target,
            libc::STDOUT_FILENO,
        );
        std::process::exit(0);
    }
    let mut daemon = VhostUserDaemon::new("bulkhead-netd".into(), backend.clone(), mem)
        .map_err(|e| anyhow!("creating the vhost-user daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    if handlers.len() != tap_fds.len() {
        return Err(anyhow!("the daemon has no worker thread per queue pair"));
    }
    // Pair i's tap queue is watched by pair i's worker thread.
    for (handler, fd) in handlers.iter().zip(&tap_fds) {
        handler
            .register_listener(
                *fd,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                u64::from(tap_event(pairs)),
            )
            .context("watching the tap")?;
    }
    eprintln!(
        "bulkhead-netd: tap {ifname} ({pairs} queue pair{}), listening on {}",
        if pairs == 1 { "" } else { "s" },
        o.socket
    );
    let front = loop {
        match listener.accept() {
            Ok(Some(s)) => break s,
            Ok(None) => continue,
            Err(e) => return Err(anyhow!("accepting the front end: {e}")),
        }
    };
    daemon
        .start_with_stream(daemon_end)
        .map_err(|e| anyhow!("starting the vhost-user daemon: {e}"))?;
    let relay = Relay::start(front, relay_end).context("starting the relay")?;
    let r = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
    let relayed = relay.join();
    // Dropping the daemon joins its worker thread, so the counters below are final (a frame the
    // worker has just written to the tap is counted).
    drop(daemon);
    eprintln!("bulkhead-netd: {}", backend.stats_line());
    // The listener is not dropped: its drop unlinks the socket path, which the sandbox refuses
    // (no unlink in the allowlist, no filesystem in landlock). The path stays; the next start
    // replaces it.
    std::mem::forget(listener);
    relayed.context("relaying the front end's messages")?;
    match r {
        Ok(()) => Ok(()),
        Err(e) => {
            let s = e.to_string();
            // A front end that goes away is the normal end of a session.
            if s.contains("disconnect") || s.contains("Disconnect") || s.contains("partial") {
                Ok(())
            } else {
                Err(anyhow!("serving the front end: {s}"))
            }
        }
    }
}
