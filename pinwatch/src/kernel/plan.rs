//! The attach plan: which kernel symbol serves which role, through which program and
//! attach type, on this kernel. It is data: doctor prints it, the loader follows it.
//!
//! Each function hook has a ladder of attach types, fastest first: fentry (with fexit
//! for hooks that need a return program), then kprobe (with kretprobe). The plan lists
//! the rungs this kernel allows; the loader climbs down them until one attaches.
//! Hooks of one `group` are alternatives for one job (folio_mark_dirty, else
//! set_page_dirty, else the dirtying tracepoint): the first that attaches serves it.

use serde::Serialize;

use super::symbols::Symbols;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// GUP entry points: who takes which pages.
    Acquire,
    /// unpin family and the FOLL_GET releases pinwatch can see.
    Release,
    /// try_to_unmap_one: reclaim, MADV_PAGEOUT, migration unmap a pinned page.
    Unmap,
    /// page_mkclean_one: writeback write-protects a pinned page.
    Mkclean,
    /// The filesystem writes a pinned page out.
    Writeback,
    /// A pinned page leaves the page cache.
    Truncate,
    /// A pinned page is dirtied.
    Dirty,
}

impl Role {
    pub const ALL: [Role; 7] = [Role::Acquire, Role::Release, Role::Unmap, Role::Mkclean, Role::Writeback, Role::Truncate, Role::Dirty];

    /// What a user learns from this role.
    pub fn what(self) -> &'static str {
        match self {
            Role::Acquire => "who takes which pages (GUP calls: pid, function, flags, pfns)",
            Role::Release => "when pins and page references are dropped",
            Role::Unmap => "unmap_while_pinned: reclaim, MADV_PAGEOUT or migration unmapping a pinned page",
            Role::Mkclean => "mkclean_while_pinned: writeback write-protecting a pinned page",
            Role::Writeback => "writeback_while_pinned: a filesystem starting writeback of a write-pinned page",
            Role::Truncate => "truncate_while_pinned: a pinned page leaving the page cache",
            Role::Dirty => "dirty_after_unmap: a pinned page dirtied after it was unmapped or truncated",
        }
    }

    /// In a few words, for the doctor's verdict.
    pub fn plain(self) -> &'static str {
        match self {
            Role::Acquire => "who pins which pages (GUP calls)",
            Role::Release => "when pins are released",
            Role::Unmap => "pinned pages being unmapped",
            Role::Mkclean => "pinned pages being cleaned for writeback",
            Role::Writeback => "pinned pages being written back",
            Role::Truncate => "pinned pages leaving the page cache (truncate)",
            Role::Dirty => "pinned pages dirtied after that",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Acquire => "acquire",
            Role::Release => "release",
            Role::Unmap => "unmap",
            Role::Mkclean => "mkclean",
            Role::Writeback => "writeback",
            Role::Truncate => "truncate",
            Role::Dirty => "dirty",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachType {
    Fentry,
    Kprobe,
    RawTracepoint,
}

impl AttachType {
    pub fn name(self) -> &'static str {
        match self {
            AttachType::Fentry => "fentry",
            AttachType::Kprobe => "kprobe",
            AttachType::RawTracepoint => "raw_tracepoint",
        }
    }
}

/// How a hook can attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A kernel function: fentry or kprobe.
    Function,
    /// A tracepoint, attached as a raw tracepoint.
    Tracepoint,
}

/// What a function hook needs on return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    None,
    /// The return value (GUP calls): kretprobe `gup_return`, or fexit
    /// `fexit_<symbol>_<nargs>` since fexit finds it after the arguments.
    Value,
    /// Only that the call ended (nesting of releases): kretprobe `unpin_return`, or
    /// fexit `fexit_<symbol>`.
    Depth,
}

#[derive(Clone, Copy, Debug)]
pub struct HookSpec {
    pub role: Role,
    pub symbol: &'static str,
    pub family: Family,
    pub ret: Ret,
    /// Hooks sharing a group do one job; the first one attached serves it.
    pub group: Option<&'static str>,
    /// Which kernels have it, for people reading the plan.
    pub kernels: &'static str,
}

impl HookSpec {
    /// Program names: the kprobe or raw tracepoint program is named after the symbol.
    pub fn program(&self, attach: AttachType, kernel_pins: bool) -> String {
        match attach {
            AttachType::Fentry => format!("fentry_{}", self.symbol),
            AttachType::RawTracepoint if kernel_pins && self.watches_pages() => format!("{}_kpins", self.symbol),
            _ => self.symbol.to_string(),
        }
    }

    /// Hazard hooks look at pages; the others follow pins.
    pub fn watches_pages(&self) -> bool {
        !matches!(self.role, Role::Acquire | Role::Release)
    }

    pub fn ret_program(&self, attach: AttachType, nargs: Option<usize>) -> Option<String> {
        match (self.ret, attach) {
            (Ret::None, _) | (_, AttachType::RawTracepoint) => None,
            (Ret::Value, AttachType::Kprobe) => Some("gup_return".into()),
            (Ret::Depth, AttachType::Kprobe) => Some("unpin_return".into()),
            (Ret::Value, AttachType::Fentry) => Some(format!("fexit_{}_{}", self.symbol, nargs.unwrap_or(0))),
            (Ret::Depth, AttachType::Fentry) => Some(format!("fexit_{}", self.symbol)),
        }
    }
}

const fn func(role: Role, symbol: &'static str, ret: Ret, kernels: &'static str) -> HookSpec {
    HookSpec { role, symbol, family: Family::Function, ret, group: None, kernels }
}

const fn alt(role: Role, symbol: &'static str, family: Family, group: &'static str, kernels: &'static str) -> HookSpec {
    HookSpec { role, symbol, family, ret: Ret::None, group: Some(group), kernels }
}

const fn tp(role: Role, symbol: &'static str, kernels: &'static str) -> HookSpec {
    HookSpec { role, symbol, family: Family::Tracepoint, ret: Ret::None, group: None, kernels }
}

use Family::{Function as F, Tracepoint as T};
use Ret::{Depth, Value};

/// Every hook pinwatch knows.
pub const HOOKS: &[HookSpec] = &[
    func(Role::Acquire, "get_user_pages", Value, "all"),
    func(Role::Acquire, "pin_user_pages", Value, "all"),
    func(Role::Acquire, "get_user_pages_fast", Value, "all"),
    func(Role::Acquire, "pin_user_pages_fast", Value, "all"),
    func(Role::Acquire, "get_user_pages_fast_only", Value, "all"),
    func(Role::Acquire, "get_user_pages_remote", Value, "all (7 args up to 6.4: fentry needs 6.6 for that)"),
    func(Role::Acquire, "pin_user_pages_remote", Value, "all (7 args up to 6.4: fentry needs 6.6 for that)"),
    func(Role::Acquire, "get_user_pages_unlocked", Value, "all"),
    func(Role::Acquire, "pin_user_pages_unlocked", Value, "all"),
    // Only unpin_user_pages and unpin_user_pages_dirty_lock call other release
    // functions: they alone keep a depth (see the kernel side's release::nested).
    func(Role::Release, "unpin_user_page", Ret::None, "all"),
    func(Role::Release, "unpin_user_pages", Depth, "all"),
    func(Role::Release, "unpin_user_pages_dirty_lock", Depth, "all"),
    func(Role::Release, "unpin_user_page_range_dirty_lock", Ret::None, "5.15+"),
    func(Role::Release, "unpin_folio", Ret::None, "6.11+"),
    func(Role::Release, "unpin_folios", Ret::None, "6.11+"),
    func(Role::Release, "unpin_user_folio", Ret::None, "6.12+"),
    func(Role::Release, "bio_release_pages", Ret::None, "5.10 (FOLL_GET direct I/O)"),
    func(Role::Release, "__bio_release_pages", Ret::None, "5.15+ (FOLL_GET direct I/O up to 6.4)"),
    func(Role::Release, "page_cache_pipe_buf_release", Ret::None, "all (vmsplice'd pages)"),
    tp(Role::Release, "mm_page_free", "all (kmem tracepoint)"),
    func(Role::Unmap, "try_to_unmap_one", Ret::None, "all (static; folio from 5.19)"),
    func(Role::Mkclean, "page_mkclean_one", Ret::None, "all (static; folio from 5.19)"),
    // Writeback of any filesystem: where the folio is marked under writeback. ext4's own
    // per-page functions serve only where neither generic one can be hooked.
    alt(Role::Writeback, "__folio_start_writeback", F, "writeback", "5.16+ (every filesystem)"),
    alt(Role::Writeback, "__test_set_page_writeback", F, "writeback", "up to 5.15 (every filesystem)"),
    alt(Role::Writeback, "ext4_bio_write_page", F, "writeback", "up to 6.3 (ext4 only)"),
    alt(Role::Writeback, "ext4_bio_write_folio", F, "writeback", "6.4+ (ext4 only)"),
    tp(Role::Truncate, "mm_filemap_delete_from_page_cache", "all (filemap tracepoint)"),
    alt(Role::Dirty, "folio_mark_dirty", F, "dirty", "5.17+"),
    alt(Role::Dirty, "set_page_dirty", F, "dirty", "up to 6.x (a folio wrapper from 5.17)"),
    alt(Role::Dirty, "writeback_dirty_folio", T, "dirty", "5.17+ tracepoint (pages with a mapping only)"),
    alt(Role::Dirty, "writeback_dirty_page", T, "dirty", "up to 5.16 tracepoint (pages with a mapping only)"),
];

pub fn wanted_symbols() -> Vec<&'static str> {
    let mut v: Vec<&str> = HOOKS.iter().filter(|h| h.family == Family::Function).map(|h| h.symbol).collect();
    v.push("vmemmap_base");
    v
}

/// What the kernel allows, tested by loading and attaching real programs.
#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    pub btf: bool,
    pub fentry: Result<(), String>,
    pub kprobe: Result<(), String>,
    pub raw_tracepoint: Result<(), String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Choice {
    /// Will attach (or did) with the first of these that works, fastest first.
    Try { ladder: Vec<AttachType> },
    /// Attached with this type; `note` says why faster rungs were passed over.
    Use {
        attach: AttachType,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// Another hook of its group serves the job.
    Standby { instead: &'static str },
    /// Not available here, and why.
    Unavailable { reason: String },
}

#[derive(Clone, Debug, Serialize)]
pub struct PlannedHook {
    pub role: Role,
    pub symbol: &'static str,
    pub kernels: &'static str,
    #[serde(flatten)]
    pub choice: Choice,
    #[serde(skip)]
    pub spec: HookSpec,
}

/// Which attach types the user allows (`--attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    #[default]
    Auto,
    Fentry,
    Kprobe,
}

/// An attach type asked for by name (`--attach fentry|kprobe`) that this kernel refuses
/// is an error: recording in another mode than the one asked for would mislead.
pub fn check_mode(caps: &Capabilities, mode: AttachMode) -> Result<(), String> {
    let (name, cap) = match mode {
        AttachMode::Auto => return Ok(()),
        AttachMode::Fentry => ("fentry", &caps.fentry),
        AttachMode::Kprobe => ("kprobe", &caps.kprobe),
    };
    cap.as_ref().map_err(|why| {
        format!("--attach {name}: this kernel does not allow {name} programs ({why}); `--attach auto` takes what it allows, and `pinwatch doctor` shows what that is")
    })?;
    Ok(())
}

/// Chooses the attach ladder of every hook. Pure: the caller supplies what exists
/// (symbols) and what works (capabilities).
pub fn plan(syms: &Symbols, caps: &Capabilities, mode: AttachMode) -> Vec<PlannedHook> {
    HOOKS
        .iter()
        .map(|spec| {
            let choice = match spec.family {
                Family::Tracepoint => match (&caps.raw_tracepoint, syms.tracepoint_exists(spec.symbol)) {
                    (_, Some(false)) => Choice::Unavailable { reason: format!("no tracepoint {} in this kernel (kernels: {})", spec.symbol, spec.kernels) },
                    (Ok(()), _) => Choice::Try { ladder: vec![AttachType::RawTracepoint] },
                    (Err(e), _) => Choice::Unavailable { reason: format!("raw tracepoints refused: {e}") },
                },
                Family::Function => choose_function(spec, syms, caps, mode),
            };
            PlannedHook { role: spec.role, symbol: spec.symbol, kernels: spec.kernels, choice, spec: *spec }
        })
        .collect()
}

fn choose_function(spec: &HookSpec, syms: &Symbols, caps: &Capabilities, mode: AttachMode) -> Choice {
    if !syms.exists(spec.symbol) {
        return Choice::Unavailable { reason: format!("{} is not in this kernel (kernels: {})", spec.symbol, spec.kernels) };
    }
    if syms.traceable(spec.symbol) == Some(false) {
        return Choice::Unavailable { reason: format!("{} is not in available_filter_functions (inlined or notrace)", spec.symbol) };
    }
    let mut ladder = Vec::new();
    if mode != AttachMode::Kprobe && caps.fentry.is_ok() {
        ladder.push(AttachType::Fentry);
    }
    if mode != AttachMode::Fentry && caps.kprobe.is_ok() {
        ladder.push(AttachType::Kprobe);
    }
    if ladder.is_empty() {
        let allowed = match mode {
            AttachMode::Auto => "neither fentry nor kprobe works here",
            AttachMode::Fentry => "fentry does not work here (--attach fentry)",
            AttachMode::Kprobe => "kprobes do not work here (--attach kprobe)",
        };
        return Choice::Unavailable { reason: allowed.to_string() };
    }
    Choice::Try { ladder }
}

/// On kernels whose direct I/O pins with FOLL_PIN (BIO_PAGE_PINNED), a bio's pages come
/// back through unpin_user_page: the bio release hooks would walk every completed bio
/// for FOLL_GET references that no longer exist. They stand by.
pub fn bio_releases_unpin(plan: &mut [PlannedHook]) {
    for h in plan.iter_mut().filter(|h| matches!(h.symbol, "bio_release_pages" | "__bio_release_pages")) {
        if matches!(h.choice, Choice::Try { .. }) {
            h.choice = Choice::Standby { instead: "unpin_user_page" };
        }
    }
}

/// Roles that have at least one hook in use.
pub fn covered_roles(plan: &[PlannedHook]) -> Vec<Role> {
    let mut roles: Vec<Role> = plan.iter().filter(|h| matches!(h.choice, Choice::Use { .. })).map(|h| h.role).collect();
    roles.sort();
    roles.dedup();
    roles
}

/// Roles no hook serves.
pub fn blind_roles(plan: &[PlannedHook]) -> Vec<Role> {
    let covered = covered_roles(plan);
    Role::ALL.into_iter().filter(|r| !covered.contains(r)).collect()
}

/// How pinwatch runs, from what attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// GUP calls are seen: pins are attributed, every hazard role that attached works.
    Full,
    /// No GUP entry point could be hooked, but tracepoints work: truncate and dirtying
    /// of pages the kernel itself counts as DMA-pinned (FOLL_PIN), without the pinner.
    TracepointOnly,
    /// Nothing useful attached.
    Blind,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::TracepointOnly => "tracepoint_only",
            Mode::Blind => "blind",
        }
    }

    /// One paragraph for people: what this mode can and cannot show.
    pub fn explain(self) -> &'static str {
        match self {
            Mode::Full => "GUP calls are seen: pins are attributed to processes, and every hazard role that attached is watched",
            Mode::TracepointOnly => {
                "tracepoint-only mode: no GUP entry point can be hooked here (no kprobes, no fentry), and GUP has no tracepoint, \
                 so pins cannot be attributed to processes and FOLL_GET references are invisible. What remains: pages the kernel \
                 itself counts as DMA-pinned (FOLL_PIN, folio_maybe_dma_pinned) that leave the page cache (truncate_while_pinned) \
                 or are dirtied after that, without the pinner; unmap, mkclean and writeback of pinned pages cannot be seen"
            }
            Mode::Blind => "nothing pinwatch needs could be attached here",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(fentry: bool, kprobe: bool) -> Capabilities {
        let r = |ok: bool| if ok { Ok(()) } else { Err("refused".to_string()) };
        Capabilities { btf: true, fentry: r(fentry), kprobe: r(kprobe), raw_tracepoint: Ok(()) }
    }

    fn ladder(p: &[PlannedHook], sym: &str) -> Option<Vec<AttachType>> {
        match &p.iter().find(|h| h.symbol == sym)?.choice {
            Choice::Try { ladder } => Some(ladder.clone()),
            _ => None,
        }
    }

    #[test]
    fn ladders_follow_capabilities_and_mode() {
        let syms = Symbols::from_names(&["pin_user_pages_fast", "try_to_unmap_one"]);
        use AttachType::*;
        let cases = [
            (true, true, AttachMode::Auto, Some(vec![Fentry, Kprobe])),
            (true, true, AttachMode::Kprobe, Some(vec![Kprobe])),
            (true, true, AttachMode::Fentry, Some(vec![Fentry])),
            (false, true, AttachMode::Auto, Some(vec![Kprobe])),
            (false, true, AttachMode::Fentry, None),
            (false, false, AttachMode::Auto, None),
        ];
        for (f, k, mode, want) in cases {
            let p = plan(&syms, &caps(f, k), mode);
            assert_eq!(ladder(&p, "pin_user_pages_fast"), want, "fentry {f} kprobe {k} {mode:?}");
            // A symbol this kernel lacks is unavailable whatever the capabilities.
            assert_eq!(ladder(&p, "unpin_user_folio"), None);
            // Tracepoints need neither.
            assert_eq!(ladder(&p, "mm_filemap_delete_from_page_cache"), Some(vec![RawTracepoint]));
        }
    }

    #[test]
    fn bio_release_hooks_stand_by_where_direct_io_unpins() {
        let syms = Symbols::from_names(&["__bio_release_pages", "unpin_user_page", "page_cache_pipe_buf_release"]);
        let mut p = plan(&syms, &caps(true, true), AttachMode::Auto);
        assert!(ladder(&p, "__bio_release_pages").is_some());
        bio_releases_unpin(&mut p);
        let bio = p.iter().find(|h| h.symbol == "__bio_release_pages").unwrap();
        assert!(matches!(bio.choice, Choice::Standby { instead: "unpin_user_page" }), "{:?}", bio.choice);
        // the others are untouched; a bio hook this kernel lacks stays unavailable
        assert!(ladder(&p, "unpin_user_page").is_some() && ladder(&p, "page_cache_pipe_buf_release").is_some());
        assert!(matches!(p.iter().find(|h| h.symbol == "bio_release_pages").unwrap().choice, Choice::Unavailable { .. }));
    }

    #[test]
    fn an_explicit_attach_type_the_kernel_refuses_is_an_error() {
        assert!(check_mode(&caps(false, false), AttachMode::Auto).is_ok());
        assert!(check_mode(&caps(true, true), AttachMode::Kprobe).is_ok());
        let err = check_mode(&caps(true, false), AttachMode::Kprobe).unwrap_err();
        assert!(err.contains("--attach kprobe") && err.contains("refused"), "{err}");
        assert!(check_mode(&caps(false, true), AttachMode::Fentry).is_err());
    }

    #[test]
    fn fexit_program_carries_the_argument_count() {
        let gup = HOOKS.iter().find(|h| h.symbol == "pin_user_pages").unwrap();
        assert_eq!(gup.ret_program(AttachType::Fentry, Some(5)).as_deref(), Some("fexit_pin_user_pages_5"));
        assert_eq!(gup.ret_program(AttachType::Kprobe, Some(5)).as_deref(), Some("gup_return"));
        let unpin = HOOKS.iter().find(|h| h.symbol == "unpin_user_pages").unwrap();
        assert_eq!(unpin.ret_program(AttachType::Fentry, Some(2)).as_deref(), Some("fexit_unpin_user_pages"));
        let tp = HOOKS.iter().find(|h| h.symbol == "writeback_dirty_folio").unwrap();
        assert_eq!(tp.program(AttachType::RawTracepoint, true), "writeback_dirty_folio_kpins");
        assert_eq!(tp.program(AttachType::RawTracepoint, false), "writeback_dirty_folio");
    }
}
