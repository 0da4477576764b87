//! qcow2 encryption: `encrypt.format=luks` (crypt method 2) and the legacy `aes` (crypt method
//! 1), as QEMU reads, writes and creates them.
//!
//! - LUKS: the full disk encryption header extension (0x0537be77: offset and length) locates a
//!   LUKS1 header and its key material in clusters of the image file, which the refcounts
//!   count. Data sectors are encrypted with the IV of their *host* sector (file offset / 512).
//! - AES: AES-128-CBC keyed with the passphrase, IVs from the *guest* sector; no extension.
//!
//! Metadata is never encrypted; compressed clusters are not either (QEMU stores them as they
//! are, so they are read that way; Basalt refuses to write new ones into an encrypted image).
//! Opening needs `encrypt.key-secret` unless the open does no I/O (`qemu-img info`), in which
//! case the LUKS header is parsed for `info` but no key slot is unlocked. Every field of the
//! extension is checked (size, alignment, bounds within the file) before anything is read.

use std::sync::Arc;

use basalt_engine::{BlockError, BlockResult, ErrorKind, Graph, IoStatus, Opts, Queue, ZeroFlags};
use basalt_reactor::IoBuf;

use crate::crypto::{luks_create, LuksHeader, LuksNew, SectorCipher, LUKS_HEADER_LEN, SECTOR_SIZE};
use crate::qcow2::header::{Extension, Qcow2Header};

/// Header extension: full disk encryption header pointer.
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
/// `crypt_method`: legacy AES.
pub(crate) const CRYPT_AES: u32 = 1;
/// `crypt_method`: LUKS.
pub(crate) const CRYPT_LUKS: u32 = 2;

/// Most of the LUKS area read to unlock a key slot.
const MAX_UNLOCK_AREA: u64 = 64 << 20;

/// Which encryption an image uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CryptMethod {
    /// Legacy qcow AES-CBC.
    Aes,
    /// LUKS1 header in the image.
    Luks,
}

impl CryptMethod {
    fn name(self) -> &'static str {
        match self {
            CryptMethod::Aes => "aes",
            CryptMethod::Luks => "luks",
        }
    }

    fn header_value(self) -> u32 {
        match self {
            CryptMethod::Aes => CRYPT_AES,
            CryptMethod::Luks => CRYPT_LUKS,
        }
    }
}

/// The encryption of an open image.
pub(crate) struct Qcow2Crypt {
    pub method: CryptMethod,
    /// The LUKS header area in the file: (offset, length).
    pub fde: Option<(u64, u64)>,
    /// Boxed: an open image's shared state stays small (opening a backing chain nests opens).
    /// Changed only by `amend` (key slots), once the disk holds the change.
    pub luks: Option<Box<std::sync::Mutex<LuksHeader>>>,
    /// `None` when opened without I/O (no key).
    cipher: Option<Arc<SectorCipher>>,
    /// The LUKS master key, for `amend` to store in new key slots (`None` without the key).
    pub master_key: Option<zeroize::Zeroizing<Vec<u8>>>,
}

impl Qcow2Crypt {
    /// Whether data can be read and written (the key was given and unlocked).
    pub fn has_key(&self) -> bool {
        self.cipher.is_some()
    }

    /// The cipher's sector number for data at guest offset `guest` stored at `host`.
    fn sector(&self, guest: u64, host: u64) -> u64 {
        match self.method {
            CryptMethod::Luks => host / SECTOR_SIZE as u64,
            CryptMethod::Aes => guest / SECTOR_SIZE as u64,
        }
    }

    /// Encrypt `buf` (whole sectors) in place: guest data at `guest`, going to host offset `host`.
    pub fn encrypt(&self, guest: u64, host: u64, buf: &mut [u8]) -> Result<(), IoStatus> {
        let c = self.cipher.as_ref().ok_or(IoStatus::EIO)?;
        c.encrypt(self.sector(guest, host), buf).map_err(|_| IoStatus::EIO)
    }

    /// Decrypt `buf` (whole sectors) in place: guest data at `guest`, read from host offset `host`.
    pub fn decrypt(&self, guest: u64, host: u64, buf: &mut [u8]) -> Result<(), IoStatus> {
        let c = self.cipher.as_ref().ok_or(IoStatus::EIO)?;
        c.decrypt(self.sector(guest, host), buf).map_err(|_| IoStatus::EIO)
    }

    /// A copy of `data` encrypted for guest offset `guest` at host offset `host`: the caller's
    /// buffer is never modified.
    pub fn encrypted_copy(&self, guest: u64, host: u64, data: &[u8]) -> Result<IoBuf, IoStatus> {
        let mut b = IoBuf::from_slice(data);
        self.encrypt(guest, host, b.as_mut_slice())?;
        Ok(b)
    }

    /// qcow2's format-specific `encrypt` object: `{"format": "aes"}`, or the LUKS header's
    /// fields after `"format": "luks"`.
    pub fn info_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("format".into(), self.method.name().into());
        if let Some(serde_json::Value::Object(l)) =
            self.luks.as_ref().map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).info_json())
        {
            m.extend(l);
        }
        serde_json::Value::Object(m)
    }
}

fn invalid(msg: impl Into<String>) -> BlockError {
    BlockError::new(ErrorKind::InvalidFormat, msg)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// The FDE extension's (offset, length), validated against the header and the file: present
/// exactly when the crypt method is LUKS, 16 bytes, cluster aligned, after the header cluster,
/// within the file and long enough for a LUKS header.
pub(crate) fn parse_fde(h: &Qcow2Header, file_size: u64) -> BlockResult<Option<(u64, u64)>> {
    let cs = h.cluster_size();
    if h.crypt_method > CRYPT_LUKS {
        return Err(BlockError::new(ErrorKind::Unsupported, format!("Unsupported encryption method {}", h.crypt_method)));
    }
    let mut found = None;
    for e in h.extensions.iter().filter(|e| e.kind == EXT_CRYPTO) {
        if h.crypt_method != CRYPT_LUKS {
            return Err(invalid("CRYPTO header extension only expected with LUKS encryption method"));
        }
        if e.data.len() != 16 {
            return Err(invalid(format!("CRYPTO header extension size {}, but expected size 16", e.data.len())));
        }
        if found.is_some() {
            return Err(invalid("CRYPTO header extension appears more than once"));
        }
        let (off, len) = (be64(&e.data[..8]), be64(&e.data[8..]));
        if !off.is_multiple_of(cs) {
            return Err(invalid(format!("Encryption header offset '{off}' is not a multiple of cluster size '{cs}'")));
        }
        if off == 0 {
            return Err(invalid("Encryption header offset '0' points at the qcow2 header"));
        }
        if off.checked_add(len).is_none_or(|end| end > file_size.next_multiple_of(cs)) {
            return Err(invalid(format!(
                "Encryption header (offset {off}, length {len}) lies past the end of the image file ({file_size} bytes)"
            )));
        }
        if len < LUKS_HEADER_LEN as u64 {
            return Err(invalid(format!(
                "Request for data outside of extension header: the encryption header is {len} bytes, a LUKS header \
                 needs {LUKS_HEADER_LEN}"
            )));
        }
        found = Some((off, len));
    }
    if h.crypt_method == CRYPT_LUKS && found.is_none() {
        return Err(invalid("Missing CRYPTO header for crypt method 2"));
    }
    Ok(found)
}

/// The `encrypt.*` open options.
#[derive(Default)]
pub(crate) struct OpenCrypt {
    /// `encrypt.format`, as given.
    pub format: Option<String>,
    /// `encrypt.key-secret`.
    pub key_secret: Option<String>,
    /// Anything else under `encrypt.` (refused when the image is encrypted, as QEMU does).
    rest: Opts,
}

/// Take the `encrypt.*` options of an open.
pub(crate) fn take_open_opts(opts: &mut Opts) -> OpenCrypt {
    let mut rest = opts.take_sub("encrypt");
    let format = rest.take_str("format");
    let key_secret = rest.take_str("key-secret");
    OpenCrypt { format, key_secret, rest }
}

fn key_required() -> BlockError {
    BlockError::option("Parameter 'encrypt.key-secret' is required for cipher")
}

/// Set up the encryption of an image being opened (`None` for a plain one). `no_io` opens
/// (`info`) need no key and unlock nothing.
pub(crate) async fn open(
    graph: &Graph,
    fq: &Queue,
    h: &Qcow2Header,
    file_size: u64,
    o: &OpenCrypt,
    no_io: bool,
) -> BlockResult<Option<Qcow2Crypt>> {
    let fde = parse_fde(h, file_size)?;
    let method = match h.crypt_method {
        0 => {
            if let Some(f) = &o.format {
                return Err(BlockError::option(format!("No encryption in image header, but options specified format '{f}'")));
            }
            return Ok(None);
        }
        CRYPT_AES => CryptMethod::Aes,
        _ => CryptMethod::Luks,
    };
    if let Some(f) = o.format.as_deref().filter(|f| *f != method.name()) {
        return Err(BlockError::option(format!(
            "Header reported '{}' encryption format but options specify '{f}'",
            method.name()
        )));
    }
    if let Some(k) = o.rest.keys().next() {
        return Err(BlockError::option(format!("Parameter '{k}' is unexpected")));
    }
    if o.key_secret.is_none() && !no_io {
        return Err(key_required());
    }
    let key_secret = o.key_secret.as_deref().filter(|_| !no_io);
    let (luks, cipher, master_key) = match method {
        CryptMethod::Aes => {
            let cipher = match key_secret {
                Some(id) => Some(Arc::new(SectorCipher::qcow_aes(graph.secrets().get_utf8(id)?.as_bytes()))),
                None => None,
            };
            (None, cipher, None)
        }
        CryptMethod::Luks => {
            let (off, len) = fde.ok_or_else(|| invalid("Missing CRYPTO header for crypt method 2"))?;
            let head = read(fq, off, LUKS_HEADER_LEN, "LUKS header").await?;
            let luks = LuksHeader::parse(&head).map_err(BlockError::from)?;
            let cipher = match key_secret {
                Some(id) => {
                    // Only what unlocking reads must lie in the area (QEMU describes an image
                    // without the key from the header alone).
                    luks.check_area(len, false)
                        .map_err(|e| invalid(format!("{e}; the qcow2 encryption header area is {len} bytes")))?;
                    let password = graph.secrets().get_utf8(id)?;
                    // Within the extension's length, itself within the file (checked above), and
                    // read whole: capped (QEMU's layouts need about 2 MiB).
                    let area_len = luks.unlock_area_len();
                    if area_len > MAX_UNLOCK_AREA {
                        return Err(BlockError::new(
                            ErrorKind::OutOfBounds,
                            format!(
                                "LUKS key material ends {area_len} bytes into the encryption header area \
                                 (more than {MAX_UNLOCK_AREA} is not supported)"
                            ),
                        ));
                    }
                    let area_len = area_len as usize;
                    let area = zeroize::Zeroizing::new(read(fq, off, area_len, "LUKS key material").await?);
                    let mk = luks.unlock(password.as_bytes(), &area)?;
                    (Some(Arc::new(luks.sector_cipher(&mk)?)), Some(mk))
                }
                None => (None, None),
            };
            let (cipher, master_key) = cipher;
            (Some(Box::new(std::sync::Mutex::new(luks))), cipher, master_key)
        }
    };
    Ok(Some(Qcow2Crypt { method, fde, luks, cipher, master_key }))
}

/// The node's filename when `encrypt.key-secret` was given: QEMU keeps that option (the only
/// one qcow2 counts as part of the image's identity) in a `json:` filename, as a dotted key.
pub(crate) fn json_filename(file: &Arc<dyn basalt_engine::Node>, key_secret: &str) -> BlockResult<String> {
    let child = file.filename();
    let file_json = match child.strip_prefix("json:") {
        Some(j) => serde_json::from_str(j).map_err(|e| BlockError::option(format!("Invalid JSON filename '{child}': {e}")))?,
        None => serde_json::json!({ "driver": file.driver(), "filename": child }),
    };
    let v = serde_json::json!({ "encrypt.key-secret": key_secret, "driver": "qcow2", "file": file_json });
    Ok(basalt_engine::json_filename_of(&v))
}

async fn read(q: &Queue, off: u64, len: usize, what: &str) -> BlockResult<Vec<u8>> {
    let d = q.read(off, IoBuf::new_uninit(len)).await;
    d.res.map_err(|e| BlockError::from(e).context(format!("Could not read {what}")))?;
    Ok(d.buf.expect("read returns its buffer").to_vec())
}

/// Encryption asked for at create time (options parsed, nothing looked up yet).
pub(crate) struct CreateCrypt {
    method: CryptMethod,
    key_secret: Option<String>,
    luks: crate::crypto::LuksCreateOpts,
}

/// What a new image gets: the crypt method and, for LUKS, the new header area.
pub(crate) struct NewCrypt {
    pub method: CryptMethod,
    pub luks: Option<LuksNew>,
}

impl NewCrypt {
    /// The crypt method for the header.
    pub fn header_value(&self) -> u32 {
        self.method.header_value()
    }

    /// Length of the LUKS header area (the FDE extension's length): the LUKS payload offset.
    pub fn area_len(&self) -> u64 {
        self.luks.as_ref().map_or(0, |l| l.header.payload_offset())
    }

    /// The FDE extension for an area at `off`.
    pub fn extension(&self, off: u64) -> Extension {
        let mut data = off.to_be_bytes().to_vec();
        data.extend_from_slice(&self.area_len().to_be_bytes());
        Extension { kind: EXT_CRYPTO, data }
    }
}

/// Parse the create options `encryption` (deprecated: `on` means `encrypt.format=aes`) and
/// `encrypt.*`, with qemu-img's messages. `None`: no encryption.
pub(crate) fn parse_create_opts(opts: &mut Opts) -> BlockResult<Option<CreateCrypt>> {
    let legacy = opts.take_str("encryption");
    let mut sub = opts.take_sub("encrypt");
    let given = sub.take_str("format");
    let alias = || BlockError::option("'encrypt.format' and its alias 'encryption' can't be used at the same time");
    let format = match legacy.as_deref() {
        None | Some("off") => given,
        Some(_) if given.is_some() => return Err(alias()),
        Some("on") => Some("aes".to_string()),
        // QEMU renames any other value to encrypt.format, which then refuses it.
        Some(v) => Some(v.to_string()),
    };
    let Some(format) = format else {
        if !sub.is_empty() {
            return Err(BlockError::option("Parameter 'encrypt.format' is missing"));
        }
        return Ok(None);
    };
    match format.as_str() {
        // "qcow" is QEMU's internal name of the aes format, which it accepts too.
        "aes" | "qcow" => {
            let key_secret = sub.take_str("key-secret");
            const LUKS_ONLY: &[&str] = &["cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg", "iter-time"];
            let unexpected = LUKS_ONLY.iter().copied().find(|k| sub.contains(k)).or_else(|| sub.keys().next());
            if let Some(k) = unexpected {
                return Err(BlockError::option(format!("Parameter 'encrypt.{k}' is unexpected")));
            }
            Ok(Some(CreateCrypt { method: CryptMethod::Aes, key_secret, luks: Default::default() }))
        }
        "luks" => {
            let (luks, key_secret) = crate::crypto::take_luks_create_opts(&mut sub)?;
            if let Some(k) = sub.keys().next() {
                return Err(BlockError::option(format!("Parameter 'encrypt.{k}' is unexpected")));
            }
            Ok(Some(CreateCrypt { method: CryptMethod::Luks, key_secret, luks }))
        }
        other => Err(BlockError::option(format!("Parameter 'format' does not accept value '{other}'"))),
    }
}

impl CreateCrypt {
    /// Look up the passphrase and, for LUKS, build the header (PBKDF2 timed by `iter-time`).
    pub fn build(&self, graph: &Graph) -> BlockResult<NewCrypt> {
        let id = self.key_secret.as_deref().ok_or_else(key_required)?;
        let password = graph.secrets().get_utf8(id)?;
        let luks = match self.method {
            CryptMethod::Aes => None,
            CryptMethod::Luks => Some(luks_create(&self.luks, password.as_bytes())?),
        };
        Ok(NewCrypt { method: self.method, luks })
    }
}

/// Where QEMU's allocator puts `n` clusters allocated next in a new image whose first `used`
/// clusters are all in use and whose refcount table is `table` (refcount block cluster per
/// entry, 0 for none): at `used`, with a refcount block for each range they enter that has
/// none, taken from the clusters after them (a block for a range that does not contain it gets
/// its own refcount counted first, possibly by another new block). Returns the start and the
/// new blocks, or `None` when a block would be needed past the end of `table` (QEMU would
/// grow the refcount table there).
pub(crate) fn qemu_placement(table: &mut [u64], used: u64, n: u64, per_block: u64) -> Option<(u64, Vec<u64>)> {
    fn ensure(table: &mut [u64], c: u64, next: &mut u64, per: u64, new: &mut Vec<u64>, depth: u32) -> Option<()> {
        let bi = usize::try_from(c / per).ok()?;
        if *table.get(bi)? != 0 {
            return Some(());
        }
        if depth > 8 {
            return None;
        }
        let b = *next;
        *next += 1;
        if b / per != bi as u64 {
            ensure(table, b, next, per, new, depth + 1)?;
        }
        table[bi] = b;
        new.push(b);
        Some(())
    }
    let mut next = used + n;
    let mut new = Vec::new();
    let mut c = used;
    while c < used + n {
        ensure(table, c, &mut next, per_block, &mut new, 0)?;
        // Clusters of a range whose block exists need nothing: skip to the next range.
        c = (c / per_block + 1) * per_block;
    }
    Some((used, new))
}

impl crate::qcow2::Qcow2Node {
    /// Make this freshly created (and preallocated) plain image encrypted, as QEMU does after
    /// preallocating: the LUKS header area is allocated after everything else, zeroed, and
    /// written, then the header records the crypt method and the FDE extension.
    pub(crate) async fn attach_encryption(&self, new: &NewCrypt) -> BlockResult<()> {
        let file = Queue::new(self.s.file.clone())?;
        let meta = crate::qcow2::meta::MetaIo { s: &self.s, file: &file };
        let fail = |e: IoStatus| BlockError::from(e).context("Could not set up encryption");
        let _g = self.s.alloc.lock().await;
        let mut h = self.header();
        if let Some(luks) = &new.luks {
            let cs = self.s.cs;
            let n = new.area_len().div_ceil(cs);
            let host = meta.alloc_clusters(n).await.map_err(fail)?;
            meta.writeback().await.map_err(fail)?;
            let z = ZeroFlags { may_unmap: false, no_fallback: false, fua: false };
            file.write_zeroes(host, n * cs, z).await.res.map_err(fail)?;
            file.write(host, IoBuf::from_slice(&luks.area), Default::default()).await.res.map_err(fail)?;
            h.extensions.push(new.extension(host));
        }
        h.crypt_method = new.header_value();
        let mut cluster0 = h.serialize().map_err(BlockError::from)?;
        cluster0.resize(self.s.cs as usize, 0);
        file.write(0, IoBuf::from_slice(&cluster0), Default::default()).await.res.map_err(fail)?;
        file.flush().await.res.map_err(fail)?;
        *self.s.hdr.lock().unwrap_or_else(|e| e.into_inner()) = h;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr_with(crypt: u32, ext: Option<Vec<u8>>) -> Qcow2Header {
        let mut b = vec![0u8; 112];
        b[..4].copy_from_slice(&crate::qcow2::header::MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[32..36].copy_from_slice(&crypt.to_be_bytes());
        b[48..56].copy_from_slice(&0x10000u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        if let Some(d) = ext {
            b.extend_from_slice(&EXT_CRYPTO.to_be_bytes());
            b.extend_from_slice(&(d.len() as u32).to_be_bytes());
            b.extend_from_slice(&d);
            b.resize(b.len().next_multiple_of(8), 0);
        }
        b.resize(4096, 0);
        Qcow2Header::parse(&b, 1 << 22).unwrap()
    }

    fn fde(off: u64, len: u64) -> Vec<u8> {
        let mut d = off.to_be_bytes().to_vec();
        d.extend_from_slice(&len.to_be_bytes());
        d
    }

    #[test]
    fn fde_extension_is_checked_field_by_field() {
        let fsize = 0x240000;
        assert_eq!(parse_fde(&hdr_with(2, Some(fde(0x40000, 2068480))), fsize).unwrap(), Some((0x40000, 2068480)));
        assert_eq!(parse_fde(&hdr_with(1, None), fsize).unwrap(), None);
        assert_eq!(parse_fde(&hdr_with(0, None), fsize).unwrap(), None);
        let e = |h: Qcow2Header| parse_fde(&h, fsize).unwrap_err().msg;
        assert_eq!(e(hdr_with(2, None)), "Missing CRYPTO header for crypt method 2");
        assert_eq!(e(hdr_with(3, None)), "Unsupported encryption method 3");
        assert_eq!(e(hdr_with(1, Some(fde(0x40000, 4096)))), "CRYPTO header extension only expected with LUKS encryption method");
        assert_eq!(e(hdr_with(2, Some(vec![0; 8]))), "CRYPTO header extension size 8, but expected size 16");
        assert_eq!(
            e(hdr_with(2, Some(fde(0x40200, 4096)))),
            "Encryption header offset '262656' is not a multiple of cluster size '65536'"
        );
        assert!(e(hdr_with(2, Some(fde(0, 4096)))).contains("qcow2 header"));
        assert!(e(hdr_with(2, Some(fde(0x40000, 1 << 40)))).contains("past the end of the image file"));
        assert!(e(hdr_with(2, Some(fde(!0xffff, 1 << 20)))).contains("past the end"));
        assert!(e(hdr_with(2, Some(fde(0x40000, 100)))).contains("outside of extension header"));
    }

    #[test]
    fn create_options_as_qemu_img_takes_them() {
        let p = |s: &str| parse_create_opts(&mut Opts::parse_keyval(s, None).unwrap());
        let e = |s: &str| p(s).err().unwrap().msg;
        assert!(p("cluster_size=4k").unwrap().is_none());
        assert!(p("encryption=off").unwrap().is_none());
        assert_eq!(p("encryption=on,encrypt.key-secret=s").unwrap().unwrap().method, CryptMethod::Aes);
        assert_eq!(p("encryption=off,encrypt.format=aes").unwrap().unwrap().method, CryptMethod::Aes);
        assert_eq!(p("encrypt.format=qcow").unwrap().unwrap().method, CryptMethod::Aes);
        let l = p("encrypt.format=luks,encrypt.cipher-alg=aes-128,encrypt.iter-time=10,encrypt.key-secret=k").unwrap().unwrap();
        assert_eq!((l.method, l.luks.iter_time_ms, l.key_secret.as_deref()), (CryptMethod::Luks, 10, Some("k")));
        assert_eq!(
            e("encryption=on,encrypt.format=luks"),
            "'encrypt.format' and its alias 'encryption' can't be used at the same time"
        );
        assert_eq!(e("encryption=yes"), "Parameter 'format' does not accept value 'yes'");
        assert_eq!(e("encrypt.format=foo"), "Parameter 'format' does not accept value 'foo'");
        assert_eq!(e("encrypt.key-secret=s"), "Parameter 'encrypt.format' is missing");
        assert_eq!(e("encrypt.format=aes,encrypt.iter-time=10"), "Parameter 'encrypt.iter-time' is unexpected");
        assert_eq!(e("encrypt.format=luks,encrypt.cipher-alg=foo"), "Parameter 'cipher-alg' does not accept value 'foo'");
    }

    #[test]
    fn placement_follows_qemu_allocator() {
        // 512-byte clusters, 16-bit refcounts: 256 clusters a block. After header, table,
        // block and L1 (4 clusters), 4040 LUKS clusters: blocks 1..15 come after them, block 1
        // first at 4044, then block 15 (which describes itself) at 4045, then 4046, ...
        let mut table = vec![0u64; 64];
        table[0] = 2;
        let (start, new) = qemu_placement(&mut table, 4, 4040, 256).unwrap();
        assert_eq!(start, 4);
        assert_eq!(&table[..5], &[2, 4044, 4046, 4047, 4048]);
        assert_eq!(table[15], 4045);
        assert_eq!(new.len(), 15);
        // 64 KiB clusters: one block covers everything.
        let mut table = vec![0u64; 8192];
        table[0] = 2;
        assert_eq!(qemu_placement(&mut table, 4, 32, 32768).unwrap(), (4, vec![]));
        // A table too small: QEMU would grow it; the caller lays out differently.
        let mut table = vec![2u64, 0];
        assert!(qemu_placement(&mut table, 4, 4040, 256).is_none());
    }
}
