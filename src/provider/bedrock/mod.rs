//! AWS Bedrock through the official SDK: ConverseStream for every model family, or
//! InvokeModelWithResponseStream in a family's native body format. Every transport,
//! `/invoke` included, is a stream.

mod anthropic;
mod client;
mod config;
mod converse;
mod error;
mod format;
mod llama3;

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_bedrockruntime::{Client, primitives::Blob, types::ResponseStream};
use futures_util::StreamExt;

use self::format::Native;
pub use self::{
    client::ClientPool,
    config::{BedrockConfig, BedrockSpec},
    format::Format,
};
use self::{
    client::Credentials,
    error::{no_credentials, request_error, stream_error},
};
use super::{Availability, Chunk, ChunkStream, ModelState, Provider, Usage, UsageMeter};
use crate::{
    error::{Error, Result},
    request::ValidRequest,
    special_tokens::SpecialTokens,
};

/// One Bedrock model.
pub struct BedrockProvider {
    /// The registry name, for messages.
    name: String,
    spec: BedrockSpec,
    client: Client,
    credentials: Credentials,
}

impl BedrockProvider {
    pub fn new(name: String, spec: BedrockSpec, client: Client, credentials: Credentials) -> Self {
        Self {
            name,
            spec,
            client,
            credentials,
        }
    }
}

#[async_trait]
impl Provider for BedrockProvider {
    /// Llama 3's prompt is rendered by the gateway; Claude's and Converse's bodies are JSON,
    /// with no tokens.
    fn special_tokens(&self) -> Result<Option<Arc<SpecialTokens>>> {
        Ok(match self.spec.format {
            Format::Llama3 => Some(llama3::special_tokens()),
            Format::Anthropic | Format::Converse => None,
        })
    }

    /// Unavailable when the credential chain found nothing at start-up (requests would get
    /// the same 503).
    fn availability(&self) -> Availability {
        match self.credentials.missing() {
            Some(cause) => Availability {
                state: ModelState::Unavailable,
                reason: Some(no_credentials(&self.name, cause)),
            },
            None => Availability::READY,
        }
    }

    async fn stream(&self, request: ValidRequest, spent: UsageMeter) -> Result<ChunkStream> {
        match self.spec.format.native() {
            Some(native) => self.native_stream(native, request, spent).await,
            None => self.converse_stream(request, spent).await,
        }
    }
}

impl BedrockProvider {
    async fn native_stream(
        &self,
        native: Native,
        request: ValidRequest,
        spent: UsageMeter,
    ) -> Result<ChunkStream> {
        let output = self
            .client
            .invoke_model_with_response_stream()
            .model_id(&self.spec.model_id)
            .content_type("application/json")
            .accept("application/json")
            .body(Blob::new(native.request_body(&request)))
            .send()
            .await
            .map_err(|err| request_error(err, &self.name))?;
        let mut decoder = native.stream_decoder(&request);
        let mut events = output.body;
        let name = self.name.clone();
        // Dropping this stream drops `events` and with it the HTTP response: the upstream
        // connection closes and Bedrock stops generating.
        Ok(async_stream::try_stream! {
            let failure = loop {
                let payload = match events.recv().await {
                    Ok(Some(ResponseStream::Chunk(part))) => part.bytes,
                    Ok(Some(_)) => continue,
                    Ok(None) => break ended_early(&name),
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
            report_partial(&spent, decoder.usage(), &name);
            Err(failure)?;
        }
        .boxed())
    }

    async fn converse_stream(
        &self,
        request: ValidRequest,
        spent: UsageMeter,
    ) -> Result<ChunkStream> {
        let output = converse::request(
            &self.client,
            &self.spec.model_id,
            &self.spec.converse,
            &request,
        )?
        .send()
        .await
        .map_err(|err| request_error(err, &self.name))?;
        let mut decoder = converse::StreamDecoder::default();
        let mut events = output.stream;
        let name = self.name.clone();
        // As for the native stream: dropping it closes the upstream connection.
        Ok(async_stream::try_stream! {
            let failure = loop {
                let event = match events.recv().await {
                    Ok(Some(event)) => event,
                    Ok(None) => break ended_early(&name),
                    Err(err) => break stream_error(err, &name),
                };
                let chunks = match decoder.decode(event) {
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
            report_partial(&spent, decoder.usage(), &name);
            Err(failure)?;
        }
        .boxed())
    }
}

fn ended_early(name: &str) -> Error {
    Error::Upstream(format!(
        "Bedrock ended the stream for model `{name}` before the answer was complete"
    ))
}

/// The part of a failed answer that was generated is still paid for: report what the model
/// counted.
fn report_partial(spent: &UsageMeter, usage: Usage, name: &str) {
    tracing::warn!(
        input_tokens = usage.input_tokens,
        output_tokens = usage.output_tokens,
        "the answer of model `{name}` failed midway; usage so far"
    );
    spent.report(usage);
}
