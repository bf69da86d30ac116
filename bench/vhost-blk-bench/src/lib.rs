//! The front-end side of vhost-user-blk, as a guest's virtio-blk driver plus its VMM would play
//! it, for benchmarking back ends (`bulkhead-blockd`, `qemu-storage-daemon`) over their real
//! sockets; the `vhost-blk-bench` binary is built on it.
//!
//! * [`guest`]: guest memory, one memfd mapped shared here and handed to the back end;
//! * [`virtq`]: the driver half of a split virtqueue (descriptor table, available ring written
//!   here, used ring read here), with `VIRTIO_RING_F_EVENT_IDX` notification suppression;
//! * [`blk`]: one vhost-user-blk device: the vhost-user negotiation (through rust-vmm's
//!   [`vhost::vhost_user::Frontend`]), one queue, request slots, kick and call eventfds.
//!
//! Nothing here trusts the back end more than it has to: used-ring entries are checked against
//! the slots in flight, and guest memory is only touched through `vm-memory`'s bounds-checked
//! accessors.

pub mod blk;
pub mod guest;
pub mod virtq;

/// Errors of the front end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// A vhost-user request failed.
    #[error("vhost-user {0}: {1}")]
    Vhost(&'static str, #[source] vhost::Error),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The back end does something the front end cannot work with.
    #[error("back end: {0}")]
    Backend(String),
    /// A parameter out of range.
    #[error("{0}")]
    Config(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
