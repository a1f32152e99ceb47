//! Quiver's service layer. It owns no storage logic: it maps the `quiver.v1` API onto the
//! engine's public API. This step holds the registry; the gRPC services and `quiverd` follow.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod convert;
pub mod daemon;
pub mod features;
pub mod metrics;
pub mod registry;
pub mod replication;
pub mod service;
