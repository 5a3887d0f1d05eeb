//! OpenAI's chat-completions and models shapes, as its API reference gives them: parsed by
//! serde (unknown fields are ignored, as OpenAI's SDKs send more than this gateway reads),
//! described in the OpenAPI document by poem-openapi.

use poem_openapi::{Enum, Object, Union};
use serde::{Deserialize, Deserializer, Serialize, de};
use serde_json::{Map, Value};

/// `Deserialize` for an enum of a string (variant `$text`) or a list (variant `$list`).
macro_rules! string_or_list {
    ($name:ident, $text:ident, $list:ident) => {
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                Ok(match string_or_list(deserializer)? {
                    StringOrList::String(text) => $name::$text(text),
                    StringOrList::List(list) => $name::$list(list),
                })
            }
        }
    };
}

/// A chat-completion request.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "OpenAiChatCompletionRequest")]
pub struct ChatCompletionRequest {
    /// Name of a model in the registry (`GET /v1/models`).
    pub model: String,
    /// The conversation so far, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Most tokens to generate (OpenAI's older name of `max_completion_tokens`).
    pub max_tokens: Option<u32>,
    /// Most tokens to generate: 1 up to the model's `max_tokens_limit` (default: the model's
    /// `max_tokens`).
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 to 1 (values above 1 of OpenAI's 0–2 range are refused, not
    /// rescaled).
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, 0 to 1.
    pub top_p: Option<f64>,
    /// One stop sequence or a list of them (at most 8).
    pub stop: Option<Stop>,
    /// Stream the answer as `chat.completion.chunk` Server-Sent Events, then `data: [DONE]`.
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Functions the model may call (models with `format = "converse"`).
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    /// An identifier of the end user; accepted and not used.
    pub user: Option<String>,
    /// Every other field, checked against the options the gateway refuses.
    #[oai(skip)]
    #[serde(flatten)]
    pub others: Map<String, Value>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, PartialEq, Union)]
#[oai(one_of)]
#[oai(rename = "OpenAiStop")]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

string_or_list!(Stop, One, Many);

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "OpenAiStreamOptions")]
pub struct StreamOptions {
    /// One more chunk before `data: [DONE]`, with the `usage` of the whole answer and empty
    /// `choices`.
    pub include_usage: Option<bool>,
}

/// One message, by its `role`.
#[derive(Debug, Clone, Union, Deserialize)]
#[oai(discriminator_name = "role")]
#[serde(tag = "role", rename_all = "lowercase")]
#[oai(rename = "OpenAiChatMessage")]
pub enum ChatMessage {
    /// Instructions: every `system` and `developer` message, joined, is the system prompt.
    #[oai(mapping = "system")]
    System(SystemMessage),
    #[oai(mapping = "developer")]
    Developer(DeveloperMessage),
    #[oai(mapping = "user")]
    User(UserMessage),
    #[oai(mapping = "assistant")]
    Assistant(AssistantMessage),
    /// The result of a tool call; consecutive `tool` messages answer one assistant turn.
    #[oai(mapping = "tool")]
    Tool(ToolMessage),
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "OpenAiSystemMessage")]
pub struct SystemMessage {
    pub content: TextContent,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "OpenAiDeveloperMessage")]
pub struct DeveloperMessage {
    pub content: TextContent,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "OpenAiUserMessage")]
pub struct UserMessage {
    pub content: UserContent,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "OpenAiAssistantMessage")]
pub struct AssistantMessage {
    /// Null when the message is only tool calls.
    #[oai(nullable)]
    pub content: Option<AssistantContent>,
    /// The calls the assistant made; each `function.arguments` is a JSON object as a string.
    pub tool_calls: Option<Vec<ToolCall>>,
    pub refusal: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Object, Deserialize)]
#[oai(rename = "OpenAiToolMessage")]
pub struct ToolMessage {
    /// The `id` of the assistant's tool call this answers.
    pub tool_call_id: String,
    pub content: TextContent,
}

/// A string, or `text` parts.
#[derive(Debug, Clone, PartialEq, Union)]
#[oai(one_of)]
#[oai(rename = "OpenAiTextContent")]
pub enum TextContent {
    Text(String),
    Parts(Vec<TextOnlyPart>),
}

impl TextContent {
    /// The text of every part, joined.
    pub fn joined(self) -> String {
        match self {
            TextContent::Text(text) => text,
            TextContent::Parts(parts) => parts
                .into_iter()
                .map(|TextOnlyPart::Text(part)| part.text)
                .collect(),
        }
    }
}

string_or_list!(TextContent, Text, Parts);

#[derive(Debug, Clone, PartialEq, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type", rename_all = "snake_case")]
#[oai(rename = "OpenAiTextOnlyPart")]
pub enum TextOnlyPart {
    #[oai(mapping = "text")]
    Text(TextPart),
}

/// A string, or `text` and `image_url` parts.
#[derive(Debug, Clone, PartialEq, Union)]
#[oai(one_of)]
#[oai(rename = "OpenAiUserContent")]
pub enum UserContent {
    Text(String),
    Parts(Vec<UserPart>),
}

string_or_list!(UserContent, Text, Parts);

#[derive(Debug, Clone, PartialEq, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type", rename_all = "snake_case")]
#[oai(rename = "OpenAiUserPart")]
pub enum UserPart {
    #[oai(mapping = "text")]
    Text(TextPart),
    /// An image, inline as a `data:` URL; remote URLs are refused.
    #[oai(mapping = "image_url")]
    ImageUrl(ImagePart),
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiTextPart")]
pub struct TextPart {
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiImagePart")]
pub struct ImagePart {
    pub image_url: ImageUrl,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiImageUrl")]
pub struct ImageUrl {
    /// `data:image/png;base64,…` (png, jpeg, gif or webp). The gateway does not fetch
    /// `http(s)` URLs.
    pub url: String,
    /// Accepted and not used.
    pub detail: Option<String>,
}

/// A string, or `text` and `refusal` parts.
#[derive(Debug, Clone, PartialEq, Union)]
#[oai(one_of)]
#[oai(rename = "OpenAiAssistantContent")]
pub enum AssistantContent {
    Text(String),
    Parts(Vec<AssistantPart>),
}

string_or_list!(AssistantContent, Text, Parts);

#[derive(Debug, Clone, PartialEq, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type", rename_all = "snake_case")]
#[oai(rename = "OpenAiAssistantPart")]
pub enum AssistantPart {
    #[oai(mapping = "text")]
    Text(TextPart),
    #[oai(mapping = "refusal")]
    Refusal(RefusalPart),
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiRefusalPart")]
pub struct RefusalPart {
    pub refusal: String,
}

/// A tool call: in a request, one the assistant made earlier; in an answer, one it makes now.
#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiToolCall")]
pub struct ToolCall {
    pub id: String,
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiFunctionCall")]
pub struct FunctionCall {
    pub name: String,
    /// The input, a JSON object written as a string.
    pub arguments: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize, Serialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
#[oai(rename = "OpenAiFunctionType")]
pub enum FunctionType {
    Function,
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiTool")]
pub struct Tool {
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub function: FunctionDefinition,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiFunctionDefinition")]
pub struct FunctionDefinition {
    /// 1 to 64 letters, digits, `_` or `-`.
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema of the input (an object); none means no input.
    pub parameters: Option<Value>,
    /// Accepted and not used.
    pub strict: Option<bool>,
}

/// `none` (no tool; see the README for conversations that already hold tool calls),
/// `auto`, `required` (some tool), or `{"type": "function", "function": {"name"}}`.
#[derive(Debug, Clone, PartialEq, Union)]
#[oai(one_of)]
#[oai(rename = "OpenAiToolChoice")]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Named(NamedToolChoice),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
#[oai(rename = "OpenAiToolChoiceMode")]
pub enum ToolChoiceMode {
    None,
    Auto,
    Required,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiNamedToolChoice")]
pub struct NamedToolChoice {
    #[oai(rename = "type")]
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub function: FunctionName,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[oai(rename = "OpenAiFunctionName")]
pub struct FunctionName {
    pub name: String,
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Mode(ToolChoiceMode),
            Named(NamedToolChoice),
        }
        match Either::deserialize(deserializer) {
            Ok(Either::Mode(mode)) => Ok(ToolChoice::Mode(mode)),
            Ok(Either::Named(named)) => Ok(ToolChoice::Named(named)),
            Err(_) => Err(de::Error::custom(
                "`tool_choice`: expected \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": \"<name>\"}}",
            )),
        }
    }
}

enum StringOrList<T> {
    String(String),
    List(Vec<T>),
}

/// A string or a list, with serde's own error for what is inside the list (an untagged enum
/// would only say that nothing matched).
fn string_or_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<StringOrList<T>, D::Error> {
    struct Visitor<T>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>> de::Visitor<'de> for Visitor<T> {
        type Value = StringOrList<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string or a list")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(StringOrList::String(text.to_owned()))
        }

        fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
            Ok(StringOrList::String(text))
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(StringOrList::List)
        }
    }
    deserializer.deserialize_any(Visitor(std::marker::PhantomData))
}

/// A whole answer.
#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiChatCompletion")]
pub struct ChatCompletion {
    /// `chatcmpl-` and 32 hex digits.
    pub id: String,
    pub object: CompletionObject,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    /// Exactly one.
    pub choices: Vec<Choice>,
    pub usage: CompletionUsage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "OpenAiCompletionObject")]
pub enum CompletionObject {
    #[oai(rename = "chat.completion")]
    ChatCompletion,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiChoice")]
pub struct Choice {
    pub index: u32,
    pub message: AnswerMessage,
    pub finish_reason: FinishReason,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiAnswerMessage")]
pub struct AnswerMessage {
    pub role: AssistantRole,
    /// The text; null when the answer is only tool calls.
    #[oai(nullable)]
    pub content: Option<String>,
    /// Always null: refusals come as `finish_reason: content_filter`.
    #[oai(nullable)]
    pub refusal: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The model's reasoning, where the model reasons (as DeepSeek's API names it).
    #[oai(skip_serializing_if_is_none)]
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
#[oai(rename = "OpenAiAssistantRole")]
pub enum AssistantRole {
    Assistant,
}

/// `stop` (the model ended, or wrote a stop sequence), `length` (`max_tokens`),
/// `tool_calls`, or `content_filter` (a guardrail or the model's own filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "snake_case")]
#[oai(rename = "OpenAiFinishReason")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }
}

/// Token counts. `prompt_tokens` includes the tokens read from and written to the prompt
/// cache; `prompt_tokens_details.cached_tokens` are those read from it.
#[derive(Debug, Clone, Copy, Object, Serialize)]
#[oai(rename = "OpenAiCompletionUsage")]
pub struct CompletionUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Object, Serialize)]
#[oai(rename = "OpenAiPromptTokensDetails")]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

/// One event of a streamed answer (`data:` lines): `chat.completion.chunk` objects, an
/// `error` object if the answer fails after the stream began (the stream ends there), and
/// after the last chunk the line `data: [DONE]`, which is not JSON.
#[derive(Debug, Clone, Union)]
#[oai(one_of)]
#[oai(rename = "OpenAiStreamData")]
pub enum StreamData {
    Chunk(ChatCompletionChunk),
    Error(super::error::ErrorBody),
}

/// A piece of a streamed answer: the first has `delta.role`, then `delta.content` pieces
/// and `delta.tool_calls` fragments as the model writes them, then one with
/// `finish_reason`; with `stream_options.include_usage`, one more with `usage` and empty
/// `choices`.
#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiChatCompletionChunk")]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ChunkObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Only with `stream_options.include_usage`: null but on the last chunk.
    #[oai(nullable, skip_serializing_if_is_none)]
    pub usage: Option<CompletionUsage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "OpenAiChunkObject")]
pub enum ChunkObject {
    #[oai(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiChunkChoice")]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: ChunkDelta,
    #[oai(nullable)]
    pub finish_reason: Option<FinishReason>,
}

#[derive(Debug, Clone, Default, Object)]
#[oai(rename = "OpenAiChunkDelta")]
pub struct ChunkDelta {
    #[oai(skip_serializing_if_is_none)]
    pub role: Option<AssistantRole>,
    #[oai(skip_serializing_if_is_none)]
    pub content: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub reasoning_content: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub tool_calls: Option<Vec<ChunkToolCall>>,
}

/// A fragment of a tool call: the first of a call has its `id`, `type` and `function.name`,
/// the next ones pieces of `function.arguments`.
#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiChunkToolCall")]
pub struct ChunkToolCall {
    /// Which call of the answer this is a fragment of, from 0.
    pub index: u32,
    #[oai(skip_serializing_if_is_none)]
    pub id: Option<String>,
    #[oai(rename = "type", skip_serializing_if_is_none)]
    pub kind: Option<FunctionType>,
    pub function: ChunkFunction,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiChunkFunction")]
pub struct ChunkFunction {
    #[oai(skip_serializing_if_is_none)]
    pub name: Option<String>,
    #[oai(skip_serializing_if_is_none)]
    pub arguments: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiModelList")]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<ModelObject>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
#[oai(rename = "OpenAiListObject")]
pub enum ListObject {
    List,
}

/// A model of the registry.
#[derive(Debug, Clone, Object)]
#[oai(rename = "OpenAiModelObject")]
pub struct ModelObject {
    /// The model's name in the registry, what `model` takes.
    pub id: String,
    pub object: ModelObjectKind,
    /// Unix seconds, the same for every model for the life of the gateway process: the
    /// registry has no creation dates.
    pub created: u64,
    /// The provider: `bedrock` or `local`.
    pub owned_by: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
#[oai(rename = "OpenAiModelObjectKind")]
pub enum ModelObjectKind {
    Model,
}
