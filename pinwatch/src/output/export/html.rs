//! The timeline as one self-contained HTML page (no network): processes over time, each
//! pin a bar, each hazard a marker with its details on hover, and the table of hazards.
//! Drawn as inline SVG, so a browser shows it without running anything; a few lines of
//! script only fill the details panel.

use std::io::Write;

use anyhow::Result;
use html_escape::{encode_double_quoted_attribute as attr, encode_text as text};

use super::timeline::Timeline;
use crate::trace::Severity;

const LEFT: f64 = 190.0;
const PLOT: f64 = 1000.0;
const ROW: f64 = 16.0;
const TOP: f64 = 30.0;

fn color(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "#d62728",
        Severity::Warning => "#ff7f0e",
        Severity::Info => "#7f7f7f",
    }
}

pub fn write(t: &Timeline, out: &mut dyn Write) -> Result<()> {
    let span = t.t1.saturating_sub(t.t0).max(1) as f64;
    let x = |ts: u64| LEFT + PLOT * (ts.saturating_sub(t.t0) as f64 / span);
    // Rows: per process, a label row, then its lanes.
    let mut row_of_lane = std::collections::HashMap::new();
    let mut rows: Vec<(f64, String)> = Vec::new();
    let mut y = TOP;
    for p in t.processes.values() {
        rows.push((y, format!("{} ({})", p.comm, p.pid)));
        for lane in 0..p.lanes.max(1) {
            row_of_lane.insert((p.pid, lane), y);
            y += ROW;
        }
        y += 4.0;
    }
    let other_row = y;
    let height = other_row + ROW + 30.0;
    let width = LEFT + PLOT + 20.0;
    let critical = t.marks.iter().filter(|m| m.hazard.severity == Severity::Critical).count();

    writeln!(out, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>pinwatch timeline</title>")?;
    writeln!(
        out,
        "<style>body{{font:13px sans-serif;margin:16px;color:#222}}svg{{background:#fafafa;border:1px solid #ddd}}\
         .pin{{fill:#4c78a8;opacity:.8}}.pin.longterm{{fill:#54a24b}}.pin.held{{stroke:#222;stroke-dasharray:3 2}}\
         .hazard{{stroke:#000;stroke-width:.5;cursor:pointer}}.hazard:hover,.pin:hover{{stroke:#000;stroke-width:2}}\
         table{{border-collapse:collapse;margin-top:12px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}}\
         #details{{white-space:pre-wrap;font-family:monospace;background:#fff8dc;border:1px solid #ccc;padding:6px;min-height:3em}}\
         .critical{{color:#d62728;font-weight:bold}}.warning{{color:#ff7f0e}}</style></head><body>"
    )?;
    writeln!(
        out,
        "<h1>pinwatch timeline</h1><p>kernel {} &middot; {:.3} s &middot; {} pin(s) &middot; <span id=\"hazard-count\">{}</span> hazard(s), {} critical{}</p>",
        text(&t.kernel),
        span / 1e9,
        t.bars.len(),
        t.marks.len(),
        critical,
        if t.mismatched > 0 { " &middot; <b>the trace's recorded hazards differ from the replay</b>" } else { "" }
    )?;
    writeln!(out, "<div id=\"details\">Point at a pin or a hazard for its details.</div>")?;
    writeln!(out, "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\">")?;
    // Time axis: ten ticks.
    for i in 0..=10 {
        let tx = LEFT + PLOT * i as f64 / 10.0;
        writeln!(
            out,
            "<line x1=\"{tx:.1}\" y1=\"{}\" x2=\"{tx:.1}\" y2=\"{:.1}\" stroke=\"#e0e0e0\"/><text x=\"{tx:.1}\" y=\"14\" font-size=\"10\" text-anchor=\"middle\">{:.3}s</text>",
            TOP - 8.0,
            height - 20.0,
            span / 1e9 * i as f64 / 10.0
        )?;
    }
    for (ry, label) in &rows {
        writeln!(out, "<text x=\"4\" y=\"{:.1}\" font-size=\"11\">{}</text>", ry + ROW - 4.0, text(label))?;
    }
    writeln!(out, "<text x=\"4\" y=\"{:.1}\" font-size=\"11\">other pins (kernel count)</text>", other_row + ROW - 4.0)?;
    for b in &t.bars {
        let ry = row_of_lane.get(&(b.pid, b.lane)).copied().unwrap_or(other_row);
        let x0 = x(b.start);
        let x1 = x(b.end.unwrap_or(t.t1)).max(x0 + 1.5);
        let longterm = b.flags.contains(&crate::trace::Flag::Longterm);
        let details = format!(
            "pin: {} {} page(s) by {} ({}) tid {}\nflags {:?}\npath {} caller {}\nfile {}\nfrom +{:.6}s to {}",
            b.func,
            b.pages,
            b.comm,
            b.pid,
            b.tid,
            b.flags,
            b.path,
            b.caller,
            b.file.as_deref().unwrap_or("-"),
            t.seconds(b.start),
            b.end.map(|e| format!("+{:.6}s", t.seconds(e))).unwrap_or_else(|| "still held at the end".into())
        );
        writeln!(
            out,
            "<rect class=\"pin{}{}\" x=\"{x0:.2}\" y=\"{:.1}\" width=\"{:.2}\" height=\"{:.1}\" data-details=\"{}\"><title>{}</title></rect>",
            if longterm { " longterm" } else { "" },
            if b.end.is_none() { " held" } else { "" },
            ry + 2.0,
            x1 - x0,
            ROW - 4.0,
            attr(&details),
            text(&details)
        )?;
    }
    for (i, m) in t.marks.iter().enumerate() {
        let h = &m.hazard;
        let ry = m.bar.and_then(|b| t.bars.get(b)).and_then(|b| row_of_lane.get(&(b.pid, b.lane)).copied()).unwrap_or(other_row);
        let (cx, cy) = (x(h.ts_ns), ry + ROW / 2.0);
        let details = format!(
            "hazard {i}: {} ({})\nat +{:.6}s by {} {} in {}\npinner {}\npfn {} file {}\n{}{}",
            h.kind.name(),
            h.severity.name(),
            t.seconds(h.ts_ns),
            h.actor.pid,
            h.actor.comm,
            h.func,
            h.pinner_summary(),
            h.pfn.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            h.file.as_ref().map(|f| format!("{} ino {} index {}", f.dev, f.ino, f.index.map(|i| i.to_string()).unwrap_or_default())).unwrap_or_else(|| "-".into()),
            h.limit.as_ref().map(|l| format!("limit {} {} {}: {} > {}\n", l.rule, l.scope, l.id, l.value, l.limit)).unwrap_or_default(),
            if h.actor.stack.is_empty() { String::new() } else { format!("stack:\n  {}", h.actor.stack.iter().take(12).cloned().collect::<Vec<_>>().join("\n  ")) }
        );
        writeln!(
            out,
            "<path class=\"hazard\" data-kind=\"{}\" data-severity=\"{}\" d=\"M{cx:.2} {:.2} l5 5 l-5 5 l-5 -5 z\" fill=\"{}\" data-details=\"{}\"><title>{}</title></path>",
            h.kind.name(),
            h.severity.name(),
            cy - 5.0,
            color(h.severity),
            attr(&details),
            text(&details)
        )?;
    }
    writeln!(out, "</svg>")?;
    writeln!(out, "<h2>Hazards</h2><table id=\"hazards\"><tr><th>#</th><th>time</th><th>kind</th><th>severity</th><th>pinner</th><th>actor</th><th>function</th><th>pfn</th><th>file</th></tr>")?;
    for (i, m) in t.marks.iter().enumerate() {
        let h = &m.hazard;
        writeln!(
            out,
            "<tr class=\"hazard-row\"><td>{i}</td><td>+{:.6}s</td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            t.seconds(h.ts_ns),
            h.kind.name(),
            h.severity.name(),
            h.severity.name(),
            text(&h.pinner_summary()),
            h.actor.pid,
            text(&h.actor.comm),
            text(&h.func),
            h.pfn.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            h.file.as_ref().map(|f| format!("{} ino {}", f.dev, f.ino)).unwrap_or_else(|| "-".into())
        )?;
    }
    writeln!(out, "</table>")?;
    writeln!(
        out,
        "<script>document.getElementById('timeline').addEventListener('mouseover',function(e){{var d=e.target.getAttribute('data-details');\
         if(d){{document.getElementById('details').textContent=d;}}}});</script></body></html>"
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{export::timeline::tests::{build, sample}, filter::FilterArgs};

    #[test]
    fn one_marker_and_one_row_per_hazard_nothing_fetched() {
        let t = build(&sample(), FilterArgs::default());
        let mut buf = Vec::new();
        write(&t, &mut buf).unwrap();
        let page = String::from_utf8(buf).unwrap();
        assert_eq!(page.matches("class=\"hazard\"").count(), t.marks.len());
        assert_eq!(page.matches("class=\"hazard-row\"").count(), t.marks.len());
        assert_eq!(page.matches("<rect class=\"pin").count(), 2);
        assert!(!page.contains("http://") || page.matches("http://").count() == 1, "only the SVG namespace");
        assert!(!page.contains("https://") && !page.contains("src="), "the page loads nothing");
        assert!(page.contains("truncate_while_pinned") && page.contains("still held at the end"));
    }
}
