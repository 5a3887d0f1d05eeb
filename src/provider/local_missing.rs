//! Provider `local` in a build without the `local` feature: its entries are refused.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;

use crate::provider::{DefaultLimits, Invalid, Provider, ProviderSpec, Shared, UpstreamSettings};

/// `provider = "local"`, whatever its fields: this build cannot run it.
#[derive(Debug, Deserialize)]
pub struct LocalConfig {}

/// Never made: [`LocalConfig::validate`] refuses every entry.
#[derive(Debug)]
pub enum LocalSpec {}

impl LocalConfig {
    pub fn validate(self) -> Result<LocalSpec, Invalid> {
        Err(Invalid::entry(
            "this modelgate was built without the `local` feature (cargo build --features local)",
        ))
    }
}

#[async_trait]
impl ProviderSpec for LocalSpec {
    fn kind(&self) -> &'static str {
        match *self {}
    }

    fn model_id(&self) -> String {
        match *self {}
    }

    fn format(&self) -> &'static str {
        match *self {}
    }

    fn default_limits(&self) -> DefaultLimits {
        match *self {}
    }

    async fn build(&self, _: &str, _: &UpstreamSettings, _: &mut Shared) -> Arc<dyn Provider> {
        match *self {}
    }
}
