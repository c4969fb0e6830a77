//! Everything that touches the running kernel: privileges, BTF layouts, symbols, the
//! attach plan, loading and attaching the programs, and the live record stream.
//! Nothing here decides what a record means; that is the engine's job.

pub mod btf;
pub mod calibrate;
pub mod decode;
pub mod found;
pub mod load;
pub mod plan;
pub mod procs;
pub mod stack;
pub mod stream;
pub mod symbols;

pub use load::{Kernel, Streaming};

/// The running kernel's release string (uname -r).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities pinwatch lacks to load and attach its programs, from the effective
/// set (`CapEff` of /proc/self/status): CAP_BPF and CAP_PERFMON (5.8+), or CAP_SYS_ADMIN
/// which implies both. A systemd unit grants these without root; root without them
/// (a container, `capsh --drop`) cannot load anything.
pub fn missing_capabilities(cap_eff: u64) -> Vec<&'static str> {
    let has = |c: u32| cap_eff & (1u64 << c) != 0;
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !(admin || has(CAP_BPF)) {
        missing.push("CAP_BPF");
    }
    if !(admin || has(CAP_PERFMON)) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// CapEff of this process.
pub fn effective_capabilities() -> anyhow::Result<u64> {
    use anyhow::Context as _;
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).context("/proc/self/status has no CapEff line")?;
    u64::from_str_radix(hex.trim(), 16).with_context(|| format!("CapEff {:?} is not hexadecimal", hex.trim()))
}

/// Whether kallsyms shows this process real addresses: CAP_SYSLOG, unless
/// kernel.kptr_restrict is 0 and perf_event_paranoid at most 1 (kallsyms_show_value).
pub fn kallsyms_hint(cap_eff: u64) -> Option<String> {
    if cap_eff & (1u64 << CAP_SYSLOG) != 0 {
        return None;
    }
    let restrict = std::fs::read_to_string("/proc/sys/kernel/kptr_restrict").unwrap_or_default();
    Some(format!(
        "/proc/kallsyms hides addresses without CAP_SYSLOG (kernel.kptr_restrict = {}): grant CAP_SYSLOG, or run as root",
        restrict.trim()
    ))
}

/// Refuses to go on without the capabilities to load programs, naming those missing.
pub fn check_privileges() -> anyhow::Result<()> {
    let eff = effective_capabilities()?;
    let missing = missing_capabilities(eff);
    if !missing.is_empty() {
        anyhow::bail!(
            "pinwatch needs {} to load eBPF programs, and this process lacks {} (CapEff {eff:#x}): run it as root with sudo, \
             or grant CAP_BPF, CAP_PERFMON and CAP_SYSLOG (a systemd unit's AmbientCapabilities)",
            "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)",
            missing.join(" and ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_not_uid_decide() {
        let bit = |c: u32| 1u64 << c;
        assert_eq!(missing_capabilities(0), vec!["CAP_BPF", "CAP_PERFMON"]);
        assert!(missing_capabilities(bit(CAP_SYS_ADMIN)).is_empty());
        assert!(missing_capabilities(bit(CAP_BPF) | bit(CAP_PERFMON)).is_empty());
        assert_eq!(missing_capabilities(bit(CAP_BPF)), vec!["CAP_PERFMON"]);
        // Root's full set (what `sudo` gives on a 6.x kernel).
        assert!(missing_capabilities(0x1ff_ffff_ffff).is_empty());
        assert_eq!(kallsyms_hint(bit(CAP_SYSLOG)), None);
    }
}
