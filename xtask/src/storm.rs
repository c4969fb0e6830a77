//! Under load and faults, in the lab: a GUP storm with every live mode attached at
//! once, then SIGKILL, then a restart. Folded into each kernel's one boot.

use std::collections::BTreeSet;

use anyhow::{ensure, Context as _, Result};
use serde_json::Value;

use crate::lab::Recorded;

/// Kilobytes of peak resident memory (VmHWM) a live mode may reach during the storm.
/// Seen: 48 to 100 MiB (record on 5.10 the most); before the reader's batches were
/// bounded, record grew to 468 MB and the OOM killer took it.
const MAX_HWM_KB: u64 = 192 << 10;

/// The alert daemon, top and record attached together (several instances side by
/// side) while fio hammers direct I/O on ext4 over a RAM disk, four psync jobs and two
/// io_uring jobs of 4 KiB random reads for 20 seconds. Then: each still alive, its
/// loss shown and its peak memory read; record stopped by SIGINT; top and the daemon
/// killed with SIGKILL; what bpftool lists before, during and after; top started
/// again at once. record's own trace is the storm call by call: only its start, lost
/// and stop lines come back.
pub const STORM_PLAN: &str = r#"
say BEGIN storm
ip link set lo up 2> /dev/null
bpf_ids() { for k in prog map link; do echo "PINWATCH-BPF $1 $k $(bpftool -j $k show 2> /dev/null | tr -d '\n')"; done >> /tmp/storm.out; }
: > /tmp/storm.out
bpf_ids before
pinwatch alert --listen 127.0.0.1:9465 > /dev/null 2> /tmp/storm_alert.err &
AL=$!
pinwatch top -b -d 1 --format json > /tmp/storm.json 2> /tmp/storm_top.err &
TOP=$!
pinwatch record --output /tmp/storm.jsonl > /dev/null 2> /tmp/storm_rec.err &
PW=$!
i=0; while ! { grep -q 'pinwatch alert: watching' /tmp/storm_alert.err && [ -s /tmp/storm.json ] && grep -q '"event":"start"' /tmp/storm.jsonl; } 2> /dev/null && [ $i -lt 2400 ]; do sleep 0.1; i=$((i+1)); done
bpf_ids running
echo "PINWATCH-STORM pids $AL $TOP $PW" >> /tmp/storm.out
timeout -s KILL 120 fio --filename=/mnt/storm --size=4M --bs=4k --rw=randread --direct=1 --time_based --runtime=20 --group_reporting --minimal \
  --name=psync --ioengine=psync --numjobs=4 --name=uring --ioengine=io_uring --iodepth=16 --numjobs=2 > /tmp/storm_fio.out 2>&1
echo "PINWATCH-STORM fio-rc $?" >> /tmp/storm.out
sed 's/^/PINWATCH-FIO /' /tmp/storm_fio.out >> /tmp/storm.out
sleep 4
for p in $AL $TOP $PW; do echo "PINWATCH-STORM alive $p $(kill -0 $p 2> /dev/null && echo yes || echo no) $(grep VmHWM /proc/$p/status 2> /dev/null | tr -dc 0-9)"; done >> /tmp/storm.out
wget -q -O /tmp/storm.metrics http://127.0.0.1:9465/metrics 2>> /tmp/storm_alert.err
echo "PINWATCH-STORM wget-rc $?" >> /tmp/storm.out
grep -E '^pinwatch_(lost_events_total|pinned_bytes|gup_calls_total)' /tmp/storm.metrics | sed 's/^/PINWATCH-METRIC /' >> /tmp/storm.out
kill -INT $PW
wait $PW
echo "PINWATCH-STORM record-rc $?" >> /tmp/storm.out
grep -E '"event":"(start|lost|stop)"' /tmp/storm.jsonl | sed 's/^/PINWATCH-REC /' >> /tmp/storm.out
echo "PINWATCH-STORM record-lines $(wc -l < /tmp/storm.jsonl)" >> /tmp/storm.out
rm -f /tmp/storm.jsonl
kill -9 $TOP $AL
wait $TOP
wait $AL
sleep 2
bpf_ids after
pinwatch top -b -n 2 -d 1 --format json > /tmp/storm_again.json 2> /tmp/storm_again.err
echo "PINWATCH-STORM again-rc $? $(wc -l < /tmp/storm_again.json)" >> /tmp/storm.out
cat /tmp/storm_alert.err /tmp/storm_top.err /tmp/storm_rec.err /tmp/storm_again.err > /tmp/storm.err
send_back storm 0 /tmp/storm.out /tmp/storm.err /tmp/storm.json
"#;

/// BPF objects bpftool listed at `when`, as (kind, id).
fn bpf_ids(r: &Recorded, when: &str) -> Result<BTreeSet<(String, u64)>> {
    let mut out = BTreeSet::new();
    for kind in ["prog", "map", "link"] {
        let json = r.tagged("PINWATCH-BPF ")
            .find_map(|l| l.strip_prefix(&format!("{when} {kind} ")))
            .with_context(|| format!("bpftool listed no {kind}s {when}"))?;
        let v: Value = serde_json::from_str(json.trim()).with_context(|| format!("bpftool's {kind} list {when}: {json}"))?;
        for o in v.as_array().into_iter().flatten() {
            out.insert((kind.to_string(), o["id"].as_u64().unwrap_or(0)));
        }
    }
    Ok(out)
}

fn storm_value(r: &Recorded, key: &str) -> Option<String> {
    r.tagged("PINWATCH-STORM ").find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

pub fn check_storm(r: &Recorded) -> Result<String> {
    ensure!(r.ended, "the guest never finished the storm");
    let pids: Vec<String> = storm_value(r, "pids").context("the live modes never started")?.split_whitespace().map(str::to_string).collect();
    ensure!(pids.len() == 3, "not three live modes: {pids:?}; stderr: {:?}", r.err);
    // fio ran the storm.
    ensure!(storm_value(r, "fio-rc").as_deref() == Some("0"), "fio failed: {:?}", r.tagged("PINWATCH-FIO ").collect::<Vec<_>>());
    // --minimal: field 7 is the read IOPS of a group.
    let iops: f64 = r.tagged("PINWATCH-FIO ").filter_map(|l| l.split(';').nth(7)?.parse::<f64>().ok()).sum();
    ensure!(iops > 0.0, "fio read nothing: {:?}", r.tagged("PINWATCH-FIO ").collect::<Vec<_>>());
    // Every mode alive after it, within its memory.
    let mut hwm = Vec::new();
    for (pid, mode) in pids.iter().zip(["alert", "top", "record"]) {
        let line = r.tagged("PINWATCH-STORM alive ").find(|l| l.split_whitespace().next() == Some(pid.as_str())).with_context(|| format!("{mode} not looked at"))?;
        let f: Vec<&str> = line.split_whitespace().collect();
        ensure!(f.get(1) == Some(&"yes"), "{mode} (pid {pid}) died in the storm; stderr: {:?}", r.err);
        let kb: u64 = f.get(2).and_then(|k| k.parse().ok()).context("no VmHWM")?;
        ensure!(kb <= MAX_HWM_KB, "{mode} reached {kb} kB resident (VmHWM), past the {MAX_HWM_KB} kB bound");
        hwm.push(format!("{mode} {} MiB", kb.div_ceil(1024)));
    }
    // top: the storm seen, loss shown at every refresh, nothing pinned once it ended.
    ensure!(!r.trace.is_empty(), "top printed no refresh");
    ensure!(r.trace.iter().all(|d| d["lost_events"].is_u64() && d["lost_by_reason"].is_object()), "a refresh of top does not show its loss");
    let calls = |d: &Value| d["totals"]["gup_calls"].as_u64().unwrap_or(0);
    let last = r.trace.last().context("no refresh")?;
    ensure!(calls(last) >= 1000, "top counted {} GUP calls in a storm of {iops:.0} reads a second", calls(last));
    let held = |d: &Value| d["totals"]["pinned_bytes"].as_u64().unwrap_or(0) + d["totals"]["unstreamed_bytes"].as_u64().unwrap_or(0);
    let peak = r.trace.iter().map(held).max().unwrap_or(0);
    ensure!(peak > 0, "no refresh of top shows anything pinned during the storm");
    ensure!(held(last) == 0, "top still shows {} bytes pinned after the storm", held(last));
    let top_lost = last["lost_events"].as_u64().unwrap_or(0);
    // record: its stop line's loss is the sum of its lost lines, and nothing held.
    ensure!(matches!(storm_value(r, "record-rc").as_deref(), Some("0") | Some("130")), "record exited {:?} on SIGINT", storm_value(r, "record-rc"));
    let rec = r.tagged_json("PINWATCH-REC ");
    let stop = rec.iter().find(|e| e["event"] == "stop").context("record's trace has no stop line")?;
    let lost_lines: u64 = rec.iter().filter(|e| e["event"] == "lost").map(|e| e["count"].as_u64().unwrap_or(0)).sum();
    let rec_lost = stop["lost_total"].as_u64().context("no lost_total in the stop line")?;
    ensure!(rec_lost == lost_lines, "record's stop line says {rec_lost} lost, its lost lines add up to {lost_lines}");
    let fio_held: Vec<&Value> = stop["held"].as_array().into_iter().flatten().filter(|h| h["comm"].as_str().is_some_and(|c| c.starts_with("fio"))).collect();
    ensure!(fio_held.is_empty(), "record's stop line still has fio holding pins: {fio_held:?}");
    // the daemon: loss by reason in the metrics, nothing pinned.
    let metrics: Vec<&str> = r.tagged("PINWATCH-METRIC ").collect();
    ensure!(metrics.iter().any(|l| l.starts_with("pinwatch_lost_events_total{reason=\"ringbuf_full\"}")), "the daemon's metrics show no loss counter: {metrics:?}");
    let metric_sum = |name: &str| -> f64 { metrics.iter().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum() };
    ensure!(metric_sum("pinwatch_pinned_bytes") == 0.0, "the daemon still reports {} bytes pinned after the storm", metric_sum("pinwatch_pinned_bytes"));
    ensure!(metric_sum("pinwatch_gup_calls_total") >= 1000.0, "the daemon counted {} GUP calls", metric_sum("pinwatch_gup_calls_total"));
    let alert_lost = metric_sum("pinwatch_lost_events_total");
    // SIGKILL: nothing of top or the daemon stays in the kernel; a restart works.
    let (before, running, after) = (bpf_ids(r, "before")?, bpf_ids(r, "running")?, bpf_ids(r, "after")?);
    let made = running.difference(&before).count();
    ensure!(made > 0, "bpftool saw nothing of the three live modes while they ran");
    let left: Vec<_> = after.difference(&before).collect();
    ensure!(left.is_empty(), "left in the kernel after record stopped and top and the daemon were killed with SIGKILL: {left:?}");
    let again = storm_value(r, "again-rc").unwrap_or_default();
    ensure!(again.split_whitespace().next() == Some("0") && again.split_whitespace().nth(1).is_some_and(|n| n != "0"), "top did not start again after the kill: {again:?}");
    Ok(format!(
        "fio {iops:.0} reads/s for 20 s under the daemon, top and record at once: all alive; lost: top {top_lost}, record {rec_lost}, daemon {alert_lost}; \
         peak memory {}; pinned after: 0 everywhere ({} bytes at the peak); {made} BPF objects while running, none left after SIGKILL; top restarted",
        hwm.join(", "),
        peak
    ))
}
