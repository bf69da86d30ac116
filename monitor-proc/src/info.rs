//! Facts about the configured machine that query commands report (`query-name`, `query-uuid`,
//! `query-kvm`, `query-chardev`, ...), fixed at start-up and shared by every session, plus the
//! one thing about them that changes: which character devices have a client connected.
//!
//! Character devices are labelled and described as QEMU 7.2 describes its own: each `-qmp` is
//! `compat_monitorN` (N counting the `-qmp` options from 0), the `-serial` back end is
//! `serial0`. The `filename` is QEMU's: `stdio`, `file`, `null` for those back ends; for a
//! listening socket `disconnected:unix:PATH,server=on` or `disconnected:tcp:HOST:PORT,server=on`
//! (the address as bound, so port 0 shows the port chosen) while no client is connected, and
//! `unix:PATH,server=on` or `tcp:HOST:PORT,server=on <-> PEERHOST:PEERPORT` (the connection's own
//! addresses, IPv6 in brackets) while one is. A QMP listener here serves many clients at once;
//! it shows the oldest one still connected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What the configuration says about the machine.
#[derive(Debug, Clone, Default)]
pub struct MachineInfo {
    /// `-name`.
    pub name: Option<String>,
    /// `-uuid`, canonical lower-case form.
    pub uuid: Option<String>,
    /// A guest runs (false for `-M none`).
    pub has_guest: bool,
    /// `/dev/kvm` was opened for the guest (`query-kvm`'s `enabled`).
    pub kvm_present: bool,
    /// vCPUs the machine has (`-smp`; 0 for `-M none`, which has none, as in QEMU).
    pub vcpus: u32,
    /// The character devices, in the order they were created.
    pub chardevs: Vec<Arc<Chardev>>,
    /// `--sandbox` (`None`: not configured, as in unit tests).
    pub sandbox: Option<bulkhead_sandbox::Mode>,
}

/// A socket a character device listens on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddr {
    /// A unix socket, its path as given on the command line.
    Unix(String),
    /// A TCP socket, its address as bound.
    Tcp(SocketAddr),
}

/// How a character device is backed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevBackend {
    /// A listening socket; its description depends on its clients.
    Server(ServerAddr),
    /// A back end QEMU describes by its kind alone (`stdio`, `file`, `null`).
    Plain(&'static str),
}

/// The addresses of one TCP connection: (local, peer).
pub type TcpEnds = (SocketAddr, SocketAddr);

/// One character device (`query-chardev`).
#[derive(Debug)]
pub struct Chardev {
    label: String,
    backend: ChardevBackend,
    frontend_open: bool,
    next_client: AtomicU64,
    /// Connected clients, oldest first: (id, TCP addresses if TCP).
    clients: Mutex<Vec<(u64, Option<TcpEnds>)>>,
}

impl Chardev {
    /// A character device; `frontend_open` says whether a device of the machine uses it (a QMP
    /// monitor always does; a serial back end does when there is a guest).
    pub fn new(
        label: impl Into<String>,
        backend: ChardevBackend,
        frontend_open: bool,
    ) -> Arc<Self> {
        Arc::new(Chardev {
            label: label.into(),
            backend,
            frontend_open,
            next_client: AtomicU64::new(0),
            clients: Mutex::new(Vec::new()),
        })
    }

    /// Its label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Whether a device of the machine uses it.
    pub fn frontend_open(&self) -> bool {
        self.frontend_open
    }

    /// Records a connected client (with its TCP addresses, for a TCP socket); the client counts
    /// as connected until the returned guard is dropped.
    pub fn connect(self: &Arc<Self>, tcp: Option<TcpEnds>) -> ClientGuard {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        self.lock().push((id, tcp));
        ClientGuard {
            dev: self.clone(),
            id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, Option<TcpEnds>)>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// QEMU's `filename` for it, as of now.
    pub fn filename(&self) -> String {
        let addr = match &self.backend {
            ChardevBackend::Plain(kind) => return (*kind).to_string(),
            ChardevBackend::Server(addr) => addr,
        };
        let oldest = self.lock().first().map(|(_, tcp)| *tcp);
        match (addr, oldest) {
            (ServerAddr::Unix(path), None) => format!("disconnected:unix:{path},server=on"),
            (ServerAddr::Unix(path), Some(_)) => format!("unix:{path},server=on"),
            (ServerAddr::Tcp(bound), None) => {
                format!("disconnected:tcp:{}:{},server=on", bound.ip(), bound.port())
            }
            (ServerAddr::Tcp(bound), Some(ends)) => {
                let (local, peer) = ends.unwrap_or((*bound, *bound));
                let (l, r) = if local.is_ipv6() {
                    ("[", "]")
                } else {
                    ("", "")
                };
                format!(
                    "tcp:{l}{}{r}:{},server=on <-> {l}{}{r}:{}",
                    local.ip(),
                    local.port(),
                    peer.ip(),
                    peer.port()
                )
            }
        }
    }
}

/// A connected client of a [`Chardev`]; dropping it disconnects the client in the record.
#[derive(Debug)]
pub struct ClientGuard {
    dev: Arc<Chardev>,
    id: u64,
}

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.dev.lock().retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filenames_follow_qemu() {
        let plain = Chardev::new("serial0", ChardevBackend::Plain("file"), true);
        assert_eq!(plain.filename(), "file");
        let unix = Chardev::new(
            "compat_monitor0",
            ChardevBackend::Server(ServerAddr::Unix("q.sock".into())),
            true,
        );
        assert_eq!(unix.filename(), "disconnected:unix:q.sock,server=on");
        let a = unix.connect(None);
        let b = unix.connect(None);
        assert_eq!(unix.filename(), "unix:q.sock,server=on");
        drop(a);
        assert_eq!(unix.filename(), "unix:q.sock,server=on");
        drop(b);
        assert_eq!(unix.filename(), "disconnected:unix:q.sock,server=on");

        let bound: SocketAddr = "0.0.0.0:4455".parse().expect("addr");
        let tcp = Chardev::new(
            "compat_monitor1",
            ChardevBackend::Server(ServerAddr::Tcp(bound)),
            true,
        );
        assert_eq!(tcp.filename(), "disconnected:tcp:0.0.0.0:4455,server=on");
        let first = tcp.connect(Some((
            "127.0.0.1:4455".parse().expect("addr"),
            "127.0.0.1:47142".parse().expect("addr"),
        )));
        let second = tcp.connect(Some((
            "127.0.0.1:4455".parse().expect("addr"),
            "127.0.0.1:50000".parse().expect("addr"),
        )));
        assert_eq!(
            tcp.filename(),
            "tcp:127.0.0.1:4455,server=on <-> 127.0.0.1:47142"
        );
        drop(first);
        assert_eq!(
            tcp.filename(),
            "tcp:127.0.0.1:4455,server=on <-> 127.0.0.1:50000"
        );
        drop(second);
        let v6 = Chardev::new(
            "compat_monitor2",
            ChardevBackend::Server(ServerAddr::Tcp("[::1]:7".parse().expect("addr"))),
            true,
        );
        assert_eq!(v6.filename(), "disconnected:tcp:::1:7,server=on");
        let _c = v6.connect(Some((
            "[::1]:7".parse().expect("addr"),
            "[::1]:9".parse().expect("addr"),
        )));
        assert_eq!(v6.filename(), "tcp:[::1]:7,server=on <-> [::1]:9");
    }
}
