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
    /// The disk is full (`ENOSPC`, `EDQUOT`) while writing `path`. Nothing was changed: the
    /// write was not logged, a flush or compaction left no trace. The engine keeps serving
    /// reads, retries its background work, and takes writes again by itself once space is
    /// freed. (A failed fsync is never this: after one, what reached the disk is unknown, and
    /// the engine stops with [`Error::PreviousError`].)
    #[error("disk full: no space left writing {path:?}: {what}")]
    NoSpace {
        /// The file (or, for an engine opened read-only, the data directory).
        path: PathBuf,
        /// What failed.
        what: String,
        /// True for an engine that opened on a full disk: it takes writes only after a
        /// restart with space to spare. False: writes resume by themselves.
        read_only: bool,
    },
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
    /// An I/O error; a full disk is [`Error::NoSpace`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        if is_no_space(&source) {
            return Error::NoSpace { path: path.into(), what: source.to_string(), read_only: false };
        }
        Error::Io { path: path.into(), source }
    }

    /// An I/O error of an fsync: never [`Error::NoSpace`], whatever its cause (see there).
    pub(crate) fn io_sync(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// True for [`Error::NoSpace`].
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::NoSpace { .. })
    }

    pub(crate) fn corruption(file: impl Into<PathBuf>, offset: u64, what: impl Into<String>) -> Self {
        Error::Corruption { file: file.into(), offset, what: what.into() }
    }

    /// True for [`Error::Corruption`].
    pub fn is_corruption(&self) -> bool {
        matches!(self, Error::Corruption { .. })
    }
}

/// `ENOSPC` (no space left on device) or `EDQUOT` (disk quota exceeded).
fn is_no_space(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT)) || e.kind() == std::io::ErrorKind::StorageFull
}
