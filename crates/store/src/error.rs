use berth_types::CommandError;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open RocksDB at {path}: {source}")]
    Open { path: String, source: rocksdb::Error },
    #[error("RocksDB: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "{what} was written in record format {found}, but this berth reads format {supported} at \
         most: run a newer berth on this data dir"
    )]
    NewerFormat { what: String, found: u8, supported: u8 },
    #[error("corrupt record: {0}")]
    Corrupt(String),
    #[error("bad snapshot file {path}: {reason}")]
    BadSnapshot { path: String, reason: String },
    #[error("{dir} already holds a berth database: restore needs a new, empty data dir")]
    NotEmpty { dir: String },
    #[error(transparent)]
    Command(CommandError),
}

impl From<StoreError> for std::io::Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Io(e) => e,
            other => std::io::Error::other(other.to_string()),
        }
    }
}
