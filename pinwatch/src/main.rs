//! pinwatch: who holds DMA pins on which pages, and when the kernel treats a pinned
//! page as an ordinary one.
//!
//! Data flows one way: `kernel` (everything that touches the running kernel) -> `live`
//! (the loop record, top and alert share) -> `engine` (pure state and rules) -> `output` (the
//! modes and what they write). `trace` is the JSON-lines contract; `args` the values
//! people type.

mod args;
mod engine;
mod kernel;
mod live;
mod output;
mod trace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pinwatch",
    version,
    about = "Who holds DMA pins on which pages of memory",
    after_help = "Exit status: 0 on success; 1 where a command found something to report (doctor: reduced \
visibility; report: a trace whose hazards do not replay); record with a command exits with the command's \
status; 2 on an error, such as a bad option, a missing privilege or an unreadable file."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Record pin events to a JSON-lines trace.
    Record(output::record::RecordArgs),
    /// Say what pinwatch can see on this kernel.
    Doctor(output::doctor::DoctorArgs),
    /// Pinned memory per process, live, beside the kernel's own figures.
    Top(output::top::TopArgs),
    /// The fleet daemon: alerts as JSON lines and Prometheus metrics, until stopped.
    Alert(output::alert::AlertArgs),
    /// Replay a recorded trace through the engine: its hazards, and their story.
    Report(output::report::ReportArgs),
    /// Turn a trace into a timeline people open: Perfetto's JSON, or an HTML page.
    Export(output::export::ExportArgs),
    /// Prove a running daemon's detection: provoke a benign hazard on memory of its own
    /// and check the daemon's metric and alert line.
    Selftest(output::selftest::SelftestArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (pinwatch.1 and one per command) into a directory.
    #[command(hide = true)]
    Man { dir: std::path::PathBuf },
}

/// The man pages: pinwatch.1, then pinwatch-COMMAND.1 for each command.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<i32> {
    use anyhow::Context as _;
    use clap::CommandFactory as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let cmd = Cli::command();
    let write = |name: &str, c: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(c).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))
    };
    write("pinwatch", cmd.clone())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("pinwatch-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    Ok(0)
}

/// Runs a live mode on a single-threaded runtime: one reader of one ring buffer.
fn live(mode: impl std::future::Future<Output = anyhow::Result<i32>>) -> anyhow::Result<i32> {
    fixed_malloc_thresholds();
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(mode)
}

/// A live mode runs for days. glibc raises its mmap and trim thresholds each time a large
/// block is freed (up to 32 and 64 MiB), after which freed memory stays in the heap:
/// the parse of the kernel's BTF at start-up, or one burst of events, would then set
/// the daemon's RSS for good (one bench saw 27 MiB idle where the others saw 17).
/// Fixed thresholds keep large blocks in their own mappings, returned when freed, and
/// trim the heap's free top; the live loop gives back the free pages inside the heap
/// after a burst of records (live::give_back_after_burst).
fn fixed_malloc_thresholds() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets the allocator's parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

fn main() -> ExitCode {
    // `pinwatch doctor | head` should end quietly, as other Unix tools do, not panic.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Doctor(args) => output::doctor::run(args),
        Command::Report(args) => output::report::run(args),
        Command::Export(args) => output::export::run(args),
        Command::Record(args) => live(output::record::run(args)),
        Command::Top(args) => live(output::top::run(args)),
        Command::Alert(args) => live(output::alert::run(args)),
        Command::Selftest(args) => live(output::selftest::run(args)),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(shell, &mut Cli::command(), "pinwatch", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man { dir } => man_pages(&dir),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("pinwatch: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
