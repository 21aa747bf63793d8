//! Atomics shim: `loom`'s model-checked atomics under `cfg(loom)`, `std`'s otherwise.
//!
//! Every atomic the ring protocol touches goes through this module so that the loom model tests
//! (`tests/loom.rs`) check the very code the real ring runs (the crossbeam convention).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering, fence};
