//! Reading a trace as a stream: one event at a time, memory bounded whatever the file's
//! size (a line longer than MAX_LINE is skipped, not held). A damaged line is named and
//! skipped, and the rest is kept; a trace cut short (a crash, a kill -9, a zstd frame
//! never closed) gives what was written before the cut. zstd traces are recognized by
//! their magic number, whatever their name.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read},
    path::Path,
};

use anyhow::{Context as _, Result};

use super::Event;

/// No event is anywhere near this long (a 256-page pin with its stack is a few KiB).
const MAX_LINE: usize = 16 << 20;
/// Damaged lines described one by one; past this they are only counted.
const MAX_PROBLEMS: usize = 20;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Where next_line left a line.
enum Line {
    /// The first so many bytes of the input's buffer, its newline included.
    InBuffer(usize),
    /// In `buf`: whether a newline ended it, and whether it was too long to keep.
    Copied { ended: bool, too_long: bool },
}

pub struct Reader {
    input: Box<dyn BufRead>,
    line: u64,
    buf: Vec<u8>,
    /// What was wrong with the input, line by line (the first MAX_PROBLEMS).
    pub problems: Vec<String>,
    /// Lines skipped as damaged, and whether the input ended mid-line or mid-frame.
    pub skipped: u64,
    pub cut_short: bool,
    done: bool,
}

/// Opens a trace file, an incident bundle's directory (its trace.jsonl), or standard
/// input for `-`.
pub fn open(path: &Path) -> Result<Reader> {
    let bundle = path.join("trace.jsonl");
    let path = if path.is_dir() && bundle.is_file() { bundle.as_path() } else { path };
    let raw: Box<dyn Read> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        Box::new(File::open(path).with_context(|| format!("opening {}", path.display()))?)
    };
    Reader::new(raw).with_context(|| format!("reading {}", path.display()))
}

impl Reader {
    /// A reader over plain or zstd-compressed JSON lines.
    pub fn new(raw: impl Read + 'static) -> Result<Reader> {
        let mut buffered = BufReader::with_capacity(1 << 16, raw);
        let head = buffered.fill_buf().context("reading the start")?;
        let input: Box<dyn BufRead> = if head.starts_with(&ZSTD_MAGIC) {
            Box::new(BufReader::new(zstd::Decoder::with_buffer(buffered).context("starting zstd")?))
        } else {
            Box::new(buffered)
        };
        Ok(Reader { input, line: 0, buf: Vec::new(), problems: Vec::new(), skipped: 0, cut_short: false, done: false })
    }

    fn problem(&mut self, what: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(what);
        }
    }

    /// The next line: whole in the input's buffer (most lines: parsed there, not
    /// copied), or copied into `buf`, at most MAX_LINE bytes kept. None at the end of
    /// the input.
    fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        self.buf.clear();
        let mut too_long = false;
        let mut any = false;
        loop {
            let chunk = match self.input.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(any.then_some(Line::Copied { ended: false, too_long }));
            }
            let (take, newline) = match memchr::memchr(b'\n', chunk) {
                Some(i) if !any => return Ok(Some(Line::InBuffer(i + 1))),
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            any = true;
            if !too_long {
                let room = MAX_LINE.saturating_sub(self.buf.len());
                if take > room {
                    too_long = true;
                    self.buf.clear();
                } else {
                    self.buf.extend_from_slice(&chunk[..take]);
                }
            }
            self.input.consume(take);
            if newline {
                return Ok(Some(Line::Copied { ended: true, too_long }));
            }
        }
    }

    /// Parses the line next_line found: in the input's buffer (then consumed), or in
    /// `buf`. None for a blank line.
    fn parse(&mut self, line: &Line) -> Option<serde_json::Result<Event>> {
        match *line {
            Line::InBuffer(take) => {
                // The bytes next_line saw, still buffered: fill_buf reads nothing more.
                let r = match self.input.fill_buf() {
                    Ok(chunk) if chunk.len() >= take => {
                        let text = chunk[..take].trim_ascii();
                        (!text.is_empty()).then(|| Event::from_json(text))
                    }
                    _ => unreachable!("a BufRead's buffer shrank without consume"),
                };
                self.input.consume(take);
                r
            }
            Line::Copied { .. } => {
                let text = self.buf.trim_ascii();
                (!text.is_empty()).then(|| Event::from_json(text))
            }
        }
    }

    /// A one-line account of what was wrong, if anything.
    pub fn summary(&self) -> Option<String> {
        if self.skipped == 0 && !self.cut_short {
            return None;
        }
        let mut s = format!("{} damaged line(s) skipped", self.skipped);
        if self.cut_short {
            s += "; the trace is cut short (the recording did not end cleanly)";
        }
        Some(s)
    }
}

impl Iterator for Reader {
    type Item = Result<Event>;

    fn next(&mut self) -> Option<Result<Event>> {
        while !self.done {
            let line = match self.next_line() {
                Ok(Some(l)) => l,
                Ok(None) => {
                    self.done = true;
                    return None;
                }
                Err(e) => {
                    // A zstd frame never closed, a device error: keep what came before.
                    self.done = true;
                    self.cut_short = true;
                    self.problem(format!("the input ends after line {}: {e}", self.line));
                    return None;
                }
            };
            self.line += 1;
            let n = self.line;
            let (ended, too_long) = match line {
                Line::InBuffer(_) => (true, false),
                Line::Copied { ended, too_long } => (ended, too_long),
            };
            if too_long {
                self.skipped += 1;
                self.problem(format!("line {n} is longer than {MAX_LINE} bytes: skipped"));
                continue;
            }
            let Some(parsed) = self.parse(&line) else { continue };
            match parsed {
                Ok(Event::Start(s)) => {
                    if let Err(e) = s.check_format() {
                        self.done = true;
                        return Some(Err(e));
                    }
                    return Some(Ok(Event::Start(s)));
                }
                Ok(e) => return Some(Ok(e)),
                Err(err) if !ended && err.is_eof() => {
                    self.cut_short = true;
                    self.skipped += 1;
                    self.problem(format!("line {n} is cut short: {err}"));
                }
                Err(err) => {
                    self.skipped += 1;
                    self.problem(format!("line {n} is not a pinwatch trace event: {err}"));
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Lost, Start};

    fn lost(ts: u64) -> String {
        serde_json::to_string(&Event::Lost(Lost { ts_ns: ts, count: 3, reason: "x".into() })).unwrap()
    }

    fn read(bytes: Vec<u8>) -> (Vec<Event>, Reader) {
        let mut r = Reader::new(std::io::Cursor::new(bytes)).unwrap();
        let events: Vec<Event> = r.by_ref().map(|e| e.unwrap()).collect();
        (events, r)
    }

    /// Reads at most 7 bytes at a time: every line spans fills of the buffer.
    struct Trickle(std::io::Cursor<Vec<u8>>);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(7);
            self.0.read(&mut buf[..n])
        }
    }

    /// Lines parsed in the input's buffer and lines copied across its fills read alike,
    /// blank, damaged and cut lines included.
    #[test]
    fn lines_across_buffer_fills_read_as_lines_within_one() {
        let text = format!("{}\n\n  {}  \n{{\"event\":\"nope\"}}\n{}\n{}", lost(1), lost(2), lost(3), &lost(4)[..10]);
        let (whole, w) = read(text.clone().into_bytes());
        let mut t = Reader::new(Trickle(std::io::Cursor::new(text.into_bytes()))).unwrap();
        let trickled: Vec<Event> = t.by_ref().map(|e| e.unwrap()).collect();
        assert_eq!(whole.len(), 3);
        assert_eq!(serde_json::to_string(&whole).unwrap(), serde_json::to_string(&trickled).unwrap());
        assert_eq!((w.skipped, w.cut_short, &w.problems), (t.skipped, t.cut_short, &t.problems));
        assert_eq!(w.skipped, 2);
        assert!(w.problems[0].contains("line 4") && w.problems[1].contains("line 6"), "{:?}", w.problems);
    }

    #[test]
    fn truncated_last_line_keeps_the_rest() {
        let good = lost(1);
        let (events, r) = read(format!("{good}\n{}", &good[..good.len() / 2]).into_bytes());
        assert_eq!(events.len(), 1);
        assert!(r.cut_short);
        assert!(r.problems[0].contains("line 2"), "{:?}", r.problems);
    }

    #[test]
    fn a_damaged_middle_line_is_named_and_the_rest_kept() {
        let (events, r) = read(format!("{}\n{{\"event\":\"nope\"}}\n{}\n", lost(1), lost(2)).into_bytes());
        assert_eq!(events.len(), 2);
        assert_eq!(r.skipped, 1);
        assert!(!r.cut_short);
        assert!(r.problems[0].contains("line 2"), "{:?}", r.problems);
    }

    #[test]
    fn a_newer_major_format_is_refused() {
        let start = |format: &str| {
            serde_json::to_string(&Event::Start(Start { version: "9.0.0".into(), format: format.into(), ..Default::default() })).unwrap()
        };
        let mut r = Reader::new(std::io::Cursor::new(format!("{}\n{}\n", start("3.0"), lost(1)).into_bytes())).unwrap();
        let err = r.next().unwrap().unwrap_err().to_string();
        assert!(err.contains("format 3.0") && err.contains("newer"), "{err}");
        assert!(r.next().is_none());
        for ok in ["2.0", "2.7", ""] {
            let (events, _) = read(format!("{}\n{}\n", start(ok), lost(1)).into_bytes());
            assert_eq!(events.len(), 2, "{ok}");
        }
    }

    #[test]
    fn zstd_traces_read_whole_and_cut() {
        let text: String = (0..2000).map(|i| lost(i) + "\n").collect();
        let whole = zstd::encode_all(text.as_bytes(), 3).unwrap();
        let (events, r) = read(whole.clone());
        assert_eq!(events.len(), 2000);
        assert!(r.summary().is_none());
        // A frame never closed (kill -9 after a flush): what was flushed is kept.
        let mut enc = zstd::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, text.as_bytes()).unwrap();
        std::io::Write::flush(&mut enc).unwrap();
        let flushed = enc.get_ref().clone();
        let (events, r) = read(flushed);
        assert_eq!(events.len(), 2000);
        assert!(r.cut_short, "an unclosed frame is reported as cut short");
    }

    #[test]
    fn an_overlong_line_is_skipped_without_being_held() {
        let long = format!("{{\"event\":\"lost\",\"reason\":\"{}\"}}", "x".repeat(MAX_LINE + 10));
        let (events, r) = read(format!("{}\n{long}\n{}\n", lost(1), lost(2)).into_bytes());
        assert_eq!(events.len(), 2);
        assert!(r.problems[0].contains("longer than"), "{:?}", r.problems);
    }

    #[test]
    fn random_and_mutated_input_never_panics() {
        // A small property test: mutations of a real trace and plain noise.
        let base: Vec<u8> = (0..50).map(|i| lost(i) + "\n").collect::<String>().into_bytes();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..300 {
            let mut bytes = if round % 3 == 0 { (0..(next() % 4096)).map(|_| next() as u8).collect() } else { base.clone() };
            for _ in 0..(next() % 16) {
                if bytes.is_empty() {
                    break;
                }
                let i = (next() as usize) % bytes.len();
                match next() % 3 {
                    0 => bytes[i] = next() as u8,
                    1 => {
                        bytes.remove(i);
                    }
                    _ => bytes.truncate(i),
                }
            }
            let Ok(r) = Reader::new(std::io::Cursor::new(bytes)) else { continue };
            for e in r {
                let _ = e;
            }
        }
    }
}
