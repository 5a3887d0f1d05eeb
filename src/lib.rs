//! modelgate: a streaming gateway in front of large language models.
//!
//! Layers, each using only those after it: [`server`] adapts the chunk stream to HTTP, SSE
//! and WebSocket; [`gateway`] admits requests and starts generations; [`resume`] holds the
//! events of resumable streams; [`generation`] pumps one answer (timeouts, cancellation,
//! accounting); [`registry`] ties model names to providers; [`provider`] talks to upstreams
//! behind one trait; [`request`] validates what clients send; [`special_tokens`] keeps
//! prompt-format tokens out of user text; [`error`] is the one error type. Beside them:
//! [`config`] reads the registry file, [`auth`] holds the API keys, [`limiter`] their limits
//! (in process, or shared by replicas through the Redis of [`cluster`]), [`telemetry`] the
//! logs and metrics.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod content;
pub mod error;
pub mod gateway;
pub mod generation;
pub mod limiter;
pub mod provider;
pub mod registry;
pub mod request;
pub mod resume;
pub mod server;
pub mod special_tokens;
pub mod telemetry;
