//! Block status with a payload (`NBD_FLAG_BLOCK_STAT_PAYLOAD`, extended headers): a client
//! that negotiated several meta contexts asks for some of them only. The same raw requests go
//! to basalt-nbd and to qemu-nbd (both with `-A`, on copies of one qcow2 image over a raw
//! backing file); the replies, read by context name, must be the same: the chosen contexts
//! only, with the same extents, and an error for a context that was never negotiated.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use basalt_tests::{must, peer, run, start_listening, tool};

const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;
const FLAG_DONE: u16 = 1;
const PAYLOAD_LEN: u16 = 1 << 5;
const BLOCK_STATUS: u16 = 7;
const BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

struct Client {
    s: UnixStream,
    /// Context ids by name.
    ids: BTreeMap<String, u32>,
    tflags: u16,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    fn option(&mut self, o: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_vec();
        m.extend_from_slice(&o.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: type and data.
    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let mut d = vec![0u8; be32(&h[16..]) as usize];
        self.s.read_exact(&mut d).unwrap();
        (be32(&h[12..]), d)
    }

    /// Extended headers, both contexts, GO on the default export.
    fn connect(sock: &Path) -> Client {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client { s, ids: BTreeMap::new(), tflags: 0 };
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello).unwrap();
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c.option(11, &[]);
        assert_eq!(c.reply().0, 1, "extended headers");
        let mut q = 0u32.to_be_bytes().to_vec();
        q.extend_from_slice(&2u32.to_be_bytes());
        for name in ["base:allocation", "qemu:allocation-depth"] {
            q.extend_from_slice(&(name.len() as u32).to_be_bytes());
            q.extend_from_slice(name.as_bytes());
        }
        c.option(10, &q);
        loop {
            match c.reply() {
                (4, d) => {
                    c.ids.insert(String::from_utf8(d[4..].to_vec()).unwrap(), be32(&d));
                }
                (1, _) => break,
                (t, _) => panic!("reply {t:#x} to SET_META_CONTEXT"),
            }
        }
        let mut go = 0u32.to_be_bytes().to_vec();
        go.extend_from_slice(&0u16.to_be_bytes());
        c.option(7, &go);
        loop {
            match c.reply() {
                (3, d) if d[..2] == [0, 0] => c.tflags = u16::from_be_bytes([d[10], d[11]]),
                (3, _) => {}
                (1, _) => break,
                (t, _) => panic!("reply {t:#x} to GO"),
            }
        }
        c
    }

    /// Block status over `0..len` for `ids`; the extents by context name, or the error.
    fn status(&mut self, cookie: u64, len: u64, ids: &[u32]) -> Result<BTreeMap<String, Vec<(u64, u64)>>, u32> {
        let mut payload = len.to_be_bytes().to_vec();
        for id in ids {
            payload.extend_from_slice(&id.to_be_bytes());
        }
        let mut m = EXT_REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&PAYLOAD_LEN.to_be_bytes());
        m.extend_from_slice(&BLOCK_STATUS.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&0u64.to_be_bytes());
        m.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        m.extend_from_slice(&payload);
        self.s.write_all(&m).unwrap();
        let names: BTreeMap<u32, String> = self.ids.iter().map(|(n, i)| (*i, n.clone())).collect();
        let mut out = BTreeMap::new();
        let mut error = None;
        loop {
            let mut h = [0u8; 32];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(be32(&h), EXT_REPLY_MAGIC);
            assert_eq!(be64(&h[8..]), cookie);
            let flags = u16::from_be_bytes([h[4], h[5]]);
            let typ = u16::from_be_bytes([h[6], h[7]]);
            let mut d = vec![0u8; be64(&h[24..]) as usize];
            self.s.read_exact(&mut d).unwrap();
            match typ {
                6 => {
                    let ext = d[8..].chunks(16).map(|e| (be64(e), be64(&e[8..]))).collect();
                    out.insert(names[&be32(&d)].clone(), ext);
                }
                t if t & 0x8000 != 0 => error = Some(be32(&d)),
                0 => {}
                t => panic!("chunk type {t}"),
            }
            if flags & FLAG_DONE != 0 {
                return error.map_or(Ok(out), Err);
            }
        }
    }
}

#[test]
fn status_payload_matches_qemu_nbd() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = d.join("base.raw");
    std::fs::write(&base, vec![0x33u8; 2 << 20]).unwrap();
    let socks: Vec<_> = ["b", "q"]
        .iter()
        .map(|t| {
            let img = d.join(format!("{t}.qcow2"));
            let a = ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw"];
            must(&run(peer("qemu-img").current_dir(d).args(a).arg(&img).arg("8M")), "create");
            must(&run(peer("qemu-io").args(["-c", "write -P 1 1M 64k", "-c", "write -z 4M 1M"]).arg(&img)), "fill");
            (d.join(format!("{t}.sock")), img)
        })
        .collect();
    let args = |s: &Path, img: &Path| {
        let mut a: Vec<String> = ["-t", "-A", "-f", "qcow2", "-k"].iter().map(|s| s.to_string()).collect();
        a.push(s.display().to_string());
        a.push(img.display().to_string());
        a
    };
    let _b =
        start_listening(Command::new(tool("basalt-nbd")).args(args(&socks[0].0, &socks[0].1)).stderr(Stdio::null()), &socks[0].0);
    let _q = start_listening(peer("qemu-nbd").args(args(&socks[1].0, &socks[1].1)).stderr(Stdio::null()), &socks[1].0);
    let mut results = Vec::new();
    for (sock, _) in &socks {
        let mut c = Client::connect(sock);
        assert_ne!(c.tflags & BLOCK_STAT_PAYLOAD, 0, "block status payload not advertised");
        assert_eq!(c.ids.len(), 2);
        let (base_id, depth_id) = (c.ids["base:allocation"], c.ids["qemu:allocation-depth"]);
        let unknown = (1..100).find(|i| !c.ids.values().any(|v| v == i)).unwrap();
        results.push((
            c.status(1, 8 << 20, &[depth_id]),
            c.status(2, 6 << 20, &[base_id]),
            c.status(3, 8 << 20, &[base_id, depth_id]),
            c.status(4, 8 << 20, &[unknown]).is_err(),
            // The connection is still in step after the error.
            c.status(5, 1 << 20, &[depth_id]),
        ));
    }
    let (b, q) = (&results[0], &results[1]);
    assert_eq!(b.0.as_ref().unwrap().keys().collect::<Vec<_>>(), ["qemu:allocation-depth"]);
    assert_eq!(b.1.as_ref().unwrap().keys().collect::<Vec<_>>(), ["base:allocation"]);
    assert!(b.3, "an unknown context gave no error");
    assert_eq!(b, q, "basalt-nbd and qemu-nbd answer differently");
}
