//! The QAPI schema of what Bulkhead implements, for `query-qmp-schema` (and `query-events`).
//!
//! The commands and their arguments come from the [`Registry`] (each command's [`ArgSpec`]s
//! become its argument type), so the schema cannot list a command Bulkhead lacks or miss an
//! argument it takes. What the registry does not know is kept here: each command's return type
//! ([`RETURNS`]), each event's data type ([`EVENTS`]) and the named types they use ([`TYPES`]).
//! The unit tests fail, naming the culprit, when a registry command has no entry in
//! [`RETURNS`], when an entry has no command, when an event the bus can emit is missing from
//! [`EVENTS`] (or one is listed that it cannot emit), and when a type is undefined or unused.
//!
//! The output is QEMU's introspection format (QEMU's `qapi/introspect.json`, as QEMU 7.2
//! produces it): a list of `SchemaInfo` objects, commands then events then every type they use,
//! in order of first use; type names other than builtins are masked as numbers in that order
//! (`"0"`, `"1"`, ...), arrays are named `[T]` after their element, every command without
//! arguments or result and every event without data uses the empty object type; optional
//! members carry `"default": null`; enums carry both `members` (7.2) and `values` (2.12).
//!
//! Enumerations list the values Bulkhead produces or accepts, not every value QEMU defines for
//! the type (`RunState` lists the six states Bulkhead reaches, `SysEmuTarget` only `x86_64`);
//! the types describing the introspection format itself are QEMU's, complete. Where QEMU 2.12
//! and 7.2 differ, Bulkhead answers both ways (`query-cpus-fast` carries 2.12's `arch`,
//! deprecated, and 7.2's `target`), and the schema says so.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use super::commands::{ArgSpec, ArgType, Registry};
use super::qdict;

/// A member of an object type: name, type (a builtin, `[T]`, or a name in [`TYPES`]),
/// optional, features.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Member name.
    pub name: &'static str,
    /// Its type.
    pub ty: &'static str,
    /// May be absent.
    pub optional: bool,
    /// QAPI features (`deprecated`, ...).
    pub features: &'static [&'static str],
}

const fn req(name: &'static str, ty: &'static str) -> Member {
    Member {
        name,
        ty,
        optional: false,
        features: &[],
    }
}

const fn opt(name: &'static str, ty: &'static str) -> Member {
    Member {
        name,
        ty,
        optional: true,
        features: &[],
    }
}

const fn deprecated(m: Member) -> Member {
    Member {
        features: &["deprecated"],
        ..m
    }
}

/// A named type.
#[derive(Debug, Clone, Copy)]
pub enum TypeDef {
    /// An object; a flat union when it has variants: `(tag member, [(tag value, type)])`.
    Object {
        /// Its members.
        members: &'static [Member],
        /// Variant members chosen by the tag.
        variants: Option<(&'static str, &'static [(&'static str, &'static str)])>,
    },
    /// An enumeration.
    Enum(&'static [&'static str]),
}

const fn object(members: &'static [Member]) -> TypeDef {
    TypeDef::Object {
        members,
        variants: None,
    }
}

/// The empty object: arguments of a command that takes none, result of a command that returns
/// `{}`, data of an event that has none (QEMU's `q_empty`).
pub const EMPTY: &str = "q_empty";

/// QAPI features of command arguments, as QEMU 7.2 declares them: (command, argument,
/// features).
const ARG_FEATURES: &[(&str, &str, &[&str])] =
    &[("block_set_io_throttle", "device", &["deprecated"])];

/// Each command's return type (`ret-type`). One entry per registry command, no other.
pub const RETURNS: &[(&str, &str)] = &[
    ("add-fd", "AddfdInfo"),
    ("block_resize", EMPTY),
    ("block-set-write-threshold", EMPTY),
    ("blockdev-add", EMPTY),
    ("blockdev-del", EMPTY),
    ("block_set_io_throttle", EMPTY),
    ("closefd", EMPTY),
    ("cont", EMPTY),
    ("device_add", EMPTY),
    ("device_del", EMPTY),
    ("getfd", EMPTY),
    ("human-monitor-command", "str"),
    ("netdev_add", EMPTY),
    ("netdev_del", EMPTY),
    ("qmp_capabilities", EMPTY),
    ("query-block", "[BlockInfo]"),
    ("query-blockstats", "[BlockStats]"),
    ("query-chardev", "[ChardevInfo]"),
    ("query-command-line-options", "[CommandLineOptionInfo]"),
    ("query-commands", "[CommandInfo]"),
    ("query-cpus", "[CpuInfo]"),
    ("query-cpus-fast", "[CpuInfoFast]"),
    ("query-events", "[EventInfo]"),
    ("query-fdsets", "[FdsetInfo]"),
    ("query-kvm", "KvmInfo"),
    ("query-name", "NameInfo"),
    ("query-named-block-nodes", "[BlockDeviceInfo]"),
    ("query-qmp-schema", "[SchemaInfo]"),
    ("query-rx-filter", "[RxFilterInfo]"),
    ("query-status", "StatusInfo"),
    ("query-uuid", "UuidInfo"),
    ("query-version", "VersionInfo"),
    ("quit", EMPTY),
    ("remove-fd", EMPTY),
    ("set_link", EMPTY),
    ("stop", EMPTY),
    ("system_powerdown", EMPTY),
    ("system_reset", EMPTY),
    ("x-blockdev-del", EMPTY),
    ("x-query-sandbox", "XSandboxInfo"),
];

/// Every event the bus can emit, with its data type. Exactly the events of
/// [`super::events::Event`].
pub const EVENTS: &[(&str, &str)] = &[
    ("BLOCK_IO_ERROR", "q_obj_BLOCK_IO_ERROR-arg"),
    ("BLOCK_WRITE_THRESHOLD", "q_obj_BLOCK_WRITE_THRESHOLD-arg"),
    ("DEVICE_DELETED", "q_obj_DEVICE_DELETED-arg"),
    ("NIC_RX_FILTER_CHANGED", "q_obj_NIC_RX_FILTER_CHANGED-arg"),
    ("POWERDOWN", EMPTY),
    ("RESET", "q_obj_RESET-arg"),
    ("RESUME", EMPTY),
    ("SHUTDOWN", "q_obj_SHUTDOWN-arg"),
    ("STOP", EMPTY),
    ("X_WORKER_EXITED", "q_obj_X_WORKER_EXITED-arg"),
];

/// The named types, by the names QEMU's schema gives them (masked on the wire).
pub const TYPES: &[(&str, TypeDef)] = &[
    (EMPTY, object(&[])),
    // query-rx-filter (crate::nics)
    (
        "RxFilterInfo",
        object(&[
            req("name", "str"),
            req("promiscuous", "bool"),
            req("multicast", "RxState"),
            req("unicast", "RxState"),
            req("vlan", "RxState"),
            req("broadcast-allowed", "bool"),
            req("multicast-overflow", "bool"),
            req("unicast-overflow", "bool"),
            req("main-mac", "str"),
            req("vlan-table", "[int]"),
            req("unicast-table", "[str]"),
            req("multicast-table", "[str]"),
        ]),
    ),
    ("RxState", TypeDef::Enum(&["normal", "none", "all"])),
    // query-status
    (
        "StatusInfo",
        object(&[
            req("running", "bool"),
            req("singlestep", "bool"),
            req("status", "RunState"),
        ]),
    ),
    // The states Bulkhead reaches (crate::vm::RunState), in QEMU's order.
    (
        "RunState",
        TypeDef::Enum(&[
            "internal-error",
            "io-error",
            "paused",
            "prelaunch",
            "running",
            "shutdown",
        ]),
    ),
    // query-version
    (
        "VersionInfo",
        object(&[req("qemu", "VersionTriple"), req("package", "str")]),
    ),
    (
        "VersionTriple",
        object(&[
            req("major", "int"),
            req("minor", "int"),
            req("micro", "int"),
        ]),
    ),
    ("CommandInfo", object(&[req("name", "str")])),
    ("EventInfo", object(&[req("name", "str")])),
    ("NameInfo", object(&[opt("name", "str")])),
    ("UuidInfo", object(&[req("UUID", "str")])),
    (
        "KvmInfo",
        object(&[req("enabled", "bool"), req("present", "bool")]),
    ),
    // query-cpus, in QEMU 2.12's form.
    (
        "CpuInfo",
        TypeDef::Object {
            members: &[
                req("CPU", "int"),
                req("current", "bool"),
                req("halted", "bool"),
                req("qom_path", "str"),
                req("thread_id", "int"),
                opt("props", "CpuInstanceProperties"),
                req("arch", "CpuInfoArch"),
            ],
            variants: Some(("arch", &[("x86", "CpuInfoX86")])),
        },
    ),
    ("CpuInfoX86", object(&[req("pc", "int")])),
    ("CpuInfoArch", TypeDef::Enum(&["x86"])),
    // query-cpus-fast: 2.12's `arch` (deprecated since 3.0, gone in 6.0) and 7.2's `target`.
    (
        "CpuInfoFast",
        object(&[
            req("cpu-index", "int"),
            req("qom-path", "str"),
            req("thread-id", "int"),
            opt("props", "CpuInstanceProperties"),
            deprecated(req("arch", "CpuInfoArch")),
            req("target", "SysEmuTarget"),
        ]),
    ),
    ("SysEmuTarget", TypeDef::Enum(&["x86_64"])),
    (
        "CpuInstanceProperties",
        object(&[
            opt("socket-id", "int"),
            opt("die-id", "int"),
            opt("core-id", "int"),
            opt("thread-id", "int"),
        ]),
    ),
    (
        "ChardevInfo",
        object(&[
            req("label", "str"),
            req("filename", "str"),
            req("frontend-open", "bool"),
        ]),
    ),
    // query-command-line-options
    (
        "CommandLineOptionInfo",
        object(&[
            req("option", "str"),
            req("parameters", "[CommandLineParameterInfo]"),
        ]),
    ),
    (
        "CommandLineParameterInfo",
        object(&[
            req("name", "str"),
            req("type", "CommandLineParameterType"),
            opt("help", "str"),
            opt("default", "str"),
        ]),
    ),
    (
        "CommandLineParameterType",
        TypeDef::Enum(&["string", "boolean", "number", "size"]),
    ),
    // The fd commands.
    (
        "AddfdInfo",
        object(&[req("fdset-id", "int"), req("fd", "int")]),
    ),
    (
        "FdsetInfo",
        object(&[req("fdset-id", "int"), req("fds", "[FdsetFdInfo]")]),
    ),
    (
        "FdsetFdInfo",
        object(&[req("fd", "int"), opt("opaque", "str")]),
    ),
    // x-query-sandbox (a Bulkhead extension; see qmp/commands/sandbox.rs).
    (
        "XSandboxInfo",
        object(&[
            req("mode", "XSandboxMode"),
            req("processes", "[XSandboxProcess]"),
        ]),
    ),
    ("XSandboxMode", TypeDef::Enum(&["on", "off", "allow-weak"])),
    (
        "XSandboxProcess",
        object(&[
            req("role", "XSandboxRole"),
            req("pid", "int"),
            req("ns-pid", "int"),
            req("namespaces", "[XSandboxNamespace]"),
            req("uid", "XSandboxIds"),
            req("gid", "XSandboxIds"),
            req("groups", "[int]"),
            req("capabilities", "XSandboxCapabilities"),
            req("no-new-privs", "bool"),
            req("seccomp", "XSandboxSeccomp"),
            req("landlock", "XSandboxLandlock"),
            req("rlimits", "[XSandboxRlimit]"),
        ]),
    ),
    (
        "XSandboxRole",
        TypeDef::Enum(&["vcpu", "blockd", "netd", "monitor", "launcher"]),
    ),
    (
        "XSandboxNamespace",
        object(&[
            req("type", "str"),
            req("id", "int"),
            req("differs-from-monitor", "bool"),
        ]),
    ),
    (
        "XSandboxIds",
        object(&[
            req("outside", "int"),
            opt("inside", "int"),
            req("map", "[XSandboxIdRange]"),
        ]),
    ),
    (
        "XSandboxIdRange",
        object(&[
            req("inside", "int"),
            req("outside", "int"),
            req("count", "int"),
        ]),
    ),
    (
        "XSandboxCapabilities",
        object(&[
            req("inheritable", "int"),
            req("permitted", "int"),
            req("effective", "int"),
            req("bounding", "int"),
            req("ambient", "int"),
        ]),
    ),
    (
        "XSandboxSeccomp",
        object(&[
            req("mode", "XSandboxSeccompMode"),
            req("filters", "int"),
            opt("instructions", "int"),
        ]),
    ),
    (
        "XSandboxSeccompMode",
        TypeDef::Enum(&["disabled", "strict", "filter"]),
    ),
    (
        "XSandboxLandlock",
        object(&[
            req("source", "XSandboxReportSource"),
            req("abi", "int"),
            req("status", "XSandboxLandlockStatus"),
            opt("weaknesses", "[str]"),
            opt("enter-us", "int"),
        ]),
    ),
    (
        "XSandboxReportSource",
        TypeDef::Enum(&["worker-reported", "monitor-recorded"]),
    ),
    (
        "XSandboxLandlockStatus",
        TypeDef::Enum(&[
            "fully-enforced",
            "partially-enforced",
            "not-enforced",
            "unknown",
        ]),
    ),
    (
        "XSandboxRlimit",
        object(&[
            req("name", "str"),
            opt("soft", "int"),
            opt("hard", "int"),
            opt("units", "str"),
        ]),
    ),
    // Event data.
    (
        "q_obj_SHUTDOWN-arg",
        object(&[req("guest", "bool"), req("reason", "ShutdownCause")]),
    ),
    (
        "q_obj_RESET-arg",
        object(&[req("guest", "bool"), req("reason", "ShutdownCause")]),
    ),
    // query-block, query-named-block-nodes, query-blockstats (qmp/commands/block.rs): the
    // members Bulkhead sends; QEMU's other optional members (throttling maxima, dirty bitmaps,
    // snapshots, encryption, other formats' specific data, latency histograms) are left out.
    (
        "BlockInfo",
        object(&[
            req("device", "str"),
            opt("qdev", "str"),
            req("type", "str"),
            req("removable", "bool"),
            req("locked", "bool"),
            opt("inserted", "BlockDeviceInfo"),
            opt("tray_open", "bool"),
            opt("io-status", "BlockDeviceIoStatus"),
        ]),
    ),
    (
        "BlockDeviceIoStatus",
        TypeDef::Enum(&["ok", "failed", "nospace"]),
    ),
    (
        "BlockDeviceInfo",
        object(&[
            req("file", "str"),
            opt("node-name", "str"),
            req("ro", "bool"),
            req("drv", "str"),
            opt("backing_file", "str"),
            req("backing_file_depth", "int"),
            req("encrypted", "bool"),
            req("detect_zeroes", "BlockdevDetectZeroesOptions"),
            req("bps", "int"),
            req("bps_rd", "int"),
            req("bps_wr", "int"),
            req("iops", "int"),
            req("iops_rd", "int"),
            req("iops_wr", "int"),
            req("image", "ImageInfo"),
            opt("group", "str"),
            req("cache", "BlockdevCacheInfo"),
            req("write_threshold", "int"),
        ]),
    ),
    ("BlockdevDetectZeroesOptions", TypeDef::Enum(&["off"])),
    (
        "ImageInfo",
        object(&[
            req("filename", "str"),
            req("format", "str"),
            opt("dirty-flag", "bool"),
            opt("actual-size", "int"),
            req("virtual-size", "int"),
            opt("cluster-size", "int"),
            opt("backing-filename", "str"),
            opt("full-backing-filename", "str"),
            opt("backing-filename-format", "str"),
            opt("backing-image", "ImageInfo"),
            opt("format-specific", "ImageInfoSpecific"),
        ]),
    ),
    (
        "ImageInfoSpecific",
        TypeDef::Object {
            members: &[req("type", "ImageInfoSpecificKind")],
            variants: Some(("type", &[("qcow2", "ImageInfoSpecificQCow2Wrapper")])),
        },
    ),
    ("ImageInfoSpecificKind", TypeDef::Enum(&["qcow2"])),
    (
        "ImageInfoSpecificQCow2Wrapper",
        object(&[req("data", "ImageInfoSpecificQCow2")]),
    ),
    (
        "ImageInfoSpecificQCow2",
        object(&[
            req("compat", "str"),
            opt("extended-l2", "bool"),
            opt("lazy-refcounts", "bool"),
            opt("corrupt", "bool"),
            req("refcount-bits", "int"),
            req("compression-type", "Qcow2CompressionType"),
        ]),
    ),
    ("Qcow2CompressionType", TypeDef::Enum(&["zlib", "zstd"])),
    (
        "BlockdevCacheInfo",
        object(&[
            req("writeback", "bool"),
            req("direct", "bool"),
            req("no-flush", "bool"),
        ]),
    ),
    (
        "BlockStats",
        object(&[
            opt("device", "str"),
            opt("qdev", "str"),
            opt("node-name", "str"),
            req("stats", "BlockDeviceStats"),
            opt("driver-specific", "BlockStatsSpecific"),
            opt("parent", "BlockStats"),
            opt("backing", "BlockStats"),
        ]),
    ),
    (
        "BlockDeviceStats",
        object(&[
            req("rd_bytes", "int"),
            req("wr_bytes", "int"),
            req("unmap_bytes", "int"),
            req("rd_operations", "int"),
            req("wr_operations", "int"),
            req("flush_operations", "int"),
            req("unmap_operations", "int"),
            req("rd_total_time_ns", "int"),
            req("wr_total_time_ns", "int"),
            req("flush_total_time_ns", "int"),
            req("unmap_total_time_ns", "int"),
            req("wr_highest_offset", "int"),
            req("rd_merged", "int"),
            req("wr_merged", "int"),
            req("unmap_merged", "int"),
            opt("idle_time_ns", "int"),
            req("failed_rd_operations", "int"),
            req("failed_wr_operations", "int"),
            req("failed_flush_operations", "int"),
            req("failed_unmap_operations", "int"),
            req("invalid_rd_operations", "int"),
            req("invalid_wr_operations", "int"),
            req("invalid_flush_operations", "int"),
            req("invalid_unmap_operations", "int"),
            req("account_invalid", "bool"),
            req("account_failed", "bool"),
            req("timed_stats", "[BlockDeviceTimedStats]"),
        ]),
    ),
    (
        "BlockDeviceTimedStats",
        object(&[
            req("interval_length", "int"),
            req("min_rd_latency_ns", "int"),
            req("max_rd_latency_ns", "int"),
            req("avg_rd_latency_ns", "int"),
            req("min_wr_latency_ns", "int"),
            req("max_wr_latency_ns", "int"),
            req("avg_wr_latency_ns", "int"),
            req("min_flush_latency_ns", "int"),
            req("max_flush_latency_ns", "int"),
            req("avg_flush_latency_ns", "int"),
            req("avg_rd_queue_depth", "number"),
            req("avg_wr_queue_depth", "number"),
        ]),
    ),
    (
        "BlockStatsSpecific",
        TypeDef::Object {
            members: &[req("driver", "BlockdevDriver")],
            variants: Some(("driver", &[("file", "BlockStatsSpecificFile")])),
        },
    ),
    ("BlockdevDriver", TypeDef::Enum(&["file"])),
    (
        "BlockStatsSpecificFile",
        object(&[
            req("discard-nb-ok", "int"),
            req("discard-nb-failed", "int"),
            req("discard-bytes-ok", "int"),
        ]),
    ),
    (
        "q_obj_BLOCK_WRITE_THRESHOLD-arg",
        object(&[
            req("node-name", "str"),
            req("amount-exceeded", "int"),
            req("write-threshold", "int"),
        ]),
    ),
    (
        "q_obj_BLOCK_IO_ERROR-arg",
        object(&[
            req("device", "str"),
            opt("node-name", "str"),
            req("operation", "IoOperationType"),
            req("action", "BlockErrorAction"),
            opt("nospace", "bool"),
            req("reason", "str"),
        ]),
    ),
    ("IoOperationType", TypeDef::Enum(&["read", "write"])),
    (
        "BlockErrorAction",
        TypeDef::Enum(&["ignore", "report", "stop"]),
    ),
    (
        "q_obj_DEVICE_DELETED-arg",
        object(&[opt("device", "str"), req("path", "str")]),
    ),
    (
        "q_obj_NIC_RX_FILTER_CHANGED-arg",
        object(&[opt("name", "str"), req("path", "str")]),
    ),
    // A Bulkhead extension (qmp/events.rs WorkerExit).
    (
        "q_obj_X_WORKER_EXITED-arg",
        object(&[
            req("role", "XSandboxRole"),
            req("pid", "int"),
            req("sandbox-violation", "bool"),
            req("description", "str"),
            opt("exit-status", "int"),
            opt("signal", "str"),
            opt("syscall", "int"),
            opt("syscall-name", "str"),
            opt("device", "str"),
        ]),
    ),
    // The causes Bulkhead's events use (crate::qmp::events::ShutdownCause), in QEMU's order.
    (
        "ShutdownCause",
        TypeDef::Enum(&[
            "host-error",
            "host-qmp-quit",
            "host-qmp-system-reset",
            "host-signal",
            "guest-shutdown",
            "guest-reset",
            "guest-panic",
        ]),
    ),
    // The introspection format itself (QEMU's qapi/introspect.json, 7.2).
    (
        "SchemaInfo",
        TypeDef::Object {
            members: &[
                req("name", "str"),
                req("meta-type", "SchemaMetaType"),
                opt("features", "[str]"),
            ],
            variants: Some((
                "meta-type",
                &[
                    ("builtin", "SchemaInfoBuiltin"),
                    ("enum", "SchemaInfoEnum"),
                    ("array", "SchemaInfoArray"),
                    ("object", "SchemaInfoObject"),
                    ("alternate", "SchemaInfoAlternate"),
                    ("command", "SchemaInfoCommand"),
                    ("event", "SchemaInfoEvent"),
                ],
            )),
        },
    ),
    (
        "SchemaMetaType",
        TypeDef::Enum(&[
            "builtin",
            "enum",
            "array",
            "object",
            "alternate",
            "command",
            "event",
        ]),
    ),
    ("SchemaInfoBuiltin", object(&[req("json-type", "JSONType")])),
    (
        "JSONType",
        TypeDef::Enum(&[
            "string", "number", "int", "boolean", "null", "object", "array", "value",
        ]),
    ),
    (
        "SchemaInfoEnum",
        object(&[
            req("members", "[SchemaInfoEnumMember]"),
            deprecated(req("values", "[str]")),
        ]),
    ),
    (
        "SchemaInfoEnumMember",
        object(&[req("name", "str"), opt("features", "[str]")]),
    ),
    ("SchemaInfoArray", object(&[req("element-type", "str")])),
    (
        "SchemaInfoObject",
        object(&[
            req("members", "[SchemaInfoObjectMember]"),
            opt("tag", "str"),
            opt("variants", "[SchemaInfoObjectVariant]"),
        ]),
    ),
    (
        "SchemaInfoObjectMember",
        object(&[
            req("name", "str"),
            req("type", "str"),
            opt("default", "any"),
            opt("features", "[str]"),
        ]),
    ),
    (
        "SchemaInfoObjectVariant",
        object(&[req("case", "str"), req("type", "str")]),
    ),
    (
        "SchemaInfoAlternate",
        object(&[req("members", "[SchemaInfoAlternateMember]")]),
    ),
    ("SchemaInfoAlternateMember", object(&[req("type", "str")])),
    (
        "SchemaInfoCommand",
        object(&[
            req("arg-type", "str"),
            req("ret-type", "str"),
            opt("allow-oob", "bool"),
        ]),
    ),
    ("SchemaInfoEvent", object(&[req("arg-type", "str")])),
];

/// Builtin types and their JSON types.
const BUILTINS: &[(&str, &str)] = &[
    ("str", "string"),
    ("int", "int"),
    ("bool", "boolean"),
    ("number", "number"),
    ("null", "null"),
    ("any", "value"),
];

/// Why the schema cannot be produced (the unit tests make sure it always can).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// A registry command has no entry in [`RETURNS`].
    #[error("the QMP schema has no return type for command '{0}'")]
    NoReturnType(String),
    /// A type is referenced but not defined.
    #[error("the QMP schema uses the undefined type '{0}'")]
    UndefinedType(String),
}

/// A member with owned strings (the argument types are made at run time).
#[derive(Debug, Clone)]
struct OwnedMember {
    name: String,
    ty: String,
    optional: bool,
    features: Vec<String>,
}

#[derive(Debug, Clone)]
enum Def {
    Object {
        members: Vec<OwnedMember>,
        variants: Option<(String, Vec<(String, String)>)>,
    },
    Enum(Vec<String>),
}

fn owned(def: &TypeDef) -> Def {
    match def {
        TypeDef::Object { members, variants } => Def::Object {
            members: members
                .iter()
                .map(|m| OwnedMember {
                    name: m.name.into(),
                    ty: m.ty.into(),
                    optional: m.optional,
                    features: m.features.iter().map(|f| f.to_string()).collect(),
                })
                .collect(),
            variants: variants.map(|(tag, cases)| {
                (
                    tag.to_string(),
                    cases
                        .iter()
                        .map(|(c, t)| (c.to_string(), t.to_string()))
                        .collect(),
                )
            }),
        },
        TypeDef::Enum(values) => Def::Enum(values.iter().map(|v| v.to_string()).collect()),
    }
}

/// The argument type of `command` as its [`ArgSpec`]s declare it, adding the types it needs
/// to `defs`; returns its name.
fn arg_type(command: &str, specs: &[ArgSpec], defs: &mut BTreeMap<String, Def>) -> String {
    if specs.is_empty() {
        return EMPTY.to_string();
    }
    let name = format!("q_obj_{command}-arg");
    let members = specs
        .iter()
        .map(|s| {
            let ty = match s.ty {
                ArgType::Str => "str".to_string(),
                ArgType::Int => "int".to_string(),
                ArgType::Bool => "bool".to_string(),
                // QAPI has no builtin for "some object": QEMU declares such arguments 'any'.
                ArgType::Object | ArgType::Any => "any".to_string(),
                ArgType::EnumList(values) => {
                    let enum_name = format!("q_enum_{command}-{}", s.name);
                    defs.insert(
                        enum_name.clone(),
                        Def::Enum(values.iter().map(|v| v.to_string()).collect()),
                    );
                    format!("[{enum_name}]")
                }
            };
            OwnedMember {
                name: s.name.to_string(),
                ty,
                optional: s.optional,
                features: ARG_FEATURES
                    .iter()
                    .filter(|(c, a, _)| *c == command && *a == s.name)
                    .flat_map(|(_, _, f)| f.iter().map(|x| x.to_string()))
                    .collect(),
            }
        })
        .collect();
    defs.insert(
        name.clone(),
        Def::Object {
            members,
            variants: None,
        },
    );
    name
}

fn builtin(name: &str) -> Option<&'static str> {
    BUILTINS.iter().find(|(b, _)| *b == name).map(|(_, j)| *j)
}

fn array_element(name: &str) -> Option<&str> {
    name.strip_prefix('[')?.strip_suffix(']')
}

/// The generator: QEMU's algorithm (scripts/qapi/introspect.py) over our tables.
struct Gen<'a> {
    defs: &'a BTreeMap<String, Def>,
    masked: HashMap<String, String>,
    used: Vec<String>,
    entries: Vec<Value>,
}

impl Gen<'_> {
    fn mask(&mut self, name: &str) -> String {
        let next = self.masked.len().to_string();
        self.masked.entry(name.to_string()).or_insert(next).clone()
    }

    /// Notes `ty` as used and returns its name as the wire shows it.
    fn use_type(&mut self, ty: &str) -> Result<String, SchemaError> {
        if !self.used.iter().any(|u| u == ty) {
            self.used.push(ty.to_string());
        }
        if builtin(ty).is_some() {
            return Ok(ty.to_string());
        }
        if let Some(elem) = array_element(ty) {
            return Ok(format!("[{}]", self.use_type(elem)?));
        }
        if !self.defs.contains_key(ty) {
            return Err(SchemaError::UndefinedType(ty.to_string()));
        }
        Ok(self.mask(ty))
    }

    fn features(list: &[String]) -> Option<Value> {
        (!list.is_empty()).then(|| Value::from(list.to_vec()))
    }

    fn type_entry(&mut self, ty: &str) -> Result<Value, SchemaError> {
        if let Some(json) = builtin(ty) {
            return Ok(qdict::object([
                ("name", Value::from(ty)),
                ("meta-type", "builtin".into()),
                ("json-type", json.into()),
            ]));
        }
        if let Some(elem) = array_element(ty) {
            let elem = self.use_type(elem)?;
            return Ok(qdict::object([
                ("name", Value::from(format!("[{elem}]"))),
                ("meta-type", "array".into()),
                ("element-type", elem.into()),
            ]));
        }
        let def = self
            .defs
            .get(ty)
            .ok_or_else(|| SchemaError::UndefinedType(ty.to_string()))?;
        let name = Value::from(self.mask(ty));
        match def {
            Def::Enum(values) => Ok(qdict::object([
                ("name", name),
                ("meta-type", "enum".into()),
                (
                    "members",
                    values
                        .iter()
                        .map(|v| qdict::object([("name", Value::from(v.as_str()))]))
                        .collect(),
                ),
                ("values", values.clone().into()),
            ])),
            Def::Object { members, variants } => {
                let mut list = Vec::new();
                for m in members {
                    let mut fields = vec![
                        ("name", Value::from(m.name.as_str())),
                        ("type", self.use_type(&m.ty)?.into()),
                    ];
                    if m.optional {
                        fields.push(("default", Value::Null));
                    }
                    if let Some(f) = Self::features(&m.features) {
                        fields.push(("features", f));
                    }
                    list.push(qdict::object(fields));
                }
                let mut fields = vec![
                    ("name", name),
                    ("meta-type", "object".into()),
                    ("members", list.into()),
                ];
                if let Some((tag, cases)) = variants {
                    let mut vs = Vec::new();
                    for (case, ty) in cases {
                        vs.push(qdict::object([
                            ("case", Value::from(case.as_str())),
                            ("type", self.use_type(ty)?.into()),
                        ]));
                    }
                    fields.push(("tag", tag.as_str().into()));
                    fields.push(("variants", vs.into()));
                }
                Ok(qdict::object(fields))
            }
        }
    }
}

/// The `query-qmp-schema` answer for the commands of `registry` and the events of [`EVENTS`].
pub fn introspect(registry: &Registry) -> Result<Value, SchemaError> {
    let mut defs: BTreeMap<String, Def> = TYPES
        .iter()
        .map(|(n, d)| (n.to_string(), owned(d)))
        .collect();
    let returns: BTreeMap<&str, &str> = RETURNS.iter().copied().collect();
    let mut commands = Vec::new();
    for name in registry.names() {
        let Some(cmd) = registry.get(name) else {
            continue;
        };
        let ret = returns
            .get(name)
            .ok_or_else(|| SchemaError::NoReturnType(name.to_string()))?;
        let arg = arg_type(name, cmd.args, &mut defs);
        commands.push((name, arg, *ret));
    }
    let mut gen = Gen {
        defs: &defs,
        masked: HashMap::new(),
        used: Vec::new(),
        entries: Vec::new(),
    };
    for (name, arg, ret) in commands {
        let arg = gen.use_type(&arg)?;
        let ret = gen.use_type(ret)?;
        gen.entries.push(qdict::object([
            ("name", Value::from(name)),
            ("meta-type", "command".into()),
            ("arg-type", arg.into()),
            ("ret-type", ret.into()),
        ]));
    }
    for (name, data) in EVENTS {
        let arg = gen.use_type(data)?;
        gen.entries.push(qdict::object([
            ("name", Value::from(*name)),
            ("meta-type", "event".into()),
            ("arg-type", arg.into()),
        ]));
    }
    // Every type used, in order of first use; using one may add more to the end.
    let mut i = 0;
    while i < gen.used.len() {
        let ty = gen.used[i].clone();
        let entry = gen.type_entry(&ty)?;
        gen.entries.push(entry);
        i += 1;
    }
    Ok(Value::Array(gen.entries))
}

/// The names of the events Bulkhead emits (`query-events`).
pub fn event_names() -> impl Iterator<Item = &'static str> {
    EVENTS.iter().map(|(n, _)| *n)
}

/// Checks `value` against the type `ty` of an introspected schema (the `query-qmp-schema`
/// answer): `Ok` when the value has exactly the shape the schema promises. For tests, here and
/// in the integration tests, that hold every answer to its schema.
pub fn check_value(schema: &Value, ty: &str, value: &Value) -> Result<(), String> {
    let entries: HashMap<&str, &Value> = schema
        .as_array()
        .ok_or("the schema is not a list")?
        .iter()
        .filter_map(|e| Some((e.get("name")?.as_str()?, e)))
        .collect();
    check(&entries, ty, value, "value")
}

fn check(entries: &HashMap<&str, &Value>, ty: &str, value: &Value, at: &str) -> Result<(), String> {
    let entry = entries
        .get(ty)
        .ok_or_else(|| format!("{at}: type {ty} is not in the schema"))?;
    let str_of = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let meta = str_of(entry, "meta-type").unwrap_or_default();
    let fail = |what: &str| Err(format!("{at}: expected {what} ({ty}), got {value}"));
    match meta.as_str() {
        "builtin" => {
            let ok = match str_of(entry, "json-type").as_deref() {
                Some("string") => value.is_string(),
                Some("int") => value.is_i64() || value.is_u64(),
                Some("number") => value.is_number(),
                Some("boolean") => value.is_boolean(),
                Some("null") => value.is_null(),
                Some("object") => value.is_object(),
                Some("array") => value.is_array(),
                Some("value") => true,
                _ => false,
            };
            if ok {
                Ok(())
            } else {
                fail("a builtin")
            }
        }
        "array" => {
            let elem = str_of(entry, "element-type").unwrap_or_default();
            let Some(items) = value.as_array() else {
                return fail("an array");
            };
            for (i, item) in items.iter().enumerate() {
                check(entries, &elem, item, &format!("{at}[{i}]"))?;
            }
            Ok(())
        }
        "enum" => {
            let values = entry.get("values").and_then(Value::as_array);
            match (value.as_str(), values) {
                (Some(s), Some(vs)) if vs.iter().any(|v| v.as_str() == Some(s)) => Ok(()),
                _ => fail("an enum value"),
            }
        }
        "alternate" => {
            let members = entry
                .get("members")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for m in members {
                let t = str_of(&m, "type").unwrap_or_default();
                if check(entries, &t, value, at).is_ok() {
                    return Ok(());
                }
            }
            fail("one of the alternatives")
        }
        "object" => {
            let Some(obj) = value.as_object() else {
                return fail("an object");
            };
            let mut members: Vec<Value> = entry
                .get("members")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if let Some(tag) = str_of(entry, "tag") {
                let tag_value = obj.get(&tag).and_then(Value::as_str).unwrap_or_default();
                let variants = entry
                    .get("variants")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if let Some(v) = variants
                    .iter()
                    .find(|v| v.get("case").and_then(Value::as_str) == Some(tag_value))
                {
                    let vt = str_of(v, "type").unwrap_or_default();
                    let vt_entry = entries
                        .get(vt.as_str())
                        .ok_or_else(|| format!("{at}: variant type {vt} is not in the schema"))?;
                    members.extend(
                        vt_entry
                            .get("members")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default(),
                    );
                }
            }
            let mut known = BTreeSet::new();
            for m in &members {
                let name = str_of(m, "name").unwrap_or_default();
                let t = str_of(m, "type").unwrap_or_default();
                let optional = m.get("default").is_some();
                match obj.get(&name) {
                    Some(v) => check(entries, &t, v, &format!("{at}.{name}"))?,
                    None if optional => {}
                    None => return Err(format!("{at}: member '{name}' is missing ({ty})")),
                }
                known.insert(name);
            }
            if let Some(extra) = obj.keys().find(|k| !known.contains(*k)) {
                return Err(format!(
                    "{at}: member '{extra}' is not in the schema ({ty})"
                ));
            }
            Ok(())
        }
        other => Err(format!("{at}: unknown meta-type '{other}' for {ty}")),
    }
}

/// The type (as the wire names it) that `command` returns, in an introspected schema.
pub fn ret_type_of<'a>(schema: &'a Value, command: &str) -> Option<&'a str> {
    schema
        .as_array()?
        .iter()
        .find(|e| e["name"] == command && e["meta-type"] == "command")?
        .get("ret-type")?
        .as_str()
}

/// The type (as the wire names it) of `event`'s data, in an introspected schema.
pub fn event_type_of<'a>(schema: &'a Value, event: &str) -> Option<&'a str> {
    schema
        .as_array()?
        .iter()
        .find(|e| e["name"] == event && e["meta-type"] == "event")?
        .get("arg-type")?
        .as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::events::{Event, ShutdownCause};
    use crate::vm::RunState;
    use serde_json::json;

    /// Every event the bus can emit. The match makes adding an `Event` variant without
    /// updating this list (and so [`EVENTS`]) a compile error here.
    fn every_event() -> Vec<Event> {
        let all = vec![
            Event::Stop,
            Event::Resume,
            Event::Reset(ShutdownCause::HostQmpSystemReset),
            Event::Shutdown(ShutdownCause::HostQmpQuit),
            Event::WorkerExited(crate::qmp::events::WorkerExit {
                role: "vcpu",
                pid: 1,
                exit_status: Some(1),
                signal: None,
                syscall: None,
                description: String::new(),
                device: Some("vd0".into()),
            }),
            Event::DeviceDeleted {
                device: Some("vd0".into()),
                path: "/machine/peripheral/vd0".into(),
            },
            Event::BlockWriteThreshold {
                node: "n".into(),
                amount_exceeded: 1,
                threshold: 1,
            },
            Event::Powerdown,
            Event::NicRxFilterChanged {
                name: Some("net0".into()),
                path: "/machine/peripheral/net0/virtio-backend".into(),
            },
            Event::BlockIoError(crate::io_error::BlockIoError {
                device: "d".into(),
                node_name: None,
                write: true,
                action: bulkhead_ipc::messages::ErrorAction::Stop,
                nospace: true,
                reason: "No space left on device".into(),
            }),
        ];
        for e in &all {
            match e {
                Event::Stop
                | Event::Resume
                | Event::Reset(_)
                | Event::Shutdown(_)
                | Event::WorkerExited(_)
                | Event::DeviceDeleted { .. }
                | Event::BlockWriteThreshold { .. }
                | Event::Powerdown
                | Event::NicRxFilterChanged { .. }
                | Event::BlockIoError(_) => {}
            }
        }
        all
    }

    /// Every shutdown cause, the same way.
    fn every_cause() -> Vec<ShutdownCause> {
        use ShutdownCause::*;
        let all = vec![
            HostError,
            HostQmpQuit,
            HostQmpSystemReset,
            HostSignal,
            GuestShutdown,
            GuestReset,
            GuestPanic,
        ];
        for c in &all {
            match c {
                HostError | HostQmpQuit | HostQmpSystemReset | HostSignal | GuestShutdown
                | GuestReset | GuestPanic => {}
            }
        }
        all
    }

    /// Every run state, the same way.
    fn every_state() -> Vec<RunState> {
        use RunState::*;
        let all = vec![Prelaunch, Running, Paused, Shutdown, InternalError, IoError];
        for s in &all {
            match s {
                Prelaunch | Running | Paused | Shutdown | InternalError | IoError => {}
            }
        }
        all
    }

    fn enum_values(name: &str) -> BTreeSet<&'static str> {
        match TYPES.iter().find(|(n, _)| *n == name) {
            Some((_, TypeDef::Enum(v))) => v.iter().copied().collect(),
            _ => panic!("no enum {name}"),
        }
    }

    #[test]
    fn every_command_has_a_return_type_and_nothing_else_does() {
        let registry = Registry::new();
        let commands: BTreeSet<&str> = registry.names().collect();
        let listed: BTreeSet<&str> = RETURNS.iter().map(|(n, _)| *n).collect();
        let missing: Vec<_> = commands.difference(&listed).collect();
        let extra: Vec<_> = listed.difference(&commands).collect();
        assert!(
            missing.is_empty(),
            "registry commands without a return type in qmp/schema.rs RETURNS: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "qmp/schema.rs RETURNS lists commands the registry does not have: {extra:?}"
        );
        assert_eq!(
            listed.len(),
            RETURNS.len(),
            "a command listed twice in RETURNS"
        );
    }

    #[test]
    fn every_event_has_an_entry_and_nothing_else_does() {
        let emitted: BTreeSet<&str> = every_event().iter().map(Event::name).collect();
        let listed: BTreeSet<&str> = event_names().collect();
        assert_eq!(
            emitted, listed,
            "qmp/schema.rs EVENTS against events::Event"
        );
        assert_eq!(
            listed.len(),
            EVENTS.len(),
            "an event listed twice in EVENTS"
        );
    }

    #[test]
    fn enums_list_what_the_code_produces() {
        let states: BTreeSet<&str> = every_state().into_iter().map(RunState::as_str).collect();
        assert_eq!(states, enum_values("RunState"));
        let causes: BTreeSet<&str> = every_cause()
            .into_iter()
            .map(ShutdownCause::as_str)
            .collect();
        assert_eq!(causes, enum_values("ShutdownCause"));
        let types: BTreeSet<&str> = crate::cli::ParamType::ALL
            .iter()
            .map(|t| t.as_str())
            .collect();
        assert_eq!(types, enum_values("CommandLineParameterType"));
        let roles: BTreeSet<&str> = bulkhead_sandbox::Role::ALL
            .into_iter()
            .map(bulkhead_sandbox::Role::name)
            .chain([crate::qmp::commands::sandbox::LAUNCHER_ROLE])
            .collect();
        assert_eq!(roles, enum_values("XSandboxRole"));
        use bulkhead_sandbox::Mode;
        let modes: BTreeSet<&str> = [Mode::On, Mode::Off, Mode::AllowWeak]
            .into_iter()
            .map(Mode::name)
            .collect();
        assert_eq!(modes, enum_values("XSandboxMode"));
    }

    #[test]
    fn every_type_is_defined_once_and_used() {
        let names: BTreeSet<&str> = TYPES.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), TYPES.len(), "a type defined twice in TYPES");
        // The generated schema reaches every named type from a command or an event.
        let schema = introspect(&Registry::new()).expect("schema");
        let mut gen_names = BTreeSet::new();
        let mut defs: BTreeMap<String, Def> = TYPES
            .iter()
            .map(|(n, d)| (n.to_string(), owned(d)))
            .collect();
        for name in Registry::new().names() {
            let cmd = Registry::new().get(name).copied().expect("command");
            arg_type(name, cmd.args, &mut defs);
        }
        let mut gen = Gen {
            defs: &defs,
            masked: HashMap::new(),
            used: Vec::new(),
            entries: Vec::new(),
        };
        for (_, ret) in RETURNS {
            gen.use_type(ret).expect("return type defined");
        }
        for (_, data) in EVENTS {
            gen.use_type(data).expect("event type defined");
        }
        let mut i = 0;
        while i < gen.used.len() {
            let ty = gen.used[i].clone();
            gen.type_entry(&ty).expect("type entry");
            gen_names.insert(ty);
            i += 1;
        }
        for (n, _) in TYPES {
            assert!(
                gen_names.contains(*n),
                "type {n} in qmp/schema.rs TYPES is used by no command or event"
            );
        }
        assert!(schema.as_array().is_some_and(|a| !a.is_empty()));
    }

    #[test]
    fn the_schema_has_qemu_s_format() {
        let registry = Registry::new();
        let schema = introspect(&registry).expect("schema");
        let list = schema.as_array().expect("list");
        // Names are unique; commands first, then events, then types.
        let names: Vec<&str> = list.iter().filter_map(|e| e["name"].as_str()).collect();
        let unique: BTreeSet<&str> = names.iter().copied().collect();
        assert_eq!(unique.len(), names.len());
        let metas: Vec<&str> = list
            .iter()
            .filter_map(|e| e["meta-type"].as_str())
            .collect();
        let n_cmds = registry.names().count();
        assert!(metas[..n_cmds].iter().all(|m| *m == "command"));
        assert!(metas[n_cmds..n_cmds + EVENTS.len()]
            .iter()
            .all(|m| *m == "event"));
        // The first command's argument type is the empty object, masked as "0"; its members
        // come out in QEMU's order.
        let status = list
            .iter()
            .find(|e| e["name"] == "query-status")
            .expect("query-status");
        assert_eq!(
            serde_json::to_string(status).expect("json"),
            format!(
                "{{\"name\":\"query-status\",\"ret-type\":{},\"meta-type\":\"command\",\"arg-type\":{}}}",
                status["ret-type"], status["arg-type"]
            )
        );
        let by_name = |n: &str| {
            list.iter()
                .find(|e| e["name"] == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        let empty = by_name("stop")["arg-type"].as_str().expect("arg");
        assert_eq!(by_name(empty)["members"], json!([]));
        assert_eq!(by_name("STOP")["arg-type"], json!(empty));
        // Arguments come from the registry, optional ones with "default": null.
        let hmp = by_name(
            by_name("human-monitor-command")["arg-type"]
                .as_str()
                .expect("arg"),
        );
        assert_eq!(
            hmp["members"],
            json!([{"name": "command-line", "type": "str"},
                   {"name": "cpu-index", "default": null, "type": "int"}])
        );
        assert_eq!(by_name("human-monitor-command")["ret-type"], json!("str"));
        let caps = by_name(
            by_name("qmp_capabilities")["arg-type"]
                .as_str()
                .expect("arg"),
        );
        let enable_ty = caps["members"][0]["type"].as_str().expect("type");
        let elem = by_name(enable_ty)["element-type"].as_str().expect("elem");
        assert_eq!(by_name(elem)["values"], json!(["oob"]));
        assert_eq!(by_name(elem)["members"], json!([{"name": "oob"}]));
        // Builtins and arrays.
        assert_eq!(
            serde_json::to_string(by_name("str")).expect("json"),
            r#"{"name":"str","json-type":"string","meta-type":"builtin"}"#
        );
        assert_eq!(by_name("[str]")["element-type"], json!("str"));
        // Masked names are numbers in order of first use.
        let masked: Vec<u64> = names.iter().filter_map(|n| n.parse::<u64>().ok()).collect();
        let mut sorted = masked.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..masked.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn the_schema_describes_itself() {
        let schema = introspect(&Registry::new()).expect("schema");
        let ty = ret_type_of(&schema, "query-qmp-schema").expect("ret type");
        check_value(&schema, ty, &schema).expect("the schema matches [SchemaInfo]");
    }

    #[test]
    fn the_checker_refuses_what_the_schema_does_not_allow() {
        let schema = introspect(&Registry::new()).expect("schema");
        let status = ret_type_of(&schema, "query-status").expect("status");
        let ok = json!({"status": "running", "singlestep": false, "running": true});
        check_value(&schema, status, &ok).expect("valid");
        for bad in [
            json!({"status": "running", "singlestep": false}),
            json!({"status": "running", "singlestep": false, "running": true, "x": 1}),
            json!({"status": "debug", "singlestep": false, "running": true}),
            json!({"status": "running", "singlestep": 0, "running": true}),
            json!([]),
        ] {
            assert!(check_value(&schema, status, &bad).is_err(), "{bad}");
        }
        let cpus = ret_type_of(&schema, "query-cpus").expect("cpus");
        let cpu = json!([{"arch": "x86", "current": true, "props": {"core-id": 0},
            "CPU": 0, "qom_path": "/machine/unattached/device[0]", "pc": 5,
            "halted": false, "thread_id": 7}]);
        check_value(&schema, cpus, &cpu).expect("valid cpu");
        let mut no_pc = cpu.clone();
        if let Some(m) = no_pc[0].as_object_mut() {
            m.remove("pc");
        }
        assert!(check_value(&schema, cpus, &no_pc).is_err());
        let name = ret_type_of(&schema, "query-name").expect("name");
        check_value(&schema, name, &json!({})).expect("optional member");
        let reset = event_type_of(&schema, "RESET").expect("reset");
        check_value(
            &schema,
            reset,
            &json!({"guest": false, "reason": "host-qmp-system-reset"}),
        )
        .expect("reset data");
    }

    #[test]
    fn missing_entries_are_errors_not_panics() {
        let defs = BTreeMap::new();
        let mut gen = Gen {
            defs: &defs,
            masked: HashMap::new(),
            used: Vec::new(),
            entries: Vec::new(),
        };
        assert_eq!(
            gen.use_type("[Nope]"),
            Err(SchemaError::UndefinedType("Nope".into()))
        );
        assert_eq!(
            SchemaError::NoReturnType("foo".into()).to_string(),
            "the QMP schema has no return type for command 'foo'"
        );
    }
}
