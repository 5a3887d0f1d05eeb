//! The real clients: the official `openai` Python SDK (sync and async, whole and streamed,
//! tools, images, every exception class) and LangChain's `ChatOpenAI` streaming, run by
//! tests/compat/openai_client.py against the gateway in front of the Bedrock emulator and of
//! the local model.

use std::path::PathBuf;

use serde_json::json;

use crate::app::{App, LLAMA_ID, TestApp};
use crate::converse::{CLAUDE_37, converse_registry, unbase64};
use crate::emulator::{Operation, Scenario};

/// A second Converse model, scripted to call the weather tool.
const TOOL_MODEL_ID: &str = "us.anthropic.claude-sonnet-4-20250514-v1:0";

const KEY: &str = "mg-sdk-client-0123456789";
const LIMITED_KEY: &str = "mg-sdk-limited-0123456789";

/// The Python of the virtual environment `scripts/install-test-tools.sh` makes.
pub fn python() -> PathBuf {
    let python =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-test-tools.sh",
        python.display()
    );
    python
}

/// Runs the client script against `app` and fails with its report if a check failed.
async fn run_clients(app: &App, model: &str, key: &str, extra: &[(&str, &str)]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/compat/openai_client.py");
    let output = tokio::process::Command::new(python())
        .arg(script)
        .env("MODELGATE_URL", &app.url)
        .env("MODELGATE_KEY", key)
        .env("MODELGATE_MODEL", model)
        .envs(extra.iter().copied())
        .output()
        .await
        .expect("python runs");
    let report = String::from_utf8_lossy(&output.stdout);
    println!("{report}");
    assert!(
        output.status.success(),
        "the clients failed:\n{report}\n{}\ngateway: {}",
        String::from_utf8_lossy(&output.stderr),
        app.logs()
    );
}

#[tokio::test]
#[ignore = "needs the openai and langchain-openai packages: run scripts/install-test-tools.sh"]
async fn the_openai_sdk_and_langchain_work_against_bedrock_models_of_every_format() {
    let app = TestApp::new()
        .registry(|url| {
            converse_registry("")(url)
                + &format!(
                    "\n[[models]]\nname = \"claude-tools\"\nprovider = \"bedrock\"\nmodel_id = \"{TOOL_MODEL_ID}\"\nregion = \"us-east-1\"\nendpoint_url = \"{url}\"\n"
                )
        })
        .api_key("sdk", KEY, "")
        .api_key("limited", LIMITED_KEY, "requests_per_minute = 1")
        .scenario(LLAMA_ID, Scenario::reply(["Paris", "."]))
        .scenario(CLAUDE_37, Scenario::converse().text(["Paris", "."]))
        .scenario(
            TOOL_MODEL_ID,
            Scenario::converse()
                .text(["Let me check."])
                .tool_use("tooluse_1", "weather", ["{\"city\": ", "\"Paris\"}"]),
        )
        .spawn()
        .await;
    // The native formats take text only: tools and images are refused.
    run_clients(&app, "llama3", KEY, &[("MODELGATE_LIMITED", LIMITED_KEY)]).await;
    run_clients(&app, "anthropic", KEY, &[]).await;
    run_clients(
        &app,
        "claude",
        KEY,
        &[
            ("MODELGATE_CAN", "tools,images"),
            ("MODELGATE_TOOL_MODEL", "claude-tools"),
        ],
    )
    .await;
    let converse = app
        .emulator
        .requests()
        .into_iter()
        .filter(|request| request.operation == Operation::ConverseStream);
    let contents: Vec<serde_json::Value> = converse
        .flat_map(|request| {
            request.body["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|message| message["content"].as_array().cloned().unwrap_or_default())
        .collect();
    let image = contents
        .iter()
        .find(|block| block.get("image").is_some())
        .expect("the SDK's image reached Bedrock");
    assert_eq!(image["image"]["format"], "png");
    assert_eq!(
        &unbase64(&image["image"]["source"]["bytes"])[..4],
        b"\x89PNG"
    );
    assert!(
        contents.contains(&json!({"toolResult": {"toolUseId": "tooluse_1",
            "content": [{"text": "18°C and sunny"}], "status": "success"}})),
        "the SDK's tool result reached Bedrock"
    );
}

#[cfg(feature = "local")]
#[tokio::test]
#[ignore = "needs the openai and langchain-openai packages: run scripts/install-test-tools.sh"]
async fn the_openai_sdk_and_langchain_work_against_the_local_model() {
    let app = crate::local::spawn_local(1).await;
    run_clients(&app, "local", "any-key-on-an-open-gateway", &[]).await;
}
