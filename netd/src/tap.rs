//! The tap device netd serves: opened by name (`/dev/net/tun` + `TUNSETIFF` with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) before the sandbox, inherited as an fd, or (worker
//! mode) handed over by the monitor after the sandbox ([`Tap::from_monitor`]). After the
//! sandbox only `read`/`writev` and the ioctls of the netd policy (`TUNSETOFFLOAD`,
//! `TUNSETVNETHDRSZ`, and `TUNSETQUEUE` to detach and re-attach a multiqueue tap's queue as the
//! guest disables and enables its queue pair) touch it; `TUNGETIFF` is used only before.
//! A multiqueue tap (`IFF_MULTI_QUEUE`) is one such fd per queue, all on the same interface.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use bulkhead_sandbox::ioctls::{TUNGETIFF, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};

use crate::{Error, Result};

/// `TUNSETIFF` (`_IOW('T', 202, int)`), used only before the sandbox.
pub const TUNSETIFF: u64 = 0x4004_54ca;
/// `IFF_TAP`.
pub const IFF_TAP: u16 = 0x0002;
/// `IFF_NO_PI`.
pub const IFF_NO_PI: u16 = 0x1000;
/// `IFF_VNET_HDR`.
pub const IFF_VNET_HDR: u16 = 0x4000;
/// `IFF_MULTI_QUEUE`: the interface has one queue per open fd.
pub const IFF_MULTI_QUEUE: u16 = 0x0100;
/// `IFF_ATTACH_QUEUE` (`TUNSETQUEUE`).
pub const IFF_ATTACH_QUEUE: u16 = 0x0200;
/// `IFF_DETACH_QUEUE` (`TUNSETQUEUE`).
pub const IFF_DETACH_QUEUE: u16 = 0x0400;
/// Most queues of one tap netd serves (queue pairs of one device).
pub const MAX_TAP_QUEUES: usize = 8;

/// `TUN_F_CSUM`: the tap may hand us packets with a partial checksum.
pub const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`.
pub const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`.
pub const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`.
pub const TUN_F_TSO_ECN: u32 = 0x08;
/// `TUN_F_UFO`.
pub const TUN_F_UFO: u32 = 0x10;

/// `struct ifreq` as the tun ioctls use it: the name and the flags.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

/// A tap fd in non-blocking mode.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
}

fn ioctl_ptr<T>(fd: RawFd, req: u64, arg: *mut T, what: &'static str) -> Result<()> {
    // SAFETY: `req` is one of the tun ioctls whose argument is `*mut T` of the right size
    // (ifreq or int), and `arg` points to a live, properly sized value owned by the caller.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg) };
    if r < 0 {
        return Err(Error::Io(what, io::Error::last_os_error()));
    }
    Ok(())
}

impl Tap {
    /// Opens (creating if needed, as root) the tap `ifname` with a vnet header.
    pub fn open(ifname: &str) -> Result<Tap> {
        Tap::open_queue(ifname, false)
    }

    /// Opens `queues` queues of the multiqueue tap `ifname` (`IFF_MULTI_QUEUE`; one plain
    /// [`Tap::open`] for one queue).
    pub fn open_queues(ifname: &str, queues: usize) -> Result<Vec<Tap>> {
        if queues == 0 || queues > MAX_TAP_QUEUES {
            return Err(Error::Usage(format!(
                "--queues {queues}: 1 to {MAX_TAP_QUEUES}"
            )));
        }
        (0..queues)
            .map(|_| Tap::open_queue(ifname, queues > 1))
            .collect()
    }

    fn open_queue(ifname: &str, multi: bool) -> Result<Tap> {
        let bytes = ifname.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(Error::Usage(format!(
                "--tap {ifname}: not an interface name"
            )));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|e| Error::Io("opening /dev/net/tun", e))?;
        let mut req = IfReq::default();
        req.name[..bytes.len()].copy_from_slice(bytes);
        req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if multi {
            req.flags |= IFF_MULTI_QUEUE;
        }
        ioctl_ptr(file.as_raw_fd(), TUNSETIFF, &mut req, "TUNSETIFF")?;
        Tap::from_fd(OwnedFd::from(file))
    }

    /// The interface name and `IFF_*` flags the kernel reports (`TUNGETIFF`; before the
    /// sandbox only).
    pub fn name_and_flags(&self) -> Result<(String, u16)> {
        let mut req = IfReq::default();
        ioctl_ptr(self.fd.as_raw_fd(), TUNGETIFF, &mut req, "TUNGETIFF")?;
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        Ok((name, req.flags))
    }

    /// Checks that inherited tap fds are queues of one interface with the same flags
    /// (several fds must all be `IFF_MULTI_QUEUE` queues of the same tap).
    pub fn check_queues(taps: &[Tap]) -> Result<()> {
        let mut first: Option<(String, u16)> = None;
        for t in taps {
            let (name, flags) = t.name_and_flags()?;
            let mq = flags & IFF_MULTI_QUEUE != 0;
            if taps.len() > 1 && !mq {
                return Err(Error::Usage(format!(
                    "tap {name}: several --tap-fd need queues of a multiqueue tap \
                     (IFF_MULTI_QUEUE)"
                )));
            }
            match &first {
                None => first = Some((name, flags)),
                Some((n, f)) if *n != name || *f != flags => {
                    return Err(Error::Usage(format!(
                        "--tap-fd: queues of different taps or flags ({n} {f:#x}, {name} \
                         {flags:#x})"
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Attaches (`true`) or detaches this queue of a multiqueue tap (`TUNSETQUEUE`): a detached
    /// queue gets no frames (the kernel steers them to the attached ones) and cannot be read.
    pub fn set_queue_attached(&self, attach: bool) -> Result<()> {
        let mut req = IfReq {
            flags: if attach {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            ..IfReq::default()
        };
        ioctl_ptr(self.fd.as_raw_fd(), TUNSETQUEUE, &mut req, "TUNSETQUEUE")
    }

    /// Takes over an inherited tap fd `fd`; checks it is a tap with a vnet header and makes it
    /// non-blocking and close-on-exec.
    ///
    /// # Safety
    /// `fd` must be an open fd nothing else in the process owns.
    pub unsafe fn from_raw_fd(fd: RawFd) -> Result<Tap> {
        // SAFETY: the caller hands over sole ownership of the open fd.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Tap::from_fd(owned)
    }

    fn from_fd(fd: OwnedFd) -> Result<Tap> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq::default();
        ioctl_ptr(raw, TUNGETIFF, &mut req, "TUNGETIFF")?;
        if req.flags & IFF_TAP == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(Error::NotATap);
        }
        if req.flags & IFF_VNET_HDR == 0 {
            return Err(Error::NoVnetHdr);
        }
        Tap::configure(fd)
    }

    /// Takes a tap fd the monitor opened and handed over in worker mode, after the sandbox:
    /// `TUNGETIFF` is not in the netd policy, so the flags (`IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR`, which the monitor sets) cannot be read back. What can be checked with the
    /// calls netd keeps is checked: `TUNSETVNETHDRSZ` (12 bytes, the size until the front end
    /// sets the features) fails on anything but a tun/tap fd attached to an interface
    /// ([`Error::NotATap`]). Then non-blocking and close-on-exec, as [`Tap::from_raw_fd`].
    pub fn from_monitor(fd: OwnedFd) -> Result<Tap> {
        let mut size = crate::backend::HDR_LEN as libc::c_int;
        if let Err(Error::Io(_, e)) = ioctl_ptr(
            fd.as_raw_fd(),
            TUNSETVNETHDRSZ,
            &mut size,
            "TUNSETVNETHDRSZ",
        ) {
            return Err(match e.raw_os_error() {
                Some(libc::ENOTTY | libc::EINVAL | libc::EBADFD) => Error::NotATap,
                _ => Error::Io("TUNSETVNETHDRSZ", e),
            });
        }
        Tap::configure(fd)
    }

    /// Non-blocking and close-on-exec.
    fn configure(fd: OwnedFd) -> Result<Tap> {
        let raw = fd.as_raw_fd();
        // SAFETY: fcntl on an fd we own, with integer arguments only.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(Error::Io("fcntl O_NONBLOCK", io::Error::last_os_error()));
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(Error::Io("fcntl FD_CLOEXEC", io::Error::last_os_error()));
        }
        Ok(Tap { fd })
    }

    /// The interface name the kernel reports for the tap.
    pub fn name(&self) -> Result<String> {
        let mut req = IfReq::default();
        ioctl_ptr(self.fd.as_raw_fd(), TUNGETIFF, &mut req, "TUNGETIFF")?;
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        Ok(String::from_utf8_lossy(&req.name[..end]).into_owned())
    }

    /// Sets the vnet header size the tap prepends and expects (10 or 12 bytes).
    pub fn set_vnet_hdr_size(&self, size: usize) -> Result<()> {
        let mut v = size as libc::c_int;
        ioctl_ptr(
            self.fd.as_raw_fd(),
            TUNSETVNETHDRSZ,
            &mut v,
            "TUNSETVNETHDRSZ",
        )
    }

    /// Sets the offloads (`TUN_F_*`) the tap may use for packets it hands to us. The ioctl takes
    /// the flags by value.
    pub fn set_offload(&self, flags: u32) -> Result<()> {
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value; no memory is passed.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD as libc::c_ulong,
                flags as libc::c_ulong,
            )
        };
        if r < 0 {
            return Err(Error::Io("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads one frame (with its vnet header) into `buf`; `Ok(None)` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: reads at most buf.len() bytes into memory we exclusively borrow.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame gathered from `iov`.
    ///
    /// # Safety
    /// Every iovec must describe memory readable for its whole length for the duration of the
    /// call (here: guest memory the back end has mapped).
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the iovecs are readable; the count fits a c_int
        // because callers bound it (at most a queue's worth of descriptors).
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The raw fd (for epoll).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Consumes the tap into a `File` (tests).
    pub fn into_file(self) -> File {
        File::from(self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_is_the_kernel_size_and_layout() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(std::mem::offset_of!(IfReq, flags), 16);
    }

    #[test]
    fn rejects_bad_names_before_any_system_call() {
        for n in ["", "a-name-longer-than-15", "a\0b"] {
            assert!(matches!(Tap::open(n), Err(Error::Usage(_))), "{n:?}");
        }
    }

    #[test]
    fn a_non_tap_fd_is_refused() {
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(Tap::from_fd(OwnedFd::from(f)).is_err());
        let f = std::fs::File::open("/dev/null").expect("/dev/null");
        assert!(matches!(
            Tap::from_monitor(OwnedFd::from(f)),
            Err(Error::NotATap)
        ));
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(matches!(
            Tap::from_monitor(OwnedFd::from(a)),
            Err(Error::NotATap)
        ));
    }
}
