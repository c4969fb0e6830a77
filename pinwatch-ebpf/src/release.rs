//! Releases of pages pinwatch saw being taken: the unpin family (FOLL_PIN), the
//! put_page calls we can see for FOLL_GET references (bio and pipe buffer release), and
//! page free, after which no reference of any kind can be left.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use pinwatch_common::{counter, kind, pin_state, release, PinState, MAX_CHUNKS, PFNS_PER_RECORD, RELEASE_FIXED};

use crate::{
    acquire::in_gup_call,
    maps::{atomic_add, count, BLOCK_UNSENT, KNOWN, PINS, PROC_PINS, QUIET_GETS, RELEASE_DEPTH, RELEASE_SCRATCH},
    page::{head_pfn, kernel_u64, page_to_pfn, struct_page_size, PageArg, PfnMath},
    pins::{block_unpin, maybe_pinned, maybe_pinned_head, nothing_pinned, pins_remove, BLOCK_EXPOSED, BLOCK_REFS},
    record::{current, fill_header, send, stream_all, Nest},
};

/// KNOWN bits: the chunk names a pfn user space must hear of; one of them was exposed;
/// and, from bit 32, the references each named pfn loses (see release_pfn).
const KNOWN_SEND: u64 = 1;
const KNOWN_EXPOSED: u64 = 2;
const KNOWN_HEARD_SHIFT: u64 = 32;

#[no_mangle]
static BIO_IO_VEC_OFF: u64 = 0;
#[no_mangle]
static BIO_VCNT_OFF: u64 = 0;
#[no_mangle]
static PIPE_BUFFER_PAGE_OFF: u64 = 0;

const MAX_PAGES: u64 = (PFNS_PER_RECORD * MAX_CHUNKS) as u64;

/// Drop one reference of kind `release` from the pin state of `pfn`; returns `pfn` if
/// user space must hear of it (a reference it was sent, or any reference of a folio a
/// hazard hook exposed), else u64::MAX.
/// A global function: the verifier checks it once, not at every unrolled call site.
#[no_mangle]
#[inline(never)]
pub extern "C" fn release_pfn(pfn: u64, release: u64, level: u64, refs: u64) -> u64 {
    if pfn == u64::MAX || !maybe_pinned(pfn) {
        return u64::MAX;
    }
    let heard = track_release(pfn, release as u16, level as u32, refs as u32);
    if heard == 0 {
        return u64::MAX;
    }
    // How many references user space must drop, above the KNOWN bits: 1 for an item
    // of an array (its items release one each), the count for one folio's many.
    if let Some(k) = KNOWN.get_ptr_mut(level as u32) {
        unsafe { *k |= (heard as u64) << KNOWN_HEARD_SHIFT };
    }
    pfn
}

/// Folio head pfn of the page pointer stored at `slot` (u64::MAX if unreadable).
#[no_mangle]
#[inline(never)]
pub extern "C" fn slot_pfn(slot: u64) -> u64 {
    PfnMath::new().head_pfn(kernel_u64(slot))
}

/// Drops `n` references of kind `release` from the pin state of `pfn`: PINS first,
/// then, for an unpin, its block's long-term references (PIN_BLOCKS); a free drops
/// everything. Quiet references (never streamed) are dropped first: transient pins come
/// and go while the long-term ones user space knows stay. A quiet reference released
/// leaves its process's quiet_held count. Returns how many of the dropped references
/// user space must hear of: those it was sent, or all of them on a folio a hazard
/// exposed (a free or a `gone` says 1: all of them).
#[inline(always)]
fn track_release(pfn: u64, release: u16, level: u32, n: u32) -> u32 {
    let gone = release == release::FREED || release == release::GONE;
    let (heard, left) = match PINS.get_ptr_mut(&pfn) {
        Some(s) => pins_release(pfn, unsafe { &mut *s }, release, level, n),
        None => (0, n),
    };
    if left == 0 || !(gone || release == release::UNPIN) {
        return heard;
    }
    let b = block_unpin(pfn, if gone { u32::MAX as u64 } else { left as u64 });
    if b & BLOCK_EXPOSED != 0 {
        if let Some(k) = KNOWN.get_ptr_mut(level) {
            unsafe { *k |= KNOWN_EXPOSED };
        }
    }
    let taken = (b & BLOCK_REFS) as u32;
    if gone {
        heard | (taken != 0) as u32
    } else if taken != 0 && b & BLOCK_EXPOSED == 0 && !stream_all() {
        // While monitoring, an unpin of what the block held is not sent: unregistering
        // 512 MiB of base pages would be 131072 records at once. The block is the
        // truth; user space compares with it when this count moves (see BLOCK_UNSENT).
        if let Some(c) = BLOCK_UNSENT.get_ptr_mut(0) {
            atomic_add(c, taken as u64);
        }
        heard
    } else {
        heard + taken
    }
}

/// track_release's part in PINS: how many user space must hear of, and how many of the
/// `n` references PINS did not hold (an unpin's go on to the block; after a free, `n`).
#[inline(always)]
fn pins_release(pfn: u64, s: &mut PinState, release: u16, level: u32, n: u32) -> (u32, u32) {
    let exposed = s.state & pin_state::EXPOSED != 0;
    if exposed {
        if let Some(k) = KNOWN.get_ptr_mut(level) {
            unsafe { *k |= KNOWN_EXPOSED };
        }
    }
    if release == release::FREED || release == release::GONE {
        return ((forget(pfn, s) || exposed) as u32, n);
    }
    let refs = if release == release::UNPIN { &mut s.pin_refs } else { &mut s.get_refs };
    let take = n.min(*refs);
    if take == 0 {
        return (0, n);
    }
    *refs -= take;
    let quiet = take.min(s.quiet_refs);
    if quiet > 0 {
        s.quiet_refs -= quiet;
        unquiet(s.tgid, quiet as u64);
    }
    if s.get_refs == 0 && quiet > 0 && release == release::PUT {
        let _ = QUIET_GETS.remove(&pfn);
    }
    if s.pin_refs == 0 && s.get_refs == 0 {
        pins_remove(pfn);
    }
    (if exposed { take } else { take - quiet }, n - take)
}

/// Every reference on `pfn` is gone (freed, or found gone by a hazard hook or the
/// sweep): its entries leave PINS and QUIET_GETS, its quiet references their process's
/// count. Returns whether any reference had been streamed.
#[inline(always)]
pub fn forget(pfn: u64, s: &PinState) -> bool {
    let (tgid, quiet, streamed) = (s.tgid, s.quiet_refs, s.pin_refs + s.get_refs > s.quiet_refs);
    unquiet(tgid, quiet as u64);
    if quiet != 0 {
        let _ = QUIET_GETS.remove(&pfn);
    }
    pins_remove(pfn);
    streamed
}

/// `n` quiet references of `tgid` are gone.
#[inline(always)]
fn unquiet(tgid: u32, n: u64) {
    if n == 0 {
        return;
    }
    if let Some(p) = PROC_PINS.get_ptr_mut(&tgid) {
        unsafe { atomic_add(&mut (*p).quiet_held, n.wrapping_neg()) };
    }
}

/// Where release_items finds its items' pages (release_chunk's `how`, its low byte).
mod items {
    /// An array of page pointers: item i at src + i * 8.
    pub const SLOTS: u64 = 0;
    /// Consecutive struct pages from src.
    pub const RANGE: u64 = 1;
    /// The bio_vecs at src: item i is page i % PAGES_PER_BVEC of bvec i / PAGES_PER_BVEC.
    pub const BVECS: u64 = 2;
    /// One folio, whose head pfn is src.
    pub const PFN: u64 = 3;
}

/// Folio head pfn of item `i` of a release (see `items`; u64::MAX: none).
/// A global function: the verifier checks it once, not in every chunk's loop.
#[no_mangle]
#[inline(never)]
pub extern "C" fn item_pfn(src: u64, how: u64, i: u64) -> u64 {
    match how {
        items::SLOTS => slot_pfn(src + i * 8),
        items::RANGE => range_pfn(src, i),
        items::BVECS => bvec_page_pfn(src + (i / PAGES_PER_BVEC) * 16, i % PAGES_PER_BVEC),
        _ => src,
    }
}

/// Sends a release of `n` items (see `items`), each losing `refs` references, as one
/// record per PFNS_PER_RECORD items, up to MAX_PAGES: every page of an unpin of an
/// io_uring buffer, an RDMA or a VFIO mapping (256 and 512 pages per call), so that none
/// is left held until its page is freed. Pfns pinwatch did not know are sent as
/// u64::MAX and skipped by user space; a chunk that names none is not sent.
#[inline(always)]
fn release_items(hook: u16, release: u16, dirty: u16, n: u64, refs: u64, src: u64, how: u64) {
    // Nothing watched: no item can be known, and the record would not go.
    if nothing_pinned() {
        return;
    }
    let Some(nest) = Nest::enter() else { return };
    let Some(rec) = RELEASE_SCRATCH.get_ptr_mut(nest.level) else {
        return;
    };
    let r = unsafe { &mut *rec };
    // Filled before the loop although most releases send nothing: filled in the loop, on
    // the first chunk sent, it cost 5.10's verifier the bound of the record's length.
    fill_header(&mut r.header, kind::RELEASE, hook);
    r.release = release;
    r.dirty = dirty;
    r.call_id = (r.header.ts_ns << 16) ^ r.header.tid as u64;
    let how_refs = how | refs.min(u32::MAX as u64) << 8;
    for chunk in 0..MAX_CHUNKS {
        if (chunk * PFNS_PER_RECORD) as u64 >= n {
            break;
        }
        release_chunk(nest.level as u64, src, how_refs, chunk as u64, n);
    }
}

/// Chunk `chunk` of a release being filled in RELEASE_SCRATCH at `level`: items
/// chunk * PFNS_PER_RECORD onwards of `n`, slot j of the record for item
/// chunk * PFNS_PER_RECORD + j, so that the verifier sees one shape per iteration.
/// `how_refs`: the items' kind (low byte) and the references each loses. A global
/// function, like pin_chunk: a chunk costs the verifier a call site.
#[no_mangle]
#[inline(never)]
pub extern "C" fn release_chunk(level: u64, src: u64, how_refs: u64, chunk: u64, n: u64) -> u64 {
    let Some(rec) = RELEASE_SCRATCH.get_ptr_mut(level as u32) else { return 0 };
    let r = unsafe { &mut *rec };
    let (how, refs) = (how_refs & 0xff, how_refs >> 8);
    let base = chunk * PFNS_PER_RECORD as u64;
    if base >= n {
        return 0;
    }
    let used = (n - base).min(PFNS_PER_RECORD as u64) as u16;
    // Whether any pfn was known, kept in map memory: a flag in a register would
    // double the verifier's states at every item.
    let Some(known) = KNOWN.get_ptr_mut(level as u32) else { return 0 };
    unsafe { *known = 0 };
    for j in 0..PFNS_PER_RECORD {
        if j as u16 >= used {
            break;
        }
        let pfn = release_pfn(item_pfn(src, how, base + j as u64), r.release as u64, level, refs);
        // The mask makes the slot bound explicit to the verifier.
        r.pfns[j & (PFNS_PER_RECORD - 1)] = pfn;
        unsafe { *known |= (pfn != u64::MAX) as u64 * KNOWN_SEND };
    }
    let k = unsafe { *known };
    if k & KNOWN_SEND == 0 {
        return 0;
    }
    r.chunk = chunk as u16;
    r.nr_pfns = used;
    r.refs_each = (k >> KNOWN_HEARD_SHIFT) as u32;
    // The length from the count just stored in the record, read back from map
    // memory: a fresh bound. `used` itself can reach the call with the bounds of
    // a path that cannot happen (5.10's and 6.1's verifiers walk some, and keep
    // a spilled scalar's bounds), which refused the fentry twins of
    // unpin_user_pages there.
    let used = unsafe { core::ptr::read_volatile(&r.nr_pfns) } as usize;
    // A dirtying release of an exposed page is a hazard: user space hears now.
    send(r, RELEASE_FIXED + used * 8, k & KNOWN_EXPOSED != 0 && r.dirty != 0);
    1
}

/// Only the outermost release call of a thread is recorded, and none inside a GUP call
/// (FOLL_LONGTERM pins that must migrate are unpinned and retried inside GUP, before
/// pinwatch ever reported them).
#[inline(always)]
pub fn enter_outermost() -> bool {
    let (_, tid) = current();
    if in_gup_call(tid) {
        return false;
    }
    if let Some(d) = RELEASE_DEPTH.get_ptr_mut(&tid) {
        unsafe { *d += 1 };
        return false;
    }
    // No room: this call is recorded, and so are the releases it nests, counted.
    if RELEASE_DEPTH.insert(&tid, &1, 0).is_err() {
        count(counter::CALL_MAP_FULL, 1);
    }
    true
}

/// For release functions that call no other hooked one (they have no return program):
/// whether this call is inside a GUP call or inside an outer release, where it must
/// not count. Looked up only for a folio PIN_FILTER says may be pinned.
#[inline(always)]
pub fn nested() -> bool {
    let (_, tid) = current();
    in_gup_call(tid) || RELEASE_DEPTH.get_ptr(&tid).is_some()
}

/// Counterpart of every enter_outermost, called from the return probe.
#[inline(always)]
pub fn exit() {
    let (_, tid) = current();
    if let Some(d) = RELEASE_DEPTH.get_ptr_mut(&tid) {
        unsafe {
            if *d <= 1 {
                let _ = RELEASE_DEPTH.remove(&tid);
            } else {
                *d -= 1;
            }
        }
    }
}


/// unpin_user_pages and friends: an array of page pointers.
#[inline(always)]
pub fn page_array(hook: u16, release: u16, pages: u64, npages: u64, dirty: u16) {
    // An array longer than one record that is one folio's pages (io_uring's coalescing
    // unpins 255 or 511 pages of one huge folio at once, 6.10 to 7.0) goes as its first
    // page with the count; any other goes page by page, up to MAX_PAGES, and what is
    // past that is counted.
    // One call of release_items either way: two in one program cost 5.10's and 6.1's
    // verifiers the bound of the record's length.
    let one_folio = npages > PFNS_PER_RECORD as u64 && is_one_folio(pages, npages);
    let (n, refs) = if one_folio { (1, npages) } else { (npages.min(MAX_PAGES), 1) };
    if !one_folio && npages > MAX_PAGES {
        count(counter::PFNS_TRUNCATED, npages - MAX_PAGES);
    }
    release_items(hook, release, dirty, n, refs, pages, items::SLOTS);
}

/// Whether the `npages` page pointers at `pages` are consecutive struct pages of one
/// folio: the first and the last have one head, and as many struct pages lie between.
#[no_mangle]
#[inline(never)]
pub extern "C" fn is_one_folio(pages: u64, npages: u64) -> bool {
    if npages == 0 {
        return false;
    }
    let (first, last) = (kernel_u64(pages), kernel_u64(pages + (npages - 1) * 8));
    let math = PfnMath::new();
    let head = math.head_pfn(first);
    first != 0 && head != u64::MAX && last == first + (npages - 1) * struct_page_size() && math.head_pfn(last) == head
}

/// unpin_user_page_range_dirty_lock: npages consecutive struct pages from `page`.
#[inline(always)]
pub fn page_range(hook: u16, page: u64, npages: u64, dirty: u16) {
    if npages > MAX_PAGES {
        count(counter::PFNS_TRUNCATED, npages - MAX_PAGES);
    }
    release_items(hook, release::UNPIN, dirty, npages.min(MAX_PAGES), 1, page, items::RANGE);
}

/// Folio head pfn of struct page `i` from `page`. A global function, like slot_pfn:
/// inlined, its head lookup cost 6.1's verifier 2.6 s at each start under emulation.
#[no_mangle]
#[inline(never)]
pub extern "C" fn range_pfn(page: u64, i: u64) -> u64 {
    head_pfn(page + i * struct_page_size())
}

/// `refs` references on one folio (unpin_user_folio, unpin_folio, unpin_user_page,
/// and the put_page of a pipe buffer); their programs ask pins::nothing_pinned first.
/// `leaf`: a release function without a return program, which asks whether it is
/// nested only once the folio may be pinned.
#[inline(always)]
pub fn folio_refs(hook: u16, release: u16, page: PageArg, refs: u64, leaf: bool) {
    let head = page.head();
    if page.addr() == 0 || !maybe_pinned_head(head) || (leaf && nested()) {
        return;
    }
    let pfn = page_to_pfn(head);
    if pfn == u64::MAX {
        return;
    }
    // All `refs` at once, however many: one record naming the pfn once, with the count
    // user space must drop.
    release_items(hook, release, 0, 1, refs.clamp(1, u32::MAX as u64), pfn, items::PFN);
}

/// Pages per bio_vec looked at. A bvec spans several pages when they are physically
/// contiguous (common for freshly allocated page cache); pages past this are left to
/// the page-free safety net.
const PAGES_PER_BVEC: u64 = 16;

/// bio_release_pages / __bio_release_pages(bio, mark_dirty): one put_page per page of
/// every bio_vec, each page dirtied first when mark_dirty (a direct-I/O read completing).
/// Item i is page i % PAGES_PER_BVEC of bvec i / PAGES_PER_BVEC.
#[inline(always)]
pub fn bio(hook: u16, bio: u64, dirty: u16) {
    let vec = kernel_u64(bio + unsafe { core::ptr::read_volatile(&BIO_IO_VEC_OFF) });
    let vcnt = unsafe {
        bpf_probe_read_kernel((bio + core::ptr::read_volatile(&BIO_VCNT_OFF)) as *const u16)
    }
    .unwrap_or(0) as u64;
    if vec == 0 || vcnt == 0 {
        return;
    }
    let n = (vcnt * PAGES_PER_BVEC).min(MAX_PAGES);
    release_items(hook, release::PUT, dirty, n, 1, vec, items::BVECS);
}

/// Folio head pfn of page `p` of the bio_vec at `bv` (u64::MAX past its end).
#[no_mangle]
#[inline(never)]
pub extern "C" fn bvec_page_pfn(bv: u64, p: u64) -> u64 {
    let page = kernel_u64(bv);
    let len_off = kernel_u64(bv + 8);
    let (len, off) = (len_off & 0xffff_ffff, len_off >> 32);
    if page == 0 || len == 0 {
        return u64::MAX;
    }
    let first = off >> 12;
    let last = (off + len - 1) >> 12;
    if first + p > last {
        return u64::MAX;
    }
    PfnMath::new().head_pfn(page + (first + p) * struct_page_size())
}

/// page_cache_pipe_buf_release(pipe, buf): buf->page loses the pipe's reference.
#[inline(always)]
pub fn pipe_buf(hook: u16, buf: u64) {
    let off = unsafe { core::ptr::read_volatile(&PIPE_BUFFER_PAGE_OFF) };
    let page = kernel_u64(buf + off);
    if page != 0 {
        folio_refs(hook, release::PUT, PageArg::Page(page), 1, false);
    }
}

/// kmem:mm_page_free(page, order). Runs on every page free, so the common case is one
/// filter slot at 0.
#[inline(always)]
pub fn page_free(hook: u16, page: u64) {
    if !maybe_pinned_head(page) {
        return;
    }
    let pfn = page_to_pfn(page);
    release_items(hook, release::FREED, 0, 1, 1, pfn, items::PFN);
}
