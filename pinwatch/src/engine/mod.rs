//! The engine: pure state built from trace events. No I/O, no aya, no clock of its own
//! (time comes from the events), so a live run and a recorded trace give the same
//! answers.

pub mod account;
pub mod hazards;
pub mod pins;
pub mod replay;

pub use hazards::Hazards;
pub use pins::PinTable;

use std::collections::HashMap;

use account::{account, LimitState, Limits};

use crate::trace::{Event, Hazard, KernelProc, LimitRules};

/// Pin table, hazard rules and limit rules, fed one event at a time. The limit rules
/// come with the `start` event and the kernel's figures with `procs` events, so a
/// replay decides on limits exactly as the live run did.
#[derive(Default, Debug)]
pub struct Engine {
    pub pins: PinTable,
    pub hazards: Hazards,
    limits: Limits,
    limit_state: LimitState,
    /// The kernel's figures of the latest `procs` event, by pid.
    pub kernel: HashMap<u32, KernelProc>,
}

impl Engine {
    /// Applies one event; returns the hazards it reveals.
    pub fn apply(&mut self, event: &Event) -> Vec<Hazard> {
        match event {
            Event::Start(s) => {
                self.limits = s.limits.as_ref().map(Limits::from).unwrap_or_default();
                return Vec::new();
            }
            Event::Procs(p) => return self.check_limits(p),
            _ => {}
        }
        let found = self.hazards.observe(&self.pins, event);
        self.pins.apply(event);
        self.hazards.settle(&self.pins, event);
        found
    }

    /// New limit rules, from here on (a daemon's reloaded configuration).
    pub fn set_limits(&mut self, rules: &LimitRules) {
        self.limits = Limits::from(rules);
    }

    fn check_limits(&mut self, p: &crate::trace::Procs) -> Vec<Hazard> {
        self.kernel = p
            .procs
            .iter()
            .map(|f| (f.pid, f.kernel))
            .collect();
        let accounts = account(&self.pins);
        let breaches = self.limit_state.check(&self.limits, &self.pins, &accounts, &self.kernel, p.ts_ns);
        for h in &breaches {
            *self.hazards.counts.entry(h.kind).or_default() += 1;
        }
        breaches
    }
}
