//! Every map the programs use, with the reason for its size.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use pinwatch_common::{calib, counter, Enforce, FoundBatch, GupCall, KernelStack, PageRecord, PinBlock, PinRecord, PinState, ProcBatch, ProcPins, ReleaseRecord};

/// Records to user space. User space sizes it at load (kernel::load::ring_bytes): 8 MiB
/// when recording, about 25,000 one-page pin records, several seconds of a heavy
/// direct-I/O load even if user space stalls; 1 MiB when monitoring, where records are
/// rare but come in bursts: the long-term pins of the bench's 512 MiB io_uring
/// registration are about 1.4 MB of records (a call's chunks after its first carry no
/// stack; with the stack in every chunk, 1.9 MB lost 575 records in a 1 MiB ring).
/// Its pages count in the reader's RSS twice (the data area is mapped twice).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Set to 1 by user space once every hook is attached: GUP calls are tracked from then
/// on only, so that no pin is taken into PINS while its release or its page's free could
/// still go unseen (hooks attach one by one, for seconds under a slow verifier).
#[map]
pub static ARMED: Array<u32> = Array::with_max_entries(1, 0);

/// Drop counters, per CPU so that counting never contends. See pinwatch_common::counter.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::NR, 0);

/// GUP calls in flight, keyed by thread id. A thread is in at most one outermost GUP
/// call, so this bounds the threads inside GUP at once: 4096, far more than run at once
/// on the hosts we know; past that a call is counted (CALL_MAP_FULL), not tracked.
/// Allocated as it fills from 6.1, preallocated before (each entry then costs its bytes
/// from the start, and user space sizes it from the host's CPUs: load::task_capacity),
/// like the other maps of kernel::load::GROWN_ON_DEMAND.
#[map]
pub static GUP_CALLS: HashMap<u32, GupCall> = HashMap::with_max_entries(4096, 0);

/// GUP_CALLS's fast path: slot tid % CALL_SLOTS_N holds the thread's call in flight when
/// no other thread holds it, claimed by compare-and-swap (5.12+; before, user space
/// leaves one slot, never used). An array slot costs a few loads where a hash map
/// insert, lookup and delete cost about a thousand instructions a call (kprobe mode,
/// and every fentry call before 6.2). A thread whose slot is taken goes to GUP_CALLS.
/// 40 KiB.
#[map]
pub static CALL_SLOTS: Array<CallSlot> = Array::with_max_entries(CALL_SLOTS_N, 0);
pub const CALL_SLOTS_N: u32 = 1024;

/// A call slot: `owner` is the thread id + 1 (0: free), `call` its outermost GUP call.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct CallSlot {
    pub owner: u64,
    pub call: GupCall,
}

/// The kernel stack of each streamed GUP call in flight, taken on entry (see
/// acquire::enter): 1024 threads inside a streamed call at once (264 bytes each) while
/// recording, 128 while monitoring (kernel::load::MONITOR_STACKS); past that a call goes
/// without its stack, counted.
#[map]
pub static GUP_STACKS: HashMap<u32, KernelStack> = HashMap::with_max_entries(1024, 0);
#[map]
pub static STACK_SCRATCH: PerCpuArray<KernelStack> = PerCpuArray::with_max_entries(NEST_LEVELS, 0);

/// Nesting depth of release calls per thread (unpin_user_pages_dirty_lock calls
/// unpin_user_pages, for one): only the outermost one is recorded. As many threads
/// inside a release at once as inside GUP (GUP_CALLS); past that counted.
#[map]
pub static RELEASE_DEPTH: HashMap<u32, u32> = HashMap::with_max_entries(4096, 0);

/// Pinned folios by head pfn: the filter every hazard hook consults. User space sizes
/// it at load from the host's memory (kernel::load::pin_map_capacity, 8192 to 262144
/// folios); a full map is counted (PIN_MAP_FULL) and reported.
#[map]
pub static PINS: HashMap<u64, PinState> = HashMap::with_max_entries(262144, 0);

/// Long-term FOLL_PIN references on small folios, 32 pfns an entry (see
/// pinwatch_common::PinBlock): the dense form of PINS for what RDMA, VFIO and io_uring
/// hold for hours. User space sizes it from the host's memory at load
/// (kernel::load::block_capacity); a block that finds no room goes into PINS instead.
#[map]
pub static PIN_BLOCKS: HashMap<u64, PinBlock> = HashMap::with_max_entries(4096, 0);
/// Block references unpinned and not sent (monitoring sends no unpin of a page only its
/// block held, unless a hazard exposed it): when this moves, user space compares the
/// pins it holds with the blocks and releases what they no longer hold.
#[map]
pub static BLOCK_UNSENT: Array<u64> = Array::with_max_entries(1, 0);
/// A new block is built here before it is inserted (see pins::block_pin).
#[map]
pub static BLOCK_SCRATCH: PerCpuArray<PinBlock> = PerCpuArray::with_max_entries(1, 0);

/// How many PINS entries (and PIN_BLOCKS references) have their head struct page in
/// each slot (its address over the size of struct page, modulo PIN_FILTER_SLOTS: the
/// pfn modulo it, as vmemmap_base is 1 GiB aligned, but known without vmemmap_base),
/// kept with every insert and remove: a slot at 0 says "not pinned" with one array
/// load, where a PINS lookup hashes. Every page freed, dirtied, cleaned, written back
/// or unpinned asks here first. A slot shared by many pfns only costs the lookup it
/// saves (with a thousand folios in PINS, one page in 130 of those not pinned).
/// Two 32-bit slots to a value (pins::filter_slot): the kernel charges an array 8 bytes
/// a value, so 2^17 slots cost 512 KiB, not the 1 MiB of one u32 a value. 32 bits, not
/// 16: a slot counts references, and one page can be pinned more than 65535 times.
pub const PIN_FILTER_SLOTS: u32 = 1 << 17;
#[map]
pub static PIN_FILTER: Array<u64> = Array::with_max_entries(PIN_FILTER_SLOTS / 2, 0);

/// The per-process cap on long-term pins the GUP return program enforces (one entry;
/// see pinwatch_common::Enforce). Zero until `pinwatch alert` is told to enforce.
#[map]
pub static ENFORCE: Array<Enforce> = Array::with_max_entries(1, 0);

/// Long-term pinned pages of each tgid that the kernel side counted taken
/// (ProcPins::longterm_pages) but that are no longer held, as user space knows it:
/// taken minus held. Negative (two's complement) when the process holds long-term pins
/// found by the start-up scan, which the kernel side never counted. Written by user
/// space only (the kernel side adds to ProcPins::longterm_pages only), so neither
/// side's writes race the other's. As many processes as PROC_PINS.
#[map]
pub static LONGTERM_RELEASED: HashMap<u32, u64> = HashMap::with_max_entries(8192, 0);

/// Who enforcement spares, by uid, cgroup id (user space lists every cgroup below an
/// exempt path) and comm. Read only when a call goes over the cap.
#[map]
pub static EXEMPT_UIDS: HashMap<u32, u8> = HashMap::with_max_entries(64, 0);
#[map]
pub static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(4096, 0);
#[map]
pub static EXEMPT_COMMS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(64, 0);

/// GUP activity per process (tgid): calls, pages, references held unstreamed. Live
/// views read it at each refresh; user space deletes the entries of processes gone.
/// 8192 processes that did GUP and still live (fewer before 6.1, where it is
/// preallocated: load::task_capacity); past that counted (PROC_MAP_FULL).
#[map]
pub static PROC_PINS: HashMap<u32, ProcPins> = HashMap::with_max_entries(8192, 0);

/// Each CPU's run of one process's quiet calls that kept no reference, not yet in
/// PROC_PINS (see pinwatch_common::ProcBatch).
#[map]
pub static PROC_BATCH: PerCpuArray<ProcBatch> = PerCpuArray::with_max_entries(1, 0);

/// The start-up scan's batch (see found.rs): written and read back by user space around
/// each test run of found_pfns.
#[map]
pub static FOUND: Array<FoundBatch> = Array::with_max_entries(1, 0);

/// Programs of different hooks nest on one CPU under fentry and raw tracepoints (a bio
/// completing in an interrupt inside a task's unpin, a folio dirtied inside a hazard
/// hook): each nesting level fills its own slot of the scratch maps below.
pub const NEST_LEVELS: u32 = 3;
#[map]
pub static NEST: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Folios holding unstreamed FOLL_GET references (monitoring), with when the latest was
/// taken: user space has them re-checked (sweep_pfn) when they grow old, since an
/// inline put_page releases them unseen. Direct I/O's come and go within a read.
/// Only file pages come here (anonymous ones are counted, not watched): 8192 folios
/// (32 MiB of direct I/O on files in flight) at once; past that counted (QUIET_GETS_FULL).
#[map]
pub static QUIET_GETS: HashMap<u64, u64> = HashMap::with_max_entries(8192, 0);

/// Scratch space for one record: records are larger than the 512-byte BPF stack. One
/// slot per nesting level.
#[map]
pub static PIN_SCRATCH: PerCpuArray<PinRecord> = PerCpuArray::with_max_entries(NEST_LEVELS, 0);
#[map]
pub static PAGE_SCRATCH: PerCpuArray<PageRecord> = PerCpuArray::with_max_entries(NEST_LEVELS, 0);
/// Whether the release chunk being filled named any pfn user space must hear of.
#[map]
pub static KNOWN: PerCpuArray<u64> = PerCpuArray::with_max_entries(NEST_LEVELS, 0);
#[map]
pub static RELEASE_SCRATCH: PerCpuArray<ReleaseRecord> = PerCpuArray::with_max_entries(NEST_LEVELS, 0);

/// vmemmap_base calibration: the page pointer the raw mm_page_free probe saw last on
/// this CPU, and the result (see pinwatch_common::calib). Used only at start-up on
/// kernels whose kallsyms hides vmemmap_base.
#[map]
pub static CALIB_PAGE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
#[map]
pub static CALIB: Array<u64> = Array::with_max_entries(calib::NR, 0);

/// vmemmap_base as read from its symbol, kept after the first read (see
/// page::vmemmap_base): one array load instead of a helper call in every program.
#[map]
pub static VMEMMAP: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
pub fn count(index: u32, n: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        unsafe { *c += n };
    }
}

/// Compare-and-swap (BPF_CMPXCHG, 5.12+; the programs that reach it on an older kernel
/// are pruned by the verifier, see acquire::call_slot): whether `*p` held `old`, and
/// now holds `new`.
#[inline(always)]
pub fn compare_exchange(p: *mut u64, old: u64, new: u64) -> bool {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering};
    unsafe { atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(p, old, new) }.0 == old
}

/// `*p += v` as one atomic instruction (BPF XADD, on every kernel from 5.10): map
/// values are shared by every CPU. Subtract by adding `v.wrapping_neg()`.
#[inline(always)]
pub fn atomic_add<T: Copy>(p: *mut T, v: T) {
    use core::intrinsics::{atomic_xadd, AtomicOrdering};
    unsafe { atomic_xadd::<T, T, { AtomicOrdering::Relaxed }>(p, v) };
}
