//! The live record stream: ring buffer to decoded events, plus the drop counters turned
//! into "lost" events so that nothing is lost silently.

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;

use super::{decode::Decoder, load::Counters, stack::Symbols, Kernel};
use crate::trace::{Event, Lost};

/// CLOCK_MONOTONIC in ns: the clock bpf_ktime_get_ns() reads, so user-side events sort
/// with kernel ones.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Records taken from the ring in one go: near what the 8 MiB ring holds of one-page
/// pin records (about 400 bytes each, so some 20,000), so a quiet ring is emptied in
/// one or two batches. Under a GUP storm the kernel refills the ring as fast as it is
/// read, and a batch without a bound grew until the kernel killed the process (the
/// lab's storm: record reached 468 MB and the OOM killer). A bounded batch goes through
/// the engine and out, and what the ring cannot hold meanwhile is counted as lost.
const MAX_BATCH: usize = 16384;

pub struct LiveSource {
    ring: AsyncFd<RingBuf<MapData>>,
    decoder: Decoder,
    symbols: Symbols,
    last: Counters,
    /// Records that could not be decoded (a bug, or mismatched builds): counted.
    pub undecodable: u64,
}

impl LiveSource {
    pub fn new(kernel: &mut Kernel) -> Result<Self> {
        // SAFETY: the ring owns its fd and lives inside the AsyncFd until both are dropped.
        let ring = unsafe { AsyncFd::register(kernel.take_ring()?) }
            .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
        Ok(LiveSource { ring, decoder: Decoder::new(kernel.layouts.foll), symbols: Symbols::load(), last: Counters::default(), undecodable: 0 })
    }

    /// Waits until records are ready, then takes them, at most MAX_BATCH. When more
    /// are left, the ring stays marked ready, so that the next call takes them at once.
    pub async fn next_batch(&mut self, out: &mut Vec<Event>) -> Result<()> {
        let mut guard = self.ring.readable_mut().await?;
        if !Self::take_all(guard.get_inner_mut(), &mut self.decoder, &mut self.symbols, &mut self.undecodable, out) {
            guard.clear_ready();
        }
        Ok(())
    }

    /// Takes what is in the ring now (at most MAX_BATCH), without waiting.
    pub fn drain(&mut self, out: &mut Vec<Event>) {
        Self::take_all(self.ring.get_mut(), &mut self.decoder, &mut self.symbols, &mut self.undecodable, out);
    }

    /// Takes records until the ring is empty or MAX_BATCH were taken; returns whether
    /// it stopped at the bound.
    fn take_all(ring: &mut RingBuf<MapData>, decoder: &mut Decoder, symbols: &mut Symbols, bad: &mut u64, out: &mut Vec<Event>) -> bool {
        let mut taken = 0;
        loop {
            if taken == MAX_BATCH {
                return true;
            }
            let Some(item) = ring.next() else { return false };
            taken += 1;
            match decoder.push(&item) {
                Ok(Some(Event::Page(mut p))) => {
                    p.actor.stack = symbols.frames(&p.kstack);
                    out.push(Event::Page(p));
                }
                Ok(Some(Event::Pin(mut p))) => {
                    let o = symbols.origin(&p.kstack);
                    p.caller = o.caller;
                    p.path = o.path.to_string();
                    // The file's name, while the pinner still maps it: a report after
                    // the incident can then be asked about a path.
                    if let Some(f) = p.file.as_mut() {
                        f.path = super::procs::mapped_path(p.pid, p.start);
                    }
                    out.push(Event::Pin(p));
                }
                Ok(Some(e)) => out.push(e),
                Ok(None) => {}
                Err(e) => {
                    *bad += 1;
                    log::warn!("undecodable record: {e:#}");
                }
            }
        }
    }

    /// Calls still waiting for chunks, emitted as incomplete.
    pub fn flush(&mut self, out: &mut Vec<Event>) {
        out.extend(self.decoder.flush());
    }

    /// New drops since the last call, one "lost" event per reason.
    pub fn lost(&mut self, kernel: &Kernel, out: &mut Vec<Event>) -> Result<()> {
        let now = kernel.counters()?;
        for (i, name) in Counters::NAMES.iter().enumerate() {
            let delta = now.0[i].saturating_sub(self.last.0[i]);
            if delta > 0 {
                out.push(Event::Lost(Lost { ts_ns: monotonic_ns(), count: delta, reason: name.to_string() }));
            }
        }
        self.last = now;
        Ok(())
    }
}
