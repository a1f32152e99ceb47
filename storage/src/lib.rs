//! Quiver's storage engine: an LSM tree of bitemporal feature cells.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod batch;
pub mod cell;
pub mod coding;
pub mod error;
pub mod fs;
pub mod key;
pub mod limits;
pub mod record;
pub mod sstable;
pub mod types;
pub mod wal;

pub use error::{Error, Result};
