//! Raw ring-buffer records to trace events. Pure: no kernel needed, so it is tested
//! with hand-made records. GUP calls larger than one record arrive as chunks that are
//! put back together here.

use std::collections::HashMap;

use anyhow::{bail, Result};
use pinwatch_common::{
    backing, kind, page_op, release, seen, Hook, PageRecord, PinRecord, RecordHeader, ReleaseRecord,
    MAX_CHUNKS, PFNS_PER_RECORD, PFN_MASK, PFN_ORDER_SHIFT, PIN_FIXED, RECORD_FAILED, RECORD_SIGNALED, RECORD_SIGNAL_EXEMPT, RECORD_SIGNAL_REFUSED, RECORD_TRUNCATED, RECORD_VERSION, RELEASE_FIXED,
};

use super::btf::FollFlags;
use crate::trace::{Actor, Event, FileRef, Flag, KernelPins, Page, PageOp, Pin, Release, SignalResult, Unpin};

fn read<T: Copy>(bytes: &[u8]) -> Result<T> {
    read_cut(bytes, std::mem::size_of::<T>())
}

/// A record sent cut short after `fixed` bytes at least (pin and release records end
/// after their last pfn): the rest reads as zeros, and the record's own count says how
/// many pfns are real.
fn read_cut<T: Copy>(bytes: &[u8], fixed: usize) -> Result<T> {
    let size = std::mem::size_of::<T>();
    if bytes.len() < fixed.min(size) {
        bail!("record of {} bytes is shorter than {}", bytes.len(), fixed.min(size));
    }
    // SAFETY: T is a plain #[repr(C)] record of integers, valid when zeroed; at most
    // size bytes are copied into it.
    let mut v: T = unsafe { std::mem::zeroed() };
    let n = bytes.len().min(size);
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), &mut v as *mut T as *mut u8, n) };
    Ok(v)
}

pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn hook_name(id: u16) -> String {
    Hook::from_u16(id).map(|h| h.name().to_string()).unwrap_or_else(|| format!("hook#{id}"))
}

pub fn decode_flags(hook: u16, gup_flags: u32, foll: &FollFlags) -> Vec<Flag> {
    let pin = Hook::from_u16(hook).map(Hook::is_pin).unwrap_or(false) || gup_flags & foll.pin != 0;
    let mut v = vec![if pin { Flag::Pin } else { Flag::Get }];
    if gup_flags & foll.longterm != 0 {
        v.push(Flag::Longterm);
    }
    if gup_flags & foll.write != 0 {
        v.push(Flag::Write);
    }
    v
}

/// Filesystem names by super_block->s_magic (include/uapi/linux/magic.h).
pub fn fs_name(magic: u64) -> String {
    match magic {
        0xEF53 => "ext4".into(),
        0x0102_1994 => "tmpfs".into(),
        0x9584_58f6 => "hugetlbfs".into(),
        0x8584_58f6 => "ramfs".into(),
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        0x6969 => "nfs".into(),
        0x794c_7630 => "overlay".into(),
        0x6462_6720 => "debugfs".into(),
        m => format!("magic {m:#x}"),
    }
}

/// A kernel FileRef; None when it names no file.
fn file_ref(f: &pinwatch_common::FileRef, index: Option<u64>) -> Option<FileRef> {
    if f.ino == 0 && f.dev == 0 {
        return None;
    }
    Some(FileRef { dev: format!("{}:{}", f.dev >> 20, f.dev & 0xfffff), ino: f.ino, index, fs: fs_name(f.fs_magic), path: None })
}

/// Puts chunked records back together into events.
pub struct Decoder {
    foll: FollFlags,
    /// Pin calls with chunks still to come, by call id.
    partial: HashMap<u64, (Pin, usize)>,
}

/// Calls waiting for chunks at most: past this (chunks lost, or records that are not
/// what they claim) the oldest is given up as incomplete, so memory stays bounded.
const MAX_PARTIAL: usize = 4096;

impl Decoder {
    pub fn new(foll: FollFlags) -> Self {
        Decoder { foll, partial: HashMap::new() }
    }

    /// One ring-buffer record in; zero or more finished events out.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Event>> {
        let h: RecordHeader = read(bytes)?;
        if h.version != RECORD_VERSION {
            bail!("record version {} but this pinwatch reads {RECORD_VERSION}: kernel programs and user space are from different builds", h.version);
        }
        match h.kind {
            kind::PIN => {
                let r: PinRecord = read_cut(bytes, PIN_FIXED)?;
                if bytes.len() < r.sent_len() {
                    bail!("record of {} bytes counts {} stack words and {} pfns, which take {}", bytes.len(), r.stack_words(), r.nr_pfns, r.sent_len());
                }
                self.pin(r)
            }
            kind::RELEASE => {
                let r: ReleaseRecord = read_cut(bytes, RELEASE_FIXED)?;
                check_cut(bytes, RELEASE_FIXED, r.nr_pfns)?;
                Ok(Some(release_event(&r)))
            }
            kind::PAGE => Ok(Some(page_event(&read(bytes)?, &self.foll))),
            k => bail!("unknown record kind {k}"),
        }
    }

    fn pin(&mut self, r: PinRecord) -> Result<Option<Event>> {
        let signal_result = |flags: u16| {
            if flags & RECORD_SIGNALED != 0 {
                Some(SignalResult::Sent)
            } else if flags & RECORD_SIGNAL_REFUSED != 0 {
                Some(SignalResult::Refused)
            } else if flags & RECORD_SIGNAL_EXEMPT != 0 {
                Some(SignalResult::Exempt)
            } else {
                None
            }
        };
        let h = &r.header;
        let pfns: Vec<(u64, u8)> = r.pfns().iter().copied().filter(|p| *p != u64::MAX).map(|p| (p & PFN_MASK, ((p >> PFN_ORDER_SHIFT) & 63) as u8)).collect();
        let failed = h.flags & RECORD_FAILED != 0;
        let taken = if r.ret > 0 { r.ret as u64 } else { 0 };
        let chunks = (taken as usize).div_ceil(PFNS_PER_RECORD).clamp(1, MAX_CHUNKS);
        let entry = self.partial.entry(r.call_id).or_insert_with(|| {
            (
                Pin {
                    ts_ns: h.ts_ns,
                    pid: h.tgid,
                    tid: h.tid,
                    comm: comm(&h.comm),
                    uid: h.uid,
                    cgroup_id: h.cgroup_id,
                    func: hook_name(h.hook),
                    flags: decode_flags(h.hook, r.gup_flags, &self.foll),
                    gup_flags: r.gup_flags,
                    nr_pages: taken,
                    nr_requested: r.nr_requested,
                    start: r.start,
                    end: r.start.saturating_add(taken.saturating_mul(4096)),
                    pfns: Vec::with_capacity(taken.min(512) as usize),
                    orders: Vec::new(),
                    errno: failed.then_some(r.ret.saturating_neg().clamp(0, i32::MAX as i64) as i32),
                    truncated: h.flags & RECORD_TRUNCATED != 0,
                    incomplete: false,
                    file_pages: 0,
                    file: None,
                    caller: String::new(),
                    path: String::new(),
                    signal: signal_result(h.flags),
                    found: false,
                    kstack: r.stack().unwrap_or_default().to_vec(),
                },
                0,
            )
        });
        let pin = &mut entry.0;
        if !pin.orders.is_empty() || pfns.iter().any(|(_, o)| *o != 0) {
            // Orders are listed beside every pfn once any folio is large.
            pin.orders.resize(pin.pfns.len(), 0);
            pin.orders.extend(pfns.iter().map(|(_, o)| *o));
        }
        pin.pfns.extend(pfns.iter().map(|(p, _)| *p));
        entry.0.file_pages = entry.0.file_pages.saturating_add(r.file_pages as u64);
        if entry.0.file.is_none() {
            entry.0.file = file_ref(&r.file, None);
        }
        entry.1 += 1;
        if entry.1 >= chunks {
            let (pin, _) = self.partial.remove(&r.call_id).expect("entry just used");
            return Ok(Some(Event::Pin(pin)));
        }
        if self.partial.len() > MAX_PARTIAL {
            let oldest = self.partial.iter().min_by_key(|(_, (p, _))| p.ts_ns).map(|(id, _)| *id);
            if let Some((mut pin, _)) = oldest.and_then(|id| self.partial.remove(&id)) {
                pin.incomplete = true;
                return Ok(Some(Event::Pin(pin)));
            }
        }
        Ok(None)
    }

    /// Calls whose remaining chunks never came (lost records): emitted as incomplete.
    pub fn flush(&mut self) -> Vec<Event> {
        let mut out: Vec<Pin> = self.partial.drain().map(|(_, (mut p, _))| {
            p.incomplete = true;
            p
        }).collect();
        out.sort_by_key(|p| p.ts_ns);
        out.into_iter().map(Event::Pin).collect()
    }
}

/// A cut record must still hold every pfn it counts.
fn check_cut(bytes: &[u8], fixed: usize, nr_pfns: u16) -> Result<()> {
    let need = fixed + (nr_pfns as usize).min(PFNS_PER_RECORD) * 8;
    if bytes.len() < need {
        bail!("record of {} bytes counts {nr_pfns} pfns, which take {need}", bytes.len());
    }
    Ok(())
}

fn release_event(r: &ReleaseRecord) -> Event {
    let h = &r.header;
    let n = (r.nr_pfns as usize).min(PFNS_PER_RECORD);
    Event::Unpin(Unpin {
        ts_ns: h.ts_ns,
        pid: h.tgid,
        tid: h.tid,
        comm: comm(&h.comm),
        func: hook_name(h.hook),
        release: match r.release {
            release::UNPIN => Release::Unpin,
            release::PUT => Release::Put,
            release::GONE => Release::Gone,
            _ => Release::Freed,
        },
        dirty: r.dirty != 0,
        // A release of many references on one folio comes as its pfn and a count; the
        // trace lists a pfn once per reference, as for pins. A free or a `gone` drops
        // every reference whatever the count.
        pfns: r.pfns[..n]
            .iter()
            .copied()
            .filter(|p| *p != u64::MAX)
            .flat_map(|p| std::iter::repeat_n(p, (r.refs_each as usize).clamp(1, MAX_REFS_EACH)))
            .collect(),
    })
}

/// References one release record may name per pfn: a folio's pages at most (1 GiB of
/// 4 KiB pages); a larger count from the kernel side would be a bug, not a release.
const MAX_REFS_EACH: usize = 1 << 18;

fn page_event(r: &PageRecord, foll: &FollFlags) -> Event {
    let h = &r.header;
    let op = match r.op {
        page_op::UNMAP => Some(PageOp::Unmap),
        page_op::MKCLEAN => Some(PageOp::Mkclean),
        page_op::WRITEBACK => Some(PageOp::Writeback),
        page_op::TRUNCATE => Some(PageOp::Truncate),
        page_op::DIRTY => Some(PageOp::Dirty),
        _ => None,
    };
    let kernel_pins = KernelPins {
        refcount: r.refcount,
        pincount: (r.pincount >= 0).then_some(r.pincount),
        maybe_dma_pinned: if r.pincount >= 0 { r.pincount > 0 } else { r.refcount >= pinwatch_common::GUP_PIN_COUNTING_BIAS },
    };
    Event::Page(Page {
        ts_ns: h.ts_ns,
        op,
        func: hook_name(h.hook),
        pfn: r.pfn,
        order: r.order,
        seen: if r.seen == seen::PINS { "pins".into() } else { "kernel_pin_count".into() },
        actor: Actor { pid: h.tgid, tid: h.tid, comm: comm(&h.comm), stack: Vec::new() },
        file: if r.backing == backing::FILE { file_ref(&r.file, Some(r.index)) } else { None },
        backing: match r.backing {
            backing::FILE => "file",
            backing::ANON => "anon",
            backing::OTHER => "other",
            _ => "none",
        }
        .into(),
        kernel_pins,
        pinner_pid: r.pinner_tgid,
        pinner_flags: if r.seen == seen::PINS {
            let hook = if r.pin_refs > 0 { Hook::PinUserPages } else { Hook::GetUserPages };
            decode_flags(hook as u16, r.gup_flags, foll)
        } else {
            Vec::new()
        },
        pin_refs: r.pin_refs,
        get_refs: r.get_refs,
        kstack: r.stack.frames().unwrap_or_default().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinwatch_common::{KernelStack, PIN_WORDS, RECORD_STACK, STACK_FRAMES, TASK_COMM_LEN};

    fn header(kind: u16, hook: Hook) -> RecordHeader {
        let mut comm = [0u8; TASK_COMM_LEN];
        comm[..4].copy_from_slice(b"fio\0");
        RecordHeader {
            version: RECORD_VERSION,
            kind,
            hook: hook as u16,
            flags: 0,
            ts_ns: 5,
            tgid: 100,
            tid: 101,
            uid: 0,
            _pad: 0,
            cgroup_id: 1,
            comm,
        }
    }

    fn stack(ips: &[u64]) -> KernelStack {
        let mut s = KernelStack { nr: ips.len() as i32, _pad: 0, ips: [0; STACK_FRAMES] };
        s.ips[..ips.len()].copy_from_slice(ips);
        s
    }

    fn bytes<T>(v: &T) -> Vec<u8> {
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }.to_vec()
    }

    fn pin_record(chunk: u16, nr: u16, ret: i64, first_pfn: u64) -> PinRecord {
        let mut words = [0u64; PIN_WORDS];
        for (i, p) in words.iter_mut().take(PFNS_PER_RECORD).enumerate() {
            *p = first_pfn + i as u64;
        }
        PinRecord {
            header: header(kind::PIN, Hook::PinUserPagesFast),
            gup_flags: FollFlags::BEFORE_6_3.longterm | FollFlags::BEFORE_6_3.write,
            chunk,
            nr_pfns: nr,
            ret,
            start: 0x7000_0000,
            nr_requested: ret.max(0) as u64,
            call_id: 42,
            file_pages: 0,
            _pad: [0; 3],
            file: Default::default(),
            words,
        }
    }

    /// A first chunk as the kernel side lays it out: the stack's `nr` word and frames,
    /// then the pfns.
    fn with_stack(mut r: PinRecord, ips: &[u64]) -> PinRecord {
        let pfns = r.words;
        r.header.flags |= RECORD_STACK;
        r.words[0] = ips.len() as u64;
        r.words[1..1 + ips.len()].copy_from_slice(ips);
        r.words[1 + ips.len()..].copy_from_slice(&pfns[..PIN_WORDS - 1 - ips.len()]);
        r
    }

    #[test]
    fn page_record_decodes_with_file_and_kernel_pins() {
        let r = PageRecord {
            header: header(kind::PAGE, Hook::TryToUnmapOne),
            op: page_op::UNMAP,
            seen: seen::PINS,
            backing: backing::FILE,
            order: 0,
            pfn: 4242,
            index: 3,
            file: pinwatch_common::FileRef { dev: (254 << 20) | 1, _pad: 0, ino: 12, fs_magic: 0xEF53 },
            refcount: 1027,
            pincount: -1,
            stack: stack(&[0xffff_1000, 0xffff_2000]),
            pin_refs: 1,
            get_refs: 0,
            pinner_tgid: 100,
            gup_flags: 1,
            first_ts_ns: 1,
        };
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        let Some(Event::Page(p)) = d.push(&bytes(&r)).unwrap() else { panic!() };
        assert_eq!(p.op, Some(PageOp::Unmap));
        assert_eq!(p.func, "try_to_unmap_one");
        assert_eq!(p.file, Some(FileRef { dev: "254:1".into(), ino: 12, index: Some(3), fs: "ext4".into(), path: None }));
        assert!(p.kernel_pins.maybe_dma_pinned);
        assert_eq!(p.kernel_pins.pincount, None);
        assert_eq!(p.seen, "pins");
        assert_eq!(p.kstack, [0xffff_1000, 0xffff_2000]);
    }

    #[test]
    fn chunks_of_one_call_become_one_pin() {
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        assert!(d.push(&bytes(&pin_record(0, 64, 100, 1000))).unwrap().is_none());
        let Some(Event::Pin(p)) = d.push(&bytes(&pin_record(1, 36, 100, 2000))).unwrap() else { panic!() };
        assert_eq!(p.nr_pages, 100);
        assert_eq!(p.pfns.len(), 100);
        assert_eq!(p.pfns[64], 2000);
        assert_eq!(p.flags, vec![Flag::Pin, Flag::Longterm, Flag::Write]);
        assert_eq!(p.comm, "fio");
        assert_eq!(p.end - p.start, 100 * 4096);
        assert!(d.flush().is_empty());
    }

    /// VFIO and RDMA pin 512 pages per call: every one of them arrives (before: the
    /// records stopped at 256 and the rest stayed unwatched).
    #[test]
    fn a_call_of_512_pages_arrives_whole() {
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        for c in 0..7u16 {
            assert!(d.push(&bytes(&pin_record(c, 64, 512, 1000 * (c as u64 + 1)))).unwrap().is_none(), "chunk {c} ended the call");
        }
        let Some(Event::Pin(p)) = d.push(&bytes(&pin_record(7, 64, 512, 8000))).unwrap() else { panic!("the 8th chunk did not end the call") };
        assert_eq!((p.nr_pages, p.pfns.len(), p.truncated), (512, 512, false));
        assert_eq!((p.pfns[448], p.pfns[511]), (8000, 8063));
        assert!(MAX_CHUNKS * PFNS_PER_RECORD >= 4096);
    }

    #[test]
    fn failed_call_carries_errno_and_no_pages() {
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        let mut r = pin_record(0, 0, -14, 0);
        r.header.flags = RECORD_FAILED;
        let Some(Event::Pin(p)) = d.push(&bytes(&r)).unwrap() else { panic!() };
        assert_eq!(p.errno, Some(14));
        assert_eq!(p.nr_pages, 0);
        assert!(p.pfns.is_empty());
    }

    #[test]
    fn lost_chunk_is_flushed_as_incomplete() {
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        assert!(d.push(&bytes(&pin_record(0, 64, 100, 1000))).unwrap().is_none());
        let out = d.flush();
        let [Event::Pin(p)] = out.as_slice() else { panic!() };
        assert!(p.incomplete);
        assert_eq!(p.pfns.len(), 64);
    }

    #[test]
    fn get_user_pages_is_get_and_new_foll_values_decode() {
        let new = FollFlags { write: 1, longterm: 1 << 8, pin: 1 << 19 };
        assert_eq!(decode_flags(Hook::GetUserPagesFast as u16, 0, &new), vec![Flag::Get]);
        assert_eq!(decode_flags(Hook::PinUserPages as u16, 1 | (1 << 8), &new), vec![Flag::Pin, Flag::Longterm, Flag::Write]);
        // The 5.10 LONGTERM bit means nothing on 6.3+.
        assert_eq!(decode_flags(Hook::PinUserPages as u16, 0x10000, &new), vec![Flag::Pin]);
    }

    #[test]
    fn short_or_foreign_records_are_errors() {
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        assert!(d.push(&[0u8; 8]).is_err());
        let mut r = pin_record(0, 1, 1, 1);
        r.header.version = RECORD_VERSION + 1;
        assert!(d.push(&bytes(&r)).unwrap_err().to_string().contains("different builds"));
    }

    /// A long call's first chunk carries the stack, the others only their pfns: the
    /// call's stack comes from the first, and every pfn arrives after it.
    #[test]
    fn the_stack_rides_in_the_first_chunk_only() {
        let first = with_stack(pin_record(0, 64, 100, 1000), &[0xffff_1000, 0xffff_2000, 0xffff_3000]);
        assert_eq!(first.stack_words(), 4);
        assert_eq!(first.sent_len(), PIN_FIXED + 8 * (4 + 64));
        let second = pin_record(1, 36, 100, 2000);
        assert_eq!(second.sent_len(), PIN_FIXED + 8 * 36);
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        assert!(d.push(&bytes(&first)[..first.sent_len()]).unwrap().is_none());
        let Some(Event::Pin(p)) = d.push(&bytes(&second)[..second.sent_len()]).unwrap() else { panic!() };
        assert_eq!(p.kstack, [0xffff_1000, 0xffff_2000, 0xffff_3000]);
        assert_eq!((p.pfns.len(), p.pfns[0], p.pfns[63], p.pfns[64], p.pfns[99]), (100, 1000, 1063, 2000, 2035));
        // A failed walk keeps its errno in the one word: no frames, the pfns after it.
        let mut failed = with_stack(pin_record(0, 2, 2, 50), &[]);
        failed.words[0] = -14i32 as u32 as u64;
        assert_eq!((failed.stack(), failed.pfns()), (None, &[50u64, 51][..]));
        let Some(Event::Pin(p)) = d.push(&bytes(&failed)[..failed.sent_len()]).unwrap() else { panic!() };
        assert!(p.kstack.is_empty());
        assert_eq!(p.pfns, vec![50, 51]);
        // A stack word past STACK_FRAMES names no more than the record holds.
        let mut wild = with_stack(pin_record(0, 1, 1, 7), &[]);
        wild.words[0] = 1000;
        assert_eq!(wild.stack_words(), 1 + STACK_FRAMES);
        assert!(wild.sent_len() <= std::mem::size_of::<PinRecord>());
    }

    #[test]
    fn records_cut_after_their_last_pfn_decode_and_cut_deeper_are_errors() {
        // The kernel sends a pin record up to its last pfn: 3 pfns, not 64.
        let r = with_stack(pin_record(0, 3, 3, 40), &[0xffff_1000]);
        let full = bytes(&r);
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        let Some(Event::Pin(p)) = d.push(&full[..PIN_FIXED + (2 + 3) * 8]).unwrap() else { panic!("no pin") };
        assert_eq!(p.pfns, vec![40, 41, 42]);
        assert_eq!(p.kstack, [0xffff_1000]);
        // one pfn short of what it counts
        let e = d.push(&full[..PIN_FIXED + (2 + 2) * 8]).unwrap_err().to_string();
        assert!(e.contains("2 stack words and 3 pfns"), "{e}");
        // shorter than the fixed part
        assert!(d.push(&full[..PIN_FIXED - 8]).is_err());
        let mut rel = ReleaseRecord { header: header(kind::RELEASE, Hook::UnpinUserPages), release: release::UNPIN, chunk: 0, nr_pfns: 1, dirty: 0, call_id: 1, refs_each: 1, _pad: 0, pfns: [0; PFNS_PER_RECORD] };
        rel.pfns[0] = 9;
        let Some(Event::Unpin(u)) = d.push(&bytes(&rel)[..RELEASE_FIXED + 8]).unwrap() else { panic!("no release") };
        assert_eq!(u.pfns, vec![9]);
    }

    #[test]
    fn release_record_decodes() {
        let mut pfns = [0u64; PFNS_PER_RECORD];
        pfns[0] = 7;
        pfns[1] = u64::MAX; // a page pinwatch did not know
        pfns[2] = 8;
        let r = ReleaseRecord {
            header: header(kind::RELEASE, Hook::UnpinUserPagesDirtyLock),
            release: release::UNPIN,
            chunk: 0,
            nr_pfns: 3,
            dirty: 1,
            call_id: 1,
            refs_each: 1,
            _pad: 0,
            pfns,
        };
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        let Some(Event::Unpin(u)) = d.push(&bytes(&r)).unwrap() else { panic!() };
        assert_eq!(u.pfns, vec![7, 8]);
        assert!(u.dirty);
        // 511 references of one folio (io_uring coalescing a 2 MiB buffer): its pfn once
        // per reference, all of them.
        let mut many = r;
        many.nr_pfns = 1;
        many.refs_each = 511;
        let Some(Event::Unpin(u)) = d.push(&bytes(&many)).unwrap() else { panic!() };
        assert_eq!(u.pfns, vec![7; 511]);
        assert_eq!(u.func, "unpin_user_pages_dirty_lock");
        assert_eq!(u.release, Release::Unpin);
    }

    #[test]
    fn random_and_mutated_records_never_panic_and_stay_bounded() {
        let valid = [bytes(&pin_record(0, 4, 300, 1000)), bytes(&pin_record(1, 4, 300, 2000))];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut d = Decoder::new(FollFlags::BEFORE_6_3);
        for round in 0..20_000 {
            let mut b = if round % 4 == 0 {
                (0..(next() % 1500)).map(|_| next() as u8).collect()
            } else {
                valid[round % 2].clone()
            };
            // Keep the version right in most rounds so that the decoder goes deep.
            if b.len() > 2 && round % 8 != 0 {
                b[..2].copy_from_slice(&RECORD_VERSION.to_ne_bytes());
            }
            for _ in 0..(next() % 24) {
                if b.is_empty() {
                    break;
                }
                let i = (next() as usize) % b.len();
                b[i] = next() as u8;
            }
            let _ = d.push(&b);
            assert!(d.partial.len() <= MAX_PARTIAL + 1, "{} calls waiting", d.partial.len());
        }
        let _ = d.flush();
    }
}
