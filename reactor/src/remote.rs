//! Awaiting, on one reactor, a future that runs on another: [`ReactorHandle::run`] spawns it
//! there and returns a [`RemoteJoin`] that completes here with its output, woken across
//! threads. If the other reactor drops the task unfinished (it stopped), the join completes
//! with `None` rather than waiting forever.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use crate::reactor::ReactorHandle;

struct State<T> {
    value: Option<T>,
    /// The task is gone: finished (value set) or dropped unfinished.
    gone: bool,
    waker: Option<Waker>,
}

type Shared<T> = Arc<Mutex<State<T>>>;

/// The output of a future running on another reactor.
pub struct RemoteJoin<T> {
    state: Shared<T>,
}

impl<T> Future for RemoteJoin<T> {
    type Output = Option<T>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.gone {
            return Poll::Ready(s.value.take());
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// Marks the task gone when it ends, finished or dropped.
struct Finish<T>(Shared<T>);

impl<T> Drop for Finish<T> {
    fn drop(&mut self) {
        let w = {
            let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
            s.gone = true;
            s.waker.take()
        };
        if let Some(w) = w {
            w.wake();
        }
    }
}

impl ReactorHandle {
    /// Run the future made by `make` on this reactor and await its output from any other
    /// reactor (`None` if this reactor dropped it unfinished).
    pub fn run<F, Fut, T>(&self, make: F) -> RemoteJoin<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let state = Arc::new(Mutex::new(State { value: None, gone: false, waker: None }));
        let finish = Finish(state.clone());
        self.spawn(move || async move {
            let v = make().await;
            finish.0.lock().unwrap_or_else(|e| e.into_inner()).value = Some(v);
            drop(finish);
        });
        RemoteJoin { state }
    }
}
