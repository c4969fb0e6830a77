//! vmemmap_base from two views of one page free: the raw tracepoint sees the struct
//! page pointer, the regular tracepoint (which runs after it, being registered later)
//! the pfn the kernel computed from it. base = page - pfn * sizeof(struct page).

use aya_ebpf::programs::TracePointContext;
use pinwatch_common::calib;

use crate::{
    maps::{CALIB, CALIB_PAGE},
    page::struct_page_size,
};

#[no_mangle]
static MM_PAGE_FREE_PFN_OFF: u64 = 8;

#[inline(always)]
pub fn remember_page(page: u64) {
    if let Some(slot) = CALIB_PAGE.get_ptr_mut(0) {
        unsafe { *slot = page };
    }
}

#[inline(always)]
pub fn sample_pfn(ctx: &TracePointContext) {
    let off = unsafe { core::ptr::read_volatile(&MM_PAGE_FREE_PFN_OFF) } as usize;
    let Ok(pfn) = (unsafe { ctx.read_at::<u64>(off & 0xff) }) else { return };
    let Some(slot) = CALIB_PAGE.get_ptr_mut(0) else { return };
    let page = unsafe { *slot };
    unsafe { *slot = 0 };
    if page == 0 {
        return;
    }
    let base = page.wrapping_sub(pfn.wrapping_mul(struct_page_size()));
    let (Some(b), Some(n), Some(bad)) = (
        CALIB.get_ptr_mut(calib::BASE),
        CALIB.get_ptr_mut(calib::SAMPLES),
        CALIB.get_ptr_mut(calib::DISAGREEMENTS),
    ) else {
        return;
    };
    unsafe {
        if *b == 0 {
            *b = base;
        } else if *b != base {
            *bad += 1;
        }
        *n += 1;
    }
}
