//! PINS and its filter together: every entry added or removed is counted in its filter
//! slot, and every page hook asks the filter before PINS.

use pinwatch_common::PinState;

use crate::{
    maps::{atomic_add, PINS, PIN_FILTER, PIN_FILTER_SLOTS},
    page::{struct_page_index, PfnMath},
};

/// Whether the folio whose head struct page is at `head` may be in PINS (false:
/// certainly not). The filter is keyed by the struct page's address, so that the hooks
/// on every page freed or dirtied answer before any pfn arithmetic.
#[inline(always)]
pub fn maybe_pinned_head(head: u64) -> bool {
    PIN_FILTER.get(filter_slot(head)).is_some_and(|n| *n != 0)
}

/// maybe_pinned_head by folio head pfn.
#[inline(always)]
pub fn maybe_pinned(pfn: u64) -> bool {
    maybe_pinned_head(PfnMath::new().page(pfn))
}

#[inline(always)]
fn filter_slot(head: u64) -> u32 {
    (struct_page_index(head) % PIN_FILTER_SLOTS as u64) as u32
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
    if let Some(n) = PIN_FILTER.get_ptr_mut(filter_slot(PfnMath::new().page(pfn))) {
        atomic_add(n, v);
    }
}
