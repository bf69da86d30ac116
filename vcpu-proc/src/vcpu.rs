//! vCPUs: one thread per vCPU running `KVM_RUN`, exits dispatched to the buses, and the
//! run/pause protocol. A pause clears the shared run flag and kicks every thread with a
//! real-time signal whose handler sets `kvm_run.immediate_exit`, so a thread leaves (or never
//! enters) `KVM_RUN`; it then releases its vCPU fd and parks. A pause completes once every
//! thread is parked, after which the machine may use the vCPU fds (state snapshot, reset,
//! sampling). Also owns per-vCPU configuration (CPUID, MSRs, LAPIC LINT pins, boot registers)
//! and the initial-state snapshot a reset restores.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_UNINITIALIZED, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::{Bus, RateLimit};
use crate::devices::{GuestRequest, RequestSink};
use crate::{boot, cpuid, msr};

/// Errors configuring or controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        index: u32,
        /// The ioctl.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Building CPUID failed.
    #[error(transparent)]
    Cpuid(#[from] cpuid::Error),
    /// Building MSRs failed.
    #[error(transparent)]
    Msr(#[from] msr::Error),
    /// Installing the kick signal handler failed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    /// A vCPU thread could not be spawned.
    #[error("cannot spawn a vCPU thread: {0}")]
    Spawn(std::io::Error),
    /// Some vCPU did not park in time.
    #[error("{0} vCPU(s) did not stop within {1:?}")]
    PauseTimeout(usize, Duration),
}

fn ioctl_err(index: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Ioctl {
        index,
        what,
        source,
    }
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_sig: libc::c_int) {
    // Only touches this thread's const-initialised TLS slot and the kvm_run page it points at,
    // both async-signal-safe.
    let p = KVM_RUN.with(|c| c.get());
    if !p.is_null() {
        // The pointer is this thread's mapped kvm_run page, set while the thread holds its vCPU
        // fd and cleared before it lets go.
        // SAFETY: immediate_exit is a plain u8 in that live page; KVM reads it on the next run.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

/// The signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the kick signal handler (process-wide, once).
pub fn install_kick_handler() -> Result<(), Error> {
    // SAFETY: a zeroed sigaction is a valid starting value; we fill the handler and mask.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = kick_handler as *const () as usize;
    sa.sa_flags = 0;
    // SAFETY: sa.sa_mask is a valid sigset_t owned by `sa`.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: installing a handler that only performs async-signal-safe work.
    let rc = unsafe { libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(Error::Signal(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// What the machine wants the vCPU threads to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Desired {
    Run,
    Pause,
    Quit,
}

struct Ctl {
    desired: Desired,
    parked: usize,
    threads: Vec<Option<libc::pthread_t>>,
    exited: Vec<bool>,
    pending_guest: Option<GuestRequest>,
}

/// Run/pause state shared by the machine and its vCPU threads.
pub struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    running: AtomicBool,
    count: usize,
}

impl Shared {
    /// State for `count` vCPUs, all paused.
    pub fn new(count: usize) -> Arc<Self> {
        Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                desired: Desired::Pause,
                parked: 0,
                threads: vec![None; count],
                exited: vec![false; count],
                pending_guest: None,
            }),
            cv: Condvar::new(),
            running: AtomicBool::new(false),
            count,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kick_all(ctl: &Ctl) {
        for (t, exited) in ctl.threads.iter().zip(&ctl.exited) {
            if let (Some(t), false) = (t, exited) {
                // SAFETY: `t` is a live, joinable thread of this process (its JoinHandle is
                // kept by the machine and it has not exited); the signal has a handler.
                unsafe { libc::pthread_kill(*t, kick_signal()) };
            }
        }
    }

    /// Asks every vCPU to stop and waits until all are parked (and have released their fds).
    pub fn pause(&self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut ctl = self.lock();
        if ctl.desired == Desired::Run {
            ctl.desired = Desired::Pause;
        }
        self.running.store(false, Ordering::SeqCst);
        loop {
            let live = ctl.exited.iter().filter(|e| !**e).count();
            if ctl.parked >= live {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::PauseTimeout(live - ctl.parked, timeout));
            }
            Self::kick_all(&ctl);
            let wait = (deadline - now).min(Duration::from_millis(50));
            ctl = self
                .cv
                .wait_timeout(ctl, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Lets the vCPUs run, unless a guest request is waiting for the machine to act on it.
    pub fn resume(&self) -> bool {
        let mut ctl = self.lock();
        if ctl.pending_guest.is_some() || ctl.desired == Desired::Quit {
            return false;
        }
        ctl.desired = Desired::Run;
        self.running.store(true, Ordering::SeqCst);
        self.cv.notify_all();
        true
    }

    /// Stops every vCPU thread for good (they exit once out of `KVM_RUN`).
    pub fn quit(&self) {
        let mut ctl = self.lock();
        ctl.desired = Desired::Quit;
        self.running.store(false, Ordering::SeqCst);
        Self::kick_all(&ctl);
        self.cv.notify_all();
    }

    /// Records a guest request and stops the vCPUs; returns false if another request is
    /// already pending (this one is then dropped: the machine is about to act anyway).
    pub fn guest_request(&self, req: GuestRequest) -> bool {
        let mut ctl = self.lock();
        if ctl.pending_guest.is_some() || ctl.desired == Desired::Quit {
            return false;
        }
        ctl.pending_guest = Some(req);
        if ctl.desired == Desired::Run {
            ctl.desired = Desired::Pause;
        }
        self.running.store(false, Ordering::SeqCst);
        Self::kick_all(&ctl);
        true
    }

    /// Takes the pending guest request.
    pub fn take_guest_request(&self) -> Option<GuestRequest> {
        self.lock().pending_guest.take()
    }

    /// Number of vCPUs.
    pub fn count(&self) -> usize {
        self.count
    }

    fn set_thread(&self, index: usize, t: libc::pthread_t) {
        if let Some(slot) = self.lock().threads.get_mut(index) {
            *slot = Some(t);
        }
    }
}

/// One vCPU: its fd (held by its thread while running) and identity.
pub struct VcpuSlot {
    /// vCPU index (= APIC id with the flat topology).
    pub index: u32,
    /// The vCPU fd.
    pub fd: Mutex<VcpuFd>,
    /// Host thread id of the vCPU thread (0 until it starts).
    pub tid: AtomicI32,
}

impl VcpuSlot {
    /// Locks the fd (only blocks while the vCPU runs).
    pub fn lock_fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Everything a vCPU thread needs to handle exits.
#[derive(Clone)]
pub struct ExitContext {
    /// Port-I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Where guest requests go.
    pub sink: RequestSink,
}

static UNKNOWN_IO_LOG: RateLimit = RateLimit::new(20);

fn log_unknown(kind: &str, addr: u64, len: usize, write: Option<&[u8]>) {
    if let Some(suppressed) = UNKNOWN_IO_LOG.allow() {
        match write {
            Some(d) => log::debug!(
                "unhandled {kind} write {addr:#x} len {len} data {d:02x?} ({suppressed} suppressed)"
            ),
            None => {
                log::debug!("unhandled {kind} read {addr:#x} len {len} ({suppressed} suppressed)")
            }
        }
    }
}

/// Spawns the thread for `slot`.
pub fn spawn(
    slot: Arc<VcpuSlot>,
    shared: Arc<Shared>,
    ctx: ExitContext,
) -> Result<JoinHandle<()>, Error> {
    let index = slot.index as usize;
    let sh = shared.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || thread_main(slot, sh, ctx))
        .map_err(Error::Spawn)?;
    shared.set_thread(index, handle.as_pthread_t());
    Ok(handle)
}

fn thread_main(slot: Arc<VcpuSlot>, shared: Arc<Shared>, ctx: ExitContext) {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    slot.tid.store(tid, Ordering::SeqCst);
    let index = slot.index as usize;
    loop {
        {
            let mut ctl = shared.lock();
            ctl.parked += 1;
            shared.cv.notify_all();
            while ctl.desired == Desired::Pause {
                ctl = shared.cv.wait(ctl).unwrap_or_else(|p| p.into_inner());
            }
            ctl.parked -= 1;
            if ctl.desired == Desired::Quit {
                if let Some(e) = ctl.exited.get_mut(index) {
                    *e = true;
                }
                shared.cv.notify_all();
                return;
            }
        }
        let mut fd = slot.lock_fd();
        KVM_RUN.with(|c| c.set(fd.get_kvm_run() as *mut kvm_run));
        while shared.running.load(Ordering::SeqCst) {
            if let Err(msg) = run_once(&mut fd, slot.index, &ctx) {
                (ctx.sink)(GuestRequest::InternalError(msg));
                break;
            }
        }
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
        fd.set_kvm_immediate_exit(0);
        drop(fd);
    }
}

/// Runs the vCPU once and handles the exit. `Err` means the vCPU cannot continue.
fn run_once(fd: &mut VcpuFd, index: u32, ctx: &ExitContext) -> Result<(), String> {
    let exit = match fd.run() {
        Ok(exit) => exit,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            fd.set_kvm_immediate_exit(0);
            return Ok(());
        }
        Err(e) => return Err(format!("vCPU {index}: KVM_RUN failed: {e}")),
    };
    match exit {
        VcpuExit::IoIn(port, data) => {
            let len = data.len();
            if !ctx.pio.read(u64::from(port), data) {
                log_unknown("port", u64::from(port), len, None);
            }
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.pio.write(u64::from(port), data) {
                log_unknown("port", u64::from(port), data.len(), Some(data));
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            let len = data.len();
            if !ctx.mmio.read(addr, data) {
                log_unknown("mmio", addr, len, None);
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio.write(addr, data) {
                log_unknown("mmio", addr, data.len(), Some(data));
            }
        }
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => {}
        VcpuExit::Shutdown => {
            match (fd.get_regs(), fd.get_sregs()) {
                (Ok(r), Ok(s)) => log::info!(
                    "vCPU {index}: triple fault at rip {:#x} rsp {:#x} cs {:#x} cr0 {:#x} \
                     cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}/{:#x}",
                    r.rip,
                    r.rsp,
                    s.cs.selector,
                    s.cr0,
                    s.cr3,
                    s.cr4,
                    s.efer,
                    s.idt.base,
                    s.idt.limit
                ),
                _ => log::info!("vCPU {index}: triple fault"),
            }
            (ctx.sink)(GuestRequest::TripleFault);
        }
        VcpuExit::SystemEvent(kind, _) => match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => (ctx.sink)(GuestRequest::Shutdown),
            KVM_SYSTEM_EVENT_RESET => (ctx.sink)(GuestRequest::Reset),
            other => return Err(format!("vCPU {index}: system event {other}")),
        },
        VcpuExit::InternalError => {
            let run = fd.get_kvm_run();
            // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the live
            // union member.
            let (sub, n, data) = unsafe {
                let i = &run.__bindgen_anon_1.internal;
                (i.suberror, i.ndata, i.data)
            };
            let n = (n as usize).min(data.len());
            return Err(format!(
                "vCPU {index}: KVM internal error, suberror {sub}, data {:x?}",
                &data[..n]
            ));
        }
        VcpuExit::FailEntry(reason, cpu) => {
            return Err(format!(
                "vCPU {index}: VM entry failed, hardware reason {reason:#x} on host cpu {cpu}"
            ));
        }
        other => return Err(format!("vCPU {index}: unexpected exit {other:?}")),
    }
    Ok(())
}

/// The state a reset restores.
#[derive(Clone)]
pub struct InitialState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: kvm_mp_state,
    events: kvm_vcpu_events,
    xcrs: Option<kvm_xcrs>,
    debugregs: kvm_debugregs,
    msrs: Vec<kvm_msr_entry>,
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *byte as _;
    }
}

/// LINT0 as ExtINT and LINT1 as NMI, as a PC's BIOS leaves them.
pub fn set_lint(l: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(l, APIC_LVT0);
    set_lapic_reg(l, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(l, APIC_LVT1);
    set_lapic_reg(l, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

/// How a vCPU is configured.
pub struct Config<'a> {
    /// KVM's supported CPUID.
    pub supported_cpuid: &'a [kvm_cpuid_entry2],
    /// Guest topology.
    pub topology: cpuid::Topology,
    /// Whether to advertise TSC-deadline.
    pub tsc_deadline: bool,
    /// MSRs KVM saves/restores (KVM_GET_MSR_INDEX_LIST).
    pub msr_index: &'a [u32],
    /// 64-bit entry point (used on the boot vCPU).
    pub entry: u64,
}

/// Configures vCPU `index` and returns its initial state for later resets.
pub fn configure(fd: &VcpuFd, index: u32, cfg: &Config<'_>) -> Result<InitialState, Error> {
    let entries = cpuid::filter(cfg.supported_cpuid, index, cfg.topology, cfg.tsc_deadline);
    fd.set_cpuid2(&cpuid::to_cpuid(&entries)?)
        .map_err(ioctl_err(index, "KVM_SET_CPUID2"))?;
    let boot_msrs = msr::boot_entries();
    let written = fd
        .set_msrs(&msr::to_msrs(&boot_msrs)?)
        .map_err(ioctl_err(index, "KVM_SET_MSRS"))?;
    if written != boot_msrs.len() {
        log::warn!(
            "vCPU {index}: only {written} of {} boot MSRs accepted",
            boot_msrs.len()
        );
    }
    if index == 0 {
        let sregs = fd.get_sregs().map_err(ioctl_err(index, "KVM_GET_SREGS"))?;
        fd.set_sregs(&boot::boot_sregs(sregs))
            .map_err(ioctl_err(index, "KVM_SET_SREGS"))?;
        fd.set_regs(&boot::boot_regs(cfg.entry))
            .map_err(ioctl_err(index, "KVM_SET_REGS"))?;
    }
    fd.set_fpu(&boot::boot_fpu())
        .map_err(ioctl_err(index, "KVM_SET_FPU"))?;
    let mut lapic = fd.get_lapic().map_err(ioctl_err(index, "KVM_GET_LAPIC"))?;
    set_lint(&mut lapic);
    fd.set_lapic(&lapic)
        .map_err(ioctl_err(index, "KVM_SET_LAPIC"))?;
    snapshot(fd, index, cfg.msr_index)
}

fn snapshot(fd: &VcpuFd, index: u32, msr_index: &[u32]) -> Result<InitialState, Error> {
    let mut msrs = Vec::new();
    for e in msr::reset_candidates(msr_index) {
        let mut one = msr::to_msrs(&[e])?;
        if let Ok(1) = fd.get_msrs(&mut one) {
            msrs.extend_from_slice(one.as_slice());
        }
    }
    Ok(InitialState {
        regs: fd.get_regs().map_err(ioctl_err(index, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(ioctl_err(index, "KVM_GET_SREGS"))?,
        fpu: fd.get_fpu().map_err(ioctl_err(index, "KVM_GET_FPU"))?,
        lapic: fd.get_lapic().map_err(ioctl_err(index, "KVM_GET_LAPIC"))?,
        mp_state: fd
            .get_mp_state()
            .map_err(ioctl_err(index, "KVM_GET_MP_STATE"))?,
        events: fd
            .get_vcpu_events()
            .map_err(ioctl_err(index, "KVM_GET_VCPU_EVENTS"))?,
        xcrs: fd.get_xcrs().ok(),
        debugregs: fd
            .get_debug_regs()
            .map_err(ioctl_err(index, "KVM_GET_DEBUGREGS"))?,
        msrs,
    })
}

/// Puts vCPU `index` back into its initial state. The vCPU must be parked.
pub fn restore(fd: &VcpuFd, index: u32, s: &InitialState) -> Result<(), Error> {
    fd.set_sregs(&s.sregs)
        .map_err(ioctl_err(index, "KVM_SET_SREGS"))?;
    fd.set_regs(&s.regs)
        .map_err(ioctl_err(index, "KVM_SET_REGS"))?;
    fd.set_fpu(&s.fpu)
        .map_err(ioctl_err(index, "KVM_SET_FPU"))?;
    if let Some(x) = &s.xcrs {
        if let Err(e) = fd.set_xcrs(x) {
            log::debug!("vCPU {index}: KVM_SET_XCRS: {e}");
        }
    }
    let all = msr::to_msrs(&s.msrs)?;
    let n = fd
        .set_msrs(&all)
        .map_err(ioctl_err(index, "KVM_SET_MSRS"))?;
    if n < s.msrs.len() {
        // Some MSR refused: write them one by one and skip the refusals.
        for e in &s.msrs[n..] {
            let one = msr::to_msrs(&[*e])?;
            if !matches!(fd.set_msrs(&one), Ok(1)) {
                log::debug!("vCPU {index}: MSR {:#x} not restored", e.index);
            }
        }
    }
    fd.set_lapic(&s.lapic)
        .map_err(ioctl_err(index, "KVM_SET_LAPIC"))?;
    fd.set_vcpu_events(&s.events)
        .map_err(ioctl_err(index, "KVM_SET_VCPU_EVENTS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(ioctl_err(index, "KVM_SET_DEBUGREGS"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(ioctl_err(index, "KVM_SET_MP_STATE"))?;
    Ok(())
}

/// What a parked vCPU reports: (pc, halted).
pub fn sample(fd: &VcpuFd) -> (u64, bool) {
    let pc = fd.get_regs().map(|r| r.rip).unwrap_or(0);
    let halted = fd
        .get_mp_state()
        .map(|m| matches!(m.mp_state, KVM_MP_STATE_HALTED | KVM_MP_STATE_UNINITIALIZED))
        .unwrap_or(false);
    (pc, halted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_pins() {
        let mut l = kvm_lapic_state::default();
        set_lapic_reg(&mut l, APIC_LVT0, 0x0001_0000);
        set_lint(&mut l);
        assert_eq!(lapic_reg(&l, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&l, APIC_LVT1), 0x0000_0400);
    }

    #[test]
    fn guest_requests_are_deduplicated() {
        let s = Shared::new(1);
        assert!(s.resume());
        assert!(s.guest_request(GuestRequest::Shutdown));
        assert!(!s.guest_request(GuestRequest::Reset));
        assert!(
            !s.resume(),
            "resume waits for the machine to handle the request"
        );
        assert_eq!(s.take_guest_request(), Some(GuestRequest::Shutdown));
        assert!(s.resume());
        s.quit();
        assert!(!s.resume());
    }
}
