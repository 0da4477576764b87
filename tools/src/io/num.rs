//! Numbers on qemu-io command lines.
//!
//! [`cvtnum`] reads sizes the way qemu-io's `cvtnum` does (QEMU's `qemu_strtosz`): a decimal
//! integer, optionally with a fraction when a unit suffix follows (`1.5k`), or a hex integer
//! without fraction or suffix (`0x1000`); suffixes `B K M G T P E` in either case are powers
//! of 1024; the result must fit an `int64_t`. Fractions are scaled exactly in 64.64 fixed point
//! and rounded half up, so `0.5k` is 512 and `1.0` is 1 but `1.5` is an error. [`strtol`] is C's
//! `strtol(s, &end, 0)`, which pattern bytes and `sleep` take.

/// Why [`cvtnum`] refused an argument (QEMU's -EINVAL and -ERANGE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NumError {
    /// Not a number, or trailing garbage or an unknown suffix.
    Invalid,
    /// Negative, or too large for an `int64_t`.
    Range,
}

/// qemu-io's `print_cvtnum_err`: the line printed (on stdout) for a refused number.
pub(crate) fn cvtnum_error(e: NumError, arg: &str) -> String {
    match e {
        NumError::Invalid => format!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"),
        NumError::Range => format!("Parsing error: argument too large -- {arg}"),
    }
}

fn suffix_mul(c: Option<u8>) -> Option<u64> {
    Some(match c?.to_ascii_uppercase() {
        b'B' => 1,
        b'K' => 1 << 10,
        b'M' => 1 << 20,
        b'G' => 1 << 30,
        b'T' => 1 << 40,
        b'P' => 1 << 50,
        b'E' => 1 << 60,
        _ => return None,
    })
}

/// Digits of `base` at the start of `s`: (value or overflow, digits consumed).
fn digits(s: &[u8], base: u32) -> (Option<u64>, usize) {
    let mut v: Option<u64> = Some(0);
    let mut n = 0;
    while let Some(d) = s.get(n).and_then(|&c| (c as char).to_digit(base)) {
        v = v.and_then(|v| v.checked_mul(u64::from(base))).and_then(|v| v.checked_add(u64::from(d)));
        n += 1;
    }
    (v, n)
}

/// The length of the decimal floating-point number (as `strtod` reads it, without infinities
/// and hex floats, which a fraction part never legitimately holds) at the start of `s`.
fn float_len(s: &[u8]) -> usize {
    let mut i = 0;
    let int_digits = s.iter().take_while(|c| c.is_ascii_digit()).count();
    i += int_digits;
    let mut frac_digits = 0;
    if s.get(i) == Some(&b'.') {
        frac_digits = s[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if int_digits + frac_digits > 0 {
            i += 1 + frac_digits;
        }
    }
    if int_digits + frac_digits == 0 {
        return 0;
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(s.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let exp = s[j.min(s.len())..].iter().take_while(|c| c.is_ascii_digit()).count();
        if exp > 0 {
            i = j + exp;
        }
    }
    i
}

/// QEMU's `qemu_strtosz` with the whole string required to be consumed.
fn strtosz(s: &str) -> Result<u64, NumError> {
    let b = s.as_bytes();
    let mut i = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    if b.get(i) == Some(&b'-') {
        return Err(NumError::Range);
    }
    if b.get(i) == Some(&b'+') {
        i += 1;
    }
    let (v, n) = digits(&b[i..], 10);
    let mut val = if n == 0 { 0 } else { v.ok_or(NumError::Range)? };
    let mut end = i + n;
    let mut valf: u64 = 0;
    if n == 1 && val == 0 && matches!(b.get(end), Some(b'x' | b'X')) {
        // Hex: no fraction, no suffix.
        let (hv, hn) = digits(&b[end + 1..], 16);
        if hn == 0 {
            return Err(NumError::Invalid);
        }
        val = hv.ok_or(NumError::Range)?;
        end += 1 + hn;
        if b.get(end) == Some(&b'.') || suffix_mul(b.get(end).copied()).is_some() {
            return Err(NumError::Invalid);
        }
    } else if b.get(end) == Some(&b'.') || (n == 0 && s.contains('.')) {
        let f = &b[end..];
        let fl = float_len(f);
        if fl == 0 {
            return Err(NumError::Invalid);
        }
        let text = std::str::from_utf8(&f[..fl]).map_err(|_| NumError::Invalid)?;
        if text.contains(['e', 'E']) {
            return Err(NumError::Invalid);
        }
        let fraction: f64 = text.parse().map_err(|_| NumError::Invalid)?;
        // Only the part after the integer digits is a fraction (the integer part, if any,
        // was read above; strtod starts at the dot there).
        valf = (fraction.fract() * 18446744073709551616.0) as u64;
        end += fl;
    } else if n == 0 {
        return Err(NumError::Invalid);
    }
    let mul = match suffix_mul(b.get(end).copied()) {
        Some(m) => {
            end += 1;
            m
        }
        None => 1,
    };
    if mul == 1 {
        if valf != 0 {
            return Err(NumError::Invalid);
        }
    } else {
        let whole = u128::from(val) * u128::from(mul);
        let frac = u128::from(valf) * u128::from(mul);
        let total = whole + (frac >> 64) + ((frac >> 63) & 1);
        val = u64::try_from(total).map_err(|_| NumError::Range)?;
    }
    if end != b.len() {
        return Err(NumError::Invalid);
    }
    Ok(val)
}

/// qemu-io's `cvtnum`: a size that fits an `int64_t`.
pub(crate) fn cvtnum(s: &str) -> Result<u64, NumError> {
    let v = strtosz(s)?;
    if v > i64::MAX as u64 {
        return Err(NumError::Range);
    }
    Ok(v)
}

/// C's `strtol(s, &end, 0)`: the value (saturated as C saturates it) and whether the whole
/// string was consumed.
pub(crate) fn strtol(s: &str) -> (i64, bool) {
    let b = s.as_bytes();
    let mut i = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    let neg = match b.get(i) {
        Some(b'-') => {
            i += 1;
            true
        }
        Some(b'+') => {
            i += 1;
            false
        }
        _ => false,
    };
    let (base, start) = if b.get(i) == Some(&b'0')
        && matches!(b.get(i + 1), Some(b'x' | b'X'))
        && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit)
    {
        (16, i + 2)
    } else if b.get(i) == Some(&b'0') {
        (8, i)
    } else {
        (10, i)
    };
    let (v, n) = digits(&b[start..], base);
    if n == 0 {
        // No digits: strtol consumes nothing, so only an empty string counts as consumed.
        return (0, s.is_empty());
    }
    let mag = v.unwrap_or(u64::MAX);
    let val = if neg {
        if mag > i64::MAX as u64 + 1 {
            i64::MIN
        } else {
            (mag as i64).wrapping_neg()
        }
    } else {
        i64::try_from(mag).unwrap_or(i64::MAX)
    };
    (val, start + n == b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_io_reads_them() {
        assert_eq!(cvtnum("512"), Ok(512));
        assert_eq!(cvtnum("64k"), Ok(65536));
        assert_eq!(cvtnum("1K"), Ok(1024));
        assert_eq!(cvtnum("1b"), Ok(1));
        assert_eq!(cvtnum("1.5k"), Ok(1536));
        assert_eq!(cvtnum("0.5k"), Ok(512));
        assert_eq!(cvtnum(".5k"), Ok(512));
        assert_eq!(cvtnum("1.0"), Ok(1));
        assert_eq!(cvtnum("0x10"), Ok(16));
        assert_eq!(cvtnum("1.5"), Err(NumError::Invalid));
        assert_eq!(cvtnum("1e3"), Err(NumError::Invalid));
        assert_eq!(cvtnum("0x1k"), Err(NumError::Invalid));
        assert_eq!(cvtnum("0x"), Err(NumError::Invalid));
        assert_eq!(cvtnum("1kB"), Err(NumError::Invalid));
        assert_eq!(cvtnum("x"), Err(NumError::Invalid));
        assert_eq!(cvtnum(""), Err(NumError::Invalid));
        assert_eq!(cvtnum("-1"), Err(NumError::Range));
        assert_eq!(cvtnum("8E"), Err(NumError::Range));
        assert_eq!(cvtnum("16E"), Err(NumError::Range));
        assert_eq!(cvtnum("9223372036854775807"), Ok(i64::MAX as u64));
        assert_eq!(cvtnum("9223372036854775808"), Err(NumError::Range));
    }

    #[test]
    fn strtol_base_0() {
        assert_eq!(strtol("10"), (10, true));
        assert_eq!(strtol("0x10"), (16, true));
        assert_eq!(strtol("010"), (8, true));
        assert_eq!(strtol("08"), (0, false));
        assert_eq!(strtol("-1"), (-1, true));
        assert_eq!(strtol("0x"), (0, false));
        assert_eq!(strtol("zz"), (0, false));
        assert_eq!(strtol(""), (0, true));
        assert_eq!(strtol("1k"), (1, false));
    }
}
