//! The engine pads and splits requests so that a node only sees what its limits declare: a
//! recording node with 512-byte alignment and a 64 KiB max transfer gets random unaligned,
//! oversized reads, writes and write_zeroes (many in flight at once), checks every request it
//! receives, and the result must equal a plain in-memory model.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use basalt_engine::{BlockResult, IoFuture, IoStatus, Limits, Node, NodeQueue, Queue, WriteFlags, ZeroFlags};
use basalt_reactor::{spawn_local, IoBuf, Reactor, ReactorConfig};

const ALIGN: u64 = 512;
const MAX: u64 = 65536;
const SIZE: u64 = 1 << 20;

struct MemNode {
    data: Arc<Mutex<Vec<u8>>>,
    zero_ok: bool,
}

struct MemQueue {
    data: Arc<Mutex<Vec<u8>>>,
    zero_ok: bool,
    seen: Rc<RefCell<u64>>,
}

fn check(off: u64, len: u64, max: bool) {
    assert_eq!(off % ALIGN, 0, "unaligned offset {off}");
    assert_eq!(len % ALIGN, 0, "unaligned length {len}");
    assert!(!max || len <= MAX, "length {len} over max transfer");
    assert!(off + len <= SIZE);
}

impl Node for MemNode {
    fn driver(&self) -> &'static str {
        "mem"
    }
    fn node_name(&self) -> &str {
        "mem"
    }
    fn filename(&self) -> String {
        "mem".into()
    }
    fn size(&self) -> u64 {
        SIZE
    }
    fn limits(&self) -> Limits {
        Limits { request_alignment: ALIGN as u32, max_transfer: MAX as u32, opt_transfer: 0 }
    }
    fn read_only(&self) -> bool {
        false
    }
    fn is_format(&self) -> bool {
        false
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        Ok(Rc::new(MemQueue { data: self.data.clone(), zero_ok: self.zero_ok, seen: Rc::new(RefCell::new(0)) }))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl MemQueue {
    /// Complete on a later turn, so requests really overlap in time.
    fn later(&self, f: impl FnOnce() -> IoFuture + 'static) -> IoFuture {
        *self.seen.borrow_mut() += 1;
        IoFuture::boxed(async move {
            basalt_reactor::yield_now().await;
            f().await
        })
    }
}

impl NodeQueue for MemQueue {
    fn read(&self, off: u64, mut buf: IoBuf) -> IoFuture {
        check(off, buf.len() as u64, true);
        assert_eq!(buf.as_ptr() as u64 % ALIGN, 0, "misaligned memory");
        let data = self.data.clone();
        self.later(move || {
            let d = data.lock().unwrap();
            let n = buf.len();
            buf.copy_from_slice(&d[off as usize..off as usize + n]);
            IoFuture::done(buf, Ok(n as u64))
        })
    }
    fn write(&self, off: u64, buf: IoBuf, _f: WriteFlags) -> IoFuture {
        check(off, buf.len() as u64, true);
        assert_eq!(buf.as_ptr() as u64 % ALIGN, 0, "misaligned memory");
        let data = self.data.clone();
        self.later(move || {
            let mut d = data.lock().unwrap();
            let n = buf.len();
            d[off as usize..off as usize + n].copy_from_slice(&buf);
            IoFuture::done(buf, Ok(n as u64))
        })
    }
    fn write_zeroes(&self, off: u64, len: u64, _f: ZeroFlags) -> IoFuture {
        check(off, len, false);
        if !self.zero_ok {
            return IoFuture::err(IoStatus::ENOTSUP);
        }
        let data = self.data.clone();
        self.later(move || {
            data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
            IoFuture::ok(len)
        })
    }
    fn flush(&self) -> IoFuture {
        IoFuture::ok(0)
    }
}

fn rng(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn random_ops(zero_ok: bool, seed: u64) {
    let data = Arc::new(Mutex::new(vec![0u8; SIZE as usize]));
    let node: Arc<dyn Node> = Arc::new(MemNode { data: data.clone(), zero_ok });
    let model = Rc::new(RefCell::new(vec![0u8; SIZE as usize]));
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    let m2 = model.clone();
    r.block_on(async move {
        let q = Queue::new(node).unwrap();
        let mut s = seed;
        for round in 0..20 {
            let mut handles = Vec::new();
            // Requests in one round touch disjoint ranges (as a guest's would, in flight together).
            let mut cursor = 0u64;
            for i in 0..16 {
                let gap = rng(&mut s) % 4096;
                let len = 1 + rng(&mut s) % 200_000;
                let off = cursor + gap;
                if off + len > SIZE {
                    break;
                }
                cursor = off + len;
                let q = q.clone();
                let model = m2.clone();
                let kind = rng(&mut s) % 3;
                let byte = (round * 16 + i) as u8 | 1;
                // Some buffers start at a misaligned address inside their allocation.
                let skew = rng(&mut s).is_multiple_of(3) as usize * (1 + rng(&mut s) % 511) as usize;
                handles.push(spawn_local(async move {
                    match kind {
                        0 => {
                            let mut b = IoBuf::new(len as usize + skew);
                            b.slice(skew, len as usize);
                            b.fill(byte);
                            let d = q.write(off, b, WriteFlags::default()).await;
                            assert_eq!(d.res, Ok(len));
                            model.borrow_mut()[off as usize..(off + len) as usize].fill(byte);
                        }
                        1 => {
                            let d = q.write_zeroes(off, len, ZeroFlags::default()).await;
                            assert_eq!(d.res, Ok(len));
                            model.borrow_mut()[off as usize..(off + len) as usize].fill(0);
                        }
                        _ => {
                            let mut b = IoBuf::new(len as usize + skew);
                            b.slice(skew, len as usize);
                            let d = q.read(off, b).await;
                            assert_eq!(d.res, Ok(len));
                            // Reads in a round see data written in earlier rounds.
                            let _ = d.buf.unwrap();
                        }
                    }
                }));
            }
            for h in handles {
                h.await;
            }
            // Read the whole device back through unaligned windows and compare with the model.
            let mut at = rng(&mut s) % 1000;
            while at < SIZE {
                let len = (1 + rng(&mut s) % 150_000).min(SIZE - at);
                let d = q.read(at, IoBuf::new(len as usize)).await;
                assert_eq!(&d.buf.unwrap()[..], &m2.borrow()[at as usize..(at + len) as usize], "round {round} at {at}");
                at += len;
            }
        }
    });
    assert_eq!(*data.lock().unwrap(), *model.borrow());
}

#[test]
fn padded_and_split_requests_match_the_model() {
    random_ops(true, 0x1234_5678_9abc_def1);
}

#[test]
fn write_zeroes_falls_back_to_zero_buffers() {
    random_ops(false, 0x0fed_cba9_8765_4321);
}
