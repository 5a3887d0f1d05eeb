//! Anthropic's Messages API on the wire: the request bodies (parsed by serde, whose errors
//! name the field) and their translation into the gateway's [`GenerateRequest`], and the
//! message the API answers with.

use base64::Engine;
use poem_openapi::{Enum, Object, Union};
use serde::{Deserialize, Deserializer, de};
use serde_json::{Map, Value};

use crate::{
    content::{
        ContentBlock, DocumentBlock, DocumentFormat, ImageBlock, MessageContent, NamedTool,
        ReasoningBlock, TextBlock, ToolChoice, ToolChoiceMode, ToolResultBlock, ToolSpec,
        ToolUseBlock,
    },
    error::{Error, Result},
    provider::{AnswerBlock, StopReason, Usage},
    request::{ChatMessage, GenerateRequest, Role},
};

/// `POST /v1/messages`.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicMessagesRequest")]
#[serde(deny_unknown_fields)]
pub struct MessagesRequest {
    /// Name of a model in the registry (`GET /models`).
    pub model: String,
    /// The conversation so far, oldest first, starting with `user` and alternating.
    pub messages: Vec<InputMessage>,
    /// Most tokens to generate (required, as Anthropic requires it): 1 up to the model's
    /// `max_tokens_limit`.
    pub max_tokens: u32,
    /// A string or `text` blocks.
    pub system: Option<SystemPrompt>,
    /// Sequences that end the answer when the model writes them.
    pub stop_sequences: Option<Vec<String>>,
    /// Sampling temperature, 0 to 1.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, 0 to 1.
    pub top_p: Option<f64>,
    /// Only sample from the `top_k` likeliest tokens. Passed to the model as an additional
    /// request field: only where the model's configuration sets
    /// `allow_request_additional_fields = true`.
    pub top_k: Option<u32>,
    /// Extended thinking, e.g. `{"type": "enabled", "budget_tokens": 2048}`. Passed to the
    /// model as an additional request field, like `top_k` (`{"type": "disabled"}` is
    /// accepted by every model).
    pub thinking: Option<Value>,
    /// Tools the model may call (models with `format = "converse"`).
    pub tools: Option<Vec<ToolDefinition>>,
    /// `auto`, `any`, `tool` (with `name`) or `none` (the model gets no tools; refused when
    /// the conversation holds tool calls, which need them).
    pub tool_choice: Option<AnthropicToolChoice>,
    /// Accepted and ignored (`user_id`).
    pub metadata: Option<Value>,
    /// Accepted and ignored.
    pub service_tier: Option<String>,
    /// Accepted and ignored (Claude Code sends it): the gateway does not edit the context.
    pub context_management: Option<Value>,
    /// Answer as Server-Sent Events.
    pub stream: Option<bool>,
}

/// `POST /v1/messages/count_tokens`: what a request to `/v1/messages` would send the model.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicCountTokensRequest")]
#[serde(deny_unknown_fields)]
pub struct CountTokensRequest {
    pub model: String,
    pub messages: Vec<InputMessage>,
    pub system: Option<SystemPrompt>,
    pub thinking: Option<Value>,
    pub tools: Option<Vec<ToolDefinition>>,
    pub tool_choice: Option<AnthropicToolChoice>,
}

/// `{"input_tokens": N}`.
#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicTokenCount")]
pub struct TokenCount {
    pub input_tokens: u32,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicInputMessage")]
#[serde(deny_unknown_fields)]
pub struct InputMessage {
    pub role: Role,
    pub content: InputContent,
}

/// Implements serde's `Deserialize` for an enum of a string or a list of blocks, with
/// serde's own error for what is inside the list.
macro_rules! string_or_list {
    ($name:ident, $block:ty, $expecting:literal) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(
                deserializer: D,
            ) -> std::result::Result<Self, D::Error> {
                struct Visitor;
                impl<'de> de::Visitor<'de> for Visitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str($expecting)
                    }

                    fn visit_str<E: de::Error>(self, text: &str) -> std::result::Result<$name, E> {
                        Ok($name::Text(text.to_owned()))
                    }

                    fn visit_seq<A: de::SeqAccess<'de>>(
                        self,
                        seq: A,
                    ) -> std::result::Result<$name, A::Error> {
                        Vec::<$block>::deserialize(de::value::SeqAccessDeserializer::new(seq))
                            .map($name::Blocks)
                    }
                }
                deserializer.deserialize_any(Visitor)
            }
        }
    };
}

/// A message's content: a string, or a list of blocks.
#[derive(Debug, Clone, Union)]
#[oai(one_of, rename = "AnthropicInputContent")]
pub enum InputContent {
    Text(String),
    Blocks(Vec<InputBlock>),
}
string_or_list!(
    InputContent,
    InputBlock,
    "a string or a list of content blocks"
);

/// The system prompt: a string, or `text` blocks (joined with blank lines).
#[derive(Debug, Clone, Union)]
#[oai(one_of, rename = "AnthropicSystemPrompt")]
pub enum SystemPrompt {
    Text(String),
    Blocks(Vec<SystemBlock>),
}
string_or_list!(
    SystemPrompt,
    SystemBlock,
    "a string or a list of text blocks"
);

/// A block of the system prompt: text only.
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type", rename = "AnthropicSystemBlock")]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SystemBlock {
    #[oai(mapping = "text")]
    Text(TextInput),
}

/// A tool result's content: a string, or `text`, `image` and `document` blocks.
#[derive(Debug, Clone, Union)]
#[oai(one_of, rename = "AnthropicToolResultContent")]
pub enum ToolResultContent {
    Text(String),
    Blocks(Vec<InputBlock>),
}
string_or_list!(
    ToolResultContent,
    InputBlock,
    "a string or a list of content blocks"
);

/// One block of a message.
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type", rename = "AnthropicInputBlock")]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputBlock {
    #[oai(mapping = "text")]
    Text(TextInput),
    #[oai(mapping = "image")]
    Image(ImageInput),
    #[oai(mapping = "document")]
    Document(DocumentInput),
    #[oai(mapping = "tool_use")]
    ToolUse(ToolUseInput),
    #[oai(mapping = "tool_result")]
    ToolResult(ToolResultInput),
    /// The model's thinking, sent back unchanged with its signature.
    #[oai(mapping = "thinking")]
    Thinking(ThinkingInput),
    /// Refused: the gateway never answers with redacted thinking, so there is none to send
    /// back.
    #[oai(mapping = "redacted_thinking")]
    RedactedThinking(RedactedThinkingInput),
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicTextInput")]
#[serde(deny_unknown_fields)]
pub struct TextInput {
    pub text: String,
    /// Accepted and ignored (prompt caching is the model's `cache_prompt` setting).
    pub cache_control: Option<Value>,
    /// Accepted and ignored.
    pub citations: Option<Value>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicImageInput")]
#[serde(deny_unknown_fields)]
pub struct ImageInput {
    pub source: MediaSource,
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicDocumentInput")]
#[serde(deny_unknown_fields)]
pub struct DocumentInput {
    pub source: MediaSource,
    /// The document's name for the model (letters, digits, spaces, `-`, `(`, `)`, `[`,
    /// `]`; other characters are left out).
    pub title: Option<String>,
    /// Accepted and ignored.
    pub context: Option<String>,
    pub citations: Option<Value>,
    pub cache_control: Option<Value>,
}

/// Where an image's or a document's bytes are: `base64` (`media_type`, `data`), `text`
/// (documents: plain text in `data`). `url` sources are refused: the gateway does not
/// fetch the internet.
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type", rename = "AnthropicMediaSource")]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MediaSource {
    #[oai(mapping = "base64")]
    Base64(Base64Source),
    #[oai(mapping = "text")]
    Text(Base64Source),
    #[oai(mapping = "url")]
    Url(UrlSource),
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicBase64Source")]
#[serde(deny_unknown_fields)]
pub struct Base64Source {
    pub media_type: String,
    pub data: String,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicUrlSource")]
#[serde(deny_unknown_fields)]
pub struct UrlSource {
    pub url: String,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicToolUseInput")]
#[serde(deny_unknown_fields)]
pub struct ToolUseInput {
    pub id: String,
    pub name: String,
    pub input: Value,
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicToolResultInput")]
#[serde(deny_unknown_fields)]
pub struct ToolResultInput {
    pub tool_use_id: String,
    pub content: Option<ToolResultContent>,
    pub is_error: Option<bool>,
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicThinkingInput")]
#[serde(deny_unknown_fields)]
pub struct ThinkingInput {
    pub thinking: String,
    pub signature: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicRedactedThinkingInput")]
#[serde(deny_unknown_fields)]
pub struct RedactedThinkingInput {
    pub data: String,
}

/// A client tool. Anthropic's server tools (a `type` other than `custom`) are refused.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicTool")]
#[serde(deny_unknown_fields)]
pub struct ToolDefinition {
    pub name: String,
    pub description: Option<String>,
    pub input_schema: Option<Value>,
    /// `custom` or absent.
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub cache_control: Option<Value>,
}

#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "type", rename = "AnthropicToolChoice")]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AnthropicToolChoice {
    #[oai(mapping = "auto")]
    Auto(ParallelToolUse),
    #[oai(mapping = "any")]
    Any(ParallelToolUse),
    #[oai(mapping = "tool")]
    Tool(NamedToolChoice),
    #[oai(mapping = "none")]
    None(NoTools),
}

/// `disable_parallel_tool_use` is accepted and ignored.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicParallelToolUse")]
#[serde(deny_unknown_fields)]
pub struct ParallelToolUse {
    pub disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicNamedToolChoice")]
#[serde(deny_unknown_fields)]
pub struct NamedToolChoice {
    pub name: String,
    pub disable_parallel_tool_use: Option<bool>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "AnthropicNoTools")]
#[serde(deny_unknown_fields)]
pub struct NoTools {}

/// What both requests share, on the way to a [`GenerateRequest`].
pub struct Conversation {
    pub model: String,
    pub messages: Vec<InputMessage>,
    pub system: Option<SystemPrompt>,
    pub thinking: Option<Value>,
    pub top_k: Option<u32>,
    pub tools: Option<Vec<ToolDefinition>>,
    pub tool_choice: Option<AnthropicToolChoice>,
}

impl MessagesRequest {
    /// The gateway's request. `additional_fields_allowed`: whether the model takes
    /// per-request fields (`top_k`, `thinking` go there).
    pub fn into_generate(self, additional_fields_allowed: bool) -> Result<GenerateRequest> {
        let request = Conversation {
            model: self.model,
            messages: self.messages,
            system: self.system,
            thinking: self.thinking,
            top_k: self.top_k,
            tools: self.tools,
            tool_choice: self.tool_choice,
        }
        .into_generate(additional_fields_allowed)?;
        Ok(GenerateRequest {
            max_tokens: Some(self.max_tokens),
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop_sequences.filter(|stop| !stop.is_empty()),
            ..request
        })
    }
}

impl From<CountTokensRequest> for Conversation {
    fn from(request: CountTokensRequest) -> Self {
        Conversation {
            model: request.model,
            messages: request.messages,
            system: request.system,
            thinking: request.thinking,
            top_k: None,
            tools: request.tools,
            tool_choice: request.tool_choice,
        }
    }
}

fn invalid<T>(message: String) -> Result<T> {
    Err(Error::InvalidRequest(message))
}

impl Conversation {
    pub fn into_generate(self, additional_fields_allowed: bool) -> Result<GenerateRequest> {
        let mut additional_fields = Map::new();
        if let Some(top_k) = self.top_k {
            additional_fields.insert("top_k".into(), top_k.into());
        }
        if let Some(thinking) = self.thinking {
            if !thinking.get("type").is_some_and(Value::is_string) {
                return invalid(
                    "`thinking` must be an object with a `type` (`{\"type\": \"enabled\", \"budget_tokens\": 2048}`)"
                        .into(),
                );
            }
            // Thinking turned off is what a model without per-request fields does anyway.
            let disabled = thinking["type"] == "disabled";
            if additional_fields_allowed || !disabled {
                additional_fields.insert("thinking".into(), thinking);
            }
        }
        if let Some(field) = additional_fields.keys().next()
            && !additional_fields_allowed
        {
            return invalid(format!(
                "model `{}` does not take `{field}`: it is passed to the model as an additional request field, which the model's configuration must allow (`allow_request_additional_fields = true`)",
                self.model
            ));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(index, message)| {
                Ok(ChatMessage {
                    role: message.role,
                    content: content(message.content, &format!("messages[{index}].content"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut tools = self
            .tools
            .map(|tools| {
                tools
                    .into_iter()
                    .enumerate()
                    .map(|(index, tool)| tool_spec(tool, index))
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let tool_choice = match self.tool_choice {
            None | Some(AnthropicToolChoice::Auto(_)) => tools
                .as_ref()
                .map(|_| ToolChoice::Mode(ToolChoiceMode::Auto)),
            Some(AnthropicToolChoice::Any(_)) => Some(ToolChoice::Mode(ToolChoiceMode::Any)),
            Some(AnthropicToolChoice::Tool(named)) => {
                Some(ToolChoice::Named(NamedTool { name: named.name }))
            }
            Some(AnthropicToolChoice::None(_)) => {
                // Bedrock has no "none": the model is given no tools at all, which it can
                // only be when the conversation holds no tool calls.
                if messages.iter().any(holds_tool_calls) {
                    return invalid(
                        "`tool_choice` `none` cannot be honoured for a conversation that holds tool calls (the model must be given the tools); leave `tool_choice` out".into(),
                    );
                }
                tools = None;
                None
            }
        };
        Ok(GenerateRequest {
            model: self.model,
            messages: Some(messages),
            system: self.system.map(system_text),
            tools,
            tool_choice,
            additional_fields: (!additional_fields.is_empty())
                .then_some(Value::Object(additional_fields)),
            ..GenerateRequest::default()
        })
    }
}

fn holds_tool_calls(message: &ChatMessage) -> bool {
    let MessageContent::Blocks(blocks) = &message.content else {
        return false;
    };
    blocks.iter().any(|block| {
        matches!(
            block,
            ContentBlock::ToolUse(_) | ContentBlock::ToolResult(_)
        )
    })
}

fn system_text(system: SystemPrompt) -> String {
    match system {
        SystemPrompt::Text(text) => text,
        SystemPrompt::Blocks(blocks) => blocks
            .into_iter()
            .map(|SystemBlock::Text(block)| block.text)
            .collect::<Vec<_>>()
            .join("\n\n"),
    }
}

fn tool_spec(tool: ToolDefinition, index: usize) -> Result<ToolSpec> {
    if let Some(kind) = tool.kind.as_deref().filter(|kind| *kind != "custom") {
        return invalid(format!(
            "`tools[{index}]` is an Anthropic server tool (`type` = `{}`), which the gateway does not run; only client tools (`name`, `description`, `input_schema`) are supported",
            kind.escape_debug()
        ));
    }
    let Some(input_schema) = tool.input_schema else {
        return invalid(format!("`tools[{index}].input_schema` is required"));
    };
    Ok(ToolSpec {
        name: tool.name,
        description: tool.description,
        input_schema,
    })
}

fn content(content: InputContent, field: &str) -> Result<MessageContent> {
    Ok(match content {
        InputContent::Text(text) => MessageContent::Text(text),
        InputContent::Blocks(blocks) => MessageContent::Blocks(
            blocks
                .into_iter()
                .enumerate()
                .map(|(index, block)| content_block(block, &format!("{field}[{index}]")))
                .collect::<Result<_>>()?,
        ),
    })
}

fn content_block(block: InputBlock, field: &str) -> Result<ContentBlock> {
    Ok(match block {
        InputBlock::Text(text) => ContentBlock::Text(TextBlock { text: text.text }),
        InputBlock::Image(image) => ContentBlock::Image(match image.source {
            MediaSource::Base64(source) => ImageBlock {
                media_type: Some(source.media_type),
                data: Some(source.data),
                url: None,
            },
            MediaSource::Url(_) => {
                return invalid(format!(
                    "`{field}.source`: the gateway does not fetch images from URLs; send the image as a `base64` source"
                ));
            }
            MediaSource::Text(_) => {
                return invalid(format!(
                    "`{field}.source`: an image's source is `base64`, not `text`"
                ));
            }
        }),
        InputBlock::Document(document) => ContentBlock::Document(document_block(document, field)?),
        InputBlock::ToolUse(call) => ContentBlock::ToolUse(ToolUseBlock {
            id: call.id,
            name: call.name,
            input: call.input,
        }),
        InputBlock::ToolResult(result) => ContentBlock::ToolResult(ToolResultBlock {
            tool_use_id: result.tool_use_id,
            content: match result.content {
                None => MessageContent::Text(String::new()),
                Some(ToolResultContent::Text(text)) => MessageContent::Text(text),
                Some(ToolResultContent::Blocks(blocks)) => {
                    content(InputContent::Blocks(blocks), &format!("{field}.content"))?
                }
            },
            is_error: result.is_error,
        }),
        InputBlock::Thinking(thinking) => ContentBlock::Reasoning(ReasoningBlock {
            text: thinking.thinking,
            signature: thinking.signature.filter(|signature| !signature.is_empty()),
        }),
        InputBlock::RedactedThinking(_) => {
            return invalid(format!(
                "`{field}` is a `redacted_thinking` block, which the gateway cannot pass on (it never answers with one)"
            ));
        }
    })
}

fn document_block(document: DocumentInput, field: &str) -> Result<DocumentBlock> {
    let (format, data) = match document.source {
        MediaSource::Base64(source) => {
            let Some(format) = document_format(&source.media_type) else {
                return invalid(format!(
                    "`{field}.source.media_type` is `{}`; documents are application/pdf, text/plain, text/csv, text/html or text/markdown",
                    source.media_type.escape_debug()
                ));
            };
            (format, source.data)
        }
        MediaSource::Text(source) => (
            document_format(&source.media_type).unwrap_or(DocumentFormat::Txt),
            base64::engine::general_purpose::STANDARD.encode(source.data),
        ),
        MediaSource::Url(_) => {
            return invalid(format!(
                "`{field}.source`: the gateway does not fetch documents from URLs; send the document as a `base64` or `text` source"
            ));
        }
    };
    // A document's name is at most 200 bytes (what the gateway's check counts), not chars.
    let mut title = String::new();
    for c in document
        .title
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_alphanumeric() || " -()[]".contains(*c))
    {
        if title.len() + c.len_utf8() > 200 {
            break;
        }
        title.push(c);
    }
    Ok(DocumentBlock {
        format,
        name: match title.trim() {
            "" => "document".to_owned(),
            title => title.to_owned(),
        },
        data,
    })
}

fn document_format(media_type: &str) -> Option<DocumentFormat> {
    Some(match media_type.trim().to_ascii_lowercase().as_str() {
        "application/pdf" => DocumentFormat::Pdf,
        "text/plain" => DocumentFormat::Txt,
        "text/csv" => DocumentFormat::Csv,
        "text/html" => DocumentFormat::Html,
        "text/markdown" => DocumentFormat::Md,
        _ => return None,
    })
}

/// `message`: the `type` of a whole message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "AnthropicMessageType", rename_all = "lowercase")]
pub enum MessageType {
    Message,
}

/// `assistant`: the role of every answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "AnthropicAnswerRole", rename_all = "lowercase")]
pub enum AnswerRole {
    Assistant,
}

/// A whole answer (and, empty, the `message` of a stream's `message_start`).
#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicMessage")]
pub struct AnswerMessage {
    /// `msg_…`
    pub id: String,
    #[oai(rename = "type")]
    pub kind: MessageType,
    pub role: AnswerRole,
    /// The model's registry name, as the request gave it.
    pub model: String,
    pub content: Vec<AnswerContent>,
    /// Null in `message_start`.
    pub stop_reason: Option<AnthropicStopReason>,
    /// The stop sequence that ended the answer, where it is known (the request gave one).
    pub stop_sequence: Option<String>,
    pub usage: MessageUsage,
}

impl AnswerMessage {
    /// A message with a fresh id and no content yet.
    pub fn empty(model: String) -> Self {
        AnswerMessage {
            id: format!("msg_{}", uuid::Uuid::new_v4().simple()),
            kind: MessageType::Message,
            role: AnswerRole::Assistant,
            model,
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: MessageUsage::from(Usage::default()),
        }
    }
}

/// One block of an answer.
#[derive(Debug, Clone, Union)]
#[oai(discriminator_name = "type", rename = "AnthropicAnswerContent")]
pub enum AnswerContent {
    #[oai(mapping = "text")]
    Text(TextBlock),
    #[oai(mapping = "tool_use")]
    ToolUse(ToolUseBlock),
    #[oai(mapping = "thinking")]
    Thinking(ThinkingOutput),
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicThinking")]
pub struct ThinkingOutput {
    pub thinking: String,
    /// Send it back with the thinking in the next turn; empty where the model gave none.
    pub signature: String,
}

impl From<AnswerBlock> for AnswerContent {
    fn from(block: AnswerBlock) -> Self {
        match block {
            AnswerBlock::Text(text) => AnswerContent::Text(TextBlock { text }),
            AnswerBlock::ToolCall(call) => AnswerContent::ToolUse(call.into()),
            AnswerBlock::Reasoning(piece) => AnswerContent::Thinking(ThinkingOutput {
                thinking: piece.text,
                signature: piece.signature.unwrap_or_default(),
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "AnthropicStopReason", rename_all = "snake_case")]
pub enum AnthropicStopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ToolUse,
    /// The model's or a guardrail's content filter stopped the answer.
    Refusal,
}

impl From<StopReason> for AnthropicStopReason {
    fn from(reason: StopReason) -> Self {
        match reason {
            StopReason::EndTurn => AnthropicStopReason::EndTurn,
            StopReason::MaxTokens => AnthropicStopReason::MaxTokens,
            StopReason::StopSequence => AnthropicStopReason::StopSequence,
            StopReason::ToolUse => AnthropicStopReason::ToolUse,
            StopReason::ContentFiltered => AnthropicStopReason::Refusal,
        }
    }
}

/// The stop sequence that ended an answer: the gateway knows which one only when the
/// request gave exactly one.
pub fn stop_sequence(reason: StopReason, requested: &[String]) -> Option<String> {
    match (reason, requested) {
        (StopReason::StopSequence, [only]) => Some(only.clone()),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Object)]
#[oai(rename = "AnthropicUsage")]
pub struct MessageUsage {
    pub input_tokens: u32,
    pub output_tokens: u32,
    #[oai(skip_serializing_if_is_none)]
    pub cache_read_input_tokens: Option<u32>,
    #[oai(skip_serializing_if_is_none)]
    pub cache_creation_input_tokens: Option<u32>,
}

impl From<Usage> for MessageUsage {
    fn from(usage: Usage) -> Self {
        MessageUsage {
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            cache_read_input_tokens: usage.cache_read_input_tokens,
            cache_creation_input_tokens: usage.cache_write_input_tokens,
        }
    }
}
