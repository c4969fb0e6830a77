//! The engine: pure state built from trace events. No I/O, no aya, no clock of its own
//! (time comes from the events), so a live run and a recorded trace give the same
//! answers.

pub mod account;
pub mod hazards;
pub mod pins;

pub use hazards::Hazards;
pub use pins::PinTable;

use crate::trace::{Event, Hazard};

/// Pin table and hazard rules, fed one event at a time.
#[derive(Default, Debug)]
pub struct Engine {
    pub pins: PinTable,
    pub hazards: Hazards,
}

impl Engine {
    /// Applies one event; returns the hazards it reveals.
    pub fn apply(&mut self, event: &Event) -> Vec<Hazard> {
        let found = self.hazards.observe(&self.pins, event);
        self.pins.apply(event);
        self.hazards.settle(&self.pins, event);
        found
    }
}
