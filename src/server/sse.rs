//! The `/stream` response: Server-Sent Events, each written once and handed to hyper as is.
//!
//! poem-openapi's `EventStream` goes through poem's SSE response, which formats every event
//! through `Display` into a growing `String` and then pipes the stream through an `AsyncRead`
//! adapter that copies every event again into a 4 KiB buffer each stream keeps for its whole
//! life (bench/RESULTS.md). This payload documents itself exactly as `EventStream` does.

use std::{task::Poll, time::Duration};

use bytes::Bytes;
use futures_util::{Stream, StreamExt, stream::BoxStream};
use poem::{Body, IntoResponse, Response};
use poem_openapi::{
    ApiResponse,
    payload::Payload,
    registry::{MetaMediaType, MetaResponse, MetaResponses, MetaSchema, MetaSchemaRef, Registry},
    types::Type,
};

use super::events::StreamEvent;

/// An event as it goes on the wire: `event:`/`data:` lines and the blank line that ends it.
/// The OpenAPI document describes the stream as an array of the event's schema.
pub trait ServerSentEvent: Type + Send + 'static {
    fn sse(&self) -> Vec<u8>;
}

impl ServerSentEvent for StreamEvent {
    fn sse(&self) -> Vec<u8> {
        StreamEvent::sse(self)
    }
}

/// An answer as `text/event-stream`, with a comment line every `keep_alive` so that proxies
/// and browsers keep a silent stream open.
pub struct EventStream<E: ServerSentEvent = StreamEvent> {
    events: BoxStream<'static, E>,
    keep_alive: Duration,
}

impl<E: ServerSentEvent> EventStream<E> {
    pub fn new(events: impl Stream<Item = E> + Send + 'static, keep_alive: Duration) -> Self {
        Self {
            events: events.boxed(),
            keep_alive,
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

impl<E: ServerSentEvent> ApiResponse for EventStream<E> {
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
                headers: vec![],
            }],
        }
    }

    fn register(registry: &mut Registry) {
        E::register(registry);
    }
}

impl<E: ServerSentEvent> IntoResponse for EventStream<E> {
    fn into_response(self) -> Response {
        let mut events = self.events;
        let mut keep_alive = tokio::time::interval_at(
            tokio::time::Instant::now() + self.keep_alive,
            self.keep_alive,
        );
        let body = futures_util::stream::poll_fn(move |cx| {
            if let Poll::Ready(event) = events.poll_next_unpin(cx) {
                return Poll::Ready(
                    event.map(|event| Ok::<_, std::io::Error>(Bytes::from(event.sse()))),
                );
            }
            keep_alive
                .poll_tick(cx)
                .map(|_| Some(Ok(Bytes::from_static(b":\n\n"))))
        });
        Response::builder()
            .content_type(Self::CONTENT_TYPE)
            .header("X-Accel-Buffering", "no")
            .header("Cache-Control", "no-cache")
            .body(Body::from_bytes_stream(body))
    }
}
