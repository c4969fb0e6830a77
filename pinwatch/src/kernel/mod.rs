//! Everything that touches the running kernel: privileges, BTF layouts, symbols, the
//! attach plan, loading and attaching the programs, and the live record stream.
//! Nothing here decides what a record means; that is the engine's job.

pub mod btf;
pub mod calibrate;
pub mod decode;
pub mod load;
pub mod plan;
pub mod procs;
pub mod stack;
pub mod stream;
pub mod symbols;

pub use load::Kernel;

/// The running kernel's release string (uname -r).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}
