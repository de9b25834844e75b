/// Errors that stop a master from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("certificates: {0}")]
    Pki(String),
    #[error("cannot use data dir {dir}: {reason}")]
    DataDir { dir: String, reason: String },
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Serve(String),
}
