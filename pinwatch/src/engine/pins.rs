//! Who holds which pins, by folio head pfn.
//!
//! A GUP call adds one reference per page taken, to the folio the page belongs to. A
//! release drops references of its kind on the pfns it names: an unpin drops a FOLL_PIN
//! reference, a put a FOLL_GET one, a free all of them. Releases name pfns, not owners
//! (an I/O completion runs in whatever task is current), so when several processes pin
//! one folio the release goes to the unpinning process if it holds one, else to the
//! oldest pin.

use std::{
    collections::{BTreeMap, HashMap},
    ops::Deref,
    sync::Arc,
};

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
}

impl PinCall {
    pub fn is_pin(&self) -> bool {
        self.flags.contains(&Flag::Pin)
    }
}

/// One page reference: its call, and what differs page by page.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldPin {
    pub call: Arc<PinCall>,
    /// The page belongs to a file's page cache (shmem included).
    pub file: bool,
    /// The user address the page was pinned at.
    pub addr: u64,
}

impl Deref for HeldPin {
    type Target = PinCall;
    fn deref(&self) -> &PinCall {
        &self.call
    }
}

#[derive(Default, Debug)]
pub struct PinTable {
    by_pfn: HashMap<u64, Vec<HeldPin>>,
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
            }
            _ => {}
        }
    }

    fn pin(&mut self, p: &Pin) {
        if p.pfns.is_empty() {
            return;
        }
        let call = Arc::new(PinCall {
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
        });
        // file_pages is known per call, not per page: the first file_pages pages count.
        for (i, pfn) in p.pfns.iter().enumerate() {
            if let Some(o) = p.orders.get(i).filter(|o| **o != 0) {
                self.orders.insert(*pfn, *o);
            }
            self.by_pfn.entry(*pfn).or_default().push(HeldPin {
                call: call.clone(),
                file: (i as u64) < p.file_pages,
                addr: p.start + i as u64 * 4096,
            });
        }
    }

    /// Every page reference held, with its pfn.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &HeldPin)> {
        self.by_pfn.iter().flat_map(|(pfn, v)| v.iter().map(move |h| (*pfn, h)))
    }

    fn release(&mut self, pfn: u64, kind: Release, releaser: u32) -> bool {
        let Some(list) = self.by_pfn.get_mut(&pfn) else { return false };
        let matched = match kind {
            Release::Freed | Release::Gone => {
                list.clear();
                true
            }
            Release::Unpin | Release::Put => {
                let want_pin = kind == Release::Unpin;
                let same_kind = |h: &HeldPin| h.is_pin() == want_pin;
                let idx = list
                    .iter()
                    .position(|h| same_kind(h) && h.pid == releaser)
                    .or_else(|| list.iter().position(same_kind));
                match idx {
                    Some(i) => {
                        list.remove(i);
                        true
                    }
                    None => false,
                }
            }
        };
        if list.is_empty() {
            self.by_pfn.remove(&pfn);
            self.orders.remove(&pfn);
        }
        matched
    }

    /// Every folio with a reference held: its pfn and its references.
    pub fn by_folio(&self) -> impl Iterator<Item = (u64, &[HeldPin])> {
        self.by_pfn.iter().map(|(pfn, v)| (*pfn, v.as_slice()))
    }

    /// The order of the folio at `pfn` (0: a single page, or not held).
    pub fn order(&self, pfn: u64) -> u8 {
        self.orders.get(&pfn).copied().unwrap_or(0)
    }

    pub fn pins_on(&self, pfn: u64) -> &[HeldPin] {
        self.by_pfn.get(&pfn).map(Vec::as_slice).unwrap_or(&[])
    }

    #[cfg(test)]
    pub fn total_refs(&self) -> usize {
        self.by_pfn.values().map(Vec::len).sum()
    }

    /// Folios with a reference held.
    pub fn folios(&self) -> usize {
        self.by_pfn.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_pfn.is_empty()
    }

    /// References still held, per process, sorted by pid.
    pub fn held(&self) -> Vec<Held> {
        let mut m: BTreeMap<u32, Held> = BTreeMap::new();
        for h in self.by_pfn.values().flatten() {
            let e = m.entry(h.pid).or_insert_with(|| Held { pid: h.pid, comm: h.comm.clone(), pages: 0 });
            e.pages += 1;
        }
        m.into_values().collect()
    }
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
}
