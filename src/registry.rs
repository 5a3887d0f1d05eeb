//! The one model registry shared by every transport: model name → provider.

use std::{collections::HashMap, sync::Arc};

use poem_openapi::{Enum, Object};
use tokio::sync::Semaphore;

use crate::{
    config::{Config, ModelSpec, ProviderSpec},
    error::{Error, Result},
    provider::{
        ChunkStream, Completion, Provider,
        bedrock::{BedrockProvider, ClientPool},
    },
    request::{GenerateRequest, ValidRequest},
};

pub struct Registry {
    models: Vec<Arc<Model>>,
    by_name: HashMap<String, usize>,
}

pub struct Model {
    pub spec: ModelSpec,
    provider: Box<dyn Provider>,
    /// Upstream calls in flight to this model (`upstream.max_concurrent`).
    pub slots: Arc<Semaphore>,
}

/// A model as `GET /models` lists it.
#[derive(Debug, Clone, Object)]
pub struct ModelInfo {
    /// The name clients use.
    pub name: String,
    pub provider: String,
    pub model_id: String,
    /// Native body format: `llama3` or `anthropic`.
    pub format: String,
    pub state: ModelState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ModelState {
    /// Requests are served.
    Ready,
}

impl Registry {
    /// Builds every provider; the SDK clients are made here, once.
    pub async fn build(config: &Config) -> Registry {
        let mut clients = ClientPool::load().await;
        let mut models = Vec::with_capacity(config.models.len());
        for spec in &config.models {
            let provider: Box<dyn Provider> = match &spec.provider {
                ProviderSpec::Bedrock(bedrock) => Box::new(BedrockProvider::new(
                    spec.name.clone(),
                    bedrock.clone(),
                    clients.client(bedrock, &spec.upstream),
                )),
            };
            models.push(Arc::new(Model {
                spec: spec.clone(),
                provider,
                slots: Arc::new(Semaphore::new(spec.upstream.max_concurrent)),
            }));
        }
        tracing::debug!(clients = clients.len(), "Bedrock clients built");
        let by_name = models
            .iter()
            .enumerate()
            .map(|(index, model)| (model.spec.name.clone(), index))
            .collect();
        Registry { models, by_name }
    }

    pub fn get(&self, name: &str) -> Result<&Arc<Model>> {
        self.by_name
            .get(name)
            .map(|&index| &self.models[index])
            .ok_or_else(|| Error::UnknownModel(name.to_owned()))
    }

    /// Looks the model up and validates the request against its limits.
    pub fn prepare(
        &self,
        request: GenerateRequest,
        caller: &str,
    ) -> Result<(Arc<Model>, ValidRequest)> {
        let model = self.get(&request.model)?.clone();
        let valid = request.validate(&model.spec.limits, caller)?;
        Ok((model, valid))
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.iter()
    }
}

impl Model {
    pub fn info(&self) -> ModelInfo {
        let ProviderSpec::Bedrock(bedrock) = &self.spec.provider;
        ModelInfo {
            name: self.spec.name.clone(),
            provider: "bedrock".into(),
            model_id: bedrock.model_id.clone(),
            format: bedrock.format.as_str().into(),
            state: ModelState::Ready,
        }
    }

    pub async fn complete(&self, request: ValidRequest) -> Result<Completion> {
        self.provider.complete(request).await
    }

    pub async fn stream(&self, request: ValidRequest) -> Result<ChunkStream> {
        self.provider.stream(request).await
    }
}
