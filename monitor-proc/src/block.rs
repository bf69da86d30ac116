//! Block devices on the command line: `-drive`, `-blockdev` and `-device virtio-blk-pci`, spelled
//! as QEMU spells them, resolved into the machine's block graph.
//!
//! The graph is QEMU's, kept small: a *node* is either a protocol node (`driver=file`: an image
//! file) or a format node (`raw`, `qcow2`) on top of one protocol node (`file=NODE`, or an inline
//! `file.driver=file,file.filename=PATH`). A *backend* (QEMU's BlockBackend) is what
//! `-drive id=ID` creates, or what a device creates anonymously when it names a node directly.
//! A *device* is a `virtio-blk-pci` on PCI bus 0 (`-device virtio-blk-pci,drive=...`, or implied
//! by `-drive if=virtio`), served by one `bulkhead-blockd` ([`crate::disks`]).
//!
//! Accepted forms (anything else is an error naming the key):
//! - `-drive file=PATH[,format=raw|qcow2][,if=virtio|none][,id=ID][,node-name=N]
//!   [,readonly=on|off][,cache=none|writeback][,serial=S][,media=disk]
//!   [,werror=enospc|stop|report|ignore][,rerror=stop|report|ignore]
//!   [,throttling.{bps,iops}-{total,read,write}=N]` (`serial=` as QEMU
//!   before 3.0 took it; default `if=virtio`, since Bulkhead has no IDE; without `format=` the
//!   format is probed like QEMU does, with its warning);
//! - `-blockdev driver=file,node-name=N,filename=PATH[,read-only=on][,cache.direct=on]
//!   [,cache.no-flush=off][,aio=threads][,discard=ignore|unmap][,auto-read-only=...]`;
//! - `-blockdev driver=raw|qcow2,node-name=N,file=NODE` or
//!   `...,file.driver=file,file.filename=PATH[,file.node-name=M][,file.cache.direct=...]`
//!   (also as JSON: `-blockdev '{"driver":"raw","node-name":"n","file":{...}}'`);
//! - `-device virtio-blk-pci,drive=NAME[,id=ID][,serial=S][,num-queues=N][,queue-size=N]
//!   [,addr=SLOT[.0]][,bus=pci.0|pcie.0][,werror=P][,rerror=P]` (`virtio-blk` is the same
//!   device; `P` is `auto`, the default, or a policy); `NAME` is a `-drive` id or a node name.
//!   `werror`/`rerror` follow QEMU's rules and texts ([`crate::io_error`]).
//!
//! - `-chardev socket,id=C,path=PATH[,server=off]` (a client socket, connected at start-up, as
//!   QEMU's vhost-user devices use them) and `-device vhost-user-blk-pci,chardev=C
//!   [,id=ID][,num-queues=N][,queue-size=N][,addr=SLOT[.0]][,bus=pci.0|pcie.0]`
//!   (`vhost-user-blk` is the same device): a virtio-blk device whose back end is an outside
//!   vhost-user-blk server (e.g. `qemu-storage-daemon --export vhost-user-blk`); no node, no
//!   backend, no blockd (QEMU's vhost-user-blk has no BlockBackend either).
//!
//! Paths may be `/dev/fdset/N` ([`crate::fds`]). Cache modes other than `none` (`O_DIRECT`,
//! writeback) and `writeback` are refused.

use std::collections::BTreeSet;

use bulkhead_ipc::messages::{ErrorPolicy, ImageFormat, ThrottleLimits};

use crate::cli::{parse_opts, CliError};

/// Most queues a device may ask for (blockd's limit, one thread each).
pub const MAX_QUEUES: u16 = 16;
/// PCI slots devices may use (slot 0 is the host bridge).
pub const SLOTS: std::ops::RangeInclusive<u8> = 1..=31;

/// A node's driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `file`: the protocol node (an image file).
    File,
    /// A format node.
    Format(ImageFormat),
}

impl Driver {
    /// QEMU's driver name.
    pub fn name(self) -> &'static str {
        match self {
            Driver::File => "file",
            Driver::Format(f) => f.name(),
        }
    }
}

/// One node of the block graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its node name (`#blockNNN` when QEMU would generate one).
    pub name: String,
    /// The driver.
    pub driver: Driver,
    /// `driver=file`: the image path (or `/dev/fdset/N`).
    pub filename: Option<String>,
    /// A format node: the name of its protocol node.
    pub file: Option<String>,
    /// Read-only.
    pub read_only: bool,
    /// `cache.direct` (`O_DIRECT`); `None`: inherited from the parent, off at the top.
    pub direct: Option<bool>,
    /// `cache.no-flush`.
    pub no_flush: bool,
    /// Created by `-blockdev` or `blockdev-add` under its own name (QEMU's "monitor-owned":
    /// what `blockdev-del` may delete); not a `-drive`'s nodes or an inline child.
    pub owned: bool,
}

/// A backend: `-drive id=`, or anonymous for a device naming a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// The `-drive` id (QEMU's `device` in `query-block`); empty when anonymous.
    pub name: String,
    /// The node at its root.
    pub node: String,
    /// `-drive throttling.*`: the I/O limits its device starts with.
    pub throttle: ThrottleLimits,
    /// `-drive rerror=` (QEMU's default `report`, also for an anonymous backend).
    pub rerror: ErrorPolicy,
    /// `-drive werror=` (QEMU's default `enospc`, also for an anonymous backend).
    pub werror: ErrorPolicy,
}

/// One `virtio-blk-pci`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// `id=` (`None`: anonymous, as a `-drive if=virtio` device).
    pub id: Option<String>,
    /// The backend (index into [`BlockConfig::backends`]).
    pub backend: usize,
    /// `serial=`.
    pub serial: Option<String>,
    /// `num-queues=` (`None`: one per vCPU, at most [`MAX_QUEUES`], as QEMU's default).
    pub num_queues: Option<u16>,
    /// `queue-size=`.
    pub queue_size: u16,
    /// `addr=` (`None`: the first free slot from 1).
    pub slot: Option<u8>,
    /// `rerror=` (`None`: `auto`, the backend's).
    pub rerror: Option<ErrorPolicy>,
    /// `werror=` (`None`: `auto`, the backend's).
    pub werror: Option<ErrorPolicy>,
}

/// A `-chardev socket,path=` in client mode: the socket of an outside vhost-user back end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevSpec {
    /// `id=`.
    pub id: String,
    /// `path=`: the server's unix socket.
    pub path: String,
}

/// One `vhost-user-blk-pci`: virtio-blk served by an outside vhost-user-blk server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostUserBlkSpec {
    /// `id=`.
    pub id: Option<String>,
    /// `chardev=` (index into [`BlockConfig::chardevs`]).
    pub chardev: usize,
    /// `num-queues=` (`None`: one per vCPU, at most [`MAX_QUEUES`], as QEMU's default).
    pub num_queues: Option<u16>,
    /// `queue-size=` (QEMU 7.2's default: 128).
    pub queue_size: u16,
    /// `addr=` (`None`: the first free slot from 1).
    pub slot: Option<u8>,
}

/// What `-drive`, `-blockdev` and `-device` asked for, before resolution.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockArgs {
    /// Each option with its argument, in command-line order.
    pub items: Vec<(BlockOpt, String)>,
}

/// Which option an item came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOpt {
    /// `-drive`.
    Drive,
    /// `-blockdev`.
    Blockdev,
    /// `-device`.
    Device,
    /// `-chardev`.
    Chardev,
}

impl BlockOpt {
    fn flag(self) -> &'static str {
        match self {
            BlockOpt::Drive => "-drive",
            BlockOpt::Blockdev => "-blockdev",
            BlockOpt::Device => "-device",
            BlockOpt::Chardev => "-chardev",
        }
    }
}

/// The resolved block configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Every node, in creation order.
    pub nodes: Vec<NodeSpec>,
    /// Every backend, in creation order.
    pub backends: Vec<BackendSpec>,
    /// Every device, in creation order.
    pub devices: Vec<DeviceSpec>,
    /// Every `-chardev socket` (client), in command-line order.
    pub chardevs: Vec<ChardevSpec>,
    /// Every `vhost-user-blk-pci`, in creation order.
    pub vhost_user: Vec<VhostUserBlkSpec>,
}

fn bad(opt: BlockOpt, value: &str, reason: impl Into<String>) -> CliError {
    CliError::BadValue {
        option: opt.flag().into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn boolean(opt: BlockOpt, whole: &str, key: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(bad(
            opt,
            whole,
            format!("Parameter '{key}' expects 'on' or 'off'"),
        )),
    }
}

/// QEMU's `-drive cache=` modes Bulkhead has: (direct, no_flush).
fn cache_mode(opt: BlockOpt, whole: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "none" => Ok(true),
        "writeback" => Ok(false),
        "writethrough" | "directsync" | "unsafe" => Err(bad(
            opt,
            whole,
            format!("cache={v} is not supported by bulkhead (none or writeback)"),
        )),
        _ => Err(bad(opt, whole, format!("invalid cache option '{v}'"))),
    }
}

fn format_of(opt: BlockOpt, whole: &str, v: &str) -> Result<ImageFormat, CliError> {
    match v {
        "raw" => Ok(ImageFormat::Raw),
        "qcow2" => Ok(ImageFormat::Qcow2),
        _ => Err(bad(
            opt,
            whole,
            format!("Unknown driver '{v}' (bulkhead has raw and qcow2)"),
        )),
    }
}

/// A JSON `-blockdev` flattened into QEMU's dotted keys.
fn flatten_json(opt: BlockOpt, whole: &str) -> Result<Vec<(String, String)>, CliError> {
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            serde_json::Value::String(s) => out.push((prefix.into(), s.clone())),
            serde_json::Value::Bool(b) => {
                out.push((prefix.into(), if *b { "on" } else { "off" }.into()))
            }
            other => out.push((prefix.into(), other.to_string())),
        }
    }
    let v: serde_json::Value =
        serde_json::from_str(whole).map_err(|e| bad(opt, whole, format!("bad JSON: {e}")))?;
    let mut out = Vec::new();
    walk("", &v, &mut out);
    Ok(out)
}

/// Checks a node name as QEMU does (letters, digits, `-`, `.`, `_`; a letter first; at most
/// 31 characters).
fn check_name(opt: BlockOpt, whole: &str, kind: &str, name: &str) -> Result<(), CliError> {
    let ok = name.len() < 32
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(bad(opt, whole, format!("Invalid {kind} name '{name}'")))
    }
}

/// Builds the graph: nodes are created in order, names checked for uniqueness, devices
/// resolved against backends and nodes, slots assigned.
struct Builder {
    cfg: BlockConfig,
    /// Counter for generated node names.
    auto: u32,
    drive_index: u32,
    /// Format nodes whose format is probed at open.
    probe: Vec<String>,
    /// Node names used outside the configuration (backing files' nodes).
    taken: BTreeSet<String>,
}

impl Builder {
    fn auto_name(&mut self) -> String {
        // QEMU's generated names look like `#block123`; Bulkhead counts instead of drawing
        // random numbers, so the names are stable. Names in use (nodes added later by
        // blockdev-add, backing files) are skipped.
        loop {
            let n = self.auto;
            self.auto += 1;
            let name = format!("#block{:03}", (n * 2 + 1) % 1000 + (n / 500) * 1000);
            if !self.node_exists(&name) && !self.taken.contains(&name) {
                return name;
            }
        }
    }

    fn node_exists(&self, name: &str) -> bool {
        self.cfg.nodes.iter().any(|n| n.name == name)
    }

    fn add_node(&mut self, opt: BlockOpt, whole: &str, n: NodeSpec) -> Result<(), CliError> {
        if self.node_exists(&n.name) {
            return Err(bad(
                opt,
                whole,
                format!("Duplicate nodes with node-name='{}'", n.name),
            ));
        }
        if self.cfg.backends.iter().any(|b| b.name == n.name) {
            return Err(bad(
                opt,
                whole,
                format!("node-name={} is conflicting with a device id", n.name),
            ));
        }
        self.cfg.nodes.push(n);
        Ok(())
    }

    fn drive(&mut self, whole: &str) -> Result<(), CliError> {
        let opt = BlockOpt::Drive;
        let mut file = None;
        let mut format = None;
        let mut iface = "virtio".to_string();
        let mut id = None;
        let mut node_name = None;
        let mut read_only = false;
        let mut direct = false;
        let mut serial = None;
        let mut throttle = ThrottleLimits::default();
        let (mut rerror, mut werror) = crate::io_error::BACKEND_DEFAULT;
        for (k, v) in parse_opts(whole, None) {
            match k.as_str() {
                "file" => file = Some(v),
                "format" => format = Some(format_of(opt, whole, &v)?),
                "if" => match v.as_str() {
                    "virtio" | "none" => iface = v,
                    _ => {
                        return Err(bad(
                            opt,
                            whole,
                            format!("if={v} is not supported by bulkhead (virtio or none)"),
                        ))
                    }
                },
                "id" => id = Some(v),
                "node-name" => node_name = Some(v),
                "readonly" | "read-only" => read_only = boolean(opt, whole, &k, &v)?,
                "cache" => direct = cache_mode(opt, whole, &v)?,
                "cache.direct" => direct = boolean(opt, whole, &k, &v)?,
                "serial" => serial = Some(v),
                "media" if v == "disk" => {}
                _ if throttle_key(&k).is_some() => {
                    let n: u64 = v
                        .parse()
                        .ok()
                        .filter(|n| *n <= THROTTLE_VALUE_MAX)
                        .ok_or_else(|| {
                            bad(
                                opt,
                                whole,
                                format!(
                                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                                ),
                            )
                        })?;
                    let t = &mut throttle;
                    match throttle_key(&k) {
                        Some(0) => t.bps = n,
                        Some(1) => t.bps_rd = n,
                        Some(2) => t.bps_wr = n,
                        Some(3) => t.iops = n,
                        Some(4) => t.iops_rd = n,
                        _ => t.iops_wr = n,
                    }
                }
                "werror" => {
                    werror =
                        crate::io_error::drive_policy(&v, false).map_err(|e| bad(opt, whole, e))?
                }
                "rerror" => {
                    rerror =
                        crate::io_error::drive_policy(&v, true).map_err(|e| bad(opt, whole, e))?
                }
                _ => {
                    return Err(bad(
                        opt,
                        whole,
                        format!("Invalid parameter '{k}' (not supported by bulkhead)"),
                    ))
                }
            }
        }
        let Some(file) = file.filter(|f| !f.is_empty()) else {
            return Err(bad(
                opt,
                whole,
                "a drive without a medium (no file=) is not supported by bulkhead",
            ));
        };
        let t = &throttle;
        if (t.bps != 0 && (t.bps_rd != 0 || t.bps_wr != 0))
            || (t.iops != 0 && (t.iops_rd != 0 || t.iops_wr != 0))
        {
            return Err(bad(
                opt,
                whole,
                "bps/iops/max total values and read/write values cannot be used at the same time",
            ));
        }
        let index = self.drive_index;
        self.drive_index += 1;
        let id = match id {
            Some(id) => {
                check_name(opt, whole, "drive", &id).map_err(|_| {
                    bad(
                        opt,
                        whole,
                        format!("Parameter 'id' expects an identifier, not '{id}'"),
                    )
                })?;
                id
            }
            None => format!("{iface}{index}"),
        };
        if self.cfg.backends.iter().any(|b| b.name == id) {
            return Err(bad(
                opt,
                whole,
                format!("drive with id {id} already exists"),
            ));
        }
        let file_node = self.auto_name();
        let top = match node_name {
            Some(n) => {
                check_name(opt, whole, "node", &n)?;
                n
            }
            None => self.auto_name(),
        };
        self.add_node(
            opt,
            whole,
            NodeSpec {
                name: file_node.clone(),
                driver: Driver::File,
                filename: Some(file),
                file: None,
                read_only,
                direct: Some(direct),
                no_flush: false,
                owned: false,
            },
        )?;
        self.add_node(
            opt,
            whole,
            NodeSpec {
                name: top.clone(),
                // Probed at open when not given (crate::disks).
                driver: Driver::Format(format.unwrap_or(ImageFormat::Raw)),
                filename: None,
                file: Some(file_node),
                read_only,
                direct: Some(direct),
                no_flush: false,
                owned: false,
            },
        )?;
        if format.is_none() {
            self.probe.push(top.clone());
        }
        self.cfg.backends.push(BackendSpec {
            name: id,
            node: top,
            throttle,
            rerror,
            werror,
        });
        if iface == "virtio" {
            self.cfg.devices.push(DeviceSpec {
                id: None,
                backend: self.cfg.backends.len() - 1,
                serial,
                num_queues: None,
                queue_size: 256,
                slot: None,
                rerror: None,
                werror: None,
            });
        } else if serial.is_some() {
            return Err(bad(opt, whole, "serial= needs if=virtio (a device)"));
        }
        Ok(())
    }

    fn blockdev(&mut self, whole: &str) -> Result<(), CliError> {
        let opt = BlockOpt::Blockdev;
        let pairs = if whole.trim_start().starts_with('{') {
            flatten_json(opt, whole)?
        } else {
            parse_opts(whole, None)
        };
        let mut driver = None;
        let mut name = None;
        let mut filename = None;
        let mut file_ref = None;
        let mut read_only = false;
        let mut direct = None;
        let mut no_flush = false;
        let mut child: Vec<(String, String)> = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "driver" => {
                    driver = Some(match v.as_str() {
                        "file" => Driver::File,
                        other => Driver::Format(format_of(opt, whole, other)?),
                    })
                }
                "node-name" => name = Some(v),
                "filename" => filename = Some(v),
                "file" => file_ref = Some(v),
                "read-only" => read_only = boolean(opt, whole, &k, &v)?,
                "cache.direct" => direct = Some(boolean(opt, whole, &k, &v)?),
                "cache.no-flush" => no_flush = boolean(opt, whole, &k, &v)?,
                "auto-read-only" => {
                    boolean(opt, whole, &k, &v)?;
                }
                "aio" if v == "threads" || v == "native" || v == "io_uring" => {}
                "discard" if v == "ignore" || v == "unmap" || v == "off" || v == "on" => {}
                "detect-zeroes" if v == "off" => {}
                _ if k.starts_with("file.") => child.push((k["file.".len()..].to_string(), v)),
                _ => {
                    return Err(bad(
                        opt,
                        whole,
                        format!("Invalid parameter '{k}' (not supported by bulkhead)"),
                    ))
                }
            }
        }
        let Some(driver) = driver else {
            return Err(bad(opt, whole, "Parameter 'driver' is missing"));
        };
        let Some(name) = name else {
            return Err(bad(
                opt,
                whole,
                "A block device must be given a name (node-name) with -blockdev",
            ));
        };
        check_name(opt, whole, "node", &name)?;
        match driver {
            Driver::File => {
                if file_ref.is_some() || !child.is_empty() {
                    return Err(bad(opt, whole, "driver=file has no 'file' child"));
                }
                let Some(filename) = filename.filter(|f| !f.is_empty()) else {
                    return Err(bad(opt, whole, "Parameter 'filename' is missing"));
                };
                self.add_node(
                    opt,
                    whole,
                    NodeSpec {
                        name,
                        driver,
                        filename: Some(filename),
                        file: None,
                        read_only,
                        direct,
                        no_flush,
                        owned: true,
                    },
                )
            }
            Driver::Format(_) => {
                if filename.is_some() {
                    return Err(bad(
                        opt,
                        whole,
                        format!(
                            "Invalid parameter 'filename' for driver={} (use file.filename=)",
                            driver.name()
                        ),
                    ));
                }
                let file = match (file_ref, child.is_empty()) {
                    (Some(_), false) => {
                        return Err(bad(
                            opt,
                            whole,
                            "give either file=NODE or file.driver=file,file.filename=PATH",
                        ))
                    }
                    (Some(r), true) => {
                        let Some(n) = self.cfg.nodes.iter().find(|n| n.name == r) else {
                            return Err(bad(
                                opt,
                                whole,
                                format!("Cannot find device='' nor node-name='{r}'"),
                            ));
                        };
                        if n.driver != Driver::File {
                            return Err(bad(
                                opt,
                                whole,
                                format!(
                                    "node '{r}' is a {} node; bulkhead stacks formats only on \
                                     driver=file nodes",
                                    n.driver.name()
                                ),
                            ));
                        }
                        r
                    }
                    (None, true) => {
                        return Err(bad(opt, whole, "Parameter 'file' is missing"));
                    }
                    (None, false) => self.inline_file(whole, child, read_only)?,
                };
                self.add_node(
                    opt,
                    whole,
                    NodeSpec {
                        name,
                        driver,
                        filename: None,
                        file: Some(file),
                        read_only,
                        direct,
                        no_flush,
                        owned: true,
                    },
                )
            }
        }
    }

    /// `file.driver=file,file.filename=...`: the protocol node of a format node.
    fn inline_file(
        &mut self,
        whole: &str,
        child: Vec<(String, String)>,
        read_only: bool,
    ) -> Result<String, CliError> {
        let opt = BlockOpt::Blockdev;
        let mut driver = None;
        let mut filename = None;
        let mut name = None;
        let mut direct = None;
        let mut child_ro = None;
        for (k, v) in child {
            match k.as_str() {
                "driver" => driver = Some(v),
                "filename" => filename = Some(v),
                "node-name" => name = Some(v),
                "cache.direct" => direct = Some(boolean(opt, whole, &k, &v)?),
                "read-only" => child_ro = Some(boolean(opt, whole, &k, &v)?),
                "aio" if v == "threads" || v == "native" || v == "io_uring" => {}
                "discard" | "auto-read-only" | "locking" => {}
                _ => {
                    return Err(bad(
                        opt,
                        whole,
                        format!("Invalid parameter 'file.{k}' (not supported by bulkhead)"),
                    ))
                }
            }
        }
        match driver.as_deref() {
            Some("file") => {}
            Some(d) => {
                return Err(bad(
                    opt,
                    whole,
                    format!("file.driver={d} is not supported by bulkhead (file only)"),
                ))
            }
            None => return Err(bad(opt, whole, "Parameter 'file.driver' is missing")),
        }
        let Some(filename) = filename.filter(|f| !f.is_empty()) else {
            return Err(bad(opt, whole, "Parameter 'file.filename' is missing"));
        };
        let name = match name {
            Some(n) => {
                check_name(opt, whole, "node", &n)?;
                n
            }
            None => self.auto_name(),
        };
        self.add_node(
            opt,
            whole,
            NodeSpec {
                name: name.clone(),
                driver: Driver::File,
                filename: Some(filename),
                file: None,
                read_only: child_ro.unwrap_or(read_only),
                direct,
                no_flush: false,
                owned: false,
            },
        )?;
        Ok(name)
    }

    /// Whether a device already has the id `id`.
    fn id_taken(&self, id: &str) -> bool {
        self.cfg.devices.iter().any(|d| d.id.as_deref() == Some(id))
            || self
                .cfg
                .vhost_user
                .iter()
                .any(|d| d.id.as_deref() == Some(id))
    }

    /// `-chardev socket,id=C,path=PATH`: a client socket (what vhost-user devices use).
    fn chardev(&mut self, whole: &str) -> Result<(), CliError> {
        let opt = BlockOpt::Chardev;
        let pairs = parse_opts(whole, Some("backend"));
        let mut id = None;
        let mut path = None;
        for (k, v) in &pairs {
            match k.as_str() {
                "backend" if v == "socket" => {}
                "backend" => {
                    return Err(bad(
                        opt,
                        whole,
                        format!(
                            "chardev backend '{v}' is not supported by bulkhead (it has socket \
                             clients, for vhost-user devices)"
                        ),
                    ))
                }
                "id" => id = Some(v.clone()),
                "path" => path = Some(v.clone()),
                "server" => {
                    if boolean(opt, whole, k, v)? {
                        return Err(bad(
                            opt,
                            whole,
                            "server=on is not supported by bulkhead (the monitor connects to \
                             the vhost-user back end's socket)",
                        ));
                    }
                }
                _ => {
                    return Err(bad(
                        opt,
                        whole,
                        format!("Invalid parameter '{k}' (not supported by bulkhead)"),
                    ))
                }
            }
        }
        let Some(id) = id.filter(|i| !i.is_empty()) else {
            return Err(bad(opt, whole, "chardev: no id specified"));
        };
        check_name(opt, whole, "chardev", &id).map_err(|_| {
            bad(
                opt,
                whole,
                format!("Parameter 'id' expects an identifier, not '{id}'"),
            )
        })?;
        let Some(path) = path.filter(|p| !p.is_empty()) else {
            return Err(bad(
                opt,
                whole,
                "chardev: socket: bulkhead needs path= (a unix socket)",
            ));
        };
        if self.cfg.chardevs.iter().any(|c| c.id == id) {
            return Err(bad(
                opt,
                whole,
                format!("attempt to add duplicate chardev '{id}'"),
            ));
        }
        self.cfg.chardevs.push(ChardevSpec { id, path });
        Ok(())
    }

    /// `-device vhost-user-blk-pci,chardev=C,...`.
    fn vhost_user_blk(&mut self, whole: &str, pairs: &[(String, String)]) -> Result<(), CliError> {
        let opt = BlockOpt::Device;
        let prop = |k: &str| format!("Property 'vhost-user-blk-pci.{k}'");
        let mut chardev = None;
        let mut dev = VhostUserBlkSpec {
            id: None,
            chardev: 0,
            num_queues: None,
            queue_size: 128,
            slot: None,
        };
        for (k, v) in pairs {
            match k.as_str() {
                "driver" => {}
                "chardev" => chardev = Some(v.clone()),
                "id" => {
                    check_name(opt, whole, "device", v).map_err(|_| {
                        bad(
                            opt,
                            whole,
                            format!("Parameter 'id' expects an identifier, not '{v}'"),
                        )
                    })?;
                    dev.id = Some(v.clone());
                }
                "num-queues" => {
                    let n = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES).contains(n))
                        .ok_or_else(|| {
                            bad(
                                opt,
                                whole,
                                format!("{} must be 1 to {MAX_QUEUES}", prop("num-queues")),
                            )
                        })?;
                    dev.num_queues = Some(n);
                }
                "queue-size" => {
                    dev.queue_size = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (4..=1024).contains(n))
                        .ok_or_else(|| {
                            bad(
                                opt,
                                whole,
                                format!(
                                    "{}: queue-size property must be a power of 2 from 4 to 1024",
                                    prop("queue-size")
                                ),
                            )
                        })?;
                }
                "addr" => {
                    dev.slot = Some(parse_addr(v).ok_or_else(|| {
                        bad(
                            opt,
                            whole,
                            format!(
                                "{} doesn't take value '{v}' (a slot 1 to 31, function 0)",
                                prop("addr")
                            ),
                        )
                    })?)
                }
                "bus" if v == "pci.0" || v == "pcie.0" => {}
                _ => return Err(bad(opt, whole, format!("{} not found", prop(k)))),
            }
        }
        let Some(chardev) = chardev else {
            return Err(bad(opt, whole, "chardev is mandatory"));
        };
        let Some(c) = self.cfg.chardevs.iter().position(|c| c.id == chardev) else {
            return Err(bad(
                opt,
                whole,
                format!("{} can't find value '{chardev}'", prop("chardev")),
            ));
        };
        if self.cfg.vhost_user.iter().any(|d| d.chardev == c) {
            return Err(bad(
                opt,
                whole,
                format!(
                    "{} can't take value '{chardev}', it's in use",
                    prop("chardev")
                ),
            ));
        }
        if let Some(id) = &dev.id {
            if self.id_taken(id) {
                return Err(bad(
                    opt,
                    whole,
                    format!("Duplicate device ID '{id}' for device"),
                ));
            }
        }
        dev.chardev = c;
        self.cfg.vhost_user.push(dev);
        Ok(())
    }

    fn device(&mut self, whole: &str) -> Result<(), CliError> {
        let opt = BlockOpt::Device;
        let pairs = parse_opts(whole, Some("driver"));
        let driver = pairs
            .iter()
            .find(|(k, _)| k == "driver")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        match driver {
            "virtio-blk-pci" | "virtio-blk" => {}
            "vhost-user-blk-pci" | "vhost-user-blk" => return self.vhost_user_blk(whole, &pairs),
            "" => return Err(bad(opt, whole, "Parameter 'driver' is missing")),
            other => {
                return Err(bad(
                    opt,
                    whole,
                    format!(
                        "device '{other}' is not supported by bulkhead (it has virtio-blk-pci \
                         and vhost-user-blk-pci)"
                    ),
                ))
            }
        }
        let mut drive = None;
        let mut dev = DeviceSpec {
            id: None,
            backend: 0,
            serial: None,
            num_queues: None,
            queue_size: 256,
            slot: None,
            rerror: None,
            werror: None,
        };
        let prop = |k: &str| format!("Property 'virtio-blk-pci.{k}'");
        for (k, v) in &pairs {
            match k.as_str() {
                "driver" => {}
                "drive" => drive = Some(v.clone()),
                "id" => {
                    check_name(opt, whole, "device", v).map_err(|_| {
                        bad(
                            opt,
                            whole,
                            format!("Parameter 'id' expects an identifier, not '{v}'"),
                        )
                    })?;
                    dev.id = Some(v.clone());
                }
                "serial" => dev.serial = Some(v.clone()),
                "num-queues" => {
                    let n = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| (1..=MAX_QUEUES).contains(n))
                        .ok_or_else(|| {
                            bad(
                                opt,
                                whole,
                                format!("{} must be 1 to {MAX_QUEUES}", prop("num-queues")),
                            )
                        })?;
                    dev.num_queues = Some(n);
                }
                "queue-size" => {
                    dev.queue_size = v
                        .parse::<u16>()
                        .ok()
                        .filter(|n| n.is_power_of_two() && (4..=1024).contains(n))
                        .ok_or_else(|| {
                            bad(
                                opt,
                                whole,
                                format!(
                                    "{}: queue-size property must be a power of 2 from 4 to 1024",
                                    prop("queue-size")
                                ),
                            )
                        })?;
                }
                "addr" => {
                    dev.slot = Some(parse_addr(v).ok_or_else(|| {
                        bad(
                            opt,
                            whole,
                            format!(
                                "{} doesn't take value '{v}' (a slot 1 to 31, function 0)",
                                prop("addr")
                            ),
                        )
                    })?)
                }
                "bus" if v == "pci.0" || v == "pcie.0" => {}
                "werror" => {
                    dev.werror =
                        crate::io_error::device_policy(k, v).map_err(|e| bad(opt, whole, e))?
                }
                "rerror" => {
                    dev.rerror =
                        crate::io_error::device_policy(k, v).map_err(|e| bad(opt, whole, e))?
                }
                _ => return Err(bad(opt, whole, format!("{} not found", prop(k)))),
            }
        }
        let Some(drive) = drive else {
            return Err(bad(opt, whole, "drive property not set"));
        };
        if let Some(id) = &dev.id {
            if self.id_taken(id) {
                return Err(bad(
                    opt,
                    whole,
                    format!("Duplicate device ID '{id}' for device"),
                ));
            }
        }
        // A -drive id, else a node name (which gets an anonymous backend).
        let backend = match self.cfg.backends.iter().position(|b| b.name == drive) {
            Some(i) => i,
            None if self.node_exists(&drive) => {
                let (rerror, werror) = crate::io_error::BACKEND_DEFAULT;
                self.cfg.backends.push(BackendSpec {
                    name: String::new(),
                    node: drive.clone(),
                    throttle: ThrottleLimits::default(),
                    rerror,
                    werror,
                });
                self.cfg.backends.len() - 1
            }
            None => {
                return Err(bad(
                    opt,
                    whole,
                    format!("{} can't find value '{drive}'", prop("drive")),
                ))
            }
        };
        let node = self.cfg.backends[backend].node.clone();
        let in_use = self
            .cfg
            .devices
            .iter()
            .any(|d| d.backend == backend || self.cfg.backends[d.backend].node == node);
        if in_use {
            // QEMU 7.2's words for a -drive another device has (`blk_attach_dev`); a node is
            // refused by its permissions there, in a text naming both devices.
            let text = if self.cfg.backends[backend].name == drive {
                format!("Drive '{drive}' is already in use by another device")
            } else {
                format!("{} can't take value '{drive}', it's in use", prop("drive"))
            };
            return Err(bad(opt, whole, text));
        }
        dev.backend = backend;
        self.cfg.devices.push(dev);
        Ok(())
    }
}

/// QEMU's `THROTTLE_VALUE_MAX`.
const THROTTLE_VALUE_MAX: u64 = 1_000_000_000_000_000;

/// `-drive`'s throttling keys (QEMU's and its legacy spellings): index into bps, bps_rd,
/// bps_wr, iops, iops_rd, iops_wr.
fn throttle_key(k: &str) -> Option<usize> {
    Some(match k {
        "throttling.bps-total" | "bps" => 0,
        "throttling.bps-read" | "bps_rd" => 1,
        "throttling.bps-write" | "bps_wr" => 2,
        "throttling.iops-total" | "iops" => 3,
        "throttling.iops-read" | "iops_rd" => 4,
        "throttling.iops-write" | "iops_wr" => 5,
        _ => return None,
    })
}

/// `addr=`: a slot in hex (`5`, `0x5`, `05.0`); function 0 only.
fn parse_addr(v: &str) -> Option<u8> {
    let (slot, func) = match v.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (v, None),
    };
    if let Some(f) = func {
        if u8::from_str_radix(f, 16).ok()? != 0 {
            return None;
        }
    }
    let slot = slot.strip_prefix("0x").unwrap_or(slot);
    let n = u8::from_str_radix(slot, 16).ok()?;
    SLOTS.contains(&n).then_some(n)
}

/// What [`resolve`] gives: the graph, and the format nodes whose format must be probed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The graph.
    pub config: BlockConfig,
    /// Format nodes of `-drive`s without `format=` (probed when the image is opened).
    pub probe: Vec<String>,
}

/// Resolves every `-drive`, `-blockdev` and `-device` (in command-line order, as QEMU creates
/// `-blockdev`s first, then `-drive`s, then devices).
pub fn resolve(args: &BlockArgs) -> Result<Resolved, CliError> {
    let mut b = Builder {
        cfg: BlockConfig::default(),
        auto: 0,
        drive_index: 0,
        probe: Vec::new(),
        taken: BTreeSet::new(),
    };
    // QEMU creates -blockdev nodes, then -drive, then -device.
    for kind in [
        BlockOpt::Chardev,
        BlockOpt::Blockdev,
        BlockOpt::Drive,
        BlockOpt::Device,
    ] {
        for (o, v) in &args.items {
            if *o == kind {
                match kind {
                    BlockOpt::Chardev => b.chardev(v)?,
                    BlockOpt::Blockdev => b.blockdev(v)?,
                    BlockOpt::Drive => b.drive(v)?,
                    BlockOpt::Device => b.device(v)?,
                }
            }
        }
    }
    let probe = b.probe;
    let mut cfg = b.cfg;
    assign_slots(&mut cfg)?;
    Ok(Resolved { config: cfg, probe })
}

/// The text of a refusal without the command-line option it names (for QMP).
fn qmp_text(e: CliError) -> String {
    match e {
        CliError::BadValue { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// `blockdev-add`: QEMU's `BlockdevOptions` (`driver` file, raw or qcow2; a format node's
/// `file` a node name or an inline `file` object) added to `cfg` as `-blockdev` takes them.
/// `taken`: node names in use outside `cfg` (backing files). Errors are QEMU-style texts.
pub fn add_blockdev(
    cfg: &mut BlockConfig,
    args: &serde_json::Value,
    taken: &[String],
) -> Result<(), String> {
    let mut b = Builder {
        cfg: cfg.clone(),
        auto: 0,
        drive_index: 0,
        probe: Vec::new(),
        taken: taken.iter().cloned().collect(),
    };
    if args.get("node-name").is_none() {
        return Err("'node-name' must be specified for the root node".into());
    }
    b.blockdev(&args.to_string()).map_err(qmp_text)?;
    *cfg = b.cfg;
    Ok(())
}

/// `device_add` of a `virtio-blk-pci`: `pairs` as QMP gave them (driver included); `other_slots`
/// and `other_ids`: what the other devices (NICs) use. Returns the new device's index.
pub fn add_device(
    cfg: &mut BlockConfig,
    pairs: &[(String, String)],
    other_slots: &[u8],
    other_ids: &[String],
) -> Result<usize, String> {
    let mut whole = String::new();
    for (k, v) in pairs {
        if !whole.is_empty() {
            whole.push(',');
        }
        whole.push_str(&format!("{k}={}", v.replace(',', ",,")));
    }
    if let Some((_, id)) = pairs.iter().find(|(k, _)| k == "id") {
        if other_ids.contains(id) {
            return Err(format!("Duplicate device ID '{id}' for device"));
        }
    }
    let mut b = Builder {
        cfg: cfg.clone(),
        auto: 0,
        drive_index: 0,
        probe: Vec::new(),
        taken: BTreeSet::new(),
    };
    b.device(&whole).map_err(qmp_text)?;
    let mut new = b.cfg;
    let dev = new.devices.len() - 1;
    let mut used: BTreeSet<u8> = cfg.used_slots().into_iter().collect();
    used.extend(other_slots.iter().copied());
    match new.devices[dev].slot {
        Some(s) if used.contains(&s) => {
            return Err(format!(
                "PCI: slot {s} function 0 not available for virtio-blk-pci, in use by another \
                 device"
            ))
        }
        Some(_) => {}
        None => {
            let free = SLOTS
                .clone()
                .find(|s| !used.contains(s))
                .ok_or("PCI: no slot available for virtio-blk-pci")?;
            new.devices[dev].slot = Some(free);
        }
    }
    *cfg = new;
    Ok(dev)
}

/// Removes device `dev` (`device_del`) and its BlockBackend, as QEMU 7.2 drops a device's
/// implicit BlockBackend with it and deletes a `-drive`'s (`blockdev_auto_del`); the nodes of a
/// `-drive` are then unused (the caller closes them), a `-blockdev` node stays.
pub fn remove_device(cfg: &mut BlockConfig, dev: usize) {
    let d = cfg.devices.remove(dev);
    let b = d.backend;
    if b < cfg.backends.len() && !cfg.devices.iter().any(|x| x.backend == b) {
        cfg.backends.remove(b);
        for x in &mut cfg.devices {
            if x.backend > b {
                x.backend -= 1;
            }
        }
    }
}

/// Gives every device without `addr=` the first free slot from 1; two devices on one slot are
/// an error.
fn assign_slots(cfg: &mut BlockConfig) -> Result<(), CliError> {
    let mut slots: Vec<(&'static str, &mut Option<u8>)> = cfg
        .devices
        .iter_mut()
        .map(|d| ("virtio-blk-pci", &mut d.slot))
        .chain(
            cfg.vhost_user
                .iter_mut()
                .map(|d| ("vhost-user-blk-pci", &mut d.slot)),
        )
        .collect();
    let mut used = BTreeSet::new();
    for (what, s) in &slots {
        if let Some(s) = **s {
            if !used.insert(s) {
                return Err(CliError::Conflict(format!(
                    "-device {what}: PCI: slot {s} function 0 not available, in use"
                )));
            }
        }
    }
    let mut next = *SLOTS.start();
    for (_, slot) in &mut slots {
        if slot.is_none() {
            while used.contains(&next) {
                next += 1;
            }
            if !SLOTS.contains(&next) {
                return Err(CliError::Conflict(
                    "too many PCI devices: bus 0 has 31 slots".into(),
                ));
            }
            **slot = Some(next);
            used.insert(next);
        }
    }
    Ok(())
}

impl BlockConfig {
    /// The node called `name`.
    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The protocol node under `name` (itself for a `file` node).
    pub fn file_node(&self, name: &str) -> Option<&NodeSpec> {
        let n = self.node(name)?;
        match n.driver {
            Driver::File => Some(n),
            Driver::Format(_) => self.node(n.file.as_deref()?),
        }
    }

    /// A device's `qdev` path: `/machine/peripheral/ID/virtio-backend`, or
    /// `/machine/peripheral-anon/device[N]/virtio-backend` for the Nth anonymous device.
    pub fn qdev(&self, device: usize) -> String {
        let d = &self.devices[device];
        match &d.id {
            Some(id) => format!("/machine/peripheral/{id}/virtio-backend"),
            None => {
                let n = self.devices[..device]
                    .iter()
                    .filter(|d| d.id.is_none())
                    .count();
                format!("/machine/peripheral-anon/device[{n}]/virtio-backend")
            }
        }
    }

    /// The PCI slots the block devices (virtio-blk-pci and vhost-user-blk-pci) take.
    pub fn used_slots(&self) -> Vec<u8> {
        self.devices
            .iter()
            .filter_map(|d| d.slot)
            .chain(self.vhost_user.iter().filter_map(|d| d.slot))
            .collect()
    }

    /// The `id=`s of the block devices.
    pub fn device_ids(&self) -> Vec<String> {
        self.devices
            .iter()
            .filter_map(|d| d.id.clone())
            .chain(self.vhost_user.iter().filter_map(|d| d.id.clone()))
            .collect()
    }

    /// The id vcpu-proc knows the `i`th vhost-user-blk device by (`-device id=`, else its
    /// anonymous qdev path, counted after the anonymous virtio-blk devices).
    pub fn vhost_user_id(&self, i: usize) -> String {
        match &self.vhost_user[i].id {
            Some(id) => id.clone(),
            None => {
                let n = self.devices.iter().filter(|d| d.id.is_none()).count()
                    + self.vhost_user[..i]
                        .iter()
                        .filter(|d| d.id.is_none())
                        .count();
                format!("/machine/peripheral-anon/device[{n}]")
            }
        }
    }

    /// The (rerror, werror) policies device `device` applies: its own `rerror=`/`werror=`,
    /// else its backend's (QEMU's `auto`).
    pub fn error_policies(&self, device: usize) -> (ErrorPolicy, ErrorPolicy) {
        let d = &self.devices[device];
        let (br, bw) = self
            .backends
            .get(d.backend)
            .map_or(crate::io_error::BACKEND_DEFAULT, |b| (b.rerror, b.werror));
        (
            crate::io_error::effective(br, d.rerror),
            crate::io_error::effective(bw, d.werror),
        )
    }

    /// The device id vcpu-proc knows the device by (`-device id=`, else its qdev path).
    pub fn device_id(&self, device: usize) -> String {
        match &self.devices[device].id {
            Some(id) => id.clone(),
            None => self.qdev(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(items: &[(BlockOpt, &str)]) -> Result<Resolved, CliError> {
        resolve(&BlockArgs {
            items: items.iter().map(|(o, v)| (*o, v.to_string())).collect(),
        })
    }

    fn err(items: &[(BlockOpt, &str)]) -> String {
        res(items).expect_err("refused").to_string()
    }

    use BlockOpt::{Blockdev, Device, Drive};

    #[test]
    fn drive_if_virtio_makes_nodes_backend_and_device() {
        let r = res(&[(Drive, "file=/d.raw,format=raw,id=d0,cache=none,serial=S1")]).expect("ok");
        let c = &r.config;
        assert_eq!(c.nodes.len(), 2);
        assert_eq!(c.nodes[0].driver, Driver::File);
        assert_eq!(c.nodes[0].filename.as_deref(), Some("/d.raw"));
        assert_eq!(c.nodes[1].driver, Driver::Format(ImageFormat::Raw));
        assert_eq!(c.nodes[1].direct, Some(true));
        assert_eq!(c.backends[0].name, "d0");
        assert_eq!(c.devices[0].serial.as_deref(), Some("S1"));
        assert_eq!(c.devices[0].slot, Some(1));
        assert_eq!(
            c.qdev(0),
            "/machine/peripheral-anon/device[0]/virtio-backend"
        );
        assert!(r.probe.is_empty());
        // Without format=: probed later; without id: virtio0.
        let r = res(&[(Drive, "file=/d.raw")]).expect("ok");
        assert_eq!(r.config.backends[0].name, "virtio0");
        assert_eq!(r.probe, vec![r.config.backends[0].node.clone()]);
        // -drive throttling (QEMU's keys and the legacy ones); total and per-direction clash.
        let r = res(&[(Drive, "file=/d,throttling.iops-total=100,bps_wr=4096")]).expect("ok");
        assert_eq!(r.config.backends[0].throttle.iops, 100);
        assert_eq!(r.config.backends[0].throttle.bps_wr, 4096);
        assert!(err(&[(
            Drive,
            "file=/d,throttling.bps-total=1,throttling.bps-read=1"
        )])
        .contains("cannot be used at the same time"));
        assert!(err(&[(Drive, "file=/d,throttling.bps-total=-1")]).contains("within"));
        // if=none: a backend, no device.
        let r = res(&[(Drive, "file=/d.raw,if=none,id=x,readonly=on")]).expect("ok");
        assert!(r.config.devices.is_empty());
        assert!(r.config.nodes.iter().all(|n| n.read_only));
    }

    #[test]
    fn blockdev_forms_and_devices() {
        let r = res(&[
            (
                Device,
                "virtio-blk-pci,drive=disk0,id=vd0,num-queues=2,addr=0x5",
            ),
            (
                Blockdev,
                "driver=raw,node-name=disk0,file.driver=file,file.filename=/i.raw,cache.direct=on",
            ),
            (Blockdev, "driver=file,node-name=f0,filename=/j.raw"),
            (Blockdev, "driver=qcow2,node-name=q0,file=f0,read-only=on"),
            (Device, "virtio-blk,drive=q0,serial=abc"),
            (
                Blockdev,
                r#"{"driver":"raw","node-name":"j1","file":{"driver":"file","filename":"/k.raw"}}"#,
            ),
        ])
        .expect("ok");
        let c = &r.config;
        assert_eq!(c.devices.len(), 2);
        assert_eq!(c.devices[0].slot, Some(5));
        assert_eq!(c.devices[1].slot, Some(1));
        assert_eq!(c.devices[0].num_queues, Some(2));
        assert_eq!(c.qdev(0), "/machine/peripheral/vd0/virtio-backend");
        assert_eq!(c.device_id(0), "vd0");
        assert_eq!(
            c.file_node("disk0").and_then(|n| n.filename.as_deref()),
            Some("/i.raw")
        );
        assert_eq!(
            c.file_node("q0").and_then(|n| n.filename.as_deref()),
            Some("/j.raw")
        );
        assert_eq!(
            c.node("j1").map(|n| n.driver),
            Some(Driver::Format(ImageFormat::Raw))
        );
        assert_eq!(c.backends[c.devices[1].backend].name, "");
        assert_eq!(c.node("q0").map(|n| n.read_only), Some(true));
    }

    #[test]
    fn vhost_user_blk_devices_use_client_chardevs() {
        use BlockOpt::Chardev;
        let r = res(&[
            (
                Device,
                "vhost-user-blk-pci,chardev=c0,id=vu0,num-queues=2,addr=4",
            ),
            (Chardev, "socket,id=c0,path=/run/vhost.sock"),
            (Blockdev, "driver=file,node-name=f,filename=/d"),
            (Device, "virtio-blk-pci,drive=f"),
            (Chardev, "socket,id=c1,path=/run/b.sock,server=off"),
            (Device, "vhost-user-blk,chardev=c1"),
        ])
        .expect("ok");
        let c = &r.config;
        assert_eq!(c.chardevs.len(), 2);
        assert_eq!(c.chardevs[0].path, "/run/vhost.sock");
        assert_eq!(c.vhost_user.len(), 2);
        assert_eq!(c.vhost_user[0].slot, Some(4));
        assert_eq!(c.vhost_user[0].num_queues, Some(2));
        assert_eq!(c.vhost_user[0].queue_size, 128);
        assert_eq!(c.vhost_user[1].chardev, 1);
        // Slots are shared with virtio-blk-pci: 1 for it, 2 for the second vhost-user device.
        assert_eq!(c.devices[0].slot, Some(1));
        assert_eq!(c.vhost_user[1].slot, Some(2));
        assert_eq!(c.vhost_user_id(0), "vu0");
        assert_eq!(c.vhost_user_id(1), "/machine/peripheral-anon/device[1]");
        // No backend, no node for them.
        assert_eq!(c.backends.len(), 1);
        let sock = (Chardev, "socket,id=c0,path=/s");
        assert!(err(&[sock, (Device, "vhost-user-blk-pci,id=x")]).contains("chardev"));
        assert!(err(&[(Device, "vhost-user-blk-pci,chardev=nope")]).contains("'nope'"));
        assert!(err(&[
            sock,
            (Device, "vhost-user-blk-pci,chardev=c0"),
            (Device, "vhost-user-blk-pci,chardev=c0")
        ])
        .contains("in use"));
        assert!(
            err(&[sock, (Device, "vhost-user-blk-pci,chardev=c0,size=1")])
                .contains("vhost-user-blk-pci.size")
        );
        assert!(err(&[(Chardev, "socket,id=c0,path=/s,server=on")]).contains("server=on"));
        assert!(err(&[(Chardev, "socket,id=c0")]).contains("path="));
        assert!(err(&[(Chardev, "pty,id=c0")]).contains("'pty'"));
        assert!(err(&[(Chardev, "socket,path=/s")]).contains("no id"));
        assert!(err(&[sock, sock]).contains("duplicate chardev"));
        assert!(err(&[
            sock,
            (Chardev, "socket,id=c1,path=/t"),
            (Device, "vhost-user-blk-pci,chardev=c0,addr=3"),
            (Device, "vhost-user-blk-pci,chardev=c1,addr=3"),
        ])
        .contains("slot 3"));
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert!(err(&[(Drive, "file=/d,if=ide")]).contains("if=ide"));
        assert!(err(&[(Drive, "file=/d,cache=unsafe")]).contains("cache=unsafe"));
        assert_eq!(
            err(&[(Drive, "file=/d,werror=auto")]),
            "-drive file=/d,werror=auto: 'auto' invalid write error action"
        );
        assert!(err(&[(Drive, "file=/d,rerror=enospc")]).contains("'enospc' invalid read"));
        assert!(err(&[
            (Blockdev, "driver=file,node-name=a,filename=/d"),
            (Device, "virtio-blk-pci,drive=a,werror=no")
        ])
        .contains("Parameter 'werror' does not accept value 'no'"));
        assert!(err(&[(Drive, "file=/d,bogus=1")]).contains("'bogus'"));
        assert!(err(&[(Drive, "format=raw")]).contains("file="));
        assert!(err(&[(Drive, "file=/d,format=vmdk")]).contains("vmdk"));
        assert!(
            err(&[(Blockdev, "driver=raw,file.driver=file,file.filename=/d")])
                .contains("node-name")
        );
        assert!(err(&[(Blockdev, "driver=raw,node-name=a")]).contains("'file'"));
        assert!(err(&[(Blockdev, "driver=raw,node-name=a,file=nope")]).contains("nope"));
        assert!(err(&[(Blockdev, "driver=nbd,node-name=a")]).contains("nbd"));
        assert!(err(&[(
            Blockdev,
            "driver=raw,node-name=a,file.driver=host_device,file.filename=/d"
        )])
        .contains("host_device"));
        assert!(err(&[
            (Blockdev, "driver=file,node-name=a,filename=/d"),
            (Blockdev, "driver=file,node-name=a,filename=/e")
        ])
        .contains("Duplicate"));
        assert!(err(&[(Device, "e1000,id=n")]).contains("e1000"));
        assert!(err(&[(Device, "virtio-blk-pci,drive=x")]).contains("can't find value 'x'"));
        assert!(err(&[(Device, "virtio-blk-pci,id=v")]).contains("drive"));
        let two = [
            (Blockdev, "driver=file,node-name=a,filename=/d"),
            (Device, "virtio-blk-pci,drive=a"),
            (Device, "virtio-blk-pci,drive=a"),
        ];
        assert!(err(&two).contains("in use"));
        let slots = [
            (Blockdev, "driver=file,node-name=a,filename=/d"),
            (Blockdev, "driver=file,node-name=b,filename=/e"),
            (Device, "virtio-blk-pci,drive=a,addr=3"),
            (Device, "virtio-blk-pci,drive=b,addr=03.0"),
        ];
        assert!(err(&slots).contains("slot 3"));
        for a in ["0", "0x20", "3.1", "zz"] {
            let v = format!("virtio-blk-pci,drive=a,addr={a}");
            let e = err(&[
                (Blockdev, "driver=file,node-name=a,filename=/d"),
                (Device, v.as_str()),
            ]);
            assert!(e.contains("addr"), "{a}: {e}");
        }
        assert!(err(&[
            (Blockdev, "driver=file,node-name=a,filename=/d"),
            (Device, "virtio-blk-pci,drive=a,num-queues=17")
        ])
        .contains("num-queues"));
        assert!(err(&[
            (Blockdev, "driver=file,node-name=a,filename=/d"),
            (Device, "virtio-blk-pci,drive=a,logical_block_size=4096")
        ])
        .contains("logical_block_size"));
    }

    #[test]
    fn error_policies_come_from_the_drive_unless_the_device_sets_them() {
        use bulkhead_ipc::messages::ErrorPolicy::*;
        // -drive if=virtio: the drive's own (defaults report/enospc).
        let r = res(&[
            (Drive, "file=/d"),
            (Drive, "file=/e,werror=stop,rerror=ignore"),
        ])
        .expect("ok");
        assert_eq!(r.config.error_policies(0), (Report, Enospc));
        assert_eq!(r.config.error_policies(1), (Ignore, Stop));
        // -drive if=none + -device: auto keeps the drive's, a value replaces it.
        let r = res(&[
            (Drive, "file=/d,if=none,id=d0,werror=report"),
            (Drive, "file=/e,if=none,id=d1,werror=report,rerror=stop"),
            (Device, "virtio-blk-pci,drive=d0,werror=auto,rerror=auto"),
            (Device, "virtio-blk-pci,drive=d1,werror=ignore"),
        ])
        .expect("ok");
        assert_eq!(r.config.error_policies(0), (Report, Report));
        assert_eq!(r.config.error_policies(1), (Stop, Ignore));
        // -blockdev + -device: the anonymous backend has blk_new's defaults; the device may
        // say enospc for reads too (QEMU accepts it there).
        let r = res(&[
            (Blockdev, "driver=file,node-name=a,filename=/d"),
            (Blockdev, "driver=file,node-name=b,filename=/e"),
            (Device, "virtio-blk-pci,drive=a"),
            (Device, "virtio-blk-pci,drive=b,rerror=enospc,werror=stop"),
        ])
        .expect("ok");
        assert_eq!(r.config.error_policies(0), (Report, Enospc));
        assert_eq!(r.config.error_policies(1), (Enospc, Stop));
    }
}
