//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), so that
//! the Anthropic SDKs and Claude Code work with only their base URL changed. A transport like
//! `/invoke` and `/stream`: the body becomes a [`GenerateRequest`] for the same gateway, and
//! the chunks of the answer become Anthropic's message or its events.

mod events;
mod wire;

use std::{sync::Arc, time::Instant};

use futures_util::{StreamExt, stream};
use poem::{IntoResponse, Request, Response, web::Data};
use poem_openapi::{
    ApiResponse, Enum, Object, OpenApi,
    param::Header,
    payload::{Json, Payload},
    registry::{MetaMediaType, MetaResponse, MetaResponses, Registry},
    types::{ToJSON, Type},
};
use strum::IntoEnumIterator;

use self::{
    events::{Blocks, MessageEvent},
    wire::{
        AnswerContent, AnswerMessage, Conversation, CountTokensRequest, MessagesRequest,
        TokenCount, stop_sequence,
    },
};
use super::{
    AppState, api::note_model, connection::ClientGone, json_body::JsonBody, sse::EventStream,
};
use crate::{
    auth::Caller, error::Error, generation::Transport, provider::collect, request::GenerateRequest,
    telemetry::RequestNote,
};

pub struct AnthropicApi;

#[OpenApi]
impl AnthropicApi {
    /// Create a message (Anthropic Messages API)
    ///
    /// Anthropic's `POST /v1/messages` over the registry's models: the whole message, or
    /// with `"stream": true` its Server-Sent Events (`message_start`, `ping`,
    /// `content_block_start` / `content_block_delta` / `content_block_stop` per block,
    /// `message_delta` with the stop reason and the usage, `message_stop`; `error` if the
    /// answer fails after the stream began). The key goes in `x-api-key` (or
    /// `Authorization: Bearer`). Errors are `{"type": "error", "error": {"type", "message"}}`.
    #[oai(
        path = "/v1/messages",
        method = "post",
        operation_id = "anthropicMessages"
    )]
    #[allow(clippy::too_many_arguments)]
    async fn messages(
        &self,
        Data(state): Data<&Arc<AppState>>,
        Data(caller): Data<&Caller>,
        http: &Request,
        /// Accepted, whatever the version.
        #[oai(name = "anthropic-version")]
        _version: Header<Option<String>>,
        /// Accepted and ignored.
        #[oai(name = "anthropic-beta")]
        _beta: Header<Option<String>>,
        body: JsonBody<MessagesRequest>,
    ) -> Result<MessagesResponse, AnthropicError> {
        let body = body.0;
        let streaming = body.stream.unwrap_or(false);
        let model = body.model.clone();
        let stop = body.stop_sequences.clone().unwrap_or_default();
        let request = body.into_generate(takes_additional_fields(state, &model))?;
        note_model(state, http, &request);
        let client_gone = ClientGone::of(http);
        let generation = state
            .gateway
            .stream(request, caller, Transport::Anthropic, &client_gone)
            .await?;
        let upstream_wait = generation.upstream_wait;
        if streaming {
            if let Some(note) = RequestNote::of(http) {
                note.upstream(upstream_wait);
            }
            let mut blocks = Blocks::new(stop);
            let events = stream::iter(Blocks::start(AnswerMessage::empty(model)))
                .chain(generation.flat_map(move |item| stream::iter(blocks.events(item))));
            return Ok(MessagesResponse::Stream(EventStream::new(
                events,
                state.gateway.settings.sse_keep_alive,
            )));
        }
        let collecting = Instant::now();
        let completion = collect(generation.boxed()).await;
        if client_gone.is_cancelled() {
            return Err(Error::ClientClosed.into());
        }
        if let Some(note) = RequestNote::of(http) {
            note.upstream(upstream_wait + collecting.elapsed());
        }
        let completion = completion?;
        let finish = completion.finish;
        Ok(MessagesResponse::Message(Json(AnswerMessage {
            content: completion
                .content
                .into_iter()
                .map(AnswerContent::from)
                .collect(),
            stop_reason: Some(finish.stop_reason.into()),
            stop_sequence: stop_sequence(finish.stop_reason, &stop),
            usage: finish.usage.into(),
            ..AnswerMessage::empty(model)
        })))
    }

    /// Count a message's input tokens (Anthropic Messages API)
    ///
    /// How many input tokens a `/v1/messages` request with these `messages`, `system` and
    /// `tools` would use: local models count with their own tokenizer (the whole prompt, chat
    /// template included); Bedrock Claude models through Bedrock's CountTokens. Other models
    /// cannot count: 400 says so.
    #[oai(
        path = "/v1/messages/count_tokens",
        method = "post",
        operation_id = "anthropicCountTokens"
    )]
    async fn count_tokens(
        &self,
        Data(state): Data<&Arc<AppState>>,
        http: &Request,
        /// Accepted, whatever the version.
        #[oai(name = "anthropic-version")]
        _version: Header<Option<String>>,
        /// Accepted and ignored.
        #[oai(name = "anthropic-beta")]
        _beta: Header<Option<String>>,
        body: JsonBody<CountTokensRequest>,
    ) -> Result<Json<TokenCount>, AnthropicError> {
        let conversation = Conversation::from(body.0);
        let allowed = takes_additional_fields(state, &conversation.model);
        let request: GenerateRequest = conversation.into_generate(allowed)?;
        note_model(state, http, &request);
        let (model, request) = state.gateway.registry.prepare(request)?;
        // The SDK's client has no read timeout: a silent upstream is the model's to bound.
        let timeout = model.spec.upstream.first_token_timeout;
        let input_tokens = tokio::time::timeout(timeout, model.count_tokens(request))
            .await
            .map_err(|_| {
                Error::UpstreamTimeout(format!(
                    "model `{}` did not count the tokens within {timeout:?} (first token timeout)",
                    model.spec.name
                ))
            })??;
        Ok(Json(TokenCount { input_tokens }))
    }
}

/// Whether `model` takes per-request additional fields; an unknown model is left for the
/// gateway to refuse with 404.
fn takes_additional_fields(state: &AppState, model: &str) -> bool {
    match state.gateway.registry.get(model) {
        Ok(model) => model.spec.limits.accepts.additional_fields,
        Err(_) => true,
    }
}

/// The whole message, or its events.
pub enum MessagesResponse {
    Message(Json<AnswerMessage>),
    Stream(EventStream<MessageEvent>),
}

impl ApiResponse for MessagesResponse {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "The message (`stream` false or absent), or its events (`stream` true)",
                status: Some(200),
                status_range: None,
                content: vec![
                    MetaMediaType {
                        content_type: "application/json; charset=utf-8",
                        schema: AnswerMessage::schema_ref(),
                    },
                    MetaMediaType {
                        content_type: <EventStream<MessageEvent> as Payload>::CONTENT_TYPE,
                        schema: <EventStream<MessageEvent> as Payload>::schema_ref(),
                    },
                ],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        AnswerMessage::register(registry);
        MessageEvent::register(registry);
    }
}

impl IntoResponse for MessagesResponse {
    fn into_response(self) -> Response {
        match self {
            MessagesResponse::Message(message) => message.into_response(),
            MessagesResponse::Stream(events) => events.into_response(),
        }
    }
}

/// `error`: the `type` of an error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename = "AnthropicErrorBodyType", rename_all = "lowercase")]
pub enum ErrorBodyType {
    Error,
}

/// `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicError")]
pub struct ErrorBody {
    #[oai(rename = "type")]
    pub kind: ErrorBodyType,
    pub error: ErrorInfo,
}

#[derive(Debug, Clone, Object)]
#[oai(rename = "AnthropicErrorInfo")]
pub struct ErrorInfo {
    /// `invalid_request_error`, `authentication_error`, `permission_error`,
    /// `not_found_error`, `request_too_large`, `rate_limit_error`, `timeout_error`,
    /// `api_error` or `overloaded_error`.
    #[oai(rename = "type")]
    pub kind: String,
    pub message: String,
}

/// Anthropic's error `type` for each of the gateway's errors. The status stays the
/// gateway's own, which the SDKs map to their classes: 400 `BadRequestError`, 401
/// `AuthenticationError`, 403 `PermissionDeniedError`, 404 `NotFoundError`, 413
/// `RequestTooLargeError`, 429 `RateLimitError`, 502 `InternalServerError`, 503
/// `ServiceUnavailableError`, 504 `GatewayTimeoutError` (both `InternalServerError`s too).
fn error_type(err: &Error) -> &'static str {
    match err {
        Error::InvalidRequest(_) | Error::MethodNotAllowed(_) | Error::UnsupportedMediaType(_) => {
            "invalid_request_error"
        }
        Error::UnknownModel(_) | Error::NotFound(_) | Error::UnknownStream(_) => "not_found_error",
        // The Anthropic routes do not resume streams; Anthropic has no word for a 410.
        Error::ResumeExpired(_) => "invalid_request_error",
        Error::TooLarge(_) => "request_too_large",
        Error::RequestTimeout(_) | Error::UpstreamTimeout(_) => "timeout_error",
        Error::Unauthorized(_) => "authentication_error",
        Error::Forbidden(_) => "permission_error",
        Error::Throttled(_) | Error::RateLimited { .. } | Error::BudgetExhausted { .. } => {
            "rate_limit_error"
        }
        Error::Upstream(_) | Error::ClientClosed | Error::Cancelled => "api_error",
        Error::UpstreamUnavailable(_)
        | Error::LimitsUnavailable(_)
        | Error::ShuttingDown
        | Error::ModelLoading(_)
        | Error::Overloaded(_) => "overloaded_error",
    }
}

fn error_info(err: &Error) -> ErrorInfo {
    ErrorInfo {
        kind: error_type(err).to_owned(),
        message: err.to_string(),
    }
}

/// Every error of the Anthropic routes, in Anthropic's shape, with `Retry-After` where the
/// gateway's own error has it.
pub fn error_response(err: &Error) -> Response {
    let body = ErrorBody {
        kind: ErrorBodyType::Error,
        error: error_info(err),
    };
    let mut response = Response::builder()
        .status(err.status())
        .content_type("application/json; charset=utf-8")
        .body(body.to_json_string());
    if let Some(secs) = err.retry_after() {
        response
            .headers_mut()
            .insert("Retry-After", poem::http::HeaderValue::from(secs));
    }
    response
}

/// An error of an Anthropic operation: the gateway's [`Error`], documented in the OpenAPI
/// document in Anthropic's shape (the route's error renderer, [`error_response`], writes it).
pub struct AnthropicError(Error);

impl From<Error> for AnthropicError {
    /// The gateway's validation names its own fields and blocks; the client sent Anthropic's.
    fn from(err: Error) -> Self {
        AnthropicError(match err {
            Error::InvalidRequest(message) => Error::InvalidRequest(
                message
                    .replace("`stop`", "`stop_sequences`")
                    .replace("`stop[", "`stop_sequences[")
                    .replace("`reasoning` block", "`thinking` block"),
            ),
            other => other,
        })
    }
}

impl From<AnthropicError> for poem::Error {
    fn from(err: AnthropicError) -> Self {
        err.0.into()
    }
}

impl ApiResponse for AnthropicError {
    /// The gateway's error responses (statuses, `Retry-After`), in Anthropic's shape, each
    /// described by the error types it carries.
    fn meta() -> MetaResponses {
        static TYPES: std::sync::OnceLock<Vec<(u16, String)>> = std::sync::OnceLock::new();
        let types = TYPES.get_or_init(|| {
            let mut types: Vec<(u16, String)> = Vec::new();
            for err in Error::iter() {
                let (status, kind) = (err.status().as_u16(), format!("`{}`", error_type(&err)));
                match types.iter_mut().find(|(known, _)| *known == status) {
                    Some((_, kinds)) if !kinds.contains(&kind) => {
                        kinds.push_str(", ");
                        kinds.push_str(&kind);
                    }
                    Some(_) => {}
                    None => types.push((status, kind)),
                }
            }
            types
        });
        let mut meta = Error::meta();
        for response in &mut meta.responses {
            if let Some((_, kinds)) = types
                .iter()
                .find(|(status, _)| Some(*status) == response.status)
            {
                response.description = kinds;
            }
            response.content = vec![MetaMediaType {
                content_type: "application/json; charset=utf-8",
                schema: ErrorBody::schema_ref(),
            }];
        }
        meta
    }

    fn register(registry: &mut Registry) {
        ErrorBody::register(registry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_anthropics_shape_status_and_retry_after() {
        let response = error_response(&Error::RateLimited {
            message: "slow down".into(),
            retry_after_secs: 7,
        });
        assert_eq!(response.status().as_u16(), 429);
        assert_eq!(response.headers()["Retry-After"], "7");
        let response = error_response(&Error::UnknownModel("x".into()));
        assert_eq!(response.status().as_u16(), 404);
    }

    #[test]
    fn validation_messages_name_anthropics_fields() {
        let renamed = |message: &str| {
            AnthropicError::from(Error::InvalidRequest(message.into()))
                .0
                .to_string()
        };
        assert_eq!(
            renamed("`stop[2]` has 300 characters"),
            "`stop_sequences[2]` has 300 characters"
        );
        assert_eq!(
            renamed("`stop` sequences must not be empty"),
            "`stop_sequences` sequences must not be empty"
        );
        assert_eq!(
            renamed("model `m` cannot take `reasoning` blocks (`messages[1].content[0]`)"),
            "model `m` cannot take `thinking` blocks (`messages[1].content[0]`)"
        );
    }
}
