//! The fleet daemon (`pinwatch alert`) tried as an operator would, on this machine's
//! kernel: the shipped Prometheus rules under promtool, a real Prometheus server
//! scraping the daemon and evaluating those rules while a hazard scenario and its
//! control run, configuration checks and SIGHUP reloads, a port already taken.

use std::{
    io::Read as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::Value;

use crate::{lab::Binaries, util};

type Check = (String, Result<String>);

pub fn rules_dir() -> PathBuf {
    util::workspace_root().join("deploy/prometheus")
}

/// promtool on the shipped rules and their unit tests.
pub fn promtool() -> Result<String> {
    let dir = rules_dir();
    let check = Command::new("promtool").args(["check", "rules", "pinwatch.rules.yml"]).current_dir(&dir).output().context("running promtool (Debian's prometheus package)")?;
    ensure!(check.status.success(), "promtool check rules: {}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    let test = Command::new("promtool").args(["test", "rules", "pinwatch.rules.test.yml"]).current_dir(&dir).output()?;
    let out = String::from_utf8_lossy(&test.stdout).into_owned() + &String::from_utf8_lossy(&test.stderr);
    ensure!(test.status.success() && out.contains("SUCCESS"), "promtool test rules:\n{out}");
    let n = check_rules_count(&String::from_utf8_lossy(&check.stdout));
    Ok(format!("{n} rules valid; their unit tests pass (promtool test rules)"))
}

fn check_rules_count(s: &str) -> String {
    s.lines().find_map(|l| l.trim().strip_prefix("SUCCESS: ").map(|r| r.split_whitespace().next().unwrap_or("?").to_string())).unwrap_or_else(|| "?".into())
}

pub fn checks(bins: &Binaries, tracepoint_only: bool) -> Vec<Check> {
    let dir = std::env::temp_dir().join(format!("pinwatch-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return vec![("host alert daemon".into(), Err(anyhow::anyhow!("creating {}: {e}", dir.display())))];
    }
    let mut out = vec![
        ("host prometheus rules".to_string(), promtool()),
        ("host systemd unit".to_string(), systemd_unit(&bins.pinwatch, &dir)),
        ("host alert --check-config".to_string(), check_config(&bins.pinwatch, &dir)),
    ];
    out.extend(daemon(bins, &dir, tracepoint_only));
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// The shipped unit passes `systemd-analyze verify` without a word (unknown keys are
/// only warnings there, so any output fails), with ExecStart pointed at the built binary.
fn systemd_unit(pw: &Path, dir: &Path) -> Result<String> {
    let unit = std::fs::read_to_string(util::workspace_root().join("deploy/systemd/pinwatch.service"))?;
    ensure!(unit.contains("ExecStart=/usr/bin/pinwatch alert"), "the unit does not start /usr/bin/pinwatch alert");
    let here = dir.join("pinwatch.service");
    std::fs::write(&here, unit.replace("/usr/bin/pinwatch", &pw.display().to_string()))?;
    let o = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&here).output().context("running systemd-analyze (Debian's systemd)")?;
    let said = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.success() && said.trim().is_empty(), "systemd-analyze verify: exit {:?}:\n{said}", o.status.code());
    for key in ["Type=notify", "CapabilityBoundingSet=", "NoNewPrivileges=yes", "ProtectSystem=strict", "MemoryMax=", "Restart=on-failure", "ExecReload="] {
        ensure!(unit.lines().any(|l| l.starts_with(key)), "the unit has no {key}");
    }
    Ok("systemd-analyze verify says nothing; Type=notify, capabilities bounded, hardened, memory capped, restart and reload set".into())
}

/// A valid file exits 0 and states the rules; bad ones exit 2 naming line and key.
fn check_config(pw: &Path, dir: &Path) -> Result<String> {
    let good = dir.join("good.toml");
    std::fs::write(&good, "[alert]\nmin_severity = \"warning\"\n[limits]\nmax_longterm_process = \"4MiB\"\n")?;
    let o = Command::new(pw).args(["alert", "--check-config"]).arg(&good).output()?;
    let t = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    ensure!(o.status.success() && t.contains("valid") && t.contains("4.0 MiB per process"), "a valid file: exit {:?}:\n{t}", o.status.code());
    for (text, says) in [
        ("[alert]\nmin_severity = \"warning\"\n\n[limits]\nmax_longterm_process = \"lots\"\n", "line 5, key `limits.max_longterm_process`"),
        ("[alert]\nkindz = []\n", "line 2, key `alert.kindz`"),
        ("[enforce]\naction = \"kill\"\n", "line 1, table [enforce]"),
    ] {
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, text)?;
        let o = Command::new(pw).args(["alert", "--check-config"]).arg(&bad).output()?;
        let t = String::from_utf8_lossy(&o.stderr).into_owned();
        ensure!(!t.contains("panicked"), "pinwatch panicked on {text:?}:\n{t}");
        ensure!(o.status.code() == Some(2) && t.contains(says), "{text:?}: exit {:?}, wanted 2 and {says:?}:\n{t}", o.status.code());
    }
    Ok("a valid file exits 0 stating its rules; 3 bad files exit 2 naming line and key".into())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn curl(url: &str) -> Result<String> {
    let o = Command::new("curl").args(["-sS", "--max-time", "5", url]).output().context("running curl")?;
    ensure!(o.status.success(), "GET {url}: {}", String::from_utf8_lossy(&o.stderr).trim());
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Alerts Prometheus holds, as (alertname, kind label, state).
fn prometheus_alerts(port: u16) -> Result<Vec<(String, String, String)>> {
    let v: Value = serde_json::from_str(&curl(&format!("http://127.0.0.1:{port}/api/v1/alerts"))?)?;
    Ok(v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            (s(&a["labels"]["alertname"]), s(&a["labels"]["kind"]), s(&a["state"]))
        })
        .collect())
}

/// A sample of an instant query, summed over its series.
fn prometheus_sum(port: u16, query: &str) -> Result<f64> {
    let v: Value = serde_json::from_str(&curl(&format!("http://127.0.0.1:{port}/api/v1/query?query={}", urlencode(query)))?)?;
    Ok(v["data"]["result"].as_array().into_iter().flatten().filter_map(|r| r["value"][1].as_str()?.parse::<f64>().ok()).sum())
}

fn urlencode(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

fn wait_until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match f() {
            Ok(Some(t)) => return Ok(t),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("{what} within {limit:?}{}", if last.is_empty() { String::new() } else { format!(" (last error: {last})") })
}

/// A Prometheus server (Debian's) here, scraping pinwatch at 127.0.0.1:`metrics_port`
/// every second and evaluating the shipped rules every second.
struct PromServer {
    _server: Running,
    port: u16,
}

impl PromServer {
    fn start(dir: &Path, metrics_port: u16) -> Result<PromServer> {
        let port = free_port()?;
        let yml = dir.join("prometheus.yml");
        std::fs::write(
            &yml,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: pinwatch\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n",
                rules_dir().join("pinwatch.rules.yml").display()
            ),
        )?;
        let server = spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", yml.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}")),
            dir,
            "prometheus",
        )?;
        wait_until(Duration::from_secs(30), "Prometheus never answered", || Ok(curl(&format!("http://127.0.0.1:{port}/-/ready")).ok()))?;
        Ok(PromServer { _server: server, port })
    }
}

struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    fn err(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    fn lines(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.stdout).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(cmd: &mut Command, dir: &Path, name: &str) -> Result<Running> {
    let stdout = dir.join(format!("{name}.out"));
    let stderr = dir.join(format!("{name}.err"));
    let child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout)?)
        .stderr(std::fs::File::create(&stderr)?)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    Ok(Running { child, stdout, stderr })
}

fn signal(r: &Running, sig: i32) {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(r.child.id() as i32, sig) };
}

/// The daemon for real: a Prometheus server scrapes it every second and evaluates the
/// shipped rules; the control scenario must leave every hazard alert inactive, the
/// hazard scenario must fire the rule of its severity, with the alert line on stdout.
fn daemon(bins: &Binaries, dir: &Path, tracepoint_only: bool) -> Vec<Check> {
    let mut out = Vec::new();
    let r = (|| -> Result<()> {
        let metrics_port = free_port()?;
        let config = dir.join("pinwatch.toml");
        // A syslog socket of the test's own, in place of /dev/log.
        let syslog_path = dir.join("log.sock");
        let syslog = std::os::unix::net::UnixDatagram::bind(&syslog_path)?;
        syslog.set_read_timeout(Some(Duration::from_millis(500)))?;
        let alert_section = format!("[alert]\ncollapse_window = \"30s\"\nsyslog = true\nsyslog_socket = \"{}\"\n", syslog_path.display());
        // The flight recorder triggered by the warning-severity hazard this machine can see.
        let recorder_section = "[recorder]\ntrigger_severity = \"warning\"\n";
        let incidents = dir.join("incidents");
        std::fs::write(&config, format!("{alert_section}{recorder_section}"))?;
        // systemd's side of Type=notify: a datagram socket the daemon must say READY=1 on.
        let notify_path = dir.join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut d = spawn(
            Command::new(&bins.pinwatch)
                .args(["alert", "--listen", &format!("127.0.0.1:{metrics_port}"), "--config"])
                .arg(&config)
                .arg("--incident-dir")
                .arg(&incidents)
                .env("NOTIFY_SOCKET", &notify_path),
            dir,
            "alert",
        )?;
        out.push(("host alert: sd_notify READY=1".into(), (|| {
            let mut buf = [0u8; 256];
            let n = notify.recv(&mut buf).context("no notification on NOTIFY_SOCKET within 120 s")?;
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            ensure!(msg.lines().any(|l| l == "READY=1"), "the notification was {msg:?}");
            ensure!(curl(&format!("http://127.0.0.1:{metrics_port}/metrics")).is_ok(), "READY=1 came before /metrics answered");
            Ok("READY=1 once attached and serving /metrics".to_string())
        })()));
        let up = wait_until(Duration::from_secs(120), "the daemon never served /metrics", || {
            if let Some(s) = d.child.try_wait()? {
                bail!("the daemon exited ({s}):\n{}", d.err());
            }
            Ok(curl(&format!("http://127.0.0.1:{metrics_port}/metrics")).ok())
        });
        let metrics = match up {
            Ok(m) => m,
            Err(e) => {
                out.push(("host alert daemon".into(), Err(e)));
                return Ok(());
            }
        };
        // Once started, the daemon holds no CAP_SYS_ADMIN: only the start-up scan needed it.
        out.push(("host alert: CAP_SYS_ADMIN dropped after start".into(), (|| {
            let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id()))?;
            let set = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).and_then(|h| u64::from_str_radix(h.trim(), 16).ok()).context("no capability line");
            let (eff, prm) = (set("CapEff:")?, set("CapPrm:")?);
            const SYS_ADMIN: u64 = 1 << 21;
            ensure!(eff & SYS_ADMIN == 0 && prm & SYS_ADMIN == 0, "CapEff {eff:#x} CapPrm {prm:#x} still hold CAP_SYS_ADMIN");
            ensure!(eff & (1 << 39) != 0, "CapEff {eff:#x} lost CAP_BPF too");
            Ok(format!("CapEff {eff:#x}, CapPrm {prm:#x}: no CAP_SYS_ADMIN, CAP_BPF kept"))
        })()));
        // A second daemon on the same port: refused at once, naming the port.
        out.push(("host alert: port in use".into(), (|| {
            let o = Command::new(&bins.pinwatch).args(["alert", "--listen", &format!("127.0.0.1:{metrics_port}")]).stdin(Stdio::null()).output()?;
            let t = String::from_utf8_lossy(&o.stderr);
            ensure!(o.status.code() == Some(2) && t.contains(&metrics_port.to_string()) && !t.contains("tracepoint-only mode"), "exit {:?}:\n{t}", o.status.code());
            Ok("a second daemon on the same port exits 2 naming it, before attaching".to_string())
        })()));
        ensure!(metrics.contains("pinwatch_build_info{") && metrics.ends_with("# EOF\n"), "the scrape is not OpenMetrics with pinwatch_build_info:\n{metrics}");

        let prom = PromServer::start(dir, metrics_port)?;
        let prom_port = prom.port;
        // Prometheus scraped the daemon (up == 1) and loaded the rules.
        wait_until(Duration::from_secs(60), "Prometheus never scraped the daemon", || Ok((prometheus_sum(prom_port, "up{job=\"pinwatch\"}")? == 1.0).then_some(())))?;
        let hazard_alerts = |state: &str| -> Result<Vec<(String, String, String)>> {
            Ok(prometheus_alerts(prom_port)?.into_iter().filter(|a| a.0.starts_with("PinwatchCritical") || a.0 == "PinwatchHazard").filter(|a| state.is_empty() || a.2 == state).collect())
        };

        // The control: a memfd the kernel never pinned, truncated.
        let scen = |extra: &[&str]| Command::new(&bins.scenario).args(["memfd-truncate", "--pages", "8"]).args(extra).stdin(Stdio::null()).output();
        let c = scen(&["--no-pin"])?;
        out.push(("host alert + Prometheus: control stays silent".into(), (|| {
            ensure!(c.status.success(), "the control scenario failed: {}", String::from_utf8_lossy(&c.stderr));
            // Five scrapes and evaluations after the control.
            std::thread::sleep(Duration::from_secs(5));
            let a = hazard_alerts("")?;
            ensure!(a.is_empty(), "hazard alerts after the control: {a:?}");
            let lines = d.lines();
            ensure!(lines.is_empty(), "alert lines after the control: {lines:?}");
            ensure!(std::fs::read_dir(&incidents).map(|d| d.count()).unwrap_or(0) == 0, "an incident bundle after the control");
            let n = prometheus_sum(prom_port, "sum(pinwatch_hazards_total)")?;
            ensure!(n == 0.0, "Prometheus holds {n} hazards after the control");
            Ok("no alert line, pinwatch_hazards_total 0, no hazard alert pending or firing after 5 evaluations".to_string())
        })()));

        // The hazard: a memfd long-term pinned by io_uring, truncated.
        let h = scen(&[])?;
        let (sev, rule) = if tracepoint_only { ("warning", "PinwatchHazard") } else { ("critical", "PinwatchCriticalHazard") };
        out.push((format!("host alert + Prometheus: hazard fires {rule}"), (|| {
            ensure!(h.status.success(), "the hazard scenario failed: {}", String::from_utf8_lossy(&h.stderr));
            let firing = wait_until(Duration::from_secs(60), &format!("{rule} never fired"), || {
                Ok(hazard_alerts("firing")?.into_iter().find(|a| a.0 == rule && a.1 == "truncate_while_pinned"))
            })?;
            let lines: Vec<Value> = d.lines().into_iter().filter(|l| l["event"] == "hazard").collect();
            let first = lines.first().context("no alert line on the daemon's stdout")?;
            ensure!(first["event"] == "hazard" && first["kind"] == "truncate_while_pinned" && first["severity"] == sev, "the alert line: {first}");
            ensure!(first["time"].as_str().is_some_and(|t| t.len() >= 20 && t.ends_with('Z')) && first["host"].as_str().is_some_and(|h| !h.is_empty()), "no RFC 3339 time or host: {first}");
            let n = wait_until(Duration::from_secs(10), "Prometheus never held the 8 hazards", || {
                let n = prometheus_sum(prom_port, &format!("sum(pinwatch_hazards_total{{kind=\"truncate_while_pinned\",severity=\"{sev}\"}})"))?;
                Ok((n >= 8.0).then_some(n))
            })?;
            // 8 pages truncated, one file: one line, the 7 repeats waiting for their window.
            ensure!(lines.len() == 1, "{} alert lines for one file's truncate, wanted 1 (repeats collapsed): {lines:?}", lines.len());
            // The same line to syslog: RFC 5424, facility daemon (3), severity mapped.
            let pri = if sev == "critical" { "<26>1 " } else { "<28>1 " };
            let mut buf = vec![0u8; 65536];
            let got = syslog.recv(&mut buf).context("no syslog datagram")?;
            let msg = String::from_utf8_lossy(&buf[..got]).into_owned();
            ensure!(msg.starts_with(pri) && msg.contains(" pinwatch ") && msg.contains("\"kind\":\"truncate_while_pinned\""), "the syslog message is not RFC 5424 from daemon.{sev} with the alert line: {msg}");
            Ok(format!("{} {} ({sev}) firing in Prometheus, pinwatch_hazards_total {n}, 1 alert line (7 repeats collapsed), the same to syslog (RFC 5424, {})", firing.0, firing.1, pri.trim()))
        })()));

        // The flight recorder: the hazard wrote a bundle (2 s after it, with what
        // followed), SIGUSR1 writes another; each is private and replays.
        out.push(("host alert: flight recorder".into(), (|| {
            let bundle_of = |trigger: &str| -> Result<Option<PathBuf>> {
                Ok(d.lines().into_iter().find(|l| l["event"] == "incident" && l["trigger"] == trigger).map(|l| {
                    ensure!(l["result"] == "written", "the bundle was not written: {l}");
                    Ok(PathBuf::from(l["dir"].as_str().unwrap_or("")))
                }).transpose()?)
            };
            let hazard_bundle = wait_until(Duration::from_secs(15), "no incident line for the hazard", || bundle_of("truncate_while_pinned"))?;
            signal(&d, libc::SIGUSR1);
            let usr1_bundle = wait_until(Duration::from_secs(15), "no incident line after SIGUSR1", || bundle_of("sigusr1"))?;
            use std::os::unix::fs::PermissionsExt as _;
            for b in [&hazard_bundle, &usr1_bundle] {
                ensure!(b.starts_with(&incidents), "{} is not under --incident-dir", b.display());
                let mode = std::fs::metadata(b)?.permissions().mode() & 0o777;
                ensure!(mode == 0o700, "{} has mode {mode:o}, not 700", b.display());
                for f in std::fs::read_dir(b)?.flatten() {
                    let mode = f.metadata()?.permissions().mode() & 0o777;
                    ensure!(mode == 0o600, "{} has mode {mode:o}, not 600", f.path().display());
                }
            }
            for f in ["trace.jsonl", "hazard.json", "doctor.json", "kernel.txt"] {
                ensure!(hazard_bundle.join(f).is_file(), "the hazard's bundle has no {f}");
            }
            ensure!(std::fs::read_dir(&hazard_bundle)?.flatten().any(|f| f.file_name().to_string_lossy().starts_with("actor-")), "the hazard's bundle has no /proc files of the actor");
            let r = Command::new(&bins.pinwatch).arg("report").arg(&hazard_bundle).output()?;
            let t = String::from_utf8_lossy(&r.stdout).into_owned() + &String::from_utf8_lossy(&r.stderr);
            ensure!(r.status.success() && t.contains("8 hazard(s)"), "pinwatch report on the bundle: exit {:?}:\n{t}", r.status.code());
            let m = curl(&format!("http://127.0.0.1:{metrics_port}/metrics"))?;
            for want in ["pinwatch_incidents_total{trigger=\"truncate_while_pinned\",result=\"written\"} 1", "pinwatch_incidents_total{trigger=\"sigusr1\",result=\"written\"} 1"] {
                ensure!(m.lines().any(|l| l == want), "no {want:?} in the scrape");
            }
            Ok("the hazard wrote a bundle (trace, hazard, doctor, kernel, the actor's /proc), SIGUSR1 another; 0700 and 0600; `pinwatch report BUNDLE` replays its 8 hazards; both counted".to_string())
        })()));

        // `pinwatch selftest` against the running daemon: its own memfd, truncated while
        // pinned, must reach the metric and an alert line.
        out.push(("host pinwatch selftest".into(), (|| {
            let o = Command::new(&bins.pinwatch).args(["selftest", "--daemon", &format!("127.0.0.1:{metrics_port}")]).stdin(Stdio::null()).output()?;
            let t = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
            ensure!(o.status.success() && t.contains("selftest: passed"), "exit {:?}:\n{t}", o.status.code());
            let said = if t.contains("not checked here") { "passed; says the pinner cannot be checked in tracepoint-only mode" } else { "passed; the alert names the selftest as the pinner" };
            // And a selftest against no daemon is an error, not a pass.
            let none = Command::new(&bins.pinwatch).args(["selftest", "--daemon", &format!("127.0.0.1:{}", free_port()?)]).stdin(Stdio::null()).output()?;
            ensure!(none.status.code() == Some(2), "a selftest with no daemon exited {:?}", none.status.code());
            Ok(format!("metric and alert line seen; {said}; with no daemon: exit 2"))
        })()));

        // SIGHUP: an invalid file keeps the rules; a valid one is taken.
        out.push(("host alert: SIGHUP reload".into(), (|| {
            std::fs::write(&config, "[alert]\ncollapse_window = \"nan\"\n")?;
            signal(&d, libc::SIGHUP);
            wait_until(Duration::from_secs(10), "no word of the invalid configuration", || Ok(d.err().contains("the rules in force stay as they were").then_some(())))?;
            ensure!(d.child.try_wait()?.is_none(), "the daemon ended on an invalid configuration:\n{}", d.err());
            ensure!(d.err().contains("line 2, key `alert.collapse_window`"), "the refusal does not name the line and key:\n{}", d.err());
            std::fs::write(&config, format!("{alert_section}min_severity = \"critical\"\n{recorder_section}"))?;
            signal(&d, libc::SIGHUP);
            wait_until(Duration::from_secs(10), "the valid configuration was never taken", || Ok(d.err().contains("severity critical and above").then_some(())))?;
            let m = curl(&format!("http://127.0.0.1:{metrics_port}/metrics"))?;
            for want in ["pinwatch_config_reloads_total{result=\"invalid\"} 1", "pinwatch_config_reloads_total{result=\"ok\"} 1"] {
                ensure!(m.lines().any(|l| l == want), "no {want:?} in the scrape");
            }
            Ok("an invalid file is refused naming line and key and the daemon keeps running; a valid one is taken; both counted".to_string())
        })()));

        // SIGTERM: the repeats pending are said, then a clean exit.
        out.push(("host alert: SIGTERM".into(), (|| {
            signal(&d, libc::SIGTERM);
            let status = wait_until(Duration::from_secs(20), "the daemon did not end on SIGTERM", || Ok(d.child.try_wait()?))?;
            ensure!(status.success(), "exit {status} on SIGTERM:\n{}", d.err());
            let lines = d.lines();
            let summaries: Vec<&Value> = lines.iter().filter(|l| l.get("collapsed").is_some()).collect();
            ensure!(summaries.iter().any(|s| s["collapsed"]["repeats"] == 7), "no summary of the scenario's 7 collapsed repeats at the end: {summaries:?}");
            let mut tail = String::new();
            std::fs::File::open(&d.stderr)?.read_to_string(&mut tail)?;
            ensure!(tail.contains("stopped by signal 15"), "no last word:\n{tail}");
            Ok("exit 0; the 7 collapsed repeats said in a summary line before the exit".to_string())
        })()));
        Ok(())
    })();
    if let Err(e) = r {
        out.push(("host alert daemon".into(), Err(e)));
    }
    out
}

/// The daemon in a lab guest, scraped from this machine: QEMU's user network forwards
/// 127.0.0.1:`metrics_port` here to the daemon's 10.0.2.15:9464 in the guest (it listens
/// there because the plan says so; its default is loopback). A Prometheus server runs
/// here for the whole boot; a thread follows the guest's marks on the results port and
/// asks Prometheus what it holds after the control and after the hazard.
pub struct LabPrometheus {
    server: PromServer,
    port: u16,
    pub metrics_port: u16,
    dir: PathBuf,
}

/// The guest's part: network up, the daemon on the guest's address, the 2018 sequence's
/// control, then the sequence itself, each followed by a mark the host waits for.
pub const LAB_PLAN: &str = r#"
say BEGIN alert
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || say MARK alert no-network
pinwatch alert --listen 10.0.2.15:9464 > /tmp/alert.out 2> /tmp/alert.err &
AL=$!
i=0; while ! grep -q 'pinwatch alert: watching' /tmp/alert.err && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
say MARK alert ready
pinwatch-scenario odirect-hazard --file /mnt/alertctl --dev /dev/nullb0 --pages 8 --no-pin > /tmp/alertscen.out
sleep 2
say MARK alert control
sleep 15
pinwatch-scenario odirect-hazard --file /mnt/alerthz --dev /dev/nullb0 --pages 8 >> /tmp/alertscen.out
sleep 2
say MARK alert hazard
sleep 30
kill -TERM $AL
wait $AL
RC=$?
# The flight recorder's bundle of the critical hazards, read back as a trace.
echo "PINWATCH-BUNDLE count $(ls -d /var/lib/pinwatch/incidents/*/ 2>/dev/null | wc -l)" >> /tmp/alertscen.out
for b in /var/lib/pinwatch/incidents/*/; do
  echo "PINWATCH-BUNDLE pinner $(grep -o '"pid": *[0-9]*' "$b/hazard.json" | head -1 | tr -dc 0-9)" >> /tmp/alertscen.out
  pinwatch report "$b" > /tmp/bundle.txt 2>&1
  echo "PINWATCH-BUNDLE report-rc $? $(grep -o '[0-9]* hazard(s)' /tmp/bundle.txt | head -1)" >> /tmp/alertscen.out
  echo "PINWATCH-BUNDLE modes $(stat -c '%a' "$b" "$b"/* | sort -u | tr '\n' ' ')" >> /tmp/alertscen.out
done
# The daemon's stdout is its alert lines alone; what the scenarios said goes with stderr.
cat /tmp/alertscen.out >> /tmp/alert.err
send_back alert $RC /tmp/alert.out /tmp/alert.err
"#;

impl LabPrometheus {
    pub fn start(work: &Path) -> Result<LabPrometheus> {
        let dir = work.join("prometheus");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let metrics_port = free_port()?;
        let server = PromServer::start(&dir, metrics_port)?;
        Ok(LabPrometheus { port: server.port, server, metrics_port, dir })
    }

    /// Follows the guest's marks in `results` (the results port's file) until the boot
    /// ends (`done` set); returns the checks of what Prometheus held at each mark.
    pub fn watch(&self, results: &Path, done: &std::sync::atomic::AtomicBool) -> Vec<Check> {
        use std::sync::atomic::Ordering;
        let mut out = Vec::new();
        let (mut control, mut hazard) = (false, false);
        while !(control && hazard) && !done.load(Ordering::Relaxed) {
            let text = std::fs::read_to_string(results).unwrap_or_default();
            if !control && text.contains("PINWATCH-LAB MARK alert control") {
                control = true;
                out.push(("alert + Prometheus: control stays silent".to_string(), self.after_control()));
            }
            if !hazard && text.contains("PINWATCH-LAB MARK alert hazard") {
                hazard = true;
                out.push(("alert + Prometheus: hazard fires PinwatchCriticalHazard".to_string(), self.after_hazard()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if !control || !hazard {
            out.push(("alert + Prometheus".to_string(), Err(anyhow::anyhow!("the guest never reached the daemon's {} mark", if control { "hazard" } else { "control" }))));
        }
        out
    }

    fn hazard_alerts(&self) -> Result<Vec<(String, String, String)>> {
        Ok(prometheus_alerts(self.port)?.into_iter().filter(|a| a.0 == "PinwatchCriticalHazard" || a.0 == "PinwatchHazard").collect())
    }

    fn after_control(&self) -> Result<String> {
        // Scraped for real, or silence proves nothing.
        wait_until(Duration::from_secs(10), "Prometheus never scraped the daemon in the guest (up == 1)", || Ok((prometheus_sum(self.port, "up{job=\"pinwatch\"}")? == 1.0).then_some(())))?;
        std::thread::sleep(Duration::from_secs(6));
        let a = self.hazard_alerts()?;
        ensure!(a.is_empty(), "hazard alerts after the control: {a:?}");
        let n = prometheus_sum(self.port, "sum(pinwatch_hazards_total)")?;
        ensure!(n == 0.0, "Prometheus holds {n} hazards after the control");
        Ok("scraped through QEMU's forwarded port (up 1); pinwatch_hazards_total 0 and no hazard alert 6 evaluations after the control".into())
    }

    fn after_hazard(&self) -> Result<String> {
        let firing = wait_until(Duration::from_secs(25), "PinwatchCriticalHazard never fired", || {
            let f: Vec<String> = self.hazard_alerts()?.into_iter().filter(|a| a.0 == "PinwatchCriticalHazard" && a.2 == "firing").map(|a| a.1).collect();
            Ok((!f.is_empty()).then_some(f))
        })?;
        let n = prometheus_sum(self.port, "sum(pinwatch_hazards_total{severity=\"critical\"})")?;
        ensure!(n >= 1.0, "PinwatchCriticalHazard fired, yet Prometheus holds {n} critical hazards");
        Ok(format!("firing for {} (Prometheus's own API); {n} critical hazard(s) scraped", firing.join(", ")))
    }

    /// Where Prometheus's log is, for a failure.
    pub fn log(&self) -> PathBuf {
        self.dir.join("prometheus.err")
    }

    pub fn stop(self) {
        drop(self.server);
    }
}

/// The daemon's own lines in the guest: alerts only for the hazard scenario's pinner,
/// none for the control's; a clean exit on SIGTERM.
pub fn check_lab_alert(r: &crate::lab::Recorded) -> Result<String> {
    ensure!(r.ended, "the guest never finished the daemon's run");
    ensure!(r.rc == Some(0), "the daemon exited {:?}:\n{}", r.rc, r.err.join("\n"));
    let scenarios: Vec<Value> = r.err.iter().filter_map(|l| l.strip_prefix("PINWATCH-SCENARIO ")).filter_map(|l| serde_json::from_str(l).ok()).collect();
    ensure!(scenarios.len() == 2, "the control and the hazard scenario did not both report: {:?}", r.err);
    let (control, hazard) = (scenarios[0]["pid"].as_u64(), scenarios[1]["pid"].as_u64());
    let alerts: Vec<Value> = r.out.iter().map(|l| serde_json::from_str(l).with_context(|| format!("an alert line that is not JSON: {l}"))).collect::<Result<_>>()?;
    let pids = |a: &Value| -> Vec<Option<u64>> {
        match &a["pinner"] {
            Value::Array(v) => v.iter().map(|p| p["pid"].as_u64()).collect(),
            p => vec![p["pid"].as_u64()],
        }
    };
    ensure!(!alerts.iter().any(|a| pids(a).contains(&control)), "alert lines name the control's pid {control:?}");
    let critical: Vec<&Value> = alerts.iter().filter(|a| a["severity"] == "critical" && pids(a).contains(&hazard)).collect();
    let kinds_of = alerts.iter().filter(|a| a["event"] == "hazard");
    ensure!(!critical.is_empty(), "no critical alert line for the hazard scenario's pid {hazard:?}: {alerts:?}");
    ensure!(alerts.iter().all(|a| a["time"].is_string() && a["host"].is_string() && (a["event"] == "hazard" || a["event"] == "incident")), "an alert line without time, host or event");
    let mut kinds: Vec<&str> = kinds_of.filter_map(|a| a["kind"].as_str()).collect();
    kinds.sort();
    kinds.dedup();
    ensure!(r.err.iter().any(|l| l.contains("stopped by signal 15")), "no clean stop on SIGTERM:\n{}", r.err.join("\n"));
    // The flight recorder: one bundle (the later critical hazards fall in its
    // min_interval), announced, private, and replayed by `pinwatch report`.
    let incidents: Vec<&Value> = alerts.iter().filter(|a| a["event"] == "incident").collect();
    ensure!(incidents.len() == 1 && incidents[0]["result"] == "written", "incident lines: {incidents:?}");
    let bundle: Vec<&str> = r.err.iter().filter_map(|l| l.strip_prefix("PINWATCH-BUNDLE ")).collect();
    ensure!(bundle.contains(&"count 1"), "not one bundle on disk: {bundle:?}");
    let pinner = bundle.iter().find_map(|l| l.strip_prefix("pinner ")).and_then(|p| p.parse::<u64>().ok());
    ensure!(pinner == hazard, "the bundle's hazard names pinner {pinner:?}, not the hazard scenario's {hazard:?} (the control's is {control:?})");
    let report = bundle.iter().find_map(|l| l.strip_prefix("report-rc ")).context("no bundle was read back")?;
    ensure!(report.starts_with("0 ") && !report.contains(" 0 hazard"), "pinwatch report on the bundle: {report}");
    let modes = bundle.iter().find_map(|l| l.strip_prefix("modes ")).unwrap_or("");
    ensure!(modes.split_whitespace().collect::<Vec<_>>() == ["600", "700"], "the bundle's modes are {modes:?}, not 700 and 600");
    Ok(format!(
        "{} alert line(s) ({}) for the hazard's pinner, none for the control's; one incident bundle ({}, of the hazard's pinner, none for the control; replayed by report: {}); exit 0 on SIGTERM",
        alerts.len(),
        kinds.join(", "),
        incidents[0]["trigger"].as_str().unwrap_or("?"),
        report.trim_start_matches("0 ")
    ))
}

/// Enforcement in a lab guest: a daemon with a 4 MiB per-process cap on long-term pins.
/// `kill`: a process registering 8 MiB as io_uring buffers (eight GUP calls of 1 MiB) is
/// killed at the call that goes over, and its pins come back; a control at 2 MiB runs
/// to its end. Reloaded (SIGHUP) to `stop`: the same process is stopped. Reloaded to
/// `freeze`: its cgroup is frozen.
pub const ENFORCE_PLAN: &str = r#"
say BEGIN enforce
ip link set lo up
mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
E=/tmp/enfscen.out
printf '[limits]\nmax_longterm_process = "4MiB"\nmemlock = false\n[actions]\nmax_longterm_process = "kill"\n[selftest]\nat_start = true\n' > /tmp/enforce.toml
# Pins older than the daemon count against its cap: 3 MiB registered before it starts
# (found by its start-up scan), then 2 MiB more once it runs; the call that takes the
# holder past 4 MiB is killed, though the daemon saw only 2 MiB being taken.
rm -f /tmp/enf.go
pinwatch-scenario iouring-fixed --pages 768 --buffers 3 --no-huge --memlock 67108864 --as-nobody --until /tmp/enf.go --then-pages 512 --hold-ms 3000 > /tmp/enf_found.out 2>&1 &
FH=$!
i=0; while ! grep -q READY /tmp/enf_found.out && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
pinwatch alert --config /tmp/enforce.toml --listen 127.0.0.1:9465 > /tmp/enf.out 2> /tmp/enf.err &
EN=$!
i=0; while ! grep -q 'selftest: passed\|selftest: FAILED\|could not run' /tmp/enf.err && [ $i -lt 1800 ]; do sleep 0.1; i=$((i+1)); done
sleep 2
touch /tmp/enf.go
wait $FH
echo "PINWATCH-ENFORCE found-rc $?" >> $E
cat /tmp/enf_found.out >> $E
pinwatch-scenario iouring-fixed --pages 2048 --buffers 8 --no-huge --hold-ms 3000 >> $E 2>&1
echo "PINWATCH-ENFORCE kill-rc $?" >> $E
pinwatch-scenario iouring-fixed --pages 512 --buffers 2 --no-huge --hold-ms 1000 >> $E 2>&1
echo "PINWATCH-ENFORCE control-rc $?" >> $E
sleep 3
wget -q -O - http://127.0.0.1:9465/metrics | grep -E '^pinwatch_(enforcements_total|pinned_bytes)' | sed 's/^/PINWATCH-ENFORCE metric /' >> $E
sed -i 's/"kill"/"stop"/' /tmp/enforce.toml
kill -HUP $EN
i=0; while [ "$(grep -c 'configuration reloaded' /tmp/enf.err)" -lt 1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
pinwatch-scenario iouring-fixed --pages 2048 --buffers 8 --no-huge --hold-ms 3000 >> $E 2>&1 &
P=$!
sleep 3
echo "PINWATCH-ENFORCE stop-state $(cut -d' ' -f3 /proc/$P/stat)" >> $E
kill -KILL $P
wait $P
sed -i 's/"stop"/"freeze"/' /tmp/enforce.toml
kill -HUP $EN
i=0; while [ "$(grep -c 'configuration reloaded' /tmp/enf.err)" -lt 2 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /sys/fs/cgroup/victim
sh -c 'echo $$ > /sys/fs/cgroup/victim/cgroup.procs; exec pinwatch-scenario iouring-fixed --pages 2048 --buffers 8 --no-huge --hold-ms 4000' >> $E 2>&1 &
P=$!
i=0; while ! grep -q 'frozen 1' /sys/fs/cgroup/victim/cgroup.events && [ $i -lt 150 ]; do sleep 0.1; i=$((i+1)); done
echo "PINWATCH-ENFORCE freeze-events $(grep frozen /sys/fs/cgroup/victim/cgroup.events)" >> $E
echo 0 > /sys/fs/cgroup/victim/cgroup.freeze
wait $P
echo "PINWATCH-ENFORCE freeze-rc $?" >> $E
kill -TERM $EN
wait $EN
RC=$?
cat $E >> /tmp/enf.err
send_back enforce $RC /tmp/enf.out /tmp/enf.err
"#;

/// What the enforcement run must show, from the guest's marks and the daemon's lines.
pub fn check_lab_enforce(r: &crate::lab::Recorded) -> Result<String> {
    ensure!(r.ended, "the guest never finished the enforcement run");
    ensure!(r.rc == Some(0), "the daemon exited {:?}:\n{}", r.rc, r.err.join("\n"));
    let mark = |k: &str| -> Vec<String> { r.err.iter().filter_map(|l| l.strip_prefix("PINWATCH-ENFORCE ")?.strip_prefix(k).map(|v| v.trim().to_string())).collect() };
    let pids: Vec<u64> = r.err.iter().filter_map(|l| l.strip_prefix("PINWATCH-SCENARIO ")).filter_map(|l| serde_json::from_str::<Value>(l).ok()?["pid"].as_u64()).collect();
    ensure!(pids.len() == 5, "not every scenario of the run reported its pid: {:?}", r.err);
    let (holder, killed, control, stopped) = (pids[0], pids[1], pids[2], pids[3]);
    let lines: Vec<Value> = r.out.iter().map(|l| serde_json::from_str(l).with_context(|| format!("an alert line that is not JSON: {l}"))).collect::<Result<_>>()?;
    let enforced = |action: &str, pid: u64| lines.iter().any(|l| l["event"] == "enforcement" && l["action"] == action && l["result"] == "sent" && l["pid"] == pid);
    // the selftest the configuration asked for at start
    ensure!(r.err.iter().any(|l| l.contains("pinwatch alert: selftest: passed")), "the selftest at start did not pass:\n{}", r.err.iter().filter(|l| l.contains("selftest")).cloned().collect::<Vec<_>>().join("\n"));
    ensure!(r.err.iter().any(|l| l.contains("the alert names this selftest")), "the selftest did not check its pinner here");
    // pins found at start count against the cap
    let found = r.err.iter().find(|l| l.contains("start-up scan:")).context("the daemon never said what its start-up scan found")?;
    ensure!(found.contains("768 page(s) pinned before pinwatch started"), "the start-up scan did not find the holder's 3 MiB: {found}");
    ensure!(mark("found-rc") == ["137"], "the holder of 3 MiB found at start, registering 2 MiB more, was not killed: exit {:?}", mark("found-rc"));
    ensure!(enforced("kill", holder), "no `kill` enforcement line (result sent) for the holder {holder}: {lines:?}");
    ensure!(!r.err.iter().any(|l| l.starts_with("PINWATCH-SCENARIO-MORE")), "the holder's second registration returned before the kill took it");
    // kill
    ensure!(mark("kill-rc") == ["137"], "the 8 MiB process was not killed: exit {:?}", mark("kill-rc"));
    ensure!(enforced("kill", killed), "no `kill` enforcement line (result sent) for pid {killed}: {lines:?}");
    ensure!(mark("control-rc") == ["0"], "the 2 MiB control did not run to its end: exit {:?}", mark("control-rc"));
    ensure!(!lines.iter().any(|l| l["event"] == "enforcement" && l["pid"] == control), "an enforcement line names the control {control}");
    let metrics = mark("metric");
    // Every call past the cap is signalled: the holder's second (its last), and the
    // fifth to the eighth of the 8 MiB process, as the registration goes on while the
    // signal waits for the return to user space.
    let kills = metrics.iter().find_map(|m| m.strip_prefix(r#"pinwatch_enforcements_total{action="kill",result="sent"} "#)?.parse::<u64>().ok()).unwrap_or(0);
    ensure!((2..=5).contains(&kills), "the metric counts {kills} kills, wanted 2 to 5 (the holder's call past the cap, then 1 to 4 calls of the 8 MiB process): {metrics:?}");
    ensure!(metrics.iter().any(|m| m == r#"pinwatch_pinned_bytes{kind="pin",longterm="true"} 0"#), "the killed process's pins did not come back: {metrics:?}");
    // stop
    ensure!(mark("stop-state") == ["T"], "the 8 MiB process under `stop` is in state {:?}, not T (stopped)", mark("stop-state"));
    ensure!(enforced("stop", stopped), "no `stop` enforcement line (result sent) for pid {stopped}: {lines:?}");
    // freeze
    ensure!(mark("freeze-events") == ["frozen 1"], "the offender's cgroup was not frozen: {:?}", mark("freeze-events"));
    ensure!(lines.iter().any(|l| l["event"] == "enforcement" && l["action"] == "freeze" && l["result"] == "frozen" && l["cgroup"] == "/victim"), "no `freeze` line for /victim: {lines:?}");
    ensure!(mark("freeze-rc") == ["0"], "the frozen process did not finish once thawed: exit {:?}", mark("freeze-rc"));
    Ok(format!("selftest at start passed (metric, alert line naming it); found: pid {holder} (3 MiB pinned before the daemon started) killed at 2 MiB more; kill: pid {killed} killed at the call past 4 MiB ({kills} call(s) signalled), pins back to 0; control {control} at 2 MiB ran to its end; stop: pid {stopped} in state T; freeze: /victim frozen, then thawed and finished"))
}
