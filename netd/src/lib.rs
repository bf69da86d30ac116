//! `bulkhead-netd`: a vhost-user-net back end (issue 6), one process per interface, on a tap.
//!
//! * [`tap`]: the tap fd (opened by name before the sandbox, or inherited), its vnet header size
//!   and offloads;
//! * [`backend`]: the vhost-user back end (rust-vmm's `vhost-user-backend` framework): features,
//!   config space (MAC, link status), the tx path (descriptor chain → `writev` on the tap) and the
//!   rx path (tap → guest buffers, mergeable or not, with backpressure);
//! * [`relay`]: the vhost-user connection relayed between the front end and the crate, holding
//!   a `SET_VRING_ENABLE` sent before `SET_FEATURES` (QEMU 7.2) until after it;
//! * [`options`]: the standalone command line;
//! * [`confine`]: the sandbox policy standalone netd enters;
//! * [`worker`]: worker mode, as the monitor launches it (ipc, handed tap and socket, counters,
//!   `set_link`).

pub mod backend;
pub mod confine;
pub mod options;
pub mod relay;
pub mod tap;
pub mod worker;

/// Errors of the back end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on the tap failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// The tap was not opened with a vnet header (`IFF_VNET_HDR`).
    #[error("the tap has no vnet header (IFF_VNET_HDR); open it with one")]
    NoVnetHdr,
    /// The tap is not a tap (`IFF_TAP`) or carries packet information (`IFF_NO_PI` unset).
    #[error("the fd is not a tap without packet information (IFF_TAP|IFF_NO_PI)")]
    NotATap,
    /// A vhost-user message the relay cannot pass on (oversize, too many fds, cut short).
    #[error("vhost-user relay: {0}")]
    Relay(String),
    /// Bad command line.
    #[error("{0}")]
    Usage(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
