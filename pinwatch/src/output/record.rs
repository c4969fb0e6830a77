//! `pinwatch record`: live events to a JSON-lines trace file.

use std::{fs::File, io::BufWriter, path::PathBuf, time::Duration};

use anyhow::{bail, Context as _, Result};
use tokio::time::{sleep, Instant};

use crate::{
    engine::Engine,
    kernel::{
        plan::{blind_roles, AttachMode, Choice, Mode, Role},
        stream::{monotonic_ns, LiveSource},
        Kernel,
    },
    trace::{Event, Start, Stop, Writer},
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
    /// Run this command and record while it runs.
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Time given to releases that complete just after the command exits (I/O completions,
/// page frees at exit) before the ring is drained for the last time.
const GRACE: Duration = Duration::from_millis(500);

pub async fn run(args: RecordArgs) -> Result<i32> {
    let mut kernel = Kernel::open(args.attach)?;
    let mode = kernel.attach()?;
    match mode {
        Mode::Full => {}
        Mode::TracepointOnly => eprintln!("pinwatch: {}", mode.explain()),
        Mode::Blind => {
            let why: Vec<String> = kernel
                .plan
                .iter()
                .filter(|h| h.role == Role::Acquire)
                .filter_map(|h| match &h.choice {
                    Choice::Unavailable { reason } => Some(reason.clone()),
                    _ => None,
                })
                .take(1)
                .collect();
            bail!(
                "pinwatch cannot see any GUP entry point on kernel {} ({}), and no tracepoint hazard hook attached either; nothing to record. `pinwatch doctor` shows what this kernel allows",
                kernel.release,
                why.first().map(String::as_str).unwrap_or("no hook")
            );
        }
    }
    let file = File::create(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    let mut writer = Writer::new(BufWriter::new(file));
    writer.write(&Event::Start(Start {
        version: env!("CARGO_PKG_VERSION").into(),
        kernel: kernel.release.clone(),
        hooks: kernel.hooks_in_use(),
        mode: mode.name().into(),
        blind: blind_roles(&kernel.plan).iter().map(|r| r.name().to_string()).collect(),
    }))?;
    let mut source = LiveSource::new(&mut kernel)?;
    let mut engine = Engine::default();

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
    let mut lost_total = 0u64;
    let mut write = |batch: &mut Vec<Event>, writer: &mut Writer<_>| -> Result<()> {
        for e in batch.drain(..) {
            if let Event::Lost(l) = &e {
                lost_total += l.count;
            }
            let hazards = engine.apply(&e);
            writer.write(&e)?;
            for h in hazards {
                writer.write(&Event::Hazard(h))?;
            }
        }
        Ok(())
    };
    loop {
        tokio::select! {
            r = source.next_batch(&mut batch) => r?,
            _ = tick.tick() => source.lost(&kernel, &mut batch)?,
            _ = tokio::signal::ctrl_c() => break,
            status = async { child.as_mut().expect("guarded").wait().await }, if child.is_some() => {
                let status = status?;
                exit_code = status.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
                break;
            }
            _ = async { sleep(deadline.expect("guarded") - Instant::now()).await }, if deadline.is_some() => break,
        }
        write(&mut batch, &mut writer)?;
    }
    sleep(GRACE).await;
    source.drain(&mut batch);
    source.flush(&mut batch);
    source.lost(&kernel, &mut batch)?;
    write(&mut batch, &mut writer)?;
    let held = engine.pins.held();
    let hazards = engine.hazards.counts.iter().map(|(k, n)| (k.name().to_string(), *n)).collect();
    writer.write(&Event::Stop(Stop { ts_ns: monotonic_ns(), lost_total, held: held.clone(), hazards }))?;
    writer.flush()?;
    let pages: u64 = held.iter().map(|h| h.pages).sum();
    let nhaz: u64 = engine.hazards.counts.values().sum();
    eprintln!(
        "pinwatch: trace written to {}; {} lost record(s); {} hazard(s); {} page reference(s) still held by {} process(es)",
        args.output.display(),
        lost_total,
        nhaz,
        pages,
        held.len()
    );
    Ok(exit_code)
}
