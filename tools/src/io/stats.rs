//! The statistics lines qemu-io prints after a transfer, byte for byte:
//!
//! ```text
//! read 512/512 bytes at offset 0
//! 512 bytes, 1 ops; 00.00 sec (19.487 MiB/sec and 39909.0075 ops/sec)
//! ```
//!
//! or with `-C`, `bytes,ops,h:mm:ss.cc,bytes/sec,ops/sec`. Sizes use qemu-io's `cvtstr`
//! (`%.3f` with a binary unit, or `%f bytes`, where the first `.000` cuts the number short),
//! times its `timestr` (`SS.cc sec` under a second, `h:mm:ss.cc` from a second on or with
//! `-C`). The times are real measurements of the request.

use std::time::Duration;

/// qemu-io's `cvtstr`: "512 bytes", "64 KiB", "19.487 MiB", "396.494827 bytes".
pub(crate) fn cvtstr(v: f64) -> String {
    const UNITS: [(&str, i32); 6] = [("EiB", 60), ("PiB", 50), ("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    let (mut s, suffix) = match UNITS.iter().find(|(_, shift)| v >= 2f64.powi(*shift)) {
        Some((unit, shift)) => (format!("{:.3}", v / 2f64.powi(*shift)), format!(" {unit}")),
        None => (format!("{v:.6}"), " bytes".to_string()),
    };
    // C's strstr(str, ".000"): the first ".000" anywhere ends the number.
    if let Some(i) = s.find(".000") {
        s.truncate(i);
    }
    s + &suffix
}

/// qemu-io's `timestr`: `%05.2f sec` below a second unless `fixed`, else `%u:%02u:%05.2f`.
pub(crate) fn timestr(t: Duration, fixed: bool) -> String {
    let secs = t.as_secs();
    let frac = f64::from(t.subsec_nanos()) / 1e9;
    if fixed || secs != 0 {
        let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
        format!("{h}:{m:02}:{:05.2}", s as f64 + frac)
    } else {
        format!("{frac:05.2} sec")
    }
}

fn per_sec(v: f64, t: Duration) -> f64 {
    v / t.as_secs_f64()
}

/// qemu-io's `print_report`: the two report lines (or the `-C` line), each ending in a newline.
pub(crate) fn report(op: &str, t: Duration, offset: u64, count: u64, total: u64, ops: u32, machine: bool) -> String {
    if machine {
        let ts = timestr(t, true);
        format!("{total},{ops},{ts},{:.3},{:.3}\n", per_sec(total as f64, t), per_sec(f64::from(ops), t))
    } else {
        let ts = timestr(t, false);
        format!(
            "{op} {total}/{count} bytes at offset {offset}\n{}, {ops} ops; {ts} ({}/sec and {:.4} ops/sec)\n",
            cvtstr(total as f64),
            cvtstr(per_sec(total as f64, t)),
            per_sec(f64::from(ops), t)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cvtstr_as_qemu_io() {
        assert_eq!(cvtstr(512.0), "512 bytes");
        assert_eq!(cvtstr(1.0), "1 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(65536.0), "64 KiB");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(cvtstr(396.494827), "396.494827 bytes");
        assert_eq!(cvtstr(8316.0), "8.121 KiB");
        assert_eq!(cvtstr(1.5 * 1024.0 * 1024.0), "1.500 MiB");
        assert_eq!(cvtstr(1073741824.0), "1 GiB");
        assert_eq!(cvtstr(0.000856), "0 bytes");
    }

    #[test]
    fn times_and_reports() {
        assert_eq!(timestr(Duration::from_millis(10), false), "00.01 sec");
        assert_eq!(timestr(Duration::from_millis(1200), false), "0:00:01.20");
        assert_eq!(timestr(Duration::from_millis(10), true), "0:00:00.01");
        assert_eq!(timestr(Duration::from_secs(3723), false), "1:02:03.00");
        let r = report("read", Duration::from_millis(500), 0, 512, 512, 1, false);
        assert_eq!(r, "read 512/512 bytes at offset 0\n512 bytes, 1 ops; 00.50 sec (1 KiB/sec and 2.0000 ops/sec)\n");
        let r = report("read", Duration::from_millis(500), 0, 512, 512, 1, true);
        assert_eq!(r, "512,1,0:00:00.50,1024.000,2.000\n");
    }
}
