//! Programs that take pins on purpose, for the VM lab. Each prints one line
//! `PINWATCH-SCENARIO {json}` saying what it did (its pid, how many pages), so the lab
//! can check pinwatch's trace against it.

use std::{
    ffi::CString,
    io::Write,
    thread::sleep,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod vfio;

const PAGE: usize = 4096;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// O_DIRECT read from a slow block device into a MAP_SHARED mapping of a file:
    /// a write pin held while the device takes its time.
    OdirectSlow(Dio),
    /// vmsplice of an anonymous mapping into a pipe nobody drains: FOLL_GET references
    /// held by the pipe until it is closed.
    Vmsplice {
        #[arg(long, default_value_t = 8)]
        pages: usize,
        #[arg(long, default_value_t = 500)]
        hold_ms: u64,
    },
    /// process_vm_writev into a child process: FOLL_PIN|FOLL_WRITE on the child's pages.
    PvmWritev {
        #[arg(long, default_value_t = 8)]
        pages: usize,
    },
    /// io_uring fixed buffers on anonymous memory: FOLL_PIN|FOLL_LONGTERM|FOLL_WRITE.
    IouringFixed {
        #[arg(long, default_value_t = 64)]
        pages: usize,
        #[arg(long, default_value_t = 500)]
        hold_ms: u64,
        /// Set RLIMIT_MEMLOCK to this many bytes first (root keeps CAP_IPC_LOCK, so the
        /// kernel does not enforce it: pinwatch's rule must).
        #[arg(long)]
        memlock: Option<u64>,
        /// Register the pages as this many buffers of equal size: io_uring pins each
        /// with its own GUP call.
        #[arg(long, default_value_t = 1)]
        buffers: usize,
        /// Keep transparent huge pages out of the buffer (MADV_NOHUGEPAGE): base pages
        /// only, one reference each (from 6.10 io_uring keeps one per huge folio).
        #[arg(long)]
        no_huge: bool,
        /// Back the buffer with transparent huge pages (2 MiB aligned, MADV_HUGEPAGE),
        /// and say how much of it is (PINWATCH-SCENARIO-HUGE, kB).
        #[arg(long, conflicts_with = "no_huge")]
        huge: bool,
        /// Back the buffer with hugetlbfs pages (MAP_HUGETLB: vm.nr_hugepages must have
        /// them), and say how much of it is.
        #[arg(long, conflicts_with_all = ["no_huge", "huge"])]
        hugetlb: bool,
        #[command(flatten)]
        held: Held,
        /// Once --until's file exists, register this many more pages on a second ring,
        /// in calls of 1 MiB, then hold for --hold-ms: new pins on top of old ones.
        #[arg(long)]
        then_pages: Option<usize>,
    },
    /// The 2018 sequence on demand: a slow O_DIRECT read pins the first `pages` pages of
    /// a MAP_SHARED ext4 mapping of 2 * `pages`, and while the pin is held msync,
    /// MADV_PAGEOUT and ftruncate clean, unmap and drop pages. `--target pinned` works on
    /// the pinned pages; `--target other` on the other half only (a control), `--target
    /// other-file` on another file, `--no-pin` skips the read (a control).
    OdirectHazard {
        #[command(flatten)]
        dio: Dio,
        #[arg(long, value_enum, default_value_t = Target::Pinned)]
        target: Target,
        #[arg(long)]
        no_pin: bool,
    },
    /// A pin taken and released, then the same pages cleaned, unmapped and truncated:
    /// must report no hazard.
    Released(Dio),
    /// io_uring fixed buffers on a MAP_SHARED ext4 mapping: a FOLL_LONGTERM pin of page
    /// cache. Kernels before 6.5 take it (io_uring then refuses the buffer); 6.5+ refuse
    /// it in GUP with -EFAULT.
    LongtermFile {
        #[arg(long)]
        file: String,
        #[arg(long, default_value_t = 8)]
        pages: usize,
    },
    /// A memfd registered as io_uring fixed buffers (long-term FOLL_PIN of shmem), then
    /// truncated while registered. `--no-pin` skips the registration (a control).
    MemfdTruncate {
        #[arg(long, default_value_t = 8)]
        pages: usize,
        #[arg(long)]
        no_pin: bool,
        #[command(flatten)]
        held: Held,
    },
    /// Buffered I/O only: must pin nothing.
    Buffered {
        #[arg(long)]
        file: String,
        #[arg(long, default_value_t = 8)]
        pages: usize,
    },
    /// VFIO type1: map anonymous memory for DMA through IOMMU group `group` (a device
    /// bound to vfio-pci): a long-term pin of every page, charged to VmLck.
    VfioMap {
        #[arg(long)]
        group: u32,
        #[arg(long, default_value_t = 256)]
        pages: usize,
        #[arg(long, default_value_t = 3000)]
        hold_ms: u64,
    },
    /// A freed page reused by another owner: FOLL_GET references through /proc/self/mem
    /// (access_remote_vm, whose put_page pinwatch does not see) on anonymous pages, the
    /// pages freed (munmap), new memfd pages taken at once on the same CPU (the free
    /// lists hand back the pages just freed), then that memfd truncated. Says
    /// `PINWATCH-SCENARIO-REUSE {json}` with both sets of pfns per attempt; stops at the
    /// first attempt that reused any (at most 5).
    ReuseFreed {
        #[arg(long, default_value_t = 64)]
        pages: usize,
    },
    /// Bench: `ops` one-page O_DIRECT reads of an ext4 file (the pin hot path).
    BenchDio {
        #[arg(long)]
        file: String,
        #[arg(long, default_value_t = 2000)]
        ops: usize,
    },
    /// Bench: dirty and msync every page of a shared mapping, `rounds` times (the
    /// hazard hooks on unpinned pages).
    BenchWriteback {
        #[arg(long)]
        file: String,
        #[arg(long, default_value_t = 256)]
        pages: usize,
        #[arg(long, default_value_t = 8)]
        rounds: usize,
    },
    /// Bench: pinwatch's memory while it tracks `pages` pinned pages (run under
    /// `pinwatch record --`).
    BenchFootprint {
        #[arg(long, default_value_t = 16384)]
        pages: usize,
        #[arg(long, default_value_t = 2000)]
        hold_ms: u64,
    },
}

/// How a holder keeps its pins for a pinwatch started after it (the start-up scan).
#[derive(clap::Args, Default)]
struct Held {
    /// After pinning, say `PINWATCH-SCENARIO-READY` and wait until this file exists
    /// before going on.
    #[arg(long)]
    until: Option<String>,
    /// Lock the mapping (mlock): the kernel charges it to VmLck.
    #[arg(long)]
    mlock: bool,
    /// Run as nobody (uid 65534) once the limits are set, as an unprivileged job does:
    /// without CAP_IPC_LOCK the kernel charges long-term pins to VmPin on every version
    /// (7.x charges nothing to a holder of CAP_IPC_LOCK).
    #[arg(long)]
    as_nobody: bool,
}

impl Held {
    fn drop_privileges(&self) -> Result<()> {
        if self.as_nobody {
            check(unsafe { libc::setgid(65534) } as _, "setgid(65534)")?;
            check(unsafe { libc::setuid(65534) } as _, "setuid(65534)")?;
        }
        Ok(())
    }
}

/// Says the pins are in place, then waits for `until` to exist.
fn wait_for(until: &str) {
    println!("PINWATCH-SCENARIO-READY");
    let _ = std::io::stdout().flush();
    while !std::path::Path::new(until).exists() {
        sleep(Duration::from_millis(50));
    }
}

/// A slow O_DIRECT read from `dev` into `pages` pages of a MAP_SHARED mapping of `file`.
#[derive(clap::Args)]
struct Dio {
    #[arg(long)]
    file: String,
    #[arg(long)]
    dev: String,
    #[arg(long, default_value_t = 8)]
    pages: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Pinned,
    /// The other half of the same file.
    Other,
    /// Another file altogether (`FILE.other`): a control where syncing one half of a
    /// file writes back all of it (btrfs's first fsync of a file).
    OtherFile,
}

fn check(ret: libc::c_long, what: &str) -> Result<libc::c_long> {
    if ret < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// Says what the scenario is about to do. ts_ns is CLOCK_MONOTONIC, the clock of
/// pinwatch's events, so the lab can tell the scenario's own pins from exec's.
fn report(name: &str, pages: usize, extra: &str) {
    println!(
        "PINWATCH-SCENARIO {{\"scenario\":\"{name}\",\"pid\":{},\"pages\":{pages},\"ts_ns\":{}{extra}}}",
        std::process::id(),
        monotonic_ns()
    );
    let _ = std::io::stdout().flush();
}

/// CLOCK_MONOTONIC in ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kilobytes given for `key` in a /proc file of "Key:   N kB" lines (0 if absent).
fn kb_of(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())))
        .unwrap_or(0)
}

/// A memfd of `pages` pages named `name`, mapped MAP_SHARED, every page written `v`.
fn memfd_mapped(name: &str, pages: usize, v: u8) -> Result<(i32, *mut u8)> {
    let len = pages * PAGE;
    let name = CString::new(name)?;
    let fd = check(unsafe { libc::memfd_create(name.as_ptr(), 0) } as _, "memfd_create")? as i32;
    check(unsafe { libc::ftruncate(fd, len as _) } as _, "ftruncate")?;
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if map == libc::MAP_FAILED {
        bail!("mmap memfd: {}", std::io::Error::last_os_error());
    }
    dirty(map as *mut u8, pages, v);
    Ok((fd, map as *mut u8))
}

/// Anonymous memory in base pages only: MADV_NOHUGEPAGE before the first touch.
fn map_anon_small(pages: usize) -> Result<*mut u8> {
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), pages * PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    check(unsafe { libc::madvise(p, pages * PAGE, libc::MADV_NOHUGEPAGE) } as _, "madvise(MADV_NOHUGEPAGE)")?;
    for i in 0..pages {
        unsafe { *(p as *mut u8).add(i * PAGE) = i as u8 + 1 };
    }
    Ok(p as *mut u8)
}

fn map_anon(pages: usize) -> Result<*mut u8> {
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), pages * PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    for i in 0..pages {
        unsafe { *(p as *mut u8).add(i * PAGE) = i as u8 + 1 };
    }
    Ok(p as *mut u8)
}

/// Anonymous memory meant for transparent huge pages: 2 MiB aligned, MADV_HUGEPAGE
/// before the first touch (Debian's kernels default to THP on madvise).
fn map_anon_huge(pages: usize) -> Result<*mut u8> {
    const HUGE: usize = 2 << 20;
    let len = pages * PAGE;
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len + HUGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
    if p == libc::MAP_FAILED {
        bail!("mmap: {}", std::io::Error::last_os_error());
    }
    let aligned = (p as usize).div_ceil(HUGE) * HUGE;
    check(unsafe { libc::madvise(aligned as *mut _, len, libc::MADV_HUGEPAGE) } as _, "madvise(MADV_HUGEPAGE)")?;
    for i in 0..pages {
        unsafe { *(aligned as *mut u8).add(i * PAGE) = i as u8 + 1 };
    }
    Ok(aligned as *mut u8)
}

fn open(path: &str, flags: i32) -> Result<i32> {
    let c = CString::new(path)?;
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644) };
    check(fd as _, &format!("open {path}"))?;
    Ok(fd)
}

fn odirect_slow(Dio { file, dev, pages }: &Dio) -> Result<()> {
    let (fd, map) = map_file(file, *pages)?;
    report("odirect-slow", *pages, "");
    // On this thread: joining a reader thread would add a futex's page reference.
    read_direct(open(dev, libc::O_RDONLY | libc::O_DIRECT)?, map as usize, *pages)?;
    unsafe {
        libc::munmap(map as *mut _, pages * PAGE);
        libc::close(fd);
    }
    Ok(())
}

/// A MAP_SHARED mapping of `pages` pages of `file`, every page faulted in and dirty.
fn map_file(file: &str, pages: usize) -> Result<(i32, *mut u8)> {
    let len = pages * PAGE;
    let fd = open(file, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)?;
    check(unsafe { libc::ftruncate(fd, len as _) } as _, "ftruncate")?;
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if map == libc::MAP_FAILED {
        bail!("mmap {file}: {}", std::io::Error::last_os_error());
    }
    dirty(map as *mut u8, pages, 0xab);
    Ok((fd, map as *mut u8))
}

fn dirty(map: *mut u8, pages: usize, v: u8) {
    for i in 0..pages {
        unsafe { std::ptr::write_volatile(map.add(i * PAGE), v) };
    }
}

/// msync, MADV_PAGEOUT, then ftruncate down to `keep` pages: what the kernel does to a
/// file's pages anyway, done on purpose to the pages from `first` on.
fn clean_unmap_truncate(fd: i32, map: *mut u8, first: usize, pages: usize, keep: usize) -> Result<()> {
    let at = unsafe { map.add(first * PAGE) } as *mut libc::c_void;
    check(unsafe { libc::msync(at, pages * PAGE, libc::MS_SYNC) } as _, "msync")?;
    check(unsafe { libc::madvise(at, pages * PAGE, libc::MADV_PAGEOUT) } as _, "madvise(MADV_PAGEOUT)")?;
    check(unsafe { libc::ftruncate(fd, (keep * PAGE) as _) } as _, "ftruncate")?;
    Ok(())
}

/// A slow O_DIRECT read of `pages` pages into `map` on another thread: the pin is held
/// until the device answers (2 s with the lab's null_blk).
fn slow_read(dev: &str, map: *mut u8, pages: usize) -> Result<std::thread::JoinHandle<Result<()>>> {
    let dfd = open(dev, libc::O_RDONLY | libc::O_DIRECT)?;
    let addr = map as usize;
    Ok(std::thread::spawn(move || read_direct(dfd, addr, pages)))
}

/// Waits until the block device `dev` has a read in flight (its sysfs `inflight`), at
/// most 5 s; where the kernel does not say, 300 ms, as long as the read takes to start.
fn wait_in_flight(dev: &str) {
    let name = dev.rsplit('/').next().unwrap_or(dev);
    let path = format!("/sys/block/{name}/inflight");
    let reads = || -> Option<u64> { std::fs::read_to_string(&path).ok()?.split_whitespace().next()?.parse().ok() };
    if reads().is_none() {
        sleep(Duration::from_millis(300));
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reads().unwrap_or(0) == 0 && std::time::Instant::now() < deadline {
        sleep(Duration::from_millis(5));
    }
}

fn read_direct(dfd: i32, addr: usize, pages: usize) -> Result<()> {
    let n = check(unsafe { libc::pread(dfd, addr as *mut _, pages * PAGE, 0) } as _, "O_DIRECT pread")?;
    unsafe { libc::close(dfd) };
    if n as usize != pages * PAGE {
        bail!("short O_DIRECT read: {n} of {}", pages * PAGE);
    }
    Ok(())
}

fn odirect_hazard(Dio { file, dev, pages }: &Dio, target: Target, no_pin: bool) -> Result<()> {
    let pages = *pages;
    let (fd, map) = map_file(file, 2 * pages)?;
    report("odirect-hazard", pages, &format!(",\"target\":\"{target:?}\",\"pin\":{}", !no_pin));
    let reader = if no_pin { None } else { Some(slow_read(dev, map, pages)?) };
    // Let the read reach the device: its pages are pinned before the bio is submitted.
    // A fixed wait could end first, and msync then clean the pages still unpinned.
    if no_pin {
        sleep(Duration::from_millis(300));
    } else {
        wait_in_flight(dev);
    }
    match target {
        Target::Pinned => clean_unmap_truncate(fd, map, 0, pages, 0)?,
        Target::Other => clean_unmap_truncate(fd, map, pages, pages, pages)?,
        Target::OtherFile => {
            let (other_fd, other) = map_file(&format!("{file}.other"), pages)?;
            clean_unmap_truncate(other_fd, other, 0, pages, 0)?;
            unsafe {
                libc::munmap(other as *mut _, pages * PAGE);
                libc::close(other_fd);
            }
        }
    }
    if let Some(r) = reader {
        r.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    }
    unsafe {
        libc::munmap(map as *mut _, 2 * pages * PAGE);
        libc::close(fd);
    }
    Ok(())
}

fn released(Dio { file, dev, pages }: &Dio) -> Result<()> {
    let pages = *pages;
    let (fd, map) = map_file(file, pages)?;
    report("released", pages, "");
    slow_read(dev, map, pages)?.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    // The pin is gone; the same pages are now ordinary page cache.
    dirty(map, pages, 0xcd);
    clean_unmap_truncate(fd, map, 0, pages, 0)?;
    unsafe {
        libc::munmap(map as *mut _, pages * PAGE);
        libc::close(fd);
    }
    Ok(())
}

fn uring() -> Result<i64> {
    let mut params = IoUringParams([0; 120]);
    check(unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut params as *mut _) }, "io_uring_setup")
}

const IORING_REGISTER_BUFFERS: u32 = 0;
const IORING_UNREGISTER_BUFFERS: u32 = 1;

fn register(ring: i64, buf: *mut u8, len: usize) -> libc::c_long {
    register_split(ring, buf, len, 1)
}

/// Registers `len` bytes at `buf` as `n` buffers of equal size.
fn register_split(ring: i64, buf: *mut u8, len: usize, n: usize) -> libc::c_long {
    let n = n.max(1);
    let each = len / n;
    let iovs: Vec<libc::iovec> = (0..n).map(|i| libc::iovec { iov_base: unsafe { buf.add(i * each) } as *mut _, iov_len: each }).collect();
    unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_REGISTER_BUFFERS, iovs.as_ptr(), n as u32) }
}

fn longterm_file(file: &str, pages: usize) -> Result<()> {
    let (fd, map) = map_file(file, pages)?;
    let ring = uring()?;
    report("longterm-file", pages, "");
    let r = register(ring, map, pages * PAGE);
    let errno = if r < 0 { std::io::Error::last_os_error().raw_os_error().unwrap_or(0) } else { 0 };
    println!("PINWATCH-SCENARIO-RESULT {{\"register\":{r},\"errno\":{errno}}}");
    if r == 0 {
        unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32) };
    }
    unsafe {
        libc::close(ring as i32);
        libc::munmap(map as *mut _, pages * PAGE);
        libc::close(fd);
    }
    Ok(())
}

fn memfd_truncate(pages: usize, no_pin: bool, held: &Held) -> Result<()> {
    held.drop_privileges()?;
    let len = pages * PAGE;
    let (fd, map) = memfd_mapped("pinwatch-memfd", pages, 0x11)?;
    let map = map as *mut libc::c_void;
    let ring = uring()?;
    report("memfd-truncate", pages, &format!(",\"pin\":{}", !no_pin));
    if held.mlock {
        check(unsafe { libc::mlock(map, len) } as _, "mlock")?;
    }
    if !no_pin {
        check(register(ring, map as *mut u8, len), "IORING_REGISTER_BUFFERS")?;
    }
    if let Some(until) = &held.until {
        wait_for(until);
    }
    // The device may still write these pages; the file no longer has them.
    check(unsafe { libc::ftruncate(fd, 0) } as _, "ftruncate to 0")?;
    if !no_pin {
        check(unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32) }, "IORING_UNREGISTER_BUFFERS")?;
    }
    unsafe {
        libc::close(ring as i32);
        libc::munmap(map, len);
        libc::close(fd);
    }
    Ok(())
}

fn vmsplice(pages: usize, hold_ms: u64) -> Result<()> {
    let buf = map_anon(pages)?;
    let mut fds = [0i32; 2];
    check(unsafe { libc::pipe(fds.as_mut_ptr()) } as _, "pipe")?;
    check(unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, (pages * PAGE) as i32) } as _, "F_SETPIPE_SZ")?;
    let iov = libc::iovec { iov_base: buf as *mut _, iov_len: pages * PAGE };
    report("vmsplice", pages, "");
    let n = check(unsafe { libc::vmsplice(fds[1], &iov, 1, 0) } as _, "vmsplice")?;
    if n as usize != pages * PAGE {
        bail!("vmsplice took {n} of {} bytes", pages * PAGE);
    }
    sleep(Duration::from_millis(hold_ms));
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    Ok(())
}

fn pvm_writev(pages: usize) -> Result<()> {
    let len = pages * PAGE;
    let target = map_anon(pages)?;
    let mut sync = [0i32; 2];
    check(unsafe { libc::pipe(sync.as_mut_ptr()) } as _, "pipe")?;
    let child = unsafe { libc::fork() };
    check(child as _, "fork")?;
    if child == 0 {
        // The child keeps its copy of `target` alive until the parent is done.
        let mut b = [0u8; 1];
        unsafe { libc::read(sync[0], b.as_mut_ptr() as *mut _, 1) };
        unsafe { libc::_exit(0) };
    }
    let src = map_anon(pages)?;
    report("pvm-writev", pages, &format!(",\"child\":{child}"));
    let local = libc::iovec { iov_base: src as *mut _, iov_len: len };
    let remote = libc::iovec { iov_base: target as *mut _, iov_len: len };
    let n = unsafe { libc::process_vm_writev(child, &local, 1, &remote, 1, 0) };
    check(n as _, "process_vm_writev")?;
    unsafe {
        libc::write(sync[1], b"x".as_ptr() as *const _, 1);
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    if n as usize != len {
        bail!("process_vm_writev wrote {n} of {len}");
    }
    Ok(())
}

#[repr(C)]
struct IoUringParams([u8; 120]);

#[allow(clippy::too_many_arguments)]
fn iouring_fixed(pages: usize, hold_ms: u64, memlock: Option<u64>, buffers: usize, no_huge: bool, huge: bool, hugetlb: bool, held: &Held, then_pages: Option<usize>) -> Result<()> {
    if let Some(bytes) = memlock {
        let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
        check(unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } as _, "setrlimit(RLIMIT_MEMLOCK)")?;
    }
    held.drop_privileges()?;
    let buf = if no_huge {
        map_anon_small(pages)?
    } else if huge {
        map_anon_huge(pages)?
    } else if hugetlb {
        let p = unsafe { libc::mmap(std::ptr::null_mut(), pages * PAGE, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB, -1, 0) };
        if p == libc::MAP_FAILED {
            bail!("mmap(MAP_HUGETLB): {} (vm.nr_hugepages too low?)", std::io::Error::last_os_error());
        }
        dirty(p as *mut u8, pages, 1);
        p as *mut u8
    } else {
        map_anon(pages)?
    };
    if held.mlock {
        check(unsafe { libc::mlock(buf as *const _, pages * PAGE) } as _, "mlock")?;
    }
    let ring = uring()?;
    report("iouring-fixed", pages, "");
    check(register_split(ring, buf, pages * PAGE, buffers), "IORING_REGISTER_BUFFERS")?;
    if huge || hugetlb {
        let backed = if huge { kb_of("/proc/self/smaps_rollup", "AnonHugePages:") } else { kb_of("/proc/self/status", "HugetlbPages:") };
        println!("PINWATCH-SCENARIO-HUGE {} {}", backed, kb_of("/proc/self/status", "VmPin:"));
        let _ = std::io::stdout().flush();
    }
    match &held.until {
        Some(until) => wait_for(until),
        None => sleep(Duration::from_millis(hold_ms)),
    }
    if let Some(more) = then_pages {
        let buf = if no_huge { map_anon_small(more)? } else { map_anon(more)? };
        let second = uring()?;
        check(register_split(second, buf, more * PAGE, more.div_ceil(256)), "IORING_REGISTER_BUFFERS (second ring)")?;
        println!("PINWATCH-SCENARIO-MORE {more}");
        let _ = std::io::stdout().flush();
        sleep(Duration::from_millis(hold_ms));
        unsafe { libc::close(second as i32) };
    }
    check(unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32) }, "IORING_UNREGISTER_BUFFERS")?;
    unsafe { libc::close(ring as i32) };
    Ok(())
}

/// The pfns of `pages` pages from `addr` on, from /proc/self/pagemap (root: other
/// users read zeros); absent pages are left out.
fn pfns_at(addr: usize, pages: usize) -> Result<Vec<u64>> {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::File::open("/proc/self/pagemap").context("/proc/self/pagemap")?;
    let mut out = Vec::with_capacity(pages);
    let mut b = [0u8; 8];
    for i in 0..pages {
        f.read_exact_at(&mut b, ((addr / PAGE + i) * 8) as u64).context("reading /proc/self/pagemap")?;
        let v = u64::from_le_bytes(b);
        if v >> 63 == 1 && v & ((1 << 55) - 1) != 0 {
            out.push(v & ((1 << 55) - 1));
        }
    }
    Ok(out)
}

fn reuse_freed(pages: usize) -> Result<()> {
    // One CPU: pages freed here go to its free lists, which the next allocation here
    // takes from first.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(0, &mut set) };
    check(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } as _, "sched_setaffinity")?;
    let mem = open("/proc/self/mem", libc::O_RDONLY)?;
    report("reuse-freed", pages, "");
    let len = pages * PAGE;
    let mut copy = vec![0u8; len];
    for attempt in 1..=5 {
        let old = map_anon_small(pages)?;
        let old_pfns = pfns_at(old as usize, pages)?;
        // FOLL_GET references taken and put one page at a time by the kernel.
        let n = check(unsafe { libc::pread(mem, copy.as_mut_ptr() as *mut _, len, old as libc::off_t) } as _, "pread /proc/self/mem")?;
        if n as usize != len {
            bail!("read {n} of {len} bytes of /proc/self/mem");
        }
        check(unsafe { libc::munmap(old as *mut _, len) } as _, "munmap")?;
        let (fd, map) = memfd_mapped("pinwatch-reuse", pages, 0x77)?;
        let new_pfns = pfns_at(map as usize, pages)?;
        let reused = new_pfns.iter().filter(|p| old_pfns.contains(p)).count();
        println!(
            "PINWATCH-SCENARIO-REUSE {{\"attempt\":{attempt},\"old\":{old_pfns:?},\"new\":{new_pfns:?},\"reused\":{reused},\"ts_ns\":{}}}",
            monotonic_ns()
        );
        let _ = std::io::stdout().flush();
        // The new owner's pages leave its page cache: a hazard if pinwatch still
        // took them for the old pin.
        check(unsafe { libc::ftruncate(fd, 0) } as _, "ftruncate to 0")?;
        unsafe {
            libc::munmap(map as *mut _, len);
            libc::close(fd);
        }
        if reused > 0 {
            break;
        }
    }
    unsafe { libc::close(mem) };
    Ok(())
}

fn buffered(file: &str, pages: usize) -> Result<()> {
    let len = pages * PAGE;
    let fd = open(file, libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC)?;
    let data = vec![0x5au8; len];
    report("buffered", pages, "");
    check(unsafe { libc::write(fd, data.as_ptr() as *const _, len) } as _, "write")?;
    check(unsafe { libc::fsync(fd) } as _, "fsync")?;
    let mut back = vec![0u8; len];
    check(unsafe { libc::pread(fd, back.as_mut_ptr() as *mut _, len, 0) } as _, "pread")?;
    unsafe { libc::close(fd) };
    if back != data {
        bail!("read back differs");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::OdirectSlow(dio) => odirect_slow(&dio),
        Scenario::Vmsplice { pages, hold_ms } => vmsplice(pages, hold_ms),
        Scenario::PvmWritev { pages } => pvm_writev(pages),
        Scenario::IouringFixed { pages, hold_ms, memlock, buffers, no_huge, huge, hugetlb, held, then_pages } => iouring_fixed(pages, hold_ms, memlock, buffers, no_huge, huge, hugetlb, &held, then_pages),
        Scenario::Buffered { file, pages } => buffered(&file, pages),
        Scenario::OdirectHazard { dio, target, no_pin } => odirect_hazard(&dio, target, no_pin),
        Scenario::Released(dio) => released(&dio),
        Scenario::LongtermFile { file, pages } => longterm_file(&file, pages),
        Scenario::MemfdTruncate { pages, no_pin, held } => memfd_truncate(pages, no_pin, &held),
        Scenario::VfioMap { group, pages, hold_ms } => vfio::map(group, pages, hold_ms),
        Scenario::ReuseFreed { pages } => reuse_freed(pages),
        Scenario::BenchDio { file, ops } => bench::dio(&file, ops),
        Scenario::BenchWriteback { file, pages, rounds } => bench::writeback(&file, pages, rounds),
        Scenario::BenchFootprint { pages, hold_ms } => bench::footprint(pages, hold_ms),
    }
    .context("scenario failed")
}
