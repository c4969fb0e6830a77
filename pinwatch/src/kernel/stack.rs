//! Kernel stacks of hazards: ids from bpf_get_stackid, frames from the STACKS map,
//! names from /proc/kallsyms. A stack id keeps its frames until the map is cleared
//! (stacks are stored without BPF_F_REUSE_STACKID), so each id is resolved once.

use std::collections::{BTreeMap, HashMap};

use aya::maps::{MapData, StackTraceMap};

/// Frames kept per stack: the hook and the path that led there.
const FRAMES: usize = 16;

pub struct Stacks {
    map: StackTraceMap<MapData>,
    ksyms: BTreeMap<u64, String>,
    resolved: HashMap<u32, Vec<String>>,
}

impl Stacks {
    pub fn new(map: StackTraceMap<MapData>) -> Stacks {
        // Without kallsyms the frames stay addresses: still worth keeping.
        let ksyms = aya::util::kernel_symbols().unwrap_or_default();
        Stacks { map, ksyms, resolved: HashMap::new() }
    }

    /// "function+0xoff" per frame, innermost first; empty when the id is an error.
    pub fn resolve(&mut self, id: i64) -> Vec<String> {
        let Ok(id) = u32::try_from(id) else { return Vec::new() };
        if let Some(s) = self.resolved.get(&id) {
            return s.clone();
        }
        let frames: Vec<String> = match self.map.get(&id, 0) {
            Ok(st) => st
                .frames()
                .iter()
                .map(|f| symbolize(&self.ksyms, f.ip))
                .skip_while(|f| is_probe_frame(f))
                .take(FRAMES)
                .collect(),
            Err(_) => Vec::new(),
        };
        self.resolved.insert(id, frames.clone());
        frames
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

impl Stacks {
    /// The first function below GUP on the stack of `id`, or "" when unknown.
    pub fn caller(&mut self, id: i64) -> String {
        self.resolve(id).into_iter().find(|f| !is_gup_frame(f)).map(|f| f.split('+').next().unwrap_or("").to_string()).unwrap_or_default()
    }
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
    fn probe_frames_are_skipped() {
        assert!(is_probe_frame("bpf_prog_e1aa0129f2afa457_mm_filemap\t[bpf]+0x889"));
        assert!(is_probe_frame("bpf_trace_run1+0xfe"));
        assert!(!is_probe_frame("__filemap_remove_folio+0x1ad"));
    }
}
