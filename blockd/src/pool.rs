//! A disk's I/O threads: several requests of a queue in flight at once.
//!
//! A queue thread ([`crate::backend`]) pops requests and hands them here as [`Job`]s; an I/O
//! thread serves each one whole ([`request::serve`]: checks, `preadv`/`pwritev` between the
//! image and guest memory, status byte) and puts the result on its queue's completion list,
//! writing the queue's completion eventfd when the list was empty. The queue thread, woken by
//! that eventfd in its epoll set, takes the whole list ([`Pool::take_done`]), puts the
//! requests on the used ring and signals the guest once (respecting `EVENT_IDX`).
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
        Ok(Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                cond: Condvar::new(),
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
        let mut st = sh.lock();
        st.jobs.push_back(job);
        if st.jobs.len() > st.idle && st.threads < sh.max_threads {
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
                        let job = st.jobs.pop_back();
                        drop(st);
                        if let Some(job) = job {
                            sh.serve(job);
                        }
                        return;
                    }
                }
            }
        }
        // A notify is a futex system call: only when a thread waits for it.
        let wake = st.idle > 0;
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

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An I/O thread: serve jobs until the pool goes.
    fn run(&self) {
        loop {
            let job = {
                let mut st = self.lock();
                loop {
                    if st.quit {
                        return;
                    }
                    if let Some(j) = st.jobs.pop_front() {
                        break j;
                    }
                    st.idle += 1;
                    st = self.cond.wait(st).unwrap_or_else(PoisonError::into_inner);
                    st.idle -= 1;
                }
            };
            self.serve(job);
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
    use crate::request::{Completion, S_OK};
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// A disk whose reads take a while, counting how many run at once.
    struct Slow {
        now: Mutex<(usize, usize)>,
    }

    impl DiskImage for Slow {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_only(&self) -> bool {
            false
        }
        fn read_at(&self, buf: &mut [u8], _: u64) -> crate::Result<()> {
            {
                let mut n = self.now.lock().unwrap();
                n.0 += 1;
                n.1 = n.1.max(n.0);
            }
            std::thread::sleep(Duration::from_millis(50));
            buf.fill(0x42);
            self.now.lock().unwrap().0 -= 1;
            Ok(())
        }
        fn write_at(&self, _: &[u8], _: u64) -> crate::Result<()> {
            Ok(())
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

    #[test]
    fn requests_run_at_once_up_to_the_pool_size_and_complete_on_their_queue() {
        let disk = Arc::new(Slow {
            now: Mutex::new((0, 0)),
        });
        let pool = Pool::new(disk.clone(), Vec::new(), 2, 4).unwrap();
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        // Eight 512-byte reads, each with its own header, buffer and status, on two queues.
        for i in 0..8u64 {
            let base = 0x1000 * (i + 1);
            let mut h = [0u8; 16];
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
                    write_only: true,
                },
                Desc {
                    addr: GuestAddress(base + 0x800),
                    len: 1,
                    write_only: true,
                },
            ];
            pool.submit(Job {
                queue: (i % 2) as usize,
                head: i as u16,
                descs,
                mem: mem.clone(),
            });
        }
        let start = Instant::now();
        let mut got = [Vec::new(), Vec::new()];
        while got[0].len() + got[1].len() < 8 {
            assert!(start.elapsed() < Duration::from_secs(10), "completions");
            for (q, g) in got.iter_mut().enumerate() {
                g.extend(pool.take_done(q).into_iter().map(|d| (d.head, d.served)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for (q, g) in got.iter().enumerate() {
            let mut heads: Vec<u16> = g.iter().map(|x| x.0).collect();
            heads.sort_unstable();
            assert_eq!(
                heads,
                (0..8).filter(|h| h % 2 == q as u16).collect::<Vec<_>>()
            );
            for (_, s) in g {
                assert_eq!(
                    *s,
                    Served::Done(Completion {
                        used_len: 513,
                        status: Some(S_OK)
                    })
                );
            }
        }
        assert_eq!(
            disk.now.lock().unwrap().1,
            4,
            "four at once, the pool's size"
        );
        assert_eq!(pool.threads(), 4);
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(0x8200)).unwrap();
        assert_eq!(b, [0x42; 512]);
    }
}
