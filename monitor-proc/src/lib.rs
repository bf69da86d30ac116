//! The Bulkhead monitor (`bulkhead`), as a library the binary wires together.
//!
//! - [`cli`]: the QEMU-style command line;
//! - [`block`]: `-drive`, `-blockdev` and `-device virtio-blk-pci` resolved into the block graph;
//! - [`disks`]: the images the monitor opens and the `bulkhead-blockd` serving each disk;
//! - [`io_error`]: `werror`/`rerror`, the disks' I/O status and `BLOCK_IO_ERROR`;
//! - [`nics`]: `-netdev tap` / `-device virtio-net-pci`, the taps, and the `bulkhead-netd` serving each NIC;
//! - [`hotplug`]: the device life cycle disks and NICs share (plug, eject request, pending
//!   unplugs, `DEVICE_DELETED`);
//! - [`daemon`]: `-daemonize` and `-pidfile`;
//! - [`memory`]: guest RAM as a sealed memfd;
//! - [`fds`]: fds passed in by clients (per-session `getfd` names, shared `add-fd` sets);
//! - [`info`]: facts about the configured machine that query commands report;
//! - [`inspect`]: a live process's confinement as `/proc` shows it (`x-query-sandbox`);
//! - [`chardev`]: the serial port's host side (`-serial`);
//! - [`launcher`]: the process that starts workers once the monitor has confined itself;
//! - [`confine`]: the monitor's own landlock ruleset and seccomp filter;
//! - [`worker`]: spawning `bulkhead-vcpu` with exactly the fds it needs, describing its exit;
//! - [`vm`]: the run-state machine and the worker client (supervision);
//! - [`qmp`]: the QMP server (protocol, sessions, command registry, events);
//! - [`logging`]: `bulkhead: ...` diagnostics on stderr.

pub mod block;
pub mod chardev;
pub mod cli;
pub mod confine;
pub mod daemon;
pub mod disks;
pub mod fds;
pub mod hotplug;
pub mod info;
pub mod inspect;
pub mod io_error;
pub mod launcher;
pub mod logging;
pub mod memory;
pub mod nics;
pub mod qmp;
pub mod vm;
pub mod worker;
