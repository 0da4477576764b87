//! Connections spread over several reactors (`basalt-nbd --reactors=N`): the reactor that
//! accepts hands each new connection to the next reactor in turn (itself included), and that
//! reactor serves it to the end with its own view of the export
//! ([`super::server::ExportSpec::export`]: a queue and a chain of its own on the shared node,
//! as every reactor that opens a node gets).
//! Nothing of a connection crosses reactors after the hand-off; a node's drivers keep their
//! shared state consistent across reactors (the engine's contract for `create_queue`).
//!
//! Each helper reactor keeps its [`Offer`] in a thread-local, set when it starts and taken
//! back before it stops (`Spread::stop`), so nothing of the export outlives the reactor it
//! belongs to. The storage daemon's iothreads ([`super::iothread`]) keep theirs there too.

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;

use basalt_drivers::nbd::tls::ServerTls;
use basalt_engine::Authz;
use basalt_reactor::{ReactorHandle, Runtime};

use super::server::{ExportSpec, Offer};

thread_local! {
    static OFFER: RefCell<Option<Rc<Offer>>> = const { RefCell::new(None) };
}

/// This reactor's offer, if it has one.
pub(crate) fn local_offer() -> Option<Rc<Offer>> {
    OFFER.with(|o| o.borrow().clone())
}

/// Set (or, with `None`, take back) this reactor's offer.
pub(crate) fn set_local_offer(offer: Option<Rc<Offer>>) {
    let old = OFFER.with(|o| std::mem::replace(&mut *o.borrow_mut(), offer));
    drop(old);
}

/// The helper reactors, and whose turn the next connection is.
pub(crate) struct Spread {
    rt: RefCell<Option<Runtime>>,
    handles: Vec<ReactorHandle>,
    next: Cell<usize>,
}

impl Spread {
    /// Start `n` helper reactors, each with its own view of the export, offered with `tls`
    /// and `authz`.
    pub async fn start(n: usize, spec: &ExportSpec, tls: Option<ServerTls>, authz: Option<Arc<Authz>>) -> Result<Spread, String> {
        let rt = crate::server_reactors(n).map_err(|e| format!("Cannot start {n} more reactors: {e}"))?;
        for i in 0..n {
            let (spec, tls, authz) = (spec.clone(), tls.clone(), authz.clone());
            let built = rt
                .handle(i)
                .run(move || async move {
                    let offer = Rc::new(Offer { exports: vec![spec.export(Vec::new())?], tls, authz });
                    set_local_offer(Some(offer));
                    Ok::<(), String>(())
                })
                .await;
            built.unwrap_or_else(|| Err("a reactor stopped while starting".into()))?;
        }
        let handles = (0..n).map(|i| rt.handle(i).clone()).collect();
        Ok(Spread { rt: RefCell::new(Some(rt)), handles, next: Cell::new(0) })
    }

    /// The reactor to serve the next connection: `None` for the accepting reactor itself.
    pub fn pick(&self) -> Option<&ReactorHandle> {
        let i = self.next.get();
        self.next.set((i + 1) % (self.handles.len() + 1));
        i.checked_sub(1).map(|h| &self.handles[h])
    }

    /// Stop the helper reactors (their connections end with them), after taking their
    /// offers back on each.
    pub async fn stop(&self) {
        let Some(rt) = self.rt.borrow_mut().take() else { return };
        for h in &self.handles {
            h.run(|| async { set_local_offer(None) }).await;
        }
        drop(rt);
    }
}

/// Serve `fd` on reactor `h` with that reactor's offer; `done` runs there once the
/// connection has ended. Client errors are reported with `who`.
pub(crate) fn serve_on(h: &ReactorHandle, fd: OwnedFd, who: &'static str, done: impl FnOnce() + Send + 'static) {
    h.send(move || {
        let Some(offer) = local_offer() else {
            // Stopping: the connection is dropped unserved.
            done();
            return;
        };
        super::spawn_serve(fd, offer, who, done);
    });
}
