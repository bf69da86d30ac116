//! The QEMU-style command line.
//!
//! Bulkhead accepts the subset of `qemu-system-x86_64`'s options it implements, spelled as QEMU
//! spells them (one or two leading dashes, QEMU's `key=value,key=value` option syntax with `,,`
//! for a literal comma, `on/off/yes/no/true/false` booleans and the legacy bare `server` and
//! `nowait` flags). Anything else is refused with a message naming the option, and `main`
//! exits with status 1, as QEMU does.
//!
//! Supported (see [`USAGE`] for the full text):
//! `-m`, `-smp`, `-kernel`, `-initrd`, `-append`, `-serial`, `-qmp` (repeatable), `-S`, `-name`,
//! `-uuid`, `-nographic`, `-no-reboot`, `-no-shutdown`, `-pidfile`, `-daemonize`,
//! `-M`/`-machine` (`bulkhead`, the default, or `none`), the no-ops `-enable-kvm`, `-accel kvm`,
//! `-display none`, `-nodefaults`, `-no-user-config`, `-add-fd` (checked against the inherited fds
//! at startup, see [`crate::fds::FdSets::add_inherited`]), and Bulkhead's own `--worker-dir DIR`.
//!
//! Choices (documented in [`USAGE`]): the default machine is called `bulkhead`; QEMU's board
//! names (`pc`, `q35`, `microvm`, ...) are refused rather than silently aliased, because the
//! machine Bulkhead builds is none of them. Defaults are QEMU's: 128 MiB of RAM and one vCPU.

use std::path::PathBuf;

use bulkhead_sandbox::Mode;

/// Default guest RAM, as QEMU's x86 default.
pub const DEFAULT_MEM_SIZE: u64 = 128 << 20;
/// Most vCPUs the `bulkhead` machine accepts (xAPIC ids stay below 255).
pub const MAX_VCPUS: u32 = 255;

/// The help text printed by `-h`/`-help`/`--help`.
pub const USAGE: &str = "\
usage: bulkhead [options]

Bulkhead is a privilege-separated KVM virtual machine monitor speaking QEMU's QMP.
It accepts this subset of qemu-system-x86_64's command line:

  -M|-machine [type=]NAME[,accel=kvm]
                      'bulkhead' (default): the KVM machine Bulkhead builds;
                      'none': no guest at all, QMP only (as QEMU's -M none).
                      QEMU board names (pc, q35, microvm, ...) are refused.
  -m [size=]SIZE      guest RAM (default 128M; plain number = MiB; suffixes K M G T)
  -smp [cpus=]N[,sockets=S][,dies=D][,cores=C][,threads=T][,maxcpus=M]
                      vCPUs and topology (default 1); maxcpus must equal cpus
  -kernel PATH        Linux kernel to boot directly (required unless -M none)
  -initrd PATH        initial ramdisk
  -add-fd fd=N,set=M[,opaque=S]
                      put inherited fd N (not 0-2) in fd set M; any PATH above
                      (and -serial file:PATH) may then be /dev/fdset/M
  -append CMDLINE     kernel command line
  -drive file=PATH[,format=raw|qcow2][,if=virtio|none][,id=ID][,readonly=on|off]
        [,cache=none|writeback][,serial=S][,node-name=N]
        [,throttling.{bps,iops}-{total,read,write}=N]
                      a disk; if=virtio (the default) adds a virtio-blk-pci device for it
  -blockdev driver=file,node-name=N,filename=PATH[,read-only=on][,cache.direct=on]
  -blockdev driver=raw|qcow2,node-name=N,file=NODE
  -blockdev driver=raw|qcow2,node-name=N,file.driver=file,file.filename=PATH
                      block nodes, as QEMU spells them (JSON form too)
  -device virtio-blk-pci,drive=ID|NODE[,id=ID][,serial=S][,num-queues=N][,queue-size=N]
        [,addr=SLOT]  a virtio-blk disk, served by its own sandboxed bulkhead-blockd
                      (PCI slots from 1 unless addr= is given)
  -chardev socket,id=C,path=PATH
  -device vhost-user-blk-pci,chardev=C[,id=ID][,num-queues=N][,queue-size=N][,addr=SLOT]
                      a virtio-blk disk served by an outside vhost-user-blk server
                      (e.g. qemu-storage-daemon) at PATH, connected at start-up
  -serial DEV         stdio | file:PATH | unix:PATH,server=on[,wait=off] | null | none
                      (default: stdio with -nographic, otherwise none)
  -qmp DEV            QMP server: unix:PATH,server=on[,wait=off] or
                      tcp:[HOST]:PORT,server=on[,wait=off][,nodelay=on][,ipv4=on|ipv6=on];
                      repeatable; every listener serves any number of sessions at once
  -S                  do not start the vCPUs (status 'prelaunch' until 'cont')
  -name [guest=]NAME[,process=PNAME][,debug-threads=on|off]
  -uuid UUID          machine UUID
  -nographic          no graphics (Bulkhead has none); serial defaults to stdio
  -no-reboot          a guest reset ends the VM instead (SHUTDOWN, reason guest-reset)
  -no-shutdown        a guest poweroff stops the VM (status 'shutdown') instead of exiting
  -pidfile PATH       write the pid to PATH, locked like QEMU; removed at exit
  -daemonize          detach once QMP is ready to serve; stdio goes to /dev/null
  -enable-kvm, -accel kvm, -display none, -nodefaults, -no-user-config
                      accepted for compatibility; Bulkhead always uses KVM
  --worker-dir DIR    where to find bulkhead-vcpu (default: the directory of the
                      bulkhead executable itself; PATH is never searched)
  --sandbox on|off|allow-weak
                      how workers are confined (default on: namespaces, empty root, no
                      capabilities, rlimits, landlock, seccomp; refuses to run if the kernel
                      lacks any of it). allow-weak runs with what the kernel offers and says
                      what is missing; off confines nothing (debugging only)
  --sandbox-user UID:GID
                      the outside ids of a worker's root when bulkhead runs as root
                      (default 65534:65534, nobody; never 0)
  -h, -help, --help   this text
  -version            version information

Environment: BULKHEAD_LOG=error|warn|info|debug|trace sets the log level (default warn).
";

/// The type of a parameter of an option written in QEMU's `key=value` syntax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    /// Any text.
    String,
    /// `on`/`off` (and QEMU's other spellings).
    Boolean,
    /// A number.
    Number,
    /// A size with an optional suffix (`K`, `M`, `G`, ...).
    Size,
}

impl ParamType {
    /// Every type.
    pub const ALL: &'static [ParamType] = &[
        ParamType::String,
        ParamType::Boolean,
        ParamType::Number,
        ParamType::Size,
    ];

    /// QEMU's name (`query-command-line-options`).
    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Boolean => "boolean",
            ParamType::Number => "number",
            ParamType::Size => "size",
        }
    }
}

/// One parameter of an option written in `key=value` syntax.
#[derive(Debug, Clone, Copy)]
pub struct OptionParam {
    /// The key.
    pub name: &'static str,
    /// Its type.
    pub ty: ParamType,
    /// What it does.
    pub help: &'static str,
}

/// An option written in `key=value` syntax, under the name QEMU gives its option group.
#[derive(Debug, Clone, Copy)]
pub struct OptionGroup {
    /// QEMU's group name (`query-command-line-options`' `option`).
    pub name: &'static str,
    /// The option as written on the command line.
    pub flag: &'static str,
    /// Its parameters, in QEMU's declaration order.
    pub params: &'static [OptionParam],
}

const fn param(name: &'static str, ty: ParamType, help: &'static str) -> OptionParam {
    OptionParam { name, ty, help }
}

/// Every option of [`parse`] that takes QEMU's `key=value` syntax, with exactly the keys the
/// parser accepts (a unit test holds the two together). `query-command-line-options` reports
/// this table. Options without keys (`-kernel PATH`, `-S`, ...) are not QemuOpts options in
/// QEMU either, and are not listed; neither are `-serial` and `-qmp`, which QEMU lists under
/// `chardev` and `mon`, options Bulkhead does not have.
pub const OPTION_GROUPS: &[OptionGroup] = &[
    OptionGroup {
        name: "machine",
        flag: "-machine",
        params: &[
            param(
                "type",
                ParamType::String,
                "the machine: bulkhead (the default) or none",
            ),
            param("accel", ParamType::String, "the accelerator: kvm only"),
        ],
    },
    OptionGroup {
        name: "smp-opts",
        flag: "-smp",
        params: &[
            param("cpus", ParamType::Number, "number of vCPUs"),
            param("sockets", ParamType::Number, "number of sockets"),
            param("dies", ParamType::Number, "dies per socket"),
            param("cores", ParamType::Number, "cores per die"),
            param("threads", ParamType::Number, "threads per core"),
            param(
                "maxcpus",
                ParamType::Number,
                "maximum number of vCPUs; must equal cpus (no CPU hot-plug)",
            ),
        ],
    },
    OptionGroup {
        name: "memory",
        flag: "-m",
        params: &[param("size", ParamType::Size, "guest RAM")],
    },
    OptionGroup {
        name: "name",
        flag: "-name",
        params: &[
            param("guest", ParamType::String, "the name of the guest"),
            param(
                "process",
                ParamType::String,
                "the name of the bulkhead process, as top and ps show it",
            ),
            param(
                "debug-threads",
                ParamType::Boolean,
                "accepted for compatibility; no effect",
            ),
        ],
    },
    OptionGroup {
        name: "accel",
        flag: "-accel",
        params: &[param(
            "accel",
            ParamType::String,
            "the accelerator: kvm only",
        )],
    },
    OptionGroup {
        name: "drive",
        flag: "-drive",
        params: &[
            param(
                "file",
                ParamType::String,
                "the disk image (a path or /dev/fdset/N)",
            ),
            param(
                "if",
                ParamType::String,
                "virtio (the default: a virtio-blk-pci device) or none",
            ),
            param("media", ParamType::String, "disk only"),
            param("read-only", ParamType::Boolean, "refuse writes"),
            param(
                "format",
                ParamType::String,
                "raw or qcow2 (probed if absent)",
            ),
            param("cache.direct", ParamType::Boolean, "O_DIRECT (cache=none)"),
            param("node-name", ParamType::String, "the format node's name"),
            param(
                "throttling.bps-total",
                ParamType::Number,
                "bytes per second, reads and writes",
            ),
            param(
                "throttling.bps-read",
                ParamType::Number,
                "bytes read per second",
            ),
            param(
                "throttling.bps-write",
                ParamType::Number,
                "bytes written per second",
            ),
            param(
                "throttling.iops-total",
                ParamType::Number,
                "operations per second, reads and writes",
            ),
            param(
                "throttling.iops-read",
                ParamType::Number,
                "reads per second",
            ),
            param(
                "throttling.iops-write",
                ParamType::Number,
                "writes per second",
            ),
        ],
    },
    OptionGroup {
        name: "add-fd",
        flag: "-add-fd",
        params: &[
            param(
                "fd",
                ParamType::Number,
                "an inherited file descriptor to put in the fd set",
            ),
            param("set", ParamType::Number, "the fd set"),
            param(
                "opaque",
                ParamType::String,
                "free-form text describing the fd",
            ),
        ],
    },
];

/// Errors in the command line. `main` prints them as `bulkhead: <error>` and exits 1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// Not an option QEMU or Bulkhead knows.
    #[error("{0}: invalid option")]
    Invalid(String),
    /// A QEMU option Bulkhead does not implement.
    #[error("{0}: option not supported by bulkhead")]
    Unsupported(String),
    /// An option needs an argument and none followed.
    #[error("{0}: requires an argument")]
    MissingArgument(String),
    /// A positional argument (QEMU would take it as a disk image).
    #[error("{0}: positional arguments (disk images) are not supported by bulkhead")]
    Positional(String),
    /// An option's argument is wrong.
    #[error("{option} {value}: {reason}")]
    BadValue {
        /// The option, as written.
        option: String,
        /// Its argument.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Options that cannot be combined, or a missing required one.
    #[error("{0}")]
    Conflict(String),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run a VM.
    Run(Box<Config>),
    /// Print [`USAGE`] and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
}

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// The KVM machine built by `bulkhead-vcpu`.
    Bulkhead,
    /// No guest at all: QMP only.
    None,
}

impl Machine {
    /// The name as `-machine` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Machine::Bulkhead => "bulkhead",
            Machine::None => "none",
        }
    }
}

/// vCPU count and topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Smp {
    /// vCPUs present at start.
    pub cpus: u32,
    /// Sockets.
    pub sockets: u32,
    /// Dies per socket.
    pub dies: u32,
    /// Cores per die.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl Default for Smp {
    fn default() -> Self {
        Smp {
            cpus: 1,
            sockets: 1,
            dies: 1,
            cores: 1,
            threads: 1,
        }
    }
}

/// A listening socket address for a server chardev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP socket.
    Tcp {
        /// Host name or address; empty means every address.
        host: String,
        /// Port (0: any free port).
        port: u16,
        /// Restrict to IPv4 (`ipv4=on`).
        ipv4_only: bool,
        /// Restrict to IPv6 (`ipv6=on`).
        ipv6_only: bool,
        /// Set `TCP_NODELAY` on sessions.
        nodelay: bool,
    },
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp { host, port, .. } => {
                if host.contains(':') {
                    write!(f, "tcp:[{host}]:{port}")
                } else {
                    write!(f, "tcp:{host}:{port}")
                }
            }
        }
    }
}

/// A server socket and whether startup waits for its first client (`wait=on`, QEMU's default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Where to listen.
    pub addr: ListenAddr,
    /// Startup waits for the first connection before the guest starts.
    pub wait: bool,
}

/// The serial port's host side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialBackend {
    /// The monitor's own stdin/stdout.
    Stdio,
    /// Output written to a file (truncated at start, as QEMU does).
    File(PathBuf),
    /// A unix socket the monitor listens on, relaying to one client at a time.
    Unix(ServerSpec),
    /// A serial port whose output is discarded and whose input is empty.
    Null,
    /// No serial port at all.
    None,
}

/// One `-add-fd fd=N,set=M[,opaque=S]`. The values are kept as given; QEMU's checks of them
/// (range, an fd that is open and inherited) run at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddFd {
    /// `fd=` (-1 when missing).
    pub fd: i64,
    /// `set=` (-1 when missing).
    pub set: i64,
    /// `opaque=`.
    pub opaque: Option<String>,
    /// The option's argument as written (for messages).
    pub text: String,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Machine type.
    pub machine: Machine,
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub mem_size: u64,
    /// vCPUs.
    pub smp: Smp,
    /// Kernel image.
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: String,
    /// Serial port backend.
    pub serial: SerialBackend,
    /// QMP servers.
    pub qmp: Vec<ServerSpec>,
    /// Start paused (`-S`).
    pub start_paused: bool,
    /// Guest name.
    pub name: Option<String>,
    /// Process name (`-name process=`).
    pub process_name: Option<String>,
    /// Machine UUID, canonical lower-case form.
    pub uuid: Option<String>,
    /// `-nographic` was given.
    pub nographic: bool,
    /// `-no-reboot`.
    pub no_reboot: bool,
    /// `-no-shutdown`.
    pub no_shutdown: bool,
    /// `-pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `-daemonize`.
    pub daemonize: bool,
    /// `--worker-dir`.
    pub worker_dir: Option<PathBuf>,
    /// `--sandbox`.
    pub sandbox: Mode,
    /// `--sandbox-user`.
    pub sandbox_user: Option<(u32, u32)>,
    /// `-add-fd`, in order.
    pub add_fds: Vec<AddFd>,
    /// `-drive`, `-blockdev` and `-device`, resolved into the block graph ([`crate::block`]).
    pub block: crate::block::Resolved,
    /// `-netdev`, `-nic` and `-device virtio-net-pci` ([`crate::nics`]).
    pub net: crate::nics::NetConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            machine: Machine::Bulkhead,
            mem_size: DEFAULT_MEM_SIZE,
            smp: Smp::default(),
            kernel: None,
            initrd: None,
            append: String::new(),
            serial: SerialBackend::None,
            qmp: Vec::new(),
            start_paused: false,
            name: None,
            process_name: None,
            uuid: None,
            nographic: false,
            no_reboot: false,
            no_shutdown: false,
            pidfile: None,
            daemonize: false,
            worker_dir: None,
            sandbox: Mode::On,
            sandbox_user: None,
            add_fds: Vec::new(),
            block: crate::block::Resolved::default(),
            net: crate::nics::NetConfig::default(),
        }
    }
}

/// QEMU options Bulkhead knows but does not implement (so the error says "not supported"
/// rather than "invalid").
const UNSUPPORTED: &[&str] = &[
    "action",
    "audiodev",
    "bios",
    "boot",
    "cdrom",
    "chroot",
    "compat",
    "cpu",
    "D",
    "d",
    "dtb",
    "enable-sync-profile",
    "fda",
    "fdb",
    "fsdev",
    "full-screen",
    "fw_cfg",
    "g",
    "gdb",
    "global",
    "hda",
    "hdb",
    "hdc",
    "hdd",
    "icount",
    "incoming",
    "iscsi",
    "k",
    "L",
    "loadvm",
    "mem-path",
    "mem-prealloc",
    "mon",
    "monitor",
    "msg",
    "mtdblock",
    "net",
    "no-acpi",
    "no-fd-bootchk",
    "no-hpet",
    "numa",
    "object",
    "option-rom",
    "overcommit",
    "parallel",
    "pflash",
    "plugin",
    "preconfig",
    "qmp-pretty",
    "readconfig",
    "rtc",
    "runas",
    "s",
    "sandbox",
    "sd",
    "seed",
    "semihosting",
    "semihosting-config",
    "set",
    "singlestep",
    "smbios",
    "snapshot",
    "spice",
    "tpmdev",
    "trace",
    "usb",
    "usbdevice",
    "vga",
    "virtfs",
    "vnc",
    "watchdog",
    "watchdog-action",
    "win2k-hack",
    "writeconfig",
];

/// Parses `args` (without the program name).
pub fn parse<I, S>(args: I) -> Result<Action, CliError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let args: Vec<String> = args.into_iter().map(Into::into).collect();
    let mut cfg = Config::default();
    let mut serial: Option<SerialBackend> = None;
    let mut nodefaults = false;
    let mut block = crate::block::BlockArgs::default();
    let mut net = crate::nics::NetArgs::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(stripped) = arg.strip_prefix('-') else {
            return Err(CliError::Positional(arg.clone()));
        };
        // QEMU accepts `--opt` as well as `-opt`.
        let name = stripped.strip_prefix('-').unwrap_or(stripped);
        let opt = format!("-{name}");
        let value = |i: &mut usize| -> Result<String, CliError> {
            let v = args
                .get(*i)
                .cloned()
                .ok_or_else(|| CliError::MissingArgument(opt.clone()))?;
            *i += 1;
            Ok(v)
        };
        match name {
            "h" | "help" => return Ok(Action::Help),
            "version" => return Ok(Action::Version),
            "M" | "machine" => {
                let v = value(&mut i)?;
                cfg.machine = parse_machine(&opt, &v)?;
            }
            "m" => {
                let v = value(&mut i)?;
                cfg.mem_size = parse_mem(&opt, &v)?;
            }
            "smp" => {
                let v = value(&mut i)?;
                cfg.smp = parse_smp(&opt, &v)?;
            }
            "kernel" => cfg.kernel = Some(PathBuf::from(nonempty(&opt, value(&mut i)?)?)),
            "initrd" => cfg.initrd = Some(PathBuf::from(nonempty(&opt, value(&mut i)?)?)),
            "append" => cfg.append = value(&mut i)?,
            "serial" => {
                let v = value(&mut i)?;
                if serial.is_some() {
                    return Err(CliError::BadValue {
                        option: opt,
                        value: v,
                        reason: "only one serial port is supported".into(),
                    });
                }
                serial = Some(parse_serial(&opt, &v)?);
            }
            "qmp" => {
                let v = value(&mut i)?;
                cfg.qmp.push(parse_server(&opt, &v, true)?);
            }
            "S" => cfg.start_paused = true,
            "name" => {
                let v = value(&mut i)?;
                let (name, process) = parse_name(&opt, &v)?;
                cfg.name = name;
                cfg.process_name = process;
            }
            "uuid" => {
                let v = value(&mut i)?;
                cfg.uuid = Some(parse_uuid(&v).ok_or_else(|| CliError::BadValue {
                    option: opt,
                    value: v.clone(),
                    reason: "failed to parse UUID string: wrong format".into(),
                })?);
            }
            "nographic" => cfg.nographic = true,
            "no-reboot" => cfg.no_reboot = true,
            "no-shutdown" => cfg.no_shutdown = true,
            "pidfile" => cfg.pidfile = Some(PathBuf::from(nonempty(&opt, value(&mut i)?)?)),
            "daemonize" => cfg.daemonize = true,
            "worker-dir" => cfg.worker_dir = Some(PathBuf::from(nonempty(&opt, value(&mut i)?)?)),
            "sandbox" => {
                let v = value(&mut i)?;
                cfg.sandbox = Mode::from_name(&v).ok_or_else(|| CliError::BadValue {
                    option: opt.clone(),
                    value: v.clone(),
                    reason: "expected on, off or allow-weak".into(),
                })?;
            }
            "sandbox-user" => {
                let v = value(&mut i)?;
                let ids = v
                    .split_once(':')
                    .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)))
                    .filter(|&(u, g): &(u32, u32)| u != 0 && g != 0);
                cfg.sandbox_user = Some(ids.ok_or_else(|| CliError::BadValue {
                    option: opt.clone(),
                    value: v.clone(),
                    reason: "expected UID:GID, both numbers other than 0".into(),
                })?);
            }
            "add-fd" => {
                let v = value(&mut i)?;
                cfg.add_fds.push(parse_add_fd(&opt, &v)?);
            }
            "drive" => block
                .items
                .push((crate::block::BlockOpt::Drive, value(&mut i)?)),
            "blockdev" => block
                .items
                .push((crate::block::BlockOpt::Blockdev, value(&mut i)?)),
            "device" => {
                let v = value(&mut i)?;
                if crate::nics::is_net_device(&v) {
                    net.items.push((crate::nics::NetOpt::Device, v));
                } else {
                    block.items.push((crate::block::BlockOpt::Device, v));
                }
            }
            "netdev" => net
                .items
                .push((crate::nics::NetOpt::Netdev, value(&mut i)?)),
            "nic" => net.items.push((crate::nics::NetOpt::Nic, value(&mut i)?)),
            "chardev" => block
                .items
                .push((crate::block::BlockOpt::Chardev, value(&mut i)?)),
            "enable-kvm" | "no-user-config" => {}
            "nodefaults" => nodefaults = true,
            "accel" => {
                let v = value(&mut i)?;
                let opts = parse_opts(&v, Some("accel"));
                for (k, val) in &opts {
                    match (k.as_str(), val.as_str()) {
                        ("accel", "kvm") => {}
                        _ => {
                            return Err(CliError::BadValue {
                                option: opt,
                                value: v.clone(),
                                reason: "bulkhead supports only -accel kvm".into(),
                            })
                        }
                    }
                }
            }
            "display" => {
                let v = value(&mut i)?;
                if v != "none" {
                    return Err(CliError::BadValue {
                        option: opt,
                        value: v,
                        reason: "bulkhead has no display; only -display none is accepted".into(),
                    });
                }
            }
            _ if UNSUPPORTED.contains(&name) => return Err(CliError::Unsupported(opt)),
            _ => return Err(CliError::Invalid(opt)),
        }
    }
    cfg.serial = match serial {
        Some(s) => s,
        None if cfg.nographic && !nodefaults => SerialBackend::Stdio,
        None => SerialBackend::None,
    };
    cfg.block = crate::block::resolve(&block)?;
    cfg.net = crate::nics::resolve(
        &net,
        &cfg.block.config.used_slots(),
        &cfg.block.config.device_ids(),
    )?;
    validate(&mut cfg)?;
    Ok(Action::Run(Box::new(cfg)))
}

fn validate(cfg: &mut Config) -> Result<(), CliError> {
    if cfg.daemonize && cfg.nographic {
        return Err(CliError::Conflict(
            "-nographic cannot be used with -daemonize".into(),
        ));
    }
    if cfg.daemonize && cfg.serial == SerialBackend::Stdio {
        return Err(CliError::Conflict(
            "-serial stdio: cannot use stdio with -daemonize".into(),
        ));
    }
    let max = match cfg.machine {
        Machine::Bulkhead => MAX_VCPUS,
        Machine::None => 1,
    };
    if cfg.smp.cpus > max {
        return Err(CliError::Conflict(format!(
            "Invalid SMP CPUs {}. The max CPUs supported by machine '{}' is {}",
            cfg.smp.cpus,
            cfg.machine.name(),
            max
        )));
    }
    match cfg.machine {
        Machine::None => {
            if !cfg.block.config.devices.is_empty() || !cfg.block.config.vhost_user.is_empty() {
                return Err(CliError::Conflict(
                    "No 'PCI' bus found for device 'virtio-blk-pci' (machine 'none' has no \
                     devices; -drive if=none and -blockdev are fine)"
                        .into(),
                ));
            }
            if !cfg.net.nics.is_empty() {
                return Err(CliError::Conflict(
                    "No 'PCI' bus found for device 'virtio-net-pci' (machine 'none' has no \
                     devices; -netdev alone is fine)"
                        .into(),
                ));
            }
            for (given, opt) in [
                (cfg.kernel.is_some(), "-kernel"),
                (cfg.initrd.is_some(), "-initrd"),
                (!cfg.append.is_empty(), "-append"),
            ] {
                if given {
                    return Err(CliError::Conflict(format!(
                        "{opt}: machine 'none' has no guest to load"
                    )));
                }
            }
        }
        Machine::Bulkhead => {
            if cfg.kernel.is_none() {
                if cfg.initrd.is_some() {
                    return Err(CliError::Conflict(
                        "-initrd only allowed with -kernel option".into(),
                    ));
                }
                if !cfg.append.is_empty() {
                    return Err(CliError::Conflict(
                        "-append only allowed with -kernel option".into(),
                    ));
                }
                return Err(CliError::Conflict(
                    "no -kernel given: bulkhead boots a Linux kernel directly (there is no firmware); \
                     use -M none for a QMP-only instance"
                        .into(),
                ));
            }
        }
    }
    Ok(())
}

fn nonempty(opt: &str, v: String) -> Result<String, CliError> {
    if v.is_empty() {
        return Err(CliError::BadValue {
            option: opt.into(),
            value: v,
            reason: "empty argument".into(),
        });
    }
    Ok(v)
}

/// Splits QEMU's `key=value,key=value` syntax; `,,` is a literal comma. A first element without
/// `=` is the value of `implied` (if given), otherwise a bare flag with an empty value.
pub fn parse_opts(s: &str, implied: Option<&str>) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .enumerate()
        .filter(|(idx, p)| !(p.is_empty() && *idx > 0))
        .map(|(idx, p)| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => match (idx, implied) {
                (0, Some(key)) => (key.to_string(), p),
                _ => (p, String::new()),
            },
        })
        .collect()
}

/// QEMU's boolean spellings.
fn parse_bool(opt: &str, whole: &str, key: &str, v: &str) -> Result<bool, CliError> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(CliError::BadValue {
            option: opt.into(),
            value: whole.into(),
            reason: format!("Parameter '{key}' expects 'on' or 'off'"),
        }),
    }
}

/// Parses a size with QEMU's suffixes (`B K M G T P E`, case-insensitive, optional fraction);
/// a plain number is in units of `default_unit` bytes.
pub fn parse_size(s: &str, default_unit: u64) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return None;
    }
    let unit: u64 = match suffix {
        "" => default_unit,
        "B" | "b" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        "T" | "t" => 1 << 40,
        "P" | "p" => 1 << 50,
        "E" | "e" => 1 << 60,
        _ => return None,
    };
    match num.split_once('.') {
        None => num.parse::<u64>().ok()?.checked_mul(unit),
        Some((int, frac)) => {
            // A fraction only makes sense with a unit larger than a byte.
            if unit == 1 {
                return None;
            }
            let int: u64 = int.parse().ok()?;
            let whole = int.checked_mul(unit)?;
            let frac_digits = frac.len().min(18);
            let frac_val: u64 = frac[..frac_digits].parse().ok()?;
            let denom = 10u64.checked_pow(u32::try_from(frac_digits).ok()?)?;
            let part = u128::from(frac_val) * u128::from(unit) / u128::from(denom);
            whole.checked_add(u64::try_from(part).ok()?)
        }
    }
}

fn parse_mem(opt: &str, v: &str) -> Result<u64, CliError> {
    let bad = |reason: String| CliError::BadValue {
        option: opt.into(),
        value: v.into(),
        reason,
    };
    let mut size = None;
    for (k, val) in parse_opts(v, Some("size")) {
        match k.as_str() {
            "size" => {
                size = Some(parse_size(&val, 1 << 20).ok_or_else(|| {
                    bad("Parameter 'size' expects a non-negative number below 2^64 \
                         (optional suffix K, M, G, T, P or E)"
                        .into())
                })?)
            }
            "slots" | "maxmem" => {
                return Err(bad("memory hot-plug (slots/maxmem) is not supported".into()))
            }
            _ => return Err(bad(format!("Invalid parameter '{k}'"))),
        }
    }
    // As QEMU: a size of 0 (or no size) means the default.
    let size = match size {
        None | Some(0) => DEFAULT_MEM_SIZE,
        Some(s) => s,
    };
    // Whole 4 KiB pages: round up as QEMU rounds to its page granule.
    size.checked_add(4095)
        .map(|s| s & !4095)
        .ok_or_else(|| bad("size too large".into()))
}

fn parse_smp(opt: &str, v: &str) -> Result<Smp, CliError> {
    let bad = |reason: String| CliError::BadValue {
        option: opt.into(),
        value: v.into(),
        reason,
    };
    let mut fields: [Option<u32>; 6] = [None; 6]; // cpus sockets dies cores threads maxcpus
    for (k, val) in parse_opts(v, Some("cpus")) {
        let idx = match k.as_str() {
            "cpus" => 0,
            "sockets" => 1,
            "dies" => 2,
            "cores" => 3,
            "threads" => 4,
            "maxcpus" => 5,
            "clusters" | "books" | "drawers" => {
                return Err(bad(format!(
                    "{k} not supported by this machine's CPU topology"
                )))
            }
            _ => return Err(bad(format!("Parameter 'smp.{k}' is unexpected"))),
        };
        let n: u32 = val
            .parse()
            .map_err(|_| bad(format!("Parameter '{k}' expects a number")))?;
        if n == 0 {
            return Err(bad(
                "CPU topology parameters must be greater than zero".into()
            ));
        }
        fields[idx] = Some(n);
    }
    let [cpus, sockets, dies, cores, threads, maxcpus] = fields;
    let dies = dies.unwrap_or(1);
    // QEMU's algorithm for its current machine types (since 6.2: prefer cores over sockets when
    // filling in what was left out; threads last).
    let (sockets_v, cores_v, threads_v) = if cpus.is_none() && maxcpus.is_none() {
        (
            sockets.unwrap_or(1),
            cores.unwrap_or(1),
            threads.unwrap_or(1),
        )
    } else {
        let m = maxcpus.or(cpus).unwrap_or(1);
        let (s, c, t) = match (sockets, cores) {
            (s, None) => {
                let s = s.unwrap_or(1);
                let t = threads.unwrap_or(1);
                (
                    s,
                    m / s.saturating_mul(dies).saturating_mul(t).max(1),
                    Some(t),
                )
            }
            (None, Some(c)) => {
                let t = threads.unwrap_or(1);
                (
                    m / dies.saturating_mul(c).saturating_mul(t).max(1),
                    c,
                    Some(t),
                )
            }
            (Some(s), Some(c)) => (s, c, threads),
        };
        let t = t.unwrap_or_else(|| m / s.saturating_mul(dies).saturating_mul(c).max(1));
        (s, c, t)
    };
    let maxcpus_v = maxcpus.unwrap_or_else(|| {
        sockets_v
            .saturating_mul(dies)
            .saturating_mul(cores_v)
            .saturating_mul(threads_v)
    });
    let cpus_v = cpus.unwrap_or(maxcpus_v);
    let product =
        u64::from(sockets_v) * u64::from(dies) * u64::from(cores_v) * u64::from(threads_v);
    if product != u64::from(maxcpus_v) {
        return Err(bad(format!(
            "Invalid CPU topology: product of the hierarchy must match maxcpus: sockets ({sockets_v}) * \
             dies ({dies}) * cores ({cores_v}) * threads ({threads_v}) != maxcpus ({maxcpus_v})"
        )));
    }
    if maxcpus_v < cpus_v {
        return Err(bad(format!(
            "Invalid CPU topology: maxcpus must be equal to or greater than smp: ... \
             maxcpus ({maxcpus_v}) < cpus ({cpus_v})"
        )));
    }
    if maxcpus_v != cpus_v {
        return Err(bad("CPU hot-plug (maxcpus > cpus) is not supported".into()));
    }
    Ok(Smp {
        cpus: cpus_v,
        sockets: sockets_v,
        dies,
        cores: cores_v,
        threads: threads_v,
    })
}

/// QEMU's `-add-fd` syntax: `fd`, `set` (numbers as `strtoull` with base 0 reads them, a leading
/// `-` negating) and `opaque`; later keys override earlier ones.
fn parse_add_fd(opt: &str, v: &str) -> Result<AddFd, CliError> {
    let bad = |reason: String| CliError::BadValue {
        option: opt.into(),
        value: v.into(),
        reason,
    };
    let mut spec = AddFd {
        fd: -1,
        set: -1,
        opaque: None,
        text: v.to_string(),
    };
    for (k, val) in parse_opts(v, None) {
        match k.as_str() {
            "fd" | "set" => {
                let n = parse_qemu_number(&val).map_err(|e| match e {
                    NumberError::NotANumber => bad(format!("Parameter '{k}' expects a number")),
                    NumberError::TooLarge => {
                        bad(format!("Value '{val}' is too large for parameter '{k}'"))
                    }
                })?;
                if k == "fd" {
                    spec.fd = n;
                } else {
                    spec.set = n;
                }
            }
            "opaque" => spec.opaque = Some(val),
            "" if v.is_empty() => {}
            _ => return Err(bad(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(spec)
}

enum NumberError {
    NotANumber,
    TooLarge,
}

/// A QemuOpts number: `strtoull` with base 0 (decimal, `0x` hex, leading-`0` octal), a
/// leading `-` wrapping as in C; read as a signed 64-bit value.
fn parse_qemu_number(s: &str) -> Result<i64, NumberError> {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (radix, digits) = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        (16, h)
    } else if t.len() > 1 && t.starts_with('0') {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(NumberError::NotANumber);
    }
    let n = u64::from_str_radix(digits, radix).map_err(|_| NumberError::TooLarge)?;
    let n = if neg { n.wrapping_neg() } else { n };
    // The bits as C stores them in an int64_t.
    Ok(n as i64)
}

fn parse_machine(opt: &str, v: &str) -> Result<Machine, CliError> {
    let bad = |reason: String| CliError::BadValue {
        option: opt.into(),
        value: v.into(),
        reason,
    };
    let mut machine = None;
    for (k, val) in parse_opts(v, Some("type")) {
        match k.as_str() {
            "type" => {
                machine = Some(match val.as_str() {
                    "none" => Machine::None,
                    "bulkhead" => Machine::Bulkhead,
                    "help" | "?" => {
                        return Err(bad("supported machines: bulkhead (default), none".into()))
                    }
                    other => {
                        return Err(bad(format!(
                            "unsupported machine type '{other}' (bulkhead provides 'bulkhead', \
                             the default, and 'none')"
                        )))
                    }
                })
            }
            "accel" if val == "kvm" => {}
            _ => return Err(bad(format!("Invalid parameter '{k}'"))),
        }
    }
    Ok(machine.unwrap_or(Machine::Bulkhead))
}

fn parse_name(opt: &str, v: &str) -> Result<(Option<String>, Option<String>), CliError> {
    let mut name = None;
    let mut process = None;
    for (k, val) in parse_opts(v, Some("guest")) {
        match k.as_str() {
            "guest" => name = Some(val),
            "process" => process = Some(val),
            "debug-threads" => {
                parse_bool(opt, v, &k, &val)?;
            }
            _ => {
                return Err(CliError::BadValue {
                    option: opt.into(),
                    value: v.into(),
                    reason: format!("Invalid parameter '{k}'"),
                })
            }
        }
    }
    Ok((name, process))
}

/// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` into its canonical lower-case form.
pub fn parse_uuid(s: &str) -> Option<String> {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    if groups.len() != 5 {
        return None;
    }
    for (g, len) in groups.iter().zip(lens) {
        if g.len() != len || !g.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
    }
    Some(s.to_ascii_lowercase())
}

fn parse_serial(opt: &str, v: &str) -> Result<SerialBackend, CliError> {
    let bad = |reason: &str| CliError::BadValue {
        option: opt.into(),
        value: v.into(),
        reason: reason.into(),
    };
    match v {
        "stdio" => return Ok(SerialBackend::Stdio),
        "none" => return Ok(SerialBackend::None),
        "null" => return Ok(SerialBackend::Null),
        _ => {}
    }
    if let Some(rest) = v.strip_prefix("file:") {
        let opts = parse_opts(rest, Some("path"));
        match opts.as_slice() {
            [(k, path)] if k == "path" && !path.is_empty() => {
                return Ok(SerialBackend::File(PathBuf::from(path)))
            }
            _ => return Err(bad("expected file:PATH")),
        }
    }
    if v.starts_with("unix:") {
        let spec = parse_server(opt, v, true)?;
        return Ok(SerialBackend::Unix(spec));
    }
    let backend = v.split(':').next().unwrap_or(v);
    match backend {
        "tcp" | "udp" | "telnet" | "pty" | "vc" | "pipe" | "chardev" | "mon" | "msmouse"
        | "braille" | "tty" | "parallel" | "websocket" => Err(bad(&format!(
            "serial backend '{backend}' is not supported by bulkhead \
             (supported: stdio, file:PATH, unix:PATH,server=on,wait=off, null, none)"
        ))),
        _ => Err(bad(&format!("'{v}' is not a valid char driver"))),
    }
}

/// Parses `unix:PATH,...` or `tcp:HOST:PORT,...` as a listening socket. Only server mode is
/// supported; `wait` defaults to on as in QEMU.
fn parse_server(opt: &str, v: &str, allow_tcp: bool) -> Result<ServerSpec, CliError> {
    let bad = |reason: String| CliError::BadValue {
        option: opt.into(),
        value: v.into(),
        reason,
    };
    let (kind, rest) = v.split_once(':').ok_or_else(|| {
        bad("expected unix:PATH,server=on,wait=off or tcp:HOST:PORT,server=on,wait=off".into())
    })?;
    let opts = parse_opts(rest, Some("addr"));
    let mut addr_str = None;
    let mut server = false;
    let mut wait = None;
    let mut nodelay = false;
    let mut ipv4 = false;
    let mut ipv6 = false;
    for (k, val) in opts {
        match k.as_str() {
            "addr" => addr_str = Some(val),
            "server" => server = val.is_empty() || parse_bool(opt, v, &k, &val)?,
            "wait" => wait = Some(val.is_empty() || parse_bool(opt, v, &k, &val)?),
            "nowait" => wait = Some(false),
            "nodelay" if kind == "tcp" => nodelay = val.is_empty() || parse_bool(opt, v, &k, &val)?,
            "ipv4" if kind == "tcp" => ipv4 = val.is_empty() || parse_bool(opt, v, &k, &val)?,
            "ipv6" if kind == "tcp" => ipv6 = val.is_empty() || parse_bool(opt, v, &k, &val)?,
            "telnet" | "tn3270" | "websocket" | "reconnect" | "tls-creds" | "tls-authz"
            | "abstract" | "tight" | "to" | "mux" | "logfile" | "logappend" | "delay" => {
                return Err(bad(format!("parameter '{k}' is not supported by bulkhead")))
            }
            _ => return Err(bad(format!("Invalid parameter '{k}'"))),
        }
    }
    if !server {
        return Err(bad(
            "only server sockets are supported (add server=on,wait=off)".into(),
        ));
    }
    let addr_str = addr_str.unwrap_or_default();
    let addr = match kind {
        "unix" => {
            if addr_str.is_empty() {
                return Err(bad("missing socket path".into()));
            }
            ListenAddr::Unix(PathBuf::from(addr_str))
        }
        "tcp" if allow_tcp => {
            let (host, port) =
                split_host_port(&addr_str).ok_or_else(|| bad("expected tcp:HOST:PORT".into()))?;
            if ipv4 && ipv6 {
                return Err(bad("ipv4 and ipv6 cannot both be on".into()));
            }
            ListenAddr::Tcp {
                host,
                port,
                ipv4_only: ipv4,
                ipv6_only: ipv6,
                nodelay,
            }
        }
        _ => {
            return Err(bad(format!(
                "backend '{kind}' is not supported here (use unix:PATH or tcp:HOST:PORT)"
            )))
        }
    };
    Ok(ServerSpec {
        addr,
        wait: wait.unwrap_or(true),
    })
}

fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        (h.to_string(), p)
    } else {
        let (h, p) = s.rsplit_once(':')?;
        if h.contains(':') {
            return None;
        }
        (h.to_string(), p)
    };
    Some((host, port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Config {
        match parse(args.iter().copied()) {
            Ok(Action::Run(c)) => *c,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn err(args: &[&str]) -> CliError {
        match parse(args.iter().copied()) {
            Err(e) => e,
            other => panic!("{args:?} should fail: {other:?}"),
        }
    }

    const K: [&str; 2] = ["-kernel", "/k"];

    fn with_kernel(extra: &[&str]) -> Config {
        let mut v: Vec<&str> = K.to_vec();
        v.extend_from_slice(extra);
        run(&v)
    }

    #[test]
    fn defaults() {
        let c = with_kernel(&[]);
        assert_eq!(c.machine, Machine::Bulkhead);
        assert_eq!(c.mem_size, 128 << 20);
        assert_eq!(c.smp, Smp::default());
        assert_eq!(c.serial, SerialBackend::None);
        assert!(c.qmp.is_empty());
        assert!(!c.start_paused && !c.daemonize && !c.no_reboot && !c.no_shutdown);
        assert_eq!(c.kernel, Some(PathBuf::from("/k")));
    }

    #[test]
    fn memory_spellings() {
        for (arg, want) in [
            ("256", 256u64 << 20),
            ("256M", 256 << 20),
            ("256m", 256 << 20),
            ("size=1G", 1 << 30),
            ("1g", 1 << 30),
            ("1.5G", 3 << 29),
            ("65536K", 64 << 20),
            ("0", DEFAULT_MEM_SIZE),
            ("1000000B", 1_003_520), // rounded up to whole pages
        ] {
            assert_eq!(with_kernel(&["-m", arg]).mem_size, want, "-m {arg}");
        }
        for bad in [
            "abc",
            "-1",
            "12Q",
            "size=",
            "1G,slots=2",
            "1G,maxmem=4G",
            "1G,foo=1",
            "99999999999999T",
        ] {
            let e = err(&["-kernel", "/k", "-m", bad]);
            assert!(matches!(e, CliError::BadValue { .. }), "-m {bad}: {e:?}");
            assert!(e.to_string().starts_with("-m "), "{e}");
        }
    }

    #[test]
    fn smp_spellings() {
        assert_eq!(with_kernel(&["-smp", "2"]).smp.cpus, 2);
        let s = with_kernel(&["-smp", "cpus=2,sockets=1,cores=2,threads=1"]).smp;
        assert_eq!((s.cpus, s.sockets, s.cores, s.threads), (2, 1, 2, 1));
        let s = with_kernel(&["-smp", "sockets=2,cores=2,threads=2"]).smp;
        assert_eq!((s.cpus, s.sockets, s.cores, s.threads), (8, 2, 2, 2));
        let s = with_kernel(&["-smp", "4,cores=2"]).smp;
        assert_eq!((s.cpus, s.sockets, s.cores), (4, 2, 2));
        let s = with_kernel(&["-smp", "4,maxcpus=4"]).smp;
        assert_eq!(s.cpus, 4);
        // As QEMU 7.2's pc machine fills in: cores first, then sockets, threads last.
        let s = with_kernel(&["-smp", "2"]).smp;
        assert_eq!((s.sockets, s.cores, s.threads), (1, 2, 1));
        let s = with_kernel(&["-smp", "8,sockets=2"]).smp;
        assert_eq!((s.sockets, s.cores, s.threads), (2, 4, 1));
        let s = with_kernel(&["-smp", "8,sockets=2,cores=2"]).smp;
        assert_eq!((s.sockets, s.cores, s.threads), (2, 2, 2));
        let s = with_kernel(&["-smp", "4,threads=2"]).smp;
        assert_eq!((s.sockets, s.cores, s.threads), (1, 2, 2));
        for bad in [
            "0",
            "cpus=2,sockets=1,cores=3,threads=1",
            "foo=1",
            "2,maxcpus=4",
            "x",
            "2,clusters=2",
            "256",
        ] {
            let e = err(&["-kernel", "/k", "-smp", bad]);
            assert!(
                e.to_string().contains("smp") || e.to_string().contains("SMP"),
                "{bad}: {e}"
            );
        }
        let e = err(&["-M", "none", "-smp", "2"]);
        assert_eq!(
            e.to_string(),
            "Invalid SMP CPUs 2. The max CPUs supported by machine 'none' is 1"
        );
    }

    #[test]
    fn machine_spellings() {
        assert_eq!(run(&["-M", "none"]).machine, Machine::None);
        assert_eq!(run(&["-machine", "none"]).machine, Machine::None);
        assert_eq!(
            run(&["-machine", "type=none,accel=kvm"]).machine,
            Machine::None
        );
        assert_eq!(run(&["--machine", "none"]).machine, Machine::None);
        assert_eq!(with_kernel(&["-M", "bulkhead"]).machine, Machine::Bulkhead);
        for m in ["pc", "q35", "microvm", "pc-q35-7.2"] {
            let e = err(&["-M", m]);
            assert!(e.to_string().contains("unsupported machine type"), "{e}");
        }
        assert!(err(&["-M", "none,foo=bar"])
            .to_string()
            .contains("Invalid parameter 'foo'"));
    }

    #[test]
    fn kernel_initrd_append() {
        let c = with_kernel(&["-initrd", "/i", "-append", "console=ttyS0 quiet"]);
        assert_eq!(c.initrd, Some(PathBuf::from("/i")));
        assert_eq!(c.append, "console=ttyS0 quiet");
        assert!(err(&[]).to_string().contains("no -kernel given"));
        assert!(err(&["-initrd", "/i"])
            .to_string()
            .contains("-initrd only allowed"));
        assert!(err(&["-M", "none", "-kernel", "/k"])
            .to_string()
            .contains("-kernel"));
        assert_eq!(
            err(&["-kernel"]),
            CliError::MissingArgument("-kernel".into())
        );
    }

    #[test]
    fn serial_backends() {
        assert_eq!(
            with_kernel(&["-serial", "stdio"]).serial,
            SerialBackend::Stdio
        );
        assert_eq!(
            with_kernel(&["-serial", "none"]).serial,
            SerialBackend::None
        );
        assert_eq!(
            with_kernel(&["-serial", "null"]).serial,
            SerialBackend::Null
        );
        assert_eq!(
            with_kernel(&["-serial", "file:/tmp/a,,b"]).serial,
            SerialBackend::File(PathBuf::from("/tmp/a,b"))
        );
        assert_eq!(
            with_kernel(&["-serial", "unix:/tmp/s,server=on,wait=off"]).serial,
            SerialBackend::Unix(ServerSpec {
                addr: ListenAddr::Unix(PathBuf::from("/tmp/s")),
                wait: false
            })
        );
        assert_eq!(
            with_kernel(&["-serial", "unix:/tmp/s,server"]).serial,
            SerialBackend::Unix(ServerSpec {
                addr: ListenAddr::Unix(PathBuf::from("/tmp/s")),
                wait: true
            })
        );
        // -nographic makes stdio the default, as in QEMU; -nodefaults undoes it.
        assert_eq!(with_kernel(&["-nographic"]).serial, SerialBackend::Stdio);
        assert_eq!(
            with_kernel(&["-nographic", "-nodefaults"]).serial,
            SerialBackend::None
        );
        assert_eq!(
            with_kernel(&["-nographic", "-serial", "none"]).serial,
            SerialBackend::None
        );
        for bad in [
            "pty",
            "tcp:1.2.3.4:5,server=on",
            "bogus:x",
            "unix:/s",
            "file:",
            "mon:stdio",
        ] {
            let e = err(&["-kernel", "/k", "-serial", bad]);
            assert!(
                e.to_string().starts_with(&format!("-serial {bad}: ")),
                "{e}"
            );
        }
        let e = err(&["-kernel", "/k", "-serial", "stdio", "-serial", "none"]);
        assert!(e.to_string().contains("only one serial port"));
    }

    #[test]
    fn qmp_spellings() {
        let c = run(&[
            "-M",
            "none",
            "-qmp",
            "unix:/tmp/q.sock,server=on,wait=off",
            "-qmp",
            "tcp:127.0.0.1:4444,server,nowait",
            "-qmp",
            "tcp::5555,server=on,wait=off,nodelay=on,ipv4=on",
            "-qmp",
            "tcp:[::1]:6666,server=on,wait=off",
            "-qmp",
            "unix:/tmp/w.sock,server",
        ]);
        assert_eq!(c.qmp.len(), 5);
        assert_eq!(
            c.qmp[0].addr,
            ListenAddr::Unix(PathBuf::from("/tmp/q.sock"))
        );
        assert!(!c.qmp[0].wait);
        assert_eq!(
            c.qmp[1].addr,
            ListenAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 4444,
                ipv4_only: false,
                ipv6_only: false,
                nodelay: false
            }
        );
        assert!(!c.qmp[1].wait);
        assert_eq!(
            c.qmp[2].addr,
            ListenAddr::Tcp {
                host: String::new(),
                port: 5555,
                ipv4_only: true,
                ipv6_only: false,
                nodelay: true
            }
        );
        assert!(
            matches!(&c.qmp[3].addr, ListenAddr::Tcp { host, port: 6666, .. } if host == "::1")
        );
        assert!(c.qmp[4].wait, "wait defaults to on, as in QEMU");
        assert_eq!(c.qmp[3].addr.to_string(), "tcp:[::1]:6666");
        for bad in [
            "unix:/tmp/q.sock",
            "tcp:127.0.0.1:1",
            "tcp:127.0.0.1,server=on",
            "tcp:127.0.0.1:99999,server=on",
            "unix:/q,server=on,telnet=on",
            "unix:/q,server=maybe",
            "unix:/q,server=on,bogus=1",
            "stdio",
            "unix:,server=on",
        ] {
            let e = err(&["-M", "none", "-qmp", bad]);
            assert!(e.to_string().starts_with(&format!("-qmp {bad}: ")), "{e}");
        }
    }

    #[test]
    fn flags_and_names() {
        let c = with_kernel(&[
            "-S",
            "-name",
            "guest=vm1,process=bh-vm1,debug-threads=on",
            "-uuid",
            "12345678-9ABC-def0-1234-56789abcdef0",
            "-no-reboot",
            "-no-shutdown",
            "-pidfile",
            "/tmp/p",
            "-daemonize",
            "--worker-dir",
            "/opt/bh",
            "-enable-kvm",
            "-accel",
            "kvm",
            "-display",
            "none",
            "-no-user-config",
        ]);
        assert!(c.start_paused && c.no_reboot && c.no_shutdown && c.daemonize);
        assert_eq!(c.name.as_deref(), Some("vm1"));
        assert_eq!(c.process_name.as_deref(), Some("bh-vm1"));
        assert_eq!(
            c.uuid.as_deref(),
            Some("12345678-9abc-def0-1234-56789abcdef0")
        );
        assert_eq!(c.pidfile, Some(PathBuf::from("/tmp/p")));
        assert_eq!(c.worker_dir, Some(PathBuf::from("/opt/bh")));
        assert_eq!(c.sandbox, Mode::On);
        assert_eq!(c.sandbox_user, None);
        assert_eq!(with_kernel(&["--sandbox", "off"]).sandbox, Mode::Off);
        assert_eq!(
            with_kernel(&["--sandbox", "allow-weak"]).sandbox,
            Mode::AllowWeak
        );
        assert_eq!(
            with_kernel(&["--sandbox-user", "1000:100"]).sandbox_user,
            Some((1000, 100))
        );
        assert!(err(&["-kernel", "/k", "--sandbox", "maybe"])
            .to_string()
            .contains("expected on, off or allow-weak"));
        assert!(err(&["-kernel", "/k", "--sandbox-user", "0:0"])
            .to_string()
            .contains("UID:GID"));
        assert_eq!(with_kernel(&["-name", "foo"]).name.as_deref(), Some("foo"));
        assert!(with_kernel(&["-nographic"]).nographic);
        assert!(err(&["-kernel", "/k", "-name", "guest=x,foo=y"])
            .to_string()
            .contains("Invalid parameter 'foo'"));
        assert!(err(&["-kernel", "/k", "-uuid", "zzz"])
            .to_string()
            .contains("failed to parse UUID"));
        assert!(err(&["-kernel", "/k", "-accel", "tcg"])
            .to_string()
            .contains("only -accel kvm"));
        assert!(err(&["-kernel", "/k", "-display", "gtk"])
            .to_string()
            .contains("no display"));
    }

    #[test]
    fn conflicts() {
        assert_eq!(
            err(&["-kernel", "/k", "-daemonize", "-nographic"]).to_string(),
            "-nographic cannot be used with -daemonize"
        );
        assert!(err(&["-kernel", "/k", "-daemonize", "-serial", "stdio"])
            .to_string()
            .contains("cannot use stdio with -daemonize"));
    }

    #[test]
    fn unknown_and_unsupported_options() {
        assert_eq!(err(&["-foo"]).to_string(), "-foo: invalid option");
        assert_eq!(err(&["--foo"]).to_string(), "-foo: invalid option");
        assert!(err(&["-chardev", "pty,id=x"])
            .to_string()
            .contains("chardev backend 'pty' is not supported"));
        assert_eq!(
            err(&["-mon", "x"]).to_string(),
            "-mon: option not supported by bulkhead"
        );
        assert_eq!(
            err(&["-device", "x"]).to_string(),
            "-device x: device 'x' is not supported by bulkhead (it has virtio-blk-pci and \
             vhost-user-blk-pci)"
        );
        assert_eq!(
            err(&["-M", "none", "-drive", "file=/d"]).to_string(),
            "No 'PCI' bus found for device 'virtio-blk-pci' (machine 'none' has no devices; \
             -drive if=none and -blockdev are fine)"
        );
        assert!(err(&["disk.img"]).to_string().contains("disk.img"));
        assert_eq!(err(&["-m"]).to_string(), "-m: requires an argument");
    }

    #[test]
    fn add_fd_syntax() {
        let c = run(&[
            "-M",
            "none",
            "-add-fd",
            "fd=9,set=1,opaque=a,,b",
            "-add-fd",
            "set=0x10,fd=012",
        ]);
        assert_eq!(
            c.add_fds,
            vec![
                AddFd {
                    fd: 9,
                    set: 1,
                    opaque: Some("a,b".into()),
                    text: "fd=9,set=1,opaque=a,,b".into()
                },
                AddFd {
                    fd: 10,
                    set: 16,
                    opaque: None,
                    text: "set=0x10,fd=012".into()
                }
            ]
        );
        // Missing values stay -1 (refused at startup with QEMU's message); negatives wrap.
        let c = run(&[
            "-M",
            "none",
            "-add-fd",
            "",
            "-add-fd",
            "fd=-2,set=1,opaque=",
        ]);
        assert_eq!((c.add_fds[0].fd, c.add_fds[0].set), (-1, -1));
        assert_eq!(
            (c.add_fds[1].fd, c.add_fds[1].opaque.as_deref()),
            (-2, Some(""))
        );
        let e = |a: &str| err(&["-M", "none", "-add-fd", a]).to_string();
        assert_eq!(
            e("fd=abc,set=1"),
            "-add-fd fd=abc,set=1: Parameter 'fd' expects a number"
        );
        assert_eq!(
            e("fd=9,set=1k"),
            "-add-fd fd=9,set=1k: Parameter 'set' expects a number"
        );
        assert_eq!(
            e("fd=,set=1"),
            "-add-fd fd=,set=1: Parameter 'fd' expects a number"
        );
        assert_eq!(
            e("fd=9,set=99999999999999999999"),
            "-add-fd fd=9,set=99999999999999999999: Value '99999999999999999999' is too large \
             for parameter 'set'"
        );
        assert_eq!(
            e("fd=9,set=1,foo=bar"),
            "-add-fd fd=9,set=1,foo=bar: Invalid parameter 'foo'"
        );
        assert_eq!(e("9"), "-add-fd 9: Invalid parameter '9'");
        assert_eq!(
            err(&["-add-fd"]).to_string(),
            "-add-fd: requires an argument"
        );
    }

    #[test]
    fn option_groups_list_exactly_what_the_parser_accepts() {
        // A value each parameter accepts, by group and key.
        let sample = |group: &str, key: &str| -> &'static str {
            match (group, key) {
                ("machine", "type") => "bulkhead",
                ("machine" | "accel", "accel") => "kvm",
                ("smp-opts", "maxcpus") => "2",
                ("smp-opts", "sockets") => "2",
                ("smp-opts", _) => "1",
                ("memory", "size") => "256M",
                ("name", "debug-threads") => "on",
                ("name", _) => "x",
                ("add-fd", "opaque") => "text",
                ("add-fd", _) => "5",
                // A drive needs its file: the other keys are tested next to one.
                ("drive", "file") => "/d",
                ("drive", "if") => "none,file=/d",
                ("drive", "media") => "disk,file=/d",
                ("drive", "read-only" | "cache.direct") => "on,file=/d",
                ("drive", "format") => "qcow2,file=/d",
                ("drive", "node-name") => "n0,file=/d",
                ("drive", _) => "1000,file=/d",
                _ => panic!("no sample value for {group}.{key}"),
            }
        };
        for g in OPTION_GROUPS {
            assert!(!g.params.is_empty(), "{}", g.name);
            for p in g.params {
                let v = format!("{}={}", p.name, sample(g.name, p.name));
                let args = ["-kernel", "/k", g.flag, v.as_str()];
                match parse(args.iter().copied()) {
                    Ok(Action::Run(_)) => {}
                    other => panic!("{} {v}: {other:?}", g.flag),
                }
            }
            // A key the table does not list is refused.
            let e = err(&["-kernel", "/k", g.flag, "nosuchkey=1"]);
            assert!(matches!(e, CliError::BadValue { .. }), "{}: {e:?}", g.flag);
        }
        let names: std::collections::BTreeSet<_> = OPTION_GROUPS.iter().map(|g| g.name).collect();
        assert_eq!(names.len(), OPTION_GROUPS.len());
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(["-h"]), Ok(Action::Help));
        assert_eq!(parse(["--help"]), Ok(Action::Help));
        assert_eq!(parse(["-version"]), Ok(Action::Version));
        assert!(USAGE.contains("--worker-dir"));
    }

    #[test]
    fn opts_syntax() {
        assert_eq!(
            parse_opts("a,,b,c=d,,e,f", Some("path")),
            vec![
                ("path".to_string(), "a,b".to_string()),
                ("c".to_string(), "d,e".to_string()),
                ("f".to_string(), String::new())
            ]
        );
        assert_eq!(parse_size("1k", 1), Some(1024));
        assert_eq!(parse_size("1.", 1), None);
        assert_eq!(parse_size("", 1), None);
        assert_eq!(parse_size("20E", 1), None);
    }
}
