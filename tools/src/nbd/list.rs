//! `basalt-nbd -L`: list the exports of a server, printed as `qemu-nbd -L` prints them
//! (names, descriptions, size and flags, block sizes, transaction size, meta contexts).

use basalt_drivers::nbd::negotiate::Handshake;
use basalt_drivers::nbd::proto::tflag;
use basalt_drivers::nbd::target::NbdTarget;

/// Transmission flag names from bit 1 on, as qemu-nbd prints them.
const FLAG_NAMES: [&str; 12] = [
    "readonly",
    "flush",
    "fua",
    "rotational",
    "trim",
    "zeroes",
    "df",
    "multi",
    "resize",
    "cache",
    "fast-zero",
    "block-status-payload",
];

/// List the exports of `t`'s server (over TLS when `t` asks for it, with the credentials
/// objects in `secrets`); the text to print, or the error.
pub fn list(t: &NbdTarget, secrets: &basalt_engine::Secrets) -> Result<String, String> {
    let tls = t.client_tls(secrets).map_err(|e| e.msg)?;
    let fd = t.connect().map_err(|e| e.msg)?;
    let (extended, exports) =
        Handshake::new(fd, std::time::Duration::from_secs(30)).list_details(tls.as_ref()).map_err(|e| e.msg)?;
    let mut o = format!("exports available: {}\n", exports.len());
    for e in exports {
        o += &format!(" export: '{}'\n", e.name);
        if !e.description.is_empty() {
            o += &format!("  description: {}\n", e.description);
        }
        let n = &e.info;
        if n.tflags & tflag::HAS_FLAGS != 0 {
            o += &format!("  size:  {}\n", n.size);
            o += &format!("  flags: {:#x} (", n.tflags);
            for (i, name) in FLAG_NAMES.iter().enumerate() {
                if n.tflags & (1 << (i + 1)) != 0 {
                    o += &format!(" {name}");
                }
            }
            o += " )\n";
        }
        if n.min_block != 0 {
            o += &format!("  min block: {}\n  opt block: {}\n  max block: {}\n", n.min_block, n.pref_block, n.max_block);
        }
        o += &format!("  transaction size: {}\n", if extended { "64-bit" } else { "32-bit" });
        if !e.contexts.is_empty() {
            o += &format!("  available meta contexts: {}\n", e.contexts.len());
            for c in &e.contexts {
                o += &format!("   {c}\n");
            }
        }
    }
    Ok(o)
}
