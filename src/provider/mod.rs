//! The provider abstraction: one trait, one chunk type, one stream type. Every transport
//! (`/invoke`, `/stream`, `/ws/model`) is an adapter over [`ChunkStream`].

pub mod bedrock;
#[cfg(feature = "local")]
pub mod local;
#[cfg(not(feature = "local"))]
#[path = "local_missing.rs"]
pub mod local;
mod spec;
mod stop;

use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use futures_util::{StreamExt, stream::BoxStream};
use poem_openapi::Enum;

pub use self::{
    spec::{DefaultLimits, Invalid, ProviderConfig, ProviderSpec, Shared, UpstreamSettings},
    stop::{StopMatcher, StopScan},
};
use crate::{
    error::{Error, Result},
    request::ValidRequest,
    special_tokens::SpecialTokens,
};

/// Whether a model serves requests, as `GET /models` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ModelState {
    /// Requests are served.
    Ready,
    /// A local model's weights are being fetched or loaded: requests get 503 `model_loading`.
    Loading,
    /// A local model could not be fetched or loaded: requests get 503 (`reason` says why).
    Failed,
    /// The gateway lacks what the upstream needs (AWS credentials): requests get 503
    /// `upstream_unavailable` (`reason` says why).
    Unavailable,
}

/// A model's state and, unless it is ready, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    pub state: ModelState,
    pub reason: Option<String>,
}

impl Availability {
    pub const READY: Availability = Availability {
        state: ModelState::Ready,
        reason: None,
    };
}

/// One item of a model's answer, as the model writes it. A stream yields any number of
/// `Text` pieces and then exactly one `Done`, or ends with an `Err`.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Text(String),
    Done(Finish),
}

pub type ChunkStream = BoxStream<'static, Result<Chunk>>;

/// Why and after how many tokens a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    pub stop_reason: StopReason,
    pub usage: Usage,
}

/// Bedrock Converse's vocabulary, whatever words the model's native API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ContentFiltered,
}

/// Token counts as the model reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, poem_openapi::Object)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// The tokens an answer has used so far, as its provider reports them when the answer
/// fails midway (a finished answer carries its [`Finish`]).
#[derive(Debug, Clone, Default)]
pub struct UsageMeter(Arc<Mutex<Usage>>);

impl UsageMeter {
    pub fn report(&self, usage: Usage) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = usage;
    }

    pub fn get(&self) -> Usage {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish: Finish,
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// Starts a generation. Errors that happen before the answer begins are returned here;
    /// errors after that are the stream's last item.
    /// An answer that fails midway reports the tokens it used so far to `usage`; the
    /// gateway does the accounting.
    async fn stream(&self, request: ValidRequest, usage: UsageMeter) -> Result<ChunkStream>;

    /// The special tokens of the prompt this provider renders around user text, if it renders
    /// one. An error when they are not known yet (a local model still loading).
    fn special_tokens(&self) -> Result<Option<Arc<SpecialTokens>>> {
        Ok(None)
    }

    /// Whether requests can be served now, and if not why.
    fn availability(&self) -> Availability {
        Availability::READY
    }
}

/// Concatenates a chunk stream into one answer.
pub async fn collect(mut stream: ChunkStream) -> Result<Completion> {
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        match chunk? {
            Chunk::Text(piece) => text.push_str(&piece),
            Chunk::Done(finish) => return Ok(Completion { text, finish }),
        }
    }
    Err(Error::Upstream(
        "the model's answer ended before it was complete".into(),
    ))
}
