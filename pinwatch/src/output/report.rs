//! `pinwatch report TRACE`: a recorded trace replayed through the same engine as a live
//! run, for whoever reads it after an incident. The hazards are derived again from the
//! raw pin, unpin and page events, and compared with those the recording wrote: a
//! difference means the trace was edited or written by another pinwatch.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};

use super::doctor::Format;
use crate::{
    engine::Engine,
    trace::{read_trace, Event, Hazard},
};

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when the replay derives exactly the hazards the trace records; 1 when they \
differ (an edited or cut trace, or one written by another version); 2 on an error (a missing or malformed trace).")]
pub struct ReportArgs {
    /// A trace written by `pinwatch record`; `-` reads standard input.
    pub trace: PathBuf,
    /// text: a summary table; json: every hazard as a JSON line.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// The older spelling of `--format json`.
    #[arg(long, hide = true)]
    pub json: bool,
}

/// Replays `events`; returns the hazards derived and those the trace itself carries.
pub fn replay(events: &[Event]) -> (Vec<Hazard>, Vec<Hazard>) {
    let mut engine = Engine::default();
    let mut derived = Vec::new();
    let mut recorded = Vec::new();
    for e in events {
        match e {
            Event::Hazard(h) => recorded.push(h.clone()),
            e => derived.extend(engine.apply(e)),
        }
    }
    (derived, recorded)
}

pub fn run(args: ReportArgs) -> Result<i32> {
    let input: Box<dyn BufRead> = if args.trace.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(BufReader::new(File::open(&args.trace).with_context(|| format!("opening {}", args.trace.display()))?))
    };
    let (events, warning) = read_trace(input).with_context(|| format!("reading {}", args.trace.display()))?;
    if let Some(w) = &warning {
        eprintln!("pinwatch: {}: {w}; the events before it are reported", args.trace.display());
    }
    let (derived, recorded) = replay(&events);
    if args.json || args.format == Format::Json {
        for h in &derived {
            println!("{}", serde_json::to_string(&Event::Hazard(h.clone()))?);
        }
    } else {
        print_summary(&events, &derived);
    }
    if derived != recorded {
        eprintln!(
            "pinwatch: the replay derives {} hazard(s) where the trace records {}: it was edited, cut short, or written by another version",
            derived.len(),
            recorded.len()
        );
        return Ok(1);
    }
    Ok(0)
}

fn print_summary(events: &[Event], hazards: &[Hazard]) {
    if let Some(Event::Start(s)) = events.first() {
        println!("kernel {} (pinwatch {}), mode {}", s.kernel, s.version, if s.mode.is_empty() { "full" } else { &s.mode });
        if !s.blind.is_empty() {
            println!("this trace cannot show: {}", s.blind.join(", "));
        }
    }
    // A lost stack leaves its record whole; every other reason loses what a record held.
    let lost = |stacks: bool| -> u64 { events.iter().filter_map(|e| if let Event::Lost(l) = e { Some(l) } else { None }).filter(|l| (l.reason == "stack_lost") == stacks).map(|l| l.count).sum() };
    if lost(false) > 0 {
        println!("WARNING: {} record(s) or page(s) were lost while recording: hazards may be missing", lost(false));
    }
    if lost(true) > 0 {
        println!("note: {} kernel stack(s) could not be walked: some pins or hazards come without one", lost(true));
    }
    // (kind, severity, pinner pid, pinner comm, actor comm) -> (count, pfns)
    type Key = (String, String, String, String);
    let mut rows: BTreeMap<Key, (u64, std::collections::BTreeSet<u64>)> = BTreeMap::new();
    for h in hazards {
        let pinner = h.pinner_summary();
        let key = (h.kind.name().to_string(), format!("{:?}", h.severity).to_lowercase(), pinner, h.actor.comm.clone());
        let e = rows.entry(key).or_default();
        e.0 += 1;
        e.1.extend(h.pfn);
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["HAZARD", "SEVERITY", "PINNER", "ACTOR", "COUNT", "PAGES"]);
    for ((kind, sev, pinner, actor), (n, pfns)) in &rows {
        t.add_row([kind.clone(), sev.clone(), pinner.clone(), actor.clone(), n.to_string(), pfns.len().to_string()]);
    }
    println!("{} hazard(s)\n{t}", hazards.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Actor, Flag, KernelPins, Page, PageOp, Pin, Release, Unpin};

    #[test]
    fn replay_derives_what_a_live_run_wrote() {
        let raw = vec![
            Event::Pin(Pin { pid: 5, flags: vec![Flag::Pin, Flag::Write], pfns: vec![1], nr_pages: 1, ..Default::default() }),
            Event::Page(Page { op: Some(PageOp::Truncate), pfn: 1, seen: "pins".into(), actor: Actor::default(), kernel_pins: KernelPins::default(), ..Default::default() }),
            Event::Unpin(Unpin { ts_ns: 9, pid: 0, tid: 0, comm: String::new(), func: String::new(), release: Release::Unpin, dirty: true, pfns: vec![1] }),
        ];
        // What record writes: each event, then the hazards it revealed.
        let mut live = Engine::default();
        let mut written = Vec::new();
        for e in &raw {
            let hs = live.apply(e);
            written.push(e.clone());
            written.extend(hs.into_iter().map(Event::Hazard));
        }
        let (derived, recorded) = replay(&written);
        assert_eq!(derived.len(), 2);
        assert_eq!(derived, recorded);
        // A trace with a hazard removed no longer matches.
        let cut: Vec<Event> = written.iter().filter(|e| !matches!(e, Event::Hazard(h) if h.ts_ns == 9)).cloned().collect();
        let (d, r) = replay(&cut);
        assert_ne!(d, r);
    }
}
