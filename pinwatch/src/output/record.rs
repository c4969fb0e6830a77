//! `pinwatch record`: live events to a JSON-lines trace file.

use std::{collections::BTreeSet, fs::File, io::BufWriter, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use tokio::time::{sleep, Instant};

use super::session::{LimitArgs, Session};
use crate::{
    kernel::{plan::AttachMode, stream::monotonic_ns},
    trace::{Event, Stop, Writer},
};

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Trace file to write (JSON lines).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Stop after this many seconds.
    #[arg(short, long)]
    pub duration: Option<f64>,
    /// Attach types to allow.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Run this command and record while it runs.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Time given to releases that complete just after the command exits (I/O completions,
/// page frees at exit) before the ring is drained for the last time.
const GRACE: Duration = Duration::from_millis(500);

pub async fn run(args: RecordArgs) -> Result<i32> {
    let mut session = Session::open(args.attach, &args.limits)?;
    let file = File::create(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    let mut writer = Writer::new(BufWriter::new(file));
    writer.write(&session.start_event())?;

    let mut child = match args.command.split_first() {
        Some((prog, rest)) => Some(
            tokio::process::Command::new(prog)
                .args(rest)
                .spawn()
                .with_context(|| format!("starting {prog}"))?,
        ),
        None => None,
    };
    let deadline = args.duration.map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = Vec::new();
    let mut exit_code = 0;
    let write = |session: &mut Session, batch: &mut Vec<Event>, writer: &mut Writer<_>| -> Result<()> {
        let mut out = Vec::new();
        for e in batch.drain(..) {
            session.apply(e, &mut out);
        }
        out.iter().try_for_each(|e| writer.write(e))
    };
    loop {
        tokio::select! {
            r = session.next_batch(&mut batch) => r?,
            _ = tick.tick() => {
                for e in session.tick(&BTreeSet::new(), false)?.events {
                    writer.write(&e)?;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            status = async { child.as_mut().expect("guarded").wait().await }, if child.is_some() => {
                let status = status?;
                exit_code = status.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
                break;
            }
            _ = async { sleep(deadline.expect("guarded") - Instant::now()).await }, if deadline.is_some() => break,
        }
        write(&mut session, &mut batch, &mut writer)?;
    }
    sleep(GRACE).await;
    session.drain(&mut batch);
    write(&mut session, &mut batch, &mut writer)?;
    for e in session.tick(&BTreeSet::new(), false)?.events {
        writer.write(&e)?;
    }
    let held = session.engine.pins.held();
    let counts = &session.engine.hazards.counts;
    let hazards = counts.iter().map(|(k, n)| (k.name().to_string(), *n)).collect();
    writer.write(&Event::Stop(Stop { ts_ns: monotonic_ns(), lost_total: session.lost_total, held: held.clone(), hazards }))?;
    writer.flush()?;
    let pages: u64 = held.iter().map(|h| h.pages).sum();
    let nhaz: u64 = counts.values().sum();
    eprintln!(
        "pinwatch: trace written to {}; {} lost (records, pages or stacks: the trace's lost events say which); {} hazard(s); {} page reference(s) still held by {} process(es)",
        args.output.display(),
        session.lost_total,
        nhaz,
        pages,
        held.len()
    );
    Ok(exit_code)
}
