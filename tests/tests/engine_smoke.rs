//! The engine end to end on one reactor: open through the graph, write, read back, block
//! status, alignment padding, probing, the probed-raw sector 0 guard.

use basalt_engine::{Backend, Graph, OpenFlags, Opts, WriteFlags, ZeroFlags};
use basalt_reactor::{IoBuf, Reactor, ReactorConfig};

fn reactor() -> Reactor {
    Reactor::new(ReactorConfig::default()).unwrap()
}

#[test]
fn raw_over_file_write_read_unaligned_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.raw");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let p = path.to_str().unwrap().to_string();
    let r = reactor();
    r.block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let mut o = Opts::new();
        o.set("driver", "raw");
        o.set("file.filename", &p);
        o.set("file.cache.direct", "on");
        let node = graph.open(o, OpenFlags::read_write()).await.unwrap();
        assert_eq!(node.size(), 1 << 20);
        let be = Backend::new(node).unwrap();
        let d = be.write(4096, IoBuf::from_slice(&[0xab; 8192]), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(8192));
        // Unaligned write under O_DIRECT goes through read-modify-write.
        let d = be.write(4097, IoBuf::from_slice(&[0xcd; 3]), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(3));
        let d = be.read(4095, IoBuf::new(6)).await;
        assert_eq!(d.res, Ok(6));
        assert_eq!(&d.buf.unwrap()[..], &[0, 0xab, 0xcd, 0xcd, 0xcd, 0xab]);
        let d = be.write_zeroes(5000, 100, ZeroFlags::default()).await;
        assert_eq!(d.res, Ok(100));
        let d = be.read(4990, IoBuf::new(120)).await;
        let b = d.buf.unwrap();
        assert!(b[..10].iter().all(|&x| x == 0xab));
        assert!(b[10..110].iter().all(|&x| x == 0));
        assert!(b[110..].iter().all(|&x| x == 0xab));
        // Past the end: EIO, as QEMU.
        let d = be.read((1 << 20) - 1, IoBuf::new(2)).await;
        assert_eq!(d.res.unwrap_err().errno(), libc::EIO);
        assert!(be.flush().await.res.is_ok());
        let st = be.block_status(0, 1 << 20).await.unwrap();
        assert!(st.data);
    });
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data[4096], 0xab);
    assert_eq!(&data[4097..4100], &[0xcd; 3]);
}

#[test]
fn probed_raw_refuses_a_qcow2_header_in_sector_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    std::fs::write(&path, vec![0u8; 65536]).unwrap();
    let p = path.to_str().unwrap().to_string();
    reactor().block_on(async move {
        let graph = Graph::new(basalt_formats::registry());
        let node = graph.open(Opts::from_filename(&p).unwrap(), OpenFlags::read_write()).await.unwrap();
        assert_eq!(node.driver(), "raw");
        assert!(node.probed());
        let be = Backend::new(node).unwrap();
        let mut hdr = vec![0u8; 512];
        hdr[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        let d = be.write(0, IoBuf::from_slice(&hdr), WriteFlags::default()).await;
        assert_eq!(d.res.unwrap_err().errno(), libc::EPERM);
        // Ordinary data in sector 0 is fine.
        let d = be.write(0, IoBuf::from_slice(&[1u8; 512]), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(512));
        // With format=raw given explicitly the header may be written.
        let mut o = Opts::new();
        o.set("driver", "raw");
        o.set("file.filename", &p);
        o.set("file.locking", "off");
        let be = Backend::new(graph.open(o, OpenFlags::read_write()).await.unwrap()).unwrap();
        let d = be.write(0, IoBuf::from_slice(&hdr), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(512));
        // Now it probes as qcow2 (and, being a bare header, fails as one rather than opening
        // as raw); a json: name giving only the protocol child is probed too.
        // Opened by name it is reopened as qcow2, which keeps writers out: our own raw writer
        // holds it, so that is refused.
        let e = graph.open(Opts::from_filename(&p).unwrap(), OpenFlags::read_only()).await.err().unwrap();
        assert_eq!(e.kind, basalt_engine::ErrorKind::Locked, "{}", e.msg);
        let j = format!(r#"json:{{"file": {{"driver": "file", "filename": "{p}", "locking": "off"}}}}"#);
        let e2 = graph.open(Opts::from_filename(&j).unwrap(), OpenFlags::read_only()).await.err().unwrap();
        assert!(e2.msg.contains("cluster size"), "{}", e2.msg);
        // A format Basalt recognises but cannot open (QED) is refused with a clear error.
        let d = be.write(0, IoBuf::from_slice(b"QED\0\0\0\0\0"), WriteFlags::default()).await;
        assert_eq!(d.res, Ok(8));
        let e = graph.open(Opts::from_filename(&p).unwrap(), OpenFlags::read_only()).await.err().unwrap();
        assert!(e.msg.contains("'qed'"), "{}", e.msg);
    });
}
