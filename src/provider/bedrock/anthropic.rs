//! Anthropic Claude 3's native Messages API body and stream events on Bedrock.

use serde::{Deserialize, Serialize};

use super::format::parse_json;
use crate::{
    error::Result,
    provider::{Chunk, Finish, StopReason, Usage},
    request::{Message as RequestMessage, ValidRequest},
};

const ANTHROPIC_VERSION: &str = "bedrock-2023-05-31";

#[derive(Serialize)]
struct Body<'a> {
    anthropic_version: &'static str,
    max_tokens: u32,
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
}

#[derive(Serialize)]
struct Message {
    role: &'static str,
    content: String,
}

impl From<&RequestMessage> for Message {
    /// The format takes text only (the registry refuses other blocks).
    fn from(message: &RequestMessage) -> Self {
        Message {
            role: message.role.as_str(),
            content: message.joined_text(),
        }
    }
}

pub fn request_body(request: &ValidRequest) -> Vec<u8> {
    let body = Body {
        anthropic_version: ANTHROPIC_VERSION,
        max_tokens: request.max_tokens,
        messages: request.messages.iter().map(Message::from).collect(),
        system: request.system.as_deref(),
        temperature: request.temperature,
        top_p: request.top_p,
        stop_sequences: &request.stop,
    };
    serde_json::to_vec(&body).expect("a struct of strings and numbers serializes")
}

fn stop_reason(native: Option<&str>) -> StopReason {
    match native {
        Some("max_tokens") => StopReason::MaxTokens,
        Some("stop_sequence") => StopReason::StopSequence,
        Some("refusal" | "guardrail_intervened" | "content_filtered") => {
            StopReason::ContentFiltered
        }
        _ => StopReason::EndTurn,
    }
}

#[derive(Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: u32,
    #[serde(default)]
    output_tokens: u32,
}

#[derive(Deserialize)]
struct ContentBlock {
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartedMessage,
    },
    ContentBlockDelta {
        delta: ContentBlock,
    },
    MessageDelta {
        delta: MessageDelta,
        usage: Option<AnthropicUsage>,
    },
    MessageStop,
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartedMessage {
    usage: AnthropicUsage,
}

#[derive(Deserialize)]
struct MessageDelta {
    stop_reason: Option<String>,
}

/// Turns stream events into chunks: text from `content_block_delta`, the stop reason and
/// output count from `message_delta`, the end at `message_stop`.
#[derive(Default)]
pub struct StreamDecoder {
    usage: Usage,
    stop_reason: Option<String>,
}

impl StreamDecoder {
    pub fn decode(&mut self, payload: &[u8]) -> Result<Vec<Chunk>> {
        Ok(match parse_json(payload)? {
            StreamEvent::MessageStart { message } => {
                self.usage.input_tokens = message.usage.input_tokens;
                self.usage.output_tokens = 0;
                vec![]
            }
            StreamEvent::ContentBlockDelta { delta } if !delta.text.is_empty() => {
                // Claude reports its output count only at the end; until then each text
                // delta counts as (at least) one token.
                self.usage.output_tokens += 1;
                vec![Chunk::Text(delta.text)]
            }
            StreamEvent::MessageDelta { delta, usage } => {
                self.stop_reason = delta.stop_reason;
                if let Some(usage) = usage {
                    self.usage.output_tokens = usage.output_tokens;
                }
                vec![]
            }
            StreamEvent::MessageStop => vec![Chunk::Done(Finish {
                stop_reason: stop_reason(self.stop_reason.as_deref()),
                usage: self.usage,
            })],
            StreamEvent::ContentBlockDelta { .. } | StreamEvent::Other => vec![],
        })
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Role;

    #[test]
    fn the_body_is_a_messages_api_request_for_bedrock() {
        let request = ValidRequest {
            system: Some("Be brief.".into()),
            messages: vec![RequestMessage::text(Role::User, "Hi")],
            max_tokens: 100,
            temperature: None,
            top_p: Some(0.9),
            stop: vec!["END".into()],
            ..Default::default()
        };
        let body: serde_json::Value = serde_json::from_slice(&request_body(&request)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 100,
                "messages": [{"role": "user", "content": "Hi"}],
                "system": "Be brief.",
                "top_p": 0.9,
                "stop_sequences": ["END"],
            })
        );
    }

    #[test]
    fn stream_events_become_text_then_done() {
        let mut decoder = StreamDecoder::default();
        let events: [&[u8]; 6] = [
            br#"{"type":"message_start","message":{"id":"m","usage":{"input_tokens":9,"output_tokens":1}}}"#,
            br#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            br#"{"type":"content_block_stop","index":0}"#,
            br#"{"type":"message_delta","delta":{"stop_reason":"stop_sequence","stop_sequence":"END"},"usage":{"output_tokens":3}}"#,
            br#"{"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":9,"outputTokenCount":3}}"#,
        ];
        let chunks: Vec<Chunk> = events
            .iter()
            .flat_map(|event| decoder.decode(event).unwrap())
            .collect();
        assert_eq!(
            chunks,
            [
                Chunk::Text("Hi".into()),
                Chunk::Done(Finish {
                    stop_reason: StopReason::StopSequence,
                    usage: Usage::new(9, 3)
                })
            ]
        );
    }
}
