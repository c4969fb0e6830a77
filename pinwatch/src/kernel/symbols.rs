//! Kernel symbols: /proc/kallsyms for addresses and for which functions exist, and
//! tracefs' available_filter_functions for which of them can be probed.

use std::collections::{HashMap, HashSet};

use anyhow::{bail, Context as _, Result};

pub struct Symbols {
    addrs: HashMap<String, u64>,
    /// Functions kprobes and fentry may attach to; None when tracefs is unavailable.
    traceable: Option<HashSet<String>>,
    /// Tracepoint names (events/<system>/<name>); None when tracefs is unavailable.
    tracepoints: Option<HashSet<String>>,
}

/// Reads kallsyms lines "ADDR TYPE NAME [module]", keeping the names in `wanted`.
pub fn parse_kallsyms(text: &str, wanted: &dyn Fn(&str) -> bool) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_ty), Some(name)) = (it.next(), it.next(), it.next()) else { continue };
        if wanted(name) {
            if let Ok(a) = u64::from_str_radix(addr, 16) {
                out.entry(name.to_string()).or_insert(a);
            }
        }
    }
    out
}

impl Symbols {
    pub fn load(wanted: &[&str]) -> Result<Symbols> {
        let text = std::fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
        let set: HashSet<&str> = wanted.iter().copied().collect();
        let addrs = parse_kallsyms(&text, &|n| set.contains(n));
        if !addrs.is_empty() && addrs.values().all(|a| *a == 0) {
            let hint = super::effective_capabilities().ok().and_then(super::kallsyms_hint);
            bail!("/proc/kallsyms shows only zero addresses: {}", hint.unwrap_or_else(|| "kernel.kptr_restrict hides them".into()));
        }
        let traceable = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"].iter().find_map(|d| {
            std::fs::read_to_string(format!("{d}/available_filter_functions")).ok().map(|t| {
                t.lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|n| set.contains(n))
                    .map(str::to_string)
                    .collect()
            })
        });
        let tracepoints = ["/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"].iter().find_map(|d| {
            let systems = std::fs::read_dir(d).ok()?;
            Some(
                systems
                    .flatten()
                    .filter_map(|s| std::fs::read_dir(s.path()).ok())
                    .flat_map(|events| events.flatten().map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect(),
            )
        });
        Ok(Symbols { addrs, traceable, tracepoints })
    }

    /// Some(false) when tracefs lists no such tracepoint.
    pub fn tracepoint_exists(&self, name: &str) -> Option<bool> {
        self.tracepoints.as_ref().map(|t| t.contains(name))
    }

    /// A kernel that has exactly these functions, all traceable (for tests).
    #[cfg(test)]
    pub fn from_names(names: &[&str]) -> Symbols {
        Symbols {
            addrs: names.iter().map(|n| (n.to_string(), 0xffff_ffff_8100_0000)).collect(),
            traceable: Some(names.iter().map(|n| n.to_string()).collect()),
            tracepoints: None,
        }
    }

    pub fn addr(&self, name: &str) -> Option<u64> {
        self.addrs.get(name).copied().filter(|a| *a != 0)
    }

    pub fn exists(&self, name: &str) -> bool {
        self.addrs.contains_key(name)
    }

    /// Some(false) when tracefs says the function cannot be probed (inlined, notrace).
    pub fn traceable(&self, name: &str) -> Option<bool> {
        self.traceable.as_ref().map(|t| t.contains(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_wanted_names_and_first_address() {
        let text = "ffffffff81000000 T _stext\nffffffff8123 T pin_user_pages_fast\nffffffff8124 t pin_user_pages_fast\nffffffff82 D vmemmap_base\n";
        let m = parse_kallsyms(text, &|n| n == "pin_user_pages_fast" || n == "vmemmap_base");
        assert_eq!(m.len(), 2);
        assert_eq!(m["pin_user_pages_fast"], 0xffffffff8123);
        assert_eq!(m["vmemmap_base"], 0xffffffff82);
    }
}
