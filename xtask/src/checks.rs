//! What each scenario must show in pinwatch's trace, kernel by kernel. Exact values:
//! the pinning function, the flags, the page count, and how every page is released.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use crate::lab::Recorded;

/// (major, minor) from a release string like 6.12.117+deb13-cloud-amd64.
pub fn version(release: &str) -> (u32, u32) {
    let mut it = release.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0))
}

pub struct Expect {
    pub func: &'static str,
    pub flags: &'static [&'static str],
    /// How the scenario's references must come back: "unpin" for FOLL_PIN, "put" for
    /// FOLL_GET references dropped where pinwatch can see it.
    pub release: &'static str,
}

/// None: the scenario must pin nothing.
pub fn expect(scenario: &str, v: (u32, u32)) -> Option<Expect> {
    let dio_pins = v >= (6, 5); // direct I/O moved from FOLL_GET to FOLL_PIN in 6.5
    match scenario {
        "odirect" if dio_pins => Some(Expect { func: "pin_user_pages_fast", flags: &["PIN", "WRITE"], release: "unpin" }),
        "odirect" => Some(Expect { func: "get_user_pages_fast", flags: &["GET", "WRITE"], release: "put" }),
        "vmsplice" => Some(Expect { func: "get_user_pages_fast", flags: &["GET"], release: "put" }),
        "pvm" => Some(Expect { func: "pin_user_pages_remote", flags: &["PIN", "WRITE"], release: "unpin" }),
        // Measured: 5.10 and 6.1 register buffers through pin_user_pages, 6.12 and 7.2
        // through pin_user_pages_fast; kernels in between are not in the lab.
        "iouring" if v >= (6, 4) => Some(Expect { func: "pin_user_pages_fast", flags: &["PIN", "LONGTERM", "WRITE"], release: "unpin" }),
        "iouring" => Some(Expect { func: "pin_user_pages", flags: &["PIN", "LONGTERM", "WRITE"], release: "unpin" }),
        _ => None,
    }
}

fn scenario_line(r: &Recorded) -> Result<Value> {
    let line = r.out.iter().find_map(|l| l.strip_prefix("PINWATCH-SCENARIO ")).context("the scenario never said what it did")?;
    Ok(serde_json::from_str(line)?)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX)
}

/// Checks one scenario's trace; returns a one-line summary of what was seen.
pub fn check(scenario: &str, r: &Recorded, v: (u32, u32)) -> Result<String> {
    ensure!(r.ended, "the guest never finished this scenario");
    if r.rc != Some(0) {
        bail!("pinwatch record exited with {:?}: {}", r.rc, r.err.join(" | "));
    }
    let s = scenario_line(r)?;
    let (pid, pages, since) = (u(&s, "pid"), u(&s, "pages"), u(&s, "ts_ns"));
    ensure!(!r.trace.is_empty(), "empty trace");
    let lost: u64 = r.trace.iter().filter(|e| e["event"] == "lost").map(|e| u(e, "count")).sum();
    ensure!(lost == 0, "{lost} records lost");
    // Pins the scenario took after it started (exec takes its own references first).
    let pins: Vec<&Value> = r
        .trace
        .iter()
        .filter(|e| e["event"] == "pin" && u(e, "pid") == pid && u(e, "ts_ns") >= since && e.get("errno").is_none())
        .collect();
    let Some(want) = expect(scenario, v) else {
        ensure!(pins.is_empty(), "control pid {pid} has {} pin event(s): {:?}", pins.len(), pins.first());
        return Ok(format!("pid {pid}: no pins, as expected"));
    };
    ensure!(!pins.is_empty(), "no pin event for pid {pid}");
    let mut pinned: HashMap<u64, i64> = HashMap::new();
    let mut total = 0;
    for p in &pins {
        ensure!(p["func"] == want.func, "pid {pid} pinned through {} (expected {})", p["func"], want.func);
        let flags: Vec<&str> = p["flags"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        ensure!(flags == want.flags, "flags {flags:?}, expected {:?}", want.flags);
        total += u(p, "nr_pages");
        for pfn in p["pfns"].as_array().into_iter().flatten() {
            let pfn = pfn.as_u64().context("pfn")?;
            ensure!(pfn != u64::MAX, "a page pointer could not become a pfn");
            *pinned.entry(pfn).or_default() += 1;
        }
    }
    ensure!(total == pages, "pid {pid} pinned {total} pages through {}, expected {pages}", want.func);
    let npfns: i64 = pinned.values().sum();
    ensure!(npfns as u64 == pages, "{npfns} pfns for {pages} pages");
    // Every reference comes back, through the expected kind of release.
    let first = pins.iter().map(|p| u(p, "ts_ns")).min().unwrap_or(0);
    let mut left = pinned.clone();
    let mut kinds: HashMap<String, u64> = HashMap::new();
    for e in r.trace.iter().filter(|e| e["event"] == "unpin" && u(e, "ts_ns") >= first) {
        let kind = e["release"].as_str().unwrap_or("").to_string();
        for pfn in e["pfns"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
            if let Some(n) = left.get_mut(&pfn) {
                if *n > 0 {
                    *n -= 1;
                    *kinds.entry(kind.clone()).or_default() += 1;
                }
            }
        }
    }
    let unreleased: i64 = left.values().sum();
    ensure!(unreleased == 0, "{unreleased} of {npfns} page references never released (released: {kinds:?})");
    ensure!(
        kinds.keys().all(|k| k == want.release),
        "released as {kinds:?}, expected all through {:?}",
        want.release
    );
    Ok(format!("pid {pid}: {total} pages via {} {:?}, all released by {}", want.func, want.flags, want.release))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(version("5.10.0-32-cloud-amd64"), (5, 10));
        assert_eq!(version("6.12.117+deb13-cloud-amd64"), (6, 12));
        assert_eq!(version("7.2.13+deb14-cloud-amd64"), (7, 2));
    }

    fn rec(trace: &[Value], pid: u64) -> Recorded {
        Recorded {
            rc: Some(0),
            out: vec![format!("PINWATCH-SCENARIO {{\"scenario\":\"pvm\",\"pid\":{pid},\"pages\":2,\"ts_ns\":10}}")],
            err: vec![],
            trace: trace.to_vec(),
            ended: true,
        }
    }

    fn pin(pid: u64, ts: u64, pfns: &[u64]) -> Value {
        serde_json::json!({"event":"pin","pid":pid,"ts_ns":ts,"func":"pin_user_pages_remote","flags":["PIN","WRITE"],"nr_pages":pfns.len(),"pfns":pfns})
    }

    fn unpin(ts: u64, kind: &str, pfns: &[u64]) -> Value {
        serde_json::json!({"event":"unpin","pid":1,"ts_ns":ts,"release":kind,"pfns":pfns})
    }

    #[test]
    fn a_good_trace_passes_and_each_defect_fails() {
        let v = (6, 1);
        let good = [pin(5, 20, &[1, 2]), unpin(30, "unpin", &[1, 2])];
        assert!(check("pvm", &rec(&good, 5), v).is_ok());
        // unreleased page
        assert!(check("pvm", &rec(&[pin(5, 20, &[1, 2]), unpin(30, "unpin", &[1])], 5), v).is_err());
        // wrong release kind
        assert!(check("pvm", &rec(&[pin(5, 20, &[1, 2]), unpin(30, "freed", &[1, 2])], 5), v).is_err());
        // wrong page count
        assert!(check("pvm", &rec(&[pin(5, 20, &[1]), unpin(30, "unpin", &[1])], 5), v).is_err());
        // pins before the scenario started (exec) do not count
        assert!(check("pvm", &rec(&[pin(5, 1, &[9]), pin(5, 20, &[1, 2]), unpin(30, "unpin", &[1, 2])], 5), v).is_ok());
        // the control must have no pin at all
        assert!(check("buffered", &rec(&good, 5), v).is_err());
        assert!(check("buffered", &rec(&[pin(6, 20, &[1])], 5), v).is_ok());
        // lost records fail the check
        let lost = [pin(5, 20, &[1, 2]), unpin(30, "unpin", &[1, 2]), serde_json::json!({"event":"lost","count":1})];
        assert!(check("pvm", &rec(&lost, 5), v).is_err());
    }
}
