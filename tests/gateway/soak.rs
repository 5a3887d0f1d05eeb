//! A bounded soak: a few hundred concurrent SSE and WebSocket streams, some clients
//! stalling, some leaving at random points, in identical rounds. Afterwards no upstream
//! stream is left open, memory does not grow from round to round, and every well-behaved
//! client got its whole answer.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::app::{App, LLAMA_ID, TestApp, registry};
use crate::client::{connect_json, sse_events};
use crate::emulator::Scenario;

const CLIENTS: usize = 300;
/// Identical rounds of clients; RSS after the second is compared with RSS after the last.
const ROUNDS: usize = 5;
/// Growth from the second round to the last that counts as a leak (seen without one: up to
/// 8 MiB, the allocator's wandering).
const LEAK_MARGIN_KIB: u64 = 12 * 1024;
const PIECES: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Reads the whole answer.
    Reader,
    /// Reads a few pieces, then disconnects.
    Leaver(usize),
    /// Reads one piece, stops reading for a while, then disconnects. (Dropping a client that
    /// never reads is `limits::a_client_that_stops_reading_is_dropped_while_others_stream_on`;
    /// here the answers are small enough for the socket buffers, so stalls only hold
    /// connections.)
    Staller,
}

fn behaviour(index: usize) -> Behaviour {
    match index % 6 {
        0 => Behaviour::Staller,
        1 | 2 => Behaviour::Leaver(index % (PIECES - 1)),
        _ => Behaviour::Reader,
    }
}

/// Runs one client; returns the text it got when it is a reader.
async fn client(app: &App, index: usize) -> Option<String> {
    let behaviour = behaviour(index);
    let model = "llama3";
    let mut pieces = Vec::new();
    if index.is_multiple_of(2) {
        let response = app.get(&format!("/stream?model={model}&prompt=soak")).await;
        assert_eq!(response.status(), 200, "client {index}");
        let mut events = sse_events(response);
        while let Some(event) = events.next().await {
            if event.event == "done" {
                break;
            }
            assert_eq!(event.event, "chunk", "client {index}: {event:?}");
            pieces.push(event.data["text"].as_str().unwrap().to_owned());
            match behaviour {
                Behaviour::Leaver(after) if pieces.len() > after => return None,
                Behaviour::Staller => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return None;
                }
                _ => {}
            }
        }
    } else {
        let mut socket = connect_json(app, model).await;
        socket
            .send(Message::text(r#"{"prompt": "soak"}"#))
            .await
            .unwrap();
        while let Some(Ok(message)) = socket.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "done" {
                break;
            }
            assert_eq!(frame["type"], "chunk", "client {index}: {frame}");
            pieces.push(frame["text"].as_str().unwrap().to_owned());
            match behaviour {
                Behaviour::Leaver(after) if pieces.len() > after => return None,
                Behaviour::Staller => {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return None;
                }
                _ => {}
            }
        }
    }
    Some(pieces.concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_streams_with_stalls_and_departures_leave_nothing_behind() {
    let app = Arc::new(
        TestApp::new()
            .registry(|url| {
                format!(
                    "max_concurrent_upstream = 1000\n{}",
                    registry(url).replace(
                        "endpoint_url",
                        "upstream = { max_concurrent = 1000 }\nendpoint_url"
                    )
                )
            })
            .spawn()
            .await,
    );
    let words: Vec<String> = (0..PIECES).map(|i| format!("word{i} ")).collect();
    let expected = words.concat();
    app.emulator.script(
        LLAMA_ID,
        Scenario::reply(words)
            .paced(Duration::from_millis(10))
            .input_tokens(5),
    );
    for index in [3, 4] {
        assert_eq!(
            client(&app, index).await.as_deref(),
            Some(expected.as_str()),
            "warm-up"
        );
    }
    let baseline = app.rss_kib();

    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = tokio::spawn({
        let app = app.clone();
        let peak = peak.clone();
        async move {
            loop {
                peak.fetch_max(app.rss_kib(), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let mut after_rounds = Vec::new();
    for round in 1..=ROUNDS {
        let (readers, elapsed) = soak_round(&app, &expected).await;
        after_rounds.push(app.rss_kib());
        println!("soak round {round}: {CLIENTS} streams ({readers} readers) in {elapsed:.1?}");
    }
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);
    let metrics = app.metrics(None).await;
    for transport in ["sse", "ws"] {
        let gauge = format!(r#"modelgate_active_streams{{transport="{transport}"}} 0"#);
        assert!(
            metrics.contains(&gauge),
            "no {transport} stream is left counted: {metrics}"
        );
    }
    assert!(
        metrics.contains(r#"modelgate_cancellations_total{reason="client_gone"}"#),
        "departures cancelled their upstream calls: {metrics}"
    );
    let (settled, last) = (after_rounds[1], after_rounds[ROUNDS - 1]);
    println!(
        "soak: RSS baseline {baseline} KiB, peak {peak} KiB, after each round {after_rounds:?} KiB; upstream streams left open: 0"
    );
    // The allocator keeps freed pages for reuse, so RSS stays near its peak once reached and
    // wanders by several MiB from round to round. A leak grows with every round: keeping a
    // quarter of each stream's state (15 of about 60 KiB) adds 13 MiB over three rounds.
    assert!(
        last <= settled + LEAK_MARGIN_KIB,
        "RSS grew from {settled} KiB after round 2 to {last} KiB after round {ROUNDS} (rounds {after_rounds:?} KiB, baseline {baseline} KiB, peak {peak} KiB)"
    );
}

/// Runs all the clients once, checks the readers' answers and waits until no upstream
/// stream is left; returns the number of readers and the time taken.
async fn soak_round(app: &Arc<App>, expected: &str) -> (usize, Duration) {
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|index| {
            let app = app.clone();
            tokio::spawn(async move { (index, client(&app, index).await) })
        })
        .collect();
    let mut readers = 0;
    for handle in clients {
        let (index, text) = handle.await.expect("no client panicked");
        if behaviour(index) == Behaviour::Reader {
            assert_eq!(
                text.as_deref(),
                Some(expected),
                "client {index} got its whole answer"
            );
            readers += 1;
        }
    }
    let elapsed = started.elapsed();
    tokio::time::timeout(Duration::from_secs(5), async {
        while app.emulator.open_streams() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{} upstream streams left open", app.emulator.open_streams()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    (readers, elapsed)
}
