//! What each scenario must show in pinwatch's trace, kernel by kernel. Exact values:
//! the pinning function, the flags, the page count, and how every page is released.

use std::collections::{BTreeMap, BTreeSet, HashMap};

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
    /// The subsystem pinwatch must name from the GUP call's stack.
    pub path: &'static str,
}

/// None: the scenario must pin nothing.
pub fn expect(scenario: &str, v: (u32, u32)) -> Option<Expect> {
    let dio_pins = v >= (6, 5); // direct I/O moved from FOLL_GET to FOLL_PIN in 6.5
    match scenario {
        "odirect" if dio_pins => Some(Expect { func: "pin_user_pages_fast", flags: &["PIN", "WRITE"], release: "unpin", path: "direct I/O" }),
        "odirect" => Some(Expect { func: "get_user_pages_fast", flags: &["GET", "WRITE"], release: "put", path: "direct I/O" }),
        "vmsplice" => Some(Expect { func: "get_user_pages_fast", flags: &["GET"], release: "put", path: "vmsplice" }),
        "pvm" => Some(Expect { func: "pin_user_pages_remote", flags: &["PIN", "WRITE"], release: "unpin", path: "process_vm" }),
        // Measured: 5.10 and 6.1 register buffers through pin_user_pages, 6.12 and 7.2
        // through pin_user_pages_fast; kernels in between are not in the lab.
        "iouring" if v >= (6, 4) => Some(Expect { func: "pin_user_pages_fast", flags: &["PIN", "LONGTERM", "WRITE"], release: "unpin", path: "io_uring" }),
        "iouring" => Some(Expect { func: "pin_user_pages", flags: &["PIN", "LONGTERM", "WRITE"], release: "unpin", path: "io_uring" }),
        _ => None,
    }
}

fn scenario_line(r: &Recorded) -> Result<Value> {
    let line = r.tagged("PINWATCH-SCENARIO ").next().context("the scenario never said what it did")?;
    Ok(serde_json::from_str(line)?)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX)
}

/// What every scenario's run must show first: it ended, pinwatch exited 0, the
/// scenario said what it did, nothing was lost. Returns (scenario pid, pages, start).
fn basics(r: &Recorded) -> Result<(u64, u64, u64)> {
    ensure!(r.ended, "the guest never finished this scenario");
    if r.rc != Some(0) {
        bail!("pinwatch record exited with {:?}: {}", r.rc, r.err.join(" | "));
    }
    let s = scenario_line(r)?;
    ensure!(!r.trace.is_empty(), "empty trace");
    let lost: Vec<String> =
        r.trace.iter().filter(|e| e["event"] == "lost").map(|e| format!("{} {}", u(e, "count"), e["reason"].as_str().unwrap_or("?"))).collect();
    ensure!(lost.is_empty(), "lost: {}", lost.join(", "));
    Ok((u(&s, "pid"), u(&s, "pages"), u(&s, "ts_ns")))
}

/// The actor's kernel stack came with the hazard and leads back to the scenario's
/// system call. dirty_after_unmap is left out: it may come from the release record
/// (bio_release_pages with dirty, before 6.x's folio_mark_dirty hook sees it), and
/// release records carry no stack.
fn actor_stack_shows(h: &Value, kind: &str) -> Result<()> {
    let syscall = match kind {
        "mkclean_while_pinned" | "writeback_while_pinned" => "msync",
        "unmap_while_pinned" => "madvise",
        "truncate_while_pinned" => "truncate",
        _ => return Ok(()),
    };
    let stack: Vec<&str> = h["actor"]["stack"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    ensure!(!stack.is_empty(), "{kind} at pfn {} came without the actor's kernel stack", h["pfn"]);
    ensure!(stack.iter().any(|f| f.contains(syscall)), "{kind}: the actor's stack does not reach {syscall}: {stack:?}");
    Ok(())
}

/// Pins the scenario took after it started (exec takes its own references first).
fn scenario_pins(r: &Recorded, pid: u64, since: u64) -> Vec<&Value> {
    r.trace
        .iter()
        .filter(|e| e["event"] == "pin" && u(e, "pid") == pid && u(e, "ts_ns") >= since && e.get("errno").is_none())
        .collect()
}

fn pfns_of<'a>(events: impl IntoIterator<Item = &'a Value>) -> BTreeSet<u64> {
    events.into_iter().flat_map(|e| e["pfns"].as_array().into_iter().flatten().filter_map(Value::as_u64)).collect()
}

fn hazards<'a>(r: &'a Recorded, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    r.trace.iter().filter(move |e| e["event"] == "hazard" && (kind.is_empty() || e["kind"] == kind))
}

fn pinners(h: &Value) -> Vec<&Value> {
    match &h["pinner"] {
        Value::Array(a) => a.iter().collect(),
        p => vec![p],
    }
}

fn pinner_pids(h: &Value) -> Vec<Option<u64>> {
    pinners(h).iter().map(|p| p["pid"].as_u64()).collect()
}

/// The kinds the slow O_DIRECT read with msync, MADV_PAGEOUT and ftruncate provokes.
pub const SEQUENCE: [&str; 5] =
    ["mkclean_while_pinned", "writeback_while_pinned", "unmap_while_pinned", "truncate_while_pinned", "dirty_after_unmap"];

/// Hazard scenarios: exactly the pinned pfns, the right pinner, each kind; controls
/// silent.
pub fn check_hazards(scenario: &str, r: &Recorded, v: (u32, u32)) -> Result<String> {
    let (pid, pages, since) = basics(r)?;
    // The pins the scenario is about: page cache (its ext4 file or memfd). Others of the
    // same pid are incidental (a futex wait pins a page of the thread's stack).
    let pins: Vec<&Value> = scenario_pins(r, pid, since).into_iter().filter(|p| p.get("file").is_some_and(|f| !f.is_null())).collect();
    // Folio heads: several pages of one large folio (xfs caches files in large folios)
    // share one, and hazards are per folio.
    let pinned = pfns_of(pins.iter().copied());
    let pinned_pages: u64 = pins.iter().map(|p| p["pfns"].as_array().map_or(0, |a| a.len() as u64)).sum();
    let all: Vec<&Value> = hazards(r, "").collect();
    let start = r.trace.iter().find(|e| e["event"] == "start").context("no start event")?;
    let hooks: Vec<&str> = start["hooks"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    // The same scenarios on xfs and btrfs: `hazard_xfs`, `hazard_btrfs_nopin`...
    let fs = ["xfs", "btrfs"].into_iter().find(|f| scenario.contains(&format!("_{f}")));
    let base = fs.map(|f| scenario.replace(&format!("_{f}"), "")).unwrap_or_else(|| scenario.to_string());
    if let Some(f) = fs {
        let files: BTreeSet<&str> = pins.iter().filter_map(|p| p["file"]["fs"].as_str()).collect();
        ensure!(base == "hazard_nopin" || files == BTreeSet::from([f]), "the scenario's pins are of {files:?}, not {f}");
    }
    match base.as_str() {
        "hazard" | "hazard_kprobe" => {
            // The attach type asked for is the one used by every hazard hook (auto on
            // other filesystems: whatever the kernel allows).
            let via = match (scenario, fs) {
                (_, Some(_)) => "",
                ("hazard", None) => "fentry",
                _ => "kprobe",
            };
            for role in ["unmap", "mkclean", "writeback", "dirty"] {
                let h = hooks.iter().find(|h| h.starts_with(&format!("{role}: "))).with_context(|| format!("no {role} hook attached: {hooks:?}"))?;
                ensure!(via.is_empty() || h.ends_with(&format!("via {via}")), "{h}, expected via {via}");
            }
            ensure!(pinned_pages == pages, "{pinned_pages} pinned pages, expected {pages}");
            let mut seen = Vec::new();
            // 6.1's MADV_PAGEOUT passes over a large file folio mapped by several PTEs
            // (folio_mapcount != 1 in madvise_cold_or_pageout_pte_range): the kernel
            // never unmaps xfs's pinned large folios there, so no unmap can be seen.
            let large = (pinned.len() as u64) < pinned_pages;
            let skipped_unmap = large && fs == Some("xfs") && v < (6, 12);
            if skipped_unmap {
                let unmaps = r.trace.iter().filter(|e| e["event"] == "page" && e["op"] == "unmap").count();
                ensure!(unmaps == 0, "{unmaps} unmap records where 6.1 was expected to leave large folios mapped");
                seen.push("no unmap (6.1 leaves large folios mapped)".to_string());
            }
            // Pages pinned per folio: a hazard's folio order must hold them all.
            let mut per_folio: BTreeMap<u64, u64> = BTreeMap::new();
            for p in &pins {
                for pfn in p["pfns"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
                    *per_folio.entry(pfn).or_default() += 1;
                }
            }
            for kind in SEQUENCE.into_iter().filter(|k| !(skipped_unmap && *k == "unmap_while_pinned")) {
                let hs: Vec<&Value> = hazards(r, kind).collect();
                let got: BTreeSet<u64> = hs.iter().filter_map(|h| h["pfn"].as_u64()).collect();
                ensure!(got == pinned, "{kind}: pfns {got:?}, expected exactly the pinned {pinned:?}");
                // A hazard a release revealed (5.10 and 6.1: the bio's release dirtying its
                // pages) carries no order: release records name pfns only.
                for h in hs.iter().filter(|h| h.get("order").is_some()) {
                    let (pfn, order) = (u(h, "pfn"), u(h, "order"));
                    let n = per_folio.get(&pfn).copied().unwrap_or(0);
                    ensure!(order <= 9 && (1u64 << order) >= n, "{kind} at pfn {pfn}: order {order} cannot hold the {n} pages pinned in it");
                }
                for h in &hs {
                    ensure!(pinner_pids(h).contains(&Some(pid)), "{kind} names pinners {:?}, not the scenario's pid {pid}", pinner_pids(h));
                    let paths: Vec<&Value> = pinners(h).iter().filter(|p| p["pid"].as_u64() == Some(pid)).map(|p| &p["path"]).collect();
                    ensure!(paths.iter().all(|p| *p == "direct I/O"), "{kind}: the scenario's pin is not named direct I/O: {paths:?}");
                    actor_stack_shows(h, kind)?;
                }
                seen.push(format!("{kind} x{}", hs.len()));
            }
            let stray: Vec<&&Value> = all.iter().filter(|h| h["pfn"].as_u64().is_some_and(|p| !pinned.contains(&p))).collect();
            ensure!(stray.is_empty(), "hazards on pages that were not pinned: {:?}", stray.first());
            let how = if via.is_empty() { String::new() } else { format!(" via {via}") };
            Ok(format!(
                "{pinned_pages} pinned {} pages in {} folios{how}: {}; pinner named direct I/O, every actor stack reaches its syscall",
                fs.unwrap_or("ext4"),
                pinned.len(),
                seen.join(", ")
            ))
        }
        "hazard_other" | "hazard_nopin" | "released" => {
            if base != "hazard_nopin" {
                ensure!(pinned_pages == pages, "the control pinned {pinned_pages} pages, expected {pages}: it proves nothing");
            }
            ensure!(all.is_empty(), "control reported {} hazard(s), first: {}", all.len(), all[0]);
            Ok(format!("{pinned_pages} pages pinned, no hazard"))
        }
        "longterm" => {
            let (kind, severity) = if v >= (6, 5) { ("longterm_pin_refused", "info") } else { ("longterm_file_pin", "critical") };
            let hs: Vec<&Value> = hazards(r, kind).collect();
            ensure!(!hs.is_empty(), "no {kind} hazard; hazards: {all:?}");
            for h in &hs {
                ensure!(pinner_pids(h) == vec![Some(pid)], "{kind} pinner {:?}, expected {pid}", pinner_pids(h));
                ensure!(h["severity"] == severity, "{kind} severity {}, expected {severity}", h["severity"]);
            }
            Ok(format!("{kind} ({severity}) x{}", hs.len()))
        }
        "memfd" | "memfd_nopin" => {
            let hs: Vec<&Value> = hazards(r, "truncate_while_pinned").collect();
            if scenario == "memfd_nopin" {
                ensure!(all.is_empty(), "control reported {} hazard(s), first: {}", all.len(), all[0]);
                return Ok(format!("no hazard; {}", check_reuse(r)?));
            }
            ensure!(pinned.len() as u64 == pages, "{} pinned pfns, expected {pages}", pinned.len());
            let got: BTreeSet<u64> = hs.iter().filter_map(|h| h["pfn"].as_u64()).collect();
            ensure!(got == pinned, "truncate_while_pinned pfns {got:?}, expected exactly the pinned {pinned:?}");
            // A long-term pin of shmem is allowed everywhere: reported, as info.
            let other: Vec<&&Value> = all.iter().filter(|h| h["kind"] != "truncate_while_pinned" && !(h["kind"] == "longterm_file_pin" && h["severity"] == "info")).collect();
            ensure!(other.is_empty(), "other hazards than truncate: {other:?}");
            for h in &hs {
                ensure!(pinner_pids(h) == vec![Some(pid)], "pinner {:?}, expected {pid}", pinner_pids(h));
            }
            Ok(format!("truncate_while_pinned on all {} pinned memfd pages, pinner {pid}", got.len()))
        }
        "memlock" | "memlock_ctl" | "aged" | "aged_vmsplice" | "aged_ctl" => {
            let kind = if scenario.starts_with("memlock") { "pin_limit_exceeded" } else { "long_held_pin" };
            let hs: Vec<&Value> = hazards(r, kind).filter(|h| h["limit"]["id"].as_u64() == Some(pid)).collect();
            if scenario.ends_with("_ctl") {
                ensure!(hs.is_empty(), "control flagged {kind}: {}", hs[0]);
                ensure!(!scenario_pins(r, pid, since).is_empty(), "the control took no pins: it proves nothing");
                return Ok(format!("no {kind}"));
            }
            let h = hs.first().with_context(|| format!("no {kind} for pid {pid}; hazards: {all:?}"))?;
            let l = &h["limit"];
            if kind == "pin_limit_exceeded" {
                ensure!(l["rule"] == "rlimit_memlock", "rule {}", l["rule"]);
                ensure!(l["value"].as_u64() == Some(pages * 4096) && l["limit"] == 65536, "figures {l}, expected {} over 65536", pages * 4096);
            } else {
                ensure!(l["value"].as_u64().unwrap_or(0) > 1_000_000_000, "age {} is not past the 1 s rule", l["value"]);
                ensure!(pinner_pids(h) == vec![Some(pid)], "pinner {:?}", pinner_pids(h));
            }
            Ok(format!("{kind}: {l}"))
        }
        _ => bail!("no check for scenario {scenario}"),
    }
}

/// `pinwatch top -b --output json` while io_uring fixed buffers pin `pages`: the
/// process shows them long-term pinned, VmPin beside it, and nothing once released.
pub fn check_top(r: &Recorded, v: (u32, u32)) -> Result<String> {
    let (pid, pages, _) = basics(r)?;
    let bytes = pages * 4096;
    let row = |doc: &Value| row(doc, pid);
    // exec's own FOLL_GET references show for a moment, until the sweep finds them gone:
    // some refresh must show the buffers alone.
    let during = r.trace.iter().filter_map(row).find(|p| p["longterm_bytes"].as_u64() == Some(bytes) && p["pinned_bytes"].as_u64() == Some(bytes));
    let p = during.with_context(|| format!("no refresh shows pid {pid} with {bytes} bytes pinned, all long-term: {:?}", r.trace.iter().filter_map(row).collect::<Vec<_>>()))?;
    // io_uring charges mm->pinned_vm; 7.x skips it for callers with CAP_IPC_LOCK (root).
    let vmpin = if v >= (7, 0) { 0 } else { bytes };
    ensure!(p["vmpin_bytes"].as_u64() == Some(vmpin), "VmPin {} beside {bytes} pinned, expected {vmpin} on this kernel", p["vmpin_bytes"]);
    // Who took them: io_uring's buffer registration, from the GUP call's stack.
    let by_io_uring = p["by_caller"].as_object().into_iter().flatten().find(|(c, _)| c.starts_with("io_"));
    ensure!(by_io_uring.is_some_and(|(_, b)| b.as_u64() == Some(bytes)), "by_caller {} does not name io_uring for the {bytes} bytes", p["by_caller"]);
    ensure!(p["by_path"]["io_uring"].as_u64() == Some(bytes), "by_path {} does not give io_uring the {bytes} bytes", p["by_path"]);
    let last = r.trace.last().context("no refresh")?;
    let after = row(last).map(|p| p["pinned_bytes"].as_u64().unwrap_or(0)).unwrap_or(0);
    ensure!(after == 0, "pid {pid} still shows {after} bytes pinned after unregistering");
    for k in ["processes", "totals", "lost_events"] {
        ensure!(last.get(k).is_some(), "refresh without {k}");
    }
    // Monitoring: 300 direct-I/O reads and the hazard scenario's GUP calls are counted
    // by the kernel (not streamed), and nothing is held once they are done.
    let calls = last["totals"]["gup_calls"].as_u64().unwrap_or(0);
    ensure!(calls > 300, "the kernel counted {calls} GUP calls, expected the io_uring registration and 300 reads at least");
    ensure!(last["totals"]["unstreamed_bytes"].as_u64() == Some(0), "{} bytes of transient pins still held at the end", last["totals"]["unstreamed_bytes"]);
    ensure!(last["lost_events"].as_u64() == Some(0), "top lost {} events: {}", last["lost_events"], last["lost_by_reason"]);
    // ... and the hazards of the 2018 sequence are caught as record catches them, from
    // the page records and the releases of exposed pages alone.
    let mut kinds = Vec::new();
    for kind in SEQUENCE {
        let n = last["hazards_by_kind"][kind].as_u64().unwrap_or(0);
        ensure!(n >= 8, "top caught {n} {kind}, expected one per pinned page (8): {}", last["hazards_by_kind"]);
        kinds.push(format!("{kind} x{n}"));
    }
    Ok(format!(
        "pid {pid}: {bytes} bytes long-term pinned by {}, VmPin {vmpin}, then 0; {calls} GUP calls counted unstreamed; hazards while monitoring: {}",
        by_io_uring.map(|(c, _)| c.as_str()).unwrap_or(""),
        kinds.join(", ")
    ))
}

/// This machine's kernel: tracepoint-only mode must catch the truncate of pages the
/// kernel counts as DMA-pinned, without a pinner, and say what it cannot see.
pub fn check_host_memfd(scenario: &str, r: &Recorded) -> Result<String> {
    let (_pid, pages, _since) = basics(r)?;
    let start = r.trace.iter().find(|e| e["event"] == "start").context("no start event")?;
    ensure!(start["mode"] == "tracepoint_only", "mode {}, expected tracepoint_only", start["mode"]);
    let blind: Vec<&str> = start["blind"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    for role in ["acquire", "unmap", "mkclean", "writeback"] {
        ensure!(blind.contains(&role), "start event does not say {role} is invisible: {blind:?}");
    }
    ensure!(r.err.iter().any(|l| l.contains("tracepoint-only mode")), "no explanation on stderr: {:?}", r.err);
    let all: Vec<&Value> = hazards(r, "").collect();
    if scenario == "memfd_nopin" {
        ensure!(all.is_empty(), "control reported {} hazard(s), first: {}", all.len(), all[0]);
        return Ok("no hazard".into());
    }
    let got: BTreeSet<u64> = all.iter().filter(|h| h["kind"] == "truncate_while_pinned").filter_map(|h| h["pfn"].as_u64()).collect();
    if got.contains(&u64::MAX) {
        let said: Vec<&String> = r.err.iter().filter(|l| l.contains("page frame numbers")).collect();
        bail!("{} hazards without a pfn (vmemmap_base unknown); pinwatch said: {said:?}", all.len());
    }
    ensure!(got.len() as u64 == pages && all.len() as u64 == pages, "{} hazards on {} pfns, expected {pages} truncate_while_pinned", all.len(), got.len());
    for h in &all {
        ensure!(pinner_pids(h) == vec![None], "tracepoint-only mode cannot know the pinner, yet named {:?}", pinner_pids(h));
        ensure!(h["kernel_pins"]["maybe_dma_pinned"] == true, "hazard without the kernel's pin count: {h}");
    }
    Ok(format!("{pages} truncate_while_pinned from the kernel's pin count, pinner unknown"))
}

/// Checks one scenario's trace; returns a one-line summary of what was seen.
pub fn check(scenario: &str, r: &Recorded, v: (u32, u32)) -> Result<String> {
    if scenario == "top" {
        return check_top(r, v);
    }
    if scenario == "pinmap" {
        return check_pinmap(r);
    }
    if !matches!(scenario, "odirect" | "vmsplice" | "pvm" | "iouring" | "buffered") {
        return check_hazards(scenario, r, v);
    }
    let (pid, pages, since) = basics(r)?;
    let pins = scenario_pins(r, pid, since);
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
        ensure!(p["path"] == want.path, "path {} (caller {}), expected {:?}", p["path"], p["caller"], want.path);
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
    Ok(format!("pid {pid}: {total} pages via {} {:?} for {}, all released by {}", want.func, want.flags, want.path, want.release))
}

/// The second half of the memfd control: pages held by FOLL_GET references whose
/// put pinwatch cannot see (/proc/self/mem), freed, and taken by a memfd that is then
/// truncated (`reuse-freed`). Some page must have been reused, or nothing was tested;
/// each reused page's old references must have been dropped (`freed` at the page
/// free, or `gone`) before the new owner's truncate, and no hazard reported (checked
/// by the caller for the whole trace).
fn check_reuse(r: &Recorded) -> Result<String> {
    let said = scenario_lines(r, "reuse-freed");
    let pid = u(said.first().context("the reuse scenario did not run")?, "pid");
    let tries = r.tagged_json("PINWATCH-SCENARIO-REUSE ");
    let hit = tries.iter().find(|t| u(t, "reused") > 0).with_context(|| format!("in {} attempt(s) no freed page went to the memfd: nothing was tested", tries.len()))?;
    let pfns = |k: &str| -> BTreeSet<u64> { hit[k].as_array().into_iter().flatten().filter_map(Value::as_u64).collect() };
    let reused: BTreeSet<u64> = pfns("old").intersection(&pfns("new")).copied().collect();
    let at = u(hit, "ts_ns");
    let pinned = pfns_of(r.trace.iter().filter(|e| e["event"] == "pin" && u(e, "pid") == pid && u(e, "ts_ns") < at));
    let missing: Vec<&u64> = reused.iter().filter(|p| !pinned.contains(p)).collect();
    ensure!(missing.is_empty(), "reused pfns {missing:?} were never seen pinned through /proc/self/mem");
    let mut kinds = BTreeSet::new();
    for p in &reused {
        let release = r
            .trace
            .iter()
            .filter(|e| e["event"] == "unpin" && u(e, "ts_ns") < at)
            .find(|e| e["pfns"].as_array().is_some_and(|a| a.iter().any(|x| x.as_u64() == Some(*p))))
            .with_context(|| format!("pfn {p} was reused before pinwatch dropped its old reference"))?;
        kinds.insert(release["release"].as_str().unwrap_or("?").to_string());
    }
    Ok(format!("{} of {} freed pages reused by a memfd (attempt {}), truncated: no hazard; old references dropped by {kinds:?}", reused.len(), pfns("old").len(), u(hit, "attempt")))
}

/// A long-term pin map of one block and a pin map of 24 folios, too small for 96
/// long-term pinned pages: the block takes at most 32, the pin map 24, and the pages
/// neither could hold are counted as pin_map_full (never hidden); the start event says
/// both capacities, and once those pins are released the maps hold new ones: the 2018
/// sequence that follows is caught.
pub fn check_pinmap(r: &Recorded) -> Result<String> {
    ensure!(r.ended, "the guest never finished this scenario");
    ensure!(r.rc == Some(0), "pinwatch record exited with {:?}: {}", r.rc, r.err.join(" | "));
    let start = r.trace.iter().find(|e| e["event"] == "start").context("no start event")?;
    ensure!(start["pin_map_capacity"] == 24, "the start event says capacity {}", start["pin_map_capacity"]);
    ensure!(start["pin_block_capacity"] == 1, "the start event says block capacity {}", start["pin_block_capacity"]);
    let full: u64 = r.trace.iter().filter(|e| e["event"] == "lost" && e["reason"] == "pin_map_full").map(|e| u(e, "count")).sum();
    let (lower, upper, in_block, others) = pinmap_bounds(&r.trace)?;
    ensure!(
        (lower..=upper).contains(&full),
        "{full} pages counted as pin_map_full; 96 pages, {in_block} of them into the one block and the rest into 24 folios ({others} held by earlier pins), must leave {lower} to {upper} out"
    );
    let kinds: BTreeSet<&str> = hazards(r, "").filter(|h| pinners(h).iter().any(|p| p["path"] == "direct I/O")).filter_map(|h| h["kind"].as_str()).collect();
    for want in ["mkclean_while_pinned", "unmap_while_pinned", "truncate_while_pinned"] {
        ensure!(kinds.contains(want), "after the map emptied, no {want} for the direct I/O pin: {kinds:?}");
    }
    Ok(format!("{full} pages counted as pin_map_full ({lower} to {upper} expected: {in_block} pages in the block, {others} of 24 folios held before) while 96 were pinned; after release the 2018 sequence was caught ({})", kinds.into_iter().collect::<Vec<_>>().join(", ")))
}

/// What PINMAP's maps (24 folios, one block) must leave out of the 96 pages io_uring
/// registers, read from the trace: the block the first page opens keeps the pages of
/// its pfns (pinwatch_common::BLOCK_PAGES of them); PINS takes 24 folios, less those still held by the pins streamed before
/// (exec's FOLL_GET argument pages, put inline unseen until swept: at most that many).
/// Returns the bounds, the pages of the block and the folios held before.
fn pinmap_bounds(trace: &[Value]) -> Result<(u64, u64, u64, u64)> {
    let is_lt = |e: &Value| e["event"] == "pin" && u(e, "nr_pages") == 96 && e["flags"].as_array().is_some_and(|f| f.iter().any(|f| f == "LONGTERM"));
    let i = trace.iter().position(is_lt).context("no long-term pin of the 96 pages in the trace")?;
    let pfns: BTreeSet<u64> = trace[i]["pfns"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
    ensure!(pfns.len() == 96, "the long-term pin names {} distinct pfns, not 96", pfns.len());
    ensure!(!trace[..i].iter().any(|e| e["found"] == true), "pins found at start: the one block may be theirs");
    let block = pinwatch_common::BLOCK_SHIFT;
    let first = trace[i]["pfns"][0].as_u64().context("no first pfn")? >> block;
    let in_block = pfns.iter().filter(|p| **p >> block == first).count() as u64;
    let mut held = BTreeSet::new();
    for e in &trace[..i] {
        let named = e["pfns"].as_array().into_iter().flatten().filter_map(Value::as_u64);
        match e["event"].as_str() {
            Some("pin") => held.extend(named),
            Some("unpin") => named.for_each(|p| {
                held.remove(&p);
            }),
            _ => {}
        }
    }
    let others = (held.len() as u64).min(24);
    Ok((96 - in_block - 24, 96 - in_block - (24 - others), in_block, others))
}

/// `record` killed by SIGKILL after the hazard sequence: the trace on disk has every
/// kind of hazard the uninterrupted run of the same scenario had, ends with a whole
/// line, and has no stop line (nothing ran after the kill).
pub fn check_kill9(killed: &Recorded, whole: &Recorded) -> Result<String> {
    ensure!(killed.ended, "the guest never finished the kill -9 run");
    ensure!(killed.rc == Some(137), "record exited {:?}, not killed by SIGKILL (137): {}", killed.rc, killed.err.join(" | "));
    scenario_line(killed)?;
    ensure!(killed.trace.first().is_some_and(|e| e["event"] == "start"), "the trace on disk does not begin with its start line");
    ensure!(!killed.trace.iter().any(|e| e["event"] == "stop"), "a stop line after SIGKILL");
    let kinds = |r: &Recorded| -> BTreeSet<String> { hazards(r, "").map(|h| h["kind"].as_str().unwrap_or("").to_string()).collect() };
    let (got, want) = (kinds(killed), kinds(whole));
    ensure!(!want.is_empty(), "the uninterrupted hazard run has no hazards to compare with");
    ensure!(got == want, "on disk after kill -9: {got:?}; the uninterrupted run had {want:?}");
    let n = hazards(killed, "").count();
    Ok(format!("{n} hazards of every kind the whole run had ({}) were on disk before the kill", want.into_iter().collect::<Vec<_>>().join(", ")))
}

/// The start-up scan (FOUND_PLAN): the holder's 8 pages found pinned (long-term, of
/// tmpfs, marked found), named as the pinner of the truncate, released to nothing by
/// the unregistration; the control's locked memfd neither found nor named.
pub fn check_found(r: &Recorded) -> Result<String> {
    ensure!(r.ended, "the guest never finished the run");
    ensure!(r.rc == Some(0), "record exited {:?}: {}", r.rc, r.err.join(" | "));
    let said = scenario_lines(r, "memfd-truncate");
    let pid_of = |pin: bool| said.iter().find(|v| v["pin"] == pin).map(|v| u(v, "pid")).context("a scenario never said what it did");
    let (holder, control) = (pid_of(true)?, pid_of(false)?);
    ensure!(r.out.iter().filter(|l| l.contains("PINWATCH-SCENARIO-READY")).count() == 2, "the holder and the control did not both get their memory ready: {:?}", r.out);
    let found: Vec<&Value> = r.trace.iter().filter(|e| e["event"] == "pin" && e["found"] == true).collect();
    ensure!(found.iter().all(|p| u(p, "pid") == holder), "found pins of another process than the holder {holder}: {:?}", found.iter().map(|p| u(p, "pid")).collect::<Vec<_>>());
    let pages: u64 = found.iter().map(|p| u(p, "nr_pages")).sum();
    ensure!(pages == 8, "{pages} page(s) found pinned for the holder, not 8; stderr: {}", r.err.join(" | "));
    for p in &found {
        ensure!(p["func"] == "found at start", "found pin's func {}, not \"found at start\"", p["func"]);
        ensure!(p["flags"] == serde_json::json!(["PIN", "LONGTERM"]), "found pin flags {}, not PIN and LONGTERM (the holder is charged VmPin)", p["flags"]);
        ensure!(p["file"]["fs"] == "tmpfs", "found pin of {}, not the memfd's tmpfs", p["file"]);
    }
    let summary = r.err.iter().find(|l| l.contains("start-up scan:")).context("record never said what the start-up scan found")?;
    ensure!(summary.contains("8 page(s) pinned before pinwatch started, held by 1 process(es)"), "the scan's summary: {summary}");
    // No pin of the holder seen being taken: everything it holds came from the scan.
    ensure!(!r.trace.iter().any(|e| e["event"] == "pin" && e["found"] != true && u(e, "pid") == holder), "a pin of the holder seen being taken: it pinned before pinwatch started");
    let truncates: Vec<&Value> = hazards(r, "truncate_while_pinned").collect();
    ensure!(
        truncates.iter().any(|h| pinner_pids(h).contains(&Some(holder)) && pinners(h).iter().any(|p| p["func"] == "found at start")),
        "no truncate_while_pinned naming the holder {holder} and its pin as found at start: {truncates:?}"
    );
    ensure!(!r.trace.iter().any(|e| e["event"] == "hazard" && pinner_pids(e).contains(&Some(control))), "a hazard names the control {control}");
    let pfns: BTreeSet<u64> = found.iter().flat_map(|p| p["pfns"].as_array().into_iter().flatten().filter_map(Value::as_u64)).collect();
    let released: BTreeSet<u64> = r.trace.iter().filter(|e| e["event"] == "unpin").flat_map(|e| e["pfns"].as_array().into_iter().flatten().filter_map(Value::as_u64)).collect();
    let unreleased: Vec<&u64> = pfns.difference(&released).collect();
    ensure!(unreleased.is_empty(), "found pfns never released: {unreleased:?}");
    let stop = r.trace.iter().find(|e| e["event"] == "stop").context("no stop line")?;
    ensure!(!stop["held"].as_array().into_iter().flatten().any(|h| u(h, "pid") == holder), "the holder still holds pins at the end: {}", stop["held"]);
    Ok(format!(
        "holder {holder}: 8 pages found (PIN LONGTERM, tmpfs), {} truncate hazard(s) naming it, every found pfn released, none held at the end; control {control} (VmLck) silent; {}",
        truncates.len(),
        summary.trim_start_matches("pinwatch: ")
    ))
}

/// HUGE_PLAN: 8 MiB of transparent huge pages, then 8 MiB of hugetlbfs pages, pinned by
/// io_uring, each seen by top as the 8 MiB they hold in place (beside VmPin), then as
/// nothing.
pub fn check_huge(r: &Recorded) -> Result<String> {
    ensure!(r.ended, "the guest never finished the run");
    ensure!(r.rc == Some(0), "top exited {:?}: {}", r.rc, r.err.join(" | "));
    let said = scenario_lines(r, "iouring-fixed");
    let huge = kb_pairs(r, "PINWATCH-SCENARIO-HUGE ");
    ensure!(said.len() == 2 && huge.len() == 2, "the two scenarios (THP, hugetlbfs) did not both run: {:?}", r.out);
    // The hugetlbfs half runs under the HugeTLB vmemmap optimization wherever the
    // kernel has it (before 7.1 most tails then read as fake heads).
    let hvo = r.err.iter().find_map(|l| l.split_once("PINWATCH-HUGE hvo ").map(|(_, v)| v.trim().to_string())).unwrap_or_default();
    let hvo_said = match hvo.as_str() {
        "1" => "under the HugeTLB vmemmap optimization",
        "absent" => "(this kernel has no HugeTLB vmemmap optimization)",
        other => bail!("the HugeTLB vmemmap optimization could not be switched on: {other:?}"),
    };
    let last = r.trace.last().context("no refresh")?;
    let mut done = Vec::new();
    for ((s, (huge_kb, vmpin_kb)), what) in said.iter().zip(huge).zip(["transparent huge pages", "hugetlbfs pages"]) {
        let (pid, bytes) = (u(s, "pid"), u(s, "pages") * 4096);
        ensure!(huge_kb * 1024 >= bytes, "only {huge_kb} kB of the buffer are {what} (THP: {}), not the {bytes} bytes the check needs", r.err.first().map(String::as_str).unwrap_or("?"));
        ensure!(vmpin_kb * 1024 == bytes, "the kernel charges VmPin {vmpin_kb} kB for the {bytes} bytes of {what} registered");
        let seen: Vec<u64> = r.trace.iter().filter_map(|d| row(d, pid)).map(|p| p["longterm_bytes"].as_u64().unwrap_or(0)).collect();
        ensure!(seen.contains(&bytes), "{what}: no refresh shows pid {pid} with {bytes} bytes long-term pinned (what VmPin says): {seen:?}");
        ensure!(seen.iter().all(|b| *b <= bytes), "{what}: a refresh shows more than the {bytes} bytes pinned: {seen:?}");
        let after = row(last, pid).map(|p| p["pinned_bytes"].as_u64().unwrap_or(0)).unwrap_or(0);
        ensure!(after == 0, "{what}: pid {pid} still shows {after} bytes pinned after unregistering");
        done.push(format!("{what} (pid {pid}): {bytes} bytes long-term beside VmPin {vmpin_kb} kB, then 0"));
    }
    ensure!(last["lost_events"].as_u64() == Some(0), "top lost {} events: {}", last["lost_events"], last["lost_by_reason"]);
    Ok(format!("{}; hugetlbfs {hvo_said}", done.join("; ")))
}

/// What the scenarios of a run said they did (`PINWATCH-SCENARIO {json}`), of one kind.
fn scenario_lines(r: &Recorded, scenario: &str) -> Vec<Value> {
    r.tagged_json("PINWATCH-SCENARIO ").into_iter().filter(|v| v["scenario"] == scenario).collect()
}

/// Pairs of kilobyte figures a scenario printed after `prefix`.
fn kb_pairs(r: &Recorded, prefix: &str) -> Vec<(u64, u64)> {
    r.tagged(prefix)
        .filter_map(|l| l.split_once(' ').map(|(a, b)| (a.trim().parse().unwrap_or(0), b.trim().parse().unwrap_or(0))))
        .collect()
}

/// One process's row in one of top's JSON refreshes.
fn row(doc: &Value, pid: u64) -> Option<Value> {
    doc["processes"].as_array().and_then(|ps| ps.iter().find(|p| p["pid"].as_u64() == Some(pid)).cloned())
}

/// VFIO (in the huge part's top session): QEMU's `edu` device bound to vfio-pci behind
/// the emulated Intel IOMMU, 4 MiB of anonymous memory mapped for DMA through its group.
/// top must show the 4 MiB long-term pinned by path VFIO, beside the kernel's VmLck
/// (type1 charges VmLck, not VmPin), say so, and show nothing once it is unmapped.
pub fn check_vfio(r: &Recorded) -> Result<String> {
    ensure!(r.ended, "the guest never finished the run");
    let setup: Vec<&str> = r.err.iter().filter(|l| l.contains("PINWATCH-HUGE vfio")).map(String::as_str).collect();
    let said = scenario_lines(r, "vfio-map");
    let s = said.first().with_context(|| format!("the VFIO scenario did not map: {setup:?}; {:?}", r.out.iter().filter(|l| !l.starts_with("PINWATCH")).collect::<Vec<_>>()))?;
    let (vmlck_kb, vmpin_kb) = *kb_pairs(r, "PINWATCH-SCENARIO-VMLCK ").first().context("the VFIO scenario did not say its VmLck")?;
    ensure!(setup.iter().any(|l| l.contains("vfio-rc 0")), "the VFIO scenario failed: {setup:?}");
    let (pid, bytes) = (u(s, "pid"), u(s, "pages") * 4096);
    ensure!(vmlck_kb * 1024 == bytes && vmpin_kb == 0, "the kernel charges VmLck {vmlck_kb} kB, VmPin {vmpin_kb} kB for {bytes} bytes mapped: not type1's accounting");
    let rows: Vec<Value> = r.trace.iter().filter_map(|d| row(d, pid)).collect();
    let full = rows
        .iter()
        .find(|p| p["longterm_bytes"].as_u64() == Some(bytes))
        .with_context(|| format!("no refresh shows pid {pid} with {bytes} bytes long-term pinned: {:?}", rows.iter().map(|p| &p["longterm_bytes"]).collect::<Vec<_>>()))?;
    ensure!(rows.iter().all(|p| p["pinned_bytes"].as_u64().unwrap_or(0) <= bytes), "a refresh shows more than the {bytes} bytes mapped");
    ensure!(full["by_path"]["VFIO"].as_u64() == Some(bytes), "the {bytes} bytes are not all by path VFIO: {}", full["by_path"]);
    ensure!(full["vmlck_bytes"].as_u64() == Some(bytes), "top's row does not show VmLck {bytes}: {}", full["vmlck_bytes"]);
    let said_why = full["disagreement"].as_str().unwrap_or("");
    ensure!(said_why.contains("VmLck"), "top does not say the pins are charged to VmLck: {said_why:?}");
    let last = r.trace.last().context("no refresh")?;
    let after = row(last, pid).map(|p| p["pinned_bytes"].as_u64().unwrap_or(0)).unwrap_or(0);
    ensure!(after == 0, "pid {pid} still shows {after} bytes pinned after VFIO_IOMMU_UNMAP_DMA");
    Ok(format!(
        "pid {pid}: {bytes} bytes long-term by path VFIO beside VmLck {vmlck_kb} kB (VmPin 0): \"{said_why}\", then 0; {}",
        setup.first().copied().unwrap_or("").trim_start_matches("PINWATCH-HUGE ")
    ))
}

/// The story `pinwatch report --story --file /mnt/hazard` tells of the hazard scenario:
/// the file named by its path; the pin first, then mkclean, unmap and truncate in the
/// order the scenario did them (msync, MADV_PAGEOUT, ftruncate), the release last.
pub fn story_order(story: &str) -> Result<()> {
    ensure!(story.lines().any(|l| l.starts_with("== file /mnt/hazard")), "no story titled with the file's path /mnt/hazard");
    let file_story: String = story
        .split("\n== ")
        .find(|s| s.trim_start_matches("== ").starts_with("file /mnt/hazard"))
        .unwrap_or_default()
        .to_string();
    let steps: Vec<&str> = file_story
        .lines()
        .filter(|l| l.trim_start().starts_with('+'))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let first = |w: &str| steps.iter().position(|s| *s == w);
    let (Some(pin), Some(mkclean), Some(unmap), Some(truncate)) = (first("pin"), first("mkclean"), first("unmap"), first("truncate")) else {
        bail!("the story lacks a pin, mkclean, unmap or truncate step: {steps:?}");
    };
    ensure!(pin == 0 && pin < mkclean && mkclean < unmap && unmap < truncate, "steps out of order: {steps:?}");
    ensure!(matches!(steps.last(), Some(&"release") | Some(&"dirty")), "the story does not end with the release or the dirtying: {steps:?}");
    Ok(())
}

/// The guest's page tables from its `paging` line: whether the CPU offers la57, and
/// the vmalloc area's size (/proc/meminfo's VmallocTotal), 32 TiB under 4-level paging
/// and 12800 TiB under 5-level. Returns the levels and what to say.
pub fn paging(r: &Recorded) -> Result<(u8, String)> {
    let line = r.out.first().context("the guest printed no paging line")?;
    let mut it = line.split_whitespace();
    let (Some(flag), Some(kb)) = (it.next(), it.next().and_then(|v| v.parse::<u64>().ok())) else {
        bail!("unreadable paging line {line:?}");
    };
    // Anything past 4-level's 32 TiB is 5-level's.
    let levels = if kb > 1 << 35 { 5 } else { 4 };
    ensure!(levels == 4 || flag == "la57", "a vmalloc area of {kb} kB without la57: {line:?}");
    let offered = if flag == "la57" { "the CPU offers la57" } else { "la57 not in use" };
    Ok((levels, format!("{levels}-level page tables ({offered}; VmallocTotal {kb} kB): every pfn check of this boot ran on them")))
}

/// What the kernel logged through the boot's run. From 6.1 pinwatch has some hash maps
/// allocated as they fill (doctor's maps_on_demand); before, the verifier warns about
/// such a map in a tracing program with a WARN in the kernel log, so there they must
/// stay preallocated. Fails on that warning, on a kernel BUG, or when doctor's
/// maps_on_demand is not what the kernel's version calls for; other warnings (a
/// filesystem's, about a pinned page the hazard scenarios dirty) are reported.
pub fn klog(r: &Recorded, maps_on_demand: Option<bool>, v: (u32, u32)) -> Result<String> {
    let want = v >= (6, 1);
    ensure!(maps_on_demand == Some(want), "doctor says maps_on_demand {maps_on_demand:?} on {}.{}; want {want}", v.0, v.1);
    let bad: Vec<&String> = r.out.iter().filter(|l| l.contains("run-time allocat") || l.contains("BUG:")).collect();
    ensure!(bad.is_empty(), "the kernel logged: {bad:?}");
    let warnings: Vec<&String> = r.out.iter().filter(|l| l.contains("WARNING:")).collect();
    let maps = if want { "allocated as they fill" } else { "preallocated" };
    Ok(match warnings.first() {
        None => format!("no warning, no BUG; the maps of calls in flight and per-process counts {maps}"),
        Some(w) => format!("no BUG, no warning about run-time allocated maps; the maps of calls in flight and per-process counts {maps}; {} other warning(s), the first: {w}", warnings.len()),
    })
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
        serde_json::json!({"event":"pin","pid":pid,"ts_ns":ts,"func":"pin_user_pages_remote","flags":["PIN","WRITE"],"path":"process_vm","nr_pages":pfns.len(),"pfns":pfns,"file":{"dev":"1:0","ino":12,"fs":"ext4"}})
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
        // taken by another subsystem than the scenario's
        let mut other = good.clone();
        other[0]["path"] = serde_json::json!("other");
        assert!(check("pvm", &rec(&other, 5), v).is_err());
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

    fn hazard(kind: &str, pfn: u64, pid: u64) -> Value {
        let stack = ["page_mkclean_one+0x5", "__do_sys_msync+0x1d6", "do_madvise+0xd55", "do_sys_ftruncate+0x41"];
        serde_json::json!({"event":"hazard","kind":kind,"severity":"critical","pfn":pfn,"pinner":{"pid":pid,"path":"direct I/O"},"actor":{"pid":pid,"stack":stack}})
    }

    fn start(via: &str) -> Value {
        let hooks: Vec<String> = ["unmap", "mkclean", "writeback", "dirty"].iter().map(|r| format!("{r}: f via {via}")).collect();
        serde_json::json!({"event":"start","hooks":hooks})
    }

    #[test]
    fn top_and_limit_checks_fail_on_each_defect() {
        let doc = |pid: u64, lt: u64, vmpin: u64| serde_json::json!({"processes":[{"pid":pid,"pinned_bytes":lt,"longterm_bytes":lt,"vmpin_bytes":vmpin,"by_caller":{"io_pin_pages":lt},"by_path":{"io_uring":lt}}],"totals":{},"lost_events":0});
        let empty = serde_json::json!({"processes":[],"totals":{},"lost_events":0});
        let kinds: serde_json::Map<String, Value> = SEQUENCE.iter().map(|k| (k.to_string(), serde_json::json!(8))).collect();
        let last = serde_json::json!({"processes":[],"totals":{"gup_calls":301,"unstreamed_bytes":0},"lost_events":0,"hazards_by_kind":kinds});
        let b = 2 * 4096;
        let good = vec![empty.clone(), doc(5, b, b), last.clone()];
        assert!(check("top", &rec(&good, 5), (6, 12)).is_ok(), "{:?}", check("top", &rec(&good, 5), (6, 12)));
        // monitoring: calls not counted, transient pins left held, a hazard kind missed, loss
        for (key, bad) in [("/totals/gup_calls", serde_json::json!(12)), ("/totals/unstreamed_bytes", serde_json::json!(4096)), ("/hazards_by_kind/dirty_after_unmap", serde_json::json!(7)), ("/lost_events", serde_json::json!(1))] {
            let mut l = last.clone();
            *l.pointer_mut(key).unwrap() = bad;
            assert!(check("top", &rec(&[empty.clone(), doc(5, b, b), l], 5), (6, 12)).is_err(), "{key}");
        }
        let empty = last;
        // 7.x: root's io_uring pins are not charged to VmPin
        assert!(check("top", &rec(&good, 5), (7, 2)).is_err());
        assert!(check("top", &rec(&[empty.clone(), doc(5, b, 0), empty.clone()], 5), (7, 2)).is_ok());
        // still pinned at the end, or never seen
        assert!(check("top", &rec(&[doc(5, b, b), doc(5, b, b)], 5), (6, 1)).is_err());
        assert!(check("top", &rec(&[empty.clone(), empty], 5), (6, 1)).is_err());
        let breach = |kind: &str, id: u64, value: u64| serde_json::json!({"event":"hazard","kind":kind,"pinner":{"pid":id},"limit":{"rule":"rlimit_memlock","scope":"process","id":id,"value":value,"limit":65536}});
        let mut t = vec![start("fentry"), pin(5, 20, &[1, 2]), breach("pin_limit_exceeded", 5, b)];
        assert!(check("memlock", &rec(&t, 5), (6, 1)).is_ok());
        assert!(check("memlock_ctl", &rec(&t, 5), (6, 1)).is_err());
        t.pop();
        assert!(check("memlock", &rec(&t, 5), (6, 1)).is_err());
        assert!(check("memlock_ctl", &rec(&t, 5), (6, 1)).is_ok());
    }

    #[test]
    fn hazard_checks_fail_on_each_defect() {
        let v = (6, 12);
        let mut good = vec![start("fentry"), pin(5, 20, &[1, 2])];
        for k in SEQUENCE {
            good.push(hazard(k, 1, 5));
            good.push(hazard(k, 2, 5));
        }
        assert!(check("hazard", &rec(&good, 5), v).is_ok(), "{:?}", check("hazard", &rec(&good, 5), v));
        // attached the wrong way
        let mut t = good.clone();
        t[0] = start("kprobe");
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        // a kind missing one pfn
        let t: Vec<Value> = good.iter().filter(|e| !(e["kind"] == "dirty_after_unmap" && e["pfn"] == 2)).cloned().collect();
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        // the wrong pinner
        let mut t = good.clone();
        t[2] = hazard(SEQUENCE[0], 1, 6);
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        // a hazard on a page that was not pinned
        let mut t = good.clone();
        t.push(hazard("unmap_while_pinned", 3, 5));
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        // a folio order that cannot be (6.1 once read page[1]'s flags as the order)
        let mut t = good.clone();
        t[2]["order"] = serde_json::json!(64);
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        // the pin named as another subsystem's
        let mut t = good.clone();
        t[2]["pinner"]["path"] = serde_json::json!("io_uring");
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        // a hazard without the actor's stack, or one that does not reach the syscall
        let mut t = good.clone();
        t[2]["actor"]["stack"] = serde_json::json!([]);
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        let mut t = good.clone();
        t[2]["actor"]["stack"] = serde_json::json!(["page_mkclean_one+0x5", "do_madvise+0xd55"]);
        assert!(check("hazard", &rec(&t, 5), v).is_err());
        // controls: silent passes, any hazard fails, no pin at all makes the
        // other-pages control vacuous
        let quiet = vec![start("fentry"), pin(5, 20, &[1, 2])];
        assert!(check("hazard_other", &rec(&quiet, 5), v).is_ok());
        let mut loud = quiet.clone();
        loud.push(hazard("unmap_while_pinned", 1, 5));
        assert!(check("hazard_other", &rec(&loud, 5), v).is_err());
        assert!(check("hazard_other", &rec(&[start("fentry")], 5), v).is_err());
    }

    #[test]
    fn the_kernel_log_check_fails_on_a_runtime_allocation_warning_or_the_wrong_maps() {
        let log = |lines: &[&str]| Recorded { out: lines.iter().map(|l| l.to_string()).collect(), ..Default::default() };
        assert!(klog(&log(&[]), Some(true), (6, 12)).is_ok());
        assert!(klog(&log(&[]), Some(false), (5, 10)).is_ok());
        assert!(klog(&log(&["[ 1.0] WARNING: CPU: 0 PID: 9 at fs/ext4/inode.c:1 x"]), Some(true), (6, 1)).is_ok());
        let warned = log(&["[ 2.0] trace type BPF program uses run-time allocation", "[ 2.0] WARNING: CPU: 1 PID: 3 at kernel/bpf/verifier.c:1 x"]);
        assert!(klog(&warned, Some(false), (5, 10)).is_err(), "the verifier's warning fails");
        assert!(klog(&log(&["[ 3.0] BUG: kernel NULL pointer dereference"]), Some(true), (6, 12)).is_err());
        assert!(klog(&log(&[]), Some(true), (5, 10)).is_err(), "5.10 must keep them preallocated");
        assert!(klog(&log(&[]), Some(false), (6, 12)).is_err(), "6.12 must allocate them as they fill");
        assert!(klog(&log(&[]), None, (6, 12)).is_err(), "a doctor that does not say fails");
    }

    #[test]
    fn the_story_check_fails_on_a_story_out_of_order() {
        let story = |steps: &[&str]| {
            let mut s = String::from("== pinner pid 5: 3 hazard(s) ==\n  +0.1s  pin  x\n\n== file /mnt/hazard on ext4: 9 hazard(s) ==\n");
            for (i, w) in steps.iter().enumerate() {
                s += &format!("  +{i}.000000s  {w:<9} something\n                by pid 5 x\n");
            }
            s
        };
        assert!(story_order(&story(&["pin", "mkclean", "writeback", "unmap", "truncate", "release"])).is_ok());
        assert!(story_order(&story(&["pin", "unmap", "mkclean", "truncate", "release"])).is_err());
        assert!(story_order(&story(&["mkclean", "pin", "unmap", "truncate", "release"])).is_err());
        assert!(story_order(&story(&["pin", "mkclean", "unmap", "truncate"])).is_err());
        assert!(story_order(&story(&["pin", "mkclean", "truncate", "release"])).is_err());
        assert!(story_order(&story(&["pin", "mkclean", "unmap", "truncate", "release"]).replace("/mnt/hazard", "254:0 ino 12")).is_err());
    }

    #[test]
    fn the_pin_map_check_fails_without_loss_counted_or_without_recovery() {
        let start = serde_json::json!({"event":"start","pin_map_capacity":24,"pin_block_capacity":1});
        // 96 pages, 4 of them in the first page's block (pfns 1000 to 1003 of 992..1023);
        // before them exec pinned 2 folios, one of them released: 24 - 1 folios left.
        let pfns: Vec<u64> = (1000..1004).chain((0..92).map(|i| 5000 + 64 * i)).collect();
        let registered = serde_json::json!({"event":"pin","nr_pages":96,"flags":["PIN","LONGTERM"],"pfns":pfns});
        let exec = [serde_json::json!({"event":"pin","nr_pages":1,"flags":["GET"],"pfns":[7]}), serde_json::json!({"event":"pin","nr_pages":1,"flags":["GET"],"pfns":[8]}), serde_json::json!({"event":"unpin","pfns":[8]})];
        let lost = serde_json::json!({"event":"lost","reason":"pin_map_full","count":69});
        let caught = ["mkclean_while_pinned", "unmap_while_pinned", "truncate_while_pinned"].map(|k| hazard(k, 1, 5));
        let good: Vec<Value> = [start.clone()].into_iter().chain(exec.iter().cloned()).chain([registered.clone(), lost.clone()]).chain(caught.iter().cloned()).collect();
        assert!(check_pinmap(&rec(&good, 5)).is_ok(), "{:?}", check_pinmap(&rec(&good, 5)));
        for (n, why) in [(67, "fewer left out than the block and 24 folios allow"), (70, "more left out than the folios held before explain")] {
            let mut bad = good.clone();
            bad[5]["count"] = serde_json::json!(n);
            assert!(check_pinmap(&rec(&bad, 5)).is_err(), "{why}");
        }
        let unregistered: Vec<Value> = good.iter().filter(|e| e["nr_pages"] != 96).cloned().collect();
        assert!(check_pinmap(&rec(&unregistered, 5)).is_err(), "no registration in the trace");
        let silent: Vec<Value> = [start.clone(), registered.clone()].into_iter().chain(caught.iter().cloned()).collect();
        assert!(check_pinmap(&rec(&silent, 5)).is_err(), "a full map that is not counted");
        let blind: Vec<Value> = vec![start.clone(), registered.clone(), lost.clone(), caught[0].clone()];
        assert!(check_pinmap(&rec(&blind, 5)).is_err(), "no recovery after release");
        let other: Vec<Value> = [serde_json::json!({"event":"start"}), registered.clone(), lost].into_iter().chain(caught.iter().cloned()).collect();
        assert!(check_pinmap(&rec(&other, 5)).is_err(), "the capacity is not in the trace");
        let too_many = serde_json::json!({"event":"lost","reason":"pin_map_full","count":80});
        let unblocked: Vec<Value> = [start.clone(), registered, too_many].into_iter().chain(caught.iter().cloned()).collect();
        assert!(check_pinmap(&rec(&unblocked, 5)).is_err(), "the block took no page");
    }
}

