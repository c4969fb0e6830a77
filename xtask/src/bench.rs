//! `cargo xtask bench`: what pinwatch costs, measured in one boot of a lab kernel.
//!
//! Two workloads run without pinwatch (the baseline) and under `pinwatch record`, once
//! per attach type, in interleaved rounds so that drift hits every mode alike:
//! - dio: one-page O_DIRECT reads of an ext4 file, each a GUP call, a bio and a release
//!   (the pin hot path: records for every call);
//! - writeback: dirty and msync every page of a shared mapping (the hazard hooks on
//!   pages nobody pins: one map lookup each, no record).
//!
//! Then the footprint: pinwatch's resident memory while it tracks 64 MiB of pinned pages,
//! against its own idle figure, and what its BPF maps charge.
//! Times are QEMU TCG times: the ratios are the result, not the nanoseconds.

use std::{collections::BTreeMap, path::PathBuf};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{
    kernels::{self, Fetched},
    lab::{self, Recorded},
    util, BOOT_LIMIT,
};

const DIO_OPS: usize = 3000;
const WB_PAGES: usize = 256;
const WB_ROUNDS: usize = 8;
const FOOTPRINT_PAGES: usize = 16384;

/// Attach types measured, each against the baseline.
const MODES: [&str; 2] = ["fentry", "kprobe"];

fn plan(rounds: usize) -> String {
    let workload = format!(
        "pinwatch-scenario bench-dio --file /mnt/bench-dio --ops {DIO_OPS} && \
         pinwatch-scenario bench-writeback --file /mnt/bench-wb --pages {WB_PAGES} --rounds {WB_ROUNDS}"
    );
    let mut p = String::from(
        r#"
# Like record(), but only the trace's last line (the stop event, with lost_total) goes
# back: thousands of events over the emulated serial port would take minutes.
bench_record() {
  name=$1; shift
  say BEGIN $name
  pinwatch record --force --output /tmp/$name.jsonl "$@" > /tmp/$name.out 2> /tmp/$name.err
  rc=$?
  tail -n 1 /tmp/$name.jsonl > /tmp/$name.last
  rm -f /tmp/$name.jsonl
  send_back $name $rc /tmp/$name.out /tmp/$name.err /tmp/$name.last
}
bench_base() {
  name=$1; shift
  say BEGIN $name
  "$@" > /tmp/$name.out 2> /tmp/$name.err
  send_back $name $? /tmp/$name.out /tmp/$name.err
}
# Warm-up: the first run of anything pays for page faults and caches.
pinwatch-scenario bench-dio --file /mnt/bench-dio --ops 200 > /dev/null
"#,
    );
    for r in 1..=rounds {
        p += &format!("bench_base base-{r} sh -c '{workload}'\n");
        for m in MODES {
            p += &format!("bench_record {m}-{r} --attach {m} -- sh -c '{workload}'\n");
        }
    }
    p += &format!("bench_record footprint --attach auto -- pinwatch-scenario bench-footprint --pages {FOOTPRINT_PAGES} --hold-ms 2000\n");
    p
}

/// The PINWATCH-BENCH lines of one run, by workload.
fn measures(r: &Recorded) -> BTreeMap<String, Value> {
    r.out
        .iter()
        .filter_map(|l| l.strip_prefix("PINWATCH-BENCH "))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["bench"].as_str()?.to_string(), v)))
        .collect()
}

/// A run under pinwatch must have ended well and lost nothing, or its times mean little.
fn trouble(name: &str, r: &Recorded, under_pinwatch: bool) -> Option<String> {
    if !r.ended || r.rc != Some(0) {
        return Some(format!("{name}: exit {:?}: {}", r.rc, r.err.join(" | ")));
    }
    if under_pinwatch {
        let lost = r.trace.last().and_then(|s| s["lost_total"].as_u64());
        match lost {
            Some(0) => {}
            Some(n) => return Some(format!("{name}: pinwatch lost {n} record(s)")),
            None => return Some(format!("{name}: no stop event in the trace")),
        }
    }
    None
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// ns per op of every round of `mode` for `bench`, or why not.
fn per_op(results: &BTreeMap<String, Recorded>, mode: &str, bench: &str, rounds: usize, problems: &mut Vec<String>) -> Vec<f64> {
    let mut out = Vec::new();
    for r in 1..=rounds {
        let name = format!("{mode}-{r}");
        let Some(rec) = results.get(&name) else {
            problems.push(format!("{name}: never ran"));
            continue;
        };
        if let Some(t) = trouble(&name, rec, mode != "base") {
            problems.push(t);
            continue;
        }
        match measures(rec).get(bench) {
            Some(m) => out.push(m["ns"].as_f64().unwrap_or(f64::NAN) / m["ops"].as_f64().unwrap_or(f64::NAN)),
            None => problems.push(format!("{name}: no {bench} measure")),
        }
    }
    out
}

pub fn run(kernel_names: &[String], rounds: usize, bins: &lab::Binaries) -> Result<bool> {
    let series = crate::selected(kernel_names)?;
    let conf = kernels::update()?;
    let mut ok = true;
    for s in series {
        let Fetched::Ready(k) = kernels::fetch(&conf, &s)? else { bail!("kernel {} is not available", s.name) };
        let work: PathBuf = util::cache_dir().join("bench").join(&k.release);
        std::fs::create_dir_all(&work)?;
        println!("bench: Debian {} under QEMU TCG, {rounds} interleaved rounds, medians", k.release);
        let img = lab::build_initramfs(&k, bins, &plan(rounds), &work)?;
        let boot = lab::boot(&k, &img, &work, BOOT_LIMIT)?;
        let results = lab::parse(&boot.results);
        let mut problems = Vec::new();
        let mut report = json!({"kernel": k.release, "rounds": rounds, "workloads": {}});
        println!("  {:<34} {:>14} {:>22} {:>22}", "workload", "baseline", "fentry (ratio)", "kprobe (ratio)");
        for (bench, what) in [("dio", "dio: 4 KiB O_DIRECT read"), ("writeback", "writeback: dirty+msync, per page")] {
            let base = median(per_op(&results, "base", bench, rounds, &mut problems));
            let mut line = format!("  {what:<34} {:>14}", base.map(|b| format!("{:.1} us/op", b / 1e3)).unwrap_or_else(|| "-".into()));
            let mut entry = json!({"baseline_ns_per_op": base});
            for m in MODES {
                let v = median(per_op(&results, m, bench, rounds, &mut problems));
                let ratio = v.zip(base).map(|(v, b)| v / b);
                line += &format!(
                    " {:>22}",
                    match (v, ratio) {
                        (Some(v), Some(r)) => format!("{:.1} us/op ({r:.2}x)", v / 1e3),
                        _ => "-".into(),
                    }
                );
                entry[m] = json!({"ns_per_op": v, "ratio": ratio});
            }
            println!("{line}");
            report["workloads"][bench] = entry;
        }
        match results.get("footprint") {
            Some(f) => match (trouble("footprint", f, true), measures(f).get("footprint")) {
                (None, Some(m)) => {
                    let (idle, held, pages) = (m["rss_idle_kb"].as_u64().unwrap_or(0), m["rss_held_kb"].as_u64().unwrap_or(0), m["pages"].as_u64().unwrap_or(1));
                    let per_page = (held.saturating_sub(idle) * 1024) as f64 / pages as f64;
                    println!(
                        "  footprint: pinwatch RSS {:.1} MiB idle, {:.1} MiB tracking {} MiB pinned ({:.2}x, {per_page:.0} bytes per pinned page); BPF maps charge {:.1} MiB",
                        idle as f64 / 1024.0,
                        held as f64 / 1024.0,
                        pages * 4 / 1024,
                        held as f64 / idle.max(1) as f64,
                        m["maps_memlock_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
                    );
                    report["footprint"] = m.clone();
                    report["footprint"]["bytes_per_pinned_page"] = json!(per_page);
                }
                (Some(t), _) => problems.push(t),
                (None, None) => problems.push("footprint: no measure".into()),
            },
            None => problems.push("footprint: never ran".into()),
        }
        for p in &problems {
            println!("  PROBLEM {p}");
        }
        ok &= problems.is_empty();
        report["problems"] = json!(problems);
        let out = util::workspace_root().join("target/bench");
        std::fs::create_dir_all(&out)?;
        let file = out.join(format!("{}.json", k.release));
        std::fs::write(&file, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", file.display()))?;
        println!("  written to {}", file.display());
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(out: &[&str], rc: i32, stop: Option<Value>) -> Recorded {
        Recorded { rc: Some(rc), out: out.iter().map(|s| s.to_string()).collect(), err: vec![], trace: stop.into_iter().collect(), ended: true }
    }

    #[test]
    fn medians_and_ratios_come_from_every_good_round() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let line = |ns: u64| format!("PINWATCH-BENCH {{\"bench\":\"dio\",\"ops\":10,\"ns\":{ns}}}");
        let mut results = BTreeMap::new();
        results.insert("base-1".to_string(), rec(&[&line(1000)], 0, None));
        results.insert("fentry-1".to_string(), rec(&[&line(2000)], 0, Some(json!({"event":"stop","lost_total":0}))));
        // lost records disqualify a round, and say so
        results.insert("fentry-2".to_string(), rec(&[&line(9000)], 0, Some(json!({"event":"stop","lost_total":3}))));
        let mut problems = Vec::new();
        assert_eq!(per_op(&results, "base", "dio", 1, &mut problems), vec![100.0]);
        assert_eq!(per_op(&results, "fentry", "dio", 2, &mut problems), vec![200.0]);
        assert_eq!(problems, vec!["fentry-2: pinwatch lost 3 record(s)".to_string()]);
        // a round that failed, or never ran, is a problem too
        let mut problems = Vec::new();
        results.insert("base-2".to_string(), rec(&[], 1, None));
        assert!(per_op(&results, "base", "dio", 3, &mut problems).len() == 1 && problems.len() == 2, "{problems:?}");
    }

    #[test]
    fn the_plan_interleaves_modes_and_ends_with_the_footprint() {
        let p = plan(2);
        let order: Vec<&str> =
            p.lines().filter(|l| l.starts_with("bench_base ") || l.starts_with("bench_record ")).filter_map(|l| l.split_whitespace().nth(1)).collect();
        assert_eq!(order, ["base-1", "fentry-1", "kprobe-1", "base-2", "fentry-2", "kprobe-2", "footprint"]);
        assert!(p.trim_end().ends_with("--hold-ms 2000"));
    }
}
