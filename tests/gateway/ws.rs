//! `/ws/model`: the tutorial's text mode and the JSON mode for chat front ends.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

use crate::app::{CLAUDE_ID, LLAMA_ID, TestApp};
use crate::client::{connect, connect_json, next_json, next_message, next_text};
use crate::emulator::Scenario;

fn slow_reply(pieces: usize) -> Scenario {
    Scenario::reply((0..pieces).map(|i| format!("{i} ")))
        .paced(Duration::from_millis(50))
        .input_tokens(1)
}

#[tokio::test]
async fn text_mode_without_streaming_answers_each_prompt_with_one_message() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["Hello", ", ", "world"]))
        .spawn()
        .await;
    app.emulator
        .script(CLAUDE_ID, Scenario::reply(["Bonjour", " !"]));
    for (model, expected) in [("llama3", "Hello, world"), ("anthropic", "Bonjour !")] {
        for query in [
            format!("model={model}"),
            format!("model={model}&streaming=0"),
            format!("model={model}&streaming=false"),
        ] {
            let mut socket = connect(&app, &query).await;
            socket.send(Message::text("Say hello")).await.unwrap();
            assert_eq!(next_text(&mut socket).await, expected, "{query}");
            socket.send(Message::text("Again")).await.unwrap();
            assert_eq!(
                next_text(&mut socket).await,
                expected,
                "{query}: the connection serves the next prompt"
            );
        }
    }
    let last = app.emulator.requests().pop().unwrap();
    assert_eq!(
        last.body["messages"],
        json!([{"role": "user", "content": "Again"}])
    );
}

#[tokio::test]
async fn text_mode_with_streaming_sends_each_piece_as_its_own_message() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["One", " two", " three"]))
        .spawn()
        .await;
    for flag in ["1", "true", "yes"] {
        let mut socket = connect(&app, &format!("model=llama3&streaming={flag}")).await;
        socket.send(Message::text("Count")).await.unwrap();
        for piece in ["One", " two", " three"] {
            assert_eq!(next_text(&mut socket).await, piece, "streaming={flag}");
        }
    }
    let prompt = app.emulator.requests()[0].body["prompt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(prompt.contains("<|start_header_id|>user<|end_header_id|>\n\nCount<|eot_id|>"));
}

#[tokio::test]
async fn a_binary_prompt_is_answered_in_binary() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["héllo", " wörld"]))
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3&streaming=1").await;
    socket
        .send(Message::binary("Grüß dich".as_bytes().to_vec()))
        .await
        .unwrap();
    for piece in ["héllo", " wörld"] {
        match next_message(&mut socket).await {
            Message::Binary(bytes) => assert_eq!(std::str::from_utf8(&bytes).unwrap(), piece),
            other => panic!("expected binary, got {other:?}"),
        }
    }
    assert!(
        app.emulator.requests()[0].body["prompt"]
            .as_str()
            .unwrap()
            .contains("Grüß dich")
    );
}

#[tokio::test]
async fn text_mode_reports_a_failure_as_an_error_message_and_stays_open() {
    let app = TestApp::new()
        .scenario(
            LLAMA_ID,
            Scenario::HttpError {
                status: 429,
                error_type: "ThrottlingException".into(),
                message: "Too many requests".into(),
            },
        )
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3&streaming=1").await;
    socket.send(Message::text("hi")).await.unwrap();
    let error = next_text(&mut socket).await;
    assert!(
        error.starts_with("error: ") && error.contains("Too many requests"),
        "{error}"
    );

    app.emulator.script(
        LLAMA_ID,
        Scenario::ExceptionAfter {
            pieces: vec!["par".into()],
            exception_type: "modelStreamErrorException".into(),
            message: "model crashed".into(),
        },
    );
    socket.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "par");
    let error = next_text(&mut socket).await;
    assert!(
        error.starts_with("error: ") && error.contains("model crashed"),
        "{error}"
    );

    app.emulator.script(LLAMA_ID, Scenario::reply(["fine"]));
    socket.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "fine");
}

#[tokio::test]
async fn json_mode_streams_chunk_frames_then_done() {
    let app = TestApp::new()
        .scenario(CLAUDE_ID, Scenario::reply(["Hi", " there"]))
        .spawn()
        .await;
    let mut socket = connect_json(&app, "anthropic").await;
    socket
        .send(Message::text(
            json!({"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again"}], "system": "be kind", "max_tokens": 30}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "chunk", "text": "Hi"})
    );
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "chunk", "text": " there"})
    );
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "done", "stop_reason": "end_turn", "usage": {"input_tokens": 7, "output_tokens": 2}})
    );
    let body = &app.emulator.requests()[0].body;
    assert_eq!(body["messages"].as_array().unwrap().len(), 3);
    assert_eq!(body["system"], "be kind");
    assert_eq!(body["max_tokens"], 30);
}

#[tokio::test]
async fn json_mode_by_query_parameter_and_errors_as_frames() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["ok"]))
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3&format=json").await;
    socket
        .send(Message::text(r#"{"prompt": "hi", "temperature": 3}"#))
        .await
        .unwrap();
    let error = next_json(&mut socket).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "invalid_request");
    socket.send(Message::text("not json")).await.unwrap();
    assert_eq!(
        next_json(&mut socket).await["error"]["code"],
        "invalid_request"
    );
    socket
        .send(Message::text(r#"{"prompt": "hi", "model": "nope"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await["error"]["code"],
        "unknown_model"
    );

    app.emulator.script(
        LLAMA_ID,
        Scenario::ExceptionAfter {
            pieces: vec!["a".into()],
            exception_type: "throttlingException".into(),
            message: "slow down".into(),
        },
    );
    socket
        .send(Message::text(r#"{"prompt": "hi"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "chunk", "text": "a"})
    );
    let error = next_json(&mut socket).await;
    assert_eq!(error["error"]["code"], "throttled");

    app.emulator.script(LLAMA_ID, Scenario::reply(["ok"]));
    socket
        .send(Message::text(r#"{"prompt": "hi"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "chunk", "text": "ok"})
    );
}

#[tokio::test]
async fn json_mode_cancel_stops_the_generation_and_closes_the_upstream_stream() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, slow_reply(200))
        .spawn()
        .await;
    let mut socket = connect_json(&app, "llama3").await;
    socket
        .send(Message::text(r#"{"prompt": "count"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "chunk");
    socket
        .send(Message::text(r#"{"type": "cancel"}"#))
        .await
        .unwrap();
    loop {
        let frame = next_json(&mut socket).await;
        if frame["type"] != "chunk" {
            assert_eq!(frame["type"], "error");
            assert_eq!(frame["error"]["code"], "cancelled");
            break;
        }
    }
    app.assert_upstream_closed_within_a_second().await;

    app.emulator.script(LLAMA_ID, Scenario::reply(["next"]));
    socket
        .send(Message::text(r#"{"prompt": "again"}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "chunk", "text": "next"})
    );
}

#[tokio::test]
async fn closing_the_socket_mid_stream_closes_the_upstream_stream_within_a_second() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, slow_reply(200))
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3&streaming=1").await;
    socket.send(Message::text("count")).await.unwrap();
    next_text(&mut socket).await;
    socket.close(None).await.unwrap();
    drop(socket);
    app.assert_upstream_closed_within_a_second().await;
}

#[tokio::test]
async fn prompts_sent_ahead_are_answered_in_order() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["answer"]))
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3").await;
    for prompt in ["first", "second", "third"] {
        socket.send(Message::text(prompt)).await.unwrap();
    }
    for _ in 0..3 {
        assert_eq!(next_text(&mut socket).await, "answer");
    }
    let prompts: Vec<String> = app
        .emulator
        .requests()
        .iter()
        .map(|r| r.body["prompt"].as_str().unwrap().to_owned())
        .collect();
    for (prompt, expected) in prompts.iter().zip(["first", "second", "third"]) {
        assert!(prompt.contains(expected), "{prompts:?}");
    }
}

#[tokio::test]
async fn an_unknown_model_is_refused_at_the_handshake_with_404() {
    let app = TestApp::new().spawn().await;
    let err = connect_async(app.ws_url("model=nope")).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status(), 404);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "unknown_model");
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_foreign_origin_is_refused_at_the_handshake_and_a_listed_one_accepted() {
    let app = TestApp::new()
        .settings("allowed_origins = [\"https://chat.example.com\"]")
        .spawn()
        .await;
    let with_origin = |origin: &'static str| {
        let mut request = app.ws_url("model=llama3").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("origin", HeaderValue::from_static(origin));
        request
    };
    match connect_async(with_origin("https://evil.example"))
        .await
        .unwrap_err()
    {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    assert!(
        connect_async(with_origin("https://chat.example.com"))
            .await
            .is_ok()
    );
    let own = app.url.clone();
    let mut request = app.ws_url("model=llama3").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", HeaderValue::from_str(&own).unwrap());
    assert!(
        connect_async(request).await.is_ok(),
        "the gateway's own origin is allowed"
    );
}
