//! Small buffered writes done on the reactor itself, not through the ring.
//!
//! A buffered write is a copy into the page cache. Filesystems that cannot start one without
//! blocking (ext4 among them: a buffered `RWF_NOWAIT` write gets EOPNOTSUPP) make io_uring
//! hand every such write to a kernel worker thread: a wakeup and two context switches per
//! 4 KiB write, and where cores are few the worker competes with the reactor and the clients
//! for them. A plain `pwrite(2)` from the reactor costs only the copy; it is what the thread
//! pool would do, without the hand-off.
//!
//! It can block, though (dirty page throttling, reclaim, a journal commit), and a blocked
//! reactor stalls everything queued on it. So each inline write is timed: a write slower than
//! [`STALL`] is a stall, and once the stalls of the last [`WINDOW`] add up to more than
//! [`STALL_BUDGET`] the path turns off for a while: the writes go through the ring (or the
//! thread pool) meanwhile. The pause starts at [`BACKOFF`] and doubles, up to
//! [`BACKOFF_MAX`], while stalls keep coming right after it ends (a file under sustained
//! writeback throttling costs the reactor a few milliseconds every few seconds at most).
//! A lone slow write under the budget, which is what a preempted reactor thread looks like
//! on a busy machine, leaves the path on.
//!
//! Only writes of at most [`INLINE_MAX`] bytes, to a regular file opened without O_DIRECT and
//! with no `aio=` given, take this path: an explicit `aio=io_uring` or `aio=threads` is taken
//! at its word.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The largest write done inline.
pub(crate) const INLINE_MAX: usize = 64 << 10;
/// An inline write slower than this is a stall.
const STALL: Duration = Duration::from_micros(500);
/// Stalled time within one window that turns the path off for a while.
const STALL_BUDGET: Duration = Duration::from_millis(5);
const WINDOW: Duration = Duration::from_secs(1);
/// How long the path stays off after a first stall, and at most after repeated ones.
const BACKOFF: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(16);

/// One queue's inline write path and its back-off state.
pub(crate) struct InlineWrites {
    enabled: bool,
    stall: Duration,
    budget: Duration,
    /// The stalls of the current window: when it started, and their time so far.
    window: Cell<Option<(Instant, Duration)>>,
    paused_until: Cell<Option<Instant>>,
    /// The last pause, and when it ended (a stall soon after doubles the next one).
    pause: Cell<Duration>,
    resumed: Cell<Option<Instant>>,
}

impl InlineWrites {
    pub(crate) fn new(enabled: bool) -> InlineWrites {
        InlineWrites {
            enabled,
            stall: STALL,
            budget: STALL_BUDGET,
            window: Cell::new(None),
            paused_until: Cell::new(None),
            pause: Cell::new(BACKOFF),
            resumed: Cell::new(None),
        }
    }

    /// Write all of `data` at `off` now and return the count or a negative errno; `None`
    /// when this write is to go through the ring (or the thread pool) instead.
    pub(crate) fn try_write(&self, fd: RawFd, off: u64, data: &[u8]) -> Option<i64> {
        if !self.enabled || data.len() > INLINE_MAX {
            return None;
        }
        let start = Instant::now();
        if let Some(until) = self.paused_until.get() {
            if start < until {
                return None;
            }
            self.paused_until.set(None);
            self.resumed.set(Some(start));
        }
        let res = match super::sys::pwrite_all(fd, data, off) {
            Ok(()) => data.len() as i64,
            Err(e) => -i64::from(e.raw_os_error().unwrap_or(libc::EIO)),
        };
        let took = start.elapsed();
        if took > self.stall {
            let now = Instant::now();
            let (since, stalled) = match self.window.get() {
                Some((since, sum)) if now.duration_since(since) < WINDOW => (since, sum + took),
                _ => (now, took),
            };
            if stalled <= self.budget {
                self.window.set(Some((since, stalled)));
                return Some(res);
            }
            self.window.set(None);
            let soon = self.resumed.get().is_some_and(|r| now.duration_since(r) < self.pause.get());
            let pause = if soon { (self.pause.get() * 2).min(BACKOFF_MAX) } else { BACKOFF };
            self.pause.set(pause);
            self.paused_until.set(Some(now + pause));
        }
        Some(res)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    #[test]
    fn writes_in_place_and_refuses_what_is_not_its_own() {
        let mut f = tempfile_in_tmp();
        let fd = f.as_raw_fd();
        let w = InlineWrites::new(true);
        assert_eq!(w.try_write(fd, 4096, &[7u8; 4096]), Some(4096));
        assert_eq!(w.try_write(fd, 0, &vec![1u8; INLINE_MAX + 1]), None, "too large for the path");
        assert_eq!(InlineWrites::new(false).try_write(fd, 0, &[1u8; 512]), None, "path off");
        let mut all = Vec::new();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 8192);
        assert!(all[..4096].iter().all(|&b| b == 0) && all[4096..].iter().all(|&b| b == 7));
        // A failing write reports its errno.
        let ro = std::fs::File::open("/proc/self/stat").unwrap();
        assert!(w.try_write(ro.as_raw_fd(), 0, b"x").unwrap() < 0);
    }

    #[test]
    fn a_stall_turns_the_path_off() {
        let f = tempfile_in_tmp();
        let w = InlineWrites::new(true);
        w.paused_until.set(Some(Instant::now() + Duration::from_secs(60)));
        assert_eq!(w.try_write(f.as_raw_fd(), 0, b"abc"), None);
        w.paused_until.set(Some(Instant::now() - Duration::from_millis(1)));
        assert_eq!(w.try_write(f.as_raw_fd(), 0, b"abc"), Some(3), "the back-off is over");
        // Stalls under the budget leave the path on.
        let w = InlineWrites { stall: Duration::ZERO, budget: Duration::from_secs(3600), ..InlineWrites::new(true) };
        for _ in 0..3 {
            assert_eq!(w.try_write(f.as_raw_fd(), 0, b"abc"), Some(3));
        }
        assert!(w.window.get().is_some_and(|(_, sum)| sum > Duration::ZERO), "the stalls are counted");
        // Every write is a stall over the budget now: one goes through, the next is refused.
        let w = InlineWrites { stall: Duration::ZERO, budget: Duration::ZERO, ..InlineWrites::new(true) };
        assert_eq!(w.try_write(f.as_raw_fd(), 0, b"abc"), Some(3));
        assert_eq!(w.try_write(f.as_raw_fd(), 0, b"abc"), None);
        assert_eq!(w.pause.get(), BACKOFF);
        // A stall right after the pause ends doubles the next pause, up to the cap.
        for want in [2, 4, 8, 16, 16] {
            w.paused_until.set(Some(Instant::now() - Duration::from_millis(1)));
            assert_eq!(w.try_write(f.as_raw_fd(), 0, b"abc"), Some(3));
            assert_eq!(w.pause.get(), Duration::from_secs(want));
        }
    }

    fn tempfile_in_tmp() -> std::fs::File {
        let p = std::env::temp_dir().join(format!("basalt-inline-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        f
    }
}
