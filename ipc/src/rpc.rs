//! Request/reply correlation for the monitor side of a channel.
//!
//! [`RpcClient::new`] spawns one reader task per channel. Replies are routed to their caller
//! by request id, so a worker may answer in any order; events go to one stream. When the peer
//! dies every outstanding and future call fails at once with [`Error::PeerClosed`] and the event
//! stream yields that error and ends.

use std::collections::HashMap;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{mpsc, oneshot};

use crate::{AsyncChannel, Error, Frame, Protocol, Result};

type ReplySlot<P> = oneshot::Sender<Result<(<P as Protocol>::Reply, Vec<OwnedFd>)>>;

/// What the reader task delivers on the event stream.
pub type EventItem<P> = Result<(<P as Protocol>::Event, Vec<OwnedFd>)>;

struct Shared<P: Protocol> {
    pending: Mutex<Option<HashMap<u64, ReplySlot<P>>>>,
}

impl<P: Protocol> Shared<P> {
    /// Fails every pending call and refuses new ones.
    fn close(&self, why: &Error) {
        let taken = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for (_, slot) in taken.into_iter().flatten() {
            let _ = slot.send(Err(clone_err(why)));
        }
    }
}

fn clone_err(e: &Error) -> Error {
    match e {
        Error::PeerClosed => Error::PeerClosed,
        other => Error::Protocol(format!("channel failed: {other}")),
    }
}

/// The calling side of a monitor↔worker channel.
pub struct RpcClient<P: Protocol> {
    chan: Arc<AsyncChannel<P>>,
    shared: Arc<Shared<P>>,
    next_id: AtomicU64,
}

impl<P: Protocol> RpcClient<P> {
    /// Takes over a channel whose handshake is done; spawns its reader task on the current
    /// tokio runtime and returns the client with the worker's event stream.
    pub fn new(chan: AsyncChannel<P>) -> (Self, mpsc::UnboundedReceiver<EventItem<P>>) {
        let chan = Arc::new(chan);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(reader::<P>(chan.clone(), shared.clone(), tx));
        (
            RpcClient {
                chan,
                shared,
                next_id: AtomicU64::new(1),
            },
            rx,
        )
    }

    /// Sends `req` with its fds and waits for the matching reply.
    pub async fn call(
        &self,
        req: P::Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(P::Reply, Vec<OwnedFd>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut guard = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match guard.as_mut() {
                Some(map) => map.insert(id, tx),
                None => return Err(Error::PeerClosed),
            };
        }
        if let Err(e) = self.chan.send(&Frame::Request { id, body: req }, fds).await {
            if let Some(map) = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
            {
                map.remove(&id);
            }
            return Err(e);
        }
        rx.await.unwrap_or(Err(Error::PeerClosed))
    }
}

async fn reader<P: Protocol>(
    chan: Arc<AsyncChannel<P>>,
    shared: Arc<Shared<P>>,
    events: mpsc::UnboundedSender<EventItem<P>>,
) {
    let err = loop {
        match chan.recv().await {
            Ok((Frame::Reply { id, body }, fds)) => {
                let slot = shared
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_mut()
                    .and_then(|m| m.remove(&id));
                match slot {
                    Some(slot) => {
                        let _ = slot.send(Ok((body, fds)));
                    }
                    None => break Error::Protocol(format!("reply to unknown request id {id}")),
                }
            }
            Ok((Frame::Event(ev), fds)) => {
                let _ = events.send(Ok((ev, fds)));
            }
            Ok((Frame::Hello(_), _)) => break Error::Protocol("hello after handshake".into()),
            Ok((Frame::Request { .. }, _)) => {
                break Error::Protocol("worker sent a request to the monitor".into())
            }
            Err(e) => break e,
        }
    };
    shared.close(&err);
    let _ = events.send(Err(err));
}
