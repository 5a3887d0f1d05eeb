//! Bedrock's Converse API through the SDK's typed ConverseStream: one request shape for
//! every model family (text, images, documents, tools, reasoning, guardrails, prompt
//! caching), and its typed events turned into chunks. Every transport, `/invoke` included,
//! reads the stream: first-token and idle timeouts and accounting stay in one place.

use std::collections::HashMap;

use aws_sdk_bedrockruntime::{
    Client,
    error::BuildError,
    operation::converse_stream::builders::ConverseStreamFluentBuilder,
    primitives::Blob,
    types::{
        self, AnyToolChoice, AutoToolChoice, CachePointBlock, CachePointType, ContentBlock,
        ContentBlockDelta, ContentBlockStart, ConversationRole, ConverseStreamOutput,
        DocumentBlock, DocumentSource, GuardrailStreamConfiguration, GuardrailStreamProcessingMode,
        ImageBlock, ImageSource, InferenceConfiguration, ReasoningContentBlock,
        ReasoningContentBlockDelta, ReasoningTextBlock, SpecificToolChoice, SystemContentBlock,
        ToolConfiguration, ToolInputSchema, ToolResultBlock, ToolResultContentBlock,
        ToolResultStatus, ToolSpecification, ToolUseBlock,
    },
};
use aws_smithy_types::{Document, Number};
use serde_json::{Map, Value};

use super::config::ConverseSettings;
use crate::{
    content::{Block, ToolChoice, ToolChoiceMode},
    error::{Error, Result},
    provider::{Chunk, Finish, ReasoningPiece, StopReason, ToolCall, Usage},
    request::{Role, ValidRequest},
};

/// The ConverseStream call for `request`, ready to send.
pub fn request(
    client: &Client,
    model_id: &str,
    settings: &ConverseSettings,
    request: &ValidRequest,
) -> Result<ConverseStreamFluentBuilder> {
    let messages = request
        .messages
        .iter()
        .map(|message| {
            types::Message::builder()
                .role(match message.role {
                    Role::User => ConversationRole::User,
                    Role::Assistant => ConversationRole::Assistant,
                })
                .set_content(Some(content(&message.content)?))
                .build()
                .map_err(built)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut system = Vec::new();
    if let Some(prompt) = &request.system {
        system.push(SystemContentBlock::Text(prompt.clone()));
        if settings.cache_prompt {
            system.push(SystemContentBlock::CachePoint(cache_point()?));
        }
    }
    let inference = InferenceConfiguration::builder()
        .max_tokens(i32::try_from(request.max_tokens).unwrap_or(i32::MAX))
        .set_temperature(request.temperature.map(|t| t as f32))
        .set_top_p(request.top_p.map(|p| p as f32))
        .set_stop_sequences((!request.stop.is_empty()).then(|| request.stop.clone()))
        .build();
    let mut call = client
        .converse_stream()
        .model_id(model_id)
        .set_messages(Some(messages))
        .set_system((!system.is_empty()).then_some(system))
        .inference_config(inference)
        .set_tool_config(tool_config(request, settings.cache_prompt)?);
    if let Some(guardrail) = &settings.guardrail {
        call = call.guardrail_config(
            GuardrailStreamConfiguration::builder()
                .guardrail_identifier(&guardrail.id)
                .guardrail_version(&guardrail.version)
                .trace(guardrail.trace.as_str().into())
                // The guardrail checks each piece before it is sent: nothing it blocks
                // reaches a client.
                .stream_processing_mode(GuardrailStreamProcessingMode::Sync)
                .build(),
        );
    }
    let mut fields = Value::Object(settings.additional_fields.clone());
    if let Some(overrides) = &request.additional_fields {
        merge(&mut fields, overrides);
    }
    if fields.as_object().is_some_and(|fields| !fields.is_empty()) {
        call = call.additional_model_request_fields(document(&fields));
    }
    Ok(call)
}

/// Merges the request's fields over the model's, as a JSON merge patch (RFC 7396): objects
/// merge key by key, `null` removes a key (`{"thinking": null}` turns reasoning off for
/// one request), anything else replaces.
fn merge(target: &mut Value, patch: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(fields) = target else {
        return;
    };
    for (key, value) in patch {
        match value {
            Value::Null => {
                fields.remove(key);
            }
            Value::Object(inner) => merge(fields.entry(key.clone()).or_insert(Value::Null), inner),
            other => {
                fields.insert(key.clone(), other.clone());
            }
        }
    }
}

/// The SDK's builders check required members; the gateway's validated blocks have them all.
fn built(err: BuildError) -> Error {
    Error::Upstream(format!(
        "the gateway could not build the Converse request: {err}"
    ))
}

fn cache_point() -> Result<CachePointBlock> {
    CachePointBlock::builder()
        .r#type(CachePointType::Default)
        .build()
        .map_err(built)
}

fn content(blocks: &[Block]) -> Result<Vec<ContentBlock>> {
    // Converse refuses blank text blocks; a message's text may be blank beside other blocks.
    blocks
        .iter()
        .filter(|block| !block.is_blank())
        .map(|block| {
            Ok(match block {
                Block::Text(text) => ContentBlock::Text(text.clone()),
                Block::Image(image) => ContentBlock::Image(image_block(image)?),
                Block::Document(document) => ContentBlock::Document(document_block(document)?),
                Block::ToolUse(call) => ContentBlock::ToolUse(
                    ToolUseBlock::builder()
                        .tool_use_id(&call.id)
                        .name(&call.name)
                        .input(self::document(&call.input))
                        .build()
                        .map_err(built)?,
                ),
                Block::ToolResult(result) => {
                    let content = result
                        .content
                        .iter()
                        .filter(|block| !block.is_blank())
                        .filter_map(|block| match block {
                            Block::Text(text) => {
                                Some(Ok(ToolResultContentBlock::Text(text.clone())))
                            }
                            Block::Image(image) => {
                                Some(image_block(image).map(ToolResultContentBlock::Image))
                            }
                            Block::Document(document) => {
                                Some(document_block(document).map(ToolResultContentBlock::Document))
                            }
                            // Validation keeps tool results to text, images and documents.
                            _ => None,
                        })
                        .collect::<Result<Vec<_>>>()?;
                    ContentBlock::ToolResult(
                        ToolResultBlock::builder()
                            .tool_use_id(&result.tool_use_id)
                            .set_content(Some(content))
                            .status(if result.is_error {
                                ToolResultStatus::Error
                            } else {
                                ToolResultStatus::Success
                            })
                            .build()
                            .map_err(built)?,
                    )
                }
                Block::Reasoning(reasoning) => {
                    ContentBlock::ReasoningContent(ReasoningContentBlock::ReasoningText(
                        ReasoningTextBlock::builder()
                            .text(&reasoning.text)
                            .set_signature(reasoning.signature.clone())
                            .build()
                            .map_err(built)?,
                    ))
                }
            })
        })
        .collect()
}

fn image_block(image: &crate::content::Image) -> Result<ImageBlock> {
    ImageBlock::builder()
        .format(image.format.as_str().into())
        .source(ImageSource::Bytes(Blob::new(image.data.to_vec())))
        .build()
        .map_err(built)
}

fn document_block(document: &crate::content::Document) -> Result<DocumentBlock> {
    DocumentBlock::builder()
        .format(document.format.as_str().into())
        .name(&document.name)
        .source(DocumentSource::Bytes(Blob::new(document.data.to_vec())))
        .build()
        .map_err(built)
}

fn tool_config(request: &ValidRequest, cache_prompt: bool) -> Result<Option<ToolConfiguration>> {
    if request.tools.is_empty() {
        return Ok(None);
    }
    let mut tools = request
        .tools
        .iter()
        .map(|tool| {
            ToolSpecification::builder()
                .name(&tool.name)
                .set_description(tool.description.clone())
                .input_schema(ToolInputSchema::Json(document(&tool.input_schema)))
                .build()
                .map(types::Tool::ToolSpec)
                .map_err(built)
        })
        .collect::<Result<Vec<_>>>()?;
    if cache_prompt {
        tools.push(types::Tool::CachePoint(cache_point()?));
    }
    let choice = match &request.tool_choice {
        None => None,
        Some(ToolChoice::Mode(ToolChoiceMode::Auto)) => {
            Some(types::ToolChoice::Auto(AutoToolChoice::builder().build()))
        }
        Some(ToolChoice::Mode(ToolChoiceMode::Any)) => {
            Some(types::ToolChoice::Any(AnyToolChoice::builder().build()))
        }
        Some(ToolChoice::Named(named)) => Some(types::ToolChoice::Tool(
            SpecificToolChoice::builder()
                .name(&named.name)
                .build()
                .map_err(built)?,
        )),
    };
    ToolConfiguration::builder()
        .set_tools(Some(tools))
        .set_tool_choice(choice)
        .build()
        .map(Some)
        .map_err(built)
}

/// JSON as the SDK's `Document`.
fn document(value: &Value) -> Document {
    match value {
        Value::Null => Document::Null,
        Value::Bool(b) => Document::Bool(*b),
        Value::Number(n) => Document::Number(if let Some(u) = n.as_u64() {
            Number::PosInt(u)
        } else if let Some(i) = n.as_i64() {
            Number::NegInt(i)
        } else {
            Number::Float(n.as_f64().unwrap_or_default())
        }),
        Value::String(s) => Document::String(s.clone()),
        Value::Array(items) => Document::Array(items.iter().map(document).collect()),
        Value::Object(fields) => Document::Object(
            fields
                .iter()
                .map(|(key, value)| (key.clone(), document(value)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

/// A tool call whose input is still arriving.
struct PendingCall {
    index: i32,
    id: String,
    name: String,
    input: String,
}

/// Turns ConverseStream events into chunks: text, reasoning and tool calls as their
/// deltas come, the stop reason at `messageStop`, the end with the usage at `metadata`.
#[derive(Default)]
pub struct StreamDecoder {
    call: Option<PendingCall>,
    stop_reason: Option<StopReason>,
    /// Until `metadata` reports the model's count, each delta counts as (at least) one
    /// output token, for an answer that fails midway.
    usage: Usage,
}

impl StreamDecoder {
    pub fn decode(&mut self, event: ConverseStreamOutput) -> Result<Vec<Chunk>> {
        Ok(match event {
            ConverseStreamOutput::ContentBlockStart(start) => match start.start {
                Some(ContentBlockStart::ToolUse(tool)) => {
                    self.call = Some(PendingCall {
                        index: start.content_block_index,
                        id: tool.tool_use_id.clone(),
                        name: tool.name.clone(),
                        input: String::new(),
                    });
                    vec![Chunk::ToolCallStart {
                        id: tool.tool_use_id,
                        name: tool.name,
                    }]
                }
                _ => vec![],
            },
            ConverseStreamOutput::ContentBlockDelta(delta) => {
                let chunk = match delta.delta {
                    Some(ContentBlockDelta::Text(text)) if !text.is_empty() => Chunk::Text(text),
                    Some(ContentBlockDelta::ToolUse(tool)) => match &mut self.call {
                        Some(call) if call.index == delta.content_block_index => {
                            call.input.push_str(&tool.input);
                            Chunk::ToolCallInput(tool.input)
                        }
                        _ => {
                            return Err(Error::Upstream(
                                "Bedrock sent tool input for a tool call it had not started".into(),
                            ));
                        }
                    },
                    Some(ContentBlockDelta::ReasoningContent(reasoning)) => match reasoning {
                        ReasoningContentBlockDelta::Text(text) => {
                            Chunk::Reasoning(ReasoningPiece {
                                text,
                                signature: None,
                            })
                        }
                        ReasoningContentBlockDelta::Signature(signature) => {
                            Chunk::Reasoning(ReasoningPiece {
                                text: String::new(),
                                signature: Some(signature),
                            })
                        }
                        // Encrypted reasoning (a safety system flagged it) is not shown to
                        // clients, who could not send it back in a form the model takes.
                        _ => return Ok(vec![]),
                    },
                    // Citations and the like: nothing the gateway's answers carry.
                    _ => return Ok(vec![]),
                };
                self.usage.output_tokens += 1;
                vec![chunk]
            }
            ConverseStreamOutput::ContentBlockStop(stop) => match self.call.take() {
                Some(call) if call.index == stop.content_block_index => {
                    vec![Chunk::ToolCall(ToolCall {
                        input: parse_input(&call.input, &call.name)?,
                        id: call.id,
                        name: call.name,
                    })]
                }
                other => {
                    self.call = other;
                    vec![]
                }
            },
            ConverseStreamOutput::MessageStop(stop) => {
                self.stop_reason = Some(stop_reason(&stop.stop_reason));
                vec![]
            }
            ConverseStreamOutput::Metadata(metadata) => {
                if let Some(usage) = metadata.usage {
                    let count = |n: i32| u32::try_from(n).unwrap_or_default();
                    self.usage = Usage {
                        input_tokens: count(usage.input_tokens),
                        output_tokens: count(usage.output_tokens),
                        cache_read_input_tokens: usage.cache_read_input_tokens.map(count),
                        cache_write_input_tokens: usage.cache_write_input_tokens.map(count),
                    };
                }
                vec![Chunk::Done(Finish {
                    stop_reason: self.stop_reason.unwrap_or(StopReason::EndTurn),
                    usage: self.usage,
                })]
            }
            _ => vec![],
        })
    }

    /// The tokens reported (or counted) so far.
    pub fn usage(&self) -> Usage {
        self.usage
    }
}

/// A tool call's input: its fragments' JSON text, complete; empty for a tool without input.
fn parse_input(input: &str, tool: &str) -> Result<Value> {
    if input.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_str(input).map_err(|err| {
        Error::Upstream(format!(
            "the model called tool `{tool}` with an input that is not JSON ({err})"
        ))
    })
}

fn stop_reason(reason: &types::StopReason) -> StopReason {
    match reason {
        types::StopReason::ToolUse => StopReason::ToolUse,
        types::StopReason::MaxTokens | types::StopReason::ModelContextWindowExceeded => {
            StopReason::MaxTokens
        }
        types::StopReason::StopSequence => StopReason::StopSequence,
        types::StopReason::GuardrailIntervened | types::StopReason::ContentFiltered => {
            StopReason::ContentFiltered
        }
        _ => StopReason::EndTurn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_fields_merge_over_the_models_and_null_removes_one() {
        let mut fields =
            json!({"top_k": 50, "thinking": {"type": "enabled", "budget_tokens": 1024}});
        let patch = json!({"thinking": {"budget_tokens": 4096}, "top_k": null, "x": [1]});
        merge(&mut fields, patch.as_object().unwrap());
        assert_eq!(
            fields,
            json!({"thinking": {"type": "enabled", "budget_tokens": 4096}, "x": [1]})
        );
        merge(&mut fields, json!({"thinking": null}).as_object().unwrap());
        assert_eq!(fields, json!({"x": [1]}));
    }

    fn client() -> Client {
        Client::from_conf(
            aws_sdk_bedrockruntime::Config::builder()
                .behavior_version(aws_sdk_bedrockruntime::config::BehaviorVersion::latest())
                .build(),
        )
    }

    #[test]
    fn tool_choices_tool_results_and_blank_text_become_converse_members() {
        use crate::content::{NamedTool, Tool, ToolResult};
        use crate::request::Message;
        let request = ValidRequest {
            messages: vec![
                Message::text(Role::User, "Weather?"),
                Message {
                    role: Role::Assistant,
                    content: vec![Block::ToolUse(ToolCall {
                        id: "t1".into(),
                        name: "weather".into(),
                        input: json!({"city": "Paris"}),
                    })],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        Block::Text(" ".into()),
                        Block::ToolResult(ToolResult {
                            tool_use_id: "t1".into(),
                            content: vec![Block::Text("no such city".into())],
                            is_error: true,
                        }),
                    ],
                },
            ],
            tools: vec![Tool {
                name: "weather".into(),
                description: None,
                input_schema: json!({"type": "object"}),
            }],
            tool_choice: Some(ToolChoice::Named(NamedTool {
                name: "weather".into(),
            })),
            max_tokens: 10,
            ..Default::default()
        };
        let settings = ConverseSettings {
            cache_prompt: true,
            ..Default::default()
        };
        let call = super::request(&client(), "m", &settings, &request).unwrap();
        let input = call.as_input();
        let tools = input.get_tool_config().as_ref().unwrap();
        assert!(matches!(tools.tools()[1], types::Tool::CachePoint(_)));
        let Some(types::ToolChoice::Tool(named)) = tools.tool_choice() else {
            panic!("a named tool choice: {tools:?}");
        };
        assert_eq!(named.name(), "weather");
        let answer = &input.get_messages().as_ref().unwrap()[2];
        assert_eq!(answer.content().len(), 1, "the blank text is dropped");
        let ContentBlock::ToolResult(result) = &answer.content()[0] else {
            panic!("a tool result: {answer:?}");
        };
        assert_eq!(result.status(), Some(&ToolResultStatus::Error));
        assert!(
            input.get_system().is_none(),
            "no system prompt, no cache point"
        );
        let any = ValidRequest {
            tool_choice: Some(ToolChoice::Mode(ToolChoiceMode::Any)),
            ..request
        };
        let call = super::request(&client(), "m", &ConverseSettings::default(), &any).unwrap();
        let tools = call.as_input().get_tool_config().as_ref().unwrap();
        assert_eq!(tools.tools().len(), 1);
        assert!(matches!(
            tools.tool_choice(),
            Some(types::ToolChoice::Any(_))
        ));
    }

    #[test]
    fn a_tool_call_without_input_has_an_empty_object_and_input_without_a_call_is_an_error() {
        use aws_sdk_bedrockruntime::types::{
            ContentBlockDeltaEvent, ContentBlockStartEvent, ContentBlockStopEvent,
            ToolUseBlockDelta, ToolUseBlockStart,
        };
        let mut decoder = StreamDecoder::default();
        let start = ContentBlockStartEvent::builder()
            .content_block_index(0)
            .start(ContentBlockStart::ToolUse(
                ToolUseBlockStart::builder()
                    .tool_use_id("t1")
                    .name("now")
                    .build()
                    .unwrap(),
            ))
            .build()
            .unwrap();
        let stop = ContentBlockStopEvent::builder()
            .content_block_index(0)
            .build()
            .unwrap();
        let mut chunks = decoder
            .decode(ConverseStreamOutput::ContentBlockStart(start))
            .unwrap();
        chunks.extend(
            decoder
                .decode(ConverseStreamOutput::ContentBlockStop(stop))
                .unwrap(),
        );
        assert_eq!(
            chunks,
            [
                Chunk::ToolCallStart {
                    id: "t1".into(),
                    name: "now".into()
                },
                Chunk::ToolCall(ToolCall {
                    id: "t1".into(),
                    name: "now".into(),
                    input: json!({})
                })
            ]
        );
        let stray = ContentBlockDeltaEvent::builder()
            .content_block_index(1)
            .delta(ContentBlockDelta::ToolUse(
                ToolUseBlockDelta::builder().input("{").build().unwrap(),
            ))
            .build()
            .unwrap();
        let err = decoder
            .decode(ConverseStreamOutput::ContentBlockDelta(stray))
            .unwrap_err();
        assert_eq!(err.code(), "upstream_error");
    }

    #[test]
    fn json_becomes_a_document_with_its_numbers_kept() {
        assert_eq!(
            document(&json!({"a": [1, -2, 0.5, "s", true, null]})),
            Document::Object(HashMap::from([(
                "a".to_owned(),
                Document::Array(vec![
                    Document::Number(Number::PosInt(1)),
                    Document::Number(Number::NegInt(-2)),
                    Document::Number(Number::Float(0.5)),
                    Document::String("s".into()),
                    Document::Bool(true),
                    Document::Null,
                ])
            )]))
        );
    }
}
