//! How a lab operation fails: every variant says what to do.

/// A lab operation that failed, with what to do.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The name is taken.
    #[error("a lab named {0:?} already exists; remove it with `weft lab down --name {0}` or choose another --name")]
    Exists(String),
    /// No such lab.
    #[error("no lab named {0:?} is running; start one with `weft lab up --name {0}`")]
    Missing(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// A step failed.
    #[error("{0}")]
    Step(String),
}
