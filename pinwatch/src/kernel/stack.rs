//! Kernel stacks: return addresses carried in the records (bpf_get_stack), names from
//! /proc/kallsyms.

use std::collections::HashMap;

/// Frames kept per stack: the hook and the path that led there.
const FRAMES: usize = 24;

/// GUP stacks repeat (one per call site and syscall): this many distinct ones are kept
/// resolved, then the cache starts over.
const ORIGINS_CACHED: usize = 4096;

pub struct Symbols {
    ksyms: Ksyms,
    origins: HashMap<Vec<u64>, Origin>,
}

/// Who took a GUP call's pages: the first function below GUP, and the subsystem the
/// whole stack points to.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub caller: String,
    pub path: &'static str,
}

impl Symbols {
    pub fn load() -> Symbols {
        // Without kallsyms the frames stay addresses: still worth keeping.
        let text = std::fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Symbols { ksyms: Ksyms::parse(&text), origins: HashMap::new() }
    }

    /// The origin of a GUP call's stack, resolved once per distinct stack.
    pub fn origin(&mut self, ips: &[u64]) -> Origin {
        if let Some(o) = self.origins.get(ips) {
            return o.clone();
        }
        let frames: Vec<String> = ips.iter().map(|ip| symbolize(&self.ksyms, *ip)).skip_while(|f| is_probe_frame(f)).collect();
        let caller = frames.iter().find(|f| !is_gup_frame(f)).map(|f| function(f).to_string()).unwrap_or_default();
        let o = Origin { caller, path: if frames.is_empty() { "" } else { call_path(&frames) } };
        if self.origins.len() >= ORIGINS_CACHED {
            self.origins.clear();
        }
        self.origins.insert(ips.to_vec(), o.clone());
        o
    }

    /// "function+0xoff" per frame, innermost first, below pinwatch's own frames.
    pub fn frames(&self, ips: &[u64]) -> Vec<String> {
        ips.iter().map(|ip| symbolize(&self.ksyms, *ip)).skip_while(|f| is_probe_frame(f)).take(FRAMES).collect()
    }
}

/// Functions of GUP itself and of the helpers every caller goes through: the caller is
/// the first frame that is none of these.
fn is_gup_frame(f: &str) -> bool {
    let name = f.split('+').next().unwrap_or(f);
    let name = name.trim_start_matches('_');
    ["get_user_pages", "pin_user_pages", "gup_", "internal_get_user_pages", "follow_page", "faultin_page", "is_valid_gup", "lockless_pages", "get_user_page", "iov_iter_"]
        .iter()
        .any(|p| name.starts_with(p))
        || name.contains("_gup")
}

fn function(frame: &str) -> &str {
    frame.split('+').next().unwrap_or(frame)
}

/// Subsystems that take pins, by functions of theirs that show on the stack of a GUP call
/// (on 5.10 to 7.x), matched as prefixes of the name without its leading underscores. The innermost frame that matches decides: a direct-I/O read issued
/// through io_uring is direct I/O, io_uring's own buffer registration is io_uring.
const PATHS: &[(&str, &[&str])] = &[
    ("direct I/O", &["bio_iov_iter_get_pages", "iomap_dio", "blkdev_direct_IO", "do_blockdev_direct_IO", "nfs_direct", "fuse_get_user_pages"]),
    ("passthrough", &["bio_map_user_iov", "blk_rq_map_user"]),
    ("io_uring", &["io_pin_pages", "io_sqe_buffer", "io_import", "io_register", "io_uring", "io_buffer", "io_pbuf", "io_zcrx"]),
    ("vmsplice", &["iter_to_pipe", "vmsplice"]),
    ("RDMA", &["ib_umem", "ib_reg_user_mr", "rxe_", "siw_", "mlx4_ib", "mlx5_ib", "hns_roce", "efa_"]),
    ("VFIO", &["vfio_", "vaddr_get_pfn", "iommufd", "iopt_"]),
    ("GPU", &["amdgpu_", "radeon_", "nouveau_", "i915_", "xe_", "drm_", "os_lock_user_pages", "nv_"]),
    ("KVM", &["hva_to_pfn", "kvm_"]),
    ("futex", &["get_futex_key", "futex"]),
    ("exec", &["get_arg_page", "copy_strings"]),
    ("process_vm", &["process_vm"]),
    ("ptrace/proc mem", &["access_remote_vm", "mem_rw", "ptrace_access_vm", "environ_read"]),
    ("uprobes", &["uprobe_write_opcode", "uprobe_register"]),
    ("zero-copy net", &["zerocopy_sg_from_iter", "skb_zerocopy_iter", "tcp_zerocopy"]),
];

/// The subsystem a GUP call's stack (innermost first) points to, or "other". Syscall
/// entry points count by their syscall's name (`__do_sys_vmsplice` is vmsplice): the
/// functions between them and GUP are often inlined.
pub fn call_path(frames: &[String]) -> &'static str {
    for f in frames {
        let name = function(f).trim_start_matches('_');
        let name = ["x64_sys_", "ia32_sys_", "do_sys_", "se_sys_", "sys_"].iter().find_map(|p| name.strip_prefix(p)).unwrap_or(name);
        if let Some((path, _)) = PATHS.iter().find(|(_, marks)| marks.iter().any(|m| name.starts_with(m))) {
            return path;
        }
    }
    "other"
}

/// Frames of pinwatch's own program and the tracing machinery that called it: the
/// stack worth reading starts below them.
fn is_probe_frame(f: &str) -> bool {
    f.contains("[bpf]") || ["bpf_", "__bpf_", "kprobe", "__kprobe", "kretprobe", "__kretprobe", "trampoline_handler", "ftrace", "arch_ftrace", "fentry"].iter().any(|p| f.starts_with(p))
}

/// Kernel text symbols by address, every name in one buffer: 16 bytes a symbol beside
/// its name, where a map of Strings took about 90 (it was most of a live view's memory).
#[derive(Default)]
pub struct Ksyms {
    /// (address, start of the name in `names`, its length), sorted by address.
    syms: Vec<(u64, u32, u32)>,
    names: String,
}

impl Ksyms {
    /// kallsyms lines "ADDR TYPE NAME [module]"; text symbols only (stacks hold return
    /// addresses into code).
    pub fn parse(text: &str) -> Ksyms {
        let mut k = Ksyms::default();
        for line in text.lines() {
            let mut it = line.split_whitespace();
            let (Some(addr), Some(ty), Some(name)) = (it.next(), it.next(), it.next()) else { continue };
            let (Ok(addr), true) = (u64::from_str_radix(addr, 16), matches!(ty, "t" | "T" | "w" | "W")) else { continue };
            let start = k.names.len();
            k.names.push_str(name);
            // A module's symbol keeps its module, as "name\t[module]" ([bpf] for programs).
            if let Some(module) = it.next() {
                k.names.push('\t');
                k.names.push_str(module);
            }
            let (Ok(len), Ok(start)) = (u32::try_from(k.names.len() - start), u32::try_from(start)) else { break };
            k.syms.push((addr, start, len));
        }
        k.syms.sort_unstable_by_key(|s| s.0);
        k.syms.shrink_to_fit();
        k.names.shrink_to_fit();
        k
    }

    /// The symbol at or below `ip`, with `ip`'s offset into it.
    fn lookup(&self, ip: u64) -> Option<(&str, u64)> {
        let i = self.syms.partition_point(|s| s.0 <= ip).checked_sub(1)?;
        let (addr, start, len) = self.syms[i];
        let name = self.names.get(start as usize..(start + len) as usize)?;
        Some((name, ip - addr))
    }
}

pub fn symbolize(ksyms: &Ksyms, ip: u64) -> String {
    match ksyms.lookup(ip) {
        Some((name, off)) => format!("{name}+{off:#x}"),
        None => format!("{ip:#x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_symbol_below() {
        let k = Ksyms::parse("0000000000002000 T b\n0000000000001000 t a [ext4]\n0000000000001800 D data\nbad line\n");
        assert_eq!(symbolize(&k, 0x1010), "a\t[ext4]+0x10");
        assert_eq!(symbolize(&k, 0x2008), "b+0x8");
        assert_eq!(symbolize(&k, 0x1900), "a\t[ext4]+0x900", "data symbols are not code");
        assert_eq!(symbolize(&k, 0x2000), "b+0x0");
        assert_eq!(symbolize(&k, 0x10), "0x10");
    }

    #[test]
    fn gup_frames_are_not_callers() {
        for f in ["pin_user_pages_fast+0x30", "__gup_longterm_locked+0x1", "internal_get_user_pages_fast+0x9", "gup_fast_fallback+0x1", "__get_user_pages+0x2"] {
            assert!(is_gup_frame(f), "{f}");
        }
        // iov_iter helpers only pass the pages on: the caller is below them.
        assert!(is_gup_frame("iov_iter_extract_pages+0x1"));
        for f in ["io_sqe_buffer_register+0x55", "bio_iov_iter_get_pages+0x1", "ib_umem_get+0x10"] {
            assert!(!is_gup_frame(f), "{f}");
        }
    }

    #[test]
    fn caller_is_below_gup_and_the_probe() {
        let k = Ksyms::parse(
            "0000000000001000 t bpf_prog_1_fexit\t[bpf]\n0000000000002000 T pin_user_pages_fast\n\
             0000000000003000 t io_pin_pages\n0000000000004000 T io_sqe_buffer_register\n",
        );
        let mut s = Symbols { ksyms: k, origins: HashMap::new() };
        assert_eq!(s.origin(&[0x1010, 0x2020, 0x3030, 0x4040]), Origin { caller: "io_pin_pages".into(), path: "io_uring" });
        // cached: the same answer the second time
        assert_eq!(s.origin(&[0x1010, 0x2020, 0x3030, 0x4040]).caller, "io_pin_pages");
        assert_eq!(s.frames(&[0x1010, 0x2020, 0x3030]), ["pin_user_pages_fast+0x20", "io_pin_pages+0x30"]);
        assert_eq!(s.origin(&[0x2020]), Origin { caller: "".into(), path: "other" });
        assert_eq!(s.origin(&[]), Origin { caller: "".into(), path: "" });
    }

    #[test]
    fn paths_from_stacks_the_lab_kernels_show() {
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases: &[(&[&str], &str)] = &[
            (&["pin_user_pages_fast+0x1", "iov_iter_extract_pages+0x2", "bio_iov_iter_get_pages+0x3", "__blkdev_direct_IO_simple+0x4", "blkdev_read_iter+0x5"], "direct I/O"),
            (&["get_user_pages_fast+0x1", "iov_iter_get_pages+0x2", "iomap_dio_bio_actor+0x3", "iomap_apply+0x4"], "direct I/O"),
            (&["pin_user_pages+0x1", "io_sqe_buffer_register+0x2", "__io_uring_register+0x3"], "io_uring"),
            (&["pin_user_pages_fast+0x1", "io_pin_pages+0x2", "io_sqe_buffer_register+0x3"], "io_uring"),
            // direct I/O issued through io_uring is direct I/O
            (&["pin_user_pages_fast+0x1", "iov_iter_extract_pages+0x2", "bio_iov_iter_get_pages+0x3", "__blkdev_direct_IO_async+0x4", "io_read+0x5", "io_issue_sqe+0x6"], "direct I/O"),
            (&["get_user_pages_fast+0x1", "iov_iter_get_pages2+0x2", "iter_to_pipe+0x3", "vmsplice_to_pipe+0x4"], "vmsplice"),
            // 5.10: iter_to_pipe and vmsplice_to_pipe inlined into the syscall
            (&["get_user_pages_fast+0x1", "iov_iter_get_pages+0x2", "__do_sys_vmsplice+0x3", "do_syscall_64+0x4"], "vmsplice"),
            (&["pin_user_pages_remote+0x1", "__x64_sys_process_vm_writev+0x2"], "process_vm"),
            (&["pin_user_pages_remote+0x1", "process_vm_rw_single_vec+0x2", "process_vm_rw_core+0x3"], "process_vm"),
            (&["get_user_pages_remote+0x1", "get_arg_page+0x2", "copy_string_kernel+0x3"], "exec"),
            (&["get_user_pages_fast+0x1", "get_futex_key+0x2", "futex_wait_setup+0x3"], "futex"),
            (&["pin_user_pages_fast+0x1", "ib_umem_get+0x2", "mlx5_ib_reg_user_mr+0x3"], "RDMA"),
            (&["pin_user_pages_remote+0x1", "vaddr_get_pfns+0x2", "vfio_pin_pages_remote+0x3"], "VFIO"),
            (&["get_user_pages_unlocked+0x1", "hva_to_pfn_slow+0x2", "hva_to_pfn+0x3"], "KVM"),
            (&["pin_user_pages_fast+0x1", "iov_iter_extract_pages+0x2", "bio_map_user_iov+0x3", "blk_rq_map_user_iov+0x4", "sg_io+0x5"], "passthrough"),
            (&["pin_user_pages_fast+0x1", "some_driver_ioctl+0x2"], "other"),
        ];
        for (stack, want) in cases {
            assert_eq!(call_path(&f(stack)), *want, "{stack:?}");
        }
    }

    #[test]
    fn probe_frames_are_skipped() {
        assert!(is_probe_frame("bpf_prog_e1aa0129f2afa457_mm_filemap\t[bpf]+0x889"));
        assert!(is_probe_frame("bpf_trace_run1+0xfe"));
        assert!(is_probe_frame("kretprobe_trampoline+0x0"));
        assert!(!is_probe_frame("__filemap_remove_folio+0x1ad"));
    }
}
