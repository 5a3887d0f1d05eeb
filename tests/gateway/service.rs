//! The service around the model calls: OpenAPI document, docs, model list, health, start-up
//! configuration and its errors.

use std::time::Duration;

use serde_json::{Value, json};

use crate::app::{CLAUDE_ID, LLAMA_ID, TestApp, config_file, gateway_command};
use crate::client::expect_error;

async fn openapi_from_binary() -> String {
    let output = gateway_command(false)
        .arg("openapi")
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn the_committed_openapi_document_is_what_the_code_generates() {
    let generated = openapi_from_binary().await;
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .expect("openapi/openapi.json is committed");
    assert!(
        generated.trim_end() == committed.trim_end(),
        "openapi/openapi.json is stale: regenerate it with `cargo run -- openapi > openapi/openapi.json`"
    );
}

#[tokio::test]
async fn the_openapi_document_is_valid_openapi_3_and_describes_every_operation() {
    let text = openapi_from_binary().await;
    let document: openapiv3::OpenAPI =
        serde_json::from_str(&text).expect("a valid OpenAPI 3 document");
    assert!(document.openapi.starts_with("3."));
    let spec: Value = serde_json::from_str(&text).unwrap();
    let paths = &spec["paths"];
    for (path, method) in [
        ("/invoke", "post"),
        ("/stream", "get"),
        ("/stream", "post"),
        ("/models", "get"),
        ("/healthz", "get"),
    ] {
        let operation = &paths[path][method];
        assert!(operation.is_object(), "{method} {path} is documented");
        assert!(
            operation["responses"]["200"]["content"].is_object(),
            "{method} {path} has a 200 body"
        );
    }
    for method in ["get", "post"] {
        let ok = &paths["/stream"][method]["responses"]["200"]["content"];
        assert!(
            ok["text/event-stream"].is_object(),
            "/stream {method} is text/event-stream: {ok}"
        );
    }
    for status in ["400", "404", "429", "502", "503", "504"] {
        assert!(
            paths["/invoke"]["post"]["responses"][status].is_object(),
            "/invoke documents {status}"
        );
    }
    assert!(
        paths["/invoke"]["post"]["requestBody"]["content"]["application/json; charset=utf-8"]
            .is_object()
    );
}

#[tokio::test]
async fn openapi_json_and_swagger_ui_are_served() {
    let app = TestApp::new().spawn().await;
    let served = app.get("/openapi.json").await;
    assert_eq!(served.status(), 200);
    let served: Value = served.json().await.unwrap();
    let generated: Value = serde_json::from_str(&openapi_from_binary().await).unwrap();
    assert_eq!(served, generated);
    let docs = app.get("/docs").await;
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger-ui"));
}

#[tokio::test]
async fn models_and_health_are_listed() {
    let app = TestApp::new().spawn().await;
    let models: Value = app.get("/models").await.json().await.unwrap();
    assert_eq!(
        models,
        json!({"models": [
            {"name": "llama3", "provider": "bedrock", "model_id": LLAMA_ID, "format": "llama3", "state": "ready"},
            {"name": "anthropic", "provider": "bedrock", "model_id": CLAUDE_ID, "format": "anthropic", "state": "ready"},
        ]})
    );
    let health = app.get("/healthz").await;
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    assert_eq!(
        health.json::<Value>().await.unwrap(),
        json!({"status": "ok"})
    );
    let missing = app.get("/nowhere").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
}

#[tokio::test]
async fn without_aws_credentials_bedrock_models_are_listed_unavailable_with_the_reason_requests_get()
 {
    let app = TestApp::new().without_credentials().spawn().await;
    let message = expect_error(
        app.post(
            "/invoke",
            &serde_json::json!({"model": "llama3", "prompt": "hi"}),
        )
        .await,
        503,
        "upstream_unavailable",
    )
    .await;
    // The credential chain is asked once, in the background, at start-up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let models = loop {
        let models: Value = app.get("/models").await.json().await.unwrap();
        if models["models"][0]["state"] != "ready" || tokio::time::Instant::now() > deadline {
            break models;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(models["models"][0]["state"], "unavailable", "{models}");
    assert_eq!(models["models"][0]["reason"], message.as_str(), "{models}");
    assert_eq!(models["models"][1]["state"], "unavailable", "{models}");
    assert!(
        models["models"][1]["reason"]
            .as_str()
            .is_some_and(
                |reason| reason.contains("model `anthropic`") && reason.contains("AWS_PROFILE")
            ),
        "{models}"
    );
    assert!(app.emulator.requests().is_empty());
}

/// Runs the gateway on `config` and returns its exit status and stderr (it must exit).
async fn start_with_bad_config(config: &str) -> (i32, String) {
    let file = config_file(config);
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        gateway_command(false)
            .arg("--config")
            .arg(file.path())
            .arg("--listen")
            .arg("127.0.0.1:0")
            .output(),
    )
    .await
    .expect("the gateway exits on a bad config")
    .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    (
        output.status.code().unwrap_or(-1),
        stderr.replace(file.path().to_str().unwrap(), "FILE"),
    )
}

#[tokio::test]
async fn a_bad_configuration_stops_start_up_naming_the_file_line_and_field() {
    let model = "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
    let cases = [
        (
            "[[models]]\nname = \"a\"\nprovider = \"openai\"\n".to_owned(),
            "FILE, line 3",
            "provider",
        ),
        (
            format!("{model}{model}"),
            "FILE, line 6",
            "duplicate model name `a`",
        ),
        ("[[models]\n".to_owned(), "FILE, line 1", ""),
        (
            format!("{model}format = \"gpt\"\n"),
            "FILE, line 5",
            "format",
        ),
        (
            format!("{model}max_tokens = 3000\n"),
            "FILE, line 5",
            "max_tokens",
        ),
        (
            format!("{model}colour = \"blue\"\n"),
            "FILE, line 5",
            "colour",
        ),
        (
            "[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \" \"\n".to_owned(),
            "FILE, line 4",
            "model_id",
        ),
    ];
    for (config, location, field) in cases {
        let (code, stderr) = start_with_bad_config(&config).await;
        assert_ne!(code, 0, "{config}");
        assert!(
            stderr.contains(location) && stderr.contains(field),
            "{config:?} → {stderr}"
        );
    }
    let (code, stderr) = tokio::time::timeout(
        Duration::from_secs(20),
        gateway_command(false)
            .args(["--config", "/nonexistent/modelgate.toml"])
            .output(),
    )
    .await
    .map(|output| {
        let output = output.unwrap();
        (
            output.status.code(),
            String::from_utf8(output.stderr).unwrap(),
        )
    })
    .unwrap();
    assert_ne!(code, Some(0));
    assert!(stderr.contains("/nonexistent/modelgate.toml"), "{stderr}");
}

#[tokio::test]
async fn the_listen_flag_beats_the_environment_which_beats_the_config_file() {
    let emulator_free = "listen = \"localhost:99999\"\n[[models]]\nname = \"a\"\nprovider = \"bedrock\"\nmodel_id = \"meta.llama3-8b-instruct-v1:0\"\n";
    let file = config_file(emulator_free);
    let starts = |env: Option<&str>, flag: Option<&str>| {
        let mut command = gateway_command(false);
        command.arg("--config").arg(file.path());
        if let Some(env) = env {
            command.env("MODELGATE_LISTEN", env);
        }
        if let Some(flag) = flag {
            command.args(["--listen", flag]);
        }
        async move {
            let mut child = command
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let exited = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            let started = exited.is_err();
            let _ = child.kill().await;
            started
        }
    };
    assert!(
        !starts(None, None).await,
        "the config's bad address is used when nothing overrides it"
    );
    assert!(
        starts(Some("127.0.0.1:0"), None).await,
        "the environment beats the config"
    );
    assert!(
        !starts(Some("127.0.0.1:0"), Some("localhost:99999")).await,
        "the flag beats the environment"
    );
    assert!(
        starts(Some("localhost:99999"), Some("127.0.0.1:0")).await,
        "the flag beats the environment"
    );
}
