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
use aws_sdk_bedrockruntime::{
    Client,
    error::ProvideErrorMetadata,
    primitives::{Blob, event_stream::EventReceiver},
    types::{ConverseStreamOutput, CountTokensInput, InvokeModelTokensRequest, ResponseStream},
};
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
use super::{
    Availability, Chunk, ChunkStream, ModelState, Provider, TokenCount, Usage, UsageMeter,
};
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

    /// Bedrock's CountTokens, which serves Anthropic Claude models only (and not every one:
    /// Bedrock's refusal is passed on), of what the model would be sent: its native body, or
    /// the Converse request.
    async fn count_tokens(&self, request: ValidRequest) -> Result<TokenCount> {
        if !self.spec.model_id.contains("anthropic.") {
            return Ok(TokenCount::Unknown(
                "Bedrock's CountTokens serves Anthropic Claude models only",
            ));
        }
        let input = match self.spec.format.native() {
            Some(native) => CountTokensInput::InvokeModel(
                InvokeModelTokensRequest::builder()
                    .body(Blob::new(native.request_body(&request)))
                    .build()
                    .map_err(|err| {
                        Error::Upstream(format!("cannot build the CountTokens request: {err}"))
                    })?,
            ),
            None => converse::count_tokens_input(&self.spec.converse, &request)?,
        };
        let output = self
            .client
            .count_tokens()
            .model_id(&self.spec.model_id)
            .input(input)
            .send()
            .await
            .map_err(|err| request_error(err, &self.name))?;
        Ok(TokenCount::Counted(
            u32::try_from(output.input_tokens).unwrap_or_default(),
        ))
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
        let upstream = Upstream {
            events: output.body,
            decoder: native.stream_decoder(&request),
            name: self.name.clone(),
        };
        Ok(pump(upstream, spent))
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
        let upstream = Upstream {
            events: output.stream,
            decoder: converse::StreamDecoder::default(),
            name: self.name.clone(),
        };
        Ok(pump(upstream, spent))
    }
}

/// An answer's event stream, and its decoder.
struct Upstream<T, E, D> {
    events: EventReceiver<T, E>,
    decoder: D,
    /// The registry name of the model, for messages.
    name: String,
}

/// Turns an operation's stream events into chunks.
trait Decode<T> {
    /// The chunks of one event (none for an event that carries none).
    fn decode_event(&mut self, event: T) -> Result<Vec<Chunk>>;
    /// The tokens the model has reported (or the decoder counted) so far.
    fn usage(&self) -> Usage;
}

/// InvokeModelWithResponseStream's `chunk` events hold a native body format's JSON.
impl Decode<ResponseStream> for format::StreamDecoder {
    fn decode_event(&mut self, event: ResponseStream) -> Result<Vec<Chunk>> {
        match event {
            ResponseStream::Chunk(part) => {
                self.decode(part.bytes.as_ref().map(Blob::as_ref).unwrap_or_default())
            }
            _ => Ok(vec![]),
        }
    }

    fn usage(&self) -> Usage {
        format::StreamDecoder::usage(self)
    }
}

impl Decode<ConverseStreamOutput> for converse::StreamDecoder {
    fn decode_event(&mut self, event: ConverseStreamOutput) -> Result<Vec<Chunk>> {
        self.decode(event)
    }

    fn usage(&self) -> Usage {
        converse::StreamDecoder::usage(self)
    }
}

/// Yields the events' chunks until `Done`. An answer that fails midway reports its usage
/// so far, then ends with the error. Dropping the stream drops the events and with them
/// the HTTP response: the upstream connection closes and Bedrock stops generating.
fn pump<T, E, D>(mut upstream: Upstream<T, E, D>, spent: UsageMeter) -> ChunkStream
where
    T: Send + 'static,
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    D: Decode<T> + Send + 'static,
{
    async_stream::try_stream! {
        let failure = loop {
            let chunks = match upstream.events.recv().await {
                Ok(Some(event)) => upstream.decoder.decode_event(event),
                Ok(None) => Err(ended_early(&upstream.name)),
                Err(err) => Err(stream_error(err, &upstream.name)),
            };
            let chunks = match chunks {
                Ok(chunks) => chunks,
                Err(err) => break err,
            };
            // A client that leaves mid-answer pays for what was generated until then.
            spent.report(upstream.decoder.usage());
            for chunk in chunks {
                let done = matches!(chunk, Chunk::Done(_));
                yield chunk;
                if done {
                    return;
                }
            }
        };
        report_partial(&spent, upstream.decoder.usage(), &upstream.name);
        Err(failure)?;
    }
    .boxed()
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
