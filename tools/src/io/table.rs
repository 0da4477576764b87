//! The command table of basalt-io: qemu-io's commands with their names, one-letter aliases,
//! argument counts, usage lines and help texts (qemu-io's own wording, so `help CMD` prints
//! what qemu-io prints). Sorted by name, as `help` lists them.

/// Which command a table entry runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CmdId {
    Abort,
    AioFlush,
    AioRead,
    AioWrite,
    Alloc,
    Close,
    Discard,
    Flush,
    Help,
    Info,
    Length,
    Map,
    Open,
    Quit,
    Read,
    Readv,
    Sigraise,
    Sleep,
    Truncate,
    Write,
    Writev,
}

/// One command.
pub(crate) struct CmdInfo {
    /// What it runs.
    pub id: CmdId,
    /// Its name.
    pub name: &'static str,
    /// Its one-letter alias, if any.
    pub alt: Option<&'static str>,
    /// Fewest arguments (after the name, options included).
    pub argmin: usize,
    /// Most arguments; `None` for no limit.
    pub argmax: Option<usize>,
    /// Runs without an open image.
    pub global: bool,
    /// Needs the image writable (qemu-io's write or resize permission).
    pub writes: bool,
    /// The argument synopsis, if any.
    pub args: Option<&'static str>,
    /// The one-line description.
    pub oneline: &'static str,
    /// The extended help, if any.
    pub help: Option<&'static str>,
}

const fn cmd(id: CmdId, name: &'static str, alt: Option<&'static str>, argmin: usize, argmax: Option<usize>) -> CmdInfo {
    CmdInfo { id, name, alt, argmin, argmax, global: false, writes: false, args: None, oneline: "", help: None }
}

/// Every command, sorted by name.
pub(crate) static COMMANDS: &[CmdInfo] = &[
    CmdInfo { global: true, oneline: "simulate a program crash using abort(3)", ..cmd(CmdId::Abort, "abort", None, 0, Some(0)) },
    CmdInfo { oneline: "completes all outstanding aio requests", ..cmd(CmdId::AioFlush, "aio_flush", None, 0, Some(0)) },
    CmdInfo {
        args: Some("[-Ciqrv] [-P pattern] off len [len..]"),
        oneline: "asynchronously reads a number of bytes",
        help: Some(HELP_AIO_READ),
        ..cmd(CmdId::AioRead, "aio_read", None, 2, None)
    },
    CmdInfo {
        writes: true,
        args: Some("[-Cfiqruz] [-P pattern] off len [len..]"),
        oneline: "asynchronously writes a number of bytes",
        help: Some(HELP_AIO_WRITE),
        ..cmd(CmdId::AioWrite, "aio_write", None, 2, None)
    },
    CmdInfo {
        args: Some("offset [count]"),
        oneline: "checks if offset is allocated in the file",
        ..cmd(CmdId::Alloc, "alloc", Some("a"), 1, Some(2))
    },
    CmdInfo { oneline: "close the current open file", ..cmd(CmdId::Close, "close", Some("c"), 0, Some(0)) },
    CmdInfo {
        writes: true,
        args: Some("[-Cq] off len"),
        oneline: "discards a number of bytes at a specified offset",
        help: Some(HELP_DISCARD),
        ..cmd(CmdId::Discard, "discard", Some("d"), 2, None)
    },
    CmdInfo { oneline: "flush all in-core file state to disk", ..cmd(CmdId::Flush, "flush", Some("f"), 0, Some(0)) },
    CmdInfo {
        global: true,
        args: Some("[command]"),
        oneline: "help for one or all commands",
        ..cmd(CmdId::Help, "help", Some("?"), 0, Some(1))
    },
    CmdInfo { oneline: "prints information about the current file", ..cmd(CmdId::Info, "info", Some("i"), 0, Some(0)) },
    CmdInfo { oneline: "gets the length of the current file", ..cmd(CmdId::Length, "length", Some("l"), 0, Some(0)) },
    CmdInfo { args: Some(""), oneline: "prints the allocated areas of a file", ..cmd(CmdId::Map, "map", None, 0, Some(0)) },
    CmdInfo {
        global: true,
        args: Some("[-rsCnkU] [-t cache] [-d discard] [-o options] [path]"),
        oneline: "open the file specified by path",
        help: Some(HELP_OPEN),
        ..cmd(CmdId::Open, "open", Some("o"), 1, None)
    },
    CmdInfo { global: true, oneline: "exit the program", ..cmd(CmdId::Quit, "quit", Some("q"), 0, None) },
    CmdInfo {
        args: Some("[-abCqrv] [-P pattern [-s off] [-l len]] off len"),
        oneline: "reads a number of bytes at a specified offset",
        help: Some(HELP_READ),
        ..cmd(CmdId::Read, "read", Some("r"), 2, None)
    },
    CmdInfo {
        args: Some("[-Cqrv] [-P pattern] off len [len..]"),
        oneline: "reads a number of bytes at a specified offset",
        help: Some(HELP_READV),
        ..cmd(CmdId::Readv, "readv", None, 2, None)
    },
    CmdInfo {
        global: true,
        args: Some("signal"),
        oneline: "raises a signal",
        help: Some(HELP_SIGRAISE),
        ..cmd(CmdId::Sigraise, "sigraise", None, 1, Some(1))
    },
    CmdInfo {
        global: true,
        oneline: "waits for the given value in milliseconds",
        ..cmd(CmdId::Sleep, "sleep", None, 1, Some(1))
    },
    CmdInfo {
        writes: true,
        args: Some("[-m prealloc_mode] off"),
        oneline: "truncates the current file at the given offset",
        ..cmd(CmdId::Truncate, "truncate", Some("t"), 1, Some(3))
    },
    CmdInfo {
        writes: true,
        args: Some("[-bcCfnqruz] [-P pattern | -s source_file] off len"),
        oneline: "writes a number of bytes at a specified offset",
        help: Some(HELP_WRITE),
        ..cmd(CmdId::Write, "write", Some("w"), 2, None)
    },
    CmdInfo {
        writes: true,
        args: Some("[-Cfqr] [-P pattern] off len [len..]"),
        oneline: "writes a number of bytes at a specified offset",
        help: Some(HELP_WRITEV),
        ..cmd(CmdId::Writev, "writev", None, 2, None)
    },
];

/// The command called `name` (or by its alias).
pub(crate) fn find(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS.iter().find(|c| c.name == name || c.alt == Some(name))
}

/// qemu-io's `qemuio_command_usage`: `NAME ARGS -- ONELINE`.
pub(crate) fn usage(c: &CmdInfo) -> String {
    format!("{} {} -- {}\n", c.name, c.args.unwrap_or(""), c.oneline)
}

/// qemu-io's `help_oneline`, under the name the user typed.
pub(crate) fn oneline(name: &str, c: &CmdInfo) -> String {
    match c.args {
        Some(a) => format!("{name} {a} -- {}\n", c.oneline),
        None => format!("{name} -- {}\n", c.oneline),
    }
}

/// `help` without arguments.
pub(crate) fn help_all() -> String {
    let mut s: String = COMMANDS.iter().map(|c| oneline(c.name, c)).collect();
    s.push_str("\nUse 'help commandname' for extended help.\n");
    s
}

/// `help NAME`.
pub(crate) fn help_one(name: &str, c: &CmdInfo) -> String {
    oneline(name, c) + c.help.unwrap_or("")
}

const HELP_READ: &str = r#"
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

"#;

const HELP_WRITE: &str = r#"
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

"#;

const HELP_READV: &str = r#"
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

"#;

const HELP_WRITEV: &str = r#"
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

"#;

const HELP_AIO_READ: &str = r#"
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -i, -- treat request as invalid, for exercising stats
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

"#;

const HELP_AIO_WRITE: &str = r#"
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

"#;

const HELP_DISCARD: &str = r#"
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

"#;

const HELP_OPEN: &str = r#"
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
"#;

const HELP_SIGRAISE: &str = r#"
 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where "signal" is the mandatory integer argument
 given to sigraise.

"#;
