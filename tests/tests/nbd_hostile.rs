//! basalt-nbd against hostile clients, speaking the protocol by hand: bad magics, oversized
//! and out-of-range requests, unknown commands, disconnects in the middle of a write, clients
//! that never read their replies, many connections at once. Each gets the protocol's error or
//! is dropped alone; the server and its other clients go on; everything acknowledged is in the
//! image afterwards (checked with qemu-io on the file).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use basalt_drivers::nbd::proto::{self, cmd, opt, rep, OptionHeader, Request};
use basalt_tests::{must, peer, run, start_listening, stdout, tool};

/// A connection in the transmission phase, simple replies.
struct Client(UnixStream);

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

impl Client {
    fn new(sock: &Path) -> Client {
        let mut s = connect(sock);
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
        let mut data = 0u32.to_be_bytes().to_vec();
        data.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&OptionHeader { option: opt::GO, len: data.len() as u32 }.encode()).unwrap();
        s.write_all(&data).unwrap();
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let h = proto::OptionReplyHeader::parse(&h).unwrap();
            let mut d = vec![0u8; h.len as usize];
            s.read_exact(&mut d).unwrap();
            if h.reply == rep::ACK {
                break;
            }
            assert_eq!(h.reply, rep::INFO, "GO failed");
        }
        Client(s)
    }

    fn send(&mut self, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let r = Request { flags: 0, typ, cookie, offset, len: u64::from(len) };
        let mut m = r.encode().to_vec();
        m.extend_from_slice(payload);
        self.0.write_all(&m).unwrap();
    }

    /// A simple reply: (error, cookie), reading `data` bytes of a successful read.
    fn reply(&mut self, data: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.0.read_exact(&mut h).unwrap();
        match proto::ReplyStart::parse(&h).unwrap() {
            proto::ReplyStart::Simple { error, cookie } => {
                let mut d = vec![0u8; if error == 0 { data } else { 0 }];
                self.0.read_exact(&mut d).unwrap();
                (error, cookie, d)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.send(cmd::WRITE, cookie, offset, data.len() as u32, data);
        let (e, c, _) = self.reply(0);
        assert_eq!(c, cookie);
        e
    }

    /// Whether the server closed the connection (EOF or reset) within the timeout.
    fn dropped(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

fn qemu_io_reads(img: &Path, cmds: &[&str]) -> String {
    let mut c = peer("qemu-io");
    c.args(["-f", "raw", "-r"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let o = run(c.arg(img));
    must(&o, "qemu-io");
    stdout(&o)
}

#[test]
fn hostile_clients_are_dropped_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("h.raw");
    must(&run(peer("qemu-img").args(["create", "-q", "-f", "raw", img.to_str().unwrap(), "64M"])), "create");
    let sock = d.join("h.sock");
    let server = start_listening(
        Command::new(tool("basalt-nbd")).args(["-t", "-e", "0", "-f", "raw", "-k"]).arg(&sock).arg(&img).stderr(Stdio::null()),
        &sock,
    );
    let size = 64u64 << 20;

    // A well-behaved client, used between the hostile ones.
    let mut good = Client::new(&sock);
    assert_eq!(good.write(1, 0, &[0xa1; 4096]), 0);

    // Past the end, unknown commands: errors, and the connection goes on.
    let mut c = Client::new(&sock);
    c.send(cmd::READ, 2, size - 512, 4096, &[]);
    assert_eq!(c.reply(4096).0, proto::err::EINVAL);
    c.send(cmd::WRITE, 3, size, 512, &[0u8; 512]);
    assert_eq!(c.reply(0).0, proto::err::ENOSPC);
    c.send(cmd::READ, 4, u64::MAX - 10, 100, &[]);
    assert_eq!(c.reply(100).0, proto::err::EINVAL);
    c.send(99, 5, 0, 0, &[]);
    assert_ne!(c.reply(0).0, 0, "unknown command accepted");
    c.send(cmd::TRIM, 6, size - 1, 2, &[]);
    assert_eq!(c.reply(0).0, proto::err::ENOSPC);
    // Unaligned requests are served (the export's minimum block size is 1).
    assert_eq!(c.write(7, 8191, &[0xa2; 3]), 0);
    c.send(cmd::READ, 8, 8191, 3, &[]);
    assert_eq!(c.reply(3), (0, 8, vec![0xa2; 3]));

    // A read over the payload limit: an error; a write over it: dropped.
    c.send(cmd::READ, 9, 0, proto::MAX_PAYLOAD + 1, &[]);
    assert_eq!(c.reply(0).0, proto::err::EINVAL);
    c.send(cmd::WRITE, 10, 0, proto::MAX_PAYLOAD + 1, &[]);
    assert!(c.dropped(), "oversized write not dropped");

    // A bad request magic: dropped.
    let mut c = Client::new(&sock);
    c.0.write_all(&[0x55; 28]).unwrap();
    assert!(c.dropped(), "bad magic not dropped");

    // A bad option magic during negotiation: dropped.
    let mut s = connect(&sock);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&[0x33; 16]).unwrap();
    assert!(Client(s).dropped(), "bad option magic not dropped");

    // A write cut off in the middle of its payload: dropped, nothing written.
    let mut c = Client::new(&sock);
    c.send(cmd::WRITE, 11, 1 << 20, 65536, &[0xa3; 1000]);
    drop(c);

    // Clients that send the largest reads and never read a reply: each holds a bounded
    // amount of the server's memory (not 64 requests' worth), and the others go on.
    let mut stuck = Vec::new();
    for _ in 0..2 {
        let mut c = Client::new(&sock);
        for k in 0..100u64 {
            c.send(cmd::READ, k, (k % 2) << 25, proto::MAX_PAYLOAD, &[]);
        }
        stuck.push(c);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.id())).unwrap();
    let hwm: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap();
    assert!(hwm < 512 << 10, "server memory peaked at {hwm} kB with clients that do not read");
    let mut many: Vec<Client> = (0..40).map(|_| Client::new(&sock)).collect();
    for (i, c) in many.iter_mut().enumerate() {
        let off = (2 << 20) + (i as u64) * 4096;
        assert_eq!(c.write(100 + i as u64, off, &[i as u8 + 1; 4096]), 0, "client {i}");
    }
    assert_eq!(good.write(12, 12288, &[0xa4; 4096]), 0);
    good.send(cmd::FLUSH, 13, 0, 0, &[]);
    assert_eq!(good.reply(0).0, 0);
    drop(stuck);
    drop(many);
    drop(good);
    // It flushes and exits cleanly on SIGTERM.
    server.stop();

    let out = qemu_io_reads(
        &img,
        &[
            "read -P 0xa1 0 4096",
            "read -P 0xa4 12288 4096",
            "read -P 0xa2 8191 3",
            "read -P 0 1M 64k",
            "read -P 1 2M 4k",
            "read -P 40 2256896 4k",
        ],
    );
    assert!(!out.contains("failed"), "{out}");
}
