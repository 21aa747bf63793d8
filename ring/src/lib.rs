//! The unid shared-memory ring.
