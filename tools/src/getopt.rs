//! A small getopt_long work-alike, because the tools must take qemu-img's and qemu-io's
//! command lines exactly (short options bundled, `-oVALUE` and `-o VALUE`, `--long=VALUE`,
//! options after operands, `--` ending options) and answer bad ones with qemu-img's wording,
//! which argument-parser crates do not reproduce.

/// One option a command accepts.
#[derive(Clone, Copy, Debug)]
pub struct OptSpec {
    /// Short letter, if any.
    pub short: Option<char>,
    /// Long name, if any.
    pub long: Option<&'static str>,
    /// Whether it takes a value.
    pub arg: bool,
}

/// Shorthand for a spec.
pub const fn opt(short: Option<char>, long: Option<&'static str>, arg: bool) -> OptSpec {
    OptSpec { short, long, arg }
}

/// A parsed option: its canonical name (the long name, or the short letter as a string) and
/// value.
#[derive(Clone, Debug, PartialEq)]
pub struct Parsed {
    /// Canonical name.
    pub name: String,
    /// Value when the option takes one.
    pub value: Option<String>,
}

/// Options in order, and the operands.
#[derive(Debug, Default)]
pub struct Args {
    /// Options in the order given.
    pub opts: Vec<Parsed>,
    /// Operands.
    pub operands: Vec<String>,
}

impl Args {
    /// The last value of an option.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.opts.iter().rev().find(|o| o.name == name).and_then(|o| o.value.as_deref())
    }

    /// Every value of a repeated option.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.opts.iter().filter(|o| o.name == name).filter_map(|o| o.value.as_deref()).collect()
    }

    /// Whether a flag was given.
    pub fn has(&self, name: &str) -> bool {
        self.opts.iter().any(|o| o.name == name)
    }
}

fn canonical(s: &OptSpec) -> String {
    match (s.long, s.short) {
        (Some(l), _) => l.to_string(),
        (None, Some(c)) => c.to_string(),
        (None, None) => String::new(),
    }
}

/// Parse `args` against `specs`. Errors carry getopt's wording ("invalid option -- 'x'").
pub fn parse(args: &[String], specs: &[OptSpec]) -> Result<Args, String> {
    let mut out = Args::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            out.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let matches: Vec<&OptSpec> = specs.iter().filter(|s| s.long.is_some_and(|l| l.starts_with(name))).collect();
            let spec = specs.iter().find(|s| s.long == Some(name)).or(if matches.len() == 1 { Some(matches[0]) } else { None });
            let Some(spec) = spec else {
                return Err(format!("unrecognized option '--{name}'"));
            };
            let value = if spec.arg {
                match inline {
                    Some(v) => Some(v),
                    None if i < args.len() => {
                        i += 1;
                        Some(args[i - 1].clone())
                    }
                    None => return Err(format!("option '--{}' requires an argument", spec.long.unwrap_or(name))),
                }
            } else {
                if inline.is_some() {
                    return Err(format!("option '--{}' doesn't allow an argument", spec.long.unwrap_or(name)));
                }
                None
            };
            out.opts.push(Parsed { name: canonical(spec), value });
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                let Some(spec) = specs.iter().find(|s| s.short == Some(c)) else {
                    return Err(format!("invalid option -- '{c}'"));
                };
                if spec.arg {
                    let rest: String = chars[j..].iter().collect();
                    let value = if !rest.is_empty() {
                        rest
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return Err(format!("option requires an argument -- '{c}'"));
                    };
                    out.opts.push(Parsed { name: canonical(spec), value: Some(value) });
                    break;
                }
                out.opts.push(Parsed { name: canonical(spec), value: None });
            }
            continue;
        }
        out.operands.push(a.clone());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn bundles_values_and_operands() {
        let specs =
            [opt(Some('f'), Some("format"), true), opt(Some('U'), Some("force-share"), false), opt(Some('o'), None, true)];
        let a = parse(&s(&["-Uf", "raw", "x.img", "-ofoo=1", "--format=qcow2", "-o", "bar=2"]), &specs).unwrap();
        assert_eq!(a.value("format"), Some("qcow2"));
        assert!(a.has("force-share"));
        assert_eq!(a.values("o"), vec!["foo=1", "bar=2"]);
        assert_eq!(a.operands, vec!["x.img"]);
        assert_eq!(parse(&s(&["-z"]), &specs).unwrap_err(), "invalid option -- 'z'");
        assert_eq!(parse(&s(&["-f"]), &specs).unwrap_err(), "option requires an argument -- 'f'");
        assert!(parse(&s(&["--nope"]), &specs).is_err());
    }
}
