//! The one model registry shared by every transport: model name → provider.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use poem_openapi::Object;
use tokio::sync::Semaphore;

use crate::{
    config::{Config, ModelSpec},
    error::{Error, Result},
    provider::{ChunkStream, ModelState, Provider, Shared, UsageMeter},
    request::{GenerateRequest, ValidRequest},
};

pub struct Registry {
    models: Vec<Arc<Model>>,
    by_name: HashMap<String, usize>,
}

pub struct Model {
    pub spec: ModelSpec,
    provider: Arc<dyn Provider>,
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
    /// How a Bedrock model is called: `converse`, or a native body format (`llama3`,
    /// `anthropic`); `gguf` for a local model.
    pub format: String,
    pub state: ModelState,
    /// Why the model is `failed` or `unavailable`: what its requests' 503 says.
    #[oai(skip_serializing_if_is_none)]
    pub reason: Option<String>,
}

impl Registry {
    /// Builds every provider; what they share (the SDK clients) is made here, once.
    pub async fn build(config: &Config) -> Registry {
        let mut shared = Shared::load().await;
        let mut models = Vec::with_capacity(config.models.len());
        for spec in &config.models {
            let provider = spec
                .provider
                .build(&spec.name, &spec.upstream, &mut shared)
                .await;
            models.push(Arc::new(Model {
                spec: spec.clone(),
                provider,
                slots: Arc::new(Semaphore::new(spec.upstream.max_concurrent)),
            }));
        }
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
    pub fn prepare(&self, request: GenerateRequest) -> Result<(Arc<Model>, ValidRequest)> {
        let model = self.get(&request.model)?.clone();
        let special_tokens = model.provider.special_tokens()?;
        let valid = request.validate(&model.spec.limits, special_tokens.as_deref())?;
        Ok((model, valid))
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<Model>> {
        self.models.iter()
    }
}

impl Model {
    pub fn info(&self) -> ModelInfo {
        let availability = self.provider.availability();
        ModelInfo {
            name: self.spec.name.clone(),
            provider: self.spec.provider.kind().into(),
            model_id: self.spec.provider.model_id(),
            format: self.spec.provider.format().into(),
            state: availability.state,
            reason: availability.reason,
        }
    }

    pub async fn stream(&self, request: ValidRequest, usage: UsageMeter) -> Result<ChunkStream> {
        self.provider.stream(request, usage).await
    }
}

/// `modelgate pull [MODEL]`: fetches the weights of every local model (or of `only`) now,
/// in the foreground, and returns where they are.
pub fn pull(config: &Config, only: Option<&str>) -> Result<Vec<(String, PathBuf)>, String> {
    if let Some(name) = only
        && !config.models.iter().any(|model| model.name == name)
    {
        return Err(format!("no model named `{name}` in {}", config.source));
    }
    let mut pulled = Vec::new();
    for model in &config.models {
        if only.is_some_and(|name| name != model.name) {
            continue;
        }
        match model.provider.pull(&model.name) {
            Some(path) => pulled.push((model.name.clone(), path?)),
            None if only.is_some() => {
                return Err(format!(
                    "model `{}` is not a local model: it has no weights to fetch",
                    model.name
                ));
            }
            None => {}
        }
    }
    Ok(pulled)
}
