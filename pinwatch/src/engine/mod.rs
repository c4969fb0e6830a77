//! The engine: pure state built from trace events. No I/O, no aya, no clock of its own
//! (time comes from the events), so a live run and a recorded trace give the same
//! answers.

pub mod pins;

pub use pins::PinTable;
