//! The vhost-user-blk back end on rust-vmm's `vhost-user-backend` framework.
//!
//! The framework handles the vhost-user protocol (memory table, vring addresses, kick and call
//! eventfds) and runs one epoll worker thread per entry of [`BlockBackend::queues_per_thread`]:
//! here one thread per queue, so queues are served in parallel. A kick makes the worker pop every
//! available chain (`virtio-queue` walks the chain and stops on loops, indirect tables inside
//! indirect tables and reads outside guest memory), turn it into [`request::Desc`]s, serve it
//! ([`request::serve`]), and put it on the used ring; with `VIRTIO_RING_F_EVENT_IDX` the guest is
//! interrupted only when it asked to be.
//!
//! A request the host fails goes to the disk's error policy ([`crate::errors`]): completed with
//! an error or as a success, or held (`stop`): then no queue takes a new request until
//! [`BlockBackend::resume`] has retried the held ones, in failure order. Each queue thread also
//! listens on a wake eventfd of its own ([`BlockBackend::attach`]) through which `resume` makes
//! it serve what was kicked while the device was stopped.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bulkhead_ipc::messages::ErrorAction;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;

use crate::errors::{ErrorState, Policies};
use crate::format::DiskImage;
use crate::pool::{Job, Pool};
use crate::request::{self, Desc, Device, Served};

/// Queue size offered to the front end.
pub const QUEUE_SIZE: usize = 256;
/// Most queues (one worker thread each).
pub const MAX_QUEUES: usize = 16;
/// `seg_max` in the config space: data descriptors per request the driver may use.
pub const SEG_MAX: u32 = 128;
/// Most I/O threads per disk (the sandbox's thread budget counts them).
pub const IO_THREADS: usize = bulkhead_sandbox::policy::BLOCKD_IO_THREADS as usize;

/// Guest memory as the framework hands it over.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// What the back end serves.
pub struct BlockBackend {
    disk: Arc<dyn DiskImage>,
    serial: Vec<u8>,
    num_queues: usize,
    /// `blk_size` advertised (512, or 4096 under `cache=none`).
    block_size: u32,
    mem: Mutex<Option<GuestMem>>,
    event_idx: AtomicBool,
    /// `rerror`/`werror` and the requests a `stop` holds.
    errors: ErrorState<Held>,
    /// One per queue thread: written to make it serve its queue (after a resume).
    wakers: Vec<EventFd>,
    /// The I/O threads.
    pool: Pool,
    /// Requests of each queue handed to the pool and not completed yet.
    in_flight: Vec<AtomicUsize>,
}

/// The pool size: [`IO_THREADS`], or fewer if `BULKHEAD_BLOCKD_IO_THREADS` says so (for
/// measurements).
fn io_threads() -> usize {
    std::env::var("BULKHEAD_BLOCKD_IO_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(IO_THREADS, |n| n.clamp(1, IO_THREADS))
}

/// A request held by a `stop` action, to be retried on resume.
pub struct Held {
    vring: VringRwLock,
    head: u16,
    descs: Vec<Desc>,
}

impl BlockBackend {
    /// A back end for `disk` with `num_queues` queues (1..=[`MAX_QUEUES`]), the error
    /// policies `policies` and up to [`IO_THREADS`] I/O threads.
    pub fn new(
        disk: Arc<dyn DiskImage>,
        serial: Vec<u8>,
        num_queues: usize,
        block_size: u32,
        policies: Policies,
    ) -> std::io::Result<BlockBackend> {
        let num_queues = num_queues.clamp(1, MAX_QUEUES);
        let wakers = (0..num_queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<std::io::Result<Vec<_>>>()?;
        let pool = Pool::new(disk.clone(), serial.clone(), num_queues, io_threads())?;
        Ok(BlockBackend {
            in_flight: (0..num_queues).map(|_| AtomicUsize::new(0)).collect(),
            pool,
            disk,
            serial,
            num_queues,
            block_size,
            mem: Mutex::new(None),
            event_idx: AtomicBool::new(false),
            errors: ErrorState::new(policies),
            wakers,
        })
    }

    /// The error policy's state (events go where [`ErrorState::set_events`] says).
    pub fn errors(&self) -> &ErrorState<Held> {
        &self.errors
    }

    /// Registers each queue thread's wake eventfd with its epoll handler (the daemon's
    /// `get_epoll_handlers()`, one per queue, in queue order). Call before serving.
    pub fn attach(
        &self,
        handlers: &[Arc<VringEpollHandler<Arc<BlockBackend>>>],
    ) -> std::io::Result<()> {
        for (q, (h, w)) in handlers.iter().zip(&self.wakers).enumerate() {
            h.register_listener(w.as_raw_fd(), EventSet::IN, self.wake_event())?;
            if let Some(done) = self.pool.completion_fd(q) {
                h.register_listener(done.as_raw_fd(), EventSet::IN, self.done_event())?;
            }
        }
        Ok(())
    }

    /// The epoll data of the wake eventfd (past the queues and the framework's own event).
    fn wake_event(&self) -> u64 {
        self.num_queues as u64 + 1
    }

    /// The epoll data of the I/O threads' completion eventfd.
    fn done_event(&self) -> u64 {
        self.num_queues as u64 + 2
    }

    /// The VM runs again: retries the held requests in failure order (each under the policy
    /// again: one that stops again keeps the device stopped, with the rest held behind it),
    /// then, if none is left, lets every queue take requests again and wakes each queue thread
    /// to serve what was kicked meanwhile. Returns the number of requests still held.
    pub fn resume(&self) -> usize {
        let mem = self.mem.lock().ok().and_then(|m| m.clone());
        while let Some(h) = self.errors.take_held() {
            let Some(mem) = &mem else {
                log::warn!("a held request dropped: no guest memory");
                continue;
            };
            let mem = mem.memory();
            if !h.vring.get_ref().get_queue().ready() {
                log::warn!("a held request dropped: its queue was reset");
                continue;
            }
            let dev = Device {
                disk: &*self.disk,
                serial: &self.serial,
            };
            let done = match request::serve(&*mem, &h.descs, &dev) {
                Served::Done(c) => c,
                Served::Failed(e) => {
                    let (vring, head, descs) = (h.vring.clone(), h.head, h.descs.clone());
                    match self.errors.fail(&e, true, || h) {
                        ErrorAction::Stop => break,
                        ErrorAction::Report => request::finish(&*mem, &descs, request::S_IOERR, 0),
                        ErrorAction::Ignore => {
                            request::finish(&*mem, &descs, request::S_OK, e.ignored_len)
                        }
                    }
                    .complete_on(
                        &vring,
                        head,
                        self.event_idx.load(Ordering::Relaxed),
                    );
                    continue;
                }
            };
            done.complete_on(&h.vring, h.head, self.event_idx.load(Ordering::Relaxed));
        }
        if !self.errors.resume_done() {
            return self.errors.held_count();
        }
        for w in &self.wakers {
            if let Err(e) = w.write(1) {
                log::warn!("waking a queue thread: {e}");
            }
        }
        0
    }

    /// The virtio-blk config space (virtio 1.2, 5.2.4), 60 bytes, little endian.
    pub fn config_space(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        let put = |c: &mut [u8; 60], at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(
            &mut c,
            0,
            &(self.disk.size() / request::SECTOR).to_le_bytes(),
        ); // capacity
        put(&mut c, 12, &SEG_MAX.to_le_bytes()); // seg_max
        put(&mut c, 20, &self.block_size.to_le_bytes()); // blk_size
        put(&mut c, 34, &(self.num_queues as u16).to_le_bytes()); // num_queues
        put(&mut c, 36, &request::MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
        put(&mut c, 40, &(request::MAX_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
        put(&mut c, 44, &(self.block_size / 512).to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &request::MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(&mut c, 52, &(request::MAX_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }

    /// Pops every available request of queue `q` (none while the device is stopped by a held
    /// request) and serves them: a request alone, with none of the queue's in flight, right
    /// here (a hand-off would only add latency), otherwise on the I/O threads, several at once.
    fn process_queue(&self, q: usize, vring: &VringRwLock) {
        if self.errors.stopped() {
            return;
        }
        let Some(mem) = self.mem.lock().ok().and_then(|m| m.clone()) else {
            return;
        };
        let mem = mem.memory().into_inner();
        let mut state = vring.get_mut();
        let mut popped: Vec<(u16, Vec<Desc>)> = Vec::new();
        while !self.errors.stopped() {
            let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.clone()) else {
                break;
            };
            let head = chain.head_index();
            let desc = |d: virtio_queue::desc::split::Descriptor| Desc {
                addr: d.addr(),
                len: d.len(),
                write_only: d.is_write_only(),
            };
            let mut chain = chain.map(desc);
            let mut descs: Vec<Desc> = chain.by_ref().take(request::MAX_DESCRIPTORS).collect();
            // Past the limit keep only the last descriptor (the walk is bounded by the queue or
            // indirect table size): the request then fails with its status where it belongs.
            if let Some(last) = chain.last() {
                descs.push(last);
            }
            popped.push((head, descs));
        }
        let in_flight = &self.in_flight[q];
        if popped.len() == 1 && in_flight.load(Ordering::Relaxed) == 0 {
            let Some((head, descs)) = popped.pop() else {
                return;
            };
            let dev = Device {
                disk: &*self.disk,
                serial: &self.serial,
            };
            let served = request::serve(&*mem, &descs, &dev);
            if let Some(c) = self.settle(vring, &mem, head, descs, served) {
                if let Err(e) = state.add_used(head, c.used_len) {
                    log::warn!("add_used: {e}");
                    return;
                }
                signal(&mut state, self.event_idx.load(Ordering::Relaxed));
            }
            return;
        }
        // Transfers the page cache completes at once are served here too: handing them to an
        // I/O thread would cost more than they do.
        if self.disk.nowait() {
            let dev = Device {
                disk: &*self.disk,
                serial: &self.serial,
            };
            let mut done = false;
            popped.retain(|(head, descs)| {
                let Some(served) = request::serve_nowait(&*mem, descs, &dev) else {
                    return true;
                };
                if let Some(c) = self.settle(vring, &mem, *head, descs.clone(), served) {
                    match state.add_used(*head, c.used_len) {
                        Ok(()) => done = true,
                        Err(e) => log::warn!("add_used: {e}"),
                    }
                }
                false
            });
            if done {
                signal(&mut state, self.event_idx.load(Ordering::Relaxed));
            }
        }
        drop(state);
        in_flight.fetch_add(popped.len(), Ordering::Relaxed);
        for (head, descs) in popped {
            self.pool.submit(Job {
                queue: q,
                head,
                descs,
                mem: mem.clone(),
            });
        }
    }

    /// Queue `q`'s completions from the I/O threads onto its used ring, then one signal.
    fn complete(&self, q: usize, vring: &VringRwLock) {
        let done = self.pool.take_done(q);
        if done.is_empty() {
            return;
        }
        self.in_flight[q].fetch_sub(done.len(), Ordering::Relaxed);
        let mut state = vring.get_mut();
        let mut any = false;
        for d in done {
            let Some(c) = self.settle(vring, &d.mem, d.head, d.descs, d.served) else {
                continue;
            };
            if let Err(e) = state.add_used(d.head, c.used_len) {
                log::warn!("add_used: {e}");
                continue;
            }
            any = true;
        }
        if any {
            signal(&mut state, self.event_idx.load(Ordering::Relaxed));
        }
    }

    /// The used-ring entry of a served request; a request the host failed goes through the
    /// error policy first (`None`: held by a `stop` action, not completed).
    fn settle(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemoryMmap,
        head: u16,
        descs: Vec<Desc>,
        served: Served,
    ) -> Option<request::Completion> {
        let e = match served {
            Served::Done(c) => return Some(c),
            Served::Failed(e) => e,
        };
        let (status, len) = match self.errors.fail(&e, false, || Held {
            vring: vring.clone(),
            head,
            descs: descs.clone(),
        }) {
            ErrorAction::Stop => return None,
            ErrorAction::Report => (request::S_IOERR, 0),
            ErrorAction::Ignore => (request::S_OK, e.ignored_len),
        };
        Some(request::finish(mem, &descs, status, len))
    }
}

impl request::Completion {
    /// Puts this request (`head`) on `vring`'s used ring and signals the guest if it asked.
    fn complete_on(&self, vring: &VringRwLock, head: u16, event_idx: bool) {
        let mut state = vring.get_mut();
        if let Err(e) = state.add_used(head, self.used_len) {
            log::warn!("add_used: {e}");
            return;
        }
        signal(&mut state, event_idx);
    }
}

fn signal(state: &mut VringState<GuestMem>, event_idx: bool) {
    let needed = if event_idx {
        state.needs_notification().unwrap_or(true)
    } else {
        true
    };
    if needed {
        if let Err(e) = state.signal_used_queue() {
            log::warn!("signalling the used queue: {e}");
        }
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_MQ
            | 1 << VIRTIO_BLK_F_DISCARD
            | 1 << VIRTIO_BLK_F_WRITE_ZEROES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config_space();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        let mut v = c[start..end].to_vec();
        v.resize(size as usize, 0);
        v
    }

    fn update_memory(&self, mem: GuestMem) -> std::io::Result<()> {
        let mut m = self
            .mem
            .lock()
            .map_err(|_| std::io::Error::other("memory lock poisoned"))?;
        *m = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Lets the framework stop each worker thread when the front end goes (without it the
        // handler's drop would wait for them forever).
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                log::warn!("exit eventfd: {e}");
                None
            }
        }
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if !evset.contains(EventSet::IN) {
            // An error return would end this queue's worker thread: log and carry on.
            log::warn!("queue event without IN: {evset:?}");
            return Ok(());
        }
        let Some(vring) = vrings.first() else {
            log::warn!("event {device_event} for a thread without a queue");
            return Ok(());
        };
        // One queue per thread: the thread's index is the queue's.
        let q = thread_id;
        let ev = u64::from(device_event);
        if ev == self.done_event() {
            self.complete(q, vring);
            return Ok(());
        }
        if ev == self.wake_event() {
            // resume() wakes this queue's thread: consume the eventfd, serve the queue.
            if let Some(w) = self.wakers.get(q) {
                let _ = w.read();
            }
        } else if device_event != 0 {
            log::warn!("event {device_event} for no queue of this thread");
            return Ok(());
        }
        if self.event_idx.load(Ordering::Relaxed) {
            // Serve, re-enable notifications, and serve again what slipped in meanwhile.
            loop {
                let _ = vring.disable_notification();
                self.process_queue(q, vring);
                if self.errors.stopped() {
                    // Held: what is left waits for resume(), which wakes this thread.
                    let _ = vring.enable_notification();
                    break;
                }
                match vring.enable_notification() {
                    Ok(true) => continue,
                    _ => break,
                }
            }
        } else {
            self.process_queue(q, vring);
        }
        Ok(())
    }
}
