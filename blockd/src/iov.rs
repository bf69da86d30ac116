//! A request's data buffers in guest memory as `iovec`s, so reads and writes go between the
//! image fd and guest memory with one `preadv`/`pwritev` and no copy ([`GuestIov`],
//! [`preadv_full`], [`pwritev_all`]); and the copying fallback for transfers that cannot
//! (`O_DIRECT` with unaligned guest buffers, qcow2): [`bounce_read`], [`bounce_write`] through a
//! buffer each thread keeps.
//!
//! Every `iovec` comes from `vm-memory`'s bounds-checked slices of the guest memory mapping
//! ([`GuestIov::from_guest`]): a descriptor outside guest memory is an error before any I/O,
//! and a `GuestIov` borrows the memory, so the mapping outlives every use of its pointers.

use std::cell::RefCell;
use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::format::{AlignedBuf, DiskImage};
use crate::{Error, Result};

/// Most `iovec`s one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`); longer lists go in
/// several calls.
const IOV_MAX: usize = 1024;

/// The guest buffers of one transfer, in order.
pub struct GuestIov<'m> {
    iov: Vec<libc::iovec>,
    total: usize,
    /// The guest memory the pointers are into, borrowed for as long as they are used.
    _mem: PhantomData<&'m ()>,
}

impl<'m> GuestIov<'m> {
    /// The host addresses of `bufs` (guest address, length) in `mem`, which the transfer will
    /// `access` (`Write`: the device writes them, a read from the image). `Err` if any part is
    /// outside guest memory.
    pub fn from_guest<M: GuestMemory + ?Sized>(
        mem: &'m M,
        bufs: impl IntoIterator<Item = (GuestAddress, u32)>,
        access: Permissions,
    ) -> std::result::Result<GuestIov<'m>, vm_memory::GuestMemoryError> {
        let mut iov = Vec::new();
        let mut total = 0usize;
        for (addr, len) in bufs {
            let len = len as usize;
            for slice in mem.get_slices(addr, len, access)? {
                let slice = slice?;
                let guard = slice.ptr_guard_mut();
                iov.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: slice.len(),
                });
                total += slice.len();
            }
        }
        Ok(GuestIov {
            iov,
            total,
            _mem: PhantomData,
        })
    }

    /// Bytes in all.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Whether every buffer's address and length are multiples of `align` (what `O_DIRECT`
    /// needs of memory).
    pub fn aligned(&self, align: usize) -> bool {
        self.iov
            .iter()
            .all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
    }

    /// Copies the guest buffers into `buf` (at most `buf.len()` bytes).
    pub fn gather(&self, buf: &mut [u8]) {
        let mut at = 0;
        for v in &self.iov {
            let n = v.iov_len.min(buf.len() - at);
            // The guest may change its memory meanwhile: the bytes are then its own problem, as
            // on real hardware.
            // SAFETY: iov_base..+iov_len lies in the guest memory mapping borrowed for 'm (from
            // vm-memory's checked slices); `buf` is ours and `at + n <= buf.len()`.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), buf.as_mut_ptr().add(at), n)
            };
            at += n;
            if at == buf.len() {
                break;
            }
        }
    }

    /// Copies `buf` into the guest buffers, in order, until `buf` is exhausted.
    pub fn scatter(&self, buf: &[u8]) {
        let mut at = 0;
        for v in &self.iov {
            let n = v.iov_len.min(buf.len() - at);
            // SAFETY: as in gather, with the guest buffer as the destination.
            unsafe {
                std::ptr::copy_nonoverlapping(buf.as_ptr().add(at), v.iov_base.cast::<u8>(), n)
            };
            at += n;
            if at == buf.len() {
                break;
            }
        }
    }

    /// The bytes `[at, at + len)` of the transfer (clamped to it), as buffers of their own.
    pub fn slice(&self, at: usize, len: usize) -> GuestIov<'m> {
        let mut iov = Vec::new();
        let mut skip = at;
        let mut want = len.min(self.total.saturating_sub(at));
        let total = want;
        for v in &self.iov {
            if want == 0 {
                break;
            }
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            let n = (v.iov_len - skip).min(want);
            iov.push(libc::iovec {
                // Pointer arithmetic only, inside this buffer (skip < iov_len).
                iov_base: v.iov_base.cast::<u8>().wrapping_add(skip).cast(),
                iov_len: n,
            });
            want -= n;
            skip = 0;
        }
        GuestIov {
            iov,
            total,
            _mem: PhantomData,
        }
    }

    /// Fills the guest buffers with zeroes.
    pub fn zero(&self) {
        self.zero_from(0);
    }

    /// Zeroes the guest buffers from byte `from` of the transfer on.
    fn zero_from(&self, from: usize) {
        let mut skip = from;
        for v in &self.iov {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            // SAFETY: inside this buffer of the borrowed guest memory (skip < iov_len).
            unsafe {
                std::ptr::write_bytes(v.iov_base.cast::<u8>().add(skip), 0, v.iov_len - skip)
            };
            skip = 0;
        }
    }
}

/// `iov` with the first `done` bytes dropped, at most [`IOV_MAX`] entries.
fn remaining(iov: &[libc::iovec], mut done: usize, out: &mut Vec<libc::iovec>) {
    out.clear();
    for v in iov {
        if out.len() == IOV_MAX {
            break;
        }
        if done >= v.iov_len {
            done -= v.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // Pointer arithmetic only (no access): inside the same buffer since done < len.
            iov_base: v.iov_base.cast::<u8>().wrapping_add(done).cast(),
            iov_len: v.iov_len - done,
        });
        done = 0;
    }
}

fn off(offset: u64, done: usize) -> std::io::Result<libc::off_t> {
    offset
        .checked_add(done as u64)
        .and_then(|o| libc::off_t::try_from(o).ok())
        .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Runs the vectored call `op` (iovecs, file offset) over the guest buffers from `offset` until
/// all `iov.total` bytes are transferred, retrying after `EINTR` and short transfers. `Some(done)`
/// when `op` transferred nothing at `done` bytes (end of file, or a write that made no progress).
fn transfer(
    iov: &GuestIov<'_>,
    offset: u64,
    op: impl Fn(&[libc::iovec], libc::off_t) -> isize,
) -> std::io::Result<Option<usize>> {
    let mut done = 0;
    let mut v = Vec::with_capacity(iov.iov.len().min(IOV_MAX));
    while done < iov.total {
        remaining(&iov.iov, done, &mut v);
        let n = op(&v, off(offset, done)?);
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(Some(done));
        }
        done += n as usize;
    }
    Ok(None)
}

/// The iovec count of `v` as the system calls take it (`remaining` keeps it within `IOV_MAX`).
fn count(v: &[libc::iovec]) -> libc::c_int {
    libc::c_int::try_from(v.len()).unwrap_or(IOV_MAX as libc::c_int)
}

/// Reads `iov.total()` bytes of `file` at `offset` straight into the guest buffers (`preadv`,
/// repeated after a short read); what lies past the end of the file reads as zeroes.
pub fn preadv_full(file: &File, iov: &GuestIov<'_>, offset: u64) -> std::io::Result<()> {
    let eof = transfer(iov, offset, |v, at| {
        // SAFETY: `v` holds iovecs into the guest memory `iov` borrows (writable guest
        // buffers, from vm-memory's checked slices), alive for this call.
        unsafe { libc::preadv(file.as_raw_fd(), v.as_ptr(), count(v), at) }
    })?;
    if let Some(done) = eof {
        iov.zero_from(done);
    }
    Ok(())
}

/// Writes the guest buffers to `file` at `offset` (`pwritev`, repeated after a short write).
pub fn pwritev_all(file: &File, iov: &GuestIov<'_>, offset: u64) -> std::io::Result<()> {
    let stalled = transfer(iov, offset, |v, at| {
        // SAFETY: `v` holds iovecs into the guest memory `iov` borrows (readable guest
        // buffers, from vm-memory's checked slices), alive for this call.
        unsafe { libc::pwritev(file.as_raw_fd(), v.as_ptr(), count(v), at) }
    })?;
    match stalled {
        Some(_) => Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
        None => Ok(()),
    }
}

/// What a [`try_nowait`] came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoWait {
    /// The whole transfer was done.
    Done,
    /// Not done (it would block, it was short, or it failed): do it the blocking way, which
    /// reports errors.
    NotNow,
    /// The file system does not do `RWF_NOWAIT` for this direction (`EOPNOTSUPP`): stop trying.
    Unsupported,
}

/// One `preadv2`/`pwritev2` with `RWF_NOWAIT`: the whole transfer if it can be done without
/// blocking (a read's data in the page cache, a write the page cache takes at once).
pub fn try_nowait(file: &File, iov: &GuestIov<'_>, offset: u64, write: bool) -> NoWait {
    if iov.iov.len() > IOV_MAX || iov.total == 0 {
        return NoWait::NotNow;
    }
    let Ok(o) = off(offset, 0) else {
        return NoWait::NotNow;
    };
    let count = iov.iov.len() as libc::c_int;
    let fd = file.as_raw_fd();
    let n = if write {
        // SAFETY: `iov.iov` holds `count` iovecs into the guest memory `iov` borrows
        // (readable guest buffers from vm-memory's checked slices), alive for this call.
        unsafe { libc::pwritev2(fd, iov.iov.as_ptr(), count, o, libc::RWF_NOWAIT) }
    } else {
        // SAFETY: as above, writable guest buffers.
        unsafe { libc::preadv2(fd, iov.iov.as_ptr(), count, o, libc::RWF_NOWAIT) }
    };
    if n < 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EOPNOTSUPP) => NoWait::Unsupported,
            _ => NoWait::NotNow,
        };
    }
    if n as usize == iov.total {
        NoWait::Done
    } else {
        NoWait::NotNow
    }
}

/// Largest buffer a thread keeps between bounced transfers (larger ones, up to
/// `request::MAX_DATA`, get a buffer of their own). Every I/O thread may keep one.
const KEPT_BUFFER: usize = 1 << 20;

thread_local! {
    /// The thread's bounce buffer, kept between transfers: a fresh allocation per request costs
    /// page faults, zeroing and unmapping (about 1 ms of CPU for 1 MiB). 4 KiB-aligned, so
    /// `O_DIRECT` can use it as it is.
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Runs `f` on a buffer of exactly `len` bytes, its contents left over from earlier transfers
/// (`f` fills it completely before using it).
pub fn with_buffer<R>(len: usize, f: impl FnOnce(&mut [u8]) -> Result<R>) -> Result<R> {
    if len > KEPT_BUFFER {
        let mut own = AlignedBuf::new(len)?;
        return f(&mut own.as_mut_slice()[..len]);
    }
    BOUNCE.with_borrow_mut(|kept| {
        let buf = match kept {
            Some(b) if b.as_slice().len() >= len => b,
            _ => kept.insert(AlignedBuf::new(len.max(128 << 10))?),
        };
        f(&mut buf.as_mut_slice()[..len])
    })
}

/// A read into guest buffers through a bounce buffer (`disk.read_at`, then a copy).
pub fn bounce_read<D: DiskImage + ?Sized>(d: &D, iov: &GuestIov<'_>, offset: u64) -> Result<()> {
    with_buffer(iov.total(), |buf| {
        d.read_at(buf, offset)?;
        iov.scatter(buf);
        Ok(())
    })
}

/// A write from guest buffers through a bounce buffer (a copy, then `disk.write_at`).
pub fn bounce_write<D: DiskImage + ?Sized>(d: &D, iov: &GuestIov<'_>, offset: u64) -> Result<()> {
    with_buffer(iov.total(), |buf| {
        iov.gather(buf);
        d.write_at(buf, offset)
    })
}

/// `Error::Io` for a failed vectored call.
pub fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Io(what, e)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryMmap};

    fn temp_file(bytes: &[u8]) -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "bh-iov-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&p, bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }

    /// Two adjacent regions (two mappings), so a buffer across the boundary is two slices.
    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x4000), (GuestAddress(0x4000), 0x4000)])
            .unwrap()
    }

    #[test]
    fn vectored_reads_and_writes_go_straight_to_guest_memory_across_regions() {
        let m = mem();
        let image: Vec<u8> = (0..0x3000u32).map(|i| (i % 251) as u8).collect();
        let f = temp_file(&image);
        // Three buffers, the middle one crossing the region boundary at 0x4000.
        let bufs = [
            (GuestAddress(0x100), 0x200u32),
            (GuestAddress(0x3f00), 0x300),
            (GuestAddress(0x6000), 0x500),
        ];
        let iov = GuestIov::from_guest(&m, bufs, Permissions::Write).unwrap();
        assert_eq!(iov.total(), 0xa00);
        assert_eq!(iov.iov.len(), 4, "the boundary splits the middle buffer");
        preadv_full(&f, &iov, 0x800).unwrap();
        let mut got = Vec::new();
        for (a, l) in bufs {
            let mut b = vec![0u8; l as usize];
            m.read_slice(&mut b, a).unwrap();
            got.extend(b);
        }
        assert_eq!(got, &image[0x800..0x1200]);
        // Past the end of the file: zeroes.
        m.write_slice(&[0xee; 0x500], GuestAddress(0x6000)).unwrap();
        let tail =
            GuestIov::from_guest(&m, [(GuestAddress(0x6000), 0x500)], Permissions::Write).unwrap();
        preadv_full(&f, &tail, 0x2e00).unwrap();
        let mut b = vec![0u8; 0x500];
        m.read_slice(&mut b, GuestAddress(0x6000)).unwrap();
        assert_eq!(&b[..0x200], &image[0x2e00..]);
        assert!(b[0x200..].iter().all(|x| *x == 0));
        // A write from the same buffers lands in order.
        m.write_slice(&[7; 0x200], GuestAddress(0x100)).unwrap();
        let mut want = Vec::new();
        for (a, l) in bufs {
            let mut b = vec![0u8; l as usize];
            m.read_slice(&mut b, a).unwrap();
            want.extend(b);
        }
        let iov = GuestIov::from_guest(&m, bufs, Permissions::Read).unwrap();
        pwritev_all(&f, &iov, 0x1000).unwrap();
        let mut back = vec![0u8; 0xa00];
        f.read_exact_at(&mut back, 0x1000).unwrap();
        assert_eq!(back, want);
        // gather/scatter agree with the memory.
        let mut g = vec![0u8; 0xa00];
        iov.gather(&mut g);
        assert_eq!(g, back);
    }

    #[test]
    fn slices_cut_across_buffers() {
        let m = mem();
        let bufs = [
            (GuestAddress(0x100), 0x100u32),
            (GuestAddress(0x3f80), 0x100),
        ];
        let iov = GuestIov::from_guest(&m, bufs, Permissions::Write).unwrap();
        let s = iov.slice(0xc0, 0x80);
        assert_eq!(s.total(), 0x80);
        let got: Vec<(usize, usize)> = s
            .iov
            .iter()
            .map(|v| {
                (
                    v.iov_base as usize - iov.iov[0].iov_base as usize,
                    v.iov_len,
                )
            })
            .collect();
        assert_eq!(got[0], (0xc0, 0x40), "the end of the first buffer");
        assert_eq!(s.iov.len(), 2);
        assert_eq!(s.iov[1].iov_len, 0x40);
        assert_eq!(iov.slice(0x1f0, 0x100).total(), 0x10, "clamped");
        m.write_slice(&[9; 0x100], GuestAddress(0x100)).unwrap();
        iov.slice(0x80, 0x10).zero();
        let mut b = [0u8; 0x100];
        m.read_slice(&mut b, GuestAddress(0x100)).unwrap();
        assert!(b[..0x80].iter().all(|x| *x == 9) && b[0x80..0x90].iter().all(|x| *x == 0));
        assert!(b[0x90..].iter().all(|x| *x == 9));
    }

    #[test]
    fn buffers_outside_guest_memory_are_refused_before_any_io() {
        let m = mem();
        for (a, l) in [(0x7f00u64, 0x200u32), (0x10_0000, 1), (u64::MAX - 4, 16)] {
            assert!(
                GuestIov::from_guest(&m, [(GuestAddress(a), l)], Permissions::Write).is_err(),
                "{a:#x}+{l:#x}"
            );
        }
    }

    #[test]
    fn alignment_is_per_buffer() {
        let m = mem();
        let a = GuestIov::from_guest(
            &m,
            [
                (GuestAddress(0x1000), 0x1000),
                (GuestAddress(0x5000), 0x2000),
            ],
            Permissions::Write,
        )
        .unwrap();
        assert!(a.aligned(4096));
        let b =
            GuestIov::from_guest(&m, [(GuestAddress(0x1200), 0x1000)], Permissions::Write).unwrap();
        assert!(!b.aligned(4096) && b.aligned(512));
    }

    #[test]
    fn long_lists_are_split_at_iov_max() {
        let m = mem();
        let image: Vec<u8> = (0..0x8000u32).map(|i| (i % 253) as u8).collect();
        let f = temp_file(&image);
        // 1500 buffers of 4 bytes, more than one preadv takes.
        let bufs: Vec<_> = (0..1500u64).map(|i| (GuestAddress(i * 4), 4u32)).collect();
        let iov = GuestIov::from_guest(&m, bufs, Permissions::Write).unwrap();
        preadv_full(&f, &iov, 8).unwrap();
        let mut b = vec![0u8; 6000];
        m.read_slice(&mut b, GuestAddress(0)).unwrap();
        assert_eq!(b, &image[8..6008]);
    }
}
