//! `bulkhead-blockd`: a vhost-user-blk back end (issue 5), one process per disk.
//!
//! * [`format`]: the image format layer ([`format::DiskImage`], raw, opening an image and its
//!   backing chain);
//! * [`qcow2`]: the qcow2 format (read, write, backing image);
//! * [`request`]: one virtio-blk request, from a descriptor chain to a status byte, with every
//!   guest-supplied address, length and direction checked;
//! * [`backend`]: the vhost-user back end (rust-vmm's `vhost-user-backend` framework): features,
//!   config space, one worker thread per queue;
//! * [`options`]: the standalone command line;
//! * [`worker`]: worker mode, as the monitor launches it (ipc, handed fds, I/O counters);

pub mod backend;
pub mod format;
pub mod options;
pub mod qcow2;
pub mod request;
pub mod worker;

/// Errors of the back end.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on the image failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// A write to a read-only image.
    #[error("the image is read-only")]
    ReadOnly,
    /// A buffer too large to allocate.
    #[error("buffer of {0} bytes too large")]
    TooLarge(u64),
    /// A lock was poisoned by a panicking thread.
    #[error("a lock was poisoned")]
    Poisoned,
    /// An image file could not be opened.
    #[error("opening {0}: {1}")]
    Open(String, #[source] std::io::Error),
    /// An image uses a feature this back end does not implement.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// An image's metadata is inconsistent (or hostile).
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// Bad command line.
    #[error("{0}")]
    Usage(String),
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
