//! Hostile clients at the connection level, without a key: half-sent heads, idle sockets by
//! the hundred, descriptor exhaustion, pipelined bytes left behind, HTTP/2 stream floods, and
//! an operator who signals twice.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::app::{App, LLAMA_ID, TestApp};
use crate::emulator::Scenario;

fn address(app: &App) -> String {
    app.url.trim_start_matches("http://").to_owned()
}

/// Opens `count` connections that each send `bytes` and then nothing more.
async fn open_connections(app: &App, count: usize, bytes: &[u8]) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let Ok(mut socket) = TcpStream::connect(address(app)).await else {
            break;
        };
        if socket.write_all(bytes).await.is_err() {
            break;
        }
        sockets.push(socket);
    }
    sockets
}

/// Whether the gateway closes `socket` within `within` (reads up to the end).
async fn closed_within(socket: &mut TcpStream, within: Duration) -> bool {
    let mut buffer = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match socket.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn stall_llama(app: &App) {
    app.emulator.script(LLAMA_ID, Scenario::stall(["…"]));
}

const HALF_A_HEAD: &[u8] =
    b"POST /invoke HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n";

#[tokio::test]
async fn half_sent_request_heads_are_closed_after_the_header_read_timeout() {
    let app = TestApp::new()
        .settings("header_read_timeout = \"1s\"")
        .spawn()
        .await;
    let mut attackers = open_connections(&app, 200, HALF_A_HEAD).await;
    assert_eq!(attackers.len(), 200);
    for socket in &mut attackers {
        assert!(
            closed_within(socket, Duration::from_secs(5)).await,
            "a half-sent head was kept open"
        );
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let app = TestApp::new()
        .settings("header_read_timeout = \"1s\"")
        .spawn()
        .await;
    let mut silent = TcpStream::connect(address(&app)).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
    let app = TestApp::new()
        .settings("keep_alive_timeout = \"1s\"")
        .spawn()
        .await;
    let mut socket = TcpStream::connect(address(&app)).await.unwrap();
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 1024];
    let read = socket.read(&mut buffer).await.unwrap();
    assert!(
        buffer[..read].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buffer[..read])
    );
    assert!(closed_within(&mut socket, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn answers_that_take_longer_than_the_idle_timeouts_are_not_cut() {
    let app = TestApp::new().settings("header_read_timeout = \"500ms\"\nkeep_alive_timeout = \"500ms\"\nsse_keep_alive = \"10s\"").spawn()
    .await;
    stall_llama(&app);
    let stream = app.get("/stream?model=llama3&prompt=hold").await;
    assert_eq!(stream.status(), 200);
    let invoke = tokio::spawn({
        let url = app.url.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{url}/invoke"))
                .json(&serde_json::json!({"model": "llama3", "prompt": "hold"}))
                .send()
                .await
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.emulator.open_streams(), 2, "both answers still running");
    assert!(!invoke.is_finished());
}

#[tokio::test]
async fn at_max_connections_idle_sockets_make_room_for_real_requests() {
    let app = TestApp::new()
        .settings("max_connections = 20")
        .spawn()
        .await;
    let attackers = open_connections(&app, 100, b"").await;
    let checks = attackers.into_iter().map(|mut socket| {
        tokio::spawn(async move { closed_within(&mut socket, Duration::from_secs(2)).await })
    });
    let mut closed = 0;
    for check in checks.collect::<Vec<_>>() {
        closed += usize::from(check.await.unwrap());
    }
    assert_eq!(
        closed,
        80,
        "the gateway holds {} idle sockets",
        100 - closed
    );
    let answer = app
        .post(
            "/invoke",
            &serde_json::json!({"model": "llama3", "prompt": "hi"}),
        )
        .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn with_every_connection_busy_healthz_still_answers_and_the_rest_get_503() {
    let app = TestApp::new().settings("max_connections = 3").spawn().await;
    stall_llama(&app);
    let mut holders = Vec::new();
    for _ in 0..3 {
        let held = app.get("/stream?model=llama3&prompt=hold").await;
        assert_eq!(held.status(), 200);
        holders.push(held);
    }
    assert_eq!(app.get("/healthz").await.status(), 200);
    let refused = app.get("/models").await;
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    drop(holders);
    app.emulator
        .wait_streams_ended(3, Duration::from_secs(5))
        .await;
    // The freed connections are noticed as their sockets close.
    let mut status = 0;
    for _ in 0..50 {
        status = app.get("/models").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "a connection slot is free again");
}

#[tokio::test]
async fn descriptor_exhaustion_neither_spins_nor_locks_out_new_clients() {
    // A cap above what the descriptors allow, as a misconfigured host would have.
    let app = TestApp::new()
        .settings("max_connections = 10000")
        .nofile(128)
        .spawn()
        .await;
    let attackers = open_connections(&app, 300, b"").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = app.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = app.cpu_time() - before;
    assert!(
        spent < Duration::from_millis(500),
        "the gateway used {spent:?} of CPU in 2 s while out of descriptors"
    );
    let health = tokio::time::timeout(Duration::from_secs(10), app.get("/healthz"))
        .await
        .expect("/healthz answers while the attackers hold their sockets");
    assert_eq!(health.status(), 200);
    let warnings = app.logs().matches("out of file descriptors").count();
    assert_eq!(warnings, 1, "{}", app.logs());
    drop(attackers);
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn the_descriptor_limit_sets_the_default_connection_cap() {
    let app = TestApp::new().nofile(256).spawn().await;
    let _attackers = open_connections(&app, 400, b"").await;
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        app.post(
            "/invoke",
            &serde_json::json!({"model": "llama3", "prompt": "hi"}),
        ),
    )
    .await
    .expect("the gateway answers");
    assert_eq!(answer.status(), 200);
    assert!(
        app.logs().contains("max_connections=96"),
        "(256 − 64) / 2: {}",
        app.logs()
    );
}

/// Sends `request` with the start of a second one pipelined behind it, and once its upstream
/// call runs, the rest of the second, which the gateway has yet to read (hyper reads no
/// further while it holds unparsed bytes); then leaves (a FIN: everything the gateway sent
/// was read).
async fn leave_with_pipelined_bytes(app: &App, request: &str) {
    stall_llama(app);
    let mut socket = TcpStream::connect(address(app)).await.unwrap();
    let pipelined = format!("{request}GET /healthz HTTP/1.1\r\n");
    socket.write_all(pipelined.as_bytes()).await.unwrap();
    for _ in 0..200 {
        if app.emulator.open_streams() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(app.emulator.open_streams(), 1, "the upstream call started");
    let mut sent = [0u8; 4096];
    while let Ok(Ok(read)) =
        tokio::time::timeout(Duration::from_millis(300), socket.read(&mut sent)).await
    {
        assert!(read > 0, "the gateway closed the connection");
    }
    socket.write_all(b"Host: gw\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(socket);
    app.assert_upstream_closed_within_a_second().await;
}

#[tokio::test]
async fn a_stream_client_that_leaves_with_unread_pipelined_bytes_stops_the_upstream() {
    let app = TestApp::new().spawn().await;
    leave_with_pipelined_bytes(
        &app,
        "GET /stream?model=llama3&prompt=hi HTTP/1.1\r\nHost: gw\r\n\r\n",
    )
    .await;
}

#[tokio::test]
async fn an_invoke_client_that_leaves_with_unread_pipelined_bytes_stops_the_upstream() {
    let app = TestApp::new().spawn().await;
    let body = r#"{"model":"llama3","prompt":"hi"}"#;
    leave_with_pipelined_bytes(
        &app,
        &format!(
            "POST /invoke HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
}

/// Sends `request` over a new HTTP/2 (prior knowledge) connection; the status, and the
/// connection's cap on concurrent streams as the gateway's SETTINGS gave it.
async fn over_http2(app: &App, request: http::Request<()>) -> (u16, usize) {
    let tcp = TcpStream::connect(address(app)).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    let answer = async {
        let mut client = client.ready().await.unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        response.await.unwrap()
    };
    let response = tokio::select! {
        response = answer => response,
        _ = &mut connection => panic!("the HTTP/2 connection ended"),
    };
    (
        response.status().as_u16(),
        connection.max_concurrent_send_streams(),
    )
}

#[tokio::test]
async fn http2_connections_advertise_a_cap_on_concurrent_streams() {
    let app = TestApp::new()
        .settings("http2_max_concurrent_streams = 32")
        .spawn()
        .await;
    let request = http::Request::get(format!("{}/healthz", app.url))
        .body(())
        .unwrap();
    assert_eq!(over_http2(&app, request).await, (200, 32));
}

#[tokio::test]
async fn over_http2_the_origin_check_reads_the_authority() {
    let app = TestApp::new().spawn().await;
    let models = |authority: &str| {
        http::Request::get(format!("http://{authority}/models"))
            .header("origin", format!("http://{authority}"))
            .header("sec-fetch-site", "same-origin")
            .body(())
            .unwrap()
    };
    let own = address(&app);
    assert_eq!(over_http2(&app, models(&own)).await.0, 200);
    let port = own.rsplit_once(':').unwrap().1;
    let rebound = format!("evil.example:{port}");
    assert_eq!(over_http2(&app, models(&rebound)).await.0, 403);
}

#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let mut app = TestApp::new().spawn().await;
    stall_llama(&app);
    let held = app.get("/stream?model=llama3&prompt=hold").await;
    assert_eq!(held.status(), 200);
    app.terminate();
    for _ in 0..100 {
        if app.get("/healthz").await.status() == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.terminate();
    assert_eq!(app.exit_code(Duration::from_secs(3)).await, Some(1));
}
