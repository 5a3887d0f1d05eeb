//! Limits and back-pressure: capacity, input size, WebSocket message size, slow clients.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

use crate::app::{App, LLAMA_ID, TestApp, registry};
use crate::client::{all_sse_events, connect, expect_error};
use crate::emulator::{Scenario, StreamEnd};

/// Opens a stream that the model keeps open (one piece, then silence), holding its slots.
async fn hold_a_stream(app: &App) -> reqwest::Response {
    app.emulator.script(LLAMA_ID, Scenario::stall(["…"]));
    app.get("/stream?model=llama3&prompt=hold").await
}

#[tokio::test]
async fn a_model_at_its_concurrency_cap_answers_503_with_retry_after_until_a_slot_frees() {
    let app = TestApp::new()
        .registry(|url| {
            registry(url).replacen(
                "endpoint_url",
                "upstream = { max_concurrent = 1 }\nendpoint_url",
                1,
            )
        })
        .spawn()
        .await;
    let holder = hold_a_stream(&app).await;
    assert_eq!(holder.status(), 200);

    let refused = app
        .post("/invoke", &json!({"model": "llama3", "prompt": "me too"}))
        .await;
    assert!(refused.headers().contains_key("retry-after"));
    let message = expect_error(refused, 503, "upstream_unavailable").await;
    assert!(
        message.contains("llama3") && message.contains("limit of 1"),
        "{message}"
    );
    let other_model = app
        .post("/invoke", &json!({"model": "anthropic", "prompt": "hi"}))
        .await;
    assert_eq!(other_model.status(), 200, "the cap is per model");

    drop(holder);
    // The other model's answer was a stream too (`/invoke` collects one): two have ended.
    app.emulator
        .wait_streams_ended(2, Duration::from_secs(1))
        .await;
    app.emulator.script(LLAMA_ID, Scenario::reply(["free"]));
    let freed = app
        .post("/invoke", &json!({"model": "llama3", "prompt": "now?"}))
        .await;
    assert_eq!(
        freed.status(),
        200,
        "the slot is released when the stream ends"
    );
}

#[tokio::test]
async fn the_gateway_wide_cap_holds_across_models() {
    let app = TestApp::new()
        .settings("max_concurrent_upstream = 1")
        .spawn()
        .await;
    let _holder = hold_a_stream(&app).await;
    let refused = app
        .post("/invoke", &json!({"model": "anthropic", "prompt": "hi"}))
        .await;
    let message = expect_error(refused, 503, "upstream_unavailable").await;
    assert!(message.contains("gateway"), "{message}");
}

#[tokio::test]
async fn long_inputs_and_long_conversations_are_413_before_any_upstream_call() {
    let app = TestApp::new()
        .settings("max_input_chars = 100\nmax_messages = 3")
        .spawn()
        .await;
    let long = app
        .post(
            "/invoke",
            &json!({"model": "llama3", "prompt": "x".repeat(101)}),
        )
        .await;
    expect_error(long, 413, "too_large").await;
    let turns: Vec<_> = (0..4)
        .map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": "hi"}))
        .collect();
    let many = app
        .post("/stream", &json!({"model": "llama3", "messages": turns}))
        .await;
    expect_error(many, 413, "too_large").await;
    assert!(app.emulator.requests().is_empty());
}

#[tokio::test]
async fn a_websocket_message_over_the_limit_closes_the_connection_with_1009() {
    let app = TestApp::new()
        .settings("ws_max_message_bytes = 1000")
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3").await;
    socket.send(Message::text("x".repeat(1500))).await.unwrap();
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .unwrap()
    .expect("a close frame with a code");
    assert_eq!(close.code, CloseCode::Size);
    assert!(app.emulator.requests().is_empty());
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_while_others_stream_on() {
    let app = TestApp::new()
        .settings("slow_client_timeout = \"500ms\"")
        .spawn()
        .await;
    // 400 pieces of 32 KiB, as fast as the emulator can write: more than the socket
    // buffers and the gateway's queue hold for a client that reads nothing.
    let big = "y".repeat(32 * 1024);
    app.emulator.script(
        LLAMA_ID,
        Scenario::reply(vec![big; 400])
            .paced(Duration::ZERO)
            .input_tokens(1),
    );
    let stalled = app.get("/stream?model=llama3&prompt=flood").await;
    assert_eq!(stalled.status(), 200);

    app.emulator.script(
        crate::app::CLAUDE_ID,
        Scenario::reply(["still", " streaming"]),
    );
    let events = all_sse_events(app.get("/stream?model=anthropic&prompt=hi").await).await;
    assert_eq!(
        events.last().unwrap().event,
        "done",
        "another client is served meanwhile"
    );

    let ends = app
        .emulator
        .wait_streams_ended(2, Duration::from_secs(5))
        .await;
    assert!(
        ends.iter()
            .any(|end| matches!(end, StreamEnd::ClientClosed { .. })),
        "the slow client's upstream call was dropped: {ends:?}"
    );
    let metrics = app.metrics(None).await;
    assert!(
        metrics.contains(r#"modelgate_cancellations_total{reason="slow_client"} 1"#),
        "{metrics}"
    );
    drop(stalled);
}
