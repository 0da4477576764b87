//! `basalt-img snapshot`: list, create, apply and delete internal snapshots, as qemu-img
//! snapshot does (`-l` is the default; one operation at a time; `-a` finds a snapshot by ID,
//! then by name; `-d` by name). Also the snapshot table that `info` prints, in qemu-img's
//! columns, dates in local time.

use basalt_engine::SnapshotInfo;

use super::common;
use crate::getopt::opt;
use crate::human::size_to_str;

const HELP: &str = "Usage:
List or manipulate snapshots within image.  Usage:

  basalt-img snapshot [-f FMT | --image-opts] [-l | -a|-c|-d SNAPSHOT]
        [-U] [--object OBJDEF] FILENAME

Arguments:
  -h, --help
     print this help and exit
  -q, --quiet
      quiet operations
  -f, --format FMT
      specify FILENAME format explicitly
  --image-opts
      indicates that FILENAME is a complete image specification
   instead of a file name (incompatible with --format)
  -U, --force-share
      open image in shared mode for concurrent access
  --object OBJDEF
      QEMU user-creatable object (eg encryption key)
  Operation, one of:
    -l, --list
       list snapshots in FILENAME (the default)
    -c, --create SNAPSHOT
       create named snapshot
    -a, --apply SNAPSHOT
       apply named snapshot to the base
    -d, --delete SNAPSHOT
       delete named snapshot
  FILENAME - image file name (or specification with --image-opts)

";

/// `strftime("%Y-%m-%d %H:%M:%S")` of `secs` in local time.
fn local_date(secs: u32) -> String {
    let t = libc::time_t::from(secs);
    // SAFETY: an all-zero `tm` is a valid value of that plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals; localtime_r is thread-safe and writes only `tm`.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return String::from("????-??-?? ??:??:??");
    }
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02}", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// The header line of a snapshot table.
pub fn header_line() -> String {
    format!("{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}", "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT")
}

/// One snapshot as a table line.
pub fn line(sn: &SnapshotInfo) -> String {
    let secs = sn.vm_clock_nsec / 1_000_000_000;
    let clock =
        format!("{:04}:{:02}:{:02}.{:03}", secs / 3600, (secs / 60) % 60, secs % 60, (sn.vm_clock_nsec / 1_000_000) % 1000);
    let icount = sn.icount.map_or_else(|| "--".to_string(), |i| i.to_string());
    format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
        sn.id,
        sn.name,
        size_to_str(sn.vm_state_size),
        local_date(sn.date_sec),
        clock,
        icount
    )
}

/// The snapshot as `info --output=json` shows it (QEMU's `SnapshotInfo`).
pub fn json(sn: &SnapshotInfo) -> serde_json::Value {
    let mut f = vec![
        ("id", serde_json::json!(sn.id)),
        ("name", serde_json::json!(sn.name)),
        ("vm-state-size", serde_json::json!(sn.vm_state_size)),
        ("date-sec", serde_json::json!(sn.date_sec)),
        ("date-nsec", serde_json::json!(sn.date_nsec)),
        ("vm-clock-sec", serde_json::json!(sn.vm_clock_nsec / 1_000_000_000)),
        ("vm-clock-nsec", serde_json::json!(sn.vm_clock_nsec % 1_000_000_000)),
    ];
    if let Some(i) = sn.icount {
        f.push(("icount", serde_json::json!(i)));
    }
    super::info::qdict(f)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    List,
    Create,
    Apply,
    Delete,
}

/// Run the subcommand.
pub async fn main(args: Vec<String>) -> i32 {
    let specs = [
        opt(Some('h'), Some("help"), false),
        opt(Some('q'), Some("quiet"), false),
        opt(Some('f'), Some("format"), true),
        opt(None, Some("image-opts"), false),
        opt(Some('U'), Some("force-share"), false),
        opt(None, Some("object"), true),
        opt(Some('l'), Some("list"), false),
        opt(Some('c'), Some("create"), true),
        opt(Some('a'), Some("apply"), true),
        opt(Some('d'), Some("delete"), true),
    ];
    let a = match common::parse_args("snapshot", HELP, &args, &specs) {
        Ok(a) => a,
        Err(code) => return code,
    };
    let mut action = None;
    let mut name = String::new();
    for (key, act) in [("list", Action::List), ("create", Action::Create), ("apply", Action::Apply), ("delete", Action::Delete)] {
        if a.has(key) {
            if action.is_some() {
                return common::usage_error("snapshot", "Cannot mix '-l', '-a', '-c', '-d'");
            }
            action = Some(act);
            name = a.value(key).unwrap_or_default().to_string();
        }
    }
    let action = action.unwrap_or(Action::List);
    if a.operands.len() != 1 {
        return common::usage_error("snapshot", "Expecting one image file name");
    }
    if let Err(code) = common::check_objects(&a) {
        return code;
    }
    let filename = &a.operands[0];
    let mut spec = common::spec_from_args(&a, filename, "format");
    spec.read_only = action == Action::List;
    let graph = crate::img::common::graph(&a);
    let Ok(node) = common::open(&graph, &spec).await else {
        return 1;
    };
    let r = match action {
        Action::List => {
            let list = node.snapshots();
            if !list.is_empty() {
                println!("Snapshot list:");
                println!("{}", header_line());
                for sn in &list {
                    println!("{}", line(sn));
                }
            }
            Ok(())
        }
        Action::Create => node.snapshot_create(&name).await.map_err(|e| format!("Could not create snapshot '{name}': {}", e.msg)),
        Action::Apply => node.snapshot_goto(&name).await.map_err(|e| format!("Could not apply snapshot '{name}': {}", e.msg)),
        Action::Delete => node.snapshot_delete(&name).await.map_err(|e| format!("Could not delete snapshot '{name}': {}", e.msg)),
    };
    let closed = graph.close().await;
    match (r, closed) {
        (Ok(()), Ok(())) => 0,
        (Err(m), _) => {
            common::error(m);
            1
        }
        (_, Err(e)) => {
            common::error(e);
            1
        }
    }
}
