//! Enforcement, like mlock's: what the daemon sets in the kernel (the per-process cap
//! the GUP return program enforces with bpf_send_signal, its exemptions, what user space
//! saw released) and the one action it takes itself, freezing a cgroup. Never pid 1,
//! never a kernel thread (the kernel's helper refuses both), never the daemon's own
//! cgroup or the root.

use std::collections::HashMap;

use anyhow::{bail, Context as _, Result};

use super::config::{Config, Exempt};
use crate::{
    engine::account::{Accounts, PAGE_SIZE},
    kernel::{procs, Kernel},
    live::session::GupCounts,
    trace::LimitRules,
};

/// What the GUP return program is told: the cap in pages and the signal; (0, 0) when
/// max_longterm_process's action is not stop or kill.
pub fn kernel_cap(limits: &LimitRules, config: &Config) -> (u64, i32) {
    match (limits.max_longterm_process, config.actions.max_longterm_process.signal()) {
        (Some(bytes), Some(sig)) => (bytes / PAGE_SIZE, sig),
        _ => (0, 0),
    }
}

/// Fills the kernel's enforcement maps from the rules (at start and at each reload).
pub fn arm(kernel: &mut Kernel, limits: &LimitRules, config: &Config) -> Result<()> {
    let (cap, signal) = kernel_cap(limits, config);
    let x = &config.exempt;
    kernel.set_exemptions(&x.uid, &exempt_cgroup_ids(x), &x.comm)?;
    kernel.set_enforce(cap, signal)
}

/// Every cgroup id at or below the exempt paths: the kernel compares the caller's
/// cgroup id, and knows nothing of paths.
fn exempt_cgroup_ids(x: &Exempt) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = Vec::new();
    for p in &x.cgroup {
        let root = procs::cgroup2_root().join(p.trim_start_matches('/'));
        let mut todo = vec![root];
        while let Some(dir) = todo.pop() {
            let Ok(m) = std::fs::metadata(&dir) else { continue };
            ids.push(m.ino());
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
            }
        }
    }
    ids
}

/// Long-term pages each process has released, as user space knows it: taken (the
/// kernel's count) minus held (the engine's). Written at each tick; the kernel side
/// subtracts it from what it counted taken. A release user space has not seen yet only
/// makes the kernel's figure higher for a moment, never lower than what is held. Pins
/// found at start were never counted taken: they make the figure negative, so that the
/// cap holds them too.
pub fn released(gup: &HashMap<u32, GupCounts>, accounts: &Accounts) -> HashMap<u32, i64> {
    let held = |pid: &u32| accounts.processes.get(pid).map(|p| p.usage.longterm_bytes / PAGE_SIZE).unwrap_or(0);
    let mut out: HashMap<u32, i64> = gup
        .iter()
        .filter(|(_, g)| g.longterm_pages > 0)
        .map(|(pid, g)| (*pid, g.longterm_pages as i64 - held(pid) as i64))
        .collect();
    for (pid, p) in &accounts.processes {
        if p.usage.longterm_bytes > 0 && !out.contains_key(pid) {
            out.insert(*pid, -(held(pid) as i64));
        }
    }
    out
}

/// Freezes a cgroup v2 (writes 1 to its cgroup.freeze); refuses the root, init's and
/// any cgroup holding the daemon itself. Returns the path frozen.
pub fn freeze(path: &str, own: Option<&str>) -> Result<String> {
    let rel = path.trim_end_matches('/');
    if rel.is_empty() || rel == "/" {
        bail!("the root cgroup is never frozen");
    }
    if rel == "/init.scope" {
        bail!("init's cgroup is never frozen");
    }
    if let Some(own) = own {
        if own == rel || own.strip_prefix(rel).is_some_and(|r| r.starts_with('/')) {
            bail!("{rel} holds pinwatch itself: not frozen");
        }
    }
    let file = procs::cgroup2_root().join(rel.trim_start_matches('/')).join("cgroup.freeze");
    std::fs::write(&file, "1").with_context(|| format!("writing 1 to {} (cgroup v2 with the freezer: 5.2 and later)", file.display()))?;
    Ok(rel.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{engine::account::ProcUsage, output::alert::config::Action};

    #[test]
    fn freeze_never_touches_the_root_init_or_itself() {
        assert!(freeze("/", None).is_err());
        assert!(freeze("", None).is_err());
        assert!(freeze("/init.scope", None).is_err());
        assert!(freeze("/system.slice", Some("/system.slice/pinwatch.service")).is_err());
        assert!(freeze("/system.slice/pinwatch.service", Some("/system.slice/pinwatch.service")).is_err());
        // A sibling is not refused for the daemon's sake (it fails here: no such cgroup).
        let e = freeze("/no-such-cgroup-here", Some("/system.slice/pinwatch.service")).unwrap_err();
        assert!(format!("{e:#}").contains("cgroup.freeze"), "{e:#}");
    }

    #[test]
    fn the_kernel_cap_only_for_stop_and_kill_on_the_process_rule() {
        let mut c = Config::default();
        let l = LimitRules { max_longterm_process: Some(4 << 20), ..Default::default() };
        assert_eq!(kernel_cap(&l, &c), (0, 0));
        c.actions.max_longterm_process = Action::Kill;
        assert_eq!(kernel_cap(&l, &c), (1024, libc::SIGKILL));
        c.actions.max_longterm_process = Action::Stop;
        assert_eq!(kernel_cap(&l, &c), (1024, libc::SIGSTOP));
        c.actions.max_longterm_process = Action::Freeze;
        assert_eq!(kernel_cap(&l, &c), (0, 0));
        assert_eq!(kernel_cap(&LimitRules::default(), &Config { actions: super::super::config::Actions { max_longterm_process: Action::Kill, ..Default::default() }, ..Default::default() }), (0, 0));
    }

    #[test]
    fn released_is_taken_minus_held() {
        let gup: HashMap<u32, GupCounts> = [(7, GupCounts { longterm_pages: 2048, ..Default::default() }), (8, GupCounts { longterm_pages: 10, ..Default::default() }), (9, GupCounts::default())].into();
        let mut acc = Accounts::default();
        let mut p = ProcUsage { pid: 7, ..Default::default() };
        p.usage.longterm_bytes = 512 * PAGE_SIZE;
        acc.processes.insert(7, p);
        let r = released(&gup, &acc);
        assert_eq!(r.get(&7), Some(&1536));
        assert_eq!(r.get(&8), Some(&10));
        assert_eq!(r.get(&9), None);
        // Pins found at start, never counted taken: held beyond taken, so negative.
        let mut p = ProcUsage { pid: 10, ..Default::default() };
        p.usage.longterm_bytes = 300 * PAGE_SIZE;
        acc.processes.insert(10, p);
        let gup: HashMap<u32, GupCounts> = [(10, GupCounts { longterm_pages: 100, ..Default::default() })].into();
        assert_eq!(released(&gup, &acc).get(&10), Some(&-200));
        assert_eq!(released(&HashMap::new(), &acc).get(&10), Some(&-300));
    }
}
