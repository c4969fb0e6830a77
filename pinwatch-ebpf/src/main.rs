//! pinwatch's kernel programs. Entry points only: each names its hook and reads its
//! arguments, then hands over to the module of its family. The programs record and
//! filter; user space decides.
//!
//! Every function hook exists twice, as a kprobe named after the kernel function and
//! as an fentry program named `fentry_<function>`, built from one body by `twins!`.
//! Return programs differ more: one kretprobe serves all GUP calls (the call in flight
//! knows its hook), while an fexit program is bound to one function and finds the
//! return value after the arguments, so there is one per function and argument count
//! (`fexit_<function>_<nargs>`), chosen by user space from the kernel's BTF.
//!
//! Every program first asks `record::floor()`: the bench loads them with FLOOR set to
//! measure what the hooks alone cost, the floor pinwatch's own cost is read against.
#![no_std]
#![no_main]
// Atomic adds on map values: the BPF target has no compare-and-swap, so core's atomic
// types offer no fetch_add, while the add itself is one BPF instruction (XADD).
#![feature(core_intrinsics)]
#![allow(internal_features)]
// Program names follow the kernel's function names, __bio_release_pages among them, and
// aya's program macros do not carry a per-function allow over.
#![allow(non_snake_case)]

mod acquire;
mod calibrate;
mod found;
mod hazard;
mod maps;
mod page;
mod pins;
mod record;
mod release;

use aya_ebpf::{
    macros::{fentry, fexit, kprobe, kretprobe, raw_tracepoint, tracepoint},
    programs::{FEntryContext, FExitContext, ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
};
use pinwatch_common::{page_op, release as rel, Hook};

use acquire::{GupArgs, Layout, LAYOUT_PLAIN, LAYOUT_REMOTE, LAYOUT_UNLOCKED};
use page::PageArg;

/// 1 where the kernel has bpf_get_func_arg (5.17+), which its verifier inlines into a
/// few loads: an fentry or fexit program then reads a pointer argument with no helper
/// call. Before, bpf_probe_read_kernel, which cost more than the rest of the unpin and
/// dirtying programs together (87 instructions a read on 6.12). The branch is on a
/// frozen global: the verifier of a kernel without the helper never sees the call.
#[no_mangle]
static FUNC_ARG_INLINED: u64 = 0;

/// Argument n of the hooked function as a u64, whichever way the program attached.
trait Args {
    /// Whether the return program paired with this entry sees the arguments (fexit).
    const ARGS_AT_RETURN: bool;
    fn a(&self, n: usize) -> u64;
    /// A scalar argument (an integer, not a pointer) n, the cheapest way there is.
    #[inline(always)]
    fn scalar(&self, n: usize) -> u64 {
        self.a(n)
    }
    /// A GUP call's arguments at `l` positions: start, nr_pages and gup_flags are
    /// integers, pages a pointer.
    #[inline(always)]
    fn gup_args(&self, l: Layout) -> GupArgs {
        GupArgs { start: self.scalar(l.start), nr_pages: self.scalar(l.nr_pages), gup_flags: self.scalar(l.gup_flags), pages: self.a(l.pages) }
    }
}
impl Args for ProbeContext {
    const ARGS_AT_RETURN: bool = false;
    #[inline(always)]
    fn a(&self, n: usize) -> u64 {
        self.arg::<u64>(n).unwrap_or(0)
    }
}
/// fentry and fexit programs read their arguments alike, from the trampoline's frame.
macro_rules! trampoline_args {
    ($($ctx:ty),*) => {$(
        impl Args for $ctx {
            const ARGS_AT_RETURN: bool = true;
            #[inline(always)]
            fn a(&self, n: usize) -> u64 {
                trampoline_arg(aya_ebpf::EbpfContext::as_ptr(self), n)
            }
            #[inline(always)]
            fn scalar(&self, n: usize) -> u64 {
                frame_word(aya_ebpf::EbpfContext::as_ptr(self), n)
            }
        }
    )*};
}
trampoline_args!(FEntryContext, FExitContext);

/// Argument n of an fentry or fexit program, pointer or not, as a plain number. Not
/// loaded from the BTF-typed context: the verifier refuses loads of `struct page **`
/// arguments and arithmetic on typed `folio *` ones. bpf_get_func_arg gives a scalar
/// copy of the slot where the kernel has it; before 5.17, bpf_probe_read_kernel.
#[inline(always)]
fn trampoline_arg(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    if unsafe { core::ptr::read_volatile(&FUNC_ARG_INLINED) } != 0 {
        let mut v = 0u64;
        unsafe { aya_ebpf::helpers::generated::bpf_get_func_arg(ctx, n as u32, &mut v) };
        return v;
    }
    let slot = unsafe { (ctx as *const u64).add(n) };
    unsafe { aya_ebpf::helpers::bpf_probe_read_kernel(slot) }.unwrap_or(0)
}

/// Word n of an fentry or fexit trampoline's frame, loaded from the context, which the
/// verifier allows for integer arguments: no helper call.
#[inline(always)]
fn frame_word(ctx: *mut core::ffi::c_void, n: usize) -> u64 {
    unsafe { *(ctx as *const u64).add(n) }
}

/// A kprobe and its fentry twin with one body; `$c` is the context in the body.
macro_rules! twins {
    ($kprobe:ident, $fentry:ident, $sym:literal, |$c:ident| $body:expr) => {
        #[kprobe]
        pub fn $kprobe(ctx: ProbeContext) -> u32 {
            if record::floor() {
                return 0;
            }
            let $c = &ctx;
            $body;
            0
        }
        #[fentry(function = $sym)]
        pub fn $fentry(ctx: FEntryContext) -> u32 {
            if record::floor() {
                return 0;
            }
            let $c = &ctx;
            $body;
            0
        }
    };
}

/// twins! for a hook with nothing to do while nothing is pinned (pins::nothing_pinned):
/// the page hooks, which run for every page dirtied, cleaned, written back or released.
/// The programs answer that case with one load, and the body runs in a subprogram, so
/// that the program itself keeps no stack and saves no registers: what it costs then is
/// the floor's program and the load.
macro_rules! gated_twins {
    ($kprobe:ident, $fentry:ident, $sym:literal, |$c:ident| $body:expr) => {
        gated!(kprobe, $kprobe, ProbeContext, |$c| $body);
        gated!(fentry(function = $sym), $fentry, FEntryContext, |$c| $body);
    };
}

/// One gated program (see gated_twins): attribute, name, context type, body.
macro_rules! gated {
    ($attr:ident $(($($how:tt)*))?, $name:ident, $ctx:ident, |$c:ident| $body:expr) => {
        #[$attr$(($($how)*))?]
        pub fn $name(ctx: $ctx) -> u32 {
            if record::floor() || pins::nothing_pinned() {
                return 0;
            }
            #[inline(never)]
            fn watched(raw: *mut core::ffi::c_void) {
                let ctx = $ctx::new(raw);
                let $c = &ctx;
                $body;
            }
            watched(aya_ebpf::EbpfContext::as_ptr(&ctx));
            0
        }
    };
}

#[inline(always)]
fn gup_enter<C: Args + aya_ebpf::EbpfContext>(c: &C, hook: Hook, l: Layout) {
    // A call its fexit program handles alone costs its entry one load.
    if C::ARGS_AT_RETURN && acquire::mapless(c.scalar(l.gup_flags)) {
        return;
    }
    acquire::enter(c, hook, c.gup_args(l));
}

// ---- acquire: one entry program per hook (the hook id is its identity).
twins!(get_user_pages, fentry_get_user_pages, "get_user_pages", |c| gup_enter(c, Hook::GetUserPages, LAYOUT_PLAIN));
twins!(pin_user_pages, fentry_pin_user_pages, "pin_user_pages", |c| gup_enter(c, Hook::PinUserPages, LAYOUT_PLAIN));
twins!(get_user_pages_fast, fentry_get_user_pages_fast, "get_user_pages_fast", |c| gup_enter(c, Hook::GetUserPagesFast, LAYOUT_PLAIN));
twins!(pin_user_pages_fast, fentry_pin_user_pages_fast, "pin_user_pages_fast", |c| gup_enter(c, Hook::PinUserPagesFast, LAYOUT_PLAIN));
twins!(get_user_pages_fast_only, fentry_get_user_pages_fast_only, "get_user_pages_fast_only", |c| gup_enter(c, Hook::GetUserPagesFastOnly, LAYOUT_PLAIN));
twins!(get_user_pages_remote, fentry_get_user_pages_remote, "get_user_pages_remote", |c| gup_enter(c, Hook::GetUserPagesRemote, LAYOUT_REMOTE));
twins!(pin_user_pages_remote, fentry_pin_user_pages_remote, "pin_user_pages_remote", |c| gup_enter(c, Hook::PinUserPagesRemote, LAYOUT_REMOTE));
twins!(get_user_pages_unlocked, fentry_get_user_pages_unlocked, "get_user_pages_unlocked", |c| gup_enter(c, Hook::GetUserPagesUnlocked, LAYOUT_UNLOCKED));
twins!(pin_user_pages_unlocked, fentry_pin_user_pages_unlocked, "pin_user_pages_unlocked", |c| gup_enter(c, Hook::PinUserPagesUnlocked, LAYOUT_UNLOCKED));

#[kretprobe]
pub fn gup_return(ctx: RetProbeContext) -> u32 {
    if record::floor() {
        return 0;
    }
    acquire::exit(ctx.ret::<u64>());
    0
}

/// fexit of a GUP function with `$n` arguments: the return value is slot `$n`. The
/// arguments are read only for a mapless call, which has nothing in the call map.
macro_rules! gup_fexit {
    ($name:ident, $sym:literal, $n:literal, $hook:expr, $layout:expr) => {
        #[fexit(function = $sym)]
        pub fn $name(ctx: FExitContext) -> u32 {
            if record::floor() {
                return 0;
            }
            let ret = ctx.scalar($n);
            if acquire::mapless(ctx.scalar($layout.gup_flags)) {
                acquire::exit_mapless($hook, ctx.gup_args($layout), ret);
            } else {
                acquire::exit(ret);
            }
            0
        }
    };
}
// get_user_pages and pin_user_pages lost `vmas` in 6.5; *_remote went from 7 arguments
// to 6 then, and fentry refuses more than 6 before 6.6, so there is no `_7`.
gup_fexit!(fexit_get_user_pages_4, "get_user_pages", 4, Hook::GetUserPages, LAYOUT_PLAIN);
gup_fexit!(fexit_get_user_pages_5, "get_user_pages", 5, Hook::GetUserPages, LAYOUT_PLAIN);
gup_fexit!(fexit_pin_user_pages_4, "pin_user_pages", 4, Hook::PinUserPages, LAYOUT_PLAIN);
gup_fexit!(fexit_pin_user_pages_5, "pin_user_pages", 5, Hook::PinUserPages, LAYOUT_PLAIN);
gup_fexit!(fexit_get_user_pages_fast_4, "get_user_pages_fast", 4, Hook::GetUserPagesFast, LAYOUT_PLAIN);
gup_fexit!(fexit_pin_user_pages_fast_4, "pin_user_pages_fast", 4, Hook::PinUserPagesFast, LAYOUT_PLAIN);
gup_fexit!(fexit_get_user_pages_fast_only_4, "get_user_pages_fast_only", 4, Hook::GetUserPagesFastOnly, LAYOUT_PLAIN);
gup_fexit!(fexit_get_user_pages_remote_6, "get_user_pages_remote", 6, Hook::GetUserPagesRemote, LAYOUT_REMOTE);
gup_fexit!(fexit_pin_user_pages_remote_6, "pin_user_pages_remote", 6, Hook::PinUserPagesRemote, LAYOUT_REMOTE);
gup_fexit!(fexit_get_user_pages_unlocked_4, "get_user_pages_unlocked", 4, Hook::GetUserPagesUnlocked, LAYOUT_UNLOCKED);
gup_fexit!(fexit_pin_user_pages_unlocked_4, "pin_user_pages_unlocked", 4, Hook::PinUserPagesUnlocked, LAYOUT_UNLOCKED);

// ---- release: the unpin family. unpin_user_pages and unpin_user_pages_dirty_lock call
// other release functions (unpin_user_pages, and unpin_user_page up to 5.18): they keep
// a depth, ended by their return programs. The others call none, have no return
// program, and only ask whether they are nested (release::nested).
#[inline(always)]
fn unpin(f: impl FnOnce()) {
    if release::enter_outermost() {
        f();
    }
}

/// A release function that calls no hooked one, on an array or range of pages.
#[inline(always)]
fn unpin_leaf(f: impl FnOnce()) {
    if !release::nested() {
        f();
    }
}

gated_twins!(unpin_user_page, fentry_unpin_user_page, "unpin_user_page", |c| {
    release::folio_refs(Hook::UnpinUserPage as u16, rel::UNPIN, PageArg::Page(c.a(0)), 1, true)
});
twins!(unpin_user_pages, fentry_unpin_user_pages, "unpin_user_pages", |c| unpin(|| {
    release::page_array(Hook::UnpinUserPages as u16, rel::UNPIN, c.a(0), c.scalar(1), 0)
}));
twins!(unpin_user_pages_dirty_lock, fentry_unpin_user_pages_dirty_lock, "unpin_user_pages_dirty_lock", |c| unpin(|| {
    let dirty = (c.scalar(2) & 0xff != 0) as u16;
    release::page_array(Hook::UnpinUserPagesDirtyLock as u16, rel::UNPIN, c.a(0), c.scalar(1), dirty)
}));
gated_twins!(unpin_user_page_range_dirty_lock, fentry_unpin_user_page_range_dirty_lock, "unpin_user_page_range_dirty_lock", |c| unpin_leaf(|| {
    let dirty = (c.scalar(2) & 0xff != 0) as u16;
    release::page_range(Hook::UnpinUserPageRangeDirtyLock as u16, c.a(0), c.scalar(1), dirty)
}));
gated_twins!(unpin_folio, fentry_unpin_folio, "unpin_folio", |c| {
    release::folio_refs(Hook::UnpinFolio as u16, rel::UNPIN, PageArg::Folio(c.a(0)), 1, true)
});
gated_twins!(unpin_folios, fentry_unpin_folios, "unpin_folios", |c| unpin_leaf(|| {
    release::page_array(Hook::UnpinFolios as u16, rel::UNPIN, c.a(0), c.scalar(1), 0)
}));
gated_twins!(unpin_user_folio, fentry_unpin_user_folio, "unpin_user_folio", |c| {
    release::folio_refs(Hook::UnpinUserFolio as u16, rel::UNPIN, PageArg::Folio(c.a(0)), c.scalar(1) & 0xffff_ffff, true)
});

#[kretprobe]
pub fn unpin_return(_ctx: RetProbeContext) -> u32 {
    if record::floor() {
        return 0;
    }
    release::exit();
    0
}

macro_rules! unpin_fexit {
    ($name:ident, $sym:literal) => {
        #[fexit(function = $sym)]
        pub fn $name(_ctx: FExitContext) -> u32 {
            if record::floor() {
                return 0;
            }
            release::exit();
            0
        }
    };
}
unpin_fexit!(fexit_unpin_user_pages, "unpin_user_pages");
unpin_fexit!(fexit_unpin_user_pages_dirty_lock, "unpin_user_pages_dirty_lock");

// ---- FOLL_GET releases we can see, and the page-free safety net.
gated_twins!(bio_release_pages, fentry_bio_release_pages, "bio_release_pages", |c| {
    release::bio(Hook::BioReleasePages as u16, c.a(0), (c.scalar(1) & 0xff != 0) as u16)
});
gated_twins!(__bio_release_pages, fentry___bio_release_pages, "__bio_release_pages", |c| {
    release::bio(Hook::UnderscoreBioReleasePages as u16, c.a(0), (c.scalar(1) & 0xff != 0) as u16)
});
gated_twins!(page_cache_pipe_buf_release, fentry_page_cache_pipe_buf_release, "page_cache_pipe_buf_release", |c| {
    release::pipe_buf(Hook::PageCachePipeBufRelease as u16, c.a(1))
});

gated!(raw_tracepoint(tracepoint = "mm_page_free"), mm_page_free, RawTracePointContext, |c| {
    release::page_free(Hook::MmPageFree as u16, c.arg::<u64>(0))
});

// ---- hazards: the kernel treating a pinned folio as an ordinary one.
/// A hazard function hook: argument `$arg` is a `Folio` (its own head) or a `Page` (any
/// page of the folio: try_to_unmap_one and page_mkclean_one took pages before 5.18 and
/// 6.0).
macro_rules! fn_hazard {
    ($kprobe:ident, $fentry:ident, $sym:literal, $hook:expr, $op:expr, $kind:ident($arg:literal)) => {
        gated_twins!($kprobe, $fentry, $sym, |c| hazard::page_op(c, $hook as u16, $op, PageArg::$kind(c.a($arg)), false));
    };
}
fn_hazard!(try_to_unmap_one, fentry_try_to_unmap_one, "try_to_unmap_one", Hook::TryToUnmapOne, page_op::UNMAP, Page(0));
fn_hazard!(page_mkclean_one, fentry_page_mkclean_one, "page_mkclean_one", Hook::PageMkcleanOne, page_op::MKCLEAN, Page(0));
fn_hazard!(__folio_start_writeback, fentry___folio_start_writeback, "__folio_start_writeback", Hook::FolioStartWriteback, page_op::WRITEBACK, Folio(0));
fn_hazard!(__test_set_page_writeback, fentry___test_set_page_writeback, "__test_set_page_writeback", Hook::TestSetPageWriteback, page_op::WRITEBACK, Page(0));
fn_hazard!(ext4_bio_write_page, fentry_ext4_bio_write_page, "ext4_bio_write_page", Hook::Ext4BioWritePage, page_op::WRITEBACK, Page(1));
fn_hazard!(ext4_bio_write_folio, fentry_ext4_bio_write_folio, "ext4_bio_write_folio", Hook::Ext4BioWriteFolio, page_op::WRITEBACK, Folio(1));
fn_hazard!(folio_mark_dirty, fentry_folio_mark_dirty, "folio_mark_dirty", Hook::FolioMarkDirty, page_op::DIRTY, Folio(0));
fn_hazard!(set_page_dirty, fentry_set_page_dirty, "set_page_dirty", Hook::SetPageDirty, page_op::DIRTY, Page(0));

/// Tracepoint hazard programs come in two kinds: `<tp>` reports folios in PINS only,
/// `<tp>_kpins` also folios the kernel counts as DMA-pinned (tracepoint-only mode).
macro_rules! tp_hazard {
    ($name:ident, $kpins:ident, $tp:literal, $hook:expr, $op:expr) => {
        gated!(raw_tracepoint(tracepoint = $tp), $name, RawTracePointContext, |c| {
            hazard::page_op(c, $hook as u16, $op, PageArg::Page(c.arg::<u64>(0)), false)
        });
        #[raw_tracepoint(tracepoint = $tp)]
        pub fn $kpins(ctx: RawTracePointContext) -> i32 {
            if record::floor() {
                return 0;
            }
            hazard::page_op(&ctx, $hook as u16, $op, PageArg::Page(ctx.arg::<u64>(0)), true);
            0
        }
    };
}
tp_hazard!(mm_filemap_delete_from_page_cache, mm_filemap_delete_from_page_cache_kpins, "mm_filemap_delete_from_page_cache", Hook::MmFilemapDeleteFromPageCache, page_op::TRUNCATE);
tp_hazard!(writeback_dirty_folio, writeback_dirty_folio_kpins, "writeback_dirty_folio", Hook::WritebackDirtyFolio, page_op::DIRTY);
tp_hazard!(writeback_dirty_page, writeback_dirty_page_kpins, "writeback_dirty_page", Hook::WritebackDirtyPage, page_op::DIRTY);

/// Run by user space through BPF_PROG_TEST_RUN with a pfn as argument 0; the
/// tracepoint named is never attached.
#[raw_tracepoint(tracepoint = "mm_page_free")]
pub fn sweep_pfn(ctx: RawTracePointContext) -> i32 {
    hazard::sweep(ctx.arg::<u64>(0));
    0
}

/// Run by user space through BPF_PROG_TEST_RUN on a batch in map FOUND (the start-up
/// scan for pins older than pinwatch); never attached.
#[raw_tracepoint(tracepoint = "mm_page_free")]
pub fn found_pfns(_ctx: RawTracePointContext) -> i32 {
    found::batch();
    0
}

// ---- vmemmap_base calibration (start-up only, kernels whose kallsyms hides it).
#[raw_tracepoint(tracepoint = "mm_page_free")]
pub fn calib_page(ctx: RawTracePointContext) -> i32 {
    calibrate::remember_page(ctx.arg::<u64>(0));
    0
}
#[tracepoint(category = "kmem", name = "mm_page_free")]
pub fn calib_pfn(ctx: TracePointContext) -> u32 {
    calibrate::sample_pfn(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

/// Never attached for work: doctor and the loader load it to learn whether this kernel
/// accepts fentry programs at all.
#[fentry(function = "get_user_pages_fast")]
pub fn probe_fentry(_ctx: FEntryContext) -> u32 {
    0
}


