//! `bulkhead-blockd`: a vhost-user-blk server for one disk image (issue 5), standalone the way
//! `qemu-storage-daemon --export vhost-user-blk` runs: it opens the image and binds the socket,
//! confines itself with the blockd role's sandbox policy, and only then accepts one front end and
//! serves it until it disconnects. Started with `--ipc-fd N` it is the monitor's worker instead
//! (`bulkhead_blockd::worker`: every fd handed over, the whole role policy, ipc control). See
//! docs/ARCHITECTURE.md, "blockd".

use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use bulkhead_blockd::backend::BlockBackend;
use bulkhead_blockd::errors::Policies;
use bulkhead_blockd::format::{open_image, Cache, DiskImage, DIRECT_ALIGN};
use bulkhead_blockd::options::Options;
use bulkhead_blockd::worker;
use bulkhead_sandbox::enter::Mode;
use bulkhead_sandbox::standalone;
use bulkhead_sandbox::Role;
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulkhead-blockd: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn run() -> Result<()> {
    // Launched by the monitor (`--ipc-fd` first): see `bulkhead_blockd::worker`.
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

    // Everything that needs a path happens here, before the sandbox: the image and, for qcow2,
    // its backing chain.
    let direct = o.cache == Cache::None;
    let disk: Arc<dyn DiskImage> =
        open_image(std::path::Path::new(&o.file), o.format, o.readonly, o.cache)
            .with_context(|| format!("image {} ({})", o.file, o.format.name()))?
            .into();
    let mut listener =
        Listener::new(&o.socket, true).with_context(|| format!("binding {}", o.socket))?;

    // One malloc arena: glibc shrinks the heaps of per-thread arenas after large frees and, the
    // first time, reads /proc/sys/vm/overcommit_memory to decide how: an openat the sandbox
    // refuses. The main arena trims with brk only.
    // SAFETY: mallopt with integer arguments, before any other thread exists.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        return Err(anyhow!("mallopt(M_ARENA_MAX, 1) failed"));
    }

    // Standalone: the blockd role's policy minus the launcher's part (see
    // `bulkhead_sandbox::standalone` and docs/ARCHITECTURE.md, "blockd").
    let report = standalone::enter(Role::Blockd, o.max_guest_mem, mode, hook.as_ref())
        .context("entering the blockd sandbox")?;
    eprintln!("bulkhead-blockd: {report}");

    let block_size = if direct { DIRECT_ALIGN as u32 } else { 512 };
    // No monitor to resume a stopped device: both policies are `report`.
    let backend = Arc::new(
        BlockBackend::new(
            disk,
            o.serial.into_bytes(),
            o.num_queues,
            block_size,
            Policies::default(),
        )
        .context("creating the back end")?,
    );
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    // Tests only: the attempt runs here, confined, holding everything it holds in service
    // (the listening socket and the image fds), instead of starting the daemon's threads and
    // accepting a front end.
    #[cfg(feature = "attack-hook")]
    if let Some(h) = hook {
        bulkhead_sandbox::attack::run_and_report(
            h.which,
            Role::Blockd,
            &h.target,
            libc::STDOUT_FILENO,
        );
        std::process::exit(0);
    }
    let mut daemon = VhostUserDaemon::new("bulkhead-blockd".into(), backend.clone(), mem)
        .map_err(|e| anyhow!("creating the vhost-user daemon: {e}"))?;
    backend
        .attach(&daemon.get_epoll_handlers())
        .context("registering the queue threads' wake events")?;
    eprintln!("bulkhead-blockd: listening on {}", o.socket);
    daemon
        .start(&mut listener)
        .map_err(|e| anyhow!("accepting the front end: {e}"))?;
    // The listener would unlink its path when dropped: a path operation the sandbox refuses
    // (landlock and seccomp). The socket file stays behind, as after a kill.
    std::mem::forget(listener);
    let r = daemon.wait();
    for h in daemon.get_epoll_handlers() {
        h.send_exit_event();
    }
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
