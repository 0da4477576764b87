//! The protocol drivers through the engine: file with io_uring and with the thread pool (also
//! on a reactor that has no ring), O_DIRECT, discard and write_zeroes on the host file,
//! null-co/null-aio options, and host_device on a loop device attached to a file.

use std::process::Command;
use std::time::{Duration, Instant};

use basalt_engine::{Backend, Graph, OpenFlags, Opts, WriteFlags, ZeroFlags};
use basalt_reactor::{IoBuf, Reactor, ReactorConfig, UringMode};

fn exercise(r: &Reactor, opts: Opts) {
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let be = Backend::new(graph.open(opts, OpenFlags::read_write()).await.unwrap()).unwrap();
        let mut data = IoBuf::new(1 << 20);
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let d = be.write(1 << 20, data, WriteFlags { fua: true }).await;
        assert_eq!(d.res, Ok(1 << 20));
        let d = be.read(1 << 20, IoBuf::new(1 << 20)).await;
        let back = d.buf.unwrap();
        assert!(back.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        assert_eq!(be.write_zeroes(1 << 20, 4096, ZeroFlags { may_unmap: true, ..Default::default() }).await.res, Ok(4096));
        assert_eq!(be.write_zeroes((1 << 20) + 8192, 4096, ZeroFlags::default()).await.res, Ok(4096));
        assert_eq!(be.discard((1 << 20) + 65536, 65536).await.res, Ok(65536));
        let d = be.read(1 << 20, IoBuf::new(16384)).await;
        let b = d.buf.unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert_eq!(b[4096], (4096 % 251) as u8);
        assert!(b[8192..12288].iter().all(|&x| x == 0));
        assert!(be.flush().await.res.is_ok());
    });
}

fn file_opts(path: &str, extra: &[(&str, &str)]) -> Opts {
    let mut o = Opts::new();
    o.set("driver", "raw");
    o.set("file.driver", "file");
    o.set("file.filename", path);
    for (k, v) in extra {
        o.set(k, *v);
    }
    o
}

fn allocated(path: &str) -> u64 {
    std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(path).unwrap()) * 512
}

#[test]
fn file_driver_on_every_aio_path() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.raw");
    let ps = p.to_str().unwrap();
    std::fs::write(&p, vec![0xeeu8; 4 << 20]).unwrap();
    let uring = Reactor::new(ReactorConfig::default()).unwrap();
    assert!(uring.uring_features().is_some());
    exercise(&uring, file_opts(ps, &[]));
    exercise(&uring, file_opts(ps, &[("file.aio", "threads")]));
    exercise(&uring, file_opts(ps, &[("file.cache.direct", "on")]));
    exercise(&uring, file_opts(ps, &[("file.aio", "io_uring"), ("file.cache.direct", "on")]));
    // Discard really punched a hole in the host file.
    let before = allocated(ps);
    assert!(before < 4 << 20, "discard left {before} bytes allocated");
    // A reactor whose ring the kernel refused (modelled by disabling it): threads take over,
    // and an explicit aio=io_uring is refused clearly.
    let none = Reactor::new(ReactorConfig { uring: UringMode::Disabled, ..ReactorConfig::default() }).unwrap();
    assert!(none.uring_features().is_none());
    exercise(&none, file_opts(ps, &[]));
    let o = file_opts(ps, &[("file.aio", "io_uring")]);
    let e = none.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let n = graph.open(o, OpenFlags::read_write()).await.unwrap();
        Backend::new(n).err().unwrap()
    });
    assert!(e.msg.contains("io_uring is not available"), "{}", e.msg);
    // And the same with io_uring present but fallocate missing from it.
    let nofalloc =
        Reactor::new(ReactorConfig { disable: vec!["fallocate", "fixed_files", "fixed_buffers"], ..Default::default() }).unwrap();
    exercise(&nofalloc, file_opts(ps, &[]));
}

#[test]
fn file_driver_errors_name_the_problem() {
    let d = tempfile::tempdir().unwrap();
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    let missing = d.path().join("missing.raw");
    let dir = d.path().to_str().unwrap().to_string();
    let good = d.path().join("good.raw").to_str().unwrap().to_string();
    std::fs::write(&good, [0u8; 512]).unwrap();
    let cases: Vec<(Opts, &str)> = vec![
        (file_opts(missing.to_str().unwrap(), &[]), "No such file or directory"),
        (file_opts(&dir, &[]), "Is a directory"),
        (file_opts(&dir, &[("file.bogus", "1")]), "Block protocol 'file' does not support the option 'bogus'"),
        (file_opts(&dir, &[("file.aio", "native")]), "aio=native"),
        (file_opts(&dir, &[("file.locking", "maybe")]), "Parameter 'locking' does not accept value 'maybe'"),
        (file_opts(&good, &[("bogus", "1")]), "Block format 'raw' does not support the option 'bogus'"),
    ];
    for (o, want) in cases {
        let e =
            r.block_on(
                async move { Graph::new(basalt_formats::registry()).open(o, OpenFlags::read_write()).await.err().unwrap() },
            );
        assert!(e.msg.contains(want), "{} does not contain {want}", e.msg);
    }
}

#[test]
fn null_drivers_honour_their_options() {
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let mut o = Opts::parse_keyval("driver=null-aio,size=1M,read-zeroes=on,latency-ns=2000000", None).unwrap();
        o.set("node-name", "n0");
        let n = graph.open(o, OpenFlags::read_write()).await.unwrap();
        assert_eq!(n.size(), 1 << 20);
        assert_eq!(n.node_name(), "n0");
        assert_eq!(n.filename(), r#"json:{"read-zeroes": "on", "driver": "null-aio", "size": "1M"}"#);
        let be = Backend::new(n).unwrap();
        let mut b = IoBuf::new(4096);
        b.fill(7);
        let t = Instant::now();
        let d = be.read(0, b).await;
        assert!(t.elapsed() >= Duration::from_millis(2), "latency-ns honoured");
        assert!(d.buf.unwrap().iter().all(|&x| x == 0), "read-zeroes honoured");
        // Without read-zeroes the buffer is left alone; default size is 1 GiB.
        let n = graph.open(Opts::from_filename("null-co://").unwrap(), OpenFlags::read_write()).await.unwrap();
        assert_eq!(n.size(), 1 << 30);
        assert_eq!(n.filename(), "null-co://");
        let be = Backend::new(n).unwrap();
        let mut b = IoBuf::new(512);
        b.fill(7);
        assert!(be.read(0, b).await.buf.unwrap().iter().all(|&x| x == 7));
        // A node-name reference: two raw parents over one null node.
        let a = graph
            .open(Opts::parse_keyval("driver=raw,file=n0,node-name=a", None).unwrap(), OpenFlags::read_write())
            .await
            .unwrap();
        let b = graph
            .open(Opts::parse_keyval("driver=raw,file=n0,offset=4096,node-name=b", None).unwrap(), OpenFlags::read_write())
            .await
            .unwrap();
        assert!(std::sync::Arc::ptr_eq(&a.children()[0].node, &b.children()[0].node));
        assert_eq!(b.size(), (1 << 20) - 4096);
        let e = graph
            .open(Opts::parse_keyval("driver=raw,file=n0,node-name=a", None).unwrap(), OpenFlags::read_write())
            .await
            .err()
            .unwrap();
        assert_eq!(e.msg, "Duplicate nodes with node-name='a'");
        // A string child is a reference only, as in QEMU.
        let e =
            graph.open(Opts::parse_keyval("driver=raw,file=nosuch", None).unwrap(), OpenFlags::read_write()).await.err().unwrap();
        assert_eq!(e.msg, "Cannot find device='nosuch' nor node-name='nosuch'");
    });
}

struct Loop(String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn host_device_on_a_loop_device() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("backing.img");
    std::fs::write(&p, vec![0x55u8; 8 << 20]).unwrap();
    let out = Command::new("losetup").args(["-f", "--show", p.to_str().unwrap()]).output().expect("losetup must be installed");
    assert!(out.status.success(), "cannot attach a loop device: {}", String::from_utf8_lossy(&out.stderr));
    let dev = Loop(String::from_utf8_lossy(&out.stdout).trim().to_string());
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    let mut o = Opts::new();
    o.set("driver", "raw");
    o.set("file.driver", "host_device");
    o.set("file.filename", &dev.0);
    let dev_path = dev.0.clone();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let n = graph.open(o.clone(), OpenFlags::read_write()).await.unwrap();
        assert_eq!(n.size(), 8 << 20);
        assert_eq!(n.children()[0].node.driver(), "host_device");
        drop(n);
        // The file driver refuses a block device, host_device refuses a file.
        let mut wrong = o.clone();
        wrong.set("file.driver", "file");
        assert!(graph.open(wrong, OpenFlags::read_write()).await.is_err());
        let mut direct = o;
        direct.set("file.cache.direct", "on");
        exercise_dev(&graph, direct).await;
        let _ = dev_path;
    });
    drop(dev);
    let data = std::fs::read(&p).unwrap();
    assert_eq!(data[(1 << 20) + 4096], (4096 % 251) as u8);
    assert!(data[(1 << 20)..(1 << 20) + 4096].iter().all(|&x| x == 0), "BLKZEROOUT reached the backing file");
}

async fn exercise_dev(graph: &Graph, o: Opts) {
    let be = Backend::new(graph.open(o, OpenFlags::read_write()).await.unwrap()).unwrap();
    let mut data = IoBuf::new(1 << 20);
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    assert_eq!(be.write(1 << 20, data, WriteFlags::default()).await.res, Ok(1 << 20));
    assert_eq!(be.write_zeroes(1 << 20, 4096, ZeroFlags::default()).await.res, Ok(4096));
    // Unaligned under O_DIRECT: padded by the engine to the logical block size.
    assert_eq!(be.write(7, IoBuf::from_slice(b"abc"), WriteFlags::default()).await.res, Ok(3));
    let d = be.read(5, IoBuf::new(6)).await;
    assert_eq!(&d.buf.unwrap()[..], &[0x55, 0x55, b'a', b'b', b'c', 0x55]);
    assert_eq!(be.discard(4 << 20, 1 << 20).await.res, Ok(1 << 20));
    assert!(be.flush().await.res.is_ok());
    let st = be.block_status(0, 8 << 20).await.unwrap();
    assert!(st.data);
    assert_eq!(be.node().children()[0].node.limits().request_alignment, 512);
}

/// Large buffered writes through the thread pool allocate their range before copying (cheaper
/// than the filesystem's per-block delayed allocation): what is allocated, the file's size
/// and the data are exactly what plain writes leave, into holes and over data.
#[test]
fn large_pool_writes_allocate_exactly_what_they_write() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.raw");
    let ps = p.to_str().unwrap().to_string();
    std::fs::File::create(&p).unwrap().set_len(16 << 20).unwrap();
    let r = Reactor::new(ReactorConfig::default()).unwrap();
    let o = file_opts(&ps, &[("file.aio", "threads")]);
    let pattern = |len: usize, seed: u8| {
        let mut b = IoBuf::new(len);
        b.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 253) as u8 ^ seed);
        b
    };
    // Into a hole, at an offset that is not a multiple of the write; up to the end of the file;
    // and over the first write (allocated already). (Writes past the end, which qcow2 makes,
    // are covered by the convert tests that compare whole files with qemu-img's.)
    let writes = [((3 << 20) + 4096, 2 << 20, 1u8), ((29 << 19), 3 << 19, 2), ((3 << 20) + 4096, 1 << 20, 3)];
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let be = Backend::new(graph.open(o, OpenFlags::read_write()).await.unwrap()).unwrap();
        for (off, len, seed) in writes {
            assert_eq!(be.write(off, pattern(len, seed), WriteFlags::default()).await.res, Ok(len as u64));
        }
        assert!(be.flush().await.res.is_ok());
    });
    let f = std::fs::read(&p).unwrap();
    assert_eq!(f.len(), 16 << 20, "the size is left alone");
    let mut expect = vec![0u8; 16 << 20];
    for (off, len, seed) in writes {
        expect[off as usize..off as usize + len].copy_from_slice(&pattern(len, seed));
    }
    assert!(f == expect, "the file holds what was written");
    assert_eq!(allocated(&ps), (2 << 20) + (3 << 19), "only the written ranges are allocated");
}
