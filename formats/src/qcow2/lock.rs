//! An async mutex that is `Send + Sync`: allocation and metadata updates of a qcow2 node are
//! serialised through it, while lookups of cached mappings never take it. Waiters are woken in
//! order; the guard releases on drop.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Poll, Waker};

#[derive(Default)]
pub(crate) struct AsyncLock {
    state: Mutex<(bool, VecDeque<Waker>)>,
}

pub(crate) struct AsyncLockGuard<'a> {
    lock: &'a AsyncLock,
}

impl AsyncLock {
    pub(crate) async fn lock(&self) -> AsyncLockGuard<'_> {
        std::future::poll_fn(|cx| {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.0 {
                s.1.push_back(cx.waker().clone());
                Poll::Pending
            } else {
                s.0 = true;
                Poll::Ready(())
            }
        })
        .await;
        AsyncLockGuard { lock: self }
    }
}

impl Drop for AsyncLockGuard<'_> {
    fn drop(&mut self) {
        let waiters: Vec<Waker> = {
            let mut s = self.lock.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = false;
            s.1.drain(..).collect()
        };
        for w in waiters {
            w.wake();
        }
    }
}
