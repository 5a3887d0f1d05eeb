//! The HTTP API described by the OpenAPI document: `/invoke`, `/stream`, `/models`, `/healthz`.

use std::{sync::Arc, time::Instant};

use futures_util::StreamExt;
use poem::{Request, web::Data};
use poem_openapi::{ApiResponse, Object, OpenApi, Union, param::Query, payload::Json};

use super::{
    AppState, connection::ClientGone, events::StreamEvent, json_body::JsonBody, sse::EventStream,
};
use crate::{
    auth::Caller,
    content::{ReasoningBlock, TextBlock, ToolUseBlock},
    error::Error,
    generation::{Generation, Transport},
    provider::{AnswerBlock, StopReason, Usage, collect},
    registry::ModelInfo,
    request::GenerateRequest,
    resume::{EventId, Resumed},
    telemetry::RequestNote,
};

pub struct Api;

/// A whole answer.
#[derive(Debug, Object)]
pub struct InvokeResponse {
    pub model: String,
    /// All the text of the answer.
    pub text: String,
    /// Text, reasoning and tool calls, in the order the model wrote them.
    pub content: Vec<AnswerContent>,
    pub stop_reason: StopReason,
    pub usage: Usage,
}

/// One block of a whole answer.
#[derive(Debug, Union)]
#[oai(discriminator_name = "type")]
pub enum AnswerContent {
    #[oai(mapping = "text")]
    Text(TextBlock),
    #[oai(mapping = "tool_use")]
    ToolUse(ToolUseBlock),
    #[oai(mapping = "reasoning")]
    Reasoning(ReasoningBlock),
}

impl From<AnswerBlock> for AnswerContent {
    fn from(block: AnswerBlock) -> Self {
        match block {
            AnswerBlock::Text(text) => AnswerContent::Text(TextBlock { text }),
            AnswerBlock::ToolCall(call) => AnswerContent::ToolUse(call.into()),
            AnswerBlock::Reasoning(piece) => AnswerContent::Reasoning(ReasoningBlock {
                text: piece.text,
                signature: piece.signature,
            }),
        }
    }
}

#[derive(Debug, Object)]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Object)]
pub struct Health {
    /// `ok` while the gateway serves requests; `draining` once it is shutting down.
    pub status: String,
    /// With `[cluster] redis_url`: `ok`, or `unreachable` (requests then follow
    /// `on_redis_error`; the status stays `ok`).
    #[oai(skip_serializing_if_is_none)]
    pub redis: Option<String>,
}

#[derive(ApiResponse)]
pub enum HealthResponse {
    /// Serving.
    #[oai(status = 200)]
    Ok(Json<Health>),
    /// Shutting down: load balancers should stop sending requests here.
    #[oai(status = 503)]
    Draining(Json<Health>),
}

#[OpenApi]
impl Api {
    /// Generate a whole answer
    ///
    /// Sends the prompt or conversation to the model and answers once it has finished.
    #[oai(path = "/invoke", method = "post", operation_id = "invoke")]
    async fn invoke(
        &self,
        Data(state): Data<&Arc<AppState>>,
        Data(caller): Data<&Caller>,
        http: &Request,
        request: JsonBody<GenerateRequest>,
    ) -> Result<Json<InvokeResponse>, Error> {
        note_model(state, http, &request.0);
        let model = request.0.model.clone();
        let client_gone = ClientGone::of(http);
        // The whole answer is the stream collected: the same admission, timeouts and
        // accounting as `/stream`.
        let generation = state
            .gateway
            .stream(request.0, caller, Transport::Invoke, &client_gone)
            .await?;
        let upstream_wait = generation.upstream_wait;
        let collecting = Instant::now();
        let completion = collect(generation.boxed()).await;
        if client_gone.is_cancelled() {
            return Err(Error::ClientClosed);
        }
        if let Some(note) = RequestNote::of(http) {
            note.upstream(upstream_wait + collecting.elapsed());
        }
        let completion = completion?;
        Ok(Json(InvokeResponse {
            model,
            text: completion.text,
            content: completion
                .content
                .into_iter()
                .map(AnswerContent::from)
                .collect(),
            stop_reason: completion.finish.stop_reason,
            usage: completion.finish.usage,
        }))
    }

    /// Stream an answer (query parameters)
    ///
    /// Server-Sent Events, for `EventSource`: `chunk` events as the model writes, then one
    /// `done` event, or one `error` event if the model fails after the stream began.
    /// Every event has an `id:`; with `resume_window` on, a request carrying
    /// `Last-Event-ID` (as `EventSource` sends on its own when it reconnects) gets the
    /// events after that one and the rest instead of a new answer.
    #[oai(path = "/stream", method = "get", operation_id = "streamGet")]
    #[allow(clippy::too_many_arguments)]
    async fn stream_get(
        &self,
        Data(state): Data<&Arc<AppState>>,
        Data(caller): Data<&Caller>,
        http: &Request,
        /// Name of a model in the registry.
        model: Query<String>,
        /// The user's message.
        prompt: Query<String>,
        /// Most tokens to generate.
        #[oai(validator(minimum(value = "1")))]
        max_tokens: Query<Option<u32>>,
        /// Sampling temperature, 0 to 1.
        #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
        temperature: Query<Option<f64>>,
        /// Nucleus sampling mass, 0 to 1.
        #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
        top_p: Query<Option<f64>>,
    ) -> Result<EventStream, Error> {
        check_query(http.uri().query().unwrap_or_default())?;
        let request = GenerateRequest {
            max_tokens: max_tokens.0,
            temperature: temperature.0,
            top_p: top_p.0,
            ..GenerateRequest::prompt(model.0, prompt.0)
        };
        stream(state, caller, http, request).await
    }

    /// Stream an answer (JSON body)
    ///
    /// The same request body as `/invoke`, answered as Server-Sent Events like `GET /stream`.
    #[oai(path = "/stream", method = "post", operation_id = "streamPost")]
    async fn stream_post(
        &self,
        Data(state): Data<&Arc<AppState>>,
        Data(caller): Data<&Caller>,
        http: &Request,
        request: JsonBody<GenerateRequest>,
    ) -> Result<EventStream, Error> {
        stream(state, caller, http, request.0).await
    }

    /// List the models
    #[oai(path = "/models", method = "get", operation_id = "listModels")]
    async fn models(&self, Data(state): Data<&Arc<AppState>>) -> Json<ModelList> {
        Json(ModelList {
            models: state
                .gateway
                .registry
                .models()
                .map(|model| model.info())
                .collect(),
        })
    }

    /// Liveness and readiness
    #[oai(path = "/healthz", method = "get", operation_id = "health")]
    async fn healthz(&self, Data(state): Data<&Arc<AppState>>) -> HealthResponse {
        let redis = state
            .gateway
            .cluster
            .redis_state()
            .map(|redis| redis.as_str().to_owned());
        if state.gateway.shutdown.draining.is_cancelled() {
            HealthResponse::Draining(Json(Health {
                status: "draining".into(),
                redis,
            }))
        } else {
            HealthResponse::Ok(Json(Health {
                status: "ok".into(),
                redis,
            }))
        }
    }
}

/// Both `/stream` operations: start (or resume, given `Last-Event-ID`), and answer with the
/// events.
async fn stream(
    state: &AppState,
    caller: &Caller,
    http: &Request,
    request: GenerateRequest,
) -> Result<EventStream, Error> {
    note_model(state, http, &request);
    let gateway = &state.gateway;
    let keep_alive = gateway.settings.sse_keep_alive;
    let slow_client_timeout = gateway.settings.slow_client_timeout;
    let client_gone = ClientGone::of(http);
    if let Some(last) = last_event_id(http)? {
        return Ok(match gateway.resume.resume(caller.id(), &last).await? {
            Resumed::Events(listening) => {
                EventStream::recorded(listening, client_gone, keep_alive, slow_client_timeout)
            }
            Resumed::Finished => EventStream::finished(),
        });
    }
    if !gateway.resume.enabled() {
        let generation = gateway
            .stream(request, caller, Transport::Sse, &client_gone)
            .await?;
        note_upstream(http, &generation);
        return Ok(EventStream::numbered(
            generation.filter_map(|item| std::future::ready(StreamEvent::of(item))),
            keep_alive,
        ));
    }
    let generation = gateway
        .stream_outliving_client(request, caller, Transport::Sse, &client_gone)
        .await?;
    note_upstream(http, &generation);
    let listening = gateway
        .resume
        .record(caller.id(), generation, StreamEvent::serialize);
    Ok(EventStream::recorded(
        listening,
        client_gone,
        keep_alive,
        slow_client_timeout,
    ))
}

/// The event a reconnecting client had last, from `Last-Event-ID`; an empty one is none.
fn last_event_id(http: &Request) -> Result<Option<EventId>, Error> {
    let Some(value) = http.headers().get("last-event-id") else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        Error::InvalidRequest("`Last-Event-ID` is not an event id of this gateway".into())
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    EventId::parse(text).map(Some)
}

fn note_upstream(http: &Request, generation: &Generation) {
    if let Some(note) = RequestNote::of(http) {
        note.upstream(generation.upstream_wait);
    }
}

/// The parameters `GET /stream` takes; `api_key` is read by the key check.
const STREAM_PARAMETERS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "api_key",
];

/// Refuses what the lenient query parser would let through, as the JSON body refuses
/// unknown fields: unknown or repeated parameters, and `%`-escapes that are malformed or
/// do not decode to UTF-8.
fn check_query(query: &str) -> Result<(), Error> {
    let mut seen: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode_component(name)?;
        decode_component(value)?;
        if !STREAM_PARAMETERS.contains(&name.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "unknown query parameter `{}`, expected one of {}",
                name.escape_debug(),
                STREAM_PARAMETERS.join(", ")
            )));
        }
        if seen.contains(&name) {
            return Err(Error::InvalidRequest(format!(
                "the query parameter `{name}` is given more than once"
            )));
        }
        seen.push(name);
    }
    Ok(())
}

/// One `application/x-www-form-urlencoded` component, decoded strictly.
fn decode_component(component: &str) -> Result<String, Error> {
    let bytes = component.as_bytes();
    let malformed = bytes.iter().enumerate().any(|(at, byte)| {
        *byte == b'%'
            && !bytes
                .get(at + 1..at + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if malformed {
        return Err(Error::InvalidRequest(
            "the query string has a malformed `%` escape (write `%25` for a literal `%`)".into(),
        ));
    }
    let spaced = component.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|text| text.into_owned())
        .map_err(|_| {
            Error::InvalidRequest("the query string's `%` escapes do not decode to UTF-8".into())
        })
}

/// Tells the access log and the metrics which model a request is for.
pub(super) fn note_model(state: &AppState, http: &Request, request: &GenerateRequest) {
    if let Some(note) = RequestNote::of(http) {
        let known = state.gateway.registry.get(&request.model).is_ok();
        note.model(&request.model, known);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_query_refuses_unknown_repeated_and_malformed_parameters() {
        assert!(check_query("model=llama3&prompt=caf%C3%A9+au+lait&api_key=k").is_ok());
        assert!(check_query("").is_ok());
        for bad in [
            "model=a&promt=b",
            "model=a&model=b",
            "model=a&prompt=%zz",
            "model=a&prompt=%C3",
            "model=a&prompt=50%",
            "model=a&pr%6Fmpt=%FF",
        ] {
            assert_eq!(
                check_query(bad).unwrap_err().code(),
                "invalid_request",
                "{bad}"
            );
        }
    }
}
