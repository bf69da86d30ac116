//! Block commands: `query-block`, `query-named-block-nodes`, `query-blockstats` and
//! `block_resize`, answered in QEMU 7.2's shapes (members in QEMU's order via [`qdict`]);
//! `blockdev-add`, `blockdev-del` (and the 2.8 reference's `x-blockdev-del`), and `device_add` /
//! `device_del` of a `virtio-blk-pci` (reached through the device commands of
//! [`super::net`]), which the VM actor runs on its disks ([`crate::disks::BlockOp`]).
//!
//! The graph, sizes and cache modes come from the monitor ([`crate::disks`]); the counters come
//! from each device's `bulkhead-blockd`, which counts every request where it reaches the image
//! (`BlockRequest::QueryStats`). A raw format node passes every byte to its file node, so the
//! file node (`parent`) reports the same counters. Nodes no running blockd serves report zeros.
//! Fields Bulkhead has no mechanism for yet (I/O throttling, write threshold, `detect-zeroes`,
//! encryption) report QEMU's values for "none".

use serde_json::{Map, Value};

use super::{ArgSpec, ArgType, Command, Context, HandlerFuture, Outcome};
use crate::block::Driver;
use crate::disks::{BlockView, Qcow2Details, ThrottleArgs};
use crate::qmp::protocol::QmpError;
use crate::qmp::qdict;
use bulkhead_ipc::messages::BlockStats;
use bulkhead_ipc::messages::ThrottleLimits;

pub(super) static COMMANDS: &[Command] = &[
    Command {
        name: "query-block",
        args: &[],
        handler: query_block,
    },
    Command {
        name: "query-named-block-nodes",
        args: &[ArgSpec {
            name: "flat",
            ty: ArgType::Bool,
            optional: true,
        }],
        handler: query_named_block_nodes,
    },
    Command {
        name: "query-blockstats",
        args: &[ArgSpec {
            name: "query-nodes",
            ty: ArgType::Bool,
            optional: true,
        }],
        handler: query_blockstats,
    },
    Command {
        name: "block_resize",
        args: &[
            ArgSpec {
                name: "device",
                ty: ArgType::Str,
                optional: true,
            },
            ArgSpec {
                name: "node-name",
                ty: ArgType::Str,
                optional: true,
            },
            ArgSpec {
                name: "size",
                ty: ArgType::Int,
                optional: false,
            },
        ],
        handler: block_resize,
    },
    Command {
        name: "block_set_io_throttle",
        args: THROTTLE_ARGS,
        handler: block_set_io_throttle,
    },
    Command {
        name: "block-set-write-threshold",
        args: &[
            arg("node-name", ArgType::Str, false),
            arg("write-threshold", ArgType::Int, false),
        ],
        handler: block_set_write_threshold,
    },
    Command {
        name: "blockdev-add",
        args: BLOCKDEV_ADD_ARGS,
        handler: blockdev_add,
    },
    Command {
        name: "blockdev-del",
        args: &[ArgSpec {
            name: "node-name",
            ty: ArgType::Str,
            optional: false,
        }],
        handler: blockdev_del,
    },
    Command {
        name: "x-blockdev-del",
        args: &[ArgSpec {
            name: "node-name",
            ty: ArgType::Str,
            optional: false,
        }],
        handler: blockdev_del,
    },
];

const fn arg(name: &'static str, ty: ArgType, optional: bool) -> ArgSpec {
    ArgSpec { name, ty, optional }
}

/// The members of QEMU's `BlockdevOptions` Bulkhead takes (for drivers file, raw and qcow2;
/// [`crate::block`] checks their values as `-blockdev` does).
const BLOCKDEV_ADD_ARGS: &[ArgSpec] = &[
    arg("driver", ArgType::Str, false),
    arg("node-name", ArgType::Str, true),
    arg("filename", ArgType::Str, true),
    arg("file", ArgType::Any, true),
    arg("read-only", ArgType::Bool, true),
    arg("auto-read-only", ArgType::Bool, true),
    arg("cache", ArgType::Object, true),
    arg("discard", ArgType::Str, true),
    arg("aio", ArgType::Str, true),
    arg("detect-zeroes", ArgType::Str, true),
];

fn block_set_write_threshold(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let node = args
            .get("node-name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        // QEMU's uint64: a negative number is refused by the argument check.
        let Some(threshold) = args.get("write-threshold").and_then(Value::as_u64) else {
            return Err(QmpError::generic(
                "Parameter 'write-threshold' expects uint64",
            ));
        };
        ctx.shared
            .vm
            .block(crate::disks::BlockOp::WriteThreshold(node, threshold))
            .await?;
        Ok(Outcome::empty())
    })
}

fn blockdev_add(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let op = crate::disks::BlockOp::BlockdevAdd(Value::Object(args));
        ctx.shared.vm.block(op).await?;
        Ok(Outcome::empty())
    })
}

fn blockdev_del(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let name = args
            .get("node-name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        ctx.shared
            .vm
            .block(crate::disks::BlockOp::BlockdevDel(name))
            .await?;
        Ok(Outcome::empty())
    })
}

/// `device_add` of a `virtio-blk-pci` (`pairs`: the properties as `key=value`).
pub(super) async fn device_add(
    ctx: &Context,
    pairs: Vec<(String, String)>,
) -> Result<Outcome, QmpError> {
    ctx.shared
        .vm
        .block(crate::disks::BlockOp::DeviceAdd(pairs))
        .await?;
    Ok(Outcome::empty())
}

/// `device_del` of a block device; `None` when no block device has the id.
pub(super) async fn device_del(ctx: &Context, id: &str) -> Option<Result<Outcome, QmpError>> {
    match ctx
        .shared
        .vm
        .block(crate::disks::BlockOp::DeviceDel(id.to_string()))
        .await
    {
        Ok(crate::disks::BlockAnswer::NotMine) => None,
        Ok(crate::disks::BlockAnswer::Done) => Some(Ok(Outcome::empty())),
        Err(e) => Some(Err(e)),
    }
}

const fn int_arg(name: &'static str, optional: bool) -> ArgSpec {
    ArgSpec {
        name,
        ty: ArgType::Int,
        optional,
    }
}

/// `block_set_io_throttle`'s arguments: QEMU's `BlockIOThrottle`, member for member.
const THROTTLE_ARGS: &[ArgSpec] = &[
    ArgSpec {
        name: "device",
        ty: ArgType::Str,
        optional: true,
    },
    ArgSpec {
        name: "id",
        ty: ArgType::Str,
        optional: true,
    },
    int_arg("bps", false),
    int_arg("bps_rd", false),
    int_arg("bps_wr", false),
    int_arg("iops", false),
    int_arg("iops_rd", false),
    int_arg("iops_wr", false),
    int_arg("bps_max", true),
    int_arg("bps_rd_max", true),
    int_arg("bps_wr_max", true),
    int_arg("iops_max", true),
    int_arg("iops_rd_max", true),
    int_arg("iops_wr_max", true),
    int_arg("bps_max_length", true),
    int_arg("bps_rd_max_length", true),
    int_arg("bps_wr_max_length", true),
    int_arg("iops_max_length", true),
    int_arg("iops_rd_max_length", true),
    int_arg("iops_wr_max_length", true),
    int_arg("iops_size", true),
    ArgSpec {
        name: "group",
        ty: ArgType::Str,
        optional: true,
    },
];

/// `ImageInfo` of node `i`, with its backing chain (`backing-image`).
fn image_info(v: &BlockView, i: usize) -> Value {
    let n = &v.nodes[i];
    let mut m = vec![
        ("filename", Value::from(n.filename.as_str())),
        ("format", Value::from(n.driver.name())),
        ("dirty-flag", Value::from(false)),
        ("actual-size", Value::from(n.actual_size)),
        ("virtual-size", Value::from(n.virtual_size)),
    ];
    if let Some(q) = &n.qcow2 {
        m.push((
            "cluster-size",
            Value::from(1u64.checked_shl(q.cluster_bits).unwrap_or(0)),
        ));
    }
    if let Some(b) = &n.backing_file {
        m.push(("backing-filename", Value::from(b.as_str())));
    }
    if let Some(b) = &n.full_backing_filename {
        m.push(("full-backing-filename", Value::from(b.as_str())));
    }
    if let Some(f) = n.backing_format {
        m.push(("backing-filename-format", Value::from(f)));
    }
    if let Some(b) = n.backing.as_deref().and_then(|b| pos(v, b)) {
        m.push(("backing-image", image_info(v, b)));
    }
    if let Some(q) = &n.qcow2 {
        m.push(("format-specific", qcow2_specific(q)));
    }
    qdict::object(m)
}

/// `ImageInfoSpecific` of a qcow2 image, from its header.
fn qcow2_specific(q: &Qcow2Details) -> Value {
    let mut m = vec![(
        "compat",
        Value::from(if q.version >= 3 { "1.1" } else { "0.10" }),
    )];
    if q.version >= 3 {
        m.extend([
            ("extended-l2", Value::from(q.incompatible & (1 << 4) != 0)),
            ("lazy-refcounts", Value::from(q.compatible & 1 != 0)),
            ("corrupt", Value::from(q.incompatible & (1 << 1) != 0)),
        ]);
    }
    m.extend([
        (
            "refcount-bits",
            Value::from(1u64.checked_shl(q.refcount_order).unwrap_or(0)),
        ),
        (
            "compression-type",
            Value::from(if q.compression == 1 { "zstd" } else { "zlib" }),
        ),
    ]);
    qdict::object([("type", Value::from("qcow2")), ("data", qdict::object(m))])
}

/// The position of node `name` in the view.
fn pos(v: &BlockView, name: &str) -> Option<usize> {
    v.nodes.iter().position(|n| n.spec.name == name)
}

/// `BlockDeviceInfo` of node `i` (`query-block`'s `inserted`, `query-named-block-nodes`),
/// with the I/O limits of the device it backs (`query-block` only, as QEMU).
pub fn device_info(v: &BlockView, i: usize, throttle: Option<&(ThrottleLimits, String)>) -> Value {
    let n = &v.nodes[i];
    let image = image_info(v, i);
    let cache = qdict::object([
        ("writeback", Value::from(true)),
        ("direct", Value::from(n.direct)),
        ("no-flush", Value::from(n.no_flush)),
    ]);
    let mut m = vec![
        ("file", Value::from(n.filename.as_str())),
        ("node-name", Value::from(n.spec.name.as_str())),
        ("ro", Value::from(n.read_only)),
        ("drv", Value::from(n.driver.name())),
    ];
    // QEMU's `backing_file` is the name resolved (the image's `backing-filename` is as
    // recorded).
    if let Some(b) = &n.full_backing_filename {
        m.push(("backing_file", Value::from(b.as_str())));
    }
    let l = throttle.map(|t| t.0).unwrap_or_default();
    m.extend([
        ("backing_file_depth", Value::from(n.backing_depth)),
        ("encrypted", Value::from(false)),
        ("detect_zeroes", Value::from("off")),
        ("bps", Value::from(l.bps)),
        ("bps_rd", Value::from(l.bps_rd)),
        ("bps_wr", Value::from(l.bps_wr)),
        ("iops", Value::from(l.iops)),
        ("iops_rd", Value::from(l.iops_rd)),
        ("iops_wr", Value::from(l.iops_wr)),
        ("image", image),
    ]);
    if let Some((_, group)) = throttle.filter(|t| t.0.enabled()) {
        m.push(("group", Value::from(group.as_str())));
    }
    m.extend([
        ("cache", cache),
        ("write_threshold", Value::from(n.write_threshold)),
    ]);
    qdict::object(m)
}

/// `BlockDeviceStats`.
fn stats(s: &BlockStats, account: bool) -> Value {
    let mut m = vec![
        ("rd_bytes", Value::from(s.rd_bytes)),
        ("wr_bytes", Value::from(s.wr_bytes)),
        ("unmap_bytes", Value::from(s.unmap_bytes)),
        ("rd_operations", Value::from(s.rd_operations)),
        ("wr_operations", Value::from(s.wr_operations)),
        ("flush_operations", Value::from(s.flush_operations)),
        ("unmap_operations", Value::from(s.unmap_operations)),
        ("rd_total_time_ns", Value::from(s.rd_total_time_ns)),
        ("wr_total_time_ns", Value::from(s.wr_total_time_ns)),
        ("flush_total_time_ns", Value::from(s.flush_total_time_ns)),
        ("unmap_total_time_ns", Value::from(s.unmap_total_time_ns)),
        ("wr_highest_offset", Value::from(s.wr_highest_offset)),
        ("rd_merged", Value::from(0)),
        ("wr_merged", Value::from(0)),
        ("unmap_merged", Value::from(0)),
    ];
    if let Some(idle) = s.idle_time_ns {
        m.push(("idle_time_ns", Value::from(idle)));
    }
    m.extend([
        ("failed_rd_operations", Value::from(s.failed_rd_operations)),
        ("failed_wr_operations", Value::from(s.failed_wr_operations)),
        (
            "failed_flush_operations",
            Value::from(s.failed_flush_operations),
        ),
        (
            "failed_unmap_operations",
            Value::from(s.failed_unmap_operations),
        ),
        ("invalid_rd_operations", Value::from(0)),
        ("invalid_wr_operations", Value::from(0)),
        ("invalid_flush_operations", Value::from(0)),
        ("invalid_unmap_operations", Value::from(0)),
        ("account_invalid", Value::from(account)),
        ("account_failed", Value::from(account)),
        ("timed_stats", Value::Array(Vec::new())),
    ]);
    qdict::object(m)
}

/// The counters of node `i`: those of the device whose blockd serves it (its root node or the
/// file node under it), zeros otherwise.
fn node_stats(v: &BlockView, i: usize) -> BlockStats {
    let name = &v.nodes[i].spec.name;
    for (d, dev) in v.config.devices.iter().enumerate() {
        let top = &v.config.backends[dev.backend].node;
        let under = v
            .config
            .node(top)
            .and_then(|t| t.file.as_deref())
            .is_some_and(|f| f == name);
        if top == name || under {
            if let Some(Some(s)) = v.stats.get(d) {
                return s.clone();
            }
        }
    }
    BlockStats::default()
}

/// One node's `BlockStats` entry: its counters, and for a format node its file node as
/// `parent`; a file node has `driver-specific`.
fn node_entry(
    v: &BlockView,
    i: usize,
    extra: Vec<(&'static str, Value)>,
    blk_level: bool,
) -> Value {
    let n = &v.nodes[i];
    let mut m = extra;
    m.push(("node-name", Value::from(n.spec.name.as_str())));
    let s = node_stats(v, i);
    let account = m.iter().any(|(k, _)| *k == "device");
    m.push(("stats", stats(&s, account)));
    match n.spec.driver {
        Driver::File => m.push(("driver-specific", file_specific(&s))),
        Driver::Format(_) => {
            if let Some(fi) = n.spec.file.as_deref().and_then(|f| pos(v, f)) {
                m.push(("parent", node_entry(v, fi, Vec::new(), blk_level)));
            }
            // As QEMU: the backing chain only under a backend (not with `query-nodes`).
            if let Some(b) = n
                .backing
                .as_deref()
                .and_then(|b| pos(v, b))
                .filter(|_| blk_level)
            {
                m.push(("backing", node_entry(v, b, Vec::new(), blk_level)));
            }
        }
    }
    qdict::object(m)
}

fn file_specific(s: &BlockStats) -> Value {
    qdict::object([
        ("driver", Value::from("file")),
        ("discard-nb-ok", Value::from(s.unmap_operations)),
        ("discard-nb-failed", Value::from(s.failed_unmap_operations)),
        ("discard-bytes-ok", Value::from(s.unmap_bytes)),
    ])
}

fn device_of_backend(v: &BlockView, b: usize) -> Option<usize> {
    v.config.devices.iter().position(|d| d.backend == b)
}

fn node_index(v: &BlockView, name: &str) -> Option<usize> {
    pos(v, name)
}

/// `query-block`: every backend (`-drive`s in order, then the devices' anonymous ones).
pub fn query_block_value(v: &BlockView) -> Value {
    let list = v
        .config
        .backends
        .iter()
        .enumerate()
        .filter_map(|(b, be)| {
            let n = node_index(v, &be.node)?;
            let dev = device_of_backend(v, b);
            let mut m = vec![("device", Value::from(be.name.as_str()))];
            if let Some(d) = dev {
                m.push(("qdev", Value::from(v.config.qdev(d))));
            }
            m.extend([
                ("type", Value::from("unknown")),
                ("removable", Value::from(dev.is_none())),
                ("locked", Value::from(false)),
                (
                    "inserted",
                    device_info(v, n, dev.and_then(|d| v.throttles.get(d))),
                ),
            ]);
            if let Some(d) = dev {
                // virtio-blk keeps an I/O status (QEMU reports it for such devices).
                let status = v.io_status.get(d).copied().unwrap_or_default();
                m.push(("io-status", Value::from(status.as_str())));
            }
            Some(qdict::object(m))
        })
        .collect();
    Value::Array(list)
}

fn query_block(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let v = ctx.shared.vm.block_view().await?;
        Ok(Outcome::value(query_block_value(&v)))
    })
}

fn query_named_block_nodes(ctx: Context, _args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let v = ctx.shared.vm.block_view().await?;
        // Newest node first, as QEMU lists its graph.
        let list = (0..v.nodes.len())
            .rev()
            .map(|i| device_info(&v, i, None))
            .collect();
        Ok(Outcome::value(Value::Array(list)))
    })
}

fn query_blockstats(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let nodes = args
            .get("query-nodes")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let v = ctx.shared.vm.block_view().await?;
        let list: Vec<Value> = if nodes {
            (0..v.nodes.len())
                .map(|i| node_entry(&v, i, Vec::new(), false))
                .collect()
        } else {
            v.config
                .backends
                .iter()
                .enumerate()
                .filter_map(|(b, be)| {
                    let n = node_index(&v, &be.node)?;
                    let mut extra = vec![("device", Value::from(be.name.as_str()))];
                    if let Some(d) = device_of_backend(&v, b) {
                        extra.push(("qdev", Value::from(v.config.qdev(d))));
                    }
                    Some(node_entry(&v, n, extra, true))
                })
                .collect()
        };
        Ok(Outcome::value(Value::Array(list)))
    })
}

fn block_set_io_throttle(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let s = |k: &str| args.get(k).and_then(Value::as_str).map(String::from);
        let i = |k: &str| {
            args.get(k)
                .map(|v| v.as_i64().unwrap_or(i64::MAX))
                .unwrap_or(0)
        };
        let t = ThrottleArgs {
            device: s("device"),
            id: s("id"),
            avg: ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"].map(i),
            max: [
                "bps_max",
                "bps_rd_max",
                "bps_wr_max",
                "iops_max",
                "iops_rd_max",
                "iops_wr_max",
            ]
            .map(i),
            other: [
                "bps_max_length",
                "bps_rd_max_length",
                "bps_wr_max_length",
                "iops_max_length",
                "iops_rd_max_length",
                "iops_wr_max_length",
                "iops_size",
            ]
            .into_iter()
            .map(|k| (k, i(k)))
            .collect(),
            group: s("group"),
        };
        ctx.shared.vm.block_throttle(t).await?;
        Ok(Outcome::empty())
    })
}

fn block_resize(ctx: Context, args: Map<String, Value>) -> HandlerFuture {
    Box::pin(async move {
        let device = args.get("device").and_then(Value::as_str).map(String::from);
        let node = args
            .get("node-name")
            .and_then(Value::as_str)
            .map(String::from);
        let size = match args.get("size").and_then(Value::as_i64) {
            Some(s) if s >= 0 => s as u64,
            _ => return Err(QmpError::generic("Parameter 'size' expects a >0 size")),
        };
        ctx.shared.vm.block_resize(device, node, size).await?;
        Ok(Outcome::empty())
    })
}
