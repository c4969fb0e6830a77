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
    OdirectSlow {
        #[arg(long)]
        file: String,
        #[arg(long)]
        dev: String,
        #[arg(long, default_value_t = 8)]
        pages: usize,
    },
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
    },
    /// Buffered I/O only: must pin nothing.
    Buffered {
        #[arg(long)]
        file: String,
        #[arg(long, default_value_t = 8)]
        pages: usize,
    },
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
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let ts_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    println!(
        "PINWATCH-SCENARIO {{\"scenario\":\"{name}\",\"pid\":{},\"pages\":{pages},\"ts_ns\":{ts_ns}{extra}}}",
        std::process::id()
    );
    let _ = std::io::stdout().flush();
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

fn open(path: &str, flags: i32) -> Result<i32> {
    let c = CString::new(path)?;
    let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644) };
    check(fd as _, &format!("open {path}"))?;
    Ok(fd)
}

fn odirect_slow(file: &str, dev: &str, pages: usize) -> Result<()> {
    let len = pages * PAGE;
    let fd = open(file, libc::O_RDWR | libc::O_CREAT)?;
    check(unsafe { libc::ftruncate(fd, len as _) } as _, "ftruncate")?;
    let map = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if map == libc::MAP_FAILED {
        bail!("mmap {file}: {}", std::io::Error::last_os_error());
    }
    // Fault every page into the page cache first, so the pins land on file pages.
    for i in 0..pages {
        unsafe { *(map as *mut u8).add(i * PAGE) = 0xab };
    }
    let dfd = open(dev, libc::O_RDONLY | libc::O_DIRECT)?;
    report("odirect-slow", pages, "");
    let n = check(unsafe { libc::pread(dfd, map, len, 0) } as _, "O_DIRECT pread")?;
    if n as usize != len {
        bail!("short O_DIRECT read: {n} of {len}");
    }
    unsafe {
        libc::munmap(map, len);
        libc::close(dfd);
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

fn iouring_fixed(pages: usize, hold_ms: u64) -> Result<()> {
    let buf = map_anon(pages)?;
    let mut params = IoUringParams([0; 120]);
    let ring = check(unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, &mut params as *mut _) }, "io_uring_setup")?;
    let iov = libc::iovec { iov_base: buf as *mut _, iov_len: pages * PAGE };
    const IORING_REGISTER_BUFFERS: u32 = 0;
    const IORING_UNREGISTER_BUFFERS: u32 = 1;
    report("iouring-fixed", pages, "");
    check(unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_REGISTER_BUFFERS, &iov as *const _, 1u32) }, "IORING_REGISTER_BUFFERS")?;
    sleep(Duration::from_millis(hold_ms));
    check(unsafe { libc::syscall(libc::SYS_io_uring_register, ring, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32) }, "IORING_UNREGISTER_BUFFERS")?;
    unsafe { libc::close(ring as i32) };
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
        Scenario::OdirectSlow { file, dev, pages } => odirect_slow(&file, &dev, pages),
        Scenario::Vmsplice { pages, hold_ms } => vmsplice(pages, hold_ms),
        Scenario::PvmWritev { pages } => pvm_writev(pages),
        Scenario::IouringFixed { pages, hold_ms } => iouring_fixed(pages, hold_ms),
        Scenario::Buffered { file, pages } => buffered(&file, pages),
    }
    .context("scenario failed")
}
