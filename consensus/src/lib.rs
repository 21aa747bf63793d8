//! unid consensus.
pub mod error;
pub mod frame;
pub mod network;
pub mod node;
pub mod state;
pub mod store;
pub mod types;
