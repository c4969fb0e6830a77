//! Filling record headers and sending records.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_stack, bpf_ktime_get_ns},
    },
    EbpfContext,
};
use pinwatch_common::{counter, KernelStack, RecordHeader, RECORD_VERSION, STACK_FRAMES};

use crate::maps::{count, EVENTS, NEST, NEST_LEVELS};

#[no_mangle]
static SELF_TGID: u32 = 0;
#[no_mangle]
static STREAM_ALL: u64 = 0;
#[no_mangle]
static FLOOR: u64 = 0;

/// Whether every call is streamed (record) or only what matters as it happens (monitoring).
#[inline(always)]
pub fn stream_all() -> bool {
    unsafe { core::ptr::read_volatile(&STREAM_ALL) != 0 }
}

/// The bench's floor: the same programs on the same hooks, returning at once.
#[inline(always)]
pub fn floor() -> bool {
    unsafe { core::ptr::read_volatile(&FLOOR) != 0 }
}

#[inline(always)]
pub fn now() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current() -> (u32, u32) {
    let v = bpf_get_current_pid_tgid();
    ((v >> 32) as u32, v as u32)
}

/// pinwatch's own activity (reading maps, writing files) is not what we watch.
#[inline(always)]
pub fn is_self(tgid: u32) -> bool {
    tgid == unsafe { core::ptr::read_volatile(&SELF_TGID) }
}

#[inline(always)]
pub fn fill_header(h: &mut RecordHeader, kind: u16, hook: u16) {
    let (tgid, tid) = current();
    h.version = RECORD_VERSION;
    h.kind = kind;
    h.hook = hook;
    h.flags = 0;
    h.ts_ns = now();
    h.tgid = tgid;
    h.tid = tid;
    h.uid = bpf_get_current_uid_gid() as u32;
    h._pad = 0;
    h.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
}

/// The current kernel stack, innermost first, into the record itself. A failed walk is
/// counted (STACK_LOST) and leaves the errno in `nr`; the record goes out regardless.
#[inline(always)]
pub fn fill_stack<C: EbpfContext>(ctx: &C, stack: &mut KernelStack) {
    const BYTES: u32 = (STACK_FRAMES * 8) as u32;
    let ret = unsafe { bpf_get_stack(ctx.as_ptr(), stack.ips.as_mut_ptr() as *mut _, BYTES, 0) };
    stack.nr = if ret < 0 { ret as i32 } else { (ret / 8) as i32 };
    stack._pad = 0;
    if ret < 0 {
        count(counter::STACK_LOST, 1);
    }
}

/// Unread bytes in the ring past which every record wakes the reader: below it, records
/// wait for the reader's next tick (live views read on their refresh) or the next
/// record that wakes it. A quarter of the ring, set by user space with its size.
#[no_mangle]
static WAKE_ABOVE: u64 = 1 << 20;

/// Copy the first `len` bytes of a finished record into the ring buffer; a full ring is
/// counted, never silent. Only `urgent` records (hazards) or a filling ring wake the
/// reader: a wakeup per record costs more than the record.
#[inline(always)]
pub fn send<T>(record: &T, len: usize, urgent: bool) {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    let size = core::mem::size_of::<T>();
    // Read back through memory so that the compiler cannot drop the bound below as
    // redundant: 5.10's verifier loses a length's range when it is spilled to the stack,
    // and needs the comparison right before the call.
    let len = unsafe { core::ptr::read_volatile(&len) };
    let len = if len > size { size } else { len };
    let bytes = unsafe { core::slice::from_raw_parts(record as *const T as *const u8, len) };
    let flags = if urgent || EVENTS.query(BPF_RB_AVAIL_DATA) > unsafe { core::ptr::read_volatile(&WAKE_ABOVE) } { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    if EVENTS.output::<[u8]>(bytes, flags).is_err() {
        count(counter::RINGBUF_FULL, 1);
    }
}

/// This CPU's nesting level while a program fills a scratch record: the slot it owns.
/// Taken at the start of the work, given back when dropped. Interrupts nest and end in
/// order; the count is decremented rather than restored, so that it stays the number
/// of holders even if a preempted program ends out of order.
pub struct Nest {
    pub level: u32,
}

impl Nest {
    #[inline(always)]
    pub fn enter() -> Option<Nest> {
        let p = NEST.get_ptr_mut(0)?;
        let level = unsafe { *p };
        if level >= NEST_LEVELS {
            count(counter::NESTED_TOO_DEEP, 1);
            return None;
        }
        unsafe { *p = level + 1 };
        Some(Nest { level })
    }
}

impl Drop for Nest {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some(p) = NEST.get_ptr_mut(0) {
            unsafe { *p = (*p).saturating_sub(1) };
        }
    }
}
