//! How a Bedrock model is called: Converse, or a model family's native InvokeModel body
//! (which one a model uses, and the dispatch to its request body and stream decoder).

use serde::{Deserialize, de::DeserializeOwned};

use super::{anthropic, llama3};
use crate::{
    error::{Error, Result},
    provider::{Chunk, Usage},
    request::ValidRequest,
};

/// How a model is called: `converse` (one request shape for every model, with tools,
/// images, documents and reasoning), or a family's native InvokeModel body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Llama3,
    Anthropic,
    Converse,
}

/// The native InvokeModel body families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Native {
    Llama3,
    Anthropic,
}

/// The original Llama 3 and Claude 3 models, which the native formats were written for.
/// Their later versions (`meta.llama3-1-…`, `anthropic.claude-3-5-…`, `…-3-7-…`) and every
/// other family go through Converse.
const NATIVE_MODELS: [(&str, Format); 5] = [
    ("meta.llama3-8b-instruct", Format::Llama3),
    ("meta.llama3-70b-instruct", Format::Llama3),
    ("anthropic.claude-3-haiku-", Format::Anthropic),
    ("anthropic.claude-3-sonnet-", Format::Anthropic),
    ("anthropic.claude-3-opus-", Format::Anthropic),
];

impl Format {
    /// The format of a model id, inference profile id (`us.meta.llama3…`) or ARN: native
    /// for the original Llama 3 and Claude 3 models, Converse for everything else.
    pub fn infer(model_id: &str) -> Format {
        NATIVE_MODELS
            .iter()
            .find(|(prefix, _)| model_id.contains(prefix))
            .map_or(Format::Converse, |&(_, format)| format)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Llama3 => "llama3",
            Format::Anthropic => "anthropic",
            Format::Converse => "converse",
        }
    }

    /// The native body family, `None` for Converse.
    pub fn native(self) -> Option<Native> {
        match self {
            Format::Llama3 => Some(Native::Llama3),
            Format::Anthropic => Some(Native::Anthropic),
            Format::Converse => None,
        }
    }

    pub fn default_max_tokens(self) -> u32 {
        match self {
            Format::Llama3 => 512,
            Format::Anthropic | Format::Converse => 1024,
        }
    }

    /// The most a request may ask for unless the config says otherwise (Llama's
    /// `max_gen_len` and Claude 3 Haiku's `max_tokens` ceilings; for Converse, a ceiling
    /// most current models take: raise it per model for long answers).
    pub fn max_tokens_limit(self) -> u32 {
        match self {
            Format::Llama3 => 2048,
            Format::Anthropic => 4096,
            Format::Converse => 8192,
        }
    }
}

impl Native {
    pub fn request_body(self, request: &ValidRequest) -> Vec<u8> {
        match self {
            Native::Llama3 => llama3::request_body(request),
            Native::Anthropic => anthropic::request_body(request),
        }
    }

    pub fn stream_decoder(self, request: &ValidRequest) -> StreamDecoder {
        match self {
            Native::Llama3 => StreamDecoder::Llama3(llama3::StreamDecoder::new(request)),
            Native::Anthropic => StreamDecoder::Anthropic(anthropic::StreamDecoder::default()),
        }
    }
}

pub enum StreamDecoder {
    Llama3(llama3::StreamDecoder),
    Anthropic(anthropic::StreamDecoder),
}

impl StreamDecoder {
    pub fn decode(&mut self, payload: &[u8]) -> Result<Vec<Chunk>> {
        match self {
            StreamDecoder::Llama3(decoder) => decoder.decode(payload),
            StreamDecoder::Anthropic(decoder) => decoder.decode(payload),
        }
    }

    /// The tokens the model has reported so far.
    pub fn usage(&self) -> Usage {
        match self {
            StreamDecoder::Llama3(decoder) => decoder.usage(),
            StreamDecoder::Anthropic(decoder) => decoder.usage(),
        }
    }
}

/// Bedrock's own token counts, on the last stream event.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvocationMetrics {
    input_token_count: u32,
    output_token_count: u32,
}

impl InvocationMetrics {
    pub fn usage(&self) -> Usage {
        Usage::new(self.input_token_count, self.output_token_count)
    }
}

pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|err| {
        Error::Upstream(format!(
            "Bedrock answered with a body the gateway cannot read ({err})"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_are_inferred_from_ids_profiles_and_arns() {
        for (model_id, format) in [
            ("meta.llama3-70b-instruct-v1:0", Format::Llama3),
            ("us.meta.llama3-8b-instruct-v1:0", Format::Llama3),
            (
                "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-haiku-20240307-v1:0",
                Format::Anthropic,
            ),
            ("anthropic.claude-3-opus-20240229-v1:0", Format::Anthropic),
            ("us.meta.llama3-2-1b-instruct-v1:0", Format::Converse),
            ("meta.llama3-1-70b-instruct-v1:0", Format::Converse),
            ("anthropic.claude-3-5-haiku-20241022-v1:0", Format::Converse),
            (
                "us.anthropic.claude-3-7-sonnet-20250219-v1:0",
                Format::Converse,
            ),
            (
                "global.anthropic.claude-sonnet-4-20250514-v1:0",
                Format::Converse,
            ),
            ("amazon.nova-pro-v1:0", Format::Converse),
            (
                "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123",
                Format::Converse,
            ),
        ] {
            assert_eq!(Format::infer(model_id), format, "{model_id}");
        }
    }
}
