//! DMA pools are hugepage-backed when hugepages are reserved. The test reserves some (as root;
//! it reports and skips when the kernel or the user does not allow it), checks the pool uses
//! them and that a reactor's pooled buffers work through io_uring's fixed-buffer path, then
//! restores the previous reservation.

use basalt_reactor::{DmaPool, IoBuf, Reactor, ReactorConfig};

const NR: &str = "/proc/sys/vm/nr_hugepages";

#[test]
fn pool_uses_reserved_hugepages() {
    let Ok(prev) = std::fs::read_to_string(NR) else {
        eprintln!("SKIPPED: {NR} is not readable");
        return;
    };
    let prev: u64 = prev.trim().parse().unwrap_or(0);
    // Without any reservation the pool falls back to ordinary pages.
    if prev == 0 {
        let p = DmaPool::new(4 << 20, true).unwrap();
        assert!(!p.hugepages());
    }
    if std::fs::write(NR, (prev + 32).to_string()).is_err() {
        eprintln!("SKIPPED: cannot reserve hugepages (not root?)");
        return;
    }
    struct Restore(u64);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(NR, self.0.to_string());
        }
    }
    let _restore = Restore(prev);
    let got: u64 = std::fs::read_to_string(NR).unwrap().trim().parse().unwrap();
    if got < prev + 16 {
        eprintln!("SKIPPED: the kernel reserved only {got} hugepages");
        return;
    }
    let p = DmaPool::new(16 << 20, true).unwrap();
    assert!(p.hugepages(), "pool must use the reserved hugepages");
    let b = p.take(4096).unwrap();
    assert_eq!(b.as_ptr() as usize % 4096, 0);
    drop(b);
    drop(p);
    // A reactor's pool on hugepages, used through the fixed-buffer path.
    let r = Reactor::new(ReactorConfig { pool_size: 16 << 20, ..ReactorConfig::default() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h");
    std::fs::write(&path, vec![0x3cu8; 8192]).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let data = r.block_on(async move {
        let b = IoBuf::new(8192);
        assert_eq!(b.fixed_index(basalt_reactor::current_id().unwrap()), Some(0));
        let (res, b) = basalt_reactor::uring_rw(basalt_reactor::UringFd::Raw(fd), false, b, 0).await;
        assert_eq!(res, 8192);
        b.unwrap().to_vec()
    });
    assert!(data.iter().all(|&x| x == 0x3c));
}
