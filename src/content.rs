//! What a message holds beyond text, on the way in and out: the wire shapes of content blocks
//! and tools (the OpenAPI document describes them), and their validated forms that providers
//! turn into their own bodies.

use base64::Engine;
use poem_openapi::{Enum, Object, Union};
use serde::{Deserialize, Deserializer, de};
use serde_json::Value;

use crate::error::{Error, Result};

/// A message's content: a string, or a list of blocks.
#[derive(Debug, Clone, PartialEq, Union)]
#[oai(one_of)]
pub enum MessageContent {
    Text(String),
    Blocks(Vec<ContentBlock>),
}

impl From<String> for MessageContent {
    fn from(text: String) -> Self {
        MessageContent::Text(text)
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    /// A string or a list, with serde's own error for what is inside the list (an untagged
    /// enum would only say that nothing matched).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> de::Visitor<'de> for Visitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or a list of content blocks")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> std::result::Result<Self::Value, E> {
                Ok(MessageContent::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(
                self,
                text: String,
            ) -> std::result::Result<Self::Value, E> {
                Ok(MessageContent::Text(text))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(MessageContent::Blocks)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// One block of a message.
#[derive(Debug, Clone, PartialEq, Union, Deserialize)]
#[oai(discriminator_name = "type")]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentBlock {
    #[oai(mapping = "text")]
    Text(TextBlock),
    #[oai(mapping = "image")]
    Image(ImageBlock),
    #[oai(mapping = "document")]
    Document(DocumentBlock),
    /// A tool call the model made (assistant messages).
    #[oai(mapping = "tool_use")]
    ToolUse(ToolUseBlock),
    /// The answer to a tool call (user messages).
    #[oai(mapping = "tool_result")]
    ToolResult(ToolResultBlock),
    /// The model's reasoning, sent back unchanged in a multi-turn conversation (assistant
    /// messages).
    #[oai(mapping = "reasoning")]
    Reasoning(ReasoningBlock),
}

impl ContentBlock {
    pub fn type_name(&self) -> &'static str {
        match self {
            ContentBlock::Text(_) => "text",
            ContentBlock::Image(_) => "image",
            ContentBlock::Document(_) => "document",
            ContentBlock::ToolUse(_) => "tool_use",
            ContentBlock::ToolResult(_) => "tool_result",
            ContentBlock::Reasoning(_) => "reasoning",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextBlock {
    pub text: String,
}

/// An image: base64 `data` with its `media_type`, or a `data:` URL in `url`.
#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageBlock {
    /// `image/png`, `image/jpeg`, `image/gif` or `image/webp`.
    pub media_type: Option<String>,
    /// The image's bytes, base64.
    pub data: Option<String>,
    /// A `data:` URL (`data:image/png;base64,…`). Remote URLs are not fetched.
    pub url: Option<String>,
}

/// A document for the model to read.
#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentBlock {
    pub format: DocumentFormat,
    /// A name for the document (letters, digits, spaces, `-`, `(`, `)`, `[`, `]`).
    pub name: String,
    /// The document's bytes, base64.
    pub data: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum DocumentFormat {
    Pdf,
    Csv,
    Doc,
    Docx,
    Xls,
    Xlsx,
    Html,
    Txt,
    Md,
}

/// A tool call: in a request, one the model made earlier; in an answer, one it makes now.
#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolUseBlock {
    pub id: String,
    pub name: String,
    /// The tool's input, a JSON object matching the tool's `input_schema`.
    pub input: Value,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolResultBlock {
    /// The `id` of the `tool_use` block this answers.
    pub tool_use_id: String,
    /// A string, or `text`, `image` and `document` blocks.
    pub content: MessageContent,
    /// The tool failed; `content` says how.
    pub is_error: Option<bool>,
}

/// Reasoning the model wrote before its answer.
#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasoningBlock {
    pub text: String,
    /// The model's signature of the reasoning, to send back with it in the next turn.
    #[oai(skip_serializing_if_is_none)]
    pub signature: Option<String>,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// 1 to 64 letters, digits, `_` or `-`.
    pub name: String,
    pub description: Option<String>,
    /// A JSON Schema of the tool's input (an object).
    pub input_schema: Value,
}

/// Whether the model must call a tool: `auto` (it decides), `any` (it must call one), or
/// `{"name": …}` (it must call that one).
#[derive(Debug, Clone, PartialEq, Union)]
#[oai(one_of)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Named(NamedTool),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    Auto,
    Any,
}

#[derive(Debug, Clone, PartialEq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedTool {
    pub name: String,
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            Mode(ToolChoiceMode),
            Named(NamedTool),
        }
        match Either::deserialize(deserializer) {
            Ok(Either::Mode(mode)) => Ok(ToolChoice::Mode(mode)),
            Ok(Either::Named(named)) => Ok(ToolChoice::Named(named)),
            Err(_) => Err(de::Error::custom(
                "expected \"auto\", \"any\" or {\"name\": \"<tool name>\"}",
            )),
        }
    }
}

/// What a model can take besides text, from its provider and format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Accepts {
    pub images: bool,
    pub documents: bool,
    pub tools: bool,
    /// Reasoning blocks sent back in assistant messages.
    pub reasoning: bool,
    /// Per-request `additional_fields`.
    pub additional_fields: bool,
}

impl Accepts {
    pub const TEXT: Accepts = Accepts {
        images: false,
        documents: false,
        tools: false,
        reasoning: false,
        additional_fields: false,
    };
}

/// How much media one request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MediaLimits {
    pub max_image_bytes: usize,
    pub max_images: usize,
    pub max_document_bytes: usize,
    pub max_documents: usize,
}

impl Default for MediaLimits {
    /// Bedrock Converse's own limits.
    fn default() -> Self {
        MediaLimits {
            max_image_bytes: 3_750_000,
            max_images: 20,
            max_document_bytes: 4_500_000,
            max_documents: 5,
        }
    }
}

/// A validated block, media decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text(String),
    Image(Image),
    Document(Document),
    ToolUse(ToolCall),
    ToolResult(ToolResult),
    Reasoning(Reasoning),
}

impl Block {
    /// The characters of text the block gives the model, for the input limit.
    pub fn text_chars(&self) -> usize {
        match self {
            Block::Text(text) => text.chars().count(),
            Block::Reasoning(reasoning) => reasoning.text.chars().count(),
            Block::ToolResult(result) => result.content.iter().map(Block::text_chars).sum(),
            Block::ToolUse(call) => call.input.to_string().chars().count(),
            Block::Image(_) | Block::Document(_) => 0,
        }
    }

    /// Text that holds nothing but white space.
    pub fn is_blank(&self) -> bool {
        matches!(self, Block::Text(text) if text.trim().is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    Gif,
    Webp,
}

impl ImageFormat {
    fn from_media_type(media_type: &str) -> Option<ImageFormat> {
        match media_type.trim().to_ascii_lowercase().as_str() {
            "image/png" => Some(ImageFormat::Png),
            "image/jpeg" | "image/jpg" => Some(ImageFormat::Jpeg),
            "image/gif" => Some(ImageFormat::Gif),
            "image/webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Gif => "gif",
            ImageFormat::Webp => "webp",
        }
    }

    pub fn media_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Gif => "image/gif",
            ImageFormat::Webp => "image/webp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub format: ImageFormat,
    pub data: bytes::Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub format: DocumentFormat,
    pub name: String,
    pub data: bytes::Bytes,
}

impl DocumentFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentFormat::Pdf => "pdf",
            DocumentFormat::Csv => "csv",
            DocumentFormat::Doc => "doc",
            DocumentFormat::Docx => "docx",
            DocumentFormat::Xls => "xls",
            DocumentFormat::Xlsx => "xlsx",
            DocumentFormat::Html => "html",
            DocumentFormat::Txt => "txt",
            DocumentFormat::Md => "md",
        }
    }
}

/// A complete tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// A JSON object.
    pub input: Value,
}

impl From<ToolCall> for ToolUseBlock {
    fn from(call: ToolCall) -> Self {
        ToolUseBlock {
            id: call.id,
            name: call.name,
            input: call.input,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ToolResult {
    pub tool_use_id: String,
    /// Text, image and document blocks only.
    pub content: Vec<Block>,
    pub is_error: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reasoning {
    pub text: String,
    pub signature: Option<String>,
}

/// A validated tool definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    pub input_schema: Value,
}

/// Checks one message's blocks and decodes their media. `field` names the message
/// (`messages[2]`), `media` counts images and documents across the request.
pub(crate) struct BlockChecker<'a> {
    pub model: &'a str,
    pub accepts: Accepts,
    pub limits: MediaLimits,
    pub images: usize,
    pub documents: usize,
}

impl BlockChecker<'_> {
    fn refuse(&self, block: &str, field: &str) -> Error {
        Error::InvalidRequest(format!(
            "model `{}` cannot take `{block}` blocks (`{field}`); models with `format = \"converse\"` can",
            self.model
        ))
    }

    /// Validates `content` of a message with `role` (`user` or `assistant`).
    pub fn check(
        &mut self,
        content: MessageContent,
        assistant: bool,
        field: &str,
    ) -> Result<Vec<Block>> {
        let blocks = match content {
            MessageContent::Text(text) => return Ok(vec![Block::Text(text)]),
            MessageContent::Blocks(blocks) => blocks,
        };
        if blocks.is_empty() {
            return Err(Error::InvalidRequest(format!("`{field}` is an empty list")));
        }
        blocks
            .into_iter()
            .enumerate()
            .map(|(index, block)| {
                let field = format!("{field}[{index}]");
                let role_only = |wanted: bool, role: &str| {
                    if assistant == wanted {
                        Ok(())
                    } else {
                        Err(Error::InvalidRequest(format!(
                            "`{field}` is a `{}` block, which only `{role}` messages may hold",
                            block.type_name()
                        )))
                    }
                };
                match &block {
                    ContentBlock::ToolUse(_) | ContentBlock::Reasoning(_) => {
                        role_only(true, "assistant")?
                    }
                    ContentBlock::ToolResult(_) => role_only(false, "user")?,
                    _ => {}
                }
                self.block(block, &field, true)
            })
            .collect()
    }

    fn block(&mut self, block: ContentBlock, field: &str, nested_results: bool) -> Result<Block> {
        let invalid = |message: String| Err(Error::InvalidRequest(message));
        Ok(match block {
            ContentBlock::Text(TextBlock { text }) => Block::Text(text),
            ContentBlock::Image(image) => {
                if !self.accepts.images {
                    return Err(self.refuse("image", field));
                }
                self.images += 1;
                if self.images > self.limits.max_images {
                    return Err(Error::TooLarge(format!(
                        "the request holds more than {} images",
                        self.limits.max_images
                    )));
                }
                Block::Image(self.image(image, field)?)
            }
            ContentBlock::Document(document) => {
                if !self.accepts.documents {
                    return Err(self.refuse("document", field));
                }
                self.documents += 1;
                if self.documents > self.limits.max_documents {
                    return Err(Error::TooLarge(format!(
                        "the request holds more than {} documents",
                        self.limits.max_documents
                    )));
                }
                let name_ok = !document.name.trim().is_empty()
                    && document.name.len() <= 200
                    && document
                        .name
                        .chars()
                        .all(|c| c.is_alphanumeric() || " -()[]".contains(c));
                if !name_ok {
                    return invalid(format!(
                        "`{field}.name` must be 1 to 200 letters, digits, spaces, `-`, `(`, `)`, `[` or `]`"
                    ));
                }
                let data = decode_base64(&document.data, &format!("{field}.data"))?;
                if data.len() > self.limits.max_document_bytes {
                    return Err(Error::TooLarge(format!(
                        "`{field}` is {} bytes; documents may be at most {} bytes",
                        data.len(),
                        self.limits.max_document_bytes
                    )));
                }
                Block::Document(Document {
                    format: document.format,
                    name: document.name,
                    data: data.into(),
                })
            }
            ContentBlock::ToolUse(call) => {
                if !self.accepts.tools {
                    return Err(self.refuse("tool_use", field));
                }
                if !call.input.is_object() {
                    return invalid(format!("`{field}.input` must be a JSON object"));
                }
                check_tool_name(&call.name, &format!("{field}.name"))?;
                if call.id.is_empty() {
                    return invalid(format!("`{field}.id` is empty"));
                }
                Block::ToolUse(ToolCall {
                    id: call.id,
                    name: call.name,
                    input: call.input,
                })
            }
            ContentBlock::ToolResult(result) => {
                if !self.accepts.tools {
                    return Err(self.refuse("tool_result", field));
                }
                if !nested_results {
                    return invalid(format!(
                        "`{field}`: a tool result cannot hold a `tool_result`"
                    ));
                }
                let content = match result.content {
                    MessageContent::Text(text) => vec![Block::Text(text)],
                    MessageContent::Blocks(blocks) => blocks
                        .into_iter()
                        .enumerate()
                        .map(|(index, block)| {
                            let field = format!("{field}.content[{index}]");
                            match block {
                                ContentBlock::Text(_)
                                | ContentBlock::Image(_)
                                | ContentBlock::Document(_) => self.block(block, &field, false),
                                other => invalid(format!(
                                    "`{field}` is a `{}` block; a tool result holds `text`, `image` and `document` blocks",
                                    other.type_name()
                                )),
                            }
                        })
                        .collect::<Result<_>>()?,
                };
                Block::ToolResult(ToolResult {
                    tool_use_id: result.tool_use_id,
                    content,
                    is_error: result.is_error.unwrap_or(false),
                })
            }
            ContentBlock::Reasoning(reasoning) => {
                if !self.accepts.reasoning {
                    return Err(self.refuse("reasoning", field));
                }
                Block::Reasoning(Reasoning {
                    text: reasoning.text,
                    signature: reasoning.signature,
                })
            }
        })
    }

    fn image(&self, image: ImageBlock, field: &str) -> Result<Image> {
        let invalid = |message: String| Error::InvalidRequest(message);
        let (media_type, data) = match (image.url, image.data) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "`{field}`: give either `data` or `url`, not both"
                )));
            }
            (None, None) => {
                return Err(invalid(format!(
                    "`{field}` needs `data` (base64) or a `data:` `url`"
                )));
            }
            (Some(url), None) => {
                let parsed = data_url::DataUrl::process(&url).map_err(|_| {
                    invalid(format!(
                        "`{field}.url` must be a `data:` URL (`data:image/png;base64,…`); the gateway does not fetch remote images"
                    ))
                })?;
                let media_type = parsed.mime_type().to_string();
                let (data, _) = parsed
                    .decode_to_vec()
                    .map_err(|_| invalid(format!("`{field}.url` is not valid base64")))?;
                (media_type, data)
            }
            (None, Some(data)) => {
                let media_type = image.media_type.ok_or_else(|| {
                    invalid(format!("`{field}.media_type` is required with `data`"))
                })?;
                (media_type, decode_base64(&data, &format!("{field}.data"))?)
            }
        };
        let format = ImageFormat::from_media_type(&media_type).ok_or_else(|| {
            invalid(format!(
                "`{field}` has media type `{media_type}`; images must be image/png, image/jpeg, image/gif or image/webp"
            ))
        })?;
        if data.len() > self.limits.max_image_bytes {
            return Err(Error::TooLarge(format!(
                "`{field}` is {} bytes; images may be at most {} bytes",
                data.len(),
                self.limits.max_image_bytes
            )));
        }
        Ok(Image {
            format,
            data: data.into(),
        })
    }
}

fn decode_base64(data: &str, field: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|err| Error::InvalidRequest(format!("`{field}` is not valid base64 ({err})")))
}

fn check_tool_name(name: &str, field: &str) -> Result<()> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidRequest(format!(
            "`{field}` must be 1 to 64 letters, digits, `_` or `-`, got `{}`",
            name.escape_debug()
        )))
    }
}

/// Validates the request's `tools`.
pub(crate) fn check_tools(tools: Vec<ToolSpec>) -> Result<Vec<Tool>> {
    let mut seen = std::collections::HashSet::new();
    tools
        .into_iter()
        .enumerate()
        .map(|(index, tool)| {
            check_tool_name(&tool.name, &format!("tools[{index}].name"))?;
            if !seen.insert(tool.name.clone()) {
                return Err(Error::InvalidRequest(format!(
                    "`tools[{index}].name`: tool `{}` is defined twice",
                    tool.name
                )));
            }
            if !tool.input_schema.is_object() {
                return Err(Error::InvalidRequest(format!(
                    "`tools[{index}].input_schema` must be a JSON Schema object"
                )));
            }
            Ok(Tool {
                name: tool.name,
                description: tool.description.filter(|d| !d.is_empty()),
                input_schema: tool.input_schema,
            })
        })
        .collect()
}
