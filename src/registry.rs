//! The one model registry shared by every transport: model name → provider.

use std::{collections::HashMap, sync::Arc};

use poem_openapi::{Enum, Object};
use tokio::sync::Semaphore;

#[cfg(feature = "local")]
use crate::provider::local::LocalProvider;
use crate::{
    config::{Config, ModelSpec, ProviderSpec},
    error::{Error, Result},
    provider::{
        ChunkStream, Provider,
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
    /// Bedrock's model id; for a local model, its GGUF file's name.
    pub model_id: String,
    /// Native body format: `llama3` or `anthropic`; `gguf` for a local model.
    pub format: String,
    pub state: ModelState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ModelState {
    /// Requests are served.
    Ready,
    /// A local model's weights are being fetched or loaded: requests get 503 `model_loading`.
    Loading,
    /// A local model could not be fetched or loaded (the log and each request's 503 say why).
    Failed,
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
                #[cfg(feature = "local")]
                ProviderSpec::Local(local) => {
                    Box::new(LocalProvider::start(spec.name.clone(), local.clone()))
                }
                #[cfg(not(feature = "local"))]
                ProviderSpec::Local(_) => {
                    unreachable!("the configuration refuses local models in builds without them")
                }
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

    /// Looks the model up and validates the request against its limits and, where the
    /// gateway renders the model's prompt, its special tokens.
    pub fn prepare(
        &self,
        request: GenerateRequest,
        caller: &str,
    ) -> Result<(Arc<Model>, ValidRequest)> {
        let model = self.get(&request.model)?.clone();
        let special_tokens = model.provider.special_tokens()?;
        let valid = request.validate(&model.spec.limits, caller, special_tokens.as_deref())?;
        Ok((model, valid))
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.iter()
    }
}

impl Model {
    pub fn info(&self) -> ModelInfo {
        let (provider, model_id, format) = match &self.spec.provider {
            ProviderSpec::Bedrock(bedrock) => {
                ("bedrock", bedrock.model_id.clone(), bedrock.format.as_str())
            }
            ProviderSpec::Local(local) => ("local", local.weights.file_name(), "gguf"),
        };
        ModelInfo {
            name: self.spec.name.clone(),
            provider: provider.into(),
            model_id,
            format: format.into(),
            state: self.provider.state(),
        }
    }

    pub async fn stream(&self, request: ValidRequest) -> Result<ChunkStream> {
        self.provider.stream(request).await
    }
}
