//! Format probing: each format scores the first 2 KiB of an image 0-100, raw scores 1, and the
//! highest wins.
//!
//! The table also recognises formats that Basalt cannot open yet, by their magic, so that such
//! an image is refused with a clear error instead of being taken for raw (and so that a write to
//! sector 0 of a probed raw image that would turn it into one of them is refused).

/// Bytes read for probing.
pub const PROBE_LEN: usize = 2048;

/// A format known by its magic.
pub struct KnownFormat {
    /// QEMU's driver name.
    pub name: &'static str,
    /// Score for this header.
    pub probe: fn(&[u8], &str) -> u8,
}

fn at(buf: &[u8], off: usize, magic: &[u8]) -> bool {
    buf.get(off..off + magic.len()) == Some(magic)
}

fn be32(buf: &[u8], off: usize) -> Option<u32> {
    buf.get(off..off + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Formats recognised by magic, with scores close to QEMU's.
pub const KNOWN: &[KnownFormat] = &[
    KnownFormat { name: "qcow2", probe: |b, _| if at(b, 0, b"QFI\xfb") && be32(b, 4).is_some_and(|v| v >= 2) { 100 } else { 0 } },
    KnownFormat { name: "qcow", probe: |b, _| if at(b, 0, b"QFI\xfb") && be32(b, 4) == Some(1) { 100 } else { 0 } },
    KnownFormat { name: "qed", probe: |b, _| if at(b, 0, b"QED\0") { 100 } else { 0 } },
    KnownFormat { name: "luks", probe: |b, _| if at(b, 0, b"LUKS\xba\xbe") { 100 } else { 0 } },
    KnownFormat { name: "vdi", probe: |b, _| if at(b, 0x40, &[0x7f, 0x10, 0xda, 0xbe]) { 100 } else { 0 } },
    KnownFormat {
        name: "vmdk",
        probe: |b, _| if at(b, 0, b"KDMV") || at(b, 0, b"COWD") || at(b, 0, b"# Disk DescriptorFile") { 100 } else { 0 },
    },
    KnownFormat { name: "vpc", probe: |b, _| if at(b, 0, b"conectix") { 100 } else { 0 } },
    KnownFormat { name: "vhdx", probe: |b, _| if at(b, 0, b"vhdxfile") { 100 } else { 0 } },
    KnownFormat { name: "bochs", probe: |b, _| if at(b, 0, b"Bochs Virtual HD Image\0") { 100 } else { 0 } },
    KnownFormat {
        name: "cloop",
        probe: |b, _| {
            if at(b, 0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n") {
                2
            } else {
                0
            }
        },
    },
    KnownFormat { name: "dmg", probe: |_, name| if name.ends_with(".dmg") { 2 } else { 0 } },
    KnownFormat {
        name: "parallels",
        probe: |b, _| if at(b, 0, b"WithoutFreeSpace") || at(b, 0, b"WithouFreSpacExt") { 100 } else { 0 },
    },
];

/// The best-scoring known format other than raw for `head`, if any scores above raw's 1.
pub fn best_known(head: &[u8], filename: &str) -> Option<(&'static str, u8)> {
    KNOWN.iter().map(|f| (f.name, (f.probe)(head, filename))).filter(|(_, s)| *s > 1).max_by_key(|(_, s)| *s)
}
