//! Sockets for the shards: SO_REUSEPORT listeners every shard binds, a TCP
//! stream shared by one connection's reader and writer tasks, and the writer
//! loop that sends a connection's queued output in batches.

use crate::wire::{Wire, WireError};
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use shards::Notify;
use socket2::{Domain, Protocol, Socket, Type};
use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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
///
/// A plain bind comes first, without SO_REUSEPORT: if anything listens on
/// the address already (another gateway, started by mistake on the same
/// port, whose SO_REUSEPORT listeners would otherwise quietly share the
/// connections with this one), it fails with `AddrInUse`.
pub fn reserve_port(addr: SocketAddr) -> io::Result<(Socket, SocketAddr)> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                "address already in use (is another gateway listening there?)",
            )
        } else {
            e
        }
    })?;
    let picked = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet address"))?;
    drop(probe);
    let socket = reuseport_socket(picked)?;
    let bound = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet address"))?;
    Ok((socket, bound))
}

/// A listening SO_REUSEPORT socket on `addr`, for the current shard.
pub fn listen_reuseport(addr: SocketAddr) -> io::Result<TcpListener> {
    Ok(listener_from(listen_reuseport_fd(addr)?))
}

/// The socket of [`listen_reuseport`], not yet given to glommio.
pub fn listen_reuseport_fd(addr: SocketAddr) -> io::Result<std::os::fd::OwnedFd> {
    let socket = reuseport_socket(addr)?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A glommio listener on a listening socket (bound here or inherited).
pub fn listener_from(fd: std::os::fd::OwnedFd) -> TcpListener {
    // SAFETY: the fd is a listening TCP socket we own and hand over whole.
    unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// One TCP stream shared by a connection's reader and writer tasks, with
/// the connection's [`Wire`] when it is not plain TCP (TLS, WebSocket).
/// glommio keeps separate read and write readiness sources per stream, and
/// a poll never suspends while holding the borrow, so the two never
/// conflict.
#[derive(Clone)]
pub struct SharedStream(Rc<RefCell<Link>>);

struct Link {
    tcp: TcpStream,
    wire: Option<Box<Wire>>,
    /// The wire saw the peer end the stream (a WebSocket close, TLS
    /// close_notify) in a read that also carried frames: the next read
    /// reports the end, after those frames were handled.
    peer_closed: bool,
}

impl SharedStream {
    pub fn new(stream: TcpStream) -> SharedStream {
        SharedStream(Rc::new(RefCell::new(Link {
            tcp: stream,
            wire: None,
            peer_closed: false,
        })))
    }

    /// A stream whose bytes pass through `wire`.
    pub fn wired(stream: TcpStream, wire: Box<Wire>) -> SharedStream {
        SharedStream(Rc::new(RefCell::new(Link {
            tcp: stream,
            wire: Some(wire),
            peer_closed: false,
        })))
    }

    pub fn with<T>(&self, f: impl FnOnce(&TcpStream) -> T) -> T {
        f(&self.0.borrow().tcp)
    }

    /// `f` on the socket's fd and the wire (None: plain TCP).
    pub fn with_wire<T>(&self, f: impl FnOnce(RawFd, Option<&mut Wire>) -> T) -> T {
        let mut link = self.0.borrow_mut();
        let link = &mut *link;
        f(link.tcp.as_raw_fd(), link.wire.as_deref_mut())
    }

    /// Whether bytes pass through a wire (TLS, WebSocket).
    pub fn is_wired(&self) -> bool {
        self.0.borrow().wire.is_some()
    }

    /// Whether frames travel in WebSocket messages.
    pub fn is_websocket(&self) -> bool {
        self.0
            .borrow()
            .wire
            .as_ref()
            .is_some_and(|w| w.is_websocket())
    }

    /// Wire bytes wait for the socket.
    pub fn wire_pending(&self) -> bool {
        self.0
            .borrow()
            .wire
            .as_ref()
            .is_some_and(|w| !w.pending().is_empty())
    }

    /// The wire's handshakes are done (true for plain TCP).
    pub fn wire_open(&self) -> bool {
        self.0.borrow().wire.as_ref().is_none_or(|w| w.is_open())
    }

    /// Take the wire out (the connection moves to another shard).
    pub fn take_wire(&self) -> Option<Box<Wire>> {
        self.0.borrow_mut().wire.take()
    }

    /// Write every pending wire byte, waiting for the socket. The bytes
    /// stay pending (and [`SharedStream::wire_pending`] true) until the
    /// socket took them, so whoever waits for a flushed output waits for
    /// them too.
    pub async fn flush_wire(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| SharedStream::poll_flush_wire(&mut self.0.borrow_mut(), cx)).await
    }

    /// Bytes the wire holds for the socket (0: none, or plain TCP).
    pub fn wire_pending_len(&self) -> usize {
        self.0
            .borrow()
            .wire
            .as_ref()
            .map_or(0, |w| w.pending().len())
    }

    /// Read up to `want` bytes (at most [`SCRATCH_LEN`]) onto the end of
    /// `buf`; 0 means end of stream. The read goes into the thread's
    /// scratch buffer and only what arrived is copied to `buf`: glommio's
    /// reads wait for readiness and hold no buffer meanwhile, so a
    /// connection waiting for input needs no memory of its own for it.
    /// Through a wire, what it carries is appended (perhaps nothing: a
    /// WebSocket ping), and a refusal is an error holding the
    /// [`WireError`] (see [`wire_error`]).
    pub async fn read_append(&self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_append(cx, buf, want)).await
    }

    /// One poll of [`SharedStream::read_append`].
    fn poll_append(
        &self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            // At least 1: a read of 0 bytes would look like end of stream.
            let n = want.clamp(1, scratch.len());
            let mut link = self.0.borrow_mut();
            let link = &mut *link;
            if link.peer_closed {
                return Poll::Ready(Ok(0));
            }
            let r = Pin::new(&mut link.tcp).poll_read(cx, &mut scratch[..n]);
            let Poll::Ready(Ok(got)) = r else {
                return r;
            };
            match link.wire.as_mut() {
                None => {
                    buf.extend_from_slice(&scratch[..got]);
                    Poll::Ready(Ok(got))
                }
                Some(_) if got == 0 => Poll::Ready(Ok(0)),
                Some(w) => {
                    let before = buf.len();
                    match w.ingest(&scratch[..got], buf) {
                        Ok(i) if i.closed => {
                            link.peer_closed = true;
                            // Frames before the close are handled first.
                            Poll::Ready(Ok(if buf.len() > before { got } else { 0 }))
                        }
                        Ok(_) => Poll::Ready(Ok(got)),
                        Err(e) => Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
                    }
                }
            }
        })
    }

    /// Write pending wire bytes until none are left or the socket is full.
    fn poll_flush_wire(link: &mut Link, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(w) = link.wire.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !w.pending().is_empty() {
            match Pin::new(&mut link.tcp).poll_write(cx, w.pending()) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => w.consumed(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The [`WireError`] a read through a wire failed with, if that is why.
pub fn wire_error(e: &io::Error) -> Option<&WireError> {
    e.get_ref().and_then(|i| i.downcast_ref::<WireError>())
}

/// Through a wire, a write takes whole frames (or whole HTTP answers): it
/// first writes what the wire still holds, then encodes all of `buf` at
/// once; `poll_flush` writes what that left.
impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut link = self.0.borrow_mut();
        let link = &mut *link;
        if link.wire.is_none() {
            return Pin::new(&mut link.tcp).poll_write(cx, buf);
        }
        match SharedStream::poll_flush_wire(link, cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        if let Some(w) = link.wire.as_mut() {
            w.encode(buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
        // Start writing now; what the socket does not take waits for a flush.
        if let Poll::Ready(Err(e)) = SharedStream::poll_flush_wire(link, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut link = self.0.borrow_mut();
        let link = &mut *link;
        match SharedStream::poll_flush_wire(link, cx) {
            Poll::Ready(Ok(())) => Pin::new(&mut link.tcp).poll_flush(cx),
            other => other,
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.borrow_mut().tcp).poll_close(cx)
    }
}

/// The most one read takes.
pub const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    /// Where every read of this thread lands first (see
    /// [`SharedStream::read_append`]).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_LEN].into_boxed_slice());
}

/// What [`read_more`] got.
#[derive(Debug)]
pub enum ReadMore {
    /// This many bytes were appended.
    Data(usize),
    /// The peer closed its side.
    Eof,
    /// `interrupt` resolved first; nothing was read.
    Interrupted,
    Err(io::Error),
}

/// Read up to `want` more bytes onto the end of `buf`, unless `interrupt`
/// resolves first. Whatever happens, `buf` then holds exactly the bytes
/// read so far (glommio's reads are readiness-based: an interrupted read
/// consumes nothing).
pub async fn read_more(
    stream: &SharedStream,
    buf: &mut BytesMut,
    want: usize,
    interrupt: impl std::future::Future<Output = ()>,
) -> ReadMore {
    // One poll function rather than `or` of two async blocks: this future
    // sits in every idle connection's task (216 bytes as `or`).
    let mut interrupt = std::pin::pin!(interrupt);
    std::future::poll_fn(|cx| match stream.poll_append(cx, buf, want) {
        Poll::Ready(Ok(0)) => Poll::Ready(ReadMore::Eof),
        Poll::Ready(Ok(n)) => Poll::Ready(ReadMore::Data(n)),
        Poll::Ready(Err(e)) => Poll::Ready(ReadMore::Err(e)),
        Poll::Pending => interrupt.as_mut().poll(cx).map(|()| ReadMore::Interrupted),
    })
    .await
}

/// [`read_more`] interrupted by a [`Notify`], as a plain struct: this is
/// what every idle client connection's task waits in, so its size is paid
/// per connection (32 bytes against 128 for the generic `async fn`).
pub struct ReadOrNotified<'a> {
    stream: &'a SharedStream,
    buf: &'a mut BytesMut,
    want: usize,
    notify: &'a Notify,
}

/// Read as [`read_more`] does, unless `notify` is notified first.
pub fn read_or_notified<'a>(
    stream: &'a SharedStream,
    buf: &'a mut BytesMut,
    want: usize,
    notify: &'a Notify,
) -> ReadOrNotified<'a> {
    ReadOrNotified {
        stream,
        buf,
        want,
        notify,
    }
}

impl std::future::Future for ReadOrNotified<'_> {
    type Output = ReadMore;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<ReadMore> {
        let this = self.get_mut();
        match this.stream.poll_append(cx, this.buf, this.want) {
            Poll::Ready(Ok(0)) => Poll::Ready(ReadMore::Eof),
            Poll::Ready(Ok(n)) => Poll::Ready(ReadMore::Data(n)),
            Poll::Ready(Err(e)) => Poll::Ready(ReadMore::Err(e)),
            Poll::Pending => this
                .notify
                .poll_notified(cx)
                .map(|()| ReadMore::Interrupted),
        }
    }
}

/// One non-blocking `send` of `buf` on `fd` (no SIGPIPE): how much the
/// socket took, or `WouldBlock` when it took nothing.
pub fn send_now(fd: std::os::fd::RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; a bad fd is an error
    // return, not undefined behaviour.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
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
    /// Bytes ever queued, and ever written: offsets into the stream.
    pushed_total: Cell<u64>,
    written_total: Cell<u64>,
}

impl Outbound {
    pub fn new() -> Outbound {
        Outbound::default()
    }

    /// Encode into the queue with `f`, then wake the writer.
    pub fn push(&self, f: impl FnOnce(&mut BytesMut)) {
        let mut buf = self.buf.borrow_mut();
        let before = buf.len();
        f(&mut buf);
        let added = buf.len().saturating_sub(before) as u64;
        self.pushed_total.set(self.pushed_total.get() + added);
        self.wake.notify();
    }

    /// Stream offset just past everything queued so far.
    pub fn pushed_total(&self) -> u64 {
        self.pushed_total.get()
    }

    /// Stream offset just past everything written so far.
    pub fn written_total(&self) -> u64 {
        self.written_total.get()
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
        let mut buf = self.buf.borrow_mut();
        self.pushed_total
            .set(self.pushed_total.get() - buf.len() as u64);
        buf.clear();
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
                    // Through a wire (TLS, WebSocket) the write encodes and
                    // the flush sends what the socket did not take at once.
                    let r = match sink.write_all(&batch).await {
                        Ok(()) => sink.flush().await,
                        e => e,
                    };
                    self.in_write.set(0);
                    if r.is_ok() {
                        self.written_total
                            .set(self.written_total.get() + batch.len() as u64);
                    }
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

/// One place under a process-wide cap (client or HTTP connections), given
/// back when dropped, wherever the connection ends: closed, refused, or
/// lost in a hand-off.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Take a place if fewer than `max` are taken.
    pub fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        if counter.fetch_add(1, Ordering::AcqRel) >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(counter.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_and_given_back() {
        let c = Arc::new(AtomicUsize::new(0));
        let a = Slot::take(&c, 2).expect("first");
        let b = Slot::take(&c, 2).expect("second");
        assert!(Slot::take(&c, 2).is_none());
        drop(a);
        let _c2 = Slot::take(&c, 2).expect("after a drop");
        drop(b);
        assert_eq!(c.load(Ordering::Acquire), 1);
    }
}
