//! The tokio flavour of [`crate::Channel`], used by the monitor.

use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::channel::{check_hello, recv_frame, send_frame};
use crate::{Error, Frame, Hello, Protocol, Result, Role};

/// A non-blocking typed frame channel driven by tokio.
#[derive(Debug)]
pub struct AsyncChannel<P: Protocol> {
    inner: AsyncFd<UnixDatagram>,
    _p: PhantomData<fn() -> P>,
}

impl<P: Protocol> AsyncChannel<P> {
    /// Wraps one end of a `SOCK_SEQPACKET` socketpair. Must be called inside a tokio runtime.
    pub fn from_fd(fd: OwnedFd) -> Result<Self> {
        let sock = UnixDatagram::from(fd);
        sock.set_nonblocking(true)?;
        // SAFETY: `sock` owns its fd and moves into the AsyncFd, so the fd stays open and
        // refers to the same socket for the AsyncFd's whole lifetime.
        let inner = unsafe {
            AsyncFd::register_with_interest(sock, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| Error::Io(e.into()))?;
        Ok(AsyncChannel {
            inner,
            _p: PhantomData,
        })
    }

    /// Sends `frame` with exactly `frame.fd_count()` fds attached.
    pub async fn send(&self, frame: &Frame<P>, fds: &[BorrowedFd<'_>]) -> Result<()> {
        loop {
            let mut guard = self.inner.writable().await?;
            match send_frame(guard.get_inner(), frame, fds) {
                Err(Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                }
                other => return other,
            }
        }
    }

    /// Waits for the next frame and its fds.
    pub async fn recv(&self) -> Result<(Frame<P>, Vec<OwnedFd>)> {
        loop {
            let mut guard = self.inner.readable().await?;
            match recv_frame(guard.get_inner())? {
                Some(v) => return Ok(v),
                None => guard.clear_ready(),
            }
        }
    }

    /// Exchanges hellos: sends ours as `me`, then requires the peer to be `peer`.
    pub async fn handshake(&self, me: Role, peer: Role) -> Result<Hello> {
        self.send(&Frame::Hello(Hello::new(me)), &[]).await?;
        match self.recv().await? {
            (Frame::Hello(h), _) => {
                check_hello(&h, peer)?;
                Ok(h)
            }
            _ => Err(Error::Handshake("first frame was not a hello".into())),
        }
    }

    /// The raw socket fd (for logging).
    pub fn raw_fd(&self) -> RawFd {
        self.inner.get_ref().as_raw_fd()
    }
}

impl<P: Protocol> AsFd for AsyncChannel<P> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.get_ref().as_fd()
    }
}
