//! The frames a streaming client receives: the data of the SSE events and the WebSocket
//! JSON mode's messages are the same objects.

use poem::web::sse::Event;
use poem_openapi::{Object, Union, types::ToJSON};

use crate::{
    error::{Error, ErrorBody, ErrorDetail},
    provider::{Chunk, StopReason, Usage},
};

/// One event of an answer stream: any number of `chunk`, then one `done` or one `error`.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type")]
pub enum StreamEvent {
    #[oai(mapping = "chunk")]
    Chunk(TextPiece),
    #[oai(mapping = "done")]
    Done(Finished),
    #[oai(mapping = "error")]
    Error(ErrorBody),
}

/// A piece of the answer, as the model wrote it.
#[derive(Debug, Clone, Object)]
pub struct TextPiece {
    pub text: String,
}

/// The end of a complete answer.
#[derive(Debug, Clone, Object)]
pub struct Finished {
    pub stop_reason: StopReason,
    pub usage: Usage,
}

impl From<crate::error::Result<Chunk>> for StreamEvent {
    fn from(item: crate::error::Result<Chunk>) -> Self {
        match item {
            Ok(Chunk::Text(text)) => StreamEvent::Chunk(TextPiece { text }),
            Ok(Chunk::Done(finish)) => StreamEvent::Done(Finished {
                stop_reason: finish.stop_reason,
                usage: finish.usage,
            }),
            Err(err) => StreamEvent::from(&err),
        }
    }
}

impl From<&Error> for StreamEvent {
    fn from(err: &Error) -> Self {
        StreamEvent::Error(err.body())
    }
}

impl StreamEvent {
    /// The generation was stopped by the client (`{"type":"cancel"}`).
    pub fn cancelled() -> Self {
        StreamEvent::Error(ErrorBody {
            error: ErrorDetail {
                code: "cancelled".into(),
                message: "the generation was cancelled at the client's request".into(),
            },
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::Chunk(_) => "chunk",
            StreamEvent::Done(_) => "done",
            StreamEvent::Error(_) => "error",
        }
    }

    pub fn into_sse(self) -> Event {
        Event::message(self.to_json_string()).event_type(self.name())
    }
}
