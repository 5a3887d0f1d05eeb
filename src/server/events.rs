//! The frames a streaming client receives: the data of the SSE events and the WebSocket
//! JSON mode's messages are the same objects.

use poem_openapi::{Object, Union, types::ToJSON};

use crate::{
    content::ToolUseBlock,
    error::{Error, ErrorBody},
    provider::{Chunk, Finish, ReasoningPiece, StopReason, Usage},
};

/// One event of an answer stream: any number of `chunk`, `reasoning` and `tool_call`, in
/// the order the model wrote them, then one `done` or one `error`.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type")]
pub enum StreamEvent {
    #[oai(mapping = "chunk")]
    Chunk(TextPiece),
    /// A piece of the model's reasoning (its signature on the last piece, where the model
    /// signs it).
    #[oai(mapping = "reasoning")]
    Reasoning(ReasoningPiece),
    /// A tool call, once it is complete.
    #[oai(mapping = "tool_call")]
    ToolCall(ToolUseBlock),
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

impl StreamEvent {
    /// The event of a stream item; none for the start and the input fragments of a tool
    /// call (this API gives the call once it is complete).
    pub fn of(item: crate::error::Result<Chunk>) -> Option<Self> {
        Some(match item {
            Ok(Chunk::Text(text)) => StreamEvent::Chunk(TextPiece { text }),
            Ok(Chunk::Reasoning(piece)) => StreamEvent::Reasoning(piece),
            Ok(Chunk::ToolCall(call)) => StreamEvent::ToolCall(call.into()),
            Ok(Chunk::ToolCallStart { .. } | Chunk::ToolCallInput(_)) => return None,
            Ok(Chunk::Done(finish)) => StreamEvent::Done(finish.into()),
            Err(err) => StreamEvent::from(&err),
        })
    }

    /// Whether the stream ends with this event.
    pub fn is_last(&self) -> bool {
        matches!(self, StreamEvent::Done(_) | StreamEvent::Error(_))
    }
}

impl From<Finish> for Finished {
    fn from(finish: Finish) -> Self {
        Finished {
            stop_reason: finish.stop_reason,
            usage: finish.usage,
        }
    }
}

impl From<&Error> for StreamEvent {
    fn from(err: &Error) -> Self {
        StreamEvent::Error(err.body())
    }
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StreamEvent::Chunk(_) => "chunk",
            StreamEvent::Reasoning(_) => "reasoning",
            StreamEvent::ToolCall(_) => "tool_call",
            StreamEvent::Done(_) => "done",
            StreamEvent::Error(_) => "error",
        }
    }

    /// The event as JSON, byte for byte as [`ToJSON::to_json_string`] writes it.
    pub fn json(&self) -> String {
        let mut json = Vec::with_capacity(self.len_hint());
        self.write_json(&mut json);
        String::from_utf8(json).expect("serde_json writes UTF-8")
    }

    /// The event as one SSE message, `event: <name>` and one `data:` line, byte for byte as
    /// poem's `Event` writes it, in a single buffer.
    pub fn sse(&self) -> Vec<u8> {
        let name = self.name();
        let mut sse = Vec::with_capacity(self.len_hint() + name.len() + 16);
        sse.extend_from_slice(b"event: ");
        sse.extend_from_slice(name.as_bytes());
        sse.extend_from_slice(b"\ndata: ");
        // JSON escapes line breaks, so the data is always a single line.
        self.write_json(&mut sse);
        sse.extend_from_slice(b"\n\n");
        sse
    }

    /// A chunk is written directly: the generic path builds a `serde_json::Value` tree
    /// first, a fifth of a streamed chunk's heap allocations (bench/RESULTS.md).
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            StreamEvent::Chunk(piece) => {
                out.extend_from_slice(br#"{"text":"#);
                serde_json::to_writer(&mut *out, &piece.text).expect("a string serializes");
                out.extend_from_slice(br#","type":"chunk"}"#);
            }
            other => out.extend_from_slice(other.to_json_string().as_bytes()),
        }
    }

    fn len_hint(&self) -> usize {
        match self {
            StreamEvent::Chunk(piece) => piece.text.len() + 32,
            _ => 128,
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

    #[test]
    fn every_event_is_written_as_poems_sse_writer_would() {
        let events = [
            StreamEvent::Chunk(TextPiece {
                text: "line\nbreak and \"quotes\"".into(),
            }),
            StreamEvent::Done(Finished {
                stop_reason: StopReason::EndTurn,
                usage: Usage::new(3, 5),
            }),
            StreamEvent::from(&Error::Cancelled),
        ];
        for event in events {
            let poem = poem::web::sse::Event::message(event.to_json_string())
                .event_type(event.name())
                .to_string();
            assert_eq!(String::from_utf8(event.sse()).unwrap(), poem);
        }
    }
}
