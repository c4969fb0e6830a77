//! A recorded trace replayed as it streams: the engine decides again, and each hazard
//! it derives is matched with the next one the trace recorded right after the same
//! event. Pure, like the rest of the engine; memory is the engine's own state.

use std::collections::VecDeque;

use super::Engine;
use crate::trace::{Event, Hazard, Start};

#[derive(Default)]
pub struct Replay {
    pub engine: Engine,
    pending: VecDeque<Hazard>,
    pub derived: u64,
    pub recorded: u64,
    pub mismatched: u64,
    pub start: Option<Start>,
    pub lost_records: u64,
    pub lost_stacks: u64,
}

impl Replay {
    /// One event of the trace; returns the hazards the engine derives from it.
    pub fn feed(&mut self, e: &Event) -> Vec<Hazard> {
        match e {
            Event::Hazard(h) => {
                self.recorded += 1;
                match self.pending.pop_front() {
                    Some(d) if d == *h => {}
                    _ => self.mismatched += 1,
                }
                return Vec::new();
            }
            Event::Start(s) => self.start = Some(s.clone()),
            Event::Lost(l) if l.reason == "stack_lost" => self.lost_stacks += l.count,
            Event::Lost(l) => self.lost_records += l.count,
            _ => {}
        }
        self.settle();
        let found = self.engine.apply(e);
        self.derived += found.len() as u64;
        self.pending.extend(found.iter().cloned());
        found
    }

    /// Derived hazards the trace did not record right after their event.
    fn settle(&mut self) {
        self.mismatched += self.pending.len() as u64;
        self.pending.clear();
    }

    pub fn finish(&mut self) {
        self.settle();
    }
}

/// Every hazard a trace holds, derived again, and those it recorded (for tests).
#[cfg(test)]
pub fn hazards_of(events: &[Event]) -> (Vec<Hazard>, Vec<Hazard>) {
    let mut r = Replay::default();
    let mut derived = Vec::new();
    let mut recorded = Vec::new();
    for e in events {
        if let Event::Hazard(h) = e {
            recorded.push(h.clone());
        }
        derived.extend(r.feed(e));
    }
    (derived, recorded)
}

