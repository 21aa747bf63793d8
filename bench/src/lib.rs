//! Criterion suites live in `benches/`; this library only holds shared helpers.
