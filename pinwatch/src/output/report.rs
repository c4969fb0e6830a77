//! `pinwatch report TRACE`: a recorded trace replayed through the same engine as a live
//! run, for whoever reads it after an incident. The hazards (limit breaches included)
//! are derived again from the raw events and compared, as they stream by, with those
//! the recording wrote: a difference means the trace was edited or written by another
//! pinwatch. Filters narrow what is shown; `--story` tells what happened to each file
//! and pinner, in order.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::{
    doctor::Format,
    filter::{Filter, FilterArgs},
    story::Stories,
};
use crate::{
    engine::replay::Replay,
    trace::{self, Event, Hazard},
};

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when the replay derives exactly the hazards the trace records; 1 when they \
differ (an edited or cut trace, or one written by another version) or when lines were damaged; 2 on an error \
(a missing file, or a trace newer than this pinwatch).")]
pub struct ReportArgs {
    /// A trace written by `pinwatch record` (plain or .zst); `-` reads standard input.
    pub trace: PathBuf,
    /// text: a summary table (and stories); json: one JSON object per line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// The older spelling of `--format json`.
    #[arg(long, hide = true)]
    pub json: bool,
    /// Tell the story of each file and each pinner: the pin, then each mkclean,
    /// writeback, unmap, truncate and dirtying of its pages, then the release.
    #[arg(long)]
    pub story: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// (kind, severity, pinner, actor)
type RowKey = (String, String, String, String);

/// The summary table's rows: their key -> (count, pfns).
#[derive(Default)]
struct Summary {
    rows: BTreeMap<RowKey, (u64, BTreeSet<u64>)>,
    shown: u64,
}

impl Summary {
    fn add(&mut self, h: &Hazard) {
        let key = (h.kind.name().to_string(), h.severity.name().to_string(), h.pinner_summary(), h.actor.comm.clone());
        let e = self.rows.entry(key).or_default();
        e.0 += 1;
        e.1.extend(h.pfn);
        self.shown += 1;
    }
}

pub fn run(args: ReportArgs) -> Result<i32> {
    let json = args.json || args.format == Format::Json;
    let mut reader = trace::open(&args.trace)?;
    let mut filter = Filter::new(&args.filter);
    let mut replay = Replay::default();
    let mut summary = Summary::default();
    let mut stories = args.story.then(Stories::default);
    for e in reader.by_ref() {
        let e = e?;
        filter.observe(&e);
        let found = replay.feed(&e);
        if let Some(st) = stories.as_mut() {
            st.observe(&replay.engine.pins, &e, &found);
        }
        for h in found.iter().filter(|h| filter.keeps(h)) {
            if json && !args.story {
                println!("{}", serde_json::to_string(&Event::Hazard(h.clone()))?);
            }
            summary.add(h);
        }
    }
    replay.finish();
    let name = args.trace.display();
    for p in &reader.problems {
        eprintln!("pinwatch: {name}: {p}");
    }
    if let Some(s) = reader.summary() {
        eprintln!("pinwatch: {name}: {s}; everything else is reported");
    }
    if let Some(st) = &stories {
        let selected = st.select(&filter);
        if json {
            for s in selected {
                println!("{}", serde_json::to_string(&s.json(&filter))?);
            }
        } else {
            print_summary(&replay, &summary, &filter);
            for s in selected {
                print!("\n{}", s.text(&filter));
            }
        }
    } else if !json {
        print_summary(&replay, &summary, &filter);
    }
    if replay.mismatched > 0 {
        eprintln!(
            "pinwatch: the replay derives {} hazard(s) where the trace records {} ({} differ): it was edited, cut short, or written by another version",
            replay.derived, replay.recorded, replay.mismatched
        );
        return Ok(1);
    }
    Ok(if reader.skipped > 0 || reader.cut_short { 1 } else { 0 })
}

fn print_summary(r: &Replay, s: &Summary, filter: &Filter) {
    if let Some(st) = &r.start {
        println!("kernel {} (pinwatch {}), mode {}", st.kernel, st.version, if st.mode.is_empty() { "full" } else { &st.mode });
        if !st.blind.is_empty() {
            println!("this trace cannot show: {}", st.blind.join(", "));
        }
    }
    if r.lost_records > 0 {
        println!("WARNING: {} record(s) or page(s) were lost while recording: hazards may be missing", r.lost_records);
    }
    if r.lost_stacks > 0 {
        println!("note: {} kernel stack(s) could not be walked: some pins or hazards come without one", r.lost_stacks);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["HAZARD", "SEVERITY", "PINNER", "ACTOR", "COUNT", "PAGES"]);
    for ((kind, sev, pinner, actor), (n, pfns)) in &s.rows {
        t.add_row([kind.clone(), sev.clone(), pinner.clone(), actor.clone(), n.to_string(), pfns.len().to_string()]);
    }
    let of = if filter.is_empty() { String::new() } else { format!(" (of {} in the trace, filtered)", r.derived) };
    println!("{} hazard(s){of}\n{t}", s.shown);
}

/// Every hazard a trace holds, derived again, with the filters applied; for export and
/// the tests.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        engine::{replay::hazards_of, Engine},
        output::filter::parse_kind,
        trace::{Actor, Flag, HazardKind, KernelPins, KernelProc, LimitRules, Page, PageOp, Pin, ProcFigures, Procs, Release, Start, Unpin},
    };

    /// What record writes: each event, then the hazards it revealed.
    fn recorded(raw: &[Event]) -> Vec<Event> {
        let mut live = Engine::default();
        let mut written = Vec::new();
        for e in raw {
            let hs = live.apply(e);
            written.push(e.clone());
            written.extend(hs.into_iter().map(Event::Hazard));
        }
        written
    }

    fn raw() -> Vec<Event> {
        vec![
            Event::Start(Start { format: trace::FORMAT.into(), limits: Some(LimitRules { memlock: true, ..Default::default() }), ..Default::default() }),
            Event::Pin(Pin { pid: 5, ts_ns: 1, flags: vec![Flag::Pin, Flag::Write, Flag::Longterm], pfns: vec![1], nr_pages: 1, ..Default::default() }),
            Event::Page(Page { ts_ns: 2, op: Some(PageOp::Truncate), pfn: 1, seen: "pins".into(), actor: Actor::default(), kernel_pins: KernelPins::default(), ..Default::default() }),
            // The kernel says pid 5 may lock 0 bytes: the memlock rule breaks.
            Event::Procs(Procs { ts_ns: 3, procs: vec![ProcFigures { pid: 5, kernel: KernelProc { vmpin_bytes: 4096, vmlck_bytes: 0, memlock_limit_bytes: Some(0) } }] }),
            Event::Unpin(Unpin { ts_ns: 9, pid: 0, tid: 0, comm: String::new(), func: String::new(), release: Release::Unpin, dirty: true, pfns: vec![1] }),
        ]
    }

    #[test]
    fn replay_derives_what_a_live_run_wrote_limits_included() {
        let written = recorded(&raw());
        let (derived, rec) = hazards_of(&written);
        let kinds: Vec<HazardKind> = derived.iter().map(|h| h.kind).collect();
        assert_eq!(kinds, vec![HazardKind::TruncateWhilePinned, HazardKind::PinLimitExceeded, HazardKind::DirtyAfterUnmap]);
        assert_eq!(derived, rec);
        let mut r = Replay::default();
        written.iter().for_each(|e| {
            r.feed(e);
        });
        r.finish();
        assert_eq!((r.derived, r.recorded, r.mismatched), (3, 3, 0));
        // A trace with a hazard removed no longer matches.
        let cut: Vec<Event> = written.iter().filter(|e| !matches!(e, Event::Hazard(h) if h.ts_ns == 9)).cloned().collect();
        let mut r = Replay::default();
        cut.iter().for_each(|e| {
            r.feed(e);
        });
        r.finish();
        assert_eq!(r.mismatched, 1);
        // Nor does one with a hazard added.
        let mut added = written.clone();
        added.insert(2, written.iter().find(|e| matches!(e, Event::Hazard(_))).unwrap().clone());
        let mut r = Replay::default();
        added.iter().for_each(|e| {
            r.feed(e);
        });
        r.finish();
        assert!(r.mismatched > 0);
    }

    #[test]
    fn filters_narrow_hazards() {
        let written = recorded(&raw());
        let (derived, _) = hazards_of(&written);
        let keep = |f: FilterArgs| -> Vec<HazardKind> {
            let mut filter = Filter::new(&f);
            written.iter().for_each(|e| filter.observe(e));
            derived.iter().filter(|h| filter.keeps(h)).map(|h| h.kind).collect()
        };
        assert_eq!(keep(FilterArgs::default()).len(), 3);
        assert_eq!(keep(FilterArgs { kinds: vec![HazardKind::DirtyAfterUnmap], ..Default::default() }), vec![HazardKind::DirtyAfterUnmap]);
        assert_eq!(keep(FilterArgs { pids: vec![5], ..Default::default() }).len(), 3);
        assert!(keep(FilterArgs { pids: vec![6], ..Default::default() }).is_empty());
        assert_eq!(keep(FilterArgs { until: Some(Duration::from_nanos(1)), ..Default::default() }), vec![HazardKind::TruncateWhilePinned]);
        assert!(keep(FilterArgs { file: Some("1:2:3".into()), ..Default::default() }).is_empty());
        assert!(parse_kind("nope").unwrap_err().contains("truncate_while_pinned"));
    }
}
