//! The qcow2 image format (versions 2 and 3), read and write, with a backing image: this module
//! owns the header (parsing, validation, the features refused at open), the L1/L2 cluster
//! mapping, the refcount table and blocks, cluster allocation, copy-on-write from the backing
//! image, zero clusters, and the order in which metadata reaches the disk.
//!
//! Everything works on file descriptors opened before the sandbox: [`Qcow2::open`] takes the
//! image's [`File`] and its backing image as an already opened [`DiskImage`]; [`read_header`]
//! tells the caller which backing file (name and format) the header names, so that the chain can
//! be opened first ([`crate::format::open_image`] does that for a path). After opening, the only
//! system calls on the image are `pread64`, `pwrite64`, `fdatasync` and `fallocate` (hole
//! punching), made by the calling thread: no helper threads, nothing the blockd sandbox refuses.
//!
//! **Supported.** Cluster sizes 512 B to 2 MiB; refcount widths 1 to 64 bits (`refcount_order`
//! 0..=6); reads of normal, unallocated (backing image or zeroes) and zero clusters (v3 zero flag,
//! with or without a preallocated host cluster); writes that allocate clusters at the end of the
//! file (refcount block, and refcount table growth when needed, L2 table, data cluster), with the
//! rest of a partially written cluster copied from the backing image or zero-filled; discard and
//! write-zeroes (v3: whole clusters get the zero flag, keeping their host cluster, whose space
//! discard/unmap returns to the host file system with a hole punch; partial clusters and v2
//! images get zeroes written); `O_DIRECT` (`cache=none`) through 4 KiB-aligned bounce buffers.
//! Images with internal snapshots are served read-only (the active L1 table).
//!
//! **Refused, with an error naming the reason:** encryption, external data files, extended L2
//! entries, the dirty bit (lazy refcounts not yet repaired: run `qemu-img check -r all`), unknown
//! incompatible features, the corrupt bit (writable), internal snapshots (writable), a backing
//! file whose format the header does not record, and at I/O time reading or overwriting a
//! compressed cluster (the guest gets an I/O error for that request only) and writing to a
//! cluster or L2 table whose `COPIED` flag is clear (shared).
//!
//! **Allocation never reuses a cluster**: new clusters are appended at the end of the file, and
//! nothing is ever freed while the image is served (discarded clusters keep their host cluster
//! with the zero flag set, punched out of the host file), so a stale L2 entry can never point at
//! a cluster that became something else. The only clusters whose refcount drops are those of a
//! refcount table replaced by a bigger one, after the header points at the new one.
//!
//! **Write order.** Guest data goes to the file at once (a new cluster is always written whole,
//! before any metadata references it); refcount blocks, the refcount table, L2 tables and the L1
//! table are cached and written back on flush (or when too many are dirty) in this order:
//! refcount blocks, `fdatasync` (only if the refcount table changed), refcount table,
//! `fdatasync`, L2 tables, `fdatasync` (only if the L1 table changed), L1 table, then the
//! flush's own `fdatasync`. A crash therefore leaves at worst leaked clusters
//! (refcount 1, no reference; `qemu-img check -r leaks` reclaims them), never a reference to a
//! cluster whose refcount is zero, nor an L2 entry pointing at data not yet written.
//!
//! **Hostile images** give [`Error::Corrupt`] or [`Error::Unsupported`], never a panic or an
//! unbounded allocation: header fields are range-checked (cluster bits, L1 size at most 32 MiB
//! and large enough for the virtual size, refcount table at most 8 MiB, header extensions inside
//! the first cluster, backing name at most 1023 bytes), every table offset must be cluster
//! aligned, inside the file, and must not overlap the header, the L1 table, the refcount table or
//! another table; reserved bits are errors; a data cluster that overlaps metadata or lies past
//! the end of the file is an error for the request that reaches it; a backing chain is at most
//! [`MAX_CHAIN`] deep and may not contain the same file twice.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use crate::format::{AlignedBuf, DiskImage, DIRECT_ALIGN};
use crate::iov::{self, GuestIov};
use crate::{Error, Result};

/// `QFI\xfb`.
const MAGIC: u32 = 0x5146_49fb;
/// Smallest and largest `cluster_bits` accepted (512 B .. 2 MiB, QEMU's range).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// Largest L1 table (QEMU's limit).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table (QEMU's limit).
const MAX_RT_BYTES: u64 = 8 << 20;
/// Longest backing file name (QEMU's limit).
const MAX_BACKING_NAME: u32 = 1023;
/// Deepest backing chain [`crate::format::open_image`] opens.
pub const MAX_CHAIN: usize = 32;
/// Host offsets are 56-bit in L1/L2 entries.
const MAX_HOST_OFFSET: u64 = 1 << 56;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1E_RESERVED: u64 = 0x7f00_0000_0000_01ff;
const L2E_RESERVED: u64 = 0x3f00_0000_0000_01fe;
const REFT_RESERVED: u64 = 0x1ff;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;

/// Header offsets of fields written back.
const HDR_REFCOUNT_TABLE: u64 = 48;
const HDR_AUTOCLEAR: u64 = 88;

/// Entries per L1 write-back chunk (4 KiB of entries).
const CHUNK_ENTRIES: usize = 512;

fn corrupt(m: impl Into<String>) -> Error {
    Error::Corrupt(m.into())
}

fn unsupported(m: impl Into<String>) -> Error {
    Error::Unsupported(m.into())
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// The backing file a header names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    /// The name as stored (relative names are relative to the image's directory).
    pub name: String,
    /// The backing format header extension (`raw`, `qcow2`, ...), if present.
    pub format: Option<String>,
}

/// The parsed image header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Host offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters occupied by the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits (v3; 0 for v2).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Auto-clear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for v2).
    pub refcount_order: u32,
    /// The backing file, if any.
    pub backing: Option<BackingFile>,
    /// Names of feature bits from the feature name table extension: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

impl Header {
    /// Parses and validates the header from the image's first bytes: `first` should hold the
    /// whole first cluster ([`read_header`] reads it; bytes past the end of the file are zeroes)
    /// and must hold at least its first 4 KiB; header extensions and a backing file name must
    /// lie inside what is given.
    pub fn parse(first: &[u8]) -> Result<Header> {
        if first.len() < 72 {
            return Err(corrupt("file too short for a qcow2 header"));
        }
        if be32(first, 0) != MAGIC {
            return Err(corrupt("no qcow2 magic"));
        }
        let version = be32(first, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cs = 1u64 << cluster_bits;
        if (first.len() as u64) < cs.min(4096) {
            return Err(corrupt("header buffer shorter than the first cluster"));
        }
        let crypt = be32(first, 32);
        if crypt != 0 {
            return Err(unsupported(format!("encryption (crypt_method {crypt})")));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(first, 24),
            l1_size: be32(first, 36),
            l1_table_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            nb_snapshots: be32(first, 60),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            backing: None,
            feature_names: Vec::new(),
        };
        let mut header_length = 72u64;
        if version == 3 {
            if first.len() < 104 {
                return Err(corrupt("file too short for a v3 header"));
            }
            h.incompatible_features = be64(first, 72);
            h.compatible_features = be64(first, 80);
            h.autoclear_features = be64(first, 88);
            h.refcount_order = be32(first, 96);
            header_length = u64::from(be32(first, 100));
            if header_length < 104 || header_length > cs.min(first.len() as u64) {
                return Err(corrupt(format!("header_length {header_length}")));
            }
        }
        if h.refcount_order > 6 {
            return Err(corrupt(format!("refcount_order {}", h.refcount_order)));
        }

        // Header extensions: from the header's end to the backing file name (or the cluster's).
        let backing_offset = be64(first, 8);
        let backing_size = be32(first, 16);
        let limit = cs.min(first.len() as u64);
        let ext_end = if backing_offset != 0 {
            backing_offset.min(limit)
        } else {
            limit
        };
        let mut at = header_length;
        let mut backing_format = None;
        while at + 8 <= ext_end {
            let kind = be32(first, at as usize);
            let len = u64::from(be32(first, at as usize + 4));
            at += 8;
            if kind == EXT_END {
                break;
            }
            if len > ext_end - at {
                return Err(corrupt(format!(
                    "header extension {kind:#x} of {len} bytes runs past the first cluster"
                )));
            }
            let data = &first[at as usize..(at + len) as usize];
            match kind {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| corrupt("backing format name is not UTF-8"))?;
                    backing_format = Some(s.trim_end_matches('\0').to_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name = e[2..]
                            .split(|b| *b == 0)
                            .next()
                            .map(|n| String::from_utf8_lossy(n).into_owned())
                            .unwrap_or_default();
                        h.feature_names.push((e[0], e[1], name));
                    }
                }
                // Bitmaps, encryption (refused through crypt_method), external data file
                // (refused through its incompatible bit), unknown ones: nothing to read.
                _ => {}
            }
            at += len.div_ceil(8) * 8;
        }

        if backing_offset != 0 {
            if backing_size == 0 || backing_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name of {backing_size} bytes"
                )));
            }
            let end = backing_offset
                .checked_add(u64::from(backing_size))
                .filter(|e| *e <= limit)
                .ok_or_else(|| corrupt("backing file name outside the first cluster"))?;
            let name = std::str::from_utf8(&first[backing_offset as usize..end as usize])
                .map_err(|_| corrupt("backing file name is not UTF-8"))?;
            if name.contains('\0') {
                return Err(corrupt("backing file name contains NUL"));
            }
            h.backing = Some(BackingFile {
                name: name.to_owned(),
                format: backing_format,
            });
        }
        Ok(h)
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The name of incompatible feature `bit` from the feature table, if there is one.
    fn feature_name(&self, bit: u32) -> String {
        self.feature_names
            .iter()
            .find(|(t, b, _)| *t == 0 && u32::from(*b) == bit)
            .map(|(_, _, n)| format!(" ({n})"))
            .unwrap_or_default()
    }

    /// Refuses what this implementation does not support for an image opened with `read_only`.
    fn check_features(&self, read_only: bool) -> Result<()> {
        let inc = self.incompatible_features;
        if inc & INCOMPAT_DIRTY != 0 {
            return Err(unsupported(
                "the dirty bit is set (lazy refcounts not yet repaired): run `qemu-img check -r all` first",
            ));
        }
        if inc & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported("external data file"));
        }
        if inc & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries (subclusters)"));
        }
        let known = INCOMPAT_DIRTY
            | INCOMPAT_CORRUPT
            | INCOMPAT_DATA_FILE
            | INCOMPAT_COMPRESSION
            | INCOMPAT_EXTL2;
        if inc & !known != 0 {
            let bit = (inc & !known).trailing_zeros();
            return Err(unsupported(format!(
                "unknown incompatible feature bit {bit}{}",
                self.feature_name(bit)
            )));
        }
        if inc & INCOMPAT_CORRUPT != 0 && !read_only {
            return Err(unsupported(
                "the image is marked corrupt: it can only be opened read-only (or repaired with `qemu-img check -r all`)",
            ));
        }
        if self.nb_snapshots != 0 && !read_only {
            return Err(unsupported(format!(
                "{} internal snapshot(s): writing such an image is not supported (open it read-only)",
                self.nb_snapshots
            )));
        }
        Ok(())
    }
}

/// Whether `file` was opened with `O_DIRECT`.
fn is_direct(file: &File) -> bool {
    // SAFETY: F_GETFL on an fd we own; no pointers.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_DIRECT != 0
}

/// `pread` until `buf` is full; the part past the end of the file reads as zeroes.
fn pread_full(file: &File, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file
            .read_at(&mut buf[done..], offset + done as u64)
            .map_err(|e| Error::Io("pread", e))?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// The aligned window `[start, end)` covering `[offset, offset + len)`.
fn window(offset: u64, len: usize) -> (u64, u64) {
    let a = DIRECT_ALIGN as u64;
    (offset / a * a, (offset + len as u64).div_ceil(a) * a)
}

/// Whether `buf` at `offset` can go to an `O_DIRECT` fd as it is: address, offset and length
/// all multiples of [`DIRECT_ALIGN`].
fn is_aligned(buf: &[u8], offset: u64) -> bool {
    let a = DIRECT_ALIGN as u64;
    offset % a == 0 && buf.len() as u64 % a == 0 && (buf.as_ptr() as usize) % DIRECT_ALIGN == 0
}

/// Reads `buf` at `offset`, through an aligned bounce buffer if `direct` and `buf` is not
/// aligned.
fn read_any(file: &File, direct: bool, buf: &mut [u8], offset: u64) -> Result<()> {
    if !direct || is_aligned(buf, offset) {
        return pread_full(file, buf, offset);
    }
    let (start, end) = window(offset, buf.len());
    let mut bounce = AlignedBuf::new((end - start) as usize)?;
    pread_full(file, bounce.as_mut_slice(), start)?;
    let skip = (offset - start) as usize;
    buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
    Ok(())
}

/// Reads and parses the header of an open qcow2 image (plain or `O_DIRECT`): what the caller
/// needs to open the backing chain before the sandbox, and the virtual size.
pub fn read_header(file: &File) -> Result<Header> {
    let direct = is_direct(file);
    let mut first = vec![0u8; 4096];
    read_any(file, direct, &mut first, 0)?;
    if first.len() >= 24 && be32(&first, 0) == MAGIC {
        let bits = be32(&first, 20);
        if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) && (1usize << bits) > 4096 {
            first = vec![0u8; 1 << bits];
            read_any(file, direct, &mut first, 0)?;
        }
    }
    Header::parse(&first)
}

/// The image file: positioned reads and writes, `O_DIRECT`-aware, and the file's length.
struct Io {
    file: File,
    /// Under `O_DIRECT`: a buffered fd of the same file for writes ending at an unaligned end of
    /// file (an `O_DIRECT` write of a partial block there fails).
    buffered: Option<File>,
    direct: bool,
    /// Serialises read-modify-write cycles of unaligned `O_DIRECT` writes.
    rmw: Mutex<()>,
    /// The file's length as far as this process made it.
    len: AtomicU64,
    /// [`crate::format::writes_serialize`] of the file.
    serialized: bool,
}

impl Io {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_any(&self.file, self.direct, buf, offset)
    }

    /// A read straight into guest buffers (through a bounce buffer only under `O_DIRECT` with
    /// an unaligned offset or guest buffer).
    fn read_vectored(&self, v: &GuestIov<'_>, offset: u64) -> Result<()> {
        if !self.direct || (offset % DIRECT_ALIGN as u64 == 0 && v.aligned(DIRECT_ALIGN)) {
            return iov::preadv_full(&self.file, v, offset).map_err(|e| Error::Io("preadv", e));
        }
        iov::with_buffer(v.total(), |buf| {
            self.read(buf, offset)?;
            v.scatter(buf);
            Ok(())
        })
    }

    /// A write straight from guest buffers (bounced as [`Io::read_vectored`] says).
    fn write_vectored(&self, v: &GuestIov<'_>, offset: u64) -> Result<()> {
        let end = offset + v.total() as u64;
        if !self.direct || (offset % DIRECT_ALIGN as u64 == 0 && v.aligned(DIRECT_ALIGN)) {
            iov::pwritev_all(&self.file, v, offset).map_err(|e| Error::Io("pwritev", e))?;
            self.len.fetch_max(end, Ordering::SeqCst);
            return Ok(());
        }
        iov::with_buffer(v.total(), |buf| {
            v.gather(buf);
            self.write(buf, offset)
        })
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        let end = offset + buf.len() as u64;
        // Whole aligned blocks need no bounce, no read-modify-write, and cannot leave padding.
        if !self.direct || is_aligned(buf, offset) {
            self.file
                .write_all_at(buf, offset)
                .map_err(|e| Error::Io("pwrite", e))?;
            self.len.fetch_max(end, Ordering::SeqCst);
            return Ok(());
        }
        let (start, wend) = window(offset, buf.len());
        let mut bounce = AlignedBuf::new((wend - start) as usize)?;
        let aligned = start == offset && wend == end;
        let _guard = if aligned {
            None
        } else {
            let g = self.rmw.lock().map_err(|_| Error::Poisoned)?;
            pread_full(&self.file, bounce.as_mut_slice(), start)?;
            Some(g)
        };
        let skip = (offset - start) as usize;
        bounce.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
        // Never grow the file by the alignment padding.
        let limit = self.len.load(Ordering::SeqCst).max(end) - start;
        let n = (limit.min(wend - start)) as usize;
        let r = if n % DIRECT_ALIGN != 0 {
            let Some(b) = &self.buffered else {
                return Err(Error::Io(
                    "pwrite (unaligned end of file, no buffered fd)",
                    std::io::Error::from_raw_os_error(libc::EINVAL),
                ));
            };
            b.write_all_at(&bounce.as_slice()[..n], start)
                .map_err(|e| Error::Io("pwrite (buffered tail)", e))
        } else {
            self.file
                .write_all_at(&bounce.as_slice()[..n], start)
                .map_err(|e| Error::Io("pwrite", e))
        };
        r?;
        self.len.fetch_max(end, Ordering::SeqCst);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::Io("fdatasync", e))
    }

    /// Punches a hole; false if the file system cannot.
    fn punch(&self, offset: u64, len: u64) -> Result<bool> {
        let (o, l) = (
            libc::off_t::try_from(offset).map_err(|_| Error::TooLarge(offset))?,
            libc::off_t::try_from(len).map_err(|_| Error::TooLarge(len))?,
        );
        // SAFETY: fallocate on an fd we own, integer arguments only.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                o,
                l,
            )
        };
        if rc == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            Ok(false)
        } else {
            Err(Error::Io("fallocate(PUNCH_HOLE)", e))
        }
    }
}

/// Refcount `i` of a refcount block with `2^order`-bit entries.
fn rc_get(block: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        block[at..at + w]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    } else {
        let per = 8 / bits;
        let byte = block[(i / per) as usize];
        let shift = (i % per) * bits;
        (u64::from(byte) >> shift) & ((1 << bits) - 1)
    }
}

/// Sets refcount `i` (`v` must fit the width).
fn rc_set(block: &mut [u8], i: u64, order: u32, v: u64) {
    let bits = 1u64 << order;
    if bits >= 8 {
        let w = (bits / 8) as usize;
        let at = i as usize * w;
        let bytes = v.to_be_bytes();
        block[at..at + w].copy_from_slice(&bytes[8 - w..]);
    } else {
        let per = 8 / bits;
        let at = (i / per) as usize;
        let shift = (i % per) * bits;
        let mask = ((1u64 << bits) - 1) << shift;
        let old = u64::from(block[at]);
        block[at] = ((old & !mask) | ((v << shift) & mask)) as u8;
    }
}

/// A cached metadata cluster (an L2 table or a refcount block).
struct Slot {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// Cluster-sized tables by host offset: least recently used clean ones are evicted; dirty ones
/// stay until written back.
struct TableCache {
    map: HashMap<u64, Slot>,
    cap: usize,
    tick: u64,
    dirty: usize,
}

impl TableCache {
    fn new(cap: usize) -> TableCache {
        TableCache {
            map: HashMap::new(),
            cap,
            tick: 0,
            dirty: 0,
        }
    }

    /// Makes room for one more entry (drops the least recently used clean one).
    fn make_room(&mut self) {
        if self.map.len() < self.cap {
            return;
        }
        let victim = self
            .map
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used)
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            self.map.remove(&k);
        }
    }

    /// The table at `off`, read from the file if not cached.
    fn get(&mut self, io: &Io, off: u64, cs: usize) -> Result<&mut Slot> {
        self.tick += 1;
        let tick = self.tick;
        if !self.map.contains_key(&off) {
            let mut data = vec![0u8; cs];
            io.read(&mut data, off)?;
            self.make_room();
            self.map.insert(
                off,
                Slot {
                    data,
                    dirty: false,
                    used: tick,
                },
            );
        }
        let slot = self
            .map
            .get_mut(&off)
            .ok_or_else(|| corrupt("table cache lost an entry"))?;
        slot.used = tick;
        Ok(slot)
    }

    /// A new all-zero table at `off`, dirty.
    fn insert_new(&mut self, off: u64, cs: usize) {
        self.tick += 1;
        self.make_room();
        let old = self.map.insert(
            off,
            Slot {
                data: vec![0u8; cs],
                dirty: true,
                used: self.tick,
            },
        );
        if !old.is_some_and(|s| s.dirty) {
            self.dirty += 1;
        }
    }

    /// Marks the (cached) table at `off` dirty.
    fn mark_dirty(&mut self, off: u64) {
        if let Some(s) = self.map.get_mut(&off) {
            if !s.dirty {
                s.dirty = true;
                self.dirty += 1;
            }
        }
    }

    /// Writes every dirty table.
    fn write_back(&mut self, io: &Io) -> Result<()> {
        if self.dirty == 0 {
            return Ok(());
        }
        let mut offs: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        offs.sort_unstable();
        for off in offs {
            if let Some(s) = self.map.get_mut(&off) {
                io.write(&s.data, off)?;
                s.dirty = false;
                self.dirty = self.dirty.saturating_sub(1);
            }
        }
        Ok(())
    }
}

/// Where one cluster's guest data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Map {
    /// Not allocated here: the backing image's data, or zeroes without one.
    Unallocated,
    /// Reads as zeroes; `Some(host)` when a host cluster stays preallocated (`copied` flag).
    Zero(Option<(u64, bool)>),
    /// At this host offset; `copied`: refcount is exactly one, so it may be written in place.
    Data(u64, bool),
    /// A compressed cluster (the raw L2 entry).
    Compressed(u64),
}

/// One cluster's share of a byte range.
#[derive(Debug, Clone, Copy)]
struct Piece {
    /// Guest cluster index.
    gc: u64,
    /// Offset inside the cluster.
    in_off: usize,
    /// Offset in the caller's buffer.
    at: usize,
    len: usize,
}

fn pieces(offset: u64, len: usize, cs: u64) -> impl Iterator<Item = Piece> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let in_off = (pos % cs) as usize;
        let n = (cs as usize - in_off).min(len - at);
        let p = Piece {
            gc: pos / cs,
            in_off,
            at,
            len: n,
        };
        at += n;
        Some(p)
    })
}

/// The mutable metadata: tables, caches, the allocation point.
struct Meta {
    l1: Vec<u64>,
    /// Dirty L1 chunks ([`CHUNK_ENTRIES`] entries each).
    l1_dirty: BTreeSet<usize>,
    l2: TableCache,
    rt: Vec<u64>,
    rt_offset: u64,
    rt_clusters: u64,
    /// Dirty refcount-table chunks.
    rt_dirty: BTreeSet<usize>,
    rc: TableCache,
    /// Cluster indices of L2 tables and refcount blocks.
    tables: BTreeSet<u64>,
    /// Next cluster index to try for an allocation; every cluster this process or the image
    /// references lies below it.
    next_free: u64,
}

/// Fixed geometry.
#[derive(Debug, Clone, Copy)]
struct Geo {
    cluster_bits: u32,
    cs: u64,
    /// Entries per L2 table.
    l2_entries: u64,
    refcount_order: u32,
    /// Refcounts per refcount block.
    rpb: u64,
    size: u64,
    version: u32,
    l1_offset: u64,
    l1_clusters: u64,
}

/// A qcow2 image; see the module documentation.
pub struct Qcow2 {
    io: Io,
    backing: Option<Box<dyn DiskImage>>,
    header: Header,
    geo: Geo,
    read_only: bool,
    /// Held shared by reads and in-place writes (translation and data I/O), exclusively by
    /// anything that changes mappings (allocating writes, discard, write-zeroes).
    gate: RwLock<()>,
    meta: Mutex<Meta>,
}

impl Qcow2 {
    /// Opens a qcow2 image from its open `file` (read-write unless `read_only`; `O_DIRECT` is
    /// detected) and its already opened `backing` image (which must be given exactly when the
    /// header names a backing file; it is only read). Validates the header and the L1 and
    /// refcount tables, refusing unsupported features. Writable images get their auto-clear
    /// feature bits cleared (as the specification asks of a writer that does not maintain them).
    pub fn open(file: File, backing: Option<Box<dyn DiskImage>>, read_only: bool) -> Result<Qcow2> {
        let file_len = crate::format::file_size(&file)?;
        let direct = is_direct(&file);
        let header = read_header(&file)?;
        header.check_features(read_only)?;
        match (&header.backing, &backing) {
            (Some(b), None) => {
                return Err(Error::Usage(format!(
                    "the image has backing file {:?} but none was opened",
                    b.name
                )))
            }
            (None, Some(_)) => {
                return Err(Error::Usage(
                    "a backing image was given but the image has no backing file".into(),
                ))
            }
            _ => {}
        }
        let serialized = crate::format::writes_serialize(&file, direct);
        let io = Io {
            file,
            buffered: None,
            direct,
            rmw: Mutex::new(()),
            len: AtomicU64::new(file_len),
            serialized,
        };
        let cs = header.cluster_size();
        let l2_entries = cs / 8;
        let end_cluster = file_len.div_ceil(cs).max(1);
        let file_end = end_cluster * cs;

        // The L1 table: big enough for the virtual size, bounded, inside the file.
        let per_l1 = cs * l2_entries;
        let need = header.size.div_ceil(per_l1);
        let l1_bytes = u64::from(header.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table of {} entries (at most {})",
                header.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        if u64::from(header.l1_size) < need {
            return Err(corrupt(format!(
                "L1 table of {} entries too small for a {}-byte disk",
                header.l1_size, header.size
            )));
        }
        let l1_offset = header.l1_table_offset;
        let l1_clusters = l1_bytes.div_ceil(cs);
        if l1_bytes > 0 {
            check_table_range("L1 table", l1_offset, l1_bytes, cs, file_end)?;
        }
        // The refcount table: bounded, inside the file, not overlapping the L1 table.
        let rt_clusters = u64::from(header.refcount_table_clusters);
        let rt_bytes = rt_clusters * cs;
        if rt_clusters == 0 || rt_bytes > MAX_RT_BYTES {
            return Err(corrupt(format!("refcount table of {rt_clusters} clusters")));
        }
        let rt_offset = header.refcount_table_offset;
        check_table_range("refcount table", rt_offset, rt_bytes, cs, file_end)?;
        let l1_range = l1_offset / cs..l1_offset / cs + l1_clusters;
        let rt_range = rt_offset / cs..rt_offset / cs + rt_clusters;
        if l1_range.start < rt_range.end && rt_range.start < l1_range.end {
            return Err(corrupt("the L1 table overlaps the refcount table"));
        }

        let geo = Geo {
            cluster_bits: header.cluster_bits,
            cs,
            l2_entries,
            refcount_order: header.refcount_order,
            rpb: (cs * 8) >> header.refcount_order,
            size: header.size,
            version: header.version,
            l1_offset,
            l1_clusters,
        };
        let fixed = |c: u64| c == 0 || l1_range.contains(&c) || rt_range.contains(&c);

        let mut raw = vec![0u8; l1_bytes as usize];
        io.read(&mut raw, l1_offset)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|e| be64(e, 0)).collect();
        let mut tables = BTreeSet::new();
        for (i, e) in l1.iter().enumerate() {
            if e & L1E_RESERVED != 0 {
                return Err(corrupt(format!(
                    "L1 entry {i} ({e:#x}) has reserved bits set"
                )));
            }
            let off = e & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            check_table_cluster(&format!("L2 table of L1 entry {i}"), off, cs, file_end)?;
            if fixed(off / cs) {
                return Err(corrupt(format!(
                    "L2 table of L1 entry {i} at {off:#x} overlaps the header, L1 or refcount table"
                )));
            }
            if !tables.insert(off / cs) {
                return Err(corrupt(format!(
                    "L2 table at {off:#x} used twice in the L1 table"
                )));
            }
        }
        let mut raw = vec![0u8; rt_bytes as usize];
        io.read(&mut raw, rt_offset)?;
        let rt: Vec<u64> = raw.chunks_exact(8).map(|e| be64(e, 0)).collect();
        for (i, e) in rt.iter().enumerate() {
            if e & REFT_RESERVED != 0 {
                return Err(corrupt(format!(
                    "refcount table entry {i} ({e:#x}) has reserved bits set"
                )));
            }
            if *e == 0 {
                continue;
            }
            check_table_cluster(&format!("refcount block {i}"), *e, cs, file_end)?;
            if fixed(e / cs) || !tables.insert(e / cs) {
                return Err(corrupt(format!(
                    "refcount block {i} at {e:#x} overlaps other metadata"
                )));
            }
        }

        let l2_cap = ((16usize << 20) >> geo.cluster_bits).clamp(16, 4096);
        let rc_cap = ((4usize << 20) >> geo.cluster_bits).clamp(8, 1024);
        let q = Qcow2 {
            io,
            backing,
            header,
            geo,
            read_only,
            gate: RwLock::new(()),
            meta: Mutex::new(Meta {
                l1,
                l1_dirty: BTreeSet::new(),
                l2: TableCache::new(l2_cap),
                rt,
                rt_offset,
                rt_clusters,
                rt_dirty: BTreeSet::new(),
                rc: TableCache::new(rc_cap),
                tables,
                next_free: end_cluster,
            }),
        };
        if !read_only && q.header.version == 3 && q.header.autoclear_features != 0 {
            q.io.write(&0u64.to_be_bytes(), HDR_AUTOCLEAR)?;
            q.io.sync()?;
        }
        Ok(q)
    }

    /// Adds the buffered fd used under `O_DIRECT` for writes reaching an unaligned end of file
    /// (opened by the caller before the sandbox, without `O_DIRECT`).
    pub fn with_buffered_tail(mut self, buffered: File) -> Qcow2 {
        self.io.buffered = Some(buffered);
        self
    }

    /// Sets how many L2 tables and refcount blocks stay cached (QEMU's `l2-cache-size` and
    /// `refcount-cache-size`, counted in tables; at least 2 each). By default 16 MiB of L2 tables
    /// (16 to 4096 tables) and 4 MiB of refcount blocks (8 to 1024). Dirty tables are written
    /// back once more than half of either cache is dirty.
    pub fn with_cache_limits(self, l2_tables: usize, refcount_blocks: usize) -> Qcow2 {
        if let Ok(mut m) = self.meta.lock() {
            m.l2.cap = l2_tables.max(2);
            m.rc.cap = refcount_blocks.max(2);
        }
        self
    }

    /// The header as parsed at open.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn meta(&self) -> Result<MutexGuard<'_, Meta>> {
        self.meta.lock().map_err(|_| Error::Poisoned)
    }

    /// Reads guest bytes `[offset, offset + buf.len())` from the backing image (zeroes past its
    /// end, or without one).
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let n = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        if n > 0 {
            b.read_at(&mut buf[..n], offset)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    /// [`Qcow2::read_backing`] into guest buffers.
    fn read_backing_vectored(&self, v: &GuestIov<'_>, offset: u64) -> Result<()> {
        let Some(b) = &self.backing else {
            v.zero();
            return Ok(());
        };
        let n = b.size().saturating_sub(offset).min(v.total() as u64) as usize;
        if n > 0 {
            b.read_vectored(&v.slice(0, n), offset)?;
        }
        if n < v.total() {
            v.slice(n, v.total() - n).zero();
        }
        Ok(())
    }

    /// Where the guest bytes `[offset, offset + len)` come from, translated under the metadata
    /// lock and merged into contiguous runs: `(at, len, source)` in order. The caller holds
    /// the gate (shared) until the I/O is done.
    fn read_plan(&self, offset: u64, len: usize) -> Result<Vec<(usize, usize, Src)>> {
        let cs = self.geo.cs;
        let mut plan: Vec<(usize, usize, Src)> = Vec::new();
        let mut m = self.meta()?;
        for p in pieces(offset, len, cs) {
            let src = match self.lookup(&mut m, p.gc)? {
                Map::Unallocated if self.backing.is_some() => {
                    Src::Backing(p.gc * cs + p.in_off as u64)
                }
                Map::Unallocated | Map::Zero(_) => Src::Zero,
                Map::Data(host, _) => Src::Host(host + p.in_off as u64),
                Map::Compressed(_) => {
                    return Err(unsupported(format!(
                    "guest cluster {} is compressed: reading compressed clusters is not supported",
                    p.gc
                )))
                }
            };
            if let Some((at, len, last)) = plan.last_mut() {
                let merged = match (&*last, &src) {
                    (Src::Zero, Src::Zero) => true,
                    (Src::Backing(a), Src::Backing(b)) | (Src::Host(a), Src::Host(b)) => {
                        a + *len as u64 == *b
                    }
                    _ => false,
                };
                if merged && *at + *len == p.at {
                    *len += p.len;
                    continue;
                }
            }
            plan.push((p.at, p.len, src));
        }
        Ok(plan)
    }

    /// The host offset of each cluster piece of `[offset, offset + len)` if every one is
    /// allocated and writable in place; empty otherwise. The caller holds the gate (shared).
    fn in_place_plan(&self, offset: u64, len: usize) -> Result<Vec<(Piece, u64)>> {
        let mut plan = Vec::new();
        let mut m = self.meta()?;
        for p in pieces(offset, len, self.geo.cs) {
            match self.lookup(&mut m, p.gc)? {
                Map::Data(host, true) => plan.push((p, host)),
                _ => return Ok(Vec::new()),
            }
        }
        Ok(plan)
    }

    /// Whether the cluster mapped as `m` reads as all zeroes.
    fn reads_zero(&self, m: Map) -> bool {
        match m {
            Map::Zero(_) => true,
            Map::Unallocated => self.backing.is_none(),
            _ => false,
        }
    }

    /// Allocating writes, discard and write-zeroes: writes back metadata if much of it is dirty.
    fn maybe_write_back(&self, m: &mut Meta) -> Result<()> {
        if m.l2.dirty > m.l2.cap / 2 || m.rc.dirty > m.rc.cap / 2 {
            self.write_back(m)?;
        }
        Ok(())
    }

    /// Writes every dirty table in the safe order (see the module documentation); the caller
    /// syncs afterwards for durability.
    fn write_back(&self, m: &mut Meta) -> Result<()> {
        let rc_dirty = m.rc.dirty > 0 || !m.rt_dirty.is_empty();
        let l2_dirty = m.l2.dirty > 0;
        let l1_dirty = !m.l1_dirty.is_empty();
        if !(rc_dirty || l2_dirty || l1_dirty) {
            return Ok(());
        }
        m.rc.write_back(&self.io)?;
        if !m.rt_dirty.is_empty() {
            // New refcount blocks before the refcount table entries that point at them.
            self.io.sync()?;
        }
        let chunks: Vec<usize> = std::mem::take(&mut m.rt_dirty).into_iter().collect();
        for c in chunks {
            write_chunk(&self.io, &m.rt, m.rt_offset, c)?;
        }
        if l2_dirty || l1_dirty {
            // Data and refcounts before any table that points at them.
            self.io.sync()?;
        }
        m.l2.write_back(&self.io)?;
        if l1_dirty {
            // New L2 tables before the L1 entries that point at them.
            self.io.sync()?;
            let chunks: Vec<usize> = std::mem::take(&mut m.l1_dirty).into_iter().collect();
            for c in chunks {
                write_chunk(&self.io, &m.l1, self.geo.l1_offset, c)?;
            }
        }
        Ok(())
    }

    /// Whether host cluster `c` is metadata.
    fn is_metadata(&self, m: &Meta, c: u64) -> bool {
        let l1 = self.geo.l1_offset >> self.geo.cluster_bits;
        let rt = m.rt_offset >> self.geo.cluster_bits;
        c == 0
            || (l1..l1 + self.geo.l1_clusters).contains(&c)
            || (rt..rt + m.rt_clusters).contains(&c)
            || m.tables.contains(&c)
    }

    /// Checks a data cluster's host offset from an L2 entry.
    fn check_data(&self, m: &Meta, host: u64, gc: u64) -> Result<()> {
        if host % self.geo.cs != 0 {
            return Err(corrupt(format!(
                "guest cluster {gc}: host offset {host:#x} not cluster aligned"
            )));
        }
        let c = host >> self.geo.cluster_bits;
        if c >= m.next_free {
            return Err(corrupt(format!(
                "guest cluster {gc}: host offset {host:#x} past the end of the image"
            )));
        }
        if self.is_metadata(m, c) {
            return Err(corrupt(format!(
                "guest cluster {gc}: host offset {host:#x} overlaps metadata"
            )));
        }
        Ok(())
    }

    /// The L2 table offset and entry index for guest cluster `gc` (offset 0: no table).
    fn l2_slot(&self, m: &Meta, gc: u64) -> Result<(usize, u64, u64)> {
        let l1i = (gc / self.geo.l2_entries) as usize;
        let e = *m
            .l1
            .get(l1i)
            .ok_or_else(|| corrupt(format!("guest cluster {gc} beyond the L1 table")))?;
        Ok((l1i, e, gc % self.geo.l2_entries))
    }

    /// Where guest cluster `gc` is.
    fn lookup(&self, m: &mut Meta, gc: u64) -> Result<Map> {
        let (_, l1e, idx) = self.l2_slot(m, gc)?;
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 {
            return Ok(Map::Unallocated);
        }
        let cs = self.geo.cs as usize;
        let t = m.l2.get(&self.io, l2, cs)?;
        let e = be64(&t.data, idx as usize * 8);
        self.decode(m, e, gc)
    }

    fn decode(&self, m: &Meta, e: u64, gc: u64) -> Result<Map> {
        if e & OFLAG_COMPRESSED != 0 {
            return Ok(Map::Compressed(e));
        }
        if e & L2E_RESERVED != 0 {
            return Err(corrupt(format!(
                "guest cluster {gc}: L2 entry {e:#x} has reserved bits set"
            )));
        }
        let host = e & OFFSET_MASK;
        let copied = e & OFLAG_COPIED != 0;
        if e & OFLAG_ZERO != 0 {
            if host == 0 {
                return Ok(Map::Zero(None));
            }
            self.check_data(m, host, gc)?;
            return Ok(Map::Zero(Some((host, copied))));
        }
        if host == 0 {
            return Ok(Map::Unallocated);
        }
        self.check_data(m, host, gc)?;
        Ok(Map::Data(host, copied))
    }

    /// Sets the L2 entry of guest cluster `gc` (its L2 table must exist).
    fn set_l2(&self, m: &mut Meta, gc: u64, entry: u64) -> Result<()> {
        let (_, l1e, idx) = self.l2_slot(m, gc)?;
        let l2 = l1e & OFFSET_MASK;
        if l2 == 0 {
            return Err(corrupt("setting an entry of a missing L2 table"));
        }
        let cs = self.geo.cs as usize;
        let t = m.l2.get(&self.io, l2, cs)?;
        let at = idx as usize * 8;
        t.data[at..at + 8].copy_from_slice(&entry.to_be_bytes());
        m.l2.mark_dirty(l2);
        Ok(())
    }

    /// Makes sure guest cluster `gc` has a writable L2 table, allocating one if needed.
    fn ensure_l2(&self, m: &mut Meta, gc: u64) -> Result<()> {
        let (l1i, l1e, _) = self.l2_slot(m, gc)?;
        if l1e & OFFSET_MASK != 0 {
            if l1e & OFLAG_COPIED == 0 {
                return Err(unsupported(format!(
                    "L2 table of L1 entry {l1i} is shared (COPIED flag clear): writing it is not supported"
                )));
            }
            return Ok(());
        }
        let off = self.alloc_cluster(m)?;
        m.l2.insert_new(off, self.geo.cs as usize);
        m.tables.insert(off >> self.geo.cluster_bits);
        m.l1[l1i] = off | OFLAG_COPIED;
        m.l1_dirty.insert(l1i / CHUNK_ENTRIES);
        Ok(())
    }

    /// The refcount block for host cluster `c`: (its offset, the index inside), offset 0 if the
    /// table has none; `None` if the table is too small to have an entry for it.
    fn rc_block(&self, m: &Meta, c: u64) -> Option<(u64, u64)> {
        let bi = (c / self.geo.rpb) as usize;
        m.rt.get(bi).map(|e| (e & !REFT_RESERVED, c % self.geo.rpb))
    }

    fn refcount(&self, m: &mut Meta, c: u64) -> Result<u64> {
        match self.rc_block(m, c) {
            None | Some((0, _)) => Ok(0),
            Some((b, i)) => {
                let slot = m.rc.get(&self.io, b, self.geo.cs as usize)?;
                Ok(rc_get(&slot.data, i, self.geo.refcount_order))
            }
        }
    }

    /// Sets the refcount of `c`, whose refcount block must exist.
    fn set_refcount(&self, m: &mut Meta, c: u64, v: u64) -> Result<()> {
        let Some((b, i)) = self.rc_block(m, c).filter(|(b, _)| *b != 0) else {
            return Err(corrupt(format!("no refcount block for cluster {c}")));
        };
        let slot = m.rc.get(&self.io, b, self.geo.cs as usize)?;
        rc_set(&mut slot.data, i, self.geo.refcount_order, v);
        m.rc.mark_dirty(b);
        Ok(())
    }

    /// Allocates one cluster at the end of the image (refcount 1); returns its offset.
    fn alloc_cluster(&self, m: &mut Meta) -> Result<u64> {
        let cs = self.geo.cs;
        loop {
            let c = m.next_free;
            if (c + 1) * cs > MAX_HOST_OFFSET {
                return Err(unsupported("the image file would exceed 2^56 bytes"));
            }
            let bi = c / self.geo.rpb;
            if bi >= m.rt.len() as u64 {
                self.grow_refcount_table(m, bi)?;
                continue;
            }
            if m.rt[bi as usize] == 0 {
                // A new refcount block at `c`, inside the range it describes: it counts itself.
                let off = c * cs;
                m.rc.insert_new(off, cs as usize);
                m.tables.insert(c);
                m.rt[bi as usize] = off;
                m.rt_dirty.insert(bi as usize / CHUNK_ENTRIES);
                self.set_refcount(m, c, 1)?;
                m.next_free = c + 1;
                continue;
            }
            if self.refcount(m, c)? != 0 {
                return Err(corrupt(format!(
                    "cluster {c} past the end of the file has a refcount (run `qemu-img check -r all`)"
                )));
            }
            self.set_refcount(m, c, 1)?;
            m.next_free = c + 1;
            return Ok(c * cs);
        }
    }

    /// Replaces the refcount table by a bigger one at the end of the file, covering at least
    /// block index `need`: the new table and any refcount blocks its own clusters need are
    /// written and synced, then the header is switched to it and synced; the old table's
    /// clusters get refcount 0 afterwards (a crash in between leaks them at worst).
    fn grow_refcount_table(&self, m: &mut Meta, need: u64) -> Result<()> {
        let cs = self.geo.cs;
        let rpb = self.geo.rpb;
        let old_len = m.rt.len() as u64;
        let s = m.next_free;
        let missing = |m: &Meta, from: u64, to: u64| -> Vec<u64> {
            (from / rpb..=(to - 1) / rpb)
                .filter(|k| *k >= old_len || m.rt[*k as usize] == 0)
                .collect()
        };
        let mut t = ((need + 1).max(old_len * 2) * 8).div_ceil(cs);
        let blocks = loop {
            let mut b = 0u64;
            let blocks = loop {
                let miss = missing(m, s, s + t + b);
                if miss.len() as u64 == b {
                    break miss;
                }
                b = miss.len() as u64;
            };
            let last = (s + t + b - 1) / rpb;
            let entries = need.max(last) + 1;
            if entries * 8 <= t * cs {
                break blocks;
            }
            t = (entries * 8).div_ceil(cs);
        };
        if t * cs > MAX_RT_BYTES {
            return Err(unsupported(
                "the refcount table would exceed 8 MiB: the image is too large for its cluster size",
            ));
        }
        let b = blocks.len() as u64;
        let mut rt = m.rt.clone();
        rt.resize((t * cs / 8) as usize, 0);
        for (i, k) in blocks.iter().enumerate() {
            let c = s + t + i as u64;
            rt[*k as usize] = c * cs;
            m.rc.insert_new(c * cs, cs as usize);
            m.tables.insert(c);
        }
        let old_rt = std::mem::replace(&mut m.rt, rt);
        for c in s..s + t + b {
            if self.refcount(m, c)? != 0 {
                m.rt = old_rt;
                return Err(corrupt(format!(
                    "cluster {c} past the end of the file has a refcount (run `qemu-img check -r all`)"
                )));
            }
            self.set_refcount(m, c, 1)?;
        }
        // Blocks and table, then the header.
        m.rc.write_back(&self.io)?;
        let mut raw = Vec::with_capacity((t * cs) as usize);
        for e in &m.rt {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.io.write(&raw, s * cs)?;
        self.io.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(s * cs).to_be_bytes());
        hdr[8..].copy_from_slice(&(t as u32).to_be_bytes());
        self.io.write(&hdr, HDR_REFCOUNT_TABLE)?;
        self.io.sync()?;
        let (old_off, old_clusters) = (m.rt_offset, m.rt_clusters);
        m.rt_offset = s * cs;
        m.rt_clusters = t;
        m.rt_dirty.clear();
        m.next_free = s + t + b;
        for c in old_off / cs..old_off / cs + old_clusters {
            let v = self.refcount(m, c)?;
            self.set_refcount(m, c, v.saturating_sub(1))?;
        }
        Ok(())
    }

    /// Writes `data` into guest cluster `gc` at `in_off`, allocating (with copy-on-write) as
    /// needed. The caller holds the gate exclusively.
    fn write_cluster(&self, m: &mut Meta, gc: u64, in_off: usize, data: &[u8]) -> Result<()> {
        let cs = self.geo.cs as usize;
        let map = self.lookup(m, gc)?;
        let reuse = match map {
            Map::Data(host, true) => {
                return self.io.write(data, host + in_off as u64);
            }
            Map::Data(_, false) | Map::Zero(Some((_, false))) => {
                return Err(unsupported(format!(
                    "guest cluster {gc} is shared (COPIED flag clear): writing it is not supported"
                )));
            }
            Map::Compressed(_) => {
                return Err(unsupported(format!(
                    "guest cluster {gc} is compressed: overwriting compressed clusters is not supported"
                )));
            }
            Map::Zero(Some((host, true))) => Some(host),
            Map::Zero(None) | Map::Unallocated => None,
        };
        // The whole new cluster: old contents (backing image or zeroes) under the new data.
        let mut full;
        let buf: &[u8] = if in_off == 0 && data.len() == cs {
            data
        } else {
            // Aligned, so that under O_DIRECT it goes to the file without a bounce.
            full = AlignedBuf::new(cs)?;
            let f = full.as_mut_slice();
            if map == Map::Unallocated && self.backing.is_some() {
                let start = gc * cs as u64;
                let n = (self.geo.size.saturating_sub(start)).min(cs as u64) as usize;
                self.read_backing(&mut f[..n], start)?;
            }
            f[in_off..in_off + data.len()].copy_from_slice(data);
            full.as_slice()
        };
        self.ensure_l2(m, gc)?;
        let host = match reuse {
            Some(h) => h,
            None => self.alloc_cluster(m)?,
        };
        // Data first; the L2 entry reaches the file only at write-back, after a sync.
        self.io.write(buf, host)?;
        self.set_l2(m, gc, host | OFLAG_COPIED)
    }

    /// Discard (`punch`) and write-zeroes: `[offset, offset + len)` reads as zeroes afterwards.
    fn zero_range(&self, offset: u64, len: u64, punch: bool) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.gate.write().map_err(|_| Error::Poisoned)?;
        let mut m = self.meta()?;
        let cs = self.geo.cs;
        let zero_buf = AlignedBuf::new(cs as usize)?;
        let zeroes = zero_buf.as_slice();
        let mut pos = offset;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= self.geo.size)
            .ok_or(Error::TooLarge(len))?;
        while pos < end {
            let gc = pos / cs;
            let in_off = (pos % cs) as usize;
            let n = (cs - in_off as u64).min(end - pos);
            let whole = in_off == 0 && (n == cs || pos + n == self.geo.size);
            // No L2 table and nothing underneath: the rest of this table's range is zero.
            let (_, l1e, idx) = self.l2_slot(&m, gc)?;
            if l1e & OFFSET_MASK == 0 && self.backing.is_none() {
                let table_end = (gc - idx + self.geo.l2_entries) * cs;
                pos = table_end.min(end);
                continue;
            }
            let map = self.lookup(&mut m, gc)?;
            let zero_now = self.reads_zero(map);
            let part = &zeroes[..n as usize];
            if !whole {
                // Part of a cluster: zeroes written (in place, or into a new cluster).
                if !zero_now {
                    match map {
                        Map::Data(host, true) => self.io.write(part, host + in_off as u64)?,
                        _ => self.write_cluster(&mut m, gc, in_off, part)?,
                    }
                }
            } else if self.geo.version >= 3 {
                // A whole cluster: the zero flag, keeping any host cluster (punched out of the
                // file for discard and unmap).
                match map {
                    Map::Data(host, true) => {
                        self.set_l2(&mut m, gc, host | OFLAG_COPIED | OFLAG_ZERO)?;
                        if punch {
                            self.io.punch(host, cs)?;
                        }
                    }
                    Map::Zero(Some((host, true))) if punch => {
                        self.io.punch(host, cs)?;
                    }
                    Map::Zero(_) => {}
                    Map::Unallocated => {
                        if !zero_now {
                            self.ensure_l2(&mut m, gc)?;
                            self.set_l2(&mut m, gc, OFLAG_ZERO)?;
                        }
                    }
                    Map::Data(_, false) | Map::Compressed(_) => {
                        return Err(unsupported(format!(
                            "guest cluster {gc} is shared or compressed: zeroing it is not supported"
                        )));
                    }
                }
            } else if !zero_now {
                // v2 has no zero flag: a hole in the host cluster, or zeroes written.
                match map {
                    Map::Data(host, true) if punch && self.io.punch(host, cs)? => {}
                    _ => self.write_cluster(&mut m, gc, 0, part)?,
                }
            }
            pos += n;
            self.maybe_write_back(&mut m)?;
        }
        Ok(())
    }
}

/// Checks a table's placement: cluster aligned, inside the file.
fn check_table_range(what: &str, off: u64, bytes: u64, cs: u64, file_end: u64) -> Result<()> {
    if off % cs != 0 || off == 0 {
        return Err(corrupt(format!(
            "{what} at {off:#x}: not a cluster boundary past the header"
        )));
    }
    if off.checked_add(bytes).is_none_or(|e| e > file_end) {
        return Err(corrupt(format!(
            "{what} at {off:#x} ({bytes} bytes) runs past the end of the file"
        )));
    }
    Ok(())
}

fn check_table_cluster(what: &str, off: u64, cs: u64, file_end: u64) -> Result<()> {
    check_table_range(what, off, cs, cs, file_end)
}

/// Writes chunk `c` ([`CHUNK_ENTRIES`] entries) of an in-memory table of big-endian entries.
fn write_chunk(io: &Io, table: &[u64], table_offset: u64, c: usize) -> Result<()> {
    let start = c * CHUNK_ENTRIES;
    let end = (start + CHUNK_ENTRIES).min(table.len());
    if start >= end {
        return Ok(());
    }
    let mut raw = Vec::with_capacity((end - start) * 8);
    for e in &table[start..end] {
        raw.extend_from_slice(&e.to_be_bytes());
    }
    io.write(&raw, table_offset + start as u64 * 8)
}

/// A read plan entry.
enum Src {
    Zero,
    Backing(u64),
    Host(u64),
}

impl DiskImage for Qcow2 {
    fn size(&self) -> u64 {
        self.geo.size
    }

    fn serialized_writes(&self) -> bool {
        self.io.serialized
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let _g = self.gate.read().map_err(|_| Error::Poisoned)?;
        for (at, len, src) in self.read_plan(offset, buf.len())? {
            let b = &mut buf[at..at + len];
            match src {
                Src::Zero => b.fill(0),
                Src::Backing(off) => self.read_backing(b, off)?,
                Src::Host(off) => self.io.read(b, off)?,
            }
        }
        Ok(())
    }

    /// Per-cluster mapping straight into the guest buffers: each run of host clusters one
    /// `preadv`, the backing image's parts through its own `read_vectored`, zeroes written.
    fn read_vectored(&self, v: &GuestIov<'_>, offset: u64) -> Result<()> {
        let _g = self.gate.read().map_err(|_| Error::Poisoned)?;
        for (at, len, src) in self.read_plan(offset, v.total())? {
            let part = v.slice(at, len);
            match src {
                Src::Zero => part.zero(),
                Src::Backing(off) => self.read_backing_vectored(&part, off)?,
                Src::Host(off) => self.io.read_vectored(&part, off)?,
            }
        }
        Ok(())
    }

    /// In-place writes (every cluster allocated and writable) straight from the guest buffers,
    /// one `pwritev` per cluster; a write that allocates goes through `write_at`.
    fn write_vectored(&self, v: &GuestIov<'_>, offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        {
            let _g = self.gate.read().map_err(|_| Error::Poisoned)?;
            let plan = self.in_place_plan(offset, v.total())?;
            if !plan.is_empty() {
                for (p, host) in plan {
                    self.io
                        .write_vectored(&v.slice(p.at, p.len), host + p.in_off as u64)?;
                }
                return Ok(());
            }
        }
        iov::bounce_write(self, v, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let cs = self.geo.cs;
        // Fast path: every cluster already allocated and writable in place.
        {
            let _g = self.gate.read().map_err(|_| Error::Poisoned)?;
            let plan = self.in_place_plan(offset, buf.len())?;
            if !plan.is_empty() {
                for (p, host) in plan {
                    self.io
                        .write(&buf[p.at..p.at + p.len], host + p.in_off as u64)?;
                }
                return Ok(());
            }
        }
        let _g = self.gate.write().map_err(|_| Error::Poisoned)?;
        let mut m = self.meta()?;
        for p in pieces(offset, buf.len(), cs) {
            self.write_cluster(&mut m, p.gc, p.in_off, &buf[p.at..p.at + p.len])?;
            self.maybe_write_back(&mut m)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.meta()?;
        self.write_back(&mut m)?;
        self.io.sync()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.zero_range(offset, len, unmap)
    }
}

impl Drop for Qcow2 {
    /// Writes back dirty metadata, as closing the image in QEMU does (a guest that never flushed
    /// still gets a consistent image).
    fn drop(&mut self) {
        if self.read_only {
            return;
        }
        if let Err(e) = self.flush() {
            log::error!("qcow2: writing back metadata at close: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_widths_round_trip() {
        for order in 0..=6u32 {
            let bits = 1u64 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut b = vec![0u8; 512];
            let n = 512 * 8 / bits;
            for i in 0..n {
                rc_set(&mut b, i, order, (i * 7) & max);
            }
            for i in 0..n {
                assert_eq!(rc_get(&b, i, order), (i * 7) & max, "order {order} i {i}");
            }
            rc_set(&mut b, 1, order, max);
            assert_eq!(rc_get(&b, 1, order), max);
            assert_eq!(rc_get(&b, 0, order), 0);
            assert_eq!(rc_get(&b, 2, order), 14 & max);
        }
        // Sub-byte refcounts are little-endian inside the byte, as QEMU stores them.
        let mut b = vec![0u8; 1];
        rc_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        rc_set(&mut b, 1, 2, 0xf);
        assert_eq!(b[0], 0xf1);
    }

    #[test]
    fn pieces_split_at_cluster_boundaries() {
        let v: Vec<_> = pieces(1000, 2000, 512)
            .map(|p| (p.gc, p.in_off, p.at, p.len))
            .collect();
        assert_eq!(
            v,
            vec![
                (1, 488, 0, 24),
                (2, 0, 24, 512),
                (3, 0, 536, 512),
                (4, 0, 1048, 512),
                (5, 0, 1560, 440)
            ]
        );
        assert_eq!(pieces(0, 0, 512).count(), 0);
    }

    /// A minimal v3 header for parse tests.
    fn header(cluster_bits: u32) -> Vec<u8> {
        let mut h = vec![0u8; 1 << cluster_bits.max(12)];
        h[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        h[36..40].copy_from_slice(&1u32.to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&104u32.to_be_bytes());
        h
    }

    #[test]
    fn header_parse_and_refusals() {
        let h = Header::parse(&header(16)).expect("parse");
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert!(h.backing.is_none());

        let bad = |f: &dyn Fn(&mut Vec<u8>), want: &str| {
            let mut b = header(16);
            f(&mut b);
            let e = Header::parse(&b)
                .and_then(|h| h.check_features(false))
                .expect_err(want)
                .to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        };
        bad(&|b| b[0] = 0, "magic");
        bad(&|b| b[7] = 4, "version 4");
        bad(&|b| b[23] = 8, "cluster_bits 8");
        bad(&|b| b[23] = 22, "cluster_bits 22");
        bad(&|b| b[35] = 1, "encryption");
        bad(&|b| b[79] = 1, "dirty bit");
        bad(&|b| b[79] = 2, "marked corrupt");
        bad(&|b| b[79] = 4, "external data file");
        bad(&|b| b[79] = 16, "extended L2");
        bad(&|b| b[79] = 32, "unknown incompatible feature bit 5");
        bad(&|b| b[99] = 7, "refcount_order 7");
        bad(&|b| b[103] = 80, "header_length");
        bad(&|b| b[63] = 1, "snapshot");
        // A header extension running past the cluster.
        bad(
            &|b| {
                b[104..108].copy_from_slice(&0x1234u32.to_be_bytes());
                b[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
            },
            "runs past",
        );
        // Backing file names: outside the cluster, too long.
        bad(
            &|b| {
                b[8..16].copy_from_slice(&65530u64.to_be_bytes());
                b[16..20].copy_from_slice(&10u32.to_be_bytes());
            },
            "outside the first cluster",
        );
        bad(
            &|b| {
                b[8..16].copy_from_slice(&512u64.to_be_bytes());
                b[16..20].copy_from_slice(&2000u32.to_be_bytes());
            },
            "2000 bytes",
        );
        // Compressed clusters of the zstd kind are refused only when read.
        let mut b = header(16);
        b[79] = 8;
        Header::parse(&b)
            .and_then(|h| h.check_features(false))
            .expect("compression type bit");
        // Read-only opens accept snapshots and the corrupt bit.
        let mut b = header(16);
        b[63] = 1;
        b[79] = 2;
        Header::parse(&b)
            .and_then(|h| h.check_features(true))
            .expect("read-only");
    }

    #[test]
    fn header_backing_name_and_format() {
        let mut b = header(16);
        // Backing format extension, then end.
        b[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[108..112].copy_from_slice(&5u32.to_be_bytes());
        b[112..117].copy_from_slice(b"qcow2");
        b[8..16].copy_from_slice(&200u64.to_be_bytes());
        b[16..20].copy_from_slice(&8u32.to_be_bytes());
        b[200..208].copy_from_slice(b"base.img");
        let h = Header::parse(&b).expect("parse");
        assert_eq!(
            h.backing,
            Some(BackingFile {
                name: "base.img".into(),
                format: Some("qcow2".into())
            })
        );
    }
}
