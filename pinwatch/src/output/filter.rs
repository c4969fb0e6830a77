//! What to look at in a trace, shared by report, its stories and export: processes,
//! names, a file (by device and inode, or by path), hazard kinds and a time window.
//! The filter learns as the trace streams by (a path becomes device:inode pairs once a
//! pin names it; the pages pinned from the file stay the file's after a truncate).

use std::{
    collections::{BTreeSet, HashSet},
    time::Duration,
};

use crate::{
    args,
    trace::{Event, FileRef, Hazard, HazardKind},
};

/// What to look at, shared by report and export.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only hazards whose pinner or actor is one of these processes (a list).
    #[arg(long = "pid", value_delimiter = ',', value_parser = args::pid)]
    pub pids: Vec<u32>,
    /// Only hazards whose pinner or actor name contains this.
    #[arg(long)]
    pub comm: Option<String>,
    /// Only hazards on this file: DEV:INO as the trace writes it (254:0:12), or a path
    /// (as the pinner mapped it, or as it is on this machine).
    #[arg(long)]
    pub file: Option<String>,
    /// Only hazards of these kinds (a list: truncate_while_pinned,dirty_after_unmap).
    #[arg(long = "kind", value_delimiter = ',', value_parser = parse_kind)]
    pub kinds: Vec<HazardKind>,
    /// Only what happened this long after the trace began (30s, 2m, 1.5).
    #[arg(long, value_parser = since_parser)]
    pub since: Option<Duration>,
    /// Only what happened before this long after the trace began.
    #[arg(long, value_parser = args::duration)]
    pub until: Option<Duration>,
}

pub fn parse_kind(s: &str) -> Result<HazardKind, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
        let all: Vec<&str> = HazardKind::ALL.iter().map(|k| k.name()).collect();
        format!("{s:?} is not a hazard kind: one of {}", all.join(", "))
    })
}

/// `--since 0` is meaningful (from the start), unlike a zero refresh delay.
fn since_parser(s: &str) -> Result<Duration, String> {
    if humantime::parse_duration(s.trim()).is_ok_and(|d| d.is_zero()) || s.trim().parse::<f64>().is_ok_and(|x| x == 0.0) {
        return Ok(Duration::ZERO);
    }
    args::duration(s)
}

/// The filters, resolved as the trace streams by (a path becomes device:inode pairs
/// once a pin names it).
pub struct Filter {
    args: FilterArgs,
    /// The file asked for, as (dev, ino): parsed, stat()ed here, or learnt from pins.
    files: BTreeSet<(String, u64)>,
    /// Pages pinned from the file asked for: a hazard on one that has left the file
    /// (truncated, then dirtied) is still about the file.
    pfns: HashSet<u64>,
    first_ts: Option<u64>,
}

impl Filter {
    pub fn new(args: &FilterArgs) -> Filter {
        let mut files = BTreeSet::new();
        if let Some(f) = &args.file {
            match f.rsplit_once(':').and_then(|(dev, ino)| Some((dev, ino.parse::<u64>().ok()?))) {
                Some((dev, ino)) if dev.contains(':') => {
                    files.insert((dev.to_string(), ino));
                }
                _ => {
                    // A path that exists here gives its device and inode too.
                    if let Ok(m) = std::fs::metadata(f) {
                        use std::os::unix::fs::MetadataExt as _;
                        let dev = m.dev();
                        files.insert((format!("{}:{}", libc::major(dev), libc::minor(dev)), m.ino()));
                    }
                }
            }
        }
        Filter { args: args.clone(), files, pfns: HashSet::new(), first_ts: None }
    }

    /// Sees every event: the trace's start time, and paths that pins give to files.
    pub fn observe(&mut self, e: &Event) {
        if let Some(ts) = e.ts_ns() {
            self.first_ts.get_or_insert(ts);
        }
        if let (Some(f), Event::Pin(p)) = (&self.args.file, e) {
            let Some(pf) = &p.file else { return };
            if Some(f) == pf.path.as_ref() {
                self.files.insert((pf.dev.clone(), pf.ino));
            }
            if self.files.contains(&(pf.dev.clone(), pf.ino)) {
                self.pfns.extend(p.pfns.iter().take(p.file_pages as usize));
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        let a = &self.args;
        a.pids.is_empty() && a.comm.is_none() && a.file.is_none() && a.kinds.is_empty() && a.since.is_none() && a.until.is_none()
    }

    /// Seconds since the trace began.
    pub fn rel_s(&self, ts_ns: u64) -> f64 {
        ts_ns.saturating_sub(self.first_ts.unwrap_or(ts_ns)) as f64 / 1e9
    }

    pub fn in_time(&self, ts_ns: u64) -> bool {
        let rel = Duration::from_nanos(ts_ns.saturating_sub(self.first_ts.unwrap_or(ts_ns)));
        self.args.since.is_none_or(|s| rel >= s) && self.args.until.is_none_or(|u| rel <= u)
    }

    pub fn file_matches(&self, f: Option<&FileRef>) -> bool {
        self.args.file.is_none() || f.is_some_and(|f| self.files.contains(&(f.dev.clone(), f.ino)))
    }

    pub fn pid_matches(&self, pid: u32) -> bool {
        self.args.pids.is_empty() || self.args.pids.contains(&pid)
    }

    pub fn comm_matches(&self, comm: &str) -> bool {
        self.args.comm.as_ref().is_none_or(|c| comm.contains(c.as_str()))
    }

    fn hazard_file_matches(&self, h: &Hazard) -> bool {
        self.file_matches(h.file.as_ref()) || (h.file.is_none() && h.pfn.is_some_and(|p| self.pfns.contains(&p)))
    }

    pub fn keeps(&self, h: &Hazard) -> bool {
        let pinners = h.pinner_list();
        let who = |p: &dyn Fn(u32, &str) -> bool| p(h.actor.pid, &h.actor.comm) || pinners.iter().any(|x| p(x.pid.unwrap_or(0), x.comm.as_deref().unwrap_or("")));
        (self.args.kinds.is_empty() || self.args.kinds.contains(&h.kind))
            && self.in_time(h.ts_ns)
            && self.hazard_file_matches(h)
            && (self.args.pids.is_empty() || who(&|pid, _| self.pid_matches(pid)))
            && (self.args.comm.is_none() || who(&|_, c| self.comm_matches(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_zero_and_until_does_not() {
        for zero in ["0", "0s", "0ms", "0.0"] {
            assert_eq!(since_parser(zero), Ok(Duration::ZERO), "{zero}");
        }
        assert_eq!(since_parser("1.5"), Ok(Duration::from_millis(1500)));
        assert!(since_parser("-1").is_err());
        assert!(args::duration("0").is_err());
    }
}
