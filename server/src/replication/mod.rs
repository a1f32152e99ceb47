//! Replication between regions: the server's half (`storage/REPLICATION.md` is the engine's).
//!
//! # Shape
//! Every node serves `ReplicationService` and runs one *puller* task per configured peer. A
//! puller asks its peer for the batches that originated there, after its cursor (the origin
//! sequence number it has applied through, a cell the engine writes atomically with each
//! applied batch), applies each with [`Db::apply_replicated`], and calls again when the
//! stream's window ends; each call's `after` acknowledges what it applied, so the origin can
//! release its log ([`Db::retain_log_after`] with the least acknowledgement of all peers).
//! A peer whose `after` the origin's log no longer reaches gets `OUT_OF_RANGE`; the puller
//! then applies the origin's snapshot ([`Db::apply_snapshot`]) and continues from the log.
//!
//! Applied batches are logged `Async`: the cursor is in the same WAL record as the data, so
//! a crash loses both together and the batches are pulled again. Only batches durable at
//! their origin are shipped.
//!
//! # Faults
//! Every error (connect, stream, apply) is recorded as the peer's `last_error`, and the
//! puller retries with exponential backoff from [`RETRY_BACKOFF_MIN`] to [`RETRY_BACKOFF_MAX`].
//! Redelivered, reordered or duplicated batches change nothing (the cursor and the vector
//! compare-and-swap make applying idempotent); a batch above a gap is never asked for,
//! because pulls always start from the durable cursor.
//!
//! # Modules
//! - `config`: a node's region and peers, and the transport pullers connect with.
//! - `wire`: shipped batches to and from their protobuf form.
//! - `chain`: the puller's reassembly of a Pull stream's chain (pure; unit-tested).
//! - `puller`: the [`Replicator`]: one puller per peer, snapshot bootstrap, status and
//!   operator commands.
//! - `service`: the `ReplicationService` a node serves to its peers.
//! - `chaos`: the test-only message faults ([`CHAOS_ENV`]).

mod chain;
mod chaos;
mod config;
mod puller;
mod service;
pub(crate) mod wire;

use std::time::Duration;

use crate::registry::FEATURE_ID_STRIDE;

pub use chaos::CHAOS_ENV;
pub use config::{stream_of, ClusterConfig, Connect, Peer, Transport};
pub use puller::Replicator;
pub use service::{service, ReplicationApi};

/// Largest region id (feature ids are strided by region, see [`FEATURE_ID_STRIDE`]).
pub const REGION_ID_MAX: u32 = FEATURE_ID_STRIDE - 1;
/// Most peers of one node (every region takes one entry of every version vector).
pub const PEERS_MAX: usize = 15;
/// How long a Pull stream stays open when the puller does not say.
pub const PULL_WINDOW_DEFAULT: Duration = Duration::from_secs(2);
/// Longest Pull window a node grants.
pub const PULL_WINDOW_MAX: Duration = Duration::from_secs(30);
/// Most batches one Pull message carries.
pub const PULL_BATCHES_PER_MESSAGE_MAX: usize = 1024;
/// A Pull message is cut once its batches exceed this many bytes of cells.
pub const PULL_MESSAGE_BYTES_TARGET: usize = 4 << 20;
/// How often an idle Pull stream checks for new batches.
pub const PULL_IDLE_POLL: Duration = Duration::from_millis(2);
/// An idle Pull stream sends an empty message this often (the puller's liveness and lag).
pub const PULL_HEARTBEAT: Duration = Duration::from_millis(250);
/// Versions a Snapshot reads at most before it sends a part (empty when none of them is of
/// the slots asked for).
pub const SNAPSHOT_SCAN_MAX: usize = 65_536;
/// Versions per Snapshot part.
pub const SNAPSHOT_PART_VERSIONS: usize = 4096;
/// Retry backoff after an error, doubling from the first to the second.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// See [`RETRY_BACKOFF_MIN`].
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a puller waits to connect to its peer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A Pull stream silent for this long (no heartbeat) is abandoned and reopened.
pub const PULL_SILENCE_MAX: Duration = Duration::from_secs(5);
/// How often a node asks a sharded peer region for its nodes (a node that joins it gets a
/// puller within this).
pub const MEMBERS_POLL: Duration = Duration::from_secs(5);
/// How long a move's backfill waits for every puller to ask for the moving slots.
pub const BACKFILL_WAIT: Duration = Duration::from_secs(30);
/// Largest replication message accepted.
pub const REPLICATION_MESSAGE_BYTES_MAX: usize = 64 << 20;
