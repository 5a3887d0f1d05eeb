//! API keys: where clients put them, what a wrong one gets, the per-key limits, and that
//! secrets never reach the logs or the metrics.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::{
    connect_async,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

use crate::app::{App, LLAMA_ID, SECRET_KEY, TestApp, gateway_command, registry};
use crate::client::{all_sse_events, expect_error};
use crate::emulator::Scenario;

pub const KEY: &str = "mg-team-a-0123456789abcdef";
const ENV_KEY: &str = "mg-from-the-environment-42";

/// The gateway with two keys: `team-a` ([`KEY`]) with these `limits`, and `ops` from the
/// environment; debug logs, to show that no secret reaches them.
pub fn with_keys(limits: &str) -> TestApp<'static> {
    TestApp::new()
        .api_key("team-a", KEY, limits)
        .env("MODELGATE_API_KEYS", &format!("ops:{ENV_KEY}"))
        .env("RUST_LOG", "debug")
}

async fn invoke_with(app: &App, authorization: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .json(&json!({"model": "llama3", "prompt": "hi"}));
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn requests_without_a_valid_key_get_401_and_reach_nothing() {
    let app = with_keys("").spawn().await;
    let missing = invoke_with(&app, None).await;
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    expect_error(missing, 401, "unauthorized").await;
    let wrong = invoke_with(&app, Some("Bearer not-the-key")).await;
    let message = expect_error(wrong, 401, "unauthorized").await;
    assert!(!message.contains("not-the-key"));
    expect_error(
        app.get("/stream?model=llama3&prompt=hi").await,
        401,
        "unauthorized",
    )
    .await;
    match connect_async(app.ws_url("model=llama3")).await.unwrap_err() {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 401),
        other => panic!("expected 401 at the handshake, got {other:?}"),
    }
    assert!(app.emulator.requests().is_empty());
    assert_eq!(
        app.get("/healthz").await.status(),
        200,
        "health needs no key"
    );
    assert_eq!(
        app.get("/models").await.status(),
        200,
        "the model list needs no key"
    );
}

#[tokio::test]
async fn a_key_works_as_bearer_header_query_parameter_and_websocket_subprotocol() {
    let app = with_keys("").spawn().await;
    assert_eq!(
        invoke_with(&app, Some(&format!("Bearer {KEY}")))
            .await
            .status(),
        200
    );
    assert_eq!(
        invoke_with(&app, Some(&format!("Bearer {ENV_KEY}")))
            .await
            .status(),
        200,
        "MODELGATE_API_KEYS"
    );
    let sse = app
        .get(&format!("/stream?model=llama3&prompt=hi&api_key={KEY}"))
        .await;
    assert_eq!(sse.status(), 200, "EventSource cannot set headers");

    let mut request = app.ws_url("model=llama3").into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("modelgate.v1, bearer.{KEY}")).unwrap(),
    );
    let (mut socket, response) = connect_async(request)
        .await
        .expect("the key opens the socket");
    assert_eq!(response.headers()["sec-websocket-protocol"], "modelgate.v1");
    socket
        .send(Message::text(r#"{"prompt": "hi"}"#))
        .await
        .unwrap();
    let frame = socket.next().await.unwrap().unwrap();
    assert!(frame.to_text().unwrap().contains("chunk"), "{frame:?}");

    // Only `modelgate.v1` is ever selected (the key would leak into logs), so a text-mode
    // browser client sends its key as a query parameter.
    connect_async(app.ws_url(&format!("model=llama3&streaming=1&api_key={KEY}")))
        .await
        .expect("text mode with a key");
}

#[tokio::test]
async fn requests_over_the_keys_per_minute_limit_get_429_rate_limited_with_retry_after() {
    let app = with_keys("requests_per_minute = 2").spawn().await;
    let bearer = format!("Bearer {KEY}");
    for _ in 0..2 {
        assert_eq!(invoke_with(&app, Some(&bearer)).await.status(), 200);
    }
    let refused = invoke_with(&app, Some(&bearer)).await;
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let message = expect_error(refused, 429, "rate_limited").await;
    assert!(message.contains("team-a"), "{message}");
    assert_eq!(
        invoke_with(&app, Some(&format!("Bearer {ENV_KEY}")))
            .await
            .status(),
        200,
        "other keys are not affected"
    );
}

#[tokio::test]
async fn a_key_holds_at_most_its_concurrent_streams_and_its_tokens_per_minute() {
    let app = with_keys("concurrent_streams = 1, tokens_per_minute = 30")
        .spawn()
        .await;
    app.emulator.script(LLAMA_ID, Scenario::stall(["…"]));
    let held = app
        .get(&format!("/stream?model=llama3&prompt=hi&api_key={KEY}"))
        .await;
    assert_eq!(held.status(), 200);
    let second = app
        .get(&format!("/stream?model=llama3&prompt=hi&api_key={KEY}"))
        .await;
    expect_error(second, 429, "rate_limited").await;
    drop(held);
    app.emulator
        .wait_streams_ended(1, Duration::from_secs(1))
        .await;

    // 7 input + 40 output tokens: more than the key's 30 per minute.
    app.emulator.script(LLAMA_ID, Scenario::reply(["t"; 40]));
    let bearer = format!("Bearer {KEY}");
    assert_eq!(invoke_with(&app, Some(&bearer)).await.status(), 200);
    expect_error(invoke_with(&app, Some(&bearer)).await, 429, "rate_limited").await;
}

#[tokio::test]
async fn the_tokens_of_an_answer_that_fails_midway_count_against_the_key() {
    let app = with_keys("tokens_per_minute = 30").spawn().await;
    // 7 input + 40 output tokens before the failure: more than the key's 30 per minute.
    app.emulator.script(
        LLAMA_ID,
        Scenario::ExceptionAfter {
            pieces: vec!["t".into(); 40],
            exception_type: "modelStreamErrorException".into(),
            message: "broke".into(),
        },
    );
    let events = all_sse_events(
        app.get(&format!("/stream?model=llama3&prompt=hi&api_key={KEY}"))
            .await,
    )
    .await;
    assert_eq!(events.last().unwrap().event, "error");
    app.emulator.script(LLAMA_ID, Scenario::reply(["t"]));
    let bearer = format!("Bearer {KEY}");
    expect_error(invoke_with(&app, Some(&bearer)).await, 429, "rate_limited").await;
}

#[tokio::test]
async fn keys_and_aws_secrets_never_reach_the_logs_or_the_metrics() {
    let app = with_keys("").spawn().await;
    invoke_with(&app, Some(&format!("Bearer {KEY}"))).await;
    invoke_with(&app, Some("Bearer a-wrong-key-to-log")).await;
    app.get(&format!("/stream?model=llama3&prompt=hi&api_key={KEY}"))
        .await
        .text()
        .await
        .unwrap();
    let metrics = app.metrics(Some(KEY)).await;
    assert!(
        metrics.contains(r#"key="team-a""#),
        "tokens are counted by key id: {metrics}"
    );
    let logs = app.logs();
    assert!(logs.contains("team-a"), "debug logs were captured");
    for secret in [KEY, ENV_KEY, SECRET_KEY, "a-wrong-key-to-log"] {
        assert!(!logs.contains(secret), "{secret} in the logs");
        assert!(!metrics.contains(secret), "{secret} in the metrics");
    }
}

#[tokio::test]
async fn without_keys_the_gateway_refuses_a_non_loopback_address_unless_told_to() {
    let file = crate::app::config_file(&registry("http://127.0.0.1:9"));
    let output = gateway_command(false)
        .arg("--config")
        .arg(file.path())
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("--insecure-no-auth") && stderr.contains("API keys"),
        "{stderr}"
    );
}
