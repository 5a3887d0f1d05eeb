//! A Bedrock model's entry in the configuration: its fields, defaults and validation.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use toml::Spanned;

use super::{BedrockProvider, Format};
use crate::provider::{DefaultLimits, Invalid, Provider, ProviderSpec, Shared, UpstreamSettings};

/// `provider = "bedrock"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BedrockConfig {
    /// A model id, inference profile id or ARN.
    model_id: Spanned<String>,
    /// Inferred from well-known model ids when left out.
    format: Option<Spanned<Format>>,
    region: Option<Spanned<String>>,
    endpoint_url: Option<Spanned<String>>,
}

/// A Bedrock model, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BedrockSpec {
    /// A model id, inference profile id or ARN.
    pub model_id: String,
    pub format: Format,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

impl BedrockConfig {
    pub fn validate(self) -> Result<BedrockSpec, Invalid> {
        let model_id = self.model_id.get_ref().trim().to_owned();
        if model_id.is_empty() {
            return Err(Invalid::at(self.model_id.span(), "`model_id` is empty"));
        }
        let Some(format) = self
            .format
            .map(Spanned::into_inner)
            .or_else(|| Format::infer(&model_id))
        else {
            return Err(Invalid::entry(
                "`format` is required (\"llama3\" or \"anthropic\"): it cannot be inferred from this model_id",
            ));
        };
        if let Some(url) = &self.endpoint_url
            && !(url.get_ref().starts_with("http://") || url.get_ref().starts_with("https://"))
        {
            return Err(Invalid::at(
                url.span(),
                "`endpoint_url` must start with http:// or https://",
            ));
        }
        Ok(BedrockSpec {
            model_id,
            format,
            region: self
                .region
                .map(Spanned::into_inner)
                .filter(|region| !region.is_empty()),
            endpoint_url: self.endpoint_url.map(Spanned::into_inner),
        })
    }
}

#[async_trait]
impl ProviderSpec for BedrockSpec {
    fn kind(&self) -> &'static str {
        "bedrock"
    }

    fn model_id(&self) -> String {
        self.model_id.clone()
    }

    fn format(&self) -> &'static str {
        self.format.as_str()
    }

    fn default_limits(&self) -> DefaultLimits {
        DefaultLimits {
            default_max_tokens: self.format.default_max_tokens(),
            max_tokens_limit: self.format.max_tokens_limit(),
        }
    }

    async fn build(
        &self,
        name: &str,
        upstream: &UpstreamSettings,
        shared: &mut Shared,
    ) -> Arc<dyn Provider> {
        let clients = &mut shared.bedrock_clients;
        Arc::new(BedrockProvider::new(
            name.to_owned(),
            self.clone(),
            clients.client(self, upstream),
            clients.credentials(),
        ))
    }
}
