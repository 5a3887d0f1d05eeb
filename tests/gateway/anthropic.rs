//! Anthropic's Messages API, `/v1/messages` and `/v1/messages/count_tokens`, as the Anthropic
//! SDKs and Claude Code speak it: the shapes, the order of the streamed events, Anthropic's
//! error bodies on every refusal, what the upstream received, cancellation.

use std::time::Duration;

use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::app::{App, CLAUDE_ID, LLAMA_ID, TestApp, registry};
use crate::cancellation::leaving_a_post_stops_the_upstream;
use crate::client::{all_sse_events, sse_events};
use crate::converse::{
    CLAUDE_37, base64, converse_registry, last_converse, unbase64, weather_tool,
};
use crate::emulator::{NativeStop, Operation, Scenario};
use crate::openai_compat::python;

const KEY: &str = "sk-anthropic-test-key";

fn hello(model: &str) -> Value {
    json!({
        "model": model,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hi"}],
    })
}

/// Posts `body` to `/v1/messages`, asserts a 200, returns the message.
async fn whole_message(app: &App, body: &Value) -> Value {
    let response = app.post("/v1/messages", body).await;
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON message")
}

/// Posts `body` to `/v1/messages`, asserts a 400 `invalid_request_error`, returns its message.
async fn refused(app: &App, body: &Value) -> String {
    expect_anthropic_error(
        app.post("/v1/messages", body).await,
        400,
        "invalid_request_error",
    )
    .await
}

/// Asserts Anthropic's error body with `status` and `kind`, and returns its message.
async fn expect_anthropic_error(response: reqwest::Response, status: u16, kind: &str) -> String {
    assert_eq!(response.status().as_u16(), status, "{}", response.url());
    let body: Value = response.json().await.expect("a JSON error body");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    body["error"]["message"]
        .as_str()
        .expect("an error message")
        .to_owned()
}

#[tokio::test]
async fn a_message_has_anthropics_shape_and_the_model_gets_the_conversation() {
    let app = TestApp::new().spawn().await;
    let response = app
        .post(
            "/v1/messages",
            &json!({
                "model": "anthropic",
                "max_tokens": 64,
                "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Greet the world"},
                ],
                "temperature": 0.2,
                "top_p": 0.9,
                "stop_sequences": ["END"],
                "metadata": {"user_id": "u-1"},
            }),
        )
        .await;
    let message: Value = response.json().await.unwrap();
    assert!(
        message["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_")),
        "{message}"
    );
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["model"], "anthropic");
    assert_eq!(
        message["content"],
        json!([{"type": "text", "text": "Hello, world!"}])
    );
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["stop_sequence"], Value::Null);
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 7, "output_tokens": 4})
    );
    let sent = &app.emulator.requests()[0];
    assert_eq!(sent.model_id, CLAUDE_ID);
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(sent.body["max_tokens"], 64);
    assert_eq!(sent.body["temperature"], 0.2);
    assert_eq!(sent.body["stop_sequences"], json!(["END"]));
    assert_eq!(sent.body["messages"].as_array().unwrap().len(), 3);
    assert_eq!(sent.body["messages"][0]["content"], "Hi");
    assert_eq!(sent.body["messages"][2]["content"], "Greet the world");
}

#[tokio::test]
async fn what_claude_code_sends_is_accepted() {
    let app = TestApp::new().spawn().await;
    let response = reqwest::Client::new()
        // The SDK's `beta.messages` adds `?beta=true`.
        .post(format!("{}/v1/messages?beta=true", app.url))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "claude-code-20250219,interleaved-thinking-2025-05-14")
        .json(&with(
            hello("anthropic"),
            json!({
                "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}},
                ]}],
                "metadata": {"user_id": "user_abc_account__session_123"},
                "temperature": 1,
                "context_management": {"edits": []},
                "stream": true,
            }),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = all_sse_events(response).await;
    assert_eq!(events.last().unwrap().event, "message_stop");
}

#[tokio::test]
async fn stop_reasons_and_the_stop_sequence_are_anthropics() {
    let app = TestApp::new()
        .scenario(
            CLAUDE_ID,
            Scenario::reply(["Done"]).stopping(NativeStop::StopSequence),
        )
        .scenario(
            LLAMA_ID,
            Scenario::reply(["Cut"]).stopping(NativeStop::MaxTokens),
        )
        .spawn()
        .await;
    let stopped: Value = app
        .post(
            "/v1/messages",
            &with(hello("anthropic"), json!({"stop_sequences": ["END"]})),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stopped["stop_reason"], "stop_sequence");
    assert_eq!(stopped["stop_sequence"], "END");
    let cut: Value = whole_message(&app, &hello("llama3")).await;
    assert_eq!(cut["stop_reason"], "max_tokens");
    assert_eq!(cut["content"][0]["text"], "Cut");
}

/// `base` with the fields of `overrides` set.
fn with(mut base: Value, overrides: Value) -> Value {
    for (field, value) in overrides.as_object().expect("an object") {
        base[field] = value.clone();
    }
    base
}

fn event_names(events: &[crate::client::Sse]) -> Vec<&str> {
    events.iter().map(|event| event.event.as_str()).collect()
}

#[tokio::test]
async fn a_streamed_message_gives_anthropics_events_in_order_with_the_usage_at_the_end() {
    let app = TestApp::new().spawn().await;
    let response = app
        .post(
            "/v1/messages",
            &with(hello("anthropic"), json!({"stream": true})),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = all_sse_events(response).await;
    assert_eq!(
        event_names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    for event in &events {
        assert_eq!(event.data["type"], event.event, "{event:?}");
    }
    let start = &events[0].data["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(
        start["usage"],
        json!({"input_tokens": 0, "output_tokens": 0})
    );
    assert_eq!(
        events[2].data["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events[3..7]
        .iter()
        .map(|event| {
            assert_eq!(event.data["index"], 0);
            assert_eq!(event.data["delta"]["type"], "text_delta");
            event.data["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "Hello, world!");
    assert_eq!(events[7].data["index"], 0);
    assert_eq!(
        events[8].data["delta"],
        json!({"stop_reason": "end_turn", "stop_sequence": null})
    );
    assert_eq!(
        events[8].data["usage"],
        json!({"input_tokens": 7, "output_tokens": 4})
    );
}

#[tokio::test]
async fn a_failure_after_the_stream_began_is_one_error_event_and_the_end() {
    let app = TestApp::new()
        .scenario(
            CLAUDE_ID,
            Scenario::ExceptionAfter {
                pieces: vec!["Hel".into()],
                exception_type: "modelStreamErrorException".into(),
                message: "the model broke".into(),
            },
        )
        .spawn()
        .await;
    let response = app
        .post(
            "/v1/messages",
            &with(hello("anthropic"), json!({"stream": true})),
        )
        .await;
    let events = all_sse_events(response).await;
    assert_eq!(
        event_names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "error"
        ]
    );
    let error = &events[4].data;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "api_error", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the model broke")
    );
}

#[tokio::test]
async fn requests_are_refused_in_anthropics_shape_naming_what_is_wrong() {
    let app = TestApp::new().spawn().await;
    let missing = json!({"model": "anthropic", "messages": [{"role": "user", "content": "Hi"}]});
    let message = refused(&app, &missing).await;
    assert!(message.contains("max_tokens"), "{message}");
    let message = expect_anthropic_error(
        app.post("/v1/messages", &hello("nope")).await,
        404,
        "not_found_error",
    )
    .await;
    assert!(message.contains("`nope`"), "{message}");
    let remote_image = with(
        hello("anthropic"),
        json!({
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.png"}},
        ]}]}),
    );
    let message = refused(&app, &remote_image).await;
    assert!(
        message.contains("messages[0].content[0].source") && message.contains("does not fetch"),
        "{message}"
    );
    let image = with(
        hello("llama3"),
        json!({
        "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        ]}]}),
    );
    let message = refused(&app, &image).await;
    assert!(
        message.contains("model `llama3` cannot take `image` blocks"),
        "{message}"
    );
    for (field, value) in [
        ("top_k", json!(5)),
        (
            "thinking",
            json!({"type": "enabled", "budget_tokens": 1024}),
        ),
    ] {
        let mut request = hello("anthropic");
        request[field] = value;
        let message = refused(&app, &request).await;
        assert!(
            message.contains(&format!("does not take `{field}`"))
                && message.contains("allow_request_additional_fields"),
            "{message}"
        );
    }
    let empty_stop = with(hello("anthropic"), json!({"stop_sequences": [""]}));
    let message = refused(&app, &empty_stop).await;
    assert!(message.contains("`stop_sequences`"), "{message}");
    let thinking_off = with(
        hello("anthropic"),
        json!({"thinking": {"type": "disabled"}}),
    );
    assert_eq!(app.post("/v1/messages", &thinking_off).await.status(), 200);
    assert_eq!(app.emulator.requests()[0].body.get("thinking"), None);
    let server_tool = with(
        hello("anthropic"),
        json!({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}),
    );
    let message = refused(&app, &server_tool).await;
    assert!(message.contains("server tool"), "{message}");
    let not_json = reqwest::Client::new()
        .post(format!("{}/v1/messages", app.url))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    expect_anthropic_error(not_json, 400, "invalid_request_error").await;
    assert_eq!(
        app.emulator.requests().len(),
        1,
        "only the request with thinking off reached the model"
    );
}

#[tokio::test]
async fn keys_limits_and_upstream_failures_map_to_the_sdks_error_classes() {
    let app = TestApp::new()
        .api_key("team", KEY, "requests_per_minute = 2")
        .settings("max_body_bytes = 2000")
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
    let client = reqwest::Client::new();
    let url = format!("{}/v1/messages", app.url);
    let anonymous = client
        .post(&url)
        .json(&hello("anthropic"))
        .send()
        .await
        .unwrap();
    expect_anthropic_error(anonymous, 401, "authentication_error").await;
    let wrong = client
        .post(&url)
        .header("x-api-key", "wrong")
        .json(&hello("anthropic"))
        .send()
        .await
        .unwrap();
    expect_anthropic_error(wrong, 401, "authentication_error").await;
    let huge = client
        .post(&url)
        .header("x-api-key", KEY)
        .json(&with(
            hello("anthropic"),
            json!({"system": "x".repeat(3000)}),
        ))
        .send()
        .await
        .unwrap();
    expect_anthropic_error(huge, 413, "request_too_large").await;
    let throttled = client
        .post(&url)
        .header("x-api-key", KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&hello("llama3"))
        .send()
        .await
        .unwrap();
    assert!(throttled.headers().contains_key("retry-after"));
    expect_anthropic_error(throttled, 429, "rate_limit_error").await;
    let served = client
        .post(&url)
        .header("authorization", format!("Bearer {KEY}"))
        .json(&hello("anthropic"))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let over_limit = client
        .post(&url)
        .header("x-api-key", KEY)
        .json(&hello("anthropic"))
        .send()
        .await
        .unwrap();
    assert!(over_limit.headers().contains_key("retry-after"));
    expect_anthropic_error(over_limit, 429, "rate_limit_error").await;
}

#[tokio::test]
async fn an_unavailable_upstream_is_an_overloaded_error() {
    let app = TestApp::new()
        .scenario(
            CLAUDE_ID,
            Scenario::HttpError {
                status: 503,
                error_type: "ServiceUnavailableException".into(),
                message: "busy".into(),
            },
        )
        .spawn()
        .await;
    let response = app.post("/v1/messages", &hello("anthropic")).await;
    expect_anthropic_error(response, 503, "overloaded_error").await;
}

#[tokio::test]
async fn the_models_timeouts_hold_and_are_timeout_errors() {
    let app = TestApp::new()
        .registry(|url| {
            registry(url).replacen(
                "endpoint_url",
                "upstream = { first_token_timeout = \"400ms\", idle_timeout = \"400ms\" }\nendpoint_url",
                1,
            )
        })
        .scenario(LLAMA_ID, Scenario::Stall { pieces: vec![] })
        .spawn()
        .await;
    let message = expect_anthropic_error(
        app.post("/v1/messages", &hello("llama3")).await,
        504,
        "timeout_error",
    )
    .await;
    assert!(message.contains("first token"), "{message}");
    app.emulator
        .script(LLAMA_ID, Scenario::stall(["thinking..."]));
    let response = app
        .post(
            "/v1/messages",
            &with(hello("llama3"), json!({"stream": true})),
        )
        .await;
    let events = all_sse_events(response).await;
    let last = events.last().unwrap();
    assert_eq!(last.event, "error", "{events:?}");
    assert_eq!(last.data["error"]["type"], "timeout_error", "{last:?}");
}

#[tokio::test]
async fn a_streaming_client_that_leaves_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(CLAUDE_ID, Scenario::stall(["thinking..."]))
        .spawn()
        .await;
    let response = app
        .post(
            "/v1/messages",
            &with(hello("anthropic"), json!({"stream": true})),
        )
        .await;
    let mut events = sse_events(response);
    let mut names = Vec::new();
    while names.last().map(String::as_str) != Some("content_block_delta") {
        names.push(events.next().await.unwrap().event);
    }
    drop(events);
    app.assert_upstream_closed_within_a_second().await;
}

#[tokio::test]
async fn a_waiting_client_that_leaves_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(CLAUDE_ID, Scenario::stall(["thinking..."]))
        .spawn()
        .await;
    leaving_a_post_stops_the_upstream(&app, "/v1/messages", hello("anthropic")).await;
}

#[tokio::test]
async fn count_tokens_asks_bedrock_for_claude_and_says_where_a_model_cannot_count() {
    let app = TestApp::new()
        .scenario(CLAUDE_ID, Scenario::reply(["unused"]).input_tokens(42))
        .spawn()
        .await;
    let request = json!({
        "model": "anthropic",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "How many tokens is this?"}],
    });
    let response = app.post("/v1/messages/count_tokens", &request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"input_tokens": 42})
    );
    let sent = &app.emulator.requests()[0];
    assert_eq!(sent.operation, Operation::CountTokens);
    assert_eq!(sent.model_id, CLAUDE_ID);
    let body = base64::engine::general_purpose::STANDARD
        .decode(sent.body["input"]["invokeModel"]["body"].as_str().unwrap())
        .unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["system"], "Be brief.");
    assert_eq!(
        body["messages"][0]["content"], "How many tokens is this?",
        "{body}"
    );
    let llama = json!({"model": "llama3", "messages": [{"role": "user", "content": "Hi"}]});
    let message = expect_anthropic_error(
        app.post("/v1/messages/count_tokens", &llama).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(
        message.starts_with("model `llama3` cannot count tokens"),
        "{message}"
    );
    assert_eq!(app.emulator.requests().len(), 1);
}

#[tokio::test]
async fn the_routes_have_their_own_metrics_labels() {
    let app: App = TestApp::new().spawn().await;
    assert_eq!(
        app.post("/v1/messages", &hello("anthropic")).await.status(),
        200
    );
    let metrics = app.metrics(None).await;
    assert!(
        metrics.contains(
            r#"modelgate_requests_total{route="/v1/messages",model="anthropic",status="200"} 1"#
        ),
        "{metrics}"
    );
}

/// The model `claude` (Converse) with per-request fields allowed, for `thinking` and `top_k`.
fn converse_app() -> TestApp<'static> {
    TestApp::new().registry(converse_registry("allow_request_additional_fields = true"))
}

fn ask_claude(overrides: Value) -> Value {
    with(hello("claude"), overrides)
}

#[tokio::test]
async fn a_tool_call_streams_as_a_tool_use_block_with_input_json_deltas() {
    let app = converse_app()
        .scenario(
            CLAUDE_37,
            Scenario::converse().text(["Let me ", "check."]).tool_use(
                "tooluse_1",
                "weather",
                ["{\"ci", "ty\": \"Pa", "ris\"}"],
            ),
        )
        .spawn()
        .await;
    let question = ask_claude(json!({
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": weather_tool(),
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": true},
        "stream": true,
    }));
    let events = all_sse_events(app.post("/v1/messages", &question).await).await;
    assert_eq!(
        event_names(&events),
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    assert_eq!(
        events[6].data,
        json!({"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "tooluse_1", "name": "weather", "input": {}}})
    );
    let input: String = events[7..10]
        .iter()
        .map(|event| {
            assert_eq!(event.data["index"], 1);
            assert_eq!(event.data["delta"]["type"], "input_json_delta");
            event.data["delta"]["partial_json"].as_str().unwrap()
        })
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&input).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(events[10].data["index"], 1);
    assert_eq!(events[11].data["delta"]["stop_reason"], "tool_use");
    let sent = last_converse(&app).body;
    assert_eq!(sent["toolConfig"]["toolChoice"], json!({"auto": {}}));
    assert_eq!(
        sent["toolConfig"]["tools"][0]["toolSpec"]["name"],
        "weather"
    );

    let whole: Value = whole_message(&app, &with(question, json!({"stream": false}))).await;
    assert_eq!(
        whole["content"],
        json!([
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "tooluse_1", "name": "weather", "input": {"city": "Paris"}},
        ])
    );
    assert_eq!(whole["stop_reason"], "tool_use");
}

#[tokio::test]
async fn a_tool_result_goes_back_to_converse_and_tool_choice_names_a_tool() {
    let app = converse_app()
        .scenario(CLAUDE_37, Scenario::converse().text(["It is 18°C."]))
        .spawn()
        .await;
    let answer_turn = ask_claude(json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "tooluse_1", "name": "weather", "input": {"city": "Paris"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "tooluse_1",
                 "content": [{"type": "text", "text": "18°C"}], "cache_control": {"type": "ephemeral"}},
            ]},
        ],
        "tools": weather_tool(),
        "tool_choice": {"type": "tool", "name": "weather"},
    }));
    let answer: Value = whole_message(&app, &answer_turn).await;
    assert_eq!(
        answer["content"],
        json!([{"type": "text", "text": "It is 18°C."}])
    );
    let sent = last_converse(&app).body;
    assert_eq!(
        sent["messages"][1]["content"][1],
        json!({"toolUse": {"toolUseId": "tooluse_1", "name": "weather", "input": {"city": "Paris"}}})
    );
    assert_eq!(
        sent["messages"][2]["content"][0],
        json!({"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "18°C"}], "status": "success"}})
    );
    assert_eq!(
        sent["toolConfig"]["toolChoice"],
        json!({"tool": {"name": "weather"}})
    );

    // `none`: the model gets no tools; with tool calls in the conversation it cannot be.
    let no_tools = ask_claude(json!({"tools": weather_tool(), "tool_choice": {"type": "none"}}));
    assert_eq!(app.post("/v1/messages", &no_tools).await.status(), 200);
    assert_eq!(last_converse(&app).body.get("toolConfig"), None);
    let message = expect_anthropic_error(
        app.post(
            "/v1/messages",
            &with(answer_turn, json!({"tool_choice": {"type": "none"}})),
        )
        .await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(message.contains("`none`"), "{message}");
}

#[tokio::test]
async fn thinking_streams_with_its_signature_and_is_passed_to_the_model_with_top_k() {
    let app = converse_app()
        .scenario(
            CLAUDE_37,
            Scenario::converse()
                .reasoning(["The user ", "greets me."], "sig-abc==")
                .text(["Hello!"])
                .cache_tokens(5, 3),
        )
        .spawn()
        .await;
    let thinking = json!({"type": "enabled", "budget_tokens": 1024});
    let request = ask_claude(json!({"thinking": thinking, "top_k": 40, "stream": true}));
    let events = all_sse_events(app.post("/v1/messages", &request).await).await;
    let blocks: Vec<Value> = events
        .iter()
        .filter(|event| event.event.starts_with("content_block"))
        .map(|event| {
            let mut data = event.data.clone();
            data.as_object_mut().unwrap().remove("type");
            data
        })
        .collect();
    assert_eq!(
        blocks,
        [
            json!({"index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            json!({"index": 0, "delta": {"type": "thinking_delta", "thinking": "The user "}}),
            json!({"index": 0, "delta": {"type": "thinking_delta", "thinking": "greets me."}}),
            json!({"index": 0, "delta": {"type": "signature_delta", "signature": "sig-abc=="}}),
            json!({"index": 0}),
            json!({"index": 1, "content_block": {"type": "text", "text": ""}}),
            json!({"index": 1, "delta": {"type": "text_delta", "text": "Hello!"}}),
            json!({"index": 1}),
        ]
    );
    let usage = &events[events.len() - 2].data["usage"];
    assert_eq!(usage["cache_read_input_tokens"], 5, "{usage}");
    assert_eq!(usage["cache_creation_input_tokens"], 3, "{usage}");
    assert_eq!(
        last_converse(&app).body["additionalModelRequestFields"],
        json!({"thinking": thinking, "top_k": 40})
    );

    let whole: Value = whole_message(&app, &with(request, json!({"stream": false}))).await;
    assert_eq!(
        whole["content"],
        json!([
            {"type": "thinking", "thinking": "The user greets me.", "signature": "sig-abc=="},
            {"type": "text", "text": "Hello!"},
        ])
    );

    // The next turn sends the thinking back, signed.
    let next = ask_claude(json!({
        "thinking": thinking,
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": whole["content"]},
            {"role": "user", "content": "And?"},
        ],
    }));
    assert_eq!(app.post("/v1/messages", &next).await.status(), 200);
    assert_eq!(
        last_converse(&app).body["messages"][1]["content"][0],
        json!({"reasoningContent": {"reasoningText": {"text": "The user greets me.", "signature": "sig-abc=="}}})
    );
    let redacted = ask_claude(json!({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xyz"}, {"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "And?"},
    ]}));
    let message = refused(&app, &redacted).await;
    assert!(message.contains("messages[1].content[0]"), "{message}");
}

#[tokio::test]
async fn images_and_documents_reach_converse_byte_for_byte() {
    let app = converse_app()
        .scenario(CLAUDE_37, Scenario::converse().text(["A chart."]))
        .spawn()
        .await;
    let image: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let pdf = b"%PDF-1.4 not really".to_vec();
    let question = ask_claude(json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What are these?"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64(&image)}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": base64(&pdf)}, "title": "Report: Q3/2024"},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain notes"}},
    ]}]}));
    let response = app.post("/v1/messages", &question).await;
    assert_eq!(response.status(), 200);
    let content = &last_converse(&app).body["messages"][0]["content"];
    assert_eq!(content[1]["image"]["format"], "png");
    assert_eq!(unbase64(&content[1]["image"]["source"]["bytes"]), image);
    assert_eq!(content[2]["document"]["format"], "pdf");
    assert_eq!(content[2]["document"]["name"], "Report Q32024");
    assert_eq!(unbase64(&content[2]["document"]["source"]["bytes"]), pdf);
    assert_eq!(content[3]["document"]["format"], "txt");
    assert_eq!(
        unbase64(&content[3]["document"]["source"]["bytes"]),
        b"plain notes"
    );
}

#[tokio::test]
async fn count_tokens_of_a_converse_model_sends_the_converse_request() {
    let app = converse_app()
        .scenario(CLAUDE_37, Scenario::converse().input_tokens(33))
        .spawn()
        .await;
    let request = json!({
        "model": "claude",
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": weather_tool(),
    });
    let response = app.post("/v1/messages/count_tokens", &request).await;
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"input_tokens": 33})
    );
    let sent = app.emulator.requests().pop().unwrap();
    assert_eq!(sent.operation, Operation::CountTokens);
    let converse = &sent.body["input"]["converse"];
    assert_eq!(converse["system"], json!([{"text": "Be brief."}]));
    assert_eq!(
        converse["messages"][0]["content"][0]["text"],
        "Weather in Paris?"
    );
    assert_eq!(
        converse["toolConfig"]["tools"][0]["toolSpec"]["name"],
        "weather"
    );
}

#[tokio::test]
async fn a_guardrail_intervention_is_a_refusal() {
    let app = converse_app()
        .scenario(
            CLAUDE_37,
            Scenario::converse().guardrail_intervention("Sorry, I cannot help with that."),
        )
        .spawn()
        .await;
    let answer: Value = whole_message(&app, &hello("claude")).await;
    assert_eq!(answer["stop_reason"], "refusal", "{answer}");
}

/// Runs suite `suite` of tests/compat/anthropic_client.py (the official `anthropic`
/// package) against `app`, and fails with its output if any of its checks fails.
async fn run_anthropic_client(suite: &str, app: &App, key: &str) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/compat/anthropic_client.py"
    );
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(python())
            .arg(script)
            .args([suite, &app.url, key])
            .output(),
    )
    .await
    .expect("the client finishes")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "the anthropic client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

const THROTTLED_ID: &str = "anthropic.claude-throttled-v1:0";
const BUSY_ID: &str = "anthropic.claude-busy-v1:0";
const BROKEN_ID: &str = "anthropic.claude-broken-v1:0";
const TOOLS_ID: &str = "us.anthropic.claude-tools-v1:0";
const THINKING_ID: &str = "us.anthropic.claude-thinking-v1:0";

#[tokio::test]
#[ignore = "needs the anthropic package: run scripts/install-test-tools.sh"]
async fn the_anthropic_sdk_works_against_bedrock_models() {
    let app = TestApp::new()
        .api_key("sdk", KEY, "")
        .registry(|url| {
            let mut models = registry(url);
            let models_of_the_test = [
                ("throttled", THROTTLED_ID, "anthropic"),
                ("busy", BUSY_ID, "anthropic"),
                ("broken", BROKEN_ID, "anthropic"),
                ("claude-tools", TOOLS_ID, "converse"),
                ("claude-thinking", THINKING_ID, "converse"),
            ];
            for (name, id, format) in models_of_the_test {
                let fields = match format {
                    "converse" => "allow_request_additional_fields = true",
                    _ => "",
                };
                models.push_str(&format!(
                    "\n[[models]]\nname = \"{name}\"\nprovider = \"bedrock\"\nmodel_id = \"{id}\"\nformat = \"{format}\"\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n{fields}\n"
                ));
            }
            models
        })
        .scenario(
            THROTTLED_ID,
            Scenario::HttpError {
                status: 429,
                error_type: "ThrottlingException".into(),
                message: "Too many requests".into(),
            },
        )
        .scenario(
            BUSY_ID,
            Scenario::HttpError {
                status: 503,
                error_type: "ServiceUnavailableException".into(),
                message: "busy".into(),
            },
        )
        .scenario(
            BROKEN_ID,
            Scenario::ExceptionAfter {
                pieces: vec!["Hel".into()],
                exception_type: "modelStreamErrorException".into(),
                message: "the model broke".into(),
            },
        )
        .scenario(
            TOOLS_ID,
            Scenario::converse().text(["Let me ", "check."]).tool_use(
                "tooluse_1",
                "weather",
                ["{\"ci", "ty\": \"Pa", "ris\"}"],
            ),
        )
        .scenario(
            THINKING_ID,
            Scenario::converse()
                .reasoning(["The user ", "greets me."], "sig-abc==")
                .text(["Hello!"]),
        )
        .spawn()
        .await;
    run_anthropic_client("bedrock", &app, KEY).await;
}

#[cfg(feature = "local")]
mod local {
    use super::*;
    use crate::local::spawn_local;

    #[tokio::test]
    async fn the_local_model_answers_and_counts_its_prompt_with_its_tokenizer() {
        let app = spawn_local(1).await;
        let request = json!({
            "model": "local",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "Say hello"}],
        });
        let response = app.post("/v1/messages", &request).await;
        assert_eq!(response.status(), 200);
        let message: Value = response.json().await.unwrap();
        assert_eq!(message["content"][0]["type"], "text");
        let output_tokens = message["usage"]["output_tokens"].as_u64().unwrap();
        assert!((1..=5).contains(&output_tokens), "{message}");
        let input_tokens = message["usage"]["input_tokens"].as_u64().unwrap();
        let counted: Value = app
            .post(
                "/v1/messages/count_tokens",
                &json!({"model": "local", "messages": request["messages"]}),
            )
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(counted["input_tokens"].as_u64(), Some(input_tokens));
        let tools = with(
            request.clone(),
            json!({
            "tools": [{"name": "weather", "input_schema": {"type": "object"}}]}),
        );
        let message = refused(&app, &tools).await;
        assert!(
            message.contains("model `local` cannot take `tools`"),
            "{message}"
        );
    }

    #[tokio::test]
    #[ignore = "needs the anthropic package: run scripts/install-test-tools.sh"]
    async fn the_anthropic_sdk_works_against_the_local_model() {
        let app = spawn_local(1).await;
        run_anthropic_client("local", &app, "no-key-needed").await;
    }
}

#[tokio::test]
async fn count_tokens_of_a_silent_upstream_ends_with_the_first_token_timeout() {
    // An upstream that takes the connection and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let app = TestApp::new()
        .registry(|_| {
            registry(&silent_url).replace(
                "endpoint_url",
                "upstream = { first_token_timeout = \"400ms\" }\nendpoint_url",
            )
        })
        .spawn()
        .await;
    let request = json!({"model": "anthropic", "messages": [{"role": "user", "content": "Hi"}]});
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        app.post("/v1/messages/count_tokens", &request),
    )
    .await
    .expect("count_tokens answers within the model's timeouts");
    expect_anthropic_error(response, 504, "timeout_error").await;
    held.abort();
}

#[tokio::test]
async fn a_long_document_title_in_any_script_is_shortened_not_refused() {
    let app = converse_app()
        .scenario(CLAUDE_37, Scenario::converse().text(["Read."]))
        .spawn()
        .await;
    let title = "é".repeat(150);
    let question = ask_claude(json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarise."},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}, "title": title},
    ]}]}));
    let response = app.post("/v1/messages", &question).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let name = last_converse(&app).body["messages"][0]["content"][1]["document"]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        !name.is_empty() && name.len() <= 200 && title.starts_with(&name),
        "{name}"
    );
}
