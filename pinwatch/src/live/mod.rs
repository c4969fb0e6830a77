//! The live loop that record, top and alert share: the session's records, the tick, the
//! signals that end a run (INT, TERM, HUP), the command being recorded and the deadline.
//! A mode asks `Live::next` what happened and does its own part (write, draw); how a
//! live run starts and ends is decided here, once.

pub mod session;

use std::{process::ExitStatus, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    process::Child,
    signal::unix::{signal, Signal, SignalKind},
    time::{sleep_until, Instant, Interval},
};

use session::Session;

use crate::trace::Event;

/// What woke the loop.
pub enum Wake {
    /// Records arrived; they are in the batch passed to `next`.
    Records,
    /// The tick: periodic work (drop counters, limits, a refresh).
    Tick,
    /// SIGHUP, where the mode reloads its configuration (alert) rather than stop.
    Reload,
    /// SIGUSR1, where the mode asked for it (alert: write an incident bundle now).
    User1,
    /// The run is over.
    Stop(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT, SIGTERM or SIGHUP reached pinwatch (its number).
    Signal(i32),
    /// The recorded command ended.
    ChildExited,
    /// --duration ran out.
    Deadline,
}

/// How long a recorded command may take to end after pinwatch passed it a signal.
const CHILD_GRACE: Duration = Duration::from_secs(10);

pub struct Live {
    pub session: Session,
    tick: Interval,
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
    child: Option<Child>,
    child_status: Option<ExitStatus>,
    deadline: Option<Instant>,
    /// SIGHUP asks for a reload instead of ending the run.
    hangup_reloads: bool,
    /// SIGUSR1's handler, where the mode wants it.
    user1: Option<Signal>,
    /// Records since the heap was last given back (see give_back_after_burst).
    records_since_trim: usize,
}

/// Records since the last give-back past which the next tick gives the heap back.
const TRIM_AFTER_RECORDS: usize = 1024;

/// Gives the heap's free pages back to the kernel once a burst of records has been
/// digested (an io_uring registration of 512 MiB in base pages is about 2,000 records
/// of 64 pages, then the engine's references to them): the fixed trim threshold
/// (main.rs) returns only the free top of the heap, and what a burst freed below live
/// blocks stayed resident, so a daemon kept the peak of its worst burst as its RSS.
/// `malloc_trim` returns free pages anywhere in the heap; a tick after fewer records
/// costs nothing.
fn give_back_after_burst(records: &mut usize) {
    if *records < TRIM_AFTER_RECORDS {
        return;
    }
    *records = 0;
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only hands free memory of the allocator back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Live {
    /// Signal handlers are installed first, so that a signal arriving while the
    /// programs load (seconds under a slow verifier) still ends the run cleanly.
    pub fn signals() -> Result<(Signal, Signal, Signal)> {
        Ok((
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        ))
    }

    pub fn new(session: Session, signals: (Signal, Signal, Signal), every: Duration, deadline: Option<Duration>) -> Live {
        let (interrupt, terminate, hangup) = signals;
        Live {
            session,
            tick: tokio::time::interval(every),
            interrupt,
            terminate,
            hangup,
            child: None,
            child_status: None,
            deadline: deadline.and_then(|d| Instant::now().checked_add(d)),
            hangup_reloads: false,
            user1: None,
            records_since_trim: 0,
        }
    }

    /// SIGUSR1 wakes the mode with `Wake::User1`.
    pub fn on_user1(mut self) -> Result<Live> {
        self.user1 = Some(signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?);
        Ok(self)
    }

    /// SIGHUP wakes the mode with `Wake::Reload` (a daemon's convention) instead of
    /// ending the run.
    pub fn reload_on_hangup(mut self) -> Live {
        self.hangup_reloads = true;
        self
    }

    /// Starts the command to record; the run ends when it does.
    pub fn spawn(&mut self, command: &[String]) -> Result<()> {
        if let Some((prog, rest)) = command.split_first() {
            let child = tokio::process::Command::new(prog).args(rest).spawn().with_context(|| format!("starting {prog}"))?;
            self.child = Some(child);
        }
        Ok(())
    }

    /// Waits for the next thing to happen. Cancel-safe: a mode may select on it beside
    /// its own sources (top's keyboard).
    pub async fn next(&mut self, batch: &mut Vec<Event>) -> Result<Wake> {
        let child_running = self.child.is_some() && self.child_status.is_none();
        tokio::select! {
            r = self.session.next_batch(batch) => r.map(|_| {
                self.records_since_trim += batch.len();
                Wake::Records
            }),
            _ = self.tick.tick() => {
                give_back_after_burst(&mut self.records_since_trim);
                Ok(Wake::Tick)
            }
            _ = self.interrupt.recv() => Ok(Wake::Stop(StopReason::Signal(libc::SIGINT))),
            _ = self.terminate.recv() => Ok(Wake::Stop(StopReason::Signal(libc::SIGTERM))),
            _ = self.hangup.recv() => Ok(if self.hangup_reloads { Wake::Reload } else { Wake::Stop(StopReason::Signal(libc::SIGHUP)) }),
            _ = async { self.user1.as_mut().expect("guarded").recv().await }, if self.user1.is_some() => Ok(Wake::User1),
            status = async { self.child.as_mut().expect("guarded").wait().await }, if child_running => {
                self.child_status = Some(status.context("waiting for the recorded command")?);
                Ok(Wake::Stop(StopReason::ChildExited))
            }
            _ = async { sleep_until(self.deadline.expect("guarded")).await }, if self.deadline.is_some() => Ok(Wake::Stop(StopReason::Deadline)),
        }
    }

    /// Ends the recorded command when the run ends for another reason: the signal that
    /// stopped pinwatch is passed on (SIGTERM at the deadline), then pinwatch waits for
    /// the command, and kills it if it is still there after a grace period. Returns the
    /// command's exit code in the shell's convention (128 + signal), if there was one.
    pub async fn finish_child(&mut self, why: StopReason) -> Option<i32> {
        let child = self.child.as_mut()?;
        if self.child_status.is_none() {
            let signo = match why {
                StopReason::Signal(s) => s,
                _ => libc::SIGTERM,
            };
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on the pid of our own child, not yet reaped.
                unsafe { libc::kill(pid as i32, signo) };
            }
            let status = match tokio::time::timeout(CHILD_GRACE, child.wait()).await {
                Ok(s) => s.ok(),
                Err(_) => {
                    eprintln!("pinwatch: the recorded command did not end within {CHILD_GRACE:?} of the signal: killing it");
                    let _ = child.kill().await;
                    child.wait().await.ok()
                }
            };
            self.child_status = status;
        }
        self.child_status.map(exit_code)
    }
}

/// A command's exit status as a shell reports it.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
