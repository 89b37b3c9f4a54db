//! The deadlines of pending requests, in the order they fall due.
//!
//! Almost every request gets the same timeout, so deadlines arrive in
//! order: the queue is a `VecDeque` where a push is an append and the next
//! to fall due is the front (a `BinaryHeap` cost 3% of the relay's CPU
//! sifting entries that were already in order). The rare earlier one (a
//! retry keeps its first deadline; a reload may shorten the timeout) is
//! placed by binary search.

use super::BackendConn;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Instant;

/// The deadline of one pending request.
pub(super) struct Deadline {
    pub(super) at: Instant,
    pub(super) conn: Rc<BackendConn>,
    pub(super) req_id: u32,
    pub(super) ticket: u64,
}

/// Something that falls due at an instant.
pub(super) trait Due {
    fn due(&self) -> Instant;
}

impl Due for Deadline {
    fn due(&self) -> Instant {
        self.at
    }
}

/// Entries sorted by when they fall due, ties in the order they were pushed.
pub(super) struct DeadlineQueue<T = Deadline> {
    q: VecDeque<T>,
}

impl<T> Default for DeadlineQueue<T> {
    fn default() -> Self {
        DeadlineQueue { q: VecDeque::new() }
    }
}

impl<T: Due> DeadlineQueue<T> {
    pub(super) fn push(&mut self, d: T) {
        let at = d.due();
        if self.q.back().is_none_or(|b| b.due() <= at) {
            self.q.push_back(d);
        } else {
            let i = self.q.partition_point(|x| x.due() <= at);
            self.q.insert(i, d);
        }
    }

    pub(super) fn peek(&self) -> Option<&T> {
        self.q.front()
    }

    pub(super) fn pop(&mut self) -> Option<T> {
        self.q.pop_front()
    }

    pub(super) fn len(&self) -> usize {
        self.q.len()
    }

    /// Keeps the entries `keep` says yes to, in order.
    pub(super) fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        self.q.retain(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    impl Due for (Instant, u32) {
        fn due(&self) -> Instant {
            self.0
        }
    }

    #[test]
    fn pops_in_due_order_ties_first_pushed_first() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut q = DeadlineQueue::default();
        // In order, then an earlier one, a tie, and one before everything.
        for (i, ms) in [10, 20, 30, 15, 20, 5, 30].into_iter().enumerate() {
            q.push((at(ms), i as u32));
        }
        assert_eq!(q.len(), 7);
        assert_eq!(q.peek().map(|d| d.1), Some(5));
        let mut out = Vec::new();
        while let Some(d) = q.pop() {
            out.push(d.1);
        }
        assert_eq!(out, vec![5, 0, 3, 1, 4, 2, 6]);
    }

    #[test]
    fn retain_keeps_the_order() {
        let t0 = Instant::now();
        let mut q = DeadlineQueue::default();
        for i in 0..10u32 {
            q.push((t0 + Duration::from_millis(u64::from(10 - i)), i));
        }
        q.retain(|d| d.1 % 2 == 0);
        let mut out = Vec::new();
        while let Some(d) = q.pop() {
            out.push(d.1);
        }
        assert_eq!(out, vec![8, 6, 4, 2, 0]);
    }
}
