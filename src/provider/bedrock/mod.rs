//! AWS Bedrock through the official SDK: InvokeModelWithResponseStream (every transport,
//! `/invoke` included, is a stream), in each model family's native body format.

mod anthropic;
mod client;
mod config;
mod error;
mod format;
mod llama3;

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_bedrockruntime::{
    Client,
    primitives::Blob,
    types::{CountTokensInput, InvokeModelTokensRequest, ResponseStream},
};
use futures_util::StreamExt;

pub use self::{
    client::ClientPool,
    config::{BedrockConfig, BedrockSpec},
    format::Format,
};
use self::{
    client::Credentials,
    error::{no_credentials, request_error, stream_error},
};
use super::{Availability, Chunk, ChunkStream, ModelState, Provider, TokenCount, UsageMeter};
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
    /// Llama 3's prompt is rendered by the gateway; Claude's body is JSON, with no tokens.
    fn special_tokens(&self) -> Result<Option<Arc<SpecialTokens>>> {
        Ok(match self.spec.format {
            Format::Llama3 => Some(llama3::special_tokens()),
            Format::Anthropic => None,
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

    /// Bedrock's CountTokens, which serves Anthropic Claude models only (and not every one:
    /// Bedrock's refusal is passed on), of the body the model would be sent.
    async fn count_tokens(&self, request: ValidRequest) -> Result<TokenCount> {
        if !self.spec.model_id.contains("anthropic.") {
            return Ok(TokenCount::Unknown(
                "Bedrock's CountTokens serves Anthropic Claude models only",
            ));
        }
        let body = InvokeModelTokensRequest::builder()
            .body(Blob::new(self.spec.format.request_body(&request)))
            .build()
            .map_err(|err| {
                Error::Upstream(format!("cannot build the CountTokens request: {err}"))
            })?;
        let output = self
            .client
            .count_tokens()
            .model_id(&self.spec.model_id)
            .input(CountTokensInput::InvokeModel(body))
            .send()
            .await
            .map_err(|err| request_error(err, &self.name))?;
        Ok(TokenCount::Counted(
            u32::try_from(output.input_tokens).unwrap_or_default(),
        ))
    }

    async fn stream(&self, request: ValidRequest, spent: UsageMeter) -> Result<ChunkStream> {
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
            // The part that was generated is still paid for: report what the model counted.
            let usage = decoder.usage();
            tracing::warn!(
                input_tokens = usage.input_tokens,
                output_tokens = usage.output_tokens,
                "the answer of model `{name}` failed midway; usage so far"
            );
            spent.report(usage);
            Err(failure)?;
        }
        .boxed())
    }
}
