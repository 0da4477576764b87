//! Command lines inside qemu-io: splitting a command string into words, and the per-command
//! `getopt` (short options only, glibc style).
//!
//! qemu-io splits a command at spaces only (no quoting, tabs are part of a word, empty words
//! vanish). Its commands parse options with glibc `getopt`, which permutes: options may follow
//! operands (`read 0 512 -v`), `--` ends options, a lone `-` is an operand. [`Getopt`] yields
//! options in order so that a command can refuse a bad value before looking at later options,
//! as qemu-io's loops do; errors carry glibc's wording.

/// Split a command string into words as qemu-io does.
pub(crate) fn split(line: &str) -> Vec<String> {
    line.split(' ').filter(|w| !w.is_empty()).map(str::to_string).collect()
}

/// One step of option parsing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opt {
    /// An option and its value, if it takes one.
    Opt(char, Option<String>),
    /// A bad option; the message as glibc prints it after `NAME: `.
    Bad(String),
}

/// glibc `getopt` over a command's arguments (without the command name).
pub(crate) struct Getopt<'a> {
    args: &'a [String],
    spec: &'static str,
    i: usize,
    /// Position inside a bundle of short options (`-Cq`), 0 when not in one.
    sub: usize,
    operands: Vec<String>,
}

impl<'a> Getopt<'a> {
    /// Parse `args` against an optstring like `"bCl:pP:qrs:v"`.
    pub(crate) fn new(args: &'a [String], spec: &'static str) -> Getopt<'a> {
        Getopt { args, spec, i: 0, sub: 0, operands: Vec::new() }
    }

    fn takes_value(&self, c: char) -> Option<bool> {
        let at = self.spec.find(c)?;
        Some(self.spec[at + c.len_utf8()..].starts_with(':'))
    }

    /// The operands, once options are exhausted (call after the iterator returned `None`).
    pub(crate) fn operands(self) -> Vec<String> {
        self.operands
    }
}

impl Iterator for Getopt<'_> {
    type Item = Opt;

    fn next(&mut self) -> Option<Opt> {
        loop {
            let arg = self.args.get(self.i)?;
            if self.sub == 0 {
                if arg == "--" {
                    self.operands.extend(self.args[self.i + 1..].iter().cloned());
                    self.i = self.args.len();
                    return None;
                }
                if arg.len() < 2 || !arg.starts_with('-') {
                    self.operands.push(arg.clone());
                    self.i += 1;
                    continue;
                }
                self.sub = 1;
            }
            let Some(c) = arg[self.sub..].chars().next() else {
                self.sub = 0;
                self.i += 1;
                continue;
            };
            self.sub += c.len_utf8();
            let at_end = self.sub >= arg.len();
            match self.takes_value(c).filter(|_| c != ':') {
                None => {
                    if at_end {
                        self.sub = 0;
                        self.i += 1;
                    }
                    return Some(Opt::Bad(format!("invalid option -- '{c}'")));
                }
                Some(false) => {
                    if at_end {
                        self.sub = 0;
                        self.i += 1;
                    }
                    return Some(Opt::Opt(c, None));
                }
                Some(true) => {
                    let value = if !at_end {
                        Some(arg[self.sub..].to_string())
                    } else {
                        self.args.get(self.i + 1).cloned().inspect(|_| self.i += 1)
                    };
                    self.sub = 0;
                    self.i += 1;
                    return Some(match value {
                        Some(v) => Opt::Opt(c, Some(v)),
                        None => Opt::Bad(format!("option requires an argument -- '{c}'")),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn splits_on_spaces_only() {
        assert_eq!(split("  read  -v 0\t1 "), s(&["read", "-v", "0\t1"]));
        assert!(split("").is_empty());
    }

    #[test]
    fn permutes_bundles_and_values() {
        let args = s(&["0", "-CqP", "0xab", "512", "-v", "-s5", "--", "-1"]);
        let mut g = Getopt::new(&args, "CP:qs:v");
        let got: Vec<Opt> = g.by_ref().collect();
        assert_eq!(
            got,
            vec![
                Opt::Opt('C', None),
                Opt::Opt('q', None),
                Opt::Opt('P', Some("0xab".into())),
                Opt::Opt('v', None),
                Opt::Opt('s', Some("5".into()))
            ]
        );
        assert_eq!(g.operands(), s(&["0", "512", "-1"]));
        let args = s(&["-x", "-P"]);
        let got: Vec<Opt> = Getopt::new(&args, "P:").collect();
        assert_eq!(got, vec![Opt::Bad("invalid option -- 'x'".into()), Opt::Bad("option requires an argument -- 'P'".into())]);
    }
}
