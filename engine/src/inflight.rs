//! Requests in flight on every reactor that uses a node, counted so that the node can wait for
//! all of those that may still use a mapping it just changed — before freeing the cluster the
//! old mapping pointed at, for example — without sharing a counter on the data path.
//!
//! Each queue counts its own requests ([`InFlight`], on its own cache line, written only by its
//! reactor) in one of two epochs. [`InFlightGroup::drain`] flips the group's epoch and waits
//! until no queue has requests of the old epoch left. The guarantee, for a caller that changes a
//! mapping and then drains: every request either was counted before the drain looked (and is
//! waited for), or was counted after the flip, and then looks the mapping up after the change
//! (as long as requests are counted *before* their mapping is looked up, and the mapping lives
//! behind a lock or other synchronisation). Drains must not overlap (callers serialise them,
//! as qcow2 does under its allocation lock), or a drain may also wait for newer requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The requests of one queue, per epoch parity; padded so queues never share a cache line.
#[repr(align(128))]
#[derive(Default)]
struct Counts([AtomicUsize; 2]);

/// The queues of one node: the epoch and every queue's counts.
#[derive(Default)]
pub struct InFlightGroup {
    epoch: AtomicUsize,
    queues: Mutex<Vec<Weak<Counts>>>,
}

impl InFlightGroup {
    /// A counter for a new queue (one per reactor).
    pub fn register(self: &Arc<Self>) -> InFlight {
        let counts = Arc::new(Counts::default());
        let mut q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|w| w.strong_count() > 0);
        q.push(Arc::downgrade(&counts));
        InFlight { group: self.clone(), counts }
    }

    /// Wait until every request counted before this call has completed.
    pub async fn drain(&self) {
        let old = self.epoch.fetch_add(1, Ordering::SeqCst) & 1;
        loop {
            let busy = {
                let q = self.queues.lock().unwrap_or_else(|e| e.into_inner());
                q.iter().filter_map(Weak::upgrade).any(|c| c.0[old].load(Ordering::SeqCst) > 0)
            };
            if !busy {
                return;
            }
            basalt_reactor::yield_now().await;
        }
    }
}

/// One queue's count of its requests in flight.
#[derive(Clone)]
pub struct InFlight {
    group: Arc<InFlightGroup>,
    counts: Arc<Counts>,
}

impl InFlight {
    /// Count one request until the guard drops. Enter it before looking up the mapping the
    /// request will use.
    pub fn enter(&self) -> InFlightGuard {
        let e = self.group.epoch.load(Ordering::SeqCst) & 1;
        self.counts.0[e].fetch_add(1, Ordering::SeqCst);
        InFlightGuard { counts: self.counts.clone(), epoch: e }
    }
}

/// Ends its request's count when dropped.
pub struct InFlightGuard {
    counts: Arc<Counts>,
    epoch: usize,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.counts.0[self.epoch].fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_waits_for_requests_counted_before_it_only() {
        let r = basalt_reactor::Reactor::new(basalt_reactor::ReactorConfig::default()).unwrap();
        r.block_on(async {
            let g = Arc::new(InFlightGroup::default());
            let a = g.register();
            let b = g.register();
            let old = a.enter();
            let done = std::rc::Rc::new(std::cell::Cell::new(false));
            let d2 = done.clone();
            let g2 = g.clone();
            let h = basalt_reactor::spawn_local(async move {
                g2.drain().await;
                d2.set(true);
            });
            for _ in 0..5 {
                basalt_reactor::yield_now().await;
            }
            assert!(!done.get(), "the drain must wait for the older request");
            // A request counted after the drain began does not hold it up.
            let newer = b.enter();
            drop(old);
            h.await;
            assert!(done.get());
            drop(newer);
            // Nothing in flight: a drain returns at once.
            g.drain().await;
        });
    }
}
