//! Hazard rules: which page events are hazards, how bad each is, and the one sequence
//! that spans events, dirty_after_unmap (a page unmapped or removed from the page cache
//! while pinned, then dirtied: the 2018 ext4 crash). Pure, like the rest of the engine.

use std::collections::{BTreeMap, HashMap};

use super::pins::{HeldPin, PinTable};
use crate::trace::{Actor, Event, FileRef, Flag, Hazard, HazardKind, Page, PageOp, Pin, Pinner, Pinners, Severity, Unpin};

/// What is known of the pins a hazard collides with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinTraits {
    /// None: only the kernel's pin count knows of the pin, not its flags.
    pub write: Option<bool>,
    pub longterm: bool,
    /// The page is shmem or hugetlbfs page cache (no writeback behind it).
    pub memory_fs: bool,
}

/// How bad a hazard is; None when it is no hazard at all (a read-only pin written back).
pub fn severity(kind: HazardKind, t: PinTraits) -> Option<Severity> {
    use HazardKind::*;
    use Severity::*;
    Some(match (kind, t.write) {
        (DirtyAfterUnmap, _) => Critical,
        (LongtermPinRefused, _) => Info,
        (LongtermFilePin, _) if t.memory_fs => Info,
        (LongtermFilePin, Some(false)) => Warning,
        (LongtermFilePin, _) => Critical,
        (MkcleanWhilePinned | WritebackWhilePinned | TruncateWhilePinned, Some(true)) => Critical,
        (UnmapWhilePinned, Some(true)) if t.longterm => Critical,
        (UnmapWhilePinned, Some(true)) => Warning,
        (WritebackWhilePinned, Some(false)) => return None,
        (UnmapWhilePinned | MkcleanWhilePinned, Some(false)) => Info,
        (TruncateWhilePinned, Some(false)) => Warning,
        (PinLimitExceeded | LongHeldPin, _) => Warning,
        (_, None) => Warning,
    })
}

fn traits(pinners: &[Pinner], file: Option<&FileRef>) -> PinTraits {
    let known: Vec<&Pinner> = pinners.iter().filter(|p| !p.flags.is_empty()).collect();
    PinTraits {
        write: (!known.is_empty()).then(|| known.iter().any(|p| p.flags.contains(&Flag::Write))),
        longterm: known.iter().any(|p| p.flags.contains(&Flag::Longterm)),
        memory_fs: file.is_some_and(FileRef::is_memory_fs),
    }
}

fn pinner(h: &HeldPin, now: u64) -> Pinner {
    Pinner {
        pid: Some(h.pid),
        comm: Some(h.comm.clone()),
        func: Some(h.func.clone()),
        flags: h.flags.clone(),
        age_ns: Some(now.saturating_sub(h.since_ns)),
        path: (!h.path.is_empty()).then(|| h.path.clone()),
    }
}

/// A page unmapped or removed from the page cache while pinned.
#[derive(Clone, Debug)]
struct Exposure {
    file: Option<FileRef>,
}

#[derive(Default, Debug)]
pub struct Hazards {
    exposed: HashMap<u64, Exposure>,
    /// Hazards reported so far, by kind.
    pub counts: BTreeMap<HazardKind, u64>,
}

impl Hazards {
    /// Hazards an event reveals. Call it before the pin table applies the event: a
    /// release still names the pins it is about to drop.
    pub fn observe(&mut self, pins: &PinTable, event: &Event) -> Vec<Hazard> {
        let out = match event {
            Event::Page(p) => self.page(pins, p).into_iter().collect(),
            Event::Unpin(u) if u.dirty => self.dirtied_by_release(pins, u),
            Event::Pin(p) => longterm(p).into_iter().collect(),
            _ => Vec::new(),
        };
        for h in &out {
            *self.counts.entry(h.kind).or_default() += 1;
        }
        out
    }

    /// Call after the pin table applied the event: a page no pin is left on is an
    /// ordinary page again, whatever happens to it next.
    pub fn settle(&mut self, pins: &PinTable, event: &Event) {
        if let Event::Unpin(u) = event {
            for pfn in &u.pfns {
                if !pins.holds(*pfn) {
                    self.exposed.remove(pfn);
                }
            }
        }
    }

    fn page(&mut self, pins: &PinTable, p: &Page) -> Option<Hazard> {
        let op = p.op?;
        let mut pinners: Vec<Pinner> = pins.pins_on(p.pfn).iter().map(|h| pinner(h, p.ts_ns)).collect();
        if pinners.is_empty() {
            // The kernel side knew a pin the engine does not (a record lost, or a pin
            // only the kernel's count shows): say what is known, no more.
            let from_map = p.seen == "pins";
            pinners.push(Pinner {
                pid: from_map.then_some(p.pinner_pid),
                flags: if from_map { p.pinner_flags.clone() } else { Vec::new() },
                ..Default::default()
            });
        }
        let kind = match op {
            PageOp::Unmap => HazardKind::UnmapWhilePinned,
            PageOp::Mkclean => HazardKind::MkcleanWhilePinned,
            PageOp::Writeback => HazardKind::WritebackWhilePinned,
            PageOp::Truncate => HazardKind::TruncateWhilePinned,
            PageOp::Dirty => {
                self.exposed.remove(&p.pfn)?;
                HazardKind::DirtyAfterUnmap
            }
        };
        if matches!(op, PageOp::Unmap | PageOp::Truncate) {
            let e = self.exposed.entry(p.pfn).or_insert(Exposure { file: None });
            if p.file.is_some() {
                e.file = p.file.clone();
            }
        }
        let severity = severity(kind, traits(&pinners, p.file.as_ref()))?;
        Some(Hazard {
            ts_ns: p.ts_ns,
            kind,
            severity,
            pfn: Some(p.pfn),
            order: Some(p.order),
            pinner: Pinners::from_vec(pinners),
            actor: p.actor.clone(),
            file: p.file.clone(),
            kernel_pins: Some(p.kernel_pins),
            func: p.func.clone(),
            limit: None,
            pages: None,
        })
    }

    /// A release that dirties its pages (unpin_user_pages_dirty_lock, a direct-I/O bio
    /// completing) is the moment the device's data lands behind the filesystem's back.
    fn dirtied_by_release(&mut self, pins: &PinTable, u: &Unpin) -> Vec<Hazard> {
        let mut out = Vec::new();
        for pfn in &u.pfns {
            let Some(exp) = self.exposed.remove(pfn) else { continue };
            let pinners: Vec<Pinner> = pins.pins_on(*pfn).iter().map(|h| pinner(h, u.ts_ns)).collect();
            out.push(Hazard {
                ts_ns: u.ts_ns,
                kind: HazardKind::DirtyAfterUnmap,
                severity: Severity::Critical,
                pfn: Some(*pfn),
                order: None,
                pinner: Pinners::from_vec(pinners),
                actor: Actor { pid: u.pid, tid: u.tid, comm: u.comm.clone(), stack: Vec::new() },
                file: exp.file,
                kernel_pins: None,
                func: u.func.clone(),
                limit: None,
                pages: None,
            });
        }
        out
    }
}

/// Long-term pins of page cache: taken (kernels before 6.5 allow it) or refused (6.5+
/// refuse FOLL_LONGTERM on file mappings that need dirty tracking, with -EFAULT).
fn longterm(p: &Pin) -> Option<Hazard> {
    if !p.flags.contains(&Flag::Longterm) {
        return None;
    }
    let kind = match p.errno {
        Some(14) => HazardKind::LongtermPinRefused,
        None if p.file_pages > 0 => HazardKind::LongtermFilePin,
        _ => return None,
    };
    let me = Pinner {
        pid: Some(p.pid),
        comm: Some(p.comm.clone()),
        func: Some(p.func.clone()),
        flags: p.flags.clone(),
        age_ns: Some(0),
        path: (!p.path.is_empty()).then(|| p.path.clone()),
    };
    let severity = severity(kind, traits(std::slice::from_ref(&me), p.file.as_ref()))?;
    Some(Hazard {
        ts_ns: p.ts_ns,
        kind,
        severity,
        pfn: if kind == HazardKind::LongtermFilePin { p.pfns.first().copied() } else { None },
        order: None,
        pinner: Pinners::One(me),
        actor: Actor { pid: p.pid, tid: p.tid, comm: p.comm.clone(), stack: Vec::new() },
        file: p.file.clone(),
        kernel_pins: None,
        func: p.func.clone(),
        limit: None,
        pages: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;
    use crate::trace::{KernelPins, Release};

    #[test]
    fn severity_table() {
        use HazardKind::*;
        use Severity::*;
        let t = |write: Option<bool>, longterm: bool, memory_fs: bool| PinTraits { write, longterm, memory_fs };
        let cases = [
            (MkcleanWhilePinned, t(Some(true), false, false), Some(Critical)),
            (MkcleanWhilePinned, t(Some(false), false, false), Some(Info)),
            (WritebackWhilePinned, t(Some(true), false, false), Some(Critical)),
            (WritebackWhilePinned, t(Some(false), false, false), None),
            (UnmapWhilePinned, t(Some(true), false, false), Some(Warning)),
            (UnmapWhilePinned, t(Some(true), true, false), Some(Critical)),
            (UnmapWhilePinned, t(Some(false), true, false), Some(Info)),
            (TruncateWhilePinned, t(Some(true), false, false), Some(Critical)),
            (TruncateWhilePinned, t(Some(false), false, false), Some(Warning)),
            (TruncateWhilePinned, t(None, false, true), Some(Warning)),
            (DirtyAfterUnmap, t(Some(false), false, false), Some(Critical)),
            (LongtermFilePin, t(Some(true), true, false), Some(Critical)),
            (LongtermFilePin, t(Some(false), true, false), Some(Warning)),
            (LongtermFilePin, t(Some(true), true, true), Some(Info)),
            (LongtermPinRefused, t(Some(true), true, false), Some(Info)),
        ];
        for (kind, traits, want) in cases {
            assert_eq!(severity(kind, traits), want, "{kind:?} {traits:?}");
        }
    }

    fn pin(pid: u32, ts: u64, flags: &[Flag], pfns: &[u64]) -> Event {
        Event::Pin(Pin { pid, ts_ns: ts, comm: "fio".into(), func: "pin_user_pages_fast".into(), flags: flags.to_vec(), pfns: pfns.to_vec(), nr_pages: pfns.len() as u64, ..Default::default() })
    }

    fn page(ts: u64, op: PageOp, pfn: u64) -> Event {
        Event::Page(Page {
            ts_ns: ts,
            op: Some(op),
            func: "f".into(),
            pfn,
            seen: "pins".into(),
            actor: Actor { pid: 99, tid: 99, comm: "kswapd0".into(), stack: vec![] },
            kernel_pins: KernelPins { refcount: 1025, pincount: None, maybe_dma_pinned: true },
            ..Default::default()
        })
    }

    fn unpin(ts: u64, release: Release, dirty: bool, pfns: &[u64]) -> Event {
        Event::Unpin(Unpin { ts_ns: ts, pid: 0, tid: 0, comm: "irq".into(), func: "unpin_user_pages_dirty_lock".into(), release, dirty, pfns: pfns.to_vec() })
    }

    fn run(events: &[Event]) -> Vec<(HazardKind, Option<u64>, Vec<Option<u32>>)> {
        let mut e = Engine::default();
        events
            .iter()
            .flat_map(|ev| e.apply(ev))
            .map(|h| (h.kind, h.pfn, h.pinner.list().iter().map(|p| p.pid).collect()))
            .collect()
    }

    #[test]
    fn sequences() {
        use Flag::*;
        use HazardKind::*;
        use PageOp::*;
        let w = &[Pin, Write][..];
        // (name, events, expected hazards as (kind, pfn, pinner pids))
        let cases: Vec<(&str, Vec<Event>, Vec<(HazardKind, Option<u64>, Vec<Option<u32>>)>)> = vec![
            (
                "the 2018 sequence",
                vec![pin(7, 10, w, &[1]), page(20, Mkclean, 1), page(21, Writeback, 1), page(22, Unmap, 1), page(23, Truncate, 1), unpin(30, Release::Unpin, true, &[1])],
                vec![
                    (MkcleanWhilePinned, Some(1), vec![Some(7)]),
                    (WritebackWhilePinned, Some(1), vec![Some(7)]),
                    (UnmapWhilePinned, Some(1), vec![Some(7)]),
                    (TruncateWhilePinned, Some(1), vec![Some(7)]),
                    (DirtyAfterUnmap, Some(1), vec![Some(7)]),
                ],
            ),
            ("dirty without unmap is no hazard", vec![pin(7, 10, w, &[1]), page(20, Dirty, 1), unpin(30, Release::Unpin, true, &[1])], vec![]),
            (
                "dirty by a dirty-marking hook, then the release reports nothing more",
                vec![pin(7, 10, w, &[1]), page(22, Unmap, 1), page(25, Dirty, 1), unpin(30, Release::Unpin, true, &[1])],
                vec![(UnmapWhilePinned, Some(1), vec![Some(7)]), (DirtyAfterUnmap, Some(1), vec![Some(7)])],
            ),
            (
                "a released page is ordinary again: its next dirtying is no hazard",
                vec![pin(7, 10, w, &[1]), page(22, Unmap, 1), unpin(30, Release::Unpin, false, &[1]), pin(8, 40, w, &[1]), unpin(50, Release::Unpin, true, &[1])],
                vec![(UnmapWhilePinned, Some(1), vec![Some(7)])],
            ),
            (
                "a freed page keeps no exposure",
                vec![pin(7, 10, &[Get, Write], &[1]), page(22, Truncate, 1), unpin(30, Release::Freed, false, &[1]), page(40, Dirty, 1)],
                vec![(TruncateWhilePinned, Some(1), vec![Some(7)])],
            ),
            ("read pin written back is no hazard", vec![pin(7, 10, &[Pin], &[1]), page(20, Writeback, 1)], vec![]),
            (
                "two pinners collide",
                vec![pin(7, 10, w, &[1]), pin(8, 11, &[Get], &[1]), page(20, Truncate, 1)],
                vec![(TruncateWhilePinned, Some(1), vec![Some(7), Some(8)])],
            ),
        ];
        for (name, events, want) in cases {
            assert_eq!(run(&events), want, "{name}");
        }
    }

    #[test]
    fn kernel_counted_pin_has_no_pinner() {
        let mut p = page(5, PageOp::Truncate, 3);
        if let Event::Page(pg) = &mut p {
            pg.seen = "kernel_pin_count".into();
        }
        let mut e = Engine::default();
        let h = e.apply(&p);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].severity, Severity::Warning);
        let Pinners::One(who) = &h[0].pinner else { panic!() };
        assert_eq!(who.pid, None);
        assert!(who.flags.is_empty());
    }

    #[test]
    fn longterm_pins_of_files() {
        let file = FileRef { dev: "254:0".into(), ino: 5, index: None, fs: "ext4".into(), path: None };
        let taken = Event::Pin(Pin { flags: vec![Flag::Pin, Flag::Longterm, Flag::Write], pfns: vec![9], file_pages: 1, file: Some(file.clone()), ..Default::default() });
        let refused = Event::Pin(Pin { flags: vec![Flag::Pin, Flag::Longterm, Flag::Write], errno: Some(14), ..Default::default() });
        let anon = Event::Pin(Pin { flags: vec![Flag::Pin, Flag::Longterm, Flag::Write], pfns: vec![9], ..Default::default() });
        let shm = Event::Pin(Pin { flags: vec![Flag::Pin, Flag::Longterm], pfns: vec![9], file_pages: 1, file: Some(FileRef { fs: "tmpfs".into(), ..file }), ..Default::default() });
        let mut e = Engine::default();
        let kinds: Vec<(HazardKind, Severity)> = [taken, refused, anon, shm].iter().flat_map(|ev| e.apply(ev)).map(|h| (h.kind, h.severity)).collect();
        assert_eq!(
            kinds,
            vec![
                (HazardKind::LongtermFilePin, Severity::Critical),
                (HazardKind::LongtermPinRefused, Severity::Info),
                (HazardKind::LongtermFilePin, Severity::Info),
            ]
        );
    }
}
