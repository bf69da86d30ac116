//! A disk's I/O threads: several requests of a queue in flight at once.
//!
//! A queue thread ([`crate::backend`]) pops requests and hands them here as [`Job`]s; an I/O
//! thread serves each one whole ([`request::serve`]: checks, `preadv`/`pwritev` between the
//! image and guest memory, status byte) and puts the result on its queue's completion list,
//! writing the queue's completion eventfd when the list was empty. The queue thread, woken by
//! that eventfd in its epoll set, takes the whole list ([`Pool::take_done`]), puts the
//! requests on the used ring and signals the guest once (respecting `EVENT_IDX`).
//!
//! Writes to an image whose writes the kernel serialises anyway
//! ([`DiskImage::serialized_writes`]: a buffered fd, or a file on tmpfs) go to a lane of their
//! own that one thread at a time serves, in arrival order; every other request (reads, flushes,
//! discards) still runs on any thread. Writers racing for the inode lock gain nothing and burn
//! CPU spinning and switching: on tmpfs, 4 KiB random writes at queue depth 32 ran at 177 k
//! IOPS from 32 threads and at 306 k from one.
//!
//! Threads are started on demand — one more whenever a job is queued and no thread is idle for
//! it — up to the pool's size (the blockd sandbox's `RLIMIT_NPROC` counts them: see
//! `bulkhead_sandbox::policy::BLOCKD_IO_THREADS`), and wait on a condition variable when there
//! is nothing to do. Only system calls the blockd policy already allows are made (`futex`,
//! `clone` for a thread, `write` on an eventfd). Why threads and not io_uring: see
//! docs/ARCHITECTURE.md, "blockd".

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::format::DiskImage;
use crate::request::{self, Desc, Device, Served};

/// Stack of an I/O thread (request serving needs little; qcow2's buffers are on the heap).
const STACK: usize = 512 << 10;

/// One request for an I/O thread.
pub struct Job {
    /// The queue it came from (where its completion goes).
    pub queue: usize,
    /// Its head descriptor index.
    pub head: u16,
    /// Its descriptors, in chain order.
    pub descs: Vec<Desc>,
    /// The guest memory it was popped with (kept mapped until it completes).
    pub mem: Arc<GuestMemoryMmap>,
}

/// A served request, for its queue thread.
pub struct Done {
    /// Its head descriptor index.
    pub head: u16,
    /// Its descriptors (for the error policy: held requests are retried from them).
    pub descs: Vec<Desc>,
    /// What serving it came to.
    pub served: Served,
    /// The guest memory it was served in.
    pub mem: Arc<GuestMemoryMmap>,
}

/// A queue's completion list and the eventfd that says it is not empty.
struct Completions {
    list: Mutex<Vec<Done>>,
    efd: EventFd,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// The write lane: data writes of an image whose writes the kernel serialises.
    writes: VecDeque<Job>,
    /// A thread is serving a job of the write lane.
    writing: bool,
    /// Threads waiting for a job.
    idle: usize,
    /// Threads started.
    threads: usize,
    /// The pool is dropped: threads exit.
    quit: bool,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    disk: Arc<dyn DiskImage>,
    serial: Vec<u8>,
    queues: Vec<Completions>,
    max_threads: usize,
    /// Data writes go to the write lane ([`DiskImage::serialized_writes`]).
    write_lane: bool,
}

/// The I/O threads of one disk and the completion lists of its queues.
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    /// A pool serving `disk` for `num_queues` queues with at most `max_threads` threads (none
    /// started yet).
    pub fn new(
        disk: Arc<dyn DiskImage>,
        serial: Vec<u8>,
        num_queues: usize,
        max_threads: usize,
    ) -> std::io::Result<Pool> {
        let queues = (0..num_queues)
            .map(|_| {
                Ok(Completions {
                    list: Mutex::new(Vec::new()),
                    efd: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let write_lane = disk.serialized_writes();
        log::debug!(
            "I/O threads: up to {max_threads}; writes {}",
            if write_lane {
                "one at a time (the kernel serialises them)"
            } else {
                "in parallel"
            }
        );
        Ok(Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                cond: Condvar::new(),
                write_lane,
                disk,
                serial,
                queues,
                max_threads: max_threads.max(1),
            }),
        })
    }

    /// The eventfd written when queue `q` has completions.
    pub fn completion_fd(&self, q: usize) -> Option<&EventFd> {
        self.shared.queues.get(q).map(|c| &c.efd)
    }

    /// Threads started so far.
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }

    /// Queues `job` for an I/O thread, starting one if none is idle for it. If not a single
    /// thread can be started the job is served here, on the caller's thread.
    pub fn submit(&self, job: Job) {
        let sh = &self.shared;
        let lane = sh.write_lane && request::writes_data(&*job.mem, &job.descs);
        let mut st = sh.lock();
        if lane {
            st.writes.push_back(job);
        } else {
            st.jobs.push_back(job);
        }
        if st.runnable() > st.idle && st.threads < sh.max_threads {
            let shared = Arc::clone(sh);
            match std::thread::Builder::new()
                .name("blk-io".into())
                .stack_size(STACK)
                .spawn(move || shared.run())
            {
                Ok(_) => st.threads += 1,
                Err(e) => {
                    log::warn!("starting an I/O thread ({} running): {e}", st.threads);
                    if st.threads == 0 {
                        let job = if lane {
                            st.writes.pop_back()
                        } else {
                            st.jobs.pop_back()
                        };
                        drop(st);
                        if let Some(job) = job {
                            sh.serve(job);
                        }
                        return;
                    }
                }
            }
        }
        // A notify is a futex system call: only when a thread waits for a job it can take
        // (a write queued behind the one being served is taken by that one's thread).
        let wake = st.idle > 0 && !(lane && st.writing);
        drop(st);
        if wake {
            sh.cond.notify_one();
        }
    }

    /// Everything queue `q` has completed since the last call (its eventfd consumed first, so
    /// a completion that arrives meanwhile writes it again).
    pub fn take_done(&self, q: usize) -> Vec<Done> {
        let Some(c) = self.shared.queues.get(q) else {
            return Vec::new();
        };
        let _ = c.efd.read();
        std::mem::take(&mut *c.list.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.lock().quit = true;
        self.shared.cond.notify_all();
    }
}

impl State {
    /// Jobs a thread could take now: the write lane's next one unless one is being served.
    fn runnable(&self) -> usize {
        self.jobs.len() + usize::from(!self.writing && !self.writes.is_empty())
    }

    /// The next job a thread may serve (the write lane first: it is the bottleneck), and
    /// whether it is the write lane's.
    fn take(&mut self) -> Option<(Job, bool)> {
        if !self.writing {
            if let Some(j) = self.writes.pop_front() {
                self.writing = true;
                return Some((j, true));
            }
        }
        self.jobs.pop_front().map(|j| (j, false))
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An I/O thread: serve jobs until the pool goes.
    fn run(&self) {
        let mut wrote = false;
        loop {
            let (job, lane) = {
                let mut st = self.lock();
                if wrote {
                    st.writing = false;
                }
                loop {
                    if st.quit {
                        return;
                    }
                    if let Some(j) = st.take() {
                        break j;
                    }
                    st.idle += 1;
                    st = self.cond.wait(st).unwrap_or_else(PoisonError::into_inner);
                    st.idle -= 1;
                }
            };
            self.serve(job);
            wrote = lane;
        }
    }

    fn serve(&self, job: Job) {
        let dev = Device {
            disk: &*self.disk,
            serial: &self.serial,
        };
        let served = request::serve(&*job.mem, &job.descs, &dev);
        let Some(c) = self.queues.get(job.queue) else {
            return;
        };
        let was_empty = {
            let mut list = c.list.lock().unwrap_or_else(PoisonError::into_inner);
            let e = list.is_empty();
            list.push(Done {
                head: job.head,
                descs: job.descs,
                served,
                mem: job.mem,
            });
            e
        };
        if was_empty {
            if let Err(e) = c.efd.write(1) {
                log::warn!("signalling a completion: {e}");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::request::{Completion, S_OK, T_IN, T_OUT};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// How many of one kind of transfer ran at once, and their offsets in start order.
    #[derive(Default)]
    struct Seen {
        now: usize,
        max: usize,
        order: Vec<u64>,
    }

    /// A disk whose reads and writes take a while, counting how many run at once.
    #[derive(Default)]
    struct Slow {
        reads: Mutex<Seen>,
        writes: Mutex<Seen>,
        serialized: bool,
    }

    impl Slow {
        fn run(seen: &Mutex<Seen>, offset: u64) {
            {
                let mut s = seen.lock().unwrap();
                s.now += 1;
                s.max = s.max.max(s.now);
                s.order.push(offset);
            }
            std::thread::sleep(Duration::from_millis(50));
            seen.lock().unwrap().now -= 1;
        }
    }

    impl DiskImage for Slow {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            Slow::run(&self.reads, offset);
            buf.fill(0x42);
            Ok(())
        }
        fn write_at(&self, _: &[u8], offset: u64) -> crate::Result<()> {
            Slow::run(&self.writes, offset);
            Ok(())
        }
        fn serialized_writes(&self) -> bool {
            self.serialized
        }
        fn flush(&self) -> crate::Result<()> {
            Ok(())
        }
        fn discard(&self, _: u64, _: u64) -> crate::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> crate::Result<()> {
            Ok(())
        }
    }

    /// Request `i` (a 512-byte read or write of sector `i`, its header, buffer and status in
    /// page `i + 1`) on queue `i % queues`.
    fn job(mem: &Arc<GuestMemoryMmap>, i: u64, write: bool, queues: u64) -> Job {
        let base = 0x1000 * (i + 1);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
        h[8..].copy_from_slice(&i.to_le_bytes());
        mem.write_slice(&h, GuestAddress(base)).unwrap();
        let descs = vec![
            Desc {
                addr: GuestAddress(base),
                len: 16,
                write_only: false,
            },
            Desc {
                addr: GuestAddress(base + 0x200),
                len: 512,
                write_only: !write,
            },
            Desc {
                addr: GuestAddress(base + 0x800),
                len: 1,
                write_only: true,
            },
        ];
        Job {
            queue: (i % queues) as usize,
            head: i as u16,
            descs,
            mem: mem.clone(),
        }
    }

    /// Waits for `n` completions over `queues` queues: (queue, head, what serving came to).
    fn wait_done(pool: &Pool, queues: usize, n: usize) -> Vec<(usize, u16, Served)> {
        let start = Instant::now();
        let mut got = Vec::new();
        while got.len() < n {
            assert!(start.elapsed() < Duration::from_secs(10), "completions");
            for q in 0..queues {
                got.extend(pool.take_done(q).into_iter().map(|d| (q, d.head, d.served)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        got
    }

    fn new_mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap())
    }

    #[test]
    fn requests_run_at_once_up_to_the_pool_size_and_complete_on_their_queue() {
        let disk = Arc::new(Slow::default());
        let pool = Pool::new(disk.clone(), Vec::new(), 2, 4).unwrap();
        let mem = new_mem();
        for i in 0..8u64 {
            pool.submit(job(&mem, i, false, 2));
        }
        let got = wait_done(&pool, 2, 8);
        for q in 0..2 {
            let mut heads: Vec<u16> = got.iter().filter(|g| g.0 == q).map(|g| g.1).collect();
            heads.sort_unstable();
            assert_eq!(
                heads,
                (0..8).filter(|h| h % 2 == q as u16).collect::<Vec<_>>()
            );
        }
        for (_, _, s) in &got {
            assert_eq!(
                *s,
                Served::Done(Completion {
                    used_len: 513,
                    status: Some(S_OK)
                })
            );
        }
        assert_eq!(
            disk.reads.lock().unwrap().max,
            4,
            "four at once, the pool's size"
        );
        assert_eq!(pool.threads(), 4);
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(0x8200)).unwrap();
        assert_eq!(b, [0x42; 512]);
    }

    #[test]
    fn serialized_writes_take_one_lane_in_order_while_reads_overlap() {
        let disk = Arc::new(Slow {
            serialized: true,
            ..Slow::default()
        });
        let pool = Pool::new(disk.clone(), Vec::new(), 1, 4).unwrap();
        let mem = new_mem();
        // Writes of sectors 0, 2, 4, 6 and reads of 1, 3, 5, 7, interleaved.
        for i in 0..8u64 {
            pool.submit(job(&mem, i, i % 2 == 0, 1));
        }
        let got = wait_done(&pool, 1, 8);
        assert!(got.iter().all(|g| g.2
            == Served::Done(Completion {
                used_len: if g.1 % 2 == 0 { 1 } else { 513 },
                status: Some(S_OK)
            })));
        let w = disk.writes.lock().unwrap();
        assert_eq!(w.max, 1, "one write at a time");
        assert_eq!(w.order, [0, 2 * 512, 4 * 512, 6 * 512], "in arrival order");
        assert!(disk.reads.lock().unwrap().max >= 2, "reads still overlap");
        assert!(pool.threads() <= 4);
    }

    #[test]
    fn writes_overlap_when_the_image_does_not_serialise_them() {
        let disk = Arc::new(Slow::default());
        let pool = Pool::new(disk.clone(), Vec::new(), 1, 4).unwrap();
        let mem = new_mem();
        for i in 0..4u64 {
            pool.submit(job(&mem, i, true, 1));
        }
        wait_done(&pool, 1, 4);
        assert_eq!(disk.writes.lock().unwrap().max, 4);
    }
}
