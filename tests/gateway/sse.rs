//! `GET /stream` and `POST /stream`: Server-Sent Events as the model writes, errors before
//! the stream as real statuses, errors after it as one `error` event.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

use crate::app::{CLAUDE_ID, LLAMA_ID, TestApp};
use crate::client::{Sse, all_sse_events, expect_error, sse_events};
use crate::emulator::{NativeStop, Operation, Scenario, StreamEnd};

fn chunk(text: &str) -> Sse {
    Sse {
        event: "chunk".into(),
        data: json!({"type": "chunk", "text": text}),
    }
}

#[tokio::test]
async fn get_stream_sends_each_piece_as_a_chunk_event_then_done_for_both_formats() {
    let app = TestApp::new().spawn().await;
    for (model, id) in [("llama3", LLAMA_ID), ("anthropic", CLAUDE_ID)] {
        app.emulator
            .script(id, Scenario::reply(["The", " capital", " is", " Paris."]));
        let response = app
            .get(&format!(
                "/stream?model={model}&prompt=Capital%20of%20France%3F&max_tokens=20&temperature=0"
            ))
            .await;
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        assert_eq!(headers["cache-control"], "no-cache");
        assert_eq!(headers["x-accel-buffering"], "no");

        let events = all_sse_events(response).await;
        assert_eq!(
            events,
            [
                chunk("The"),
                chunk(" capital"),
                chunk(" is"),
                chunk(" Paris."),
                Sse {
                    event: "done".into(),
                    data: json!({"type": "done", "stop_reason": "end_turn", "usage": {"input_tokens": 7, "output_tokens": 4}}),
                },
            ],
            "{model}"
        );
        let sent = app.emulator.requests().pop().unwrap();
        assert_eq!(sent.operation, Operation::InvokeStream);
        assert_eq!(sent.model_id, id);
    }
    let bodies: Vec<_> = app
        .emulator
        .requests()
        .into_iter()
        .map(|r| r.body)
        .collect();
    assert_eq!(bodies[0]["max_gen_len"], 20);
    assert_eq!(bodies[0]["temperature"], 0.0);
    assert_eq!(bodies[1]["max_tokens"], 20);
    assert_eq!(
        bodies[1]["messages"],
        json!([{"role": "user", "content": "Capital of France?"}])
    );
}

#[tokio::test]
async fn post_stream_takes_the_invoke_body() {
    let app = TestApp::new()
        .scenario(
            CLAUDE_ID,
            Scenario::reply(["a", "b"])
                .paced(Duration::from_millis(5))
                .stopping(NativeStop::MaxTokens)
                .input_tokens(12),
        )
        .spawn()
        .await;
    let response = app
        .post(
            "/stream",
            &json!({"model": "anthropic", "messages": [{"role": "user", "content": "hi"}], "system": "terse", "max_tokens": 2}),
        )
        .await;
    let events = all_sse_events(response).await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].data["stop_reason"], "max_tokens");
    assert_eq!(
        events[2].data["usage"],
        json!({"input_tokens": 12, "output_tokens": 2})
    );
    assert_eq!(app.emulator.requests()[0].body["system"], "terse");
}

#[tokio::test]
async fn chunks_are_forwarded_while_the_model_is_still_writing() {
    let app = TestApp::new()
        .scenario(
            LLAMA_ID,
            Scenario::reply((0..6).map(|i| format!("piece{i} ")))
                .paced(Duration::from_millis(300))
                .input_tokens(1),
        )
        .spawn()
        .await;
    let response = app.get("/stream?model=llama3&prompt=go").await;
    let mut events = sse_events(response);
    let first = events.next().await.unwrap();
    assert_eq!(first, chunk("piece0 "));
    assert_eq!(
        app.emulator.open_streams(),
        1,
        "the first piece reached the client while upstream was still generating"
    );
    let second = events.next().await.unwrap();
    assert_eq!(second, chunk("piece1 "));
    assert_eq!(app.emulator.open_streams(), 1);
}

#[tokio::test]
async fn an_error_before_the_first_chunk_is_a_real_status_not_a_200() {
    let app = TestApp::new()
        .scenario(
            LLAMA_ID,
            Scenario::HttpError {
                status: 400,
                error_type: "ValidationException".into(),
                message: "Malformed input request".into(),
            },
        )
        .spawn()
        .await;
    expect_error(
        app.get("/stream?model=llama3&prompt=hi").await,
        400,
        "invalid_request",
    )
    .await;
    app.emulator.script(
        CLAUDE_ID,
        Scenario::ExceptionAfter {
            pieces: vec![],
            exception_type: "modelStreamErrorException".into(),
            message: "the model failed at once".into(),
        },
    );
    let message = expect_error(
        app.get("/stream?model=anthropic&prompt=hi").await,
        502,
        "upstream_error",
    )
    .await;
    assert!(message.contains("the model failed at once"), "{message}");
    expect_error(
        app.get("/stream?model=nope&prompt=hi").await,
        404,
        "unknown_model",
    )
    .await;
    expect_error(
        app.get("/stream?model=llama3").await,
        400,
        "invalid_request",
    )
    .await;
    expect_error(
        app.get("/stream?model=llama3&prompt=hi&temperature=7")
            .await,
        400,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn a_mid_stream_exception_is_one_error_event_and_the_server_carries_on() {
    let app = TestApp::new().spawn().await;
    let cases = [
        ("throttlingException", "throttled"),
        ("modelStreamErrorException", "upstream_error"),
        ("internalServerException", "upstream_error"),
        ("validationException", "invalid_request"),
        ("modelTimeoutException", "upstream_timeout"),
        ("serviceUnavailableException", "upstream_unavailable"),
    ];
    for (exception_type, code) in cases {
        app.emulator.script(
            LLAMA_ID,
            Scenario::ExceptionAfter {
                pieces: vec!["partial".into(), " answer".into()],
                exception_type: exception_type.into(),
                message: format!("{exception_type} happened"),
            },
        );
        let events = all_sse_events(app.get("/stream?model=llama3&prompt=hi").await).await;
        assert_eq!(events.len(), 3, "{exception_type}: {events:?}");
        assert_eq!(events[..2], [chunk("partial"), chunk(" answer")]);
        assert_eq!(events[2].event, "error");
        assert_eq!(events[2].data["type"], "error");
        assert_eq!(events[2].data["error"]["code"], code, "{exception_type}");
        let message = events[2].data["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("{exception_type} happened")),
            "{message}"
        );
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn an_unmodeled_error_frame_or_a_dropped_connection_ends_the_stream_with_an_error_event() {
    let app = TestApp::new()
        .scenario(
            CLAUDE_ID,
            Scenario::ErrorFrameAfter {
                pieces: vec!["half".into()],
                code: "InternalFailure".into(),
                message: "something broke".into(),
            },
        )
        .spawn()
        .await;
    let events = all_sse_events(app.get("/stream?model=anthropic&prompt=hi").await).await;
    assert_eq!(events[0], chunk("half"));
    assert_eq!(events[1].event, "error");
    assert_eq!(events[1].data["error"]["code"], "upstream_error");
    assert!(
        events[1].data["error"]["message"]
            .as_str()
            .unwrap()
            .contains("something broke")
    );
    assert_eq!(events.len(), 2);

    app.emulator.script(
        CLAUDE_ID,
        Scenario::DropAfter {
            pieces: vec!["cut".into()],
        },
    );
    let events = all_sse_events(app.get("/stream?model=anthropic&prompt=hi").await).await;
    assert_eq!(events[0], chunk("cut"));
    assert_eq!(
        events[1].event, "error",
        "a dropped upstream is an error, not an end: {events:?}"
    );
    assert_eq!(events.len(), 2);
}

#[tokio::test]
async fn a_client_that_leaves_mid_stream_closes_the_upstream_stream_within_a_second() {
    let app = TestApp::new()
        .scenario(
            LLAMA_ID,
            Scenario::reply((0..100).map(|i| format!("{i} ")))
                .paced(Duration::from_millis(50))
                .input_tokens(1),
        )
        .spawn()
        .await;
    let response = app.get("/stream?model=llama3&prompt=count").await;
    let mut events = sse_events(response);
    assert_eq!(events.next().await.unwrap(), chunk("0 "));
    drop(events);

    let ends = app
        .emulator
        .wait_streams_ended(1, Duration::from_secs(1))
        .await;
    assert!(
        matches!(ends[0], StreamEnd::ClientClosed { after_chunks } if after_chunks < 100),
        "{ends:?}"
    );
}
