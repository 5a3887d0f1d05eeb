//! The SDK clients: one per distinct connection setting, built at start-up and shared.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
    time::Duration,
};

use aws_config::sts::AssumeRoleProvider;
use aws_config::{
    BehaviorVersion, Region, SdkConfig, environment::EnvironmentVariableRegionProvider,
    meta::region::RegionProviderChain, profile::ProfileFileRegionProvider,
};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sdk_bedrockruntime::{
    Client,
    config::{StalledStreamProtectionConfig, retry::RetryConfig, timeout::TimeoutConfig},
};

use super::{BedrockSpec, config::Role, error::error_chain};
use crate::provider::UpstreamSettings;

/// The region used when neither the model entry, `AWS_REGION` nor the AWS profile names one.
const FALLBACK_REGION: &str = "us-east-1";

/// One SDK client per distinct (region, endpoint_url, role, connect timeout, attempts), built
/// at start-up and shared.
pub struct ClientPool {
    base: SdkConfig,
    clients: HashMap<ClientKey, Client>,
    credentials: Credentials,
}

/// What the AWS credential chain answered when asked once at start-up.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Why the chain found none; unset while it has not answered, or when it found some.
    missing: Arc<OnceLock<String>>,
}

impl Credentials {
    /// Why the gateway has no AWS credentials, if the chain found none.
    pub fn missing(&self) -> Option<&str> {
        self.missing.get().map(String::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    region: Option<String>,
    endpoint_url: Option<String>,
    role: Option<Role>,
    connect_timeout: Duration,
    max_attempts: u32,
}

impl ClientPool {
    /// Loads the shared AWS configuration. The gateway starts without any AWS account: the
    /// credential chain is asked in the background (it may try the EC2 metadata service),
    /// so that `GET /models` can say when there are none; requests resolve credentials
    /// themselves, on the first call that needs them.
    pub async fn load() -> Self {
        // The region comes from the environment or the profile, never from the EC2 metadata
        // service, so that start-up never waits on the network.
        let region = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
            .or_else(ProfileFileRegionProvider::new())
            .or_else(Region::new(FALLBACK_REGION));
        let base = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        let credentials = Credentials::default();
        if let Some(chain) = base.credentials_provider() {
            let missing = credentials.missing.clone();
            tokio::spawn(async move {
                if let Err(err) = chain.provide_credentials().await {
                    // Set once, here only.
                    let _ = missing.set(error_chain(&err));
                }
            });
        }
        Self {
            base,
            clients: HashMap::new(),
            credentials,
        }
    }

    pub async fn client(&mut self, spec: &BedrockSpec, upstream: &UpstreamSettings) -> Client {
        let key = ClientKey {
            region: spec.region.clone(),
            endpoint_url: spec.endpoint_url.clone(),
            role: spec.role.clone(),
            connect_timeout: upstream.connect_timeout,
            max_attempts: upstream.max_attempts,
        };
        if let Some(client) = self.clients.get(&key) {
            return client.clone();
        }
        let mut config = aws_sdk_bedrockruntime::config::Builder::from(&self.base)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(key.connect_timeout)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(key.max_attempts))
            // The gateway enforces its own `idle_timeout` between chunks.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if let Some(region) = &key.region {
            config = config.region(Region::new(region.clone()));
        }
        if let Some(url) = &key.endpoint_url {
            config = config.endpoint_url(url);
        }
        if let Some(role) = &key.role {
            config = config.credentials_provider(self.assume_role(role, &key.region).await);
        }
        let client = Client::from_conf(config.build());
        self.clients.insert(key, client.clone());
        client
    }

    /// Credentials of `role`, assumed with the default chain's. The client's identity cache
    /// keeps them and asks STS again before they expire. Nothing is asked at start-up: a
    /// role that cannot be assumed fails the requests that need it, with STS's reason.
    async fn assume_role(&self, role: &Role, region: &Option<String>) -> SharedCredentialsProvider {
        let mut builder = AssumeRoleProvider::builder(&role.arn).configure(&self.base);
        if let Some(region) = region {
            builder = builder.region(Region::new(region.clone()));
        }
        if let Some(id) = &role.external_id {
            builder = builder.external_id(id);
        }
        if let Some(name) = &role.session_name {
            builder = builder.session_name(name);
        }
        SharedCredentialsProvider::new(builder.build().await)
    }

    pub fn credentials(&self) -> Credentials {
        self.credentials.clone()
    }
}
