//! The flight recorder: the daemon keeps the last `window` (at most `max_size` bytes) of
//! the events it saw, as trace lines, and on a trigger (a hazard of the configured
//! severity and kinds, or SIGUSR1) writes an incident bundle: the window as a replayable
//! trace, the hazard, doctor's JSON, the kernel, the pinner's and the actor's /proc status
//! and maps, in a directory of its own (0700, files 0600). Bundles are bounded in number,
//! oldest removed first.
//!
//! A window replays only with the pins its hazards collide with: a pin record that ages
//! out of the window while its pages are still held is kept aside until they are
//! released, and goes first in the bundle's trace.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    engine::PinTable,
    trace::{Event, Hazard},
};

pub struct Recorder {
    window_ns: u64,
    max_bytes: usize,
    events: VecDeque<(u64, String)>,
    bytes: usize,
    /// Pin records out of the window whose pages are still held, by (time, pid).
    held: BTreeMap<(u64, u32), String>,
}

impl Recorder {
    pub fn new(window_ns: u64, max_bytes: usize) -> Recorder {
        Recorder { window_ns, max_bytes, events: VecDeque::new(), bytes: 0, held: BTreeMap::new() }
    }

    /// New bounds, from the next event on (a reloaded configuration).
    pub fn set_bounds(&mut self, window_ns: u64, max_bytes: usize) {
        self.window_ns = window_ns;
        self.max_bytes = max_bytes;
    }

    /// Keeps one event; drops what fell out of the window or past the size.
    pub fn push(&mut self, e: &Event, now_ns: u64) {
        let Ok(line) = serde_json::to_string(e) else { return };
        let key = match e {
            Event::Pin(p) => Some((p.ts_ns, p.pid)),
            _ => None,
        };
        self.bytes += line.len();
        self.events.push_back((key.map_or(now_ns, |k| k.0), line));
        while let Some((ts, _)) = self.events.front() {
            let old = now_ns.saturating_sub(*ts) > self.window_ns;
            if !old && self.bytes <= self.max_bytes {
                break;
            }
            let Some((_, line)) = self.events.pop_front() else { break };
            self.bytes -= line.len();
            // A pin leaving the window is kept aside while it may still be held.
            if line.starts_with("{\"event\":\"pin\"") {
                if let Ok(Event::Pin(p)) = Event::from_json(line.as_bytes()) {
                    self.held.insert((p.ts_ns, p.pid), line);
                }
            }
        }
    }

    /// Forgets the pins kept aside that nothing holds any more (at each tick).
    pub fn prune(&mut self, pins: &PinTable) {
        if self.held.is_empty() {
            return;
        }
        let live: BTreeSet<(u64, u32)> = pins.iter().map(|(_, h)| (h.since_ns, h.pid)).collect();
        self.held.retain(|k, _| live.contains(k));
    }

    /// The bundle's trace: the start event, the pins kept aside, the window.
    pub fn trace(&self, start: &Event) -> Vec<String> {
        let mut out = Vec::with_capacity(1 + self.held.len() + self.events.len());
        out.extend(serde_json::to_string(start).ok());
        out.extend(self.held.values().cloned());
        out.extend(self.events.iter().map(|(_, l)| l.clone()));
        out
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

/// What a bundle holds besides the trace, taken when it was triggered.
pub struct Incident {
    /// The hazard kind, or "sigusr1".
    pub trigger: String,
    pub hazard: Option<Hazard>,
    pub doctor_json: String,
    /// The pinners' and the actor's /proc status and maps at that moment, by file name.
    pub proc_files: Vec<(String, Vec<u8>)>,
}

impl Incident {
    /// Takes the /proc files of (role, pid) now: a process may be gone by the time the
    /// bundle is written.
    pub fn new(trigger: &str, hazard: Option<&Hazard>, doctor_json: String, processes: &[(&str, u32)]) -> Incident {
        let mut proc_files = Vec::new();
        for (role, pid) in processes {
            for what in ["status", "maps"] {
                let body = std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_else(|e| format!("/proc/{pid}/{what} unreadable at the incident: {e}\n").into_bytes());
                proc_files.push((format!("{role}-{pid}-{what}.txt"), body));
            }
        }
        Incident { trigger: trigger.to_string(), hazard: hazard.cloned(), doctor_json, proc_files }
    }
}

/// How many bundles `dir` keeps, and how many bytes all of them may take.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub max_bundles: usize,
    pub max_total_bytes: u64,
}

/// Writes a bundle under `dir`; removes the oldest past the bounds (never the new one).
/// Returns its path.
pub fn write_bundle(dir: &Path, trace: &[String], incident: &Incident, bounds: Bounds) -> Result<PathBuf> {
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).with_context(|| format!("creating the incident directory {}", dir.display()))?;
    }
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
    let trigger: String = incident.trigger.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).collect();
    let mut path = dir.join(format!("incident-{stamp}-{trigger}"));
    let mut n = 1;
    while path.exists() {
        n += 1;
        path = dir.join(format!("incident-{stamp}-{trigger}-{n}"));
    }
    std::fs::DirBuilder::new().mode(0o700).create(&path).with_context(|| format!("creating {}", path.display()))?;
    let file = |name: &str, body: &[u8]| -> Result<()> {
        let p = path.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .with_context(|| format!("creating {}", p.display()))?;
        f.write_all(body).with_context(|| format!("writing {}", p.display()))
    };
    let mut text = trace.join("\n");
    text.push('\n');
    file("trace.jsonl", text.as_bytes())?;
    if let Some(h) = &incident.hazard {
        file("hazard.json", serde_json::to_string_pretty(&Event::Hazard(h.clone()))?.as_bytes())?;
    }
    file("doctor.json", incident.doctor_json.as_bytes())?;
    let kernel = std::fs::read_to_string("/proc/version").unwrap_or_else(|e| format!("/proc/version unreadable: {e}\n"));
    file("kernel.txt", kernel.as_bytes())?;
    for (name, body) in &incident.proc_files {
        file(name, body)?;
    }
    remove_oldest(dir, &path, bounds);
    Ok(path)
}

fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir).into_iter().flatten().flatten().filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum()
}

/// Keeps the newest bundles within the bounds (oldest by modification time first);
/// `newest` always stays.
fn remove_oldest(dir: &Path, newest: &Path, bounds: Bounds) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut bundles: Vec<(std::time::SystemTime, PathBuf, u64)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("incident-") && e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), e.path(), size_of(&e.path())))
        .collect();
    bundles.sort();
    let mut total: u64 = bundles.iter().map(|b| b.2).sum();
    let mut count = bundles.len();
    for (_, old, size) in bundles {
        if count <= bounds.max_bundles && total <= bounds.max_total_bytes {
            break;
        }
        if old == newest {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(&old) {
            log::warn!("removing the old incident {}: {e}", old.display());
        }
        count -= 1;
        total = total.saturating_sub(size);
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::trace::Lost;

    const S: u64 = 1_000_000_000;

    fn pin(ts_ns: u64, pid: u32, pfn: u64) -> Event {
        let line = format!(
            r#"{{"event":"pin","ts_ns":{ts_ns},"pid":{pid},"tid":{pid},"comm":"x","uid":0,"cgroup_id":1,"func":"pin_user_pages","flags":["PIN","LONGTERM"],"gup_flags":0,"nr_pages":1,"nr_requested":1,"start":0,"end":4096,"pfns":[{pfn}]}}"#
        );
        Event::from_json(line.as_bytes()).unwrap()
    }

    fn lost(ts_ns: u64) -> Event {
        Event::Lost(Lost { ts_ns, count: 1, reason: "ringbuf_full".into() })
    }

    #[test]
    fn the_window_keeps_its_time_and_size_and_held_pins() {
        let mut r = Recorder::new(10 * S, 1 << 20);
        let mut pins = PinTable::default();
        let held = pin(S, 7, 100);
        let gone = pin(2 * S, 8, 200);
        for e in [&held, &gone] {
            pins.apply(e);
            r.push(e, S);
        }
        for t in 3..30 {
            r.push(&lost(t * S), t * S);
        }
        // Both pins left the window; pid 8's pages are released, pid 7's are not.
        let release = Event::from_json(br#"{"event":"unpin","ts_ns":25000000000,"pid":8,"tid":8,"comm":"x","func":"unpin_user_pages","release":"unpin","dirty":false,"pfns":[200]}"#).unwrap();
        pins.apply(&release);
        r.prune(&pins);
        let start = lost(0);
        let t = r.trace(&start);
        assert!(t[1].contains("\"pid\":7"), "the held pin goes first: {t:?}");
        assert!(!t.iter().any(|l| l.contains("\"pid\":8")), "a released pin out of the window is gone: {t:?}");
        // 10 s of losses at one a second: the window, no more.
        assert_eq!(t.iter().filter(|l| l.contains("ringbuf_full")).count(), 1 + 11);
        // The size bound wins over the window.
        let mut small = Recorder::new(100 * S, 1000);
        for t in 0..100 {
            small.push(&lost(t * S), t * S);
        }
        assert!(small.bytes() <= 1000);
    }

    #[test]
    fn bundles_are_private_and_bounded() {
        let dir = std::env::temp_dir().join(format!("pinwatch-bundles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let inc = Incident::new("sigusr1", None, "{}".into(), &[("actor", std::process::id())]);
        let trace = vec![r#"{"event":"lost","ts_ns":1,"count":1,"reason":"x"}"#.to_string()];
        let mut made = Vec::new();
        let bounds = Bounds { max_bundles: 3, max_total_bytes: u64::MAX };
        for _ in 0..4 {
            made.push(write_bundle(&dir, &trace, &inc, bounds).unwrap());
        }
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().collect();
        assert_eq!(left.len(), 3, "oldest removed first");
        assert!(!made[0].exists() && made[3].exists());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&made[3]).unwrap().permissions().mode() & 0o777, 0o700);
        for f in ["trace.jsonl", "doctor.json", "kernel.txt", &format!("actor-{}-status.txt", std::process::id())] {
            let m = std::fs::metadata(made[3].join(f)).unwrap();
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{f}");
        }
        // The size bound: a bundle is a few KiB here; 1 byte of room keeps the newest only.
        let tight = Bounds { max_bundles: 100, max_total_bytes: 1 };
        let last = write_bundle(&dir, &trace, &inc, tight).unwrap();
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        assert_eq!(left, vec![last], "the newest stays, the rest go");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
