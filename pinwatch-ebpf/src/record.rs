//! Filling record headers and sending records.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_stack, bpf_ktime_get_ns},
    },
    EbpfContext,
};
use pinwatch_common::{counter, KernelStack, RecordHeader, RECORD_VERSION, STACK_FRAMES};

use crate::maps::{count, EVENTS};

#[no_mangle]
static SELF_TGID: u32 = 0;

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

/// Copy a finished record into the ring buffer; a full ring is counted, never silent.
#[inline(always)]
pub fn send<T>(record: &T) {
    if EVENTS.output::<T>(record, 0).is_err() {
        count(counter::RINGBUF_FULL, 1);
    }
}
