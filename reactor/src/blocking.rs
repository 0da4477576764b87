//! The blocking thread pool: runs system calls that io_uring cannot take (or that the kernel
//! refuses to take through a ring) off the reactor, reporting completion back to the submitting
//! reactor's remote queue. It is the `aio=threads` path and the home of slow control-plane
//! calls. Threads start on first use and live for the process.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

const THREADS: usize = 8;

fn pool() -> &'static Mutex<Sender<Job>> {
    static POOL: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        for i in 0..THREADS {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("basalt-blocking-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawn blocking pool thread");
        }
        Mutex::new(tx)
    })
}

pub(crate) fn submit(job: Job) {
    let tx = pool().lock().unwrap_or_else(|e| e.into_inner()).clone();
    let _ = tx.send(job);
}
