//! The vhost-user front end of one device: the connection to its back end (blockd, netd, or
//! any standard vhost-user server such as `qemu-storage-daemon`), feature and protocol
//! negotiation when the device is plugged, and starting/stopping the rings when the guest's
//! driver does. The back end is not trusted: every reply is checked by the `vhost` crate, a
//! back end that stops answering is cut off by the [`Watchdog`] after [`REPLY_TIMEOUT`] (the
//! crate retries a timed-out `recvmsg` forever, so a socket timeout alone would not do), and a
//! failure only breaks this one device.

use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMem;

/// How long a back end may take to answer one message before the device is declared broken.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol features this front end uses when the back end offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// Errors talking to a back end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A vhost-user exchange failed.
    #[error("vhost-user {what}: {source}")]
    Protocol {
        /// The step.
        what: &'static str,
        /// What the vhost crate reported.
        source: vhost::Error,
    },
    /// Setting up the socket failed.
    #[error("vhost-user socket: {0}")]
    Socket(std::io::Error),
    /// A ring address is not in guest RAM.
    #[error("queue {queue}: ring at {addr:#x} (+{len:#x}) is not in guest RAM")]
    RingOutsideRam {
        /// Queue index.
        queue: usize,
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Guest memory cannot be shared (a region without an fd).
    #[error("guest memory region at {0:#x} has no fd to share")]
    Memory(u64),
    /// The back end did not answer in time; its connection was shut down.
    #[error("the vhost-user back end did not answer within {0:?}; it is disconnected")]
    Timeout(Duration),
    /// The watchdog thread could not be started.
    #[error("cannot start the vhost-user watchdog thread: {0}")]
    Watchdog(std::io::Error),
}

/// One connection the watchdog may cut.
struct Guarded {
    deadline: Mutex<Option<Instant>>,
    stream: UnixStream,
    fired: AtomicBool,
}

/// Cuts off back ends that stop answering: while a vhost-user exchange is in flight its
/// connection is armed with a deadline, and one thread for the whole process shuts down the
/// socket of any exchange past it, so the blocked `recvmsg` returns and the call fails.
pub struct Watchdog {
    guarded: Mutex<Vec<Weak<Guarded>>>,
    wake: Condvar,
}

impl Watchdog {
    fn get() -> Result<&'static Arc<Watchdog>, Error> {
        static WATCHDOG: OnceLock<Arc<Watchdog>> = OnceLock::new();
        static STARTED: Mutex<bool> = Mutex::new(false);
        let wd = WATCHDOG.get_or_init(|| {
            Arc::new(Watchdog {
                guarded: Mutex::new(Vec::new()),
                wake: Condvar::new(),
            })
        });
        let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
        if !*started {
            let w = wd.clone();
            std::thread::Builder::new()
                .name("vhost-watchdog".into())
                .spawn(move || w.run())
                .map_err(Error::Watchdog)?;
            *started = true;
        }
        Ok(wd)
    }

    fn watch(&self, g: &Arc<Guarded>) {
        let mut list = self.guarded.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.push(Arc::downgrade(g));
    }

    fn run(&self) {
        let mut list = self.guarded.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            list.retain(|w| w.strong_count() > 0);
            for g in list.iter().filter_map(Weak::upgrade) {
                let deadline = *g.deadline.lock().unwrap_or_else(|p| p.into_inner());
                match deadline {
                    Some(d) if d <= now && !g.fired.swap(true, Ordering::SeqCst) => {
                        log::error!("a vhost-user back end stopped answering: disconnecting it");
                        let _ = g.stream.shutdown(Shutdown::Both);
                    }
                    Some(d) if d <= now => {}
                    Some(d) => next = Some(next.map_or(d, |n| n.min(d))),
                    None => {}
                }
            }
            let wait = next.map_or(Duration::from_secs(3600), |n| n - now);
            list = match self.wake.wait_timeout(list, wait) {
                Ok((l, _)) => l,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::Protocol { what, source }
}

/// One queue as the guest's driver set it up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingSetup {
    /// Queue size.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Driver (available) ring.
    pub avail: u64,
    /// Device (used) ring.
    pub used: u64,
}

/// A connected back end.
pub struct Backend {
    fe: Frontend,
    guard: Arc<Guarded>,
    /// Virtio features the back end offers (without `VHOST_USER_F_PROTOCOL_FEATURES`).
    pub features: u64,
    protocol: VhostUserProtocolFeatures,
    /// Queues the back end serves at most.
    pub max_queues: usize,
    started: Vec<bool>,
}

impl Backend {
    /// Takes the connected socket and negotiates: owner, features, protocol features, queue
    /// count.
    pub fn connect(sock: OwnedFd, queues: usize) -> Result<Self, Error> {
        let stream = UnixStream::from(sock);
        let guard = Arc::new(Guarded {
            deadline: Mutex::new(None),
            stream: stream.try_clone().map_err(Error::Socket)?,
            fired: AtomicBool::new(false),
        });
        let wd = Watchdog::get()?;
        wd.watch(&guard);
        let fe = Frontend::from_stream(stream, queues as u64);
        let mut b = Backend {
            fe,
            guard,
            features: 0,
            protocol: VhostUserProtocolFeatures::empty(),
            max_queues: queues,
            started: Vec::new(),
        };
        b.guarded(|b| b.negotiate(queues))?;
        Ok(b)
    }

    /// Runs `f` with the watchdog armed.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error> {
        if self.guard.fired.load(Ordering::SeqCst) {
            return Err(Error::Timeout(REPLY_TIMEOUT));
        }
        *self
            .guard
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + REPLY_TIMEOUT);
        if let Ok(wd) = Watchdog::get() {
            wd.wake.notify_all();
        }
        let r = f(self);
        *self
            .guard
            .deadline
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        if self.guard.fired.load(Ordering::SeqCst) {
            return Err(Error::Timeout(REPLY_TIMEOUT));
        }
        r
    }

    fn negotiate(&mut self, queues: usize) -> Result<(), Error> {
        let fe = &mut self.fe;
        fe.set_owner().map_err(proto("SET_OWNER"))?;
        let offered = fe.get_features().map_err(proto("GET_FEATURES"))?;
        let pf_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut max_queues = queues;
        if offered & pf_bit != 0 {
            // The protocol features must be negotiated before anything else uses them.
            let theirs = fe
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            protocol = theirs & wanted_protocol_features();
            fe.set_protocol_features(protocol)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let n = fe.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
                max_queues = max_queues
                    .min(usize::try_from(n).unwrap_or(usize::MAX))
                    .max(1);
            } else {
                max_queues = max_queues.clamp(1, 2);
            }
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        self.features = offered & !pf_bit;
        self.protocol = protocol;
        self.max_queues = max_queues;
        self.started = vec![false; max_queues];
        Ok(())
    }

    /// Whether the back end serves its configuration space (`GET_CONFIG`).
    pub fn has_config(&self) -> bool {
        self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
    }

    /// Reads `len` bytes of the device configuration space.
    pub fn get_config(&mut self, len: usize) -> Result<Vec<u8>, Error> {
        self.guarded(|b| {
            let buf = vec![0u8; len];
            let (_, data) =
                b.fe.get_config(0, len as u32, VhostUserConfigFlags::WRITABLE, &buf)
                    .map_err(proto("GET_CONFIG"))?;
            Ok(data)
        })
    }

    /// Writes `data` at `offset` of the device configuration space.
    pub fn set_config(&mut self, offset: u32, data: &[u8]) -> Result<(), Error> {
        self.guarded(|b| {
            b.fe.set_config(offset, VhostUserConfigFlags::WRITABLE, data)
                .map_err(proto("SET_CONFIG"))
        })
    }

    /// Starts the device the way the driver set it up: acked features, guest memory, and each
    /// ring with its kick (ioeventfd) and call (irqfd) eventfds. Rings with an index below
    /// `enabled_below` are enabled (`SET_VRING_ENABLE`); the others are set up but stay
    /// disabled until [`Backend::set_vring_enable`] (virtio-net's queue pairs beyond the active
    /// ones, as QEMU's vhost-user-net).
    pub fn start(
        &mut self,
        acked: u64,
        mem: &GuestMem,
        rings: &[(usize, RingSetup, &EventFd, &EventFd)],
        enabled_below: usize,
    ) -> Result<(), Error> {
        self.guarded(|b| b.start_unguarded(acked, mem, rings, enabled_below))
    }

    /// Enables or disables one started ring (`SET_VRING_ENABLE`); a no-op without protocol
    /// features (rings are enabled when started then).
    pub fn set_vring_enable(&mut self, queue: usize, on: bool) -> Result<(), Error> {
        if self.protocol.is_empty() || !self.started.get(queue).copied().unwrap_or(false) {
            return Ok(());
        }
        self.guarded(|b| {
            b.fe.set_vring_enable(queue, on)
                .map_err(proto("SET_VRING_ENABLE"))
        })
    }

    fn start_unguarded(
        &mut self,
        acked: u64,
        mem: &GuestMem,
        rings: &[(usize, RingSetup, &EventFd, &EventFd)],
        enabled_below: usize,
    ) -> Result<(), Error> {
        let mut features = acked & self.features;
        if !self.protocol.is_empty() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.fe
            .set_features(features)
            .map_err(proto("SET_FEATURES"))?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            regions.push(
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| Error::Memory(r.start_addr().0))?,
            );
        }
        self.fe
            .set_mem_table(&regions)
            .map_err(proto("SET_MEM_TABLE"))?;
        for (q, ring, kick, call) in rings {
            let q = *q;
            let size = u64::from(ring.size);
            let host = |addr: u64, len: u64| -> Result<u64, Error> {
                let bad = Error::RingOutsideRam {
                    queue: q,
                    addr,
                    len,
                };
                if !crate::memory::is_ram(mem, addr, len) {
                    return Err(bad);
                }
                mem.get_host_address(GuestAddress(addr))
                    .map(|p| p as u64)
                    .map_err(|_| bad)
            };
            let cfg = VringConfigData {
                queue_max_size: ring.size,
                queue_size: ring.size,
                flags: 0,
                desc_table_addr: host(ring.desc, 16 * size)?,
                avail_ring_addr: host(ring.avail, 6 + 2 * size)?,
                used_ring_addr: host(ring.used, 6 + 8 * size)?,
                log_addr: None,
            };
            self.fe
                .set_vring_num(q, ring.size)
                .map_err(proto("SET_VRING_NUM"))?;
            self.fe
                .set_vring_base(q, 0)
                .map_err(proto("SET_VRING_BASE"))?;
            self.fe
                .set_vring_addr(q, &cfg)
                .map_err(proto("SET_VRING_ADDR"))?;
            self.fe
                .set_vring_call(q, call)
                .map_err(proto("SET_VRING_CALL"))?;
            self.fe
                .set_vring_kick(q, kick)
                .map_err(proto("SET_VRING_KICK"))?;
            if let Some(s) = self.started.get_mut(q) {
                *s = true;
            }
        }
        if !self.protocol.is_empty() {
            for (q, ..) in rings.iter().filter(|(q, ..)| *q < enabled_below) {
                self.fe
                    .set_vring_enable(*q, true)
                    .map_err(proto("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops every started ring (`GET_VRING_BASE`), e.g. when the driver resets the device.
    pub fn stop(&mut self) -> Result<(), Error> {
        if !self.started.iter().any(|s| *s) {
            return Ok(());
        }
        self.guarded(|b| b.stop_unguarded())
    }

    fn stop_unguarded(&mut self) -> Result<(), Error> {
        let mut first_err = None;
        for q in 0..self.started.len() {
            if !std::mem::take(&mut self.started[q]) {
                continue;
            }
            if !self.protocol.is_empty() {
                if let Err(e) = self.fe.set_vring_enable(q, false) {
                    first_err.get_or_insert(proto("SET_VRING_ENABLE")(e));
                }
            }
            if let Err(e) = self.fe.get_vring_base(q) {
                first_err.get_or_insert(proto("GET_VRING_BASE")(e));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
