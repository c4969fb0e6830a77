//! `pinwatch alert`: the fleet daemon. Monitors on the attach ladder until stopped,
//! writes each hazard and limit breach as a JSON line (collapsed when it repeats), and
//! serves Prometheus metrics. SIGHUP reloads the configuration; SIGUSR1 writes an
//! incident bundle; SIGTERM and SIGINT end it cleanly, repeats still pending said first.
//! This file is the wiring: options, the rules in force, the loop; `sink.rs` is what
//! happens to each event.

pub mod collapse;
pub mod config;
pub mod enforce;
pub mod recorder;
mod sink;

use std::{
    collections::{BTreeSet, HashMap},
    net::SocketAddr,
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result};

use crate::{
    args::LiveArgs,
    engine::account::{Accounts, PAGE_SIZE},
    kernel::{
        load::Counters,
        procs::{self, CgroupNames},
        stream::monotonic_ns,
        Streaming,
    },
    live::{
        session::{LimitArgs, Session},
        Live, StopReason, Wake,
    },
    output::metrics::{self, Metrics, Pinned, Totals},
    trace::{Flag, LimitRules},
};
use collapse::Collapser;
use config::Config;
use sink::{hostname, open_syslog, recorder_bounds, recorder_for, Alerts};

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when stopped by SIGTERM or SIGINT (or --check-config found the file valid); \
2 on an error: a bad option or configuration, a port in use, a missing privilege.\n\n\
Alerts are JSON lines on stdout: the trace's hazard object plus `time` (RFC 3339) and `host`; repeats of \
a (kind, pinner, file) within the collapse window become one line with `collapsed`. Metrics: \
http://127.0.0.1:9464/metrics unless --listen or the configuration says otherwise.")]
pub struct AlertArgs {
    /// Configuration file (TOML): alert kinds and severity, limits, exemptions, metrics.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check this configuration file and exit: 0 when valid, 2 naming the line and key.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub check_config: Option<PathBuf>,
    /// Serve metrics at http://ADDR:PORT/metrics (default 127.0.0.1:9464: loopback).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Where the flight recorder writes incident bundles (default
    /// /var/lib/pinwatch/incidents; recorder.incident_dir in the configuration).
    #[arg(long, value_name = "DIR")]
    pub incident_dir: Option<PathBuf>,
    /// The action of the limit rules given as options: report (the default), stop or
    /// kill (from the kernel, at the GUP call that goes over --max-longterm-process),
    /// freeze (the offender's cgroup). The configuration sets one per rule ([actions]).
    #[arg(long, value_enum, value_name = "ACTION")]
    pub enforce: Option<config::Action>,
    #[command(flatten)]
    pub kernel: LiveArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// The reader's loss reason, beside the kernel side's counters.
const UNDECODABLE: &str = "undecodable_record";

/// The periodic work: limit rules, metrics' gauges, collapse windows closing.
const TICK: Duration = Duration::from_secs(1);
/// Every this many ticks, every process is read for VmPin and VmLck (pins older than
/// pinwatch, or unseen here, still count against RLIMIT_MEMLOCK).
const DISCOVER_EVERY: u64 = 10;

/// The rules in force: the file's, with the command line's options over them.
struct Rules {
    pub(super) config: Config,
    pub(super) limits: LimitRules,
}

impl Rules {
    fn new(mut config: Config, args: &LimitArgs, enforce: Option<config::Action>) -> Result<Rules> {
        if let Some(action) = enforce {
            let given = [
                ("--max-longterm-process", "max_longterm_process", args.max_longterm_process.is_some(), &mut config.actions.max_longterm_process),
                ("--max-longterm-cgroup", "max_longterm_cgroup", args.max_longterm_cgroup.is_some(), &mut config.actions.max_longterm_cgroup),
                ("--max-longterm-user", "max_longterm_user", args.max_longterm_user.is_some(), &mut config.actions.max_longterm_user),
                ("--max-pin-age", "max_pin_age", args.max_pin_age.is_some(), &mut config.actions.max_pin_age),
            ];
            let mut any = false;
            for (option, rule, on, slot) in given {
                if !on {
                    continue;
                }
                any = true;
                action.fits(rule).map_err(|why| anyhow::anyhow!("--enforce with {option}: {why}"))?;
                *slot = action;
            }
            if !any {
                anyhow::bail!("--enforce {} needs a limit given as an option (--max-longterm-process, ...); the configuration's [actions] sets one per rule", action.name());
            }
        }
        let mut l = config.limits.clone();
        l.max_pin_age = args.max_pin_age.or(l.max_pin_age);
        l.max_longterm_process = args.max_longterm_process.or(l.max_longterm_process);
        l.max_longterm_cgroup = args.max_longterm_cgroup.or(l.max_longterm_cgroup);
        l.max_longterm_user = args.max_longterm_user.or(l.max_longterm_user);
        l.memlock = l.memlock && !args.no_memlock_rule;
        Ok(Rules { limits: l.rules(), config })
    }

    fn load(path: Option<&PathBuf>, args: &AlertArgs) -> Result<Rules> {
        let mut config = match path {
            Some(p) => config::load(p)?,
            None => Config::default(),
        };
        if let Some(d) = &args.incident_dir {
            config.recorder.incident_dir = d.clone();
        }
        Rules::new(config, &args.limits, args.enforce)
    }

    /// The start-up line: each rule and its action, what alerts, where.
    fn describe(&self, listen: SocketAddr) -> String {
        let l = &self.limits;
        let a = &self.config.actions;
        let mut rules = Vec::new();
        if l.memlock {
            rules.push(("long-term pins over RLIMIT_MEMLOCK per process".to_string(), a.memlock));
        }
        let size = |b: u64| bytesize::ByteSize::b(b).to_string();
        if let Some(b) = l.max_longterm_process {
            rules.push((format!("long-term pins over {} per process", size(b)), a.max_longterm_process));
        }
        if let Some(b) = l.max_longterm_cgroup {
            rules.push((format!("long-term pins over {} per cgroup", size(b)), a.max_longterm_cgroup));
        }
        if let Some(b) = l.max_longterm_user {
            rules.push((format!("long-term pins over {} per user", size(b)), a.max_longterm_user));
        }
        if let Some(ns) = l.max_pin_age_ns {
            rules.push((format!("pins held longer than {}", humantime::format_duration(Duration::from_nanos(ns))), a.max_pin_age));
        }
        let what = |a: config::Action| match a {
            config::Action::Stop | config::Action::Kill => format!("{}, from the kernel at the call", a.name()),
            a => a.name().to_string(),
        };
        let rules = if rules.is_empty() { "none".to_string() } else { rules.iter().map(|(r, a)| format!("{r} (action: {})", what(*a))).collect::<Vec<_>>().join("; ") };
        let a = &self.config.alert;
        let kinds = a.kinds.as_ref().map(|k| k.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")).unwrap_or_else(|| "all".into());
        let x = &self.config.exempt;
        let exempt = if x.is_empty() { String::new() } else { format!("; exempt: comm {:?} uid {:?} cgroup {:?}", x.comm, x.uid, x.cgroup) };
        let r = &self.config.recorder;
        let recorder = if r.enabled {
            format!(
                "; flight recorder: last {} (at most {}), bundles in {} on {} hazards",
                humantime::format_duration(r.window),
                bytesize::ByteSize::b(r.max_size),
                r.incident_dir.display(),
                r.trigger_severity.name()
            )
        } else {
            "; flight recorder off".to_string()
        };
        format!(
            "limit rules: {rules}; alerts: kinds {kinds}, severity {} and above, repeats collapsed per {}{exempt}{recorder}; metrics at http://{listen}/metrics",
            a.min_severity.name(),
            humantime::format_duration(a.collapse_window),
        )
    }
}

/// Pinned bytes by kind host-wide, and the cgroups holding most.
fn pinned(session: &Session, accounts: &Accounts, top: usize, names: &mut CgroupNames) -> Pinned {
    let mut p = Pinned::default();
    for (_, h) in session.engine.pins.iter() {
        let lt = h.flags.contains(&Flag::Longterm) as usize;
        if h.flags.contains(&Flag::Pin) {
            p.pin[lt] += PAGE_SIZE;
        } else {
            p.get[lt] += PAGE_SIZE;
        }
    }
    p.transient = session.gup_totals().unstreamed_held * PAGE_SIZE;
    let mut cgroups: Vec<(u64, u64, u64)> = accounts.cgroups.iter().map(|(id, u)| (*id, u.pinned_bytes, u.longterm_bytes)).collect();
    cgroups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    names.refresh();
    p.cgroups = cgroups.into_iter().take(top).map(|(id, all, lt)| (names.name(id), all, lt)).collect();
    p
}

pub async fn run(args: AlertArgs) -> Result<i32> {
    if let Some(path) = &args.check_config {
        let rules = Rules::load(Some(path), &args)?;
        let listen = args.listen.or(rules.config.metrics.listen).unwrap_or_else(default_listen);
        println!("{}: valid; {}", path.display(), rules.describe(listen));
        return Ok(0);
    }
    let mut rules = Rules::load(args.config.as_ref(), &args)?;
    let listen = args.listen.or(rules.config.metrics.listen).unwrap_or_else(default_listen);
    // The port and the incident directory before the kernel: either failing fails in a
    // moment, with nothing attached.
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening for metrics on {listen} (--listen, or metrics.listen in the configuration)"))?;
    if rules.config.recorder.enabled {
        let d = &rules.config.recorder.incident_dir;
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)
            .with_context(|| format!("creating the incident directory {} (--incident-dir, or recorder.incident_dir; [recorder] enabled = false turns the flight recorder off)", d.display()))?;
    }
    let signals = Live::signals()?;
    let session = Session::open(args.kernel, &LimitArgs::default(), Streaming::Monitor, true)?;
    let mut live = Live::new(session, signals, TICK, None).reload_on_hangup().on_user1()?;
    live.session.set_limits(rules.limits.clone());
    enforce::arm(&mut live.session.kernel, &rules.limits, &rules.config)?;
    // The start-up scan is done: the capability only it needed goes.
    if let Err(e) = crate::kernel::drop_sys_admin() {
        log::warn!("keeping CAP_SYS_ADMIN: {e:#}");
    }
    let reasons: Vec<&str> = Counters::NAMES.iter().copied().chain([UNDECODABLE]).collect();
    let mut metrics = Metrics::new(env!("CARGO_PKG_VERSION"), &live.session.kernel.release, live.session.mode.name(), &reasons);
    let recent: metrics::Recent = Default::default();
    tokio::spawn(metrics::serve(listener, metrics.registry(), recent.clone()));
    eprintln!("pinwatch alert: watching kernel {} ({}); {}", live.session.kernel.release, live.session.mode.name(), rules.describe(listen));
    notify_ready();
    if rules.config.selftest.at_start {
        selftest_at_start(listen, &metrics)?;
    }

    let own_cgroup = procs::identity(std::process::id()).1;
    let host = hostname();
    let syslog = open_syslog(&rules.config.alert, &host)?;
    let mut sink = Alerts { host, collapser: Collapser::new(window_ns(&rules)), identities: HashMap::new(), own_cgroup, names: CgroupNames::default(), recent, syslog, losses: HashMap::new(),
        recorder: recorder_for(&rules.config.recorder),
        last_bundle_ns: None,
        pending: None,
        start: live.session.start_event(),
        doctor_json: crate::output::doctor::json(&live.session.kernel, live.session.mode),
    };
    let mut batch = Vec::new();
    let mut ticks = 0u64;
    let why = loop {
        match live.next(&mut batch).await? {
            Wake::Records => {}
            Wake::Tick => {
                ticks += 1;
                let tick = live.session.tick(&BTreeSet::new(), ticks % DISCOVER_EVERY == 1)?;
                for e in &tick.events {
                    sink.event(&rules, &metrics, e);
                }
                for a in sink.collapser.expire(monotonic_ns()) {
                    sink.write(&rules, &metrics, a);
                }
                sink.identities.clear();
                if let Some(r) = sink.recorder.as_mut() {
                    r.prune(&live.session.engine.pins);
                }
                sink.flush_bundle(&rules, &metrics, Some(monotonic_ns()));
                let released = enforce::released(&live.session.gup, &tick.accounts);
                if let Err(e) = live.session.kernel.set_longterm_released(&released) {
                    log::warn!("{e:#}");
                }
                let s = &live.session;
                let pinned = pinned(s, &tick.accounts, rules.config.metrics.top_cgroups, &mut sink.names);
                let gup = s.gup_totals();
                let mut lost = s.lost_by_reason.clone();
                lost.insert(UNDECODABLE.into(), s.undecodable());
                metrics.tick(&pinned, Totals { lost_by_reason: lost, gup_calls: gup.calls, gup_pages: gup.pages, programs: s.kernel.program_stats() });
            }
            Wake::Reload => match args.config.as_ref().map(|p| Rules::load(Some(p), &args)) {
                None => eprintln!("pinwatch alert: SIGHUP: no --config to reload; the rules stay as they are"),
                Some(Ok(new)) => {
                    if new.config.metrics.listen != rules.config.metrics.listen {
                        eprintln!("pinwatch alert: SIGHUP: metrics.listen changed; it takes effect at the next start");
                    }
                    live.session.set_limits(new.limits.clone());
                    if let Err(e) = enforce::arm(&mut live.session.kernel, &new.limits, &new.config) {
                        eprintln!("pinwatch alert: SIGHUP: setting the kernel's enforcement: {e:#}");
                    }
                    sink.collapser.set_window(window_ns(&new));
                    let (old, newr) = (&rules.config.recorder, &new.config.recorder);
                    match (sink.recorder.as_mut(), newr.enabled) {
                        (Some(r), true) => {
                            let (window_ns, max_bytes) = recorder_bounds(newr);
                            r.set_bounds(window_ns, max_bytes)
                        }
                        (_, false) => sink.recorder = None,
                        (None, true) => sink.recorder = recorder_for(newr),
                    }
                    if old.incident_dir != newr.incident_dir {
                        eprintln!("pinwatch alert: SIGHUP: incident bundles now go to {}", newr.incident_dir.display());
                    }
                    if new.config.alert.syslog != rules.config.alert.syslog || new.config.alert.syslog_socket != rules.config.alert.syslog_socket {
                        match open_syslog(&new.config.alert, &sink.host) {
                            Ok(s) => sink.syslog = s,
                            Err(e) => eprintln!("pinwatch alert: SIGHUP: {e:#}; alert lines go to stdout only"),
                        }
                    }
                    rules = new;
                    metrics.reload(true);
                    eprintln!("pinwatch alert: configuration reloaded; {}", rules.describe(listen));
                }
                Some(Err(e)) => {
                    metrics.reload(false);
                    eprintln!("pinwatch alert: SIGHUP: {e:#}; the rules in force stay as they were");
                }
            },
            Wake::User1 => sink.trigger("sigusr1", None, monotonic_ns()),
            Wake::Stop(why) => break why,
        }
        for e in &live.session.apply_batch(&mut batch) {
            sink.event(&rules, &metrics, e);
        }
    };
    // What is still in the ring, then the repeats not yet said.
    let session = &mut live.session;
    session.drain(&mut batch);
    for e in &session.apply_batch(&mut batch) {
        sink.event(&rules, &metrics, e);
    }
    for a in sink.collapser.flush() {
        sink.write(&rules, &metrics, a);
    }
    sink.flush_bundle(&rules, &metrics, None);
    let hazards: u64 = session.engine.hazards.counts.values().sum();
    let why = match why {
        StopReason::Signal(s) => format!("signal {s}"),
        StopReason::ChildExited | StopReason::Deadline => "the end".into(),
    };
    eprintln!("pinwatch alert: stopped by {why}; {hazards} hazard(s) seen, {} event(s) lost", session.lost_total());
    Ok(0)
}

/// `pinwatch selftest` against this daemon, as a child; its verdict goes to stderr and
/// pinwatch_selftests_total.
fn selftest_at_start(listen: SocketAddr, metrics: &Metrics) -> Result<()> {
    // The daemon may listen on every address: the selftest talks to it on loopback then.
    let mut at = listen;
    if at.ip().is_unspecified() {
        at.set_ip(if at.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let exe = std::env::current_exe().context("finding pinwatch's own binary for the selftest")?;
    let child = tokio::process::Command::new(exe).args(["selftest", "--daemon", &at.to_string()]).stdin(std::process::Stdio::null()).output();
    let (passed, failed) = (metrics.selftest_counter(true), metrics.selftest_counter(false));
    tokio::spawn(async move {
        match child.await {
            Ok(o) => {
                for l in String::from_utf8_lossy(&o.stdout).lines().chain(String::from_utf8_lossy(&o.stderr).lines()) {
                    eprintln!("pinwatch alert: {l}");
                }
                if o.status.success() { passed.inc() } else { failed.inc() };
            }
            Err(e) => {
                eprintln!("pinwatch alert: the selftest could not run: {e}");
                failed.inc();
            }
        }
    });
    Ok(())
}

fn default_listen() -> SocketAddr {
    config::DEFAULT_LISTEN.parse().expect("a valid address")
}

fn window_ns(r: &Rules) -> u64 {
    r.config.alert.collapse_window.as_nanos().min(u64::MAX as u128) as u64
}

/// Tells systemd (Type=notify) the daemon is watching, where NOTIFY_SOCKET says how.
fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: its name begins with a NUL byte.
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(b"READY=1\n", &a))
    } else {
        sock.send_to(b"READY=1\n", std::path::Path::new(&path))
    };
    if let Err(e) = sent {
        log::warn!("telling systemd the daemon is ready (NOTIFY_SOCKET): {e}");
    }
}
