//! The attach plan: which kernel symbol serves which role, through which program and
//! attach type, on this kernel. It is data: doctor prints it, the loader follows it.

use serde::Serialize;

use super::symbols::Symbols;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// GUP entry points: who takes which pages.
    Acquire,
    /// unpin family and the FOLL_GET releases pinwatch can see.
    Release,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Acquire => "acquire",
            Role::Release => "release",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachType {
    Kprobe,
    RawTracepoint,
}

impl AttachType {
    pub fn name(self) -> &'static str {
        match self {
            AttachType::Kprobe => "kprobe",
            AttachType::RawTracepoint => "raw_tracepoint",
        }
    }
}

/// How a hook can attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A kernel function: kprobe (and kretprobe when `ret_program` is set).
    Function,
    /// A tracepoint, attached as a raw tracepoint.
    Tracepoint,
}

#[derive(Clone, Copy, Debug)]
pub struct HookSpec {
    pub role: Role,
    pub symbol: &'static str,
    pub family: Family,
    /// Program run on entry (or on the tracepoint).
    pub program: &'static str,
    /// Program run on return, for hooks that need one.
    pub ret_program: Option<&'static str>,
    /// Which kernels have it, for people reading the plan.
    pub kernels: &'static str,
}

const fn func(role: Role, symbol: &'static str, ret: Option<&'static str>, kernels: &'static str) -> HookSpec {
    HookSpec { role, symbol, family: Family::Function, program: symbol, ret_program: ret, kernels }
}

const GUP_RET: Option<&str> = Some("gup_return");
const UNPIN_RET: Option<&str> = Some("unpin_return");

/// Every hook pinwatch knows. The program names are the eBPF entry points.
pub const HOOKS: &[HookSpec] = &[
    func(Role::Acquire, "get_user_pages", GUP_RET, "all"),
    func(Role::Acquire, "pin_user_pages", GUP_RET, "all"),
    func(Role::Acquire, "get_user_pages_fast", GUP_RET, "all"),
    func(Role::Acquire, "pin_user_pages_fast", GUP_RET, "all"),
    func(Role::Acquire, "get_user_pages_fast_only", GUP_RET, "all"),
    func(Role::Acquire, "get_user_pages_remote", GUP_RET, "all"),
    func(Role::Acquire, "pin_user_pages_remote", GUP_RET, "all"),
    func(Role::Acquire, "get_user_pages_unlocked", GUP_RET, "all"),
    func(Role::Acquire, "pin_user_pages_unlocked", GUP_RET, "all"),
    func(Role::Release, "unpin_user_page", UNPIN_RET, "all"),
    func(Role::Release, "unpin_user_pages", UNPIN_RET, "all"),
    func(Role::Release, "unpin_user_pages_dirty_lock", UNPIN_RET, "all"),
    func(Role::Release, "unpin_user_page_range_dirty_lock", UNPIN_RET, "5.15+"),
    func(Role::Release, "unpin_folio", UNPIN_RET, "6.11+"),
    func(Role::Release, "unpin_folios", UNPIN_RET, "6.11+"),
    func(Role::Release, "unpin_user_folio", UNPIN_RET, "6.12+"),
    func(Role::Release, "bio_release_pages", None, "5.10 (FOLL_GET direct I/O)"),
    func(Role::Release, "__bio_release_pages", None, "5.15+ (FOLL_GET direct I/O up to 6.4)"),
    func(Role::Release, "page_cache_pipe_buf_release", None, "all (vmsplice'd pages)"),
    HookSpec {
        role: Role::Release,
        symbol: "mm_page_free",
        family: Family::Tracepoint,
        program: "mm_page_free",
        ret_program: None,
        kernels: "all (kmem tracepoint)",
    },
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
    /// Will attach (or did) with this type.
    Use { attach: AttachType },
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum AttachMode {
    #[default]
    Auto,
    Fentry,
    Kprobe,
}

/// Chooses an attach type for every hook. Pure: the caller supplies what exists
/// (symbols) and what works (capabilities).
pub fn plan(syms: &Symbols, caps: &Capabilities, mode: AttachMode) -> Vec<PlannedHook> {
    HOOKS
        .iter()
        .map(|spec| {
            let choice = match spec.family {
                Family::Tracepoint => match &caps.raw_tracepoint {
                    Ok(()) => Choice::Use { attach: AttachType::RawTracepoint },
                    Err(e) => Choice::Unavailable { reason: format!("raw tracepoints refused: {e}") },
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
    // The programs are kprobe/kretprobe programs; fentry twins are not built yet, so
    // `--attach fentry` says so instead of silently falling back.
    match (mode, &caps.kprobe) {
        (AttachMode::Fentry, _) => Choice::Unavailable { reason: "no fentry program for this hook in this build".into() },
        (_, Ok(())) => Choice::Use { attach: AttachType::Kprobe },
        (_, Err(_)) => Choice::Unavailable { reason: "kprobes unavailable (see attach types)".into() },
    }
}

/// Roles that have at least one hook in use.
pub fn covered_roles(plan: &[PlannedHook]) -> Vec<Role> {
    let mut roles: Vec<Role> = plan.iter().filter(|h| matches!(h.choice, Choice::Use { .. })).map(|h| h.role).collect();
    roles.sort();
    roles.dedup();
    roles
}
