//! Control-plane IPC between the Bulkhead monitor and its sandboxed workers.
//!
//! Every monitor↔worker link is one `SOCK_SEQPACKET` socketpair. Each datagram is one
//! [`Frame`]: a handshake [`Hello`], a request with an id, a reply echoing that id, or an
//! event. Payloads are encoded by [`codec`] (bincode 2 today, hidden behind that module so the
//! encoding can be swapped) and file descriptors ride along as `SCM_RIGHTS` ancillary data.
//!
//! Guarantees this crate gives its callers:
//! - a frame is at most [`MAX_FRAME_BYTES`] long and carries at most [`MAX_FDS`] fds; larger ones
//!   are refused on send and reported (never silently truncated) on receive;
//! - every message type declares how many fds it carries ([`Wire::fd_count`]); a frame whose fd
//!   count differs is rejected and its fds closed;
//! - every received fd is `FD_CLOEXEC`;
//! - a dead peer is an immediate [`Error::PeerClosed`], on send and on receive, never a hang;
//! - replies are matched to requests by id, so a worker may answer out of order ([`rpc`]).

pub mod async_channel;
pub mod channel;
pub mod codec;
pub mod messages;
pub mod rpc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use async_channel::AsyncChannel;
pub use channel::Channel;
pub use rpc::RpcClient;

/// Version of the monitor↔worker protocol; both ends must agree exactly.
pub const PROTOCOL_VERSION: u32 = 1;
/// Magic number carried in the handshake ("BKHD").
pub const HELLO_MAGIC: u32 = 0x424b_4844;
/// Largest encoded frame accepted or sent, in bytes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Most file descriptors one frame may carry.
pub const MAX_FDS: usize = 16;

/// Errors of the IPC layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer closed its end or died.
    #[error("peer closed the channel")]
    PeerClosed,
    /// A system call on the socket failed.
    #[error("ipc socket error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame is larger than [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    Oversize {
        /// Size of the offending frame (at least, when received).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A frame carries more fds than [`MAX_FDS`] (or the kernel truncated its control data).
    #[error("frame carries too many file descriptors (limit {max})")]
    TooManyFds {
        /// The limit.
        max: usize,
    },
    /// A frame carries a different number of fds than its message declares.
    #[error("message expects {expected} file descriptors but {got} were attached")]
    FdMismatch {
        /// What the message type declares.
        expected: usize,
        /// What was attached.
        got: usize,
    },
    /// The payload could not be encoded.
    #[error("cannot encode frame: {0}")]
    Encode(String),
    /// The payload could not be decoded (malformed or truncated frame).
    #[error("malformed frame: {0}")]
    Decode(String),
    /// The handshake failed (bad magic, other version, unexpected role or frame).
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// A reply or request arrived where the protocol does not allow it.
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which process sits at an end of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The monitor (`bulkhead`).
    Monitor,
    /// The KVM/vCPU worker (`bulkhead-vcpu`).
    Vcpu,
    /// A virtio-blk back end (`bulkhead-blockd`).
    Block,
    /// A virtio-net back end (`bulkhead-netd`).
    Net,
}

/// First frame each end sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must be [`HELLO_MAGIC`].
    pub magic: u32,
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The sender's role.
    pub role: Role,
    /// The sender's pid, for logs.
    pub pid: u32,
}

impl Hello {
    /// The hello this process sends in `role`.
    pub fn new(role: Role) -> Self {
        Hello {
            magic: HELLO_MAGIC,
            version: PROTOCOL_VERSION,
            role,
            pid: std::process::id(),
        }
    }
}

/// A message body that may travel in a frame.
pub trait Wire: Serialize + DeserializeOwned + Send + 'static {
    /// How many fds travel with this message (0 for most).
    fn fd_count(&self) -> usize {
        0
    }
}

impl Wire for () {}

/// The three message types of one monitor↔worker protocol.
pub trait Protocol: Send + Sync + 'static {
    /// Requests (monitor → worker).
    type Request: Wire;
    /// Replies (worker → monitor), each echoing a request id.
    type Reply: Wire;
    /// Unsolicited events (worker → monitor).
    type Event: Wire;
}

/// One datagram on a channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum Frame<P: Protocol> {
    /// Handshake; the first frame in each direction.
    Hello(Hello),
    /// A request the peer must answer with a [`Frame::Reply`] of the same id.
    Request {
        /// Request id, unique among outstanding requests of the sender.
        id: u64,
        /// The request.
        body: P::Request,
    },
    /// The answer to request `id`.
    Reply {
        /// Id of the request answered.
        id: u64,
        /// The reply.
        body: P::Reply,
    },
    /// An unsolicited event.
    Event(P::Event),
}

impl<P: Protocol> Frame<P> {
    /// Number of fds this frame must carry.
    pub fn fd_count(&self) -> usize {
        match self {
            Frame::Hello(_) => 0,
            Frame::Request { body, .. } => body.fd_count(),
            Frame::Reply { body, .. } => body.fd_count(),
            Frame::Event(body) => body.fd_count(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
