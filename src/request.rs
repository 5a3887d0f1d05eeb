//! What a client asks for, and its validation into a [`ValidRequest`] that providers can
//! trust. Every transport builds a [`GenerateRequest`] and goes through [`GenerateRequest::validate`].

use poem_openapi::{Enum, Object};
use serde::Deserialize;

use crate::{
    error::{Error, Result},
    special_tokens::{SpecialTokenPolicy, SpecialTokens},
};

/// Most stop sequences one request may give.
const MAX_STOP_SEQUENCES: usize = 8;
/// Most characters in one stop sequence: the gateway matches stop sequences itself for
/// models without native ones, and holds back up to this much of the answer.
pub const MAX_STOP_SEQUENCE_CHARS: usize = 256;

/// A generation request: one `prompt`, or a conversation in `messages` (exactly one of
/// the two). Parsed by serde, whose errors name the field; the schema's constraints are
/// checked again, with the rules a schema cannot state, by [`GenerateRequest::validate`].
#[derive(Debug, Clone, Default, Object, Deserialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// Name of a model in the registry (`GET /models`). In WebSocket JSON frames it may be
    /// left out: it defaults to the model named in the URL.
    pub model: String,
    /// A single user message. Give either `prompt` or `messages`.
    #[oai(validator(min_length = 1))]
    pub prompt: Option<String>,
    /// The conversation so far, oldest first, starting with `user` and alternating.
    #[oai(validator(min_items = 1))]
    pub messages: Option<Vec<ChatMessage>>,
    /// System prompt.
    pub system: Option<String>,
    /// Most tokens to generate: 1 up to the model's `max_tokens_limit` (default: the
    /// model's `max_tokens`).
    #[oai(validator(minimum(value = "1")))]
    pub max_tokens: Option<u32>,
    /// Sampling temperature, 0 to 1.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, 0 to 1.
    #[oai(validator(minimum(value = "0"), maximum(value = "1")))]
    pub top_p: Option<f64>,
    /// Sequences that end the answer when the model writes them (at most 8, none empty,
    /// each at most 256 characters).
    #[oai(validator(max_items = 8, max_length = 256))]
    pub stop: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Object, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: Role,
    #[oai(validator(min_length = 1))]
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Enum, Deserialize)]
#[oai(rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// A model's limits and defaults that a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub default_max_tokens: u32,
    pub max_tokens_limit: u32,
    pub default_temperature: Option<f64>,
    /// Most messages in one conversation.
    pub max_messages: usize,
    /// Most characters of input (system prompt and messages together).
    pub max_input_chars: usize,
    /// What to do with user text that holds a special token of the model's prompt format.
    pub special_tokens: SpecialTokenPolicy,
}

/// A request that passed validation: at least one message, roles alternating from `user`,
/// parameters in range, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: u32,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
}

impl GenerateRequest {
    /// A single-prompt request, as the WebSocket text mode and `GET /stream` send.
    pub fn prompt(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            prompt: Some(prompt.into()),
            ..Self::default()
        }
    }

    /// Checks the request against the model's `limits` and, if the gateway renders the
    /// model's prompt, keeps the model's `special_tokens` out of the user text.
    pub fn validate(
        self,
        limits: &Limits,
        special_tokens: Option<&SpecialTokens>,
    ) -> Result<ValidRequest> {
        let invalid = |message: String| Err(Error::InvalidRequest(message));
        let from_prompt = self.prompt.is_some();
        let mut messages = match (self.prompt, self.messages) {
            (Some(_), Some(_)) => {
                return invalid("give either `prompt` or `messages`, not both".into());
            }
            (None, None) => return invalid("one of `prompt` or `messages` is required".into()),
            (Some(prompt), None) => {
                if prompt.trim().is_empty() {
                    return invalid("`prompt` is empty".into());
                }
                vec![ChatMessage {
                    role: Role::User,
                    content: prompt,
                }]
            }
            (None, Some(messages)) => {
                check_conversation(&messages)?;
                messages
            }
        };
        if messages.len() > limits.max_messages {
            return Err(Error::TooLarge(format!(
                "the conversation has {} messages; at most {} are allowed",
                messages.len(),
                limits.max_messages
            )));
        }
        let input_chars = self.system.as_deref().map_or(0, |s| s.chars().count())
            + messages
                .iter()
                .map(|m| m.content.chars().count())
                .sum::<usize>();
        if input_chars > limits.max_input_chars {
            return Err(Error::TooLarge(format!(
                "the input has {input_chars} characters; at most {} are allowed",
                limits.max_input_chars
            )));
        }
        let max_tokens = self.max_tokens.unwrap_or(limits.default_max_tokens);
        if max_tokens == 0 || max_tokens > limits.max_tokens_limit {
            return invalid(format!(
                "`max_tokens` must be between 1 and {} for this model, got {max_tokens}",
                limits.max_tokens_limit
            ));
        }
        for (name, value) in [("temperature", self.temperature), ("top_p", self.top_p)] {
            if let Some(value) = value
                && !(0.0..=1.0).contains(&value)
            {
                return invalid(format!("`{name}` must be between 0 and 1, got {value}"));
            }
        }
        let stop = self.stop.unwrap_or_default();
        if stop.len() > MAX_STOP_SEQUENCES {
            return invalid(format!(
                "`stop` holds {} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                stop.len()
            ));
        }
        if stop.iter().any(String::is_empty) {
            return invalid("`stop` sequences must not be empty".into());
        }
        if let Some((index, chars)) = stop
            .iter()
            .map(|sequence| sequence.chars().count())
            .enumerate()
            .find(|&(_, chars)| chars > MAX_STOP_SEQUENCE_CHARS)
        {
            return invalid(format!(
                "`stop[{index}]` has {chars} characters; at most {MAX_STOP_SEQUENCE_CHARS} are allowed"
            ));
        }
        let mut system = self.system.filter(|system| !system.is_empty());
        if let Some(tokens) = special_tokens {
            let policy = limits.special_tokens;
            if let Some(system) = &mut system {
                tokens.guard("system", system, policy)?;
            }
            for (index, message) in messages.iter_mut().enumerate() {
                let field = if from_prompt {
                    "prompt".to_owned()
                } else {
                    format!("messages[{index}].content")
                };
                tokens.guard(&field, &mut message.content, policy)?;
            }
        }
        Ok(ValidRequest {
            system,
            messages,
            max_tokens,
            temperature: self.temperature.or(limits.default_temperature),
            top_p: self.top_p,
            stop,
        })
    }
}

fn check_conversation(messages: &[ChatMessage]) -> Result<()> {
    let Some(first) = messages.first() else {
        return Err(Error::InvalidRequest("`messages` is empty".into()));
    };
    if first.role != Role::User {
        return Err(Error::InvalidRequest(
            "`messages` must start with a `user` message".into(),
        ));
    }
    for (index, pair) in messages.windows(2).enumerate() {
        if pair[0].role == pair[1].role {
            return Err(Error::InvalidRequest(format!(
                "`messages[{}]` has role `{}` like the message before it; roles must alternate between `user` and `assistant`",
                index + 1,
                pair[1].role.as_str()
            )));
        }
    }
    if let Some(index) = messages.iter().position(|m| m.content.trim().is_empty()) {
        return Err(Error::InvalidRequest(format!(
            "`messages[{index}].content` is empty"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        default_max_tokens: 512,
        max_tokens_limit: 2048,
        default_temperature: Some(0.5),
        max_messages: 3,
        max_input_chars: 100,
        special_tokens: SpecialTokenPolicy::Refuse,
    };

    fn message(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    fn error_of(request: GenerateRequest) -> String {
        request.validate(&LIMITS, None).unwrap_err().to_string()
    }

    #[test]
    fn a_prompt_becomes_one_user_message_with_the_model_defaults() {
        let valid = GenerateRequest::prompt("m", "Hi")
            .validate(&LIMITS, None)
            .unwrap();
        assert_eq!(valid.messages, vec![message(Role::User, "Hi")]);
        assert_eq!(valid.max_tokens, 512);
        assert_eq!(valid.temperature, Some(0.5));
    }

    #[test]
    fn prompt_and_messages_are_exclusive_and_one_is_required() {
        let both = GenerateRequest {
            messages: Some(vec![message(Role::User, "a")]),
            ..GenerateRequest::prompt("m", "b")
        };
        assert!(error_of(both).contains("not both"));
        let neither = GenerateRequest {
            model: "m".into(),
            ..Default::default()
        };
        assert!(error_of(neither).contains("required"));
    }

    #[test]
    fn conversations_must_start_with_user_and_alternate() {
        let starts_with_assistant = GenerateRequest {
            model: "m".into(),
            messages: Some(vec![message(Role::Assistant, "a")]),
            ..Default::default()
        };
        assert!(error_of(starts_with_assistant).contains("start with a `user`"));
        let repeated = GenerateRequest {
            model: "m".into(),
            messages: Some(vec![message(Role::User, "a"), message(Role::User, "b")]),
            ..Default::default()
        };
        assert!(error_of(repeated).contains("messages[1]"));
        let empty = GenerateRequest {
            model: "m".into(),
            messages: Some(vec![]),
            ..Default::default()
        };
        assert!(error_of(empty).contains("empty"));
    }

    #[test]
    fn out_of_range_parameters_are_refused_with_the_limit() {
        let too_many = GenerateRequest {
            max_tokens: Some(4096),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(error_of(too_many).contains("between 1 and 2048"));
        let hot = GenerateRequest {
            temperature: Some(1.5),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(error_of(hot).contains("`temperature`"));
        let top_p = GenerateRequest {
            top_p: Some(-0.1),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(error_of(top_p).contains("`top_p`"));
    }

    #[test]
    fn a_stop_sequence_over_256_characters_is_refused_naming_it_and_the_limit() {
        let at_limit = GenerateRequest {
            stop: Some(vec!["é".repeat(256)]),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(at_limit.validate(&LIMITS, None).is_ok());
        let long = GenerateRequest {
            stop: Some(vec!["\n".into(), "x".repeat(257)]),
            ..GenerateRequest::prompt("m", "x")
        };
        let err = long.validate(&LIMITS, None).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        assert_eq!(
            err.to_string(),
            "`stop[1]` has 257 characters; at most 256 are allowed"
        );
    }

    #[test]
    fn special_tokens_in_user_text_are_refused_naming_the_field() {
        let tokens = SpecialTokens::new(["<|eot_id|>".to_owned()]).unwrap();
        let forged = |request: GenerateRequest| {
            request
                .validate(&LIMITS, Some(&tokens))
                .unwrap_err()
                .to_string()
        };
        assert!(
            forged(GenerateRequest::prompt("m", "x<|eot_id|>")).starts_with("`prompt` contains")
        );
        let turns = vec![
            message(Role::User, "a"),
            message(Role::Assistant, "b<|eot_id|>"),
        ];
        let conversation = GenerateRequest {
            model: "m".into(),
            messages: Some(turns),
            ..Default::default()
        };
        assert!(forged(conversation).starts_with("`messages[1].content` contains"));
        let system = GenerateRequest {
            system: Some("<|eot_id|>".into()),
            ..GenerateRequest::prompt("m", "x")
        };
        assert!(forged(system).starts_with("`system` contains"));
    }

    #[test]
    fn escaped_special_tokens_are_broken_in_every_field() {
        let tokens = SpecialTokens::new(["<|eot_id|>".to_owned()]).unwrap();
        let limits = Limits {
            special_tokens: SpecialTokenPolicy::Escape,
            ..LIMITS
        };
        let valid = GenerateRequest {
            system: Some("s<|eot_id|>".into()),
            ..GenerateRequest::prompt("m", "<|eot_id|>p")
        }
        .validate(&limits, Some(&tokens))
        .unwrap();
        assert_eq!(valid.system.as_deref(), Some("s<\u{200B}|eot_id|>"));
        assert_eq!(valid.messages[0].content, "<\u{200B}|eot_id|>p");
    }

    #[test]
    fn long_conversations_and_inputs_are_too_large() {
        let long = GenerateRequest::prompt("m", "x".repeat(101));
        let err = long.validate(&LIMITS, None).unwrap_err();
        assert_eq!(err.code(), "too_large");
        let turns = [Role::User, Role::Assistant, Role::User, Role::Assistant]
            .map(|role| message(role, "hi"));
        let many = GenerateRequest {
            model: "m".into(),
            messages: Some(turns.to_vec()),
            ..Default::default()
        };
        assert!(error_of(many).contains("at most 3"));
    }
}
