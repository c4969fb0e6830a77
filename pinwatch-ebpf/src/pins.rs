//! PINS and its filter together: every entry added or removed is counted in its filter
//! slot, and every page hook asks the filter before PINS.

use pinwatch_common::{PinState, BLOCK_PAGES, BLOCK_SHIFT};

use crate::{
    maps::{atomic_add, BLOCK_SCRATCH, PINS, PIN_BLOCKS, PIN_FILTER, PIN_FILTER_SLOTS},
    page::{struct_page_index, PfnMath},
};

/// Every count PIN_FILTER holds, summed: PINS entries and block references in all. At
/// 0 (nothing pinned is watched: a host whose pins are all direct I/O into anonymous
/// memory, while monitoring) every page hook answers with one load, before it reads the
/// page or looks at the filter. Kept with the filter, by filter_add, in .bss.
#[no_mangle]
static mut PINNED_TOTAL: u64 = 0;

/// Whether PINS and PIN_BLOCKS hold nothing at all (then no page is watched).
#[inline(always)]
pub fn nothing_pinned() -> bool {
    unsafe { core::ptr::read_volatile(&raw const PINNED_TOTAL) == 0 }
}

/// Whether the folio whose head struct page is at `head` may be in PINS (false:
/// certainly not). The filter is keyed by the struct page's address, so that the hooks
/// on every page freed or dirtied answer before any pfn arithmetic.
#[inline(always)]
pub fn maybe_pinned_head(head: u64) -> bool {
    if nothing_pinned() {
        return false;
    }
    let (index, lane) = filter_slot(head);
    PIN_FILTER.get(index).is_some_and(|n| (*n >> lane) as u32 != 0)
}

/// maybe_pinned_head by folio head pfn.
#[inline(always)]
pub fn maybe_pinned(pfn: u64) -> bool {
    maybe_pinned_head(PfnMath::new().page(pfn))
}

/// The filter value holding `head`'s slot, and the slot's shift in it (0 or 32).
#[inline(always)]
fn filter_slot(head: u64) -> (u32, u64) {
    let slot = struct_page_index(head) % PIN_FILTER_SLOTS as u64;
    ((slot >> 1) as u32, (slot & 1) << 5)
}

/// A new PINS entry for `pfn`, counted in its filter slot.
#[inline(always)]
pub fn pins_insert(pfn: u64, state: &PinState) -> bool {
    // BPF_NOEXIST: a racing CPU's entry is kept, and the caller adds to it.
    if PINS.insert(&pfn, state, 1).is_err() {
        return false;
    }
    filter_add(pfn, 1);
    true
}

/// The PINS entry of `pfn` goes, and leaves its filter slot.
#[inline(always)]
pub fn pins_remove(pfn: u64) {
    if PINS.remove(&pfn).is_ok() {
        filter_add(pfn, u32::MAX);
    }
}

#[inline(always)]
fn filter_add(pfn: u64, v: u32) {
    atomic_add(&raw mut PINNED_TOTAL, v as i32 as i64 as u64);
    let (index, lane) = filter_slot(PfnMath::new().page(pfn));
    if let Some(n) = PIN_FILTER.get_ptr_mut(index) {
        // `v` as a signed count, moved into its lane: taking away from a slot that
        // counts at least as much never borrows from the other slot of the value.
        atomic_add(n, ((v as i32 as i64) << lane) as u64);
    }
}

/// PIN_BLOCKS answers: the page's references in the low 32 bits, and whether it was
/// exposed (by a hazard hook, before this call).
pub const BLOCK_EXPOSED: u64 = 1 << 32;
pub const BLOCK_REFS: u64 = 0xffff_ffff;

#[inline(always)]
fn block_of(pfn: u64) -> (u64, usize) {
    (pfn >> BLOCK_SHIFT, (pfn & (BLOCK_PAGES as u64 - 1)) as usize)
}

/// One streamed long-term FOLL_PIN reference on the small folio `pfn` (or one older
/// than pinwatch, found by the start-up scan), in its block;
/// false when the block had no room (the caller tracks it in PINS). Each reference is
/// counted in the page's filter slot, so releases need no transition test (5.10 has
/// no atomic fetch). A global function, verified once.
#[no_mangle]
#[inline(never)]
pub extern "C" fn block_pin(pfn: u64, tgid: u64, gup_flags: u64, ts: u64) -> bool {
    let (key, i) = block_of(pfn);
    let b = match PIN_BLOCKS.get_ptr_mut(&key) {
        Some(b) => b,
        None => {
            // Built in map memory: on the BPF stack it took the GUP programs' combined
            // stack past 512 bytes. Only GUP return programs and the start-up scan
            // (found_pfns, run by user space with preemption off) call this, in task
            // context and never nested in each other, so one slot per CPU serves.
            let Some(first) = BLOCK_SCRATCH.get_ptr_mut(0) else { return false };
            let first = unsafe { &mut *first };
            first.pin_refs = [0; BLOCK_PAGES];
            first.exposed = [0; BLOCK_PAGES];
            first.pin_refs[i & (BLOCK_PAGES - 1)] = 1;
            first.held = 1;
            first.tgid = tgid as u32;
            first.gup_flags = gup_flags as u32;
            first.first_ts_ns = ts;
            // BPF_NOEXIST: a racing CPU's block is kept, and this one adds to it.
            if PIN_BLOCKS.insert(&key, first, 1).is_ok() {
                filter_add(pfn, 1);
                return true;
            }
            match PIN_BLOCKS.get_ptr_mut(&key) {
                Some(b) => b,
                None => return false,
            }
        }
    };
    unsafe {
        atomic_add(&mut (*b).pin_refs[i & (BLOCK_PAGES - 1)], 1);
        atomic_add(&mut (*b).held, 1);
        (*b).tgid = tgid as u32;
        (*b).gup_flags |= gup_flags as u32;
    }
    filter_add(pfn, 1);
    true
}

/// The block references of `pfn` and whether it was exposed; with `expose`, marks it
/// exposed when it holds any (a hazard hook unmapped, cleaned, wrote back or dropped
/// it). Global, verified once.
#[no_mangle]
#[inline(never)]
pub extern "C" fn block_page(pfn: u64, expose: bool) -> u64 {
    let (key, i) = block_of(pfn);
    let Some(b) = PIN_BLOCKS.get_ptr_mut(&key) else { return 0 };
    let i = i & (BLOCK_PAGES - 1);
    unsafe {
        let refs = (*b).pin_refs[i] as u64;
        if refs == 0 {
            return 0;
        }
        let was = if (*b).exposed[i] != 0 { BLOCK_EXPOSED } else { 0 };
        if expose {
            (*b).exposed[i] = 1;
        }
        refs | was
    }
}

/// Drops up to `n` block references of `pfn` (`n` = u32::MAX: all of them, the page is
/// freed or its pins gone); returns how many went, with BLOCK_EXPOSED. A page left
/// with none is no longer exposed, and a block left with none goes. Global.
#[no_mangle]
#[inline(never)]
pub extern "C" fn block_unpin(pfn: u64, n: u64) -> u64 {
    let (key, i) = block_of(pfn);
    let Some(b) = PIN_BLOCKS.get_ptr_mut(&key) else { return 0 };
    let i = i & (BLOCK_PAGES - 1);
    unsafe {
        let refs = (*b).pin_refs[i] as u64;
        let take = if n < refs { n } else { refs };
        if take == 0 {
            return 0;
        }
        let was = if (*b).exposed[i] != 0 { BLOCK_EXPOSED } else { 0 };
        atomic_add(&mut (*b).pin_refs[i], (take as u32).wrapping_neg());
        if take == refs {
            (*b).exposed[i] = 0;
        }
        atomic_add(&mut (*b).held, (take as u32).wrapping_neg());
        filter_add(pfn, (take as u32).wrapping_neg());
        // A pin racing in between is lost with the block, as PINS's removal can lose one.
        if (*b).held == 0 {
            let _ = PIN_BLOCKS.remove(&key);
        }
        take | was
    }
}

/// The latest pinner's tgid, flags and first time of `pfn`'s block (a hazard record
/// of a page only the block knows).
#[inline(always)]
pub fn block_pinner(pfn: u64) -> Option<(u32, u32, u64)> {
    let b = unsafe { PIN_BLOCKS.get(&(pfn >> BLOCK_SHIFT)) }?;
    Some((b.tgid, b.gup_flags, b.first_ts_ns))
}
