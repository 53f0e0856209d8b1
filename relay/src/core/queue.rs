//! A bounded FIFO that never blocks its producers (spec §1.5).
//!
//! Many reader tasks push into one connection's queue; that connection's writer pops. Pushing
//! when full either evicts the oldest item (`push_drop_head`, derper's `queue_head` policy for
//! packets: the newest data is the most useful) or refuses the new one (`try_push`, for control
//! frames whose order matters). A short `parking_lot` mutex guards a `VecDeque` that grows lazily,
//! so a connection that never receives anything owns no queue memory at all. The length is
//! mirrored in an atomic so the consumer can see "empty" without taking the lock: the send loop
//! looks at four queues per pass and most are empty (a producer's push is always followed by
//! a wake-up of the consumer, which then looks again).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;

/// A bounded, non-blocking multi-producer queue.
#[derive(Debug)]
pub(crate) struct BoundedQueue<T> {
    items: Mutex<VecDeque<T>>,
    /// `items.len()`, stored under the lock after every change.
    len: AtomicU32,
    cap: u32,
}

impl<T> BoundedQueue<T> {
    /// An empty queue holding at most `cap` items (at least 1).
    pub(crate) fn new(cap: usize) -> Self {
        let cap = u32::try_from(cap).unwrap_or(u32::MAX).max(1);
        Self { items: Mutex::new(VecDeque::new()), len: AtomicU32::new(0), cap }
    }

    /// The capacity.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.cap as usize
    }

    #[inline]
    fn publish_len(&self, q: &VecDeque<T>) {
        self.len.store(q.len() as u32, Ordering::Release);
    }

    /// True when nothing is queued, without taking the lock (a push racing with this call may
    /// not be seen; its producer wakes the consumer afterwards).
    #[inline]
    pub(crate) fn looks_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// Appends `item`; when full, first removes and returns the oldest item.
    #[inline]
    pub(crate) fn push_drop_head(&self, item: T) -> Option<T> {
        let mut q = self.items.lock();
        let evicted = if q.len() >= self.cap as usize { q.pop_front() } else { None };
        q.push_back(item);
        self.publish_len(&q);
        evicted
    }

    /// Appends `item` unless the queue is full, in which case `item` is handed back.
    #[inline]
    pub(crate) fn try_push(&self, item: T) -> Result<(), T> {
        let mut q = self.items.lock();
        if q.len() >= self.cap as usize {
            return Err(item);
        }
        q.push_back(item);
        self.publish_len(&q);
        Ok(())
    }

    /// Appends every item of `items` that fits; returns how many did not.
    pub(crate) fn try_push_all(&self, items: impl IntoIterator<Item = T>) -> usize {
        let mut q = self.items.lock();
        let mut refused = 0;
        for item in items {
            if q.len() >= self.cap as usize {
                refused += 1;
            } else {
                q.push_back(item);
            }
        }
        self.publish_len(&q);
        refused
    }

    /// Removes the oldest item.
    #[inline]
    pub(crate) fn pop(&self) -> Option<T> {
        if self.looks_empty() {
            return None;
        }
        let mut q = self.items.lock();
        let item = q.pop_front();
        self.publish_len(&q);
        item
    }

    /// Number of queued items.
    pub(crate) fn len(&self) -> usize {
        self.items.lock().len()
    }

    /// True when nothing is queued.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.items.lock().is_empty()
    }

    /// Removes everything (used when the connection closes, to count the losses).
    pub(crate) fn take_all(&self) -> VecDeque<T> {
        let mut q = self.items.lock();
        self.len.store(0, Ordering::Release);
        std::mem::take(&mut *q)
    }

    /// Releases the storage of an empty queue (called from time to time on idle connections).
    pub(crate) fn shrink_if_empty(&self) {
        let mut q = self.items.lock();
        if q.is_empty() && q.capacity() > 0 {
            *q = VecDeque::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_drop_evicts_oldest_and_keeps_order() {
        let q = BoundedQueue::new(3);
        for i in 0..3 {
            assert_eq!(q.push_drop_head(i), None);
        }
        assert_eq!(q.push_drop_head(3), Some(0));
        assert_eq!(q.push_drop_head(4), Some(1));
        assert_eq!(q.len(), 3);
        assert_eq!((q.pop(), q.pop(), q.pop(), q.pop()), (Some(2), Some(3), Some(4), None));
    }

    #[test]
    fn try_push_refuses_when_full() {
        let q = BoundedQueue::new(2);
        assert!(q.try_push(1).is_ok());
        assert!(q.try_push(2).is_ok());
        assert_eq!(q.try_push(3), Err(3));
        assert_eq!(q.try_push_all([4, 5]), 2);
        q.pop();
        assert_eq!(q.try_push_all([6, 7]), 1);
        assert_eq!(q.take_all().into_iter().collect::<Vec<_>>(), vec![2, 6]);
        assert!(q.is_empty());
    }

    #[test]
    fn emptiness_is_visible_without_the_lock() {
        let q = BoundedQueue::new(2);
        assert!(q.looks_empty());
        q.push_drop_head(1);
        q.push_drop_head(2);
        q.push_drop_head(3);
        assert!(!q.looks_empty());
        assert_eq!(q.len.load(Ordering::Relaxed), 2);
        q.pop();
        q.pop();
        assert!(q.looks_empty());
        assert_eq!(q.pop(), None);
        assert!(q.try_push(4).is_ok());
        assert!(!q.looks_empty());
        q.take_all();
        assert!(q.looks_empty());
    }

    #[test]
    fn idle_queue_releases_memory() {
        let q = BoundedQueue::new(32);
        for i in 0..32 {
            q.push_drop_head(i);
        }
        while q.pop().is_some() {}
        q.shrink_if_empty();
        assert_eq!(q.items.lock().capacity(), 0);
        assert_eq!(q.capacity(), 32);
    }
}
