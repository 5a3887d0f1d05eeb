//! How tests talk to the gateway as a client would: Server-Sent Events, WebSocket frames,
//! error bodies.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream, connect_async,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

use crate::app::App;

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub event: String,
    pub data: Value,
}

/// The events of an SSE response, as a browser's EventSource would see them.
pub fn sse_events(response: reqwest::Response) -> impl Stream<Item = Sse> + Unpin {
    response
        .bytes_stream()
        .eventsource()
        .map(|event| {
            let event = event.expect("a well-formed event stream");
            Sse {
                data: serde_json::from_str(&event.data).expect("event data is JSON"),
                event: event.event,
            }
        })
        .boxed()
}

/// All events until the stream ends.
pub async fn all_sse_events(response: reqwest::Response) -> Vec<Sse> {
    tokio::time::timeout(Duration::from_secs(20), sse_events(response).collect())
        .await
        .expect("the stream ends")
}

/// Asserts the status and the error code of a JSON error response and returns its message.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> String {
    assert_eq!(
        response.status().as_u16(),
        status,
        "status of {}",
        response.url()
    );
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], code, "{body}");
    body["error"]["message"]
        .as_str()
        .expect("an error message")
        .to_owned()
}

pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn connect(app: &App, query: &str) -> Socket {
    connect_async(app.ws_url(query))
        .await
        .expect("the handshake succeeds")
        .0
}

pub async fn connect_json(app: &App, model: &str) -> Socket {
    let mut request = app
        .ws_url(&format!("model={model}"))
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("modelgate.v1"),
    );
    let (socket, response) = connect_async(request)
        .await
        .expect("the handshake succeeds");
    assert_eq!(response.headers()["sec-websocket-protocol"], "modelgate.v1");
    socket
}

/// The next data message (text or binary), skipping control frames.
pub async fn next_message(socket: &mut Socket) -> Message {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a valid frame");
        if message.is_text() || message.is_binary() || message.is_close() {
            return message;
        }
    }
}

pub async fn next_text(socket: &mut Socket) -> String {
    match next_message(socket).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

pub async fn next_json(socket: &mut Socket) -> Value {
    serde_json::from_str(&next_text(socket).await).expect("a JSON frame")
}
