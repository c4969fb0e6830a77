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

/// Whether a release string ("6.12.117+deb13-cloud-amd64") is at least major.minor;
/// false when it cannot be read, so that a caller keeps the choice that works everywhere.
pub fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let num = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok());
    match (num(parts.next()), num(parts.next())) {
        (Some(a), Some(b)) => (a, b) >= (major, minor),
        _ => false,
    }
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

/// Gives up what only the start-up scan needed (kernel::found): CAP_SYS_ADMIN, without
/// which /proc/PID/pagemap shows no pfns. The daemon then runs for months without it:
/// loaded programs, test runs and map access need CAP_BPF and CAP_PERFMON at most.
/// CAP_SYS_PTRACE stays: reading another process's mappings (the paths of pinned files)
/// needs it whenever that process holds capabilities pinwatch does not.
pub fn drop_sys_admin() -> anyhow::Result<()> {
    use anyhow::Context as _;
    // capget(2)/capset(2), _LINUX_CAPABILITY_VERSION_3: two 32-bit words of each set.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Sets {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header { version: 0x2008_0522, pid: 0 };
    let mut sets = [Sets::default(); 2];
    // SAFETY: the kernel writes two Sets for version 3, as sized here.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, sets.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("capget");
    }
    // CAP_SYS_ADMIN is in the first word.
    let keep = !(1u32 << CAP_SYS_ADMIN);
    sets[0].effective &= keep;
    sets[0].permitted &= keep;
    sets[0].inheritable &= keep;
    // SAFETY: as above; lowering permitted lowers the ambient set with it.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, sets.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error()).context("capset");
    }
    Ok(())
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

    #[test]
    fn release_strings_compare_by_major_and_minor() {
        assert!(release_at_least("6.12.117+deb13-cloud-amd64", 6, 2));
        assert!(release_at_least("7.2.0-1-cloud-amd64", 6, 2));
        assert!(release_at_least("6.2", 6, 2));
        assert!(!release_at_least("6.1.0-50-cloud-amd64", 6, 2));
        assert!(!release_at_least("5.10.0-32-cloud-amd64", 6, 2));
        assert!(!release_at_least("unknown", 6, 2));
        assert!(!release_at_least("", 6, 2));
    }
}
