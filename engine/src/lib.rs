//! unid data plane.
