//! The deadline of one pending request, ordered for the pool's min-heap.

use super::BackendConn;
use std::rc::Rc;
use std::time::Instant;

/// A deadline of one pending request (ordered for a min-heap).
pub(super) struct Deadline {
    pub(super) at: Instant,
    pub(super) conn: Rc<BackendConn>,
    pub(super) req_id: u32,
    pub(super) ticket: u64,
}

impl PartialEq for Deadline {
    fn eq(&self, o: &Self) -> bool {
        self.at == o.at && self.ticket == o.ticket
    }
}
impl Eq for Deadline {}
impl PartialOrd for Deadline {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Deadline {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Reversed: the earliest deadline is the heap's greatest.
        o.at.cmp(&self.at).then(o.ticket.cmp(&self.ticket))
    }
}
