//! The trace format: one JSON object per line, tagged by "event". The same types are
//! what the engine consumes, whether they come from the kernel or from a file, so a
//! recorded trace replays exactly like a live run. Field names are a contract.

use std::io::{BufRead, Write};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flag {
    /// FOLL_PIN: pin_user_pages*() and friends.
    #[serde(rename = "PIN")]
    Pin,
    /// FOLL_GET: a plain page reference (get_user_pages*()).
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "LONGTERM")]
    Longterm,
    #[serde(rename = "WRITE")]
    Write,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start(Start),
    Pin(Pin),
    Unpin(Unpin),
    Page(Page),
    Hazard(Hazard),
    Lost(Lost),
    Stop(Stop),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Start {
    pub version: String,
    pub kernel: String,
    /// role -> "symbol via attach type" for every hook that is attached.
    pub hooks: Vec<String>,
    /// "full", or "tracepoint_only" where GUP calls cannot be seen.
    #[serde(default)]
    pub mode: String,
    /// Hazard roles no hook serves on this kernel: what this trace cannot show.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blind: Vec<String>,
}

/// The file a page-cache page belongs to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct FileRef {
    /// "major:minor" of the filesystem's device (super_block->s_dev).
    pub dev: String,
    pub ino: u64,
    /// Page index in the file (hazards only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// The filesystem type, from its magic number where pinwatch knows it.
    pub fs: String,
}

impl FileRef {
    /// shmem/tmpfs, hugetlbfs: page cache with no writeback behind it.
    pub fn is_memory_fs(&self) -> bool {
        matches!(self.fs.as_str(), "tmpfs" | "hugetlbfs")
    }
}

/// A GUP call that returned: what it took, or its errno.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Pin {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub func: String,
    pub flags: Vec<Flag>,
    pub gup_flags: u32,
    /// Pages taken (the call's return value), 0 when it failed.
    pub nr_pages: u64,
    pub nr_requested: u64,
    pub start: u64,
    pub end: u64,
    /// Folio head pfn of each page taken, in order.
    pub pfns: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// More pages were taken than the kernel side sends pfns for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Some chunks of this call were lost (ring buffer full).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
    /// Pages taken that belong to a file's page cache, and the first such file.
    #[serde(default)]
    pub file_pages: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRef>,
    /// Who called GUP: the first function of the kernel stack outside GUP itself
    /// (io_sqe_buffer_register, iomap_dio_bio_iter, iter_to_pipe, ib_umem_get...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub caller: String,
    /// The subsystem the whole stack points to: "direct I/O", "io_uring", "vmsplice",
    /// "RDMA", "VFIO", "GPU", "KVM", "futex", "exec", "process_vm", ... or "other".
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Return addresses from the record, symbolized by the live source.
    #[serde(skip)]
    pub kstack: Vec<u64>,
}

/// What a hazard hook was doing to a page.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum PageOp {
    Unmap,
    Mkclean,
    Writeback,
    Truncate,
    Dirty,
}

/// The task doing something to a page: kswapd, a flusher thread, the truncating
/// process; its kernel stack when it could be kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Actor {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stack: Vec<String>,
}

/// The kernel's own pin view of a folio at that moment (folio_maybe_dma_pinned).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KernelPins {
    pub refcount: i32,
    /// Large folios only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pincount: Option<i32>,
    pub maybe_dma_pinned: bool,
}

/// A hazard hook met a folio that pinwatch knows is pinned, or that the kernel counts
/// as DMA-pinned. Raw material for the engine: a replay of the trace derives the same
/// hazards from these.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Page {
    pub ts_ns: u64,
    pub op: Option<PageOp>,
    /// The kernel function or tracepoint that saw it.
    pub func: String,
    pub pfn: u64,
    pub order: u16,
    /// "pins" (pinwatch saw the pin) or "kernel_pin_count".
    pub seen: String,
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRef>,
    /// "file", "anon", "other" or "none" (removed from its mapping already).
    pub backing: String,
    pub kernel_pins: KernelPins,
    /// What the kernel side's pin map said: the latest pinner, its flags, and references
    /// by kind.
    #[serde(default)]
    pub pinner_pid: u32,
    #[serde(default)]
    pub pinner_flags: Vec<Flag>,
    #[serde(default)]
    pub pin_refs: u32,
    #[serde(default)]
    pub get_refs: u32,
    /// Return addresses from the record, symbolized by the live source.
    #[serde(skip)]
    pub kstack: Vec<u64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum HazardKind {
    UnmapWhilePinned,
    MkcleanWhilePinned,
    WritebackWhilePinned,
    TruncateWhilePinned,
    DirtyAfterUnmap,
    LongtermFilePin,
    LongtermPinRefused,
    /// A limit rule (RLIMIT_MEMLOCK, a cap in bytes) broken by long-term pins.
    PinLimitExceeded,
    /// A pin held longer than --max-pin-age.
    LongHeldPin,
}

impl HazardKind {
    pub fn name(self) -> &'static str {
        match self {
            HazardKind::UnmapWhilePinned => "unmap_while_pinned",
            HazardKind::MkcleanWhilePinned => "mkclean_while_pinned",
            HazardKind::WritebackWhilePinned => "writeback_while_pinned",
            HazardKind::TruncateWhilePinned => "truncate_while_pinned",
            HazardKind::DirtyAfterUnmap => "dirty_after_unmap",
            HazardKind::LongtermFilePin => "longterm_file_pin",
            HazardKind::LongtermPinRefused => "longterm_pin_refused",
            HazardKind::PinLimitExceeded => "pin_limit_exceeded",
            HazardKind::LongHeldPin => "long_held_pin",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// Who holds the pin a hazard collides with. Fields are null when only the kernel's
/// pin count knows of it (tracepoint-only mode, or a pin older than the recording).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Pinner {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub func: Option<String>,
    pub flags: Vec<Flag>,
    pub age_ns: Option<u64>,
    /// The subsystem that took the pin (see Pin::path); null when unknown.
    #[serde(default)]
    pub path: Option<String>,
}

/// One pinner, or several when several pins collide.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum Pinners {
    One(Pinner),
    Many(Vec<Pinner>),
}

impl Pinners {
    pub fn from_vec(mut v: Vec<Pinner>) -> Pinners {
        if v.len() == 1 { Pinners::One(v.remove(0)) } else { Pinners::Many(v) }
    }

    #[cfg(test)]
    pub fn list(&self) -> Vec<&Pinner> {
        match self {
            Pinners::One(p) => vec![p],
            Pinners::Many(v) => v.iter().collect(),
        }
    }
}

impl Hazard {
    /// "pid comm" of the pinner(s), "?" where only the kernel's count knows of a pin.
    pub fn pinner_summary(&self) -> String {
        let one = |p: &Pinner| match (p.pid, &p.comm) {
            (Some(pid), Some(c)) => match p.path.as_deref() {
                Some(path) => format!("{pid} {c} ({path})"),
                None => format!("{pid} {c}"),
            },
            (Some(pid), None) => pid.to_string(),
            _ => "? (kernel pin count)".to_string(),
        };
        match &self.pinner {
            Pinners::One(p) => one(p),
            Pinners::Many(v) => v.iter().map(one).collect::<Vec<_>>().join(", "),
        }
    }
}

/// The kernel treated a pinned page as an ordinary one (or refused a long-term pin).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Hazard {
    pub ts_ns: u64,
    pub kind: HazardKind,
    pub severity: Severity,
    /// The folio head pfn (null for a refused pin: no page was taken).
    pub pfn: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u16>,
    pub pinner: Pinners,
    pub actor: Actor,
    pub file: Option<FileRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_pins: Option<KernelPins>,
    /// The kernel function that did it.
    pub func: String,
    /// For pin_limit_exceeded and long_held_pin: the rule and the figures that broke it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<LimitBreach>,
    /// Pages concerned, where a hazard covers several (long_held_pin: the call's pages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
}

/// A limit rule broken: `value` went past `limit` for the process, cgroup or user `id`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LimitBreach {
    /// "rlimit_memlock", "max_longterm_bytes" or "max_pin_age_ns".
    pub rule: String,
    /// "process", "cgroup" or "user".
    pub scope: String,
    pub id: u64,
    pub value: u64,
    pub limit: u64,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    /// A FOLL_PIN reference dropped by the unpin family.
    Unpin,
    /// A FOLL_GET reference dropped where pinwatch can see it (bio, pipe buffer).
    Put,
    /// The page was freed: no reference of any kind is left.
    Freed,
    /// A hazard hook found the kernel's counts too low for the references pinwatch
    /// thought held: their release went unseen (an inline put_page, say).
    Gone,
}

/// References dropped on pages pinwatch saw being taken. `pid` is the task that ran the
/// release, which for I/O completions can be any task: match pins by pfn, not pid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Unpin {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub func: String,
    pub release: Release,
    pub dirty: bool,
    pub pfns: Vec<u64>,
}

/// Records the kernel side could not deliver or keep.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Lost {
    pub ts_ns: u64,
    pub count: u64,
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Stop {
    pub ts_ns: u64,
    pub lost_total: u64,
    /// Pins still held when recording stopped, per process.
    pub held: Vec<Held>,
    /// Hazards reported, by kind.
    #[serde(default)]
    pub hazards: std::collections::BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Held {
    pub pid: u32,
    pub comm: String,
    pub pages: u64,
}

/// A trace file made for writing: owner-only (0600), never through a symbolic link,
/// never over an existing file unless `force`; checked for free space before anything
/// is attached, so that a bad path fails at once and names itself.
pub struct NewFile {
    file: std::fs::File,
    path: std::path::PathBuf,
}

/// Less free space than this on the trace's filesystem is refused at start.
const MIN_FREE_BYTES: u64 = 1 << 20;

pub fn create(path: &std::path::Path, force: bool) -> Result<NewFile> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let shown = path.display();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        anyhow::bail!("cannot write {shown}: the directory {} does not exist", dir.display());
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            anyhow::bail!("{shown} is a symbolic link: pinwatch does not write traces through links");
        }
        if !force {
            anyhow::bail!("{shown} exists: pass --force to replace it, or choose another name");
        }
        if !meta.is_file() {
            anyhow::bail!("{shown} exists and is not a regular file");
        }
    }
    let mut open = std::fs::OpenOptions::new();
    open.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if force {
        open.create(true).truncate(true);
    } else {
        open.create_new(true);
    }
    let file = open.open(path).with_context(|| format!("creating {shown}"))?;
    let new = NewFile { file, path: path.to_path_buf() };
    // A replaced file keeps its old mode: make it the owner's alone.
    new.file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600)).with_context(|| format!("making {shown} owner-only"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatvfs fills `st` for an open fd.
    if unsafe { libc::fstatvfs(std::os::fd::AsRawFd::as_raw_fd(&new.file), &mut st) } == 0 {
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        if free < MIN_FREE_BYTES {
            new.discard();
            anyhow::bail!("no space to write {shown}: {free} bytes free on its filesystem");
        }
    }
    Ok(new)
}

impl NewFile {
    pub fn writer(self) -> std::io::BufWriter<std::fs::File> {
        std::io::BufWriter::new(self.file)
    }

    /// Removes the file: the run that was to fill it never started.
    pub fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer { out }
    }

    pub fn write(&mut self, event: &Event) -> Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

/// Reads a trace (for replaying a recording through the engine). A malformed line is an error naming its line number; a last line cut
/// short (a crash mid-write) is reported as such, and everything before it is kept.
pub fn read_trace(input: impl BufRead) -> Result<(Vec<Event>, Option<String>)> {
    let mut events = Vec::new();
    let lines: Vec<String> = input.lines().collect::<std::io::Result<_>>().context("reading trace")?;
    let last = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(line) {
            Ok(e) => events.push(e),
            Err(err) if i + 1 == last && err.is_eof() => {
                return Ok((events, Some(format!("line {} is truncated: {err}", i + 1))));
            }
            Err(err) => anyhow::bail!("line {} is not a pinwatch trace event: {err}", i + 1),
        }
    }
    Ok((events, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_line_has_contract_fields() {
        let e = Event::Pin(Pin {
            pid: 7,
            func: "pin_user_pages_fast".into(),
            flags: vec![Flag::Pin, Flag::Write],
            nr_pages: 2,
            pfns: vec![10, 11],
            ..Default::default()
        });
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "pin");
        assert_eq!(v["pid"], 7);
        assert_eq!(v["flags"], serde_json::json!(["PIN", "WRITE"]));
        assert_eq!(v["pfns"], serde_json::json!([10, 11]));
        assert_eq!(v["nr_pages"], 2);
        for k in ["ts_ns", "tid", "comm", "func"] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn trace_files_are_private_and_never_clobbered() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("pinwatch-create-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        create(&path, false).unwrap().writer();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let err = create(&path, false).err().expect("an existing file is refused").to_string();
        assert!(err.contains("--force"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        create(&path, true).unwrap().writer();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "a replaced file is made owner-only");
        let link = dir.join("link.jsonl");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        for force in [false, true] {
            let err = create(&link, force).err().expect("a link is refused").to_string();
            assert!(err.contains("symbolic link"), "{err}");
        }
        let err = create(&dir.join("missing/t.jsonl"), false).err().expect("a missing directory is refused").to_string();
        assert!(err.contains("missing") && err.contains("does not exist"), "{err}");
        let new = create(&dir.join("gone.jsonl"), false).unwrap();
        new.discard();
        assert!(!dir.join("gone.jsonl").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_last_line_keeps_the_rest() {
        let good = serde_json::to_string(&Event::Lost(Lost { ts_ns: 1, count: 3, reason: "x".into() })).unwrap();
        let text = format!("{good}\n{}", &good[..good.len() / 2]);
        let (events, warn) = read_trace(text.as_bytes()).unwrap();
        assert_eq!(events.len(), 1);
        assert!(warn.unwrap().contains("line 2"));
    }

    #[test]
    fn malformed_middle_line_is_an_error_with_its_number() {
        let good = serde_json::to_string(&Event::Lost(Lost { ts_ns: 1, count: 3, reason: "x".into() })).unwrap();
        let text = format!("{good}\n{{\"event\":\"nope\"}}\n{good}\n");
        let err = read_trace(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
