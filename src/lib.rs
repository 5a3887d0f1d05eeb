//! modelgate: a streaming gateway in front of large language models.
//!
//! Layout: [`config`] reads the registry file; [`request`] validates what clients send;
//! [`provider`] talks to upstreams behind one trait; [`registry`] ties model names to
//! providers; [`server`] adapts the chunk stream to HTTP, SSE and WebSocket.

pub mod auth;
pub mod config;
pub mod error;
pub mod gateway;
pub mod generation;
pub mod provider;
pub mod registry;
pub mod request;
pub mod server;
pub mod special_tokens;
pub mod telemetry;
