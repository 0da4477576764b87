//! The standalone `luks` format (QEMU's `luks` driver): a LUKS1 header and key material at
//! the start of the file, the encrypted guest data after them. Guest offset 0 is the header's
//! payload offset; the guest size is what follows it in the file.
//!
//! Opening needs `key-secret=ID`, the id of a `secret` object holding the passphrase; the
//! header is checked field by field and a key slot unlocked before the node exists. An open
//! that does no I/O (`qemu-img info`) reads the header without the key. Reads decrypt in place
//! in the caller's buffer; writes encrypt into a bounce buffer from the reactor's pool, so the
//! caller's buffer is never modified. Requests are 512-byte aligned (the cipher's sector) and at
//! most 1 MiB (one bounce buffer). Create writes QEMU's layout (header, slot 0's key material
//! at 4 KiB, the other slots reserved, payload after them) with the options qemu-img takes.
//!
//! `amend` manages key slots (`state`, `keyslot`, `old-secret`, `new-secret`, `iter-time`) as
//! `qemu-img amend` does, through [`crate::crypto::amend`]; the master key unlocked at open
//! is kept (zeroed on drop) to store in new slots.

use std::rc::Rc;
use std::sync::Arc;

use basalt_engine::{
    BlockDriver, BlockError, BlockResult, Child, ChildRole, CreateOptDesc, DriverKind, ErrorKind, Graph, IoDone, IoFuture,
    IoStatus, Limits, LocalBoxFuture, Node, NodeQueue, OpenFlags, Opts, Perm, Prealloc, Queue, WriteFlags,
};
use basalt_reactor::IoBuf;

use std::sync::Mutex;

use basalt_engine::Secrets;
use zeroize::Zeroizing;

use crate::crypto::{
    amend_keyslots, luks_create, take_luks_create_opts, LuksAmendOpts, LuksArea, LuksHeader, SectorCipher, LUKS_AMEND_OPTS,
    LUKS_HEADER_LEN, LUKS_MAGIC, SECTOR_SIZE,
};

/// The `luks` format driver.
pub struct LuksDriver;

/// Driver instance for the registry.
pub static LUKS: LuksDriver = LuksDriver;

/// Largest request (one bounce buffer), as QEMU's crypto driver bounds it.
const MAX_IO: u32 = 1 << 20;

/// `-o` options in QEMU's order (the order of qemu-img's `Formatting` line).
const CREATE_OPTS: &[CreateOptDesc] = &[
    CreateOptDesc { name: "size", kind: "size", help: "Virtual disk size" },
    CreateOptDesc { name: "key-secret", kind: "str", help: "ID of the secret that provides the keyslot passphrase" },
    CreateOptDesc { name: "cipher-alg", kind: "str", help: "Name of encryption cipher algorithm" },
    CreateOptDesc { name: "cipher-mode", kind: "str", help: "Name of encryption cipher mode" },
    CreateOptDesc { name: "ivgen-alg", kind: "str", help: "Name of IV generator algorithm" },
    CreateOptDesc { name: "ivgen-hash-alg", kind: "str", help: "Name of IV generator hash algorithm" },
    CreateOptDesc { name: "hash-alg", kind: "str", help: "Name of encryption hash algorithm" },
    CreateOptDesc { name: "iter-time", kind: "number", help: "Time to spend in PBKDF in milliseconds" },
    CreateOptDesc { name: "detached-header", kind: "bool", help: "Create a detached LUKS header" },
];

fn key_secret_required() -> BlockError {
    BlockError::option("Parameter 'key-secret' is required for cipher")
}

impl BlockDriver for LuksDriver {
    fn name(&self) -> &'static str {
        "luks"
    }
    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }
    fn probe(&self, head: &[u8], _filename: &str) -> u8 {
        // Any LUKS version: a LUKS2 image is then refused by name rather than taken for raw.
        if head.starts_with(LUKS_MAGIC) {
            100
        } else {
            0
        }
    }
    fn open<'a>(&'a self, graph: &'a Graph, opts: Opts, flags: OpenFlags) -> LocalBoxFuture<'a, BlockResult<Arc<dyn Node>>> {
        Box::pin(open(graph, opts, flags))
    }
    fn create_opts(&self) -> &'static [CreateOptDesc] {
        CREATE_OPTS
    }
    fn create<'a>(&'a self, graph: &'a Graph, filename: &'a str, size: u64, opts: Opts) -> LocalBoxFuture<'a, BlockResult<()>> {
        Box::pin(create(graph, filename, size, opts))
    }
}

/// An open `luks` image.
pub struct LuksNode {
    name: String,
    file: Arc<dyn Node>,
    /// Changed only by `amend`, once the disk holds the change.
    header: Mutex<LuksHeader>,
    payload: u64,
    /// `None` when opened without the key (no I/O).
    cipher: Option<Arc<SectorCipher>>,
    /// The master key (with the cipher), for `amend` to store in new key slots.
    master_key: Option<Zeroizing<Vec<u8>>>,
    read_only: bool,
    filename: String,
}

async fn read_at(q: &Queue, off: u64, len: usize, what: &str) -> BlockResult<Vec<u8>> {
    let d = q.read(off, IoBuf::new_uninit(len)).await;
    d.res.map_err(|e| BlockError::from(e).context(format!("Could not read {what}")))?;
    Ok(d.buf.expect("read returns its buffer").to_vec())
}

async fn open(graph: &Graph, mut opts: Opts, flags: OpenFlags) -> BlockResult<Arc<dyn Node>> {
    let name = graph.take_node_name(&mut opts)?;
    let read_only = opts.take_bool("read-only", flags.read_only)?;
    let key_secret = opts.take_str("key-secret");
    // An open that takes no permission does no I/O (qemu-img info): the header is enough.
    let no_io = flags.perm == Perm::NONE;
    if key_secret.is_none() && !no_io {
        return Err(key_secret_required());
    }
    let mut cflags = flags.clone();
    cflags.read_only = read_only;
    cflags.cache_direct = opts.take_bool("cache.direct", flags.cache_direct)?;
    cflags.no_flush = opts.take_bool("cache.no-flush", flags.no_flush)?;
    cflags.probed = false;
    if !no_io {
        cflags.perm = if read_only { Perm::CONSISTENT_READ } else { Perm::CONSISTENT_READ.with(Perm::WRITE).with(Perm::RESIZE) };
    }
    let force_share = opts.take_bool("force-share", flags.force_share)?;
    cflags.force_share = force_share;
    cflags.shared = if force_share { Perm::ALL } else { flags.shared.without(Perm::WRITE).without(Perm::RESIZE) };
    opts.take_enum("discard", &["ignore", "off", "unmap", "on"], "ignore")?;
    opts.take_enum("detect-zeroes", &["off"], "off")?;
    let file = graph.open_child(&mut opts, ChildRole::File, cflags).await?;
    opts.expect_empty("Block format", "luks")?;

    let fsize = file.size();
    let q = Queue::new(file.clone())?;
    let head_len = (LUKS_HEADER_LEN as u64).min(fsize) as usize;
    let head = if head_len == 0 { Vec::new() } else { read_at(&q, 0, head_len, "LUKS header").await? };
    let header = LuksHeader::parse(&head).map_err(BlockError::from)?;
    header.check_area(fsize, true).map_err(BlockError::from)?;
    let (cipher, master_key) = match &key_secret {
        Some(id) => {
            let password = graph.secrets().get_utf8(id)?;
            let area_len = usize::try_from(header.unlock_area_len())
                .map_err(|_| BlockError::new(ErrorKind::OutOfBounds, "LUKS key material is too large"))?;
            let area = zeroize::Zeroizing::new(read_at(&q, 0, area_len, "LUKS key material").await?);
            let mk = header.unlock(password.as_bytes(), &area)?;
            (Some(Arc::new(header.sector_cipher(&mk)?)), Some(mk))
        }
        None => (None, None),
    };
    drop(q);
    let child_fn = file.filename();
    let filename = match (&key_secret, child_fn.strip_prefix("json:")) {
        (None, None) => child_fn,
        (ks, j) => {
            let mut f = Opts::new();
            f.set("driver", "luks");
            if let Some(k) = ks {
                f.set("key-secret", k.clone());
            }
            match j {
                Some(j) => f.insert_sub("file", Opts::parse_json(j)?),
                None => {
                    f.set("file.driver", file.driver());
                    f.set("file.filename", child_fn);
                }
            }
            basalt_engine::json_filename(&f)
        }
    };
    let read_only = read_only || file.read_only();
    let payload = header.payload_offset();
    let header = Mutex::new(header);
    Ok(Arc::new(LuksNode { name, file, header, payload, cipher, master_key, read_only, filename }) as Arc<dyn Node>)
}

impl Node for LuksNode {
    fn driver(&self) -> &'static str {
        "luks"
    }
    fn node_name(&self) -> &str {
        &self.name
    }
    fn filename(&self) -> String {
        self.filename.clone()
    }
    fn size(&self) -> u64 {
        self.file.size().saturating_sub(self.payload)
    }
    fn limits(&self) -> Limits {
        let f = self.file.limits();
        let align = f.request_alignment.max(SECTOR_SIZE as u32);
        let max = if f.max_transfer == 0 { MAX_IO } else { f.max_transfer.min(MAX_IO) };
        Limits { request_alignment: align, max_transfer: max.max(align), opt_transfer: f.opt_transfer }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn is_format(&self) -> bool {
        true
    }
    fn children(&self) -> Vec<Child> {
        vec![Child { role: ChildRole::File, node: self.file.clone() }]
    }
    fn allocated_size(&self) -> Option<u64> {
        self.file.allocated_size()
    }
    fn encrypted(&self) -> bool {
        true
    }
    fn format_specific(&self) -> Option<serde_json::Value> {
        let data = self.header.lock().unwrap_or_else(|e| e.into_inner()).info_json();
        Some(serde_json::json!({ "type": "luks", "data": data }))
    }
    fn create_queue(&self) -> BlockResult<Rc<dyn NodeQueue>> {
        let cipher = self.cipher.clone().ok_or_else(|| {
            BlockError::new(ErrorKind::PermissionDenied, "The LUKS image was opened without its key and cannot do I/O")
        })?;
        Ok(Rc::new(LuksQueue(Rc::new(QueueInner { file: Queue::new(self.file.clone())?, payload: self.payload, cipher }))))
    }
    fn truncate(&self, size: u64, prealloc: Prealloc) -> LocalBoxFuture<'_, BlockResult<()>> {
        Box::pin(async move {
            let total = size
                .checked_add(self.payload)
                .ok_or_else(|| BlockError::new(ErrorKind::OutOfBounds, "Image size is too large for the LUKS payload offset"))?;
            self.file.truncate(total, prealloc).await
        })
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

struct QueueInner {
    file: Queue,
    payload: u64,
    cipher: Arc<SectorCipher>,
}

/// The data path on one reactor; requests share its state through an `Rc` (no atomics).
struct LuksQueue(Rc<QueueInner>);

impl NodeQueue for LuksQueue {
    fn read(&self, off: u64, buf: IoBuf) -> IoFuture {
        let inner = self.0.clone();
        let f = inner.file.read(inner.payload + off, buf);
        IoFuture::boxed(async move {
            let mut d = f.await;
            if d.res.is_ok() {
                if let Some(b) = d.buf.as_mut() {
                    if inner.cipher.decrypt(off / SECTOR_SIZE as u64, b.as_mut_slice()).is_err() {
                        d.res = Err(IoStatus::EIO);
                    }
                }
            }
            d
        })
    }
    fn write(&self, off: u64, buf: IoBuf, flags: WriteFlags) -> IoFuture {
        let inner = self.0.clone();
        IoFuture::boxed(async move {
            let mut bounce = IoBuf::new_uninit(buf.len());
            bounce.as_mut_slice().copy_from_slice(buf.as_slice());
            if inner.cipher.encrypt(off / SECTOR_SIZE as u64, bounce.as_mut_slice()).is_err() {
                return IoDone { buf: Some(buf), res: Err(IoStatus::EIO) };
            }
            let d = inner.file.write(inner.payload + off, bounce, flags).await;
            IoDone { buf: Some(buf), res: d.res }
        })
    }
    fn flush(&self) -> IoFuture {
        self.0.file.flush()
    }
}

/// The options of `qemu-img amend` for `luks` images.
pub fn amend_opts() -> Vec<CreateOptDesc> {
    LUKS_AMEND_OPTS.to_vec()
}

impl LuksNode {
    /// Add or erase key slots (`qemu-img amend -o state=...`); `secrets` resolves the secret
    /// ids, `force` is `--force`. Options other than the key slot ones are refused by name.
    pub async fn amend(&self, mut opts: Opts, secrets: &Secrets, force: bool) -> BlockResult<()> {
        let o = LuksAmendOpts::take(&mut opts, "")?;
        if let Some(k) = opts.keys().next() {
            return Err(BlockError::option(format!("Invalid parameter '{k}'")));
        }
        if self.read_only {
            return Err(BlockError::new(ErrorKind::PermissionDenied, "Image is read-only"));
        }
        let mk = self.master_key.as_ref().ok_or_else(key_secret_required)?;
        let queue = Queue::new(self.file.clone())?;
        let area = LuksArea { queue: &queue, base: 0, len: self.payload };
        let mut h = self.header.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let r = amend_keyslots(&mut h, mk, &area, &o, secrets, force).await;
        // What reached the disk (an erase that failed after deactivating its slot included).
        *self.header.lock().unwrap_or_else(|e| e.into_inner()) = h;
        r
    }
}

/// Create a `luks` image of `size` guest bytes at `filename`.
async fn create(graph: &Graph, filename: &str, size: u64, mut opts: Opts) -> BlockResult<()> {
    let (o, key_secret) = take_luks_create_opts(&mut opts)?;
    let id = key_secret.ok_or_else(key_secret_required)?;
    let password = graph.secrets().get_utf8(&id)?;
    let new = luks_create(&o, password.as_bytes())?;
    let total = size.checked_add(new.header.payload_offset()).ok_or_else(|| {
        let mut e = BlockError::new(ErrorKind::OutOfBounds, "The image size is too large for file format 'luks'");
        e.errno = Some(libc::EFBIG);
        e
    })?;
    // What is left (preallocation, nocow...) goes to the protocol.
    let proto = graph.registry().protocol_for(filename).or_else(|| graph.registry().get("file"));
    let proto = proto.ok_or_else(|| BlockError::new(ErrorKind::NotFound, "Unknown protocol"))?;
    proto.create(graph, filename, total, opts).await?;
    let mut flags = OpenFlags::read_write();
    flags.perm = Perm::CONSISTENT_READ.with(Perm::WRITE);
    let mut fo = Opts::new();
    fo.set("filename", filename);
    let file = graph.open_protocol(fo, flags).await?;
    let q = Queue::new(file.clone())?;
    let ctx = |e| BlockError::from(e).context(format!("Could not write LUKS header to '{filename}'"));
    q.write(0, IoBuf::from_slice(&new.area), WriteFlags::default()).await.res.map_err(ctx)?;
    q.flush().await.res.map_err(ctx)?;
    graph.remove(file.node_name());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{CipherAlg, CipherMode, HashAlg, IvGenAlg};

    #[test]
    fn create_options() {
        let mut o = Opts::parse_keyval(
            "key-secret=s,cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha1,hash-alg=sha512,iter-time=10,preallocation=full",
            None,
        )
        .unwrap();
        let (c, k) = take_luks_create_opts(&mut o).unwrap();
        assert_eq!(k.as_deref(), Some("s"));
        assert_eq!(
            (c.alg, c.mode, c.ivgen, c.ivgen_hash, c.hash, c.iter_time_ms),
            (CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv, Some(HashAlg::Sha1), HashAlg::Sha512, 10)
        );
        assert_eq!(o.get_str("preallocation").as_deref(), Some("full"));
        let e = |s: &str| take_luks_create_opts(&mut Opts::parse_keyval(s, None).unwrap()).unwrap_err().msg;
        assert_eq!(e("cipher-mode=foo"), "Parameter 'cipher-mode' does not accept value 'foo'");
        assert_eq!(e("cipher-alg=foo"), "Parameter 'cipher-alg' does not accept value 'foo'");
        assert!(e("cipher-alg=twofish-128").contains("not supported"));
        assert_eq!(e("detached-header=off"), "Parameter 'detached-header' is unexpected");
        assert!(e("iter-time=x").contains("iter-time"));
    }

    #[test]
    fn probe() {
        let mut head = vec![0u8; 2048];
        assert_eq!(LUKS.probe(&head, ""), 0);
        head[..6].copy_from_slice(LUKS_MAGIC);
        assert_eq!(LUKS.probe(&head, ""), 100);
    }
}
