//! The provider abstraction: one trait, one chunk type, one stream type. Every transport
//! (`/invoke`, `/stream`, `/ws/model`) is an adapter over [`ChunkStream`].

pub mod bedrock;
#[cfg(feature = "local")]
pub mod local;

use async_trait::async_trait;
use futures_util::{StreamExt, stream::BoxStream};

use crate::{
    error::{Error, Result},
    registry::ModelState,
    request::ValidRequest,
};

/// One item of a model's answer, as the model writes it. A stream yields any number of
/// `Text` pieces and then exactly one `Done`, or ends with an `Err`.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    Text(String),
    Done(Finish),
}

pub type ChunkStream = BoxStream<'static, Result<Chunk>>;

/// Why and after how many tokens a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finish {
    pub stop_reason: StopReason,
    pub usage: Usage,
}

/// Bedrock Converse's vocabulary, whatever words the model's native API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, poem_openapi::Enum)]
#[oai(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    MaxTokens,
    StopSequence,
    ContentFiltered,
}

/// Token counts as the model reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, poem_openapi::Object)]
pub struct Usage {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    pub finish: Finish,
}

#[async_trait]
pub trait Provider: Send + Sync {
    /// Starts a generation. Errors that happen before the answer begins are returned here;
    /// errors after that are the stream's last item.
    async fn stream(&self, request: ValidRequest) -> Result<ChunkStream>;

    /// The whole answer. Providers with a cheaper non-streaming call override this.
    async fn complete(&self, request: ValidRequest) -> Result<Completion> {
        collect(self.stream(request).await?).await
    }

    /// Whether requests can be served now. Remote models are always `Ready`.
    fn state(&self) -> ModelState {
        ModelState::Ready
    }
}

/// Concatenates a chunk stream into one answer.
pub async fn collect(mut stream: ChunkStream) -> Result<Completion> {
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        match chunk? {
            Chunk::Text(piece) => text.push_str(&piece),
            Chunk::Done(finish) => return Ok(Completion { text, finish }),
        }
    }
    Err(Error::Upstream(
        "the model's answer ended before it was complete".into(),
    ))
}

/// Stop sequences for models whose native API has none: text is released only once it
/// cannot be the start of a stop sequence, and the answer is cut at the first match.
#[derive(Debug, Default)]
pub struct StopMatcher {
    sequences: Vec<String>,
    held: String,
}

/// What to do with the text pushed into a [`StopMatcher`].
#[derive(Debug, PartialEq, Eq)]
pub enum StopScan {
    /// Send this (possibly empty) text on and keep going.
    Continue(String),
    /// A stop sequence was found: send this text, then end the answer.
    Stop(String),
}

impl StopMatcher {
    pub fn new(sequences: Vec<String>) -> Self {
        Self {
            sequences,
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopScan {
        if self.sequences.is_empty() {
            return StopScan::Continue(text.to_owned());
        }
        self.held.push_str(text);
        if let Some(at) = self
            .sequences
            .iter()
            .filter_map(|sequence| self.held.find(sequence.as_str()))
            .min()
        {
            let mut before = std::mem::take(&mut self.held);
            before.truncate(at);
            return StopScan::Stop(before);
        }
        // Hold back the longest tail that is a prefix of some stop sequence.
        let keep = self
            .sequences
            .iter()
            .map(|sequence| longest_suffix_prefix(&self.held, sequence))
            .max()
            .unwrap_or(0);
        let release = self.held.len() - keep;
        let rest = self.held.split_off(release);
        StopScan::Continue(std::mem::replace(&mut self.held, rest))
    }

    /// The text still held back when the answer ends without a match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `sequence`,
/// on character boundaries.
fn longest_suffix_prefix(text: &str, sequence: &str) -> usize {
    (1..sequence.len())
        .rev()
        .filter(|&len| len <= text.len() && sequence.is_char_boundary(len))
        .find(|&len| {
            let start = text.len() - len;
            text.is_char_boundary(start) && text[start..] == sequence[..len]
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_partial_matches_and_cuts_at_the_sequence() {
        let mut matcher = StopMatcher::new(vec!["\nUser:".into()]);
        assert_eq!(matcher.push("Hello"), StopScan::Continue("Hello".into()));
        assert_eq!(
            matcher.push(" there\nUs"),
            StopScan::Continue(" there".into())
        );
        assert_eq!(matcher.push("er: hi"), StopScan::Stop(String::new()));
    }

    #[test]
    fn stop_matcher_releases_held_text_that_turned_out_not_to_match() {
        let mut matcher = StopMatcher::new(vec!["END".into()]);
        assert_eq!(matcher.push("the E"), StopScan::Continue("the ".into()));
        assert_eq!(matcher.push("nd"), StopScan::Continue("End".into()));
        assert_eq!(matcher.push(" EN"), StopScan::Continue(" ".into()));
        assert_eq!(matcher.finish(), "EN");
    }

    #[test]
    fn stop_matcher_cuts_at_the_earliest_of_several_sequences() {
        let mut matcher = StopMatcher::new(vec!["b".into(), "a".into()]);
        assert_eq!(matcher.push("xxaxb"), StopScan::Stop("xx".into()));
    }

    #[test]
    fn stop_matcher_respects_multibyte_characters() {
        let mut matcher = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(matcher.push("café"), StopScan::Continue("caf".into()));
        assert_eq!(matcher.push("?"), StopScan::Continue("é?".into()));
    }

    #[test]
    fn no_sequences_passes_text_through() {
        let mut matcher = StopMatcher::default();
        assert_eq!(matcher.push("abc"), StopScan::Continue("abc".into()));
    }
}
