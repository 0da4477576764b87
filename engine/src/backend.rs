//! [`Backend`]: the handle a user of the engine (a tool, an export, a VMM) issues requests
//! through on one reactor, as QEMU's BlockBackend. It checks requests against the node's size
//! and the backend's read-only flag before they reach the graph, and emulates writethrough
//! caching by flushing after each write.

use std::sync::Arc;

use basalt_reactor::IoBuf;

use crate::error::{BlockResult, IoStatus};
use crate::io::{IoDone, IoFuture};
use crate::node::{BlockStatus, Node, WriteFlags, ZeroFlags};
use crate::queue::Queue;

/// A user's handle to a node on the current reactor.
#[derive(Clone)]
pub struct Backend {
    q: Queue,
    read_only: bool,
    writethrough: bool,
}

impl Backend {
    /// A backend over `node` on the current reactor.
    pub fn new(node: Arc<dyn Node>) -> BlockResult<Backend> {
        let read_only = node.read_only();
        Ok(Backend { q: Queue::new(node)?, read_only, writethrough: false })
    }

    /// Flush after every write (QEMU's `cache=writethrough`).
    pub fn set_writethrough(&mut self, on: bool) {
        self.writethrough = on;
    }

    /// Whether every write is flushed.
    pub fn writethrough(&self) -> bool {
        self.writethrough
    }

    /// The root node.
    pub fn node(&self) -> &Arc<dyn Node> {
        self.q.node()
    }

    /// The root's queue.
    pub fn queue(&self) -> &Queue {
        &self.q
    }

    /// Current size.
    pub fn size(&self) -> u64 {
        self.q.node().size()
    }

    fn check(&self, off: u64, len: u64, write: bool) -> Result<(), IoStatus> {
        if write && self.read_only {
            return Err(IoStatus::EPERM);
        }
        let size = self.size();
        if off > size || len > size - off {
            return Err(IoStatus::EIO);
        }
        Ok(())
    }

    /// Read into `buf`'s window from `off`.
    pub fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        match self.check(off, buf.len() as u64, false) {
            Ok(()) => self.q.read(off, buf),
            Err(e) => IoFuture::done(buf, Err(e)),
        }
    }

    /// Write `buf`'s window at `off`.
    pub fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        if let Err(e) = self.check(off, buf.len() as u64, true) {
            return IoFuture::done(buf, Err(e));
        }
        if !self.writethrough {
            return self.q.write(off, buf, flags);
        }
        let q = self.q.clone();
        IoFuture::boxed(async move {
            let d = q.write(off, buf, flags).await;
            if d.res.is_err() {
                return d;
            }
            let f = q.flush().await;
            IoDone { buf: d.buf, res: f.res.and(d.res) }
        })
    }

    /// Write whole clusters compressed (qcow2); ENOTSUP where the format has no compression.
    pub fn write_compressed(&self, off: u64, buf: IoBuf) -> IoFuture {
        match self.check(off, buf.len() as u64, true) {
            Ok(()) => self.q.write_compressed(off, buf),
            Err(e) => IoFuture::done(buf, Err(e)),
        }
    }

    /// Make a range read as zeroes.
    pub fn write_zeroes(&self, off: u64, len: u64, flags: ZeroFlags) -> IoFuture {
        match self.check(off, len, true) {
            Ok(()) => self.q.write_zeroes(off, len, flags),
            Err(e) => IoFuture::err(e),
        }
    }

    /// Discard a range.
    pub fn discard(&self, off: u64, len: u64) -> IoFuture {
        match self.check(off, len, true) {
            Ok(()) => self.q.discard(off, len),
            Err(e) => IoFuture::err(e),
        }
    }

    /// Flush.
    pub fn flush(&self) -> IoFuture {
        self.q.flush()
    }

    /// Block status at `off`, for at most `len` bytes.
    pub async fn block_status(&self, off: u64, len: u64) -> Result<BlockStatus, IoStatus> {
        self.check(off, len, false)?;
        let mut st = self.q.block_status(off, len).await?;
        st.len = st.len.clamp(1, len.max(1));
        Ok(st)
    }
}
