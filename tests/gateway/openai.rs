//! OpenAI's API, `/v1/chat/completions` and `/v1/models`, spoken to as its SDKs speak it:
//! the shapes of whole and streamed answers, what reaches the model, errors in OpenAI's shape
//! with the statuses its SDKs map to their exceptions, and the gateway's rules (keys, limits,
//! cancellation) on these routes too.

use std::time::{Duration, SystemTime};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::app::{App, CLAUDE_ID, LLAMA_ID, TestApp};
use crate::cancellation::leaving_a_post_stops_the_upstream;
use crate::converse::{CLAUDE_37, base64, converse_registry, last_converse, unbase64};
use crate::emulator::{NativeStop, Scenario};

const KEY: &str = "mg-openai-client-0123456789";

async fn complete(app: &App, body: Value) -> reqwest::Response {
    app.post("/v1/chat/completions", &body).await
}

/// The `data:` of each event of a streamed answer, as OpenAI's SDKs read them: JSON objects,
/// and the last one `[DONE]`.
async fn stream_data(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = response
        .bytes_stream()
        .eventsource()
        .map(|event| event.expect("a well-formed event stream").data);
    tokio::time::timeout(Duration::from_secs(20), events.collect())
        .await
        .expect("the stream ends")
}

fn json_of(data: &[String]) -> Vec<Value> {
    data.iter()
        .map(|data| serde_json::from_str(data).expect("JSON data"))
        .collect()
}

/// Asserts an error in OpenAI's shape and returns its `error` object.
async fn expect_openai_error(response: reqwest::Response, status: u16, param: Value) -> Value {
    assert_eq!(response.status().as_u16(), status, "{}", response.url());
    let body: Value = response.json().await.expect("a JSON error body");
    let error = body["error"].clone();
    for field in ["message", "type", "param", "code"] {
        assert!(error.get(field).is_some(), "no `{field}` in {body}");
    }
    assert_eq!(error["param"], param, "{body}");
    error
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_chat_completion_has_openais_shape_and_the_model_gets_the_conversation() {
    let app = TestApp::new()
        .scenario(
            CLAUDE_ID,
            Scenario::reply(["Paris", " is the capital."]).input_tokens(21),
        )
        .spawn()
        .await;
    let response = complete(
        &app,
        json!({
            "model": "anthropic",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Capital of Italy?"},
                {"role": "assistant", "content": "Rome."},
                {"role": "user", "content": [{"type": "text", "text": "And of France?"}]}
            ],
            "max_completion_tokens": 50,
            "temperature": 0.2,
            "stop": "\n\n",
            "n": 1,
            "user": "someone",
            "frequency_penalty": 0
        }),
    )
    .await;
    assert_eq!(response.status(), 200);
    let mut body: Value = response.json().await.unwrap();
    let id = body["id"].take();
    assert!(id.as_str().unwrap().starts_with("chatcmpl-"), "{id}");
    let created = body["created"].take().as_u64().unwrap();
    assert!(created.abs_diff(now()) < 60);
    assert_eq!(
        body,
        json!({
            "id": null,
            "object": "chat.completion",
            "created": null,
            "model": "anthropic",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "Paris is the capital.", "refusal": null},
                "finish_reason": "stop"
            }],
            "usage": {
                "prompt_tokens": 21, "completion_tokens": 2, "total_tokens": 23,
                "prompt_tokens_details": {"cached_tokens": 0}
            }
        })
    );
    let sent = app.emulator.requests().pop().unwrap().body;
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["max_tokens"], 50);
    assert_eq!(sent["temperature"], 0.2);
    assert_eq!(sent["stop_sequences"], json!(["\n\n"]));
    assert_eq!(
        sent["messages"],
        json!([
            {"role": "user", "content": "Capital of Italy?"},
            {"role": "assistant", "content": "Rome."},
            {"role": "user", "content": "And of France?"}
        ])
    );
}

#[tokio::test]
async fn a_streamed_completion_sends_the_role_the_pieces_the_finish_the_usage_then_done() {
    let app = TestApp::new()
        .scenario(
            LLAMA_ID,
            Scenario::reply(["The", " capital", " is"]).stopping(NativeStop::MaxTokens),
        )
        .spawn()
        .await;
    let request = json!({
        "model": "llama3",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "max_tokens": 3,
        "stream": true,
        "stream_options": {"include_usage": true}
    });
    let data = stream_data(complete(&app, request.clone()).await).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks = json_of(&data[..data.len() - 1]);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "llama3");
        assert!(chunk["created"].as_u64().is_some());
    }
    let choices: Vec<Value> = chunks
        .iter()
        .map(|chunk| chunk["choices"].clone())
        .collect();
    let delta = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "finish_reason": finish}]);
    assert_eq!(
        choices,
        [
            delta(json!({"role": "assistant", "content": ""}), Value::Null),
            delta(json!({"content": "The"}), Value::Null),
            delta(json!({"content": " capital"}), Value::Null),
            delta(json!({"content": " is"}), Value::Null),
            delta(json!({}), json!("length")),
            json!([]),
        ]
    );
    assert!(chunks[..5].iter().all(|chunk| chunk["usage"].is_null()));
    assert_eq!(
        chunks[5]["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
               "prompt_tokens_details": {"cached_tokens": 0}})
    );

    // Without `include_usage`: no usage anywhere.
    app.emulator.script(LLAMA_ID, Scenario::reply(["Paris."]));
    let mut plain = request;
    plain.as_object_mut().unwrap().remove("stream_options");
    let data = stream_data(complete(&app, plain).await).await;
    assert_eq!(data.len(), 4, "{data:?}");
    let chunks = json_of(&data[..3]);
    assert!(chunks.iter().all(|chunk| chunk.get("usage").is_none()));
    assert_eq!(chunks[2]["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn an_error_after_the_stream_began_is_one_error_line_and_the_stream_ends() {
    let app = TestApp::new()
        .scenario(
            LLAMA_ID,
            Scenario::ExceptionAfter {
                pieces: vec!["partial".into()],
                exception_type: "modelStreamErrorException".into(),
                message: "the model broke".into(),
            },
        )
        .spawn()
        .await;
    let data = stream_data(
        complete(
            &app,
            json!({"model": "llama3", "stream": true,
                   "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await,
    )
    .await;
    assert_eq!(data.len(), 3, "{data:?}");
    let lines = json_of(&data);
    assert_eq!(lines[1]["choices"][0]["delta"]["content"], "partial");
    let error = &lines[2]["error"];
    assert_eq!(error["type"], "server_error");
    assert_eq!(error["code"], "upstream_error");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("the model broke"),
        "{error}"
    );
}

#[tokio::test]
async fn refused_requests_get_openais_error_shape_naming_the_parameter() {
    let app = TestApp::new().spawn().await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    let with = |field: &str, value: Value| {
        let mut body = json!({"model": "llama3", "messages": hi});
        body[field] = value;
        body
    };
    for (field, value) in [
        ("n", json!(2)),
        ("logprobs", json!(true)),
        (
            "response_format",
            json!({"type": "json_schema", "json_schema": {}}),
        ),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("temperature", json!(1.5)),
        ("stream_options", json!({"include_usage": true})),
    ] {
        let error =
            expect_openai_error(complete(&app, with(field, value)).await, 400, json!(field)).await;
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["code"], "invalid_request");
    }
    let remote = json!({"model": "llama3", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    ]}]});
    let error = expect_openai_error(
        complete(&app, remote).await,
        400,
        json!("messages[0].content[0].image_url.url"),
    )
    .await;
    assert!(error["message"].as_str().unwrap().contains("remote"));

    // What the gateway's own validation refuses is named as the client named it.
    let too_many = json!({"model": "llama3", "max_completion_tokens": 100000,
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]});
    expect_openai_error(
        complete(&app, too_many).await,
        400,
        json!("max_completion_tokens"),
    )
    .await;
    let empty = json!({"model": "llama3", "messages": [
        {"role": "developer", "content": "s"}, {"role": "user", "content": " "}]});
    expect_openai_error(
        complete(&app, empty).await,
        400,
        json!("messages[1].content"),
    )
    .await;

    // A model that takes only text says so, naming itself and what it cannot take.
    let image = json!({"model": "llama3", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    ]}]});
    let error = expect_openai_error(
        complete(&app, image).await,
        400,
        json!("messages[0].content[1]"),
    )
    .await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("model `llama3` cannot take `image`"),
        "{error}"
    );
    let tools = json!({"model": "llama3", "messages": hi, "tools": [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    ]});
    let error = expect_openai_error(complete(&app, tools).await, 400, Value::Null).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .starts_with("model `llama3` cannot take `tools`"),
        "{error}"
    );

    // Before a stream begins, a refusal is a status and a JSON body, streamed or not.
    for stream in [false, true] {
        let unknown = json!({"model": "gpt-4o", "messages": hi, "stream": stream});
        let error = expect_openai_error(complete(&app, unknown).await, 404, json!("model")).await;
        assert_eq!(error["code"], "model_not_found");
    }

    // Errors before the handler (the body's parser, the router) have the same shape.
    let malformed = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", app.url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    expect_openai_error(malformed, 400, Value::Null).await;
    let wrong_method = app.get("/v1/chat/completions").await;
    assert_eq!(wrong_method.headers()["allow"], "POST");
    expect_openai_error(wrong_method, 405, Value::Null).await;
    assert_eq!(
        app.emulator.requests().len(),
        0,
        "nothing reached the model"
    );
}

#[tokio::test]
async fn keys_and_their_limits_hold_with_openais_statuses() {
    let app = TestApp::new()
        .api_key("openai-client", KEY, "requests_per_minute = 1")
        .scenario(LLAMA_ID, Scenario::reply(["ok"]))
        .spawn()
        .await;
    let request = |key: Option<&str>| {
        let mut request = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", app.url))
            .json(&json!({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let missing = request(None).await.unwrap();
    let error = expect_openai_error(missing, 401, Value::Null).await;
    assert_eq!(error["type"], "authentication_error");
    let wrong = request(Some("sk-not-a-key")).await.unwrap();
    let error = expect_openai_error(wrong, 401, Value::Null).await;
    assert!(!error["message"].as_str().unwrap().contains("sk-not-a-key"));
    assert_eq!(request(Some(KEY)).await.unwrap().status(), 200);
    let limited = request(Some(KEY)).await.unwrap();
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let error = expect_openai_error(limited, 429, Value::Null).await;
    assert_eq!(error["type"], "rate_limit_error");
    assert_eq!(error["code"], "rate_limited");

    expect_openai_error(app.get("/v1/models").await, 401, Value::Null).await;
    let metrics = app.get(&format!("/metrics?api_key={KEY}")).await;
    let metrics = metrics.text().await.unwrap();
    for line in [
        r#"modelgate_requests_total{route="/v1/chat/completions",model="llama3",status="200"} 1"#,
        r#"modelgate_requests_total{route="/v1/chat/completions",model="llama3",status="429"} 1"#,
        r#"modelgate_requests_total{route="/v1/models",model="",status="401"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
}

#[tokio::test]
async fn v1_models_lists_the_registry_in_openais_shape() {
    let app = TestApp::new().spawn().await;
    let list: Value = app.get("/v1/models").await.json().await.unwrap();
    assert_eq!(list["object"], "list");
    let created = list["data"][0]["created"].as_u64().unwrap();
    assert!(created.abs_diff(now()) < 60);
    assert_eq!(
        list["data"],
        json!([
            {"id": "llama3", "object": "model", "created": created, "owned_by": "bedrock"},
            {"id": "anthropic", "object": "model", "created": created, "owned_by": "bedrock"}
        ])
    );
    let one: Value = app.get("/v1/models/anthropic").await.json().await.unwrap();
    assert_eq!(one, list["data"][1]);
    let error = expect_openai_error(app.get("/v1/models/gpt-4o").await, 404, json!("model")).await;
    assert_eq!(error["code"], "model_not_found");
    let metrics = app.metrics(None).await;
    assert!(
        metrics.contains(
            r#"modelgate_requests_total{route="/v1/models/{model}",model="",status="404"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_a_streamed_completion_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::stall(["thinking..."]))
        .spawn()
        .await;
    let response = complete(
        &app,
        json!({"model": "llama3", "stream": true,
               "messages": [{"role": "user", "content": "take your time"}]}),
    )
    .await;
    let mut events = response.bytes_stream().eventsource();
    let role = events.next().await.unwrap().unwrap();
    assert!(role.data.contains(r#""role":"assistant""#));
    let piece = events.next().await.unwrap().unwrap();
    assert!(piece.data.contains("thinking..."));
    drop(events);
    app.assert_upstream_closed_within_a_second().await;
}

#[tokio::test]
async fn a_client_that_leaves_a_whole_completion_stops_the_upstream_call() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::Stall { pieces: vec![] })
        .spawn()
        .await;
    leaving_a_post_stops_the_upstream(
        &app,
        "/v1/chat/completions",
        json!({"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
}

/// OpenAI's form of the weather tool of the Converse tests.
fn weather_function() -> Value {
    json!([{"type": "function", "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}])
}

#[tokio::test]
async fn a_tool_call_comes_whole_and_streamed_and_its_result_goes_back() {
    let app = TestApp::new().registry(converse_registry("")).spawn().await;
    let tool_call = || {
        Scenario::converse().text(["Let me ", "check."]).tool_use(
            "tooluse_1",
            "weather",
            ["{\"ci", "ty\": \"Pa", "ris\"}"],
        )
    };
    let question = json!({
        "model": "claude",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": weather_function(),
        "tool_choice": "required",
    });
    app.emulator.script(CLAUDE_37, tool_call());
    let response = complete(&app, question.clone()).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["choices"][0],
        json!({
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "refusal": null,
                "tool_calls": [{"id": "tooluse_1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]
            },
            "finish_reason": "tool_calls"
        })
    );
    let sent = last_converse(&app).body;
    assert_eq!(sent["toolConfig"]["toolChoice"], json!({"any": {}}));
    assert_eq!(
        sent["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"]["json"],
        weather_function()[0]["function"]["parameters"]
    );

    // Streamed: the call's id and name first, then its argument fragments as they arrive.
    app.emulator.script(CLAUDE_37, tool_call());
    let mut streamed = question.clone();
    streamed["stream"] = json!(true);
    streamed["tool_choice"] = json!({"type": "function", "function": {"name": "weather"}});
    let data = stream_data(complete(&app, streamed).await).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let deltas: Vec<Value> = json_of(&data[..data.len() - 1])
        .iter()
        .map(|chunk| chunk["choices"][0].clone())
        .collect();
    let fragment = |arguments: &str| json!({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}, "finish_reason": null});
    assert_eq!(
        deltas[3..],
        [
            json!({"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "tooluse_1", "type": "function",
                "function": {"name": "weather", "arguments": ""}}]}, "finish_reason": null}),
            fragment("{\"ci"),
            fragment("ty\": \"Pa"),
            fragment("ris\"}"),
            json!({"index": 0, "delta": {}, "finish_reason": "tool_calls"}),
        ]
    );
    assert_eq!(
        last_converse(&app).body["toolConfig"]["toolChoice"],
        json!({"tool": {"name": "weather"}})
    );

    // The answer turn: the assistant's call and the tool's result, as Converse blocks.
    app.emulator
        .script(CLAUDE_37, Scenario::converse().text(["It is 18°C."]));
    let answer_turn = json!({
        "model": "claude",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [
                {"id": "tooluse_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "tooluse_1", "content": "18°C"}
        ],
        "tools": weather_function(),
    });
    let response = complete(&app, answer_turn).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "It is 18°C.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let sent = last_converse(&app).body;
    assert_eq!(
        sent["messages"][1]["content"],
        json!([{"text": "Let me check."},
               {"toolUse": {"toolUseId": "tooluse_1", "name": "weather", "input": {"city": "Paris"}}}])
    );
    assert_eq!(
        sent["messages"][2]["content"],
        json!([{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "18°C"}], "status": "success"}}])
    );

    // `none`: the model is not offered the tools.
    let mut none = question;
    none["tool_choice"] = json!("none");
    assert_eq!(complete(&app, none).await.status(), 200);
    assert!(last_converse(&app).body.get("toolConfig").is_none());
}

#[tokio::test]
async fn an_image_reaches_bedrock_and_reasoning_cache_and_filters_come_back_in_openais_words() {
    let app = TestApp::new().registry(converse_registry("")).spawn().await;
    let image: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    app.emulator.script(
        CLAUDE_37,
        Scenario::converse()
            .reasoning(["Looking ", "closely."], "sig-1")
            .text(["A gradient."])
            .cache_tokens(100, 20),
    );
    let response = complete(
        &app,
        json!({"model": "claude", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{}", base64(&image)), "detail": "high"}}
        ]}]}),
    )
    .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], "A gradient.");
    assert_eq!(message["reasoning_content"], "Looking closely.");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 127, "completion_tokens": body["usage"]["completion_tokens"],
               "total_tokens": 127 + body["usage"]["completion_tokens"].as_u64().unwrap(),
               "prompt_tokens_details": {"cached_tokens": 100}})
    );
    let content = &last_converse(&app).body["messages"][0]["content"];
    assert_eq!(content[0], json!({"text": "What is it?"}));
    assert_eq!(content[1]["image"]["format"], "png");
    assert_eq!(unbase64(&content[1]["image"]["source"]["bytes"]), image);

    app.emulator.script(
        CLAUDE_37,
        Scenario::converse()
            .reasoning(["Hmm."], "sig-2")
            .guardrail_intervention("Sorry, I cannot help with that."),
    );
    let data = stream_data(
        complete(
            &app,
            json!({"model": "claude", "stream": true,
                   "messages": [{"role": "user", "content": "Something forbidden"}]}),
        )
        .await,
    )
    .await;
    let deltas: Vec<Value> = json_of(&data[..data.len() - 1])
        .iter()
        .map(|chunk| chunk["choices"][0].clone())
        .collect();
    assert_eq!(deltas[1]["delta"], json!({"reasoning_content": "Hmm."}));
    assert_eq!(
        deltas[2]["delta"],
        json!({"content": "Sorry, I cannot help with that."})
    );
    assert_eq!(deltas.last().unwrap()["finish_reason"], "content_filter");
}

#[tokio::test]
async fn usage_counts_beyond_u32_from_the_upstream_saturate_instead_of_failing_the_answer() {
    let app = TestApp::new()
        .scenario(CLAUDE_ID, Scenario::reply(["Hi"]).input_tokens(u32::MAX))
        .spawn()
        .await;
    let hi = json!([{"role": "user", "content": "hi"}]);
    let response = complete(&app, json!({"model": "anthropic", "messages": hi})).await;
    assert_eq!(response.status(), 200);
    let completion: Value = response.json().await.unwrap();
    assert_eq!(completion["usage"]["prompt_tokens"], u32::MAX);
    assert_eq!(completion["usage"]["total_tokens"], u32::MAX);
}
