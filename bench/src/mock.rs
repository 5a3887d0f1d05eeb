//! The upstream: a lean Bedrock Runtime mock speaking the real wire protocol (InvokeModel
//! JSON and `application/vnd.amazon.eventstream` frames, InvokeModelWithResponseStream's
//! and ConverseStream's), run as its own process so that its CPU is not the gateway's and
//! its sockets do not count against the bench's limit.
//!
//! The behaviour is chosen by the model id, `meta.llama3-bench-{scenario}`:
//! - `{n}x{ms}`: a stream of `n` chunks, `ms` milliseconds apart (the first at once);
//! - `silent`: one chunk, then nothing until the client leaves.
//!
//! Every chunk's text is the monotonic clock (ns) when the mock wrote it, so that a client
//! can tell how long the chunk took to reach it.

use std::{convert::Infallible, time::Duration};

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{StreamExt, stream};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{Request, Response, body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::{clock, converse};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the mock answers to InvokeModel, whatever the prompt: encoded once.
const INVOKE_ANSWER: &str = r#"{"generation":"The capital of France is Paris.","prompt_token_count":19,"generation_token_count":8,"stop_reason":"stop"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Paced { chunks: u32, pace: Duration },
    Silent,
}

impl Scenario {
    pub fn paced(chunks: u32, pace_ms: u64) -> Scenario {
        Scenario::Paced {
            chunks,
            pace: Duration::from_millis(pace_ms),
        }
    }

    /// The registry name (and model id suffix) of this scenario.
    pub fn name(self) -> String {
        match self {
            Scenario::Paced { chunks, pace } => format!("{chunks}x{}", pace.as_millis()),
            Scenario::Silent => "silent".into(),
        }
    }

    pub fn model_id(self) -> String {
        format!("meta.llama3-bench-{}", self.name())
    }

    fn parse(path: &str) -> Option<Scenario> {
        let name = path.split("meta.llama3-bench-").nth(1)?.split('/').next()?;
        match name {
            "silent" => return Some(Scenario::Silent),
            // The `/invoke` model streamed: its whole answer in one event, as the gateway's
            // `/invoke` (the stream collected) asks for it.
            "invoke" => return Some(Scenario::paced(1, 0)),
            _ => {}
        }
        let (chunks, pace) = name.split_once('x')?;
        Some(Scenario::paced(chunks.parse().ok()?, pace.parse().ok()?))
    }
}

/// Serves until the process is killed, printing `listening PORT` once bound.
pub async fn serve() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?.port());
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service_fn(answer))
                .await;
        });
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    // Read the whole request, as Bedrock does, so the connection can be reused.
    let _ = request.into_body().collect().await;
    let response = if path.ends_with("/invoke") {
        Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(INVOKE_ANSWER.as_bytes())).boxed_unsync())
    } else if let Some(scenario) = path
        .strip_suffix("/invoke-with-response-stream")
        .and_then(Scenario::parse)
    {
        Response::builder()
            .header("content-type", "application/vnd.amazon.eventstream")
            .header("x-amzn-bedrock-content-type", "application/json")
            .body(event_stream(scenario, chunk_frame))
    } else if let Some(scenario) = path
        .strip_suffix("/converse-stream")
        .and_then(Scenario::parse)
    {
        Response::builder()
            .header("content-type", "application/vnd.amazon.eventstream")
            .body(event_stream(scenario, converse::frames))
    } else {
        Response::builder()
            .status(404)
            .header("x-amzn-errortype", "UnknownOperationException")
            .body(Full::new(Bytes::from_static(b"{}")).boxed_unsync())
    };
    Ok(response.expect("a response built from constants"))
}

/// The scenario's stream: `frame(stamp, first, last)` for each chunk, on pace.
fn event_stream(scenario: Scenario, frame: fn(u64, bool, bool) -> Bytes) -> Body {
    let (chunks, pace) = match scenario {
        Scenario::Paced { chunks, pace } => (chunks, pace),
        Scenario::Silent => (1, Duration::ZERO),
    };
    let start = tokio::time::Instant::now();
    let frames = stream::iter(0..chunks).then(move |index| async move {
        // Tokio's timer would delay even an elapsed deadline to its next 1 ms tick.
        if index > 0 && !pace.is_zero() {
            tokio::time::sleep_until(start + pace * index).await;
        }
        let last = index + 1 == chunks && scenario != Scenario::Silent;
        Ok(Frame::data(frame(clock::now_ns(), index == 0, last)))
    });
    match scenario {
        Scenario::Silent => StreamBody::new(frames.chain(stream::pending())).boxed_unsync(),
        Scenario::Paced { .. } => StreamBody::new(frames).boxed_unsync(),
    }
}

/// One eventstream `chunk` event carrying a Llama 3 stream object whose text is `stamp`.
fn chunk_frame(stamp: u64, _first: bool, last: bool) -> Bytes {
    let native = if last {
        format!(
            r#"{{"generation":"{stamp}","prompt_token_count":null,"generation_token_count":64,"stop_reason":"stop","amazon-bedrock-invocationMetrics":{{"inputTokenCount":19,"outputTokenCount":64,"invocationLatency":1,"firstByteLatency":1}}}}"#
        )
    } else {
        format!(
            r#"{{"generation":"{stamp}","prompt_token_count":19,"generation_token_count":1,"stop_reason":null}}"#
        )
    };
    let payload = format!(
        r#"{{"bytes":"{}"}}"#,
        base64::engine::general_purpose::STANDARD.encode(native)
    );
    let mut frame = Vec::with_capacity(256);
    write_event(&mut frame, "chunk", payload.into_bytes());
    Bytes::from(frame)
}

/// Appends one eventstream event of `event_type` to `out`.
pub fn write_event(out: &mut Vec<u8>, event_type: &str, payload: Vec<u8>) {
    let message = Message::new(payload)
        .add_header(Header::new(
            ":message-type",
            HeaderValue::String("event".into()),
        ))
        .add_header(Header::new(
            ":event-type",
            HeaderValue::String(event_type.to_owned().into()),
        ))
        .add_header(Header::new(
            ":content-type",
            HeaderValue::String("application/json".into()),
        ));
    write_message_to(&message, out).expect("a small message encodes");
}

/// The text of an eventstream chunk frame's native payload (for clients reading the mock
/// directly): the stamp.
pub fn stamp_of_frame(message: &Message) -> Option<u64> {
    let payload: serde_json::Value = serde_json::from_slice(message.payload()).ok()?;
    let native = base64::engine::general_purpose::STANDARD
        .decode(payload.get("bytes")?.as_str()?)
        .ok()?;
    let native: serde_json::Value = serde_json::from_slice(&native).ok()?;
    native.get("generation")?.as_str()?.parse().ok()
}
