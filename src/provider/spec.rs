//! What the configuration makes of a model's provider: the one enum of providers, the
//! validated settings each provider module builds its provider from, and what they share.

use std::{fmt, ops::Range, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::Deserialize;

use super::{Provider, bedrock, local};
use crate::content::Accepts;

/// A model entry's own fields, chosen by its `provider = "…"`: one arm per provider, each
/// a struct with `deny_unknown_fields` in the provider's module. The configuration hands
/// the entry's other keys to the arm its `provider` names (`config/models.rs`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderConfig {
    Bedrock(bedrock::BedrockConfig),
    Local(local::LocalConfig),
}

impl ProviderConfig {
    /// Checks the fields and applies the provider's defaults.
    pub fn validate(self) -> Result<Arc<dyn ProviderSpec>, Invalid> {
        Ok(match self {
            ProviderConfig::Bedrock(config) => Arc::new(config.validate()?),
            ProviderConfig::Local(config) => Arc::new(config.validate()?),
        })
    }
}

/// A field of a model entry that its provider refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Where in the file; `None`: the entry as a whole (a field it lacks).
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Invalid {
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Invalid {
            span: Some(span),
            message: message.into(),
        }
    }

    pub fn entry(message: impl Into<String>) -> Self {
        Invalid {
            span: None,
            message: message.into(),
        }
    }
}

/// A model's provider, configured and validated: what `GET /models` shows of it, its
/// defaults, and how to start it.
#[async_trait]
pub trait ProviderSpec: fmt::Debug + Send + Sync {
    /// `provider` as the configuration writes it.
    fn kind(&self) -> &'static str;
    /// The upstream's name of the model: Bedrock's model id, a local model's file name.
    fn model_id(&self) -> String;
    /// The native body format.
    fn format(&self) -> &'static str;
    /// What the model's `max_tokens` and `max_tokens_limit` default to.
    fn default_limits(&self) -> DefaultLimits;
    /// What the model takes besides text.
    fn accepts(&self) -> Accepts {
        Accepts::TEXT
    }
    /// Starts the provider (a local model loads in the background).
    async fn build(
        &self,
        name: &str,
        upstream: &UpstreamSettings,
        shared: &mut Shared,
    ) -> Arc<dyn Provider>;
    /// `modelgate pull`: fetches what the model needs on disk now and says where it is;
    /// `None` for a model with nothing to fetch.
    fn pull(&self, _name: &str) -> Option<Result<PathBuf, String>> {
        None
    }
}

/// The defaults a provider gives a model's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultLimits {
    pub default_max_tokens: u32,
    pub max_tokens_limit: u32,
}

/// What providers share, made once at start-up.
pub struct Shared {
    pub(super) bedrock_clients: bedrock::ClientPool,
}

impl Shared {
    pub async fn load() -> Shared {
        Shared {
            bedrock_clients: bedrock::ClientPool::load().await,
        }
    }
}

/// How the gateway treats one model's upstream: timeouts, retries, concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// From sending the request to the first chunk, on every transport (`/invoke` too).
    pub first_token_timeout: Duration,
    /// Longest silence between two chunks.
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    /// Attempts of the SDK's retry (throttling, 5xx, connection errors) before an answer begins.
    pub max_attempts: u32,
    /// Upstream calls in flight to this model; beyond it requests get 503.
    pub max_concurrent: usize,
}
