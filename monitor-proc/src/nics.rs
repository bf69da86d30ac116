//! Network interfaces: `-netdev tap`, `-device virtio-net-pci` (and `-nic tap`), the taps the
//! monitor holds, and the `bulkhead-netd` that serves each NIC.
//!
//! Accepted forms (anything else is an error naming the key):
//! - `-netdev tap,id=ID,fd=N`: fd `N`, inherited from whoever started the monitor, is a tap
//!   (`/dev/net/tun` after `TUNSETIFF` with `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR`; checked with
//!   `TUNGETIFF` at start-up);
//! - `-netdev tap,id=ID,ifname=NAME,script=no,downscript=no`: the monitor opens `/dev/net/tun`
//!   itself at start-up, before it confines itself (it runs no scripts, so both must be `no`);
//!   `vnet_hdr=on` and `vhost=off` are accepted (that is what bulkhead does anyway);
//! - `-device virtio-net-pci,netdev=ID[,mac=MAC][,id=ID][,addr=SLOT[.0]][,bus=pci.0|pcie.0]`
//!   (`virtio-net` is the same device). Without `mac=` the NIC gets QEMU's default,
//!   52:54:00:12:34:56 and up (the first suffix no other NIC uses);
//! - `-nic tap,<netdev keys>,model=virtio-net-pci[,mac=MAC]`: both at once, the netdev named by
//!   `id=` or `__org.qemu.nic0`, ... as QEMU names them.
//!
//! At run time ([`Nics`]) each NIC is served by one `bulkhead-netd`, started through the
//! launcher each time the machine worker starts: its ipc channel, the handshake, then
//! `NetRequest::Setup` with a duplicate of the tap and one end of a fresh `socketpair`, the
//! other end going to vcpu-proc in `VmSetup.devices` as a `VirtioKind::Net` device. A
//! supervisor task per netd reports its exit; one that is not a clean end of the session is an
//! unexpected death (`X_WORKER_EXITED` with role `netd`); the VM keeps running (its NIC stops
//! moving frames).
//!
//! QMP (`crate::qmp::commands::net`) reaches [`Nics::handle`] through the VM actor:
//! `netdev_add`/`netdev_del`, `device_add`/`device_del` of a `virtio-net-pci` while the guest
//! has not run yet (vcpu-proc plugs devices only then; PCI hot-plug does not exist yet),
//! `set_link`, `query-rx-filter` and HMP `info network`.
//!
//! `set_link` follows QEMU: naming the NIC sets the NIC's link; naming the netdev sets the
//! netdev's and its NIC's. The guest sees the NIC's (vcpu-proc's link status bit, with a
//! configuration interrupt); netd moves frames only while both are up.
//!
//! The rx filter: the guest sets it through the control virtqueue, which vcpu-proc serves
//! (`vcpu-proc/src/virtio/net_ctrl.rs`) and reports with `VcpuEvent::RxFilterChanged`
//! ([`Nics::on_rx_filter`]). The NIC keeps the last state for `query-rx-filter` and emits
//! `NIC_RX_FILTER_CHANGED` as QEMU does: once, then not again for that NIC until
//! `query-rx-filter` has reported it (a device reset changes the state silently). As with
//! QEMU's vhost-user-net, the filter is not enforced on the data path: netd delivers every
//! frame the tap gives it and the guest's driver drops what it did not ask for.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bulkhead_ipc::messages::{
    NetProtocol, NetReply, NetRequest, NetSetup, NetStats, RxFilter, SandboxReport, VcpuProtocol,
    VcpuReply, VcpuRequest, VirtioDevice, VirtioKind,
};
use bulkhead_ipc::{AsyncChannel, Role as IpcRole, RpcClient};
use bulkhead_sandbox::seccomp::Violation;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::cli::{parse_opts, CliError};
use crate::hotplug::{self, Unplugs};
use crate::qmp::protocol::{ErrorClass, QmpError};
use crate::worker::{self, SandboxConfig, WorkerError};

/// The netd binary's file name.
pub const NETD_WORKER: &str = "bulkhead-netd";
/// Virtqueues of one queue pair (receive, transmit).
pub const NET_QUEUES: u16 = 2;
/// Most queues of a tap netdev (queue pairs of a NIC): what `bulkhead-netd` serves.
pub const MAX_TAP_QUEUES: usize = 8;
/// How long netd has for the handshake and the setup.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long netd (or vcpu-proc) has to answer a request.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The virtqueue size the guest may choose at most.
const QUEUE_SIZE: u16 = 256;
/// QEMU's default MAC prefix; the last byte counts from 0x56.
const MAC_BASE: [u8; 5] = [0x52, 0x54, 0x00, 0x12, 0x34];

/// The monitor confined itself: opening `/dev/net/tun` is no longer possible.
static CONFINED: AtomicBool = AtomicBool::new(false);

/// Records that the monitor's landlock ruleset and seccomp filter are in force (so a
/// `netdev_add ifname=` is refused with a reason rather than by the sandbox).
pub fn set_monitor_confined() {
    CONFINED.store(true, Ordering::SeqCst);
}

/// Which option a net argument came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetOpt {
    /// `-netdev`.
    Netdev,
    /// `-device virtio-net-pci`.
    Device,
    /// `-nic`.
    Nic,
}

impl NetOpt {
    fn flag(self) -> &'static str {
        match self {
            NetOpt::Netdev => "-netdev",
            NetOpt::Device => "-device",
            NetOpt::Nic => "-nic",
        }
    }
}

/// The net options, in command-line order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetArgs {
    /// Each option with its argument.
    pub items: Vec<(NetOpt, String)>,
}

/// Where a netdev's tap comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapSource {
    /// An fd the monitor inherited (`fd=N`; -1: a name, QMP's `getfd`).
    Fd(i32),
    /// Several queues of a multiqueue tap (`fds=a:b:...`): fd numbers on the command line,
    /// `getfd` names (or numbers, refused there) in `netdev_add`.
    Fds(Vec<String>),
    /// A tap the monitor opens by name (`ifname=`) this many times (`queues=`, with
    /// `IFF_MULTI_QUEUE` when more than one).
    Ifname(String, usize),
}

/// One `-netdev tap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevSpec {
    /// `id=`.
    pub id: String,
    /// The tap.
    pub source: TapSource,
}

/// One `virtio-net-pci`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// `id=`.
    pub id: Option<String>,
    /// `netdev=`.
    pub netdev: String,
    /// `mac=` (`None`: QEMU's default, chosen when the NIC is created).
    pub mac: Option<[u8; 6]>,
    /// `addr=` (`None`: the first free slot).
    pub slot: Option<u8>,
    /// `mq=on`: the NIC offers its netdev's queues as queue pairs (`VIRTIO_NET_F_MQ`).
    pub mq: bool,
    /// `vectors=` (`None`: QEMU's default, 2 per queue pair + 2).
    pub vectors: Option<u32>,
}

/// The configured network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetConfig {
    /// Netdevs, in creation order.
    pub netdevs: Vec<NetdevSpec>,
    /// NICs, in creation order.
    pub nics: Vec<NicSpec>,
}

/// Whether a `-device` argument names a NIC this module handles.
pub fn is_net_device(arg: &str) -> bool {
    parse_opts(arg, Some("driver"))
        .iter()
        .any(|(k, v)| k == "driver" && matches!(v.as_str(), "virtio-net-pci" | "virtio-net"))
}

fn bad(opt: NetOpt, value: &str, reason: impl Into<String>) -> CliError {
    CliError::BadValue {
        option: opt.flag().into(),
        value: value.into(),
        reason: reason.into(),
    }
}

/// QEMU's `id_wellformed`.
fn id_ok(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// `52:54:00:12:34:56`.
pub fn mac_string(m: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// `addr=5`, `addr=0x5`, `addr=05.0`.
fn parse_slot(v: &str) -> Option<u8> {
    let (dev, func) = match v.split_once('.') {
        Some((d, f)) => (d, Some(f)),
        None => (v, None),
    };
    if func.is_some_and(|f| f != "0") {
        return None;
    }
    let dev = dev.strip_prefix("0x").unwrap_or(dev);
    let n = u8::from_str_radix(dev, 16).ok()?;
    (1..=31).contains(&n).then_some(n)
}

/// A netdev's keys, as `-netdev tap,...` or QMP `netdev_add` give them (values as strings).
fn netdev_from_pairs(
    pairs: &[(String, String)],
    err: &dyn Fn(String) -> String,
) -> Result<NetdevSpec, String> {
    let mut ty = None;
    let mut id = None;
    let mut fd = None;
    let mut fds = None;
    let mut queues = None;
    let mut ifname = None;
    let (mut script, mut downscript) = (None, None);
    for (k, v) in pairs {
        match k.as_str() {
            "type" => ty = Some(v.clone()),
            "id" => id = Some(v.clone()),
            "fd" => fd = Some(v.clone()),
            "fds" => fds = Some(v.clone()),
            "queues" => queues = Some(v.clone()),
            "ifname" => ifname = Some(v.clone()),
            "script" => script = Some(v.clone()),
            "downscript" => downscript = Some(v.clone()),
            "vnet_hdr" if matches!(v.as_str(), "on" | "true" | "yes") => {}
            "vhost" | "vhostforce" if matches!(v.as_str(), "off" | "false" | "no") => {}
            "vnet_hdr" => {
                return Err(err(format!(
                    "vnet_hdr={v}: bulkhead's NICs always use the vnet header (vnet_hdr=on)"
                )))
            }
            "vhost" | "vhostforce" => {
                return Err(err(format!(
                    "{k}={v}: vhost-net is not supported: bulkhead-netd is the NIC's back end"
                )))
            }
            "vhostfd" | "vhostfds" | "br" | "helper" | "sndbuf" | "poll-us" => {
                return Err(err(format!(
                    "'{k}' is not supported by bulkhead's tap netdev (it takes id, fd, fds \
                     or ifname with script=no,downscript=no and queues)"
                )))
            }
            other => return Err(err(format!("Invalid parameter '{other}'"))),
        }
    }
    match ty.as_deref() {
        Some("tap") => {}
        None | Some("") => return Err(err("Parameter 'type' is missing".into())),
        Some(other) => {
            return Err(err(format!(
                "network backend '{other}' is not supported by bulkhead (it has tap)"
            )))
        }
    }
    let id = id.ok_or_else(|| err("Parameter 'id' is missing".into()))?;
    if !id_ok(&id) {
        return Err(err("Parameter 'id' expects an identifier".into()));
    }
    if fd.is_some()
        && (ifname.is_some()
            || script.is_some()
            || downscript.is_some()
            || queues.is_some()
            || fds.is_some())
    {
        return Err(err(
            "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, fds=, and vhostfds= \
             are invalid with fd="
                .into(),
        ));
    }
    if let Some(list) = fds {
        // QEMU 7.2's text (vnet_hdr= on is accepted: bulkhead's taps always have it).
        if ifname.is_some() || script.is_some() || downscript.is_some() || queues.is_some() {
            return Err(err(
                "ifname=, script=, downscript=, vnet_hdr=, helper=, queues=, and vhostfd= \
                 are invalid with fds="
                    .into(),
            ));
        }
        let items: Vec<String> = list.split(':').map(str::to_string).collect();
        if items.iter().any(|i| i.is_empty()) {
            return Err(err(format!("fds={list}: an empty fd in the list")));
        }
        if items.len() > MAX_TAP_QUEUES {
            return Err(err(format!(
                "fds={list}: {} queues; bulkhead-netd serves at most {MAX_TAP_QUEUES}",
                items.len()
            )));
        }
        return Ok(NetdevSpec {
            id,
            source: TapSource::Fds(items),
        });
    }
    let queues = match queues {
        None => 1,
        Some(q) => match q.parse::<usize>() {
            Ok(n) if (1..=MAX_TAP_QUEUES).contains(&n) => n,
            Ok(_) => {
                return Err(err(format!(
                    "queues={q}: bulkhead-netd serves 1 to {MAX_TAP_QUEUES} queues"
                )))
            }
            Err(_) => {
                return Err(err(format!(
                    "Parameter 'queues' expects uint32_t (not '{q}')"
                )))
            }
        },
    };
    let source = match (fd, ifname) {
        (Some(fd), None) => TapSource::Fd(fd.parse().map_err(|_| fd.clone()).or_else(|name| {
            // A name (QMP's getfd): kept as -1 here; the QMP path resolves it.
            if id_ok(&name) {
                Ok(-1)
            } else {
                Err(err(format!("fd={name}: not a file descriptor number")))
            }
        })?),
        (None, Some(name)) => {
            let no = |v: &Option<String>| v.as_deref() == Some("no");
            if !no(&script) || !no(&downscript) {
                return Err(err(
                    "ifname= needs script=no,downscript=no: bulkhead runs no network scripts"
                        .into(),
                ));
            }
            if name.is_empty() || name.len() >= 16 || name.contains('/') {
                return Err(err(format!("ifname={name}: not an interface name")));
            }
            TapSource::Ifname(name, queues)
        }
        (None, None) | (Some(_), Some(_)) => {
            return Err(err(
                "a tap netdev needs fd=N (an open tap) or ifname=NAME,script=no,downscript=no"
                    .into(),
            ))
        }
    };
    Ok(NetdevSpec { id, source })
}

impl TapSource {
    /// The netdev's queues (one queue pair of its NIC each, with `mq=on`).
    pub fn queues(&self) -> usize {
        match self {
            TapSource::Fd(_) => 1,
            TapSource::Fds(l) => l.len(),
            TapSource::Ifname(_, q) => *q,
        }
    }
}

/// The queue pairs a NIC offers on a netdev with `queues` queues: all of them with `mq=on`,
/// else one (QEMU: without `VIRTIO_NET_F_MQ` the driver uses pair 0 only).
pub fn nic_pairs(nic_mq: bool, queues: usize) -> usize {
    if nic_mq {
        queues.max(1)
    } else {
        1
    }
}

/// `vectors=`: bulkhead's virtio-net-pci has one MSI-X vector per virtqueue (two per queue pair
/// and the control queue) and one for configuration changes, QEMU's default
/// `2 * queues + 2`; another count is refused (QEMU would share or drop vectors).
fn check_vectors(nic: &NicSpec, queues: usize) -> Result<(), String> {
    let pairs = nic_pairs(nic.mq, queues);
    let have = 2 * pairs as u32 + 2;
    match nic.vectors {
        Some(v) if v != have => Err(format!(
            "vectors={v}: bulkhead's virtio-net-pci has {have} MSI-X vectors here (one per \
             virtqueue of its {pairs} queue pair(s), one for the control queue and one for \
             configuration changes); give vectors={have} or leave it out"
        )),
        _ => Ok(()),
    }
}

/// `netdev_add`'s members as `key=value` strings: the netdev, with `fd` a name (`Fd(-1)`) or a
/// number.
pub fn netdev_from_qmp(pairs: &[(String, String)]) -> Result<NetdevSpec, String> {
    netdev_from_pairs(pairs, &|r| r)
}

/// A NIC's keys (`-device virtio-net-pci,...` or QMP `device_add`).
fn nic_from_pairs(
    pairs: &[(String, String)],
    err: &dyn Fn(String) -> String,
) -> Result<NicSpec, String> {
    let mut nic = NicSpec {
        id: None,
        netdev: String::new(),
        mac: None,
        slot: None,
        mq: false,
        vectors: None,
    };
    let prop = |k: &str, v: &str| format!("Property 'virtio-net-pci.{k}' doesn't take value '{v}'");
    for (k, v) in pairs {
        match k.as_str() {
            "driver" => {}
            "netdev" => nic.netdev = v.clone(),
            "id" => {
                if !id_ok(v) {
                    return Err(err(format!(
                        "Parameter 'id' expects an identifier, not '{v}'"
                    )));
                }
                nic.id = Some(v.clone());
            }
            "mac" => {
                let m = parse_mac(v).ok_or_else(|| err(prop("mac", v)))?;
                if m[0] & 1 != 0 {
                    return Err(err(format!(
                        "mac={v} is a multicast address; a NIC needs a unicast one"
                    )));
                }
                nic.mac = Some(m);
            }
            "addr" => nic.slot = Some(parse_slot(v).ok_or_else(|| err(prop("addr", v)))?),
            "bus" if matches!(v.as_str(), "pci.0" | "pcie.0") => {}
            "bus" => return Err(err(format!("Bus '{v}' not found"))),
            "mq" => {
                nic.mq = match v.as_str() {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(err("Parameter 'mq' expects 'on' or 'off'".into())),
                }
            }
            "vectors" => {
                nic.vectors = Some(v.parse::<u32>().map_err(|_| err(prop("vectors", v)))?);
            }
            "vhost" | "rx_queue_size" | "tx_queue_size" | "host_mtu" | "romfile" | "failover"
            | "speed" | "duplex" => {
                return Err(err(format!(
                    "property '{k}' of virtio-net-pci is not supported by bulkhead"
                )))
            }
            other => return Err(err(format!("Property 'virtio-net-pci.{other}' not found"))),
        }
    }
    if nic.netdev.is_empty() {
        return Err(err(
            "bulkhead needs netdev= for virtio-net-pci (a NIC without a back end)".into(),
        ));
    }
    Ok(nic)
}

/// Resolves the net options: netdevs first, then NICs (QEMU's order), checking that every NIC
/// names an existing netdev no other NIC uses, and placing NICs in slots `block_slots` (the
/// disks') leaves free.
pub fn resolve(
    args: &NetArgs,
    block_slots: &[u8],
    block_ids: &[String],
) -> Result<NetConfig, CliError> {
    let mut cfg = NetConfig::default();
    let mut nic_count = 0;
    for kind in [NetOpt::Netdev, NetOpt::Nic, NetOpt::Device] {
        for (o, whole) in args.items.iter().filter(|(o, _)| *o == kind) {
            let err = |r: String| r;
            let b = |r: String| bad(*o, whole, r);
            match o {
                NetOpt::Netdev => {
                    let pairs = parse_opts(whole, Some("type"));
                    let spec = netdev_from_pairs(&pairs, &err).map_err(b)?;
                    if matches!(spec.source, TapSource::Fd(n) if n < 0) {
                        return Err(b(
                            "fd= on the command line is an fd number (fd names come from \
                             QMP's getfd)"
                                .into(),
                        ));
                    }
                    if let TapSource::Fds(list) = &spec.source {
                        if let Some(x) = list.iter().find(|x| x.parse::<i32>().is_err()) {
                            return Err(b(format!(
                                "fds=: '{x}' is not an fd number (fd names come from QMP's \
                                 getfd)"
                            )));
                        }
                    }
                    cfg.netdevs.push(spec);
                }
                NetOpt::Nic => {
                    let mut pairs = parse_opts(whole, Some("type"));
                    let mut model = None;
                    let mut mac = None;
                    pairs.retain(|(k, v)| match k.as_str() {
                        "model" => {
                            model = Some(v.clone());
                            false
                        }
                        "mac" => {
                            mac = Some(v.clone());
                            false
                        }
                        _ => true,
                    });
                    match model.as_deref() {
                        Some("virtio-net-pci") | Some("virtio") => {}
                        Some(other) => {
                            return Err(b(format!(
                                "model={other}: bulkhead has only virtio-net-pci NICs"
                            )))
                        }
                        None => {
                            return Err(b(
                                "bulkhead needs model=virtio-net-pci (QEMU's default NIC \
                                 model is one bulkhead does not have)"
                                    .into(),
                            ))
                        }
                    }
                    let named = pairs.iter().any(|(k, _)| k == "id");
                    if !named {
                        pairs.push(("id".into(), "nic".into()));
                    }
                    let mut spec = netdev_from_pairs(&pairs, &err).map_err(b)?;
                    if !named {
                        // QEMU's name for the netdev of an -nic without id=.
                        spec.id = format!("__org.qemu.nic{nic_count}");
                    }
                    nic_count += 1;
                    if matches!(spec.source, TapSource::Fd(n) if n < 0) {
                        return Err(b("fd= is an fd number".into()));
                    }
                    let mut np = vec![("netdev".to_string(), spec.id.clone())];
                    if let Some(m) = mac {
                        np.push(("mac".into(), m));
                    }
                    cfg.netdevs.push(spec);
                    cfg.nics.push(nic_from_pairs(&np, &err).map_err(b)?);
                }
                NetOpt::Device => {
                    let pairs = parse_opts(whole, Some("driver"));
                    cfg.nics.push(nic_from_pairs(&pairs, &err).map_err(b)?);
                }
            }
        }
    }
    let mut ids = std::collections::BTreeSet::new();
    for n in &cfg.netdevs {
        if !ids.insert(n.id.clone()) {
            return Err(CliError::Conflict(format!(
                "-netdev {}: Duplicate ID '{}' for netdev",
                n.id, n.id
            )));
        }
    }
    let mut used = std::collections::BTreeSet::new();
    let mut dev_ids: std::collections::BTreeSet<String> = block_ids.iter().cloned().collect();
    for nic in &cfg.nics {
        if !ids.contains(&nic.netdev) {
            return Err(CliError::Conflict(format!(
                "-device virtio-net-pci: Property 'virtio-net-pci.netdev' can't find value '{}'",
                nic.netdev
            )));
        }
        if !used.insert(nic.netdev.clone()) {
            return Err(CliError::Conflict(format!(
                "-device virtio-net-pci: Property 'virtio-net-pci.netdev' can't take value \
                 '{}', it's in use",
                nic.netdev
            )));
        }
        if let Some(nd) = cfg.netdevs.iter().find(|d| d.id == nic.netdev) {
            check_vectors(nic, nd.source.queues())
                .map_err(|r| CliError::Conflict(format!("-device virtio-net-pci: {r}")))?;
        }
        if let Some(id) = &nic.id {
            if !dev_ids.insert(id.clone()) {
                return Err(CliError::Conflict(format!(
                    "-device virtio-net-pci: Duplicate device ID '{id}'"
                )));
            }
        }
    }
    let mut slots: std::collections::BTreeSet<u8> = block_slots.iter().copied().collect();
    for nic in &cfg.nics {
        if let Some(s) = nic.slot {
            if !slots.insert(s) {
                return Err(CliError::Conflict(format!(
                    "-device virtio-net-pci: PCI: slot {s} function 0 not available, in use"
                )));
            }
        }
    }
    for nic in &mut cfg.nics {
        if nic.slot.is_none() {
            let s = free_slot(&slots).ok_or_else(|| {
                CliError::Conflict("too many PCI devices: bus 0 has 31 slots".into())
            })?;
            slots.insert(s);
            nic.slot = Some(s);
        }
    }
    Ok(cfg)
}

fn free_slot(used: &std::collections::BTreeSet<u8>) -> Option<u8> {
    (1..=31u8).find(|s| !used.contains(s))
}

/// Errors opening taps or starting netd.
#[derive(Debug, thiserror::Error)]
pub enum NicsError {
    /// A tap could not be opened or is not usable.
    #[error("-netdev {id}: {reason}")]
    Tap {
        /// The netdev.
        id: String,
        /// Why.
        reason: String,
    },
    /// Starting netd failed.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// netd failed during start-up.
    #[error("bulkhead-netd for {nic} (pid {pid}): {reason}")]
    Start {
        /// The NIC.
        nic: String,
        /// Its pid.
        pid: u32,
        /// What went wrong.
        reason: String,
    },
    /// A socketpair could not be made.
    #[error("socketpair for {0}: {1}")]
    Socket(String, String),
    /// No netd binary.
    #[error("no bulkhead-netd to serve the NICs (it belongs next to bulkhead)")]
    NoNetd,
}

// <linux/if_tun.h>
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name, the flags, padding to 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    pad: [u8; 22],
}

fn ifreq() -> IfReq {
    IfReq {
        name: [0; 16],
        flags: 0,
        pad: [0; 22],
    }
}

const IFF_MULTI_QUEUE: i16 = 0x0100;

/// Opens `/dev/net/tun` and attaches to (or creates) tap `name` with
/// `IFF_TAP|IFF_NO_PI|IFF_VNET_HDR` (and `IFF_MULTI_QUEUE` when `multi`: one queue per open).
pub fn open_tap(name: &str, multi: bool) -> std::io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let fd: OwnedFd = f.into();
    let mut req = ifreq();
    let n = name.as_bytes();
    if n.len() >= req.name.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    req.name[..n.len()].copy_from_slice(n);
    req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if multi {
        req.flags |= IFF_MULTI_QUEUE;
    }
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes), which `req` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Checks that `fd` is a tap set up as netd needs it; returns its interface name.
pub fn check_tap(fd: BorrowedFd<'_>) -> Result<String, String> {
    tap_info(fd).map(|(name, _)| name)
}

/// Checks that `fds` are queues of one tap set up as netd needs it (several: all
/// `IFF_MULTI_QUEUE` queues of the same interface, with the same flags); returns its name.
pub fn check_taps(fds: &[BorrowedFd<'_>]) -> Result<String, String> {
    let mut first: Option<(String, i16)> = None;
    for fd in fds {
        let (name, flags) = tap_info(*fd)?;
        if fds.len() > 1 && flags & IFF_MULTI_QUEUE == 0 {
            return Err(format!(
                "tap {name} is not a multiqueue tap (IFF_MULTI_QUEUE): several fds must be \
                 queues of one"
            ));
        }
        match &first {
            None => first = Some((name, flags)),
            Some((n, _)) if *n != name => {
                return Err(format!(
                    "the fds are queues of different taps ({n}, {name})"
                ))
            }
            // QEMU 7.2's text.
            Some((_, f)) if *f != flags => {
                return Err("vnet_hdr not consistent across given tap fds".into())
            }
            Some(_) => {}
        }
    }
    first
        .map(|(n, _)| n)
        .ok_or_else(|| "no tap file descriptor".into())
}

fn tap_info(fd: BorrowedFd<'_>) -> Result<(String, i16), String> {
    let mut req = ifreq();
    // SAFETY: TUNGETIFF writes a `struct ifreq` (40 bytes), which `req` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNGETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(format!(
            "not a tap file descriptor (TUNGETIFF: {})",
            std::io::Error::last_os_error()
        ));
    }
    let end = req.name.iter().position(|&b| b == 0).unwrap_or(16);
    let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
    let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if req.flags & want != want {
        return Err(format!(
            "tap {name} was opened without IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (flags {:#x})",
            req.flags
        ));
    }
    Ok((name, req.flags))
}

/// The first, cheap check of a passed fd: `/dev/net/tun` is character device 10:200.
fn looks_like_tun(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: a zeroed stat is valid; fstat fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a borrowed, open fd into a local struct.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && libc::major(st.st_rdev) == 10
        && libc::minor(st.st_rdev) == 200
}

/// A close-on-exec stream socket pair for a netd's output: (the monitor's end, netd's end).
/// A pair rather than a pipe: the confined monitor may make socket pairs (`pipe2` is not in
/// its allowlist).
fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = UnixStream::pair()?;
    b.shutdown(std::net::Shutdown::Read)?;
    Ok((a.into(), b.into()))
}

/// Copies a netd's output to the monitor's stderr until netd is gone.
fn relay_log(rx: OwnedFd) {
    use std::io::{Read, Write};
    let mut rx = std::fs::File::from(rx);
    let mut buf = [0u8; 4096];
    while let Ok(n) = rx.read(&mut buf) {
        if n == 0 || std::io::stderr().write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

fn dup(fd: BorrowedFd<'_>) -> std::io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

/// A netdev with its open tap.
struct Netdev {
    /// Creation order among netdevs and NICs (QEMU's `net_clients` order).
    seq: u64,
    id: String,
    /// One fd per queue (a multiqueue tap's queues).
    taps: Vec<OwnedFd>,
    /// `info network`'s text for each queue (QEMU's `info_str`).
    info: Vec<String>,
    link_down: bool,
}

/// A running netd.
struct Netd {
    rpc: RpcClient<NetProtocol>,
    pid: u32,
    _kill: oneshot::Sender<()>,
    sandbox: Option<SandboxReport>,
}

/// A NIC.
struct Nic {
    key: u64,
    /// Its net client name: `id=`, or `virtio-net-pci.N`.
    name: String,
    /// `id=`.
    qdev_id: Option<String>,
    /// Its netdev (`None` after `netdev_del`).
    netdev: Option<String>,
    mac: [u8; 6],
    slot: u8,
    /// `mq=on`.
    mq: bool,
    link_down: bool,
    worker: Option<Netd>,
    /// The rx filter as the guest last set it.
    rx_filter: RxFilter,
    /// `NIC_RX_FILTER_CHANGED` may be sent (QEMU's `rxfilter_notify_enabled`).
    rx_notify: bool,
}

/// A netd's end, as its supervisor saw it.
#[derive(Debug)]
pub struct NetdExit {
    key: u64,
    generation: u64,
    /// Its pid.
    pub pid: u32,
    /// Its status (`None`: it could not be waited for).
    pub status: Option<std::process::ExitStatus>,
    /// The status as the logs say it.
    pub description: String,
    /// The refused system call after a seccomp kill.
    pub violation: Option<Violation>,
}

/// What [`Nics::handle`] needs of the machine worker.
pub struct VcpuCtx<'a> {
    /// Its client, when it runs.
    pub rpc: Option<&'a RpcClient<VcpuProtocol>>,
    /// The machine has a guest (not `-M none`).
    pub guest: bool,
    /// The guest has run since the worker started: plugging is ACPI hot-plug, and
    /// `device_del` asks the guest to eject.
    pub ran: bool,
    /// Guest RAM bytes.
    pub mem_bytes: u64,
    /// The disks' PCI slots.
    pub block_slots: Vec<u8>,
    /// The disks' device ids.
    pub block_ids: Vec<String>,
    /// The unplugs waiting for the guest's eject.
    pub unplugs: &'a mut Unplugs,
    /// Where `DEVICE_DELETED` goes.
    pub bus: &'a crate::qmp::events::EventBus,
}

/// A tap netdev as QMP `netdev_add` gives it.
#[derive(Debug)]
pub struct NewNetdev {
    /// `id`.
    pub id: String,
    /// The tap's queues: received with `getfd` (each with its `info network` text), or a
    /// name to open that many times.
    pub tap: Result<Vec<(OwnedFd, String)>, (String, usize)>,
}

/// A QMP request for the network.
#[derive(Debug)]
pub enum NetOp {
    /// `netdev_add`.
    NetdevAdd(NewNetdev),
    /// `netdev_del`.
    NetdevDel(String),
    /// `device_add` of a virtio-net-pci, its keys as strings.
    DeviceAdd(Vec<(String, String)>),
    /// `device_del`.
    DeviceDel(String),
    /// `set_link`.
    SetLink {
        /// NIC or netdev.
        name: String,
        /// Up.
        up: bool,
    },
    /// `query-rx-filter`.
    QueryRxFilter(Option<String>),
    /// HMP `info network`.
    InfoNetwork,
}

/// Whether `device_del ID` names a NIC (the VM actor asks before trying anything else).
pub enum NetAnswer {
    /// Done (`{}`).
    Done,
    /// A value.
    Value(Value),
    /// Text (HMP).
    Text(String),
}

/// The machine's NICs and netdevs, and the netds serving them.
pub struct Nics {
    netdevs: Vec<Netdev>,
    nics: Vec<Nic>,
    next_key: u64,
    generation: u64,
    netd_path: Option<PathBuf>,
    sandbox: SandboxConfig,
    exits_tx: mpsc::UnboundedSender<NetdExit>,
    exits_rx: mpsc::UnboundedReceiver<NetdExit>,
}

impl std::fmt::Debug for Nics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nics({} NICs)", self.nics.len())
    }
}

/// The first default MAC no NIC in `taken` uses (QEMU's `qemu_macaddr_default_if_unset`).
fn default_mac<'a>(taken: impl Iterator<Item = &'a [u8; 6]>) -> [u8; 6] {
    let used: Vec<u8> = taken.filter(|m| m[..5] == MAC_BASE).map(|m| m[5]).collect();
    let last = (0x56..0xff).find(|i| !used.contains(i)).unwrap_or(0xff);
    [
        MAC_BASE[0],
        MAC_BASE[1],
        MAC_BASE[2],
        MAC_BASE[3],
        MAC_BASE[4],
        last,
    ]
}

fn not_found(name: &str) -> QmpError {
    QmpError {
        class: ErrorClass::DeviceNotFound,
        desc: format!("Device '{name}' not found"),
    }
}

impl Nics {
    /// No NICs.
    pub fn empty() -> Nics {
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Nics {
            netdevs: Vec::new(),
            nics: Vec::new(),
            next_key: 0,
            generation: 0,
            netd_path: None,
            sandbox: SandboxConfig::default(),
            exits_tx,
            exits_rx,
        }
    }

    /// Opens (or takes) the configured taps; call before the monitor confines itself.
    /// `netd_path` is `None` when there is no netd binary (then NICs are refused).
    pub fn open(
        cfg: &NetConfig,
        netd_path: Option<PathBuf>,
        sandbox: SandboxConfig,
    ) -> Result<Nics, NicsError> {
        let mut n = Nics::empty();
        n.netd_path = netd_path;
        n.sandbox = sandbox;
        for d in &cfg.netdevs {
            let tap_err = |reason: String| NicsError::Tap {
                id: d.id.clone(),
                reason,
            };
            let mut taps = Vec::new();
            let mut info = Vec::new();
            match &d.source {
                TapSource::Fd(_) | TapSource::Fds(_) => {
                    let nums: Vec<i32> = match &d.source {
                        TapSource::Fd(fd) => vec![*fd],
                        TapSource::Fds(l) => l.iter().filter_map(|x| x.parse().ok()).collect(),
                        TapSource::Ifname(..) => Vec::new(),
                    };
                    for fd in nums {
                        if taps.iter().any(|t: &OwnedFd| t.as_raw_fd() == fd) {
                            return Err(tap_err(format!("fd {fd} is given twice")));
                        }
                        // SAFETY: F_GETFD on an integer; no memory involved.
                        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                            return Err(tap_err(format!("fd={fd}: not an open file descriptor")));
                        }
                        // The fd is open and inherited for this netdev, each number once
                        // (both checked above).
                        // SAFETY: so nothing else in the monitor owns it.
                        taps.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        info.push(format!("fd={fd}"));
                    }
                }
                TapSource::Ifname(name, queues) => {
                    for _ in 0..*queues {
                        let tap = open_tap(name, *queues > 1)
                            .map_err(|e| tap_err(format!("could not open tap {name}: {e}")))?;
                        taps.push(tap);
                        info.push(format!("ifname={name},script=no,downscript=no"));
                    }
                }
            };
            let borrowed: Vec<BorrowedFd<'_>> = taps.iter().map(|t| t.as_fd()).collect();
            check_taps(&borrowed).map_err(tap_err)?;
            n.next_key += 1;
            n.netdevs.push(Netdev {
                seq: n.next_key,
                id: d.id.clone(),
                taps,
                info,
                link_down: false,
            });
        }
        if !cfg.nics.is_empty() && n.netd_path.is_none() {
            return Err(NicsError::NoNetd);
        }
        for spec in &cfg.nics {
            n.add_nic(spec);
        }
        Ok(n)
    }

    fn add_nic(&mut self, spec: &NicSpec) {
        let mac = spec
            .mac
            .unwrap_or_else(|| default_mac(self.nics.iter().map(|n| &n.mac)));
        let name = spec
            .id
            .clone()
            .unwrap_or_else(|| format!("virtio-net-pci.{}", self.nics.len()));
        self.next_key += 1;
        self.nics.push(Nic {
            key: self.next_key,
            name,
            qdev_id: spec.id.clone(),
            netdev: Some(spec.netdev.clone()),
            mac,
            slot: spec.slot.unwrap_or(0),
            mq: spec.mq,
            link_down: false,
            worker: None,
            rx_filter: RxFilter::reset(mac),
            rx_notify: true,
        });
    }

    /// A NIC's QOM path as `NIC_RX_FILTER_CHANGED` gives it: its virtio-net device inside the
    /// PCI proxy, `/machine/peripheral/ID/virtio-backend`, or under `peripheral-anon` for a NIC
    /// without `id=` (numbered among the anonymous NICs).
    fn qom_path(&self, i: usize) -> String {
        match &self.nics[i].qdev_id {
            Some(id) => format!("/machine/peripheral/{id}/virtio-backend"),
            None => {
                let n = self.nics[..i]
                    .iter()
                    .filter(|n| n.qdev_id.is_none())
                    .count();
                format!("/machine/peripheral-anon/device[{n}]/virtio-backend")
            }
        }
    }

    /// The machine worker reports NIC `id`'s new rx filter. Returns the `NIC_RX_FILTER_CHANGED`
    /// to emit (`name`, `path`), if one is due: not for a reset, and only once until
    /// `query-rx-filter` re-arms it.
    pub fn on_rx_filter(
        &mut self,
        id: &str,
        filter: RxFilter,
        reset: bool,
    ) -> Option<(Option<String>, String)> {
        let Some(i) = self.nics.iter().position(|n| n.name == id) else {
            log::warn!("rx filter of an unknown NIC {id}");
            return None;
        };
        log::debug!("{id}: rx filter {filter:?}");
        let nic = &mut self.nics[i];
        nic.rx_filter = filter;
        if reset || !nic.rx_notify {
            return None;
        }
        nic.rx_notify = false;
        let name = nic.qdev_id.clone();
        Some((name, self.qom_path(i)))
    }

    /// The NICs' PCI slots.
    pub fn slots(&self) -> Vec<u8> {
        self.nics.iter().map(|n| n.slot).collect()
    }

    fn netdev(&self, id: &str) -> Option<&Netdev> {
        self.netdevs.iter().find(|d| d.id == id)
    }

    /// The virtio device of `nic` on a netdev with `queues` queues.
    fn device(nic: &Nic, queues: usize) -> VirtioDevice {
        let pairs = u16::try_from(nic_pairs(nic.mq, queues)).unwrap_or(1);
        VirtioDevice {
            id: nic.name.clone(),
            kind: VirtioKind::Net {
                mac: nic.mac,
                link_up: !nic.link_down,
            },
            slot: nic.slot,
            num_queues: NET_QUEUES * pairs,
            queue_size: QUEUE_SIZE,
        }
    }

    /// Starts one netd per NIC (stopping those of the previous machine worker): the devices
    /// for vcpu-proc's `Setup`, each with its vhost-user socket. A NIC whose netdev was deleted
    /// is left out (it has no back end).
    pub async fn start(
        &mut self,
        mem_bytes: u64,
    ) -> Result<Vec<(VirtioDevice, OwnedFd)>, NicsError> {
        self.stop_all();
        self.generation += 1;
        let mut out = Vec::new();
        for i in 0..self.nics.len() {
            if self.nics[i].netdev.is_none() {
                log::warn!(
                    "{}: its netdev was deleted; the NIC is left out of this machine",
                    self.nics[i].name
                );
                continue;
            }
            out.push(self.start_one(i, mem_bytes).await?);
        }
        Ok(out)
    }

    async fn start_one(
        &mut self,
        i: usize,
        mem_bytes: u64,
    ) -> Result<(VirtioDevice, OwnedFd), NicsError> {
        // A new machine worker starts the device from reset.
        self.nics[i].rx_filter = RxFilter::reset(self.nics[i].mac);
        let nic = &self.nics[i];
        let name = nic.name.clone();
        let nd_id = nic.netdev.clone().unwrap_or_default();
        let Some(nd) = self.netdev(&nd_id) else {
            return Err(NicsError::Tap {
                id: nd_id,
                reason: "no such netdev".into(),
            });
        };
        // netd serves every queue of the tap (one pair each), also those a NIC without mq=on
        // never enables: it detaches their tap queues, so the kernel steers no frame there.
        let taps = nd
            .taps
            .iter()
            .map(|t| dup(t.as_fd()))
            .collect::<std::io::Result<Vec<OwnedFd>>>()
            .map_err(|e| NicsError::Tap {
                id: nd_id.clone(),
                reason: format!("dup: {e}"),
            })?;
        let queues = taps.len();
        let netd_queues = NET_QUEUES * u16::try_from(queues).unwrap_or(1);
        let setup = NetSetup {
            id: name.clone(),
            mac: nic.mac,
            num_queues: netd_queues,
            link_up: !(nic.link_down || nd.link_down),
        };
        let device = Self::device(nic, queues);
        let path = self.netd_path.clone().ok_or(NicsError::NoNetd)?;
        let (front, back) =
            UnixStream::pair().map_err(|e| NicsError::Socket(name.clone(), e.to_string()))?;
        let (mine, theirs) = bulkhead_ipc::channel::seqpacket_pair()
            .map_err(|e| NicsError::Socket(name.clone(), e.to_string()))?;
        let params = bulkhead_sandbox::Params {
            // Old and new memory tables may be mapped at once.
            mem_bytes: mem_bytes.saturating_mul(2),
            vcpus: 1,
            queues: u32::from(netd_queues),
        };
        // netd may not write a regular file (RLIMIT_FSIZE 0), which the monitor's stderr often
        // is: its stdout and stderr are a socket the monitor copies to its own stderr.
        let (log_rx, log_tx) =
            pipe().map_err(|e| NicsError::Socket(name.clone(), e.to_string()))?;
        let mut child = worker::spawn_role_with_log(
            bulkhead_sandbox::Role::Netd,
            &path,
            theirs,
            Some(log_tx),
            &self.sandbox,
            params,
        )?;
        tokio::task::spawn_blocking(move || relay_log(log_rx));
        let pid = child.id();
        log::info!("started {} (pid {pid}) for {name}", path.display());
        let fail = |reason: String| NicsError::Start {
            nic: name.clone(),
            pid,
            reason,
        };
        let chan = AsyncChannel::<NetProtocol>::from_fd(mine).map_err(|e| fail(e.to_string()))?;
        match tokio::time::timeout(
            START_TIMEOUT,
            chan.handshake(IpcRole::Monitor, IpcRole::Net),
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
        let mut fds: Vec<BorrowedFd<'_>> = taps.iter().map(|t| t.as_fd()).collect();
        fds.push(back.as_fd());
        let r = tokio::time::timeout(START_TIMEOUT, rpc.call(NetRequest::Setup(setup), &fds)).await;
        drop(fds);
        drop(back);
        drop(taps);
        match r {
            Ok(Ok((NetReply::Ok, _))) => {}
            Ok(Ok((NetReply::Error(e), _))) => return Err(fail(e)),
            Ok(Ok((other, _))) => return Err(fail(format!("unexpected reply {other:?}"))),
            Ok(Err(e)) => return Err(fail(e.to_string())),
            Err(_) => return Err(fail("no setup reply within 10 s".into())),
        }
        {
            let name = name.clone();
            tokio::spawn(async move {
                while let Some(Ok((ev, _))) = events.recv().await {
                    log::debug!("bulkhead-netd for {name}: {ev:?}");
                }
            });
        }
        let (kill_tx, kill_rx) = oneshot::channel();
        let exits = self.exits_tx.clone();
        let key = self.nics[i].key;
        tokio::spawn(supervise(child, kill_rx, exits, key, self.generation, pid));
        self.nics[i].worker = Some(Netd {
            rpc,
            pid,
            _kill: kill_tx,
            sandbox: None,
        });
        Ok((device, front.into()))
    }

    /// Kills every running netd (their supervisors reap them).
    pub fn stop_all(&mut self) {
        for n in &mut self.nics {
            n.worker = None;
        }
    }

    /// Asks every netd to quit (the monitor is exiting).
    pub async fn quit_all(&mut self) {
        for n in &mut self.nics {
            if let Some(w) = n.worker.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), w.rpc.call(NetRequest::Quit, &[]))
                        .await;
            }
        }
    }

    /// The next netd exit (pending forever when none comes).
    pub async fn next_exit(&mut self) -> NetdExit {
        match self.exits_rx.recv().await {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }

    /// Handles a netd exit: forgets the worker if it is the current one; returns the NIC's
    /// name and whether the exit is an unexpected death to report.
    pub fn on_exit(&mut self, e: &NetdExit) -> (String, bool) {
        let Some(nic) = self.nics.iter_mut().find(|n| n.key == e.key) else {
            return (String::new(), false);
        };
        let current =
            e.generation == self.generation && nic.worker.as_ref().is_some_and(|w| w.pid == e.pid);
        if current {
            nic.worker = None;
        }
        (
            nic.name.clone(),
            current && !e.status.is_some_and(|s| s.success()),
        )
    }

    /// The running netds: (NIC name, pid).
    pub fn running(&self) -> Vec<(String, u32)> {
        self.nics
            .iter()
            .filter_map(|n| n.worker.as_ref().map(|w| (n.name.clone(), w.pid)))
            .collect()
    }

    /// A netd's sandbox report (asked once, then kept).
    pub async fn sandbox_report(&mut self, nic: &str) -> Result<SandboxReport, String> {
        let Some(w) = self
            .nics
            .iter_mut()
            .find(|n| n.name == nic)
            .and_then(|n| n.worker.as_mut())
        else {
            return Err("not running".into());
        };
        if let Some(r) = &w.sandbox {
            return Ok(r.clone());
        }
        match call(&w.rpc, NetRequest::QuerySandbox).await? {
            NetReply::Sandbox(r) => {
                w.sandbox = Some(r.clone());
                Ok(r)
            }
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    /// A NIC's netd counters (`None`: no netd runs for it).
    pub async fn stats(&self, nic: &str) -> Option<NetStats> {
        let w = self.nics.iter().find(|n| n.name == nic)?.worker.as_ref()?;
        match call(&w.rpc, NetRequest::QueryStats).await {
            Ok(NetReply::Stats(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether `id` is a NIC's device id.
    pub fn has_device(&self, id: &str) -> bool {
        self.nics.iter().any(|n| n.qdev_id.as_deref() == Some(id))
    }

    /// Executes a QMP request.
    pub async fn handle(
        &mut self,
        op: NetOp,
        mut vcpu: VcpuCtx<'_>,
    ) -> Result<NetAnswer, QmpError> {
        match op {
            NetOp::NetdevAdd(n) => self.netdev_add(n).map(|_| NetAnswer::Done),
            NetOp::NetdevDel(id) => self.netdev_del(&id, &vcpu).await.map(|_| NetAnswer::Done),
            NetOp::DeviceAdd(pairs) => self
                .device_add(&pairs, &vcpu)
                .await
                .map(|_| NetAnswer::Done),
            NetOp::DeviceDel(id) => self
                .device_del(&id, &mut vcpu)
                .await
                .map(|_| NetAnswer::Done),
            NetOp::SetLink { name, up } => self
                .set_link(&name, up, &vcpu)
                .await
                .map(|_| NetAnswer::Done),
            NetOp::QueryRxFilter(name) => self.query_rx_filter(name.as_deref()),
            NetOp::InfoNetwork => Ok(NetAnswer::Text(self.info_network())),
        }
    }

    fn netdev_add(&mut self, n: NewNetdev) -> Result<(), QmpError> {
        if self.netdevs.iter().any(|d| d.id == n.id) {
            return Err(QmpError::generic(format!("Duplicate ID '{}'", n.id)));
        }
        let (taps, info): (Vec<OwnedFd>, Vec<String>) = match n.tap {
            Ok(queues) => {
                for (fd, _) in &queues {
                    if !looks_like_tun(fd.as_fd()) {
                        return Err(QmpError::generic(format!(
                            "netdev {}: the file descriptor is not a tap (/dev/net/tun)",
                            n.id
                        )));
                    }
                }
                // TUNGETIFF is in the confined monitor's allowlist: checked before and after.
                let b: Vec<BorrowedFd<'_>> = queues.iter().map(|(f, _)| f.as_fd()).collect();
                check_taps(&b).map_err(QmpError::generic)?;
                queues.into_iter().unzip()
            }
            Err((ifname, queues)) => {
                if CONFINED.load(Ordering::SeqCst) {
                    return Err(QmpError::generic(format!(
                        "netdev_add ifname={ifname}: the monitor cannot open /dev/net/tun once \
                         it has confined itself (its sandbox allows no new host files); open \
                         the tap yourself and pass it with getfd and fd=NAME, or name it with \
                         -netdev on the command line"
                    )));
                }
                let mut taps = Vec::new();
                for _ in 0..queues {
                    taps.push(open_tap(&ifname, queues > 1).map_err(|e| {
                        QmpError::generic(format!("could not open tap {ifname}: {e}"))
                    })?);
                }
                let info = vec![format!("ifname={ifname},script=no,downscript=no"); queues];
                (taps, info)
            }
        };
        log::info!("netdev {} added ({})", n.id, info.join(" "));
        self.next_key += 1;
        self.netdevs.push(Netdev {
            seq: self.next_key,
            id: n.id,
            taps,
            info,
            link_down: false,
        });
        Ok(())
    }

    async fn netdev_del(&mut self, id: &str, vcpu: &VcpuCtx<'_>) -> Result<(), QmpError> {
        // As QEMU 7.2: a NIC's name is not found either.
        let Some(at) = self.netdevs.iter().position(|d| d.id == id) else {
            return Err(not_found(id));
        };
        self.netdevs.remove(at);
        // As QEMU: a NIC on it loses its peer, and its link goes down.
        if let Some(i) = self
            .nics
            .iter()
            .position(|n| n.netdev.as_deref() == Some(id))
        {
            self.nics[i].netdev = None;
            self.nics[i].link_down = true;
            self.apply_link(i, vcpu).await?;
        }
        log::info!("netdev {id} deleted");
        Ok(())
    }

    async fn device_add(
        &mut self,
        pairs: &[(String, String)],
        vcpu: &VcpuCtx<'_>,
    ) -> Result<(), QmpError> {
        if !vcpu.guest {
            return Err(QmpError::generic(
                "No 'PCI' bus found for device 'virtio-net-pci'",
            ));
        }
        let mut spec = nic_from_pairs(pairs, &|r| r).map_err(QmpError::generic)?;
        if let Some(id) = &spec.id {
            if vcpu.block_ids.contains(id) || self.nics.iter().any(|n| n.name == *id) {
                return Err(QmpError::generic(format!("Duplicate device ID '{id}'")));
            }
        }
        let Some(nd) = self.netdev(&spec.netdev) else {
            return Err(QmpError::generic(format!(
                "Property 'virtio-net-pci.netdev' can't find value '{}'",
                spec.netdev
            )));
        };
        check_vectors(&spec, nd.taps.len()).map_err(QmpError::generic)?;
        if self
            .nics
            .iter()
            .any(|n| n.netdev.as_deref() == Some(spec.netdev.as_str()))
        {
            // QEMU 7.2 names the property of the virtio-net-pci's inner device.
            return Err(QmpError::generic(format!(
                "Property 'virtio-net-device.netdev' can't take value '{}', it's in use",
                spec.netdev
            )));
        }
        let mut used: std::collections::BTreeSet<u8> = vcpu.block_slots.iter().copied().collect();
        used.extend(self.slots());
        match spec.slot {
            Some(s) if used.contains(&s) => {
                return Err(QmpError::generic(format!(
                    "PCI: slot {s} function 0 not available for virtio-net-pci, in use by \
                     another device"
                )))
            }
            Some(_) => {}
            None => {
                spec.slot = Some(free_slot(&used).ok_or_else(|| {
                    QmpError::generic("PCI: no slot available for virtio-net-pci")
                })?)
            }
        }
        if self.netd_path.is_none() {
            return Err(QmpError::generic(NicsError::NoNetd.to_string()));
        }
        self.add_nic(&spec);
        let i = self.nics.len() - 1;
        let Some(rpc) = vcpu.rpc else {
            // No machine worker now: the NIC is plugged when the next one starts.
            return Ok(());
        };
        let (dev, sock) = match self.start_one(i, vcpu.mem_bytes).await {
            Ok(v) => v,
            Err(e) => {
                self.nics.pop();
                return Err(QmpError::generic(e.to_string()));
            }
        };
        if let Err(e) = hotplug::plug(rpc, &dev, &sock).await {
            // Dropping the NIC kills the netd just started.
            self.nics.pop();
            return Err(QmpError::generic(format!(
                "plugging virtio-net-pci into the machine: {e}"
            )));
        }
        log::info!(
            "{}: virtio-net-pci {}",
            self.nics[i].name,
            if vcpu.ran { "hot-plugged" } else { "added" }
        );
        Ok(())
    }

    /// `device_del` of a NIC: at once before the guest first runs (or with no machine worker);
    /// after, the guest is asked to eject it and [`Nics::finish_unplug`] removes it when the
    /// guest has.
    async fn device_del(&mut self, id: &str, vcpu: &mut VcpuCtx<'_>) -> Result<(), QmpError> {
        let Some(i) = self
            .nics
            .iter()
            .position(|n| n.qdev_id.as_deref() == Some(id))
        else {
            if vcpu.block_ids.iter().any(|b| b == id) {
                return Err(QmpError::generic(format!(
                    "device_del {id}: bulkhead cannot remove this block device"
                )));
            }
            return Err(not_found(id));
        };
        let name = self.nics[i].name.clone();
        if vcpu.unplugs.is_pending(&name) {
            return Err(QmpError::generic(hotplug::already_unplugging(id)));
        }
        if let (Some(rpc), Some(_)) = (vcpu.rpc, self.nics[i].worker.as_ref()) {
            hotplug::unplug(rpc, &name)
                .await
                .map_err(|e| QmpError::generic(format!("unplugging {id} from the machine: {e}")))?;
            if vcpu.ran {
                vcpu.unplugs.begin(&name);
                log::info!("{id}: the guest is asked to eject the virtio-net-pci");
                return Ok(());
            }
        }
        // With no netd (no machine worker, or its netdev deleted) the machine worker does not
        // have the device either.
        for ev in self.remove_now(i).await {
            vcpu.bus.emit(&ev);
        }
        Ok(())
    }

    /// The guest ejected the NIC the machine worker knows as `name` (or a reset carried out its
    /// pending unplug): it goes now, its netd quits and its netdev is free again (QEMU keeps
    /// the netdev). Returns its `DEVICE_DELETED` events, or `None` when no NIC has that name.
    pub async fn finish_unplug(&mut self, name: &str) -> Option<Vec<crate::qmp::events::Event>> {
        let i = self.nics.iter().position(|n| n.name == name)?;
        Some(self.remove_now(i).await)
    }

    async fn remove_now(&mut self, i: usize) -> Vec<crate::qmp::events::Event> {
        let nic = self.nics.remove(i);
        if let Some(w) = nic.worker {
            let _ = tokio::time::timeout(Duration::from_secs(2), w.rpc.call(NetRequest::Quit, &[]))
                .await;
        }
        log::info!("{}: virtio-net-pci removed", nic.name);
        let path = match &nic.qdev_id {
            Some(id) => format!("/machine/peripheral/{id}"),
            None => format!("/machine/peripheral-anon/{}", nic.name),
        };
        hotplug::deleted_events(nic.qdev_id.as_deref(), &path)
    }

    async fn set_link(&mut self, name: &str, up: bool, vcpu: &VcpuCtx<'_>) -> Result<(), QmpError> {
        let i = if let Some(i) = self.nics.iter().position(|n| n.name == name) {
            self.nics[i].link_down = !up;
            i
        } else if let Some(d) = self.netdevs.iter_mut().find(|d| d.id == name) {
            d.link_down = !up;
            match self
                .nics
                .iter()
                .position(|n| n.netdev.as_deref() == Some(name))
            {
                Some(i) => {
                    // QEMU sets the peer NIC's link too.
                    self.nics[i].link_down = !up;
                    i
                }
                None => return Ok(()),
            }
        } else {
            return Err(not_found(name));
        };
        self.apply_link(i, vcpu).await
    }

    /// Tells vcpu-proc (the guest's link bit) and netd (the frames) NIC `i`'s link state.
    async fn apply_link(&mut self, i: usize, vcpu: &VcpuCtx<'_>) -> Result<(), QmpError> {
        let nic = &self.nics[i];
        let netdev_down = nic
            .netdev
            .as_deref()
            .and_then(|d| self.netdev(d))
            .is_none_or(|d| d.link_down);
        let Some(w) = nic.worker.as_ref() else {
            // Applied when its netd and the machine start.
            return Ok(());
        };
        let flows = !(nic.link_down || netdev_down);
        match call(&w.rpc, NetRequest::SetLink { up: flows }).await {
            Ok(NetReply::Ok) => {}
            Ok(other) => {
                return Err(QmpError::generic(format!(
                    "bulkhead-netd answered SetLink with {other:?}"
                )))
            }
            Err(e) => return Err(QmpError::generic(e)),
        }
        // netd's own counters say which state it applies now.
        let applied = match call(&w.rpc, NetRequest::QueryStats).await {
            Ok(NetReply::Stats(st)) => st.link_up,
            Ok(other) => {
                return Err(QmpError::generic(format!(
                    "bulkhead-netd answered QueryStats with {other:?}"
                )))
            }
            Err(e) => return Err(QmpError::generic(e)),
        };
        if applied != flows {
            return Err(QmpError::generic(format!(
                "bulkhead-netd for {} did not apply the link state",
                nic.name
            )));
        }
        if let Some(rpc) = vcpu.rpc {
            let req = VcpuRequest::SetLink {
                id: nic.name.clone(),
                up: !nic.link_down,
            };
            match tokio::time::timeout(CALL_TIMEOUT, rpc.call(req, &[])).await {
                Ok(Ok((VcpuReply::Ok, _))) => {}
                Ok(Ok((other, _))) => {
                    return Err(QmpError::generic(format!(
                        "the vCPU worker answered SetLink with {other:?}"
                    )))
                }
                Ok(Err(e)) => {
                    return Err(QmpError::generic(format!("the vCPU worker is gone: {e}")))
                }
                Err(_) => return Err(QmpError::generic("the vCPU worker did not answer")),
            }
        }
        log::info!(
            "{}: link {} for the guest; bulkhead-netd (pid {}) reports link_up={applied}",
            nic.name,
            if nic.link_down { "down" } else { "up" },
            w.pid
        );
        Ok(())
    }

    fn query_rx_filter(&mut self, name: Option<&str>) -> Result<NetAnswer, QmpError> {
        if let Some(name) = name {
            if self.netdevs.iter().any(|d| d.id == name) {
                return Err(QmpError::generic(format!("net client({name}) isn't a NIC")));
            }
            if !self.nics.iter().any(|n| n.name == name) {
                return Err(QmpError::generic(format!(
                    "invalid net client name: {name}"
                )));
            }
        }
        let mut list = Vec::new();
        for n in self
            .nics
            .iter_mut()
            .filter(|n| name.is_none_or(|x| x == n.name))
        {
            list.push(rx_filter(&n.name, &n.rx_filter));
            // As QEMU: reporting a NIC's filter re-arms its NIC_RX_FILTER_CHANGED.
            n.rx_notify = true;
        }
        Ok(NetAnswer::Value(Value::Array(list)))
    }

    /// HMP `info network`, as QEMU 7.2 prints it: each NIC with its netdev below, then every
    /// netdev without a NIC.
    pub fn info_network(&self) -> String {
        // QEMU walks its clients in creation order: a NIC prints itself and its netdev, a
        // netdev with a NIC is skipped (printed with it), one without is printed alone.
        let mut entries: Vec<(u64, String)> = Vec::new();
        // A NIC on a netdev with N queues is N clients (queue_index 0..N), the first with the
        // model and MAC, each followed by the netdev's queue of the same index.
        for n in &self.nics {
            let d = n.netdev.as_deref().and_then(|d| self.netdev(d));
            let queues = d.map_or(1, |d| d.taps.len().max(1));
            let mut text = String::new();
            for q in 0..queues {
                if q == 0 {
                    text.push_str(&format!(
                        "{}: index=0,type=nic,model=virtio-net-pci,macaddr={}\n",
                        n.name,
                        // The guest's current MAC, as QEMU's qemu_format_nic_info_str after
                        // VIRTIO_NET_CTRL_MAC_ADDR_SET.
                        mac_string(&n.rx_filter.mac)
                    ));
                } else {
                    text.push_str(&format!("{}: index={q},type=nic,\n", n.name));
                }
                if let Some(d) = d {
                    let info = d.info.get(q).map_or("", String::as_str);
                    text.push_str(&format!(" \\ {}: index={q},type=tap,{info}\n", d.id));
                }
            }
            entries.push((n.key, text));
        }
        for d in &self.netdevs {
            if !self
                .nics
                .iter()
                .any(|n| n.netdev.as_deref() == Some(d.id.as_str()))
            {
                let text: String = d
                    .info
                    .iter()
                    .enumerate()
                    .map(|(q, info)| format!("{}: index={q},type=tap,{info}\n", d.id))
                    .collect();
                entries.push((d.seq, text));
            }
        }
        entries.sort_by_key(|(seq, _)| *seq);
        entries.into_iter().map(|(_, t)| t).collect()
    }
}

/// QEMU 7.2's `RxFilterInfo` (`virtio_net_query_rxfilter`) for a virtio-net device's filter:
/// `unicast`/`multicast` are `none` (NOUNI/NOMULTI), `all` (ALLUNI/ALLMULTI) or `normal`; the
/// MAC tables list the guest's addresses last first and the VLAN table its VLAN ids from high
/// to low, as QEMU builds its lists. Without `VIRTIO_NET_F_CTRL_VLAN` every VLAN passes
/// (`vlan` `all`, the table 4095 down to 0); with it, `none` while the table is empty.
/// `broadcast-allowed` is QEMU's `nobcast` flag (QEMU reports it inverted, and a client
/// comparing with QEMU sees the same value).
fn rx_filter(name: &str, f: &RxFilter) -> Value {
    let mode = |none: bool, all: bool| match (none, all) {
        (true, _) => "none",
        (false, true) => "all",
        (false, false) => "normal",
    };
    let macs = |l: &[[u8; 6]]| l.iter().rev().map(mac_string).collect::<Vec<_>>();
    let (vlan, vlans): (&str, Vec<u32>) = if !f.vlan_filtering {
        ("all", (0..4096u32).rev().collect())
    } else if f.vlans.is_empty() {
        ("none", Vec::new())
    } else {
        (
            "normal",
            f.vlans.iter().rev().map(|v| u32::from(*v)).collect(),
        )
    };
    crate::qmp::qdict::object([
        ("name", json!(name)),
        ("promiscuous", json!(f.promisc)),
        ("multicast", json!(mode(f.nomulti, f.allmulti))),
        ("unicast", json!(mode(f.nouni, f.alluni))),
        ("vlan", json!(vlan)),
        ("broadcast-allowed", json!(f.nobcast)),
        ("multicast-overflow", json!(f.multicast_overflow)),
        ("unicast-overflow", json!(f.unicast_overflow)),
        ("main-mac", json!(mac_string(&f.mac))),
        ("vlan-table", json!(vlans)),
        ("unicast-table", json!(macs(&f.unicast))),
        ("multicast-table", json!(macs(&f.multicast))),
    ])
}

async fn call(rpc: &RpcClient<NetProtocol>, req: NetRequest) -> Result<NetReply, String> {
    match tokio::time::timeout(CALL_TIMEOUT, rpc.call(req, &[])).await {
        Ok(Ok((NetReply::Error(e), _))) => Err(e),
        Ok(Ok((r, _))) => Ok(r),
        Ok(Err(e)) => Err(format!("bulkhead-netd is gone: {e}")),
        Err(_) => Err("bulkhead-netd did not answer".into()),
    }
}

async fn supervise(
    mut child: worker::WorkerProcess,
    kill: oneshot::Receiver<()>,
    exits: mpsc::UnboundedSender<NetdExit>,
    key: u64,
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
    let _ = exits.send(NetdExit {
        key,
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

    fn args(items: &[(NetOpt, &str)]) -> NetArgs {
        NetArgs {
            items: items.iter().map(|(o, s)| (*o, s.to_string())).collect(),
        }
    }

    fn err(items: &[(NetOpt, &str)]) -> String {
        resolve(&args(items), &[], &[])
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn qemu_spellings_resolve() {
        use NetOpt::*;
        let cfg = resolve(
            &args(&[
                (
                    Device,
                    "virtio-net-pci,netdev=n1,id=nic1,mac=02:00:00:00:00:07,addr=0x4",
                ),
                (Netdev, "tap,id=n0,fd=7"),
                (
                    Netdev,
                    "tap,id=n1,ifname=tap9,script=no,downscript=no,vhost=off",
                ),
                (Device, "virtio-net-pci,netdev=n0"),
            ]),
            &[1],
            &["vd0".into()],
        )
        .expect("resolves");
        assert_eq!(cfg.netdevs[0].source, TapSource::Fd(7));
        assert_eq!(cfg.netdevs[1].source, TapSource::Ifname("tap9".into(), 1));
        assert_eq!(cfg.nics[0].mac, Some([2, 0, 0, 0, 0, 7]));
        assert_eq!(cfg.nics[0].slot, Some(4));
        assert_eq!(cfg.nics[1].slot, Some(2));
        assert_eq!(cfg.nics[1].mac, None);
        let nic = resolve(
            &args(&[(Nic, "tap,fd=5,model=virtio-net-pci,mac=52:54:00:00:00:01")]),
            &[],
            &[],
        )
        .expect("nic");
        assert_eq!(nic.netdevs[0].id, "__org.qemu.nic0");
        assert_eq!(nic.nics[0].netdev, "__org.qemu.nic0");
        assert!(is_net_device("virtio-net-pci,netdev=x"));
        assert!(is_net_device("driver=virtio-net,netdev=x"));
        assert!(!is_net_device("virtio-blk-pci,drive=x"));
    }

    #[test]
    fn multiqueue_spellings_resolve_with_qemu_s_rules() {
        use NetOpt::*;
        let cfg = resolve(
            &args(&[
                (Netdev, "tap,id=a,fds=7:8"),
                (
                    Netdev,
                    "tap,id=b,ifname=mq0,queues=4,script=no,downscript=no",
                ),
                (Device, "virtio-net-pci,netdev=a,mq=on,vectors=6"),
                (Device, "virtio-net-pci,netdev=b,mq=off"),
            ]),
            &[],
            &[],
        )
        .expect("resolves");
        assert_eq!(
            cfg.netdevs[0].source,
            TapSource::Fds(vec!["7".into(), "8".into()])
        );
        assert_eq!(cfg.netdevs[1].source, TapSource::Ifname("mq0".into(), 4));
        assert!(cfg.nics[0].mq && !cfg.nics[1].mq);
        assert_eq!(nic_pairs(true, 2), 2);
        assert_eq!(nic_pairs(false, 4), 1);
        // QEMU 7.2's texts.
        assert!(err(&[(Netdev, "tap,id=t,fd=3,fds=4:5")])
            .contains("queues=, fds=, and vhostfds= are invalid with fd="));
        for bad in [
            "tap,id=t,fds=4:5,queues=2",
            "tap,id=t,fds=4:5,ifname=x",
            "tap,id=t,fds=4,script=no",
        ] {
            assert!(
                err(&[(Netdev, bad)])
                    .contains("helper=, queues=, and vhostfd= are invalid with fds="),
                "{bad}"
            );
        }
        assert!(err(&[(Netdev, "tap,id=t,fds=4:abc")]).contains("'abc' is not an fd number"));
        assert!(err(&[(Netdev, "tap,id=t,fds=4::5")]).contains("empty fd"));
        assert!(err(&[(Netdev, "tap,id=t,fds=3:4:5:6:7:8:9:10:11")]).contains("at most 8"));
        assert!(
            err(&[(Netdev, "tap,id=t,ifname=x,queues=0,script=no,downscript=no")])
                .contains("1 to 8")
        );
        assert!(
            err(&[(Netdev, "tap,id=t,ifname=x,queues=z,script=no,downscript=no")])
                .contains("expects uint32_t")
        );
        assert!(err(&[
            (Netdev, "tap,id=t,fds=4:5"),
            (Device, "virtio-net-pci,netdev=t,mq=on,vectors=4")
        ])
        .contains("vectors=6"));
        assert!(err(&[
            (Netdev, "tap,id=t,fds=4:5"),
            (Device, "virtio-net-pci,netdev=t,mq=maybe")
        ])
        .contains("'mq' expects 'on' or 'off'"));
    }

    #[test]
    fn unsupported_forms_are_refused_naming_the_key() {
        use NetOpt::*;
        assert!(err(&[(Netdev, "user,id=u")]).contains("network backend 'user'"));
        assert!(err(&[(Netdev, "tap,id=t,fd=3,vhost=on")]).contains("vhost=on"));
        assert!(err(&[(Netdev, "tap,id=t,fd=3,queues=2")]).contains("queues=, fds=, and"));
        assert!(err(&[(Netdev, "tap,id=t,fd=3,bogus=1")]).contains("'bogus'"));
        assert!(err(&[(Netdev, "tap,id=t,ifname=x")]).contains("script=no"));
        assert!(err(&[(Netdev, "tap,id=t")]).contains("fd=N"));
        assert!(err(&[(Netdev, "tap,fd=3")]).contains("'id' is missing"));
        assert!(err(&[(Netdev, "tap,id=t,fd=3,ifname=x")]).contains("invalid with fd="));
        assert!(err(&[(Device, "virtio-net-pci")]).contains("netdev="));
        assert!(err(&[(Device, "virtio-net-pci,netdev=zz")]).contains("can't find value 'zz'"));
        assert!(err(&[
            (Netdev, "tap,id=t,fd=3"),
            (Device, "virtio-net-pci,netdev=t,mac=01:00:00:00:00:01")
        ])
        .contains("multicast"));
        assert!(err(&[
            (Netdev, "tap,id=t,fd=3"),
            (Device, "virtio-net-pci,netdev=t,mac=zz")
        ])
        .contains("virtio-net-pci.mac"));
        assert!(err(&[
            (Netdev, "tap,id=t,fd=3"),
            (Device, "virtio-net-pci,netdev=t"),
            (Device, "virtio-net-pci,netdev=t")
        ])
        .contains("in use"));
        assert!(
            err(&[(Netdev, "tap,id=t,fd=3"), (Netdev, "tap,id=t,fd=4")]).contains("Duplicate ID")
        );
        assert!(err(&[(Nic, "user")]).contains("model"));
        let e = resolve(
            &args(&[
                (Netdev, "tap,id=t,fd=3"),
                (Device, "virtio-net-pci,netdev=t,addr=3"),
            ]),
            &[3],
            &[],
        )
        .expect_err("slot");
        assert!(e.to_string().contains("slot 3"), "{e}");
    }

    #[test]
    fn default_macs_count_from_56_skipping_used_ones() {
        let a = default_mac(std::iter::empty());
        assert_eq!(mac_string(&a), "52:54:00:12:34:56");
        let b = default_mac([a].iter());
        assert_eq!(mac_string(&b), "52:54:00:12:34:57");
        let other = [2, 0, 0, 0, 0, 0x57];
        assert_eq!(default_mac([a, other].iter()), b);
        assert_eq!(parse_mac("52-54-00-12-34-56"), Some(a));
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:567"), None);
    }

    #[test]
    fn a_programmed_filter_reads_as_qemu_s_and_the_event_waits_for_a_query() {
        let mut n = Nics::empty();
        let spec = |id: Option<&str>| NicSpec {
            id: id.map(str::to_string),
            netdev: "n".into(),
            mac: None,
            slot: Some(3),
            mq: false,
            vectors: None,
        };
        n.add_nic(&spec(Some("nic0")));
        n.add_nic(&spec(None));
        let mut f = RxFilter::reset(n.nics[0].mac);
        f.promisc = false;
        f.nouni = true;
        f.allmulti = true;
        f.nobcast = true;
        f.mac = [2, 0, 0, 0, 0, 0x77];
        f.unicast = vec![[2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]];
        f.multicast = vec![[1, 0, 0x5e, 0, 0, 1]];
        f.vlan_filtering = true;
        f.vlans = vec![5, 100];
        let path = "/machine/peripheral/nic0/virtio-backend".to_string();
        assert_eq!(
            n.on_rx_filter("nic0", f.clone(), false),
            Some((Some("nic0".into()), path.clone()))
        );
        // Not again until a query; never for a reset.
        assert_eq!(n.on_rx_filter("nic0", f.clone(), false), None);
        let v = match n.query_rx_filter(Some("nic0")) {
            Ok(NetAnswer::Value(v)) => v,
            _ => panic!("query"),
        };
        assert_eq!(v[0]["promiscuous"], false);
        assert_eq!(v[0]["unicast"], "none");
        assert_eq!(v[0]["multicast"], "all");
        assert_eq!(v[0]["broadcast-allowed"], true);
        assert_eq!(v[0]["main-mac"], "02:00:00:00:00:77");
        assert_eq!(
            v[0]["unicast-table"],
            json!(["02:00:00:00:00:02", "02:00:00:00:00:01"])
        );
        assert_eq!(v[0]["multicast-table"], json!(["01:00:5e:00:00:01"]));
        assert_eq!(
            (&v[0]["vlan"], &v[0]["vlan-table"]),
            (&json!("normal"), &json!([100, 5]))
        );
        assert!(n.info_network().contains("macaddr=02:00:00:00:00:77"));
        assert_eq!(n.on_rx_filter("nic0", f.clone(), true), None);
        assert_eq!(
            n.on_rx_filter("nic0", f.clone(), false),
            Some((Some("nic0".into()), path))
        );
        // A NIC without id=: no name, an anonymous path; an unknown id: nothing.
        let anon = n.on_rx_filter("virtio-net-pci.1", f.clone(), false);
        assert_eq!(
            anon,
            Some((
                None,
                "/machine/peripheral-anon/device[0]/virtio-backend".to_string()
            ))
        );
        assert_eq!(n.on_rx_filter("nope", f, false), None);
        let mut empty = RxFilter::reset([2, 0, 0, 0, 0, 1]);
        empty.vlan_filtering = true;
        assert_eq!(rx_filter("x", &empty)["vlan"], "none");
    }

    #[test]
    fn rx_filter_has_qemu_s_members_in_order() {
        let v = rx_filter("nic0", &RxFilter::reset([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        // As QEMU 7.2 sends it (Debian's, -M q35 -S with a tap and a virtio-net-pci).
        assert_eq!(
            keys,
            [
                "promiscuous",
                "name",
                "main-mac",
                "unicast",
                "vlan",
                "vlan-table",
                "unicast-table",
                "multicast",
                "multicast-overflow",
                "unicast-overflow",
                "multicast-table",
                "broadcast-allowed"
            ]
        );
        assert_eq!(v["main-mac"], "52:54:00:12:34:56");
        let vlans = v["vlan-table"].as_array().expect("vlans");
        assert_eq!(
            (vlans.len(), &vlans[0], &vlans[4095]),
            (4096, &json!(4095), &json!(0))
        );
    }
}
