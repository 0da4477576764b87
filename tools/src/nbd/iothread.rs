//! The storage daemon's `iothread` objects: `--object iothread,id=ID[,poll-max-ns=N]` is a
//! reactor of its own, started when the first export names it (`--export ...,iothread=ID`).
//! As in QEMU, a connection is negotiated where it was accepted; once the client picks an
//! export that lives on an iothread, the connection moves there
//! ([`super::server::serve`]) and that reactor serves its requests with its own view of the
//! export (a queue and a chain of its own on the shared node, bitmaps read there). Exports on
//! different iothreads are served on different cores.
//!
//! Guarantees: an iothread's views live and die on its reactor (set when an export is placed,
//! taken back by [`IoThreads::stop`] before the reactor stops, so its connections end before
//! the daemon flushes and closes the nodes).

use std::rc::Rc;

use basalt_engine::IoThread;
use basalt_reactor::{ReactorHandle, Runtime};

use super::server::{ExportSpec, Offer};
use super::spread::{local_offer, set_local_offer};

/// The iothreads started so far, by id.
#[derive(Default)]
pub(crate) struct IoThreads {
    started: Vec<(String, Runtime)>,
}

impl IoThreads {
    /// The reactor of iothread `id` (defined as `t`), started on first use.
    pub fn handle(&mut self, id: &str, t: IoThread) -> Result<ReactorHandle, String> {
        if let Some((_, rt)) = self.started.iter().find(|(i, _)| i == id) {
            return Ok(rt.handle(0).clone());
        }
        let rt = crate::iothread_reactor(id, t.poll_max_ns).map_err(|e| format!("Cannot start iothread '{id}': {e}"))?;
        let h = rt.handle(0).clone();
        self.started.push((id.to_string(), rt));
        Ok(h)
    }

    /// Build the export's view on the iothread `h` (with `bitmaps` read there) and offer it
    /// to the connections that move there.
    pub async fn place(&self, h: &ReactorHandle, spec: ExportSpec, bitmaps: Vec<String>) -> Result<(), String> {
        let spec = ExportSpec { home: None, ..spec };
        h.run(move || async move {
            let mut b = Vec::with_capacity(bitmaps.len());
            for name in &bitmaps {
                b.push(super::export_bitmap(&spec.node, name).await?);
            }
            let exp = spec.export(b)?;
            let mut exports = local_offer().map(|o| o.exports.clone()).unwrap_or_default();
            exports.push(exp);
            set_local_offer(Some(Rc::new(Offer { exports, tls: None, authz: None })));
            Ok(())
        })
        .await
        .unwrap_or_else(|| Err("the iothread stopped".into()))
    }

    /// Take every iothread's views back and stop the iothreads (their connections end).
    pub async fn stop(&mut self) {
        for (_, rt) in &self.started {
            rt.handle(0).run(|| async { set_local_offer(None) }).await;
        }
        self.started.clear();
    }
}
