//! The fault matrix: every upstream fault, before and during the answer, through every
//! transport, for a native model and a Converse one, gives the mapped status / event /
//! frame, the upstream call ends, and the server carries on.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::app::{App, LLAMA_ID, TestApp, registry};
use crate::client::{all_sse_events, connect, connect_json, next_json, next_text};
use crate::converse::{CLAUDE_37, converse_registry};
use crate::emulator::{Scenario, StreamEnd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Invoke,
    Sse,
    WsJson,
    WsText,
}

/// What a client of one transport saw.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    /// An HTTP error before any answer: status and code.
    Refused(u16, String),
    /// Pieces, then the end: `done`, or `error:<code>` (`error` alone in text mode, which
    /// carries no code).
    Streamed(Vec<String>, String),
}

/// What a client of `transport` sees when it asks `model`.
async fn observe(app: &App, model: &str, transport: Transport) -> Seen {
    match transport {
        Transport::Invoke => {
            let response = app
                .post("/invoke", &json!({"model": model, "prompt": "hi"}))
                .await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            if status == 200 {
                Seen::Streamed(
                    vec![body["text"].as_str().unwrap().to_owned()],
                    "done".into(),
                )
            } else {
                Seen::Refused(status, body["error"]["code"].as_str().unwrap().to_owned())
            }
        }
        Transport::Sse => {
            let response = app.get(&format!("/stream?model={model}&prompt=hi")).await;
            let status = response.status().as_u16();
            if status != 200 {
                let body: Value = response.json().await.unwrap();
                return Seen::Refused(status, body["error"]["code"].as_str().unwrap().to_owned());
            }
            let events = all_sse_events(response).await;
            let (last, pieces) = events.split_last().expect("at least one event");
            assert!(pieces.iter().all(|e| e.event == "chunk"), "{events:?}");
            let end = match last.event.as_str() {
                "error" => format!("error:{}", last.data["error"]["code"].as_str().unwrap()),
                other => other.to_owned(),
            };
            Seen::Streamed(
                pieces
                    .iter()
                    .map(|e| e.data["text"].as_str().unwrap().to_owned())
                    .collect(),
                end,
            )
        }
        Transport::WsJson => {
            let mut socket = connect_json(app, model).await;
            socket
                .send(Message::text(r#"{"prompt": "hi"}"#))
                .await
                .unwrap();
            let mut pieces = Vec::new();
            loop {
                let frame = next_json(&mut socket).await;
                match frame["type"].as_str().unwrap() {
                    "chunk" => pieces.push(frame["text"].as_str().unwrap().to_owned()),
                    "error" => {
                        return Seen::Streamed(
                            pieces,
                            format!("error:{}", frame["error"]["code"].as_str().unwrap()),
                        );
                    }
                    other => return Seen::Streamed(pieces, other.to_owned()),
                }
            }
        }
        Transport::WsText => {
            let mut socket = connect(app, &format!("model={model}&streaming=1")).await;
            socket.send(Message::text("hi")).await.unwrap();
            let mut pieces = Vec::new();
            loop {
                let message = next_text(&mut socket).await;
                if let Some(reason) = message.strip_prefix("error: ") {
                    assert!(!reason.is_empty());
                    return Seen::Streamed(pieces, "error".into());
                }
                pieces.push(message);
            }
        }
    }
}

fn http_error(status: u16, error_type: &str) -> Scenario {
    Scenario::HttpError {
        status,
        error_type: error_type.into(),
        message: format!("{error_type} from the emulator"),
    }
}

fn exception_after(pieces: &[&str], exception_type: &str) -> Scenario {
    Scenario::ExceptionAfter {
        pieces: pieces.iter().map(|p| p.to_string()).collect(),
        exception_type: exception_type.into(),
        message: format!("{exception_type} from the emulator"),
    }
}

fn pieces(texts: &[&str]) -> Vec<String> {
    texts.iter().map(|t| t.to_string()).collect()
}

/// A fault, the emulator's scenario for it, and what each transport must see.
type Case = (&'static str, Scenario, Vec<(Transport, Seen)>);

/// What each transport must see for a fault that happens before the answer begins.
fn refused(status: u16, code: &str) -> [(Transport, Seen); 4] {
    [
        (Transport::Invoke, Seen::Refused(status, code.into())),
        (Transport::Sse, Seen::Refused(status, code.into())),
        (
            Transport::WsJson,
            Seen::Streamed(vec![], format!("error:{code}")),
        ),
        (Transport::WsText, Seen::Streamed(vec![], "error".into())),
    ]
}

/// What each streaming transport must see for a fault after `sent` pieces.
fn cut(sent: &[&str], code: &str) -> [(Transport, Seen); 3] {
    [
        (
            Transport::Sse,
            Seen::Streamed(pieces(sent), format!("error:{code}")),
        ),
        (
            Transport::WsJson,
            Seen::Streamed(pieces(sent), format!("error:{code}")),
        ),
        (
            Transport::WsText,
            Seen::Streamed(pieces(sent), "error".into()),
        ),
    ]
}

/// The registry with the Converse model, every model with short timeouts and no retries.
fn impatient(url: &str) -> String {
    converse_registry("")(url).replace(
        "endpoint_url",
        "upstream = { max_attempts = 1, first_token_timeout = \"400ms\", idle_timeout = \"400ms\", total_timeout = \"2s\" }\nendpoint_url",
    )
}

#[tokio::test]
async fn every_upstream_fault_in_every_phase_and_transport_gives_its_mapped_error() {
    fault_matrix("llama3", LLAMA_ID).await;
}

#[tokio::test]
async fn every_upstream_fault_in_every_phase_and_transport_gives_its_mapped_error_through_converse()
{
    fault_matrix("claude", CLAUDE_37).await;
}

/// Runs every fault of the matrix against `model` (whose Bedrock id is `model_id`).
async fn fault_matrix(model: &str, model_id: &str) {
    let app = TestApp::new().registry(impatient).spawn().await;
    let partial = ["partial", " answer"];
    let mut matrix: Vec<Case> = vec![
        (
            "throttled before",
            http_error(429, "ThrottlingException"),
            refused(429, "throttled").into(),
        ),
        (
            "quota before",
            http_error(400, "ServiceQuotaExceededException"),
            refused(429, "throttled").into(),
        ),
        (
            "validation before",
            http_error(400, "ValidationException"),
            refused(400, "invalid_request").into(),
        ),
        (
            "access denied before",
            http_error(403, "AccessDeniedException"),
            refused(502, "upstream_error").into(),
        ),
        (
            "not found before",
            http_error(404, "ResourceNotFoundException"),
            refused(502, "upstream_error").into(),
        ),
        (
            "model timeout before",
            http_error(408, "ModelTimeoutException"),
            refused(504, "upstream_timeout").into(),
        ),
        (
            "model error before",
            http_error(424, "ModelErrorException"),
            refused(502, "upstream_error").into(),
        ),
        (
            "internal before",
            http_error(500, "InternalServerException"),
            refused(502, "upstream_error").into(),
        ),
        (
            "unavailable before",
            http_error(503, "ServiceUnavailableException"),
            refused(503, "upstream_unavailable").into(),
        ),
        (
            "silent before the first token",
            Scenario::Stall { pieces: vec![] },
            refused(504, "upstream_timeout").into(),
        ),
        (
            "stream error before any piece",
            exception_after(&[], "modelStreamErrorException"),
            refused(502, "upstream_error")[1..].to_vec(),
        ),
    ];
    for (exception_type, code) in [
        ("modelStreamErrorException", "upstream_error"),
        ("internalServerException", "upstream_error"),
        ("throttlingException", "throttled"),
        ("validationException", "invalid_request"),
        ("modelTimeoutException", "upstream_timeout"),
        ("serviceUnavailableException", "upstream_unavailable"),
    ] {
        matrix.push((
            exception_type,
            exception_after(&partial, exception_type),
            cut(&partial, code).into(),
        ));
    }
    matrix.push((
        "unmodeled error frame",
        Scenario::ErrorFrameAfter {
            pieces: pieces(&partial),
            code: "InternalFailure".into(),
            message: "boom".into(),
        },
        cut(&partial, "upstream_error").into(),
    ));
    matrix.push((
        "connection dropped",
        Scenario::DropAfter {
            pieces: pieces(&partial),
        },
        cut(&partial, "upstream_error").into(),
    ));
    let mut stalled = cut(&partial, "upstream_timeout").to_vec();
    stalled.push((
        Transport::Invoke,
        Seen::Refused(504, "upstream_timeout".into()),
    ));
    matrix.push((
        "silent mid-answer",
        Scenario::Stall {
            pieces: pieces(&partial),
        },
        stalled,
    ));

    let mut checked = 0;
    for (fault, scenario, expectations) in matrix {
        app.emulator.script(model_id, scenario.clone());
        for (transport, expected) in expectations {
            let ended_before = app
                .emulator
                .wait_streams_ended(0, Duration::ZERO)
                .await
                .len();
            let seen =
                tokio::time::timeout(Duration::from_secs(10), observe(&app, model, transport))
                    .await
                    .unwrap_or_else(|_| panic!("{fault} via {transport:?}: the client got no end"));
            assert_eq!(seen, expected, "{fault} via {transport:?}");
            if !matches!(scenario, Scenario::HttpError { .. }) {
                let ends = app
                    .emulator
                    .wait_streams_ended(ended_before + 1, Duration::from_secs(1))
                    .await;
                if let Scenario::Stall { .. } = scenario {
                    assert!(
                        matches!(ends[ended_before], StreamEnd::ClientClosed { .. }),
                        "{fault} via {transport:?}: the gateway drops a silent upstream: {ends:?}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(
        app.emulator.open_streams(),
        0,
        "no upstream stream is left open"
    );
    assert_eq!(
        app.get("/healthz").await.status(),
        200,
        "the server carries on"
    );
    println!("fault matrix of {model}: {checked} (fault, phase, transport) cases");
}

#[tokio::test]
async fn the_sdk_retries_throttling_before_the_answer_as_configured() {
    let app = TestApp::new()
        .registry(|url| {
            registry(url).replace(
                "endpoint_url",
                "upstream = { max_attempts = 2 }\nendpoint_url",
            )
        })
        .spawn()
        .await;
    app.emulator
        .script(LLAMA_ID, http_error(503, "ServiceUnavailableException"));
    let response = app
        .post("/invoke", &json!({"model": "llama3", "prompt": "hi"}))
        .await;
    assert_eq!(response.status(), 503);
    assert_eq!(
        app.emulator.requests().len(),
        2,
        "two attempts, as configured"
    );
}
