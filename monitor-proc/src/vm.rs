//! VM control: the run-state machine and the client side of the vCPU worker.
//!
//! One task (the VM actor, [`Vm::run`]) owns the state, the worker process and its channel.
//! QMP commands reach it through a [`VmHandle`] and are executed one at a time, as QEMU executes
//! them under its big lock; the actor also watches the worker's events and its exit, so a dying
//! worker is noticed at once, even while no command is in flight.
//!
//! States are QEMU's (`query-status`): `prelaunch` (`-S`, or after a reset of a stopped
//! machine), `running`, `paused`, `shutdown` (guest poweroff under `-no-shutdown`),
//! `internal-error` (the worker died or reported an unrecoverable error) and `io-error` (a disk
//! request failed under the `stop` policy, [`crate::io_error`]). Transitions follow
//! QEMU 7.2:
//!
//! | command / event       | effect                                                              |
//! |-----------------------|---------------------------------------------------------------------|
//! | `stop`                | running → paused + STOP; no-op in any other state                   |
//! | `cont`                | prelaunch/paused/io-error → running + RESUME (I/O statuses reset,   |
//! |                       | blockds sent `Resume` first); no-op when running; error in        |
//! |                       | shutdown/internal-error ("Resetting the Virtual Machine is required")|
//! | `system_reset`        | RESET(host-qmp-system-reset); a machine that is not running ends up |
//! |                       | in prelaunch; a dead worker is restarted (fresh setup)             |
//! | `quit`                | SHUTDOWN(host-qmp-quit), then the monitor exits 0                   |
//! | SIGINT/SIGTERM/SIGHUP | SHUTDOWN(host-signal), then the monitor exits 0                     |
//! | guest poweroff        | SHUTDOWN(guest-shutdown), exit 0; under `-no-shutdown`: STOP and    |
//! |                       | state shutdown                                                      |
//! | guest reset           | RESET(guest-reset), then the unplugs the guest had not done yet     |
//! | `system_powerdown`    | the guest's ACPI power button; POWERDOWN after the reply (any state)|
//! | `device_del` (has run)| an eject request to the guest; DEVICE_DELETED when it ejects (or at |
//! |                       | the next reset / new machine worker), see [`crate::hotplug`]        |
//! | worker internal error | STOP (if running), internal-error                                   |
//! | disk I/O error        | BLOCK_IO_ERROR; action `stop` on a running VM: vCPUs paused, STOP,  |
//! |                       | io-error (`cont` resumes the disks' held requests, then the vCPUs) |
//! | worker death          | logged with its status or signal (and the refused system call after |
//! |                       | a seccomp kill); X_WORKER_EXITED; STOP (if running), internal-error |
//!
//! With `-M none` there is no worker: the same transitions happen on the state alone, as QEMU
//! does for its `none` machine.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bulkhead_ipc::messages::{CpuInfo, CpuTopology, SandboxReport, VcpuRequest, VmSetup};
use bulkhead_ipc::messages::{ShutdownCause as GuestCause, VcpuEvent, VcpuProtocol, VcpuReply};
use bulkhead_ipc::rpc::EventItem;
use bulkhead_ipc::{AsyncChannel, Role, RpcClient};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::chardev::{reopen_readonly, SerialHost};
use crate::disks::{BlockView, BlockdExit, BlockdIoError, Disks, DisksError, ThrottleArgs};
use crate::hotplug::Unplugs;
use crate::memory::GuestMemory;
use crate::nics::{NetAnswer, NetOp, NetdExit, Nics, NicsError, VcpuCtx};
use crate::qmp::events::{Event, EventBus, ShutdownCause, WorkerExit};
use crate::qmp::protocol::QmpError;
use crate::worker::{self, SandboxConfig, WorkerError, WorkerProcess};

/// How long the worker has for the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the worker has to build the VM.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the worker has to answer run/pause/reset; after that it is killed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker whose channel closed may take to exit before it is killed.
const CHANNEL_GRACE: Duration = Duration::from_millis(200);
/// How long `quit` waits for the worker to exit by itself.
const QUIT_TIMEOUT: Duration = Duration::from_secs(2);

/// QEMU's run states (the subset Bulkhead reaches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Not started yet (`-S`), or reset while stopped.
    Prelaunch,
    /// vCPUs running.
    Running,
    /// Stopped by `stop`.
    Paused,
    /// The guest powered off (`-no-shutdown`).
    Shutdown,
    /// The worker died or cannot continue.
    InternalError,
    /// A disk's request failed under the `stop` policy (`werror`/`rerror`): paused until `cont`.
    IoError,
}

impl RunState {
    /// The QAPI `RunState` name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
        }
    }
}

/// One vCPU as the worker reported it, placed in the `-smp` topology as QEMU numbers it
/// (`query-cpus`, `query-cpus-fast`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuInfo {
    /// vCPU index (QEMU's `cpu-index`).
    pub index: u32,
    /// Host thread id of its thread in `bulkhead-vcpu`.
    pub thread_id: i32,
    /// Halted (waiting for an interrupt) when sampled.
    pub halted: bool,
    /// Instruction pointer when sampled.
    pub pc: u64,
    /// Socket.
    pub socket_id: u32,
    /// Die within the socket; only when `-smp` has more than one die per socket (as QEMU
    /// reports `die-id`).
    pub die_id: Option<u32>,
    /// Core within the die.
    pub core_id: u32,
    /// Thread within the core.
    pub thread_in_core: u32,
}

/// A running worker as `x-query-sandbox` lists it: what the monitor knows (role, pid, the
/// policy it was given) and what the worker itself reported about its sandbox.
#[derive(Debug, Clone)]
pub struct WorkerSandbox {
    /// Its role.
    pub role: bulkhead_sandbox::Role,
    /// Its pid as the monitor sees it.
    pub pid: u32,
    /// How it was launched (`--sandbox`).
    pub mode: bulkhead_sandbox::Mode,
    /// What it reported (`None`: it did not answer; the error says why).
    pub report: Result<SandboxReport, String>,
}

/// Checks the worker's vCPU list against the configuration and places each vCPU. The worker
/// counts cores per socket (dies folded in); QEMU counts them per die.
fn place_cpus(
    mut list: Vec<CpuInfo>,
    vcpus: u32,
    topology: CpuTopology,
) -> Result<Vec<VcpuInfo>, String> {
    list.sort_by_key(|c| c.index);
    let indexes: Vec<u32> = list.iter().map(|c| c.index).collect();
    let expected: Vec<u32> = (0..vcpus).collect();
    if indexes != expected {
        return Err(format!(
            "the vCPU worker reported vCPUs {indexes:?}, expected 0 to {}",
            vcpus.saturating_sub(1)
        ));
    }
    let cores = topology.cores.max(1);
    Ok(list
        .into_iter()
        .map(|c| {
            let (die_id, core_id) = if topology.dies > 1 {
                (Some(c.core_id / cores), c.core_id % cores)
            } else {
                (None, c.core_id)
            };
            VcpuInfo {
                index: c.index,
                thread_id: c.thread_id,
                halted: c.halted,
                pc: c.pc,
                socket_id: c.socket_id,
                die_id,
                core_id,
                thread_in_core: c.thread_in_core,
            }
        })
        .collect())
}

/// The host thread id of each thread of process `pid` by its thread id in the process's own
/// pid namespace (from `NSpid` in `/proc/PID/task/*/status`): a sandboxed worker sees its own
/// thread ids, management stacks need the host's (for affinity and cgroups). Without a pid
/// namespace both are the same.
fn host_tids(pid: u32) -> std::collections::HashMap<i32, i32> {
    let mut map = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return map;
    };
    for entry in dir.flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let Some(line) = status.lines().find_map(|l| l.strip_prefix("NSpid:")) else {
            continue;
        };
        let ids: Vec<i32> = line
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if let (Some(&host), Some(&inner)) = (ids.first(), ids.last()) {
            map.insert(inner, host);
        }
    }
    map
}

/// Errors bringing up the worker.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Spawning failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The channel failed.
    #[error("bulkhead-vcpu (pid {pid}): {source}")]
    Ipc {
        /// The worker.
        pid: u32,
        /// The ipc error.
        source: bulkhead_ipc::Error,
    },
    /// The worker did not answer in time.
    #[error("bulkhead-vcpu (pid {pid}) did not complete the {what} within {secs} s")]
    Timeout {
        /// The worker.
        pid: u32,
        /// The step.
        what: &'static str,
        /// The limit.
        secs: u64,
    },
    /// The worker refused the setup.
    #[error("bulkhead-vcpu (pid {pid}) could not set up the VM: {msg}")]
    Refused {
        /// The worker.
        pid: u32,
        /// Its message.
        msg: String,
    },
    /// The worker died during startup.
    #[error("bulkhead-vcpu (pid {pid}) {status} during {what}")]
    Died {
        /// The worker.
        pid: u32,
        /// How it ended.
        status: String,
        /// The step.
        what: &'static str,
    },
    /// A disk's back end could not be started.
    #[error(transparent)]
    Disks(#[from] DisksError),
    /// A NIC's back end could not be started.
    #[error(transparent)]
    Nics(#[from] NicsError),
    /// Reopening the kernel or initrd failed.
    #[error("cannot reopen {what}: {source}")]
    Reopen {
        /// Which file.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Everything needed to (re)start the vCPU worker for the configured guest.
pub struct GuestSpec {
    /// `bulkhead-vcpu`'s absolute path.
    pub worker_path: PathBuf,
    /// `/dev/kvm`, opened `O_RDWR | O_CLOEXEC`.
    pub kvm: File,
    /// Guest RAM.
    pub memory: GuestMemory,
    /// The kernel image.
    pub kernel: File,
    /// The initrd.
    pub initrd: Option<File>,
    /// The serial port's host side.
    pub serial: SerialHost,
    /// vCPUs.
    pub vcpus: u32,
    /// How `-smp` arranged them.
    pub topology: CpuTopology,
    /// Kernel command line.
    pub cmdline: String,
    /// `-no-reboot`.
    pub no_reboot: bool,
    /// How the worker is confined (`--sandbox`).
    pub sandbox: SandboxConfig,
}

/// Requests the monitor's main task to exit with a status.
#[derive(Debug, Clone)]
pub struct ExitRequest(mpsc::UnboundedSender<i32>);

impl ExitRequest {
    /// A new request channel; the receiver yields the first exit status asked for.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<i32>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ExitRequest(tx), rx)
    }

    /// Asks for exit with `code`.
    pub fn request(&self, code: i32) {
        let _ = self.0.send(code);
    }
}

type Reply<T> = oneshot::Sender<Result<T, QmpError>>;

enum Request {
    Status(oneshot::Sender<RunState>),
    Stop(Reply<()>),
    Cont(Reply<()>),
    Reset(Reply<()>),
    Powerdown(Reply<()>),
    Quit(Reply<()>),
    QueryCpus {
        fresh: bool,
        reply: Reply<Vec<VcpuInfo>>,
    },
    Sandbox(oneshot::Sender<Vec<WorkerSandbox>>),
    BlockView(oneshot::Sender<BlockView>),
    BlockResize {
        device: Option<String>,
        node_name: Option<String>,
        size: u64,
        reply: Reply<()>,
    },
    BlockThrottle(Box<ThrottleArgs>, Reply<()>),
    Net(NetOp, Reply<NetAnswer>),
    Block(crate::disks::BlockOp, Reply<crate::disks::BlockAnswer>),
    Signal(i32),
    Terminate(oneshot::Sender<()>),
}

/// A cloneable handle to the VM actor.
#[derive(Debug, Clone)]
pub struct VmHandle {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Status(_) => "Status",
            Request::Stop(_) => "Stop",
            Request::Cont(_) => "Cont",
            Request::Reset(_) => "Reset",
            Request::Powerdown(_) => "Powerdown",
            Request::Quit(_) => "Quit",
            Request::QueryCpus { .. } => "QueryCpus",
            Request::Sandbox(_) => "Sandbox",
            Request::BlockView(_) => "BlockView",
            Request::BlockResize { .. } => "BlockResize",
            Request::BlockThrottle(..) => "BlockThrottle",
            Request::Net(..) => "Net",
            Request::Block(..) => "Block",
            Request::Signal(_) => "Signal",
            Request::Terminate(_) => "Terminate",
        })
    }
}

fn gone() -> QmpError {
    QmpError::generic("the VM is shutting down")
}

impl VmHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, QmpError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// The current run state.
    pub async fn status(&self) -> Result<RunState, QmpError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Status(tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// `stop`.
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.ask(Request::Stop).await
    }

    /// `cont`.
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.ask(Request::Cont).await
    }

    /// `system_reset`.
    pub async fn reset(&self) -> Result<(), QmpError> {
        self.ask(Request::Reset).await
    }

    /// `system_powerdown`: presses the guest's ACPI power button (when a machine worker runs;
    /// as QEMU, nothing else happens otherwise). The caller emits POWERDOWN after its reply.
    pub async fn powerdown(&self) -> Result<(), QmpError> {
        self.ask(Request::Powerdown).await
    }

    /// `quit`: emits SHUTDOWN; the caller then asks the monitor to exit.
    pub async fn quit(&self) -> Result<(), QmpError> {
        self.ask(Request::Quit).await
    }

    /// The vCPUs as `bulkhead-vcpu` reports them (none with `-M none`). `fresh` asks the
    /// worker now (it stops the vCPUs for a moment to sample their registers: `query-cpus`);
    /// otherwise the answer may come from the worker's first report, whose thread ids and
    /// placement hold for the worker's life (`query-cpus-fast`, which must not disturb the
    /// guest). Fails when the worker is not running (after it died or the guest powered off
    /// under `-no-shutdown`; `system_reset` starts a new one).
    pub async fn query_cpus(&self, fresh: bool) -> Result<Vec<VcpuInfo>, QmpError> {
        self.ask(|reply| Request::QueryCpus { fresh, reply }).await
    }

    /// The running workers with their sandbox reports (`x-query-sandbox`); empty when none
    /// runs. A worker's report is asked for once and kept: it describes what the worker did at
    /// start, which does not change.
    pub async fn sandbox(&self) -> Result<Vec<WorkerSandbox>, QmpError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::Sandbox(tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// The block graph with sizes and blockd's counters (`query-block`, `query-blockstats`,
    /// `query-named-block-nodes`).
    pub async fn block_view(&self) -> Result<BlockView, QmpError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request::BlockView(tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// `block_resize`: blockd resizes the image, then the guest is told (the device's
    /// configuration-change interrupt).
    pub async fn block_resize(
        &self,
        device: Option<String>,
        node_name: Option<String>,
        size: u64,
    ) -> Result<(), QmpError> {
        self.ask(|reply| Request::BlockResize {
            device,
            node_name,
            size,
            reply,
        })
        .await
    }

    /// `block_set_io_throttle`.
    pub async fn block_throttle(&self, args: ThrottleArgs) -> Result<(), QmpError> {
        self.ask(|reply| Request::BlockThrottle(Box::new(args), reply))
            .await
    }

    /// A block request (`blockdev-add`, `device_add` of a disk, ...: [`crate::disks`]).
    pub async fn block(
        &self,
        op: crate::disks::BlockOp,
    ) -> Result<crate::disks::BlockAnswer, QmpError> {
        self.ask(|reply| Request::Block(op, reply)).await
    }

    /// A network request (`netdev_add`, `set_link`, ...: [`crate::nics`]).
    pub async fn net(&self, op: NetOp) -> Result<NetAnswer, QmpError> {
        self.ask(|reply| Request::Net(op, reply)).await
    }

    /// A terminating signal arrived.
    pub async fn signal(&self, signo: i32) {
        let _ = self.tx.send(Request::Signal(signo)).await;
    }

    /// Stops the worker (politely, then by force) and ends the actor.
    pub async fn terminate(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Terminate(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Worker {
    rpc: RpcClient<VcpuProtocol>,
    events: Option<mpsc::UnboundedReceiver<EventItem<VcpuProtocol>>>,
    child: WorkerProcess,
    pid: u32,
    /// An exit now is part of the plan (quit, guest shutdown).
    expect_exit: bool,
    /// The channel closed: kill the process at this instant if it has not exited.
    kill_at: Option<Instant>,
    /// Its last vCPU report.
    cpus: Option<Vec<VcpuInfo>>,
    /// What it reported about its sandbox.
    sandbox: Option<SandboxReport>,
}

/// The VM actor.
pub struct Vm {
    state: RunState,
    bus: Arc<EventBus>,
    guest: Option<GuestSpec>,
    worker: Option<Worker>,
    disks: Disks,
    nics: Nics,
    /// The guest has run since the machine worker started (devices are hot-plugged, and
    /// unplugging waits for the guest).
    ran: bool,
    /// `device_del`s waiting for the guest's eject.
    unplugs: Unplugs,
    no_shutdown: bool,
    exit: ExitRequest,
    rx: mpsc::Receiver<Request>,
}

enum Input {
    Req(Option<Request>),
    Event(Result<VcpuEvent, bulkhead_ipc::Error>),
    Exit(std::io::Result<std::process::ExitStatus>),
    KillTimer,
    Blockd(BlockdExit),
    BlockdIoError(BlockdIoError),
    Netd(NetdExit),
}

impl From<Result<BlockdIoError, BlockdExit>> for Input {
    fn from(news: Result<BlockdIoError, BlockdExit>) -> Input {
        match news {
            Ok(e) => Input::BlockdIoError(e),
            Err(e) => Input::Blockd(e),
        }
    }
}

impl Vm {
    /// Creates the actor (not yet running) and its handle. Commands sent through the handle
    /// before [`Vm::run`] starts wait in its queue.
    pub fn new(
        bus: Arc<EventBus>,
        guest: Option<GuestSpec>,
        no_shutdown: bool,
        exit: ExitRequest,
    ) -> (Self, VmHandle) {
        let (tx, rx) = mpsc::channel(64);
        (
            Vm {
                state: RunState::Prelaunch,
                bus,
                guest,
                worker: None,
                disks: Disks::empty(),
                nics: Nics::empty(),
                ran: false,
                unplugs: Unplugs::default(),
                no_shutdown,
                exit,
                rx,
            },
            VmHandle { tx },
        )
    }

    /// Gives the actor the machine's disks (opened at start-up; before [`Vm::boot`]).
    pub fn set_disks(&mut self, disks: Disks) {
        self.disks = disks;
        self.disks.set_bus(self.bus.clone());
    }

    /// Gives the actor the machine's NICs (taps opened at start-up; before [`Vm::boot`]).
    pub fn set_nics(&mut self, nics: Nics) {
        self.nics = nics;
    }

    /// Starts the worker and builds the VM (if there is a guest), then starts the vCPUs unless
    /// `paused`. Failure here is a startup failure: the monitor exits 1.
    pub async fn boot(&mut self, paused: bool) -> Result<(), VmError> {
        if let Some(guest) = &self.guest {
            self.worker = Some(start_worker(guest, &mut self.disks, &mut self.nics).await?);
        }
        if !paused {
            if let Some(w) = self.worker.as_mut() {
                match tokio::time::timeout(CALL_TIMEOUT, w.rpc.call(VcpuRequest::Run, &[])).await {
                    Ok(Ok((VcpuReply::Ok, _))) => {}
                    Ok(Ok((VcpuReply::Error(msg), _))) => {
                        return Err(VmError::Refused { pid: w.pid, msg })
                    }
                    Ok(Ok((other, _))) => {
                        return Err(VmError::Refused {
                            pid: w.pid,
                            msg: format!("unexpected reply {other:?} to Run"),
                        })
                    }
                    Ok(Err(source)) => return Err(VmError::Ipc { pid: w.pid, source }),
                    Err(_) => {
                        return Err(VmError::Timeout {
                            pid: w.pid,
                            what: "start",
                            secs: CALL_TIMEOUT.as_secs(),
                        })
                    }
                }
            }
            self.state = RunState::Running;
            self.ran = true;
            self.bus.emit(&Event::Resume);
        }
        Ok(())
    }

    /// The worker's pid, if one runs.
    pub fn worker_pid(&self) -> Option<u32> {
        self.worker.as_ref().map(|w| w.pid)
    }

    /// Runs the actor until [`VmHandle::terminate`] (or every handle is gone).
    pub async fn run(mut self) {
        loop {
            let input = match self.worker.as_mut() {
                Some(w) => {
                    let Worker {
                        events,
                        child,
                        kill_at,
                        ..
                    } = w;
                    let kill_at = *kill_at;
                    tokio::select! {
                        r = self.rx.recv() => Input::Req(r),
                        e = next_event(events) => Input::Event(e),
                        s = child.wait() => Input::Exit(s),
                        _ = sleep_until(kill_at) => Input::KillTimer,
                        b = self.disks.next_news() => Input::from(b),
                        n = self.nics.next_exit() => Input::Netd(n),
                    }
                }
                None => tokio::select! {
                    r = self.rx.recv() => Input::Req(r),
                    b = self.disks.next_news() => Input::from(b),
                    n = self.nics.next_exit() => Input::Netd(n),
                },
            };
            match input {
                Input::Req(None) => break,
                Input::Req(Some(Request::Terminate(done))) => {
                    self.terminate().await;
                    let _ = done.send(());
                    break;
                }
                Input::Req(Some(r)) => self.handle(r).await,
                Input::Event(Ok(ev)) => self.on_event(ev).await,
                Input::Event(Err(e)) => self.on_channel_closed(e),
                Input::Exit(status) => self.on_exit(status),
                Input::Blockd(e) => self.on_blockd_exit(e),
                Input::BlockdIoError(e) => self.on_io_error(e).await,
                Input::Netd(e) => self.on_netd_exit(e),
                Input::KillTimer => {
                    if let Some(w) = self.worker.as_mut() {
                        log::warn!(
                            "bulkhead-vcpu (pid {}) closed its channel but did not exit; killing it",
                            w.pid
                        );
                        w.kill_at = None;
                        let _ = w.child.start_kill();
                    }
                }
            }
        }
    }

    async fn handle(&mut self, r: Request) {
        match r {
            Request::Status(tx) => {
                let _ = tx.send(self.state);
            }
            Request::Stop(tx) => {
                let r = self.stop().await;
                let _ = tx.send(r);
            }
            Request::Cont(tx) => {
                let r = self.cont().await;
                let _ = tx.send(r);
            }
            Request::Reset(tx) => {
                let r = self.reset().await;
                let _ = tx.send(r);
            }
            Request::Powerdown(tx) => {
                let r = match self.worker.is_some() {
                    true => self.call(VcpuRequest::PowerButton).await,
                    false => Ok(()),
                };
                let _ = tx.send(r);
            }
            Request::QueryCpus { fresh, reply } => {
                let r = self.query_cpus(fresh).await;
                let _ = reply.send(r);
            }
            Request::Sandbox(reply) => {
                let r = self.sandbox().await;
                let _ = reply.send(r);
            }
            Request::BlockView(reply) => {
                let v = self.disks.view().await;
                let _ = reply.send(v);
            }
            Request::BlockResize {
                device,
                node_name,
                size,
                reply,
            } => {
                let r = self
                    .block_resize(device.as_deref(), node_name.as_deref(), size)
                    .await;
                let _ = reply.send(r);
            }
            Request::BlockThrottle(args, reply) => {
                let r = self.block_throttle(&args).await;
                let _ = reply.send(r);
            }
            Request::Block(op, reply) => {
                let m = crate::disks::MachineCtx {
                    rpc: self.worker.as_ref().map(|w| &w.rpc),
                    guest: self.guest.is_some(),
                    ran: self.ran,
                    mem_bytes: self.guest.as_ref().map_or(0, |g| g.memory.size()),
                    vcpus: self.guest.as_ref().map_or(1, |g| g.vcpus),
                    nic_slots: self.nics.slots(),
                    id_is_nic: op
                        .new_device_id()
                        .is_some_and(|id| self.nics.has_device(id)),
                    bus: &self.bus,
                    unplugs: &mut self.unplugs,
                };
                let r = self.disks.handle(op, m).await;
                let _ = reply.send(r);
            }
            Request::Net(op, reply) => {
                let ctx = VcpuCtx {
                    rpc: self.worker.as_ref().map(|w| &w.rpc),
                    guest: self.guest.is_some(),
                    ran: self.ran,
                    mem_bytes: self.guest.as_ref().map_or(0, |g| g.memory.size()),
                    block_slots: self.disks.config().used_slots(),
                    block_ids: self.disks.config().device_ids(),
                    unplugs: &mut self.unplugs,
                    bus: &self.bus,
                };
                let r = self.nics.handle(op, ctx).await;
                let _ = reply.send(r);
            }
            Request::Quit(tx) => {
                self.bus.emit(&Event::Shutdown(ShutdownCause::HostQmpQuit));
                self.expect_worker_exit();
                let _ = tx.send(Ok(()));
            }
            Request::Signal(signo) => {
                log::warn!("terminating on signal {signo}");
                self.bus.emit(&Event::Shutdown(ShutdownCause::HostSignal));
                self.expect_worker_exit();
                self.exit.request(0);
            }
            Request::Terminate(_) => {}
        }
    }

    fn expect_worker_exit(&mut self) {
        if let Some(w) = self.worker.as_mut() {
            w.expect_exit = true;
        }
    }

    /// Sends `req` to the worker and maps the outcome to a QMP result. A worker that does not
    /// answer in time is killed (its exit then moves the VM to internal-error).
    async fn call(&mut self, req: VcpuRequest) -> Result<(), QmpError> {
        let what = format!("{req:?}");
        match self.call_reply(req).await? {
            VcpuReply::Ok => Ok(()),
            other => Err(QmpError::generic(format!(
                "the vCPU worker answered {what} with {other:?}"
            ))),
        }
    }

    /// Like [`Vm::call`], returning whatever the worker answered but an error.
    async fn call_reply(&mut self, req: VcpuRequest) -> Result<VcpuReply, QmpError> {
        let Some(w) = self.worker.as_mut() else {
            return Err(QmpError::generic("the vCPU worker is not running"));
        };
        let what = format!("{req:?}");
        match tokio::time::timeout(CALL_TIMEOUT, w.rpc.call(req, &[])).await {
            Ok(Ok((VcpuReply::Error(msg), _))) => Err(QmpError::generic(msg)),
            Ok(Ok((reply, _))) => Ok(reply),
            Ok(Err(e)) => Err(QmpError::generic(format!("the vCPU worker is gone: {e}"))),
            Err(_) => {
                log::error!(
                    "bulkhead-vcpu (pid {}) did not answer {what} within {} s; killing it",
                    w.pid,
                    CALL_TIMEOUT.as_secs()
                );
                let _ = w.child.start_kill();
                Err(QmpError::generic("the vCPU worker did not answer"))
            }
        }
    }

    async fn query_cpus(&mut self, fresh: bool) -> Result<Vec<VcpuInfo>, QmpError> {
        let Some(guest) = &self.guest else {
            // -M none: no CPUs at all, as QEMU's none machine.
            return Ok(Vec::new());
        };
        let (vcpus, topology) = (guest.vcpus, guest.topology);
        let Some(w) = self.worker.as_ref() else {
            return Err(QmpError::generic(
                "the vCPUs are gone: the vCPU worker is not running \
                 (system_reset starts a new one)",
            ));
        };
        if let (false, Some(cpus)) = (fresh, &w.cpus) {
            return Ok(cpus.clone());
        }
        let list = match self.call_reply(VcpuRequest::QueryCpus).await? {
            VcpuReply::Cpus(list) => list,
            other => {
                return Err(QmpError::generic(format!(
                    "the vCPU worker answered QueryCpus with {other:?}"
                )))
            }
        };
        let mut cpus = place_cpus(list, vcpus, topology).map_err(QmpError::generic)?;
        if let Some(w) = self.worker.as_ref() {
            let tids = host_tids(w.pid);
            for c in &mut cpus {
                match tids.get(&c.thread_id) {
                    Some(&host) => c.thread_id = host,
                    None => log::warn!(
                        "bulkhead-vcpu (pid {}) reported thread {} for vCPU {}, which it does not have",
                        w.pid,
                        c.thread_id,
                        c.index
                    ),
                }
            }
        }
        if let Some(w) = self.worker.as_mut() {
            w.cpus = Some(cpus.clone());
        }
        Ok(cpus)
    }

    async fn block_resize(
        &mut self,
        device: Option<&str>,
        node_name: Option<&str>,
        size: u64,
    ) -> Result<(), QmpError> {
        let node = self
            .disks
            .find_node(device, node_name)
            .map_err(QmpError::generic)?;
        let id = self
            .disks
            .resize(node, size)
            .await
            .map_err(QmpError::generic)?;
        // The guest re-reads the capacity on the configuration-change interrupt.
        if self.worker.is_some() {
            if let Err(e) = self
                .call(VcpuRequest::ConfigChanged { id: id.clone() })
                .await
            {
                log::warn!("{id}: resized, but the guest was not told: {}", e.desc);
            }
        }
        Ok(())
    }

    async fn block_throttle(&mut self, args: &ThrottleArgs) -> Result<(), QmpError> {
        let dev = self
            .disks
            .throttle_target(args.device.as_deref(), args.id.as_deref())?;
        let limits = args.limits().map_err(QmpError::generic)?;
        let name = args
            .device
            .clone()
            .or_else(|| args.id.clone())
            .unwrap_or_default();
        let Some(dev) = dev else {
            return Err(QmpError::generic(format!(
                "bulkhead enforces I/O limits in the bulkhead-blockd of a device; '{name}' has \
                 no device"
            )));
        };
        self.disks
            .set_throttle(dev, limits, name)
            .await
            .map_err(QmpError::generic)
    }

    /// A disk's request failed (`werror`/`rerror`): the backend's I/O status, then
    /// `BLOCK_IO_ERROR`, then for the `stop` action the pause (`io-error` and STOP), in QEMU's
    /// order (`blk_error_action`). Only a running VM stops: in any other state (paused by
    /// `stop`, already in `io-error` for another disk, prelaunch) the event is sent and the
    /// state stays, as QEMU's `vm_stop` of a stopped VM does nothing; blockd holds the request
    /// all the same and retries it on the next `cont`.
    async fn on_io_error(&mut self, e: BlockdIoError) {
        let pid = e.pid;
        let Some(ev) = self.disks.on_io_error(e) else {
            log::warn!(
                "an I/O error event from bulkhead-blockd (pid {pid}), which no longer serves a                  device, was dropped"
            );
            return;
        };
        log::warn!(
            "I/O error on '{}' (node {}): {} failed: {}; action {}",
            ev.device,
            ev.node_name.as_deref().unwrap_or("-"),
            ev.operation(),
            ev.reason,
            ev.action.name()
        );
        let stop = ev.action == bulkhead_ipc::messages::ErrorAction::Stop;
        self.bus.emit(&Event::BlockIoError(ev));
        if !stop || self.state != RunState::Running {
            return;
        }
        if self.guest.is_some() {
            if let Err(e) = self.call(VcpuRequest::Pause).await {
                // The worker is gone or was killed for not answering: its exit moves the VM to
                // internal-error.
                log::error!("cannot pause the VM after an I/O error: {}", e.desc);
                return;
            }
        }
        self.state = RunState::IoError;
        self.bus.emit(&Event::Stop);
    }

    fn on_blockd_exit(&mut self, e: BlockdExit) {
        let id = e.id.clone();
        if !self.disks.on_exit(&e) {
            log::info!("bulkhead-blockd for {id} (pid {}) {}", e.pid, e.description);
            return;
        }
        log::error!("bulkhead-blockd for {id} (pid {}) {}", e.pid, e.description);
        use std::os::unix::process::ExitStatusExt;
        self.bus.emit(&Event::WorkerExited(WorkerExit {
            role: bulkhead_sandbox::Role::Blockd.name(),
            pid: e.pid,
            exit_status: e.status.and_then(|s| s.code()),
            signal: e.status.and_then(|s| s.signal()).map(worker::signal_name),
            syscall: e.violation.map(|v| (v.nr, v.name())),
            description: e.description,
            device: Some(id),
        }));
    }

    fn on_netd_exit(&mut self, e: NetdExit) {
        let (id, unexpected) = self.nics.on_exit(&e);
        if !unexpected {
            log::info!("bulkhead-netd for {id} (pid {}) {}", e.pid, e.description);
            return;
        }
        log::error!("bulkhead-netd for {id} (pid {}) {}", e.pid, e.description);
        use std::os::unix::process::ExitStatusExt;
        self.bus.emit(&Event::WorkerExited(WorkerExit {
            role: bulkhead_sandbox::Role::Netd.name(),
            pid: e.pid,
            exit_status: e.status.and_then(|s| s.code()),
            signal: e.status.and_then(|s| s.signal()).map(worker::signal_name),
            syscall: e.violation.map(|v| (v.nr, v.name())),
            description: e.description,
            device: Some(id),
        }));
    }

    async fn sandbox(&mut self) -> Vec<WorkerSandbox> {
        let Some(mode) = self.guest.as_ref().map(|g| g.sandbox.mode) else {
            return Vec::new();
        };
        let mut out = self.vcpu_sandbox(mode).await;
        for (device, pid) in self.disks.running() {
            let report = self.disks.sandbox_report(device).await;
            out.push(WorkerSandbox {
                role: bulkhead_sandbox::Role::Blockd,
                pid,
                mode,
                report,
            });
        }
        for (nic, pid) in self.nics.running() {
            let report = self.nics.sandbox_report(&nic).await;
            out.push(WorkerSandbox {
                role: bulkhead_sandbox::Role::Netd,
                pid,
                mode,
                report,
            });
        }
        out
    }

    async fn vcpu_sandbox(&mut self, mode: bulkhead_sandbox::Mode) -> Vec<WorkerSandbox> {
        let cached = match self.worker.as_ref() {
            None => return Vec::new(),
            Some(w) => w.sandbox.clone(),
        };
        let report = match cached {
            Some(r) => Ok(r),
            None => match self.call_reply(VcpuRequest::QuerySandbox).await {
                Ok(VcpuReply::Sandbox(r)) => {
                    if let Some(w) = self.worker.as_mut() {
                        w.sandbox = Some(r.clone());
                    }
                    Ok(r)
                }
                Ok(other) => Err(format!("unexpected reply {other:?}")),
                Err(e) => Err(e.desc),
            },
        };
        self.worker
            .as_ref()
            .map(|w| WorkerSandbox {
                role: bulkhead_sandbox::Role::Vcpu,
                pid: w.pid,
                mode,
                report,
            })
            .into_iter()
            .collect()
    }

    async fn stop(&mut self) -> Result<(), QmpError> {
        if self.state != RunState::Running {
            return Ok(());
        }
        if self.guest.is_some() {
            self.call(VcpuRequest::Pause).await?;
        }
        self.state = RunState::Paused;
        self.bus.emit(&Event::Stop);
        Ok(())
    }

    async fn cont(&mut self) -> Result<(), QmpError> {
        if matches!(self.state, RunState::Shutdown | RunState::InternalError) {
            return Err(QmpError::generic(
                "Resetting the Virtual Machine is required",
            ));
        }
        // As QEMU's qmp_cont: every backend's I/O status is reset, even on a running VM.
        self.disks.reset_io_status();
        match self.state {
            RunState::Running | RunState::Shutdown | RunState::InternalError => Ok(()),
            RunState::Prelaunch | RunState::Paused | RunState::IoError => {
                // The disks retry what they held after a `stop` action (QEMU restarts its
                // virtio-blk requests when the VM runs again), then the vCPUs run.
                self.disks.resume_all().await;
                if self.guest.is_some() {
                    self.call(VcpuRequest::Run).await?;
                    self.ran = true;
                }
                self.state = RunState::Running;
                self.bus.emit(&Event::Resume);
                Ok(())
            }
        }
    }

    async fn reset(&mut self) -> Result<(), QmpError> {
        // QEMU's reset carries out the unplugs the guest had not done (the machine worker's
        // reset ejects those devices too); their DEVICE_DELETED follow RESET, as in QEMU.
        let mut deleted = Vec::new();
        if self.guest.is_some() {
            if self.worker.is_some() {
                self.call(VcpuRequest::Reset).await?;
                deleted = self.finish_pending_unplugs().await;
            } else {
                deleted = self.finish_pending_unplugs().await;
                let Some(guest) = &self.guest else {
                    return Ok(());
                };
                // The worker is gone (died, or exited after a guest poweroff under
                // -no-shutdown): a reset builds the machine afresh in a new worker.
                match start_worker(guest, &mut self.disks, &mut self.nics).await {
                    Ok(w) => {
                        self.ran = false;
                        log::info!("restarted bulkhead-vcpu (pid {})", w.pid);
                        self.worker = Some(w);
                        self.state = RunState::Prelaunch;
                    }
                    Err(e) => {
                        log::error!("cannot restart the vCPU worker: {e}");
                        return Err(QmpError::generic(format!(
                            "cannot restart the vCPU worker: {e}"
                        )));
                    }
                }
            }
        }
        self.bus
            .emit(&Event::Reset(ShutdownCause::HostQmpSystemReset));
        for ev in deleted {
            self.bus.emit(&ev);
        }
        if self.state != RunState::Running {
            self.state = RunState::Prelaunch;
        }
        Ok(())
    }

    /// Removes every device whose unplug waits for the guest (a reset or a new machine worker
    /// carries it out) and returns their DEVICE_DELETED events.
    async fn finish_pending_unplugs(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        for id in self.unplugs.take_all() {
            out.extend(self.remove_ejected(&id).await);
        }
        out
    }

    /// The device the machine worker knows as `id` is gone from the machine: remove it from
    /// the disks or the NICs and return its DEVICE_DELETED events.
    async fn remove_ejected(&mut self, id: &str) -> Vec<Event> {
        if let Some(ev) = self.disks.finish_unplug(id).await {
            return ev;
        }
        if let Some(ev) = self.nics.finish_unplug(id).await {
            return ev;
        }
        log::warn!("device {id} was unplugged, but no disk or NIC has that id");
        Vec::new()
    }

    async fn on_event(&mut self, ev: VcpuEvent) {
        match ev {
            VcpuEvent::Shutdown(cause) => {
                let cause = match cause {
                    GuestCause::GuestShutdown => ShutdownCause::GuestShutdown,
                    // QEMU reports a triple fault under -no-reboot as a guest reset too.
                    GuestCause::GuestReset | GuestCause::GuestTripleFault => {
                        ShutdownCause::GuestReset
                    }
                };
                self.expect_worker_exit();
                self.bus.emit(&Event::Shutdown(cause));
                if self.no_shutdown {
                    if self.state == RunState::Running {
                        self.bus.emit(&Event::Stop);
                    }
                    self.state = RunState::Shutdown;
                } else {
                    self.exit.request(0);
                }
            }
            VcpuEvent::Reset { guest: true } => {
                self.bus.emit(&Event::Reset(ShutdownCause::GuestReset));
            }
            VcpuEvent::Reset { guest: false } => {
                // Host-initiated resets are reported by the monitor itself (system_reset).
                log::debug!("ignoring a host reset event from the vCPU worker");
            }
            VcpuEvent::InternalError(msg) => {
                log::error!("the vCPU worker stopped the VM: {msg}");
                self.enter_internal_error();
            }
            // After a device_del on a guest that has run: the device goes now.
            VcpuEvent::DeviceEjected { id } => {
                if self.unplugs.finish(&id) {
                    log::info!("the guest ejected device {id}");
                    for ev in self.remove_ejected(&id).await {
                        self.bus.emit(&ev);
                    }
                } else {
                    // Already carried out (a host reset removed it first).
                    log::debug!("device {id} ejected, already removed");
                }
            }
            VcpuEvent::RxFilterChanged { id, filter, reset } => {
                if let Some((name, path)) = self.nics.on_rx_filter(&id, filter, reset) {
                    self.bus.emit(&Event::NicRxFilterChanged { name, path });
                }
            }
        }
    }

    fn enter_internal_error(&mut self) {
        if self.state == RunState::Running {
            self.bus.emit(&Event::Stop);
        }
        self.state = RunState::InternalError;
    }

    fn on_channel_closed(&mut self, e: bulkhead_ipc::Error) {
        if let Some(w) = self.worker.as_mut() {
            if !w.expect_exit {
                log::debug!("channel to bulkhead-vcpu (pid {}) closed: {e}", w.pid);
            }
            w.kill_at = Some(Instant::now() + CHANNEL_GRACE);
        }
    }

    fn on_exit(&mut self, status: std::io::Result<std::process::ExitStatus>) {
        let Some(mut w) = self.worker.take() else {
            return;
        };
        let (desc, violation, status) = match status {
            Ok(s) => {
                let (d, v) = w.child.describe_with_violation(s);
                (d, v, Some(s))
            }
            Err(e) => (format!("could not be waited for ({e})"), None, None),
        };
        if w.expect_exit {
            log::info!("bulkhead-vcpu (pid {}) {desc}", w.pid);
        } else {
            log::error!("bulkhead-vcpu (pid {}) {desc}", w.pid);
            // The event first, then STOP and the state change: QEMU reports the cause of an
            // internal error before the STOP it leads to.
            use std::os::unix::process::ExitStatusExt;
            self.bus.emit(&Event::WorkerExited(WorkerExit {
                role: bulkhead_sandbox::Role::Vcpu.name(),
                pid: w.pid,
                exit_status: status.and_then(|s| s.code()),
                signal: status.and_then(|s| s.signal()).map(worker::signal_name),
                syscall: violation.map(|v| (v.nr, v.name())),
                description: desc,
                device: None,
            }));
            self.enter_internal_error();
        }
    }

    async fn terminate(&mut self) {
        self.terminate_vcpu().await;
        self.disks.quit_all().await;
        self.nics.quit_all().await;
    }

    async fn terminate_vcpu(&mut self) {
        let Some(mut w) = self.worker.take() else {
            return;
        };
        w.expect_exit = true;
        let _ = tokio::time::timeout(QUIT_TIMEOUT, w.rpc.call(VcpuRequest::Quit, &[])).await;
        match tokio::time::timeout(QUIT_TIMEOUT, w.child.wait()).await {
            Ok(Ok(s)) => log::info!("bulkhead-vcpu (pid {}) {}", w.pid, w.child.describe(s)),
            _ => {
                log::warn!("bulkhead-vcpu (pid {}) did not quit; killing it", w.pid);
                let _ = w.child.start_kill();
                let _ = w.child.wait().await;
            }
        }
    }
}

async fn next_event(
    events: &mut Option<mpsc::UnboundedReceiver<EventItem<VcpuProtocol>>>,
) -> Result<VcpuEvent, bulkhead_ipc::Error> {
    let Some(rx) = events.as_mut() else {
        return std::future::pending().await;
    };
    match rx.recv().await {
        Some(Ok((ev, _fds))) => Ok(ev),
        Some(Err(e)) => {
            *events = None;
            Err(e)
        }
        None => {
            *events = None;
            Err(bulkhead_ipc::Error::PeerClosed)
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts the disks' back ends, spawns the worker, does the handshake and sends `Setup` with the
/// fds in the contract's order (each disk's vhost-user socket last).
async fn start_worker(
    guest: &GuestSpec,
    disks: &mut Disks,
    nics: &mut Nics,
) -> Result<Worker, VmError> {
    let mut devices = disks.start(guest.memory.size(), guest.vcpus).await?;
    devices.extend(nics.start(guest.memory.size()).await?);
    let (mine, theirs) = bulkhead_ipc::channel::seqpacket_pair()
        .map_err(|source| VmError::Ipc { pid: 0, source })?;
    let params = bulkhead_sandbox::Params {
        mem_bytes: guest.memory.size(),
        vcpus: guest.vcpus,
        ..Default::default()
    };
    let mut child = worker::spawn(&guest.worker_path, theirs, &guest.sandbox, params)?;
    let pid = child.id();
    log::info!("started {} (pid {pid})", guest.worker_path.display());
    let died = |child: &mut WorkerProcess, what: &'static str| {
        let status = match child.try_wait() {
            Ok(Some(s)) => Some(child.describe(s)),
            _ => None,
        };
        status.map(|status| VmError::Died { pid, status, what })
    };
    let chan = AsyncChannel::<VcpuProtocol>::from_fd(mine)
        .map_err(|source| VmError::Ipc { pid, source })?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, chan.handshake(Role::Monitor, Role::Vcpu)).await {
        Ok(Ok(_hello)) => {}
        Ok(Err(source)) => {
            // Give a dying worker a moment so the error can say how it ended.
            let _ = tokio::time::timeout(Duration::from_millis(500), child.wait()).await;
            return Err(died(&mut child, "handshake").unwrap_or(VmError::Ipc { pid, source }));
        }
        Err(_) => {
            return Err(VmError::Timeout {
                pid,
                what: "handshake",
                secs: HANDSHAKE_TIMEOUT.as_secs(),
            })
        }
    }
    let (rpc, events) = RpcClient::new(chan);
    let kernel = reopen_readonly(&guest.kernel).map_err(|source| VmError::Reopen {
        what: "the kernel",
        source,
    })?;
    let initrd = match &guest.initrd {
        Some(f) => Some(reopen_readonly(f).map_err(|source| VmError::Reopen {
            what: "the initrd",
            source,
        })?),
        None => None,
    };
    let serial_in = guest.serial.input();
    let serial_out = guest.serial.output();
    // One frame carries at most MAX_FDS fds: the devices that do not fit into Setup are
    // plugged with AddDevice right after it (cold-plug: the guest has not run yet).
    let fixed = 3
        + usize::from(initrd.is_some())
        + usize::from(serial_in.is_some())
        + usize::from(serial_out.is_some());
    let in_setup = devices
        .len()
        .min(bulkhead_ipc::MAX_FDS.saturating_sub(fixed));
    let (devices, later) = devices.split_at(in_setup);
    let setup = VmSetup {
        mem_size: guest.memory.size(),
        vcpus: guest.vcpus,
        topology: guest.topology,
        cmdline: guest.cmdline.clone(),
        has_initrd: initrd.is_some(),
        serial_in: serial_in.is_some(),
        serial_out: serial_out.is_some(),
        no_reboot: guest.no_reboot,
        devices: devices.iter().map(|(d, _)| d.clone()).collect(),
    };
    let mut fds: Vec<BorrowedFd<'_>> =
        vec![guest.kvm.as_fd(), guest.memory.as_fd(), kernel.as_fd()];
    fds.extend(initrd.as_ref().map(AsFd::as_fd));
    fds.extend(serial_in);
    fds.extend(serial_out);
    fds.extend(devices.iter().map(|(_, s)| s.as_fd()));
    let res = tokio::time::timeout(SETUP_TIMEOUT, rpc.call(VcpuRequest::Setup(setup), &fds)).await;
    drop(fds);
    match res {
        Ok(Ok((VcpuReply::Ok, _))) => {}
        Ok(Ok((VcpuReply::Error(msg), _))) => return Err(VmError::Refused { pid, msg }),
        Ok(Ok((other, _))) => {
            return Err(VmError::Refused {
                pid,
                msg: format!("unexpected reply {other:?} to Setup"),
            })
        }
        Ok(Err(source)) => {
            let _ = tokio::time::timeout(Duration::from_millis(500), child.wait()).await;
            return Err(died(&mut child, "setup").unwrap_or(VmError::Ipc { pid, source }));
        }
        Err(_) => {
            return Err(VmError::Timeout {
                pid,
                what: "setup",
                secs: SETUP_TIMEOUT.as_secs(),
            })
        }
    }
    for (dev, sock) in later {
        let id = dev.id.clone();
        let res = tokio::time::timeout(
            CALL_TIMEOUT,
            rpc.call(VcpuRequest::AddDevice(dev.clone()), &[sock.as_fd()]),
        )
        .await;
        match res {
            Ok(Ok((VcpuReply::Ok, _))) => {}
            Ok(Ok((other, _))) => {
                return Err(VmError::Refused {
                    pid,
                    msg: format!("adding device {id}: {other:?}"),
                })
            }
            Ok(Err(source)) => return Err(VmError::Ipc { pid, source }),
            Err(_) => {
                return Err(VmError::Timeout {
                    pid,
                    what: "device plugging",
                    secs: CALL_TIMEOUT.as_secs(),
                })
            }
        }
    }
    Ok(Worker {
        rpc,
        events: Some(events),
        child,
        pid,
        expect_exit: false,
        kill_at: None,
        cpus: None,
        sandbox: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(index: u32, socket_id: u32, core_id: u32, thread_in_core: u32) -> CpuInfo {
        CpuInfo {
            index,
            thread_id: 1000 + index as i32,
            halted: index % 2 == 1,
            pc: 0x1000 * u64::from(index),
            socket_id,
            core_id,
            thread_in_core,
        }
    }

    fn topo(sockets: u32, dies: u32, cores: u32, threads: u32) -> CpuTopology {
        CpuTopology {
            sockets,
            dies,
            cores,
            threads,
        }
    }

    #[test]
    fn cpus_are_sorted_and_placed_with_dies_as_qemu_counts_them() {
        // -smp 4,dies=2,cores=2: the worker counts 4 cores in the socket.
        let list = vec![
            cpu(3, 0, 3, 0),
            cpu(0, 0, 0, 0),
            cpu(2, 0, 2, 0),
            cpu(1, 0, 1, 0),
        ];
        let placed = place_cpus(list, 4, topo(1, 2, 2, 1)).expect("placed");
        let ids: Vec<_> = placed
            .iter()
            .map(|c| (c.index, c.socket_id, c.die_id, c.core_id, c.thread_in_core))
            .collect();
        assert_eq!(
            ids,
            vec![
                (0, 0, Some(0), 0, 0),
                (1, 0, Some(0), 1, 0),
                (2, 0, Some(1), 0, 0),
                (3, 0, Some(1), 1, 0)
            ]
        );
        assert_eq!(placed[3].thread_id, 1003);
        assert!(placed[3].halted && !placed[2].halted);
        assert_eq!(placed[2].pc, 0x2000);
        // One die: no die-id at all.
        let placed = place_cpus(vec![cpu(0, 0, 0, 0), cpu(1, 1, 0, 0)], 2, topo(2, 1, 1, 1))
            .expect("placed");
        assert!(placed.iter().all(|c| c.die_id.is_none()));
        assert_eq!(placed[1].socket_id, 1);
    }

    #[test]
    fn thread_ids_of_this_process_map_to_themselves() {
        let me = std::process::id();
        let tids = host_tids(me);
        let main = i32::try_from(me).expect("pid");
        assert_eq!(tids.get(&main), Some(&main));
        assert!(host_tids(u32::MAX).is_empty());
    }

    #[test]
    fn a_report_that_does_not_match_the_configuration_is_refused() {
        for list in [
            vec![cpu(0, 0, 0, 0)],
            vec![cpu(0, 0, 0, 0), cpu(0, 0, 1, 0)],
            vec![cpu(0, 0, 0, 0), cpu(2, 0, 1, 0)],
            vec![cpu(0, 0, 0, 0), cpu(1, 0, 1, 0), cpu(2, 0, 2, 0)],
        ] {
            let e = place_cpus(list, 2, topo(1, 1, 2, 1)).expect_err("refused");
            assert!(e.contains("expected 0 to 1"), "{e}");
        }
    }
}
