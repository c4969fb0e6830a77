//! Developer tasks: set-up, the VM lab on real kernels, tests, the demo.

mod bench;
mod checks;
mod fleet;
mod kernels;
mod lab;
mod package;
mod postmortem;
mod browser;
mod resilience;
mod setup;
mod storm;
mod util;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use clap::{Parser, Subcommand};

use kernels::Fetched;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and the lab need (idempotent).
    Setup,
    /// Boot lab kernels and check pinwatch against the pinning scenarios.
    Lab {
        /// Kernel series to run (5.10, 6.1, 6.12, 7.x); all when omitted.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
    },
    /// Check pinwatch on this machine's kernel only (doctor, record, top in tmux).
    Host,
    /// Everything: unit tests, this machine's kernel, and the lab on all kernels.
    Test,
    /// What pinwatch costs: workloads with and without it in one boot of a lab kernel,
    /// reported as ratios, and its memory while it tracks many pins.
    Bench {
        #[arg(long = "kernel", default_values_t = ["6.12".to_string()])]
        kernels: Vec<String>,
        /// Rounds, each running every mode once in a rotated order (medians are
        /// reported; under the instruction clock rounds agree within 1%, under the
        /// host's clock they scatter by 15-25%).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Fail when a figure misses its target (README: "What it costs").
        #[arg(long)]
        check: bool,
        /// The guest's clock: `instructions` (QEMU counts the guest's instructions, 1 ns
        /// each: the same build gives the same figures whatever the host does) or `host`
        /// (the host's time, as the emulation runs: it moves with the host's load).
        #[arg(long, value_enum, default_value_t = bench::Clock::Instructions)]
        clock: bench::Clock,
    },
    /// Build the Debian package (cargo-deb) into target/package, and check it.
    Package,
    /// Show pinwatch at work: boot a lab kernel and record the pinning scenarios there.
    Demo {
        #[arg(long, default_value = "6.12")]
        kernel: String,
    },
}

/// Time one boot of the lab may take: its 32 steps, each loading the programs under
/// TCG, took 584 to 797 s a boot in stop 25's CI run (7.2 797 s, 6.12 776: 760 in stop
/// 24's, 530 to 575 in stop 22's, the same scenarios on a host that got slower), so 900 s
/// left 7.2 less than two minutes; a hang shows as running past this.
const BOOT_LIMIT: Duration = Duration::from_secs(1080);

/// Programs of this machine the lab guest runs, copied in with their libraries: fio
/// makes the GUP storm, bpftool lists what pinwatch leaves in the kernel.
pub const LAB_TOOLS: [&str; 2] = ["/usr/bin/fio", "/usr/sbin/bpftool"];

/// (name, `pinwatch record` options, scenario command). The default attach mode is
/// auto, which takes fentry where the kernel allows it (every lab kernel does).
pub const SCENARIOS: &[(&str, &str, &str)] = &[
    ("odirect", "", "pinwatch-scenario odirect-slow --file /mnt/odirect --dev /dev/nullb0 --pages 8"),
    ("vmsplice", "", "pinwatch-scenario vmsplice --pages 8"),
    ("pvm", "", "pinwatch-scenario pvm-writev --pages 256"),
    ("iouring", "", "pinwatch-scenario iouring-fixed --pages 256 --no-huge"),
    ("buffered", "", "pinwatch-scenario buffered --file /mnt/buffered --pages 8"),
    ("hazard", "--attach fentry", "pinwatch-scenario odirect-hazard --file /mnt/hazard --dev /dev/nullb0 --pages 8"),
    ("hazard_kprobe", "--attach kprobe", "pinwatch-scenario odirect-hazard --file /mnt/hazard --dev /dev/nullb0 --pages 8"),
    ("hazard_other", "", "pinwatch-scenario odirect-hazard --file /mnt/other --dev /dev/nullb0 --pages 8 --target other"),
    ("hazard_nopin", "", "pinwatch-scenario odirect-hazard --file /mnt/nopin --dev /dev/nullb0 --pages 8 --no-pin"),
    // The 2018 sequence and its controls on xfs and btrfs: writeback is watched where
    // every filesystem starts it, not in ext4's code alone.
    ("hazard_xfs", "", "pinwatch-scenario odirect-hazard --file /xfs/hazard --dev /dev/nullb0 --pages 8"),
    ("hazard_xfs_other", "", "pinwatch-scenario odirect-hazard --file /xfs/other --dev /dev/nullb0 --pages 8 --target other"),
    ("hazard_xfs_nopin", "", "pinwatch-scenario odirect-hazard --file /xfs/nopin --dev /dev/nullb0 --pages 8 --no-pin"),
    ("hazard_btrfs", "", "pinwatch-scenario odirect-hazard --file /btrfs/hazard --dev /dev/nullb0 --pages 8"),
    // btrfs's fsync of a new file writes all of it back, so syncing the other half writes
    // the pinned half too (pinwatch reports it, rightly): the control works on another file.
    ("hazard_btrfs_other", "", "pinwatch-scenario odirect-hazard --file /btrfs/other --dev /dev/nullb0 --pages 8 --target other-file"),
    ("hazard_btrfs_nopin", "", "pinwatch-scenario odirect-hazard --file /btrfs/nopin --dev /dev/nullb0 --pages 8 --no-pin"),
    ("released", "", "pinwatch-scenario released --file /mnt/released --dev /dev/nullb0 --pages 8"),
    ("longterm", "", "pinwatch-scenario longterm-file --file /mnt/longterm --pages 8"),
    ("memfd", "", "pinwatch-scenario memfd-truncate --pages 8"),
    // The control, then a freed page reused by another owner: both must stay silent.
    ("memfd_nopin", "", "sh -c 'pinwatch-scenario memfd-truncate --pages 8 --no-pin && pinwatch-scenario reuse-freed --pages 64'"),
    // Limits: root keeps CAP_IPC_LOCK, so the kernel lets it pin past RLIMIT_MEMLOCK.
    ("memlock", "", "pinwatch-scenario iouring-fixed --pages 256 --hold-ms 2500 --memlock 65536"),
    ("memlock_ctl", "", "pinwatch-scenario iouring-fixed --pages 8 --hold-ms 2500 --memlock 65536"),
    ("aged", "--max-pin-age 1s", "pinwatch-scenario odirect-slow --file /mnt/aged --dev /dev/nullb0 --pages 8"),
    ("aged_vmsplice", "--max-pin-age 1s", "pinwatch-scenario vmsplice --pages 8 --hold-ms 2500"),
    ("aged_ctl", "--max-pin-age 1s", "pinwatch-scenario pvm-writev --pages 8"),
    // A long-term pin map of one block (32 pages) and a pin map of 24 folios filled by
    // 96 long-term pinned pages, then, once they are released, the 2018 sequence on 8
    // pages: counted while full, watched again after.
    (
        "pinmap",
        "--pin-map-capacity 24 --pin-block-capacity 1",
        "sh -c 'pinwatch-scenario iouring-fixed --pages 96 --hold-ms 500 && pinwatch-scenario odirect-hazard --file /mnt/pinmap --dev /dev/nullb0 --pages 8'",
    ),
];

/// `pinwatch top` in batch JSON while io_uring fixed buffers pin 1 MiB for a while: it
/// must show them, beside the kernel's VmPin, and show them gone after. Then direct
/// I/O, which top counts in the kernel without streaming a record per call, and the
/// hazard sequence, which monitoring must catch as record does.
const TOP_PLAN: &str = r#"
say BEGIN top
pinwatch top -b -n 60 -d 1 --output json > /tmp/top.json 2> /tmp/top.err &
TOP=$!
i=0; while [ ! -s /tmp/top.json ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
pinwatch-scenario iouring-fixed --pages 256 --hold-ms 2500 > /tmp/top.out
pinwatch-scenario bench-dio --file /mnt/topdio --ops 300 > /dev/null
pinwatch-scenario odirect-hazard --file /mnt/tophz --dev /dev/nullb0 --pages 8 > /dev/null
sleep 2.5
# Debug runs (PINWATCH_LAB_ONLY): the kernel side's maps go to stderr.
[ -n "$RUST_LOG" ] && for m in PROC_PINS QUIET_GETS PINS; do echo "map $m"; bpftool map dump name $m; done >> /tmp/top.err 2>&1
kill -TERM $TOP
wait $TOP
send_back top $? /tmp/top.out /tmp/top.err /tmp/top.json
"#;

/// `pinwatch record` killed with SIGKILL a second after the hazard sequence: the
/// hazards must already be on disk (record flushes at each tick and after each hazard).
const KILL9_PLAN: &str = r#"
say BEGIN kill9
pinwatch record --output /tmp/kill9.jsonl > /dev/null 2> /tmp/kill9.err &
PW=$!
i=0; while ! grep -q '"event":"start"' /tmp/kill9.jsonl 2> /dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
pinwatch-scenario odirect-hazard --file /mnt/kill9 --dev /dev/nullb0 --pages 8 > /tmp/kill9.out
sleep 1.5
kill -9 $PW
wait $PW
send_back kill9 $? /tmp/kill9.out /tmp/kill9.err /tmp/kill9.jsonl
"#;

/// Pins older than pinwatch: a holder registers a memfd as io_uring fixed buffers and
/// waits; a control locks (mlock) a memfd it never pins, so that the kernel charges it
/// VmLck and the start-up scan reads it too. `record` starts only then, and must find
/// the holder's 8 pages pinned, name it as the pinner of the truncate that follows, and
/// see the pins released when the holder unregisters; the control must show nothing.
/// The holder runs as nobody, without CAP_IPC_LOCK, or 7.x would charge it no VmPin.
const FOUND_PLAN: &str = r#"
say BEGIN found
rm -f /tmp/found.go
pinwatch-scenario memfd-truncate --pages 8 --as-nobody --until /tmp/found.go > /tmp/found_h.out 2>&1 &
H=$!
pinwatch-scenario memfd-truncate --pages 8 --no-pin --mlock --until /tmp/found.go > /tmp/found_c.out 2>&1 &
C=$!
i=0; while [ "$(cat /tmp/found_h.out /tmp/found_c.out 2> /dev/null | grep -c READY)" -lt 2 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
pinwatch record --output /tmp/found.jsonl > /dev/null 2> /tmp/found.err &
PW=$!
i=0; while ! grep -q '"event":"start"' /tmp/found.jsonl 2> /dev/null && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done
sleep 1.5
touch /tmp/found.go
wait $H; wait $C
sleep 2.5
kill -INT $PW
wait $PW
RC=$?
cat /tmp/found_h.out /tmp/found_c.out > /tmp/found.out
send_back found $RC /tmp/found.out /tmp/found.err /tmp/found.jsonl
"#;

/// Huge folios: 8 MiB of transparent huge pages, then 8 MiB of hugetlbfs pages,
/// registered as eight 1 MiB io_uring buffers while top watches. From 6.10 io_uring keeps one reference per huge folio (it
/// unpins the others at once, 255 or 511 in one call): top must still show the 8 MiB
/// the pins hold in place, beside VmPin, and nothing once they are unregistered. The
/// holder runs as nobody (no CAP_IPC_LOCK) so that 7.x charges VmPin too.
/// In the same top session, VFIO: QEMU's edu device bound to vfio-pci, 4 MiB mapped for
/// DMA through its IOMMU group (`vfio-map`, checked by check_vfio).
const HUGE_PLAN: &str = r#"
say BEGIN huge
cat /sys/kernel/mm/transparent_hugepage/enabled > /tmp/huge.err
echo "hugetlb_optimize_vmemmap: $(cat /proc/sys/vm/hugetlb_optimize_vmemmap 2>&1)" >> /tmp/huge.err
pinwatch top -b -n 60 -d 1 --format json > /tmp/huge.json 2>> /tmp/huge.err &
TOP=$!
i=0; while [ ! -s /tmp/huge.json ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
timeout -s KILL 120 pinwatch-scenario iouring-fixed --pages 2048 --buffers 8 --huge --memlock 67108864 --as-nobody --hold-ms 3000 > /tmp/huge.out 2>&1
echo "PINWATCH-HUGE thp-rc $?" >> /tmp/huge.err
sleep 2.5
# The HugeTLB vmemmap optimization, where the kernel has it: the struct pages of each
# huge page's tails are remapped onto its first vmemmap page, so before 7.1 most tails
# read as "fake heads" (the kernel's page_fixed_fake_head).
echo 1 > /proc/sys/vm/hugetlb_optimize_vmemmap 2> /dev/null
echo "PINWATCH-HUGE hvo $(cat /proc/sys/vm/hugetlb_optimize_vmemmap 2> /dev/null || echo absent)" >> /tmp/huge.err
echo 8 > /proc/sys/vm/nr_hugepages
echo "PINWATCH-HUGE nr_hugepages $(cat /proc/sys/vm/nr_hugepages)" >> /tmp/huge.err
timeout -s KILL 120 pinwatch-scenario iouring-fixed --pages 2048 --buffers 8 --hugetlb --memlock 67108864 --as-nobody --hold-ms 3000 >> /tmp/huge.out 2>&1
echo "PINWATCH-HUGE hugetlb-rc $?" >> /tmp/huge.err
sleep 2.5
for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor):$(cat $d/device)" = "0x1234:0x11e8" ] && EDU=${d##*/}; done
if [ -n "$EDU" ]; then
  echo vfio-pci > /sys/bus/pci/devices/$EDU/driver_override
  echo $EDU > /sys/bus/pci/drivers_probe
  G=$(readlink /sys/bus/pci/devices/$EDU/iommu_group); G=${G##*/}
  echo "PINWATCH-HUGE vfio device $EDU group $G driver $(readlink /sys/bus/pci/devices/$EDU/driver)" >> /tmp/huge.err
  timeout -s KILL 120 pinwatch-scenario vfio-map --group "$G" --pages 1024 --hold-ms 3000 >> /tmp/huge.out 2>&1
  echo "PINWATCH-HUGE vfio-rc $?" >> /tmp/huge.err
  sleep 2.5
else
  echo "PINWATCH-HUGE vfio no edu device" >> /tmp/huge.err
fi
kill -TERM $TOP
wait $TOP
RC=$?
dmesg | tail -n 20 | sed 's/^/PINWATCH-HUGE dmesg /' >> /tmp/huge.err
send_back huge $RC /tmp/huge.out /tmp/huge.err /tmp/huge.json
"#;

/// The demo also shows what people read: doctor's text and top's table.
const DEMO_PLAN: &str = r#"
say BEGIN doctor_text
pinwatch doctor > /tmp/doctor.txt 2>&1
send_back doctor_text $? /tmp/doctor.txt
say BEGIN top_table
pinwatch top -b -n 4 -d 1 > /tmp/toptab.txt 2> /tmp/toptab.err &
TOP=$!
i=0; while [ ! -s /tmp/toptab.txt ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i+1)); done
pinwatch-scenario iouring-fixed --pages 256 --hold-ms 2500 > /dev/null
wait $TOP
send_back top_table $? /tmp/toptab.txt /tmp/toptab.err
"#;

/// What the demo shows: pins, the 2018 sequence, a long-term pin of a file, the
/// truncate of a long-term pinned memfd, a limit breach, and top.
const DEMO: &[&str] = &["odirect", "iouring", "hazard", "longterm", "memfd", "memlock"];

/// The guest's script: doctor, then `pinwatch record` around each scenario of
/// `only` (all when None), then top.
fn plan(only: Option<&[&str]>) -> String {
    let mut s = String::from(
        "pinwatch doctor --format json > /tmp/doctor.json 2>&1; say RC doctor $?\nsed \"s/^/PINWATCH-LAB OUT doctor /\" /tmp/doctor.json > $R\nsay END doctor\n",
    );
    // The page tables the guest runs on: whether the CPU offers 5-level paging (la57)
    // and the vmalloc area's size, which says whether the kernel uses it.
    s.push_str("say OUT paging $(grep -m1 -ow la57 /proc/cpuinfo || echo no-la57) $(awk '/VmallocTotal/{print $2}' /proc/meminfo)\nsay END paging\n");
    for (name, opts, cmd) in SCENARIOS.iter().filter(|(n, _, _)| only.is_none_or(|o| o.contains(n))) {
        s.push_str(&format!("record {name} {opts} -- {cmd}\n"));
    }
    s.push_str(TOP_PLAN);
    if only.is_none() {
        s.push_str(KILL9_PLAN);
    }
    if only.is_none_or(|o| o.contains(&"found")) {
        s.push_str(FOUND_PLAN);
    }
    if only.is_none_or(|o| o.contains(&"huge")) {
        s.push_str(HUGE_PLAN);
    }
    if only.is_none_or(|o| o.contains(&"alert")) {
        s.push_str(fleet::LAB_PLAN);
    }
    if only.is_none_or(|o| o.contains(&"enforce")) {
        s.push_str(fleet::ENFORCE_PLAN);
    }
    if only.is_none_or(|o| o.contains(&"storm")) {
        s.push_str(storm::STORM_PLAN);
    }
    // Last, what the kernel logged through the whole run: its warnings, and the
    // verifier's about maps allocated as they fill in tracing programs (checks::klog).
    s.push_str(KLOG_PLAN);
    s
}

const KLOG_PLAN: &str = "dmesg | grep -E 'WARNING:|BUG:|run-time allocat' | head -n 40 | sed 's/^/PINWATCH-LAB OUT klog /' > $R\nsay END klog\n";

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    not_run: Vec<String>,
}

impl Tally {
    fn pass(&mut self, what: &str, detail: &str) {
        self.passed += 1;
        println!("  PASS {what}: {detail}");
    }
    fn fail(&mut self, what: &str, why: &str) {
        self.failed += 1;
        println!("  FAIL {what}: {why}");
    }
    fn record(&mut self, what: &str, r: Result<String>) {
        match r {
            Ok(d) => self.pass(what, &d),
            Err(e) => self.fail(what, &format!("{e:#}")),
        }
    }
}

fn selected(names: &[String]) -> Result<Vec<kernels::Series>> {
    if names.is_empty() {
        return Ok(kernels::SERIES.to_vec());
    }
    names
        .iter()
        .map(|n| kernels::SERIES.iter().find(|s| s.name == n || (s.name == "7.x" && n.starts_with('7'))).copied().with_context(|| format!("unknown kernel series {n}")))
        .collect()
}

fn lab(names: &[String], bins: &lab::Binaries, tally: &mut Tally) -> Result<()> {
    let series = selected(names)?;
    let every_series = series.len() == kernels::SERIES.len();
    let conf = kernels::update()?;
    // Page-table levels each boot ran on: pfns must come out right on both.
    let mut levels: BTreeMap<u8, Vec<String>> = BTreeMap::new();
    for s in series {
        println!("lab: kernel {} ({})", s.name, s.suite);
        let k = match kernels::fetch(&conf, &s) {
            Ok(Fetched::Ready(k)) => k,
            Ok(Fetched::Retired(why)) => {
                println!("  NOT TESTED {}: {why}", s.name);
                tally.not_run.push(format!("{}: {why}", s.name));
                continue;
            }
            Err(e) => {
                tally.fail(&format!("{} fetch", s.name), &format!("{e:#}"));
                continue;
            }
        };
        let work = util::cache_dir().join("runs").join(&k.release);
        std::fs::create_dir_all(&work)?;
        // PINWATCH_LAB_ONLY=a,b: those scenarios and top alone, with pinwatch's debug log
        // (for looking into one failure; the checks of the others then fail).
        let only = std::env::var("PINWATCH_LAB_ONLY").ok();
        let names: Vec<&str> = only.as_deref().map(|o| o.split(',').collect()).unwrap_or_default();
        let script = match &only {
            Some(_) => format!("export RUST_LOG=pinwatch=debug\n{}", plan(Some(&names))),
            None => plan(None),
        };
        let with_tools = lab::Binaries { extra: LAB_TOOLS.iter().map(std::path::PathBuf::from).collect(), ..bins.clone() };
        let bins = &with_tools;
        // Prometheus here scrapes the daemon in the guest while the guest runs; the
        // last boot's results go first, or the watcher would read their marks.
        let _ = std::fs::remove_file(lab::results_path(&work));
        let prometheus = fleet::LabPrometheus::start(&work);
        let done = std::sync::atomic::AtomicBool::new(false);
        let (boot, scraped) = std::thread::scope(|scope| {
            let watcher = prometheus.as_ref().ok().map(|p| scope.spawn(|| p.watch(&lab::results_path(&work), &done)));
            let boot = lab::build_initramfs(&k, bins, &script, &work).and_then(|img| {
                lab::boot_with_memory(&k, &img, &work, BOOT_LIMIT, "1G", prometheus.as_ref().ok().map(|p| p.metrics_port), true, false)
            });
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            (boot, watcher.map(|w| w.join().unwrap_or_default()))
        });
        match (&prometheus, scraped) {
            (Err(e), _) => tally.fail(&format!("{} alert + Prometheus", k.release), &format!("starting Prometheus: {e:#}")),
            (Ok(p), Some(checks)) => {
                for (what, r) in checks {
                    tally.record(&format!("{} {what}", k.release), r.with_context(|| format!("Prometheus's log: {}", p.log().display())));
                }
            }
            (Ok(_), None) => {}
        }
        if let Ok(p) = prometheus {
            p.stop();
        }
        let boot = match boot {
            Ok(b) => b,
            Err(e) => {
                tally.fail(&format!("{} boot", k.release), &format!("{e:#}"));
                continue;
            }
        };
        println!("  time {}: {}", k.release, boot.timing(BOOT_LIMIT));
        let results = lab::parse(&boot.results);
        let v = checks::version(&k.release);
        // doctor's JSON, parsed once: its own check below, and the kernel-log check's
        // maps_on_demand.
        let doctor = results.get("doctor");
        let doctor_json = doctor.map(|d| serde_json::from_str::<serde_json::Value>(&d.out.join("\n")));
        match (doctor, &doctor_json) {
            (Some(d), Some(parsed)) if d.rc == Some(0) => {
                match parsed {
                    Ok(j) if j["can_track_pins"] == true => {
                        // A hook whose symbol exists but that failed to load or attach
                        // (a verifier rejection, say) is a defect, not a kernel limit.
                        let failed: Vec<String> = j["hooks"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter(|h| h["reason"].as_str().is_some_and(|r| r.starts_with("attach failed")))
                            .map(|h| format!("{}: {}", h["symbol"], h["reason"]))
                            .collect();
                        if failed.is_empty() {
                            tally.pass(&format!("{} doctor", k.release), "can track pins, every present hook attached")
                        } else {
                            tally.fail(&format!("{} doctor", k.release), &failed.join("\n"))
                        }
                    }
                    Ok(j) => tally.fail(&format!("{} doctor", k.release), &j["verdict"].to_string()),
                    Err(e) => tally.fail(&format!("{} doctor", k.release), &format!("bad JSON ({e}): {}", d.out.join("\n"))),
                }
            }
            (other, _) => tally.fail(&format!("{} doctor", k.release), &format!("{:?}", other.map(|d| (&d.rc, &d.out)))),
        }
        let what = format!("{} kernel log", k.release);
        let on_demand = doctor_json.as_ref().and_then(|r| r.as_ref().ok()).and_then(|j| j["maps_on_demand"].as_bool());
        match results.get("klog") {
            Some(r) => tally.record(&what, checks::klog(r, on_demand, v)),
            None => tally.fail(&what, "no result from the guest"),
        }
        let what = format!("{} paging", k.release);
        match results.get("paging").map(checks::paging) {
            Some(Ok((n, detail))) => {
                levels.entry(n).or_default().push(k.release.clone());
                tally.pass(&what, &detail)
            }
            Some(Err(e)) => tally.fail(&what, &format!("{e:#}")),
            None => tally.fail(&what, "no result from the guest"),
        }
        for name in SCENARIOS.iter().map(|s| s.0).chain(["top"]) {
            let what = format!("{} {name}", k.release);
            match results.get(name) {
                None => tally.fail(&what, "no result from the guest"),
                Some(r) => match checks::check(name, r, v) {
                    Ok(detail) => tally.pass(&what, &detail),
                    Err(e) => {
                        tally.fail(&what, &format!("{e:#}"));
                        println!("       trace kept in {}", work.join(format!("{name}.trace.jsonl")).display());
                    }
                },
            }
        }
        let daemon_checks: [(&str, &str, fn(&lab::Recorded) -> Result<String>); 6] = [
            ("alert", "alert daemon", fleet::check_lab_alert),
            ("enforce", "enforcement (kill, stop, freeze)", fleet::check_lab_enforce),
            ("found", "pins older than pinwatch (start-up scan)", checks::check_found),
            ("huge", "huge folios pinned by io_uring (top)", checks::check_huge),
            ("huge", "VFIO DMA mapping behind an emulated IOMMU (top)", checks::check_vfio),
            ("storm", "GUP storm (fio) under the daemon, top and record at once; SIGKILL; restart", storm::check_storm),
        ];
        for (name, label, check) in daemon_checks {
            let what = format!("{} {label}", k.release);
            match results.get(name) {
                Some(r) => tally.record(&what, check(r)),
                None => tally.fail(&what, "no result from the guest"),
            }
        }
        let what = format!("{} kill -9 of record", k.release);
        match (results.get("kill9"), results.get("hazard")) {
            (Some(killed), Some(whole)) => match checks::check_kill9(killed, whole) {
                Ok(d) => tally.pass(&what, &d),
                Err(e) => tally.fail(&what, &format!("{e:#}")),
            },
            _ => tally.fail(&what, "no result from the guest"),
        }
        let what = format!("{} report round trip", k.release);
        match postmortem::round_trip(bins, &work, &results) {
            Ok(d) => tally.pass(&what, &d),
            Err(e) => tally.fail(&what, &format!("{e:#}")),
        }
    }
    // Every pfn check (pagemap against pinwatch's pfns in the reuse scenario, the
    // hazards' pfns against the pins') ran on 4-level and on 5-level page tables.
    if every_series {
        let what = "lab paging: 4-level and 5-level page tables both covered";
        match (levels.get(&4), levels.get(&5)) {
            (Some(four), Some(five)) => tally.pass(what, &format!("4-level: {}; 5-level (la57): {}", four.join(", "), five.join(", "))),
            _ => tally.fail(what, &format!("boots by levels: {levels:?}")),
        }
    }
    Ok(())
}

/// On this machine's own kernel: pinwatch must explain what it cannot do, not crash.
fn host(bins: &lab::Binaries, tally: &mut Tally) -> Result<()> {
    let pinwatch = &bins.pinwatch;
    let kprobes = std::path::Path::new("/sys/bus/event_source/devices/kprobe").exists();
    let doctor = Command::new(pinwatch).arg("doctor").output().context("running pinwatch doctor")?;
    let text = String::from_utf8_lossy(&doctor.stdout).into_owned() + &String::from_utf8_lossy(&doctor.stderr);
    let what = "host doctor";
    if text.contains("panicked") {
        tally.fail(what, "pinwatch panicked");
    } else if kprobes {
        if doctor.status.success() { tally.pass(what, "kprobes present, doctor says pins can be tracked") } else { tally.fail(what, &text) }
    } else if doctor.status.code() == Some(1) && text.contains("no kprobe support") && text.contains("cannot say who pinned a page") {
        tally.pass(what, "explains that kprobes are missing and what still works, exits 1");
    } else {
        tally.fail(what, &format!("exit {:?}: {text}", doctor.status.code()));
    }
    // pfns need vmemmap_base: from kallsyms, or calibrated where kallsyms hides it.
    let pfns = text.lines().find(|l| l.trim_start().starts_with("page frame numbers")).unwrap_or("no page frame numbers line").trim();
    if pfns.starts_with("page frame numbers: yes") {
        tally.pass("host pfns", pfns);
    } else {
        tally.fail("host pfns", pfns);
    }
    for (what, r) in resilience::checks(bins) {
        match r {
            Ok(d) => tally.pass(&what, &d),
            Err(e) => tally.fail(&what, &format!("{e:#}")),
        }
    }
    tally.record("host Debian package", package::build().and_then(|deb| package::check(&deb)));
    for (what, r) in fleet::checks(bins, !kprobes) {
        tally.record(&what, r);
    }
    if !kprobes {
        // Tracepoint-only mode, for real: a memfd long-term pinned by io_uring and
        // truncated is caught by the kernel's own pin count; the control stays silent.
        for (name, extra) in [("memfd", ""), ("memfd_nopin", " --no-pin")] {
            let what = format!("host {name} (tracepoint-only)");
            let out = std::env::temp_dir().join(format!("pinwatch-host-{name}.jsonl"));
            let cmd = format!("{} memfd-truncate --pages 8{extra}", bins.scenario.display());
            let rec = Command::new(pinwatch).args(["record", "--force", "--output"]).arg(&out).arg("--").args(cmd.split(' ')).output()?;
            let trace = std::fs::read_to_string(&out).unwrap_or_default();
            let recorded = lab::Recorded {
                rc: rec.status.code(),
                out: String::from_utf8_lossy(&rec.stdout).lines().map(str::to_string).collect(),
                err: String::from_utf8_lossy(&rec.stderr).lines().map(str::to_string).collect(),
                trace: trace.lines().filter_map(|l| serde_json::from_str(l).ok()).collect(),
                ended: true,
            };
            match checks::check_host_memfd(name, &recorded) {
                Ok(d) => tally.pass(&what, &d),
                Err(e) => tally.fail(&what, &format!("{e:#}")),
            }
        }
    }
    Ok(())
}

/// `pinwatch top` used as a person would: in tmux, sorted from the keyboard, left with q
/// and with Ctrl-C, the terminal checked afterwards (echo and canonical mode back).
fn host_top(bins: &lab::Binaries, tally: &mut Tally) -> Result<()> {
    // A process the kernel charges 1 MiB of long-term pins (VmPin): visible to top on
    // any kernel, through /proc, even where GUP calls are not.
    let mut holder = Command::new(&bins.scenario)
        .args(["iouring-fixed", "--pages", "256", "--hold-ms", "60000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting the io_uring scenario")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.take().context("stdout")?), &mut line)?;
    let pid: u32 = line.split("\"pid\":").nth(1).and_then(|s| s.split(',').next()).and_then(|s| s.parse().ok()).context("scenario pid")?;
    let result = (|| -> Result<Vec<(String, Result<String>)>> {
        let mut out = Vec::new();
        let cmd = format!("{} top -d 1; echo TOP-EXITED $?; stty -a | tr ' ' '\\n' | grep -x -e echo -e icanon; echo STTY-DONE; sleep 120", bins.pinwatch.display());
        let tmux = |args: &[&str]| Command::new("tmux").args(args).output();
        let screen = |s: &str| tmux(&["capture-pane", "-p", "-t", s]).map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let wait_for = |s: &str, what: &str| -> Result<String> {
            for _ in 0..150 {
                let text = screen(s);
                if text.contains(what) {
                    return Ok(text);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            bail!("{what:?} never appeared; screen:\n{}", screen(s))
        };
        // The pids of the rows, in screen order, below the table's header line.
        let row_pids = |text: &str| -> Vec<u32> {
            text.lines()
                .skip_while(|l| !l.trim_start().starts_with("PID"))
                .skip(1)
                .map_while(|l| l.split_whitespace().next()?.parse().ok())
                .collect()
        };
        for (s, quit) in [("pinwatch-top-q", "q"), ("pinwatch-top-c", "C-c")] {
            let _ = tmux(&["kill-session", "-t", s]);
            tmux(&["new-session", "-d", "-s", s, "-x", "200", "-y", "50", &cmd])?;
            let r = (|| -> Result<String> {
                let text = wait_for(s, "PINNED*")?;
                ensure!(text.contains(&pid.to_string()), "holder pid {pid} not on screen:\n{text}");
                if quit == "q" {
                    tmux(&["send-keys", "-t", s, "v"])?;
                    let text = wait_for(s, "VmPin*")?;
                    ensure!(row_pids(&text).first() == Some(&pid), "sorted by VmPin, the 1 MiB holder {pid} is not first:\n{text}");
                    // DIFF is VmPin minus what pinwatch saw long-term pinned: all of the
                    // 1 MiB where GUP calls cannot be seen, nothing where they can.
                    tmux(&["send-keys", "-t", s, "d"])?;
                    let text = wait_for(s, "DIFF*")?;
                    let row = text.lines().find(|l| l.split_whitespace().next() == Some(&pid.to_string())).unwrap_or("");
                    if !text.contains("tracepoint-only mode") {
                        ensure!(row.split_whitespace().any(|c| c == "="), "the holder's DIFF is not \"=\": {row}");
                    } else {
                        ensure!(row_pids(&text).first() == Some(&pid), "sorted by DIFF, the holder {pid} is not first:\n{text}");
                        ensure!(row.split_whitespace().any(|c| c == "+1.0M"), "the holder's DIFF is not +1.0M: {row}");
                    }
                    tmux(&["send-keys", "-t", s, "n"])?;
                    let text = wait_for(s, "PID*")?;
                    let pids = row_pids(&text);
                    ensure!(pids.len() >= 2 && pids.windows(2).all(|w| w[0] <= w[1]), "sorted by PID, rows are {pids:?}");
                    tmux(&["send-keys", "-t", s, "r"])?;
                    let text = wait_for(s, "(reversed)")?;
                    let rev = row_pids(&text);
                    ensure!(rev.windows(2).all(|w| w[0] >= w[1]), "reversed, rows are {rev:?}");
                }
                tmux(&["send-keys", "-t", s, quit])?;
                // Read once stty has answered: read at TOP-EXITED, a busy machine showed
                // the screen before stty's lines were on it.
                let text = wait_for(s, "STTY-DONE")?;
                ensure!(text.contains("TOP-EXITED 0"), "top did not exit 0 on {quit}:\n{text}");
                ensure!(text.lines().any(|l| l.trim() == "echo") && text.lines().any(|l| l.trim() == "icanon"), "terminal not restored after {quit} (stty):\n{text}");
                ensure!(!text.contains("PINNED*"), "the table is still on screen after {quit}:\n{text}");
                Ok(format!("sorted from the keyboard{}, left with {quit}, terminal restored", if quit == "q" { " (VmPin, DIFF, PID, reversed)" } else { "" }))
            })();
            let _ = tmux(&["kill-session", "-t", s]);
            out.push((format!("host top interactive ({quit})"), r));
        }
        Ok(out)
    })();
    let _ = holder.kill();
    let _ = holder.wait();
    for (what, r) in result? {
        match r {
            Ok(d) => tally.pass(&what, &d),
            Err(e) => tally.fail(&what, &format!("{e:#}")),
        }
    }
    Ok(())
}

fn cargo_tests() -> Result<()> {
    util::run(Command::new("cargo").args(["test", "--workspace", "--exclude", "pinwatch-ebpf"]).current_dir(util::workspace_root()))
}

fn demo(kernel: &str) -> Result<()> {
    let s = selected(&[kernel.to_string()])?.remove(0);
    let bins = lab::build_binaries()?;
    let conf = kernels::update()?;
    let Fetched::Ready(k) = kernels::fetch(&conf, &s)? else { bail!("kernel {kernel} is not available") };
    let work: PathBuf = util::cache_dir().join("demo");
    std::fs::create_dir_all(&work)?;
    println!("demo: booting Debian {} under QEMU (emulated, no KVM: a few minutes) and running pinwatch there", k.release);
    let img = lab::build_initramfs(&k, &bins, &(plan(Some(DEMO)) + DEMO_PLAN), &work)?;
    let boot = lab::boot(&k, &img, &work, BOOT_LIMIT)?;
    let results = lab::parse(&boot.results);
    if let Some(d) = results.get("doctor_text") {
        println!("\n$ pinwatch doctor");
        d.out.iter().for_each(|l| println!("{l}"));
    }
    println!("\n$ pinwatch record --output NAME.jsonl -- SCENARIO   (the traces are in {})", work.display());
    for (name, opts, cmd) in SCENARIOS {
        let Some(r) = results.get(*name) else { continue };
        let trace = work.join(format!("{name}.trace.jsonl"));
        std::fs::write(&trace, r.trace.iter().map(|t| t.to_string() + "\n").collect::<String>())?;
        let count = |ev: &str| r.trace.iter().filter(|e| e["event"] == ev).count();
        let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
        for h in r.trace.iter().filter(|e| e["event"] == "hazard") {
            *kinds.entry(h["kind"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} {k}")).collect();
        println!(
            "  {name:<10} {:<4} pins, {:<3} hazards {}   ({}{})",
            count("pin"),
            count("hazard"),
            if kinds.is_empty() { String::new() } else { format!("({})", kinds.join(", ")) },
            cmd.trim_start_matches("pinwatch-scenario "),
            if opts.is_empty() { String::new() } else { format!(", {opts}") }
        );
    }
    let hazard = work.join("hazard.trace.jsonl");
    if hazard.exists() {
        println!("\n$ pinwatch report --story --file /mnt/hazard hazard.trace.jsonl   (the 2018 sequence, told)");
        let out = Command::new(&bins.pinwatch).args(["report", "--story", "--file", "/mnt/hazard"]).arg(&hazard).output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        for (format, file) in [("html", "hazard.html"), ("perfetto", "hazard.perfetto.json")] {
            let out = Command::new(&bins.pinwatch).args(["export", "--force", "--format", format, "-o"]).arg(work.join(file)).arg(&hazard).output()?;
            ensure!(out.status.success(), "export: {}", String::from_utf8_lossy(&out.stderr));
        }
        println!(
            "\nThe timeline: {} (open it in a browser) and {} (open it in ui.perfetto.dev)",
            work.join("hazard.html").display(),
            work.join("hazard.perfetto.json").display()
        );
    }
    if let Some(top) = results.get("top_table") {
        println!("\n$ pinwatch top -b -n 4 -d 1   (while io_uring pins 1 MiB; the refresh that shows it)");
        let text = top.out.join("\n");
        let refreshes: Vec<&str> = text.split("\n\n").collect();
        let shown = refreshes.iter().find(|r| r.contains("pinwatch-scen") && r.contains("1.0M")).or(refreshes.last());
        println!("{}", shown.unwrap_or(&""));
    }
    println!("\ndemo: traces, exports and the guest console are in {}", work.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = (|| -> Result<bool> {
        match cli.command {
            Cmd::Setup => setup::setup().map(|_| true),
            Cmd::Demo { kernel } => {
                setup::setup()?;
                demo(&kernel).map(|_| true)
            }
            Cmd::Lab { kernels } => {
                setup::setup()?;
                let mut t = Tally::default();
                lab(&kernels, &lab::build_binaries()?, &mut t)?;
                summary(&t);
                Ok(t.failed == 0)
            }
            Cmd::Bench { kernels, rounds, check, clock } => {
                setup::setup()?;
                bench::run(&kernels, rounds, check, clock, &mut lab::build_binaries()?)
            }
            Cmd::Package => {
                setup::setup()?;
                let deb = package::build()?;
                println!("package: {}", deb.display());
                let checked = package::check(&deb)?;
                println!("package: {checked}");
                Ok(true)
            }
            Cmd::Host => {
                setup::setup()?;
                let mut t = Tally::default();
                let bins = lab::build_binaries()?;
                host(&bins, &mut t)?;
                host_top(&bins, &mut t)?;
                summary(&t);
                Ok(t.failed == 0)
            }
            Cmd::Test => {
                setup::setup()?;
                cargo_tests()?;
                let mut t = Tally::default();
                let bins = lab::build_binaries()?;
                host(&bins, &mut t)?;
                host_top(&bins, &mut t)?;
                lab(&[], &bins, &mut t)?;
                summary(&t);
                Ok(t.failed == 0)
            }
        }
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn summary(t: &Tally) {
    for n in &t.not_run {
        println!("not tested: {n}");
    }
    println!("lab: {} passed, {} failed", t.passed, t.failed);
}
