//! The `/stream` response: Server-Sent Events, each written once and handed to hyper as is.
//!
//! poem-openapi's `EventStream` goes through poem's SSE response, which formats every event
//! through `Display` into a growing `String` and then pipes the stream through an `AsyncRead`
//! adapter that copies every event again into a 4 KiB buffer each stream keeps for its whole
//! life (bench/RESULTS.md). This payload documents itself exactly as `EventStream` does.
//!
//! Every event of the native API has an `id:`, `<stream id>:<number>`, and the stream id is
//! also in the `x-stream-id` header (see [`crate::resume`]). The compatible APIs' streams
//! (`EventStream::new`) have events of their own and no ids.

use std::{marker::PhantomData, task::Poll, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream::BoxStream};
use poem::{Body, IntoResponse, Response, http::StatusCode};
use poem_openapi::{
    ApiResponse,
    payload::Payload,
    registry::{
        MetaHeader, MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry,
    },
    types::Type,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::events::{StreamEvent, sse_message};
use crate::resume::{EventId, Listening, StreamId};

/// SSE messages of a resumable stream waiting for a client that reads slower than they come.
const BUFFERED_MESSAGES: usize = 32;

/// The response header that names the stream.
pub const STREAM_ID_HEADER: &str = "x-stream-id";

/// An event as it goes on the wire: `event:`/`data:` lines and the blank line that ends it.
/// The OpenAPI document describes the stream as an array of the event's schema.
pub trait ServerSentEvent: Type + Send + 'static {
    fn sse(&self) -> Vec<u8>;
}

impl ServerSentEvent for StreamEvent {
    fn sse(&self) -> Vec<u8> {
        StreamEvent::sse(self, None)
    }
}

/// An answer as `text/event-stream` of events `E`, with a comment line every `keep_alive`
/// so that proxies and browsers keep a silent stream open; or, for a resume with nothing
/// left to send, 204 (which tells `EventSource` to stop reconnecting).
pub struct EventStream<E: ServerSentEvent = StreamEvent> {
    /// The SSE messages and the stream's id, if it has one; `None`: nothing left to send.
    events: Option<(Option<StreamId>, BoxStream<'static, Bytes>)>,
    keep_alive: Duration,
    event: PhantomData<fn() -> E>,
}

impl<E: ServerSentEvent> EventStream<E> {
    /// A stream of events without ids (the compatible APIs).
    pub fn new(events: impl Stream<Item = E> + Send + 'static, keep_alive: Duration) -> Self {
        let messages = events.map(|event| Bytes::from(event.sse()));
        Self {
            events: Some((None, messages.boxed())),
            keep_alive,
            event: PhantomData,
        }
    }
}

impl EventStream {
    /// A stream that is not held for resumption: its events are numbered as they pass.
    pub fn numbered(
        events: impl Stream<Item = StreamEvent> + Send + 'static,
        keep_alive: Duration,
    ) -> Self {
        let mut id = EventId {
            stream: StreamId::new(),
            seq: 0,
        };
        let stream = id.stream.clone();
        let messages = events.map(move |event| {
            id.seq += 1;
            Bytes::from(event.sse(Some(&id)))
        });
        Self {
            events: Some((Some(stream), messages.boxed())),
            keep_alive,
            event: PhantomData,
        }
    }

    /// The events of a resumable stream as they are read from its store. A task moves
    /// them to the response and stops, leaving the stream without this client, when the
    /// client leaves (`client_gone`) or reads nothing for `slow_client_timeout`. A failure
    /// to read (events dropped under a slow reader) is one `error` event without an id.
    pub fn recorded(
        listening: Listening,
        client_gone: CancellationToken,
        keep_alive: Duration,
        slow_client_timeout: Duration,
    ) -> Self {
        let stream = listening.stream.clone();
        let (messages, response) = mpsc::channel(BUFFERED_MESSAGES);
        tokio::spawn(forward(
            listening,
            client_gone,
            slow_client_timeout,
            messages,
        ));
        Self {
            events: Some((Some(stream), ReceiverStream::new(response).boxed())),
            keep_alive,
            event: PhantomData,
        }
    }

    /// A resume of a stream that ended, whose every event the client has.
    pub fn finished() -> Self {
        Self {
            events: None,
            keep_alive: Duration::ZERO,
            event: PhantomData,
        }
    }
}

/// Moves a recorded stream's events, as SSE messages, to the response of one client.
async fn forward(
    listening: Listening,
    client_gone: CancellationToken,
    slow_client_timeout: Duration,
    messages: mpsc::Sender<Bytes>,
) {
    let mut id = EventId {
        stream: listening.stream.clone(),
        seq: 0,
    };
    let events = listening.take_until(client_gone.cancelled_owned());
    tokio::pin!(events);
    loop {
        let event = tokio::select! {
            _ = messages.closed() => return,
            event = events.next() => event,
        };
        let message = match event {
            None => return,
            Some(Ok(event)) => {
                id.seq = event.seq;
                sse_message(Some(&id), event.name(), event.json())
            }
            Some(Err(err)) => StreamEvent::from(&err).sse(None),
        };
        match tokio::time::timeout(slow_client_timeout, messages.send(Bytes::from(message))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

impl<E: ServerSentEvent> Payload for EventStream<E> {
    const CONTENT_TYPE: &'static str = "text/event-stream";

    fn schema_ref() -> MetaSchemaRef {
        MetaSchemaRef::Inline(Box::new(MetaSchema {
            items: Some(Box::new(E::schema_ref())),
            ..MetaSchema::new_with_format("array", "event-stream")
        }))
    }

    fn register(registry: &mut Registry) {
        E::register(registry);
    }
}

/// The native API's stream, as its operations document it.
impl ApiResponse for EventStream {
    fn meta() -> MetaResponses {
        MetaResponses {
            responses: vec![MetaResponse {
                description: "",
                status: Some(200),
                status_range: None,
                content: vec![MetaMediaType {
                    content_type: Self::CONTENT_TYPE,
                    schema: Self::schema_ref(),
                }],
                headers: vec![MetaHeader {
                    name: STREAM_ID_HEADER.to_owned(),
                    description: Some(
                        "The stream's id, also the first part of every event's `id:` (`<stream id>:<number>`)"
                            .to_owned(),
                    ),
                    required: true,
                    deprecated: false,
                    schema: String::schema_ref(),
                }],
            }, MetaResponse {
                description: "A resume (`Last-Event-ID`) of a stream that has ended, whose events the client all had: nothing more to send, and `EventSource` stops reconnecting",
                status: Some(204),
                status_range: None,
                content: vec![],
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        StreamEvent::register(registry);
    }
}

impl<E: ServerSentEvent> IntoResponse for EventStream<E> {
    fn into_response(self) -> Response {
        let Some((stream, mut events)) = self.events else {
            return Response::builder().status(StatusCode::NO_CONTENT).finish();
        };
        let mut keep_alive = tokio::time::interval_at(
            tokio::time::Instant::now() + self.keep_alive,
            self.keep_alive,
        );
        let body = futures_util::stream::poll_fn(move |cx| {
            if let Poll::Ready(event) = events.poll_next_unpin(cx) {
                return Poll::Ready(event.map(Ok::<_, std::io::Error>));
            }
            keep_alive
                .poll_tick(cx)
                .map(|_| Some(Ok(Bytes::from_static(b":\n\n"))))
        });
        let mut response = Response::builder()
            .content_type(Self::CONTENT_TYPE)
            .header("X-Accel-Buffering", "no")
            .header("Cache-Control", "no-cache");
        if let Some(stream) = stream {
            response = response.header(STREAM_ID_HEADER, stream.as_str());
        }
        response.body(Body::from_bytes_stream(body))
    }
}
