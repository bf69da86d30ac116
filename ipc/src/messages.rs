//! The monitor↔worker protocols: what the monitor may ask of the machine worker (vcpu-proc), of
//! each block back end (blockd) and of each net back end (netd), and what they report back.

use serde::{Deserialize, Serialize};

use crate::{Protocol, Wire};

/// Marker type for the monitor↔`bulkhead-vcpu` protocol.
#[derive(Debug)]
pub struct VcpuProtocol;

impl Protocol for VcpuProtocol {
    type Request = VcpuRequest;
    type Reply = VcpuReply;
    type Event = VcpuEvent;
}

/// Everything vcpu-proc needs to build the machine. The fds travel with the
/// [`VcpuRequest::Setup`] frame in this order:
/// `[kvm, guest_memory, kernel, initrd (if has_initrd), serial_in (if serial_in),
/// serial_out (if serial_out), one vhost-user socket per entry of devices]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSetup {
    /// Guest RAM size in bytes; equals the size of the guest memory memfd.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// How the vCPUs are arranged; the product of its fields equals `vcpus`.
    pub topology: CpuTopology,
    /// Kernel command line.
    pub cmdline: String,
    /// An initrd fd follows the kernel fd.
    pub has_initrd: bool,
    /// A readable fd feeding the serial port's receive side follows.
    pub serial_in: bool,
    /// A writable fd taking the serial port's output follows.
    pub serial_out: bool,
    /// A guest reset request ends the VM (`-no-reboot`) instead of resetting it.
    pub no_reboot: bool,
    /// virtio-pci devices present at power-on, each served by a vhost-user back end whose
    /// connected socket follows the fixed fds, in this order.
    pub devices: Vec<VirtioDevice>,
}

impl VmSetup {
    /// Number of fds that accompany this setup.
    pub fn fd_count(&self) -> usize {
        3 + usize::from(self.has_initrd)
            + usize::from(self.serial_in)
            + usize::from(self.serial_out)
            + self.devices.len()
    }
}

/// What kind of virtio device a vhost-user back end serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioKind {
    /// virtio-blk (device id 2); the configuration space comes from the back end
    /// (`VHOST_USER_GET_CONFIG`).
    Block,
    /// virtio-net (device id 1); the front end owns the configuration space.
    Net {
        /// The MAC address the guest reads from the configuration space.
        mac: [u8; 6],
        /// The link is up at power-on.
        link_up: bool,
    },
}

/// One virtio-pci device of the machine, as the monitor describes it to vcpu-proc. Its
/// vhost-user back end (blockd, netd, or any standard back end) is at the other end of a
/// connected unix socket that travels with the message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDevice {
    /// The device's id (`-device ...,id=`), unique in the machine.
    pub id: String,
    /// Block or net.
    pub kind: VirtioKind,
    /// PCI slot on bus 0 (1..=31; slot 0 is the host bridge).
    pub slot: u8,
    /// Number of virtqueues the front end offers (capped by what the back end supports). For
    /// virtio-net: two per queue pair on the back end (more than one pair offers
    /// `VIRTIO_NET_F_MQ`); the control virtqueue the front end adds and serves itself.
    pub num_queues: u16,
    /// Largest queue size the guest may choose (a power of two, at most 32768).
    pub queue_size: u16,
}

/// CPU topology as `-smp` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTopology {
    /// Sockets.
    pub sockets: u32,
    /// Dies per socket.
    pub dies: u32,
    /// Cores per die.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl CpuTopology {
    /// `vcpus` cores on one socket, one thread each (what a bare `-smp N` means for Bulkhead).
    pub fn flat(vcpus: u32) -> Self {
        CpuTopology {
            sockets: 1,
            dies: 1,
            cores: vcpus,
            threads: 1,
        }
    }

    /// Number of vCPUs this topology holds, or `None` on overflow.
    pub fn cpus(&self) -> Option<u32> {
        self.sockets
            .checked_mul(self.dies)?
            .checked_mul(self.cores)?
            .checked_mul(self.threads)
    }
}

/// Requests from the monitor to vcpu-proc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuRequest {
    /// Build the VM (memory, irqchip, devices, vCPUs, loaded kernel) without running it.
    Setup(VmSetup),
    /// Start or resume the vCPUs.
    Run,
    /// Pause all vCPUs; replies once every vCPU is out of `KVM_RUN`.
    Pause,
    /// Reset the machine (as `system_reset`); it runs afterwards only if it was running.
    Reset,
    /// Report the state of each vCPU.
    QueryCpus,
    /// Report what the worker's sandbox `enter` did ([`SandboxReport`]): landlock's state is
    /// not visible in `/proc`, so only the worker can say.
    QuerySandbox,
    /// Stop the vCPUs and exit cleanly.
    Quit,
    /// Plug a virtio-pci device (its vhost-user socket travels with the request). Before the
    /// guest first runs this is plain cold-plug; afterwards the guest is told through ACPI
    /// PCI hot-plug (a GED event and a device check on the slot).
    AddDevice(VirtioDevice),
    /// Unplug the device with this id. Before the guest first runs it goes at once. Afterwards
    /// the guest is asked to eject it (ACPI eject request): the reply comes at once, and
    /// [`VcpuEvent::DeviceEjected`] follows when the guest has ejected it (a guest without ACPI
    /// hot-plug support never does, as with QEMU).
    RemoveDevice {
        /// The device id.
        id: String,
    },
    /// Press the ACPI power button (`system_powerdown`): a GED event the guest's ACPI button
    /// driver sees; what happens next is the guest's choice.
    PowerButton,
    /// The back end's configuration changed (e.g. `block_resize`): raise the device's
    /// configuration-change interrupt so the guest re-reads it.
    ConfigChanged {
        /// The device id.
        id: String,
    },
    /// Set a virtio-net device's link status bit and tell the guest (`set_link`).
    SetLink {
        /// The device id.
        id: String,
        /// Link up.
        up: bool,
    },
}

impl Wire for VcpuRequest {
    fn fd_count(&self) -> usize {
        match self {
            VcpuRequest::Setup(s) => s.fd_count(),
            VcpuRequest::AddDevice(_) => 1,
            _ => 0,
        }
    }
}

/// State of one vCPU, as `query-cpus-fast` and `query-cpus` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// vCPU index.
    pub index: u32,
    /// Host thread id of the vCPU thread.
    pub thread_id: i32,
    /// The vCPU last stopped in `hlt` (or is waiting for an interrupt).
    pub halted: bool,
    /// Instruction pointer (`rip`) when last sampled.
    pub pc: u64,
    /// Topology: socket, core and thread ids.
    pub socket_id: u32,
    /// Core within the socket.
    pub core_id: u32,
    /// Thread within the core.
    pub thread_in_core: u32,
}

/// Replies from vcpu-proc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuReply {
    /// Done.
    Ok,
    /// The request failed; the text says why.
    Error(String),
    /// Answer to [`VcpuRequest::QueryCpus`].
    Cpus(Vec<CpuInfo>),
    /// Answer to [`VcpuRequest::QuerySandbox`].
    Sandbox(SandboxReport),
}

/// What a worker's sandbox `enter` did, as the worker itself reports it (the monitor reads
/// everything else about a worker's confinement from `/proc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// Whether `enter` ran at all (it did not if the worker failed before, which it cannot
    /// survive, or for a stand-in worker that does not confine itself).
    pub entered: bool,
    /// `on`, `off` or `allow-weak`, as the worker was told.
    pub mode: String,
    /// The landlock ABI of the ruleset it applied (0: none).
    pub landlock_abi: i32,
    /// The kernel enforces every right of the ruleset (false: only those of its older ABI).
    pub landlock_full: bool,
    /// BPF instructions of the seccomp filters it installed, over all filters.
    pub seccomp_instructions: u64,
    /// What it could not apply (only under `allow-weak`).
    pub weak: Vec<String>,
    /// How long `enter` took, in microseconds.
    pub enter_micros: u64,
}

impl Wire for VcpuReply {}

/// Why the machine stopped for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownCause {
    /// The guest powered off (ACPI S5).
    GuestShutdown,
    /// The guest asked for a reset under `-no-reboot`.
    GuestReset,
    /// The guest triple-faulted under `-no-reboot`.
    GuestTripleFault,
}

/// Unsolicited events from vcpu-proc.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VcpuEvent {
    /// The machine stopped for good; the worker exits after sending this.
    Shutdown(ShutdownCause),
    /// The guest reset itself (reboot, i8042 or ACPI reset, triple fault) and runs again.
    Reset {
        /// True if the guest asked for it.
        guest: bool,
    },
    /// The machine cannot continue (e.g. an unhandled exit); vCPUs are stopped.
    InternalError(String),
    /// The guest ejected a device it was asked to (after [`VcpuRequest::RemoveDevice`] on a
    /// guest that has run); the device and its socket are gone from vcpu-proc.
    DeviceEjected {
        /// The device id.
        id: String,
    },
    /// A virtio-net guest driver changed its receive filter through the control virtqueue (rx
    /// mode, MAC tables, MAC address or VLAN table), or a device reset put it back; `filter` is
    /// the whole new state. Sent on every change: the monitor decides when QMP hears of it
    /// (`NIC_RX_FILTER_CHANGED`, never for a reset, as QEMU).
    RxFilterChanged {
        /// The device id.
        id: String,
        /// The filter now.
        filter: RxFilter,
        /// A device reset changed it, not a guest command.
        reset: bool,
    },
}

impl Wire for VcpuEvent {}

/// A virtio-net device's receive filter as its guest driver set it through the control
/// virtqueue (QEMU's `VirtIONet` rx state, which `query-rx-filter` reports). The values after a
/// device reset are [`RxFilter::reset`]'s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxFilter {
    /// Every frame is received (`VIRTIO_NET_CTRL_RX_PROMISC`; on after reset).
    pub promisc: bool,
    /// Every multicast frame is received (`ALLMULTI`).
    pub allmulti: bool,
    /// Every unicast frame is received (`ALLUNI`).
    pub alluni: bool,
    /// No multicast frame is received (`NOMULTI`).
    pub nomulti: bool,
    /// No unicast frame is received (`NOUNI`).
    pub nouni: bool,
    /// No broadcast frame is received (`NOBCAST`).
    pub nobcast: bool,
    /// The device's MAC address (`VIRTIO_NET_CTRL_MAC_ADDR_SET`; the configured one after reset).
    pub mac: [u8; 6],
    /// Extra unicast addresses (`VIRTIO_NET_CTRL_MAC_TABLE_SET`), in the guest's order.
    pub unicast: Vec<[u8; 6]>,
    /// Multicast addresses, in the guest's order.
    pub multicast: Vec<[u8; 6]>,
    /// The guest's unicast list did not fit the table (64 entries in all).
    pub unicast_overflow: bool,
    /// The guest's multicast list did not fit the table.
    pub multicast_overflow: bool,
    /// The driver negotiated `VIRTIO_NET_F_CTRL_VLAN`: only the VLANs in `vlans` pass.
    pub vlan_filtering: bool,
    /// The VLAN ids the guest added (ascending), when `vlan_filtering`.
    pub vlans: Vec<u16>,
}

impl RxFilter {
    /// The state after a device reset (QEMU's `virtio_net_reset`): promiscuous, no tables,
    /// the configured MAC.
    pub fn reset(mac: [u8; 6]) -> RxFilter {
        RxFilter {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            mac,
            unicast: Vec::new(),
            multicast: Vec::new(),
            unicast_overflow: false,
            multicast_overflow: false,
            vlan_filtering: false,
            vlans: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// monitor ↔ bulkhead-blockd
// ---------------------------------------------------------------------------------------------

/// Marker type for the monitor↔`bulkhead-blockd` protocol (one blockd per disk).
#[derive(Debug)]
pub struct BlockProtocol;

impl Protocol for BlockProtocol {
    type Request = BlockRequest;
    type Reply = BlockReply;
    type Event = BlockEvent;
}

/// The image format of a disk (`-drive format=`, `-blockdev driver=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    /// The file's bytes are the disk's bytes.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl ImageFormat {
    /// QEMU's driver name (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What blockd serves, sent once after the handshake. The fds travel with
/// [`BlockRequest::Setup`] in this order: `[image, vhost_user, buffered_tail (if
/// buffered_tail), one per backing file (backing_files)]`. `image` is opened read-only for
/// `readonly`, read-write otherwise, `O_DIRECT` for `direct`; `vhost_user` is a connected unix
/// stream socket whose other end is the vhost-user front end (vcpu-proc, or any front end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSetup {
    /// The device id (`-device ...,id=`), for logs.
    pub id: String,
    /// The image format.
    pub format: ImageFormat,
    /// Refuse writes (`VIRTIO_BLK_F_RO`).
    pub readonly: bool,
    /// `cache=none`: the image fd is `O_DIRECT`.
    pub direct: bool,
    /// A second, buffered fd of the image follows (`cache=none` and writable: writes that reach
    /// an unaligned end of file).
    pub buffered_tail: bool,
    /// `GET_ID` answer (at most 20 bytes reach the guest).
    pub serial: String,
    /// Queues offered to the front end (one worker thread each).
    pub num_queues: u16,
    /// Backing files of a qcow2 image, each an fd after the others, outermost first.
    pub backing_files: u32,
    /// What a failed read does (`rerror`).
    pub rerror: ErrorPolicy,
    /// What a failed write, flush, discard or write-zeroes does (`werror`).
    pub werror: ErrorPolicy,
}

/// QEMU's `BlockdevOnError` as `-drive werror=`/`rerror=` and `-device virtio-blk-*,werror=`
/// spell it: what happens when a request fails on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorPolicy {
    /// Fail the request to the guest (`VIRTIO_BLK_S_IOERR`).
    #[default]
    Report,
    /// Complete the request as if it had succeeded.
    Ignore,
    /// Hold the request and pause the VM; it is retried on [`BlockRequest::Resume`].
    Stop,
    /// `Stop` when the error is `ENOSPC`, `Report` otherwise.
    Enospc,
}

impl ErrorPolicy {
    /// QEMU's name (`report`, `ignore`, `stop`, `enospc`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Enospc => "enospc",
        }
    }

    /// The policy QEMU spells `name`.
    pub fn from_name(name: &str) -> Option<ErrorPolicy> {
        Some(match name {
            "report" => ErrorPolicy::Report,
            "ignore" => ErrorPolicy::Ignore,
            "stop" => ErrorPolicy::Stop,
            "enospc" => ErrorPolicy::Enospc,
            _ => return None,
        })
    }

    /// The action taken for an error with errno `errno` (QEMU's `blk_get_error_action`).
    pub fn action(self, errno: i32) -> ErrorAction {
        match self {
            ErrorPolicy::Report => ErrorAction::Report,
            ErrorPolicy::Ignore => ErrorAction::Ignore,
            ErrorPolicy::Stop => ErrorAction::Stop,
            ErrorPolicy::Enospc if errno == ENOSPC => ErrorAction::Stop,
            ErrorPolicy::Enospc => ErrorAction::Report,
        }
    }
}

/// `ENOSPC` on Linux (every architecture).
const ENOSPC: i32 = 28;

/// What blockd did about one failed request (QEMU's `BlockErrorAction`, the `action` of
/// `BLOCK_IO_ERROR`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorAction {
    /// The guest got an error status.
    Report,
    /// The guest was told the request succeeded.
    Ignore,
    /// The request is held until [`BlockRequest::Resume`]; the monitor pauses the VM.
    Stop,
}

impl ErrorAction {
    /// QEMU's name (`report`, `ignore`, `stop`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Ignore => "ignore",
            ErrorAction::Stop => "stop",
        }
    }
}

impl BlockSetup {
    /// Number of fds that accompany this setup.
    pub fn fd_count(&self) -> usize {
        2 + usize::from(self.buffered_tail) + self.backing_files as usize
    }
}

/// Requests from the monitor to blockd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockRequest {
    /// Open the image and start serving the front end on the socket; answered with
    /// [`BlockReply::Ready`].
    Setup(BlockSetup),
    /// The I/O counters ([`BlockReply::Stats`]).
    QueryStats,
    /// Change the virtual disk size to `size` bytes (`block_resize`); the front end is told
    /// separately (vcpu-proc's `ConfigChanged`).
    Resize {
        /// New size in bytes.
        size: u64,
    },
    /// What the sandbox `enter` did ([`BlockReply::Sandbox`]).
    QuerySandbox,
    /// Stop serving and exit.
    Quit,
    /// Limit the disk's I/O (`block_set_io_throttle`); all zero: no limit.
    SetThrottle(ThrottleLimits),
    /// `block-set-write-threshold`: report the first write (or write-zeroes) that ends beyond
    /// this guest offset with [`BlockEvent::WriteThreshold`], then stop watching; 0: off.
    SetWriteThreshold(u64),
    /// The VM runs again (`cont`): retry every request held by an [`ErrorAction::Stop`], in
    /// the order they failed, and serve the queues as before; answered with `Ok`.
    Resume,
}

/// I/O limits of one disk, per second; 0 means no limit. `bps`/`iops` count reads and writes
/// together; the `_rd`/`_wr` limits count one direction (the monitor never sets both kinds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleLimits {
    /// Bytes per second, reads and writes.
    pub bps: u64,
    /// Bytes per second read.
    pub bps_rd: u64,
    /// Bytes per second written.
    pub bps_wr: u64,
    /// Operations per second, reads and writes.
    pub iops: u64,
    /// Reads per second.
    pub iops_rd: u64,
    /// Writes per second.
    pub iops_wr: u64,
}

impl ThrottleLimits {
    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        *self != ThrottleLimits::default()
    }
}

impl Wire for BlockRequest {
    fn fd_count(&self) -> usize {
        match self {
            BlockRequest::Setup(s) => s.fd_count(),
            _ => 0,
        }
    }
}

/// I/O counters of one disk since blockd started, counted where the requests reach the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// Bytes read.
    pub rd_bytes: u64,
    /// Bytes written.
    pub wr_bytes: u64,
    /// Bytes discarded or zeroed (discard, write-zeroes).
    pub unmap_bytes: u64,
    /// Reads completed.
    pub rd_operations: u64,
    /// Writes completed.
    pub wr_operations: u64,
    /// Flushes completed.
    pub flush_operations: u64,
    /// Discards and write-zeroes completed.
    pub unmap_operations: u64,
    /// Time spent in reads, nanoseconds.
    pub rd_total_time_ns: u64,
    /// Time spent in writes, nanoseconds.
    pub wr_total_time_ns: u64,
    /// Time spent in flushes, nanoseconds.
    pub flush_total_time_ns: u64,
    /// Time spent in discards and write-zeroes, nanoseconds.
    pub unmap_total_time_ns: u64,
    /// Failed reads.
    pub failed_rd_operations: u64,
    /// Failed writes.
    pub failed_wr_operations: u64,
    /// Failed flushes.
    pub failed_flush_operations: u64,
    /// Failed discards and write-zeroes.
    pub failed_unmap_operations: u64,
    /// The end of the furthest write, in bytes.
    pub wr_highest_offset: u64,
    /// Nanoseconds since the last operation ended (`None`: none yet).
    pub idle_time_ns: Option<u64>,
}

/// Replies from blockd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockReply {
    /// Done.
    Ok,
    /// The request failed; the text says why.
    Error(String),
    /// Answer to [`BlockRequest::Setup`]: serving, with the virtual disk size.
    Ready {
        /// Virtual disk size in bytes.
        size: u64,
    },
    /// Answer to [`BlockRequest::QueryStats`].
    Stats(BlockStats),
    /// Answer to [`BlockRequest::QuerySandbox`].
    Sandbox(SandboxReport),
}

impl Wire for BlockReply {}

/// Unsolicited events from blockd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockEvent {
    /// The front end hung up; blockd exits after sending this.
    FrontEndGone,
    /// A write ended at `end`, beyond the threshold `threshold` (which is now off).
    WriteThreshold {
        /// The write's end offset (guest bytes).
        end: u64,
        /// The threshold it passed.
        threshold: u64,
    },
    /// A request failed on the host and `action` was taken (QEMU's `BLOCK_IO_ERROR`).
    IoError {
        /// A write, flush, discard or write-zeroes (`werror`) rather than a read (`rerror`).
        write: bool,
        /// What was done.
        action: ErrorAction,
        /// The error was `ENOSPC`.
        nospace: bool,
        /// `strerror` of the error, as QEMU's `reason`.
        reason: String,
    },
}

impl Wire for BlockEvent {}

// ---------------------------------------------------------------------------------------------
// monitor ↔ bulkhead-netd
// ---------------------------------------------------------------------------------------------

/// Marker type for the monitor↔`bulkhead-netd` protocol (one netd per NIC).
#[derive(Debug)]
pub struct NetProtocol;

impl Protocol for NetProtocol {
    type Request = NetRequest;
    type Reply = NetReply;
    type Event = NetEvent;
}

/// What netd serves, sent once after the handshake. The fds travel with [`NetRequest::Setup`]
/// in this order: `[tap, vhost_user]`. `tap` is a tap fd the monitor opened (`/dev/net/tun` +
/// `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, or handed to it by a client); netd only
/// sets its vnet header size and offloads. `vhost_user` is a connected unix stream socket whose
/// other end is the vhost-user front end (vcpu-proc's virtio-pci transport, or any front end).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSetup {
    /// The device id (`-device ...,id=`) or netdev id, for logs.
    pub id: String,
    /// The MAC address of the back end's configuration space (unicast).
    pub mac: [u8; 6],
    /// Virtqueues offered to the front end: two per queue pair (receive, transmit).
    pub num_queues: u16,
    /// The link is up at start (frames flow); see [`NetRequest::SetLink`].
    pub link_up: bool,
}

impl NetSetup {
    /// Number of fds that accompany this setup: one tap queue fd per queue pair (in pair
    /// order), then the vhost-user socket.
    pub fn fd_count(&self) -> usize {
        usize::from(self.num_queues / 2).max(1) + 1
    }
}

/// Requests from the monitor to netd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetRequest {
    /// Take the tap and start serving the front end on the socket; answered with
    /// [`NetReply::Ok`].
    Setup(NetSetup),
    /// The data-path counters ([`NetReply::Stats`]).
    QueryStats,
    /// `set_link`: with the link down netd drops every frame both ways (the guest's transmit
    /// buffers are returned unsent, frames from the tap are read and discarded, nothing is
    /// delivered to the guest). The guest-visible link bit is the front end's (vcpu-proc's
    /// `SetLink`).
    SetLink {
        /// Link up.
        up: bool,
    },
    /// What the sandbox `enter` did ([`NetReply::Sandbox`]).
    QuerySandbox,
    /// Stop serving and exit.
    Quit,
}

impl Wire for NetRequest {
    fn fd_count(&self) -> usize {
        match self {
            NetRequest::Setup(s) => s.fd_count(),
            _ => 0,
        }
    }
}

/// Data-path counters of one NIC since netd started, counted where frames meet the tap and the
/// guest's rings. Bytes are Ethernet frame bytes (without the vnet header).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames read from the tap and not delivered (no fitting buffer, bad descriptors, link
    /// down).
    pub rx_dropped: u64,
    /// Times netd stopped reading the tap because the guest had posted too few buffers.
    pub rx_stalls: u64,
    /// Frames the guest sent that were written to the tap.
    pub tx_frames: u64,
    /// Bytes written to the tap.
    pub tx_bytes: u64,
    /// Frames the guest sent that were not written (bad descriptors, oversize, refused by the
    /// tap, link down).
    pub tx_dropped: u64,
    /// The link state netd applies (see [`NetRequest::SetLink`]).
    pub link_up: bool,
}

/// Replies from netd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetReply {
    /// Done.
    Ok,
    /// The request failed; the text says why.
    Error(String),
    /// Answer to [`NetRequest::QueryStats`].
    Stats(NetStats),
    /// Answer to [`NetRequest::QuerySandbox`].
    Sandbox(SandboxReport),
}

impl Wire for NetReply {}

/// Unsolicited events from netd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetEvent {
    /// The front end hung up; netd exits after sending this.
    FrontEndGone,
}

impl Wire for NetEvent {}
