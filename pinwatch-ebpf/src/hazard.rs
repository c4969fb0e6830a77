//! The hazard hooks: try_to_unmap_one, page_mkclean_one, ext4's per-page writeback, the
//! page-cache deletion and the dirtying of a folio. These run for every page under
//! reclaim and writeback, so an unpinned folio costs one PINS lookup and nothing more.
//! A pinned one is checked against the kernel's own counts (a release pinwatch could
//! not see leaves a stale entry, dropped here) and sent with what the kernel knows of
//! it; the engine in user space decides whether and how bad it is.

use aya_ebpf::EbpfContext;
use pinwatch_common::{backing, kind, page_op, pin_state, release, seen, PinState, RELEASE_FIXED};

use crate::{
    maps::{PAGE_SCRATCH, PINS, RELEASE_SCRATCH},
    page::{backing as backing_of, file_of, live, mapping, page_index, page_to_pfn, PageArg},
    pins::{block_page, block_pinner, block_unpin, maybe_pinned_head, BLOCK_EXPOSED, BLOCK_REFS},
    record::{fill_header, fill_stack, send, Nest},
};

/// `page` is the folio, or any page of it. With `kernel_pins`, folios missing from PINS are
/// still reported when the kernel counts them as DMA-pinned: the tracepoint-only mode,
/// where GUP calls cannot be seen at all. Without it, the caller has asked
/// pins::nothing_pinned already, before reading its argument.
#[inline(always)]
pub fn page_op<C: EbpfContext>(ctx: &C, hook: u16, op: u16, page: PageArg, kernel_pins: bool) {
    if page.addr() == 0 {
        return;
    }
    let head = page.head();
    // Most folios the kernel writes back, cleans or frees are pinned by no one: the
    // filter says so without hashing.
    if !kernel_pins && !maybe_pinned_head(head) {
        return;
    }
    let pfn = page_to_pfn(head);
    // Dirtying matters only after the folio was exposed (unmapped, cleaned, written
    // back, dropped): a direct-I/O read dirtying its own pinned page is the normal
    // course, and a record per read would be most of its cost.
    let dirty = op == page_op::DIRTY;
    let (in_pins, mut state) = match PINS.get_ptr_mut(&pfn) {
        Some(s) => unsafe {
            if !dirty {
                (*s).state |= pin_state::EXPOSED;
            }
            (true, *s)
        },
        None => (false, PinState::default()),
    };
    // Long-term pins of small folios are counted in their block instead (PIN_BLOCKS).
    let block = block_page(pfn, !dirty);
    let block_refs = (block & BLOCK_REFS) as u32;
    if !in_pins && block_refs == 0 && !kernel_pins {
        return;
    }
    if dirty && (in_pins || block_refs != 0) && state.state & pin_state::EXPOSED == 0 && block & BLOCK_EXPOSED == 0 {
        return;
    }
    if block_refs != 0 {
        state.pin_refs += block_refs;
        if !in_pins {
            if let Some((tgid, gup_flags, first)) = block_pinner(pfn) {
                state.tgid = tgid;
                state.gup_flags = gup_flags;
                state.first_ts_ns = first;
            }
        }
    }
    let l = live(head);
    let known = state.pin_refs != 0 || state.get_refs != 0;
    if known {
        if drop_if_gone(hook, pfn, &state, &l) {
            return;
        }
    } else if !l.maybe_dma_pinned {
        return;
    }
    let Some(nest) = Nest::enter() else { return };
    let Some(rec) = PAGE_SCRATCH.get_ptr_mut(nest.level) else { return };
    let r = unsafe { &mut *rec };
    fill_header(&mut r.header, kind::PAGE, hook);
    r.op = op;
    r.seen = if known { seen::PINS } else { seen::KERNEL_PIN_COUNT };
    r.order = l.order;
    r.pfn = pfn;
    let m = mapping(head);
    r.backing = backing_of(m);
    if r.backing == backing::FILE {
        r.file = file_of(m);
        r.index = page_index(head);
    } else {
        r.file = Default::default();
        r.index = 0;
    }
    r.refcount = l.refcount;
    r.pincount = l.pincount;
    fill_stack(ctx, &mut r.stack);
    r.pin_refs = state.pin_refs;
    r.get_refs = state.get_refs;
    r.pinner_tgid = state.tgid;
    r.gup_flags = state.gup_flags;
    r.first_ts_ns = state.first_ts_ns;
    send(r, core::mem::size_of::<pinwatch_common::PageRecord>(), true);
}

/// FOLL_PIN refs show in the kernel's pin count, FOLL_GET refs in _refcount beyond
/// what mappings and the page cache hold. Counts too low mean the release went unseen:
/// the entry is dropped and user space told, so that no hazard is ever reported
/// against a pin already released (the page may have been freed and reused).
#[inline(always)]
fn drop_if_gone(hook: u16, pfn: u64, state: &PinState, l: &crate::page::Live) -> bool {
    let pins_gone = state.pin_refs != 0 && !l.maybe_dma_pinned;
    if pins_gone || l.gets_gone(state.get_refs) {
        // A block's references are FOLL_PIN ones: gone only with the kernel's pin count.
        let block = if pins_gone { block_unpin(pfn, u32::MAX as u64) } else { 0 };
        // User space hears only of references it was sent, or of an exposed folio.
        if crate::release::forget(pfn, state) || block != 0 || state.state & pin_state::EXPOSED != 0 {
            send_gone(hook, pfn);
        }
        return true;
    }
    false
}

/// Re-checks one folio pinwatch believes pinned, on user space's request (run through
/// BPF_PROG_TEST_RUN, attached nowhere): FOLL_GET references dropped by an inline
/// put_page leave no other trace.
#[inline(always)]
pub fn sweep(pfn: u64) {
    let Some(s) = PINS.get_ptr(&pfn) else {
        let _ = crate::maps::QUIET_GETS.remove(&pfn);
        return;
    };
    let state = unsafe { *s };
    let head = crate::page::PfnMath::new().page(pfn);
    if head == 0 {
        return;
    }
    drop_if_gone(pinwatch_common::Hook::Sweep as u16, pfn, &state, &live(head));
}

/// One release record saying every reference pinwatch knew on `pfn` is gone.
#[inline(always)]
fn send_gone(hook: u16, pfn: u64) {
    let Some(nest) = Nest::enter() else { return };
    let Some(rec) = RELEASE_SCRATCH.get_ptr_mut(nest.level) else { return };
    let r = unsafe { &mut *rec };
    fill_header(&mut r.header, kind::RELEASE, hook);
    r.release = release::GONE;
    r.dirty = 0;
    r.chunk = 0;
    r.nr_pfns = 1;
    r.call_id = (r.header.ts_ns << 16) ^ r.header.tid as u64;
    r.refs_each = 1;
    r.pfns[0] = pfn;
    send(r, RELEASE_FIXED + 8, false);
}
