//! A client that goes away stops the upstream call within a second, whatever the model is
//! doing at that moment — even when it is silent and nothing is being written.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::app::{App, LLAMA_ID, TestApp};
use crate::client::{connect, sse_events};
use crate::emulator::Scenario;

/// Waits until the emulator is serving one stream (or one stalled Invoke).
pub async fn upstream_open(app: &App) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while app.emulator.open_streams() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the upstream call started");
}

/// Posts `body` to `path`, leaves as soon as the upstream call has started, and checks that
/// the upstream call ends within a second.
pub async fn leaving_a_post_stops_the_upstream(app: &App, path: &str, body: serde_json::Value) {
    let request = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{}{path}", app.url))
            .json(&body)
            .send(),
    );
    upstream_open(app).await;
    request.abort();
    app.assert_upstream_closed_within_a_second().await;
}

#[tokio::test]
async fn an_invoke_client_that_leaves_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::Stall { pieces: vec![] })
        .spawn()
        .await;
    leaving_a_post_stops_the_upstream(
        &app,
        "/invoke",
        json!({"model": "llama3", "prompt": "take your time"}),
    )
    .await;
}

#[tokio::test]
async fn an_sse_client_that_leaves_before_the_first_token_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::Stall { pieces: vec![] })
        .spawn()
        .await;
    let request = tokio::spawn(reqwest::get(format!(
        "{}/stream?model=llama3&prompt=hi",
        app.url
    )));
    upstream_open(&app).await;
    request.abort();
    app.assert_upstream_closed_within_a_second().await;
}

#[tokio::test]
async fn an_sse_client_that_leaves_while_the_model_is_silent_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::stall(["thinking..."]))
        .spawn()
        .await;
    let response = app.get("/stream?model=llama3&prompt=hi").await;
    let mut events = sse_events(response);
    assert_eq!(events.next().await.unwrap().data["text"], "thinking...");
    drop(events);
    app.assert_upstream_closed_within_a_second().await;
    let metrics = app.metrics(None).await;
    assert!(
        metrics.contains(r#"modelgate_cancellations_total{reason="client_gone"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_websocket_client_that_leaves_before_the_first_token_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::Stall { pieces: vec![] })
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3&streaming=1").await;
    socket.send(Message::text("take your time")).await.unwrap();
    upstream_open(&app).await;
    drop(socket);
    app.assert_upstream_closed_within_a_second().await;
}
