//! The cross-shard mesh: every shard sends typed messages to every shard
//! without ever blocking the sender.
//!
//! Each shard has one bounded inbox (a flume channel). A send first tries the
//! peer's inbox; when it is full the message joins a per-peer backlog owned
//! by the sending shard, and one background task per peer moves the backlog
//! into the inbox as room appears. Once a backlog exists every later message
//! to that peer queues behind it, so order per (sender, receiver) pair holds.
//! This is what keeps the actor design free of deadlock (glommio issue 555):
//! a shard holding state never awaits a peer.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

/// Why a message could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    #[error("no shard {0}")]
    NoSuchShard(usize),
    #[error("shard {0} has stopped receiving")]
    Closed(usize),
}

/// Counters of one shard's sending side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Messages handed to a peer's inbox or backlog.
    pub sent: u64,
    /// Messages that found the peer's inbox full and waited in the backlog.
    pub spilled: u64,
    /// Messages waiting in backlogs now.
    pub backlog: u64,
}

struct Peer<M> {
    tx: flume::Sender<M>,
    backlog: RefCell<VecDeque<M>>,
    /// A drain task is running (or about to): new messages must queue.
    draining: Cell<bool>,
}

/// The sending side of the mesh, owned by one shard (not `Send`).
pub struct Mesh<M: Send + 'static> {
    me: usize,
    peers: Rc<Vec<Peer<M>>>,
    sent: Cell<u64>,
    spilled: Rc<Cell<u64>>,
}

impl<M: Send + 'static> Mesh<M> {
    pub(crate) fn new(me: usize, txs: Vec<flume::Sender<M>>) -> Mesh<M> {
        let peers = txs
            .into_iter()
            .map(|tx| Peer {
                tx,
                backlog: RefCell::new(VecDeque::new()),
                draining: Cell::new(false),
            })
            .collect();
        Mesh {
            me,
            peers: Rc::new(peers),
            sent: Cell::new(0),
            spilled: Rc::new(Cell::new(0)),
        }
    }

    /// The shard this mesh handle belongs to.
    pub fn me(&self) -> usize {
        self.me
    }

    /// Number of shards in the mesh.
    pub fn count(&self) -> usize {
        self.peers.len()
    }

    /// Send `msg` to shard `to` (itself included). Never blocks and never
    /// awaits: a full inbox makes the message wait in this shard's backlog.
    /// Must be called on the owning shard's executor.
    pub fn send(&self, to: usize, msg: M) -> Result<(), MeshError> {
        let peer = self.peers.get(to).ok_or(MeshError::NoSuchShard(to))?;
        if peer.tx.is_disconnected() {
            return Err(MeshError::Closed(to));
        }
        self.sent.set(self.sent.get() + 1);
        if !peer.draining.get() {
            match peer.tx.try_send(msg) {
                Ok(()) => return Ok(()),
                Err(flume::TrySendError::Disconnected(_)) => return Err(MeshError::Closed(to)),
                Err(flume::TrySendError::Full(m)) => {
                    peer.backlog.borrow_mut().push_back(m);
                    peer.draining.set(true);
                    self.spawn_drain(to);
                }
            }
        } else {
            peer.backlog.borrow_mut().push_back(msg);
        }
        self.spilled.set(self.spilled.get() + 1);
        Ok(())
    }

    fn spawn_drain(&self, to: usize) {
        let peers = self.peers.clone();
        glommio::spawn_local(async move {
            let peer = &peers[to];
            loop {
                // Take the front without holding the borrow across the await.
                let next = peer.backlog.borrow_mut().pop_front();
                let Some(msg) = next else { break };
                if peer.tx.send_async(msg).await.is_err() {
                    // The peer stopped: nothing will ever read what is left.
                    peer.backlog.borrow_mut().clear();
                    break;
                }
            }
            peer.draining.set(false);
        })
        .detach();
    }

    /// Resolves once every backlog of this shard is empty.
    pub async fn flushed(&self) {
        while self.peers.iter().any(|p| p.draining.get()) {
            glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Counters of this shard's sending side.
    pub fn stats(&self) -> MeshStats {
        MeshStats {
            sent: self.sent.get(),
            spilled: self.spilled.get(),
            backlog: self
                .peers
                .iter()
                .map(|p| p.backlog.borrow().len() as u64)
                .sum(),
        }
    }
}
