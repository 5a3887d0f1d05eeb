//! Stop sequences applied by the gateway, for models whose native API has none.

use std::collections::HashMap;

use aho_corasick::{
    Anchored, MatchKind,
    automaton::{Automaton, StateID},
    nfa::contiguous::NFA,
};

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
