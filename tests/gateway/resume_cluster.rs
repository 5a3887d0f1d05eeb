//! Resumable streams across replicas: the events are copied to the shared Redis, so a client
//! that reconnects through the load balancer and lands on another replica gets what it
//! missed and the rest, exactly once and in order, while the replica that owns the upstream
//! call keeps appending.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::app::{App, LLAMA_ID};
use crate::client::{expect_error, next_json};
use crate::cluster::{Balancer, RedisServer, replicas, wait_for_redis};
use crate::emulator::StreamEnd;
use crate::resume::{
    KEY_A, STREAM, assert_every_event_once_in_order, connect_json_answered, counting, every_frame,
    frames_until_done, get_as, numbered_events, read, resumable, stream_id_of,
};

/// Two resumable replicas sharing `redis`, behind a round-robin balancer; every emulator
/// counts to twenty, a piece every 100 ms, so that the stream outlives the 1 s window.
async fn cluster(redis: &RedisServer) -> (Vec<App>, Balancer) {
    let apps = replicas(2, || {
        resumable(r#"resume_window = "1s""#)
            .redis(&redis.url())
            .scenario(LLAMA_ID, counting(Duration::from_millis(100)))
    })
    .await;
    for app in &apps {
        wait_for_redis(&app.url, "ok").await;
    }
    let balancer = Balancer::start(&apps).await;
    (apps, balancer)
}

fn replica_of(response: &reqwest::Response) -> String {
    response.headers()["x-replica"].to_str().unwrap().to_owned()
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn an_sse_client_resumes_on_another_replica_while_the_owner_keeps_generating() {
    let redis = RedisServer::start().await;
    let (apps, balancer) = cluster(&redis).await;
    let response = get_as(&balancer.url, STREAM, KEY_A, None).await;
    let owner = replica_of(&response);
    let stream_id = stream_id_of(&response);
    let mut events = numbered_events(response);
    let mut seen = read(&mut events, Some(3)).await;
    drop(events);
    let last = seen.last().unwrap().id.clone();
    let resumed = get_as(&balancer.url, STREAM, KEY_A, Some(&last)).await;
    assert_eq!(resumed.status(), 200);
    assert_ne!(replica_of(&resumed), owner, "round robin: another replica");
    // The rest takes longer than the window: the reader's lease keeps the owner going.
    seen.extend(read(&mut numbered_events(resumed), None).await);
    assert_every_event_once_in_order(&seen, &stream_id);
    let generated: Vec<usize> = apps
        .iter()
        .map(|app| app.emulator.requests().len())
        .collect();
    assert_eq!(
        generated.iter().sum::<usize>(),
        1,
        "one generation: {generated:?}"
    );
    let owning = apps
        .iter()
        .find(|app| app.emulator.requests().len() == 1)
        .unwrap();
    let ends = owning
        .emulator
        .wait_streams_ended(1, Duration::from_secs(5))
        .await;
    assert_eq!(ends, [StreamEnd::Completed]);
    // Once ended, another replica still answers a late resume from Redis.
    let late = get_as(&balancer.url, STREAM, KEY_A, Some(&seen[14].id)).await;
    assert_eq!(read(&mut numbered_events(late), None).await, seen[15..]);
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn a_websocket_json_client_resumes_on_another_replica() {
    let redis = RedisServer::start().await;
    let (apps, balancer) = cluster(&redis).await;
    let (mut socket, answer) = connect_json_answered(&balancer.url, KEY_A).await;
    let owner = answer.headers()["x-replica"].clone();
    socket
        .send(Message::text(json!({"prompt": "count"}).to_string()))
        .await
        .unwrap();
    let mut seen = vec![next_json(&mut socket).await, next_json(&mut socket).await];
    drop(socket);
    let stream_id = seen[0]["stream_id"].as_str().unwrap().to_owned();
    let (mut socket, answer) = connect_json_answered(&balancer.url, KEY_A).await;
    assert_ne!(
        answer.headers()["x-replica"],
        owner,
        "round robin: another replica"
    );
    socket
        .send(Message::text(
            json!({"type": "resume", "stream_id": stream_id, "after": 2}).to_string(),
        ))
        .await
        .unwrap();
    seen.extend(frames_until_done(&mut socket).await);
    assert_eq!(seen, every_frame(&stream_id));
    let generated: usize = apps.iter().map(|app| app.emulator.requests().len()).sum();
    assert_eq!(generated, 1);
}

#[tokio::test]
#[ignore = "needs redis-server and haproxy: run scripts/install-test-tools.sh"]
async fn a_last_event_id_past_the_end_is_refused_on_another_replica_too() {
    let redis = RedisServer::start().await;
    let apps = replicas(2, || {
        resumable(r#"resume_window = "30s""#)
            .redis(&redis.url())
            .scenario(LLAMA_ID, counting(Duration::from_millis(1)))
    })
    .await;
    for app in &apps {
        wait_for_redis(&app.url, "ok").await;
    }
    let response = get_as(&apps[0].url, STREAM, KEY_A, None).await;
    let stream_id = stream_id_of(&response);
    let all = read(&mut numbered_events(response), None).await;
    assert_every_event_once_in_order(&all, &stream_id);
    // The stream ended with event 21: nothing comes after 22 or a number that overflows.
    for after in [22, u64::MAX] {
        let last = format!("{stream_id}:{after}");
        let resumed = tokio::time::timeout(
            Duration::from_secs(5),
            get_as(&apps[1].url, STREAM, KEY_A, Some(&last)),
        )
        .await
        .expect("an answer, not a wait for ever");
        expect_error(resumed, 400, "invalid_request").await;
    }
}
