//! struct page arithmetic: pointer to pfn, subpage to folio head. Layouts come in as
//! globals written by user space from BTF, so no offset is compiled in.

use aya_ebpf::helpers::bpf_probe_read_kernel;

use crate::maps::VMEMMAP;

#[no_mangle]
static VMEMMAP_BASE_ADDR: u64 = 0;
#[no_mangle]
static VMEMMAP_BASE: u64 = 0;
#[no_mangle]
static STRUCT_PAGE_SIZE: u64 = 64;
#[no_mangle]
static STRUCT_PAGE_SHIFT: u64 = 0;
#[no_mangle]
static PAGE_COMPOUND_HEAD_OFF: u64 = 8;
#[no_mangle]
static COMPOUND_INFO_MASK: u64 = 0;
#[no_mangle]
static FAKE_HEADS: u64 = 0;

#[no_mangle]
static RDONLY_CAST: u64 = 0;
#[no_mangle]
static WORDS_BTF_ID: u64 = 0;

#[inline(always)]
fn global(v: &'static u64) -> u64 {
    unsafe { core::ptr::read_volatile(v) }
}

/// The u64 at kernel address `addr` (0 if unreadable).
#[inline(always)]
pub fn kernel_u64(addr: u64) -> u64 {
    kernel_words::<1>(addr)[0]
}

/// The `N` u64 words from kernel address `addr` (0s if unreadable; N at most 4). Where
/// the loader found bpf_rdonly_cast (6.2+, globals::RDONLY_CAST), `addr` is cast to a
/// struct of unsigned longs and read by plain loads, which the JIT guards (a fault reads
/// 0) and the verifier inlines the cast away: a few instructions where
/// bpf_probe_read_kernel costs about 90 (6.12, instruction clock). Before, the helper.
#[inline(always)]
pub fn kernel_words<const N: usize>(addr: u64) -> [u64; N] {
    if global(&RDONLY_CAST) != 0 {
        // SAFETY: the loader made every call of this number a call of bpf_rdonly_cast
        // (void *bpf_rdonly_cast(const void *obj, u32 btf_id)), or left RDONLY_CAST at 0.
        let cast: unsafe extern "C" fn(u64, u64) -> *const u64 =
            unsafe { core::mem::transmute(pinwatch_common::RDONLY_CAST_CALL as usize) };
        let words = unsafe { cast(addr, global(&WORDS_BTF_ID)) };
        let mut w = [0u64; N];
        for (i, v) in w.iter_mut().enumerate() {
            *v = unsafe { core::ptr::read_volatile(words.add(i)) };
        }
        return w;
    }
    unsafe { bpf_probe_read_kernel(addr as *const [u64; N]) }.unwrap_or([0; N])
}

#[inline(always)]
pub fn struct_page_size() -> u64 {
    global(&STRUCT_PAGE_SIZE)
}

/// The folio head of a (sub)page: compound_head has bit 0 set on tail pages and then
/// points one byte past the head, or, on 7.1+ with the HugeTLB vmemmap optimization,
/// holds a mask that gives the head from the tail's own address (COMPOUND_INFO_MASK).
/// An unreadable field leaves the page as its own head.
#[inline(always)]
pub fn folio_head(page: u64) -> u64 {
    head_at(page, global(&PAGE_COMPOUND_HEAD_OFF))
}

/// A hook's page argument: a folio is its own head (no read); a page may be a tail.
#[derive(Clone, Copy)]
pub enum PageArg {
    Page(u64),
    Folio(u64),
}

impl PageArg {
    #[inline(always)]
    pub fn addr(self) -> u64 {
        match self {
            PageArg::Page(p) | PageArg::Folio(p) => p,
        }
    }

    /// The folio head: one read of compound_head for a page, none for a folio.
    #[inline(always)]
    pub fn head(self) -> u64 {
        match self {
            PageArg::Page(p) => folio_head(p),
            PageArg::Folio(f) => f,
        }
    }
}

/// folio_head with the offset at hand. Written without branches on the data: it runs in
/// loops the verifier walks page by page, where each branch would double the paths.
/// The branch on the encoding is on a constant the verifier knows (a frozen global).
#[inline(always)]
fn head_at(page: u64, head_off: u64) -> u64 {
    let ch = kernel_u64(page + head_off);
    let tail = 0u64.wrapping_sub(ch & 1);
    // A struct page address has bit 0 clear, so the mask's bit 0 changes nothing.
    let head = if global(&COMPOUND_INFO_MASK) != 0 { page & ch } else { ch.wrapping_sub(1) };
    let found = (page & !tail) | (head & tail);
    // A call, not a branch here: the check's own branches are the verifier's once.
    if global(&FAKE_HEADS) != 0 { unfake(found, head_off) } else { found }
}

/// page_fixed_fake_head(): under the HugeTLB vmemmap optimization (before 7.1) the
/// vmemmap pages of a huge page's tails are remapped onto its first one, so a tail
/// whose struct page starts a vmemmap page reads as the head. The struct page after
/// it then reads as a tail and names the real head. `page` is what its own
/// compound_head said; a real head gives itself back.
#[no_mangle]
#[inline(never)]
pub extern "C" fn unfake(page: u64, head_off: u64) -> u64 {
    if page & 4095 != 0 {
        return page;
    }
    let next = page + struct_page_size();
    let ch = kernel_u64(next + head_off);
    if ch & 1 != 0 { ch - 1 } else { page }
}

/// A struct page's address divided by the size of struct page: which of all possible
/// struct pages it is, without vmemmap_base (the pin filter's key, pins::filter_slot).
/// A shift where the size is a power of two: the branch is on a frozen global, which
/// the verifier resolves.
#[inline(always)]
pub fn struct_page_index(page: u64) -> u64 {
    let shift = global(&STRUCT_PAGE_SHIFT);
    if shift != 0 { page >> shift } else { page / struct_page_size().max(1) }
}

/// pfn of a struct page pointer: (page - vmemmap_base) / sizeof(struct page).
#[inline(always)]
pub fn page_to_pfn(page: u64) -> u64 {
    PfnMath::new().pfn(page)
}

/// Folio head pfn of any page of the folio.
#[inline(always)]
pub fn head_pfn(page: u64) -> u64 {
    PfnMath::new().head_pfn(page)
}

/// vmemmap_base: calibrated by user space at load, or read from its symbol the first
/// time and kept in map VMEMMAP (it does not move after boot), so that the programs on
/// every page free, dirtying and release load it rather than call a helper. A global
/// function: its branches are checked once, not in every loop that calls it.
#[no_mangle]
#[inline(never)]
pub extern "C" fn vmemmap_base() -> u64 {
    let calibrated = global(&VMEMMAP_BASE);
    if calibrated != 0 {
        return calibrated;
    }
    let Some(kept) = VMEMMAP.get_ptr_mut(0) else { return 0 };
    let v = unsafe { *kept };
    if v != 0 {
        return v;
    }
    let v = unsafe { bpf_probe_read_kernel(global(&VMEMMAP_BASE_ADDR) as *const u64) }.unwrap_or(0);
    unsafe { *kept = v };
    v
}

/// vmemmap_base and the struct page layout, read once for a loop over many pages.
#[derive(Clone, Copy)]
pub struct PfnMath {
    base: u64,
    size: u64,
    head_off: u64,
}

impl PfnMath {
    #[inline(always)]
    pub fn new() -> PfnMath {
        PfnMath::with_base(vmemmap_base())
    }

    /// With vmemmap_base already read (once per call, not once per page).
    #[inline(always)]
    pub fn with_base(base: u64) -> PfnMath {
        PfnMath { base, size: struct_page_size().max(1), head_off: global(&PAGE_COMPOUND_HEAD_OFF) }
    }

    #[inline(always)]
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The folio head of a page pointer and the head's `mapping`. Where compound_head
    /// and mapping lie in the struct page's first 32 bytes (offsets 8 and 24: every
    /// x86-64 kernel from 5.10 on), one read of those bytes answers for a page that is
    /// its own head, the common case: a small folio. A tail page, or under the HugeTLB
    /// vmemmap optimization a struct page that starts a vmemmap page (it may read as a
    /// head and be a tail: unfake), goes the long way, head then mapping.
    #[inline(always)]
    pub fn head_and_mapping(&self, page: u64) -> (u64, u64) {
        if let Some(m) = self.own_head_mapping(page) {
            return (page, m);
        }
        let head = self.head(page);
        (head, mapping(head))
    }

    /// The `mapping` of a page that is its own folio's head, known by one read of the
    /// struct page's first 32 bytes (see head_and_mapping); None: the long way is needed.
    #[inline(always)]
    pub fn own_head_mapping(&self, page: u64) -> Option<u64> {
        if self.head_off == 8 && global(&PAGE_MAPPING_OFF) == 24 {
            let w = kernel_words::<4>(page);
            if w[1] & 1 == 0 && (global(&FAKE_HEADS) == 0 || page & 4095 != 0) {
                return Some(w[3]);
            }
        }
        None
    }

    /// The folio head of a page pointer.
    #[inline(always)]
    pub fn head(&self, page: u64) -> u64 {
        head_at(page, self.head_off)
    }

    /// Folio head pfn of a page pointer, u64::MAX when it cannot be known.
    #[inline(always)]
    pub fn head_pfn(&self, page: u64) -> u64 {
        let head = self.head(page);
        if page == 0 {
            return u64::MAX;
        }
        self.pfn(head)
    }

    /// The struct page of a pfn (0 when vmemmap_base is unknown).
    #[inline(always)]
    pub fn page(&self, pfn: u64) -> u64 {
        if self.base == 0 { 0 } else { self.base + pfn * self.size }
    }

    /// pfn of a struct page pointer: (page - vmemmap_base) / sizeof(struct page).
    #[inline(always)]
    pub fn pfn(&self, page: u64) -> u64 {
        if self.base == 0 || page < self.base {
            return u64::MAX;
        }
        (page - self.base) / self.size
    }
}

// ---- what the kernel itself knows of a folio, read for hazards only.
#[no_mangle]
static PAGE_FLAGS_OFF: u64 = 0;
#[no_mangle]
static PG_HEAD_BIT: u64 = 64;
#[no_mangle]
static PAGE_REFCOUNT_OFF: u64 = 52;
#[no_mangle]
static PAGE_MAPPING_OFF: u64 = 24;
#[no_mangle]
static PAGE_INDEX_OFF: u64 = 32;
#[no_mangle]
static FOLIO_ORDER_OFF: u64 = 0;
/// page->_mapcount (0: unknown), and PG_private's bit (64: unknown).
#[no_mangle]
static PAGE_MAPCOUNT_OFF: u64 = 0;
#[no_mangle]
static PG_PRIVATE_BIT: u64 = 64;
#[no_mangle]
static FOLIO_PINCOUNT_OFF: u64 = 0;
#[no_mangle]
static PINCOUNT_MIN_ORDER: u64 = 1;
#[no_mangle]
static MAPPING_HOST_OFF: u64 = 0;
#[no_mangle]
static INODE_INO_OFF: u64 = 0;
#[no_mangle]
static INODE_SB_OFF: u64 = 0;
#[no_mangle]
static SB_DEV_OFF: u64 = 0;
#[no_mangle]
static SB_MAGIC_OFF: u64 = 0;

#[inline(always)]
fn read<T: Default>(addr: u64) -> T {
    unsafe { bpf_probe_read_kernel(addr as *const T) }.unwrap_or_default()
}

/// The kernel's own pin view of a folio head: what folio_maybe_dma_pinned() computes.
pub struct Live {
    pub refcount: i32,
    /// -1 when the folio keeps no separate pin count.
    pub pincount: i32,
    pub order: u16,
    pub maybe_dma_pinned: bool,
    /// References beyond those of its mappings, page cache and private data (small
    /// folios whose _mapcount is known; -1 otherwise): FOLL_GET references, plus any
    /// transient ones, plus GUP_PIN_COUNTING_BIAS per FOLL_PIN.
    pub extra_refs: i64,
}

impl Live {
    /// FOLL_GET references pinwatch believes held that the kernel's counts cannot
    /// account for: their release went unseen. Only ever errs towards "still held".
    #[inline(always)]
    pub fn gets_gone(&self, get_refs: u32) -> bool {
        if get_refs == 0 || self.extra_refs < 0 {
            return get_refs != 0 && (self.refcount as i64) < get_refs as i64;
        }
        (self.extra_refs % pinwatch_common::GUP_PIN_COUNTING_BIAS as i64) < get_refs as i64
    }
}

/// The order of the folio at `head` (0: a small folio), read as live() reads it.
#[inline(always)]
pub fn folio_order(head: u64) -> u64 {
    let bit = global(&PG_HEAD_BIT);
    let flags: u64 = read(head + global(&PAGE_FLAGS_OFF));
    let large = bit < 64 && flags & (1u64 << (bit & 63)) != 0;
    if large {
        (read::<u8>(head + global(&FOLIO_ORDER_OFF)) & 63) as u64
    } else {
        0
    }
}

#[inline(always)]
pub fn live(head: u64) -> Live {
    let refcount: i32 = read(head + global(&PAGE_REFCOUNT_OFF));
    let bit = global(&PG_HEAD_BIT);
    let flags: u64 = read(head + global(&PAGE_FLAGS_OFF));
    let large = bit < 64 && flags & (1u64 << (bit & 63)) != 0;
    let order = if large { read::<u8>(head + global(&FOLIO_ORDER_OFF)) as u16 } else { 0 };
    let pincount_off = global(&FOLIO_PINCOUNT_OFF);
    if large && pincount_off != 0 && order as u64 >= global(&PINCOUNT_MIN_ORDER) {
        let pincount: i32 = read(head + pincount_off);
        return Live { refcount, pincount, order, maybe_dma_pinned: pincount > 0, extra_refs: -1 };
    }
    let mapcount_off = global(&PAGE_MAPCOUNT_OFF);
    let extra_refs = if large || mapcount_off == 0 {
        -1
    } else {
        // _mapcount is -1 for an unmapped page; page cache holds one reference, and
        // private data (buffer heads) one more.
        let mapcount = read::<i32>(head + mapcount_off) as i64 + 1;
        let cache = (backing(mapping(head)) == pinwatch_common::backing::FILE) as i64;
        let pbit = global(&PG_PRIVATE_BIT);
        let private = (pbit < 64 && flags & (1u64 << (pbit & 63)) != 0) as i64;
        refcount as i64 - mapcount.max(0) - cache - private
    };
    // Small folios carry pins in _refcount, GUP_PIN_COUNTING_BIAS at a time (false
    // positives possible, negatives never: the kernel's own rule).
    Live { refcount, pincount: -1, order, maybe_dma_pinned: refcount >= pinwatch_common::GUP_PIN_COUNTING_BIAS, extra_refs }
}

/// folio->mapping: its low bits say anonymous (1) or movable/KSM (2, 3).
#[inline(always)]
pub fn mapping(head: u64) -> u64 {
    read(head + global(&PAGE_MAPPING_OFF))
}

#[inline(always)]
pub fn backing(mapping: u64) -> u16 {
    use pinwatch_common::backing;
    match (mapping, mapping & 3) {
        (0, _) => backing::NONE,
        (_, 0) => backing::FILE,
        (_, 1) => backing::ANON,
        _ => backing::OTHER,
    }
}

#[inline(always)]
pub fn page_index(head: u64) -> u64 {
    read(head + global(&PAGE_INDEX_OFF))
}

/// The file behind a page-cache mapping: mapping->host->{i_ino, i_sb->{s_dev, s_magic}}.
#[inline(always)]
pub fn file_of(mapping: u64) -> pinwatch_common::FileRef {
    let host: u64 = read(mapping + global(&MAPPING_HOST_OFF));
    if host == 0 {
        return Default::default();
    }
    let sb: u64 = read(host + global(&INODE_SB_OFF));
    pinwatch_common::FileRef {
        dev: if sb == 0 { 0 } else { read(sb + global(&SB_DEV_OFF)) },
        _pad: 0,
        ino: read(host + global(&INODE_INO_OFF)),
        fs_magic: if sb == 0 { 0 } else { read(sb + global(&SB_MAGIC_OFF)) },
    }
}
