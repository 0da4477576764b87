//! Connections spread over several reactors (`basalt-nbd --reactors=N`): the reactor that
//! accepts hands each new connection to the next reactor in turn (itself included), and that
//! reactor serves it to the end with its own view of the export ([`ExportSpec::export`]: a
//! queue and a chain of its own on the shared node, as every reactor that opens a node gets).
//! Nothing of a connection crosses reactors after the hand-off; a node's drivers keep their
//! shared state consistent across reactors (the engine's contract for `create_queue`).
//!
//! Each helper reactor keeps its [`Offer`] in a thread-local, set when it starts and taken
//! back before it stops ([`Spread::stop`]), so nothing of the export outlives the reactor it
//! belongs to.

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;

use basalt_drivers::nbd::tls::ServerTls;
use basalt_engine::{Authz, Node, Queue};
use basalt_reactor::{ReactorHandle, Runtime};

use super::bitmap::ExportBitmap;
use super::server::{self, Export, Offer};
use crate::img::common::Chain;

thread_local! {
    static OFFER: RefCell<Option<Rc<Offer>>> = const { RefCell::new(None) };
}

/// What a reactor needs to build its own view of the export (all of it can cross threads).
#[derive(Clone)]
pub(crate) struct ExportSpec {
    pub node: Arc<dyn Node>,
    pub name: String,
    pub description: Option<String>,
    pub read_only: bool,
    pub discard: bool,
    pub detect_zeroes: server::DetectZeroes,
    pub allocation_depth: bool,
    pub multi_conn: bool,
    pub tls: Option<ServerTls>,
    pub authz: Option<Arc<Authz>>,
}

impl ExportSpec {
    /// The export as the current reactor serves it: its own queue and chain on the node.
    pub fn export(&self, bitmaps: Vec<ExportBitmap>) -> Result<Rc<Export>, String> {
        let queue = Queue::new(self.node.clone()).map_err(|e| e.msg)?;
        let chain = Chain::new(self.node.clone())?;
        Ok(Rc::new(Export {
            name: self.name.clone(),
            description: self.description.clone(),
            queue,
            chain,
            size: self.node.size(),
            read_only: self.read_only || self.node.read_only(),
            discard: self.discard,
            detect_zeroes: self.detect_zeroes,
            allocation_depth: self.allocation_depth,
            multi_conn: self.multi_conn,
            bitmaps,
        }))
    }

    /// What the current reactor offers its clients.
    pub fn offer(&self, exp: Rc<Export>) -> Rc<Offer> {
        Rc::new(Offer { exports: vec![exp], tls: self.tls.clone(), authz: self.authz.clone() })
    }
}

/// The helper reactors, and whose turn the next connection is.
pub(crate) struct Spread {
    rt: RefCell<Option<Runtime>>,
    handles: Vec<ReactorHandle>,
    next: Cell<usize>,
}

impl Spread {
    /// Start `n` helper reactors, each with its own view of the export.
    pub async fn start(n: usize, spec: &ExportSpec) -> Result<Spread, String> {
        let rt = crate::server_reactors(n).map_err(|e| format!("Cannot start {n} more reactors: {e}"))?;
        for i in 0..n {
            let spec = spec.clone();
            let built = rt
                .handle(i)
                .run(move || async move {
                    let offer = spec.offer(spec.export(Vec::new())?);
                    OFFER.with(|o| *o.borrow_mut() = Some(offer));
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
            h.run(|| async { drop(OFFER.with(|o| o.borrow_mut().take())) }).await;
        }
        drop(rt);
    }
}

/// Serve `fd` on reactor `h` with that reactor's offer; `done` runs there once the
/// connection has ended. Client errors are reported with `who`.
pub(crate) fn serve_on(h: &ReactorHandle, fd: OwnedFd, who: &'static str, done: impl FnOnce() + Send + 'static) {
    h.send(move || {
        let Some(offer) = OFFER.with(|o| o.borrow().clone()) else {
            // Stopping: the connection is dropped unserved.
            done();
            return;
        };
        basalt_reactor::spawn_local(async move {
            let sock = Rc::new(basalt_drivers::nbd::sock::Sock::new(fd));
            if let Err(e) = server::serve(sock, offer).await {
                eprintln!("{who}: client: {e}");
            }
            done();
        });
    });
}
