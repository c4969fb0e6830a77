//! Struct layouts and constants of the running kernel, read from its BTF
//! (/sys/kernel/btf/vmlinux). Rust eBPF code gets no CO-RE relocations, so these are
//! handed to the programs as globals.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};
use btf_rs::{Btf, Type};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The FOLL_* bits that decide how a pin is reported. Their values changed in 6.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Default)]
pub struct FollFlags {
    pub write: u32,
    pub longterm: u32,
    pub pin: u32,
}

impl FollFlags {
    /// #defines of 5.10 to 6.2 (include/linux/mm.h).
    pub const BEFORE_6_3: FollFlags = FollFlags { write: 0x01, longterm: 0x10000, pin: 0x40000 };
}

#[derive(Clone, Debug, serde::Serialize, Default)]
pub struct Layouts {
    pub struct_page_size: u64,
    /// compound_head, or compound_info on 7.1+.
    pub compound_head_field: &'static str,
    pub compound_head_off: u64,
    /// A tail page's compound_info holds a mask to apply to its own address, not a
    /// pointer to its head (7.1+, where struct page's size is a power of 2 and the
    /// kernel has the HugeTLB vmemmap optimization): what _compound_head() then does.
    pub compound_info_mask: bool,
    /// Before 7.1, on a kernel with the HugeTLB vmemmap optimization: the tails of an
    /// optimized huge page whose struct pages lie past its first vmemmap page read as
    /// heads ("fake heads"), and the next struct page names the real one
    /// (page_fixed_fake_head). The optimization can be switched on at any time, so the
    /// programs always check.
    pub fake_heads: bool,
    pub bio_io_vec_off: u64,
    pub bio_vcnt_off: u64,
    pub pipe_buffer_page_off: u64,
    pub foll: FollFlags,
    /// Where FOLL_* came from: "btf enum" (6.3+) or "5.10-6.2 defines".
    pub foll_source: &'static str,
    /// Direct I/O takes FOLL_PIN references and its bios give them back through
    /// unpin_user_page (BIO_PAGE_PINNED, 6.5+): the bio release hooks see nothing to drop.
    pub bio_pins_pages: bool,
    pub folio: FolioLayout,
}

/// What the hazard hooks read of a folio and its file, as offsets from the folio head
/// (struct folio where the kernel has it, 5.16+, else struct page and its tail pages).
#[derive(Clone, Debug, serde::Serialize, Default)]
pub struct FolioLayout {
    pub flags_off: u64,
    /// Bit of PG_head in flags; 64 when unknown (then every folio counts as small).
    pub pg_head_bit: u64,
    pub refcount_off: u64,
    pub mapping_off: u64,
    pub index_off: u64,
    /// One byte holding the order of a large folio, and where it came from.
    pub order_off: u64,
    pub order_field: &'static str,
    /// The large-folio pin count (0: none found), where it came from, and the smallest
    /// order that has one.
    pub pincount_off: u64,
    pub pincount_field: &'static str,
    pub pincount_min_order: u64,
    /// page->_mapcount (0: not found) and PG_private's bit (64: not found): without
    /// them FOLL_GET references are judged by _refcount alone.
    pub mapcount_off: u64,
    pub pg_private_bit: u64,
    pub mapping_host_off: u64,
    pub inode_ino_off: u64,
    pub inode_sb_off: u64,
    pub sb_dev_off: u64,
    pub sb_magic_off: u64,
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

/// What the programs need to read kernel words without a helper (6.2+): the BTF ids of
/// the kfunc bpf_rdonly_cast and of struct pt_regs, whose first members are unsigned
/// longs, the type the programs cast kernel memory to (kernel::load patches the calls).
/// None where either is missing (before 6.2).
pub fn rdonly_cast_ids(btf: &Btf) -> Option<(u32, u32)> {
    let id_of = |name: &str, want: fn(&Type) -> bool| {
        btf.resolve_ids_by_name(name).ok()?.into_iter().find(|id| btf.resolve_type_by_id(*id).is_ok_and(|t| want(&t)))
    };
    let func = id_of("bpf_rdonly_cast", |t| matches!(t, Type::Func(_)))?;
    let words = id_of("pt_regs", |t| matches!(t, Type::Struct(s) if s.size() >= 32))?;
    Some((func, words))
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

/// Offset of the first of `members` that `strukt` has, with its name.
fn first_member(btf: &Btf, strukt: &str, members: &[&'static str]) -> Option<(u64, &'static str)> {
    let s = struct_type(btf, strukt).ok()?;
    members.iter().find_map(|m| find_member(btf, &s, m, 0).ok().flatten().map(|o| (o as u64, *m)))
}

/// Number of parameters of a kernel function, from its BTF FUNC_PROTO: an fexit
/// program finds the return value right after them.
pub fn func_nargs(btf: &Btf, func: &str) -> Option<usize> {
    for t in btf.resolve_types_by_name(func).ok()? {
        if let Type::Func(f) = t {
            if let Ok(Type::FuncProto(p)) = btf.resolve_chained_type(&f) {
                return Some(p.parameters.len());
            }
        }
    }
    None
}

fn folio_layout(btf: &Btf, page_size: u64) -> Result<FolioLayout> {
    let has_folio = struct_type(btf, "folio").is_ok();
    // Fields of the head page: struct folio names them on 5.16+, struct page always.
    let head = |members: &[&'static str]| -> Result<u64> {
        let found = if has_folio { first_member(btf, "folio", members) } else { None };
        found
            .or_else(|| first_member(btf, "page", members))
            .map(|(o, _)| o)
            .ok_or_else(|| anyhow!("neither struct folio nor struct page has {members:?} in this kernel's BTF"))
    };
    // The order of a large folio: folio->_folio_order (6.1-6.5), page[1].compound_order
    // (up to 6.2), else folio->_flags_1's low byte (6.6+). 6.1 to 6.5 have _flags_1 too,
    // holding page[1]'s flags there: it must come last (seen on 6.1: order 64 read from it).
    let (order_off, order_field) = first_member(btf, "folio", &["_folio_order"])
        .or_else(|| first_member(btf, "page", &["compound_order"]).map(|(o, n)| (o + page_size, n)))
        .or_else(|| first_member(btf, "folio", &["_flags_1"]))
        .unwrap_or((0, "unknown"));
    // The pin count of a large folio: folio->_pincount (6.3+), page[1].compound_pincount
    // (5.19-6.2), page[2].hpage_pinned_refcount (5.10-5.18, orders >= 2 only).
    let (pincount_off, pincount_field, pincount_min_order) = if let Some((o, n)) = first_member(btf, "folio", &["_pincount"]) {
        (o, n, 1)
    } else if let Some((o, n)) = first_member(btf, "page", &["compound_pincount"]) {
        (o + page_size, n, 1)
    } else if let Some((o, n)) = first_member(btf, "page", &["hpage_pinned_refcount"]) {
        (o + 2 * page_size, n, 2)
    } else {
        (0, "none", 64)
    };
    Ok(FolioLayout {
        flags_off: head(&["flags"])?,
        pg_head_bit: enum_value(btf, "PG_head").map(u64::from).unwrap_or(64),
        refcount_off: head(&["_refcount"])?,
        mapping_off: head(&["mapping"])?,
        index_off: head(&["index", "__folio_index"])?,
        order_off,
        order_field,
        pincount_off,
        pincount_field,
        pincount_min_order,
        mapcount_off: first_member(btf, "page", &["_mapcount"]).map(|(o, _)| o).unwrap_or(0),
        pg_private_bit: enum_value(btf, "PG_private").map(u64::from).unwrap_or(64),
        mapping_host_off: member_offset(btf, "address_space", "host")?,
        inode_ino_off: member_offset(btf, "inode", "i_ino")?,
        inode_sb_off: member_offset(btf, "inode", "i_sb")?,
        sb_dev_off: member_offset(btf, "super_block", "s_dev")?,
        sb_magic_off: member_offset(btf, "super_block", "s_magic")?,
    })
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
    let struct_page_size = page.size() as u64;
    // compound_info_has_mask(): CONFIG_HUGETLB_PAGE_OPTIMIZE_VMEMMAP (its sysctl exists)
    // and a power-of-2 struct page, on kernels whose field says compound_info.
    let hvo = std::path::Path::new("/proc/sys/vm/hugetlb_optimize_vmemmap").exists();
    let compound_info_mask = compound_head_field == "compound_info" && struct_page_size.is_power_of_two() && hvo;
    Ok(Layouts {
        compound_info_mask,
        fake_heads: compound_head_field == "compound_head" && hvo,
        folio: folio_layout(btf, struct_page_size).context("struct folio / page fields for the hazard hooks")?,
        struct_page_size,
        compound_head_field,
        compound_head_off,
        bio_io_vec_off: member_offset(btf, "bio", "bi_io_vec")?,
        bio_vcnt_off: member_offset(btf, "bio", "bi_vcnt")?,
        pipe_buffer_page_off: member_offset(btf, "pipe_buffer", "page")?,
        foll,
        foll_source,
        bio_pins_pages: enum_value(btf, "BIO_PAGE_PINNED").is_some(),
    })
}
