//! The provider abstraction: one trait, one chunk type, one stream type. Every transport
//! (`/invoke`, `/stream`, `/ws/model`) is an adapter over [`ChunkStream`].

pub mod bedrock;
#[cfg(feature = "local")]
pub mod local;
#[cfg(not(feature = "local"))]
#[path = "local_missing.rs"]
pub mod local;

use std::{
    collections::HashMap,
    fmt,
    ops::Range,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use aho_corasick::{
    Anchored, MatchKind,
    automaton::{Automaton, StateID},
    nfa::contiguous::NFA,
};
use async_trait::async_trait;
use futures_util::{StreamExt, stream::BoxStream};
use poem_openapi::Enum;
use serde::Deserialize;

use crate::{
    error::{Error, Result},
    request::ValidRequest,
    special_tokens::SpecialTokens,
};

/// A model entry's own fields, chosen by its `provider = "…"`: one arm per provider, each
/// a struct with `deny_unknown_fields` in the provider's module. The configuration hands
/// the entry's other keys to the arm its `provider` names (`config.rs`, `ProviderTagged`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderConfig {
    Bedrock(bedrock::BedrockConfig),
    Local(local::LocalConfig),
}

impl ProviderConfig {
    /// Checks the fields and applies the provider's defaults.
    pub fn validate(self) -> Result<Arc<dyn ProviderSpec>, Invalid> {
        Ok(match self {
            ProviderConfig::Bedrock(config) => Arc::new(config.validate()?),
            ProviderConfig::Local(config) => Arc::new(config.validate()?),
        })
    }
}

/// A field of a model entry that its provider refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Where in the file; `None`: the entry as a whole (a field it lacks).
    pub span: Option<Range<usize>>,
    pub message: String,
}

impl Invalid {
    pub fn at(span: Range<usize>, message: impl Into<String>) -> Self {
        Invalid {
            span: Some(span),
            message: message.into(),
        }
    }

    pub fn entry(message: impl Into<String>) -> Self {
        Invalid {
            span: None,
            message: message.into(),
        }
    }
}

/// A model's provider, configured and validated: what `GET /models` shows of it, its
/// defaults, and how to start it.
#[async_trait]
pub trait ProviderSpec: fmt::Debug + Send + Sync {
    /// `provider` as the configuration writes it.
    fn kind(&self) -> &'static str;
    /// The upstream's name of the model: Bedrock's model id, a local model's file name.
    fn model_id(&self) -> String;
    /// The native body format.
    fn format(&self) -> &'static str;
    /// What the model's `max_tokens` and `max_tokens_limit` default to.
    fn default_limits(&self) -> DefaultLimits;
    /// Starts the provider (a local model loads in the background).
    async fn build(
        &self,
        name: &str,
        upstream: &UpstreamSettings,
        shared: &mut Shared,
    ) -> Arc<dyn Provider>;
    /// `modelgate pull`: fetches what the model needs on disk now and says where it is;
    /// `None` for a model with nothing to fetch.
    fn pull(&self, _name: &str) -> Option<Result<PathBuf, String>> {
        None
    }
}

/// The defaults a provider gives a model's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultLimits {
    pub default_max_tokens: u32,
    pub max_tokens_limit: u32,
}

/// What providers share, made once at start-up.
pub struct Shared {
    bedrock_clients: bedrock::ClientPool,
}

impl Shared {
    pub async fn load() -> Shared {
        Shared {
            bedrock_clients: bedrock::ClientPool::load().await,
        }
    }
}

/// How the gateway treats one model's upstream: timeouts, retries, concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// From sending the request to the first chunk, on every transport (`/invoke` too).
    pub first_token_timeout: Duration,
    /// Longest silence between two chunks.
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    /// Attempts of the SDK's retry (throttling, 5xx, connection errors) before an answer begins.
    pub max_attempts: u32,
    /// Upstream calls in flight to this model; beyond it requests get 503.
    pub max_concurrent: usize,
}

/// Whether a model serves requests, as `GET /models` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum)]
#[oai(rename_all = "lowercase")]
pub enum ModelState {
    /// Requests are served.
    Ready,
    /// A local model's weights are being fetched or loaded: requests get 503 `model_loading`.
    Loading,
    /// A local model could not be fetched or loaded: requests get 503 (`reason` says why).
    Failed,
    /// The gateway lacks what the upstream needs (AWS credentials): requests get 503
    /// `upstream_unavailable` (`reason` says why).
    Unavailable,
}

/// A model's state and, unless it is ready, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    pub state: ModelState,
    pub reason: Option<String>,
}

impl Availability {
    pub const READY: Availability = Availability {
        state: ModelState::Ready,
        reason: None,
    };
}

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

/// The tokens an answer has used so far, as its provider reports them when the answer
/// fails midway (a finished answer carries its [`Finish`]).
#[derive(Debug, Clone, Default)]
pub struct UsageMeter(Arc<Mutex<Usage>>);

impl UsageMeter {
    pub fn report(&self, usage: Usage) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = usage;
    }

    pub fn get(&self) -> Usage {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
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
    /// An answer that fails midway reports the tokens it used so far to `usage`; the
    /// gateway does the accounting.
    async fn stream(&self, request: ValidRequest, usage: UsageMeter) -> Result<ChunkStream>;

    /// The special tokens of the prompt this provider renders around user text, if it renders
    /// one. An error when they are not known yet (a local model still loading).
    fn special_tokens(&self) -> Result<Option<Arc<SpecialTokens>>> {
        Ok(None)
    }

    /// Whether requests can be served now, and if not why.
    fn availability(&self) -> Availability {
        Availability::READY
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
/// cannot be the start of a stop sequence, and the answer is cut before the first stop
/// sequence to be completed (of two completed together, the longer).
///
/// One Aho-Corasick automaton runs over the answer's bytes, its state kept between chunks:
/// each byte costs one transition (amortised), whatever the number and length of the
/// sequences, and the text held back is at most the longest sequence.
#[derive(Debug, Default)]
pub struct StopMatcher {
    /// Boxed: a decoder holds a matcher, used or not.
    automaton: Option<Box<StopAutomaton>>,
    held: String,
}

#[derive(Debug)]
struct StopAutomaton {
    nfa: NFA,
    /// Where the scan is: the longest tail of the text so far that begins a sequence.
    state: StateID,
    /// The length in bytes of that tail, for every state.
    depth: HashMap<StateID, usize>,
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
    /// A matcher for `sequences`, which validation bounds (see [`crate::request`]).
    pub fn new(sequences: Vec<String>) -> Self {
        if sequences.is_empty() {
            return Self::default();
        }
        let nfa = NFA::builder()
            .match_kind(MatchKind::Standard)
            .prefilter(false)
            .build(&sequences)
            // The automaton's limits are billions of states; validation allows 8 sequences
            // of 256 characters.
            .expect("validated stop sequences fit an automaton");
        let start = nfa
            .start_state(Anchored::No)
            .expect("an NFA supports unanchored searches");
        // Every state is a prefix of some sequence: walking each sequence from the start
        // visits them all, one byte deeper at each step.
        let mut depth = HashMap::from([(start, 0)]);
        for sequence in &sequences {
            let mut state = start;
            for (index, &byte) in sequence.as_bytes().iter().enumerate() {
                state = nfa.next_state(Anchored::No, state, byte);
                depth.insert(state, index + 1);
            }
        }
        Self {
            automaton: Some(Box::new(StopAutomaton {
                nfa,
                state: start,
                depth,
            })),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> StopScan {
        let Some(automaton) = &mut self.automaton else {
            return StopScan::Continue(text.to_owned());
        };
        for (index, &byte) in text.as_bytes().iter().enumerate() {
            automaton.state = automaton
                .nfa
                .next_state(Anchored::No, automaton.state, byte);
            if automaton.nfa.is_match(automaton.state) {
                let matched = automaton.longest_match();
                let mut before = std::mem::take(&mut self.held);
                // Both ends of a match are character boundaries: valid UTF-8 matched
                // against valid UTF-8 starts on a leading byte and ends where a
                // character does.
                before.push_str(&text[..=index]);
                before.truncate(before.len() - matched);
                return StopScan::Stop(before);
            }
        }
        self.held.push_str(text);
        // The held text is the state's tail, which starts on a character boundary too.
        let keep = automaton.depth.get(&automaton.state).copied().unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        StopScan::Continue(std::mem::replace(&mut self.held, rest))
    }

    /// The text still held back when the answer ends without a match.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

impl StopAutomaton {
    /// The length in bytes of the longest sequence that ends at the current (match) state.
    fn longest_match(&self) -> usize {
        (0..self.nfa.match_len(self.state))
            .map(|index| {
                self.nfa
                    .pattern_len(self.nfa.match_pattern(self.state, index))
            })
            .max()
            .unwrap_or(0)
    }
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
    fn stop_matcher_cuts_before_the_first_sequence_to_be_completed() {
        let mut matcher = StopMatcher::new(vec!["abcd".into(), "c".into(), "bc".into()]);
        assert_eq!(matcher.push("xab"), StopScan::Continue("x".into()));
        assert_eq!(matcher.push("cd"), StopScan::Stop("a".into()));
    }

    #[test]
    fn stop_matcher_holds_back_at_most_the_longest_sequence_on_adversarial_text() {
        // Sequences `a…ab` that every run of `a` keeps almost matching.
        let sequences: Vec<String> = (0..8)
            .map(|index| format!("{}{}", "a".repeat(255), char::from(b'b' + index)))
            .collect();
        let mut matcher = StopMatcher::new(sequences);
        let mut released = String::new();
        for _ in 0..20_000 {
            match matcher.push("a") {
                StopScan::Continue(text) => released.push_str(&text),
                StopScan::Stop(text) => panic!("no sequence was written, yet cut at {text:?}"),
            }
        }
        assert_eq!(released, "a".repeat(20_000 - 255));
        assert_eq!(
            matcher.push("ax"),
            StopScan::Continue("a".repeat(256) + "x")
        );
        assert_eq!(
            matcher.push(&"a".repeat(300)),
            StopScan::Continue("a".repeat(45))
        );
        assert_eq!(matcher.push("i!"), StopScan::Stop(String::new()));
    }

    #[test]
    fn no_sequences_passes_text_through() {
        let mut matcher = StopMatcher::default();
        assert_eq!(matcher.push("abc"), StopScan::Continue("abc".into()));
    }
}
