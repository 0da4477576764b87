//! One typed option tree for every way a user names an image: QEMU's dotted keyval syntax
//! (`driver=raw,file.driver=file,file.filename=x`), `json:{...}` pseudo-filenames (nested
//! objects or dotted keys), blockdev-add style JSON objects, and plain filenames with protocol
//! prefixes (`file:`, `null-co://`).
//!
//! The tree is kept flat with dotted keys, as QEMU's block layer does: a driver takes the keys
//! it knows, extracts its children's subtrees by prefix (`file.`), and whatever is left over is
//! an error naming the first unknown key. Values stay strings until a driver asks for a type,
//! so `size=1G` and `"size": 1073741824` read the same.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::error::{BlockError, BlockResult};

/// One option value.
#[derive(Clone, Debug, PartialEq)]
pub enum OptValue {
    /// A string (everything from the keyval syntax).
    Str(String),
    /// A JSON integer.
    Int(i64),
    /// A JSON boolean.
    Bool(bool),
}

impl OptValue {
    fn as_text(&self) -> String {
        match self {
            OptValue::Str(s) => s.clone(),
            OptValue::Int(i) => i.to_string(),
            OptValue::Bool(b) => if *b { "on" } else { "off" }.to_string(),
        }
    }
}

/// A flat map of dotted option keys.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Opts {
    map: BTreeMap<String, OptValue>,
}

impl Opts {
    /// An empty tree.
    pub fn new() -> Opts {
        Opts::default()
    }

    /// Parse QEMU's keyval syntax: `k=v,k2.sub=v2`, with `,,` standing for a literal comma.
    /// A bare first element without `=` is taken as `implied_key` when given.
    pub fn parse_keyval(s: &str, implied_key: Option<&str>) -> BlockResult<Opts> {
        let mut opts = Opts::new();
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    parts.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        parts.push(cur);
        for (i, p) in parts.into_iter().enumerate() {
            if p.is_empty() {
                continue;
            }
            let (k, v) = match p.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => match (i, implied_key) {
                    (0, Some(k)) => (k.to_string(), p),
                    _ => return Err(BlockError::option(format!("Invalid parameter '{p}'"))),
                },
            };
            if k.is_empty() || k.split('.').any(str::is_empty) {
                return Err(BlockError::option(format!("Invalid parameter '{k}'")));
            }
            opts.map.insert(k, OptValue::Str(v));
        }
        Ok(opts)
    }

    /// Parse a JSON object (the part after `json:`), flattening nested objects to dotted keys.
    pub fn parse_json(s: &str) -> BlockResult<Opts> {
        let v: Value =
            serde_json::from_str(s).map_err(|e| BlockError::option(format!("Could not parse the JSON options: {e}")))?;
        Opts::from_json(&v)
    }

    /// Flatten a JSON object into a tree.
    pub fn from_json(v: &Value) -> BlockResult<Opts> {
        let Value::Object(obj) = v else {
            return Err(BlockError::option("Invalid JSON object given"));
        };
        let mut opts = Opts::new();
        flatten(&mut opts.map, "", obj)?;
        Ok(opts)
    }

    /// A filename as given on a command line: `json:{...}`, or a path, possibly with a protocol
    /// prefix, which becomes `{filename}` (the protocol is resolved when opening).
    pub fn from_filename(name: &str) -> BlockResult<Opts> {
        if let Some(j) = name.strip_prefix("json:") {
            return Opts::parse_json(j);
        }
        let mut o = Opts::new();
        o.set("filename", name);
        Ok(o)
    }

    /// Set a string value.
    pub fn set(&mut self, key: &str, v: impl Into<String>) {
        self.map.insert(key.to_string(), OptValue::Str(v.into()));
    }

    /// Set a value.
    pub fn set_value(&mut self, key: &str, v: OptValue) {
        self.map.insert(key.to_string(), v);
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Whether any key starts with `prefix.`.
    pub fn has_sub(&self, prefix: &str) -> bool {
        let p = format!("{prefix}.");
        self.map.keys().any(|k| k.starts_with(&p))
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The keys left.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// A value as text without taking it.
    pub fn get_str(&self, key: &str) -> Option<String> {
        self.map.get(key).map(OptValue::as_text)
    }

    /// Take a value as text.
    pub fn take_str(&mut self, key: &str) -> Option<String> {
        self.map.remove(key).map(|v| v.as_text())
    }

    /// Take a boolean (`on/off/true/false/yes/no` or JSON bool), or `default`.
    pub fn take_bool(&mut self, key: &str, default: bool) -> BlockResult<bool> {
        match self.map.remove(key) {
            None => Ok(default),
            Some(OptValue::Bool(b)) => Ok(b),
            Some(v) => {
                parse_bool(&v.as_text()).ok_or_else(|| BlockError::option(format!("Parameter '{key}' expects 'on' or 'off'")))
            }
        }
    }

    /// Take an unsigned number (no suffixes), or `default`.
    pub fn take_u64(&mut self, key: &str, default: u64) -> BlockResult<u64> {
        match self.map.remove(key) {
            None => Ok(default),
            Some(OptValue::Int(i)) if i >= 0 => Ok(i as u64),
            Some(v) => {
                let t = v.as_text();
                parse_number(&t)
                    .ok_or_else(|| BlockError::option(format!("Parameter '{key}' expects a non-negative number below 2^64")))
            }
        }
    }

    /// Take a size, accepting `k/M/G/T/P/E` suffixes (powers of 1024), or `default`.
    pub fn take_size(&mut self, key: &str, default: u64) -> BlockResult<u64> {
        match self.map.remove(key) {
            None => Ok(default),
            Some(OptValue::Int(i)) if i >= 0 => Ok(i as u64),
            Some(v) => {
                let t = v.as_text();
                parse_size(&t).ok_or_else(|| {
                    BlockError::option(format!(
                        "Parameter '{key}' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively."
                    ))
                })
            }
        }
    }

    /// Take one of `choices`, or `default`.
    pub fn take_enum(&mut self, key: &str, choices: &[&str], default: &str) -> BlockResult<String> {
        match self.take_str(key) {
            None => Ok(default.to_string()),
            Some(v) if choices.contains(&v.as_str()) => Ok(v),
            Some(v) => Err(BlockError::option(format!("Parameter '{key}' does not accept value '{v}'"))),
        }
    }

    /// Remove and return the subtree under `prefix.` (keys without the prefix).
    pub fn take_sub(&mut self, prefix: &str) -> Opts {
        let p = format!("{prefix}.");
        let keys: Vec<String> = self.map.keys().filter(|k| k.starts_with(&p)).cloned().collect();
        let mut sub = Opts::new();
        for k in keys {
            let v = self.map.remove(&k).expect("key just listed");
            sub.map.insert(k[p.len()..].to_string(), v);
        }
        sub
    }

    /// Put `sub` under `prefix.`.
    pub fn insert_sub(&mut self, prefix: &str, sub: Opts) {
        for (k, v) in sub.map {
            self.map.insert(format!("{prefix}.{k}"), v);
        }
    }

    /// Merge `other` in at the root (later values win).
    pub fn insert_sub_root(&mut self, other: Opts) {
        self.map.extend(other.map);
    }

    /// Error unless everything was consumed: QEMU's wording for a leftover option.
    pub fn expect_empty(&self, what: &str, driver: &str) -> BlockResult<()> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(BlockError::option(format!("{what} '{driver}' does not support the option '{k}'"))),
        }
    }

    /// The tree as nested JSON (for `json:` filenames in info output).
    pub fn to_json(&self) -> Value {
        let mut root = serde_json::Map::new();
        for (k, v) in &self.map {
            let mut cur = &mut root;
            let parts: Vec<&str> = k.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                let slot = cur.entry(p.to_string()).or_insert_with(|| Value::Object(Default::default()));
                // A user may give both `a=x` and `a.b=y`: the subtree wins (the scalar cannot
                // hold it), rather than failing.
                if !slot.is_object() {
                    *slot = Value::Object(Default::default());
                }
                let Value::Object(m) = slot else { unreachable!("just made an object") };
                cur = m;
            }
            let val = match v {
                OptValue::Str(s) => Value::String(s.clone()),
                OptValue::Int(i) => Value::from(*i),
                OptValue::Bool(b) => Value::Bool(*b),
            };
            cur.insert(parts[parts.len() - 1].to_string(), val);
        }
        Value::Object(root)
    }
}

/// QEMU's `json:{...}` filename for an option tree, with `", "` and `": "` separators and nested
/// objects for children. Keys come in the order QEMU's QDict iterates them: by hash bucket
/// (`tdb_hash(key) % 512`), which is what `qemu-img info` prints.
pub fn json_filename(opts: &Opts) -> String {
    json_filename_of(&opts.to_json())
}

/// [`json_filename`] of a JSON object as given: keys are kept as they are, so a driver can put
/// a dotted key at the top level (qcow2's `"encrypt.key-secret"`, as QEMU prints it).
pub fn json_filename_of(v: &Value) -> String {
    format!("json:{}", qemu_json(v))
}

/// QEMU's QDict bucket of a key (its `tdb_hash` modulo the bucket count).
fn qdict_bucket(key: &str) -> u32 {
    let mut v = 0x238F_13AFu32.wrapping_mul(key.len() as u32);
    for (i, b) in key.bytes().enumerate() {
        v = v.wrapping_add(u32::from(b) << ((i * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(v).wrapping_add(12345) % 512
}

fn qemu_json(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by_key(|k| (qdict_bucket(k), k.as_str()));
            let parts: Vec<String> =
                keys.iter().map(|k| format!("{}: {}", Value::String((*k).clone()), qemu_json(&m[*k]))).collect();
            format!("{{{}}}", parts.join(", "))
        }
        other => other.to_string(),
    }
}

fn flatten(out: &mut BTreeMap<String, OptValue>, prefix: &str, obj: &serde_json::Map<String, Value>) -> BlockResult<()> {
    for (k, v) in obj {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Value::Object(o) => flatten(out, &key, o)?,
            Value::String(s) => {
                out.insert(key, OptValue::Str(s.clone()));
            }
            Value::Bool(b) => {
                out.insert(key, OptValue::Bool(*b));
            }
            Value::Number(n) => match n.as_i64() {
                Some(i) => {
                    out.insert(key, OptValue::Int(i));
                }
                None => {
                    out.insert(key, OptValue::Str(n.to_string()));
                }
            },
            Value::Null => return Err(BlockError::option(format!("Invalid null value for option '{key}'"))),
            Value::Array(_) => return Err(BlockError::option(format!("Lists are not supported for option '{key}'"))),
        }
    }
    Ok(())
}

/// `on/off/true/false/yes/no`.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// A plain number, decimal or 0x-hex.
pub fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).ok();
    }
    s.parse().ok()
}

/// A size with an optional `b/k/K/M/G/T/P/E` suffix (binary multiples), as qemu-img takes them;
/// fractions are allowed with a suffix (`1.5G`). Hex numbers take no suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    if s.is_empty() || s.starts_with('-') {
        return None;
    }
    if s.starts_with("0x") || s.starts_with("0X") {
        return parse_number(s);
    }
    let (num, mult): (&str, u64) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c {
                'b' | 'B' => 1,
                'k' | 'K' => 1 << 10,
                'm' | 'M' => 1 << 20,
                'g' | 'G' => 1 << 30,
                't' | 'T' => 1 << 40,
                'p' | 'P' => 1 << 50,
                'e' | 'E' => 1 << 60,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if let Ok(v) = num.parse::<u64>() {
        return v.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    if !f.is_finite() || f < 0.0 || mult == 1 {
        return None;
    }
    let v = f * mult as f64;
    (v < 18446744073709549568.0).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyval_and_json_give_the_same_tree() {
        let a = Opts::parse_keyval("driver=raw,file.driver=file,file.filename=a,,b.img,file.locking=off", None).unwrap();
        let b = Opts::from_filename(r#"json:{"driver":"raw","file":{"driver":"file","filename":"a,b.img","locking":"off"}}"#)
            .unwrap();
        assert_eq!(a, b);
        let c =
            Opts::parse_json(r#"{"driver":"raw","file.driver":"file","file.filename":"a,b.img","file.locking":"off"}"#).unwrap();
        assert_eq!(a, c);
    }

    #[test]
    fn typed_takes_and_leftovers() {
        let mut o = Opts::parse_keyval("size=1G,read-zeroes=on,bogus=1,file.x=2", None).unwrap();
        assert_eq!(o.take_size("size", 0).unwrap(), 1 << 30);
        assert!(o.take_bool("read-zeroes", false).unwrap());
        let sub = o.take_sub("file");
        assert_eq!(sub.get_str("x").as_deref(), Some("2"));
        let e = o.expect_empty("Block format", "raw").unwrap_err();
        assert_eq!(e.msg, "Block format 'raw' does not support the option 'bogus'");
        let mut bad = Opts::parse_keyval("read-zeroes=maybe", None).unwrap();
        assert!(bad.take_bool("read-zeroes", false).is_err());
        assert!(Opts::parse_keyval("a..b=1", None).is_err());
        assert!(Opts::parse_json("{").is_err());
        assert!(Opts::parse_json("[1]").is_err());
    }

    #[test]
    fn json_filenames_in_qdict_order() {
        let o = Opts::parse_keyval("driver=raw,offset=512,file.driver=null-co,file.read-zeroes=on", None).unwrap();
        assert_eq!(
            json_filename(&o),
            r#"json:{"offset": "512", "driver": "raw", "file": {"read-zeroes": "on", "driver": "null-co"}}"#
        );
        let o = Opts::parse_keyval("driver=null-co,size=4096", None).unwrap();
        assert_eq!(json_filename(&o), r#"json:{"driver": "null-co", "size": "4096"}"#);
    }

    #[test]
    fn to_json_survives_a_scalar_and_a_subtree_of_the_same_name() {
        let o = Opts::parse_keyval("file=x,file.driver=raw", None).unwrap();
        assert_eq!(o.to_json(), serde_json::json!({"file": {"driver": "raw"}}));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1.5M"), Some(1572864));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("1Q"), None);
    }
}
