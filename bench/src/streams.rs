//! Streams through the gateway (SSE, WebSocket) and from the mock directly (eventstream):
//! time to first chunk, paced streams at N concurrent, and idle streams held open.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpStream;
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

use crate::{
    client::{Connection, connect_tcp},
    clock, converse,
    invoke::histogram,
    mock::{self, Scenario},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The mock's own eventstream, read directly: the baseline.
    Direct,
    /// `GET /stream` through the gateway.
    Sse,
    /// `/ws/model?streaming=1` (text mode) through the gateway.
    Ws,
    /// `POST /v1/chat/completions` with `stream: true` through the gateway.
    OpenAi,
    /// The mock's ConverseStream, read directly: the baseline of `SseConverse`.
    DirectConverse,
    /// `GET /stream` through the gateway, of a model with `format = "converse"`.
    SseConverse,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Direct => "direct",
            Transport::Sse => "SSE",
            Transport::Ws => "WS",
            Transport::OpenAi => "OpenAI",
            Transport::DirectConverse => "direct ConverseStream",
            Transport::SseConverse => "SSE via ConverseStream",
        }
    }
}

/// The registry name of the Converse model of `scenario` (`procs::registry`).
pub fn converse_model(scenario: Scenario) -> String {
    format!("converse-{}", scenario.name())
}

/// What a stream delivers to its client.
enum Event {
    /// A chunk, with the mock's stamp and the time the client read it.
    Chunk { stamp: u64, received: u64 },
    /// An SSE comment or a WebSocket pong: the connection is alive.
    KeepAlive,
}

/// One client connection, used for one stream after another.
pub struct StreamClient {
    transport: Transport,
    inner: Inner,
}

enum Inner {
    Http {
        connection: Connection,
        body: Option<Incoming>,
        buffer: BytesMut,
        decoder: MessageFrameDecoder,
    },
    Ws {
        socket: Box<WebSocketStream<TcpStream>>,
        remaining: u32,
    },
}

impl StreamClient {
    /// A connection for streams of `scenario` (a WebSocket names its model in its URL; an
    /// HTTP connection serves any).
    pub async fn connect(
        transport: Transport,
        addr: SocketAddr,
        scenario: Scenario,
    ) -> anyhow::Result<StreamClient> {
        let inner = match transport {
            Transport::Direct
            | Transport::Sse
            | Transport::OpenAi
            | Transport::DirectConverse
            | Transport::SseConverse => Inner::Http {
                connection: Connection::open(addr).await?,
                body: None,
                buffer: BytesMut::new(),
                decoder: MessageFrameDecoder::new(),
            },
            Transport::Ws => Inner::Ws {
                socket: Box::new(ws_connect(addr, &scenario.name()).await?),
                remaining: 0,
            },
        };
        Ok(StreamClient { transport, inner })
    }

    /// Asks for a stream of `scenario` (a WS client asks its URL's model).
    async fn start(&mut self, scenario: Scenario) -> anyhow::Result<()> {
        let transport = self.transport;
        match &mut self.inner {
            Inner::Http {
                connection, body, ..
            } => {
                let (method, path, request) = match transport {
                    Transport::Direct => (
                        "POST",
                        format!("/model/{}/invoke-with-response-stream", scenario.model_id()),
                        Bytes::from_static(br#"{"prompt":"hi","max_gen_len":512}"#),
                    ),
                    Transport::OpenAi => (
                        "POST",
                        "/v1/chat/completions".to_owned(),
                        crate::openai::stream_request(&scenario.name()),
                    ),
                    Transport::DirectConverse => (
                        "POST",
                        format!("/model/{}/converse-stream", scenario.model_id()),
                        Bytes::from_static(converse::REQUEST),
                    ),
                    Transport::SseConverse => (
                        "GET",
                        format!("/stream?model={}&prompt=hi", converse_model(scenario)),
                        Bytes::new(),
                    ),
                    _ => (
                        "GET",
                        format!("/stream?model={}&prompt=hi", scenario.name()),
                        Bytes::new(),
                    ),
                };
                let response = connection.send(method, &path, &request).await?;
                if !response.status().is_success() {
                    bail!("{path} answered {}", response.status());
                }
                *body = Some(response.into_body());
            }
            Inner::Ws { socket, remaining } => {
                *remaining = match scenario {
                    Scenario::Paced { chunks, .. } => chunks,
                    Scenario::Silent => u32::MAX,
                };
                socket.send(Message::text("hi")).await?;
            }
        }
        Ok(())
    }

    /// The next event of the current stream; `None` once it has ended.
    async fn next(&mut self) -> anyhow::Result<Option<Event>> {
        let transport = self.transport;
        match &mut self.inner {
            Inner::Http {
                body,
                buffer,
                decoder,
                ..
            } => loop {
                match parse_buffered(transport, buffer, decoder)? {
                    Some(Some(event)) => return Ok(Some(event)),
                    // `done`: read the body to its end so the connection can be reused.
                    Some(None) => {
                        if let Some(mut rest) = body.take() {
                            while rest.frame().await.transpose()?.is_some() {}
                        }
                        buffer.clear();
                        return Ok(None);
                    }
                    None => {}
                }
                let Some(current) = body.as_mut() else {
                    return Ok(None);
                };
                match current.frame().await {
                    Some(frame) => {
                        if let Ok(data) = frame?.into_data() {
                            buffer.extend_from_slice(&data);
                        }
                    }
                    None => {
                        *body = None;
                        return Ok(None);
                    }
                }
            },
            Inner::Ws { socket, remaining } => {
                if *remaining == 0 {
                    return Ok(None);
                }
                loop {
                    match socket.next().await.context("the WebSocket closed")?? {
                        Message::Text(text) => {
                            let received = clock::now_ns();
                            *remaining -= 1;
                            let stamp = text
                                .as_str()
                                .parse()
                                .with_context(|| format!("a chunk reads {text}"))?;
                            return Ok(Some(Event::Chunk { stamp, received }));
                        }
                        Message::Pong(_) => return Ok(Some(Event::KeepAlive)),
                        Message::Close(_) => bail!("the gateway closed the WebSocket"),
                        _ => {}
                    }
                }
            }
        }
    }

    async fn ping(&mut self) -> anyhow::Result<()> {
        if let Inner::Ws { socket, .. } = &mut self.inner {
            socket.send(Message::Ping(Bytes::new())).await?;
        }
        Ok(())
    }
}

async fn ws_connect(addr: SocketAddr, model: &str) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let url = format!("ws://{addr}/ws/model?model={model}&streaming=1");
    let (socket, _) = tokio_tungstenite::client_async(url, connect_tcp(addr).await?).await?;
    Ok(socket)
}

/// One complete event from the bytes read so far, if there is one. The outer `Option` is
/// "an event was parsed", the inner one "the stream goes on".
fn parse_buffered(
    transport: Transport,
    buffer: &mut BytesMut,
    decoder: &mut MessageFrameDecoder,
) -> anyhow::Result<Option<Option<Event>>> {
    let received = clock::now_ns();
    if transport == Transport::Direct {
        return match decoder.decode_frame(&mut *buffer)? {
            DecodedFrame::Complete(message) => {
                let stamp = mock::stamp_of_frame(&message).context("a chunk frame")?;
                Ok(Some(Some(Event::Chunk { stamp, received })))
            }
            DecodedFrame::Incomplete => Ok(None),
        };
    }
    if transport == Transport::DirectConverse {
        // Only `contentBlockDelta` events carry text; the others are read past.
        while let DecodedFrame::Complete(message) = decoder.decode_frame(&mut *buffer)? {
            if let Some(stamp) = converse::stamp_of_frame(&message) {
                return Ok(Some(Some(Event::Chunk { stamp, received })));
            }
        }
        return Ok(None);
    }
    let Some(end) = buffer.windows(2).position(|pair| pair == b"\n\n") else {
        return Ok(None);
    };
    let block = buffer.split_to(end + 2);
    let block = std::str::from_utf8(&block)?;
    if block.starts_with(':') {
        return Ok(Some(Some(Event::KeepAlive)));
    }
    if transport == Transport::OpenAi {
        return Ok(match crate::openai::parse_data(block)? {
            crate::openai::Data::Piece(stamp) => Some(Some(Event::Chunk { stamp, received })),
            // The role, the finish reason: not pieces of the answer; the next event may
            // already be in the buffer.
            crate::openai::Data::Other => return parse_buffered(transport, buffer, decoder),
            crate::openai::Data::Done => Some(None),
        });
    }
    let field = |name: &str| {
        block
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
    };
    match field("event:") {
        Some("chunk") => {
            let data: serde_json::Value = serde_json::from_str(field("data:").unwrap_or("{}"))?;
            let stamp = data["text"]
                .as_str()
                .and_then(|text| text.parse().ok())
                .with_context(|| format!("a chunk reads {data}"))?;
            Ok(Some(Some(Event::Chunk { stamp, received })))
        }
        Some("done") => Ok(Some(None)),
        _ => bail!("the stream failed: {block}"),
    }
}

/// Runs one whole stream, calling `on_chunk(stamp, received)` for each chunk; returns the
/// number of chunks.
async fn run_stream(
    client: &mut StreamClient,
    scenario: Scenario,
    mut on_chunk: impl FnMut(u64, u64),
) -> anyhow::Result<u32> {
    client.start(scenario).await?;
    let mut chunks = 0;
    while let Some(event) = client.next().await? {
        if let Event::Chunk { stamp, received } = event {
            on_chunk(stamp, received);
            chunks += 1;
        }
    }
    Ok(chunks)
}

/// Time to first chunk, one stream at a time: from sending the request to reading the
/// first chunk, nanoseconds.
pub async fn first_chunk(
    transport: Transport,
    addr: SocketAddr,
    count: usize,
) -> anyhow::Result<Histogram<u64>> {
    let scenario = Scenario::paced(1, 0);
    let mut client = StreamClient::connect(transport, addr, scenario).await?;
    let mut latencies = histogram();
    for round in 0..count + count / 10 {
        let sent = clock::now_ns();
        let mut first = None;
        run_stream(&mut client, scenario, |_, received| {
            first.get_or_insert(received);
        })
        .await?;
        if round >= count / 10 {
            latencies.saturating_record(first.context("a chunk")? - sent);
        }
    }
    Ok(latencies)
}

pub struct Paced {
    /// Per-chunk delay (mock's write to client's read) of every chunk but the first, ns.
    pub delays: Histogram<u64>,
    /// Chunks read during the steady window, when every stream is under way.
    pub chunks_in_window: u64,
    pub window: Duration,
    /// Gateway CPU seconds during the window.
    pub cpu: f64,
    /// Streams that did not deliver all their chunks.
    pub failed: usize,
}

pub const PACED: Scenario = Scenario::Paced {
    chunks: 64,
    pace: Duration::from_millis(20),
};

/// `n` concurrent streams of 64 chunks, 20 ms apart, their starts spread evenly over a
/// ramp (stream starts are not what this measures). The connections are opened and used
/// once beforehand, so that the gateway's upstream pool is warm.
pub async fn paced(
    transport: Transport,
    addr: SocketAddr,
    n: usize,
    cpu_seconds: impl Fn() -> f64,
) -> anyhow::Result<Paced> {
    let clients: Vec<StreamClient> = stream::iter(0..n)
        .map(|_| StreamClient::connect(transport, addr, PACED))
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    let ramp = Duration::from_micros(150 * n as u64).max(Duration::from_millis(200));
    let warm = Scenario::paced(2, 0);
    let clients = spread(clients, ramp, move |mut client| async move {
        // WS clients' model is the paced one; a 64-chunk warm-up would be slow, so they
        // warm up with a ping instead (their upstream pool is shared with SSE's).
        if transport != Transport::Ws {
            run_stream(&mut client, warm, |_, _| {}).await?;
        }
        anyhow::Ok(client)
    })
    .await
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;

    let (pace, chunks) = match PACED {
        Scenario::Paced { pace, chunks } => (pace, chunks),
        Scenario::Silent => unreachable!(),
    };
    let t0 = clock::now_ns() + 100_000_000;
    let window_start = t0 + ramp.as_nanos() as u64 + 50_000_000;
    let window_end = t0 + (pace * (chunks - 1)).as_nanos() as u64 - 10_000_000;
    let in_window = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, mut client)| {
            let start = t0 + ramp.as_nanos() as u64 * index as u64 / n as u64;
            let in_window = in_window.clone();
            tokio::spawn(async move {
                sleep_until_ns(start).await;
                let mut delays = Vec::with_capacity(chunks as usize);
                let mut counted = 0;
                let received_all = run_stream(&mut client, PACED, |stamp, received| {
                    delays.push(received.saturating_sub(stamp));
                    if (window_start..window_end).contains(&received) {
                        counted += 1;
                    }
                })
                .await
                .is_ok_and(|count| count == chunks);
                in_window.fetch_add(counted, Ordering::Relaxed);
                (delays, received_all)
            })
        })
        .collect();
    sleep_until_ns(window_start).await;
    let cpu_before = cpu_seconds();
    sleep_until_ns(window_end).await;
    let cpu = cpu_seconds() - cpu_before;
    let mut result = Paced {
        delays: histogram(),
        chunks_in_window: 0,
        window: Duration::from_nanos(window_end - window_start),
        cpu,
        failed: 0,
    };
    for task in tasks {
        let (delays, received_all) = task.await?;
        for delay in delays.iter().skip(1) {
            result.delays.saturating_record(*delay);
        }
        if !received_all {
            result.failed += 1;
        }
    }
    result.chunks_in_window = in_window.load(Ordering::Relaxed);
    Ok(result)
}

pub struct Idle {
    pub open: usize,
    /// Keep-alives (SSE comments; WS pongs to the clients' pings) read during the window.
    pub keep_alives: u64,
    pub rss_baseline: u64,
    pub rss_held: u64,
    /// Gateway CPU seconds per second during the window.
    pub cpu_share: f64,
}

/// Opens `n` streams of the silent model (one chunk, then nothing), holds them for 15 s (an
/// SSE keep-alive period) and reads the gateway's memory and CPU meanwhile. WS clients
/// each send one ping during the window.
pub async fn idle(
    transport: Transport,
    gateway: &crate::procs::Process,
    n: usize,
) -> anyhow::Result<Idle> {
    const HOLD: Duration = Duration::from_secs(15);
    let addr = gateway.addr;
    // Warm up the gateway a little, then take its resting memory.
    let mut warm = StreamClient::connect(transport, addr, Scenario::paced(2, 0)).await?;
    for _ in 0..20 {
        run_stream(&mut warm, Scenario::paced(2, 0), |_, _| {}).await?;
    }
    drop(warm);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_baseline = gateway.rss_bytes();

    let keep_alives = Arc::new(AtomicU64::new(0));
    // The hold window, (start, end) in ns, set once every stream is open.
    let (set_window, window) = tokio::sync::watch::channel(None::<(u64, u64)>);
    let holders: Vec<_> = stream::iter(0..n)
        .map(|index| async move {
            let mut client = StreamClient::connect(transport, addr, Scenario::Silent).await?;
            client.start(Scenario::Silent).await?;
            match client.next().await? {
                Some(Event::Chunk { .. }) => anyhow::Ok((index, client)),
                _ => bail!("the silent stream did not send its first chunk"),
            }
        })
        .buffer_unordered(100)
        .map(|opened| {
            let (keep_alives, mut window) = (keep_alives.clone(), window.clone());
            tokio::spawn(async move {
                let (index, mut client) = opened?;
                let (start, end) = window
                    .wait_for(Option::is_some)
                    .await?
                    .expect("waited for a window");
                let ping_at = start + HOLD.as_nanos() as u64 * index as u64 / n as u64;
                let mut pinged = transport != Transport::Ws;
                loop {
                    let wake = if pinged { end } else { ping_at };
                    tokio::select! {
                        event = client.next() => match event? {
                            Some(Event::KeepAlive) => {
                                if (start..end).contains(&clock::now_ns()) {
                                    keep_alives.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(Event::Chunk { .. }) => bail!("the silent model spoke"),
                            None => bail!("a held stream ended"),
                        },
                        _ = sleep_until_ns(wake) => {
                            if pinged {
                                return anyhow::Ok(client);
                            }
                            client.ping().await?;
                            pinged = true;
                        }
                    }
                }
            })
        })
        .collect::<Vec<_>>()
        .await;
    let start = clock::now_ns() + 1_000_000_000;
    let end = start + HOLD.as_nanos() as u64;
    set_window.send_replace(Some((start, end)));
    sleep_until_ns(start).await;
    let cpu_before = gateway.cpu_seconds();
    sleep_until_ns(end).await;
    let cpu_share = (gateway.cpu_seconds() - cpu_before) / HOLD.as_secs_f64();
    let rss_held = gateway.rss_bytes();
    let mut failures = 0;
    let mut clients = Vec::with_capacity(n);
    for holder in holders {
        match holder.await? {
            Ok(client) => clients.push(client),
            Err(_) => failures += 1,
        }
    }
    if failures > 0 {
        eprintln!(
            "  {failures} of {n} idle {} streams failed",
            transport.name()
        );
    }
    let open = clients.len();
    drop(clients);
    Ok(Idle {
        open,
        keep_alives: keep_alives.load(Ordering::Relaxed),
        rss_baseline,
        rss_held,
        cpu_share,
    })
}

/// Runs `work` on each client, the starts spread evenly over `ramp`, all at once.
async fn spread<F, T>(
    clients: Vec<StreamClient>,
    ramp: Duration,
    work: impl Fn(StreamClient) -> F,
) -> Vec<T>
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let n = clients.len().max(1) as u64;
    let t0 = clock::now_ns();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(index, client)| {
            let start = t0 + ramp.as_nanos() as u64 * index as u64 / n;
            let job = work(client);
            tokio::spawn(async move {
                sleep_until_ns(start).await;
                job.await
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("a bench task does not panic"));
    }
    results
}

async fn sleep_until_ns(at: u64) {
    let now = clock::now_ns();
    if at > now {
        tokio::time::sleep(Duration::from_nanos(at - now)).await;
    }
}

/// `count` streams of `scenario`, one after the other on one connection.
pub async fn run_many(
    transport: Transport,
    addr: SocketAddr,
    scenario: Scenario,
    count: usize,
) -> anyhow::Result<()> {
    let mut client = StreamClient::connect(transport, addr, scenario).await?;
    for _ in 0..count {
        run_stream(&mut client, scenario, |_, _| {}).await?;
    }
    Ok(())
}
