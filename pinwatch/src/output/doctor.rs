//! `pinwatch doctor`: what this kernel lets pinwatch see, tested by loading and
//! attaching, not guessed from the version.

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Table};
use serde::Serialize;

use crate::kernel::{
    btf::Layouts,
    plan::{covered_roles, AttachMode, Choice, Mode, PlannedHook, Role},
    load::Vmemmap,
    Kernel,
};

#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct DoctorArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
}

#[derive(Serialize)]
struct AttachTypeReport {
    name: &'static str,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct RoleReport {
    role: &'static str,
    visible: bool,
    what: &'static str,
}

#[derive(Serialize)]
struct Report {
    kernel: String,
    btf: bool,
    attach_types: Vec<AttachTypeReport>,
    layouts: Layouts,
    hooks: Vec<PlannedHook>,
    roles: Vec<RoleReport>,
    pfns: String,
    mode: Mode,
    mode_explained: &'static str,
    can_track_pins: bool,
    verdict: String,
}

pub fn run(args: DoctorArgs) -> Result<i32> {
    let mut kernel = Kernel::open(args.attach)?;
    let mode = kernel.attach()?;
    let covered = covered_roles(&kernel.plan);
    let can_track = covered.contains(&Role::Acquire);
    let attach_types = [("fentry", &kernel.caps.fentry), ("kprobe", &kernel.caps.kprobe), ("raw_tracepoint", &kernel.caps.raw_tracepoint)]
        .into_iter()
        .map(|(name, r)| AttachTypeReport { name, ok: r.is_ok(), error: r.clone().err() })
        .collect();
    let verdict = if can_track {
        "pinwatch can track pins on this kernel".to_string()
    } else {
        let k = kernel.caps.kprobe.clone().err().unwrap_or_default();
        let f = kernel.caps.fentry.clone().err().unwrap_or_default();
        format!(
            "pinwatch cannot track pins on this kernel: no GUP entry point can be hooked (kprobe: {k}; fentry: {f}). \
             GUP has no tracepoint, so without kprobes or fentry pins cannot be attributed to processes"
        )
    };
    let report = Report {
        kernel: kernel.release.clone(),
        btf: kernel.caps.btf,
        attach_types,
        layouts: kernel.layouts.clone(),
        roles: Role::ALL
            .into_iter()
            .map(|r| RoleReport { role: r.name(), visible: covered.contains(&r), what: r.what() })
            .collect(),
        mode,
        mode_explained: mode.explain(),
        hooks: kernel.plan.clone(),
        pfns: match &kernel.vmemmap {
            Vmemmap::Symbol(a) => format!("yes (vmemmap_base at {a:#x}, from kallsyms)"),
            Vmemmap::Calibrated(b) => format!("yes (vmemmap_base = {b:#x}, calibrated from mm_page_free: kallsyms lists no data symbols here)"),
            Vmemmap::Unknown(why) => format!("NO: vmemmap_base is not in /proc/kallsyms and calibration failed ({why}), so page pointers cannot become pfns"),
        },
        can_track_pins: can_track,
        verdict,
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print_text(&report),
    }
    Ok(if can_track { 0 } else { 1 })
}

fn print_text(r: &Report) {
    println!("kernel        {}", r.kernel);
    println!("BTF           {}", if r.btf { "present (/sys/kernel/btf/vmlinux)" } else { "MISSING" });
    println!(
        "layouts       struct page {} bytes, {} at +{}; FOLL_WRITE={:#x} FOLL_LONGTERM={:#x} FOLL_PIN={:#x} ({})",
        r.layouts.struct_page_size,
        r.layouts.compound_head_field,
        r.layouts.compound_head_off,
        r.layouts.foll.write,
        r.layouts.foll.longterm,
        r.layouts.foll.pin,
        r.layouts.foll_source
    );
    println!("pfns          {}", r.pfns);
    println!("\nattach types (tested by loading and attaching a program):");
    for a in &r.attach_types {
        match &a.error {
            None => println!("  {:<15} yes", a.name),
            Some(e) => println!("  {:<15} no: {e}", a.name),
        }
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(["ROLE", "SYMBOL", "ATTACH", "KERNELS"]);
    for h in &r.hooks {
        let how = match &h.choice {
            Choice::Use { attach, note: None } => attach.name().to_string(),
            Choice::Use { attach, note: Some(n) } => format!("{} (after {n})", attach.name()),
            Choice::Standby { instead } => format!("standby: {instead} serves"),
            Choice::Try { .. } => "not attached".to_string(),
            Choice::Unavailable { reason } => format!("- {reason}"),
        };
        t.add_row([h.role.name().to_string(), h.symbol.to_string(), how, h.kernels.to_string()]);
    }
    println!("\nhooks:\n{t}");
    println!("\nwhat pinwatch can see here:");
    for role in &r.roles {
        println!("  {:<10} {:<3} {}", role.role, if role.visible { "yes" } else { "NO" }, role.what);
    }
    println!("\nmode          {}: {}", r.mode.name(), r.mode_explained);
    println!("\n{}", r.verdict);
}
