//! Repeats collapsed: the first hazard of a (kind, pinner, file) alerts at once; the
//! repeats within the window are counted and said in one summary line when the window
//! closes. Nothing is dropped: every hazard is either its own line or counted in a
//! summary. Pure: time is the hazards' own clock, and the caller's at ticks.

use std::collections::BTreeMap;

use crate::trace::{Hazard, HazardKind};

/// What makes two hazards "the same alert".
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    kind: HazardKind,
    /// The pinners' pids (None where only the kernel's count knows of a pin).
    pinners: Vec<Option<u32>>,
    /// (dev, ino) of the file, if any.
    file: Option<(String, u64)>,
    /// A limit rule's rule, scope and id: two cgroups over their cap are two alerts.
    limit: Option<(String, String, u64)>,
}

impl Key {
    pub fn of(h: &Hazard) -> Key {
        let mut pinners: Vec<Option<u32>> = h.pinner_list().iter().map(|p| p.pid).collect();
        pinners.sort();
        pinners.dedup();
        Key {
            kind: h.kind,
            pinners,
            file: h.file.as_ref().map(|f| (f.dev.clone(), f.ino)),
            limit: h.limit.as_ref().map(|l| (l.rule.clone(), l.scope.clone(), l.id)),
        }
    }
}

/// One line to write.
#[derive(Clone, Debug, PartialEq)]
pub enum Alert {
    /// The first of its kind in a window.
    First(Hazard),
    /// The repeats of a window that has closed: the last one, and how many.
    Repeats { last: Hazard, repeats: u64, first_ns: u64, window_ns: u64 },
}

#[derive(Debug)]
struct Window {
    opened_ns: u64,
    /// Repeats since the first, and the last of them.
    repeats: u64,
    first_repeat_ns: u64,
    last: Option<Hazard>,
}

#[derive(Debug)]
pub struct Collapser {
    window_ns: u64,
    open: BTreeMap<Key, Window>,
}

impl Collapser {
    pub fn new(window_ns: u64) -> Collapser {
        Collapser { window_ns: window_ns.max(1), open: BTreeMap::new() }
    }

    /// A new window length, from the next window on (a reloaded configuration).
    pub fn set_window(&mut self, window_ns: u64) {
        self.window_ns = window_ns.max(1);
    }

    /// Hazards whose repeats wait for their window to close.
    #[cfg(test)]
    pub fn pending(&self) -> u64 {
        self.open.values().map(|w| w.repeats).sum()
    }

    /// Offers a hazard: the lines to write now (a summary of an expired window of the
    /// same key comes before the new first line).
    pub fn offer(&mut self, h: Hazard) -> Vec<Alert> {
        let key = Key::of(&h);
        let now = h.ts_ns;
        let mut out = Vec::new();
        if let Some(w) = self.open.get_mut(&key) {
            if now.saturating_sub(w.opened_ns) < self.window_ns {
                if w.repeats == 0 {
                    w.first_repeat_ns = now;
                }
                w.repeats += 1;
                w.last = Some(h);
                return out;
            }
            let w = self.open.remove(&key).expect("present");
            out.extend(summary(w, self.window_ns));
        }
        self.open.insert(key, Window { opened_ns: now, repeats: 0, first_repeat_ns: 0, last: None });
        out.push(Alert::First(h));
        out
    }

    /// Windows closed by `now_ns`: their summaries, where they had repeats.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Alert> {
        let window = self.window_ns;
        let closed: Vec<Key> = self.open.iter().filter(|(_, w)| now_ns.saturating_sub(w.opened_ns) >= window).map(|(k, _)| k.clone()).collect();
        closed.into_iter().filter_map(|k| self.open.remove(&k)).filter_map(|w| summary(w, window)).collect()
    }

    /// At shutdown: every window's repeats, said now.
    pub fn flush(&mut self) -> Vec<Alert> {
        let window = self.window_ns;
        std::mem::take(&mut self.open).into_values().filter_map(|w| summary(w, window)).collect()
    }
}

fn summary(w: Window, window_ns: u64) -> Option<Alert> {
    let last = w.last?;
    Some(Alert::Repeats { last, repeats: w.repeats, first_ns: w.first_repeat_ns, window_ns })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Actor, FileRef, Pinner, Pinners, Severity};

    const S: u64 = 1_000_000_000;

    fn hazard(kind: HazardKind, ts_ns: u64, pid: u32, ino: u64) -> Hazard {
        Hazard {
            ts_ns,
            kind,
            severity: Severity::Critical,
            pfn: Some(1),
            order: None,
            pinner: Pinners::One(Pinner { pid: Some(pid), ..Default::default() }),
            actor: Actor { pid: 1, tid: 1, comm: "kswapd0".into(), stack: vec![] },
            file: Some(FileRef { dev: "8:1".into(), ino, index: Some(0), fs: "ext4".into(), path: None }),
            kernel_pins: None,
            func: "f".into(),
            limit: None,
            pages: None,
        }
    }

    fn firsts(v: &[Alert]) -> usize {
        v.iter().filter(|a| matches!(a, Alert::First(_))).count()
    }

    /// Every hazard is a line or counted in a summary: none is lost.
    fn accounted(v: &[Alert]) -> u64 {
        v.iter().map(|a| match a { Alert::First(_) => 1, Alert::Repeats { repeats, .. } => *repeats }).sum()
    }

    #[test]
    fn repeats_in_a_window_become_one_summary() {
        let mut c = Collapser::new(60 * S);
        let mut out = Vec::new();
        for i in 0..100 {
            out.extend(c.offer(hazard(HazardKind::WritebackWhilePinned, S + i * S / 10, 7, 12)));
        }
        assert_eq!(firsts(&out), 1);
        assert_eq!(c.pending(), 99);
        // Not closed yet at 60s after the first.
        assert!(c.expire(60 * S).is_empty());
        let closed = c.expire(61 * S);
        assert_eq!(closed.len(), 1);
        match &closed[0] {
            Alert::Repeats { last, repeats, first_ns, .. } => {
                assert_eq!(*repeats, 99);
                assert_eq!(last.ts_ns, S + 99 * S / 10);
                assert_eq!(*first_ns, S + S / 10);
            }
            a => panic!("{a:?}"),
        }
        out.extend(closed);
        assert_eq!(accounted(&out), 100);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn different_kinds_pinners_and_files_each_alert() {
        let mut c = Collapser::new(60 * S);
        let mut out = Vec::new();
        out.extend(c.offer(hazard(HazardKind::WritebackWhilePinned, S, 7, 12)));
        out.extend(c.offer(hazard(HazardKind::MkcleanWhilePinned, S, 7, 12)));
        out.extend(c.offer(hazard(HazardKind::WritebackWhilePinned, S, 8, 12)));
        out.extend(c.offer(hazard(HazardKind::WritebackWhilePinned, S, 7, 13)));
        out.extend(c.offer(hazard(HazardKind::WritebackWhilePinned, S, 7, 12)));
        assert_eq!(firsts(&out), 4);
        out.extend(c.flush());
        assert_eq!(accounted(&out), 5);
    }

    #[test]
    fn a_hazard_after_the_window_alerts_again_after_the_summary() {
        let mut c = Collapser::new(10 * S);
        let mut out = c.offer(hazard(HazardKind::TruncateWhilePinned, S, 7, 12));
        out.extend(c.offer(hazard(HazardKind::TruncateWhilePinned, 2 * S, 7, 12)));
        // No tick came between: the next hazard closes the window itself.
        let later = c.offer(hazard(HazardKind::TruncateWhilePinned, 30 * S, 7, 12));
        assert!(matches!(later[0], Alert::Repeats { repeats: 1, .. }), "{later:?}");
        assert!(matches!(later[1], Alert::First(_)));
        out.extend(later);
        assert_eq!(accounted(&out), 3);
    }

    #[test]
    fn a_window_without_repeats_says_nothing_when_it_closes() {
        let mut c = Collapser::new(S);
        c.offer(hazard(HazardKind::TruncateWhilePinned, S, 7, 12));
        assert!(c.expire(10 * S).is_empty());
        assert!(c.flush().is_empty());
    }

    #[test]
    fn shutdown_says_what_is_pending() {
        let mut c = Collapser::new(60 * S);
        c.offer(hazard(HazardKind::TruncateWhilePinned, S, 7, 12));
        c.offer(hazard(HazardKind::TruncateWhilePinned, S + 1, 7, 12));
        c.offer(hazard(HazardKind::TruncateWhilePinned, S + 2, 7, 12));
        let f = c.flush();
        assert!(matches!(f[..], [Alert::Repeats { repeats: 2, .. }]), "{f:?}");
    }
}
