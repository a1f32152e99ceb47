//! Quiver's service layer. It owns no storage logic: it maps the `quiver.v1` API onto the
//! engine's public API: the registry, the gRPC services, authentication, and `quiverd`.
#![deny(clippy::unwrap_used)]
#![warn(missing_docs)]

pub mod admission;
pub mod auth;
pub mod backfill;
pub mod checkpoint;
pub mod cluster;
pub mod conn;
pub mod convert;
pub mod daemon;
pub mod drift;
pub mod features;
pub mod flight;
pub mod forward;
pub mod fuzzing;
pub mod gate;
pub mod health;
pub mod metrics;
pub mod moving;
pub mod registry;
pub mod replication;
pub mod servedlog;
pub mod service;
pub mod shadow;
pub mod skew;
pub mod tls;
pub mod ui;
