//! `cargo xtask setup`: installs what building and the lab need. Idempotent: each step
//! checks first and does nothing when its tool is already there.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::util::{have, output, run};

pub const APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "e2fsprogs", "xz-utils", "kmod", "tmux"];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    apt()?;
    println!("setup: done");
    Ok(())
}

fn rust_src() -> Result<()> {
    if Command::new("rustc").arg("+nightly").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        println!("setup: installing the nightly toolchain (the eBPF programs need -Z build-std)");
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]).env("RUSTUP_AUTO_INSTALL", "1"))?;
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .context("the nightly toolchain is needed to build the eBPF programs (`rustup toolchain install nightly`)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: nightly rust-src present");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must be built against the same LLVM as the nightly rustc. The nightly
/// ships libLLVM; a prefix folder with the names llvm-sys looks for points at it.
fn bpf_linker() -> Result<()> {
    let sysroot = PathBuf::from(output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .context("the nightly toolchain has no libLLVM.so.*")?;
    // e.g. libLLVM.so.22.1-rust-1.97.0-nightly -> llvm-22
    let major = lib.trim_start_matches("libLLVM.so.").split('.').next().unwrap_or("").to_string();
    if have("bpf-linker") {
        let v = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
        let llvm = output(Command::new("bpf-linker").arg("--llvm-version")).unwrap_or_default();
        if v.contains(BPF_LINKER_VERSION) && (llvm.is_empty() || llvm.contains(&format!("{major}."))) {
            println!("setup: bpf-linker {BPF_LINKER_VERSION} present");
            return Ok(());
        }
    }
    let prefix = crate::util::cache_dir().parent().expect("cache dir has a parent").join("llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    for name in ["libLLVM.so".to_string(), lib.clone()] {
        let link = prefix.join("lib").join(&name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(sysroot.join("lib").join(&lib), &link)?;
    }
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)");
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix))
}

fn apt() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| s.contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        println!("setup: lab packages present");
        return Ok(());
    }
    if unsafe { libc_geteuid() } != 0 {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root, or apt-get install them");
    }
    println!("setup: installing {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-q"))?;
    run(Command::new("apt-get").args(["install", "-y", "-q", "--no-install-recommends"]).args(&missing).env("DEBIAN_FRONTEND", "noninteractive"))
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
