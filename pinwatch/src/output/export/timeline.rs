//! A trace as a timeline, the pure part of export: each GUP call a bar from its pin to
//! the release of its last page, laid out in lanes per process (as many as it held at
//! once); each hazard a mark on the pin it collided with; pinned bytes per process over
//! time. Perfetto's JSON and the HTML page are drawn from this.

use std::collections::{BTreeMap, HashMap};

use crate::{engine::replay::Replay, output::filter::Filter};
use crate::trace::{Event, Flag, Hazard, Release};

#[derive(Debug, Clone)]
pub struct Bar {
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub func: String,
    pub path: String,
    pub caller: String,
    pub flags: Vec<Flag>,
    pub pages: u64,
    pub file: Option<String>,
    pub start: u64,
    /// When its last page was released; None: still held when the trace ends.
    pub end: Option<u64>,
    pub lane: usize,
    /// Pages not yet released.
    left: u64,
    /// Selected by the filters (a bar they drop is still drawn when a kept hazard
    /// collided with it).
    kept: bool,
}

#[derive(Debug, Clone)]
pub struct Mark {
    pub hazard: Hazard,
    /// The bar of the pin it collided with, when the trace has it.
    pub bar: Option<usize>,
}

#[derive(Debug, Default)]
pub struct Process {
    pub pid: u32,
    pub comm: String,
    pub lanes: usize,
    /// (ts, pinned bytes) at each change.
    pub pinned: Vec<(u64, u64)>,
}

#[derive(Debug, Default)]
pub struct Timeline {
    pub kernel: String,
    pub t0: u64,
    pub t1: u64,
    pub bars: Vec<Bar>,
    pub marks: Vec<Mark>,
    pub processes: BTreeMap<u32, Process>,
    /// The hazards the trace recorded and the replay derived did not agree.
    pub mismatched: u64,
}

impl Timeline {
    pub fn seconds(&self, ts: u64) -> f64 {
        ts.saturating_sub(self.t0) as f64 / 1e9
    }
}

/// Builds a timeline as events stream by. Bars, marks and counter points are kept for
/// what the filters select; page references are followed for every pin, as releases
/// name pfns and not owners.
pub struct Builder {
    replay: Replay,
    filter: Filter,
    t: Timeline,
    /// pfn -> open bars holding a reference on it (bar, FOLL_PIN).
    holders: HashMap<u64, Vec<(usize, bool)>>,
    /// (pid, pin time) -> bar, to find the pin a hazard names by its age.
    by_call: HashMap<(u32, u64), usize>,
    /// Pinned pages per process now.
    held: HashMap<u32, u64>,
}

impl Builder {
    pub fn new(filter: Filter) -> Builder {
        Builder { replay: Replay::default(), filter, t: Timeline::default(), holders: HashMap::new(), by_call: HashMap::new(), held: HashMap::new() }
    }

    fn selected_bar(&self, b: &Bar) -> bool {
        self.filter.pid_matches(b.pid) && self.filter.comm_matches(&b.comm)
    }

    fn count(&mut self, pid: u32, ts: u64, delta: i64) {
        let pages = self.held.entry(pid).or_default();
        *pages = pages.saturating_add_signed(delta);
        let bytes = *pages * 4096;
        if let Some(p) = self.t.processes.get_mut(&pid) {
            match p.pinned.last_mut() {
                Some(last) if last.0 == ts => last.1 = bytes,
                _ => p.pinned.push((ts, bytes)),
            }
        }
    }

    pub fn feed(&mut self, e: &Event) {
        self.filter.observe(e);
        if let Some(ts) = e.ts_ns() {
            if self.t.t0 == 0 {
                self.t.t0 = ts;
            }
            self.t.t1 = self.t.t1.max(ts);
        }
        let found = self.replay.feed(e);
        match e {
            Event::Start(s) => self.t.kernel = s.kernel.clone(),
            Event::Pin(p) if !p.pfns.is_empty() => {
                let bar = Bar {
                    pid: p.pid,
                    tid: p.tid,
                    comm: p.comm.clone(),
                    func: p.func.clone(),
                    path: p.path.clone(),
                    caller: p.caller.clone(),
                    flags: p.flags.clone(),
                    pages: p.pfns.len() as u64,
                    file: p.file.as_ref().map(|f| f.path.clone().unwrap_or_else(|| format!("{} ino {}", f.dev, f.ino))),
                    start: p.ts_ns,
                    end: None,
                    lane: 0,
                    left: p.pfns.len() as u64,
                    kept: false,
                };
                let kept = self.selected_bar(&bar) && self.filter.file_matches(p.file.as_ref());
                let id = self.t.bars.len();
                let is_pin = p.flags.contains(&Flag::Pin);
                for pfn in &p.pfns {
                    self.holders.entry(*pfn).or_default().push((id, is_pin));
                }
                self.by_call.insert((p.pid, p.ts_ns), id);
                // The latest name: the first pins of a process are often its exec's,
                // taken under the parent's name.
                self.t.processes.entry(p.pid).or_insert_with(|| Process { pid: p.pid, ..Default::default() }).comm = p.comm.clone();
                self.t.bars.push(Bar { kept, ..bar });
                self.count(p.pid, p.ts_ns, p.pfns.len() as i64);
            }
            Event::Unpin(u) => {
                for pfn in &u.pfns {
                    let Some(list) = self.holders.get_mut(pfn) else { continue };
                    let gone: Vec<usize> = match u.release {
                        Release::Freed | Release::Gone => list.drain(..).map(|(b, _)| b).collect(),
                        Release::Unpin | Release::Put => {
                            let want_pin = u.release == Release::Unpin;
                            let bars = &self.t.bars;
                            let i = list
                                .iter()
                                .position(|(b, p)| *p == want_pin && bars[*b].pid == u.pid)
                                .or_else(|| list.iter().position(|(_, p)| *p == want_pin));
                            i.map(|i| vec![list.remove(i).0]).unwrap_or_default()
                        }
                    };
                    if list.is_empty() {
                        self.holders.remove(pfn);
                    }
                    for b in gone {
                        let bar = &mut self.t.bars[b];
                        bar.left = bar.left.saturating_sub(1);
                        if bar.left == 0 {
                            bar.end = Some(u.ts_ns);
                        }
                        let pid = bar.pid;
                        self.count(pid, u.ts_ns, -1);
                    }
                }
            }
            _ => {}
        }
        for h in found {
            if !self.filter.keeps(&h) {
                continue;
            }
            let bar = self.bar_of(&h);
            self.t.marks.push(Mark { hazard: h, bar });
        }
    }

    fn bar_of(&self, h: &Hazard) -> Option<usize> {
        for p in h.pinner_list() {
            if let (Some(pid), Some(age)) = (p.pid, p.age_ns) {
                if let Some(b) = self.by_call.get(&(pid, h.ts_ns.saturating_sub(age))) {
                    return Some(*b);
                }
            }
        }
        let pfn = h.pfn?;
        self.holders.get(&pfn)?.first().map(|(b, _)| *b)
    }

    pub fn finish(mut self) -> Timeline {
        self.replay.finish();
        self.t.mismatched = self.replay.mismatched;
        // Bars the filters dropped are not drawn, unless a kept hazard points at one.
        let mut wanted: Vec<bool> = self.t.bars.iter().map(|b| b.kept).collect();
        for m in &self.t.marks {
            if let Some(b) = m.bar {
                wanted[b] = true;
            }
        }
        let (t0, t1) = (self.t.t0, self.t.t1);
        let in_window = |b: &Bar| self.filter.in_time(b.start) || self.filter.in_time(b.end.unwrap_or(t1)) || (b.start <= t0 && b.end.is_none());
        let mut keep_idx = Vec::new();
        for (i, b) in self.t.bars.iter().enumerate() {
            if wanted[i] && in_window(b) {
                keep_idx.push(i);
            }
        }
        let remap: HashMap<usize, usize> = keep_idx.iter().enumerate().map(|(new, old)| (*old, new)).collect();
        let mut bars: Vec<Bar> = keep_idx.iter().map(|i| self.t.bars[*i].clone()).collect();
        for m in &mut self.t.marks {
            m.bar = m.bar.and_then(|b| remap.get(&b).copied());
        }
        // Lanes: per process, each bar in the first lane free at its start.
        let mut ends: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        let mut order: Vec<usize> = (0..bars.len()).collect();
        order.sort_by_key(|i| bars[*i].start);
        for i in order {
            let lanes = ends.entry(bars[i].pid).or_default();
            let end = bars[i].end.unwrap_or(t1);
            let lane = lanes.iter().position(|e| *e <= bars[i].start).unwrap_or(lanes.len());
            if lane == lanes.len() {
                lanes.push(end);
            } else {
                lanes[lane] = end;
            }
            bars[i].lane = lane;
        }
        for (pid, lanes) in ends {
            if let Some(p) = self.t.processes.get_mut(&pid) {
                p.lanes = lanes.len();
            }
        }
        let pids: std::collections::BTreeSet<u32> = bars.iter().map(|b| b.pid).collect();
        self.t.processes.retain(|pid, _| pids.contains(pid));
        self.t.bars = bars;
        self.t
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::{
        output::filter::FilterArgs,
        trace::{Actor, KernelPins, Page, PageOp, Pin, Unpin},
    };

    /// The 2018 sequence and a second process's long-term pin, as record writes them.
    pub fn sample() -> Vec<Event> {
        let mut engine = crate::engine::Engine::default();
        let raw = vec![
            Event::Pin(Pin { ts_ns: 1_000_000_000, pid: 7, tid: 7, comm: "dio".into(), func: "pin_user_pages_fast".into(), flags: vec![Flag::Pin, Flag::Write], pfns: vec![100, 101], nr_pages: 2, path: "direct I/O".into(), ..Default::default() }),
            Event::Pin(Pin { ts_ns: 1_100_000_000, pid: 9, tid: 9, comm: "rdma".into(), func: "pin_user_pages_fast".into(), flags: vec![Flag::Pin, Flag::Write, Flag::Longterm], pfns: vec![200], nr_pages: 1, ..Default::default() }),
            Event::Page(Page { ts_ns: 1_500_000_000, op: Some(PageOp::Truncate), func: "mm_filemap_delete_from_page_cache".into(), pfn: 100, seen: "pins".into(), actor: Actor { pid: 8, tid: 8, comm: "truncate".into(), stack: vec![] }, kernel_pins: KernelPins::default(), ..Default::default() }),
            Event::Unpin(Unpin { ts_ns: 3_000_000_000, pid: 0, tid: 0, comm: "swapper".into(), func: "unpin_user_pages_dirty_lock".into(), release: Release::Unpin, dirty: true, pfns: vec![100, 101] }),
        ];
        let mut out = Vec::new();
        for e in raw {
            let hs = engine.apply(&e);
            out.push(e);
            out.extend(hs.into_iter().map(Event::Hazard));
        }
        out
    }

    pub fn build(events: &[Event], f: FilterArgs) -> Timeline {
        let mut b = Builder::new(Filter::new(&f));
        events.iter().for_each(|e| b.feed(e));
        b.finish()
    }

    #[test]
    fn bars_marks_and_counters() {
        let t = build(&sample(), FilterArgs::default());
        assert_eq!(t.bars.len(), 2);
        let dio = &t.bars[0];
        assert_eq!((dio.start, dio.end), (1_000_000_000, Some(3_000_000_000)));
        assert_eq!(t.bars[1].end, None, "the long-term pin is still held");
        assert_eq!(t.marks.len(), 2, "truncate_while_pinned and dirty_after_unmap");
        assert!(t.marks.iter().all(|m| m.bar == Some(0)), "both collide with the dio pin");
        assert_eq!(t.processes[&7].pinned, vec![(1_000_000_000, 8192), (3_000_000_000, 0)]);
        assert_eq!(t.processes[&9].lanes, 1);
        let only9 = build(&sample(), FilterArgs { pids: vec![9], ..Default::default() });
        assert_eq!(only9.bars.len(), 1);
        assert!(only9.marks.is_empty());
    }
}
