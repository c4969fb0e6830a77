//! `pinwatch record`: live events to a JSON-lines trace file.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use anyhow::Result;
use tokio::time::sleep;

use crate::{
    args,
    kernel::{stream::monotonic_ns, Streaming},
    live::{
        session::{LimitArgs, Session},
        Live, StopReason, Wake,
    },
    trace::{self, Event, Stop, Writer},
};

#[derive(clap::Args, Debug)]
#[command(after_help = "Exit status: the recorded command's status when one is given (128 + signal if a signal \
ended it); otherwise 0 when the recording ends (--duration, SIGINT, SIGTERM, SIGHUP); 2 on an error.")]
pub struct RecordArgs {
    /// Trace file to write (JSON lines; zstd-compressed when the name ends in .zst),
    /// created readable by its owner only.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Replace the trace file if it exists.
    #[arg(long)]
    pub force: bool,
    /// Stop after this long: 30s, 5m, 1h, or a number of seconds.
    #[arg(short, long, value_parser = args::duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub kernel: crate::args::LiveArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// The bench's floor: attach every hook with programs that return at once (the
    /// trace then holds its start and stop only).
    #[arg(long, hide = true)]
    pub floor: bool,
    /// The bench's split of record's cost: `ring` reads and decodes every record and
    /// drops it, `engine` also runs the engine, `trace` (the default) writes it too.
    #[arg(long, hide = true, value_enum, default_value_t = Stage::Trace)]
    pub stage: Stage,
    /// Run this command and record while it runs.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Ring,
    Engine,
    Trace,
}

/// Time given to releases that complete just after the command exits (I/O completions,
/// page frees at exit) before the ring is drained for the last time.
const GRACE: Duration = Duration::from_millis(500);

pub async fn run(args: RecordArgs) -> Result<i32> {
    let signals = Live::signals()?;
    // The file is made before anything is attached: a bad path fails in a moment.
    let file = trace::create(&args.output, args.force)?;
    let streaming = if args.floor { Streaming::Floor } else { Streaming::All };
    let session = match Session::open(args.kernel, &args.limits, streaming, false) {
        Ok(s) => s,
        Err(e) => {
            file.discard();
            return Err(e);
        }
    };
    let mut writer = file.writer()?;
    writer.write(&session.start_event())?;
    // On disk at once, then every tick and after every hazard: a kill -9 or a crash
    // loses at most the last second, never a hazard already seen.
    writer.flush()?;
    let mut live = Live::new(session, signals, Duration::from_secs(1), args.duration);
    live.spawn(&args.command)?;

    let mut batch = Vec::new();
    let stage = args.stage;
    let write = |session: &mut Session, batch: &mut Vec<Event>, writer: &mut Writer| -> Result<()> {
        match stage {
            Stage::Ring => {
                batch.clear();
                return Ok(());
            }
            Stage::Engine => {
                session.apply_batch(batch);
                return Ok(());
            }
            Stage::Trace => {}
        }
        let out = session.apply_batch(batch);
        out.iter().try_for_each(|e| writer.write(e))?;
        if out.iter().any(|e| matches!(e, Event::Hazard(_))) {
            writer.flush()?;
        }
        Ok(())
    };
    let why = loop {
        match live.next(&mut batch).await? {
            Wake::Records | Wake::Reload | Wake::User1 => {}
            Wake::Tick => {
                for e in live.session.tick(&BTreeSet::new(), false)?.events {
                    writer.write(&e)?;
                }
                writer.flush()?;
            }
            Wake::Stop(why) => break why,
        }
        write(&mut live.session, &mut batch, &mut writer)?;
    };
    if let StopReason::Signal(s) = why {
        eprintln!("pinwatch: signal {s} received: ending the recording");
    }
    let child = live.finish_child(why).await;
    sleep(GRACE).await;
    let session = &mut live.session;
    session.drain(&mut batch);
    write(session, &mut batch, &mut writer)?;
    session.reconcile_at_end();
    for e in session.tick(&BTreeSet::new(), false)?.events {
        writer.write(&e)?;
    }
    let held = session.engine.pins.held();
    let counts = &session.engine.hazards.counts;
    let hazards = counts.iter().map(|(k, n)| (k.name().to_string(), *n)).collect();
    writer.write(&Event::Stop(Stop { ts_ns: monotonic_ns(), lost_total: session.lost_total(), held: held.clone(), hazards }))?;
    writer.finish()?;
    let pages: u64 = held.iter().map(|h| h.pages).sum();
    let nhaz: u64 = counts.values().sum();
    eprintln!(
        "pinwatch: trace written to {}; {} lost (records, pages or stacks: the trace's lost events say which); {} hazard(s); {} page reference(s) still held by {} process(es)",
        args.output.display(),
        session.lost_total(),
        nhaz,
        pages,
        held.len()
    );
    Ok(child.unwrap_or(0))
}
