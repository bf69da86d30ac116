//! `bulkhead-blockd`: a vhost-user-blk back end (issue 5), one process per disk.
//!
//! * [`format`]: the image format layer ([`format::DiskImage`], raw, opening an image and its
//!   backing chain);
//! * [`qcow2`]: the qcow2 format (read, write, backing image);
//! * [`iov`]: a request's guest buffers as `iovec`s (`preadv`/`pwritev` straight into guest
//!   memory) and the bounce-buffer fallback;
//! * [`request`]: one virtio-blk request, from a descriptor chain to a status byte, with every
//!   guest-supplied address, length and direction checked;
//! * [`errors`]: the `rerror`/`werror` policy: what a request the host failed does (report,
//!   ignore, or held until the VM resumes), and the `BLOCK_IO_ERROR` events, bounded;
//! * [`pool`]: a disk's I/O threads (several requests of a queue in flight);
//! * [`backend`]: the vhost-user back end (rust-vmm's `vhost-user-backend` framework): features,
//!   config space, one worker thread per queue;
//! * [`options`]: the standalone command line;
//! * [`worker`]: worker mode, as the monitor launches it (ipc, handed fds, I/O counters);

pub mod backend;
pub mod errors;
pub mod format;
pub mod iov;
pub mod options;
pub mod pool;
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

impl Error {
    /// The errno this error stands for when a request fails on it (the error policy's input,
    /// as QEMU's negative return codes): a system call's own errno, `ENOMEM` for a buffer that
    /// cannot be had, `EIO` for corrupt or poisoned state, `ENOTSUP` for a feature the image
    /// needs and this back end lacks, `EPERM` for a write to a read-only image.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io(_, e) | Error::Open(_, e) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::ReadOnly => libc::EPERM,
            Error::TooLarge(_) => libc::ENOMEM,
            Error::Unsupported(_) => libc::ENOTSUP,
            Error::Poisoned | Error::Corrupt(_) | Error::Usage(_) => libc::EIO,
        }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
