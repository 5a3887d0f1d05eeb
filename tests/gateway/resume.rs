//! Resumable streams (`resume_window`) on one gateway: a client that lost its connection
//! comes back with `Last-Event-ID` (SSE) or a `resume` frame (WebSocket JSON mode) and gets
//! every event it missed, then the rest, exactly once and in order — never a new answer.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::app::{LLAMA_ID, TestApp};
use crate::client::{Sse, connect_json, expect_error, next_json};
use crate::emulator::{Scenario, StreamEnd};

pub const KEY_A: &str = "mg-resume-team-a-0123456789";
const KEY_B: &str = "mg-resume-team-b-0123456789";
pub const STREAM: &str = "/stream?model=llama3&prompt=count";

/// Twenty pieces, `pace` apart: `p1` … `p20`.
pub fn counting(pace: Duration) -> Scenario {
    Scenario::reply((1..=20).map(|n| format!("p{n}"))).paced(pace)
}

/// The text of `p1` … `p20` and the `done` that ends them, as a client must see them.
pub fn every_event() -> Vec<(String, Value)> {
    (1..=20)
        .map(|n| ("chunk".to_owned(), json!({"type": "chunk", "text": format!("p{n}")})))
        .chain([(
            "done".to_owned(),
            json!({"type": "done", "stop_reason": "end_turn", "usage": {"input_tokens": 7, "output_tokens": 20}}),
        )])
        .collect()
}

/// A resumable gateway (`resume_window` and more `settings`) with keys A and B.
pub fn resumable(settings: &str) -> TestApp<'static> {
    TestApp::new()
        .settings(settings)
        .api_key("team-a", KEY_A, "")
        .api_key("team-b", KEY_B, "")
}

/// One SSE event with its `id:`.
#[derive(Debug, Clone, PartialEq)]
pub struct Numbered {
    pub id: String,
    pub sse: Sse,
}

/// The events of an SSE response with their ids.
pub fn numbered_events(response: reqwest::Response) -> impl Stream<Item = Numbered> + Unpin {
    response
        .bytes_stream()
        .eventsource()
        .map(|event| {
            let event = event.expect("a well-formed event stream");
            Numbered {
                id: event.id,
                sse: Sse {
                    data: serde_json::from_str(&event.data).expect("event data is JSON"),
                    event: event.event,
                },
            }
        })
        .boxed()
}

/// `GET` `path` with `key`, and `Last-Event-ID` when given.
pub async fn get_as(app_url: &str, path: &str, key: &str, last: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(format!("{app_url}{path}"))
        .bearer_auth(key);
    if let Some(last) = last {
        request = request.header("last-event-id", last);
    }
    request.send().await.expect("the gateway answers")
}

/// Reads `count` events, or all that come until the stream ends when `count` is `None`.
pub async fn read(
    events: &mut (impl Stream<Item = Numbered> + Unpin),
    count: Option<usize>,
) -> Vec<Numbered> {
    let reading = async {
        let mut read = Vec::new();
        while count.is_none_or(|count| read.len() < count) {
            match events.next().await {
                Some(event) => read.push(event),
                None => break,
            }
        }
        read
    };
    tokio::time::timeout(Duration::from_secs(20), reading)
        .await
        .expect("the events come")
}

/// Asserts that `events` are every event once, in order, numbered 1, 2, … in one stream.
pub fn assert_every_event_once_in_order(events: &[Numbered], stream_id: &str) {
    let seen: Vec<(String, Value)> = events
        .iter()
        .map(|event| (event.sse.event.clone(), event.sse.data.clone()))
        .collect();
    assert_eq!(seen, every_event());
    let ids: Vec<&str> = events.iter().map(|event| event.id.as_str()).collect();
    let expected: Vec<String> = (1..=21).map(|n| format!("{stream_id}:{n}")).collect();
    assert_eq!(ids, expected);
}

pub fn stream_id_of(response: &reqwest::Response) -> String {
    response.headers()["x-stream-id"]
        .to_str()
        .expect("an ASCII stream id")
        .to_owned()
}

#[tokio::test]
async fn a_dropped_sse_client_resumes_with_last_event_id_and_gets_every_event_once_in_order() {
    let app = resumable(r#"resume_window = "30s""#)
        .scenario(LLAMA_ID, counting(Duration::from_millis(50)))
        .spawn()
        .await;
    let response = get_as(&app.url, STREAM, KEY_A, None).await;
    assert_eq!(response.status(), 200);
    let stream_id = stream_id_of(&response);
    let mut events = numbered_events(response);
    let mut seen = read(&mut events, Some(5)).await;
    drop(events);
    // The model goes on while nobody listens; the client comes back as EventSource does.
    let last = seen.last().unwrap().id.clone();
    let resumed = get_as(&app.url, STREAM, KEY_A, Some(&last)).await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(stream_id_of(&resumed), stream_id);
    seen.extend(read(&mut numbered_events(resumed), None).await);
    assert_every_event_once_in_order(&seen, &stream_id);
    assert_eq!(app.emulator.requests().len(), 1, "no second generation");
    let ends = app
        .emulator
        .wait_streams_ended(1, Duration::from_secs(5))
        .await;
    assert_eq!(ends, [StreamEnd::Completed]);
    let metrics = app.metrics(Some(KEY_A)).await;
    assert!(
        metrics.contains(r#"modelgate_resumes_total{outcome="resumed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("modelgate_resume_bytes_held "),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_resume_of_a_finished_stream_gets_what_was_missed_or_204_when_nothing_was() {
    let app = resumable(r#"resume_window = "30s""#)
        .scenario(LLAMA_ID, counting(Duration::from_millis(1)))
        .spawn()
        .await;
    let response = get_as(&app.url, STREAM, KEY_A, None).await;
    let stream_id = stream_id_of(&response);
    let all = read(&mut numbered_events(response), None).await;
    assert_every_event_once_in_order(&all, &stream_id);
    let from_ten = get_as(&app.url, STREAM, KEY_A, Some(&all[9].id)).await;
    assert_eq!(read(&mut numbered_events(from_ten), None).await, all[10..]);
    let after_done = get_as(&app.url, STREAM, KEY_A, Some(&all[20].id)).await;
    assert_eq!(after_done.status(), 204, "EventSource stops reconnecting");
    assert_eq!(app.emulator.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_without_a_client_goes_on_for_the_window_then_is_cancelled_and_cannot_be_resumed()
{
    let app = resumable(r#"resume_window = "1s""#)
        .scenario(LLAMA_ID, Scenario::stall(["thinking..."]))
        .spawn()
        .await;
    let response = get_as(&app.url, STREAM, KEY_A, None).await;
    let mut events = numbered_events(response);
    let first = read(&mut events, Some(1)).await.remove(0);
    drop(events);
    // Cancelled once the window is over, not when the client left; the bound is generous.
    let ends = app
        .emulator
        .wait_streams_ended(1, Duration::from_secs(5))
        .await;
    assert!(
        matches!(ends[0], StreamEnd::ClientClosed { .. }),
        "{ends:?}"
    );
    let metrics = app.metrics(Some(KEY_A)).await;
    assert!(
        metrics.contains(r#"modelgate_cancellations_total{reason="client_gone"} 1"#),
        "{metrics}"
    );
    let late = get_as(&app.url, STREAM, KEY_A, Some(&first.id)).await;
    let message = expect_error(late, 410, "resume_expired").await;
    assert!(message.contains("resume_window"), "{message}");
}

#[tokio::test]
async fn a_post_stream_resumes_with_the_same_body_and_last_event_id() {
    let app = resumable(r#"resume_window = "30s""#)
        .scenario(LLAMA_ID, counting(Duration::from_millis(20)))
        .spawn()
        .await;
    let post = |last: Option<String>| {
        let mut request = reqwest::Client::new()
            .post(format!("{}/stream", app.url))
            .bearer_auth(KEY_A)
            .json(&json!({"model": "llama3", "messages": [{"role": "user", "content": "count"}]}));
        if let Some(last) = last {
            request = request.header("last-event-id", last);
        }
        request.send()
    };
    let response = post(None).await.unwrap();
    let stream_id = stream_id_of(&response);
    let mut events = numbered_events(response);
    let mut seen = read(&mut events, Some(8)).await;
    drop(events);
    let resumed = post(Some(seen[7].id.clone())).await.unwrap();
    seen.extend(read(&mut numbered_events(resumed), None).await);
    assert_every_event_once_in_order(&seen, &stream_id);
    assert_eq!(app.emulator.requests().len(), 1, "no second generation");
}

#[tokio::test]
async fn a_client_that_stops_reading_leaves_the_stream_which_is_then_cancelled_after_the_window() {
    let app = resumable("resume_window = \"1s\"\nslow_client_timeout = \"500ms\"")
        .spawn()
        .await;
    // 600 pieces of 32 KiB over 12 s: the socket buffers and the queue fill within a few
    // seconds for a client that reads nothing.
    let big = "y".repeat(32 * 1024);
    app.emulator.script(
        LLAMA_ID,
        Scenario::reply(vec![big; 600]).paced(Duration::from_millis(20)),
    );
    let stalled = get_as(&app.url, STREAM, KEY_A, None).await;
    assert_eq!(stalled.status(), 200);
    let ends = app
        .emulator
        .wait_streams_ended(1, Duration::from_secs(10))
        .await;
    assert!(
        matches!(ends[0], StreamEnd::ClientClosed { .. }),
        "the stalled client's stream was cancelled before the model finished: {ends:?}"
    );
    drop(stalled);
}

#[tokio::test]
async fn only_the_key_that_started_a_stream_can_resume_it() {
    let app = resumable(r#"resume_window = "30s""#)
        .scenario(LLAMA_ID, counting(Duration::from_millis(1)))
        .spawn()
        .await;
    let response = get_as(&app.url, STREAM, KEY_A, None).await;
    let all = read(&mut numbered_events(response), None).await;
    let other = get_as(&app.url, STREAM, KEY_B, Some(&all[3].id)).await;
    expect_error(other, 404, "unknown_stream").await;
    let owner = get_as(&app.url, STREAM, KEY_A, Some(&all[3].id)).await;
    assert_eq!(read(&mut numbered_events(owner), None).await, all[4..]);
    assert_eq!(app.emulator.requests().len(), 1);
}

#[tokio::test]
async fn events_dropped_to_stay_under_a_cap_answer_410_naming_the_cap() {
    // About six events fit.
    let app = resumable("resume_window = \"30s\"\nresume_max_bytes_per_stream = 1000")
        .scenario(LLAMA_ID, counting(Duration::from_millis(5)))
        .spawn()
        .await;
    let response = get_as(&app.url, STREAM, KEY_A, None).await;
    let stream_id = stream_id_of(&response);
    let all = read(&mut numbered_events(response), None).await;
    assert_every_event_once_in_order(&all, &stream_id);
    let early = get_as(&app.url, STREAM, KEY_A, Some(&all[1].id)).await;
    let message = expect_error(early, 410, "resume_expired").await;
    assert!(message.contains("resume_max_bytes_per_stream"), "{message}");
    let recent = get_as(&app.url, STREAM, KEY_A, Some(&all[17].id)).await;
    assert_eq!(read(&mut numbered_events(recent), None).await, all[18..]);
}

#[tokio::test]
async fn without_resume_window_events_are_numbered_but_last_event_id_starts_nothing() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, counting(Duration::from_millis(1)))
        .spawn()
        .await;
    let response = app.get(STREAM).await;
    let stream_id = stream_id_of(&response);
    let all = read(&mut numbered_events(response), None).await;
    assert_every_event_once_in_order(&all, &stream_id);
    let again = reqwest::Client::new()
        .get(format!("{}{STREAM}", app.url))
        .header("last-event-id", &all[4].id)
        .send()
        .await
        .unwrap();
    let message = expect_error(again, 410, "resume_expired").await;
    assert!(message.contains("resume_window = 0"), "{message}");
    let garbage = reqwest::Client::new()
        .get(format!("{}{STREAM}", app.url))
        .header("last-event-id", "not-ours")
        .send()
        .await
        .unwrap();
    expect_error(garbage, 400, "invalid_request").await;
    assert_eq!(app.emulator.requests().len(), 1, "no duplicate generation");
}

/// Every event as a numbered WebSocket JSON frame of `stream_id`.
pub fn every_frame(stream_id: &str) -> Vec<Value> {
    every_event()
        .into_iter()
        .zip(1..)
        .map(|((_, mut data), seq)| {
            data["stream_id"] = json!(stream_id);
            data["seq"] = json!(seq);
            data
        })
        .collect()
}

/// A JSON-mode socket to the gateway (or balancer) at `url`, with `key`.
pub async fn connect_json_as(url: &str, key: &str) -> crate::client::Socket {
    connect_json_answered(url, key).await.0
}

/// [`connect_json_as`], with the handshake's answer.
pub async fn connect_json_answered(
    url: &str,
    key: &str,
) -> (
    crate::client::Socket,
    tokio_tungstenite::tungstenite::handshake::client::Response,
) {
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};
    let mut request = format!(
        "{}/ws/model?model=llama3",
        url.replacen("http://", "ws://", 1)
    )
    .into_client_request()
    .unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("modelgate.v1"),
    );
    request.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {key}")).unwrap(),
    );
    tokio_tungstenite::connect_async(request)
        .await
        .expect("the handshake succeeds")
}

/// Frames until the `done` one, `done` included.
pub async fn frames_until_done(socket: &mut crate::client::Socket) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let frame = next_json(socket).await;
        let done = frame["type"] != "chunk";
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

#[tokio::test]
async fn a_websocket_json_client_resumes_with_a_resume_frame_on_a_new_connection() {
    let app = resumable(r#"resume_window = "30s""#)
        .scenario(LLAMA_ID, counting(Duration::from_millis(50)))
        .spawn()
        .await;
    let mut socket = connect_json_as(&app.url, KEY_A).await;
    socket
        .send(Message::text(json!({"prompt": "count"}).to_string()))
        .await
        .unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_json(&mut socket).await);
    }
    drop(socket);
    let stream_id = seen[0]["stream_id"].as_str().unwrap().to_owned();
    let after = seen[4]["seq"].as_u64().unwrap();
    let mut other = connect_json_as(&app.url, KEY_B).await;
    other
        .send(Message::text(
            json!({"type": "resume", "stream_id": stream_id, "after": after}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut other).await["error"]["code"],
        "unknown_stream"
    );
    let mut socket = connect_json_as(&app.url, KEY_A).await;
    socket
        .send(Message::text(
            json!({"type": "resume", "stream_id": stream_id, "after": after}).to_string(),
        ))
        .await
        .unwrap();
    seen.extend(frames_until_done(&mut socket).await);
    assert_eq!(seen, every_frame(&stream_id));
    assert_eq!(app.emulator.requests().len(), 1, "no second generation");
    // The connection serves the next prompt as usual.
    socket
        .send(Message::text(json!({"prompt": "again"}).to_string()))
        .await
        .unwrap();
    assert_eq!(frames_until_done(&mut socket).await.len(), 21);
}

#[tokio::test]
async fn without_resume_window_websocket_frames_are_unchanged_and_resume_is_refused() {
    let app = TestApp::new()
        .scenario(LLAMA_ID, Scenario::reply(["Hi"]))
        .spawn()
        .await;
    let mut socket = connect_json(&app, "llama3").await;
    socket
        .send(Message::text(json!({"prompt": "hi"}).to_string()))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await,
        json!({"type": "chunk", "text": "Hi"})
    );
    assert_eq!(next_json(&mut socket).await["type"], "done");
    socket
        .send(Message::text(
            json!({"type": "resume", "stream_id": "0123456789abcdef0123456789abcdef", "after": 1})
                .to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut socket).await["error"]["code"],
        "resume_expired"
    );
}

#[tokio::test]
async fn a_last_event_id_past_every_event_of_a_live_stream_is_refused() {
    let app = resumable(r#"resume_window = "30s""#)
        .scenario(LLAMA_ID, Scenario::stall(["thinking..."]))
        .spawn()
        .await;
    let response = get_as(&app.url, STREAM, KEY_A, None).await;
    let stream_id = stream_id_of(&response);
    let mut events = numbered_events(response);
    assert_eq!(
        read(&mut events, Some(1)).await[0].id,
        format!("{stream_id}:1")
    );
    // No client can have had these: the stream has sent event 1 only.
    for after in [2, u64::MAX] {
        let after = format!("{stream_id}:{after}");
        let resumed = get_as(&app.url, STREAM, KEY_A, Some(&after)).await;
        expect_error(resumed, 400, "invalid_request").await;
    }
}
