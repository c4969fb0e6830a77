//! `pinwatch top`: pinned memory per process, refreshed, with the kernel's own figures
//! beside pinwatch's and the limit rules applied. Interactive on a terminal (sort from
//! the keyboard, q to quit), or batch (`-b -n N -d SECS`, tables or JSON) for scripts.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    io::{IsTerminal as _, Write as _},
    time::Duration,
};

use anyhow::Result;
use comfy_table::{presets::NOTHING, Cell, CellAlignment, Table};
use serde::Serialize;

use crate::{
    args,
    kernel::Streaming,
    live::{
        session::{GupCounts, LimitArgs, Session},
        Live, Wake,
    },
    engine::account::{Accounts, Usage},
    kernel::{
        procs::{self, FollPinCounters, ProcInfo},
        stream::monotonic_ns,
    },
    trace::{Event, Hazard},
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TopOutput {
    #[default]
    #[value(alias = "text")]
    Table,
    Json,
}

/// Columns, in screen order; the key sorts by it in the interactive view.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Column {
    Pid,
    User,
    Comm,
    #[default]
    Pinned,
    Longterm,
    File,
    Write,
    Oldest,
    Vmpin,
    /// VmPin minus LONGTERM: where the kernel and pinwatch disagree.
    Diff,
    Memlock,
    Limit,
    Hazards,
}

impl Column {
    const ALL: [Column; 13] = [
        Column::Pid,
        Column::User,
        Column::Comm,
        Column::Pinned,
        Column::Longterm,
        Column::File,
        Column::Write,
        Column::Oldest,
        Column::Vmpin,
        Column::Diff,
        Column::Memlock,
        Column::Limit,
        Column::Hazards,
    ];

    fn header(self) -> &'static str {
        match self {
            Column::Pid => "PID",
            Column::User => "USER",
            Column::Comm => "COMM",
            Column::Pinned => "PINNED",
            Column::Longterm => "LONGTERM",
            Column::File => "FILE",
            Column::Write => "WRITE",
            Column::Oldest => "OLDEST",
            Column::Vmpin => "VmPin",
            Column::Diff => "DIFF",
            Column::Memlock => "MEMLOCK",
            Column::Limit => "%LIMIT",
            Column::Hazards => "HAZARDS",
        }
    }

    /// The key that sorts by this column (shown in the help line).
    fn key(self) -> char {
        match self {
            Column::Pid => 'n',
            Column::User => 'u',
            Column::Comm => 'c',
            Column::Pinned => 'p',
            Column::Longterm => 'l',
            Column::File => 'f',
            Column::Write => 'w',
            Column::Oldest => 'o',
            Column::Vmpin => 'v',
            Column::Diff => 'd',
            Column::Memlock => 'm',
            Column::Limit => '%',
            Column::Hazards => 'h',
        }
    }
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when top ends (q, Esc, Ctrl-C, SIGTERM, SIGHUP or after -n refreshes); 2 on an error.")]
pub struct TopArgs {
    /// Batch mode: plain output for scripts and pipes, no keyboard.
    #[arg(short = 'b', long)]
    pub batch: bool,
    /// Refreshes to show before exiting, at least 1 (default: until q or Ctrl-C).
    #[arg(short = 'n', long, value_parser = args::count)]
    pub iterations: Option<u64>,
    /// Time between refreshes: 2, 0.5, 500ms, 1m (bare numbers are seconds).
    #[arg(short = 'd', long, value_parser = args::duration, default_value = "2")]
    pub delay: Duration,
    /// Output format: table (text) or json (one document per refresh). `--output` is
    /// the older spelling.
    #[arg(long = "format", visible_alias = "output", value_enum, default_value_t = TopOutput::Table)]
    pub output: TopOutput,
    /// Sort by this column (largest first; names sort A-Z).
    #[arg(short = 's', long, value_enum, default_value_t = Column::Pinned)]
    pub sort: Column,
    /// Show these processes only (a list: -p 1,2 or -p 1 -p 2), with their pins by mapping.
    #[arg(short = 'p', long = "pid", value_delimiter = ',', value_parser = args::pid)]
    pub pids: Vec<u32>,
    /// Show processes whose name contains this.
    #[arg(long)]
    pub comm: Option<String>,
    /// Show processes of this cgroup id.
    #[arg(long)]
    pub cgroup: Option<u64>,
    /// Show processes of this user (name or uid).
    #[arg(long)]
    pub user: Option<String>,
    #[command(flatten)]
    pub kernel: crate::args::LiveArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// One process row: what pinwatch saw beside what the kernel reports.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Row {
    pub pid: u32,
    pub comm: String,
    pub user: String,
    pub uid: u32,
    pub cgroup_id: u64,
    pub pinned_bytes: u64,
    pub pin_bytes: u64,
    pub longterm_bytes: u64,
    pub file_bytes: u64,
    pub write_bytes: u64,
    pub oldest_pin_age_ns: Option<u64>,
    pub vmpin_bytes: u64,
    pub vmlck_bytes: u64,
    pub memlock_limit_bytes: Option<u64>,
    /// Long-term pinned bytes as a share of RLIMIT_MEMLOCK.
    pub limit_pct: Option<f64>,
    pub hazards: u64,
    /// Of pinned_bytes, what transient pins hold now: top does not stream them, the
    /// kernel counts them (no caller, path or entry point known).
    pub unstreamed_bytes: u64,
    /// GUP calls and pages taken since pinwatch started, from the kernel's counters.
    pub gup_calls: u64,
    pub gup_pages: u64,
    /// Bytes by GUP entry point, by its caller, and by subsystem (io_uring, RDMA...).
    pub by_func: BTreeMap<String, u64>,
    pub by_caller: BTreeMap<String, u64>,
    pub by_path: BTreeMap<String, u64>,
    /// Where pinwatch and the kernel disagree, said plainly; None when they agree.
    pub disagreement: Option<String>,
}

/// What the user asked to see.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Empty: every process.
    pub pids: Vec<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<u64>,
    pub user: Option<String>,
}

impl Filter {
    fn keeps(&self, r: &Row) -> bool {
        (self.pids.is_empty() || self.pids.contains(&r.pid))
            && self.comm.as_ref().is_none_or(|c| r.comm.contains(c.as_str()))
            && self.cgroup.is_none_or(|c| c == r.cgroup_id)
            && self.user.as_ref().is_none_or(|u| *u == r.user || *u == r.uid.to_string())
    }
}

/// Why VmPin and what pinwatch saw can differ (README: "pinwatch and the kernel").
fn disagreement(u: &Usage, k: Option<&ProcInfo>) -> Option<String> {
    let vmpin = k.map(|k| k.kernel.vmpin_bytes).unwrap_or(0);
    let lt = u.longterm_bytes;
    if vmpin == lt {
        return None;
    }
    Some(if vmpin > lt {
        format!("VmPin {} more than seen: pins older than pinwatch, or not visible here", human(vmpin - lt))
    } else if vmpin == 0 && k.is_some_and(|k| k.kernel.vmlck_bytes >= lt) {
        "long-term pins not charged to VmPin; VmLck covers them (VFIO charges VmLck)".to_string()
    } else if vmpin == 0 {
        "long-term pins not charged to VmPin (CAP_IPC_LOCK on 7.x, VFIO charges VmLck, or the caller charges nothing)".to_string()
    } else {
        format!("{} long-term pinned not charged to VmPin", human(lt - vmpin))
    })
}

/// Rows for every process pinwatch saw pinning or the kernel charges pins or locks to.
pub fn rows(
    acc: &Accounts,
    procs: &HashMap<u32, ProcInfo>,
    gup: &HashMap<u32, GupCounts>,
    hazards: &HashMap<u32, u64>,
    now_ns: u64,
    user_name: &mut dyn FnMut(u32) -> String,
) -> Vec<Row> {
    let mut pids: BTreeSet<u32> = acc.processes.keys().copied().collect();
    pids.extend(procs.iter().filter(|(_, i)| i.kernel.vmpin_bytes > 0 || i.kernel.vmlck_bytes > 0).map(|(p, _)| *p));
    pids.extend(gup.iter().filter(|(_, g)| g.unstreamed_held > 0).map(|(p, _)| *p));
    pids.into_iter()
        .map(|pid| {
            let seen = acc.processes.get(&pid);
            let k = procs.get(&pid);
            let g = gup.get(&pid).copied().unwrap_or_default();
            let unstreamed = g.unstreamed_held * crate::engine::account::PAGE_SIZE;
            let u = seen.map(|p| p.usage.clone()).unwrap_or_default();
            let uid = seen.map(|p| p.uid).or(k.map(|k| k.uid)).unwrap_or(0);
            let memlock = k.and_then(|k| k.kernel.memlock_limit_bytes);
            Row {
                pid,
                comm: k.map(|k| k.comm.clone()).filter(|c| !c.is_empty()).or(seen.map(|p| p.comm.clone())).unwrap_or_default(),
                user: user_name(uid),
                uid,
                cgroup_id: seen.map(|p| p.cgroup_id).unwrap_or(0),
                pinned_bytes: u.pinned_bytes + unstreamed,
                pin_bytes: u.pin_bytes,
                longterm_bytes: u.longterm_bytes,
                file_bytes: u.file_bytes,
                write_bytes: u.write_bytes,
                oldest_pin_age_ns: u.oldest_age_ns(now_ns),
                vmpin_bytes: k.map(|k| k.kernel.vmpin_bytes).unwrap_or(0),
                vmlck_bytes: k.map(|k| k.kernel.vmlck_bytes).unwrap_or(0),
                memlock_limit_bytes: memlock,
                limit_pct: memlock.filter(|m| *m > 0).map(|m| 100.0 * u.longterm_bytes as f64 / m as f64),
                hazards: hazards.get(&pid).copied().unwrap_or(0),
                unstreamed_bytes: unstreamed,
                gup_calls: g.calls,
                gup_pages: g.pages,
                disagreement: disagreement(&u, k),
                by_caller: u.by_caller,
                by_func: u.by_func,
                by_path: u.by_path,
            }
        })
        .collect()
}

pub fn sort(rows: &mut [Row], by: Column, reverse: bool) {
    use std::cmp::Ordering;
    let f = |x: f64| if x.is_nan() { 0.0 } else { x };
    rows.sort_by(|a, b| {
        let o = match by {
            Column::Pid => a.pid.cmp(&b.pid),
            Column::User => a.user.cmp(&b.user),
            Column::Comm => a.comm.cmp(&b.comm),
            // Numbers: largest first.
            Column::Pinned => b.pinned_bytes.cmp(&a.pinned_bytes),
            Column::Longterm => b.longterm_bytes.cmp(&a.longterm_bytes),
            Column::File => b.file_bytes.cmp(&a.file_bytes),
            Column::Write => b.write_bytes.cmp(&a.write_bytes),
            Column::Oldest => b.oldest_pin_age_ns.cmp(&a.oldest_pin_age_ns),
            Column::Vmpin => b.vmpin_bytes.cmp(&a.vmpin_bytes),
            Column::Diff => b.vmpin_diff().unsigned_abs().cmp(&a.vmpin_diff().unsigned_abs()),
            Column::Memlock => b.memlock_limit_bytes.unwrap_or(u64::MAX).cmp(&a.memlock_limit_bytes.unwrap_or(u64::MAX)),
            Column::Limit => f(b.limit_pct.unwrap_or(0.0)).partial_cmp(&f(a.limit_pct.unwrap_or(0.0))).unwrap_or(Ordering::Equal),
            Column::Hazards => b.hazards.cmp(&a.hazards),
        };
        let o = o.then(a.pid.cmp(&b.pid));
        if reverse { o.reverse() } else { o }
    });
}

impl Row {
    /// VmPin minus the long-term bytes pinwatch saw: positive when the kernel charges
    /// more (pins older than pinwatch, or unseen), negative when it charges less.
    pub fn vmpin_diff(&self) -> i64 {
        self.vmpin_bytes as i64 - self.longterm_bytes as i64
    }
}

/// "=" when they agree, else the signed difference.
fn diff(d: i64) -> String {
    match d {
        0 => "=".into(),
        d if d > 0 => format!("+{}", human(d as u64)),
        d => format!("-{}", human(d.unsigned_abs())),
    }
}

pub fn human(bytes: u64) -> String {
    const K: f64 = 1024.0;
    let b = bytes as f64;
    if bytes < 1024 {
        format!("{bytes}B")
    } else if b < K * K {
        format!("{:.0}K", b / K)
    } else if b < K * K * K {
        format!("{:.1}M", b / K / K)
    } else {
        format!("{:.1}G", b / K / K / K)
    }
}

fn age(ns: Option<u64>) -> String {
    match ns {
        None => "-".into(),
        Some(ns) if ns < 1_000_000_000 => format!("{}ms", ns / 1_000_000),
        Some(ns) if ns < 120_000_000_000 => format!("{:.1}s", ns as f64 / 1e9),
        Some(ns) if ns < 7_200_000_000_000 => format!("{}m", ns / 60_000_000_000),
        Some(ns) => format!("{}h", ns / 3_600_000_000_000),
    }
}

/// The table of rows, with the sort column marked.
pub fn render(rows: &[Row], by: Column, width: Option<u16>) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    if let Some(w) = width {
        t.set_width(w);
    }
    t.set_header(Column::ALL.iter().map(|c| {
        let h = if *c == by { format!("{}*", c.header()) } else { c.header().to_string() };
        Cell::new(h)
    }));
    for r in rows {
        let cells = [
            r.pid.to_string(),
            r.user.clone(),
            r.comm.clone(),
            human(r.pinned_bytes),
            human(r.longterm_bytes),
            human(r.file_bytes),
            human(r.write_bytes),
            age(r.oldest_pin_age_ns),
            human(r.vmpin_bytes),
            diff(r.vmpin_diff()),
            r.memlock_limit_bytes.map(human).unwrap_or_else(|| "unlim".into()),
            r.limit_pct.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "-".into()),
            r.hazards.to_string(),
        ];
        t.add_row(cells.into_iter().enumerate().map(|(i, c)| {
            let cell = Cell::new(c);
            if (3..13).contains(&i) { cell.set_alignment(CellAlignment::Right) } else { cell }
        }));
    }
    t.to_string()
}

#[derive(Serialize)]
struct Doc<'a> {
    ts_ns: u64,
    kernel: &'a str,
    mode: &'a str,
    sort: Column,
    processes: &'a [Row],
    totals: Totals,
    cgroups: BTreeMap<u64, Usage>,
    users: BTreeMap<String, Usage>,
    lost_events: u64,
    /// Lost records, pages and stacks by reason (pin_map_full: pins not watched).
    lost_by_reason: &'a BTreeMap<String, u64>,
    /// Folios the kernel-side pin map holds.
    pin_map_capacity: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    foll_pin: Option<FollPinCounters>,
    /// Every hazard since top started, by kind.
    hazards_by_kind: &'a BTreeMap<crate::trace::HazardKind, u64>,
    recent_hazards: Vec<&'a Hazard>,
}

#[derive(Serialize)]
struct Totals {
    #[serde(flatten)]
    usage: Usage,
    vmpin_bytes: u64,
    vmlck_bytes: u64,
    processes: usize,
    /// Held now by transient pins, counted by the kernel and not streamed (not part of
    /// the usage figures above, which are what pinwatch saw pin by pin).
    unstreamed_bytes: u64,
    /// GUP calls and pages since pinwatch started, every process.
    gup_calls: u64,
    gup_pages: u64,
}

/// Hazards per pinner pid, and the most recent ones for the footer.
#[derive(Default)]
struct HazardLog {
    by_pid: HashMap<u32, u64>,
    recent: VecDeque<Hazard>,
}

impl HazardLog {
    fn add(&mut self, h: &Hazard) {
        let pids: BTreeSet<u32> = match &h.pinner {
            crate::trace::Pinners::One(p) => p.pid.into_iter().collect(),
            crate::trace::Pinners::Many(v) => v.iter().filter_map(|p| p.pid).collect(),
        };
        for p in pids {
            *self.by_pid.entry(p).or_default() += 1;
        }
        self.recent.push_back(h.clone());
        if self.recent.len() > 5 {
            self.recent.pop_front();
        }
    }
}

/// Restores the terminal however the view ends: q, Ctrl-C, an error or a panic.
struct Screen;

impl Screen {
    fn enter() -> Result<Screen> {
        crossterm::terminal::enable_raw_mode()?;
        crossterm::execute!(std::io::stdout(), crossterm::terminal::EnterAlternateScreen, crossterm::cursor::Hide)?;
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            Screen::restore();
            prev(info);
        }));
        Ok(Screen)
    }

    fn restore() {
        let _ = crossterm::execute!(std::io::stdout(), crossterm::cursor::Show, crossterm::terminal::LeaveAlternateScreen);
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        Screen::restore();
    }
}

enum Key {
    Quit,
    Sort(Column),
    Next,
    Prev,
    Reverse,
    Other,
}

fn key(ev: crossterm::event::KeyEvent) -> Key {
    use crossterm::event::{KeyCode, KeyModifiers};
    match ev.code {
        KeyCode::Char('c') if ev.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        KeyCode::Char('q') | KeyCode::Char('Q') | KeyCode::Esc => Key::Quit,
        KeyCode::Char('>') | KeyCode::Right => Key::Next,
        KeyCode::Char('<') | KeyCode::Left => Key::Prev,
        KeyCode::Char('r') | KeyCode::Char('R') => Key::Reverse,
        KeyCode::Char(c) => Column::ALL.iter().find(|col| col.key() == c.to_ascii_lowercase()).map(|c| Key::Sort(*c)).unwrap_or(Key::Other),
        _ => Key::Other,
    }
}

pub async fn run(args: TopArgs) -> Result<i32> {
    let signals = Live::signals()?;
    let session = Session::open(args.kernel, &args.limits, Streaming::Monitor, false)?;
    let mut live = Live::new(session, signals, args.delay, None);
    let interactive = !args.batch && args.output == TopOutput::Table && std::io::stdout().is_terminal();
    let filter = Filter { pids: args.pids.clone(), comm: args.comm.clone(), cgroup: args.cgroup, user: args.user.clone() };
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut user_name = move |uid: u32| names.entry(uid).or_insert_with(|| procs::user_name(uid)).clone();
    let (keys_tx, mut keys) = tokio::sync::mpsc::unbounded_channel();
    let screen = if interactive {
        let s = Screen::enter()?;
        // crossterm's reader blocks: it lives on its own thread and ends with the process.
        std::thread::spawn(move || {
            while let Ok(ev) = crossterm::event::read() {
                if let crossterm::event::Event::Key(k) = ev {
                    if keys_tx.send(k).is_err() {
                        break;
                    }
                }
            }
        });
        Some(s)
    } else {
        None
    };
    let mut sort_by = args.sort;
    let mut reverse = false;
    let mut log = HazardLog::default();
    let mut shown = 0u64;
    let mut batch = Vec::new();
    let mut redraw = false;
    let mut last: Option<(Vec<Row>, Accounts)> = None;
    let wanted: BTreeSet<u32> = filter.pids.iter().copied().collect();
    loop {
        tokio::select! {
            wake = live.next(&mut batch) => match wake? {
                Wake::Records | Wake::Reload | Wake::User1 => {}
                Wake::Tick => {
                    let tick = live.session.tick(&wanted, true)?;
                    for e in &tick.events {
                        if let Event::Hazard(h) = e { log.add(h); }
                    }
                    let rows = rows(&tick.accounts, &live.session.procs, &live.session.gup, &log.by_pid, monotonic_ns(), &mut user_name);
                    last = Some((rows, tick.accounts));
                    redraw = true;
                }
                Wake::Stop(_) => break,
            },
            k = keys.recv(), if interactive => {
                match k.map(key) {
                    None | Some(Key::Quit) => break,
                    Some(Key::Sort(c)) => sort_by = c,
                    Some(Key::Next) => sort_by = Column::ALL[(Column::ALL.iter().position(|c| *c == sort_by).unwrap_or(0) + 1) % Column::ALL.len()],
                    Some(Key::Prev) => sort_by = Column::ALL[(Column::ALL.iter().position(|c| *c == sort_by).unwrap_or(0) + Column::ALL.len() - 1) % Column::ALL.len()],
                    Some(Key::Reverse) => reverse = !reverse,
                    Some(Key::Other) => {}
                }
                redraw = true;
            }
        }
        let session = &mut live.session;
        for e in &session.apply_batch(&mut batch) {
            if let Event::Hazard(h) = e {
                log.add(h);
            }
        }
        if !redraw {
            continue;
        }
        redraw = false;
        let Some((all, acc)) = &last else { continue };
        let mut view: Vec<Row> = all.iter().filter(|r| filter.keeps(r)).cloned().collect();
        sort(&mut view, sort_by, reverse);
        let text = match args.output {
            TopOutput::Json => serde_json::to_string(&doc(session, &view, acc, sort_by, &log, &mut user_name))?,
            TopOutput::Table => screen_text(session, &view, acc, sort_by, reverse, &log, &filter.pids, interactive),
        };
        let mut stdout = std::io::stdout().lock();
        if interactive {
            crossterm::queue!(stdout, crossterm::terminal::Clear(crossterm::terminal::ClearType::All), crossterm::cursor::MoveTo(0, 0))?;
            // Raw mode: lines need a carriage return as well.
            write!(stdout, "{}", text.replace('\n', "\r\n"))?;
        } else {
            writeln!(stdout, "{text}")?;
            if args.output == TopOutput::Table {
                writeln!(stdout)?;
            }
        }
        stdout.flush()?;
        shown += 1;
        if args.iterations.is_some_and(|n| shown >= n) {
            break;
        }
    }
    drop(screen);
    Ok(0)
}

fn doc<'a>(s: &'a Session, rows: &'a [Row], acc: &Accounts, sort: Column, log: &'a HazardLog, user_name: &mut dyn FnMut(u32) -> String) -> Doc<'a> {
    let gup = s.gup_totals();
    Doc {
        ts_ns: monotonic_ns(),
        kernel: &s.kernel.release,
        mode: s.mode.name(),
        sort,
        processes: rows,
        totals: Totals {
            usage: acc.totals.clone(),
            vmpin_bytes: s.procs.values().map(|p| p.kernel.vmpin_bytes).sum(),
            vmlck_bytes: s.procs.values().map(|p| p.kernel.vmlck_bytes).sum(),
            processes: rows.len(),
            unstreamed_bytes: gup.unstreamed_held * crate::engine::account::PAGE_SIZE,
            gup_calls: gup.calls,
            gup_pages: gup.pages,
        },
        cgroups: acc.cgroups.clone(),
        users: acc.users.iter().map(|(uid, u)| (user_name(*uid), u.clone())).collect(),
        lost_events: s.lost_total(),
        lost_by_reason: &s.lost_by_reason,
        pin_map_capacity: s.kernel.pin_map_capacity,
        foll_pin: procs::foll_pin_counters(),
        hazards_by_kind: &s.engine.hazards.counts,
        recent_hazards: log.recent.iter().collect(),
    }
}

#[allow(clippy::too_many_arguments)]
fn screen_text(s: &Session, rows: &[Row], acc: &Accounts, sort: Column, reverse: bool, log: &HazardLog, pids: &[u32], interactive: bool) -> String {
    let t = &acc.totals;
    let mut out = format!(
        "pinwatch top - {} - mode {} - hooks {} - lost events {}\n",
        s.kernel.release,
        s.mode.name(),
        s.kernel.hooks_in_use().len(),
        s.lost_total()
    );
    let unstreamed = s.gup_totals().unstreamed_held * crate::engine::account::PAGE_SIZE;
    out += &format!(
        "pinned {} (FOLL_PIN {}, long-term {}, file {}, write {}, transient {unstreamed_h}) by {} process(es); kernel VmPin {} VmLck {}",
        human(t.pinned_bytes + unstreamed),
        human(t.pin_bytes),
        human(t.longterm_bytes),
        human(t.file_bytes),
        human(t.write_bytes),
        acc.processes.len(),
        human(s.procs.values().map(|p| p.kernel.vmpin_bytes).sum()),
        human(s.procs.values().map(|p| p.kernel.vmlck_bytes).sum()),
        unstreamed_h = human(unstreamed),
    );
    if let Some(c) = procs::foll_pin_counters() {
        out += &format!("; FOLL_PIN held system-wide {}", human(4096 * (c.nr_foll_pin_acquired - c.nr_foll_pin_released).max(0) as u64));
    }
    out += "\n";
    if let Some(n) = s.lost_by_reason.get("pin_map_full") {
        out += &format!(
            "pin map full: {n} page(s) not watched for hazards (capacity {} folios and {} blocks of 32 long-term pages, {} folios held now; --pin-map-capacity and --pin-block-capacity set them)\n",
            s.kernel.pin_map_capacity,
            s.kernel.block_capacity,
            s.engine.pins.folios()
        );
    }
    if s.mode != crate::kernel::plan::Mode::Full {
        out += "tracepoint-only mode: GUP calls are not visible here, so PINNED stays empty; VmPin is the kernel's own figure\n";
    }
    let width = if interactive { crossterm::terminal::size().ok().map(|(w, _)| w) } else { None };
    out += &render(rows, sort, width);
    out += "\n";
    for r in rows.iter().filter(|r| r.disagreement.is_some()).take(3) {
        out += &format!("note: pid {} ({}): {}\n", r.pid, r.comm, r.disagreement.as_deref().unwrap_or(""));
    }
    for &pid in pids {
        if let Some(r) = rows.iter().find(|r| r.pid == pid) {
            let list = |m: &BTreeMap<String, u64>| {
                let v: Vec<String> = m.iter().map(|(c, b)| format!("{c} {}", human(*b))).collect();
                if v.is_empty() { "-".to_string() } else { v.join(", ") }
            };
            out += &format!("pins of pid {pid} by path: {}; by caller: {}\n", list(&r.by_path), list(&r.by_caller));
        }
        out += &mappings(s, pid);
    }
    if !log.recent.is_empty() {
        out += "recent hazards:\n";
        for h in log.recent.iter().rev() {
            out += &format!(
                "  {:<22} {:<8} pfn {} pinner {} actor {} {}\n",
                h.kind.name(),
                h.severity.name(),
                h.pfn.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                h.pinner_summary(),
                h.actor.pid,
                h.actor.comm
            );
        }
    }
    if interactive {
        let keys: Vec<String> = Column::ALL.iter().map(|c| format!("{} {}", c.key(), c.header())).collect();
        out += &format!("sort: {}{} | < > move, r reverse, q quit | {}\n", sort.header(), if reverse { " (reversed)" } else { "" }, keys.join(", "));
    }
    out
}

/// `-p PID`: that process's pins by mapping, with the file from /proc/PID/maps.
fn mappings(s: &Session, pid: u32) -> String {
    let maps = match procfs::process::Process::new(pid as i32).and_then(|p| p.maps()) {
        Ok(m) => m,
        Err(procfs::ProcError::NotFound(_)) => return format!("pid {pid}: no such process\n"),
        Err(e) => return format!("pid {pid}: /proc/{pid}/maps unreadable: {e}\n"),
    };
    let mut by_map: BTreeMap<(u64, u64), (String, u64)> = BTreeMap::new();
    for (_, h) in s.engine.pins.iter().filter(|(_, h)| h.pid == pid) {
        let Some(m) = maps.iter().find(|m| m.address.0 <= h.addr && h.addr < m.address.1) else { continue };
        let name = match &m.pathname {
            procfs::process::MMapPath::Path(p) => p.display().to_string(),
            other => format!("{other:?}"),
        };
        by_map.entry(m.address).or_insert((name, 0)).1 += 4096;
    }
    let mut out = format!("pins of pid {pid} by mapping:\n");
    for ((start, end), (name, bytes)) in by_map {
        out += &format!("  {start:012x}-{end:012x} {:>8} {name}\n", human(bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{engine::{account::account, PinTable}, trace::KernelProc};
    use crate::trace::{Flag, Pin};

    fn table(events: &[(u32, &[Flag], usize)]) -> Accounts {
        let mut t = PinTable::default();
        let mut pfn = 0;
        for (pid, flags, n) in events {
            let pfns: Vec<u64> = (0..*n as u64).map(|i| pfn + i).collect();
            pfn += *n as u64;
            t.apply(&Event::Pin(Pin { pid: *pid, comm: format!("p{pid}"), flags: flags.to_vec(), pfns, ..Default::default() }));
        }
        account(&t)
    }

    fn info(vmpin: u64, memlock: Option<u64>) -> ProcInfo {
        ProcInfo { comm: String::new(), uid: 0, kernel: KernelProc { vmpin_bytes: vmpin, vmlck_bytes: 0, memlock_limit_bytes: memlock } }
    }

    #[test]
    fn rows_put_the_kernel_beside_pinwatch() {
        let acc = table(&[(1, &[Flag::Pin, Flag::Longterm, Flag::Write], 256), (2, &[Flag::Get, Flag::Write], 2)]);
        let procs: HashMap<u32, ProcInfo> = [(1, info(1 << 20, Some(64 << 10))), (3, info(8192, None))].into();
        let r = rows(&acc, &procs, &HashMap::new(), &[(1, 4)].into(), 0, &mut |u| format!("u{u}"));
        assert_eq!(r.iter().map(|r| r.pid).collect::<Vec<_>>(), vec![1, 2, 3], "pid 3: VmPin only, pins older than pinwatch");
        assert_eq!(r[0].longterm_bytes, 1 << 20);
        assert_eq!(r[0].vmpin_bytes, 1 << 20);
        assert_eq!(r[0].disagreement, None);
        assert_eq!(r[0].limit_pct, Some(1600.0));
        assert_eq!(r[0].hazards, 4);
        assert!(r[2].disagreement.as_deref().unwrap().contains("more than seen"));
        // The DIFF column: VmPin minus LONGTERM, "=" where they agree.
        assert_eq!([r[0].vmpin_diff(), r[1].vmpin_diff(), r[2].vmpin_diff()], [0, 0, 8192]);
        assert_eq!([diff(0), diff(8192), diff(-(1 << 20))], ["=", "+8K", "-1.0M"].map(String::from));
        let mut by_diff = r.clone();
        sort(&mut by_diff, Column::Diff, false);
        assert_eq!(by_diff[0].pid, 3);
        // Direct I/O charges nothing to VmPin and takes no long-term pins: no disagreement.
        assert_eq!(r[1].disagreement, None);
    }

    #[test]
    fn vfio_pins_are_said_to_be_charged_to_vmlck() {
        let acc = table(&[(1, &[Flag::Pin, Flag::Longterm, Flag::Write], 256), (2, &[Flag::Pin, Flag::Longterm, Flag::Write], 256)]);
        let vfio = ProcInfo { kernel: KernelProc { vmlck_bytes: 1 << 20, ..info(0, None).kernel }, ..info(0, None) };
        let procs: HashMap<u32, ProcInfo> = [(1, vfio), (2, info(0, None))].into();
        let r = rows(&acc, &procs, &HashMap::new(), &HashMap::new(), 0, &mut |u| u.to_string());
        assert!(r[0].disagreement.as_deref().unwrap().contains("VmLck covers them"), "{:?}", r[0].disagreement);
        assert!(r[1].disagreement.as_deref().unwrap().contains("caller charges nothing"), "{:?}", r[1].disagreement);
    }

    #[test]
    fn sorting_and_filters() {
        let acc = table(&[(1, &[Flag::Pin], 1), (2, &[Flag::Pin, Flag::Longterm], 3), (3, &[Flag::Get], 2)]);
        let mut r = rows(&acc, &HashMap::new(), &HashMap::new(), &HashMap::new(), 0, &mut |u| u.to_string());
        sort(&mut r, Column::Pinned, false);
        assert_eq!(r.iter().map(|r| r.pid).collect::<Vec<_>>(), vec![2, 3, 1]);
        sort(&mut r, Column::Pinned, true);
        assert_eq!(r.iter().map(|r| r.pid).collect::<Vec<_>>(), vec![1, 3, 2]);
        sort(&mut r, Column::Comm, false);
        assert_eq!(r.iter().map(|r| r.pid).collect::<Vec<_>>(), vec![1, 2, 3]);
        let f = Filter { comm: Some("p3".into()), ..Default::default() };
        assert_eq!(r.iter().filter(|x| f.keeps(x)).count(), 1);
        let f = Filter { pids: vec![1, 3], ..Default::default() };
        assert_eq!(r.iter().filter(|x| f.keeps(x)).map(|x| x.pid).collect::<Vec<_>>(), vec![1, 3]);
        let text = render(&r, Column::Comm, None);
        assert!(text.contains("COMM*") && text.contains("LONGTERM") && text.contains("%LIMIT"), "{text}");
    }

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        top: TopArgs,
    }

    fn parse(args: &[&str]) -> Result<TopArgs, String> {
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("top").chain(args.iter().copied())).map(|c| c.top).map_err(|e| e.to_string())
    }

    #[test]
    fn options_are_checked_before_anything_attaches() {
        let t = parse(&["-p", "1,2", "-p", "3", "-d", "500ms", "-n", "2"]).unwrap();
        assert_eq!(t.pids, vec![1, 2, 3]);
        assert_eq!(t.delay, Duration::from_millis(500));
        assert_eq!(t.iterations, Some(2));
        assert_eq!(parse(&[]).unwrap().delay, Duration::from_secs(2));
        assert_eq!(parse(&["-d", "0.5"]).unwrap().delay, Duration::from_millis(500));
        for bad in [&["-n", "0"][..], &["-d", "inf"], &["-d=-1"], &["-d", "nan"], &["-d", "0"], &["-p", "0"], &["-p", "x"]] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
        // One spelling for machine output across commands; the old one still works.
        assert_eq!(parse(&["--format", "json"]).unwrap().output, TopOutput::Json);
        assert_eq!(parse(&["--output", "json"]).unwrap().output, TopOutput::Json);
        assert_eq!(parse(&["--format", "text"]).unwrap().output, TopOutput::Table);
    }
}
