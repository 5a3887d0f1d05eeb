//! OpenAI's API: `POST /v1/chat/completions` (whole or streamed) and `GET /v1/models`, for
//! the clients that speak it. A transport like `/invoke` and `/stream`: the request becomes
//! the gateway's own and goes through the same gateway; the chunks come back in OpenAI's
//! shapes.

mod error;
mod stream;
mod translate;
mod types;

use std::{
    sync::{Arc, LazyLock},
    time::{Instant, SystemTime},
};

use poem::{IntoResponse, Request, Response, web::Data};
use poem_openapi::{
    ApiResponse, OpenApi,
    param::Path,
    payload::{Json, Payload},
    registry::{MetaMediaType, MetaResponse, MetaResponses, Registry},
};

pub use self::error::error_response;
use self::{
    error::OpenAiError,
    stream::{ChunkHead, StreamLine},
    types::{
        AnswerMessage, AssistantRole, ChatCompletion, ChatCompletionRequest, Choice,
        CompletionObject, CompletionUsage, FinishReason, FunctionCall, FunctionType, ListObject,
        ModelList, ModelObject, ModelObjectKind, PromptTokensDetails, ToolCall,
    },
};
use super::{
    AppState, api::note_model, connection::ClientGone, json_body::JsonBody, sse::EventStream,
};
use crate::{
    auth::Caller,
    error::Error,
    generation::Transport,
    provider::{AnswerBlock, StopReason, Usage, collect},
    registry::Model,
    telemetry::RequestNote,
};

pub struct OpenAiApi;

/// The `created` of every model: the registry has no creation dates.
static MODELS_CREATED: LazyLock<u64> = LazyLock::new(unix_seconds);

#[OpenApi]
impl OpenAiApi {
    /// Create a chat completion (OpenAI-compatible)
    ///
    /// OpenAI's chat-completions API over the registry's models, for OpenAI's SDKs and the
    /// tools built on them (`base_url` = this gateway + `/v1`, `api_key` = a gateway key).
    /// With `stream: true` the answer is Server-Sent Events: `data: {chat.completion.chunk}`
    /// lines, then `data: [DONE]`; an error after the stream began is one `data: {"error"}`
    /// line, and the stream ends. Refused with 400 naming the parameter: `n` other than 1,
    /// `logprobs`, `top_logprobs`, `response_format` other than `text`, `audio`,
    /// `modalities` other than text, `prediction`, `seed`, `logit_bias`, non-zero
    /// `presence_penalty` / `frequency_penalty`, `parallel_tool_calls: false`,
    /// `reasoning_effort`, `web_search_options`, `functions`, `function_call`,
    /// `store: true`, a `service_tier` other than `auto` / `default`, `temperature` above 1
    /// and remote image URLs. Other unknown fields are ignored.
    #[oai(
        path = "/v1/chat/completions",
        method = "post",
        operation_id = "createChatCompletion"
    )]
    async fn chat_completions(
        &self,
        Data(state): Data<&Arc<AppState>>,
        Data(caller): Data<&Caller>,
        http: &Request,
        request: JsonBody<ChatCompletionRequest>,
    ) -> Result<ChatAnswer, OpenAiError> {
        let mut translated = translate::translate(request.0)?;
        note_model(state, http, &translated.request);
        let model = translated.request.model.clone();
        let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
        let created = unix_seconds();
        let client_gone = ClientGone::of(http);
        let transport = if translated.stream {
            Transport::Sse
        } else {
            Transport::Invoke
        };
        let generation = state
            .gateway
            .stream(
                std::mem::take(&mut translated.request),
                caller,
                transport,
                &client_gone,
            )
            .await
            .map_err(|err| translated.rename(err))?;
        let note = RequestNote::of(http);
        if translated.stream {
            if let Some(note) = note {
                note.upstream(generation.upstream_wait);
            }
            let head = ChunkHead::new(&id, created, &model, translated.include_usage);
            return Ok(ChatAnswer::Stream(EventStream::new(
                stream::lines(generation, head, translated.include_usage),
                state.gateway.settings.sse_keep_alive,
            )));
        }
        let upstream_wait = generation.upstream_wait;
        let collecting = Instant::now();
        let completion = collect(generation).await;
        if client_gone.is_cancelled() {
            return Err(Error::ClientClosed.into());
        }
        if let Some(note) = note {
            note.upstream(upstream_wait + collecting.elapsed());
        }
        let completion = completion?;
        let mut tool_calls = Vec::new();
        let mut reasoning: Option<String> = None;
        for block in completion.content {
            match block {
                AnswerBlock::ToolCall(call) => tool_calls.push(ToolCall {
                    id: call.id,
                    kind: FunctionType::Function,
                    function: FunctionCall {
                        name: call.name,
                        arguments: call.input.to_string(),
                    },
                }),
                AnswerBlock::Reasoning(piece) => {
                    reasoning.get_or_insert_default().push_str(&piece.text)
                }
                AnswerBlock::Text(_) => {}
            }
        }
        let text = completion.text;
        Ok(ChatAnswer::Whole(Json(ChatCompletion {
            id,
            object: CompletionObject::ChatCompletion,
            created,
            model,
            choices: vec![Choice {
                index: 0,
                message: AnswerMessage {
                    role: AssistantRole::Assistant,
                    content: (!text.is_empty() || tool_calls.is_empty()).then_some(text),
                    refusal: None,
                    tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                    reasoning_content: reasoning,
                },
                finish_reason: finish_reason(completion.finish.stop_reason),
            }],
            usage: usage(completion.finish.usage),
        })))
    }

    /// List the models (OpenAI-compatible)
    #[oai(path = "/v1/models", method = "get", operation_id = "openaiListModels")]
    async fn models(&self, Data(state): Data<&Arc<AppState>>) -> Json<ModelList> {
        Json(ModelList {
            object: ListObject::List,
            data: state.gateway.registry.models().map(model_object).collect(),
        })
    }

    /// Describe a model (OpenAI-compatible)
    #[oai(
        path = "/v1/models/:model",
        method = "get",
        operation_id = "openaiRetrieveModel"
    )]
    async fn model(
        &self,
        Data(state): Data<&Arc<AppState>>,
        /// A model's name in the registry.
        model: Path<String>,
    ) -> Result<Json<ModelObject>, OpenAiError> {
        Ok(Json(model_object(state.gateway.registry.get(&model.0)?)))
    }
}

fn model_object(model: &Arc<Model>) -> ModelObject {
    ModelObject {
        id: model.spec.name.clone(),
        object: ModelObjectKind::Model,
        created: *MODELS_CREATED,
        owned_by: model.spec.provider.kind().into(),
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn finish_reason(stop_reason: StopReason) -> FinishReason {
    match stop_reason {
        StopReason::EndTurn | StopReason::StopSequence => FinishReason::Stop,
        StopReason::MaxTokens => FinishReason::Length,
        StopReason::ToolUse => FinishReason::ToolCalls,
        StopReason::ContentFiltered => FinishReason::ContentFilter,
    }
}

/// OpenAI counts cached tokens in the prompt's; Bedrock counts them apart.
fn usage(usage: Usage) -> CompletionUsage {
    let cached = usage.cache_read_input_tokens.unwrap_or(0);
    // The upstream's counts: their sums saturate rather than overflow.
    let prompt = usage
        .input_tokens
        .saturating_add(cached)
        .saturating_add(usage.cache_write_input_tokens.unwrap_or(0));
    CompletionUsage {
        prompt_tokens: prompt,
        completion_tokens: usage.output_tokens,
        total_tokens: prompt.saturating_add(usage.output_tokens),
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: cached,
        },
    }
}

/// A whole `chat.completion`, or with `stream: true` its chunks as Server-Sent Events.
pub enum ChatAnswer {
    Whole(Json<ChatCompletion>),
    Stream(EventStream<StreamLine>),
}

impl ApiResponse for ChatAnswer {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "A `chat.completion`, or with `stream: true` Server-Sent Events",
                status: Some(200),
                status_range: None,
                content: vec![
                    MetaMediaType {
                        content_type: Json::<ChatCompletion>::CONTENT_TYPE,
                        schema: Json::<ChatCompletion>::schema_ref(),
                    },
                    MetaMediaType {
                        content_type: EventStream::<StreamLine>::CONTENT_TYPE,
                        schema: EventStream::<StreamLine>::schema_ref(),
                    },
                ],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        <Json<ChatCompletion> as Payload>::register(registry);
        <EventStream<StreamLine> as Payload>::register(registry);
    }
}

impl IntoResponse for ChatAnswer {
    fn into_response(self) -> Response {
        match self {
            ChatAnswer::Whole(json) => json.into_response(),
            ChatAnswer::Stream(events) => events.into_response(),
        }
    }
}
