//! QMP listeners (`-qmp unix:...` and `-qmp tcp:...`): bind, accept, start sessions.
//!
//! Unlike QEMU's socket chardev, which serves one client per `-qmp` at a time, every listener
//! here serves any number of sessions at once (up to [`MAX_SESSIONS`] in all). `wait=on`
//! (QEMU's default for a server) makes startup wait for a first client on that listener before
//! the guest starts. Unix socket files are removed at exit.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use super::session::{self, Conn, Shared};
use crate::chardev::{absolute, bind_unix};
use crate::cli::{ListenAddr, ServerSpec};
use crate::info::{Chardev, ChardevBackend, ClientGuard, ServerAddr};

/// Most sessions served at once; further connections are closed at once.
pub const MAX_SESSIONS: usize = 64;

/// Errors binding a QMP listener.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding failed.
    #[error("-qmp {addr}: Failed to bind socket: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The host name did not resolve to a usable address.
    #[error("-qmp {addr}: address resolution failed: {reason}")]
    Resolve {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// Waiting for the first client failed.
    #[error("-qmp {addr}: {source}")]
    Accept {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

enum Listener {
    Unix(UnixListener),
    Tcp {
        listener: TcpListener,
        nodelay: bool,
    },
}

impl Listener {
    /// Accepts a client and records it as connected to `dev` until the session ends.
    async fn accept(&self, dev: &Arc<Chardev>) -> std::io::Result<(Conn, ClientGuard)> {
        match self {
            Listener::Unix(l) => Ok((Conn::Unix(l.accept().await?.0), dev.connect(None))),
            Listener::Tcp { listener, nodelay } => {
                let (s, peer) = listener.accept().await?;
                if *nodelay {
                    let _ = s.set_nodelay(true);
                }
                let ends = s.local_addr().ok().map(|local| (local, peer));
                Ok((Conn::Tcp(s), dev.connect(ends)))
            }
        }
    }
}

/// The bound listeners.
pub struct QmpServer {
    /// Each listener with its character device (`compat_monitorN`, as QEMU labels `-qmp`).
    listeners: Vec<(ServerSpec, Arc<Listener>, Arc<Chardev>)>,
    socket_paths: Vec<PathBuf>,
    tasks: Vec<JoinHandle<()>>,
}

impl QmpServer {
    /// Binds every `-qmp` listener. Must run inside the tokio runtime.
    pub fn bind(specs: &[ServerSpec]) -> Result<Self, ServerError> {
        let mut server = QmpServer {
            listeners: Vec::new(),
            socket_paths: Vec::new(),
            tasks: Vec::new(),
        };
        for spec in specs {
            let addr_text = spec.addr.to_string();
            let bind_err = |source| ServerError::Bind {
                addr: addr_text.clone(),
                source,
            };
            let (listener, addr) = match &spec.addr {
                ListenAddr::Unix(path) => {
                    let std_l = bind_unix(path).map_err(bind_err)?;
                    server.socket_paths.push(absolute(path));
                    (
                        Listener::Unix(UnixListener::from_std(std_l).map_err(bind_err)?),
                        ServerAddr::Unix(path.display().to_string()),
                    )
                }
                ListenAddr::Tcp {
                    host,
                    port,
                    ipv4_only,
                    ipv6_only,
                    nodelay,
                } => {
                    let host = if host.is_empty() {
                        "0.0.0.0"
                    } else {
                        host.as_str()
                    };
                    let addrs: Vec<SocketAddr> = (host, *port)
                        .to_socket_addrs()
                        .map_err(|e| ServerError::Resolve {
                            addr: addr_text.clone(),
                            reason: e.to_string(),
                        })?
                        .filter(|a| !(*ipv4_only && a.is_ipv6() || *ipv6_only && a.is_ipv4()))
                        .collect();
                    let mut last = None;
                    let mut bound = None;
                    for a in addrs {
                        match std::net::TcpListener::bind(a) {
                            Ok(l) => {
                                bound = Some(l);
                                break;
                            }
                            Err(e) => last = Some(e),
                        }
                    }
                    let l = match (bound, last) {
                        (Some(l), _) => l,
                        (None, Some(e)) => return Err(bind_err(e)),
                        (None, None) => {
                            return Err(ServerError::Resolve {
                                addr: addr_text.clone(),
                                reason: "no address of the requested family".into(),
                            })
                        }
                    };
                    l.set_nonblocking(true).map_err(bind_err)?;
                    let local = l.local_addr().map_err(bind_err)?;
                    log::info!("QMP listening on tcp:{local}");
                    (
                        Listener::Tcp {
                            listener: TcpListener::from_std(l).map_err(bind_err)?,
                            nodelay: *nodelay,
                        },
                        ServerAddr::Tcp(local),
                    )
                }
            };
            let label = format!("compat_monitor{}", server.listeners.len());
            let dev = Chardev::new(label, ChardevBackend::Server(addr), true);
            server
                .listeners
                .push((spec.clone(), Arc::new(listener), dev));
        }
        Ok(server)
    }

    /// The listeners' character devices, in `-qmp` order (for `query-chardev`).
    pub fn chardevs(&self) -> Vec<Arc<Chardev>> {
        self.listeners
            .iter()
            .map(|(_, _, dev)| dev.clone())
            .collect()
    }

    /// For every `wait=on` listener, waits for one client and starts its session (QEMU: "QEMU
    /// waiting for connection on: ...").
    pub async fn wait_for_clients(&self, shared: &Arc<Shared>) -> Result<(), ServerError> {
        for (spec, l, dev) in &self.listeners {
            if !spec.wait {
                continue;
            }
            eprintln!(
                "bulkhead: waiting for connection on: {},server=on",
                spec.addr
            );
            let (conn, guard) = l.accept(dev).await.map_err(|source| ServerError::Accept {
                addr: spec.addr.to_string(),
                source,
            })?;
            session::spawn(conn, shared.clone(), Some(guard));
        }
        Ok(())
    }

    /// Starts accepting on every listener.
    pub fn serve(&mut self, shared: &Arc<Shared>) {
        for (spec, l, dev) in &self.listeners {
            let l = l.clone();
            let dev = dev.clone();
            let shared = shared.clone();
            let addr = spec.addr.to_string();
            self.tasks.push(tokio::spawn(async move {
                loop {
                    match l.accept(&dev).await {
                        Ok((conn, guard)) => {
                            if shared.bus.len() >= MAX_SESSIONS {
                                log::warn!(
                                    "QMP {addr}: refusing a connection: {MAX_SESSIONS} sessions already open"
                                );
                                continue;
                            }
                            session::spawn(conn, shared.clone(), Some(guard));
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            log::warn!("QMP {addr}: accept failed: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }));
        }
    }

    /// The unix sockets it listens on (removed at exit).
    pub fn socket_paths(&self) -> &[PathBuf] {
        &self.socket_paths
    }

    /// Stops accepting.
    pub fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.stop();
        for p in &self.socket_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}
