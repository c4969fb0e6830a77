//! `cargo xtask bench`: what pinwatch costs, measured in one boot of a lab kernel, as
//! ratios against a baseline and against the floor run in the same boot.
//!
//! Workloads, run one after the other in every mode:
//! - dio: one-page O_DIRECT reads of an ext4 file, each a GUP call, a bio and a release;
//! - writeback: dirty and msync every page of a shared mapping (the hazard hooks on pages
//!   nobody pins: one map lookup each, no record);
//! - fio-psync and fio-uring: Debian's fio, 4 KiB O_DIRECT random reads with psync and
//!   with io_uring (a real client; its own mean latency per read).
//!
//! Modes: the baseline (nothing attached); the floor (pinwatch's programs on the same
//! hooks, returning at once: what the hooks alone cost) under fentry and kprobe;
//! monitoring (`pinwatch top`) and `record` under fentry and kprobe; and bpftrace
//! counting pinned pages per pid on the GUP entry points, what a user would pick
//! instead. Each round runs every mode once, the order rotated round by round, and the
//! figures are medians. pinwatch's added time is read against the floor's added time.
//!
//! Then, untimed: each mode once more with the kernel's BPF statistics on
//! (kernel.bpf_stats_enabled), for each program's run count and run time per read, and
//! the records a read costs; and the footprint (RSS idle and with 512 MiB pinned, maps).
//! Times are QEMU TCG times: the ratios are the result, not the nanoseconds.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};

use crate::{
    kernels::{self, Fetched},
    lab::{self, Recorded},
    util,
};

const DIO_OPS: usize = 3000;
const WB_PAGES: usize = 256;
const WB_ROUNDS: usize = 8;
const FIO_OPS: usize = 3000;
/// 512 MiB pinned, the scale the memory target is set at.
const FOOTPRINT_PAGES: usize = 131072;
/// A bench boot loads pinwatch about 40 times under a slow verifier.
const BENCH_LIMIT: Duration = Duration::from_secs(3600);

/// Every mode of a round. `base` is the baseline; `floor-*` the hooks alone.
/// `ring-fentry` and `engine-fentry` split record's cost by stage: records read and
/// dropped, then also through the engine (record-fentry also writes the trace).
pub const MODES: [&str; 10] = [
    "base",
    "floor-fentry",
    "floor-kprobe",
    "monitor-fentry",
    "monitor-kprobe",
    "ring-fentry",
    "engine-fentry",
    "record-fentry",
    "record-kprobe",
    "bpftrace",
];

/// Modes run once more with the kernel's BPF statistics on (the stage split adds
/// nothing there: its programs are record's).
const STATS_MODES: [&str; 6] = ["floor-fentry", "floor-kprobe", "monitor-fentry", "monitor-kprobe", "record-fentry", "record-kprobe"];

/// Workloads: the bench name each prints, and what the report calls it.
const WORKLOADS: [(&str, &str); 4] = [
    ("dio", "dio: 4 KiB O_DIRECT pread"),
    ("writeback", "writeback: dirty+msync, per page"),
    ("fio-psync", "fio psync 4 KiB randread"),
    ("fio-uring", "fio io_uring 4 KiB randread"),
];

/// The simplest useful bpftrace equivalent: pinned pages per pid, on the GUP entry
/// points' return (kretprobes, as people write it).
const BPFTRACE: &str = "kretprobe:get_user_pages*,kretprobe:pin_user_pages* /(int32)retval > 0/ { @pages[pid] = sum((int32)retval); }";

fn fio(engine: &str) -> String {
    format!(
        "fio --name={engine} --filename=/mnt/bench-fio --size=4M --bs=4k --rw=randread --direct=1 --ioengine={engine} \
         --number_ios={FIO_OPS} --lat_percentiles=1 --output-format=json > /tmp/fio.json && echo \"PINWATCH-FIO {engine} $(tr -d '\\n' < /tmp/fio.json)\""
    )
}

pub fn plan(rounds: usize) -> String {
    // Program names only: anything else in the variable is left out of the script.
    let dump: String = std::env::var("PINWATCH_BENCH_DUMP")
        .unwrap_or_default()
        .split(',')
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect::<Vec<_>>()
        .join(" ");
    // PINWATCH_BENCH_STATS_WORK=fio-psync or fio-uring: the kernel's statistics are
    // taken on that fio workload (as many reads as dio's) instead of the dio reads.
    let stats_work = match std::env::var("PINWATCH_BENCH_STATS_WORK").as_deref() {
        Ok("fio-psync") => fio("psync"),
        Ok("fio-uring") => fio("io_uring"),
        _ => format!("pinwatch-scenario bench-dio --file /mnt/bench-dio --ops {DIO_OPS}"),
    };
    let mut p = format!(
        r#"
mount -t tracefs nodev /sys/kernel/tracing 2> /dev/null
mount -t debugfs nodev /sys/kernel/debug 2> /dev/null
cat > /tmp/work.sh <<'EOF'
pinwatch-scenario bench-dio --file /mnt/bench-dio --ops {DIO_OPS} || exit 1
pinwatch-scenario bench-writeback --file /mnt/bench-wb --pages {WB_PAGES} --rounds {WB_ROUNDS} || exit 1
{psync} || exit 1
{uring} || exit 1
EOF
# Not named after a run: bench_mode removes /tmp/<run name>.* first.
cat > /tmp/hold-pins.sh <<'EOF'
exec pinwatch-scenario bench-footprint --pages {FOOTPRINT_PAGES} --hold-ms 2000
EOF
cat > /tmp/stats.sh <<'EOF'
{stats_work} || exit 1
echo "PINWATCH-STATS $(bpftool prog show --json)"
# PINWATCH_BENCH_DUMP (host environment, for looking into a program's cost): the
# verifier's rewrite of the programs named, and the .bss word, to the console
# (console.log). The guest's bpftool prints no machine code (no disassembler, and its
# `dump jited ... file` wrote nothing in stop 28's runs).
for p in {dump}; do
  bpftool prog dump xlated name $p | sed "s/^/XLATED $p: /" > /dev/console
done
[ -n "{dump}" ] && bpftool map dump name .bss 2>&1 | sed "s/^/BSS: /" > /dev/console
true
EOF
# Only the last line of a trace or of top's output goes back: thousands of events
# over the emulated serial port would take minutes. A trace's size is counted.
bench_mode() {{
  name=$1; mode=$2; work=$3
  say BEGIN $name
  rm -f /tmp/$name.*
  case $mode in
  base)
    sh $work > /tmp/$name.out 2> /tmp/$name.err; rc=$? ;;
  floor-*|record-*|ring-*|engine-*)
    how=
    case $mode in floor-*) how=--floor ;; ring-*) how="--stage ring" ;; engine-*) how="--stage engine" ;; esac
    pinwatch record $how --attach ${{mode#*-}} --force --output /tmp/$name.jsonl -- sh $work > /tmp/$name.out 2> /tmp/$name.err; rc=$?
    echo "PINWATCH-EVENTS $(wc -l < /tmp/$name.jsonl)" >> /tmp/$name.out
    tail -n 1 /tmp/$name.jsonl > /tmp/$name.last ;;
  monitor-*)
    pinwatch top -b -d 1 --format json --attach ${{mode#*-}} > /tmp/$name.top 2> /tmp/$name.err &
    P=$!
    i=0; while [ ! -s /tmp/$name.top ] && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
    sh $work > /tmp/$name.out 2>> /tmp/$name.err; rc=$?
    kill -TERM $P; wait $P || rc=$?
    tail -n 1 /tmp/$name.top > /tmp/$name.last ;;
  bpftrace)
    # Bounded: a bpftrace that hangs (it did once, idle, in a bench boot) costs ten
    # minutes and this round's figure, not the boot.
    timeout -s KILL 600 bpftrace -e '{BPFTRACE}' > /tmp/$name.bt 2>&1 &
    P=$!
    i=0; while ! grep -q Attaching /tmp/$name.bt && [ $i -lt 1800 ]; do sleep 0.1; kill -0 $P 2> /dev/null || break; i=$((i+1)); done
    if grep -q Attaching /tmp/$name.bt && kill -0 $P 2> /dev/null; then
      sleep 2
      timeout -s KILL 300 sh $work > /tmp/$name.out 2> /tmp/$name.err; rc=$?
      kill -INT $P
      i=0; while kill -0 $P 2> /dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
      kill -0 $P 2> /dev/null && {{ echo "bpftrace did not end on SIGINT" >> /tmp/$name.err; kill -KILL $P; rc=124; }}
      wait $P
    else
      echo "bpftrace did not start within 180 s" > /tmp/$name.err; rc=127
      kill -KILL $P 2> /dev/null; wait $P
    fi
    cat /tmp/$name.bt >> /tmp/$name.err ;;
  esac
  send_back $name $rc /tmp/$name.out /tmp/$name.err /tmp/$name.last
}}
# Warm-up: the first run of anything pays for page faults, caches and fio's layout.
sh /tmp/work.sh > /dev/null 2>&1
"#,
        psync = fio("psync"),
        uring = fio("io_uring"),
    );
    for r in 0..rounds {
        for i in 0..MODES.len() {
            let m = MODES[(i + r) % MODES.len()];
            p += &format!("bench_mode {m}-{} {m} /tmp/work.sh\n", r + 1);
        }
    }
    p += "echo 1 > /proc/sys/kernel/bpf_stats_enabled\n";
    for m in STATS_MODES.iter() {
        p += &format!("bench_mode stats-{m} {m} /tmp/stats.sh\n");
    }
    p += "echo 0 > /proc/sys/kernel/bpf_stats_enabled\n";
    p += "bench_mode footprint monitor-fentry /tmp/hold-pins.sh\n";
    p += "bench_mode footprint-record record-fentry /tmp/hold-pins.sh\n";
    p += &format!(
        r#"
# What the start-up scan costs: a process holds 1 GiB of io_uring buffers, pinned
# before pinwatch starts (charged VmPin: it runs as nobody), and top's one refresh
# says what its scan found and how long it took.
say BEGIN startscan
rm -f /tmp/scan.go
pinwatch-scenario iouring-fixed --pages {SCAN_PAGES} --buffers 256 --no-huge --memlock 4294967296 --as-nobody --until /tmp/scan.go > /tmp/startscan.out 2>&1 &
H=$!
i=0; while ! grep -q READY /tmp/startscan.out && [ $i -lt 6000 ]; do sleep 0.1; kill -0 $H 2> /dev/null || break; i=$((i+1)); done
echo "PINWATCH-VMPIN $(grep VmPin /proc/$H/status)" >> /tmp/startscan.out
pinwatch top -b -n 1 -d 1 --format json --pin-map-capacity {SCAN_CAPACITY} > /dev/null 2> /tmp/startscan.err; rc=$?
touch /tmp/scan.go
wait $H
send_back startscan $rc /tmp/startscan.out /tmp/startscan.err
"#
    );
    p
}

/// The start-up scan's holder: 1 GiB of base pages, and a pin map with room for them.
const SCAN_PAGES: usize = 262_144;
const SCAN_CAPACITY: usize = 393_216;

/// What top's start-up scan line says: pages found, pages read, milliseconds.
fn start_scan(results: &BTreeMap<String, Recorded>) -> Result<Value, String> {
    let r = results.get("startscan").ok_or("startscan: never ran")?;
    if r.rc != Some(0) {
        return Err(format!("startscan: top exited {:?}: {}", r.rc, r.err.join(" | ")));
    }
    let line = r.err.iter().find(|l| l.contains("start-up scan:")).ok_or_else(|| format!("startscan: top never said what its scan found: {}", r.err.join(" | ")))?;
    let number_before = |marker: &str| -> Option<u64> {
        let head = &line[..line.find(marker)?];
        head.rsplit(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty())?.parse().ok()
    };
    let (Some(found), Some(read), Some(ms)) = (number_before(" page(s) pinned before"), number_before(" page(s) in "), number_before(" ms")) else {
        return Err(format!("startscan: unexpected line {line}"));
    };
    let vmpin_kb = r.out.iter().find_map(|l| l.strip_prefix("PINWATCH-VMPIN VmPin:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    Ok(json!({"pages_found": found, "pages_read": read, "millis": ms, "vmpin_kb": vmpin_kb, "holder_pages": SCAN_PAGES}))
}

/// The bench lines of one run, by workload: PINWATCH-BENCH from our workloads (ns for
/// all ops), PINWATCH-FIO from fio's JSON (its mean latency per read).
fn measures(r: &Recorded) -> BTreeMap<String, Value> {
    let mut m = BTreeMap::new();
    for l in &r.out {
        if let Some(v) = l.strip_prefix("PINWATCH-BENCH ").and_then(|j| serde_json::from_str::<Value>(j).ok()) {
            if let Some(b) = v["bench"].as_str() {
                m.insert(b.to_string(), v.clone());
            }
        } else if let Some((engine, j)) = l.strip_prefix("PINWATCH-FIO ").and_then(|s| s.split_once(' ')) {
            let Ok(v) = serde_json::from_str::<Value>(j) else { continue };
            let read = &v["jobs"][0]["read"];
            let (mean, ios) = (read["lat_ns"]["mean"].as_f64(), read["total_ios"].as_u64());
            // fio's own percentile of submission plus completion (--lat_percentiles).
            let p50 = read["lat_ns"]["percentile"]["50.000000"].as_f64();
            if let (Some(mean), Some(ios)) = (mean, ios) {
                let name = if engine == "psync" { "fio-psync" } else { "fio-uring" };
                m.insert(name.to_string(), json!({"bench": name, "ops": ios, "ns": mean * ios as f64, "p50_ns": p50}));
            }
        }
    }
    m
}

/// A run must have ended well and, under pinwatch, lost nothing, or its times mean little.
fn trouble(name: &str, mode: &str, r: &Recorded) -> Option<String> {
    if !r.ended || r.rc != Some(0) {
        let why: Vec<&String> = r.err.iter().rev().take(6).collect();
        return Some(format!("{name}: exit {:?}: {why:?}", r.rc));
    }
    let last = r.trace.last();
    let lost = match mode.split('-').next() {
        Some("floor" | "record" | "ring" | "engine") => last.and_then(|s| s["lost_total"].as_u64()),
        Some("monitor") => last.and_then(|d| d["lost_events"].as_u64()),
        _ => return None,
    };
    match lost {
        Some(0) => None,
        Some(n) => Some(format!("{name}: pinwatch lost {n} record(s)")),
        None => Some(format!("{name}: no final stop event or refresh")),
    }
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// How much a mode's rounds scatter: the median absolute deviation from their median.
pub fn scatter(v: &[f64]) -> f64 {
    let Some(m) = median(v.to_vec()) else { return 0.0 };
    median(v.iter().map(|x| (x - m).abs()).collect()).unwrap_or(0.0)
}

/// The run `name` of `mode` if it ran and ended well; else what went wrong, in `problems`.
fn good_run<'a>(results: &'a BTreeMap<String, Recorded>, name: &str, mode: &str, problems: &mut Vec<String>) -> Option<&'a Recorded> {
    let Some(rec) = results.get(name) else {
        problems.push(format!("{name}: never ran"));
        return None;
    };
    if let Some(t) = trouble(name, mode, rec) {
        problems.push(t);
        return None;
    }
    Some(rec)
}

/// How a round's time per op is read from its workload's line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stat {
    /// All ops' time over their number: what the workload took, stalls included.
    Mean,
    /// The median op (fio's 50th percentile, the dio reads', the writeback rounds'):
    /// what one op costs, untouched by the emulator's stalls, which under TCG land on a
    /// few ops and move the mean of a whole round by 20%.
    Median,
}

impl Stat {
    /// The report's key for the figures read this way.
    pub fn key(self) -> &'static str {
        match self {
            Stat::Mean => "workloads",
            Stat::Median => "workloads_p50",
        }
    }
}

/// ns per op of every good round of one mode for one workload, read both ways.
#[derive(Debug, Default, PartialEq)]
pub struct PerOp {
    mean: Vec<f64>,
    /// Only the rounds whose line gives its median op.
    median: Vec<f64>,
}

impl PerOp {
    fn get(&self, stat: Stat) -> &[f64] {
        match stat {
            Stat::Mean => &self.mean,
            Stat::Median => &self.median,
        }
    }
}

/// Every good round of `mode` for `bench`, each line read once; what went wrong into
/// `problems`, once per round.
fn per_op(results: &BTreeMap<String, Recorded>, mode: &str, bench: &str, rounds: usize, problems: &mut Vec<String>) -> PerOp {
    let mut out = PerOp::default();
    for r in 1..=rounds {
        let name = format!("{mode}-{r}");
        let Some(rec) = good_run(results, &name, mode, problems) else { continue };
        let measures = measures(rec);
        let Some(m) = measures.get(bench) else {
            problems.push(format!("{name}: no {bench} measure"));
            continue;
        };
        out.mean.push(m["ns"].as_f64().unwrap_or(f64::NAN) / m["ops"].as_f64().unwrap_or(f64::NAN));
        out.median.extend(m["p50_ns"].as_f64());
    }
    out
}

/// What each mode adds per op, and how that compares with the floor of its attach type.
pub fn figures(medians: &BTreeMap<&str, Option<f64>>, noise: f64) -> Value {
    let base = medians.get("base").copied().flatten();
    let mut out = json!({"baseline_ns_per_op": base, "baseline_noise_ns": noise});
    for (m, v) in medians.iter().filter(|(m, _)| **m != "base") {
        let added = v.zip(base).map(|(v, b)| v - b);
        let floor = m.split_once('-').and_then(|(_, at)| medians.get(format!("floor-{at}").as_str()).copied().flatten());
        let floor_added = floor.zip(base).map(|(f, b)| f - b);
        out[*m] = json!({
            "ns_per_op": v,
            "ratio_to_baseline": v.zip(base).map(|(v, b)| v / b),
            "added_ns": added,
            // Added time over the floor's added time: where the floor is lost in the
            // noise (its added time within the baseline's scatter between rounds), this
            // ratio divides by noise and says nothing; read the ratio to the baseline.
            "added_vs_floor": added.zip(floor_added).filter(|(_, f)| *f > noise.max(0.0)).map(|(a, f)| a / f),
        });
    }
    out
}

/// Per program of a BPF statistics run: runs and ns per dio read, largest first.
fn program_stats(r: &Recorded) -> Option<Value> {
    let line = r.out.iter().find_map(|l| l.strip_prefix("PINWATCH-STATS "))?;
    let progs: Value = serde_json::from_str(line).ok()?;
    let mut v: Vec<(String, u64, u64)> = progs
        .as_array()?
        .iter()
        .filter_map(|p| Some((p["name"].as_str()?.to_string(), p["run_cnt"].as_u64().unwrap_or(0), p["run_time_ns"].as_u64().unwrap_or(0))))
        .filter(|(_, n, _)| *n > 0)
        .collect();
    v.sort_by_key(|(_, _, t)| std::cmp::Reverse(*t));
    let ops = DIO_OPS as f64;
    let total: u64 = v.iter().map(|(_, _, t)| t).sum();
    Some(json!({
        "ns_per_read": total as f64 / ops,
        "programs": v.iter().map(|(n, c, t)| json!({"name": n, "runs_per_read": *c as f64 / ops, "ns_per_read": *t as f64 / ops})).collect::<Vec<_>>(),
    }))
}

/// Events of the synthesized trace `pinwatch report` replays on the host.
const REPLAY_EVENTS: usize = 600_000;

/// A trace of direct-I/O-like traffic: one-page pins and their releases, in many
/// processes, with a few long-term pins held throughout.
fn synthesize_trace(path: &std::path::Path, events: usize) -> Result<()> {
    use std::io::Write as _;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(w, r#"{{"event":"start","format":"2.0","hooks":[],"kernel":"synthetic","limits":{{"memlock":true}},"mode":"full","pin_map_capacity":262144,"version":"0.1.0"}}"#)?;
    let mut ts = 1_000_000u64;
    for i in 0..events / 2 {
        ts += 1000;
        let (pid, pfn) = (1000 + (i % 64) as u64, 100_000 + (i % 4096) as u64);
        writeln!(w, r#"{{"caller":"iomap_dio_bio_iter","cgroup_id":1,"comm":"fio","end":{},"event":"pin","file_pages":0,"flags":["PIN","WRITE"],"func":"pin_user_pages_fast","gup_flags":1,"nr_pages":1,"nr_requested":1,"path":"direct I/O","pfns":[{pfn}],"pid":{pid},"start":{},"tid":{pid},"ts_ns":{ts},"uid":0}}"#, 0x7f00_0000_1000u64 + 4096, 0x7f00_0000_1000u64)?;
        writeln!(w, r#"{{"comm":"fio","dirty":true,"event":"unpin","func":"unpin_user_page","pfns":[{pfn}],"pid":{pid},"release":"unpin","tid":{pid},"ts_ns":{}}}"#, ts + 500)?;
    }
    writeln!(w, r#"{{"event":"stop","hazards":{{}},"held":[],"lost_total":0,"ts_ns":{}}}"#, ts + 1000)?;
    w.flush()?;
    Ok(())
}

/// Replays of the synthesized trace: the median is the figure (this host's own speed
/// moves between runs).
const REPLAY_RUNS: usize = 5;

/// `pinwatch report` over a synthesized trace, on one core of this machine.
fn replay_speed(pinwatch: &std::path::Path) -> Result<Value> {
    let dir = util::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let trace = dir.join("replay.jsonl");
    synthesize_trace(&trace, REPLAY_EVENTS)?;
    let mut runs = Vec::new();
    for _ in 0..REPLAY_RUNS {
        let start = std::time::Instant::now();
        let out = std::process::Command::new("taskset")
            .args(["-c", "0"])
            .arg(pinwatch)
            .args(["report", "--format", "json"])
            .arg(&trace)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .context("running pinwatch report under taskset")?;
        runs.push(start.elapsed().as_secs_f64());
        // 0: nothing to report; 1 would mean the replay disagreed with the trace.
        if !out.status.success() {
            let _ = std::fs::remove_file(&trace);
            bail!("pinwatch report on the synthesized trace: {} {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
    }
    let _ = std::fs::remove_file(&trace);
    let secs = median(runs.clone()).unwrap_or(f64::NAN);
    Ok(json!({"events": REPLAY_EVENTS + 2, "seconds": secs, "runs_seconds": runs, "events_per_second": (REPLAY_EVENTS + 2) as f64 / secs}))
}

fn extra_binaries() -> Vec<PathBuf> {
    crate::LAB_TOOLS.iter().chain(&["/usr/bin/bpftrace"]).map(PathBuf::from).filter(|p| p.exists()).collect()
}

/// What the guest's clock measures in a bench boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Clock {
    /// QEMU's -icount: one ns per guest instruction, idle time skipped. Rounds of one
    /// mode agree to within a percent, where under the host's clock they scatter by 15 to
    /// 25% with this host's load; what it cannot show is what an instruction costs
    /// beyond being one (a cache miss, a lock's wait, the host's own speed).
    Instructions,
    /// The host's time as the emulation runs.
    Host,
}

impl Clock {
    fn says(self) -> &'static str {
        match self {
            Clock::Instructions => "guest instructions (QEMU -icount shift=0: 1 ns each, idle skipped)",
            Clock::Host => "the host's time (QEMU TCG as it runs)",
        }
    }
}

pub fn run(kernel_names: &[String], rounds: usize, check: bool, clock: Clock, bins: &mut lab::Binaries) -> Result<bool> {
    let series = crate::selected(kernel_names)?;
    let conf = kernels::update()?;
    bins.extra = extra_binaries();
    for needed in ["fio", "bpftool"] {
        if !bins.extra.iter().any(|p| p.file_name().is_some_and(|f| f == needed)) {
            bail!("{needed} is not installed here (`cargo xtask setup` installs it)");
        }
    }
    let replay = replay_speed(&bins.pinwatch)?;
    println!("bench: pinwatch report replays {:.2}M events per second on one core of this machine", replay["events_per_second"].as_f64().unwrap_or(0.0) / 1e6);
    let mut ok = true;
    let mut tables = Vec::new();
    for s in series {
        let Fetched::Ready(k) = kernels::fetch(&conf, &s)? else { bail!("kernel {} is not available", s.name) };
        let work: PathBuf = util::cache_dir().join("bench").join(&k.release);
        std::fs::create_dir_all(&work)?;
        println!("bench: Debian {} under QEMU TCG, {rounds} rounds (mode order rotated), medians; the clock: {}", k.release, clock.says());
        let img = lab::build_initramfs(&k, bins, &plan(rounds), &work)?;
        let boot = lab::boot_with_memory(&k, &img, &work, BENCH_LIMIT, "3G", None, false, clock == Clock::Instructions)?;
        let results = lab::parse(&boot.results);
        let (mut report, problems) = report(&k.release, rounds, &results);
        report["replay"] = replay.clone();
        report["clock"] = json!(clock.says());
        print(&report);
        for p in &problems {
            println!("  PROBLEM {p}");
        }
        ok &= problems.is_empty();
        if check {
            let missed = misses(&report);
            for m in &missed {
                println!("  MISSED {m}");
            }
            if missed.is_empty() {
                println!("  every target met");
            }
            ok &= missed.is_empty();
        }
        let out = util::workspace_root().join("target/bench");
        std::fs::create_dir_all(&out)?;
        let file = out.join(format!("{}.json", k.release));
        std::fs::write(&file, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", file.display()))?;
        std::fs::write(file.with_extension("md"), markdown(&report))?;
        tables.push(readme_block(&report));
        println!("  written to {} (and the README's table to {})", file.display(), file.with_extension("md").display());
    }
    // The README's table is a timed one: a run of no rounds (the kernel's statistics,
    // the footprint and the scan alone) leaves it as it is and says so.
    if rounds == 0 {
        println!("  README.md: its cost table was left as it is (no timed rounds in this run; the figures are in target/bench)");
    } else {
        update_readme(&tables.join("\n"))?;
    }
    Ok(ok)
}

/// One kernel's part of the README's table: the timings, the kernel's own figures per
/// read, the footprint and the replay speed.
fn readme_block(report: &Value) -> String {
    let mut s = format!("Measured on Debian {} under QEMU TCG, 2 vCPUs, the guest's clock {}, {} rounds (medians; each cell: time per op, its ratio to the baseline, and added time over the floor's added time of the same attach type where the floor rose above the noise, the median absolute deviation of the baseline's rounds):\n\n", report["kernel"].as_str().unwrap_or("?"), report["clock"].as_str().unwrap_or("(not said: the host's time)"), report["rounds"]);
    s += &markdown(report);
    s += "\nPer dio read, from the kernel's BPF statistics (all of pinwatch's programs; trace lines per read under record):\n\n| mode | BPF ns per read | busiest programs | trace lines per read |\n|---|---|---|---|\n";
    for m in STATS_MODES.iter() {
        let st = &report["stats"][*m];
        let top: Vec<String> = st["programs"].as_array().into_iter().flatten().take(3).map(|p| format!("{} {:.0} ns", p["name"].as_str().unwrap_or("?"), p["ns_per_read"].as_f64().unwrap_or(0.0))).collect();
        s += &format!(
            "| {m} | {} | {} | {} |\n",
            st["ns_per_read"].as_f64().map(|v| format!("{v:.0}")).unwrap_or_else(|| "-".into()),
            top.join(", "),
            st["trace_lines_per_read"].as_f64().map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into())
        );
    }
    for (key, who) in [("footprint", "monitoring (top)"), ("footprint_record", "recording")] {
        let f = &report[key];
        if f.is_object() {
            s += &format!(
                "\nFootprint {who}: RSS {:.1} MiB idle, {:.1} MiB while io_uring holds {} MiB pinned, once settled (at most {:.1} on the way; {:.0} user bytes per pinned page); the BPF maps charge {:.1} MiB idle and {:.1} MiB while held ({:.0} bytes per pinned page at that size, {:.0} of them added by the pins).\n",
                f["rss_idle_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                f["rss_held_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                f["pages"].as_u64().unwrap_or(0) * 4 / 1024,
                f["rss_held_peak_kb"].as_f64().or(f["rss_held_kb"].as_f64()).unwrap_or(0.0) / 1024.0,
                f["user_bytes_per_pinned_page"].as_f64().unwrap_or(0.0),
                f["maps_memlock_idle_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                f["maps_memlock_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                f["kernel_bytes_per_pinned_page"].as_f64().unwrap_or(0.0),
                f["kernel_added_bytes_per_pinned_page"].as_f64().unwrap_or(0.0),
            );
            if let Some(list) = mib_largest_first(&f["rss_idle_parts_kb"], 1024.0, 1) {
                s += &format!("Idle RSS by mapping, MiB: {list}.\n");
            }
            if let Some(list) = mib_largest_first(&f["largest_maps_bytes"], (1 << 20) as f64, 2) {
                s += &format!("Largest maps while held (fdinfo: map type, key+value bytes, entries), MiB: {list}.\n");
            }
        }
    }
    let scan = &report["start_scan"];
    if scan.is_object() {
        s += &format!(
            "
Start-up scan (pins older than pinwatch): a process holding {} MiB of io_uring buffers (VmPin {} MiB) before top started; top's scan read {} pages and found {} pinned in {} ms.\n",
            scan["holder_pages"].as_u64().unwrap_or(0) * 4 / 1024,
            scan["vmpin_kb"].as_u64().map(|k| (k / 1024).to_string()).unwrap_or_else(|| "?".into()),
            scan["pages_read"],
            scan["pages_found"],
            scan["millis"],
        );
    }
    if let Some(r) = report["replay"]["events_per_second"].as_f64() {
        s += &format!("\n`pinwatch report` replays {:.2}M events per second on one core of the machine that ran the bench (the median of {REPLAY_RUNS} runs).\n", r / 1e6);
    }
    let missed = misses(report);
    s += &if missed.is_empty() { "\nEvery target met.\n".to_string() } else { format!("\nTargets missed ({}):\n\n{}\n", missed.len(), missed.iter().map(|m| format!("- {m}")).collect::<Vec<_>>().join("\n")) };
    s
}

/// A JSON object of sizes in units of 1/`per_mib` MiB as `name MiB, ...`, largest
/// first, with `digits` decimals; None when absent or empty.
fn mib_largest_first(sizes: &Value, per_mib: f64, digits: usize) -> Option<String> {
    let sizes = sizes.as_object().filter(|m| !m.is_empty())?;
    let mut list: Vec<(&String, f64)> = sizes.iter().map(|(k, v)| (k, v.as_f64().unwrap_or(0.0) / per_mib)).collect();
    list.sort_by(|a, b| b.1.total_cmp(&a.1));
    Some(list.iter().map(|(k, v)| format!("{k} {v:.digits$}")).collect::<Vec<_>>().join(", "))
}

/// Puts the tables between the README's bench markers.
fn update_readme(block: &str) -> Result<()> {
    let path = util::workspace_root().join("README.md");
    let text = std::fs::read_to_string(&path)?;
    let (Some(a), Some(b)) = (text.find("<!-- bench:begin -->"), text.find("<!-- bench:end -->")) else {
        bail!("README.md has no bench markers");
    };
    let start = a + "<!-- bench:begin -->".len();
    std::fs::write(&path, format!("{}\n{block}{}", &text[..start], &text[b..]))?;
    println!("  README.md: the cost table was regenerated");
    Ok(())
}

/// Memory while `pinwatch` in `mode` holds the footprint's pages: RSS idle and held, and
/// bytes per pinned page (user: RSS growth; kernel: what the BPF maps charge, all
/// preallocated, the ring included, over the pages pinned).
fn footprint(results: &BTreeMap<String, Recorded>, run: &str, mode: &str) -> Result<Value, String> {
    let f = results.get(run).ok_or_else(|| format!("{run}: never ran"))?;
    if let Some(t) = trouble(run, mode, f) {
        return Err(t);
    }
    let m = measures(f).get("footprint").cloned().ok_or_else(|| format!("{run}: no measure"))?;
    let (idle, held, pages) = (m["rss_idle_kb"].as_u64().unwrap_or(0), m["rss_held_kb"].as_u64().unwrap_or(0), m["pages"].as_u64().unwrap_or(1).max(1));
    let mut out = m.clone();
    out["mode"] = json!(mode);
    let user = (held.saturating_sub(idle) * 1024) as f64 / pages as f64;
    let (maps_held, maps_idle) = (m["maps_memlock_bytes"].as_f64().unwrap_or(0.0), m["maps_memlock_idle_bytes"].as_f64().unwrap_or(0.0));
    let kernel = maps_held / pages as f64;
    out["user_bytes_per_pinned_page"] = json!(user);
    out["kernel_bytes_per_pinned_page"] = json!(kernel);
    out["kernel_added_bytes_per_pinned_page"] = json!((maps_held - maps_idle).max(0.0) / pages as f64);
    out["bytes_per_pinned_page"] = json!(user + kernel);
    Ok(out)
}

pub fn report(kernel: &str, rounds: usize, results: &BTreeMap<String, Recorded>) -> (Value, Vec<String>) {
    let mut problems = Vec::new();
    let mut report = json!({"kernel": kernel, "rounds": rounds, "workloads": {}, "workloads_p50": {}, "stats": {}});
    for (bench, what) in WORKLOADS {
        let runs: BTreeMap<&str, PerOp> = MODES.iter().map(|m| (*m, per_op(results, m, bench, rounds, &mut problems))).collect();
        for stat in [Stat::Mean, Stat::Median] {
            let medians: BTreeMap<&str, Option<f64>> = runs.iter().map(|(m, r)| (*m, median(r.get(stat).to_vec()))).collect();
            let noise = runs.get("base").map(|r| scatter(r.get(stat))).unwrap_or(0.0);
            let mut f = figures(&medians, noise);
            f["what"] = json!(what);
            // Every round's figure, in round order (for reading the scatter).
            for (m, r) in &runs {
                if *m == "base" {
                    f["baseline_rounds_ns"] = json!(r.get(stat));
                } else {
                    f[*m]["rounds_ns"] = json!(r.get(stat));
                }
            }
            report[stat.key()][bench] = f;
        }
    }
    for m in STATS_MODES.iter() {
        let Some(r) = good_run(results, &format!("stats-{m}"), m, &mut problems) else { continue };
        let mut s = program_stats(r).unwrap_or_else(|| json!({"programs": []}));
        if let Some(n) = r.out.iter().find_map(|l| l.strip_prefix("PINWATCH-EVENTS ")).and_then(|n| n.trim().parse::<f64>().ok()) {
            // start, procs and stop lines aside, every line is an event of the reads.
            s["trace_lines_per_read"] = json!(n / DIO_OPS as f64);
        }
        report["stats"][*m] = s;
    }
    // The targets are the monitor's (what stays on); record's is shown beside it.
    for (key, run, mode) in [("footprint", "footprint", "monitor-fentry"), ("footprint_record", "footprint-record", "record-fentry")] {
        match footprint(results, run, mode) {
            Ok(f) => report[key] = f,
            Err(p) => problems.push(p),
        }
    }
    match start_scan(results) {
        Ok(v) => report["start_scan"] = v,
        Err(p) => problems.push(p),
    }
    report["problems"] = json!(problems);
    (report, problems)
}

/// Timing targets are judged on the median op where every workload has a median
/// baseline (benches before the medians were measured have only the mean).
pub fn judged_on(report: &Value) -> Stat {
    let w = &report[Stat::Median.key()];
    if WORKLOADS.iter().all(|(b, _)| w[*b]["baseline_ns_per_op"].is_number()) { Stat::Median } else { Stat::Mean }
}

/// The targets of "always on at the cost of the hooks": each figure that misses one is
/// named. Timing targets are read as added time over the floor's added time of the same
/// attach type, or, where the floor is lost in the noise (at or under the baseline),
/// as the ratio to the baseline.
pub fn misses(report: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let w = &report[judged_on(report).key()];
    let judge = |out: &mut Vec<String>, bench: &str, mode: &str, vs_floor: f64, vs_base: f64| {
        let f = &w[bench][mode];
        match (f["added_vs_floor"].as_f64(), f["ratio_to_baseline"].as_f64()) {
            (Some(x), _) if x > vs_floor => out.push(format!("{bench} {mode}: {x:.2}x the floor's added time, target {vs_floor}x")),
            (None, Some(r)) if r > vs_base => out.push(format!("{bench} {mode}: {r:.2}x the baseline (floor in the noise), target {vs_base}x")),
            (None, None) => out.push(format!("{bench} {mode}: not measured")),
            _ => {}
        }
    };
    for at in ["fentry", "kprobe"] {
        for bench in ["fio-psync", "fio-uring"] {
            judge(&mut out, bench, &format!("monitor-{at}"), 1.5, 1.10);
            judge(&mut out, bench, &format!("record-{at}"), 3.0, 1.20);
        }
        judge(&mut out, "writeback", &format!("monitor-{at}"), 1.2, 1.10);
    }
    // In the default attach mode (fentry where the kernel allows it), monitoring costs
    // less than bpftrace's count.
    for bench in ["fio-psync", "fio-uring"] {
        match (w[bench]["monitor-fentry"]["ns_per_op"].as_f64(), w[bench]["bpftrace"]["ns_per_op"].as_f64()) {
            (Some(m), Some(b)) if m > b => out.push(format!("{bench}: monitoring {:.1} us per read, bpftrace {:.1} us", m / 1e3, b / 1e3)),
            (_, None) => out.push(format!("{bench}: no bpftrace figure to compare with")),
            _ => {}
        }
    }
    match report["replay"]["events_per_second"].as_f64() {
        Some(r) if r < 1e6 => out.push(format!("report replays {:.2}M events per second, target 1M", r / 1e6)),
        None => out.push("replay speed not measured".into()),
        _ => {}
    }
    let f = &report["footprint"];
    match f["rss_idle_kb"].as_f64() {
        Some(kb) if kb > 20.0 * 1024.0 => out.push(format!("idle RSS {:.1} MiB, target 20 MiB", kb / 1024.0)),
        None => out.push("idle RSS not measured".into()),
        _ => {}
    }
    match f["bytes_per_pinned_page"].as_f64() {
        Some(b) if b > 64.0 => out.push(format!("{b:.0} bytes (kernel and user) per pinned page, target 64")),
        None => out.push("bytes per pinned page not measured".into()),
        _ => {}
    }
    out
}

/// The README's cost table, from a bench report.
pub fn markdown(report: &Value) -> String {
    let mut t = format!("Mean time per op (all ops' time over their number):\n\n{}", table(report, Stat::Mean));
    if report[Stat::Median.key()].is_object() {
        t += &format!("\nMedian time per op (fio's 50th percentile, the median dio read, the median writeback round per page):\n\n{}", table(report, Stat::Median));
    }
    t += &format!("\nThe targets are judged on the {}.\n", if judged_on(report) == Stat::Median { "medians" } else { "means" });
    t
}

fn table(report: &Value, stat: Stat) -> String {
    let cell = |f: &Value| match (f["ns_per_op"].as_f64(), f["ratio_to_baseline"].as_f64()) {
        (Some(v), Some(r)) => {
            let floor = f["added_vs_floor"].as_f64().map(|x| format!(", {x:.1}x floor")).unwrap_or_default();
            format!("{:.1} us ({r:.2}x{floor})", v / 1e3)
        }
        _ => "-".into(),
    };
    let mut t = String::from("| workload | baseline | floor fentry | monitor fentry | record fentry | floor kprobe | monitor kprobe | record kprobe | bpftrace |\n|---|---|---|---|---|---|---|---|---|\n");
    for (bench, what) in WORKLOADS {
        let w = &report[stat.key()][bench];
        let base = w["baseline_ns_per_op"].as_f64().map(|b| format!("{:.1} us", b / 1e3)).unwrap_or_else(|| "-".into());
        let cols: Vec<String> = ["floor-fentry", "monitor-fentry", "record-fentry", "floor-kprobe", "monitor-kprobe", "record-kprobe", "bpftrace"].iter().map(|m| cell(&w[*m])).collect();
        t += &format!("| {what} | {base} | {} |\n", cols.join(" | "));
    }
    t += "\nrecord's cost by stage, under fentry (each cell as above):\n\n| workload | records read and dropped | + engine | + trace written (record) |\n|---|---|---|---|\n";
    for (bench, what) in WORKLOADS {
        let w = &report[stat.key()][bench];
        t += &format!("| {what} | {} | {} | {} |\n", cell(&w["ring-fentry"]), cell(&w["engine-fentry"]), cell(&w["record-fentry"]));
    }
    t
}

fn print(report: &Value) {
    let us = |v: &Value| v.as_f64().map(|x| format!("{:.1}", x / 1e3)).unwrap_or_else(|| "-".into());
    let x = |v: &Value| v.as_f64().map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into());
    for stat in [Stat::Mean, Stat::Median] {
        println!("  {stat:?} time per op: us (ratio to baseline, added time / floor's added time)");
        for (bench, _) in WORKLOADS {
            let w = &report[stat.key()][bench];
            println!("  {} - baseline {} us", w["what"].as_str().unwrap_or(bench), us(&w["baseline_ns_per_op"]));
            for m in MODES.iter().filter(|m| **m != "base") {
                let f = &w[*m];
                println!("    {m:<16} {:>9} us  {:>7}  {:>7} of floor", us(&f["ns_per_op"]), x(&f["ratio_to_baseline"]), x(&f["added_vs_floor"]));
            }
        }
    }
    println!("  BPF programs per dio read (kernel.bpf_stats_enabled), and trace lines per read:");
    for m in STATS_MODES.iter() {
        let s = &report["stats"][*m];
        let top: Vec<String> = s["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .take(4)
            .map(|p| format!("{} {:.0} ns x{:.1}", p["name"].as_str().unwrap_or("?"), p["ns_per_read"].as_f64().unwrap_or(0.0), p["runs_per_read"].as_f64().unwrap_or(0.0)))
            .collect();
        println!("    {m:<16} {:>7} ns/read  lines/read {:<6} {}", s["ns_per_read"].as_f64().map(|v| format!("{v:.0}")).unwrap_or("-".into()), s["trace_lines_per_read"].as_f64().map(|v| format!("{v:.2}")).unwrap_or("-".into()), top.join(", "));
    }
    for key in ["footprint", "footprint_record"] {
        let f = &report[key];
        if f.is_object() {
            println!(
                "  {key} ({}): pinwatch RSS {:.1} MiB idle, {:.1} MiB tracking {} MiB pinned, settled (peaks {:.1} and {:.1}; {:.0} user bytes per pinned page); BPF maps charge {:.1} MiB",
                f["mode"].as_str().unwrap_or("?"),
                f["rss_idle_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                f["rss_held_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                f["pages"].as_u64().unwrap_or(0) * 4 / 1024,
                f["rss_idle_peak_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                f["rss_held_peak_kb"].as_f64().unwrap_or(0.0) / 1024.0,
                f["user_bytes_per_pinned_page"].as_f64().unwrap_or(0.0),
                f["maps_memlock_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(out: &[&str], rc: i32, last: Option<Value>) -> Recorded {
        Recorded { rc: Some(rc), out: out.iter().map(|s| s.to_string()).collect(), err: vec![], trace: last.into_iter().collect(), ended: true }
    }

    #[test]
    fn the_start_scan_line_gives_pages_and_time() {
        let mut r = rec(&["PINWATCH-VMPIN VmPin:\t 1048576 kB"], 0, None);
        r.err = vec!["pinwatch: start-up scan: 262144 page(s) pinned before pinwatch started, held by 1 process(es); 1 of 1 process(es) charged VmPin or VmLck read (262400 page(s) in 5123 ms)".into()];
        let results: BTreeMap<String, Recorded> = [("startscan".to_string(), r)].into();
        let v = start_scan(&results).unwrap();
        assert_eq!((v["pages_found"].as_u64(), v["pages_read"].as_u64(), v["millis"].as_u64(), v["vmpin_kb"].as_u64()), (Some(262144), Some(262400), Some(5123), Some(1048576)));
        let mut bad = results;
        bad.get_mut("startscan").unwrap().err = vec!["pinwatch: nothing".into()];
        assert!(start_scan(&bad).is_err());
    }

    #[test]
    fn medians_and_ratios_come_from_every_good_round() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let line = |ns: u64| format!("PINWATCH-BENCH {{\"bench\":\"dio\",\"ops\":10,\"ns\":{ns}}}");
        let mut results = BTreeMap::new();
        results.insert("base-1".to_string(), rec(&[&line(1000)], 0, None));
        results.insert("record-fentry-1".to_string(), rec(&[&line(2000)], 0, Some(json!({"event":"stop","lost_total":0}))));
        // lost records disqualify a round, and say so
        results.insert("record-fentry-2".to_string(), rec(&[&line(9000)], 0, Some(json!({"event":"stop","lost_total":3}))));
        // monitoring reads its loss from top's last refresh
        results.insert("monitor-fentry-1".to_string(), rec(&[&line(1500)], 0, Some(json!({"lost_events":2}))));
        let mut problems = Vec::new();
        let mean = |r: PerOp| r.get(Stat::Mean).to_vec();
        assert_eq!(mean(per_op(&results, "base", "dio", 1, &mut problems)), vec![100.0]);
        assert_eq!(mean(per_op(&results, "record-fentry", "dio", 2, &mut problems)), vec![200.0]);
        assert_eq!(mean(per_op(&results, "monitor-fentry", "dio", 1, &mut problems)), Vec::<f64>::new());
        assert_eq!(problems, vec!["record-fentry-2: pinwatch lost 3 record(s)".to_string(), "monitor-fentry-1: pinwatch lost 2 record(s)".to_string()]);
        // a round that failed, or never ran, is a problem too
        let mut problems = Vec::new();
        results.insert("base-2".to_string(), rec(&[], 1, None));
        assert!(mean(per_op(&results, "base", "dio", 3, &mut problems)).len() == 1 && problems.len() == 2, "{problems:?}");
        // the median op is the line's own figure; a line without one gives none, and the
        // rounds' trouble is said once
        results.insert("base-3".to_string(), rec(&["PINWATCH-BENCH {\"bench\":\"dio\",\"ops\":10,\"ns\":1000,\"p50_ns\":70}"], 0, None));
        let mut problems = Vec::new();
        let both = per_op(&results, "base", "dio", 3, &mut problems);
        assert_eq!(both.get(Stat::Median), &[70.0]);
        assert_eq!(both.get(Stat::Mean), &[100.0, 100.0]);
        assert_eq!(problems, vec!["base-2: exit Some(1): []".to_string()], "{problems:?}");
    }

    #[test]
    fn targets_are_judged_on_the_medians_where_every_workload_has_them() {
        let fig = |ns: f64, ratio: f64| json!({"ns_per_op": ns, "added_vs_floor": null, "ratio_to_baseline": ratio});
        let mut mean = json!({});
        let mut p50 = json!({});
        for (b, _) in WORKLOADS {
            mean[b]["baseline_ns_per_op"] = json!(100.0);
            p50[b]["baseline_ns_per_op"] = json!(90.0);
            for m in ["monitor-fentry", "monitor-kprobe", "record-fentry", "record-kprobe"] {
                mean[b][m] = fig(150.0, 1.5);
                p50[b][m] = fig(91.0, 1.01);
            }
            mean[b]["bpftrace"] = fig(200.0, 2.0);
            p50[b]["bpftrace"] = fig(95.0, 1.05);
        }
        let rest = |w: Value, p: Value| json!({"workloads": w, "workloads_p50": p, "footprint": {"rss_idle_kb": 15000, "bytes_per_pinned_page": 60.0}, "replay": {"events_per_second": 1.5e6}});
        let both = rest(mean.clone(), p50.clone());
        assert_eq!(judged_on(&both), Stat::Median);
        assert!(misses(&both).is_empty(), "{:?}", misses(&both));
        // a workload without its median baseline: the means are judged, and they miss
        let mut part = p50.clone();
        part["fio-uring"]["baseline_ns_per_op"] = Value::Null;
        let r = rest(mean, part);
        assert_eq!(judged_on(&r), Stat::Mean);
        assert!(misses(&r).len() >= 8, "{:?}", misses(&r));
        assert!(markdown(&r).contains("judged on the means"));
        assert!(markdown(&both).contains("Median time per op") && markdown(&both).contains("judged on the medians"));
    }

    #[test]
    fn added_time_is_read_against_the_floor_of_the_same_attach_type() {
        let m: BTreeMap<&str, Option<f64>> =
            [("base", Some(100.0)), ("floor-fentry", Some(110.0)), ("monitor-fentry", Some(115.0)), ("floor-kprobe", Some(95.0)), ("monitor-kprobe", Some(120.0)), ("bpftrace", Some(130.0))].into();
        let f = figures(&m, 2.0);
        assert_eq!(f["monitor-fentry"]["added_vs_floor"].as_f64(), Some(1.5));
        assert_eq!(f["monitor-fentry"]["ratio_to_baseline"].as_f64(), Some(1.15));
        // a floor below the baseline (noise) gives no ratio rather than a negative one
        assert!(f["monitor-kprobe"]["added_vs_floor"].is_null());
        assert!(f["bpftrace"]["added_vs_floor"].is_null());
        assert_eq!(f["bpftrace"]["added_ns"].as_f64(), Some(30.0));
        // a floor that rose less than the baseline's rounds scatter is noise too
        let f = figures(&m, 12.0);
        assert!(f["monitor-fentry"]["added_vs_floor"].is_null());
        assert_eq!(scatter(&[100.0, 90.0, 104.0, 101.0, 130.0]), 3.0);
        assert_eq!(scatter(&[]), 0.0);
    }

    #[test]
    fn targets_judge_against_the_floor_or_the_baseline_and_name_each_miss() {
        let fig = |ns: f64, vs_floor: Option<f64>, ratio: f64| json!({"ns_per_op": ns, "added_vs_floor": vs_floor, "ratio_to_baseline": ratio});
        let mut w = json!({});
        for b in ["fio-psync", "fio-uring", "writeback"] {
            for at in ["fentry", "kprobe"] {
                w[b][format!("monitor-{at}")] = fig(100.0, Some(1.2), 1.05);
                w[b][format!("record-{at}")] = fig(120.0, None, 1.15);
            }
            w[b]["bpftrace"] = fig(130.0, None, 1.3);
        }
        let good = json!({"workloads": w, "footprint": {"rss_idle_kb": 15000, "bytes_per_pinned_page": 60.0}, "replay": {"events_per_second": 1.5e6}});
        assert!(misses(&good).is_empty(), "{:?}", misses(&good));
        let mut bad = good.clone();
        bad["workloads"]["fio-psync"]["monitor-kprobe"]["added_vs_floor"] = json!(1.6);
        bad["workloads"]["fio-uring"]["record-fentry"]["ratio_to_baseline"] = json!(1.3);
        bad["workloads"]["fio-uring"]["bpftrace"]["ns_per_op"] = json!(90.0);
        bad["footprint"]["rss_idle_kb"] = json!(30000);
        let m = misses(&bad);
        assert_eq!(m.len(), 4, "{m:?}");
        assert!(m.iter().any(|x| x.contains("fio-psync monitor-kprobe: 1.60x the floor")), "{m:?}");
        // a figure never measured is a miss, not a pass
        let mut gone = good.clone();
        gone["footprint"] = json!({});
        assert_eq!(misses(&gone).len(), 2);
    }

    #[test]
    fn the_synthesized_trace_is_one_event_per_line() {
        let path = std::env::temp_dir().join(format!("pinwatch-synth-{}.jsonl", std::process::id()));
        synthesize_trace(&path, 10).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(events.len(), 12);
        assert_eq!(events[1]["event"], "pin");
        assert_eq!(events[1]["uid"], 0);
        assert_eq!(events[2]["event"], "unpin");
        assert_eq!(events[11]["event"], "stop");
    }

    #[test]
    fn fio_lines_give_its_mean_latency_per_read() {
        let fio = r#"PINWATCH-FIO psync {"jobs":[{"read":{"total_ios":3000,"lat_ns":{"mean":2500.5,"percentile":{"1.000000":1000,"50.000000":2112}}}}]}"#;
        let m = measures(&rec(&[fio], 0, None));
        assert_eq!(m["fio-psync"]["ops"], 3000);
        assert_eq!(m["fio-psync"]["ns"].as_f64(), Some(2500.5 * 3000.0));
        assert_eq!(m["fio-psync"]["p50_ns"].as_f64(), Some(2112.0));
    }

    #[test]
    fn the_plan_rotates_modes_and_ends_with_stats_and_the_footprint() {
        let p = plan(2);
        let order: Vec<&str> = p.lines().filter(|l| l.starts_with("bench_mode ")).filter_map(|l| l.split_whitespace().nth(1)).collect();
        assert_eq!(order[0], "base-1");
        assert_eq!(order[MODES.len()], "floor-fentry-2", "round 2 starts one mode later");
        assert_eq!(order.iter().filter(|n| n.starts_with("stats-")).count(), STATS_MODES.len());
        assert!(p.contains("ring-*) how=\"--stage ring\""));
        assert_eq!(order[order.len() - 2..], ["footprint", "footprint-record"]);
        assert!(p.contains("--ioengine=io_uring") && p.contains("--ioengine=psync") && p.contains("bpftrace -e"));
        assert!(p.contains("bench_mode footprint monitor-fentry /tmp/hold-pins.sh") && p.contains("bench_mode footprint-record record-fentry /tmp/hold-pins.sh"));
        assert!(p.contains("exec pinwatch-scenario bench-footprint"));
    }
}
