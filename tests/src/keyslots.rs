//! LUKS key slot amendment (`amend -o [encrypt.]state=...`) checked against qemu-img, for both
//! places a LUKS header lives: the `luks` format and qcow2's `encrypt.format=luks` (a
//! [`Flavour`] each). Used by the `luks` and `qcow2_amend` tests.
//!
//! - [`keyslots_both_ways`]: the same amendments by basalt-img and by qemu-img to copies of one
//!   image (in two directories, so that names match) leave the same key slots (state, key
//!   material offset, stripes; a new slot's salt and iterations are random, an erased slot's
//!   are zero in both), the same `info --output=json` but for the slots' random `iters`; every
//!   key that should open does so in qemu-io and basalt-io on both images (so keys basalt-img
//!   added open in QEMU and keys qemu-img added open in Basalt) and reads the data written
//!   before; removed keys fail in both with QEMU's error; a qcow2 stays clean under
//!   `qemu-img check`.
//! - [`keyslot_errors`]: refused amendments print what qemu-img prints, exit as it does and
//!   leave the image's bytes unchanged.

use std::path::Path;
use std::process::{Command, Output};

use crate::{assert_same_img_outcome, be32, be64, must, peer, run, stderr, stdout, tool};

/// The secrets: id and passphrase.
pub const KEYS: [(&str, &str); 3] = [("sec0", "abc"), ("sec1", "second key"), ("sec2", "third")];

/// Data written before any amendment and read back after each: (pattern, offset, length).
const DATA: &[(u8, u64, u64)] = &[(0x5a, 0, 65536), (0xa5, 1 << 20, 4096), (0x3c, (3 << 20) + 512, 1536)];

/// Where the LUKS header is: the `luks` format (options as named) or qcow2 (`encrypt.`).
pub struct Flavour {
    /// The format.
    pub fmt: &'static str,
    /// Before each LUKS option's name.
    pub prefix: &'static str,
}

/// The `luks` format.
pub const LUKS: Flavour = Flavour { fmt: "luks", prefix: "" };
/// qcow2 with `encrypt.format=luks`.
pub const QCOW2: Flavour = Flavour { fmt: "qcow2", prefix: "encrypt." };

fn objects() -> Vec<String> {
    KEYS.iter().flat_map(|(id, pw)| ["--object".to_string(), format!("secret,id={id},data={pw}")]).collect()
}

fn qemu_img(dir: &Path, args: &[String]) -> Output {
    run(peer("qemu-img").current_dir(dir).args(args))
}

fn basalt(dir: &Path, name: &str, args: &[String]) -> Output {
    run(Command::new("timeout").current_dir(dir).arg("120").arg(tool(name)).args(args))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The LUKS header's slot table entries as the file holds them: (active, key material offset,
/// stripes, salt and iterations as QEMU leaves them: set for an active slot, zero for an
/// inactive one).
pub type SlotSummary = Vec<(bool, u32, u32, bool)>;

impl Flavour {
    fn file(&self) -> String {
        format!("img.{}", self.fmt)
    }

    /// `--image-opts` for the image with key `key`.
    fn image_opts(&self, key: &str) -> String {
        format!("driver={},file.filename={},{}key-secret={key}", self.fmt, self.file(), self.prefix)
    }

    /// Prefix every `k=v` of `opts`.
    fn opts(&self, opts: &str) -> String {
        opts.split(',').map(|o| format!("{}{o}", self.prefix)).collect::<Vec<_>>().join(",")
    }

    /// Create the image with qemu-img (key `sec0`, fast PBKDF) and write [`DATA`] with qemu-io.
    fn create(&self, dir: &Path) {
        let o = if self.fmt == "luks" {
            "key-secret=sec0,iter-time=10".to_string()
        } else {
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10".to_string()
        };
        let mut args = strings(&["create", "-q", "-f", self.fmt]);
        args.extend(objects());
        args.extend(["-o".to_string(), o, self.file(), "4M".to_string()]);
        must(&qemu_img(dir, &args), "qemu-img create");
        let cmds: Vec<String> = DATA.iter().map(|(p, o, l)| format!("write -P {p} {o} {l}")).collect();
        let o = self.io(dir, false, "sec0", &cmds);
        must(&o, "qemu-io write");
    }

    fn io(&self, dir: &Path, basalt_side: bool, key: &str, cmds: &[String]) -> Output {
        let mut args = objects();
        args.extend(["--image-opts".to_string(), self.image_opts(key)]);
        for c in cmds {
            args.extend(["-c".to_string(), c.clone()]);
        }
        if basalt_side {
            basalt(dir, "basalt-io", &args)
        } else {
            run(peer("qemu-io").current_dir(dir).args(&args))
        }
    }

    /// `amend` by basalt-img or qemu-img, opened with `key`, `-o` the prefixed `opts`.
    fn amend(&self, dir: &Path, basalt_side: bool, key: &str, opts: &str, force: bool) -> Output {
        let mut args = strings(&["amend"]);
        args.extend(objects());
        if force {
            args.push("--force".into());
        }
        args.extend(["--image-opts".to_string(), self.image_opts(key), "-o".to_string(), self.opts(opts)]);
        if basalt_side {
            basalt(dir, "basalt-img", &args)
        } else {
            qemu_img(dir, &args)
        }
    }

    /// Offset of the LUKS header in the image file.
    fn luks_offset(&self, d: &[u8]) -> usize {
        if self.fmt == "luks" {
            return 0;
        }
        let mut o = be32(d, 100) as usize;
        loop {
            let (t, l) = (be32(d, o), be32(d, o + 4) as usize);
            assert_ne!(t, 0, "qcow2 image without a full disk encryption header extension");
            if t == 0x0537_be77 {
                return be64(d, o + 8) as usize;
            }
            o += 8 + l.next_multiple_of(8);
        }
    }

    /// The slot table of the image in `dir`.
    pub fn slots(&self, dir: &Path) -> SlotSummary {
        let d = std::fs::read(dir.join(self.file())).unwrap();
        let base = self.luks_offset(&d);
        assert_eq!(&d[base..base + 6], b"LUKS\xba\xbe", "LUKS magic");
        (0..8)
            .map(|i| {
                let e = base + 208 + 48 * i;
                let state = be32(&d, e);
                let active = match state {
                    0x00ac_71f3 => true,
                    0x0000_dead => false,
                    s => panic!("slot {i}: state {s:#x}"),
                };
                let iters = be32(&d, e + 4);
                let salt_zero = d[e + 8..e + 40].iter().all(|&b| b == 0);
                let as_qemu_leaves = if active { iters >= 1000 && !salt_zero } else { iters == 0 && salt_zero };
                (active, be32(&d, e + 40), be32(&d, e + 44), as_qemu_leaves)
            })
            .collect()
    }

    /// `info --output=json` of the image without the active slots' (random) iterations.
    fn info(&self, dir: &Path) -> serde_json::Value {
        let mut args = strings(&["info", "--output=json", "-U"]);
        args.push(self.file());
        let o = qemu_img(dir, &args);
        must(&o, "qemu-img info");
        let mut v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let data = &mut v["format-specific"]["data"];
        let luks = if self.fmt == "luks" { data } else { &mut data["encrypt"] };
        for s in luks["slots"].as_array_mut().expect("slots") {
            s.as_object_mut().unwrap().remove("iters");
        }
        // Sizes on disk differ by what the file system allocated (a copy is not sparse).
        fn strip(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    m.remove("actual-size");
                    m.values_mut().for_each(strip);
                }
                serde_json::Value::Array(a) => a.iter_mut().for_each(strip),
                _ => {}
            }
        }
        strip(&mut v);
        v
    }

    /// Whether `key` opens the image in qemu-io or basalt-io; when it does, the data must
    /// read back; when it does not, the error must be QEMU's.
    fn opens(&self, dir: &Path, basalt_side: bool, key: &str) -> bool {
        let cmds: Vec<String> = DATA.iter().map(|(p, o, l)| format!("read -P {p} {o} {l}")).collect();
        let o = self.io(dir, basalt_side, key, &cmds);
        let who = if basalt_side { "basalt-io" } else { "qemu-io" };
        let out = stdout(&o) + &stderr(&o);
        if o.status.success() {
            assert!(!out.contains("failed") && !out.contains("error"), "{who} with {key} in {}:\n{out}", dir.display());
            true
        } else {
            assert!(
                stderr(&o).contains("Invalid password, cannot unlock any keyslot"),
                "{who} with {key} in {}: {out}",
                dir.display()
            );
            false
        }
    }
}

/// One amendment of [`keyslots_both_ways`]: the key the image is opened with, the options
/// (unprefixed), `--force`, then the slots active after it and the keys that open.
struct Step {
    key: &'static str,
    opts: &'static str,
    force: bool,
    active: [usize; 8],
    opening: &'static [&'static str],
}

const UNUSED: usize = usize::MAX;

/// Add and remove keys with both tools; see the module doc.
pub fn keyslots_both_ways(fl: &Flavour) {
    let root = tempfile::tempdir().unwrap();
    let (dq, db) = (root.path().join("q"), root.path().join("b"));
    std::fs::create_dir(&dq).unwrap();
    fl.create(&dq);
    std::fs::create_dir(&db).unwrap();
    std::fs::copy(dq.join(fl.file()), db.join(fl.file())).unwrap();
    let u = UNUSED;
    let steps = [
        Step {
            key: "sec0",
            opts: "state=active,new-secret=sec1,iter-time=10",
            force: false,
            active: [0, 1, u, u, u, u, u, u],
            opening: &["sec0", "sec1"],
        },
        Step {
            key: "sec1",
            opts: "state=active,new-secret=sec2,keyslot=5,iter-time=10",
            force: false,
            active: [0, 1, 5, u, u, u, u, u],
            opening: &["sec0", "sec1", "sec2"],
        },
        Step {
            key: "sec2",
            opts: "state=inactive,old-secret=sec0",
            force: false,
            active: [1, 5, u, u, u, u, u, u],
            opening: &["sec1", "sec2"],
        },
        // Overwriting an active slot needs --force; its old key is gone.
        Step {
            key: "sec1",
            opts: "state=active,new-secret=sec0,keyslot=5,iter-time=10",
            force: true,
            active: [1, 5, u, u, u, u, u, u],
            opening: &["sec0", "sec1"],
        },
        Step {
            key: "sec0",
            opts: "state=inactive,keyslot=1",
            force: false,
            active: [5, u, u, u, u, u, u, u],
            opening: &["sec0"],
        },
        // The last slot goes only with --force: then no key opens the image.
        Step { key: "sec0", opts: "state=inactive,keyslot=5", force: true, active: [u; 8], opening: &[] },
    ];
    for s in &steps {
        let what = format!("{} {}{}", fl.fmt, if s.force { "--force " } else { "" }, s.opts);
        must(&fl.amend(&db, true, s.key, s.opts, s.force), &format!("basalt-img amend {what}"));
        must(&fl.amend(&dq, false, s.key, s.opts, s.force), &format!("qemu-img amend {what}"));
        let (sb, sq) = (fl.slots(&db), fl.slots(&dq));
        assert_eq!(sb, sq, "{what}: slot tables (active, offset, stripes, salt/iterations as QEMU leaves them)");
        let active: Vec<usize> = (0..8).filter(|&i| sb[i].0).collect();
        let want: Vec<usize> = s.active.iter().copied().filter(|&i| i != UNUSED).collect();
        assert_eq!(active, want, "{what}: active slots");
        assert!(sb.iter().all(|e| e.3), "{what}: salt/iterations not as QEMU leaves them: {sb:?}");
        assert_eq!(fl.info(&db), fl.info(&dq), "{what}: info");
        for (key, _) in KEYS {
            let want = s.opening.contains(&key);
            for (dir, made_by) in [(&db, "basalt-img"), (&dq, "qemu-img")] {
                for basalt_side in [false, true] {
                    let reader = if basalt_side { "basalt-io" } else { "qemu-io" };
                    assert_eq!(
                        fl.opens(dir, basalt_side, key),
                        want,
                        "{what}: {key} in {reader} on the image {made_by} amended (expected to open: {want})"
                    );
                }
            }
        }
        if fl.fmt == "qcow2" && !s.opening.is_empty() {
            for dir in [&db, &dq] {
                let mut args = objects();
                args.insert(0, "check".into());
                args.extend(["--image-opts".to_string(), fl.image_opts(s.opening[0])]);
                let c = qemu_img(dir, &args);
                assert_eq!(c.status.code(), Some(0), "{what}: qemu-img check:\n{}{}", stdout(&c), stderr(&c));
            }
        }
    }
}

/// Refused key slot amendments read as qemu-img's and change nothing; see the module doc.
pub fn keyslot_errors(fl: &Flavour) {
    let root = tempfile::tempdir().unwrap();
    let (dq, db) = (root.path().join("q"), root.path().join("b"));
    std::fs::create_dir(&dq).unwrap();
    std::fs::create_dir(&db).unwrap();
    fl.create(&dq);
    // A second image with every slot in use.
    let full = root.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::copy(dq.join(fl.file()), full.join(fl.file())).unwrap();
    for _ in 1..8 {
        must(&fl.amend(&full, false, "sec0", "state=active,new-secret=sec1,iter-time=10", false), "fill slots");
    }
    let cases: &[(&str, &str, &str, bool)] = &[
        ("base", "sec0", "new-secret=sec1", false),
        ("base", "sec0", "state=foo", false),
        ("base", "sec0", "state=active", false),
        ("base", "sec0", "state=active,new-secret=sec1,old-secret=sec0", false),
        ("base", "sec0", "state=active,new-secret=sec1,keyslot=0", false),
        ("base", "sec0", "state=active,new-secret=sec1,keyslot=8", false),
        ("base", "sec0", "state=active,new-secret=sec1,keyslot=-1", false),
        ("base", "sec0", "state=active,new-secret=sec1,keyslot=x", false),
        ("base", "sec0", "state=active,new-secret=sec1,iter-time=x", false),
        ("base", "sec0", "state=active,new-secret=nosuch,iter-time=10", false),
        ("base", "sec0", "state=inactive", false),
        ("base", "sec0", "state=inactive,new-secret=sec1,keyslot=1", false),
        ("base", "sec0", "state=inactive,iter-time=10,keyslot=1", false),
        ("base", "sec0", "state=inactive,keyslot=3", false),
        ("base", "sec0", "state=inactive,keyslot=9", false),
        ("base", "sec0", "state=inactive,keyslot=-1", false),
        ("base", "sec0", "state=inactive,keyslot=0", false),
        ("base", "sec0", "state=inactive,keyslot=0,old-secret=sec1", false),
        ("base", "sec0", "state=inactive,old-secret=sec1", false),
        ("base", "sec0", "state=inactive,old-secret=sec0", false),
        ("base", "sec0", "state=inactive,old-secret=nosuch", false),
        ("base", "sec0", "foo=1", false),
        ("full", "sec0", "state=active,new-secret=sec2,iter-time=10", false),
        ("full", "sec0", "state=inactive,keyslot=1,old-secret=sec0", false),
    ];
    for &(which, key, opts, force) in cases {
        let src = if which == "full" { &full } else { &dq };
        let orig = std::fs::read(src.join(fl.file())).unwrap();
        let mut outs = Vec::new();
        for (dir, basalt_side) in [(&db, true), (&dq, false)] {
            std::fs::write(dir.join(fl.file()), &orig).unwrap();
            outs.push(fl.amend(dir, basalt_side, key, opts, force));
            assert!(std::fs::read(dir.join(fl.file())).unwrap() == orig, "{} {opts} changed the image", fl.fmt);
        }
        assert_same_img_outcome(&outs[0], &outs[1], &format!("amend {} ({which}) -o {opts}", fl.fmt));
        assert_ne!(outs[1].status.code(), Some(0), "qemu-img amend {} ({which}) -o {opts} was expected to fail", fl.fmt);
    }
    // Without the key the image does not open for amend; help needs no image with -f.
    for args in [
        vec!["amend".to_string(), "-f".into(), fl.fmt.into(), "-o".into(), fl.opts("state=active,new-secret=sec1"), fl.file()],
        vec!["amend".to_string(), "-f".into(), fl.fmt.into(), "-o".into(), "help".into(), "none".into()],
    ] {
        let mut a = args.clone();
        a.splice(1..1, objects());
        assert_same_img_outcome(&basalt(&dq, "basalt-img", &a), &qemu_img(&dq, &a), &format!("{args:?}"));
    }
}
