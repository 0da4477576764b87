//! Numbers as QEMU prints them for people: sizes with binary units ("1 MiB", "68 KiB",
//! "1.5 GiB"), the way qemu-img info and qemu-io report them.

/// QEMU's `size_to_str`: three significant digits, binary units, "B" below 1 KiB.
pub fn size_to_str(v: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut f = v as f64;
    while f >= 1024.0 && i < UNITS.len() - 1 {
        f /= 1024.0;
        i += 1;
    }
    if i == 0 {
        return format!("{v} B");
    }
    // Three significant digits, without trailing zeros (QEMU uses "%0.3g").
    let s = format_g3(f);
    format!("{s} {}", UNITS[i])
}

fn format_g3(f: f64) -> String {
    let digits = if f >= 100.0 {
        0
    } else if f >= 10.0 {
        1
    } else {
        2
    };
    let mut s = format!("{f:.digits$}");
    if s.contains('.') {
        while s.ends_with('0') {
            s.pop();
        }
        if s.ends_with('.') {
            s.pop();
        }
    }
    // Rounding may reach 1000 or more (e.g. 1023.9 KiB): keep QEMU's "%0.3g", which prints 1.02e+03.
    if s.len() > 3 && !s.contains('.') && s.parse::<f64>().is_ok_and(|v| v >= 1000.0) {
        let e = f.log10().floor() as i32;
        let m = f / 10f64.powi(e);
        let mut ms = format!("{m:.2}");
        while ms.ends_with('0') {
            ms.pop();
        }
        if ms.ends_with('.') {
            ms.pop();
        }
        return format!("{ms}e+{e:02}");
    }
    s
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
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(65536.0), "64.000 KiB");
    }
}
