//! The embedded eBPF object, adjusted for the kernel it loads on before aya reads it.
//! Map definitions are compiled in (aya-ebpf's legacy `maps` section, a `bpf_map_def`
//! per map symbol), and aya can change a map's size at load but not its flags: where
//! a map should be allocated as it fills rather than preallocated whole, its
//! `map_flags` word is set here, in a copy. Pure: bytes in, bytes out.

use anyhow::{anyhow, bail, Result};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

/// bpf_map_def: type, key_size, value_size, max_entries, map_flags, id, pinning (u32s).
const MAP_FLAGS_OFF: usize = 16;
const MAP_DEF_SIZE: usize = 28;

/// BPF_F_NO_PREALLOC: hash map elements are allocated on insert and freed on delete, so
/// a map costs what it holds (and its buckets), not its capacity.
pub const BPF_F_NO_PREALLOC: u32 = 1;

/// An ELF image in 8-byte aligned memory (the ELF parser reads its headers in place).
pub struct Aligned(Vec<u64>);

impl Aligned {
    pub fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: the Vec holds at least `len` initialized bytes (see with_map_flags),
        // and u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, len) }
    }
}

/// A copy of `elf` in which each named map's `map_flags` has `flags` added; a name the
/// object lacks is an error (a renamed map must not silently lose its flags).
pub fn with_map_flags(elf: &[u8], maps: &[&str], flags: u32) -> Result<(Aligned, usize)> {
    let offsets = maps.iter().map(|name| flags_offset(elf, name)).collect::<Result<Vec<_>>>()?;
    let mut words = vec![0u64; elf.len().div_ceil(8)];
    // SAFETY: the Vec has room for elf.len() bytes; u8 has no alignment requirement.
    let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, elf.len()) };
    bytes.copy_from_slice(elf);
    for off in offsets {
        let old = u32::from_le_bytes(bytes[off..off + 4].try_into()?);
        bytes[off..off + 4].copy_from_slice(&(old | flags).to_le_bytes());
    }
    Ok((Aligned(words), elf.len()))
}

/// Where map `name`'s `map_flags` word lies in `elf`.
fn flags_offset(elf: &[u8], name: &str) -> Result<usize> {
    let file = object::File::parse(elf).map_err(|e| anyhow!("the embedded eBPF object does not parse as ELF: {e}"))?;
    let section = file.section_by_name("maps").ok_or_else(|| anyhow!("the eBPF object has no maps section"))?;
    let (start, size) = section.file_range().ok_or_else(|| anyhow!("the eBPF object's maps section has no file data"))?;
    let sym = file
        .symbols()
        .find(|s| s.name() == Ok(name) && s.section_index() == Some(section.index()))
        .ok_or_else(|| anyhow!("map {name} is not in the eBPF object's maps section"))?;
    if sym.address() + MAP_DEF_SIZE as u64 > size {
        bail!("map {name}'s definition lies past the end of the maps section");
    }
    Ok((start + sym.address()) as usize + MAP_FLAGS_OFF)
}

/// The `map_flags` of map `name` in `elf`.
#[cfg(test)]
pub fn map_flags(elf: &[u8], name: &str) -> Result<u32> {
    let off = flags_offset(elf, name)?;
    Ok(u32::from_le_bytes(elf.get(off..off + 4).ok_or_else(|| anyhow!("short"))?.try_into()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_maps_gain_the_flag_and_nothing_else_changes() {
        let elf = super::super::load::object();
        assert_eq!(map_flags(elf, "PINS").unwrap() & BPF_F_NO_PREALLOC, 0, "PINS is preallocated as compiled");
        let (copy, len) = with_map_flags(elf, &["PINS", "PROC_PINS"], BPF_F_NO_PREALLOC).unwrap();
        let out = copy.bytes(len);
        assert_eq!(out.len(), elf.len());
        assert_eq!(map_flags(out, "PINS").unwrap() & BPF_F_NO_PREALLOC, BPF_F_NO_PREALLOC);
        assert_eq!(map_flags(out, "PROC_PINS").unwrap() & BPF_F_NO_PREALLOC, BPF_F_NO_PREALLOC);
        assert_eq!(map_flags(out, "GUP_CALLS").unwrap(), map_flags(elf, "GUP_CALLS").unwrap());
        let changed = elf.iter().zip(out).filter(|(a, b)| a != b).count();
        assert_eq!(changed, 2, "one byte of each map's flags word");
    }

    #[test]
    fn a_map_the_object_lacks_is_an_error() {
        let elf = super::super::load::object();
        let err = with_map_flags(elf, &["NO_SUCH_MAP"], BPF_F_NO_PREALLOC).err().unwrap();
        assert!(err.to_string().contains("NO_SUCH_MAP"), "{err}");
        assert!(with_map_flags(b"not an elf", &["PINS"], 1).is_err());
    }
}
