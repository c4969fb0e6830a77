//! The GUP entry points: remember the call on entry, record what it took on return.
//! Only the outermost GUP call of a thread is recorded (pin_user_pages_unlocked and the
//! GUP-fast slow path call get_user_pages_unlocked before 6.2).

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, generated::bpf_probe_read_kernel as bpf_probe_read_kernel_raw},
    EbpfContext,
};
use pinwatch_common::{
    backing as bk, counter, kind, stack_frames, GupCall, KernelStack, PinState, ProcPins, Hook, MAX_CHUNKS, PFNS_PER_RECORD,
    PFN_ORDER_SHIFT, PIN_FIXED, PIN_WORDS, RECORD_FAILED, RECORD_STACK, RECORD_SIGNALED, RECORD_SIGNAL_EXEMPT, RECORD_SIGNAL_REFUSED, RECORD_TRUNCATED,
};

use crate::{
    maps::{
        atomic_add, compare_exchange, count, CallSlot, ARMED, CALL_SLOTS, CALL_SLOTS_N, ENFORCE, EXEMPT_CGROUPS, EXEMPT_COMMS, EXEMPT_UIDS, GUP_CALLS, GUP_STACKS, LONGTERM_RELEASED, PINS,
        PIN_SCRATCH, PROC_BATCH, PROC_PINS, QUIET_GETS, STACK_SCRATCH,
    },
    page::{backing, file_of, folio_head, folio_order, kernel_u64, mapping, vmemmap_base, PfnMath},
    pins::{block_pin, pins_insert},
    record::{current, fill_header, fill_stack, is_self, send, stream_all, Nest},
};

#[no_mangle]
static FOLL_LONGTERM: u64 = 0;
/// 1 where no hooked GUP function calls another (6.2+, pinwatch_common::globals).
#[no_mangle]
static GUP_UNNESTED: u64 = 0;

/// 1 where the kernel has BPF_CMPXCHG (5.12+): calls go into CALL_SLOTS first.
#[no_mangle]
static CALL_SLOTS_ON: u64 = 0;

/// The call slot of thread `tid` (maps::CALL_SLOTS), where the kernel has them. The
/// branch is on a frozen global: before 5.12 the verifier never sees the
/// compare-and-swap.
#[inline(always)]
fn call_slot(tid: u32) -> Option<*mut CallSlot> {
    if unsafe { core::ptr::read_volatile(&CALL_SLOTS_ON) } == 0 {
        return None;
    }
    CALL_SLOTS.get_ptr_mut(tid & (CALL_SLOTS_N - 1))
}

/// A call slot's owner value for thread `tid` (0 is a free slot; the idle task's tid is 0).
#[inline(always)]
fn owner(tid: u32) -> u64 {
    tid as u64 + 1
}

/// Thread `tid`'s call slot, if the thread holds it.
#[inline(always)]
fn own_slot(tid: u32) -> Option<*mut CallSlot> {
    owned(call_slot(tid), tid)
}

/// `slot` (thread `tid`'s call_slot), if the thread holds it.
#[inline(always)]
fn owned(slot: Option<*mut CallSlot>, tid: u32) -> Option<*mut CallSlot> {
    slot.filter(|s| unsafe { core::ptr::read_volatile(&(**s).owner) } == owner(tid))
}

/// Takes thread `tid`'s slot `s` (its call_slot) for `call` if it is free and no outer call of the thread
/// is in GUP_CALLS (before 6.2 hooked GUP calls nest, and an outer call that found the
/// slot taken went to the map: this one then joins it there as nested). From 6.2 the
/// map is not asked: only a GUP-fast-only call in an NMI can nest there, and where its
/// thread's outer call went to the map, it takes the slot and is recorded as a call of
/// its own.
#[inline(always)]
fn take_slot(slot: Option<*mut CallSlot>, tid: u32, call: &GupCall) -> bool {
    let Some(s) = slot else { return false };
    let unnested = unsafe { core::ptr::read_volatile(&GUP_UNNESTED) } != 0;
    if !unnested && GUP_CALLS.get_ptr(&tid).is_some() {
        return false;
    }
    if !compare_exchange(unsafe { &mut (*s).owner }, 0, owner(tid)) {
        return false;
    }
    // Every field but the depth, which is 0 in a free slot (one is given back only at
    // depth 0): a GUP-fast-only call in an NMI that lands right here finds the slot its
    // thread's and counts its depth, which this must not overwrite.
    unsafe {
        (*s).call.hook = call.hook;
        (*s).call.gup_flags = call.gup_flags;
        (*s).call.pages = call.pages;
        (*s).call.start = call.start;
        (*s).call.nr_requested = call.nr_requested;
    }
    true
}

/// Whether thread `tid` is inside a GUP call pinwatch follows (its slot or GUP_CALLS).
#[inline(always)]
pub fn in_gup_call(tid: u32) -> bool {
    own_slot(tid).is_some() || GUP_CALLS.get_ptr(&tid).is_some()
}

/// Whether a call that is not streamed skips the call map, when its return program is
/// an fexit program (which sees the arguments): where no GUP call it could nest in
/// exists. Two hash-map operations fewer on the commonest call of all (a direct-I/O
/// read).
#[inline(always)]
pub fn mapless(gup_flags: u64) -> bool {
    (unsafe { core::ptr::read_volatile(&GUP_UNNESTED) } != 0) && !streamed(gup_flags)
}

/// Whether a call is sent to user space as it happens: every call while recording;
/// while monitoring, long-term pins (and their refusals) only. The others are counted
/// in PROC_PINS and tracked in PINS, which is all the hazard hooks need.
#[inline(always)]
fn streamed(gup_flags: u64) -> bool {
    stream_all() || gup_flags & unsafe { core::ptr::read_volatile(&FOLL_LONGTERM) } != 0
}

/// Whether user space has attached every hook (see maps::ARMED).
#[inline(always)]
fn armed() -> bool {
    ARMED.get(0).is_some_and(|a| *a != 0)
}

/// Bits packed above the 32 gup_flags bits of pin_page's flags argument.
const PIN_REF: u64 = 1 << 32;
const QUIET_REF: u64 = 1 << 33;

/// Where a hook keeps its arguments (0-based). These positions are the same on every
/// kernel from 5.10 on; only trailing arguments (vmas, locked) came and went.
#[derive(Copy, Clone)]
pub struct Layout {
    pub start: usize,
    pub nr_pages: usize,
    pub gup_flags: usize,
    pub pages: usize,
}

/// A GUP call's arguments, read at its hook's Layout positions.
#[derive(Copy, Clone)]
pub struct GupArgs {
    pub start: u64,
    pub nr_pages: u64,
    pub gup_flags: u64,
    pub pages: u64,
}

pub const LAYOUT_PLAIN: Layout = Layout { start: 0, nr_pages: 1, gup_flags: 2, pages: 3 };
pub const LAYOUT_REMOTE: Layout = Layout { start: 1, nr_pages: 2, gup_flags: 3, pages: 4 };
pub const LAYOUT_UNLOCKED: Layout = Layout { start: 0, nr_pages: 1, gup_flags: 3, pages: 2 };

/// Called on entry with the call's arguments (for a call that goes through the call
/// map: not a mapless one under fentry).
#[inline(always)]
pub fn enter<C: EbpfContext>(ctx: &C, hook: Hook, a: GupArgs) {
    let GupArgs { start, nr_pages, gup_flags, pages } = a;
    let (tgid, tid) = current();
    if is_self(tgid) || !armed() {
        return;
    }
    // Without a pages array GUP only faults pages in and keeps no reference; a call
    // nested in one of ours still counts its depth.
    let call = GupCall {
        hook: hook as u16,
        depth: 0,
        gup_flags: gup_flags as u32,
        pages,
        start,
        nr_requested: nr_pages,
    };
    // A call nested in one the thread's slot holds counts its depth there.
    let slot = call_slot(tid);
    if let Some(s) = owned(slot, tid) {
        unsafe { (*s).call.depth += 1 };
        return;
    }
    // BPF_NOEXIST: the thread's outermost call is the one in the map, and a nested
    // call finds it there (one map operation for the common, unnested call).
    if pages == 0 || (!take_slot(slot, tid, &call) && GUP_CALLS.insert(&tid, &call, 1).is_err()) {
        match GUP_CALLS.get_ptr_mut(&tid) {
            Some(outer) => unsafe { (*outer).depth += 1 },
            None if pages != 0 => count(counter::CALL_MAP_FULL, 1),
            None => {}
        }
        return;
    }
    // The caller's stack is taken here, on entry: on return a kretprobe has replaced
    // GUP's return address with its trampoline, and before 5.15 the unwinder stops there.
    // Only calls that will be streamed pay for the walk.
    if !streamed(gup_flags) {
        return;
    }
    let Some(nest) = Nest::enter() else { return };
    let Some(scratch) = STACK_SCRATCH.get_ptr_mut(nest.level) else { return };
    fill_stack(ctx, unsafe { &mut *scratch });
    if GUP_STACKS.insert(&tid, unsafe { &*scratch }, 0).is_err() {
        count(counter::STACK_LOST, 1);
    }
}

/// *_fast return int, the others long: the upper half of the register is not ours.
#[inline(always)]
fn returns_int(hook: u16) -> bool {
    hook == Hook::GetUserPagesFast as u16
        || hook == Hook::PinUserPagesFast as u16
        || hook == Hook::GetUserPagesFastOnly as u16
}

/// The return value of `hook` from the raw return register.
#[inline(always)]
fn returned(hook: u16, raw_ret: u64) -> i64 {
    if returns_int(hook) { raw_ret as i32 as i64 } else { raw_ret as i64 }
}

#[inline(always)]
fn is_pin(hook: u16) -> bool {
    hook == Hook::PinUserPages as u16
        || hook == Hook::PinUserPagesFast as u16
        || hook == Hook::PinUserPagesRemote as u16
        || hook == Hook::PinUserPagesUnlocked as u16
}

/// An fexit program's return of a mapless call (see mapless), which its entry program
/// left to it: the call's arguments and the raw return value.
#[inline(always)]
pub fn exit_mapless(hook: Hook, a: GupArgs, raw_ret: u64) {
    let (tgid, _) = current();
    if a.pages == 0 || is_self(tgid) || !armed() {
        return;
    }
    let call = GupCall {
        hook: hook as u16,
        depth: 0,
        gup_flags: a.gup_flags as u32,
        pages: a.pages,
        start: a.start,
        nr_requested: a.nr_pages,
    };
    track_quietly(&call, returned(call.hook, raw_ret), tgid, CLOCK_LATER);
}

/// Called on return with the raw return register.
#[inline(always)]
pub fn exit(raw_ret: u64) {
    let (tgid, tid) = current();
    if let Some(s) = own_slot(tid) {
        let call = unsafe { core::ptr::read_volatile(&(*s).call) };
        if call.depth > 0 {
            unsafe { (*s).call.depth -= 1 };
            return;
        }
        // Given back with a plain store: only its owner frees a slot.
        unsafe { core::ptr::write_volatile(&mut (*s).owner, 0) };
        record(&call, returned(call.hook, raw_ret), tgid, tid);
        return;
    }
    let Some(slot) = GUP_CALLS.get_ptr_mut(&tid) else {
        return;
    };
    let call = unsafe { *slot };
    if call.depth > 0 {
        unsafe { (*slot).depth -= 1 };
        return;
    }
    let _ = GUP_CALLS.remove(&tid);
    record(&call, returned(call.hook, raw_ret), tgid, tid);
}

/// Per-process counts of `calls` calls that took `pages` pages; `quiet`: the calls were
/// not streamed, and that many of their pages went into PINS as quiet references;
/// `longterm`: pages taken with FOLL_LONGTERM, all of them, records or not (the enforced
/// figure).
#[inline(always)]
fn count_call(tgid: u32, calls: u64, pages: u64, quiet: Option<u64>, longterm: u64) {
    let mut p = PROC_PINS.get_ptr_mut(&tgid);
    if p.is_none() {
        // BPF_NOEXIST: two threads of one process racing here both end up adding to
        // the one entry.
        let _ = PROC_PINS.insert(&tgid, &ProcPins::default(), 1);
        p = PROC_PINS.get_ptr_mut(&tgid);
    }
    let Some(p) = p else {
        count(counter::PROC_MAP_FULL, 1);
        return;
    };
    unsafe {
        atomic_add(&mut (*p).calls, calls);
        atomic_add(&mut (*p).pages, pages);
        if let Some(held) = quiet {
            if held != 0 {
                atomic_add(&mut (*p).quiet_held, held);
            }
        } else {
            atomic_add(&mut (*p).streamed_calls, 1);
        }
        if longterm > 0 {
            atomic_add(&mut (*p).longterm_pages, longterm);
        }
    }
}

/// The enforced cap, after a long-term call of `tgid` was counted: over it, the calling
/// process gets the configured signal, delivered before the call returns to user space,
/// so it never runs with the pins that broke the rule. Returns the record flag that says
/// what happened (0: under the cap, or no cap). bpf_send_signal itself refuses kernel
/// threads, exiting tasks and init; init is refused here too.
#[inline(always)]
fn enforce(tgid: u32) -> u16 {
    let Some(e) = ENFORCE.get(0) else { return 0 };
    if e.cap_pages == 0 || tgid <= 1 {
        return 0;
    }
    let Some(p) = (unsafe { PROC_PINS.get(&tgid) }) else { return 0 };
    // Held: taken less what user space says is no longer held (see LONGTERM_RELEASED).
    let adjust = unsafe { LONGTERM_RELEASED.get(&tgid) }.copied().unwrap_or(0) as i64;
    if (p.longterm_pages as i64).wrapping_sub(adjust) <= e.cap_pages as i64 {
        return 0;
    }
    let uid = aya_ebpf::helpers::bpf_get_current_uid_gid() as u32;
    let cgroup = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    let comm = aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16]);
    if unsafe { EXEMPT_UIDS.get(&uid).is_some() || EXEMPT_CGROUPS.get(&cgroup).is_some() || EXEMPT_COMMS.get(&comm).is_some() } {
        return RECORD_SIGNAL_EXEMPT;
    }
    if unsafe { aya_ebpf::helpers::generated::bpf_send_signal(e.signal) } == 0 {
        RECORD_SIGNALED
    } else {
        RECORD_SIGNAL_REFUSED
    }
}

/// The time of a quiet call, read only when one of its pages goes into PINS: the
/// commonest call (a direct-I/O read into anonymous memory) never needs it.
const CLOCK_LATER: u64 = 0;

/// A call that is not streamed: no stack, no record. Its process counts the call and
/// its pages; pages of files (page cache, shmem) go into PINS as quiet references, for
/// the hazard hooks. Anonymous pages do not: nothing writes them back or truncates
/// them, the kernel refuses to unmap a pinned exclusive one (5.19+), and a direct-I/O
/// read into a heap buffer, the commonest pin of all, then costs no map operation
/// beyond its process's count. `record` tracks every page.
#[inline(always)]
fn track_quietly(call: &GupCall, ret: i64, tgid: u32, ts: u64) {
    if ret <= 0 {
        return;
    }
    let n = (ret as u64).min(MAX_PAGES);
    if ret as u64 > n {
        count(counter::PFNS_TRUNCATED, ret as u64 - n);
    }
    let flags = call.gup_flags as u64 | QUIET_REF | if is_pin(call.hook) { PIN_REF } else { 0 };
    let mut tracked = 0;
    if n == 1 {
        // The commonest call, a direct-I/O read of one page into anonymous memory, is
        // answered here: one read of the page, no loop and no call. Any other page (a
        // tail page too: the long way to its head is pin_page's) goes through
        // pin_page, which reads it again.
        let m = PfnMath::with_base(BASE_LATER).own_head_mapping(kernel_u64(call.pages));
        if m.is_none_or(|m| m & MAPPING_ANON == 0) {
            tracked = !pin_page(call.pages, BASE_LATER, tgid as u64, flags, ts) >> 63;
        }
    } else {
        for chunk in 0..MAX_CHUNKS as u64 {
            let base = chunk * PFNS_PER_RECORD as u64;
            if base >= n {
                break;
            }
            tracked += quiet_chunk(call.pages + base * 8, n - base, tgid as u64, flags, ts);
        }
    }
    if tracked == 0 {
        count_batched(tgid, n);
    } else {
        count_call(tgid, 1, n, Some(tracked), 0);
    }
}

/// The counts of a quiet call that kept no reference, into this CPU's run of one
/// process's calls (PROC_BATCH), which goes into PROC_PINS when another process's call
/// comes: one array lookup for the commonest call, where PROC_PINS costs a hash lookup
/// and atomic adds. Plain adds: no other CPU writes this CPU's slot, and GUP return
/// programs nest on one CPU only when a GUP-fast-only call runs in an NMI (perf's
/// physical-address sampling) in the middle of this, where a count can be lost. These
/// are statistics; quiet_held, which releases take back, never goes through here.
#[inline(always)]
fn count_batched(tgid: u32, pages: u64) {
    let Some(b) = PROC_BATCH.get_ptr_mut(0) else { return };
    let b = unsafe { &mut *b };
    if b.tgid != tgid {
        if b.calls != 0 {
            count_call(b.tgid, b.calls, b.pages, Some(0), 0);
        }
        b.tgid = tgid;
        b.calls = 0;
        b.pages = 0;
    }
    b.calls += 1;
    b.pages += pages;
}

/// Pages one GUP call may have tracked: MAX_CHUNKS records of PFNS_PER_RECORD.
const MAX_PAGES: u64 = (PFNS_PER_RECORD * MAX_CHUNKS) as u64;

/// Up to PFNS_PER_RECORD pages of an unstreamed call, from the page pointer at `slots`
/// on (`left`: pages of the call from there); returns how many went into PINS.
/// A global function, like pin_page: the verifier checks it once, and a call of any
/// size costs it one call site per chunk.
#[no_mangle]
#[inline(never)]
pub extern "C" fn quiet_chunk(slots: u64, left: u64, tgid: u64, flags: u64, ts: u64) -> u64 {
    let mut tracked = 0;
    for j in 0..PFNS_PER_RECORD as u64 {
        if j >= left {
            break;
        }
        let r = pin_page(slots + j * 8, BASE_LATER, tgid, flags, ts);
        // Bit 63 is UNTRACKED (u64::MAX has it too): counted without a branch, which
        // would fork the verifier's states at every page.
        tracked += !r >> 63;
    }
    tracked
}

#[inline(always)]
fn record(call: &GupCall, ret: i64, tgid: u32, tid: u32) {
    if !streamed(call.gup_flags as u64) {
        track_quietly(call, ret, tgid, CLOCK_LATER);
        return;
    }
    let Some(nest) = Nest::enter() else { return };
    let Some(rec) = PIN_SCRATCH.get_ptr_mut(nest.level) else {
        return;
    };
    let rec = unsafe { &mut *rec };
    fill_header(&mut rec.header, kind::PIN, call.hook);
    // The stack says who called GUP (io_uring, direct I/O, a driver): taken once per
    // call on entry, carried by the call's first chunk only, at the start of its words
    // (pin_chunk puts the pfns after its last frame).
    rec.header.flags = RECORD_STACK;
    match GUP_STACKS.get_ptr(&tid) {
        Some(st) => {
            let bytes = core::mem::size_of::<KernelStack>() as u32;
            let dst = rec.words.as_mut_ptr() as *mut core::ffi::c_void;
            if unsafe { bpf_probe_read_kernel_raw(dst, bytes, st as *const core::ffi::c_void) } < 0 {
                rec.words[0] = -14i32 as u32 as u64;
            }
            let _ = GUP_STACKS.remove(&tid);
        }
        None => rec.words[0] = -2i32 as u32 as u64,
    }
    let ts = rec.header.ts_ns;
    rec.gup_flags = call.gup_flags;
    rec.ret = ret;
    rec.start = call.start;
    rec.nr_requested = call.nr_requested;
    rec.call_id = (ts << 16) ^ tid as u64;
    rec.chunk = 0;
    rec.nr_pfns = 0;
    rec.file_pages = 0;
    rec.file = Default::default();
    if ret <= 0 {
        if ret < 0 {
            rec.header.flags |= RECORD_FAILED;
        }
        send(rec, PIN_FIXED + 8 * (1 + stack_frames(rec.words[0] as u32 as i32)), false);
        return;
    }
    let n = ret as u64;
    if n > MAX_PAGES {
        rec.header.flags |= RECORD_TRUNCATED;
        count(counter::PFNS_TRUNCATED, n - MAX_PAGES);
    }
    let flags = call.gup_flags as u64 | if is_pin(call.hook) { PIN_REF } else { 0 };
    let longterm = call.gup_flags as u64 & unsafe { core::ptr::read_volatile(&FOLL_LONGTERM) } != 0;
    count_call(tgid, 1, n.min(MAX_PAGES), None, if longterm { n } else { 0 });
    if longterm {
        rec.header.flags |= enforce(tgid);
    }
    for chunk in 0..MAX_CHUNKS as u64 {
        let base = chunk * PFNS_PER_RECORD as u64;
        if base >= n {
            break;
        }
        pin_chunk(call.pages + base * 8, n - base, nest.level as u64, chunk, flags);
    }
}

/// One chunk of a streamed call: up to PFNS_PER_RECORD pages from the page pointer at
/// `slots` on (`left`: pages of the call from there) into the scratch record of nesting
/// level `level`, whose header and call fields are filled, then sent as chunk `chunk`.
/// Chunk 0 keeps the stack record() put at the start of the words and puts its pfns
/// after it; the others write over it and go without. A global function: the verifier
/// checks it once, and a call of any size costs it one call site per chunk (VFIO and
/// RDMA pin 512 pages per call, io_uring a whole buffer in one).
#[no_mangle]
#[inline(never)]
pub extern "C" fn pin_chunk(slots: u64, left: u64, level: u64, chunk: u64, flags: u64) -> u64 {
    let Some(rec) = PIN_SCRATCH.get_ptr_mut(level as u32) else { return 0 };
    let rec = unsafe { &mut *rec };
    let k = if left > PFNS_PER_RECORD as u64 { PFNS_PER_RECORD as u64 } else { left };
    let (tgid, ts) = (rec.header.tgid as u64, rec.header.ts_ns);
    let at = if chunk == 0 {
        1 + stack_frames(rec.words[0] as u32 as i32)
    } else {
        rec.header.flags &= !RECORD_STACK;
        0
    };
    let math = PfnMath::new();
    for j in 0..PFNS_PER_RECORD {
        if j as u64 >= k {
            break;
        }
        rec.words[(at + j) & (PIN_WORDS - 1)] = pin_page(slots + j as u64 * 8, math.base(), tgid, flags, ts);
    }
    rec.chunk = chunk as u16;
    rec.nr_pfns = k as u16;
    // Whether the pages are page cache, judged by the chunk's first page: a branch
    // per page in the loop above multiplies the verifier's paths past its limit,
    // and a GUP call rarely spans more than one mapping.
    let first = unsafe { bpf_probe_read_kernel(slots as *const u64) }.unwrap_or(0);
    let m = if first == 0 { 0 } else { mapping(folio_head(first)) };
    if backing(m) == bk::FILE {
        rec.file_pages = k as u16;
        rec.file = file_of(m);
    } else {
        rec.file_pages = 0;
        rec.file = Default::default();
    }
    send(rec, PIN_FIXED + (at + k as usize) * 8, false);
    k
}

/// One page of a GUP call: its folio head pfn and the folio's order, counted in PINS
/// (UNTRACKED alone for a quiet anonymous page, which is counted, not watched; u64::MAX
/// when unreadable). `flags` is gup_flags with PIN_REF and QUIET_REF above it; `base`
/// is vmemmap_base, read once per call, or BASE_LATER: read here, only for a page that
/// goes into PINS. A global function, so the verifier checks it once rather than at
/// each unrolled call site.
#[no_mangle]
#[inline(never)]
pub extern "C" fn pin_page(slot: u64, base: u64, tgid: u64, flags: u64, ts: u64) -> u64 {
    let page = kernel_u64(slot);
    let (head, head_mapping) = PfnMath::with_base(base).head_and_mapping(page);
    let quiet = flags & QUIET_REF != 0;
    // A transient pin of anonymous memory has no file behind it to tear: while
    // monitoring it is counted, not watched (see track_quietly).
    if quiet && head_mapping & MAPPING_ANON != 0 {
        return UNTRACKED;
    }
    let base = if base != BASE_LATER { base } else { vmemmap_base() };
    let pfn = PfnMath::with_base(base).pfn(head);
    if pfn == u64::MAX {
        count(counter::READ_FAILED, 1);
        return u64::MAX;
    }
    let order = folio_order(head);
    track_pin(pfn, order, flags & PIN_REF != 0, quiet, tgid as u32, flags as u32, ts);
    // The folio's order rides above the pfn: what a pin holds in place is the whole
    // folio, whatever the references (pinwatch_common::PFN_ORDER_SHIFT).
    pfn | order << PFN_ORDER_SHIFT
}

/// pin_page's `base` when the caller has not read vmemmap_base.
const BASE_LATER: u64 = 0;

/// pin_page's answer for a page it did not take into PINS (bit 63; u64::MAX has it too).
const UNTRACKED: u64 = 1 << 63;
/// folio->mapping's low bit: anonymous memory (KSM pages too).
const MAPPING_ANON: u64 = 1;

/// Adds one reference to the folio's state. Counts are added atomically: several CPUs
/// pin pages of one large folio at once (the one PINS entry of a huge page). A new
/// entry goes in with its first reference, in one map operation. A streamed long-term FOLL_PIN reference on a small folio goes into its block
/// (PIN_BLOCKS), the dense form for what stays pinned for hours; PINS takes the rest,
/// and what a full PIN_BLOCKS has no room for.
#[inline(always)]
fn track_pin(pfn: u64, order: u64, pin: bool, quiet: bool, tgid: u32, gup_flags: u32, ts: u64) {
    let ts = if ts != CLOCK_LATER { ts } else { crate::record::now() };
    let longterm = gup_flags as u64 & unsafe { core::ptr::read_volatile(&FOLL_LONGTERM) } != 0;
    if pin && !quiet && longterm && order == 0 && block_pin(pfn, tgid as u64, gup_flags as u64, ts) {
        return;
    }
    let first = PinState {
        tgid,
        gup_flags,
        first_ts_ns: ts,
        pin_refs: pin as u32,
        get_refs: !pin as u32,
        quiet_refs: quiet as u32,
        state: 0,
    };
    if !pins_insert(pfn, &first) {
        let Some(s) = PINS.get_ptr_mut(&pfn) else {
            count(counter::PIN_MAP_FULL, 1);
            return;
        };
        unsafe {
            let refs = if pin { &mut (*s).pin_refs } else { &mut (*s).get_refs };
            atomic_add(refs, 1);
            if quiet {
                atomic_add(&mut (*s).quiet_refs, 1);
            }
            (*s).tgid = tgid;
            (*s).gup_flags |= gup_flags;
        }
    }
    if quiet && !pin && QUIET_GETS.insert(&pfn, &ts, 0).is_err() {
        count(counter::QUIET_GETS_FULL, 1);
    }
}
