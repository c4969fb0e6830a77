//! The trace format: one JSON object per line, tagged by "event". The same types are
//! what the engine consumes, whether they come from the kernel or from a file, so a
//! recorded trace replays exactly like a live run. Field names are a contract; `read`
//! and `write` are its streaming reader and writer.

mod quick;
mod read;
mod write;

pub use read::open;
pub use write::{create, Writer};

use anyhow::Result;
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
    /// The kernel's own figures the limit rules read, at each tick.
    Procs(Procs),
    Stop(Stop),
}

impl Event {
    /// One trace line. Pins and releases, most of any trace, are read by hand
    /// ([`quick`]), or failing that straight into their struct: serde reads an
    /// internally tagged enum by buffering every field first, which made the replay half
    /// as fast. Anything else, or a line both fast ways refuse, goes the general way (and
    /// its error is the general one).
    pub fn from_json(text: &[u8]) -> serde_json::Result<Event> {
        const TAG: &[u8] = b"\"event\":\"";
        let kind = memchr::memmem::find(text, TAG).map(|i| &text[i + TAG.len()..]);
        match kind {
            Some(k) if k.starts_with(b"pin\"") => {
                if let Some(p) = quick::pin(text) {
                    return Ok(Event::Pin(p));
                }
                if let Ok(p) = serde_json::from_slice::<Pin>(text) {
                    return Ok(Event::Pin(p));
                }
            }
            Some(k) if k.starts_with(b"unpin\"") => {
                if let Some(u) = quick::unpin(text) {
                    return Ok(Event::Unpin(u));
                }
                if let Ok(u) = serde_json::from_slice::<Unpin>(text) {
                    return Ok(Event::Unpin(u));
                }
            }
            _ => {}
        }
        serde_json::from_slice::<Event>(text)
    }

    /// When it happened (CLOCK_MONOTONIC), for the events that say.
    pub fn ts_ns(&self) -> Option<u64> {
        match self {
            Event::Start(_) => None,
            Event::Pin(e) => Some(e.ts_ns),
            Event::Unpin(e) => Some(e.ts_ns),
            Event::Page(e) => Some(e.ts_ns),
            Event::Hazard(e) => Some(e.ts_ns),
            Event::Lost(e) => Some(e.ts_ns),
            Event::Procs(e) => Some(e.ts_ns),
            Event::Stop(e) => Some(e.ts_ns),
        }
    }
}

/// The trace format this pinwatch writes, "major.minor". A reader refuses a newer major
/// (fields it cannot understand); a newer minor only adds fields it may ignore. Traces
/// without one are 1.0 (pinwatch before limits were recorded).
pub const FORMAT: &str = "2.1";
pub const FORMAT_MAJOR: u32 = 2;

/// The limit rules a recording ran with: in the `start` event, so that a replay applies
/// the same rules to the same figures.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct LimitRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pin_age_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_longterm_process: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_longterm_cgroup: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_longterm_user: Option<u64>,
    /// Long-term pins compared with each process's RLIMIT_MEMLOCK.
    pub memlock: bool,
}

impl LimitRules {
    /// The rules from what people set: a duration and sizes, as options or in the daemon's
    /// configuration say them.
    pub fn new(max_pin_age: Option<std::time::Duration>, process: Option<u64>, cgroup: Option<u64>, user: Option<u64>, memlock: bool) -> LimitRules {
        LimitRules {
            max_pin_age_ns: max_pin_age.map(|d| d.as_nanos().min(u64::MAX as u128) as u64),
            max_longterm_process: process,
            max_longterm_cgroup: cgroup,
            max_longterm_user: user,
            memlock,
        }
    }
}

/// What /proc said of the processes the limit rules look at, at `ts_ns`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Procs {
    pub ts_ns: u64,
    pub procs: Vec<ProcFigures>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ProcFigures {
    pub pid: u32,
    #[serde(flatten)]
    pub kernel: KernelProc,
}

/// What the kernel itself says of a process (from /proc): what the limit rules read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelProc {
    pub vmpin_bytes: u64,
    pub vmlck_bytes: u64,
    /// RLIMIT_MEMLOCK's soft limit; null: unlimited.
    pub memlock_limit_bytes: Option<u64>,
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
    /// The trace format ("2.0"); absent in 1.0 traces.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub format: String,
    /// The limit rules in force; absent in 1.0 traces, whose limits cannot be replayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitRules>,
    /// Folios the kernel-side pin map held: pins past it were counted, not watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_map_capacity: Option<u32>,
    /// Blocks of 32 small folios the kernel-side long-term pin map held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_block_capacity: Option<u32>,
}

impl Start {
    /// Refuses a trace whose major format is newer than this pinwatch reads.
    pub fn check_format(&self) -> Result<()> {
        let major: u32 = self.format.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(1);
        if major > FORMAT_MAJOR {
            anyhow::bail!(
                "this trace is format {} (written by pinwatch {}), newer than the format {FORMAT} this pinwatch reads: use a newer pinwatch",
                self.format,
                self.version
            );
        }
        Ok(())
    }
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
    /// The file's path, from the pinner's mappings while it was alive (pins only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl FileRef {
    /// shmem/tmpfs, hugetlbfs: page cache with no writeback behind it.
    pub fn is_memory_fs(&self) -> bool {
        matches!(self.fs.as_str(), "tmpfs" | "hugetlbfs")
    }
}

/// The `func` of a pin found by the start-up scan, whose entry point is unknown.
pub const FOUND_FUNC: &str = "found at start";

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
    /// The order of each page's folio, beside `pfns`; absent when every folio is a
    /// single page. A pin holds its whole folio in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub orders: Vec<u8>,
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
    /// This long-term call took its process over the cap `pinwatch alert` enforces in
    /// the kernel: what happened to the signal (README: "Enforcement").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<SignalResult>,
    /// Not a call pinwatch saw: pages of this process that the kernel already counted
    /// as DMA-pinned when pinwatch started (the start-up scan). Their function
    /// ([`FOUND_FUNC`] stands in), caller and stack are unknown, and `ts_ns` is when
    /// they were found.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub found: bool,
    /// Return addresses from the record, symbolized by the live source.
    #[serde(skip)]
    pub kstack: Vec<u64>,
}

/// What the GUP return program did when a call went over the enforced cap.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SignalResult {
    /// bpf_send_signal accepted it: the process gets it before the call returns.
    Sent,
    /// The kernel refused (a kernel thread, an exiting task, init).
    Refused,
    /// The process is exempt (uid, cgroup or comm).
    Exempt,
}

impl SignalResult {
    pub fn name(self) -> &'static str {
        match self {
            SignalResult::Sent => "sent",
            SignalResult::Refused => "refused",
            SignalResult::Exempt => "exempt",
        }
    }
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
    pub const ALL: [HazardKind; 9] = [
        HazardKind::UnmapWhilePinned,
        HazardKind::MkcleanWhilePinned,
        HazardKind::WritebackWhilePinned,
        HazardKind::TruncateWhilePinned,
        HazardKind::DirtyAfterUnmap,
        HazardKind::LongtermFilePin,
        HazardKind::LongtermPinRefused,
        HazardKind::PinLimitExceeded,
        HazardKind::LongHeldPin,
    ];

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

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
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

    pub fn list(&self) -> Vec<&Pinner> {
        match self {
            Pinners::One(p) => vec![p],
            Pinners::Many(v) => v.iter().collect(),
        }
    }
}

impl Hazard {
    pub fn pinner_list(&self) -> Vec<&Pinner> {
        self.pinner.list()
    }

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
    fn the_fast_way_reads_what_the_general_way_reads() {
        let pin = Event::Pin(Pin { pid: 7, comm: "a\"event\":\"unpin\"".into(), pfns: vec![1], ..Default::default() });
        let unpin = Event::Unpin(Unpin { ts_ns: 3, pid: 8, tid: 9, comm: "fio".into(), func: "f".into(), release: Release::Put, dirty: true, pfns: vec![1, 2] });
        let lost = Event::Lost(Lost { ts_ns: 1, count: 2, reason: "ringbuf_full".into() });
        for e in [pin, unpin, lost] {
            let line = serde_json::to_vec(&e).unwrap();
            assert_eq!(Event::from_json(&line).unwrap(), e);
            assert_eq!(serde_json::from_slice::<Event>(&line).unwrap(), e);
        }
        // a pin line missing a field fails the fast way and gives the general error
        let bad = br#"{"event":"pin","pid":1}"#;
        let (a, b) = (Event::from_json(bad).unwrap_err().to_string(), serde_json::from_slice::<Event>(bad).unwrap_err().to_string());
        assert_eq!(a, b);
    }
}
