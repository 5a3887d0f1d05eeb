//! The frames a streaming client receives: the data of the SSE events and the WebSocket
//! JSON mode's messages are the same objects.

use std::io::Write;

use poem_openapi::{Object, Union, types::ToJSON};

use crate::{
    content::ToolUseBlock,
    error::{Error, ErrorBody},
    provider::{Chunk, Finish, ReasoningPiece, StopReason, Usage},
    resume::EventId,
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

    /// An answer's item as a stored event: its name and its JSON (see [`crate::resume`]);
    /// none for an item without an event ([`StreamEvent::of`]).
    pub fn serialize(item: crate::error::Result<Chunk>) -> Option<(&'static str, Vec<u8>)> {
        let event = StreamEvent::of(item)?;
        let mut json = Vec::with_capacity(event.len_hint());
        event.write_json(&mut json);
        Some((event.name(), json))
    }

    /// The event as one SSE message with its `id:`, as [`sse_message`] writes it.
    pub fn sse(&self, id: Option<&EventId>) -> Vec<u8> {
        let mut json = Vec::with_capacity(self.len_hint());
        self.write_json(&mut json);
        sse_message(id, self.name().as_bytes(), &json)
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

/// One SSE message: `id: <id>` (when the event has one), `event: <name>` and one `data:`
/// line, byte for byte as poem's `Event` writes it, in a single buffer. JSON escapes line
/// breaks, so the data is always a single line.
pub fn sse_message(id: Option<&EventId>, name: &[u8], json: &[u8]) -> Vec<u8> {
    let mut sse = Vec::with_capacity(json.len() + name.len() + 64);
    if let Some(id) = id {
        // Writing to a Vec cannot fail.
        let _ = writeln!(sse, "id: {id}");
    }
    sse.extend_from_slice(b"event: ");
    sse.extend_from_slice(name);
    sse.extend_from_slice(b"\ndata: ");
    sse.extend_from_slice(json);
    sse.extend_from_slice(b"\n\n");
    sse
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
        let id = EventId {
            stream: crate::resume::StreamId::new(),
            seq: 7,
        };
        for event in events {
            let poem = poem::web::sse::Event::message(event.to_json_string())
                .event_type(event.name())
                .id(id.to_string())
                .to_string();
            assert_eq!(String::from_utf8(event.sse(Some(&id))).unwrap(), poem);
        }
    }
}
