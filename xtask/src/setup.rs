//! `cargo xtask setup`: installs what building and the lab need. Idempotent: each step
//! checks first and does nothing when its tool is already there.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::util::{have, output, quiet};

pub const APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "e2fsprogs", "xz-utils", "kmod", "tmux", "chromium", "bpftool", "xfsprogs", "btrfs-progs", "fio", "bpftrace", "prometheus", "curl"];
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> Result<()> {
    rust_src()?;
    bpf_linker()?;
    cargo_deb()?;
    apt()?;
    Ok(())
}

fn rust_src() -> Result<()> {
    if Command::new("rustc").arg("+nightly").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        quiet(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]).env("RUSTUP_AUTO_INSTALL", "1"))?;
    }
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .context("the nightly toolchain is needed to build the eBPF programs (`rustup toolchain install nightly`)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    quiet(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// bpf-linker must be built against the same LLVM as the nightly rustc. The nightly
/// ships libLLVM; a prefix folder with the names llvm-sys looks for points at it.
/// cargo-deb, for `cargo xtask package` (and the package test).
const CARGO_DEB_VERSION: &str = "3.8.0";

fn cargo_deb() -> Result<()> {
    if output(Command::new("cargo").args(["deb", "--version"])).is_ok_and(|v| v.contains(CARGO_DEB_VERSION)) {
        return Ok(());
    }
    println!("setup: building cargo-deb {CARGO_DEB_VERSION} (a few minutes)");
    quiet(Command::new("cargo").args(["install", "--locked", "cargo-deb", "--version", CARGO_DEB_VERSION]))
}

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
    // --locked: the versions bpf-linker was released with, not whatever resolves today.
    quiet(Command::new("cargo")
        .args(["install", "--locked", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features", "--features"])
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
        return Ok(());
    }
    if unsafe { libc_geteuid() } != 0 {
        bail!("missing Debian packages {missing:?}: run `cargo xtask setup` as root, or apt-get install them");
    }
    println!("setup: installing {}", missing.join(" "));
    quiet(Command::new("apt-get").arg("update").arg("-q"))?;
    // Set-up never removes what a user installed. A machine with a backported QEMU piece
    // (qemu-utils from bookworm-backports) makes the release's qemu-system-x86 remove it:
    // then the same packages come from the release's backports, through a private list.
    let plain: Vec<String> = Vec::new();
    if removals(&plain, &missing)?.is_empty() {
        return install(&plain, &missing);
    }
    let backports = backports_options()?;
    let removed = removals(&backports, &missing)?;
    if !removed.is_empty() {
        bail!(
            "installing {missing:?} would remove {removed:?}, from the release and from its backports alike; \
             install QEMU (qemu-system-x86) by hand in a way that keeps them, then run set-up again"
        );
    }
    install(&backports, &missing)
}

/// What `apt-get install` would remove to install `packages` (a dry run).
fn removals(options: &[String], packages: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("apt-get")
        .args(options)
        .args(["install", "-s", "-q", "--no-install-recommends"])
        .args(packages)
        .output()
        .context("running apt-get")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let removed: Vec<String> =
        text.lines().filter_map(|l| l.strip_prefix("Remv ")).map(|l| l.split_whitespace().next().unwrap_or(l).to_string()).collect();
    if !out.status.success() && removed.is_empty() {
        bail!("apt-get cannot install {packages:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(removed)
}

fn install(options: &[String], packages: &[&str]) -> Result<()> {
    quiet(
        Command::new("apt-get")
            .args(options)
            .args(["install", "-y", "-q", "--no-remove", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// apt options that add this release's backports to the system's sources without
/// changing the system's apt configuration: a private source list and package lists.
fn backports_options() -> Result<Vec<String>> {
    let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    let codename = os
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|c| c.trim_matches('"').to_string())
        .filter(|c| !c.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME: cannot find this release's backports")?;
    let dir = crate::util::cache_dir().join("apt-backports");
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    let list = dir.join("backports.list");
    std::fs::write(&list, format!("deb http://deb.debian.org/debian {codename}-backports main\n"))?;
    let options = vec![
        "-o".to_string(),
        format!("Dir::Etc::SourceList={}", list.display()),
        "-o".to_string(),
        format!("Dir::State::Lists={}", dir.join("lists").display()),
        "-t".to_string(),
        format!("{codename}-backports"),
    ];
    quiet(Command::new("apt-get").args(&options[..4]).args(["update", "-q"]))?;
    Ok(options)
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
