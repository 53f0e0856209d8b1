//! Per-branch wake-ups for a task that runs several futures side by side (one connection's
//! reader, send loop and cancellation).
//!
//! `tokio::join!`/`select!` hand every branch the task's own waker, so whatever woke the task
//! (a readable socket, a packet for the send loop), every branch is polled again: the idle
//! reader re-checks its socket and cancellation, the idle send loop re-registers with its
//! `Notify` and cancellation token. With thousands of connections each woken for one packet,
//! those idle polls touch cold cache lines and take locks for nothing. Here each branch gets a
//! waker of its own that sets its bit in [`WakeFlags`] before waking the task, and the task
//! polls only the branches whose bit is set ([`WakeFlags::take_woken`]).
//!
//! The branch wakers cost no allocation: each is the owner's `Arc` with the branch number in
//! the low bits of the pointer (the owner is at least 4-byte aligned), so a connection holds
//! one [`WakeFlags`] (two words) and nothing else. No well-kept crate offers per-branch wakers
//! without an allocation per branch, hence the small `RawWaker` vtable below.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, RawWaker, RawWakerVTable, Waker};

use futures_util::task::AtomicWaker;

/// Branch numbers fit in these low pointer bits.
const TAG_MASK: usize = 0b11;
/// Every branch bit (a fresh [`WakeFlags`] polls every branch once).
const ALL: u8 = (1 << (TAG_MASK + 1)) - 1;

/// Which branches were woken since the task last looked, and the task's waker.
#[derive(Debug)]
pub(crate) struct WakeFlags {
    woken: AtomicU8,
    task: AtomicWaker,
}

impl Default for WakeFlags {
    fn default() -> Self {
        Self { woken: AtomicU8::new(ALL), task: AtomicWaker::new() }
    }
}

impl WakeFlags {
    /// Registers the task's waker, then returns (and clears) the bits of the branches woken
    /// since the last call. Registering first means a branch woken after the swap wakes the
    /// task again, so no wake-up is lost.
    #[inline]
    pub(crate) fn take_woken(&self, cx: &Context<'_>) -> u8 {
        self.task.register(cx.waker());
        self.woken.swap(0, Ordering::AcqRel)
    }

    #[inline]
    fn wake_branch(&self, branch: usize) {
        self.woken.fetch_or(1 << branch, Ordering::AcqRel);
        self.task.wake();
    }
}

/// Something shared through an `Arc` that carries [`WakeFlags`].
pub(crate) trait HasWakeFlags: Send + Sync + 'static {
    /// The owner's flags.
    fn wake_flags(&self) -> &WakeFlags;
}

/// The bit [`WakeFlags::take_woken`] reports for `branch`.
pub(crate) const fn bit(branch: usize) -> u8 {
    1 << branch
}

/// A waker for `branch` (0..=3) of the task whose flags `owner` carries: waking it sets the
/// branch's bit and wakes the task. It keeps `owner` alive like an `Arc` clone.
pub(crate) fn branch_waker<T: HasWakeFlags>(owner: &Arc<T>, branch: usize) -> Waker {
    const { assert!(std::mem::align_of::<T>() > TAG_MASK, "owner too weakly aligned for tagging") };
    assert!(branch <= TAG_MASK, "branch {branch} out of range");
    let ptr = Arc::into_raw(owner.clone()) as usize | branch;
    // SAFETY: `ptr` is an `Arc<T>` pointer (its low bits are free: T's alignment exceeds the
    // mask) tagged with the branch; the vtable below untags it and keeps the strong count
    // balanced: one count per live waker.
    unsafe { Waker::from_raw(RawWaker::new(ptr as *const (), &Vtable::<T>::VTABLE)) }
}

struct Vtable<T>(PhantomData<T>);

impl<T: HasWakeFlags> Vtable<T> {
    const VTABLE: RawWakerVTable =
        RawWakerVTable::new(Self::clone, Self::wake, Self::wake_by_ref, Self::drop);

    fn untag(data: *const ()) -> (*const T, usize) {
        let v = data as usize;
        ((v & !TAG_MASK) as *const T, v & TAG_MASK)
    }

    unsafe fn clone(data: *const ()) -> RawWaker {
        let (ptr, _) = Self::untag(data);
        // SAFETY: `ptr` came from `Arc::into_raw` and this waker holds one count, so the Arc
        // is alive; the new waker gets a count of its own.
        unsafe { Arc::increment_strong_count(ptr) };
        RawWaker::new(data, &Self::VTABLE)
    }

    unsafe fn wake(data: *const ()) {
        // SAFETY: as `wake_by_ref`, then this waker's count is released.
        unsafe {
            Self::wake_by_ref(data);
            Self::drop(data);
        }
    }

    unsafe fn wake_by_ref(data: *const ()) {
        let (ptr, branch) = Self::untag(data);
        // SAFETY: this waker holds a count, so `*ptr` is alive.
        unsafe { (*ptr).wake_flags().wake_branch(branch) };
    }

    unsafe fn drop(data: *const ()) {
        let (ptr, _) = Self::untag(data);
        // SAFETY: releases the count this waker held.
        unsafe { Arc::decrement_strong_count(ptr) };
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;

    use super::*;

    #[derive(Default)]
    struct Owner {
        flags: WakeFlags,
        dropped: Option<Arc<AtomicUsize>>,
    }

    impl HasWakeFlags for Owner {
        fn wake_flags(&self) -> &WakeFlags {
            &self.flags
        }
    }

    impl Drop for Owner {
        fn drop(&mut self) {
            if let Some(d) = &self.dropped {
                d.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    #[test]
    fn wakers_keep_the_owner_alive_and_release_it() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let owner = Arc::new(Owner { flags: WakeFlags::default(), dropped: Some(dropped.clone()) });
        let w = branch_waker(&owner, 2);
        let w2 = w.clone();
        assert_eq!(Arc::strong_count(&owner), 3);
        drop(owner);
        w.wake_by_ref();
        w.wake();
        assert_eq!(dropped.load(Ordering::SeqCst), 0, "a waker still holds it");
        drop(w2);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn only_woken_branches_are_reported_and_the_task_is_woken() {
        let owner = Arc::new(Owner::default());
        let wakers: Vec<Waker> = (0..3).map(|b| branch_waker(&owner, b)).collect();
        let mut polls = 0;
        let mut seen = Vec::new();
        let task = {
            let owner = owner.clone();
            poll_fn(move |cx| {
                polls += 1;
                let woken = owner.flags.take_woken(cx);
                seen.push(woken);
                match polls {
                    1 => assert_eq!(woken, ALL, "a fresh task polls every branch"),
                    2 => assert_eq!(woken, bit(1)),
                    _ => {
                        assert_eq!(woken, bit(0) | bit(2));
                        return Poll::Ready(seen.clone());
                    }
                }
                Poll::Pending
            })
        };
        let handle = tokio::spawn(task);
        tokio::task::yield_now().await;
        wakers[1].wake_by_ref();
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        wakers[0].wake_by_ref();
        let by_value = wakers[2].clone();
        by_value.wake();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), handle)
            .await
            .expect("the task was woken")
            .unwrap();
        assert_eq!(seen, vec![ALL, bit(1), bit(0) | bit(2)]);
    }
}
