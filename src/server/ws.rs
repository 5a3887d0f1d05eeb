//! `/ws/model`: the tutorial-compatible text mode (each text message is a prompt) and the
//! JSON mode for chat front ends (subprotocol `modelgate.v1` or `format=json`).

use std::{borrow::Cow, collections::VecDeque, sync::Arc};

use futures_util::{SinkExt, StreamExt};
use poem::{
    IntoResponse, Request, handler,
    web::{
        Data, Query,
        websocket::{CloseCode, Message, WebSocket, WebSocketConfig, WebSocketStream},
    },
};
use serde::Deserialize;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{AppState, connection::ClientGone, events::StreamEvent};
use crate::{
    auth::{Caller, WS_PROTOCOL_PREFIX},
    error::{Error, Result},
    gateway::Gateway,
    generation::{Generation, Transport},
    provider::Chunk,
    request::GenerateRequest,
    telemetry::RequestNote,
};

pub const JSON_SUBPROTOCOL: &str = "modelgate.v1";
/// Initial read buffer of a WebSocket connection.
const READ_BUFFER: usize = 4096;
/// Prompts a client may send ahead while one is being answered; more is refused.
const MAX_QUEUED_PROMPTS: usize = 16;

#[derive(Deserialize)]
pub struct WsParams {
    model: Option<String>,
    streaming: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Plain text in and out; the reply mirrors the prompt's frame type.
    Text,
    /// JSON request objects in, JSON `StreamEvent` frames out.
    Json,
}

#[handler]
pub async fn ws_model(
    request: &Request,
    ws: WebSocket,
    Query(params): Query<WsParams>,
    Data(state): Data<&Arc<AppState>>,
) -> Result<impl IntoResponse> {
    // The browser origin was checked for every route in `app()`.
    let caller = state.gateway.auth.authenticate(request)?;
    let model = params.model.ok_or_else(|| {
        Error::InvalidRequest(
            "the `model` query parameter is required, e.g. /ws/model?model=llama3".into(),
        )
    })?;
    state.gateway.registry.get(&model)?;
    if let Some(note) = RequestNote::of(request) {
        note.model(&model);
    }
    let offered: Vec<&str> = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    let mode = match params.format.as_deref() {
        None | Some("text") if !offered.contains(&JSON_SUBPROTOCOL) => Mode::Text,
        None | Some("json") | Some("text") => Mode::Json,
        Some(other) => {
            return Err(Error::InvalidRequest(format!(
                "`format` must be `text` or `json`, got `{other}`"
            )));
        }
    };
    // The JSON mode streams unless told not to; the tutorial's text mode sends one message
    // per answer unless told to stream.
    let streaming = match params.streaming.as_deref() {
        None => mode == Mode::Json,
        Some("1" | "true" | "yes") => true,
        Some("0" | "false" | "no") => false,
        Some(other) => {
            return Err(Error::InvalidRequest(format!(
                "`streaming` must be 1, true, yes, 0, false or no, got `{other}`"
            )));
        }
    };
    // Browsers fail a handshake whose answer names none of the subprotocols they offered,
    // so a client that offers only its key gets that protocol back.
    let mut protocols = vec![Cow::Borrowed(JSON_SUBPROTOCOL)];
    protocols.extend(
        offered
            .iter()
            .find(|protocol| protocol.starts_with(WS_PROTOCOL_PREFIX))
            .map(|protocol| Cow::Owned(protocol.to_string())),
    );
    let limit = state.gateway.settings.ws_max_message_bytes;
    let session = Session {
        gateway: state.gateway.clone(),
        caller,
        client_gone: ClientGone::of(request),
        model,
        mode,
        streaming,
        max_message_bytes: limit,
    };
    Ok(ws
        .protocols(protocols)
        // tungstenite's own limit only bounds memory; the session closes with 1009 at `limit`.
        // Its default 128 KiB read buffer is allocated and zeroed per connection up front;
        // prompts are small (the buffer grows for a larger one) and idle connections many.
        .config(
            WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER)
                .max_message_size(Some(limit.saturating_mul(2)))
                .max_frame_size(Some(limit.saturating_mul(2))),
        )
        .on_upgrade(move |socket| {
            let work = session.gateway.shutdown.work.clone();
            work.track_future(session.run(socket))
        }))
}

struct Session {
    gateway: Arc<Gateway>,
    caller: Caller,
    /// The connection's token: while the session waits for a model's first token it does
    /// not read the socket, so this is how it learns the client left.
    client_gone: CancellationToken,
    /// The model named in the URL; JSON requests may name another.
    model: String,
    mode: Mode,
    streaming: bool,
    max_message_bytes: usize,
}

/// How the current prompt's reply is framed.
#[derive(Debug, Clone, Copy)]
enum Framing {
    Text,
    Binary,
    Json,
}

/// What a client's message asks for.
enum Incoming {
    Prompt(GenerateRequest, Framing),
    Invalid(Error, Framing),
    Cancel,
    Ignore,
    TooLarge,
    Closed,
}

impl Incoming {
    /// How a reply to this message is framed, for the messages that get one.
    fn reply_framing(&self) -> Option<Framing> {
        match self {
            Incoming::Prompt(_, framing) | Incoming::Invalid(_, framing) => Some(*framing),
            _ => None,
        }
    }
}

enum Forwarded {
    Finished,
    ClientGone,
}

impl Session {
    async fn run(self, socket: WebSocketStream) {
        let (mut sink, mut incoming) = socket.split();
        let mut queued: VecDeque<Incoming> = VecDeque::new();
        loop {
            let next = match queued.pop_front() {
                Some(next) => next,
                None => tokio::select! {
                    message = incoming.next() => match message {
                        Some(Ok(message)) => self.interpret(message),
                        _ => return,
                    },
                    _ = self.gateway.shutdown.draining.cancelled() => break,
                },
            };
            let outcome = match next {
                Incoming::Prompt(request, framing) => {
                    let span = tracing::info_span!(
                        "ws_prompt",
                        request_id = %uuid::Uuid::new_v4(),
                        model = %request.model,
                        key = self.caller.id(),
                    );
                    async {
                        match self.start(request).await {
                            Ok(generation) => {
                                self.forward(
                                    generation,
                                    framing,
                                    &mut sink,
                                    &mut incoming,
                                    &mut queued,
                                )
                                .await
                            }
                            Err(err) => send(&mut sink, StreamEvent::from(&err), framing).await,
                        }
                    }
                    .instrument(span)
                    .await
                }
                Incoming::Invalid(err, framing) => {
                    send(&mut sink, StreamEvent::from(&err), framing).await
                }
                Incoming::Cancel | Incoming::Ignore => Forwarded::Finished,
                Incoming::TooLarge => {
                    let _ = sink
                        .send(Message::close_with(
                            CloseCode::Size,
                            format!("messages are limited to {} bytes", self.max_message_bytes),
                        ))
                        .await;
                    return;
                }
                Incoming::Closed => Forwarded::ClientGone,
            };
            if let Forwarded::ClientGone = outcome {
                return;
            }
            if self.gateway.shutdown.draining.is_cancelled() {
                break;
            }
        }
        let _ = sink
            .send(Message::close_with(CloseCode::Away, "shutting_down"))
            .await;
    }

    async fn start(&self, request: GenerateRequest) -> Result<Generation> {
        let generation = self
            .gateway
            .stream(
                request,
                &self.caller,
                Transport::WebSocket,
                &self.client_gone,
            )
            .await;
        if let Err(err) = &generation {
            tracing::info!(code = err.code(), "prompt refused: {err}");
        }
        generation
    }

    fn interpret(&self, message: Message) -> Incoming {
        let size = match &message {
            Message::Text(text) => text.len(),
            Message::Binary(bytes) => bytes.len(),
            _ => 0,
        };
        if size > self.max_message_bytes {
            return Incoming::TooLarge;
        }
        let (text, framing) = match message {
            Message::Text(text) => (text, Framing::Text),
            Message::Binary(bytes) => match String::from_utf8(bytes) {
                Ok(text) => (text, Framing::Binary),
                Err(_) => {
                    let err = Error::InvalidRequest("binary messages must hold UTF-8 text".into());
                    return Incoming::Invalid(err, self.reply_framing(Framing::Binary));
                }
            },
            Message::Close(_) => return Incoming::Closed,
            Message::Ping(_) | Message::Pong(_) => return Incoming::Ignore,
        };
        match self.mode {
            Mode::Text => Incoming::Prompt(GenerateRequest::prompt(&self.model, text), framing),
            Mode::Json => match self.parse_json_frame(&text) {
                Ok(Some(request)) => Incoming::Prompt(request, Framing::Json),
                Ok(None) => Incoming::Cancel,
                Err(err) => Incoming::Invalid(err, Framing::Json),
            },
        }
    }

    fn reply_framing(&self, prompt: Framing) -> Framing {
        match self.mode {
            Mode::Text => prompt,
            Mode::Json => Framing::Json,
        }
    }

    /// A request object, or `None` for `{"type": "cancel"}`.
    fn parse_json_frame(&self, text: &str) -> Result<Option<GenerateRequest>> {
        let invalid = Error::InvalidRequest;
        let mut value: serde_json::Value = serde_json::from_str(text)
            .map_err(|err| invalid(format!("the message is not JSON: {err}")))?;
        let object = value
            .as_object_mut()
            .ok_or_else(|| invalid("the message must be a JSON object".into()))?;
        match object.remove("type") {
            None => {}
            Some(serde_json::Value::String(kind)) if kind == "cancel" => return Ok(None),
            Some(serde_json::Value::String(kind)) if kind == "generate" => {}
            Some(other) => {
                return Err(invalid(format!(
                    "unknown message type {other}: send a request object or {{\"type\":\"cancel\"}}"
                )));
            }
        }
        object
            .entry("model")
            .or_insert_with(|| serde_json::Value::String(self.model.clone()));
        serde_json::from_value(value)
            .map(Some)
            .map_err(|err| invalid(format!("invalid request: {err}")))
    }

    /// Sends one answer while watching the socket: a close ends everything (and drops the
    /// upstream call), a cancel ends this answer, further prompts wait their turn.
    async fn forward(
        &self,
        mut chunks: Generation,
        framing: Framing,
        sink: &mut Sink,
        incoming: &mut Incomings,
        queued: &mut VecDeque<Incoming>,
    ) -> Forwarded {
        let mut whole = String::new();
        loop {
            tokio::select! {
                item = chunks.next() => {
                    let Some(item) = item else { return Forwarded::Finished };
                    let sent = match item {
                        Ok(Chunk::Text(text)) if !self.streaming => {
                            whole.push_str(&text);
                            continue;
                        }
                        Ok(Chunk::Done(finish)) if !self.streaming => {
                            let piece = StreamEvent::from(Ok(Chunk::Text(std::mem::take(&mut whole))));
                            match send(sink, piece, framing).await {
                                Forwarded::Finished => send(sink, StreamEvent::from(Ok(Chunk::Done(finish))), framing).await,
                                gone => gone,
                            }
                        }
                        item => {
                            let last = !matches!(item, Ok(Chunk::Text(_)));
                            match send(sink, StreamEvent::from(item), framing).await {
                                Forwarded::Finished if !last => continue,
                                outcome => outcome,
                            }
                        }
                    };
                    return sent;
                }
                message = incoming.next() => {
                    let Some(Ok(message)) = message else { return Forwarded::ClientGone };
                    match self.interpret(message) {
                        Incoming::Cancel => {
                            chunks.cancel();
                            return send(sink, StreamEvent::cancelled(), framing).await;
                        }
                        Incoming::Closed => return Forwarded::ClientGone,
                        Incoming::TooLarge => {
                            queued.push_front(Incoming::TooLarge);
                            return Forwarded::Finished;
                        }
                        Incoming::Ignore => {}
                        next if queued.len() >= MAX_QUEUED_PROMPTS => {
                            let err = Error::RateLimited(format!(
                                "more than {MAX_QUEUED_PROMPTS} prompts are waiting on this connection; wait for the answers"
                            ), 1);
                            let framing = next.reply_framing().unwrap_or(framing);
                            if let Forwarded::ClientGone = send(sink, StreamEvent::from(&err), framing).await {
                                return Forwarded::ClientGone;
                            }
                        }
                        next => queued.push_back(next),
                    }
                }
            }
        }
    }
}

type Sink = futures_util::stream::SplitSink<WebSocketStream, Message>;
type Incomings = futures_util::stream::SplitStream<WebSocketStream>;

/// Sends one event in the connection's framing. The tutorial's text mode has no end marker
/// (`done` sends nothing) and reports errors as a message beginning `error: `.
async fn send(sink: &mut Sink, event: StreamEvent, framing: Framing) -> Forwarded {
    let message = match (framing, event) {
        (Framing::Json, event) => Message::Text(event.json()),
        (_, StreamEvent::Done(_)) => return Forwarded::Finished,
        (Framing::Text, StreamEvent::Chunk(piece)) => Message::Text(piece.text),
        (Framing::Binary, StreamEvent::Chunk(piece)) => Message::Binary(piece.text.into_bytes()),
        (Framing::Text, StreamEvent::Error(body)) => {
            Message::Text(format!("error: {}", body.error.message))
        }
        (Framing::Binary, StreamEvent::Error(body)) => {
            Message::Binary(format!("error: {}", body.error.message).into_bytes())
        }
    };
    match sink.send(message).await {
        Ok(()) => Forwarded::Finished,
        Err(_) => Forwarded::ClientGone,
    }
}
