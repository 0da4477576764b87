//! Buffer contents for qemu-io commands: pattern bytes (`-P`), verifying a read against a
//! pattern, filling a write buffer from a file (`write -s`), and the `-v` hex dump.
//!
//! Read buffers start filled with 0xab and write buffers with 0xcd (or the `-P` byte), as
//! qemu-io's, so a driver that leaves a read buffer untouched (null-co without read-zeroes)
//! shows the same bytes.

use super::num::strtol;

/// Fill byte of read buffers before the read.
pub(crate) const READ_FILL: u8 = 0xab;
/// Default fill byte of write buffers.
pub(crate) const WRITE_FILL: u8 = 0xcd;

/// qemu-io's `parse_pattern`: a byte given as C's `strtol(.., 0)` reads it. On failure the
/// line qemu-io prints (on stdout) is returned.
pub(crate) fn parse_pattern(arg: &str) -> Result<u8, String> {
    match strtol(arg) {
        (v, true) if (0..=255).contains(&v) => Ok(v as u8),
        _ => Err(format!("{arg} is not a valid pattern byte")),
    }
}

/// Whether every byte of `buf` is `pattern`.
pub(crate) fn matches(buf: &[u8], pattern: u8) -> bool {
    buf.iter().all(|&b| b == pattern)
}

/// The `Pattern verification failed` line, for a range starting at image offset `offset`.
pub(crate) fn mismatch(offset: u64, len: u64) -> String {
    format!("Pattern verification failed at offset {offset}, {len} bytes\n")
}

/// qemu-io's `dump_buffer`: 16 bytes a line, `%08x:  ` image offset, `%02x ` per byte, a space,
/// then the bytes again with non-alphanumerics as dots.
pub(crate) fn dump(buf: &[u8], offset: u64) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(buf.len() / 16 * 80 + 80);
    for (i, line) in buf.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}:  ", offset + i as u64 * 16);
        for b in line {
            let _ = write!(out, "{b:02x} ");
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| if b.is_ascii_alphanumeric() { b as char } else { '.' }));
        out.push('\n');
    }
    out
}

/// Fill `buf` with the contents of `file`, repeated as often as needed (`write -s`). On failure
/// the message qemu-io writes to stderr (`perror` style) is returned.
pub(crate) fn fill_from_file(buf: &mut [u8], file: &str) -> Result<(), String> {
    use std::io::Read;
    let perror = |e: std::io::Error| format!("{file}: {}", basalt_engine::strerror(e.raw_os_error().unwrap_or(libc::EIO)));
    let mut f = std::fs::File::open(file).map_err(perror)?;
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(perror(e)),
        }
    }
    if got == 0 {
        return Err(format!("{file}: file is empty"));
    }
    let mut at = got;
    while at < buf.len() {
        let n = got.min(buf.len() - at);
        buf.copy_within(0..n, at);
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_bytes() {
        assert_eq!(parse_pattern("0xab"), Ok(0xab));
        assert_eq!(parse_pattern("255"), Ok(255));
        assert_eq!(parse_pattern("010"), Ok(8));
        assert_eq!(parse_pattern("0x1ff"), Err("0x1ff is not a valid pattern byte".into()));
        assert_eq!(parse_pattern("zz"), Err("zz is not a valid pattern byte".into()));
        assert!(parse_pattern("-1").is_err());
    }

    #[test]
    fn dump_as_qemu_io() {
        let d = dump(&[0xab; 24], 0);
        assert_eq!(
            d,
            "00000000:  ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab  ................\n\
             00000010:  ab ab ab ab ab ab ab ab  ........\n"
        );
        assert_eq!(dump(b"hello !", 0x60), "00000060:  68 65 6c 6c 6f 20 21  hello..\n");
    }

    #[test]
    fn file_pattern_repeats() {
        let dir = tempfile_dir();
        let p = dir.join("pat");
        std::fs::write(&p, b"hello").unwrap();
        let mut buf = [0u8; 12];
        fill_from_file(&mut buf, p.to_str().unwrap()).unwrap();
        assert_eq!(&buf, b"hellohellohe");
        std::fs::write(&p, b"").unwrap();
        assert!(fill_from_file(&mut buf, p.to_str().unwrap()).unwrap_err().ends_with(": file is empty"));
        assert!(fill_from_file(&mut buf, "/nonexistent/x").unwrap_err().ends_with(": No such file or directory"));
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("basalt-io-pattern-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
