//! The real clients: the official `openai` Python SDK (sync and async, whole and streamed,
//! tools, images, every exception class) and LangChain's `ChatOpenAI` streaming, run by
//! tests/compat/openai_client.py against the gateway in front of the Bedrock emulator and of
//! the local model.

use std::path::PathBuf;

use crate::app::{App, LLAMA_ID, TestApp};
use crate::emulator::Scenario;

const KEY: &str = "mg-sdk-client-0123456789";
const LIMITED_KEY: &str = "mg-sdk-limited-0123456789";

/// The Python of the virtual environment `scripts/install-test-tools.sh` makes.
fn python() -> PathBuf {
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
async fn the_openai_sdk_and_langchain_work_against_bedrock_models() {
    let app = TestApp::new()
        .api_key("sdk", KEY, "")
        .api_key("limited", LIMITED_KEY, "requests_per_minute = 1")
        .scenario(LLAMA_ID, Scenario::reply(["Paris", "."]))
        .spawn()
        .await;
    run_clients(&app, "llama3", KEY, &[("MODELGATE_LIMITED", LIMITED_KEY)]).await;
}

#[cfg(feature = "local")]
#[tokio::test]
#[ignore = "needs the openai and langchain-openai packages: run scripts/install-test-tools.sh"]
async fn the_openai_sdk_and_langchain_work_against_the_local_model() {
    let app = crate::local::spawn_local(1).await;
    run_clients(&app, "local", "any-key-on-an-open-gateway", &[]).await;
}
