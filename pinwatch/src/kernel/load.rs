//! Loading the eBPF object with this kernel's layouts, testing which attach types the
//! kernel accepts, and attaching every hook of the plan.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{FEntry, KProbe, Program, RawTracePoint},
    Btf, Ebpf, EbpfLoader,
};
use pinwatch_common::{counter, globals, ProcBatch, ProcPins};

use super::{
    btf::{self, Layouts},
    plan::{self, AttachMode, AttachType, Capabilities, Choice, Family, HookSpec, Mode, PlannedHook, Role},
    symbols::Symbols,
};

/// Bytes of the ring buffer: the whole trace passes through it while recording; while
/// monitoring only long-term pins, hazards and what they touch do, and a smaller ring
/// keeps the reader small (its pages are mapped into it, twice).
pub fn ring_bytes(streaming: Streaming) -> u32 {
    match streaming {
        Streaming::All => 8 << 20,
        Streaming::Monitor | Streaming::Floor => 1 << 20,
    }
}

/// Streamed GUP calls in flight at once with their stack (map GUP_STACKS) while
/// monitoring, where only long-term pins are streamed: RDMA registrations, VFIO maps,
/// io_uring buffers, rarely made by many threads at the same moment. Past it a call goes
/// without its stack, counted (stack_lost). Recording streams every call and keeps the
/// map's full 1024.
const MONITOR_STACKS: u32 = 128;

/// The programs, built by build.rs and embedded: pinwatch is one binary to copy.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pinwatch"));

/// Hash maps that take at most one new entry per program run: the calls in flight and
/// their stacks, the release depths (one per thread inside GUP or a release), the
/// per-process counts (one per process that ever pinned), and the maps user space alone
/// writes (enforcement). From 6.1 the kernel allocates hash map entries from per-CPU
/// caches that any context may use (bpf_mem_alloc), and the verifier lets tracing
/// programs use maps allocated as they fill: these then cost their buckets (16 bytes a
/// slot) and the entries in use, not every entry from the start (1.4 MiB while
/// monitoring). Before 6.1 the verifier warns, in the kernel log, about any such map
/// in a tracing program, so they stay preallocated there. The pin maps and QUIET_GETS
/// stay preallocated everywhere: one GUP call inserts hundreds of entries, and the
/// per-CPU caches run dry within a call.
const GROWN_ON_DEMAND: [&str; 8] =
    ["GUP_CALLS", "GUP_STACKS", "RELEASE_DEPTH", "PROC_PINS", "LONGTERM_RELEASED", "EXEMPT_UIDS", "EXEMPT_CGROUPS", "EXEMPT_COMMS"];

/// BPF_F_NO_PREALLOC (include/uapi/linux/bpf.h).
const BPF_F_NO_PREALLOC: u32 = 1;

/// A copy of an eBPF object whose named maps are allocated as they fill: the flag is
/// set in each map's definition in the object's `maps` section (struct bpf_map_def:
/// type, key_size, value_size, max_entries, then map_flags at byte 16), where aya reads
/// it when it creates the map. aya has no way to set a map's flags at load time.
fn without_prealloc(elf_bytes: &[u8], names: &[&str]) -> Result<Vec<u8>> {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
    const MAP_FLAGS_OFF: u64 = 16;
    let elf = object::File::parse(elf_bytes).context("parsing the eBPF object")?;
    let maps = elf.section_by_name("maps").context("the eBPF object has no maps section")?;
    let (maps_off, maps_len) = maps.file_range().context("the maps section has no data")?;
    let mut out = elf_bytes.to_vec();
    for name in names {
        let sym = elf
            .symbols()
            .find(|s| s.name() == Ok(*name) && s.section_index() == Some(maps.index()))
            .with_context(|| format!("the eBPF object has no map {name}"))?;
        if sym.address() + MAP_FLAGS_OFF + 4 > maps_len {
            bail!("map {name}'s definition runs past the maps section");
        }
        let at = (maps_off + sym.address() + MAP_FLAGS_OFF) as usize;
        let flags = u32::from_le_bytes(out[at..at + 4].try_into()?) | BPF_F_NO_PREALLOC;
        out[at..at + 4].copy_from_slice(&flags.to_le_bytes());
    }
    Ok(out)
}

/// Changes each instruction of an eBPF object's code sections that `patch` changes (it
/// returns whether it did), in place (ld_imm64 takes two slots); returns how many.
fn patch_instructions(elf_bytes: &mut [u8], mut patch: impl FnMut(&mut [u8]) -> bool) -> Result<usize> {
    use object::{Object as _, ObjectSection as _};
    const LD_IMM64: u8 = 0x18;
    let ranges: Vec<(u64, u64)> = {
        let elf = object::File::parse(&*elf_bytes).context("parsing the eBPF object")?;
        elf.sections().filter(|s| s.kind() == object::SectionKind::Text).filter_map(|s| s.file_range()).collect()
    };
    let mut changed = 0;
    for (off, len) in ranges {
        let code = elf_bytes.get_mut(off as usize..(off + len) as usize).context("a code section runs past the object")?;
        let mut at = 0;
        while at + 8 <= code.len() {
            let insn = &mut code[at..at + 8];
            let wide = insn[0] == LD_IMM64;
            changed += patch(insn) as usize;
            at += if wide { 16 } else { 8 };
        }
    }
    Ok(changed)
}

/// An instruction's immediate.
fn imm(insn: &[u8]) -> i32 {
    i32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]])
}

/// Makes an eBPF object fit for kernels before 5.12, whose verifier refuses any
/// compare-and-swap instruction (BPF_STX with a nonzero imm: "uses reserved fields")
/// wherever it is, reachable or not. The programs reach theirs only through the call
/// slots, which CALL_SLOTS_ON leaves off there, so each one becomes `r0 = -1`: what a
/// failed compare-and-swap leaves in r0 (the comparand is 0), were it ever run.
fn without_compare_exchange(elf_bytes: &mut [u8]) -> Result<usize> {
    const STX_ATOMIC_DW: u8 = 0xdb;
    const CMPXCHG: i32 = 0xf1;
    const MOV64_IMM_R0_MINUS_1: [u8; 8] = [0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
    patch_instructions(elf_bytes, |insn| {
        let hit = insn[0] == STX_ATOMIC_DW && imm(insn) == CMPXCHG;
        if hit {
            insn.copy_from_slice(&MOV64_IMM_R0_MINUS_1);
        }
        hit
    })
}

/// Makes an eBPF object's calls of helper `RDONLY_CAST_CALL` (which no helper has)
/// calls of the kfunc whose BTF id is `func_id`: a kfunc call is a call instruction
/// with src_reg BPF_PSEUDO_KFUNC_CALL (2) and the id, offset 0 for vmlinux. aya knows
/// nothing of kfuncs and leaves such calls as they are.
fn with_kfunc_calls(elf_bytes: &mut [u8], func_id: u32) -> Result<usize> {
    const CALL: u8 = 0x85;
    const PSEUDO_KFUNC_CALL: u8 = 2;
    let magic = pinwatch_common::RDONLY_CAST_CALL as i32;
    patch_instructions(elf_bytes, |insn| {
        let hit = insn[0] == CALL && insn[1] == 0 && imm(insn) == magic;
        if hit {
            insn[1] = PSEUDO_KFUNC_CALL << 4;
            insn[2..4].copy_from_slice(&0u16.to_le_bytes());
            insn[4..8].copy_from_slice(&func_id.to_le_bytes());
        }
        hit
    })
}

/// Blocks of 32 pages PIN_BLOCKS holds: a quarter of the host's memory pinned long-term
/// in small folios (at least 128 MiB, at most 128 GiB); what finds no room goes into
/// PINS, one entry per folio. Preallocated, like PINS (a map that grows
/// allocates as it inserts, and one GUP call inserts hundreds: the kernel's per-CPU
/// caches run dry within a call and the pins go untracked): about 256 bytes per block,
/// 2 bytes per 4 KiB page of the host, 0.05% of its memory.
pub fn block_capacity(phys_pages: u64) -> u32 {
    (phys_pages / 4 / pinwatch_common::BLOCK_PAGES as u64).clamp(1024, 1 << 20) as u32
}

/// Folios PINS holds: one per 512 KiB of the host's memory (at least 8192, at most
/// 262144: 1 GiB of base pages, far more in huge folios), about 104 bytes each. PINS
/// holds what is pinned for the length of an I/O (the pages of files under direct I/O,
/// every pin while recording), long-term pins of large folios (one entry a folio), and
/// the long-term pins of small folios PIN_BLOCKS has no room for; past it a pin is
/// counted (pin_map_full), not watched.
pub fn pin_map_capacity(phys_pages: u64) -> u32 {
    (phys_pages / 128).clamp(8192, 262_144) as u32
}

/// How many threads at once the maps of calls in flight hold (GUP_CALLS, and
/// RELEASE_DEPTH for releases), and how many live processes with GUP activity PROC_PINS
/// holds; past them a call is counted (call_map_full, proc_map_full). Where these maps
/// grow as they fill (6.1 and later) their whole size costs only hash buckets, 16 bytes
/// a slot, so they keep the size the programs declare. Where they are preallocated
/// (before 6.1) every slot costs its entry from the start, and they are sized from the
/// host's CPUs: 128 threads inside GUP at once per CPU (at least 1024), 256 processes
/// per CPU (at least 2048), up to the declared sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TaskCapacity {
    pub calls: u32,
    pub procs: u32,
    /// Call slots in front of the map of calls in flight, one per thread id modulo
    /// their number (maps::CALL_SLOTS: 5.12+, 0 before); set by the loader.
    pub call_slots: u32,
}

/// GUP_CALLS', PROC_PINS' and CALL_SLOTS' sizes in maps.rs.
const DECLARED_CALLS: u32 = 4096;
const DECLARED_PROCS: u32 = 8192;
const DECLARED_CALL_SLOTS: u32 = 1024;

pub fn task_capacity(cpus: u32, maps_on_demand: bool) -> TaskCapacity {
    if maps_on_demand {
        return TaskCapacity { calls: DECLARED_CALLS, procs: DECLARED_PROCS, call_slots: 0 };
    }
    TaskCapacity {
        calls: cpus.saturating_mul(128).clamp(1024, DECLARED_CALLS),
        procs: cpus.saturating_mul(256).clamp(2048, DECLARED_PROCS),
        call_slots: 0,
    }
}

fn phys_pages() -> u64 {
    // SAFETY: sysconf reads a value; -1 (unknown) becomes the smallest capacity.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }).unwrap_or(0)
}

/// What the user chose about loading (the command line's args::KernelArgs): the attach
/// types allowed, and the pin maps' sizes (None: sized from the host); and whether the
/// mode may enforce a cap (only the alert daemon: its configuration can turn it on at
/// any reload).
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub attach: AttachMode,
    pub pin_map_capacity: Option<u32>,
    pub pin_block_capacity: Option<u32>,
    pub enforce: bool,
}

/// The maps only enforcement uses (maps.rs: ENFORCE's exemptions, and what user space
/// says each process no longer holds). A mode that never enforces loads them at one
/// entry each: about 1 MiB of preallocated kernel memory it would never touch.
const ENFORCEMENT_MAPS: [&str; 4] = ["LONGTERM_RELEASED", "EXEMPT_UIDS", "EXEMPT_CGROUPS", "EXEMPT_COMMS"];

/// What the programs send to user space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streaming {
    /// Every GUP call and release (record: the full trace).
    All,
    /// What user space must see as it happens: long-term pins and their refusals,
    /// hazards and the releases and dirtying of exposed pages. Transient pins are
    /// tracked and counted in the kernel (PROC_PINS), not streamed (top, the daemon).
    Monitor,
    /// Nothing: every program returns at once (the bench's floor).
    Floor,
}

pub struct Kernel {
    pub release: String,
    pub vmemmap: Vmemmap,
    pub layouts: Layouts,
    pub caps: Capabilities,
    pub plan: Vec<PlannedHook>,
    pub ebpf: Ebpf,
    /// Parameter counts of the hooked functions, from BTF (fexit needs them).
    nargs: HashMap<&'static str, usize>,
    /// Kernel BTF for fentry/fexit, when the kernel has it.
    btf: Option<Btf>,
    /// Folios the pin map holds.
    pub pin_map_capacity: u32,
    /// Blocks of 32 small folios PIN_BLOCKS holds (long-term pins).
    pub block_capacity: u32,
    /// The maps of GROWN_ON_DEMAND are allocated as they fill (6.1 and later).
    pub maps_on_demand: bool,
    /// Threads in GUP and processes the per-task maps hold.
    pub tasks: TaskCapacity,
    /// The programs read kernel words by guarded loads (bpf_rdonly_cast, 6.2+), not
    /// through bpf_probe_read_kernel.
    pub direct_reads: bool,
}

/// log2 of sizeof(struct page) when it is a power of two, else 0 (the programs divide).
fn struct_page_shift(size: u64) -> u64 {
    if size.is_power_of_two() { size.trailing_zeros() as u64 } else { 0 }
}

fn short(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// The error and its causes on one line. Verifier logs run to megabytes: keep their
/// start and their end, where the verifier says what it rejected.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    const HEAD: usize = 300;
    const TAIL: usize = 700;
    if s.len() > HEAD + TAIL + 100 {
        let head_end = (0..=HEAD).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        let tail_start = (s.len() - TAIL..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(s.len());
        s = format!("{} [... {} bytes of verifier log ...] {}", &s[..head_end], tail_start - head_end, &s[tail_start..]);
    }
    s
}

impl Kernel {
    /// Reads layouts and symbols, loads the object and tests attach types. Does not
    /// attach the plan yet (doctor stops here).
    pub fn open(args: &LoadOptions, streaming: Streaming) -> Result<Kernel> {
        let mode = args.attach;
        let phys = phys_pages();
        let pin_map_capacity = args.pin_map_capacity.unwrap_or_else(|| pin_map_capacity(phys));
        super::check_privileges()?;
        // pfns, byte counts and the programs' page arithmetic are 4 KiB pages (x86-64).
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page != 4096 {
            bail!("this kernel uses {page}-byte pages; pinwatch knows 4 KiB pages only (x86-64) and would miscount every pin");
        }
        let release = super::release();
        let vmlinux = btf::load_vmlinux()?;
        let layouts = btf::read_layouts(&vmlinux).context("reading struct layouts from BTF")?;
        // tracefs says which functions can be probed and which tracepoints exist.
        if let Err(e) = super::calibrate::ensure_tracefs() {
            log::warn!("{e:#}");
        }
        let syms = Symbols::load(&plan::wanted_symbols())?;
        let vmemmap = match syms.addr("vmemmap_base") {
            Some(addr) => Vmemmap::Symbol(addr),
            None => match calibrate_vmemmap(&layouts) {
                Ok(base) => Vmemmap::Calibrated(base),
                // Without it struct page pointers cannot become pfns; doctor says so,
                // the programs send u64::MAX in place of each pfn, and every mode
                // says so at start.
                Err(e) => {
                    log::warn!("page frame numbers are unknown here (vmemmap_base: {e:#}): pins cannot be told apart by page, and hazards cannot be matched to pins");
                    Vmemmap::Unknown(format!("{e:#}"))
                }
            },
        };
        let (vmemmap_base_addr, vmemmap_base) = match vmemmap {
            Vmemmap::Symbol(a) => (a, 0u64),
            Vmemmap::Calibrated(b) => (0, b),
            Vmemmap::Unknown(_) => (0, 0),
        };
        let self_tgid = std::process::id();
        let stream_all = (streaming == Streaming::All) as u64;
        let floor = (streaming == Streaming::Floor) as u64;
        let foll_longterm = layouts.foll.longterm as u64;
        // Hooked GUP functions nest until 6.2 (KERNEL-NOTES): only then may a monitored
        // call skip the call map.
        let gup_unnested = super::release_at_least(&release, 6, 2) as u64;
        // bpf_get_func_arg came in 5.17 (f92c1e183604), inlined by the verifier from then.
        let func_arg_inlined = super::release_at_least(&release, 5, 17) as u64;
        // BPF_CMPXCHG came in 5.12 (5ffa25502b5a); before, the call slots stay unused.
        let call_slots_on = super::release_at_least(&release, 5, 12);
        let call_slots_global = call_slots_on as u64;
        // Kernel words read by guarded loads where the kernel has bpf_rdonly_cast (6.2+).
        let rdonly_cast = btf::rdonly_cast_ids(&vmlinux);
        let (rdonly_cast_global, words_btf_id) = rdonly_cast.map_or((0u64, 0u64), |(_, words)| (1, words as u64));
        let struct_page_shift = struct_page_shift(layouts.struct_page_size);
        let ring = ring_bytes(streaming);
        let wake_above = ring as u64 / 4;
        let f = &layouts.folio;
        let compound_info_mask = layouts.compound_info_mask as u64;
        let fake_heads = layouts.fake_heads as u64;
        let block_capacity = args.pin_block_capacity.unwrap_or_else(|| block_capacity(phys));
        let mut loader = EbpfLoader::new();
        loader
            .override_global(globals::PAGE_FLAGS_OFF, &f.flags_off, true)
            .override_global(globals::PG_HEAD_BIT, &f.pg_head_bit, true)
            .override_global(globals::PAGE_REFCOUNT_OFF, &f.refcount_off, true)
            .override_global(globals::PAGE_MAPPING_OFF, &f.mapping_off, true)
            .override_global(globals::PAGE_INDEX_OFF, &f.index_off, true)
            .override_global(globals::FOLIO_ORDER_OFF, &f.order_off, true)
            .override_global(globals::FOLIO_PINCOUNT_OFF, &f.pincount_off, true)
            .override_global(globals::PINCOUNT_MIN_ORDER, &f.pincount_min_order, true)
            .override_global(globals::PAGE_MAPCOUNT_OFF, &f.mapcount_off, true)
            .override_global(globals::PG_PRIVATE_BIT, &f.pg_private_bit, true)
            .override_global(globals::MAPPING_HOST_OFF, &f.mapping_host_off, true)
            .override_global(globals::INODE_INO_OFF, &f.inode_ino_off, true)
            .override_global(globals::INODE_SB_OFF, &f.inode_sb_off, true)
            .override_global(globals::SB_DEV_OFF, &f.sb_dev_off, true)
            .override_global(globals::SB_MAGIC_OFF, &f.sb_magic_off, true)
            .override_global(globals::VMEMMAP_BASE_ADDR, &vmemmap_base_addr, true)
            .override_global(globals::VMEMMAP_BASE, &vmemmap_base, true)
            .override_global(globals::STRUCT_PAGE_SIZE, &layouts.struct_page_size, true)
            .override_global(globals::STRUCT_PAGE_SHIFT, &struct_page_shift, true)
            .override_global(globals::PAGE_COMPOUND_HEAD_OFF, &layouts.compound_head_off, true)
            .override_global(globals::COMPOUND_INFO_MASK, &compound_info_mask, true)
            .override_global(globals::FAKE_HEADS, &fake_heads, true)
            .override_global(globals::BIO_IO_VEC_OFF, &layouts.bio_io_vec_off, true)
            .override_global(globals::BIO_VCNT_OFF, &layouts.bio_vcnt_off, true)
            .override_global(globals::PIPE_BUFFER_PAGE_OFF, &layouts.pipe_buffer_page_off, true)
            .override_global(globals::SELF_TGID, &self_tgid, true)
            .override_global(globals::STREAM_ALL, &stream_all, true)
            .override_global(globals::FLOOR, &floor, true)
            .override_global(globals::FOLL_LONGTERM, &foll_longterm, true)
            .override_global(globals::GUP_UNNESTED, &gup_unnested, true)
            .override_global(globals::FUNC_ARG_INLINED, &func_arg_inlined, true)
            .override_global(globals::CALL_SLOTS_ON, &call_slots_global, true)
            .override_global(globals::RDONLY_CAST, &rdonly_cast_global, true)
            .override_global(globals::WORDS_BTF_ID, &words_btf_id, true)
            .override_global(globals::WAKE_ABOVE, &wake_above, true)
            .map_max_entries("PINS", pin_map_capacity)
            .map_max_entries("PIN_BLOCKS", block_capacity)
            .map_max_entries("EVENTS", ring);
        if !args.enforce {
            for name in ENFORCEMENT_MAPS {
                loader.map_max_entries(name, 1);
            }
        }
        if streaming != Streaming::All {
            loader.map_max_entries("GUP_STACKS", MONITOR_STACKS);
        }
        if !call_slots_on {
            loader.map_max_entries("CALL_SLOTS", 1);
        }
        let maps_on_demand = super::release_at_least(&release, 6, 1);
        // Possible CPUs, as the kernel sizes per-CPU maps; 1 if unreadable (the least size).
        let cpus = aya::util::nr_cpus().map(|n| n as u32).unwrap_or(1);
        let mut tasks = task_capacity(cpus, maps_on_demand);
        tasks.call_slots = if call_slots_on { DECLARED_CALL_SLOTS } else { 0 };
        loader
            .map_max_entries("GUP_CALLS", tasks.calls)
            .map_max_entries("RELEASE_DEPTH", tasks.calls)
            .map_max_entries("PROC_PINS", tasks.procs);
        let mut object: std::borrow::Cow<[u8]> = if maps_on_demand { without_prealloc(OBJECT, &GROWN_ON_DEMAND)?.into() } else { OBJECT.into() };
        // Patched in one copy of the object (the first patch makes it, if any).
        if !call_slots_on {
            without_compare_exchange(object.to_mut())?;
        }
        if let Some((func, _)) = rdonly_cast {
            with_kfunc_calls(object.to_mut(), func)?;
        }
        let mut ebpf = loader.load(&object).map_err(|e| anyhow!("loading the eBPF object failed: {}", error_chain(&e)))?;
        drop(object);
        // Parsed once: the fentry test and every fentry/fexit load need it.
        let btf = Btf::from_sys_fs().map_err(|e| error_chain(&e));
        let caps = test_capabilities(&mut ebpf, &syms, btf.as_ref())?;
        let mut plan = plan::plan(&syms, &caps, mode);
        if layouts.bio_pins_pages {
            plan::bio_releases_unpin(&mut plan);
        }
        let nargs = plan::HOOKS
            .iter()
            .filter(|h| h.family == Family::Function)
            .filter_map(|h| btf::func_nargs(&vmlinux, h.symbol).map(|n| (h.symbol, n)))
            .collect();
        let btf = btf.ok();
        let direct_reads = rdonly_cast.is_some();
        Ok(Kernel { release, vmemmap, layouts, caps, plan, ebpf, nargs, btf, pin_map_capacity, block_capacity, maps_on_demand, tasks, direct_reads })
    }

    /// Attaches every hook of the plan, each down its ladder until a rung works; a hook
    /// that attaches nowhere is marked unavailable with the kernel's reasons. Function
    /// hooks go first: whether GUP calls are seen decides which tracepoint programs
    /// serve (tracepoint-only mode reports pages by the kernel's own pin count).
    pub fn attach(&mut self) -> Result<Mode> {
        let mut loads = HashMap::new();
        let mut served: HashMap<&'static str, &'static str> = HashMap::new();
        let order: Vec<usize> = (0..self.plan.len())
            .filter(|i| self.plan[*i].spec.family == Family::Function)
            .chain((0..self.plan.len()).filter(|i| self.plan[*i].spec.family == Family::Tracepoint))
            .collect();
        let mut kernel_pins = None;
        for i in order {
            let spec = self.plan[i].spec;
            if spec.family == Family::Tracepoint && kernel_pins.is_none() {
                kernel_pins = Some(!plan::covered_roles(&self.plan).contains(&Role::Acquire));
            }
            let Choice::Try { ladder } = self.plan[i].choice.clone() else { continue };
            if kernel_pins == Some(true) && !spec.watches_pages() {
                // The page-free safety net only drops pins GUP hooks recorded.
                self.plan[i].choice = Choice::Unavailable { reason: "not needed: GUP calls are not seen, so there are no pins to drop".into() };
                continue;
            }
            if let Some(other) = spec.group.and_then(|g| served.get(g)) {
                self.plan[i].choice = Choice::Standby { instead: other };
                continue;
            }
            let mut failures = Vec::new();
            for attach in ladder {
                let nargs = self.nargs.get(spec.symbol).copied();
                // The verifier's time is most of the start-up under emulation: debug
                // runs say what each hook cost.
                let t0 = std::time::Instant::now();
                let r = attach_hook(&mut self.ebpf, self.btf.as_ref(), &mut loads, &spec, attach, nargs, kernel_pins.unwrap_or(false));
                log::debug!("{} by {}: {} in {} ms", spec.symbol, attach.name(), if r.is_ok() { "attached" } else { "failed" }, t0.elapsed().as_millis());
                match r {
                    Ok(()) => {
                        let note = (!failures.is_empty()).then(|| failures.join("; "));
                        self.plan[i].choice = Choice::Use { attach, note };
                        if let Some(g) = spec.group {
                            served.insert(g, spec.symbol);
                        }
                        break;
                    }
                    Err(e) => failures.push(format!("{}: {e:#}", attach.name())),
                }
            }
            if !matches!(self.plan[i].choice, Choice::Use { .. }) {
                self.plan[i].choice = Choice::Unavailable { reason: format!("attach failed: {}", failures.join("; ")) };
            }
        }
        // Everything is attached: the parsed kernel BTF (tens of MiB) is not needed again,
        // and the allocator gives what it held back to the system.
        self.btf = None;
        give_back_memory();
        self.arm()?;
        Ok(self.mode())
    }

    /// GUP calls are tracked from now on: every release and free hook is in place.
    fn arm(&mut self) -> Result<()> {
        let map = self.ebpf.map_mut("ARMED").ok_or_else(|| anyhow!("map ARMED missing"))?;
        let mut armed: aya::maps::Array<_, u32> = aya::maps::Array::try_from(map)?;
        armed.set(0, 1, 0).context("arming the GUP hooks")?;
        Ok(())
    }

    pub fn mode(&self) -> Mode {
        let roles = plan::covered_roles(&self.plan);
        if roles.contains(&Role::Acquire) {
            Mode::Full
        } else if roles.contains(&Role::Truncate) || roles.contains(&Role::Dirty) {
            Mode::TracepointOnly
        } else {
            Mode::Blind
        }
    }

    /// Loads a program that is attached nowhere and run on request (BPF_PROG_TEST_RUN).
    fn load_test_run(&mut self, name: &str) -> Result<()> {
        let p: &mut RawTracePoint = self.ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?.try_into()?;
        p.load().map_err(|e| anyhow!("loading {name}: {}", error_chain(&e)))
    }

    /// Loads the sweep program.
    pub fn sweeper(&mut self) -> Result<Sweeper> {
        self.load_test_run("sweep_pfn")?;
        Ok(Sweeper { ok: true })
    }

    /// Asks the kernel side to re-check `pfn` against the kernel's own counts; a release
    /// it finds gone comes back as a `gone` record.
    pub fn sweep(&mut self, sweeper: &mut Sweeper, pfn: u64) {
        if !sweeper.ok {
            return;
        }
        use aya::programs::TestRun as _;
        let Some(Program::RawTracePoint(p)) = self.ebpf.program_mut("sweep_pfn") else { return };
        let mut opts = aya::programs::RawTracePointRunOptions::new();
        opts.args[0] = pfn;
        if let Err(e) = p.test_run(opts) {
            // Kernels without test runs of raw tracepoints: say so once, stop trying.
            log::warn!("re-checking held references is not possible here: {}", error_chain(&e));
            sweeper.ok = false;
        }
    }

    /// Loads the start-up scan's program.
    pub fn finder(&mut self) -> Result<()> {
        self.load_test_run("found_pfns")
    }

    /// One batch of the start-up scan: the kernel side answers each pfn of `tgid`'s
    /// mapped pages (pinwatch_common::found), taking those it counts as DMA-pinned into
    /// PINS as references of `tgid` with `gup_flags`. At most FOUND_BATCH pfns.
    pub fn find_pins(&mut self, tgid: u32, gup_flags: u32, ts_ns: u64, pfns: &[u64]) -> Result<Vec<u64>> {
        use aya::programs::TestRun as _;
        use pinwatch_common::{FoundBatch, FOUND_BATCH};
        let n = pfns.len().min(FOUND_BATCH);
        let mut batch = FoundBatch { tgid, nr: n as u32, gup_flags, _pad: 0, ts_ns, pfns: [0; FOUND_BATCH] };
        batch.pfns[..n].copy_from_slice(&pfns[..n]);
        let map = self.ebpf.map_mut("FOUND").ok_or_else(|| anyhow!("map FOUND missing"))?;
        let mut a: aya::maps::Array<_, FoundBatch> = aya::maps::Array::try_from(map)?;
        a.set(0, batch, 0).context("writing a batch of the start-up scan (map FOUND)")?;
        let Some(Program::RawTracePoint(p)) = self.ebpf.program_mut("found_pfns") else { bail!("program found_pfns missing") };
        p.test_run(aya::programs::RawTracePointRunOptions::new()).map_err(|e| anyhow!("running found_pfns: {}", error_chain(&e)))?;
        let map = self.ebpf.map("FOUND").ok_or_else(|| anyhow!("map FOUND missing"))?;
        let a: aya::maps::Array<_, FoundBatch> = aya::maps::Array::try_from(map)?;
        let out = a.get(&0, 0).context("reading the start-up scan's answers (map FOUND)")?;
        Ok(out.pfns[..n].to_vec())
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").ok_or_else(|| anyhow!("map EVENTS missing from the eBPF object"))?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn counters(&self) -> Result<Counters> {
        let map = self.ebpf.map("COUNTERS").ok_or_else(|| anyhow!("map COUNTERS missing"))?;
        let arr: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        let mut c = Counters::default();
        for i in 0..counter::NR {
            let v: u64 = arr.get(&i, 0)?.iter().sum();
            c.0[i as usize] = v;
        }
        Ok(c)
    }

    /// Folios holding unstreamed FOLL_GET references taken longer than `age_ns` ago
    /// (QUIET_GETS), at most `max`: the sweep re-checks them.
    pub fn old_quiet_gets(&self, now_ns: u64, age_ns: u64, max: usize) -> Result<Vec<u64>> {
        let map = self.ebpf.map("QUIET_GETS").ok_or_else(|| anyhow!("map QUIET_GETS missing"))?;
        let m: aya::maps::HashMap<_, u64, u64> = aya::maps::HashMap::try_from(map)?;
        Ok(m.iter().filter_map(|r| r.ok()).filter(|(_, ts)| now_ns.saturating_sub(*ts) > age_ns).map(|(pfn, _)| pfn).take(max).collect())
    }

    /// Of `pfns`, those neither PINS nor PIN_BLOCKS holds: the kernel side saw their
    /// last release (or page free) even when its record was lost to a full ring.
    pub fn pins_absent(&self, pfns: impl Iterator<Item = u64>) -> Result<Vec<u64>> {
        use pinwatch_common::{BLOCK_PAGES, BLOCK_SHIFT};
        let (m, blocks) = self.pin_maps()?;
        let in_block = |pfn: u64| {
            blocks.get(&(pfn >> BLOCK_SHIFT), 0).is_ok_and(|b| b.pin_refs[pfn as usize % BLOCK_PAGES] != 0)
        };
        Ok(pfns.filter(|pfn| matches!(m.get(pfn, 0), Err(aya::maps::MapError::KeyNotFound)) && !in_block(*pfn)).collect())
    }

    /// The two maps of pin state, to read: PINS and PIN_BLOCKS.
    #[allow(clippy::type_complexity)]
    fn pin_maps(&self) -> Result<(aya::maps::HashMap<&MapData, u64, pinwatch_common::PinState>, aya::maps::HashMap<&MapData, u64, pinwatch_common::PinBlock>)> {
        let map = self.ebpf.map("PINS").ok_or_else(|| anyhow!("map PINS missing"))?;
        let pins = aya::maps::HashMap::try_from(map)?;
        let map = self.ebpf.map("PIN_BLOCKS").ok_or_else(|| anyhow!("map PIN_BLOCKS missing"))?;
        Ok((pins, aya::maps::HashMap::try_from(map)?))
    }

    /// Block references unpinned while monitoring and not sent (BLOCK_UNSENT), since load.
    pub fn block_unsent(&self) -> Result<u64> {
        let map = self.ebpf.map("BLOCK_UNSENT").ok_or_else(|| anyhow!("map BLOCK_UNSENT missing"))?;
        let a: aya::maps::Array<_, u64> = aya::maps::Array::try_from(map)?;
        Ok(a.get(&0, 0)?)
    }

    /// Of `held`, (pfn, FOLL_PIN references user space holds on a small folio), the
    /// pfns where the kernel side holds fewer (its block's count and PINS's streamed
    /// ones), with how many fewer: references unpinned unsent.
    /// One lookup per block, and one in PINS only where the block falls short.
    pub fn pins_short(&self, held: &[(u64, u32)]) -> Result<Vec<(u64, u32)>> {
        use pinwatch_common::{PinBlock, BLOCK_PAGES, BLOCK_SHIFT};
        let (pins, blocks) = self.pin_maps()?;
        // Absent is 0; any other failure is an error, never a release.
        fn absent_as_none<T>(r: Result<T, aya::maps::MapError>) -> Result<Option<T>> {
            match r {
                Ok(v) => Ok(Some(v)),
                Err(aya::maps::MapError::KeyNotFound) => Ok(None),
                Err(e) => Err(e.into()),
            }
        }
        let mut read: HashMap<u64, Option<PinBlock>> = HashMap::new();
        let mut short = Vec::new();
        for &(pfn, refs) in held {
            let key = pfn >> BLOCK_SHIFT;
            let block = match read.get(&key) {
                Some(b) => *b,
                None => {
                    let b = absent_as_none(blocks.get(&key, 0))?;
                    read.insert(key, b);
                    b
                }
            };
            let mut kernel = block.map_or(0, |b| b.pin_refs[pfn as usize % BLOCK_PAGES]);
            if kernel < refs {
                // PINS's FOLL_PIN references less its quiet ones (a direct I/O's, never
                // streamed), taking quiet ones as FOLL_GET first.
                kernel += absent_as_none(pins.get(&pfn, 0))?.map_or(0, |s| s.pin_refs - s.pin_refs.min(s.quiet_refs.saturating_sub(s.get_refs)));
            }
            if kernel < refs {
                short.push((pfn, refs - kernel));
            }
        }
        Ok(short)
    }

    /// Every process's GUP counts (PROC_PINS, and each CPU's run not yet in it:
    /// PROC_BATCH), and which of them were deleted now: processes that are gone and
    /// hold nothing unstreamed, so the map holds the living.
    pub fn proc_pins(&mut self) -> Result<(HashMap<u32, ProcPins>, Vec<u32>)> {
        let map = self.ebpf.map_mut("PROC_PINS").ok_or_else(|| anyhow!("map PROC_PINS missing"))?;
        let mut m: aya::maps::HashMap<_, u32, ProcPins> = aya::maps::HashMap::try_from(map)?;
        let mut all: HashMap<u32, ProcPins> = m.iter().filter_map(|r| r.ok()).collect();
        let mut gone = Vec::new();
        for (tgid, p) in &all {
            if p.quiet_held == 0 && !std::path::Path::new(&format!("/proc/{tgid}")).exists() && m.remove(tgid).is_ok() {
                gone.push(*tgid);
            }
        }
        let map = self.ebpf.map("PROC_BATCH").ok_or_else(|| anyhow!("map PROC_BATCH missing"))?;
        let batches: aya::maps::PerCpuArray<_, ProcBatch> = aya::maps::PerCpuArray::try_from(map)?;
        let runs = batches.get(&0, 0).context("reading PROC_BATCH")?;
        add_batches(&mut all, &gone, runs.iter());
        Ok((all, gone))
    }

    /// The per-process cap on long-term pinned pages the GUP return program enforces,
    /// with the signal it sends (0 pages: nothing enforced).
    pub fn set_enforce(&mut self, cap_pages: u64, signal: i32) -> Result<()> {
        let map = self.ebpf.map_mut("ENFORCE").ok_or_else(|| anyhow!("map ENFORCE missing"))?;
        let mut a: aya::maps::Array<_, pinwatch_common::Enforce> = aya::maps::Array::try_from(map)?;
        a.set(0, pinwatch_common::Enforce { cap_pages, signal: signal as u32, _pad: 0 }, 0).context("setting the enforced cap (map ENFORCE)")?;
        Ok(())
    }

    /// Who enforcement spares: uids, cgroup ids, comms (15 bytes at most, as the kernel
    /// keeps them). Replaces what was there.
    pub fn set_exemptions(&mut self, uids: &[u32], cgroups: &[u64], comms: &[String]) -> Result<()> {
        fn refill<K: aya::Pod + Eq + std::hash::Hash>(ebpf: &mut Ebpf, name: &str, keys: &[K]) -> Result<()> {
            let map = ebpf.map_mut(name).ok_or_else(|| anyhow!("map {name} missing"))?;
            let mut m: aya::maps::HashMap<_, K, u8> = aya::maps::HashMap::try_from(map)?;
            let old: Vec<K> = m.keys().filter_map(|k| k.ok()).collect();
            for k in old.iter().filter(|k| !keys.contains(k)) {
                let _ = m.remove(k);
            }
            for k in keys {
                m.insert(k, 1, 0).with_context(|| format!("filling {name}: more exemptions than it holds (pinwatch-ebpf/src/maps.rs)"))?;
            }
            Ok(())
        }
        let comms: Vec<[u8; 16]> = comms
            .iter()
            .map(|c| {
                let mut k = [0u8; 16];
                let b = c.as_bytes();
                let n = b.len().min(15);
                k[..n].copy_from_slice(&b[..n]);
                k
            })
            .collect();
        refill(&mut self.ebpf, "EXEMPT_UIDS", uids)?;
        refill(&mut self.ebpf, "EXEMPT_CGROUPS", cgroups)?;
        refill(&mut self.ebpf, "EXEMPT_COMMS", &comms)?;
        Ok(())
    }

    /// Per process, long-term pages the kernel side counted taken less those held, as
    /// user space knows it (negative with pins found at start). Processes absent from
    /// `adjust` leave the map.
    pub fn set_longterm_released(&mut self, adjust: &HashMap<u32, i64>) -> Result<()> {
        let map = self.ebpf.map_mut("LONGTERM_RELEASED").ok_or_else(|| anyhow!("map LONGTERM_RELEASED missing"))?;
        let mut m: aya::maps::HashMap<_, u32, u64> = aya::maps::HashMap::try_from(map)?;
        let old: Vec<u32> = m.keys().filter_map(|k| k.ok()).filter(|k| !adjust.contains_key(k)).collect();
        for pid in old {
            let _ = m.remove(&pid);
        }
        for (pid, n) in adjust {
            let v = *n as u64;
            if m.get(pid, 0).ok() != Some(v) {
                m.insert(pid, v, 0).context("updating LONGTERM_RELEASED")?;
            }
        }
        Ok(())
    }

    /// Each loaded program's run time (ns) and run count, where the kernel's BPF
    /// statistics are on (kernel.bpf_stats_enabled = 1); empty otherwise.
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        let on = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|s| s.trim() == "1");
        if !on {
            return Vec::new();
        }
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                let runs = info.run_count();
                (runs > 0).then(|| (name.to_string(), info.run_time().as_nanos().min(u64::MAX as u128) as u64, runs))
            })
            .collect()
    }

    pub fn hooks_in_use(&self) -> Vec<String> {
        self.plan
            .iter()
            .filter_map(|h| match h.choice {
                Choice::Use { attach, .. } => Some(format!("{}: {} via {}", h.role.name(), h.symbol, attach.name())),
                _ => None,
            })
            .collect()
    }
}

/// Where the programs get vmemmap_base (to turn struct page pointers into pfns).
#[derive(Clone, Debug)]
pub enum Vmemmap {
    /// The variable's address from kallsyms (CONFIG_KALLSYMS_ALL); read at run time.
    Symbol(u64),
    /// Its value, calibrated from two views of page frees (see calibrate.rs).
    Calibrated(u64),
    /// Neither worked: pfns cannot be computed, and why.
    Unknown(String),
}

fn calibrate_vmemmap(layouts: &Layouts) -> Result<u64> {
    let pfn_off = super::calibrate::pfn_offset()?;
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::STRUCT_PAGE_SIZE, &layouts.struct_page_size, true)
        .override_global(globals::MM_PAGE_FREE_PFN_OFF, &pfn_off, true)
        .load(OBJECT)
        .map_err(|e| anyhow!("loading the eBPF object for calibration: {}", error_chain(&e)))?;
    super::calibrate::vmemmap_base(&mut ebpf)
}

/// Adds each CPU's run of calls not yet in PROC_PINS to its process's counts. Not to a
/// process deleted from the map in this same read: its counts end now (the session adds
/// them to the totals of ended processes), and the run, when the kernel side adds it to
/// PROC_PINS later, comes back as a new entry that ends in its turn, counted once.
fn add_batches<'a>(all: &mut HashMap<u32, ProcPins>, gone: &[u32], runs: impl Iterator<Item = &'a ProcBatch>) {
    for b in runs.filter(|b| b.calls != 0 && !gone.contains(&b.tgid)) {
        let p = all.entry(b.tgid).or_default();
        p.calls += b.calls;
        p.pages += b.pages;
    }
}

/// Drop counters summed over CPUs, indexed by pinwatch_common::counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::NR as usize]);

impl Counters {
    pub const NAMES: [&'static str; counter::NR as usize] =
        ["ringbuf_full", "pin_map_full", "pfns_truncated", "call_map_full", "read_failed", "stack_lost", "nested_too_deep", "quiet_gets_full", "proc_map_full"];
}

/// Attaches one hook with one attach type: the return program first (an entry
/// program without it would leave calls in flight forever), then the entry program.
/// If the entry program fails, the return program is detached again so that the next
/// rung starts clean.
fn attach_hook(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    loads: &mut HashMap<String, Result<(), String>>,
    spec: &HookSpec,
    attach: AttachType,
    nargs: Option<usize>,
    kernel_pins: bool,
) -> Result<()> {
    let ret = match spec.ret_program(attach, nargs) {
        Some(name) => Some((name.clone(), attach_program(ebpf, btf, loads, &name, attach, spec.symbol)?)),
        None => None,
    };
    let entry = spec.program(attach, kernel_pins);
    match attach_program(ebpf, btf, loads, &entry, attach, spec.symbol) {
        Ok(_) => Ok(()),
        Err(e) => {
            if let Some((name, link)) = ret {
                link.detach(ebpf, &name);
            }
            Err(e)
        }
    }
}

/// A link made by attach_program, kept only to undo it.
enum Link {
    Kprobe(aya::programs::kprobe::KProbeLinkId),
    Fexit(aya::programs::fexit::FExitLinkId),
    Other,
}

impl Link {
    fn detach(self, ebpf: &mut Ebpf, program: &str) {
        let Some(p) = ebpf.program_mut(program) else { return };
        match (self, p) {
            (Link::Kprobe(l), Program::KProbe(p)) => drop(p.detach(l)),
            (Link::Fexit(l), Program::FExit(p)) => drop(p.detach(l)),
            _ => {}
        }
    }
}

/// Loads `program` once (remembering the outcome, so that every hook sharing a program
/// that the verifier refused reports the verifier's reason) and attaches it to
/// `symbol` (a kernel function or a tracepoint).
fn attach_program(
    ebpf: &mut Ebpf,
    btf: Option<&Btf>,
    loads: &mut HashMap<String, Result<(), String>>,
    program: &str,
    attach: AttachType,
    symbol: &str,
) -> Result<Link> {
    let Some(prog) = ebpf.program_mut(program) else {
        bail!("this build has no program {program}");
    };
    let outcome = loads.entry(program.to_string()).or_insert_with(|| {
        let btf = btf.ok_or_else(|| "no kernel BTF for fentry/fexit".to_string());
        match prog {
            Program::KProbe(p) => p.load().map_err(|e| error_chain(&e)),
            Program::RawTracePoint(p) => p.load().map_err(|e| error_chain(&e)),
            Program::FEntry(p) => btf.and_then(|b| p.load(symbol, b).map_err(|e| error_chain(&e))),
            Program::FExit(p) => btf.and_then(|b| p.load(symbol, b).map_err(|e| error_chain(&e))),
            _ => Err(format!("program {program} is of a type pinwatch does not attach")),
        }
        .map_err(|e| format!("loading {program}: {e}"))
    });
    if let Err(e) = outcome {
        bail!("{e}");
    }
    let link = match (prog, attach) {
        (Program::KProbe(p), AttachType::Kprobe) => p.attach(symbol, 0).map(Link::Kprobe),
        (Program::RawTracePoint(p), AttachType::RawTracepoint) => p.attach(symbol).map(|_| Link::Other),
        (Program::FEntry(p), AttachType::Fentry) => p.attach().map(|_| Link::Other),
        (Program::FExit(p), AttachType::Fentry) => p.attach().map(Link::Fexit),
        _ => bail!("program {program} does not fit the attach type {}", attach.name()),
    };
    link.map_err(|e| anyhow!("{}", error_chain(&e)))
}

/// Loads and attaches real programs, then lets them go: what the kernel accepts is
/// learned, not guessed from its version.
fn test_capabilities(ebpf: &mut Ebpf, syms: &Symbols, btf: Result<&Btf, &String>) -> Result<Capabilities> {
    let btf_ok = std::path::Path::new(btf::VMLINUX_BTF).exists();
    let fentry = (|| -> Result<(), String> {
        let btf = btf.map_err(String::clone)?;
        let p: &mut FEntry = ebpf.program_mut("probe_fentry").ok_or("probe_fentry missing")?.try_into().map_err(short)?;
        p.load("get_user_pages_fast", btf).map_err(|e| match error_chain(&e) {
            s if s.contains("Operation not permitted") => "the kernel refuses tracing programs (BPF_PROG_LOAD of an fentry program: EPERM)".to_string(),
            s => s,
        })?;
        let link = p.attach().map_err(|e| error_chain(&e))?;
        p.detach(link).map_err(short)?;
        Ok(())
    })();
    let kprobe = kprobe_test(ebpf, syms).map_err(|e| {
        if e.contains("kprobe/type") {
            "this kernel has no kprobe support (CONFIG_KPROBES is off: /sys/bus/event_source/devices/kprobe is missing)".to_string()
        } else {
            e
        }
    });
    let raw_tracepoint = (|| -> Result<(), String> {
        let p: &mut RawTracePoint = ebpf.program_mut("mm_page_free").ok_or("program missing")?.try_into().map_err(short)?;
        p.load().map_err(|e| error_chain(&e))?;
        let link = p.attach("mm_page_free").map_err(|e| error_chain(&e))?;
        p.detach(link).map_err(short)?;
        p.unload().map_err(short)?;
        Ok(())
    })();
    Ok(Capabilities { btf: btf_ok, fentry, kprobe, raw_tracepoint })
}

fn kprobe_test(ebpf: &mut Ebpf, syms: &Symbols) -> Result<(), String> {
    {
        if !syms.exists("get_user_pages_fast") {
            return Err("get_user_pages_fast not in kallsyms".into());
        }
        let p: &mut KProbe = ebpf.program_mut("get_user_pages_fast").ok_or("program missing")?.try_into().map_err(short)?;
        p.load().map_err(|e| error_chain(&e))?;
        let link = p.attach("get_user_pages_fast", 0).map_err(|e| error_chain(&e))?;
        p.detach(link).map_err(short)?;
        // Unload so that attach() can load it again like any other program.
        p.unload().map_err(short)?;
        Ok(())
    }
}

/// The loaded sweep program; `ok` turns false when the kernel refuses test runs.
pub struct Sweeper {
    ok: bool,
}

/// What loading used and no longer needs leaves the process's memory: freed heap
/// (glibc keeps it otherwise: loading parses the kernel's BTF and the programs' object,
/// tens of MiB, all freed once attached), and the pages of the embedded object, read
/// once (3-4 MiB with its debug info, the source of its BTF): they stay in the page
/// cache and come back from the binary if read again.
fn give_back_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
    let page = 4096;
    let start = (OBJECT.as_ptr() as usize).div_ceil(page) * page;
    let end = (OBJECT.as_ptr() as usize + OBJECT.len()) / page * page;
    if end > start {
        // SAFETY: whole pages inside OBJECT, a read-only private mapping of the binary:
        // dropping them loses nothing, a later read faults them in again.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_task_maps_keep_their_size_where_they_grow_and_follow_the_cpus_where_preallocated() {
        assert_eq!(task_capacity(2, true), TaskCapacity { calls: 4096, procs: 8192, call_slots: 0 });
        assert_eq!(task_capacity(1, false), TaskCapacity { calls: 1024, procs: 2048, call_slots: 0 });
        assert_eq!(task_capacity(2, false), TaskCapacity { calls: 1024, procs: 2048, call_slots: 0 });
        assert_eq!(task_capacity(16, false), TaskCapacity { calls: 2048, procs: 4096, call_slots: 0 });
        assert_eq!(task_capacity(512, false), TaskCapacity { calls: 4096, procs: 8192, call_slots: 0 });
        assert_eq!(task_capacity(u32::MAX, false), TaskCapacity { calls: 4096, procs: 8192, call_slots: 0 });
        // the declared sizes are the object's
        let obj = aya_obj::Object::parse(OBJECT).unwrap();
        let declared = |name: &str| obj.maps.get(name).map(|m| m.max_entries());
        assert_eq!(declared("GUP_CALLS"), Some(DECLARED_CALLS));
        assert_eq!(declared("RELEASE_DEPTH"), Some(DECLARED_CALLS));
        assert_eq!(declared("PROC_PINS"), Some(DECLARED_PROCS));
        assert_eq!(declared("CALL_SLOTS"), Some(DECLARED_CALL_SLOTS));
    }

    #[test]
    fn each_cpus_run_adds_to_its_process_unless_it_ended_now() {
        let mut all = HashMap::from([(10, ProcPins { calls: 5, pages: 9, quiet_held: 2, ..Default::default() }), (11, ProcPins { calls: 1, pages: 1, ..Default::default() })]);
        let runs = [
            ProcBatch { tgid: 10, calls: 3, pages: 3, ..Default::default() },
            ProcBatch { tgid: 12, calls: 7, pages: 70, ..Default::default() },
            ProcBatch { tgid: 11, calls: 4, pages: 4, ..Default::default() },
            ProcBatch::default(),
            ProcBatch { tgid: 10, calls: 1, pages: 2, ..Default::default() },
        ];
        add_batches(&mut all, &[11], runs.iter());
        assert_eq!((all[&10].calls, all[&10].pages, all[&10].quiet_held), (9, 14, 2), "two CPUs' runs added, held untouched");
        assert_eq!((all[&12].calls, all[&12].pages), (7, 70), "a process only a run knows of");
        assert_eq!((all[&11].calls, all[&11].pages), (1, 1), "the run of a process that ended now waits for its entry");
        assert!(!all.contains_key(&0), "an empty slot adds nothing");
    }

    #[test]
    fn maps_grown_on_demand_carry_no_prealloc_as_aya_reads_them() {
        let patched = without_prealloc(OBJECT, &GROWN_ON_DEMAND).unwrap();
        let before = aya_obj::Object::parse(OBJECT).unwrap();
        let after = aya_obj::Object::parse(&patched).unwrap();
        assert_eq!(before.maps.len(), after.maps.len());
        for (name, map) in &after.maps {
            let was = before.maps[name].map_flags();
            if GROWN_ON_DEMAND.contains(&name.as_str()) {
                assert_eq!(was & BPF_F_NO_PREALLOC, 0, "{name} was built preallocated");
                assert_eq!(map.map_flags(), was | BPF_F_NO_PREALLOC, "{name}");
            } else {
                assert_eq!(map.map_flags(), was, "{name} must stay as built");
            }
            assert_eq!((map.map_type(), map.key_size(), map.value_size(), map.max_entries()), {
                let b = &before.maps[name];
                (b.map_type(), b.key_size(), b.value_size(), b.max_entries())
            }, "{name}: only the flags change");
        }
        // Only the flags' bytes differ.
        let changed = OBJECT.iter().zip(&patched).filter(|(a, b)| a != b).count();
        assert_eq!(changed, GROWN_ON_DEMAND.len());
        let e = without_prealloc(OBJECT, &["NO_SUCH_MAP"]).unwrap_err();
        assert!(format!("{e:#}").contains("no map NO_SUCH_MAP"), "{e:#}");
        assert!(without_prealloc(b"not an elf", &["PINS"]).is_err());
    }

    #[test]
    fn before_5_12_every_compare_and_swap_becomes_a_failed_one_and_nothing_else_changes() {
        let mut patched = OBJECT.to_vec();
        let changed = without_compare_exchange(&mut patched).unwrap();
        assert!(changed > 0, "the programs take call slots by compare-and-swap");
        // Every changed byte lies in a changed instruction, now `r0 = -1`.
        let mut diffs = 0;
        for (at, (a, b)) in OBJECT.chunks(8).zip(patched.chunks(8)).enumerate() {
            if a != b {
                assert_eq!(a[0], 0xdb, "instruction {at}");
                assert_eq!(b, [0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
                diffs += 1;
            }
        }
        assert_eq!(diffs, changed);
        // None is left, and the copy still reads as the same object.
        assert_eq!(without_compare_exchange(&mut patched.clone()).unwrap(), 0);
        let obj = aya_obj::Object::parse(&patched).unwrap();
        assert!(obj.maps.contains_key("CALL_SLOTS"));
        assert!(without_compare_exchange(&mut b"not an elf".to_vec()).is_err());
    }

    #[test]
    fn calls_of_the_placeholder_helper_become_kfunc_calls_and_nothing_else_changes() {
        let mut patched = OBJECT.to_vec();
        let changed = with_kfunc_calls(&mut patched, 0x1234_5678).unwrap();
        assert!(changed > 0, "the programs read kernel words through bpf_rdonly_cast");
        let mut diffs = 0;
        for (a, b) in OBJECT.chunks(8).zip(patched.chunks(8)) {
            if a != b {
                assert_eq!((a[0], a[1], imm(a)), (0x85, 0, pinwatch_common::RDONLY_CAST_CALL as i32));
                assert_eq!(b, [0x85, 0x20, 0, 0, 0x78, 0x56, 0x34, 0x12]);
                diffs += 1;
            }
        }
        assert_eq!(diffs, changed);
        assert_eq!(with_kfunc_calls(&mut patched.clone(), 1).unwrap(), 0);
    }

    #[test]
    fn the_block_map_covers_a_quarter_of_memory_within_its_bounds() {
        // 24 GiB of 4 KiB pages: a quarter is 6 GiB, 49152 blocks of 128 KiB.
        assert_eq!(block_capacity(24 << 18), 49152);
        assert_eq!(block_capacity(0), 1024, "an unknown size gets the smallest map");
        assert_eq!(block_capacity(1 << 40), 1 << 20);
    }

    #[test]
    fn the_pin_map_has_an_entry_per_512_kib_within_its_bounds() {
        assert_eq!(pin_map_capacity(3 << 18), 8192, "a 3 GiB guest gets the smallest pin map");
        assert_eq!(pin_map_capacity(64 << 18), 131072);
        assert_eq!(pin_map_capacity(1 << 40), 262_144);
    }
}
