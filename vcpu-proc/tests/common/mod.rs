//! Shared test support.
pub mod guest;
pub mod harness;
