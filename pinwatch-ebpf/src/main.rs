//! pinwatch's kernel programs. Entry points only: each names its hook and reads its
//! arguments, then hands over to the module of its family. The programs record and
//! filter; user space decides.
#![no_std]
#![no_main]

mod acquire;
mod calibrate;
mod maps;
mod page;
mod record;
mod release;

use aya_ebpf::{
    macros::{kprobe, kretprobe, raw_tracepoint, tracepoint},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
};
use pinwatch_common::{release as rel, Hook};

use acquire::{Layout, LAYOUT_PLAIN, LAYOUT_REMOTE, LAYOUT_UNLOCKED};

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

#[inline(always)]
fn gup_enter(ctx: &ProbeContext, hook: Hook, l: Layout) -> u32 {
    acquire::enter(hook, arg(ctx, l.start), arg(ctx, l.nr_pages), arg(ctx, l.gup_flags), arg(ctx, l.pages));
    0
}

// ---- acquire: one entry program per hook (the hook id is its identity), one return
// program for all of them (the call in flight knows its hook).
#[kprobe]
pub fn get_user_pages(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::GetUserPages, LAYOUT_PLAIN) }
#[kprobe]
pub fn pin_user_pages(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::PinUserPages, LAYOUT_PLAIN) }
#[kprobe]
pub fn get_user_pages_fast(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::GetUserPagesFast, LAYOUT_PLAIN) }
#[kprobe]
pub fn pin_user_pages_fast(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::PinUserPagesFast, LAYOUT_PLAIN) }
#[kprobe]
pub fn get_user_pages_fast_only(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::GetUserPagesFastOnly, LAYOUT_PLAIN) }
#[kprobe]
pub fn get_user_pages_remote(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::GetUserPagesRemote, LAYOUT_REMOTE) }
#[kprobe]
pub fn pin_user_pages_remote(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::PinUserPagesRemote, LAYOUT_REMOTE) }
#[kprobe]
pub fn get_user_pages_unlocked(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::GetUserPagesUnlocked, LAYOUT_UNLOCKED) }
#[kprobe]
pub fn pin_user_pages_unlocked(ctx: ProbeContext) -> u32 { gup_enter(&ctx, Hook::PinUserPagesUnlocked, LAYOUT_UNLOCKED) }

#[kretprobe]
pub fn gup_return(ctx: RetProbeContext) -> u32 {
    acquire::exit(ctx.ret::<u64>());
    0
}

// ---- release: the unpin family, with a shared return program for nesting.
#[inline(always)]
fn unpin(f: impl FnOnce()) -> u32 {
    if release::enter_outermost() {
        f();
    }
    0
}

#[kprobe]
pub fn unpin_user_page(ctx: ProbeContext) -> u32 {
    unpin(|| release::folio_refs(Hook::UnpinUserPage as u16, rel::UNPIN, arg(&ctx, 0), 1))
}
#[kprobe]
pub fn unpin_user_pages(ctx: ProbeContext) -> u32 {
    unpin(|| release::page_array(Hook::UnpinUserPages as u16, rel::UNPIN, arg(&ctx, 0), arg(&ctx, 1), 0))
}
#[kprobe]
pub fn unpin_user_pages_dirty_lock(ctx: ProbeContext) -> u32 {
    unpin(|| {
        let dirty = (arg(&ctx, 2) & 0xff != 0) as u16;
        release::page_array(Hook::UnpinUserPagesDirtyLock as u16, rel::UNPIN, arg(&ctx, 0), arg(&ctx, 1), dirty)
    })
}
#[kprobe]
pub fn unpin_user_page_range_dirty_lock(ctx: ProbeContext) -> u32 {
    unpin(|| {
        let dirty = (arg(&ctx, 2) & 0xff != 0) as u16;
        release::page_range(Hook::UnpinUserPageRangeDirtyLock as u16, arg(&ctx, 0), arg(&ctx, 1), dirty)
    })
}
#[kprobe]
pub fn unpin_folio(ctx: ProbeContext) -> u32 {
    unpin(|| release::folio_refs(Hook::UnpinFolio as u16, rel::UNPIN, arg(&ctx, 0), 1))
}
#[kprobe]
pub fn unpin_folios(ctx: ProbeContext) -> u32 {
    unpin(|| release::page_array(Hook::UnpinFolios as u16, rel::UNPIN, arg(&ctx, 0), arg(&ctx, 1), 0))
}
#[kprobe]
pub fn unpin_user_folio(ctx: ProbeContext) -> u32 {
    unpin(|| release::folio_refs(Hook::UnpinUserFolio as u16, rel::UNPIN, arg(&ctx, 0), arg(&ctx, 1) & 0xffff_ffff))
}

#[kretprobe]
pub fn unpin_return(_ctx: RetProbeContext) -> u32 {
    release::exit();
    0
}

// ---- FOLL_GET releases we can see, and the page-free safety net.
#[kprobe]
pub fn bio_release_pages(ctx: ProbeContext) -> u32 {
    release::bio(Hook::BioReleasePages as u16, arg(&ctx, 0));
    0
}
#[kprobe]
pub fn __bio_release_pages(ctx: ProbeContext) -> u32 {
    release::bio(Hook::UnderscoreBioReleasePages as u16, arg(&ctx, 0));
    0
}
#[kprobe]
pub fn page_cache_pipe_buf_release(ctx: ProbeContext) -> u32 {
    release::pipe_buf(Hook::PageCachePipeBufRelease as u16, arg(&ctx, 1));
    0
}

#[raw_tracepoint(tracepoint = "mm_page_free")]
pub fn mm_page_free(ctx: RawTracePointContext) -> i32 {
    release::page_free(Hook::MmPageFree as u16, ctx.arg::<u64>(0));
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
#[aya_ebpf::macros::fentry(function = "get_user_pages_fast")]
pub fn probe_fentry(_ctx: aya_ebpf::programs::FEntryContext) -> u32 {
    0
}
