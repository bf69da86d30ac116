//! `bulkhead`: the monitor process of the Bulkhead VMM.
//!
//! It parses a QEMU-style command line, optionally daemonizes, creates guest RAM and the serial
//! port's host side, opens `/dev/kvm`, spawns and supervises `bulkhead-vcpu`, and serves QMP
//! until `quit`, a terminating signal, or a guest poweroff. The pieces live in the
//! `bulkhead_monitor` library; this file only wires them together (and is the one place that
//! uses `anyhow`).

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

use bulkhead_ipc::messages::CpuTopology;
use bulkhead_monitor::cli::{self, Action, Config, Machine};
use bulkhead_monitor::fds::{DupLease, FdSets, OpenSpec};
use bulkhead_monitor::info::MachineInfo;
use bulkhead_monitor::launcher::{Launcher, LauncherConfig};
use bulkhead_monitor::qmp::events::EventBus;
use bulkhead_monitor::qmp::server::QmpServer;
use bulkhead_monitor::qmp::session::Shared;
use bulkhead_monitor::vm::{ExitRequest, GuestSpec, Vm};
use bulkhead_monitor::{chardev, confine, daemon, disks, logging, memory, nics, qmp, worker};

fn main() {
    logging::init();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        chardev::restore_tty();
        default_hook(info);
    }));
    let code = match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bulkhead: {e:#}");
            1
        }
    };
    chardev::restore_tty();
    std::process::exit(code);
}

fn real_main() -> anyhow::Result<i32> {
    let mut args = Vec::new();
    for a in std::env::args_os().skip(1) {
        match a.into_string() {
            Ok(s) => args.push(s),
            Err(a) => anyhow::bail!("{}: argument is not valid UTF-8", a.to_string_lossy()),
        }
    }
    match cli::parse(args)? {
        Action::Help => {
            print!("{}", cli::USAGE);
            Ok(0)
        }
        Action::Version => {
            println!(
                "bulkhead version {} (QMP level {}.{}.{})",
                env!("CARGO_PKG_VERSION"),
                qmp::protocol::QMP_VERSION.major,
                qmp::protocol::QMP_VERSION.minor,
                qmp::protocol::QMP_VERSION.micro
            );
            Ok(0)
        }
        Action::Run(cfg) => run(*cfg),
    }
}

fn run(cfg: Config) -> anyhow::Result<i32> {
    // -add-fd takes its inherited fds first (QEMU refuses a close-on-exec one as "in use").
    let fdsets = Arc::new(FdSets::default());
    fdsets.add_inherited(&cfg.add_fds)?;
    // Nothing we inherited may leak into a worker.
    worker::cloexec_inherited_fds();
    raise_fd_limit();
    // Say now (before daemonizing) whether the workers can be confined as configured.
    if cfg.machine == Machine::Bulkhead {
        let warnings = sandbox_config(&cfg).preflight()?;
        for w in warnings {
            if cfg.sandbox == bulkhead_sandbox::Mode::Off {
                eprintln!("bulkhead: WARNING: {w}");
            } else {
                log::warn!("{w}");
            }
        }
    }
    // Fork before any thread exists; the original process waits for `ready` and exits.
    let ready = if cfg.daemonize {
        Some(daemon::daemonize()?)
    } else {
        None
    };
    if let Some(name) = &cfg.process_name {
        set_process_name(name);
    }
    // The launcher: forked while the monitor has one thread and has read nothing from a client;
    // from now on it alone starts workers, so that the monitor can confine itself.
    if cfg.machine == Machine::Bulkhead && cfg.sandbox != bulkhead_sandbox::Mode::Off {
        let launcher = Launcher::start(LauncherConfig {
            vcpu_path: worker::worker_path(cfg.worker_dir.as_deref(), worker::VCPU_WORKER)?,
            blockd_path: blockd_path(&cfg)?,
            netd_path: netd_path(&cfg)?,
            sandbox: sandbox_config(&cfg),
        })?;
        log::debug!("launcher started (pid {})", launcher.pid());
        worker::set_launcher(launcher);
    }
    let pidfile = cfg
        .pidfile
        .as_deref()
        .map(daemon::Pidfile::create)
        .transpose()?;
    let pidfile_path = pidfile.as_ref().map(|p| p.path().to_path_buf());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = rt.block_on(serve(cfg, ready, fdsets, pidfile_path));
    drop(rt);
    worker::stop_launcher();
    drop(pidfile);
    code
}

/// `bulkhead-blockd`'s path: for the configured disks, or for disks QMP may add (`device_add`,
/// when it exists).
fn blockd_path(cfg: &Config) -> anyhow::Result<Option<std::path::PathBuf>> {
    if cfg.machine != Machine::Bulkhead {
        return Ok(None);
    }
    let p = worker::worker_path(cfg.worker_dir.as_deref(), disks::BLOCKD_WORKER)?;
    Ok((!cfg.block.config.devices.is_empty() || p.exists()).then_some(p))
}

/// `bulkhead-netd`'s path: for the configured NICs, or for NICs QMP may add (when it exists).
fn netd_path(cfg: &Config) -> anyhow::Result<Option<std::path::PathBuf>> {
    if cfg.machine != Machine::Bulkhead {
        return Ok(None);
    }
    let p = worker::worker_path(cfg.worker_dir.as_deref(), nics::NETD_WORKER)?;
    Ok((!cfg.net.nics.is_empty() || p.exists()).then_some(p))
}

fn sandbox_config(cfg: &Config) -> worker::SandboxConfig {
    worker::SandboxConfig {
        mode: cfg.sandbox,
        ids: cfg.sandbox_user,
    }
}

/// Raises the soft limit on open files to the hard limit (at most 65536): QMP clients may pass
/// in up to 256 named fds per session and 1024 in fd sets, beyond the common soft limit of 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `lim`, which is valid for writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want = lim.rlim_max.min(65536);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: setrlimit reads one valid rlimit; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            log::warn!(
                "cannot raise the open-file limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn set_process_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes from `buf`.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// Opens what the guest needs: RAM, /dev/kvm, kernel, initrd, serial. Kernel and initrd may be
/// `/dev/fdset/N`; the returned leases keep those duplicates registered with their sets and
/// must live as long as the guest.
async fn build_guest(
    cfg: &Config,
    fdsets: &Arc<FdSets>,
) -> anyhow::Result<(GuestSpec, Vec<DupLease>)> {
    let worker_path = worker::worker_path(cfg.worker_dir.as_deref(), worker::VCPU_WORKER)?;
    let kvm = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/kvm")
        .context("could not open /dev/kvm")?;
    let memory = memory::GuestMemory::create(cfg.mem_size)?;
    let mut leases = Vec::new();
    let mut open = |p: &std::path::Path, what: &str| {
        let (file, lease) = fdsets
            .open(p, OpenSpec::READ)
            .with_context(|| format!("could not open {what} '{}'", p.display()))?
            .into_parts();
        leases.extend(lease);
        anyhow::Ok(file)
    };
    let kernel = match &cfg.kernel {
        Some(k) => open(k, "kernel")?,
        None => anyhow::bail!("no -kernel given"),
    };
    let initrd = cfg
        .initrd
        .as_deref()
        .map(|p| open(p, "initrd"))
        .transpose()?;
    let mut serial = chardev::SerialHost::open(&cfg.serial, fdsets)?;
    serial.start().await?;
    let guest = GuestSpec {
        worker_path,
        kvm,
        memory,
        kernel,
        initrd,
        serial,
        vcpus: cfg.smp.cpus,
        topology: CpuTopology {
            sockets: cfg.smp.sockets,
            dies: cfg.smp.dies,
            cores: cfg.smp.cores,
            threads: cfg.smp.threads,
        },
        cmdline: cfg.append.clone(),
        no_reboot: cfg.no_reboot,
        sandbox: sandbox_config(cfg),
    };
    Ok((guest, leases))
}

async fn serve(
    cfg: Config,
    mut ready: Option<daemon::Ready>,
    fdsets: Arc<FdSets>,
    pidfile: Option<std::path::PathBuf>,
) -> anyhow::Result<i32> {
    // Signals are caught from the start: one arriving during startup (say, while waiting for a
    // wait=on client) ends the monitor cleanly too.
    let mut signals = Signals::new()?;
    let bus = EventBus::new();
    let (exit, mut exit_rx) = ExitRequest::new();
    // Listen first, so a QMP client can connect while the guest is set up (and for wait=on).
    let mut server = QmpServer::bind(&cfg.qmp)?;
    let startup = async {
        let (guest, leases) = match cfg.machine {
            Machine::Bulkhead => {
                let (guest, leases) = build_guest(&cfg, &fdsets).await?;
                (Some(guest), leases)
            }
            Machine::None => (None, Vec::new()),
        };
        // The disks' images, opened now (before the monitor confines itself).
        let disks = disks::Disks::open(
            &cfg.block,
            &fdsets,
            blockd_path(&cfg)?,
            sandbox_config(&cfg),
        )?;
        // The taps (opened or taken now, before the monitor confines itself).
        let nics = nics::Nics::open(&cfg.net, netd_path(&cfg)?, sandbox_config(&cfg))?;
        // query-chardev: the QMP listeners, then the serial port (if the guest has one).
        let mut chardevs = server.chardevs();
        chardevs.extend(guest.as_ref().and_then(|g| g.serial.chardev()));
        // Start-up is done: confine the monitor before the first byte from a client is read
        // (a daemon first finishes the part of detaching that needs the filesystem).
        if let Some(r) = ready.as_mut() {
            r.prepare()?;
        }
        let mut paths = confine::MonitorPaths {
            removed_at_exit: server.socket_paths().to_vec(),
            reopened: Vec::new(),
        };
        paths.removed_at_exit.extend(pidfile.clone());
        if let Some(g) = &guest {
            paths
                .removed_at_exit
                .extend(g.serial.socket_path().map(|p| p.to_path_buf()));
            paths.reopened.push(&g.kernel);
            paths.reopened.extend(g.initrd.as_ref());
        }
        if let Some(r) = confine::confine(cfg.sandbox, &paths)? {
            nics::set_monitor_confined();
            if r.weak.is_empty() {
                log::info!("monitor: {r}");
            } else {
                log::warn!("monitor: {r}");
            }
        }
        drop(paths);
        let (mut vm, handle) = Vm::new(bus.clone(), guest, cfg.no_shutdown, exit.clone());
        vm.set_disks(disks);
        vm.set_nics(nics);
        let info = MachineInfo {
            name: cfg.name.clone(),
            uuid: cfg.uuid.clone(),
            has_guest: cfg.machine == Machine::Bulkhead,
            kvm_present: cfg.machine == Machine::Bulkhead,
            vcpus: match cfg.machine {
                Machine::Bulkhead => cfg.smp.cpus,
                Machine::None => 0,
            },
            chardevs,
            sandbox: Some(cfg.sandbox),
        };
        let mut shared = Shared::new(bus.clone(), handle.clone(), exit.clone(), info);
        shared.fdsets = fdsets.clone();
        let shared = Arc::new(shared);
        server.wait_for_clients(&shared).await?;
        vm.boot(cfg.start_paused).await?;
        if let Some(pid) = vm.worker_pid() {
            log::info!("bulkhead-vcpu (pid {pid}) is ready");
        }
        anyhow::Ok((vm, handle, shared, leases))
    };
    // The leases live as long as the guest may be (re)started from its kernel and initrd.
    let (vm, handle, shared, _leases) = tokio::select! {
        r = startup => r?,
        signo = signals.next() => {
            log::warn!("terminating on signal {signo}");
            return Ok(0);
        }
    };
    let vm_task = tokio::spawn(vm.run());
    server.serve(&shared);
    {
        let vm = handle.clone();
        tokio::spawn(async move {
            loop {
                let signo = signals.next().await;
                vm.signal(signo).await;
            }
        });
    }
    if let Some(ready) = ready {
        ready.notify()?;
    }

    let code = exit_rx.recv().await.unwrap_or(0);

    server.stop();
    handle.terminate().await;
    let _ = vm_task.await;
    bus.close_all();
    bus.drain(Duration::from_secs(1)).await;
    drop(server);
    Ok(code)
}

/// SIGINT, SIGTERM and SIGHUP: QEMU's terminating signals.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let mk = |k| signal(k).context("cannot install signal handlers");
        Ok(Signals {
            int: mk(SignalKind::interrupt())?,
            term: mk(SignalKind::terminate())?,
            hup: mk(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
            _ = self.hup.recv() => libc::SIGHUP,
        }
    }
}
