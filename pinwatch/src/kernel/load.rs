//! Loading the eBPF object with this kernel's layouts, testing which attach types the
//! kernel accepts, and attaching every hook of the plan.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{FEntry, KProbe, Program, RawTracePoint},
    Ebpf, EbpfLoader,
};
use pinwatch_common::{counter, globals};

use super::{
    btf::{self, Layouts},
    plan::{self, AttachMode, AttachType, Capabilities, Choice, PlannedHook},
    symbols::Symbols,
};

/// The programs, built by build.rs and embedded: pinwatch is one binary to copy.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pinwatch"));

pub struct Kernel {
    pub release: String,
    pub vmemmap: Vmemmap,
    pub layouts: Layouts,
    pub caps: Capabilities,
    pub plan: Vec<PlannedHook>,
    pub ebpf: Ebpf,
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
    pub fn open(mode: AttachMode) -> Result<Kernel> {
        if !super::is_root() {
            bail!("pinwatch needs root (CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN) to load eBPF programs: run it with sudo");
        }
        let release = super::release();
        let vmlinux = btf::load_vmlinux()?;
        let layouts = btf::read_layouts(&vmlinux).context("reading struct layouts from BTF")?;
        let syms = Symbols::load(&plan::wanted_symbols())?;
        let vmemmap = match syms.addr("vmemmap_base") {
            Some(addr) => Vmemmap::Symbol(addr),
            None => match calibrate_vmemmap(&layouts) {
                Ok(base) => Vmemmap::Calibrated(base),
                // Without it struct page pointers cannot become pfns; doctor says so,
                // and the programs send u64::MAX in place of each pfn.
                Err(e) => Vmemmap::Unknown(format!("{e:#}")),
            },
        };
        let (vmemmap_base_addr, vmemmap_base) = match vmemmap {
            Vmemmap::Symbol(a) => (a, 0u64),
            Vmemmap::Calibrated(b) => (0, b),
            Vmemmap::Unknown(_) => (0, 0),
        };
        let self_tgid = std::process::id();
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::VMEMMAP_BASE_ADDR, &vmemmap_base_addr, true)
            .override_global(globals::VMEMMAP_BASE, &vmemmap_base, true)
            .override_global(globals::STRUCT_PAGE_SIZE, &layouts.struct_page_size, true)
            .override_global(globals::PAGE_COMPOUND_HEAD_OFF, &layouts.compound_head_off, true)
            .override_global(globals::BIO_IO_VEC_OFF, &layouts.bio_io_vec_off, true)
            .override_global(globals::BIO_VCNT_OFF, &layouts.bio_vcnt_off, true)
            .override_global(globals::PIPE_BUFFER_PAGE_OFF, &layouts.pipe_buffer_page_off, true)
            .override_global(globals::SELF_TGID, &self_tgid, true)
            .load(OBJECT)
            .map_err(|e| anyhow!("loading the eBPF object failed: {}", error_chain(&e)))?;
        let caps = test_capabilities(&mut ebpf, &syms)?;
        let plan = plan::plan(&syms, &caps, mode);
        Ok(Kernel { release, vmemmap, layouts, caps, plan, ebpf })
    }

    /// Attaches every hook the plan chose. A hook that fails to attach is marked
    /// unavailable with the kernel's reason; the others go on.
    pub fn attach(&mut self) -> Result<()> {
        let mut loads = HashMap::new();
        for hook in self.plan.iter_mut() {
            let Choice::Use { attach } = hook.choice else { continue };
            let result = match attach {
                AttachType::Kprobe => {
                    // The return probe first: an entry probe without it would leave
                    // calls in flight forever.
                    let mut r = Ok(());
                    if let Some(ret) = hook.spec.ret_program {
                        r = attach_program(&mut self.ebpf, &mut loads, ret, Target::Kprobe(hook.symbol));
                    }
                    r.and_then(|_| attach_program(&mut self.ebpf, &mut loads, hook.spec.program, Target::Kprobe(hook.symbol)))
                }
                AttachType::RawTracepoint => {
                    attach_program(&mut self.ebpf, &mut loads, hook.spec.program, Target::RawTracepoint(hook.symbol))
                }
            };
            if let Err(e) = result {
                hook.choice = Choice::Unavailable { reason: format!("attach failed: {e:#}") };
            }
        }
        Ok(())
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

    pub fn hooks_in_use(&self) -> Vec<String> {
        self.plan
            .iter()
            .filter_map(|h| match h.choice {
                Choice::Use { attach } => Some(format!("{}: {} via {}", h.role.name(), h.symbol, attach.name())),
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

/// Drop counters summed over CPUs, indexed by pinwatch_common::counter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; counter::NR as usize]);

impl Counters {
    pub const NAMES: [&'static str; counter::NR as usize] =
        ["ringbuf_full", "pin_map_full", "pfns_truncated", "call_map_full", "read_failed"];
}

/// Where a program goes: a kernel function (kprobe) or a tracepoint.
enum Target<'a> {
    Kprobe(&'a str),
    RawTracepoint(&'a str),
}

/// Loads `program` once (remembering the outcome, so that every hook sharing a program
/// that the verifier refused reports the verifier's reason) and attaches it.
fn attach_program(
    ebpf: &mut Ebpf,
    loads: &mut HashMap<&'static str, Result<(), String>>,
    program: &'static str,
    target: Target<'_>,
) -> Result<()> {
    let prog = ebpf.program_mut(program).ok_or_else(|| anyhow!("program {program} missing from the eBPF object"))?;
    let outcome = loads.entry(program).or_insert_with(|| {
        match prog {
            Program::KProbe(p) => p.load(),
            Program::RawTracePoint(p) => p.load(),
            _ => return Err(format!("program {program} is neither a kprobe nor a raw tracepoint")),
        }
        .map_err(|e| format!("loading {program}: {}", error_chain(&e)))
    });
    if let Err(e) = outcome {
        bail!("{e}");
    }
    let attached = match (prog, target) {
        (Program::KProbe(p), Target::Kprobe(symbol)) => p.attach(symbol, 0).map(drop),
        (Program::RawTracePoint(p), Target::RawTracepoint(tp)) => p.attach(tp).map(drop),
        _ => bail!("program {program} does not fit the attach type the plan chose"),
    };
    attached.map_err(|e| anyhow!("{}", error_chain(&e)))
}

/// Loads and attaches real programs, then lets them go: what the kernel accepts is
/// learned, not guessed from its version.
fn test_capabilities(ebpf: &mut Ebpf, syms: &Symbols) -> Result<Capabilities> {
    let btf_ok = std::path::Path::new(btf::VMLINUX_BTF).exists();
    let fentry = (|| -> Result<(), String> {
        let btf = aya::Btf::from_sys_fs().map_err(short)?;
        let p: &mut FEntry = ebpf.program_mut("probe_fentry").ok_or("probe_fentry missing")?.try_into().map_err(short)?;
        p.load("get_user_pages_fast", &btf).map_err(|e| match error_chain(&e) {
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
