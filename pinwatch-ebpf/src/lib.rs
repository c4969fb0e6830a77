// The eBPF programs live in the `pinwatch` binary target (src/main.rs). This empty
// library exists so that user space can name this crate as a build dependency, which
// makes cargo rebuild the programs when they change.
#![no_std]
