//! struct page arithmetic: pointer to pfn, subpage to folio head. Layouts come in as
//! globals written by user space from BTF, so no offset is compiled in.

use aya_ebpf::helpers::bpf_probe_read_kernel;

#[no_mangle]
static VMEMMAP_BASE_ADDR: u64 = 0;
#[no_mangle]
static VMEMMAP_BASE: u64 = 0;
#[no_mangle]
static STRUCT_PAGE_SIZE: u64 = 64;
#[no_mangle]
static PAGE_COMPOUND_HEAD_OFF: u64 = 8;

#[inline(always)]
fn global(v: &'static u64) -> u64 {
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
pub fn struct_page_size() -> u64 {
    global(&STRUCT_PAGE_SIZE)
}

/// The folio head of a (sub)page: compound_head has bit 0 set on tail pages and then
/// points one byte past the head.
#[inline(always)]
pub fn folio_head(page: u64) -> u64 {
    let field = (page + global(&PAGE_COMPOUND_HEAD_OFF)) as *const u64;
    match unsafe { bpf_probe_read_kernel(field) } {
        Ok(v) if v & 1 == 1 => v - 1,
        _ => page,
    }
}

/// pfn of a struct page pointer: (page - vmemmap_base) / sizeof(struct page).
#[inline(always)]
pub fn page_to_pfn(page: u64) -> u64 {
    let base = match global(&VMEMMAP_BASE) {
        0 => unsafe { bpf_probe_read_kernel(global(&VMEMMAP_BASE_ADDR) as *const u64) }.unwrap_or(0),
        calibrated => calibrated,
    };
    let size = struct_page_size();
    if base == 0 || size == 0 || page < base {
        return u64::MAX;
    }
    (page - base) / size
}

#[inline(always)]
pub fn head_pfn(page: u64) -> u64 {
    page_to_pfn(folio_head(page))
}
