//! Pinned-memory accounting, like mlock's: per process, rolled up per cgroup and per
//! user, split by the kind of pin; and the limits a user sets on it. Pure: the kernel's
//! own figures (VmPin, RLIMIT_MEMLOCK) come in as data, time comes from the caller.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::pins::{HeldPin, PinTable};
use crate::trace::{Actor, Flag, Hazard, HazardKind, KernelProc, LimitBreach, Pinner, Pinners, Severity};

pub const PAGE_SIZE: u64 = 4096;

/// Page references held, split every way the view shows them. Bytes are pages * 4 KiB:
/// GUP counts base pages, whatever the folio size.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Usage {
    pub pinned_bytes: u64,
    /// FOLL_PIN references (the rest are FOLL_GET).
    pub pin_bytes: u64,
    pub longterm_bytes: u64,
    pub file_bytes: u64,
    pub write_bytes: u64,
    /// When the oldest reference still held was taken (CLOCK_MONOTONIC).
    pub oldest_since_ns: Option<u64>,
    /// Bytes by GUP entry point.
    pub by_func: BTreeMap<String, u64>,
    /// Bytes by caller of GUP (the first function below it on the stack): the driver
    /// or subsystem that took them.
    pub by_caller: BTreeMap<String, u64>,
    /// Bytes by subsystem (direct I/O, io_uring, RDMA, VFIO, GPU...).
    pub by_path: BTreeMap<String, u64>,
}

/// Adds to a key's figure, allocating its name only the first time: account() runs
/// every tick over every page held.
fn add_to(m: &mut BTreeMap<String, u64>, key: &str, bytes: u64) {
    match m.get_mut(key) {
        Some(v) => *v += bytes,
        None => {
            m.insert(key.to_string(), bytes);
        }
    }
}

impl Usage {
    /// One reference, holding `bytes` in place.
    fn add(&mut self, h: &HeldPin, bytes: u64) {
        self.pinned_bytes += bytes;
        let has = |f: Flag| h.flags.contains(&f);
        self.pin_bytes += bytes * has(Flag::Pin) as u64;
        self.longterm_bytes += bytes * has(Flag::Longterm) as u64;
        self.write_bytes += bytes * has(Flag::Write) as u64;
        self.file_bytes += bytes * h.file as u64;
        self.oldest_since_ns = Some(self.oldest_since_ns.map_or(h.since_ns, |o| o.min(h.since_ns)));
        add_to(&mut self.by_func, &h.func, bytes);
        add_to(&mut self.by_caller, if h.caller.is_empty() { "unknown" } else { &h.caller }, bytes);
        add_to(&mut self.by_path, if h.path.is_empty() { "unknown" } else { &h.path }, bytes);
    }

    pub fn oldest_age_ns(&self, now_ns: u64) -> Option<u64> {
        self.oldest_since_ns.map(|s| now_ns.saturating_sub(s))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcUsage {
    pub pid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    #[serde(flatten)]
    pub usage: Usage,
}

/// Everything held now, by process, cgroup and user.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accounts {
    pub processes: BTreeMap<u32, ProcUsage>,
    pub cgroups: BTreeMap<u64, Usage>,
    pub users: BTreeMap<u32, Usage>,
    pub totals: Usage,
}

pub fn account(pins: &PinTable) -> Accounts {
    let mut a = Accounts::default();
    // A process's name, uid and cgroup are its latest pin's (after exec, not before: the
    // pins exec takes of its arguments carry the parent's name). Chosen by time, not by
    // the order the pin table iterates in, so that a replay names it as the live run did.
    let mut latest: HashMap<u32, (u64, &str)> = HashMap::new();
    pins.for_each_folio(|pfn, list| {
        let mut in_place = HeldInPlace::new(list, PAGE_SIZE << pins.order(pfn));
        for h in list {
            let bytes = in_place.charge(h);
            let p = a.processes.entry(h.pid).or_insert_with(|| ProcUsage { pid: h.pid, ..Default::default() });
            let key = (h.since_ns, h.call.comm.as_str());
            let l = latest.entry(h.pid).or_insert((0, ""));
            if key > *l || p.comm.is_empty() {
                *l = key;
                p.comm = h.comm.clone();
                p.uid = h.uid;
                p.cgroup_id = h.cgroup_id;
            }
            p.usage.add(h, bytes);
            a.cgroups.entry(h.cgroup_id).or_default().add(h, bytes);
            a.users.entry(h.uid).or_default().add(h, bytes);
            a.totals.add(h, bytes);
        }
    });
    a
}

/// The bytes each reference on one folio is charged. A pin holds its whole folio in
/// place, however few of its pages were asked for: each process holding references
/// there is charged at least the folio (io_uring keeps one reference for a whole huge
/// folio from 6.10), and one page per reference where it holds more (a page registered
/// twice). The first reference of each process carries what the folio adds. A single
/// page costs no allocation: account() runs at every tick over every folio held.
struct HeldInPlace {
    folio_bytes: u64,
    /// References per process on a large folio, until its first is charged.
    refs: HashMap<u32, u64>,
}

impl HeldInPlace {
    fn new(list: &[HeldPin], folio_bytes: u64) -> HeldInPlace {
        let mut refs = HashMap::new();
        if folio_bytes > PAGE_SIZE {
            for h in list {
                *refs.entry(h.pid).or_default() += 1;
            }
        }
        HeldInPlace { folio_bytes, refs }
    }

    fn charge(&mut self, h: &HeldPin) -> u64 {
        match self.refs.remove(&h.pid) {
            Some(n) => self.folio_bytes.saturating_sub((n - 1) * PAGE_SIZE).max(PAGE_SIZE),
            None => PAGE_SIZE,
        }
    }
}

/// Rules like mlock's, set by the user; the memlock rule is on by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// A pin held longer than this is long_held_pin.
    pub max_pin_age_ns: Option<u64>,
    /// Long-term pinned bytes per process, cgroup and user.
    pub max_longterm_process: Option<u64>,
    pub max_longterm_cgroup: Option<u64>,
    pub max_longterm_user: Option<u64>,
    /// Off: do not compare long-term pins with RLIMIT_MEMLOCK.
    pub ignore_memlock: bool,
}

impl From<&crate::trace::LimitRules> for Limits {
    fn from(r: &crate::trace::LimitRules) -> Limits {
        Limits {
            max_pin_age_ns: r.max_pin_age_ns,
            max_longterm_process: r.max_longterm_process,
            max_longterm_cgroup: r.max_longterm_cgroup,
            max_longterm_user: r.max_longterm_user,
            ignore_memlock: !r.memlock,
        }
    }
}

/// Rules broken, each reported once until it holds again.
#[derive(Default, Debug)]
pub struct LimitState {
    breached: BTreeSet<(String, String, u64)>,
    long_held: BTreeSet<(u32, u64)>,
}

impl LimitState {
    /// Checks every rule against what is held now; returns new breaches as hazards.
    pub fn check(&mut self, limits: &Limits, pins: &PinTable, acc: &Accounts, kernel: &HashMap<u32, KernelProc>, now_ns: u64) -> Vec<Hazard> {
        let mut out = Vec::new();
        let mut still = BTreeSet::new();
        let mut rule = |rule: &str, scope: &str, id: u64, value: u64, limit: Option<u64>, who: Option<&ProcUsage>, out: &mut Vec<Hazard>| {
            let Some(limit) = limit else { return };
            if value <= limit {
                return;
            }
            let key = (rule.to_string(), scope.to_string(), id);
            still.insert(key.clone());
            if self.breached.insert(key) {
                out.push(limit_hazard(HazardKind::PinLimitExceeded, LimitBreach { rule: rule.into(), scope: scope.into(), id, value, limit }, who, now_ns));
            }
        };
        for (pid, p) in &acc.processes {
            let memlock = if limits.ignore_memlock { None } else { kernel.get(pid).and_then(|k| k.memlock_limit_bytes) };
            rule("rlimit_memlock", "process", *pid as u64, p.usage.longterm_bytes, memlock, Some(p), &mut out);
            rule("max_longterm_bytes", "process", *pid as u64, p.usage.longterm_bytes, limits.max_longterm_process, Some(p), &mut out);
        }
        for (cg, u) in &acc.cgroups {
            rule("max_longterm_bytes", "cgroup", *cg, u.longterm_bytes, limits.max_longterm_cgroup, None, &mut out);
        }
        for (uid, u) in &acc.users {
            rule("max_longterm_bytes", "user", *uid as u64, u.longterm_bytes, limits.max_longterm_user, None, &mut out);
        }
        self.breached.retain(|k| still.contains(k));
        if let Some(max) = limits.max_pin_age_ns {
            let mut held = BTreeSet::new();
            // One report per pin (a GUP call: pid and when it was taken), not per page.
            let mut old: BTreeMap<(u32, u64), (HeldPin, u64)> = BTreeMap::new();
            for (_, h) in pins.iter() {
                if now_ns.saturating_sub(h.since_ns) > max {
                    old.entry((h.pid, h.since_ns)).or_insert((h, 0)).1 += 1;
                }
            }
            for (key, (h, pages)) in old {
                held.insert(key);
                if self.long_held.insert(key) {
                    let age = now_ns.saturating_sub(h.since_ns);
                    let mut hz = limit_hazard(
                        HazardKind::LongHeldPin,
                        LimitBreach { rule: "max_pin_age_ns".into(), scope: "process".into(), id: h.pid as u64, value: age, limit: max },
                        None,
                        now_ns,
                    );
                    hz.pinner = Pinners::One(Pinner {
                        pid: Some(h.pid),
                        comm: Some(h.comm.clone()),
                        func: Some(h.func.clone()),
                        flags: h.flags.clone(),
                        age_ns: Some(age),
                        path: (!h.path.is_empty()).then(|| h.path.clone()),
                    });
                    hz.actor = Actor { pid: h.pid, tid: h.pid, comm: h.comm.clone(), stack: Vec::new() };
                    hz.pages = Some(pages);
                    out.push(hz);
                }
            }
            self.long_held.retain(|k| held.contains(k));
        }
        out
    }
}

fn limit_hazard(kind: HazardKind, breach: LimitBreach, who: Option<&ProcUsage>, now_ns: u64) -> Hazard {
    let (pinner, actor) = match who {
        Some(p) => (
            Pinner { pid: Some(p.pid), comm: Some(p.comm.clone()), func: None, flags: Vec::new(), age_ns: p.usage.oldest_age_ns(now_ns), path: None },
            Actor { pid: p.pid, tid: p.pid, comm: p.comm.clone(), stack: Vec::new() },
        ),
        None => (Pinner::default(), Actor::default()),
    };
    Hazard {
        ts_ns: now_ns,
        kind,
        severity: Severity::Warning,
        pfn: None,
        order: None,
        pinner: Pinners::One(pinner),
        actor,
        file: None,
        kernel_pins: None,
        func: String::new(),
        limit: Some(breach),
        pages: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Event, Pin, Release, Unpin};

    fn pin(pid: u32, uid: u32, cg: u64, ts: u64, flags: &[Flag], pfns: &[u64], file_pages: u64) -> Event {
        Event::Pin(Pin { pid, uid, cgroup_id: cg, ts_ns: ts, flags: flags.to_vec(), pfns: pfns.to_vec(), nr_pages: pfns.len() as u64, file_pages, func: "pin_user_pages_fast".into(), ..Default::default() })
    }

    fn unpin(pfns: &[u64]) -> Event {
        Event::Unpin(Unpin { ts_ns: 0, pid: 0, tid: 0, comm: String::new(), func: String::new(), release: Release::Unpin, dirty: false, pfns: pfns.to_vec() })
    }

    #[test]
    fn table() {
        use Flag::*;
        const P: u64 = PAGE_SIZE;
        // (name, events, pid -> (pinned, pin, longterm, file, write) in bytes)
        let cases: Vec<(&str, Vec<Event>, Vec<(u32, [u64; 5])>)> = vec![
            ("io_uring buffers", vec![pin(1, 0, 9, 5, &[Pin, Longterm, Write], &[10, 11, 12], 0)], vec![(1, [3 * P, 3 * P, 3 * P, 0, 3 * P])]),
            ("direct I/O into a file", vec![pin(2, 0, 9, 5, &[Get, Write], &[20, 21], 2)], vec![(2, [2 * P, 0, 0, 2 * P, 2 * P])]),
            ("partly file", vec![pin(2, 0, 9, 5, &[Pin], &[20, 21, 22], 1)], vec![(2, [3 * P, 3 * P, 0, P, 0])]),
            ("released pins are gone", vec![pin(1, 0, 9, 5, &[Pin], &[10, 11], 0), unpin(&[10, 11])], vec![]),
            (
                "two processes apart",
                vec![pin(1, 0, 9, 5, &[Pin, Longterm], &[10], 0), pin(2, 0, 9, 6, &[Get], &[20, 21], 0)],
                vec![(1, [P, P, P, 0, 0]), (2, [2 * P, 0, 0, 0, 0])],
            ),
        ];
        for (name, events, want) in cases {
            let mut t = PinTable::default();
            events.iter().for_each(|e| t.apply(e));
            let a = account(&t);
            let got: Vec<(u32, [u64; 5])> = a
                .processes
                .values()
                .map(|p| (p.pid, [p.usage.pinned_bytes, p.usage.pin_bytes, p.usage.longterm_bytes, p.usage.file_bytes, p.usage.write_bytes]))
                .collect();
            assert_eq!(got, want, "{name}");
            let total: u64 = want.iter().map(|(_, b)| b[0]).sum();
            assert_eq!(a.totals.pinned_bytes, total, "{name}");
        }
    }

    /// A pin holds its whole folio in place: io_uring from 6.10 keeps one reference per
    /// huge folio and unpins the rest in one call; the process is still charged the
    /// folio, once, and one page per reference beyond it.
    #[test]
    fn a_pin_holds_its_whole_folio() {
        use Flag::*;
        const P: u64 = PAGE_SIZE;
        let huge = |pid: u32, pfns: &[u64]| match pin(pid, 0, 9, 5, &[Pin, Longterm], pfns, 0) {
            Event::Pin(mut p) => {
                p.orders = vec![9; pfns.len()];
                Event::Pin(p)
            }
            e => e,
        };
        let bytes = |events: &[Event]| {
            let mut t = PinTable::default();
            events.iter().for_each(|e| t.apply(e));
            account(&t).processes.values().map(|p| (p.pid, p.usage.pinned_bytes, p.usage.longterm_bytes)).collect::<Vec<_>>()
        };
        let whole = 512 * P;
        // 512 references, then 511 unpinned in one call (coalescing): 2 MiB all along.
        let mut ev = vec![huge(1, &[100; 512])];
        assert_eq!(bytes(&ev), vec![(1, whole, whole)]);
        ev.push(unpin(&[100; 511]));
        assert_eq!(bytes(&ev), vec![(1, whole, whole)]);
        // the last reference goes: nothing
        ev.push(unpin(&[100]));
        assert_eq!(bytes(&ev), vec![]);
        // one page of a huge folio: the folio; 600 references: 600 pages
        assert_eq!(bytes(&[huge(1, &[100])]), vec![(1, whole, whole)]);
        assert_eq!(bytes(&[huge(1, &[100; 600])]), vec![(1, 600 * P, 600 * P)]);
        // two processes on one folio: each is charged what it holds in place
        assert_eq!(bytes(&[huge(1, &[100]), huge(2, &[100; 2])]), vec![(1, whole, whole), (2, whole, whole)]);
        // a single page stays a page
        assert_eq!(bytes(&[pin(1, 0, 9, 5, &[Pin], &[7], 0)]), vec![(1, P, 0)]);
    }

    /// exec's pins carry the parent's name; the process is named by its latest pin, whatever
    /// order the table iterates in (a HashMap's, different in every process: a replay
    /// once named a breach's process otherwise than the live run had).
    #[test]
    fn a_process_is_named_by_its_latest_pin() {
        let named = |comm: &str, ts: u64, pfns: &[u64]| match pin(7, 0, 9, ts, &[Flag::Get], pfns, 0) {
            Event::Pin(mut p) => {
                p.comm = comm.into();
                Event::Pin(p)
            }
            e => e,
        };
        for round in 0..20u64 {
            let mut t = PinTable::default();
            // Many pfns before exec, so that iteration order varies between tables.
            let early: Vec<u64> = (0..50).map(|i| 1000 + i * 7 + round).collect();
            t.apply(&named("pinwatch", 5, &early));
            t.apply(&named("pinwatch-scenar", 9, &[5]));
            assert_eq!(account(&t).processes[&7].comm, "pinwatch-scenar", "round {round}");
        }
    }

    #[test]
    fn rollups_by_cgroup_and_user() {
        let mut t = PinTable::default();
        t.apply(&pin(1, 1000, 7, 5, &[Flag::Pin, Flag::Longterm], &[1, 2], 0));
        t.apply(&pin(2, 1000, 8, 6, &[Flag::Pin], &[3], 0));
        t.apply(&pin(3, 0, 8, 7, &[Flag::Pin, Flag::Longterm], &[4], 0));
        let a = account(&t);
        assert_eq!(a.users[&1000].pinned_bytes, 3 * PAGE_SIZE);
        assert_eq!(a.users[&1000].longterm_bytes, 2 * PAGE_SIZE);
        assert_eq!(a.cgroups[&8].pinned_bytes, 2 * PAGE_SIZE);
        assert_eq!(a.totals.oldest_since_ns, Some(5));
        assert_eq!(a.processes[&1].usage.by_func["pin_user_pages_fast"], 2 * PAGE_SIZE);
    }

    /// Property: after any sequence of pins and releases, the accounts equal a simple
    /// model that counts, per pid, the references taken minus those released.
    #[test]
    fn random_sequences_match_a_simple_model() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..300 {
            let mut t = PinTable::default();
            // model: pfn -> list of (pid, longterm), released oldest first
            let mut model: HashMap<u64, Vec<(u32, bool)>> = HashMap::new();
            for step in 0..40 {
                let pfn = next() % 6;
                if next() % 3 != 0 {
                    let pid = (next() % 3) as u32 + 1;
                    let lt = next() % 2 == 0;
                    let flags = if lt { vec![Flag::Pin, Flag::Longterm] } else { vec![Flag::Pin] };
                    t.apply(&pin(pid, 0, 1, step, &flags, &[pfn], 0));
                    model.entry(pfn).or_default().push((pid, lt));
                } else {
                    // A release by a task that holds nothing there: the oldest goes.
                    t.apply(&Event::Unpin(Unpin { ts_ns: step, pid: 99, tid: 99, comm: String::new(), func: String::new(), release: Release::Unpin, dirty: false, pfns: vec![pfn] }));
                    if let Some(v) = model.get_mut(&pfn) {
                        if !v.is_empty() {
                            v.remove(0);
                        }
                    }
                }
            }
            let a = account(&t);
            let mut want: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
            for (pid, lt) in model.values().flatten() {
                let e = want.entry(*pid).or_default();
                e.0 += PAGE_SIZE;
                e.1 += PAGE_SIZE * *lt as u64;
            }
            let got: BTreeMap<u32, (u64, u64)> = a.processes.values().map(|p| (p.pid, (p.usage.pinned_bytes, p.usage.longterm_bytes))).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn limits_fire_once_and_clear() {
        let mut t = PinTable::default();
        t.apply(&pin(1, 0, 9, 0, &[Flag::Pin, Flag::Longterm, Flag::Write], &[1, 2, 3, 4], 0));
        t.apply(&pin(2, 0, 9, 0, &[Flag::Pin, Flag::Longterm], &[5], 0));
        let kernel: HashMap<u32, KernelProc> = [
            (1, KernelProc { memlock_limit_bytes: Some(2 * PAGE_SIZE), ..Default::default() }),
            (2, KernelProc { memlock_limit_bytes: Some(2 * PAGE_SIZE), ..Default::default() }),
        ]
        .into();
        let limits = Limits { max_pin_age_ns: Some(1000), ..Default::default() };
        let mut st = LimitState::default();
        let acc = account(&t);
        let first = st.check(&limits, &t, &acc, &kernel, 500);
        // pid 1 holds 4 long-term pages with a 2-page memlock limit; pid 2 is within it.
        assert_eq!(first.iter().map(|h| (h.kind, h.limit.as_ref().unwrap().id)).collect::<Vec<_>>(), vec![(HazardKind::PinLimitExceeded, 1)]);
        assert!(st.check(&limits, &t, &acc, &kernel, 600).is_empty(), "reported once");
        let aged = st.check(&limits, &t, &acc, &kernel, 2000);
        assert_eq!(aged.iter().filter(|h| h.kind == HazardKind::LongHeldPin).count(), 2, "{aged:?}");
        assert_eq!(aged.iter().find(|h| h.limit.as_ref().unwrap().id == 1).unwrap().pages, Some(4));
        // Released: the breach clears, and a new one would be reported again.
        t.apply(&unpin(&[1, 2, 3, 4]));
        let acc = account(&t);
        assert!(st.check(&limits, &t, &acc, &kernel, 3000).is_empty());
        let no_memlock = Limits { ignore_memlock: true, ..Default::default() };
        t.apply(&pin(1, 0, 9, 0, &[Flag::Pin, Flag::Longterm], &[1, 2, 3, 4], 0));
        assert!(st.check(&no_memlock, &t, &account(&t), &kernel, 3100).is_empty());
        assert_eq!(st.check(&limits, &t, &account(&t), &kernel, 3200).len(), 2);
    }
}
