//! Running it: metrics, logs, CORS, graceful shutdown.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

use crate::app::{CLAUDE_ID, LLAMA_ID, TestApp};
use crate::client::{all_sse_events, connect, connect_json, next_json, sse_events};
use crate::emulator::Scenario;

#[tokio::test]
async fn metrics_count_requests_tokens_latency_and_streams_in_prometheus_format() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["a", "b", "c"]))
        .spawn()
        .await;
    app.post("/invoke", &json!({"model": "llama3", "prompt": "hi"}))
        .await;
    all_sse_events(app.get("/stream?model=llama3&prompt=hi").await).await;
    app.post("/invoke", &json!({"model": "nope", "prompt": "hi"}))
        .await;
    let response = app.get("/metrics").await;
    assert_eq!(response.status(), 200);
    let metrics = response.text().await.unwrap();
    for expected in [
        r#"modelgate_requests_total{route="/invoke",model="llama3",status="200"} 1"#,
        r#"modelgate_requests_total{route="/stream",model="llama3",status="200"} 1"#,
        r#"modelgate_requests_total{route="/invoke",model="",status="404"} 1"#,
        r#"modelgate_tokens_total{model="llama3",key="none",direction="input"} 14"#,
        r#"modelgate_tokens_total{model="llama3",key="none",direction="output"} 6"#,
        // `/invoke` is a stream collected: its first chunk is measured too.
        r#"modelgate_first_chunk_seconds_count{model="llama3"} 2"#,
        r#"modelgate_upstream_seconds_count{model="llama3"} 2"#,
        r#"modelgate_gateway_overhead_seconds_count{route="/invoke"} 1"#,
        r#"modelgate_active_streams{transport="sse"} 0"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing `{expected}` in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn an_answer_that_fails_midway_still_counts_the_tokens_generated() {
    let app = TestApp::new()
        .scenario(
            LLAMA_ID,
            Scenario::ExceptionAfter {
                pieces: vec!["one".into(), " two".into()],
                exception_type: "modelStreamErrorException".into(),
                message: "broke".into(),
            },
        )
        .spawn()
        .await;
    let events = all_sse_events(app.get("/stream?model=llama3&prompt=hi").await).await;
    assert_eq!(events.last().unwrap().event, "error");
    let metrics = app.metrics(None).await;
    for expected in [
        r#"modelgate_tokens_total{model="llama3",key="none",direction="input"} 7"#,
        r#"modelgate_tokens_total{model="llama3",key="none",direction="output"} 2"#,
        r#"modelgate_upstream_errors_total{model="llama3",code="upstream_error"} 1"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing `{expected}` in:\n{metrics}"
        );
    }
    assert!(app.logs().contains("usage so far"), "{}", app.logs());
}

#[tokio::test]
async fn json_logs_carry_the_request_id_on_every_line_of_a_request() {
    let app = TestApp::new()
        .env("MODELGATE_LOG_FORMAT", "json")
        .spawn()
        .await;
    let response = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .header("x-request-id", "json-log-check")
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let logs = app.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    let answered = lines
        .iter()
        .find(|line| {
            line["fields"]["message"] == "answered"
                && line["span"]["request_id"] == "json-log-check"
        })
        .unwrap_or_else(|| panic!("no `answered` line for the request: {logs}"));
    assert_eq!(answered["fields"]["status"], 200);
    assert_eq!(answered["span"]["path"], "/invoke");
}

#[tokio::test]
async fn the_access_log_names_an_unknown_model_and_the_metrics_do_not() {
    let app = TestApp::new().spawn().await;
    let response = app
        .post(
            "/invoke",
            &json!({"model": "gpt-nine\nFORGED", "prompt": "hi"}),
        )
        .await;
    assert_eq!(response.status(), 404);
    let metrics = app.metrics(None).await;
    let logs = app.logs();
    let answered = logs
        .lines()
        .find(|line| line.contains("answered") && line.contains("status=404"))
        .unwrap_or_else(|| panic!("no `answered` line for the request: {logs}"));
    assert!(
        answered.contains(r#"model="gpt-nine\nFORGED""#),
        "{answered}"
    );
    assert!(
        !logs.lines().any(|line| line.starts_with("FORGED")),
        "{logs}"
    );
    assert!(
        metrics.contains(r#"modelgate_requests_total{route="/invoke",model="",status="404"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains("gpt-nine"), "{metrics}");
}

#[tokio::test]
async fn cors_answers_listed_origins_and_refuses_others() {
    let app = TestApp::new()
        .settings("allowed_origins = [\"https://chat.example.com\"]")
        .spawn()
        .await;
    let client = reqwest::Client::new();
    let preflight = client
        .request(reqwest::Method::OPTIONS, format!("{}/invoke", app.url))
        .header("origin", "https://chat.example.com")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type, authorization",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );
    let allowed = client
        .post(format!("{}/invoke", app.url))
        .header("origin", "https://chat.example.com")
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://chat.example.com"
    );

    let foreign = client
        .post(format!("{}/invoke", app.url))
        .header("origin", "https://evil.example")
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), 403);
    assert!(
        !foreign
            .headers()
            .contains_key("access-control-allow-origin")
    );
    assert_eq!(
        app.emulator.requests().len(),
        1,
        "the foreign request reached nothing"
    );

    let same_origin = client
        .post(format!("{}/invoke", app.url))
        .header("origin", &app.url)
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        same_origin.status(),
        200,
        "the gateway's own pages need no listing"
    );
}

#[tokio::test]
async fn shutdown_lets_short_answers_finish_ends_long_ones_refuses_new_work_and_exits_0() {
    let mut app = TestApp::new()
        .settings("shutdown_grace = \"1500ms\"")
        .spawn()
        .await;
    // A short answer (finishes within the grace period) and a long one (does not).
    app.emulator.script(
        CLAUDE_ID,
        Scenario::reply(vec!["short"; 5])
            .paced(Duration::from_millis(100))
            .input_tokens(1),
    );
    app.emulator.script(
        LLAMA_ID,
        Scenario::reply(vec!["long"; 100])
            .paced(Duration::from_millis(100))
            .input_tokens(1),
    );
    let mut short = sse_events(app.get("/stream?model=anthropic&prompt=hi").await);
    let mut long = sse_events(app.get("/stream?model=llama3&prompt=hi").await);
    let mut socket = connect_json(&app, "llama3").await;
    socket
        .send(Message::text(r#"{"prompt": "hi"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "chunk");
    let mut idle_socket = connect(&app, "model=llama3").await;
    short.next().await.unwrap();
    long.next().await.unwrap();

    app.terminate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 503);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "draining");
    let refused = app
        .post("/invoke", &json!({"model": "anthropic", "prompt": "hi"}))
        .await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.json::<Value>().await.unwrap()["error"]["code"],
        "shutting_down"
    );
    match idle_socket.next().await {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("an idle WebSocket is closed with 1001 at once, got {other:?}"),
    }

    let short_events: Vec<_> = short.collect().await;
    assert_eq!(
        short_events.last().unwrap().event,
        "done",
        "an answer that fits in the grace period completes"
    );
    let long_events: Vec<_> = long.collect().await;
    let last = long_events.last().unwrap();
    assert_eq!(last.event, "error");
    assert_eq!(last.data["error"]["code"], "shutting_down");
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "error" {
                    assert_eq!(frame["error"]["code"], "shutting_down");
                }
            }
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, CloseCode::Away);
                break;
            }
            other => panic!("expected frames then a 1001 close, got {other:?}"),
        }
    }
    assert_eq!(app.exit_code(Duration::from_secs(10)).await, Some(0));
    app.emulator
        .wait_streams_ended(3, Duration::from_secs(1))
        .await;
    assert_eq!(
        app.emulator.open_streams(),
        0,
        "no upstream call outlives the gateway"
    );
}
