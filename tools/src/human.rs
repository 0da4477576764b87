//! Numbers as QEMU prints them for people: sizes with binary units ("1 MiB", "68 KiB",
//! "1.5 GiB"), the way qemu-img info and qemu-io report them.

/// QEMU's `size_to_str`: `"%0.3g"` of the value in the largest binary unit in which it is
/// below 1000 ("1000 bytes" is "0.977 KiB", 1023.5 KiB is "1 MiB").
pub fn size_to_str(v: u64) -> String {
    const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    // frexp()'s exponent of v * 1024 / 1000, read from the bits (x is finite and >= 0).
    let x = v as f64 / (1000.0 / 1024.0);
    let e = if x == 0.0 { 0 } else { ((x.to_bits() >> 52) & 0x7ff) as i32 - 1022 };
    let i = (((e - 1) / 10).max(0) as usize).min(SUFFIXES.len() - 1);
    let div = 1u64 << (i * 10);
    format!("{} {}B", format_g3(v as f64 / div as f64), SUFFIXES[i])
}

/// C's `"%0.3g"`.
fn format_g3(f: f64) -> String {
    let strip = |s: String| -> String {
        if !s.contains('.') {
            return s;
        }
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    let sci = format!("{f:.2e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..3).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", strip(mant.to_string()), exp.abs());
    }
    strip(format!("{f:.*}", (2 - exp) as usize))
}

/// qemu-io's `cvtstr`: "512 bytes", "64 KiB", "1.500 MiB"... as printed after a transfer.
pub fn cvtstr(v: f64) -> String {
    const K: f64 = 1024.0;
    if v >= K * K * K * K * K * K {
        format!("{:.3} EiB", v / (K * K * K * K * K * K))
    } else if v >= K * K * K * K * K {
        format!("{:.3} PiB", v / (K * K * K * K * K))
    } else if v >= K * K * K * K {
        format!("{:.3} TiB", v / (K * K * K * K))
    } else if v >= K * K * K {
        format!("{:.3} GiB", v / (K * K * K))
    } else if v >= K * K {
        format!("{:.3} MiB", v / (K * K))
    } else if v >= K {
        format!("{:.3} KiB", v / K)
    } else {
        format!("{v:.0} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_prints_them() {
        assert_eq!(size_to_str(1048576), "1 MiB");
        assert_eq!(size_to_str(69632), "68 KiB");
        assert_eq!(size_to_str(512), "512 B");
        assert_eq!(size_to_str(1610612736), "1.5 GiB");
        assert_eq!(size_to_str(10 << 30), "10 GiB");
        assert_eq!(size_to_str(123456789), "118 MiB");
        assert_eq!(size_to_str(0), "0 B");
        assert_eq!(size_to_str(1000), "0.977 KiB");
        assert_eq!(size_to_str(1048064), "1 MiB");
        assert_eq!(size_to_str(1023 * 1024), "0.999 MiB");
        assert_eq!(size_to_str(999), "999 B");
        assert_eq!(size_to_str(u64::MAX), "16 EiB");
        assert_eq!(size_to_str(1023876), "1e+03 KiB");
        assert_eq!(size_to_str(1_000_000_000_000_000), "909 TiB");
        assert_eq!(size_to_str(12345678901234), "11.2 TiB");
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(65536.0), "64.000 KiB");
    }
}
