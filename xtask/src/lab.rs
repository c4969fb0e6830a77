//! The VM lab: an initramfs holding pinwatch, the scenarios, the modules they need and
//! an ext4 image; QEMU (TCG) boots a Debian kernel with it, the guest runs a plan and
//! writes results to a second serial port, kept apart from kernel messages.
//! A panic, a hang or a missing result is a failure: nothing is assumed.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{kernels::Kernel, util::{output, quiet, run, workspace_root}};

/// Modules the plan needs, with their parameters. Dependencies come from modules.dep.
const MODULES: &[(&str, &str)] = &[
    ("configfs", ""),
    // ram0 ext4, ram1 xfs (mkfs.xfs wants 300 MiB), ram2 btrfs; pages are allocated as
    // they are written, so the sizes cost nothing until used.
    ("brd", "rd_nr=3 rd_size=327680"),
    ("xfs", ""),
    ("btrfs", ""),
    // Every I/O takes 2 s: a DMA that keeps its pages pinned long enough to watch.
    ("null_blk", "irqmode=2 completion_nsec=2000000000 nr_devices=1"),
    // A network card, for Prometheus on the host to scrape the daemon in the guest.
    ("virtio_pci", ""),
    ("virtio_net", ""),
    // VFIO's type1 container over the emulated Intel IOMMU (lab boots with `iommu`).
    // QEMU's IOMMU here remaps no interrupts, which type1 refuses unless told.
    ("vfio", ""),
    ("vfio_iommu_type1", "allow_unsafe_interrupts=1"),
    ("vfio_pci", ""),
];

/// Modules a kernel may have built in without saying so: 7.x's package ships no
/// modules.builtin, and its cloud kernel builds virtio_pci in (as 6.12's does). If it
/// does not, the guest has no network and the daemon's scrape check says so.
const BUILT_IN_MAYBE: &[&str] = &["virtio_pci"];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null
mount -t debugfs nodev /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf
R=/dev/ttyS1
say() { echo "PINWATCH-LAB $*" > $R; }
say BOOTED $(uname -r)
while read -r mod params; do
  [ -n "$mod" ] || continue
  insmod /modules/$mod $params || say ERROR insmod $mod
done < /modules/load.list
mount -t configfs none /sys/kernel/config 2>/dev/null
dd if=/ext4.img of=/dev/ram0 bs=1M 2>/dev/null || say ERROR dd
mkdir -p /mnt && mount -t ext4 /dev/ram0 /mnt || say ERROR mount ext4
mkdir -p /xfs /btrfs
mkfs.xfs -q -f /dev/ram1 > /dev/null 2>&1 && mount -t xfs /dev/ram1 /xfs || say ERROR xfs
mkfs.btrfs -q -f /dev/ram2 > /dev/null 2>&1 && mount -t btrfs /dev/ram2 /btrfs || say ERROR btrfs
# No background writeback: only a scenario's own msync writes pages out, so a control
# stays a control. (A flusher cleaning a pinned page is a real hazard: pinwatch reports
# it, and did, the one time it happened during a control.)
echo 0 > /proc/sys/vm/dirty_writeback_centisecs
echo 360000 > /proc/sys/vm/dirty_expire_centisecs
[ -b /dev/nullb0 ] || say ERROR no /dev/nullb0
. /plan.sh
say DONE
sync
poweroff -f
"#;

/// `send_back NAME RC OUT ERR TRACE`: a finished run's exit status and files (those
/// that exist), each line marked, then its end. `record` runs one command under
/// `pinwatch record` and sends everything back.
const PLAN_HELPERS: &str = r#"
send_back() {
  say RC $1 $2
  [ -f "$3" ] && sed "s/^/PINWATCH-LAB OUT $1 /" "$3" > $R
  [ -f "$4" ] && sed "s/^/PINWATCH-LAB ERR $1 /" "$4" > $R
  [ -f "$5" ] && sed "s/^/PINWATCH-LAB TRACE $1 /" "$5" > $R
  say END $1
}
record() {
  name=$1; shift
  say BEGIN $name
  pinwatch record --output /tmp/$name.jsonl "$@" > /tmp/$name.out 2> /tmp/$name.err
  send_back $name $? /tmp/$name.out /tmp/$name.err /tmp/$name.jsonl
}
"#;

#[derive(Clone)]
pub struct Binaries {
    pub pinwatch: PathBuf,
    pub scenario: PathBuf,
    /// More of this machine's programs to copy in with their libraries (the bench's
    /// fio, bpftrace and bpftool).
    pub extra: Vec<PathBuf>,
}

pub fn build_binaries() -> Result<Binaries> {
    let root = workspace_root();
    quiet(Command::new("cargo").args(["build", "--release", "-p", "pinwatch", "-p", "pinwatch-scenarios"]).current_dir(&root))?;
    let dir = root.join("target/release");
    Ok(Binaries { pinwatch: dir.join("pinwatch"), scenario: dir.join("pinwatch-scenario"), extra: Vec::new() })
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(p) = to.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Shared libraries a dynamically linked binary needs, from ldd.
fn libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in text.lines() {
        let path = match line.split("=>").nth(1) {
            Some(rest) => rest.split_whitespace().next(),
            None => line.split_whitespace().next().filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Module files to load, dependencies first, with parameters.
fn module_plan(k: &Kernel) -> Result<Vec<(PathBuf, String)>> {
    let dep = fs::read_to_string(k.modules.join("modules.dep")).context("modules.dep")?;
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in dep.lines() {
        let Some((m, d)) = line.split_once(':') else { continue };
        deps.insert(m.trim().to_string(), d.split_whitespace().map(str::to_string).collect());
    }
    let builtin = fs::read_to_string(k.modules.join("modules.builtin")).unwrap_or_default();
    let find = |name: &str| -> Option<String> {
        deps.keys()
            .find(|p| {
                let file = p.rsplit('/').next().unwrap_or(p);
                let stem = file.split(".ko").next().unwrap_or(file);
                stem == name || stem.replace('-', "_") == name
            })
            .cloned()
    };
    let mut order: Vec<(PathBuf, String)> = Vec::new();
    let mut seen = HashSet::new();
    fn visit(p: &str, deps: &BTreeMap<String, Vec<String>>, seen: &mut HashSet<String>, out: &mut Vec<String>) {
        if !seen.insert(p.to_string()) {
            return;
        }
        for d in deps.get(p).into_iter().flatten() {
            visit(d, deps, seen, out);
        }
        out.push(p.to_string());
    }
    for (name, params) in MODULES {
        let Some(path) = find(name) else {
            if builtin.lines().any(|l| l.rsplit('/').next().is_some_and(|f| f.starts_with(&format!("{name}.ko")))) {
                continue;
            }
            if builtin.is_empty() && BUILT_IN_MAYBE.contains(name) {
                continue;
            }
            bail!("module {name} is neither in modules.dep nor built into {}", k.release);
        };
        let mut list = Vec::new();
        visit(&path, &deps, &mut seen, &mut list);
        for p in list {
            let params = if p == path { params.to_string() } else { String::new() };
            order.push((k.modules.join(&p), params));
        }
    }
    Ok(order)
}

pub fn build_initramfs(k: &Kernel, bins: &Binaries, plan: &str, work: &Path) -> Result<PathBuf> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for d in ["bin", "sbin", "proc", "sys", "dev", "tmp", "mnt", "modules", "etc"] {
        fs::create_dir_all(root.join(d))?;
    }
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox")).context("busybox-static is needed (`cargo xtask setup`)")?;
    let mkfs = [Path::new("/sbin/mkfs.xfs"), Path::new("/sbin/mkfs.btrfs")];
    for bin in [bins.pinwatch.as_path(), bins.scenario.as_path()].into_iter().chain(mkfs).chain(bins.extra.iter().map(PathBuf::as_path)) {
        let bin = &fs::canonicalize(bin).with_context(|| format!("{} (`cargo xtask setup` installs it)", bin.display()))?;
        copy(bin, &root.join("bin").join(bin.file_name().expect("file")))?;
        for lib in libraries(bin)? {
            copy(&lib, &root.join(lib.strip_prefix("/").expect("absolute")))?;
        }
    }
    let mut list = String::new();
    for (path, params) in module_plan(k)? {
        let file = path.file_name().expect("file").to_string_lossy().into_owned();
        let plain = file.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
        let dest = root.join("modules").join(&plain);
        if file.ends_with(".xz") {
            let data = Command::new("xz").arg("-dc").arg(&path).output().context("xz")?;
            if !data.status.success() {
                bail!("xz -dc {} failed", path.display());
            }
            fs::write(&dest, data.stdout)?;
        } else {
            copy(&path, &dest)?;
        }
        list.push_str(&format!("{plain} {params}\n"));
    }
    fs::write(root.join("modules/load.list"), list)?;
    let img = root.join("ext4.img");
    run(Command::new("mkfs.ext4").args(["-q", "-F", "-b", "4096"]).arg(&img).arg("24M").stdout(Stdio::null()))?;
    fs::write(root.join("init"), INIT)?;
    fs::write(root.join("plan.sh"), format!("{PLAN_HELPERS}\n{plan}"))?;
    run(Command::new("chmod").arg("+x").arg(root.join("init")))?;
    let cpio = work.join("initramfs.cpio");
    run(Command::new("sh")
        .arg("-c")
        .arg(format!("find . | cpio -o -H newc --quiet > {}", cpio.display()))
        .current_dir(&root))?;
    Ok(cpio)
}

/// What came back from one boot (the console stays in console.log beside it).
pub struct Boot {
    pub results: Vec<String>,
    /// How long the boot ran, and when each part of the plan began (its BEGIN mark, as
    /// the host saw it, to a second): the verifier and the emulator decide most of it.
    pub took: Duration,
    pub began: Vec<(String, Duration)>,
}

impl Boot {
    /// "612 s of 900 (doctor 41, memfd 12, ...)": each part's seconds up to the next.
    pub fn timing(&self, limit: Duration) -> String {
        format!("{} s of {} ({})", self.took.as_secs(), limit.as_secs(), parts_timing(&self.began, self.took))
    }
}

fn parts_timing(began: &[(String, Duration)], end: Duration) -> String {
    let mut parts = Vec::new();
    for (i, (name, at)) in began.iter().enumerate() {
        let next = began.get(i + 1).map(|(_, t)| *t).unwrap_or(end);
        parts.push(format!("{name} {}", next.saturating_sub(*at).as_secs()));
    }
    parts.join(", ")
}

/// The BEGIN marks of the results port not yet in `began`, stamped with `at`.
fn note_begins(results: &Path, began: &mut Vec<(String, Duration)>, at: Duration) {
    let Ok(text) = fs::read_to_string(results) else { return };
    let names: Vec<&str> = text.lines().filter_map(|l| l.trim_end_matches('\r').strip_prefix("PINWATCH-LAB BEGIN ")).collect();
    // began[0] is the boot itself, up to the first mark (doctor runs there).
    for name in names.iter().skip(began.len().saturating_sub(1)) {
        began.push((name.to_string(), at));
    }
}

pub fn boot(k: &Kernel, initramfs: &Path, work: &Path, limit: Duration) -> Result<Boot> {
    boot_with_memory(k, initramfs, work, limit, "1G", None, false, false)
}

/// Where a boot's results port is written, as it runs.
pub fn results_path(work: &Path) -> PathBuf {
    work.join("results.log")
}

/// A boot with more guest memory: the bench's initramfs carries fio and bpftrace with
/// their libraries (about 300 MB, held in RAM).
/// `forward`: QEMU's user network, with 127.0.0.1:PORT here forwarded to the guest's
/// port 9464 (the daemon's metrics); without it, QEMU's default card, which the guest
/// leaves alone.
/// `iommu`: a q35 machine with an emulated Intel IOMMU (the guest's `intel_iommu=on`,
/// other devices passed through) and QEMU's `edu` PCI device for the guest to bind to
/// vfio-pci: VFIO's DMA mappings pin memory as on a host with a real device.
/// `counted`: the guest's clock counts its instructions (QEMU's -icount), for the bench.
#[allow(clippy::too_many_arguments)]
pub fn boot_with_memory(k: &Kernel, initramfs: &Path, work: &Path, limit: Duration, memory: &str, forward: Option<u16>, iommu: bool, counted: bool) -> Result<Boot> {
    let console = work.join("console.log");
    let results = results_path(work);
    let mut qemu = Command::new("qemu-system-x86_64");
    let mut append = String::from("console=ttyS0 panic=-1 oops=panic quiet");
    if iommu {
        // The IOMMU must come before every other PCI device.
        qemu.args(["-machine", "q35", "-device", "intel-iommu", "-device", "edu"]);
        append.push_str(" intel_iommu=on iommu=pt");
    }
    match forward {
        Some(port) => qemu.args(["-netdev", &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:9464"), "-device", "virtio-net-pci,netdev=n0"]),
        None => &mut qemu,
    };
    if counted {
        // Guest time is the guest's instruction count, 1 ns each, and idle time is
        // skipped: the host's load moves nothing the guest measures.
        qemu.args(["-icount", "shift=0,sleep=off"]);
    }
    let mut child = qemu
        .args(["-accel", "tcg", "-cpu", "max", "-m", memory, "-smp", "2", "-no-reboot", "-display", "none", "-monitor", "none"])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(&append)
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64 (`cargo xtask setup` installs it)")?;
    let start = Instant::now();
    let mut hung = false;
    let mut began = vec![("boot and doctor".to_string(), Duration::ZERO)];
    let mut polls = 0u64;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            hung = true;
            break;
        }
        polls += 1;
        if polls % 5 == 0 {
            note_begins(&results, &mut began, start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let took = start.elapsed();
    note_begins(&results, &mut began, took);
    let console = fs::read_to_string(&console).unwrap_or_default();
    let results: Vec<String> = fs::read_to_string(&results).unwrap_or_default().lines().map(|l| l.trim_end_matches('\r').to_string()).collect();
    if console.contains("Kernel panic") || console.contains("BUG:") {
        let at = console.find("Kernel panic").or_else(|| console.find("BUG:")).unwrap_or(0);
        bail!("kernel {} crashed:\n{}", k.release, &console[at.saturating_sub(2000)..(at + 1500).min(console.len())]);
    }
    if hung {
        bail!(
            "kernel {} did not finish within {:?} (hang); the plan's parts in seconds: {}; last console lines:\n{}",
            k.release,
            limit,
            parts_timing(&began, took),
            tail(&console, 30)
        );
    }
    if !results.iter().any(|l| l == "PINWATCH-LAB DONE") {
        bail!("kernel {} powered off without reporting DONE; console:\n{}", k.release, tail(&console, 40));
    }
    for l in &results {
        if let Some(e) = l.strip_prefix("PINWATCH-LAB ERROR ") {
            return Err(anyhow!("guest set-up failed on {}: {e}", k.release));
        }
    }
    Ok(Boot { results, took, began })
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One `record` block of the plan, as the guest reported it.
#[derive(Default, Debug)]
pub struct Recorded {
    pub rc: Option<i32>,
    pub out: Vec<String>,
    pub err: Vec<String>,
    pub trace: Vec<serde_json::Value>,
    pub ended: bool,
}

impl Recorded {
    /// What the run printed on stdout after `prefix`, line by line (the scenarios'
    /// `PINWATCH-...` marks).
    pub fn tagged<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.out.iter().filter_map(move |l| l.strip_prefix(prefix))
    }

    /// The JSON of each line after `prefix` that parses.
    pub fn tagged_json(&self, prefix: &str) -> Vec<serde_json::Value> {
        self.tagged(prefix).filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

pub fn parse(results: &[String]) -> BTreeMap<String, Recorded> {
    let mut m: BTreeMap<String, Recorded> = BTreeMap::new();
    for l in results {
        let Some(rest) = l.strip_prefix("PINWATCH-LAB ") else { continue };
        let mut it = rest.splitn(3, ' ');
        let (Some(tag), Some(name)) = (it.next(), it.next()) else { continue };
        let body = it.next().unwrap_or("");
        match tag {
            "BEGIN" => {
                m.entry(name.to_string()).or_default();
            }
            "RC" => m.entry(name.to_string()).or_default().rc = body.trim().parse().ok(),
            "OUT" => m.entry(name.to_string()).or_default().out.push(body.to_string()),
            "ERR" => m.entry(name.to_string()).or_default().err.push(body.to_string()),
            "TRACE" => {
                let r = m.entry(name.to_string()).or_default();
                match serde_json::from_str(body) {
                    Ok(v) => r.trace.push(v),
                    Err(e) => r.err.push(format!("unparsable trace line ({e}): {body}")),
                }
            }
            "END" => m.entry(name.to_string()).or_default().ended = true,
            _ => {}
        }
    }
    m
}
