//! The contract between pinwatch's kernel programs and user space.
//!
//! Everything here is plain data: `#[repr(C)]` records with explicit widths, map keys
//! and values, hook ids and flag bits. Both sides are built from this one file, so a
//! change here is a change of the wire format: bump [`RECORD_VERSION`].
#![no_std]

/// Bumped whenever a record layout below changes.
pub const RECORD_VERSION: u16 = 7;

/// Folio head pfns carried by one record. A GUP call that takes more pages is sent as
/// several records (chunks) of the same call.
pub const PFNS_PER_RECORD: usize = 64;
/// Chunks one GUP call or one release may produce: 4096 pages (16 MiB of base pages). VFIO and RDMA
/// pin 512 pages per call, io_uring a whole buffer in one. Pages past it are counted
/// (`nr_pages`) but their pfns are not sent, and the record says so with
/// [`RECORD_TRUNCATED`]. Each chunk is one call of a global BPF function (pin_chunk,
/// quiet_chunk) the verifier checks once, so a chunk costs it a call site, not the
/// ~15k instructions of an unrolled chunk.
pub const MAX_CHUNKS: usize = 64;

pub const TASK_COMM_LEN: usize = 16;

/// Record kinds (the `kind` field of [`RecordHeader`]).
pub mod kind {
    pub const PIN: u16 = 1;
    pub const RELEASE: u16 = 2;
    /// A pinned folio met a hazard hook (unmap, mkclean, writeback, truncate, dirty).
    pub const PAGE: u16 = 3;
}

/// What a hazard hook was doing to a folio ([`PageRecord::op`]).
pub mod page_op {
    /// try_to_unmap_one: a mapping of the folio is being torn down.
    pub const UNMAP: u16 = 1;
    /// page_mkclean_one: the folio's ptes are being write-protected and cleaned.
    pub const MKCLEAN: u16 = 2;
    /// The filesystem submits the folio for writeback.
    pub const WRITEBACK: u16 = 3;
    /// The folio leaves the page cache (truncate, invalidate).
    pub const TRUNCATE: u16 = 4;
    /// The folio is being marked dirty.
    pub const DIRTY: u16 = 5;
}

/// Why a page record was sent ([`PageRecord::seen`]).
pub mod seen {
    /// The folio is in PINS: pinwatch saw the GUP call that pinned it.
    pub const PINS: u16 = 1;
    /// Not in PINS, but the kernel's own count says it may be DMA-pinned
    /// (folio_maybe_dma_pinned); used where GUP calls cannot be seen.
    pub const KERNEL_PIN_COUNT: u16 = 2;
}

/// How a folio is backed ([`PageRecord::backing`], from folio->mapping).
pub mod backing {
    pub const NONE: u16 = 0;
    pub const ANON: u16 = 1;
    pub const FILE: u16 = 2;
    /// movable non-LRU or KSM: neither anonymous nor a file's page cache.
    pub const OTHER: u16 = 3;
}

/// Record flag bits ([`RecordHeader::flags`]).
pub const RECORD_TRUNCATED: u16 = 1 << 0;
/// The GUP call returned an error (`ret` < 0); no pages were taken.
pub const RECORD_FAILED: u16 = 1 << 1;
/// This long-term call took its process over the enforced cap ([`Enforce`]) and the
/// kernel accepted the signal (bpf_send_signal returned 0).
pub const RECORD_SIGNALED: u16 = 1 << 2;
/// Over the cap, but the kernel refused the signal (a kernel thread, an exiting task,
/// init): bpf_send_signal's own guards.
pub const RECORD_SIGNAL_REFUSED: u16 = 1 << 3;
/// Over the cap, and exempt (uid, cgroup or comm in the EXEMPT_* maps): no signal.
pub const RECORD_SIGNAL_EXEMPT: u16 = 1 << 4;
/// A pin record's words open with the call's kernel stack ([`PinRecord::words`]): the
/// first chunk of a streamed call carries it, the others do not.
pub const RECORD_STACK: u16 = 1 << 5;

/// The per-process cap on long-term pinned pages that the kernel side enforces in the
/// GUP return program (map ENFORCE, index 0), filled by `pinwatch alert`. A long-term
/// call that takes its process past `cap_pages` (taken minus released, see
/// [`ProcPins::longterm_pages`]) gets `signal` (SIGSTOP or SIGKILL) sent to its process.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct Enforce {
    /// 0: nothing is enforced.
    pub cap_pages: u64,
    pub signal: u32,
    pub _pad: u32,
}

/// Pages the start-up scan hands the kernel side in one test run of `found_pfns` (map
/// FOUND, index 0): pins taken before pinwatch started, found from a process's page
/// table (/proc/PID/pagemap) and the kernel's own pin counts.
pub const FOUND_BATCH: usize = 256;

/// One batch of the start-up scan: user space fills `tgid`, `gup_flags` (what the found
/// pins are taken to be), `ts_ns`, `nr` and the pfns of mapped pages; the program
/// replaces each pfn with a [`found`] answer.
#[repr(C)]
#[derive(Copy, Clone)]
pub struct FoundBatch {
    pub tgid: u32,
    pub nr: u32,
    pub gup_flags: u32,
    pub _pad: u32,
    pub ts_ns: u64,
    pub pfns: [u64; FOUND_BATCH],
}

/// Answers of `found_pfns`, one u64 per page: 0 when the kernel does not count the
/// page's folio as DMA-pinned (or it could not be read), else the folio head pfn in
/// the low bits with the bits below.
pub mod found {
    /// The page was taken into PINS as a reference of the process: a found pin.
    pub const ADOPTED: u64 = 1 << 63;
    /// Pinned, but PINS already holds the folio (a pin pinwatch saw, or one found on
    /// another process first): not taken again.
    pub const KNOWN: u64 = 1 << 62;
    /// Pinned, but PINS had no room: not tracked (counted as PIN_MAP_FULL).
    pub const FULL: u64 = 1 << 61;
    /// The folio is page cache (of a file, shmem included).
    pub const FILE: u64 = 1 << 60;
    /// ...of tmpfs/shmem or hugetlbfs.
    pub const MEMORY_FS: u64 = 1 << 59;
    /// The folio's order, 6 bits from here.
    pub const ORDER_SHIFT: u64 = 52;
    /// The low bits: the folio head pfn (52-bit physical addresses: 40-bit pfns).
    pub const PFN_MASK: u64 = (1 << 48) - 1;
}

/// Defines [`Hook`] with each kernel function's id and name once: the enum, its names and
/// the list of all of them cannot drift apart.
macro_rules! hooks {
    ($($(#[$doc:meta])* $variant:ident = $id:literal => $name:literal,)*) => {
        /// Kernel functions (and tracepoints) pinwatch hooks. The id travels in records;
        /// user space maps it back to the kernel's name with [`Hook::name`].
        #[repr(u16)]
        #[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
        pub enum Hook {
            $($(#[$doc])* $variant = $id,)*
        }

        impl Hook {
            pub const ALL: &'static [Hook] = &[$(Hook::$variant,)*];

            pub const fn name(self) -> &'static str {
                match self {
                    $(Hook::$variant => $name,)*
                }
            }
        }
    };
}

hooks! {
    GetUserPages = 1 => "get_user_pages",
    PinUserPages = 2 => "pin_user_pages",
    GetUserPagesFast = 3 => "get_user_pages_fast",
    PinUserPagesFast = 4 => "pin_user_pages_fast",
    GetUserPagesFastOnly = 5 => "get_user_pages_fast_only",
    GetUserPagesRemote = 6 => "get_user_pages_remote",
    PinUserPagesRemote = 7 => "pin_user_pages_remote",
    GetUserPagesUnlocked = 8 => "get_user_pages_unlocked",
    PinUserPagesUnlocked = 9 => "pin_user_pages_unlocked",
    UnpinUserPage = 20 => "unpin_user_page",
    UnpinUserPages = 21 => "unpin_user_pages",
    UnpinUserPagesDirtyLock = 22 => "unpin_user_pages_dirty_lock",
    UnpinUserPageRangeDirtyLock = 23 => "unpin_user_page_range_dirty_lock",
    UnpinFolio = 24 => "unpin_folio",
    UnpinFolios = 25 => "unpin_folios",
    UnpinUserFolio = 26 => "unpin_user_folio",
    /// Drops the FOLL_GET references that direct I/O took (5.x to 6.4).
    BioReleasePages = 27 => "bio_release_pages",
    /// `__bio_release_pages`, the out-of-line half of bio_release_pages (5.15+).
    UnderscoreBioReleasePages = 28 => "__bio_release_pages",
    /// Drops the reference a vmsplice'd page held in a pipe buffer.
    PageCachePipeBufRelease = 29 => "page_cache_pipe_buf_release",
    /// kmem:mm_page_free: the page is free, so no reference of any kind is left.
    MmPageFree = 30 => "mm_page_free",
    TryToUnmapOne = 40 => "try_to_unmap_one",
    PageMkcleanOne = 41 => "page_mkclean_one",
    /// ext4's per-page writeback: ext4_bio_write_page (up to 6.3), ext4_bio_write_folio (6.4+).
    Ext4BioWritePage = 42 => "ext4_bio_write_page",
    Ext4BioWriteFolio = 43 => "ext4_bio_write_folio",
    /// filemap:mm_filemap_delete_from_page_cache.
    MmFilemapDeleteFromPageCache = 44 => "mm_filemap_delete_from_page_cache",
    FolioMarkDirty = 45 => "folio_mark_dirty",
    SetPageDirty = 46 => "set_page_dirty",
    /// writeback:writeback_dirty_folio (5.17+) and writeback_dirty_page (before).
    WritebackDirtyFolio = 47 => "writeback_dirty_folio",
    WritebackDirtyPage = 48 => "writeback_dirty_page",
    /// The start of writeback of a folio, whatever the filesystem:
    /// `__folio_start_writeback` (5.16+), `__test_set_page_writeback` (before).
    FolioStartWriteback = 49 => "__folio_start_writeback",
    TestSetPageWriteback = 51 => "__test_set_page_writeback",
    /// pinwatch's own re-check of held references (sweep_pfn).
    Sweep = 50 => "sweep",
}

impl Hook {
    pub const ACQUIRE: [Hook; 9] = [
        Hook::GetUserPages,
        Hook::PinUserPages,
        Hook::GetUserPagesFast,
        Hook::PinUserPagesFast,
        Hook::GetUserPagesFastOnly,
        Hook::GetUserPagesRemote,
        Hook::PinUserPagesRemote,
        Hook::GetUserPagesUnlocked,
        Hook::PinUserPagesUnlocked,
    ];

    pub fn from_u16(v: u16) -> Option<Hook> {
        Hook::ALL.iter().copied().find(|h| *h as u16 == v)
    }

    /// pin_* calls take FOLL_PIN references, get_* calls plain FOLL_GET references.
    pub const fn is_pin(self) -> bool {
        matches!(
            self,
            Hook::PinUserPages
                | Hook::PinUserPagesFast
                | Hook::PinUserPagesRemote
                | Hook::PinUserPagesUnlocked
        )
    }
}

/// Which kind of reference a release drops ([`ReleaseRecord::release`]).
pub mod release {
    /// A FOLL_PIN reference (the unpin family).
    pub const UNPIN: u16 = 1;
    /// A FOLL_GET reference (bio or pipe buffer release: a put_page we can see).
    pub const PUT: u16 = 2;
    /// The page was freed: every reference of either kind is gone.
    pub const FREED: u16 = 3;
    /// A hazard hook found the kernel's own counts too low for the references pinwatch
    /// thought were held (their release went unseen, e.g. an inline put_page): all gone.
    pub const GONE: u16 = 4;
}

#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct RecordHeader {
    pub version: u16,
    pub kind: u16,
    pub hook: u16,
    pub flags: u16,
    pub ts_ns: u64,
    /// The process (tgid) and thread of the task in whose context the hook ran.
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    pub comm: [u8; TASK_COMM_LEN],
}

/// One chunk of a GUP call that returned (successfully or not).
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PinRecord {
    pub header: RecordHeader,
    /// gup_flags as passed, undecoded: FOLL_* values differ between kernels and user
    /// space knows which ones this kernel uses.
    pub gup_flags: u32,
    /// Index of this chunk within the call, and how many pfns it carries.
    pub chunk: u16,
    pub nr_pfns: u16,
    /// What the call returned: pages taken, or -errno.
    pub ret: i64,
    pub start: u64,
    pub nr_requested: u64,
    /// An id shared by all chunks of one call.
    pub call_id: u64,
    /// Pages of this chunk that belong to a file's page cache, and the file of the
    /// first of them (0 when none).
    pub file_pages: u16,
    pub _pad: [u16; 3],
    pub file: FileRef,
    /// Variable-length, and the record is sent cut after its last word: with
    /// [`RECORD_STACK`], first the GUP call's kernel stack (who called GUP: io_uring,
    /// direct I/O, a driver) as [`KernelStack`] lays it out but only its `nr` frames;
    /// then `nr_pfns` pfns, the folio head pfn of each page with its folio's order above
    /// [`PFN_ORDER_SHIFT`]. A one-page call with a 20-frame stack is 304 bytes, and the
    /// chunks after a long call's first carry no stack (640 bytes for 64 pages).
    pub words: [u64; PIN_WORDS],
}

/// Room in [`PinRecord::words`]: a stack and a chunk's pfns, rounded up to a power of two
/// so that the kernel side bounds an index with a mask.
pub const PIN_WORDS: usize = 128;
const _: () = assert!(1 + STACK_FRAMES + PFNS_PER_RECORD <= PIN_WORDS && PIN_WORDS.is_power_of_two());

impl PinRecord {
    /// Words the stack takes at the start of `words` (its `nr` word and its frames): 0
    /// without [`RECORD_STACK`], 1 for a failed walk (a negative errno in `nr`).
    pub fn stack_words(&self) -> usize {
        if self.header.flags & RECORD_STACK == 0 {
            return 0;
        }
        1 + stack_frames(self.stack_nr())
    }

    /// The stack's `nr` word: frames filled, or a negative errno.
    fn stack_nr(&self) -> i32 {
        self.words[0] as u32 as i32
    }

    /// The call's kernel stack frames, innermost first: None when this chunk carries no
    /// stack or the kernel could not walk it.
    pub fn stack(&self) -> Option<&[u64]> {
        let n = self.stack_words();
        (n > 0 && self.stack_nr() >= 0).then(|| &self.words[1..n])
    }

    /// The pfns this chunk carries (at most PFNS_PER_RECORD).
    pub fn pfns(&self) -> &[u64] {
        let at = self.stack_words();
        &self.words[at..at + (self.nr_pfns as usize).min(PFNS_PER_RECORD)]
    }

    /// Bytes the kernel side sends of this record: up to its last word.
    pub fn sent_len(&self) -> usize {
        PIN_FIXED + 8 * (self.stack_words() + (self.nr_pfns as usize).min(PFNS_PER_RECORD))
    }
}

/// Frames a stack's `nr` word names, within 0..=STACK_FRAMES (a negative errno: none).
#[inline(always)]
pub fn stack_frames(nr: i32) -> usize {
    if nr <= 0 {
        0
    } else if nr as usize > STACK_FRAMES {
        STACK_FRAMES
    } else {
        nr as usize
    }
}

/// Return addresses kept per stack: the hook, the few tracing frames above it (fentry
/// trampolines) and the frames worth reading below.
pub const STACK_FRAMES: usize = 32;

/// A kernel stack carried in the record itself (bpf_get_stack), not an id into a stack
/// map: a stack map refuses a stack whose hash bucket another stack holds, and those
/// refusals grow with every distinct stack a long-running daemon meets.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct KernelStack {
    /// Frames filled in `ips`, or a negative errno when the kernel could not walk it.
    pub nr: i32,
    pub _pad: u32,
    /// Innermost first.
    pub ips: [u64; STACK_FRAMES],
}

impl KernelStack {
    /// The frames bpf_get_stack filled, or None when it failed.
    pub fn frames(&self) -> Option<&[u64]> {
        (self.nr >= 0).then(|| &self.ips[..stack_frames(self.nr)])
    }
}

/// The file a page-cache folio belongs to.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct FileRef {
    /// super_block->s_dev (kernel dev_t: major << 20 | minor).
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
    /// super_block->s_magic: tells shmem/hugetlbfs (no writeback) from disk filesystems.
    pub fs_magic: u64,
}

/// A pinned folio met a hazard hook. The header's task is the actor (kswapd, a flusher,
/// the truncating process); the pinner is what PINS knew.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PageRecord {
    pub header: RecordHeader,
    /// page_op::*
    pub op: u16,
    /// seen::*
    pub seen: u16,
    /// backing::*
    pub backing: u16,
    /// Folio order (0 for a single page).
    pub order: u16,
    pub pfn: u64,
    /// page index in the file (folio->index), when backing is FILE.
    pub index: u64,
    pub file: FileRef,
    /// The kernel's own view at this moment: folio->_refcount, and the large-folio pin
    /// count (-1 when the folio is a single page or the kernel has no such field).
    pub refcount: i32,
    pub pincount: i32,
    /// The actor's kernel stack: how it came to unmap, clean, write or drop the page.
    pub stack: KernelStack,
    /// PINS as the kernel side knew it (all zero when seen is KERNEL_PIN_COUNT).
    pub pin_refs: u32,
    pub get_refs: u32,
    pub pinner_tgid: u32,
    pub gup_flags: u32,
    pub first_ts_ns: u64,
}

/// One chunk of a release (unpin, put or free) of pages pinwatch saw being taken.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct ReleaseRecord {
    pub header: RecordHeader,
    pub release: u16,
    pub chunk: u16,
    pub nr_pfns: u16,
    /// make_dirty of the unpin_*_dirty_lock calls.
    pub dirty: u16,
    pub call_id: u64,
    /// References each listed pfn loses: 1, except for a release of many references on
    /// one folio (unpin_user_folio of what io_uring coalesced: 511 of a 2 MiB folio),
    /// sent as its one pfn with the count.
    pub refs_each: u32,
    pub _pad: u32,
    pub pfns: [u64; PFNS_PER_RECORD],
}

/// A pin record's pfns carry their folio's order above this bit (6 bits), below the
/// bit 63 of "not tracked": pfns fit in 52 bits with 5-level paging.
pub const PFN_ORDER_SHIFT: u64 = 56;
pub const PFN_MASK: u64 = (1 << PFN_ORDER_SHIFT) - 1;

/// Bytes of a pin record before its words (stack and pfns): a record is sent cut after
/// its last word.
pub const PIN_FIXED: usize = core::mem::offset_of!(PinRecord, words);
/// Bytes of a release record before its pfns.
pub const RELEASE_FIXED: usize = core::mem::offset_of!(ReleaseRecord, pfns);

/// A GUP call in flight on one thread, from entry to return (map GUP_CALLS).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct GupCall {
    pub hook: u16,
    /// Nested GUP calls below the outermost one (only the outermost is recorded).
    pub depth: u16,
    pub gup_flags: u32,
    pub pages: u64,
    pub start: u64,
    pub nr_requested: u64,
}

/// What the kernel side knows of one pinned folio (map PINS, keyed by head pfn).
/// Hazard hooks consult it; user space keeps the full per-pin story of the references
/// it was sent.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct PinState {
    pub pin_refs: u32,
    pub get_refs: u32,
    /// tgid of the latest pinner.
    pub tgid: u32,
    pub gup_flags: u32,
    pub first_ts_ns: u64,
    /// Of pin_refs + get_refs, those whose pin record was never sent (monitoring mode:
    /// a transient pin is counted, not streamed). Releases drop these first, silently.
    pub quiet_refs: u32,
    /// pin_state::* bits.
    pub state: u32,
}

/// Pages of one PIN_BLOCKS entry: 32 consecutive pfns, the block's key being the first
/// pfn over 32.
pub const BLOCK_PAGES: usize = 32;
pub const BLOCK_SHIFT: u64 = 5;

/// What the kernel side knows of the long-term FOLL_PIN references on 32 consecutive
/// small folios (map PIN_BLOCKS, keyed by pfn >> BLOCK_SHIFT). RDMA, VFIO and io_uring
/// pin gigabytes of 4 KiB pages long-term, physically close together: one entry per
/// folio (PINS) costs about 100 bytes per page, one per block about 8 when the block is
/// full. Every reference here was streamed: user space holds each pin's story, and the
/// hazard hooks need only the counts.
#[repr(C)]
#[derive(Copy, Clone, Debug)]
pub struct PinBlock {
    /// FOLL_PIN references on each page of the block.
    pub pin_refs: [u32; BLOCK_PAGES],
    /// Per page, 1 once a hazard hook exposed it (a byte each, so that no CPU's store
    /// can undo another's: 5.10 has no atomic OR).
    pub exposed: [u8; BLOCK_PAGES],
    /// References on the whole block: at 0 the entry goes.
    pub held: u32,
    /// tgid and gup_flags of the latest pinner, and when the block's first pin came.
    pub tgid: u32,
    pub gup_flags: u32,
    pub _pad: u32,
    pub first_ts_ns: u64,
}

/// Bits of [`PinState::state`].
pub mod pin_state {
    /// A hazard hook unmapped, cleaned, wrote back or dropped the folio while pinned:
    /// its dirtying and its releases now matter to user space, whatever the mode.
    pub const EXPOSED: u32 = 1;
    /// The references were found by the start-up scan, not seen being taken: a page of
    /// the same process and folio found again adds one, up to the kernel's pin count.
    pub const FOUND: u32 = 2;
}

/// GUP activity of one process as the kernel side counts it (map PROC_PINS, by tgid):
/// what live views read at each refresh instead of a record per call.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default)]
pub struct ProcPins {
    /// GUP calls that took pages, and pages taken, since pinwatch started.
    pub calls: u64,
    pub pages: u64,
    /// Page references taken by calls that were not streamed and not yet released.
    pub quiet_held: u64,
    /// Calls and pages that were streamed as pin records.
    pub streamed_calls: u64,
    /// Pages taken by long-term calls since pinwatch started. Held = this minus what
    /// user space has seen released (map LONGTERM_RELEASED): the enforced figure.
    pub longterm_pages: u64,
}

/// The counts of one CPU's latest run of quiet GUP calls that kept no reference (direct
/// I/O into anonymous memory, the commonest call), all by one process, not yet added to
/// its PROC_PINS entry (map PROC_BATCH, per CPU): the kernel side adds them there when
/// another process's such call comes to that CPU, and user space adds each CPU's to
/// its process when it reads PROC_PINS. A run of one process's reads then costs a
/// per-CPU array lookup a call, not a hash lookup and atomic adds.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcBatch {
    pub tgid: u32,
    pub _pad: u32,
    pub calls: u64,
    pub pages: u64,
}

/// Indexes of the CALIB array (vmemmap_base calibration).
pub mod calib {
    pub const BASE: u32 = 0;
    pub const SAMPLES: u32 = 1;
    /// Samples whose base differed from the first one.
    pub const DISAGREEMENTS: u32 = 2;
    pub const NR: u32 = 3;
}

/// Indexes of the COUNTERS per-CPU array: everything the kernel side had to drop.
pub mod counter {
    /// A ring-buffer reservation failed: a record was lost.
    pub const RINGBUF_FULL: u32 = 0;
    /// PINS had no room for a new folio.
    pub const PIN_MAP_FULL: u32 = 1;
    /// A GUP call took more pages than the records can carry.
    pub const PFNS_TRUNCATED: u32 = 2;
    /// GUP_CALLS (or RELEASE_DEPTH) had no room for a call in flight.
    pub const CALL_MAP_FULL: u32 = 3;
    /// A page pointer could not be read.
    pub const READ_FAILED: u32 = 4;
    /// A kernel stack could not be walked (bpf_get_stack failed): the record went
    /// out without it.
    pub const STACK_LOST: u32 = 5;
    /// Programs nested deeper than the scratch levels on one CPU (interrupts inside
    /// interrupts inside a hook): the innermost record was not made.
    pub const NESTED_TOO_DEEP: u32 = 6;
    /// QUIET_GETS had no room: an unstreamed FOLL_GET reference whose release goes
    /// unseen stays counted until its page is freed.
    pub const QUIET_GETS_FULL: u32 = 7;
    /// PROC_PINS had no room for a process: its GUP calls went uncounted per process
    /// (their pins are tracked all the same).
    pub const PROC_MAP_FULL: u32 = 8;
    pub const NR: u32 = 9;
}

/// Struct layouts and kernel constants, read by user space from BTF and kallsyms and
/// written into the programs as globals before load. The names are the globals'.
pub mod globals {
    /// Address of the kernel variable `vmemmap_base` (its value is read at run time).
    pub const VMEMMAP_BASE_ADDR: &str = "VMEMMAP_BASE_ADDR";
    /// The value of vmemmap_base when user space calibrated it (kallsyms without data
    /// symbols); used instead of VMEMMAP_BASE_ADDR when non-zero.
    pub const VMEMMAP_BASE: &str = "VMEMMAP_BASE";
    /// Offset of `pfn` in the kmem:mm_page_free tracepoint record (tracefs format).
    pub const MM_PAGE_FREE_PFN_OFF: &str = "MM_PAGE_FREE_PFN_OFF";
    pub const STRUCT_PAGE_SIZE: &str = "STRUCT_PAGE_SIZE";
    /// 1 where a struct page at the start of a vmemmap page may be a fake head (before
    /// 7.1, with the HugeTLB vmemmap optimization built in).
    pub const FAKE_HEADS: &str = "FAKE_HEADS";
    /// log2 of STRUCT_PAGE_SIZE when it is a power of two (64 on x86-64), else 0.
    pub const STRUCT_PAGE_SHIFT: &str = "STRUCT_PAGE_SHIFT";
    /// Offset of compound_head (compound_info on 7.1+) in struct page.
    pub const PAGE_COMPOUND_HEAD_OFF: &str = "PAGE_COMPOUND_HEAD_OFF";
    /// 1 where a tail page's compound_info is a mask on its own address (7.1+ with the
    /// HugeTLB vmemmap optimization), 0 where it points to the head.
    pub const COMPOUND_INFO_MASK: &str = "COMPOUND_INFO_MASK";
    pub const BIO_IO_VEC_OFF: &str = "BIO_IO_VEC_OFF";
    pub const BIO_VCNT_OFF: &str = "BIO_VCNT_OFF";
    pub const PIPE_BUFFER_PAGE_OFF: &str = "PIPE_BUFFER_PAGE_OFF";
    /// pid of pinwatch itself: its own activity is not recorded.
    pub const SELF_TGID: &str = "SELF_TGID";
    /// 1: every GUP call and release is streamed (record); 0: monitoring, where only
    /// long-term pins, hazards and what they touch are (top, the daemon).
    pub const STREAM_ALL: &str = "STREAM_ALL";
    /// FOLL_LONGTERM's value on this kernel (it moved in 6.3).
    pub const FOLL_LONGTERM: &str = "FOLL_LONGTERM";
    /// 1 where no hooked GUP function calls another (6.2+; before, the GUP-fast slow
    /// path and pin_user_pages_unlocked call get_user_pages_unlocked): an fexit
    /// program then handles a monitored call from its own arguments, with no call map.
    pub const GUP_UNNESTED: &str = "GUP_UNNESTED";
    /// 1 where the loader made the object's calls of helper RDONLY_CAST_CALL calls of
    /// the kfunc bpf_rdonly_cast (6.2+): kernel words are then read by loads the JIT
    /// guards, not by bpf_probe_read_kernel.
    pub const RDONLY_CAST: &str = "RDONLY_CAST";
    /// BTF id of the struct kernel memory is cast to for those loads (struct pt_regs:
    /// unsigned longs from offset 0).
    pub const WORDS_BTF_ID: &str = "WORDS_BTF_ID";
    /// 1 where the kernel has BPF_CMPXCHG (5.12+): GUP calls in flight go into a slot
    /// of their thread first (CALL_SLOTS), the hash map only when it is taken.
    pub const CALL_SLOTS_ON: &str = "CALL_SLOTS_ON";
    /// 1 where the kernel has bpf_get_func_arg (5.17+, inlined by its verifier): fentry
    /// and fexit programs read pointer arguments with it instead of
    /// bpf_probe_read_kernel.
    pub const FUNC_ARG_INLINED: &str = "FUNC_ARG_INLINED";
    /// 1: every program returns at once (the bench's floor: the cost of the hooks alone).
    pub const FLOOR: &str = "FLOOR";
    /// Unread bytes in the ring past which every record wakes the reader.
    pub const WAKE_ABOVE: &str = "WAKE_ABOVE";
    /// struct page / folio fields the hazard hooks read (offsets from the folio head).
    pub const PAGE_FLAGS_OFF: &str = "PAGE_FLAGS_OFF";
    /// Bit number of PG_head in page->flags (64: unknown, every folio is order 0).
    pub const PG_HEAD_BIT: &str = "PG_HEAD_BIT";
    pub const PAGE_REFCOUNT_OFF: &str = "PAGE_REFCOUNT_OFF";
    pub const PAGE_MAPPING_OFF: &str = "PAGE_MAPPING_OFF";
    pub const PAGE_INDEX_OFF: &str = "PAGE_INDEX_OFF";
    /// Where a large folio keeps its order (one byte) and its pin count (0: nowhere).
    pub const FOLIO_ORDER_OFF: &str = "FOLIO_ORDER_OFF";
    pub const FOLIO_PINCOUNT_OFF: &str = "FOLIO_PINCOUNT_OFF";
    /// page->_mapcount (0: unknown) and PG_private's bit (64: unknown).
    pub const PAGE_MAPCOUNT_OFF: &str = "PAGE_MAPCOUNT_OFF";
    pub const PG_PRIVATE_BIT: &str = "PG_PRIVATE_BIT";
    /// Smallest order whose folios keep a separate pin count (2 on 5.10, 1 later).
    pub const PINCOUNT_MIN_ORDER: &str = "PINCOUNT_MIN_ORDER";
    pub const MAPPING_HOST_OFF: &str = "MAPPING_HOST_OFF";
    pub const INODE_INO_OFF: &str = "INODE_INO_OFF";
    pub const INODE_SB_OFF: &str = "INODE_SB_OFF";
    pub const SB_DEV_OFF: &str = "SB_DEV_OFF";
    pub const SB_MAGIC_OFF: &str = "SB_MAGIC_OFF";
}

/// The helper number the programs call where they mean the kfunc bpf_rdonly_cast: no
/// helper has it, and the loader turns each such call into the kfunc's (a kfunc call
/// names its BTF id, which only the running kernel knows). Unpatched, the calls are
/// never reached (globals::RDONLY_CAST is 0).
pub const RDONLY_CAST_CALL: u32 = 0x1ffff;

/// GUP_PIN_COUNTING_BIAS: what one FOLL_PIN adds to a small folio's refcount.
pub const GUP_PIN_COUNTING_BIAS: i32 = 1024;

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for GupCall {}
    unsafe impl aya::Pod for PinState {}
    unsafe impl aya::Pod for PinBlock {}
    unsafe impl aya::Pod for ProcPins {}
    unsafe impl aya::Pod for ProcBatch {}
    unsafe impl aya::Pod for Enforce {}
    unsafe impl aya::Pod for FoundBatch {}
    unsafe impl aya::Pod for FileRef {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn hook_ids_round_trip() {
        for v in 0..64u16 {
            if let Some(h) = Hook::from_u16(v) {
                assert_eq!(h as u16, v);
            }
        }
        assert_eq!(Hook::from_u16(4), Some(Hook::PinUserPagesFast));
        assert_eq!(Hook::from_u16(0), None);
    }

    #[test]
    fn record_sizes_are_stable() {
        // The layouts are a wire format: a size change must come with a version bump.
        const STACK: usize = 8 + 8 * STACK_FRAMES;
        assert_eq!(core::mem::size_of::<KernelStack>(), STACK);
        assert_eq!(core::mem::size_of::<RecordHeader>(), 56);
        assert_eq!(core::mem::size_of::<PinRecord>(), 56 + 40 + 8 + 24 + 8 * PIN_WORDS);
        assert_eq!(core::mem::size_of::<PageRecord>(), 56 + 8 + 16 + 24 + 8 + STACK + 24);
        assert_eq!(core::mem::size_of::<ReleaseRecord>(), 56 + 24 + 8 * PFNS_PER_RECORD);
        // Pin and release records are sent cut after their last pfn.
        assert_eq!(PIN_FIXED, 56 + 40 + 8 + 24);
        assert_eq!(RELEASE_FIXED, 56 + 24);
        assert_eq!(core::mem::size_of::<PinState>(), 32);
    }
}
