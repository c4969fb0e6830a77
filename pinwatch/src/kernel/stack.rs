//! Kernel stacks: return addresses carried in the records (bpf_get_stack), names from
//! /proc/kallsyms.

use std::collections::BTreeMap;

/// Frames kept per stack: the hook and the path that led there.
const FRAMES: usize = 24;

pub struct Symbols {
    ksyms: BTreeMap<u64, String>,
}

impl Symbols {
    pub fn load() -> Symbols {
        // Without kallsyms the frames stay addresses: still worth keeping.
        Symbols { ksyms: aya::util::kernel_symbols().unwrap_or_default() }
    }

    /// "function+0xoff" per frame, innermost first, below pinwatch's own frames.
    pub fn frames(&self, ips: &[u64]) -> Vec<String> {
        ips.iter().map(|ip| symbolize(&self.ksyms, *ip)).skip_while(|f| is_probe_frame(f)).take(FRAMES).collect()
    }

    /// The first function below GUP on the stack, or "" when unknown.
    pub fn caller(&self, ips: &[u64]) -> String {
        ips.iter()
            .map(|ip| symbolize(&self.ksyms, *ip))
            .skip_while(|f| is_probe_frame(f))
            .find(|f| !is_gup_frame(f))
            .map(|f| f.split('+').next().unwrap_or("").to_string())
            .unwrap_or_default()
    }
}

/// Functions of GUP itself and of the helpers every caller goes through: the caller is
/// the first frame that is none of these.
fn is_gup_frame(f: &str) -> bool {
    let name = f.split('+').next().unwrap_or(f);
    let name = name.trim_start_matches('_');
    ["get_user_pages", "pin_user_pages", "gup_", "internal_get_user_pages", "follow_page", "faultin_page", "is_valid_gup", "lockless_pages", "get_user_page"]
        .iter()
        .any(|p| name.starts_with(p))
        || name.contains("_gup")
}

/// Frames of pinwatch's own program and the tracing machinery that called it: the
/// stack worth reading starts below them.
fn is_probe_frame(f: &str) -> bool {
    f.contains("[bpf]") || ["bpf_", "__bpf_", "kprobe", "__kprobe", "ftrace", "arch_ftrace", "fentry"].iter().any(|p| f.starts_with(p))
}

pub fn symbolize(ksyms: &BTreeMap<u64, String>, ip: u64) -> String {
    match ksyms.range(..=ip).next_back() {
        Some((addr, name)) => format!("{name}+{:#x}", ip - addr),
        None => format!("{ip:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_symbol_below() {
        let k: BTreeMap<u64, String> = [(0x1000, "a".to_string()), (0x2000, "b".to_string())].into();
        assert_eq!(symbolize(&k, 0x1010), "a+0x10");
        assert_eq!(symbolize(&k, 0x2000), "b+0x0");
        assert_eq!(symbolize(&k, 0x10), "0x10");
    }

    #[test]
    fn gup_frames_are_not_callers() {
        for f in ["pin_user_pages_fast+0x30", "__gup_longterm_locked+0x1", "internal_get_user_pages_fast+0x9", "gup_fast_fallback+0x1", "__get_user_pages+0x2"] {
            assert!(is_gup_frame(f), "{f}");
        }
        for f in ["io_sqe_buffer_register+0x55", "iov_iter_extract_pages+0x1", "ib_umem_get+0x10"] {
            assert!(!is_gup_frame(f), "{f}");
        }
    }

    #[test]
    fn caller_is_below_gup_and_the_probe() {
        let k: BTreeMap<u64, String> = [
            (0x1000, "bpf_prog_1_fexit\t[bpf]".to_string()),
            (0x2000, "pin_user_pages_fast".to_string()),
            (0x3000, "io_pin_pages".to_string()),
            (0x4000, "io_sqe_buffer_register".to_string()),
        ]
        .into();
        let s = Symbols { ksyms: k };
        assert_eq!(s.caller(&[0x1010, 0x2020, 0x3030, 0x4040]), "io_pin_pages");
        assert_eq!(s.frames(&[0x1010, 0x2020, 0x3030]), ["pin_user_pages_fast+0x20", "io_pin_pages+0x30"]);
        assert_eq!(s.caller(&[0x2020]), "");
        assert_eq!(s.caller(&[]), "");
    }

    #[test]
    fn probe_frames_are_skipped() {
        assert!(is_probe_frame("bpf_prog_e1aa0129f2afa457_mm_filemap\t[bpf]+0x889"));
        assert!(is_probe_frame("bpf_trace_run1+0xfe"));
        assert!(!is_probe_frame("__filemap_remove_folio+0x1ad"));
    }
}
