//! A streamed chat completion: the gateway's chunks as `data: {chat.completion.chunk}` lines,
//! each written once, directly (the part that is the same in every chunk is written once per
//! answer), and `data: [DONE]` at the end.

use std::{borrow::Cow, sync::Arc};

use futures_util::{Stream, StreamExt};
use poem_openapi::{
    registry::{MetaSchemaRef, Registry},
    types::{ToJSON, Type},
};
use serde::Serialize;

use super::{
    error::ErrorBody,
    types::{CompletionUsage, FinishReason, StreamData},
};
use crate::{
    error::{Error, Result},
    provider::{Chunk, ToolCall},
    server::sse::ServerSentEvent,
};

/// One `data:` line of the stream.
pub struct StreamLine {
    head: Arc<ChunkHead>,
    kind: Line,
}

/// What every chunk of one answer shares.
pub struct ChunkHead {
    /// `{"id":…,"object":"chat.completion.chunk","created":…,"model":…`
    prefix: Vec<u8>,
    /// `,"usage":null` with `include_usage` (OpenAI's chunks carry it then), else nothing.
    null_usage: &'static [u8],
}

enum Line {
    Delta(Delta),
    Finish(FinishReason),
    Usage(CompletionUsage),
    Error(Error),
    Done,
}

/// A chunk's `delta`, serialized as OpenAI writes it.
#[derive(Serialize)]
#[serde(untagged)]
enum Delta {
    Role {
        role: &'static str,
        content: &'static str,
    },
    Content {
        content: String,
    },
    Reasoning {
        reasoning_content: String,
    },
    ToolCall {
        tool_calls: [ToolCallDelta; 1],
    },
}

#[derive(Serialize)]
struct ToolCallDelta {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta,
}

#[derive(Serialize)]
struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    arguments: Option<String>,
}

impl ChunkHead {
    pub fn new(id: &str, created: u64, model: &str, include_usage: bool) -> Arc<ChunkHead> {
        let mut prefix = Vec::with_capacity(96 + model.len());
        prefix.extend_from_slice(br#"{"id":"#);
        serde_json::to_writer(&mut prefix, id).expect("a string serializes");
        prefix.extend_from_slice(br#","object":"chat.completion.chunk","created":"#);
        prefix.extend_from_slice(created.to_string().as_bytes());
        prefix.extend_from_slice(br#","model":"#);
        serde_json::to_writer(&mut prefix, model).expect("a string serializes");
        Arc::new(ChunkHead {
            prefix,
            null_usage: if include_usage {
                br#","usage":null"#
            } else {
                b""
            },
        })
    }
}

/// The lines of a streamed answer: the role, then a line per piece the model writes, then the
/// finish reason, the usage if asked for, and `[DONE]`; or an error line, which ends it.
pub fn lines(
    mut chunks: impl Stream<Item = Result<Chunk>> + Unpin + Send + 'static,
    head: Arc<ChunkHead>,
    include_usage: bool,
) -> impl Stream<Item = StreamLine> + Send + 'static {
    let line = move |kind| StreamLine {
        head: head.clone(),
        kind,
    };
    async_stream::stream! {
        yield line(Line::Delta(Delta::Role { role: "assistant", content: "" }));
        let mut calls = ToolCalls::default();
        while let Some(item) = chunks.next().await {
            match item {
                Ok(Chunk::Text(content)) => yield line(Line::Delta(Delta::Content { content })),
                Ok(Chunk::Reasoning(piece)) => {
                    if !piece.text.is_empty() {
                        yield line(Line::Delta(Delta::Reasoning { reasoning_content: piece.text }));
                    }
                }
                Ok(Chunk::ToolCallStart { id, name }) => {
                    yield line(Line::Delta(calls.start(id, name, String::new())));
                }
                Ok(Chunk::ToolCallInput(fragment)) => {
                    yield line(Line::Delta(calls.fragment(fragment)));
                }
                Ok(Chunk::ToolCall(call)) => {
                    if let Some(whole) = calls.complete(call) {
                        yield line(Line::Delta(whole));
                    }
                }
                Ok(Chunk::Done(finish)) => {
                    yield line(Line::Finish(super::finish_reason(finish.stop_reason)));
                    if include_usage {
                        yield line(Line::Usage(super::usage(finish.usage)));
                    }
                    yield line(Line::Done);
                    return;
                }
                Err(err) => {
                    yield line(Line::Error(err));
                    return;
                }
            }
        }
    }
}

/// The tool calls of an answer so far, to number them.
#[derive(Default)]
struct ToolCalls {
    count: u32,
    /// The call whose fragments are arriving.
    open: Option<String>,
}

impl ToolCalls {
    fn start(&mut self, id: String, name: String, arguments: String) -> Delta {
        self.count += 1;
        self.open = Some(id.clone());
        Delta::ToolCall {
            tool_calls: [ToolCallDelta {
                index: self.count - 1,
                id: Some(id),
                kind: Some("function"),
                function: FunctionDelta {
                    name: Some(name),
                    arguments: Some(arguments),
                },
            }],
        }
    }

    fn fragment(&self, arguments: String) -> Delta {
        Delta::ToolCall {
            tool_calls: [ToolCallDelta {
                index: self.count.saturating_sub(1),
                id: None,
                kind: None,
                function: FunctionDelta {
                    name: None,
                    arguments: Some(arguments),
                },
            }],
        }
    }

    /// A call whose fragments were streamed needs nothing more; one that comes whole (from a
    /// model that does not stream its calls) is sent whole.
    fn complete(&mut self, call: ToolCall) -> Option<Delta> {
        if self.open.take().is_some_and(|id| id == call.id) {
            return None;
        }
        let delta = self.start(call.id, call.name, call.input.to_string());
        self.open = None;
        Some(delta)
    }
}

impl ServerSentEvent for StreamLine {
    fn sse(&self) -> Vec<u8> {
        let head = &self.head;
        let mut out = Vec::with_capacity(head.prefix.len() + 128);
        out.extend_from_slice(b"data: ");
        match &self.kind {
            Line::Done => out.extend_from_slice(b"[DONE]"),
            Line::Error(err) => {
                out.extend_from_slice(ErrorBody::of(err).to_json_string().as_bytes())
            }
            Line::Delta(delta) => {
                out.extend_from_slice(&head.prefix);
                out.extend_from_slice(br#","choices":[{"index":0,"delta":"#);
                serde_json::to_writer(&mut out, delta).expect("a delta serializes");
                out.extend_from_slice(br#","finish_reason":null}]"#);
                out.extend_from_slice(head.null_usage);
                out.push(b'}');
            }
            Line::Finish(reason) => {
                out.extend_from_slice(&head.prefix);
                out.extend_from_slice(br#","choices":[{"index":0,"delta":{},"finish_reason":""#);
                out.extend_from_slice(reason.as_str().as_bytes());
                out.extend_from_slice(br#""}]"#);
                out.extend_from_slice(head.null_usage);
                out.push(b'}');
            }
            Line::Usage(usage) => {
                out.extend_from_slice(&head.prefix);
                out.extend_from_slice(br#","choices":[],"usage":"#);
                serde_json::to_writer(&mut out, usage).expect("usage serializes");
                out.push(b'}');
            }
        }
        out.extend_from_slice(b"\n\n");
        out
    }
}

/// Documented as [`StreamData`], which is what each line holds.
impl Type for StreamLine {
    const IS_REQUIRED: bool = true;
    type RawValueType = Self;
    type RawElementValueType = Self;

    fn name() -> Cow<'static, str> {
        StreamData::name()
    }

    fn schema_ref() -> MetaSchemaRef {
        StreamData::schema_ref()
    }

    fn register(registry: &mut Registry) {
        StreamData::register(registry);
    }

    fn as_raw_value(&self) -> Option<&Self::RawValueType> {
        Some(self)
    }

    fn raw_element_iter<'a>(
        &'a self,
    ) -> Box<dyn Iterator<Item = &'a Self::RawElementValueType> + 'a> {
        Box::new(self.as_raw_value().into_iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::{Finish, StopReason, Usage};
    use serde_json::{Value, json};

    fn data_of(lines: Vec<StreamLine>) -> Vec<String> {
        lines
            .iter()
            .map(|line| {
                let sse = String::from_utf8(line.sse()).unwrap();
                let data = sse.strip_prefix("data: ").expect("a data line");
                data.strip_suffix("\n\n").expect("one line").to_owned()
            })
            .collect()
    }

    async fn stream_of(chunks: Vec<Result<Chunk>>, include_usage: bool) -> Vec<String> {
        let head = ChunkHead::new("chatcmpl-1", 7, "m\"odel", include_usage);
        let lines = lines(futures_util::stream::iter(chunks), head, include_usage)
            .collect::<Vec<_>>()
            .await;
        data_of(lines)
    }

    fn chunk(choices: Value, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
            "model": "m\"odel", "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }

    fn delta(delta: Value, finish_reason: Value) -> Value {
        json!([{"index": 0, "delta": delta, "finish_reason": finish_reason}])
    }

    #[tokio::test]
    async fn text_tool_calls_finish_and_usage_are_openais_chunks_in_order() {
        let call = ToolCall {
            id: "t1".into(),
            name: "weather".into(),
            input: json!({"city": "Paris"}),
        };
        let whole = ToolCall {
            id: "t2".into(),
            name: "time".into(),
            input: json!({}),
        };
        let mut usage = Usage::new(10, 5);
        usage.cache_read_input_tokens = Some(4);
        let data = stream_of(
            vec![
                Ok(Chunk::Text("Hel\"lo".into())),
                Ok(Chunk::ToolCallStart {
                    id: "t1".into(),
                    name: "weather".into(),
                }),
                Ok(Chunk::ToolCallInput("{\"city\":".into())),
                Ok(Chunk::ToolCallInput("\"Paris\"}".into())),
                Ok(Chunk::ToolCall(call)),
                Ok(Chunk::ToolCall(whole)),
                Ok(Chunk::Done(Finish {
                    stop_reason: StopReason::ToolUse,
                    usage,
                })),
            ],
            true,
        )
        .await;
        let parsed: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let null = Some(Value::Null);
        let call_delta =
            |index: u32, call: Value| json!({"tool_calls": [{"index": index, "function": call}]});
        assert_eq!(
            parsed,
            vec![
                chunk(
                    delta(json!({"role": "assistant", "content": ""}), Value::Null),
                    null.clone()
                ),
                chunk(
                    delta(json!({"content": "Hel\"lo"}), Value::Null),
                    null.clone()
                ),
                chunk(
                    delta(
                        json!({"tool_calls": [{"index": 0, "id": "t1", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
                        Value::Null
                    ),
                    null.clone()
                ),
                chunk(
                    delta(
                        call_delta(0, json!({"arguments": "{\"city\":"})),
                        Value::Null
                    ),
                    null.clone()
                ),
                chunk(
                    delta(
                        call_delta(0, json!({"arguments": "\"Paris\"}"})),
                        Value::Null
                    ),
                    null.clone()
                ),
                chunk(
                    delta(
                        json!({"tool_calls": [{"index": 1, "id": "t2", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}),
                        Value::Null
                    ),
                    null.clone()
                ),
                chunk(delta(json!({}), json!("tool_calls")), null),
                chunk(
                    json!([]),
                    Some(json!({
                        "prompt_tokens": 14, "completion_tokens": 5, "total_tokens": 19,
                        "prompt_tokens_details": {"cached_tokens": 4}
                    }))
                ),
            ]
        );
        assert_eq!(data.last().unwrap(), "[DONE]");
    }

    #[tokio::test]
    async fn without_include_usage_no_usage_and_an_error_ends_the_stream() {
        let data = stream_of(
            vec![
                Ok(Chunk::Text("Hi".into())),
                Err(Error::UpstreamTimeout("too slow".into())),
            ],
            false,
        )
        .await;
        assert_eq!(data.len(), 3);
        let text: Value = serde_json::from_str(&data[1]).unwrap();
        assert_eq!(
            text,
            chunk(delta(json!({"content": "Hi"}), Value::Null), None)
        );
        let error: Value = serde_json::from_str(&data[2]).unwrap();
        assert_eq!(error["error"]["code"], "upstream_timeout");
        assert_eq!(error["error"]["type"], "server_error");
    }
}
