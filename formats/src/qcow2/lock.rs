//! An async mutex that is `Send + Sync` and fair: allocation and metadata updates of a qcow2
//! node are serialised through it in the order they asked (a ticket lock), while lookups of
//! cached mappings never take it. The guard releases on drop.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Poll, Waker};

#[derive(Default)]
struct State {
    next: u64,
    serving: u64,
    waiters: VecDeque<(u64, Waker)>,
}

#[derive(Default)]
pub(crate) struct AsyncLock {
    state: Mutex<State>,
}

pub(crate) struct AsyncLockGuard<'a> {
    lock: &'a AsyncLock,
}

impl AsyncLock {
    pub(crate) async fn lock(&self) -> AsyncLockGuard<'_> {
        let ticket = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.next += 1;
            s.next - 1
        };
        std::future::poll_fn(|cx| {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.serving == ticket {
                Poll::Ready(())
            } else {
                match s.waiters.iter_mut().find(|(t, _)| *t == ticket) {
                    Some(w) => w.1 = cx.waker().clone(),
                    None => s.waiters.push_back((ticket, cx.waker().clone())),
                }
                Poll::Pending
            }
        })
        .await;
        AsyncLockGuard { lock: self }
    }
}

impl Drop for AsyncLockGuard<'_> {
    fn drop(&mut self) {
        let next = {
            let mut s = self.lock.state.lock().unwrap_or_else(|e| e.into_inner());
            s.serving += 1;
            let serving = s.serving;
            let at = s.waiters.iter().position(|(t, _)| *t == serving);
            at.and_then(|i| s.waiters.remove(i)).map(|(_, w)| w)
        };
        if let Some(w) = next {
            w.wake();
        }
    }
}
