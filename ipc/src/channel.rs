//! Blocking frame channel over a `SOCK_SEQPACKET` unix socket, used by the workers.
//!
//! One datagram is one frame. Receiving uses a buffer one byte larger than
//! [`MAX_FRAME_BYTES`] and room for one fd more than [`MAX_FDS`], so an oversize frame or an
//! excess of fds is detected rather than silently truncated.

use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;

use sendfd::{RecvWithFd, SendWithFd};

use crate::{codec, Error, Frame, Hello, Protocol, Result, Role, HELLO_MAGIC, MAX_FDS};
use crate::{MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// Creates a connected `SOCK_SEQPACKET` pair, both ends close-on-exec.
pub fn seqpacket_pair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: `fds` is a valid, writable array of two ints as socketpair(2) requires.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: socketpair succeeded, so both fds are open and owned by nobody else.
    let pair = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok(pair)
}

/// Marks `fd` close-on-exec.
pub(crate) fn set_cloexec(fd: &OwnedFd) -> Result<()> {
    // SAFETY: F_GETFD/F_SETFD on an fd we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    if rc < 0 {
        return Err(Error::Io(std::io::Error::last_os_error()));
    }
    Ok(())
}

fn is_peer_gone(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN)
    )
}

/// Encodes and sends one frame on `sock` (shared by the blocking and async channels).
pub(crate) fn send_frame<P: Protocol>(
    sock: &UnixDatagram,
    frame: &Frame<P>,
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    let expected = frame.fd_count();
    if fds.len() != expected {
        return Err(Error::FdMismatch {
            expected,
            got: fds.len(),
        });
    }
    if fds.len() > MAX_FDS {
        return Err(Error::TooManyFds { max: MAX_FDS });
    }
    let bytes = codec::encode(frame)?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    match sock.send_with_fd(&bytes, &raw) {
        Ok(n) if n == bytes.len() => Ok(()),
        Ok(n) => Err(Error::Protocol(format!(
            "short send: {n} of {} bytes",
            bytes.len()
        ))),
        Err(e) if is_peer_gone(&e) => Err(Error::PeerClosed),
        Err(e) => Err(Error::Io(e)),
    }
}

/// Receives one datagram and decodes it; `Ok(None)` means `WouldBlock` (async callers only).
pub(crate) fn recv_frame<P: Protocol>(
    sock: &UnixDatagram,
) -> Result<Option<(Frame<P>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_FRAME_BYTES + 1];
    let mut raw = [-1 as RawFd; MAX_FDS + 1];
    let (n, nfds) = match sock.recv_with_fd(&mut buf, &mut raw) {
        Ok(v) => v,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
        Err(e) if is_peer_gone(&e) => return Err(Error::PeerClosed),
        Err(e) => return Err(Error::Io(e)),
    };
    // Take ownership first so every fd is closed on any error path below.
    let fds: Vec<OwnedFd> = raw[..nfds]
        .iter()
        // SAFETY: the kernel just installed these fds in our table for us; nobody else owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    for fd in &fds {
        set_cloexec(fd)?;
    }
    if n == 0 && fds.is_empty() {
        return Err(Error::PeerClosed);
    }
    if n > MAX_FRAME_BYTES {
        return Err(Error::Oversize {
            len: n,
            max: MAX_FRAME_BYTES,
        });
    }
    if fds.len() > MAX_FDS {
        return Err(Error::TooManyFds { max: MAX_FDS });
    }
    let frame: Frame<P> = codec::decode(&buf[..n])?;
    let expected = frame.fd_count();
    if fds.len() != expected {
        return Err(Error::FdMismatch {
            expected,
            got: fds.len(),
        });
    }
    Ok(Some((frame, fds)))
}

/// Checks a peer's hello.
pub(crate) fn check_hello(hello: &Hello, expect: Role) -> Result<()> {
    if hello.magic != HELLO_MAGIC {
        return Err(Error::Handshake(format!("bad magic {:#x}", hello.magic)));
    }
    if hello.version != PROTOCOL_VERSION {
        return Err(Error::Handshake(format!(
            "peer speaks protocol version {}, we speak {}",
            hello.version, PROTOCOL_VERSION
        )));
    }
    if hello.role != expect {
        return Err(Error::Handshake(format!(
            "peer is {:?}, expected {:?}",
            hello.role, expect
        )));
    }
    Ok(())
}

/// A blocking, typed frame channel. `send` takes `&self`, so several threads may send on one
/// channel (each datagram is atomic); receive from one thread.
#[derive(Debug)]
pub struct Channel<P: Protocol> {
    sock: UnixDatagram,
    _p: PhantomData<fn() -> P>,
}

impl<P: Protocol> Channel<P> {
    /// Creates a connected pair of channels.
    pub fn pair() -> Result<(Self, Self)> {
        let (a, b) = seqpacket_pair()?;
        Ok((Self::from_fd(a), Self::from_fd(b)))
    }

    /// Wraps one end of a `SOCK_SEQPACKET` socketpair (e.g. inherited by a worker).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Channel {
            sock: UnixDatagram::from(fd),
            _p: PhantomData,
        }
    }

    /// Unwraps the socket.
    pub fn into_fd(self) -> OwnedFd {
        OwnedFd::from(self.sock)
    }

    /// Sends `frame` with exactly `frame.fd_count()` fds attached.
    pub fn send(&self, frame: &Frame<P>, fds: &[BorrowedFd<'_>]) -> Result<()> {
        send_frame(&self.sock, frame, fds)
    }

    /// Blocks for the next frame and its fds.
    pub fn recv(&self) -> Result<(Frame<P>, Vec<OwnedFd>)> {
        loop {
            if let Some(v) = recv_frame(&self.sock)? {
                return Ok(v);
            }
        }
    }

    /// Sends an event (no fds).
    pub fn send_event(&self, event: P::Event) -> Result<()> {
        self.send(&Frame::Event(event), &[])
    }

    /// Sends the reply to request `id`.
    pub fn reply(&self, id: u64, body: P::Reply, fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send(&Frame::Reply { id, body }, fds)
    }

    /// Exchanges hellos: sends ours as `me`, then requires the peer to be `peer`.
    pub fn handshake(&self, me: Role, peer: Role) -> Result<Hello> {
        self.send(&Frame::Hello(Hello::new(me)), &[])?;
        match self.recv()? {
            (Frame::Hello(h), _) => {
                check_hello(&h, peer)?;
                Ok(h)
            }
            _ => Err(Error::Handshake("first frame was not a hello".into())),
        }
    }
}

impl<P: Protocol> AsFd for Channel<P> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}
