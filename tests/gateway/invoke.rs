//! `POST /invoke` through the real SDK against the emulator: native bodies, answers, and
//! the mapping of every upstream failure to the contract's status and code.

use serde_json::{Value, json};

use crate::app::{ACCESS_KEY, CLAUDE_ID, LLAMA_ID, TestApp, registry};
use crate::client::expect_error;
use crate::emulator::{NativeStop, Operation, Scenario};

#[tokio::test]
async fn invoke_llama3_renders_the_instruct_template_and_returns_text_and_usage() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["Paris", " is the capital."]))
        .spawn()
        .await;

    let response = app
        .post(
            "/invoke",
            &json!({"model": "llama3", "prompt": "Capital of France?"}),
        )
        .await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({
            "model": "llama3",
            "text": "Paris is the capital.",
            "content": [{"type": "text", "text": "Paris is the capital."}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 7, "output_tokens": 2},
        })
    );
    let sent = app.emulator.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].operation,
        Operation::InvokeStream,
        "the whole answer is the stream collected"
    );
    assert_eq!(sent[0].model_id, LLAMA_ID);
    assert_eq!(sent[0].content_type.as_deref(), Some("application/json"));
    assert_eq!(
        sent[0].body,
        json!({
            "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            "max_gen_len": 512,
            "temperature": 0.5,
        })
    );
    let authorization = sent[0].authorization.as_deref().unwrap();
    assert!(
        authorization.starts_with(&format!("AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/"))
            && authorization.contains("/us-east-1/bedrock/aws4_request"),
        "{authorization}"
    );
}

#[tokio::test]
async fn invoke_anthropic_sends_a_multi_turn_messages_body() {
    let app = TestApp::new()
        .scenario(
            CLAUDE_ID,
            Scenario::reply(["Lyon"])
                .paced(std::time::Duration::ZERO)
                .stopping(NativeStop::StopSequence)
                .input_tokens(31),
        )
        .spawn()
        .await;

    let response = app
        .post(
            "/invoke",
            &json!({
                "model": "anthropic",
                "system": "Answer in one word.",
                "messages": [
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris"},
                    {"role": "user", "content": "Second city?"},
                ],
                "max_tokens": 50,
                "temperature": 0.1,
                "top_p": 0.9,
                "stop": ["\n\n"],
            }),
        )
        .await;

    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["text"], "Lyon");
    assert_eq!(body["stop_reason"], "stop_sequence");
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 31, "output_tokens": 1})
    );
    assert_eq!(
        app.emulator.requests()[0].body,
        json!({
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 50,
            "system": "Answer in one word.",
            "messages": [
                {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "Second city?"},
            ],
            "temperature": 0.1,
            "top_p": 0.9,
            "stop_sequences": ["\n\n"],
        })
    );
}

#[tokio::test]
async fn a_native_length_stop_is_reported_as_max_tokens() {
    let app = TestApp::new().spawn().await;
    for (model, id) in [("llama3", LLAMA_ID), ("anthropic", CLAUDE_ID)] {
        app.emulator.script(
            id,
            Scenario::reply(["cut"])
                .paced(std::time::Duration::ZERO)
                .stopping(NativeStop::MaxTokens)
                .input_tokens(3),
        );
        let response = app
            .post(
                "/invoke",
                &json!({"model": model, "prompt": "go", "max_tokens": 1}),
            )
            .await;
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["stop_reason"], "max_tokens", "{model}: {body}");
    }
}

#[tokio::test]
async fn invalid_requests_are_refused_with_400_before_any_upstream_call() {
    let app = TestApp::new().spawn().await;
    let cases = [
        (json!({"model": "llama3"}), "required"),
        (
            json!({"model": "llama3", "prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
            "not both",
        ),
        (json!({"model": "llama3", "messages": []}), "empty"),
        (
            json!({"model": "llama3", "messages": [{"role": "assistant", "content": "b"}]}),
            "start with",
        ),
        (
            json!({"model": "llama3", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            "alternate",
        ),
        (
            json!({"model": "llama3", "messages": [{"role": "wizard", "content": "b"}]}),
            "wizard",
        ),
        (
            json!({"model": "llama3", "prompt": "a", "temperature": 1.5}),
            "temperature",
        ),
        (
            json!({"model": "llama3", "prompt": "a", "top_p": 2}),
            "top_p",
        ),
        (
            json!({"model": "llama3", "prompt": "a", "max_tokens": 0}),
            "max_tokens",
        ),
        (
            json!({"model": "llama3", "prompt": "a", "max_tokens": 4096}),
            "2048",
        ),
        (
            json!({"model": "llama3", "prompt": "a", "max_tokns": 5}),
            "max_tokns",
        ),
        (json!({"prompt": "a"}), "model"),
        (json!(["not", "an", "object"]), ""),
    ];
    for (body, needle) in cases {
        let message = expect_error(app.post("/invoke", &body).await, 400, "invalid_request").await;
        assert!(message.contains(needle), "{body} → {message}");
    }
    let malformed = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    expect_error(malformed, 400, "invalid_request").await;
    assert!(
        app.emulator.requests().is_empty(),
        "nothing reaches Bedrock"
    );
}

#[tokio::test]
async fn an_unknown_model_is_404_and_names_the_way_to_list_models() {
    let app = TestApp::new().spawn().await;
    let message = expect_error(
        app.post("/invoke", &json!({"model": "gpt-9", "prompt": "hi"}))
            .await,
        404,
        "unknown_model",
    )
    .await;
    assert!(
        message.contains("gpt-9") && message.contains("/models"),
        "{message}"
    );
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_413() {
    let app = TestApp::new().spawn().await;
    let prompt = "x".repeat(1024 * 1024 + 1);
    let response = app
        .post("/invoke", &json!({"model": "llama3", "prompt": prompt}))
        .await;
    expect_error(response, 413, "too_large").await;
}

#[tokio::test]
async fn upstream_errors_map_to_the_contract_statuses() {
    let app = TestApp::new().spawn().await;
    let cases = [
        (
            400,
            "ValidationException",
            "Malformed input request: bad",
            400,
            "invalid_request",
        ),
        (
            400,
            "ServiceQuotaExceededException",
            "quota",
            429,
            "throttled",
        ),
        (
            403,
            "AccessDeniedException",
            "no access",
            502,
            "upstream_error",
        ),
        (
            404,
            "ResourceNotFoundException",
            "end of life",
            502,
            "upstream_error",
        ),
        (
            408,
            "ModelTimeoutException",
            "too slow",
            504,
            "upstream_timeout",
        ),
        (
            424,
            "ModelErrorException",
            "model broke",
            502,
            "upstream_error",
        ),
        (429, "ThrottlingException", "slow down", 429, "throttled"),
        (429, "ModelNotReadyException", "warming", 429, "throttled"),
        (
            500,
            "InternalServerException",
            "oops",
            502,
            "upstream_error",
        ),
        (
            503,
            "ServiceUnavailableException",
            "down",
            503,
            "upstream_unavailable",
        ),
        (
            403,
            "UnrecognizedClientException",
            "bad key",
            502,
            "upstream_error",
        ),
    ];
    for (status, error_type, bedrock_message, expected_status, code) in cases {
        app.emulator.script(
            LLAMA_ID,
            Scenario::HttpError {
                status,
                error_type: error_type.into(),
                message: bedrock_message.into(),
            },
        );
        let response = app
            .post("/invoke", &json!({"model": "llama3", "prompt": "hi"}))
            .await;
        let retry_after = response.headers().get("retry-after").cloned();
        let message = expect_error(response, expected_status, code).await;
        assert!(
            message.contains(bedrock_message) && message.contains("llama3"),
            "{error_type}: the message says which model and what Bedrock said: {message}"
        );
        assert_eq!(
            retry_after.is_some(),
            matches!(expected_status, 429 | 503),
            "{error_type}: Retry-After"
        );
    }
}

#[tokio::test]
async fn a_model_that_needs_an_inference_profile_says_so() {
    let app = TestApp::new()
    .scenario(
        LLAMA_ID,
        Scenario::HttpError {
            status: 400,
            error_type: "ValidationException".into(),
            message: "Invocation of model ID meta.llama3-70b-instruct-v1:0 with on-demand throughput isn't supported. Retry your request with the ID or ARN of an inference profile that contains this model.".into(),
        },
    )
    .spawn()
    .await;
    let message = expect_error(
        app.post("/invoke", &json!({"model": "llama3", "prompt": "hi"}))
            .await,
        400,
        "invalid_request",
    )
    .await;
    assert!(
        message.contains("model_id") && message.contains("us."),
        "{message}"
    );
}

#[tokio::test]
async fn missing_aws_credentials_are_a_503_that_says_what_to_do_and_the_server_stays_up() {
    let app = TestApp::new().without_credentials().spawn().await;
    let message = expect_error(
        app.post("/invoke", &json!({"model": "anthropic", "prompt": "hi"}))
            .await,
        503,
        "upstream_unavailable",
    )
    .await;
    assert!(
        message.contains("credentials") && message.contains("AWS_PROFILE"),
        "{message}"
    );
    assert!(app.emulator.requests().is_empty());
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_503_upstream_unavailable() {
    let app = TestApp::new()
        .registry(|_| registry("http://127.0.0.1:9"))
        .spawn()
        .await;
    let message = expect_error(
        app.post("/invoke", &json!({"model": "llama3", "prompt": "hi"}))
            .await,
        503,
        "upstream_unavailable",
    )
    .await;
    assert!(message.contains("connection"), "{message}");
}

#[tokio::test]
async fn the_aws_secret_and_the_prompt_never_reach_the_logs_but_the_request_id_does() {
    let app = TestApp::new().spawn().await;
    let response = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .header("x-request-id", "trace-me-42")
        .json(&json!({"model": "llama3", "prompt": "my private question"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-me-42");
    assert_eq!(response.status(), 200);
    app.get("/stream?model=llama3&prompt=another%20private%20question")
        .await
        .text()
        .await
        .unwrap();
    let logs = app.logs();
    assert!(logs.contains("trace-me-42"), "{logs}");
    assert!(!logs.contains(crate::app::SECRET_KEY), "{logs}");
    assert!(!logs.contains("private question"), "{logs}");
}
