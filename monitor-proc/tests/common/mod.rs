//! Helpers shared by the integration tests: running `bulkhead` (and QEMU), a small blocking QMP
//! client over unix or TCP sockets, scratch directories, and the fake worker.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod compare;

pub const BULKHEAD: &str = env!("CARGO_BIN_EXE_bulkhead");

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "bh-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        // The fake worker runs sandboxed as nobody (the tests run as root) and writes its log
        // here.
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .expect("chmod scratch dir");
        Scratch(p)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn s(&self, name: &str) -> String {
        self.path(name).to_str().expect("utf8 path").to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The fake worker built from `examples/fake_vcpu.rs`, linked as `bulkhead-vcpu` in a fresh
/// directory to pass as `--worker-dir`.
pub fn fake_worker_dir(scratch: &Scratch) -> String {
    let exe = Path::new(BULKHEAD)
        .parent()
        .expect("target dir")
        .join("examples")
        .join("fake_vcpu");
    assert!(
        exe.exists(),
        "{} is missing: run the tests with `cargo test -p bulkhead-monitor` (which builds the \
         examples) or `cargo build -p bulkhead-monitor --examples` first",
        exe.display()
    );
    let dir = scratch.path("workers");
    std::fs::create_dir_all(&dir).expect("worker dir");
    std::os::unix::fs::symlink(&exe, dir.join("bulkhead-vcpu")).expect("symlink");
    dir.to_str().expect("utf8").to_string()
}

/// A running `bulkhead` whose stderr goes to a file; killed on drop.
pub struct Monitor {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Monitor {
    pub fn start(scratch: &Scratch, args: &[&str]) -> Self {
        let stderr_path = scratch.path(&format!("stderr-{}", Instant::now().elapsed().as_nanos()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let child = Command::new(BULKHEAD)
            .args(args)
            .env("BULKHEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn bulkhead");
        Monitor { child, stderr_path }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Waits for exit, at most `limit`.
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "bulkhead did not exit in {limit:?}; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stderr contains `text`.
    pub fn wait_stderr(&self, text: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let s = self.stderr();
            if s.contains(text) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "stderr never said {text:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Monitor {
    /// Like [`Monitor::start`], with inherited fds: each `(fd, target)` is duplicated onto
    /// `target` in the child, without close-on-exec (as a shell's `N<file` would).
    pub fn start_with_fds(scratch: &Scratch, args: &[&str], fds: &[(RawFd, RawFd)]) -> Self {
        let stderr_path = scratch.path(&format!("stderr-{}", Instant::now().elapsed().as_nanos()));
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new(BULKHEAD);
        cmd.args(args)
            .env("BULKHEAD_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let fds = fds.to_vec();
        // SAFETY: the closure runs in the forked child before exec and only calls dup2/fcntl,
        // which are async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for &(fd, target) in &fds {
                    if fd == target {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(fd, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn bulkhead");
        Monitor { child, stderr_path }
    }

    /// The monitor's open fds and what they point at.
    pub fn fds(&self) -> BTreeMap<i32, String> {
        proc_fds(self.child.id())
    }
}

/// `/proc/<pid>/fd`: fd number → link target.
pub fn proc_fds(pid: u32) -> BTreeMap<i32, String> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// Where a [`Qmp::send_with_fds`] attaches its fds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FdsOn {
    /// The command text and the fds in one `sendmsg`.
    Command,
    /// A lone `" "` carries the fds (Python qemu.qmp's `send_fd_scm`); the command follows in
    /// a second write.
    LoneSpace,
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `bulkhead` to completion (for command-line errors).
pub fn run_to_end(args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(BULKHEAD)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run bulkhead");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Waits until a unix socket accepts connections.
pub fn wait_for_socket(path: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "socket {path} never came up");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(b),
            Stream::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(b),
            Stream::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A blocking QMP client that keeps events aside while waiting for replies.
pub struct Qmp {
    reader: BufReader<Stream>,
    writer: Stream,
    pub greeting: Value,
    pub greeting_line: String,
    pub events: Vec<Value>,
    /// Every line received, raw, in order.
    pub lines: Vec<String>,
}

impl Qmp {
    pub fn unix(path: &str) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect {path}: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let w = s.try_clone().expect("clone");
        Self::finish(Stream::Unix(s), Stream::Unix(w))
    }

    pub fn tcp(port: u16) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        let s = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect tcp {port}: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let w = s.try_clone().expect("clone");
        Self::finish(Stream::Tcp(s), Stream::Tcp(w))
    }

    fn finish(r: Stream, w: Stream) -> Self {
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
            greeting: Value::Null,
            greeting_line: String::new(),
            events: Vec::new(),
            lines: Vec::new(),
        };
        let line = q.read_line().expect("greeting");
        q.greeting = serde_json::from_str(&line).expect("greeting is JSON");
        q.greeting_line = line;
        q
    }

    /// One raw line (with its `\r\n`), or None at EOF.
    pub fn read_line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                self.lines.push(line.clone());
                Some(line)
            }
            // QEMU resets the connection when it exits after `quit`.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read from QMP: {e}"),
        }
    }

    /// The socket the client writes to (for sendmsg with fds).
    pub fn writer_stream(&self) -> &Stream {
        &self.writer
    }

    /// Sends `text` plus a newline with `fds` attached (`SCM_RIGHTS`), as `on` says. Unix
    /// sockets only.
    pub fn send_with_fds(&mut self, text: &str, fds: &[RawFd], on: FdsOn) {
        use sendfd::SendWithFd;
        let Stream::Unix(s) = &self.writer else {
            panic!("fds can only be sent over a unix socket");
        };
        let line = format!("{text}\n");
        match on {
            FdsOn::Command => {
                let n = s.send_with_fd(line.as_bytes(), fds).expect("sendmsg");
                assert_eq!(n, line.len(), "short sendmsg");
            }
            FdsOn::LoneSpace => {
                let n = s.send_with_fd(b" ", fds).expect("sendmsg");
                assert_eq!(n, 1, "short sendmsg");
                self.send_raw(&line);
            }
        }
    }

    /// [`Qmp::send_with_fds`] and the reply.
    pub fn cmd_with_fds(&mut self, text: &str, fds: &[RawFd], on: FdsOn) -> Value {
        self.send_with_fds(text, fds, on);
        self.reply()
    }

    pub fn send_raw(&mut self, text: &str) {
        self.writer.write_all(text.as_bytes()).expect("send");
    }

    /// Sends `text` and returns the next non-event message.
    pub fn raw(&mut self, text: &str) -> Value {
        // One write: the server may act on a complete object before its newline arrives
        // (`quit` then closes the socket), so a separate newline write could hit EPIPE.
        self.send_raw(&format!("{text}\n"));
        self.reply()
    }

    /// The next non-event message; events met on the way are kept in `events`.
    pub fn reply(&mut self) -> Value {
        loop {
            let line = self
                .read_line()
                .expect("connection closed while waiting for a reply");
            let v: Value = serde_json::from_str(&line).expect("reply is JSON");
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    pub fn cmd(&mut self, name: &str) -> Value {
        self.raw(&format!(r#"{{"execute": "{name}"}}"#))
    }

    pub fn negotiate(&mut self) {
        let r = self.cmd("qmp_capabilities");
        assert_eq!(r, serde_json::json!({"return": {}}));
    }

    /// Waits for an event named `name` (looking at those already seen first, and consuming it).
    pub fn event(&mut self, name: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i);
        }
        loop {
            let line = self
                .read_line()
                .unwrap_or_else(|| panic!("connection closed while waiting for {name}"));
            let v: Value = serde_json::from_str(&line).expect("JSON");
            if v["event"] == name {
                return v;
            }
            if v.get("event").is_some() {
                self.events.push(v);
            }
        }
    }

    pub fn status(&mut self) -> String {
        let r = self.cmd("query-status");
        r["return"]["status"].as_str().expect("status").to_string()
    }

    /// True once the server closed the connection (reads EOF or an error).
    pub fn closed(&mut self) -> bool {
        let mut line = String::new();
        matches!(self.reader.read_line(&mut line), Ok(0) | Err(_))
    }
}

pub fn error_class(v: &Value) -> &str {
    v["error"]["class"].as_str().unwrap_or("<none>")
}

pub fn error_desc(v: &Value) -> &str {
    v["error"]["desc"].as_str().unwrap_or("<none>")
}

/// Starts `bulkhead` with a fake kernel and the fake worker (logging to `worker.log` in the
/// scratch directory), `-m 64M`, `append` after the log option, QMP on `qmp.sock`, and `extra`
/// arguments; returns it once the socket exists.
pub fn fake_guest(s: &Scratch, append: &str, extra: &[&str]) -> (Monitor, String) {
    let sock = s.s("qmp.sock");
    let kernel = s.path("vmlinux");
    std::fs::write(&kernel, b"\x7fELF fake kernel").expect("kernel");
    let spec = format!("unix:{sock},server=on,wait=off");
    let wd = fake_worker_dir(s);
    let append = format!("fake.log={} {append}", s.s("worker.log"));
    let kernel = kernel.to_str().expect("utf8").to_string();
    let mut args = vec![
        "-kernel",
        kernel.as_str(),
        "-m",
        "64M",
        "--worker-dir",
        wd.as_str(),
        "-append",
        append.as_str(),
        "-qmp",
        spec.as_str(),
    ];
    args.extend_from_slice(extra);
    let m = Monitor::start(s, &args);
    wait_for_socket(&sock, Duration::from_secs(20));
    (m, sock)
}
