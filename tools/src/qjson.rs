//! JSON printed the way QEMU's pretty printer prints it (4-space indent, `"key": value`,
//! empty arrays as `[` newline `]`), so `--output=json` matches qemu-img byte for byte.

use serde_json::Value;

/// Pretty-print as QEMU does, without a trailing newline.
pub fn pretty(v: &Value) -> String {
    let mut out = String::new();
    write(&mut out, v, 0);
    out
}

fn write(out: &mut String, v: &Value, level: usize) {
    let ind = |n: usize| "    ".repeat(n);
    match v {
        Value::Object(m) => {
            if m.is_empty() {
                out.push_str("{\n");
                out.push_str(&ind(level));
                out.push('}');
                return;
            }
            out.push_str("{\n");
            let n = m.len();
            for (i, (k, val)) in m.iter().enumerate() {
                out.push_str(&ind(level + 1));
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write(out, val, level + 1);
                if i + 1 < n {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&ind(level));
            out.push('}');
        }
        Value::Array(a) => {
            out.push_str("[\n");
            let n = a.len();
            for (i, val) in a.iter().enumerate() {
                out.push_str(&ind(level + 1));
                write(out, val, level + 1);
                if i + 1 < n {
                    out.push(',');
                }
                out.push('\n');
            }
            out.push_str(&ind(level));
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}
