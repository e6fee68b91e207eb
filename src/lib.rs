//! fasternet-serve: FasterNet image classification on candle.
//!
//! - [`model`]: the network, its configurations and checkpoint loading.
//! - [`preprocess`]: image decoding and timm's eval transform.
//! - [`labels`]: class names.
//! - [`classifier`]: the three together, the API the CLI and the server call.

pub mod classifier;
pub mod labels;
pub mod model;
pub mod preprocess;

pub use classifier::{Classifier, Prediction};
