//! One QMP connection: greeting, capabilities negotiation, command dispatch, and the writer
//! that drains the session's bounded queue to the socket.
//!
//! Each session runs two tasks. The reader cuts the input into JSON values
//! ([`Splitter`]), validates each request ([`parse_request`]), runs it through the
//! [`Registry`] and queues the reply. The writer writes queued replies and events. Neither ever
//! waits on another session: a reply or event that finds the queue full kills the session
//! (see [`super::events`]). End of input flushes what is queued and closes the connection.
//!
//! On unix sockets the reader receives with `recvmsg`, so file descriptors sent with
//! `SCM_RIGHTS` arrive (close-on-exec) with the bytes. They are given to one command, and closed
//! once that command has run without claiming them (see [`crate::fds`]). Which command: the
//! kernel may glue several sends into one read, but a read always ends with the send that
//! carried fds (a unix stream read stops after the first message with fds). So fds belong to the
//! last command the read completes, or, if the read completes none or ends inside a command (a
//! lone whitespace byte sent ahead of the command, as Python's `qemu.qmp` `send_fd_scm` does, or
//! a command cut by the buffer), to the next command to complete. Newer fds replace older ones
//! still waiting, as in QEMU.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{tcp, unix};

use super::commands::{Context, PostAction, Registry};
use super::events::{EventBus, Outgoing, SessionQueue, SessionSink};
use super::protocol::{
    error_line, greeting_line, parse_request, return_line, Chunk, QmpError, Splitter,
};
use crate::fds::{FdSets, SessionFds, MAX_PENDING_FDS};
use crate::info::{ClientGuard, MachineInfo};
use crate::vm::{ExitRequest, VmHandle};

/// Most fds one `recvmsg` accepts.
const MAX_SESSION_FDS: usize = MAX_PENDING_FDS;

/// What every session shares.
#[derive(Debug)]
pub struct Shared {
    /// The event bus (and session registry).
    pub bus: Arc<EventBus>,
    /// The commands.
    pub registry: Registry,
    /// The VM actor.
    pub vm: VmHandle,
    /// Asks the monitor to exit.
    pub exit: ExitRequest,
    /// The fd sets (`add-fd`), shared by all sessions.
    pub fdsets: Arc<FdSets>,
    /// Facts about the machine.
    pub info: MachineInfo,
}

impl Shared {
    /// Everything sessions share, with the full command registry and no fd sets yet.
    pub fn new(bus: Arc<EventBus>, vm: VmHandle, exit: ExitRequest, info: MachineInfo) -> Self {
        Shared {
            bus,
            registry: Registry::new(),
            vm,
            exit,
            fdsets: Arc::new(FdSets::default()),
            info,
        }
    }
}

/// One session as command handlers see it.
#[derive(Debug)]
pub struct SessionCtx {
    id: u64,
    fds: Mutex<SessionFds>,
}

impl SessionCtx {
    /// A session with no fds.
    pub fn new(id: u64) -> Self {
        SessionCtx {
            id,
            fds: Mutex::new(SessionFds::default()),
        }
    }

    /// The session id (as in the log).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The session's fds.
    pub fn fds(&self) -> MutexGuard<'_, SessionFds> {
        self.fds.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A freshly accepted connection.
#[derive(Debug)]
pub enum Conn {
    /// Over a unix socket (can carry fds).
    Unix(tokio::net::UnixStream),
    /// Over TCP.
    Tcp(tokio::net::TcpStream),
}

/// Per-session protocol state.
#[derive(Debug)]
pub struct SessionState {
    negotiated: bool,
    ctx: Arc<SessionCtx>,
    /// Fds received for the next command to complete.
    waiting_fds: Vec<OwnedFd>,
}

impl SessionState {
    fn new(id: u64) -> Self {
        SessionState {
            negotiated: false,
            ctx: Arc::new(SessionCtx::new(id)),
            waiting_fds: Vec::new(),
        }
    }

    /// True once `qmp_capabilities` succeeded.
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }
}

/// Decides which of the `chunks` completed by one read gets which fds: `waiting` (received
/// earlier) go to the first chunk, `received` (with this read) to the last chunk if the read
/// ended between values, otherwise they wait for the next value. Returns the fds per chunk and
/// what waits afterwards.
fn assign_fds(
    chunks: usize,
    ended_idle: bool,
    waiting: Vec<OwnedFd>,
    received: Vec<OwnedFd>,
) -> (Vec<Vec<OwnedFd>>, Vec<OwnedFd>) {
    let mut per_chunk: Vec<Vec<OwnedFd>> = (0..chunks).map(|_| Vec::new()).collect();
    let mut still_waiting = waiting;
    if let Some(first) = per_chunk.first_mut() {
        *first = std::mem::take(&mut still_waiting);
    }
    if !received.is_empty() {
        match per_chunk.last_mut() {
            // Newer fds replace older ones (which are closed).
            Some(last) if ended_idle => *last = received,
            _ => still_waiting = received,
        }
    }
    (per_chunk, still_waiting)
}

enum Reader {
    Unix(unix::OwnedReadHalf),
    Tcp(tcp::OwnedReadHalf),
}

impl Reader {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        match self {
            Reader::Tcp(r) => Ok((r.read(buf).await?, Vec::new())),
            Reader::Unix(r) => {
                let s: &tokio::net::UnixStream = r.as_ref();
                loop {
                    s.readable().await?;
                    match s.try_io(Interest::READABLE, || recv_with_fds(s.as_raw_fd(), buf)) {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        other => return other,
                    }
                }
            }
        }
    }
}

/// `recvmsg` with room for [`MAX_SESSION_FDS`] fds of `SCM_RIGHTS`, received close-on-exec.
fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    const SPACE: usize = 64 + MAX_SESSION_FDS * std::mem::size_of::<RawFd>();
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut cmsg_buf = [0u64; SPACE.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg_buf.as_mut_ptr().cast();
    // Room for exactly MAX_SESSION_FDS fds: the kernel closes any beyond (MSG_CTRUNC).
    const FD_BYTES: u32 = (MAX_SESSION_FDS * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let room = unsafe { libc::CMSG_SPACE(FD_BYTES) } as usize;
    msg.msg_controllen = std::mem::size_of_val(&cmsg_buf).min(room);
    // SAFETY: `msg` points at `iov` (covering `buf`) and `cmsg_buf`, all live and writable for
    // the duration of the call.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, bounded by
    // msg_controllen; each SCM_RIGHTS payload holds whole ints, which we read unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let len = (*cmsg).cmsg_len as usize - (data as usize - cmsg as usize);
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        log::warn!(
            "QMP client sent more file descriptors than a message may carry; some were lost"
        );
    }
    Ok((usize::try_from(n).unwrap_or(0), fds))
}

/// Registers and starts a session on `conn`. `client`, if given, records the connection on its
/// listener's character device (`query-chardev`) until the session ends.
pub fn spawn(conn: Conn, shared: Arc<Shared>, client: Option<ClientGuard>) {
    let Some((sink, queue)) = shared.bus.register() else {
        return; // shutting down
    };
    log::info!("QMP session {} opened", sink.id());
    let (reader, writer): (Reader, Box<dyn AsyncWrite + Send + Unpin>) = match conn {
        Conn::Unix(s) => {
            let (r, w) = s.into_split();
            (Reader::Unix(r), Box::new(w))
        }
        Conn::Tcp(s) => {
            let (r, w) = s.into_split();
            (Reader::Tcp(r), Box::new(w))
        }
    };
    let killed = queue.killed.clone();
    tokio::spawn(write_loop(
        writer,
        queue,
        shared.bus.clone(),
        sink.clone(),
        client,
    ));
    tokio::spawn(read_loop(reader, sink, killed, shared));
}

async fn write_loop(
    mut w: Box<dyn AsyncWrite + Send + Unpin>,
    mut queue: SessionQueue,
    bus: Arc<EventBus>,
    sink: SessionSink,
    client: Option<ClientGuard>,
) {
    let id = sink.id();
    let mut killed = queue.killed.clone();
    loop {
        let msg = tokio::select! {
            m = queue.rx.recv() => m,
            _ = killed.wait_for(|k| *k) => None,
        };
        let Some(Outgoing::Line(line)) = msg else {
            break;
        };
        let write = async {
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        let ok = tokio::select! {
            r = write => r.is_ok(),
            _ = killed.wait_for(|k| *k) => false,
        };
        if !ok {
            break;
        }
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), w.shutdown()).await;
    // Make sure the reader ends too, then forget the session.
    sink.kill();
    drop(queue.rx);
    bus.unregister(id);
    drop(client);
    log::info!("QMP session {id} closed");
}

async fn read_loop(
    mut reader: Reader,
    sink: SessionSink,
    mut killed: tokio::sync::watch::Receiver<bool>,
    shared: Arc<Shared>,
) {
    sink.send(Arc::from(greeting_line()));
    let mut splitter = Splitter::new();
    let mut state = SessionState::new(sink.id());
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let work = async {
            let (n, fds) = reader.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            let chunks = splitter.feed(&buf[..n]);
            let waiting = std::mem::take(&mut state.waiting_fds);
            let (per_chunk, still_waiting) =
                assign_fds(chunks.len(), splitter.is_idle(), waiting, fds);
            state.waiting_fds = still_waiting;
            for (chunk, fds) in chunks.into_iter().zip(per_chunk) {
                state.ctx.fds().offer(fds);
                let (line, post) = handle_chunk(chunk, &state, &shared).await;
                // Fds that came with this command and were not claimed by it are closed before
                // the client hears the answer.
                drop(state.ctx.fds().take_pending());
                answer(line, post, &mut state, &sink, &shared);
            }
            Ok(true)
        };
        let go_on = tokio::select! {
            r = work => matches!(r, Ok(true)),
            _ = killed.wait_for(|k| *k) => false,
        };
        if !go_on {
            break;
        }
    }
    // End of input: flush what is queued, then close.
    sink.close();
}

/// Runs one value cut from the input; returns the line to answer and what to do after
/// sending it.
async fn handle_chunk(
    chunk: Chunk,
    state: &SessionState,
    shared: &Arc<Shared>,
) -> (String, Option<PostAction>) {
    let bytes = match chunk {
        Chunk::Error(msg) => return (error_line(&QmpError::generic(msg), None), None),
        Chunk::Value(bytes) => bytes,
    };
    let req = match parse_request(&bytes) {
        Ok(r) => r,
        Err(bad) => return (error_line(&bad.error, bad.id.as_deref()), None),
    };
    let ctx = Context {
        shared: shared.clone(),
        session: state.ctx.clone(),
    };
    let result = match shared
        .registry
        .prepare(&req.execute, req.arguments, state.negotiated, ctx)
    {
        Ok(fut) => fut.await,
        Err(e) => Err(e),
    };
    let id = req.id.as_deref();
    match result {
        Ok(outcome) => (return_line(&outcome.value, id), outcome.post),
        Err(e) => (error_line(&e, id), None),
    }
}

/// Sends a command's answer, then acts on it.
fn answer(
    line: String,
    post: Option<PostAction>,
    state: &mut SessionState,
    sink: &SessionSink,
    shared: &Arc<Shared>,
) {
    sink.send(Arc::from(line));
    match post {
        Some(PostAction::EnterCommandMode) => {
            state.negotiated = true;
            shared.bus.set_negotiated(sink.id());
        }
        Some(PostAction::Exit) => shared.exit.request(0),
        Some(PostAction::Emit(ev)) => shared.bus.emit(&ev),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| {
                std::fs::File::open("/dev/null")
                    .expect("open /dev/null")
                    .into()
            })
            .collect()
    }

    fn raws(v: &[OwnedFd]) -> Vec<RawFd> {
        v.iter().map(AsRawFd::as_raw_fd).collect()
    }

    #[test]
    fn fds_go_to_the_command_they_came_with() {
        // A whole command with its fds: that command.
        let r = fds(1);
        let want = raws(&r);
        let (per, wait) = assign_fds(1, true, Vec::new(), r);
        assert_eq!(raws(&per[0]), want);
        assert!(wait.is_empty());
        // Glued: earlier fd-less commands, then the one that carried the fds.
        let r = fds(2);
        let want = raws(&r);
        let (per, wait) = assign_fds(3, true, Vec::new(), r);
        assert!(per[0].is_empty() && per[1].is_empty());
        assert_eq!(raws(&per[2]), want);
        assert!(wait.is_empty());
        // A lone " " (no command yet): the fds wait for the next command...
        let r = fds(1);
        let want = raws(&r);
        let (per, wait) = assign_fds(0, true, Vec::new(), r);
        assert!(per.is_empty());
        assert_eq!(raws(&wait), want);
        // ...which is the first one completed later.
        let (per, wait) = assign_fds(2, true, wait, Vec::new());
        assert_eq!(raws(&per[0]), want);
        assert!(per[1].is_empty() && wait.is_empty());
        // A read ending inside a command: its fds are that command's.
        let r = fds(1);
        let want = raws(&r);
        let (per, wait) = assign_fds(1, false, Vec::new(), r);
        assert!(per[0].is_empty());
        assert_eq!(raws(&wait), want);
        // Newer fds replace older ones still waiting.
        let (old, new) = (fds(1), fds(1));
        let want = raws(&new);
        let (per, wait) = assign_fds(1, true, old, new);
        assert_eq!(raws(&per[0]), want);
        assert!(wait.is_empty());
    }
}
