//! The trace format: one JSON object per line, tagged by "event". The same types are
//! what the engine consumes, whether they come from the kernel or from a file, so a
//! recorded trace replays exactly like a live run. Field names are a contract.

use std::io::{BufRead, Write};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flag {
    /// FOLL_PIN: pin_user_pages*() and friends.
    #[serde(rename = "PIN")]
    Pin,
    /// FOLL_GET: a plain page reference (get_user_pages*()).
    #[serde(rename = "GET")]
    Get,
    #[serde(rename = "LONGTERM")]
    Longterm,
    #[serde(rename = "WRITE")]
    Write,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start(Start),
    Pin(Pin),
    Unpin(Unpin),
    Lost(Lost),
    Stop(Stop),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Start {
    pub version: String,
    pub kernel: String,
    /// role -> "symbol via attach type" for every hook that is attached.
    pub hooks: Vec<String>,
}

/// A GUP call that returned: what it took, or its errno.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Pin {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub func: String,
    pub flags: Vec<Flag>,
    pub gup_flags: u32,
    /// Pages taken (the call's return value), 0 when it failed.
    pub nr_pages: u64,
    pub nr_requested: u64,
    pub start: u64,
    pub end: u64,
    /// Folio head pfn of each page taken, in order.
    pub pfns: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<i32>,
    /// More pages were taken than the kernel side sends pfns for.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// Some chunks of this call were lost (ring buffer full).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Release {
    /// A FOLL_PIN reference dropped by the unpin family.
    Unpin,
    /// A FOLL_GET reference dropped where pinwatch can see it (bio, pipe buffer).
    Put,
    /// The page was freed: no reference of any kind is left.
    Freed,
}

/// References dropped on pages pinwatch saw being taken. `pid` is the task that ran the
/// release, which for I/O completions can be any task: match pins by pfn, not pid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Unpin {
    pub ts_ns: u64,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub func: String,
    pub release: Release,
    pub dirty: bool,
    pub pfns: Vec<u64>,
}

/// Records the kernel side could not deliver or keep.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Lost {
    pub ts_ns: u64,
    pub count: u64,
    pub reason: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Stop {
    pub ts_ns: u64,
    pub lost_total: u64,
    /// Pins still held when recording stopped, per process.
    pub held: Vec<Held>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Held {
    pub pid: u32,
    pub comm: String,
    pub pages: u64,
}

pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Self {
        Writer { out }
    }

    pub fn write(&mut self, event: &Event) -> Result<()> {
        serde_json::to_writer(&mut self.out, event)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }
}

/// Reads a trace (for replaying a recording through the engine; the report mode is
/// the next user). A malformed line is an error naming its line number; a last line cut
/// short (a crash mid-write) is reported as such, and everything before it is kept.
#[allow(dead_code)]
pub fn read_trace(input: impl BufRead) -> Result<(Vec<Event>, Option<String>)> {
    let mut events = Vec::new();
    let lines: Vec<String> = input.lines().collect::<std::io::Result<_>>().context("reading trace")?;
    let last = lines.len();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(line) {
            Ok(e) => events.push(e),
            Err(err) if i + 1 == last && err.is_eof() => {
                return Ok((events, Some(format!("line {} is truncated: {err}", i + 1))));
            }
            Err(err) => anyhow::bail!("line {} is not a pinwatch trace event: {err}", i + 1),
        }
    }
    Ok((events, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_line_has_contract_fields() {
        let e = Event::Pin(Pin {
            pid: 7,
            func: "pin_user_pages_fast".into(),
            flags: vec![Flag::Pin, Flag::Write],
            nr_pages: 2,
            pfns: vec![10, 11],
            ..Default::default()
        });
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "pin");
        assert_eq!(v["pid"], 7);
        assert_eq!(v["flags"], serde_json::json!(["PIN", "WRITE"]));
        assert_eq!(v["pfns"], serde_json::json!([10, 11]));
        assert_eq!(v["nr_pages"], 2);
        for k in ["ts_ns", "tid", "comm", "func"] {
            assert!(v.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn truncated_last_line_keeps_the_rest() {
        let good = serde_json::to_string(&Event::Lost(Lost { ts_ns: 1, count: 3, reason: "x".into() })).unwrap();
        let text = format!("{good}\n{}", &good[..good.len() / 2]);
        let (events, warn) = read_trace(text.as_bytes()).unwrap();
        assert_eq!(events.len(), 1);
        assert!(warn.unwrap().contains("line 2"));
    }

    #[test]
    fn malformed_middle_line_is_an_error_with_its_number() {
        let good = serde_json::to_string(&Event::Lost(Lost { ts_ns: 1, count: 3, reason: "x".into() })).unwrap();
        let text = format!("{good}\n{{\"event\":\"nope\"}}\n{good}\n");
        let err = read_trace(text.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
