//! The story of one file or one pinner, for the person reading a trace at 3 a.m.: the
//! pin (who, how, which pages, when), then each mkclean, writeback, unmap, truncate
//! and dirtying of those pages with time, task and stack, then the release. Built as
//! the trace streams by, from the events that touch pinned pages (page records are sent
//! only for pinned pages, so this stays small whatever the trace's size).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::Serialize;

use super::filter::Filter;
use crate::{
    engine::pins::PinTable,
    trace::{Event, FileRef, Flag, Hazard, HazardKind, PageOp, Release},
};

/// Steps kept per story; past this they are counted.
const MAX_STEPS: usize = 500;
/// Steps alike (same thing done by the same task) this close together are one step.
const MERGE_NS: u64 = 50_000_000;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    File { dev: String, ino: u64 },
    Pinner { pid: u32 },
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub ts_ns: u64,
    /// pin, unmap, mkclean, writeback, truncate, dirty, release, limit.
    pub what: String,
    pub text: String,
    pub task: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stack: Vec<String>,
    pub pages: u64,
    /// Page indexes in the file, for page steps of file pages.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub file_pages: Vec<u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hazards: BTreeMap<String, u64>,
    #[serde(skip)]
    merge_key: String,
}

#[derive(Default, Debug)]
pub struct Story {
    pub subject: Option<Subject>,
    pub title: String,
    pub steps: Vec<Step>,
    pub more: u64,
    pub hazards: u64,
    pins: HashSet<(u32, u64)>,
    comms: BTreeSet<String>,
    pids: BTreeSet<u32>,
    file: Option<FileRef>,
}

#[derive(Default)]
pub struct Stories {
    stories: BTreeMap<Subject, Story>,
    /// Pages a story has followed since a page op, until their release.
    exposed: HashMap<u64, BTreeSet<Subject>>,
    paths: HashMap<(String, u64), String>,
}

fn flags(f: &[Flag]) -> String {
    f.iter().map(|x| format!("{x:?}").to_uppercase()).collect::<Vec<_>>().join(" ")
}

fn op_words(op: PageOp) -> (&'static str, &'static str) {
    match op {
        PageOp::Unmap => ("unmap", "unmapped from the process (reclaim, MADV_PAGEOUT or migration)"),
        PageOp::Mkclean => ("mkclean", "write-protected for writeback"),
        PageOp::Writeback => ("writeback", "written back to disk"),
        PageOp::Truncate => ("truncate", "removed from the page cache (truncate, hole punch or invalidate)"),
        PageOp::Dirty => ("dirty", "dirtied"),
    }
}

impl Stories {
    fn story(&mut self, s: &Subject) -> &mut Story {
        let paths = &self.paths;
        self.stories.entry(s.clone()).or_insert_with(|| Story {
            subject: Some(s.clone()),
            title: match s {
                Subject::File { dev, ino } => match paths.get(&(dev.clone(), *ino)) {
                    Some(p) => format!("file {p} ({dev} ino {ino})"),
                    None => format!("file {dev} ino {ino}"),
                },
                Subject::Pinner { pid } => format!("pinner pid {pid}"),
            },
            ..Default::default()
        })
    }

    fn add(&mut self, s: &Subject, step: Step, hazards: &[Hazard]) {
        let story = self.story(s);
        story.hazards += hazards.len() as u64;
        // Writeback walks a file page by page (mkclean, dirty, writeback, next page):
        // the same thing done to the next page joins its step.
        let alike = story.steps.iter_mut().rev().take_while(|l| step.ts_ns.saturating_sub(l.ts_ns) < MERGE_NS).find(|l| l.merge_key == step.merge_key);
        if let Some(last) = alike {
            last.pages += step.pages;
            last.file_pages.extend(step.file_pages);
            for (k, n) in step.hazards {
                *last.hazards.entry(k).or_default() += n;
            }
            return;
        }
        if story.steps.len() >= MAX_STEPS {
            story.more += 1;
            return;
        }
        story.steps.push(step);
    }

    /// One event of the trace, after the engine applied it (`found`: the hazards it
    /// revealed); `pins` is what the engine holds now.
    pub fn observe(&mut self, pins: &PinTable, e: &Event, found: &[Hazard]) {
        let counts = |hs: &[Hazard]| -> BTreeMap<String, u64> {
            let mut m = BTreeMap::new();
            for h in hs {
                *m.entry(format!("{} ({})", h.kind.name(), h.severity.name())).or_default() += 1;
            }
            m
        };
        match e {
            Event::Pin(p) => {
                if let Some(f) = &p.file {
                    if let Some(path) = &f.path {
                        self.paths.insert((f.dev.clone(), f.ino), path.clone());
                    }
                }
                // Pins tell a story of their own only when they are a hazard (a
                // long-term pin of a file, a refused one); else when a page op meets them.
                if found.is_empty() {
                    return;
                }
                let text = match p.errno {
                    Some(errno) => format!("{} asked for {} page(s) long-term and was refused (errno {errno})", p.func, p.nr_requested),
                    None => format!("{} pinned {} page(s), {}{}", p.func, p.nr_pages, flags(&p.flags), path_note(&p.path)),
                };
                let step = Step {
                    ts_ns: p.ts_ns,
                    what: "pin".into(),
                    text,
                    task: format!("pid {} {}", p.pid, p.comm),
                    stack: Vec::new(),
                    pages: p.nr_pages,
                    file_pages: Vec::new(),
                    hazards: counts(found),
                    merge_key: format!("pin {} {}", p.pid, p.ts_ns),
                };
                let mut subjects = vec![Subject::Pinner { pid: p.pid }];
                if let Some(f) = &p.file {
                    subjects.push(Subject::File { dev: f.dev.clone(), ino: f.ino });
                }
                for s in &subjects {
                    self.pin_seen(s, p.pid, p.ts_ns, &p.comm, p.file.clone());
                    self.add(s, step.clone(), found);
                }
            }
            Event::Page(pg) => {
                let Some(op) = pg.op else { return };
                let held = pins.pins_on(pg.pfn);
                let mut subjects: Vec<Subject> = held.iter().map(|h| Subject::Pinner { pid: h.pid }).collect();
                if pg.pinner_pid != 0 && held.is_empty() {
                    subjects.push(Subject::Pinner { pid: pg.pinner_pid });
                }
                if let Some(f) = &pg.file {
                    subjects.push(Subject::File { dev: f.dev.clone(), ino: f.ino });
                }
                // A page truncated out of its file is still that file's story when the
                // device's write finally dirties it.
                subjects.extend(self.exposed.get(&pg.pfn).into_iter().flatten().cloned());
                subjects.sort();
                subjects.dedup();
                if subjects.is_empty() {
                    return;
                }
                // The pins this page op met, each told once per story, at its time.
                for s in &subjects {
                    for h in &held {
                        if self.story(s).pins.contains(&(h.pid, h.since_ns)) {
                            continue;
                        }
                        self.pin_seen(s, h.pid, h.since_ns, &h.comm, None);
                        let step = Step {
                            ts_ns: h.since_ns,
                            what: "pin".into(),
                            text: format!(
                                "{} pinned {} page(s), {}{}{}",
                                h.func,
                                h.nr_pages,
                                flags(&h.flags),
                                path_note(&h.path),
                                if h.caller.is_empty() { String::new() } else { format!(", called by {}", h.caller) }
                            ),
                            task: format!("pid {} {}", h.pid, h.comm),
                            stack: Vec::new(),
                            pages: h.nr_pages,
                            file_pages: Vec::new(),
                            hazards: BTreeMap::new(),
                            merge_key: format!("pin {} {}", h.pid, h.since_ns),
                        };
                        self.add(s, step, &[]);
                    }
                    if held.is_empty() && pg.seen == "kernel_pin_count" {
                        let story = self.story(s);
                        if story.pins.insert((0, 0)) {
                            story.steps.push(Step {
                                ts_ns: pg.ts_ns,
                                what: "pin".into(),
                                text: "pinned before the trace, or by a pin this kernel does not show: the kernel counts the page as DMA-pinned"
                                    .into(),
                                task: "unknown".into(),
                                stack: Vec::new(),
                                pages: 0,
                                file_pages: Vec::new(),
                                hazards: BTreeMap::new(),
                                merge_key: "pin unknown".into(),
                            });
                        }
                    }
                }
                let (what, words) = op_words(op);
                let step = Step {
                    ts_ns: pg.ts_ns,
                    what: what.into(),
                    text: format!("{}: pinned page {words}", pg.func),
                    file_pages: pg.file.as_ref().and_then(|f| f.index).into_iter().collect(),
                    task: format!("pid {} {}", pg.actor.pid, pg.actor.comm),
                    stack: pg.actor.stack.clone(),
                    pages: 1,
                    hazards: counts(found),
                    merge_key: format!("{what} {} {} {}", pg.func, pg.actor.pid, pg.actor.stack.first().map(String::as_str).unwrap_or("")),
                };
                for s in &subjects {
                    if let Some(f) = &pg.file {
                        self.story(s).file.get_or_insert_with(|| f.clone());
                    }
                    self.add(s, step.clone(), found);
                    self.exposed.entry(pg.pfn).or_default().insert(s.clone());
                }
            }
            Event::Unpin(u) => {
                let mut by_subject: BTreeMap<Subject, u64> = BTreeMap::new();
                for pfn in &u.pfns {
                    if let Some(subjects) = self.exposed.get(pfn) {
                        for s in subjects {
                            *by_subject.entry(s.clone()).or_default() += 1;
                        }
                    }
                    // Released for good when no pin is left on the page.
                    if !pins.holds(*pfn) {
                        self.exposed.remove(pfn);
                    }
                }
                let how = match u.release {
                    Release::Unpin => "unpinned",
                    Release::Put => "reference put",
                    Release::Freed => "page freed",
                    Release::Gone => "released unseen (the kernel's counts dropped)",
                };
                for (s, pages) in by_subject {
                    let step = Step {
                        ts_ns: u.ts_ns,
                        what: "release".into(),
                        text: format!("{} {how}{}", u.func, if u.dirty { ", marked dirty (the device wrote into it)" } else { "" }),
                        task: format!("pid {} {}", u.pid, u.comm),
                        stack: Vec::new(),
                        pages,
                        file_pages: Vec::new(),
                        hazards: counts(found),
                        merge_key: format!("release {} {} {}", u.func, u.pid, u.dirty),
                    };
                    self.add(&s, step, found);
                }
            }
            Event::Procs(_) => {
                for h in found {
                    let Some(pid) = h.pinner_list().first().and_then(|p| p.pid) else { continue };
                    let text = match &h.limit {
                        Some(l) if h.kind == HazardKind::LongHeldPin => format!("a pin held {:.1}s, longer than the {:.1}s allowed", l.value as f64 / 1e9, l.limit as f64 / 1e9),
                        Some(l) => format!("{} of {} {}: {} bytes pinned long-term, over the limit of {}", l.rule, l.scope, l.id, l.value, l.limit),
                        None => h.kind.name().into(),
                    };
                    let step = Step {
                        ts_ns: h.ts_ns,
                        what: "limit".into(),
                        text,
                        task: format!("pid {pid} {}", h.actor.comm),
                        stack: Vec::new(),
                        pages: h.pages.unwrap_or(0),
                        file_pages: Vec::new(),
                        hazards: counts(std::slice::from_ref(h)),
                        merge_key: format!("limit {} {}", h.kind.name(), h.ts_ns),
                    };
                    self.add(&Subject::Pinner { pid }, step, std::slice::from_ref(h));
                }
            }
            _ => {}
        }
    }

    fn pin_seen(&mut self, s: &Subject, pid: u32, since: u64, comm: &str, file: Option<FileRef>) {
        let story = self.story(s);
        story.pins.insert((pid, since));
        story.pids.insert(pid);
        story.comms.insert(comm.to_string());
        if story.file.is_none() {
            story.file = file;
        }
    }

    /// The stories worth telling (a hazard in them), that the filters keep.
    pub fn select<'a>(&'a self, f: &Filter) -> Vec<&'a Story> {
        self.stories
            .values()
            .filter(|s| s.hazards > 0)
            .filter(|s| match &s.subject {
                Some(Subject::File { .. }) => f.file_matches(s.file.as_ref()),
                Some(Subject::Pinner { pid }) => f.pid_matches(*pid),
                None => false,
            })
            .filter(|s| s.comms.iter().any(|c| f.comm_matches(c)) || f.comm_matches(""))
            .filter(|s| s.steps.iter().any(|st| f.in_time(st.ts_ns)))
            .collect()
    }
}

/// 0-3,5,7-9
fn ranges(v: &[u64]) -> String {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j { v[i].to_string() } else { format!("{}-{}", v[i], v[j]) });
        i = j + 1;
    }
    out.join(",")
}

fn path_note(path: &str) -> String {
    if path.is_empty() { String::new() } else { format!(", for {path}") }
}

impl Story {
    fn sorted(&self) -> Vec<&Step> {
        let mut v: Vec<&Step> = self.steps.iter().collect();
        v.sort_by_key(|s| s.ts_ns);
        v
    }

    pub fn text(&self, f: &Filter) -> String {
        let fs = match (&self.subject, &self.file) {
            (Some(Subject::File { .. }), Some(file)) if !file.fs.is_empty() => format!(" on {}", file.fs),
            _ => String::new(),
        };
        let mut out = format!("== {}{fs}: {} hazard(s) ==\n", self.title, self.hazards);
        for s in self.sorted().into_iter().filter(|s| f.in_time(s.ts_ns)) {
            let pages = match (s.pages, s.file_pages.len()) {
                (_, 1) => format!(" (file page {})", s.file_pages[0]),
                (_, n) if n > 1 => format!(" x{} pages (file pages {})", s.pages, ranges(&s.file_pages)),
                (n, _) if n > 1 && s.what != "pin" => format!(" x{n} pages"),
                _ => String::new(),
            };
            out += &format!("  {:>12}  {:<9} {}{pages}\n", format!("+{:.6}s", f.rel_s(s.ts_ns)), s.what, s.text);
            out += &format!("  {:>12}  {:<9} by {}\n", "", "", s.task);
            for (k, n) in &s.hazards {
                out += &format!("  {:>12}  {:<9} -> {k}{}\n", "", "", if *n > 1 { format!(" x{n}") } else { String::new() });
            }
            if !s.stack.is_empty() {
                // Function names only (the JSON keeps the offsets), innermost first.
                let shown: Vec<&str> = s.stack.iter().take(8).map(|f| f.split('+').next().unwrap_or(f)).collect();
                let opts = textwrap::Options::new(100).initial_indent("                          stack: ").subsequent_indent("                                 ");
                for line in textwrap::wrap(&shown.join(" < "), opts) {
                    out += &line;
                    out.push('\n');
                }
            }
        }
        if self.more > 0 {
            out += &format!("  ... and {} more step(s)\n", self.more);
        }
        out
    }

    pub fn json(&self, f: &Filter) -> serde_json::Value {
        let steps: Vec<serde_json::Value> = self
            .sorted()
            .into_iter()
            .filter(|s| f.in_time(s.ts_ns))
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["rel_s"] = serde_json::json!(f.rel_s(s.ts_ns));
                v
            })
            .collect();
        let subject = match &self.subject {
            Some(Subject::File { dev, ino }) => serde_json::json!({"file": {"dev": dev, "ino": ino, "path": self.file.as_ref().and_then(|f| f.path.clone())}}),
            Some(Subject::Pinner { pid }) => serde_json::json!({"pinner": {"pid": pid, "comm": self.comms.iter().next()}}),
            None => serde_json::Value::Null,
        };
        serde_json::json!({"story": subject, "title": self.title, "hazards": self.hazards, "steps": steps, "more_steps": self.more})
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::Engine,
        output::filter::FilterArgs,
        trace::{Actor, KernelPins, Page, Pin, Unpin},
    };

    #[test]
    fn the_2018_sequence_reads_as_a_story() {
        let file = FileRef { dev: "254:0".into(), ino: 12, index: Some(0), fs: "ext4".into(), path: Some("/mnt/hazard".into()) };
        let page = |ts: u64, op: PageOp, pfn: u64, who: &str| {
            Event::Page(Page {
                ts_ns: ts,
                op: Some(op),
                func: "f".into(),
                pfn,
                seen: "pins".into(),
                actor: Actor { pid: 7, tid: 7, comm: who.into(), stack: vec!["page_mkclean_one".into(), "__x64_sys_msync".into()] },
                file: Some(FileRef { path: None, index: Some(pfn - 100), ..file.clone() }),
                kernel_pins: KernelPins::default(),
                ..Default::default()
            })
        };
        let events = vec![
            Event::Pin(Pin { ts_ns: 1_000, pid: 7, comm: "dio".into(), func: "pin_user_pages_fast".into(), flags: vec![Flag::Pin, Flag::Write], pfns: vec![100, 101], nr_pages: 2, file_pages: 2, file: Some(file.clone()), path: "direct I/O".into(), ..Default::default() }),
            page(2_000, PageOp::Mkclean, 100, "msync"),
            page(3_000, PageOp::Mkclean, 101, "msync"),
            page(900_000_000, PageOp::Truncate, 100, "truncate"),
            Event::Unpin(Unpin { ts_ns: 2_000_000_000, pid: 0, tid: 0, comm: "swapper".into(), func: "unpin_user_folio".into(), release: Release::Unpin, dirty: true, pfns: vec![100, 101] }),
        ];
        let mut engine = Engine::default();
        let mut stories = Stories::default();
        for e in &events {
            let found = engine.apply(e);
            stories.observe(&engine.pins, e, &found);
        }
        let mut filter = Filter::new(&FilterArgs::default());
        events.iter().for_each(|e| filter.observe(e));
        let told = stories.select(&filter);
        assert_eq!(told.len(), 2, "one story for the file, one for the pinner");
        let text = told.iter().map(|s| s.text(&filter)).collect::<String>();
        let file_story = told.iter().find(|s| matches!(s.subject, Some(Subject::File { .. }))).unwrap().text(&filter);
        let order: Vec<&str> = file_story.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|w| ["pin", "mkclean", "truncate", "release"].contains(w)).collect();
        assert_eq!(order, vec!["pin", "mkclean", "truncate", "release"], "{file_story}");
        assert!(file_story.contains("/mnt/hazard"), "{file_story}");
        assert!(file_story.contains("x2 pages (file pages 0-1)"), "the two mkcleans are one step: {file_story}");
        assert!(file_story.contains("mkclean_while_pinned (critical) x2"), "{file_story}");
        assert!(file_story.contains("dirty_after_unmap"), "{file_story}");
        assert!(text.contains("stack: page_mkclean_one < __x64_sys_msync"), "{text}");
        assert_eq!(ranges(&[7, 0, 1, 2, 5, 9, 8]), "0-2,5,7-9");
        // The pid filter keeps the pinner's story; another pid keeps none.
        let f = Filter::new(&FilterArgs { pids: vec![8], ..Default::default() });
        assert!(stories.select(&f).iter().all(|s| !matches!(s.subject, Some(Subject::Pinner { .. }))));
    }
}
