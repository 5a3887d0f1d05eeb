//! An OpenAI chat-completion request as the gateway's own [`GenerateRequest`], which every
//! transport validates the same way; and the names of the OpenAI request in the errors that
//! validation gives.

use serde_json::{Map, Value};

use super::types::{
    AssistantContent, AssistantPart, ChatCompletionRequest, ChatMessage, Stop, ToolChoice,
    ToolChoiceMode, UserContent, UserPart,
};
use crate::{
    content::{
        ContentBlock, ImageBlock, MessageContent, NamedTool, TextBlock, ToolChoice as Choice,
        ToolChoiceMode as Mode, ToolResultBlock, ToolSpec, ToolUseBlock,
    },
    error::{Error, Result},
    request::{ChatMessage as Message, GenerateRequest, Role},
};

/// An option of OpenAI's API that the gateway cannot honour: the values that ask for nothing
/// (accepted, as SDKs and tools send them), and what a refusal says.
struct Unsupported {
    name: &'static str,
    neutral: fn(&Value) -> bool,
    why: &'static str,
}

const fn unsupported(
    name: &'static str,
    neutral: fn(&Value) -> bool,
    why: &'static str,
) -> Unsupported {
    Unsupported { name, neutral, why }
}

const UNSUPPORTED: &[Unsupported] = &[
    unsupported(
        "n",
        |v| v.as_u64() == Some(1),
        "one choice is generated (`n: 1`)",
    ),
    unsupported(
        "logprobs",
        |v| v == &Value::Bool(false),
        "log probabilities are not available",
    ),
    unsupported(
        "top_logprobs",
        |v| v.as_u64() == Some(0),
        "log probabilities are not available",
    ),
    unsupported(
        "response_format",
        |v| v.get("type").and_then(Value::as_str) == Some("text"),
        "only `{\"type\": \"text\"}` is: ask for JSON in the prompt, or use `tools`",
    ),
    unsupported("audio", |_| false, "the models answer in text"),
    unsupported(
        "modalities",
        |v| v.as_array().is_some_and(|m| m.iter().all(|m| m == "text")),
        "the models answer in text",
    ),
    unsupported(
        "prediction",
        |_| false,
        "predicted outputs are not available",
    ),
    unsupported("seed", |_| false, "the models cannot be seeded"),
    unsupported(
        "logit_bias",
        |v| v.as_object().is_some_and(Map::is_empty),
        "the models take no token biases",
    ),
    unsupported("presence_penalty", is_zero, "the models take no penalties"),
    unsupported("frequency_penalty", is_zero, "the models take no penalties"),
    unsupported(
        "parallel_tool_calls",
        |v| v == &Value::Bool(true),
        "the models may always call several tools at once",
    ),
    unsupported(
        "reasoning_effort",
        |_| false,
        "set reasoning in the model's configuration",
    ),
    unsupported(
        "web_search_options",
        |_| false,
        "the gateway does not search the web",
    ),
    unsupported("functions", |_| false, "use `tools`"),
    unsupported("function_call", |_| false, "use `tool_choice`"),
    unsupported(
        "store",
        |v| v == &Value::Bool(false),
        "the gateway stores nothing",
    ),
    unsupported(
        "service_tier",
        |v| matches!(v.as_str(), Some("auto" | "default")),
        "the models have one tier",
    ),
];

fn is_zero(value: &Value) -> bool {
    value.as_f64() == Some(0.0)
}

/// The gateway's request, how to answer, and how to name fields in errors.
#[derive(Debug)]
pub struct Translated {
    pub request: GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    names: Names,
}

/// What the gateway's field names are in the client's request.
#[derive(Debug)]
struct Names {
    /// For each message of the gateway's request, the index of the first OpenAI message it
    /// was made from (system messages are taken out, consecutive messages of one role join).
    messages: Vec<usize>,
    /// `max_completion_tokens` when the client named the limit so.
    max_tokens: &'static str,
}

pub fn translate(openai: ChatCompletionRequest) -> Result<Translated> {
    let invalid = |message: String| Err(Error::InvalidRequest(message));
    for Unsupported { name, neutral, why } in UNSUPPORTED {
        if let Some(value) = openai.others.get(*name)
            && !value.is_null()
            && !neutral(value)
        {
            return invalid(format!("`{name}` is not supported: {why}"));
        }
    }
    let stream = openai.stream.unwrap_or(false);
    if openai.stream_options.is_some() && !stream {
        return invalid("`stream_options` is only allowed with `stream: true`".into());
    }
    let include_usage = openai
        .stream_options
        .and_then(|options| options.include_usage)
        .unwrap_or(false);
    let (max_tokens, max_tokens_name) = match (openai.max_tokens, openai.max_completion_tokens) {
        (Some(old), Some(new)) if old != new => {
            return invalid(format!(
                "`max_tokens` ({old}) and `max_completion_tokens` ({new}) differ: give one"
            ));
        }
        (_, Some(new)) => (Some(new), "max_completion_tokens"),
        (old, None) => (old, "max_tokens"),
    };
    if let Some(temperature) = openai.temperature
        && temperature > 1.0
    {
        return invalid(format!(
            "`temperature` must be between 0 and 1 for the models of this gateway, got {temperature} (OpenAI's range up to 2 is not rescaled)"
        ));
    }
    let stop = openai.stop.map(|stop| match stop {
        Stop::One(sequence) => vec![sequence],
        Stop::Many(sequences) => sequences,
    });
    let (system, messages, message_names) = conversation(openai.messages)?;
    let mut tools = openai.tools.map(|tools| {
        tools
            .into_iter()
            .map(|tool| ToolSpec {
                name: tool.function.name,
                description: tool.function.description,
                input_schema: tool
                    .function
                    .parameters
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
            .collect::<Vec<_>>()
    });
    let tool_choice = match openai.tool_choice {
        None | Some(ToolChoice::Mode(ToolChoiceMode::Auto)) => None,
        Some(ToolChoice::Mode(ToolChoiceMode::Required)) => Some(Choice::Mode(Mode::Any)),
        Some(ToolChoice::Named(named)) => Some(Choice::Named(NamedTool {
            name: named.function.name,
        })),
        // Bedrock has no "none": the model is not offered the tools. A conversation that
        // holds tool calls needs them declared, so there `none` cannot be kept.
        Some(ToolChoice::Mode(ToolChoiceMode::None)) => {
            if holds_tool_calls(&messages) {
                return invalid(
                    "`tool_choice`: `none` cannot be honoured once the conversation holds tool calls (the models must be given the tools then); leave `tool_choice` out or use `auto`"
                        .into(),
                );
            }
            tools = None;
            None
        }
    };
    Ok(Translated {
        request: GenerateRequest {
            model: openai.model,
            prompt: None,
            messages: Some(messages),
            system,
            max_tokens,
            temperature: openai.temperature,
            top_p: openai.top_p,
            stop,
            tools: tools.filter(|tools| !tools.is_empty()),
            tool_choice,
            additional_fields: None,
        },
        stream,
        include_usage,
        names: Names {
            messages: message_names,
            max_tokens: max_tokens_name,
        },
    })
}

fn holds_tool_calls(messages: &[Message]) -> bool {
    messages.iter().any(|message| match &message.content {
        MessageContent::Blocks(blocks) => blocks.iter().any(|block| {
            matches!(
                block,
                ContentBlock::ToolUse(_) | ContentBlock::ToolResult(_)
            )
        }),
        MessageContent::Text(_) => false,
    })
}

/// The system prompt (every `system` and `developer` message, joined by a blank line), the
/// turns (consecutive messages of one role joined into one), and for each turn the index of
/// its first OpenAI message.
fn conversation(openai: Vec<ChatMessage>) -> Result<(Option<String>, Vec<Message>, Vec<usize>)> {
    let mut system: Vec<String> = Vec::new();
    let mut messages: Vec<Message> = Vec::with_capacity(openai.len());
    let mut names = Vec::with_capacity(openai.len());
    for (index, message) in openai.into_iter().enumerate() {
        let (role, content) = match message {
            ChatMessage::System(message) => {
                system.push(message.content.joined());
                continue;
            }
            ChatMessage::Developer(message) => {
                system.push(message.content.joined());
                continue;
            }
            ChatMessage::User(message) => (Role::User, user_content(message.content, index)?),
            ChatMessage::Assistant(message) => {
                let mut blocks: Vec<ContentBlock> = match message.content {
                    None => Vec::new(),
                    Some(AssistantContent::Text(text)) => text_block(text),
                    Some(AssistantContent::Parts(parts)) => parts
                        .into_iter()
                        .flat_map(|part| match part {
                            AssistantPart::Text(part) => text_block(part.text),
                            AssistantPart::Refusal(part) => text_block(part.refusal),
                        })
                        .collect(),
                };
                for (call_index, call) in message.tool_calls.into_iter().flatten().enumerate() {
                    let field =
                        format!("messages[{index}].tool_calls[{call_index}].function.arguments");
                    blocks.push(ContentBlock::ToolUse(ToolUseBlock {
                        id: call.id,
                        name: call.function.name,
                        input: arguments(&call.function.arguments, &field)?,
                    }));
                }
                (Role::Assistant, MessageContent::Blocks(blocks))
            }
            ChatMessage::Tool(message) => (
                Role::User,
                MessageContent::Blocks(vec![ContentBlock::ToolResult(ToolResultBlock {
                    tool_use_id: message.tool_call_id,
                    content: MessageContent::Text(message.content.joined()),
                    is_error: None,
                })]),
            ),
        };
        match messages.last_mut() {
            Some(last) if last.role == role => {
                let mut blocks = blocks_of(std::mem::replace(
                    &mut last.content,
                    MessageContent::Blocks(Vec::new()),
                ));
                blocks.extend(blocks_of(content));
                last.content = MessageContent::Blocks(blocks);
            }
            _ => {
                messages.push(Message { role, content });
                names.push(index);
            }
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    Ok((system, messages, names))
}

fn text_block(text: String) -> Vec<ContentBlock> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![ContentBlock::Text(TextBlock { text })]
    }
}

fn blocks_of(content: MessageContent) -> Vec<ContentBlock> {
    match content {
        MessageContent::Text(text) => vec![ContentBlock::Text(TextBlock { text })],
        MessageContent::Blocks(blocks) => blocks,
    }
}

fn user_content(content: UserContent, index: usize) -> Result<MessageContent> {
    let parts = match content {
        UserContent::Text(text) => return Ok(MessageContent::Text(text)),
        UserContent::Parts(parts) => parts,
    };
    parts
        .into_iter()
        .enumerate()
        .map(|(part_index, part)| match part {
            UserPart::Text(part) => Ok(ContentBlock::Text(TextBlock { text: part.text })),
            UserPart::ImageUrl(part) => {
                let url = part.image_url.url;
                if !url.starts_with("data:") {
                    return Err(Error::InvalidRequest(format!(
                        "`messages[{index}].content[{part_index}].image_url.url` must be a `data:` URL (data:image/png;base64,…): the gateway does not fetch remote images"
                    )));
                }
                Ok(ContentBlock::Image(ImageBlock {
                    media_type: None,
                    data: None,
                    url: Some(url),
                }))
            }
        })
        .collect::<Result<_>>()
        .map(MessageContent::Blocks)
}

/// A tool call's `arguments`: a JSON object as a string (empty for no input).
fn arguments(text: &str, field: &str) -> Result<Value> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    match serde_json::from_str(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(Error::InvalidRequest(format!(
            "`{field}` must be a JSON object written as a string"
        ))),
    }
}

impl Translated {
    /// `err` with the fields of the gateway's request named as the client named them.
    pub fn rename(&self, err: Error) -> Error {
        match err {
            Error::InvalidRequest(message) => Error::InvalidRequest(self.names.rename(&message)),
            Error::TooLarge(message) => Error::TooLarge(self.names.rename(&message)),
            other => other,
        }
    }
}

impl Names {
    fn rename(&self, message: &str) -> String {
        let message = message.replace("`max_tokens`", &format!("`{}`", self.max_tokens));
        let mut renamed = String::with_capacity(message.len());
        let mut rest = message.as_str();
        while let Some(at) = rest.find("messages[") {
            let (before, after) = rest.split_at(at + "messages[".len());
            renamed.push_str(before);
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            match after[..digits].parse::<usize>() {
                Ok(index) if after[digits..].starts_with(']') => {
                    let original = self.messages.get(index).copied().unwrap_or(index);
                    renamed.push_str(&original.to_string());
                }
                _ => renamed.push_str(&after[..digits]),
            }
            rest = &after[digits..];
        }
        renamed.push_str(rest);
        renamed
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn translated(body: Value) -> Result<Translated> {
        translate(serde_json::from_value(body).expect("a chat-completion request"))
    }

    fn error_of(body: Value) -> String {
        translated(body).unwrap_err().to_string()
    }

    #[test]
    fn system_and_developer_messages_are_the_system_prompt_and_tool_results_join_one_turn() {
        let request = translated(json!({
            "model": "claude",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "c2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}
                ]},
                {"role": "tool", "tool_call_id": "c1", "content": "18°C"},
                {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "21°C"}]},
                {"role": "user", "content": "Thanks."}
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
            "max_completion_tokens": 100,
            "stop": "END",
            "stream": true,
            "stream_options": {"include_usage": true},
            "user": "someone"
        }))
        .unwrap();
        assert!(request.stream && request.include_usage);
        let request = request.request;
        assert_eq!(request.system.as_deref(), Some("Be brief.\n\nUse tools."));
        assert_eq!(request.max_tokens, Some(100));
        assert_eq!(request.stop, Some(vec!["END".to_owned()]));
        assert_eq!(request.tool_choice, Some(Choice::Mode(Mode::Any)));
        let messages = request.messages.unwrap();
        assert_eq!(messages.len(), 3);
        let expected: Vec<ContentBlock> = serde_json::from_value(json!([
            {"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "c2", "name": "weather", "input": {"city": "Rome"}}
        ]))
        .unwrap();
        assert_eq!(messages[1].content, MessageContent::Blocks(expected));
        let expected: Vec<ContentBlock> = serde_json::from_value(json!([
            {"type": "tool_result", "tool_use_id": "c1", "content": "18°C"},
            {"type": "tool_result", "tool_use_id": "c2", "content": "21°C"},
            {"type": "text", "text": "Thanks."}
        ]))
        .unwrap();
        assert_eq!(messages[2].content, MessageContent::Blocks(expected));
    }

    #[test]
    fn an_image_is_a_data_url_and_a_remote_one_is_refused_naming_the_param() {
        let image = |url: &str| {
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is it?"},
                {"type": "image_url", "image_url": {"url": url, "detail": "low"}}
            ]}]})
        };
        let request = translated(image("data:image/png;base64,iVBO"))
            .unwrap()
            .request;
        let MessageContent::Blocks(blocks) = &request.messages.unwrap()[0].content else {
            panic!("blocks");
        };
        assert!(
            matches!(&blocks[1], ContentBlock::Image(ImageBlock { url: Some(url), .. }) if url.starts_with("data:"))
        );
        let err = error_of(image("https://example.com/cat.png"));
        assert!(
            err.starts_with("`messages[0].content[1].image_url.url` must be a `data:` URL"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_options_are_refused_naming_them_and_their_neutral_values_accepted() {
        let with = |field: &str, value: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
            body[field] = value;
            body
        };
        for (field, value) in [
            ("n", json!(2)),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("response_format", json!({"type": "json_object"})),
            ("modalities", json!(["text", "audio"])),
            ("seed", json!(7)),
            ("presence_penalty", json!(0.5)),
            ("parallel_tool_calls", json!(false)),
        ] {
            let err = error_of(with(field, value));
            assert!(
                err.starts_with(&format!("`{field}` is not supported")),
                "{err}"
            );
        }
        for (field, value) in [
            ("n", json!(1)),
            ("logprobs", json!(false)),
            ("response_format", json!({"type": "text"})),
            ("frequency_penalty", json!(0)),
            ("seed", Value::Null),
            ("some_future_field", json!({"x": 1})),
        ] {
            assert!(translated(with(field, value)).is_ok(), "{field}");
        }
        assert!(error_of(with("temperature", json!(1.5))).starts_with("`temperature`"));
        assert!(error_of(with("stream_options", json!({}))).starts_with("`stream_options`"));
    }

    #[test]
    fn tool_choice_none_withholds_the_tools_unless_the_conversation_holds_calls() {
        let tools = json!([{"type": "function", "function": {"name": "weather"}}]);
        let request = translated(json!({
            "model": "m", "messages": [{"role": "user", "content": "Hi"}],
            "tools": tools, "tool_choice": "none"
        }))
        .unwrap()
        .request;
        assert_eq!((request.tools, request.tool_choice), (None, None));
        let err = error_of(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": ""}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
            ],
            "tools": tools, "tool_choice": "none"
        }));
        assert!(err.starts_with("`tool_choice`"), "{err}");
    }

    #[test]
    fn arguments_that_are_not_a_json_object_are_refused_naming_them() {
        let err = error_of(json!({
            "model": "m",
            "messages": [
                {"role": "user", "content": "Weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "[1]"}}]}
            ]
        }));
        assert!(
            err.starts_with("`messages[1].tool_calls[0].function.arguments`"),
            "{err}"
        );
    }

    #[test]
    fn validation_errors_name_the_clients_messages_and_limit() {
        let request = translated(json!({
            "model": "m",
            "max_completion_tokens": 9999,
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": ""}
            ]
        }))
        .unwrap();
        let renamed = request.rename(Error::InvalidRequest(
            "`messages[2].content` is empty; `messages[1]` too; `max_tokens` must be between 1 and 2048".into(),
        ));
        assert_eq!(
            renamed.to_string(),
            "`messages[3].content` is empty; `messages[2]` too; `max_completion_tokens` must be between 1 and 2048"
        );
    }
}
