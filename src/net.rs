//! Sockets for the shards: SO_REUSEPORT listeners every shard binds, a TCP
//! stream shared by one connection's reader and writer tasks, and the writer
//! loop that sends a connection's queued output in batches.

use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use shards::Notify;
use socket2::{Domain, Protocol, Socket, Type};
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

/// Listen backlog of the client and HTTP ports: deep enough for a login storm.
pub const LISTEN_BACKLOG: i32 = 4096;

fn reuseport_socket(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Reserve `addr` (port 0 picks one) for the shards' listeners: a bound,
/// non-listening SO_REUSEPORT socket, so every shard binds the same port and
/// the kernel never queues a connection on this one. Keep it until every
/// shard has bound, then drop it.
pub fn reserve_port(addr: SocketAddr) -> io::Result<(Socket, SocketAddr)> {
    let socket = reuseport_socket(addr)?;
    let bound = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet address"))?;
    Ok((socket, bound))
}

/// A listening SO_REUSEPORT socket on `addr`, for the current shard.
pub fn listen_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = reuseport_socket(addr)?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    // SAFETY: the fd is a listening TCP socket we own and hand over whole.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// One TCP stream shared by a connection's reader and writer tasks. glommio
/// keeps separate read and write readiness sources per stream, and a poll
/// never suspends while holding the borrow, so the two never conflict.
#[derive(Clone)]
pub struct SharedStream(Rc<RefCell<TcpStream>>);

impl SharedStream {
    pub fn new(stream: TcpStream) -> SharedStream {
        SharedStream(Rc::new(RefCell::new(stream)))
    }

    pub fn with<T>(&self, f: impl FnOnce(&TcpStream) -> T) -> T {
        f(&self.0.borrow())
    }

    /// Read into `buf`; 0 means end of stream.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        std::future::poll_fn(|cx| Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)).await
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}

/// A connection's queued output: frames are encoded straight into `buf` by
/// whoever produces them; the writer task takes everything queued since its
/// last write and sends it with one write. `queued()` is what counts against
/// a byte limit.
#[derive(Default)]
pub struct Outbound {
    buf: RefCell<BytesMut>,
    /// Bytes taken by the writer and not yet fully written.
    in_write: Cell<usize>,
    /// No more output will be queued: the writer exits once empty.
    closing: Cell<bool>,
    wake: Notify,
    /// Woken each time the writer finishes a batch.
    drained: Notify,
}

impl Outbound {
    pub fn new() -> Outbound {
        Outbound::default()
    }

    /// Encode into the queue with `f`, then wake the writer.
    pub fn push(&self, f: impl FnOnce(&mut BytesMut)) {
        f(&mut self.buf.borrow_mut());
        self.wake.notify();
    }

    /// Bytes queued or being written.
    pub fn queued(&self) -> usize {
        self.buf.borrow().len() + self.in_write.get()
    }

    /// Stop after writing what is queued.
    pub fn close(&self) {
        self.closing.set(true);
        self.wake.notify();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Drop what is queued and not yet taken by the writer (a dead peer).
    pub fn discard(&self) {
        self.buf.borrow_mut().clear();
    }

    /// Resolves when nothing is queued or being written.
    pub async fn flushed(&self) {
        while self.queued() > 0 {
            self.drained.notified().await;
        }
    }

    fn take(&self) -> Option<Bytes> {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return None;
        }
        let batch = buf.split().freeze();
        self.in_write.set(batch.len());
        Some(batch)
    }

    /// The writer loop: until closed and empty, write each batch whole.
    /// Returns the first write error; on return nothing more is written.
    pub async fn run_writer<W: AsyncWrite + Unpin>(&self, mut sink: W) -> io::Result<()> {
        let result = loop {
            match self.take() {
                Some(batch) => {
                    let r = sink.write_all(&batch).await;
                    self.in_write.set(0);
                    self.drained.notify();
                    if let Err(e) = r {
                        break Err(e);
                    }
                }
                None if self.closing.get() => break Ok(()),
                None => {
                    // Reclaim a buffer that grew for a burst.
                    {
                        let mut b = self.buf.borrow_mut();
                        if b.capacity() > 64 * 1024 {
                            *b = BytesMut::new();
                        }
                    }
                    self.wake.notified().await;
                }
            }
        };
        self.in_write.set(0);
        self.closing.set(true);
        self.drained.notify();
        result
    }
}
