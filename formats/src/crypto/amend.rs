//! LUKS key slot management, as `qemu-img amend` does it (QEMU's `QCryptoBlockAmendOptionsLUKS`
//! and `qcrypto_block_luks_amend_options`): `state=active,new-secret=ID[,keyslot=N][,iter-time=MS]`
//! adds a passphrase to a key slot, `state=inactive` with `old-secret=ID` (every slot it opens)
//! or `keyslot=N` erases slots. Shared by the `luks` format (options as named here) and qcow2
//! (`encrypt.` before each name).
//!
//! Every refusal is QEMU's, word for word and in QEMU's order: a missing or invalid `state`,
//! options that do not belong to the operation, a keyslot outside 0..=7, overwriting an active
//! slot, erasing an inactive one or the last active one (those three allowed with `--force`),
//! no slot matching the old passphrase.
//!
//! Crash safety (QEMU's order): a new key's material is written and flushed before the header
//! that activates its slot; an erase writes and flushes the header that deactivates the slot
//! before overwriting the material (16 passes of random bytes). The header is rewritten in one
//! sector-aligned write of its first two sectors (592 bytes of header, the rest as read), so a
//! torn write cannot reach key material. The in-memory header changes only once the disk has.
//!
//! The I/O goes through a [`Queue`] on the node holding the LUKS area, at the area's byte
//! offset; nothing is written outside `area_len` bytes from it.

use basalt_engine::{BlockError, BlockResult, CreateOptDesc, ErrorKind, IoStatus, Opts, Queue, Secrets};
use basalt_reactor::IoBuf;
use zeroize::Zeroizing;

use super::luks::{slot_iterations, LuksHeader, LUKS_HEADER_LEN, LUKS_SLOTS};
use super::{CryptoError, SECTOR_SIZE};

/// `iter-time` when none is given (QEMU's default).
const DEFAULT_ITER_TIME_MS: u64 = 2000;
/// Passes of random bytes over an erased slot's key material (QEMU's count).
const ERASE_PASSES: usize = 16;

/// The amend options of a LUKS volume, without prefix, in QEMU's order.
pub const LUKS_AMEND_OPTS: &[CreateOptDesc] = &[
    CreateOptDesc { name: "state", kind: "str", help: "Select new state of affected keyslots (active/inactive)" },
    CreateOptDesc { name: "keyslot", kind: "num", help: "Select a single keyslot to modify explicitly" },
    CreateOptDesc { name: "old-secret", kind: "str", help: "Select all keyslots that match this password" },
    CreateOptDesc { name: "new-secret", kind: "str", help: "New secret to set in the matching keyslots. Empty string to erase" },
    CreateOptDesc { name: "iter-time", kind: "num", help: "Time to spend in PBKDF in milliseconds" },
];

/// Key slot amend options as given (values checked as QEMU's option parser checks them; the
/// rules between them are checked when they are applied, as QEMU does).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LuksAmendOpts {
    /// `state`: `active` or `inactive` (required).
    pub state: Option<String>,
    /// `keyslot`, as the 64-bit value QEMU parses.
    pub keyslot: Option<i64>,
    /// `old-secret`: id of the secret whose slots to erase.
    pub old_secret: Option<String>,
    /// `new-secret`: id of the secret to add.
    pub new_secret: Option<String>,
    /// `iter-time` in milliseconds, as the 64-bit value QEMU parses.
    pub iter_time: Option<i64>,
}

/// QEMU's `QEMU_OPT_NUMBER` parsing (`qemu_strtou64`, base 0, a leading `-` negates modulo
/// 2^64), then read back as the signed 64-bit value QAPI visits.
fn qemu_number(v: &str) -> Option<i64> {
    let t = v.trim_start();
    let (neg, digits) = match t.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    if digits.starts_with(['-', '+']) || digits.trim_start() != digits {
        return None;
    }
    let n = if let Some(h) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).ok()?
    } else {
        digits.parse::<u64>().ok()?
    };
    let n = if neg { n.wrapping_neg() } else { n };
    Some(n as i64)
}

impl LuksAmendOpts {
    /// Take the key slot options out of `opts` (names without prefix); `prefix` is how the
    /// user named them (`encrypt.` for qcow2), for QEMU's messages about their values.
    pub fn take(opts: &mut Opts, prefix: &str) -> BlockResult<LuksAmendOpts> {
        let mut num = |key: &str| -> BlockResult<Option<i64>> {
            match opts.take_str(key) {
                None => Ok(None),
                Some(v) => qemu_number(&v)
                    .map(Some)
                    .ok_or_else(|| BlockError::option(format!("Parameter '{prefix}{key}' expects a number"))),
            }
        };
        let keyslot = num("keyslot")?;
        let iter_time = num("iter-time")?;
        Ok(LuksAmendOpts {
            state: opts.take_str("state"),
            keyslot,
            old_secret: opts.take_str("old-secret"),
            new_secret: opts.take_str("new-secret"),
            iter_time,
        })
    }

    /// Whether no option was given.
    pub fn is_empty(&self) -> bool {
        *self == LuksAmendOpts::default()
    }
}

/// Where a LUKS area lies: the node's queue, the area's byte offset in it, and its length
/// (qcow2's encryption header extension; the payload offset for the `luks` format).
pub struct LuksArea<'a> {
    /// I/O on the node holding the area.
    pub queue: &'a Queue,
    /// Byte offset of the area (of the LUKS header) in that node.
    pub base: u64,
    /// Bytes the area spans; nothing is read or written past it.
    pub len: u64,
}

fn io_err(what: &'static str) -> impl Fn(IoStatus) -> BlockError {
    move |e| BlockError::from(e).context(what)
}

impl LuksArea<'_> {
    fn check(&self, off: u64, len: usize) -> BlockResult<()> {
        if off.checked_add(len as u64).is_none_or(|end| end > self.len) {
            return Err(BlockError::new(ErrorKind::OutOfBounds, "Request for data outside of extension header"));
        }
        Ok(())
    }

    async fn read(&self, off: u64, len: usize) -> BlockResult<Zeroizing<Vec<u8>>> {
        self.check(off, len)?;
        let d = self.queue.read(self.base + off, IoBuf::new_uninit(len)).await;
        d.res.map_err(io_err("Could not read LUKS key material"))?;
        Ok(Zeroizing::new(d.buf.expect("read returns its buffer").to_vec()))
    }

    async fn write(&self, off: u64, data: &[u8], what: &'static str) -> BlockResult<()> {
        self.check(off, data.len())?;
        let d = self.queue.write(self.base + off, IoBuf::from_slice(data), Default::default()).await;
        d.res.map(drop).map_err(io_err(what))
    }

    async fn flush(&self) -> BlockResult<()> {
        self.queue.flush().await.res.map(drop).map_err(io_err("Could not flush the LUKS header"))
    }

    /// Write `h`'s 592 bytes over the first sectors of the area (the rest of those sectors as
    /// they are) and flush.
    async fn store_header(&self, h: &LuksHeader) -> BlockResult<()> {
        let len = LUKS_HEADER_LEN.next_multiple_of(SECTOR_SIZE);
        let mut head = self.read(0, len).await?;
        head[..LUKS_HEADER_LEN].copy_from_slice(&h.to_bytes());
        self.write(0, &head, "Could not write the LUKS header").await?;
        self.flush().await
    }

    /// Whether `password` opens slot `i` (QEMU's `load_key`: false for an inactive slot).
    async fn slot_opens(&self, h: &LuksHeader, i: usize, password: &[u8]) -> BlockResult<bool> {
        if !h.slots[i].active {
            return Ok(false);
        }
        let (off, len) = h.slot_range(i);
        let material = self.read(off, len).await?;
        Ok(h.slot_opens(i, password, &material)?)
    }
}

fn refuse(msg: impl Into<String>) -> BlockError {
    BlockError::option(msg)
}

/// Apply `o` to the LUKS volume whose header is `header` (updated on success) and whose master
/// key is `master_key` (unlocked when the image was opened, as QEMU unlocks it again with the
/// secret the image was opened with). `force` is `qemu-img amend --force`.
pub async fn amend_keyslots(
    header: &mut LuksHeader,
    master_key: &[u8],
    area: &LuksArea<'_>,
    o: &LuksAmendOpts,
    secrets: &Secrets,
    force: bool,
) -> BlockResult<()> {
    let state = o.state.as_deref().ok_or_else(|| refuse("Parameter 'state' is missing"))?;
    match state {
        "active" => add_keyslot(header, master_key, area, o, secrets, force).await,
        "inactive" => erase_keyslots(header, area, o, secrets, force).await,
        v => Err(refuse(format!("Parameter 'state' does not accept value '{v}'"))),
    }
}

async fn add_keyslot(
    header: &mut LuksHeader,
    master_key: &[u8],
    area: &LuksArea<'_>,
    o: &LuksAmendOpts,
    secrets: &Secrets,
    force: bool,
) -> BlockResult<()> {
    let new_secret = o.new_secret.as_deref().ok_or_else(|| refuse("'new-secret' is required to activate a keyslot"))?;
    if o.old_secret.is_some() {
        return Err(refuse("'old-secret' must not be given when activating keyslots"));
    }
    let slot = match o.keyslot {
        // QEMU keeps the slot in a C int and prints it unsigned here.
        Some(k) => {
            let k = k as i32;
            if !(0..LUKS_SLOTS as i32).contains(&k) {
                return Err(refuse(format!("Invalid keyslot {} specified, must be between 0 and {}", k as u32, LUKS_SLOTS - 1)));
            }
            k as usize
        }
        None => {
            header.slots.iter().position(|s| !s.active).ok_or_else(|| refuse("Can't add a keyslot - all keyslots are in use"))?
        }
    };
    if !force && header.slots[slot].active {
        return Err(refuse(format!("Refusing to overwrite active keyslot {slot} - please erase it first")));
    }
    let password = secrets.get_utf8(new_secret)?;
    let iter_time = o.iter_time.map_or(DEFAULT_ITER_TIME_MS, |t| t as u64);
    let mut h = header.clone();
    let stored = async {
        let iterations = slot_iterations(h.hash, h.key_bytes as usize, iter_time)?;
        let material = h.prepare_slot(slot, password.as_bytes(), master_key, iterations)?;
        let (off, _) = h.slot_range(slot);
        area.write(off, &material, "Could not write LUKS key material").await?;
        area.flush().await?;
        h.slots[slot].active = true;
        area.store_header(&h).await
    }
    .await;
    stored.map_err(|e: BlockError| BlockError { msg: format!("{}\nFailed to write to keyslot {slot}", e.msg), ..e })?;
    *header = h;
    Ok(())
}

/// Deactivate slot `i` in the header (written and flushed), then overwrite its material.
async fn erase_key(header: &mut LuksHeader, area: &LuksArea<'_>, i: usize) -> BlockResult<()> {
    let mut h = header.clone();
    h.clear_slot(i);
    area.store_header(&h).await?;
    *header = h;
    let (off, len) = header.slot_range(i);
    let mut garbage = Zeroizing::new(vec![0u8; len]);
    for _ in 0..ERASE_PASSES {
        getrandom::fill(&mut garbage).map_err(|e| BlockError::from(CryptoError::Random(e.to_string())))?;
        area.write(off, &garbage, "Could not erase LUKS key material").await?;
    }
    area.flush().await
}

async fn erase_keyslots(
    header: &mut LuksHeader,
    area: &LuksArea<'_>,
    o: &LuksAmendOpts,
    secrets: &Secrets,
    force: bool,
) -> BlockResult<()> {
    if o.new_secret.is_some() {
        return Err(refuse("'new-secret' must not be given when erasing keyslots"));
    }
    if o.iter_time.is_some() {
        return Err(refuse("'iter-time' must not be given when erasing keyslots"));
    }
    let old = match &o.old_secret {
        Some(id) => Some(secrets.get_utf8(id)?),
        None => None,
    };
    if let Some(k) = o.keyslot {
        let k = k as i32;
        if !(0..LUKS_SLOTS as i32).contains(&k) {
            return Err(refuse(format!("Invalid keyslot {k} specified, must be between 0 and {}", LUKS_SLOTS - 1)));
        }
        let slot = k as usize;
        if let Some(pw) = &old {
            if !area.slot_opens(header, slot, pw.as_bytes()).await? {
                return Err(refuse(format!("Given keyslot {slot} doesn't contain the given old password for erase operation")));
            }
        }
        if !force && !header.slots[slot].active {
            // QEMU's message ends in a space.
            return Err(refuse(format!("Given keyslot {slot} is already erased (inactive) ")));
        }
        if !force && header.active_slots() == 1 {
            return Err(refuse(format!(
                "Attempt to erase the only active keyslot {slot} which will erase all the data in the image \
                 irreversibly - refusing operation"
            )));
        }
        return erase_key(header, area, slot)
            .await
            .map_err(|e| BlockError { msg: format!("{}\nFailed to erase keyslot {slot}", e.msg), ..e });
    }
    let Some(pw) = old else {
        return Err(refuse(
            "To erase keyslot(s), either explicit keyslot index or the password currently contained in them must be given",
        ));
    };
    let mut matching = Vec::new();
    for i in 0..LUKS_SLOTS {
        if area.slot_opens(header, i, pw.as_bytes()).await? {
            matching.push(i);
        }
    }
    if matching.is_empty() {
        return Err(refuse("No keyslots match given (old) password for erase operation"));
    }
    if !force && matching.len() == header.active_slots() {
        return Err(refuse(
            "All the active keyslots match the (old) password that was given and erasing them will erase all the data \
             in the image irreversibly - refusing operation",
        ));
    }
    for i in matching {
        erase_key(header, area, i)
            .await
            .map_err(|e| BlockError { msg: format!("{}\nFailed to erase keyslot {i}", e.msg), ..e })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_as_qemu_opts_do() {
        assert_eq!(qemu_number("3"), Some(3));
        assert_eq!(qemu_number("0x3"), Some(3));
        assert_eq!(qemu_number("010"), Some(8));
        assert_eq!(qemu_number("-1"), Some(-1));
        assert_eq!(qemu_number("4294967296"), Some(1 << 32));
        assert_eq!(qemu_number("x"), None);
        assert_eq!(qemu_number(""), None);
        assert_eq!(qemu_number("1k"), None);
        assert_eq!(qemu_number("--1"), None);
    }

    #[test]
    fn options_taken_with_their_prefix_in_messages() {
        let mut o = Opts::parse_keyval("state=active,new-secret=s1,keyslot=2,iter-time=10,other=x", None).unwrap();
        let a = LuksAmendOpts::take(&mut o, "").unwrap();
        assert_eq!(
            a,
            LuksAmendOpts {
                state: Some("active".into()),
                keyslot: Some(2),
                old_secret: None,
                new_secret: Some("s1".into()),
                iter_time: Some(10)
            }
        );
        assert_eq!(o.keys().collect::<Vec<_>>(), ["other"]);
        let e = LuksAmendOpts::take(&mut Opts::parse_keyval("keyslot=x", None).unwrap(), "encrypt.").unwrap_err();
        assert_eq!(e.msg, "Parameter 'encrypt.keyslot' expects a number");
        assert!(LuksAmendOpts::take(&mut Opts::new(), "").unwrap().is_empty());
    }
}
