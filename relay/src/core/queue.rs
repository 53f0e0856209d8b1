//! A bounded FIFO that never blocks its producers (spec §1.5).
//!
//! Many reader tasks push into one connection's queue; that connection's writer pops. Pushing
//! when full either evicts the oldest item (`push_drop_head`, derper's `queue_head` policy for
//! packets: the newest data is the most useful) or refuses the new one (`try_push`, for control
//! frames whose order matters). A short `parking_lot` mutex guards a `VecDeque` that grows lazily,
//! so a connection that never receives anything owns no queue memory at all.

use std::collections::VecDeque;

use parking_lot::Mutex;

/// A bounded, non-blocking multi-producer queue.
#[derive(Debug)]
pub(crate) struct BoundedQueue<T> {
    items: Mutex<VecDeque<T>>,
    cap: usize,
}

impl<T> BoundedQueue<T> {
    /// An empty queue holding at most `cap` items (at least 1).
    pub(crate) fn new(cap: usize) -> Self {
        Self { items: Mutex::new(VecDeque::new()), cap: cap.max(1) }
    }

    /// The capacity.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Appends `item`; when full, first removes and returns the oldest item.
    #[inline]
    pub(crate) fn push_drop_head(&self, item: T) -> Option<T> {
        let mut q = self.items.lock();
        let evicted = if q.len() >= self.cap { q.pop_front() } else { None };
        q.push_back(item);
        evicted
    }

    /// Appends `item` unless the queue is full, in which case `item` is handed back.
    #[inline]
    pub(crate) fn try_push(&self, item: T) -> Result<(), T> {
        let mut q = self.items.lock();
        if q.len() >= self.cap {
            return Err(item);
        }
        q.push_back(item);
        Ok(())
    }

    /// Appends every item of `items` that fits; returns how many did not.
    pub(crate) fn try_push_all(&self, items: impl IntoIterator<Item = T>) -> usize {
        let mut q = self.items.lock();
        let mut refused = 0;
        for item in items {
            if q.len() >= self.cap {
                refused += 1;
            } else {
                q.push_back(item);
            }
        }
        refused
    }

    /// Removes the oldest item.
    #[inline]
    pub(crate) fn pop(&self) -> Option<T> {
        self.items.lock().pop_front()
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
        std::mem::take(&mut *self.items.lock())
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
