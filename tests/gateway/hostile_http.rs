//! A hostile HTTP client (issue 15): slow bodies without a key, slow bodies with one,
//! DNS rebinding and cross-site requests, per-key limits that hold on every route, query
//! strings and encodings the gateway does not read, the metrics behind the key, forged
//! log lines.

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{Message, client::IntoClientRequest, http::HeaderValue},
};

use crate::app::{App, LLAMA_ID, TestApp, registry};
use crate::auth::{KEY, with_keys};
use crate::client::{connect_json, expect_error, next_json};
use crate::emulator::Scenario;

const MIB: usize = 1024 * 1024;

/// `host:port` of the gateway.
fn authority(app: &App) -> &str {
    app.url.trim_start_matches("http://")
}

/// A request that announced a body it never finishes sending.
struct SlowBody {
    answer: OwnedReadHalf,
    /// Keeps the connection open (dropping the write half would end the body).
    _writer: tokio::task::JoinHandle<OwnedWriteHalf>,
}

/// Sends a request head announcing a `length`-byte body, then `sent` bytes of it (while the
/// answer is read: the gateway may answer and stop reading first), and never the rest.
async fn slow_body(app: &App, extra_headers: &str, length: usize, sent: usize) -> SlowBody {
    let stream = TcpStream::connect(authority(app)).await.unwrap();
    let (answer, mut write) = stream.into_split();
    let head = format!(
        "POST /invoke HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {length}\r\n\r\n",
        authority(app)
    );
    write.write_all(head.as_bytes()).await.unwrap();
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&vec![b' '; sent]).await;
        write
    });
    SlowBody {
        answer,
        _writer: writer,
    }
}

impl SlowBody {
    /// The status line of the answer, read within `within`.
    async fn status_line(&mut self, within: Duration) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        tokio::time::timeout(within, async {
            while !head.ends_with(b"\r\n") {
                match self.answer.read(&mut byte).await {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
        })
        .await
        .expect("an answer in time");
        String::from_utf8_lossy(&head).trim_end().to_owned()
    }
}

#[tokio::test]
async fn unauthenticated_slow_bodies_get_401_at_once_and_pin_no_memory() {
    let app = with_keys("").spawn().await;
    let before = app.rss_kib();
    let connections = (0..200).map(|_| {
        let app = &app;
        async move {
            let mut request = slow_body(app, "", MIB, MIB - 12).await;
            let status = request.status_line(Duration::from_secs(10)).await;
            (status, request)
        }
    });
    let answered = futures_util::future::join_all(connections).await;
    for (status, _) in &answered {
        assert!(status.starts_with("HTTP/1.1 401"), "{status}");
    }
    let grown_mib = app.rss_kib().saturating_sub(before) / 1024;
    println!("200 unauthenticated slow 1 MiB bodies: RSS +{grown_mib} MiB");
    assert!(
        grown_mib < 64,
        "200 unauthenticated 1 MiB bodies grew the gateway by {grown_mib} MiB"
    );
    assert!(app.emulator.requests().is_empty());
    drop(answered);
}

#[tokio::test]
async fn an_unauthenticated_malformed_body_gets_401_and_no_parse_details() {
    let app = with_keys("").spawn().await;
    let malformed = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .header("content-type", "application/json")
        .body(r#"{"model": "llama3", "promt": "#)
        .send()
        .await
        .unwrap();
    let message = expect_error(malformed, 401, "unauthorized").await;
    assert!(
        !message.contains("promt") && !message.contains("EOF"),
        "{message}"
    );
}

#[tokio::test]
async fn an_authenticated_body_that_never_ends_gets_408_after_body_read_timeout() {
    let app = with_keys("")
        .settings("body_read_timeout = \"1s\"")
        .spawn()
        .await;
    let started = Instant::now();
    let mut request = slow_body(&app, &format!("Authorization: Bearer {KEY}\r\n"), 100, 10).await;
    let status = request.status_line(Duration::from_secs(10)).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(app.emulator.requests().is_empty());
}

#[tokio::test]
async fn a_dns_rebinding_page_is_refused_on_http_and_at_the_websocket_handshake() {
    let app = TestApp::new().spawn().await;
    let port = authority(&app).rsplit_once(':').unwrap().1.to_owned();
    let evil_host = format!("evil.example:{port}");
    let evil_origin = format!("http://{evil_host}");
    let rebound = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .header("host", &evil_host)
        .header("origin", &evil_origin)
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    expect_error(rebound, 403, "forbidden").await;

    let mut handshake = app.ws_url("model=llama3").into_client_request().unwrap();
    let headers = handshake.headers_mut();
    headers.insert("host", HeaderValue::from_str(&evil_host).unwrap());
    headers.insert("origin", HeaderValue::from_str(&evil_origin).unwrap());
    match connect_async(handshake).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!(
            "expected a 403 at the handshake, got {:?}",
            other.map(|_| ())
        ),
    }
    assert!(
        app.emulator.requests().is_empty(),
        "nothing reached the model"
    );

    let own = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .header("origin", &app.url)
        .header("sec-fetch-site", "same-origin")
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), 200, "the gateway's own page is served");
}

#[tokio::test]
async fn a_cross_site_get_stream_without_origin_is_refused_and_reaches_nothing() {
    let app = TestApp::new().spawn().await;
    let get_stream = |site: &'static str| {
        reqwest::Client::new()
            .get(format!("{}/stream?model=llama3&prompt=hi", app.url))
            .header("sec-fetch-site", site)
            .send()
    };
    for site in ["cross-site", "same-site"] {
        expect_error(get_stream(site).await.unwrap(), 403, "forbidden").await;
    }
    assert!(
        app.emulator.requests().is_empty(),
        "nothing reached the model"
    );
    let page = get_stream("same-origin").await.unwrap();
    assert_eq!(page.status(), 200, "the gateway's own page may stream");
}

/// Waits until the emulator is writing `n` answers.
async fn wait_open_streams(app: &App, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.emulator.open_streams() < n {
        assert!(
            Instant::now() < deadline,
            "{n} upstream calls never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn invoke_with_key(app: &App) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .bearer_auth(KEY)
        .json(&json!({"model": "llama3", "prompt": "hi"}))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("an answer in time")
}

#[tokio::test]
async fn concurrent_streams_limits_invoke_too() {
    let app = with_keys("concurrent_streams = 1").spawn().await;
    app.emulator.script(LLAMA_ID, Scenario::stall(["…"]));
    let slow = tokio::spawn({
        let url = app.url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/invoke"))
                .bearer_auth(KEY)
                .json(&json!({"model": "llama3", "prompt": "slow"}))
                .send()
                .await
        }
    });
    wait_open_streams(&app, 1).await;
    let second = invoke_with_key(&app).await;
    assert!(second.headers().contains_key("retry-after"));
    expect_error(second, 429, "rate_limited").await;
    assert_eq!(
        app.emulator.requests().len(),
        1,
        "one upstream call at a time"
    );
    slow.abort();
}

#[tokio::test]
async fn requests_refused_for_concurrency_do_not_spend_the_requests_per_minute() {
    let app = with_keys("requests_per_minute = 2, concurrent_streams = 1")
        .spawn()
        .await;
    app.emulator.script(LLAMA_ID, Scenario::stall(["…"]));
    let held = app
        .get(&format!("/stream?model=llama3&prompt=hold&api_key={KEY}"))
        .await;
    assert_eq!(held.status(), 200);
    for _ in 0..3 {
        let refused = app
            .get(&format!("/stream?model=llama3&prompt=more&api_key={KEY}"))
            .await;
        let message = expect_error(refused, 429, "rate_limited").await;
        assert!(message.contains("in flight"), "{message}");
    }
    drop(held);
    app.emulator
        .wait_streams_ended(1, Duration::from_secs(1))
        .await;
    app.emulator.script(LLAMA_ID, Scenario::reply(["ok"]));
    assert_eq!(
        invoke_with_key(&app).await.status(),
        200,
        "the refused requests cost nothing"
    );
    let over = expect_error(invoke_with_key(&app).await, 429, "rate_limited").await;
    assert!(over.contains("requests per minute"), "{over}");
}

#[tokio::test]
async fn invoke_answers_504_when_the_first_token_is_later_than_first_token_timeout() {
    let app = TestApp::new()
        .registry(|url| {
            registry(url).replacen(
                "endpoint_url",
                "upstream = { first_token_timeout = \"1s\" }\nendpoint_url",
                1,
            )
        })
        .spawn()
        .await;
    app.emulator
        .script(LLAMA_ID, Scenario::Stall { pieces: vec![] });
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        app.post("/invoke", &json!({"model": "llama3", "prompt": "hi"})),
    )
    .await
    .expect("an answer within the first token timeout, not the total one");
    let message = expect_error(response, 504, "upstream_timeout").await;
    assert!(message.contains("first token"), "{message}");
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn get_stream_refuses_unknown_parameters_and_malformed_escapes() {
    let app = TestApp::new().spawn().await;
    for query in [
        "model=llama3&prompt=hi&max_token=5",
        "model=llama3&prompt=%zz",
        "model=llama3&prompt=%FF%FE",
        "model=llama3&prompt=hi&prompt=again",
    ] {
        let response = app.get(&format!("/stream?{query}")).await;
        expect_error(response, 400, "invalid_request").await;
    }
    assert!(
        app.emulator.requests().is_empty(),
        "nothing reached the model"
    );
    let fine = app
        .get("/stream?model=llama3&prompt=caf%C3%A9+au+lait")
        .await;
    assert_eq!(fine.status(), 200);
}

#[tokio::test]
async fn an_encoded_request_body_gets_415() {
    let app = TestApp::new().spawn().await;
    let encoded = reqwest::Client::new()
        .post(format!("{}/invoke", app.url))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(json!({"model": "llama3", "prompt": "hi"}).to_string())
        .send()
        .await
        .unwrap();
    expect_error(encoded, 415, "unsupported_media_type").await;
    assert!(
        app.emulator.requests().is_empty(),
        "nothing reached the model"
    );
}

#[tokio::test]
async fn metrics_need_a_key_when_keys_are_configured() {
    let app = with_keys("").spawn().await;
    expect_error(app.get("/metrics").await, 401, "unauthorized").await;
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", app.url))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(
        metrics
            .text()
            .await
            .unwrap()
            .contains("modelgate_requests_total")
    );
}

#[tokio::test]
async fn a_model_name_with_line_breaks_cannot_forge_a_log_line() {
    let app = TestApp::new().spawn().await;
    let mut socket = connect_json(&app, "llama3").await;
    socket
        .send(Message::Text(
            json!({"model": "nope\r\nFORGED level=INFO the admin logged in", "prompt": "hi"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let refused = next_json(&mut socket).await;
    assert_eq!(refused["error"]["code"], "unknown_model", "{refused}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !app.logs().contains("FORGED") {
        assert!(Instant::now() < deadline, "the refusal was not logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logs = app.logs();
    assert!(
        !logs
            .lines()
            .any(|line| line.trim_start().starts_with("FORGED")),
        "{logs}"
    );
}
