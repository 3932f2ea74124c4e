//! What can go wrong answering a prediction.

/// Why a prediction could not be answered.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    /// The alias asked for was never set.
    #[error("alias `{alias}` of {domain} is not set")]
    AliasNotSet { domain: String, alias: String },
    /// Nothing can answer: no version behind the alias and no teacher, or the teacher failed.
    #[error("{0}")]
    NoModel(String),
    #[error("registry: {0}")]
    Registry(#[from] flywheel_registry::RegistryError),
    #[error("database: {0}")]
    Db(#[from] flywheel_db::DbError),
    #[error("model: {0}")]
    Model(String),
}

pub type Result<T, E = ServingError> = std::result::Result<T, E>;
