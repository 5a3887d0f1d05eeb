//! The chat page at `/` and Swagger UI at `/docs` in a real browser: Debian's Chromium driven
//! by playwright-core (`tests/browser/browser-tests.mjs`), against the real gateway backed by
//! the Bedrock emulator. A test binary of its own, so that Chromium's start-up does not share
//! the two cores with the timing-sensitive tests of `tests/gateway/`.

// The gateway tests' own modules, of which this binary uses a part: the gateway test binary,
// which uses them whole, checks them for dead code.
#[allow(dead_code)]
#[path = "gateway/app.rs"]
mod app;
#[allow(dead_code)]
#[path = "gateway/emulator.rs"]
mod emulator;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use app::TestApp;
use emulator::{Scenario, StreamEnd};

const CHROMIUM: &str = "/usr/bin/chromium";
const ECHO_ID: &str = "anthropic.test-echo-v1:0";
const SLOW_ID: &str = "anthropic.test-slow-v1:0";
const THROTTLED_ID: &str = "anthropic.test-throttled-v1:0";
const BREAKS_ID: &str = "anthropic.test-breaks-v1:0";
const MARKUP_ID: &str = "anthropic.test-markup-v1:0";
/// The answer of `echo`, in pieces: Markdown with a list and a code block.
const ECHO_PIECES: [&str; 5] = [
    "Here is a list:\n\n",
    "- one item\n",
    "- two items\n\n",
    "```rust\nfn main() {}\n```\n\n",
    "Done.",
];

/// Every scenario `browser-tests.mjs` runs; each states one thing a user would check.
const SCENARIOS: [&str; 13] = [
    "page_loads_without_console_errors",
    "websocket_answer_streams_in_and_shows_figures",
    "sse_answer_streams_in_and_shows_figures",
    "websocket_stop_cancels_the_answer",
    "sse_stop_aborts_the_answer",
    "upstream_error_shows_in_the_conversation_with_retry",
    "error_midway_over_sse_keeps_the_partial_answer",
    "lost_websocket_reconnects_and_retry_answers",
    "api_key_is_asked_for_and_kept_for_the_tab_only",
    "model_markup_is_shown_as_text",
    "screenshots_desktop_and_phone_light_and_dark",
    "eventsource_reconnects_by_itself_and_resumes_every_event_once",
    "swagger_ui_try_it_out_invokes_a_model",
];

fn registry(emulator_url: &str) -> String {
    [
        ("echo", ECHO_ID),
        ("slow", SLOW_ID),
        ("throttled", THROTTLED_ID),
        ("breaks", BREAKS_ID),
        ("markup", MARKUP_ID),
    ]
    .iter()
    .map(|(name, model_id)| {
        format!(
            "[[models]]\nname = \"{name}\"\nprovider = \"bedrock\"\nmodel_id = \"{model_id}\"\n\
             format = \"anthropic\"\nregion = \"us-east-1\"\nendpoint_url = \"{emulator_url}\"\n\n"
        )
    })
    .collect()
}

/// The key of the second gateway, which has API keys configured.
const API_KEY: &str = "mg-browser-test-key";

fn registry_with_api_key(emulator_url: &str) -> String {
    let sha256 = Sha256::digest(API_KEY.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<String>();
    format!(
        "{}[[api_keys]]\nid = \"browser\"\nsha256 = \"{sha256}\"\n",
        registry(emulator_url)
    )
}

fn pieces(pieces: &[&str], pace: Duration) -> Scenario {
    Scenario::reply(pieces).paced(pace)
}

#[derive(Debug, Deserialize)]
struct Outcome {
    name: String,
    passed: bool,
    error: Option<String>,
}

#[tokio::test]
#[ignore = "needs Chromium, node and playwright-core: run scripts/install-test-tools.sh"]
async fn chat_page_and_swagger_ui_work_in_chromium() {
    let script = browser_tools();
    let app = TestApp::new().registry(registry).spawn().await;
    let emulator = &app.emulator;
    emulator.script(ECHO_ID, pieces(&ECHO_PIECES, Duration::from_millis(100)));
    let endless: Vec<String> = (0..1000).map(|i| format!("word{i} ")).collect();
    let endless: Vec<&str> = endless.iter().map(String::as_str).collect();
    emulator.script(SLOW_ID, pieces(&endless, Duration::from_millis(50)));
    emulator.script(
        THROTTLED_ID,
        Scenario::HttpError {
            status: 429,
            error_type: "ThrottlingException".into(),
            message: "Rate exceeded".into(),
        },
    );
    emulator.script(
        BREAKS_ID,
        Scenario::ExceptionAfter {
            pieces: vec!["Partial ".into(), "answer".into()],
            exception_type: "modelStreamErrorException".into(),
            message: "the model failed midway".into(),
        },
    );
    emulator.script(
        MARKUP_ID,
        pieces(
            &[
                "<img src=x onerror=alert(1)>",
                " <script>alert(2)</script>",
                " **bold** `<b>code</b>`",
            ],
            Duration::from_millis(20),
        ),
    );

    let keyed = TestApp::new().registry(registry_with_api_key).spawn().await;
    keyed
        .emulator
        .script(ECHO_ID, pieces(&ECHO_PIECES, Duration::from_millis(100)));

    // Resumable streams: `echo` counts slowly enough for the browser to reconnect mid-answer.
    let resumable = TestApp::new()
        .settings(r#"resume_window = "30s""#)
        .registry(registry)
        .spawn()
        .await;
    let counting: Vec<String> = (1..=20).map(|n| format!("p{n}")).collect();
    let counting: Vec<&str> = counting.iter().map(String::as_str).collect();
    resumable
        .emulator
        .script(ECHO_ID, pieces(&counting, Duration::from_millis(300)));

    let screenshots = screenshot_dir();
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(&script)
            .arg(&app.url)
            .arg(&keyed.url)
            .arg(&screenshots)
            .arg(&resumable.url)
            .env("CHROMIUM", CHROMIUM)
            .env("API_KEY", API_KEY)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser scenarios finish within 5 minutes")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "browser-tests.mjs failed ({}): {stdout}",
        output.status
    );
    let outcomes: Vec<Outcome> = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|err| panic!("browser-tests.mjs printed no results ({err}): {stdout}"));
    for outcome in &outcomes {
        let verdict = if outcome.passed { "ok" } else { "FAILED" };
        eprintln!("browser scenario {} ... {verdict}", outcome.name);
    }
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|outcome| !outcome.passed)
        .map(|outcome| {
            format!(
                "{}:\n{}",
                outcome.name,
                outcome.error.as_deref().unwrap_or("")
            )
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let ran: Vec<&str> = outcomes
        .iter()
        .map(|outcome| outcome.name.as_str())
        .collect();
    assert_eq!(ran, SCENARIOS, "the scenarios that ran");

    // The page sent the conversation, the system prompt and the settings the user typed.
    let follow_up = emulator
        .requests()
        .into_iter()
        .map(|request| request.body)
        .find(|body| {
            body["system"] == "Answer in lists."
                && body["messages"].as_array().is_some_and(|m| m.len() == 3)
        })
        .expect("the second question of the conversation reached the model");
    assert_eq!(follow_up["max_tokens"], 100);
    assert_eq!(follow_up["temperature"], 0.2);
    assert_eq!(
        follow_up["messages"],
        json!([
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": ECHO_PIECES.concat()},
            {"role": "user", "content": "Second question"},
        ])
    );

    // The EventSource that reconnected resumed its answer: one generation, which finished.
    assert_eq!(
        resumable.emulator.requests().len(),
        1,
        "no second generation"
    );
    assert_eq!(
        resumable
            .emulator
            .wait_streams_ended(1, Duration::from_secs(5))
            .await,
        [StreamEnd::Completed]
    );

    // Stop (over both transports) and the lost connection ended the upstream calls: the slow
    // model would otherwise stream for 50 s more.
    let slow_calls = emulator
        .requests()
        .iter()
        .filter(|request| request.model_id == SLOW_ID)
        .count();
    assert_eq!(
        slow_calls, 3,
        "stop over WS and SSE, and the lost connection"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while emulator.open_streams() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} upstream streams are still open after the browser left",
            emulator.open_streams()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let closed_by_client = emulator
        .wait_streams_ended(0, Duration::ZERO)
        .await
        .into_iter()
        .filter(|end| matches!(end, StreamEnd::ClientClosed { .. }))
        .count();
    assert_eq!(closed_by_client, slow_calls);
    let _ = writeln!(
        std::io::stderr(),
        "browser: {} scenarios passed; screenshots in {}",
        outcomes.len(),
        screenshots.display()
    );
}

/// The browser scenarios' script; the test fails, saying what to install, without Chromium,
/// node or playwright-core.
fn browser_tools() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let node = std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    let missing: Vec<&str> = [
        (Path::new(CHROMIUM).exists(), "chromium"),
        (node, "node"),
        (
            dir.join("node_modules/playwright-core").exists(),
            "playwright-core (tests/browser/node_modules)",
        ),
    ]
    .into_iter()
    .filter(|(present, _)| !present)
    .map(|(_, what)| what)
    .collect();
    assert!(
        missing.is_empty(),
        "the browser tests need {}: run scripts/install-test-tools.sh",
        missing.join(", ")
    );
    dir.join("browser-tests.mjs")
}

/// `target/ui-screenshots`, next to the `target/tmp` cargo gives integration tests.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("CARGO_TARGET_TMPDIR is inside the target directory")
        .join("ui-screenshots");
    std::fs::create_dir_all(&dir).expect("the screenshot directory is created");
    dir
}
