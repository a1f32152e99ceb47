//! `quiver-testkit`: what Quiver's tests, `jepsen/` and `benches/` share, so each has one copy.
//!
//! - [`model`]: the reference model of the read contract `value_at` (`storage/READS.md`) over a
//!   plain list of versions, and a per-key store of every version ever written;
//! - [`rng`]: a small deterministic generator;
//! - [`time`]: `prost_types::Timestamp` <-> microseconds (checked), and the wall clock in
//!   microseconds;
//! - [`quiverd`]: finding the built `quiverd` and starting one, reading the address it prints;
//! - [`etcd`]: a single-member etcd for the sharded-region tests and jepsen's sharded mode;
//! - `pki` (feature `pki`): a throwaway CA and region certificates for TLS tests.
//!
//! It depends on neither `quiver-storage` nor `quiver-server` (so any crate may dev-depend on it
//! without a cycle): times are plain `i64` event times and `u64` system times, and values are
//! any type.
#![warn(missing_docs)]

pub mod etcd;
pub mod model;
#[cfg(feature = "pki")]
pub mod pki;
pub mod quiverd;
pub mod rng;
pub mod time;

pub use model::{value_at, Model, Version};
pub use rng::Rng;
pub use time::{micros_to_timestamp, now_us, timestamp_to_micros};
