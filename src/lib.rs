//! fasternet-serve: FasterNet image classification on candle.
//!
//! - [`model`]: the network, its configurations and checkpoint loading.
//! - [`preprocess`]: image decoding and timm's eval transform.
//! - [`labels`]: class names.
//! - [`classifier`]: the three together, the API the CLI and the server call.
//! - [`server`]: the HTTP service (axum) with its batching queue and inference worker.
//! - [`allocator`]: the binary's allocator (mimalloc, large blocks straight from the OS).
//! - [`telemetry`]: logs, and OpenTelemetry traces when an OTLP endpoint is configured.

pub mod allocator;
pub mod classifier;
pub mod labels;
pub mod model;
pub mod preprocess;
pub mod server;
pub mod telemetry;

pub use classifier::{Classifier, Prediction};
