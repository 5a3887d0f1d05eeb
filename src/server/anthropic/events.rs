//! The Server-Sent Events of a streamed message, in Anthropic's order: `message_start`,
//! `ping`, then for each block `content_block_start`, its `content_block_delta`s and
//! `content_block_stop`, then `message_delta` (stop reason and usage) and `message_stop`;
//! or, once the stream has begun, one `error`.

use poem_openapi::{Object, Union, types::ToJSON};
use serde_json::Value;

use super::{
    error_info,
    wire::{
        AnswerContent, AnswerMessage, AnthropicStopReason, MessageUsage, ThinkingOutput,
        stop_sequence,
    },
};
use crate::{
    content::{TextBlock, ToolUseBlock},
    error::{Error, Result},
    provider::{Chunk, ReasoningPiece},
    server::sse::ServerSentEvent,
};

/// One event; its `type` is also the SSE event's name.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type", rename = "AnthropicStreamEvent")]
pub enum MessageEvent {
    /// The message, with no content yet and `usage` 0: the gateway knows the usage at the
    /// end, and gives it in `message_delta`.
    #[oai(mapping = "message_start")]
    MessageStart(MessageStart),
    #[oai(mapping = "ping")]
    Ping(Empty),
    #[oai(mapping = "content_block_start")]
    BlockStart(BlockStart),
    #[oai(mapping = "content_block_delta")]
    BlockDelta(BlockDelta),
    #[oai(mapping = "content_block_stop")]
    BlockStop(BlockStop),
    /// The stop reason and the usage of the whole message (input tokens included).
    #[oai(mapping = "message_delta")]
    MessageDelta(MessageDelta),
    #[oai(mapping = "message_stop")]
    MessageStop(Empty),
    /// The answer failed after the stream began; the stream ends.
    #[oai(mapping = "error")]
    Error(ErrorEvent),
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageStart")]
pub struct MessageStart {
    pub message: AnswerMessage,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicEmptyEvent")]
pub struct Empty {}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicBlockStart")]
pub struct BlockStart {
    pub index: u32,
    /// `text` and `thinking` empty, `tool_use` with input `{}`.
    pub content_block: AnswerContent,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicBlockDelta")]
pub struct BlockDelta {
    pub index: u32,
    pub delta: Delta,
}

#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type", rename = "AnthropicDelta")]
pub enum Delta {
    #[oai(mapping = "text_delta")]
    Text(TextBlock),
    /// A fragment of the JSON text of a tool call's input.
    #[oai(mapping = "input_json_delta")]
    InputJson(InputJsonDelta),
    #[oai(mapping = "thinking_delta")]
    Thinking(ThinkingDelta),
    #[oai(mapping = "signature_delta")]
    Signature(SignatureDelta),
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicInputJsonDelta")]
pub struct InputJsonDelta {
    pub partial_json: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicThinkingDelta")]
pub struct ThinkingDelta {
    pub thinking: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicSignatureDelta")]
pub struct SignatureDelta {
    pub signature: String,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicBlockStop")]
pub struct BlockStop {
    pub index: u32,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessageDelta")]
pub struct MessageDelta {
    pub delta: StopDelta,
    pub usage: MessageUsage,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicStopDelta")]
pub struct StopDelta {
    pub stop_reason: AnthropicStopReason,
    pub stop_sequence: Option<String>,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorEvent")]
pub struct ErrorEvent {
    pub error: super::ErrorInfo,
}

impl MessageEvent {
    pub fn name(&self) -> &'static str {
        match self {
            MessageEvent::MessageStart(_) => "message_start",
            MessageEvent::Ping(_) => "ping",
            MessageEvent::BlockStart(_) => "content_block_start",
            MessageEvent::BlockDelta(_) => "content_block_delta",
            MessageEvent::BlockStop(_) => "content_block_stop",
            MessageEvent::MessageDelta(_) => "message_delta",
            MessageEvent::MessageStop(_) => "message_stop",
            MessageEvent::Error(_) => "error",
        }
    }
}

impl ServerSentEvent for MessageEvent {
    fn sse(&self) -> Vec<u8> {
        let name = self.name();
        let data = self.to_json_string();
        let mut sse = Vec::with_capacity(data.len() + name.len() + 16);
        sse.extend_from_slice(b"event: ");
        sse.extend_from_slice(name.as_bytes());
        sse.extend_from_slice(b"\ndata: ");
        // JSON escapes line breaks, so the data is a single line.
        sse.extend_from_slice(data.as_bytes());
        sse.extend_from_slice(b"\n\n");
        sse
    }
}

/// The block being written.
enum Open {
    Text,
    Thinking { signed: bool },
    ToolUse { id: String },
}

/// Turns the chunks of one answer into events, opening and closing blocks as the kind of
/// chunk changes.
pub struct Blocks {
    open: Option<Open>,
    /// Index of the open block, or of the next one.
    index: u32,
    stop: Vec<String>,
}

impl Blocks {
    /// `stop`: the request's stop sequences, to name the one that ended the answer.
    pub fn new(stop: Vec<String>) -> Self {
        Blocks {
            open: None,
            index: 0,
            stop,
        }
    }

    /// The events of the stream's first moments.
    pub fn start(message: AnswerMessage) -> [MessageEvent; 2] {
        [
            MessageEvent::MessageStart(MessageStart { message }),
            MessageEvent::Ping(Empty {}),
        ]
    }

    /// The events of one item of the answer; the last item (`Done` or an error) ends the
    /// message.
    pub fn events(&mut self, item: Result<Chunk>) -> Vec<MessageEvent> {
        let mut events = Vec::with_capacity(2);
        match item {
            Ok(Chunk::Text(text)) => {
                if !matches!(self.open, Some(Open::Text)) {
                    self.open(
                        Open::Text,
                        AnswerContent::Text(TextBlock {
                            text: String::new(),
                        }),
                        &mut events,
                    );
                }
                events.push(self.delta(Delta::Text(TextBlock { text })));
            }
            Ok(Chunk::Reasoning(ReasoningPiece { text, signature })) => {
                if !matches!(self.open, Some(Open::Thinking { signed: false })) {
                    self.open(
                        Open::Thinking { signed: false },
                        AnswerContent::Thinking(ThinkingOutput {
                            thinking: String::new(),
                            signature: String::new(),
                        }),
                        &mut events,
                    );
                }
                if !text.is_empty() {
                    events.push(self.delta(Delta::Thinking(ThinkingDelta { thinking: text })));
                }
                if let Some(signature) = signature {
                    self.open = Some(Open::Thinking { signed: true });
                    events.push(self.delta(Delta::Signature(SignatureDelta { signature })));
                }
            }
            Ok(Chunk::ToolCallStart { id, name }) => {
                self.open_tool_use(id, name, &mut events);
            }
            Ok(Chunk::ToolCallInput(partial_json)) => {
                if matches!(self.open, Some(Open::ToolUse { .. })) {
                    events.push(self.delta(Delta::InputJson(InputJsonDelta { partial_json })));
                }
            }
            Ok(Chunk::ToolCall(call)) => {
                // A provider that does not stream a call's input gives it whole here.
                if !matches!(&self.open, Some(Open::ToolUse { id }) if *id == call.id) {
                    self.open_tool_use(call.id, call.name, &mut events);
                    events.push(self.delta(Delta::InputJson(InputJsonDelta {
                        partial_json: call.input.to_string(),
                    })));
                }
                self.close(&mut events);
            }
            Ok(Chunk::Done(finish)) => {
                self.close(&mut events);
                events.push(MessageEvent::MessageDelta(MessageDelta {
                    delta: StopDelta {
                        stop_reason: finish.stop_reason.into(),
                        stop_sequence: stop_sequence(finish.stop_reason, &self.stop),
                    },
                    usage: finish.usage.into(),
                }));
                events.push(MessageEvent::MessageStop(Empty {}));
            }
            Err(err) => events.push(error_event(&err)),
        }
        events
    }

    fn open_tool_use(&mut self, id: String, name: String, events: &mut Vec<MessageEvent>) {
        self.open(
            Open::ToolUse { id: id.clone() },
            AnswerContent::ToolUse(ToolUseBlock {
                id,
                name,
                input: Value::Object(Default::default()),
            }),
            events,
        );
    }

    fn open(&mut self, block: Open, start: AnswerContent, events: &mut Vec<MessageEvent>) {
        self.close(events);
        self.open = Some(block);
        events.push(MessageEvent::BlockStart(BlockStart {
            index: self.index,
            content_block: start,
        }));
    }

    fn close(&mut self, events: &mut Vec<MessageEvent>) {
        if self.open.take().is_some() {
            events.push(MessageEvent::BlockStop(BlockStop { index: self.index }));
            self.index += 1;
        }
    }

    fn delta(&self, delta: Delta) -> MessageEvent {
        MessageEvent::BlockDelta(BlockDelta {
            index: self.index,
            delta,
        })
    }
}

pub fn error_event(err: &Error) -> MessageEvent {
    MessageEvent::Error(ErrorEvent {
        error: error_info(err),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Finish, StopReason, ToolCall, Usage};

    fn names(events: &[MessageEvent]) -> Vec<String> {
        events
            .iter()
            .map(|event| match event {
                MessageEvent::BlockDelta(delta) => format!(
                    "{}:{}",
                    delta.index,
                    delta.delta.to_json().unwrap()["type"].as_str().unwrap()
                ),
                MessageEvent::BlockStart(start) => format!("start:{}", start.index),
                MessageEvent::BlockStop(stop) => format!("stop:{}", stop.index),
                other => other.name().to_owned(),
            })
            .collect()
    }

    #[test]
    fn blocks_open_and_close_as_the_kind_of_chunk_changes() {
        let mut blocks = Blocks::new(vec![]);
        let chunks = [
            Chunk::Reasoning(ReasoningPiece {
                text: "hmm".into(),
                signature: None,
            }),
            Chunk::Reasoning(ReasoningPiece {
                text: String::new(),
                signature: Some("sig".into()),
            }),
            Chunk::Text("Let me check.".into()),
            Chunk::ToolCallStart {
                id: "t1".into(),
                name: "weather".into(),
            },
            Chunk::ToolCallInput("{\"city\":".into()),
            Chunk::ToolCallInput("\"Paris\"}".into()),
            Chunk::ToolCall(ToolCall {
                id: "t1".into(),
                name: "weather".into(),
                input: serde_json::json!({"city": "Paris"}),
            }),
            Chunk::ToolCall(ToolCall {
                id: "t2".into(),
                name: "weather".into(),
                input: serde_json::json!({"city": "Rome"}),
            }),
            Chunk::Done(Finish {
                stop_reason: StopReason::ToolUse,
                usage: Usage::new(3, 4),
            }),
        ];
        let events: Vec<_> = chunks
            .into_iter()
            .flat_map(|chunk| blocks.events(Ok(chunk)))
            .collect();
        assert_eq!(
            names(&events),
            [
                "start:0",
                "0:thinking_delta",
                "0:signature_delta",
                "stop:0",
                "start:1",
                "1:text_delta",
                "stop:1",
                "start:2",
                "2:input_json_delta",
                "2:input_json_delta",
                "stop:2",
                "start:3",
                "3:input_json_delta",
                "stop:3",
                "message_delta",
                "message_stop",
            ]
        );
        let sse = String::from_utf8(events[14].sse()).unwrap();
        assert_eq!(
            sse,
            "event: message_delta\ndata: {\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"type\":\"message_delta\",\"usage\":{\"input_tokens\":3,\"output_tokens\":4}}\n\n"
        );
    }
}
