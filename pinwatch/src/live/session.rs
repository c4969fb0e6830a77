//! A live session, shared by the modes that watch the running kernel (record, top):
//! the programs attached, the record stream, the engine, and the periodic work a live
//! run needs besides events: drop counters, re-checking held FOLL_GET references
//! against the kernel's counts, and the limit rules with /proc's figures.

use std::{collections::{BTreeMap, BTreeSet, HashMap}, time::Duration};

use anyhow::{bail, Result};
use pinwatch_common::ProcPins;

use crate::{
    args::LiveArgs,
    kernel::Streaming,
    engine::{
        account::{account, Accounts},
        Engine,
    },
    kernel::{
        load::Sweeper,
        plan::{blind_roles, Choice, Mode, Role},
        procs::{self, ProcInfo},
        stream::{monotonic_ns, LiveSource},
        Kernel,
    },
    trace::{self, Event, Flag, LimitRules, ProcFigures, Procs, Release, Start, Unpin},
};

/// Limit rules, as options of every live mode.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LimitArgs {
    /// Flag pins held longer than this (long_held_pin), e.g. 30s, 5m.
    #[arg(long, value_parser = crate::args::duration)]
    pub max_pin_age: Option<Duration>,
    /// Cap on long-term pinned bytes per process (pin_limit_exceeded), e.g. 64MiB.
    #[arg(long, value_parser = crate::args::bytes)]
    pub max_longterm_process: Option<u64>,
    /// Cap on long-term pinned bytes per cgroup.
    #[arg(long, value_parser = crate::args::bytes)]
    pub max_longterm_cgroup: Option<u64>,
    /// Cap on long-term pinned bytes per user.
    #[arg(long, value_parser = crate::args::bytes)]
    pub max_longterm_user: Option<u64>,
    /// Do not flag processes whose long-term pins exceed their RLIMIT_MEMLOCK.
    #[arg(long)]
    pub no_memlock_rule: bool,
}

impl LimitArgs {
    pub fn rules(&self) -> LimitRules {
        LimitRules::new(self.max_pin_age, self.max_longterm_process, self.max_longterm_cgroup, self.max_longterm_user, !self.no_memlock_rule)
    }
}

/// FOLL_GET references older than this are re-checked against the kernel's counts.
const SWEEP_AFTER_NS: u64 = 1_000_000_000;
/// Folios re-checked per tick at most: each is one test run of a small program.
const SWEEP_MAX: usize = 4096;

pub struct Session {
    pub kernel: Kernel,
    source: LiveSource,
    sweeper: Option<Sweeper>,
    pub engine: Engine,
    start: Event,
    pub mode: Mode,
    /// Lost records, pages and stacks by reason (the `lost` events' reasons).
    pub lost_by_reason: BTreeMap<String, u64>,
    /// The kernel's own figures of the last tick, by pid.
    pub procs: HashMap<u32, ProcInfo>,
    /// GUP activity by pid as the kernel side counted it, at the last tick: what
    /// monitoring knows of the calls it does not stream.
    pub gup: HashMap<u32, GupCounts>,
    /// GUP calls and pages of processes that have ended, since the session started.
    pub gup_ended: GupCounts,
    /// Pins found by the start-up scan, for the first batch or tick to apply.
    found: Vec<Event>,
    /// Ticks left that compare the engine's pins with the kernel's PINS: set when the
    /// ring overflowed, since a lost release would leave its pin held here forever.
    reconcile_ticks: u8,
    /// BLOCK_UNSENT at the last look, and ticks left that compare long-term pins with
    /// the kernel's blocks (this one and the next, once it moved: a pin whose record
    /// was still in the ring at the first is compared at the second).
    block_unsent: u64,
    block_ticks: u8,
}

/// One process's GUP activity from the kernel's counters (PROC_PINS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GupCounts {
    /// GUP calls that took pages, and pages taken, since pinwatch started.
    pub calls: u64,
    pub pages: u64,
    /// Page references held now by calls that were not streamed (transient pins while
    /// monitoring): counted, without a caller or a path.
    pub unstreamed_held: u64,
    /// Pages taken by long-term calls since pinwatch started (the enforced figure).
    #[serde(skip)]
    pub longterm_pages: u64,
}

/// Long-term FOLL_PIN references among `list`: what a page's block may hold.
fn longterm_refs(list: &[crate::engine::pins::HeldPin]) -> u32 {
    list.iter().filter(|h| h.is_pin() && h.flags.contains(&Flag::Longterm)).count() as u32
}

/// What one tick found.
pub struct Tick {
    pub events: Vec<Event>,
    pub accounts: Accounts,
}

/// Quiet (unstreamed) references are charged back, at release, to the folio's latest
/// pinner: when processes share a page, one's release can be charged to another,
/// leaving the first above zero and the other below. The sum stays right; the excess
/// (what the figures below zero add up to) is taken from processes that have exited
/// first, which hold no direct I/O in flight (a pipe's references they left behind are
/// what this gets wrong).
fn charge_back(counts: &mut HashMap<u32, ProcPins>, alive: impl Fn(u32) -> bool) {
    let mut excess: u64 = counts.values().map(|p| (p.quiet_held as i64).min(0).unsigned_abs()).sum();
    let mut pids: Vec<u32> = counts.iter().filter(|(_, p)| (p.quiet_held as i64) > 0).map(|(pid, _)| *pid).collect();
    pids.sort_unstable();
    for pid in pids {
        if excess == 0 {
            break;
        }
        if alive(pid) {
            continue;
        }
        if let Some(p) = counts.get_mut(&pid) {
            let take = excess.min(p.quiet_held);
            p.quiet_held -= take;
            excess -= take;
        }
    }
}

impl Session {
    /// Pins the engine holds that the kernel side no longer does: their release record
    /// was lost to a full ring. Each becomes a `gone` release, so that what is held
    /// comes back to what the kernel holds once a storm ends.
    fn reconcile(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let pfns = self.kernel.pins_absent(self.engine.pins.folio_pfns().into_iter())?;
        log::debug!("reconcile: {} pinned folio(s) the kernel side no longer holds", pfns.len());
        if !pfns.is_empty() {
            let gone = Unpin { ts_ns: monotonic_ns(), pid: 0, tid: 0, comm: String::new(), func: "reconcile".into(), release: Release::Gone, dirty: false, pfns };
            self.apply(Event::Unpin(gone), events);
        }
        Ok(())
    }

    /// Long-term pins of small folios whose unpin the kernel side did not send (while
    /// monitoring, a page only its block held): what the blocks and PINS no longer hold
    /// is released here, as the unpins they were. Whatever is in the ring goes first, so
    /// that a release sent is taken from its record.
    fn settle_blocks(&mut self, events: &mut Vec<Event>) -> Result<()> {
        let mut sent = Vec::new();
        self.source.drain(&mut sent);
        for e in sent {
            self.apply(e, events);
        }
        let pins = &self.engine.pins;
        let mut held = Vec::new();
        pins.for_each_folio(|pfn, list| {
            let n = longterm_refs(list);
            if n > 0 && pins.order(pfn) == 0 {
                held.push((pfn, n));
            }
        });
        self.release_short(&held, events)
    }

    /// Before a page event while unpins went unsent since the last settle: its page may
    /// have been unpinned unsent, freed and taken by someone else within the refresh, and
    /// the hazard must not name the old pinner. Only that page is compared (hazards are
    /// rare); a failed look is logged and the event goes on as it came.
    fn settle_page(&mut self, pfn: u64, events: &mut Vec<Event>) {
        let moved = self.kernel.block_unsent().is_ok_and(|n| n != self.block_unsent);
        if !moved || self.engine.pins.order(pfn) != 0 {
            return;
        }
        let n = longterm_refs(&self.engine.pins.pins_on(pfn));
        if n > 0 {
            if let Err(e) = self.release_short(&[(pfn, n)], events) {
                log::warn!("comparing pfn {pfn} with the kernel's blocks: {e:#}");
            }
        }
    }

    /// Releases, as unpins sent by nobody, the references of `held` the kernel side no
    /// longer holds.
    fn release_short(&mut self, held: &[(u64, u32)], events: &mut Vec<Event>) -> Result<()> {
        let short = self.kernel.pins_short(held)?;
        log::debug!("blocks: {} long-term pinned page(s) compared, {} released unsent", held.len(), short.iter().map(|(_, n)| *n as u64).sum::<u64>());
        if !short.is_empty() {
            let pfns = short.iter().flat_map(|(pfn, n)| std::iter::repeat_n(*pfn, *n as usize)).collect();
            let unpin = Unpin { ts_ns: monotonic_ns(), pid: 0, tid: 0, comm: String::new(), func: "unsent".into(), release: Release::Unpin, dirty: false, pfns };
            self.apply(Event::Unpin(unpin), events);
        }
        Ok(())
    }

    /// Loads and attaches; refuses to run blind, explains tracepoint-only mode.
    /// `enforce`: the mode may enforce a cap (the alert daemon), so the enforcement maps
    /// get their full size.
    pub fn open(live: LiveArgs, limits: &LimitArgs, streaming: Streaming, enforce: bool) -> Result<Session> {
        let args = live.kernel;
        let mut kernel = Kernel::open(&crate::kernel::load::LoadOptions { enforce, ..args.load_options() }, streaming)?;
        crate::kernel::plan::check_mode(&kernel.caps, args.attach).map_err(anyhow::Error::msg)?;
        let mode = kernel.attach()?;
        match mode {
            Mode::Full => {}
            Mode::TracepointOnly => eprintln!("pinwatch: {}", mode.explain()),
            Mode::Blind => {
                let why = kernel
                    .plan
                    .iter()
                    .filter(|h| h.role == Role::Acquire)
                    .find_map(|h| match &h.choice {
                        Choice::Unavailable { reason } => Some(reason.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| "no hook".into());
                bail!(
                    "pinwatch cannot see any GUP entry point on kernel {} ({why}), and no tracepoint hazard hook attached either; nothing to watch. `pinwatch doctor` shows what this kernel allows",
                    kernel.release
                );
            }
        }
        let source = LiveSource::new(&mut kernel)?;
        let sweeper = match kernel.sweeper() {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("{e:#}: FOLL_GET references dropped unseen stay counted until their page is freed");
                None
            }
        };
        let start = Event::Start(Start {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: kernel.release.clone(),
            hooks: kernel.hooks_in_use(),
            mode: mode.name().into(),
            blind: blind_roles(&kernel.plan).iter().map(|r| r.name().to_string()).collect(),
            format: trace::FORMAT.into(),
            limits: Some(limits.rules()),
            pin_map_capacity: Some(kernel.pin_map_capacity),
            pin_block_capacity: Some(kernel.block_capacity),
        });
        // The engine takes its limit rules from the start event, as a replay does.
        let mut engine = Engine::default();
        engine.apply(&start);
        // Pins older than pinwatch: looked for once every hook is armed, so that a pin
        // taken from now on is seen, not found, and a found one's release is seen. Only
        // where GUP calls and their releases can be seen at all.
        let found = if live.no_start_scan || mode != Mode::Full {
            Vec::new()
        } else {
            match crate::kernel::found::scan(&mut kernel) {
                Ok((pins, report)) => {
                    if report.candidates > 0 {
                        eprintln!("pinwatch: {}", report.summary());
                    }
                    pins.into_iter().map(Event::Pin).collect()
                }
                Err(e) => {
                    eprintln!("pinwatch: pins taken before pinwatch started cannot be looked for: {e:#}");
                    Vec::new()
                }
            }
        };
        // Start-up parsed BTF and kallsyms, read verifier logs and scanned for pins;
        // give what was freed back, so that the daemon's resident memory is what it holds.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(Session {
            kernel,
            source,
            sweeper,
            engine,
            start,
            mode,
            lost_by_reason: BTreeMap::new(),
            procs: HashMap::new(),
            gup: HashMap::new(),
            gup_ended: GupCounts::default(),
            found,
            reconcile_ticks: 0,
            block_unsent: 0,
            block_ticks: 0,
        })
    }

    /// New limit rules from here on (alert's reloaded configuration).
    pub fn set_limits(&mut self, rules: LimitRules) {
        self.engine.set_limits(&rules);
        if let Event::Start(s) = &mut self.start {
            s.limits = Some(rules);
        }
    }

    /// GUP activity of every process, living and ended, since the session started.
    pub fn gup_totals(&self) -> GupCounts {
        self.gup.values().fold(self.gup_ended, |t, g| GupCounts {
            calls: t.calls + g.calls,
            pages: t.pages + g.pages,
            unstreamed_held: t.unstreamed_held + g.unstreamed_held,
            longterm_pages: t.longterm_pages + g.longterm_pages,
        })
    }

    /// Records the reader could not decode (a bug, or mismatched builds).
    pub fn undecodable(&self) -> u64 {
        self.source.undecodable
    }

    /// Everything lost so far: records, pages and stacks.
    pub fn lost_total(&self) -> u64 {
        self.lost_by_reason.values().sum()
    }

    /// The trace's first event: what was attached, what cannot be seen, the rules.
    pub fn start_event(&self) -> Event {
        self.start.clone()
    }

    /// Waits for records, then takes all of them. The pins found at start come first,
    /// before any release of theirs.
    pub async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<()> {
        if !self.found.is_empty() {
            out.append(&mut self.found);
            return Ok(());
        }
        self.source.next_batch(out).await
    }

    /// Before a recording's last tick: when the ring ever filled, the engine's pins are
    /// compared with the kernel's once more, however long ago that was (a release lost
    /// late in a storm can still be in flight at the two ticks after it; seen on 7.2).
    pub fn reconcile_at_end(&mut self) {
        if self.lost_by_reason.get("ringbuf_full").is_some_and(|n| *n > 0) {
            self.reconcile_ticks = self.reconcile_ticks.max(1);
        }
    }

    /// Whatever is in the ring now, and calls whose chunks never came.
    pub fn drain(&mut self, out: &mut Vec<Event>) {
        out.append(&mut self.found);
        self.source.drain(out);
        self.source.flush(out);
    }

    /// Feeds an event to the engine; returns it and the hazards it revealed, in the
    /// order a trace holds them.
    pub fn apply(&mut self, e: Event, out: &mut Vec<Event>) {
        if let Event::Lost(l) = &e {
            *self.lost_by_reason.entry(l.reason.clone()).or_default() += l.count;
        }
        if let Event::Page(p) = &e {
            self.settle_page(p.pfn, out);
        }
        let hazards = self.engine.apply(&e);
        out.push(e);
        out.extend(hazards.into_iter().map(Event::Hazard));
    }

    /// Every event of `batch` (emptied) through the engine: the events and the hazards
    /// they revealed, in trace order.
    pub fn apply_batch(&mut self, batch: &mut Vec<Event>) -> Vec<Event> {
        let mut out = Vec::with_capacity(batch.len());
        for e in batch.drain(..) {
            self.apply(e, &mut out);
        }
        out
    }

    /// The periodic work: new drops, a re-check of old FOLL_GET references (their
    /// `gone` records arrive with the next batch), the kernel's own figures, and the
    /// limit rules. `discover` also reads every process charged VmPin or VmLck.
    pub fn tick(&mut self, extra_pids: &BTreeSet<u32>, discover: bool) -> Result<Tick> {
        let mut events = Vec::new();
        for e in std::mem::take(&mut self.found) {
            self.apply(e, &mut events);
        }
        let mut lost = Vec::new();
        self.source.lost(&self.kernel, &mut lost)?;
        if lost.iter().any(|e| matches!(e, Event::Lost(l) if l.reason == "ringbuf_full")) {
            // This tick and the next, when the ring may have emptied.
            self.reconcile_ticks = 2;
        }
        for e in lost {
            self.apply(e, &mut events);
        }
        let now = monotonic_ns();
        if let Some(sw) = self.sweeper.as_mut() {
            let mut old: BTreeSet<u64> = self
                .engine
                .pins
                .iter()
                .filter(|(_, h)| h.flags.contains(&Flag::Get) && now.saturating_sub(h.since_ns) > SWEEP_AFTER_NS)
                .map(|(pfn, _)| pfn)
                .take(SWEEP_MAX)
                .collect();
            // While monitoring, FOLL_GET references the engine was never sent: the
            // kernel side lists them.
            let quiet = self.kernel.old_quiet_gets(now, SWEEP_AFTER_NS, SWEEP_MAX)?;
            log::debug!("tick: re-checking {} FOLL_GET folio(s), {} of them unstreamed", old.len() + quiet.len(), quiet.len());
            old.extend(quiet);
            for pfn in old {
                self.kernel.sweep(sw, pfn);
            }
            // Test runs are synchronous: their `gone` records are in the ring already,
            // and must reach the engine before the limit rules look at what is held.
            let mut gone = Vec::new();
            self.source.drain(&mut gone);
            for e in gone {
                self.apply(e, &mut events);
            }
        }
        let unsent = self.kernel.block_unsent()?;
        if unsent != self.block_unsent {
            self.block_unsent = unsent;
            self.block_ticks = 2;
        }
        if self.block_ticks > 0 {
            self.block_ticks -= 1;
            self.settle_blocks(&mut events)?;
        }
        if self.reconcile_ticks > 0 {
            self.reconcile_ticks -= 1;
            self.reconcile(&mut events)?;
        }
        let accounts = account(&self.engine.pins);
        let (mut counts, ended) = self.kernel.proc_pins()?;
        charge_back(&mut counts, |pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        self.gup = counts
            .into_iter()
            .map(|(pid, p)| {
                let held = (p.quiet_held as i64).max(0) as u64;
                (pid, GupCounts { calls: p.calls, pages: p.pages, unstreamed_held: held, longterm_pages: p.longterm_pages })
            })
            .collect();
        for pid in &ended {
            if let Some(g) = self.gup.remove(pid) {
                self.gup_ended.calls += g.calls;
                self.gup_ended.pages += g.pages;
            }
        }
        let mut pids: BTreeSet<u32> = accounts.processes.keys().copied().collect();
        pids.extend(self.gup.iter().filter(|(_, g)| g.unstreamed_held > 0).map(|(p, _)| *p));
        pids.extend(extra_pids);
        self.procs = procs::snapshot(&pids, discover);
        // The figures the limit rules read become an event: the engine decides on it,
        // and a trace keeps it for the replay. Nothing held and nobody charged: nothing
        // to decide, nothing written.
        if !self.engine.pins.is_empty() || !self.procs.is_empty() {
            let mut figures: Vec<ProcFigures> = self
                .procs
                .iter()
                .map(|(pid, i)| ProcFigures { pid: *pid, kernel: i.kernel })
                .collect();
            figures.sort_by_key(|f| f.pid);
            self.apply(Event::Procs(Procs { ts_ns: monotonic_ns(), procs: figures }), &mut events);
        }
        // A burst (a registration's records, decoded in batches of thousands) leaves
        // free memory between what is held; glibc keeps it resident unless asked.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
        Ok(Tick { events, accounts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(q: i64) -> ProcPins {
        ProcPins { quiet_held: q as u64, ..Default::default() }
    }

    /// Two fio processes share a page: the release of the exited one's reference was
    /// charged to the living one. The exited one shows nothing, the living one none
    /// below zero, and an exited holder beyond the excess keeps its figure.
    #[test]
    fn a_release_charged_to_another_pinner_is_charged_back() {
        let mut c: HashMap<u32, ProcPins> = [(10, held(1)), (11, held(-1)), (12, held(3)), (13, held(2))].into();
        charge_back(&mut c, |pid| pid == 11 || pid == 13);
        let q = |pid: u32| c[&pid].quiet_held as i64;
        assert_eq!((q(10), q(11), q(12), q(13)), (0, -1, 3, 2));
        let sum: i64 = c.values().map(|p| (p.quiet_held as i64).max(0)).sum();
        assert_eq!(sum, 5, "what is shown is what the kernel holds (1 - 1 + 3 + 2)");
    }
}
