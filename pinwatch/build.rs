//! Builds the eBPF programs (pinwatch-ebpf) with the nightly toolchain and bpf-linker
//! and leaves the object in OUT_DIR, where src/kernel/load.rs embeds it.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let metadata_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../pinwatch-ebpf");
    let root = metadata_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "pinwatch-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs failed: run `cargo xtask setup` (nightly rust-src and bpf-linker)")
}
