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
use poem_openapi::{Enum, Object};

pub use self::{
    spec::{DefaultLimits, Invalid, ProviderConfig, ProviderSpec, Shared, UpstreamSettings},
    stop::{StopMatcher, StopScan},
};
pub use crate::content::ToolCall;
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
/// `Text`, `Reasoning` and tool call items and then exactly one `Done`, or ends with an
/// `Err`. A tool call comes as `ToolCallStart`, the fragments of its input's JSON text as
/// they arrive (`ToolCallInput`, for clients that stream them), then the whole call
/// (`ToolCall`, its input parsed) once it is complete.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Text(String),
    Reasoning(ReasoningPiece),
    ToolCallStart {
        id: String,
        name: String,
    },
    /// A fragment of the JSON text of the input of the tool call started last.
    ToolCallInput(String),
    ToolCall(ToolCall),
    Done(Finish),
}

/// A piece of the model's reasoning: text, or the signature that ends it.
#[derive(Debug, Clone, PartialEq, Eq, Object)]
pub struct ReasoningPiece {
    pub text: String,
    #[oai(skip_serializing_if_is_none)]
    pub signature: Option<String>,
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
    /// The model called a tool and waits for its result.
    ToolUse,
}

/// Token counts as the model reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Object)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// Input tokens read from the prompt cache, when the model reports them.
    #[oai(skip_serializing_if_is_none)]
    pub cache_read_input_tokens: Option<u32>,
    /// Input tokens written to the prompt cache, when the model reports them.
    #[oai(skip_serializing_if_is_none)]
    pub cache_write_input_tokens: Option<u32>,
}

impl Usage {
    pub fn new(input_tokens: u32, output_tokens: u32) -> Self {
        Usage {
            input_tokens,
            output_tokens,
            ..Usage::default()
        }
    }
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
    /// All the text, as one string.
    pub text: String,
    /// Text, reasoning and tool calls in the order the model wrote them; consecutive pieces
    /// of one kind joined.
    pub content: Vec<AnswerBlock>,
    pub finish: Finish,
}

/// One block of a whole answer.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerBlock {
    Text(String),
    Reasoning(ReasoningPiece),
    ToolCall(ToolCall),
}

impl Completion {
    /// Adds a chunk to the answer; its `Done` is the caller's.
    fn push(&mut self, chunk: Chunk) {
        match chunk {
            Chunk::Text(piece) => {
                self.text.push_str(&piece);
                match self.content.last_mut() {
                    Some(AnswerBlock::Text(text)) => text.push_str(&piece),
                    _ => self.content.push(AnswerBlock::Text(piece)),
                }
            }
            Chunk::Reasoning(piece) => match self.content.last_mut() {
                Some(AnswerBlock::Reasoning(reasoning)) if reasoning.signature.is_none() => {
                    reasoning.text.push_str(&piece.text);
                    reasoning.signature = piece.signature;
                }
                _ => self.content.push(AnswerBlock::Reasoning(piece)),
            },
            Chunk::ToolCall(call) => self.content.push(AnswerBlock::ToolCall(call)),
            Chunk::ToolCallStart { .. } | Chunk::ToolCallInput(_) | Chunk::Done(_) => {}
        }
    }
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

    /// The input tokens `request` would use, where the provider can count them (the
    /// default: it cannot).
    async fn count_tokens(&self, _request: ValidRequest) -> Result<TokenCount> {
        Ok(TokenCount::Unknown("its provider has no way to count"))
    }
}

/// What a provider can say of a request's input tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCount {
    Counted(u32),
    /// The provider cannot count them, and why.
    Unknown(&'static str),
}

/// Concatenates a chunk stream into one answer.
pub async fn collect(
    mut stream: impl futures_util::Stream<Item = Result<Chunk>> + Unpin,
) -> Result<Completion> {
    let mut answer = Completion {
        text: String::new(),
        content: Vec::new(),
        finish: Finish {
            stop_reason: StopReason::EndTurn,
            usage: Usage::default(),
        },
    };
    while let Some(chunk) = stream.next().await {
        match chunk? {
            Chunk::Done(finish) => {
                answer.finish = finish;
                return Ok(answer);
            }
            chunk => answer.push(chunk),
        }
    }
    Err(Error::Upstream(
        "the model's answer ended before it was complete".into(),
    ))
}
