//! QMP events and the bus that delivers them to every negotiated session.
//!
//! Every session owns a bounded outgoing queue ([`QUEUE_DEPTH`] messages) drained by its own
//! writer task. Replies and events share that queue, so a session sees an event emitted before
//! a command's reply ahead of the reply, as in QEMU. Emitting never blocks: the bus does a
//! `try_send` on each queue, and a session whose queue is full (its client stopped reading) is
//! dropped on the spot rather than allowed to stall the VM or the other sessions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

use super::protocol::to_line;

/// Messages one session may have queued before it counts as stuck.
pub const QUEUE_DEPTH: usize = 256;

/// QEMU's `ShutdownCause`, as RESET and SHUTDOWN events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    /// An error in the host stopped the machine.
    HostError,
    /// The `quit` command.
    HostQmpQuit,
    /// The `system_reset` command.
    HostQmpSystemReset,
    /// SIGINT, SIGTERM or SIGHUP.
    HostSignal,
    /// The guest powered off.
    GuestShutdown,
    /// The guest reset itself (or tried to, under `-no-reboot`).
    GuestReset,
    /// The guest panicked.
    GuestPanic,
}

impl ShutdownCause {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownCause::HostError => "host-error",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostQmpSystemReset => "host-qmp-system-reset",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::GuestPanic => "guest-panic",
        }
    }

    /// True for causes that originate in the guest (the events' `guest` member).
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// A worker that died when it should not have (`X_WORKER_EXITED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerExit {
    /// Its role (`vcpu`, ...).
    pub role: &'static str,
    /// Its pid as the monitor saw it.
    pub pid: u32,
    /// Its exit status, if it exited.
    pub exit_status: Option<i32>,
    /// The signal that killed it (`SIGSYS`), if one did.
    pub signal: Option<String>,
    /// For a seccomp kill: the refused system call's number and name (when known).
    pub syscall: Option<(i64, Option<&'static str>)>,
    /// How the monitor's log describes the death.
    pub description: String,
    /// For a back end (blockd): the id of the device it served.
    pub device: Option<String>,
}

/// An event Bulkhead emits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The vCPUs stopped.
    Stop,
    /// The vCPUs resumed.
    Resume,
    /// The machine was reset.
    Reset(ShutdownCause),
    /// The machine shut down (or is about to, with the process).
    Shutdown(ShutdownCause),
    /// A worker died unexpectedly (a Bulkhead extension, named as QAPI names experimental
    /// ones); for a sandbox violation it names the refused system call.
    WorkerExited(WorkerExit),
    /// A write passed a node's `block-set-write-threshold` (the threshold is off now).
    BlockWriteThreshold {
        /// The node.
        node: String,
        /// How far the write went beyond the threshold.
        amount_exceeded: u64,
        /// The threshold.
        threshold: u64,
    },
    /// `system_powerdown` pressed the guest's power button.
    Powerdown,
    /// A disk's request failed on the host and its `werror`/`rerror` action was taken; after
    /// an action `stop`, STOP follows.
    BlockIoError(crate::io_error::BlockIoError),
    /// A device is gone (`device_del`): its `id` if it has one, and its QOM path.
    DeviceDeleted {
        /// The device's id.
        device: Option<String>,
        /// Its QOM path.
        path: String,
    },
    /// A NIC's guest changed its receive filter (sent once, then not again for that NIC until
    /// `query-rx-filter` has been asked about it, as QEMU).
    NicRxFilterChanged {
        /// The NIC's `id=`, if it has one (QEMU's `netclient_name`).
        name: Option<String>,
        /// The QOM path of its virtio-net device.
        path: String,
    },
}

impl Event {
    /// The event name.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Stop => "STOP",
            Event::Resume => "RESUME",
            Event::Reset(_) => "RESET",
            Event::Shutdown(_) => "SHUTDOWN",
            Event::WorkerExited(_) => "X_WORKER_EXITED",
            Event::DeviceDeleted { .. } => "DEVICE_DELETED",
            Event::Powerdown => "POWERDOWN",
            Event::BlockWriteThreshold { .. } => "BLOCK_WRITE_THRESHOLD",
            Event::NicRxFilterChanged { .. } => "NIC_RX_FILTER_CHANGED",
            Event::BlockIoError(_) => "BLOCK_IO_ERROR",
        }
    }

    fn data(&self) -> Option<Value> {
        match self {
            Event::Stop | Event::Resume | Event::Powerdown => None,
            Event::Reset(c) | Event::Shutdown(c) => {
                let mut m = serde_json::Map::new();
                m.insert("guest".into(), Value::Bool(c.is_guest()));
                m.insert("reason".into(), Value::String(c.as_str().into()));
                Some(Value::Object(m))
            }
            Event::WorkerExited(w) => {
                let mut m = vec![
                    ("role", Value::from(w.role)),
                    ("pid", Value::from(w.pid)),
                    ("sandbox-violation", Value::from(w.syscall.is_some())),
                    ("description", Value::from(w.description.as_str())),
                ];
                if let Some(code) = w.exit_status {
                    m.push(("exit-status", Value::from(code)));
                }
                if let Some(sig) = &w.signal {
                    m.push(("signal", Value::from(sig.as_str())));
                }
                if let Some(d) = &w.device {
                    m.push(("device", Value::from(d.as_str())));
                }
                if let Some((nr, name)) = w.syscall {
                    m.push(("syscall", Value::from(nr)));
                    if let Some(name) = name {
                        m.push(("syscall-name", Value::from(name)));
                    }
                }
                Some(super::qdict::object(m))
            }
            Event::BlockWriteThreshold {
                node,
                amount_exceeded,
                threshold,
            } => Some(super::qdict::object(vec![
                ("node-name", Value::from(node.as_str())),
                ("amount-exceeded", Value::from(*amount_exceeded)),
                ("write-threshold", Value::from(*threshold)),
            ])),
            Event::BlockIoError(e) => {
                // QEMU 7.2's members in declaration order (qapi/block-core.json).
                let mut m = vec![("device", Value::from(e.device.as_str()))];
                if let Some(n) = &e.node_name {
                    m.push(("node-name", Value::from(n.as_str())));
                }
                m.push(("operation", Value::from(e.operation())));
                m.push(("action", Value::from(e.action.name())));
                m.push(("nospace", Value::from(e.nospace)));
                m.push(("reason", Value::from(e.reason.as_str())));
                Some(super::qdict::object(m))
            }
            Event::DeviceDeleted { device, path } => {
                let mut m = Vec::new();
                if let Some(d) = device {
                    m.push(("device", Value::from(d.as_str())));
                }
                m.push(("path", Value::from(path.as_str())));
                Some(super::qdict::object(m))
            }
            Event::NicRxFilterChanged { name, path } => {
                let mut m = Vec::new();
                if let Some(n) = name {
                    m.push(("name", Value::from(n.as_str())));
                }
                m.push(("path", Value::from(path.as_str())));
                Some(super::qdict::object(m))
            }
        }
    }

    /// The wire form, stamped with `now`.
    pub fn to_line_at(&self, now: SystemTime) -> String {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        to_line(&EventMsg {
            timestamp: Timestamp {
                seconds: since.as_secs(),
                microseconds: since.subsec_micros(),
            },
            event: self.name(),
            data: self.data(),
        })
    }
}

#[derive(Serialize)]
struct Timestamp {
    seconds: u64,
    microseconds: u32,
}

#[derive(Serialize)]
struct EventMsg {
    timestamp: Timestamp,
    event: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Value>,
}

/// What a session's writer task receives.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// One message, `\r\n` included.
    Line(Arc<str>),
    /// Flush what came before, then close the connection.
    Close,
}

/// The sending side of one session's queue, plus its kill switch.
#[derive(Debug, Clone)]
pub struct SessionSink {
    id: u64,
    tx: mpsc::Sender<Outgoing>,
    kill: Arc<watch::Sender<bool>>,
}

impl SessionSink {
    /// The session's id (for logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues `line` without waiting; a full or closed queue kills the session.
    pub fn send(&self, line: Arc<str>) -> bool {
        match self.tx.try_send(Outgoing::Line(line)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                log::warn!(
                    "QMP session {} dropped: its client is not reading ({} messages queued)",
                    self.id,
                    QUEUE_DEPTH
                );
                self.kill();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.kill();
                false
            }
        }
    }

    /// Asks the writer to flush and close; kills the session if even that cannot be queued.
    pub fn close(&self) {
        if self.tx.try_send(Outgoing::Close).is_err() {
            self.kill();
        }
    }

    /// Ends the session at once, dropping whatever is queued.
    pub fn kill(&self) {
        self.kill.send_replace(true);
    }
}

/// The receiving side handed to a session's tasks.
#[derive(Debug)]
pub struct SessionQueue {
    /// Messages to write.
    pub rx: mpsc::Receiver<Outgoing>,
    /// Becomes true when the session must end at once.
    pub killed: watch::Receiver<bool>,
}

#[derive(Debug)]
struct Entry {
    sink: SessionSink,
    negotiated: bool,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: BTreeMap<u64, Entry>,
    next_id: u64,
    closing: bool,
}

/// All live sessions; fans events out to the negotiated ones.
#[derive(Debug, Default)]
pub struct EventBus {
    inner: Mutex<Inner>,
    changed: Notify,
}

impl EventBus {
    /// An empty bus.
    pub fn new() -> Arc<Self> {
        Arc::new(EventBus::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new session; `None` once the bus is closing (the monitor is exiting).
    pub fn register(&self) -> Option<(SessionSink, SessionQueue)> {
        let mut inner = self.lock();
        if inner.closing {
            return None;
        }
        inner.next_id += 1;
        let id = inner.next_id;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let (kill, killed) = watch::channel(false);
        let sink = SessionSink {
            id,
            tx,
            kill: Arc::new(kill),
        };
        inner.sessions.insert(
            id,
            Entry {
                sink: sink.clone(),
                negotiated: false,
            },
        );
        Some((sink, SessionQueue { rx, killed }))
    }

    /// Number of registered sessions.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// True when no session is registered.
    pub fn is_empty(&self) -> bool {
        self.lock().sessions.is_empty()
    }

    /// Marks a session as out of capabilities negotiation: it receives events from now on.
    pub fn set_negotiated(&self, id: u64) {
        if let Some(e) = self.lock().sessions.get_mut(&id) {
            e.negotiated = true;
        }
    }

    /// Forgets a session (its tasks are finishing).
    pub fn unregister(&self, id: u64) {
        self.lock().sessions.remove(&id);
        self.changed.notify_waiters();
    }

    /// Stamps `event` now and queues it on every negotiated session, never waiting.
    pub fn emit(&self, event: &Event) {
        let line: Arc<str> = Arc::from(event.to_line_at(SystemTime::now()));
        log::debug!("event: {}", line.trim_end());
        let inner = self.lock();
        for e in inner.sessions.values().filter(|e| e.negotiated) {
            e.sink.send(line.clone());
        }
    }

    /// Refuses new sessions and asks every session to flush and close.
    pub fn close_all(&self) {
        let mut inner = self.lock();
        inner.closing = true;
        for e in inner.sessions.values() {
            e.sink.close();
        }
    }

    /// Waits until every session has gone, or `limit` passes; kills the stragglers then.
    pub async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.changed.notified();
            if self.lock().sessions.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                for e in self.lock().sessions.values() {
                    e.sink.kill();
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_match_qemu() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(
            Event::Stop.to_line_at(t),
            "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"STOP\"}\r\n"
        );
        assert_eq!(
            Event::Reset(ShutdownCause::HostQmpSystemReset).to_line_at(t),
            "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"RESET\", \
             \"data\": {\"guest\": false, \"reason\": \"host-qmp-system-reset\"}}\r\n"
        );
        assert_eq!(
            Event::Shutdown(ShutdownCause::GuestShutdown).to_line_at(t),
            "{\"timestamp\": {\"seconds\": 1700000000, \"microseconds\": 123456}, \"event\": \"SHUTDOWN\", \
             \"data\": {\"guest\": true, \"reason\": \"guest-shutdown\"}}\r\n"
        );
    }

    #[test]
    fn block_io_errors_carry_qemu_7_2_s_members_in_its_order() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 0);
        let mut e = crate::io_error::BlockIoError {
            device: "drive0".into(),
            node_name: Some("#block123".into()),
            write: true,
            action: bulkhead_ipc::messages::ErrorAction::Stop,
            nospace: true,
            reason: "No space left on device".into(),
        };
        let line = Event::BlockIoError(e.clone()).to_line_at(t);
        let data = line.split_once("\"data\": ").map(|(_, d)| d).expect("data");
        assert_eq!(
            data,
            "{\"device\": \"drive0\", \"nospace\": true, \"node-name\": \"#block123\", \
             \"reason\": \"No space left on device\", \"operation\": \"write\", \"action\": \"stop\"}}\r\n"
        );
        e.write = false;
        e.node_name = None;
        e.action = bulkhead_ipc::messages::ErrorAction::Report;
        let v: Value = serde_json::from_str(&Event::BlockIoError(e).to_line_at(t)).expect("json");
        assert_eq!(v["event"], "BLOCK_IO_ERROR");
        assert_eq!(v["data"]["operation"], "read");
        assert_eq!(v["data"]["action"], "report");
        assert!(v["data"].get("node-name").is_none());
    }

    #[test]
    fn worker_exits_name_the_refused_call() {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 0);
        let line = Event::WorkerExited(WorkerExit {
            role: "vcpu",
            pid: 42,
            exit_status: None,
            signal: Some("SIGSYS".into()),
            syscall: Some((41, Some("socket"))),
            description: "was killed by signal SIGSYS".into(),
            device: None,
        })
        .to_line_at(t);
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["event"], "X_WORKER_EXITED");
        assert_eq!(v["data"]["syscall"], 41);
        assert_eq!(v["data"]["syscall-name"], "socket");
        assert_eq!(v["data"]["sandbox-violation"], true);
        assert!(v["data"].get("exit-status").is_none());
    }

    #[tokio::test]
    async fn events_reach_only_negotiated_sessions_and_full_queues_are_dropped() {
        let bus = EventBus::new();
        let (a, mut qa) = bus.register().expect("a");
        let (b, mut qb) = bus.register().expect("b");
        bus.set_negotiated(a.id());
        bus.emit(&Event::Stop);
        assert!(matches!(qa.rx.try_recv(), Ok(Outgoing::Line(l)) if l.contains("STOP")));
        assert!(qb.rx.try_recv().is_err());
        bus.set_negotiated(b.id());
        // Fill b's queue without reading it: b is killed, a keeps receiving.
        for _ in 0..=QUEUE_DEPTH {
            bus.emit(&Event::Resume);
            while qa.rx.try_recv().is_ok() {}
        }
        assert!(*qb.killed.borrow());
        assert!(!*qa.killed.borrow());
        bus.close_all();
        assert!(bus.register().is_none());
    }
}
