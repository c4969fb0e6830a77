//! The alert sink: what becomes a line (exemptions, severity, collapse), where lines go
//! (stdout, syslog, /alerts), enforcement's lines and freeze, the flight recorder's
//! triggers and bundles, and the metrics' counts of all of it.

use std::{collections::HashMap, io::Write as _, time::{Duration, SystemTime}};

use anyhow::Result;
use serde::Serialize;

use super::{
    collapse::{Alert, Collapser},
    config, enforce, recorder, Rules,
};
use crate::{
    kernel::{
        procs::{self, CgroupNames},
        stream::monotonic_ns,
    },
    output::metrics::{self, Metrics},
    trace::{Event, Hazard},
};

/// A bundle is written this long after its trigger, so that it holds what followed
/// (the rest of a truncate, the dirtying after an unmap).
const POST_TRIGGER_NS: u64 = 2_000_000_000;

/// One alert line: the trace's hazard event, with the wall clock and the host.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    host: &'a str,
    #[serde(flatten)]
    event: &'a Event,
    #[serde(skip_serializing_if = "Option::is_none")]
    collapsed: Option<Collapsed>,
}

/// The repeats a summary line stands for.
#[derive(Serialize)]
struct Collapsed {
    /// Hazards like the one above (the last of them) since the window's first line.
    repeats: u64,
    first_time: String,
    window_s: f64,
}

/// The wall-clock time of a CLOCK_MONOTONIC timestamp, in RFC 3339.
pub(super) fn wall(ts_ns: u64) -> String {
    let ago = Duration::from_nanos(monotonic_ns().saturating_sub(ts_ns));
    let t = SystemTime::now().checked_sub(ago).unwrap_or(SystemTime::now());
    humantime::format_rfc3339_millis(t).to_string()
}

pub(super) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname(2) writes at most len bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The alert sink: exemptions, collapse, lines on stdout, and the metrics' counts.
pub(super) struct Alerts {
    pub(super) host: String,
    pub(super) collapser: Collapser,
    /// uid and cgroup path by pid, read when exemptions need them; emptied every tick.
    pub(super) identities: HashMap<u32, (Option<u32>, Option<String>)>,
    /// The daemon's own cgroup, never frozen.
    pub(super) own_cgroup: Option<String>,
    pub(super) names: CgroupNames,
    /// The latest lines, served at /alerts.
    pub(super) recent: metrics::Recent,
    /// The local syslog, when the configuration asks for it.
    pub(super) syslog: Option<Syslog>,
    /// When each loss reason was last said on stderr, and what was lost since.
    pub(super) losses: HashMap<String, (u64, u64)>,
    /// The flight recorder, when on; when it last wrote a bundle for a hazard.
    pub(super) recorder: Option<recorder::Recorder>,
    pub(super) last_bundle_ns: Option<u64>,
    /// A bundle triggered and waiting for what follows its trigger, due at that time.
    pub(super) pending: Option<(recorder::Incident, u64)>,
    /// What a bundle carries of the session: its start event and doctor's JSON.
    pub(super) start: Event,
    pub(super) doctor_json: String,
}

/// An incident bundle written, as an alert line.
#[derive(Serialize)]
struct IncidentLine<'a> {
    time: String,
    host: &'a str,
    event: &'static str,
    trigger: &'a str,
    result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    lines: usize,
}

/// The recorder's window in ns and its size in bytes, from the configuration.
pub(super) fn recorder_bounds(c: &config::RecorderConfig) -> (u64, usize) {
    (c.window.as_nanos().min(u64::MAX as u128) as u64, c.max_size.min(usize::MAX as u64) as usize)
}

pub(super) fn recorder_for(c: &config::RecorderConfig) -> Option<recorder::Recorder> {
    c.enabled.then(|| {
        let (window_ns, max_bytes) = recorder_bounds(c);
        recorder::Recorder::new(window_ns, max_bytes)
    })
}

/// A loss reason is said on stderr at most this often; the metric counts every one.
const LOSS_EVERY_NS: u64 = 60_000_000_000;

/// What a loss means, and what to do about it.
fn loss_advice(reason: &str) -> &'static str {
    match reason {
        "ringbuf_full" => "records came faster than the daemon read them (a stalled or starved daemon); hazards may have been missed",
        "pin_map_full" => "the kernel-side pin maps are full: pins past them are not watched; raise --pin-map-capacity (or --pin-block-capacity for long-term pins)",
        "pfns_truncated" => "GUP calls of more than 256 pages: their other pages are not watched (README: Limits, today)",
        "call_map_full" => "more threads inside GUP (or a release) at once than the call maps hold: those calls were not tracked",
        "read_failed" => "page pointers that could not be read: those pages were not tracked",
        "stack_lost" => "kernel stacks that could not be walked: those records carry none",
        "nested_too_deep" => "programs nested deeper than their scratch space on one CPU: the innermost record was dropped",
        "quiet_gets_full" => "transient FOLL_GET references past the map's room stay counted until their page is freed",
        "proc_map_full" => "more processes doing GUP at once than the per-process map holds: their calls are missing from the per-process counts",
        _ => "see pinwatch_lost_events_total",
    }
}

type Syslog = syslog::Logger<syslog::LoggerBackend, syslog::Formatter5424>;

/// Connects to the local syslog socket the configuration names, if it asks for syslog.
pub(super) fn open_syslog(c: &config::AlertConfig, host: &str) -> Result<Option<Syslog>> {
    if !c.syslog {
        return Ok(None);
    }
    let f = syslog::Formatter5424 { facility: syslog::Facility::LOG_DAEMON, hostname: Some(host.to_string()), process: "pinwatch".into(), pid: std::process::id() };
    syslog::unix_custom(f, &c.syslog_socket).map(Some).map_err(|e| anyhow::anyhow!("alert.syslog: connecting to {}: {e}", c.syslog_socket.display()))
}

/// One enforcement, as an alert line.
#[derive(Serialize)]
struct EnforcementLine<'a> {
    time: String,
    host: &'a str,
    event: &'static str,
    action: &'static str,
    result: &'static str,
    rule: &'a str,
    scope: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<String>,
    limit: u64,
    detail: String,
}

impl Alerts {
    pub(super) fn event(&mut self, rules: &Rules, metrics: &Metrics, e: &Event) {
        if let Some(r) = self.recorder.as_mut() {
            r.push(e, monotonic_ns());
        }
        match e {
            Event::Hazard(h) => {
                self.hazard(rules, metrics, h);
                if rules.config.recorder.triggers_on(h.kind, h.severity) {
                    let now = monotonic_ns();
                    let interval = rules.config.recorder.min_interval.as_nanos().min(u64::MAX as u128) as u64;
                    if self.last_bundle_ns.is_some_and(|t| now.saturating_sub(t) < interval) {
                        metrics.incident(h.kind.name(), "suppressed");
                    } else {
                        self.last_bundle_ns = Some(now);
                        self.trigger(h.kind.name(), Some(h), now);
                    }
                }
                if let Some(l) = &h.limit {
                    if rules.config.actions.of(&l.rule, &l.scope) == config::Action::Freeze {
                        self.freeze(rules, metrics, h, l);
                    }
                }
            }
            Event::Lost(l) => {
                let (said_at, pending) = self.losses.entry(l.reason.clone()).or_insert((0, 0));
                *pending += l.count;
                if *said_at == 0 || l.ts_ns.saturating_sub(*said_at) >= LOSS_EVERY_NS {
                    eprintln!("pinwatch alert: lost {} ({}): {}", *pending, l.reason, loss_advice(&l.reason));
                    *said_at = l.ts_ns.max(1);
                    *pending = 0;
                }
            }
            Event::Pin(p) => {
                if let Some(result) = p.signal {
                    let action = rules.config.actions.max_longterm_process;
                    metrics.enforcement(action.name(), result.name());
                    let detail = match result {
                        crate::trace::SignalResult::Sent => format!("{} took {} pages long-term past the cap: {} sent before the call returned", p.func, p.nr_pages, action.name()),
                        crate::trace::SignalResult::Refused => format!("{} went past the cap; the kernel refused the signal (kernel thread, exiting task or init)", p.func),
                        crate::trace::SignalResult::Exempt => format!("{} went past the cap; exempt, no signal", p.func),
                    };
                    let host = self.host.clone();
                    self.write_enforcement(rules, metrics, EnforcementLine {
                        time: wall(p.ts_ns),
                        host: &host,
                        event: "enforcement",
                        action: action.name(),
                        result: result.name(),
                        rule: "max_longterm_bytes",
                        scope: "process",
                        pid: Some(p.pid),
                        comm: Some(&p.comm),
                        cgroup: None,
                        limit: rules.limits.max_longterm_process.unwrap_or(0),
                        detail,
                    });
                }
            }
            _ => {}
        }
    }

    /// A bundle is due: the pinners' and the actor's /proc files are taken now, the
    /// trace once what follows the trigger has come in (POST_TRIGGER later).
    pub(super) fn trigger(&mut self, trigger: &str, hazard: Option<&Hazard>, now_ns: u64) {
        if self.recorder.is_none() {
            eprintln!("pinwatch alert: no incident bundle: the flight recorder is off ([recorder] enabled = false)");
            return;
        }
        if self.pending.is_some() {
            // One bundle at a time: the one waiting will hold this trigger's events too.
            return;
        }
        let mut processes: Vec<(&str, u32)> = Vec::new();
        if let Some(h) = hazard {
            processes.extend(h.pinner_list().iter().filter_map(|p| p.pid).map(|pid| ("pinner", pid)));
            if h.actor.pid != 0 {
                processes.push(("actor", h.actor.pid));
            }
        }
        processes.dedup();
        let incident = recorder::Incident::new(trigger, hazard, self.doctor_json.clone(), &processes);
        self.pending = Some((incident, now_ns.saturating_add(POST_TRIGGER_NS)));
    }

    /// Writes the pending bundle if it is due (or `now` is None: at the end).
    pub(super) fn flush_bundle(&mut self, rules: &Rules, metrics: &Metrics, now_ns: Option<u64>) {
        match (&self.pending, now_ns) {
            (None, _) => return,
            (Some((_, due)), Some(now)) if now < *due => return,
            _ => {}
        }
        let Some((incident, _)) = self.pending.take() else { return };
        let Some(r) = self.recorder.as_ref() else { return };
        let trace = r.trace(&self.start);
        let trigger = incident.trigger.as_str();
        let c = &rules.config.recorder;
        let bounds = recorder::Bounds { max_bundles: c.max_bundles, max_total_bytes: c.max_total_size };
        let written = recorder::write_bundle(&c.incident_dir, &trace, &incident, bounds);
        let (result, dir, error) = match written {
            Ok(p) => ("written", Some(p.display().to_string()), None),
            Err(e) => ("failed", None, Some(format!("{e:#}"))),
        };
        metrics.incident(trigger, result);
        match (&dir, &error) {
            (Some(d), _) => eprintln!("pinwatch alert: incident bundle ({trigger}, {} trace lines) in {d}", trace.len()),
            (_, Some(e)) => eprintln!("pinwatch alert: the incident bundle ({trigger}) could not be written: {e}"),
            _ => {}
        }
        let host = self.host.clone();
        let trigger = trigger.to_string();
        let line = IncidentLine { time: wall(monotonic_ns()), host: &host, event: "incident", trigger: &trigger, result, dir, error, lines: trace.len() };
        self.emit(rules, metrics, &line, crate::trace::Severity::Warning);
    }

    /// freeze: the offender's cgroup (a process's own, or the cgroup over its cap).
    fn freeze(&mut self, rules: &Rules, metrics: &Metrics, h: &Hazard, l: &crate::trace::LimitBreach) {
        if self.exempt(rules, h) {
            metrics.enforcement("freeze", "exempt");
            return;
        }
        let path = match l.scope.as_str() {
            "process" => procs::identity(l.id as u32).1,
            "cgroup" => Some(self.names.name(l.id)).filter(|n| !n.starts_with("id:")),
            _ => None,
        };
        let (result, detail, cgroup) = match path {
            None => ("failed", format!("the cgroup of {} {} could not be found (gone?)", l.scope, l.id), None),
            Some(p) => match enforce::freeze(&p, self.own_cgroup.as_deref()) {
                Ok(done) => ("frozen", format!("{done} frozen: thaw with `echo 0 > /sys/fs/cgroup{done}/cgroup.freeze`"), Some(done)),
                Err(e) => ("refused", format!("{e:#}"), Some(p)),
            },
        };
        metrics.enforcement("freeze", result);
        let pid = (l.scope == "process").then_some(l.id as u32);
        let comm = h.pinner_list().first().and_then(|p| p.comm.clone());
        let host = self.host.clone();
        self.write_enforcement(rules, metrics, EnforcementLine {
            time: wall(h.ts_ns),
            host: &host,
            event: "enforcement",
            action: "freeze",
            result,
            rule: &l.rule,
            scope: &l.scope,
            pid,
            comm: comm.as_deref(),
            cgroup,
            limit: l.limit,
            detail,
        });
    }

    /// Enforcements are never collapsed: each is its own line.
    fn write_enforcement(&mut self, rules: &Rules, metrics: &Metrics, line: EnforcementLine) {
        self.emit(rules, metrics, &line, crate::trace::Severity::Warning);
    }

    fn exempt(&mut self, rules: &Rules, h: &Hazard) -> bool {
        let x = &rules.config.exempt;
        if x.is_empty() {
            return false;
        }
        let pinners = h.pinner_list();
        // Exempt when every pinner known by pid is; a pin only the kernel's count knows of
        // (no pid) is nobody's to exempt.
        !pinners.is_empty()
            && pinners.iter().all(|p| {
                let Some(pid) = p.pid else { return false };
                let (uid, cgroup) = if x.uid.is_empty() && x.cgroup.is_empty() {
                    (None, None)
                } else {
                    self.identities.entry(pid).or_insert_with(|| procs::identity(pid)).clone()
                };
                x.covers(p.comm.as_deref(), uid, cgroup.as_deref())
            })
    }

    fn hazard(&mut self, rules: &Rules, metrics: &Metrics, h: &Hazard) {
        let exempt = self.exempt(rules, h);
        metrics.hazard(h, exempt);
        if exempt || !rules.config.alert.alerts_on(h.kind, h.severity) {
            return;
        }
        for a in self.collapser.offer(h.clone()) {
            self.write(rules, metrics, a);
        }
    }

    pub(super) fn write(&mut self, rules: &Rules, metrics: &Metrics, a: Alert) {
        let (h, collapsed) = match a {
            Alert::First(h) => (h, None),
            Alert::Repeats { last, repeats, first_ns, window_ns } => {
                metrics.collapsed(last.kind, repeats);
                (last, Some(Collapsed { repeats, first_time: wall(first_ns), window_s: window_ns as f64 / 1e9 }))
            }
        };
        let (kind, severity, ts_ns) = (h.kind, h.severity, h.ts_ns);
        let event = Event::Hazard(h);
        let host = self.host.clone();
        let line = Line { time: wall(ts_ns), host: &host, event: &event, collapsed };
        if self.emit(rules, metrics, &line, severity) {
            metrics.alert_written(kind);
        }
    }

    /// One line on stdout and syslog (each where the configuration asks for it), and in
    /// /alerts' memory. False when stdout refused it (counted as lost).
    fn emit(&mut self, rules: &Rules, metrics: &Metrics, line: &impl Serialize, severity: crate::trace::Severity) -> bool {
        let text = match serde_json::to_string(line) {
            Ok(t) => t,
            Err(e) => {
                metrics.alert_lost();
                log::warn!("an alert line could not be made: {e}");
                return false;
            }
        };
        let written = if rules.config.alert.stdout {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{text}").and_then(|()| out.flush())
        } else {
            Ok(())
        };
        if let Some(log) = self.syslog.as_mut() {
            use crate::trace::Severity;
            let msg = (0u32, std::collections::BTreeMap::new(), text.as_str());
            let sent = match severity {
                Severity::Critical => log.crit(msg),
                Severity::Warning => log.warning(msg),
                Severity::Info => log.info(msg),
            };
            if let Err(e) = sent {
                metrics.syslog_lost();
                log::warn!("an alert line could not be sent to syslog: {e}");
            }
        }
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == metrics::RECENT_LINES {
                r.pop_front();
            }
            r.push_back(text);
        }
        match written {
            Ok(()) => true,
            Err(e) => {
                metrics.alert_lost();
                log::warn!("an alert line could not be written: {e}");
                false
            }
        }
    }
}


