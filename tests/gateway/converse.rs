//! `format = "converse"`: tools, images, documents, reasoning, guardrails, prompt caching and
//! assumed roles, through every transport, as the emulator's ConverseStream answers them and
//! as it received the requests.

use std::time::Duration;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::app::{ACCESS_KEY, App, TestApp, registry};
use crate::client::{
    all_sse_events, connect, connect_json, expect_error, next_json, next_text, sse_events,
};
use crate::emulator::{ASSUMED_ACCESS_KEY, DENIED_ROLE_SUFFIX, Operation, Recorded, Scenario};

/// A Claude 3.7 inference profile id: Converse is inferred for it.
pub const CLAUDE_37: &str = "us.anthropic.claude-3-7-sonnet-20250219-v1:0";

/// The standard registry plus model `claude` (Converse, [`CLAUDE_37`]) with `fields`.
pub fn converse_registry(fields: &str) -> impl FnOnce(&str) -> String + '_ {
    move |url| {
        format!(
            "{}\n[[models]]\nname = \"claude\"\nprovider = \"bedrock\"\nmodel_id = \"{CLAUDE_37}\"\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n{fields}\n",
            registry(url)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Invoke,
    Sse,
    WsJson,
}

const TRANSPORTS: [Transport; 3] = [Transport::Invoke, Transport::Sse, Transport::WsJson];

/// An answer as a client of any transport sees it, pieces joined.
#[derive(Debug, Clone, PartialEq, Default)]
struct Answer {
    text: String,
    /// Reasoning text, joined, and its signature.
    reasoning: Option<(String, Option<String>)>,
    /// `{"id", "name", "input"}`.
    tool_calls: Vec<Value>,
    stop_reason: String,
    usage: Value,
}

impl Answer {
    fn add_reasoning(&mut self, piece: &Value) {
        let (text, signature) = self.reasoning.get_or_insert_default();
        text.push_str(piece["text"].as_str().unwrap_or_default());
        if let Some(sig) = piece["signature"].as_str() {
            *signature = Some(sig.to_owned());
        }
    }
}

/// Asks model `claude` `body` (without `model`) through `transport`. `Err` holds the error
/// code (and, for HTTP, the status).
async fn ask(app: &App, transport: Transport, body: &Value) -> Result<Answer, String> {
    let mut answer = Answer::default();
    match transport {
        Transport::Invoke => {
            let mut body = body.clone();
            body["model"] = json!("claude");
            let response = app.post("/invoke", &body).await;
            let status = response.status().as_u16();
            let reply: Value = response.json().await.unwrap();
            if status != 200 {
                return Err(format!(
                    "{status} {}",
                    reply["error"]["code"].as_str().unwrap()
                ));
            }
            for block in reply["content"].as_array().unwrap() {
                match block["type"].as_str().unwrap() {
                    "text" => answer.text.push_str(block["text"].as_str().unwrap()),
                    "reasoning" => answer.add_reasoning(block),
                    "tool_use" => answer.tool_calls.push(
                        json!({"id": block["id"], "name": block["name"], "input": block["input"]}),
                    ),
                    other => panic!("unexpected block {other}"),
                }
            }
            assert_eq!(
                reply["text"],
                answer.text.as_str(),
                "`text` is all the text"
            );
            answer.stop_reason = reply["stop_reason"].as_str().unwrap().to_owned();
            answer.usage = reply["usage"].clone();
        }
        Transport::Sse => {
            let mut body = body.clone();
            body["model"] = json!("claude");
            let response = app.post("/stream", &body).await;
            let status = response.status().as_u16();
            if status != 200 {
                let reply: Value = response.json().await.unwrap();
                return Err(format!(
                    "{status} {}",
                    reply["error"]["code"].as_str().unwrap()
                ));
            }
            for event in all_sse_events(response).await {
                match event.event.as_str() {
                    "chunk" => answer.text.push_str(event.data["text"].as_str().unwrap()),
                    "reasoning" => answer.add_reasoning(&event.data),
                    "tool_call" => {
                        let mut call = event.data.clone();
                        call.as_object_mut().unwrap().remove("type");
                        answer.tool_calls.push(call);
                    }
                    "done" => {
                        answer.stop_reason = event.data["stop_reason"].as_str().unwrap().into();
                        answer.usage = event.data["usage"].clone();
                    }
                    "error" => return Err(event.data["error"]["code"].as_str().unwrap().into()),
                    other => panic!("unexpected event {other}"),
                }
            }
        }
        Transport::WsJson => {
            let mut socket = connect_json(app, "claude").await;
            socket.send(Message::text(body.to_string())).await.unwrap();
            loop {
                let mut frame = next_json(&mut socket).await;
                match frame["type"].as_str().unwrap() {
                    "chunk" => answer.text.push_str(frame["text"].as_str().unwrap()),
                    "reasoning" => answer.add_reasoning(&frame),
                    "tool_call" => {
                        frame.as_object_mut().unwrap().remove("type");
                        answer.tool_calls.push(frame);
                    }
                    "done" => {
                        answer.stop_reason = frame["stop_reason"].as_str().unwrap().into();
                        answer.usage = frame["usage"].clone();
                        break;
                    }
                    "error" => return Err(frame["error"]["code"].as_str().unwrap().into()),
                    other => panic!("unexpected frame {other}"),
                }
            }
        }
    }
    Ok(answer)
}

/// The ConverseStream request the emulator received last.
pub fn last_converse(app: &App) -> Recorded {
    let recorded = app.emulator.requests().pop().expect("a request");
    assert_eq!(recorded.operation, Operation::ConverseStream);
    assert_eq!(recorded.model_id, CLAUDE_37);
    recorded
}

pub fn weather_tool() -> Value {
    json!([{
        "name": "weather",
        "description": "The weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }])
}

pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unbase64(text: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text.as_str().expect("base64 text"))
        .expect("valid base64")
}

#[tokio::test]
async fn a_tool_round_trip_works_on_every_transport() {
    let app = TestApp::new().registry(converse_registry("")).spawn().await;
    for transport in TRANSPORTS {
        app.emulator.script(
            CLAUDE_37,
            Scenario::converse().text(["Let me ", "check."]).tool_use(
                "tooluse_1",
                "weather",
                ["{\"ci", "ty\": \"Pa", "ris\"}"],
            ),
        );
        let question = json!({
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": weather_tool(),
            "tool_choice": "auto",
        });
        let call = ask(&app, transport, &question).await.unwrap();
        assert_eq!(call.text, "Let me check.", "{transport:?}");
        assert_eq!(call.stop_reason, "tool_use", "{transport:?}");
        assert_eq!(
            call.tool_calls,
            [json!({"id": "tooluse_1", "name": "weather", "input": {"city": "Paris"}})],
            "{transport:?}: the fragments make one call"
        );
        let sent = last_converse(&app).body;
        assert_eq!(
            sent["toolConfig"],
            json!({
                "tools": [{"toolSpec": {
                    "name": "weather",
                    "description": "The weather in a city",
                    "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
                }}],
                "toolChoice": {"auto": {}},
            }),
            "{transport:?}"
        );

        app.emulator
            .script(CLAUDE_37, Scenario::converse().text(["It is 18°C."]));
        let answer_turn = json!({
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Let me check."},
                    {"type": "tool_use", "id": "tooluse_1", "name": "weather", "input": {"city": "Paris"}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "tooluse_1", "content": "18°C"},
                ]},
            ],
            "tools": weather_tool(),
        });
        let answer = ask(&app, transport, &answer_turn).await.unwrap();
        assert_eq!(answer.text, "It is 18°C.", "{transport:?}");
        assert_eq!(answer.stop_reason, "end_turn", "{transport:?}");
        let sent = last_converse(&app).body;
        assert_eq!(
            sent["messages"][1]["content"][1],
            json!({"toolUse": {"toolUseId": "tooluse_1", "name": "weather", "input": {"city": "Paris"}}}),
            "{transport:?}"
        );
        assert_eq!(
            sent["messages"][2]["content"][0],
            json!({"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "18°C"}], "status": "success"}}),
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn an_image_and_a_document_reach_bedrock_byte_for_byte() {
    let app = TestApp::new().registry(converse_registry("")).spawn().await;
    let image: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    let document = b"name,score\nada,10\n\xff\x00binary tail".to_vec();
    for transport in TRANSPORTS {
        app.emulator
            .script(CLAUDE_37, Scenario::converse().text(["A chart."]));
        let question = json!({
            "system": "Describe what you get.",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What are these?"},
                {"type": "image", "media_type": "image/png", "data": base64(&image)},
                {"type": "image", "url": format!("data:image/webp;base64,{}", base64(&image[..10]))},
                {"type": "document", "format": "csv", "name": "scores (2024)", "data": base64(&document)},
            ]}],
            "max_tokens": 300,
            "temperature": 0.5,
            "stop": ["END"],
        });
        let answer = ask(&app, transport, &question).await.unwrap();
        assert_eq!(answer.text, "A chart.");
        let sent = last_converse(&app).body;
        let content = &sent["messages"][0]["content"];
        assert_eq!(content[0], json!({"text": "What are these?"}));
        assert_eq!(content[1]["image"]["format"], "png");
        assert_eq!(unbase64(&content[1]["image"]["source"]["bytes"]), image);
        assert_eq!(content[2]["image"]["format"], "webp");
        assert_eq!(
            unbase64(&content[2]["image"]["source"]["bytes"]),
            &image[..10]
        );
        assert_eq!(content[3]["document"]["format"], "csv");
        assert_eq!(content[3]["document"]["name"], "scores (2024)");
        assert_eq!(
            unbase64(&content[3]["document"]["source"]["bytes"]),
            document
        );
        assert_eq!(sent["system"], json!([{"text": "Describe what you get."}]));
        assert_eq!(
            sent["inferenceConfig"],
            json!({"maxTokens": 300, "temperature": 0.5, "stopSequences": ["END"]}),
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn reasoning_streams_with_its_signature_and_goes_back_unchanged() {
    let app = TestApp::new()
        .registry(converse_registry(
            "additional_fields = { thinking = { type = \"enabled\", budget_tokens = 2048 } }\nallow_request_additional_fields = true",
        ))
        .spawn()
        .await;
    for transport in TRANSPORTS {
        app.emulator.script(
            CLAUDE_37,
            Scenario::converse()
                .reasoning(["The user ", "greets me."], "sig-abc==")
                .redacted_reasoning()
                .text(["Hello!"]),
        );
        let hello = json!({"messages": [{"role": "user", "content": "Hi"}]});
        let answer = ask(&app, transport, &hello).await.unwrap();
        assert_eq!(
            answer.reasoning,
            Some(("The user greets me.".into(), Some("sig-abc==".into()))),
            "{transport:?}"
        );
        assert_eq!(
            answer.text, "Hello!",
            "{transport:?}: redacted reasoning is left out"
        );
        assert_eq!(
            last_converse(&app).body["additionalModelRequestFields"],
            json!({"thinking": {"type": "enabled", "budget_tokens": 2048}})
        );

        // The next turn sends the reasoning back, signed; this request turns reasoning off.
        app.emulator
            .script(CLAUDE_37, Scenario::converse().text(["Fine."]));
        let next = json!({
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [
                    {"type": "reasoning", "text": "The user greets me.", "signature": "sig-abc=="},
                    {"type": "text", "text": "Hello!"},
                ]},
                {"role": "user", "content": "How are you?"},
            ],
            "additional_fields": {"thinking": null, "top_k": 40},
        });
        let answer = ask(&app, transport, &next).await.unwrap();
        assert_eq!(answer.reasoning, None, "{transport:?}");
        assert_eq!(answer.text, "Fine.");
        let sent = last_converse(&app).body;
        assert_eq!(
            sent["messages"][1]["content"][0],
            json!({"reasoningContent": {"reasoningText": {"text": "The user greets me.", "signature": "sig-abc=="}}})
        );
        assert_eq!(sent["additionalModelRequestFields"], json!({"top_k": 40}));
    }
}

#[tokio::test]
async fn a_guardrail_intervention_ends_the_answer_as_content_filtered() {
    let app = TestApp::new()
        .registry(converse_registry(
            "guardrail = { id = \"gr-123\", version = \"2\", trace = \"enabled\" }",
        ))
        .scenario(
            CLAUDE_37,
            Scenario::converse().guardrail_intervention("Sorry, I cannot help with that."),
        )
        .spawn()
        .await;
    for transport in TRANSPORTS {
        let question = json!({"messages": [{"role": "user", "content": "Something forbidden"}]});
        let answer = ask(&app, transport, &question).await.unwrap();
        assert_eq!(answer.stop_reason, "content_filtered", "{transport:?}");
        assert_eq!(answer.text, "Sorry, I cannot help with that.");
        assert_eq!(
            last_converse(&app).body["guardrailConfig"],
            json!({"guardrailIdentifier": "gr-123", "guardrailVersion": "2", "trace": "enabled", "streamProcessingMode": "sync"})
        );
    }
}

#[tokio::test]
async fn prompt_caching_puts_cache_points_and_reports_cache_tokens() {
    let app = TestApp::new()
        .registry(converse_registry("cache_prompt = true"))
        .scenario(
            CLAUDE_37,
            Scenario::converse()
                .text(["Cached."])
                .input_tokens(12)
                .cache_tokens(1800, 0),
        )
        .spawn()
        .await;
    for transport in TRANSPORTS {
        let question = json!({
            "system": "A long system prompt.",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": weather_tool(),
        });
        let answer = ask(&app, transport, &question).await.unwrap();
        assert_eq!(
            answer.usage,
            json!({"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 1800, "cache_write_input_tokens": 0}),
            "{transport:?}"
        );
        let sent = last_converse(&app).body;
        assert_eq!(
            sent["system"],
            json!([{"text": "A long system prompt."}, {"cachePoint": {"type": "default"}}])
        );
        assert_eq!(
            sent["toolConfig"]["tools"][1],
            json!({"cachePoint": {"type": "default"}})
        );
    }
    // This model does not allow per-request fields.
    let message = expect_error(
        app.post(
            "/invoke",
            &json!({"model": "claude", "prompt": "hi", "additional_fields": {"top_k": 5}}),
        )
        .await,
        400,
        "invalid_request",
    )
    .await;
    assert!(
        message.contains("allow_request_additional_fields"),
        "{message}"
    );
}

#[tokio::test]
async fn a_model_with_a_role_calls_bedrock_with_the_assumed_credentials() {
    let app = TestApp::new()
        .registry(converse_registry(
            "role_arn = \"arn:aws:iam::210987654321:role/bedrock-caller\"\nexternal_id = \"partner-42\"\nsession_name = \"modelgate-test\"",
        ))
        .env_from_emulator("AWS_ENDPOINT_URL_STS")
        .spawn()
        .await;
    for transport in TRANSPORTS {
        app.emulator.script(
            CLAUDE_37,
            Scenario::converse().text(["Hi from another account."]),
        );
        let hello = json!({"messages": [{"role": "user", "content": "Hi"}]});
        let answer = ask(&app, transport, &hello).await.unwrap();
        assert_eq!(answer.text, "Hi from another account.");
        assert_eq!(last_converse(&app).access_key(), Some(ASSUMED_ACCESS_KEY));
    }
    let assumed = app.emulator.assumed_roles();
    assert_eq!(assumed.len(), 1, "the SDK caches the assumed credentials");
    assert_eq!(
        assumed[0].role_arn,
        "arn:aws:iam::210987654321:role/bedrock-caller"
    );
    assert_eq!(assumed[0].external_id.as_deref(), Some("partner-42"));
    assert_eq!(assumed[0].session_name.as_deref(), Some("modelgate-test"));
    assert!(
        assumed[0]
            .authorization
            .as_deref()
            .is_some_and(|a| a.contains(&format!("Credential={ACCESS_KEY}/"))),
        "STS is called with the gateway's own credentials"
    );
    // A model without a role keeps the gateway's own credentials.
    app.post("/invoke", &json!({"model": "llama3", "prompt": "hi"}))
        .await;
    let native = app.emulator.requests().pop().unwrap();
    assert_eq!(native.access_key(), Some(ACCESS_KEY));
}

#[tokio::test]
async fn a_role_that_cannot_be_assumed_fails_the_request_with_sts_reason() {
    let fields = format!("role_arn = \"arn:aws:iam::210987654321{DENIED_ROLE_SUFFIX}\"");
    let app = TestApp::new()
        .registry(converse_registry(&fields))
        .env_from_emulator("AWS_ENDPOINT_URL_STS")
        .spawn()
        .await;
    let message = expect_error(
        app.post("/invoke", &json!({"model": "claude", "prompt": "hi"}))
            .await,
        503,
        "upstream_unavailable",
    )
    .await;
    assert!(
        message.contains("not authorized to perform: sts:AssumeRole"),
        "{message}"
    );
    assert!(
        app.emulator.requests().is_empty(),
        "nothing reaches Bedrock"
    );
}

#[tokio::test]
async fn a_bare_id_that_needs_an_inference_profile_names_the_profiles_to_try() {
    let bare = "anthropic.claude-3-7-sonnet-20250219-v1:0";
    let app = TestApp::new()
        .registry(|url| {
            format!(
                "{}\n[[models]]\nname = \"claude\"\nprovider = \"bedrock\"\nmodel_id = \"{bare}\"\nendpoint_url = \"{url}\"\n",
                registry(url)
            )
        })
        .scenario(
            "anthropic.claude-3-7-sonnet-20250219-v1:0",
            Scenario::HttpError {
                status: 400,
                error_type: "ValidationException".into(),
                message: format!("Invocation of model ID {bare} with on-demand throughput isn't supported. Retry your request with the ID or ARN of an inference profile that contains this model."),
            },
        )
        .spawn()
        .await;
    let message = expect_error(
        app.post("/invoke", &json!({"model": "claude", "prompt": "hi"}))
            .await,
        400,
        "invalid_request",
    )
    .await;
    for profile in ["us.", "eu.", "apac.", "global."] {
        assert!(message.contains(&format!("`{profile}{bare}`")), "{message}");
    }
    assert_eq!(
        app.emulator.requests()[0].operation,
        Operation::ConverseStream,
        "a Claude 3.7 id is called through Converse"
    );
}

#[tokio::test]
async fn a_native_model_refuses_an_image_naming_the_model_and_the_block() {
    let app = TestApp::new().spawn().await;
    let image = json!({
        "model": "llama3",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image", "media_type": "image/png", "data": base64(b"png")},
        ]}],
    });
    for path in ["/invoke", "/stream"] {
        let message = expect_error(app.post(path, &image).await, 400, "invalid_request").await;
        assert!(
            message.contains("model `llama3`") && message.contains("`image`"),
            "{message}"
        );
    }
    assert!(
        app.emulator.requests().is_empty(),
        "nothing reaches Bedrock"
    );
}

#[tokio::test]
async fn the_websocket_text_mode_stays_text() {
    let app = TestApp::new()
        .registry(converse_registry(""))
        .scenario(
            CLAUDE_37,
            Scenario::converse()
                .reasoning(["Thinking."], "sig")
                .text(["Hello", " there"])
                .tool_use("t1", "weather", ["{}"]),
        )
        .spawn()
        .await;
    let mut socket = connect(&app, "model=claude&streaming=1").await;
    socket.send(Message::text("Hi")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "Hello");
    assert_eq!(next_text(&mut socket).await, " there");
    let mut whole = connect(&app, "model=claude").await;
    whole.send(Message::text("Hi")).await.unwrap();
    assert_eq!(next_text(&mut whole).await, "Hello there");
    // Nothing else came on the streaming socket: the next prompt's first piece is next.
    socket.send(Message::text("Again")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "Hello");
}

#[tokio::test]
async fn a_tool_call_cut_by_an_exception_is_an_error_and_its_tokens_still_count() {
    let app = TestApp::new()
        .registry(converse_registry(""))
        .scenario(
            CLAUDE_37,
            Scenario::converse()
                .text(["one", " two"])
                .tool_use("t1", "weather", ["{\"ci"])
                .then_exception("throttlingException"),
        )
        .spawn()
        .await;
    let question =
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": weather_tool()});
    let events = all_sse_events(
        app.post(
            "/stream",
            &json!({"model": "claude", "prompt": "hi", "tools": weather_tool()}),
        )
        .await,
    )
    .await;
    let names: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        ["chunk", "chunk", "error"],
        "no half tool call: {events:?}"
    );
    assert_eq!(events[2].data["error"]["code"], "throttled");
    assert_eq!(
        ask(&app, Transport::Invoke, &question).await,
        Err("429 throttled".into())
    );
    let metrics = app.metrics(None).await;
    let expected = r#"modelgate_tokens_total{model="claude",key="none",direction="output"} 6"#;
    assert!(
        metrics.contains(expected),
        "missing `{expected}` in:\n{metrics}"
    );
}

#[tokio::test]
async fn a_tool_call_whose_input_is_not_json_is_an_upstream_error() {
    let app = TestApp::new()
        .registry(converse_registry(""))
        .scenario(
            CLAUDE_37,
            Scenario::converse().tool_use("t1", "weather", ["{\"city\": "]),
        )
        .spawn()
        .await;
    let question =
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": weather_tool()});
    for transport in TRANSPORTS {
        let expected = match transport {
            Transport::Invoke => "502 upstream_error",
            _ => "upstream_error",
        };
        assert_eq!(
            ask(&app, transport, &question).await,
            Err(expected.into()),
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn the_emulator_refuses_what_bedrock_refuses_in_a_converse_request() {
    use aws_sdk_bedrockruntime::types::{
        ContentBlock, ConversationRole, Message as Turn, ToolUseBlock,
    };
    let emulator = crate::emulator::Emulator::start().await;
    let client = crate::emulator_selftest::client(&emulator, false);
    let turn = |role: ConversationRole, block: ContentBlock| {
        Turn::builder().role(role).content(block).build().unwrap()
    };
    let call = ToolUseBlock::builder()
        .tool_use_id("t1")
        .name("weather")
        .input(aws_smithy_types::Document::Object(Default::default()))
        .build()
        .unwrap();
    let refusal = |turns: Vec<Turn>| {
        let client = client.clone();
        async move {
            let err = client
                .converse_stream()
                .model_id("amazon.nova-pro-v1:0")
                .set_messages(Some(turns))
                .send()
                .await
                .expect_err("a ValidationException");
            let err = err.into_service_error();
            assert!(err.is_validation_exception(), "{err:?}");
            err.meta().message().unwrap().to_owned()
        }
    };
    assert_eq!(
        refusal(vec![
            turn(
                ConversationRole::User,
                ContentBlock::Text("Weather?".into())
            ),
            turn(ConversationRole::Assistant, ContentBlock::ToolUse(call)),
        ])
        .await,
        "The toolConfig field must be defined when using toolUse and toolResult content blocks."
    );
    assert!(
        refusal(vec![turn(
            ConversationRole::Assistant,
            ContentBlock::Text("Hi".into())
        )])
        .await
        .starts_with("A conversation must start with a user message.")
    );
    assert!(
        refusal(vec![turn(
            ConversationRole::User,
            ContentBlock::Text(" ".into())
        )])
        .await
        .contains("is blank")
    );
}

#[tokio::test]
async fn a_client_that_leaves_in_the_middle_of_a_tool_call_stops_the_converse_stream() {
    let app = TestApp::new()
        .registry(converse_registry(""))
        .scenario(
            CLAUDE_37,
            Scenario::converse()
                .text(["Calling."])
                .tool_use("t1", "weather", ["{\"city\"", ": \"Paris\"", "}"])
                // The emulator sees a client leave on its next write: one every 300 ms.
                .paced(Duration::from_millis(300)),
        )
        .spawn()
        .await;
    let response = app
        .post(
            "/stream",
            &json!({"model": "claude", "prompt": "Weather?", "tools": weather_tool()}),
        )
        .await;
    let mut events = sse_events(response);
    assert_eq!(events.next().await.unwrap().event, "chunk");
    drop(events);
    app.assert_upstream_closed_within_a_second().await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_answer_pays_for_what_was_generated() {
    let app = TestApp::new()
        .registry(converse_registry(""))
        .api_key("team-a", crate::auth::KEY, "tokens_per_day = 1000")
        .scenario(
            CLAUDE_37,
            Scenario::converse()
                .text(["one", " two", " three", " four"])
                .paced(Duration::from_millis(300)),
        )
        .spawn()
        .await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{}/stream", app.url))
        .bearer_auth(crate::auth::KEY)
        .json(&json!({"model": "claude", "prompt": "Count", "max_tokens": 500}))
        .send()
        .await
        .unwrap();
    let mut events = sse_events(response);
    assert_eq!(events.next().await.unwrap().event, "chunk");
    drop(events);
    app.assert_upstream_closed_within_a_second().await;
    // Asking for more than the whole budget is refused with what is left: once the
    // stream's 500 reserved tokens are settled, what it generated is gone from the budget.
    let left = crate::cluster::wait_for(
        "the stream's reservation is settled",
        Duration::from_secs(5),
        || async {
            let refused = client
                .post(format!("{}/invoke", app.url))
                .bearer_auth(crate::auth::KEY)
                .json(&json!({"model": "claude", "prompt": "x", "max_tokens": 1001}))
                .send()
                .await
                .unwrap();
            let message = expect_error(refused, 429, "budget_exhausted").await;
            (!message.contains("has 500 of")).then_some(message)
        },
    )
    .await;
    assert!(!left.contains("has 1000 of"), "{left}");
}
