//! The engine's error type.

use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system I/O error, with the path it concerned where known.
    #[error("i/o error on {path:?}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Bytes on disk failed a check: a checksum, a length, a magic number, an ordering.
    #[error("corruption in {file:?} at offset {offset}: {what}")]
    Corruption {
        /// The file holding the bad bytes.
        file: PathBuf,
        /// Byte offset of the bad record, block or field.
        offset: u64,
        /// What check failed.
        what: String,
    },
    /// The caller passed something the engine does not accept; nothing was changed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An earlier I/O or background error left the engine's state uncertain; it refuses writes
    /// until it is reopened.
    #[error("engine stopped after an earlier error: {0}")]
    PreviousError(String),
    /// The data directory is open in another process or engine.
    #[error("data directory {path:?} is in use by another process (LOCK is held)")]
    InUse {
        /// The directory.
        path: PathBuf,
    },
    /// A read's answer grew past the memory its caller allowed it (see
    /// [`crate::Db::multi_version_at_charged`]); nothing was changed.
    #[error("over budget: {0}")]
    OverBudget(String),
    /// The engine is shutting down.
    #[error("engine is closed")]
    Closed,
    /// A replication peer asked for batches this node no longer keeps in its log; it must be
    /// bootstrapped from a checkpoint.
    #[error("the replication log no longer holds the batches asked for (oldest kept: {oldest})")]
    LogTruncated {
        /// Sequence number of the oldest batch still in the log.
        oldest: u64,
    },
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn corruption(file: impl Into<PathBuf>, offset: u64, what: impl Into<String>) -> Self {
        Error::Corruption { file: file.into(), offset, what: what.into() }
    }

    /// True for [`Error::Corruption`].
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. })
    }
}
