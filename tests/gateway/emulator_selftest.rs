//! Drives the Bedrock emulator with the real `aws-sdk-bedrockruntime` client,
//! so that the gateway tests can trust what the emulator says.

use std::time::Duration;

use aws_sdk_bedrockruntime::Client;
use aws_sdk_bedrockruntime::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_bedrockruntime::error::SdkError;
use aws_sdk_bedrockruntime::operation::invoke_model::InvokeModelError;
use aws_sdk_bedrockruntime::operation::invoke_model_with_response_stream::{
    InvokeModelWithResponseStreamError, InvokeModelWithResponseStreamOutput,
};
use aws_sdk_bedrockruntime::primitives::Blob;
use aws_sdk_bedrockruntime::types::ResponseStream;
use aws_sdk_bedrockruntime::types::error::ResponseStreamError;
use aws_smithy_types::event_stream::RawMessage;
use serde_json::{Value, json};

use crate::emulator::{Emulator, NativeStop, Operation, Scenario, StreamEnd};

const LLAMA: &str = "meta.llama3-70b-instruct-v1:0";
const CLAUDE: &str = "anthropic.claude-3-haiku-20240307-v1:0";

pub(crate) fn client(emu: &Emulator, retries: bool) -> Client {
    let mut conf = aws_sdk_bedrockruntime::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AKIDTEST", "secret", None, None, "test"))
        .endpoint_url(emu.url());
    if !retries {
        conf = conf.retry_config(aws_sdk_bedrockruntime::config::retry::RetryConfig::disabled());
    }
    Client::from_conf(conf.build())
}

fn llama_body() -> Value {
    json!({"prompt": "<|begin_of_text|>hi", "max_gen_len": 64, "temperature": 0.5})
}

fn claude_body() -> Value {
    json!({
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
        "stop_sequences": ["STOP"],
    })
}

async fn invoke(
    c: &Client,
    model: &str,
    body: &Value,
) -> Result<Value, SdkError<InvokeModelError>> {
    let out = c
        .invoke_model()
        .model_id(model)
        .content_type("application/json")
        .accept("application/json")
        .body(Blob::new(body.to_string()))
        .send()
        .await?;
    Ok(serde_json::from_slice(out.body().as_ref()).expect("invoke body is JSON"))
}

async fn stream(
    c: &Client,
    model: &str,
    body: &Value,
) -> Result<InvokeModelWithResponseStreamOutput, SdkError<InvokeModelWithResponseStreamError>> {
    c.invoke_model_with_response_stream()
        .model_id(model)
        .content_type("application/json")
        .accept("application/json")
        .body(Blob::new(body.to_string()))
        .send()
        .await
}

fn decode_chunk(ev: ResponseStream) -> Value {
    match ev {
        ResponseStream::Chunk(part) => {
            let bytes = part.bytes.expect("chunk carries bytes");
            serde_json::from_slice(bytes.as_ref()).expect("chunk bytes are JSON")
        }
        other => panic!("unexpected event {other:?}"),
    }
}

#[tokio::test]
async fn emulator_invoke_llama_anthropic_and_arn() {
    let emu = Emulator::start().await;
    let c = client(&emu, false);

    let v = invoke(&c, LLAMA, &llama_body()).await.unwrap();
    assert_eq!(
        v,
        json!({"generation": "Hello, world!", "prompt_token_count": 7,
               "generation_token_count": 4, "stop_reason": "stop"})
    );

    let profile = format!("us.{CLAUDE}");
    emu.script(
        &profile,
        Scenario::reply(["a", "b"])
            .paced(Duration::ZERO)
            .stopping(NativeStop::StopSequence)
            .input_tokens(11),
    );
    let v = invoke(&c, &profile, &claude_body()).await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["content"], json!([{"type": "text", "text": "ab"}]));
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], "STOP");
    assert_eq!(v["usage"], json!({"input_tokens": 11, "output_tokens": 2}));

    // An ARN: the SDK percent-encodes its '/' and ':'.
    let arn = format!("arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.{CLAUDE}");
    emu.script(
        &arn,
        Scenario::reply(["x"])
            .paced(Duration::ZERO)
            .stopping(NativeStop::MaxTokens)
            .input_tokens(3),
    );
    let v = invoke(&c, &arn, &claude_body()).await.unwrap();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["stop_sequence"], Value::Null);

    let reqs = emu.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].model_id, LLAMA);
    assert_eq!(reqs[0].operation, Operation::Invoke);
    assert_eq!(reqs[0].body, llama_body());
    assert_eq!(reqs[0].content_type.as_deref(), Some("application/json"));
    for r in &reqs {
        let auth = r.authorization.as_deref().expect("signed");
        assert!(
            auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/"),
            "{auth}"
        );
        assert!(auth.contains("/us-east-1/bedrock/aws4_request"), "{auth}");
    }
    assert_eq!(reqs[1].model_id, profile);
    assert_eq!(reqs[1].body, claude_body());
    assert_eq!(reqs[2].model_id, arn);
}

#[tokio::test]
async fn emulator_validation_errors() {
    let emu = Emulator::start().await;
    let c = client(&emu, false);

    let err = invoke(&c, LLAMA, &json!({"prompt": "x", "foo": 1}))
        .await
        .unwrap_err();
    match err.into_service_error() {
        InvokeModelError::ValidationException(e) => {
            let m = e.message().unwrap_or_default();
            assert!(m.starts_with("Malformed input request: "), "{m}");
            assert!(m.contains("extraneous key [foo]"), "{m}");
        }
        other => panic!("{other:?}"),
    }
    let err = invoke(&c, LLAMA, &json!({"max_gen_len": 4096}))
        .await
        .unwrap_err();
    let m = format!("{:?}", err.into_service_error());
    assert!(
        m.contains("required key [prompt]") && m.contains("4096"),
        "{m}"
    );

    let err = invoke(
        &c,
        CLAUDE,
        &json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 5, "messages": []}),
    )
    .await
    .unwrap_err();
    assert!(matches!(
        err.into_service_error(),
        InvokeModelError::ValidationException(_)
    ));

    // Validation wins over the scenario, on the stream operation too.
    emu.script(
        LLAMA,
        Scenario::HttpError {
            status: 500,
            error_type: "InternalServerException".into(),
            message: "boom".into(),
        },
    );
    let err = stream(&c, LLAMA, &json!({"prompt": 1})).await.unwrap_err();
    assert!(matches!(
        err.into_service_error(),
        InvokeModelWithResponseStreamError::ValidationException(_)
    ));

    let err = invoke(
        &c,
        "amazon.titan-text-express-v1",
        &json!({"inputText": "x"}),
    )
    .await
    .unwrap_err();
    assert!(matches!(
        err.into_service_error(),
        InvokeModelError::ValidationException(_)
    ));
    assert_eq!(emu.requests().len(), 5);
}

#[tokio::test]
async fn emulator_raw_http_auth_and_routing() {
    let emu = Emulator::start().await;
    let http = reqwest::Client::new();
    let url = format!("{}/model/meta.llama3-70b-instruct-v1%3A0/invoke", emu.url());
    let r = http
        .post(&url)
        .header("content-type", "application/json")
        .body(llama_body().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(
        r.headers()["x-amzn-errortype"]
            .to_str()
            .unwrap()
            .starts_with("MissingAuthenticationTokenException")
    );
    let reqs = emu.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].model_id, LLAMA);
    assert_eq!(reqs[0].authorization, None);

    let r = http
        .post(format!("{}/model/x/converse", emu.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.headers()["x-amzn-errortype"].to_str().unwrap(),
        "UnknownOperationException"
    );
    assert_eq!(emu.requests().len(), 1);
}

#[tokio::test]
async fn emulator_streams_llama_and_anthropic() {
    let emu = Emulator::start().await;
    let c = client(&emu, false);

    let mut out = stream(&c, LLAMA, &llama_body()).await.unwrap();
    let mut events = Vec::new();
    while let Some(ev) = out.body.recv().await.unwrap() {
        events.push(decode_chunk(ev));
    }
    assert_eq!(events.len(), 5);
    let text: Vec<_> = events
        .iter()
        .map(|e| e["generation"].as_str().unwrap())
        .collect();
    assert_eq!(text, ["Hello", ", ", "world", "!", ""]);
    assert_eq!(events[0]["prompt_token_count"], 7);
    assert_eq!(events[1]["prompt_token_count"], Value::Null);
    assert_eq!(events[3]["generation_token_count"], 4);
    assert_eq!(events[3]["stop_reason"], Value::Null);
    assert_eq!(events[4]["stop_reason"], "stop");
    let metrics = &events[4]["amazon-bedrock-invocationMetrics"];
    assert_eq!(metrics["inputTokenCount"], 7);
    assert_eq!(metrics["outputTokenCount"], 4);
    assert!(
        metrics["invocationLatency"].as_u64().unwrap() >= 60,
        "{metrics}"
    );

    emu.script(
        CLAUDE,
        Scenario::reply(["Hi", " there"])
            .paced(Duration::from_millis(5))
            .stopping(NativeStop::MaxTokens)
            .input_tokens(9),
    );
    let mut out = stream(&c, CLAUDE, &claude_body()).await.unwrap();
    let mut events = Vec::new();
    while let Some(ev) = out.body.recv().await.unwrap() {
        events.push(decode_chunk(ev));
    }
    let types: Vec<_> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(events[0]["message"]["usage"]["input_tokens"], 9);
    assert_eq!(
        events[2]["delta"],
        json!({"type": "text_delta", "text": "Hi"})
    );
    assert_eq!(events[3]["delta"]["text"], " there");
    assert_eq!(
        events[5]["delta"],
        json!({"stop_reason": "max_tokens", "stop_sequence": null})
    );
    assert_eq!(events[5]["usage"]["output_tokens"], 2);
    assert_eq!(
        events[6]["amazon-bedrock-invocationMetrics"]["outputTokenCount"],
        2
    );

    let ends = emu.wait_streams_ended(2, Duration::from_secs(1)).await;
    assert_eq!(ends, [StreamEnd::Completed, StreamEnd::Completed]);
    assert_eq!(emu.open_streams(), 0);
    let reqs = emu.requests();
    assert!(reqs.iter().all(|r| r.operation == Operation::InvokeStream));
}

#[tokio::test]
async fn emulator_http_throttling() {
    let emu = Emulator::start().await;
    emu.script(
        LLAMA,
        Scenario::HttpError {
            status: 429,
            error_type: "ThrottlingException".into(),
            message: "Too many requests, please wait before trying again.".into(),
        },
    );
    let c = client(&emu, false);
    let err = invoke(&c, LLAMA, &llama_body()).await.unwrap_err();
    match err.into_service_error() {
        InvokeModelError::ThrottlingException(e) => {
            assert_eq!(
                e.message(),
                Some("Too many requests, please wait before trying again.")
            )
        }
        other => panic!("{other:?}"),
    }
    let err = stream(&c, LLAMA, &llama_body()).await.unwrap_err();
    assert!(matches!(
        err.into_service_error(),
        InvokeModelWithResponseStreamError::ThrottlingException(_)
    ));
    assert_eq!(emu.requests().len(), 2);
    assert_eq!(emu.open_streams(), 0);
}

#[tokio::test]
async fn emulator_exception_frame() {
    let emu = Emulator::start().await;
    emu.script(
        CLAUDE,
        Scenario::ExceptionAfter {
            pieces: vec!["a".into(), "b".into()],
            exception_type: "throttlingException".into(),
            message: "slow down".into(),
        },
    );
    emu.script(
        LLAMA,
        Scenario::ExceptionAfter {
            pieces: vec!["a".into()],
            exception_type: "modelStreamErrorException".into(),
            message: "model broke".into(),
        },
    );
    let c = client(&emu, false);

    let mut out = stream(&c, CLAUDE, &claude_body()).await.unwrap();
    let mut types = Vec::new();
    let err = loop {
        match out.body.recv().await {
            Ok(Some(ev)) => types.push(decode_chunk(ev)["type"].as_str().unwrap().to_string()),
            Ok(None) => panic!("stream ended without the exception"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        types,
        [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_delta"
        ]
    );
    match err.into_service_error() {
        ResponseStreamError::ThrottlingException(e) => assert_eq!(e.message(), Some("slow down")),
        other => panic!("{other:?}"),
    }

    let mut out = stream(&c, LLAMA, &llama_body()).await.unwrap();
    assert_eq!(
        decode_chunk(out.body.recv().await.unwrap().unwrap())["generation"],
        "a"
    );
    match out.body.recv().await.unwrap_err().into_service_error() {
        ResponseStreamError::ModelStreamErrorException(e) => {
            assert_eq!(e.message(), Some("model broke"));
            assert_eq!(e.original_status_code(), Some(500));
        }
        other => panic!("{other:?}"),
    }

    // Invoke ignores the fault.
    let v = invoke(&c, LLAMA, &llama_body()).await.unwrap();
    assert_eq!(v["generation"], "a");

    let ends = emu.wait_streams_ended(2, Duration::from_secs(1)).await;
    assert_eq!(ends, [StreamEnd::Completed, StreamEnd::Completed]);
}

#[tokio::test]
async fn emulator_error_frame() {
    let emu = Emulator::start().await;
    emu.script(
        LLAMA,
        Scenario::ErrorFrameAfter {
            pieces: vec!["a".into()],
            code: "InternalFailure".into(),
            message: "it broke".into(),
        },
    );
    let c = client(&emu, false);
    let mut out = stream(&c, LLAMA, &llama_body()).await.unwrap();
    assert_eq!(
        decode_chunk(out.body.recv().await.unwrap().unwrap())["generation"],
        "a"
    );
    match out.body.recv().await {
        Err(SdkError::ResponseError(ctx)) => match ctx.raw() {
            RawMessage::Decoded(msg) => {
                let code = msg
                    .headers()
                    .iter()
                    .find(|h| h.name().as_str() == ":error-code")
                    .expect(":error-code header");
                assert_eq!(
                    code.value().as_string().unwrap().as_str(),
                    "InternalFailure"
                );
            }
            other => panic!("{other:?}"),
        },
        other => panic!("expected a ResponseError, got {other:?}"),
    }
    let ends = emu.wait_streams_ended(1, Duration::from_secs(1)).await;
    assert_eq!(ends, [StreamEnd::Completed]);
}

#[tokio::test]
async fn emulator_drop_after() {
    let emu = Emulator::start().await;
    emu.script(
        CLAUDE,
        Scenario::DropAfter {
            pieces: vec!["a".into(), "b".into()],
        },
    );
    let c = client(&emu, false);
    let mut out = stream(&c, CLAUDE, &claude_body()).await.unwrap();
    let mut n = 0;
    let err = loop {
        match out.body.recv().await {
            Ok(Some(_)) => n += 1,
            Ok(None) => panic!("a dropped connection must not look like a clean end"),
            Err(e) => break e,
        }
    };
    assert_eq!(n, 4);
    assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");

    // Invoke: the JSON body is cut short.
    let err = invoke(&c, CLAUDE, &claude_body()).await.unwrap_err();
    assert!(
        matches!(
            err,
            SdkError::ResponseError(_) | SdkError::DispatchFailure(_)
        ),
        "{err:?}"
    );

    let ends = emu.wait_streams_ended(1, Duration::from_secs(1)).await;
    assert_eq!(ends, [StreamEnd::Completed]);
}

#[tokio::test]
async fn emulator_detects_client_close() {
    let emu = Emulator::start().await;
    let pieces: Vec<String> = (0..20).map(|i| format!("p{i} ")).collect();
    emu.script(
        LLAMA,
        Scenario::reply(pieces).paced(Duration::from_millis(100)),
    );
    let c = client(&emu, false);
    let mut out = stream(&c, LLAMA, &llama_body()).await.unwrap();
    assert_eq!(
        decode_chunk(out.body.recv().await.unwrap().unwrap())["generation"],
        "p0 "
    );
    assert_eq!(
        decode_chunk(out.body.recv().await.unwrap().unwrap())["generation"],
        "p1 "
    );
    assert_eq!(emu.open_streams(), 1);
    drop(out);
    let ends = emu.wait_streams_ended(1, Duration::from_secs(1)).await;
    match ends.as_slice() {
        [StreamEnd::ClientClosed { after_chunks }] => {
            assert!((2..=4).contains(after_chunks), "{after_chunks}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(emu.open_streams(), 0);
}
