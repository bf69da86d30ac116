//! Unit tests of the channel layer over real socketpairs.

use std::io::{Seek, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::channel::seqpacket_pair;
use crate::*;

#[derive(Debug)]
struct Test;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Req {
    Ping(u32),
    TakeFiles(u8),
    Blob(Vec<u8>),
}

impl Wire for Req {
    fn fd_count(&self) -> usize {
        match self {
            Req::TakeFiles(n) => usize::from(*n),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Rep {
    Pong(u32),
}
impl Wire for Rep {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Ev {
    Tick,
}
impl Wire for Ev {}

impl Protocol for Test {
    type Request = Req;
    type Reply = Rep;
    type Event = Ev;
}

fn pair() -> (Channel<Test>, Channel<Test>) {
    Channel::pair().expect("socketpair")
}

/// A raw socket end for sending hand-made datagrams.
fn raw_pair() -> (UnixDatagram, Channel<Test>) {
    let (a, b) = seqpacket_pair().expect("socketpair");
    (UnixDatagram::from(a), Channel::from_fd(b))
}

fn tmpfile(content: &[u8]) -> std::fs::File {
    let mut f = tempfile();
    f.write_all(content).expect("write");
    f.rewind().expect("rewind");
    f
}

fn tempfile() -> std::fs::File {
    // An anonymous file: O_TMPFILE in /tmp, so nothing is left behind.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags_tmpfile()
        .open("/tmp")
        .expect("O_TMPFILE")
}

trait TmpfileExt {
    fn custom_flags_tmpfile(&mut self) -> &mut Self;
}
impl TmpfileExt for std::fs::OpenOptions {
    fn custom_flags_tmpfile(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_TMPFILE)
    }
}

fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("proc").count()
}

fn is_cloexec(fd: &OwnedFd) -> bool {
    // SAFETY: F_GETFD on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC != 0
}

#[test]
fn request_reply_event_roundtrip() {
    let (a, b) = pair();
    a.send(
        &Frame::Request {
            id: 7,
            body: Req::Ping(42),
        },
        &[],
    )
    .expect("send");
    match b.recv().expect("recv") {
        (
            Frame::Request {
                id: 7,
                body: Req::Ping(42),
            },
            fds,
        ) => assert!(fds.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    b.reply(7, Rep::Pong(42), &[]).expect("reply");
    b.send_event(Ev::Tick).expect("event");
    assert!(matches!(
        a.recv().expect("recv"),
        (
            Frame::Reply {
                id: 7,
                body: Rep::Pong(42)
            },
            _
        )
    ));
    assert!(matches!(
        a.recv().expect("recv"),
        (Frame::Event(Ev::Tick), _)
    ));
}

#[test]
fn fds_travel_and_arrive_cloexec() {
    let (a, b) = pair();
    let f1 = tmpfile(b"one");
    let f2 = tmpfile(b"two");
    a.send(
        &Frame::Request {
            id: 1,
            body: Req::TakeFiles(2),
        },
        &[f1.as_fd(), f2.as_fd()],
    )
    .expect("send");
    let (_, fds) = b.recv().expect("recv");
    assert_eq!(fds.len(), 2);
    for (fd, want) in fds.into_iter().zip([b"one", b"two"]) {
        assert!(is_cloexec(&fd), "received fd must be FD_CLOEXEC");
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut s).expect("read");
        assert_eq!(&s, want);
    }
}

#[test]
fn handshake_checks_role_and_version() {
    let (a, b) = pair();
    let t = std::thread::spawn(move || b.handshake(Role::Vcpu, Role::Monitor).map(|h| h.role));
    assert_eq!(
        a.handshake(Role::Monitor, Role::Vcpu).expect("hs").role,
        Role::Vcpu
    );
    assert_eq!(t.join().expect("join").expect("hs"), Role::Monitor);

    // Wrong role.
    let (a, b) = pair();
    let t = std::thread::spawn(move || b.handshake(Role::Net, Role::Monitor));
    assert!(matches!(
        a.handshake(Role::Monitor, Role::Vcpu),
        Err(Error::Handshake(_))
    ));
    let _ = t.join();

    // Wrong version, hand-made.
    let (raw, chan) = raw_pair();
    let mut hello = Hello::new(Role::Vcpu);
    hello.version += 1;
    let bytes = codec::encode(&Frame::<Test>::Hello(hello)).expect("encode");
    raw.send(&bytes).expect("send");
    let e = chan
        .handshake(Role::Monitor, Role::Vcpu)
        .expect_err("must fail");
    assert!(e.to_string().contains("version"), "{e}");

    // Something other than a hello first.
    let (a, b) = pair();
    a.send(
        &Frame::Request {
            id: 1,
            body: Req::Ping(1),
        },
        &[],
    )
    .expect("send");
    assert!(matches!(
        b.handshake(Role::Vcpu, Role::Monitor),
        Err(Error::Handshake(_))
    ));
}

#[test]
fn malformed_and_truncated_frames_are_errors() {
    let (raw, chan) = raw_pair();
    // Garbage.
    raw.send(&[0xff, 0xfe, 0xfd, 0x17]).expect("send");
    assert!(matches!(chan.recv(), Err(Error::Decode(_))));
    // A valid frame cut short.
    let bytes = codec::encode(&Frame::<Test>::Request {
        id: 99,
        body: Req::Blob(vec![1; 100]),
    })
    .expect("encode");
    raw.send(&bytes[..bytes.len() / 2]).expect("send");
    assert!(matches!(chan.recv(), Err(Error::Decode(_))));
    // A valid frame with trailing junk.
    let mut long = codec::encode(&Frame::<Test>::Event(Ev::Tick)).expect("encode");
    long.extend_from_slice(&[0, 0, 0]);
    raw.send(&long).expect("send");
    assert!(matches!(chan.recv(), Err(Error::Decode(_))));
    // The channel is still usable after each bad frame.
    raw.send(&codec::encode(&Frame::<Test>::Event(Ev::Tick)).expect("encode"))
        .expect("send");
    assert!(matches!(chan.recv(), Ok((Frame::Event(Ev::Tick), _))));
}

#[test]
fn oversize_frames_are_refused_both_ways() {
    let (a, _b) = pair();
    let big = Req::Blob(vec![0u8; MAX_FRAME_BYTES + 10]);
    assert!(matches!(
        a.send(&Frame::Request { id: 1, body: big }, &[]),
        Err(Error::Oversize { .. })
    ));
    let (raw, chan) = raw_pair();
    raw.send(&vec![0u8; MAX_FRAME_BYTES + 100]).expect("send");
    assert!(matches!(chan.recv(), Err(Error::Oversize { .. })));
}

#[test]
fn wrong_fd_counts_are_refused_and_fds_closed() {
    let (a, b) = pair();
    let f = tmpfile(b"x");
    // Sender side: the message says 0 fds, one attached.
    assert!(matches!(
        a.send(
            &Frame::Request {
                id: 1,
                body: Req::Ping(1)
            },
            &[f.as_fd()]
        ),
        Err(Error::FdMismatch {
            expected: 0,
            got: 1
        })
    ));
    // Receiver side: a hand-made frame declaring 0 fds arrives with 3.
    let (raw, chan) = raw_pair();
    let before = open_fd_count();
    let bytes = codec::encode(&Frame::<Test>::Event(Ev::Tick)).expect("encode");
    {
        use sendfd::SendWithFd;
        let fds = [f.as_raw_fd(), f.as_raw_fd(), f.as_raw_fd()];
        raw.send_with_fd(&bytes, &fds).expect("send");
    }
    assert!(matches!(
        chan.recv(),
        Err(Error::FdMismatch {
            expected: 0,
            got: 3
        })
    ));
    assert_eq!(
        open_fd_count(),
        before,
        "fds of a rejected frame must be closed"
    );
    // More fds than MAX_FDS.
    {
        use sendfd::SendWithFd;
        let fds = vec![f.as_raw_fd(); MAX_FDS + 3];
        let bytes = codec::encode(&Frame::<Test>::Request {
            id: 3,
            body: Req::TakeFiles(u8::try_from(MAX_FDS + 3).expect("small")),
        })
        .expect("encode");
        raw.send_with_fd(&bytes, &fds).expect("send");
    }
    assert!(matches!(chan.recv(), Err(Error::TooManyFds { .. })));
    assert_eq!(open_fd_count(), before, "excess fds must be closed");
    drop(b);
}

#[test]
fn peer_death_is_immediate_on_recv_and_send() {
    let (a, b) = pair();
    drop(b);
    assert!(matches!(a.recv(), Err(Error::PeerClosed)));
    assert!(matches!(a.send_event(Ev::Tick), Err(Error::PeerClosed)));

    // A blocked receiver wakes up when the peer process dies mid-wait.
    let (a, b) = pair();
    let t = std::thread::spawn(move || a.recv().map(|_| ()));
    std::thread::sleep(Duration::from_millis(50));
    drop(b);
    assert!(matches!(t.join().expect("join"), Err(Error::PeerClosed)));
}

#[test]
fn peer_process_killed_is_seen_by_async_rpc() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let (mine, theirs) = seqpacket_pair().expect("pair");
        // A real child process holds the other end, then is killed.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::from(theirs))
            .spawn()
            .expect("spawn sleep");
        let chan = AsyncChannel::<Test>::from_fd(mine).expect("async");
        let (client, mut events) = RpcClient::new(chan);
        let call = tokio::spawn(async move { client.call(Req::Ping(1), &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        child.kill().expect("kill");
        child.wait().expect("wait");
        let res = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("must not hang")
            .expect("join");
        assert!(matches!(res, Err(Error::PeerClosed)), "{res:?}");
        let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("must not hang");
        assert!(matches!(ev, Some(Err(Error::PeerClosed))));
    });
}

#[test]
fn rpc_replies_out_of_order_reach_their_callers() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let (mine, theirs) = seqpacket_pair().expect("pair");
        let worker = std::thread::spawn(move || {
            let chan = Channel::<Test>::from_fd(theirs);
            let mut held = Vec::new();
            while held.len() < 3 {
                if let (
                    Frame::Request {
                        id,
                        body: Req::Ping(n),
                    },
                    _,
                ) = chan.recv().expect("recv")
                {
                    held.push((id, n));
                }
            }
            chan.send_event(Ev::Tick).expect("event");
            for (id, n) in held.into_iter().rev() {
                chan.reply(id, Rep::Pong(n * 10), &[]).expect("reply");
            }
        });
        let chan = AsyncChannel::<Test>::from_fd(mine).expect("async");
        let (client, mut events) = RpcClient::new(chan);
        let client = std::sync::Arc::new(client);
        let mut calls = Vec::new();
        for n in 1..=3u32 {
            let c = client.clone();
            calls.push(tokio::spawn(
                async move { (n, c.call(Req::Ping(n), &[]).await) },
            ));
        }
        for call in calls {
            let (n, res) = call.await.expect("join");
            assert_eq!(res.expect("reply").0, Rep::Pong(n * 10));
        }
        assert!(matches!(events.recv().await, Some(Ok((Ev::Tick, _)))));
        worker.join().expect("worker");
    });
}

#[test]
fn codec_rejects_what_it_cannot_represent() {
    assert!(matches!(
        codec::decode::<Frame<Test>>(&[]),
        Err(Error::Decode(_))
    ));
    assert!(matches!(
        codec::decode::<Frame<Test>>(&vec![0u8; MAX_FRAME_BYTES + 1]),
        Err(Error::Oversize { .. })
    ));
    // A length prefix claiming far more than the frame holds.
    let mut bytes = codec::encode(&Frame::<Test>::Request {
        id: 1,
        body: Req::Blob(vec![]),
    })
    .expect("encode");
    if let Some(last) = bytes.last_mut() {
        *last = 0xfb; // varint marker for a u64 length follows
    }
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(codec::decode::<Frame<Test>>(&bytes).is_err());
}
