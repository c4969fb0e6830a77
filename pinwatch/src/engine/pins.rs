//! Who holds which pins, by folio head pfn.
//!
//! A GUP call adds one reference per page taken, to the folio the page belongs to. A
//! release drops references of its kind on the pfns it names: an unpin drops a FOLL_PIN
//! reference, a put a FOLL_GET one, a free all of them. Releases name pfns, not owners
//! (an I/O completion runs in whatever task is current), so when several processes pin
//! one folio the release goes to the unpinning process if it holds one, else to the
//! oldest pin.

use std::{collections::{BTreeMap, HashMap}, ops::Deref};

use crate::trace::{Event, Flag, Held, Pin, Release};

/// What every page of one GUP call shares: kept once per call, not once per page (a
/// 1 GiB registration is 262144 pages).
#[derive(Debug, PartialEq)]
pub struct PinCall {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub func: String,
    /// Who called GUP (from the stack), and the subsystem; empty when unknown.
    pub caller: String,
    pub path: String,
    pub flags: Vec<Flag>,
    pub since_ns: u64,
    /// Pages the call took.
    pub nr_pages: u64,
    /// The user address of its first page; page i was at start + i * 4 KiB.
    pub start: u64,
    /// Its first file_pages pages belong to a file's page cache (shmem included).
    pub file_pages: u64,
}

impl PinCall {
    pub fn is_pin(&self) -> bool {
        self.flags.contains(&Flag::Pin)
    }
}

/// One page reference as the table hands it out: its call, and what differs page by
/// page. A view: the table keeps 8 bytes per reference, not this.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeldPin<'a> {
    pub call: &'a PinCall,
    /// The page belongs to a file's page cache (shmem included).
    pub file: bool,
    /// The user address the page was pinned at.
    pub addr: u64,
}

impl Deref for HeldPin<'_> {
    type Target = PinCall;
    fn deref(&self) -> &PinCall {
        self.call
    }
}

/// A page reference as stored: the call's slot and the page's index in the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ref {
    call: u32,
    page: u32,
}

/// A released reference still in `settled`, until the next compaction.
const DEAD: Ref = Ref { call: u32::MAX, page: 0 };

/// Low bits of a settled reference's word that hold the page's index in its call; the
/// pfn is above them. A call of more pages is kept as several slots of at most
/// SLICE_PAGES (PinTable::pin); a live call is at most 4096 pages (MAX_CHUNKS records).
const PAGE_BITS: u32 = 16;
const SLICE_PAGES: usize = 1 << PAGE_BITS;
/// pfns that fit above the page index: 2^48 pages, far past any machine's physical
/// addresses (x86-64: 2^40 pages). A larger one, which only a crafted trace can hold,
/// stays in `recent`.
const SETTLED_PFN_LIMIT: u64 = 1 << (64 - PAGE_BITS);

/// A settled reference in 12 bytes: pfn and page index in one word, the call's slot
/// beside it, 4-byte aligned (a (pfn, Ref) pair is 16).
#[derive(Clone, Copy, Debug)]
#[repr(C, packed(4))]
struct Settled {
    word: u64,
    call: u32,
}

impl Settled {
    fn new(pfn: u64, r: Ref) -> Settled {
        debug_assert!(pfn < SETTLED_PFN_LIMIT && (r.page as usize) < SLICE_PAGES);
        Settled { word: (pfn << PAGE_BITS) | r.page as u64, call: r.call }
    }
    fn pfn(self) -> u64 {
        self.word >> PAGE_BITS
    }
    fn r(self) -> Ref {
        Ref { call: self.call, page: (self.word & (SLICE_PAGES as u64 - 1)) as u32 }
    }
    fn is_dead(self) -> bool {
        self.call == DEAD.call
    }
}
/// References kept in `recent` before they are merged into `settled`, at least; at
/// most an eighth of what is settled, so that merging costs a few moves per pin.
const RECENT_MIN: usize = 4096;

#[derive(Debug)]
struct CallSlot {
    call: PinCall,
    /// References of the call still held; the slot is freed at zero.
    held: u64,
}

/// References by folio head pfn, in two tiers. What is held a while (registrations of
/// RDMA, io_uring, VFIO: hundreds of thousands of pages) is in `settled`, a vector
/// sorted by pfn at 12 bytes per reference; new references go to `recent`, a hash map,
/// and are merged into `settled` when it fills. A direct I/O pin of a few microseconds
/// comes and goes in `recent`. Within one pfn, references are kept oldest first:
/// `settled` before `recent`, each in the order taken.
#[derive(Default, Debug)]
pub struct PinTable {
    calls: Vec<Option<CallSlot>>,
    free_calls: Vec<u32>,
    settled: Vec<Settled>,
    /// DEAD entries in `settled`.
    dead: usize,
    recent: HashMap<u64, Vec<Ref>>,
    recent_refs: usize,
    /// References held, both tiers.
    refs: usize,
    /// The order of each large folio held (absent: a single page).
    orders: HashMap<u64, u8>,
    /// Releases of pfns with no matching pin (pins taken before pinwatch started, or
    /// records lost); counted, never guessed at.
    pub unmatched_releases: u64,
}

impl PinTable {
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Pin(p) => self.pin(p),
            Event::Unpin(u) => {
                for pfn in &u.pfns {
                    if !self.release(*pfn, u.release, u.pid) {
                        self.unmatched_releases += 1;
                    }
                }
                self.compact();
            }
            _ => {}
        }
    }

    fn pin(&mut self, p: &Pin) {
        if p.pfns.is_empty() {
            return;
        }
        // A call of more than SLICE_PAGES pages (only a trace can hold one) is kept
        // as several slots, each with its own first address and file pages.
        for (k, pfns) in p.pfns.chunks(SLICE_PAGES).enumerate() {
            let first = (k * SLICE_PAGES) as u64;
            let call = PinCall {
                pid: p.pid,
                comm: p.comm.clone(),
                uid: p.uid,
                cgroup_id: p.cgroup_id,
                func: p.func.clone(),
                caller: p.caller.clone(),
                path: p.path.clone(),
                flags: p.flags.clone(),
                since_ns: p.ts_ns,
                nr_pages: p.pfns.len() as u64,
                start: p.start.wrapping_add(first * 4096),
                file_pages: p.file_pages.saturating_sub(first),
            };
            let slot = Some(CallSlot { call, held: pfns.len() as u64 });
            let id = match self.free_calls.pop() {
                Some(id) => {
                    self.calls[id as usize] = slot;
                    id
                }
                None => {
                    self.calls.push(slot);
                    (self.calls.len() - 1) as u32
                }
            };
            for (i, pfn) in pfns.iter().enumerate() {
                if let Some(o) = p.orders.get(first as usize + i).filter(|o| **o != 0) {
                    self.orders.insert(*pfn, *o);
                }
                self.recent.entry(*pfn).or_default().push(Ref { call: id, page: i as u32 });
            }
        }
        self.recent_refs += p.pfns.len();
        self.refs += p.pfns.len();
        if self.recent_refs > RECENT_MIN.max((self.settled.len() - self.dead) / 8) {
            self.settle();
        }
    }

    /// Merges `recent` into `settled`, in place: the vector grows by exactly what is
    /// added, and released references go first.
    fn settle(&mut self) {
        let mut add: Vec<Settled> = Vec::with_capacity(self.recent_refs);
        let mut kept = 0;
        self.recent.retain(|pfn, refs| {
            if *pfn >= SETTLED_PFN_LIMIT {
                kept += refs.len();
                return true;
            }
            add.extend(refs.iter().map(|r| Settled::new(*pfn, *r)));
            false
        });
        self.recent_refs = kept;
        if self.recent.capacity() > 4 * RECENT_MIN {
            self.recent.shrink_to(RECENT_MIN);
        }
        // Stable: one pfn's references stay in the order taken.
        add.sort_by_key(|e| e.pfn());
        if self.dead > 0 {
            self.settled.retain(|e| !e.is_dead());
            self.dead = 0;
        }
        let (mut i, mut j) = (self.settled.len(), add.len());
        self.settled.reserve_exact(j);
        self.settled.resize(i + j, Settled::new(0, DEAD));
        // From the back: a settled reference goes after an added one only when its pfn
        // is greater, so that on one pfn the older ones stay first.
        while j > 0 {
            let k = i + j - 1;
            if i > 0 && self.settled[i - 1].pfn() > add[j - 1].pfn() {
                self.settled[k] = self.settled[i - 1];
                i -= 1;
            } else {
                self.settled[k] = add[j - 1];
                j -= 1;
            }
        }
    }

    /// Drops released references from `settled` once they are half of it, and gives
    /// memory back when it is mostly unused, all of it when nothing is held.
    fn compact(&mut self) {
        if self.refs == 0 {
            *self = PinTable { unmatched_releases: self.unmatched_releases, ..PinTable::default() };
            return;
        }
        if self.dead > 1024 && self.dead * 2 > self.settled.len() {
            self.settled.retain(|e| !e.is_dead());
            self.dead = 0;
            if self.settled.capacity() > 2 * self.settled.len() + RECENT_MIN {
                self.settled.shrink_to_fit();
            }
        }
    }

    fn view(&self, r: Ref) -> HeldPin<'_> {
        let call = &self.calls[r.call as usize].as_ref().expect("a held reference's call is held").call;
        HeldPin { call, file: (r.page as u64) < call.file_pages, addr: call.start + r.page as u64 * 4096 }
    }

    /// The range of `settled` with references on `pfn`, released ones included.
    fn settled_range(&self, pfn: u64) -> std::ops::Range<usize> {
        let lo = self.settled.partition_point(|e| e.pfn() < pfn);
        let hi = lo + self.settled[lo..].iter().take_while(|e| e.pfn() == pfn).count();
        lo..hi
    }

    /// The references on `pfn`, oldest first, as (index in settled, or in recent).
    fn refs_on(&self, pfn: u64) -> impl Iterator<Item = (Where, Ref)> + '_ {
        let settled = self.settled_range(pfn).filter(|i| !self.settled[*i].is_dead()).map(|i| (Where::Settled(i), self.settled[i].r()));
        let recent = self.recent.get(&pfn).into_iter().flatten().enumerate().map(|(i, r)| (Where::Recent(i), *r));
        settled.chain(recent)
    }

    fn drop_ref(&mut self, pfn: u64, at: Where) {
        let r = match at {
            Where::Settled(i) => {
                self.dead += 1;
                let r = self.settled[i].r();
                self.settled[i].call = DEAD.call;
                r
            }
            Where::Recent(i) => {
                let list = self.recent.get_mut(&pfn).expect("a recent reference's list");
                let r = list.remove(i);
                if list.is_empty() {
                    self.recent.remove(&pfn);
                }
                self.recent_refs -= 1;
                r
            }
        };
        self.refs -= 1;
        let slot = self.calls[r.call as usize].as_mut().expect("a held reference's call is held");
        slot.held -= 1;
        if slot.held == 0 {
            self.calls[r.call as usize] = None;
            self.free_calls.push(r.call);
        }
    }

    /// Every page reference held, with its pfn.
    pub fn iter(&self) -> impl Iterator<Item = (u64, HeldPin<'_>)> + '_ {
        let settled = self.settled.iter().filter(|e| !e.is_dead()).map(|e| (e.pfn(), self.view(e.r())));
        let recent = self.recent.iter().flat_map(move |(pfn, refs)| refs.iter().map(move |r| (*pfn, self.view(*r))));
        settled.chain(recent)
    }

    fn release(&mut self, pfn: u64, kind: Release, releaser: u32) -> bool {
        let matched = match kind {
            Release::Freed | Release::Gone => {
                // From the newest, so that the indexes in recent stay valid.
                let all: Vec<Where> = self.refs_on(pfn).map(|(w, _)| w).collect();
                for w in all.iter().rev() {
                    self.drop_ref(pfn, *w);
                }
                !all.is_empty()
            }
            Release::Unpin | Release::Put => {
                let want_pin = kind == Release::Unpin;
                let mut first = None;
                let mut own = None;
                for (w, r) in self.refs_on(pfn) {
                    let h = self.view(r);
                    if h.is_pin() == want_pin {
                        first = first.or(Some(w));
                        if h.pid == releaser {
                            own = Some(w);
                            break;
                        }
                    }
                }
                match own.or(first) {
                    Some(w) => {
                        self.drop_ref(pfn, w);
                        true
                    }
                    None => false,
                }
            }
        };
        if matched && !self.holds(pfn) {
            self.orders.remove(&pfn);
        }
        matched
    }

    /// Calls `f` with every folio holding a reference: its pfn and its references,
    /// oldest first.
    pub fn for_each_folio<'a>(&'a self, mut f: impl FnMut(u64, &[HeldPin<'a>])) {
        let mut list = Vec::new();
        let mut i = 0;
        while i < self.settled.len() {
            let pfn = self.settled[i].pfn();
            list.clear();
            while i < self.settled.len() && self.settled[i].pfn() == pfn {
                if !self.settled[i].is_dead() {
                    list.push(self.view(self.settled[i].r()));
                }
                i += 1;
            }
            list.extend(self.recent.get(&pfn).into_iter().flatten().map(|r| self.view(*r)));
            if !list.is_empty() {
                f(pfn, &list);
            }
        }
        for (pfn, refs) in &self.recent {
            // A pfn settled too was visited above, its released references included.
            if self.settled_range(*pfn).is_empty() {
                list.clear();
                list.extend(refs.iter().map(|r| self.view(*r)));
                f(*pfn, &list);
            }
        }
    }

    /// Every folio with a reference held.
    pub fn folio_pfns(&self) -> Vec<u64> {
        let mut pfns = Vec::new();
        self.for_each_folio(|pfn, _| pfns.push(pfn));
        pfns
    }

    /// The order of the folio at `pfn` (0: a single page, or not held).
    pub fn order(&self, pfn: u64) -> u8 {
        self.orders.get(&pfn).copied().unwrap_or(0)
    }

    /// The references on `pfn`, oldest first.
    pub fn pins_on(&self, pfn: u64) -> Vec<HeldPin<'_>> {
        self.refs_on(pfn).map(|(_, r)| self.view(r)).collect()
    }

    /// Whether any reference is held on `pfn`.
    pub fn holds(&self, pfn: u64) -> bool {
        self.refs_on(pfn).next().is_some()
    }

    /// Page references held.
    #[cfg(test)]
    pub fn total_refs(&self) -> usize {
        self.refs
    }

    /// Folios with a reference held.
    pub fn folios(&self) -> usize {
        let mut n = 0;
        self.for_each_folio(|_, _| n += 1);
        n
    }

    pub fn is_empty(&self) -> bool {
        self.refs == 0
    }

    /// References still held, per process, sorted by pid.
    pub fn held(&self) -> Vec<Held> {
        let mut m: BTreeMap<u32, Held> = BTreeMap::new();
        for (_, h) in self.iter() {
            let e = m.entry(h.pid).or_insert_with(|| Held { pid: h.pid, comm: h.comm.clone(), pages: 0 });
            e.pages += 1;
        }
        m.into_values().collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Where {
    Settled(usize),
    Recent(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Unpin;

    fn pin(pid: u32, flags: &[Flag], pfns: &[u64]) -> Event {
        Event::Pin(Pin { pid, flags: flags.to_vec(), pfns: pfns.to_vec(), nr_pages: pfns.len() as u64, ..Default::default() })
    }

    fn rel(pid: u32, release: Release, pfns: &[u64]) -> Event {
        Event::Unpin(Unpin {
            ts_ns: 0,
            pid,
            tid: pid,
            comm: String::new(),
            func: String::new(),
            release,
            dirty: false,
            pfns: pfns.to_vec(),
        })
    }

    #[test]
    fn table() {
        use Flag::*;
        use Release::*;
        // (events, expected refs left, expected unmatched releases)
        let cases: Vec<(&str, Vec<Event>, usize, u64)> = vec![
            ("pin then unpin", vec![pin(1, &[Pin], &[10, 11]), rel(1, Unpin, &[10, 11])], 0, 0),
            ("unpin does not drop a GET ref", vec![pin(1, &[Get], &[10]), rel(1, Unpin, &[10])], 1, 1),
            ("put drops a GET ref", vec![pin(1, &[Get], &[10]), rel(9, Put, &[10])], 0, 0),
            ("free drops everything", vec![pin(1, &[Get], &[10]), pin(2, &[Pin], &[10, 10]), rel(0, Freed, &[10])], 0, 0),
            ("two pages of one folio are two refs", vec![pin(1, &[Pin], &[10, 10]), rel(1, Unpin, &[10])], 1, 0),
            ("release of an unknown pfn is counted", vec![rel(1, Unpin, &[99])], 0, 1),
            ("partial release", vec![pin(1, &[Pin, Write], &[1, 2, 3]), rel(5, Unpin, &[2])], 2, 0),
        ];
        for (name, events, left, unmatched) in cases {
            let mut t = PinTable::default();
            events.iter().for_each(|e| t.apply(e));
            assert_eq!(t.total_refs(), left, "{name}");
            assert_eq!(t.unmatched_releases, unmatched, "{name}");
        }
    }

    #[test]
    fn release_prefers_the_releasing_process() {
        let mut t = PinTable::default();
        t.apply(&pin(1, &[Flag::Pin], &[10]));
        t.apply(&pin(2, &[Flag::Pin], &[10]));
        t.apply(&rel(2, Release::Unpin, &[10]));
        assert_eq!(t.pins_on(10).len(), 1);
        assert_eq!(t.pins_on(10)[0].pid, 1);
        // Otherwise the oldest pin goes first.
        t.apply(&pin(3, &[Flag::Pin], &[10]));
        t.apply(&rel(7, Release::Unpin, &[10]));
        assert_eq!(t.pins_on(10)[0].pid, 3);
        assert_eq!(t.held(), vec![Held { pid: 3, comm: String::new(), pages: 1 }]);
    }

    /// A table spanning both tiers: the oldest reference on a pfn goes first, whichever
    /// tier holds it, and the releaser's own reference before that.
    #[test]
    fn releases_find_references_across_both_tiers() {
        let mut t = PinTable::default();
        t.apply(&pin(1, &[Flag::Pin], &[10]));
        // Enough other pages to push pfn 10's first reference into `settled`.
        let many: Vec<u64> = (1000..1000 + RECENT_MIN as u64 + 1).collect();
        t.apply(&pin(5, &[Flag::Pin], &many));
        assert!(t.recent.is_empty() && t.settled.len() == many.len() + 1);
        t.apply(&pin(2, &[Flag::Pin], &[10]));
        t.apply(&pin(3, &[Flag::Pin], &[10]));
        let pids = |t: &PinTable| t.pins_on(10).iter().map(|h| h.pid).collect::<Vec<_>>();
        assert_eq!(pids(&t), [1, 2, 3]);
        t.apply(&rel(9, Release::Unpin, &[10]));
        assert_eq!(pids(&t), [2, 3], "the oldest, from settled");
        t.apply(&rel(3, Release::Unpin, &[10]));
        assert_eq!(pids(&t), [2], "the releaser's own, from recent");
        let mut folios = 0;
        t.for_each_folio(|_, list| folios += list.len());
        assert_eq!(folios, many.len() + 1);
        t.apply(&rel(0, Release::Freed, &[10]));
        assert!(!t.holds(10));
        t.apply(&rel(5, Release::Unpin, &many));
        assert!(t.is_empty() && t.unmatched_releases == 0);
        assert!(t.calls.iter().all(Option::is_none), "every call's slot is freed");
        assert_eq!((t.settled.len(), t.dead), (0, 0), "compacted");
    }

    /// A page's address and file flag come from its call.
    #[test]
    fn a_reference_knows_its_address_and_file() {
        let mut t = PinTable::default();
        t.apply(&Event::Pin(Pin { pid: 1, flags: vec![Flag::Pin], pfns: vec![7, 8], start: 0x10000, file_pages: 1, nr_pages: 2, ..Default::default() }));
        let (a, b) = (t.pins_on(7)[0], t.pins_on(8)[0]);
        assert_eq!((a.addr, a.file, b.addr, b.file), (0x10000, true, 0x11000, false));
    }

    /// A call longer than a slot's SLICE_PAGES (a trace can hold one) keeps every
    /// page's address and file flag across its slots, and is released whole.
    #[test]
    fn a_call_past_a_slot_keeps_its_addresses_and_is_released_whole() {
        let mut t = PinTable::default();
        let n = SLICE_PAGES as u64 * 2 + 5;
        let pfns: Vec<u64> = (0..n).map(|i| 1_000_000 + i).collect();
        let file_pages = SLICE_PAGES as u64 + 3;
        t.apply(&Event::Pin(Pin { pid: 4, flags: vec![Flag::Pin], pfns: pfns.clone(), start: 0x7f00_0000_0000, file_pages, nr_pages: n, ..Default::default() }));
        assert!(t.recent.is_empty(), "settled");
        for i in [0, 1, SLICE_PAGES as u64 - 1, SLICE_PAGES as u64, file_pages - 1, file_pages, n - 1] {
            let h = t.pins_on(1_000_000 + i)[0];
            assert_eq!((h.addr, h.file, h.nr_pages), (0x7f00_0000_0000 + i * 4096, i < file_pages, n), "page {i}");
        }
        t.apply(&rel(4, Release::Unpin, &pfns));
        assert!(t.is_empty() && t.unmatched_releases == 0);
    }

    /// A pfn too large for a settled word (only a crafted trace holds one) stays in
    /// `recent`, found and released like any other.
    #[test]
    fn a_pfn_past_the_settled_word_stays_recent() {
        let mut t = PinTable::default();
        let huge = SETTLED_PFN_LIMIT + 7;
        t.apply(&pin(1, &[Flag::Pin], &[huge, u64::MAX]));
        let many: Vec<u64> = (0..RECENT_MIN as u64 + 1).collect();
        t.apply(&pin(2, &[Flag::Pin], &many));
        assert_eq!(t.settled.len(), many.len(), "the others settled");
        assert_eq!((t.pins_on(huge)[0].pid, t.pins_on(u64::MAX)[0].pid), (1, 1));
        assert_eq!(t.folios(), many.len() + 2);
        t.apply(&rel(1, Release::Unpin, &[huge, u64::MAX]));
        t.apply(&rel(2, Release::Unpin, &many));
        assert!(t.is_empty() && t.unmatched_releases == 0);
    }

    thread_local! {
        static LIVE: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
    }

    /// Counts what each thread has allocated and not freed.
    struct Counting;
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
            LIVE.with(|c| c.set(c.get() + l.size() as isize));
            unsafe { std::alloc::System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
            LIVE.with(|c| c.set(c.get() - l.size() as isize));
            unsafe { std::alloc::System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, new: usize) -> *mut u8 {
            LIVE.with(|c| c.set(c.get() + new as isize - l.size() as isize));
            unsafe { std::alloc::System.realloc(p, l, new) }
        }
    }
    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// 512 MiB of long-term pins in 4 KiB pages, as 512 registrations of 1 MiB (the
    /// bench's footprint): the table keeps them in at most 32 bytes a page, and gives
    /// it all back when they are released.
    #[test]
    fn a_large_registration_costs_a_few_bytes_a_page() {
        let live = || LIVE.with(|c| c.get());
        let before = live();
        let mut t = PinTable::default();
        // Scattered pfns, as the buddy allocator hands out small pages.
        let pfn = |c: u64, i: u64| (c * 7919 + i * 104729) % (1 << 24);
        for c in 0..512u64 {
            let pfns: Vec<u64> = (0..256).map(|i| pfn(c, i)).collect();
            t.apply(&Event::Pin(Pin { pid: 1, flags: vec![Flag::Pin, Flag::Longterm], nr_pages: 256, pfns, ..Default::default() }));
        }
        let per_page = (live() - before) as f64 / 131072.0;
        assert_eq!(t.total_refs(), 131072);
        eprintln!("the pin table: {per_page:.1} bytes per page");
        // 12 bytes a settled reference, and the calls: 18.8 with (pfn, Ref) pairs.
        assert!(per_page <= 16.0, "{per_page:.1} bytes per page");
        for c in 0..512u64 {
            let pfns: Vec<u64> = (0..256).map(|i| pfn(c, i)).collect();
            t.apply(&rel(1, Release::Unpin, &pfns));
        }
        assert!(t.is_empty() && t.unmatched_releases == 0);
        let left = live() - before;
        assert!(left < 64 << 10, "{left} bytes left once everything is released");
    }
}
