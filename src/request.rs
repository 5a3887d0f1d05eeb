//! What a client asks for, and its validation into a [`ValidRequest`] that providers can
//! trust. Every transport builds a [`GenerateRequest`] and goes through [`GenerateRequest::validate`].

use poem_openapi::{Enum, Object};
use serde::Deserialize;

use crate::{
    content::{
        Accepts, Block, BlockChecker, MediaLimits, MessageContent, Tool, ToolChoice, ToolSpec,
        check_tools,
    },
    error::{Error, Result},
    special_tokens::{SpecialTokenPolicy, SpecialTokens},
};

/// Most stop sequences one request may give.
const MAX_STOP_SEQUENCES: usize = 8;
/// Most characters in one stop sequence: the gateway matches stop sequences itself for
/// models without native ones, and holds back up to this much of the answer.
pub const MAX_STOP_SEQUENCE_CHARS: usize = 256;

/// A generation request: one `prompt`, or a conversation in `messages` (exactly one of
/// the two). Parsed by serde, whose errors name the field; the schema's constraints are
/// checked again, with the rules a schema cannot state, by [`GenerateRequest::validate`].
#[derive(Debug, Clone, Default, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Name of a model in the registry (`GET /models`). In WebSocket JSON frames it may be
    /// left out: it defaults to the model named in the URL.
    pub model: String,
    /// A single user message. Give either `prompt` or `messages`.
    #[oai(validator(min_length = 1))]
    pub prompt: Option<String>,
    /// The conversation so far, oldest first, starting with `user` and alternating.
    #[oai(validator(min_items = 1))]
    pub messages: Option<Vec<ChatMessage>>,
    /// System prompt.
    pub system: Option<String>,
    /// Most tokens to generate: 1 up to the model's `max_tokens_limit` (default: the
    /// model's `max_tokens`).
    #[oai(validator(minimum(value = "1")))]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 1.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, 0 to 1.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub top_p: Option<f64>,
    /// Sequences that end the answer when the model writes them (at most 8, none empty,
    /// each at most 256 characters).
    #[oai(validator(max_items = 8, max_length = 256))]
    pub stop: Option<Vec<String>>,
    /// Tools the model may call (models with `format = "converse"`).
    pub tools: Option<Vec<ToolSpec>>,
    /// Whether the model must call a tool; needs `tools`.
    pub tool_choice: Option<ToolChoice>,
    /// Model-specific fields passed to the model (Bedrock's `additionalModelRequestFields`,
    /// e.g. `{"top_k": 50}`), merged over the model's own; only where the model's
    /// configuration allows them.
    pub additional_fields: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: Role,
    /// A string, or a list of blocks (`text`, `image`, `document`, `tool_use`,
    /// `tool_result`, `reasoning`).
    pub content: MessageContent,
}

/// A validated message: its blocks, media decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: Vec<Block>,
}

impl Message {
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: vec![Block::Text(text.into())],
        }
    }

    /// The message's text blocks, joined: all there is for a model that takes only text.
    pub fn joined_text(&self) -> String {
        let mut text = String::new();
        for block in &self.content {
            if let Block::Text(piece) = block {
                text.push_str(piece);
            }
        }
        text
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A model's limits and defaults that a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub default_max_tokens: u32,
    pub max_tokens_limit: u32,
    pub default_temperature: Option<f64>,
    /// Most messages in one conversation.
    pub max_messages: usize,
    /// Most characters of input (system prompt and messages together).
    pub max_input_chars: usize,
    /// What to do with user text that holds a special token of the model's prompt format.
    pub special_tokens: SpecialTokenPolicy,
    /// What the model takes besides text.
    pub accepts: Accepts,
    pub media: MediaLimits,
}

/// A request that passed validation: at least one message, roles alternating from `user`,
/// parameters in range, defaults applied.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ValidRequest {
    pub system: Option<String>,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// A JSON object, when the model allows per-request fields.
    pub additional_fields: Option<serde_json::Map<String, serde_json::Value>>,
}

impl GenerateRequest {
    /// A single-prompt request, as the WebSocket text mode and `GET /stream` send.
    pub fn prompt(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            prompt: Some(prompt.into()),
            ..Self::default()
        }
    }

    /// Checks the request against the model's `limits` and, if the gateway renders the
    /// model's prompt, keeps the model's `special_tokens` out of the user text.
    pub fn validate(
        self,
        limits: &Limits,
        special_tokens: Option<&SpecialTokens>,
    ) -> Result<ValidRequest> {
        let invalid = |message: String| Err(Error::InvalidRequest(message));
        let from_prompt = self.prompt.is_some();
        let mut checker = BlockChecker {
            model: &self.model,
            accepts: limits.accepts,
            limits: limits.media,
            images: 0,
            documents: 0,
        };
        let mut messages = match (self.prompt, self.messages) {
            (Some(_), Some(_)) => {
                return invalid("give either `prompt` or `messages`, not both".into());
            }
            (None, None) => return invalid("one of `prompt` or `messages` is required".into()),
            (Some(prompt), None) => {
                if prompt.trim().is_empty() {
                    return invalid("`prompt` is empty".into());
                }
                vec![Message::text(Role::User, prompt)]
            }
            (None, Some(messages)) => {
                if messages.len() > limits.max_messages {
                    return Err(too_many_messages(messages.len(), limits));
                }
                let messages = messages
                    .into_iter()
                    .enumerate()
                    .map(|(index, message)| {
                        let field = format!("messages[{index}].content");
                        Ok(Message {
                            role: message.role,
                            content: checker.check(
                                message.content,
                                message.role == Role::Assistant,
                                &field,
                            )?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                check_conversation(&messages)?;
                messages
            }
        };
        let input_chars = self.system.as_deref().map_or(0, |s| s.chars().count())
            + messages
                .iter()
                .flat_map(|m| &m.content)
                .map(Block::text_chars)
                .sum::<usize>();
        if input_chars > limits.max_input_chars {
            return Err(Error::TooLarge(format!(
                "the input has {input_chars} characters; at most {} are allowed",
                limits.max_input_chars
            )));
        }
        let max_tokens = self.max_tokens.unwrap_or(limits.default_max_tokens);
        if max_tokens == 0 || max_tokens > limits.max_tokens_limit {
            return invalid(format!(
                "`max_tokens` must be between 1 and {} for this model, got {max_tokens}",
                limits.max_tokens_limit
            ));
        }
        for (name, value) in [("temperature", self.temperature), ("top_p", self.top_p)] {
            if let Some(value) = value
                && !(0.0..=1.0).contains(&value)
            {
                return invalid(format!("`{name}` must be between 0 and 1, got {value}"));
            }
        }
        let stop = self.stop.unwrap_or_default();
        if stop.len() > MAX_STOP_SEQUENCES {
            return invalid(format!(
                "`stop` holds {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                stop.len()
            ));
        }
        if stop.iter().any(String::is_empty) {
            return invalid("`stop` sequences must not be empty".into());
        }
        if let Some((index, chars)) = stop
            .iter()
            .map(|sequence| sequence.chars().count())
            .enumerate()
            .find(|&(_, chars)| chars > MAX_STOP_SEQUENCE_CHARS)
        {
            return invalid(format!(
                "`stop[{index}]` has {chars} characters; at most {MAX_STOP_SEQUENCE_CHARS} are allowed"
            ));
        }
        let tools = self.tools.unwrap_or_default();
        if !tools.is_empty() && !limits.accepts.tools {
            return invalid(format!(
                "model `{}` cannot take `tools`; models with `format = \"converse\"` can",
                self.model
            ));
        }
        let tools = check_tools(tools)?;
        check_tool_choice(self.tool_choice.as_ref(), &tools)?;
        let holds_tool_blocks = messages
            .iter()
            .flat_map(|m| &m.content)
            .any(|block| matches!(block, Block::ToolUse(_) | Block::ToolResult(_)));
        if holds_tool_blocks && tools.is_empty() {
            return invalid(
                "`tools` must be given when the conversation holds `tool_use` or `tool_result` blocks"
                    .into(),
            );
        }
        let additional_fields = match self.additional_fields {
            None => None,
            Some(_) if !limits.accepts.additional_fields => {
                return invalid(format!(
                    "model `{}` does not take `additional_fields` (its configuration must set `allow_request_additional_fields = true`)",
                    self.model
                ));
            }
            Some(serde_json::Value::Object(fields)) => Some(fields),
            Some(_) => return invalid("`additional_fields` must be a JSON object".into()),
        };
        let mut system = self.system.filter(|system| !system.is_empty());
        if let Some(tokens) = special_tokens {
            let policy = limits.special_tokens;
            if let Some(system) = &mut system {
                tokens.guard("system", system, policy)?;
            }
            for (index, message) in messages.iter_mut().enumerate() {
                let single = message.content.len() == 1;
                for (block_index, block) in message.content.iter_mut().enumerate() {
                    let Block::Text(text) = block else { continue };
                    let field = if from_prompt {
                        "prompt".to_owned()
                    } else if single {
                        format!("messages[{index}].content")
                    } else {
                        format!("messages[{index}].content[{block_index}].text")
                    };
                    tokens.guard(&field, text, policy)?;
                }
            }
        }
        Ok(ValidRequest {
            system,
            messages,
            max_tokens,
            temperature: self.temperature.or(limits.default_temperature),
            top_p: self.top_p,
            stop,
            tools,
            tool_choice: self.tool_choice,
            additional_fields,
        })
    }
}

fn too_many_messages(count: usize, limits: &Limits) -> Error {
    Error::TooLarge(format!(
        "the conversation has {count} messages; at most {} are allowed",
        limits.max_messages
    ))
}

fn check_tool_choice(choice: Option<&ToolChoice>, tools: &[Tool]) -> Result<()> {
    match choice {
        None => Ok(()),
        Some(_) if tools.is_empty() => {
            Err(Error::InvalidRequest("`tool_choice` needs `tools`".into()))
        }
        Some(ToolChoice::Named(named)) if !tools.iter().any(|tool| tool.name == named.name) => {
            Err(Error::InvalidRequest(format!(
                "`tool_choice` names `{}`, which is not one of `tools`",
                named.name.escape_debug()
            )))
        }
        Some(_) => Ok(()),
    }
}

fn check_conversation(messages: &[Message]) -> Result<()> {
    let Some(first) = messages.first() else {
        return Err(Error::InvalidRequest("`messages` is empty".into()));
    };
    if first.role != Role::User {
        return Err(Error::InvalidRequest(
            "`messages` must start with a `user` message".into(),
        ));
    }
    for (index, pair) in messages.windows(2).enumerate() {
        if pair[0].role == pair[1].role {
            return Err(Error::InvalidRequest(format!(
                "`messages[{}]` has role `{}` like the message before it; roles must alternate between `user` and `assistant`",
                index + 1,
                pair[1].role.as_str()
            )));
        }
    }
    if let Some(index) = messages
        .iter()
        .position(|m| m.content.iter().all(Block::is_blank))
    {
        return Err(Error::InvalidRequest(format!(
            "`messages[{index}].content` is empty"
        )));
    }
    // Every tool result answers a call of the assistant message just before it.
    for (index, pair) in messages.windows(2).enumerate() {
        for block in &pair[1].content {
            let Block::ToolResult(result) = block else {
                continue;
            };
            let called = pair[0].content.iter().any(
                |block| matches!(block, Block::ToolUse(call) if call.id == result.tool_use_id),
            );
            if !called {
                return Err(Error::InvalidRequest(format!(
                    "`messages[{}]` holds a `tool_result` for `{}`, which the assistant message before it did not call",
                    index + 1,
                    result.tool_use_id.escape_debug()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        default_max_tokens: 512,
        max_tokens_limit: 2048,
        default_temperature: Some(0.5),
        max_messages: 3,
        max_input_chars: 100,
        special_tokens: SpecialTokenPolicy::Refuse,
        accepts: Accepts::TEXT,
        media: MediaLimits {
            max_image_bytes: 4,
            max_images: 1,
            max_document_bytes: 4,
            max_documents: 1,
        },
    };

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: MessageContent::Text(content.into()),
        }
    }

    fn error_of(request: GenerateRequest) -> String {
        request.validate(&LIMITS, None).unwrap_err().to_string()
    }

    #[test]
    fn a_prompt_becomes_one_user_message_with_the_model_defaults() {
        let valid = GenerateRequest::prompt("m", "Hi")
            .validate(&LIMITS, None)
            .unwrap();
        assert_eq!(valid.messages, vec![Message::text(Role::User, "Hi")]);
        assert_eq!(valid.max_tokens, 512);
        assert_eq!(valid.temperature, Some(0.5));
    }

    #[test]
    fn prompt_and_messages_are_exclusive_and_one_is_required() {
        let both = GenerateRequest {
            messages: Some(vec![message(Role::User, "a")]),
            ..GenerateRequest::prompt("m", "b")
        };
        assert!(error_of(both).contains("not both"));
        let neither = GenerateRequest {
            model: "m".into(),
            ..Default::default()
        };
        assert!(error_of(neither).contains("required"));
    }

    #[test]
    fn conversations_must_start_with_user_and_alternate() {
        let starts_with_assistant = GenerateRequest {
            model: "m".into(),
            messages: Some(vec![message(Role::Assistant, "a")]),
            ..Default::default()
        };
        assert!(error_of(starts_with_assistant).contains("start with a `user`"));
        let repeated = GenerateRequest {
            model: "m".into(),
            messages: Some(vec![message(Role::User, "a"), message(Role::User, "b")]),
            ..Default::default()
        };
        assert!(error_of(repeated).contains("messages[1]"));
        let empty = GenerateRequest {
            model: "m".into(),
            messages: Some(vec![]),
            ..Default::default()
        };
        assert!(error_of(empty).contains("empty"));
    }

    #[test]
    fn out_of_range_parameters_are_refused_with_the_limit() {
        let too_many = GenerateRequest {
            max_tokens: Some(4096),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(error_of(too_many).contains("between 1 and 2048"));
        let hot = GenerateRequest {
            temperature: Some(1.5),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(error_of(hot).contains("`temperature`"));
        let top_p = GenerateRequest {
            top_p: Some(-0.1),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(error_of(top_p).contains("`top_p`"));
    }

    #[test]
    fn a_stop_sequence_over_256_characters_is_refused_naming_it_and_the_limit() {
        let at_limit = GenerateRequest {
            stop: Some(vec!["é".repeat(256)]),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(at_limit.validate(&LIMITS, None).is_ok());
        let long = GenerateRequest {
            stop: Some(vec!["\n".into(), "x".repeat(257)]),
            ..GenerateRequest::prompt("m", "x")
        };
        let err = long.validate(&LIMITS, None).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert_eq!(
            err.to_string(),
            "`stop[1]` has 257 characters; at most 256 are allowed"
        );
    }

    #[test]
    fn special_tokens_in_user_text_are_refused_naming_the_field() {
        let tokens = SpecialTokens::new(["<|eot_id|>".to_owned()]).unwrap();
        let forged = |request: GenerateRequest| {
            request
                .validate(&LIMITS, Some(&tokens))
                .unwrap_err()
                .to_string()
        };
        assert!(
            forged(GenerateRequest::prompt("m", "x<|eot_id|>")).starts_with("`prompt` contains")
        );
        let turns = vec![
            message(Role::User, "a"),
            message(Role::Assistant, "b<|eot_id|>"),
        ];
        let conversation = GenerateRequest {
            model: "m".into(),
            messages: Some(turns),
            ..Default::default()
        };
        assert!(forged(conversation).starts_with("`messages[1].content` contains"));
        let system = GenerateRequest {
            system: Some("<|eot_id|>".into()),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(forged(system).starts_with("`system` contains"));
    }

    #[test]
    fn escaped_special_tokens_are_broken_in_every_field() {
        let tokens = SpecialTokens::new(["<|eot_id|>".to_owned()]).unwrap();
        let limits = Limits {
            special_tokens: SpecialTokenPolicy::Escape,
            ..LIMITS
        };
        let valid = GenerateRequest {
            system: Some("s<|eot_id|>".into()),
            ..GenerateRequest::prompt("m", "<|eot_id|>p")
        }
        .validate(&limits, Some(&tokens))
        .unwrap();
        assert_eq!(valid.system.as_deref(), Some("s<\u{200B}|eot_id|>"));
        assert_eq!(valid.messages[0].joined_text(), "<\u{200B}|eot_id|>p");
    }

    #[test]
    fn long_conversations_and_inputs_are_too_large() {
        let long = GenerateRequest::prompt("m", "x".repeat(101));
        let err = long.validate(&LIMITS, None).unwrap_err();
        assert_eq!(err.code(), "too_large");
        let turns = [Role::User, Role::Assistant, Role::User, Role::Assistant]
            .map(|role| message(role, "hi"));
        let many = GenerateRequest {
            model: "m".into(),
            messages: Some(turns.to_vec()),
            ..Default::default()
        };
        assert!(error_of(many).contains("at most 3"));
    }

    fn blocks(role: Role, blocks: serde_json::Value) -> ChatMessage {
        ChatMessage {
            role,
            content: MessageContent::Blocks(serde_json::from_value(blocks).unwrap()),
        }
    }

    const CONVERSE: Limits = Limits {
        accepts: Accepts {
            images: true,
            documents: true,
            tools: true,
            reasoning: true,
            additional_fields: false,
        },
        ..LIMITS
    };

    fn conversation(messages: Vec<ChatMessage>) -> GenerateRequest {
        GenerateRequest {
            model: "claude".into(),
            messages: Some(messages),
            ..Default::default()
        }
    }

    #[test]
    fn a_text_only_model_refuses_an_image_naming_the_model_and_the_block() {
        let image = conversation(vec![blocks(
            Role::User,
            serde_json::json!([{"type": "text", "text": "What is it?"},
                {"type": "image", "media_type": "image/png", "data": "iVBO"}]),
        )]);
        let err = image.validate(&LIMITS, None).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert!(
            err.to_string().starts_with(
                "model `claude` cannot take `image` blocks (`messages[0].content[1]`)"
            ),
            "{err}"
        );
    }

    #[test]
    fn images_are_decoded_from_base64_or_a_data_url_and_remote_urls_are_refused() {
        let valid = conversation(vec![blocks(
            Role::User,
            serde_json::json!([{"type": "image", "url": "data:image/png;base64,iVBO"}]),
        )])
        .validate(&CONVERSE, None)
        .unwrap();
        let Block::Image(image) = &valid.messages[0].content[0] else {
            panic!("an image");
        };
        assert_eq!(image.format, crate::content::ImageFormat::Png);
        assert_eq!(&image.data[..], b"\x89PN");
        let remote = conversation(vec![blocks(
            Role::User,
            serde_json::json!([{"type": "image", "url": "https://example.com/cat.png"}]),
        )]);
        assert!(error_of_with(remote, &CONVERSE).contains("does not fetch remote images"));
        let big = conversation(vec![blocks(
            Role::User,
            serde_json::json!([{"type": "image", "media_type": "image/png", "data": "aGVsbG8="}]),
        )]);
        let err = big.validate(&CONVERSE, None).unwrap_err();
        assert_eq!(err.code(), "too_large");
        let svg = conversation(vec![blocks(
            Role::User,
            serde_json::json!([{"type": "image", "media_type": "image/svg+xml", "data": "aGk="}]),
        )]);
        assert!(error_of_with(svg, &CONVERSE).contains("image/svg+xml"));
    }

    fn error_of_with(request: GenerateRequest, limits: &Limits) -> String {
        request.validate(limits, None).unwrap_err().to_string()
    }

    fn weather_tool() -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "weather".into(),
            description: None,
            input_schema: serde_json::json!({"type": "object"}),
        }]
    }

    #[test]
    fn tool_results_answer_the_calls_of_the_message_before_and_need_tools() {
        let call = blocks(
            Role::Assistant,
            serde_json::json!([{"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}]),
        );
        let result = |id: &str| {
            blocks(
                Role::User,
                serde_json::json!([{"type": "tool_result", "tool_use_id": id, "content": "18°C"}]),
            )
        };
        let round_trip = |id: &str, tools: Option<Vec<ToolSpec>>| GenerateRequest {
            tools,
            ..conversation(vec![
                message(Role::User, "Weather?"),
                call.clone(),
                result(id),
            ])
        };
        assert!(
            round_trip("t1", Some(weather_tool()))
                .validate(&CONVERSE, None)
                .is_ok()
        );
        assert!(
            error_of_with(round_trip("t2", Some(weather_tool())), &CONVERSE)
                .contains("did not call")
        );
        assert!(error_of_with(round_trip("t1", None), &CONVERSE).contains("`tools` must be given"));
        let tools_to_text_model = GenerateRequest {
            tools: Some(weather_tool()),
            ..GenerateRequest::prompt("llama", "x")
        };
        assert!(error_of(tools_to_text_model).starts_with("model `llama` cannot take `tools`"));
        let user_calls = conversation(vec![blocks(
            Role::User,
            serde_json::json!([{"type": "tool_use", "id": "t1", "name": "weather", "input": {}}]),
        )]);
        assert!(error_of_with(user_calls, &CONVERSE).contains("only `assistant` messages"));
    }

    #[test]
    fn tool_choice_must_name_one_of_the_tools() {
        let named = |name: &str| GenerateRequest {
            tools: Some(weather_tool()),
            tool_choice: Some(ToolChoice::Named(crate::content::NamedTool {
                name: name.into(),
            })),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(named("weather").validate(&CONVERSE, None).is_ok());
        assert!(error_of_with(named("news"), &CONVERSE).contains("not one of `tools`"));
    }
}
