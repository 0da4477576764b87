//! The blocking thread pool: runs system calls that io_uring cannot take (or that the kernel
//! refuses to take through a ring) off the reactor, reporting completion back to the submitting
//! reactor's remote queue. It is the `aio=threads` path and the home of slow control-plane
//! calls. Threads start on first use and live for the process.
//!
//! A [`Lane`] runs its jobs one at a time, in the order they were submitted, on whichever pool
//! thread is free: what io_uring's workers do for buffered writes to one file (they are
//! hashed by inode). Such writes hold the inode's lock for their whole copy, so two at once
//! only make one spin or sleep on the lock, and a pool filled with writers queued on one
//! lock leaves no thread for the reads that would keep them fed.

use std::collections::VecDeque;
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

/// A queue of jobs that run one at a time, in order, on the pool (see the module doc).
#[derive(Default)]
pub struct Lane {
    state: Mutex<LaneState>,
}

#[derive(Default)]
struct LaneState {
    /// A pool thread is draining the queue.
    running: bool,
    jobs: VecDeque<Job>,
}

impl Lane {
    pub fn new() -> Lane {
        Lane::default()
    }

    /// Queue `job`; a pool thread takes the lane if none holds it.
    pub(crate) fn submit(self: &Arc<Self>, job: Job) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.jobs.push_back(job);
        if !s.running {
            s.running = true;
            drop(s);
            let lane = self.clone();
            submit(Box::new(move || lane.drain()));
        }
    }

    /// Run the queued jobs until none is left, then give the lane up.
    fn drain(&self) {
        loop {
            let job = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                match s.jobs.pop_front() {
                    Some(j) => j,
                    None => {
                        s.running = false;
                        return;
                    }
                }
            };
            job();
        }
    }
}
