//! Starting N reactors, one thread each, optionally pinned to chosen cores, and reaching them
//! from ordinary threads: [`Runtime::block_on`] is the blocking facade a synchronous program
//! (a CLI tool, a test) uses to call the engine.

use std::future::Future;
use std::thread::JoinHandle;

use crate::reactor::{Reactor, ReactorConfig, ReactorHandle};

/// Stack of a reactor thread: the main thread's usual 8 MiB rather than Rust's 2 MiB default,
/// since async call chains can nest deeply (a format opening its backing file opens a format
/// that opens its backing file, and debug builds keep large poll frames). Only touched pages
/// are committed.
const REACTOR_STACK: usize = 8 << 20;

/// Settings for a set of reactors.
#[derive(Clone, Debug, Default)]
pub struct RuntimeConfig {
    /// Cores to run on, one reactor each. Empty means one reactor, not pinned.
    pub cores: Vec<usize>,
    /// Pin each reactor thread to its core.
    pub pin: bool,
    /// Settings of every reactor.
    pub reactor: ReactorConfig,
    /// The threads' name (numbered when there are several); `basalt-reactor-N` by default.
    pub name: Option<String>,
}

impl RuntimeConfig {
    /// `n` reactors on cores `0..n`, pinned when `pin`.
    pub fn cores(n: usize, pin: bool) -> RuntimeConfig {
        RuntimeConfig { cores: (0..n).collect(), pin, reactor: ReactorConfig::default(), name: None }
    }
}

/// A running set of reactors. Dropping it stops and joins them.
pub struct Runtime {
    handles: Vec<ReactorHandle>,
    threads: Vec<JoinHandle<()>>,
}

impl Runtime {
    /// Start the reactors. Fails if a reactor cannot be set up.
    pub fn new(config: RuntimeConfig) -> std::io::Result<Runtime> {
        let cores = if config.cores.is_empty() { vec![0] } else { config.cores.clone() };
        let pin = config.pin && !config.cores.is_empty();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        let several = cores.len() > 1;
        for (i, core) in cores.into_iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let rc = config.reactor.clone();
            let name = match &config.name {
                Some(n) if several => format!("{n}-{i}"),
                Some(n) => n.clone(),
                None => format!("basalt-reactor-{i}"),
            };
            let t = std::thread::Builder::new().name(name).stack_size(REACTOR_STACK).spawn(move || {
                if pin {
                    core_affinity::set_for_current(core_affinity::CoreId { id: core });
                }
                match Reactor::new(rc) {
                    Ok(r) => {
                        let _ = tx.send(Ok(r.handle()));
                        r.run();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
            let h = rx.recv().map_err(|_| std::io::Error::other("reactor thread died during start"))??;
            handles.push(h);
            threads.push(t);
        }
        Ok(Runtime { handles, threads })
    }

    /// One unpinned reactor with default settings: what a CLI tool needs.
    pub fn single() -> std::io::Result<Runtime> {
        Runtime::new(RuntimeConfig::default())
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// True when there are no reactors (never, once started).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Handle of reactor `i`.
    pub fn handle(&self, i: usize) -> &ReactorHandle {
        &self.handles[i]
    }

    /// Run a future on reactor `i` and wait for its output.
    pub fn block_on<F, Fut, T>(&self, i: usize, make: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        self.handles[i].block_on(make)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for h in &self.handles {
            h.stop();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
