//! The Unix socket between the running gateway and the one replacing it:
//! framed messages, each an rkyv archive of [`Msg`] behind a header with
//! its length, its file descriptor count and a CRC-32, the descriptors
//! passed with it (SCM_RIGHTS).
//!
//! Frame layout (little-endian):
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SLGU` |
//! | 4 | 4 | payload length |
//! | 8 | 4 | descriptors sent with this frame |
//! | 12 | 4 | CRC-32 of the payload |
//! | 16 | n | payload: rkyv archive of [`Msg`] |
//!
//! The socket is a stream: the kernel hands the descriptors over with the
//! bytes they were sent with, in order, so the reader queues every
//! descriptor it receives and each frame takes its count from the front.
//! Blocking I/O, on the threads of the process's coordinator: nothing here
//! runs on a shard.

use rkyv::{Archive, Deserialize, Serialize};
use sendfd::{RecvWithFd, SendWithFd};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

const MAGIC: [u8; 4] = *b"SLGU";
const HEADER: usize = 16;
/// The most descriptors one frame carries (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;
/// The largest payload a reader accepts: a batch of sessions with full
/// outboxes stays far below it; a lying length is refused.
pub const MAX_PAYLOAD: usize = 1 << 30;

/// A listening socket handed over, and which port it serves.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct ListenerImage {
    /// 0: the client port, 1: the HTTP port, 2: the WebSocket port.
    pub port: u8,
    /// The shard of the old process that listened on it.
    pub shard: u32,
}

pub const PORT_CLIENT: u8 = 0;
pub const PORT_HTTP: u8 = 1;
pub const PORT_WS: u8 = 2;

/// One live session handed over (its socket is the frame's descriptor at
/// the same index).
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct SessionImage {
    /// The player it is bound to (0: not logged in).
    pub player: u64,
    /// The client's address, for the logs.
    pub peer: String,
    /// Bytes read past the last whole frame.
    pub read: Vec<u8>,
    /// Output queued and not yet written (whole frames and the rest of
    /// one begun), written first by the new process.
    pub unsent: Vec<u8>,
    /// Refused resumes on this connection.
    pub resume_failures: u8,
    /// How long ago the client last sent anything, ms.
    pub quiet_ms: u64,
    /// Tokens left in its rate bucket (f64 bits).
    pub rate_tokens: u64,
}

/// What the two processes tell each other.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum Msg {
    /// Old to new, first: the listening sockets (the frame's descriptors).
    Hello {
        version: u32,
        listeners: Vec<ListenerImage>,
    },
    /// New to old: every shard runs on the listeners (accepting nothing
    /// yet).
    Ready { pid: u32, shards: u32 },
    /// New to old: it cannot start.
    Failed { why: String },
    /// Old to new: accept on the client ports (the old process no longer does).
    AcceptClients,
    /// Old to new: sessions (with descriptors) and players without one.
    Batch {
        id: u64,
        sessions: Vec<SessionImage>,
        /// Snapshot images of their players, then of players without a
        /// session: `crate::snapshot::Image` encoded.
        players: Vec<u8>,
    },
    /// New to old: the batch `id` runs here now.
    Adopted {
        id: u64,
        sessions: u32,
        players: u32,
    },
    /// New to old: the batch `id` was not taken; the old process keeps it.
    Refused { id: u64, why: String },
    /// Old to new: a push for players no longer held by the old process.
    Push {
        id: u64,
        players: Vec<u64>,
        msg_id: u32,
        body: Vec<u8>,
    },
    /// New to old: what the push `id` did.
    Pushed {
        id: u64,
        delivered: u64,
        cached: u64,
        offline: u64,
    },
    /// Old to new: accept on the HTTP port too; everything has moved.
    AcceptHttp,
    /// Old to new: the old process ends now; what it did.
    Done(Taken),
}

/// A whole upgrade as the old process saw it (the new one shows it in
/// its metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Taken {
    pub sessions: u64,
    pub players: u64,
    pub batches: u64,
    /// The longest a batch was away (its sessions read nothing), µs.
    pub longest_hold_us: u64,
    /// The median batch's time away, µs.
    pub median_hold_us: u64,
    /// From the start to everything handed over, µs.
    pub took_us: u64,
    pub pushes_forwarded: u64,
    pub left_behind: u64,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the other process closed the channel")]
    Closed,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("bad frame: {0}")]
    Bad(String),
}

/// One end of the channel.
pub struct Channel {
    sock: UnixStream,
    /// Descriptors received and not yet claimed by a frame.
    fds: VecDeque<OwnedFd>,
    buf: Vec<u8>,
}

impl Channel {
    /// A connected pair: (this process's end, the end the child inherits).
    /// Both are close-on-exec; [`Channel::inheritable`] clears it on the
    /// child's end in the child (see `spawn`).
    pub fn pair() -> io::Result<(Channel, UnixStream)> {
        let (a, b) = UnixStream::pair()?;
        Ok((Channel::new(a), b))
    }

    pub fn new(sock: UnixStream) -> Channel {
        Channel {
            sock,
            fds: VecDeque::new(),
            buf: Vec::new(),
        }
    }

    /// The end a child received as descriptor `fd`.
    ///
    /// # Safety
    /// `fd` must be an open Unix stream socket owned by nobody else.
    pub unsafe fn from_inherited(fd: RawFd) -> Channel {
        // SAFETY: the caller passes ownership of an open socket.
        let sock = unsafe { UnixStream::from_raw_fd(fd) };
        let _ = set_cloexec(sock.as_raw_fd(), true);
        Channel::new(sock)
    }

    /// A second handle on the socket (a reader thread and a writer).
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel::new(self.sock.try_clone()?))
    }

    /// Give up on a read or write after `t` (None: wait forever).
    pub fn set_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)?;
        self.sock.set_write_timeout(t)
    }

    /// Stop both directions (a thread blocked on a read returns).
    pub fn shutdown(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Send `msg` with `fds` (at most [`MAX_FDS`]).
    pub fn send(&mut self, msg: &Msg, fds: &[RawFd]) -> Result<(), ChannelError> {
        if fds.len() > MAX_FDS {
            return Err(ChannelError::Bad(format!(
                "{} descriptors in one frame",
                fds.len()
            )));
        }
        let payload = rkyv::to_bytes::<rkyv::rancor::Error>(msg)
            .map_err(|e| ChannelError::Bad(e.to_string()))?;
        let mut frame = Vec::with_capacity(HEADER + payload.len());
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&(fds.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        // The descriptors ride on the first send; the rest is plain bytes.
        let mut sent = loop {
            match self.sock.send_with_fd(&frame, fds) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        while sent < frame.len() {
            use std::io::Write;
            match self.sock.write(&frame[sent..]) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The next message and the descriptors sent with it.
    pub fn recv(&mut self) -> Result<(Msg, Vec<OwnedFd>), ChannelError> {
        self.fill(HEADER)?;
        if self.buf[..4] != MAGIC {
            return Err(ChannelError::Bad("bad magic".into()));
        }
        let word = |b: &[u8], at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(w)
        };
        let len = word(&self.buf, 4) as usize;
        let nfds = word(&self.buf, 8) as usize;
        let crc = word(&self.buf, 12);
        if len > MAX_PAYLOAD || nfds > MAX_FDS {
            return Err(ChannelError::Bad(format!(
                "length {len}, {nfds} descriptors"
            )));
        }
        self.fill(HEADER + len)?;
        let payload = &self.buf[HEADER..HEADER + len];
        if crc32fast::hash(payload) != crc {
            return Err(ChannelError::Bad("checksum mismatch".into()));
        }
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(len);
        aligned.extend_from_slice(payload);
        let msg = rkyv::from_bytes::<Msg, rkyv::rancor::Error>(&aligned)
            .map_err(|e| ChannelError::Bad(e.to_string()))?;
        self.buf.drain(..HEADER + len);
        if self.fds.len() < nfds {
            return Err(ChannelError::Bad(format!(
                "{nfds} descriptors announced, {} received",
                self.fds.len()
            )));
        }
        let fds = self.fds.drain(..nfds).collect();
        Ok((msg, fds))
    }

    /// Read until `buf` holds `want` bytes, queueing descriptors.
    fn fill(&mut self, want: usize) -> Result<(), ChannelError> {
        let mut chunk = vec![0u8; 64 * 1024];
        let mut raw = [0 as RawFd; MAX_FDS + 3];
        while self.buf.len() < want {
            let (n, nfds) = match self.sock.recv_with_fd(&mut chunk, &mut raw) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for &fd in &raw[..nfds] {
                let _ = set_cloexec(fd, true);
                // SAFETY: the kernel installed `fd` for this process just now.
                self.fds.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                return Err(ChannelError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Set or clear FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn pipe_fd() -> (OwnedFd, UnixStream) {
        let (r, w) = UnixStream::pair().expect("pair");
        (OwnedFd::from(r), w)
    }

    #[test]
    fn messages_and_descriptors_arrive_in_order_and_work() {
        let (mut a, b) = Channel::pair().expect("pair");
        let mut b = Channel::new(b);
        let (r1, mut w1) = pipe_fd();
        let (r2, mut w2) = pipe_fd();
        let hello = Msg::Hello {
            version: 1,
            listeners: vec![ListenerImage {
                port: PORT_CLIENT,
                shard: 0,
            }],
        };
        a.send(&hello, &[r1.as_raw_fd()]).expect("send");
        a.send(&Msg::AcceptClients, &[]).expect("send");
        let big = Msg::Batch {
            id: 7,
            sessions: vec![SessionImage {
                player: 42,
                peer: "127.0.0.1:5".into(),
                read: vec![1, 2, 3],
                unsent: vec![9; 300_000],
                resume_failures: 1,
                quiet_ms: 12,
                rate_tokens: 5f64.to_bits(),
            }],
            players: vec![0xab; 1000],
        };
        let sender = std::thread::spawn(move || {
            a.send(&big, &[r2.as_raw_fd()]).expect("send big");
            drop(r2);
            a
        });
        let (m, fds) = b.recv().expect("hello");
        assert_eq!(m, hello);
        assert_eq!(fds.len(), 1);
        let (m, fds0) = b.recv().expect("accept");
        assert_eq!(m, Msg::AcceptClients);
        assert!(fds0.is_empty());
        let (m, fds2) = b.recv().expect("batch");
        let Msg::Batch { id, sessions, .. } = &m else {
            panic!("{m:?}")
        };
        assert_eq!((*id, sessions[0].unsent.len()), (7, 300_000));
        assert_eq!(fds2.len(), 1);
        // Each descriptor is the pipe it was sent as.
        w1.write_all(b"one").expect("w1");
        w2.write_all(b"two").expect("w2");
        drop((w1, w2));
        let mut s = String::new();
        UnixStream::from(fds.into_iter().next().expect("fd"))
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "one");
        s.clear();
        UnixStream::from(fds2.into_iter().next().expect("fd"))
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "two");
        let a = sender.join().expect("sender");
        drop(a);
        assert!(matches!(b.recv(), Err(ChannelError::Closed)));
    }

    #[test]
    fn a_damaged_frame_is_refused_not_decoded() {
        let (a, b) = UnixStream::pair().expect("pair");
        let mut b = Channel::new(b);
        let mut frame = Vec::new();
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&8u32.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        frame.extend_from_slice(&1234u32.to_le_bytes());
        frame.extend_from_slice(&[0; 8]);
        (&a).write_all(&frame).expect("write");
        assert!(matches!(b.recv(), Err(ChannelError::Bad(e)) if e.contains("checksum")));
        let (a, b) = UnixStream::pair().expect("pair");
        let mut b = Channel::new(b);
        let mut lying = Vec::new();
        lying.extend_from_slice(&MAGIC);
        lying.extend_from_slice(&u32::MAX.to_le_bytes());
        lying.extend_from_slice(&[0; 8]);
        (&a).write_all(&lying).expect("write");
        assert!(matches!(b.recv(), Err(ChannelError::Bad(_))));
    }
}
