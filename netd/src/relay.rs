//! The vhost-user connection, relayed: netd accepts the front end itself and passes its messages
//! to the `vhost` crate's request handler over a second, private connection, holding back one
//! kind of message the crate would refuse.
//!
//! **Why.** QEMU 7.2's vhost-user-net sends `VHOST_USER_SET_VRING_ENABLE` when the guest's driver
//! sets the device features (its `virtio_net_set_features` attaches the queue pairs), long before
//! it sends `VHOST_USER_SET_FEATURES` to the back end (at `DRIVER_OK`, in `vhost_dev_start`). The
//! spec says the message "should be sent only when `VHOST_USER_F_PROTOCOL_FEATURES` has been
//! negotiated"; `vhost` 0.18 (the newest release; the check is unchanged upstream) enforces that
//! (`InactiveFeature`) and ends the session, as does `vhost-user-backend` 0.24's own handler.
//! Offering no `PROTOCOL_FEATURES` would avoid the message but also lose `REPLY_ACK` and the
//! config space (MAC, link status) other front ends read. So netd reorders: a
//! `SET_VRING_ENABLE` that arrives before the first `SET_FEATURES` is held (the latest state per
//! ring, at most [`MAX_HELD`] rings) and given to the crate right after that `SET_FEATURES`, if it
//! acked `PROTOCOL_FEATURES` (otherwise the crate enables every ring itself, as the spec says, and
//! the held states are dropped). If the front end asked for a reply (`NEED_REPLY`), netd
//! answers success for the held message itself. Everything else passes unchanged, in order, with
//! its file descriptors; once `SET_FEATURES` has passed nothing is held any more.
//!
//! **How.** netd accepts the front end itself and serves the crate's daemon one end of a
//! `socketpair()` made before the sandbox (`VhostUserDaemon::start_with_stream`, the
//! `third_party/vhost-user-backend` addition). [`Relay::start`] runs two threads between the
//! front end's connection and the other end: front end → crate (message by message, through
//! [`Reorder`]) and crate → front end (replies, message by message). Both only
//! `recvmsg`/`sendmsg`; when either side closes, both sockets are shut down, so the daemon sees
//! its peer leave exactly when the front end does. Each message is bounded as the crate bounds
//! it: a body of at most [`MAX_MSG_SIZE`] bytes and at most [`MAX_ATTACHED_FD_ENTRIES`] fds;
//! anything else ends the connection with an error.
//!
//! Control messages only: the data path (guest memory, kick and call eventfds, the tap) never
//! passes through here.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserVirtioFeatures, MAX_ATTACHED_FD_ENTRIES,
    MAX_MSG_SIZE,
};

use crate::{Error, Result};

/// Size of a vhost-user message header: request, flags, size (native-endian `u32`s).
pub const HDR_SIZE: usize = 12;
/// Most rings whose early enable state is held.
pub const MAX_HELD: usize = 64;
/// Control buffer for [`MAX_ATTACHED_FD_ENTRIES`] fds: `CMSG_SPACE(32 * 4)` = 16 + 128 bytes,
/// in `u64`s for the alignment of `cmsghdr`.
const CMSG_WORDS: usize = 18;

/// One vhost-user message: header fields, body and the fds that came with it.
#[derive(Debug)]
pub struct Message {
    /// The request code.
    pub request: u32,
    /// Version, `REPLY`, `NEED_REPLY`.
    pub flags: u32,
    /// The payload (`size` bytes).
    pub body: Vec<u8>,
    /// File descriptors attached to the message.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    fn wire(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HDR_SIZE + self.body.len());
        v.extend_from_slice(&self.request.to_ne_bytes());
        v.extend_from_slice(&self.flags.to_ne_bytes());
        v.extend_from_slice(&(self.body.len() as u32).to_ne_bytes());
        v.extend_from_slice(&self.body);
        v
    }

    /// A `SET_VRING_ENABLE` request for ring `index` (no reply requested).
    fn vring_enable(index: u32, num: u32) -> Message {
        let mut body = index.to_ne_bytes().to_vec();
        body.extend_from_slice(&num.to_ne_bytes());
        Message {
            request: u32::from(FrontendReq::SET_VRING_ENABLE),
            flags: 1,
            body,
            fds: Vec::new(),
        }
    }

    /// The success reply (`u64` 0) to a request that asked for one (`NEED_REPLY`).
    fn ack(request: u32) -> Message {
        Message {
            request,
            flags: 1 | VhostUserHeaderFlag::REPLY.bits(),
            body: 0u64.to_ne_bytes().to_vec(),
            fds: Vec::new(),
        }
    }

    fn u32_at(&self, off: usize) -> Option<u32> {
        let b = self.body.get(off..off + 4)?;
        Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_at(&self, off: usize) -> Option<u64> {
        let b = self.body.get(off..off + 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_ne_bytes(a))
    }
}

/// What the relay does with the front end's messages before the first `SET_FEATURES`.
#[derive(Debug, Default)]
pub struct Reorder {
    /// `SET_FEATURES` has passed: nothing is held any more.
    features_seen: bool,
    /// Ring index → the latest enable state sent before `SET_FEATURES`.
    held: BTreeMap<u32, u32>,
}

/// The outcome of [`Reorder::step`].
#[derive(Debug)]
pub struct Step {
    /// Messages for the crate, in this order.
    pub forward: Vec<Message>,
    /// A reply netd sends the front end itself (for a held message that asked for one).
    pub reply: Option<Message>,
}

impl Reorder {
    /// Takes one message from the front end.
    pub fn step(&mut self, m: Message) -> Step {
        let set_features = u32::from(FrontendReq::SET_FEATURES);
        let set_vring_enable = u32::from(FrontendReq::SET_VRING_ENABLE);
        if !self.features_seen && m.request == set_vring_enable && m.body.len() == 8 {
            if let (Some(index), Some(num)) = (m.u32_at(0), m.u32_at(4)) {
                if self.held.len() < MAX_HELD || self.held.contains_key(&index) {
                    self.held.insert(index, num);
                    let reply = (m.flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0)
                        .then(|| Message::ack(m.request));
                    // Any fds sent with it are closed here, as the crate would close them.
                    return Step {
                        forward: Vec::new(),
                        reply,
                    };
                }
            }
        }
        if self.features_seen || m.request != set_features {
            return Step {
                forward: vec![m],
                reply: None,
            };
        }
        self.features_seen = true;
        let held = std::mem::take(&mut self.held);
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let acked_protocol = m.u64_at(0).is_some_and(|f| f & protocol != 0);
        let mut forward = vec![m];
        if acked_protocol {
            forward.extend(held.into_iter().map(|(i, n)| Message::vring_enable(i, n)));
        }
        Step {
            forward,
            reply: None,
        }
    }
}

/// Receives into `buf` once, appending any fds received; returns the byte count (0: end of
/// stream).
fn recv_some(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; CMSG_WORDS];
    // SAFETY: an all-zero msghdr is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    let n = loop {
        // SAFETY: msg points to the live iovec over `buf` and to `cbuf`, with their sizes.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(Error::Io("vhost-user relay: recvmsg", e));
        }
    };
    // SAFETY: msg was filled in by recvmsg; the CMSG_* walk stays inside msg_controllen.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: c is a non-null header inside cbuf, as CMSG_FIRSTHDR/NXTHDR return it.
        let h = unsafe { &*c };
        if h.cmsg_level == libc::SOL_SOCKET && h.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN has no preconditions.
            let data_len =
                (h.cmsg_len as usize).saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
            // SAFETY: the data of an SCM_RIGHTS header holds data_len / 4 ints inside cbuf.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<libc::c_int>();
            for i in 0..data_len / std::mem::size_of::<libc::c_int>() {
                // SAFETY: i is inside the header's data (above); the kernel installed each fd
                // for us, so we own it.
                let raw = unsafe { std::ptr::read_unaligned(data.add(i)) };
                // SAFETY: as above: a fresh fd nothing else owns.
                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || fds.len() > MAX_ATTACHED_FD_ENTRIES {
        return Err(Error::Relay(format!(
            "a message carries more than {MAX_ATTACHED_FD_ENTRIES} fds"
        )));
    }
    Ok(n)
}

/// Fills `buf` completely; `Ok(false)` if the stream ended before its first byte.
fn recv_exact(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        let n = recv_some(fd, &mut buf[off..], fds)?;
        if n == 0 {
            if off == 0 {
                return Ok(false);
            }
            return Err(Error::Relay("the peer closed inside a message".into()));
        }
        off += n;
    }
    Ok(true)
}

/// Reads one whole message; `None` when the peer closed between messages.
pub fn recv_message(sock: &UnixStream) -> Result<Option<Message>> {
    let fd = sock.as_raw_fd();
    let mut fds = Vec::new();
    let mut hdr = [0u8; HDR_SIZE];
    if !recv_exact(fd, &mut hdr, &mut fds)? {
        return Ok(None);
    }
    let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8) as usize);
    if size > MAX_MSG_SIZE {
        return Err(Error::Relay(format!(
            "request {request}: a {size}-byte body (at most {MAX_MSG_SIZE})"
        )));
    }
    let mut body = vec![0u8; size];
    if size > 0 && !recv_exact(fd, &mut body, &mut fds)? {
        return Err(Error::Relay("the peer closed inside a message".into()));
    }
    Ok(Some(Message {
        request,
        flags,
        body,
        fds,
    }))
}

/// Writes one whole message, its fds with its first byte.
pub fn send_message(sock: &UnixStream, m: &Message) -> Result<()> {
    let bytes = m.wire();
    let raw: Vec<RawFd> = m.fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cbuf = [0u64; CMSG_WORDS];
    let mut off = 0;
    while off < bytes.len() {
        let rest = &bytes[off..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: an all-zero msghdr is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if off == 0 && !raw.is_empty() {
            let fd_bytes = std::mem::size_of_val(raw.as_slice());
            // SAFETY: CMSG_SPACE has no preconditions.
            let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
            if space > std::mem::size_of_val(&cbuf) {
                return Err(Error::Relay(format!(
                    "a message carries more than {MAX_ATTACHED_FD_ENTRIES} fds"
                )));
            }
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points to cbuf with room for one header of `space` bytes
            // (checked above), so CMSG_FIRSTHDR is non-null and its data holds the fds.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes,
                );
            }
        }
        // SAFETY: msg points to the live iovec over `bytes` and, if set, to cbuf, with sizes.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::Io("vhost-user relay: sendmsg", e));
        }
        off += n as usize;
    }
    Ok(())
}

struct Shared {
    front: UnixStream,
    back: UnixStream,
    /// Whole messages to the front end, from either thread, one at a time.
    front_write: Mutex<()>,
    /// Set by the first thread that ends; errors after it are the other side going away.
    closing: AtomicBool,
}

impl Shared {
    fn send_front(&self, m: &Message) -> Result<()> {
        let _g = self.front_write.lock().unwrap_or_else(|e| e.into_inner());
        send_message(&self.front, m)
    }

    /// Ends both connections (the blocked thread wakes up with end of stream).
    fn close(&self) -> bool {
        let first = !self.closing.swap(true, Ordering::AcqRel);
        let _ = self.front.shutdown(std::net::Shutdown::Both);
        let _ = self.back.shutdown(std::net::Shutdown::Both);
        first
    }

    fn front_to_back(&self) -> Result<()> {
        let mut reorder = Reorder::default();
        while let Some(m) = recv_message(&self.front)? {
            let step = reorder.step(m);
            if step.forward.len() > 1 {
                eprintln!(
                    "bulkhead-netd: SET_VRING_ENABLE for {} ring(s) came before SET_FEATURES; \
                     given to the back end after it",
                    step.forward.len() - 1
                );
            }
            if let Some(r) = step.reply {
                self.send_front(&r)?;
            }
            for f in &step.forward {
                send_message(&self.back, f)?;
            }
        }
        Ok(())
    }

    fn back_to_front(&self) -> Result<()> {
        while let Some(m) = recv_message(&self.back)? {
            self.send_front(&m)?;
        }
        Ok(())
    }

    /// Runs one direction; the first to end closes both, and only its error counts.
    fn run(&self, f: fn(&Shared) -> Result<()>) -> Result<()> {
        let r = f(self);
        if self.close() {
            r
        } else {
            Ok(())
        }
    }
}

/// The two relay threads.
pub struct Relay {
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Relay {
    /// Relays between the front end's connection `front` and the crate's `back`.
    pub fn start(front: UnixStream, back: UnixStream) -> Result<Relay> {
        let shared = Arc::new(Shared {
            front,
            back,
            front_write: Mutex::new(()),
            closing: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        for (name, f) in [
            (
                "netd-relay-in",
                Shared::front_to_back as fn(&Shared) -> Result<()>,
            ),
            ("netd-relay-out", Shared::back_to_front),
        ] {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || s.run(f));
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.close();
                    return Err(Error::Io("starting a relay thread", e));
                }
            }
        }
        Ok(Relay { threads })
    }

    /// Waits for both threads (they end when either side closes); the first error, if any.
    pub fn join(self) -> Result<()> {
        let mut out = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(Error::Relay("a relay thread panicked".into())));
            if out.is_ok() {
                out = r;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(request: FrontendReq, flags: u32, body: Vec<u8>) -> Message {
        Message {
            request: u32::from(request),
            flags,
            body,
            fds: Vec::new(),
        }
    }

    fn enable(index: u32, num: u32, flags: u32) -> Message {
        let mut m = Message::vring_enable(index, num);
        m.flags = flags;
        m
    }

    fn features(f: u64) -> Message {
        req(FrontendReq::SET_FEATURES, 1, f.to_ne_bytes().to_vec())
    }

    fn codes(s: &Step) -> Vec<(u32, Vec<u8>)> {
        s.forward
            .iter()
            .map(|m| (m.request, m.body.clone()))
            .collect()
    }

    const PF: u64 = 1 << 30;

    #[test]
    fn cmsg_buffer_holds_the_most_fds() {
        // SAFETY: CMSG_SPACE has no preconditions.
        let need = unsafe { libc::CMSG_SPACE((MAX_ATTACHED_FD_ENTRIES * 4) as u32) } as usize;
        assert!(need <= CMSG_WORDS * 8, "{need}");
    }

    #[test]
    fn an_early_enable_is_held_until_set_features_then_given() {
        let mut r = Reorder::default();
        let s = r.step(req(FrontendReq::GET_FEATURES, 1, vec![]));
        assert_eq!(s.forward.len(), 1);
        for (i, n) in [(0, 1), (1, 1), (1, 0), (1, 1)] {
            let s = r.step(enable(i, n, 1));
            assert!(s.forward.is_empty() && s.reply.is_none());
        }
        let s = r.step(features(PF | 1 << 32));
        let want: Vec<(u32, Vec<u8>)> = vec![
            (2, (PF | 1 << 32).to_ne_bytes().to_vec()),
            (18, [0u32.to_ne_bytes(), 1u32.to_ne_bytes()].concat()),
            (18, [1u32.to_ne_bytes(), 1u32.to_ne_bytes()].concat()),
        ];
        assert_eq!(codes(&s), want);
        // After SET_FEATURES everything passes, enables included.
        let s = r.step(enable(0, 0, 1));
        assert_eq!(s.forward.len(), 1);
        let s = r.step(features(PF));
        assert_eq!(s.forward.len(), 1);
    }

    #[test]
    fn without_protocol_features_the_held_states_are_dropped() {
        let mut r = Reorder::default();
        assert!(r.step(enable(0, 1, 1)).forward.is_empty());
        let s = r.step(features(1 << 32));
        assert_eq!(codes(&s), vec![(2, (1u64 << 32).to_ne_bytes().to_vec())]);
    }

    #[test]
    fn a_held_enable_that_asks_for_a_reply_is_answered() {
        let mut r = Reorder::default();
        let s = r.step(enable(0, 1, 1 | VhostUserHeaderFlag::NEED_REPLY.bits()));
        assert!(s.forward.is_empty());
        let reply = s.reply.expect("a reply");
        assert_eq!(reply.request, 18);
        assert_eq!(reply.flags, 1 | VhostUserHeaderFlag::REPLY.bits());
        assert_eq!(reply.body, 0u64.to_ne_bytes());
    }

    #[test]
    fn held_states_are_bounded_and_malformed_enables_pass() {
        let mut r = Reorder::default();
        for i in 0..MAX_HELD as u32 {
            assert!(r.step(enable(i, 1, 1)).forward.is_empty());
        }
        // A known ring is updated, a new one beyond the bound goes to the crate (which refuses).
        assert!(r.step(enable(3, 0, 1)).forward.is_empty());
        assert_eq!(r.step(enable(MAX_HELD as u32, 1, 1)).forward.len(), 1);
        let short = req(FrontendReq::SET_VRING_ENABLE, 1, vec![0; 4]);
        assert_eq!(r.step(short).forward.len(), 1);
        let s = r.step(features(PF));
        assert_eq!(s.forward.len(), 1 + MAX_HELD);
        assert_eq!(
            s.forward[4].body,
            [3u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat()
        );
    }

    fn memfd() -> OwnedFd {
        // SAFETY: a name literal and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"relay-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn messages_and_fds_cross_the_relay_in_order() {
        let (front_peer, front) = UnixStream::pair().expect("pair");
        let (back, back_peer) = UnixStream::pair().expect("pair");
        let relay = Relay::start(front, back).expect("relay");

        let mut table = req(FrontendReq::SET_MEM_TABLE, 1, vec![7; 40]);
        table.fds = vec![memfd(), memfd()];
        send_message(&front_peer, &table).expect("send");
        send_message(&front_peer, &enable(0, 1, 1)).expect("send");
        send_message(
            &front_peer,
            &enable(1, 1, 1 | VhostUserHeaderFlag::NEED_REPLY.bits()),
        )
        .expect("send");
        let ack = recv_message(&front_peer).expect("recv").expect("a reply");
        assert_eq!((ack.request, ack.body.len()), (18, 8));
        send_message(&front_peer, &features(PF)).expect("send");

        let got = recv_message(&back_peer).expect("recv").expect("message");
        assert_eq!((got.request, got.body.as_slice()), (5, &[7u8; 40][..]));
        assert_eq!(got.fds.len(), 2);
        let order: Vec<u32> = (0..3)
            .map(|_| {
                recv_message(&back_peer)
                    .expect("recv")
                    .expect("message")
                    .request
            })
            .collect();
        assert_eq!(order, vec![2, 18, 18]);

        // A reply from the crate reaches the front end with its fd.
        let mut reply = Message::ack(1);
        reply.fds = vec![memfd()];
        send_message(&back_peer, &reply).expect("send");
        let r = recv_message(&front_peer).expect("recv").expect("reply");
        assert_eq!((r.request, r.fds.len()), (1, 1));

        // The front end leaves: the crate's side sees the end, the relay ends cleanly.
        drop(front_peer);
        assert!(recv_message(&back_peer).expect("recv").is_none());
        relay.join().expect("clean end");
    }

    #[test]
    fn the_crate_leaving_closes_the_front_end() {
        let (front_peer, front) = UnixStream::pair().expect("pair");
        let (back, back_peer) = UnixStream::pair().expect("pair");
        let relay = Relay::start(front, back).expect("relay");
        drop(back_peer);
        assert!(recv_message(&front_peer).expect("recv").is_none());
        relay.join().expect("clean end");
    }

    #[test]
    fn an_oversize_message_ends_the_relay_with_an_error() {
        let (front_peer, front) = UnixStream::pair().expect("pair");
        let (back, back_peer) = UnixStream::pair().expect("pair");
        let relay = Relay::start(front, back).expect("relay");
        let big = req(FrontendReq::SET_CONFIG, 1, vec![0; MAX_MSG_SIZE + 1]);
        // The relay may close before all of it is written.
        let _ = send_message(&front_peer, &big);
        assert!(recv_message(&back_peer).expect("recv").is_none());
        let e = relay.join().expect_err("an error");
        assert!(e.to_string().contains("body"), "{e}");
    }
}
