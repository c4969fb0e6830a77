//! Struct layouts and constants of the running kernel, read from its BTF
//! (/sys/kernel/btf/vmlinux). Rust eBPF code gets no CO-RE relocations, so these are
//! handed to the programs as globals.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The FOLL_* bits that decide how a pin is reported. Their values changed in 6.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FollFlags {
    pub write: u32,
    pub longterm: u32,
    pub pin: u32,
}

impl FollFlags {
    /// #defines of 5.10 to 6.2 (include/linux/mm.h).
    pub const BEFORE_6_3: FollFlags = FollFlags { write: 0x01, longterm: 0x10000, pin: 0x40000 };
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Layouts {
    pub struct_page_size: u64,
    /// compound_head, or compound_info on 7.1+.
    pub compound_head_field: &'static str,
    pub compound_head_off: u64,
    pub bio_io_vec_off: u64,
    pub bio_vcnt_off: u64,
    pub pipe_buffer_page_off: u64,
    pub foll: FollFlags,
    /// Where FOLL_* came from: "btf enum" (6.3+) or "5.10-6.2 defines".
    pub foll_source: &'static str,
}

pub fn load_vmlinux() -> Result<Btf> {
    if !Path::new(VMLINUX_BTF).exists() {
        bail!(
            "{VMLINUX_BTF} is missing: this kernel was built without CONFIG_DEBUG_INFO_BTF, \
             and pinwatch needs BTF to find struct layouts"
        );
    }
    Btf::from_file(VMLINUX_BTF).with_context(|| format!("parsing {VMLINUX_BTF}"))
}

fn struct_type(btf: &Btf, name: &str) -> Result<btf_rs::Struct> {
    for t in btf.resolve_types_by_name(name).with_context(|| format!("struct {name} not in BTF"))? {
        if let Type::Struct(s) = t {
            return Ok(s);
        }
    }
    Err(anyhow!("struct {name} not in BTF"))
}

/// Byte offset of `member` in `s`, looking through anonymous structs and unions.
fn find_member(btf: &Btf, s: &btf_rs::Struct, member: &str, base_bits: u32) -> Result<Option<u32>> {
    for m in &s.members {
        let name = btf.resolve_name(m).unwrap_or_default();
        let off = base_bits + m.bit_offset();
        if name == member {
            return Ok(Some(off / 8));
        }
        if name.is_empty() {
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m) {
                if let Some(found) = find_member(btf, &inner, member, off)? {
                    return Ok(Some(found));
                }
            }
        }
    }
    Ok(None)
}

pub fn member_offset(btf: &Btf, strukt: &str, member: &str) -> Result<u64> {
    let s = struct_type(btf, strukt)?;
    find_member(btf, &s, member, 0)?
        .map(u64::from)
        .ok_or_else(|| anyhow!("struct {strukt} has no member {member} in this kernel's BTF"))
}

fn enum_value(btf: &Btf, name: &str) -> Option<u32> {
    // FOLL_* became members of an anonymous enum in 6.3; look them up by name.
    use fallible_iterator::FallibleIterator as _;
    let mut types = btf.type_iter();
    while let Ok(Some(t)) = types.next() {
        if let Type::Enum(e) = t {
            for m in &e.members {
                if btf.resolve_name(m).ok().as_deref() == Some(name) {
                    return Some(m.val());
                }
            }
        }
    }
    None
}

pub fn read_layouts(btf: &Btf) -> Result<Layouts> {
    let page = struct_type(btf, "page")?;
    let (compound_head_field, compound_head_off) =
        match find_member(btf, &page, "compound_head", 0)? {
            Some(off) => ("compound_head", off as u64),
            None => (
                "compound_info",
                find_member(btf, &page, "compound_info", 0)?
                    .ok_or_else(|| anyhow!("struct page has neither compound_head nor compound_info"))?
                    as u64,
            ),
        };
    let (foll, foll_source) = match (
        enum_value(btf, "FOLL_WRITE"),
        enum_value(btf, "FOLL_LONGTERM"),
        enum_value(btf, "FOLL_PIN"),
    ) {
        (Some(write), Some(longterm), Some(pin)) => (FollFlags { write, longterm, pin }, "btf enum"),
        _ => (FollFlags::BEFORE_6_3, "5.10-6.2 defines"),
    };
    Ok(Layouts {
        struct_page_size: page.size() as u64,
        compound_head_field,
        compound_head_off,
        bio_io_vec_off: member_offset(btf, "bio", "bi_io_vec")?,
        bio_vcnt_off: member_offset(btf, "bio", "bi_vcnt")?,
        pipe_buffer_page_off: member_offset(btf, "pipe_buffer", "page")?,
        foll,
        foll_source,
    })
}
