//! Prometheus metrics, in one place: every family with its closed label set, registered
//! once, served as OpenMetrics text at /metrics. The names are a contract (README: "The
//! fleet"); label sets stay bounded (no pid labels; cgroups only the N largest).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{body::Bytes, header, Method, Request, Response, StatusCode};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use crate::trace::{Hazard, HazardKind, Severity};

/// The lost-events reasons of alert lines that could not be written, to stdout and to
/// syslog.
const OUTPUT_LOST: &str = "alert_output";
const SYSLOG_LOST: &str = "syslog_output";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindSeverity {
    kind: &'static str,
    severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleScope {
    rule: String,
    scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionResult {
    action: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PinKind {
    kind: &'static str,
    longterm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CgroupLongterm {
    cgroup: String,
    longterm: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Program {
    program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    kernel: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TriggerResult {
    trigger: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// Pinned memory now, host-wide and by cgroup, as the live loop computed it at a tick.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pinned {
    /// FOLL_PIN and FOLL_GET bytes, long-term and not.
    pub pin: [u64; 2],
    pub get: [u64; 2],
    /// Transient pins counted by the kernel side and not streamed (never long-term).
    pub transient: u64,
    /// (cgroup path, pinned bytes, long-term bytes), largest first.
    pub cgroups: Vec<(String, u64, u64)>,
}

/// Totals that only grow, read from the kernel or the session at a tick; the metrics
/// add what grew since the last one.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    pub lost_by_reason: BTreeMap<String, u64>,
    pub gup_calls: u64,
    pub gup_pages: u64,
    /// (program, run time in ns, run count), where the kernel's BPF statistics are on.
    pub programs: Vec<(String, u64, u64)>,
}

pub struct Metrics {
    registry: Arc<Registry>,
    hazards: Family<KindSeverity, Counter>,
    breaches: Family<RuleScope, Counter>,
    enforcements: Family<ActionResult, Counter>,
    lost: Family<Reason, Counter>,
    pinned: Family<PinKind, Gauge>,
    cgroup_pinned: Family<CgroupLongterm, Gauge>,
    alerts: Family<Kind, Counter>,
    collapsed: Family<Kind, Counter>,
    exempt: Family<Kind, Counter>,
    reloads: Family<ResultLabel, Counter>,
    selftests: Family<ResultLabel, Counter>,
    incidents: Family<TriggerResult, Counter>,
    gup_calls: Counter,
    gup_pages: Counter,
    bpf_time: Family<Program, Counter<f64>>,
    bpf_runs: Family<Program, Counter>,
    /// What the growing totals were at the last tick.
    last: Totals,
}

impl Metrics {
    pub fn new(version: &str, kernel: &str, mode: &str, lost_reasons: &[&str]) -> Metrics {
        let mut r = Registry::default();
        let hazards = Family::<KindSeverity, Counter>::default();
        r.register("pinwatch_hazards", "Hazards seen: the kernel treated a pinned page as an ordinary one, or refused a long-term pin (exempt pinners not counted)", hazards.clone());
        // Every kind and severity from the start: a rule on increase() sees the first
        // hazard as a step from 0, not as a new series.
        for kind in HazardKind::ALL {
            for severity in [Severity::Info, Severity::Warning, Severity::Critical] {
                let _ = hazards.get_or_create(&KindSeverity { kind: kind.name(), severity: severity.name() });
            }
        }
        let breaches = Family::<RuleScope, Counter>::default();
        r.register("pinwatch_limit_breaches", "Limit rules broken (rule: rlimit_memlock, max_longterm_bytes, max_pin_age_ns; scope: process, cgroup, user)", breaches.clone());
        for rule in ["rlimit_memlock", "max_longterm_bytes", "max_pin_age_ns"] {
            for scope in ["process", "cgroup", "user"] {
                let _ = breaches.get_or_create(&RuleScope { rule: rule.into(), scope: scope.into() });
            }
        }
        let enforcements = Family::<ActionResult, Counter>::default();
        r.register("pinwatch_enforcements", "Actions on limit breaches (action: stop, kill from the kernel, freeze; result: sent, refused, exempt, frozen, failed)", enforcements.clone());
        let lost = Family::<Reason, Counter>::default();
        r.register("pinwatch_lost_events", "Events lost, by layer and reason (kernel ring and maps, the reader, the alert output)", lost.clone());
        for reason in lost_reasons.iter().chain(&[OUTPUT_LOST, SYSLOG_LOST]) {
            let _ = lost.get_or_create(&Reason { reason: reason.to_string() });
        }
        let pinned = Family::<PinKind, Gauge>::default();
        r.register("pinwatch_pinned_bytes", "Bytes held by GUP references now, host-wide (kind: pin = FOLL_PIN, get = FOLL_GET, transient = short pins counted by the kernel side, not streamed)", pinned.clone());
        let cgroup_pinned = Family::<CgroupLongterm, Gauge>::default();
        r.register("pinwatch_cgroup_pinned_bytes", "Bytes held by GUP references now, for the cgroups holding most (metrics.top_cgroups)", cgroup_pinned.clone());
        let alerts = Family::<Kind, Counter>::default();
        r.register("pinwatch_alerts", "Alert lines written (the first of each collapse window, and summaries of repeats)", alerts.clone());
        let collapsed = Family::<Kind, Counter>::default();
        r.register("pinwatch_alerts_collapsed", "Hazards folded into a summary line instead of a line of their own", collapsed.clone());
        let exempt = Family::<Kind, Counter>::default();
        r.register("pinwatch_exempt_hazards", "Hazards of exempt pinners (the configuration's [exempt]): counted here only", exempt.clone());
        let reloads = Family::<ResultLabel, Counter>::default();
        r.register("pinwatch_config_reloads", "Configuration reloads on SIGHUP (result: ok, invalid: the old rules kept running)", reloads.clone());
        for result in ["ok", "invalid"] {
            let _ = reloads.get_or_create(&ResultLabel { result });
        }
        let selftests = Family::<ResultLabel, Counter>::default();
        r.register("pinwatch_selftests", "Selftests run by the daemon at start ([selftest] at_start): passed or failed", selftests.clone());
        let incidents = Family::<TriggerResult, Counter>::default();
        r.register("pinwatch_incidents", "Incident bundles of the flight recorder (trigger: a hazard kind, or sigusr1; result: written, failed, suppressed by min_interval)", incidents.clone());
        let gup_calls = Counter::default();
        r.register("pinwatch_gup_calls", "GUP calls that took pages, as the kernel side counted them", gup_calls.clone());
        let gup_pages = Counter::default();
        r.register("pinwatch_gup_pages", "Pages taken by GUP calls, as the kernel side counted them", gup_pages.clone());
        let bpf_time = Family::<Program, Counter<f64>>::default();
        r.register("pinwatch_bpf_run_seconds", "Time spent in each of pinwatch's BPF programs (only while kernel.bpf_stats_enabled is 1)", bpf_time.clone());
        let bpf_runs = Family::<Program, Counter>::default();
        r.register("pinwatch_bpf_runs", "Runs of each of pinwatch's BPF programs (only while kernel.bpf_stats_enabled is 1)", bpf_runs.clone());
        r.register(
            "pinwatch_build",
            "pinwatch's version, the kernel it runs on and what it can see there (full, tracepoint_only)",
            Info::new(BuildLabels { version: version.into(), kernel: kernel.into(), mode: mode.into() }),
        );
        Metrics {
            registry: Arc::new(r),
            hazards,
            breaches,
            enforcements,
            lost,
            pinned,
            cgroup_pinned,
            alerts,
            collapsed,
            exempt,
            reloads,
            selftests,
            incidents,
            gup_calls,
            gup_pages,
            bpf_time,
            bpf_runs,
            last: Totals::default(),
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// A hazard the engine found; exempt ones are counted apart.
    pub fn hazard(&self, h: &Hazard, exempt: bool) {
        if exempt {
            self.exempt.get_or_create(&Kind { kind: h.kind.name() }).inc();
            return;
        }
        self.hazards.get_or_create(&KindSeverity { kind: h.kind.name(), severity: h.severity.name() }).inc();
        if let Some(l) = &h.limit {
            self.breaches.get_or_create(&RuleScope { rule: l.rule.clone(), scope: l.scope.clone() }).inc();
        }
    }

    pub fn enforcement(&self, action: &str, result: &str) {
        self.enforcements.get_or_create(&ActionResult { action: action.into(), result: result.into() }).inc();
    }

    pub fn alert_written(&self, kind: HazardKind) {
        self.alerts.get_or_create(&Kind { kind: kind.name() }).inc();
    }

    pub fn collapsed(&self, kind: HazardKind, n: u64) {
        self.collapsed.get_or_create(&Kind { kind: kind.name() }).inc_by(n);
    }

    /// Alert lines that could not be written (stdout gone, a full disk under a pipe).
    pub fn alert_lost(&self) {
        self.lost.get_or_create(&Reason { reason: OUTPUT_LOST.into() }).inc();
    }

    /// Alert lines the syslog socket refused.
    pub fn syslog_lost(&self) {
        self.lost.get_or_create(&Reason { reason: SYSLOG_LOST.into() }).inc();
    }

    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&ResultLabel { result: if ok { "ok" } else { "invalid" } }).inc();
    }

    pub fn incident(&self, trigger: &str, result: &'static str) {
        self.incidents.get_or_create(&TriggerResult { trigger: trigger.into(), result }).inc();
    }

    /// A handle that counts a selftest's result, for the task that waits for it.
    pub fn selftest_counter(&self, passed: bool) -> Counter {
        self.selftests.get_or_create(&ResultLabel { result: if passed { "passed" } else { "failed" } }).clone()
    }

    /// The figures of a tick: gauges set, growing totals added.
    pub fn tick(&mut self, pinned: &Pinned, totals: Totals) {
        let g = |kind, longterm, v: u64| self.pinned.get_or_create(&PinKind { kind, longterm }).set(v.min(i64::MAX as u64) as i64);
        g("pin", "false", pinned.pin[0]);
        g("pin", "true", pinned.pin[1]);
        g("get", "false", pinned.get[0]);
        g("get", "true", pinned.get[1]);
        g("transient", "false", pinned.transient);
        // Only the largest cgroups: the family is rebuilt, so a cgroup that left the
        // list (or ended) leaves the scrape.
        self.cgroup_pinned.clear();
        for (cgroup, all, longterm) in &pinned.cgroups {
            let set = |lt, v: u64| self.cgroup_pinned.get_or_create(&CgroupLongterm { cgroup: cgroup.clone(), longterm: lt }).set(v.min(i64::MAX as u64) as i64);
            set("true", *longterm);
            set("false", all.saturating_sub(*longterm));
        }
        for (reason, n) in &totals.lost_by_reason {
            let before = self.last.lost_by_reason.get(reason).copied().unwrap_or(0);
            if *n > before {
                self.lost.get_or_create(&Reason { reason: reason.clone() }).inc_by(n - before);
            }
        }
        self.gup_calls.inc_by(totals.gup_calls.saturating_sub(self.last.gup_calls));
        self.gup_pages.inc_by(totals.gup_pages.saturating_sub(self.last.gup_pages));
        let before: HashMap<&str, (u64, u64)> = self.last.programs.iter().map(|(p, t, n)| (p.as_str(), (*t, *n))).collect();
        for (prog, time_ns, runs) in &totals.programs {
            let (t0, n0) = before.get(prog.as_str()).copied().unwrap_or((0, 0));
            let label = Program { program: prog.clone() };
            self.bpf_time.get_or_create(&label).inc_by(time_ns.saturating_sub(t0) as f64 / 1e9);
            self.bpf_runs.get_or_create(&label).inc_by(runs.saturating_sub(n0));
        }
        // Programs keep their last figures when statistics are switched off.
        let programs = if totals.programs.is_empty() { std::mem::take(&mut self.last.programs) } else { totals.programs };
        self.last = Totals { programs, ..totals };
    }

    /// The exposition, as a scrape gets it.
    #[cfg(test)]
    pub fn encode(&self) -> String {
        encode(&self.registry)
    }
}

fn encode(r: &Registry) -> String {
    let mut s = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut s, r);
    s
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The latest alert lines, newest last, for /alerts (what `pinwatch selftest` reads).
pub type Recent = Arc<Mutex<VecDeque<String>>>;
/// Lines /alerts keeps.
pub const RECENT_LINES: usize = 256;

fn respond(req: &Request<hyper::body::Incoming>, registry: &Registry, recent: &Recent) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(kind));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET /metrics\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, OPENMETRICS, encode(registry)),
        "/alerts" => {
            let lines = recent.lock().map(|r| r.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap_or_default();
            reply(StatusCode::OK, "application/x-ndjson", lines)
        }
        "/" => reply(StatusCode::OK, "text/plain", "pinwatch alert: metrics at /metrics, the latest alert lines at /alerts\n".into()),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found: metrics are at /metrics\n".into()),
    }
}

/// Serves /metrics until the process ends. A connection's error is its own: it never
/// ends the server.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>, recent: Recent) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, then go on.
                log::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        let recent = recent.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let registry = registry.clone();
                let recent = recent.clone();
                async move { Ok::<_, Infallible>(respond(&req, &registry, &recent)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                log::debug!("metrics: a connection ended with {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Actor, LimitBreach, Pinners};

    fn hazard(kind: HazardKind, severity: Severity) -> Hazard {
        Hazard {
            ts_ns: 1,
            kind,
            severity,
            pfn: None,
            order: None,
            pinner: Pinners::Many(vec![]),
            actor: Actor { pid: 1, tid: 1, comm: "x".into(), stack: vec![] },
            file: None,
            kernel_pins: None,
            func: "f".into(),
            limit: None,
            pages: None,
        }
    }

    fn line<'a>(text: &'a str, start: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(start))
    }

    #[test]
    fn the_contract_names_and_their_values() {
        let mut m = Metrics::new("0.1.0", "6.12.0", "full", &["ringbuf_full"]);
        let text = m.encode();
        // Every kind and severity is there at 0 before any hazard.
        assert_eq!(line(&text, r#"pinwatch_hazards_total{kind="truncate_while_pinned",severity="critical"}"#), Some(r#"pinwatch_hazards_total{kind="truncate_while_pinned",severity="critical"} 0"#));
        assert!(line(&text, r#"pinwatch_build_info{version="0.1.0",kernel="6.12.0",mode="full"} 1"#).is_some(), "{text}");
        m.hazard(&hazard(HazardKind::TruncateWhilePinned, Severity::Critical), false);
        m.hazard(&hazard(HazardKind::TruncateWhilePinned, Severity::Critical), false);
        m.hazard(&hazard(HazardKind::TruncateWhilePinned, Severity::Critical), true);
        let mut breach = hazard(HazardKind::PinLimitExceeded, Severity::Warning);
        breach.limit = Some(LimitBreach { rule: "max_longterm_bytes".into(), scope: "cgroup".into(), id: 5, value: 2, limit: 1 });
        m.hazard(&breach, false);
        m.tick(
            &Pinned { pin: [4096, 8192], get: [0, 0], transient: 12288, cgroups: vec![("/a".into(), 8192, 4096)] },
            Totals { lost_by_reason: [("ring_full".to_string(), 3)].into(), gup_calls: 5, gup_pages: 9, programs: vec![("gup_exit".into(), 2_000_000_000, 10)] },
        );
        m.tick(
            &Pinned { pin: [0, 0], get: [0, 0], transient: 0, cgroups: vec![("/b".into(), 4096, 0)] },
            Totals { lost_by_reason: [("ring_full".to_string(), 5)].into(), gup_calls: 7, gup_pages: 9, programs: vec![] },
        );
        let text = m.encode();
        for want in [
            r#"pinwatch_hazards_total{kind="truncate_while_pinned",severity="critical"} 2"#,
            r#"pinwatch_exempt_hazards_total{kind="truncate_while_pinned"} 1"#,
            r#"pinwatch_limit_breaches_total{rule="max_longterm_bytes",scope="cgroup"} 1"#,
            r#"pinwatch_lost_events_total{reason="ring_full"} 5"#,
            r#"pinwatch_lost_events_total{reason="ringbuf_full"} 0"#,
            r#"pinwatch_lost_events_total{reason="alert_output"} 0"#,
            r#"pinwatch_pinned_bytes{kind="pin",longterm="true"} 0"#,
            r#"pinwatch_cgroup_pinned_bytes{cgroup="/b",longterm="false"} 4096"#,
            r#"pinwatch_gup_calls_total 7"#,
            r#"pinwatch_bpf_run_seconds_total{program="gup_exit"} 2.0"#,
            r#"pinwatch_bpf_runs_total{program="gup_exit"} 10"#,
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == want), "no line {want:?} in\n{text}");
        }
        assert!(!text.contains(r#"cgroup="/a""#), "a cgroup that left the top list stays in the scrape:\n{text}");
    }
}
