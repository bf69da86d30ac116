//! Host side of the guest's serial port (`-serial`).
//!
//! The worker only ever sees two plain fds, one it reads the port's input from and one it writes
//! the port's output to; which host object stands behind them is decided here:
//!
//! - `stdio`: duplicates of the monitor's own stdin and stdout. If stdin is a terminal it is put
//!   in raw mode the way QEMU's stdio chardev does (`signal=on`: Ctrl-C still interrupts the
//!   monitor, which then shuts down cleanly) and restored on exit ([`restore_tty`]).
//! - `file:PATH`: opened by the monitor with `O_WRONLY | O_CREAT | O_TRUNC` (QEMU truncates too),
//!   output only. PATH may be `/dev/fdset/N`: a write-only fd of that set, truncated.
//! - `unix:PATH,server=on[,wait=off]`: the monitor listens on PATH and relays between a pipe pair
//!   handed to the worker and one connected client at a time (further clients wait in the
//!   backlog, as with QEMU's socket chardev). Guest output is never allowed to block the guest:
//!   with no client, or a client that does not read, it is discarded. Client input is written
//!   to the guest's input pipe with back-pressure on the client.
//! - `null`: output to `/dev/null`, no input. `none`: no serial fds at all.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixListener;

use std::sync::Arc;

use crate::cli::{ListenAddr, SerialBackend, ServerSpec};
use crate::fds::{DupLease, FdSets, OpenSpec};
use crate::info::{Chardev, ChardevBackend, ServerAddr};

/// Errors setting up the serial port's host side.
#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    /// A file could not be opened.
    #[error("-serial {spec}: cannot open {path}: {source}")]
    Open {
        /// The option value.
        spec: String,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A socket could not be created.
    #[error("-serial {spec}: {source}")]
    Socket {
        /// The option value.
        spec: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("serial port: {what}: {source}")]
    Sys {
        /// The step.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

static SAVED_TTY: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Restores the terminal settings [`SerialHost`] changed, if any. Safe to call many times
/// (exit paths, panic hook).
pub fn restore_tty() {
    let saved = SAVED_TTY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let Some((fd, tio)) = saved {
        // SAFETY: tcsetattr on the terminal fd we changed, with a termios we read from it.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &tio) };
    }
}

fn set_raw_tty(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: isatty takes an integer.
    if unsafe { libc::isatty(fd) } != 1 {
        return Ok(());
    }
    // SAFETY: termios is plain data; tcgetattr fills it completely on success.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `tio` is a valid, writable termios.
    if unsafe { libc::tcgetattr(fd, &mut tio) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let saved = tio;
    // QEMU's qemu_chr_set_echo_stdio(false) with signal=on.
    tio.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    tio.c_oflag |= libc::OPOST;
    tio.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
    tio.c_cflag &= !(libc::CSIZE | libc::PARENB);
    tio.c_cflag |= libc::CS8;
    tio.c_cc[libc::VMIN] = 1;
    tio.c_cc[libc::VTIME] = 0;
    // SAFETY: `tio` is a valid termios derived from the terminal's own settings.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &tio) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    *SAVED_TTY.lock().unwrap_or_else(PoisonError::into_inner) = Some((fd, saved));
    Ok(())
}

fn dup_cloexec(fd: RawFd, what: &'static str) -> Result<OwnedFd, ChardevError> {
    // SAFETY: F_DUPFD_CLOEXEC with integer arguments; the result is a new fd we own.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(ChardevError::Sys {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fcntl just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd), ChardevError> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a writable array of two ints as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(ChardevError::Sys {
            what: "pipe2",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: pipe2 succeeded; both fds are new and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Binds a unix stream socket for a server chardev. A stale socket at `path` is removed first
/// (as QEMU does); any other kind of file there is left alone and the bind fails.
pub fn bind_unix(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Makes `path` absolute against the current directory (for removal after a chdir).
pub fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

struct UnixRelay {
    spec: ServerSpec,
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
    /// Monitor's ends: it reads guest output from `out_r` and writes client input to `in_w`.
    out_r: Option<OwnedFd>,
    in_w: Option<OwnedFd>,
}

/// The host side of the serial port.
pub struct SerialHost {
    spec: String,
    input: Option<OwnedFd>,
    output: Option<OwnedFd>,
    relay: Option<UnixRelay>,
    /// Keeps a `file:/dev/fdset/N` output registered with its set.
    _lease: Option<DupLease>,
    /// The back end as `query-chardev` shows it (`serial0`); none for `-serial none`.
    dev: Option<Arc<Chardev>>,
}

impl SerialHost {
    /// Opens what `backend` needs (files, terminal mode, pipes, the listening socket); a
    /// `file:` path may name one of `fdsets`.
    pub fn open(backend: &SerialBackend, fdsets: &Arc<FdSets>) -> Result<Self, ChardevError> {
        let spec = match backend {
            SerialBackend::Stdio => "stdio".to_string(),
            SerialBackend::File(p) => format!("file:{}", p.display()),
            SerialBackend::Unix(s) => s.addr.to_string(),
            SerialBackend::Null => "null".to_string(),
            SerialBackend::None => "none".to_string(),
        };
        let mut host = SerialHost {
            spec: spec.clone(),
            input: None,
            output: None,
            relay: None,
            _lease: None,
            dev: None,
        };
        let kind = match backend {
            SerialBackend::None => None,
            SerialBackend::Null => Some(ChardevBackend::Plain("null")),
            SerialBackend::File(_) => Some(ChardevBackend::Plain("file")),
            SerialBackend::Stdio => Some(ChardevBackend::Plain("stdio")),
            SerialBackend::Unix(server) => match &server.addr {
                ListenAddr::Unix(p) => Some(ChardevBackend::Server(ServerAddr::Unix(
                    p.display().to_string(),
                ))),
                // Refused below.
                ListenAddr::Tcp { .. } => None,
            },
        };
        // The serial port is the machine's: a guest uses it from the start.
        host.dev = kind.map(|k| Chardev::new("serial0", k, true));
        match backend {
            SerialBackend::None => {}
            SerialBackend::Null => {
                let f = OpenOptions::new()
                    .write(true)
                    .open("/dev/null")
                    .map_err(|source| ChardevError::Open {
                        spec,
                        path: "/dev/null".into(),
                        source,
                    })?;
                host.output = Some(f.into());
            }
            SerialBackend::File(path) => {
                let (f, lease) = fdsets
                    .open(path, OpenSpec::WRITE_TRUNCATE)
                    .map_err(|e| ChardevError::Open {
                        spec,
                        path: path.clone(),
                        source: std::io::Error::new(
                            std::io::Error::from_raw_os_error(e.errno()).kind(),
                            e,
                        ),
                    })?
                    .into_parts();
                host.output = Some(f.into());
                host._lease = lease;
            }
            SerialBackend::Stdio => {
                host.input = Some(dup_cloexec(libc::STDIN_FILENO, "dup stdin")?);
                host.output = Some(dup_cloexec(libc::STDOUT_FILENO, "dup stdout")?);
                if let Err(e) = set_raw_tty(libc::STDIN_FILENO) {
                    log::warn!("cannot put the terminal in raw mode: {e}");
                }
            }
            SerialBackend::Unix(server) => {
                let ListenAddr::Unix(path) = &server.addr else {
                    return Err(ChardevError::Socket {
                        spec,
                        source: std::io::Error::other("only unix sockets are supported"),
                    });
                };
                let listener = bind_unix(path).map_err(|source| ChardevError::Socket {
                    spec: spec.clone(),
                    source,
                })?;
                let (in_r, in_w) = pipe_cloexec()?;
                let (out_r, out_w) = pipe_cloexec()?;
                host.input = Some(in_r);
                host.output = Some(out_w);
                host.relay = Some(UnixRelay {
                    spec: server.clone(),
                    path: absolute(path),
                    listener: Some(listener),
                    out_r: Some(out_r),
                    in_w: Some(in_w),
                });
            }
        }
        Ok(host)
    }

    /// The fd the worker reads serial input from, if any.
    pub fn input(&self) -> Option<BorrowedFd<'_>> {
        self.input.as_ref().map(AsFd::as_fd)
    }

    /// The fd the worker writes serial output to, if any.
    pub fn output(&self) -> Option<BorrowedFd<'_>> {
        self.output.as_ref().map(AsFd::as_fd)
    }

    /// Starts the relay of a `unix:` backend; with `wait=on`, first waits for a client (as QEMU
    /// does before starting the guest). Must run inside the tokio runtime.
    pub async fn start(&mut self) -> Result<(), ChardevError> {
        let Some(relay) = self.relay.as_mut() else {
            return Ok(());
        };
        let (Some(listener), Some(out_r), Some(in_w)) =
            (relay.listener.take(), relay.out_r.take(), relay.in_w.take())
        else {
            return Ok(());
        };
        let sock = |source| ChardevError::Socket {
            spec: self.spec.clone(),
            source,
        };
        let listener = UnixListener::from_std(listener).map_err(sock)?;
        let out_r = pipe::Receiver::from_owned_fd(out_r).map_err(sock)?;
        let in_w = pipe::Sender::from_owned_fd(in_w).map_err(sock)?;
        let dev = self.dev.clone();
        let mut first = None;
        if relay.spec.wait {
            eprintln!(
                "bulkhead: waiting for connection on: {},server=on",
                relay.spec.addr
            );
            let (s, _) = listener.accept().await.map_err(sock)?;
            first = Some(s);
        }
        tokio::spawn(run_relay(listener, first, out_r, in_w, dev));
        Ok(())
    }

    /// The back end as `query-chardev` shows it, if there is one.
    pub fn chardev(&self) -> Option<Arc<Chardev>> {
        self.dev.clone()
    }

    /// The socket path to remove at exit, if any.
    pub fn socket_path(&self) -> Option<&Path> {
        self.relay.as_ref().map(|r| r.path.as_path())
    }
}

impl Drop for SerialHost {
    fn drop(&mut self) {
        if let Some(p) = self.socket_path() {
            let _ = std::fs::remove_file(p);
        }
    }
}

async fn run_relay(
    listener: UnixListener,
    mut first: Option<tokio::net::UnixStream>,
    mut out_r: pipe::Receiver,
    mut in_w: pipe::Sender,
    dev: Option<Arc<Chardev>>,
) {
    let mut buf = vec![0u8; 4096];
    let mut dropped: u64 = 0;
    loop {
        // No client: drain guest output to nowhere until one connects.
        let stream = match first.take() {
            Some(s) => s,
            None => loop {
                tokio::select! {
                    r = out_r.read(&mut buf) => {
                        if matches!(r, Ok(0) | Err(_)) {
                            return;
                        }
                    }
                    a = listener.accept() => match a {
                        Ok((s, _)) => break s,
                        Err(e) => {
                            log::warn!("serial socket: accept failed: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    },
                }
            },
        };
        // Connected (for `query-chardev`) until this client is gone.
        let _client = dev.as_ref().map(|d| d.connect(None));
        let (mut rd, wr) = stream.into_split();
        // Client → guest, with back-pressure on the client; hands the pipe back at the end.
        let mut input = tokio::spawn(async move {
            let mut b = vec![0u8; 4096];
            loop {
                match rd.read(&mut b).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if in_w.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
            in_w
        });
        // Guest → client, best effort: what the client cannot take now is dropped.
        loop {
            tokio::select! {
                r = out_r.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        let written = match wr.try_write(&buf[..n]) {
                            Ok(w) => w,
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                            Err(_) => n, // the input side notices the disconnect
                        };
                        if written < n {
                            if dropped == 0 {
                                log::info!("serial client is not reading; dropping guest output");
                            }
                            dropped += (n - written) as u64;
                        }
                    }
                },
                back = &mut input => {
                    match back {
                        Ok(w) => in_w = w,
                        Err(_) => return,
                    }
                    break;
                }
            }
        }
    }
}

/// Reopens an already open file (by `/proc/self/fd`) as a new, independent open file
/// description, so each worker gets its own file offset. A file the monitor could not open by
/// itself (passed in by a client, `-add-fd`) may refuse that; it is then duplicated instead,
/// which shares the offset: harmless, because only one worker runs at a time and it seeks
/// before every read of the kernel and initrd.
pub fn reopen_readonly(file: &File) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .or_else(|_| file.try_clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn file_backend_truncates_and_is_output_only() {
        let dir = std::env::temp_dir().join(format!("bh-chardev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("serial.log");
        std::fs::write(&path, b"old content").expect("write");
        let host = SerialHost::open(&SerialBackend::File(path.clone()), &Default::default())
            .expect("open");
        assert!(host.input().is_none());
        let out = host.output().expect("output");
        let mut f = File::from(out.try_clone_to_owned().expect("dup"));
        f.write_all(b"new").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn none_and_null() {
        let none = SerialHost::open(&SerialBackend::None, &Default::default()).expect("none");
        assert!(none.input().is_none() && none.output().is_none());
        let null = SerialHost::open(&SerialBackend::Null, &Default::default()).expect("null");
        assert!(null.input().is_none() && null.output().is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unix_backend_relays_both_ways() {
        let dir = std::env::temp_dir().join(format!("bh-chardev-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("serial.sock");
        let backend = SerialBackend::Unix(ServerSpec {
            addr: ListenAddr::Unix(path.clone()),
            wait: false,
        });
        let mut host = SerialHost::open(&backend, &Default::default()).expect("open");
        host.start().await.expect("start");
        let mut guest_out = File::from(
            host.output()
                .expect("out")
                .try_clone_to_owned()
                .expect("dup"),
        );
        let mut guest_in = File::from(host.input().expect("in").try_clone_to_owned().expect("dup"));
        // Output with no client is discarded without blocking the writer.
        guest_out.write_all(&[b'x'; 100_000]).expect("discarded");
        let mut client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        guest_out.write_all(b"hello").expect("write");
        // Some of the discarded output may still have been in the pipe when the client came.
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        while !got.ends_with(b"hello") {
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(5), client.read(&mut chunk))
                    .await
                    .expect("in time")
                    .expect("read");
            assert!(n > 0, "relay closed the connection");
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got[..got.len() - 5].iter().all(|&b| b == b'x'));
        client.write_all(b"typed").await.expect("write");
        let mut typed = [0u8; 5];
        tokio::task::spawn_blocking(move || guest_in.read_exact(&mut typed).map(|_| typed))
            .await
            .expect("join")
            .expect("read");
        drop(host);
        assert!(!path.exists(), "socket removed on drop");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
