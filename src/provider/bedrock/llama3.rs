//! Meta Llama 3's native InvokeModel body and stream events.

use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Serialize};

use super::format::{InvocationMetrics, parse_json};
use crate::{
    error::Result,
    provider::{Chunk, Finish, StopMatcher, StopReason, StopScan, Usage},
    request::ValidRequest,
    special_tokens::SpecialTokens,
};

/// Llama's native body has no stop sequences: the gateway applies them (see [`StopMatcher`]).
#[derive(Serialize)]
struct Body {
    prompt: String,
    max_gen_len: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
}

pub fn request_body(request: &ValidRequest) -> Vec<u8> {
    let body = Body {
        prompt: render_prompt(request),
        max_gen_len: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
    };
    serde_json::to_vec(&body).expect("a struct of strings and numbers serializes")
}

/// Llama 3's special tokens (ids 128000 to 128255 of Llama 3, 3.1 and 3.2, and 3.2's
/// `<|image|>`), all of which its tokenizer reads from prompt text as control tokens.
const NAMED_SPECIAL_TOKENS: &[&str] = &[
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
    "<|image|>",
];
/// The rest are `<|reserved_special_token_N|>` (N up to 250 in Llama 3, 247 in 3.1).
const RESERVED_SPECIAL_TOKENS: u32 = 256;

pub fn special_tokens() -> Arc<SpecialTokens> {
    static TOKENS: LazyLock<Arc<SpecialTokens>> = LazyLock::new(|| {
        let reserved =
            (0..RESERVED_SPECIAL_TOKENS).map(|n| format!("<|reserved_special_token_{n}|>"));
        let tokens = NAMED_SPECIAL_TOKENS
            .iter()
            .map(|t| t.to_string())
            .chain(reserved);
        Arc::new(SpecialTokens::new(tokens).expect("a few hundred tokens fit an automaton"))
    });
    TOKENS.clone()
}

/// The Llama 3 instruct template, ending with the open assistant header. User text has been
/// through [`SpecialTokens::guard`] with [`special_tokens`].
pub fn render_prompt(request: &ValidRequest) -> String {
    let mut prompt = String::from("<|begin_of_text|>");
    let mut turn = |role: &str, content: &str| {
        prompt.push_str("<|start_header_id|>");
        prompt.push_str(role);
        prompt.push_str("<|end_header_id|>\n\n");
        prompt.push_str(content);
        prompt.push_str("<|eot_id|>");
    };
    if let Some(system) = &request.system {
        turn("system", system);
    }
    for message in &request.messages {
        turn(message.role.as_str(), &message.joined_text());
    }
    prompt.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
    prompt
}

fn stop_reason(native: &str) -> StopReason {
    match native {
        "length" => StopReason::MaxTokens,
        "content_filtered" => StopReason::ContentFiltered,
        _ => StopReason::EndTurn,
    }
}

#[derive(Deserialize)]
struct StreamEvent {
    #[serde(default)]
    generation: String,
    prompt_token_count: Option<u32>,
    generation_token_count: Option<u32>,
    stop_reason: Option<String>,
    #[serde(rename = "amazon-bedrock-invocationMetrics")]
    metrics: Option<InvocationMetrics>,
}

/// Turns stream events into chunks, keeping the running token counts.
pub struct StreamDecoder {
    usage: Usage,
    stop: StopMatcher,
}

impl StreamDecoder {
    pub fn new(request: &ValidRequest) -> Self {
        Self {
            usage: Usage::default(),
            stop: StopMatcher::new(request.stop.clone()),
        }
    }

    pub fn decode(&mut self, payload: &[u8]) -> Result<Vec<Chunk>> {
        let event: StreamEvent = parse_json(payload)?;
        if let Some(count) = event.prompt_token_count {
            self.usage.input_tokens = count;
        }
        if let Some(count) = event.generation_token_count {
            self.usage.output_tokens = count;
        }
        if let Some(metrics) = event.metrics {
            self.usage = metrics.usage();
        }
        let mut chunks = Vec::with_capacity(1);
        if !event.generation.is_empty() {
            match self.stop.push(&event.generation) {
                StopScan::Continue(text) => push_text(&mut chunks, text),
                StopScan::Stop(text) => {
                    push_text(&mut chunks, text);
                    chunks.push(self.done(StopReason::StopSequence));
                    return Ok(chunks);
                }
            }
        }
        if let Some(native) = event.stop_reason {
            push_text(&mut chunks, self.stop.finish());
            chunks.push(self.done(stop_reason(&native)));
        }
        Ok(chunks)
    }

    pub fn usage(&self) -> Usage {
        self.usage
    }

    fn done(&self, stop_reason: StopReason) -> Chunk {
        Chunk::Done(Finish {
            stop_reason,
            usage: self.usage,
        })
    }
}

fn push_text(chunks: &mut Vec<Chunk>, text: String) {
    if !text.is_empty() {
        chunks.push(Chunk::Text(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{Message, Role};

    fn request(stop: &[&str]) -> ValidRequest {
        ValidRequest {
            system: Some("Be brief.".into()),
            messages: vec![
                Message::text(Role::User, "Hi"),
                Message::text(Role::Assistant, "Hello!"),
                Message::text(Role::User, "Capital of France?"),
            ],
            max_tokens: 64,
            temperature: Some(0.2),
            top_p: None,
            stop: stop.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn the_prompt_follows_the_llama3_instruct_template() {
        assert_eq!(
            render_prompt(&request(&[])),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn the_body_has_only_the_keys_llama_accepts() {
        let body: serde_json::Value =
            serde_json::from_slice(&request_body(&request(&["x"]))).unwrap();
        let keys: Vec<_> = body.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["max_gen_len", "prompt", "temperature"]);
    }

    #[test]
    fn stream_events_become_text_then_done_with_the_invocation_metrics() {
        let mut decoder = StreamDecoder::new(&request(&[]));
        let first = br#"{"generation":"Par","prompt_token_count":12,"generation_token_count":1,"stop_reason":null}"#;
        assert_eq!(decoder.decode(first).unwrap(), [Chunk::Text("Par".into())]);
        let last = br#"{"generation":"is","prompt_token_count":null,"generation_token_count":2,"stop_reason":"length",
            "amazon-bedrock-invocationMetrics":{"inputTokenCount":12,"outputTokenCount":2,"invocationLatency":5,"firstByteLatency":1}}"#;
        assert_eq!(
            decoder.decode(last).unwrap(),
            [
                Chunk::Text("is".into()),
                Chunk::Done(Finish {
                    stop_reason: StopReason::MaxTokens,
                    usage: Usage::new(12, 2)
                })
            ]
        );
    }

    #[test]
    fn the_gateway_applies_stop_sequences_llama_cannot() {
        let mut decoder = StreamDecoder::new(&request(&["\nUser:"]));
        let first = br#"{"generation":"Paris.\nUs","prompt_token_count":3,"generation_token_count":4,"stop_reason":null}"#;
        assert_eq!(
            decoder.decode(first).unwrap(),
            [Chunk::Text("Paris.".into())]
        );
        let second = br#"{"generation":"er: next","prompt_token_count":null,"generation_token_count":6,"stop_reason":null}"#;
        assert_eq!(
            decoder.decode(second).unwrap(),
            [Chunk::Done(Finish {
                stop_reason: StopReason::StopSequence,
                usage: Usage::new(3, 6)
            })]
        );
    }
}
