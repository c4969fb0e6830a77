//! The modes: each wires a source to the engine to a sink.

pub mod alert;
pub mod doctor;
pub mod export;
pub mod filter;
pub mod metrics;
pub mod record;
pub mod report;
pub mod selftest;
pub mod story;
pub mod top;
