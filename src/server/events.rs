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
        Event::message(self.json()).event_type(self.name())
    }

    /// The event as JSON, byte for byte as [`ToJSON::to_json_string`] writes it. A chunk is
    /// written directly: the generic path builds a `serde_json::Value` tree first, which
    /// cost 5 of the 26 heap allocations per streamed chunk (bench/RESULTS.md).
    pub fn json(&self) -> String {
        match self {
            StreamEvent::Chunk(piece) => {
                let mut json = Vec::with_capacity(piece.text.len() + 32);
                json.extend_from_slice(br#"{"text":"#);
                serde_json::to_writer(&mut json, &piece.text).expect("a string serializes");
                json.extend_from_slice(br#","type":"chunk"}"#);
                String::from_utf8(json).expect("serde_json writes UTF-8")
            }
            other => other.to_json_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_written_as_the_generic_json_writer_would() {
        for text in [
            "Hello",
            "",
            "quote \" and \\ backslash",
            "line\nbreak\ttab\u{1}",
            "héllo ✓ 😀",
        ] {
            let event = StreamEvent::Chunk(TextPiece { text: text.into() });
            assert_eq!(event.json(), event.to_json_string());
        }
    }
}
