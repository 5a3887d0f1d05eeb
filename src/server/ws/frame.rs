//! What a client's message asks for: a prompt, a cancel, or nothing (a ping, a pong), in
//! the connection's mode.

use std::fmt;

use serde::{
    Deserialize,
    de::{
        self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor,
        value::MapAccessDeserializer,
    },
};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    error::Error,
    request::GenerateRequest,
    resume::{EventId, StreamId},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain text in and out; the reply mirrors the prompt's frame type.
    Text,
    /// JSON request objects in, JSON `StreamEvent` frames out.
    Json,
}

/// How the reply to a prompt is framed.
#[derive(Debug, Clone, Copy)]
pub enum Framing {
    Text,
    Binary,
    Json,
}

/// What a client's message asks for.
pub enum Incoming {
    Prompt(Box<GenerateRequest>, Framing),
    Invalid(Error, Framing),
    Cancel,
    /// `{"type": "resume", "stream_id", "after"}`: the events of a resumable stream after
    /// `after`, then the rest.
    Resume(EventId),
    /// Pings and pongs: they only show that the client is there.
    Ignore,
    /// The client closed the connection.
    Closed,
}

impl Incoming {
    /// `message` read in `mode`; prompts without a model of their own are for `model`.
    pub fn of(message: Message, mode: Mode, model: &str) -> Incoming {
        let (text, framing) = match message {
            Message::Text(text) => (text.as_str().to_owned(), Framing::Text),
            Message::Binary(bytes) => match String::from_utf8(bytes.into()) {
                Ok(text) => (text, Framing::Binary),
                Err(_) => {
                    let err = Error::InvalidRequest("binary messages must hold UTF-8 text".into());
                    let framing = match mode {
                        Mode::Text => Framing::Binary,
                        Mode::Json => Framing::Json,
                    };
                    return Incoming::Invalid(err, framing);
                }
            },
            Message::Close(_) => return Incoming::Closed,
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => return Incoming::Ignore,
        };
        match mode {
            Mode::Text => Incoming::Prompt(Box::new(GenerateRequest::prompt(model, text)), framing),
            // Only a message that mentions it can be a resume: prompts are read once.
            Mode::Json if text.contains("\"resume\"") && is_resume(&text) => {
                match parse_resume(&text) {
                    Ok(after) => Incoming::Resume(after),
                    Err(err) => Incoming::Invalid(err, Framing::Json),
                }
            }
            Mode::Json => match parse_json(&text, model) {
                Ok(JsonFrame::Generate(request)) => Incoming::Prompt(request, Framing::Json),
                Ok(JsonFrame::Cancel) => Incoming::Cancel,
                Err(err) => Incoming::Invalid(
                    Error::InvalidRequest(format!("invalid request: {err}")),
                    Framing::Json,
                ),
            },
        }
    }

    /// How a reply to this message is framed, for the messages that get one.
    pub fn reply_framing(&self) -> Option<Framing> {
        match self {
            Incoming::Prompt(_, framing) | Incoming::Invalid(_, framing) => Some(*framing),
            Incoming::Resume(_) => Some(Framing::Json),
            _ => None,
        }
    }
}

/// A JSON-mode message.
#[derive(Debug)]
enum JsonFrame {
    Generate(Box<GenerateRequest>),
    Cancel,
}

/// The `type` of a JSON-mode message; a request object may leave it out.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum FrameType {
    Generate,
    Cancel,
}

/// Whether a JSON message's `type` is `resume`.
fn is_resume(text: &str) -> bool {
    #[derive(Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        frame_type: Option<&'a str>,
    }
    serde_json::from_str::<Typed>(text).is_ok_and(|typed| typed.frame_type == Some("resume"))
}

/// `{"type": "resume", "stream_id", "after"}`.
fn parse_resume(text: &str) -> Result<EventId, Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ResumeFrame {
        #[serde(rename = "type")]
        _type: String,
        stream_id: String,
        after: u64,
    }
    let frame: ResumeFrame = serde_json::from_str(text)
        .map_err(|err| Error::InvalidRequest(format!("invalid resume: {err}")))?;
    let stream = StreamId::parse(&frame.stream_id).ok_or_else(|| {
        Error::InvalidRequest(
            "invalid resume: `stream_id` is not a stream id of this gateway (32 hex digits)".into(),
        )
    })?;
    Ok(EventId {
        stream,
        seq: frame.after,
    })
}

/// Parses a message straight into a request, so that serde's errors name the field at
/// fault (missing, unknown, repeated) as they do for an HTTP body. On the way, `type` is
/// taken out and a request that names no `model` gets `model`.
fn parse_json(text: &str, model: &str) -> Result<JsonFrame, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let frame = FrameSeed { model }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(frame)
}

struct FrameSeed<'a> {
    model: &'a str,
}

impl<'de> DeserializeSeed<'de> for FrameSeed<'_> {
    type Value = JsonFrame;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<JsonFrame, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FrameSeed<'_> {
    type Value = JsonFrame;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(r#"a request object or {"type": "cancel"}"#)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<JsonFrame, A::Error> {
        let mut fields = FrameFields {
            map,
            model: self.model,
            frame_type: None,
            model_seen: false,
            giving_model: false,
        };
        let request = GenerateRequest::deserialize(MapAccessDeserializer::new(&mut fields))?;
        Ok(match fields.frame_type {
            Some(FrameType::Cancel) => JsonFrame::Cancel,
            Some(FrameType::Generate) | None => JsonFrame::Generate(Box::new(request)),
        })
    }
}

/// The message's fields as the request sees them: without `type`, and with `model` added
/// at the end when the message has none.
struct FrameFields<'a, A> {
    map: A,
    model: &'a str,
    frame_type: Option<FrameType>,
    model_seen: bool,
    /// The added `model` key was handed out; its value comes next.
    giving_model: bool,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for FrameFields<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        loop {
            let Some(key) = self.map.next_key::<String>()? else {
                if self.model_seen {
                    return Ok(None);
                }
                self.model_seen = true;
                self.giving_model = true;
                return seed.deserialize("model".into_deserializer()).map(Some);
            };
            if key != "type" {
                self.model_seen |= key == "model";
                return seed.deserialize(key.into_deserializer()).map(Some);
            }
            if self.frame_type.is_some() {
                return Err(de::Error::duplicate_field("type"));
            }
            self.frame_type = Some(self.map.next_value()?);
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        if std::mem::take(&mut self.giving_model) {
            return seed.deserialize(self.model.into_deserializer());
        }
        self.map.next_value_seed(seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> GenerateRequest {
        match parse_json(text, "url-model") {
            Ok(JsonFrame::Generate(request)) => *request,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn error(text: &str) -> String {
        parse_json(text, "url-model").unwrap_err().to_string()
    }

    #[test]
    fn a_request_gets_the_urls_model_unless_it_names_one() {
        let plain = request(r#"{"prompt": "hi", "max_tokens": 5}"#);
        assert_eq!(plain.model, "url-model");
        assert_eq!(plain.prompt.as_deref(), Some("hi"));
        assert_eq!(plain.max_tokens, Some(5));
        let typed = request(r#"{"model": "other", "type": "generate", "prompt": "hi"}"#);
        assert_eq!(typed.model, "other");
    }

    #[test]
    fn cancel_is_a_frame_of_its_own() {
        assert!(matches!(
            parse_json(r#"{"type": "cancel"}"#, "m"),
            Ok(JsonFrame::Cancel)
        ));
    }

    #[test]
    fn repeated_unknown_and_mistyped_fields_are_named() {
        for (text, named) in [
            (
                r#"{"prompt": "a", "prompt": "b"}"#,
                "duplicate field `prompt`",
            ),
            (
                r#"{"model": "a", "model": "b", "prompt": "c"}"#,
                "duplicate field `model`",
            ),
            (
                r#"{"type": "cancel", "type": "cancel"}"#,
                "duplicate field `type`",
            ),
            (
                r#"{"prompt": "a", "max_token": 3}"#,
                "unknown field `max_token`",
            ),
            (r#"{"type": "stop"}"#, "unknown variant `stop`"),
            (r#"{"prompt": 3}"#, "invalid type: integer `3`"),
        ] {
            let message = error(text);
            assert!(message.contains(named), "{text}: {message}");
        }
    }

    #[test]
    fn resume_is_a_frame_of_its_own_with_a_stream_id_and_a_number() {
        let stream = StreamId::new();
        let frame = format!(r#"{{"type": "resume", "stream_id": "{stream}", "after": 4}}"#);
        assert!(matches!(
            Incoming::of(Message::text(frame), Mode::Json, "m"),
            Incoming::Resume(EventId { seq: 4, .. })
        ));
        for bad in [
            r#"{"type": "resume", "stream_id": "nope", "after": 4}"#,
            r#"{"type": "resume", "after": 4}"#,
        ] {
            assert!(matches!(
                Incoming::of(Message::text(bad), Mode::Json, "m"),
                Incoming::Invalid(..)
            ));
        }
        let prompt = r#"{"prompt": "say \"resume\""}"#;
        assert!(matches!(
            Incoming::of(Message::text(prompt), Mode::Json, "m"),
            Incoming::Prompt(..)
        ));
    }

    #[test]
    fn anything_but_one_object_is_refused() {
        for text in ["not json", "[1]", r#""hi""#, r#"{"prompt": "a"} {}"#] {
            assert!(parse_json(text, "m").is_err(), "{text}");
        }
    }
}
