//! `/ws/model`: the tutorial-compatible text mode (each text message is a prompt) and the
//! JSON mode for chat front ends (subprotocol `modelgate.v1` or `format=json`).
//!
//! The session speaks tungstenite directly (poem's wrapper turns its errors into strings),
//! so that each way a connection can fail closes it with its own code: 1009 for a message
//! over `ws_max_message_bytes`, 1002 for a protocol violation, 1007 for a text message that
//! is not UTF-8, 1001 when the gateway drains or the client stayed silent too long.

mod frame;
mod queue;

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use poem::{
    EndpointExt, Request, Response,
    endpoint::BoxEndpoint,
    get, handler,
    http::{self, HeaderValue, StatusCode, header},
    web::{Data, Query},
};
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Bytes, Message,
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use self::{
    frame::{Framing, Incoming, Mode},
    queue::Queue,
};
use super::{
    AppState,
    connection::ClientGone,
    events::{StreamEvent, TextPiece},
};
use crate::{
    auth::Caller,
    error::{Error, Result},
    gateway::Gateway,
    generation::{Generation, Transport},
    provider::Chunk,
    request::GenerateRequest,
    resume::{Event, EventId, Listening, Resumed},
    telemetry::RequestNote,
};

pub const JSON_SUBPROTOCOL: &str = "modelgate.v1";
/// Initial read buffer of a WebSocket connection. tungstenite's default of 128 KiB is
/// allocated and zeroed per connection up front; prompts are small (the buffer grows for a
/// larger one) and idle connections many.
const READ_BUFFER: usize = 4096;
/// How long the gateway tries to close a connection cleanly: to deliver its close frame,
/// and to read (and discard) what the client still sends until it closes its side, so that
/// unread bytes do not turn the close into a reset that loses the close frame.
const CLOSING_TIME: Duration = Duration::from_secs(2);
/// Client-supplied text in a log line is cut to this many characters.
const LOGGED_CHARS: usize = 100;

type Socket = WebSocketStream<poem::Upgraded>;

#[derive(Deserialize)]
pub struct WsParams {
    model: Option<String>,
    streaming: Option<Streaming>,
    format: Option<Format>,
}

/// `streaming=`, as the tutorial's client writes it.
#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
enum Streaming {
    #[serde(rename = "1", alias = "true", alias = "yes")]
    On,
    #[serde(rename = "0", alias = "false", alias = "no")]
    Off,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Format {
    Text,
    Json,
}

/// `GET /ws/model`, as the route table mounts it.
pub fn endpoint() -> BoxEndpoint<'static> {
    get(ws_model).boxed()
}

#[handler]
async fn ws_model(
    request: &Request,
    params: poem::Result<Query<WsParams>>,
    Data(state): Data<&Arc<AppState>>,
    Data(caller): Data<&Caller>,
) -> Result<Response> {
    // The browser origin and the key were checked for every route in `app()`.
    let gateway = &state.gateway;
    let accepted = accept(request)?;
    if gateway.shutdown.draining.is_cancelled() {
        return Err(Error::ShuttingDown);
    }
    let Query(params) =
        params.map_err(|err| Error::InvalidRequest(format!("invalid query parameter: {err}")))?;
    let model = params.model.ok_or_else(|| {
        Error::InvalidRequest(
            "the `model` query parameter is required, e.g. /ws/model?model=llama3".into(),
        )
    })?;
    let known = gateway.registry.get(&model);
    if let Some(note) = RequestNote::of(request) {
        note.model(&model, known.is_ok());
    }
    known?;
    let json_offered = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|protocol| protocol.trim() == JSON_SUBPROTOCOL);
    let mode = match params.format {
        Some(Format::Json) => Mode::Json,
        None | Some(Format::Text) if json_offered => Mode::Json,
        None | Some(Format::Text) => Mode::Text,
    };
    // The JSON mode streams unless told not to; the tutorial's text mode sends one message
    // per answer unless told to stream.
    let streaming = params
        .streaming
        .map_or(mode == Mode::Json, |flag| flag == Streaming::On);
    let upgrade = request
        .take_upgrade()
        .map_err(|err| Error::InvalidRequest(format!("cannot upgrade the connection: {err}")))?;
    let limit = gateway.settings.ws_max_message_bytes;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let session = Session {
        gateway: gateway.clone(),
        caller: caller.clone(),
        client_gone: ClientGone::of(request),
        model,
        mode,
        streaming,
    };
    let work = gateway.shutdown.work.clone();
    tokio::spawn(work.track_future(async move {
        if let Ok(upgraded) = upgrade.await {
            let socket = WebSocketStream::from_raw_socket(upgraded, Role::Server, Some(config));
            session.run(socket.await).await;
        }
    }));
    Ok(switching_protocols(accepted, json_offered))
}

/// Checks the handshake and computes the accept key (tungstenite's checks: GET, HTTP/1.1,
/// `Upgrade`, `Connection`, version 13, a key).
fn accept(request: &Request) -> Result<http::Response<()>> {
    let mut handshake = http::Request::new(());
    *handshake.method_mut() = request.method().clone();
    *handshake.version_mut() = request.version();
    *handshake.headers_mut() = request.headers().clone();
    tungstenite::handshake::server::create_response(&handshake)
        .map_err(|err| Error::InvalidRequest(format!("not a WebSocket handshake: {err}")))
}

/// The 101 answer. Only `modelgate.v1` is ever selected: echoing `bearer.<key>` would put
/// the key in the logs of every proxy and browser tool on the way.
fn switching_protocols(accepted: http::Response<()>, json_offered: bool) -> Response {
    let (parts, ()) = accepted.into_parts();
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .finish();
    *response.headers_mut() = parts.headers;
    if json_offered {
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(JSON_SUBPROTOCOL),
        );
    }
    response
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
}

/// Why a session ends.
enum Ending {
    /// The connection failed or was dropped.
    Gone,
    /// The client sent a close frame; the reply is on its way.
    ClientClosed,
    /// The gateway closes the connection.
    Close(CloseCode, &'static str),
}

impl From<tungstenite::Error> for Ending {
    fn from(err: tungstenite::Error) -> Self {
        use tungstenite::Error as Ws;
        match err {
            Ws::Capacity(_) => Ending::Close(CloseCode::Size, "message too large"),
            Ws::Protocol(_) => Ending::Close(CloseCode::Protocol, "protocol violation"),
            Ws::Utf8(_) => Ending::Close(CloseCode::Invalid, "text message is not UTF-8"),
            _ => Ending::Gone,
        }
    }
}

impl Session {
    async fn run(self, mut socket: Socket) {
        let mut queue = Queue::new(self.gateway.settings.ws);
        let ending = loop {
            if let Err(ending) = self.step(&mut socket, &mut queue).await {
                break ending;
            }
        };
        drop(queue);
        close(socket, ending).await;
    }

    /// Answers the next message: one the client sent ahead, else the next one it sends.
    async fn step(&self, socket: &mut Socket, queue: &mut Queue) -> Result<(), Ending> {
        let next = match queue.pop() {
            Some(next) => next,
            None => self.wait_for_message(socket).await?,
        };
        match next {
            Incoming::Prompt(request, framing) => {
                let span = tracing::info_span!(
                    "ws_prompt",
                    request_id = %uuid::Uuid::new_v4(),
                    model = %self.loggable_model(&request.model),
                    key = self.caller.id(),
                );
                self.answer(*request, framing, socket, queue)
                    .instrument(span)
                    .await?;
            }
            Incoming::Invalid(err, framing) => {
                self.send(socket, StreamEvent::from(&err), framing).await?;
            }
            Incoming::Resume(after) => self.resume(&after, socket, queue).await?,
            Incoming::Cancel | Incoming::Ignore => {}
            Incoming::Closed => return Err(Ending::ClientClosed),
        }
        if self.gateway.shutdown.draining.is_cancelled() {
            return Err(Ending::Close(CloseCode::Away, "shutting_down"));
        }
        Ok(())
    }

    /// The client's next message while nothing streams. The client is pinged every
    /// `ws_ping_interval`; one that sends nothing, not even a pong, for `ws_idle_timeout`
    /// is closed with 1001.
    async fn wait_for_message(&self, socket: &mut Socket) -> Result<Incoming, Ending> {
        let settings = self.gateway.settings.ws;
        let idle_since = tokio::time::Instant::now();
        loop {
            let idle_for = idle_since.elapsed();
            if idle_for >= settings.idle_timeout {
                return Err(Ending::Close(CloseCode::Away, "idle_timeout"));
            }
            let wake = (settings.idle_timeout - idle_for).min(settings.ping_interval);
            tokio::select! {
                message = socket.next() => {
                    return read(message, self.mode, &self.model).map(|(incoming, _)| incoming);
                }
                _ = self.gateway.shutdown.draining.cancelled() => {
                    return Err(Ending::Close(CloseCode::Away, "shutting_down"));
                }
                _ = tokio::time::sleep(wake) => {}
            }
            if idle_since.elapsed() < settings.idle_timeout {
                self.deliver(socket, Message::Ping(Bytes::new())).await?;
            }
        }
    }

    async fn answer(
        &self,
        request: GenerateRequest,
        framing: Framing,
        socket: &mut Socket,
        queue: &mut Queue,
    ) -> Result<(), Ending> {
        // Streamed JSON answers are resumable when resumption is on.
        if self.gateway.resume.enabled() && matches!(framing, Framing::Json) && self.streaming {
            return self.answer_resumable(request, socket, queue).await;
        }
        let generation = self
            .gateway
            .stream(
                request,
                &self.caller,
                Transport::WebSocket,
                &self.client_gone,
            )
            .await;
        match generation {
            Ok(generation) => self.forward(generation, framing, socket, queue).await,
            Err(err) => {
                tracing::info!(
                    code = err.code(),
                    "prompt refused: {}",
                    loggable(&err.to_string())
                );
                self.send(socket, StreamEvent::from(&err), framing).await
            }
        }
    }

    async fn answer_resumable(
        &self,
        request: GenerateRequest,
        socket: &mut Socket,
        queue: &mut Queue,
    ) -> Result<(), Ending> {
        let generation = self
            .gateway
            .stream_outliving_client(
                request,
                &self.caller,
                Transport::WebSocket,
                &self.client_gone,
            )
            .await;
        match generation {
            Ok(generation) => {
                let listening = self.gateway.resume.record(
                    self.caller.id(),
                    generation,
                    StreamEvent::serialize,
                );
                self.forward_recorded(listening, socket, queue).await
            }
            Err(err) => {
                self.send(socket, StreamEvent::from(&err), Framing::Json)
                    .await
            }
        }
    }

    /// `{"type": "resume"}`: the events after `after`, then the rest; nothing when the
    /// stream ended and the client had them all.
    async fn resume(
        &self,
        after: &EventId,
        socket: &mut Socket,
        queue: &mut Queue,
    ) -> Result<(), Ending> {
        match self.gateway.resume.resume(self.caller.id(), after).await {
            Ok(Resumed::Events(listening)) => self.forward_recorded(listening, socket, queue).await,
            Ok(Resumed::Finished) => Ok(()),
            Err(err) => {
                self.send(socket, StreamEvent::from(&err), Framing::Json)
                    .await
            }
        }
    }

    /// Sends a resumable stream's events as JSON frames that name the stream and their
    /// number, while watching the socket as [`Session::forward`] does.
    async fn forward_recorded(
        &self,
        mut listening: Listening,
        socket: &mut Socket,
        queue: &mut Queue,
    ) -> Result<(), Ending> {
        loop {
            let item = tokio::select! {
                item = listening.next() => item,
                message = socket.next() => {
                    if let Heard::Cancel = self.heard(message, Framing::Json, socket, queue).await? {
                        listening.cancel();
                        return self.send(socket, StreamEvent::from(&Error::Cancelled), Framing::Json).await;
                    }
                    continue;
                }
            };
            match item {
                None => return Ok(()),
                Some(Ok(event)) => {
                    let frame = numbered_frame(&listening, &event);
                    self.deliver(socket, Message::text(frame)).await?;
                }
                Some(Err(err)) => {
                    return self
                        .send(socket, StreamEvent::from(&err), Framing::Json)
                        .await;
                }
            }
        }
    }

    /// Sends one answer while watching the socket: a close ends everything (and drops the
    /// upstream call), a cancel ends this answer, further prompts wait their turn.
    async fn forward(
        &self,
        mut chunks: Generation,
        framing: Framing,
        socket: &mut Socket,
        queue: &mut Queue,
    ) -> Result<(), Ending> {
        // The tutorial's text mode without streaming answers with one message.
        let mut whole = String::new();
        loop {
            let item = tokio::select! {
                item = chunks.next() => item,
                message = socket.next() => {
                    if let Heard::Cancel = self.heard(message, framing, socket, queue).await? {
                        chunks.cancel();
                        return self.send(socket, StreamEvent::from(&Error::Cancelled), framing).await;
                    }
                    continue;
                }
            };
            let event = match item {
                None => return Ok(()),
                Some(Ok(Chunk::Text(text))) if !self.streaming => {
                    whole.push_str(&text);
                    continue;
                }
                Some(Ok(Chunk::Done(finish))) if !self.streaming => {
                    let text = StreamEvent::Chunk(TextPiece {
                        text: std::mem::take(&mut whole),
                    });
                    self.send(socket, text, framing).await?;
                    StreamEvent::Done(finish.into())
                }
                Some(item) => match StreamEvent::of(item) {
                    Some(event) => event,
                    None => continue,
                },
            };
            let last = event.is_last();
            self.send(socket, event, framing).await?;
            if last {
                return Ok(());
            }
        }
    }

    /// Takes a message that came while an answer streams: a prompt waits its turn (or is
    /// refused at once), a close ends the session.
    async fn heard(
        &self,
        message: Option<Result<Message, tungstenite::Error>>,
        answer_framing: Framing,
        socket: &mut Socket,
        queue: &mut Queue,
    ) -> Result<Heard, Ending> {
        let (incoming, bytes) = read(message, self.mode, &self.model)?;
        match incoming {
            Incoming::Cancel => return Ok(Heard::Cancel),
            Incoming::Closed => return Err(Ending::ClientClosed),
            Incoming::Ignore => {}
            incoming => {
                let framing = incoming.reply_framing().unwrap_or(answer_framing);
                if let Err(err) = queue.push(incoming, bytes) {
                    self.send(socket, StreamEvent::from(&err), framing).await?;
                }
            }
        }
        Ok(Heard::Nothing)
    }

    /// Sends one event in the connection's framing. The tutorial's text mode has no end
    /// marker (`done` sends nothing) and reports errors as a message beginning `error: `.
    async fn send(
        &self,
        socket: &mut Socket,
        event: StreamEvent,
        framing: Framing,
    ) -> Result<(), Ending> {
        let message = match (framing, event) {
            (Framing::Json, event) => Message::text(event.json()),
            // The tutorial's text mode carries text only.
            (_, StreamEvent::Done(_) | StreamEvent::Reasoning(_) | StreamEvent::ToolCall(_)) => {
                return Ok(());
            }
            (Framing::Text, StreamEvent::Chunk(piece)) => Message::text(piece.text),
            (Framing::Binary, StreamEvent::Chunk(piece)) => Message::binary(piece.text),
            (Framing::Text, StreamEvent::Error(body)) => {
                Message::text(format!("error: {}", body.error.message))
            }
            (Framing::Binary, StreamEvent::Error(body)) => {
                Message::binary(format!("error: {}", body.error.message))
            }
        };
        self.deliver(socket, message).await
    }

    /// Writes `message`; a client that reads nothing for `slow_client_timeout` is gone.
    async fn deliver(&self, socket: &mut Socket, message: Message) -> Result<(), Ending> {
        match tokio::time::timeout(
            self.gateway.settings.slow_client_timeout,
            socket.send(message),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) | Err(_) => Err(Ending::Gone),
        }
    }

    /// The model a prompt names, as a log may show it: the registry's name, else escaped.
    fn loggable_model(&self, model: &str) -> String {
        match self.gateway.registry.get(model) {
            Ok(known) => known.spec.name.clone(),
            Err(_) => loggable(model),
        }
    }
}

/// A stored event's JSON with the stream's id and the event's number added:
/// `{..., "stream_id": "…", "seq": N}`.
fn numbered_frame(listening: &Listening, event: &Event) -> String {
    let json = String::from_utf8_lossy(event.json());
    let fields = json.trim_end().strip_suffix('}').unwrap_or(&json);
    format!(
        r#"{fields},"stream_id":"{}","seq":{}}}"#,
        listening.stream, event.seq
    )
}

/// What a message that came while an answer streams means for that answer.
enum Heard {
    Cancel,
    Nothing,
}

/// A message the socket gave, read in `mode`, with its size.
fn read(
    message: Option<Result<Message, tungstenite::Error>>,
    mode: Mode,
    model: &str,
) -> Result<(Incoming, usize), Ending> {
    let message = message.ok_or(Ending::Gone)??;
    let bytes = message.len();
    Ok((Incoming::of(message, mode, model), bytes))
}

/// Client-supplied text as a text log may show it: control characters (line breaks,
/// escape sequences) escaped so that it cannot forge lines, and cut short.
fn loggable(text: &str) -> String {
    text.chars()
        .take(LOGGED_CHARS)
        .flat_map(char::escape_debug)
        .collect()
}

/// Ends the connection as `ending` says, within [`CLOSING_TIME`].
async fn close(mut socket: Socket, ending: Ending) {
    let closing = async {
        match ending {
            Ending::Gone => {}
            // Writes tungstenite's reply to the client's close frame.
            Ending::ClientClosed => {
                let _ = socket.flush().await;
            }
            Ending::Close(code, reason) => {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                if socket.send(Message::Close(Some(frame))).await.is_ok() {
                    let stream = socket.get_mut();
                    let _ = stream.shutdown().await;
                    let _ = tokio::io::copy(stream, &mut tokio::io::sink()).await;
                }
            }
        }
    };
    let _ = tokio::time::timeout(CLOSING_TIME, closing).await;
}
