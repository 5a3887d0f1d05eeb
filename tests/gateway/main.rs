//! Integration tests: the real `modelgate` binary, spoken to over real sockets, calling the
//! real AWS SDK, which talks to an in-process emulator of Bedrock's wire protocol.

mod anthropic;
mod app;
mod auth;
mod cancellation;
mod client;
mod cluster;
mod cluster_limits;
mod container;
mod converse;
mod emulator;
mod emulator_selftest;
mod faults;
mod hostile_connections;
mod hostile_http;
mod hostile_prompts;
mod hostile_ws;
mod invoke;
mod limits;
#[cfg(feature = "local")]
mod local;
mod openai;
mod openai_compat;
mod operations;
mod resume;
mod resume_cluster;
mod schema;
mod service;
mod soak;
mod sse;
mod ws;
