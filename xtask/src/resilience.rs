//! pinwatch tried as a new user and an operator would, on this machine's kernel: bad
//! options, bad output paths, signals from systemd and from a terminal, privileges
//! granted as capabilities rather than root. Each check provokes the case for real and
//! reads what pinwatch did (exit status, files, processes left behind).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

use crate::lab::Binaries;

type Check = (String, Result<String>);

pub fn checks(bins: &Binaries) -> Vec<Check> {
    let dir = std::env::temp_dir().join(format!("pinwatch-resilience-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return vec![("host resilience".into(), Err(anyhow::anyhow!("creating {}: {e}", dir.display())))];
    }
    let pw = bins.pinwatch.as_path();
    let mut out: Vec<Check> = vec![
        ("host bad values refused".into(), bad_values(pw, &dir)),
        ("host trace file safety".into(), trace_files(pw, &dir)),
        ("host --attach kprobe without kprobes".into(), explicit_attach(pw, &dir)),
        ("host top -p".into(), top_pids(pw)),
        ("host capabilities, not uid".into(), capabilities(pw)),
        ("host doctor width".into(), doctor_width(pw)),
    ];
    for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        out.push((format!("host record ended by {name}"), record_signal(pw, &dir, sig)));
    }
    for mode in ["record", "top"] {
        out.push((format!("host kill -9 of {mode} leaves nothing in the kernel"), kill9_leaves_nothing(pw, &dir, mode)));
    }
    out.push(("host two instances at once".into(), two_instances(pw, &dir)));
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).output().with_context(|| format!("running {cmd:?}"))
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// Refused with exit 2, a message with `says`, and nothing attached: the line pinwatch
/// prints once its programs are loaded never appears.
fn refused(o: &Output, says: &str, what: &str) -> Result<()> {
    let t = text(o);
    ensure!(!t.contains("panicked"), "{what}: pinwatch panicked:\n{t}");
    ensure!(o.status.code() == Some(2), "{what}: exit {:?}, not 2:\n{t}", o.status.code());
    ensure!(t.contains(says), "{what}: the message does not say {says:?}:\n{t}");
    ensure!(!t.contains("tracepoint-only mode"), "{what}: refused only after attaching:\n{t}");
    Ok(())
}

fn bad_values(pw: &Path, dir: &Path) -> Result<String> {
    let trace = dir.join("bad.jsonl");
    for bad in ["--duration=-1", "--duration=nan", "--duration=inf", "--duration=0", "--max-pin-age=soon"] {
        let o = run(Command::new(pw).args(["record", bad, "--output"]).arg(&trace))?;
        refused(&o, "duration", bad)?;
        ensure!(!trace.exists(), "{bad}: a trace file was left behind");
    }
    for bad in [&["-d", "inf"][..], &["-d=-1"], &["-n", "0"], &["-p", "0"]] {
        let o = run(Command::new(pw).arg("top").arg("-b").args(bad))?;
        let says = if bad[0] == "-n" { "at least 1" } else if bad[0] == "-p" { "process id" } else { "duration" };
        refused(&o, says, &format!("top {}", bad.join(" ")))?;
    }
    Ok("record --duration -1/nan/inf/0, top -d inf/-1, -n 0, -p 0: exit 2 with the reason, before attaching".into())
}

fn trace_files(pw: &Path, dir: &Path) -> Result<String> {
    let missing = dir.join("no/such/dir/t.jsonl");
    let o = run(Command::new(pw).args(["record", "--duration", "1", "--output"]).arg(&missing))?;
    refused(&o, "no/such/dir", "missing directory")?;
    let existing = dir.join("existing.jsonl");
    std::fs::write(&existing, "keep me\n")?;
    let o = run(Command::new(pw).args(["record", "--duration", "1", "--output"]).arg(&existing))?;
    refused(&o, "--force", "existing file")?;
    ensure!(std::fs::read_to_string(&existing)? == "keep me\n", "an existing trace was overwritten without --force");
    let link = dir.join("link.jsonl");
    std::os::unix::fs::symlink(&existing, &link)?;
    let o = run(Command::new(pw).args(["record", "--force", "--duration", "1", "--output"]).arg(&link))?;
    refused(&o, "symbolic link", "symlink")?;
    ensure!(std::fs::read_to_string(&existing)? == "keep me\n", "a trace was written through a symbolic link");
    let fresh = dir.join("fresh.jsonl");
    let o = run(Command::new(pw).args(["record", "--duration", "1", "--output"]).arg(&fresh))?;
    ensure!(o.status.success(), "record --duration 1: exit {:?}:\n{}", o.status.code(), text(&o));
    let mode = std::fs::metadata(&fresh)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "the trace is created {mode:o}, not 600");
    let o = run(Command::new(pw).args(["record", "--force", "--duration", "1", "--output"]).arg(&existing))?;
    ensure!(o.status.success(), "record --force: exit {:?}:\n{}", o.status.code(), text(&o));
    ensure!(std::fs::read_to_string(&existing)?.contains("\"event\":\"stop\""), "--force did not replace the file with a trace");
    Ok("missing directory named, existing file kept without --force, no write through a link, new traces 0600".into())
}

fn explicit_attach(pw: &Path, dir: &Path) -> Result<String> {
    if Path::new("/sys/bus/event_source/devices/kprobe").exists() {
        return Ok("not applicable: this kernel has kprobes (the lab covers --attach kprobe)".into());
    }
    let o = run(Command::new(pw).args(["record", "--attach", "kprobe", "--duration", "1", "--output"]).arg(dir.join("kprobe.jsonl")))?;
    let t = text(&o);
    ensure!(o.status.code() == Some(2) && t.contains("--attach kprobe"), "exit {:?}:\n{t}", o.status.code());
    ensure!(!dir.join("kprobe.jsonl").exists(), "a trace file was left behind");
    Ok("an attach type this kernel refuses is an error, not tracepoint-only recording".into())
}

fn top_pids(pw: &Path) -> Result<String> {
    let mut sleeper = Command::new("sleep").arg("60").spawn()?;
    let pid = sleeper.id();
    let o = run(Command::new(pw).args(["top", "-b", "-n", "1", "-d", "0.5", "-p"]).arg(format!("999999,{pid}")));
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let o = o?;
    let t = text(&o);
    ensure!(o.status.success(), "exit {:?}:\n{t}", o.status.code());
    ensure!(t.contains("pid 999999: no such process"), "pid 999999 is not said to be missing:\n{t}");
    ensure!(t.contains(&format!("pins of pid {pid} by mapping")), "pid {pid} of the list is not shown:\n{t}");
    Ok("-p takes a list; a pid that does not exist is said to be missing".into())
}

fn capabilities(pw: &Path) -> Result<String> {
    // Root with every capability dropped: refused, naming what is missing.
    let o = run(Command::new("setpriv").args(["--bounding-set=-all", "--inh-caps=-all"]).arg(pw).arg("doctor"))?;
    let t = text(&o);
    ensure!(o.status.code() == Some(2) && t.contains("CAP_BPF") && t.contains("CapEff 0x0"), "root without capabilities: exit {:?}:\n{t}", o.status.code());
    // Not root, with what a systemd unit grants: runs. The binary must be readable by
    // nobody, so it is copied where it is.
    let copy = PathBuf::from("/tmp").join(format!("pinwatch-caps-{}", std::process::id()));
    std::fs::copy(pw, &copy)?;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755))?;
    let caps = "+bpf,+perfmon,+syslog";
    let o = run(Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={caps}"))
        .arg(format!("--ambient-caps={caps}"))
        .arg(&copy)
        .args(["doctor", "--format", "json"]));
    let _ = std::fs::remove_file(&copy);
    let o = o?;
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| format!("doctor as nobody with {caps}: not JSON:\n{}", text(&o)))?;
    ensure!(matches!(o.status.code(), Some(0 | 1)), "nobody with {caps}: exit {:?}:\n{}", o.status.code(), text(&o));
    ensure!(j["sees"].as_array().is_some_and(|a| !a.is_empty()), "nobody with {caps} sees nothing: {}", j["verdict"]);
    Ok(format!("root without capabilities refused naming CAP_BPF; uid 65534 with {caps} runs and sees {}", j["sees"]))
}

fn doctor_width(pw: &Path) -> Result<String> {
    let o = run(Command::new(pw).arg("doctor"))?;
    let t = String::from_utf8_lossy(&o.stdout);
    let widest = t.lines().map(|l| l.chars().count()).max().unwrap_or(0);
    ensure!(widest <= 100, "a line of {widest} columns:\n{}", t.lines().find(|l| l.chars().count() == widest).unwrap_or(""));
    let json = run(Command::new(pw).args(["doctor", "--format", "json"]))?;
    let j = String::from_utf8_lossy(&json.stdout);
    ensure!(!t.contains("0xffff") && !j.contains("0xffff"), "doctor shows a kernel address");
    let v: serde_json::Value = serde_json::from_str(&j).context("doctor --format json")?;
    for key in ["mode", "can_track_pins", "sees", "blind", "pfns", "attach_types", "verdict"] {
        ensure!(!v[key].is_null(), "doctor's JSON has no {key}");
    }
    Ok(format!("widest line {widest} columns; no kernel address; JSON has mode, sees, blind, pfns"))
}

/// The pids of `pid`'s children.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| s.split_whitespace().filter_map(|p| p.parse().ok()).collect::<Vec<u32>>())
        .collect()
}

fn wait_for(child: &mut Child, limit: Duration) -> Result<Option<i32>> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            bail!("still running {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `record -- sleep`, stopped by `sig` once attached: the trace is whole (its stop line
/// is there), the command got the signal and is gone, and record exits with its status.
fn record_signal(pw: &Path, dir: &Path, sig: i32) -> Result<String> {
    let trace = dir.join(format!("signal-{sig}.jsonl"));
    let mut child = Command::new(pw)
        .args(["record", "--output"])
        .arg(&trace)
        .args(["--", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let started = Instant::now();
    let sleeper = loop {
        let kids = children(pid);
        let attached = std::fs::read_to_string(&trace).unwrap_or_default().contains("\"event\":\"start\"");
        if attached && !kids.is_empty() {
            break kids[0];
        }
        if started.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("record never started its command (trace: {:?})", std::fs::read_to_string(&trace).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // SAFETY: a signal to the child we spawned.
    unsafe { libc::kill(pid as i32, sig) };
    let code = wait_for(&mut child, Duration::from_secs(20))?;
    let t = std::fs::read_to_string(&trace).unwrap_or_default();
    ensure!(t.lines().last().is_some_and(|l| l.contains("\"event\":\"stop\"")), "the trace has no stop line after the signal ({} bytes)", t.len());
    ensure!(!Path::new(&format!("/proc/{sleeper}")).exists(), "the recorded command (pid {sleeper}) is still running");
    ensure!(code == Some(128 + sig), "record exited {code:?}, not the command's 128+{sig}");
    Ok(format!("trace ends with its stop line, the command got the signal and is gone, exit {}", 128 + sig))
}

/// BPF programs, maps and links loaded now, by id (bpftool, from Debian's package).
fn bpf_objects() -> Result<std::collections::BTreeSet<(String, u64)>> {
    let mut out = std::collections::BTreeSet::new();
    for kind in ["prog", "map", "link"] {
        let o = run(Command::new("bpftool").args([kind, "show", "-j"]))?;
        ensure!(o.status.success(), "bpftool {kind} show: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).with_context(|| format!("bpftool {kind} show -j"))?;
        for obj in v.as_array().into_iter().flatten() {
            let name = obj["name"].as_str().unwrap_or("").to_string();
            out.insert((format!("{kind} {name}"), obj["id"].as_u64().unwrap_or(0)));
        }
    }
    Ok(out)
}

/// Starts a live mode and returns it once its programs are attached.
fn start_live(pw: &Path, dir: &Path, mode: &str, name: &str) -> Result<Child> {
    let trace = dir.join(format!("{name}.jsonl"));
    let mut cmd = Command::new(pw);
    match mode {
        "record" => cmd.args(["record", "--force", "--output"]).arg(&trace),
        _ => cmd.args(["top", "-b", "-d", "0.5", "--format", "json"]),
    };
    let out = std::fs::File::create(dir.join(format!("{name}.out")))?;
    let mut child = cmd.stdin(Stdio::null()).stdout(out).stderr(Stdio::null()).spawn()?;
    let started = Instant::now();
    loop {
        let attached = match mode {
            "record" => std::fs::read_to_string(&trace).unwrap_or_default().contains("\"event\":\"start\""),
            _ => std::fs::metadata(dir.join(format!("{name}.out"))).map(|m| m.len() > 0).unwrap_or(false),
        };
        if attached {
            return Ok(child);
        }
        if started.elapsed() > Duration::from_secs(60) || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("pinwatch {mode} never attached");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kill -9 of a live mode: every program, map and link it made goes with it (the
/// kernel frees them when the last fd closes; nothing is pinned in bpffs), and a new
/// instance starts at once.
fn kill9_leaves_nothing(pw: &Path, dir: &Path, mode: &str) -> Result<String> {
    let before = bpf_objects()?;
    let mut child = start_live(pw, dir, mode, &format!("kill9-{mode}"))?;
    let during = bpf_objects()?;
    let made = during.difference(&before).count();
    ensure!(made > 0, "bpftool saw nothing of pinwatch {mode} while it ran");
    let _ = child.kill();
    let _ = child.wait();
    // Freeing is deferred past an RCU grace period: give it a few seconds.
    let mut left = Vec::new();
    for _ in 0..50 {
        let now = bpf_objects()?;
        left = now.difference(&before).cloned().collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(left.is_empty(), "left in the kernel after kill -9 of {mode}: {left:?}");
    let o = run(Command::new(pw).args(["record", "--force", "--duration", "1", "--output"]).arg(dir.join("restart.jsonl")))?;
    ensure!(o.status.success(), "a restart right after the kill failed: {}", text(&o));
    Ok(format!("{made} programs, maps and links while it ran, none after the kill; a restart works at once"))
}

/// Two recordings at once: each has its own programs and maps, both work.
fn two_instances(pw: &Path, dir: &Path) -> Result<String> {
    let mut a = start_live(pw, dir, "record", "first")?;
    let b = run(Command::new(pw).args(["record", "--force", "--duration", "1", "--output"]).arg(dir.join("second.jsonl")));
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    let a_code = wait_for(&mut a, Duration::from_secs(20))?;
    let b = b?;
    ensure!(b.status.success(), "the second instance failed while the first ran: {}", text(&b));
    ensure!(a_code == Some(0), "the first instance exited {a_code:?}");
    for name in ["first", "second"] {
        let t = std::fs::read_to_string(dir.join(format!("{name}.jsonl")))?;
        ensure!(t.contains("\"event\":\"start\"") && t.contains("\"event\":\"stop\""), "the {name} trace is not whole");
    }
    Ok("a second recording while the first runs: both attach, both traces whole".into())
}
