//! The core's error type. Every error that concerns a file names the file and says what is
//! wrong with it, so that the CLI can print it and the GUI can show it once as a notification.

use std::path::{Path, PathBuf};

/// Errors of the core (model loading, images, data, checkpoints).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model folder or file that cannot be used (missing files, wrong layout).
    #[error("model {path}: {msg}")]
    Model { path: PathBuf, msg: String },
    /// A config that cannot be parsed or does not agree with the weights.
    #[error("config {path}: {msg}")]
    Config { path: PathBuf, msg: String },
    /// A weights file that cannot be read, or whose tensors do not fit the config.
    #[error("weights {path}: {msg}")]
    Weights { path: PathBuf, msg: String },
    /// An image that cannot be decoded (corrupt, truncated, not an image, too large).
    #[error("image {path}: {msg}")]
    Image { path: PathBuf, msg: String },
    /// A model named by hub id that is neither in the local cache nor downloadable.
    #[error("hub model {id}: {msg}")]
    Hub { id: String, msg: String },
    /// Invalid argument or input (shapes, empty lists, ...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
    pub fn model(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn weights(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Weights {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
    pub fn image(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Image {
            path: path.as_ref().to_path_buf(),
            msg: msg.into(),
        }
    }
}
