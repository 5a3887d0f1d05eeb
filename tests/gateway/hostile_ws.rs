//! `/ws/model` against hostile clients: prompts queued to pin memory, oversized and
//! malformed frames, handshakes while draining, duplicate keys, the key in the
//! subprotocol, silent connections and forged log lines.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::{
    connect_async,
    tungstenite::{Message, protocol::frame::coding::CloseCode},
};

use crate::app::{App, LLAMA_ID, TestApp};
use crate::client::{Socket, connect, connect_json, next_json, next_text};
use crate::emulator::Scenario;

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_CONTINUATION: u8 = 0x0;
const OPCODE_CLOSE: u8 = 0x8;
const OPCODE_PING: u8 = 0x9;

/// A WebSocket client on a bare TCP stream: it answers nothing by itself (no pong, no
/// close reply) and can send frames a well-behaved client library refuses to.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    /// Opens `/ws/model?{query}` offering `protocols`; returns the client and the handshake
    /// answer's head.
    async fn open(app: &App, query: &str, protocols: Option<&str>) -> (RawClient, String) {
        let address = app.url.trim_start_matches("http://");
        let mut stream = TcpStream::connect(address).await.unwrap();
        let protocol_header = protocols
            .map(|offered| format!("Sec-WebSocket-Protocol: {offered}\r\n"))
            .unwrap_or_default();
        let handshake = format!(
            "GET /ws/model?{query} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{protocol_header}\r\n"
        );
        stream.write_all(handshake.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("the handshake is answered"));
        }
        let head = String::from_utf8(head).unwrap();
        (RawClient { stream }, head)
    }

    async fn connect(app: &App, query: &str) -> RawClient {
        let (client, head) = RawClient::open(app, query, None).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        client
    }

    /// Sends one frame: `first_byte` is FIN, RSV and opcode as they go on the wire.
    async fn send_frame(&mut self, first_byte: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![first_byte];
        let mask_bit = if masked { 0x80 } else { 0 };
        match payload.len() {
            len @ 0..=125 => frame.push(mask_bit | len as u8),
            len @ 126..=65535 => {
                frame.push(mask_bit | 126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
            len => {
                frame.push(mask_bit | 127);
                frame.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
        } else {
            frame.extend_from_slice(payload);
        }
        self.stream.write_all(&frame).await.unwrap();
    }

    async fn send_text(&mut self, text: &str) {
        self.send_frame(0x80 | OPCODE_TEXT, text.as_bytes(), true)
            .await;
    }

    /// The next frame from the gateway: its opcode and payload.
    async fn next_frame(&mut self) -> (u8, Vec<u8>) {
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut header = [0u8; 2];
            self.stream.read_exact(&mut header).await.expect("a frame");
            let len = match header[1] & 0x7f {
                126 => u64::from(self.stream.read_u16().await.unwrap()),
                127 => self.stream.read_u64().await.unwrap(),
                len => u64::from(len),
            };
            let mut payload = vec![0u8; len as usize];
            self.stream.read_exact(&mut payload).await.unwrap();
            (header[0] & 0x0f, payload)
        })
        .await
        .expect("a frame in time")
    }

    /// Reads frames up to the gateway's close frame; returns its code and the opcodes of
    /// the frames before it.
    async fn close_code(&mut self) -> (u16, Vec<u8>) {
        let mut before = Vec::new();
        loop {
            let (opcode, payload) = self.next_frame().await;
            if opcode == OPCODE_CLOSE {
                assert!(payload.len() >= 2, "a close frame with a code");
                return (u16::from_be_bytes([payload[0], payload[1]]), before);
            }
            before.push(opcode);
        }
    }
}

/// The model writes one piece and then nothing, never ending: an answer that streams on.
fn stall() -> Scenario {
    Scenario::stall(["…"])
}

/// A JSON-mode socket whose first answer (to a stalling model) has begun: what it sends now
/// is queued.
async fn answering(app: &App) -> Socket {
    let mut socket = connect_json(app, "llama3").await;
    socket
        .send(Message::text(r#"{"prompt": "go"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await["type"], "chunk");
    socket
}

/// Reads frames until the pong that answers `ping`, which the gateway sends only after it
/// read every message sent before the ping; returns the JSON frames before it.
async fn frames_until_pong(socket: &mut Socket, ping: &str) -> Vec<Value> {
    socket
        .send(Message::Ping(ping.to_owned().into()))
        .await
        .unwrap();
    let mut frames = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), socket.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .expect("a valid frame");
        match message {
            Message::Pong(payload) if payload == ping.as_bytes() => return frames,
            Message::Text(text) => frames.push(serde_json::from_str(&text).unwrap()),
            _ => {}
        }
    }
}

#[tokio::test]
async fn prompts_sent_ahead_are_refused_beyond_the_connections_byte_budget() {
    let app = TestApp::new().scenario(LLAMA_ID, stall()).spawn().await;
    let ahead = "a".repeat(40 * 1024);

    let mut text = connect(&app, "model=llama3&streaming=1").await;
    text.send(Message::text("go")).await.unwrap();
    assert_eq!(next_text(&mut text).await, "…");
    text.send(Message::text(ahead.clone())).await.unwrap();
    text.send(Message::text(ahead.clone())).await.unwrap();
    let refusal = next_text(&mut text).await;
    assert!(
        refusal.starts_with("error: ") && refusal.contains("ws_max_queued_bytes"),
        "the second 40 KiB prompt is over the 64 KiB budget: {refusal}"
    );

    let mut json = answering(&app).await;
    let prompt = json!({ "prompt": ahead }).to_string();
    json.send(Message::text(prompt.clone())).await.unwrap();
    json.send(Message::text(prompt)).await.unwrap();
    let refusal = next_json(&mut json).await;
    assert_eq!(refusal["type"], "error");
    assert_eq!(refusal["error"]["code"], "rate_limited", "{refusal}");
    assert!(
        refusal["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ws_max_queued_bytes")
    );

    // The connection stays open and the prompt that fitted is answered in its turn.
    json.send(Message::text(r#"{"type": "cancel"}"#))
        .await
        .unwrap();
    assert_eq!(next_json(&mut json).await["error"]["code"], "cancelled");
    assert_eq!(next_json(&mut json).await["type"], "chunk");
    assert_eq!(
        app.emulator.requests().len(),
        3,
        "the refused prompts reached nothing"
    );
}

#[tokio::test]
async fn prompts_queued_on_many_connections_stay_within_the_gateway_wide_budget() {
    const CONNECTIONS: usize = 40;
    const AHEAD: usize = 15;
    const PROMPT_BYTES: usize = 512 * 1024;
    let app = TestApp::new()
        .settings("ws_max_queued_bytes = 16777216\nws_max_queued_bytes_total = 8388608")
        .spawn()
        .await;
    app.emulator.script(LLAMA_ID, stall());
    let mut sockets = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let socket = answering(&app).await;
        sockets.push(socket);
    }
    let before = app.rss_kib();

    let prompt = json!({ "prompt": "p".repeat(PROMPT_BYTES) }).to_string();
    let mut refused = 0;
    for socket in &mut sockets {
        for _ in 0..AHEAD {
            socket.send(Message::text(prompt.clone())).await.unwrap();
        }
        for frame in frames_until_pong(socket, "sent").await {
            assert_eq!(frame["error"]["code"], "upstream_unavailable", "{frame}");
            let message = frame["error"]["message"].as_str().unwrap();
            assert!(message.contains("ws_max_queued_bytes_total"), "{message}");
            refused += 1;
        }
    }
    let grown_mib = app.rss_kib().saturating_sub(before) / 1024;
    let attempted_mib = (CONNECTIONS * AHEAD * PROMPT_BYTES / (1024 * 1024)) as u64;
    let fitted = CONNECTIONS * AHEAD - refused;
    assert_eq!(fitted, 8 * 1024 * 1024 / prompt.len(), "what fits in 8 MiB");
    assert!(
        grown_mib < attempted_mib / 4,
        "the gateway grew by {grown_mib} MiB for {attempted_mib} MiB of prompts sent ahead"
    );

    // Connections that leave give their share back.
    drop(sockets);
    let mut socket = answering(&app).await;
    for _ in 0..4 {
        socket.send(Message::text(prompt.clone())).await.unwrap();
    }
    assert_eq!(
        frames_until_pong(&mut socket, "again").await,
        Vec::<Value>::new()
    );
}

#[tokio::test]
async fn a_message_far_over_the_limit_closes_with_1009_and_so_do_its_fragments() {
    let app = TestApp::new()
        .settings("ws_max_message_bytes = 65536")
        .spawn()
        .await;
    let mut socket = connect(&app, "model=llama3").await;
    socket
        .send(Message::text("x".repeat(1024 * 1024)))
        .await
        .unwrap();
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a close frame in time")
        {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.code, CloseCode::Size);

    let mut raw = RawClient::connect(&app, "model=llama3").await;
    let half = vec![b'y'; 40 * 1024];
    raw.send_frame(OPCODE_TEXT, &half, true).await;
    raw.send_frame(0x80 | OPCODE_CONTINUATION, &half, true)
        .await;
    assert_eq!(raw.close_code().await.0, 1009);
    assert!(app.emulator.requests().is_empty());
}

#[tokio::test]
async fn protocol_violations_close_with_1002_and_a_text_message_that_is_not_utf8_with_1007() {
    let app = TestApp::new().spawn().await;
    let mut unmasked = RawClient::connect(&app, "model=llama3").await;
    unmasked
        .send_frame(0x80 | OPCODE_TEXT, b"hello", false)
        .await;
    assert_eq!(
        unmasked.close_code().await.0,
        1002,
        "an unmasked client frame"
    );

    let mut reserved = RawClient::connect(&app, "model=llama3").await;
    reserved.send_frame(0x80 | 0x3, b"hello", true).await;
    assert_eq!(reserved.close_code().await.0, 1002, "a reserved opcode");

    let mut rsv = RawClient::connect(&app, "model=llama3").await;
    rsv.send_frame(0x80 | 0x40 | OPCODE_TEXT, b"hello", true)
        .await;
    assert_eq!(rsv.close_code().await.0, 1002, "a reserved bit");

    let mut not_utf8 = RawClient::connect(&app, "model=llama3").await;
    not_utf8
        .send_frame(0x80 | OPCODE_TEXT, &[b'h', 0xff, 0xfe], true)
        .await;
    assert_eq!(
        not_utf8.close_code().await.0,
        1007,
        "a text frame that is not UTF-8"
    );
    assert!(app.emulator.requests().is_empty());
}

#[tokio::test]
async fn a_websocket_opened_while_draining_gets_503_at_the_handshake() {
    let app = TestApp::new()
        .settings("shutdown_grace = \"20s\"")
        .spawn()
        .await;
    app.emulator.script(LLAMA_ID, stall());
    // An answer in flight keeps the gateway draining.
    let holder = app.get("/stream?model=llama3&prompt=hold").await;
    assert_eq!(holder.status(), 200);
    app.terminate();
    tokio::time::timeout(Duration::from_secs(10), async {
        while app.get("/healthz").await.status() != 503 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the gateway drains");
    match connect_async(app.ws_url("model=llama3")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"]["code"], "shutting_down");
        }
        Ok(_) => panic!("the handshake succeeded while draining"),
        Err(other) => panic!("expected 503 at the handshake, got {other:?}"),
    }
    drop(holder);
}

#[tokio::test]
async fn a_json_frame_with_a_repeated_key_is_refused_naming_it() {
    let app = TestApp::new().spawn().await;
    let mut socket = connect_json(&app, "llama3").await;
    for (frame, field) in [
        (r#"{"prompt": "a", "prompt": "b"}"#, "`prompt`"),
        (
            r#"{"model": "llama3", "prompt": "a", "model": "anthropic"}"#,
            "`model`",
        ),
        (
            r#"{"type": "generate", "prompt": "a", "type": "cancel"}"#,
            "`type`",
        ),
    ] {
        socket.send(Message::text(frame)).await.unwrap();
        let refusal = next_json(&mut socket).await;
        assert_eq!(refusal["error"]["code"], "invalid_request", "{frame}");
        let message = refusal["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("duplicate field") && message.contains(field),
            "{frame}: {message}"
        );
    }
    assert!(app.emulator.requests().is_empty());

    for query in ["model=llama3&streaming=maybe", "model=llama3&format=xml"] {
        match connect_async(app.ws_url(query)).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 400, "{query}");
            }
            other => panic!("{query}: expected 400, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_key_in_a_subprotocol_is_never_echoed_in_the_handshake() {
    const KEY: &str = "mg-secret-in-subprotocol-42";
    let app = TestApp::new()
        .env("MODELGATE_API_KEYS", &format!("ui:{KEY}"))
        .spawn()
        .await;
    let bearer = format!("bearer.{KEY}");

    let (_json, head) = RawClient::open(
        &app,
        "model=llama3",
        Some(&format!("modelgate.v1, {bearer}")),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: modelgate.v1\r\n"),
        "{head}"
    );
    assert!(!head.contains(KEY), "{head}");

    let (_text, head) = RawClient::open(&app, "model=llama3", Some(&bearer)).await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "the key is accepted: {head}"
    );
    assert!(!head.contains(KEY), "{head}");

    // What a browser's text-mode client with a key does instead.
    app.emulator.script(LLAMA_ID, Scenario::reply(["hi"]));
    let (mut socket, _) = connect_async(app.ws_url(&format!("model=llama3&api_key={KEY}")))
        .await
        .expect("the key as a query parameter");
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_text(&mut socket).await, "hi");
}

#[tokio::test]
async fn a_silent_connection_is_pinged_then_closed_unless_it_answers_or_an_answer_streams() {
    let app = TestApp::new()
        .settings("ws_ping_interval = \"200ms\"\nws_idle_timeout = \"700ms\"")
        .spawn()
        .await;
    app.emulator.script(
        LLAMA_ID,
        Scenario::reply((0..30).map(|i| format!("{i} ")))
            .paced(Duration::from_millis(50))
            .input_tokens(1),
    );
    // A client that answers pings (tungstenite does, as it reads) stays.
    let mut alive = connect(&app, "model=llama3").await;
    let alive_reader = tokio::spawn(async move {
        let mut pings = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(message) = tokio::time::timeout_at(until, alive.next()).await {
            match message {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("a client that answers pings is left alone, got {other:?}"),
            }
        }
        pings
    });

    let mut silent = RawClient::connect(&app, "model=llama3").await;
    let (code, before) = silent.close_code().await;
    assert_eq!(code, 1001);
    assert!(before.contains(&OPCODE_PING), "pinged first: {before:?}");

    // A client that reads an answer longer than the idle timeout, answering no ping.
    let mut streaming = RawClient::connect(&app, "model=llama3&streaming=1").await;
    streaming.send_text("count").await;
    for i in 0..30 {
        let (opcode, payload) = streaming.next_frame().await;
        assert_eq!(opcode, OPCODE_TEXT);
        assert_eq!(payload, format!("{i} ").into_bytes());
    }
    assert_eq!(streaming.close_code().await.0, 1001);

    assert!(alive_reader.await.unwrap() >= 3, "pinged while idle");
}

#[tokio::test]
async fn a_model_name_in_a_json_frame_cannot_forge_a_log_line() {
    let app = TestApp::new().spawn().await;
    let mut socket = connect_json(&app, "llama3").await;
    socket
        .send(Message::text(
            json!({"model": "x\nFORGED line \u{1b}[31mred", "prompt": "hi"}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await["error"]["code"],
        "unknown_model"
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while !app.logs().contains("FORGED") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the refusal is logged");
    let logs = app.logs();
    assert!(
        !logs.lines().any(|line| line.starts_with("FORGED")),
        "{logs}"
    );
    assert!(!logs.contains('\u{1b}'), "no raw escape sequence: {logs}");
}
