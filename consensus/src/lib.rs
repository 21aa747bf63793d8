//! unid consensus.
