//! What the lab records, read back as a person would after an incident, on this
//! machine: every trace replayed by `pinwatch report` (every hazard and limit breach
//! comes back, exit 0), the hazard scenario told as a story, and both exports holding
//! every hazard, the HTML one opened in Chromium.

use std::process::Command;

use anyhow::{ensure, Context as _, Result};

use crate::{browser, checks, lab, SCENARIOS};

/// Every trace the lab recorded, replayed by `pinwatch report` on this machine: it exits
/// 0 and gives back every hazard and limit breach the recording wrote; the hazard
/// scenario's story reads in the order things happened, naming the file by its path.
pub fn round_trip(bins: &lab::Binaries, work: &std::path::Path, results: &std::collections::BTreeMap<String, lab::Recorded>) -> Result<String> {
    let (mut traces, mut hazards, mut limits) = (0, 0, 0);
    for name in SCENARIOS.iter().map(|s| s.0).chain(["kill9"]) {
        let Some(r) = results.get(name) else { continue };
        let dump = work.join(format!("{name}.trace.jsonl"));
        std::fs::write(&dump, r.trace.iter().map(|t| t.to_string() + "\n").collect::<String>())?;
        let out = Command::new(&bins.pinwatch).args(["report", "--format", "json"]).arg(&dump).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(out.status.success(), "report {name} exits {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
        let kinds = |it: &mut dyn Iterator<Item = serde_json::Value>| -> Vec<String> {
            it.filter(|e| e["event"] == "hazard").map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect()
        };
        let replayed = kinds(&mut text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        let recorded = kinds(&mut r.trace.iter().cloned());
        ensure!(replayed == recorded, "{name}: the trace holds {recorded:?}, report gives back {replayed:?}");
        exports_hold(bins, work, name, recorded.len())?;
        traces += 1;
        hazards += recorded.len();
        limits += recorded.iter().filter(|k| *k == "pin_limit_exceeded" || *k == "long_held_pin").count();
    }
    ensure!(limits > 0, "no lab trace recorded a limit breach: the memlock and aged scenarios did not run");
    let dump = work.join("hazard.trace.jsonl");
    let out = Command::new(&bins.pinwatch).args(["report", "--story", "--file", "/mnt/hazard"]).arg(&dump).output()?;
    let story = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "report --story exits {:?}: {}", out.status.code(), String::from_utf8_lossy(&out.stderr));
    checks::story_order(&story).with_context(|| format!("the hazard scenario's story:\n{story}"))?;
    let r = results.get("hazard").context("no hazard scenario")?;
    let critical = r.trace.iter().filter(|e| e["event"] == "hazard" && e["severity"] == "critical").count();
    let total = r.trace.iter().filter(|e| e["event"] == "hazard").count();
    let seen = browser::check_page(&work.join("hazard.html"), total, critical)?;
    Ok(format!(
        "{traces} traces, {hazards} hazards ({limits} limit breaches) derived again and in both exports; the story of /mnt/hazard reads in order; {seen}"
    ))
}

/// `pinwatch export` of a lab trace, both formats: each holds every hazard.
fn exports_hold(bins: &lab::Binaries, work: &std::path::Path, name: &str, hazards: usize) -> Result<()> {
    let trace = work.join(format!("{name}.trace.jsonl"));
    for (format, file) in [("perfetto", format!("{name}.perfetto.json")), ("html", format!("{name}.html"))] {
        let out = work.join(&file);
        let o = Command::new(&bins.pinwatch).args(["export", "--force", "--format", format, "-o"]).arg(&out).arg(&trace).output()?;
        ensure!(o.status.success(), "export {name} as {format} exits {:?}: {}", o.status.code(), String::from_utf8_lossy(&o.stderr));
        let text = std::fs::read_to_string(&out)?;
        let found = if format == "perfetto" {
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{file} is not JSON"))?;
            v["traceEvents"].as_array().into_iter().flatten().filter(|e| e["cat"] == "hazard").count()
        } else {
            text.matches("class=\"hazard\"").count()
        };
        ensure!(found == hazards, "{file} holds {found} hazards, the trace {hazards}");
    }
    Ok(())
}

