//! Values people type on the command line, parsed before anything is attached: a bad
//! one is refused with what was expected, never a panic after minutes of loading.

use std::time::Duration;

use crate::kernel::plan::AttachMode;

/// How to load into the kernel: options of every command that does (doctor, record, top).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct KernelArgs {
    /// Attach types to allow: auto takes the fastest the kernel allows (fentry, then
    /// kprobe); naming one makes any other an error.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,
    /// Folios the kernel-side pin map holds (each pinned folio is one entry, about 100
    /// bytes of kernel memory). Default: one per 512 KiB of this machine's memory
    /// (8192 to 262144). Pins past it are counted (pin_map_full), not watched.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=(1 << 26)))]
    pub pin_map_capacity: Option<u32>,
    /// Blocks of 32 small folios the long-term pin map holds (about 8 bytes per page
    /// pinned when full). Default: enough for a quarter of this machine's memory. A
    /// long-term pin that finds no block goes into the pin map.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=(1 << 24)))]
    pub pin_block_capacity: Option<u32>,
}

impl KernelArgs {
    pub fn load_options(&self) -> crate::kernel::load::LoadOptions {
        crate::kernel::load::LoadOptions { attach: self.attach, pin_map_capacity: self.pin_map_capacity, pin_block_capacity: self.pin_block_capacity, enforce: false }
    }
}

/// How to load, for the modes that watch the live kernel (record, top, alert).
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct LiveArgs {
    #[command(flatten)]
    pub kernel: KernelArgs,
    /// Do not look for pins taken before pinwatch started (the start-up scan of the
    /// processes charged VmPin or VmLck).
    #[arg(long)]
    pub no_start_scan: bool,
}

/// The longest duration any option takes: past this, clocks and timers overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A duration with units (`30s`, `5m`, `1h30m`, `250ms`) or a bare number of seconds
/// (`2`, `0.5`). Zero, negative, NaN and infinite values are refused.
pub fn duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = if t.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '.' || c == '-' || c == '+')
        && t.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'))
    {
        let secs: f64 = t.parse().map_err(|_| format!("{s:?} is not a duration like 30s, 5m or 2 (seconds)"))?;
        if !secs.is_finite() || secs <= 0.0 {
            return Err(format!("{s:?}: a duration must be a positive number of seconds, or like 30s, 5m"));
        }
        Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too long a duration"))?
    } else {
        humantime::parse_duration(t).map_err(|e| format!("{s:?} is not a duration like 30s, 5m or 2 (seconds): {e}"))?
    };
    if d.is_zero() {
        return Err(format!("{s:?}: a duration must be longer than zero"));
    }
    if d > MAX_DURATION {
        return Err(format!("{s:?} is longer than the 100 years pinwatch accepts"));
    }
    Ok(d)
}

/// A size: `4096`, `64KiB`, `1GiB`.
pub fn bytes(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| format!("{s:?} is not a size like 4096, 64KiB or 1GiB: {e}"))
}

/// A count of at least one (`-n`).
pub fn count(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("0: the count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number of at least 1")),
    }
}

/// A process id: a positive number, as `ps` shows it.
pub fn pid(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("0 is not a process id".into()),
        Ok(n) if n <= i32::MAX as u32 => Ok(n),
        _ => Err(format!("{s:?} is not a process id")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units_and_refuse_nonsense() {
        for (input, want) in [
            ("30s", Some(30_000)),
            ("5m", Some(300_000)),
            ("1h30m", Some(5_400_000)),
            ("250ms", Some(250)),
            ("2", Some(2_000)),
            ("0.5", Some(500)),
            ("1e1", Some(10_000)),
            ("-1", None),
            ("nan", None),
            ("NaN", None),
            ("inf", None),
            ("infinity", None),
            ("1e300", None),
            ("0", None),
            ("0s", None),
            ("", None),
            ("soon", None),
            ("1000000000000000000000", None),
        ] {
            let got = duration(input).ok().map(|d| d.as_millis() as u64);
            assert_eq!(got, want, "{input:?}: {:?}", duration(input));
        }
    }

    #[test]
    fn counts_and_pids() {
        assert!(count("0").is_err());
        assert!(count("-1").is_err());
        assert_eq!(count("3"), Ok(3));
        assert!(pid("0").is_err());
        assert!(pid("4294967295").is_err());
        assert!(pid("abc").is_err());
        assert_eq!(pid("42"), Ok(42));
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes("64KiB"), Ok(65536));
        assert!(bytes("lots").is_err());
    }
}
