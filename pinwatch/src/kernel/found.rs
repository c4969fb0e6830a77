//! Pins older than pinwatch: the start-up scan. A daemon restarts (an upgrade, a crash)
//! while RDMA, VFIO or io_uring jobs have held long-term pins for days; their GUP calls
//! happened before any hook was attached. The kernel still knows those pages are pinned
//! (folio_maybe_dma_pinned), so at start every process it charges pinned (VmPin) or
//! locked (VmLck) memory is read page by page: its mappings from /proc/PID/maps, its
//! pfns from /proc/PID/pagemap, and the kernel side answers for each page whether its
//! folio is DMA-pinned, taking those into the pin map as the process's (found_pfns).
//! Each run of found pages becomes a `pin` event marked `found`, so the engine accounts
//! them and the hazard hooks watch them like any pin seen being taken.
//!
//! What the scan cannot know: which GUP function took the pin, who called it, its
//! stack, when, and its flags. Pins of a process charged VmPin are taken as long-term
//! (only long-term pinners charge it: io_uring, RDMA, VFIO); others as short-term. A
//! folio pinned twice shows once; a page mapped by several processes is attributed to
//! the first one scanned (most VmPin first). Reading pfns needs CAP_SYS_ADMIN (the
//! kernel shows 0 otherwise), and another user's pagemap CAP_SYS_PTRACE.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt as _,
    time::Instant,
};

use anyhow::Result;
use pinwatch_common::{found, FOUND_BATCH};
use procfs::process::{MMapPath, Process};

use super::{procs, stream::monotonic_ns, Kernel};
use crate::trace::{FileRef, Flag, Pin, FOUND_FUNC};

const PAGE: u64 = 4096;
/// pagemap entries read at once (64 KiB).
const PAGEMAP_CHUNK: u64 = 8192;
const PM_PRESENT: u64 = 1 << 63;
const PM_PFN_MASK: u64 = (1 << 55) - 1;

/// What the scan did, for the user and for `doctor`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ScanReport {
    /// Processes charged VmPin or VmLck, those whose pages were read, and those found
    /// holding pins.
    pub candidates: usize,
    pub scanned: usize,
    pub holders: usize,
    /// Mapped pages read from pagemap and handed to the kernel side.
    pub pages_read: u64,
    /// Pages found pinned and taken in as pins of their process.
    pub pages_found: u64,
    /// Pages found pinned that the pin map already held (a pin seen since start, or one
    /// found on another process first), and those it had no room for.
    pub pages_known: u64,
    pub pages_untracked: u64,
    pub millis: u64,
    /// Why a process or the whole scan was skipped.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
}

impl ScanReport {
    /// One line for stderr.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "start-up scan: {} page(s) pinned before pinwatch started, held by {} process(es); {} of {} process(es) charged VmPin or VmLck read ({} page(s) in {} ms)",
            self.pages_found,
            self.holders,
            self.scanned,
            self.candidates,
            self.pages_read,
            self.millis
        );
        if self.pages_untracked > 0 {
            s.push_str(&format!("; {} pinned page(s) not tracked: the pin map is full", self.pages_untracked));
        }
        if let Some(first) = self.skipped.first() {
            s.push_str(&format!("; skipped: {first}"));
            if self.skipped.len() > 1 {
                s.push_str(&format!(" (and {} more)", self.skipped.len() - 1));
            }
        }
        s
    }
}

/// One process to scan.
struct Candidate {
    pid: u32,
    comm: String,
    uid: u32,
    cgroup_id: u64,
    longterm: bool,
}

/// Scans every process charged VmPin or VmLck but pinwatch itself; returns the found
/// pins as events (not yet applied) and what the scan did.
pub fn scan(kernel: &mut Kernel) -> Result<(Vec<Pin>, ScanReport)> {
    let t0 = Instant::now();
    let mut report = ScanReport::default();
    let own = std::process::id();
    let mut charged: Vec<(u32, procs::ProcInfo)> = procs::snapshot(&Default::default(), true).into_iter().filter(|(pid, _)| *pid != own).collect();
    // Most VmPin first: a page two processes map goes to its likelier pinner.
    charged.sort_by_key(|(pid, i)| (std::cmp::Reverse(i.kernel.vmpin_bytes), *pid));
    report.candidates = charged.len();
    let mut pins = Vec::new();
    if charged.is_empty() {
        return Ok((pins, report));
    }
    kernel.finder()?;
    let foll = kernel.layouts.foll;
    let root = procs::cgroup2_root();
    for (pid, info) in charged {
        let cgroup_id = procs::identity(pid).1.and_then(|p| cgroup_inode(&root, &p)).unwrap_or(0);
        let c = Candidate { pid, comm: info.comm, uid: info.uid, cgroup_id, longterm: info.kernel.vmpin_bytes > 0 };
        let gup_flags = foll.pin | if c.longterm { foll.longterm } else { 0 };
        let before = report.pages_found;
        match scan_process(kernel, &c, gup_flags, &mut report, &mut pins) {
            Ok(()) => {
                report.scanned += 1;
                report.holders += (report.pages_found > before) as usize;
            }
            Err(Skip::Process(why)) => report.skipped.push(format!("pid {pid} ({}): {why}", c.comm)),
            Err(Skip::All(why)) => {
                report.skipped.push(why);
                break;
            }
        }
    }
    report.millis = t0.elapsed().as_millis() as u64;
    Ok((pins, report))
}

enum Skip {
    /// This process only (it ended, its pagemap is not ours to read).
    Process(String),
    /// Every process: pfns are hidden from this pinwatch, or the kernel side failed.
    All(String),
}

/// The cgroup id bpf_get_current_cgroup_id would give: the inode of its directory.
fn cgroup_inode(root: &std::path::Path, path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(root.join(path.trim_start_matches('/'))).ok().map(|m| m.ino())
}

fn scan_process(kernel: &mut Kernel, c: &Candidate, gup_flags: u32, report: &mut ScanReport, pins: &mut Vec<Pin>) -> Result<(), Skip> {
    let proc_ = Process::new(c.pid as i32).map_err(|e| Skip::Process(e.to_string()))?;
    let maps = proc_.maps().map_err(|e| Skip::Process(format!("reading its maps: {e}")))?;
    let pagemap = File::open(format!("/proc/{}/pagemap", c.pid)).map_err(|e| Skip::Process(format!("opening its pagemap: {e}")))?;
    // Filesystem types by "major:minor", from the process's own mount namespace.
    let fs_by_dev: HashMap<String, String> =
        proc_.mountinfo().map(|m| m.into_iter().map(|i| (i.majmin, i.fs_type)).collect()).unwrap_or_default();
    let ts_ns = monotonic_ns();
    let mut entries = vec![0u8; (PAGEMAP_CHUNK * 8) as usize];
    for m in maps.iter() {
        if matches!(m.pathname, MMapPath::Vsyscall) {
            continue;
        }
        let file = match &m.pathname {
            MMapPath::Path(p) if m.inode != 0 => Some(p.display().to_string()),
            MMapPath::Other(p) if m.inode != 0 => Some(p.clone()),
            _ => None,
        };
        let dev = format!("{}:{}", m.dev.0, m.dev.1);
        let mapping_file = |memory_fs: bool| file_ref(&file, &dev, m.inode, &fs_by_dev, memory_fs);
        let mut run = Run::default();
        let mut addr = m.address.0;
        while addr < m.address.1 {
            let n = ((m.address.1 - addr) / PAGE).min(PAGEMAP_CHUNK);
            let bytes = &mut entries[..(n * 8) as usize];
            if let Err(e) = pagemap.read_exact_at(bytes, addr / PAGE * 8) {
                return Err(Skip::Process(format!("reading its pagemap at {addr:#x}: {e}")));
            }
            let mut present: Vec<(u64, u64)> = Vec::new();
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
                if e & PM_PRESENT == 0 {
                    continue;
                }
                let pfn = e & PM_PFN_MASK;
                if pfn == 0 {
                    return Err(Skip::All(
                        "the kernel hides pfns from /proc/PID/pagemap without CAP_SYS_ADMIN: pins taken before pinwatch started cannot be found".into(),
                    ));
                }
                present.push((addr + i as u64 * PAGE, pfn));
            }
            for batch in present.chunks(FOUND_BATCH) {
                let pfns: Vec<u64> = batch.iter().map(|(_, p)| *p).collect();
                let answers = kernel.find_pins(c.pid, gup_flags, ts_ns, &pfns).map_err(|e| Skip::All(format!("{e:#}")))?;
                report.pages_read += batch.len() as u64;
                for ((vaddr, _), a) in batch.iter().zip(answers) {
                    if a & found::ADOPTED != 0 {
                        report.pages_found += 1;
                        let is_file = a & found::FILE != 0;
                        if !run.extends(*vaddr, is_file) {
                            run.close(c, gup_flags, ts_ns, mapping_file(run.memory_fs), pins);
                            run = Run { start: *vaddr, file: is_file, memory_fs: a & found::MEMORY_FS != 0, ..Default::default() };
                        }
                        run.pfns.push(a & found::PFN_MASK);
                        run.orders.push(((a >> found::ORDER_SHIFT) & 63) as u8);
                    } else if a & found::KNOWN != 0 {
                        report.pages_known += 1;
                    } else if a & found::FULL != 0 {
                        report.pages_untracked += 1;
                    }
                }
            }
            addr += n * PAGE;
        }
        run.close(c, gup_flags, ts_ns, mapping_file(run.memory_fs), pins);
    }
    Ok(())
}

/// The mapping's file, for a run of page-cache pages; None for anonymous memory.
fn file_ref(path: &Option<String>, dev: &str, ino: u64, fs_by_dev: &HashMap<String, String>, memory_fs: bool) -> Option<FileRef> {
    let path = path.as_ref()?;
    // shmem's internal mount (memfd, SysV shm, shared anonymous) is in no mountinfo.
    let fs = fs_by_dev.get(dev).cloned().unwrap_or_else(|| if memory_fs { "tmpfs".into() } else { String::new() });
    Some(FileRef { dev: dev.to_string(), ino, index: None, fs, path: Some(path.clone()) })
}

/// Found pages at consecutive addresses of one mapping, all page cache or none: one
/// `pin` event (a pin's pages are at start + i * 4096).
#[derive(Default)]
struct Run {
    start: u64,
    file: bool,
    memory_fs: bool,
    pfns: Vec<u64>,
    orders: Vec<u8>,
}

impl Run {
    fn extends(&self, vaddr: u64, file: bool) -> bool {
        !self.pfns.is_empty() && self.file == file && vaddr == self.start + self.pfns.len() as u64 * PAGE
    }

    fn close(&mut self, c: &Candidate, gup_flags: u32, ts_ns: u64, file: Option<FileRef>, pins: &mut Vec<Pin>) {
        if self.pfns.is_empty() {
            return;
        }
        let n = self.pfns.len() as u64;
        let orders = std::mem::take(&mut self.orders);
        let mut flags = vec![Flag::Pin];
        if c.longterm {
            flags.push(Flag::Longterm);
        }
        pins.push(Pin {
            ts_ns,
            pid: c.pid,
            tid: c.pid,
            comm: c.comm.clone(),
            uid: c.uid,
            cgroup_id: c.cgroup_id,
            func: FOUND_FUNC.into(),
            flags,
            gup_flags,
            nr_pages: n,
            nr_requested: n,
            start: self.start,
            end: self.start + n * PAGE,
            pfns: std::mem::take(&mut self.pfns),
            // Listed only when a folio is large, as the kernel side's pins are.
            orders: if orders.iter().any(|o| *o != 0) { orders } else { Vec::new() },
            file_pages: if self.file { n } else { 0 },
            file: if self.file { file } else { None },
            found: true,
            ..Default::default()
        });
    }
}
