//! AWS Bedrock through the official SDK: InvokeModelWithResponseStream (every transport,
//! `/invoke` included, is a stream), in each model family's native body format.

mod anthropic;
mod llama3;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use aws_config::{
    BehaviorVersion, Region, SdkConfig, environment::EnvironmentVariableRegionProvider,
    meta::region::RegionProviderChain, profile::ProfileFileRegionProvider,
};
use aws_sdk_bedrockruntime::{
    Client,
    config::{
        StalledStreamProtectionConfig, http::HttpResponse, retry::RetryConfig,
        timeout::TimeoutConfig,
    },
    error::{ProvideErrorMetadata, SdkError},
    primitives::Blob,
    types::{ResponseStream, error::ResponseStreamError},
};
use aws_smithy_types::event_stream::RawMessage;
use futures_util::StreamExt;
use serde::{Deserialize, de::DeserializeOwned};

use super::{Chunk, ChunkStream, Provider, Usage, special_tokens::SpecialTokens};
use crate::{
    config::{BedrockSpec, UpstreamSettings},
    error::{Error, Result},
    request::ValidRequest,
    telemetry,
};

/// The region used when neither the model entry, `AWS_REGION` nor the AWS profile names one.
const FALLBACK_REGION: &str = "us-east-1";

/// The native request/response body family of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Llama3,
    Anthropic,
}

impl Format {
    /// The family of well-known model ids, inference profile ids (`us.meta.llama3…`) and ARNs.
    pub fn infer(model_id: &str) -> Option<Format> {
        if model_id.contains("meta.llama3") {
            Some(Format::Llama3)
        } else if model_id.contains("anthropic.claude") {
            Some(Format::Anthropic)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Llama3 => "llama3",
            Format::Anthropic => "anthropic",
        }
    }

    pub fn default_max_tokens(self) -> u32 {
        match self {
            Format::Llama3 => 512,
            Format::Anthropic => 1024,
        }
    }

    /// The most a request may ask for unless the config says otherwise (Llama's
    /// `max_gen_len` and Claude 3 Haiku's `max_tokens` ceilings).
    pub fn max_tokens_limit(self) -> u32 {
        match self {
            Format::Llama3 => 2048,
            Format::Anthropic => 4096,
        }
    }

    fn request_body(self, request: &ValidRequest) -> Vec<u8> {
        match self {
            Format::Llama3 => llama3::request_body(request),
            Format::Anthropic => anthropic::request_body(request),
        }
    }

    fn stream_decoder(self, request: &ValidRequest) -> StreamDecoder {
        match self {
            Format::Llama3 => StreamDecoder::Llama3(llama3::StreamDecoder::new(request)),
            Format::Anthropic => StreamDecoder::Anthropic(anthropic::StreamDecoder::default()),
        }
    }
}

enum StreamDecoder {
    Llama3(llama3::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
}

impl StreamDecoder {
    fn decode(&mut self, payload: &[u8]) -> Result<Vec<Chunk>> {
        match self {
            StreamDecoder::Llama3(decoder) => decoder.decode(payload),
            StreamDecoder::Anthropic(decoder) => decoder.decode(payload),
        }
    }

    /// The tokens the model has reported so far.
    fn usage(&self) -> Usage {
        match self {
            StreamDecoder::Llama3(decoder) => decoder.usage(),
            StreamDecoder::Anthropic(decoder) => decoder.usage(),
        }
    }
}

/// Bedrock's own token counts, on the last stream event.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InvocationMetrics {
    input_token_count: u32,
    output_token_count: u32,
}

impl InvocationMetrics {
    fn usage(&self) -> Usage {
        Usage {
            input_tokens: self.input_token_count,
            output_tokens: self.output_token_count,
        }
    }
}

fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|err| {
        Error::Upstream(format!(
            "Bedrock answered with a body the gateway cannot read ({err})"
        ))
    })
}

/// One SDK client per distinct (region, endpoint_url, connect timeout, attempts), built at
/// start-up and shared.
pub struct ClientPool {
    base: SdkConfig,
    clients: HashMap<ClientKey, Client>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    region: Option<String>,
    endpoint_url: Option<String>,
    connect_timeout: Duration,
    max_attempts: u32,
}

impl ClientPool {
    /// Loads the shared AWS configuration. Credentials are resolved lazily, on the first
    /// request that needs them, so the gateway starts without any AWS account.
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
        Self {
            base,
            clients: HashMap::new(),
        }
    }

    pub fn client(&mut self, spec: &BedrockSpec, upstream: &UpstreamSettings) -> Client {
        let key = ClientKey {
            region: spec.region.clone(),
            endpoint_url: spec.endpoint_url.clone(),
            connect_timeout: upstream.connect_timeout,
            max_attempts: upstream.max_attempts,
        };
        self.clients
            .entry(key)
            .or_insert_with_key(|key| {
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
                Client::from_conf(config.build())
            })
            .clone()
    }

    pub fn len(&self) -> usize {
        self.clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}

/// One Bedrock model.
pub struct BedrockProvider {
    /// The registry name, for messages.
    name: String,
    spec: BedrockSpec,
    client: Client,
}

impl BedrockProvider {
    pub fn new(name: String, spec: BedrockSpec, client: Client) -> Self {
        Self { name, spec, client }
    }
}

#[async_trait]
impl Provider for BedrockProvider {
    /// Llama 3's prompt is rendered by the gateway; Claude's body is JSON, with no tokens.
    fn special_tokens(&self) -> Result<Option<Arc<SpecialTokens>>> {
        Ok(match self.spec.format {
            Format::Llama3 => Some(llama3::special_tokens()),
            Format::Anthropic => None,
        })
    }

    async fn stream(&self, request: ValidRequest) -> Result<ChunkStream> {
        let output = self
            .client
            .invoke_model_with_response_stream()
            .model_id(&self.spec.model_id)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(self.spec.format.request_body(&request)))
            .send()
            .await
            .map_err(|err| request_error(err, &self.name))?;
        let mut decoder = self.spec.format.stream_decoder(&request);
        let mut events = output.body;
        let name = self.name.clone();
        // Dropping this stream drops `events` and with it the HTTP response: the upstream
        // connection closes and Bedrock stops generating.
        Ok(async_stream::try_stream! {
            let failure = loop {
                let payload = match events.recv().await {
                    Ok(Some(ResponseStream::Chunk(part))) => part.bytes,
                    Ok(Some(_)) => continue,
                    Ok(None) => break Error::Upstream(format!(
                        "Bedrock ended the stream for model `{name}` before the answer was complete"
                    )),
                    Err(err) => break stream_error(err, &name),
                };
                let chunks = match decoder.decode(payload.as_ref().map(Blob::as_ref).unwrap_or_default()) {
                    Ok(chunks) => chunks,
                    Err(err) => break err,
                };
                for chunk in chunks {
                    let done = matches!(chunk, Chunk::Done(_));
                    yield chunk;
                    if done {
                        return;
                    }
                }
            };
            // The part that was generated is still paid for: count what the model reported.
            let usage = decoder.usage();
            tracing::warn!(
                input_tokens = usage.input_tokens,
                output_tokens = usage.output_tokens,
                "the answer of model `{name}` failed midway; usage so far"
            );
            telemetry::count_tokens(&name, &request.caller, usage);
            Err(failure)?;
        }
        .boxed())
    }
}

/// Maps a failed InvokeModelWithResponseStream call (before any answer).
fn request_error<E>(err: SdkError<E, HttpResponse>, model: &str) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &err {
        SdkError::ServiceError(service) => {
            exception(service.err().code(), service.err().message(), model)
        }
        SdkError::TimeoutError(_) => Error::UpstreamTimeout(format!(
            "Bedrock did not answer in time for model `{model}`"
        )),
        _ => transport_error(&err, model),
    }
}

/// Maps an error received in the middle of a response stream.
fn stream_error(err: SdkError<ResponseStreamError, RawMessage>, model: &str) -> Error {
    match &err {
        SdkError::ServiceError(service) => {
            let name = match service.err() {
                ResponseStreamError::InternalServerException(_) => "InternalServerException",
                ResponseStreamError::ModelStreamErrorException(_) => "ModelStreamErrorException",
                ResponseStreamError::ValidationException(_) => "ValidationException",
                ResponseStreamError::ThrottlingException(_) => "ThrottlingException",
                ResponseStreamError::ModelTimeoutException(_) => "ModelTimeoutException",
                ResponseStreamError::ServiceUnavailableException(_) => {
                    "ServiceUnavailableException"
                }
                other => other.code().unwrap_or("UnknownException"),
            };
            exception(Some(name), service.err().message(), model)
        }
        // An unmodeled `:message-type error` frame: the SDK cannot unmarshal it, but the raw
        // frame still carries Bedrock's code and message.
        SdkError::ResponseError(response) => match response.raw() {
            RawMessage::Decoded(message) => {
                let header = |name: &str| {
                    message
                        .headers()
                        .iter()
                        .find(|header| header.name().as_str() == name)
                        .and_then(|header| header.value().as_string().ok())
                        .map(|value| value.as_str().to_owned())
                };
                match header(":error-code") {
                    Some(code) => {
                        exception(Some(&code), header(":error-message").as_deref(), model)
                    }
                    None => transport_error(&err, model),
                }
            }
            _ => transport_error(&err, model),
        },
        // The answer had begun: whatever broke the connection, the answer is broken.
        SdkError::DispatchFailure(_) => Error::Upstream(format!(
            "the connection to Bedrock broke in the middle of model `{model}`'s answer: {}",
            error_chain(&err)
        )),
        _ => transport_error(&err, model),
    }
}

/// Errors below the service: connection refused or lost, credentials missing, timeouts.
fn transport_error<E, R>(err: &SdkError<E, R>, model: &str) -> Error
where
    E: std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    if let Some(credentials) =
        find_source::<aws_credential_types::provider::error::CredentialsError>(err)
    {
        return Error::UpstreamUnavailable(format!(
            "the gateway has no usable AWS credentials for model `{model}` ({credentials}); \
             provide them through the standard AWS chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             AWS_PROFILE, SSO or an instance role)"
        ));
    }
    match err {
        SdkError::TimeoutError(_) => Error::UpstreamTimeout(format!(
            "Bedrock did not answer in time for model `{model}`"
        )),
        SdkError::DispatchFailure(failure) if failure.is_timeout() => Error::UpstreamTimeout(
            format!("Bedrock did not answer in time for model `{model}`"),
        ),
        SdkError::DispatchFailure(failure) if failure.is_io() => {
            Error::UpstreamUnavailable(format!(
                "the connection to Bedrock failed for model `{model}`: {}",
                error_chain(err)
            ))
        }
        _ => Error::Upstream(format!(
            "Bedrock call for model `{model}` failed: {}",
            error_chain(err)
        )),
    }
}

/// "outer: inner: root cause", without the SDK's debug dump.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(err) = current {
        let part = err.to_string();
        if !parts.last().is_some_and(|last| last.contains(&part)) {
            parts.push(part);
        }
        current = err.source();
    }
    parts.join(": ")
}

fn find_source<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// Maps a Bedrock exception, named as in its API (any case), to the gateway's error.
fn exception(name: Option<&str>, message: Option<&str>, model: &str) -> Error {
    let name = name.unwrap_or("UnknownException");
    let message = message.unwrap_or("no message");
    match name.to_ascii_lowercase().as_str() {
        "throttlingexception" | "servicequotaexceededexception" | "modelnotreadyexception" => {
            Error::Throttled(format!(
                "Bedrock is throttling model `{model}` ({name}: {message}); retry after a pause"
            ))
        }
        "validationexception" if message.contains("inference profile") => {
            Error::InvalidRequest(format!(
                "Bedrock rejected the request for model `{model}`: {message}. This model must be \
                 called through an inference profile: set its `model_id` to a profile id such as \
                 `us.<model id>` or to the profile's ARN"
            ))
        }
        "validationexception" => Error::InvalidRequest(format!(
            "Bedrock rejected the request for model `{model}`: {message}"
        )),
        "serviceunavailableexception" => Error::UpstreamUnavailable(format!(
            "Bedrock is unavailable for model `{model}`: {message}"
        )),
        "modeltimeoutexception" => {
            Error::UpstreamTimeout(format!("model `{model}` timed out on Bedrock: {message}"))
        }
        "accessdeniedexception" => Error::Upstream(format!(
            "Bedrock denied access to model `{model}`: {message}. Check that the gateway's AWS \
             identity may call bedrock:InvokeModel and that model access is granted in this region"
        )),
        "unrecognizedclientexception"
        | "invalidsignatureexception"
        | "expiredtokenexception"
        | "missingauthenticationtokenexception" => Error::Upstream(format!(
            "Bedrock refused the gateway's AWS credentials for model `{model}` ({name}: {message}); \
             check or renew them"
        )),
        _ => Error::Upstream(format!(
            "Bedrock failed for model `{model}` ({name}: {message})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_map_to_the_documented_codes_whatever_their_case() {
        let code = |name: &str| exception(Some(name), Some("m"), "llama3").code();
        assert_eq!(code("ThrottlingException"), "throttled");
        assert_eq!(code("throttlingException"), "throttled");
        assert_eq!(code("ServiceQuotaExceededException"), "throttled");
        assert_eq!(code("ModelNotReadyException"), "throttled");
        assert_eq!(code("validationException"), "invalid_request");
        assert_eq!(code("ServiceUnavailableException"), "upstream_unavailable");
        assert_eq!(code("modelTimeoutException"), "upstream_timeout");
        assert_eq!(code("AccessDeniedException"), "upstream_error");
        assert_eq!(code("ResourceNotFoundException"), "upstream_error");
        assert_eq!(code("modelStreamErrorException"), "upstream_error");
        assert_eq!(code("InternalServerException"), "upstream_error");
    }

    #[test]
    fn a_bare_id_that_needs_an_inference_profile_says_how_to_fix_it() {
        let err = exception(
            Some("ValidationException"),
            Some(
                "Invocation of model ID meta.llama3-2-1b-instruct-v1:0 with on-demand throughput isn't supported. Retry your request with the ID or ARN of an inference profile that contains this model.",
            ),
            "small",
        );
        assert!(err.to_string().contains("`us.<model id>`"), "{err}");
    }

    #[test]
    fn formats_are_inferred_from_ids_profiles_and_arns() {
        assert_eq!(
            Format::infer("meta.llama3-70b-instruct-v1:0"),
            Some(Format::Llama3)
        );
        assert_eq!(
            Format::infer(
                "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0"
            ),
            Some(Format::Anthropic)
        );
        assert_eq!(Format::infer("amazon.titan-text-express-v1"), None);
    }
}
