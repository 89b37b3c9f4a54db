//! Live binary upgrade (issue 20): the running gateway hands its listening
//! sockets, then its live sessions, to a new process over a Unix socket
//! ([`channel`]), so that an upgrade drops no connection.
//!
//! What is here so far: the channel (framed rkyv messages with a checksum
//! and the descriptors passed with them) and the listeners a gateway can
//! start on instead of binding ([`Inherited`]), with their accept loops
//! gated until the old process stops accepting. The hand-over of sessions
//! and the trigger (`SIGUSR2`, `POST /v1/upgrade`) build on these.

pub mod channel;

use std::os::fd::OwnedFd;

/// Listening sockets a gateway starts on instead of binding its own: the
/// old process's, passed over the channel. Each is given to shard
/// `shard % shards` of the new process; a shard that gets none of a port
/// binds its own SO_REUSEPORT socket on the same address (it joins the
/// group the inherited sockets are in).
#[derive(Debug, Default)]
pub struct Inherited {
    pub listeners: Vec<(channel::ListenerImage, OwnedFd)>,
}

impl Inherited {
    /// The inherited sockets of `port` that shard `shard` of `shards` takes.
    pub fn take(&mut self, port: u8, shard: usize, shards: usize) -> Vec<OwnedFd> {
        let mut out = Vec::new();
        let mut keep = Vec::new();
        for (img, fd) in self.listeners.drain(..) {
            if img.port == port && img.shard as usize % shards.max(1) == shard {
                out.push(fd);
            } else {
                keep.push((img, fd));
            }
        }
        self.listeners = keep;
        out
    }

    /// The local address of the first inherited socket of `port`.
    pub fn addr(&self, port: u8) -> Option<std::net::SocketAddr> {
        self.listeners
            .iter()
            .find(|(img, _)| img.port == port)
            .and_then(|(_, fd)| {
                let sock = socket2::SockRef::from(fd);
                sock.local_addr().ok()?.as_socket()
            })
    }
}
