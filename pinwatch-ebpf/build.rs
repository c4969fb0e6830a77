// Relink when bpf-linker changes (a toolchain update rebuilds it against a new LLVM).
fn main() {
    if let Some(path) = std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join("bpf-linker")).find(|f| f.exists()))
    {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
