//! The timeline as Chrome trace-event JSON, which Perfetto's UI (ui.perfetto.dev) and
//! chrome://tracing open: a process per pinner, a track per lane of pins (each GUP call
//! a slice from pin to release), hazards as slices on the task that did them, a flow
//! arrow from each pin to the hazards it collided with, pinned bytes as a counter.

use std::io::Write;

use anyhow::Result;
use serde_json::{json, Value};

use super::timeline::Timeline;
use crate::trace::Flag;

/// Synthetic thread ids for lanes: pid * LANE_IDS + lane (lanes past that share the last).
const LANE_IDS: i64 = 1000;
/// The process that holds hazards of tasks not otherwise drawn (pid 0: the kernel).
const KERNEL_PID: u32 = 0;

fn us(t: &Timeline, ts: u64) -> f64 {
    ts.saturating_sub(t.t0) as f64 / 1000.0
}

fn flags(f: &[Flag]) -> String {
    f.iter().map(|x| format!("{x:?}").to_uppercase()).collect::<Vec<_>>().join("|")
}

/// Every trace event, in order; each is one element of the traceEvents array.
pub fn events(t: &Timeline) -> Vec<Value> {
    let mut out = Vec::new();
    for p in t.processes.values() {
        out.push(json!({"ph": "M", "name": "process_name", "pid": p.pid, "args": {"name": format!("{} ({})", p.comm, p.pid)}}));
        for lane in 0..p.lanes.min(LANE_IDS as usize) {
            out.push(json!({"ph": "M", "name": "thread_name", "pid": p.pid, "tid": p.pid as i64 * LANE_IDS + lane as i64, "args": {"name": format!("pins, lane {lane}")}}));
        }
        for (ts, bytes) in &p.pinned {
            out.push(json!({"ph": "C", "name": "pinned bytes", "pid": p.pid, "ts": us(t, *ts), "args": {"bytes": bytes}}));
        }
    }
    out.push(json!({"ph": "M", "name": "process_name", "pid": KERNEL_PID, "args": {"name": "tasks that met pinned pages"}}));
    for (i, b) in t.bars.iter().enumerate() {
        let end = b.end.unwrap_or(t.t1);
        let name = format!("{} {} page(s){}", b.func, b.pages, if b.path.is_empty() { String::new() } else { format!(" ({})", b.path) });
        out.push(json!({
            "ph": "X", "cat": "pin", "name": name, "pid": b.pid,
            "tid": b.pid as i64 * LANE_IDS + b.lane.min(LANE_IDS as usize - 1) as i64,
            "ts": us(t, b.start), "dur": (us(t, end) - us(t, b.start)).max(0.001),
            "args": {"pin": i, "comm": b.comm, "tid": b.tid, "flags": flags(&b.flags), "caller": b.caller, "path": b.path,
                     "file": b.file, "still_held": b.end.is_none()},
        }));
    }
    for (i, m) in t.marks.iter().enumerate() {
        let h = &m.hazard;
        // On the task that did it, a process of its own unless it is a pinner.
        let (pid, tid) = if h.actor.pid != 0 { (h.actor.pid, h.actor.tid.max(h.actor.pid)) } else { (KERNEL_PID, 0) };
        let ts = us(t, h.ts_ns);
        out.push(json!({
            "ph": "X", "cat": "hazard", "name": h.kind.name(), "pid": pid, "tid": tid as i64, "ts": ts, "dur": 1.0,
            "args": {"hazard": i, "severity": h.severity.name(), "pfn": h.pfn, "pinner": h.pinner_summary(), "actor": format!("{} {}", h.actor.pid, h.actor.comm),
                     "func": h.func, "file": h.file.as_ref().map(|f| format!("{} ino {} index {:?}", f.dev, f.ino, f.index)),
                     "stack": h.actor.stack.iter().take(12).collect::<Vec<_>>(), "limit": h.limit},
        }));
        if let Some(b) = m.bar.and_then(|b| t.bars.get(b)) {
            let bar_tid = b.pid as i64 * LANE_IDS + b.lane.min(LANE_IDS as usize - 1) as i64;
            out.push(json!({"ph": "s", "cat": "collision", "name": "pin -> hazard", "id": i, "pid": b.pid, "tid": bar_tid, "ts": us(t, b.start)}));
            out.push(json!({"ph": "f", "bp": "e", "cat": "collision", "name": "pin -> hazard", "id": i, "pid": pid, "tid": tid as i64, "ts": ts}));
        }
    }
    for (pid, comm) in t.marks.iter().filter(|m| m.hazard.actor.pid != 0).map(|m| (m.hazard.actor.pid, &m.hazard.actor.comm)) {
        if !t.processes.contains_key(&pid) {
            out.push(json!({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": format!("{comm} ({pid})")}}));
        }
    }
    out
}

pub fn write(t: &Timeline, out: &mut dyn Write) -> Result<()> {
    out.write_all(b"{\"displayTimeUnit\":\"ms\",\"otherData\":")?;
    serde_json::to_writer(&mut *out, &json!({"kernel": t.kernel, "source": "pinwatch export"}))?;
    out.write_all(b",\"traceEvents\":[\n")?;
    for (i, e) in events(t).iter().enumerate() {
        if i > 0 {
            out.write_all(b",\n")?;
        }
        serde_json::to_writer(&mut *out, e)?;
    }
    out.write_all(b"\n]}\n")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::{export::timeline::tests::{build, sample}, filter::FilterArgs};

    #[test]
    fn a_valid_trace_event_file_with_flows() {
        let t = build(&sample(), FilterArgs::default());
        let mut buf = Vec::new();
        write(&t, &mut buf).unwrap();
        let v: Value = serde_json::from_slice(&buf).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        let count = |cat: &str| ev.iter().filter(|e| e["cat"] == cat).count();
        assert_eq!(count("pin"), 2);
        assert_eq!(count("hazard"), 2);
        // Each flow starts on a pin slice and ends at its hazard.
        let starts: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "s").collect();
        let ends: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "f").collect();
        assert_eq!(starts.len(), 2);
        assert_eq!(ends.len(), 2);
        for s in starts {
            let pin = ev.iter().find(|e| e["cat"] == "pin" && e["tid"] == s["tid"] && e["ts"] == s["ts"]);
            assert!(pin.is_some(), "flow {s} does not start on a pin slice");
            assert!(ends.iter().any(|f| f["id"] == s["id"]));
        }
        // Every slice has a time and a duration; counters carry bytes.
        assert!(ev.iter().filter(|e| e["ph"] == "X").all(|e| e["ts"].is_number() && e["dur"].as_f64().unwrap() > 0.0));
        assert!(ev.iter().any(|e| e["ph"] == "C" && e["args"]["bytes"] == 8192));
    }
}
