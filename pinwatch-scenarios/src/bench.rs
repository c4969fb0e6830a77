//! Workloads for `cargo xtask bench`. Each prints one line `PINWATCH-BENCH {json}` with
//! what it did and how long it took; the bench runs each without pinwatch (the
//! baseline) and under it, in the same boot, and reports the ratio.

use std::{
    io::Write,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{check, dirty, map_anon, map_anon_small, map_file, open, uring, IORING_REGISTER_BUFFERS, IORING_UNREGISTER_BUFFERS, PAGE};

fn say(json: &str) {
    println!("PINWATCH-BENCH {json}");
    let _ = std::io::stdout().flush();
}

/// The median of per-op times: what one op costs, untouched by the emulator's stalls
/// that the mean spreads over every op.
fn median(v: &mut [u128]) -> u128 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The pin hot path: `ops` O_DIRECT reads of one page from an ext4 file, each a GUP
/// call, a bio, and a release.
pub fn dio(file: &str, ops: usize) -> Result<()> {
    const FILE_PAGES: usize = 256;
    let fd = open(file, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)?;
    let data = vec![0x3cu8; FILE_PAGES * PAGE];
    check(unsafe { libc::write(fd, data.as_ptr() as *const _, data.len()) } as _, "write")?;
    check(unsafe { libc::fsync(fd) } as _, "fsync")?;
    unsafe { libc::close(fd) };
    let dfd = open(file, libc::O_RDONLY | libc::O_DIRECT)?;
    let buf = map_anon(1)?;
    let mut each = Vec::with_capacity(ops);
    let start = Instant::now();
    for i in 0..ops {
        let t = Instant::now();
        let n = unsafe { libc::pread(dfd, buf as *mut _, PAGE, ((i % FILE_PAGES) * PAGE) as _) };
        each.push(t.elapsed().as_nanos());
        if n != PAGE as isize {
            bail!("O_DIRECT pread {i}: {n} ({})", std::io::Error::last_os_error());
        }
    }
    let ns = start.elapsed().as_nanos();
    unsafe { libc::close(dfd) };
    say(&format!("{{\"bench\":\"dio\",\"ops\":{ops},\"ns\":{ns},\"p50_ns\":{}}}", median(&mut each)));
    Ok(())
}

/// The hazard hooks on pages nobody pins: each round dirties every page of a shared
/// mapping and msyncs it (page_mkclean_one, the dirtying hook and ext4 writeback, once
/// per page). What pinwatch adds here is its one map lookup per page.
pub fn writeback(file: &str, pages: usize, rounds: usize) -> Result<()> {
    let (fd, map) = map_file(file, pages)?;
    let len = pages * PAGE;
    check(unsafe { libc::msync(map as *mut _, len, libc::MS_SYNC) } as _, "msync")?;
    let mut each = Vec::with_capacity(rounds);
    let start = Instant::now();
    for r in 0..rounds {
        let t = Instant::now();
        dirty(map, pages, r as u8);
        check(unsafe { libc::msync(map as *mut _, len, libc::MS_SYNC) } as _, "msync")?;
        each.push(t.elapsed().as_nanos());
    }
    let ns = start.elapsed().as_nanos();
    unsafe {
        libc::munmap(map as *mut _, len);
        libc::close(fd);
    }
    // A page at a time is too short to time: the median round, per page.
    say(&format!("{{\"bench\":\"writeback\",\"ops\":{},\"ns\":{ns},\"p50_ns\":{}}}", pages * rounds, median(&mut each) / pages.max(1) as u128));
    Ok(())
}

/// pinwatch's memory while it tracks `pages` long-term pinned pages: io_uring buffers of
/// 1 MiB each (one GUP call per buffer, within what one call's records carry), in base
/// pages. Not in transparent huge pages (Debian's kernels use them by default): from
/// 6.10 io_uring keeps one reference per huge folio, and 512 MiB would be 256 pins. Run as
/// the command of `pinwatch record`, or beside the one pinwatch running (`top`): its
/// VmRSS before and while the pages are held, and the memory its BPF maps charge
/// (fdinfo memlock) before and while held.
pub fn footprint(pages: usize, hold_ms: u64) -> Result<()> {
    const PER_BUFFER: usize = 256;
    let parent = pinwatch_pid()?;
    let buffers = pages.div_ceil(PER_BUFFER);
    let buf = map_anon_small(buffers * PER_BUFFER)?;
    // Let pinwatch settle (its first tick, the sweep) before the idle reading.
    let (idle, idle_peak) = settled_rss_kb(parent, hold_ms)?;
    let parts = rss_parts_kb(parent);
    let maps = maps_memlock(parent);
    let ring = uring()?;
    let iov: Vec<libc::iovec> = (0..buffers)
        .map(|i| libc::iovec { iov_base: unsafe { buf.add(i * PER_BUFFER * PAGE) } as *mut _, iov_len: PER_BUFFER * PAGE })
        .collect();
    check(
        unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_REGISTER_BUFFERS, iov.as_ptr(), buffers as u32) },
        "IORING_REGISTER_BUFFERS",
    )?;
    let (held, held_peak) = settled_rss_kb(parent, hold_ms)?;
    // A map that is not preallocated charges what it holds: read them while held too.
    let maps_held = maps_memlock(parent);
    let largest: Vec<String> = maps_charged(parent).iter().take(8).map(|(m, b)| format!("\"{m}\":{b}")).collect();
    check(unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32) }, "IORING_UNREGISTER_BUFFERS")?;
    unsafe { libc::close(ring as i32) };
    say(&format!(
        "{{\"bench\":\"footprint\",\"pages\":{},\"rss_idle_kb\":{idle},\"rss_held_kb\":{held},\"rss_idle_peak_kb\":{idle_peak},\"rss_held_peak_kb\":{held_peak},\"maps_memlock_idle_bytes\":{maps},\"maps_memlock_bytes\":{maps_held},\"largest_maps_bytes\":{{{}}},\"rss_idle_parts_kb\":{{{}}}}}",
        buffers * PER_BUFFER,
        largest.join(","),
        parts.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect::<Vec<_>>().join(",")
    ));
    Ok(())
}

/// The parent when it is pinwatch (`record -- CMD`), else the one pinwatch process.
fn pinwatch_pid() -> Result<i32> {
    let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
    let parent = unsafe { libc::getppid() };
    if comm(parent) == "pinwatch" {
        return Ok(parent);
    }
    let found: Vec<i32> = std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| comm(*pid) == "pinwatch")
        .collect();
    match found[..] {
        [pid] => Ok(pid),
        [] => bail!("the footprint needs a pinwatch running (its parent, or beside it): none found"),
        _ => bail!("the footprint needs one pinwatch running, found {}: {found:?}", found.len()),
    }
}

/// pinwatch's RSS once it has settled, and the most it reached on the way: sampled every
/// 250 ms for `hold_ms`, then until four samples in a row (a second: a refresh of
/// `top -d 1`, which gives freed memory back) lie within 64 KiB, for at most 15 s more.
/// Under emulation a burst of records can take longer to digest than the hold, and a
/// single reading then caught the burst's heap (115 bytes a page one run, 0 the next).
fn settled_rss_kb(pid: i32, hold_ms: u64) -> Result<(u64, u64)> {
    const STEP: Duration = Duration::from_millis(250);
    let mut samples = vec![vm_rss_kb(pid)?];
    let started = std::time::Instant::now();
    let limit = Duration::from_millis(hold_ms) + Duration::from_secs(15);
    loop {
        std::thread::sleep(STEP);
        samples.push(vm_rss_kb(pid)?);
        let last = &samples[samples.len().saturating_sub(4)..];
        let spread = last.iter().max().unwrap_or(&0) - last.iter().min().unwrap_or(&0);
        let held_long_enough = started.elapsed() >= Duration::from_millis(hold_ms);
        if (held_long_enough && last.len() == 4 && spread <= 64) || started.elapsed() >= limit {
            break;
        }
    }
    let peak = samples.iter().copied().max().unwrap_or(0);
    Ok((samples[samples.len() - 1], peak))
}

fn vm_rss_kb(pid: i32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS missing from /proc/PID/status")
}

/// Where a process's RSS is, from /proc/PID/smaps, by kind of mapping: its heap, the BPF
/// ring (mapped by the kernel whole, its data twice), its own binary, shared libraries,
/// other anonymous memory (thread stacks, large allocations), the rest.
fn rss_parts_kb(pid: i32) -> std::collections::BTreeMap<&'static str, u64> {
    let mut parts = std::collections::BTreeMap::new();
    let Ok(smaps) = std::fs::read_to_string(format!("/proc/{pid}/smaps")) else { return parts };
    let mut kind = "other";
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = words.nth(4).unwrap_or("");
            kind = match name {
                "[heap]" => "heap",
                "" => "anon",
                n if n.starts_with("anon_inode:bpf") => "bpf",
                n if n.ends_with("/pinwatch") => "binary",
                n if n.contains(".so") => "libraries",
                _ => "other",
            };
        } else if first == "Rss:" {
            *parts.entry(kind).or_insert(0) += words.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    parts
}

/// Sum of `memlock:` over the process's BPF map fds (what the kernel charges for them).
fn maps_memlock(pid: i32) -> u64 {
    maps_charged(pid).iter().map(|(_, b)| b).sum()
}

/// Each BPF map fd of the process as `type key+value xentries` (fdinfo has no name;
/// sizes tell the maps apart) with its `memlock:`, largest first.
fn maps_charged(pid: i32) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return Vec::new() };
    let mut maps: Vec<(String, u64)> = dir
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .filter(|info| info.contains("map_type:"))
        .filter_map(|info| {
            let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).map(str::trim).unwrap_or("?").to_string();
            let bytes = field("memlock:").parse::<u64>().ok()?;
            Some((format!("type {} {}+{} x{}", field("map_type:"), field("key_size:"), field("value_size:"), field("max_entries:")), bytes))
        })
        .collect();
    maps.sort_by(|a, b| b.1.cmp(&a.1));
    maps
}
