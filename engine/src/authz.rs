//! QEMU's authorization objects: a TLS server (NBD's `tls-authz`) asks one whether a client's
//! identity may connect once its handshake is done. The identity is the distinguished name of
//! the client's x509 certificate (as GnuTLS prints it, in certificate order:
//! `C=GB,ST=London,O=Example Org\, Ltd,CN=client`), or a PSK client's username.
//!
//! - `authz-simple,id=ID,identity=NAME`: that one identity, compared exactly.
//! - `authz-list,id=ID,policy=allow|deny,rules.N.match=P,rules.N.policy=allow|deny,
//!   rules.N.format=exact|glob` (or the same as a JSON `--object`, `rules` a list): the first
//!   rule that matches decides, else `policy` (default deny). A glob pattern has `*` (any run of
//!   characters) and `?` (one character), as QEMU's.
//! - `authz-listfile,id=ID,filename=PATH[,refresh=on|off]`: the same rules and policy in a JSON
//!   file (`{"rules": [...], "policy": "deny"}`). With `refresh` (the default) the file is
//!   looked at again at each check and re-read when it changed; a change that does not parse
//!   leaves the rules as they were, and says so on stderr.
//! - `authz-pam` is refused: there is no PAM here.
//!
//! Definitions are checked as QEMU checks them, with its messages for missing and invalid
//! parameters.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use crate::error::{BlockError, BlockResult};
use crate::options::Opts;

/// The largest rules file read.
const MAX_LIST_FILE: u64 = 1 << 20;
/// The most rules one list takes.
const MAX_RULES: usize = 65536;

/// One rule of a list.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    pattern: String,
    allow: bool,
    glob: bool,
}

/// Rules in order and the policy when none matches.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RuleList {
    rules: Vec<Rule>,
    allow: bool,
}

impl RuleList {
    fn parse(o: &mut Opts) -> BlockResult<RuleList> {
        let allow = policy(o.take_str("policy"), "deny")?;
        let mut rules = Vec::new();
        for n in 0.. {
            let prefix = format!("rules.{n}");
            if !o.has_sub(&prefix) {
                break;
            }
            if n == MAX_RULES {
                return Err(BlockError::option(format!("More than {MAX_RULES} rules")));
            }
            let mut r = o.take_sub(&prefix);
            let pattern = r.take_str("match").ok_or_else(|| missing(&format!("{prefix}.match")))?;
            let allow = policy(Some(r.take_str("policy").ok_or_else(|| missing(&format!("{prefix}.policy")))?), "deny")?;
            let glob = match r.take_str("format").as_deref() {
                None | Some("exact") => false,
                Some("glob") => true,
                Some(v) => return Err(BlockError::option(format!("Parameter 'format' does not accept value '{v}'"))),
            };
            if let Some(k) = r.keys().next() {
                return Err(BlockError::option(format!("Parameter '{prefix}.{k}' is unexpected")));
            }
            rules.push(Rule { pattern, allow, glob });
        }
        Ok(RuleList { rules, allow })
    }

    fn allows(&self, identity: &str) -> bool {
        for r in &self.rules {
            let hit = if r.glob { glob_match(r.pattern.as_bytes(), identity.as_bytes()) } else { r.pattern == identity };
            if hit {
                return r.allow;
            }
        }
        self.allow
    }
}

fn missing(key: &str) -> BlockError {
    BlockError::option(format!("Parameter '{key}' is missing"))
}

/// `allow` or `deny` (QEMU names the parameter `policy` wherever it is).
fn policy(v: Option<String>, default: &str) -> BlockResult<bool> {
    match v.as_deref().unwrap_or(default) {
        "allow" => Ok(true),
        "deny" => Ok(false),
        v => Err(BlockError::option(format!("Parameter 'policy' does not accept value '{v}'"))),
    }
}

/// A rules file, and what was read from it last.
#[derive(Debug)]
struct ListFile {
    path: PathBuf,
    refresh: bool,
    /// The file's modification time and length when read, and its rules.
    state: Mutex<(Option<(SystemTime, u64)>, RuleList)>,
}

impl ListFile {
    fn stamp(&self) -> Option<(SystemTime, u64)> {
        std::fs::metadata(&self.path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
    }

    fn load(path: &std::path::Path) -> BlockResult<RuleList> {
        let name = path.display();
        let len = std::fs::metadata(path).map_err(|e| BlockError::option(format!("Unable to read '{name}': {e}")))?.len();
        if len > MAX_LIST_FILE {
            return Err(BlockError::option(format!("Unable to read '{name}': larger than {MAX_LIST_FILE} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| BlockError::option(format!("Unable to read '{name}': {e}")))?;
        if !text.trim_start().starts_with('{') {
            return Err(BlockError::option(format!("Unable to parse '{name}': not a JSON object")));
        }
        let mut o = object_opts(&text).map_err(|e| BlockError::option(format!("Unable to parse '{name}': {}", e.msg)))?;
        let list = RuleList::parse(&mut o)?;
        if let Some(k) = o.keys().next() {
            return Err(BlockError::option(format!("Unable to parse '{name}': unexpected key '{k}'")));
        }
        Ok(list)
    }

    fn allows(&self, identity: &str) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if self.refresh {
            let now = self.stamp();
            if now != st.0 {
                match ListFile::load(&self.path) {
                    Ok(list) => *st = (now, list),
                    Err(e) => {
                        eprintln!("authz-listfile: {}; keeping the rules read before", e.msg);
                        st.0 = now;
                    }
                }
            }
        }
        st.1.allows(identity)
    }
}

/// An authorization object.
#[derive(Debug)]
pub struct Authz(Kind);

#[derive(Debug)]
enum Kind {
    Simple(String),
    List(RuleList),
    ListFile(ListFile),
}

impl Authz {
    /// Whether `ty` names an authorization object type.
    pub fn is_type(ty: &str) -> bool {
        matches!(ty, "authz-simple" | "authz-list" | "authz-listfile" | "authz-pam")
    }

    /// An object of type `ty` from its definition (type and id already taken).
    pub fn parse(ty: &str, o: &mut Opts) -> BlockResult<Authz> {
        let kind = match ty {
            "authz-simple" => Kind::Simple(o.take_str("identity").ok_or_else(|| missing("identity"))?),
            "authz-list" => Kind::List(RuleList::parse(o)?),
            "authz-listfile" => {
                let path = PathBuf::from(o.take_str("filename").ok_or_else(|| missing("filename"))?);
                let refresh = o.take_bool("refresh", true)?;
                let list = ListFile::load(&path)?;
                let f = ListFile { path, refresh, state: Mutex::new((None, list)) };
                let stamp = f.stamp();
                f.state.lock().unwrap_or_else(|p| p.into_inner()).0 = stamp;
                Kind::ListFile(f)
            }
            "authz-pam" => return Err(BlockError::option("authz-pam is not supported: there is no PAM support")),
            _ => return Err(BlockError::option(format!("Parameter 'qom-type' does not accept value '{ty}'"))),
        };
        if let Some(k) = o.keys().next() {
            return Err(BlockError::option(format!("Parameter '{k}' is unexpected")));
        }
        Ok(Authz(kind))
    }

    /// Whether `identity` may connect.
    pub fn allows(&self, identity: &str) -> bool {
        match &self.0 {
            Kind::Simple(id) => id == identity,
            Kind::List(l) => l.allows(identity),
            Kind::ListFile(f) => f.allows(identity),
        }
    }
}

/// An object definition as options: JSON (`{"qom-type": ..., "rules": [...]}`, lists becoming
/// `key.N` subtrees as QEMU's keyval syntax writes them) or `key=value,...`.
pub(crate) fn object_opts(def: &str) -> BlockResult<Opts> {
    if !def.trim_start().starts_with('{') {
        return Opts::parse_keyval(def, Some("qom-type"));
    }
    let v: serde_json::Value =
        serde_json::from_str(def).map_err(|e| BlockError::option(format!("Could not parse the JSON options: {e}")))?;
    Opts::from_json(&index_lists(v))
}

/// Replace every JSON list by an object keyed `0`, `1`, ...
fn index_lists(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Array(a) => Value::Object(a.into_iter().enumerate().map(|(i, x)| (i.to_string(), index_lists(x))).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, x)| (k, index_lists(x))).collect()),
        v => v,
    }
}

/// Shell-style matching of `s` against `p`: `*` any run of bytes, `?` one character (a UTF-8
/// sequence), everything else itself. The last `*` is the only point backtracked to, so the
/// time is at most the product of the lengths, never exponential.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    let char_len = |b: u8| match b {
        0xf0.. => 4,
        0xe0.. => 3,
        0xc0.. => 2,
        _ => 1,
    };
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(b'?') => {
                pi += 1;
                si = (si + char_len(s[si])).min(s.len());
            }
            Some(&c) if c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(def: &str) -> BlockResult<Authz> {
        let mut o = object_opts(def)?;
        let ty = o.take_str("qom-type").unwrap();
        o.take_str("id");
        Authz::parse(&ty, &mut o)
    }

    fn err(def: &str) -> String {
        parse(def).unwrap_err().msg
    }

    #[test]
    fn globs() {
        for (p, s, want) in [
            ("*CN=fred", "C=GB,CN=fred", true),
            ("*CN=fred", "C=GB,CN=freddy", false),
            ("dan*", "dan", true),
            ("dan*", "danb", true),
            ("d?n", "dän", true),
            ("d?n", "dn", false),
            ("*a*b*c", "xxaxxbxxc", true),
            ("*a*b*c", "xxaxxcxxb", false),
            ("", "", true),
            ("", "x", false),
            ("**", "", true),
            ("a", "a", true),
        ] {
            assert_eq!(glob_match(p.as_bytes(), s.as_bytes()), want, "{p} vs {s}");
        }
        // No exponential backtracking.
        let s = "a".repeat(10000);
        assert!(!glob_match(format!("{}b", "*a".repeat(50)).as_bytes(), s.as_bytes()));
    }

    #[test]
    fn simple_and_lists() {
        let a = parse("authz-simple,id=a,identity=C=GB,,CN=x").unwrap();
        assert!(a.allows("C=GB,CN=x") && !a.allows("C=GB,CN=y"));
        let l = parse(
            "authz-list,id=a,rules.0.match=bob,rules.0.policy=deny,rules.1.match=b*,rules.1.policy=allow,rules.1.format=glob",
        )
        .unwrap();
        assert!(!l.allows("bob") && l.allows("bill") && !l.allows("carl"), "first match decides, default deny");
        let j = parse(
            r#"{"qom-type":"authz-list","id":"a","policy":"allow","rules":[{"match":"danb","policy":"deny","format":"exact"}]}"#,
        )
        .unwrap();
        assert!(!j.allows("danb") && j.allows("anyone"));
    }

    #[test]
    fn errors_read_as_qemu() {
        assert_eq!(err("authz-simple,id=a"), "Parameter 'identity' is missing");
        assert_eq!(err("authz-list,id=a,rules.0.match=x"), "Parameter 'rules.0.policy' is missing");
        assert_eq!(
            err("authz-list,id=a,rules.0.match=x,rules.0.policy=maybe"),
            "Parameter 'policy' does not accept value 'maybe'"
        );
        assert_eq!(err("authz-list,id=a,policy=never"), "Parameter 'policy' does not accept value 'never'");
        assert_eq!(
            err("authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.0.format=re"),
            "Parameter 'format' does not accept value 're'"
        );
        assert_eq!(err("authz-simple,id=a,identity=x,colour=red"), "Parameter 'colour' is unexpected");
        assert!(err("authz-pam,id=a,service=x").contains("not supported"));
        assert!(err("authz-listfile,id=a,filename=/nonexistent/acl").starts_with("Unable to read '/nonexistent/acl'"));
    }

    #[test]
    fn list_file_is_read_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("basalt-authz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("acl.json");
        std::fs::write(&path, r#"{"rules":[{"match":"fred","policy":"allow"}],"policy":"deny"}"#).unwrap();
        let a = parse(&format!("authz-listfile,id=a,filename={}", path.display())).unwrap();
        let frozen = parse(&format!("authz-listfile,id=a,filename={},refresh=off", path.display())).unwrap();
        assert!(a.allows("fred") && !a.allows("bob"));
        // A longer file: the change shows in the length even within the clock's granularity.
        std::fs::write(&path, r#"{"rules":[{"match":"bob","policy":"allow"}],  "policy":"deny"}"#).unwrap();
        assert!(a.allows("bob") && !a.allows("fred"), "re-read after the change");
        assert!(frozen.allows("fred") && !frozen.allows("bob"), "refresh=off keeps the first reading");
        // A broken change keeps the rules read before.
        std::fs::write(&path, "rules.0.match=x").unwrap();
        assert!(a.allows("bob") && !a.allows("fred"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(a.allows("bob") && !a.allows("fred"));
        assert!(err(&format!("authz-listfile,id=a,filename={}", path.display())).starts_with("Unable to parse"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
