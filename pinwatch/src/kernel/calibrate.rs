//! vmemmap_base for kernels whose /proc/kallsyms lists no data symbols
//! (CONFIG_KALLSYMS_ALL off). Two probes on one page free, a raw tracepoint that sees
//! the struct page pointer and the kmem:mm_page_free tracepoint whose record carries the
//! pfn the kernel computed from it, give base = page - pfn * sizeof(struct page).
//! Every sample must agree and the base must be 1 GiB aligned (vmemmap_base is
//! randomized in PUD steps), or the result is refused.

use std::{path::Path, time::{Duration, Instant}};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::Array,
    programs::{RawTracePoint, TracePoint},
    Ebpf,
};
use pinwatch_common::calib;

const TRACEFS: &str = "/sys/kernel/tracing";
const SAMPLES_WANTED: u64 = 32;

/// Offset of the `pfn` field in a tracefs event format file.
pub fn field_offset(format: &str, field: &str) -> Option<u64> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        if decl.split_whitespace().last()? != field {
            return None;
        }
        l.split(';').find_map(|p| p.trim().strip_prefix("offset:")).and_then(|o| o.trim().parse().ok())
    })
}

/// tracefs is not mounted at boot on some systems; pinwatch runs as root and mounts it.
pub fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, dst, ty) = (c("nodev"), c(TRACEFS), c("tracefs"));
    if unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) } != 0 {
        bail!("tracefs is not mounted and mounting it on {TRACEFS} failed: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn pfn_offset() -> Result<u64> {
    ensure_tracefs()?;
    let path = format!("{TRACEFS}/events/kmem/mm_page_free/format");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    field_offset(&text, "pfn").ok_or_else(|| anyhow!("{path} has no pfn field"))
}

/// Frees some pages so that the probes see page frees now.
fn provoke_page_frees() {
    for _ in 0..8 {
        let len = 256 * 4096;
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            return;
        }
        for i in (0..len).step_by(4096) {
            unsafe { *(p as *mut u8).add(i) = 1 };
        }
        unsafe { libc::munmap(p, len) };
    }
}

/// Tries of the calibration. One bad sample spoils a try: an interrupt that frees a
/// page just as the raw probe of another free returns skips its own raw probe (BPF's
/// recursion guard) but not its tracepoint probe, which then pairs its pfn with the
/// other free's page. Rare; a CI run of the host checks hit a refused calibration once.
const TRIES: u32 = 3;

/// Runs the calibration programs of an object loaded only for this purpose, up to
/// TRIES times from fresh counts; the error of the last try if none is accepted.
pub fn vmemmap_base(ebpf: &mut Ebpf) -> Result<u64> {
    let raw: &mut RawTracePoint = ebpf.program_mut("calib_page").context("calib_page missing")?.try_into()?;
    raw.load()?;
    // The raw probe first: tracepoint probes run in the order they were registered.
    raw.attach("mm_page_free").context("attaching the raw mm_page_free probe")?;
    let tp: &mut TracePoint = ebpf.program_mut("calib_pfn").context("calib_pfn missing")?.try_into()?;
    tp.load()?;
    tp.attach("kmem", "mm_page_free").context("attaching kmem:mm_page_free")?;
    let mut map = Array::<_, u64>::try_from(ebpf.map_mut("CALIB").context("CALIB missing")?)?;
    let mut last = None;
    for attempt in 1..=TRIES {
        for i in 0..calib::NR {
            map.set(i, 0, 0)?;
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while map.get(&calib::SAMPLES, 0)? < SAMPLES_WANTED && Instant::now() < deadline {
            provoke_page_frees();
            std::thread::sleep(Duration::from_millis(20));
        }
        let (base, samples, bad) = (map.get(&calib::BASE, 0)?, map.get(&calib::SAMPLES, 0)?, map.get(&calib::DISAGREEMENTS, 0)?);
        match check(base, samples, bad) {
            Ok(base) => return Ok(base),
            Err(e) => {
                log::debug!("vmemmap_base calibration, try {attempt} of {TRIES}: {e:#}");
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one try").context(format!("{TRIES} tries")))
}

pub fn check(base: u64, samples: u64, disagreements: u64) -> Result<u64> {
    if samples == 0 {
        bail!("no page free was seen by both probes");
    }
    if disagreements != 0 {
        bail!("{disagreements} of {samples} page frees disagreed about vmemmap_base");
    }
    // A kernel address under 4-level paging (the top 17 bits set) or 5-level paging
    // (LA57: the top 8 bits set, vmemmap_base 0xffd4... by default).
    if base & ((1 << 30) - 1) != 0 || base >> 56 != 0xff {
        bail!("calibrated vmemmap_base {base:#x} is not a 1 GiB aligned kernel address");
    }
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT: &str = "name: mm_page_free\nID: 655\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:unsigned long pfn;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:unsigned int order;\toffset:16;\tsize:4;\tsigned:0;\n";

    #[test]
    fn finds_field_offsets() {
        assert_eq!(field_offset(FORMAT, "pfn"), Some(8));
        assert_eq!(field_offset(FORMAT, "order"), Some(16));
        assert_eq!(field_offset(FORMAT, "page"), None);
    }

    #[test]
    fn refuses_doubtful_results() {
        assert_eq!(check(0xffffea0000000000, 32, 0).unwrap(), 0xffffea0000000000);
        assert!(check(0xffffea0000000000, 32, 1).is_err());
        assert!(check(0xffffea0000001000, 32, 0).is_err());
        // 5-level paging's default vmemmap_base.
        assert_eq!(check(0xffd4000000000000, 32, 0).unwrap(), 0xffd4000000000000);
        assert!(check(0x00d4000000000000, 32, 0).is_err());
        assert!(check(0x7fff00000000, 32, 0).is_err());
        assert!(check(0, 0, 0).is_err());
    }
}
