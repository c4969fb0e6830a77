//! The daemon's configuration file (TOML): everything `pinwatch alert`'s options say, and
//! what only a file says (which kinds alert, exemptions, the collapse window, how many
//! cgroups the metrics name). Parsed strictly: an unknown key, a bad value, a bad size
//! or duration is an error naming the file, the line and the key.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Deserializer};

use crate::trace::{HazardKind, LimitRules, Severity};

/// The metrics port when neither `--listen` nor the file names one: ebpf_exporter has
/// 9435, node_exporter 9100; 9464 is free in Prometheus's list of default ports.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9464";

#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub alert: AlertConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub exempt: Exempt,
    #[serde(default)]
    pub actions: Actions,
    #[serde(default)]
    pub selftest: SelftestConfig,
    #[serde(default)]
    pub recorder: RecorderConfig,
}

/// The flight recorder: the last events, written as an incident bundle on a trigger.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecorderConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How far back a bundle's trace reaches.
    #[serde(default = "sixty_seconds", deserialize_with = "duration")]
    pub window: Duration,
    /// The most the window holds, in bytes of trace lines (the daemon's memory for it).
    #[serde(default = "four_mib", deserialize_with = "size")]
    pub max_size: u64,
    #[serde(default = "incident_dir")]
    pub incident_dir: std::path::PathBuf,
    /// A hazard of this severity or worse writes a bundle...
    #[serde(default = "critical")]
    pub trigger_severity: Severity,
    /// ...if its kind is in this list (all kinds when absent).
    pub trigger_kinds: Option<Vec<HazardKind>>,
    /// No hazard-triggered bundle sooner than this after the last (SIGUSR1 always).
    #[serde(default = "sixty_seconds", deserialize_with = "duration")]
    pub min_interval: Duration,
    /// Bundles kept, and the bytes they may take in all; the oldest go first.
    #[serde(default = "twenty", deserialize_with = "max_bundles")]
    pub max_bundles: usize,
    #[serde(default = "sixty_four_mib", deserialize_with = "size")]
    pub max_total_size: u64,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            enabled: true,
            window: sixty_seconds(),
            max_size: four_mib(),
            incident_dir: incident_dir(),
            trigger_severity: Severity::Critical,
            trigger_kinds: None,
            min_interval: sixty_seconds(),
            max_bundles: twenty(),
            max_total_size: sixty_four_mib(),
        }
    }
}

impl RecorderConfig {
    pub fn triggers_on(&self, kind: HazardKind, severity: Severity) -> bool {
        self.enabled && severity >= self.trigger_severity && self.trigger_kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }
}

fn four_mib() -> u64 {
    4 << 20
}
fn sixty_four_mib() -> u64 {
    64 << 20
}
fn twenty() -> usize {
    20
}
fn critical() -> Severity {
    Severity::Critical
}
/// Where bundles go by default (the unit's StateDirectory).
pub const DEFAULT_INCIDENT_DIR: &str = "/var/lib/pinwatch/incidents";
fn incident_dir() -> std::path::PathBuf {
    DEFAULT_INCIDENT_DIR.into()
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    opt_bytes(d).map(|b| b.unwrap_or(0))
}

fn max_bundles<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    if (1..=10_000).contains(&n) {
        Ok(n as usize)
    } else {
        Err(serde::de::Error::custom(format!("{n}: between 1 and 10000 bundles")))
    }
}

/// `pinwatch selftest` run by the daemon once it is up.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct SelftestConfig {
    #[serde(default)]
    pub at_start: bool,
}

/// What happens when a limit rule is broken. Nothing is enforced unless asked.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// An alert and a count, nothing more.
    #[default]
    Report,
    /// SIGSTOP from the kernel, at the GUP call that went over the cap.
    Stop,
    /// SIGKILL from the kernel, at the GUP call that went over the cap.
    Kill,
    /// cgroup v2 freeze of the offender's cgroup (cgroup.freeze), at the next tick.
    Freeze,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Report => "report",
            Action::Stop => "stop",
            Action::Kill => "kill",
            Action::Freeze => "freeze",
        }
    }

    /// The signal the kernel side sends, for the actions it takes.
    pub fn signal(self) -> Option<i32> {
        match self {
            Action::Stop => Some(libc::SIGSTOP),
            Action::Kill => Some(libc::SIGKILL),
            _ => None,
        }
    }
}

/// The action of each limit rule. stop and kill happen in the kernel, in the GUP return
/// program, which counts long-term pages per process only: they are for
/// max_longterm_process. freeze acts on a cgroup: for per-process rules (the process's
/// cgroup) and per-cgroup caps.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Actions {
    #[serde(default, deserialize_with = "memlock_action")]
    pub memlock: Action,
    #[serde(default)]
    pub max_longterm_process: Action,
    #[serde(default, deserialize_with = "cgroup_action")]
    pub max_longterm_cgroup: Action,
    #[serde(default, deserialize_with = "user_action")]
    pub max_longterm_user: Action,
    #[serde(default, deserialize_with = "pin_age_action")]
    pub max_pin_age: Action,
}

impl Actions {
    /// The action of a broken rule, by the names a breach carries (trace::LimitBreach).
    pub fn of(&self, rule: &str, scope: &str) -> Action {
        match (rule, scope) {
            ("rlimit_memlock", _) => self.memlock,
            ("max_longterm_bytes", "process") => self.max_longterm_process,
            ("max_longterm_bytes", "cgroup") => self.max_longterm_cgroup,
            ("max_longterm_bytes", "user") => self.max_longterm_user,
            ("max_pin_age_ns", _) => self.max_pin_age,
            _ => Action::Report,
        }
    }
}

impl Action {
    /// Whether limit rule `rule` (its key in [actions]) can take this action, and why
    /// not. The one place that says so, for the configuration and for --enforce alike.
    pub fn fits(self, rule: &str) -> Result<(), String> {
        match (self, rule) {
            (Action::Report, _) | (Action::Stop | Action::Kill, "max_longterm_process") => Ok(()),
            (Action::Freeze, "memlock" | "max_longterm_process" | "max_longterm_cgroup") => Ok(()),
            (Action::Stop | Action::Kill, "memlock" | "max_longterm_cgroup") => Err(format!(
                "{}: stop and kill act in the kernel at the pinning call, which counts long-term pins per process: use them on max_longterm_process (here: report or freeze)",
                self.name()
            )),
            _ => Err(format!("{}: this rule only reports (a user's processes span cgroups; an old pin has no call to stop)", self.name())),
        }
    }
}

/// An action, refused where its rule cannot take it.
fn action_for<'de, D: Deserializer<'de>>(d: D, rule: &str) -> Result<Action, D::Error> {
    let a = Action::deserialize(d)?;
    a.fits(rule).map(|()| a).map_err(serde::de::Error::custom)
}
fn memlock_action<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
    action_for(d, "memlock")
}
fn cgroup_action<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
    action_for(d, "max_longterm_cgroup")
}
fn user_action<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
    action_for(d, "max_longterm_user")
}
fn pin_age_action<'de, D: Deserializer<'de>>(d: D) -> Result<Action, D::Error> {
    action_for(d, "max_pin_age")
}

/// Which hazards become alert lines, and how repeats are collapsed.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Kinds that alert; all when absent.
    pub kinds: Option<Vec<HazardKind>>,
    /// The least severity that alerts.
    #[serde(default = "info")]
    pub min_severity: Severity,
    /// One line per (kind, pinner, file) per window; repeats are counted in a summary.
    #[serde(default = "sixty_seconds", deserialize_with = "duration")]
    pub collapse_window: Duration,
    /// Alert lines on stdout (journald keeps them under systemd).
    #[serde(default = "yes")]
    pub stdout: bool,
    /// The same lines to the local syslog too, RFC 5424, facility daemon, severity
    /// mapped (critical: crit, warning: warning, info: info).
    #[serde(default)]
    pub syslog: bool,
    /// The local syslog socket.
    #[serde(default = "dev_log")]
    pub syslog_socket: std::path::PathBuf,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig { kinds: None, min_severity: Severity::Info, collapse_window: sixty_seconds(), stdout: true, syslog: false, syslog_socket: dev_log() }
    }
}

fn dev_log() -> std::path::PathBuf {
    "/dev/log".into()
}

impl AlertConfig {
    pub fn alerts_on(&self, kind: HazardKind, severity: Severity) -> bool {
        severity >= self.min_severity && self.kinds.as_ref().is_none_or(|k| k.contains(&kind))
    }
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// ADDR:PORT of /metrics; loopback unless told otherwise.
    pub listen: Option<SocketAddr>,
    /// Cgroups named in pinwatch_cgroup_pinned_bytes: the N holding most.
    #[serde(default = "ten", deserialize_with = "top_cgroups")]
    pub top_cgroups: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: None, top_cgroups: ten() }
    }
}

/// The limit rules, as `top` and `record` take them as options.
#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default, deserialize_with = "opt_duration")]
    pub max_pin_age: Option<Duration>,
    #[serde(default, deserialize_with = "opt_bytes")]
    pub max_longterm_process: Option<u64>,
    #[serde(default, deserialize_with = "opt_bytes")]
    pub max_longterm_cgroup: Option<u64>,
    #[serde(default, deserialize_with = "opt_bytes")]
    pub max_longterm_user: Option<u64>,
    /// Compare long-term pins with each process's RLIMIT_MEMLOCK.
    #[serde(default = "yes")]
    pub memlock: bool,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { max_pin_age: None, max_longterm_process: None, max_longterm_cgroup: None, max_longterm_user: None, memlock: true }
    }
}

impl LimitsConfig {
    pub fn rules(&self) -> LimitRules {
        LimitRules::new(self.max_pin_age, self.max_longterm_process, self.max_longterm_cgroup, self.max_longterm_user, self.memlock)
    }
}

/// Pinners whose hazards and breaches do not alert (they are counted apart).
#[derive(Deserialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Exempt {
    /// Process names, exactly as /proc/PID/comm shows them.
    #[serde(default)]
    pub comm: Vec<String>,
    #[serde(default)]
    pub uid: Vec<u32>,
    /// cgroup v2 paths below /sys/fs/cgroup ("/system.slice/rdma.service"); a path
    /// exempts its descendants too.
    #[serde(default)]
    pub cgroup: Vec<String>,
}

impl Exempt {
    pub fn is_empty(&self) -> bool {
        self.comm.is_empty() && self.uid.is_empty() && self.cgroup.is_empty()
    }

    /// Whether a pinner with this comm, uid and cgroup path is exempt.
    pub fn covers(&self, comm: Option<&str>, uid: Option<u32>, cgroup: Option<&str>) -> bool {
        comm.is_some_and(|c| self.comm.iter().any(|e| e == c))
            || uid.is_some_and(|u| self.uid.contains(&u))
            || cgroup.is_some_and(|c| {
                self.cgroup.iter().any(|e| {
                    let e = e.trim_end_matches('/');
                    e.is_empty() || c == e || c.strip_prefix(e).is_some_and(|rest| rest.starts_with('/'))
                })
            })
    }
}

fn info() -> Severity {
    Severity::Info
}
fn sixty_seconds() -> Duration {
    Duration::from_secs(60)
}
fn yes() -> bool {
    true
}
fn ten() -> usize {
    10
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    crate::args::duration(&s).map_err(serde::de::Error::custom)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

/// A size: a number of bytes, or a string with units ("64MiB").
fn opt_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Number(i64),
        Text(String),
    }
    match Size::deserialize(d).map_err(|_| serde::de::Error::custom("expected a size: a number of bytes, or a string like \"64MiB\""))? {
        Size::Number(n) if n > 0 => Ok(Some(n as u64)),
        Size::Number(n) => Err(serde::de::Error::custom(format!("{n}: a size must be more than zero"))),
        Size::Text(s) => match crate::args::bytes(&s) {
            Ok(0) => Err(serde::de::Error::custom(format!("{s:?}: a size must be more than zero"))),
            Ok(n) => Ok(Some(n)),
            Err(e) => Err(serde::de::Error::custom(e)),
        },
    }
}

fn top_cgroups<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    if (0..=1000).contains(&n) {
        Ok(n as usize)
    } else {
        Err(serde::de::Error::custom(format!("{n}: between 0 and 1000 cgroups (each is a series in every scrape)")))
    }
}

/// Parses a configuration; the error names the line and the key.
pub fn parse(text: &str) -> Result<Config, String> {
    let c = toml::from_str::<Config>(text).map_err(|e| describe(text, &e))?;
    // An action without its rule would do nothing, silently.
    let a = &c.actions;
    let l = &c.limits;
    for (key, action, set) in [
        ("memlock", a.memlock, l.memlock),
        ("max_longterm_process", a.max_longterm_process, l.max_longterm_process.is_some()),
        ("max_longterm_cgroup", a.max_longterm_cgroup, l.max_longterm_cgroup.is_some()),
    ] {
        if action != Action::Report && !set {
            let at = line_of(text, "actions", key).map(|n| format!("line {n}, ")).unwrap_or_default();
            return Err(format!("{at}key `actions.{key}`: {} for a rule that is off: set limits.{key}", action.name()));
        }
    }
    Ok(c)
}

/// The line of `key` in table `[table]`, for errors found after parsing.
fn line_of(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    for (i, l) in text.lines().enumerate() {
        let t = l.trim();
        if let Some(h) = t.strip_prefix('[') {
            current = h.trim_end_matches(']').trim().to_string();
        } else if current == table && t.split('=').next().is_some_and(|k| k.trim() == key) {
            return Some(i + 1);
        }
    }
    None
}

/// Reads and parses a configuration file.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading the configuration {}: {e}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// "line N, key `section.key`: what is wrong", from toml's error and its span.
fn describe(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else { return msg };
    let at = span.start.min(text.len());
    let line_no = text[..at].matches('\n').count() + 1;
    let lines: Vec<&str> = text.lines().collect();
    let line = lines.get(line_no - 1).map(|l| l.trim()).unwrap_or("");
    let header = |l: &str| l.strip_prefix('[').map(|r| r.trim_start_matches('[').split(']').next().unwrap_or("").trim().to_string());
    if let Some(table) = header(line) {
        return format!("line {line_no}, table [{table}]: {msg}");
    }
    let section = lines[..(line_no - 1).min(lines.len())].iter().rev().find_map(|l| header(l.trim()));
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| !k.is_empty());
    match (section, key) {
        (Some(s), Some(k)) => format!("line {line_no}, key `{s}.{k}`: {msg}"),
        (None, Some(k)) => format!("line {line_no}, key `{k}`: {msg}"),
        (Some(s), None) => format!("line {line_no}, in [{s}]: {msg}"),
        (None, None) => format!("line {line_no}: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert!(c.limits.memlock);
        assert_eq!(c.alert.collapse_window, Duration::from_secs(60));
    }

    #[test]
    fn a_full_file_says_everything() {
        let c = parse(
            r#"
# comments are fine
[alert]
kinds = ["truncate_while_pinned", "dirty_after_unmap"]
min_severity = "warning"
collapse_window = "5m"
stdout = true

[metrics]
listen = "0.0.0.0:9464"
top_cgroups = 5

[limits]
max_pin_age = "30s"
max_longterm_process = "64MiB"
max_longterm_cgroup = 1073741824
memlock = false

[exempt]
comm = ["rdma_job"]
uid = [0]
cgroup = ["/system.slice/rdma.service"]

[actions]
max_longterm_process = "kill"
max_longterm_cgroup = "freeze"
"#,
        )
        .unwrap();
        assert_eq!(c.alert.kinds, Some(vec![HazardKind::TruncateWhilePinned, HazardKind::DirtyAfterUnmap]));
        assert_eq!(c.alert.min_severity, Severity::Warning);
        assert_eq!(c.alert.collapse_window, Duration::from_secs(300));
        assert_eq!(c.metrics.listen, Some("0.0.0.0:9464".parse().unwrap()));
        assert_eq!(c.metrics.top_cgroups, 5);
        let r = c.limits.rules();
        assert_eq!(r.max_pin_age_ns, Some(30_000_000_000));
        assert_eq!(r.max_longterm_process, Some(64 << 20));
        assert_eq!(r.max_longterm_cgroup, Some(1 << 30));
        assert!(!r.memlock);
        assert!(c.alert.alerts_on(HazardKind::TruncateWhilePinned, Severity::Critical));
        assert!(!c.alert.alerts_on(HazardKind::TruncateWhilePinned, Severity::Info));
        assert!(!c.alert.alerts_on(HazardKind::LongHeldPin, Severity::Critical));
        assert_eq!(c.actions.of("max_longterm_bytes", "process"), Action::Kill);
        assert_eq!(c.actions.of("max_longterm_bytes", "cgroup"), Action::Freeze);
        assert_eq!(c.actions.of("rlimit_memlock", "process"), Action::Report);
        assert_eq!(Action::Kill.signal(), Some(libc::SIGKILL));
    }

    /// Each bad file: the line and the key its error must name.
    #[test]
    fn errors_name_the_line_and_the_key() {
        for (text, line, key) in [
            ("[alert]\nkindz = []\n", "line 2", "alert.kindz"),
            ("[alert]\nkinds = [\"truncate\"]\n", "line 2", "alert.kinds"),
            ("[alert]\nmin_severity = \"loud\"\n", "line 2", "alert.min_severity"),
            ("[alert]\n\ncollapse_window = \"-1\"\n", "line 3", "alert.collapse_window"),
            ("[alert]\ncollapse_window = \"soon\"\n", "line 2", "alert.collapse_window"),
            ("[limits]\nmax_longterm_process = \"lots\"\n", "line 2", "limits.max_longterm_process"),
            ("[limits]\nmax_longterm_process = 0\n", "line 2", "limits.max_longterm_process"),
            ("[limits]\nmax_longterm_user = -4\n", "line 2", "limits.max_longterm_user"),
            ("[limits]\nmax_pin_age = \"nan\"\n", "line 2", "limits.max_pin_age"),
            ("[limits]\nmemlock = \"yes\"\n", "line 2", "limits.memlock"),
            ("[metrics]\nlisten = \"localhost\"\n", "line 2", "metrics.listen"),
            ("[metrics]\ntop_cgroups = 100000\n", "line 2", "metrics.top_cgroups"),
            ("[exempt]\nuid = [\"root\"]\n", "line 2", "exempt.uid"),
            ("\n\n[enforce]\naction = \"kill\"\n", "line 3", "table [enforce]"),
            ("[alerts]\nx = 1\n", "line 1", "table [alerts]"),
            ("[actions]\nmax_longterm_process = \"shoot\"\n", "line 2", "actions.max_longterm_process"),
            ("[limits]\nmax_longterm_cgroup = \"1GiB\"\n[actions]\nmax_longterm_cgroup = \"kill\"\n", "line 4", "actions.max_longterm_cgroup"),
            ("[limits]\nmax_pin_age = \"1m\"\n[actions]\nmax_pin_age = \"freeze\"\n", "line 4", "actions.max_pin_age"),
            ("[actions]\n\nmax_longterm_process = \"kill\"\n", "line 3", "actions.max_longterm_process"),
            ("[recorder]\nmax_size = \"huge\"\n", "line 2", "recorder.max_size"),
            ("[recorder]\nmax_bundles = 0\n", "line 2", "recorder.max_bundles"),
            ("[recorder]\ntrigger_severity = \"bad\"\n", "line 2", "recorder.trigger_severity"),
            ("kinds = []\n", "line 1", "key `kinds`"),
            ("[alert\n", "line 1", ""),
        ] {
            let e = parse(text).expect_err(text);
            assert!(e.contains(line), "{text:?}: {e}");
            assert!(e.contains(key), "{text:?}: {e}");
        }
    }

    /// What each rule takes, the table the configuration and --enforce share.
    #[test]
    fn which_rule_takes_which_action() {
        use Action::*;
        for (rule, fits) in [
            ("memlock", [true, false, false, true]),
            ("max_longterm_process", [true, true, true, true]),
            ("max_longterm_cgroup", [true, false, false, true]),
            ("max_longterm_user", [true, false, false, false]),
            ("max_pin_age", [true, false, false, false]),
        ] {
            for (a, want) in [Report, Stop, Kill, Freeze].into_iter().zip(fits) {
                assert_eq!(a.fits(rule).is_ok(), want, "{rule} {a:?}");
            }
        }
    }

    #[test]
    fn exemptions() {
        let x = Exempt { comm: vec!["ib_job".into()], uid: vec![1000], cgroup: vec!["/system.slice/rdma.service".into()] };
        assert!(x.covers(Some("ib_job"), None, None));
        assert!(!x.covers(Some("ib_job2"), None, None));
        assert!(x.covers(None, Some(1000), None));
        assert!(x.covers(None, None, Some("/system.slice/rdma.service")));
        assert!(x.covers(None, None, Some("/system.slice/rdma.service/child")));
        assert!(!x.covers(None, None, Some("/system.slice/rdma.service2")));
        assert!(!x.covers(Some("fio"), Some(0), Some("/user.slice")));
        assert!(Exempt::default().is_empty());
    }
}
