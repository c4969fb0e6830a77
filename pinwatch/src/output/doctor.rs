//! `pinwatch doctor`: what this kernel lets pinwatch see, tested by loading and
//! attaching, not guessed from the version; said in words for people who do not know
//! eBPF (within 100 columns), and as structured JSON for machines.

use anyhow::Result;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use serde::Serialize;

use crate::kernel::{
    Streaming,
    btf::Layouts,
    load::{TaskCapacity, Vmemmap},
    plan::{covered_roles, Capabilities, Choice, Mode, PlannedHook, Role},
    Kernel,
};

/// Output format, the same flag on every command that prints for machines.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when pinwatch sees GUP calls here (full mode); 1 when it runs with less \
(tracepoint-only) or cannot run at all; 2 on an error.")]
pub struct DoctorArgs {
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    #[command(flatten)]
    pub kernel: crate::args::KernelArgs,
}

/// Text is wrapped to this width.
const WIDTH: usize = 100;

#[derive(Serialize)]
struct AttachTypeReport {
    name: &'static str,
    works: bool,
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
struct Pfns {
    /// Whether struct page pointers can become page frame numbers.
    available: bool,
    /// Where vmemmap_base came from: kallsyms, calibrated, or none. Its value is a
    /// randomized kernel address and is not shown.
    vmemmap_base_from: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct Report {
    kernel: String,
    btf: bool,
    mode: Mode,
    can_track_pins: bool,
    /// Roles watched here, and roles no hook serves.
    sees: Vec<&'static str>,
    blind: Vec<&'static str>,
    attach_types: Vec<AttachTypeReport>,
    pfns: Pfns,
    /// Folios the kernel-side pin map holds (--pin-map-capacity).
    pin_map_capacity: u32,
    /// Blocks of 32 small folios the long-term pin map holds (sized from the host).
    pin_block_capacity: u32,
    /// The maps of calls in flight, per-process counts and enforcement are allocated as
    /// they fill (6.1 and later), not whole at start.
    maps_on_demand: bool,
    /// Threads inside GUP at once and live processes with GUP activity the per-task maps
    /// hold (sized from the host's CPUs where they are preallocated).
    task_capacity: TaskCapacity,
    /// How the programs read struct pages and page arrays: "bpf_rdonly_cast" (guarded
    /// loads, 6.2+) or "bpf_probe_read_kernel".
    reads_kernel_words_by: &'static str,
    layouts: Layouts,
    hooks: Vec<PlannedHook>,
    roles: Vec<RoleReport>,
    /// The verdict in sentences, as the text output prints it.
    verdict: Vec<String>,
    /// What `pinwatch alert` can do about a limit broken here.
    enforcement: Enforcement,
}

/// The ways a kernel offers to act on a limit breach, and which pinwatch uses.
#[derive(Serialize)]
struct Enforcement {
    /// stop and kill: bpf_send_signal from the GUP return program (5.3+), where GUP
    /// calls are hooked.
    send_signal: bool,
    /// Whether GUP functions can be made to fail (error injection, bpf_override_return):
    /// None when debugfs does not say.
    gup_error_injection: Option<bool>,
    /// The BPF LSM is active (in /sys/kernel/security/lsm). pinwatch does not use it:
    /// no LSM hook sits on GUP.
    bpf_lsm: Option<bool>,
    /// cgroup v2 with cgroup.freeze (5.2+): freeze.
    cgroup_freeze: bool,
}

fn enforcement(can_track_pins: bool) -> Enforcement {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let gup = ["get_user_pages", "pin_user_pages", "__get_user_pages", "__gup_longterm_locked", "pin_user_pages_fast"];
    let gup_error_injection = read("/sys/kernel/debug/error_injection/list")
        .map(|l| l.lines().any(|line| line.split_whitespace().next().is_some_and(|f| gup.contains(&f))))
        // debugfs mounted without the list: the kernel has no function error injection.
        .or_else(|| std::fs::read_dir("/sys/kernel/debug").ok().and_then(|mut d| d.next()).map(|_| false));
    // Non-root cgroups have cgroup.freeze from 5.2 on; the root never has one.
    let root = crate::kernel::procs::cgroup2_root();
    let release = crate::kernel::release();
    let mut v = release.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u32>().ok());
    let since_5_2 = (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (5, 2);
    let cgroup_freeze = root.join("cgroup.controllers").exists()
        && (since_5_2 || std::fs::read_dir(&root).into_iter().flatten().flatten().any(|e| e.path().join("cgroup.freeze").exists()));
    Enforcement {
        send_signal: can_track_pins,
        gup_error_injection,
        bpf_lsm: read("/sys/kernel/security/lsm").map(|l| l.split(',').any(|m| m.trim() == "bpf")),
        cgroup_freeze,
    }
}

pub fn run(args: DoctorArgs) -> Result<i32> {
    let mut kernel = Kernel::open(&args.kernel.load_options(), Streaming::Monitor)?;
    let mode = kernel.attach()?;
    let report = report(&kernel, mode);
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => print!("{}", text(&report)),
    }
    Ok(if mode == Mode::Full { 0 } else { 1 })
}

/// doctor's JSON for a kernel already attached (the daemon's incident bundles).
pub fn json(kernel: &Kernel, mode: Mode) -> String {
    serde_json::to_string_pretty(&report(kernel, mode)).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn report(kernel: &Kernel, mode: Mode) -> Report {
    let covered = covered_roles(&kernel.plan);
    Report {
        kernel: kernel.release.clone(),
        btf: kernel.caps.btf,
        mode,
        can_track_pins: covered.contains(&Role::Acquire),
        sees: Role::ALL.into_iter().filter(|r| covered.contains(r)).map(Role::name).collect(),
        blind: Role::ALL.into_iter().filter(|r| !covered.contains(r)).map(Role::name).collect(),
        attach_types: [("fentry", &kernel.caps.fentry), ("kprobe", &kernel.caps.kprobe), ("raw_tracepoint", &kernel.caps.raw_tracepoint)]
            .into_iter()
            .map(|(name, r)| AttachTypeReport { name, works: r.is_ok(), error: r.clone().err() })
            .collect(),
        pfns: match &kernel.vmemmap {
            Vmemmap::Symbol(_) => Pfns { available: true, vmemmap_base_from: "kallsyms", error: None },
            Vmemmap::Calibrated(_) => Pfns { available: true, vmemmap_base_from: "calibrated", error: None },
            Vmemmap::Unknown(why) => Pfns { available: false, vmemmap_base_from: "none", error: Some(why.clone()) },
        },
        pin_map_capacity: kernel.pin_map_capacity,
        pin_block_capacity: kernel.block_capacity,
        maps_on_demand: kernel.maps_on_demand,
        task_capacity: kernel.tasks,
        reads_kernel_words_by: if kernel.direct_reads { "bpf_rdonly_cast" } else { "bpf_probe_read_kernel" },
        layouts: kernel.layouts.clone(),
        hooks: kernel.plan.clone(),
        roles: Role::ALL.into_iter().map(|r| RoleReport { role: r.name(), visible: covered.contains(&r), what: r.what() }).collect(),
        verdict: verdict(mode, &covered, &kernel.caps),
        enforcement: enforcement(covered.contains(&Role::Acquire)),
    }
}

/// What works and what does not, in sentences for someone who does not know eBPF.
fn verdict(mode: Mode, covered: &[Role], caps: &Capabilities) -> Vec<String> {
    let list = |keep: bool| -> String {
        let v: Vec<&str> = Role::ALL.into_iter().filter(|r| covered.contains(r) == keep).map(Role::plain).collect();
        if v.is_empty() { "nothing".into() } else { v.join("; ") }
    };
    let why = || -> String {
        let mut v = Vec::new();
        if let Err(e) = &caps.kprobe {
            v.push(format!("kprobes: {e}"));
        }
        if let Err(e) = &caps.fentry {
            v.push(format!("fentry: {e}"));
        }
        v.join("; ")
    };
    match mode {
        Mode::Full => vec![
            "pinwatch works fully here: it sees who pins which pages, and when the kernel treats a pinned page as an ordinary one."
                .into(),
            format!("It sees: {}.", list(true)),
            if covered.len() == Role::ALL.len() { "Nothing is hidden from it.".into() } else { format!("It cannot see: {}.", list(false)) },
        ],
        Mode::TracepointOnly => vec![
            "pinwatch runs here with less: `record` and `top` work, but cannot say who pinned a page.".into(),
            format!("It sees: {}, for pages the kernel itself counts as DMA-pinned (FOLL_PIN).", list(true)),
            format!("It cannot see: {}.", list(false)),
            format!(
                "Why: watching who pins needs kprobes or fentry on the kernel's pinning functions, and the kernel has \
                 no tracepoint for them. Here {}.",
                why()
            ),
            "top still shows each process's pinned memory as the kernel counts it (VmPin).".into(),
        ],
        Mode::Blind => vec![
            "pinwatch cannot watch anything on this kernel: no way of hooking it worked.".into(),
            format!("Why: {}; raw tracepoints: {}.", why(), caps.raw_tracepoint.clone().err().unwrap_or_else(|| "no hook attached".into())),
        ],
    }
}

fn wrap(out: &mut String, text: &str, indent: &str) {
    let opts = textwrap::Options::new(WIDTH).initial_indent(indent).subsequent_indent(indent);
    for line in textwrap::wrap(text, opts) {
        out.push_str(&line);
        out.push('\n');
    }
}

fn text(r: &Report) -> String {
    let mut out = format!("pinwatch doctor: Linux {}\n\n", r.kernel);
    for sentence in &r.verdict {
        wrap(&mut out, sentence, "");
    }
    out += "\nWhat pinwatch can see here:\n";
    for role in &r.roles {
        let mark = if role.visible { "yes" } else { "NO " };
        wrap(&mut out, &format!("{mark}  {:<10} {}", role.role, role.what), "");
    }
    out += "\nWays of hooking the kernel (each tested by loading and attaching a program):\n";
    for a in &r.attach_types {
        let line = match &a.error {
            None => format!("{:<15} yes", a.name),
            Some(e) => format!("{:<15} no: {e}", a.name),
        };
        let opts = textwrap::Options::new(WIDTH).initial_indent("  ").subsequent_indent("                     ");
        textwrap::wrap(&line, opts).iter().for_each(|l| {
            out.push_str(l);
            out.push('\n');
        });
    }
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_width(WIDTH as u16)
        .set_header(["ROLE", "KERNEL FUNCTION", "HOW IT IS WATCHED HERE"]);
    for h in &r.hooks {
        let how = match &h.choice {
            Choice::Use { attach, note: None } => attach.name().to_string(),
            Choice::Use { attach, note: Some(n) } => format!("{} (after {n})", attach.name()),
            Choice::Standby { instead } => format!("standby: {instead} serves"),
            Choice::Try { .. } => "not attached".to_string(),
            Choice::Unavailable { reason } => format!("not watched: {reason}"),
        };
        t.add_row([h.role.name().to_string(), h.symbol.to_string(), how]);
    }
    out += &format!("\nHooks:\n{t}\n");
    out += "\nKernel facts:\n";
    wrap(&mut out, &format!("BTF: {}", if r.btf { "present (/sys/kernel/btf/vmlinux)" } else { "MISSING" }), "  ");
    let l = &r.layouts;
    wrap(
        &mut out,
        &format!(
            "struct page: {} bytes, {} at +{}{}; FOLL_WRITE={:#x} FOLL_LONGTERM={:#x} FOLL_PIN={:#x} (from {})",
            l.struct_page_size,
            l.compound_head_field,
            l.compound_head_off,
            if l.compound_info_mask { " (a mask on tail pages)" } else { "" },
            l.foll.write,
            l.foll.longterm,
            l.foll.pin,
            l.foll_source
        ),
        "  ",
    );
    let pfns = match (r.pfns.available, r.pfns.vmemmap_base_from, &r.pfns.error) {
        (true, "kallsyms", _) => "page frame numbers: yes (vmemmap_base from kallsyms)".to_string(),
        (true, _, _) => "page frame numbers: yes (vmemmap_base calibrated from page frees: kallsyms lists no data symbols here)".to_string(),
        (false, _, e) => format!(
            "page frame numbers: NO: vmemmap_base is not in /proc/kallsyms and calibration failed ({}), so pages cannot be named",
            e.as_deref().unwrap_or("")
        ),
    };
    wrap(&mut out, &pfns, "  ");
    wrap(
        &mut out,
        &format!(
            "pin map: {} folios ({} of base pages at once; pins past it are counted as pin_map_full, not watched), \
             and {} blocks of 32 pages for long-term pins of small folios ({}; a pin that finds no block goes into the pin map); \
             both are allocated whole at start; the maps of calls in flight ({} threads inside GUP at once) and of per-process counts \
             ({} processes; past either, calls are counted as call_map_full or proc_map_full), and enforcement's, {}{}",
            r.pin_map_capacity,
            bytesize::ByteSize::b(r.pin_map_capacity as u64 * 4096),
            r.pin_block_capacity,
            bytesize::ByteSize::b(r.pin_block_capacity as u64 * 32 * 4096),
            r.task_capacity.calls,
            r.task_capacity.procs,
            if r.maps_on_demand {
                "are allocated as they fill"
            } else {
                "are too, sized from the host's CPUs (before 6.1 the verifier warns about maps allocated as they fill in tracing programs)"
            },
            if r.task_capacity.call_slots > 0 {
                format!(
                    "; in front of the map of calls in flight, {} call slots, one per thread id modulo their number, take a call for a few loads \
                     where the map costs a hash insert and delete (a thread whose slot is another's goes to the map)",
                    r.task_capacity.call_slots
                )
            } else {
                "; no call slots in front of the map of calls in flight (they need BPF compare-and-swap, 5.12+)".to_string()
            },
        ),
        "  ",
    );
    wrap(&mut out, &format!("mode: {}", r.mode.name()), "  ");
    out += "\nEnforcement (`pinwatch alert`'s limit actions):\n";
    let e = &r.enforcement;
    wrap(
        &mut out,
        &if e.send_signal {
            "stop, kill: yes, from the kernel at the GUP call that goes over the cap (bpf_send_signal)".to_string()
        } else {
            "stop, kill: no, GUP calls cannot be hooked here".to_string()
        },
        "  ",
    );
    wrap(&mut out, if e.cgroup_freeze { "freeze: yes (cgroup v2 cgroup.freeze)" } else { "freeze: no (no cgroup v2 with cgroup.freeze)" }, "  ");
    wrap(
        &mut out,
        match e.gup_error_injection {
            Some(true) => "failing the pinning call itself: possible here (error injection lists a GUP function), not used by pinwatch",
            Some(false) => "failing the pinning call itself: no, no GUP function allows error injection: enforcement stops the offender, not the pin",
            None => "failing the pinning call itself: unknown (debugfs not mounted); Debian's kernels do not allow it",
        },
        "  ",
    );
    wrap(
        &mut out,
        match e.bpf_lsm {
            Some(true) => "BPF LSM: active, unused: no LSM hook sits on the pinning calls",
            Some(false) => "BPF LSM: not active (not in /sys/kernel/security/lsm); pinwatch does not need it",
            None => "BPF LSM: unknown (securityfs not mounted); pinwatch does not need it",
        },
        "  ",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fits_in_100_columns_and_says_what_works() {
        let long = "the kernel refuses tracing programs (BPF_PROG_LOAD of an fentry program: EPERM) ".repeat(8);
        let caps = Capabilities { btf: true, fentry: Err(long.clone()), kprobe: Err("this kernel has no kprobe support".into()), raw_tracepoint: Ok(()) };
        let covered = vec![Role::Truncate, Role::Dirty];
        let syms = crate::kernel::symbols::Symbols::from_names(&["pin_user_pages_fast"]);
        let r = Report {
            kernel: "6.18.0".into(),
            btf: true,
            mode: Mode::TracepointOnly,
            can_track_pins: false,
            sees: vec!["truncate", "dirty"],
            blind: vec![],
            attach_types: vec![AttachTypeReport { name: "fentry", works: false, error: Some(long) }],
            pfns: Pfns { available: false, vmemmap_base_from: "none", error: Some("x".repeat(300)) },
            pin_map_capacity: 16,
            pin_block_capacity: 1024,
            maps_on_demand: false,
            task_capacity: crate::kernel::load::task_capacity(2, false),
            reads_kernel_words_by: "bpf_probe_read_kernel",
            layouts: Layouts::default(),
            hooks: crate::kernel::plan::plan(&syms, &caps, crate::kernel::plan::AttachMode::Auto),
            roles: Role::ALL.into_iter().map(|r| RoleReport { role: r.name(), visible: covered.contains(&r), what: r.what() }).collect(),
            verdict: verdict(Mode::TracepointOnly, &covered, &caps),
            enforcement: Enforcement { send_signal: false, gup_error_injection: Some(false), bpf_lsm: Some(true), cgroup_freeze: true },
        };
        let t = text(&r);
        for line in t.lines() {
            assert!(line.chars().count() <= WIDTH, "{} columns: {line}", line.chars().count());
        }
        assert!(t.contains("`record` and `top` work"), "{t}");
        assert!(t.contains("It cannot see: who pins which pages"), "{t}");
        assert!(t.contains("stop, kill: no, GUP calls cannot be hooked here"), "{t}");
        let flat = t.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("enforcement stops the offender, not the pin"), "{t}");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["pfns"]["available"], false);
        assert_eq!(json["sees"], serde_json::json!(["truncate", "dirty"]));
    }
}
