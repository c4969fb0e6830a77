//! `pinwatch export TRACE --format perfetto|html -o FILE`: what people open after an
//! incident. A pure timeline (`timeline`), drawn as Perfetto's JSON (`perfetto`) or as
//! one self-contained page (`html`).

pub mod html;
pub mod perfetto;
pub mod timeline;

use std::{io::Write as _, path::PathBuf};

use anyhow::{Context as _, Result};

use super::filter::{Filter, FilterArgs};
use crate::trace;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// Chrome trace-event JSON: open it in ui.perfetto.dev or chrome://tracing.
    Perfetto,
    /// One HTML file with the timeline and the table of hazards: open it in a browser.
    Html,
}

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: 0 when the file is written; 1 when it is written but the trace was damaged or \
its recorded hazards differ from the replay; 2 on an error.")]
pub struct ExportArgs {
    /// A trace written by `pinwatch record` (plain or .zst); `-` reads standard input.
    pub trace: PathBuf,
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The file to write (created owner-only; --force replaces it).
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// Past this many pins (slices) a browser struggles: say so, and how to narrow.
const BROWSER_PINS: usize = 100_000;

pub fn run(args: ExportArgs) -> Result<i32> {
    let mut reader = trace::open(&args.trace)?;
    // Made first: a bad output path fails before the trace is read.
    let file = trace::create(&args.output, args.force)?;
    let mut builder = timeline::Builder::new(Filter::new(&args.filter));
    for e in reader.by_ref() {
        match e {
            Ok(e) => builder.feed(&e),
            Err(err) => {
                file.discard();
                return Err(err);
            }
        }
    }
    let t = builder.finish();
    if t.bars.len() > BROWSER_PINS {
        eprintln!(
            "pinwatch: warning: {} pins will make {} too big for a browser to open smoothly; narrow it with --pid, --since/--until or --kind",
            t.bars.len(),
            args.output.display()
        );
    }
    let mut out = std::io::BufWriter::new(file.into_file());
    match args.format {
        ExportFormat::Perfetto => perfetto::write(&t, &mut out)?,
        ExportFormat::Html => html::write(&t, &mut out)?,
    }
    out.flush().with_context(|| format!("writing {}", args.output.display()))?;
    let name = args.trace.display();
    for p in &reader.problems {
        eprintln!("pinwatch: {name}: {p}");
    }
    eprintln!(
        "pinwatch: {} written: {} pin(s), {} hazard(s), {} process(es), {:.3} s",
        args.output.display(),
        t.bars.len(),
        t.marks.len(),
        t.processes.len(),
        t.t1.saturating_sub(t.t0) as f64 / 1e9
    );
    Ok(if t.mismatched > 0 || reader.skipped > 0 || reader.cut_short { 1 } else { 0 })
}
