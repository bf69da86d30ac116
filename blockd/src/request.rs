//! One virtio-blk request (virtio 1.2, 5.2.6): a device-readable header (type, reserved, sector),
//! data descriptors, and a device-writable status byte last.
//!
//! Everything here comes from the guest and is checked before use: the descriptor directions
//! and lengths per request type, the total size (at most [`MAX_DATA`]), the sector range against
//! the disk, and every guest address (through `vm-memory`'s bounds-checked accessors: an address
//! outside guest memory is an error, never an access). A request that breaks a rule completes with
//! `VIRTIO_BLK_S_IOERR` (or `S_UNSUPP` for an unknown type or flag), or, when even the status byte
//! cannot be written, is returned to the guest with nothing written ("dropped").

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::format::DiskImage;
use crate::iov::GuestIov;

/// `VIRTIO_BLK_T_IN`.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_T_FLUSH`.
pub const T_FLUSH: u32 = 4;
/// `VIRTIO_BLK_T_GET_ID`.
pub const T_GET_ID: u32 = 8;
/// `VIRTIO_BLK_T_DISCARD`.
pub const T_DISCARD: u32 = 11;
/// `VIRTIO_BLK_T_WRITE_ZEROES`.
pub const T_WRITE_ZEROES: u32 = 13;

/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
pub const S_IOERR: u8 = 1;
/// `VIRTIO_BLK_S_UNSUPP`.
pub const S_UNSUPP: u8 = 2;

/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
pub const FLAG_UNMAP: u32 = 1;
/// `VIRTIO_BLK_ID_BYTES`.
pub const ID_BYTES: usize = 20;
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Largest data transfer of one request (bytes); larger ones fail with `S_IOERR`.
pub const MAX_DATA: u64 = 64 << 20;
/// Most descriptors one request may have; longer chains fail with `S_IOERR`.
pub const MAX_DESCRIPTORS: usize = 1024;
/// Discard / write-zeroes segments per request (advertised as `max_*_seg`).
pub const MAX_SEGMENTS: u64 = 1;
/// Largest discard / write-zeroes segment in sectors (advertised as `max_*_sectors`).
pub const MAX_ZERO_SECTORS: u32 = 1 << 22;

/// One descriptor as the request code needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_WRITE`: the device writes it.
    pub write_only: bool,
}

/// The device-side description of the disk a request is served against.
pub struct Device<'a> {
    /// The image.
    pub disk: &'a dyn DiskImage,
    /// The serial (`GET_ID`), at most [`ID_BYTES`] bytes are sent.
    pub serial: &'a [u8],
}

/// Why a request failed (logged, then turned into a status or handed to the error policy).
#[derive(Debug, PartialEq, Eq)]
enum Fail {
    /// The guest's fault (bad descriptors, range, direction, a write to a read-only disk):
    /// `S_IOERR`, never the error policy.
    Io(&'static str),
    /// `S_UNSUPP`.
    Unsupported(&'static str),
    /// The host failed the operation with this errno: the error policy decides.
    Host(i32),
}

impl Fail {
    fn status(&self) -> u8 {
        match self {
            Fail::Io(_) | Fail::Host(_) => S_IOERR,
            Fail::Unsupported(_) => S_UNSUPP,
        }
    }
}

/// A request the host failed (QEMU: an error `rerror`/`werror` applies to). Nothing has been
/// written to the status byte yet: the caller completes it ([`finish`]) or holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError {
    /// The errno (positive).
    pub errno: i32,
    /// A write, flush, discard or write-zeroes (`werror`), rather than a read (`rerror`).
    pub write: bool,
    /// Data bytes the used ring reports if the failure is ignored (a read's whole buffer, as
    /// QEMU completes an ignored read).
    pub ignored_len: u32,
}

/// What serving a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Completed: status written (or dropped), ready for the used ring.
    Done(Completion),
    /// Failed on the host: for the error policy to complete or hold.
    Failed(HostError),
}

/// What serving a request produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written into guest memory (the used ring's `len`).
    pub used_len: u32,
    /// The status written (`None`: dropped, nothing written).
    pub status: Option<u8>,
}

/// Serves the request made of `descs` (in chain order): a request that completes (well, or with
/// a guest error) gets its status written; one the host failed is returned as
/// [`Served::Failed`] with nothing written.
pub fn serve<M: GuestMemory>(mem: &M, descs: &[Desc], dev: &Device<'_>) -> Served {
    if !has_status(descs) {
        log::debug!("request dropped: no writable status descriptor at the end");
        return Served::Done(Completion {
            used_len: 0,
            status: None,
        });
    }
    match execute(mem, descs, dev) {
        Ok(n) => Served::Done(finish(mem, descs, S_OK, n)),
        Err(Fail::Host(errno)) => {
            let write = request_kind(mem, descs) != Some(T_IN);
            let ignored_len = if write { 0 } else { data_len(descs) };
            Served::Failed(HostError {
                errno,
                write,
                ignored_len,
            })
        }
        Err(f) => {
            log::debug!("request failed: {f:?}");
            Served::Done(finish(mem, descs, f.status(), 0))
        }
    }
}

/// Largest transfer [`serve_nowait`] tries: larger page-cache copies are better spread over the
/// I/O threads (1 MiB reads at queue depth 8 ran at a third of qemu-storage-daemon's rate when
/// the queue thread copied them all itself).
pub const NOWAIT_MAX: u64 = 64 << 10;

/// Serves the request right here if that cannot block: a read or write of at most
/// [`NOWAIT_MAX`] bytes, of a disk that can say so ([`DiskImage::nowait`]), whose transfer the
/// page cache completes at once. `None`: anything
/// else (other types, guest errors, a transfer that would block): serve it with [`serve`], on
/// an I/O thread.
pub fn serve_nowait<M: GuestMemory>(mem: &M, descs: &[Desc], dev: &Device<'_>) -> Option<Served> {
    let disk = dev.disk;
    if !disk.nowait() || !has_status(descs) || descs.len() < 3 || descs.len() > MAX_DESCRIPTORS {
        return None;
    }
    let hdr = read_header(mem, &descs[0]).ok()?;
    let writing = match hdr.kind {
        T_IN => false,
        T_OUT if !disk.read_only() => true,
        _ => return None,
    };
    let data = &descs[1..descs.len() - 1];
    if data.iter().any(|d| d.write_only == writing) {
        return None;
    }
    let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    if total > NOWAIT_MAX || total % SECTOR != 0 {
        return None;
    }
    let offset = range(hdr.sector, total, disk.size()).ok()?;
    let access = if writing {
        Permissions::Read
    } else {
        Permissions::Write
    };
    let iov = GuestIov::from_guest(mem, data.iter().map(|d| (d.addr, d.len)), access).ok()?;
    if !disk.try_vectored(&iov, offset, writing) {
        return None;
    }
    let written = if writing { 0 } else { total as u32 };
    Some(Served::Done(finish(mem, descs, S_OK, written)))
}

fn has_status(descs: &[Desc]) -> bool {
    descs.last().is_some_and(|d| d.write_only && d.len >= 1)
}

/// The request's type as its header says (`None`: no readable header).
fn request_kind<M: GuestMemory>(mem: &M, descs: &[Desc]) -> Option<u32> {
    read_header(mem, descs.first()?).ok().map(|h| h.kind)
}

/// Whether the request is a data write (`VIRTIO_BLK_T_OUT`) by its header; a request without
/// a readable header is not (serving it reports the error).
pub fn writes_data<M: GuestMemory>(mem: &M, descs: &[Desc]) -> bool {
    request_kind(mem, descs) == Some(T_OUT)
}

/// Bytes of the data descriptors (between header and status), capped at `u32::MAX`.
fn data_len(descs: &[Desc]) -> u32 {
    let data = descs.get(1..descs.len().saturating_sub(1)).unwrap_or(&[]);
    let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// Writes `status` into the request's status byte; `data_written`: data bytes the used ring
/// reports. Returns the used-ring entry (dropped if the status byte cannot be written).
pub fn finish<M: GuestMemory>(
    mem: &M,
    descs: &[Desc],
    status: u8,
    data_written: u32,
) -> Completion {
    let Some(status_desc) = descs.last().filter(|d| d.write_only && d.len >= 1) else {
        return Completion {
            used_len: 0,
            status: None,
        };
    };
    // The status byte sits at the end of the last descriptor (a driver may put data in front).
    let at = status_desc
        .addr
        .checked_add(u64::from(status_desc.len - 1))
        .unwrap_or(status_desc.addr);
    if mem.write_obj(status, at).is_err() {
        log::debug!("request dropped: status byte outside guest memory");
        return Completion {
            used_len: 0,
            status: None,
        };
    }
    Completion {
        used_len: data_written.saturating_add(1),
        status: Some(status),
    }
}

/// Header fields.
struct Header {
    kind: u32,
    sector: u64,
}

fn read_header<M: GuestMemory>(mem: &M, d: &Desc) -> Result<Header, Fail> {
    if d.write_only || d.len < 16 {
        return Err(Fail::Io(
            "header descriptor not readable or shorter than 16 bytes",
        ));
    }
    let mut h = [0u8; 16];
    mem.read_slice(&mut h, d.addr)
        .map_err(|_| Fail::Io("header outside guest memory"))?;
    let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    Ok(Header { kind, sector })
}

/// Runs the request; returns the data bytes written into guest memory.
fn execute<M: GuestMemory>(mem: &M, descs: &[Desc], dev: &Device<'_>) -> Result<u32, Fail> {
    if descs.len() > MAX_DESCRIPTORS {
        return Err(Fail::Io("too many descriptors"));
    }
    if descs.len() < 2 {
        return Err(Fail::Io("no header descriptor"));
    }
    let hdr = read_header(mem, &descs[0])?;
    let data = &descs[1..descs.len() - 1];
    let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
    if total > MAX_DATA {
        return Err(Fail::Io("request larger than MAX_DATA"));
    }
    let disk = dev.disk;
    match hdr.kind {
        T_IN | T_OUT => {
            let writing = hdr.kind == T_OUT;
            if data.iter().any(|d| d.write_only == writing) {
                return Err(Fail::Io("data descriptor with the wrong direction"));
            }
            if writing && disk.read_only() {
                return Err(Fail::Io("write to a read-only disk"));
            }
            if total % SECTOR != 0 {
                return Err(Fail::Io("data length not a multiple of 512"));
            }
            let offset = range(hdr.sector, total, disk.size())?;
            // The guest buffers themselves, every byte inside guest memory, before any I/O.
            let access = if writing {
                Permissions::Read
            } else {
                Permissions::Write
            };
            let iov = GuestIov::from_guest(mem, data.iter().map(|d| (d.addr, d.len)), access)
                .map_err(|_| Fail::Io("data descriptor outside guest memory"))?;
            if writing {
                disk.write_vectored(&iov, offset)
                    .map_err(|e| host("write", e))?;
                Ok(0)
            } else {
                disk.read_vectored(&iov, offset)
                    .map_err(|e| host("read", e))?;
                Ok(total as u32)
            }
        }
        T_FLUSH => {
            disk.flush().map_err(|e| host("flush", e))?;
            Ok(0)
        }
        T_GET_ID => {
            if data.iter().any(|d| !d.write_only) {
                return Err(Fail::Io("GET_ID buffer not writable"));
            }
            let mut id = [0u8; ID_BYTES];
            let n = dev.serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&dev.serial[..n]);
            let n = (total as usize).min(ID_BYTES);
            scatter(mem, data, &id[..n])?;
            Ok(n as u32)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let zeroes = hdr.kind == T_WRITE_ZEROES;
            if data.iter().any(|d| d.write_only) {
                return Err(Fail::Io("segment descriptor not readable"));
            }
            if total == 0 || total % 16 != 0 || total / 16 > MAX_SEGMENTS {
                return Err(Fail::Io("bad discard/write-zeroes segment list"));
            }
            if disk.read_only() {
                return Err(Fail::Io("discard/write-zeroes on a read-only disk"));
            }
            let mut segs = vec![0u8; total as usize];
            gather(mem, data, &mut segs)?;
            for s in segs.chunks_exact(16) {
                let sector = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
                let sectors = u32::from_le_bytes([s[8], s[9], s[10], s[11]]);
                let flags = u32::from_le_bytes([s[12], s[13], s[14], s[15]]);
                let allowed = if zeroes { FLAG_UNMAP } else { 0 };
                if flags & !allowed != 0 {
                    return Err(Fail::Unsupported("unknown segment flag"));
                }
                if sectors > MAX_ZERO_SECTORS {
                    return Err(Fail::Io("segment larger than advertised"));
                }
                let len = u64::from(sectors) * SECTOR;
                let offset = range(sector, len, disk.size())?;
                let r = if zeroes {
                    disk.write_zeroes(offset, len, flags & FLAG_UNMAP != 0)
                } else {
                    disk.discard(offset, len)
                };
                r.map_err(|e| host("discard/write-zeroes", e))?;
            }
            Ok(0)
        }
        _ => Err(Fail::Unsupported("unknown request type")),
    }
}

/// A failure of the image: the host's, with its errno (the error policy applies).
fn host(what: &'static str, e: crate::Error) -> Fail {
    log::warn!("{what} failed: {e}");
    Fail::Host(e.errno())
}

/// Byte offset of `sector` if `[sector, +len)` lies inside a disk of `size` bytes.
fn range(sector: u64, len: u64, size: u64) -> Result<u64, Fail> {
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or(Fail::Io("sector overflows"))?;
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(offset),
        _ => Err(Fail::Io("beyond the end of the disk")),
    }
}

/// Copies the data descriptors' bytes (guest memory) into `buf`.
fn gather<M: GuestMemory>(mem: &M, data: &[Desc], buf: &mut [u8]) -> Result<(), Fail> {
    let mut at = 0usize;
    for d in data {
        let n = d.len as usize;
        let dst = buf
            .get_mut(at..at + n)
            .ok_or(Fail::Io("descriptor lengths changed"))?;
        mem.read_slice(dst, d.addr)
            .map_err(|_| Fail::Io("data descriptor outside guest memory"))?;
        at += n;
    }
    Ok(())
}

/// Copies `buf` into the data descriptors (guest memory), in order, until `buf` is exhausted.
fn scatter<M: GuestMemory>(mem: &M, data: &[Desc], buf: &[u8]) -> Result<(), Fail> {
    let mut at = 0usize;
    for d in data {
        if at >= buf.len() {
            break;
        }
        let n = (d.len as usize).min(buf.len() - at);
        mem.write_slice(&buf[at..at + n], d.addr)
            .map_err(|_| Fail::Io("data descriptor outside guest memory"))?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::DiskImage;
    use std::sync::Mutex;
    use vm_memory::GuestMemoryMmap;

    /// An in-memory disk.
    struct Mem(Mutex<Vec<u8>>, bool);

    impl DiskImage for Mem {
        fn size(&self) -> u64 {
            self.0.lock().map(|v| v.len() as u64).unwrap_or(0)
        }
        fn read_only(&self) -> bool {
            self.1
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            let v = self.0.lock().map_err(|_| crate::Error::Poisoned)?;
            buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
            let mut v = self.0.lock().map_err(|_| crate::Error::Poisoned)?;
            v[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> crate::Result<()> {
            Ok(())
        }
        fn discard(&self, o: u64, l: u64) -> crate::Result<()> {
            self.write_zeroes(o, l, true)
        }
        fn write_zeroes(&self, o: u64, l: u64, _: bool) -> crate::Result<()> {
            let mut v = self.0.lock().map_err(|_| crate::Error::Poisoned)?;
            v[o as usize..(o + l) as usize].fill(0);
            Ok(())
        }
    }

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x8000;

    fn setup() -> (GuestMemoryMmap, Mem) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("mem");
        let disk = Mem(
            Mutex::new((0..8192).map(|i| (i % 7) as u8).collect()),
            false,
        );
        (mem, disk)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).expect("hdr");
    }

    fn d(addr: u64, len: u32, w: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write_only: w,
        }
    }

    fn chain(data: &[Desc]) -> Vec<Desc> {
        let mut v = vec![d(HDR, 16, false)];
        v.extend_from_slice(data);
        v.push(d(STATUS, 1, true));
        v
    }

    fn run(mem: &GuestMemoryMmap, disk: &Mem, descs: &[Desc]) -> Completion {
        match serve(
            mem,
            descs,
            &Device {
                disk,
                serial: b"bulkhead-serial",
            },
        ) {
            Served::Done(c) => c,
            Served::Failed(e) => panic!("host error {e:?}"),
        }
    }

    #[test]
    fn read_write_round_trip() {
        let (mem, disk) = setup();
        header(&mem, T_IN, 2);
        let c = run(
            &mem,
            &disk,
            &chain(&[d(DATA, 512, true), d(DATA + 0x1000, 512, true)]),
        );
        assert_eq!(
            c,
            Completion {
                used_len: 1025,
                status: Some(S_OK)
            }
        );
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(DATA + 0x1000))
            .expect("read");
        assert!(b
            .iter()
            .enumerate()
            .all(|(i, v)| *v == ((i + 1536) % 7) as u8));

        mem.write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .expect("w");
        header(&mem, T_OUT, 4);
        let c = run(&mem, &disk, &chain(&[d(DATA, 1024, false)]));
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(S_OK)
            }
        );
        let v = disk.0.lock().expect("lock");
        assert!(v[2048..3072].iter().all(|x| *x == 0x5a));
    }

    #[test]
    fn get_id_flush_discard_write_zeroes() {
        let (mem, disk) = setup();
        header(&mem, T_GET_ID, 0);
        let c = run(&mem, &disk, &chain(&[d(DATA, 20, true)]));
        assert_eq!(
            c,
            Completion {
                used_len: 21,
                status: Some(S_OK)
            }
        );
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).expect("id");
        assert_eq!(&id[..15], b"bulkhead-serial");
        assert_eq!(&id[15..], &[0; 5]);

        header(&mem, T_FLUSH, 0);
        assert_eq!(run(&mem, &disk, &chain(&[])).status, Some(S_OK));

        for (kind, flags, want) in [
            (T_WRITE_ZEROES, FLAG_UNMAP, S_OK),
            (T_DISCARD, 0, S_OK),
            (T_DISCARD, FLAG_UNMAP, S_UNSUPP),
            (T_WRITE_ZEROES, 4, S_UNSUPP),
        ] {
            let mut seg = [0u8; 16];
            seg[..8].copy_from_slice(&1u64.to_le_bytes());
            seg[8..12].copy_from_slice(&2u32.to_le_bytes());
            seg[12..].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&seg, GuestAddress(DATA)).expect("seg");
            header(&mem, kind, 0);
            let c = run(&mem, &disk, &chain(&[d(DATA, 16, false)]));
            assert_eq!(c.status, Some(want), "{kind} {flags}");
        }
        let v = disk.0.lock().expect("lock");
        assert!(v[512..1536].iter().all(|x| *x == 0));
        assert_eq!(v[1536], (1536 % 7) as u8);
    }

    /// A disk whose every operation fails on the host with `errno` (a pure-logic stand-in:
    /// the real failing I/O is tests/worker.rs's full tmpfs).
    struct Failing(i32, bool);

    impl DiskImage for Failing {
        fn size(&self) -> u64 {
            8192
        }
        fn read_only(&self) -> bool {
            self.1
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> crate::Result<()> {
            Err(crate::Error::Io(
                "pread",
                std::io::Error::from_raw_os_error(self.0),
            ))
        }
        fn write_at(&self, _: &[u8], _: u64) -> crate::Result<()> {
            Err(crate::Error::Io(
                "pwrite",
                std::io::Error::from_raw_os_error(self.0),
            ))
        }
        fn flush(&self) -> crate::Result<()> {
            Err(crate::Error::Io(
                "fdatasync",
                std::io::Error::from_raw_os_error(self.0),
            ))
        }
        fn discard(&self, _: u64, _: u64) -> crate::Result<()> {
            self.flush()
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> crate::Result<()> {
            self.flush()
        }
    }

    #[test]
    fn host_failures_go_to_the_policy_and_guest_errors_keep_their_status() {
        let (mem, _) = setup();
        let dev = |disk: &Failing| {
            let device = Device {
                disk: disk as &dyn DiskImage,
                serial: b"",
            };
            let mut seg = [0u8; 16];
            seg[8..12].copy_from_slice(&2u32.to_le_bytes());
            mem.write_slice(&seg, GuestAddress(DATA + 0x1000))
                .expect("seg");
            let mut out = Vec::new();
            for (kind, data) in [
                (T_IN, d(DATA, 1024, true)),
                (T_OUT, d(DATA, 1024, false)),
                (T_FLUSH, d(DATA, 0, false)),
                (T_DISCARD, d(DATA + 0x1000, 16, false)),
                (T_WRITE_ZEROES, d(DATA + 0x1000, 16, false)),
            ] {
                header(&mem, kind, 0);
                mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
                let descs = if data.len == 0 {
                    chain(&[])
                } else {
                    chain(&[data])
                };
                out.push(serve(&mem, &descs, &device));
            }
            out
        };
        let eio = Failing(libc::EIO, false);
        let got = dev(&eio);
        let failed = |write, ignored_len| {
            Served::Failed(HostError {
                errno: libc::EIO,
                write,
                ignored_len,
            })
        };
        assert_eq!(
            got,
            vec![
                failed(false, 1024),
                failed(true, 0),
                failed(true, 0),
                failed(true, 0),
                failed(true, 0),
            ]
        );
        // Nothing was written to the status byte: the policy completes or holds the request.
        let mut st = [0u8; 1];
        mem.read_slice(&mut st, GuestAddress(STATUS))
            .expect("status");
        assert_eq!(st, [0xff]);
        // finish() writes it as the policy says (an ignored read reports its whole buffer).
        let descs = chain(&[d(DATA, 1024, true)]);
        assert_eq!(
            finish(&mem, &descs, S_OK, 1024),
            Completion {
                used_len: 1025,
                status: Some(S_OK)
            }
        );
        // Guest errors never reach the policy: a range past the end, a write to a read-only
        // disk, a bad direction.
        let ro = Failing(libc::EIO, true);
        let d_ = Device {
            disk: &ro,
            serial: b"",
        };
        for (kind, sector, data) in [
            (T_IN, 16, d(DATA, 512, true)),
            (T_OUT, 0, d(DATA, 512, false)),
            (T_IN, 0, d(DATA, 512, false)),
        ] {
            header(&mem, kind, sector);
            let c = serve(&mem, &chain(&[data]), &d_);
            assert_eq!(
                c,
                Served::Done(Completion {
                    used_len: 1,
                    status: Some(S_IOERR)
                }),
                "{kind} {sector}"
            );
        }
    }

    #[test]
    fn hostile_requests_get_an_error_status_or_are_dropped() {
        let (mem, disk) = setup();
        let outside = 0x10_0000_0000u64;
        let cases: Vec<(&str, u32, Vec<Desc>, Option<u8>)> = vec![
            ("unknown type", 99, chain(&[]), Some(S_UNSUPP)),
            (
                "read into a readable buffer",
                T_IN,
                chain(&[d(DATA, 512, false)]),
                Some(S_IOERR),
            ),
            (
                "write from a writable buffer",
                T_OUT,
                chain(&[d(DATA, 512, true)]),
                Some(S_IOERR),
            ),
            (
                "data outside memory",
                T_IN,
                chain(&[d(outside, 512, true)]),
                Some(S_IOERR),
            ),
            (
                "data straddling the end",
                T_IN,
                chain(&[d(0xff00, 512, true)]),
                Some(S_IOERR),
            ),
            (
                "not a sector multiple",
                T_IN,
                chain(&[d(DATA, 100, true)]),
                Some(S_IOERR),
            ),
            (
                "past the end of the disk",
                T_IN,
                chain(&[d(DATA, 8192 + 512, true)]),
                Some(S_IOERR),
            ),
            (
                "oversize",
                T_OUT,
                chain(&[d(DATA, u32::MAX, false), d(DATA, u32::MAX, false)]),
                Some(S_IOERR),
            ),
            (
                "short header",
                T_IN,
                vec![d(HDR, 8, false), d(STATUS, 1, true)],
                Some(S_IOERR),
            ),
            (
                "writable header",
                T_IN,
                vec![d(HDR, 16, true), d(STATUS, 1, true)],
                Some(S_IOERR),
            ),
            (
                "header outside memory",
                T_IN,
                vec![d(outside, 16, false), d(STATUS, 1, true)],
                Some(S_IOERR),
            ),
            (
                "only a status",
                T_IN,
                vec![d(STATUS, 1, true)],
                Some(S_IOERR),
            ),
            (
                "readable status",
                T_IN,
                vec![d(HDR, 16, false), d(STATUS, 1, false)],
                None,
            ),
            (
                "empty status",
                T_IN,
                vec![d(HDR, 16, false), d(STATUS, 0, true)],
                None,
            ),
            (
                "status outside memory",
                T_IN,
                vec![d(HDR, 16, false), d(outside, 1, true)],
                None,
            ),
            ("no descriptors", T_IN, vec![], None),
            (
                "too many descriptors",
                T_IN,
                chain(&vec![d(DATA, 512, true); MAX_DESCRIPTORS]),
                Some(S_IOERR),
            ),
        ];
        for (what, kind, descs, want) in cases {
            header(&mem, kind, 0);
            let c = run(&mem, &disk, &descs);
            assert_eq!(c.status, want, "{what}");
            if want.is_none() {
                assert_eq!(c.used_len, 0, "{what}");
            }
        }
        let ro = Mem(Mutex::new(vec![0; 4096]), true);
        header(&mem, T_OUT, 0);
        assert_eq!(
            run(&mem, &ro, &chain(&[d(DATA, 512, false)])).status,
            Some(S_IOERR)
        );
        header(&mem, T_IN, 0);
        assert_eq!(
            run(&mem, &ro, &chain(&[d(DATA, 512, true)])).status,
            Some(S_OK)
        );
    }
}
