//! The HTTP API described by the OpenAPI document: `/invoke`, `/stream`, `/models`, `/healthz`.

use std::sync::Arc;

use futures_util::StreamExt;
use poem::{Request, web::Data};
use poem_openapi::{ApiResponse, Object, OpenApi, param::Query, payload::Json};

use super::{
    AppState, connection::ClientGone, events::StreamEvent, json_body::JsonBody, sse::EventStream,
};
use crate::{
    error::Error,
    generation::Transport,
    provider::{StopReason, Usage},
    registry::ModelInfo,
    request::GenerateRequest,
    telemetry::RequestNote,
};

pub struct Api;

/// A whole answer.
#[derive(Debug, Object)]
pub struct InvokeResponse {
    pub model: String,
    pub text: String,
    pub stop_reason: StopReason,
    pub usage: Usage,
}

#[derive(Debug, Object)]
pub struct ModelList {
    pub models: Vec<ModelInfo>,
}

#[derive(Debug, Object)]
pub struct Health {
    /// `ok` while the gateway serves requests; `draining` once it is shutting down.
    pub status: String,
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
        http: &Request,
        request: JsonBody<GenerateRequest>,
    ) -> Result<Json<InvokeResponse>, Error> {
        let caller = state.gateway.auth.authenticate(http)?;
        note_model(state, http, &request.0);
        let (model, completion, waited) = state
            .gateway
            .complete(request.0, &caller, &ClientGone::of(http))
            .await?;
        if let Some(note) = RequestNote::of(http) {
            note.upstream(waited);
        }
        Ok(Json(InvokeResponse {
            model: model.spec.name.clone(),
            text: completion.text,
            stop_reason: completion.finish.stop_reason,
            usage: completion.finish.usage,
        }))
    }

    /// Stream an answer (query parameters)
    ///
    /// Server-Sent Events, for `EventSource`: `chunk` events as the model writes, then one
    /// `done` event, or one `error` event if the model fails after the stream began.
    #[oai(path = "/stream", method = "get", operation_id = "streamGet")]
    #[allow(clippy::too_many_arguments)]
    async fn stream_get(
        &self,
        Data(state): Data<&Arc<AppState>>,
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
        let request = GenerateRequest {
            max_tokens: max_tokens.0,
            temperature: temperature.0,
            top_p: top_p.0,
            ..GenerateRequest::prompt(model.0, prompt.0)
        };
        stream(state, http, request).await
    }

    /// Stream an answer (JSON body)
    ///
    /// The same request body as `/invoke`, answered as Server-Sent Events like `GET /stream`.
    #[oai(path = "/stream", method = "post", operation_id = "streamPost")]
    async fn stream_post(
        &self,
        Data(state): Data<&Arc<AppState>>,
        http: &Request,
        request: JsonBody<GenerateRequest>,
    ) -> Result<EventStream, Error> {
        stream(state, http, request.0).await
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
        if state.gateway.shutdown.draining.is_cancelled() {
            HealthResponse::Draining(Json(Health {
                status: "draining".into(),
            }))
        } else {
            HealthResponse::Ok(Json(Health {
                status: "ok".into(),
            }))
        }
    }
}

/// Both `/stream` operations: authenticate, start, and answer with the events.
async fn stream(
    state: &AppState,
    http: &Request,
    request: GenerateRequest,
) -> Result<EventStream, Error> {
    let caller = state.gateway.auth.authenticate(http)?;
    note_model(state, http, &request);
    let generation = state
        .gateway
        .stream(request, &caller, Transport::Sse, &ClientGone::of(http))
        .await?;
    if let Some(note) = RequestNote::of(http) {
        note.upstream(generation.upstream_wait);
    }
    Ok(EventStream::new(
        generation.map(StreamEvent::from),
        state.gateway.settings.sse_keep_alive,
    ))
}

/// Tells the metrics which model a request is for — only names the registry knows, so that
/// clients cannot grow the metrics without bound.
fn note_model(state: &AppState, http: &Request, request: &GenerateRequest) {
    if let Some(note) = RequestNote::of(http)
        && state.gateway.registry.get(&request.model).is_ok()
    {
        note.model(&request.model);
    }
}
