//! The native body formats of Bedrock's model families: which one a model uses, and the
//! dispatch to its request body and stream decoder.

use serde::{Deserialize, de::DeserializeOwned};

use super::{anthropic, llama3};
use crate::{
    error::{Error, Result},
    provider::{Chunk, Usage},
    request::ValidRequest,
};

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

    pub fn request_body(self, request: &ValidRequest) -> Vec<u8> {
        match self {
            Format::Llama3 => llama3::request_body(request),
            Format::Anthropic => anthropic::request_body(request),
        }
    }

    pub fn stream_decoder(self, request: &ValidRequest) -> StreamDecoder {
        match self {
            Format::Llama3 => StreamDecoder::Llama3(llama3::StreamDecoder::new(request)),
            Format::Anthropic => StreamDecoder::Anthropic(anthropic::StreamDecoder::default()),
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
