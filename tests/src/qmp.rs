//! A small synchronous QMP client for tests, independent of the product crates.
//!
//! QMP is JSON objects separated by newlines: after connecting, the server sends a greeting
//! (`{"QMP": {...}}`); the client must send `qmp_capabilities` before other commands. Each
//! command gets either `{"return": ...}` or `{"error": {"class", "desc"}}`, echoing the
//! command's `id`; asynchronous events (`{"event": ..., "data": ..., "timestamp": ...}`) may
//! arrive at any time and are queued here until a test asks for them with
//! [`Qmp::wait_event`] or [`Qmp::take_events`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The server answered the command with an error object.
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// Error class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// Human-readable description.
        desc: String,
    },
    /// Socket error.
    #[error("QMP I/O error: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not valid QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// Nothing suitable arrived in time.
    #[error("QMP: timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The server closed the connection.
    #[error("QMP connection closed by the server")]
    Closed,
}

impl QmpError {
    /// The error class if this is a command error.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// Result type of this module.
pub type QmpResult<T> = Result<T, QmpError>;

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(buf),
            Stream::Unix(s) => s.write_all(buf),
        }
    }
}

/// A QMP session.
pub struct Qmp {
    stream: Stream,
    buf: Vec<u8>,
    events: VecDeque<Value>,
    next_id: u64,
    greeting: Value,
    /// Timeout for [`Qmp::execute`] (default 30 s).
    pub timeout: Duration,
}

impl Qmp {
    /// Connects to a unix socket, reads the greeting and negotiates capabilities.
    pub fn connect_unix(path: impl AsRef<Path>, timeout: Duration) -> QmpResult<Qmp> {
        let s = UnixStream::connect(path.as_ref())?;
        Self::handshake(Stream::Unix(s), timeout)
    }

    /// Connects over TCP, reads the greeting and negotiates capabilities.
    pub fn connect_tcp(addr: impl ToSocketAddrs, timeout: Duration) -> QmpResult<Qmp> {
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| QmpError::Protocol("address resolved to nothing".into()))?;
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        Self::handshake(Stream::Tcp(s), timeout)
    }

    /// Like [`Qmp::connect_tcp`], but retries (every 250 ms, until `timeout`) while the
    /// connection is refused or closed before the greeting, as happens through a port forward
    /// before the server listens.
    pub fn connect_tcp_retry(
        addr: impl ToSocketAddrs + Clone,
        timeout: Duration,
    ) -> QmpResult<Qmp> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = Self::connect_tcp(
                addr.clone(),
                left.clamp(Duration::from_millis(100), Duration::from_secs(10)),
            );
            match attempt {
                Ok(q) => return Ok(q),
                Err(e @ (QmpError::Command { .. } | QmpError::Protocol(_))) => return Err(e),
                Err(e) => {
                    if Instant::now() + Duration::from_millis(250) >= deadline {
                        return Err(QmpError::Timeout(
                            timeout,
                            format!("a QMP greeting (last error: {e})"),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }

    /// Connects to a unix socket without negotiating (for tests of the handshake itself);
    /// returns the session and the greeting. Call `execute("qmp_capabilities", None)` yourself.
    pub fn connect_unix_raw(path: impl AsRef<Path>, timeout: Duration) -> QmpResult<Qmp> {
        let s = UnixStream::connect(path.as_ref())?;
        Self::greet(Stream::Unix(s), timeout)
    }

    fn greet(stream: Stream, timeout: Duration) -> QmpResult<Qmp> {
        let mut q = Qmp {
            stream,
            buf: Vec::new(),
            events: VecDeque::new(),
            next_id: 1,
            greeting: Value::Null,
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let g = q.read_message(deadline, "the QMP greeting")?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected a greeting, got {g}")));
        }
        q.greeting = g;
        q.timeout = Duration::from_secs(30);
        Ok(q)
    }

    fn handshake(stream: Stream, timeout: Duration) -> QmpResult<Qmp> {
        let mut q = Self::greet(stream, timeout)?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The greeting the server sent (`{"QMP": {"version": ..., "capabilities": [...]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// Reads one JSON object, failing at `deadline`.
    fn read_message(&mut self, deadline: Instant, what: &str) -> QmpResult<Value> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                return serde_json::from_str(text).map_err(|e| {
                    QmpError::Protocol(format!("invalid JSON from server ({e}): {text}"))
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(QmpError::Timeout(Duration::ZERO, what.to_owned()));
            }
            self.stream.set_read_timeout(Some(deadline - now))?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(QmpError::Timeout(Duration::ZERO, what.to_owned()));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Err(QmpError::Closed);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends a raw JSON message (no id added).
    pub fn send(&mut self, msg: &Value) -> QmpResult<()> {
        let mut line = serde_json::to_vec(msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.stream.write_all(&line)?;
        Ok(())
    }

    /// Executes `command` with optional `arguments`; returns the `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> QmpResult<Value> {
        let timeout = self.timeout;
        self.execute_timeout(command, arguments, timeout)
    }

    /// [`Qmp::execute`] with an explicit timeout.
    pub fn execute_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> QmpResult<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.send(&msg)?;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self
                .read_message(deadline, &format!("the reply to `{command}`"))
                .map_err(|e| match e {
                    QmpError::Timeout(_, w) => QmpError::Timeout(timeout, w),
                    e => e,
                })?;
            if m.get("event").is_some() {
                self.events.push_back(m);
                continue;
            }
            // A reply without id is accepted as ours: only one command is outstanding.
            if let Some(rid) = m.get("id") {
                if rid != &json!(id) {
                    return Err(QmpError::Protocol(format!(
                        "reply with unexpected id {rid} (want {id}): {m}"
                    )));
                }
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(err) = m.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected message: {m}")));
        }
    }

    /// Waits up to `timeout` for an event named `name` (queued events are checked first and
    /// the matching one is removed; other events stay queued). Returns the whole event object.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> QmpResult<Value> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return Ok(self.events.remove(i).unwrap_or(Value::Null));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let m = self
                .read_message(deadline, &format!("event {name}"))
                .map_err(|e| match e {
                    QmpError::Timeout(_, _) => QmpError::Timeout(
                        timeout,
                        format!(
                            "event {name} (other events queued: {:?})",
                            self.event_names()
                        ),
                    ),
                    e => e,
                })?;
            if m["event"] == name {
                return Ok(m);
            }
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else {
                return Err(QmpError::Protocol(format!(
                    "unsolicited non-event message: {m}"
                )));
            }
        }
    }

    /// Reads messages for `duration`, queueing events; returns all queued events (draining).
    pub fn collect_events(&mut self, duration: Duration) -> QmpResult<Vec<Value>> {
        let deadline = Instant::now() + duration;
        loop {
            match self.read_message(deadline, "events") {
                Ok(m) if m.get("event").is_some() => self.events.push_back(m),
                Ok(m) => {
                    return Err(QmpError::Protocol(format!(
                        "unsolicited non-event message: {m}"
                    )))
                }
                Err(QmpError::Timeout(..)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(self.take_events())
    }

    /// Removes and returns all queued events.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Names of the queued events.
    pub fn event_names(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["event"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    /// `query-status` as `(status, running)`.
    pub fn query_status(&mut self) -> QmpResult<(String, bool)> {
        let r = self.execute("query-status", None)?;
        let status = r["status"]
            .as_str()
            .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {r}")))?
            .to_owned();
        let running = r["running"]
            .as_bool()
            .ok_or_else(|| QmpError::Protocol(format!("query-status without running: {r}")))?;
        Ok((status, running))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// A scripted fake server: greets, then answers each request via `reply`.
    fn fake_server(path: &Path, reply: fn(&Value) -> Vec<String>) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (s, _) = l.accept().expect("accept");
            let mut w = s.try_clone().expect("clone");
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .expect("greet");
            for line in BufReader::new(s).lines() {
                let Ok(line) = line else { break };
                let req: Value = serde_json::from_str(&line).expect("json");
                for out in reply(&req) {
                    w.write_all(out.as_bytes()).expect("write");
                    w.write_all(b"\n").expect("write");
                }
            }
        })
    }

    #[test]
    fn commands_errors_and_events() {
        let dir = std::env::temp_dir().join(format!("qmp-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let sock = dir.join("qmp.sock");
        let server = fake_server(&sock, |req| {
            let id = req["id"].clone();
            match req["execute"].as_str() {
                Some("qmp_capabilities") => vec![json!({"return": {}, "id": id}).to_string()],
                Some("stop") => vec![
                    json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}).to_string(),
                    json!({"return": {}, "id": id}).to_string(),
                ],
                Some("query-status") => {
                    vec![json!({"return": {"status": "paused", "running": false}, "id": id}).to_string()]
                }
                Some("cont") => vec![
                    json!({"return": {}, "id": id}).to_string(),
                    json!({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}}).to_string(),
                ],
                _ => vec![json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id}).to_string()],
            }
        });
        let mut q = Qmp::connect_unix(&sock, Duration::from_secs(5)).expect("connect");
        assert!(q.greeting().get("QMP").is_some());
        q.execute("stop", None).expect("stop");
        assert_eq!(q.event_names(), ["STOP"]);
        assert_eq!(
            q.query_status().expect("status"),
            ("paused".to_owned(), false)
        );
        let ev = q
            .wait_event("STOP", Duration::from_secs(1))
            .expect("queued STOP");
        assert_eq!(ev["event"], "STOP");
        q.execute("cont", None).expect("cont");
        q.wait_event("RESUME", Duration::from_secs(5))
            .expect("RESUME");
        let err = q
            .execute("bogus", Some(json!({"x": 1})))
            .expect_err("must fail");
        assert_eq!(err.class(), Some("CommandNotFound"));
        assert!(matches!(
            q.wait_event("SHUTDOWN", Duration::from_millis(200)),
            Err(QmpError::Timeout(..))
        ));
        drop(q);
        server.join().expect("server");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
