//! The HTTP API described by the OpenAPI document: `/invoke`, `/stream`, `/models`, `/healthz`.

use std::{sync::Arc, time::Duration};

use futures_util::{StreamExt, stream::BoxStream};
use poem_openapi::{
    Object, OpenApi,
    param::Query,
    payload::{EventStream, Json},
};

use poem::web::Data;

use super::{AppState, events::StreamEvent};
use crate::{
    error::Error,
    provider::{StopReason, Usage},
    registry::{ModelInfo, Registry},
    request::GenerateRequest,
};

/// How often an SSE stream sends a comment while the model is silent, so that proxies and
/// load balancers do not close it as idle.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

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
    /// `ok` while the gateway serves requests.
    pub status: String,
}

type Events = EventStream<BoxStream<'static, StreamEvent>>;

#[OpenApi]
impl Api {
    /// Generate a whole answer
    ///
    /// Sends the prompt or conversation to the model and answers once it has finished.
    #[oai(path = "/invoke", method = "post", operation_id = "invoke")]
    async fn invoke(
        &self,
        Data(state): Data<&Arc<AppState>>,
        request: Json<GenerateRequest>,
    ) -> Result<Json<InvokeResponse>, Error> {
        let (model, request) = state.registry.prepare(request.0)?;
        let completion = model.complete(request).await?;
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
    async fn stream_get(
        &self,
        Data(state): Data<&Arc<AppState>>,
        /// Name of a model in the registry.
        model: Query<String>,
        /// The user's message.
        prompt: Query<String>,
        /// Most tokens to generate.
        max_tokens: Query<Option<u32>>,
        /// Sampling temperature, 0 to 1.
        temperature: Query<Option<f64>>,
        /// Nucleus sampling mass, 0 to 1.
        top_p: Query<Option<f64>>,
    ) -> Result<Events, Error> {
        stream(
            &state.registry,
            GenerateRequest {
                max_tokens: max_tokens.0,
                temperature: temperature.0,
                top_p: top_p.0,
                ..GenerateRequest::prompt(model.0, prompt.0)
            },
        )
        .await
    }

    /// Stream an answer (JSON body)
    ///
    /// The same request body as `/invoke`, answered as Server-Sent Events like `GET /stream`.
    #[oai(path = "/stream", method = "post", operation_id = "streamPost")]
    async fn stream_post(
        &self,
        Data(state): Data<&Arc<AppState>>,
        request: Json<GenerateRequest>,
    ) -> Result<Events, Error> {
        stream(&state.registry, request.0).await
    }

    /// List the models
    #[oai(path = "/models", method = "get", operation_id = "listModels")]
    async fn models(&self, Data(state): Data<&Arc<AppState>>) -> Json<ModelList> {
        Json(ModelList {
            models: state.registry.models().map(|model| model.info()).collect(),
        })
    }

    /// Liveness
    #[oai(path = "/healthz", method = "get", operation_id = "health")]
    async fn healthz(&self) -> Json<Health> {
        Json(Health {
            status: "ok".into(),
        })
    }
}

/// Both `/stream` operations: validate, start, and answer with the events.
async fn stream(registry: &Registry, request: GenerateRequest) -> Result<Events, Error> {
    let (model, request) = registry.prepare(request)?;
    let chunks = model.stream(request).await?;
    Ok(EventStream::new(chunks.map(StreamEvent::from).boxed())
        .keep_alive(KEEP_ALIVE)
        .to_event(StreamEvent::into_sse))
}
