//! Pins older than pinwatch. User space reads a process's page table from
//! /proc/PID/pagemap and hands its pfns over in batches (map FOUND); for each page whose
//! folio the kernel counts as DMA-pinned (the same test as folio_maybe_dma_pinned), a
//! reference of that process goes into its block (PIN_BLOCKS, a small folio) or into
//! PINS, marked found: from then on its hazards and its release are watched like those
//! of a pin pinwatch saw being taken.

use pinwatch_common::{backing as bk, counter, found, pin_state, PinState, FOUND_BATCH, GUP_PIN_COUNTING_BIAS};

use crate::{
    maps::{atomic_add, count, FOUND, PINS},
    pins::{block_page, block_pin, pins_insert, BLOCK_REFS},
    page::{backing, file_of, live, mapping, PfnMath},
};

/// include/uapi/linux/magic.h: shmem/tmpfs and hugetlbfs, page cache that is memory.
const TMPFS_MAGIC: u64 = 0x0102_1994;
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;

/// Answers every page of the batch in place.
#[inline(always)]
pub fn batch() {
    let Some(b) = FOUND.get_ptr_mut(0) else { return };
    let b = unsafe { &mut *b };
    let (tgid, flags, ts, n) = (b.tgid as u64, b.gup_flags as u64, b.ts_ns, b.nr as usize);
    let base = PfnMath::new().base();
    for i in 0..FOUND_BATCH {
        if i >= n {
            break;
        }
        b.pfns[i] = found_pfn(b.pfns[i], base, tgid, flags, ts);
    }
}

/// One mapped page of `tgid`: a [`found`] answer. References are added one per mapped
/// page up to the kernel's own pin count of the folio (_pincount of a large folio, or
/// refcount / GUP_PIN_COUNTING_BIAS of a small one), so a huge folio mapped whole but
/// pinned in part is not counted whole. A global function, verified once.
#[no_mangle]
#[inline(never)]
pub extern "C" fn found_pfn(pfn: u64, base: u64, tgid: u64, flags: u64, ts: u64) -> u64 {
    let math = PfnMath::with_base(base);
    let page = math.page(pfn);
    if page == 0 {
        return 0;
    }
    let head = math.head(page);
    let head_pfn = math.pfn(head);
    if head_pfn == u64::MAX {
        return 0;
    }
    let l = live(head);
    if !l.maybe_dma_pinned {
        return 0;
    }
    let m = mapping(head);
    let mut answer = head_pfn & found::PFN_MASK | (l.order as u64 & 63) << found::ORDER_SHIFT;
    if backing(m) == bk::FILE {
        answer |= found::FILE;
        let magic = file_of(m).fs_magic;
        if magic == TMPFS_MAGIC || magic == HUGETLBFS_MAGIC {
            answer |= found::MEMORY_FS;
        }
    }
    let kernel_refs = if l.pincount >= 0 { l.pincount as u32 } else { (l.refcount / GUP_PIN_COUNTING_BIAS) as u32 };
    let first = PinState {
        tgid: tgid as u32,
        gup_flags: flags as u32,
        first_ts_ns: ts,
        pin_refs: 1,
        get_refs: 0,
        quiet_refs: 0,
        state: pin_state::FOUND,
    };
    // A small folio's pins go into its block (PIN_BLOCKS), the dense form for what
    // stays pinned for hours, as a long-term pin seen being taken does: a pin older
    // than pinwatch is long-term by nature. A page the block already counts as many
    // pins as the kernel does is known (seen since start, or found through another
    // mapping); one in PINS stays there; one whose block finds no room goes to PINS.
    if l.order == 0 {
        let have = (block_page(head_pfn, false) & BLOCK_REFS) as u32;
        if have >= kernel_refs && have != 0 {
            return answer | found::KNOWN;
        }
        if (have != 0 || PINS.get_ptr(&head_pfn).is_none()) && block_pin(head_pfn, tgid, flags, ts) {
            return answer | found::ADOPTED;
        }
    }
    if pins_insert(head_pfn, &first) {
        return answer | found::ADOPTED;
    }
    let Some(s) = PINS.get_ptr_mut(&head_pfn) else {
        count(counter::PIN_MAP_FULL, 1);
        return answer | found::FULL;
    };
    let s = unsafe { &mut *s };
    if s.state & pin_state::FOUND != 0 && s.tgid == tgid as u32 && s.pin_refs < kernel_refs {
        atomic_add(&mut s.pin_refs, 1);
        return answer | found::ADOPTED;
    }
    answer | found::KNOWN
}
