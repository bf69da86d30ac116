//! Disks at run time: the image files the monitor opens, and the `bulkhead-blockd` that serves
//! each `virtio-blk-pci` device.
//!
//! At start-up (before the monitor confines itself) every protocol node's file is opened by the
//! monitor — by path, or from `/dev/fdset/N` ([`crate::fds`]) — read-only when the node is,
//! with `O_DIRECT` for `cache.direct` (`cache=none`); under `O_DIRECT` a second, buffered
//! descriptor of the same file (a reopen through `/proc/self/fd`, a new open file description)
//! serves writes that reach an unaligned end of file. A `-drive` without `format=` is probed as
//! QEMU does (the qcow2 magic, else raw, with QEMU's warning). A qcow2 image with a backing file
//! is refused for now.
//!
//! Each time the machine worker starts, [`Disks::start`] starts one blockd per device through
//! the launcher ([`crate::worker::spawn_role`]): its ipc channel, the handshake, then
//! [`BlockRequest::Setup`] with the image fd(s) and one end of a fresh `socketpair`; the other
//! end goes to vcpu-proc in `VmSetup.devices`. A supervisor task per blockd waits for its exit
//! (pidfd) and reports it ([`BlockdExit`]); an exit that is not a clean end of the session
//! (status 0 after the front end hung up, the monitor asked, or the monitor went) is an
//! unexpected death: logged with its status or the refused system call, `X_WORKER_EXITED`. The
//! VM keeps running (the guest sees a disk that stops answering).
//!
//! Each blockd gets its device's `rerror`/`werror` policy in `Setup`; the `BlockEvent::IoError`
//! it sends for a failed request is passed to the VM actor ([`Disks::next_news`]), which
//! records the backend's I/O status ([`Disks::on_io_error`]), sends `BLOCK_IO_ERROR` and, for
//! the `stop` action, pauses the machine; `cont` clears the statuses and sends every blockd
//! `Resume` ([`Disks::resume_all`]) so it retries what it held.
//!
//! A `vhost-user-blk-pci` has no blockd: its back end is an outside vhost-user-blk server. The
//! monitor connects to the server's socket (its `-chardev socket,path=`) at start-up and hands
//! the connected socket to vcpu-proc with the other devices. A later machine worker (after
//! `system_reset` rebuilt a dead one) needs a fresh connection to the same path, which only an
//! unconfined monitor (`--sandbox off`) can make: the confined one has no `socket`/`connect`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bulkhead_ipc::messages::{
    BlockEvent, BlockProtocol, BlockReply, BlockRequest, BlockSetup, BlockStats, ErrorAction,
    ImageFormat, SandboxReport, ThrottleLimits, VirtioDevice, VirtioKind,
};
use bulkhead_ipc::{AsyncChannel, Role as IpcRole, RpcClient};
use bulkhead_sandbox::seccomp::Violation;
use tokio::sync::{mpsc, oneshot};

use crate::block::{BlockConfig, Driver, NodeSpec, Resolved};
use crate::fds::{Access, DupLease, FdSets, OpenSpec};
use crate::io_error::{BlockIoError, IoStatus};
use crate::worker::{self, SandboxConfig, WorkerError};

/// The blockd binary's file name.
pub const BLOCKD_WORKER: &str = "bulkhead-blockd";
/// How long blockd has for the handshake and the setup.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long blockd has to answer a request.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// qcow2's magic (`QFI\xfb`).
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Bytes of an image's start read for its header, extensions and backing file name.
const HEADER_READ: usize = 64 * 1024;
/// Most backing files under one image: what fits in blockd's `Setup` frame next to the image,
/// its buffered tail and the vhost-user socket (blockd itself takes up to 32).
const MAX_CHAIN: usize = bulkhead_ipc::MAX_FDS - 3;
/// qcow2's backing format header extension.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// One backing file of a qcow2 image, opened by the monitor (read-only).
struct Backing {
    /// The name its parent's header gives it.
    name: String,
    /// Where that name led (next to the parent, for a relative one).
    path: String,
    /// Its format, as the parent records it.
    format: ImageFormat,
    /// Its virtual size.
    size: u64,
    /// A qcow2 backing file's header facts.
    qcow2: Option<Qcow2Details>,
    file: File,
    /// Node names in the graph: (its `file` node, its format node).
    nodes: (String, String),
}

/// The header facts `query-block` reports for a qcow2 image (`cluster-size`,
/// `format-specific`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qcow2Details {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Incompatible feature bits (v3).
    pub incompatible: u64,
    /// Compatible feature bits (v3).
    pub compatible: u64,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Compression type (0 zlib, 1 zstd).
    pub compression: u8,
}

/// What the monitor needs of a qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Qcow2Info {
    size: u64,
    /// Backing file name and recorded format.
    backing: Option<(String, Option<String>)>,
    details: Qcow2Details,
}

fn be(b: &[u8], at: usize, n: usize) -> Option<u64> {
    Some(
        b.get(at..at.checked_add(n)?)?
            .iter()
            .fold(0u64, |a, &x| a << 8 | u64::from(x)),
    )
}

/// Parses a qcow2 header (v2 or v3) from the image's first bytes: size, backing file name and
/// the backing format extension. Everything is bounds-checked against `head`.
fn qcow2_info(head: &[u8]) -> Result<Qcow2Info, String> {
    let bad = || "Image is not in qcow2 format (or its header is damaged)".to_string();
    if head.get(..4) != Some(&QCOW2_MAGIC[..]) {
        return Err(bad());
    }
    let version = be(head, 4, 4).ok_or_else(bad)?;
    let size = be(head, 24, 8).ok_or_else(bad)?;
    let name_off = be(head, 8, 8).ok_or_else(bad)?;
    let name_len = be(head, 16, 4).ok_or_else(bad)?;
    let header_len = match version {
        2 => 72,
        3 => be(head, 100, 4).ok_or_else(bad)?,
        v => return Err(format!("qcow2 version {v} is not supported")),
    };
    let v3 = |at: usize, n: usize| -> Result<u64, String> {
        if version == 3 {
            be(head, at, n).ok_or_else(bad)
        } else {
            Ok(0)
        }
    };
    let details = Qcow2Details {
        version: version as u32,
        cluster_bits: be(head, 20, 4).ok_or_else(bad)? as u32,
        incompatible: v3(72, 8)?,
        compatible: v3(80, 8)?,
        refcount_order: if version == 3 { v3(96, 4)? as u32 } else { 4 },
        compression: if version == 3 && header_len > 104 {
            be(head, 104, 1).ok_or_else(bad)? as u8
        } else {
            0
        },
    };
    let mut format = None;
    let mut at = usize::try_from(header_len).map_err(|_| bad())?;
    // Extensions: type, length, data padded to 8 bytes, until type 0.
    for _ in 0..64 {
        let (Some(ty), Some(len)) = (be(head, at, 4), be(head, at.saturating_add(4), 4)) else {
            break;
        };
        if ty == 0 {
            break;
        }
        let len = usize::try_from(len).map_err(|_| bad())?;
        let start = at.checked_add(8).ok_or_else(bad)?;
        let data = head
            .get(start..start.checked_add(len).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        if ty == u64::from(EXT_BACKING_FORMAT) {
            format = Some(String::from_utf8_lossy(data).into_owned());
        }
        at = start.checked_add(len.div_ceil(8) * 8).ok_or_else(bad)?;
    }
    let backing = if name_off == 0 {
        None
    } else {
        if name_len == 0 || name_len > 1023 {
            return Err(bad());
        }
        let o = usize::try_from(name_off).map_err(|_| bad())?;
        let n = usize::try_from(name_len).map_err(|_| bad())?;
        let name = head
            .get(o..o.checked_add(n).ok_or_else(bad)?)
            .ok_or_else(bad)?;
        Some((String::from_utf8_lossy(name).into_owned(), format))
    };
    Ok(Qcow2Info {
        size,
        backing,
        details,
    })
}

/// Opens the backing chain of the qcow2 image at `path` whose header names `first`: each file
/// read-only (and `O_DIRECT` under `direct`), a relative name taken next to the image naming
/// it (QEMU's rule), the format its parent records (an unrecorded one is refused rather than
/// probed: probing is how a guest-written header in a raw image could name host files), at
/// most [`MAX_CHAIN`] files, none twice.
fn open_chain(
    path: &str,
    first: &(String, Option<String>),
    direct: bool,
    image_id: (u64, u64),
) -> Result<Vec<Backing>, DisksError> {
    let mut chain: Vec<Backing> = Vec::new();
    let mut seen = vec![image_id];
    let mut parent = path.to_string();
    let mut next = Some(first.clone());
    while let Some((name, format)) = next.take() {
        let err = |reason: String| DisksError::Image {
            path: parent.clone(),
            reason,
        };
        if chain.len() >= MAX_CHAIN {
            return Err(err(format!(
                "a backing chain deeper than {MAX_CHAIN} images"
            )));
        }
        let Some(format) = format else {
            return Err(err(format!(
                "backing file {name:?}: the image records no backing format (set it with \
                 `qemu-img rebase -u -F raw|qcow2 -b NAME`)"
            )));
        };
        let bpath = if Path::new(&name).is_absolute() {
            PathBuf::from(&name)
        } else if parent.starts_with("/dev/fdset/") {
            return Err(err(format!(
                "backing file {name:?} is relative to an image passed as an fd; give the \
                 image by path or rebase it on an absolute name"
            )));
        } else {
            Path::new(&parent)
                .parent()
                .unwrap_or(Path::new("."))
                .join(&name)
        };
        let bstr = bpath.display().to_string();
        let file = File::open(&bpath).map_err(|source| DisksError::Open {
            path: bstr.clone(),
            source,
        })?;
        let md = file.metadata().map_err(|source| DisksError::Open {
            path: bstr.clone(),
            source,
        })?;
        if seen.contains(&(md.dev(), md.ino())) {
            return Err(err(format!("backing chain loop: {bstr} appears twice")));
        }
        seen.push((md.dev(), md.ino()));
        let (fmt, size, qcow2) = match format.as_str() {
            "raw" => {
                let size = file_size(&file).map_err(|source| DisksError::Open {
                    path: bstr.clone(),
                    source,
                })?;
                (ImageFormat::Raw, size, None)
            }
            "qcow2" => {
                let mut head = vec![0u8; HEADER_READ];
                let got = read_at(&file, &mut head, 0).map_err(|source| DisksError::Open {
                    path: bstr.clone(),
                    source,
                })?;
                let info = qcow2_info(&head[..got]).map_err(|reason| DisksError::Image {
                    path: bstr.clone(),
                    reason,
                })?;
                next = info.backing;
                (ImageFormat::Qcow2, info.size, Some(info.details))
            }
            other => {
                return Err(err(format!(
                    "backing file {name:?} has format {other:?} (raw or qcow2 only)"
                )))
            }
        };
        if direct {
            set_direct(&file).map_err(|e| DisksError::Image {
                path: bstr.clone(),
                reason: format!("cache=none needs O_DIRECT: {e}"),
            })?;
        }
        parent = bstr.clone();
        chain.push(Backing {
            name,
            path: bstr,
            format: fmt,
            size,
            qcow2,
            file,
            nodes: (String::new(), String::new()),
        });
    }
    Ok(chain)
}

fn set_direct(f: &File) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; integer arguments only.
    let rc = unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 {
            fl
        } else {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_DIRECT)
        }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Errors opening images or starting blockd.
#[derive(Debug, thiserror::Error)]
pub enum DisksError {
    /// An image could not be opened.
    #[error("could not open disk image '{path}': {source}")]
    Open {
        /// As given.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// An image is not usable as configured.
    #[error("disk image '{path}': {reason}")]
    Image {
        /// As given.
        path: String,
        /// Why.
        reason: String,
    },
    /// Starting blockd failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// blockd failed during start-up.
    #[error("bulkhead-blockd for {device} (pid {pid}): {reason}")]
    Start {
        /// The device.
        device: String,
        /// Its pid.
        pid: u32,
        /// What went wrong.
        reason: String,
    },
    /// A socketpair could not be made.
    #[error("socketpair for {0}: {1}")]
    Socket(String, std::io::Error),
    /// A vhost-user back end's socket could not be connected.
    #[error("Failed to connect to '{path}' (chardev '{chardev}'): {source}")]
    Connect {
        /// The chardev.
        chardev: String,
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// One opened protocol node.
struct Image {
    file: File,
    /// Under `O_DIRECT` and writable: the buffered descriptor.
    tail: Option<File>,
    /// Keeps an fd-set duplicate registered with its set.
    _lease: Option<DupLease>,
    read_only: bool,
    direct: bool,
}

/// A node with what the monitor learnt opening it.
#[derive(Debug, Clone)]
pub struct NodeView {
    /// As configured.
    pub spec: NodeSpec,
    /// Its driver (a probed format for a `-drive` without `format=`).
    pub driver: Driver,
    /// The image path as given (of its protocol node).
    pub filename: String,
    /// Virtual size in bytes (raw: the file's size; qcow2: the header's).
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    /// `O_DIRECT`.
    pub direct: bool,
    /// `cache.no-flush`.
    pub no_flush: bool,
    /// Read-only.
    pub read_only: bool,
    /// A qcow2 image's backing file, as its header names it.
    pub backing_file: Option<String>,
    /// Where that name leads.
    pub full_backing_filename: Option<String>,
    /// The backing file's recorded format.
    pub backing_format: Option<&'static str>,
    /// The backing file's format node.
    pub backing: Option<String>,
    /// Images below it (its backing chain's length).
    pub backing_depth: usize,
    /// A qcow2 image's header facts.
    pub qcow2: Option<Qcow2Details>,
    /// `block-set-write-threshold` (0: none).
    pub write_threshold: u64,
}

/// What `query-block`, `query-named-block-nodes` and `query-blockstats` report.
#[derive(Debug, Clone)]
pub struct BlockView {
    /// The graph.
    pub config: BlockConfig,
    /// Every node, in [`BlockConfig::nodes`] order.
    pub nodes: Vec<NodeView>,
    /// Per device: blockd's counters (`None`: no blockd runs for it now).
    pub stats: Vec<Option<BlockStats>>,
    /// Per device: its I/O limits and their group.
    pub throttles: Vec<(ThrottleLimits, String)>,
    /// Per device: its backend's I/O status (`query-block`'s `io-status`).
    pub io_status: Vec<IoStatus>,
}

/// `block_set_io_throttle`'s arguments, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThrottleArgs {
    /// `device` (a backend name).
    pub device: Option<String>,
    /// `id` (a device id).
    pub id: Option<String>,
    /// `bps`, `bps_rd`, `bps_wr`, `iops`, `iops_rd`, `iops_wr`.
    pub avg: [i64; 6],
    /// `bps_max`, `bps_rd_max`, `bps_wr_max`, `iops_max`, `iops_rd_max`, `iops_wr_max`.
    pub max: [i64; 6],
    /// The `*_max_length` values and `iops_size`, which Bulkhead does not support but as 0.
    pub other: Vec<(&'static str, i64)>,
    /// `group`.
    pub group: Option<String>,
}

/// QEMU's `THROTTLE_VALUE_MAX`.
const THROTTLE_VALUE_MAX: i64 = 1_000_000_000_000_000;

impl ThrottleArgs {
    /// Checks the values as QEMU's `throttle_is_valid` does (with its messages), then what
    /// Bulkhead cannot do yet (bursts, request sizes, groups).
    pub fn limits(&self) -> Result<ThrottleLimits, String> {
        let (a, m) = (&self.avg, &self.max);
        let both =
            |t: usize, r: usize, w: usize, v: &[i64; 6]| v[t] != 0 && (v[r] != 0 || v[w] != 0);
        if both(0, 1, 2, a) || both(3, 4, 5, a) || both(0, 1, 2, m) || both(3, 4, 5, m) {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the same time"
                    .into(),
            );
        }
        if a.iter()
            .chain(m.iter())
            .any(|&v| !(0..=THROTTLE_VALUE_MAX).contains(&v))
        {
            return Err(format!(
                "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
            ));
        }
        for i in 0..6 {
            if m[i] != 0 && a[i] == 0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if m[i] != 0 && m[i] < a[i] {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        if m.iter().any(|&v| v != 0) || self.other.iter().any(|(_, v)| *v != 0) {
            return Err(
                "bulkhead does not support bursts (*_max, *_max_length) or iops_size yet".into(),
            );
        }
        if self.group.is_some() {
            return Err("bulkhead does not support throttling groups yet".into());
        }
        let u = |i: usize| a[i] as u64;
        Ok(ThrottleLimits {
            bps: u(0),
            bps_rd: u(1),
            bps_wr: u(2),
            iops: u(3),
            iops_rd: u(4),
            iops_wr: u(5),
        })
    }
}

/// How a blockd ended, as its supervisor reports it.
#[derive(Debug)]
pub struct BlockdExit {
    /// The device (index into [`BlockConfig::devices`] when it started; `device_del` may have
    /// moved it since).
    pub device: usize,
    /// The device's id when it started.
    pub id: String,
    /// Which start of the machine it belonged to.
    pub generation: u64,
    /// Its pid.
    pub pid: u32,
    /// Its status, if it could be collected.
    pub status: Option<std::process::ExitStatus>,
    /// The log's description of the end.
    pub description: String,
    /// A seccomp violation it reported (believed after a SIGSYS death only).
    pub violation: Option<Violation>,
}

/// A blockd reported a failed request (`BlockEvent::IoError`), as its event task passes it on
/// to the VM actor.
#[derive(Debug, Clone)]
pub struct BlockdIoError {
    /// The blockd's pid (the device is looked up by it, as for exits).
    pub pid: u32,
    /// Which start of the machine it belonged to.
    pub generation: u64,
    /// A write, flush, discard or write-zeroes rather than a read.
    pub write: bool,
    /// What blockd did.
    pub action: ErrorAction,
    /// ENOSPC.
    pub nospace: bool,
    /// `strerror` of the error.
    pub reason: String,
}

/// A running blockd.
struct Blockd {
    rpc: RpcClient<BlockProtocol>,
    pid: u32,
    /// Dropping (or sending) kills it.
    _kill: oneshot::Sender<()>,
    sandbox: Option<SandboxReport>,
}

/// The machine's disks.
pub struct Disks {
    resolved: Resolved,
    images: Vec<Option<Image>>,
    formats: Vec<Driver>,
    sizes: Vec<u64>,
    /// Per node: a qcow2 format node's backing chain, outermost first.
    chains: Vec<Vec<Backing>>,
    /// Per node: a qcow2 format node's header facts.
    qcow2: Vec<Option<Qcow2Details>>,
    /// Per device: its I/O limits and their group name (`block_set_io_throttle`).
    throttles: Vec<(ThrottleLimits, String)>,
    workers: Vec<Option<Blockd>>,
    /// The fd sets, for images `blockdev-add` opens.
    fdsets: Option<Arc<FdSets>>,
    /// `block-set-write-threshold` per node name (until a write passes it).
    thresholds: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
    /// Where blockd's events become QMP events.
    bus: Option<Arc<crate::qmp::events::EventBus>>,
    /// Per `vhost-user-blk-pci`: its connection, until a machine worker takes it.
    vhost_user: Vec<Option<UnixStream>>,
    generation: u64,
    blockd_path: Option<PathBuf>,
    sandbox: SandboxConfig,
    exits_tx: mpsc::UnboundedSender<BlockdExit>,
    exits_rx: mpsc::UnboundedReceiver<BlockdExit>,
    /// Per device id: an I/O status other than `ok` (set by a `stop` action, cleared by `cont`).
    io_status: BTreeMap<String, IoStatus>,
    io_errors_tx: mpsc::UnboundedSender<BlockdIoError>,
    io_errors_rx: mpsc::UnboundedReceiver<BlockdIoError>,
}

impl std::fmt::Debug for Disks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Disks({} devices)", self.resolved.config.devices.len())
    }
}

/// The newest fd-set or path open with `O_DIRECT` when asked (and, for a writable direct
/// image, a buffered reopen first).
fn open_image(
    fdsets: &Arc<FdSets>,
    path: &str,
    read_only: bool,
    direct: bool,
) -> Result<Image, DisksError> {
    let err = |source| DisksError::Open {
        path: path.to_string(),
        source,
    };
    let spec = OpenSpec {
        access: if read_only {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        },
        create: false,
        truncate: false,
    };
    let (file, lease) = fdsets
        .open(Path::new(path), spec)
        .map_err(|e| err(std::io::Error::other(e.to_string())))?
        .into_parts();
    let tail = if direct && !read_only {
        // A new open file description: O_DIRECT below must not reach it.
        Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags_cloexec()
                .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map_err(err)?,
        )
    } else {
        None
    };
    if direct {
        set_direct(&file).map_err(|e| DisksError::Image {
            path: path.to_string(),
            reason: format!("cache=none needs O_DIRECT, which this file does not allow: {e}"),
        })?;
    }
    Ok(Image {
        file,
        tail,
        _lease: lease,
        read_only,
        direct,
    })
}

trait CloexecOpen {
    fn custom_flags_cloexec(&mut self) -> &mut Self;
}

impl CloexecOpen for std::fs::OpenOptions {
    fn custom_flags_cloexec(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_CLOEXEC)
    }
}

fn read_at(f: &File, buf: &mut [u8], at: u64) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    // O_DIRECT needs aligned buffers and lengths: read through the buffered tail or a reopen
    // instead. Callers pass a file without O_DIRECT.
    f.read_at(buf, at)
}

/// The file's size (regular file, or a block device by seeking to its end).
fn file_size(f: &File) -> std::io::Result<u64> {
    let md = f.metadata()?;
    if md.file_type().is_file() {
        return Ok(md.len());
    }
    use std::io::Seek;
    let mut g = f.try_clone()?;
    g.seek(std::io::SeekFrom::End(0))
}

impl Disks {
    /// No disks (`-M none` without block options, unit tests).
    pub fn empty() -> Disks {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        let (io_errors_tx, io_errors_rx) = mpsc::unbounded_channel();
        Disks {
            resolved: Resolved::default(),
            images: Vec::new(),
            formats: Vec::new(),
            sizes: Vec::new(),
            chains: Vec::new(),
            qcow2: Vec::new(),
            throttles: Vec::new(),
            workers: Vec::new(),
            vhost_user: Vec::new(),
            fdsets: None,
            thresholds: Arc::default(),
            bus: None,
            generation: 0,
            blockd_path: None,
            sandbox: SandboxConfig::default(),
            exits_tx,
            exits_rx,
            io_status: BTreeMap::new(),
            io_errors_tx,
            io_errors_rx,
        }
    }

    /// Opens every image of `resolved` (at start-up, before the monitor confines itself).
    /// `blockd_path` is the worker binary (needed only when there are devices).
    pub fn open(
        resolved: &Resolved,
        fdsets: &Arc<FdSets>,
        blockd_path: Option<PathBuf>,
        sandbox: SandboxConfig,
    ) -> Result<Disks, DisksError> {
        let mut d = Disks::empty();
        d.resolved = resolved.clone();
        d.blockd_path = blockd_path;
        d.sandbox = sandbox;
        d.fdsets = Some(fdsets.clone());
        d.open_nodes(0, fdsets)?;
        let cfg = &resolved.config;
        if !cfg.devices.is_empty() && d.blockd_path.is_none() {
            return Err(DisksError::Image {
                path: String::new(),
                reason: "no bulkhead-blockd to serve the disks".into(),
            });
        }
        d.workers = cfg.devices.iter().map(|_| None).collect();
        // vhost-user-blk-pci: connected now (QEMU's client chardevs connect when created).
        for v in &cfg.vhost_user {
            d.vhost_user
                .push(Some(connect_chardev(&cfg.chardevs[v.chardev])?));
        }
        // -drive throttling.*: the device starts with them (the group is the drive's name).
        d.throttles = cfg
            .devices
            .iter()
            .map(|dev| {
                let b = &cfg.backends[dev.backend];
                (b.throttle, b.name.clone())
            })
            .collect();
        Ok(d)
    }

    /// Opens nodes `from..` of the configuration (all at start-up, the new ones after
    /// `blockdev-add`): images, formats, sizes, backing chains and their node names.
    fn open_nodes(&mut self, from: usize, fdsets: &Arc<FdSets>) -> Result<(), DisksError> {
        let resolved = self.resolved.clone();
        let cfg = &resolved.config;
        let d = self;
        for n in &cfg.nodes[from..] {
            if n.driver != Driver::File {
                d.images.push(None);
                continue;
            }
            // A format node on top lends its read-only and cache.direct settings.
            let parent = cfg
                .nodes
                .iter()
                .find(|p| p.file.as_deref() == Some(n.name.as_str()));
            let read_only =
                n.read_only || parent.is_some_and(|p| p.read_only && !writable_elsewhere(cfg, n));
            let direct = n.direct.or(parent.and_then(|p| p.direct)).unwrap_or(false);
            let path = n.filename.clone().unwrap_or_default();
            d.images
                .push(Some(open_image(fdsets, &path, read_only, direct)?));
        }
        // Formats (probed where not given) and virtual sizes.
        for (i, n) in cfg.nodes.iter().enumerate().skip(from) {
            let mut chain_here = Vec::new();
            let mut details_here = None;
            let (driver, size) = match n.driver {
                Driver::File => {
                    let img = d.images[i].as_ref();
                    let size = match img {
                        Some(img) => file_size(&img.file).map_err(|source| DisksError::Open {
                            path: n.filename.clone().unwrap_or_default(),
                            source,
                        })?,
                        None => 0,
                    };
                    (Driver::File, size)
                }
                Driver::Format(f) => {
                    let Some(fi) = cfg
                        .nodes
                        .iter()
                        .position(|c| Some(&c.name) == n.file.as_ref())
                    else {
                        continue;
                    };
                    let path = cfg.nodes[fi].filename.clone().unwrap_or_default();
                    let Some(img) = d.images[fi].as_ref() else {
                        continue;
                    };
                    let probe_file = img.tail.as_ref().unwrap_or(&img.file);
                    let mut head = vec![0u8; HEADER_READ];
                    // Under O_DIRECT without a tail (read-only): reopen buffered to read.
                    let reopened;
                    let src = if img.direct && img.tail.is_none() {
                        reopened =
                            crate::chardev::reopen_readonly(&img.file).map_err(|source| {
                                DisksError::Open {
                                    path: path.clone(),
                                    source,
                                }
                            })?;
                        &reopened
                    } else {
                        probe_file
                    };
                    let got = read_at(src, &mut head, 0).unwrap_or(0);
                    let is_qcow2 = got >= 4 && head[..4] == QCOW2_MAGIC;
                    let f = if resolved.probe.contains(&n.name) {
                        let guessed = if is_qcow2 {
                            ImageFormat::Qcow2
                        } else {
                            ImageFormat::Raw
                        };
                        log::warn!(
                            "Image format was not specified for '{path}' and probing guessed {}. \
                             Specify the format explicitly (format={}) to remove this warning.",
                            guessed.name(),
                            guessed.name()
                        );
                        guessed
                    } else {
                        f
                    };
                    let size = match f {
                        ImageFormat::Raw => {
                            file_size(&img.file).map_err(|source| DisksError::Open {
                                path: path.clone(),
                                source,
                            })?
                        }
                        ImageFormat::Qcow2 => {
                            if !is_qcow2 || got < 32 {
                                return Err(DisksError::Image {
                                    path,
                                    reason: "Image is not in qcow2 format".into(),
                                });
                            }
                            let info =
                                qcow2_info(&head[..got]).map_err(|reason| DisksError::Image {
                                    path: path.clone(),
                                    reason,
                                })?;
                            if let Some(b) = &info.backing {
                                let md =
                                    img.file.metadata().map_err(|source| DisksError::Open {
                                        path: path.clone(),
                                        source,
                                    })?;
                                let chain = open_chain(&path, b, img.direct, (md.dev(), md.ino()))?;
                                chain_here = chain;
                            }
                            details_here = Some(info.details);
                            info.size
                        }
                    };
                    (Driver::Format(f), size)
                }
            };
            d.formats.push(driver);
            d.sizes.push(size);
            d.chains.push(chain_here);
            d.qcow2.push(details_here);
        }
        // The backing files' nodes get names as QEMU gives unnamed nodes (`#blockNNN`), unused
        // by the configured ones.
        let mut taken: std::collections::BTreeSet<String> =
            cfg.nodes.iter().map(|n| n.name.clone()).collect();
        taken.extend(d.chain_names());
        let mut counter = 0u32;
        let mut fresh = || loop {
            let name = format!(
                "#block{:03}",
                (counter * 2 + 1) % 1000 + (counter / 500) * 1000
            );
            counter += 1;
            if taken.insert(name.clone()) {
                return name;
            }
        };
        for chain in &mut d.chains[from..] {
            for b in chain.iter_mut() {
                let f = fresh();
                b.nodes = (f, fresh());
            }
        }
        Ok(())
    }

    /// The resolved configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.resolved.config
    }

    /// Whether there are devices (blockd workers).
    pub fn has_devices(&self) -> bool {
        !self.resolved.config.devices.is_empty()
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.resolved
            .config
            .nodes
            .iter()
            .position(|n| n.name == name)
    }

    /// The index of the protocol node under node `i`.
    fn file_index(&self, i: usize) -> Option<usize> {
        let n = &self.resolved.config.nodes[i];
        match n.driver {
            Driver::File => Some(i),
            Driver::Format(_) => self.node_index(n.file.as_deref()?),
        }
    }

    /// Starts one blockd per device for a machine of `mem_bytes` of RAM and `vcpus` vCPUs, and
    /// returns the devices for `VmSetup` with the front-end socket of each. A blockd left from a
    /// previous machine is killed first.
    pub async fn start(
        &mut self,
        mem_bytes: u64,
        vcpus: u32,
    ) -> Result<Vec<(VirtioDevice, OwnedFd)>, DisksError> {
        self.stop_all();
        self.generation += 1;
        let mut out = Vec::new();
        for dev in 0..self.resolved.config.devices.len() {
            out.push(self.start_one(dev, mem_bytes, vcpus).await?);
        }
        let cfg = &self.resolved.config;
        for (i, v) in cfg.vhost_user.iter().enumerate() {
            // The start-up connection for the first machine worker, a new one for each later
            // worker (the server serves one front end at a time and takes the next).
            let sock = match self.vhost_user.get_mut(i).and_then(Option::take) {
                Some(s) => s,
                // A confined monitor makes no sockets (its seccomp allowlist has no `socket`
                // or `connect`).
                None if self.sandbox.mode != bulkhead_sandbox::Mode::Off => {
                    let c = &cfg.chardevs[v.chardev];
                    return Err(DisksError::Image {
                        path: c.path.clone(),
                        reason: format!(
                            "the connection of chardev '{}' went to an earlier machine worker, \
                             and a confined monitor cannot connect again (--sandbox off can)",
                            c.id
                        ),
                    });
                }
                None => connect_chardev(&cfg.chardevs[v.chardev])?,
            };
            let num_queues = v
                .num_queues
                .unwrap_or_else(|| u16::try_from(vcpus).unwrap_or(u16::MAX).clamp(1, 16));
            let device = VirtioDevice {
                id: cfg.vhost_user_id(i),
                kind: VirtioKind::Block,
                slot: v.slot.unwrap_or(0),
                num_queues,
                queue_size: v.queue_size,
            };
            out.push((device, OwnedFd::from(sock)));
        }
        Ok(out)
    }

    async fn start_one(
        &mut self,
        dev: usize,
        mem_bytes: u64,
        vcpus: u32,
    ) -> Result<(VirtioDevice, OwnedFd), DisksError> {
        let cfg = &self.resolved.config;
        let d = &cfg.devices[dev];
        let id = cfg.device_id(dev);
        let top = self
            .node_index(&cfg.backends[d.backend].node)
            .ok_or_else(|| DisksError::Image {
                path: String::new(),
                reason: format!("device {id} has no node"),
            })?;
        let fi = self.file_index(top).ok_or_else(|| DisksError::Image {
            path: String::new(),
            reason: format!("device {id} has no image"),
        })?;
        let Some(img) = self.images[fi].as_ref() else {
            return Err(DisksError::Image {
                path: String::new(),
                reason: format!("device {id} has no open image"),
            });
        };
        let num_queues = d
            .num_queues
            .unwrap_or_else(|| u16::try_from(vcpus).unwrap_or(u16::MAX).clamp(1, 16));
        let format = match self.formats[top] {
            Driver::Format(f) => f,
            Driver::File => ImageFormat::Raw,
        };
        let read_only = img.read_only || cfg.nodes[top].read_only;
        let chain = &self.chains[top];
        let (rerror, werror) = cfg.error_policies(dev);
        let setup = BlockSetup {
            id: id.clone(),
            format,
            readonly: read_only,
            direct: img.direct,
            buffered_tail: img.tail.is_some(),
            serial: d.serial.clone().unwrap_or_default(),
            num_queues,
            backing_files: u32::try_from(chain.len()).unwrap_or(u32::MAX),
            rerror,
            werror,
        };
        let device = VirtioDevice {
            id: id.clone(),
            kind: VirtioKind::Block,
            slot: d.slot.unwrap_or(0),
            num_queues,
            queue_size: d.queue_size,
        };
        let (front, back) = UnixStream::pair().map_err(|e| DisksError::Socket(id.clone(), e))?;
        let (mine, theirs) = bulkhead_ipc::channel::seqpacket_pair()
            .map_err(|e| DisksError::Socket(id.clone(), std::io::Error::other(e.to_string())))?;
        let path = self.blockd_path.clone().unwrap_or_default();
        let params = bulkhead_sandbox::Params {
            // Old and new memory tables may be mapped at once.
            mem_bytes: mem_bytes.saturating_mul(2),
            vcpus: 1,
            queues: u32::from(num_queues),
        };
        let mut child = worker::spawn_role(
            bulkhead_sandbox::Role::Blockd,
            &path,
            theirs,
            &self.sandbox,
            params,
        )?;
        let pid = child.id();
        log::info!("started {} (pid {pid}) for {id}", path.display());
        let fail = |reason: String| DisksError::Start {
            device: id.clone(),
            pid,
            reason,
        };
        let chan = AsyncChannel::<BlockProtocol>::from_fd(mine).map_err(|e| fail(e.to_string()))?;
        match tokio::time::timeout(
            START_TIMEOUT,
            chan.handshake(IpcRole::Monitor, IpcRole::Block),
        )
        .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let _ = tokio::time::timeout(Duration::from_millis(500), child.wait()).await;
                let how = match child.try_wait() {
                    Ok(Some(s)) => child.describe(s),
                    _ => e.to_string(),
                };
                return Err(fail(format!("handshake: {how}")));
            }
            Err(_) => return Err(fail("no handshake within 10 s".into())),
        }
        let (rpc, mut events) = RpcClient::new(chan);
        let mut fds: Vec<BorrowedFd<'_>> = vec![img.file.as_fd(), back.as_fd()];
        fds.extend(img.tail.as_ref().map(AsFd::as_fd));
        fds.extend(chain.iter().map(|b| b.file.as_fd()));
        let r =
            tokio::time::timeout(START_TIMEOUT, rpc.call(BlockRequest::Setup(setup), &fds)).await;
        drop(fds);
        drop(back);
        let size = match r {
            Ok(Ok((BlockReply::Ready { size }, _))) => size,
            Ok(Ok((BlockReply::Error(e), _))) => return Err(fail(e)),
            Ok(Ok((other, _))) => return Err(fail(format!("unexpected reply {other:?}"))),
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => return Err(fail("no setup reply within 10 s".into())),
        };
        self.sizes[top] = size;
        // Limits set for this device survive a new machine worker (and its new blockd).
        let limits = self.throttles.get(dev).map(|t| t.0).unwrap_or_default();
        if limits.enabled() {
            match call(&rpc, BlockRequest::SetThrottle(limits)).await {
                Ok(BlockReply::Ok) => {}
                Ok(other) => return Err(fail(format!("unexpected reply {other:?}"))),
                Err(e) => return Err(fail(e)),
            }
        }
        // A write threshold set for this disk's node(s) before this blockd started.
        let watched = self.watched_nodes(dev);
        let pending = watched
            .iter()
            .map(|n| self.threshold_of(n))
            .find(|&t| t != 0);
        if let Some(t) = pending {
            match call(&rpc, BlockRequest::SetWriteThreshold(t)).await {
                Ok(BlockReply::Ok) => {}
                Ok(other) => return Err(fail(format!("unexpected reply {other:?}"))),
                Err(e) => return Err(fail(e)),
            }
        }
        // blockd's events: a passed write threshold becomes BLOCK_WRITE_THRESHOLD; an I/O
        // error goes to the VM actor (BLOCK_IO_ERROR, and the stop action's pause); the rest
        // is logged (its exit is what matters, seen by the supervisor).
        {
            let id = id.clone();
            let thresholds = self.thresholds.clone();
            let bus = self.bus.clone();
            let io_errors = self.io_errors_tx.clone();
            let generation = self.generation;
            tokio::spawn(async move {
                while let Some(Ok((ev, _))) = events.recv().await {
                    match ev {
                        BlockEvent::WriteThreshold { end, threshold } => {
                            let node = {
                                let mut t = thresholds.lock().unwrap_or_else(|p| p.into_inner());
                                let n = watched
                                    .iter()
                                    .find(|n| t.get(*n) == Some(&threshold))
                                    .cloned();
                                if let Some(n) = &n {
                                    t.remove(n);
                                }
                                n
                            };
                            if let (Some(node), Some(bus)) = (node, &bus) {
                                bus.emit(&crate::qmp::events::Event::BlockWriteThreshold {
                                    node,
                                    amount_exceeded: end.saturating_sub(threshold),
                                    threshold,
                                });
                            }
                        }
                        BlockEvent::IoError {
                            write,
                            action,
                            nospace,
                            reason,
                        } => {
                            let _ = io_errors.send(BlockdIoError {
                                pid,
                                generation,
                                write,
                                action,
                                nospace,
                                reason,
                            });
                        }
                        other => log::debug!("bulkhead-blockd for {id}: {other:?}"),
                    }
                }
            });
        }
        let (kill_tx, kill_rx) = oneshot::channel();
        let exits = self.exits_tx.clone();
        let generation = self.generation;
        tokio::spawn(supervise(
            child,
            kill_rx,
            exits,
            (dev, id.clone()),
            generation,
            pid,
        ));
        self.workers[dev] = Some(Blockd {
            rpc,
            pid,
            _kill: kill_tx,
            sandbox: None,
        });
        Ok((device, front.into()))
    }

    /// Kills every running blockd (their supervisors reap them).
    pub fn stop_all(&mut self) {
        for w in &mut self.workers {
            *w = None;
        }
    }

    /// Asks every blockd to quit (the monitor is exiting).
    pub async fn quit_all(&mut self) {
        for w in self.workers.iter_mut() {
            if let Some(b) = w.take() {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    b.rpc.call(BlockRequest::Quit, &[]),
                )
                .await;
            }
        }
    }

    /// The next blockd exit (pending forever when none comes).
    pub async fn next_exit(&mut self) -> BlockdExit {
        match self.exits_rx.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Handles a blockd exit: forgets the worker if it is the current one; returns whether the
    /// exit is an unexpected death to report.
    pub fn on_exit(&mut self, e: &BlockdExit) -> bool {
        if e.generation != self.generation {
            return false;
        }
        // By pid: device_del may have moved the device since its blockd started.
        let current = self
            .workers
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| w.pid == e.pid));
        if let Some(i) = current {
            self.workers[i] = None;
        }
        let current = current.is_some();
        current && !e.status.is_some_and(|s| s.success())
    }

    /// The next I/O error a blockd reported, or the next blockd exit (pending forever when
    /// none comes). One call for both so the VM actor's `select!` borrows the disks once.
    pub async fn next_news(&mut self) -> Result<BlockdIoError, BlockdExit> {
        // Both senders live in `self`, so neither channel closes: `recv` yields `Some`.
        tokio::select! {
            Some(e) = self.io_errors_rx.recv() => Ok(e),
            Some(e) = self.exits_rx.recv() => Err(e),
            else => std::future::pending().await,
        }
    }

    /// Takes note of an I/O error: the device is found by the blockd's pid, its I/O status
    /// set as QEMU sets it for the action, and the `BLOCK_IO_ERROR` to send returned. `None`
    /// when the blockd is no longer the device's (it died, or the machine was rebuilt, before
    /// its event was read): nothing it held can be resumed any more.
    pub fn on_io_error(&mut self, e: BlockdIoError) -> Option<BlockIoError> {
        if e.generation != self.generation {
            return None;
        }
        let dev = self
            .workers
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| w.pid == e.pid))?;
        let cfg = &self.resolved.config;
        let backend = &cfg.backends[cfg.devices[dev].backend];
        let status = self.io_status.entry(cfg.device_id(dev)).or_default();
        *status = status.after_error(e.action, e.nospace);
        Some(BlockIoError {
            device: backend.name.clone(),
            node_name: Some(backend.node.clone()),
            write: e.write,
            action: e.action,
            nospace: e.nospace,
            reason: e.reason,
        })
    }

    /// `cont`: every backend's I/O status back to `ok`.
    pub fn reset_io_status(&mut self) {
        self.io_status.clear();
    }

    /// `cont`: every running blockd retries the requests it holds after a `stop` action and
    /// serves its queues again. A blockd that does not answer is logged and passed over: one
    /// that died took its held requests with it (its exit is reported on its own), and the
    /// other disks must not stay stopped for it.
    pub async fn resume_all(&mut self) {
        for (dev, w) in self.workers.iter().enumerate() {
            let Some(w) = w else { continue };
            match call(&w.rpc, BlockRequest::Resume).await {
                Ok(BlockReply::Ok) => {}
                Ok(other) => log::warn!(
                    "bulkhead-blockd for {} (pid {}) answered Resume with {other:?}",
                    self.resolved.config.device_id(dev),
                    w.pid
                ),
                Err(e) => log::warn!(
                    "bulkhead-blockd for {} (pid {}): Resume: {e}",
                    self.resolved.config.device_id(dev),
                    w.pid
                ),
            }
        }
    }

    /// The device (index) a blockd pid serves, and its id.
    pub fn device_id(&self, device: usize) -> String {
        self.resolved.config.device_id(device)
    }

    /// The running blockds: (device index, pid).
    pub fn running(&self) -> Vec<(usize, u32)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().map(|w| (i, w.pid)))
            .collect()
    }

    /// A blockd's sandbox report (asked once, then kept).
    pub async fn sandbox_report(&mut self, device: usize) -> Result<SandboxReport, String> {
        let Some(w) = self.workers.get_mut(device).and_then(Option::as_mut) else {
            return Err("not running".into());
        };
        if let Some(r) = &w.sandbox {
            return Ok(r.clone());
        }
        match call(&w.rpc, BlockRequest::QuerySandbox).await? {
            BlockReply::Sandbox(r) => {
                w.sandbox = Some(r.clone());
                Ok(r)
            }
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    /// A snapshot for the queries, with blockd's counters.
    pub async fn view(&mut self) -> BlockView {
        let mut stats = Vec::new();
        for w in &self.workers {
            let s = match w {
                Some(w) => match call(&w.rpc, BlockRequest::QueryStats).await {
                    Ok(BlockReply::Stats(s)) => Some(s),
                    Ok(other) => {
                        log::warn!("bulkhead-blockd (pid {}): stats: {other:?}", w.pid);
                        None
                    }
                    Err(e) => {
                        log::warn!("bulkhead-blockd (pid {}): stats: {e}", w.pid);
                        None
                    }
                },
                None => None,
            };
            stats.push(s);
        }
        let cfg = &self.resolved.config;
        let actual = |f: &File| f.metadata().map_or(0, |m| m.blocks() * 512);
        let mut nodes = Vec::new();
        for (i, n) in cfg.nodes.iter().enumerate() {
            let fi = self.file_index(i);
            let img = fi.and_then(|f| self.images[f].as_ref());
            let filename = fi
                .and_then(|f| cfg.nodes[f].filename.clone())
                .unwrap_or_default();
            let direct = img.is_some_and(|im| im.direct);
            let chain = self.chains.get(i).map(Vec::as_slice).unwrap_or_default();
            let first = chain.first();
            nodes.push(NodeView {
                spec: n.clone(),
                driver: self.formats.get(i).copied().unwrap_or(n.driver),
                filename,
                virtual_size: self.sizes.get(i).copied().unwrap_or(0),
                actual_size: img.map_or(0, |im| actual(&im.file)),
                direct,
                no_flush: n.no_flush,
                // As QEMU reports it: the node's own setting (a file node under a read-only
                // format node stays `ro: false`, though opened read-only).
                read_only: n.read_only,
                backing_file: first.map(|b| b.name.clone()),
                full_backing_filename: first.map(|b| b.path.clone()),
                backing_format: first.map(|b| b.format.name()),
                backing: first.map(|b| b.nodes.1.clone()),
                backing_depth: chain.len(),
                qcow2: self.qcow2.get(i).copied().flatten(),
                write_threshold: self.threshold_of(&n.name),
            });
            // The backing chain's nodes come right after the image's, as QEMU creates them.
            for (j, b) in chain.iter().enumerate() {
                let below = chain.get(j + 1);
                let file_len = b.file.metadata().map_or(0, |m| m.len());
                let spec = |name: &str, driver: Driver, file: Option<String>| NodeSpec {
                    name: name.to_string(),
                    driver,
                    filename: (driver == Driver::File).then(|| b.path.clone()),
                    file,
                    read_only: true,
                    direct: Some(direct),
                    no_flush: false,
                    owned: false,
                };
                let base = NodeView {
                    spec: spec(&b.nodes.0, Driver::File, None),
                    driver: Driver::File,
                    filename: b.path.clone(),
                    virtual_size: file_len,
                    actual_size: actual(&b.file),
                    direct,
                    no_flush: false,
                    read_only: true,
                    backing_file: None,
                    full_backing_filename: None,
                    backing_format: None,
                    backing: None,
                    backing_depth: 0,
                    qcow2: None,
                    write_threshold: 0,
                };
                nodes.push(base.clone());
                nodes.push(NodeView {
                    spec: spec(
                        &b.nodes.1,
                        Driver::Format(b.format),
                        Some(b.nodes.0.clone()),
                    ),
                    driver: Driver::Format(b.format),
                    virtual_size: b.size,
                    backing_file: below.map(|c| c.name.clone()),
                    full_backing_filename: below.map(|c| c.path.clone()),
                    backing_format: below.map(|c| c.format.name()),
                    backing: below.map(|c| c.nodes.1.clone()),
                    backing_depth: chain.len() - j - 1,
                    qcow2: b.qcow2,
                    ..base
                });
            }
        }
        BlockView {
            io_status: (0..cfg.devices.len())
                .map(|d| {
                    self.io_status
                        .get(&cfg.device_id(d))
                        .copied()
                        .unwrap_or_default()
                })
                .collect(),
            throttles: self.throttles.clone(),
            config: cfg.clone(),
            nodes,
            stats,
        }
    }

    /// `block_resize` of the node `node` (a device's root node): blockd resizes the image.
    /// Returns the device id to tell the front end about.
    pub async fn resize(&mut self, node: usize, size: u64) -> Result<String, String> {
        let cfg = &self.resolved.config;
        let n = &cfg.nodes[node];
        let fi = self.file_index(node);
        let ro = n.read_only
            || fi
                .and_then(|f| self.images[f].as_ref())
                .is_some_and(|i| i.read_only);
        if ro {
            return Err("Image is read-only".into());
        }
        // The device whose backend sits on this node (or on the format node above a file node).
        let dev = cfg.devices.iter().position(|d| {
            let top = &cfg.backends[d.backend].node;
            *top == n.name
                || cfg
                    .node(top)
                    .is_some_and(|t| t.file.as_deref() == Some(n.name.as_str()))
        });
        let Some(dev) = dev else {
            return Err(format!(
                "bulkhead resizes an image through the bulkhead-blockd of its device; \
                 node '{}' is not attached to one",
                n.name
            ));
        };
        let Some(w) = self.workers[dev].as_ref() else {
            return Err(format!(
                "the bulkhead-blockd of {} is not running",
                self.device_id(dev)
            ));
        };
        match call(&w.rpc, BlockRequest::Resize { size }).await? {
            BlockReply::Ok => {}
            BlockReply::Error(e) => return Err(e),
            other => return Err(format!("unexpected reply {other:?}")),
        }
        // Every node over the same image has the new size (raw passes it through).
        let fi = fi.unwrap_or(node);
        for i in 0..self.sizes.len() {
            if self.file_index(i) == Some(fi) {
                self.sizes[i] = size;
            }
        }
        Ok(self.device_id(dev))
    }

    /// The device `block_set_io_throttle` names by `device` (a backend name) or `id` (a
    /// device id), with QEMU's errors; `Ok(None)`: a backend without a device.
    pub fn throttle_target(
        &self,
        device: Option<&str>,
        id: Option<&str>,
    ) -> Result<Option<usize>, crate::qmp::protocol::QmpError> {
        use crate::qmp::protocol::{ErrorClass, QmpError};
        let cfg = &self.resolved.config;
        let not_found = |name: &str| QmpError {
            class: ErrorClass::DeviceNotFound,
            desc: format!("Device '{name}' not found"),
        };
        match (device, id) {
            (Some(d), None) => {
                let b = cfg
                    .backends
                    .iter()
                    .position(|b| !b.name.is_empty() && b.name == d)
                    .ok_or_else(|| not_found(d))?;
                Ok(cfg.devices.iter().position(|x| x.backend == b))
            }
            // As QEMU: `id` names the device that has the block backend, the virtio-blk device
            // inside the PCI proxy (`/machine/peripheral/ID/virtio-backend`); the proxy's own
            // id has none.
            (None, Some(i)) => {
                if let Some(dev) = (0..cfg.devices.len()).find(|&x| cfg.qdev(x) == i) {
                    return Ok(Some(dev));
                }
                // A vhost-user-blk-pci (or its virtio backend) has no block backend in QEMU.
                let vhost_user = (0..cfg.vhost_user.len()).any(|x| {
                    let id = cfg.vhost_user_id(x);
                    id == i || format!("/machine/peripheral/{id}/virtio-backend") == i
                });
                if vhost_user || cfg.devices.iter().any(|x| x.id.as_deref() == Some(i)) {
                    return Err(QmpError::generic(
                        "Device does not have a block device backend",
                    ));
                }
                Err(not_found(i))
            }
            _ => Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
        }
    }

    /// Sets device `dev`'s I/O limits (blockd enforces them; kept for the next blockd).
    pub async fn set_throttle(
        &mut self,
        dev: usize,
        limits: ThrottleLimits,
        group: String,
    ) -> Result<(), String> {
        if let Some(w) = self.workers.get(dev).and_then(Option::as_ref) {
            match call(&w.rpc, BlockRequest::SetThrottle(limits)).await? {
                BlockReply::Ok => {}
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        if let Some(t) = self.throttles.get_mut(dev) {
            *t = (limits, group);
        }
        Ok(())
    }

    /// The node a `block_resize` names: `device` (a backend name) or `node-name`, with QEMU's
    /// error text.
    pub fn find_node(
        &self,
        device: Option<&str>,
        node_name: Option<&str>,
    ) -> Result<usize, String> {
        let cfg = &self.resolved.config;
        if let Some(dev) = device.filter(|d| !d.is_empty()) {
            if let Some(b) = cfg.backends.iter().find(|b| b.name == dev) {
                if let Some(i) = self.node_index(&b.node) {
                    return Ok(i);
                }
            }
        }
        if let Some(n) = node_name.filter(|n| !n.is_empty()) {
            if let Some(i) = self.node_index(n) {
                return Ok(i);
            }
        }
        Err(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or(""),
            node_name.unwrap_or("")
        ))
    }
}

/// A block operation QMP asks the VM actor for (it owns the disks and the machine worker).
#[derive(Debug)]
pub enum BlockOp {
    /// `blockdev-add` (its arguments).
    BlockdevAdd(serde_json::Value),
    /// `blockdev-del` / `x-blockdev-del` (the node name).
    BlockdevDel(String),
    /// `device_add` of a `virtio-blk-pci` (its properties as `key=value`, driver included).
    DeviceAdd(Vec<(String, String)>),
    /// `device_del` (the id); answers [`BlockAnswer::NotMine`] for an id no block device has.
    DeviceDel(String),
    /// `block-set-write-threshold` (node name, threshold).
    WriteThreshold(String, u64),
}

impl BlockOp {
    /// The `id` a `device_add` gives.
    pub fn new_device_id(&self) -> Option<&str> {
        match self {
            BlockOp::DeviceAdd(p) => p.iter().find(|(k, _)| k == "id").map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// How a [`BlockOp`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockAnswer {
    /// Done.
    Done,
    /// `device_del` of an id that is not a block device (the NICs may have it).
    NotMine,
}

/// What a [`BlockOp`] needs of the machine.
pub struct MachineCtx<'a> {
    /// The machine worker, if one runs.
    pub rpc: Option<&'a RpcClient<bulkhead_ipc::messages::VcpuProtocol>>,
    /// There is a guest (not `-M none`).
    pub guest: bool,
    /// The guest has run since the machine worker started: plugging is ACPI hot-plug, and
    /// `device_del` asks the guest to eject.
    pub ran: bool,
    /// Guest RAM size.
    pub mem_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// PCI slots the NICs use.
    pub nic_slots: Vec<u8>,
    /// The new device's id is a NIC's.
    pub id_is_nic: bool,
    /// Where `DEVICE_DELETED` goes.
    pub bus: &'a crate::qmp::events::EventBus,
    /// The unplugs waiting for the guest's eject.
    pub unplugs: &'a mut Unplugs,
}

/// QEMU's text for an image it could not open: `Could not open 'PATH': <strerror>`.
fn open_error(e: &DisksError) -> String {
    match e {
        DisksError::Open { path, source } => {
            let text = source.to_string();
            let text = match text.find(" (os error") {
                Some(i) => text[..i].to_string(),
                None => text,
            };
            format!("Could not open '{path}': {text}")
        }
        other => other.to_string(),
    }
}

use crate::hotplug::{self, Unplugs};
use crate::qmp::protocol::QmpError;

impl Disks {
    /// Where blockd's events go as QMP events.
    pub fn set_bus(&mut self, bus: Arc<crate::qmp::events::EventBus>) {
        self.bus = Some(bus);
    }

    fn threshold_of(&self, node: &str) -> u64 {
        self.thresholds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
            .unwrap_or(0)
    }

    /// The nodes whose offsets are the guest's offsets of device `dev`, where its blockd can
    /// watch writes: its root node, and the `file` node under a raw root.
    fn watched_nodes(&self, dev: usize) -> Vec<String> {
        let cfg = &self.resolved.config;
        let root = cfg.backends[cfg.devices[dev].backend].node.clone();
        let mut out = vec![root.clone()];
        if let Some(i) = self.node_index(&root) {
            if self.formats.get(i) == Some(&Driver::Format(ImageFormat::Raw)) {
                out.extend(cfg.nodes[i].file.clone());
            }
        }
        out
    }

    /// `block-set-write-threshold`: the device whose blockd sees the node's offsets watches
    /// the next write beyond `threshold` (0: stop watching).
    pub async fn set_write_threshold(&mut self, node: &str, threshold: u64) -> Result<(), String> {
        if self.node_index(node).is_none() {
            return Err(format!("Device '{node}' not found"));
        }
        let dev = (0..self.resolved.config.devices.len())
            .find(|&d| self.watched_nodes(d).iter().any(|n| n == node))
            .ok_or_else(|| {
                format!(
                    "bulkhead watches writes in the bulkhead-blockd of a device: node '{node}' \
                     is not a device's disk (or is the file under a qcow2 image)"
                )
            })?;
        if let Some(w) = self.workers.get(dev).and_then(Option::as_ref) {
            match call(&w.rpc, BlockRequest::SetWriteThreshold(threshold)).await? {
                BlockReply::Ok => {}
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        let mut t = self.thresholds.lock().unwrap_or_else(|p| p.into_inner());
        for n in self.watched_nodes(dev) {
            t.remove(&n);
        }
        if threshold != 0 {
            t.insert(node.to_string(), threshold);
        }
        Ok(())
    }

    /// The backing files' node names.
    fn chain_names(&self) -> Vec<String> {
        self.chains
            .iter()
            .flatten()
            .flat_map(|b| [b.nodes.0.clone(), b.nodes.1.clone()])
            .collect()
    }

    /// Runs a QMP block operation.
    pub async fn handle(
        &mut self,
        op: BlockOp,
        mut m: MachineCtx<'_>,
    ) -> Result<BlockAnswer, QmpError> {
        match op {
            BlockOp::BlockdevAdd(args) => self.blockdev_add(&args).map_err(QmpError::generic)?,
            BlockOp::BlockdevDel(name) => self.blockdev_del(&name).map_err(QmpError::generic)?,
            BlockOp::DeviceAdd(pairs) => self.device_add(&pairs, &m).await?,
            BlockOp::DeviceDel(id) => return self.device_del(&id, &mut m).await,
            BlockOp::WriteThreshold(node, t) => self
                .set_write_threshold(&node, t)
                .await
                .map_err(QmpError::generic)?,
        }
        Ok(BlockAnswer::Done)
    }

    /// `blockdev-add`: the node(s) join the graph and their image is opened now, by the
    /// monitor (a path, which a confined monitor may no longer open, or `/dev/fdset/N`).
    fn blockdev_add(&mut self, args: &serde_json::Value) -> Result<(), String> {
        let from = self.resolved.config.nodes.len();
        let mut cfg = self.resolved.config.clone();
        crate::block::add_blockdev(&mut cfg, args, &self.chain_names())?;
        let fdsets = self.fdsets.clone().ok_or("bulkhead has no fd sets here")?;
        let old = std::mem::replace(&mut self.resolved.config, cfg);
        if let Err(e) = self.open_nodes(from, &fdsets) {
            self.resolved.config = old;
            self.images.truncate(from);
            self.formats.truncate(from);
            self.sizes.truncate(from);
            self.chains.truncate(from);
            self.qcow2.truncate(from);
            return Err(open_error(&e));
        }
        log::info!(
            "blockdev-add: node {}",
            self.resolved.config.nodes[from..]
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(())
    }

    /// `blockdev-del`: a node `-blockdev` or `blockdev-add` made, used by nothing, goes (with
    /// its inline `file` child), and its image is closed.
    fn blockdev_del(&mut self, name: &str) -> Result<(), String> {
        let cfg = &self.resolved.config;
        let Some(i) = self.node_index(name) else {
            return Err(format!("Failed to find node with node-name='{name}'"));
        };
        // QEMU's checks, in its order.
        if cfg.backends.iter().any(|b| b.node == name) {
            return Err(format!("Node {name} is in use"));
        }
        if !cfg.nodes[i].owned {
            return Err(format!("Node {name} is not owned by the monitor"));
        }
        if cfg.nodes.iter().any(|p| p.file.as_deref() == Some(name)) {
            return Err(format!("Block device {name} is in use"));
        }
        let mut gone = vec![i];
        if let Some(child) = cfg.nodes[i].file.as_deref() {
            if let Some(c) = self.node_index(child) {
                if !cfg.nodes[c].owned {
                    gone.push(c);
                }
            }
        }
        gone.sort_unstable();
        for &g in gone.iter().rev() {
            self.resolved.config.nodes.remove(g);
            self.images.remove(g);
            self.formats.remove(g);
            self.sizes.remove(g);
            self.chains.remove(g);
            self.qcow2.remove(g);
        }
        log::info!("blockdev-del: node {name}");
        Ok(())
    }

    /// `device_add` of a `virtio-blk-pci`: its blockd starts and the machine worker plugs it
    /// (`AddDevice` with the front end's socket; ACPI hot-plug once the guest has run). Any
    /// failure takes back what was done: the blockd is killed and the configuration restored.
    async fn device_add(
        &mut self,
        pairs: &[(String, String)],
        m: &MachineCtx<'_>,
    ) -> Result<(), QmpError> {
        if !m.guest {
            return Err(QmpError::generic(
                "No 'PCI' bus found for device 'virtio-blk-pci'",
            ));
        }
        let mut cfg = self.resolved.config.clone();
        let ids: Vec<String> = if m.id_is_nic {
            pairs
                .iter()
                .filter(|(k, _)| k == "id")
                .map(|(_, v)| v.clone())
                .collect()
        } else {
            Vec::new()
        };
        let dev = crate::block::add_device(&mut cfg, pairs, &m.nic_slots, &ids)
            .map_err(QmpError::generic)?;
        if self.blockd_path.is_none() {
            return Err(QmpError::generic(
                "no bulkhead-blockd to serve the disk (none was found at start-up)",
            ));
        }
        let old = std::mem::replace(&mut self.resolved.config, cfg);
        let b = &self.resolved.config.backends[self.resolved.config.devices[dev].backend];
        self.throttles.push((b.throttle, b.name.clone()));
        self.workers.push(None);
        let rollback = |d: &mut Disks| {
            d.resolved.config = old;
            d.throttles.pop();
            d.workers.pop();
        };
        let Some(rpc) = m.rpc else {
            // No machine worker now: the device is plugged when the next one starts.
            return Ok(());
        };
        let (desc, sock) = match self.start_one(dev, m.mem_bytes, m.vcpus).await {
            Ok(v) => v,
            Err(e) => {
                rollback(self);
                return Err(QmpError::generic(e.to_string()));
            }
        };
        if let Err(e) = hotplug::plug(rpc, &desc, &sock).await {
            rollback(self);
            return Err(QmpError::generic(format!(
                "plugging virtio-blk-pci into the machine: {e}"
            )));
        }
        log::info!(
            "{}: virtio-blk-pci {} (slot {})",
            desc.id,
            if m.ran { "hot-plugged" } else { "added" },
            desc.slot
        );
        Ok(())
    }

    /// `device_del` of a `virtio-blk-pci` (by its `id`). Before the guest first runs (or with
    /// no machine worker) the device goes at once; after, the guest is asked to eject it and
    /// the command returns: [`Disks::finish_unplug`] removes it when the guest has.
    async fn device_del(
        &mut self,
        id: &str,
        m: &mut MachineCtx<'_>,
    ) -> Result<BlockAnswer, QmpError> {
        let cfg = &self.resolved.config;
        let Some(dev) = cfg.devices.iter().position(|d| d.id.as_deref() == Some(id)) else {
            if cfg.vhost_user.iter().any(|d| d.id.as_deref() == Some(id)) {
                return Err(QmpError::generic(format!(
                    "device_del {id}: bulkhead cannot remove a vhost-user-blk-pci device"
                )));
            }
            return Ok(BlockAnswer::NotMine);
        };
        let vcpu_id = cfg.device_id(dev);
        if m.unplugs.is_pending(&vcpu_id) {
            return Err(QmpError::generic(hotplug::already_unplugging(id)));
        }
        if let Some(rpc) = m.rpc {
            hotplug::unplug(rpc, &vcpu_id)
                .await
                .map_err(|e| QmpError::generic(format!("unplugging {id} from the machine: {e}")))?;
            if m.ran {
                m.unplugs.begin(&vcpu_id);
                log::info!("{id}: the guest is asked to eject the virtio-blk-pci");
                return Ok(BlockAnswer::Done);
            }
        }
        for ev in self.remove_now(dev).await {
            m.bus.emit(&ev);
        }
        Ok(BlockAnswer::Done)
    }

    /// The guest ejected the device the machine worker knows as `vcpu_id` (or a reset carried
    /// out its pending unplug): the device goes now. Returns its `DEVICE_DELETED` events, or
    /// `None` when no disk has that id.
    pub async fn finish_unplug(&mut self, vcpu_id: &str) -> Option<Vec<crate::qmp::events::Event>> {
        let cfg = &self.resolved.config;
        let dev = (0..cfg.devices.len()).find(|&d| cfg.device_id(d) == vcpu_id)?;
        Some(self.remove_now(dev).await)
    }

    /// Removes device `dev`: its blockd quits, its BlockBackend goes with it as in QEMU (a
    /// `-drive`'s with its nodes, an implicit one over a `-blockdev` node; the node stays), and
    /// the `DEVICE_DELETED` events to send are returned.
    async fn remove_now(&mut self, dev: usize) -> Vec<crate::qmp::events::Event> {
        let cfg = &self.resolved.config;
        let id = cfg.devices[dev].id.clone();
        let vcpu_id = cfg.device_id(dev);
        let qdev = cfg.qdev(dev);
        let path = qdev
            .strip_suffix("/virtio-backend")
            .unwrap_or(&qdev)
            .to_string();
        if let Some(w) = self.workers.remove(dev) {
            let _ =
                tokio::time::timeout(Duration::from_secs(2), w.rpc.call(BlockRequest::Quit, &[]))
                    .await;
        }
        self.throttles.remove(dev);
        self.io_status.remove(&vcpu_id);
        crate::block::remove_device(&mut self.resolved.config, dev);
        self.drop_orphan_nodes();
        log::info!("{path}: virtio-blk-pci removed");
        hotplug::deleted_events(id.as_deref(), &path)
    }

    /// Closes the nodes nothing uses any more that the monitor does not own (a `-drive`'s
    /// nodes after its BlockBackend went with its device).
    fn drop_orphan_nodes(&mut self) {
        loop {
            let cfg = &self.resolved.config;
            let orphan = cfg.nodes.iter().position(|n| {
                !n.owned
                    && !cfg.backends.iter().any(|b| b.node == n.name)
                    && !cfg
                        .nodes
                        .iter()
                        .any(|p| p.file.as_deref() == Some(n.name.as_str()))
            });
            let Some(i) = orphan else { break };
            log::info!("node {} closed", cfg.nodes[i].name);
            self.resolved.config.nodes.remove(i);
            self.images.remove(i);
            self.formats.remove(i);
            self.sizes.remove(i);
            self.chains.remove(i);
            self.qcow2.remove(i);
        }
    }
}

/// Connects to a client chardev's unix socket (close-on-exec, as std makes every socket).
fn connect_chardev(c: &crate::block::ChardevSpec) -> Result<UnixStream, DisksError> {
    UnixStream::connect(&c.path).map_err(|source| DisksError::Connect {
        chardev: c.id.clone(),
        path: c.path.clone(),
        source,
    })
}

/// A file node is opened read-write unless it and every format node on it are read-only.
fn writable_elsewhere(cfg: &BlockConfig, file: &NodeSpec) -> bool {
    cfg.nodes
        .iter()
        .any(|p| p.file.as_deref() == Some(file.name.as_str()) && !p.read_only)
}

async fn call(rpc: &RpcClient<BlockProtocol>, req: BlockRequest) -> Result<BlockReply, String> {
    match tokio::time::timeout(CALL_TIMEOUT, rpc.call(req, &[])).await {
        Ok(Ok((BlockReply::Error(e), _))) => Err(e),
        Ok(Ok((r, _))) => Ok(r),
        Ok(Err(e)) => Err(format!("bulkhead-blockd is gone: {e}")),
        Err(_) => Err("bulkhead-blockd did not answer".into()),
    }
}

/// Waits for one blockd's exit (or kills it when `kill` fires or is dropped) and reports it.
async fn supervise(
    mut child: worker::WorkerProcess,
    kill: oneshot::Receiver<()>,
    exits: mpsc::UnboundedSender<BlockdExit>,
    (device, id): (usize, String),
    generation: u64,
    pid: u32,
) {
    let status = tokio::select! {
        s = child.wait() => s,
        _ = kill => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let (description, violation, status) = match status {
        Ok(s) => {
            let (d, v) = child.describe_with_violation(s);
            (d, v, Some(s))
        }
        Err(e) => (format!("could not be waited for ({e})"), None, None),
    };
    let _ = exits.send(BlockdExit {
        device,
        id,
        generation,
        pid,
        status,
        description,
        violation,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{resolve, BlockArgs, BlockOpt};

    /// A scratch directory of this test process.
    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("bh-disks-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }

    /// A qcow2 v3 header (no tables: the monitor reads only the header) of `size` bytes.
    fn qcow2_header(size: u64) -> Vec<u8> {
        let mut q = vec![0u8; 4096];
        q[..4].copy_from_slice(&QCOW2_MAGIC);
        q[4..8].copy_from_slice(&3u32.to_be_bytes());
        q[20..24].copy_from_slice(&16u32.to_be_bytes());
        q[24..32].copy_from_slice(&size.to_be_bytes());
        q[100..104].copy_from_slice(&104u32.to_be_bytes());
        q
    }

    #[test]
    fn images_are_opened_probed_and_sized() {
        let raw = tmp("a.raw", &[1u8; 8192]);
        let qcow = tmp("b.qcow2", &qcow2_header(1 << 30));
        let args = |items: Vec<(BlockOpt, String)>| resolve(&BlockArgs { items }).expect("resolve");
        let fdsets = Arc::new(FdSets::default());
        let r = args(vec![
            (
                BlockOpt::Drive,
                format!("file={},if=none,id=a", raw.display()),
            ),
            (
                BlockOpt::Drive,
                format!("file={},if=none,id=b,readonly=on", qcow.display()),
            ),
        ]);
        let mut d = Disks::open(&r, &fdsets, None, SandboxConfig::default()).expect("open");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let v = rt.block_on(d.view());
        let top = |name: &str| {
            let b = v
                .config
                .backends
                .iter()
                .find(|b| b.name == name)
                .expect("b");
            v.nodes
                .iter()
                .find(|n| n.spec.name == b.node)
                .expect("node")
                .clone()
        };
        assert_eq!(top("a").driver, Driver::Format(ImageFormat::Raw));
        assert_eq!(top("a").virtual_size, 8192);
        assert_eq!(top("b").driver, Driver::Format(ImageFormat::Qcow2));
        assert_eq!(top("b").virtual_size, 1 << 30);
        assert!(top("b").read_only);
        assert!(top("a").filename.ends_with("a.raw"));
        assert_eq!(top("b").backing_depth, 0);

        // A backing file named without a recorded format is refused, not probed.
        let mut qb = qcow2_header(1 << 20);
        qb[8..16].copy_from_slice(&400u64.to_be_bytes());
        qb[16..20].copy_from_slice(&5u32.to_be_bytes());
        qb[400..405].copy_from_slice(b"a.raw");
        let backed = tmp("c.qcow2", &qb);
        let r = args(vec![(
            BlockOpt::Drive,
            format!("file={},format=qcow2,if=none", backed.display()),
        )]);
        let e = Disks::open(&r, &fdsets, None, SandboxConfig::default()).expect_err("no format");
        assert!(e.to_string().contains("records no backing format"), "{e}");
        // With the format recorded (extension 0xe2792aca) the chain is opened: a.raw, named
        // relative to the image.
        qb[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        qb[108..112].copy_from_slice(&3u32.to_be_bytes());
        qb[112..115].copy_from_slice(b"raw");
        std::fs::write(&backed, &qb).expect("write");
        let d = Disks::open(&r, &fdsets, None, SandboxConfig::default()).expect("chain");
        let i = d.node_index(&d.config().backends[0].node).expect("node");
        assert_eq!(d.chains[i].len(), 1);
        assert_eq!(d.chains[i][0].name, "a.raw");
        // A chain that comes back to itself is refused.
        let mut looped = qcow2_header(1 << 20);
        looped[8..16].copy_from_slice(&400u64.to_be_bytes());
        looped[16..20].copy_from_slice(&7u32.to_be_bytes());
        looped[400..407].copy_from_slice(b"d.qcow2");
        looped[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        looped[108..112].copy_from_slice(&5u32.to_be_bytes());
        looped[112..117].copy_from_slice(b"qcow2");
        let d_path = tmp("d.qcow2", &looped);
        let r = args(vec![(
            BlockOpt::Drive,
            format!("file={},format=qcow2,if=none", d_path.display()),
        )]);
        let e = Disks::open(&r, &fdsets, None, SandboxConfig::default()).expect_err("loop");
        assert!(e.to_string().contains("loop"), "{e}");
        // A missing file names its path.
        let r = args(vec![(
            BlockOpt::Drive,
            "file=/nonexistent/x,if=none".into(),
        )]);
        let e = Disks::open(&r, &fdsets, None, SandboxConfig::default()).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
        let _ = std::fs::remove_dir_all(dir());
    }

    #[test]
    fn qcow2_headers_are_parsed_within_bounds() {
        assert!(qcow2_info(b"QFI").is_err());
        assert!(qcow2_info(&[0u8; 512]).is_err());
        let mut h = qcow2_header(5 << 20);
        assert_eq!(
            qcow2_info(&h),
            Ok(Qcow2Info {
                size: 5 << 20,
                backing: None,
                details: Qcow2Details {
                    version: 3,
                    cluster_bits: 16,
                    incompatible: 0,
                    compatible: 0,
                    refcount_order: 0,
                    compression: 0,
                },
            })
        );
        // A backing name past the buffer, or too long, is an error, never a panic.
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..20].copy_from_slice(&5u32.to_be_bytes());
        assert!(qcow2_info(&h).is_err());
        h[8..16].copy_from_slice(&400u64.to_be_bytes());
        h[16..20].copy_from_slice(&5000u32.to_be_bytes());
        assert!(qcow2_info(&h).is_err());
        // An extension longer than the buffer.
        let mut e = qcow2_header(1);
        e[104..108].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        e[108..112].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(qcow2_info(&e).is_err());
    }
}
